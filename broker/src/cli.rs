//! The `courier` command line.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};

use crate::auth::{self, Claims};
use crate::config::{Config, Overrides};

#[derive(Parser, Debug)]
#[command(
    name = "courier",
    version,
    about = "Courier: a durable message broker for chat and business messaging"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a node (defaults: data in ./courier-data, clients on 127.0.0.1:7700, admin on 127.0.0.1:7701).
    Serve(ServeArgs),
    /// Print a token for a user, signed with the node's secret.
    Token(TokenArgs),
    /// Send one chat message and wait for its acknowledgement.
    Send(SendArgs),
    /// Print messages as they arrive (and acknowledge them).
    Listen(ListenArgs),
    /// Create a group with you as its admin; prints the group id.
    GroupCreate(GroupCreateArgs),
    /// Operate a running node over its admin port (stats, user, group, drain, cluster).
    Admin(AdminArgs),
}

#[derive(Parser, Debug)]
struct AdminArgs {
    /// The node's admin address.
    #[arg(long, default_value = "127.0.0.1:7701")]
    admin_addr: String,
    /// An admin token (`courier token --admin`); without one, a short-lived
    /// token is minted from the node's secret (--data-dir or --config).
    #[arg(long, env = "COURIER_ADMIN_TOKEN")]
    token: Option<String>,
    #[arg(long)]
    data_dir: Option<PathBuf>,
    #[arg(long, env = "COURIER_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    request: AdminRequest,
}

#[derive(Subcommand, Debug)]
enum AdminRequest {
    /// The node's figures: connections, messages, shard queues, storage.
    Stats,
    /// A user's inbox head, acknowledged and oldest sequence.
    User { id: u64 },
    /// A group's strategy, members and log head.
    Group { id: u64 },
    /// Start a graceful shutdown: stop taking connections, finish accepted
    /// sends, say goodbye to every session, exit.
    Drain,
    /// The cluster as this node sees it.
    #[command(subcommand)]
    Cluster(ClusterRequest),
    /// Business accounts, templates and consent (docs/BUSINESS.md).
    Business {
        /// The business's user id.
        id: u64,
        #[command(subcommand)]
        request: BusinessRequest,
    },
}

#[derive(Subcommand, Debug)]
enum BusinessRequest {
    /// The account, its template count and conversations in the tier's period.
    Show,
    /// Register the business, or edit it (a new name waits for review).
    Register {
        #[arg(long)]
        name: Option<String>,
        /// The profile as JSON: {"about", "address", "description",
        /// "email", "websites", "picture"}.
        #[arg(long)]
        profile: Option<String>,
    },
    /// Verify (or, with --unverified, unverify) the business.
    Verify {
        #[arg(long)]
        reason: String,
        #[arg(long)]
        unverified: bool,
    },
    /// Set the messaging tier (0-4: 250, 2,000, 10,000, 100,000,
    /// unlimited) or the messages per second.
    Limits {
        #[arg(long)]
        tier: Option<u8>,
        #[arg(long)]
        messages_per_sec: Option<u32>,
    },
    /// Every template and its status.
    Templates,
    /// Define a template from a JSON file (it becomes pending).
    Template { name: String, file: PathBuf },
    /// Approve, reject, pause or disable a template.
    TemplateStatus {
        name: String,
        status: String,
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// A customer's consent: current state and ledger.
    Consent { customer: u64 },
    /// The consent ledger as JSON (one customer's, or every customer's).
    Export { customer: Option<u64> },
    /// Erase what the business holds of a customer: its messages in the
    /// business's inbox, the ledger (leaves a tombstone).
    Erase { customer: u64 },
    /// The business's message events after a sequence (0: the oldest kept).
    Events {
        #[arg(default_value_t = 0)]
        after: u64,
    },
    /// Statistics per period: half_hour, day or month.
    Stats {
        #[arg(default_value = "day")]
        period: String,
    },
    /// When customers write, how long they wait, when they read.
    Engagement,
    /// Create a campaign from a JSON file (docs/BUSINESS.md, "Campaigns").
    Campaign { file: PathBuf },
    /// Every campaign's report, or one's.
    Campaigns { id: Option<u64> },
    /// Pause, resume or cancel a campaign.
    CampaignControl { id: u64, action: String },
}

#[derive(Subcommand, Debug)]
enum ClusterRequest {
    /// Nodes, their states and shard counts, the controller, etcd's
    /// reachability, the map's state and the moves a rebalance would make.
    Status,
    /// Every shard's owner and epoch.
    Shards,
    /// Move every shard of NODE to the other nodes (a few at a time); it
    /// takes none until `undrain`. Stop it once `status` shows it owns none.
    Drain { node: String },
    /// Let a drained NODE take shards again.
    Undrain { node: String },
    /// Plan and start the moves the map needs now (joins and drains start
    /// them on their own).
    Rebalance,
}

#[derive(Parser, Debug)]
struct GroupCreateArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// Members besides you, comma-separated user ids.
    #[arg(long, value_delimiter = ',')]
    members: Vec<u64>,
}

#[derive(Parser, Debug)]
struct ClientArgs {
    /// The node's client address.
    #[arg(long, default_value = "127.0.0.1:7700")]
    addr: String,
    /// Your user id.
    #[arg(long)]
    user: u64,
    #[arg(long, default_value_t = 1)]
    device: u32,
    /// Your token (from `courier token`).
    #[arg(long, env = "COURIER_TOKEN")]
    token: String,
}

#[derive(Parser, Debug)]
struct SendArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// Recipient user id.
    #[arg(long, required_unless_present = "group", conflicts_with = "group")]
    to: Option<u64>,
    /// Send to this group (an id printed by `courier group-create`).
    #[arg(long)]
    group: Option<u64>,
    /// The text to send.
    text: String,
}

#[derive(Parser, Debug)]
struct ListenArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// Resume after this inbox sequence (default: after what you acknowledged).
    #[arg(long)]
    after: Option<u64>,
    /// Exit after this many messages.
    #[arg(long)]
    count: Option<u64>,
}

#[derive(Parser, Debug)]
struct ServeArgs {
    /// TOML configuration file (also COURIER_CONFIG).
    #[arg(long, env = "COURIER_CONFIG")]
    config: Option<PathBuf>,
    /// Data directory.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Client listener address.
    #[arg(long)]
    listen: Option<String>,
    /// Admin HTTP listener address.
    #[arg(long)]
    admin_listen: Option<String>,
    /// fsync (survives power loss, the default) or wal (survives a process crash).
    #[arg(long)]
    durability: Option<String>,
    /// Network path: auto (io_uring if the kernel allows it, else epoll),
    /// uring or epoll.
    #[arg(long)]
    io: Option<String>,
    /// Join this cluster (cluster.name); without it the node is a single
    /// node with no etcd.
    #[arg(long)]
    cluster: Option<String>,
    /// etcd's client URLs, comma-separated (cluster.etcd).
    #[arg(long)]
    etcd: Option<String>,
    /// This node's id in the cluster (cluster.node_id).
    #[arg(long)]
    node_id: Option<String>,
    /// HOST:PORT the other nodes reach this node on (cluster.advertise).
    #[arg(long)]
    advertise: Option<String>,
    /// Log filter: a level (error, warn, info, debug, trace) or per-module
    /// directives such as `info,courier_broker::conn=debug`. Debug logs one
    /// line per connection event; no level logs per message.
    #[arg(long, env = "COURIER_LOG", default_value = "info")]
    log: String,
    /// Log format: `text` (one line per event) or `json` (one object per line).
    #[arg(long, env = "COURIER_LOG_FORMAT", default_value = "text")]
    log_format: LogFormat,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Parser, Debug)]
struct TokenArgs {
    #[arg(long, required_unless_present = "admin", conflicts_with = "admin")]
    user: Option<u64>,
    /// An admin token (for `courier admin` and the admin port's /admin/ requests).
    #[arg(long)]
    admin: bool,
    #[arg(long, default_value_t = 1)]
    device: u32,
    /// Lifetime, e.g. 30s, 15m, 24h, 7d.
    #[arg(long, default_value = "24h")]
    ttl: String,
    /// Data directory holding secret.key.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Configuration file (its data_dir and auth.secret_file are used).
    #[arg(long, env = "COURIER_CONFIG")]
    config: Option<PathBuf>,
}

fn parse_ttl(s: &str) -> anyhow::Result<Duration> {
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().with_context(|| format!("bad ttl {s:?}"))?;
    let secs = match unit {
        "s" | "" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86400,
        _ => anyhow::bail!("bad ttl unit in {s:?}: use s, m, h or d"),
    };
    Ok(Duration::from_secs(secs))
}

pub fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(a) => {
            let config = Config::load(
                a.config.as_deref(),
                std::env::vars(),
                Overrides {
                    data_dir: a.data_dir,
                    listen: a.listen,
                    admin_listen: a.admin_listen,
                    durability: a.durability,
                    io: a.io,
                    cluster: a.cluster,
                    etcd: a.etcd,
                    node_id: a.node_id,
                    advertise: a.advertise,
                },
            )?;
            init_logging(&a.log, a.log_format)?;
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .thread_name("courier-io")
                .build()?;
            runtime.block_on(crate::server::run(config))
        }
        Command::Send(a) => client_runtime()?.block_on(async {
            let (client, _) = connect(&a.client, None).await?;
            let (to, place) = match (a.to, a.group) {
                (Some(u), _) => (courier_protocol::Destination::User(u), format!("user {u}'s inbox")),
                (None, Some(g)) => (courier_protocol::Destination::Group(g), format!("group {g}'s log")),
                (None, None) => anyhow::bail!("give --to USER or --group GROUP"),
            };
            let ack = client
                .send(
                    to,
                    courier_protocol::MessageKind::Chat,
                    a.text.into_bytes().into(),
                )
                .await?;
            println!(
                "sent: seq {} in {place}, server id {}{}",
                ack.seq,
                ack.server_msg_id,
                if ack.duplicate { " (duplicate)" } else { "" }
            );
            Ok(())
        }),
        Command::GroupCreate(a) => client_runtime()?.block_on(async {
            let (client, _) = connect(&a.client, None).await?;
            let info = client.create_group(a.members).await?;
            println!("{}", info.group);
            Ok(())
        }),
        Command::Listen(a) => client_runtime()?.block_on(async {
            let (client, welcome) = connect(&a.client, a.after).await?;
            eprintln!(
                "listening as user {} (inbox head {}, delivering from {}{})",
                a.client.user,
                welcome.head_seq,
                welcome.resume_from,
                if welcome.gap { "; older messages expired" } else { "" }
            );
            let mut seen = 0;
            while a.count.is_none_or(|c| seen < c) {
                tokio::select! {
                    d = client.next() => {
                        let Some(d) = d else { break };
                        let m = &d.message;
                        let text = match m.kind {
                            courier_protocol::MessageKind::System => match courier_protocol::GroupEvent::decode(&m.payload) {
                                Ok(ev) => format!("{:?} {:?} by {}", ev.kind, ev.users, ev.actor),
                                Err(_) => "(system message)".into(),
                            },
                            courier_protocol::MessageKind::Receipt => match courier_protocol::ReceiptPayload::decode(&m.payload) {
                                Ok(r) => format!("{:?} by {} for {} message(s)", r.status, r.reader, r.messages.len()),
                                Err(_) => "(receipt)".into(),
                            },
                            _ => String::from_utf8_lossy(&m.payload).into_owned(),
                        };
                        match m.destination {
                            courier_protocol::Destination::Group(g) => {
                                println!("[{}] from {} in group {g}: {text}", m.seq, m.sender)
                            }
                            _ => println!("[{}] from {}: {text}", m.seq, m.sender),
                        }
                        client.confirm(&d).await?;
                        seen += 1;
                    }
                    _ = tokio::time::sleep(Duration::from_millis(u64::from(welcome.keepalive_ms))) => {
                        client.ping().await?;
                    }
                }
            }
            // Make sure the last ack left before we hang up.
            client.ping().await?;
            Ok(())
        }),
        Command::Token(a) => {
            let key = node_key(a.config.as_deref(), a.data_dir)?;
            let ttl = parse_ttl(&a.ttl)?;
            let (user_id, device_id) = match a.user {
                Some(u) if !a.admin => (u, a.device),
                _ => (crate::admin::ADMIN_USER, crate::admin::ADMIN_DEVICE),
            };
            let token = key.mint(Claims {
                user_id,
                device_id,
                expires_at_s: courier_storage::Clock::system().now_ms() / 1000 + ttl.as_secs(),
            });
            println!("{token}");
            Ok(())
        }
        Command::Admin(a) => {
            let token = match a.token {
                Some(t) => t,
                None => node_key(a.config.as_deref(), a.data_dir)?.mint(Claims {
                    user_id: crate::admin::ADMIN_USER,
                    device_id: crate::admin::ADMIN_DEVICE,
                    expires_at_s: courier_storage::Clock::system().now_ms() / 1000 + 60,
                }),
            };
            let mut body = String::new();
            let (method, path) = match a.request {
                AdminRequest::Business { id, request } => {
                    let at = |rest: &str| format!("/admin/businesses/{id}{rest}");
                    match request {
                        BusinessRequest::Show => ("GET", at("")),
                        BusinessRequest::Register { name, profile } => {
                            let profile = profile
                                .map(|p| serde_json::from_str::<serde_json::Value>(&p))
                                .transpose()
                                .context("--profile is not JSON")?;
                            body = serde_json::json!({ "display_name": name, "profile": profile })
                                .to_string();
                            ("PUT", at(""))
                        }
                        BusinessRequest::Verify { reason, unverified } => {
                            body = serde_json::json!({ "verified": !unverified, "reason": reason })
                                .to_string();
                            ("POST", at("/verify"))
                        }
                        BusinessRequest::Limits {
                            tier,
                            messages_per_sec,
                        } => {
                            body = serde_json::json!({ "tier": tier, "messages_per_sec": messages_per_sec })
                                .to_string();
                            ("POST", at("/limits"))
                        }
                        BusinessRequest::Templates => ("GET", at("/templates")),
                        BusinessRequest::Template { name, file } => {
                            body = std::fs::read_to_string(&file)
                                .with_context(|| format!("reading {}", file.display()))?;
                            ("PUT", at(&format!("/templates/{name}")))
                        }
                        BusinessRequest::TemplateStatus {
                            name,
                            status,
                            reason,
                        } => {
                            body = serde_json::json!({ "status": status, "reason": reason })
                                .to_string();
                            ("POST", at(&format!("/templates/{name}/status")))
                        }
                        BusinessRequest::Consent { customer } => {
                            ("GET", at(&format!("/consent/{customer}")))
                        }
                        BusinessRequest::Export { customer } => match customer {
                            Some(c) => ("GET", at(&format!("/export/{c}"))),
                            None => ("GET", at("/export")),
                        },
                        BusinessRequest::Erase { customer } => {
                            ("POST", at(&format!("/erase/{customer}")))
                        }
                        BusinessRequest::Events { after } => {
                            ("GET", at(&format!("/events/{after}/1000")))
                        }
                        BusinessRequest::Stats { period } => {
                            ("GET", at(&format!("/stats/{period}")))
                        }
                        BusinessRequest::Engagement => ("GET", at("/engagement")),
                        BusinessRequest::Campaign { file } => {
                            body = std::fs::read_to_string(&file)
                                .with_context(|| format!("reading {}", file.display()))?;
                            ("POST", at("/campaigns"))
                        }
                        BusinessRequest::Campaigns { id } => match id {
                            Some(id) => ("GET", at(&format!("/campaigns/{id}"))),
                            None => ("GET", at("/campaigns")),
                        },
                        BusinessRequest::CampaignControl { id, action } => {
                            ("POST", at(&format!("/campaigns/{id}/{action}")))
                        }
                    }
                }
                AdminRequest::Stats => ("GET", "/admin/stats".to_string()),
                AdminRequest::User { id } => ("GET", format!("/admin/users/{id}")),
                AdminRequest::Group { id } => ("GET", format!("/admin/groups/{id}")),
                AdminRequest::Drain => ("POST", "/admin/drain".to_string()),
                AdminRequest::Cluster(ClusterRequest::Status) => ("GET", "/admin/cluster".to_string()),
                AdminRequest::Cluster(ClusterRequest::Shards) => {
                    ("GET", "/admin/cluster/shards".to_string())
                }
                AdminRequest::Cluster(ClusterRequest::Drain { node }) => {
                    ("POST", format!("/admin/cluster/drain/{node}"))
                }
                AdminRequest::Cluster(ClusterRequest::Undrain { node }) => {
                    ("POST", format!("/admin/cluster/undrain/{node}"))
                }
                AdminRequest::Cluster(ClusterRequest::Rebalance) => {
                    ("POST", "/admin/cluster/rebalance".to_string())
                }
            };
            let (status, body) = client_runtime()?
                .block_on(http_request(&a.admin_addr, method, &path, &token, &body))
                .with_context(|| format!("asking the node at {}", a.admin_addr))?;
            print!("{body}");
            anyhow::ensure!((200..300).contains(&status), "the node answered {status}");
            Ok(())
        }
    }
}

/// The node's token key, from its configuration or data directory.
fn node_key(
    config: Option<&std::path::Path>,
    data_dir: Option<PathBuf>,
) -> anyhow::Result<auth::TokenKey> {
    let config = Config::load(
        config,
        std::env::vars(),
        Overrides {
            data_dir,
            ..Default::default()
        },
    )?;
    let path = config.secret_path();
    anyhow::ensure!(
        path.exists(),
        "no secret at {}: start the node once (courier serve) or pass --data-dir",
        path.display()
    );
    auth::load_or_create_secret(&path)
}

/// One HTTP/1.1 request to the admin port; returns (status, body).
async fn http_request(
    addr: &str,
    method: &str,
    path: &str,
    token: &str,
    body: &str,
) -> anyhow::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::net::TcpStream::connect(addr),
    )
    .await
    .context("timed out connecting")??;
    let request = format!(
        "{method} {path} HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer {token}\r\nconnection: close\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(request.as_bytes()).await?;
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut response))
        .await
        .context("timed out waiting for the answer")??;
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .context("not an HTTP response")?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("no HTTP status")?;
    Ok((status, body.to_string()))
}

fn init_logging(filter: &str, format: LogFormat) -> anyhow::Result<()> {
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_new(filter).with_context(|| format!("bad log filter {filter:?}"))?;
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => logs
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        LogFormat::Json => logs.json().init(),
    }
    Ok(())
}

fn client_runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}

async fn connect(
    a: &ClientArgs,
    resume_after: Option<u64>,
) -> anyhow::Result<(courier_client::Client, courier_protocol::Welcome)> {
    let mut config =
        courier_client::ClientConfig::new(a.addr.clone(), a.user, a.device, a.token.clone());
    config.resume_after = resume_after;
    courier_client::Client::connect(config)
        .await
        .with_context(|| format!("connecting to {}", a.addr))
}

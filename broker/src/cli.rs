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
}

#[derive(Parser, Debug)]
struct TokenArgs {
    #[arg(long)]
    user: u64,
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
                },
            )?;
            init_logging();
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
            let config = Config::load(
                a.config.as_deref(),
                std::env::vars(),
                Overrides {
                    data_dir: a.data_dir,
                    ..Default::default()
                },
            )?;
            let path = config.secret_path();
            anyhow::ensure!(
                path.exists(),
                "no secret at {}: start the node once (courier serve) or pass --data-dir",
                path.display()
            );
            let key = auth::load_or_create_secret(&path)?;
            let ttl = parse_ttl(&a.ttl)?;
            let token = key.mint(Claims {
                user_id: a.user,
                device_id: a.device,
                expires_at_s: crate::now_ms() / 1000 + ttl.as_secs(),
            });
            println!("{token}");
            Ok(())
        }
    }
}

fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("COURIER_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
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

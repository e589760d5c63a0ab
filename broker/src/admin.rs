//! The admin HTTP endpoint.
//!
//! Open to whoever reaches the admin port (bind it to a private address):
//! - `GET /healthz`: the process is alive;
//! - `GET /readyz`: storage open and listeners up (503 while shutting down,
//!   and while a replicating cluster node's lease may have expired);
//! - `GET /metrics`: Prometheus text format.
//!
//! Operator requests need `Authorization: Bearer <admin token>` (`courier
//! token --admin`; a token for user 0, which no client session can use):
//! - `GET /admin/stats`: the node's figures as JSON;
//! - `GET /admin/users/<id>`: a user's inbox head, acknowledged and oldest
//!   sequence;
//! - `GET /admin/groups/<id>`: a group's strategy, members and log head;
//! - `GET /admin/cluster`: the cluster as this node sees it (nodes and
//!   their states, the controller, etcd, the map); `GET
//!   /admin/cluster/shards`: every shard's owner and epoch;
//! - `POST /admin/cluster/drain/<node>` (and `undrain/<node>`): that node
//!   gives all its shards away, a few moves at a time, and takes none;
//!   `POST /admin/cluster/rebalance`: the controller plans and starts the
//!   moves the map needs now (it also does when nodes come, go or drain);
//! - `POST /admin/drain`: start a graceful shutdown (the node stops taking
//!   connections, finishes accepted sends, says goodbye and exits);
//! - `/admin/businesses/<id>...`: business accounts, templates and the
//!   consent ledger (`business_api.rs`, docs/BUSINESS.md);
//! - `POST /admin/clock/advance/<ms>`: with `test_clock` only, moves the
//!   node's clock forward.
//!
//! A business's own requests take its token instead (`dashboard.rs`):
//! `GET /dashboard` (the page) and `GET /dashboard/api`.
//!
//! A deliberately tiny HTTP/1.1 responder: one request per connection,
//! bounded header size, JSON bodies of at most 256 KiB (`content-length`).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info, warn};

use crate::metrics::Metrics;
use crate::node::Node;
use crate::state::ids::{is_group, valid_user};
use crate::state::keys;
use crate::state::rows::GroupState;

const REQUEST_HEAD_MAX: usize = 8192;
/// The largest request body (a template with all its languages).
const REQUEST_BODY_MAX: usize = 256 << 10;

/// The identity an admin token is minted for: user 0, device 0.
pub const ADMIN_USER: u64 = 0;
pub const ADMIN_DEVICE: u32 = 0;

pub async fn run(listener: TcpListener, node: Arc<Node>) {
    loop {
        let stream = tokio::select! {
            _ = node.shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(_) => continue,
            },
        };
        let node = node.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(5), respond(stream, &node)).await;
        });
    }
}

/// An answer: status line, content type, body.
struct Answer {
    status: &'static str,
    content_type: String,
    body: String,
    /// A redirect's target (a `location` header).
    location: Option<String>,
}

impl Answer {
    fn text(status: &'static str, body: &str) -> Answer {
        Answer {
            status,
            content_type: "text/plain; charset=utf-8".into(),
            body: body.into(),
            location: None,
        }
    }

    fn json(status: &'static str, value: serde_json::Value) -> Answer {
        let mut body = serde_json::to_string_pretty(&value).expect("JSON values serialise");
        body.push('\n');
        Answer {
            status,
            content_type: "application/json".into(),
            body,
            location: None,
        }
    }

    fn error(status: &'static str, message: &str) -> Answer {
        Answer::json(status, json!({ "error": message }))
    }
}

async fn respond(mut stream: TcpStream, node: &Arc<Node>) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut chunk).await?;
        if n == 0 || buf.len() + n > REQUEST_HEAD_MAX {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let end = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("seen above")
        + 4;
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let mut body = buf[end..].to_vec();
    let mut lines = head.split("\r\n");
    let mut parts = lines.next().unwrap_or_default().split(' ');
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let header = |name: &str| {
        head.split("\r\n")
            .skip(1)
            .filter_map(|l| l.split_once(':'))
            .find(|(k, _)| k.trim().eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim().to_owned())
    };
    let bearer = header("authorization")
        .and_then(|v| v.strip_prefix("Bearer ").map(|t| t.trim().to_owned()));
    let length = header("content-length")
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(0);
    let answer = if length > REQUEST_BODY_MAX {
        Answer::error("413 Payload Too Large", "a request body is at most 256 KiB")
    } else {
        while body.len() < length {
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            body.extend_from_slice(&chunk[..n]);
        }
        body.truncate(length);
        route(node, method, path, bearer.as_deref(), &body).await
    };
    let location = answer
        .location
        .map(|l| format!("location: {l}\r\n"))
        .unwrap_or_default();
    let response = format!(
        "HTTP/1.1 {}\r\ncontent-type: {}\r\ncontent-length: {}\r\n{location}connection: close\r\n\r\n{}",
        answer.status,
        answer.content_type,
        answer.body.len(),
        answer.body
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

/// A replicating cluster node whose lease may have expired serves none of
/// its shards, and its view of the map may be stale: its clients are
/// better off on another node.
fn lease_lost(node: &Node) -> bool {
    node.cluster
        .get()
        .and_then(|c| c.replication.get())
        .is_some_and(|r| r.lease_lost())
}

async fn route(
    node: &Arc<Node>,
    method: &str,
    path: &str,
    bearer: Option<&str>,
    body: &[u8],
) -> Answer {
    match (method, path) {
        ("GET", "/healthz") => Answer::text("200 OK", "ok\n"),
        ("GET", "/readyz") if lease_lost(node) => Answer::text(
            "503 Service Unavailable",
            "not ready: this node may have lost its etcd lease (its replicated shards are fenced)\n",
        ),
        ("GET", "/readyz") if node.ready.load(Ordering::SeqCst) => {
            Answer::text("200 OK", "ready\n")
        }
        ("GET", "/readyz") => Answer::text("503 Service Unavailable", "not ready\n"),
        ("GET", "/metrics") => Answer {
            status: "200 OK",
            content_type: Metrics::content_type(),
            body: node
                .metrics
                .render(node.store.health(), &node.config.data_dir),
            location: None,
        },
        ("GET", p) if p.starts_with("/c/") => click(node, &p[3..]).await,
        ("GET", "/dashboard" | "/dashboard/") => Answer {
            status: "200 OK",
            content_type: "text/html; charset=utf-8".into(),
            body: crate::dashboard::PAGE.into(),
            location: None,
        },
        ("GET", p) if p == "/dashboard/api" || p.starts_with("/dashboard/api?") => {
            let query = p.split_once('?').map_or("", |(_, q)| q);
            let (status, value) = crate::dashboard::api(node, bearer, query).await;
            Answer::json(status, value)
        }
        (_, p) if p.starts_with("/admin/") => {
            if let Err(e) = authorize(node, bearer) {
                return e;
            }
            admin(node, method, p, body).await
        }
        ("GET", _) => Answer::text("404 Not Found", "not found\n"),
        _ => Answer::text("405 Method Not Allowed", "method not allowed\n"),
    }
}

/// A customer's tap on a tracked link: counted on the business's shard
/// (when it is this node's: a click that lands on another cluster node is
/// redirected without being counted), then redirected.
async fn click(node: &Arc<Node>, token: &str) -> Answer {
    use crate::state::business_events::click;
    let Some(c) = click::verify(&node.key, token) else {
        return Answer::text("404 Not Found", "no such link\n");
    };
    if c.url.chars().any(char::is_control) {
        return Answer::text("400 Bad Request", "the link's target is not a URL\n");
    }
    let op = crate::shard::messages::AdminOp::Click {
        message: c.message,
        customer: c.customer,
    };
    if let Some(Err(e)) = crate::business_api::ask(node, c.business, op).await {
        debug!(
            business = c.business,
            code = e.code,
            "a click was not counted"
        );
    }
    Answer {
        location: Some(c.url),
        ..Answer::text("302 Found", "")
    }
}

fn authorize(node: &Node, bearer: Option<&str>) -> Result<(), Answer> {
    let Some(token) = bearer else {
        return Err(Answer::error(
            "401 Unauthorized",
            "admin requests need Authorization: Bearer <token from courier token --admin>",
        ));
    };
    node.key
        .verify(
            token.as_bytes(),
            ADMIN_USER,
            ADMIN_DEVICE,
            node.clock.now_ms() / 1000,
        )
        .map(|_| ())
        .map_err(|e| {
            warn!(error = %e, "admin request refused");
            Answer::error("403 Forbidden", &format!("not an admin token: {e}"))
        })
}

async fn admin(node: &Arc<Node>, method: &str, path: &str, body: &[u8]) -> Answer {
    let rest = path.trim_start_matches("/admin/");
    if let Some(rest) = rest.strip_prefix("businesses/") {
        // `.../stats/<period>.csv`: the same rows as CSV.
        if let Some(json_path) = rest.strip_suffix(".csv").filter(|p| p.contains("/stats/")) {
            let (status, value) = crate::business_api::route(node, method, json_path, body).await;
            return match value["rows"].as_array() {
                Some(rows) if status == "200 OK" => Answer {
                    content_type: "text/csv; charset=utf-8".into(),
                    ..Answer::text(status, &crate::business_api::stats_csv(rows))
                },
                _ => Answer::json(status, value),
            };
        }
        let (status, value) = crate::business_api::route(node, method, rest, body).await;
        return Answer::json(status, value);
    }
    let mut parts = rest.splitn(2, '/');
    let (what, arg) = (parts.next().unwrap_or(""), parts.next());
    match (method, what, arg) {
        ("GET", "stats", None) => Answer::json("200 OK", stats(node)),
        ("GET", "users", Some(id)) => match id.parse::<u64>() {
            Ok(u) if valid_user(u) => blocking(node, move |node| user(node, u)).await,
            _ => Answer::error("400 Bad Request", "a user id is a number from 1 to 2^63-1"),
        },
        ("GET", "groups", Some(id)) => match id.parse::<u64>() {
            Ok(g) if is_group(g) => blocking(node, move |node| group(node, g)).await,
            _ => Answer::error("400 Bad Request", "a group id has its top bit set"),
        },
        ("GET", "cluster", Some("digests")) => match node.cluster.get() {
            Some(c) => {
                let c = c.clone();
                blocking(node, move |_| match c.replication.get() {
                    Some(r) => Answer::json("200 OK", r.digests(&c.view())),
                    None => Answer::error("404 Not Found", "no replication on this node"),
                })
                .await
            }
            None => Answer::error(
                "404 Not Found",
                "this node is a single node (started without --cluster)",
            ),
        },
        ("GET", "cluster", None | Some("shards")) => match node.cluster.get() {
            Some(c) if arg.is_none() => Answer::json("200 OK", c.status()),
            Some(c) => Answer::json("200 OK", c.shards()),
            None => Answer::error(
                "404 Not Found",
                "this node is a single node (started without --cluster)",
            ),
        },
        ("POST", "cluster", Some(what)) => match node.cluster.get() {
            Some(c) => {
                let answer = match what.split_once('/') {
                    Some(("drain", n)) => c.drain(n, true).await.map(|()| json!({ "draining": n })),
                    Some(("undrain", n)) => {
                        c.drain(n, false).await.map(|()| json!({ "undrained": n }))
                    }
                    None if what == "rebalance" => {
                        c.rebalance().await.map(|n| json!({ "planned_moves": n }))
                    }
                    _ => return Answer::error("404 Not Found", "no such cluster request"),
                };
                match answer {
                    Ok(v) => Answer::json("202 Accepted", v),
                    Err(e) => Answer::error("409 Conflict", &format!("{e:#}")),
                }
            }
            None => Answer::error(
                "404 Not Found",
                "this node is a single node (started without --cluster)",
            ),
        },
        ("POST", "clock", Some(what)) => {
            match (node.clock_shift.get(), what.strip_prefix("advance/")) {
                (Some(shift), Some(ms)) => match ms.parse::<u64>() {
                    Ok(ms) => {
                        let total = shift.fetch_add(ms, Ordering::SeqCst) + ms;
                        Answer::json(
                            "200 OK",
                            json!({ "now_ms": node.clock.now_ms(), "shift_ms": total }),
                        )
                    }
                    Err(_) => {
                        Answer::error("400 Bad Request", "advance by a number of milliseconds")
                    }
                },
                (None, _) => Answer::error("404 Not Found", "this node runs without test_clock"),
                _ => Answer::error("404 Not Found", "no such clock request"),
            }
        }
        ("POST", "drain", None) => {
            info!("drain requested over the admin port: shutting down gracefully");
            node.shutdown.cancel();
            Answer::json("202 Accepted", json!({ "draining": true }))
        }
        ("GET" | "POST", _, _) => Answer::error("404 Not Found", "no such admin request"),
        _ => Answer::error("405 Method Not Allowed", "method not allowed"),
    }
}

/// Runs a store read off the async threads.
async fn blocking(node: &Arc<Node>, f: impl FnOnce(&Node) -> Answer + Send + 'static) -> Answer {
    let node = node.clone();
    tokio::task::spawn_blocking(move || f(&node))
        .await
        .unwrap_or_else(|_| Answer::error("500 Internal Server Error", "the request failed"))
}

fn stats(node: &Node) -> serde_json::Value {
    let s = &node.shards.stats;
    let m = &node.metrics;
    let shards: Vec<_> = s
        .queue_pushed
        .iter()
        .zip(&s.queue_popped)
        .map(|(pushed, popped)| {
            json!({
                "queued": pushed.get().saturating_sub(popped.get()),
                "pushed": pushed.get(),
                "popped": popped.get(),
            })
        })
        .collect();
    let storage = node.store.health().map(|h| {
        json!({
            "pending_compaction_bytes": h.pending_compaction_bytes,
            "write_stopped": h.write_stopped,
            "write_delayed": h.write_delayed,
            "memtable_bytes": h.memtable_bytes,
            "block_cache_bytes": h.block_cache_bytes,
            "live_data_bytes": h.live_data_bytes,
            "sst_bytes": h.sst_bytes,
            "wal_syncs": h.wal_syncs,
        })
    });
    json!({
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_s": node.started.elapsed().as_secs(),
        "ready": node.ready.load(Ordering::SeqCst),
        "connections_open": m.connections_open.get(),
        "connections_accepted": m.connections_accepted.get(),
        "messages_accepted": m.messages_accepted(),
        "messages_stored": s.messages_stored.get(),
        "group_messages": s.group_messages.get(),
        "duplicates": s.duplicates.get(),
        "live_pushes": s.live_pushes.get(),
        "slow_consumer_demotions": s.demotions.get(),
        "storage_errors": s.storage_errors.get(),
        "shards": shards,
        "storage": storage,
    })
}

fn user(node: &Node, u: u64) -> Answer {
    match node.store.state(u) {
        Ok(s) => Answer::json(
            "200 OK",
            json!({
                "user": u,
                "head_seq": s.head_seq,
                "acked_seq": s.acked_seq,
                "oldest_seq": s.oldest_seq,
            }),
        ),
        Err(e @ courier_storage::StoreError::Unreplicated(_)) => {
            Answer::error("503 Service Unavailable", &e.to_string())
        }
        Err(e) => Answer::error("500 Internal Server Error", &e.to_string()),
    }
}

fn group(node: &Node, g: u64) -> Answer {
    let state = match node.store.get(&keys::group(g)) {
        Ok(Some(v)) => match GroupState::decode(&v) {
            Some(s) => s,
            None => return Answer::error("500 Internal Server Error", "group state unreadable"),
        },
        Ok(None) => return Answer::error("404 Not Found", "no such group"),
        Err(e) => return Answer::error("500 Internal Server Error", &e.to_string()),
    };
    let head = node.store.state(g).map(|s| s.head_seq).unwrap_or(0);
    let members: Vec<_> = state
        .members
        .iter()
        .map(|m| json!({ "user": m.user, "role": format!("{:?}", m.role).to_lowercase(), "joined_seq": m.joined_seq }))
        .collect();
    Answer::json(
        "200 OK",
        json!({
            "group": g,
            "strategy": format!("{:?}", state.strategy).to_lowercase(),
            "log_head_seq": head,
            "members": members,
        }),
    )
}

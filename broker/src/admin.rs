//! The admin HTTP endpoint: `/healthz` (the process is alive) and `/readyz`
//! (storage open and listeners up; 503 while shutting down). A deliberately
//! tiny HTTP/1.1 responder: one request per connection, bounded header size.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::Node;

const REQUEST_HEAD_MAX: usize = 8192;

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

async fn respond(mut stream: TcpStream, node: &Node) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut chunk).await?;
        if n == 0 || buf.len() + n > REQUEST_HEAD_MAX {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let line = buf.split(|&b| b == b'\r').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split(' ');
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let metrics = render_metrics(node);
    let (status, body) = match (method, path) {
        ("GET", "/healthz") => ("200 OK", "ok\n"),
        ("GET", "/readyz") if node.ready.load(Ordering::SeqCst) => ("200 OK", "ready\n"),
        ("GET", "/readyz") => ("503 Service Unavailable", "not ready\n"),
        ("GET", "/metrics") => ("200 OK", metrics.as_str()),
        ("GET", _) => ("404 Not Found", "not found\n"),
        _ => ("405 Method Not Allowed", "method not allowed\n"),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

/// A first handful of counters in the Prometheus text format. The complete
/// metric set (with the prometheus crate) comes with the observability work.
fn render_metrics(node: &Node) -> String {
    use std::fmt::Write;
    let s = &node.shards.stats;
    let mut out = String::new();
    for (name, help, value) in [
        (
            "courier_messages_stored_total",
            "Messages appended to inboxes.",
            &s.messages_stored,
        ),
        (
            "courier_duplicate_sends_total",
            "Sends answered from the idempotency index.",
            &s.duplicates,
        ),
        (
            "courier_live_pushes_total",
            "Messages pushed to live sessions.",
            &s.live_pushes,
        ),
        (
            "courier_slow_consumer_demotions_total",
            "Sessions moved from live push to catch-up.",
            &s.demotions,
        ),
        (
            "courier_storage_errors_total",
            "Failed storage appends.",
            &s.storage_errors,
        ),
        (
            "courier_group_messages_total",
            "Group messages appended to group logs.",
            &s.group_messages,
        ),
        (
            "courier_group_references_total",
            "References to group messages appended to member inboxes.",
            &s.refs_stored,
        ),
        (
            "courier_receipts_stored_total",
            "Receipt messages appended to senders' inboxes.",
            &s.receipts_stored,
        ),
    ] {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
            value.load(Ordering::Relaxed)
        );
    }
    out
}

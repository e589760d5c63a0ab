//! Posting businesses' events to their webhooks: at least once, in the
//! order of the business's event sequence, signed, retried with backoff
//! while the endpoint fails, for `business.webhook_give_up_ms` (7 days).
//!
//! ```text
//!  business's shard ── poke(b) ──► dispatcher ──► one task per business
//!        ▲                                            │ WebhookBatch (events after `delivered`)
//!        └──────── WebhookDelivered(up_to) ◄── POST ◄─┘ 2xx: next batch; else wait and retry
//! ```
//!
//! The shard owns the events and the `delivered` mark (row `W`); the task
//! only reads a batch, posts it, and on a 2xx moves the mark. A node that
//! dies between the post and the mark posts the batch again after it
//! restarts (the shard pokes every business with a webhook at start):
//! receivers de-duplicate by the events' stable ids. One request at a time
//! per business keeps every message's events in order. A business whose
//! shard moves away stops here (its shard answers 421) and starts on the
//! new owner, which pokes it when it loads the shard.
//!
//! A request: `POST` to the business's URL with the JSON body
//! `{"business", "events": [...]}` and the header
//! `X-Courier-Signature: t=<ms>,v1=<hex HMAC-SHA256(secret, "<ms>." + body)>`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use hmac::{Hmac, Mac};
use prometheus::IntCounterVec;
use sha2::Sha256;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, Notify};
use tracing::{debug, warn};

use crate::business_api::ask;
use crate::node::Node;
use crate::shard::messages::AdminOp;

/// Where a webhook posts: `http://host[:port][/path]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// `host:port`, as connected to and sent in `Host`.
    pub authority: String,
    pub path: String,
}

impl Endpoint {
    pub fn parse(url: &str) -> Result<Endpoint, String> {
        let Some(rest) = url.strip_prefix("http://") else {
            return Err(format!(
                "{url:?}: a webhook URL is http://host[:port][/path] (put a TLS-terminating proxy in front of an https endpoint)"
            ));
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        if authority.is_empty()
            || authority.contains(['@', ' '])
            || path.contains([' ', '\r', '\n'])
        {
            return Err(format!("{url:?}: no host, or characters a URL cannot hold"));
        }
        let authority = if authority
            .rsplit_once(':')
            .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
        {
            authority.to_owned()
        } else {
            format!("{authority}:80")
        };
        Ok(Endpoint {
            authority,
            path: path.to_owned(),
        })
    }
}

/// The signature header's value for `body` signed at `t_ms`.
pub fn signature(secret: &str, t_ms: u64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
    mac.update(t_ms.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    let digest = mac.finalize().into_bytes();
    format!(
        "t={t_ms},v1={}",
        courier_protocol::token::encode_hex(&digest)
    )
}

struct Counters {
    requests: IntCounterVec,
    events: IntCounterVec,
}

/// Starts the node's webhook sender, which the shards poke (through the
/// business directory) with businesses that have events to post.
pub fn start(node: &Arc<Node>) {
    let Some(pokes) = node.webhook_pokes.lock().expect("pokes lock").take() else {
        return;
    };
    let vec = |name: &str, help: &str| {
        let v = IntCounterVec::new(prometheus::Opts::new(name, help), &["outcome"])
            .expect("valid metric");
        node.metrics.register(v.clone());
        v
    };
    let counters = Arc::new(Counters {
        requests: vec(
            "courier_webhook_requests_total",
            "Webhook requests, by outcome: ok (2xx), failed (other status, refused, timed out).",
        ),
        events: vec(
            "courier_webhook_events_total",
            "Business events by webhook outcome: delivered, dropped (not taken within business.webhook_give_up_ms).",
        ),
    });
    // Every series from the start, at 0.
    for (v, outcome) in [
        (&counters.requests, "ok"),
        (&counters.requests, "failed"),
        (&counters.events, "delivered"),
        (&counters.events, "dropped"),
    ] {
        v.with_label_values(&[outcome]);
    }
    tokio::spawn(dispatch(node.clone(), pokes, counters));
}

/// Keeps one task per business with events to post.
async fn dispatch(node: Arc<Node>, mut pokes: mpsc::UnboundedReceiver<u64>, c: Arc<Counters>) {
    let mut running: HashMap<u64, Arc<Notify>> = HashMap::new();
    let (done_tx, mut done) = mpsc::unbounded_channel::<u64>();
    loop {
        tokio::select! {
            b = pokes.recv() => {
                let Some(b) = b else { break };
                match running.get(&b) {
                    Some(n) => n.notify_one(),
                    None => {
                        let n = Arc::new(Notify::new());
                        running.insert(b, n.clone());
                        let (node, c, done) = (node.clone(), c.clone(), done_tx.clone());
                        tokio::spawn(async move {
                            post_events(&node, b, &n, &c).await;
                            let _ = done.send(b);
                        });
                    }
                }
            }
            Some(b) = done.recv() => {
                running.remove(&b);
            }
            _ = node.shutdown.cancelled() => break,
        }
    }
}

/// Posts business `b`'s events until it has none left to post here (no
/// webhook, not this node's), waiting for `more` when it is up to date.
async fn post_events(node: &Node, b: u64, more: &Notify, c: &Counters) {
    let s = &node.config.business;
    let timeout = Duration::from_millis(s.webhook_timeout_ms);
    let mut wait = 0u64;
    loop {
        let batch = match ask(
            node,
            b,
            AdminOp::WebhookBatch {
                limit: s.webhook_batch,
            },
        )
        .await
        {
            Some(Ok(v)) => v,
            Some(Err(e)) => {
                debug!(business = b, code = e.code, "webhook sender stops here");
                return;
            }
            None => return,
        };
        let url = batch["url"].as_str().unwrap_or("");
        let events = batch["events"].as_array().cloned().unwrap_or_default();
        if url.is_empty() {
            return;
        }
        let Some(last) = events.last().and_then(|e| e["seq"].as_u64()) else {
            tokio::select! {
                _ = more.notified() => continue,
                _ = node.shutdown.cancelled() => return,
            }
        };
        let Ok(endpoint) = Endpoint::parse(url) else {
            return;
        };
        let body = serde_json::to_vec(&serde_json::json!({ "business": b, "events": events }))
            .expect("events serialize");
        let now = node.clock.now_ms();
        let sig = signature(batch["secret"].as_str().unwrap_or(""), now, &body);
        let posted = tokio::time::timeout(timeout, post(&endpoint, &sig, &body)).await;
        let up_to = match posted {
            Ok(Ok(status)) if (200..300).contains(&status) => {
                c.requests.with_label_values(&["ok"]).inc();
                c.events
                    .with_label_values(&["delivered"])
                    .inc_by(events.len() as u64);
                wait = 0;
                Some(last)
            }
            failed => {
                c.requests.with_label_values(&["failed"]).inc();
                let why = match failed {
                    Ok(Ok(status)) => format!("status {status}"),
                    Ok(Err(e)) => e,
                    Err(_) => format!("no answer in {} ms", s.webhook_timeout_ms),
                };
                warn!(business = b, url, why, "webhook request failed");
                // Events past the give-up age are dropped, oldest first.
                let stale: Vec<u64> = events
                    .iter()
                    .take_while(|e| e["at_ms"].as_u64().unwrap_or(0) + s.webhook_give_up_ms <= now)
                    .filter_map(|e| e["seq"].as_u64())
                    .collect();
                if let Some(&dropped) = stale.last() {
                    c.events
                        .with_label_values(&["dropped"])
                        .inc_by(stale.len() as u64);
                    Some(dropped)
                } else {
                    wait = (wait * 2).clamp(s.webhook_retry_ms, s.webhook_retry_max_ms);
                    None
                }
            }
        };
        if let Some(up_to) = up_to {
            match ask(node, b, AdminOp::WebhookDelivered { up_to }).await {
                Some(Ok(_)) => {}
                _ => return,
            }
            continue;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(wait)) => {}
            _ = node.shutdown.cancelled() => return,
        }
    }
}

/// One `POST`; the response's status code.
async fn post(to: &Endpoint, signature: &str, body: &[u8]) -> Result<u16, String> {
    let mut stream = TcpStream::connect(&to.authority)
        .await
        .map_err(|e| format!("connect to {}: {e}", to.authority))?;
    let head = format!(
        "POST {} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nX-Courier-Signature: {signature}\r\nConnection: close\r\n\r\n",
        to.path,
        to.authority,
        body.len()
    );
    stream
        .write_all(head.as_bytes())
        .await
        .map_err(|e| format!("write: {e}"))?;
    stream
        .write_all(body)
        .await
        .map_err(|e| format!("write: {e}"))?;
    // The status line is all that is read.
    let mut line = Vec::with_capacity(64);
    let mut byte = [0u8; 1];
    while !line.ends_with(b"\r\n") && line.len() < 1024 {
        match stream.read(&mut byte).await {
            Ok(0) => break,
            Ok(_) => line.push(byte[0]),
            Err(e) => return Err(format!("read: {e}")),
        }
    }
    let text = String::from_utf8_lossy(&line);
    let mut parts = text.split_whitespace();
    match (
        parts.next(),
        parts.next().and_then(|c| c.parse::<u16>().ok()),
    ) {
        (Some(v), Some(code)) if v.starts_with("HTTP/1.") => Ok(code),
        _ => Err(format!("not an HTTP answer: {:?}", text.trim_end())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_http_with_a_host() {
        assert_eq!(
            Endpoint::parse("http://127.0.0.1:8080/hooks/a").unwrap(),
            Endpoint {
                authority: "127.0.0.1:8080".into(),
                path: "/hooks/a".into()
            }
        );
        assert_eq!(
            Endpoint::parse("http://example.test").unwrap(),
            Endpoint {
                authority: "example.test:80".into(),
                path: "/".into()
            }
        );
        for bad in [
            "https://a.test/",
            "ftp://a",
            "http://",
            "http://a b/",
            "http://u@h/",
        ] {
            assert!(Endpoint::parse(bad).is_err(), "{bad}");
        }
    }

    /// The signature is HMAC-SHA256 over "<t>.<body>": the test vector
    /// in docs/BUSINESS.md.
    #[test]
    fn the_signature_matches_the_documented_vector() {
        assert_eq!(
            signature(
                "whsec_0123456789abcdef",
                1_700_000_000_000,
                b"{\"business\":5001,\"events\":[]}"
            ),
            "t=1700000000000,v1=cc53b48b48476a33cce2bbcff146d63c91a3082e101fc1b15c89ae80143eafa8"
        );
    }
}

//! A webhook receiver for the tests of businesses' webhooks.

use std::time::Duration;

use serde_json::Value;

use super::WAIT;

/// A webhook receiver over real TCP: answers 200 while `failing` is off
/// and 503 while it is on; `scripted`, it answers the first request 500
/// and never the second (the node's timeout) first. Records every request.
pub struct Hook {
    pub requests: std::sync::Mutex<Vec<(u16, String, Vec<u8>)>>,
    pub failing: std::sync::atomic::AtomicBool,
    scripted: bool,
}

impl Hook {
    pub async fn start(scripted: bool) -> (std::sync::Arc<Hook>, String) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hooks/shop", listener.local_addr().unwrap());
        let hook = std::sync::Arc::new(Hook {
            requests: Default::default(),
            failing: Default::default(),
            scripted,
        });
        let h = hook.clone();
        tokio::spawn(async move {
            loop {
                let Ok((sock, _)) = listener.accept().await else {
                    return;
                };
                let h = h.clone();
                tokio::spawn(async move { h.answer(sock).await });
            }
        });
        (hook, url)
    }

    async fn answer(&self, mut sock: tokio::net::TcpStream) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        let (head_len, body_len) = loop {
            let n = sock.read(&mut chunk).await.unwrap_or(0);
            if n == 0 {
                return;
            }
            buf.extend_from_slice(&chunk[..n]);
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..i]).to_lowercase();
                let len = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse::<usize>().ok())
                    .unwrap();
                break (i + 4, len);
            }
        };
        while buf.len() < head_len + body_len {
            let n = sock.read(&mut chunk).await.unwrap_or(0);
            if n == 0 {
                return;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        let head = String::from_utf8_lossy(&buf[..head_len]).to_string();
        let signature = head
            .lines()
            .find_map(|l| l.strip_prefix("X-Courier-Signature: "))
            .unwrap_or("")
            .to_owned();
        let body = buf[head_len..head_len + body_len].to_vec();
        let status = {
            let mut r = self.requests.lock().unwrap();
            let status = match r.len() {
                0 if self.scripted => 500,
                1 if self.scripted => 0,
                _ if self.failing.load(std::sync::atomic::Ordering::SeqCst) => 503,
                _ => 200,
            };
            r.push((status, signature, body));
            status
        };
        if status == 0 {
            // Never answered: the node's timeout ends it.
            tokio::time::sleep(Duration::from_secs(30)).await;
            return;
        }
        let answer = format!("HTTP/1.1 {status} X\r\nContent-Length: 0\r\n\r\n");
        let _ = sock.write_all(answer.as_bytes()).await;
    }

    /// The events of every request answered 200, in the order they came,
    /// each request's signature checked.
    pub fn taken(&self, secret: &str) -> Vec<Value> {
        use hmac::Mac;
        let mut out = Vec::new();
        for (status, signature, body) in self.requests.lock().unwrap().iter() {
            let (t, v1) = signature
                .strip_prefix("t=")
                .and_then(|s| s.split_once(",v1="))
                .unwrap_or_else(|| panic!("a signature: {signature:?}"));
            let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
            mac.update(format!("{t}.").as_bytes());
            mac.update(body);
            let expected = courier_protocol::token::encode_hex(&mac.finalize().into_bytes());
            assert_eq!(
                v1,
                expected,
                "the signature of {}",
                String::from_utf8_lossy(body)
            );
            if *status == 200 {
                let v: Value = serde_json::from_slice(body).unwrap();
                out.extend(v["events"].as_array().unwrap().iter().cloned());
            }
        }
        out
    }

    /// Waits (bounded) until the events taken cover sequences 1..=`last`.
    pub async fn wait_taken(&self, secret: &str, last: u64) -> Vec<Value> {
        self.wait_until(secret, |taken| {
            let seen: std::collections::BTreeSet<u64> =
                taken.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
            (1..=last).all(|s| seen.contains(&s))
        })
        .await
    }

    /// Waits (bounded) until the events taken pass `done`.
    pub async fn wait_until(&self, secret: &str, done: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let taken = self.taken(secret);
            if done(&taken) {
                return taken;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the webhook took {taken:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

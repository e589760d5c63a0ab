//! Clients for the peer brokers the generator compares Courier with, each
//! used the way an expert user of that broker would for a messenger:
//!
//! - **NATS core**: each user subscribes to its own subject `u.<id>`; a
//!   group is a subject `g.<n>` every member subscribes to; one `PUB` per
//!   message (the server fans out). No acknowledgement exists: each `PUB`
//!   is followed by a `PING` and counts as acknowledged at its `PONG` (the
//!   server has processed it); nothing is stored, so a slow subscriber can
//!   lose messages (the checker says so).
//! - **NATS JetStream** (file storage): one stream holds every inbox and
//!   group subject of the run; a send is a publish acknowledged by the
//!   stream's PubAck (stored); each user reads its subjects through push
//!   consumers with `ack_policy: all`, acknowledging the last message of
//!   each consumer in every batch it reads (a phone's acknowledgement).
//! - **Redis Streams**: an inbox is a stream `in.<id>`; a group is one
//!   stream `g.<n>` its members read (one write per message, like Courier's
//!   log strategy). `XADD` answers with the entry id (the acknowledgement);
//!   each user reads with `XREADGROUP BLOCK` through a consumer group of
//!   its own on a second connection and acknowledges each batch with
//!   `XACK`. Durability is the server's (the comparison script runs it
//!   with AOF everysec).
//! - **Mosquitto** (MQTT 3.1.1, QoS 1, persistent sessions): each user
//!   subscribes to `in/<id>` and its groups' topics `g/<n>` at QoS 1 with a
//!   non-clean session; a send is a QoS 1 `PUBLISH`, acknowledged by the
//!   broker's `PUBACK`. MQTT 3.1.1 has no "no local", so a member's own
//!   group messages come back and are dropped by the reader.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};

/// Inbound payloads of one connection.
pub type Inbox = mpsc::Receiver<Bytes>;

fn find_crlf(b: &[u8]) -> Option<usize> {
    b.windows(2).position(|w| w == b"\r\n")
}

/// Writes what is queued for a connection, many messages per write.
fn spawn_batch_writer(
    mut wr: tokio::net::tcp::OwnedWriteHalf,
    mut out_rx: mpsc::UnboundedReceiver<Bytes>,
) {
    tokio::spawn(async move {
        let mut batch = BytesMut::new();
        while let Some(b) = out_rx.recv().await {
            batch.extend_from_slice(&b);
            while let Ok(b) = out_rx.try_recv() {
                batch.extend_from_slice(&b);
                if batch.len() > 256 << 10 {
                    break;
                }
            }
            if wr.write_all(&batch).await.is_err() {
                return;
            }
            batch.clear();
        }
    });
}

/// One NATS message as read: subscription id, subject, reply subject (if
/// any), payload.
type NatsMsg = (u32, String, Option<String>, Bytes);

/// Opens a NATS connection subscribed to `subjects` (sids 1, 2, ...), and
/// returns the writer and the stream of messages. Subscriptions are in place
/// when this returns (a PING/PONG round trip after them).
/// Waiters for the server's PONGs, in order (each PING's answer).
type Pongs = Arc<Mutex<VecDeque<oneshot::Sender<()>>>>;

async fn nats_open(
    addr: &str,
    subjects: &[String],
) -> std::io::Result<(mpsc::UnboundedSender<Bytes>, mpsc::Receiver<NatsMsg>, Pongs)> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (mut rd, mut wr) = stream.into_split();
    let (out, out_rx) = mpsc::unbounded_channel::<Bytes>();
    let (in_tx, in_rx) = mpsc::channel(4096);
    let mut hello = String::from(
        "CONNECT {\"verbose\":false,\"pedantic\":false,\"echo\":false,\"protocol\":1}\r\n",
    );
    for (sid, s) in subjects.iter().enumerate() {
        hello.push_str(&format!("SUB {s} {}\r\n", sid + 1));
    }
    hello.push_str("PING\r\n");
    wr.write_all(hello.as_bytes()).await?;
    let (ready_tx, ready_rx) = oneshot::channel();
    let pong = out.clone();
    let pongs: Pongs = Arc::default();
    let waiters = pongs.clone();
    tokio::spawn(async move {
        let mut buf = BytesMut::with_capacity(64 << 10);
        let mut ready = Some(ready_tx);
        loop {
            while let Some(end) = find_crlf(&buf) {
                let line = String::from_utf8_lossy(&buf[..end]).into_owned();
                if let Some(rest) = line.strip_prefix("MSG ") {
                    // MSG <subject> <sid> [reply-to] <#bytes>
                    let parts: Vec<&str> = rest.split(' ').collect();
                    let (Some(subject), Some(sid), Some(len)) = (
                        parts.first(),
                        parts.get(1).and_then(|x| x.parse::<u32>().ok()),
                        parts.last().and_then(|n| n.parse::<usize>().ok()),
                    ) else {
                        return;
                    };
                    if buf.len() < end + 2 + len + 2 {
                        break; // wait for the payload
                    }
                    let subject = subject.to_string();
                    let reply = (parts.len() == 4).then(|| parts[2].to_string());
                    buf.advance(end + 2);
                    let payload = buf.split_to(len).freeze();
                    buf.advance(2);
                    if in_tx.send((sid, subject, reply, payload)).await.is_err() {
                        return;
                    }
                    continue;
                }
                buf.advance(end + 2);
                if line == "PING" {
                    let _ = pong.send(Bytes::from_static(b"PONG\r\n"));
                } else if line == "PONG" {
                    if let Some(r) = ready.take() {
                        let _ = r.send(());
                    } else if let Some(w) = waiters.lock().expect("pongs").pop_front() {
                        let _ = w.send(());
                    }
                }
            }
            match rd.read_buf(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    });
    spawn_batch_writer(wr, out_rx);
    ready_rx
        .await
        .map_err(|_| std::io::Error::other("nats closed before PONG"))?;
    Ok((out, in_rx, pongs))
}

fn nats_pub(subject: &str, reply: Option<&str>, payload: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(payload.len() + subject.len() + 64);
    match reply {
        Some(r) => {
            b.extend_from_slice(format!("PUB {subject} {r} {}\r\n", payload.len()).as_bytes())
        }
        None => b.extend_from_slice(format!("PUB {subject} {}\r\n", payload.len()).as_bytes()),
    }
    b.extend_from_slice(payload);
    b.extend_from_slice(b"\r\n");
    b.freeze()
}

/// A NATS core connection.
pub struct Nats {
    out: mpsc::UnboundedSender<Bytes>,
    pongs: Pongs,
}

impl Nats {
    /// Connects and subscribes to `subjects`; payloads arrive on the inbox.
    pub async fn connect(addr: &str, subjects: &[String]) -> std::io::Result<(Nats, Inbox)> {
        let (out, mut msgs, pongs) = nats_open(addr, subjects).await?;
        let (in_tx, in_rx) = mpsc::channel(4096);
        tokio::spawn(async move {
            while let Some((_, _, _, payload)) = msgs.recv().await {
                if in_tx.send(payload).await.is_err() {
                    return;
                }
            }
        });
        Ok((Nats { out, pongs }, in_rx))
    }

    /// Publishes, followed by a PING; the future resolves at its PONG, when
    /// the server has processed the message. NATS core has no per-message
    /// acknowledgement: this flush is how a NATS client bounds what it has
    /// in flight, which keeps a closed-loop run from flooding the server.
    pub fn publish(
        &self,
        subject: &str,
        payload: &[u8],
    ) -> Result<impl std::future::Future<Output = Result<(), String>>, String> {
        let mut b = BytesMut::from(&nats_pub(subject, None, payload)[..]);
        b.extend_from_slice(b"PING\r\n");
        let (tx, rx) = oneshot::channel();
        self.pongs.lock().expect("pongs").push_back(tx);
        self.out.send(b.freeze()).map_err(|_| "closed".to_owned())?;
        Ok(async move { rx.await.map_err(|_| "closed".to_owned()) })
    }
}

/// A NATS JetStream user: publishes with acknowledgement into one file
/// stream that holds every inbox and group subject of the run, and reads
/// its own subjects through push consumers (one per subject: the Debian
/// server, 2.9, has no multi-subject filters).
pub struct JetStream {
    out: mpsc::UnboundedSender<Bytes>,
    inbox: String,
    waiting: Arc<Mutex<std::collections::HashMap<u64, oneshot::Sender<Bytes>>>>,
    next: std::sync::atomic::AtomicU64,
}

impl JetStream {
    /// Connects as `me`; creates the stream if `create_stream`; consumes `subjects`.
    pub async fn connect(
        addr: &str,
        me: u64,
        stream: &str,
        stream_subjects: &[String],
        create_stream: bool,
        subjects: &[String],
    ) -> std::io::Result<(JetStream, Inbox)> {
        let inbox = format!("_INBOX.{stream}.{me}");
        let deliver = format!("dlv.{stream}.{me}");
        let (out, mut msgs, _) = nats_open(addr, &[format!("{inbox}.*"), deliver.clone()]).await?;
        let (in_tx, in_rx) = mpsc::channel(4096);
        let waiting: Arc<Mutex<std::collections::HashMap<u64, oneshot::Sender<Bytes>>>> =
            Arc::default();
        let w = waiting.clone();
        let acks_out = out.clone();
        tokio::spawn(async move {
            // Per consumer, the reply subject of the last message read: with
            // `ack_policy: all`, acknowledging it acknowledges everything
            // before it, so each batch read costs one ack per consumer (a
            // phone's acknowledgement of what it read).
            let mut last: Vec<(String, String)> = Vec::new();
            while let Some(first) = msgs.recv().await {
                let mut next = Some(first);
                while let Some((sid, subject, reply, payload)) = next.take() {
                    if sid == 1 {
                        let n = subject
                            .rsplit('.')
                            .next()
                            .and_then(|x| x.parse::<u64>().ok());
                        if let Some(tx) = n.and_then(|n| w.lock().expect("waiting").remove(&n)) {
                            let _ = tx.send(payload);
                        }
                    } else {
                        if let Some(reply) = reply {
                            // $JS.ACK.<stream>.<consumer>.<...>
                            let consumer = reply.split('.').nth(3).unwrap_or("").to_string();
                            match last.iter_mut().find(|(c, _)| *c == consumer) {
                                Some(l) => l.1 = reply,
                                None => last.push((consumer, reply)),
                            }
                        }
                        if in_tx.send(payload).await.is_err() {
                            return;
                        }
                    }
                    next = msgs.try_recv().ok();
                }
                for (_, reply) in last.drain(..) {
                    let _ = acks_out.send(nats_pub(&reply, None, b""));
                }
            }
        });
        let js = JetStream {
            out,
            inbox,
            waiting,
            next: std::sync::atomic::AtomicU64::new(1),
        };
        let check = |reply: Bytes| -> std::io::Result<()> {
            let text = String::from_utf8_lossy(&reply);
            if text.contains("\"error\"") && !text.contains("already in use") {
                return Err(std::io::Error::other(format!("jetstream: {text}")));
            }
            Ok(())
        };
        if create_stream {
            let subjects: Vec<String> =
                stream_subjects.iter().map(|s| format!("\"{s}\"")).collect();
            let config = format!(
                "{{\"name\":\"{stream}\",\"subjects\":[{}],\"storage\":\"file\",\"retention\":\"limits\"}}",
                subjects.join(",")
            );
            check(
                js.request(
                    &format!("$JS.API.STREAM.CREATE.{stream}"),
                    config.as_bytes(),
                )
                .await?,
            )?;
        }
        for s in subjects {
            let config = format!(
                "{{\"stream_name\":\"{stream}\",\"config\":{{\"deliver_subject\":\"{deliver}\",\"filter_subject\":\"{s}\",\"ack_policy\":\"all\",\"max_ack_pending\":65536,\"deliver_policy\":\"all\"}}}}"
            );
            check(
                js.request(
                    &format!("$JS.API.CONSUMER.CREATE.{stream}"),
                    config.as_bytes(),
                )
                .await?,
            )?;
        }
        Ok((js, in_rx))
    }

    fn start(&self, subject: &str, payload: &[u8]) -> Result<oneshot::Receiver<Bytes>, String> {
        let n = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.waiting.lock().expect("waiting").insert(n, tx);
        let reply = format!("{}.{n}", self.inbox);
        self.out
            .send(nats_pub(subject, Some(&reply), payload))
            .map_err(|_| "closed".to_owned())?;
        Ok(rx)
    }

    async fn request(&self, subject: &str, payload: &[u8]) -> std::io::Result<Bytes> {
        let rx = self
            .start(subject, payload)
            .map_err(std::io::Error::other)?;
        tokio::time::timeout(std::time::Duration::from_secs(10), rx)
            .await
            .map_err(|_| std::io::Error::other("jetstream API timed out"))?
            .map_err(|_| std::io::Error::other("closed"))
    }

    /// Publishes; the future resolves at JetStream's PubAck (stored).
    pub fn publish(
        &self,
        subject: &str,
        payload: &[u8],
    ) -> Result<impl std::future::Future<Output = Result<(), String>>, String> {
        let rx = self.start(subject, payload)?;
        Ok(async move {
            let reply = rx.await.map_err(|_| "closed".to_owned())?;
            if reply.windows(7).any(|w| w == b"\"error\"") {
                return Err(String::from_utf8_lossy(&reply).into_owned());
            }
            Ok(())
        })
    }
}

/// An MQTT 3.1.1 connection at QoS 1.
pub struct Mqtt {
    out: mpsc::UnboundedSender<Bytes>,
    waiting: Arc<Mutex<std::collections::HashMap<u16, oneshot::Sender<()>>>>,
    next_id: std::sync::atomic::AtomicU32,
}

fn mqtt_len(mut n: usize, out: &mut BytesMut) {
    loop {
        let mut byte = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            byte |= 0x80;
        }
        out.extend_from_slice(&[byte]);
        if n == 0 {
            return;
        }
    }
}

fn mqtt_packet(first: u8, body: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(body.len() + 5);
    b.extend_from_slice(&[first]);
    mqtt_len(body.len(), &mut b);
    b.extend_from_slice(body);
    b.freeze()
}

fn mqtt_str(s: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s);
}

/// One whole MQTT packet at the front of `b`: (first byte, body range end, body start).
fn mqtt_frame(b: &[u8]) -> Option<(u8, usize, usize)> {
    let mut len = 0usize;
    let mut mult = 1usize;
    for i in 1..5 {
        let byte = *b.get(i)?;
        len += (byte & 0x7f) as usize * mult;
        mult *= 128;
        if byte & 0x80 == 0 {
            let start = i + 1;
            return (b.len() >= start + len).then_some((b[0], start + len, start));
        }
    }
    None
}

impl Mqtt {
    /// Connects with a persistent session `client_id` and subscribes to
    /// `topics` at QoS 1; payloads whose conversation is `me` are dropped.
    pub async fn connect(
        addr: &str,
        client_id: &str,
        me: u64,
        topics: &[String],
    ) -> std::io::Result<(Mqtt, Inbox)> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (mut rd, mut wr) = stream.into_split();
        let mut connect = Vec::new();
        mqtt_str(b"MQTT", &mut connect);
        connect.extend_from_slice(&[4, 0x00, 0, 60]); // level 4, persistent session, keepalive 60 s
        mqtt_str(client_id.as_bytes(), &mut connect);
        let mut hello = BytesMut::new();
        hello.extend_from_slice(&mqtt_packet(0x10, &connect));
        let mut sub = vec![0, 1];
        for t in topics {
            mqtt_str(t.as_bytes(), &mut sub);
            sub.push(1);
        }
        hello.extend_from_slice(&mqtt_packet(0x82, &sub));
        wr.write_all(&hello).await?;
        let (out, out_rx) = mpsc::unbounded_channel::<Bytes>();
        let (in_tx, in_rx) = mpsc::channel(4096);
        let waiting: Arc<Mutex<std::collections::HashMap<u16, oneshot::Sender<()>>>> =
            Arc::default();
        let (ready_tx, ready_rx) = oneshot::channel();
        let (acks, w) = (out.clone(), waiting.clone());
        tokio::spawn(async move {
            let mut buf = BytesMut::with_capacity(64 << 10);
            let mut ready = Some(ready_tx);
            loop {
                while let Some((first, end, start)) = mqtt_frame(&buf) {
                    let body = buf[start..end].to_vec();
                    buf.advance(end);
                    match first >> 4 {
                        3 => {
                            // PUBLISH: topic, packet id (QoS 1), payload.
                            if body.len() < 2 {
                                return;
                            }
                            let tl = u16::from_be_bytes([body[0], body[1]]) as usize;
                            let qos = (first >> 1) & 3;
                            let mut at = 2 + tl;
                            if qos > 0 {
                                let Some(id) = body.get(at..at + 2) else {
                                    return;
                                };
                                let _ = acks.send(mqtt_packet(0x40, id));
                                at += 2;
                            }
                            let payload = Bytes::copy_from_slice(&body[at.min(body.len())..]);
                            let mine = payload
                                .get(4..12)
                                .map(|c| c == me.to_be_bytes())
                                .unwrap_or(false);
                            if !mine && in_tx.send(payload).await.is_err() {
                                return;
                            }
                        }
                        // PUBACK
                        4 if body.len() >= 2 => {
                            let id = u16::from_be_bytes([body[0], body[1]]);
                            if let Some(tx) = w.lock().expect("waiting").remove(&id) {
                                let _ = tx.send(());
                            }
                        }
                        9 => {
                            // SUBACK: subscribed.
                            if let Some(r) = ready.take() {
                                let _ = r.send(());
                            }
                        }
                        _ => {}
                    }
                }
                match rd.read_buf(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        });
        spawn_batch_writer(wr, out_rx);
        ready_rx
            .await
            .map_err(|_| std::io::Error::other("mqtt closed before SUBACK"))?;
        Ok((
            Mqtt {
                out,
                waiting,
                next_id: std::sync::atomic::AtomicU32::new(1),
            },
            in_rx,
        ))
    }

    /// Publishes at QoS 1; the future resolves at the broker's PUBACK.
    pub fn publish(
        &self,
        topic: &str,
        payload: &[u8],
    ) -> Result<impl std::future::Future<Output = Result<(), String>>, String> {
        // Packet ids 1..=65535, never 0.
        let id = (self
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            % 65535
            + 1) as u16;
        let mut body = Vec::with_capacity(topic.len() + payload.len() + 4);
        mqtt_str(topic.as_bytes(), &mut body);
        body.extend_from_slice(&id.to_be_bytes());
        body.extend_from_slice(payload);
        let (tx, rx) = oneshot::channel();
        self.waiting.lock().expect("waiting").insert(id, tx);
        self.out
            .send(mqtt_packet(0x32, &body))
            .map_err(|_| "closed".to_owned())?;
        Ok(async move { rx.await.map_err(|_| "closed".to_owned()) })
    }
}

/// One RESP value (what the generator needs of it).
#[derive(Debug, Clone)]
enum Resp {
    Simple(String),
    Error(String),
    Int(i64),
    Bulk(Option<Bytes>),
    Array(Option<Vec<Resp>>),
}

/// Parses one RESP value from the front of `b`: `Ok(None)` if incomplete.
fn parse_resp(b: &[u8]) -> Result<Option<(Resp, usize)>, String> {
    let Some(end) = find_crlf(b) else {
        return Ok(None);
    };
    let line = std::str::from_utf8(&b[1..end]).map_err(|e| e.to_string())?;
    let used = end + 2;
    let num = || line.parse::<i64>().map_err(|e| e.to_string());
    Ok(Some(match b.first() {
        Some(b'+') => (Resp::Simple(line.to_owned()), used),
        Some(b'-') => (Resp::Error(line.to_owned()), used),
        Some(b':') => (Resp::Int(num()?), used),
        Some(b'$') => {
            let n = num()?;
            if n < 0 {
                (Resp::Bulk(None), used)
            } else {
                let n = n as usize;
                if b.len() < used + n + 2 {
                    return Ok(None);
                }
                (
                    Resp::Bulk(Some(Bytes::copy_from_slice(&b[used..used + n]))),
                    used + n + 2,
                )
            }
        }
        Some(b'*') => {
            let n = num()?;
            if n < 0 {
                (Resp::Array(None), used)
            } else {
                let mut at = used;
                let mut items = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    match parse_resp(&b[at..])? {
                        Some((v, u)) => {
                            items.push(v);
                            at += u;
                        }
                        None => return Ok(None),
                    }
                }
                (Resp::Array(Some(items)), at)
            }
        }
        _ => return Err("not RESP".into()),
    }))
}

fn command(args: &[&[u8]]) -> Bytes {
    let mut b = BytesMut::new();
    b.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for a in args {
        b.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        b.extend_from_slice(a);
        b.extend_from_slice(b"\r\n");
    }
    b.freeze()
}

/// A pipelined Redis connection: commands go out in order, replies resolve
/// their waiters in the same order.
struct RedisPipe {
    out: mpsc::UnboundedSender<(Bytes, oneshot::Sender<Resp>)>,
}

impl RedisPipe {
    async fn connect(addr: &str) -> std::io::Result<RedisPipe> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (mut rd, mut wr) = stream.into_split();
        let waiters: Arc<Mutex<VecDeque<oneshot::Sender<Resp>>>> = Arc::default();
        let (out, mut out_rx) = mpsc::unbounded_channel::<(Bytes, oneshot::Sender<Resp>)>();
        let w = waiters.clone();
        tokio::spawn(async move {
            let mut batch = BytesMut::new();
            while let Some((cmd, tx)) = out_rx.recv().await {
                w.lock().expect("waiters").push_back(tx);
                batch.extend_from_slice(&cmd);
                while let Ok((cmd, tx)) = out_rx.try_recv() {
                    w.lock().expect("waiters").push_back(tx);
                    batch.extend_from_slice(&cmd);
                    if batch.len() > 256 << 10 {
                        break;
                    }
                }
                if wr.write_all(&batch).await.is_err() {
                    return;
                }
                batch.clear();
            }
        });
        tokio::spawn(async move {
            let mut buf = BytesMut::with_capacity(64 << 10);
            loop {
                loop {
                    match parse_resp(&buf) {
                        Ok(Some((v, used))) => {
                            buf.advance(used);
                            if let Some(tx) = waiters.lock().expect("waiters").pop_front() {
                                let _ = tx.send(v);
                            }
                        }
                        Ok(None) => break,
                        Err(_) => return,
                    }
                }
                match rd.read_buf(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        });
        Ok(RedisPipe { out })
    }

    fn start(&self, args: &[&[u8]]) -> Result<oneshot::Receiver<Resp>, String> {
        let (tx, rx) = oneshot::channel();
        self.out
            .send((command(args), tx))
            .map_err(|_| "closed".to_owned())?;
        Ok(rx)
    }
}

/// A Redis Streams user: one connection to write, one to block on reads.
pub struct Redis {
    pipe: RedisPipe,
}

impl Redis {
    /// Connects and starts reading `streams` from their beginning; payloads
    /// of entries not written by `me` arrive on the inbox.
    pub async fn connect(
        addr: &str,
        me: u64,
        streams: Vec<String>,
    ) -> std::io::Result<(Redis, Inbox)> {
        let pipe = RedisPipe::connect(addr).await?;
        let reader = RedisPipe::connect(addr).await?;
        let (in_tx, in_rx) = mpsc::channel(4096);
        let me = me.to_string();
        // Each user reads through a consumer group of its own on each of its
        // streams (a group stream has one per member), from the start, and
        // acknowledges each batch it read with XACK: a phone's
        // acknowledgement, and the pending-entries bookkeeping it costs.
        let group = format!("u{me}");
        for s in &streams {
            let rx = reader
                .start(&[
                    b"XGROUP",
                    b"CREATE",
                    s.as_bytes(),
                    group.as_bytes(),
                    b"0",
                    b"MKSTREAM",
                ])
                .map_err(std::io::Error::other)?;
            match rx.await {
                Ok(Resp::Simple(_)) => {}
                Ok(Resp::Error(e)) if e.starts_with("BUSYGROUP") => {}
                Ok(other) => {
                    return Err(std::io::Error::other(format!(
                        "redis XGROUP CREATE {s}: {other:?}"
                    )))
                }
                Err(_) => return Err(std::io::Error::other("redis closed")),
            }
        }
        tokio::spawn(async move {
            let mut read: Vec<Vec<Vec<u8>>> = vec![Vec::new(); streams.len()];
            loop {
                let mut args: Vec<Vec<u8>> = vec![
                    b"XREADGROUP".to_vec(),
                    b"GROUP".to_vec(),
                    group.as_bytes().to_vec(),
                    b"c".to_vec(),
                    b"COUNT".to_vec(),
                    b"1000".to_vec(),
                    b"BLOCK".to_vec(),
                    b"1000".to_vec(),
                    b"STREAMS".to_vec(),
                ];
                args.extend(streams.iter().map(|s| s.as_bytes().to_vec()));
                args.extend(streams.iter().map(|_| b">".to_vec()));
                let refs: Vec<&[u8]> = args.iter().map(|a| a.as_slice()).collect();
                let Ok(rx) = reader.start(&refs) else { return };
                let Ok(reply) = rx.await else { return };
                let Resp::Array(Some(per_stream)) = reply else {
                    continue; // timeout (nil): block again
                };
                for s in per_stream {
                    let Resp::Array(Some(mut parts)) = s else {
                        continue;
                    };
                    let entries = parts.pop();
                    let name = match parts.pop() {
                        Some(Resp::Bulk(Some(n))) => String::from_utf8_lossy(&n).into_owned(),
                        _ => continue,
                    };
                    let Some(i) = streams.iter().position(|x| *x == name) else {
                        continue;
                    };
                    let Some(Resp::Array(Some(entries))) = entries else {
                        continue;
                    };
                    for e in entries {
                        let Resp::Array(Some(mut e)) = e else {
                            continue;
                        };
                        let fields = e.pop();
                        if let Some(Resp::Bulk(Some(id))) = e.pop() {
                            read[i].push(id.to_vec());
                        }
                        // Fields: "from" <user> "d" <payload>.
                        let Some(Resp::Array(Some(f))) = fields else {
                            continue;
                        };
                        let from = match f.get(1) {
                            Some(Resp::Bulk(Some(b))) => b.clone(),
                            _ => continue,
                        };
                        if from.as_ref() == me.as_bytes() {
                            continue;
                        }
                        if let Some(Resp::Bulk(Some(d))) = f.get(3) {
                            if in_tx.send(d.clone()).await.is_err() {
                                return;
                            }
                        }
                    }
                }
                // The batch is read: acknowledge it (pipelined; the reply
                // is not awaited).
                for (s, ids) in streams.iter().zip(&mut read) {
                    if ids.is_empty() {
                        continue;
                    }
                    let mut ack: Vec<&[u8]> = vec![b"XACK", s.as_bytes(), group.as_bytes()];
                    ack.extend(ids.iter().map(|id| id.as_slice()));
                    let _ = reader.start(&ack);
                    ids.clear();
                }
            }
        });
        Ok((Redis { pipe }, in_rx))
    }

    /// Appends to `stream`; the future resolves when Redis answered.
    pub fn xadd(
        &self,
        stream: &str,
        me: u64,
        payload: &[u8],
    ) -> Result<impl std::future::Future<Output = Result<(), String>>, String> {
        let me = me.to_string();
        let rx = self.pipe.start(&[
            b"XADD",
            stream.as_bytes(),
            b"*",
            b"from",
            me.as_bytes(),
            b"d",
            payload,
        ])?;
        Ok(async move {
            match rx.await {
                Ok(Resp::Bulk(Some(_))) => Ok(()),
                Ok(Resp::Error(e) | Resp::Simple(e)) => Err(e),
                Ok(Resp::Int(i)) => Err(format!("unexpected integer reply {i}")),
                Ok(other) => Err(format!("unexpected reply {other:?}")),
                Err(_) => Err("closed".into()),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resp_parses_nested_replies_and_waits_for_more() {
        let b = b"*1\r\n*2\r\n$3\r\nin1\r\n*1\r\n*2\r\n$3\r\n1-0\r\n*2\r\n$1\r\nd\r\n$2\r\nhi\r\n";
        let (v, used) = parse_resp(b).unwrap().unwrap();
        assert_eq!(used, b.len());
        assert!(matches!(v, Resp::Array(Some(ref x)) if x.len() == 1));
        assert!(parse_resp(&b[..b.len() - 3]).unwrap().is_none());
        assert!(matches!(
            parse_resp(b"$-1\r\n").unwrap(),
            Some((Resp::Bulk(None), 5))
        ));
        assert!(matches!(
            parse_resp(b":7\r\n").unwrap(),
            Some((Resp::Int(7), 4))
        ));
        assert!(matches!(
            parse_resp(b"+OK\r\n").unwrap(),
            Some((Resp::Simple(_), 5))
        ));
        assert!(parse_resp(b"?x\r\n").is_err());
    }
}

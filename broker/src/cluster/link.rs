//! Links between nodes: one TCP connection per pair of nodes, carrying
//! requests and one-way messages in both directions, multiplexed by
//! request id. The data plane's commands ride on it (what they say is the
//! caller's business: a link carries bodies).
//!
//! ```text
//!  dialer                                   acceptor
//!   Hello{version, cluster, id, nonce_d} ──►
//!                                       ◄── Challenge{id, nonce_a, mac_a}   (or Refused{reason})
//!   Proof{mac_d}                         ──►
//!                                       ◄── Welcome                         (or Refused{reason})
//!   frames: len u32 | kind u8 | request id u64 | body, both ways
//! ```
//!
//! Both sides prove they hold the cluster secret without sending it: each
//! MAC is HMAC-SHA256 over a role label, the cluster name, both ids and
//! both nonces, so a MAC is good for one role of one connection only (no
//! replay, no reflection).
//!
//! - **Queue**: each link has a bounded outgoing queue
//!   ([`LinkSettings::queue_len`] frames). When it is full a caller waits,
//!   as a session waits for its shard's queue, but never past its
//!   request's deadline: then it gets [`LinkError::Overloaded`].
//! - **Batching**: the writer takes every frame that is queued and sends
//!   them in one write.
//! - **Loss of the connection**: every request waiting for an answer fails
//!   with [`LinkError::Unavailable`] (retryable: the data plane's requests
//!   are idempotent, keyed like a client's sends), and the dialing side
//!   connects again with jittered exponential backoff (50 ms to 2 s).

use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

const VERSION: u8 = 1;
const NONCE_LEN: usize = 16;
const MAC_LEN: usize = 32;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

mod kind {
    pub const HELLO: u8 = 0x10;
    pub const CHALLENGE: u8 = 0x11;
    pub const PROOF: u8 = 0x12;
    pub const WELCOME: u8 = 0x13;
    pub const REFUSED: u8 = 0x14;
    pub const REQUEST: u8 = 0x01;
    pub const RESPONSE: u8 = 0x02;
    pub const FAILURE: u8 = 0x03;
    pub const MESSAGE: u8 = 0x04;
}

#[derive(Clone, Debug)]
pub struct LinkSettings {
    pub cluster: String,
    pub node_id: String,
    /// The cluster secret both ends hold.
    pub secret: Arc<[u8]>,
    /// Frames queued per link before senders wait.
    pub queue_len: usize,
    /// Largest frame accepted.
    pub max_frame: u32,
    /// Silence after which a connection is taken for dead and dropped (the
    /// dialer then reconnects): both ends probe every second, so a live
    /// connection carries a frame each way at least that often. Without
    /// it, a connection whose peer vanished (cut off, frozen) would keep
    /// taking requests until TCP gave up, minutes later.
    pub silence: Duration,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LinkError {
    /// No connection to the peer now (or it was lost with the request in
    /// flight): retry, the request may or may not have been handled.
    #[error("the peer node is unavailable")]
    Unavailable,
    /// The link's queue stayed full until the request's deadline.
    #[error("the link to the peer node is overloaded")]
    Overloaded,
    /// No answer before the deadline.
    #[error("the peer node did not answer in time")]
    Timeout,
    /// The peer's handler failed the request, saying why.
    #[error("the peer node failed the request: {0}")]
    Failed(String),
}

/// What a node does with what its peers send it.
pub trait Handler: Send + Sync + 'static {
    /// A request from node `from`; the answer goes back to it. Called in
    /// the order the requests arrive on the link, and what it does before
    /// returning the future keeps that order; the futures run concurrently.
    fn request(
        &self,
        from: &str,
        body: Bytes,
    ) -> Pin<Box<dyn Future<Output = Result<Bytes, String>> + Send>>;
    /// A one-way message from node `from`.
    fn message(&self, from: &str, body: Bytes);
}

struct Frame {
    kind: u8,
    id: u64,
    body: Bytes,
}

type Pending = Mutex<HashMap<u64, oneshot::Sender<Result<Bytes, LinkError>>>>;

/// A connection's queue, and its number: every connection of this process
/// gets a new one, so a request can tell whether the connection it went
/// out on is still the current one (requests on a lost connection fail).
#[derive(Clone)]
struct Connection {
    number: u64,
    queue: mpsc::Sender<Frame>,
}

static CONNECTIONS: AtomicU64 = AtomicU64::new(1);

/// A request sent (or about to be): where its answer will come.
struct PendingAnswer {
    id: u64,
    rx: oneshot::Receiver<Result<Bytes, LinkError>>,
    pending: Arc<Pending>,
    deadline: Duration,
}

impl PendingAnswer {
    fn forget(&self) {
        drop(self.pending.lock().expect("not poisoned").remove(&self.id));
    }

    /// The request was not sent: its entry goes, the error is the answer.
    fn abandon<T>(self, e: LinkError) -> Result<T, LinkError> {
        self.forget();
        Err(e)
    }

    /// Waits for the answer, at most the deadline.
    async fn wait(self) -> Result<Bytes, LinkError> {
        let PendingAnswer {
            id,
            rx,
            pending,
            deadline,
        } = self;
        match tokio::time::timeout(deadline, rx).await {
            Ok(Ok(answer)) => answer,
            // The connection went and took the pending map's entry with it.
            Ok(Err(_)) => Err(LinkError::Unavailable),
            Err(_) => {
                drop(pending.lock().expect("not poisoned").remove(&id));
                Err(LinkError::Timeout)
            }
        }
    }
}

/// One end of the link to one peer node. Requests wait for a connection
/// only as long as their deadline.
pub struct Peer {
    pub peer_id: String,
    /// The peer node's address on its current (or last) connection.
    remote_ip: Mutex<Option<IpAddr>>,
    /// The current connection (`None` while disconnected).
    queue: watch::Receiver<Option<Connection>>,
    pending: Arc<Pending>,
    next_id: AtomicU64,
}

impl Peer {
    fn new(peer_id: String, queue: watch::Receiver<Option<Connection>>) -> Arc<Peer> {
        Arc::new(Peer {
            peer_id,
            remote_ip: Mutex::new(None),
            queue,
            pending: Arc::new(Mutex::new(HashMap::new())),
            next_id: AtomicU64::new(1),
        })
    }

    /// Sends a request and waits for its answer, at most `deadline`.
    pub async fn request(&self, body: Bytes, deadline: Duration) -> Result<Bytes, LinkError> {
        let queue = self.current()?.queue;
        let (frame, answer) = self.pending_request(body, deadline);
        match tokio::time::timeout(deadline, queue.send(frame)).await {
            Ok(Ok(())) => answer.wait().await,
            Ok(Err(_)) => answer.abandon(LinkError::Unavailable),
            Err(_) => answer.abandon(LinkError::Overloaded),
        }
    }

    /// Queues a request now, without waiting (so requests go out in the
    /// order of these calls): `Overloaded` when the link's queue is full,
    /// `Unavailable` without a connection. Returns the number of the
    /// connection it went out on (see [`Peer::connection`]) and a future of
    /// its answer, at most `deadline` away.
    #[allow(clippy::type_complexity)]
    pub fn start_request(
        &self,
        body: Bytes,
        deadline: Duration,
    ) -> Result<
        (
            u64,
            impl Future<Output = Result<Bytes, LinkError>> + Send + 'static,
        ),
        LinkError,
    > {
        let Connection { number, queue } = self.current()?;
        let (frame, answer) = self.pending_request(body, deadline);
        match queue.try_send(frame) {
            Ok(()) => Ok((number, answer.wait())),
            Err(mpsc::error::TrySendError::Full(_)) => answer.abandon(LinkError::Overloaded),
            Err(mpsc::error::TrySendError::Closed(_)) => answer.abandon(LinkError::Unavailable),
        }
    }

    /// A request's frame, and its entry in the pending map that the answer
    /// will complete.
    fn pending_request(&self, body: Bytes, deadline: Duration) -> (Frame, PendingAnswer) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.pending.lock().expect("not poisoned").insert(id, tx);
        let frame = Frame {
            kind: kind::REQUEST,
            id,
            body,
        };
        let answer = PendingAnswer {
            id,
            rx,
            pending: self.pending.clone(),
            deadline,
        };
        (frame, answer)
    }

    /// Queues a one-way message without waiting: `Overloaded` when the
    /// queue is full, `Unavailable` when there is no connection.
    pub fn tell(&self, body: Bytes) -> Result<(), LinkError> {
        let queue = self.current()?.queue;
        queue
            .try_send(Frame {
                kind: kind::MESSAGE,
                id: 0,
                body,
            })
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => LinkError::Overloaded,
                mpsc::error::TrySendError::Closed(_) => LinkError::Unavailable,
            })
    }

    pub fn connected(&self) -> bool {
        self.queue.borrow().is_some()
    }

    /// The number of the current connection (`None` while disconnected).
    /// A request that went out on another number will fail, if it has not
    /// been answered already: its connection is gone.
    pub fn connection(&self) -> Option<u64> {
        self.queue.borrow().as_ref().map(|c| c.number)
    }

    /// Resolves when the current connection is gone: lost, dropped as
    /// silent, or replaced (never, while there is none).
    pub fn connection_lost(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut queue = self.queue.clone();
        let now = self.connection();
        async move {
            if now.is_none()
                || queue
                    .wait_for(|c| c.as_ref().map(|c| c.number) != now)
                    .await
                    .is_err()
            {
                std::future::pending::<()>().await;
            }
        }
    }

    fn current(&self) -> Result<Connection, LinkError> {
        self.queue.borrow().clone().ok_or(LinkError::Unavailable)
    }

    /// The peer node's address on its current (or last) connection.
    pub fn remote_ip(&self) -> Option<IpAddr> {
        *self.remote_ip.lock().expect("not poisoned")
    }

    fn connected_from(&self, stream: &TcpStream) {
        *self.remote_ip.lock().expect("not poisoned") = stream.peer_addr().ok().map(|a| a.ip());
    }
}

/// Dials `addr` (node `peer_id`) and keeps the link up until `stop`:
/// reconnects with jittered backoff whenever the connection is lost.
pub fn dial(
    settings: LinkSettings,
    peer_id: String,
    addr: String,
    handler: Arc<dyn Handler>,
    stop: CancellationToken,
) -> Arc<Peer> {
    let (queue_tx, queue) = watch::channel(None);
    let peer = Peer::new(peer_id.clone(), queue);
    let pending = peer.pending.clone();
    let this = peer.clone();
    tokio::spawn(async move {
        let mut backoff = Duration::from_millis(50);
        // A failure is logged when it differs from the one before (a
        // peer that is down or misconfigured is not a log line a second).
        let mut last_error = String::new();
        while !stop.is_cancelled() {
            let connected = async {
                let mut stream = tokio::time::timeout(HANDSHAKE_TIMEOUT, TcpStream::connect(&addr))
                    .await
                    .map_err(|_| "connect timed out".to_owned())?
                    .map_err(|e| e.to_string())?;
                let _ = stream.set_nodelay(true);
                tokio::time::timeout(
                    HANDSHAKE_TIMEOUT,
                    dialer_handshake(&mut stream, &settings, &peer_id),
                )
                .await
                .map_err(|_| "handshake timed out".to_owned())??;
                Ok::<_, String>(stream)
            }
            .await;
            match connected {
                Ok(stream) => {
                    this.connected_from(&stream);
                    backoff = Duration::from_millis(50);
                    last_error.clear();
                    info!(peer = %peer_id, %addr, "link up");
                    serve(
                        stream, &settings, &peer_id, &queue_tx, &pending, &handler, &stop,
                    )
                    .await;
                    info!(peer = %peer_id, "link down");
                }
                Err(e) if e != last_error => {
                    warn!(peer = %peer_id, %addr, error = %e, "link: cannot connect; retrying");
                    last_error = e;
                }
                Err(e) => debug!(peer = %peer_id, %addr, error = %e, "link: cannot connect"),
            }
            let jitter = rand::random::<f64>() * 0.5 + 0.75;
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(backoff.mul_f64(jitter)) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    });
    peer
}

/// Accepts links on `listener` until `stop`; each authenticated one is
/// served until it is lost. `peers` receives the [`Peer`] of each node
/// that connects (a new connection from the same node replaces the old).
pub async fn accept(
    listener: TcpListener,
    settings: LinkSettings,
    handler: Arc<dyn Handler>,
    peers: Arc<Mutex<HashMap<String, Arc<Peer>>>>,
    stop: CancellationToken,
) {
    loop {
        let stream = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    warn!(error = %e, "link: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let (settings, handler, peers, stop) = (
            settings.clone(),
            handler.clone(),
            peers.clone(),
            stop.clone(),
        );
        tokio::spawn(async move {
            let mut stream = stream;
            let _ = stream.set_nodelay(true);
            let who = tokio::time::timeout(
                HANDSHAKE_TIMEOUT,
                acceptor_handshake(&mut stream, &settings),
            )
            .await;
            let peer_id = match who {
                Ok(Ok(id)) => id,
                Ok(Err(e)) => return warn!(error = %e, "link refused"),
                Err(_) => return warn!("link refused: handshake timed out"),
            };
            let (queue_tx, queue) = watch::channel(None);
            let peer = Peer::new(peer_id.clone(), queue);
            peer.connected_from(&stream);
            peers
                .lock()
                .expect("not poisoned")
                .insert(peer_id.clone(), peer.clone());
            info!(peer = %peer_id, "link accepted");
            serve(
                stream,
                &settings,
                &peer_id,
                &queue_tx,
                &peer.pending,
                &handler,
                &stop,
            )
            .await;
            info!(peer = %peer_id, "link down");
        });
    }
}

/// Runs one authenticated connection: a writer batching the queue, a
/// reader answering requests and completing pending ones. Returns when
/// the connection is lost (every pending request then fails).
async fn serve(
    stream: TcpStream,
    settings: &LinkSettings,
    peer_id: &str,
    queue_tx: &watch::Sender<Option<Connection>>,
    pending: &Arc<Pending>,
    handler: &Arc<dyn Handler>,
    stop: &CancellationToken,
) {
    let (mut read, mut write) = stream.into_split();
    let (tx, mut rx) = mpsc::channel::<Frame>(settings.queue_len);
    queue_tx.send_replace(Some(Connection {
        number: CONNECTIONS.fetch_add(1, Ordering::Relaxed),
        queue: tx.clone(),
    }));
    let writer = async {
        let mut buf = BytesMut::new();
        while let Some(first) = rx.recv().await {
            put_frame(&mut buf, &first);
            while let Ok(next) = rx.try_recv() {
                put_frame(&mut buf, &next);
                if buf.len() > 1 << 20 {
                    break;
                }
            }
            if write.write_all(&buf).await.is_err() {
                return;
            }
            buf.clear();
        }
    };
    let reader = async {
        loop {
            let frame = match tokio::time::timeout(
                settings.silence,
                read_frame(&mut read, settings.max_frame),
            )
            .await
            {
                Ok(Ok(f)) => f,
                Ok(Err(e)) => return debug!(peer = %peer_id, error = %e, "link read ended"),
                Err(_) => {
                    return warn!(peer = %peer_id, silence = ?settings.silence,
                        "link silent; dropping the connection")
                }
            };
            match frame.kind {
                kind::REQUEST => {
                    // Called here, in the order requests arrive: what the
                    // handler does before returning its future keeps that
                    // order (the owner queues a send on its shard there).
                    let answering = handler.request(peer_id, frame.body);
                    let tx = tx.clone();
                    tokio::spawn(async move {
                        let answer = answering.await;
                        let (kind, body) = match answer {
                            Ok(body) => (kind::RESPONSE, body),
                            Err(why) => (kind::FAILURE, Bytes::from(why.into_bytes())),
                        };
                        let _ = tx
                            .send(Frame {
                                kind,
                                id: frame.id,
                                body,
                            })
                            .await;
                    });
                }
                kind::RESPONSE | kind::FAILURE => {
                    let waiter = pending.lock().expect("not poisoned").remove(&frame.id);
                    if let Some(w) = waiter {
                        let _ = w.send(if frame.kind == kind::RESPONSE {
                            Ok(frame.body)
                        } else {
                            Err(LinkError::Failed(
                                String::from_utf8_lossy(&frame.body).into_owned(),
                            ))
                        });
                    }
                }
                kind::MESSAGE => handler.message(peer_id, frame.body),
                other => {
                    return warn!(peer = %peer_id, kind = other, "link: unexpected frame; closing")
                }
            }
        }
    };
    tokio::select! {
        _ = stop.cancelled() => {}
        _ = writer => {}
        _ = reader => {}
    }
    queue_tx.send_replace(None);
    // Whatever was in flight may or may not have been handled: retryable.
    for (_, w) in pending.lock().expect("not poisoned").drain() {
        let _ = w.send(Err(LinkError::Unavailable));
    }
}

fn put_frame(buf: &mut BytesMut, f: &Frame) {
    buf.put_u32((1 + 8 + f.body.len()) as u32);
    buf.put_u8(f.kind);
    buf.put_u64(f.id);
    buf.put_slice(&f.body);
}

async fn read_frame(read: &mut (impl AsyncRead + Unpin), max: u32) -> std::io::Result<Frame> {
    let len = read.read_u32().await?;
    if !(9..=max).contains(&len) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("frame length {len} outside 9..={max}"),
        ));
    }
    let mut buf = vec![0; len as usize];
    read.read_exact(&mut buf).await?;
    let mut b = Bytes::from(buf);
    let kind = b.get_u8();
    let id = b.get_u64();
    Ok(Frame { kind, id, body: b })
}

async fn write_frame(
    w: &mut (impl AsyncWrite + Unpin),
    kind: u8,
    body: &[u8],
) -> std::io::Result<()> {
    let mut buf = BytesMut::new();
    put_frame(
        &mut buf,
        &Frame {
            kind,
            id: 0,
            body: Bytes::copy_from_slice(body),
        },
    );
    w.write_all(&buf).await
}

/// A length-prefixed string (u16).
fn put_str(buf: &mut BytesMut, s: &str) {
    buf.put_u16(s.len() as u16);
    buf.put_slice(s.as_bytes());
}

fn get_str(b: &mut Bytes) -> Result<String, String> {
    if b.remaining() < 2 {
        return Err("truncated handshake".into());
    }
    let n = b.get_u16() as usize;
    if b.remaining() < n {
        return Err("truncated handshake".into());
    }
    String::from_utf8(b.split_to(n).to_vec()).map_err(|_| "a name is not UTF-8".into())
}

fn get_array<const N: usize>(b: &mut Bytes) -> Result<[u8; N], String> {
    if b.remaining() < N {
        return Err("truncated handshake".into());
    }
    let mut out = [0; N];
    b.copy_to_slice(&mut out);
    Ok(out)
}

/// The MAC one side sends: over its role, the cluster, both ids (dialer
/// first) and both nonces (dialer's first).
fn mac(settings: &LinkSettings, role: &str, ids: [&str; 2], nonces: [&[u8]; 2]) -> Hmac<Sha256> {
    let mut m =
        Hmac::<Sha256>::new_from_slice(&settings.secret).expect("HMAC takes any key length");
    for part in [
        role.as_bytes(),
        settings.cluster.as_bytes(),
        ids[0].as_bytes(),
        ids[1].as_bytes(),
    ] {
        m.update(&(part.len() as u32).to_be_bytes());
        m.update(part);
    }
    m.update(nonces[0]);
    m.update(nonces[1]);
    m
}

async fn expect(stream: &mut TcpStream, want: u8) -> Result<Bytes, String> {
    let f = read_frame(stream, 4096).await.map_err(|e| e.to_string())?;
    match f.kind {
        k if k == want => Ok(f.body),
        kind::REFUSED => Err(format!(
            "refused by the peer: {}",
            String::from_utf8_lossy(&f.body)
        )),
        k => Err(format!("unexpected handshake frame {k:#x}")),
    }
}

async fn dialer_handshake(
    stream: &mut TcpStream,
    s: &LinkSettings,
    peer_id: &str,
) -> Result<(), String> {
    let nonce: [u8; NONCE_LEN] = rand::random();
    let mut hello = BytesMut::new();
    hello.put_u8(VERSION);
    put_str(&mut hello, &s.cluster);
    put_str(&mut hello, &s.node_id);
    hello.put_slice(&nonce);
    write_frame(stream, kind::HELLO, &hello)
        .await
        .map_err(|e| e.to_string())?;
    let mut challenge = expect(stream, kind::CHALLENGE).await?;
    let their_id = get_str(&mut challenge)?;
    if their_id != peer_id {
        return Err(format!(
            "expected node {peer_id:?} at this address, found {their_id:?}"
        ));
    }
    let their_nonce: [u8; NONCE_LEN] = get_array(&mut challenge)?;
    let their_mac: [u8; MAC_LEN] = get_array(&mut challenge)?;
    let ids = [s.node_id.as_str(), peer_id];
    let nonces = [&nonce[..], &their_nonce[..]];
    if mac(s, "acceptor", ids, nonces)
        .verify_slice(&their_mac)
        .is_err()
    {
        let _ = write_frame(stream, kind::REFUSED, b"wrong cluster secret").await;
        return Err("the peer does not hold the cluster secret".to_owned());
    }
    let proof = mac(s, "dialer", ids, nonces).finalize().into_bytes();
    write_frame(stream, kind::PROOF, &proof)
        .await
        .map_err(|e| e.to_string())?;
    expect(stream, kind::WELCOME).await.map(drop)
}

/// Authenticates a dialer; returns its node id.
async fn acceptor_handshake(stream: &mut TcpStream, s: &LinkSettings) -> Result<String, String> {
    let mut hello = expect(stream, kind::HELLO).await?;
    if hello.remaining() < 1 || hello.get_u8() != VERSION {
        let why = "unsupported link version".to_owned();
        let _ = write_frame(stream, kind::REFUSED, why.as_bytes()).await;
        return Err(why);
    }
    let cluster = get_str(&mut hello)?;
    let their_id = get_str(&mut hello)?;
    let their_nonce: [u8; NONCE_LEN] = get_array(&mut hello)?;
    if cluster != s.cluster {
        let why = format!("this node is in cluster {:?}, not {cluster:?}", s.cluster);
        let _ = write_frame(stream, kind::REFUSED, why.as_bytes()).await;
        return Err(why);
    }
    let nonce: [u8; NONCE_LEN] = rand::random();
    let ids = [their_id.as_str(), s.node_id.as_str()];
    let nonces = [&their_nonce[..], &nonce[..]];
    let mut challenge = BytesMut::new();
    put_str(&mut challenge, &s.node_id);
    challenge.put_slice(&nonce);
    challenge.put_slice(&mac(s, "acceptor", ids, nonces).finalize().into_bytes());
    write_frame(stream, kind::CHALLENGE, &challenge)
        .await
        .map_err(|e| e.to_string())?;
    let proof = expect(stream, kind::PROOF).await?;
    if mac(s, "dialer", ids, nonces).verify_slice(&proof).is_err() {
        let why = format!("node {their_id:?} does not hold the cluster secret");
        let _ = write_frame(stream, kind::REFUSED, b"wrong cluster secret").await;
        return Err(why);
    }
    write_frame(stream, kind::WELCOME, &[])
        .await
        .map_err(|e| e.to_string())?;
    Ok(their_id)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo;

    impl Handler for Echo {
        fn request(
            &self,
            from: &str,
            body: Bytes,
        ) -> Pin<Box<dyn Future<Output = Result<Bytes, String>> + Send>> {
            let from = from.to_owned();
            Box::pin(async move {
                match &body[..] {
                    b"fail" => Err("as asked".into()),
                    b"slow" => {
                        tokio::time::sleep(Duration::from_secs(5)).await;
                        Ok(body)
                    }
                    _ => Ok(Bytes::from(format!(
                        "{from}:{}",
                        String::from_utf8_lossy(&body)
                    ))),
                }
            })
        }
        fn message(&self, _from: &str, _body: Bytes) {}
    }

    fn settings(id: &str, secret: &[u8]) -> LinkSettings {
        LinkSettings {
            cluster: "blue".into(),
            node_id: id.into(),
            secret: Arc::from(secret),
            queue_len: 64,
            max_frame: 1 << 20,
            silence: Duration::from_secs(5),
        }
    }

    async fn acceptor(
        id: &str,
        secret: &[u8],
        stop: &CancellationToken,
    ) -> (String, Arc<Mutex<HashMap<String, Arc<Peer>>>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let peers = Arc::new(Mutex::new(HashMap::new()));
        tokio::spawn(accept(
            listener,
            settings(id, secret),
            Arc::new(Echo),
            peers.clone(),
            stop.clone(),
        ));
        (addr, peers)
    }

    async fn until_connected(peer: &Peer) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !peer.connected() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the link never came up"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Carries bytes between its clients and `to` until `cut` is set; then
    /// holds every connection open and silent, as a cut network does.
    async fn cuttable_proxy(to: String, cut: Arc<std::sync::atomic::AtomicBool>) -> String {
        let proxy = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = proxy.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            while let Ok((client, _)) = proxy.accept().await {
                let Ok(upstream) = TcpStream::connect(&to).await else {
                    return;
                };
                let (cr, cw) = client.into_split();
                let (ur, uw) = upstream.into_split();
                for (mut from, mut into) in [(cr, uw), (ur, cw)] {
                    let cut = cut.clone();
                    tokio::spawn(async move {
                        let mut buf = [0u8; 4096];
                        while let Ok(n) = from.read(&mut buf).await {
                            if n == 0 {
                                return;
                            }
                            if cut.load(Ordering::Relaxed) {
                                // Silence, with both sockets held open.
                                return std::future::pending::<()>().await;
                            }
                            if into.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    });
                }
            }
        });
        addr
    }

    /// A peer that goes silent (cut off, frozen: no close, no reset) is
    /// noticed after the silence bound, not after TCP's minutes: the
    /// connection is dropped, what waited on it fails, and whoever watched
    /// it (a forwarded session) hears it is gone.
    #[tokio::test]
    async fn a_silent_connection_is_dropped_after_the_silence_bound() {
        let stop = CancellationToken::new();
        let (addr, _peers) = acceptor("b", b"secret", &stop).await;
        let cut = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let via = cuttable_proxy(addr, cut.clone()).await;
        let mut s = settings("a", b"secret");
        s.silence = Duration::from_millis(500);
        let a = dial(s, "b".into(), via, Arc::new(Echo), stop.clone());
        until_connected(&a).await;
        let d = Duration::from_secs(5);
        assert_eq!(a.request(Bytes::from_static(b"x"), d).await.unwrap(), "a:x");
        let first = a.connection();
        let lost = a.connection_lost();
        cut.store(true, Ordering::Relaxed);
        let (_, waiting) = a.start_request(Bytes::from_static(b"y"), d).unwrap();
        let t = std::time::Instant::now();
        tokio::time::timeout(Duration::from_secs(3), lost)
            .await
            .expect("the silent connection is seen gone");
        assert!(
            t.elapsed() >= Duration::from_millis(400),
            "not before the bound: {:?}",
            t.elapsed()
        );
        assert_ne!(a.connection(), first);
        assert_eq!(
            waiting.await,
            Err(LinkError::Unavailable),
            "what waited on it fails at once, retryable"
        );
        stop.cancel();
    }

    /// A link whose peer stopped reading fills its bounded queue; a request
    /// that finds it full is refused at once (`Overloaded`: the data plane
    /// answers `SHARD_UNAVAILABLE`), never queued without bound or waited on.
    #[tokio::test]
    async fn a_full_link_queue_refuses_at_once() {
        let stop = CancellationToken::new();
        let (addr, _peers) = acceptor("b", b"secret", &stop).await;
        let cut = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let via = cuttable_proxy(addr, cut.clone()).await;
        let a = dial(
            settings("a", b"secret"),
            "b".into(),
            via,
            Arc::new(Echo),
            stop.clone(),
        );
        until_connected(&a).await;
        cut.store(true, Ordering::Relaxed);
        let big = Bytes::from(vec![7u8; 64 << 10]);
        let d = Duration::from_secs(5);
        let mut queued = Vec::new();
        let mut refused = None;
        // The socket buffers take a few MiB, then the queue its 64 frames.
        for i in 0..2_000 {
            match a.start_request(big.clone(), d) {
                Ok((_, answer)) => queued.push(answer),
                Err(e) => {
                    refused = Some((i, e));
                    break;
                }
            }
            tokio::task::yield_now().await;
        }
        let (at, e) = refused.expect("the queue filled up");
        assert_eq!(e, LinkError::Overloaded, "after {at} requests");
        assert!(at >= 64, "the queue's 64 frames were taken first: {at}");
        stop.cancel();
    }

    #[tokio::test]
    async fn requests_go_both_ways_over_one_authenticated_connection() {
        let stop = CancellationToken::new();
        let (addr, peers) = acceptor("b", b"secret", &stop).await;
        let a = dial(
            settings("a", b"secret"),
            "b".into(),
            addr,
            Arc::new(Echo),
            stop.clone(),
        );
        until_connected(&a).await;
        let d = Duration::from_secs(5);
        assert_eq!(
            a.request(Bytes::from_static(b"x"), d).await.unwrap(),
            "a:x",
            "handled at b, from a"
        );
        let b_side = peers.lock().unwrap().get("a").cloned().expect("b knows a");
        assert_eq!(
            b_side.request(Bytes::from_static(b"y"), d).await.unwrap(),
            "b:y",
            "and back"
        );
        assert_eq!(
            a.request(Bytes::from_static(b"fail"), d).await,
            Err(LinkError::Failed("as asked".into()))
        );
        let many = (0..200).map(|i| a.request(Bytes::from(format!("{i}")), d));
        let answers = futures_util::future::join_all(many).await;
        for (i, r) in answers.into_iter().enumerate() {
            assert_eq!(
                r.unwrap(),
                format!("a:{i}"),
                "each answer to its own request"
            );
        }
        stop.cancel();
    }

    #[tokio::test]
    async fn a_wrong_secret_or_cluster_or_node_is_refused() {
        let stop = CancellationToken::new();
        let (addr, peers) = acceptor("b", b"secret", &stop).await;
        let mut wrong_secret = settings("a", b"guess");
        wrong_secret.queue_len = 4;
        let mut wrong_cluster = settings("a", b"secret");
        wrong_cluster.cluster = "green".into();
        for (s, peer_id, why) in [
            (
                wrong_secret,
                "b",
                "the peer does not hold the cluster secret",
            ),
            (
                wrong_cluster,
                "b",
                "refused by the peer: this node is in cluster \"blue\", not \"green\"",
            ),
            (
                settings("a", b"secret"),
                "c",
                "expected node \"c\" at this address, found \"b\"",
            ),
        ] {
            let mut stream = TcpStream::connect(&addr).await.unwrap();
            let r = dialer_handshake(&mut stream, &s, peer_id).await;
            assert_eq!(r, Err(why.to_owned()));
        }
        assert!(peers.lock().unwrap().is_empty(), "nobody got in");
        stop.cancel();
    }

    #[tokio::test]
    async fn a_lost_connection_fails_what_was_in_flight_and_comes_back() {
        let stop = CancellationToken::new();
        let acceptor_stop = CancellationToken::new();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let peers = Arc::new(Mutex::new(HashMap::new()));
        tokio::spawn(accept(
            listener,
            settings("b", b"s"),
            Arc::new(Echo),
            peers.clone(),
            acceptor_stop.clone(),
        ));
        let a = dial(
            settings("a", b"s"),
            "b".into(),
            addr.to_string(),
            Arc::new(Echo),
            stop.clone(),
        );
        until_connected(&a).await;
        let slow = tokio::spawn({
            let a = a.clone();
            async move {
                a.request(Bytes::from_static(b"slow"), Duration::from_secs(10))
                    .await
            }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        acceptor_stop.cancel();
        assert_eq!(
            slow.await.unwrap(),
            Err(LinkError::Unavailable),
            "retryable, not lost silently"
        );
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while a.connected() {
            assert!(tokio::time::Instant::now() < deadline);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(
            a.request(Bytes::from_static(b"x"), Duration::from_secs(1))
                .await,
            Err(LinkError::Unavailable)
        );
        // The peer comes back on the same address: the dialer reconnects.
        let listener = TcpListener::bind(addr).await.unwrap();
        tokio::spawn(accept(
            listener,
            settings("b", b"s"),
            Arc::new(Echo),
            peers,
            stop.clone(),
        ));
        until_connected(&a).await;
        assert_eq!(
            a.request(Bytes::from_static(b"z"), Duration::from_secs(5))
                .await
                .unwrap(),
            "a:z"
        );
        stop.cancel();
    }
}

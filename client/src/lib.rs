//! An async (tokio) client for Courier's protocol v1: what applications,
//! bots, the tests and the load generator use.
//!
//! ```no_run
//! # async fn demo() -> Result<(), courier_client::ClientError> {
//! use courier_client::{Client, ClientConfig};
//! use courier_protocol::{Destination, MessageKind};
//! let config = ClientConfig::new("127.0.0.1:7700", 1, 1, "token-from-courier-token");
//! let (client, welcome) = Client::connect(config).await?;
//! let ack = client.send(Destination::User(2), MessageKind::Chat, "hi".into()).await?;
//! while let Some(message) = client.recv().await {
//!     client.ack(message.seq).await?;
//! }
//! # Ok(()) }
//! ```
//!
//! One background task reads frames: replies complete the request that
//! carries their request id, deliveries go to a bounded queue read by
//! [`Client::recv`], receipt facts (with `receipts_after` set) are merged
//! per reader and read with [`Client::receipt_changes`]. If the application stops calling `recv`, that queue
//! fills, the reader stops reading the socket and the server moves this
//! session to catch-up: nothing is lost, nothing else slows down.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use courier_protocol::error::retry_after_ms;
use courier_protocol::*;
use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{mpsc, oneshot};

/// The pause before retrying a `SHARD_UNAVAILABLE` refusal that names no
/// retry-after hint.
const UNAVAILABLE_HINT_MS: u64 = 250;

/// Deliveries buffered in the client before it stops reading the socket.
const DELIVERY_QUEUE_LEN: usize = 4096;

#[derive(Debug, Error)]
pub enum ClientError {
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    /// The server refused the session (Goodbye during the handshake).
    #[error("handshake refused: {0:?} {1}")]
    Refused(ErrorCode, String),
    /// The server answered the request with an error.
    #[error("rejected: {0:?} {1}")]
    Rejected(ErrorCode, String),
    /// The connection is closed (with the server's reason, if it gave one).
    #[error("connection closed{}", .0.as_ref().map(|r| format!(": {:?} {}", r.code, r.message)).unwrap_or_default())]
    Closed(Option<Reason>),
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("timed out")]
    Timeout,
}

impl ClientError {
    /// The same error again (an I/O error keeps its kind and words).
    fn copy(&self) -> ClientError {
        match self {
            ClientError::Io(e) => ClientError::Io(std::io::Error::new(e.kind(), e.to_string())),
            ClientError::Refused(c, m) => ClientError::Refused(*c, m.clone()),
            ClientError::Rejected(c, m) => ClientError::Rejected(*c, m.clone()),
            ClientError::Closed(r) => ClientError::Closed(r.clone()),
            ClientError::Protocol(p) => ClientError::Protocol(p.clone()),
            ClientError::Timeout => ClientError::Timeout,
        }
    }
}

/// How to connect and who to be.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    pub addr: String,
    pub user_id: u64,
    pub device_id: u32,
    pub token: String,
    /// `Some(n)`: resume after inbox sequence `n`; `None`: after what was acknowledged.
    pub resume_after: Option<u64>,
    /// `Some(v)`: take one-to-one receipts as facts (`Receipts` frames,
    /// read with [`Client::receipt_changes`]), every fact after version `v`
    /// first (0: all). `None`: receipts come as `receipt` messages. The
    /// server switches the user for good the first time a session asks.
    pub receipts_after: Option<u64>,
    pub max_frame_len: u32,
    pub connect_timeout: Duration,
    /// Connect from this local address (a load generator spreads many
    /// connections over several loopback addresses: each source address
    /// has its own range of ephemeral ports).
    pub local_addr: Option<IpAddr>,
    /// TLS to a node that serves it (`tls.*` settings); `None`: plain TCP.
    pub tls: Option<ClientTls>,
    /// How long `send` and `send_with_id` keep retrying a send refused
    /// with the retryable `SHARD_UNAVAILABLE` (a cluster node that owns
    /// the destination is out of reach), each time after the server's
    /// retry-after hint and with the same client message id. Zero: return
    /// the refusal at once.
    pub unavailable_retry: Duration,
}

impl ClientConfig {
    pub fn new(
        addr: impl Into<String>,
        user_id: u64,
        device_id: u32,
        token: impl Into<String>,
    ) -> Self {
        ClientConfig {
            addr: addr.into(),
            user_id,
            device_id,
            token: token.into(),
            resume_after: None,
            receipts_after: None,
            max_frame_len: DEFAULT_MAX_FRAME_LEN,
            connect_timeout: Duration::from_secs(10),
            local_addr: None,
            tls: None,
            unavailable_retry: Duration::from_secs(30),
        }
    }
}

type Pending = Arc<Mutex<HashMap<u32, oneshot::Sender<Body>>>>;

/// A message as it arrived, with the stream it belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delivery {
    /// 0: the user's inbox (`seq` is the inbox sequence). A group id: that
    /// log-strategy group's stream (`seq` is the group sequence).
    pub stream: u64,
    pub message: Message,
}

pub struct Client {
    config: ClientConfig,
    out: mpsc::UnboundedSender<Bytes>,
    pending: Pending,
    deliveries: tokio::sync::Mutex<mpsc::Receiver<Delivery>>,
    next_request: AtomicU32,
    next_client_msg_id: AtomicU64,
    last_received: Arc<AtomicU64>,
    closed: Arc<Mutex<Option<Option<Reason>>>>,
    /// Template packs of the businesses asked about (see
    /// [`Client::template_pack`]).
    packs: Mutex<HashMap<u64, PackEntry>>,
    pack_fetches: AtomicU64,
    facts: Arc<Facts>,
}

/// The receipt facts this session was told: the latest per reader, those
/// not yet taken by [`Client::receipt_changes`], and the highest version.
#[derive(Default)]
struct Facts {
    state: Mutex<FactsState>,
    changed: tokio::sync::Notify,
}

#[derive(Default)]
struct FactsState {
    latest: HashMap<u64, ReceiptFact>,
    untaken: HashMap<u64, ReceiptFact>,
    version: u64,
    closed: bool,
}

impl Facts {
    /// Takes in facts as they arrived; each moves only forward.
    fn arrived(&self, facts: Vec<ReceiptFact>) {
        let mut st = self.state.lock().expect("facts");
        for f in facts {
            st.version = st.version.max(f.version);
            let merged = match st.latest.get(&f.reader) {
                Some(old) if old.version >= f.version => continue,
                Some(old) => ReceiptFact {
                    delivered: old.delivered.max(f.delivered),
                    read: old.read.max(f.read),
                    ..f
                },
                None => f,
            };
            st.latest.insert(f.reader, merged);
            st.untaken.insert(f.reader, merged);
        }
        drop(st);
        self.changed.notify_one();
    }

    fn close(&self) {
        self.state.lock().expect("facts").closed = true;
        self.changed.notify_one();
    }
}

/// A business's template pack as the client keeps it.
enum PackEntry {
    /// Fetched; kept until the pack's `valid_until_ms`.
    Fetched(Arc<TemplatePack>),
    /// The last fetch failed at this time (ms) with this error: the next
    /// one waits [`PACK_RETRY_MS`].
    Failed(u64, ClientError),
}

/// How long after a failed fetch of a template pack the client tries again.
pub const PACK_RETRY_MS: u64 = 5 * 60 * 1000;

impl Client {
    /// Connects, says hello and waits for the welcome.
    pub async fn connect(config: ClientConfig) -> Result<(Client, Welcome), ClientError> {
        // Small buffer at first (idle sessions stay small); read_frame grows
        // it for a busy one.
        let RawSession {
            reader: rd,
            writer: wr,
            welcome,
            buffered: buf,
        } = RawSession::open(&config).await?;
        let out = spawn_writer(wr, &welcome);
        let pending: Pending = Arc::default();
        let closed: Arc<Mutex<Option<Option<Reason>>>> = Arc::default();
        let (dtx, drx) = mpsc::channel(DELIVERY_QUEUE_LEN);
        let facts = Arc::new(Facts::default());
        facts.state.lock().expect("facts").version = config.receipts_after.unwrap_or(0);
        // The server says how large its frames may be.
        let max = config.max_frame_len.max(welcome.max_frame_len);
        tokio::spawn(read_loop(
            rd,
            buf,
            max,
            dtx,
            pending.clone(),
            closed.clone(),
            facts.clone(),
        ));
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
        let last_received = Arc::new(AtomicU64::new(welcome.resume_from.saturating_sub(1)));
        let client = Client {
            config,
            out,
            pending,
            deliveries: tokio::sync::Mutex::new(drx),
            next_request: AtomicU32::new(2),
            next_client_msg_id: AtomicU64::new(seed),
            last_received,
            closed,
            packs: Mutex::new(HashMap::new()),
            pack_fetches: AtomicU64::new(0),
            facts,
        };
        Ok((client, welcome))
    }

    /// Connects again as the same user and device, resuming after the last
    /// message this client handed to the application (and, taking receipt
    /// facts, after the last fact's version it was told).
    pub async fn reconnect(&self) -> Result<(Client, Welcome), ClientError> {
        let mut config = self.config.clone();
        config.resume_after = Some(self.last_received_seq());
        if config.receipts_after.is_some() {
            config.receipts_after = Some(self.receipts_version());
        }
        Client::connect(config).await
    }

    /// The highest receipt-fact version this session was told (the
    /// configured `receipts_after` before any).
    pub fn receipts_version(&self) -> u64 {
        self.facts.state.lock().expect("facts").version
    }

    /// What `reader` has done with this user's one-to-one messages, as far
    /// as this session was told: messages whose `SendAck.seq` is at most
    /// `delivered` reached the reader, at most `read` were read.
    pub fn receipt_fact(&self, reader: u64) -> Option<ReceiptFact> {
        self.facts
            .state
            .lock()
            .expect("facts")
            .latest
            .get(&reader)
            .copied()
    }

    /// The facts that changed since the last call, the latest per reader
    /// (waits for one); `None` once the connection is closed and every
    /// change was taken.
    pub async fn receipt_changes(&self) -> Option<Vec<ReceiptFact>> {
        loop {
            {
                let mut st = self.facts.state.lock().expect("facts");
                if !st.untaken.is_empty() {
                    let mut changes: Vec<ReceiptFact> =
                        st.untaken.drain().map(|(_, f)| f).collect();
                    changes.sort_by_key(|f| f.version);
                    return Some(changes);
                }
                if st.closed {
                    return None;
                }
            }
            self.facts.changed.notified().await;
        }
    }

    /// Like [`Client::receipt_changes`] with a deadline.
    pub async fn receipt_changes_timeout(
        &self,
        timeout: Duration,
    ) -> Result<Vec<ReceiptFact>, ClientError> {
        match tokio::time::timeout(timeout, self.receipt_changes()).await {
            Ok(Some(changes)) => Ok(changes),
            Ok(None) => Err(self.closed_error()),
            Err(_) => Err(ClientError::Timeout),
        }
    }

    pub fn config(&self) -> &ClientConfig {
        &self.config
    }

    /// Sequence of the last message returned by [`Client::recv`].
    pub fn last_received_seq(&self) -> u64 {
        self.last_received.load(Ordering::SeqCst)
    }

    /// Why the connection closed, once it has.
    pub fn close_reason(&self) -> Option<Option<Reason>> {
        self.closed.lock().expect("closed").clone()
    }

    fn request_id(&self) -> u32 {
        loop {
            let id = self.next_request.fetch_add(1, Ordering::Relaxed);
            if id != 0 {
                return id;
            }
        }
    }

    /// A fresh client message id (unique for this client's lifetime).
    pub fn new_client_msg_id(&self) -> u64 {
        self.next_client_msg_id.fetch_add(1, Ordering::Relaxed)
    }

    fn closed_error(&self) -> ClientError {
        ClientError::Closed(self.close_reason().flatten())
    }

    /// Sends a request and waits for the frame that answers it.
    pub async fn request(&self, body: Body) -> Result<Body, ClientError> {
        let answer = self.start_request(body)?;
        self.answer(answer).await
    }

    /// Queues a request for writing now (requests go out in the order they
    /// were started) and returns the receiver of its answer.
    fn start_request(&self, body: Body) -> Result<oneshot::Receiver<Body>, ClientError> {
        let id = self.request_id();
        let (tx, rx) = oneshot::channel();
        self.pending.lock().expect("pending").insert(id, tx);
        if self.close_reason().is_some()
            || self
                .out
                .send(encode_to_bytes(&Frame::new(id, body)))
                .is_err()
        {
            self.pending.lock().expect("pending").remove(&id);
            return Err(self.closed_error());
        }
        Ok(rx)
    }

    async fn answer(&self, rx: oneshot::Receiver<Body>) -> Result<Body, ClientError> {
        match rx.await {
            Ok(Body::Error(r)) => Err(ClientError::Rejected(r.code, r.message)),
            Ok(body) => Ok(body),
            Err(_) => Err(self.closed_error()),
        }
    }

    /// Queues a send now and returns a future of its ack: sends started one
    /// after another reach the server in that order, however their acks are
    /// awaited (pipelining with order, as the load generator needs).
    pub fn start_send(
        self: &Arc<Self>,
        client_msg_id: u64,
        destination: Destination,
        kind: MessageKind,
        payload: Bytes,
    ) -> Result<
        impl std::future::Future<Output = Result<SendAck, ClientError>> + 'static,
        ClientError,
    > {
        self.start_answered(
            send_body(client_msg_id, destination, kind, payload),
            send_ack,
        )
    }

    /// Queues a request now; the future is its answer, picked by `pick`.
    fn start_answered<T: 'static>(
        self: &Arc<Self>,
        body: Body,
        pick: fn(Body) -> Result<T, ClientError>,
    ) -> Result<impl std::future::Future<Output = Result<T, ClientError>> + 'static, ClientError>
    {
        let rx = self.start_request(body)?;
        let this = self.clone();
        Ok(async move { pick(this.answer(rx).await?) })
    }

    /// Sends raw bytes (for tests of malformed input).
    pub fn send_raw(&self, bytes: Bytes) -> Result<(), ClientError> {
        self.out.send(bytes).map_err(|_| self.closed_error())
    }

    /// Sends a message with a fresh client message id and waits for the ack.
    pub async fn send(
        &self,
        destination: Destination,
        kind: MessageKind,
        payload: Bytes,
    ) -> Result<SendAck, ClientError> {
        self.send_with_id(self.new_client_msg_id(), destination, kind, payload)
            .await
    }

    /// Sends with a chosen client message id: a retry with the same id is
    /// stored once and answered with the original's ack (`duplicate` set).
    /// `SHARD_UNAVAILABLE` is retried with the same id after its hint, for
    /// `ClientConfig::unavailable_retry`.
    pub async fn send_with_id(
        &self,
        client_msg_id: u64,
        destination: Destination,
        kind: MessageKind,
        payload: Bytes,
    ) -> Result<SendAck, ClientError> {
        let body = || send_body(client_msg_id, destination, kind, payload.clone());
        send_ack(self.retrying_unavailable(body).await?)
    }

    /// Sends `body()` until it is answered otherwise than
    /// `SHARD_UNAVAILABLE`, waiting each refusal's hint, for at most
    /// `ClientConfig::unavailable_retry`.
    async fn retrying_unavailable(&self, body: impl Fn() -> Body) -> Result<Body, ClientError> {
        let give_up = tokio::time::Instant::now() + self.config.unavailable_retry;
        loop {
            match self.request(body()).await {
                Err(ClientError::Rejected(ErrorCode::SHARD_UNAVAILABLE, message)) => {
                    let at = tokio::time::Instant::now() + retry_delay(&message);
                    if at > give_up {
                        return Err(ClientError::Rejected(ErrorCode::SHARD_UNAVAILABLE, message));
                    }
                    tokio::time::sleep_until(at).await;
                }
                answer => return answer,
            }
        }
    }

    /// Sends many messages in one frame; one result per item, in order.
    pub async fn send_batch(&self, sends: Vec<Send>) -> Result<Vec<SendResult>, ClientError> {
        match self.request(Body::SendBatch(sends)).await? {
            Body::SendBatchAck(r) => Ok(r),
            other => Err(unexpected("send_batch_ack", &other)),
        }
    }

    /// The next delivery from any stream (each stream in its own order);
    /// `None` once closed.
    pub async fn next(&self) -> Option<Delivery> {
        let d = self.deliveries.lock().await.recv().await?;
        if d.stream == 0 {
            self.last_received.store(d.message.seq, Ordering::SeqCst);
        }
        Some(d)
    }

    /// Like [`Client::next`] with a deadline.
    pub async fn next_timeout(&self, timeout: Duration) -> Result<Delivery, ClientError> {
        match tokio::time::timeout(timeout, self.next()).await {
            Ok(Some(d)) => Ok(d),
            Ok(None) => Err(self.closed_error()),
            Err(_) => Err(ClientError::Timeout),
        }
    }

    /// The next delivered message (see [`Client::next`] for its stream).
    pub async fn recv(&self) -> Option<Message> {
        self.next().await.map(|d| d.message)
    }

    /// Like [`Client::recv`] with a deadline.
    pub async fn recv_timeout(&self, timeout: Duration) -> Result<Message, ClientError> {
        self.next_timeout(timeout).await.map(|d| d.message)
    }

    /// Confirms a delivery on its own stream (`Ack` for the inbox, `Mark`
    /// delivered for a group log).
    pub async fn confirm(&self, d: &Delivery) -> Result<(), ClientError> {
        self.mark(d.stream, d.message.seq, ReceiptStatus::Delivered)
            .await
    }

    /// Marks a stream (0 = inbox, or a log-strategy group) up to `seq`.
    pub async fn mark(
        &self,
        stream: u64,
        seq: u64,
        status: ReceiptStatus,
    ) -> Result<(), ClientError> {
        let body = match (stream, status) {
            (0, ReceiptStatus::Delivered) => Body::Ack { up_to_seq: seq },
            _ => Body::Mark(Mark {
                stream,
                up_to_seq: seq,
                status,
            }),
        };
        self.out
            .send(encode_to_bytes(&Frame::new(0, body)))
            .map_err(|_| self.closed_error())
    }

    /// Marks the inbox read up to `seq` (senders get read receipts).
    pub async fn mark_read(&self, seq: u64) -> Result<(), ClientError> {
        self.mark(0, seq, ReceiptStatus::Read).await
    }

    /// A group operation; answers with the group's state after it.
    pub async fn group(
        &self,
        op: GroupOp,
        group: u64,
        users: Vec<u64>,
    ) -> Result<GroupInfo, ClientError> {
        match self
            .request(Body::Group(GroupRequest { op, group, users }))
            .await?
        {
            Body::GroupInfo(i) => Ok(i),
            other => Err(unexpected("group_info", &other)),
        }
    }

    /// Creates a group with this user as admin and `members` besides.
    pub async fn create_group(&self, members: Vec<u64>) -> Result<GroupInfo, ClientError> {
        self.group(GroupOp::Create, 0, members).await
    }

    /// Aggregate receipts of one of this user's group messages.
    pub async fn receipt_counts(&self, group: u64, seq: u64) -> Result<ReceiptCounts, ClientError> {
        match self.request(Body::ReceiptQuery { group, seq }).await? {
            Body::ReceiptCounts(c) => Ok(c),
            other => Err(unexpected("receipt_counts", &other)),
        }
    }

    /// Edits or reads the contact list; answers with the whole list.
    pub async fn contacts(&self, op: ContactsOp, users: Vec<u64>) -> Result<Vec<u64>, ClientError> {
        match self
            .request(Body::Contacts(ContactsRequest { op, users }))
            .await?
        {
            Body::Users(u) => Ok(u.users),
            other => Err(unexpected("users", &other)),
        }
    }

    /// A customer's request about a business: its profile (`Info`), block,
    /// unblock, report (`text`: why), opt in or out for a purpose (`text`:
    /// the wording shown, `language`: its language, which becomes the
    /// customer's preferred language for the business's templates).
    pub async fn business(
        &self,
        op: BusinessOp,
        business: u64,
        purpose: Purpose,
        language: &str,
        text: &str,
    ) -> Result<BusinessInfo, ClientError> {
        let request = BusinessRequest {
            op,
            business,
            purpose,
            language: language.to_owned(),
            text: text.to_owned(),
        };
        match self.request(Body::Business(request)).await? {
            Body::BusinessInfo(info) => Ok(*info),
            other => Err(unexpected("business_info", &other)),
        }
    }

    /// The template pack of `business` (its approved templates): kept until
    /// its `valid_until_ms` (31 days on), fetched again after; a failed
    /// fetch is answered from memory (its error) for 5 minutes, then tried
    /// again.
    pub async fn template_pack(&self, business: u64) -> Result<Arc<TemplatePack>, ClientError> {
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        self.template_pack_at(business, now_ms).await
    }

    /// A business's own events after sequence `after`, at most `limit`
    /// (1 to 1,000): the last sequence there is, and the events as a JSON
    /// array (PROTOCOL.md, `EventList`). Resuming from the last event read
    /// reads each once.
    pub async fn events(&self, after: u64, limit: u16) -> Result<(u64, String), ClientError> {
        match self.request(Body::EventFetch { after, limit }).await? {
            Body::EventList { last, json } => Ok((last, json)),
            other => Err(unexpected("event_list", &other)),
        }
    }

    /// [`Client::template_pack`] as of `now_ms` (the wall clock, in ms).
    pub async fn template_pack_at(
        &self,
        business: u64,
        now_ms: u64,
    ) -> Result<Arc<TemplatePack>, ClientError> {
        let kept = match self.packs.lock().expect("packs lock").get(&business) {
            Some(PackEntry::Fetched(p)) if now_ms < p.valid_until_ms => Some(Ok(p.clone())),
            Some(PackEntry::Failed(at, e)) if now_ms < at + PACK_RETRY_MS => Some(Err(e.copy())),
            _ => None,
        };
        if let Some(kept) = kept {
            return kept;
        }
        self.pack_fetches.fetch_add(1, Ordering::Relaxed);
        let request = BusinessRequest {
            op: BusinessOp::Templates,
            business,
            purpose: Purpose::None,
            language: String::new(),
            text: String::new(),
        };
        let fetched = match self.request(Body::Business(request)).await {
            Ok(Body::TemplatePack(p)) => Ok(Arc::new(p)),
            Ok(other) => Err(unexpected("template_pack", &other)),
            Err(e) => Err(e),
        };
        let entry = match &fetched {
            Ok(p) => PackEntry::Fetched(p.clone()),
            Err(e) => PackEntry::Failed(now_ms, e.copy()),
        };
        self.packs
            .lock()
            .expect("packs lock")
            .insert(business, entry);
        fetched
    }

    /// How many template packs this client has asked the server for.
    pub fn template_pack_fetches(&self) -> u64 {
        self.pack_fetches.load(Ordering::Relaxed)
    }

    /// A business sends template `send` to `customer` (kind `template`).
    pub async fn send_template(
        &self,
        client_msg_id: u64,
        customer: u64,
        send: &business::TemplateSend,
    ) -> Result<SendAck, ClientError> {
        let payload = send.encode();
        self.send_with_id(
            client_msg_id,
            Destination::User(customer),
            MessageKind::Template,
            payload,
        )
        .await
    }

    /// Edits or reads a broadcast list (`None` after a delete).
    pub async fn list(
        &self,
        op: ListOp,
        list: u64,
        users: Vec<u64>,
    ) -> Result<Option<Vec<u64>>, ClientError> {
        match self
            .request(Body::List(ListRequest { op, list, users }))
            .await?
        {
            Body::Users(u) => Ok(Some(u.users)),
            Body::Done => Ok(None),
            other => Err(unexpected("users", &other)),
        }
    }

    /// Sends to a broadcast list; the ack says how many got it and how many
    /// were skipped for lack of consent. Retried like
    /// [`Client::send_with_id`] (a retry reaches only those not reached).
    pub async fn broadcast_with_id(
        &self,
        client_msg_id: u64,
        list: u64,
        kind: MessageKind,
        payload: Bytes,
    ) -> Result<BroadcastAck, ClientError> {
        let body = || {
            send_body(
                client_msg_id,
                Destination::List(list),
                kind,
                payload.clone(),
            )
        };
        broadcast_ack(self.retrying_unavailable(body).await?)
    }

    /// Like [`Client::start_send`] for a broadcast list.
    pub fn start_broadcast(
        self: &Arc<Self>,
        client_msg_id: u64,
        list: u64,
        kind: MessageKind,
        payload: Bytes,
    ) -> Result<
        impl std::future::Future<Output = Result<BroadcastAck, ClientError>> + 'static,
        ClientError,
    > {
        self.start_answered(
            send_body(client_msg_id, Destination::List(list), kind, payload),
            broadcast_ack,
        )
    }

    /// Posts a status; answers with its id and expiry.
    pub async fn post_status(
        &self,
        audience: Audience,
        users: Vec<u64>,
        payload: Bytes,
    ) -> Result<(u64, u64), ClientError> {
        let body = Body::StatusPost(StatusPost {
            audience,
            users,
            payload,
        });
        match self.request(body).await? {
            Body::StatusPosted {
                status_id,
                expires_at_ms,
            } => Ok((status_id, expires_at_ms)),
            other => Err(unexpected("status_posted", &other)),
        }
    }

    /// Current statuses of this user's contacts that it may see.
    pub async fn statuses(&self) -> Result<Vec<Status>, ClientError> {
        match self.request(Body::StatusFetch).await? {
            Body::StatusList(l) => Ok(l),
            other => Err(unexpected("status_list", &other)),
        }
    }

    /// Tells the poster this user saw its status.
    pub async fn view_status(&self, poster: u64, status_id: u64) -> Result<(), ClientError> {
        match self.request(Body::StatusView { poster, status_id }).await? {
            Body::Done => Ok(()),
            other => Err(unexpected("done", &other)),
        }
    }

    /// Tells the server this user has everything up to `seq`.
    pub async fn ack(&self, seq: u64) -> Result<(), ClientError> {
        let frame = Frame::new(0, Body::Ack { up_to_seq: seq });
        self.out
            .send(encode_to_bytes(&frame))
            .map_err(|_| self.closed_error())
    }

    /// Reads this user's inbox after `after_seq`.
    pub async fn fetch(&self, after_seq: u64, limit: u16) -> Result<FetchReply, ClientError> {
        self.fetch_inbox(self.config.user_id, after_seq, limit)
            .await
    }

    /// Reads the inbox of `user_id` (the server refuses any inbox but one's own).
    pub async fn fetch_inbox(
        &self,
        user_id: u64,
        after_seq: u64,
        limit: u16,
    ) -> Result<FetchReply, ClientError> {
        let body = Body::Fetch(Fetch {
            user_id,
            after_seq,
            limit,
        });
        match self.request(body).await? {
            Body::FetchReply(r) => Ok(r),
            other => Err(unexpected("fetch_reply", &other)),
        }
    }

    /// Round trip to the server (also keeps an idle connection alive).
    pub async fn ping(&self) -> Result<(), ClientError> {
        match self.request(Body::Ping { nonce: 7 }).await? {
            Body::Pong { .. } => Ok(()),
            other => Err(unexpected("pong", &other)),
        }
    }

    /// Waits until the server closes the connection; returns its reason.
    pub async fn closed(&self) -> Option<Reason> {
        loop {
            if let Some(r) = self.close_reason() {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

fn send_body(
    client_msg_id: u64,
    destination: Destination,
    kind: MessageKind,
    payload: Bytes,
) -> Body {
    Body::Send(Send {
        client_msg_id,
        destination,
        kind,
        payload,
    })
}

fn send_ack(body: Body) -> Result<SendAck, ClientError> {
    match body {
        Body::SendAck(a) => Ok(a),
        other => Err(unexpected("send_ack", &other)),
    }
}

fn broadcast_ack(body: Body) -> Result<BroadcastAck, ClientError> {
    match body {
        Body::BroadcastAck(a) => Ok(a),
        other => Err(unexpected("broadcast_ack", &other)),
    }
}

fn unexpected(expected: &str, got: &Body) -> ClientError {
    ClientError::Protocol(format!("expected {expected}, got {}", got.name()))
}

/// Says hello and reads the welcome (or the server's reason for refusing).
async fn handshake(
    config: &ClientConfig,
    rd: &mut Rd,
    wr: &mut Wr,
    buf: &mut BytesMut,
) -> Result<Welcome, ClientError> {
    let hello = Frame::new(
        1,
        Body::Hello(Hello {
            version: PROTOCOL_VERSION,
            user_id: config.user_id,
            device_id: config.device_id,
            resume_after: config.resume_after,
            receipts_after: config.receipts_after,
            token: Bytes::from(config.token.clone().into_bytes()),
        }),
    );
    wr.write_all(&encode_to_bytes(&hello)).await?;
    // TLS may keep what it encrypted until flushed (a plain socket's flush
    // does nothing).
    wr.flush().await?;
    let first = tokio::time::timeout(
        config.connect_timeout,
        read_frame(rd, buf, config.max_frame_len),
    )
    .await
    .map_err(|_| ClientError::Timeout)??;
    match first.map(|f| f.body) {
        Some(Body::Welcome(w)) => Ok(w),
        Some(Body::Goodbye(r)) | Some(Body::Error(r)) => {
            Err(ClientError::Refused(r.code, r.message))
        }
        Some(other) => Err(unexpected("welcome", &other)),
        None => Err(ClientError::Closed(None)),
    }
}

/// How long to wait before retrying a request refused `SHARD_UNAVAILABLE`
/// with `message`: its retry-after hint (a default without one), kept
/// between 10 ms and 5 s.
pub fn retry_delay(message: &str) -> Duration {
    let hint = retry_after_ms(message).unwrap_or(UNAVAILABLE_HINT_MS);
    Duration::from_millis(hint.clamp(10, 5_000))
}

/// Starts the task that writes queued frames, many per write. If the
/// application sends nothing for a keepalive interval, it sends a Ping
/// (request id 0; its Pong is ignored) to keep the session alive.
fn spawn_writer(mut wr: Wr, welcome: &Welcome) -> mpsc::UnboundedSender<Bytes> {
    let (out_tx, mut out_rx) = mpsc::unbounded_channel::<Bytes>();
    let keepalive = Duration::from_millis(u64::from(welcome.keepalive_ms.max(100)));
    let ping = encode_to_bytes(&Frame::new(0, Body::Ping { nonce: 0 }));
    tokio::spawn(async move {
        let mut batch = BytesMut::new();
        loop {
            let first = match tokio::time::timeout(keepalive, out_rx.recv()).await {
                Ok(Some(frame)) => frame,
                Ok(None) => break,
                Err(_) => ping.clone(),
            };
            batch.extend_from_slice(&first);
            while let Ok(more) = out_rx.try_recv() {
                batch.extend_from_slice(&more);
                if batch.len() > 256 << 10 {
                    break;
                }
            }
            if wr.write_all(&batch).await.is_err() || wr.flush().await.is_err() {
                return;
            }
            batch.clear();
        }
        let _ = wr.shutdown().await;
    });
    out_tx
}

/// Reads frames until the connection ends: deliveries to `deliveries`,
/// answers to their waiters. Then records the server's reason (if it gave
/// one) in `closed` and fails every outstanding request.
async fn read_loop(
    mut rd: Rd,
    mut buf: BytesMut,
    max: u32,
    deliveries: mpsc::Sender<Delivery>,
    pending: Pending,
    closed: Arc<Mutex<Option<Option<Reason>>>>,
    facts: Arc<Facts>,
) {
    let mut reason = None;
    while let Ok(Some(frame)) = read_frame(&mut rd, &mut buf, max).await {
        match frame.body {
            Body::Deliver(messages) => deliver(&deliveries, 0, messages).await,
            Body::GroupDeliver { group, messages } => deliver(&deliveries, group, messages).await,
            Body::Receipts(list) => facts.arrived(list),
            Body::Goodbye(r) => {
                reason = Some(r);
                break;
            }
            // Servers do not ping in v1.
            Body::Ping { .. } => {}
            body => {
                let waiter = pending.lock().expect("pending").remove(&frame.request_id);
                match (waiter, body) {
                    (Some(w), body) => {
                        let _ = w.send(body);
                    }
                    (None, Body::Error(r)) => {
                        reason = Some(r);
                        break;
                    }
                    (None, _) => {}
                }
            }
        }
    }
    *closed.lock().expect("closed") = Some(reason);
    facts.close();
    // Dropping the waiters fails every outstanding request.
    pending.lock().expect("pending").clear();
}

/// Hands a frame's messages to the application, in order.
async fn deliver(deliveries: &mpsc::Sender<Delivery>, stream: u64, messages: Vec<Message>) {
    for message in messages {
        if deliveries.send(Delivery { stream, message }).await.is_err() {
            break;
        }
    }
}

/// The read and write halves of a connection, plain or TLS.
pub type Rd = Box<dyn tokio::io::AsyncRead + std::marker::Send + Unpin>;
pub type Wr = Box<dyn tokio::io::AsyncWrite + std::marker::Send + Unpin>;

/// A welcomed session whose frames the caller reads and writes itself,
/// with no background task (a load generator's hot loop, a test that
/// needs the bytes): the connection's halves, the welcome, and whatever
/// was read past the welcome (`buffered`, to be parsed first).
pub struct RawSession {
    pub reader: Rd,
    pub writer: Wr,
    pub welcome: Welcome,
    pub buffered: BytesMut,
}

impl RawSession {
    /// Connects (TCP, or TLS when the config says so), says hello and
    /// waits for the welcome.
    pub async fn open(config: &ClientConfig) -> Result<RawSession, ClientError> {
        let (mut reader, mut writer) =
            tokio::time::timeout(config.connect_timeout, open_session(config))
                .await
                .map_err(|_| ClientError::Timeout)??;
        let mut buffered = BytesMut::with_capacity(4096);
        let welcome = handshake(config, &mut reader, &mut writer, &mut buffered).await?;
        Ok(RawSession {
            reader,
            writer,
            welcome,
            buffered,
        })
    }
}

/// TLS to the node: the rustls configuration (which CAs to trust, a client
/// certificate if the node asks for one) and the name the node's
/// certificate must carry.
#[derive(Clone)]
pub struct ClientTls {
    pub config: Arc<rustls::ClientConfig>,
    pub server_name: String,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

impl ClientTls {
    /// Trusts the CA certificates in the PEM file `ca_file`; TLS 1.3 and
    /// 1.2 (the node decides which it accepts). With `client_cert`, a
    /// (certificate chain, key) pair of PEM files presented when asked.
    pub fn from_files(
        ca_file: &std::path::Path,
        server_name: impl Into<String>,
        client_cert: Option<(&std::path::Path, &std::path::Path)>,
    ) -> Result<ClientTls, ClientError> {
        use rustls_pki_types::pem::PemObject;
        use rustls_pki_types::{CertificateDer, PrivateKeyDer};
        let bad = |what: String| ClientError::Protocol(what);
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(ca_file)
            .map_err(|e| bad(format!("{}: {e}", ca_file.display())))?
        {
            let cert = cert.map_err(|e| bad(format!("{}: {e}", ca_file.display())))?;
            roots
                .add(cert)
                .map_err(|e| bad(format!("{}: {e}", ca_file.display())))?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| bad(e.to_string()))?
            .with_root_certificates(roots);
        let config = match client_cert {
            None => builder.with_no_client_auth(),
            Some((chain, key)) => {
                let chain = CertificateDer::pem_file_iter(chain)
                    .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                    .map_err(|e| bad(format!("{}: {e}", chain.display())))?;
                let key = PrivateKeyDer::from_pem_file(key)
                    .map_err(|e| bad(format!("{}: {e}", key.display())))?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| bad(e.to_string()))?
            }
        };
        Ok(ClientTls {
            config: Arc::new(config),
            server_name: server_name.into(),
        })
    }
}

/// Opens the connection (TCP, then TLS when configured) and splits it.
async fn open_session(config: &ClientConfig) -> Result<(Rd, Wr), ClientError> {
    let stream = open(config).await?;
    stream.set_nodelay(true)?;
    let Some(tls) = &config.tls else {
        let (rd, wr) = stream.into_split();
        return Ok((Box::new(rd), Box::new(wr)));
    };
    let name = rustls_pki_types::ServerName::try_from(tls.server_name.clone())
        .map_err(|e| ClientError::Protocol(format!("server name {}: {e}", tls.server_name)))?;
    let stream = tokio_rustls::TlsConnector::from(tls.config.clone())
        .connect(name, stream)
        .await?;
    let (rd, wr) = tokio::io::split(stream);
    Ok((Box::new(rd), Box::new(wr)))
}

/// Opens the TCP connection, from `local_addr` when one is set.
async fn open(config: &ClientConfig) -> std::io::Result<TcpStream> {
    let Some(local) = config.local_addr else {
        return TcpStream::connect(&config.addr).await;
    };
    let mut last = None;
    for remote in tokio::net::lookup_host(&config.addr).await? {
        let socket = match remote {
            SocketAddr::V4(_) => TcpSocket::new_v4()?,
            SocketAddr::V6(_) => TcpSocket::new_v6()?,
        };
        socket.bind(SocketAddr::new(local, 0))?;
        match socket.connect(remote).await {
            Ok(stream) => return Ok(stream),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "the address resolved to nothing",
        )
    }))
}

async fn read_frame(
    rd: &mut Rd,
    buf: &mut BytesMut,
    max: u32,
) -> Result<Option<Frame>, ClientError> {
    loop {
        match decode(buf, max) {
            Ok(Some((frame, used))) => {
                buf.advance(used);
                return Ok(Some(frame));
            }
            Ok(None) => {}
            Err(e) => return Err(ClientError::Protocol(e.to_string())),
        }
        if buf.capacity() - buf.len() < 1024 {
            // Doubling up to 64 KiB: a busy session reads in large chunks,
            // an idle one keeps a few KiB.
            buf.reserve(buf.capacity().clamp(4096, 64 << 10));
        }
        if rd.read_buf(buf).await? == 0 {
            return Ok(None);
        }
    }
}

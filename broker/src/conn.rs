//! One client connection: handshake, a reader that dispatches requests to
//! shards, and a writer that owns the socket's write half.
//!
//! Data flow and bounds:
//! - reader -> shard: `ShardCmd` on the shard's bounded queue; each send
//!   first takes one of `limits.max_in_flight` permits, so a client that
//!   pipelines too much is simply not read (TCP backpressure).
//! - shard -> writer, replies: an unbounded channel whose length is bounded
//!   by those permits (the writer returns a permit per result).
//! - shard -> writer, live deliveries: a bounded queue
//!   (`limits.outbound_queue_len`). When it is full the shard marks the
//!   session `lagging` and stops pushing; the writer then reads the inbox
//!   from its last delivered sequence (catch-up) until it reaches the head,
//!   clears the flag and reads once more, so no message falls between the
//!   two paths. Deliveries are de-duplicated by sequence: the client sees
//!   each sequence once, in order.
//! - The same holds per stream for log-strategy groups: the writer keeps a
//!   cursor per group it reads (from the user's `U` rows and `C` cursors),
//!   catches each up from the group log, and ends a stream at the event
//!   that removed the user.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use courier_protocol::codec::peek_len;
use courier_protocol::*;
use courier_storage::InboxStore;
use tokio::sync::{mpsc, Semaphore};
use tracing::{debug, error, warn};

use crate::auth::AuthError;
use crate::groups::valid_user;
use crate::keys;
use crate::metrics::{AuthFailure, CloseReason, Metrics};
use crate::net::{NetRead, NetWrite, Transport};
use crate::shard::{
    to_wire, Completion, Delivery, Fanout, FanoutAnswer, GroupOpCmd, GroupSendCmd, OpResult, Reply,
    ReplyTo, SendCmd, SessionHandle, ShardCmd,
};
use crate::{now_ms, social, Node};

/// Messages read from the inbox per catch-up step.
const CATCH_UP_PAGE: usize = 256;
/// Messages per `Deliver` frame at most.
const DELIVER_BATCH_MAX: usize = 128;
/// The writer flushes once this much is encoded...
const WRITE_BUF_FLUSH: usize = 256 << 10;
/// ...or this many deliveries are waiting to be encoded.
const PENDING_MAX: usize = 4 * DELIVER_BATCH_MAX;
/// How long a closing connection drains the peer's input.
const LINGER: Duration = Duration::from_secs(1);
/// Messages per `FetchReply` at most.
const FETCH_LIMIT_MAX: usize = 1024;

enum ReadError {
    Closed,
    Io(std::io::Error),
    Decode(DecodeError),
}

struct FrameReader<R> {
    rd: R,
    buf: BytesMut,
    max_frame_len: u32,
}

impl<R: NetRead> FrameReader<R> {
    /// Next whole frame. Cancelling it may drop a partial frame (see
    /// `NetRead::read_some`); callers that cancel close the connection.
    async fn next_frame(&mut self) -> Result<Frame, ReadError> {
        loop {
            match decode(&self.buf, self.max_frame_len) {
                Ok(Some((frame, used))) => {
                    self.buf.advance(used);
                    return Ok(frame);
                }
                Ok(None) => {}
                Err(e) => return Err(ReadError::Decode(e)),
            }
            // Grow in steps, never by the peer's claimed length alone.
            let want = peek_len(&self.buf)
                .map(|l| (l as usize + 4).saturating_sub(self.buf.len()))
                .unwrap_or(0)
                .clamp(8192, 64 << 10);
            match self.rd.read_some(&mut self.buf, want).await {
                Ok(0) => return Err(ReadError::Closed),
                Ok(_) => {}
                Err(e) => return Err(ReadError::Io(e)),
            }
        }
    }
}

/// `frame` encoded into a buffer of its own, for a write that takes it.
fn encoded(frame: &Frame) -> BytesMut {
    let mut out = BytesMut::new();
    encode(frame, &mut out);
    out
}

async fn goodbye(wr: &mut impl NetWrite, code: ErrorCode, message: impl Into<String>) {
    let frame = Frame::new(0, Body::Goodbye(Reason::new(code, message)));
    let _ = wr.write_all(encoded(&frame)).await;
    wr.shutdown().await;
}

/// Says goodbye, then reads and discards what the peer still sends until it
/// closes (at most `LINGER`): closing a socket with unread input makes the
/// kernel reset the connection, which can destroy the goodbye in flight.
async fn bye<R: NetRead>(
    wr: &mut impl NetWrite,
    reader: &mut FrameReader<R>,
    code: ErrorCode,
    message: impl Into<String>,
) -> CloseReason {
    goodbye(wr, code, message).await;
    linger(&mut reader.rd).await;
    CloseReason::of_code(code)
}

async fn linger(rd: &mut impl NetRead) {
    // On the heap, not in the future: every connection's task would carry
    // these bytes for its whole life otherwise.
    let mut scratch = BytesMut::new();
    let _ = tokio::time::timeout(LINGER, async {
        while let Ok(n) = rd.read_some(&mut scratch, 4096).await {
            if n == 0 {
                break;
            }
            scratch.clear();
        }
    })
    .await;
}

/// Refuses a connection the node has no room for.
pub(crate) async fn refuse(stream: impl Transport, code: ErrorCode, message: &str) {
    let (mut rd, mut wr) = stream.split();
    goodbye(&mut wr, code, message).await;
    linger(&mut rd).await;
}

pub(crate) async fn serve(
    node: Arc<Node>,
    stream: impl Transport,
    peer: Option<std::net::SocketAddr>,
) {
    let reason = session(&node, stream, peer).await;
    node.metrics.closed(reason);
}

/// Counts an open session for as long as it lives.
struct OpenSession<'a>(&'a Metrics);

impl<'a> OpenSession<'a> {
    fn new(m: &'a Metrics) -> OpenSession<'a> {
        m.connections_open.inc();
        OpenSession(m)
    }
}

impl Drop for OpenSession<'_> {
    fn drop(&mut self) {
        self.0.connections_open.dec();
    }
}

/// One connection from accept to close; returns why it closed.
async fn session<T: Transport>(
    node: &Arc<Node>,
    stream: T,
    peer: Option<std::net::SocketAddr>,
) -> CloseReason {
    let (rd, mut wr) = stream.split();
    let limits = &node.config.limits;
    let mut reader = FrameReader {
        rd,
        buf: BytesMut::new(),
        max_frame_len: limits.max_frame_len,
    };

    // Handshake: the first frame must be a Hello, within the timeout.
    let handshake = Duration::from_millis(limits.handshake_timeout_ms);
    let first = match tokio::time::timeout(handshake, reader.next_frame()).await {
        Err(_) => {
            return bye(
                &mut wr,
                &mut reader,
                ErrorCode::HANDSHAKE_TIMEOUT,
                format!("no hello within {} ms", limits.handshake_timeout_ms),
            )
            .await
        }
        Ok(Err(ReadError::Closed | ReadError::Io(_))) => return CloseReason::HandshakeFailed,
        Ok(Err(ReadError::Decode(e))) => {
            bye(&mut wr, &mut reader, e.code(), e.to_string()).await;
            return CloseReason::HandshakeFailed;
        }
        Ok(Ok(frame)) => frame,
    };
    node.metrics.frame_in(first.body.frame_type());
    let Body::Hello(hello) = first.body else {
        bye(
            &mut wr,
            &mut reader,
            ErrorCode::UNEXPECTED_FRAME,
            "the first frame must be hello",
        )
        .await;
        return CloseReason::HandshakeFailed;
    };
    if hello.version != PROTOCOL_VERSION {
        return bye(
            &mut wr,
            &mut reader,
            ErrorCode::UNSUPPORTED_VERSION,
            format!(
                "version {} not supported; this server speaks {PROTOCOL_VERSION}",
                hello.version
            ),
        )
        .await;
    }
    if let Err(e) = node.key.verify(
        &hello.token,
        hello.user_id,
        hello.device_id,
        now_ms() / 1000,
    ) {
        debug!(?peer, user = hello.user_id, error = %e, "authentication failed");
        node.metrics.auth_failed(match e {
            AuthError::Expired => AuthFailure::Expired,
            AuthError::WrongIdentity => AuthFailure::WrongIdentity,
            AuthError::Malformed | AuthError::BadSignature => AuthFailure::BadToken,
        });
        let code = match e {
            AuthError::Expired => ErrorCode::TOKEN_EXPIRED,
            _ => ErrorCode::AUTH_FAILED,
        };
        return bye(&mut wr, &mut reader, code, e.to_string()).await;
    }
    if !valid_user(hello.user_id) {
        node.metrics.auth_failed(AuthFailure::InvalidUser);
        return bye(
            &mut wr,
            &mut reader,
            ErrorCode::AUTH_FAILED,
            "user ids are non-zero with the top bit clear",
        )
        .await;
    }
    let user = hello.user_id;
    let session_id = node.next_session.fetch_add(1, Ordering::Relaxed);

    // Register for live pushes; the shard answers with the inbox state in its
    // own order, so every message is either pushed or found by the writer's
    // first catch-up, and every earlier ack is reflected.
    let (dtx, drx) = mpsc::channel(limits.outbound_queue_len);
    let session = Arc::new(SessionHandle {
        id: session_id,
        deliveries: dtx,
        lagging: std::sync::atomic::AtomicBool::new(false),
        wake: tokio::sync::Notify::new(),
    });
    let (state_tx, state_rx) = tokio::sync::oneshot::channel();
    let registered = node
        .shards
        .send(
            user,
            ShardCmd::Register {
                user,
                session: session.clone(),
                state: state_tx,
            },
        )
        .await;
    let unregister = |node: Arc<Node>| async move {
        node.shards
            .send(user, ShardCmd::Unregister { user, session_id })
            .await;
    };
    let state = match (registered, state_rx.await) {
        (true, Ok(Ok(s))) => s,
        (true, Ok(Err(e))) => {
            error!(user, error = %e, "reading inbox state failed");
            unregister(node.clone()).await;
            return bye(&mut wr, &mut reader, ErrorCode::INTERNAL, "storage error").await;
        }
        _ => {
            return bye(
                &mut wr,
                &mut reader,
                ErrorCode::SHUTTING_DOWN,
                "server shutting down",
            )
            .await
        }
    };
    // Resume point: what the client says it has (never past the head), or
    // what it acknowledged. If that is older than what is retained, say so.
    let wanted_after = match hello.resume_after {
        Some(n) => n.min(state.head_seq),
        None => state.acked_seq,
    };
    let gap = wanted_after + 1 < state.oldest_seq;
    let start_after = wanted_after.max(state.oldest_seq - 1);
    let welcome = Welcome {
        version: PROTOCOL_VERSION,
        session_id,
        head_seq: state.head_seq,
        oldest_seq: state.oldest_seq,
        resume_from: start_after + 1,
        gap,
        server_time_ms: now_ms(),
        max_frame_len: limits.max_frame_len,
        max_batch: limits.max_batch,
        keepalive_ms: (limits.idle_timeout_ms / 3).min(u32::MAX as u64) as u32,
    };
    let welcome = Frame::new(first.request_id, Body::Welcome(welcome));
    if wr.write_all(encoded(&welcome)).await.is_err() {
        unregister(node.clone()).await;
        return CloseReason::IoError;
    }
    node.metrics.frame_out(frame_type::WELCOME);
    let _open = OpenSession::new(&node.metrics);
    debug!(
        ?peer,
        user,
        device = hello.device_id,
        session_id,
        start_after,
        gap,
        "session started"
    );

    let inflight = Arc::new(Semaphore::new(limits.max_in_flight));
    let (rtx, rrx) = mpsc::unbounded_channel();
    let writer = T::spawn_writer(Writer {
        wr,
        replies: rrx,
        deliveries: drx,
        deliveries_open: true,
        session: session.clone(),
        store: node.store.clone(),
        user,
        delivered: start_after,
        groups: HashMap::new(),
        rescan: true,
        inflight: inflight.clone(),
        out: BytesMut::new(),
        pending: Vec::new(),
        pending_group: Vec::new(),
        batches: HashMap::new(),
        max_frame_len: limits.max_frame_len as usize,
        metrics: node.metrics.clone(),
        pushed: Vec::new(),
    });

    let mut conn = Conn {
        node: node.clone(),
        user,
        device: hello.device_id,
        replies: rtx,
        inflight: inflight.clone(),
    };
    let idle = Duration::from_millis(limits.idle_timeout_ms);
    let mut closed_by = CloseReason::ClientClosed;
    let reason = loop {
        let next = tokio::select! {
            _ = node.shutdown.cancelled() => {
                break Some(Reason::new(ErrorCode::SHUTTING_DOWN, "server shutting down"));
            }
            r = tokio::time::timeout(idle, reader.next_frame()) => r,
        };
        match next {
            Err(_) => {
                break Some(Reason::new(
                    ErrorCode::IDLE_TIMEOUT,
                    format!("nothing received for {} ms", limits.idle_timeout_ms),
                ))
            }
            Ok(Err(ReadError::Closed)) => break None,
            Ok(Err(ReadError::Io(e))) => {
                debug!(user, error = %e, "read failed");
                closed_by = CloseReason::IoError;
                break None;
            }
            Ok(Err(ReadError::Decode(e))) => {
                debug!(user, error = %e, "bad frame; closing");
                break Some(Reason::new(e.code(), e.to_string()));
            }
            Ok(Ok(frame)) => {
                if !conn.handle(frame).await {
                    break Some(Reason::new(
                        ErrorCode::SHUTTING_DOWN,
                        "server shutting down",
                    ));
                }
            }
        }
    };
    if reason.as_ref().map(|r| r.code) == Some(ErrorCode::SHUTTING_DOWN) {
        // Finish what was accepted: wait until every in-flight send is answered.
        let grace = Duration::from_millis(limits.shutdown_grace_ms);
        let all = limits.max_in_flight as u32;
        if tokio::time::timeout(grace, inflight.acquire_many(all))
            .await
            .is_err()
        {
            warn!(
                user,
                "in-flight sends not answered within the shutdown grace"
            );
        }
    }
    let server_closed = reason.is_some();
    let server_reason = reason.as_ref().map(|r| r.code);
    let _ = conn.replies.send(Reply::Close(reason));
    drop(conn);
    unregister(node.clone()).await;
    let _ = writer.await;
    if server_closed {
        linger(&mut reader.rd).await;
    }
    debug!(user, session_id, "session ended");
    if let Some(r) = server_reason {
        closed_by = CloseReason::of_code(r);
    }
    closed_by
}

/// The reader side's per-connection state.
struct Conn {
    node: Arc<Node>,
    user: u64,
    device: u32,
    replies: mpsc::UnboundedSender<Reply>,
    inflight: Arc<Semaphore>,
}

impl Conn {
    fn error(&self, request_id: u32, code: ErrorCode, message: impl Into<String>) {
        let _ = self.replies.send(Reply::frame(
            request_id,
            Body::Error(Reason::new(code, message)),
        ));
    }

    /// Checks a send and says where it goes.
    fn validate(&self, s: &Send) -> Result<Destination, (ErrorCode, String)> {
        match s.destination {
            Destination::User(id) if !valid_user(id) => {
                return Err((
                    ErrorCode::INVALID_DESTINATION,
                    format!("{id:#x} is not a user id"),
                ))
            }
            Destination::Group(id) if id & GROUP_ID_BIT == 0 => {
                return Err((
                    ErrorCode::INVALID_DESTINATION,
                    format!("{id:#x} is not a group id"),
                ))
            }
            Destination::List(0) => {
                return Err((ErrorCode::INVALID_DESTINATION, "list id 0".into()))
            }
            _ => {}
        }
        if !matches!(s.kind, MessageKind::Chat | MessageKind::Template) {
            return Err((
                ErrorCode::KIND_NOT_ALLOWED,
                format!("kind {:?} is not sent with Send", s.kind),
            ));
        }
        let max = self.node.config.limits.max_payload_len as usize;
        if s.payload.len() > max {
            return Err((
                ErrorCode::PAYLOAD_TOO_LARGE,
                format!("payload of {} bytes exceeds {max}", s.payload.len()),
            ));
        }
        Ok(s.destination)
    }

    /// Takes an in-flight permit and queues the send on the shard that owns
    /// its destination. Returns false if the shards have stopped.
    async fn dispatch(&self, s: Send, request_id: u32, index: Option<u16>) -> bool {
        match self.inflight.acquire().await {
            Ok(p) => p.forget(), // returned by the writer when the result is written
            Err(_) => return false,
        }
        let reply = ReplyTo {
            tx: self.replies.clone(),
            request_id,
            index,
        };
        let (key, cmd) = match s.destination {
            Destination::User(recipient) => (
                recipient,
                ShardCmd::Send(SendCmd {
                    sender: self.user,
                    sender_device: self.device,
                    recipient,
                    client_msg_id: s.client_msg_id,
                    destination: s.destination,
                    scope: 0,
                    kind: s.kind,
                    payload: s.payload,
                    done: Completion::Reply(reply),
                    accepted: Instant::now(),
                }),
            ),
            Destination::Group(group) => (
                group,
                ShardCmd::GroupSend(GroupSendCmd {
                    group,
                    sender: self.user,
                    sender_device: self.device,
                    client_msg_id: s.client_msg_id,
                    kind: s.kind,
                    payload: s.payload,
                    reply,
                    accepted: Instant::now(),
                }),
            ),
            Destination::List(list) => return Box::pin(self.broadcast(s, list, request_id)).await,
        };
        if self.node.shards.send(key, cmd).await {
            true
        } else {
            self.inflight.add_permits(1);
            false
        }
    }

    /// A send to a broadcast list: one one-to-one copy per consenting
    /// recipient (scoped idempotency keys), answered when all are durable.
    /// Holds the permit `dispatch` took until the answer is written.
    async fn broadcast(&self, s: Send, list: u64, request_id: u32) -> bool {
        let store = self.node.store.clone();
        let sender = self.user;
        let lookup = tokio::task::spawn_blocking(move || {
            let recipients = social::get_list(&*store, sender, list)?;
            social::consenting(&*store, sender, &recipients).map_err(|e| {
                error!(error = %e, "consent lookup failed");
                (ErrorCode::INTERNAL, "storage error".to_owned())
            })
        })
        .await
        .unwrap_or_else(|_| Err((ErrorCode::INTERNAL, "storage error".into())));
        let (recipients, skipped) = match lookup {
            Ok(v) => v,
            Err((code, _)) => {
                let _ = self.replies.send(Reply::Broadcast {
                    request_id,
                    ack: Err(code),
                });
                return true;
            }
        };
        let fanout = Fanout::new(
            recipients.len(),
            FanoutAnswer::Broadcast {
                tx: self.replies.clone(),
                request_id,
                ack: BroadcastAck {
                    client_msg_id: s.client_msg_id,
                    server_msg_id: 0,
                    timestamp_ms: 0,
                    delivered: 0,
                    skipped: skipped as u16,
                    duplicate: false,
                },
            },
        );
        if recipients.is_empty() {
            fanout.answer();
            return true;
        }
        let accepted = Instant::now();
        for recipient in recipients {
            let cmd = ShardCmd::Send(SendCmd {
                sender: self.user,
                sender_device: self.device,
                recipient,
                client_msg_id: s.client_msg_id,
                destination: Destination::List(list),
                scope: recipient,
                kind: s.kind,
                payload: s.payload.clone(),
                done: Completion::Fanout(fanout.clone()),
                accepted,
            });
            if !self.node.shards.send(recipient, cmd).await {
                return false;
            }
        }
        true
    }

    /// Sends `cmd` to the shard owning `key` and waits for its answer.
    async fn ask<T>(
        &self,
        key: u64,
        make: impl FnOnce(tokio::sync::oneshot::Sender<OpResult<T>>) -> ShardCmd,
    ) -> Option<OpResult<T>> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        if !self.node.shards.send(key, make(tx)).await {
            return None;
        }
        rx.await.ok()
    }

    /// Runs a blocking store operation and answers with its frame.
    async fn blocking<T: std::marker::Send + 'static>(
        &self,
        rid: u32,
        f: impl FnOnce(&dyn courier_storage::InboxStore) -> OpResult<T> + std::marker::Send + 'static,
        reply: impl FnOnce(T) -> Body,
    ) {
        let store = self.node.store.clone();
        match tokio::task::spawn_blocking(move || f(&*store)).await {
            Ok(Ok(v)) => {
                let _ = self.replies.send(Reply::frame(rid, reply(v)));
            }
            Ok(Err((code, msg))) => self.error(rid, code, msg),
            Err(_) => self.error(rid, ErrorCode::INTERNAL, "storage error"),
        }
    }

    /// Handles one request; false when the node is stopping.
    /// Handles one frame. Sends, acks and marks (the frequent ones) run
    /// here; everything else runs in `handle_other`, boxed: its future is
    /// large, and boxing it keeps every connection's task small while the
    /// connection waits (an idle connection should cost little memory).
    async fn handle(&mut self, frame: Frame) -> bool {
        let rid = frame.request_id;
        self.node.metrics.frame_in(frame.body.frame_type());
        match frame.body {
            Body::Send(s) => match self.validate(&s) {
                Ok(_) => return self.dispatch(s, rid, None).await,
                Err((code, msg)) => {
                    self.node.metrics.rejected(code);
                    self.error(rid, code, msg);
                    true
                }
            },
            Body::Ack { up_to_seq } => {
                let user = self.user;
                let cmd = ShardCmd::Mark {
                    user,
                    stream: 0,
                    up_to_seq,
                    status: ReceiptStatus::Delivered,
                };
                return self.node.shards.send(user, cmd).await;
            }
            Body::Mark(m) => {
                if (m.stream != 0 && m.stream & GROUP_ID_BIT == 0)
                    || m.status == ReceiptStatus::Viewed
                {
                    self.error(
                        rid,
                        ErrorCode::INVALID_REQUEST,
                        "mark a stream (0 or a group) delivered or read; views use StatusView",
                    );
                    return true;
                }
                let user = self.user;
                let cmd = ShardCmd::Mark {
                    user,
                    stream: m.stream,
                    up_to_seq: m.up_to_seq,
                    status: m.status,
                };
                return self.node.shards.send(user, cmd).await;
            }
            body => Box::pin(self.handle_other(Frame::new(rid, body))).await,
        }
    }

    async fn handle_other(&mut self, frame: Frame) -> bool {
        let rid = frame.request_id;
        match frame.body {
            Body::SendBatch(sends) => {
                let max = self.node.config.limits.max_batch;
                if sends.len() > max as usize {
                    self.error(
                        rid,
                        ErrorCode::BATCH_TOO_LARGE,
                        format!("{} items; at most {max}", sends.len()),
                    );
                    return true;
                }
                let _ = self.replies.send(Reply::BatchStart {
                    request_id: rid,
                    count: sends.len() as u16,
                });
                for (i, s) in sends.into_iter().enumerate() {
                    let index = Some(i as u16);
                    let checked = self.validate(&s).and_then(|d| match d {
                        Destination::List(_) => Err((
                            ErrorCode::DESTINATION_UNSUPPORTED,
                            "broadcast lists are sent with Send".into(),
                        )),
                        d => Ok(d),
                    });
                    match checked {
                        Ok(_) => {
                            if !self.dispatch(s, rid, index).await {
                                return false;
                            }
                        }
                        Err((code, _)) => {
                            // The writer returns a permit per result: take one.
                            match self.inflight.acquire().await {
                                Ok(p) => p.forget(),
                                Err(_) => return false,
                            }
                            let _ = self.replies.send(Reply::SendResult {
                                request_id: rid,
                                index,
                                result: SendResult {
                                    client_msg_id: s.client_msg_id,
                                    code,
                                    server_msg_id: 0,
                                    seq: 0,
                                    timestamp_ms: 0,
                                    duplicate: false,
                                },
                            });
                        }
                    }
                }
            }
            Body::Group(g) => {
                let group = if g.op == GroupOp::Create {
                    if g.group != 0 {
                        self.error(rid, ErrorCode::INVALID_REQUEST, "create with group 0");
                        return true;
                    }
                    self.node.new_group_id()
                } else if g.group & GROUP_ID_BIT == 0 {
                    self.error(rid, ErrorCode::INVALID_REQUEST, "not a group id");
                    return true;
                } else {
                    g.group
                };
                let actor = self.user;
                let answer = self
                    .ask(group, |reply| {
                        ShardCmd::GroupOp(GroupOpCmd {
                            group,
                            actor,
                            op: g.op,
                            users: g.users,
                            reply,
                        })
                    })
                    .await;
                match answer {
                    Some(Ok(info)) => {
                        let _ = self.replies.send(Reply::frame(rid, Body::GroupInfo(info)));
                    }
                    Some(Err((code, msg))) => self.error(rid, code, msg),
                    None => return false,
                }
            }
            Body::ReceiptQuery { group, seq } => {
                let asker = self.user;
                let answer = self
                    .ask(group, |reply| ShardCmd::ReceiptQuery {
                        group,
                        seq,
                        asker,
                        reply,
                    })
                    .await;
                match answer {
                    Some(Ok(c)) => {
                        let _ = self.replies.send(Reply::frame(rid, Body::ReceiptCounts(c)));
                    }
                    Some(Err((code, msg))) => self.error(rid, code, msg),
                    None => return false,
                }
            }
            Body::Contacts(c) => {
                let (user, max) = (self.user, self.node.config.social.max_contacts);
                self.blocking(
                    rid,
                    move |store| social::contacts(store, user, c.op, &c.users, max),
                    move |users| Body::Users(Users { id: user, users }),
                )
                .await;
            }
            Body::List(l) => {
                let (user, max) = (self.user, self.node.config.social.max_list_len);
                let list = l.list;
                self.blocking(
                    rid,
                    move |store| social::list(store, user, l.op, l.list, &l.users, max),
                    move |users| match users {
                        Some(users) => Body::Users(Users { id: list, users }),
                        None => Body::Done,
                    },
                )
                .await;
            }
            Body::StatusPost(p) => {
                let social = &self.node.config.social;
                let (ttl, max) = (social.status_ttl_ms, social.max_statuses);
                let max_payload = self.node.config.limits.max_payload_len as usize;
                if p.payload.len() > max_payload {
                    self.error(
                        rid,
                        ErrorCode::PAYLOAD_TOO_LARGE,
                        "status payload too large",
                    );
                    return true;
                }
                let (poster, id) = (self.user, self.node.new_group_id() & !GROUP_ID_BIT);
                self.blocking(
                    rid,
                    move |store| {
                        social::post_status(
                            store,
                            poster,
                            id,
                            now_ms(),
                            ttl,
                            max,
                            p.audience,
                            p.users,
                            p.payload,
                        )
                    },
                    move |expires_at_ms| Body::StatusPosted {
                        status_id: id,
                        expires_at_ms,
                    },
                )
                .await;
            }
            Body::StatusFetch => {
                let viewer = self.user;
                self.blocking(
                    rid,
                    move |store| social::fetch_statuses(store, viewer, now_ms()),
                    Body::StatusList,
                )
                .await;
            }
            Body::StatusView { poster, status_id } => {
                return self.view_status(rid, poster, status_id).await;
            }
            Body::Fetch(f) => {
                if f.user_id != self.user {
                    self.error(
                        rid,
                        ErrorCode::FORBIDDEN,
                        "a session reads only its own inbox",
                    );
                    return true;
                }
                self.fetch(rid, f).await;
            }
            Body::Ping { nonce } => {
                let _ = self.replies.send(Reply::frame(rid, Body::Pong { nonce }));
            }
            Body::Pong { .. } => {}
            other => self.error(
                rid,
                ErrorCode::UNEXPECTED_FRAME,
                format!("{} is not a client request here", other.name()),
            ),
        }
        true
    }

    /// Records a status view as a `viewed` receipt in the poster's inbox
    /// (once per viewer and status), then answers `Done`.
    async fn view_status(&self, rid: u32, poster: u64, status_id: u64) -> bool {
        let store = self.node.store.clone();
        let viewer = self.user;
        let allowed = tokio::task::spawn_blocking(move || {
            social::can_view(&*store, viewer, poster, status_id, now_ms())
        })
        .await
        .unwrap_or_else(|_| Err((ErrorCode::INTERNAL, "storage error".into())));
        match allowed {
            Ok(true) => {}
            Ok(false) => {
                self.error(rid, ErrorCode::NO_SUCH_STATUS, "no such status for you");
                return true;
            }
            Err((code, msg)) => {
                self.error(rid, code, msg);
                return true;
            }
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        let cmd = ShardCmd::Send(SendCmd {
            sender: viewer,
            sender_device: self.device,
            recipient: poster,
            client_msg_id: status_id,
            destination: Destination::User(poster),
            scope: poster,
            kind: MessageKind::Receipt,
            payload: ReceiptPayload {
                status: ReceiptStatus::Viewed,
                reader: viewer,
                messages: vec![(status_id, status_id)],
            }
            .encode(),
            done: Completion::Notify(tx),
            accepted: Instant::now(),
        });
        if !self.node.shards.send(poster, cmd).await {
            return false;
        }
        match rx.await {
            Ok(true) => {
                let _ = self.replies.send(Reply::frame(rid, Body::Done));
            }
            _ => self.error(rid, ErrorCode::INTERNAL, "storage error"),
        }
        true
    }

    async fn fetch(&self, rid: u32, f: Fetch) {
        let store = self.node.store.clone();
        let user = self.user;
        let limit = (f.limit as usize).min(FETCH_LIMIT_MAX);
        let budget = self.node.config.limits.max_frame_len as usize - 64;
        let read = tokio::task::spawn_blocking(move || {
            let state = store.state(user)?;
            let mut messages = Vec::new();
            let mut size = HEADER_LEN + 2 + 16;
            for m in store.read_after(user, f.after_seq, limit)? {
                let m = to_wire(m)?;
                size += MESSAGE_FIXED_LEN + m.payload.len();
                if size > budget {
                    break;
                }
                messages.push(m);
            }
            Ok::<_, courier_storage::StoreError>(FetchReply {
                head_seq: state.head_seq,
                oldest_seq: state.oldest_seq,
                messages,
            })
        })
        .await;
        match read {
            Ok(Ok(reply)) => {
                let _ = self
                    .replies
                    .send(Reply::frame(rid, Body::FetchReply(reply)));
            }
            Ok(Err(e)) => {
                error!(user, error = %e, "fetch failed");
                self.error(rid, ErrorCode::INTERNAL, "storage error");
            }
            Err(_) => self.error(rid, ErrorCode::INTERNAL, "storage error"),
        }
    }
}

/// The write side: the only task that writes to the socket.
pub(crate) struct Writer<W> {
    wr: W,
    replies: mpsc::UnboundedReceiver<Reply>,
    deliveries: mpsc::Receiver<(Delivery, Instant)>,
    deliveries_open: bool,
    session: Arc<SessionHandle>,
    store: Arc<dyn InboxStore>,
    user: u64,
    /// Highest sequence handed to the socket (or queued in `pending`).
    delivered: u64,
    /// Log-strategy groups this session reads, by group id.
    groups: HashMap<u64, GroupStream>,
    /// Re-read the user's group rows before the next catch-up.
    rescan: bool,
    inflight: Arc<Semaphore>,
    out: BytesMut,
    pending: Vec<Arc<Message>>,
    pending_group: Vec<(u64, Arc<Message>)>,
    /// Results of batches in progress: slots and how many are still missing.
    batches: HashMap<u32, (Vec<Option<SendResult>>, usize)>,
    max_frame_len: usize,
    metrics: Arc<Metrics>,
    /// Accept times of the live deliveries in `out`, observed once written.
    pushed: Vec<Instant>,
}

/// One log-strategy group as a session reads it.
struct GroupStream {
    /// Highest group sequence handed to the socket (or queued).
    delivered: u64,
    /// Last group sequence this user may see (`keys::NONE` while a member).
    end: u64,
}

impl GroupStream {
    /// Takes `m` as the next message of the stream; false if it is not for
    /// this user (its own message, or past the end). Ends the stream at the
    /// event that removed the user.
    fn take(&mut self, user: u64, m: &Message) -> bool {
        self.delivered = m.seq;
        if m.kind == MessageKind::System {
            if let Ok(ev) = GroupEvent::decode(&m.payload) {
                if matches!(ev.kind, GroupEventKind::Removed | GroupEventKind::Left)
                    && ev.users.contains(&user)
                {
                    self.end = m.seq;
                }
            }
            return true;
        }
        m.sender != user
    }
}

enum Step {
    Continue,
    Close,
}

impl<W: NetWrite> Writer<W> {
    pub(crate) async fn run(mut self) {
        if let Err(e) = self.run_inner().await {
            debug!(user = self.user, error = %e, "writer stopped");
        }
        self.wr.shutdown().await;
    }

    async fn run_inner(&mut self) -> std::io::Result<()> {
        let mut need_catch_up = true;
        loop {
            if need_catch_up || self.session.lagging.load(Ordering::SeqCst) {
                self.catch_up().await?;
                need_catch_up = false;
            }
            let step = tokio::select! {
                biased;
                r = self.replies.recv() => match r {
                    Some(r) => self.on_reply(r),
                    None => Step::Close,
                },
                d = self.deliveries.recv(), if self.deliveries_open => {
                    match d {
                        Some(m) => need_catch_up |= self.on_delivery(m),
                        None => self.deliveries_open = false,
                    }
                    Step::Continue
                }
                _ = self.session.wake.notified() => Step::Continue,
            };
            if let Step::Close = step {
                return self.flush().await;
            }
            // Take whatever else is ready, alternating so neither kind starves,
            // so that one write carries many frames.
            while self.out.len() < WRITE_BUF_FLUSH && self.pending.len() < PENDING_MAX {
                let mut progressed = false;
                if let Ok(r) = self.replies.try_recv() {
                    if let Step::Close = self.on_reply(r) {
                        return self.flush().await;
                    }
                    progressed = true;
                }
                if let Ok(m) = self.deliveries.try_recv() {
                    need_catch_up |= self.on_delivery(m);
                    progressed = true;
                }
                if !progressed {
                    break;
                }
            }
            self.flush().await?;
        }
    }

    /// Accepts a live delivery; returns true if a gap needs a catch-up.
    fn on_delivery(&mut self, (d, accepted): (Delivery, Instant)) -> bool {
        let m = match d {
            Delivery::Inbox(m) => m,
            Delivery::Group(g, m) => {
                let Some(stream) = self.groups.get_mut(&g) else {
                    // A group this session does not read yet (just joined,
                    // or just switched to the log strategy).
                    self.rescan = true;
                    return true;
                };
                if m.seq <= stream.delivered {
                    return false;
                }
                if m.seq > stream.end {
                    // Pushed past the event that removed this user: the
                    // user was added again. Re-read where the stream starts.
                    self.rescan = true;
                    return true;
                }
                if m.seq != stream.delivered + 1 {
                    return true;
                }
                if stream.take(self.user, &m) {
                    self.pending_group.push((g, m));
                    self.metrics.deliveries_live.inc();
                    self.pushed.push(accepted);
                }
                return false;
            }
        };
        if m.seq <= self.delivered {
            false // already sent by a catch-up
        } else if m.seq == self.delivered + 1 {
            self.delivered = m.seq;
            self.pending.push(m);
            self.metrics.deliveries_live.inc();
            self.pushed.push(accepted);
            false
        } else {
            true
        }
    }

    fn on_reply(&mut self, r: Reply) -> Step {
        match r {
            Reply::SendResult {
                request_id,
                index,
                result,
            } => {
                self.inflight.add_permits(1);
                if result.code == ErrorCode::OK {
                    self.metrics.accepted();
                } else {
                    self.metrics.rejected(result.code);
                }
                match index {
                    None if result.code == ErrorCode::OK => self.encode(&Frame::new(
                        request_id,
                        Body::SendAck(SendAck {
                            client_msg_id: result.client_msg_id,
                            server_msg_id: result.server_msg_id,
                            seq: result.seq,
                            timestamp_ms: result.timestamp_ms,
                            duplicate: result.duplicate,
                        }),
                    )),
                    None => self.encode(&Frame::new(
                        request_id,
                        Body::Error(Reason::new(result.code, result.code.description())),
                    )),
                    Some(i) => {
                        let done = match self.batches.get_mut(&request_id) {
                            Some((slots, missing)) => {
                                if let Some(slot @ None) = slots.get_mut(i as usize) {
                                    *slot = Some(result);
                                    *missing -= 1;
                                }
                                *missing == 0
                            }
                            None => false,
                        };
                        if done {
                            let (slots, _) = self.batches.remove(&request_id).expect("present");
                            let results = slots.into_iter().map(|s| s.expect("filled")).collect();
                            self.encode(&Frame::new(request_id, Body::SendBatchAck(results)));
                        }
                    }
                }
                Step::Continue
            }
            Reply::Broadcast { request_id, ack } => {
                self.inflight.add_permits(1);
                match &ack {
                    Ok(_) => self.metrics.accepted(),
                    Err(code) => self.metrics.rejected(*code),
                }
                let body = match ack {
                    Ok(ack) => Body::BroadcastAck(ack),
                    Err(code) => Body::Error(Reason::new(code, code.description())),
                };
                self.encode(&Frame::new(request_id, body));
                Step::Continue
            }
            Reply::BatchStart { request_id, count } => {
                self.batches
                    .insert(request_id, (vec![None; count as usize], count as usize));
                Step::Continue
            }
            Reply::Frame(f) => {
                self.encode(&f);
                Step::Continue
            }
            Reply::Close(reason) => {
                if let Some(reason) = reason {
                    self.encode(&Frame::new(0, Body::Goodbye(reason)));
                }
                Step::Close
            }
        }
    }

    fn encode(&mut self, f: &Frame) {
        self.encode_pending();
        self.metrics.frame_out(f.body.frame_type());
        encode(f, &mut self.out);
    }

    /// Encodes pending deliveries as `Deliver` frames within the frame limit.
    fn encode_pending(&mut self) {
        let budget = self.max_frame_len / 2;
        let mut start = 0;
        while start < self.pending.len() {
            let mut end = start;
            let mut size = HEADER_LEN + 2;
            while end < self.pending.len() && end - start < DELIVER_BATCH_MAX {
                let add = MESSAGE_FIXED_LEN + self.pending[end].payload.len();
                if end > start && size + add > budget {
                    break;
                }
                size += add;
                end += 1;
            }
            encode_deliver(0, &self.pending[start..end], &mut self.out);
            self.metrics.frame_out(frame_type::DELIVER);
            start = end;
        }
        self.pending.clear();
        // Group log messages: one `GroupDeliver` per run of one group.
        let mut i = 0;
        while i < self.pending_group.len() {
            let g = self.pending_group[i].0;
            let mut messages = Vec::new();
            let mut size = HEADER_LEN + 10;
            while i < self.pending_group.len()
                && self.pending_group[i].0 == g
                && messages.len() < DELIVER_BATCH_MAX
            {
                let m = &self.pending_group[i].1;
                let add = MESSAGE_FIXED_LEN + m.payload.len();
                if !messages.is_empty() && size + add > budget {
                    break;
                }
                size += add;
                messages.push((**m).clone());
                i += 1;
            }
            encode(
                &Frame::new(0, Body::GroupDeliver { group: g, messages }),
                &mut self.out,
            );
            self.metrics.frame_out(frame_type::GROUP_DELIVER);
        }
        self.pending_group.clear();
    }

    async fn flush(&mut self) -> std::io::Result<()> {
        self.encode_pending();
        if !self.out.is_empty() {
            // Hand the buffer over and start the next one empty: the writer
            // now waits, and a waiting session should cost no write buffer.
            self.wr.write_all(std::mem::take(&mut self.out)).await?;
        }
        if !self.pushed.is_empty() {
            let now = Instant::now();
            for accepted in self.pushed.drain(..) {
                self.metrics
                    .accept_to_push
                    .observe(now.saturating_duration_since(accepted).as_secs_f64());
            }
        }
        Ok(())
    }

    /// Reads the inbox after `delivered` up to its head and sends it, until
    /// no push was missed in between (see the module comment).
    async fn catch_up(&mut self) -> std::io::Result<()> {
        self.flush().await?;
        loop {
            self.session.lagging.store(false, Ordering::SeqCst);
            loop {
                let store = self.store.clone();
                let (user, after) = (self.user, self.delivered);
                let page = tokio::task::spawn_blocking(move || {
                    store
                        .read_after(user, after, CATCH_UP_PAGE)?
                        .into_iter()
                        .map(to_wire)
                        .collect::<Result<Vec<_>, _>>()
                })
                .await
                .map_err(std::io::Error::other)?;
                let page = match page {
                    Ok(p) => p,
                    Err(e) => {
                        error!(user, error = %e, "catch-up read failed; closing session");
                        self.encode(&Frame::new(
                            0,
                            Body::Goodbye(Reason::new(ErrorCode::INTERNAL, "storage error")),
                        ));
                        self.flush().await?;
                        return Err(std::io::Error::other("storage error"));
                    }
                };
                let n = page.len();
                self.metrics.deliveries_catch_up.inc_by(n as u64);
                for m in page {
                    debug_assert!(m.seq > self.delivered);
                    self.delivered = m.seq;
                    self.pending.push(Arc::new(m));
                }
                self.flush().await?;
                if n < CATCH_UP_PAGE {
                    break;
                }
            }
            if let Err(e) = self.catch_up_groups().await {
                error!(user = self.user, error = %e, "group catch-up failed; closing session");
                self.encode(&Frame::new(
                    0,
                    Body::Goodbye(Reason::new(ErrorCode::INTERNAL, "storage error")),
                ));
                self.flush().await?;
                return Err(std::io::Error::other("storage error"));
            }
            if !self.session.lagging.load(Ordering::SeqCst) {
                return Ok(());
            }
        }
    }

    /// Reads the user's group rows: which log-strategy groups to read, from
    /// where (the confirmed cursor, or where the user joined) and to where.
    async fn load_streams(&mut self) -> Result<(), courier_storage::StoreError> {
        let store = self.store.clone();
        let user = self.user;
        let rows = tokio::task::spawn_blocking(move || {
            let mut out = Vec::new();
            for (k, v) in store.scan(&keys::user_groups(user), usize::MAX)? {
                let (Some(g), Some(joined), Some(left), Some(log_from)) = (
                    keys::last_u64(&k),
                    keys::be_u64(&v, 0),
                    keys::be_u64(&v, 8),
                    keys::be_u64(&v, 16),
                ) else {
                    continue;
                };
                if log_from == keys::NONE {
                    continue;
                }
                let confirmed = match store.get(&keys::cursor(g, user))? {
                    Some(c) => keys::be_u64(&c, 0).unwrap_or(0),
                    None => 0,
                };
                out.push((g, joined.max(log_from), left, confirmed));
            }
            Ok::<_, courier_storage::StoreError>(out)
        })
        .await
        .map_err(|e| courier_storage::StoreError::Io(e.to_string()))??;
        for (g, from, left, confirmed) in rows {
            let fresh = GroupStream {
                delivered: confirmed.max(from - 1),
                end: left,
            };
            match self.groups.get_mut(&g) {
                // Removed earlier in this session and added again since.
                Some(s) if from > s.end => *s = fresh,
                Some(s) => s.end = s.end.min(left),
                None => {
                    self.groups.insert(g, fresh);
                }
            }
        }
        Ok(())
    }

    /// Reads every group stream up to its log's head (or its end).
    async fn catch_up_groups(&mut self) -> Result<(), courier_storage::StoreError> {
        if self.rescan {
            self.load_streams().await?;
            self.rescan = false;
        }
        let groups: Vec<u64> = self.groups.keys().copied().collect();
        for g in groups {
            loop {
                let stream = &self.groups[&g];
                if stream.delivered >= stream.end {
                    break;
                }
                let store = self.store.clone();
                let after = stream.delivered;
                let page = tokio::task::spawn_blocking(move || {
                    store
                        .read_after(g, after, CATCH_UP_PAGE)?
                        .into_iter()
                        .map(to_wire)
                        .collect::<Result<Vec<_>, _>>()
                })
                .await
                .map_err(|e| courier_storage::StoreError::Io(e.to_string()))??;
                let n = page.len();
                let stream = self.groups.get_mut(&g).expect("present");
                for m in page {
                    if m.seq > stream.end {
                        break;
                    }
                    if stream.take(self.user, &m) {
                        self.pending_group.push((g, Arc::new(m)));
                        self.metrics.deliveries_catch_up.inc();
                    }
                }
                self.flush()
                    .await
                    .map_err(|e| courier_storage::StoreError::Io(e.to_string()))?;
                if n < CATCH_UP_PAGE {
                    break;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn a_waiting_epoll_reader_holds_no_buffer() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut peer = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (node, _) = listener.accept().await.unwrap();
        let (rd, _wr) = node.into_split();
        let mut reader = FrameReader {
            rd,
            buf: BytesMut::new(),
            max_frame_len: 1 << 20,
        };
        let ping = |nonce| encode_to_bytes(&Frame::new(1, Body::Ping { nonce }));
        peer.write_all(&ping(1)).await.unwrap();
        assert!(matches!(
            reader.next_frame().await.ok().map(|f| f.body),
            Some(Body::Ping { nonce: 1 })
        ));
        // Nothing more comes. The read that took the frame left the
        // socket's readiness set, so the next wait starts with a read that
        // finds nothing: the reader must give its buffer back before it
        // waits again, or every quiet connection keeps 8 KiB.
        let waited = tokio::time::timeout(Duration::from_millis(100), reader.next_frame()).await;
        assert!(waited.is_err(), "nothing was sent");
        assert_eq!(reader.buf.capacity(), 0, "a waiting reader holds a buffer");
        // And the next frame is read as usual.
        peer.write_all(&ping(2)).await.unwrap();
        assert!(matches!(
            reader.next_frame().await.ok().map(|f| f.body),
            Some(Body::Ping { nonce: 2 })
        ));
    }
}

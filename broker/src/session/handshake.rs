//! The start of a session: a `Hello` within the timeout, the version and
//! the token checked, the session registered with its user's shard, and the
//! `Welcome` that says where delivery resumes.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use courier_protocol::error::with_retry_after;
use courier_protocol::{frame_type, Body, ErrorCode, Frame, Hello, Welcome, PROTOCOL_VERSION};
use courier_storage::InboxState;
use tokio::sync::{oneshot, Notify};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, warn};

use super::forward::Forward;
use super::frames::{encoded, FrameReader, ReadError};
use crate::auth::AuthError;
use crate::cluster::route::RETRY_AFTER_MS;
use crate::error::BrokerError;
use crate::mailbox;
use crate::metrics::{AuthFailure, CloseReason};
use crate::net::seam::{NetRead, NetWrite};
use crate::node::Node;
use crate::shard::messages::{Delivery, RegisterCmd, SessionHandle, ShardCmd};
use crate::state::ids::valid_user;

/// A session that has been welcomed.
pub(crate) struct Started {
    pub user: u64,
    pub device: u32,
    pub session_id: u64,
    /// The handle the user's shard pushes to.
    pub handle: Arc<SessionHandle>,
    pub deliveries: mailbox::Receiver<(Delivery, std::time::Instant)>,
    /// Delivery resumes after this inbox sequence.
    pub start_after: u64,
    /// The session takes receipt facts, after this version.
    pub receipts_after: Option<u64>,
}

/// How a handshake that passed goes on.
pub(crate) enum Begun {
    /// Welcomed here.
    Here(Started),
    /// The user's shard is another cluster node's: carried there.
    Forward(Forward),
}

/// Runs the handshake; on failure the client has been told why (where the
/// stream still allows it) and the reason to count is returned.
pub(crate) async fn start<R: NetRead>(
    node: &Arc<Node>,
    reader: &mut FrameReader<R>,
    wr: &mut impl NetWrite,
    peer: Option<std::net::SocketAddr>,
    evicted: &CancellationToken,
) -> Result<Begun, CloseReason> {
    let (request_id, hello) = read_hello(node, reader, wr, evicted).await?;
    if let Err((code, message)) = authenticate(node, &hello, peer) {
        return Err(reader.bye(wr, code, message).await);
    }
    match owner_elsewhere(node, hello.user_id) {
        None => {}
        Some(Ok((owner, to))) => {
            return Ok(Begun::Forward(Forward {
                user: hello.user_id,
                owner,
                to,
                hello: encoded(&Frame::new(request_id, Body::Hello(hello))),
            }))
        }
        Some(Err(message)) => {
            if let Some(c) = node.cluster.get() {
                c.plane.unavailable.with_label_values(&["session"]).inc();
            }
            let message = with_retry_after(RETRY_AFTER_MS, &message);
            return Err(reader.bye(wr, ErrorCode::SHARD_UNAVAILABLE, message).await);
        }
    }
    let (user, device) = (hello.user_id, hello.device_id);
    let session_id = node.next_session.fetch_add(1, Ordering::Relaxed);
    let (handle, deliveries) = session_handle(node, session_id);
    let facts = hello.receipts_after.is_some();
    let state = match register(node, user, handle.clone(), facts).await {
        Ok(s) => s,
        Err(BrokerError::Stopped) => {
            let reason = reader.bye(wr, ErrorCode::SHUTTING_DOWN, "server shutting down");
            return Err(reason.await);
        }
        Err(e) if e.code() == ErrorCode::SHARD_UNAVAILABLE => {
            // A replicated shard not served here now (fenced, or just
            // gone elsewhere): the client comes back.
            unregister(node, user, session_id).await;
            return Err(reader.bye(wr, e.code(), e.client_message()).await);
        }
        Err(e) => {
            error!(user, error = %e, "reading inbox state failed");
            unregister(node, user, session_id).await;
            return Err(reader.bye(wr, ErrorCode::INTERNAL, "storage error").await);
        }
    };
    let (welcome, start_after) = welcome(node, &hello, session_id, state);
    if wr
        .write_all(encoded(&Frame::new(request_id, Body::Welcome(welcome))))
        .await
        .is_err()
    {
        unregister(node, user, session_id).await;
        return Err(CloseReason::IoError);
    }
    node.metrics.frame_out(frame_type::WELCOME);
    debug!(
        ?peer,
        user, device, session_id, start_after, "session started"
    );
    Ok(Begun::Here(Started {
        user,
        device,
        session_id,
        handle,
        deliveries,
        start_after,
        receipts_after: hello.receipts_after,
    }))
}

/// In a cluster, the node that owns `user`'s shard if it is another one:
/// its id and client address, or why it cannot be reached.
fn owner_elsewhere(node: &Node, user: u64) -> Option<Result<(String, String), String>> {
    let cluster = node.cluster.get()?;
    let view = cluster.view();
    if view.holds(cluster.node_id(), user) {
        return None;
    }
    let Some((_, owner)) = view.owner_of(user) else {
        return Some(Err("this node has not read the cluster's map yet".into()));
    };
    Some(match owner.cloned() {
        None => Err("the user's shard has no owner yet".into()),
        Some(o) => match view.nodes.get(&o.node) {
            Some(record) => Ok((o.node, record.advertise.clone())),
            None => Err(format!(
                "the user's cluster node {} is not registered",
                o.node
            )),
        },
    })
}

/// The first frame, which must be a `Hello` of this version, in time.
async fn read_hello<R: NetRead>(
    node: &Node,
    reader: &mut FrameReader<R>,
    wr: &mut impl NetWrite,
    evicted: &CancellationToken,
) -> Result<(u32, Hello), CloseReason> {
    let limits = &node.config.limits;
    let handshake = Duration::from_millis(limits.handshake_timeout_ms);
    let first = tokio::select! {
        r = tokio::time::timeout(handshake, reader.next_frame()) => r,
        _ = evicted.cancelled() => {
            // The oldest waiting handshake, closed for a newer connection
            // (limits.max_unauthenticated).
            let message = "no hello yet, and newer connections need the room";
            return Err(reader.bye_at_once(wr, ErrorCode::HANDSHAKE_TIMEOUT, message).await);
        }
    };
    let first = match first {
        Err(_) => {
            let message = format!("no hello within {} ms", limits.handshake_timeout_ms);
            return Err(reader.bye(wr, ErrorCode::HANDSHAKE_TIMEOUT, message).await);
        }
        Ok(Err(ReadError::Closed | ReadError::Io(_))) => return Err(CloseReason::HandshakeFailed),
        Ok(Err(ReadError::Decode(e))) => {
            reader.bye(wr, e.code(), e.to_string()).await;
            return Err(CloseReason::HandshakeFailed);
        }
        Ok(Ok(frame)) => frame,
    };
    node.metrics.frame_in(first.body.frame_type());
    let Body::Hello(hello) = first.body else {
        let code = ErrorCode::UNEXPECTED_FRAME;
        reader.bye(wr, code, "the first frame must be hello").await;
        return Err(CloseReason::HandshakeFailed);
    };
    if hello.version != PROTOCOL_VERSION {
        let message = format!(
            "version {} not supported; this server speaks {PROTOCOL_VERSION}",
            hello.version
        );
        return Err(reader
            .bye(wr, ErrorCode::UNSUPPORTED_VERSION, message)
            .await);
    }
    Ok((first.request_id, hello))
}

/// Verifies the token against the claimed identity; counts a refusal.
fn authenticate(
    node: &Node,
    hello: &Hello,
    peer: Option<std::net::SocketAddr>,
) -> Result<(), (ErrorCode, String)> {
    let now_s = node.clock.now_ms() / 1000;
    if let Err(e) = node
        .key
        .verify(&hello.token, hello.user_id, hello.device_id, now_s)
    {
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
        return Err((code, e.to_string()));
    }
    if !valid_user(hello.user_id) {
        node.metrics.auth_failed(AuthFailure::InvalidUser);
        let message = "user ids are non-zero with the top bit clear";
        return Err((ErrorCode::AUTH_FAILED, message.to_owned()));
    }
    Ok(())
}

fn session_handle(
    node: &Node,
    session_id: u64,
) -> (
    Arc<SessionHandle>,
    mailbox::Receiver<(Delivery, std::time::Instant)>,
) {
    let (tx, rx) = mailbox::bounded(node.config.limits.outbound_queue_len);
    let handle = Arc::new(SessionHandle {
        id: session_id,
        deliveries: tx,
        lagging: AtomicBool::new(false),
        wake: Notify::new(),
        moved: AtomicBool::new(false),
    });
    (handle, rx)
}

/// Registers for live pushes; the shard answers with the inbox state in its
/// own order, so every message is either pushed or found by the writer's
/// first catch-up, and every earlier ack is reflected. `facts`: the user
/// takes receipts as facts from now on.
async fn register(
    node: &Node,
    user: u64,
    session: Arc<SessionHandle>,
    facts: bool,
) -> Result<InboxState, BrokerError> {
    let (tx, rx) = oneshot::channel();
    let cmd = ShardCmd::Register(RegisterCmd {
        user,
        facts,
        session,
        state: tx,
    });
    if !node.shards.send(user, cmd).await {
        return Err(BrokerError::Stopped);
    }
    rx.await.unwrap_or(Err(BrokerError::Stopped))
}

pub(crate) async fn unregister(node: &Node, user: u64, session_id: u64) {
    node.shards
        .send(user, ShardCmd::Unregister { user, session_id })
        .await;
}

/// The welcome, and the sequence delivery resumes after: what the client
/// says it has (never past the head), or what it acknowledged; if that is
/// older than what is retained, the welcome says so (`gap`).
fn welcome(node: &Node, hello: &Hello, session_id: u64, state: InboxState) -> (Welcome, u64) {
    let limits = &node.config.limits;
    let wanted_after = match hello.resume_after {
        Some(n) => {
            // Past the head: the client has seen sequences this inbox does
            // not hold (a client bug, or an inbox that lost its newest
            // entries, whose next messages would reuse sequences the
            // client drops as seen). `u64::MAX` is "from now on".
            if n > state.head_seq && n != u64::MAX {
                warn!(
                    user = hello.user_id,
                    resume_after = n,
                    head = state.head_seq,
                    "a client resumes past its inbox's head"
                );
            }
            n.min(state.head_seq)
        }
        None => state.acked_seq,
    };
    let gap = wanted_after + 1 < state.oldest_seq;
    let start_after = wanted_after.max(state.oldest_seq - 1);
    tracing::debug!(
        user = hello.user_id,
        resume_after = ?hello.resume_after,
        head = state.head_seq,
        start_after,
        "welcome"
    );
    let welcome = Welcome {
        version: PROTOCOL_VERSION,
        session_id,
        head_seq: state.head_seq,
        oldest_seq: state.oldest_seq,
        resume_from: start_after + 1,
        gap,
        server_time_ms: node.clock.now_ms(),
        max_frame_len: limits.max_frame_len,
        max_batch: limits.max_batch,
        keepalive_ms: (limits.idle_timeout_ms / 3).min(u32::MAX as u64) as u32,
    };
    (welcome, start_after)
}

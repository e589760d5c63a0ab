//! Client sessions: one per connection, from the handshake to the goodbye.
//!
//! - `frames`: whole frames off the socket, goodbyes, refusals;
//! - `handshake`: hello, version, token, registration, welcome;
//! - `reader`: the read loop and the one dispatch of requests, whose
//!   handlers are `send`, `marks`, `groups`, `social` and `fetch`;
//! - `writer`: the only task that writes to the socket; `catch_up` is how
//!   it reads what live push did not bring, `streams` its group cursors.
//!
//! Data flow and bounds:
//! - reader -> shard: a `ShardCmd` on the shard's bounded queue; each send
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
//!   cursor per group it reads, catches each up from the group log, and
//!   ends a stream at the event that removed the user.

mod catch_up;
mod fetch;
mod frames;
mod groups;
mod handshake;
mod marks;
mod reader;
mod send;
mod social;
mod streams;
mod writer;

use std::sync::Arc;
use std::time::Duration;

use courier_protocol::ErrorCode;
use tokio::sync::Semaphore;
use tracing::{debug, warn};

use self::frames::{linger, FrameReader};
use self::reader::{Ended, Reader};
pub(crate) use self::writer::SpawnWriter;
use self::writer::{Writer, WriterInputs};
use crate::gate::{Admitted, Bucket, Handshaking};
use crate::mailbox;
use crate::metrics::{CloseReason, Metrics};
use crate::net::seam::Transport;
use crate::node::Node;
use crate::shard::messages::Reply;

pub(crate) use self::frames::refuse;

/// Serves one accepted connection to its end and counts why it ended.
pub(crate) async fn serve<T: Transport>(
    node: Arc<Node>,
    stream: T,
    peer: Option<std::net::SocketAddr>,
    admitted: Admitted,
) where
    T::Wr: SpawnWriter,
{
    let Admitted {
        slot, handshaking, ..
    } = admitted;
    let reason = session(&node, stream, peer, handshaking).await;
    node.metrics.closed(reason);
    drop(slot);
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

/// One connection from accept to close: handshake, writer, read loop,
/// finish what was accepted, goodbye. Returns why it closed.
async fn session<T: Transport>(
    node: &Arc<Node>,
    stream: T,
    peer: Option<std::net::SocketAddr>,
    handshaking: Handshaking,
) -> CloseReason
where
    T::Wr: SpawnWriter,
{
    let (rd, mut wr) = stream.split();
    let limits = &node.config.limits;
    let mut frames = FrameReader::new(rd, limits.max_frame_len);
    let started = handshake::start(node, &mut frames, &mut wr, peer, &handshaking.evicted).await;
    // Welcomed or not, the connection no longer waits to authenticate.
    drop(handshaking);
    let started = match started {
        Ok(s) => s,
        Err(reason) => return reason,
    };
    let _open = OpenSession::new(&node.metrics);
    let (user, session_id) = (started.user, started.session_id);
    let inflight = Arc::new(Semaphore::new(limits.max_in_flight));
    let (rtx, rrx) = mailbox::unbounded();
    let inputs = WriterInputs {
        replies: rrx,
        deliveries: started.deliveries,
        session: started.handle,
        user,
        start_after: started.start_after,
        inflight: inflight.clone(),
    };
    let writer = T::Wr::spawn(Writer::new(wr, inputs, node));
    let mut reader = Reader {
        node: node.clone(),
        user,
        device: started.device,
        replies: rtx,
        inflight: inflight.clone(),
        send_bucket: Bucket::full(limits.sends_per_connection_per_sec, node.clock.now_ms()),
    };
    let Ended { goodbye, closed_by } = reader.read_loop(&mut frames).await;
    if goodbye.as_ref().map(|r| r.code) == Some(ErrorCode::SHUTTING_DOWN) {
        finish_in_flight(node, &inflight, user).await;
    }
    let server_closed = goodbye.is_some();
    let _ = reader.replies.send(Reply::Close(goodbye));
    drop(reader);
    handshake::unregister(node, user, session_id).await;
    let _ = writer.await;
    if server_closed {
        linger(&mut frames.rd).await;
    }
    debug!(user, session_id, "session ended");
    closed_by
}

/// At shutdown, waits until every in-flight send is answered (bounded by
/// `limits.shutdown_grace_ms`).
async fn finish_in_flight(node: &Node, inflight: &Semaphore, user: u64) {
    let limits = &node.config.limits;
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

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

mod business;
mod catch_up;
mod fetch;
mod forward;
mod frames;
mod groups;
mod handshake;
mod marks;
mod reader;
mod send;
mod social;
mod streams;
mod writer;

use std::future::{Future, Ready};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use courier_protocol::ErrorCode;
use tokio::sync::Semaphore;
use tokio_util::either::Either;
use tracing::{debug, warn};

use self::frames::{linger, FrameReader};
use self::reader::{Ended, Reader};
pub(crate) use self::writer::SpawnWriter;
use self::writer::{Writer, WriterInputs};
use crate::gate::{Admitted, Bucket, Handshaking};
use crate::mailbox;
use crate::metrics::CloseReason;
use crate::net::seam::Transport;
use crate::node::Node;
use crate::shard::messages::Reply;

pub(crate) use self::frames::refuse;

/// Serves one accepted connection to its end and counts why it ended.
///
/// A task is as large as the largest state its future can be in, and a
/// session spends its life waiting in its read loop, so that state is kept
/// small (see the size test below): the handshake and the close, taken once,
/// are boxed; and the long-lived futures here are `async move` blocks that
/// use what they captured in place (an `async fn`'s arguments stay in every
/// state of its future, and a `let` of one is a second copy).
pub(crate) fn serve<T: Transport>(
    node: Arc<Node>,
    stream: T,
    peer: Option<std::net::SocketAddr>,
    admitted: Admitted,
) -> impl Future<Output = ()>
where
    T::Wr: SpawnWriter,
{
    let Admitted {
        slot, handshaking, ..
    } = admitted;
    let opening = Box::pin(open(node.clone(), stream, peer, handshaking));
    async move {
        // The handshake's outcome is moved whole into `then`: matching on it
        // here would keep its storage (the larger `Forward` parts) in this
        // future through the session's whole life.
        let session = then(&node, opening.await);
        let reason = session.await;
        node.metrics.closed(reason);
        drop(slot);
    }
}

/// What follows the handshake: the session here, carried to the owning
/// node (boxed: rare), or the reason it ended.
fn then<T: Transport>(
    node: &Arc<Node>,
    opening: Result<Opening<T>, CloseReason>,
) -> Either<
    impl Future<Output = CloseReason> + '_,
    Either<Pin<Box<impl Future<Output = CloseReason> + '_>>, Ready<CloseReason>>,
>
where
    T::Wr: SpawnWriter,
{
    match opening {
        Ok(Opening::Here(opened)) => Either::Left(live(node, opened)),
        Ok(Opening::Forward(frames, wr, to)) => {
            Either::Right(Either::Left(Box::pin(forward::run(node, frames, wr, to))))
        }
        Err(reason) => Either::Right(Either::Right(std::future::ready(reason))),
    }
}

/// A connection through its handshake.
struct Opened<T: Transport> {
    frames: FrameReader<T::Rd>,
    wr: T::Wr,
    started: handshake::Started,
}

/// A connection through its handshake: welcomed here, or to be carried to
/// the cluster node that owns its user.
enum Opening<T: Transport> {
    Here(Opened<T>),
    Forward(FrameReader<T::Rd>, T::Wr, forward::Forward),
}

/// The handshake: the connection's halves and the welcomed session, or why
/// it ended.
async fn open<T: Transport>(
    node: Arc<Node>,
    stream: T,
    peer: Option<std::net::SocketAddr>,
    handshaking: Handshaking,
) -> Result<Opening<T>, CloseReason> {
    let (rd, mut wr) = stream.split();
    let mut frames = FrameReader::new(rd, node.config.limits.max_frame_len);
    let started = handshake::start(&node, &mut frames, &mut wr, peer, &handshaking.evicted).await;
    // Welcomed or not, the connection no longer waits to authenticate.
    drop(handshaking);
    Ok(match started? {
        handshake::Begun::Here(started) => Opening::Here(Opened {
            frames,
            wr,
            started,
        }),
        handshake::Begun::Forward(to) => Opening::Forward(frames, wr, to),
    })
}

/// A welcomed session: its writer task, its read loop, its close.
fn live<T: Transport>(node: &Arc<Node>, opened: Opened<T>) -> impl Future<Output = CloseReason> + '_
where
    T::Wr: SpawnWriter,
{
    let Opened {
        mut frames,
        wr,
        started,
    } = opened;
    let (mut reader, writer) = begin(node, wr, started);
    async move {
        let Ended { goodbye, closed_by } = reader.read_loop(&mut frames).await;
        if goodbye.as_ref().map(|r| r.code) == Some(ErrorCode::SHUTTING_DOWN) {
            Box::pin(finish_in_flight(node, &reader.inflight, reader.user)).await;
        }
        let server_closed = goodbye.is_some();
        let _ = reader.replies.send(Reply::Close(goodbye));
        // Read from the reader, not held beside it: what this future keeps
        // across the read loop, every waiting connection pays for.
        let (user, session_id) = (reader.user, reader.session_id);
        drop(reader);
        handshake::unregister(node, user, session_id).await;
        let _ = writer.await;
        if server_closed {
            Box::pin(linger(&mut frames.rd)).await;
        }
        debug!(user, session_id, "session ended");
        closed_by
    }
}

/// Starts a welcomed session's writer task and makes its reader.
fn begin<W: SpawnWriter>(
    node: &Arc<Node>,
    wr: W,
    started: handshake::Started,
) -> (Reader, tokio::task::JoinHandle<()>) {
    let limits = &node.config.limits;
    let inflight = Arc::new(Semaphore::new(limits.max_in_flight));
    let (rtx, rrx) = mailbox::unbounded();
    let inputs = WriterInputs {
        replies: rrx,
        deliveries: started.deliveries,
        session: started.handle,
        user: started.user,
        start_after: started.start_after,
        receipts_after: started.receipts_after,
        inflight: inflight.clone(),
    };
    let writer = W::spawn(Writer::new(wr, inputs, node));
    node.metrics.connections_open.inc();
    let reader = Reader {
        node: node.clone(),
        user: started.user,
        session_id: started.session_id,
        device: started.device,
        replies: rtx,
        inflight,
        send_bucket: Bucket::full(limits.sends_per_connection_per_sec, node.clock.now_ms()),
    };
    (reader, writer)
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

#[cfg(test)]
mod tests {
    use std::future::Future;

    use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

    use super::*;
    use crate::net::uring::{UringRead, UringStream, UringWrite};

    /// Stands in for an argument whose value is never needed: only the
    /// type of the future built from it is.
    fn never<T>() -> T {
        unreachable!("only the future's type is used")
    }

    fn size_of_future<F: Future>(_: impl FnOnce() -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// Every connection holds two tasks (this session's and its writer's)
    /// for its whole life; they are most of what an idle connection costs
    /// (`docs/BENCHMARKS.md`, "Idle connections, by component"). A task's
    /// allocation is its future plus tokio's header and trailer, 112 bytes,
    /// rounded up to 128 (tokio 1.54, as `courier-census` counts them): a
    /// future of up to 784 bytes takes an 896-byte cell, one byte more a
    /// 1,024-byte one. The futures were 1,944 and 984 bytes before the
    /// long-lived states were trimmed, then 912 and 960 (session, epoll
    /// and io_uring) while the session kept the handshake's outcome in its
    /// state; this fails if any task needs more than an 896-byte cell, and
    /// prints the parts (`cargo test -p courier-broker --lib waiting_session
    /// -- --nocapture`).
    #[test]
    fn a_waiting_sessions_tasks_fit_896_byte_cells() {
        type Tcp = tokio::net::TcpStream;
        let tasks = [
            (
                "session task, epoll",
                size_of_future(|| serve::<Tcp>(never(), never(), never(), never())),
            ),
            (
                "session task, io_uring",
                size_of_future(|| serve::<UringStream>(never(), never(), never(), never())),
            ),
            (
                "writer task, epoll",
                size_of_future(|| never::<Writer<OwnedWriteHalf>>().run()),
            ),
            (
                "writer task, io_uring",
                size_of_future(|| never::<Writer<UringWrite>>().run()),
            ),
        ];
        let parts = [
            (
                "read loop, epoll",
                size_of_future(|| {
                    never::<&'static mut Reader>()
                        .read_loop(never::<&'static mut FrameReader<OwnedReadHalf>>())
                }),
            ),
            (
                "read loop, io_uring",
                size_of_future(|| {
                    never::<&'static mut Reader>()
                        .read_loop(never::<&'static mut FrameReader<UringRead>>())
                }),
            ),
            (
                "the next frame's read, epoll",
                size_of_future(|| never::<&'static mut FrameReader<OwnedReadHalf>>().next_frame()),
            ),
            (
                "the next frame's read, io_uring",
                size_of_future(|| never::<&'static mut FrameReader<UringRead>>().next_frame()),
            ),
            (
                "handshake (boxed)",
                size_of_future(|| open::<Tcp>(never(), never(), never(), never())),
            ),
            (
                "writer state",
                std::mem::size_of::<Writer<OwnedWriteHalf>>(),
            ),
            ("reader state", std::mem::size_of::<Reader>()),
        ];
        for (what, size) in tasks.iter().chain(&parts) {
            eprintln!("{what}: {size} bytes");
        }
        for (what, size) in tasks {
            assert!(
                size <= 784,
                "{what}: {size} bytes, more than an 896-byte task cell holds"
            );
        }
    }
}

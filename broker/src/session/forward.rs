//! A connection whose user another cluster node owns: after the handshake
//! checked the token here, the node opens a connection to the owner's
//! client port, replays the `Hello` and whatever the client sent after it,
//! and from then on carries bytes both ways unchanged. The session itself
//! (its registration, catch-up, acknowledgements, in-flight permits) lives
//! on the owner, beside the user's inbox; this node holds the socket.
//!
//! Either side closing ends both: the client's end-of-stream is passed on
//! (the owner ends the session as for any client), and the owner's close
//! (its goodbye included) is passed back. This node closes it too when the
//! owner's link is lost, or when its view gives the user's shard to another
//! node (the client reconnects, and is forwarded to the new owner). Bounds: one read buffer each way
//! (at most 64 KiB), no queue between them: a slow client slows its reads
//! from the owner, whose session then lags as for a slow direct client.

use std::time::Duration;

use bytes::BytesMut;
use courier_protocol::error::with_retry_after;
use courier_protocol::ErrorCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::frames::FrameReader;
use crate::cluster::route::RETRY_AFTER_MS;
use crate::metrics::CloseReason;
use crate::net::seam::{NetRead, NetWrite};
use crate::node::Node;

/// How long the owner's port may take to accept.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Bytes read per turn, each way.
const CHUNK: usize = 16 << 10;

/// Where the session goes, and the `Hello` that opens it there.
pub(crate) struct Forward {
    pub user: u64,
    pub owner: String,
    /// The owner's client address.
    pub to: String,
    pub hello: BytesMut,
}

/// Carries the connection to its owner until either side closes.
pub(crate) async fn run<R: NetRead, W: NetWrite>(
    node: &Node,
    mut frames: FrameReader<R>,
    mut wr: W,
    f: Forward,
) -> CloseReason {
    let cluster = node.cluster.get().expect("forwarding needs a cluster");
    let plane = &cluster.plane;
    // The owner's node is taken for gone when its link is: lost, or silent
    // (cut off, frozen) for the link's silence bound. The forwarded
    // connection could hang that long or longer (the owner's socket sees
    // nothing of a cut), so it is closed then and the client reconnects.
    let owner_lost = cluster.links.peer(&f.owner).map(|p| p.connection_lost());
    // Or when this node's view gives the user's shard to another node: the
    // owner may not know yet (cut off from etcd, it keeps the session and
    // refuses its sends for as long as the cut lasts), and the client does
    // better reconnecting to the new owner.
    let mut views = cluster.views();
    let (user, forwarded_to) = (f.user, f.owner.clone());
    let moved = async move {
        loop {
            let elsewhere = views
                .borrow_and_update()
                .owner_of(user)
                .and_then(|(_, owner)| owner)
                .is_some_and(|owner| owner.node != forwarded_to);
            if elsewhere {
                return;
            }
            if views.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    };
    let upstream = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&f.to)).await {
        Ok(Ok(s)) => s,
        failed => {
            debug!(user = f.user, owner = %f.owner, to = %f.to, ?failed, "owner out of reach");
            plane.unavailable.with_label_values(&["session"]).inc();
            let message =
                with_retry_after(RETRY_AFTER_MS, "the user's cluster node is out of reach");
            return frames
                .bye(&mut wr, ErrorCode::SHARD_UNAVAILABLE, message)
                .await;
        }
    };
    let _ = upstream.set_nodelay(true);
    plane.forwarded_sessions.inc();
    let (mut up_rd, mut up_wr) = upstream.into_split();
    let mut first = f.hello;
    first.extend_from_slice(&frames.buf);
    frames.buf.clear();
    let reason = if AsyncWriteExt::write_all(&mut up_wr, &first).await.is_err() {
        CloseReason::IoError
    } else {
        drop(first);
        let owner_closed = CancellationToken::new();
        let owner_gone = CancellationToken::new();
        // Owner to client.
        let down = async {
            let mut buf = BytesMut::new();
            loop {
                buf.reserve(CHUNK);
                let read = tokio::select! {
                    r = up_rd.read_buf(&mut buf) => r,
                    _ = owner_gone.cancelled() => break,
                };
                match read {
                    Ok(n) if n > 0 => {
                        if wr.write_all(buf.split()).await.is_err() {
                            break;
                        }
                    }
                    _ => break,
                }
            }
            wr.shutdown().await;
            owner_closed.cancel();
        };
        let watch = async {
            match owner_lost {
                Some(lost) => lost.await,
                None => std::future::pending().await,
            }
        };
        // Client to owner. Cancelling the read when the owner closed is
        // allowed: the connection closes.
        let up = async {
            tokio::pin!(watch);
            tokio::pin!(moved);
            loop {
                let read = tokio::select! {
                    r = frames.rd.read_some(&mut frames.buf, CHUNK) => r,
                    _ = owner_closed.cancelled() => return CloseReason::Forwarded,
                    () = &mut watch => {
                        debug!(user = f.user, owner = %f.owner, "owner's link lost; closing");
                        owner_gone.cancel();
                        return CloseReason::Unavailable;
                    }
                    () = &mut moved => {
                        debug!(user = f.user, owner = %f.owner, "the user's shard has another owner; closing");
                        owner_gone.cancel();
                        return CloseReason::Unavailable;
                    }
                };
                match read {
                    Ok(0) => {
                        let _ = AsyncWriteExt::shutdown(&mut up_wr).await;
                        return CloseReason::ClientClosed;
                    }
                    Ok(_) => {
                        if AsyncWriteExt::write_all(&mut up_wr, &frames.buf)
                            .await
                            .is_err()
                        {
                            return CloseReason::Forwarded;
                        }
                        frames.buf.clear();
                    }
                    Err(_) => {
                        let _ = AsyncWriteExt::shutdown(&mut up_wr).await;
                        return CloseReason::IoError;
                    }
                }
            }
        };
        let ((), reason) = tokio::join!(down, up);
        reason
    };
    plane.forwarded_sessions.dec();
    reason
}

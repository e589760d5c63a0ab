//! The read side of a session: it reads frames and turns each request into
//! work for a shard or the store, through the one dispatch in
//! [`Reader::handle`]. Each request kind has its handler in a file of its
//! own: `send`, `marks`, `groups`, `social`, `fetch`.

use std::sync::Arc;
use std::time::Duration;

use courier_protocol::{Body, ErrorCode, Frame, Reason};
use courier_storage::InboxStore;
use tokio::sync::{oneshot, Semaphore};
use tracing::{debug, error};

use super::frames::{FrameReader, ReadError};
use crate::error::{BrokerError, BrokerResult};
use crate::gate::Bucket;
use crate::mailbox;
use crate::metrics::CloseReason;
use crate::net::seam::NetRead;
use crate::node::Node;
use crate::shard::messages::{Answer, Reply, ShardCmd};

/// A welcomed session's read side, its per-connection state; counted in
/// `connections_open` from [`super::begin`] until it is dropped.
pub(crate) struct Reader {
    pub(super) node: Arc<Node>,
    pub(super) user: u64,
    /// This session's id among the user's sessions (its registration).
    pub(super) session_id: u64,
    pub(super) device: u32,
    /// The writer's reply queue (answers to this session's requests).
    pub(super) replies: mailbox::Sender<Reply>,
    /// One permit per send in flight (`limits.max_in_flight`); the writer
    /// returns it when it writes the send's answer.
    pub(super) inflight: Arc<Semaphore>,
    /// This connection's sends per second (`limits.sends_per_connection_per_sec`).
    pub(super) send_bucket: Bucket,
}

impl Drop for Reader {
    fn drop(&mut self) {
        self.node.metrics.connections_open.dec();
    }
}

/// Why the read loop ended: the goodbye to send (none if the client went
/// away), and what to count.
pub(crate) struct Ended {
    pub goodbye: Option<Reason>,
    pub closed_by: CloseReason,
}

impl Reader {
    /// Reads and handles frames until the client goes, the stream breaks,
    /// nothing arrives within `limits.idle_timeout_ms`, or the node stops.
    pub(crate) async fn read_loop<R: NetRead>(&mut self, frames: &mut FrameReader<R>) -> Ended {
        // Nothing here outlives the wait but the wait itself: this future is
        // most of a waiting connection's task (the idle timeout is read
        // from the config each time rather than held, the node borrowed
        // rather than cloned).
        let stopping = || Reason::new(ErrorCode::SHUTTING_DOWN, "server shutting down");
        let goodbye = |reason: Reason| Ended {
            closed_by: CloseReason::of_code(reason.code),
            goodbye: Some(reason),
        };
        loop {
            let idle = Duration::from_millis(self.node.config.limits.idle_timeout_ms);
            let next = tokio::select! {
                _ = self.node.shutdown.cancelled() => return goodbye(stopping()),
                r = tokio::time::timeout(idle, frames.next_frame()) => r,
            };
            match next {
                Err(_) => {
                    let idle_ms = self.node.config.limits.idle_timeout_ms;
                    let why = format!("nothing received for {idle_ms} ms");
                    return goodbye(Reason::new(ErrorCode::IDLE_TIMEOUT, why));
                }
                Ok(Err(ReadError::Closed)) => {
                    return Ended {
                        goodbye: None,
                        closed_by: CloseReason::ClientClosed,
                    }
                }
                Ok(Err(ReadError::Io(e))) => {
                    debug!(user = self.user, error = %e, "read failed");
                    return Ended {
                        goodbye: None,
                        closed_by: CloseReason::IoError,
                    };
                }
                Ok(Err(ReadError::Decode(e))) => {
                    debug!(user = self.user, error = %e, "bad frame; closing");
                    return goodbye(Reason::new(e.code(), e.to_string()));
                }
                Ok(Ok(frame)) => {
                    if !self.handle(frame).await {
                        return goodbye(stopping());
                    }
                }
            }
        }
    }

    /// Handles one frame; false when the node is stopping. Sends, acks and
    /// marks (the frequent ones) run inline; the others run boxed: their
    /// futures are large, and boxing them keeps every connection's task
    /// small while the connection waits (an idle connection should cost
    /// little memory).
    async fn handle(&mut self, frame: Frame) -> bool {
        let rid = frame.request_id;
        self.node.metrics.frame_in(frame.body.frame_type());
        match frame.body {
            Body::Send(s) => self.send(rid, s).await,
            Body::Ack { up_to_seq } => self.ack(up_to_seq).await,
            Body::Mark(m) => self.mark(rid, m).await,
            Body::SendBatch(sends) => Box::pin(self.send_batch(rid, sends)).await,
            Body::Group(g) => Box::pin(self.group(rid, g)).await,
            Body::ReceiptQuery { group, seq } => {
                Box::pin(self.receipt_query(rid, group, seq)).await
            }
            Body::Contacts(c) => Box::pin(self.contacts(rid, c)).await,
            Body::List(l) => Box::pin(self.list(rid, l)).await,
            Body::StatusPost(p) => Box::pin(self.post_status(rid, p)).await,
            Body::StatusFetch => Box::pin(self.fetch_statuses(rid)).await,
            Body::StatusView { poster, status_id } => {
                Box::pin(self.view_status(rid, poster, status_id)).await
            }
            Body::Fetch(f) => Box::pin(self.fetch(rid, f)).await,
            Body::Business(b) => Box::pin(self.business(rid, b)).await,
            Body::EventFetch { after, limit } => Box::pin(self.events(rid, after, limit)).await,
            Body::Ping { nonce } => {
                self.reply(rid, Body::Pong { nonce });
                true
            }
            Body::Pong { .. } => true,
            other => {
                let message = format!("{} is not a client request here", other.name());
                self.error(rid, ErrorCode::UNEXPECTED_FRAME, message);
                true
            }
        }
    }

    pub(super) fn reply(&self, request_id: u32, body: Body) {
        let _ = self.replies.send(Reply::frame(request_id, body));
    }

    pub(super) fn error(&self, request_id: u32, code: ErrorCode, message: impl Into<String>) {
        self.reply(request_id, Body::Error(Reason::new(code, message)));
    }

    /// Answers a request that failed: the place its error is handled, so
    /// the place it is logged (storage errors; refusals are the client's).
    pub(super) fn failed(&self, request_id: u32, e: &BrokerError) {
        if let BrokerError::Storage(s) = e {
            error!(user = self.user, error = %s, "request failed in the store");
        }
        self.error(request_id, e.code(), e.client_message());
    }

    /// Answers with `body(v)` or the error; false if the node is stopping.
    pub(super) fn answer<T>(
        &self,
        request_id: u32,
        r: BrokerResult<T>,
        body: impl FnOnce(T) -> Body,
    ) -> bool {
        match r {
            Ok(v) => self.reply(request_id, body(v)),
            Err(BrokerError::Stopped) => return false,
            Err(e) => self.failed(request_id, &e),
        }
        true
    }

    /// Sends `cmd` to the shard owning `key` and waits for its answer.
    pub(super) async fn ask<T>(
        &self,
        key: u64,
        make: impl FnOnce(Answer<T>) -> ShardCmd,
    ) -> BrokerResult<T> {
        let (tx, rx) = oneshot::channel();
        if !self.node.shards.send(key, make(tx)).await {
            return Err(BrokerError::Stopped);
        }
        rx.await.unwrap_or(Err(BrokerError::Stopped))
    }

    /// Runs a blocking store operation off the I/O threads.
    pub(super) async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn InboxStore) -> BrokerResult<T> + Send + 'static,
    ) -> BrokerResult<T> {
        let store = self.node.store.clone();
        match tokio::task::spawn_blocking(move || f(&*store)).await {
            Ok(r) => r,
            Err(e) => {
                error!(user = self.user, error = %e, "a storage task failed");
                Err(BrokerError::refused(ErrorCode::INTERNAL, "storage error"))
            }
        }
    }
}

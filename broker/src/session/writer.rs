//! The write side of a session: the only task that writes to the socket.
//!
//! It takes answers (`Reply`) and live deliveries, encodes many frames into
//! one buffer and writes them in one write; a full delivery queue, or a
//! gap, sends it to catch-up (`catch_up`), which reads the store.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use bytes::BytesMut;
use courier_protocol::error::with_retry_after;
use courier_protocol::{
    encode, encode_deliver, frame_type, Body, ErrorCode, Frame, Message, Reason, ReceiptFact,
    SendAck, SendResult, HEADER_LEN, MESSAGE_FIXED_LEN,
};
use courier_storage::InboxStore;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tracing::debug;

use super::streams::GroupStream;
use crate::cluster::route::RETRY_AFTER_MS;
use crate::mailbox;
use crate::metrics::Metrics;
use crate::net::seam::NetWrite;
use crate::net::tls::TlsWrite;
use crate::net::uring::UringWrite;
use crate::node::Node;
use crate::shard::messages::{failed, Delivery, Reply, SessionHandle};

/// Messages per `Deliver` frame at most.
pub(super) const DELIVER_BATCH_MAX: usize = 128;
/// Facts per `Receipts` frame at most (32 KiB).
const FACTS_PER_FRAME: usize = 1024;
/// The writer flushes once this much is encoded...
const WRITE_BUF_FLUSH: usize = 256 << 10;
/// ...or this many deliveries are waiting to be encoded.
const PENDING_MAX: usize = 4 * DELIVER_BATCH_MAX;

/// Runs a writer as its own task on its path's runtime (tokio-uring
/// sockets are `!Send` and stay on their ring's thread).
pub(crate) trait SpawnWriter: NetWrite + Sized {
    fn spawn(w: Writer<Self>) -> JoinHandle<()>;
}

impl SpawnWriter for OwnedWriteHalf {
    fn spawn(w: Writer<OwnedWriteHalf>) -> JoinHandle<()> {
        tokio::spawn(w.run())
    }
}

impl SpawnWriter for UringWrite {
    fn spawn(w: Writer<UringWrite>) -> JoinHandle<()> {
        tokio_uring::spawn(w.run())
    }
}

impl SpawnWriter for TlsWrite<OwnedWriteHalf> {
    fn spawn(w: Writer<TlsWrite<OwnedWriteHalf>>) -> JoinHandle<()> {
        tokio::spawn(w.run())
    }
}

impl SpawnWriter for TlsWrite<UringWrite> {
    fn spawn(w: Writer<TlsWrite<UringWrite>>) -> JoinHandle<()> {
        tokio_uring::spawn(w.run())
    }
}

/// What a writer is started with, besides its socket.
pub(crate) struct WriterInputs {
    pub replies: mailbox::Receiver<Reply>,
    pub deliveries: mailbox::Receiver<(Delivery, Instant)>,
    pub session: Arc<SessionHandle>,
    pub user: u64,
    /// Delivery resumes after this inbox sequence.
    pub start_after: u64,
    /// `Some`: the session takes receipt facts, after this version.
    pub receipts_after: Option<u64>,
    pub inflight: Arc<Semaphore>,
}

/// The write side: the only task that writes to the socket.
pub(crate) struct Writer<W> {
    /// The socket's write half; only this task writes to it.
    wr: W,
    /// Answers from the reader and the shards (see `ReplyQueue`).
    replies: mailbox::Receiver<Reply>,
    /// Live deliveries from the user's shard (bounded).
    deliveries: mailbox::Receiver<(Delivery, Instant)>,
    /// False once the shard dropped its end (the session was unregistered).
    deliveries_open: bool,
    /// The handle the shard pushes to; its `lagging` flag sends this writer
    /// to catch-up.
    pub(super) session: Arc<SessionHandle>,
    pub(super) store: Arc<dyn InboxStore>,
    pub(super) user: u64,
    /// Highest sequence handed to the socket (or queued in `pending`).
    pub(super) delivered: u64,
    /// Log-strategy groups this session reads, by group id.
    pub(super) groups: BTreeMap<u64, GroupStream>,
    /// Re-read the user's group rows before the next catch-up.
    pub(super) rescan: bool,
    /// The session's in-flight permits: one comes back per send answered.
    inflight: Arc<Semaphore>,
    /// Frames encoded and not yet written (taken by each write).
    out: BytesMut,
    /// Inbox deliveries waiting to be encoded as `Deliver` frames.
    pub(super) pending: Vec<Arc<Message>>,
    /// Group log deliveries waiting to be encoded as `GroupDeliver` frames.
    pub(super) pending_group: Vec<(u64, Arc<Message>)>,
    /// For a session that takes receipt facts: the highest version handed
    /// to the socket (or queued in `pending_facts`); every fact of the
    /// user up to it was sent, or replaced by a later one that was.
    pub(super) facts_after: Option<u64>,
    /// Facts waiting to be encoded as `Receipts` frames, in version order.
    pub(super) pending_facts: Vec<ReceiptFact>,
    /// Results of batches in progress: slots and how many are still missing.
    batches: BTreeMap<u32, (Vec<Option<SendResult>>, usize)>,
    max_frame_len: usize,
    pub(super) metrics: Arc<Metrics>,
    /// Accept times of the live deliveries in `out`, observed once written.
    pushed: Vec<Instant>,
}

/// The `Error` a failed single send is answered with: a retryable
/// `SHARD_UNAVAILABLE`, `BUSINESS_RATE_LIMITED` or `TEMPLATE_PAUSED`
/// carries its retry-after hint (in the result's `timestamp_ms`, as a
/// batch item does on the wire) in the message.
fn refusal(result: &SendResult) -> Reason {
    let text = result.code.description();
    let hinted = [
        ErrorCode::SHARD_UNAVAILABLE,
        ErrorCode::BUSINESS_RATE_LIMITED,
        ErrorCode::TEMPLATE_PAUSED,
        ErrorCode::MARKETING_CAP_REACHED,
    ];
    if hinted.contains(&result.code) {
        Reason::new(result.code, with_retry_after(result.timestamp_ms, text))
    } else {
        Reason::new(result.code, text)
    }
}

enum Step {
    Continue,
    Close,
}

impl<W: NetWrite> Writer<W> {
    pub(crate) fn new(wr: W, inputs: WriterInputs, node: &Node) -> Writer<W> {
        Writer {
            wr,
            replies: inputs.replies,
            deliveries: inputs.deliveries,
            deliveries_open: true,
            session: inputs.session,
            store: node.store.clone(),
            user: inputs.user,
            delivered: inputs.start_after,
            groups: BTreeMap::new(),
            rescan: true,
            inflight: inputs.inflight,
            out: BytesMut::new(),
            pending: Vec::new(),
            pending_group: Vec::new(),
            facts_after: inputs.receipts_after,
            pending_facts: Vec::new(),
            batches: BTreeMap::new(),
            max_frame_len: node.config.limits.max_frame_len as usize,
            metrics: node.metrics.clone(),
            pushed: Vec::new(),
        }
    }

    /// The writer's task. An `async move` block that uses the writer it
    /// captured in place: an `async fn run(self)` would hold it twice in
    /// every state of the task (its argument and its body's copy).
    pub(crate) fn run(self) -> impl Future<Output = ()> {
        let mut w = self;
        async move {
            if let Err(e) = w.run_inner().await {
                debug!(user = w.user, error = %e, "writer stopped");
            }
            w.wr.shutdown().await;
        }
    }

    async fn run_inner(&mut self) -> std::io::Result<()> {
        let mut need_catch_up = true;
        loop {
            if need_catch_up || self.session.lagging.load(Ordering::SeqCst) {
                // Boxed: a waiting writer's task should not carry the
                // space of the store reads it makes only now and then.
                Box::pin(self.catch_up()).await?;
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
            if self.session.moved.load(Ordering::SeqCst) {
                // The user's shard is another node's now: nothing more
                // comes here. The client reconnects and lands there.
                let why = with_retry_after(
                    RETRY_AFTER_MS,
                    "the user's shard moved to another node: connect again",
                );
                let reason = Reason::new(ErrorCode::SHARD_UNAVAILABLE, why);
                self.encode(&Frame::new(0, Body::Goodbye(reason)));
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
            Delivery::Fact(f) => return self.on_fact(f),
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

    /// Accepts a live fact; returns true if one was missed (versions of a
    /// user run on by one, except across a restart of its shard): the
    /// catch-up then reads the user's fact rows.
    fn on_fact(&mut self, f: ReceiptFact) -> bool {
        let Some(after) = self.facts_after else {
            return false; // this session takes receipt messages
        };
        if f.version <= after {
            false // already sent by a catch-up
        } else if f.version == after + 1 {
            self.facts_after = Some(f.version);
            self.pending_facts.push(f);
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
                    None => self.encode(&Frame::new(request_id, Body::Error(refusal(&result)))),
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
                    Err(code) => Body::Error(refusal(&SendResult {
                        timestamp_ms: RETRY_AFTER_MS,
                        ..failed(0, code)
                    })),
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

    pub(super) fn encode(&mut self, f: &Frame) {
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
        for chunk in self.pending_facts.chunks(FACTS_PER_FRAME) {
            encode(
                &Frame::new(0, Body::Receipts(chunk.to_vec())),
                &mut self.out,
            );
            self.metrics.frame_out(frame_type::RECEIPTS);
        }
        self.pending_facts.clear();
    }

    pub(super) async fn flush(&mut self) -> std::io::Result<()> {
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
}

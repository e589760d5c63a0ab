//! The shard core: one writer per shard.
//!
//! Users are partitioned over shards by a hash of their id. A shard owns its
//! users' inboxes (it is their only writer) and their live sessions. Everyone
//! else talks to it through its bounded command queue
//! (`limits.shard_queue_len`); when the queue is full, the sending
//! connection's reader waits, which stops reading that socket: backpressure
//! reaches the client through TCP and nothing grows without bound.
//!
//! Each shard runs on its own OS thread with a current-thread runtime, so a
//! blocking RocksDB write (with its fsync) never stalls the network threads.
//! The loop: wait for a command, drain up to `limits.shard_batch_max` more
//! without waiting, append every send in one storage write (one WAL sync in
//! fsync mode: group commit), answer each sender, push each stored message
//! to the recipient's online sessions, then go round again.
//!
//! The shard only speaks through channels, so the network path (epoll today,
//! io_uring later) and a remote shard on another node can feed it unchanged.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use courier_protocol::{
    BroadcastAck, Destination, ErrorCode, GroupInfo, GroupOp, Message, MessageKind, ReceiptCounts,
    ReceiptStatus, SendResult,
};
use courier_storage::{
    AppendOutcome, IdempotencyKey, InboxState, InboxStore, KvOp, LogRef, NewMessage, Record,
    StoreError, StoredMessage,
};
use tokio::sync::{mpsc, oneshot, Notify};
use tracing::{debug, error, warn};

use crate::groups::GroupCache;
use crate::metrics::ShardMetrics;
use crate::now_ms;

/// How often a shard trims acknowledged messages past retention.
const TRIM_INTERVAL: Duration = Duration::from_secs(1);
/// Inboxes trimmed per tick, so trimming never starves sends.
const TRIM_PER_TICK_MAX: usize = 1024;

/// The shard that owns `user` (or group), out of `shards`.
pub fn shard_of(user: u64, shards: usize) -> usize {
    // Fibonacci hashing: sequential ids spread evenly.
    ((user.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) % shards as u64) as usize
}

/// Where a shard sends the outcome of a send.
pub struct ReplyTo {
    pub tx: mpsc::UnboundedSender<Reply>,
    pub request_id: u32,
    /// Position in a `SendBatch`, or `None` for a single `Send`.
    pub index: Option<u16>,
}

impl ReplyTo {
    pub fn send(&self, result: SendResult) {
        // The connection may be gone; its client will retry with the same id.
        let _ = self.tx.send(Reply::SendResult {
            request_id: self.request_id,
            index: self.index,
            result,
        });
    }
}

/// What a connection's writer receives besides live deliveries. The channel
/// is unbounded in type but bounded in practice: each `SendResult` and
/// `Broadcast` answers a send that holds one of the connection's
/// `limits.max_in_flight` permits.
pub enum Reply {
    SendResult {
        request_id: u32,
        index: Option<u16>,
        result: SendResult,
    },
    /// The answer to a send to a broadcast list (returns its permit).
    Broadcast {
        request_id: u32,
        ack: Result<BroadcastAck, ErrorCode>,
    },
    /// A `SendBatch` of `count` items is under way (always queued before its items).
    BatchStart { request_id: u32, count: u16 },
    /// Any other frame; boxed, so that the common replies stay small (each
    /// session's reply queue allocates its first block of 32 up front).
    Frame(Box<courier_protocol::Frame>),
    /// Write a `Goodbye` (if any), flush and close.
    Close(Option<courier_protocol::Reason>),
}

impl Reply {
    pub fn frame(request_id: u32, body: courier_protocol::Body) -> Reply {
        Reply::Frame(Box::new(courier_protocol::Frame::new(request_id, body)))
    }
}

/// What happens when the write of one inbox entry has an outcome.
pub enum Completion {
    /// Answer the sender's connection.
    Reply(ReplyTo),
    /// One copy of a message with many inboxes (a group's references, a
    /// broadcast): the last copy answers.
    Fanout(Arc<Fanout>),
    /// Tell an internal waiter whether it is stored (receipts, status views).
    Notify(oneshot::Sender<bool>),
    /// Part of a receipt emission; the last one lets the reader's shard
    /// record how far receipts went.
    Receipts(Arc<ReceiptBatch>),
}

/// A message being written to many inboxes, possibly on many shards.
/// `remaining` counts the parts (one per shard); the part that brings it to
/// zero sends the answer.
pub struct Fanout {
    /// Highest server message id and timestamp of the copies (a broadcast's ack).
    pub last_id: AtomicU64,
    pub last_ts: AtomicU64,
    pub remaining: AtomicUsize,
    pub failed: AtomicBool,
    /// The error code of a failed part (0 until one fails).
    pub failed_code: std::sync::atomic::AtomicU16,
    pub delivered: AtomicUsize,
    pub duplicates: AtomicUsize,
    pub answer: FanoutAnswer,
}

pub enum FanoutAnswer {
    /// A group send: answered with this result (seq = group sequence).
    Group(Option<ReplyTo>, SendResult),
    /// A broadcast: answered with counts.
    Broadcast {
        tx: mpsc::UnboundedSender<Reply>,
        request_id: u32,
        ack: BroadcastAck,
    },
}

impl Fanout {
    pub fn new(parts: usize, answer: FanoutAnswer) -> Arc<Fanout> {
        Arc::new(Fanout {
            last_id: AtomicU64::new(0),
            last_ts: AtomicU64::new(0),
            remaining: AtomicUsize::new(parts),
            failed: AtomicBool::new(false),
            failed_code: std::sync::atomic::AtomicU16::new(0),
            delivered: AtomicUsize::new(0),
            duplicates: AtomicUsize::new(0),
            answer,
        })
    }

    pub fn is_done(&self) -> bool {
        self.remaining.load(Ordering::Acquire) == 0
    }

    pub fn succeeded(&self) -> bool {
        self.is_done() && !self.failed.load(Ordering::Acquire)
    }

    /// Records one part's outcome; the last part answers.
    pub fn part_done(&self, code: ErrorCode, stored: usize, duplicates: usize) {
        if code != ErrorCode::OK {
            self.failed_code.store(code.0, Ordering::Relaxed);
            self.failed.store(true, Ordering::Release);
        }
        self.delivered
            .fetch_add(stored + duplicates, Ordering::Relaxed);
        self.duplicates.fetch_add(duplicates, Ordering::Relaxed);
        if self.remaining.fetch_sub(1, Ordering::AcqRel) != 1 {
            return;
        }
        self.answer();
    }

    /// Sends the answer (called once, by the last part or when there are none).
    pub fn answer(&self) {
        let failed = self.failed.load(Ordering::Acquire);
        let code = ErrorCode(self.failed_code.load(Ordering::Relaxed));
        match &self.answer {
            FanoutAnswer::Group(Some(reply), result) => reply.send(if failed {
                fail(result.client_msg_id, code)
            } else {
                *result
            }),
            FanoutAnswer::Group(None, _) => {}
            FanoutAnswer::Broadcast {
                tx,
                request_id,
                ack,
            } => {
                let delivered = self.delivered.load(Ordering::Relaxed);
                let ack = if failed {
                    Err(code)
                } else {
                    Ok(BroadcastAck {
                        server_msg_id: self.last_id.load(Ordering::Relaxed),
                        timestamp_ms: self.last_ts.load(Ordering::Relaxed),
                        delivered: delivered as u16,
                        duplicate: delivered > 0
                            && self.duplicates.load(Ordering::Relaxed) == delivered,
                        ..*ack
                    })
                };
                let _ = tx.send(Reply::Broadcast {
                    request_id: *request_id,
                    ack,
                });
            }
        }
    }
}

/// One shard's unbounded peer queue; counts what is put on it.
#[derive(Clone)]
pub struct PeerQueue {
    tx: mpsc::UnboundedSender<ShardCmd>,
    pushed: prometheus::IntCounter,
}

impl PeerQueue {
    pub(crate) fn send(&self, cmd: ShardCmd) {
        self.pushed.inc();
        let _ = self.tx.send(cmd);
    }
}

/// Receipts emitted by one mark, in flight to the senders' shards.
pub struct ReceiptBatch {
    pub remaining: AtomicUsize,
    pub failed: AtomicBool,
    pub user: u64,
    pub delivered: u64,
    pub read: u64,
    /// The marking shard's peer queue.
    pub back: PeerQueue,
}

impl ReceiptBatch {
    fn part_done(&self, ok: bool) {
        if !ok {
            self.failed.store(true, Ordering::Release);
        }
        if self.remaining.fetch_sub(1, Ordering::AcqRel) == 1
            && !self.failed.load(Ordering::Acquire)
        {
            self.back.send(ShardCmd::ReceiptsDone {
                user: self.user,
                delivered: self.delivered,
                read: self.read,
            });
        }
    }
}

/// One message to append to `recipient`'s inbox.
pub struct SendCmd {
    pub sender: u64,
    pub sender_device: u32,
    pub recipient: u64,
    pub client_msg_id: u64,
    /// Destination as recorded (the user, or the broadcast list it came through).
    pub destination: Destination,
    /// Idempotency scope (0 for a one-to-one send).
    pub scope: u64,
    pub kind: MessageKind,
    pub payload: Bytes,
    pub done: Completion,
    /// When the connection accepted the send (for latency metrics).
    pub accepted: Instant,
}

/// References to one group log entry, for members on one shard.
pub struct RefsCmd {
    pub group: u64,
    /// The group message (seq = group sequence).
    pub message: Arc<Message>,
    pub members: Vec<u64>,
    pub fanout: Arc<Fanout>,
    /// When the group send was accepted.
    pub accepted: Instant,
}

pub struct GroupSendCmd {
    pub group: u64,
    pub sender: u64,
    pub sender_device: u32,
    pub client_msg_id: u64,
    pub kind: MessageKind,
    pub payload: Bytes,
    pub reply: ReplyTo,
    pub accepted: Instant,
}

pub type OpResult<T> = Result<T, (ErrorCode, String)>;

pub struct GroupOpCmd {
    pub group: u64,
    pub actor: u64,
    pub op: GroupOp,
    pub users: Vec<u64>,
    pub reply: oneshot::Sender<OpResult<GroupInfo>>,
}

pub enum ShardCmd {
    Send(SendCmd),
    Refs(RefsCmd),
    GroupSend(GroupSendCmd),
    GroupOp(GroupOpCmd),
    /// Live push of a log-strategy group message to these users' sessions.
    GroupPush {
        group: u64,
        message: Arc<Message>,
        users: Vec<u64>,
        accepted: Instant,
    },
    ReceiptQuery {
        group: u64,
        seq: u64,
        asker: u64,
        reply: oneshot::Sender<OpResult<ReceiptCounts>>,
    },
    /// Adds a live session and answers with the inbox state as of this
    /// point in the shard's order: every mark queued before it is applied,
    /// every send written by an earlier batch is counted, and sends of the
    /// same batch are appended afterwards and therefore pushed to the new
    /// session.
    Register {
        user: u64,
        session: Arc<SessionHandle>,
        state: oneshot::Sender<Result<InboxState, StoreError>>,
    },
    Unregister {
        user: u64,
        session_id: u64,
    },
    /// Delivered (`Ack`) or read marks on the user's inbox (stream 0) or a
    /// log-strategy group's stream.
    Mark {
        user: u64,
        stream: u64,
        up_to_seq: u64,
        status: ReceiptStatus,
    },
    /// The receipts of a mark are durable in the senders' inboxes.
    ReceiptsDone {
        user: u64,
        delivered: u64,
        read: u64,
    },
    /// Finish what is queued before this, sync the store, and stop.
    Stop,
}

/// A live delivery to one session.
pub enum Delivery {
    /// An inbox message (seq = inbox sequence).
    Inbox(Arc<Message>),
    /// A log-strategy group message (seq = group sequence).
    Group(u64, Arc<Message>),
}

/// A live session as its user's shard sees it.
pub struct SessionHandle {
    pub id: u64,
    /// Live deliveries with the time their send was accepted, bounded by
    /// `limits.outbound_queue_len`.
    pub deliveries: mpsc::Sender<(Delivery, Instant)>,
    /// Set by the shard when `deliveries` was full: the session is off live
    /// push and its writer catches up from the store, then clears it.
    pub lagging: AtomicBool,
    /// Wakes the writer when `lagging` is set.
    pub wake: Notify,
}

#[derive(Clone)]
pub struct ShardConfig {
    pub queue_len: usize,
    pub batch_max: usize,
    pub acked_retention_ms: u64,
    pub max_group_members: usize,
    pub max_groups_per_user: usize,
    pub log_threshold: usize,
}

impl ShardConfig {
    #[cfg(test)]
    pub fn for_tests() -> ShardConfig {
        ShardConfig {
            queue_len: 64,
            batch_max: 16,
            acked_retention_ms: 0,
            max_group_members: 1024,
            max_groups_per_user: 64,
            log_threshold: 4,
        }
    }
}

/// Handles to every shard's queues and thread.
pub struct Shards {
    queues: Vec<mpsc::Sender<ShardCmd>>,
    threads: std::sync::Mutex<Vec<std::thread::JoinHandle<()>>>,
    pub stats: Arc<ShardMetrics>,
}

impl Shards {
    pub fn start(
        count: usize,
        config: ShardConfig,
        store: Arc<dyn InboxStore>,
    ) -> std::io::Result<Shards> {
        assert!((1..=64).contains(&count), "1 to 64 shards");
        let stats = Arc::new(ShardMetrics::new(count));
        let mut queues = Vec::with_capacity(count);
        let mut receivers = Vec::with_capacity(count);
        let mut peers = Vec::with_capacity(count);
        let mut peer_receivers = Vec::with_capacity(count);
        for i in 0..count {
            let (tx, rx) = mpsc::channel(config.queue_len);
            queues.push(tx);
            receivers.push(rx);
            let (ptx, prx) = mpsc::unbounded_channel();
            peers.push(PeerQueue {
                tx: ptx,
                pushed: stats.queue_pushed[i].clone(),
            });
            peer_receivers.push(prx);
        }
        let peers: Arc<[PeerQueue]> = peers.into();
        let marks = crate::groups::fan_out_marks(&*store, count).map_err(std::io::Error::other)?;
        let mut threads = Vec::with_capacity(count);
        for (id, ((rx, prx), marks)) in receivers
            .into_iter()
            .zip(peer_receivers)
            .zip(marks)
            .enumerate()
        {
            let mut shard = Shard::new(
                id as u64,
                rx,
                prx,
                peers.clone(),
                store.clone(),
                stats.clone(),
                &config,
            );
            let thread = std::thread::Builder::new()
                .name(format!("courier-shard-{id}"))
                .spawn(move || {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_time()
                        .build()
                        .expect("shard runtime");
                    rt.block_on(shard.run(marks));
                })?;
            threads.push(thread);
        }
        Ok(Shards {
            queues,
            threads: std::sync::Mutex::new(threads),
            stats,
        })
    }

    pub fn count(&self) -> usize {
        self.queues.len()
    }

    /// Queues `cmd` on the shard that owns `key` (a user or group id),
    /// waiting while it is full. Returns `false` if the shard has stopped.
    pub async fn send(&self, key: u64, cmd: ShardCmd) -> bool {
        let i = shard_of(key, self.queues.len());
        self.stats.queue_pushed[i].inc();
        self.queues[i].send(cmd).await.is_ok()
    }

    /// Stops every shard after what is already queued, and waits for them.
    pub async fn stop(&self) {
        for q in &self.queues {
            let _ = q.send(ShardCmd::Stop).await;
        }
        let threads = std::mem::take(&mut *self.threads.lock().expect("threads lock"));
        tokio::task::spawn_blocking(move || {
            for t in threads {
                let _ = t.join();
            }
        })
        .await
        .ok();
    }
}

/// What a drained command still needs once the batch's write has an outcome.
pub(crate) enum Planned {
    /// One inbox entry.
    Send(SendCmd),
    /// `members.len()` inbox references.
    Refs(RefsCmd),
    /// One group log entry; `recipients` are the members it goes to.
    GroupSend {
        cmd: GroupSendCmd,
        recipients: Vec<u64>,
    },
}

pub(crate) struct Shard {
    pub(crate) id: u64,
    rx: mpsc::Receiver<ShardCmd>,
    peer_rx: mpsc::UnboundedReceiver<ShardCmd>,
    /// Every shard's unbounded peer queue. Shard-to-shard traffic (references,
    /// group pushes, receipts) never waits on a bounded queue, so two shards
    /// can never block on each other; it is bounded in practice by the
    /// senders' in-flight permits that caused it.
    pub(crate) peers: Arc<[PeerQueue]>,
    pub(crate) store: Arc<dyn InboxStore>,
    pub(crate) stats: Arc<ShardMetrics>,
    pub(crate) config: ShardConfig,
    batch_max: usize,
    sessions: HashMap<u64, Vec<Arc<SessionHandle>>>,
    trim_pending: HashSet<u64>,
    last_ts_ms: u64,
    id_counter: u64,
    /// Groups this shard owns that have been touched since start.
    pub(crate) groups: HashMap<u64, GroupCache>,
    /// Groups with reference fan-outs whose completion is not yet recorded.
    pub(crate) fanning: HashSet<u64>,
    /// Receipt cursors (delivered, read) of this shard's users, as emitted.
    pub(crate) receipt_cursors: HashMap<u64, (u64, u64)>,
    /// Group cursors (delivered, read) of this shard's users, by (group, user).
    pub(crate) group_cursors: HashMap<(u64, u64), (u64, u64)>,
    /// Key-value writes to make with the next batch.
    pub(crate) kv: Vec<KvOp>,
}

impl Shard {
    pub(crate) fn new(
        id: u64,
        rx: mpsc::Receiver<ShardCmd>,
        peer_rx: mpsc::UnboundedReceiver<ShardCmd>,
        peers: Arc<[PeerQueue]>,
        store: Arc<dyn InboxStore>,
        stats: Arc<ShardMetrics>,
        config: &ShardConfig,
    ) -> Shard {
        Shard {
            id,
            rx,
            peer_rx,
            peers,
            store,
            stats,
            config: config.clone(),
            batch_max: config.batch_max,
            sessions: HashMap::new(),
            trim_pending: HashSet::new(),
            last_ts_ms: 0,
            id_counter: 0,
            groups: HashMap::new(),
            fanning: HashSet::new(),
            receipt_cursors: HashMap::new(),
            group_cursors: HashMap::new(),
            kv: Vec::new(),
        }
    }

    /// Queues a command on the shard that owns `key`, through its peer queue.
    pub(crate) fn to_peer(&self, key: u64, cmd: ShardCmd) {
        self.to_shard(shard_of(key, self.peers.len()), cmd);
    }

    /// Queues a command on shard `shard`'s peer queue.
    pub(crate) fn to_shard(&self, shard: usize, cmd: ShardCmd) {
        self.peers[shard].send(cmd);
    }

    /// `marks`: this shard's groups' fan-out marks, to complete interrupted
    /// fan-outs before anything else.
    async fn run(&mut self, marks: Vec<(u64, u64)>) {
        self.recover_fanouts(marks);
        let mut cmds = Vec::with_capacity(self.batch_max);
        let mut last_trim = Instant::now();
        loop {
            let next = tokio::time::timeout(TRIM_INTERVAL, async {
                tokio::select! {
                    biased;
                    Some(c) = self.peer_rx.recv() => Some(c),
                    c = self.rx.recv() => c,
                }
            })
            .await;
            match next {
                Ok(Some(cmd)) => cmds.push(cmd),
                Ok(None) => break,
                Err(_elapsed) => {}
            }
            while cmds.len() < self.batch_max {
                match self.peer_rx.try_recv() {
                    Ok(cmd) => cmds.push(cmd),
                    Err(_) => match self.rx.try_recv() {
                        Ok(cmd) => cmds.push(cmd),
                        Err(_) => break,
                    },
                }
            }
            if !cmds.is_empty() {
                self.stats.queue_popped[self.id as usize].inc_by(cmds.len() as u64);
                self.stats.shard_batch.observe(cmds.len() as f64);
            }
            let stop = self.process(&mut cmds);
            if stop {
                // Work other shards handed over before they stopped.
                while let Ok(cmd) = self.peer_rx.try_recv() {
                    cmds.push(cmd);
                }
                self.stats.queue_popped[self.id as usize].inc_by(cmds.len() as u64);
                self.process(&mut cmds);
                break;
            }
            if last_trim.elapsed() >= TRIM_INTERVAL {
                self.trim();
                last_trim = Instant::now();
            }
        }
        self.note_fanned();
        self.write_kv();
        if let Err(e) = self.store.sync() {
            error!(shard = self.id, error = %e, "store sync at shard stop failed");
        }
        debug!(shard = self.id, "shard stopped");
    }

    /// A server timestamp that never goes backwards within this shard, and a
    /// server message id unique across shards: `ts_ms << 16 | shard << 10 | n`.
    pub(crate) fn next_ids(&mut self) -> (u64, u64) {
        let now = now_ms().max(self.last_ts_ms);
        if now > self.last_ts_ms {
            self.last_ts_ms = now;
            self.id_counter = 0;
        } else if self.id_counter == 1023 {
            // 1,024 ids in one millisecond: borrow the next millisecond.
            self.last_ts_ms += 1;
            self.id_counter = 0;
        } else {
            self.id_counter += 1;
        }
        let id = (self.last_ts_ms << 16) | (self.id << 10) | self.id_counter;
        (self.last_ts_ms, id)
    }

    /// Handles one drained batch; returns true on `Stop`.
    fn process(&mut self, cmds: &mut Vec<ShardCmd>) -> bool {
        let mut appends: Vec<NewMessage> = Vec::new();
        let mut plan: Vec<Planned> = Vec::new();
        let mut marks: Vec<(u64, u64, u64, ReceiptStatus)> = Vec::new();
        let mut queries = Vec::new();
        let mut stop = false;
        for cmd in cmds.drain(..) {
            match cmd {
                ShardCmd::Send(s) => {
                    let (ts, id) = self.next_ids();
                    appends.push(NewMessage {
                        inbox: s.recipient,
                        idempotency: Some(IdempotencyKey {
                            sender: s.sender,
                            client_msg_id: s.client_msg_id,
                            scope: s.scope,
                        }),
                        reference: None,
                        record: Record {
                            server_msg_id: id,
                            sender: s.sender,
                            sender_device: s.sender_device,
                            client_msg_id: s.client_msg_id,
                            timestamp_ms: ts,
                            dest_tag: s.destination.tag(),
                            dest_id: s.destination.id(),
                            kind: s.kind as u8,
                            payload: s.payload.clone(),
                        },
                    });
                    plan.push(Planned::Send(s));
                }
                ShardCmd::Refs(r) => {
                    let record = record_of(&r.message);
                    for &member in &r.members {
                        appends.push(NewMessage {
                            inbox: member,
                            idempotency: Some(IdempotencyKey {
                                sender: r.group,
                                client_msg_id: r.message.seq,
                                scope: member,
                            }),
                            reference: Some(LogRef {
                                log: r.group,
                                seq: r.message.seq,
                            }),
                            record: record.clone(),
                        });
                    }
                    plan.push(Planned::Refs(r));
                }
                ShardCmd::GroupSend(g) => {
                    if let Some(p) = self.plan_group_send(g, &mut appends) {
                        plan.push(p);
                    }
                }
                ShardCmd::GroupOp(op) => {
                    // A membership change needs the exact group sequence of
                    // its event: write what is planned first.
                    self.write_batch(&mut appends, &mut plan);
                    self.group_op(op);
                }
                ShardCmd::GroupPush {
                    group,
                    message,
                    users,
                    accepted,
                } => {
                    for user in users {
                        self.push(user, Delivery::Group(group, message.clone()), accepted);
                    }
                }
                ShardCmd::ReceiptQuery { .. } => queries.push(cmd),
                ShardCmd::Register {
                    user,
                    session,
                    state,
                } => {
                    // Earlier marks of this batch must be visible in the state.
                    self.apply_marks(&mut marks);
                    self.sessions.entry(user).or_default().push(session);
                    let _ = state.send(self.store.state(user));
                }
                ShardCmd::Unregister { user, session_id } => {
                    if let Some(list) = self.sessions.get_mut(&user) {
                        list.retain(|s| s.id != session_id);
                        if list.is_empty() {
                            self.sessions.remove(&user);
                        }
                    }
                }
                ShardCmd::Mark {
                    user,
                    stream,
                    up_to_seq,
                    status,
                } => marks.push((user, stream, up_to_seq, status)),
                ShardCmd::ReceiptsDone {
                    user,
                    delivered,
                    read,
                } => self.kv.push(KvOp::Put {
                    key: crate::keys::receipts(user),
                    value: crate::keys::pair(delivered, read),
                }),
                ShardCmd::Stop => stop = true,
            }
        }
        self.note_fanned();
        self.write_batch(&mut appends, &mut plan);
        self.apply_marks(&mut marks);
        self.write_kv();
        for q in queries {
            if let ShardCmd::ReceiptQuery {
                group,
                seq,
                asker,
                reply,
            } = q
            {
                let _ = reply.send(self.receipt_counts(group, seq, asker));
            }
        }
        stop
    }

    /// Writes the planned appends (and pending key-value writes) in one
    /// storage write, then answers and pushes.
    pub(crate) fn write_batch(&mut self, appends: &mut Vec<NewMessage>, plan: &mut Vec<Planned>) {
        if appends.is_empty() && self.kv.is_empty() {
            for p in plan.drain(..) {
                self.finish(p, &mut std::iter::empty());
            }
            return;
        }
        let kv = std::mem::take(&mut self.kv);
        let started = Instant::now();
        let written = self.store.append_with(appends, &kv, now_ms());
        self.stats
            .write_seconds
            .observe(started.elapsed().as_secs_f64());
        self.stats.write_batch.observe(appends.len() as f64);
        match written {
            Ok(outcomes) => {
                let mut it = appends.drain(..).zip(outcomes);
                for p in plan.drain(..) {
                    self.finish(p, &mut it);
                }
            }
            Err(e) => {
                error!(shard = self.id, error = %e, count = appends.len(), "storage append failed; rejecting the batch");
                self.stats.storage_errors.inc();
                appends.clear();
                // Planning a send changes no cached group state (only a
                // membership change does, after its own write succeeded), so
                // the caches, and the fan-outs they track, stay valid.
                for p in plan.drain(..) {
                    self.reject(p);
                }
            }
        }
    }

    /// Writes pending key-value writes on their own (marks, receipt cursors).
    fn write_kv(&mut self) {
        if self.kv.is_empty() {
            return;
        }
        let kv = std::mem::take(&mut self.kv);
        // Cursors and fan-out marks: losing the last of them in a power
        // failure repeats receipts or references, which their keys absorb.
        if let Err(e) = self.store.write_lazy(&kv) {
            warn!(shard = self.id, error = %e, "writing cursors failed");
        }
    }

    fn reject(&mut self, p: Planned) {
        match p {
            Planned::Send(s) => complete(s.done, fail(s.client_msg_id, ErrorCode::INTERNAL), false),
            Planned::Refs(r) => r.fanout.part_done(ErrorCode::INTERNAL, 0, 0),
            Planned::GroupSend { cmd, .. } => {
                cmd.reply.send(fail(cmd.client_msg_id, ErrorCode::INTERNAL))
            }
        }
    }

    fn finish(
        &mut self,
        p: Planned,
        outcomes: &mut dyn Iterator<Item = (NewMessage, AppendOutcome)>,
    ) {
        match p {
            Planned::Send(s) => {
                let (m, outcome) = outcomes.next().expect("one outcome per send");
                self.finish_send(s, m, outcome);
            }
            Planned::Refs(r) => {
                let (mut stored, mut dups) = (0, 0);
                for _ in 0..r.members.len() {
                    let (m, outcome) = outcomes.next().expect("one outcome per reference");
                    match outcome {
                        AppendOutcome::Stored(p) => {
                            stored += 1;
                            self.stats.refs_stored.inc();
                            let msg = Message {
                                seq: p.seq,
                                ..(*r.message).clone()
                            };
                            self.push(m.inbox, Delivery::Inbox(Arc::new(msg)), r.accepted);
                        }
                        AppendOutcome::Duplicate(_) => dups += 1,
                        AppendOutcome::Conflict => {
                            error!(shard = self.id, group = r.group, "reference key conflict")
                        }
                    }
                }
                r.fanout.part_done(ErrorCode::OK, stored, dups);
            }
            Planned::GroupSend { cmd, recipients } => {
                let (m, outcome) = outcomes.next().expect("one outcome per group send");
                self.finish_group_send(cmd, recipients, m, outcome);
            }
        }
    }

    fn finish_send(&mut self, s: SendCmd, m: NewMessage, outcome: AppendOutcome) {
        let result = match outcome {
            AppendOutcome::Stored(p) | AppendOutcome::Duplicate(p) => SendResult {
                client_msg_id: s.client_msg_id,
                code: ErrorCode::OK,
                server_msg_id: p.server_msg_id,
                seq: p.seq,
                timestamp_ms: p.timestamp_ms,
                duplicate: matches!(outcome, AppendOutcome::Duplicate(_)),
            },
            AppendOutcome::Conflict => fail(s.client_msg_id, ErrorCode::CLIENT_ID_REUSED),
        };
        complete(s.done, result, matches!(outcome, AppendOutcome::Stored(_)));
        match outcome {
            AppendOutcome::Stored(p) => {
                crate::metrics::Metrics::since(&self.stats.accept_to_durable, s.accepted);
                self.stats.messages_stored.inc();
                if s.kind == MessageKind::Receipt {
                    self.stats.receipts_stored.inc();
                }
                let stored = StoredMessage {
                    seq: p.seq,
                    record: m.record,
                    via: None,
                };
                match to_wire(stored) {
                    Ok(msg) => self.push(s.recipient, Delivery::Inbox(Arc::new(msg)), s.accepted),
                    // Cannot happen for a record built above from a valid
                    // send; if it does, the writer's catch-up reports it.
                    Err(e) => {
                        error!(shard = self.id, error = %e, "stored message not representable")
                    }
                }
            }
            AppendOutcome::Duplicate(_) => {
                self.stats.duplicates.inc();
            }
            AppendOutcome::Conflict => {}
        }
    }

    /// Offers a delivery to every live session of `user`. A full queue
    /// demotes the session to catch-up (its writer re-reads the store); it
    /// never blocks the shard and never drops the message from storage.
    pub(crate) fn push(&mut self, user: u64, d: Delivery, accepted: Instant) {
        let Some(list) = self.sessions.get_mut(&user) else {
            return;
        };
        let stats = &self.stats;
        list.retain(|session| {
            if session.lagging.load(Ordering::SeqCst) {
                return true;
            }
            let d = match &d {
                Delivery::Inbox(m) => Delivery::Inbox(m.clone()),
                Delivery::Group(g, m) => Delivery::Group(*g, m.clone()),
            };
            match session.deliveries.try_send((d, accepted)) {
                Ok(()) => {
                    stats.live_pushes.inc();
                    true
                }
                Err(mpsc::error::TrySendError::Full(_)) => {
                    session.lagging.store(true, Ordering::SeqCst);
                    session.wake.notify_one();
                    stats.demotions.inc();
                    debug!(
                        user,
                        session = session.id,
                        "slow consumer moved to catch-up"
                    );
                    true
                }
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            }
        });
        if list.is_empty() {
            self.sessions.remove(&user);
        }
    }

    pub(crate) fn note_trim(&mut self, user: u64) {
        self.trim_pending.insert(user);
    }

    fn trim(&mut self) {
        if self.trim_pending.is_empty() {
            return;
        }
        let cutoff = now_ms()
            .saturating_sub(self.config.acked_retention_ms)
            .saturating_add(
                // Retention 0 means "trim on ack": include this very millisecond.
                u64::from(self.config.acked_retention_ms == 0),
            );
        let users: Vec<u64> = self
            .trim_pending
            .iter()
            .take(TRIM_PER_TICK_MAX)
            .copied()
            .collect();
        for user in users {
            match self.store.trim_acked(user, cutoff) {
                Ok(s) if s.oldest_seq <= s.acked_seq => {} // more to trim later
                Ok(_) => {
                    self.trim_pending.remove(&user);
                }
                Err(e) => {
                    warn!(shard = self.id, error = %e, "trimming an inbox failed");
                    self.trim_pending.remove(&user);
                }
            }
        }
    }
}

/// Delivers an outcome to whoever waits for it.
fn complete(done: Completion, result: SendResult, stored: bool) {
    let ok = result.code == ErrorCode::OK;
    match done {
        Completion::Reply(r) => r.send(result),
        Completion::Fanout(f) => {
            f.last_id.fetch_max(result.server_msg_id, Ordering::Relaxed);
            f.last_ts.fetch_max(result.timestamp_ms, Ordering::Relaxed);
            f.part_done(
                result.code,
                usize::from(ok && stored),
                usize::from(ok && !stored),
            )
        }
        Completion::Notify(tx) => {
            let _ = tx.send(ok);
        }
        Completion::Receipts(b) => b.part_done(ok),
    }
}

/// The stored fields of a wire message.
pub(crate) fn record_of(m: &Message) -> Record {
    Record {
        server_msg_id: m.server_msg_id,
        sender: m.sender,
        sender_device: m.sender_device,
        client_msg_id: m.client_msg_id,
        timestamp_ms: m.timestamp_ms,
        dest_tag: m.destination.tag(),
        dest_id: m.destination.id(),
        kind: m.kind as u8,
        payload: m.payload.clone(),
    }
}

/// Groups `users` by the shard that owns them.
pub(crate) fn by_shard(
    users: impl IntoIterator<Item = u64>,
    shards: usize,
) -> BTreeMap<usize, Vec<u64>> {
    let mut out: BTreeMap<usize, Vec<u64>> = BTreeMap::new();
    for u in users {
        out.entry(shard_of(u, shards)).or_default().push(u);
    }
    out
}

pub(crate) fn fail(client_msg_id: u64, code: ErrorCode) -> SendResult {
    SendResult {
        client_msg_id,
        code,
        server_msg_id: 0,
        seq: 0,
        timestamp_ms: 0,
        duplicate: false,
    }
}

/// A stored message in its wire form. Fails on a record the store holds but
/// this version cannot represent (reported as corruption, never served).
pub fn to_wire(m: StoredMessage) -> Result<Message, StoreError> {
    let r = m.record;
    let corrupt = |detail: &str| StoreError::Corrupt {
        what: "inbox record",
        detail: detail.to_owned(),
    };
    Ok(Message {
        seq: m.seq,
        server_msg_id: r.server_msg_id,
        sender: r.sender,
        sender_device: r.sender_device,
        client_msg_id: r.client_msg_id,
        timestamp_ms: r.timestamp_ms,
        destination: Destination::from_parts(r.dest_tag, r.dest_id)
            .ok_or_else(|| corrupt("unknown destination tag"))?,
        kind: MessageKind::from_u8(r.kind).ok_or_else(|| corrupt("unknown message kind"))?,
        payload: r.payload,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use courier_storage::{MemoryStore, StoreConfig};
    use tokio::sync::oneshot;

    fn send(i: u64, reply: &mpsc::UnboundedSender<Reply>) -> ShardCmd {
        ShardCmd::Send(SendCmd {
            sender: 1,
            sender_device: 1,
            recipient: 2,
            client_msg_id: i,
            destination: Destination::User(2),
            scope: 0,
            kind: MessageKind::Chat,
            payload: Bytes::from_static(b"x"),
            done: Completion::Reply(ReplyTo {
                tx: reply.clone(),
                request_id: i as u32,
                index: None,
            }),
            accepted: Instant::now(),
        })
    }

    fn inbox_seq(d: Delivery) -> u64 {
        match d {
            Delivery::Inbox(m) => m.seq,
            Delivery::Group(..) => panic!("expected an inbox delivery"),
        }
    }

    async fn result(rx: &mut mpsc::UnboundedReceiver<Reply>) -> SendResult {
        match rx.recv().await.expect("a reply") {
            Reply::SendResult { result, .. } => result,
            _ => panic!("expected a send result"),
        }
    }

    /// The shard core on the in-memory store: acks follow the store's
    /// outcome, pushes follow acks, and a full session queue demotes the
    /// session instead of blocking or dropping anything from the inbox.
    /// An ack reads back only the messages it newly covers (for their
    /// receipts): 300 acks of one message each read about 300 messages, not
    /// the inbox again each time.
    #[tokio::test]
    async fn acks_read_only_what_they_newly_cover() {
        let mem = Arc::new(MemoryStore::new(StoreConfig::default()));
        let store: Arc<dyn InboxStore> = mem.clone();
        let shards = Shards::start(1, ShardConfig::for_tests(), store).unwrap();
        let (rtx, mut rrx) = mpsc::unbounded_channel();
        for i in 1..=300 {
            assert!(shards.send(2, send(i, &rtx)).await);
        }
        for _ in 1..=300 {
            result(&mut rrx).await;
        }
        let before = mem.messages_read();
        for seq in 1..=300 {
            let mark = ShardCmd::Mark {
                user: 2,
                stream: 0,
                up_to_seq: seq,
                status: ReceiptStatus::Delivered,
            };
            assert!(shards.send(2, mark).await);
        }
        // The shard's queue is in order: once this send is answered, every
        // mark before it was applied.
        assert!(shards.send(2, send(1000, &rtx)).await);
        result(&mut rrx).await;
        let read = mem.messages_read() - before;
        assert!(
            read <= 600,
            "{read} messages read for 300 acks of one message each"
        );
    }

    #[tokio::test]
    async fn acks_pushes_duplicates_and_demotion() {
        let store: Arc<dyn InboxStore> = Arc::new(MemoryStore::new(StoreConfig::default()));
        let shards = Shards::start(2, ShardConfig::for_tests(), store.clone()).unwrap();
        let (dtx, mut drx) = mpsc::channel(2);
        let session = Arc::new(SessionHandle {
            id: 1,
            deliveries: dtx,
            lagging: AtomicBool::new(false),
            wake: Notify::new(),
        });
        let (stx, srx) = oneshot::channel();
        let cmd = ShardCmd::Register {
            user: 2,
            session: session.clone(),
            state: stx,
        };
        assert!(shards.send(2, cmd).await);
        assert_eq!(srx.await.unwrap().unwrap().head_seq, 0);

        let (rtx, mut rrx) = mpsc::unbounded_channel();
        for i in 1..=5 {
            assert!(shards.send(2, send(i, &rtx)).await);
        }
        for i in 1..=5 {
            let r = result(&mut rrx).await;
            assert_eq!((r.code, r.seq, r.duplicate), (ErrorCode::OK, i, false));
        }
        // A queue of two: two pushed, the third demoted the session, the
        // rest were not offered to it.
        assert_eq!(inbox_seq(drx.recv().await.unwrap().0), 1);
        assert_eq!(inbox_seq(drx.recv().await.unwrap().0), 2);
        assert!(drx.try_recv().is_err());
        assert!(session.lagging.load(Ordering::SeqCst));
        assert_eq!(shards.stats.demotions.get(), 1);
        assert_eq!(store.read_after(2, 0, 10).unwrap().len(), 5, "all stored");

        // A retry answers with the original placement and stores nothing.
        assert!(shards.send(2, send(3, &rtx)).await);
        let r = result(&mut rrx).await;
        assert_eq!((r.seq, r.duplicate), (3, true));
        assert_eq!(store.state(2).unwrap().head_seq, 5);

        // Acks reach the store; with zero retention the tick trims them.
        assert!(
            shards
                .send(
                    2,
                    ShardCmd::Mark {
                        user: 2,
                        stream: 0,
                        up_to_seq: 4,
                        status: ReceiptStatus::Delivered,
                    }
                )
                .await
        );
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while store.state(2).unwrap().oldest_seq != 5 {
            assert!(tokio::time::Instant::now() < deadline, "never trimmed");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        shards.stop().await;
        assert!(
            !shards.send(2, send(9, &rtx)).await,
            "stopped shards refuse work"
        );
    }

    #[test]
    fn ids_are_unique_and_timestamps_monotonic_within_a_shard() {
        let store: Arc<dyn InboxStore> = Arc::new(MemoryStore::new(StoreConfig::default()));
        let (_tx, rx) = mpsc::channel(1);
        let (ptx, prx) = mpsc::unbounded_channel();
        let config = ShardConfig::for_tests();
        let stats = Arc::new(ShardMetrics::new(4));
        let peer = PeerQueue {
            tx: ptx,
            pushed: stats.queue_pushed[0].clone(),
        };
        let mut shard = Shard::new(3, rx, prx, vec![peer].into(), store, stats, &config);
        let mut seen = HashSet::new();
        let mut last_ts = 0;
        for _ in 0..5000 {
            let (ts, id) = shard.next_ids();
            assert!(ts >= last_ts);
            assert!(seen.insert(id), "duplicate id {id}");
            assert_eq!((id >> 10) & 0x3f, 3, "shard bits");
            last_ts = ts;
        }
    }

    /// A crash after a group message reached the group log but before every
    /// member's reference was written: at start the owning shard fans it
    /// out again, and members who already had it get no second copy.
    #[tokio::test]
    async fn interrupted_reference_fan_out_is_completed_at_start() {
        use crate::keys::{self, GroupState, Member};
        use courier_protocol::{Role, Strategy, GROUP_ID_BIT};
        use courier_storage::{KvOp, LogRef};
        let store: Arc<dyn InboxStore> = Arc::new(MemoryStore::new(StoreConfig::default()));
        let g = GROUP_ID_BIT | 77;
        // Joined before both messages (a real group's creation event would
        // be at sequence 1; it does not matter here).
        let member = |user| Member {
            user,
            role: Role::Member,
            joined_seq: 0,
        };
        let state = GroupState {
            strategy: Strategy::Refs,
            log_from: keys::NONE,
            members: vec![member(10), member(11), member(12)],
        };
        let record = |seq: u64| Record {
            server_msg_id: 100 + seq,
            sender: 10,
            sender_device: 1,
            client_msg_id: seq,
            timestamp_ms: 5,
            dest_tag: 2,
            dest_id: g,
            kind: MessageKind::Chat as u8,
            payload: Bytes::from_static(b"m"),
        };
        let entry = |seq: u64| NewMessage {
            inbox: g,
            idempotency: None,
            reference: None,
            record: record(seq),
        };
        // Two messages in the log (seq 1 and 2); the fan-out mark says none
        // is complete; member 11 already has the first reference.
        store
            .append_with(
                &[entry(1), entry(2)],
                &[
                    KvOp::Put {
                        key: keys::group(g),
                        value: state.encode(),
                    },
                    KvOp::Put {
                        key: keys::fanned(g),
                        value: 0u64.to_be_bytes().to_vec(),
                    },
                ],
                now_ms(),
            )
            .unwrap();
        store
            .append(
                &[NewMessage {
                    inbox: 11,
                    idempotency: Some(IdempotencyKey {
                        sender: g,
                        client_msg_id: 1,
                        scope: 11,
                    }),
                    reference: Some(LogRef { log: g, seq: 1 }),
                    record: record(1),
                }],
                now_ms(),
            )
            .unwrap();
        let shards = Shards::start(2, ShardConfig::for_tests(), store.clone()).unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let heads: Vec<u64> = [11, 12]
                .iter()
                .map(|&u| store.state(u).unwrap().head_seq)
                .collect();
            if heads == [2, 2] {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "not recovered: {heads:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        for u in [11, 12] {
            let got: Vec<u64> = store
                .read_after(u, 0, 10)
                .unwrap()
                .iter()
                .map(|m| m.record.client_msg_id)
                .collect();
            assert_eq!(got, vec![1, 2], "member {u}: both messages once, in order");
        }
        assert_eq!(store.state(10).unwrap().head_seq, 0, "not to the sender");
        shards.stop().await;
        let mark = store.get(&keys::fanned(g)).unwrap().unwrap();
        assert_eq!(keys::be_u64(&mark, 0), Some(2), "completion recorded");
    }
}

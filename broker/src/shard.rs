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

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use courier_protocol::{Destination, ErrorCode, Message, MessageKind, SendResult};
use courier_storage::{
    AppendOutcome, IdempotencyKey, InboxState, InboxStore, NewMessage, Record, StoreError,
    StoredMessage,
};
use tokio::sync::{mpsc, Notify};
use tracing::{debug, error, warn};

use crate::now_ms;

/// How often a shard trims acknowledged messages past retention.
const TRIM_INTERVAL: Duration = Duration::from_secs(1);
/// Inboxes trimmed per tick, so trimming never starves sends.
const TRIM_PER_TICK_MAX: usize = 1024;

/// The shard that owns `user`, out of `shards`.
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

/// What a connection's writer receives besides live deliveries. The channel
/// is unbounded in type but bounded in practice: each `SendResult` answers
/// a send that holds one of the connection's `limits.max_in_flight` permits.
pub enum Reply {
    SendResult {
        request_id: u32,
        index: Option<u16>,
        result: SendResult,
    },
    /// A `SendBatch` of `count` items is under way (always queued before its items).
    BatchStart {
        request_id: u32,
        count: u16,
    },
    Frame(courier_protocol::Frame),
    /// Write a `Goodbye` (if any), flush and close.
    Close(Option<courier_protocol::Reason>),
}

pub struct SendCmd {
    pub sender: u64,
    pub sender_device: u32,
    pub recipient: u64,
    pub client_msg_id: u64,
    pub kind: MessageKind,
    pub payload: Bytes,
    pub reply: ReplyTo,
}

pub enum ShardCmd {
    Send(SendCmd),
    /// Adds a live session and answers with the inbox state as of this
    /// point in the shard's order: every ack queued before it is applied,
    /// every send written by an earlier batch is counted, and sends of the
    /// same batch are appended afterwards and therefore pushed to the new
    /// session.
    Register {
        user: u64,
        session: Arc<SessionHandle>,
        state: tokio::sync::oneshot::Sender<Result<InboxState, StoreError>>,
    },
    Unregister {
        user: u64,
        session_id: u64,
    },
    Ack {
        user: u64,
        up_to_seq: u64,
    },
    /// Finish what is queued before this, sync the store, and stop.
    Stop,
}

/// A live session as its user's shard sees it.
pub struct SessionHandle {
    pub id: u64,
    /// Live deliveries, bounded by `limits.outbound_queue_len`.
    pub deliveries: mpsc::Sender<Arc<Message>>,
    /// Set by the shard when `deliveries` was full: the session is off live
    /// push and its writer catches up from the inbox, then clears it.
    pub lagging: AtomicBool,
    /// Wakes the writer when `lagging` is set.
    pub wake: Notify,
}

/// Counters shared by all shards (read by logs and, later, metrics).
#[derive(Default)]
pub struct ShardStats {
    pub messages_stored: AtomicU64,
    pub duplicates: AtomicU64,
    pub live_pushes: AtomicU64,
    pub demotions: AtomicU64,
    pub storage_errors: AtomicU64,
}

pub struct ShardConfig {
    pub queue_len: usize,
    pub batch_max: usize,
    pub acked_retention_ms: u64,
}

/// Handles to every shard's queue and thread.
pub struct Shards {
    queues: Vec<mpsc::Sender<ShardCmd>>,
    threads: std::sync::Mutex<Vec<std::thread::JoinHandle<()>>>,
    pub stats: Arc<ShardStats>,
}

impl Shards {
    pub fn start(
        count: usize,
        config: ShardConfig,
        store: Arc<dyn InboxStore>,
    ) -> std::io::Result<Shards> {
        assert!((1..=64).contains(&count), "1 to 64 shards");
        let stats = Arc::new(ShardStats::default());
        let mut queues = Vec::with_capacity(count);
        let mut threads = Vec::with_capacity(count);
        for id in 0..count {
            let (tx, rx) = mpsc::channel(config.queue_len);
            let mut shard = Shard::new(id as u64, rx, store.clone(), stats.clone(), &config);
            let thread = std::thread::Builder::new()
                .name(format!("courier-shard-{id}"))
                .spawn(move || {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_time()
                        .build()
                        .expect("shard runtime");
                    rt.block_on(shard.run());
                })?;
            queues.push(tx);
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

    /// Queues `cmd` on the shard that owns `user`, waiting while it is full.
    /// Returns `false` if the shard has stopped.
    pub async fn send(&self, user: u64, cmd: ShardCmd) -> bool {
        let q = &self.queues[shard_of(user, self.queues.len())];
        q.send(cmd).await.is_ok()
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

struct Shard {
    id: u64,
    rx: mpsc::Receiver<ShardCmd>,
    store: Arc<dyn InboxStore>,
    stats: Arc<ShardStats>,
    batch_max: usize,
    acked_retention_ms: u64,
    sessions: HashMap<u64, Vec<Arc<SessionHandle>>>,
    trim_pending: HashSet<u64>,
    last_ts_ms: u64,
    id_counter: u64,
}

impl Shard {
    fn new(
        id: u64,
        rx: mpsc::Receiver<ShardCmd>,
        store: Arc<dyn InboxStore>,
        stats: Arc<ShardStats>,
        config: &ShardConfig,
    ) -> Shard {
        Shard {
            id,
            rx,
            store,
            stats,
            batch_max: config.batch_max,
            acked_retention_ms: config.acked_retention_ms,
            sessions: HashMap::new(),
            trim_pending: HashSet::new(),
            last_ts_ms: 0,
            id_counter: 0,
        }
    }

    async fn run(&mut self) {
        let mut cmds = Vec::with_capacity(self.batch_max);
        let mut last_trim = Instant::now();
        loop {
            match tokio::time::timeout(TRIM_INTERVAL, self.rx.recv()).await {
                Ok(Some(cmd)) => cmds.push(cmd),
                Ok(None) => break,
                Err(_elapsed) => {}
            }
            while cmds.len() < self.batch_max {
                match self.rx.try_recv() {
                    Ok(cmd) => cmds.push(cmd),
                    Err(_) => break,
                }
            }
            let stop = self.process(&mut cmds);
            if stop {
                break;
            }
            if last_trim.elapsed() >= TRIM_INTERVAL {
                self.trim();
                last_trim = Instant::now();
            }
        }
        if let Err(e) = self.store.sync() {
            error!(shard = self.id, error = %e, "store sync at shard stop failed");
        }
        debug!(shard = self.id, "shard stopped");
    }

    /// A server timestamp that never goes backwards within this shard, and a
    /// server message id unique across shards: `ts_ms << 16 | shard << 10 | n`.
    fn next_ids(&mut self) -> (u64, u64) {
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
        let mut sends: Vec<SendCmd> = Vec::new();
        let mut appends: Vec<NewMessage> = Vec::new();
        let mut acks: Vec<(u64, u64)> = Vec::new();
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
                        }),
                        record: Record {
                            server_msg_id: id,
                            sender: s.sender,
                            sender_device: s.sender_device,
                            client_msg_id: s.client_msg_id,
                            timestamp_ms: ts,
                            dest_tag: Destination::User(s.recipient).tag(),
                            dest_id: s.recipient,
                            kind: s.kind as u8,
                            payload: s.payload.clone(),
                        },
                    });
                    sends.push(s);
                }
                ShardCmd::Register {
                    user,
                    session,
                    state,
                } => {
                    // Earlier acks of this batch must be visible in the state.
                    self.apply_acks(&mut acks);
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
                ShardCmd::Ack { user, up_to_seq } => acks.push((user, up_to_seq)),
                ShardCmd::Stop => stop = true,
            }
        }
        if !appends.is_empty() {
            match self.store.append(&appends, now_ms()) {
                Ok(outcomes) => {
                    for ((s, m), outcome) in sends.into_iter().zip(appends).zip(outcomes) {
                        self.finish_send(s, m, outcome);
                    }
                }
                Err(e) => {
                    error!(shard = self.id, error = %e, count = sends.len(), "storage append failed; rejecting the batch");
                    self.stats.storage_errors.fetch_add(1, Ordering::Relaxed);
                    for s in sends {
                        reply(&s, fail(s.client_msg_id, ErrorCode::INTERNAL));
                    }
                }
            }
        }
        self.apply_acks(&mut acks);
        stop
    }

    fn apply_acks(&mut self, acks: &mut Vec<(u64, u64)>) {
        for (user, up_to) in acks.drain(..) {
            match self.store.ack(user, up_to) {
                Ok(state) if state.acked_seq >= state.oldest_seq => {
                    self.trim_pending.insert(user);
                }
                Ok(_) => {}
                Err(e) => warn!(shard = self.id, error = %e, "recording an ack failed"),
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
        reply(&s, result);
        match outcome {
            AppendOutcome::Stored(p) => {
                self.stats.messages_stored.fetch_add(1, Ordering::Relaxed);
                let stored = StoredMessage {
                    seq: p.seq,
                    record: m.record,
                };
                match to_wire(stored) {
                    Ok(msg) => self.push(s.recipient, Arc::new(msg)),
                    // Cannot happen for a record built above from a valid
                    // send; if it does, the writer's catch-up reports it.
                    Err(e) => {
                        error!(shard = self.id, error = %e, "stored message not representable")
                    }
                }
            }
            AppendOutcome::Duplicate(_) => {
                self.stats.duplicates.fetch_add(1, Ordering::Relaxed);
            }
            AppendOutcome::Conflict => {}
        }
    }

    /// Offers `msg` to every live session of `user`. A full queue demotes the
    /// session to catch-up (its writer re-reads the inbox); it never blocks
    /// the shard and never drops the message from storage.
    fn push(&mut self, user: u64, msg: Arc<Message>) {
        let Some(list) = self.sessions.get_mut(&user) else {
            return;
        };
        list.retain(|session| {
            if session.lagging.load(Ordering::SeqCst) {
                return true;
            }
            match session.deliveries.try_send(msg.clone()) {
                Ok(()) => {
                    self.stats.live_pushes.fetch_add(1, Ordering::Relaxed);
                    true
                }
                Err(mpsc::error::TrySendError::Full(_)) => {
                    session.lagging.store(true, Ordering::SeqCst);
                    session.wake.notify_one();
                    self.stats.demotions.fetch_add(1, Ordering::Relaxed);
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

    fn trim(&mut self) {
        if self.trim_pending.is_empty() {
            return;
        }
        let cutoff = now_ms()
            .saturating_sub(self.acked_retention_ms)
            .saturating_add(
                // Retention 0 means "trim on ack": include this very millisecond.
                u64::from(self.acked_retention_ms == 0),
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

fn fail(client_msg_id: u64, code: ErrorCode) -> SendResult {
    SendResult {
        client_msg_id,
        code,
        server_msg_id: 0,
        seq: 0,
        timestamp_ms: 0,
        duplicate: false,
    }
}

fn reply(s: &SendCmd, result: SendResult) {
    // The connection may be gone; its client will retry with the same id.
    let _ = s.reply.tx.send(Reply::SendResult {
        request_id: s.reply.request_id,
        index: s.reply.index,
        result,
    });
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
            kind: MessageKind::Chat,
            payload: Bytes::from_static(b"x"),
            reply: ReplyTo {
                tx: reply.clone(),
                request_id: i as u32,
                index: None,
            },
        })
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
    #[tokio::test]
    async fn acks_pushes_duplicates_and_demotion() {
        let store: Arc<dyn InboxStore> = Arc::new(MemoryStore::new(StoreConfig::default()));
        let shards = Shards::start(
            2,
            ShardConfig {
                queue_len: 64,
                batch_max: 16,
                acked_retention_ms: 0,
            },
            store.clone(),
        )
        .unwrap();
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
        assert_eq!(drx.recv().await.unwrap().seq, 1);
        assert_eq!(drx.recv().await.unwrap().seq, 2);
        assert!(drx.try_recv().is_err());
        assert!(session.lagging.load(Ordering::SeqCst));
        assert_eq!(shards.stats.demotions.load(Ordering::Relaxed), 1);
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
                    ShardCmd::Ack {
                        user: 2,
                        up_to_seq: 4
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
        let config = ShardConfig {
            queue_len: 1,
            batch_max: 1,
            acked_retention_ms: 0,
        };
        let mut shard = Shard::new(3, rx, store, Arc::default(), &config);
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
}

//! One shard: its state, its loop, and the one dispatch of its commands.
//!
//! The loop: wait for a command, drain up to `limits.shard_batch_max` more
//! without waiting, plan every command of the batch, append everything in
//! one storage write (one WAL sync in fsync mode: group commit), answer each
//! sender, push each stored message to the recipients' online sessions,
//! apply the marks, then go round again. The domains the loop runs are in
//! their own files: `inbox`, `groups`, `receipts`, `fanout`; the write and
//! its outcomes in `batch`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use courier_protocol::{ReceiptCounts, ReceiptStatus};
use courier_storage::{slot_of, Clock, InboxStore, KvOp};
use tokio::sync::mpsc;
use tracing::{debug, error};

use super::lines::Lines;
use super::messages::{Answer, MarkCmd, ReceiptQueryCmd, SessionHandle, ShardCmd, SlotsChange};
use super::recent::Recent;
use super::route::shard_of;
use super::tracking::{Batch, GroupCache, KnownRow, PendingBroadcast, PendingFanout};
use crate::metrics::ShardMetrics;
use crate::state::rows::{Cursors, OutboxRow};

/// How often a shard trims acknowledged messages past retention.
const TRIM_INTERVAL: Duration = Duration::from_secs(1);

/// What every shard is configured with.
#[derive(Clone)]
pub struct ShardConfig {
    pub queue_len: usize,
    pub batch_max: usize,
    pub acked_retention_ms: u64,
    pub max_group_members: usize,
    pub max_groups_per_user: usize,
    pub log_threshold: usize,
    /// How long a user's marks are held and merged before they are applied
    /// (zero: applied with the batch that brought them). Marks only move
    /// cursors forward, so many become one: one cursor write, one read of
    /// the inbox range, one receipt per original sender instead of one per
    /// acknowledged batch.
    pub mark_coalesce: Duration,
    /// The node's one clock (the store's idempotency window and expiring
    /// space read the same one).
    pub clock: Clock,
    /// The rules of business messaging (shared: a business send takes a
    /// reference, not a copy of the keyword lists).
    pub business: Arc<crate::config::BusinessSettings>,
    /// The node's directory of businesses, kept by the shards for the
    /// sessions.
    pub directory: Arc<super::business_state::Directory>,
    /// Tracked links: URL buttons of business templates go through
    /// `<base>/c/<token>` (`business.click_base_url`; `None`: not tracked).
    pub clicks: Option<Arc<ClickLinks>>,
    /// Where a business's long reports are made (see [`crate::reports`]).
    pub reports: crate::reports::Reports,
}

/// How a shard turns a template's URL button into a tracked link.
pub struct ClickLinks {
    pub base: String,
    pub key: courier_protocol::token::TokenKey,
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
            mark_coalesce: Duration::ZERO,
            clock: Clock::system(),
            business: Arc::default(),
            directory: Arc::new(super::business_state::Directory::new(
                crate::config::BusinessSettings::default().platform_account,
            )),
            clicks: None,
            reports: crate::reports::Reports::start(crate::reports::QUEUE_LEN)
                .expect("a reports thread"),
        }
    }
}

/// Where commands for ids that another cluster node owns go (the
/// cluster's router). A single node has none.
pub trait Remote: Send + Sync + 'static {
    /// Takes `cmd` if `key` (a user or group id) lives on another node, or
    /// on none that can be reached now, and sees that it is answered; gives
    /// it back if it is this node's.
    fn divert(&self, key: u64, cmd: ShardCmd) -> Option<ShardCmd>;

    /// Whether this node's shards hold `id` now.
    fn here(&self, id: u64) -> bool;

    /// `ids` split into those this node's shards hold now and the others,
    /// by one reading of the map (a fan-out's recipients).
    fn split_here(&self, ids: Vec<u64>) -> (Vec<u64>, Vec<u64>);

    /// Whether a shard of the cluster is moving, or moved lately: a
    /// member's part may then fail at one node and a later entry's part
    /// reach the member at another, so a group's fan-outs go one at a time
    /// (see `Shard::held_back`).
    fn shards_moving(&self) -> bool;

    /// Completes a group's receipt counts with the cursors of `members`,
    /// which other nodes hold, and answers.
    fn count_elsewhere(
        &self,
        counts: ReceiptCounts,
        members: Vec<u64>,
        answer: Answer<ReceiptCounts>,
    );

    /// A session's send (or group send) of conversation `line`, refused
    /// `SHARD_UNAVAILABLE` by a shard of this node: it takes its place in
    /// the conversation's line on this node, so a later send of the
    /// conversation that would go to another node (the shard's new owner)
    /// waits for its retry.
    fn refused_here(&self, line: crate::cluster::order::Key, id: u64);
}

/// The router, once the node has joined its cluster; shared by the node's
/// handle to its shards and every shard.
pub type RemoteSlot = Arc<std::sync::OnceLock<Arc<dyn Remote>>>;

/// One shard's unbounded peer queue; counts what is put on it.
#[derive(Clone)]
pub struct PeerQueue {
    pub(crate) tx: mpsc::UnboundedSender<ShardCmd>,
    pub(crate) pushed: prometheus::IntCounter,
}

impl PeerQueue {
    pub(crate) fn send(&self, cmd: ShardCmd) {
        self.pushed.inc();
        let _ = self.tx.send(cmd);
    }
}

pub(crate) struct Shard {
    pub(crate) id: u64,
    /// Commands from sessions (bounded: `limits.shard_queue_len`).
    rx: mpsc::Receiver<ShardCmd>,
    /// Commands from other shards (see `peers`).
    peer_rx: mpsc::UnboundedReceiver<ShardCmd>,
    /// Every shard's unbounded peer queue. Shard-to-shard traffic (references,
    /// group pushes, receipts, parts' outcomes) never waits on a bounded
    /// queue, so two shards can never block on each other; it is bounded in
    /// practice by the senders' in-flight permits that caused it.
    pub(crate) peers: Arc<[PeerQueue]>,
    /// Where commands for other nodes' ids go (see `Remote`).
    pub(crate) remote: RemoteSlot,
    pub(crate) store: Arc<dyn InboxStore>,
    pub(crate) stats: Arc<ShardMetrics>,
    pub(crate) config: ShardConfig,
    /// Live sessions of this shard's users.
    pub(crate) sessions: HashMap<u64, Vec<Arc<SessionHandle>>>,
    /// Users whose inboxes have acknowledged messages to trim.
    pub(crate) trim_pending: HashSet<u64>,
    /// The last server timestamp handed out, and the ids used in it.
    last_ts_ms: u64,
    id_counter: u64,
    /// Groups this shard owns that have been touched since start.
    pub(crate) groups: HashMap<u64, GroupCache>,
    /// Reference fan-outs in flight or not yet recorded in `F`, by group
    /// and group sequence.
    pub(crate) fanouts: HashMap<u64, BTreeMap<u64, PendingFanout>>,
    /// Broadcasts of this shard's users in flight, by token.
    pub(crate) broadcasts: HashMap<u64, PendingBroadcast>,
    /// Receipts planned by marks whose outbox rows are in `kv`, not yet
    /// written: (reader, emission, row). Sent once that write succeeds.
    pub(crate) outbox_unwritten: Vec<(u64, u64, OutboxRow)>,
    /// Receipts written to the outbox and not yet durable at their senders,
    /// by (reader, emission): the row, and whether an attempt is in flight
    /// (false after a failed one: sent again on the next tick).
    pub(crate) outbox: BTreeMap<(u64, u64), (OutboxRow, bool)>,
    /// Source of the tokens above.
    next_token: u64,
    /// Receipt rows of this shard's users as planned (`R` rows), with what
    /// was last put for each: ahead of the disk until the next key-value
    /// write, or, moved by marks that owe nothing, by a bounded range (see
    /// `KnownRow`).
    pub(crate) receipt_rows: HashMap<u64, KnownRow>,
    /// Group cursors of this shard's users, by (group, user) (`C` rows).
    pub(crate) group_cursors: HashMap<(u64, u64), Cursors>,
    /// Its users' receipt facts, as planned (see `facts`).
    pub(crate) facts: super::facts_state::Facts,
    /// Key-value writes to make with the next batch.
    pub(crate) kv: Vec<KvOp>,
    /// Marks held to be merged (`mark_coalesce`), by (user, stream): the
    /// highest delivered and read sequences marked.
    pub(crate) held_marks: BTreeMap<(u64, u64), HeldMark>,
    /// When the oldest held mark is due.
    pub(crate) marks_due: Option<Instant>,
    /// Online users' latest inbox entries, for their marks' receipts.
    pub(crate) recent: Recent,
    /// Conversations a refusal here holds in line (see `lines`).
    pub(crate) lines: Lines,
    /// This shard's businesses and their customers (see `business`).
    pub(crate) business: super::business_state::Businesses,
}

/// Marks of one (user, stream) merged while held: read implies delivered,
/// so `delivered >= read`.
#[derive(Clone, Copy, Default)]
pub(crate) struct HeldMark {
    pub delivered: u64,
    pub read: u64,
}

impl HeldMark {
    /// The marks to apply for `(user, stream)`: read first, then delivered
    /// beyond it (what was read before its delivered mark was applied gets
    /// only its read receipt).
    pub(crate) fn release(self, (user, stream): (u64, u64), marks: &mut Vec<MarkCmd>) {
        let mark = |up_to_seq, status| MarkCmd {
            user,
            stream,
            up_to_seq,
            status,
        };
        if self.read > 0 {
            marks.push(mark(self.read, ReceiptStatus::Read));
        }
        if self.delivered > self.read {
            marks.push(mark(self.delivered, ReceiptStatus::Delivered));
        }
    }
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
            remote: RemoteSlot::default(),
            store,
            stats,
            config: config.clone(),
            sessions: HashMap::new(),
            trim_pending: HashSet::new(),
            last_ts_ms: 0,
            id_counter: 0,
            groups: HashMap::new(),
            fanouts: HashMap::new(),
            broadcasts: HashMap::new(),
            outbox_unwritten: Vec::new(),
            outbox: BTreeMap::new(),
            next_token: 0,
            receipt_rows: HashMap::new(),
            group_cursors: HashMap::new(),
            facts: Default::default(),
            kv: Vec::new(),
            held_marks: BTreeMap::new(),
            marks_due: None,
            recent: Recent::default(),
            lines: Lines::default(),
            business: Default::default(),
        }
    }

    pub(crate) fn now_ms(&self) -> u64 {
        self.config.clock.now_ms()
    }

    /// A token for a fan-out this shard waits for.
    pub(crate) fn token(&mut self) -> u64 {
        self.next_token += 1;
        self.next_token
    }

    /// Whether this node's shards hold `id` (always, on a single node).
    pub(crate) fn here(&self, id: u64) -> bool {
        self.remote.get().is_none_or(|r| r.here(id))
    }

    /// `ids` split into those this node's shards hold and the others (none,
    /// on a single node).
    pub(crate) fn split_here(&self, ids: Vec<u64>) -> (Vec<u64>, Vec<u64>) {
        match self.remote.get() {
            Some(r) => r.split_here(ids),
            None => (ids, Vec::new()),
        }
    }

    /// See [`Remote::shards_moving`]; never on a single node.
    pub(crate) fn shards_moving(&self) -> bool {
        self.remote.get().is_some_and(|r| r.shards_moving())
    }

    /// Queues a command on the shard that owns `key`, through its peer
    /// queue (or, in a cluster, over the link to the node that owns it).
    pub(crate) fn to_peer(&self, key: u64, cmd: ShardCmd) {
        let cmd = match self.remote.get() {
            Some(remote) => match remote.divert(key, cmd) {
                Some(cmd) => cmd,
                None => return,
            },
            None => cmd,
        };
        self.to_shard(shard_of(key, self.peers.len()), cmd);
    }

    /// Queues a command on shard `shard`'s peer queue.
    pub(crate) fn to_shard(&self, shard: usize, cmd: ShardCmd) {
        self.peers[shard].send(cmd);
    }

    /// `marks`: this shard's groups' fan-out marks, to complete interrupted
    /// fan-outs before anything else.
    pub(crate) async fn run(&mut self, marks: Vec<(u64, u64)>) {
        self.recover_fanouts(marks);
        self.recover_receipts();
        self.load_businesses(None);
        self.load_campaigns(None);
        let mut cmds = Vec::with_capacity(self.config.batch_max);
        let mut last_trim = Instant::now();
        loop {
            if !self.drain(&mut cmds).await {
                break;
            }
            if self.process(&mut cmds) {
                // Work other shards handed over before they stopped.
                while let Ok(cmd) = self.peer_rx.try_recv() {
                    cmds.push(cmd);
                }
                self.stats.queue_popped[self.id as usize].inc_by(cmds.len() as u64);
                self.process(&mut cmds);
                break;
            }
            self.run_campaigns();
            if last_trim.elapsed() >= TRIM_INTERVAL {
                self.trim();
                self.prune_events();
                // Engagement rows held back by their once-a-second write.
                self.write_kv();
                self.retry_receipts();
                self.retry_fanouts();
                last_trim = Instant::now();
                self.lines.expire(last_trim);
            }
        }
        self.note_fanned();
        // What waits for its once-a-second write goes now, and the receipt
        // rows only this shard's memory had moved.
        self.flush_engagement();
        self.put_unwritten_receipt_rows();
        self.write_kv();
        if let Err(e) = self.store.sync() {
            error!(shard = self.id, error = %e, "store sync at shard stop failed");
        }
        debug!(shard = self.id, "shard stopped");
    }

    /// Waits for a command (at most until the next trim), then takes up to
    /// a batch of whatever else is queued, peers first. False once every
    /// session-side sender is gone.
    async fn drain(&mut self, cmds: &mut Vec<ShardCmd>) -> bool {
        let due = match (self.marks_due, self.campaigns_due()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let wait = match due {
            Some(due) => due
                .saturating_duration_since(Instant::now())
                .min(TRIM_INTERVAL),
            None => TRIM_INTERVAL,
        };
        let next = tokio::time::timeout(wait, async {
            tokio::select! {
                biased;
                Some(c) = self.peer_rx.recv() => Some(c),
                c = self.rx.recv() => c,
            }
        })
        .await;
        match next {
            Ok(Some(cmd)) => cmds.push(cmd),
            Ok(None) => return false,
            Err(_elapsed) => {}
        }
        while cmds.len() < self.config.batch_max {
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
        true
    }

    /// Handles one drained batch; returns true on `Stop`.
    fn process(&mut self, cmds: &mut Vec<ShardCmd>) -> bool {
        let mut batch = Batch::default();
        for cmd in cmds.drain(..) {
            self.take(cmd, &mut batch);
        }
        self.note_fanned();
        self.write_batch(&mut batch);
        // Queries read the cursors marks move, and a stopping shard keeps
        // nothing: both take every held mark now.
        let all = batch.stop || !batch.queries.is_empty();
        self.release_marks(all, &mut batch.marks);
        self.apply_marks(&mut batch.marks);
        self.write_kv();
        self.answer_queries(std::mem::take(&mut batch.queries));
        batch.stop
    }

    /// The one dispatch: plans a command into `batch`, or runs it.
    fn take(&mut self, cmd: ShardCmd, batch: &mut Batch) {
        match cmd {
            ShardCmd::Send(s) => self.plan_send(s, batch),
            ShardCmd::GroupSend(g) => self.plan_group_send(g, batch),
            ShardCmd::Refs(r) => self.plan_refs(r, batch),
            ShardCmd::GroupOp(op) => {
                // A membership change needs the exact group sequence of its
                // event: write what is planned first.
                self.write_batch(batch);
                self.group_op(op);
            }
            ShardCmd::Broadcast(b) => self.plan_broadcast(b),
            ShardCmd::BusinessSend(b) => self.admit_business_send(b),
            ShardCmd::BusinessAsk(a) => {
                // Its write is synced on its own: what is planned goes first.
                self.write_batch(batch);
                self.business_ask(a);
            }
            ShardCmd::BusinessAdmin(a) => {
                self.write_batch(batch);
                self.business_admin(a);
            }
            ShardCmd::BusinessOutcome(o) => self.business_outcome(o),
            ShardCmd::StatusView(v) => self.plan_status_view(v, batch),
            ShardCmd::ReceiptQuery(q) => batch.queries.push(q),
            ShardCmd::Mark(m) => self.hold_mark(m, batch),
            ShardCmd::Register(r) => {
                // Earlier marks (the user's held ones too) must be visible
                // in the state.
                self.release_marks_of(r.user, &mut batch.marks);
                self.apply_marks(&mut batch.marks);
                self.register(r);
            }
            ShardCmd::Unregister { user, session_id } => self.unregister(user, session_id),
            ShardCmd::GroupPush {
                group,
                message,
                users,
                accepted,
            } => self.push_group(group, message, users, accepted),
            ShardCmd::RefsDone { group, seq, code } => self.refs_done(group, seq, code),
            ShardCmd::CopyDone {
                sender,
                token,
                recipient,
                result,
                stored,
            } => self.copy_done(sender, token, recipient, result, stored),
            ShardCmd::ReceiptPartDone {
                reader,
                emission,
                ok,
            } => self.receipt_part_done(reader, emission, ok),
            ShardCmd::Shown(inboxes) => {
                for user in inboxes {
                    for session in self.sessions.get(&user).into_iter().flatten() {
                        session.catch_up();
                    }
                }
            }
            ShardCmd::Slots(change) => {
                // Whatever is planned was routed by the old map: write it
                // (the store refuses what it no longer serves).
                self.write_batch(batch);
                self.slots_changed(change);
            }
            ShardCmd::Stop => batch.stop = true,
        }
    }

    /// A shard moved away from this node or to it.
    pub(super) fn slots_changed(&mut self, change: SlotsChange) {
        match change {
            SlotsChange::Lost(run) => {
                // Before the sessions go: it finds the moved users' cached
                // entries through them.
                self.forget_slots(&run);
                let moving = |id: &u64| run.contains(&u16::from(slot_of(*id)));
                let mut ended = 0;
                self.sessions.retain(|user, list| {
                    if !moving(user) {
                        return true;
                    }
                    for s in list.iter() {
                        s.end_moved();
                        ended += 1;
                    }
                    false
                });
                debug!(
                    shard = self.id,
                    ended, "sessions of a shard that moved away ended"
                );
            }
            SlotsChange::Gained { run, marks } => {
                self.forget_slots(&run);
                self.recover_fanouts(marks);
                self.recover_receipts_in(Some(&run));
                self.load_businesses(Some(&run));
                self.load_campaigns(Some(&run));
            }
        }
    }

    /// Forgets what this shard keeps of ids whose slot is in `run`.
    fn forget_slots(&mut self, run: &std::ops::Range<u16>) {
        let inside = |id: u64| run.contains(&u16::from(slot_of(id)));
        self.forget_businesses(run);
        self.groups.retain(|g, _| !inside(*g));
        // Fan-outs of groups that moved: the new owner takes them up from
        // the group's log (past its `F` mark); senders still waiting hear
        // SHARD_UNAVAILABLE and retry there (a stored entry's retry is a
        // duplicate, answered once every part is stored).
        let moved: Vec<u64> = self
            .fanouts
            .keys()
            .copied()
            .filter(|g| inside(*g))
            .collect();
        for g in moved {
            for (_, mut pending) in self.fanouts.remove(&g).into_iter().flatten() {
                pending.failed = Some(courier_protocol::ErrorCode::SHARD_UNAVAILABLE);
                pending.answer();
            }
        }
        self.outbox.retain(|(reader, _), _| !inside(*reader));
        self.receipt_rows.retain(|u, _| !inside(*u));
        self.group_cursors.retain(|(_, u), _| !inside(*u));
        self.facts.forget(inside);
        self.held_marks.retain(|(u, _), _| !inside(*u));
        self.trim_pending.retain(|u| !inside(*u));
        let gone: Vec<u64> = self
            .sessions
            .keys()
            .copied()
            .filter(|u| inside(*u))
            .collect();
        for u in gone {
            self.recent.forget(u);
        }
    }

    fn answer_queries(&mut self, queries: Vec<ReceiptQueryCmd>) {
        for q in queries {
            match self.receipt_counts(q.group, q.seq, q.asker) {
                Ok((counts, elsewhere)) if !elsewhere.is_empty() => match self.remote.get() {
                    Some(remote) => remote.count_elsewhere(counts, elsewhere, q.answer),
                    None => error!(shard = self.id, "members elsewhere on a single node"),
                },
                counts => {
                    let _ = q.answer.send(counts.map(|(c, _)| c));
                }
            }
        }
    }

    /// A server timestamp that never goes backwards within this shard, and a
    /// server message id unique across shards: `ts_ms << 16 | shard << 10 | n`.
    pub(crate) fn next_ids(&mut self) -> (u64, u64) {
        let now = self.now_ms().max(self.last_ts_ms);
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
}

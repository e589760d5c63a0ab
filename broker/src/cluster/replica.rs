//! Replicated shards (`cluster.replication_factor` > 1): the primary's
//! stream of its writes to its backups, the backups' side, and the
//! in-sync set (ISR) in the shard's etcd record. The model is PacificA's
//! and Kafka's in-sync replicas, with etcd as the configuration manager.
//!
//! ```text
//!  primary (the shard's owner)                    backup (in `replicas`)
//!  shard loop: store write ─► WriteTap: the write's entries split by shard,
//!     each part numbered (epoch, lsn) ─► REPLICATE ─► tail: parts in lsn order,
//!     (pipelined: queued on the link at once)          each run of them one
//!                                                      synced import ─► applied
//!  the writer waits (settle) until every ISR  ◄──────── answers: applied lsn
//!  member has its parts: commit = min acked over ISR
//!  a backup that fails or is silent 2 s ─► ISR shrink: etcd txn on the
//!     record's revision (failed: deposed ─► stop serving the shard)
//!                                                 a copy not in sync (new,
//!                                                 returned, behind):
//!  FOLLOW: ISR shrink if it was in it; ◄───────── FOLLOW (parts now buffered)
//!     parts go to it from now on                  delete its run
//!  CHUNK from … : the run's entries  ◄──────────  import chunk by chunk
//!                                                 apply the buffered parts
//!  STATUS: caught up? ISR expand (txn) ◄────────  STATUS every 500 ms
//! ```
//!
//! Rules:
//! - a write is answered only once every ISR member has it durable; the
//!   ISR changes only by transactions on the record's revision, and a
//!   member leaves it (in etcd) before the writes it lacks are answered,
//!   joins it (in etcd) only once it holds every answered write;
//! - the controller promotes only an ISR member, as the only one in sync:
//!   the others copy the shard again (they may hold writes nobody
//!   answered, which the new primary does not have);
//! - backups take parts only from the primary their view names, at its
//!   epoch, in lsn order: a deposed primary's late parts are refused by
//!   the promoted member, so it cannot complete a write;
//! - a primary fences itself (stops serving its replicated shards) when
//!   its lease may have expired: at the send time of its last answered
//!   keep-alive plus the TTL minus a margin, before etcd can expire it.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use courier_storage::{
    shard_of_slot, slots_of_shard, AppendOutcome, ExpiringEntries, InboxState, InboxStore, KvOp,
    KvPairs, NewMessage, RawEntry, SlotTransfer, Space, StoreError, StoreHealth, StoredMessage,
    WriteTap,
};
use etcd_client::{Compare, CompareOp, Txn, TxnOp};
use prometheus::{Histogram, IntCounter, IntGauge, IntGaugeVec, Opts};
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

use super::member::within;
use super::transfer::{get_at, get_entries, put_at, put_entries, Slots};
use super::view::{Owner, View};
use super::wire::{self, WireError};
use super::Cluster;
use crate::metrics::Metrics;

/// How long a backup may take to answer a part before the primary takes
/// it out of the in-sync set.
const PART_DEADLINE: Duration = Duration::from_secs(2);
/// How long a follow, chunk or status request may take.
const ASK_DEADLINE: Duration = Duration::from_secs(10);
/// A snapshot chunk's size, about.
const CHUNK_BYTES: usize = 256 << 10;
/// Parts a copy buffers while it copies; beyond, it starts again.
const BUFFER_MAX_BYTES: usize = 256 << 20;
/// A copy joins the in-sync set once it is at most this many parts behind
/// (the rest are on their way to it, and answers wait for it from then).
const JOIN_LAG: u64 = 1024;
/// How often a backup asks its primary where it stands.
const STATUS_EVERY: Duration = Duration::from_millis(500);
/// The longest a writer waits for its parts (a backup that stops
/// answering is out of the in-sync set within a few seconds; etcd away,
/// the node fences itself within its lease).
const SETTLE_LIMIT: Duration = Duration::from_secs(30);

thread_local! {
    /// Parts this thread's writes produced and has not waited for:
    /// (shard, epoch, lsn). A write is told to the tap on its own thread.
    static WRITTEN: RefCell<Vec<(u32, i64, u64)>> = const { RefCell::new(Vec::new()) };
}

/// The metrics of replication.
pub struct ReplicaMetrics {
    isr_shrinks: IntCounter,
    isr_expands: IntCounter,
    rebuilds: IntCounter,
    parts_sent: IntCounter,
    parts_applied: IntCounter,
    primaries: IntGauge,
    under_replicated: IntGauge,
    isr: IntGaugeVec,
    lag_parts: IntGaugeVec,
    commit_seconds: Histogram,
}

impl ReplicaMetrics {
    /// The metrics, not registered yet (the store is wrapped before the
    /// node's registry exists).
    fn new() -> ReplicaMetrics {
        let counter = |name: &str, help: &str| IntCounter::new(name, help).expect("valid metric");
        let gauge = |name: &str, help: &str| IntGauge::new(name, help).expect("valid metric");
        let per_shard = |name: &str, help: &str| {
            IntGaugeVec::new(Opts::new(name, help), &["shard"]).expect("valid metric")
        };
        ReplicaMetrics {
            isr_shrinks: counter(
                "courier_replication_isr_shrinks_total",
                "Copies this node (as primary) took out of a shard's in-sync set: failed, silent 2 s, or starting a copy again.",
            ),
            isr_expands: counter(
                "courier_replication_isr_expands_total",
                "Copies this node (as primary) added to a shard's in-sync set once they had caught up.",
            ),
            rebuilds: counter(
                "courier_replication_rebuilds_total",
                "Copies of a shard this node (as backup) started again from the primary: deleted, copied, then tailed.",
            ),
            parts_sent: counter(
                "courier_replication_parts_sent_total",
                "Parts (one shard's share of one write) sent to backups.",
            ),
            parts_applied: counter(
                "courier_replication_parts_applied_total",
                "Parts this node applied as a backup.",
            ),
            primaries: gauge(
                "courier_replication_primary_shards",
                "Replicated shards this node leads.",
            ),
            under_replicated: gauge(
                "courier_replication_under_replicated_shards",
                "Shards this node leads whose in-sync set is smaller than the replication factor (an alert fires on it).",
            ),
            isr: per_shard(
                "courier_replication_isr_size",
                "In-sync copies of each shard this node leads, itself included.",
            ),
            lag_parts: per_shard(
                "courier_replication_lag_parts",
                "For each shard this node leads: parts written and not yet applied by its slowest copy.",
            ),
            commit_seconds: crate::metrics::histogram(
                "courier_replication_commit_seconds",
                "From a replicated write's local commit to every in-sync copy having it (the writer's wait).",
                crate::metrics::LATENCY_BUCKETS,
            ),
        }
    }

    fn register(&self, metrics: &Metrics) {
        for c in [
            &self.isr_shrinks,
            &self.isr_expands,
            &self.rebuilds,
            &self.parts_sent,
            &self.parts_applied,
        ] {
            metrics.register(c.clone());
        }
        metrics.register(self.primaries.clone());
        metrics.register(self.under_replicated.clone());
        metrics.register(self.isr.clone());
        metrics.register(self.lag_parts.clone());
        metrics.register(self.commit_seconds.clone());
    }
}

/// A shard this node leads: its stream of parts.
struct Stream {
    epoch: i64,
    /// The record's revision as last known (what an ISR change is
    /// conditioned on).
    revision: i64,
    replicas: Vec<String>,
    /// The in-sync set in etcd, this node included.
    isr: Vec<String>,
    /// A copy being added to the set: counted in the commit from before
    /// the transaction until it ends.
    joining: Option<String>,
    /// The next part's number (the first is 1).
    next_lsn: u64,
    /// Every copy parts go to, with the highest part it has applied.
    followers: BTreeMap<String, u64>,
    /// An ISR change under way.
    changing: bool,
    /// Why the stream takes and completes nothing (deposed, fenced).
    broken: Option<&'static str>,
    /// When each part not yet committed was written, oldest first.
    written_at: std::collections::VecDeque<(u64, Instant)>,
    /// The highest commit any writer may have seen: a copy joins the
    /// in-sync set only once it has applied this far.
    high: u64,
}

impl Stream {
    fn new(me: &str, o: &Owner) -> Stream {
        let mut isr = o.isr.clone();
        if !isr.iter().any(|n| n == me) {
            isr.push(me.to_owned());
        }
        Stream {
            epoch: o.epoch,
            revision: o.revision,
            replicas: o.replicas.clone(),
            isr,
            joining: None,
            next_lsn: 1,
            followers: BTreeMap::new(),
            changing: false,
            broken: None,
            written_at: Default::default(),
            high: 0,
        }
    }

    /// The highest part every member that counts has applied.
    fn committed(&self, me: &str) -> u64 {
        let head = self.next_lsn - 1;
        self.isr
            .iter()
            .chain(self.joining.iter())
            .filter(|n| *n != me)
            .map(|n| self.followers.get(n).copied().unwrap_or(0))
            .min()
            .unwrap_or(head)
            .min(head)
    }

    /// The in-sync set this stream wants: members it still sends to.
    fn wanted_isr(&self, me: &str) -> Vec<String> {
        self.isr
            .iter()
            .filter(|n| *n == me || self.followers.contains_key(*n))
            .cloned()
            .collect()
    }
}

#[derive(Default)]
struct Primaries {
    /// Shards of the cluster (0 before the map).
    count: u32,
    /// The cluster's replication factor.
    factor: u32,
    streams: HashMap<u32, Stream>,
    /// The node may have lost its lease: every stream refuses.
    fenced: bool,
}

/// What an ISR change's answer did.
enum Changed {
    Done,
    /// The stream is gone (the shard is not this node's any more).
    Gone,
    Deposed,
    Retry,
}

/// A part on its way to a backup's store.
struct Part {
    lsn: u64,
    entries: Vec<RawEntry>,
    answer: Option<oneshot::Sender<Result<u64, String>>>,
}

/// A backup's copy of one shard: where its parts come from.
struct Tail {
    primary: String,
    epoch: i64,
    /// Copying: parts are kept until the copy is done.
    buffering: Option<Vec<Part>>,
    buffered_bytes: usize,
    /// The last part taken (buffered or applied); `None`: any may come
    /// first (before the primary has said where the copy starts).
    last: Option<u64>,
    /// Applied parts go here, in order (while tailing).
    apply: Option<mpsc::UnboundedSender<Part>>,
    /// The highest part applied, durably.
    applied: Arc<AtomicU64>,
    /// Which incarnation of the copy this is.
    id: u64,
}

/// Replication on one node: the primary side of the shards it leads and
/// the backup side of the shards it copies.
pub struct Replication {
    me: String,
    inner: Arc<dyn InboxStore>,
    primaries: Mutex<Primaries>,
    /// Wakes writers waiting for their parts.
    settled: Condvar,
    tails: Mutex<HashMap<u32, Tail>>,
    next_tail: AtomicU64,
    /// Shards with a backup task running here.
    following: Mutex<BTreeSet<u32>>,
    cluster: OnceLock<Arc<Cluster>>,
    slots: OnceLock<Arc<Slots>>,
    runtime: tokio::runtime::Handle,
    metrics: ReplicaMetrics,
    /// Set once a replicated map is seen (taps only then).
    tapping: AtomicBool,
}

impl Replication {
    /// Replication for `store` (the node's slotted store); idle until
    /// [`Replication::start`] and a map with a factor above 1.
    pub fn new(me: String, store: Arc<dyn InboxStore>) -> Arc<Replication> {
        Arc::new(Replication {
            me,
            inner: store,
            primaries: Mutex::new(Primaries::default()),
            settled: Condvar::new(),
            tails: Mutex::new(HashMap::new()),
            next_tail: AtomicU64::new(1),
            following: Mutex::new(BTreeSet::new()),
            cluster: OnceLock::new(),
            slots: OnceLock::new(),
            runtime: tokio::runtime::Handle::current(),
            metrics: ReplicaMetrics::new(),
            tapping: AtomicBool::new(false),
        })
    }

    /// Connects to the cluster once joined, and starts the fence watch.
    pub fn start(self: &Arc<Self>, cluster: Arc<Cluster>, slots: Arc<Slots>, metrics: &Metrics) {
        self.metrics.register(metrics);
        let _ = cluster.replication.set(self.clone());
        let view = cluster.view();
        let _ = self.cluster.set(cluster);
        // What views came before this could not reach the cluster yet.
        self.follow(&view);
        let _ = self.slots.set(slots);
        self.runtime.spawn(self.clone().fence_watch());
    }

    /// The store the node's shards and sessions write through: each write
    /// returns once its parts are on every in-sync copy.
    pub fn store(self: &Arc<Self>) -> Arc<dyn InboxStore> {
        Arc::new(ReplicatedStore {
            replication: self.clone(),
        })
    }

    fn cluster(&self) -> Option<&Arc<Cluster>> {
        self.cluster.get()
    }

    // ----- views -----

    /// Follows a new view, before anything routes by it: streams for the
    /// shards this node leads, tails dropped for shards it no longer
    /// copies from that primary, backup tasks for the shards it copies.
    pub fn follow(self: &Arc<Self>, view: &View) {
        if view.replication() <= 1 || !view.map_complete() {
            return;
        }
        if !self.tapping.swap(true, Ordering::AcqRel) {
            if let Some(t) = self.inner.transfer() {
                t.set_tap(Some(Arc::new(Tapped(self.clone()))));
            }
        }
        let mut shrink = Vec::new();
        {
            let mut p = self.primaries.lock().expect("primaries lock");
            p.count = view.owners.len() as u32;
            p.factor = view.replication();
            let mut mine = BTreeSet::new();
            for (shard, o) in view.owners.iter().enumerate() {
                let Some(o) = o.as_ref().filter(|o| o.node == self.me) else {
                    continue;
                };
                let shard = shard as u32;
                mine.insert(shard);
                match p.streams.get_mut(&shard) {
                    Some(s) if s.epoch == o.epoch => {
                        if o.revision > s.revision && !s.changing {
                            s.revision = o.revision;
                            s.isr = o.isr.clone();
                            s.replicas = o.replicas.clone();
                        }
                        if !s.changing && s.broken.is_none() && s.wanted_isr(&self.me) != s.isr {
                            shrink.push(shard);
                        }
                    }
                    _ => {
                        let s = Stream::new(&self.me, o);
                        // A new stream has no follower yet: every other
                        // member copies again before it is in sync.
                        if s.wanted_isr(&self.me) != s.isr {
                            shrink.push(shard);
                        }
                        info!(shard, epoch = o.epoch, isr = ?o.isr, "leading a replicated shard");
                        p.streams.insert(shard, s);
                    }
                }
            }
            p.streams.retain(|shard, _| mine.contains(shard));
            self.gauge(&p);
        }
        self.settled.notify_all();
        for shard in shrink {
            self.change_isr(shard);
        }
        // Backups: a tail stays only while its primary and epoch stand.
        let mut copies = Vec::new();
        {
            let mut tails = self.tails.lock().expect("tails lock");
            tails.retain(|shard, t| {
                view.owners
                    .get(*shard as usize)
                    .and_then(|o| o.as_ref())
                    .is_some_and(|o| o.node == t.primary && o.epoch == t.epoch)
            });
            for (shard, o) in view.owners.iter().enumerate() {
                if let Some(o) = o {
                    if o.node != self.me && o.replicas.contains(&self.me) {
                        copies.push(shard as u32);
                    }
                }
            }
        }
        let mut following = self.following.lock().expect("following lock");
        for shard in copies {
            if following.insert(shard) {
                self.runtime.spawn(self.clone().backup(shard));
            }
        }
        drop(following);
        self.fence_shards();
    }

    /// Sets the gauges of the shards this node leads.
    fn gauge(&self, p: &Primaries) {
        self.metrics.primaries.set(p.streams.len() as i64);
        self.metrics.isr.reset();
        self.metrics.lag_parts.reset();
        let mut under = 0;
        for (shard, s) in &p.streams {
            let label = shard.to_string();
            self.metrics
                .isr
                .with_label_values(&[&label])
                .set(s.isr.len() as i64);
            let head = s.next_lsn - 1;
            let slowest = s.followers.values().min().copied().unwrap_or(head);
            self.metrics
                .lag_parts
                .with_label_values(&[&label])
                .set(head.saturating_sub(slowest) as i64);
            if (s.isr.len() as u32) < p.factor {
                under += 1;
            }
        }
        self.metrics.under_replicated.set(under);
    }

    // ----- the primary's side -----

    /// A write's entries, committed here: each shard's part goes to its
    /// followers, numbered.
    fn committed(self: &Arc<Self>, entries: Vec<RawEntry>) {
        let mut p = self.primaries.lock().expect("primaries lock");
        if p.streams.is_empty() {
            return;
        }
        let count = p.count;
        let mut parts: Vec<(u32, Vec<RawEntry>)> = Vec::new();
        for e in entries {
            let key = match &e {
                RawEntry::Put { key, .. } | RawEntry::Delete { key, .. } => key,
                RawEntry::DeleteRange { from, .. } => from,
            };
            let Some(&slot) = key.first() else { continue };
            let shard = shard_of_slot(slot, count);
            match parts.iter_mut().find(|(s, _)| *s == shard) {
                Some((_, part)) => part.push(e),
                None => parts.push((shard, vec![e])),
            }
        }
        let fenced = p.fenced;
        for (shard, part) in parts {
            let Some(s) = p.streams.get_mut(&shard) else {
                continue;
            };
            if fenced || s.broken.is_some() {
                // Told to the writer: its wait fails.
                WRITTEN.with(|w| w.borrow_mut().push((shard, s.epoch, u64::MAX)));
                continue;
            }
            let lsn = s.next_lsn;
            s.next_lsn += 1;
            s.written_at.push_back((lsn, Instant::now()));
            WRITTEN.with(|w| w.borrow_mut().push((shard, s.epoch, lsn)));
            if s.followers.is_empty() {
                continue;
            }
            let body = Request::Replicate {
                lsn,
                entries: &part,
            }
            .encode(shard, s.epoch);
            let epoch = s.epoch;
            let followers: Vec<String> = s.followers.keys().cloned().collect();
            for node in followers {
                self.send_part(shard, epoch, &node, lsn, body.clone());
            }
        }
    }

    /// Queues a part on the link to `node` now (in lsn order: the caller
    /// holds the primaries' lock) and sees to its answer.
    fn send_part(self: &Arc<Self>, shard: u32, epoch: i64, node: &str, lsn: u64, body: Bytes) {
        let peer = self.cluster().and_then(|c| c.links.peer(node));
        let started = peer.map(|p| p.start_request(body, PART_DEADLINE));
        self.metrics.parts_sent.inc();
        let Some(Ok((_, answer))) = started else {
            // The caller holds the primaries' lock: later.
            let (me, node) = (self.clone(), node.to_owned());
            self.runtime
                .spawn(async move { me.lost_follower(shard, epoch, &node, "the link refused it") });
            return;
        };
        let me = self.clone();
        let node = node.to_owned();
        self.runtime.spawn(async move {
            match answer.await {
                Ok(b) => match Answer::decode(b) {
                    Ok(Answer::Done(mut b)) if b.remaining() >= 8 => {
                        let applied = b.get_u64();
                        me.acked(shard, epoch, &node, applied);
                    }
                    Ok(Answer::Done(_)) => me.lost_follower(shard, epoch, &node, "a short answer"),
                    Ok(Answer::Refused(why)) => {
                        warn!(shard, node = %node, lsn, why, "a backup refused a part");
                        me.lost_follower(shard, epoch, &node, "refused a part");
                    }
                    Err(e) => me.lost_follower(shard, epoch, &node, &format!("bad answer: {e}")),
                },
                Err(e) => me.lost_follower(shard, epoch, &node, &e.to_string()),
            }
        });
    }

    /// `node` has applied parts of `shard` up to `applied`.
    fn acked(&self, shard: u32, epoch: i64, node: &str, applied: u64) {
        let mut p = self.primaries.lock().expect("primaries lock");
        let Some(s) = p.streams.get_mut(&shard).filter(|s| s.epoch == epoch) else {
            return;
        };
        if let Some(a) = s.followers.get_mut(node) {
            *a = (*a).max(applied);
        }
        let committed = s.committed(&self.me);
        s.high = s.high.max(committed);
        while s.written_at.front().is_some_and(|(l, _)| *l <= committed) {
            let (_, at) = s.written_at.pop_front().expect("checked");
            self.metrics
                .commit_seconds
                .observe(at.elapsed().as_secs_f64());
        }
        drop(p);
        self.settled.notify_all();
    }

    /// `node` no longer takes `shard`'s parts: out of the followers, and
    /// out of the in-sync set if it was in it.
    fn lost_follower(self: &Arc<Self>, shard: u32, epoch: i64, node: &str, why: &str) {
        let in_set = {
            let mut p = self.primaries.lock().expect("primaries lock");
            let Some(s) = p.streams.get_mut(&shard).filter(|s| s.epoch == epoch) else {
                return;
            };
            if s.followers.remove(node).is_none() {
                return;
            }
            s.isr.iter().any(|n| n == node) || s.joining.as_deref() == Some(node)
        };
        warn!(
            shard,
            node,
            why,
            in_sync = in_set,
            "a copy stopped following the shard"
        );
        if in_set {
            self.change_isr(shard);
        }
    }

    /// Brings `shard`'s in-sync set in etcd to what its stream wants (its
    /// followers in the set, plus a joining copy), one change at a time.
    fn change_isr(self: &Arc<Self>, shard: u32) {
        let me = self.clone();
        self.runtime
            .spawn(async move { me.run_isr_change(shard).await });
    }

    async fn run_isr_change(self: Arc<Self>, shard: u32) {
        let Some(cluster) = self.cluster().cloned() else {
            return;
        };
        loop {
            let (owner, wanted, joining) = {
                let mut p = self.primaries.lock().expect("primaries lock");
                let Some(s) = p.streams.get_mut(&shard) else {
                    return;
                };
                if s.changing || s.broken.is_some() {
                    return;
                }
                let mut wanted = s.wanted_isr(&self.me);
                if let Some(j) = s.joining.clone() {
                    match s.followers.get(&j) {
                        // In the set only once it holds every write a
                        // writer may have been told is committed (it
                        // counts in the commit from the moment it began
                        // joining, so it gets there).
                        Some(&applied) if applied >= s.high => {
                            if !wanted.contains(&j) {
                                wanted.push(j);
                            }
                        }
                        Some(_) => {}
                        None => s.joining = None,
                    }
                }
                if wanted == s.isr {
                    if s.joining.as_ref().is_some_and(|j| s.isr.contains(j)) {
                        s.joining = None;
                    }
                    return;
                }
                s.changing = true;
                let owner = Owner {
                    node: self.me.clone(),
                    epoch: s.epoch,
                    revision: s.revision,
                    replicas: s.replicas.clone(),
                    isr: s.isr.clone(),
                };
                (owner, wanted, s.joining.clone())
            };
            let key = cluster.keys.shard(shard);
            let record = owner.with_isr(wanted.clone());
            let txn = Txn::new()
                .when([Compare::mod_revision(
                    key.clone(),
                    CompareOp::Equal,
                    owner.revision,
                )])
                .and_then([TxnOp::put(
                    key.clone(),
                    serde_json::to_vec(&record).expect("a record serializes"),
                    None,
                )])
                .or_else([TxnOp::get(key, None)]);
            let mut client = cluster.client.clone();
            let answer = within("change a shard's in-sync set", client.txn(txn)).await;
            match self.isr_changed(shard, &owner, &wanted, joining, answer) {
                Changed::Done => self.settled.notify_all(),
                Changed::Gone => return,
                Changed::Deposed => {
                    self.settled.notify_all();
                    self.fence_shards();
                    return;
                }
                Changed::Retry => tokio::time::sleep(Duration::from_millis(500)).await,
            }
        }
    }

    /// Takes the answer of an ISR change into the stream.
    fn isr_changed(
        &self,
        shard: u32,
        owner: &Owner,
        wanted: &[String],
        joining: Option<String>,
        answer: anyhow::Result<etcd_client::TxnResponse>,
    ) -> Changed {
        let mut p = self.primaries.lock().expect("primaries lock");
        let Some(s) = p.streams.get_mut(&shard).filter(|s| s.epoch == owner.epoch) else {
            return Changed::Gone;
        };
        s.changing = false;
        match answer {
            Ok(a) if a.succeeded() => {
                let grew = wanted.len() > s.isr.len();
                s.revision = a.header().map_or(s.revision, |h| h.revision());
                s.isr = wanted.to_vec();
                if joining.is_some() && s.joining == joining {
                    s.joining = None;
                }
                if grew {
                    self.metrics.isr_expands.inc();
                } else {
                    self.metrics.isr_shrinks.inc();
                }
                info!(shard, isr = ?wanted, "the shard's in-sync set changed");
                Changed::Done
            }
            Ok(a) => {
                // Someone else wrote the record: the controller (a
                // failover), so this node is deposed; or a revision this
                // stream had not taken yet.
                let now = a.op_responses().into_iter().find_map(|r| match r {
                    etcd_client::TxnOpResponse::Get(g) => g.kvs().first().map(|kv| {
                        (
                            kv.mod_revision(),
                            serde_json::from_slice::<super::view::ShardRecord>(kv.value()),
                        )
                    }),
                    _ => None,
                });
                match now {
                    Some((rev, Ok(r)))
                        if r.owner == self.me && r.epoch.unwrap_or(rev) == s.epoch =>
                    {
                        s.revision = rev;
                        s.isr = if r.isr.is_empty() {
                            vec![r.owner]
                        } else {
                            r.isr
                        };
                        Changed::Done
                    }
                    _ => {
                        warn!(shard, "the shard's record changed under this primary: deposed, no longer serving it");
                        s.broken = Some("deposed");
                        Changed::Deposed
                    }
                }
            }
            Err(e) => {
                warn!(shard, error = %format!("{e:#}"), "cannot change the shard's in-sync set yet; retrying");
                Changed::Retry
            }
        }
    }

    /// Waits until every part this thread's writes produced is on every
    /// in-sync copy.
    fn settle(&self) -> Result<(), StoreError> {
        let written = WRITTEN.with(|w| std::mem::take(&mut *w.borrow_mut()));
        if written.is_empty() {
            return Ok(());
        }
        let deadline = Instant::now() + SETTLE_LIMIT;
        let mut p = self.primaries.lock().expect("primaries lock");
        for (shard, epoch, lsn) in written {
            loop {
                let s = p.streams.get(&shard).filter(|s| s.epoch == epoch);
                let Some(s) = s.filter(|s| s.broken.is_none() && lsn != u64::MAX) else {
                    return Err(StoreError::Unreplicated(format!(
                        "shard {shard} is not served here any more"
                    )));
                };
                if p.fenced {
                    return Err(StoreError::Unreplicated(
                        "this node may have lost its lease".into(),
                    ));
                }
                let committed = s.committed(&self.me);
                if committed >= lsn {
                    if let Some(s) = p.streams.get_mut(&shard) {
                        s.high = s.high.max(committed);
                    }
                    break;
                }
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(StoreError::Unreplicated(format!(
                        "shard {shard}'s copies did not confirm in {SETTLE_LIMIT:?}"
                    )));
                }
                p = self
                    .settled
                    .wait_timeout(p, left.min(Duration::from_millis(100)))
                    .expect("primaries lock")
                    .0;
            }
        }
        Ok(())
    }

    /// Forgets the parts of a write nobody waits for (lazy writes: they
    /// are streamed in order all the same).
    fn forget_written(&self) {
        WRITTEN.with(|w| w.borrow_mut().clear());
    }

    /// Serves only the shards whose streams are whole (a deposed shard,
    /// or all while fenced, are not served).
    fn fence_shards(&self) {
        let Some(slots) = self.slots.get() else {
            return;
        };
        let fenced: BTreeSet<u32> = {
            let p = self.primaries.lock().expect("primaries lock");
            p.streams
                .iter()
                .filter(|(_, s)| p.fenced || s.broken.is_some())
                .map(|(shard, _)| *shard)
                .collect()
        };
        slots.set_fenced(fenced);
    }

    /// Fences the node's replicated shards while its lease may have
    /// expired; serves them again once a keep-alive is answered (a lease
    /// that did expire is a new registration: the view decides what is
    /// still this node's, and streams that were fenced start alone in
    /// sync, their copies following again).
    async fn fence_watch(self: Arc<Self>) {
        let Some(cluster) = self.cluster().cloned() else {
            return;
        };
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        let mut ticks = 0u64;
        loop {
            tick.tick().await;
            if cluster.stop.is_cancelled() {
                return;
            }
            ticks += 1;
            if ticks % 20 == 0 {
                self.gauge(&self.primaries.lock().expect("primaries lock"));
            }
            let expired = !cluster.lease_valid();
            let changed = {
                let mut p = self.primaries.lock().expect("primaries lock");
                if p.fenced == expired {
                    false
                } else {
                    p.fenced = expired;
                    if expired {
                        warn!(
                            "this node's lease may have expired: its replicated shards are fenced"
                        );
                    } else {
                        info!("lease renewed: serving the replicated shards again");
                        for s in p.streams.values_mut() {
                            s.followers.clear();
                            s.written_at.clear();
                        }
                    }
                    true
                }
            };
            if changed {
                self.settled.notify_all();
                self.fence_shards();
                if !expired {
                    let shards: Vec<u32> = self
                        .primaries
                        .lock()
                        .expect("primaries lock")
                        .streams
                        .keys()
                        .copied()
                        .collect();
                    for shard in shards {
                        self.change_isr(shard);
                    }
                }
            }
        }
    }

    /// A copy asks to follow `shard`: out of the in-sync set first if it
    /// is in it (it deletes its copy next), then parts go to it from now.
    async fn serve_follow(self: Arc<Self>, from: String, shard: u32, epoch: i64) -> Answer {
        let deadline = Instant::now() + ASK_DEADLINE;
        loop {
            {
                let mut p = self.primaries.lock().expect("primaries lock");
                let fenced = p.fenced;
                let Some(s) = p.streams.get_mut(&shard).filter(|s| s.epoch == epoch) else {
                    return Answer::Refused(format!("not the primary of shard {shard} at {epoch}"));
                };
                if fenced || s.broken.is_some() {
                    return Answer::Refused("this primary is fenced".into());
                }
                s.followers.remove(&from);
                if s.joining.as_deref() == Some(from.as_str()) {
                    s.joining = None;
                }
                let in_set = s.isr.contains(&from);
                if !in_set && !s.changing {
                    s.followers.insert(from.clone(), 0);
                    let start = s.next_lsn;
                    info!(shard, node = %from, start, "a copy follows the shard");
                    return Answer::Done(Bytes::copy_from_slice(&start.to_be_bytes()));
                }
            }
            self.change_isr(shard);
            if Instant::now() > deadline {
                return Answer::Refused("the in-sync set could not be changed in time".into());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Reads a chunk of `shard` for a copy (blocking).
    fn serve_chunk(&self, shard: u32, epoch: i64, from: Option<(Space, Vec<u8>)>) -> Answer {
        let count = {
            let p = self.primaries.lock().expect("primaries lock");
            match p.streams.get(&shard) {
                Some(s) if s.epoch == epoch && s.broken.is_none() => p.count,
                _ => {
                    return Answer::Refused(format!("not the primary of shard {shard} at {epoch}"))
                }
            }
        };
        let Some(t) = self.inner.transfer() else {
            return Answer::Refused("no slotted store".into());
        };
        match t.export(slots_of_shard(shard, count), from, CHUNK_BYTES) {
            Ok(chunk) => {
                let mut out = BytesMut::new();
                put_at(&mut out, &chunk.next);
                put_entries(&mut out, &chunk.entries);
                Answer::Done(out.freeze())
            }
            Err(e) => Answer::Refused(format!("reading the shard: {e}")),
        }
    }

    /// Where a copy stands: 0 not following (start again), 1 following,
    /// 2 in the in-sync set. A copy that has applied enough is added.
    fn serve_status(self: &Arc<Self>, from: &str, shard: u32, epoch: i64, applied: u64) -> Answer {
        let state = {
            let mut p = self.primaries.lock().expect("primaries lock");
            let fenced = p.fenced;
            match p.streams.get_mut(&shard).filter(|s| s.epoch == epoch) {
                Some(s) if !fenced && s.broken.is_none() => match s.followers.get_mut(from) {
                    None => 0u8,
                    Some(a) => {
                        *a = (*a).max(applied);
                        let a = *a;
                        if s.isr.iter().any(|n| n == from) {
                            2
                        } else {
                            if s.joining.is_none() && !s.changing && a + JOIN_LAG >= s.next_lsn - 1
                            {
                                s.joining = Some(from.to_owned());
                            }
                            1
                        }
                    }
                },
                _ => 0,
            }
        };
        if state == 1 {
            self.change_isr(shard);
        }
        Answer::Done(Bytes::copy_from_slice(&[state]))
    }

    // ----- the backup's side -----

    /// A part from `from`: refused unless this node copies `shard` from
    /// that primary at that epoch and the part is the next one.
    fn take_part(
        &self,
        from: &str,
        shard: u32,
        epoch: i64,
        lsn: u64,
        entries: Vec<RawEntry>,
    ) -> Result<oneshot::Receiver<Result<u64, String>>, String> {
        let mut tails = self.tails.lock().expect("tails lock");
        let Some(t) = tails.get_mut(&shard) else {
            return Err(format!("not copying shard {shard}"));
        };
        if t.primary != from || t.epoch != epoch {
            return Err(format!(
                "copying shard {shard} from {} at {}, not {from} at {epoch}",
                t.primary, t.epoch
            ));
        }
        if let Some(last) = t.last.filter(|l| lsn != l + 1) {
            let why = format!("part {lsn} after {last}: a gap");
            tails.remove(&shard);
            return Err(why);
        }
        t.last = Some(lsn);
        let (tx, rx) = oneshot::channel();
        if let Some(buffer) = t.buffering.as_mut() {
            t.buffered_bytes += super::transfer::entries_len(&entries);
            if t.buffered_bytes > BUFFER_MAX_BYTES {
                tails.remove(&shard);
                return Err("too much written while copying; starting again".into());
            }
            buffer.push(Part {
                lsn,
                entries,
                answer: None,
            });
            // Not applied yet: the primary counts it once the copy is done.
            let _ = tx.send(Ok(0));
            return Ok(rx);
        }
        let part = Part {
            lsn,
            entries,
            answer: Some(tx),
        };
        match t.apply.as_ref().map(|a| a.send(part)) {
            Some(Ok(())) => Ok(rx),
            _ => {
                tails.remove(&shard);
                Err("the copy's applier stopped".into())
            }
        }
    }

    /// Keeps this node's copy of `shard` following its primary for as long
    /// as the view makes it a backup.
    async fn backup(self: Arc<Self>, shard: u32) {
        let Some(cluster) = self.cluster().cloned() else {
            self.following
                .lock()
                .expect("following lock")
                .remove(&shard);
            return;
        };
        loop {
            if cluster.stop.is_cancelled() {
                break;
            }
            let view = cluster.view();
            let Some(o) = view.owners.get(shard as usize).and_then(|o| o.clone()) else {
                break;
            };
            if o.node == self.me || !o.replicas.contains(&self.me) || view.replication() <= 1 {
                break;
            }
            if !view.nodes.contains_key(&o.node) {
                // The primary is gone: wait for the controller.
                tokio::time::sleep(STATUS_EVERY).await;
                continue;
            }
            let run = slots_of_shard(shard, view.owners.len() as u32);
            match self.copy(&cluster, shard, &o, run).await {
                Ok(id) => self.tail(&cluster, shard, &o, id).await,
                Err(e) => {
                    warn!(shard, primary = %o.node, error = %format!("{e:#}"), "copying the shard failed; trying again");
                    self.drop_tail(shard, None);
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
        self.drop_tail(shard, None);
        self.following
            .lock()
            .expect("following lock")
            .remove(&shard);
    }

    fn drop_tail(&self, shard: u32, id: Option<u64>) {
        let mut tails = self.tails.lock().expect("tails lock");
        if tails
            .get(&shard)
            .is_some_and(|t| id.is_none_or(|id| t.id == id))
        {
            tails.remove(&shard);
        }
    }

    /// Copies `shard` from its primary: follow (parts buffered from now),
    /// delete this node's copy, import the chunks, apply the buffered
    /// parts, then tail. Returns the tail's id.
    async fn copy(
        &self,
        cluster: &Arc<Cluster>,
        shard: u32,
        o: &Owner,
        run: Range<u16>,
    ) -> anyhow::Result<u64> {
        let peer = cluster
            .links
            .peer(&o.node)
            .ok_or_else(|| anyhow::anyhow!("no link to {}", o.node))?;
        let id = self.next_tail.fetch_add(1, Ordering::Relaxed);
        let applied = Arc::new(AtomicU64::new(0));
        self.tails.lock().expect("tails lock").insert(
            shard,
            Tail {
                primary: o.node.clone(),
                epoch: o.epoch,
                buffering: Some(Vec::new()),
                buffered_bytes: 0,
                last: None,
                apply: None,
                applied: applied.clone(),
                id,
            },
        );
        self.metrics.rebuilds.inc();
        let started = Instant::now();
        let answer = peer
            .request(Request::Follow.encode(shard, o.epoch), ASK_DEADLINE)
            .await?;
        let mut b = Answer::decode(answer)?.done()?;
        wire::need(&b, 8)?;
        let start = b.get_u64();
        {
            // From here every part must follow the one before, from the
            // first the primary sends this copy.
            let mut tails = self.tails.lock().expect("tails lock");
            let t = tails
                .get_mut(&shard)
                .filter(|t| t.id == id)
                .ok_or_else(|| anyhow::anyhow!("the copy was called off"))?;
            match t.buffering.as_ref().and_then(|b| b.first()) {
                Some(first) => anyhow::ensure!(
                    first.lsn == start,
                    "the first part buffered is {}, the copy starts at {start}",
                    first.lsn
                ),
                None => t.last = Some(start.saturating_sub(1)),
            }
        }
        let store = self.inner.clone();
        let deleting = run.clone();
        tokio::task::spawn_blocking(move || {
            store.transfer().expect("slotted").delete_slots(deleting)
        })
        .await??;
        let mut from = None;
        let mut chunks = 0;
        loop {
            let answer = peer
                .request(
                    Request::Chunk { from: &from }.encode(shard, o.epoch),
                    ASK_DEADLINE,
                )
                .await?;
            let mut b = Answer::decode(answer)?.done()?;
            let next = get_at(&mut b)?;
            let entries = get_entries(&mut b)?;
            let store = self.inner.clone();
            tokio::task::spawn_blocking(move || {
                store.transfer().expect("slotted").import(&entries)
            })
            .await??;
            chunks += 1;
            match next {
                Some(n) => from = Some(n),
                None => break,
            }
        }
        // The buffered parts, then tailing: one applier, parts in order.
        let (tx, rx) = mpsc::unbounded_channel();
        let buffered = {
            let mut tails = self.tails.lock().expect("tails lock");
            let t = tails
                .get_mut(&shard)
                .filter(|t| t.id == id)
                .ok_or_else(|| {
                    anyhow::anyhow!("the copy was called off (a gap, or the view changed)")
                })?;
            let parts = t.buffering.take().unwrap_or_default();
            t.apply = Some(tx.clone());
            parts
        };
        let count = buffered.len();
        for part in buffered {
            let _ = tx.send(part);
        }
        drop(tx);
        self.runtime.spawn(apply(
            self.inner.clone(),
            rx,
            applied,
            self.metrics.parts_applied.clone(),
        ));
        info!(
            shard,
            primary = %o.node,
            chunks,
            buffered = count,
            ms = started.elapsed().as_millis() as u64,
            "copied the shard; tailing its primary"
        );
        Ok(id)
    }

    /// Tells the primary where this copy stands every [`STATUS_EVERY`]
    /// until it is not following any more (a gap, the primary says so, a
    /// new view).
    async fn tail(&self, cluster: &Arc<Cluster>, shard: u32, o: &Owner, id: u64) {
        let mut in_sync = false;
        loop {
            tokio::time::sleep(STATUS_EVERY).await;
            let applied = {
                let tails = self.tails.lock().expect("tails lock");
                match tails.get(&shard).filter(|t| t.id == id) {
                    Some(t) => t.applied.load(Ordering::Acquire),
                    None => return,
                }
            };
            let Some(peer) = cluster.links.peer(&o.node) else {
                return;
            };
            let answer = peer
                .request(
                    Request::Status { applied }.encode(shard, o.epoch),
                    ASK_DEADLINE,
                )
                .await;
            let state = match answer.map_err(anyhow::Error::from).and_then(|b| {
                let b = Answer::decode(b)?.done()?;
                Ok(b.first().copied().unwrap_or(0))
            }) {
                Ok(s) => s,
                Err(e) => {
                    warn!(shard, error = %format!("{e:#}"), "the shard's primary did not answer a status");
                    0
                }
            };
            match state {
                0 => {
                    self.drop_tail(shard, Some(id));
                    return;
                }
                2 if !in_sync => {
                    in_sync = true;
                    info!(shard, primary = %o.node, applied, "this copy of the shard is in sync");
                }
                _ => {}
            }
        }
    }

    /// What this node holds of every shard it leads or copies, for
    /// comparing copies (`GET /admin/cluster/digests`). Blocking.
    pub fn digests(&self, view: &View) -> serde_json::Value {
        let Some(t) = self.inner.transfer() else {
            return serde_json::json!({ "shards": [] });
        };
        let count = view.owners.len() as u32;
        let now = courier_storage::Clock::system().now_ms();
        let tails = self.tails.lock().expect("tails lock");
        let mut out = Vec::new();
        for (shard, o) in view.owners.iter().enumerate() {
            let Some(o) = o.as_ref().filter(|o| o.replicas.contains(&self.me)) else {
                continue;
            };
            let role = if o.node == self.me {
                "primary"
            } else if tails
                .get(&(shard as u32))
                .is_some_and(|t| t.buffering.is_none())
            {
                "backup"
            } else {
                "copying"
            };
            let d = t
                .digest(slots_of_shard(shard as u32, count), now)
                .unwrap_or_default();
            out.push(serde_json::json!({
                "shard": shard,
                "role": role,
                "entries": d.entries,
                "digest": format!("{:016x}", d.hash),
            }));
        }
        serde_json::json!({ "node": self.me, "shards": out })
    }

    /// Answers the link's replication requests.
    pub fn request(
        self: &Arc<Self>,
        from: &str,
        mut body: Bytes,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Bytes, String>> + Send>> {
        let head = match Head::decode(&mut body) {
            Ok(h) => h,
            Err(e) => return Box::pin(async move { Err(format!("bad replication request: {e}")) }),
        };
        let me = self.clone();
        let from = from.to_owned();
        match head.op {
            wire::REPLICATE => {
                let part = (|| {
                    wire::need(&body, 8)?;
                    let lsn = body.get_u64();
                    let entries = get_entries(&mut body)?;
                    wire::done(&body)?;
                    Ok::<_, WireError>((lsn, entries))
                })();
                let taken = match part {
                    Ok((lsn, entries)) => self
                        .take_part(&from, head.shard, head.epoch, lsn, entries)
                        .map_err(Answer::Refused),
                    Err(e) => Err(Answer::Refused(format!("bad part: {e}"))),
                };
                Box::pin(async move {
                    let answer = match taken {
                        Ok(rx) => match rx.await {
                            Ok(Ok(applied)) => {
                                Answer::Done(Bytes::copy_from_slice(&applied.to_be_bytes()))
                            }
                            Ok(Err(why)) => Answer::Refused(why),
                            Err(_) => Answer::Refused("the copy stopped".into()),
                        },
                        Err(a) => a,
                    };
                    Ok(answer.encode())
                })
            }
            wire::REPL_FOLLOW => {
                Box::pin(
                    async move { Ok(me.serve_follow(from, head.shard, head.epoch).await.encode()) },
                )
            }
            wire::REPL_CHUNK => Box::pin(async move {
                let from = get_at(&mut body).map_err(|e| format!("bad chunk request: {e}"))?;
                tokio::task::spawn_blocking(move || {
                    me.serve_chunk(head.shard, head.epoch, from).encode()
                })
                .await
                .map_err(|e| format!("reading a chunk failed: {e}"))
            }),
            wire::REPL_STATUS => {
                let applied = if body.remaining() >= 8 {
                    body.get_u64()
                } else {
                    0
                };
                Box::pin(async move {
                    Ok(me
                        .serve_status(&from, head.shard, head.epoch, applied)
                        .encode())
                })
            }
            op => Box::pin(async move { Err(format!("unknown replication request {op}")) }),
        }
    }
}

/// Applies a copy's parts in order: everything queued in one synced
/// import, then each part's answer (the highest applied).
async fn apply(
    store: Arc<dyn InboxStore>,
    mut rx: mpsc::UnboundedReceiver<Part>,
    applied: Arc<AtomicU64>,
    count: IntCounter,
) {
    let mut parts = Vec::new();
    while rx.recv_many(&mut parts, 256).await > 0 {
        let batch: Vec<Part> = std::mem::take(&mut parts);
        let s = store.clone();
        let result = tokio::task::spawn_blocking(move || {
            let entries: Vec<RawEntry> = batch.iter().flat_map(|p| p.entries.clone()).collect();
            let r = s.transfer().expect("slotted").import(&entries);
            (batch, r)
        })
        .await;
        let Ok((batch, result)) = result else { return };
        match result {
            Ok(()) => {
                let last = batch.last().map_or(0, |p| p.lsn);
                applied.store(last, Ordering::Release);
                count.inc_by(batch.len() as u64);
                for p in batch {
                    if let Some(a) = p.answer {
                        let _ = a.send(Ok(last));
                    }
                }
            }
            Err(e) => {
                warn!(error = %e, "applying a shard's parts failed; the copy stops");
                for p in batch {
                    if let Some(a) = p.answer {
                        let _ = a.send(Err(format!("applying failed: {e}")));
                    }
                }
                return;
            }
        }
    }
}

/// The store's tap: hands committed writes to the replication.
struct Tapped(Arc<Replication>);

impl WriteTap for Tapped {
    fn committed(&self, entries: Vec<RawEntry>) {
        self.0.committed(entries);
    }
}

/// The node's store as its shards and sessions see it: every write of a
/// replicated shard returns once its copies have it.
struct ReplicatedStore {
    replication: Arc<Replication>,
}

impl ReplicatedStore {
    fn inner(&self) -> &dyn InboxStore {
        &*self.replication.inner
    }
}

impl InboxStore for ReplicatedStore {
    fn append_with(
        &self,
        batch: &[NewMessage],
        kv: &[KvOp],
        now_ms: u64,
    ) -> Result<Vec<AppendOutcome>, StoreError> {
        let out = self.inner().append_with(batch, kv, now_ms);
        if out.is_err() {
            self.replication.forget_written();
            return out;
        }
        self.replication.settle()?;
        out
    }

    fn write_lazy(&self, kv: &[KvOp]) -> Result<(), StoreError> {
        let out = self.inner().write_lazy(kv);
        self.replication.forget_written();
        out
    }

    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner().get(key)
    }

    fn scan(&self, prefix: &[u8], limit: usize) -> Result<KvPairs, StoreError> {
        self.inner().scan(prefix, limit)
    }

    fn scan_slots(
        &self,
        prefix: &[u8],
        slots: Range<u16>,
        limit: usize,
    ) -> Result<KvPairs, StoreError> {
        self.inner().scan_slots(prefix, slots, limit)
    }

    fn scan_expiring(
        &self,
        prefix: &[u8],
        now_ms: u64,
        limit: usize,
    ) -> Result<ExpiringEntries, StoreError> {
        self.inner().scan_expiring(prefix, now_ms, limit)
    }

    fn read_after(
        &self,
        inbox: u64,
        after_seq: u64,
        limit: usize,
    ) -> Result<Vec<StoredMessage>, StoreError> {
        self.inner().read_after(inbox, after_seq, limit)
    }

    fn state(&self, inbox: u64) -> Result<InboxState, StoreError> {
        self.inner().state(inbox)
    }

    fn ack(&self, inbox: u64, up_to_seq: u64) -> Result<InboxState, StoreError> {
        let out = self.inner().ack(inbox, up_to_seq);
        self.replication.forget_written();
        out
    }

    fn trim_acked(&self, inbox: u64, older_than_ms: u64) -> Result<InboxState, StoreError> {
        let out = self.inner().trim_acked(inbox, older_than_ms);
        self.replication.forget_written();
        out
    }

    fn sync(&self) -> Result<(), StoreError> {
        self.inner().sync()
    }

    fn health(&self) -> Option<StoreHealth> {
        self.inner().health()
    }

    fn transfer(&self) -> Option<&dyn SlotTransfer> {
        self.inner().transfer()
    }
}

// ----- bytes on the link -----

/// Every replication request starts `op u8 | shard u32 | epoch i64`.
struct Head {
    op: u8,
    shard: u32,
    epoch: i64,
}

impl Head {
    fn decode(b: &mut Bytes) -> Result<Head, WireError> {
        wire::need(b, 13)?;
        Ok(Head {
            op: b.get_u8(),
            shard: b.get_u32(),
            epoch: b.get_i64(),
        })
    }
}

/// A replication request, after its head (layouts in `wire.rs`).
enum Request<'a> {
    Replicate { lsn: u64, entries: &'a [RawEntry] },
    Follow,
    Chunk { from: &'a Option<(Space, Vec<u8>)> },
    Status { applied: u64 },
}

impl Request<'_> {
    fn encode(&self, shard: u32, epoch: i64) -> Bytes {
        let mut out = BytesMut::with_capacity(64);
        let op = match self {
            Request::Replicate { .. } => wire::REPLICATE,
            Request::Follow => wire::REPL_FOLLOW,
            Request::Chunk { .. } => wire::REPL_CHUNK,
            Request::Status { .. } => wire::REPL_STATUS,
        };
        out.put_u8(op);
        out.put_u32(shard);
        out.put_i64(epoch);
        match self {
            Request::Replicate { lsn, entries } => {
                out.put_u64(*lsn);
                put_entries(&mut out, entries);
            }
            Request::Follow => {}
            Request::Chunk { from } => put_at(&mut out, from),
            Request::Status { applied } => out.put_u64(*applied),
        }
        out.freeze()
    }
}

/// A replication answer: `0 | what the request asked` or `1 | why
/// (u16 length, UTF-8)`.
#[derive(Debug, PartialEq, Eq)]
enum Answer {
    Done(Bytes),
    Refused(String),
}

impl Answer {
    fn encode(&self) -> Bytes {
        let mut out = BytesMut::new();
        match self {
            Answer::Done(b) => {
                out.put_u8(0);
                out.put_slice(b);
            }
            Answer::Refused(why) => {
                out.put_u8(1);
                wire::put_text(&mut out, why);
            }
        }
        out.freeze()
    }

    fn decode(mut b: Bytes) -> Result<Answer, WireError> {
        wire::need(&b, 1)?;
        match b.get_u8() {
            0 => Ok(Answer::Done(b)),
            1 => Ok(Answer::Refused(wire::get_text(&mut b)?)),
            v => Err(WireError::UnknownOp(v)),
        }
    }

    fn done(self) -> anyhow::Result<Bytes> {
        match self {
            Answer::Done(b) => Ok(b),
            Answer::Refused(why) => anyhow::bail!("the primary refused: {why}"),
        }
    }
}

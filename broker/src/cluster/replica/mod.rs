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
//!
//! Map: this file holds the node's [`Replication`] (following views,
//! fencing, the admin's digests, the link's requests); `primary.rs` the
//! primary's side (streams, the writers' wait, ISR changes, what copies
//! ask of it); `backup.rs` the backup's side (copies, tails, the applier);
//! `store.rs` the store the node writes through and the tap; `frames.rs`
//! the requests as bytes.

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
use tracing::{debug, info, warn};

use super::member::within;
use super::transfer::{get_at, get_entries, put_at, put_entries, Slots};
use super::view::{Owner, View};
use super::wire::{self, WireError};
use super::Cluster;
use crate::metrics::Metrics;

mod backup;
mod frames;
mod primary;
mod store;

use backup::Tail;
use frames::{Answer, Head, Request};
use primary::Stream;
use store::{ReplicatedStore, StreamMark, Tapped, Unsettled};

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

/// Takes the parts this thread's write produced (see `WRITTEN`).
fn take_written() -> Vec<(u32, i64, u64)> {
    WRITTEN.with(|w| std::mem::take(&mut *w.borrow_mut()))
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
    lag_seconds: prometheus::GaugeVec,
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
            lag_seconds: prometheus::GaugeVec::new(
                Opts::new(
                    "courier_replication_lag_seconds",
                    "For each shard this node leads: the age of its oldest write not yet on every in-sync copy (0 when none waits).",
                ),
                &["shard"],
            )
            .expect("valid metric"),
            commit_seconds: crate::metrics::histogram(
                "courier_replication_commit_seconds",
                "From a replicated write's local commit to every in-sync copy having it (the writer's wait).",
                crate::metrics::LATENCY_BUCKETS,
            ),
        }
    }

    /// Registers the metrics of a node that replicates nothing (a single
    /// node): its dashboard and alerts name them all the same, at zero.
    pub fn register_idle(metrics: &Metrics) {
        ReplicaMetrics::new().register(metrics);
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
        metrics.register(self.lag_seconds.clone());
        metrics.register(self.commit_seconds.clone());
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
    /// A write found the lease gone before the fence did: it was not
    /// streamed, so the copies must copy again (as after a fence).
    skipped: bool,
    /// Shards whose streams the latest view ended.
    left: BTreeSet<u32>,
}

/// The shards with a backup task running here, and the last view
/// [`Replication::follow`] was given. The tasks go by that view, read
/// under this lock, not by `Cluster::view`, which is published only after
/// `follow` returns: a view that made this node a copy of a shard while
/// that shard's task was ending found the task listed and started none,
/// and the task, reading the older view, ended. Nobody copied the shard
/// and the controller waited on it for good (a joining node's first
/// copies, given while its sweep of leftovers ran; the container test's
/// join stage found it).
#[derive(Default)]
struct Following {
    shards: BTreeSet<u32>,
    view: Arc<View>,
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
    /// Shards with a backup task running here, and the view they go by.
    following: Mutex<Following>,
    /// Held by each [`Replication::follow`] from start to end, and by
    /// `start`'s following again: views are followed one at a time, in
    /// the order they were given, so no older view undoes a newer one.
    follow_turn: Mutex<()>,
    /// Whether the shards this node is no copy of were swept (once).
    swept: AtomicBool,
    cluster: OnceLock<Arc<Cluster>>,
    slots: OnceLock<Arc<Slots>>,
    runtime: tokio::runtime::Handle,
    metrics: ReplicaMetrics,
    /// Set once a replicated map is seen (taps only then).
    tapping: AtomicBool,
    /// What readers may not see yet (see `store.rs`).
    unsettled: Unsettled,
    /// Told the inboxes whose hidden entries show: no live push carried
    /// them (their write failed), so their sessions read them.
    on_shown: OnceLock<Box<dyn Fn(Vec<u64>) + Send + Sync>>,
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
            following: Mutex::new(Following::default()),
            follow_turn: Mutex::new(()),
            swept: AtomicBool::new(false),
            cluster: OnceLock::new(),
            slots: OnceLock::new(),
            runtime: tokio::runtime::Handle::current(),
            metrics: ReplicaMetrics::new(),
            tapping: AtomicBool::new(false),
            unsettled: Unsettled::default(),
            on_shown: OnceLock::new(),
        })
    }

    /// Connects to the cluster once joined, and starts the fence watch.
    pub fn start(self: &Arc<Self>, cluster: Arc<Cluster>, slots: Arc<Slots>, metrics: &Metrics) {
        self.metrics.register(metrics);
        let _ = cluster.replication.set(self.clone());
        let _ = self.cluster.set(cluster);
        // Before the views are followed again: following ends by fencing
        // the shards it must not serve yet, on the slots.
        let _ = self.slots.set(slots);
        // The views followed while the node joined started no backup task
        // (they need the cluster) and fenced nothing (no slots yet): follow
        // the last of them again, now that both can happen, in turn with
        // any view arriving meanwhile.
        {
            let _turn = self.follow_turn.lock().expect("follow turn");
            let view = self.followed_view();
            self.follow_in_turn(view);
        }
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

    /// The last view [`Replication::follow`] was given.
    fn followed_view(&self) -> Arc<View> {
        self.following.lock().expect("following lock").view.clone()
    }

    // ----- views -----

    /// Follows a new view, before anything routes by it: streams for the
    /// shards this node leads, tails dropped for shards it no longer
    /// copies from that primary, backup tasks for the shards it copies.
    pub fn follow(self: &Arc<Self>, view: &View) {
        let _turn = self.follow_turn.lock().expect("follow turn");
        self.follow_in_turn(Arc::new(view.clone()));
    }

    /// [`Replication::follow`], under `follow_turn`.
    fn follow_in_turn(self: &Arc<Self>, view: Arc<View>) {
        // Every view, first: the backup tasks go by it (see `Following`).
        self.following.lock().expect("following lock").view = view.clone();
        if view.replication() <= 1 {
            return;
        }
        if !view.map_complete() {
            debug!(
                revision = view.revision,
                "a view with an incomplete map: not followed"
            );
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
                            s.adopt(&self.me, o);
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
            // Shards that left stay fenced until the slots follow this view
            // too (right after this): served meanwhile, with no stream,
            // they would take writes nobody copies.
            p.left = p
                .streams
                .keys()
                .filter(|s| !mine.contains(s))
                .copied()
                .collect();
            p.streams.retain(|shard, _| mine.contains(shard));
            self.gauge(&mut p);
        }
        self.settled.notify_all();
        for shard in shrink {
            self.change_isr(shard);
        }
        // Backups: a tail stays only while its primary and epoch stand,
        // and this node is still one of the shard's copies.
        let mut copies = Vec::new();
        let cluster = self.cluster().cloned();
        {
            let mut tails = self.tails.lock().expect("tails lock");
            tails.retain(|shard, t| {
                let stands = view
                    .owners
                    .get(*shard as usize)
                    .and_then(|o| o.as_ref())
                    .is_some_and(|o| {
                        o.node == t.primary && o.epoch == t.epoch && o.replicas.contains(&self.me)
                    });
                if !stands {
                    t.close();
                }
                stands
            });
            // Backup tasks copy over the cluster's links: none starts
            // before `start`, which follows the last view again. Once, at
            // the first map followed from then on: a task also for each
            // shard this node does not hold, which deletes what is left of
            // it here (a copy removed while this node was away).
            if cluster.is_some() {
                let sweep = !self.swept.swap(true, Ordering::AcqRel);
                for (shard, o) in view.owners.iter().enumerate() {
                    if let Some(o) = o {
                        if o.node != self.me && (sweep || o.replicas.contains(&self.me)) {
                            copies.push(shard as u32);
                        }
                    }
                }
            }
        }
        if let Some(cluster) = cluster {
            let mut following = self.following.lock().expect("following lock");
            for shard in copies {
                if following.shards.insert(shard) {
                    debug!(shard, revision = view.revision, "a copy's task starts");
                    self.runtime
                        .spawn(self.clone().backup(cluster.clone(), shard));
                }
            }
        }
        self.fence_shards();
    }

    /// Sets the gauges of the shards this node leads.
    fn gauge(&self, p: &mut Primaries) {
        let m = &self.metrics;
        m.primaries.set(p.streams.len() as i64);
        m.isr.reset();
        m.lag_parts.reset();
        m.lag_seconds.reset();
        let mut under = 0;
        for (shard, s) in p.streams.iter_mut() {
            let label = shard.to_string();
            m.isr.with_label_values(&[&label]).set(s.isr.len() as i64);
            let head = s.next_lsn - 1;
            let slowest = s
                .followers
                .values()
                .map(|f| f.applied)
                .min()
                .unwrap_or(head);
            m.lag_parts
                .with_label_values(&[&label])
                .set(head.saturating_sub(slowest) as i64);
            let committed = s.committed(&self.me);
            while s.written_at.front().is_some_and(|(l, _)| *l <= committed) {
                s.written_at.pop_front();
            }
            let waiting = s
                .written_at
                .front()
                .map_or(0.0, |(_, at)| at.elapsed().as_secs_f64());
            m.lag_seconds.with_label_values(&[&label]).set(waiting);
            if (s.isr.len() as u32) < p.factor {
                under += 1;
            }
        }
        m.under_replicated.set(under);
    }

    /// Forgets the parts of a write nobody waits for (lazy writes: they
    /// are streamed in order all the same).
    fn forget_written(&self) {
        WRITTEN.with(|w| w.borrow_mut().clear());
    }

    /// Each led shard's next follower id (see `Hidden::followed_from`).
    fn follower_marks(&self) -> Vec<(u32, u64)> {
        let p = self.primaries.lock().expect("primaries lock");
        p.streams
            .iter()
            .map(|(shard, s)| (*shard, s.next_follower))
            .collect()
    }

    /// Shards of the cluster (0 before the map).
    fn shard_count(&self) -> u32 {
        self.primaries.lock().expect("primaries lock").count
    }

    /// Shows what failed writes hid where it became safe: the shard's
    /// stream, unfenced, committed past the write, or every other member
    /// of its in-sync set has followed since the write (and copied it).
    fn settle_failed(&self) {
        if !self.unsettled.any() {
            return;
        }
        let (count, marks) = {
            let p = self.primaries.lock().expect("primaries lock");
            if p.fenced {
                return;
            }
            let marks: HashMap<u32, StreamMark> = p
                .streams
                .iter()
                .filter(|(_, s)| s.broken.is_none())
                .map(|(shard, s)| {
                    let followed_since = s
                        .isr
                        .iter()
                        .filter(|n| **n != self.me)
                        .map(|n| s.followers.get(n).map_or(0, |f| f.id))
                        .min()
                        .unwrap_or(u64::MAX);
                    let mark = StreamMark {
                        epoch: s.epoch,
                        committed: s.committed(&self.me),
                        followed_since,
                    };
                    (*shard, mark)
                })
                .collect();
            (p.count, marks)
        };
        if count == 0 {
            return;
        }
        let shown = self.unsettled.settle_failed(|inbox| {
            let shard = shard_of_slot(courier_storage::slot_of(inbox), count);
            marks.get(&shard).copied()
        });
        if !shown.is_empty() {
            debug!(inboxes = ?shown, "entries hidden by a failed write show");
            if let Some(tell) = self.on_shown.get() {
                tell(shown);
            }
        }
    }

    /// Who learns of inboxes whose hidden entries show (the node's shards,
    /// which send those inboxes' sessions to catch up).
    pub fn on_shown(&self, tell: Box<dyn Fn(Vec<u64>) + Send + Sync>) {
        let _ = self.on_shown.set(tell);
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
                .filter(|(_, s)| p.fenced || s.broken.is_some() || !s.confirmed)
                .map(|(shard, _)| *shard)
                .chain(p.left.iter().copied())
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
            if ticks.is_multiple_of(20) {
                self.gauge(&mut self.primaries.lock().expect("primaries lock"));
            }
            self.settle_failed();
            let changed = {
                let mut p = self.primaries.lock().expect("primaries lock");
                // Fenced, it serves again only with a view read since the
                // lease's renewal: one that shows any promotion made while
                // the lease may have been gone.
                let expired = !cluster.lease_valid() || (p.fenced && !cluster.view_since_renewal());
                // A skipped write calls for the renewal's reset too.
                let reset = p.skipped && !expired;
                if p.fenced == expired && !reset {
                    None
                } else {
                    p.fenced = expired;
                    if expired {
                        warn!(
                            "this node's lease may have expired: its replicated shards are fenced"
                        );
                    } else {
                        // Writes were not streamed meanwhile: every copy
                        // copies again, and the in-sync set shrinks to this
                        // node first (what those writes hid shows once it
                        // has: `settle_failed`).
                        info!("lease renewed: serving the replicated shards again");
                        p.skipped = false;
                        for s in p.streams.values_mut() {
                            s.followers.clear();
                            s.written_at.clear();
                        }
                    }
                    Some(expired)
                }
            };
            if let Some(expired) = changed {
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

    /// Whether this node's lease may have expired, so that it serves none
    /// of its replicated shards (`GET /readyz` says not ready: a load
    /// balancer moves its clients to nodes that can reach etcd).
    pub fn lease_lost(&self) -> bool {
        self.primaries.lock().expect("primaries lock").fenced
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
                let (applied, id) = if body.remaining() >= 16 {
                    (body.get_u64(), body.get_u64())
                } else {
                    (0, 0)
                };
                Box::pin(async move {
                    Ok(me
                        .serve_status(&from, head.shard, head.epoch, (id, applied))
                        .encode())
                })
            }
            op => Box::pin(async move { Err(format!("unknown replication request {op}")) }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::view::{ClusterRecord, Owner};
    use courier_storage::{MemoryStore, StoreConfig};

    /// Two shards, two copies each: node `a` copies shard 0 (led by `b`)
    /// and holds nothing of shard 1 (led by `c`, copied by `b`).
    fn view(revision: i64) -> View {
        let owner = |node: &str, replicas: [&str; 2]| {
            Some(Owner {
                node: node.into(),
                epoch: 1,
                revision,
                replicas: replicas.map(str::to_owned).to_vec(),
                isr: replicas.map(str::to_owned).to_vec(),
                removing: None,
            })
        };
        View {
            revision,
            config: Some(ClusterRecord {
                shards: 2,
                created_ms: 0,
                replication: 2,
            }),
            owners: vec![owner("b", ["b", "a"]), owner("c", ["c", "b"])],
            etcd_up: true,
            ..View::default()
        }
    }

    #[tokio::test]
    async fn views_followed_while_joining_start_no_copy_and_leave_the_sweep_to_start() {
        let store = Arc::new(MemoryStore::new(StoreConfig::default()));
        let r = Replication::new("a".into(), store);
        r.follow(&view(7));
        r.follow(&view(9));
        // A task started now would find no cluster and end, its shard
        // followed by no one; and the one-time sweep would be spent on
        // tasks that never ran.
        assert!(
            r.following.lock().unwrap().shards.is_empty(),
            "no backup task before start"
        );
        assert!(
            !r.swept.load(Ordering::Acquire),
            "the sweep is left to start"
        );
        assert_eq!(
            r.followed_view().revision,
            9,
            "start follows the last view again"
        );
    }
}

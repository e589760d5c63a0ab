//! Shard moves (join, drain, rebalance): who writes what in etcd, and
//! when the new owner copies.
//!
//! ```text
//!  controller: plan (placement::rebalance), at most MOVES_AT_ONCE at a time
//!     txn [candidacy, shards/<n> at epoch E, no moves/<n>] put moves/<n> {from, to, E}
//!  new owner (every node runs `run`): a move to it, not copied yet
//!     transfer::copy_shard: chunks + rounds while the old owner serves, then its pause
//!     txn [moves/<n> unchanged] put moves/<n> {.., copied_lease: L (the old owner's)}
//!  controller: a copied move
//!     txn [candidacy, shards/<n> at E, moves/<n> unchanged, nodes/<from> under lease L]
//!         put shards/<n> {owner: to}  (the new epoch)   delete moves/<n>
//!     failed: delete moves/<n> (called off)
//!  every node follows the view: the new owner serves the run and takes up its
//!  pending work; the old owner deletes its copy and ends its sessions
//! ```
//!
//! Calling a move off is deleting its record while the shard is still the
//! old owner's: the controller does it when a node of the move is gone or
//! the switch failed, the old owner when its pause has lasted
//! [`PAUSE_LIMIT`] (conditioned on the shard's epoch, so it cannot race a
//! switch). Only then does the old owner serve the run again: a pause never
//! ends on a timer alone, because a switch could still come.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::{Compare, CompareOp, LeaderKey, Txn, TxnOp};
use tracing::{info, warn};

use super::member::within;
use super::transfer::{copy_shard, Slots};
use super::view::{MoveRecord, ShardRecord, View};
use super::{placement, Cluster};
use courier_storage::{slots_of_shard, InboxStore};

/// Moves under way at once, at most.
pub const MOVES_AT_ONCE: usize = 2;
/// How long an old owner stays paused waiting for the switch before it
/// calls the move off.
pub const PAUSE_LIMIT: Duration = Duration::from_secs(30);

/// The controller's part for one view of a complete map: switches copied
/// moves, calls off stale ones, starts new ones.
pub(super) async fn control(
    cluster: &Cluster,
    leader: &LeaderKey,
    view: &View,
) -> anyhow::Result<()> {
    let mut client = cluster.etcd();
    let keys = &cluster.keys;
    let leading = || Compare::create_revision(leader.key(), CompareOp::Equal, leader.rev());
    for (&shard, m) in &view.moves {
        let r = &m.record;
        let current = view
            .owners
            .get(shard as usize)
            .and_then(Option::as_ref)
            .is_some_and(|o| o.node == r.from && o.epoch == r.epoch);
        let gone = [&r.from, &r.to]
            .into_iter()
            .find(|n| !view.nodes.contains_key(*n));
        let moving = keys.moving(shard);
        let unchanged = || Compare::mod_revision(moving.clone(), CompareOp::Equal, m.revision);
        let call_off = Txn::new()
            .when([leading(), unchanged()])
            .and_then([TxnOp::delete(moving.clone(), None)]);
        if !current || gone.is_some() {
            let why = match gone {
                Some(n) => format!("node {n} is gone"),
                None => "the shard's epoch changed".to_owned(),
            };
            within("call a move off", client.txn(call_off)).await?;
            warn!(shard, from = %r.from, to = %r.to, why, "move called off");
            continue;
        }
        let Some(lease) = r.copied_lease else {
            continue;
        };
        // Moves run without replication (factor 1): the owner alone.
        let record = ShardRecord {
            owner: r.to.clone(),
            ..ShardRecord::default()
        };
        let switch = Txn::new()
            .when([
                leading(),
                Compare::mod_revision(keys.shard(shard), CompareOp::Equal, r.epoch),
                unchanged(),
                Compare::lease(keys.node(&r.from), CompareOp::Equal, lease),
            ])
            .and_then([
                TxnOp::put(
                    keys.shard(shard),
                    serde_json::to_vec(&record).expect("a record serializes"),
                    None,
                ),
                TxnOp::delete(moving.clone(), None),
            ]);
        let switched = within("switch a shard's owner", client.txn(switch)).await?;
        if switched.succeeded() {
            let epoch = switched.header().map_or(0, |h| h.revision());
            info!(shard, from = %r.from, to = %r.to, epoch, "shard moved");
        } else {
            // The old owner restarted (its pause forgotten) or the record
            // changed: nothing may switch on this copy.
            within("call a move off", client.txn(call_off)).await?;
            warn!(shard, from = %r.from, to = %r.to, "switch refused; move called off");
        }
    }
    if view.moves.len() >= MOVES_AT_ONCE {
        return Ok(());
    }
    let plan = Cluster::plan(view);
    // One move out of a node at a time (a node exports one shard at once).
    let mut busy: HashSet<String> = view.moves.values().map(|m| m.record.from.clone()).collect();
    let next: Vec<placement::Move> = plan
        .into_iter()
        .filter(|m| !view.moves.contains_key(&m.shard) && busy.insert(m.from.clone()))
        .take(MOVES_AT_ONCE - view.moves.len())
        .collect();
    for m in next {
        let Some(epoch) = view.owners[m.shard as usize].as_ref().map(|o| o.epoch) else {
            continue;
        };
        let record = MoveRecord {
            from: m.from.clone(),
            to: m.to.clone(),
            epoch,
            copied_lease: None,
        };
        let moving = keys.moving(m.shard);
        let start = Txn::new()
            .when([
                leading(),
                Compare::mod_revision(keys.shard(m.shard), CompareOp::Equal, epoch),
                Compare::create_revision(moving.clone(), CompareOp::Equal, 0),
            ])
            .and_then([TxnOp::put(
                moving,
                serde_json::to_vec(&record).expect("a record serializes"),
                None,
            )]);
        if within("start a move", client.txn(start)).await?.succeeded() {
            info!(shard = m.shard, from = %m.from, to = %m.to, "move started");
        }
    }
    Ok(())
}

/// Replicated shards under way at once, at most: copies being added, or
/// copied again after a switch.
pub const COPIES_AT_ONCE: usize = 2;

/// The controller's part for replicated shards (factor above 1): a join or
/// a drain moves copies, not owners. Each step of
/// [`placement::rebalance_copies`] is one transaction on the shard's record
/// at the revision the plan read (anything else changed it: the next view
/// plans again):
///
/// ```text
///  add:  replicas += to            (same owner, epoch and in-sync set: the
///        new copy follows the primary, copies, and the primary adds it
///        to the in-sync set once caught up)
///  lead: owner = to (in sync), isr = [to], a new epoch (as a failover:
///        the old primary, alive, is deposed by the view; it and the other
///        copies copy the shard again from `to`)
///  drop: replicas -= from, isr -= from (only once the others in sync
///        number the factor; the removed copy deletes its run)
/// ```
pub(super) async fn control_copies(
    cluster: &Cluster,
    leader: &LeaderKey,
    view: &View,
) -> anyhow::Result<()> {
    let mut client = cluster.etcd();
    for step in Cluster::copy_plan(view, COPIES_AT_ONCE) {
        let shard = match &step {
            placement::CopyStep::Add { shard, .. }
            | placement::CopyStep::Lead { shard, .. }
            | placement::CopyStep::Drop { shard, .. } => *shard,
        };
        let Some(o) = view.owners.get(shard as usize).and_then(Option::as_ref) else {
            continue;
        };
        let kept =
            |replicas: Vec<String>, isr: Vec<String>, removing: Option<String>| ShardRecord {
                owner: o.node.clone(),
                replicas,
                isr,
                epoch: Some(o.epoch),
                removing,
            };
        let record = match &step {
            placement::CopyStep::Add { to, removing, .. } => {
                let mut replicas = o.replicas.clone();
                replicas.push(to.clone());
                kept(replicas, o.isr.clone(), removing.clone())
            }
            placement::CopyStep::Drop { from, .. } => {
                let without = |v: &[String]| v.iter().filter(|n| *n != from).cloned().collect();
                kept(without(&o.replicas), without(&o.isr), None)
            }
            placement::CopyStep::Lead { to, .. } => o.promoted(to),
        };
        let key = cluster.keys.shard(shard);
        let txn = Txn::new()
            .when([
                Compare::create_revision(leader.key(), CompareOp::Equal, leader.rev()),
                Compare::mod_revision(key.clone(), CompareOp::Equal, o.revision),
            ])
            .and_then([TxnOp::put(
                key,
                serde_json::to_vec(&record).expect("a record serializes"),
                None,
            )]);
        let answer = within("change a shard's copies", client.txn(txn)).await?;
        if answer.succeeded() {
            let change = match &step {
                placement::CopyStep::Add { to, removing, .. } => {
                    info!(shard, to = %to, replaces = ?removing, "a copy of a replicated shard added");
                    "add"
                }
                placement::CopyStep::Lead { to, .. } => {
                    info!(shard, from = %o.node, to = %to, "a replicated shard's primary switched (its other copies copy it again)");
                    "lead"
                }
                placement::CopyStep::Drop { from, .. } => {
                    info!(shard, from = %from, "a copy of a replicated shard removed");
                    "drop"
                }
            };
            cluster
                .plane
                .copy_changes
                .with_label_values(&[change])
                .inc();
        }
    }
    Ok(())
}

/// What every node does for moves: copies the shards moving to it, and
/// serves a paused shard again once its move is called off.
pub struct Mover {
    cluster: Arc<Cluster>,
    store: Arc<dyn InboxStore>,
    slots: Arc<Slots>,
    /// Shards being copied here now.
    copying: Mutex<HashSet<u32>>,
    /// Shards this node copied (or began to): their data here is deleted if
    /// the move is called off.
    attempted: Mutex<HashSet<u32>>,
    /// Moves this node recorded as copied, by (shard, the record's revision
    /// it copied under): a view from before that write must not start the
    /// copy again (it would delete what the switch is about to serve).
    recorded: Mutex<HashSet<(u32, i64)>>,
}

impl Mover {
    pub fn new(cluster: Arc<Cluster>, store: Arc<dyn InboxStore>, slots: Arc<Slots>) -> Arc<Mover> {
        Arc::new(Mover {
            cluster,
            store,
            slots,
            copying: Mutex::default(),
            attempted: Mutex::default(),
            recorded: Mutex::default(),
        })
    }

    /// Acts on every view, and once a second (a pause's limit, an
    /// abandoned export).
    pub async fn run(self: Arc<Self>) {
        let mut views = self.cluster.view.clone();
        loop {
            let view = views.borrow_and_update().clone();
            self.step(&view).await;
            tokio::select! {
                _ = self.cluster.stop.cancelled() => return,
                changed = views.changed() => if changed.is_err() { return },
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }

    async fn step(self: &Arc<Self>, view: &View) {
        let me = self.cluster.node_id().to_owned();
        self.slots.reap(Duration::from_secs(60));
        if let Some((shard, epoch, incarnation, paused_for)) = self.slots.paused() {
            let still_mine = view
                .owners
                .get(shard as usize)
                .and_then(Option::as_ref)
                .is_some_and(|o| o.node == me && o.epoch == epoch);
            // The pause is for one incarnation of the move's record: once
            // that record is gone (called off, even if begun again since),
            // no switch can come on the paused copy.
            let gone = view
                .moves
                .get(&shard)
                .is_none_or(|m| m.created != incarnation);
            if still_mine && view.etcd_up && gone {
                self.slots.end(shard);
            } else if still_mine && paused_for > PAUSE_LIMIT {
                self.call_off(shard, epoch).await;
            }
        }
        for (&shard, m) in &view.moves {
            let r = &m.record;
            if r.to != me || r.copied_lease.is_some() {
                continue;
            }
            if self
                .recorded
                .lock()
                .expect("lock")
                .contains(&(shard, m.revision))
            {
                continue;
            }
            if !self.copying.lock().expect("lock").insert(shard) {
                continue;
            }
            self.attempted.lock().expect("lock").insert(shard);
            let mover = self.clone();
            let (record, revision, created) = (r.clone(), m.revision, m.created);
            let shards = view.owners.len() as u32;
            tokio::spawn(async move {
                mover.copy(shard, record, revision, created, shards).await;
                mover.copying.lock().expect("lock").remove(&shard);
            });
        }
        // Moves to this node that were called off: what was copied goes.
        let dropped: Vec<u32> = {
            let attempted = self.attempted.lock().expect("lock");
            let copying = self.copying.lock().expect("lock");
            attempted
                .iter()
                .copied()
                .filter(|s| !copying.contains(s) && !view.moves.contains_key(s))
                .collect()
        };
        for shard in dropped {
            self.attempted.lock().expect("lock").remove(&shard);
            let mine = view
                .owners
                .get(shard as usize)
                .and_then(Option::as_ref)
                .is_some_and(|o| o.node == me);
            if !mine && view.etcd_up {
                let run = slots_of_shard(shard, view.owners.len() as u32);
                if let Some(t) = self.store.transfer() {
                    match t.delete_slots(run) {
                        Ok(()) => info!(shard, "a called-off move's copy here is deleted"),
                        Err(e) => {
                            warn!(shard, error = %e, "deleting a called-off move's copy failed")
                        }
                    }
                }
            }
        }
    }

    /// Copies `shard` here and records it copied.
    async fn copy(&self, shard: u32, r: MoveRecord, revision: i64, created: i64, shards: u32) {
        let Some(peer) = self.cluster.links.peer(&r.from) else {
            warn!(shard, from = %r.from, "no link to the shard's owner yet; the copy waits");
            tokio::time::sleep(Duration::from_secs(1)).await;
            return;
        };
        info!(shard, from = %r.from, "copying a shard that moves here");
        let copied = match copy_shard(&peer, &self.store, shard, r.epoch, created, shards).await {
            Ok(c) => c,
            Err(e) => {
                warn!(shard, from = %r.from, error = %format!("{e:#}"), "copying a shard failed; trying again");
                tokio::time::sleep(Duration::from_secs(1)).await;
                return;
            }
        };
        let record = MoveRecord {
            copied_lease: Some(copied.lease),
            ..r
        };
        let moving = self.cluster.keys.moving(shard);
        let txn = Txn::new()
            .when([Compare::mod_revision(
                moving.clone(),
                CompareOp::Equal,
                revision,
            )])
            .and_then([TxnOp::put(
                moving,
                serde_json::to_vec(&record).expect("a record serializes"),
                None,
            )]);
        let mut client = self.cluster.etcd();
        match within("record a copied shard", client.txn(txn)).await {
            Ok(t) if t.succeeded() => {
                self.recorded
                    .lock()
                    .expect("lock")
                    .insert((shard, revision));
                info!(
                    shard,
                    chunks = copied.chunks,
                    rounds = copied.rounds,
                    entries = copied.entries,
                    paused_ms = copied.paused_for.as_millis() as u64,
                    "shard copied; waiting for the switch"
                );
                self.cluster
                    .plane
                    .move_pause
                    .observe(copied.paused_for.as_secs_f64());
            }
            Ok(_) => warn!(shard, "the move changed while copying; not recorded"),
            Err(e) => {
                // It may have been written all the same: never copy under
                // this revision again (a copy starts by deleting what the
                // switch may be about to serve). If it was not written, the
                // old owner's pause limit calls the move off.
                self.recorded
                    .lock()
                    .expect("lock")
                    .insert((shard, revision));
                warn!(shard, error = %format!("{e:#}"), "cannot record the copy; the move will be called off")
            }
        }
    }

    /// Calls off the move of `shard` (this node's at `epoch`, paused too
    /// long): deletes its record unless the switch has happened.
    async fn call_off(&self, shard: u32, epoch: i64) {
        let keys = &self.cluster.keys;
        let txn = Txn::new()
            .when([Compare::mod_revision(
                keys.shard(shard),
                CompareOp::Equal,
                epoch,
            )])
            .and_then([TxnOp::delete(keys.moving(shard), None)]);
        let mut client = self.cluster.etcd();
        match within("call a paused move off", client.txn(txn)).await {
            Ok(t) if t.succeeded() => {
                warn!(
                    shard,
                    "paused for too long waiting for the switch; move called off"
                )
            }
            Ok(_) => {}
            Err(e) => {
                warn!(shard, error = %format!("{e:#}"), "cannot call the paused move off yet")
            }
        }
    }
}

//! A shard's data moving between nodes: the copy of a move.
//!
//! ```text
//!  new owner (copy_shard)                 old owner (Slots::export)
//!  delete its own leftovers of the run
//!  EXPORT Begin ────────────────────────► watch the run (one export at a time)
//!  EXPORT Chunk from … ─────────────────► entries of the run, next   (serving on)
//!     import (synced) ◄──────────────────
//!  EXPORT Changes ──────────────────────► what the watch saw since, current values
//!     … until a round is small
//!  EXPORT Pause ────────────────────────► stop serving the run (waits for writes
//!                                          under way), the last of the changes,
//!     import (synced) ◄────────────────── this node's lease
//!  (the mover records "copied"; the controller switches the epoch)
//! ```
//!
//! Bytes on the link (after the operation byte, [`wire::EXPORT`]):
//!
//! ```text
//! request: shard u32 | epoch i64 | step u8 (0 begin, 1 chunk, 2 changes,
//!          3 pause, 4 end) | session u64 (begin: the move record's etcd
//!          create_revision, which the pause belongs to) | from (u8 0, or
//!          u8 1 | space u8 | key (u16 length, bytes))
//! answer:  0 | session u64 | lease i64 | more u8 | next (as from) |
//!          count u32 | entry × count
//!          entry: kind u8 (0 put, 1 delete, 2 delete range) | space u8 |
//!                 key (u16 length, bytes) | value (u32 length, bytes; a
//!                 range's end key)
//!       or 1 (not the owner at that epoch, as SEND's)
//!       or 2 | why (u16 length, UTF-8): no such export (the old owner
//!          restarted, or the export was ended): start again
//! ```
//!
//! The old owner resumes serving a paused run only when the move cannot
//! switch any more: the move's record is gone from etcd while the shard is
//! still its own (see `moves.rs`), never on a timer of its own.

use std::collections::BTreeSet;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use courier_storage::{slots_of_shard, InboxStore, RawEntry, SlotChanges, Space};
use tracing::{info, warn};

use super::view::View;
use super::wire::{self, Answer, WireError};
use crate::metrics::Metrics;
use prometheus::Histogram;

/// A chunk or a round carries about this much (the link's frames are
/// bounded by twice `limits.max_frame_len`, 1 MiB by default).
const PIECE_BYTES: usize = 256 << 10;
/// Rounds of changes before the pause, at most; fewer once a round is small.
const MAX_ROUNDS: usize = 20;
/// A round with fewer entries than this is small enough to pause after.
const SMALL_ROUND: usize = 256;
/// How long one export request may take.
const STEP_DEADLINE: Duration = Duration::from_secs(30);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    Begin = 0,
    Chunk = 1,
    Changes = 2,
    Pause = 3,
    End = 4,
}

impl Step {
    fn from_u8(v: u8) -> Option<Step> {
        [
            Step::Begin,
            Step::Chunk,
            Step::Changes,
            Step::Pause,
            Step::End,
        ]
        .get(v as usize)
        .copied()
    }
}

/// One step of an export, asked of the shard's owner.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportRequest {
    pub shard: u32,
    pub epoch: i64,
    pub step: Step,
    pub session: u64,
    pub from: Option<(Space, Vec<u8>)>,
}

/// What the owner answers one step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExportAnswer {
    Done(ExportPiece),
    NotOwner {
        owner: String,
        epoch: i64,
    },
    /// The export is not (or no longer) there: start again.
    Gone(String),
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExportPiece {
    pub session: u64,
    /// The old owner's lease (the switch is conditioned on it: a restart
    /// of the old owner, which forgets a pause, voids the move).
    pub lease: i64,
    /// More of this round's changes wait (ask `Changes` again).
    pub more: bool,
    /// Where the next chunk starts (`None`: the range is done).
    pub next: Option<(Space, Vec<u8>)>,
    pub entries: Vec<RawEntry>,
}

fn put_key(out: &mut BytesMut, key: &[u8]) {
    out.put_u16(key.len() as u16);
    out.put_slice(key);
}

fn get_key(b: &mut Bytes) -> Result<Vec<u8>, WireError> {
    wire::need(b, 2)?;
    let n = b.get_u16() as usize;
    wire::need(b, n)?;
    Ok(b.split_to(n).to_vec())
}

fn get_space(b: &mut Bytes) -> Result<Space, WireError> {
    wire::need(b, 1)?;
    let v = b.get_u8();
    Space::from_u8(v).ok_or(WireError::UnknownOp(v))
}

pub(super) fn put_at(out: &mut BytesMut, at: &Option<(Space, Vec<u8>)>) {
    match at {
        None => out.put_u8(0),
        Some((space, key)) => {
            out.put_u8(1);
            out.put_u8(*space as u8);
            put_key(out, key);
        }
    }
}

pub(super) fn get_at(b: &mut Bytes) -> Result<Option<(Space, Vec<u8>)>, WireError> {
    wire::need(b, 1)?;
    match b.get_u8() {
        0 => Ok(None),
        1 => Ok(Some((get_space(b)?, get_key(b)?))),
        v => Err(WireError::UnknownOp(v)),
    }
}

impl ExportRequest {
    pub fn encode(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(32);
        out.put_u8(wire::EXPORT);
        out.put_u32(self.shard);
        out.put_i64(self.epoch);
        out.put_u8(self.step as u8);
        out.put_u64(self.session);
        put_at(&mut out, &self.from);
        out.freeze()
    }

    pub fn decode(mut b: Bytes) -> Result<ExportRequest, WireError> {
        wire::need(&b, 1 + 4 + 8 + 1 + 8)?;
        wire::op(&mut b, wire::EXPORT)?;
        let shard = b.get_u32();
        let epoch = b.get_i64();
        let step = b.get_u8();
        let step = Step::from_u8(step).ok_or(WireError::UnknownOp(step))?;
        let session = b.get_u64();
        let from = get_at(&mut b)?;
        wire::done(&b)?;
        Ok(ExportRequest {
            shard,
            epoch,
            step,
            session,
            from,
        })
    }
}

/// Entries as the link carries them: count u32 | entry × count (layout in
/// the module's doc).
pub(super) fn put_entries(out: &mut BytesMut, entries: &[RawEntry]) {
    out.reserve(4 + entries.iter().map(|e| 8 + entry_len(e)).sum::<usize>());
    out.put_u32(entries.len() as u32);
    for e in entries {
        let (kind, space, key, value): (u8, Space, &[u8], &[u8]) = match e {
            RawEntry::Put { space, key, value } => (0, *space, key, value),
            RawEntry::Delete { space, key } => (1, *space, key, &[]),
            RawEntry::DeleteRange { space, from, to } => (2, *space, from, to),
        };
        out.put_u8(kind);
        out.put_u8(space as u8);
        put_key(out, key);
        out.put_u32(value.len() as u32);
        out.put_slice(value);
    }
}

pub(super) fn get_entries(b: &mut Bytes) -> Result<Vec<RawEntry>, WireError> {
    wire::need(b, 4)?;
    let count = b.get_u32() as usize;
    let mut entries = Vec::with_capacity(count.min(1 << 16));
    for _ in 0..count {
        wire::need(b, 1)?;
        let kind = b.get_u8();
        let space = get_space(b)?;
        let key = get_key(b)?;
        wire::need(b, 4)?;
        let n = b.get_u32() as usize;
        wire::need(b, n)?;
        let value = b.split_to(n).to_vec();
        entries.push(match kind {
            0 => RawEntry::Put { space, key, value },
            1 => RawEntry::Delete { space, key },
            2 => RawEntry::DeleteRange {
                space,
                from: key,
                to: value,
            },
            v => return Err(WireError::UnknownOp(v)),
        });
    }
    Ok(entries)
}

pub(super) fn entries_len(entries: &[RawEntry]) -> usize {
    entries.iter().map(|e| 8 + entry_len(e)).sum()
}

fn entry_len(e: &RawEntry) -> usize {
    match e {
        RawEntry::Put { key, value, .. } => key.len() + value.len(),
        RawEntry::Delete { key, .. } => key.len(),
        RawEntry::DeleteRange { from, to, .. } => from.len() + to.len(),
    }
}

impl ExportAnswer {
    pub fn encode(&self) -> Bytes {
        let mut out = BytesMut::new();
        match self {
            ExportAnswer::Done(p) => {
                out.reserve(64);
                out.put_u8(0);
                out.put_u64(p.session);
                out.put_i64(p.lease);
                out.put_u8(p.more as u8);
                put_at(&mut out, &p.next);
                put_entries(&mut out, &p.entries);
            }
            ExportAnswer::NotOwner { owner, epoch } => wire::put_not_owner(&mut out, owner, *epoch),
            ExportAnswer::Gone(why) => {
                out.put_u8(2);
                wire::put_text(&mut out, why);
            }
        }
        out.freeze()
    }

    pub fn decode(mut b: Bytes) -> Result<ExportAnswer, WireError> {
        wire::need(&b, 1)?;
        match b.get_u8() {
            0 => {
                wire::need(&b, 8 + 8 + 1)?;
                let session = b.get_u64();
                let lease = b.get_i64();
                let more = b.get_u8() != 0;
                let next = get_at(&mut b)?;
                let entries = get_entries(&mut b)?;
                wire::done(&b)?;
                Ok(ExportAnswer::Done(ExportPiece {
                    session,
                    lease,
                    more,
                    next,
                    entries,
                }))
            }
            1 => match wire::get_not_owner::<()>(b)? {
                Answer::NotOwner { owner, epoch } => Ok(ExportAnswer::NotOwner { owner, epoch }),
                Answer::Done(()) => unreachable!("get_not_owner answers NotOwner"),
            },
            2 => {
                let why = wire::get_text(&mut b)?;
                wire::done(&b)?;
                Ok(ExportAnswer::Gone(why))
            }
            v => Err(WireError::UnknownOp(v)),
        }
    }
}

/// The export under way on this node (the old owner's side).
struct Export {
    session: u64,
    shard: u32,
    epoch: i64,
    run: Range<u16>,
    /// The move record's incarnation (its etcd create_revision) this
    /// export is for.
    incarnation: i64,
    /// Stopped serving the run for the last round.
    paused: bool,
    paused_at: Option<Instant>,
    /// Changes drained from the watch, not sent yet.
    pending: SlotChanges,
    touched: Instant,
}

/// What this node's store serves (the slots of its shards, less a run
/// paused for a move's last round), and the export of a shard under way.
pub struct Slots {
    store: Arc<dyn InboxStore>,
    me: String,
    state: Mutex<SlotsState>,
    /// Set while some run is unsettled (see [`Slots::unsettled`]), so the
    /// send path skips the lock otherwise.
    any_unsettled: AtomicBool,
    /// Until when (ms after `born`) shards count as moving in the cluster
    /// (see [`Slots::shards_moving`]); `u64::MAX` while a move is under way.
    moving_until: AtomicU64,
    born: Instant,
    /// How long each pause lasted, from its start to the view that ended
    /// it (the switch, or the move called off).
    paused_writes: Histogram,
}

/// How long an old owner waits for its view to show a move whose copy
/// begins.
const SEE_MOVE_WITHIN: Duration = Duration::from_secs(3);

/// How long a shard that moved here stays unsettled: sends refused before
/// the move (by the old owner, or its pause) are retried within it.
const SETTLE: Duration = Duration::from_secs(30);

#[derive(Default)]
struct SlotsState {
    /// The shards the last view gave this node: number, epoch, slots.
    owned: Vec<(u32, i64, Range<u16>)>,
    /// A view has been followed (the first sets `owned`).
    followed: bool,
    export: Option<Export>,
    /// Shards that moved here, and when.
    arrived: Vec<(Range<u16>, Instant)>,
    /// The last view's map (each shard's owner) and its moves (shard,
    /// record incarnation).
    map: Vec<Option<String>>,
    moves: Vec<(u32, i64)>,
    /// Shards this node owns but must not serve: a replicated shard whose
    /// primary here is deposed or fenced (`replica.rs`).
    fenced: BTreeSet<u32>,
}

impl SlotsState {
    /// The runs to serve: the owned shards', less a paused run and fenced
    /// shards.
    fn served(&self) -> Vec<Range<u16>> {
        let paused = self
            .export
            .as_ref()
            .filter(|e| e.paused)
            .map(|e| e.run.clone());
        self.owned
            .iter()
            .filter(|(s, _, r)| Some(r) != paused.as_ref() && !self.fenced.contains(s))
            .map(|(_, _, r)| r.clone())
            .collect()
    }
}

/// What a view changed for this node's shards.
#[derive(Debug, PartialEq, Eq)]
pub enum Change {
    /// A shard is this node's now (a move's switch).
    Gained(u32, Range<u16>),
    /// A shard is another node's now (its data here was deleted, if this
    /// node paused it for the move).
    Lost(u32, Range<u16>),
}

impl Slots {
    pub fn new(store: Arc<dyn InboxStore>, me: String, metrics: &Metrics) -> Arc<Slots> {
        let paused_writes = metrics.latency_histogram(
            "courier_cluster_move_paused_writes_seconds",
            "How long a shard move paused that shard's writes, measured at the old owner: from the pause to the view that shows the switch (the new owner serves from the same view) or the move called off.",
        );
        Arc::new(Slots {
            paused_writes,
            store,
            me,
            state: Mutex::new(SlotsState::default()),
            any_unsettled: AtomicBool::new(false),
            moving_until: AtomicU64::new(0),
            born: Instant::now(),
        })
    }

    /// Whether a shard of the cluster is moving (its record is in the
    /// last view), or some shard changed owner or a move ended less than
    /// [`SETTLE`] ago: the time in which parts refused by a move are
    /// retried. A group's fan-outs go one at a time meanwhile.
    ///
    /// Set from the view that first shows a move, on every node. The old
    /// owner's own view shows it before the pause ([`Step::Begin`] waits
    /// for it), so its groups' fan-outs are one at a time before any of
    /// its parts can be refused; another node's parts to the paused shard
    /// are refused in their (group, node) line until the switch, whose
    /// view sets this on that node before it routes by it.
    pub fn shards_moving(&self) -> bool {
        let until = self.moving_until.load(Ordering::Acquire);
        until != 0 && (until == u64::MAX || self.born.elapsed().as_millis() < u128::from(until))
    }

    /// Notes moves and owner changes in `view` for [`Slots::shards_moving`].
    /// A shard taking its first owner (the map's creation) is no move.
    fn note_moves(&self, st: &mut SlotsState, view: &View) {
        let map: Vec<Option<String>> = view
            .owners
            .iter()
            .map(|o| o.as_ref().map(|o| o.node.clone()))
            .collect();
        let moves: Vec<(u32, i64)> = view.moves.iter().map(|(&s, m)| (s, m.created)).collect();
        let owner_changed = map
            .iter()
            .zip(&st.map)
            .any(|(now, before)| matches!((now, before), (Some(a), Some(b)) if a != b));
        let changed = st.followed && (owner_changed || st.moves != moves);
        if !moves.is_empty() {
            self.moving_until.store(u64::MAX, Ordering::Release);
        } else if changed || self.moving_until.load(Ordering::Acquire) == u64::MAX {
            let until = (self.born.elapsed() + SETTLE).as_millis() as u64;
            self.moving_until.store(until, Ordering::Release);
        }
        st.map = map;
        st.moves = moves;
    }

    /// Counts how long `e`'s pause lasted, if it paused, as it ends.
    fn pause_ended(&self, e: &Export) -> Option<Duration> {
        let paused = e.paused_at?.elapsed();
        self.paused_writes.observe(paused.as_secs_f64());
        Some(paused)
    }

    /// Whether `id`'s shard is moving away from this node, or moved here
    /// lately: sends to it may be refused mid-session (the pause), or be
    /// retries of sends refused before it came, so a conversation's sends
    /// to it keep their order through the router's line, as sends to other
    /// nodes do.
    pub fn unsettled(&self, id: u64) -> bool {
        if !self.any_unsettled.load(Ordering::Acquire) {
            return false;
        }
        let slot = u16::from(courier_storage::slot_of(id));
        let mut st = self.state.lock().expect("slots lock");
        st.arrived.retain(|(_, at)| at.elapsed() < SETTLE);
        let unsettled = st.export.as_ref().is_some_and(|e| e.run.contains(&slot))
            || st.arrived.iter().any(|(r, _)| r.contains(&slot));
        if st.export.is_none() && st.arrived.is_empty() {
            self.any_unsettled.store(false, Ordering::Release);
        }
        unsettled
    }

    /// Serves what `view` gives this node, less a paused run, and says
    /// which shards came and went since the last view (none for the
    /// first: what the node has at start, it took up at start). A paused
    /// shard whose owner changed has moved: its run is deleted here (the
    /// switch is in etcd, where the view was read) and its export ends.
    pub fn follow(&self, view: &View) -> Vec<Change> {
        let Some(t) = self.store.transfer() else {
            return Vec::new();
        };
        let count = view.owners.len() as u32;
        let mut st = self.state.lock().expect("slots lock");
        self.note_moves(&mut st, view);
        let owned: Vec<(u32, i64, Range<u16>)> = view
            .owners
            .iter()
            .enumerate()
            .filter_map(|(shard, o)| {
                let o = o.as_ref().filter(|o| o.node == self.me)?;
                Some((shard as u32, o.epoch, slots_of_shard(shard as u32, count)))
            })
            .collect();
        let mut changes = Vec::new();
        if st.followed {
            let had = |s: u32, set: &[(u32, i64, Range<u16>)]| set.iter().any(|o| o.0 == s);
            for (s, _, run) in &owned {
                if !had(*s, &st.owned) {
                    changes.push(Change::Gained(*s, run.clone()));
                    st.arrived.push((run.clone(), Instant::now()));
                    self.any_unsettled.store(true, Ordering::Release);
                }
            }
            for (s, _, run) in &st.owned {
                if !had(*s, &owned) {
                    changes.push(Change::Lost(*s, run.clone()));
                }
            }
        }
        st.followed = true;
        st.owned = owned;
        if let Some(e) = &st.export {
            let still = st
                .owned
                .iter()
                .any(|(s, epoch, _)| *s == e.shard && *epoch == e.epoch);
            if !still {
                let (shard, run, paused) = (e.shard, e.run.clone(), e.paused);
                if let Some(paused) = self.pause_ended(e) {
                    info!(
                        shard,
                        paused_ms = paused.as_millis() as u64,
                        "the shard's writes were paused for its move until the switch"
                    );
                }
                st.export = None;
                t.unwatch();
                if paused {
                    match t.delete_slots(run) {
                        Ok(()) => info!(shard, "shard moved away; its data here is deleted"),
                        Err(e) => {
                            warn!(shard, error = %e, "deleting a moved shard's data failed; it stays, unused")
                        }
                    }
                }
            }
        }
        t.serve_only(&st.served());
        changes
    }

    /// Serves none of `fenced` (shards owned here whose replicated primary
    /// is deposed or may have lost its lease), and the rest of what is
    /// owned again.
    pub fn set_fenced(&self, fenced: BTreeSet<u32>) {
        let Some(t) = self.store.transfer() else {
            return;
        };
        let mut st = self.state.lock().expect("slots lock");
        if st.fenced != fenced {
            st.fenced = fenced;
            t.serve_only(&st.served());
        }
    }

    /// The shard whose run is paused for a move, if any: its number, its
    /// epoch, the move record's incarnation, and for how long it has been
    /// paused.
    pub fn paused(&self) -> Option<(u32, i64, i64, Duration)> {
        let st = self.state.lock().expect("slots lock");
        st.export.as_ref().and_then(|e| {
            e.paused_at
                .map(|at| (e.shard, e.epoch, e.incarnation, at.elapsed()))
        })
    }

    /// Ends the export of `shard` (the move was called off): the watch
    /// stops and a paused run is served again.
    pub fn end(&self, shard: u32) {
        let Some(t) = self.store.transfer() else {
            return;
        };
        let mut st = self.state.lock().expect("slots lock");
        if st.export.as_ref().is_some_and(|e| e.shard == shard) {
            let e = st.export.take().expect("checked");
            t.unwatch();
            self.pause_ended(&e);
            if e.paused {
                t.serve_only(&st.served());
                info!(shard, "move called off; serving the shard again");
            }
        }
    }

    /// Ends an export nobody has asked anything of for `idle` (its mover
    /// is gone), unless it is paused: a paused run waits for etcd to say
    /// the move is off (`moves.rs`).
    pub fn reap(&self, idle: Duration) {
        let stale = {
            let st = self.state.lock().expect("slots lock");
            st.export
                .as_ref()
                .filter(|e| !e.paused && e.touched.elapsed() > idle)
                .map(|e| e.shard)
        };
        if let Some(shard) = stale {
            warn!(shard, "an export was abandoned by its mover; ended");
            self.end(shard);
        }
    }

    /// One step of an export of a shard this node owns (blocking: store
    /// reads and the pause's wait); `lease` is this node's.
    pub fn export(&self, r: ExportRequest, lease: i64) -> ExportAnswer {
        if r.step == Step::Begin {
            // The new owner read the move from etcd; this node's own read
            // of it may be a moment behind (see `step`). Runs on a
            // blocking thread: waiting here holds no runtime.
            let deadline = Instant::now() + SEE_MOVE_WITHIN;
            let move_of = (r.shard, r.session as i64);
            while !self
                .state
                .lock()
                .expect("slots lock")
                .moves
                .contains(&move_of)
                && Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        match self.step(r, lease) {
            Ok(a) => a,
            Err(e) => ExportAnswer::Gone(format!("{e:#}")),
        }
    }

    fn step(&self, r: ExportRequest, lease: i64) -> anyhow::Result<ExportAnswer> {
        let t = self
            .store
            .transfer()
            .ok_or_else(|| anyhow!("this node's store cannot give shards away"))?;
        let mut guard = self.state.lock().expect("slots lock");
        let st = &mut *guard;
        let owned = st
            .owned
            .iter()
            .find(|(s, e, _)| *s == r.shard && *e == r.epoch)
            .cloned();
        let Some((shard, epoch, run)) = owned else {
            return Ok(ExportAnswer::NotOwner {
                owner: String::new(),
                epoch: 0,
            });
        };
        if r.step == Step::Begin {
            // This node's groups hold their fan-outs one at a time from the
            // view that shows the move (`shards_moving`): that view must be
            // here before the pause can refuse anything (`export` waited
            // for it a moment; the mover tries again within a second).
            if !st.moves.contains(&(shard, r.session as i64)) {
                bail!("this node's view does not show the move of shard {shard} yet");
            }
            if let Some(e) = st.export.as_ref() {
                // One export at a time; a mover that went quiet gives way.
                if e.paused || e.touched.elapsed() < Duration::from_secs(10) {
                    bail!("shard {}'s export is under way here", e.shard);
                }
            }
            t.watch(run.clone());
            self.any_unsettled.store(true, Ordering::Release);
            let session = rand::random::<u64>() | 1;
            st.export = Some(Export {
                session,
                shard,
                epoch,
                run,
                incarnation: r.session as i64,
                paused: false,
                paused_at: None,
                pending: SlotChanges::default(),
                touched: Instant::now(),
            });
            return Ok(ExportAnswer::Done(ExportPiece {
                session,
                lease,
                ..ExportPiece::default()
            }));
        }
        let Some(e) = st.export.as_mut().filter(|e| e.session == r.session) else {
            return Ok(ExportAnswer::Gone("no such export here".into()));
        };
        e.touched = Instant::now();
        let mut piece = ExportPiece {
            session: e.session,
            lease,
            ..ExportPiece::default()
        };
        match r.step {
            Step::Begin => unreachable!("handled above"),
            Step::End => {
                drop(guard);
                self.end(shard);
            }
            Step::Chunk => {
                let chunk = t.export(e.run.clone(), r.from, PIECE_BYTES)?;
                piece.entries = chunk.entries;
                piece.next = chunk.next;
            }
            Step::Changes | Step::Pause => {
                if r.step == Step::Pause && !e.paused {
                    // Stop serving the run; returns once the writes that
                    // saw it served are done, so the watch has them all.
                    let mut runs = st.served();
                    runs.retain(|r| *r != run);
                    t.serve_only(&runs);
                    info!(shard, "paused the shard's writes for its move's last round");
                }
                let e = st.export.as_mut().expect("checked above");
                if r.step == Step::Pause && !e.paused {
                    e.paused = true;
                    e.paused_at = Some(Instant::now());
                }
                let drained = t.changes();
                e.pending.keys.extend(drained.keys);
                e.pending.ranges.extend(drained.ranges);
                let mut part = SlotChanges {
                    keys: BTreeSet::new(),
                    ranges: std::mem::take(&mut e.pending.ranges),
                };
                let mut bytes = 0;
                while bytes < PIECE_BYTES {
                    let Some(key) = e.pending.keys.pop_first() else {
                        break;
                    };
                    bytes += key.1.len() + 64;
                    part.keys.insert(key);
                }
                piece.entries = t.read(&part)?;
                piece.more = !e.pending.is_empty();
            }
        }
        Ok(ExportAnswer::Done(piece))
    }
}

/// What a copy did, for the log and the mover.
#[derive(Debug, Default)]
pub struct Copied {
    /// The old owner's lease when it paused.
    pub lease: i64,
    pub chunks: usize,
    pub rounds: usize,
    pub entries: usize,
    /// From the pause to the last entry imported.
    pub paused_for: Duration,
}

/// The new owner's side: copies `shard` (at `epoch`) from `from` into
/// this node's store, leaving the old owner paused. Any failure leaves
/// nothing to undo but the partial copy, which the next attempt deletes.
pub async fn copy_shard(
    peer: &super::link::Peer,
    store: &Arc<dyn InboxStore>,
    shard: u32,
    epoch: i64,
    incarnation: i64,
    shards: u32,
) -> anyhow::Result<Copied> {
    let run = slots_of_shard(shard, shards);
    let s = store.clone();
    let r = run.clone();
    blocking(move || {
        s.transfer()
            .ok_or_else(|| anyhow!("this node's store cannot take shards"))?
            .delete_slots(r)
            .context("deleting what an earlier attempt left")
    })
    .await?;
    let ask = |step: Step, session: u64, from: Option<(Space, Vec<u8>)>| {
        let body = ExportRequest {
            shard,
            epoch,
            step,
            session,
            from,
        }
        .encode();
        async move {
            let answer = peer
                .request(body, STEP_DEADLINE)
                .await
                .with_context(|| format!("export step {step:?}"))?;
            match ExportAnswer::decode(answer)? {
                ExportAnswer::Done(p) => Ok(p),
                ExportAnswer::NotOwner { .. } => {
                    bail!("the old owner no longer owns the shard at that epoch")
                }
                ExportAnswer::Gone(why) => bail!("the export is gone: {why}"),
            }
        }
    };
    let import = |entries: Vec<RawEntry>| {
        let s = store.clone();
        blocking(move || {
            s.transfer()
                .expect("checked above")
                .import(&entries)
                .context("importing")
        })
    };
    let session = ask(Step::Begin, incarnation as u64, None).await?.session;
    let mut copied = Copied::default();
    let result = async {
        let mut from = None;
        loop {
            let p = ask(Step::Chunk, session, from).await?;
            copied.chunks += 1;
            copied.entries += p.entries.len();
            import(p.entries).await?;
            from = p.next;
            if from.is_none() {
                break;
            }
        }
        for _ in 0..MAX_ROUNDS {
            let mut n = 0;
            loop {
                let p = ask(Step::Changes, session, None).await?;
                n += p.entries.len();
                import(p.entries).await?;
                if !p.more {
                    break;
                }
            }
            copied.rounds += 1;
            copied.entries += n;
            if n < SMALL_ROUND {
                break;
            }
        }
        let paused = Instant::now();
        let mut step = Step::Pause;
        loop {
            let p = ask(step, session, None).await?;
            copied.lease = p.lease;
            copied.entries += p.entries.len();
            import(p.entries).await?;
            if !p.more {
                break;
            }
            step = Step::Changes;
        }
        copied.paused_for = paused.elapsed();
        anyhow::Ok(())
    }
    .await;
    if let Err(e) = result {
        // Unpaused by the old owner only through etcd (the move's record
        // gone); an export that was not paused ends now.
        let _ = ask(Step::End, session, None).await;
        return Err(e);
    }
    Ok(copied)
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| anyhow!("a store task failed: {e}"))?
}

#[cfg(test)]
mod tests {
    use super::*;

    use super::super::view::{Move, MoveRecord, Owner};

    /// Node "a"'s slots over a slotted store in `dir`.
    fn slots_of_a(dir: &std::path::Path) -> Arc<Slots> {
        use courier_storage::{RocksStore, StoreConfig};
        let config = StoreConfig {
            layout: crate::state::keys::slotted(),
            ..StoreConfig::default()
        };
        let store = RocksStore::open(dir, config).unwrap();
        let metrics = Metrics::new(&crate::metrics::ShardMetrics::new(1));
        Slots::new(Arc::new(store), "a".into(), &metrics)
    }

    /// Two shards owned by `nodes`, at epoch 5.
    fn owned(nodes: [&str; 2]) -> Vec<Option<Owner>> {
        nodes
            .iter()
            .map(|n| {
                Some(Owner {
                    node: (*n).into(),
                    epoch: 5,
                    ..Owner::default()
                })
            })
            .collect()
    }

    /// A move from "b" to "a" at epoch 5, record incarnation 9.
    fn a_move() -> Move {
        Move {
            record: MoveRecord {
                from: "b".into(),
                to: "a".into(),
                epoch: 5,
                copied_lease: None,
            },
            revision: 9,
            created: 9,
        }
    }

    /// Shards count as moving from the view that shows a move until 30 s
    /// after one that changed an owner; the map's creation (shards taking
    /// their first owner) is no move.
    #[test]
    fn shards_count_as_moving_from_a_move_record_not_from_the_maps_creation() {
        let dir = tempfile::tempdir().unwrap();
        let slots = slots_of_a(dir.path());
        let mut view = View::default();
        slots.follow(&view);
        view.owners = vec![None, None];
        slots.follow(&view);
        view.owners = owned(["a", "b"]);
        slots.follow(&view);
        assert!(!slots.shards_moving(), "a new map is no move");
        view.moves.insert(1, a_move());
        slots.follow(&view);
        assert!(slots.shards_moving(), "a move is under way");
        view.moves.clear();
        view.owners = owned(["a", "a"]);
        slots.follow(&view);
        assert!(slots.shards_moving(), "settling after the switch");
    }

    /// An old owner starts an export only once its own view shows the
    /// move (its groups then send one entry at a time before its pause can
    /// refuse a part); until then the new owner hears why and tries again.
    #[test]
    fn an_export_begins_only_once_the_old_owners_view_shows_the_move() {
        let dir = tempfile::tempdir().unwrap();
        let slots = slots_of_a(dir.path());
        let mut view = View {
            owners: owned(["a", "b"]),
            ..View::default()
        };
        slots.follow(&view);
        let begin = || ExportRequest {
            shard: 0,
            epoch: 5,
            step: Step::Begin,
            session: 9,
            from: None,
        };
        match slots.export(begin(), 1) {
            ExportAnswer::Gone(why) => assert!(why.contains("does not show the move"), "{why}"),
            other => panic!("began before the view showed the move: {other:?}"),
        }
        assert!(!slots.shards_moving());
        view.moves.insert(
            0,
            Move {
                record: MoveRecord {
                    from: "a".into(),
                    to: "b".into(),
                    ..a_move().record
                },
                ..a_move()
            },
        );
        slots.follow(&view);
        assert!(slots.shards_moving());
        assert!(matches!(slots.export(begin(), 1), ExportAnswer::Done(_)));
    }

    #[test]
    fn requests_and_answers_round_trip_and_bad_bytes_are_refused() {
        let r = ExportRequest {
            shard: 7,
            epoch: 42,
            step: Step::Chunk,
            session: 9,
            from: Some((Space::Kv, vec![3, b'G', 1])),
        };
        assert_eq!(ExportRequest::decode(r.encode()).unwrap(), r);
        let a = ExportAnswer::Done(ExportPiece {
            session: 9,
            lease: 0x55,
            more: true,
            next: None,
            entries: vec![
                RawEntry::Put {
                    space: Space::Inbox,
                    key: vec![1, 2],
                    value: vec![3; 300],
                },
                RawEntry::Delete {
                    space: Space::Meta,
                    key: vec![4],
                },
                RawEntry::DeleteRange {
                    space: Space::Expiring,
                    from: vec![5],
                    to: vec![6],
                },
            ],
        });
        assert_eq!(ExportAnswer::decode(a.encode()).unwrap(), a);
        for other in [
            ExportAnswer::NotOwner {
                owner: "n2".into(),
                epoch: 3,
            },
            ExportAnswer::Gone("restarted".into()),
        ] {
            assert_eq!(ExportAnswer::decode(other.encode()).unwrap(), other);
        }
        let bytes = a.encode();
        for cut in [1, 10, bytes.len() - 1] {
            assert_eq!(
                ExportAnswer::decode(bytes.slice(..cut)),
                Err(WireError::Truncated),
                "cut at {cut}"
            );
        }
        let mut long = BytesMut::from(&r.encode()[..]);
        long.put_u8(0);
        assert_eq!(
            ExportRequest::decode(long.freeze()),
            Err(WireError::Trailing(1))
        );
        let mut bad = BytesMut::from(&r.encode()[..]);
        bad[13] = 9;
        assert_eq!(
            ExportRequest::decode(bad.freeze()),
            Err(WireError::UnknownOp(9)),
            "an unknown step"
        );
    }
}

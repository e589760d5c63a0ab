//! Delivered and read marks, the receipts they produce, and status views.
//!
//! A mark moves a cursor forward and never back. For a user's inbox the
//! shard keeps the user's receipt cursors (`R` row: delivered, read, as
//! inbox sequences). A mark reads the inbox range it newly covers and
//! - for one-to-one and broadcast messages, writes one `receipt` message per
//!   original sender into that sender's inbox (through the sender's shard,
//!   idempotently keyed, so a repeat after a crash stores nothing twice);
//! - for group references, moves the member's group cursor (`C` row), which
//!   the group's aggregate counts read: group senders get no receipt storm.
//!
//! Read implies delivered; a message first marked read gets only a `read`
//! receipt, so what the sender sees only moves forward.
//!
//! Exactly once, across crashes (an outbox): a mark plans its receipts as
//! outbox rows (`O` reader . emission) and moves the `R` row in the same
//! atomic write; only after that write are the receipts queued on the
//! senders' shards, each keyed by (reader, emission number, the sender's
//! receipt scope). A receipt's durable outcome deletes its outbox row; a
//! failed one is sent again on the next tick; at start every outbox row is
//! sent again and the keys absorb what was already stored. So a range is
//! planned once (the `R` row moved with it) and each planned receipt is
//! stored once (its key), whatever is killed when. What a repeat after more
//! than the idempotency window (24 hours by default) would store twice is a
//! receipt whose outbox row outlived a crash by that long.
//!
//! A status view is a `viewed` receipt in the poster's inbox, planned on the
//! poster's shard once the viewer is found allowed to see the status.

use std::collections::BTreeMap;
use std::time::Instant;

use courier_protocol::{Destination, ErrorCode, MessageKind, ReceiptPayload, ReceiptStatus};
use courier_storage::KvOp;
use tracing::{error, warn};

use super::core::Shard;
use super::messages::{Completion, MarkCmd, SendCmd, ShardCmd, StatusViewCmd};
use super::recent::Fact;
use super::route::shard_of;
use super::tracking::{Batch, KnownRow};
use crate::error::{BrokerError, BrokerResult};
use crate::state::keys;
use crate::state::rows::{Cursors, OutboxRow, ReceiptRow};
use crate::state::social;

/// Inbox messages read per step while emitting receipts.
const PAGE: usize = 1024;
/// Messages named by one receipt message at most.
const RECEIPT_MESSAGES_MAX: usize = 4096;
/// How far a user's delivered cursor may run ahead of its `R` row on disk
/// through marks that owe nothing (see `KnownRow`): what the next mark
/// after a crash reads back at most.
pub(crate) const UNWRITTEN_MAX: u64 = 1024;
/// Outbox rows one shard reads at start at most (normally there are none
/// or a handful: a row lives from a mark until its receipt is durable).
const OUTBOX_RECOVER_MAX: usize = 1 << 20;

/// The idempotency scope of receipts to `sender`: the top bit, which no
/// user id has, keeps a receipt's key apart from a broadcast copy's
/// (reader, client id, recipient) with the same numbers.
pub(crate) fn receipt_scope(sender: u64) -> u64 {
    sender | (1 << 63)
}

/// The receipts a mark owes: (original sender, status, one-to-one) ->
/// (client id, server id, inbox sequence) of each message, in sequence
/// order.
type Owed = BTreeMap<(u64, u8, bool), Vec<(u64, u64, u64)>>;

impl Shard {
    /// A mark from a session: applied with this batch, or held to be merged
    /// with the user's next ones for `mark_coalesce`.
    pub(crate) fn hold_mark(&mut self, m: MarkCmd, batch: &mut Batch) {
        if self.config.mark_coalesce.is_zero() {
            batch.marks.push(m);
            return;
        }
        let held = self.held_marks.entry((m.user, m.stream)).or_default();
        held.delivered = held.delivered.max(m.up_to_seq);
        if m.status == ReceiptStatus::Read {
            held.read = held.read.max(m.up_to_seq);
        }
        if self.marks_due.is_none() {
            self.marks_due = Some(Instant::now() + self.config.mark_coalesce);
        }
    }

    /// Moves the held marks into `marks` once they are due (or `all` now).
    pub(crate) fn release_marks(&mut self, all: bool, marks: &mut Vec<MarkCmd>) {
        if self.held_marks.is_empty()
            || !(all || self.marks_due.is_some_and(|d| d <= Instant::now()))
        {
            return;
        }
        self.marks_due = None;
        for (key, held) in std::mem::take(&mut self.held_marks) {
            held.release(key, marks);
        }
    }

    /// Moves `user`'s held marks into `marks` now (a new session of the
    /// user resumes after them); other users' keep waiting.
    pub(crate) fn release_marks_of(&mut self, user: u64, marks: &mut Vec<MarkCmd>) {
        let keys: Vec<(u64, u64)> = self
            .held_marks
            .range((user, 0)..=(user, u64::MAX))
            .map(|(k, _)| *k)
            .collect();
        for key in keys {
            let held = self.held_marks.remove(&key).expect("listed");
            held.release(key, marks);
        }
        if self.held_marks.is_empty() {
            self.marks_due = None;
        }
    }

    pub(crate) fn apply_marks(&mut self, marks: &mut Vec<MarkCmd>) {
        for m in marks.drain(..) {
            if m.stream == 0 {
                self.mark_inbox(m.user, m.up_to_seq, m.status);
            } else {
                self.mark_group(m.user, m.stream, m.up_to_seq, m.status);
            }
        }
    }

    pub(crate) fn group_cursor_cached(&self, g: u64, user: u64) -> Option<Cursors> {
        self.group_cursors.get(&(g, user)).copied()
    }

    fn group_cursor(&mut self, g: u64, user: u64) -> Cursors {
        if let Some(c) = self.group_cursors.get(&(g, user)) {
            return *c;
        }
        let c = self.read_cursors(&keys::cursor(g, user));
        self.group_cursors.insert((g, user), c);
        c
    }

    /// A `C` or `R` row; "nothing yet" if absent or unreadable.
    fn read_cursors(&self, key: &[u8]) -> Cursors {
        match self.store.get(key) {
            Ok(Some(v)) => Cursors::decode(&v),
            Ok(None) => Cursors::default(),
            Err(e) => {
                // Treated as "nothing receipted yet": at worst a receipt is repeated.
                warn!(shard = self.id, error = %e, "reading a cursor failed");
                Cursors::default()
            }
        }
    }

    /// Moves a member's group cursor forward (read implies delivered).
    fn advance_group_cursor(&mut self, g: u64, user: u64, seq: u64, status: ReceiptStatus) {
        let old = self.group_cursor(g, user);
        let new = old.advanced(seq, status == ReceiptStatus::Read);
        if new != old {
            self.group_cursors.insert((g, user), new);
            self.kv.push(KvOp::Put {
                key: keys::cursor(g, user),
                value: new.encode(),
            });
        }
    }

    fn mark_group(&mut self, user: u64, g: u64, up_to: u64, status: ReceiptStatus) {
        let head = match self.store.state(g) {
            Ok(s) => s.head_seq,
            Err(e) => {
                warn!(shard = self.id, error = %e, "reading a group head failed");
                return;
            }
        };
        self.advance_group_cursor(g, user, up_to.min(head), status);
    }

    /// The user's `R` row, cached; `None` if the store cannot read it
    /// (treating that as "nothing receipted yet" would repeat receipts
    /// under new emission numbers: the caller plans nothing instead).
    fn receipt_row(&mut self, user: u64) -> Option<KnownRow> {
        if let Some(r) = self.receipt_rows.get(&user) {
            return Some(*r);
        }
        let row = match self.store.get(&keys::receipts(user)) {
            Ok(Some(v)) => ReceiptRow::decode(&v),
            Ok(None) => ReceiptRow::default(),
            Err(e) => {
                warn!(shard = self.id, user, error = %e, "reading a receipt row failed");
                return None;
            }
        };
        let known = KnownRow {
            row,
            written: row.cursors,
        };
        self.receipt_rows.insert(user, known);
        Some(known)
    }

    /// Puts every `R` row that is ahead of the disk (a stopping shard).
    pub(crate) fn put_unwritten_receipt_rows(&mut self) {
        for (user, known) in &mut self.receipt_rows {
            if known.written != known.row.cursors {
                known.written = known.row.cursors;
                self.kv.push(KvOp::Put {
                    key: keys::receipts(*user),
                    value: known.row.encode(),
                });
            }
        }
    }

    /// Acknowledges the inbox up to `up_to`, then plans the receipts of what
    /// the mark newly covers: the acknowledgement, their outbox rows and the
    /// moved `R` row go in the next key-value write (one write for a turn's
    /// marks), and the receipts are sent once it is done
    /// ([`Shard::kv_written`]).
    fn mark_inbox(&mut self, user: u64, up_to: u64, status: ReceiptStatus) {
        // Read implies delivered: both move the inbox's ack cursor.
        let state = match self.store.acked_state(user, up_to) {
            Ok(s) => s,
            Err(e) => {
                warn!(shard = self.id, error = %e, "recording an ack failed");
                return;
            }
        };
        // Nothing acknowledged (an empty inbox, or one whose slot is not
        // served here, which `acked_state` has already counted) writes
        // nothing.
        if state.acked_seq > 0 {
            self.kv.push(KvOp::Ack {
                inbox: user,
                up_to_seq: up_to,
            });
        }
        if state.acked_seq >= state.oldest_seq {
            self.note_trim(user);
        }
        let Some(known) = self.receipt_row(user) else {
            return; // unreadable row (logged); the next mark tries again
        };
        let old = known.row;
        let cursors = old.cursors;
        let read = if status == ReceiptStatus::Read {
            cursors.read.max(up_to.min(state.head_seq))
        } else {
            cursors.read
        };
        let new = Cursors::new(cursors.delivered.max(state.acked_seq).max(read), read);
        if new == cursors {
            return;
        }
        let owed = self.owed_receipts(user, cursors, new);
        let row = self.plan_emissions(user, old, new, owed);
        let quiet = row.emitted == old.emitted
            && new.read == known.written.read
            && new.delivered.saturating_sub(known.written.delivered) <= UNWRITTEN_MAX;
        let written = if quiet {
            known.written
        } else {
            self.kv.push(KvOp::Put {
                key: keys::receipts(user),
                value: row.encode(),
            });
            new
        };
        self.receipt_rows.insert(user, KnownRow { row, written });
    }

    /// Collects the receipts the inbox range between `old` and `new` owes
    /// (from the recent entries when they cover it, else from the store);
    /// group references move group cursors instead.
    fn owed_receipts(&mut self, user: u64, old: Cursors, new: Cursors) -> Owed {
        let mut owed = Owed::new();
        // Messages up to the delivered cursor need nothing unless the read
        // cursor moved: start there, not at the read cursor (a user who
        // acknowledges but never marks read would otherwise have every ack
        // re-read the inbox from its first unread message).
        let mut after = if new.read > old.read {
            old.read
        } else {
            old.delivered
        };
        // Whichever way the range is read, what is read owes nothing more.
        let recent = self.recent.range(user, after, new.delivered);
        self.recent.done_up_to(user, new.read);
        if let Some(facts) = recent {
            for (seq, fact) in facts {
                self.owe(user, seq, fact, old, new, &mut owed);
            }
            return owed;
        }
        self.stats.receipt_range_reads.inc();
        while after < new.delivered {
            // Exactly what is left of the range (a client that acknowledges
            // one message of a long backlog reads one message).
            let want = ((new.delivered - after) as usize).min(PAGE);
            let page = match self.store.read_after(user, after, want) {
                Ok(p) => p,
                Err(e) => {
                    warn!(shard = self.id, error = %e, "reading messages for receipts failed");
                    break;
                }
            };
            let full = page.len() == want;
            for m in page {
                if m.seq > new.delivered {
                    return owed;
                }
                after = m.seq;
                self.owe(user, m.seq, Fact::of(user, &m), old, new, &mut owed);
            }
            if !full {
                break;
            }
        }
        owed
    }

    /// What one message of a marked range owes.
    fn owe(
        &mut self,
        user: u64,
        seq: u64,
        fact: Fact,
        old: Cursors,
        new: Cursors,
        owed: &mut Owed,
    ) {
        let st = if seq > old.read && seq <= new.read {
            ReceiptStatus::Read
        } else if seq > old.delivered {
            ReceiptStatus::Delivered
        } else {
            return;
        };
        match fact {
            Fact::GroupRef { log, seq } => self.advance_group_cursor(log, user, seq, st),
            Fact::Receipt {
                sender,
                client_msg_id,
                server_msg_id,
                direct,
            } => owed.entry((sender, st as u8, direct)).or_default().push((
                client_msg_id,
                server_msg_id,
                seq,
            )),
            Fact::Nothing => {}
        }
    }

    /// One outbox row per original sender, status and chunk of what the
    /// mark owes, each under the reader's next emission number; returns the
    /// `R` row that goes with them.
    fn plan_emissions(
        &mut self,
        user: u64,
        old: ReceiptRow,
        new: Cursors,
        owed: Owed,
    ) -> ReceiptRow {
        let mut emitted = old.emitted;
        for ((sender, st, direct), messages) in owed {
            let status = ReceiptStatus::from_u8(st).expect("from a ReceiptStatus");
            for chunk in messages.chunks(RECEIPT_MESSAGES_MAX) {
                emitted += 1;
                let covers = match chunk.last() {
                    Some(&(_, _, seq)) if direct => seq,
                    _ => 0,
                };
                let row = OutboxRow {
                    sender,
                    payload: ReceiptPayload {
                        status,
                        reader: user,
                        messages: chunk.iter().map(|&(c, s, _)| (c, s)).collect(),
                    }
                    .encode(),
                    covers,
                };
                self.kv.push(KvOp::Put {
                    key: keys::outbox(user, emitted),
                    value: row.encode(),
                });
                self.outbox_unwritten.push((user, emitted, row));
            }
        }
        ReceiptRow {
            cursors: new,
            emitted,
        }
    }

    /// The key-value write that carried planned receipt rows has an outcome.
    /// Written: the receipts it planned are sent. Failed: they are forgotten
    /// with every cached `R` row (the next mark plans again from the disk,
    /// where the range is still owed).
    pub(crate) fn kv_written(&mut self, ok: bool) {
        if !ok {
            self.outbox_unwritten.clear();
            self.receipt_rows.clear();
            self.facts.clear();
            return;
        }
        self.facts.trim();
        for (reader, emission, row) in std::mem::take(&mut self.outbox_unwritten) {
            self.send_receipt(reader, emission, &row);
            self.outbox.insert((reader, emission), (row, true));
        }
    }

    /// Queues one outbox row on the original sender's shard. Its idempotency
    /// key (reader, emission, the sender in the receipt scope) makes a
    /// repeat, after a crash or a failed write, store nothing twice.
    fn send_receipt(&self, reader: u64, emission: u64, row: &OutboxRow) {
        let receipt = SendCmd {
            sender: reader,
            sender_device: 0,
            recipient: row.sender,
            client_msg_id: emission,
            destination: Destination::User(row.sender),
            scope: receipt_scope(row.sender),
            kind: MessageKind::Receipt,
            payload: row.payload.clone(),
            covers_seq: row.covers,
            done: Completion::Receipt { reader, emission },
            accepted: Instant::now(),
        };
        self.to_peer(row.sender, ShardCmd::Send(receipt));
    }

    /// One receipt has an outcome at its sender's shard: durable, its outbox
    /// row goes; failed, it is sent again on the next tick.
    pub(crate) fn receipt_part_done(&mut self, reader: u64, emission: u64, ok: bool) {
        let Some(entry) = self.outbox.get_mut(&(reader, emission)) else {
            warn!(
                shard = self.id,
                reader, emission, "a receipt outcome for nothing in the outbox"
            );
            return;
        };
        if !ok {
            entry.1 = false;
            return;
        }
        self.outbox.remove(&(reader, emission));
        self.kv.push(KvOp::Delete {
            key: keys::outbox(reader, emission),
        });
    }

    /// Sends again the receipts whose last attempt failed.
    pub(crate) fn retry_receipts(&mut self) {
        let again: Vec<(u64, u64)> = self
            .outbox
            .iter()
            .filter(|(_, (_, in_flight))| !in_flight)
            .map(|(k, _)| *k)
            .collect();
        for (reader, emission) in again {
            let entry = self.outbox.get_mut(&(reader, emission)).expect("listed");
            entry.1 = true;
            let row = entry.0.clone();
            self.send_receipt(reader, emission, &row);
        }
    }

    /// At start: sends every outbox row of this shard's users again (a crash
    /// came between planning them and their being durable at the senders).
    pub(crate) fn recover_receipts(&mut self) {
        self.recover_receipts_in(None);
    }

    /// [`Shard::recover_receipts`] for readers whose slot is in `run` (a
    /// shard that moved here), or all of them.
    pub(crate) fn recover_receipts_in(&mut self, run: Option<&std::ops::Range<u16>>) {
        let scanned = match run {
            Some(run) => {
                self.store
                    .scan_slots(&keys::outbox_prefix(), run.clone(), OUTBOX_RECOVER_MAX)
            }
            None => self.store.scan(&keys::outbox_prefix(), OUTBOX_RECOVER_MAX),
        };
        let rows = match scanned {
            Ok(rows) => rows,
            Err(e) => {
                error!(shard = self.id, error = %e, "reading the receipt outbox failed; its receipts wait for the next start");
                return;
            }
        };
        if rows.len() == OUTBOX_RECOVER_MAX {
            warn!(shard = self.id, "more than {OUTBOX_RECOVER_MAX} receipts in the outbox; the rest wait for the next start");
        }
        let shards = self.peers.len();
        for (key, value) in rows {
            let (Some(reader), Some(emission)) = (keys::be_u64(&key, 1), keys::be_u64(&key, 9))
            else {
                error!(shard = self.id, key = ?key, "corrupt receipt outbox key; skipped");
                continue;
            };
            if shard_of(reader, shards) != self.id as usize
                || run.is_some_and(|r| !r.contains(&u16::from(courier_storage::slot_of(reader))))
            {
                continue;
            }
            let Some(row) = OutboxRow::decode(&value) else {
                error!(
                    shard = self.id,
                    reader, emission, "corrupt receipt outbox row; skipped"
                );
                continue;
            };
            self.send_receipt(reader, emission, &row);
            self.outbox.insert((reader, emission), (row, true));
        }
    }

    /// A status view, on the poster's shard: plans the `viewed` receipt if
    /// the viewer may see the status, or answers why not.
    pub(crate) fn plan_status_view(&mut self, v: StatusViewCmd, batch: &mut Batch) {
        match self.may_view(&v) {
            Ok(()) => {}
            Err(e) => {
                let _ = v.answer.send(Err(e));
                return;
            }
        }
        let receipt = SendCmd {
            sender: v.viewer,
            sender_device: v.viewer_device,
            recipient: v.poster,
            client_msg_id: v.status_id,
            destination: Destination::User(v.poster),
            scope: v.poster,
            kind: MessageKind::Receipt,
            payload: ReceiptPayload {
                status: ReceiptStatus::Viewed,
                reader: v.viewer,
                messages: vec![(v.status_id, v.status_id)],
            }
            .encode(),
            covers_seq: 0,
            done: Completion::Stored(v.answer),
            accepted: Instant::now(),
        };
        self.plan_send(receipt, batch);
    }

    fn may_view(&self, v: &StatusViewCmd) -> BrokerResult<()> {
        let now = self.now_ms();
        // The viewer's side of the consent was checked by the viewer's
        // session, where the viewer's contacts are.
        if social::poster_shows(&*self.store, v.viewer, v.poster, v.status_id, now)? {
            Ok(())
        } else {
            Err(BrokerError::refused(
                ErrorCode::NO_SUCH_STATUS,
                "no such status for you",
            ))
        }
    }
}

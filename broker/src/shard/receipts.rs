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
//! receipt, so what the sender sees only moves forward. The `R` row is
//! written once every receipt of the mark is durable (each part reports
//! with `ReceiptPartDone`); after a crash in between, the next mark
//! re-emits from the durable cursor and the receipts' idempotency keys
//! absorb the repeats.
//!
//! A status view is a `viewed` receipt in the poster's inbox, planned on the
//! poster's shard once the viewer is found allowed to see the status.

use std::collections::BTreeMap;
use std::time::Instant;

use courier_protocol::{Destination, ErrorCode, MessageKind, ReceiptPayload, ReceiptStatus};
use courier_storage::{KvOp, StoredMessage};
use tracing::warn;

use super::core::Shard;
use super::messages::{Completion, MarkCmd, SendCmd, ShardCmd, StatusViewCmd};
use super::tracking::{Batch, PendingReceipts};
use crate::error::{BrokerError, BrokerResult};
use crate::state::keys;
use crate::state::rows::Cursors;
use crate::state::social;

/// Inbox messages read per step while emitting receipts.
const PAGE: usize = 1024;
/// Messages named by one receipt message at most.
const RECEIPT_MESSAGES_MAX: usize = 4096;

/// The receipts a mark owes: (original sender, status) -> (client id,
/// server id) of each message.
type Owed = BTreeMap<(u64, u8), Vec<(u64, u64)>>;

impl Shard {
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

    fn receipt_cursor(&mut self, user: u64) -> Cursors {
        if let Some(c) = self.receipt_cursors.get(&user) {
            return *c;
        }
        let c = self.read_cursors(&keys::receipts(user));
        self.receipt_cursors.insert(user, c);
        c
    }

    /// Acknowledges the inbox up to `up_to`, then emits the receipts of what
    /// the mark newly covers.
    fn mark_inbox(&mut self, user: u64, up_to: u64, status: ReceiptStatus) {
        // Read implies delivered: both move the inbox's ack cursor.
        let state = match self.store.ack(user, up_to) {
            Ok(s) => s,
            Err(e) => {
                warn!(shard = self.id, error = %e, "recording an ack failed");
                return;
            }
        };
        if state.acked_seq >= state.oldest_seq {
            self.note_trim(user);
        }
        let old = self.receipt_cursor(user);
        let read = if status == ReceiptStatus::Read {
            old.read.max(up_to.min(state.head_seq))
        } else {
            old.read
        };
        let new = Cursors::new(old.delivered.max(state.acked_seq).max(read), read);
        if new == old {
            return;
        }
        self.receipt_cursors.insert(user, new);
        let owed = self.owed_receipts(user, old, new);
        if owed.is_empty() {
            self.kv.push(KvOp::Put {
                key: keys::receipts(user),
                value: new.encode(),
            });
            return;
        }
        self.emit_receipts(user, old, new, owed);
    }

    /// Reads the inbox range between `old` and `new` and collects the
    /// receipts it owes; group references move group cursors instead.
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
                self.owe(user, &m, old, new, &mut owed);
            }
            if !full {
                break;
            }
        }
        owed
    }

    /// What one message of a marked range owes.
    fn owe(&mut self, user: u64, m: &StoredMessage, old: Cursors, new: Cursors, owed: &mut Owed) {
        let st = if m.seq > old.read && m.seq <= new.read {
            ReceiptStatus::Read
        } else if m.seq > old.delivered {
            ReceiptStatus::Delivered
        } else {
            return;
        };
        if let Some(via) = m.via {
            self.advance_group_cursor(via.log, user, via.seq, st);
            return;
        }
        let rec = &m.record;
        let kind = MessageKind::from_u8(rec.kind);
        if rec.sender == user
            || rec.dest_tag == Destination::Group(0).tag()
            || !matches!(kind, Some(MessageKind::Chat | MessageKind::Template))
        {
            return;
        }
        owed.entry((rec.sender, st as u8))
            .or_default()
            .push((rec.client_msg_id, rec.server_msg_id));
    }

    /// Sends each original sender its receipts (in chunks), through the
    /// sender's shard; the `R` row follows once all are durable.
    fn emit_receipts(&mut self, user: u64, old: Cursors, new: Cursors, owed: Owed) {
        let parts: usize = owed
            .values()
            .map(|v| v.len().div_ceil(RECEIPT_MESSAGES_MAX))
            .sum();
        let token = self.token();
        self.receipts_in_flight.insert(
            token,
            PendingReceipts {
                remaining: parts,
                failed: false,
                reader: user,
                cursors: new,
            },
        );
        let end = if new.read > old.read {
            new.read
        } else {
            new.delivered
        };
        for ((sender, st), messages) in owed {
            let status = ReceiptStatus::from_u8(st).expect("from a ReceiptStatus");
            for (i, chunk) in messages.chunks(RECEIPT_MESSAGES_MAX).enumerate() {
                let payload = ReceiptPayload {
                    status,
                    reader: user,
                    messages: chunk.to_vec(),
                }
                .encode();
                // Unique per (reader, range end, status, chunk) and scoped by the
                // receiving sender: a re-emission of the same mark is a duplicate.
                let client_msg_id =
                    (u64::from(st) << 56) | ((i as u64 & 0xff) << 48) | (end & ((1 << 48) - 1));
                let receipt = SendCmd {
                    sender: user,
                    sender_device: 0,
                    recipient: sender,
                    client_msg_id,
                    destination: Destination::User(sender),
                    scope: sender,
                    kind: MessageKind::Receipt,
                    payload,
                    done: Completion::Receipt {
                        reader: user,
                        token,
                    },
                    accepted: Instant::now(),
                };
                self.to_peer(sender, ShardCmd::Send(receipt));
            }
        }
    }

    /// One part of a mark's receipts has an outcome; once all are durable
    /// the reader's `R` row records how far receipts went.
    pub(crate) fn receipt_part_done(&mut self, token: u64, ok: bool) {
        let Some(p) = self.receipts_in_flight.get_mut(&token) else {
            warn!(
                shard = self.id,
                token, "a receipt part for nothing in flight"
            );
            return;
        };
        p.failed |= !ok;
        p.remaining = p.remaining.saturating_sub(1);
        if p.remaining > 0 {
            return;
        }
        let p = self.receipts_in_flight.remove(&token).expect("present");
        if !p.failed {
            self.kv.push(KvOp::Put {
                key: keys::receipts(p.reader),
                value: p.cursors.encode(),
            });
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
            done: Completion::Stored(v.answer),
            accepted: Instant::now(),
        };
        self.plan_send(receipt, batch);
    }

    fn may_view(&self, v: &StatusViewCmd) -> BrokerResult<()> {
        let now = self.now_ms();
        if social::can_view(&*self.store, v.viewer, v.poster, v.status_id, now)? {
            Ok(())
        } else {
            Err(BrokerError::refused(
                ErrorCode::NO_SUCH_STATUS,
                "no such status for you",
            ))
        }
    }
}

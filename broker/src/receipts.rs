//! Delivered and read marks, and the receipts they produce.
//!
//! A mark moves a cursor forward and never back. For a user's inbox the
//! shard keeps two receipt cursors per user (`R` key: delivered, read, as
//! inbox sequences). A mark reads the inbox range it newly covers and
//! - for one-to-one and broadcast messages, writes one `receipt` message per
//!   original sender into that sender's inbox (through the sender's shard,
//!   idempotently keyed, so a repeat after a crash stores nothing twice);
//! - for group references, moves the member's group cursor (`C` key), which
//!   the group's aggregate counts read: group senders get no receipt storm.
//!
//! Read implies delivered; a message first marked read gets only a `read`
//! receipt, so what the sender sees only moves forward. The `R` cursor is
//! written once every receipt of the mark is durable (`ShardCmd::ReceiptsDone`);
//! after a crash in between, the next mark re-emits from the durable cursor
//! and the receipts' idempotency keys absorb the repeats.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::Arc;

use courier_protocol::{Destination, MessageKind, ReceiptPayload, ReceiptStatus};
use courier_storage::KvOp;
use tracing::warn;

use crate::keys;
use crate::shard::{Completion, ReceiptBatch, SendCmd, Shard, ShardCmd};

/// Inbox messages read per step while emitting receipts.
const PAGE: usize = 1024;
/// Messages named by one receipt message at most.
const RECEIPT_MESSAGES_MAX: usize = 4096;

impl Shard {
    pub(crate) fn apply_marks(&mut self, marks: &mut Vec<(u64, u64, u64, ReceiptStatus)>) {
        for (user, stream, up_to, status) in marks.drain(..) {
            if stream == 0 {
                self.mark_inbox(user, up_to, status);
            } else {
                self.mark_group(user, stream, up_to, status);
            }
        }
    }

    pub(crate) fn group_cursor_cached(&self, g: u64, user: u64) -> Option<(u64, u64)> {
        self.group_cursors.get(&(g, user)).copied()
    }

    fn group_cursor(&mut self, g: u64, user: u64) -> (u64, u64) {
        if let Some(c) = self.group_cursors.get(&(g, user)) {
            return *c;
        }
        let c = self.read_pair(&keys::cursor(g, user));
        self.group_cursors.insert((g, user), c);
        c
    }

    /// A (u64, u64) value of the key-value space; (0, 0) if absent.
    fn read_pair(&self, key: &[u8]) -> (u64, u64) {
        match self.store.get(key) {
            Ok(Some(v)) => (
                keys::be_u64(&v, 0).unwrap_or(0),
                keys::be_u64(&v, 8).unwrap_or(0),
            ),
            Ok(None) => (0, 0),
            Err(e) => {
                // Treated as "nothing receipted yet": at worst a receipt is repeated.
                warn!(shard = self.id, error = %e, "reading a cursor failed");
                (0, 0)
            }
        }
    }

    /// Moves a member's group cursor forward (read implies delivered).
    fn advance_group_cursor(&mut self, g: u64, user: u64, seq: u64, status: ReceiptStatus) {
        let (d, r) = self.group_cursor(g, user);
        let nr = if status == ReceiptStatus::Read {
            r.max(seq)
        } else {
            r
        };
        let nd = d.max(seq).max(nr);
        if (nd, nr) != (d, r) {
            self.group_cursors.insert((g, user), (nd, nr));
            self.kv.push(KvOp::Put {
                key: keys::cursor(g, user),
                value: keys::pair(nd, nr),
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

    fn receipt_cursor(&mut self, user: u64) -> (u64, u64) {
        if let Some(c) = self.receipt_cursors.get(&user) {
            return *c;
        }
        let c = self.read_pair(&keys::receipts(user));
        self.receipt_cursors.insert(user, c);
        c
    }

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
        let (d, r) = self.receipt_cursor(user);
        let nr = if status == ReceiptStatus::Read {
            r.max(up_to.min(state.head_seq))
        } else {
            r
        };
        let nd = d.max(state.acked_seq).max(nr);
        if (nd, nr) == (d, r) {
            return;
        }
        self.receipt_cursors.insert(user, (nd, nr));

        // (original sender, status) -> (client id, server id) of each message.
        let mut receipts: BTreeMap<(u64, u8), Vec<(u64, u64)>> = BTreeMap::new();
        // Messages up to the delivered cursor need nothing unless the read
        // cursor moved: start there, not at the read cursor (a user who
        // acknowledges but never marks read would otherwise have every ack
        // re-read the inbox from its first unread message).
        let mut after = if nr > r { r } else { d };
        'pages: while after < nd {
            // Exactly what is left of the range (a client that acknowledges
            // one message of a long backlog reads one message).
            let want = ((nd - after) as usize).min(PAGE);
            let page = match self.store.read_after(user, after, want) {
                Ok(p) => p,
                Err(e) => {
                    warn!(shard = self.id, error = %e, "reading messages for receipts failed");
                    break;
                }
            };
            let full = page.len() == want;
            for m in page {
                if m.seq > nd {
                    break 'pages;
                }
                after = m.seq;
                let st = if m.seq > r && m.seq <= nr {
                    ReceiptStatus::Read
                } else if m.seq > d {
                    ReceiptStatus::Delivered
                } else {
                    continue;
                };
                if let Some(via) = m.via {
                    self.advance_group_cursor(via.log, user, via.seq, st);
                    continue;
                }
                let rec = &m.record;
                let kind = MessageKind::from_u8(rec.kind);
                if rec.sender == user
                    || rec.dest_tag == Destination::Group(0).tag()
                    || !matches!(kind, Some(MessageKind::Chat | MessageKind::Template))
                {
                    continue;
                }
                receipts
                    .entry((rec.sender, st as u8))
                    .or_default()
                    .push((rec.client_msg_id, rec.server_msg_id));
            }
            if !full {
                break;
            }
        }
        if receipts.is_empty() {
            self.kv.push(KvOp::Put {
                key: keys::receipts(user),
                value: keys::pair(nd, nr),
            });
            return;
        }
        let parts: usize = receipts
            .values()
            .map(|v| v.len().div_ceil(RECEIPT_MESSAGES_MAX))
            .sum();
        let batch = Arc::new(ReceiptBatch {
            remaining: AtomicUsize::new(parts),
            failed: AtomicBool::new(false),
            user,
            delivered: nd,
            read: nr,
            back: self.peers[self.id as usize].clone(),
        });
        let end = if nr > r { nr } else { nd };
        for ((sender, st), messages) in receipts {
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
                self.to_peer(
                    sender,
                    ShardCmd::Send(SendCmd {
                        sender: user,
                        sender_device: 0,
                        recipient: sender,
                        client_msg_id,
                        destination: Destination::User(sender),
                        scope: sender,
                        kind: MessageKind::Receipt,
                        payload,
                        done: Completion::Receipts(batch.clone()),
                        accepted: std::time::Instant::now(),
                    }),
                );
            }
        }
    }
}

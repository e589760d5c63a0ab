//! The correctness checker: it knows every message the server acknowledged
//! and to whom it was addressed, sees every delivery, and at the end names
//! each loss, duplicate and reorder.
//!
//! A conversation is one ordered stream of one sender (a pair, or a sender
//! in a group); messages in it are numbered 1, 2, 3 ... by the generator.
//! The rules checked, per (recipient, conversation):
//! - every acknowledged message arrives (a message delivered but never
//!   acknowledged is fine: it was in flight when the run ended);
//! - no message arrives twice;
//! - messages arrive in increasing number (gaps allowed only for messages
//!   that were never acknowledged).
//!
//! And per (reader, conversation) that owes receipts (one-to-one and
//! broadcast, on a target that writes them): each message the reader got
//! comes back to its sender with exactly one `read` receipt if a read mark
//! covered it (and at most one `delivered` before it), otherwise with
//! exactly one `delivered` receipt and no `read` one; no receipt names a
//! message the reader never got.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

/// Where a message is expected: (recipient, conversation).
type Key = (u64, u64);

#[derive(Default)]
pub struct Checker {
    /// Acknowledged message numbers per (recipient, conversation).
    acked: HashMap<Key, Vec<u64>>,
    /// Delivered message numbers per (recipient, conversation), in arrival order.
    seen: HashMap<Key, Vec<u64>>,
    /// Per (reader, conversation) that owes receipts: the highest message
    /// number a read mark covered (0: none).
    owes: HashMap<Key, u64>,
    /// Receipts the senders got per (reader, conversation): a byte per
    /// message number (index n - 1), delivered receipts in the low nibble,
    /// read ones in the high, each saturating at 15.
    receipts: HashMap<Key, Vec<u8>>,
    /// The inbox sequences each recipient was delivered, in order (a
    /// diagnosis: where a lost message's recipient skipped an entry).
    inbox_seqs: HashMap<u64, Vec<u64>>,
}

/// One problem the checker found.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Problem {
    pub kind: ProblemKind,
    pub recipient: u64,
    pub conversation: u64,
    pub n: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProblemKind {
    Lost,
    Duplicate,
    Reordered,
    ReceiptMissing,
    ReceiptDuplicated,
    /// A receipt for a message its reader never got, or a read receipt no
    /// read mark called for.
    ReceiptUnexpected,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Verdict {
    pub acknowledged: u64,
    pub expected_deliveries: u64,
    pub deliveries: u64,
    pub lost: u64,
    pub duplicates: u64,
    pub reordered: u64,
    /// Messages that owed receipts (zero where none are checked).
    #[serde(default)]
    pub receipts_owed: u64,
    #[serde(default)]
    pub receipts_missing: u64,
    #[serde(default)]
    pub receipts_duplicated: u64,
    #[serde(default)]
    pub receipts_unexpected: u64,
    /// The first problems found (at most 20), for the report.
    pub examples: Vec<Problem>,
    /// For the recipients of those lost: the inbox sequences between the
    /// first and the last they were delivered that they never were (an
    /// entry stored and not delivered, or none: the message is not in
    /// the inbox at all), at most 20 each.
    #[serde(default)]
    pub inbox_gaps: Vec<(u64, Vec<u64>)>,
}

impl Verdict {
    pub fn ok(&self) -> bool {
        self.lost == 0
            && self.duplicates == 0
            && self.reordered == 0
            && self.receipts_missing == 0
            && self.receipts_duplicated == 0
            && self.receipts_unexpected == 0
    }
}

impl Checker {
    pub fn new() -> Checker {
        Checker::default()
    }

    /// The server acknowledged message `n` of `conversation`, addressed to `recipients`.
    pub fn acked(&mut self, conversation: u64, n: u64, recipients: &[u64]) {
        for &r in recipients {
            self.acked.entry((r, conversation)).or_default().push(n);
        }
    }

    /// `recipient` received message `n` of `conversation`.
    pub fn delivered(&mut self, recipient: u64, conversation: u64, n: u64) {
        self.seen
            .entry((recipient, conversation))
            .or_default()
            .push(n);
    }

    /// `reader`'s messages of `conversation` owe receipts; a read mark
    /// covered them up to number `read_up_to`.
    pub fn owes_receipts(&mut self, reader: u64, conversation: u64, read_up_to: u64) {
        let r = self.owes.entry((reader, conversation)).or_default();
        *r = (*r).max(read_up_to);
    }

    /// The sender of `conversation` got a receipt from `reader` for
    /// message `n`: `read`, or delivered.
    pub fn receipt(&mut self, reader: u64, conversation: u64, n: u64, read: bool) {
        let Some(i) = (n as usize).checked_sub(1) else {
            return;
        };
        let v = self.receipts.entry((reader, conversation)).or_default();
        if v.len() <= i {
            v.resize(i + 1, 0);
        }
        let (d, r) = (v[i] & 0xF, v[i] >> 4);
        v[i] = if read {
            d | (r + 1).min(15) << 4
        } else {
            (d + 1).min(15) | r << 4
        };
    }

    /// `recipient` was delivered inbox entry `seq` (any kind).
    pub fn inbox_seq(&mut self, recipient: u64, seq: u64) {
        self.inbox_seqs.entry(recipient).or_default().push(seq);
    }

    /// Folds another checker's observations into this one (one per task).
    pub fn merge(&mut self, other: Checker) {
        for (k, v) in other.inbox_seqs {
            self.inbox_seqs.entry(k).or_default().extend(v);
        }
        for (k, v) in other.acked {
            self.acked.entry(k).or_default().extend(v);
        }
        for (k, v) in other.seen {
            self.seen.entry(k).or_default().extend(v);
        }
        for (k, r) in other.owes {
            let e = self.owes.entry(k).or_default();
            *e = (*e).max(r);
        }
        for (k, v) in other.receipts {
            let mine = self.receipts.entry(k).or_default();
            if mine.len() < v.len() {
                mine.resize(v.len(), 0);
            }
            for (a, b) in mine.iter_mut().zip(v) {
                let d = ((*a & 0xF) + (b & 0xF)).min(15);
                let r = ((*a >> 4) + (b >> 4)).min(15);
                *a = d | r << 4;
            }
        }
    }

    pub fn verify(&self) -> Verdict {
        let mut v = Verdict::default();
        let note = |v: &mut Verdict, kind, (recipient, conversation): Key, n| {
            match kind {
                ProblemKind::Lost => v.lost += 1,
                ProblemKind::Duplicate => v.duplicates += 1,
                ProblemKind::Reordered => v.reordered += 1,
                ProblemKind::ReceiptMissing => v.receipts_missing += 1,
                ProblemKind::ReceiptDuplicated => v.receipts_duplicated += 1,
                ProblemKind::ReceiptUnexpected => v.receipts_unexpected += 1,
            }
            if v.examples.len() < 20 {
                v.examples.push(Problem {
                    kind,
                    recipient,
                    conversation,
                    n,
                });
            }
        };
        let mut conversations_acked: HashMap<u64, u64> = HashMap::new();
        for (key, acked) in &self.acked {
            v.expected_deliveries += acked.len() as u64;
            let c = conversations_acked.entry(key.1).or_default();
            *c = (*c).max(acked.len() as u64);
            let seen = self.seen.get(key).map(Vec::as_slice).unwrap_or(&[]);
            let mut sorted = seen.to_vec();
            sorted.sort_unstable();
            for n in acked {
                if sorted.binary_search(n).is_err() {
                    note(&mut v, ProblemKind::Lost, *key, *n);
                }
            }
        }
        v.acknowledged = conversations_acked.values().sum();
        for (key, seen) in &self.seen {
            v.deliveries += seen.len() as u64;
            let mut last = 0;
            let mut set = std::collections::HashSet::with_capacity(seen.len());
            for &n in seen {
                if !set.insert(n) {
                    note(&mut v, ProblemKind::Duplicate, *key, n);
                } else if n < last {
                    note(&mut v, ProblemKind::Reordered, *key, n);
                }
                last = last.max(n);
            }
        }
        self.verify_receipts(&mut v, note);
        let mut lost_to: Vec<u64> = v
            .examples
            .iter()
            .filter(|e| e.kind == ProblemKind::Lost)
            .map(|e| e.recipient)
            .collect();
        lost_to.sort_unstable();
        lost_to.dedup();
        for r in lost_to {
            let mut seqs = self.inbox_seqs.get(&r).cloned().unwrap_or_default();
            seqs.sort_unstable();
            seqs.dedup();
            let missing: Vec<u64> = seqs
                .windows(2)
                .flat_map(|w| w[0] + 1..w[1])
                .take(20)
                .collect();
            v.inbox_gaps.push((r, missing));
        }
        v
    }

    fn verify_receipts(&self, v: &mut Verdict, note: impl Fn(&mut Verdict, ProblemKind, Key, u64)) {
        let count = |key: &Key, n: u64| {
            let c = self
                .receipts
                .get(key)
                .and_then(|r| r.get(n as usize - 1))
                .copied()
                .unwrap_or(0);
            (c & 0xF, c >> 4)
        };
        let mut got = std::collections::HashSet::new();
        for (key, &read_up_to) in &self.owes {
            let mut seen = self.seen.get(key).cloned().unwrap_or_default();
            seen.sort_unstable();
            seen.dedup();
            for n in seen {
                got.insert((*key, n));
                v.receipts_owed += 1;
                let (d, r) = count(key, n);
                let kind = if n <= read_up_to {
                    match (d, r) {
                        (_, 0) => Some(ProblemKind::ReceiptMissing),
                        (0 | 1, 1) => None,
                        _ => Some(ProblemKind::ReceiptDuplicated),
                    }
                } else {
                    match (d, r) {
                        (1, 0) => None,
                        (0, 0) => Some(ProblemKind::ReceiptMissing),
                        (_, 0) => Some(ProblemKind::ReceiptDuplicated),
                        _ => Some(ProblemKind::ReceiptUnexpected),
                    }
                };
                if let Some(kind) = kind {
                    note(v, kind, *key, n);
                }
            }
        }
        for (key, counts) in &self.receipts {
            for (i, &c) in counts.iter().enumerate() {
                if c != 0 && !got.contains(&(*key, i as u64 + 1)) {
                    note(v, ProblemKind::ReceiptUnexpected, *key, i as u64 + 1);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_clean_run_passes_and_in_flight_messages_are_not_losses() {
        let mut c = Checker::new();
        for n in 1..=3 {
            c.acked(7, n, &[1, 2]);
        }
        for r in [1, 2] {
            for n in 1..=4 {
                c.delivered(r, 7, n); // 4 was in flight: delivered, never acked
            }
        }
        let v = c.verify();
        assert!(v.ok(), "{v:?}");
        assert_eq!(
            (v.acknowledged, v.expected_deliveries, v.deliveries),
            (3, 6, 8)
        );
    }

    #[test]
    fn losses_duplicates_and_reorders_are_each_named() {
        let mut c = Checker::new();
        for n in 1..=4 {
            c.acked(7, n, &[1]);
        }
        for n in [1, 3, 2, 3] {
            c.delivered(1, 7, n);
        }
        let v = c.verify();
        assert_eq!((v.lost, v.duplicates, v.reordered), (1, 1, 1), "{v:?}");
        assert!(v.examples.contains(&Problem {
            kind: ProblemKind::Lost,
            recipient: 1,
            conversation: 7,
            n: 4
        }));
        assert!(!v.ok());
    }

    #[test]
    fn a_lost_messages_recipient_shows_the_inbox_entries_it_skipped() {
        let mut c = Checker::new();
        for n in 1..=3 {
            c.acked(7, n, &[1]);
        }
        for (n, seq) in [(1, 10), (3, 13)] {
            c.delivered(1, 7, n);
            c.inbox_seq(1, seq);
        }
        // A receipt in between, at 11.
        c.inbox_seq(1, 11);
        let v = c.verify();
        assert_eq!(v.lost, 1, "{v:?}");
        assert_eq!(v.inbox_gaps, vec![(1, vec![12])]);
    }

    #[test]
    fn receipts_are_checked_against_what_was_read_and_marked() {
        let mut c = Checker::new();
        // Reader 1 got messages 1..=4 of conversation 7 and marked 1..=2 read.
        for n in 1..=4 {
            c.acked(7, n, &[1]);
            c.delivered(1, 7, n);
        }
        c.owes_receipts(1, 7, 2);
        // 1: delivered then read; 2: read only (coalesced); 3, 4: delivered.
        c.receipt(1, 7, 1, false);
        c.receipt(1, 7, 1, true);
        c.receipt(1, 7, 2, true);
        c.receipt(1, 7, 3, false);
        c.receipt(1, 7, 4, false);
        let v = c.verify();
        assert!(v.ok(), "{v:?}");
        assert_eq!(v.receipts_owed, 4);

        let mut bad = Checker::new();
        for n in 1..=4 {
            bad.delivered(1, 7, n);
        }
        bad.owes_receipts(1, 7, 2);
        bad.receipt(1, 7, 1, true);
        bad.receipt(1, 7, 1, true); // read twice
        bad.receipt(1, 7, 3, false);
        bad.receipt(1, 7, 3, true); // read though no mark covered it
        bad.receipt(1, 7, 9, false); // never delivered
                                     // 2 has no read receipt, 4 no delivered one.
        let v = bad.verify();
        assert_eq!(
            (
                v.receipts_missing,
                v.receipts_duplicated,
                v.receipts_unexpected
            ),
            (2, 1, 2),
            "{v:?}"
        );
        assert!(!v.ok());
    }
}

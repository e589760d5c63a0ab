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
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Verdict {
    pub acknowledged: u64,
    pub expected_deliveries: u64,
    pub deliveries: u64,
    pub lost: u64,
    pub duplicates: u64,
    pub reordered: u64,
    /// The first problems found (at most 20), for the report.
    pub examples: Vec<Problem>,
}

impl Verdict {
    pub fn ok(&self) -> bool {
        self.lost == 0 && self.duplicates == 0 && self.reordered == 0
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

    /// Folds another checker's observations into this one (one per task).
    pub fn merge(&mut self, other: Checker) {
        for (k, v) in other.acked {
            self.acked.entry(k).or_default().extend(v);
        }
        for (k, v) in other.seen {
            self.seen.entry(k).or_default().extend(v);
        }
    }

    pub fn verify(&self) -> Verdict {
        let mut v = Verdict::default();
        let note = |v: &mut Verdict, kind, (recipient, conversation): Key, n| {
            match kind {
                ProblemKind::Lost => v.lost += 1,
                ProblemKind::Duplicate => v.duplicates += 1,
                ProblemKind::Reordered => v.reordered += 1,
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
        v
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
}

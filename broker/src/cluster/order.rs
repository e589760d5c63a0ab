//! A sender's order through `SHARD_UNAVAILABLE`.
//!
//! A client pipelines its sends: A, B and C to Bob can all be on their way
//! at once. If A is refused `SHARD_UNAVAILABLE` (Bob's node out of reach)
//! and the client retries it after the hint, B or C must not be stored
//! before A's retry, or Bob sees them out of the order they were sent in.
//! On one node that cannot happen (a send is refused only when the session
//! ends); across nodes one send can fail while the session lives on.
//!
//! So the sender's node keeps, per conversation (sender, device,
//! recipient) whose sends cross to another node, the sends on their way
//! and the refused ones in the order they were first seen. Once one is
//! refused, the next send let through is the oldest refused one (its
//! retry); every other send of that conversation is refused meanwhile and
//! takes its place in the line. The line is also joined by sends still on
//! their way over a link connection that is gone (they will fail), so a
//! send cannot slip out on the new connection before them. The client
//! library retries each refused send after the hint with its id, so the
//! line drains in order once the owner is back. Sends to other recipients
//! are not held.
//!
//! A group's shard keeps a line per (group, node) for the copies of its
//! log entries to that node's members ([`Line::admit_entry`]): the same
//! rules, with the entries in the order of their sequence.
//!
//! A line whose first send has not been seen (retried) for [`GIVE_UP`] is
//! dropped: its client gave up on it (the library retries every hint, at
//! most 5 s apart, for 30 s by default).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long the first refused send's retry is waited for before its line
/// is dropped.
pub const GIVE_UP: Duration = Duration::from_secs(10);

/// One device's conversation with one recipient.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct Key {
    pub sender: u64,
    pub device: u32,
    pub recipient: u64,
}

/// What one conversation has on its way and waiting to be retried.
#[derive(Default, Debug)]
pub struct Line {
    /// The place given to the next send not seen before.
    next: u64,
    /// Sends on their way, oldest first: (place, client id, connection).
    inflight: VecDeque<(u64, u64, u64)>,
    /// Refused sends by place: the first must be retried next.
    refused: BTreeMap<u64, u64>,
    /// When the first refused send became first or was last seen.
    waiting_since: Option<Instant>,
}

impl Line {
    /// Whether send `id` may go out now over link connection `connection`
    /// (`None`: no connection to the owner). If not, it is refused and
    /// keeps its place in the line.
    pub fn admit(&mut self, id: u64, connection: Option<u64>, now: Instant) -> bool {
        self.forget_given_up(now);
        self.fail_gone(connection);
        let seen = self.refused.iter().find(|(_, &r)| r == id).map(|(&p, _)| p);
        let first = self.refused.keys().next().copied();
        let place = match (connection, first) {
            (Some(_), None) => self.fresh(),
            (Some(_), Some(first)) if seen == Some(first) => first,
            _ => {
                if seen.is_none() {
                    let place = self.fresh();
                    self.refused.insert(place, id);
                }
                if seen.is_some() && seen == first || self.waiting_since.is_none() {
                    // The first one is still being retried.
                    self.waiting_since = Some(now);
                }
                return false;
            }
        };
        self.refused.remove(&place);
        self.waiting_since = (!self.refused.is_empty()).then_some(now);
        self.inflight
            .push_back((place, id, connection.expect("matched Some")));
        true
    }

    /// Whether entry `seq` of a group's log may go out now, as copies to
    /// the node of this line, over link connection `connection`. A
    /// group's line orders its entries by sequence, not as first seen:
    /// the group's shard sends every entry that waits again on each tick,
    /// oldest first, and one bundle of copies goes to several nodes. In
    /// first-seen order each node's line let one entry through per tick,
    /// each line a different one, so the bundle failed at the other
    /// line, and the entry stored at one node came back to it as new,
    /// behind the rest: a livelock that held a group's sends unanswered
    /// for as long as the run lasted. By sequence every line lets the
    /// waiting entries through in the order the shard sends them again.
    /// The oldest refused entry goes first; an entry older than it
    /// passes (it went out before, or is a retry of one stored there:
    /// the member's shard keeps the same order, see `shard::lines`).
    pub fn admit_entry(&mut self, seq: u64, connection: Option<u64>, now: Instant) -> bool {
        self.forget_given_up(now);
        self.fail_gone(connection);
        let first = self.refused.keys().next().copied();
        let goes_first = first.is_none_or(|f| seq <= f);
        let Some(connection) = connection.filter(|_| goes_first) else {
            if goes_first {
                // First in line (or the first, retried): waited for from now.
                self.waiting_since = Some(now);
            }
            self.refused.insert(seq, seq);
            return false;
        };
        if self.refused.remove(&seq).is_some() {
            // The first one went: the next waits from now.
            self.waiting_since = (!self.refused.is_empty()).then_some(now);
        }
        self.inflight.push_back((seq, seq, connection));
        true
    }

    /// Drops what waits if its first has not been retried for [`GIVE_UP`].
    fn forget_given_up(&mut self, now: Instant) {
        if self
            .waiting_since
            .is_some_and(|t| now.duration_since(t) > GIVE_UP)
        {
            self.refused.clear();
            self.waiting_since = None;
        }
    }

    /// Sends on their way over a connection other than `connection` (gone:
    /// they will fail) take their places among the refused, before
    /// anything sent after them.
    fn fail_gone(&mut self, connection: Option<u64>) {
        let mut i = 0;
        while i < self.inflight.len() {
            let (place, gone, on) = self.inflight[i];
            if Some(on) == connection {
                i += 1;
            } else {
                self.inflight.remove(i);
                self.refused.insert(place, gone);
            }
        }
    }

    /// The send admitted last went out on connection `connection` (it may
    /// be a newer one than [`Line::admit`] was told).
    pub fn went_out(&mut self, id: u64, connection: u64) {
        if let Some(last) = self.inflight.back_mut().filter(|s| s.1 == id) {
            last.2 = connection;
        }
    }

    /// Send `id` was answered: stored (or refused for good), or
    /// `unavailable` (it takes its place in the line again).
    pub fn answered(&mut self, id: u64, unavailable: bool, now: Instant) {
        let place = self
            .inflight
            .iter()
            .position(|s| s.1 == id)
            .and_then(|i| self.inflight.remove(i))
            .map(|s| s.0);
        if unavailable {
            if let Some(place) = place {
                self.refused.insert(place, id);
                self.waiting_since.get_or_insert(now);
            }
        } else if place.is_none() {
            // Answered after its connection was seen gone: it made it.
            self.refused.retain(|_, r| *r != id);
            if self.refused.is_empty() {
                self.waiting_since = None;
            }
        }
    }

    /// Send `id` was refused by a shard of this node, without having gone
    /// through [`Line::admit`] (a local send while the line was empty): it
    /// takes its place in the line, or keeps the one it has.
    pub fn refused_here(&mut self, id: u64, now: Instant) {
        if self.inflight.iter().any(|s| s.1 == id) {
            return self.answered(id, true, now);
        }
        if !self.refused.values().any(|&r| r == id) {
            let place = self.fresh();
            self.refused.insert(place, id);
        }
        self.waiting_since.get_or_insert(now);
    }

    fn fresh(&mut self) -> u64 {
        self.next += 1;
        self.next
    }

    fn idle(&self) -> bool {
        self.inflight.is_empty() && self.refused.is_empty()
    }
}

/// Every conversation's line on this node, in parts locked apart.
pub struct Lines {
    parts: Box<[Mutex<HashMap<Key, Line>>]>,
}

impl Default for Lines {
    fn default() -> Lines {
        Lines {
            parts: (0..16).map(|_| Mutex::new(HashMap::new())).collect(),
        }
    }
}

impl Lines {
    /// Runs `f` on `key`'s line (kept only while it holds something).
    pub fn with<R>(&self, key: Key, f: impl FnOnce(&mut Line) -> R) -> R {
        let mut map = self.part(key);
        let line = map.entry(key).or_default();
        let r = f(line);
        if line.idle() {
            map.remove(&key);
        }
        r
    }

    /// Whether `key` has a line (something on its way or waiting).
    pub fn holds(&self, key: Key) -> bool {
        self.part(key).contains_key(&key)
    }

    fn part(&self, key: Key) -> std::sync::MutexGuard<'_, HashMap<Key, Line>> {
        let part = (key.sender ^ key.recipient.rotate_left(17) ^ u64::from(key.device)) as usize
            % self.parts.len();
        self.parts[part].lock().expect("not poisoned")
    }

    /// Conversations with something on their way or waiting.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.parts
            .iter()
            .map(|p| p.lock().expect("not poisoned").len())
            .sum()
    }

    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(ms: u64, start: Instant) -> Instant {
        start + Duration::from_millis(ms)
    }

    #[test]
    fn sends_flow_while_nothing_is_refused() {
        let now = Instant::now();
        let mut l = Line::default();
        for id in 1..=3 {
            assert!(l.admit(id, Some(7), now));
        }
        for id in 1..=3 {
            l.answered(id, false, now);
        }
        assert!(l.idle());
    }

    #[test]
    fn after_a_refusal_the_refused_send_goes_first_and_the_rest_follow_in_order() {
        let now = Instant::now();
        let mut l = Line::default();
        assert!(l.admit(1, Some(7), now));
        assert!(l.admit(2, Some(7), now));
        // 1 fails; 2 is still on its way (same connection, will be answered).
        l.answered(1, true, now);
        // 3 arrives: refused, behind 1.
        assert!(!l.admit(3, Some(7), now));
        l.answered(2, false, now);
        // 3's retry comes first: still 1's turn.
        assert!(!l.admit(3, Some(7), t(500, now)));
        assert!(
            !l.admit(4, Some(7), t(500, now)),
            "a new send joins the line"
        );
        assert!(l.admit(1, Some(7), t(510, now)), "1's retry");
        assert!(!l.admit(4, Some(7), t(520, now)), "3 is before 4");
        assert!(l.admit(3, Some(7), t(1000, now)));
        assert!(l.admit(4, Some(7), t(1000, now)));
        assert!(l.admit(5, Some(7), t(1000, now)), "the line is empty again");
        for id in [1, 3, 4, 5] {
            l.answered(id, false, t(1100, now));
        }
        assert!(l.idle());
    }

    #[test]
    fn sends_on_a_lost_connection_go_before_anything_sent_on_the_next() {
        let now = Instant::now();
        let mut l = Line::default();
        assert!(l.admit(1, Some(7), now));
        assert!(l.admit(2, Some(7), now));
        // The connection broke and a new one is up before 1's and 2's
        // failures are seen: 3 must not go out ahead of them.
        assert!(!l.admit(3, Some(8), now));
        l.answered(2, true, now);
        l.answered(1, true, now);
        assert!(!l.admit(2, Some(8), now));
        assert!(l.admit(1, Some(8), now));
        assert!(l.admit(2, Some(8), now));
        assert!(l.admit(3, Some(8), now));
    }

    #[test]
    fn a_send_answered_after_its_connection_was_seen_gone_leaves_the_line() {
        let now = Instant::now();
        let mut l = Line::default();
        assert!(l.admit(1, Some(7), now));
        assert!(!l.admit(2, Some(8), now), "1 is counted lost");
        // 1's answer had come in just before the connection went.
        l.answered(1, false, now);
        assert!(l.admit(2, Some(8), now), "2 is next");
    }

    #[test]
    fn without_a_connection_everything_waits_in_order() {
        let now = Instant::now();
        let mut l = Line::default();
        assert!(!l.admit(1, None, now));
        assert!(!l.admit(2, None, now));
        assert!(!l.admit(1, None, now), "no connection yet");
        assert!(!l.admit(2, Some(9), now));
        assert!(l.admit(1, Some(9), now));
        assert!(l.admit(2, Some(9), now));
    }

    #[test]
    fn a_line_whose_first_send_is_no_longer_retried_is_dropped() {
        let now = Instant::now();
        let mut l = Line::default();
        // 1 is retried through a long outage: its line holds.
        for s in 0..30 {
            assert!(!l.admit(1, None, t(s * 1000, now)));
            assert!(!l.admit(2, None, t(s * 1000 + 1, now)));
        }
        assert!(!l.admit(2, Some(3), t(30_000, now)), "1 is still first");
        // Then 1 is given up: 2 goes once 1 has not been seen for GIVE_UP.
        let later = t(29_000, now) + GIVE_UP + Duration::from_secs(1);
        assert!(l.admit(2, Some(3), later), "1 was given up");
    }

    #[test]
    fn a_send_refused_on_this_node_goes_before_later_sends_to_another() {
        let now = Instant::now();
        let mut l = Line::default();
        // 1 went to a shard of this node (not through the line) and was
        // refused; 2 goes to the shard's new owner.
        l.refused_here(1, now);
        assert!(!l.admit(2, Some(4), now), "2 waits for 1's retry");
        assert!(l.admit(1, Some(4), now));
        assert!(l.admit(2, Some(4), now));
        // Refused here once more while on its way through the line: no
        // second place.
        l.refused_here(2, now);
        assert!(!l.admit(3, Some(4), now));
        assert!(l.admit(2, Some(4), now));
    }

    /// Two nodes' lines of one group, whose entries 3, 4 and 5 were
    /// refused in different orders (no connection a moment): the tick
    /// that sends them again, oldest first, gets all three through both.
    /// In first-seen order each line let one through, a different one,
    /// so every bundle failed at the other node (the livelock).
    #[test]
    fn a_groups_entries_go_again_in_sequence_whatever_order_they_were_refused_in() {
        let now = Instant::now();
        let (mut a, mut b) = (Line::default(), Line::default());
        for seq in [5, 3, 4] {
            assert!(!a.admit_entry(seq, None, now));
        }
        for seq in [4, 5, 3] {
            assert!(!b.admit_entry(seq, None, now));
        }
        for seq in 3..=5 {
            assert!(a.admit_entry(seq, Some(1), now), "{seq} to a");
            assert!(b.admit_entry(seq, Some(1), now), "{seq} to b");
        }
        for seq in 3..=5 {
            a.answered(seq, false, now);
            b.answered(seq, false, now);
        }
        assert!(a.idle() && b.idle());

        // First seen, for contrast: the same tick gets one through.
        let mut first_seen = Line::default();
        for id in [5, 3, 4] {
            assert!(!first_seen.admit(id, None, now));
        }
        let through: Vec<u64> = (3..=5)
            .filter(|&id| first_seen.admit(id, Some(1), now))
            .collect();
        assert_eq!(through, vec![5]);
    }

    /// An entry newer than the first refused one waits for it; an older
    /// one (sent before it, or a retry of one stored there) passes.
    #[test]
    fn a_newer_entry_waits_for_the_first_refused_and_an_older_one_passes() {
        let now = Instant::now();
        let mut l = Line::default();
        assert!(l.admit_entry(10, Some(1), now));
        assert!(l.admit_entry(11, Some(1), now));
        l.answered(10, false, now);
        l.answered(11, true, now); // refused there: 11 goes next
        assert!(!l.admit_entry(12, Some(1), now));
        assert!(l.admit_entry(10, Some(1), now), "older than 11");
        l.answered(10, false, now);
        assert!(l.admit_entry(11, Some(1), now));
        assert!(l.admit_entry(12, Some(1), now));
        // On their way over connection 1, which is gone: they go again
        // before anything after them.
        assert!(!l.admit_entry(13, Some(2), now));
        assert!(l.admit_entry(11, Some(2), now));
        assert!(l.admit_entry(12, Some(2), now));
        assert!(l.admit_entry(13, Some(2), now));
    }

    /// A group's line whose first entry is not sent again (its members
    /// went to another node) lets the rest go after [`GIVE_UP`].
    #[test]
    fn a_groups_line_whose_first_entry_is_not_sent_again_is_dropped() {
        let start = Instant::now();
        let mut l = Line::default();
        assert!(!l.admit_entry(7, None, start));
        assert!(!l.admit_entry(8, Some(1), t(1_000, start)));
        assert!(!l.admit_entry(8, Some(1), t(9_000, start)));
        assert!(l.admit_entry(8, Some(1), t(10_001, start)));
    }

    #[test]
    fn a_line_stays_only_while_it_holds_something() {
        let lines = Lines::default();
        let key = Key {
            sender: 1,
            device: 1,
            recipient: 2,
        };
        let now = Instant::now();
        assert!(lines.with(key, |l| l.admit(5, Some(1), now)));
        assert_eq!(lines.len(), 1);
        lines.with(key, |l| l.answered(5, false, now));
        assert!(lines.is_empty());
    }
}

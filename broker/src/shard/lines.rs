//! A conversation's order through this shard's retryable refusals.
//!
//! The sender's node keeps each conversation's sends to other nodes in line
//! (`cluster::order`), but it cannot see everything a shard decides: a
//! shard that refuses a send retryably (its slot not served a moment: a
//! replicated primary fenced until its lease is renewed, a shard paused
//! for a move) and stores the conversation's next send a moment later
//! (served again) would put them out of order once the first one's retry
//! came. Nothing about the owner changed, so nothing else holds the later
//! send back: not the sender's line (the first send may have been refused
//! in the same round trip as the second went out, or on this very node),
//! not the group's fan-out (one member's part failed; the group goes on).
//!
//! So a shard that refuses a conversation's send `SHARD_UNAVAILABLE` keeps
//! that conversation in line here: until the refused send is retried, the
//! conversation's later sends are refused too, and queue behind it in the
//! order first seen. Three kinds of conversation: a device's sends to an
//! inbox, a device's sends to a group (on the group's shard), and a
//! group's entries to one member's inbox (references and copies). A line
//! whose first send is not retried for [`GIVE_UP`] is dropped (its sender
//! gave up; the client library retries for 30 s by default, the group's
//! shard every second until stored).

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use crate::cluster::order::GIVE_UP;

/// Whose sends, to where, are kept in order.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub(crate) enum Conversation {
    /// A device's sends to an inbox.
    Send {
        sender: u64,
        device: u32,
        inbox: u64,
    },
    /// A device's sends to a group, on the group's shard.
    Group {
        sender: u64,
        device: u32,
        group: u64,
    },
    /// A group's entries to a member's inbox.
    Entries { group: u64, member: u64 },
}

impl Conversation {
    /// Whether its ids are in the order sent (a group's entries: their
    /// sequence in the log). Then an id older than the first refused one
    /// passes (an entry sent before it, or a retry of one stored: holding
    /// it would hold the group, which sends its entries again oldest
    /// first), and a refused one takes its place by id.
    fn ordered(&self) -> bool {
        matches!(self, Conversation::Entries { .. })
    }
}

/// Refused sends of one conversation, oldest first.
struct Line {
    /// The place given to the next send not seen before.
    next: u64,
    /// Refused sends by place: the first goes next.
    refused: BTreeMap<u64, u64>,
    /// Sends let through since the shard last wrote (its batch): with
    /// their places, which they take again if refused once more.
    going: Vec<(u64, u64)>,
    /// When the first refused send became first or was last seen.
    since: Instant,
}

impl Line {
    fn new(now: Instant) -> Line {
        Line {
            next: 0,
            refused: BTreeMap::new(),
            going: Vec::new(),
            since: now,
        }
    }

    fn place_of(&self, id: u64) -> Option<u64> {
        self.refused.iter().find(|(_, &r)| r == id).map(|(&p, _)| p)
    }

    fn fresh(&mut self) -> u64 {
        self.next += 1;
        self.next
    }
}

/// The conversations this shard keeps in line (only while one holds a
/// refused send).
#[derive(Default)]
pub(crate) struct Lines {
    lines: HashMap<Conversation, Line>,
}

impl Lines {
    /// Whether send `id` of `c` may be written now: yes unless an older
    /// refused send of `c` waits for its retry, in which case `id` joins
    /// the line (and is refused). Several may go in one batch, in line.
    ///
    /// `alone`: one send of `c` at a time (the target inbox hides a write
    /// that failed to replicate, so a retry may be refused again after
    /// its write, when a send written with it in the same batch would be
    /// stored: out of order); the others wait behind it until it is
    /// answered.
    pub(crate) fn admit(&mut self, c: Conversation, id: u64, alone: bool) -> bool {
        if alone {
            self.lines
                .entry(c)
                .or_insert_with(|| Line::new(Instant::now()));
        }
        self.lines.is_empty() || self.admit_at(c, id, Instant::now(), alone)
    }

    /// Send `id` of `c` was refused `SHARD_UNAVAILABLE`: it keeps (or
    /// takes) its place in the line.
    pub(crate) fn refused(&mut self, c: Conversation, id: u64) {
        self.refused_at(c, id, Instant::now());
    }

    /// Send `id` of `c` has its answer (stored, or refused for good): the
    /// next in line, if any, goes next.
    pub(crate) fn answered(&mut self, c: Conversation, id: u64) {
        if !self.lines.is_empty() {
            self.answered_at(c, id, Instant::now());
        }
    }

    fn admit_at(&mut self, c: Conversation, id: u64, now: Instant, alone: bool) -> bool {
        let Some(line) = self.lines.get_mut(&c) else {
            return true;
        };
        if line.going.is_empty() && now.duration_since(line.since) > GIVE_UP {
            // Its first send was given up.
            self.lines.remove(&c);
            return true;
        }
        let first = line.refused.first_key_value().map(|(&p, &r)| (p, r));
        let wait = alone && !line.going.is_empty();
        match first {
            // Nothing waits (only sends let through in this batch, which
            // it follows).
            None if !wait => {
                if alone {
                    let place = line.fresh();
                    line.going.push((place, id));
                }
                true
            }
            Some((place, first)) if first == id && !wait => {
                line.refused.remove(&place);
                line.going.push((place, id));
                line.since = now;
                true
            }
            Some((_, first)) if c.ordered() && id < first => true,
            _ => {
                if line.place_of(id).is_none() && !line.going.iter().any(|g| g.1 == id) {
                    let place = if c.ordered() { id } else { line.fresh() };
                    line.refused.insert(place, id);
                }
                false
            }
        }
    }

    fn refused_at(&mut self, c: Conversation, id: u64, now: Instant) {
        let line = self.lines.entry(c).or_insert_with(|| Line::new(now));
        let place = match line.going.iter().position(|g| g.1 == id) {
            Some(i) => Some(line.going.swap_remove(i).0),
            None => line.place_of(id),
        };
        let place = place.unwrap_or_else(|| if c.ordered() { id } else { line.fresh() });
        line.refused.insert(place, id);
        if line.refused.first_key_value().map(|(_, &r)| r) == Some(id) {
            line.since = now;
        }
    }

    fn answered_at(&mut self, c: Conversation, id: u64, now: Instant) {
        let Some(line) = self.lines.get_mut(&c) else {
            return;
        };
        // The line moved on if `id` was the one let through, or first.
        let going = line.going.len();
        line.going.retain(|g| g.1 != id);
        let mut moved = line.going.len() < going;
        if let Some(place) = line.place_of(id) {
            moved |= line.refused.first_key_value().map(|(&p, _)| p) == Some(place);
            line.refused.remove(&place);
        }
        if moved {
            line.since = now;
        }
        if line.refused.is_empty() && line.going.is_empty() {
            self.lines.remove(&c);
        }
    }

    /// Drops the lines whose first send was not retried for [`GIVE_UP`].
    pub(crate) fn expire(&mut self, now: Instant) {
        if !self.lines.is_empty() {
            // A send let through is answered after its batch; one that
            // never was (a bug) holds its line three times as long at most.
            self.lines.retain(|_, line| {
                let age = now.duration_since(line.since);
                age <= GIVE_UP || (!line.going.is_empty() && age <= GIVE_UP * 3)
            });
        }
    }

    /// Conversations held in line now.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.lines.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const C: Conversation = Conversation::Send {
        sender: 1,
        device: 1,
        inbox: 2,
    };
    /// Group 9's entries to member 2.
    const M: Conversation = Conversation::Entries {
        group: 9,
        member: 2,
    };

    #[test]
    fn nothing_is_held_until_a_send_is_refused() {
        let now = Instant::now();
        let mut l = Lines::default();
        assert!(l.admit_at(C, 1, now, false));
        l.answered_at(C, 1, now);
        assert!(l.admit_at(C, 2, now, false));
        assert_eq!(l.len(), 0);
    }

    #[test]
    fn after_a_refusal_later_sends_wait_for_its_retry_in_the_order_seen() {
        let now = Instant::now();
        let mut l = Lines::default();
        l.refused_at(C, 1, now);
        assert!(!l.admit_at(C, 2, now, false), "2 waits for 1's retry");
        assert!(!l.admit_at(C, 3, now, false));
        assert!(!l.admit_at(C, 3, now, false), "3 keeps its place");
        assert!(!l.admit_at(C, 2, now, false), "2 is behind 1");
        assert!(l.admit_at(C, 1, now, false), "1's retry");
        l.refused_at(C, 1, now);
        assert!(
            !l.admit_at(C, 2, now, false),
            "1 was refused again: still first"
        );
        assert!(l.admit_at(C, 1, now, false));
        l.answered_at(C, 1, now);
        assert!(!l.admit_at(C, 3, now, false), "2 is before 3");
        assert!(l.admit_at(C, 2, now, false));
        l.answered_at(C, 2, now);
        assert!(l.admit_at(C, 3, now, false));
        l.answered_at(C, 3, now);
        assert_eq!(l.len(), 0);
        let other = Conversation::Entries {
            group: 9,
            member: 2,
        };
        l.refused_at(C, 4, now);
        assert!(
            l.admit_at(other, 5, now, false),
            "other conversations are not held"
        );
    }

    #[test]
    fn retries_in_line_go_together_in_one_batch_and_keep_their_places_if_refused_again() {
        let now = Instant::now();
        let mut l = Lines::default();
        for id in [4, 5, 6] {
            l.refused_at(C, id, now);
        }
        // The client sends 4, 5 and 6 again in one batch, then a new 7:
        // all in line order (the inbox hides nothing).
        for id in [4, 5, 6, 7] {
            assert!(l.admit_at(C, id, now, false), "{id}");
        }
        // Refused again (still not served): back in their places.
        for id in [5, 4, 7, 6] {
            l.refused_at(C, id, now);
        }
        assert!(!l.admit_at(C, 5, now, false), "4 is first");
        assert!(l.admit_at(C, 4, now, false));
        l.answered_at(C, 4, now);
        for id in [5, 6, 7] {
            assert!(l.admit_at(C, id, now, false), "{id}");
        }
        for id in [5, 6, 7] {
            l.answered_at(C, id, now);
        }
        assert_eq!(l.len(), 0);
    }

    /// The seeded container suite found this: a retry let through with
    /// the next send in one batch was refused again after the write (its
    /// original a write not yet on every copy), while the next send was
    /// stored. While the target hides a write, one send at a time.
    #[test]
    fn while_the_inbox_hides_a_write_a_retry_goes_alone_and_the_rest_wait_for_its_answer() {
        let now = Instant::now();
        let mut l = Lines::default();
        for id in [4, 5] {
            l.refused_at(C, id, now);
        }
        assert!(l.admit(C, 4, true));
        for id in [5, 6] {
            assert!(!l.admit(C, id, true), "{id} waits for 4's answer");
        }
        // 4 refused again after its write: still first, nothing overtook it.
        l.refused(C, 4);
        assert!(!l.admit(C, 5, true), "4 is first");
        assert!(l.admit(C, 4, true));
        l.answered(C, 4);
        for id in [5, 6] {
            assert!(l.admit(C, id, true), "{id}");
            assert!(!l.admit(C, 7, true), "7 waits for {id}");
            l.answered(C, id);
        }
        assert!(l.admit(C, 7, true));
        l.answered(C, 7);
        assert_eq!(l.len(), 0);
        // A conversation nothing was refused in (this shard just became
        // its primary): its retry and the next send do not go together.
        assert!(l.admit(C, 8, true));
        assert!(!l.admit(C, 9, true), "9 waits for 8's answer");
        l.refused(C, 8);
        assert!(!l.admit(C, 9, true), "8 is first");
        assert!(l.admit(C, 8, true));
        l.answered(C, 8);
        assert!(l.admit(C, 9, false), "the write shows: no line to wait in");
        l.answered(C, 9);
        assert_eq!(l.len(), 0);
    }

    #[test]
    fn a_groups_entries_retried_go_together_and_keep_their_places_if_refused_again() {
        let now = Instant::now();
        let mut l = Lines::default();
        for id in [4, 5, 6] {
            l.refused_at(M, id, now);
        }
        // The group's tick sends 4, 5 and 6 again in one batch, then 7.
        for id in [4, 5, 6, 7] {
            assert!(l.admit_at(M, id, now, false), "{id}");
        }
        // Refused again (still not served): back in their places.
        for id in [5, 4, 7, 6] {
            l.refused_at(M, id, now);
        }
        assert!(!l.admit_at(M, 5, now, false), "4 is first");
        assert!(l.admit_at(M, 4, now, false));
        l.answered_at(M, 4, now);
        for id in [5, 6, 7] {
            assert!(l.admit_at(M, id, now, false), "{id}");
        }
        for id in [5, 6, 7] {
            l.answered_at(M, id, now);
        }
        assert_eq!(l.len(), 0);
    }

    #[test]
    fn a_groups_older_entries_pass_a_members_line_and_refused_ones_keep_the_groups_order() {
        let now = Instant::now();
        let mut l = Lines::default();
        l.refused_at(M, 46, now);
        // The group sends 35 again (stored here already, or not yet): it
        // was sent before 46, so it passes; 50 waits.
        assert!(l.admit_at(M, 35, now, false));
        l.answered_at(M, 35, now);
        assert!(!l.admit_at(M, 50, now, false));
        // 40 refused too: it goes before 46.
        l.refused_at(M, 40, now);
        assert!(!l.admit_at(M, 46, now, false), "40 is first now");
        for id in [40, 46, 50] {
            assert!(l.admit_at(M, id, now, false), "{id}");
        }
        for id in [40, 46, 50] {
            l.answered_at(M, id, now);
        }
        assert_eq!(l.len(), 0);
    }

    #[test]
    fn answers_of_sends_not_in_line_do_not_keep_a_line_alive() {
        let now = Instant::now();
        let mut l = Lines::default();
        l.refused_at(M, 46, now);
        // Older entries keep passing and being answered; 46 never comes.
        for (i, id) in (1..30).enumerate() {
            let at = now + Duration::from_secs(i as u64);
            assert!(l.admit_at(M, id, at, false));
            l.answered_at(M, id, at);
        }
        l.expire(now + GIVE_UP + Duration::from_secs(1));
        assert_eq!(l.len(), 0, "46 was given up");
    }

    #[test]
    fn a_line_whose_first_send_is_not_retried_is_dropped() {
        let now = Instant::now();
        let mut l = Lines::default();
        l.refused_at(C, 1, now);
        let later = now + GIVE_UP - Duration::from_millis(1);
        assert!(!l.admit_at(C, 2, later, false));
        assert!(l.admit_at(C, 2, now + GIVE_UP + Duration::from_secs(1), false));
        l.refused_at(C, 7, now);
        l.expire(now + GIVE_UP + Duration::from_secs(1));
        assert_eq!(l.len(), 0);
    }
}

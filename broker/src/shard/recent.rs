//! What a shard remembers of its online users' latest inbox entries: for
//! each, what a mark of it owes (a receipt to its sender, a group cursor to
//! move, nothing), so that marks of what was just pushed need not read it
//! back from the store.

use std::collections::{HashMap, VecDeque};

use courier_protocol::{Destination, MessageKind};
use courier_storage::StoredMessage;

/// What a shard remembers of an online user's latest inbox entries for
/// their receipts (see [`Recent`]): at most this many per user (a phone
/// opens a chat a moment after it acknowledged it: at 1,500 messages a
/// second, 200 ms are 300 entries)...
const RECENT_PER_USER: usize = 1024;
/// ...and this many in all, about 10 MB per shard (beyond, users with no
/// entries get none and the others keep as many as they have; marks of
/// what is not remembered read the store, as before).
const RECENT_MAX: usize = 1 << 18;

/// What a mark of one inbox entry owes, as remembered when it was stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Fact {
    /// A one-to-one or broadcast message from another user: a receipt to
    /// `sender` naming (client id, server id). `direct`: a one-to-one
    /// message (its sender knows its inbox sequence from its `SendAck`;
    /// a broadcast's sender does not).
    Receipt {
        sender: u64,
        client_msg_id: u64,
        server_msg_id: u64,
        direct: bool,
    },
    /// A group reference: the member's cursor on that group log moves.
    GroupRef { log: u64, seq: u64 },
    /// Nothing (the user's own message, a receipt, a system event).
    Nothing,
}

impl Fact {
    pub(crate) fn of(user: u64, m: &StoredMessage) -> Fact {
        if let Some(via) = m.via {
            return Fact::GroupRef {
                log: via.log,
                seq: via.seq,
            };
        }
        let rec = &m.record;
        let kind = MessageKind::from_u8(rec.kind);
        if rec.sender == user
            || rec.dest_tag == Destination::Group(0).tag()
            || !matches!(kind, Some(MessageKind::Chat | MessageKind::Template))
        {
            return Fact::Nothing;
        }
        Fact::Receipt {
            sender: rec.sender,
            client_msg_id: rec.client_msg_id,
            server_msg_id: rec.server_msg_id,
            direct: rec.dest_tag == Destination::User(0).tag(),
        }
    }
}

/// The latest inbox entries of the shard's online users, with what a mark
/// of each owes: a phone acknowledges what it was just pushed, so marks
/// find their range here instead of reading it back from the store. Each
/// user's entries are contiguous by sequence (every append to an inbox is
/// its shard's); entries go once a read mark covers them, or from the
/// front past `RECENT_PER_USER`. A range not wholly here is read from the
/// store.
#[derive(Default)]
pub(crate) struct Recent {
    users: HashMap<u64, VecDeque<(u64, Fact)>>,
    len: usize,
}

impl Recent {
    /// Inbox entry `seq` of `user` was stored, owing `fact`.
    pub(crate) fn stored(&mut self, user: u64, seq: u64, fact: Fact) {
        let q = self.users.entry(user).or_default();
        if q.back().is_some_and(|(last, _)| *last + 1 != seq) {
            // Not contiguous (entries not remembered in between): start over.
            self.len -= q.len();
            q.clear();
        }
        if self.len >= RECENT_MAX && q.is_empty() {
            self.users.remove(&user);
            return;
        }
        // At either bound the user's oldest entry makes room.
        if q.len() == RECENT_PER_USER || self.len >= RECENT_MAX {
            q.pop_front();
            self.len -= 1;
        }
        q.push_back((seq, fact));
        self.len += 1;
    }

    /// The facts of `after + 1 ..= up_to`, if every one is here.
    pub(crate) fn range(&self, user: u64, after: u64, up_to: u64) -> Option<Vec<(u64, Fact)>> {
        let q = self.users.get(&user)?;
        let first = q.front()?.0;
        if first > after + 1 || q.back()?.0 < up_to {
            return None;
        }
        let from = (after + 1 - first) as usize;
        let to = (up_to + 1 - first) as usize;
        Some(q.range(from..to).copied().collect())
    }

    /// Forgets `user`'s entries up to `seq` (read: they owe nothing more).
    pub(crate) fn done_up_to(&mut self, user: u64, seq: u64) {
        let Some(q) = self.users.get_mut(&user) else {
            return;
        };
        while q.front().is_some_and(|(s, _)| *s <= seq) {
            q.pop_front();
            self.len -= 1;
        }
        if q.is_empty() {
            self.users.remove(&user);
        }
    }

    /// The user went offline: its entries go.
    pub(crate) fn forget(&mut self, user: u64) {
        if let Some(q) = self.users.remove(&user) {
            self.len -= q.len();
        }
    }
}

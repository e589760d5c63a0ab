//! What a shard keeps of its users' receipt facts (see `facts`): kept
//! apart from the code that uses it, so that the shard's state does not
//! import the module that implements it.

use std::collections::HashMap;

use crate::state::rows::FactRow;

/// Versions one write of the `I` row reserves.
pub(super) const VERSIONS_RESERVED: u64 = 1024;
/// Fact rows cached per shard at most; beyond, the cache is let go after a
/// write (every row is read back from the store on its next use).
const ROWS_CACHED_MAX: usize = 1 << 18;

/// What a shard keeps of its users' facts.
#[derive(Default)]
pub(crate) struct Facts {
    /// Per user: `None`, receipts as messages; `Some`, as facts. Kept for
    /// switched users while the shard serves them (their versions run on
    /// without a jump); others are dropped with the rows.
    pub(super) users: HashMap<u64, Option<Versions>>,
    /// `D` rows by (sender, reader), as planned.
    pub(super) rows: HashMap<(u64, u64), FactRow>,
}

/// A switched user's versions: the last given out, and the ceiling its
/// `I` row allows.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Versions {
    pub last: u64,
    pub ceiling: u64,
}

impl Facts {
    /// Forgets every user and row for which `inside` holds (a shard that
    /// moved away).
    pub(crate) fn forget(&mut self, inside: impl Fn(u64) -> bool) {
        self.users.retain(|u, _| !inside(*u));
        self.rows.retain(|(u, _), _| !inside(*u));
    }

    /// A write failed: what was planned may not be on disk; everything is
    /// read back from the store (versions jump past the lost ones).
    pub(crate) fn clear(&mut self) {
        self.users.clear();
        self.rows.clear();
    }

    /// After a successful write (nothing planned is pending): lets the
    /// rows go if there are too many, and the users that take messages.
    pub(crate) fn trim(&mut self) {
        if self.rows.len() > ROWS_CACHED_MAX {
            self.rows.clear();
            self.users.retain(|_, v| v.is_some());
        }
    }
}

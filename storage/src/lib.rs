//! Courier's inbox store: every user's append-only, durable log of messages.
//!
//! The broker talks to the [`InboxStore`] trait; [`RocksStore`] is the
//! production implementation and [`MemoryStore`] a plain in-memory one for
//! tests of broker logic. One test suite (`src/suite.rs`) runs against both so
//! they cannot drift.
//!
//! Map:
//! - [`model`]: records, outcomes, inbox state and the store configuration;
//! - [`rocks`]: the RocksDB implementation (column families, key layout, options);
//! - [`memory`]: the in-memory implementation.
//!
//! Concurrency contract: the store is `Send + Sync`, reads may come from any
//! thread, but each inbox must have one writer at a time (the broker's shard
//! that owns the user). Sequence numbers are assigned here, from a cached head
//! that only that writer advances.

pub mod memory;
pub mod model;
pub mod rocks;

#[cfg(test)]
mod suite;

pub use memory::MemoryStore;
pub use model::*;
pub use rocks::RocksStore;

/// The inbox store the broker writes to and reads from.
pub trait InboxStore: Send + Sync + 'static {
    /// Appends every message of `batch` in one atomic write, assigning each a
    /// gap-free sequence in its inbox. A message whose idempotency key was
    /// stored within the idempotency window is not stored again: its outcome
    /// is `Duplicate` with the original's fields (or `Conflict` when the key
    /// was used for another destination). When this returns `Ok`, the batch
    /// is as durable as the configured [`Durability`] promises.
    fn append(&self, batch: &[NewMessage], now_ms: u64) -> Result<Vec<AppendOutcome>, StoreError>;

    /// Up to `limit` messages of `inbox` with sequence greater than `after_seq`,
    /// in sequence order (trimmed messages are gone; see [`InboxState::oldest_seq`]).
    fn read_after(
        &self,
        inbox: u64,
        after_seq: u64,
        limit: usize,
    ) -> Result<Vec<StoredMessage>, StoreError>;

    /// Head, acknowledged and oldest retained sequence of `inbox`.
    fn state(&self, inbox: u64) -> Result<InboxState, StoreError>;

    /// Records that the user has everything up to `up_to_seq` (clamped to the
    /// head; never moves backwards).
    fn ack(&self, inbox: u64, up_to_seq: u64) -> Result<InboxState, StoreError>;

    /// Deletes acknowledged messages whose timestamp is older than
    /// `older_than_ms`, oldest first, stopping at the first younger one.
    fn trim_acked(&self, inbox: u64, older_than_ms: u64) -> Result<InboxState, StoreError>;

    /// Makes everything written so far durable (WAL sync), e.g. at shutdown.
    fn sync(&self) -> Result<(), StoreError>;
}

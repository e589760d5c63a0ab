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
//! - [`memory`]: the in-memory implementation;
//! - [`fuzzing`]: the fuzz target for every stored value layout.
//!
//! Besides inboxes the store keeps two small key-value spaces for the
//! broker's other state (groups, contacts, lists, receipt cursors): a plain
//! one, and an expiring one whose entries vanish from disk after their
//! expiry (status posts). Their key layouts belong to the broker.
//!
//! Concurrency contract: the store is `Send + Sync`, reads may come from any
//! thread, but each inbox must have one writer at a time (the broker's shard
//! that owns the user). Sequence numbers are assigned here, from a cached head
//! that only that writer advances.

pub mod fuzzing;
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
    fn append(&self, batch: &[NewMessage], now_ms: u64) -> Result<Vec<AppendOutcome>, StoreError> {
        self.append_with(batch, &[], now_ms)
    }

    /// [`InboxStore::append`] plus key-value writes, all in one atomic write
    /// (a group's membership change and the system message announcing it).
    /// An empty `batch` with some `kv` is a plain durable key-value write.
    fn append_with(
        &self,
        batch: &[NewMessage],
        kv: &[KvOp],
        now_ms: u64,
    ) -> Result<Vec<AppendOutcome>, StoreError>;

    /// Key-value writes that need not be synced (cursors: losing the last
    /// moments of them in a power failure only repeats some work). Atomic,
    /// written to the WAL, never waits for a sync.
    fn write_lazy(&self, kv: &[KvOp]) -> Result<(), StoreError>;

    /// One value of the key-value space.
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;

    /// Up to `limit` entries of the key-value space whose key starts with
    /// `prefix`, in key order.
    fn scan(&self, prefix: &[u8], limit: usize) -> Result<KvPairs, StoreError>;

    /// Up to `limit` unexpired entries of the expiring space under `prefix`:
    /// (key, expires_at_ms, value), in key order.
    fn scan_expiring(
        &self,
        prefix: &[u8],
        now_ms: u64,
        limit: usize,
    ) -> Result<ExpiringEntries, StoreError>;

    /// Up to `limit` messages of `inbox` with sequence greater than `after_seq`,
    /// in sequence order (trimmed messages are gone; see [`InboxState::oldest_seq`]).
    /// References are resolved: the message carries the referenced record.
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

    /// The engine's health, for metrics (`None`: nothing to report, as for
    /// the in-memory store).
    fn health(&self) -> Option<StoreHealth> {
        None
    }
}

/// What the storage engine says about itself, read when metrics are scraped.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StoreHealth {
    /// Bytes compaction estimates it still has to rewrite (all column families).
    pub pending_compaction_bytes: u64,
    /// Writes are stopped (a write stall).
    pub write_stopped: bool,
    /// Writes are being slowed down.
    pub write_delayed: bool,
    pub memtable_bytes: u64,
    pub block_cache_bytes: u64,
    pub live_data_bytes: u64,
    pub sst_bytes: u64,
    pub running_compactions: u64,
    /// Writes that synced the write-ahead log (since the store opened).
    pub wal_syncs: u64,
}

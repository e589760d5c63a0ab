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

    /// [`InboxStore::scan`] for a shard that moved: a store whose layout
    /// keeps slots apart reads only the keys whose owner's slot is in
    /// `slots` (a run of one cluster shard); a flat store has no slots and
    /// reads them all, so the caller still picks its owners.
    fn scan_slots(
        &self,
        prefix: &[u8],
        slots: std::ops::Range<u16>,
        limit: usize,
    ) -> Result<KvPairs, StoreError> {
        let _ = slots;
        self.scan(prefix, limit)
    }

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

    /// Erases the messages of `inbox` at `seqs` in place (a person's data
    /// erased on request): each keeps its sequence, ids, sender, time and
    /// destination, takes `kind` (the protocol's "erased") and loses its
    /// payload. Sequences not stored (trimmed, never written) are skipped,
    /// and so are references, whose body is a log's and not the inbox's.
    /// One atomic write, as durable as an append. Returns how many entries
    /// changed (an entry already erased does not count). Refused, with
    /// nothing written, when the inbox's slot is not served here.
    fn erase(&self, inbox: u64, seqs: &[u64], kind: u8) -> Result<usize, StoreError>;

    /// Head, acknowledged and oldest retained sequence of `inbox`.
    fn state(&self, inbox: u64) -> Result<InboxState, StoreError>;

    /// Records that the user has everything up to `up_to_seq` (clamped to the
    /// head; never moves backwards).
    fn ack(&self, inbox: u64, up_to_seq: u64) -> Result<InboxState, StoreError>;

    /// The state [`InboxStore::ack`] would leave, without writing it: for a
    /// caller that writes a [`KvOp::Ack`] with its next write.
    /// `InboxState::default()` where the inbox's slot is not served here,
    /// as `ack` answers there.
    fn acked_state(&self, inbox: u64, up_to_seq: u64) -> Result<InboxState, StoreError> {
        let mut s = self.state(inbox)?;
        s.ack(up_to_seq);
        Ok(s)
    }

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

    /// Moving runs of slots to and from other stores: `None` unless the
    /// store is [`Layout::Slotted`].
    fn transfer(&self) -> Option<&dyn SlotTransfer> {
        None
    }

    /// Whether some write to `inbox` is not visible to readers yet (a
    /// replicated shard hides a write until every in-sync copy has it); a
    /// retry of such a write is refused until it shows.
    fn hides(&self, _inbox: u64) -> bool {
        false
    }
}

/// Moving a run of slots (a shard) between two slotted stores while the
/// source keeps serving them:
///
/// ```text
///  source: watch(slots) ─► export chunks ─► changes() ─► … ─► (writes paused) changes() ─► delete_slots
///  target:                  import(chunk)    import(read(changes)) …                    import(read(changes))
/// ```
///
/// The watch starts before the first chunk is read, so every write the
/// export may have missed is in the changes; each round sends the keys'
/// current values, so the last writer wins. Once writes to the slots have
/// stopped, a last round leaves the target equal to the source.
///
/// A slotted store also serves only the slots it is told to
/// ([`SlotTransfer::serve_only`]): a message for an inbox of another slot
/// is not stored ([`AppendOutcome::NotServed`]), and other writes to such
/// slots (cursors, rows: work the slots' owner redoes) are dropped and
/// counted. That is how a shard's writes pause for the last round of a
/// move, whatever path they come by, without failing anything else.
pub trait SlotTransfer: Send + Sync {
    /// Serves exactly the slots of `runs` from now on; returns once every
    /// write that began before the change has finished, so what the watch
    /// reports next is everything written to the slots it stopped serving.
    fn serve_only(&self, runs: &[std::ops::Range<u16>]);

    /// Whether `slot` is served now.
    fn serves(&self, slot: u8) -> bool;

    /// Writes dropped because their slot was not served (since open).
    fn not_served(&self) -> u64;

    /// Starts recording which keys of `slots` are written (replacing any
    /// earlier watch). One watch at a time.
    fn watch(&self, slots: std::ops::Range<u16>);

    /// What the watch recorded since it started or was last drained;
    /// drains it. Empty without a watch.
    fn changes(&self) -> SlotChanges;

    /// Stops the watch.
    fn unwatch(&self);

    /// Entries of `slots` from `from` (a previous chunk's `next`; `None`:
    /// the start) in (space, key) order, up to about `max_bytes` of keys
    /// and values.
    fn export(
        &self,
        slots: std::ops::Range<u16>,
        from: Option<(Space, Vec<u8>)>,
        max_bytes: usize,
    ) -> Result<ExportChunk, StoreError>;

    /// The writes that bring a copy up to date with `changes`: its range
    /// deletions first, then each key's current value (a put, or a delete
    /// if it is gone).
    fn read(&self, changes: &SlotChanges) -> Result<Vec<RawEntry>, StoreError>;

    /// Applies writes from another store, in order, in one durable write.
    /// Refused (nothing written) if any of them is for a slot served here.
    fn import(&self, entries: &[RawEntry]) -> Result<(), StoreError>;

    /// Deletes everything of `slots`, durably (after the slots have a new
    /// owner). Refused if any of them is served here.
    fn delete_slots(&self, slots: std::ops::Range<u16>) -> Result<(), StoreError>;

    /// How many entries `slots` hold in each space (for checks and
    /// operators; reads every key of the range).
    fn count(&self, slots: std::ops::Range<u16>) -> Result<[u64; 5], StoreError>;

    /// Tells `tap` of every write to served slots from now on (`None`:
    /// nobody). Returns once the writes under way have finished, so every
    /// write after it is told and every write before it is committed.
    fn set_tap(&self, tap: Option<std::sync::Arc<dyn WriteTap>>);

    /// A digest of what `slots` hold that readers can see at `now_ms`:
    /// every entry in (space, key) order, less idempotency keys past their
    /// window and expiring entries past their expiry (compaction drops
    /// those at its own pace on each copy). Two copies of a shard that
    /// agree have the same digest. Reads every key of the range.
    fn digest(&self, slots: std::ops::Range<u16>, now_ms: u64) -> Result<Digest, StoreError>;
}

/// Told of every committed write to a slotted store's served slots, in
/// one call per write: how a shard's primary streams its writes to its
/// backups.
pub trait WriteTap: Send + Sync {
    /// `entries` were committed in one atomic write, in this order. Called
    /// on the writing thread, while the write still holds the served set
    /// (so a change of the served set or of the tap waits for it). Writes
    /// of different threads are told in an order that may differ from
    /// their commit order; they write different keys (each owner has one
    /// writer).
    fn committed(&self, entries: Vec<RawEntry>);
}

/// What [`SlotTransfer::digest`] says of a run of slots.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Digest {
    /// Entries read.
    pub entries: u64,
    /// FNV-1a (64 bits) over each entry's space, key and value, lengths
    /// included.
    pub hash: u64,
}

impl Digest {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;

    pub fn new() -> Digest {
        Digest {
            entries: 0,
            hash: Digest::OFFSET,
        }
    }

    fn bytes(&mut self, b: &[u8]) {
        for &x in b {
            self.hash ^= u64::from(x);
            self.hash = self.hash.wrapping_mul(Digest::PRIME);
        }
    }

    /// Adds one entry.
    pub fn add(&mut self, space: Space, key: &[u8], value: &[u8]) {
        self.entries += 1;
        self.bytes(&[space as u8]);
        self.bytes(&(key.len() as u32).to_be_bytes());
        self.bytes(key);
        self.bytes(&(value.len() as u32).to_be_bytes());
        self.bytes(value);
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

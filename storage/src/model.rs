//! Records, outcomes and configuration shared by every store implementation.

use bytes::{BufMut, Bytes, BytesMut};
use thiserror::Error;

/// How durable an append is when [`crate::InboxStore::append`] returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Durability {
    /// Written to the RocksDB write-ahead log, not synced. Survives a crash of
    /// the process (the OS holds the page cache); a power loss or kernel
    /// crash can lose the last moments of acknowledged writes.
    Wal,
    /// The WAL is synced (fdatasync) before the append returns. Survives power
    /// loss. Concurrent appends share one sync (group commit): the broker
    /// batches per shard, and RocksDB groups writers from several shards.
    #[default]
    Fsync,
}

impl std::str::FromStr for Durability {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "wal" => Ok(Durability::Wal),
            "fsync" => Ok(Durability::Fsync),
            other => Err(format!(
                "unknown durability {other:?}: expected wal or fsync"
            )),
        }
    }
}

impl std::fmt::Display for Durability {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Durability::Wal => "wal",
            Durability::Fsync => "fsync",
        })
    }
}

/// Store settings.
#[derive(Clone, Debug)]
pub struct StoreConfig {
    pub durability: Durability,
    /// How long a (sender, client message id) pair is remembered for
    /// de-duplicating retries.
    pub idempotency_window_ms: u64,
    /// RocksDB block cache size.
    pub block_cache_bytes: usize,
    /// Time for expiry decisions made inside the store (compaction filters).
    pub clock: Clock,
    /// How keys are laid out; fixed when the store is created.
    pub layout: Layout,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            durability: Durability::Fsync,
            idempotency_window_ms: 24 * 3600 * 1000,
            block_cache_bytes: 128 << 20,
            clock: Clock::system(),
            layout: Layout::Flat,
        }
    }
}

/// How a store lays out its keys. Chosen when the store is created and
/// recorded in it: opening it with the other layout is refused.
#[derive(Clone, Copy, Debug, Default)]
pub enum Layout {
    /// Keys as they are: a single node's store, which never gives data away.
    #[default]
    Flat,
    /// Every key starts with its owner's [slot](slot_of): a cluster node's
    /// store, in which a shard (a run of slots) is one contiguous key range
    /// in every space, so a move copies ranges and deletes them, never
    /// scanning other shards' data. `owner` names the id that owns a
    /// key-value key (its shard writes it), or `None` when the bytes do not
    /// reach it (a prefix): scans by such a prefix visit every slot.
    Slotted { owner: KeyOwner },
}

/// Which id owns a key-value key (see [`Layout::Slotted`]).
pub type KeyOwner = fn(&[u8]) -> Option<u64>;

/// How many slots ids hash to. A cluster's shard is a contiguous run of
/// them, so a cluster has at most this many shards.
pub const SLOTS: usize = 256;

/// The slot of a user or group id: the top byte of its Fibonacci hash
/// (spreads sequential ids evenly).
pub fn slot_of(id: u64) -> u8 {
    (id.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8
}

/// The slots of shard `shard` out of `shards` (at most [`SLOTS`]): shard
/// `s` holds the slots `t` with `t * shards / SLOTS == s`, a contiguous run
/// of `SLOTS / shards` slots (give or take one).
pub fn slots_of_shard(shard: u32, shards: u32) -> std::ops::Range<u16> {
    let first = |s: u32| (s as usize * SLOTS).div_ceil(shards as usize) as u16;
    first(shard)..first(shard + 1)
}

/// The shard of slot `slot` out of `shards` (inverse of [`slots_of_shard`]).
pub fn shard_of_slot(slot: u8, shards: u32) -> u32 {
    (slot as usize * shards as usize / SLOTS) as u32
}

/// A space of the store, as a slot transfer names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Space {
    Inbox = 0,
    Meta = 1,
    Idem = 2,
    Kv = 3,
    Expiring = 4,
}

impl Space {
    pub const ALL: [Space; 5] = [
        Space::Inbox,
        Space::Meta,
        Space::Idem,
        Space::Kv,
        Space::Expiring,
    ];

    pub fn from_u8(v: u8) -> Option<Space> {
        Space::ALL.get(v as usize).copied()
    }
}

/// One raw write of a slotted store as a transfer carries it; keys and
/// values as stored (keys with their slot).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RawEntry {
    Put {
        space: Space,
        key: Vec<u8>,
        value: Vec<u8>,
    },
    Delete {
        space: Space,
        key: Vec<u8>,
    },
    /// Every key from `from` (included) to `to` (excluded).
    DeleteRange {
        space: Space,
        from: Vec<u8>,
        to: Vec<u8>,
    },
}

/// A chunk of an export: entries in (space, key) order, and where the next
/// chunk starts (`None`: the range is done).
#[derive(Debug, Default)]
pub struct ExportChunk {
    pub entries: Vec<RawEntry>,
    pub next: Option<(Space, Vec<u8>)>,
}

/// What changed in watched slots since the watch started or was last
/// drained: keys written or deleted (their values are read when sent, so
/// the latest value wins) and key ranges deleted.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SlotChanges {
    pub keys: std::collections::BTreeSet<(Space, Vec<u8>)>,
    pub ranges: Vec<(Space, Vec<u8>, Vec<u8>)>,
}

impl SlotChanges {
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty() && self.ranges.is_empty()
    }
}

/// The key retries are de-duplicated by.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct IdempotencyKey {
    pub sender: u64,
    pub client_msg_id: u64,
    /// 0 for a message with one destination. A send that becomes several
    /// inbox entries (a broadcast list, group references) scopes each entry
    /// by its inbox, so each is de-duplicated on its own.
    pub scope: u64,
}

impl IdempotencyKey {
    pub fn new(sender: u64, client_msg_id: u64) -> IdempotencyKey {
        IdempotencyKey {
            sender,
            client_msg_id,
            scope: 0,
        }
    }
}

/// A message stored once in a log (a group log is an inbox whose id is the
/// group id) and referenced from other inboxes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LogRef {
    pub log: u64,
    pub seq: u64,
}

/// A message to append to one inbox.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewMessage {
    pub inbox: u64,
    pub idempotency: Option<IdempotencyKey>,
    pub record: Record,
    /// How the entry holds `record`.
    pub form: Form,
}

/// How an inbox entry holds its record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Form {
    /// The record itself: a message for this inbox.
    Record,
    /// Only a reference to this log entry (which holds the record, in this
    /// store); reads resolve it. The body is stored once however many
    /// inboxes reference it.
    Reference(LogRef),
    /// A copy of this log entry, whose log is in another store (a group
    /// log on another cluster node): the record in full, with the position
    /// it copies. Reads return both, as for a reference.
    Copy(LogRef),
}

impl Form {
    /// The log entry the inbox entry stands for, if any.
    pub fn via(self) -> Option<LogRef> {
        match self {
            Form::Record => None,
            Form::Reference(at) | Form::Copy(at) => Some(at),
        }
    }
}

/// The stored fields of a message (everything but its sequence).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub server_msg_id: u64,
    pub sender: u64,
    pub sender_device: u32,
    pub client_msg_id: u64,
    pub timestamp_ms: u64,
    /// Destination tag and id as on the wire (user 1, group 2, list 3).
    pub dest_tag: u8,
    pub dest_id: u64,
    pub kind: u8,
    pub payload: Bytes,
}

/// A message read back from an inbox.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredMessage {
    pub seq: u64,
    pub record: Record,
    /// The log entry this inbox entry refers to, if it is a reference.
    pub via: Option<LogRef>,
}

/// Key-value pairs as scanned.
pub type KvPairs = Vec<(Vec<u8>, Vec<u8>)>;
/// Expiring entries as scanned: (key, expires_at_ms, value).
pub type ExpiringEntries = Vec<(Vec<u8>, u64, Vec<u8>)>;

/// A write to the key-value spaces, applied atomically with an append
/// (see [`crate::InboxStore::append_with`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KvOp {
    Put {
        key: Vec<u8>,
        value: Vec<u8>,
    },
    Delete {
        key: Vec<u8>,
    },
    /// A value in the expiring space: unreadable from `expires_at_ms`, and
    /// physically removed by compaction or by [`KvOp::DeleteExpiringRange`].
    PutExpiring {
        key: Vec<u8>,
        expires_at_ms: u64,
        value: Vec<u8>,
    },
    /// Removes the expiring keys in `from..to` with one range tombstone.
    DeleteExpiringRange {
        from: Vec<u8>,
        to: Vec<u8>,
    },
    /// Moves `inbox`'s acknowledged cursor as [`crate::InboxStore::ack`]
    /// does (clamped to the head, never backwards), in the same write as
    /// the rest: a shard's marks ride its next write instead of each
    /// making one. Left out where the inbox's slot is not served.
    Ack {
        inbox: u64,
        up_to_seq: u64,
    },
}

/// The store's clock (milliseconds since the epoch), injectable for tests of
/// expiry.
#[derive(Clone)]
pub struct Clock(pub std::sync::Arc<dyn Fn() -> u64 + Send + Sync>);

impl Clock {
    pub fn system() -> Clock {
        Clock(std::sync::Arc::new(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0)
        }))
    }
    /// The system clock plus `shift` milliseconds, which a test moves
    /// forward to reach a time rule's boundary without waiting.
    pub fn shifted(shift: std::sync::Arc<std::sync::atomic::AtomicU64>) -> Clock {
        let system = Clock::system();
        Clock(std::sync::Arc::new(move || {
            system.now_ms() + shift.load(std::sync::atomic::Ordering::SeqCst)
        }))
    }
    pub fn now_ms(&self) -> u64 {
        (self.0)()
    }
}

impl std::fmt::Debug for Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Clock({} ms)", self.now_ms())
    }
}

/// What happened to one message of an append batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AppendOutcome {
    Stored(Placement),
    /// Already stored by an earlier append with the same idempotency key.
    Duplicate(Placement),
    /// The idempotency key was used for a message to another destination.
    Conflict,
    /// Not stored: the inbox's slot is not served by this store now (its
    /// shard is moving away or belongs to another node). Retryable.
    NotServed,
}

/// Where a message landed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Placement {
    pub inbox: u64,
    pub seq: u64,
    pub server_msg_id: u64,
    pub timestamp_ms: u64,
}

/// An inbox's cursors. `oldest_seq > head_seq` means nothing is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InboxState {
    /// Highest sequence ever assigned (0: never written).
    pub head_seq: u64,
    /// Highest sequence the user acknowledged.
    pub acked_seq: u64,
    /// Lowest sequence still stored (everything below was trimmed).
    pub oldest_seq: u64,
}

impl InboxState {
    /// Moves the acknowledged cursor to `up_to_seq`, clamped to the head and
    /// never backwards; whether it moved.
    pub fn ack(&mut self, up_to_seq: u64) -> bool {
        let acked = up_to_seq.min(self.head_seq);
        if acked <= self.acked_seq {
            return false;
        }
        self.acked_seq = acked;
        true
    }
}

impl Default for InboxState {
    fn default() -> Self {
        InboxState {
            head_seq: 0,
            acked_seq: 0,
            oldest_seq: 1,
        }
    }
}

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("storage I/O error: {0}")]
    Io(String),
    /// Bytes on disk that fail a checksum or do not decode. Never served.
    #[error("corrupt data in {what}: {detail}")]
    Corrupt { what: &'static str, detail: String },
    /// The file system is full: nothing of the write was stored.
    #[error("storage full: {0}")]
    NoSpace(String),
    /// The store was created with another key layout, or an operation
    /// needs a layout it does not have.
    #[error("store layout: {0}")]
    Layout(String),
    /// The write was made here but its shard's copies elsewhere could not
    /// confirm it (a replicated store whose shard is no longer served
    /// here, or cannot reach its backups). Not acknowledged: the writer's
    /// client retries, at the shard's primary.
    #[error("not replicated: {0}")]
    Unreplicated(String),
}

impl From<rocksdb::Error> for StoreError {
    fn from(e: rocksdb::Error) -> Self {
        let text = e.into_string();
        if text.contains("Corruption") {
            StoreError::Corrupt {
                what: "rocksdb",
                detail: text,
            }
        } else if text.contains("No space left") || text.contains("NoSpace") {
            StoreError::NoSpace(text)
        } else {
            StoreError::Io(text)
        }
    }
}

/// Record value layout, version 1 (all integers big-endian):
///
/// ```text
/// 0  u8  format version (1)
/// 1  u64 server_msg_id   9 u64 sender   17 u32 sender_device
/// 21 u64 client_msg_id  29 u64 timestamp_ms
/// 37 u8  dest_tag       38 u64 dest_id  46 u8 kind
/// 47 ..  payload (the rest of the value)
/// ```
pub(crate) const RECORD_FORMAT_V1: u8 = 1;
pub(crate) const RECORD_FIXED_LEN: usize = 47;

/// Reference value layout (an inbox entry pointing at a log entry):
///
/// ```text
/// 0 u8 format (2)   1 u64 log   9 u64 seq   17 u64 timestamp_ms
/// ```
///
/// The timestamp is copied so trimming can age references without
/// resolving them.
pub(crate) const REF_FORMAT: u8 = 2;
pub(crate) const REF_LEN: usize = 25;

/// Copy value layout (an inbox entry holding a copy of a log entry kept in
/// another store):
///
/// ```text
/// 0 u8 format (3)   1 u64 log   9 u64 seq   17.. the record (format 1, above)
/// ```
pub(crate) const COPY_FORMAT: u8 = 3;
const COPY_HEADER_LEN: usize = 17;

pub(crate) fn encode_copy(at: LogRef, r: &Record, out: &mut BytesMut) {
    out.reserve(COPY_HEADER_LEN + RECORD_FIXED_LEN + r.payload.len());
    out.put_u8(COPY_FORMAT);
    out.put_u64(at.log);
    out.put_u64(at.seq);
    r.encode(out);
}

pub(crate) fn encode_ref(r: LogRef, timestamp_ms: u64) -> [u8; REF_LEN] {
    let mut v = [0u8; REF_LEN];
    v[0] = REF_FORMAT;
    v[1..9].copy_from_slice(&r.log.to_be_bytes());
    v[9..17].copy_from_slice(&r.seq.to_be_bytes());
    v[17..25].copy_from_slice(&timestamp_ms.to_be_bytes());
    v
}

/// A stored inbox value: a record, a reference and its timestamp, or a
/// copy of a log entry.
pub(crate) enum Value {
    Record(Record),
    Ref(LogRef, u64),
    Copy(LogRef, Record),
}

impl Value {
    pub(crate) fn decode(v: &[u8]) -> Result<Value, StoreError> {
        if v.first() == Some(&REF_FORMAT) {
            if v.len() != REF_LEN {
                return Err(StoreError::Corrupt {
                    what: "inbox reference",
                    detail: format!("value of {} bytes, expected {REF_LEN}", v.len()),
                });
            }
            let u64_at = |i: usize| u64::from_be_bytes(v[i..i + 8].try_into().expect("8 bytes"));
            return Ok(Value::Ref(
                LogRef {
                    log: u64_at(1),
                    seq: u64_at(9),
                },
                u64_at(17),
            ));
        }
        if v.first() == Some(&COPY_FORMAT) {
            if v.len() < COPY_HEADER_LEN {
                return Err(StoreError::Corrupt {
                    what: "inbox copy",
                    detail: format!("value of {} bytes, shorter than its header", v.len()),
                });
            }
            let u64_at = |i: usize| u64::from_be_bytes(v[i..i + 8].try_into().expect("8 bytes"));
            let at = LogRef {
                log: u64_at(1),
                seq: u64_at(9),
            };
            return Ok(Value::Copy(at, Record::decode(&v[COPY_HEADER_LEN..])?));
        }
        Record::decode(v).map(Value::Record)
    }

    pub(crate) fn timestamp_ms(&self) -> u64 {
        match self {
            Value::Record(r) | Value::Copy(_, r) => r.timestamp_ms,
            Value::Ref(_, ts) => *ts,
        }
    }
}

impl Record {
    /// The record with its payload erased and its kind `kind`; `None` if it
    /// is that already.
    pub(crate) fn erased(&self, kind: u8) -> Option<Record> {
        (self.kind != kind || !self.payload.is_empty()).then(|| Record {
            kind,
            payload: Bytes::new(),
            ..self.clone()
        })
    }

    pub(crate) fn encode(&self, out: &mut BytesMut) {
        out.reserve(RECORD_FIXED_LEN + self.payload.len());
        out.put_u8(RECORD_FORMAT_V1);
        out.put_u64(self.server_msg_id);
        out.put_u64(self.sender);
        out.put_u32(self.sender_device);
        out.put_u64(self.client_msg_id);
        out.put_u64(self.timestamp_ms);
        out.put_u8(self.dest_tag);
        out.put_u64(self.dest_id);
        out.put_u8(self.kind);
        out.put_slice(&self.payload);
    }

    pub(crate) fn decode(v: &[u8]) -> Result<Record, StoreError> {
        let corrupt = |detail: &str| StoreError::Corrupt {
            what: "inbox record",
            detail: detail.to_owned(),
        };
        if v.len() < RECORD_FIXED_LEN {
            return Err(corrupt("record shorter than its fixed fields"));
        }
        if v[0] != RECORD_FORMAT_V1 {
            return Err(corrupt("unknown record format version"));
        }
        let u64_at = |i: usize| u64::from_be_bytes(v[i..i + 8].try_into().expect("8 bytes"));
        Ok(Record {
            server_msg_id: u64_at(1),
            sender: u64_at(9),
            sender_device: u32::from_be_bytes(v[17..21].try_into().expect("4 bytes")),
            client_msg_id: u64_at(21),
            timestamp_ms: u64_at(29),
            dest_tag: v[37],
            dest_id: u64_at(38),
            kind: v[46],
            payload: Bytes::copy_from_slice(&v[RECORD_FIXED_LEN..]),
        })
    }
}

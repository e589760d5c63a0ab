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
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            durability: Durability::Fsync,
            idempotency_window_ms: 24 * 3600 * 1000,
            block_cache_bytes: 128 << 20,
        }
    }
}

/// The key retries are de-duplicated by.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct IdempotencyKey {
    pub sender: u64,
    pub client_msg_id: u64,
}

/// A message to append to one inbox.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewMessage {
    pub inbox: u64,
    pub idempotency: Option<IdempotencyKey>,
    pub record: Record,
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
}

/// What happened to one message of an append batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AppendOutcome {
    Stored(Placement),
    /// Already stored by an earlier append with the same idempotency key.
    Duplicate(Placement),
    /// The idempotency key was used for a message to another destination.
    Conflict,
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
}

impl From<rocksdb::Error> for StoreError {
    fn from(e: rocksdb::Error) -> Self {
        let text = e.into_string();
        if text.contains("Corruption") {
            StoreError::Corrupt {
                what: "rocksdb",
                detail: text,
            }
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

impl Record {
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

//! The RocksDB inbox store.
//!
//! Column families and key layout (all integers big-endian, so byte order is
//! numeric order and one user's inbox is one contiguous key range):
//!
//! | CF      | key                          | value                                         |
//! |---------|------------------------------|-----------------------------------------------|
//! | `inbox` | user u64 . seq u64           | record (see [`crate::model::Record`])         |
//! | `meta`  | user u64                     | head u64 . acked u64 . oldest u64             |
//! | `idem`  | sender u64 . client_msg u64 [. scope u64] | stored_at_ms u64 . inbox u64 . seq u64 . server_msg_id u64 . timestamp_ms u64 . dest_tag u8 . dest_id u64 |
//! | `kv`    | broker-defined bytes         | broker-defined bytes                          |
//! | `expiring` | broker-defined bytes      | expires_at_ms u64 . broker-defined bytes      |
//! | `default` | `layout`                     | `flat` or `slotted`                           |
//!
//! In the slotted layout (a cluster node's store, [`Layout::Slotted`]) every
//! key of those five spaces starts with one more byte, the [slot](slot_of)
//! of its owner: the inbox's user (or group) for `inbox`, `meta` and `idem`
//! (an idempotency entry belongs to the inbox it was stored with), the id
//! the broker's rule names for `kv` and `expiring`. A shard is a run of
//! slots, so its data is one key range per space: a move copies ranges
//! ([`SlotTransfer`]) and deletes them, never reading other shards' data.
//!
//! Why this shape:
//! - An inbox's head is its last row, so an append writes no `meta` row: a
//!   stored message is two memtable inserts (its row and its idempotency
//!   entry), not three. `meta` is written by acks and trims; a trim that
//!   removes every row keeps the head there. A head is the higher of the
//!   `meta` head and the last row's sequence (one point read, one backward
//!   seek), loaded lazily on first touch and cached: opening the store reads
//!   nothing per user, so start-up time does not grow with the number of
//!   users.
//! - `inbox` uses an 8-byte prefix extractor (the user id) with a memtable
//!   prefix bloom, so range reads of one inbox skip other users' data; LZ4
//!   compresses the payloads, which are often small and repetitive.
//! - `idem` is only ever read by point lookups (bloom filter); a compaction
//!   filter drops entries older than the idempotency window so it stays small.
//!   Nearly every lookup is a miss (a new message's key), so its memtables
//!   keep a whole-key bloom too: a miss costs a few hashed bits, not a
//!   search of the skip list (at 10,000 connections that search was 8.4%
//!   of the node's samples: BENCHMARKS, "10,000 connections with
//!   phone-like acknowledgements").
//! - Trimming acknowledged messages is a range delete over one inbox prefix:
//!   one tombstone instead of one per message.
//! - An inbox entry is either a record or a 25-byte reference to a record in
//!   another inbox (a group log); reads resolve references with a point get.
//!   A third form, a copy, holds a record in full with the log position it
//!   copies (a group log kept on another cluster node).
//! - `expiring` has a compaction filter that drops entries past their expiry
//!   (by the configured [`Clock`]); the broker also range-deletes them, so
//!   expired data leaves the disk, not just the query results.
//! - RocksDB checksums every WAL record and every SST block; reads verify
//!   them, so corrupted data surfaces as [`StoreError::Corrupt`], never as a
//!   message.

use std::collections::HashMap;
use std::ops::Range;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::BytesMut;
use rocksdb::compaction_filter::Decision;
use rocksdb::{
    BlockBasedOptions, Cache, ColumnFamily, ColumnFamilyDescriptor, DBCompressionType,
    DBRawIterator, Options, ReadOptions, SliceTransform, WriteBatch, WriteOptions, DB,
};

use crate::model::*;
use crate::{Digest, InboxStore, SlotTransfer, StoreHealth, WriteTap};

const CF_INBOX: &str = "inbox";
const CF_META: &str = "meta";
const CF_IDEM: &str = "idem";
const CF_KV: &str = "kv";
const CF_EXPIRING: &str = "expiring";
const ALL_CFS: [&str; 6] = ["default", CF_INBOX, CF_META, CF_IDEM, CF_KV, CF_EXPIRING];
/// The key in `default` that records the layout.
const LAYOUT_KEY: &[u8] = b"layout";
const META_LEN: usize = 24;
const IDEM_LEN: usize = 49;
/// Lock stripes for the head cache: enough that shards rarely contend.
const STRIPES: usize = 64;

pub struct RocksStore {
    pub(crate) db: DB,
    config: StoreConfig,
    write_opts: WriteOptions,
    /// Cached inbox states, striped by user id. Only the inbox's single writer
    /// changes an entry, after its write succeeded; only inboxes of served
    /// slots are cached (see `cached_state`).
    states: Vec<Mutex<HashMap<u64, InboxState>>>,
    /// Moves on every forgetting of cached states (an import, a deletion, a
    /// failed write, a change of the served set): a state read from disk
    /// before one is not cached after it.
    forgotten: AtomicU64,
    cache: Cache,
    /// Writes that synced the WAL.
    wal_syncs: AtomicU64,
    /// The owner rule of the slotted layout; `None`: flat.
    owner: Option<KeyOwner>,
    /// Bytes before a key's own bytes: 1 (the slot) when slotted, else 0.
    lead: usize,
    /// The slots being watched for a transfer, and what changed in them.
    watch: Mutex<Option<Watch>>,
    /// Set while `watch` holds one, so writes skip its lock otherwise.
    watching: AtomicBool,
    /// Which slots take writes (slotted only). Every write holds the read
    /// lock from its check to its end; a change takes the write lock, so it
    /// returns only after the writes that saw the old set are done.
    served: std::sync::RwLock<()>,
    /// The served set, a bit per slot: changed only under `served`'s write
    /// lock (so stable for a write that holds the read lock), read without
    /// taking it (`cached_state` runs inside such writes).
    served_bits: [AtomicU64; SLOTS / 64],
    /// Writes dropped because their slot was not served.
    not_served: AtomicU64,
    /// Told of every committed write to served slots (replication).
    tap: std::sync::RwLock<Option<Arc<dyn WriteTap>>>,
    /// Set while `tap` holds one, so writes skip recording otherwise.
    tapping: AtomicBool,
}

/// The served slots, as one write sees them (`None`: flat, all served).
type Served<'a> = Option<std::sync::RwLockReadGuard<'a, ()>>;

struct Watch {
    slots: std::ops::Range<u16>,
    changes: SlotChanges,
}

/// A key of the inbox, meta or idempotency space, built on the stack: an
/// optional slot, then big-endian ids.
#[derive(Clone, Copy)]
struct Key {
    bytes: [u8; 25],
    len: usize,
}

impl Key {
    fn starting(slot: Option<u8>) -> Key {
        let mut k = Key {
            bytes: [0; 25],
            len: 0,
        };
        if let Some(s) = slot {
            k.bytes[0] = s;
            k.len = 1;
        }
        k
    }

    fn id(mut self, v: u64) -> Key {
        self.bytes[self.len..self.len + 8].copy_from_slice(&v.to_be_bytes());
        self.len += 8;
        self
    }
}

impl AsRef<[u8]> for Key {
    fn as_ref(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

/// The key just past every key that starts with `prefix` (`None`: no bound).
fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

/// The key of slot `slot`'s first entry (`SLOTS`: past the last one, of
/// any key no longer than 64 bytes).
fn slot_bound(slot: u16) -> Vec<u8> {
    if (slot as usize) < SLOTS {
        vec![slot as u8]
    } else {
        vec![0xff; 65]
    }
}

fn space_cf(space: Space) -> &'static str {
    match space {
        Space::Inbox => CF_INBOX,
        Space::Meta => CF_META,
        Space::Idem => CF_IDEM,
        Space::Kv => CF_KV,
        Space::Expiring => CF_EXPIRING,
    }
}

fn be_u64(v: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(v[at..at + 8].try_into().expect("8 bytes"))
}

pub(crate) fn encode_meta(s: &InboxState) -> [u8; META_LEN] {
    let mut v = [0u8; META_LEN];
    v[..8].copy_from_slice(&s.head_seq.to_be_bytes());
    v[8..16].copy_from_slice(&s.acked_seq.to_be_bytes());
    v[16..].copy_from_slice(&s.oldest_seq.to_be_bytes());
    v
}

pub(crate) fn decode_meta(v: &[u8]) -> Result<InboxState, StoreError> {
    if v.len() != META_LEN {
        return Err(StoreError::Corrupt {
            what: "inbox meta",
            detail: format!("value of {} bytes, expected {META_LEN}", v.len()),
        });
    }
    let s = InboxState {
        head_seq: be_u64(v, 0),
        acked_seq: be_u64(v, 8),
        oldest_seq: be_u64(v, 16),
    };
    // Checked: a head of u64::MAX on disk is corrupt, not an overflow
    // (found by fuzzing).
    if s.acked_seq > s.head_seq || s.oldest_seq == 0 || s.oldest_seq > s.head_seq.saturating_add(1)
    {
        return Err(StoreError::Corrupt {
            what: "inbox meta",
            detail: format!("inconsistent cursors {s:?}"),
        });
    }
    Ok(s)
}

pub(crate) struct IdemEntry {
    pub(crate) stored_at_ms: u64,
    pub(crate) placement: Placement,
    pub(crate) dest_tag: u8,
    pub(crate) dest_id: u64,
}

pub(crate) fn encode_idem(e: &IdemEntry) -> [u8; IDEM_LEN] {
    let mut v = [0u8; IDEM_LEN];
    v[..8].copy_from_slice(&e.stored_at_ms.to_be_bytes());
    v[8..16].copy_from_slice(&e.placement.inbox.to_be_bytes());
    v[16..24].copy_from_slice(&e.placement.seq.to_be_bytes());
    v[24..32].copy_from_slice(&e.placement.server_msg_id.to_be_bytes());
    v[32..40].copy_from_slice(&e.placement.timestamp_ms.to_be_bytes());
    v[40] = e.dest_tag;
    v[41..49].copy_from_slice(&e.dest_id.to_be_bytes());
    v
}

pub(crate) fn decode_idem(v: &[u8]) -> Result<IdemEntry, StoreError> {
    if v.len() != IDEM_LEN {
        return Err(StoreError::Corrupt {
            what: "idempotency index",
            detail: format!("value of {} bytes, expected {IDEM_LEN}", v.len()),
        });
    }
    Ok(IdemEntry {
        stored_at_ms: be_u64(v, 0),
        placement: Placement {
            inbox: be_u64(v, 8),
            seq: be_u64(v, 16),
            server_msg_id: be_u64(v, 24),
            timestamp_ms: be_u64(v, 32),
        },
        dest_tag: v[40],
        dest_id: be_u64(v, 41),
    })
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The lines of RocksDB's `LOG` in `path` that report corruption in a
/// named file (as "; <file>: <what>" notes), from its last 64 KiB.
fn corruption_notes(path: &Path) -> String {
    let Ok(log) = std::fs::read(path.join("LOG")) else {
        return String::new();
    };
    let tail = &log[log.len().saturating_sub(64 << 10)..];
    String::from_utf8_lossy(tail)
        .lines()
        .filter(|l| {
            l.contains("Corruption")
                && (l.contains(".log:") || l.contains("MANIFEST") || l.contains(".sst"))
        })
        .filter_map(|l| l.rsplit("] ").next())
        .map(|note| format!("; {note}"))
        .collect()
}

impl RocksStore {
    /// Opens (or creates) the store in `path`.
    pub fn open(path: impl AsRef<Path>, config: StoreConfig) -> Result<RocksStore, StoreError> {
        let path = path.as_ref();
        let cache = Cache::new_lru_cache(config.block_cache_bytes);

        let mut db_opts = Options::default();
        db_opts.create_if_missing(true);
        db_opts.create_missing_column_families(true);
        // Two cores: one background thread for flushes, one for compactions.
        db_opts.increase_parallelism(2);
        db_opts.set_max_background_jobs(2);
        // Bound the WAL so recovery after a crash replays little.
        db_opts.set_max_total_wal_size(256 << 20);
        db_opts.set_bytes_per_sync(1 << 20);
        db_opts.set_keep_log_file_num(4);
        db_opts.set_paranoid_checks(true);
        // Replaying the WAL at open: a record that fails its checksum in the
        // middle of a log stops the open with the file's name (never a
        // silent cut at the corruption, which would drop acknowledged
        // writes after it); only an incomplete record at the very end (a
        // write torn by a power loss, never acknowledged in fsync mode) is
        // dropped.
        db_opts.set_wal_recovery_mode(rocksdb::DBRecoveryMode::TolerateCorruptedTailRecords);

        let (owner, lead) = match config.layout {
            Layout::Flat => (None, 0),
            Layout::Slotted { owner } => (Some(owner), 1),
        };
        // Keys of one owner arrive in order: an inbox's entries by
        // sequence, a sender's idempotency entries by id, an inbox's meta
        // row again and again, a key-value owner's rows (the broker's keys
        // are a tag byte and the owner's id, then what orders them). So
        // each memtable keeps, per prefix of `len` bytes, where the last
        // key went in and starts the next insert's search there instead of
        // at the skip list's top (only for writes not inserted
        // concurrently; RocksDB puts the cost at about 250 bytes per
        // prefix, counted in the memtable's size; a key
        // shorter than the prefix is inserted without a hint). The option
        // has no setter here, only its string form, read onto fresh
        // options before anything else is set on them (what the options
        // own, such as a compaction filter, stays with the result).
        let hinted = |len: usize| {
            Options::default()
                .get_options_from_string(format!(
                    "memtable_insert_with_hint_prefix_extractor=rocksdb.FixedPrefix.{len}"
                ))
                .map_err(StoreError::from)
        };
        let mut inbox_opts = hinted(lead + 8)?;
        let mut inbox_table = BlockBasedOptions::default();
        inbox_table.set_block_cache(&cache);
        inbox_table.set_bloom_filter(10.0, false);
        inbox_opts.set_block_based_table_factory(&inbox_table);
        inbox_opts.set_prefix_extractor(SliceTransform::create_fixed_prefix(lead + 8));
        inbox_opts.set_memtable_prefix_bloom_ratio(0.1);
        inbox_opts.set_compression_type(DBCompressionType::Lz4);
        inbox_opts.set_write_buffer_size(64 << 20);

        let mut meta_opts = hinted(lead + 8)?;
        let mut point_table = BlockBasedOptions::default();
        point_table.set_block_cache(&cache);
        point_table.set_bloom_filter(10.0, false);
        meta_opts.set_block_based_table_factory(&point_table);
        meta_opts.set_compression_type(DBCompressionType::Lz4);

        let mut idem_opts = hinted(lead + 8)?;
        idem_opts.set_block_based_table_factory(&point_table);
        idem_opts.set_memtable_prefix_bloom_ratio(0.02);
        idem_opts.set_memtable_whole_key_filtering(true);
        idem_opts.set_compression_type(DBCompressionType::Lz4);
        let window_ms = config.idempotency_window_ms;
        idem_opts.set_compaction_filter("courier-idem-expiry", move |_level, _key, value| {
            // Entries past the window are never consulted again (lookups check
            // the age too), so compaction may drop them.
            match value.get(..8) {
                Some(b) => {
                    let stored_at = u64::from_be_bytes(b.try_into().expect("8 bytes"));
                    if now_ms().saturating_sub(stored_at) > window_ms {
                        Decision::Remove
                    } else {
                        Decision::Keep
                    }
                }
                None => Decision::Keep,
            }
        });

        let mut kv_opts = hinted(lead + 9)?;
        kv_opts.set_block_based_table_factory(&point_table);
        kv_opts.set_compression_type(DBCompressionType::Lz4);

        let mut expiring_opts = Options::default();
        expiring_opts.set_block_based_table_factory(&point_table);
        expiring_opts.set_compression_type(DBCompressionType::Lz4);
        let clock = config.clock.clone();
        expiring_opts.set_compaction_filter(
            "courier-expiry",
            move |_level, _key, value| match value.get(..8) {
                Some(b) if u64::from_be_bytes(b.try_into().expect("8 bytes")) <= clock.now_ms() => {
                    Decision::Remove
                }
                _ => Decision::Keep,
            },
        );

        let cfs = vec![
            ColumnFamilyDescriptor::new(CF_INBOX, inbox_opts),
            ColumnFamilyDescriptor::new(CF_META, meta_opts),
            ColumnFamilyDescriptor::new(CF_IDEM, idem_opts),
            ColumnFamilyDescriptor::new(CF_KV, kv_opts),
            ColumnFamilyDescriptor::new(CF_EXPIRING, expiring_opts),
        ];
        let db = DB::open_cf_descriptors(&db_opts, path, cfs).map_err(|e| {
            match StoreError::from(e) {
                // RocksDB's own message often omits the file ("checksum
                // mismatch"); its LOG names it: say which file is corrupt.
                StoreError::Corrupt { what, detail } => StoreError::Corrupt {
                    what,
                    detail: format!("{detail}{}", corruption_notes(path)),
                },
                other => other,
            }
        })?;
        let mut write_opts = WriteOptions::default();
        write_opts.set_sync(config.durability == Durability::Fsync);
        let store = RocksStore {
            db,
            config,
            write_opts,
            states: (0..STRIPES).map(|_| Mutex::new(HashMap::new())).collect(),
            forgotten: AtomicU64::new(0),
            cache,
            wal_syncs: AtomicU64::new(0),
            owner,
            lead,
            watch: Mutex::new(None),
            watching: AtomicBool::new(false),
            served: std::sync::RwLock::new(()),
            served_bits: std::array::from_fn(|_| AtomicU64::new(u64::MAX)),
            not_served: AtomicU64::new(0),
            tap: std::sync::RwLock::new(None),
            tapping: AtomicBool::new(false),
        };
        store.check_layout()?;
        Ok(store)
    }

    fn layout_name(&self) -> &'static str {
        if self.owner.is_some() {
            "slotted"
        } else {
            "flat"
        }
    }

    /// Records the layout in a new store; refuses a store recorded (or, from
    /// before the record existed, holding data) in the other one.
    fn check_layout(&self) -> Result<(), StoreError> {
        let wanted = self.layout_name();
        let found = match self.db.get(LAYOUT_KEY)? {
            Some(v) => Some(String::from_utf8_lossy(&v).into_owned()),
            // Written before layouts existed: flat, if it holds anything.
            None => ALL_CFS[1..]
                .iter()
                .any(|cf| {
                    let mut it = self.db.raw_iterator_cf(self.cf(cf));
                    it.seek_to_first();
                    it.valid()
                })
                .then(|| "flat".to_owned()),
        };
        match found {
            Some(f) if f == wanted => Ok(()),
            Some(f) => Err(StoreError::Layout(format!(
                "the store was created with the {f} key layout, not the {wanted} one \
                 (a single node's store is flat, a cluster node's slotted; neither converts)"
            ))),
            None => {
                let mut opts = WriteOptions::default();
                opts.set_sync(true);
                Ok(self.db.put_opt(LAYOUT_KEY, wanted, &opts)?)
            }
        }
    }

    /// The served slots for one write (held until it is done).
    fn served(&self) -> Served<'_> {
        self.owner.map(|_| self.served.read().expect("served lock"))
    }

    /// Whether a write to the stored key `key` may go ahead; counts it if
    /// not.
    fn may_write(&self, served: &Served<'_>, key: &[u8]) -> bool {
        let ok = match (served, key.first()) {
            (Some(_), Some(slot)) => self.slot_served(*slot),
            _ => true,
        };
        if !ok {
            self.not_served.fetch_add(1, Ordering::Relaxed);
        }
        ok
    }

    /// The start of a key `owner` owns: its slot when slotted.
    fn lead_of(&self, owner: u64) -> Key {
        Key::starting(self.owner.map(|_| slot_of(owner)))
    }

    fn inbox_key(&self, user: u64, seq: u64) -> Key {
        self.lead_of(user).id(user).id(seq)
    }

    fn meta_key(&self, user: u64) -> Key {
        self.lead_of(user).id(user)
    }

    /// The idempotency entry of `key`, stored with `inbox`'s entry: 16
    /// bytes after the lead for an unscoped key (the layout every existing
    /// entry has), 24 with a scope.
    fn idem_key(&self, inbox: u64, key: IdempotencyKey) -> Key {
        let k = self.lead_of(inbox).id(key.sender).id(key.client_msg_id);
        if key.scope == 0 {
            k
        } else {
            k.id(key.scope)
        }
    }

    /// A key-value key as stored: with its owner's slot when slotted.
    fn kv_key(&self, key: &[u8]) -> Result<Vec<u8>, StoreError> {
        let Some(owner) = self.owner else {
            return Ok(key.to_vec());
        };
        let Some(id) = owner(key) else {
            return Err(StoreError::Layout(format!(
                "key-value key {key:02x?} names no owner, so it has no slot"
            )));
        };
        let mut k = Vec::with_capacity(1 + key.len());
        k.push(slot_of(id));
        k.extend_from_slice(key);
        Ok(k)
    }

    /// The stored prefixes a key-value scan by `prefix` reads: itself when
    /// flat; with its owner's slot when the prefix names the owner; with
    /// every slot when it does not.
    /// The prefixes to read for `prefix`: itself in a flat store; in a
    /// slotted one, under its owner's slot if the prefix names its owner,
    /// else under every slot of `slots`.
    fn kv_prefixes(&self, prefix: &[u8], slots: Range<u16>) -> Vec<Vec<u8>> {
        let Some(owner) = self.owner else {
            return vec![prefix.to_vec()];
        };
        let with = |slot: u8| {
            let mut k = Vec::with_capacity(1 + prefix.len());
            k.push(slot);
            k.extend_from_slice(prefix);
            k
        };
        match owner(prefix) {
            Some(id) => vec![with(slot_of(id))],
            None => slots.map(|s| with(s as u8)).collect(),
        }
    }

    /// A key-value scan of `cf` (of the slots in `slots`), keys returned
    /// without their slot, in key order, at most `limit`.
    fn scan_space(
        &self,
        cf: &str,
        prefix: &[u8],
        slots: Range<u16>,
        limit: usize,
    ) -> Result<KvPairs, StoreError> {
        let prefixes = self.kv_prefixes(prefix, slots);
        if prefixes.len() == 1 {
            let mut out = self.scan_cf(cf, &prefixes[0], limit)?;
            if self.lead > 0 {
                for (k, _) in &mut out {
                    k.remove(0);
                }
            }
            return Ok(out);
        }
        let mut out = Vec::new();
        for p in prefixes {
            out.extend(
                self.scan_cf(cf, &p, limit)?
                    .into_iter()
                    .map(|(k, v)| (k[1..].to_vec(), v)),
            );
        }
        out.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        out.truncate(limit);
        Ok(out)
    }

    fn cf(&self, name: &str) -> &ColumnFamily {
        self.db
            .cf_handle(name)
            .expect("column family created at open")
    }

    fn stripe(&self, user: u64) -> &Mutex<HashMap<u64, InboxState>> {
        // Fibonacci hashing spreads sequential user ids over stripes.
        let h = user.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 58;
        &self.states[h as usize % STRIPES]
    }

    fn cached_state(&self, user: u64) -> Result<InboxState, StoreError> {
        if let Some(s) = self.stripe(user).lock().expect("state lock").get(&user) {
            return Ok(*s);
        }
        let forgotten = self.forgotten.load(Ordering::SeqCst);
        let mut state = match self
            .db
            .get_pinned_cf(self.cf(CF_META), self.meta_key(user))?
        {
            Some(v) => decode_meta(&v)?,
            None => InboxState::default(),
        };
        // An append writes no meta row: the head is the last row's
        // sequence, or the meta row's head where an ack or a trim wrote a
        // later one (everything up to it trimmed).
        state.head_seq = state.head_seq.max(self.last_seq(user)?);
        let mut stripe = self.stripe(user).lock().expect("state lock");
        // A concurrent reader may have loaded an older value from disk after
        // the writer published a newer one: keep whatever is cached already.
        if let Some(s) = stripe.get(&user) {
            return Ok(*s);
        }
        // Cached only while the slot is served (its writer is here and
        // every change to it goes through the cache), and only if nothing
        // was forgotten since the read: an import that landed meanwhile
        // would otherwise leave the older value cached behind its own
        // forgetting, and the slot's next owner would hand out its
        // sequences again. (A forgetting bumps the counter before it
        // takes the stripe locks, so one this check misses removes what
        // is inserted here.)
        if self.slot_served(slot_of(user)) && self.forgotten.load(Ordering::SeqCst) == forgotten {
            stripe.insert(user, state);
        }
        Ok(state)
    }

    /// The state cached for `user`, if any (for tests of the cache's rules).
    #[cfg(test)]
    pub(crate) fn cached(&self, user: u64) -> Option<InboxState> {
        self.stripe(user)
            .lock()
            .expect("state lock")
            .get(&user)
            .copied()
    }

    /// Whether `slot` is served here (always, flat), without the served
    /// set's lock.
    fn slot_served(&self, slot: u8) -> bool {
        let slot = slot as usize;
        self.owner.is_none()
            || self.served_bits[slot / 64].load(Ordering::SeqCst) & (1 << (slot % 64)) != 0
    }

    /// The sequence of `user`'s last inbox row (0: none): one backward seek
    /// within the user's prefix. A key there of another length is corrupt
    /// (read as no row, it would hand out its sequences again).
    fn last_seq(&self, user: u64) -> Result<u64, StoreError> {
        let mut ro = ReadOptions::default();
        ro.set_verify_checksums(true);
        ro.set_prefix_same_as_start(true);
        ro.set_iterate_lower_bound(self.inbox_key(user, 0).as_ref().to_vec());
        let mut it = self.db.raw_iterator_cf_opt(self.cf(CF_INBOX), ro);
        it.seek_for_prev(self.inbox_key(user, u64::MAX));
        it.status()?;
        // The bounds keep the iterator inside the user's prefix.
        match it.key() {
            Some(k) if it.valid() && k.len() != self.lead + 16 => Err(StoreError::Corrupt {
                what: "inbox key",
                detail: format!("inbox {user}: a key of {} bytes", k.len()),
            }),
            Some(k) if it.valid() => Ok(be_u64(k, self.lead + 8)),
            _ => Ok(0),
        }
    }

    fn publish_states(&self, states: &HashMap<u64, InboxState>) {
        for (user, s) in states {
            self.stripe(*user)
                .lock()
                .expect("state lock")
                .insert(*user, *s);
        }
    }

    fn forget_states<'a>(&self, users: impl Iterator<Item = &'a u64>) {
        self.forgotten.fetch_add(1, Ordering::SeqCst);
        for user in users {
            self.stripe(*user).lock().expect("state lock").remove(user);
        }
    }

    fn write(&self, batch: WriteBatch) -> Result<(), StoreError> {
        self.db.write_opt(batch, &self.write_opts)?;
        if self.config.durability == Durability::Fsync {
            self.wal_syncs.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    /// An integer property summed over every column family.
    fn property_sum(&self, name: &str) -> u64 {
        ALL_CFS
            .iter()
            .filter_map(|cf| {
                self.db
                    .property_int_value_cf(self.cf(cf), name)
                    .ok()
                    .flatten()
            })
            .sum()
    }

    fn read_opts_for(&self, user: u64) -> ReadOptions {
        let mut ro = ReadOptions::default();
        ro.set_verify_checksums(true);
        ro.set_prefix_same_as_start(true);
        ro.set_iterate_upper_bound(self.inbox_key(user, u64::MAX).as_ref().to_vec());
        ro
    }

    /// Every key-value pair under `prefix` in column family `cf`, raw.
    fn scan_cf(&self, cf: &str, prefix: &[u8], limit: usize) -> Result<KvPairs, StoreError> {
        let mut ro = ReadOptions::default();
        ro.set_verify_checksums(true);
        if let Some(end) = prefix_end(prefix) {
            ro.set_iterate_upper_bound(end);
        }
        let mut it = self.db.raw_iterator_cf_opt(self.cf(cf), ro);
        it.seek(prefix);
        let mut out = Vec::new();
        while it.valid() && out.len() < limit {
            let (Some(k), Some(v)) = (it.key(), it.value()) else {
                break;
            };
            if !k.starts_with(prefix) {
                break;
            }
            out.push((k.to_vec(), v.to_vec()));
            it.next();
        }
        it.status()?;
        Ok(out)
    }

    /// Compacts the expiring space now (tests and operators: expired entries
    /// leave the SST files).
    pub fn compact_expiring(&self) {
        self.db
            .compact_range_cf(self.cf(CF_EXPIRING), None::<&[u8]>, None::<&[u8]>);
    }

    /// Every raw key of the expiring space, expired or not (what is on
    /// disk, with slots when slotted).
    pub fn raw_expiring_keys(&self) -> Result<Vec<Vec<u8>>, StoreError> {
        Ok(self
            .scan_cf(CF_EXPIRING, &[], usize::MAX)?
            .into_iter()
            .map(|(k, _)| k)
            .collect())
    }

    /// Resolves a reference to the record it names.
    fn resolve(&self, at: LogRef) -> Result<Record, StoreError> {
        match self
            .db
            .get_pinned_cf(self.cf(CF_INBOX), self.inbox_key(at.log, at.seq))?
        {
            Some(v) => match Value::decode(&v)? {
                Value::Record(r) => Ok(r),
                Value::Ref(..) | Value::Copy(..) => Err(StoreError::Corrupt {
                    what: "inbox reference",
                    detail: format!("{at:?} names another reference or a copy"),
                }),
            },
            None => Err(StoreError::Corrupt {
                what: "inbox reference",
                detail: format!("{at:?} does not name a stored record"),
            }),
        }
    }

    /// Writes every column family's memtable to SST files (a checkpoint of
    /// sorts: the WAL up to here is no longer needed for recovery). For
    /// tests and tools that need the data in table files.
    pub fn flush_memtables(&self) -> Result<(), StoreError> {
        for cf in ALL_CFS {
            self.db.flush_cf(self.cf(cf))?;
        }
        Ok(())
    }

    /// A RocksDB property (e.g. `rocksdb.estimate-pending-compaction-bytes`), for metrics.
    pub fn property_int(&self, name: &str) -> Option<u64> {
        self.db.property_int_value(name).ok().flatten()
    }

    /// A batch of writes to served slots: watched and tapped.
    fn batch(&self) -> Batch<'_> {
        Batch {
            store: self,
            wb: WriteBatch::default(),
            watched: self.watching.load(Ordering::Acquire),
            notes: SlotChanges::default(),
            raw: self.tapping.load(Ordering::Acquire).then(Vec::new),
        }
    }

    /// A batch of writes to slots not served (imports, deletions): another
    /// node's shards, never watched nor tapped.
    fn foreign_batch(&self) -> Batch<'_> {
        Batch {
            store: self,
            wb: WriteBatch::default(),
            watched: false,
            notes: SlotChanges::default(),
            raw: None,
        }
    }

    /// What a served write did once committed: tells the watch and the tap.
    /// Called while the write still holds the served set.
    fn committed(&self, notes: SlotChanges, raw: Option<Vec<RawEntry>>) {
        self.noted(notes);
        if let Some(raw) = raw.filter(|r| !r.is_empty()) {
            if let Some(tap) = self.tap.read().expect("tap lock").as_ref() {
                tap.committed(raw);
            }
        }
    }

    /// Tells the watch what a write that has just been committed wrote
    /// (only then: a round that drains a key reads its committed value).
    /// Called while the write still holds the served set, so a pause that
    /// takes it finds every write before it told.
    fn noted(&self, notes: SlotChanges) {
        if notes.is_empty() {
            return;
        }
        if let Some(w) = self.watch.lock().expect("watch lock").as_mut() {
            let inside = |k: &[u8]| k.first().is_some_and(|s| w.slots.contains(&u16::from(*s)));
            for (space, key) in notes.keys {
                if inside(&key) {
                    w.changes.keys.insert((space, key));
                }
            }
            for (space, from, to) in notes.ranges {
                if inside(&from) {
                    w.changes.ranges.push((space, from, to));
                }
            }
        }
    }

    /// Adds the key-value writes of `kv` to `b`, leaving out those to
    /// slots that are not served. A key without an owner in the slotted
    /// layout fails the whole write (a broker bug, never half applied).
    /// An acknowledgement moves its inbox's state in `states` (the write's
    /// inboxes, published once it is committed) and puts its `meta` row.
    fn put_kv(
        &self,
        b: &mut Batch<'_>,
        served: &Served<'_>,
        kv: &[KvOp],
        states: &mut HashMap<u64, InboxState>,
    ) -> Result<(), StoreError> {
        for op in kv {
            match op {
                KvOp::Ack { inbox, up_to_seq } => {
                    if !self.may_write(served, self.lead_of(*inbox).as_ref()) {
                        continue;
                    }
                    let s = match states.entry(*inbox) {
                        std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                        std::collections::hash_map::Entry::Vacant(e) => {
                            e.insert(self.cached_state(*inbox)?)
                        }
                    };
                    if s.ack(*up_to_seq) {
                        b.put(Space::Meta, self.meta_key(*inbox).as_ref(), &encode_meta(s));
                    }
                }
                KvOp::Put { key, value } => {
                    let key = self.kv_key(key)?;
                    if self.may_write(served, &key) {
                        b.put(Space::Kv, &key, value);
                    }
                }
                KvOp::Delete { key } => {
                    let key = self.kv_key(key)?;
                    if self.may_write(served, &key) {
                        b.delete(Space::Kv, &key);
                    }
                }
                KvOp::PutExpiring {
                    key,
                    expires_at_ms,
                    value,
                } => {
                    let key = self.kv_key(key)?;
                    if self.may_write(served, &key) {
                        let mut v = Vec::with_capacity(8 + value.len());
                        v.extend_from_slice(&expires_at_ms.to_be_bytes());
                        v.extend_from_slice(value);
                        b.put(Space::Expiring, &key, &v);
                    }
                }
                KvOp::DeleteExpiringRange { from, to } => {
                    // One slot when both ends name the same owner's; else
                    // the same range in every slot.
                    let owner = self.owner.map(|o| (o(from), o(to)));
                    match owner {
                        None => b.delete_range(Space::Expiring, from, to),
                        Some((Some(a), Some(z))) if slot_of(a) == slot_of(z) => {
                            let from = self.kv_key(from)?;
                            if self.may_write(served, &from) {
                                b.delete_range(Space::Expiring, &from, &self.kv_key(to)?);
                            }
                        }
                        Some(_) => {
                            for slot in 0..SLOTS as u16 {
                                let at = |k: &[u8]| [&[slot as u8], k].concat();
                                if self.may_write(served, &at(from)) {
                                    b.delete_range(Space::Expiring, &at(from), &at(to));
                                }
                            }
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Writes `kv` without waiting for a sync (`write_lazy`, `ack`); the
    /// states of the inboxes its acknowledgements touched, published.
    fn write_unsynced(
        &self,
        served: &Served<'_>,
        kv: &[KvOp],
    ) -> Result<HashMap<u64, InboxState>, StoreError> {
        let mut states = HashMap::new();
        let mut b = self.batch();
        self.put_kv(&mut b, served, kv, &mut states)?;
        if b.wb.is_empty() {
            return Ok(states);
        }
        let mut opts = WriteOptions::default();
        opts.set_sync(false);
        if let Err(e) = self.db.write_opt(b.wb, &opts) {
            self.forget_states(states.keys());
            return Err(e.into());
        }
        self.committed(b.notes, b.raw);
        self.publish_states(&states);
        Ok(states)
    }

    /// An iterator over `space`'s rows in the slots `slots`, across
    /// owners in key order (a copy's chunks, its digest, its count).
    /// Total order: the inbox family has a prefix extractor, and a seek in
    /// prefix mode (the default) skips the files and memtables whose
    /// prefix filter lacks the seek key's owner, with every other owner's
    /// rows in them. A copy that went on from a chunk's last key then left
    /// whole inboxes behind, and the new owner handed out their sequences
    /// again.
    fn run_iterator(&self, space: Space, slots: &std::ops::Range<u16>) -> DBRawIterator<'_> {
        let mut ro = ReadOptions::default();
        ro.set_verify_checksums(true);
        ro.set_iterate_lower_bound(slot_bound(slots.start));
        ro.set_iterate_upper_bound(slot_bound(slots.end));
        ro.set_total_order_seek(true);
        self.db.raw_iterator_cf_opt(self.cf(space_cf(space)), ro)
    }

    /// Forgets every cached inbox state (after an import or a deletion
    /// changed inboxes behind the cache).
    fn forget_all_states(&self) {
        self.forgotten.fetch_add(1, Ordering::SeqCst);
        for stripe in &self.states {
            stripe.lock().expect("state lock").clear();
        }
    }
}

/// A write batch that remembers what it writes while the store is
/// watched, to tell the watch once committed ([`RocksStore::noted`]).
struct Batch<'a> {
    store: &'a RocksStore,
    wb: WriteBatch,
    /// A watch was on when the batch began (a watch starts only once the
    /// writes under way have finished: see `SlotTransfer::watch`).
    watched: bool,
    notes: SlotChanges,
    /// The writes as raw entries, while a tap is set.
    raw: Option<Vec<RawEntry>>,
}

impl Batch<'_> {
    fn put(&mut self, space: Space, key: &[u8], value: &[u8]) {
        if self.watched {
            self.notes.keys.insert((space, key.to_vec()));
        }
        if let Some(raw) = self.raw.as_mut() {
            raw.push(RawEntry::Put {
                space,
                key: key.to_vec(),
                value: value.to_vec(),
            });
        }
        self.wb.put_cf(self.store.cf(space_cf(space)), key, value);
    }

    fn delete(&mut self, space: Space, key: &[u8]) {
        if self.watched {
            self.notes.keys.insert((space, key.to_vec()));
        }
        if let Some(raw) = self.raw.as_mut() {
            raw.push(RawEntry::Delete {
                space,
                key: key.to_vec(),
            });
        }
        self.wb.delete_cf(self.store.cf(space_cf(space)), key);
    }

    fn delete_range(&mut self, space: Space, from: &[u8], to: &[u8]) {
        if self.watched {
            self.notes.ranges.push((space, from.to_vec(), to.to_vec()));
        }
        if let Some(raw) = self.raw.as_mut() {
            raw.push(RawEntry::DeleteRange {
                space,
                from: from.to_vec(),
                to: to.to_vec(),
            });
        }
        self.wb
            .delete_range_cf(self.store.cf(space_cf(space)), from, to);
    }
}

impl InboxStore for RocksStore {
    fn append_with(
        &self,
        batch: &[NewMessage],
        kv: &[KvOp],
        now_ms: u64,
    ) -> Result<Vec<AppendOutcome>, StoreError> {
        let mut touched: HashMap<u64, InboxState> = HashMap::new();
        let mut in_batch: HashMap<IdempotencyKey, (Placement, u8, u64)> = HashMap::new();
        let mut outcomes = Vec::with_capacity(batch.len());
        let served = self.served();
        let mut b = self.batch();
        let mut value = BytesMut::new();
        let idem_cf = self.cf(CF_IDEM);

        for m in batch {
            let r = &m.record;
            if !self.may_write(&served, self.lead_of(m.inbox).as_ref()) {
                outcomes.push(AppendOutcome::NotServed);
                continue;
            }
            if let Some(key) = m.idempotency {
                let seen = match in_batch.get(&key) {
                    Some(&(p, tag, id)) => Some((p, tag, id)),
                    None => {
                        let stored = self
                            .db
                            .get_pinned_cf(idem_cf, self.idem_key(m.inbox, key))?;
                        match stored {
                            Some(v) => {
                                let e = decode_idem(&v)?;
                                (now_ms.saturating_sub(e.stored_at_ms)
                                    <= self.config.idempotency_window_ms)
                                    .then_some((e.placement, e.dest_tag, e.dest_id))
                            }
                            None => None,
                        }
                    }
                };
                if let Some((p, tag, id)) = seen {
                    outcomes.push(
                        if tag == r.dest_tag && id == r.dest_id && p.inbox == m.inbox {
                            AppendOutcome::Duplicate(p)
                        } else {
                            AppendOutcome::Conflict
                        },
                    );
                    continue;
                }
            }
            let state = match touched.get_mut(&m.inbox) {
                Some(s) => s,
                None => {
                    let s = self.cached_state(m.inbox)?;
                    touched.entry(m.inbox).or_insert(s)
                }
            };
            state.head_seq += 1;
            let placement = Placement {
                inbox: m.inbox,
                seq: state.head_seq,
                server_msg_id: r.server_msg_id,
                timestamp_ms: r.timestamp_ms,
            };
            let key = self.inbox_key(m.inbox, placement.seq);
            match m.form {
                Form::Reference(at) => {
                    b.put(Space::Inbox, key.as_ref(), &encode_ref(at, r.timestamp_ms))
                }
                Form::Record => {
                    value.clear();
                    r.encode(&mut value);
                    b.put(Space::Inbox, key.as_ref(), &value);
                }
                Form::Copy(at) => {
                    value.clear();
                    encode_copy(at, r, &mut value);
                    b.put(Space::Inbox, key.as_ref(), &value);
                }
            }
            if let Some(key) = m.idempotency {
                let entry = IdemEntry {
                    stored_at_ms: now_ms,
                    placement,
                    dest_tag: r.dest_tag,
                    dest_id: r.dest_id,
                };
                b.put(
                    Space::Idem,
                    self.idem_key(m.inbox, key).as_ref(),
                    &encode_idem(&entry),
                );
                in_batch.insert(key, (placement, r.dest_tag, r.dest_id));
            }
            outcomes.push(AppendOutcome::Stored(placement));
        }
        // No meta row: the rows just put carry the new heads (see
        // `cached_state`), so a stored message costs its row and its
        // idempotency entry, two inserts.
        self.put_kv(&mut b, &served, kv, &mut touched)?;
        if b.wb.is_empty() {
            return Ok(outcomes);
        }
        let Batch { wb, notes, raw, .. } = b;
        if let Err(e) = self.write(wb) {
            // The cache never moved; drop the entries anyway so the next touch
            // re-reads the truth from disk.
            self.forget_states(touched.keys());
            return Err(e);
        }
        self.committed(notes, raw);
        self.publish_states(&touched);
        Ok(outcomes)
    }

    fn erase(&self, inbox: u64, seqs: &[u64], kind: u8) -> Result<usize, StoreError> {
        let served = self.served();
        if !self.may_write(&served, self.lead_of(inbox).as_ref()) {
            return Err(StoreError::Unreplicated(
                "the inbox's shard is not served here".into(),
            ));
        }
        let mut b = self.batch();
        let mut value = BytesMut::new();
        let cf = self.cf(CF_INBOX);
        let mut changed = 0;
        for &seq in seqs {
            let key = self.inbox_key(inbox, seq);
            let Some(stored) = self.db.get_pinned_cf(cf, key.as_ref())? else {
                continue;
            };
            value.clear();
            match Value::decode(&stored)? {
                Value::Ref(..) => continue,
                Value::Record(r) => match r.erased(kind) {
                    Some(r) => r.encode(&mut value),
                    None => continue,
                },
                Value::Copy(at, r) => match r.erased(kind) {
                    Some(r) => encode_copy(at, &r, &mut value),
                    None => continue,
                },
            }
            b.put(Space::Inbox, key.as_ref(), &value);
            changed += 1;
        }
        if changed == 0 {
            return Ok(0);
        }
        let Batch { wb, notes, raw, .. } = b;
        self.write(wb)?;
        self.committed(notes, raw);
        Ok(changed)
    }

    fn write_lazy(&self, kv: &[KvOp]) -> Result<(), StoreError> {
        self.write_unsynced(&self.served(), kv).map(drop)
    }

    fn read_after(
        &self,
        inbox: u64,
        after_seq: u64,
        limit: usize,
    ) -> Result<Vec<StoredMessage>, StoreError> {
        let mut out = Vec::new();
        if limit == 0 || after_seq == u64::MAX {
            return Ok(out);
        }
        let mut it = self
            .db
            .raw_iterator_cf_opt(self.cf(CF_INBOX), self.read_opts_for(inbox));
        it.seek(self.inbox_key(inbox, after_seq + 1));
        let at = self.lead;
        while it.valid() && out.len() < limit {
            let (Some(k), Some(v)) = (it.key(), it.value()) else {
                break;
            };
            if k.len() != at + 16 || be_u64(k, at) != inbox {
                break;
            }
            let seq = be_u64(k, at + 8);
            out.push(match Value::decode(v)? {
                Value::Record(record) => StoredMessage {
                    seq,
                    record,
                    via: None,
                },
                Value::Ref(at, _) => StoredMessage {
                    seq,
                    record: self.resolve(at)?,
                    via: Some(at),
                },
                Value::Copy(at, record) => StoredMessage {
                    seq,
                    record,
                    via: Some(at),
                },
            });
            it.next();
        }
        it.status()?;
        Ok(out)
    }

    fn state(&self, inbox: u64) -> Result<InboxState, StoreError> {
        self.cached_state(inbox)
    }

    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.db.get_cf(self.cf(CF_KV), self.kv_key(key)?)?)
    }

    fn scan(&self, prefix: &[u8], limit: usize) -> Result<KvPairs, StoreError> {
        self.scan_space(CF_KV, prefix, 0..SLOTS as u16, limit)
    }

    fn scan_slots(
        &self,
        prefix: &[u8],
        slots: Range<u16>,
        limit: usize,
    ) -> Result<KvPairs, StoreError> {
        self.scan_space(CF_KV, prefix, slots, limit)
    }

    fn scan_expiring(
        &self,
        prefix: &[u8],
        now_ms: u64,
        limit: usize,
    ) -> Result<ExpiringEntries, StoreError> {
        let mut out = Vec::new();
        for (k, v) in self.scan_space(CF_EXPIRING, prefix, 0..SLOTS as u16, usize::MAX)? {
            if out.len() >= limit {
                break;
            }
            if v.len() < 8 {
                return Err(StoreError::Corrupt {
                    what: "expiring entry",
                    detail: format!("value of {} bytes", v.len()),
                });
            }
            let expires_at = be_u64(&v, 0);
            if expires_at > now_ms {
                out.push((k, expires_at, v[8..].to_vec()));
            }
        }
        Ok(out)
    }

    fn ack(&self, inbox: u64, up_to_seq: u64) -> Result<InboxState, StoreError> {
        let served = self.served();
        if !self.may_write(&served, self.lead_of(inbox).as_ref()) {
            // Not this store's to change (nor to cache: its owner may be
            // writing it elsewhere).
            return Ok(InboxState::default());
        }
        // An ack that is lost in a power failure only means redelivery (the
        // client de-duplicates by sequence), so it never waits for a sync.
        let states = self.write_unsynced(&served, &[KvOp::Ack { inbox, up_to_seq }])?;
        match states.get(&inbox) {
            Some(s) => Ok(*s),
            None => self.cached_state(inbox),
        }
    }

    fn acked_state(&self, inbox: u64, up_to_seq: u64) -> Result<InboxState, StoreError> {
        let served = self.served();
        if !self.may_write(&served, self.lead_of(inbox).as_ref()) {
            return Ok(InboxState::default());
        }
        let mut s = self.cached_state(inbox)?;
        s.ack(up_to_seq);
        Ok(s)
    }

    fn trim_acked(&self, inbox: u64, older_than_ms: u64) -> Result<InboxState, StoreError> {
        let served = self.served();
        if !self.may_write(&served, self.lead_of(inbox).as_ref()) {
            return Ok(InboxState::default());
        }
        let mut s = self.cached_state(inbox)?;
        if s.oldest_seq > s.acked_seq {
            return Ok(s);
        }
        // Find the last acked message older than the cut-off, reading only keys
        // and the timestamp of each value.
        let mut last = None;
        {
            let mut it = self
                .db
                .raw_iterator_cf_opt(self.cf(CF_INBOX), self.read_opts_for(inbox));
            it.seek(self.inbox_key(inbox, s.oldest_seq));
            while it.valid() {
                let (Some(k), Some(v)) = (it.key(), it.value()) else {
                    break;
                };
                let seq = be_u64(k, self.lead + 8);
                if seq > s.acked_seq {
                    break;
                }
                if Value::decode(v)?.timestamp_ms() >= older_than_ms {
                    break;
                }
                last = Some(seq);
                it.next();
            }
            it.status()?;
        }
        let Some(last) = last else {
            return Ok(s);
        };
        let mut b = self.batch();
        b.delete_range(
            Space::Inbox,
            self.inbox_key(inbox, s.oldest_seq).as_ref(),
            self.inbox_key(inbox, last + 1).as_ref(),
        );
        s.oldest_seq = last + 1;
        b.put(Space::Meta, self.meta_key(inbox).as_ref(), &encode_meta(&s));
        let Batch { wb, notes, raw, .. } = b;
        self.write(wb)?;
        self.committed(notes, raw);
        self.publish_states(&HashMap::from([(inbox, s)]));
        Ok(s)
    }

    fn sync(&self) -> Result<(), StoreError> {
        self.db.flush_wal(true)?;
        self.wal_syncs.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn health(&self) -> Option<StoreHealth> {
        Some(StoreHealth {
            pending_compaction_bytes: self
                .property_sum("rocksdb.estimate-pending-compaction-bytes"),
            write_stopped: self.property_int("rocksdb.is-write-stopped").unwrap_or(0) != 0,
            write_delayed: self
                .property_int("rocksdb.actual-delayed-write-rate")
                .unwrap_or(0)
                != 0,
            memtable_bytes: self.property_sum("rocksdb.cur-size-all-mem-tables"),
            block_cache_bytes: self.cache.get_usage() as u64,
            live_data_bytes: self.property_sum("rocksdb.estimate-live-data-size"),
            sst_bytes: self.property_sum("rocksdb.total-sst-files-size"),
            running_compactions: self
                .property_int("rocksdb.num-running-compactions")
                .unwrap_or(0),
            wal_syncs: self.wal_syncs.load(Ordering::Relaxed),
        })
    }

    fn transfer(&self) -> Option<&dyn SlotTransfer> {
        self.owner.is_some().then_some(self as &dyn SlotTransfer)
    }
}

impl SlotTransfer for RocksStore {
    fn serve_only(&self, runs: &[std::ops::Range<u16>]) {
        let _quiet = self.served.write().expect("served lock");
        let mut changed = [0u64; SLOTS / 64];
        for (word, bits) in self.served_bits.iter().enumerate() {
            let now = (0..64)
                .filter(|b| runs.iter().any(|r| r.contains(&((word * 64 + b) as u16))))
                .fold(0u64, |w, b| w | 1 << b);
            changed[word] = bits.swap(now, Ordering::SeqCst) ^ now;
        }
        // The states of slots that stopped being served are not this
        // store's to keep; those of slots served from now on are read
        // from disk afresh (what the copies imported).
        if changed.iter().any(|w| *w != 0) {
            self.forgotten.fetch_add(1, Ordering::SeqCst);
            let moved = |user: u64| {
                let slot = slot_of(user) as usize;
                changed[slot / 64] & (1 << (slot % 64)) != 0
            };
            for stripe in &self.states {
                stripe
                    .lock()
                    .expect("state lock")
                    .retain(|user, _| !moved(*user));
            }
        }
    }

    fn serves(&self, slot: u8) -> bool {
        self.slot_served(slot)
    }

    fn not_served(&self) -> u64 {
        self.not_served.load(Ordering::Relaxed)
    }

    fn watch(&self, slots: std::ops::Range<u16>) {
        // Once the writes under way have finished (they hold the served
        // set): every write after sees the watch and tells it what it
        // wrote; every write before is in what the export reads.
        let _quiet = self.served.write().expect("served lock");
        *self.watch.lock().expect("watch lock") = Some(Watch {
            slots,
            changes: SlotChanges::default(),
        });
        self.watching.store(true, Ordering::Release);
    }

    fn changes(&self) -> SlotChanges {
        self.watch
            .lock()
            .expect("watch lock")
            .as_mut()
            .map(|w| std::mem::take(&mut w.changes))
            .unwrap_or_default()
    }

    fn unwatch(&self) {
        self.watching.store(false, Ordering::Release);
        *self.watch.lock().expect("watch lock") = None;
    }

    fn export(
        &self,
        slots: std::ops::Range<u16>,
        from: Option<(Space, Vec<u8>)>,
        max_bytes: usize,
    ) -> Result<ExportChunk, StoreError> {
        let mut chunk = ExportChunk::default();
        let mut bytes = 0;
        let (first, mut start) = match from {
            Some((space, key)) => (space, Some(key)),
            None => (Space::Inbox, None),
        };
        for space in Space::ALL.into_iter().filter(|s| *s >= first) {
            let mut it = self.run_iterator(space, &slots);
            match start.take() {
                Some(k) => it.seek(k),
                None => it.seek_to_first(),
            }
            while it.valid() {
                let (Some(k), Some(v)) = (it.key(), it.value()) else {
                    break;
                };
                if bytes >= max_bytes {
                    chunk.next = Some((space, k.to_vec()));
                    return Ok(chunk);
                }
                bytes += k.len() + v.len();
                chunk.entries.push(RawEntry::Put {
                    space,
                    key: k.to_vec(),
                    value: v.to_vec(),
                });
                it.next();
            }
            it.status()?;
        }
        Ok(chunk)
    }

    fn read(&self, changes: &SlotChanges) -> Result<Vec<RawEntry>, StoreError> {
        let mut out: Vec<RawEntry> = changes
            .ranges
            .iter()
            .map(|(space, from, to)| RawEntry::DeleteRange {
                space: *space,
                from: from.clone(),
                to: to.clone(),
            })
            .collect();
        for (space, key) in &changes.keys {
            out.push(match self.db.get_cf(self.cf(space_cf(*space)), key)? {
                Some(value) => RawEntry::Put {
                    space: *space,
                    key: key.clone(),
                    value,
                },
                None => RawEntry::Delete {
                    space: *space,
                    key: key.clone(),
                },
            });
        }
        Ok(out)
    }

    fn import(&self, entries: &[RawEntry]) -> Result<(), StoreError> {
        let keys = entries.iter().map(|e| match e {
            RawEntry::Put { key, .. } | RawEntry::Delete { key, .. } => key,
            RawEntry::DeleteRange { from, .. } => from,
        });
        // Held to the end: a change of the served set waits for this
        // import, so no import lands in a slot after it became served.
        let served = self.served();
        for key in keys {
            if key.first().is_some_and(|s| self.slot_served(*s)) {
                return Err(StoreError::Layout(format!(
                    "slot {} is served here: an import goes only into slots not served",
                    key[0]
                )));
            }
        }
        let mut b = self.foreign_batch();
        for e in entries {
            match e {
                RawEntry::Put { space, key, value } => b.put(*space, key, value),
                RawEntry::Delete { space, key } => b.delete(*space, key),
                RawEntry::DeleteRange { space, from, to } => b.delete_range(*space, from, to),
            }
        }
        let mut opts = WriteOptions::default();
        opts.set_sync(true);
        self.db.write_opt(b.wb, &opts)?;
        // The inboxes written behind the cache: read from disk when next
        // touched.
        let users = entries.iter().filter_map(|e| match e {
            RawEntry::Put { space, key, .. } | RawEntry::Delete { space, key } => {
                matches!(space, Space::Inbox | Space::Meta).then(|| key.get(1..9))?
            }
            RawEntry::DeleteRange { space, from, .. } => {
                matches!(space, Space::Inbox | Space::Meta).then(|| from.get(1..9))?
            }
        });
        let users: Vec<u64> = users
            .map(|b| u64::from_be_bytes(b.try_into().expect("8 bytes")))
            .collect();
        self.forget_states(users.iter());
        drop(served);
        Ok(())
    }

    fn delete_slots(&self, slots: std::ops::Range<u16>) -> Result<(), StoreError> {
        let served = self.served();
        if let Some(s) = slots.clone().find(|s| self.slot_served(*s as u8)) {
            return Err(StoreError::Layout(format!(
                "slot {s} is served here: only slots not served are deleted"
            )));
        }
        let mut b = self.foreign_batch();
        for space in Space::ALL {
            b.delete_range(space, &slot_bound(slots.start), &slot_bound(slots.end));
        }
        let mut opts = WriteOptions::default();
        opts.set_sync(true);
        self.db.write_opt(b.wb, &opts)?;
        self.forget_all_states();
        drop(served);
        Ok(())
    }

    fn set_tap(&self, tap: Option<Arc<dyn WriteTap>>) {
        // Once the writes under way have finished (they hold the served set).
        let _quiet = self.served.write().expect("served lock");
        self.tapping.store(tap.is_some(), Ordering::Release);
        *self.tap.write().expect("tap lock") = tap;
    }

    fn digest(&self, slots: std::ops::Range<u16>, now_ms: u64) -> Result<Digest, StoreError> {
        let window = self.config.idempotency_window_ms;
        let mut digest = Digest::new();
        for space in Space::ALL {
            let mut it = self.run_iterator(space, &slots);
            it.seek_to_first();
            while it.valid() {
                let (Some(k), Some(v)) = (it.key(), it.value()) else {
                    break;
                };
                let stamp = || v.get(..8).map_or(0, |b| be_u64(b, 0));
                let live = match space {
                    Space::Idem => now_ms.saturating_sub(stamp()) <= window,
                    Space::Expiring => stamp() > now_ms,
                    _ => true,
                };
                if live {
                    digest.add(space, k, v);
                }
                it.next();
            }
            it.status()?;
        }
        Ok(digest)
    }

    fn count(&self, slots: std::ops::Range<u16>) -> Result<[u64; 5], StoreError> {
        let mut out = [0; 5];
        for space in Space::ALL {
            let mut it = self.run_iterator(space, &slots);
            it.seek_to_first();
            while it.valid() {
                out[space as usize] += 1;
                it.next();
            }
            it.status()?;
        }
        Ok(out)
    }
}

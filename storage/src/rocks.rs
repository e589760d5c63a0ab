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
//!
//! Why this shape:
//! - `meta` is written in the same atomic batch as the messages, so an
//!   inbox's head is known by one point read. Heads are loaded lazily on first
//!   touch and cached: opening the store reads nothing per user, so start-up
//!   time does not grow with the number of users.
//! - `inbox` uses an 8-byte prefix extractor (the user id) with a memtable
//!   prefix bloom, so range reads of one inbox skip other users' data; LZ4
//!   compresses the payloads, which are often small and repetitive.
//! - `idem` is only ever read by point lookups (bloom filter); a compaction
//!   filter drops entries older than the idempotency window so it stays small.
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
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::BytesMut;
use rocksdb::compaction_filter::Decision;
use rocksdb::{
    BlockBasedOptions, Cache, ColumnFamily, ColumnFamilyDescriptor, DBCompressionType, Options,
    ReadOptions, SliceTransform, WriteBatch, WriteOptions, DB,
};

use crate::model::*;
use crate::{InboxStore, StoreHealth};

const CF_INBOX: &str = "inbox";
const CF_META: &str = "meta";
const CF_IDEM: &str = "idem";
const CF_KV: &str = "kv";
const CF_EXPIRING: &str = "expiring";
const ALL_CFS: [&str; 6] = ["default", CF_INBOX, CF_META, CF_IDEM, CF_KV, CF_EXPIRING];
const META_LEN: usize = 24;
const IDEM_LEN: usize = 49;
/// Lock stripes for the head cache: enough that shards rarely contend.
const STRIPES: usize = 64;

pub struct RocksStore {
    pub(crate) db: DB,
    config: StoreConfig,
    write_opts: WriteOptions,
    /// Cached inbox states, striped by user id. Only the inbox's single writer
    /// changes an entry, after its write succeeded.
    states: Vec<Mutex<HashMap<u64, InboxState>>>,
    cache: Cache,
    /// Writes that synced the WAL.
    wal_syncs: AtomicU64,
}

fn inbox_key(user: u64, seq: u64) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&user.to_be_bytes());
    k[8..].copy_from_slice(&seq.to_be_bytes());
    k
}

/// 16 bytes for an unscoped key (the layout every existing entry has), 24
/// with a scope.
fn idem_key(key: IdempotencyKey) -> ([u8; 24], usize) {
    let mut k = [0u8; 24];
    k[..16].copy_from_slice(&inbox_key(key.sender, key.client_msg_id));
    if key.scope == 0 {
        (k, 16)
    } else {
        k[16..].copy_from_slice(&key.scope.to_be_bytes());
        (k, 24)
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

        let mut inbox_opts = Options::default();
        let mut inbox_table = BlockBasedOptions::default();
        inbox_table.set_block_cache(&cache);
        inbox_table.set_bloom_filter(10.0, false);
        inbox_opts.set_block_based_table_factory(&inbox_table);
        inbox_opts.set_prefix_extractor(SliceTransform::create_fixed_prefix(8));
        inbox_opts.set_memtable_prefix_bloom_ratio(0.1);
        inbox_opts.set_compression_type(DBCompressionType::Lz4);
        inbox_opts.set_write_buffer_size(64 << 20);

        let mut meta_opts = Options::default();
        let mut point_table = BlockBasedOptions::default();
        point_table.set_block_cache(&cache);
        point_table.set_bloom_filter(10.0, false);
        meta_opts.set_block_based_table_factory(&point_table);
        meta_opts.set_compression_type(DBCompressionType::Lz4);

        let mut idem_opts = Options::default();
        idem_opts.set_block_based_table_factory(&point_table);
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

        let mut kv_opts = Options::default();
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
        Ok(RocksStore {
            db,
            config,
            write_opts,
            states: (0..STRIPES).map(|_| Mutex::new(HashMap::new())).collect(),
            cache,
            wal_syncs: AtomicU64::new(0),
        })
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
        let state = match self
            .db
            .get_pinned_cf(self.cf(CF_META), user.to_be_bytes())?
        {
            Some(v) => decode_meta(&v)?,
            None => InboxState::default(),
        };
        // A concurrent reader may have loaded an older value from disk after
        // the writer published a newer one: keep whatever is cached already.
        Ok(*self
            .stripe(user)
            .lock()
            .expect("state lock")
            .entry(user)
            .or_insert(state))
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
        ro.set_iterate_upper_bound(inbox_key(user, u64::MAX).to_vec());
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

    /// Every raw key of the expiring space, expired or not (what is on disk).
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
            .get_pinned_cf(self.cf(CF_INBOX), inbox_key(at.log, at.seq))?
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

    fn put_kv(&self, wb: &mut WriteBatch, kv: &[KvOp]) {
        for op in kv {
            match op {
                KvOp::Put { key, value } => wb.put_cf(self.cf(CF_KV), key, value),
                KvOp::Delete { key } => wb.delete_cf(self.cf(CF_KV), key),
                KvOp::PutExpiring {
                    key,
                    expires_at_ms,
                    value,
                } => {
                    let mut v = Vec::with_capacity(8 + value.len());
                    v.extend_from_slice(&expires_at_ms.to_be_bytes());
                    v.extend_from_slice(value);
                    wb.put_cf(self.cf(CF_EXPIRING), key, v);
                }
                KvOp::DeleteExpiringRange { from, to } => {
                    wb.delete_range_cf(self.cf(CF_EXPIRING), from, to)
                }
            }
        }
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
        let mut wb = WriteBatch::default();
        let mut value = BytesMut::new();
        let idem_cf = self.cf(CF_IDEM);

        for m in batch {
            let r = &m.record;
            if let Some(key) = m.idempotency {
                let seen = match in_batch.get(&key) {
                    Some(&(p, tag, id)) => Some((p, tag, id)),
                    None => {
                        let (k, n) = idem_key(key);
                        let stored = self.db.get_pinned_cf(idem_cf, &k[..n])?;
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
            match m.form {
                Form::Reference(at) => wb.put_cf(
                    self.cf(CF_INBOX),
                    inbox_key(m.inbox, placement.seq),
                    encode_ref(at, r.timestamp_ms),
                ),
                Form::Record => {
                    value.clear();
                    r.encode(&mut value);
                    wb.put_cf(self.cf(CF_INBOX), inbox_key(m.inbox, placement.seq), &value);
                }
                Form::Copy(at) => {
                    value.clear();
                    encode_copy(at, r, &mut value);
                    wb.put_cf(self.cf(CF_INBOX), inbox_key(m.inbox, placement.seq), &value);
                }
            }
            if let Some(key) = m.idempotency {
                let entry = IdemEntry {
                    stored_at_ms: now_ms,
                    placement,
                    dest_tag: r.dest_tag,
                    dest_id: r.dest_id,
                };
                let (k, n) = idem_key(key);
                wb.put_cf(idem_cf, &k[..n], encode_idem(&entry));
                in_batch.insert(key, (placement, r.dest_tag, r.dest_id));
            }
            outcomes.push(AppendOutcome::Stored(placement));
        }
        for (user, s) in &touched {
            wb.put_cf(self.cf(CF_META), user.to_be_bytes(), encode_meta(s));
        }
        self.put_kv(&mut wb, kv);
        if wb.is_empty() {
            return Ok(outcomes);
        }
        if let Err(e) = self.write(wb) {
            // The cache never moved; drop the entries anyway so the next touch
            // re-reads the truth from disk.
            self.forget_states(touched.keys());
            return Err(e);
        }
        self.publish_states(&touched);
        Ok(outcomes)
    }

    fn write_lazy(&self, kv: &[KvOp]) -> Result<(), StoreError> {
        let mut wb = WriteBatch::default();
        self.put_kv(&mut wb, kv);
        let mut opts = WriteOptions::default();
        opts.set_sync(false);
        Ok(self.db.write_opt(wb, &opts)?)
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
        it.seek(inbox_key(inbox, after_seq + 1));
        while it.valid() && out.len() < limit {
            let (Some(k), Some(v)) = (it.key(), it.value()) else {
                break;
            };
            if k.len() != 16 || be_u64(k, 0) != inbox {
                break;
            }
            let seq = be_u64(k, 8);
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
        Ok(self.db.get_cf(self.cf(CF_KV), key)?)
    }

    fn scan(&self, prefix: &[u8], limit: usize) -> Result<KvPairs, StoreError> {
        self.scan_cf(CF_KV, prefix, limit)
    }

    fn scan_expiring(
        &self,
        prefix: &[u8],
        now_ms: u64,
        limit: usize,
    ) -> Result<ExpiringEntries, StoreError> {
        let mut out = Vec::new();
        for (k, v) in self.scan_cf(CF_EXPIRING, prefix, usize::MAX)? {
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
        let mut s = self.cached_state(inbox)?;
        let acked = up_to_seq.min(s.head_seq);
        if acked <= s.acked_seq {
            return Ok(s);
        }
        s.acked_seq = acked;
        let mut wb = WriteBatch::default();
        wb.put_cf(self.cf(CF_META), inbox.to_be_bytes(), encode_meta(&s));
        // An ack that is lost in a power failure only means redelivery (the
        // client de-duplicates by sequence), so it never waits for a sync.
        let mut opts = WriteOptions::default();
        opts.set_sync(false);
        self.db.write_opt(wb, &opts)?;
        self.publish_states(&HashMap::from([(inbox, s)]));
        Ok(s)
    }

    fn trim_acked(&self, inbox: u64, older_than_ms: u64) -> Result<InboxState, StoreError> {
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
            it.seek(inbox_key(inbox, s.oldest_seq));
            while it.valid() {
                let (Some(k), Some(v)) = (it.key(), it.value()) else {
                    break;
                };
                let seq = be_u64(k, 8);
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
        let mut wb = WriteBatch::default();
        wb.delete_range_cf(
            self.cf(CF_INBOX),
            inbox_key(inbox, s.oldest_seq),
            inbox_key(inbox, last + 1),
        );
        s.oldest_seq = last + 1;
        wb.put_cf(self.cf(CF_META), inbox.to_be_bytes(), encode_meta(&s));
        self.write(wb)?;
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
}

//! An in-memory inbox store with the same semantics as the RocksDB one
//! (nothing survives the process). For tests of broker logic.

use std::collections::{BTreeMap, HashMap};
use std::ops::Bound;
use std::sync::Mutex;

use crate::model::*;
use crate::InboxStore;

#[derive(Default)]
struct Inbox {
    state: InboxState,
    messages: BTreeMap<u64, Entry>,
}

#[derive(Clone)]
enum Entry {
    /// A record, and the log position it copies (a copy).
    Record(Record, Option<LogRef>),
    Ref(LogRef, u64),
}

impl Entry {
    fn timestamp_ms(&self) -> u64 {
        match self {
            Entry::Record(r, _) => r.timestamp_ms,
            Entry::Ref(_, ts) => *ts,
        }
    }
}

struct IdemEntry {
    stored_at_ms: u64,
    placement: Placement,
    dest_tag: u8,
    dest_id: u64,
}

#[derive(Default)]
struct Inner {
    inboxes: HashMap<u64, Inbox>,
    idem: HashMap<IdempotencyKey, IdemEntry>,
    kv: BTreeMap<Vec<u8>, Vec<u8>>,
    expiring: BTreeMap<Vec<u8>, (u64, Vec<u8>)>,
}

fn prefix_range<'a, V>(
    map: &'a BTreeMap<Vec<u8>, V>,
    prefix: &'a [u8],
) -> impl Iterator<Item = (&'a Vec<u8>, &'a V)> + 'a {
    map.range::<[u8], _>((Bound::Included(prefix), Bound::Unbounded))
        .take_while(move |(k, _)| k.starts_with(prefix))
}

pub struct MemoryStore {
    config: StoreConfig,
    inner: Mutex<Inner>,
    /// Messages returned by `read_after`, for tests of read costs.
    messages_read: std::sync::atomic::AtomicU64,
}

impl MemoryStore {
    pub fn new(config: StoreConfig) -> MemoryStore {
        MemoryStore {
            config,
            inner: Mutex::new(Inner::default()),
            messages_read: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// How many messages `read_after` has returned so far.
    pub fn messages_read(&self) -> u64 {
        self.messages_read
            .load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl InboxStore for MemoryStore {
    fn append_with(
        &self,
        batch: &[NewMessage],
        kv: &[KvOp],
        now_ms: u64,
    ) -> Result<Vec<AppendOutcome>, StoreError> {
        let mut inner = self.inner.lock().expect("memory store lock");
        let inner = &mut *inner;
        for op in kv {
            match op {
                KvOp::Put { key, value } => {
                    inner.kv.insert(key.clone(), value.clone());
                }
                KvOp::Delete { key } => {
                    inner.kv.remove(key);
                }
                KvOp::PutExpiring {
                    key,
                    expires_at_ms,
                    value,
                } => {
                    inner
                        .expiring
                        .insert(key.clone(), (*expires_at_ms, value.clone()));
                }
                KvOp::DeleteExpiringRange { from, to } => {
                    inner.expiring.retain(|k, _| {
                        k.as_slice() < from.as_slice() || k.as_slice() >= to.as_slice()
                    });
                }
                // After the appends, as the RocksDB store does.
                KvOp::Ack { .. } => {}
            }
        }
        let mut outcomes = Vec::with_capacity(batch.len());
        for m in batch {
            let r = &m.record;
            if let Some(key) = m.idempotency {
                if let Some(e) = inner.idem.get(&key) {
                    if now_ms.saturating_sub(e.stored_at_ms) <= self.config.idempotency_window_ms {
                        let same = e.dest_tag == r.dest_tag
                            && e.dest_id == r.dest_id
                            && e.placement.inbox == m.inbox;
                        outcomes.push(if same {
                            AppendOutcome::Duplicate(e.placement)
                        } else {
                            AppendOutcome::Conflict
                        });
                        continue;
                    }
                }
            }
            let inbox = inner.inboxes.entry(m.inbox).or_default();
            inbox.state.head_seq += 1;
            let placement = Placement {
                inbox: m.inbox,
                seq: inbox.state.head_seq,
                server_msg_id: r.server_msg_id,
                timestamp_ms: r.timestamp_ms,
            };
            let entry = match m.form {
                Form::Reference(at) => Entry::Ref(at, r.timestamp_ms),
                Form::Record => Entry::Record(r.clone(), None),
                Form::Copy(at) => Entry::Record(r.clone(), Some(at)),
            };
            inbox.messages.insert(placement.seq, entry);
            if let Some(key) = m.idempotency {
                inner.idem.insert(
                    key,
                    IdemEntry {
                        stored_at_ms: now_ms,
                        placement,
                        dest_tag: r.dest_tag,
                        dest_id: r.dest_id,
                    },
                );
            }
            outcomes.push(AppendOutcome::Stored(placement));
        }
        for op in kv {
            if let KvOp::Ack { inbox, up_to_seq } = op {
                inner
                    .inboxes
                    .entry(*inbox)
                    .or_default()
                    .state
                    .ack(*up_to_seq);
            }
        }
        Ok(outcomes)
    }

    fn read_after(
        &self,
        inbox: u64,
        after_seq: u64,
        limit: usize,
    ) -> Result<Vec<StoredMessage>, StoreError> {
        let inner = self.inner.lock().expect("memory store lock");
        let Some(i) = inner.inboxes.get(&inbox) else {
            return Ok(Vec::new());
        };
        let Some(start) = after_seq.checked_add(1) else {
            return Ok(Vec::new());
        };
        i.messages
            .range(start..)
            .take(limit)
            .map(|(seq, entry)| match entry {
                Entry::Record(record, via) => Ok(StoredMessage {
                    seq: *seq,
                    record: record.clone(),
                    via: *via,
                }),
                Entry::Ref(at, _) => match inner
                    .inboxes
                    .get(&at.log)
                    .and_then(|l| l.messages.get(&at.seq))
                {
                    Some(Entry::Record(record, None)) => Ok(StoredMessage {
                        seq: *seq,
                        record: record.clone(),
                        via: Some(*at),
                    }),
                    _ => Err(StoreError::Corrupt {
                        what: "inbox reference",
                        detail: format!("{at:?} does not name a stored record"),
                    }),
                },
            })
            .collect::<Result<Vec<_>, _>>()
            .inspect(|v| {
                self.messages_read
                    .fetch_add(v.len() as u64, std::sync::atomic::Ordering::Relaxed);
            })
    }

    fn erase(&self, inbox: u64, seqs: &[u64], kind: u8) -> Result<usize, StoreError> {
        let mut inner = self.inner.lock().expect("memory store lock");
        let Some(i) = inner.inboxes.get_mut(&inbox) else {
            return Ok(0);
        };
        let mut changed = 0;
        for seq in seqs {
            if let Some(Entry::Record(record, _)) = i.messages.get_mut(seq) {
                if let Some(erased) = record.erased(kind) {
                    *record = erased;
                    changed += 1;
                }
            }
        }
        Ok(changed)
    }

    fn write_lazy(&self, kv: &[KvOp]) -> Result<(), StoreError> {
        self.append_with(&[], kv, 0).map(|_| ())
    }

    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .inner
            .lock()
            .expect("memory store lock")
            .kv
            .get(key)
            .cloned())
    }

    fn scan(&self, prefix: &[u8], limit: usize) -> Result<KvPairs, StoreError> {
        let inner = self.inner.lock().expect("memory store lock");
        Ok(prefix_range(&inner.kv, prefix)
            .take(limit)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }

    fn scan_expiring(
        &self,
        prefix: &[u8],
        now_ms: u64,
        limit: usize,
    ) -> Result<ExpiringEntries, StoreError> {
        let inner = self.inner.lock().expect("memory store lock");
        Ok(prefix_range(&inner.expiring, prefix)
            .filter(|(_, (exp, _))| *exp > now_ms)
            .take(limit)
            .map(|(k, (exp, v))| (k.clone(), *exp, v.clone()))
            .collect())
    }

    fn state(&self, inbox: u64) -> Result<InboxState, StoreError> {
        let inner = self.inner.lock().expect("memory store lock");
        Ok(inner
            .inboxes
            .get(&inbox)
            .map(|i| i.state)
            .unwrap_or_default())
    }

    fn ack(&self, inbox: u64, up_to_seq: u64) -> Result<InboxState, StoreError> {
        let mut inner = self.inner.lock().expect("memory store lock");
        let i = inner.inboxes.entry(inbox).or_default();
        i.state.ack(up_to_seq);
        Ok(i.state)
    }

    fn trim_acked(&self, inbox: u64, older_than_ms: u64) -> Result<InboxState, StoreError> {
        let mut inner = self.inner.lock().expect("memory store lock");
        let i = inner.inboxes.entry(inbox).or_default();
        while let Some((&seq, r)) = i.messages.first_key_value() {
            if seq > i.state.acked_seq || r.timestamp_ms() >= older_than_ms {
                break;
            }
            i.messages.pop_first();
            i.state.oldest_seq = seq + 1;
        }
        Ok(i.state)
    }

    fn sync(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

//! The node's store as its shards and sessions see it, and the tap that
//! hands each committed write to the replication.

use super::*;

/// The store's tap: hands committed writes to the replication.
pub(super) struct Tapped(pub(super) Arc<Replication>);

impl WriteTap for Tapped {
    fn committed(&self, entries: Vec<RawEntry>) {
        self.0.committed(entries);
    }
}

/// The node's store as its shards and sessions see it: every write of a
/// replicated shard returns once its copies have it, and no reader sees a
/// message before then (a high watermark per inbox).
pub(super) struct ReplicatedStore {
    pub(super) replication: Arc<Replication>,
}

/// Inboxes with messages written here and not (yet) on every in-sync
/// copy: the first such sequence of each, and whether its write failed
/// to replicate (then it stays hidden until the shard's stream starts
/// again or the shard leaves this node: if the node stays primary, its
/// copies are copied again from it, and the write is theirs too).
#[derive(Default)]
pub(super) struct Unsettled {
    inboxes: Mutex<HashMap<u64, (u64, bool)>>,
    /// Counts releases: a write that failed while one happened is not
    /// hidden after it (its stream started again, or its shard left).
    releases: AtomicU64,
}

impl Unsettled {
    /// The first sequence of `inbox` that readers may not see yet.
    fn cut(&self, inbox: u64) -> Option<u64> {
        let inboxes = self.inboxes.lock().expect("unsettled lock");
        inboxes.get(&inbox).map(|(seq, _)| *seq)
    }

    /// Forgets what was hidden in the inboxes `inside` says are of shards
    /// whose stream started again or that left this node.
    pub(super) fn release(&self, inside: impl Fn(u64) -> bool) {
        let mut inboxes = self.inboxes.lock().expect("unsettled lock");
        self.releases.fetch_add(1, Ordering::AcqRel);
        inboxes.retain(|inbox, _| !inside(*inbox));
    }
}

impl ReplicatedStore {
    fn inner(&self) -> &dyn InboxStore {
        &*self.replication.inner
    }

    fn unsettled(&self) -> &Unsettled {
        &self.replication.unsettled
    }
}

impl InboxStore for ReplicatedStore {
    fn append_with(
        &self,
        batch: &[NewMessage],
        kv: &[KvOp],
        now_ms: u64,
    ) -> Result<Vec<AppendOutcome>, StoreError> {
        if !self.replication.tapping.load(Ordering::Acquire) || batch.is_empty() {
            let out = self.inner().append_with(batch, kv, now_ms);
            if out.is_err() {
                self.replication.forget_written();
                return out;
            }
            self.replication.settle()?;
            return out;
        }
        // Hidden from readers from before the write (each inbox has one
        // writer, this thread: its next sequence is known).
        let mut hidden = Vec::new();
        let releases = self.unsettled().releases.load(Ordering::Acquire);
        for m in batch {
            if hidden.contains(&m.inbox) {
                continue;
            }
            let next = self.inner().state(m.inbox)?.head_seq + 1;
            let mut inboxes = self.unsettled().inboxes.lock().expect("unsettled lock");
            if let std::collections::hash_map::Entry::Vacant(e) = inboxes.entry(m.inbox) {
                e.insert((next, false));
                hidden.push(m.inbox);
            }
        }
        let out = self.inner().append_with(batch, kv, now_ms);
        let settled = match &out {
            Ok(_) => self.replication.settle(),
            Err(_) => {
                self.replication.forget_written();
                Ok(())
            }
        };
        let mut inboxes = self.unsettled().inboxes.lock().expect("unsettled lock");
        let released = self.unsettled().releases.load(Ordering::Acquire) != releases;
        for inbox in hidden {
            match (&out, &settled) {
                (Ok(_), Err(_)) if !released => {
                    if let Some(e) = inboxes.get_mut(&inbox) {
                        e.1 = true;
                    }
                }
                _ => {
                    inboxes.remove(&inbox);
                }
            }
        }
        drop(inboxes);
        settled?;
        out
    }

    fn write_lazy(&self, kv: &[KvOp]) -> Result<(), StoreError> {
        let out = self.inner().write_lazy(kv);
        self.replication.forget_written();
        out
    }

    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner().get(key)
    }

    fn scan(&self, prefix: &[u8], limit: usize) -> Result<KvPairs, StoreError> {
        self.inner().scan(prefix, limit)
    }

    fn scan_slots(
        &self,
        prefix: &[u8],
        slots: Range<u16>,
        limit: usize,
    ) -> Result<KvPairs, StoreError> {
        self.inner().scan_slots(prefix, slots, limit)
    }

    fn scan_expiring(
        &self,
        prefix: &[u8],
        now_ms: u64,
        limit: usize,
    ) -> Result<ExpiringEntries, StoreError> {
        self.inner().scan_expiring(prefix, now_ms, limit)
    }

    fn read_after(
        &self,
        inbox: u64,
        after_seq: u64,
        limit: usize,
    ) -> Result<Vec<StoredMessage>, StoreError> {
        let mut read = self.inner().read_after(inbox, after_seq, limit)?;
        if let Some(cut) = self.unsettled().cut(inbox) {
            read.retain(|m| m.seq < cut);
        }
        Ok(read)
    }

    fn state(&self, inbox: u64) -> Result<InboxState, StoreError> {
        let mut state = self.inner().state(inbox)?;
        if let Some(cut) = self.unsettled().cut(inbox) {
            state.head_seq = state.head_seq.min(cut - 1);
        }
        Ok(state)
    }

    fn ack(&self, inbox: u64, up_to_seq: u64) -> Result<InboxState, StoreError> {
        let out = self.inner().ack(inbox, up_to_seq);
        self.replication.forget_written();
        out
    }

    fn trim_acked(&self, inbox: u64, older_than_ms: u64) -> Result<InboxState, StoreError> {
        let out = self.inner().trim_acked(inbox, older_than_ms);
        self.replication.forget_written();
        out
    }

    fn sync(&self) -> Result<(), StoreError> {
        self.inner().sync()
    }

    fn health(&self) -> Option<StoreHealth> {
        self.inner().health()
    }

    fn transfer(&self) -> Option<&dyn SlotTransfer> {
        self.inner().transfer()
    }
}

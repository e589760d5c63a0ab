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
/// copy: readers see none of an inbox's messages from its `cut` on.
///
/// A write in progress hides what it writes until it returns. A write
/// that failed to replicate stays hidden until it is safe to show: its
/// shard's stream at the same epoch has committed past it, or every other
/// member of the shard's in-sync set follows it since the write (each
/// copied the shard with the write in it; vacuously true when the primary
/// is alone in sync). Nothing else
/// shows it: not a renewed lease, not the shard leaving this node (its
/// run here is then read by nobody, see `readable`, and is deleted
/// before this node copies the shard again, which forgets the cut).
#[derive(Default)]
pub(super) struct Unsettled {
    inboxes: Mutex<HashMap<u64, Hidden>>,
}

/// What one inbox hides.
#[derive(Clone, Copy, Debug)]
pub(super) struct Hidden {
    /// The first sequence readers may not see.
    cut: u64,
    /// Writes to the inbox under way (each hides what it writes).
    writing: u32,
    /// The latest failed write: its shard's epoch and part (`u64::MAX`
    /// when it was never streamed: the primary was fenced).
    failed: Option<(i64, u64)>,
    /// The first follower id of the shard's stream given after that
    /// write: a copy following with it or a later one copied the shard
    /// with the write in it.
    followed_from: u64,
    /// When the latest failed write failed; `None` once said to be
    /// hidden long (said once: see [`HIDDEN_LONG`]).
    failed_at: Option<Instant>,
}

/// How long a failed write may stay hidden before it is logged: its
/// inbox's readers see nothing new and retries of what it wrote are
/// refused meanwhile, so a write that stays hidden is worth a warning.
const HIDDEN_LONG: Duration = Duration::from_secs(60);

/// Where a shard's stream stands, for what its failed writes hid.
#[derive(Clone, Copy, Debug)]
pub(super) struct StreamMark {
    pub(super) epoch: i64,
    pub(super) committed: u64,
    /// The oldest following among the other in-sync members (their
    /// lowest follower id; `u64::MAX` when the primary is alone in sync,
    /// 0 when one of them does not follow now).
    pub(super) followed_since: u64,
}

impl Unsettled {
    /// The first sequence of `inbox` that readers may not see yet.
    fn cut(&self, inbox: u64) -> Option<u64> {
        let inboxes = self.inboxes.lock().expect("unsettled lock");
        inboxes.get(&inbox).map(|h| h.cut)
    }

    /// Whether anything is hidden.
    pub(super) fn any(&self) -> bool {
        !self.inboxes.lock().expect("unsettled lock").is_empty()
    }

    /// Shows what failed writes hid where it became safe: `mark` says
    /// where the stream of an inbox's shard stands (`None`: not led here,
    /// or fenced).
    /// Returns the inboxes shown: what they hid was never pushed (its
    /// write failed), so their sessions must read it.
    pub(super) fn settle_failed(&self, mark: impl Fn(u64) -> Option<StreamMark>) -> Vec<u64> {
        let mut shown = Vec::new();
        let mut inboxes = self.inboxes.lock().expect("unsettled lock");
        inboxes.retain(|inbox, h| {
            let Some((epoch, lsn)) = h.failed.filter(|_| h.writing == 0) else {
                return true;
            };
            let now = mark(*inbox);
            let safe = now.is_some_and(|m| {
                m.epoch == epoch
                    && (m.followed_since >= h.followed_from
                        || (lsn != u64::MAX && m.committed >= lsn))
            });
            if safe {
                shown.push(*inbox);
            } else if h.failed_at.is_some_and(|at| at.elapsed() > HIDDEN_LONG) {
                h.failed_at = None;
                warn!(
                    inbox,
                    cut = h.cut,
                    failed_epoch = epoch,
                    failed_part = lsn,
                    followed_from = h.followed_from,
                    stream = ?now,
                    "a failed write has stayed hidden for {HIDDEN_LONG:?}: its inbox shows nothing new and retries of it are refused"
                );
            }
            !safe
        });
        shown
    }

    /// Forgets what was hidden in the inboxes `inside` says are of a run
    /// this node deleted (to copy it again).
    pub(super) fn forget(&self, inside: impl Fn(u64) -> bool) {
        let mut inboxes = self.inboxes.lock().expect("unsettled lock");
        inboxes.retain(|inbox, h| h.writing > 0 || !inside(*inbox));
    }
}

impl ReplicatedStore {
    fn inner(&self) -> &dyn InboxStore {
        &*self.replication.inner
    }

    fn unsettled(&self) -> &Unsettled {
        &self.replication.unsettled
    }

    /// Whether this node may show `inbox`'s messages: only while it serves
    /// the inbox's slot (with replication, a node that does not lead the
    /// shard, or leads it fenced, may hold writes the shard's primary
    /// never had: a reader here could take a message and resume past the
    /// different one the primary stores at that sequence).
    fn readable(&self, inbox: u64) -> Result<(), StoreError> {
        if !self.replication.tapping.load(Ordering::Acquire) {
            return Ok(());
        }
        match self.inner().transfer() {
            Some(t) if !t.serves(courier_storage::slot_of(inbox)) => Err(StoreError::Unreplicated(
                "the inbox's shard is not served here".into(),
            )),
            _ => Ok(()),
        }
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
        let mut inboxes_written: Vec<(u64, u64)> = Vec::new();
        for m in batch {
            if !inboxes_written.iter().any(|(i, _)| *i == m.inbox) {
                let next = self.inner().state(m.inbox)?.head_seq + 1;
                inboxes_written.push((m.inbox, next));
            }
        }
        // What was hidden before this write: a retry's original there was
        // not confirmed by the copies, so the retry is not answered as a
        // duplicate yet (its ack would promise a write the promoted copy
        // may lack).
        let mut hidden_before: Vec<(u64, u64)> = Vec::new();
        {
            let mut inboxes = self.unsettled().inboxes.lock().expect("unsettled lock");
            for &(inbox, next) in &inboxes_written {
                if let Some(h) = inboxes.get(&inbox) {
                    hidden_before.push((inbox, h.cut));
                }
                let h = inboxes.entry(inbox).or_insert(Hidden {
                    cut: next,
                    writing: 0,
                    failed: None,
                    followed_from: 0,
                    failed_at: None,
                });
                h.writing += 1;
            }
        }
        let out = self.inner().append_with(batch, kv, now_ms).map(|outcomes| {
            outcomes
                .into_iter()
                .map(|o| match o {
                    AppendOutcome::Duplicate(p)
                        if hidden_before
                            .iter()
                            .any(|(inbox, cut)| *inbox == p.inbox && p.seq >= *cut) =>
                    {
                        AppendOutcome::NotServed
                    }
                    o => o,
                })
                .collect()
        });
        // The parts this write produced: waited for, and on a failure
        // they say what it hid.
        let parts = take_written();
        let settled = match &out {
            Ok(_) => self.replication.settle_parts(&parts),
            Err(_) => Ok(()),
        };
        let failed = out.is_ok() && settled.is_err();
        // Only for a failure: the shard count, and the followings that
        // from here on copy the shard with this write in it.
        let (count, marks) = if failed {
            let marks = self.replication.follower_marks();
            (self.replication.shard_count(), marks)
        } else {
            (0, Vec::new())
        };
        let mut inboxes = self.unsettled().inboxes.lock().expect("unsettled lock");
        for (inbox, _) in inboxes_written {
            let std::collections::hash_map::Entry::Occupied(mut e) = inboxes.entry(inbox) else {
                continue;
            };
            let h = e.get_mut();
            h.writing -= 1;
            if failed {
                // Stored here, not confirmed by the copies: hidden until
                // safe to show (see `Unsettled`).
                let shard = shard_of_slot(courier_storage::slot_of(inbox), count.max(1));
                let part = parts
                    .iter()
                    .filter(|(s, _, _)| *s == shard)
                    .map(|(_, epoch, lsn)| (*epoch, *lsn))
                    .max_by_key(|(_, lsn)| *lsn)
                    .unwrap_or((-1, u64::MAX));
                h.failed = Some(match h.failed {
                    Some((epoch, lsn)) if epoch == part.0 => (epoch, lsn.max(part.1)),
                    _ => part,
                });
                h.followed_from = marks
                    .iter()
                    .find(|(s, _)| *s == shard)
                    .map_or(u64::MAX, |(_, m)| *m);
                h.failed_at = Some(Instant::now());
            }
            if h.writing == 0 && h.failed.is_none() {
                e.remove();
            }
        }
        drop(inboxes);
        settled?;
        out
    }

    fn erase(&self, inbox: u64, seqs: &[u64], kind: u8) -> Result<usize, StoreError> {
        // Entries already visible, rewritten in place: nothing to hide;
        // answered once the copies have the rewrite (a failure leaves it
        // here, and a retry of the erasure redoes it everywhere).
        let out = self.inner().erase(inbox, seqs, kind);
        if out.is_err() {
            self.replication.forget_written();
            return out;
        }
        self.replication.settle()?;
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
        self.readable(inbox)?;
        let mut read = self.inner().read_after(inbox, after_seq, limit)?;
        if let Some(cut) = self.unsettled().cut(inbox) {
            read.retain(|m| m.seq < cut);
        }
        Ok(read)
    }

    fn state(&self, inbox: u64) -> Result<InboxState, StoreError> {
        self.readable(inbox)?;
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

    fn acked_state(&self, inbox: u64, up_to_seq: u64) -> Result<InboxState, StoreError> {
        self.inner().acked_state(inbox, up_to_seq)
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

    fn hides(&self, inbox: u64) -> bool {
        self.unsettled().cut(inbox).is_some()
    }

    fn transfer(&self) -> Option<&dyn SlotTransfer> {
        self.inner().transfer()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hide(u: &Unsettled, inbox: u64, cut: u64, writing: u32, failed: Option<(i64, u64)>) {
        let h = Hidden {
            cut,
            writing,
            failed,
            followed_from: 5,
            failed_at: Some(Instant::now()),
        };
        u.inboxes.lock().unwrap().insert(inbox, h);
    }

    /// A stream at `epoch` that committed `committed`, its other in-sync
    /// members following since follower id 5 (`copied`) or before.
    fn mark(epoch: i64, committed: u64, copied: bool) -> Option<StreamMark> {
        Some(StreamMark {
            epoch,
            committed,
            followed_since: if copied { 5 } else { 4 },
        })
    }

    #[test]
    fn a_failed_write_shows_once_its_stream_committed_past_it_at_its_epoch() {
        let u = Unsettled::default();
        hide(&u, 7, 50, 0, Some((3, 10)));
        assert!(u.settle_failed(|_| None).is_empty()); // fenced, or not led here
        assert_eq!(u.cut(7), Some(50));
        assert!(u.settle_failed(|_| mark(3, 9, false)).is_empty());
        assert_eq!(u.cut(7), Some(50), "not committed yet");
        assert!(u.settle_failed(|_| mark(4, 20, false)).is_empty());
        assert_eq!(u.cut(7), Some(50), "another epoch's stream says nothing");
        // Shown, and told: no push carried what it hid.
        assert_eq!(u.settle_failed(|_| mark(3, 10, false)), vec![7]);
        assert_eq!(u.cut(7), None);
    }

    #[test]
    fn a_write_never_streamed_shows_only_once_every_copy_in_sync_copied_it() {
        let u = Unsettled::default();
        hide(&u, 7, 50, 0, Some((3, u64::MAX)));
        u.settle_failed(|_| mark(3, u64::MAX - 1, false));
        assert_eq!(u.cut(7), Some(50), "the copies never had it");
        u.settle_failed(|_| mark(3, 0, true));
        assert_eq!(u.cut(7), None, "they followed since, and copied it");
        // A write to a shard with no stream here shows never.
        hide(&u, 8, 5, 0, Some((-1, u64::MAX)));
        u.settle_failed(|_| mark(3, 100, true));
        assert_eq!(u.cut(8), Some(5));
    }

    #[test]
    fn a_write_under_way_keeps_the_cut_of_an_older_failure() {
        let u = Unsettled::default();
        hide(&u, 7, 50, 1, Some((3, 10)));
        u.settle_failed(|_| mark(3, 10, true));
        assert_eq!(u.cut(7), Some(50));
        u.forget(|_| true);
        assert_eq!(u.cut(7), Some(50), "its writer still counts on it");
    }

    #[test]
    fn deleting_a_run_forgets_what_its_failed_writes_hid() {
        let u = Unsettled::default();
        hide(&u, 7, 50, 0, Some((3, u64::MAX)));
        hide(&u, 8, 2, 0, Some((3, u64::MAX)));
        u.forget(|inbox| inbox == 7);
        assert_eq!(u.cut(7), None);
        assert_eq!(u.cut(8), Some(2));
        assert!(u.any());
    }
}

//! The primary's side: its stream of parts, the writers' wait, the in-sync
//! set's changes, and the requests of copies that follow it.

use super::*;

/// A shard this node leads: its stream of parts.
pub(super) struct Stream {
    pub(super) epoch: i64,
    /// The record's revision as last known (what an ISR change is
    /// conditioned on).
    pub(super) revision: i64,
    pub(super) replicas: Vec<String>,
    /// The copy a move removes (carried by this stream's ISR changes).
    pub(super) removing: Option<String>,
    /// The in-sync set in etcd, this node included.
    pub(super) isr: Vec<String>,
    /// A copy being added to the set: counted in the commit from before
    /// the transaction until it ends.
    pub(super) joining: Option<String>,
    /// The next part's number (the first is 1).
    pub(super) next_lsn: u64,
    /// Every copy parts go to, with the highest part it has applied.
    pub(super) followers: BTreeMap<String, Follower>,
    /// Source of the followers' ids.
    pub(super) next_follower: u64,
    /// An ISR change under way.
    pub(super) changing: bool,
    /// Why the stream takes and completes nothing (deposed, fenced).
    pub(super) broken: Option<&'static str>,
    /// When each part not yet committed was written, oldest first.
    pub(super) written_at: std::collections::VecDeque<(u64, Instant)>,
    /// The highest commit any writer may have seen: a copy joins the
    /// in-sync set only once it has applied this far.
    pub(super) high: u64,
    /// Whether the in-sync set in etcd is known to hold what this node
    /// shows: false for a stream that starts with others in the set (a
    /// restart: the store may hold writes the copies never had, no
    /// longer hidden) until the set first changes to what the stream
    /// wants; the shard is not served meanwhile.
    pub(super) confirmed: bool,
}

/// A copy that parts go to: which following of it this is (a copy that
/// starts again is another: what was sent to the one before counts for
/// nothing), and the highest part it has applied.
#[derive(Clone, Copy, Debug)]
pub(super) struct Follower {
    pub(super) id: u64,
    pub(super) applied: u64,
}

impl Stream {
    pub(super) fn new(me: &str, o: &Owner) -> Stream {
        let mut isr = o.isr.clone();
        if !isr.iter().any(|n| n == me) {
            isr.push(me.to_owned());
        }
        Stream {
            epoch: o.epoch,
            revision: o.revision,
            replicas: o.replicas.clone(),
            removing: o.removing.clone(),
            joining: None,
            next_lsn: 1,
            followers: BTreeMap::new(),
            next_follower: 1,
            changing: false,
            broken: None,
            written_at: Default::default(),
            high: 0,
            confirmed: isr.len() == 1,
            isr,
        }
    }

    /// The highest part every member that counts has applied.
    pub(super) fn committed(&self, me: &str) -> u64 {
        let head = self.next_lsn - 1;
        self.isr
            .iter()
            .chain(self.joining.iter())
            .filter(|n| *n != me)
            .map(|n| self.followers.get(n).map_or(0, |f| f.applied))
            .min()
            .unwrap_or(head)
            .min(head)
    }

    /// Takes a newer record of the shard at this stream's epoch (an
    /// in-sync set change, or the controller adding or removing a copy).
    /// A confirmed stream stays so: the record's set only lost members,
    /// or gained none this stream has not counted.
    pub(super) fn adopt(&mut self, me: &str, o: &Owner) {
        self.revision = o.revision;
        self.isr = o.isr.clone();
        self.replicas = o.replicas.clone();
        self.removing = o.removing.clone();
        // A copy the controller removed gets no more, and joins nothing:
        // counted in the commit as joining with no follower left, it
        // would hold every write of the shard until the next change of
        // the set (a drained node that catches up on a shard it no longer
        // leads, just as the controller removes its copy).
        self.followers.retain(|n, _| o.replicas.contains(n));
        if self
            .joining
            .as_ref()
            .is_some_and(|j| !o.replicas.contains(j))
        {
            self.joining = None;
        }
        self.confirmed |= self.isr == [me];
    }

    /// The in-sync set this stream wants: members it still sends to that
    /// are still copies (the controller may have removed one).
    pub(super) fn wanted_isr(&self, me: &str) -> Vec<String> {
        self.isr
            .iter()
            .filter(|n| *n == me || (self.followers.contains_key(*n) && self.replicas.contains(n)))
            .cloned()
            .collect()
    }
}

/// What an ISR change's answer did.
pub(super) enum Changed {
    Done,
    /// The stream is gone (the shard is not this node's any more).
    Gone,
    Deposed,
    Retry,
}

impl Replication {
    /// A write's entries, committed here: each shard's part goes to its
    /// followers, numbered.
    pub(super) fn committed(self: &Arc<Self>, entries: Vec<RawEntry>) {
        let mut p = self.primaries.lock().expect("primaries lock");
        let count = p.count;
        if count == 0 {
            return;
        }
        let mut parts: Vec<(u32, Vec<RawEntry>)> = Vec::new();
        for e in entries {
            let key = match &e {
                RawEntry::Put { key, .. } | RawEntry::Delete { key, .. } => key,
                RawEntry::DeleteRange { from, .. } => from,
            };
            let Some(&slot) = key.first() else { continue };
            let shard = shard_of_slot(slot, count);
            match parts.iter_mut().find(|(s, _)| *s == shard) {
                Some((_, part)) => part.push(e),
                None => parts.push((shard, vec![e])),
            }
        }
        // The fence watch looks every 50 ms; a write is checked itself (a
        // node resumed after a long pause writes before the watch runs).
        let fenced = p.fenced || self.cluster().is_some_and(|c| !c.lease_valid());
        if fenced && !p.fenced {
            p.skipped = true;
        }
        for (shard, part) in parts {
            let Some(s) = p.streams.get_mut(&shard) else {
                // A slot served with no stream (never meant to be: the
                // slots of a shard that left are fenced until the slots
                // follow the view): the writer is told it failed.
                WRITTEN.with(|w| w.borrow_mut().push((shard, -1, u64::MAX)));
                continue;
            };
            if fenced || s.broken.is_some() {
                // Told to the writer: its wait fails.
                WRITTEN.with(|w| w.borrow_mut().push((shard, s.epoch, u64::MAX)));
                continue;
            }
            let lsn = s.next_lsn;
            s.next_lsn += 1;
            WRITTEN.with(|w| w.borrow_mut().push((shard, s.epoch, lsn)));
            if s.followers.is_empty() {
                continue;
            }
            if s.isr.len() > 1 || s.joining.is_some() {
                // Counted once the copies in sync have it (`acked`).
                s.written_at.push_back((lsn, Instant::now()));
            }
            let body = Request::Replicate {
                lsn,
                entries: &part,
            }
            .encode(shard, s.epoch);
            let epoch = s.epoch;
            let followers: Vec<(String, u64)> =
                s.followers.iter().map(|(n, f)| (n.clone(), f.id)).collect();
            for (node, id) in followers {
                self.send_part(shard, epoch, (&node, id), lsn, body.clone());
            }
        }
    }

    /// Queues a part on the link to `node` now (in lsn order: the caller
    /// holds the primaries' lock) and sees to its answer.
    pub(super) fn send_part(
        self: &Arc<Self>,
        shard: u32,
        epoch: i64,
        (node, id): (&str, u64),
        lsn: u64,
        body: Bytes,
    ) {
        let peer = self.cluster().and_then(|c| c.links.peer(node));
        let started = peer.map(|p| p.start_request(body, PART_DEADLINE));
        self.metrics.parts_sent.inc();
        let Some(Ok((_, answer))) = started else {
            // The caller holds the primaries' lock: later.
            let (me, node) = (self.clone(), node.to_owned());
            self.runtime.spawn(async move {
                me.lost_follower(shard, epoch, (&node, id), "the link refused it")
            });
            return;
        };
        let me = self.clone();
        let node = node.to_owned();
        self.runtime.spawn(async move {
            match answer.await {
                Ok(b) => match Answer::decode(b) {
                    Ok(Answer::Done(mut b)) if b.remaining() >= 8 => {
                        let applied = b.get_u64();
                        me.acked(shard, epoch, (&node, id), applied);
                    }
                    Ok(Answer::Done(_)) => {
                        me.lost_follower(shard, epoch, (&node, id), "a short answer")
                    }
                    Ok(Answer::Refused(why)) => {
                        warn!(shard, node = %node, lsn, why, "a backup refused a part");
                        me.lost_follower(shard, epoch, (&node, id), "refused a part");
                    }
                    Err(e) => {
                        me.lost_follower(shard, epoch, (&node, id), &format!("bad answer: {e}"))
                    }
                },
                Err(e) => me.lost_follower(shard, epoch, (&node, id), &e.to_string()),
            }
        });
    }

    /// `node` (following as `id`) has applied parts of `shard` up to
    /// `applied`.
    pub(super) fn acked(&self, shard: u32, epoch: i64, (node, id): (&str, u64), applied: u64) {
        let mut p = self.primaries.lock().expect("primaries lock");
        let Some(s) = p.streams.get_mut(&shard).filter(|s| s.epoch == epoch) else {
            return;
        };
        if let Some(f) = s.followers.get_mut(node).filter(|f| f.id == id) {
            f.applied = f.applied.max(applied);
        }
        let committed = s.committed(&self.me);
        s.high = s.high.max(committed);
        while s.written_at.front().is_some_and(|(l, _)| *l <= committed) {
            let (_, at) = s.written_at.pop_front().expect("checked");
            self.metrics
                .commit_seconds
                .observe(at.elapsed().as_secs_f64());
        }
        drop(p);
        self.settled.notify_all();
    }

    /// `node` no longer takes `shard`'s parts: out of the followers, and
    /// out of the in-sync set if it was in it.
    pub(super) fn lost_follower(
        self: &Arc<Self>,
        shard: u32,
        epoch: i64,
        (node, id): (&str, u64),
        why: &str,
    ) {
        let in_set = {
            let mut p = self.primaries.lock().expect("primaries lock");
            let Some(s) = p.streams.get_mut(&shard).filter(|s| s.epoch == epoch) else {
                return;
            };
            if s.followers.get(node).is_none_or(|f| f.id != id) {
                return;
            }
            s.followers.remove(node);
            s.isr.iter().any(|n| n == node) || s.joining.as_deref() == Some(node)
        };
        warn!(
            shard,
            node,
            why,
            in_sync = in_set,
            "a copy stopped following the shard"
        );
        if in_set {
            self.change_isr(shard);
        }
    }

    /// Brings `shard`'s in-sync set in etcd to what its stream wants (its
    /// followers in the set, plus a joining copy), one change at a time.
    pub(super) fn change_isr(self: &Arc<Self>, shard: u32) {
        let me = self.clone();
        self.runtime
            .spawn(async move { me.run_isr_change(shard).await });
    }

    pub(super) async fn run_isr_change(self: Arc<Self>, shard: u32) {
        let Some(cluster) = self.cluster().cloned() else {
            return;
        };
        loop {
            let (owner, wanted, joining) = {
                let mut p = self.primaries.lock().expect("primaries lock");
                let Some(s) = p.streams.get_mut(&shard) else {
                    return;
                };
                if s.changing || s.broken.is_some() {
                    return;
                }
                let mut wanted = s.wanted_isr(&self.me);
                if let Some(j) = s.joining.clone() {
                    match s.followers.get(&j).filter(|_| s.replicas.contains(&j)) {
                        // In the set only once it holds every write a
                        // writer may have been told is committed (it
                        // counts in the commit from the moment it began
                        // joining, so it gets there).
                        Some(f) if f.applied >= s.high => {
                            if !wanted.contains(&j) {
                                wanted.push(j);
                            }
                        }
                        Some(_) => {}
                        None => s.joining = None,
                    }
                }
                if wanted == s.isr {
                    if s.joining.as_ref().is_some_and(|j| s.isr.contains(j)) {
                        s.joining = None;
                    }
                    return;
                }
                s.changing = true;
                let owner = Owner {
                    node: self.me.clone(),
                    epoch: s.epoch,
                    revision: s.revision,
                    replicas: s.replicas.clone(),
                    isr: s.isr.clone(),
                    removing: s.removing.clone(),
                };
                (owner, wanted, s.joining.clone())
            };
            let key = cluster.keys.shard(shard);
            let record = owner.with_isr(wanted.clone());
            let txn = Txn::new()
                .when([Compare::mod_revision(
                    key.clone(),
                    CompareOp::Equal,
                    owner.revision,
                )])
                .and_then([TxnOp::put(
                    key.clone(),
                    serde_json::to_vec(&record).expect("a record serializes"),
                    None,
                )])
                .or_else([TxnOp::get(key, None)]);
            let mut client = cluster.etcd();
            let answer = within("change a shard's in-sync set", client.txn(txn)).await;
            match self.isr_changed(shard, &owner, &wanted, joining, answer) {
                Changed::Done => {
                    self.settled.notify_all();
                    // A stream confirmed by it serves.
                    self.fence_shards();
                }
                Changed::Gone => return,
                Changed::Deposed => {
                    self.settled.notify_all();
                    self.fence_shards();
                    return;
                }
                Changed::Retry => tokio::time::sleep(Duration::from_millis(500)).await,
            }
        }
    }

    /// Takes the answer of an ISR change into the stream.
    pub(super) fn isr_changed(
        &self,
        shard: u32,
        owner: &Owner,
        wanted: &[String],
        joining: Option<String>,
        answer: anyhow::Result<etcd_client::TxnResponse>,
    ) -> Changed {
        let mut p = self.primaries.lock().expect("primaries lock");
        let Some(s) = p.streams.get_mut(&shard).filter(|s| s.epoch == owner.epoch) else {
            return Changed::Gone;
        };
        s.changing = false;
        match answer {
            Ok(a) if a.succeeded() => {
                let grew = wanted.len() > s.isr.len();
                s.revision = a.header().map_or(s.revision, |h| h.revision());
                s.isr = wanted.to_vec();
                s.confirmed = true;
                if joining.is_some() && s.joining == joining {
                    s.joining = None;
                }
                if grew {
                    self.metrics.isr_expands.inc();
                } else {
                    self.metrics.isr_shrinks.inc();
                }
                info!(shard, isr = ?wanted, "the shard's in-sync set changed");
                Changed::Done
            }
            Ok(a) => {
                // Someone else wrote the record: the controller (a
                // failover), so this node is deposed; or a revision this
                // stream had not taken yet.
                let now = a.op_responses().into_iter().find_map(|r| match r {
                    etcd_client::TxnOpResponse::Get(g) => g.kvs().first().map(|kv| {
                        (
                            kv.mod_revision(),
                            serde_json::from_slice::<crate::cluster::view::ShardRecord>(kv.value()),
                        )
                    }),
                    _ => None,
                });
                match now {
                    // Same primary and epoch: the controller added or
                    // removed a copy.
                    Some((rev, Ok(r)))
                        if r.owner == self.me && r.epoch.unwrap_or(rev) == s.epoch =>
                    {
                        s.adopt(&self.me, &Owner::from_record(r, rev));
                        Changed::Done
                    }
                    _ => {
                        warn!(shard, "the shard's record changed under this primary: deposed, no longer serving it");
                        s.broken = Some("deposed");
                        Changed::Deposed
                    }
                }
            }
            Err(e) => {
                warn!(shard, error = %format!("{e:#}"), "cannot change the shard's in-sync set yet; retrying");
                Changed::Retry
            }
        }
    }

    /// Waits until every part this thread's writes produced is on every
    /// in-sync copy.
    pub(super) fn settle(&self) -> Result<(), StoreError> {
        self.settle_parts(&take_written())
    }

    /// Waits until every part in `written` (a write's, as
    /// [`take_written`] gave them) is on every in-sync copy.
    pub(super) fn settle_parts(&self, written: &[(u32, i64, u64)]) -> Result<(), StoreError> {
        if written.is_empty() {
            return Ok(());
        }
        let deadline = Instant::now() + SETTLE_LIMIT;
        let mut p = self.primaries.lock().expect("primaries lock");
        for &(shard, epoch, lsn) in written {
            loop {
                let s = p.streams.get(&shard).filter(|s| s.epoch == epoch);
                let Some(s) = s.filter(|s| s.broken.is_none() && lsn != u64::MAX) else {
                    return Err(StoreError::Unreplicated(format!(
                        "shard {shard} is not served here any more"
                    )));
                };
                if p.fenced {
                    return Err(StoreError::Unreplicated(
                        "this node may have lost its lease".into(),
                    ));
                }
                let committed = s.committed(&self.me);
                if committed >= lsn {
                    if let Some(s) = p.streams.get_mut(&shard) {
                        s.high = s.high.max(committed);
                    }
                    break;
                }
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(StoreError::Unreplicated(format!(
                        "shard {shard}'s copies did not confirm in {SETTLE_LIMIT:?}"
                    )));
                }
                p = self
                    .settled
                    .wait_timeout(p, left.min(Duration::from_millis(100)))
                    .expect("primaries lock")
                    .0;
            }
        }
        Ok(())
    }

    /// A copy asks to follow `shard`: out of the in-sync set first if it
    /// is in it (it deletes its copy next), then parts go to it from now.
    pub(super) async fn serve_follow(
        self: Arc<Self>,
        from: String,
        shard: u32,
        epoch: i64,
    ) -> Answer {
        let deadline = Instant::now() + ASK_DEADLINE;
        loop {
            {
                let mut p = self.primaries.lock().expect("primaries lock");
                let fenced = p.fenced;
                let Some(s) = p.streams.get_mut(&shard).filter(|s| s.epoch == epoch) else {
                    return Answer::Refused(format!("not the primary of shard {shard} at {epoch}"));
                };
                if fenced || s.broken.is_some() {
                    return Answer::Refused("this primary is fenced".into());
                }
                s.followers.remove(&from);
                if s.joining.as_deref() == Some(from.as_str()) {
                    s.joining = None;
                }
                let in_set = s.isr.contains(&from);
                if !in_set && !s.changing {
                    let id = s.next_follower;
                    s.next_follower += 1;
                    s.followers
                        .insert(from.clone(), Follower { id, applied: 0 });
                    let start = s.next_lsn;
                    info!(shard, node = %from, start, "a copy follows the shard");
                    let mut answer = BytesMut::with_capacity(16);
                    answer.put_u64(start);
                    answer.put_u64(id);
                    return Answer::Done(answer.freeze());
                }
            }
            self.change_isr(shard);
            if Instant::now() > deadline {
                return Answer::Refused("the in-sync set could not be changed in time".into());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Reads a chunk of `shard` for a copy (blocking).
    pub(super) fn serve_chunk(
        &self,
        shard: u32,
        epoch: i64,
        from: Option<(Space, Vec<u8>)>,
    ) -> Answer {
        let count = {
            let p = self.primaries.lock().expect("primaries lock");
            match p.streams.get(&shard) {
                Some(s) if s.epoch == epoch && s.broken.is_none() => p.count,
                _ => {
                    return Answer::Refused(format!("not the primary of shard {shard} at {epoch}"))
                }
            }
        };
        let Some(t) = self.inner.transfer() else {
            return Answer::Refused("no slotted store".into());
        };
        match t.export(slots_of_shard(shard, count), from, CHUNK_BYTES) {
            Ok(chunk) => {
                let mut out = BytesMut::new();
                put_at(&mut out, &chunk.next);
                put_entries(&mut out, &chunk.entries);
                Answer::Done(out.freeze())
            }
            Err(e) => Answer::Refused(format!("reading the shard: {e}")),
        }
    }

    /// Where a copy stands: 0 not following (start again), 1 following,
    /// 2 in the in-sync set. A copy that has applied enough is added.
    pub(super) fn serve_status(
        self: &Arc<Self>,
        from: &str,
        shard: u32,
        epoch: i64,
        (id, applied): (u64, u64),
    ) -> Answer {
        let state = {
            let mut p = self.primaries.lock().expect("primaries lock");
            let fenced = p.fenced;
            match p.streams.get_mut(&shard).filter(|s| s.epoch == epoch) {
                Some(s) if !fenced && s.broken.is_none() => {
                    match s.followers.get_mut(from).filter(|f| f.id == id) {
                        None => 0u8,
                        Some(f) => {
                            f.applied = f.applied.max(applied);
                            let a = f.applied;
                            if s.isr.iter().any(|n| n == from) {
                                2
                            } else {
                                if s.joining.is_none()
                                    && !s.changing
                                    && s.replicas.iter().any(|n| n == from)
                                    && a + JOIN_LAG >= s.next_lsn - 1
                                {
                                    s.joining = Some(from.to_owned());
                                }
                                1
                            }
                        }
                    }
                }
                _ => 0,
            }
        };
        if state == 1 {
            self.change_isr(shard);
        }
        Answer::Done(Bytes::copy_from_slice(&[state]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner(replicas: &[&str], isr: &[&str], revision: i64) -> Owner {
        let names = |v: &[&str]| v.iter().map(|n| n.to_string()).collect();
        Owner {
            node: "a".into(),
            epoch: 7,
            revision,
            replicas: names(replicas),
            isr: names(isr),
            removing: None,
        }
    }

    fn following(s: &mut Stream, node: &str, applied: u64) {
        let id = s.next_follower;
        s.next_follower += 1;
        s.followers.insert(node.into(), Follower { id, applied });
    }

    /// A drain removes a copy that was catching up to join the in-sync
    /// set: the writes of the shard no longer wait for it (before, the
    /// commit counted the joining copy, whose follower was gone, as 0:
    /// every write waited its 30 s and failed, until the set next changed).
    #[test]
    fn a_joining_copy_the_controller_removes_holds_no_commit() {
        let mut s = Stream::new("a", &owner(&["a", "b", "c", "d"], &["a", "b", "c"], 10));
        s.next_lsn = 101;
        following(&mut s, "b", 100);
        following(&mut s, "c", 90);
        following(&mut s, "d", 40);
        s.joining = Some("d".into());
        assert_eq!(s.committed("a"), 40, "the joining copy counts");

        s.adopt("a", &owner(&["a", "b", "c"], &["a", "b", "c"], 11));
        assert_eq!(s.joining, None);
        assert_eq!(s.committed("a"), 90, "the in-sync copies alone");
        assert_eq!(s.wanted_isr("a"), s.isr);
    }

    /// A copy still in the record keeps joining through a change of the
    /// record (another copy removed): it counts until it is in the set.
    #[test]
    fn a_joining_copy_still_a_replica_keeps_counting() {
        let mut s = Stream::new("a", &owner(&["a", "b", "c", "d"], &["a", "b"], 10));
        s.next_lsn = 101;
        following(&mut s, "b", 100);
        following(&mut s, "d", 40);
        s.joining = Some("d".into());
        s.adopt("a", &owner(&["a", "b", "d"], &["a", "b"], 11));
        assert_eq!(s.joining.as_deref(), Some("d"));
        assert_eq!(s.committed("a"), 40);
    }
}

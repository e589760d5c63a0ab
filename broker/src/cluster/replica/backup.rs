//! The backup's side: a copy of a shard (follow, delete, chunks, buffered
//! parts), its tail of the primary's parts, and their applier.

use super::*;

/// A part on its way to a backup's store.
pub(super) struct Part {
    pub(super) lsn: u64,
    pub(super) entries: Vec<RawEntry>,
    pub(super) answer: Option<oneshot::Sender<Result<u64, String>>>,
}

/// A backup's copy of one shard: where its parts come from.
pub(super) struct Tail {
    pub(super) primary: String,
    pub(super) epoch: i64,
    /// Copying: parts are kept until the copy is done.
    pub(super) buffering: Option<Vec<Part>>,
    pub(super) buffered_bytes: usize,
    /// The last part taken (buffered or applied); `None`: any may come
    /// first (before the primary has said where the copy starts).
    pub(super) last: Option<u64>,
    /// Applied parts go here, in order (while tailing).
    pub(super) apply: Option<mpsc::UnboundedSender<Part>>,
    /// The highest part applied, durably.
    pub(super) applied: Arc<AtomicU64>,
    /// Which incarnation of the copy this is.
    pub(super) id: u64,
    /// The primary's id for this following (0 until it answered).
    pub(super) follower: u64,
    /// Open while the copy is current: its applier imports only while
    /// holding it open, so closing it (the copy dropped) waits for an
    /// import under way and stops any later one (a promoted copy serves
    /// no stale part; a copy started again deletes nothing an old applier
    /// then writes back).
    pub(super) gate: Arc<Mutex<bool>>,
}

impl Tail {
    /// Stops the copy's applier (waiting for an import under way).
    pub(super) fn close(&self) {
        *self.gate.lock().expect("gate lock") = false;
    }
}

impl Replication {
    /// A part from `from`: refused unless this node copies `shard` from
    /// that primary at that epoch and the part is the next one.
    pub(super) fn take_part(
        &self,
        from: &str,
        shard: u32,
        epoch: i64,
        lsn: u64,
        entries: Vec<RawEntry>,
    ) -> Result<oneshot::Receiver<Result<u64, String>>, String> {
        let mut tails = self.tails.lock().expect("tails lock");
        let Some(t) = tails.get_mut(&shard) else {
            return Err(format!("not copying shard {shard}"));
        };
        if t.primary != from || t.epoch != epoch {
            return Err(format!(
                "copying shard {shard} from {} at {}, not {from} at {epoch}",
                t.primary, t.epoch
            ));
        }
        if let Some(last) = t.last.filter(|l| lsn != l + 1) {
            let why = format!("part {lsn} after {last}: a gap");
            if let Some(t) = tails.remove(&shard) {
                t.close();
            }
            return Err(why);
        }
        t.last = Some(lsn);
        let (tx, rx) = oneshot::channel();
        if let Some(buffer) = t.buffering.as_mut() {
            t.buffered_bytes += crate::cluster::transfer::entries_len(&entries);
            if t.buffered_bytes > BUFFER_MAX_BYTES {
                if let Some(t) = tails.remove(&shard) {
                    t.close();
                }
                return Err("too much written while copying; starting again".into());
            }
            buffer.push(Part {
                lsn,
                entries,
                answer: None,
            });
            // Not applied yet: the primary counts it once the copy is done.
            let _ = tx.send(Ok(0));
            return Ok(rx);
        }
        let part = Part {
            lsn,
            entries,
            answer: Some(tx),
        };
        match t.apply.as_ref().map(|a| a.send(part)) {
            Some(Ok(())) => Ok(rx),
            _ => {
                if let Some(t) = tails.remove(&shard) {
                    t.close();
                }
                Err("the copy's applier stopped".into())
            }
        }
    }

    /// Keeps this node's copy of `shard` following its primary for as long
    /// as the view makes it a backup; deletes the copy once the view no
    /// longer names this node among the shard's copies (the controller
    /// removed it, or it was removed while this node was away).
    pub(super) async fn backup(self: Arc<Self>, cluster: Arc<Cluster>, shard: u32) {
        loop {
            let removed = self.follow_copy(&cluster, shard).await;
            self.drop_tail(shard, None);
            if let Some(run) = removed {
                self.delete_copy(shard, run).await;
            }
            // A view that made this node a copy again meanwhile found this
            // task running and started none: go on here. The view `follow`
            // was last given, under its lock (see `Following`).
            let mut following = self.following.lock().expect("following lock");
            let view = following.view.clone();
            let again = !cluster.stop.is_cancelled()
                && view.replication() > 1
                && view
                    .owners
                    .get(shard as usize)
                    .and_then(|o| o.as_ref())
                    .is_some_and(|o| o.node != self.me && o.replicas.contains(&self.me));
            if !again {
                following.shards.remove(&shard);
                return;
            }
        }
    }

    /// Follows `shard`'s primary while this node is one of its copies;
    /// returns the shard's run once the view names this node no copy of
    /// it (None: it stopped for another reason).
    async fn follow_copy(&self, cluster: &Arc<Cluster>, shard: u32) -> Option<Range<u16>> {
        loop {
            if cluster.stop.is_cancelled() {
                break None;
            }
            let view = self.followed_view();
            let Some(o) = view.owners.get(shard as usize).and_then(|o| o.clone()) else {
                break None;
            };
            if o.node == self.me || view.replication() <= 1 {
                break None;
            }
            if !o.replicas.contains(&self.me) {
                break Some(slots_of_shard(shard, view.owners.len() as u32));
            }
            if !view.nodes.contains_key(&o.node) {
                // The primary is gone: wait for the controller.
                tokio::time::sleep(STATUS_EVERY).await;
                continue;
            }
            let run = slots_of_shard(shard, view.owners.len() as u32);
            debug!(shard, primary = %o.node, epoch = o.epoch, "copying the shard from its primary");
            match self.copy(cluster, shard, &o, run).await {
                Ok(id) => self.tail(cluster, shard, &o, id).await,
                Err(e) => {
                    warn!(shard, primary = %o.node, error = %format!("{e:#}"), "copying the shard failed; trying again");
                    self.drop_tail(shard, None);
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }

    /// Deletes this node's copy of a shard it is no copy of any more (not
    /// served here; the task deleting it holds the shard's place in
    /// `following`, so no copy of it starts meanwhile).
    async fn delete_copy(&self, shard: u32, run: Range<u16>) {
        if let Err(e) = self.delete_run(run).await {
            warn!(shard, error = %format!("{e:#}"), "deleting a removed copy failed");
        }
    }

    /// Deletes this node's run of a shard (to copy it again, or for good),
    /// and with it what its failed writes hid there.
    async fn delete_run(&self, run: Range<u16>) -> anyhow::Result<()> {
        let store = self.inner.clone();
        let deleting = run.clone();
        tokio::task::spawn_blocking(move || {
            store.transfer().expect("slotted").delete_slots(deleting)
        })
        .await??;
        self.unsettled
            .forget(|inbox| run.contains(&u16::from(courier_storage::slot_of(inbox))));
        Ok(())
    }

    pub(super) fn drop_tail(&self, shard: u32, id: Option<u64>) {
        let mut tails = self.tails.lock().expect("tails lock");
        if tails
            .get(&shard)
            .is_some_and(|t| id.is_none_or(|id| t.id == id))
        {
            if let Some(t) = tails.remove(&shard) {
                t.close();
            }
        }
    }

    /// Copies `shard` from its primary: follow (parts buffered from now),
    /// delete this node's copy, import the chunks, apply the buffered
    /// parts, then tail. Returns the tail's id.
    pub(super) async fn copy(
        &self,
        cluster: &Arc<Cluster>,
        shard: u32,
        o: &Owner,
        run: Range<u16>,
    ) -> anyhow::Result<u64> {
        let peer = cluster
            .links
            .peer(&o.node)
            .ok_or_else(|| anyhow::anyhow!("no link to {}", o.node))?;
        let id = self.next_tail.fetch_add(1, Ordering::Relaxed);
        let applied = Arc::new(AtomicU64::new(0));
        let gate = Arc::new(Mutex::new(true));
        self.tails.lock().expect("tails lock").insert(
            shard,
            Tail {
                primary: o.node.clone(),
                epoch: o.epoch,
                buffering: Some(Vec::new()),
                buffered_bytes: 0,
                last: None,
                apply: None,
                applied: applied.clone(),
                id,
                follower: 0,
                gate: gate.clone(),
            },
        );
        self.metrics.rebuilds.inc();
        let started = Instant::now();
        let answer = peer
            .request(Request::Follow.encode(shard, o.epoch), ASK_DEADLINE)
            .await?;
        let mut b = Answer::decode(answer)?.done()?;
        wire::need(&b, 16)?;
        let start = b.get_u64();
        let follower = b.get_u64();
        {
            // From here every part must follow the one before, from the
            // first the primary sends this copy.
            let mut tails = self.tails.lock().expect("tails lock");
            let t = tails
                .get_mut(&shard)
                .filter(|t| t.id == id)
                .ok_or_else(|| anyhow::anyhow!("the copy was called off"))?;
            t.follower = follower;
            match t.buffering.as_ref().and_then(|b| b.first()) {
                Some(first) => anyhow::ensure!(
                    first.lsn == start,
                    "the first part buffered is {}, the copy starts at {start}",
                    first.lsn
                ),
                None => t.last = Some(start.saturating_sub(1)),
            }
        }
        self.delete_run(run.clone()).await?;
        let mut from = None;
        let mut chunks = 0;
        loop {
            let answer = peer
                .request(
                    Request::Chunk { from: &from }.encode(shard, o.epoch),
                    ASK_DEADLINE,
                )
                .await?;
            let mut b = Answer::decode(answer)?.done()?;
            let next = get_at(&mut b)?;
            let entries = get_entries(&mut b)?;
            let store = self.inner.clone();
            tokio::task::spawn_blocking(move || {
                store.transfer().expect("slotted").import(&entries)
            })
            .await??;
            chunks += 1;
            match next {
                Some(n) => from = Some(n),
                None => break,
            }
        }
        // The buffered parts, then tailing: one applier, parts in order.
        let (tx, rx) = mpsc::unbounded_channel();
        let buffered = {
            let mut tails = self.tails.lock().expect("tails lock");
            let t = tails
                .get_mut(&shard)
                .filter(|t| t.id == id)
                .ok_or_else(|| {
                    anyhow::anyhow!("the copy was called off (a gap, or the view changed)")
                })?;
            let parts = t.buffering.take().unwrap_or_default();
            t.apply = Some(tx.clone());
            parts
        };
        // The chunks hold every part before `start` (each was committed
        // at the primary before this copy followed it): a copy to which
        // nothing was written since is caught up with them.
        applied.fetch_max(start.saturating_sub(1), Ordering::AcqRel);
        let count = buffered.len();
        for part in buffered {
            let _ = tx.send(part);
        }
        drop(tx);
        self.runtime.spawn(apply(
            self.inner.clone(),
            rx,
            (applied, gate),
            self.metrics.parts_applied.clone(),
        ));
        info!(
            shard,
            primary = %o.node,
            chunks,
            buffered = count,
            ms = started.elapsed().as_millis() as u64,
            "copied the shard; tailing its primary"
        );
        Ok(id)
    }

    /// Tells the primary where this copy stands every [`STATUS_EVERY`]
    /// until it is not following any more (a gap, the primary says so, a
    /// new view).
    pub(super) async fn tail(&self, cluster: &Arc<Cluster>, shard: u32, o: &Owner, id: u64) {
        let mut in_sync = false;
        loop {
            tokio::time::sleep(STATUS_EVERY).await;
            let (applied, follower) = {
                let tails = self.tails.lock().expect("tails lock");
                match tails.get(&shard).filter(|t| t.id == id) {
                    Some(t) => (t.applied.load(Ordering::Acquire), t.follower),
                    None => return,
                }
            };
            let Some(peer) = cluster.links.peer(&o.node) else {
                return;
            };
            let answer = peer
                .request(
                    Request::Status { applied, follower }.encode(shard, o.epoch),
                    ASK_DEADLINE,
                )
                .await;
            let state = match answer.map_err(anyhow::Error::from).and_then(|b| {
                let b = Answer::decode(b)?.done()?;
                Ok(b.first().copied().unwrap_or(0))
            }) {
                Ok(s) => s,
                Err(e) => {
                    warn!(shard, error = %format!("{e:#}"), "the shard's primary did not answer a status");
                    0
                }
            };
            match state {
                0 => {
                    self.drop_tail(shard, Some(id));
                    return;
                }
                2 if !in_sync => {
                    in_sync = true;
                    info!(shard, primary = %o.node, applied, "this copy of the shard is in sync");
                }
                _ => {}
            }
        }
    }
}

/// Applies a copy's parts in order: everything queued in one synced
/// import, then each part's answer (the highest applied).
pub(super) async fn apply(
    store: Arc<dyn InboxStore>,
    mut rx: mpsc::UnboundedReceiver<Part>,
    (applied, gate): (Arc<AtomicU64>, Arc<Mutex<bool>>),
    count: IntCounter,
) {
    let mut parts = Vec::new();
    while rx.recv_many(&mut parts, 256).await > 0 {
        let batch: Vec<Part> = std::mem::take(&mut parts);
        let (s, gate) = (store.clone(), gate.clone());
        let result = tokio::task::spawn_blocking(move || {
            let open = gate.lock().expect("gate lock");
            if !*open {
                let closed = StoreError::Unreplicated("the copy was dropped".into());
                return (batch, Err(closed));
            }
            let entries: Vec<RawEntry> = batch.iter().flat_map(|p| p.entries.clone()).collect();
            let r = s.transfer().expect("slotted").import(&entries);
            drop(open);
            (batch, r)
        })
        .await;
        let Ok((batch, result)) = result else { return };
        match result {
            Ok(()) => {
                let last = batch.last().map_or(0, |p| p.lsn);
                applied.store(last, Ordering::Release);
                count.inc_by(batch.len() as u64);
                for p in batch {
                    if let Some(a) = p.answer {
                        let _ = a.send(Ok(last));
                    }
                }
            }
            Err(e) => {
                warn!(error = %e, "applying a shard's parts failed; the copy stops");
                for p in batch {
                    if let Some(a) = p.answer {
                        let _ = a.send(Err(format!("applying failed: {e}")));
                    }
                }
                return;
            }
        }
    }
}

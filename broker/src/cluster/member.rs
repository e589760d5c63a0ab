//! Membership: the node's registration under its lease, the lease's
//! renewal, and the watch that keeps the node's view of the cluster.

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use etcd_client::{
    Compare, CompareOp, GetOptions, LeaseKeepAliveStream, LeaseKeeper, PutOptions, Txn, TxnOp,
    TxnOpResponse, WatchOptions,
};
use tokio::sync::watch;
use tracing::{info, warn};

use super::view::{NodeRecord, NodeState, View};
use super::{Cluster, REQUEST_TIMEOUT};

/// One etcd request, failed if it takes longer than [`REQUEST_TIMEOUT`].
pub(super) async fn within<T>(
    what: &str,
    request: impl Future<Output = Result<T, etcd_client::Error>>,
) -> anyhow::Result<T> {
    match tokio::time::timeout(REQUEST_TIMEOUT, request).await {
        Ok(r) => r.with_context(|| format!("etcd: {what}")),
        Err(_) => bail!("etcd: {what}: no answer within {REQUEST_TIMEOUT:?}"),
    }
}

/// What a registration attempt found.
enum Registration {
    /// Registered (or still registered) under this lease.
    Done(i64),
    /// Another lease holds the node's key.
    Held(Option<NodeRecord>),
}

impl Cluster {
    fn ttl(&self) -> Duration {
        Duration::from_secs(self.settings.lease_ttl_s.into())
    }

    /// A keep-alive sent at `sent` was answered with `ttl` seconds (or a
    /// lease granted) at etcd revision `revision`: etcd cannot expire the
    /// lease before `sent + ttl`. This node counts its lease good until a
    /// margin before that, on the monotonic clock (see
    /// [`Cluster::lease_valid`]).
    fn lease_good_from(&self, sent: Instant, ttl: i64, revision: i64) {
        self.lease_revision.fetch_max(revision, Ordering::SeqCst);
        let ttl = Duration::from_secs(ttl.max(0) as u64);
        let margin = (ttl / 5).max(Duration::from_millis(500));
        let until = (sent + ttl.saturating_sub(margin)).saturating_duration_since(self.born);
        self.lease_until_ms
            .fetch_max(until.as_millis() as u64, Ordering::SeqCst);
    }

    /// Whether this node's lease is surely alive in etcd now: false from a
    /// margin before the earliest time etcd could expire it (its last
    /// answered keep-alive's send time plus the TTL). A primary of
    /// replicated shards stops serving them then, before the controller can
    /// give them to another node.
    pub fn lease_valid(&self) -> bool {
        (self.born.elapsed().as_millis() as u64) < self.lease_until_ms.load(Ordering::SeqCst)
    }

    /// Whether this node's view is read from etcd at or after its lease's
    /// last renewal: it shows whatever the controller did while the lease
    /// may have been gone (a primary fenced meanwhile serves again only
    /// with such a view, or it would serve shards given away).
    pub fn view_since_renewal(&self) -> bool {
        let view = self.view();
        view.etcd_up && view.revision >= self.lease_revision.load(Ordering::SeqCst)
    }

    /// Registers at start. A key left by this node's previous run lives
    /// until that run's lease expires, so it is waited out (one TTL and a
    /// margin); a key still held after that is renewed by a live process:
    /// two nodes may not share an id. etcd itself may take a while to come
    /// up (containers start together): attempts go on for a minute.
    pub(super) async fn register_at_start(&self) -> anyhow::Result<i64> {
        let started = Instant::now();
        let mut held_since: Option<Instant> = None;
        let mut said = false;
        loop {
            match self.register(0).await {
                Ok(Registration::Done(lease)) => return Ok(lease),
                Ok(Registration::Held(holder)) => {
                    let since = *held_since.get_or_insert_with(Instant::now);
                    if since.elapsed() > self.ttl() + Duration::from_secs(3) {
                        bail!(
                            "node id {:?} is registered in cluster {:?} by a running node{}: \
                             two nodes cannot share an id",
                            self.settings.node_id,
                            self.settings.name,
                            holder
                                .map(|h| format!(
                                    " (advertising {}, clients on {})",
                                    h.advertise, h.clients
                                ))
                                .unwrap_or_default()
                        );
                    }
                    if !said {
                        info!(
                            node = %self.settings.node_id,
                            "this node id is still registered (a previous run's lease has not expired); waiting for it"
                        );
                        said = true;
                    }
                }
                Err(e) if started.elapsed() < Duration::from_secs(60) => {
                    warn!(error = %format!("{e:#}"), etcd = %self.settings.etcd, "cannot register yet; retrying");
                }
                Err(e) => {
                    return Err(e).context(format!(
                        "registering in cluster {:?} (etcd {})",
                        self.settings.name, self.settings.etcd
                    ))
                }
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// One attempt: a new lease and the node's key created under it, unless
    /// the key exists. A key held by `current` (the lease this node already
    /// has) means the node is still registered. Failed, the next attempt
    /// goes to the next etcd member.
    async fn register(&self, current: i64) -> anyhow::Result<Registration> {
        let (pinned, client) = self.etcd_pinned();
        let attempt = self.register_on(client, current).await;
        if attempt.is_err() {
            self.etcd_failed(pinned);
        }
        attempt
    }

    async fn register_on(
        &self,
        mut client: etcd_client::Client,
        current: i64,
    ) -> anyhow::Result<Registration> {
        let key = self.keys.node(&self.settings.node_id);
        let ttl = i64::from(self.settings.lease_ttl_s);
        let asked = Instant::now();
        let lease = within("lease grant", client.lease_grant(ttl, None))
            .await?
            .id();
        let record = serde_json::to_vec(&*self.record.lock().expect("not poisoned"))
            .expect("a record serializes");
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                key.clone(),
                record,
                Some(PutOptions::new().with_lease(lease)),
            )])
            .or_else([TxnOp::get(key, None)]);
        let answer = within("register", client.txn(txn)).await;
        let answer = match answer {
            Ok(a) => a,
            Err(e) => {
                let _ = client.lease_revoke(lease).await;
                return Err(e);
            }
        };
        if answer.succeeded() {
            self.lease_good_from(asked, ttl, answer.header().map_or(0, |h| h.revision()));
            return Ok(Registration::Done(lease));
        }
        let _ = within("lease revoke", client.lease_revoke(lease)).await;
        let holder = answer.op_responses().into_iter().find_map(|r| match r {
            TxnOpResponse::Get(g) => g.kvs().first().map(|kv| (kv.lease(), kv.value().to_vec())),
            _ => None,
        });
        match holder {
            Some((l, _)) if current != 0 && l == current => Ok(Registration::Done(current)),
            Some((_, value)) => Ok(Registration::Held(serde_json::from_slice(&value).ok())),
            // Gone between the compare and the get: try again.
            None => Ok(Registration::Held(None)),
        }
    }

    /// Renews the lease a third of its TTL apart. A lease that etcd says
    /// has expired (or that went unrenewed for a whole TTL while etcd was
    /// away) is replaced by a new registration; meanwhile the node keeps
    /// serving with the view it has.
    pub(super) async fn renew(self: Arc<Self>, lease_tx: watch::Sender<i64>) {
        let every = self.ttl() / 3;
        let mut lease = *lease_tx.borrow();
        let mut last_ok = Instant::now();
        let mut keeper: Option<(LeaseKeeper, LeaseKeepAliveStream)> = None;
        // The member the keep-alive stream was opened on.
        let mut pinned = 0;
        loop {
            tokio::select! {
                _ = self.stop.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
            let sent = Instant::now();
            if keeper.is_none() {
                pinned = self.etcd_pinned().0;
            }
            match tokio::time::timeout(every, self.renew_once(&mut keeper, lease)).await {
                Ok(Ok((ttl, revision))) if ttl > 0 => {
                    self.lease_good_from(sent, ttl, revision);
                    last_ok = Instant::now();
                    self.lease_ok.store(true, Ordering::SeqCst);
                    continue;
                }
                Ok(Ok(_)) => warn!("the node's etcd lease expired; registering again"),
                Ok(Err(e)) => {
                    keeper = None;
                    self.etcd_failed(pinned);
                    self.lease_ok.store(false, Ordering::SeqCst);
                    if last_ok.elapsed() < self.ttl() {
                        warn!(error = %format!("{e:#}"), "cannot renew the node's etcd lease; retrying");
                        continue;
                    }
                }
                Err(_) => {
                    keeper = None;
                    self.etcd_failed(pinned);
                    self.lease_ok.store(false, Ordering::SeqCst);
                    if last_ok.elapsed() < self.ttl() {
                        continue;
                    }
                }
            }
            keeper = None;
            match self.register(lease).await {
                Ok(Registration::Done(new)) => {
                    if new != lease {
                        info!(
                            lease = format!("{new:x}"),
                            "registered again under a new lease"
                        );
                        lease = new;
                        lease_tx.send_replace(new);
                    }
                    last_ok = Instant::now();
                    self.lease_ok.store(true, Ordering::SeqCst);
                }
                Ok(Registration::Held(_)) => warn!(
                    node = %self.settings.node_id,
                    "this node id is registered under another lease; retrying"
                ),
                Err(e) => warn!(error = %format!("{e:#}"), "cannot register again yet; retrying"),
            }
        }
    }

    /// One renewal on the lease's keep-alive stream (opened if needed):
    /// the TTL etcd granted, 0 if the lease is gone.
    async fn renew_once(
        &self,
        keeper: &mut Option<(LeaseKeeper, LeaseKeepAliveStream)>,
        lease: i64,
    ) -> anyhow::Result<(i64, i64)> {
        if keeper.is_none() {
            let mut client = self.etcd();
            *keeper = Some(client.lease_keep_alive(lease).await?);
        }
        let (k, stream) = keeper.as_mut().expect("opened above");
        k.keep_alive().await?;
        match stream.message().await? {
            Some(r) => Ok((r.ttl(), r.header().map_or(0, |h| h.revision()))),
            None => bail!("the keep-alive stream ended"),
        }
    }

    /// Keeps the view: reads every key of the cluster at one revision,
    /// watches from the next, and reads again after any change. When etcd
    /// cannot be reached the last view stays, marked as such.
    pub(super) async fn follow(self: Arc<Self>, view_tx: watch::Sender<Arc<View>>) {
        let mut backoff = Duration::from_millis(100);
        let mut failures = 0u64;
        while !self.stop.is_cancelled() {
            let (pinned, _) = self.etcd_pinned();
            match self.read_and_watch(&view_tx).await {
                Ok(()) => {
                    backoff = Duration::from_millis(100);
                    failures = 0;
                }
                Err(e) => {
                    self.etcd_failed(pinned);
                    if view_tx.borrow().etcd_up {
                        view_tx.send_modify(|v| Arc::make_mut(v).etcd_up = false);
                    }
                    if failures.is_multiple_of(10) {
                        warn!(
                            error = %format!("{e:#}"),
                            failures = failures + 1,
                            "cannot read the cluster from etcd; serving with the last map read"
                        );
                    }
                    failures += 1;
                    tokio::select! {
                        _ = self.stop.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        }
    }

    /// One read, published, then a watch until the first change (Ok: read
    /// again) or failure.
    async fn read_and_watch(&self, view_tx: &watch::Sender<Arc<View>>) -> anyhow::Result<()> {
        let (pinned, mut client) = self.etcd_pinned();
        let root = self.keys.root().to_owned();
        let answer = within(
            "read the cluster",
            client.get(root.clone(), Some(GetOptions::new().with_prefix())),
        )
        .await?;
        let revision = answer.header().map_or(0, |h| h.revision());
        let kvs: Vec<(String, Vec<u8>, i64, i64)> = answer
            .kvs()
            .iter()
            .map(|kv| {
                (
                    String::from_utf8_lossy(kv.key()).into_owned(),
                    kv.value().to_vec(),
                    kv.create_revision(),
                    kv.mod_revision(),
                )
            })
            .collect();
        let view = View::from_kvs(
            &self.keys,
            revision,
            kvs.iter()
                .map(|(k, v, c, m)| (k.as_str(), v.as_slice(), *c, *m)),
        );
        (self.on_view)(&view);
        view_tx.send_replace(Arc::new(view));
        let mut stream = within(
            "watch the cluster",
            client.watch(
                root,
                Some(
                    WatchOptions::new()
                        .with_prefix()
                        .with_start_revision(revision + 1),
                ),
            ),
        )
        .await?;
        // Another request found this member failing (a renewal, the
        // controller): read and watch again on the next one, rather than
        // wait for this watch's connection to be found dead.
        let mut moved_on = tokio::time::interval(Duration::from_millis(500));
        loop {
            let message = tokio::select! {
                _ = self.stop.cancelled() => return Ok(()),
                m = stream.message() => m.context("etcd: the watch failed")?,
                _ = moved_on.tick() => {
                    if self.etcd_pinned().0 != pinned {
                        return Ok(());
                    }
                    continue;
                }
            };
            let Some(message) = message else {
                bail!("etcd: the watch ended");
            };
            if message.canceled() {
                bail!("etcd: the watch was cancelled: {}", message.cancel_reason());
            }
            if !message.events().is_empty() {
                // Changes come in bursts (a map's creation is several
                // transactions): one read after a short pause covers them.
                tokio::time::sleep(Duration::from_millis(20)).await;
                return Ok(());
            }
        }
    }

    /// Follows the view: this node's state (joining until it owns shards),
    /// and the cluster gauges.
    pub(super) async fn steward(self: Arc<Self>) {
        let mut view_rx = self.view.clone();
        loop {
            let view = view_rx.borrow_and_update().clone();
            let me = self.settings.node_id.as_str();
            let owned = view.owned_by(me);
            let g = &self.gauges;
            g.etcd_up.set(i64::from(view.etcd_up));
            g.controller.set(i64::from(self.is_controller()));
            g.shards_owned.set(owned as i64);
            g.shards_unavailable.set(view.unavailable() as i64);
            g.map_revision.set(view.revision);
            for state in ["joining", "serving", "draining", "lost"] {
                g.nodes.with_label_values(&[state]).set(0);
            }
            for id in view.known_nodes() {
                let state = view.nodes.get(&id).map_or("lost", |n| n.state.name());
                g.nodes.with_label_values(&[state]).inc();
            }
            let wanted = if owned > 0 {
                NodeState::Serving
            } else {
                NodeState::Joining
            };
            // Compared with what etcd holds, so a write that failed is
            // tried again with the next view.
            let registered = view.nodes.get(me).map(|n| n.state);
            let leaving = self.record.lock().expect("not poisoned").state == NodeState::Draining;
            if view.etcd_up && !leaving && registered.is_some_and(|s| s != wanted) {
                self.set_state(wanted).await;
            }
            tokio::select! {
                _ = self.stop.cancelled() => return,
                changed = view_rx.changed() => if changed.is_err() { return },
                // The controller flag changes without a view change.
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }

    /// Records a new state in the node's key (only while the key is still
    /// under this node's lease). Best effort: the next view retries.
    pub(super) async fn set_state(&self, state: NodeState) {
        let record = {
            let mut r = self.record.lock().expect("not poisoned");
            r.state = state;
            serde_json::to_vec(&*r).expect("a record serializes")
        };
        let lease = *self.lease.borrow();
        if lease == 0 {
            return;
        }
        let key = self.keys.node(&self.settings.node_id);
        let txn = Txn::new()
            .when([Compare::lease(key.clone(), CompareOp::Equal, lease)])
            .and_then([TxnOp::put(
                key,
                record,
                Some(PutOptions::new().with_lease(lease)),
            )]);
        let mut client = self.etcd();
        match within("record the node's state", client.txn(txn)).await {
            Ok(_) => info!(state = state.name(), "node state"),
            Err(e) => warn!(error = %format!("{e:#}"), "cannot record the node's state yet"),
        }
    }
}

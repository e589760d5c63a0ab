//! The cluster's control plane, on etcd: membership, the controller and the
//! shard map. The data plane (shards, store, fan-out) stays Courier's own.
//!
//! ```text
//!  node ──lease──► nodes/<id>         registered while its lease lives (member.rs)
//!  node ──campaign► controller/<lease> the oldest candidacy is the controller (controller.rs)
//!  controller ──txn on the leader key──► config, shards/<n> {owner}; epoch = mod_revision
//!  every node ◄──watch the root── one read of all keys per change: the View (member.rs)
//! ```
//!
//! Rules (docs/ARCHITECTURE.md, "The cluster"):
//! - only the controller writes the map, and only in transactions that
//!   hold while its candidacy key is the one it was elected with, so a
//!   deposed controller's writes fail;
//! - without replication, ownership changes only through a move in which
//!   the old owner takes part; a node that is lost keeps its shards
//!   (unavailable) until it returns with its disk, because nobody else has
//!   their data; with replication (`replica.rs`) the controller promotes
//!   an in-sync copy of a lost primary's shards;
//! - when etcd cannot be reached, every node keeps the view it has: nobody
//!   can change ownership without etcd, so the last view read stays true
//!   for everyone.

mod controller;
pub mod identity;
pub mod keys;
pub mod link;
pub mod links;
mod member;
pub mod moves;
pub mod order;
pub mod placement;
pub mod replica;
pub mod route;
pub mod transfer;
pub mod view;
pub mod wire;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use etcd_client::{Client, ConnectOptions};
use prometheus::{IntGauge, IntGaugeVec, Opts};
use serde_json::json;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::info;

use crate::config::{ClusterSettings, Config};
use crate::metrics::Metrics;
use keys::Keys;
use placement::Candidate;
use view::{NodeRecord, NodeState, View};

/// How long one etcd request may take before it counts as failed.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// What a node does with each view before acting on it.
pub type OnView = Box<dyn Fn(&View) + Send + Sync>;

/// This node's membership of its cluster.
pub struct Cluster {
    pub settings: ClusterSettings,
    keys: Keys,
    /// One etcd client per endpoint, and the one requests go to (see
    /// [`Cluster::etcd`]).
    clients: Vec<(String, Client)>,
    pinned: AtomicUsize,
    /// The latest view; changes wake whoever waits on it.
    view: watch::Receiver<Arc<View>>,
    /// The node's current lease (0 before it registered).
    lease: watch::Receiver<i64>,
    /// What this node registers; its state follows the map.
    record: Mutex<NodeRecord>,
    /// True while this node is the controller.
    controlling: AtomicBool,
    /// True while the lease is being renewed.
    lease_ok: AtomicBool,
    /// Until when (ms after `born`) the lease is surely alive in etcd.
    lease_until_ms: std::sync::atomic::AtomicU64,
    /// The etcd revision of the lease's last renewal (or grant).
    lease_revision: std::sync::atomic::AtomicI64,
    born: std::time::Instant,
    /// Replication of this node's shards (with a factor above 1).
    pub replication: std::sync::OnceLock<Arc<replica::Replication>>,
    gauges: Gauges,
    /// Links to the other nodes.
    pub links: Arc<links::Links>,
    /// What the data plane counts.
    pub plane: route::PlaneMetrics,
    /// Told of every view read, before it is published (the store's
    /// served slots follow the map this way, ahead of any routing by it).
    on_view: OnView,
    stop: CancellationToken,
    tasks: TaskTracker,
}

struct Gauges {
    etcd_up: IntGauge,
    controller: IntGauge,
    shards_owned: IntGauge,
    shards_unavailable: IntGauge,
    nodes: IntGaugeVec,
    map_revision: IntGauge,
    links_up: IntGauge,
}

impl Gauges {
    fn new(metrics: &Metrics) -> Gauges {
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).expect("valid metric");
            metrics.register(g.clone());
            g
        };
        let nodes = IntGaugeVec::new(
            Opts::new(
                "courier_cluster_nodes",
                "Nodes of the cluster as this node sees them, by state (lost: owns shards, not registered).",
            ),
            &["state"],
        )
        .expect("valid metric");
        metrics.register(nodes.clone());
        Gauges {
            etcd_up: gauge(
                "courier_cluster_etcd_up",
                "1 while this node reads and watches etcd; 0 while it serves the last map it read.",
            ),
            controller: gauge(
                "courier_cluster_controller",
                "1 on the node that is the cluster's controller.",
            ),
            shards_owned: gauge(
                "courier_cluster_shards_owned",
                "Shards this node owns in the current map.",
            ),
            shards_unavailable: gauge(
                "courier_cluster_shards_unavailable",
                "Shards whose owner is not registered (unavailable until it returns).",
            ),
            nodes,
            map_revision: gauge(
                "courier_cluster_view_revision",
                "The etcd revision of the cluster view this node acts on.",
            ),
            links_up: gauge(
                "courier_cluster_links_up",
                "Links to other nodes that answered their last probe (one per known peer).",
            ),
        }
    }
}

impl Cluster {
    /// Joins the cluster `config` names: connects to etcd, registers this
    /// node under a lease (waiting out a previous run's registration, and
    /// refusing an id a live node holds), reads the map, and starts the
    /// lease renewal, the watch and the candidacy for controller.
    /// `data` answers the data plane's requests from other nodes.
    pub async fn join(
        config: &Config,
        clients: std::net::SocketAddr,
        admin: std::net::SocketAddr,
        metrics: &Metrics,
        data: Arc<dyn link::Handler>,
        on_view: OnView,
    ) -> anyhow::Result<Arc<Cluster>> {
        let settings = config.cluster.clone();
        let endpoints = settings.endpoints();
        let options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2))
            .with_keep_alive_while_idle(true)
            .with_require_leader(true);
        // Connections are made when first used: a member that is down at
        // start is skipped then.
        let mut etcd = Vec::new();
        for endpoint in &endpoints {
            let client = Client::connect([endpoint], Some(options.clone()))
                .await
                .with_context(|| format!("connecting to etcd at {endpoint}"))?;
            etcd.push((endpoint.clone(), client));
        }
        let advertise = config.advertise(clients)?;
        let link_listener = tokio::net::TcpListener::bind(settings.link_listen)
            .await
            .with_context(|| format!("binding the link listener {}", settings.link_listen))?;
        let link_port = link_listener.local_addr()?.port();
        let host = advertise
            .rsplit_once(':')
            .map_or(advertise.as_str(), |(h, _)| h);
        let secret = crate::auth::read_secret(&config.cluster_secret_path())
            .context("the cluster secret (cluster.secret_file)")?;
        let stop = CancellationToken::new();
        let links = links::Links::start(
            link::LinkSettings {
                cluster: settings.name.clone(),
                node_id: settings.node_id.clone(),
                secret: links::link_key(&secret),
                queue_len: 4096,
                max_frame: config.limits.max_frame_len.saturating_mul(2),
                silence: Duration::from_secs(5),
            },
            link_listener,
            data,
            stop.clone(),
        );
        let record = NodeRecord {
            link: format!("{host}:{link_port}"),
            advertise,
            clients: clients.to_string(),
            admin: admin.to_string(),
            capacity: settings.capacity,
            state: NodeState::Joining,
            version: env!("CARGO_PKG_VERSION").to_owned(),
            started_ms: courier_storage::Clock::system().now_ms(),
        };
        let keys = Keys::new(&settings.name);
        let (view_tx, view) = watch::channel(Arc::new(View::default()));
        let (lease_tx, lease) = watch::channel(0);
        let cluster = Arc::new(Cluster {
            keys,
            clients: etcd,
            pinned: AtomicUsize::new(0),
            view,
            lease,
            record: Mutex::new(record),
            controlling: AtomicBool::new(false),
            lease_ok: AtomicBool::new(false),
            lease_until_ms: std::sync::atomic::AtomicU64::new(0),
            lease_revision: std::sync::atomic::AtomicI64::new(0),
            born: std::time::Instant::now(),
            replication: std::sync::OnceLock::new(),
            gauges: Gauges::new(metrics),
            links,
            plane: route::PlaneMetrics::new(metrics),
            on_view,
            stop,
            tasks: TaskTracker::new(),
            settings,
        });
        let lease = cluster.register_at_start().await?;
        lease_tx.send_replace(lease);
        cluster.lease_ok.store(true, Ordering::SeqCst);
        info!(
            cluster = %cluster.settings.name,
            node = %cluster.settings.node_id,
            lease = format!("{lease:x}"),
            "registered in the cluster"
        );
        cluster.tasks.spawn(cluster.clone().renew(lease_tx));
        cluster.tasks.spawn(cluster.clone().follow(view_tx));
        cluster.tasks.spawn(cluster.clone().steward());
        cluster.tasks.spawn(controller::run(cluster.clone()));
        cluster
            .tasks
            .spawn(links::run(cluster.clone(), cluster.links.clone()));
        Ok(cluster)
    }

    /// The latest view of the cluster.
    pub fn view(&self) -> Arc<View> {
        self.view.borrow().clone()
    }

    /// Every view from now on, as it is read.
    pub fn views(&self) -> watch::Receiver<Arc<View>> {
        self.view.clone()
    }

    pub fn node_id(&self) -> &str {
        &self.settings.node_id
    }

    /// Whether this node owns the shard of `id` (a user or group) in the
    /// map it has read; never before it has read one.
    pub fn owns(&self, id: u64) -> bool {
        self.view().holds(&self.settings.node_id, id)
    }

    pub fn is_controller(&self) -> bool {
        self.controlling.load(Ordering::SeqCst)
    }

    /// Leaves on shutdown: says `draining`, then revokes the lease, so the
    /// others see the node gone at once instead of after its lease's TTL
    /// (a controller's candidacy goes with it). Bounded; best effort.
    pub async fn leave(&self) {
        self.set_state(NodeState::Draining).await;
        self.stop.cancel();
        let lease = *self.lease.borrow();
        if lease != 0 {
            let mut client = self.etcd();
            let _ = tokio::time::timeout(Duration::from_secs(2), client.lease_revoke(lease)).await;
        }
        self.tasks.close();
        let _ = tokio::time::timeout(Duration::from_secs(2), self.tasks.wait()).await;
    }

    /// The etcd client to use now: one member's, while it answers.
    ///
    /// A balanced channel over all members (the client library's default)
    /// keeps sending to a member that is gone: its failed connection looks
    /// ready and idle to the balancer, so with etcd's leader killed (its
    /// name no longer resolving) reads, watches and transactions kept
    /// failing for tens of seconds. As etcd's own Go client does, requests
    /// go to one member, and to the next one after a failure
    /// ([`Cluster::etcd_failed`]).
    pub(crate) fn etcd(&self) -> Client {
        self.etcd_pinned().1
    }

    /// [`Cluster::etcd`] with its place, for [`Cluster::etcd_failed`].
    fn etcd_pinned(&self) -> (usize, Client) {
        let i = self.pinned.load(Ordering::Acquire);
        (i, self.clients[i % self.clients.len()].1.clone())
    }

    /// A request to the member at `pinned` failed: the next one serves
    /// from now (once, however many requests saw it fail).
    fn etcd_failed(&self, pinned: usize) {
        if self.clients.len() > 1
            && self
                .pinned
                .compare_exchange(pinned, pinned + 1, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            let (from, to) = (
                &self.clients[pinned % self.clients.len()].0,
                &self.clients[(pinned + 1) % self.clients.len()].0,
            );
            info!(from = %from, to = %to, "etcd: a request failed; using the next member");
        }
    }

    /// The registered nodes that may own shards (not draining, not asked
    /// to drain), with their capacities.
    fn candidates(view: &View) -> Vec<Candidate<'_>> {
        view.nodes
            .iter()
            .filter(|(id, n)| n.state != NodeState::Draining && !view.drained.contains(*id))
            .map(|(id, n)| Candidate {
                id,
                capacity: n.capacity,
            })
            .collect()
    }

    /// Registered nodes whose shards all leave (draining, or asked to).
    fn movable(view: &View) -> Vec<&str> {
        view.nodes
            .iter()
            .filter(|(id, n)| n.state == NodeState::Draining || view.drained.contains(*id))
            .map(|(id, _)| id.as_str())
            .collect()
    }

    /// Asks that `node` give all its shards away and take none (`on`), or
    /// no longer (`!on`). The controller moves them a few at a time; the
    /// node can be stopped once it owns none.
    pub async fn drain(&self, node: &str, on: bool) -> anyhow::Result<()> {
        let view = self.view();
        anyhow::ensure!(
            view.known_nodes().iter().any(|n| n == node),
            "no node {node:?} in cluster {:?}",
            self.settings.name
        );
        let mut client = self.etcd();
        let key = self.keys.drain(node);
        if on {
            let now = courier_storage::Clock::system().now_ms().to_string();
            member::within("ask for a drain", client.put(key, now, None)).await?;
        } else {
            member::within("call a drain off", client.delete(key, None)).await?;
        }
        Ok(())
    }

    /// Wakes the controller to plan and start the moves the map needs now
    /// (it also does whenever nodes come, go or drain); returns how many
    /// moves the plan holds, as this node computes it.
    pub async fn rebalance(&self) -> anyhow::Result<usize> {
        let mut client = self.etcd();
        let now = courier_storage::Clock::system().now_ms().to_string();
        member::within(
            "ask for a rebalance",
            client.put(self.keys.rebalance(), now, None),
        )
        .await?;
        Ok(self.planned_moves(&self.view()))
    }

    fn planned_moves(&self, view: &View) -> usize {
        if !view.map_complete() {
            0
        } else if view.replication() == 1 {
            Cluster::plan(view).len()
        } else {
            Cluster::copy_plan(view, usize::MAX).len()
        }
    }

    /// The changes to replicated shards' copies that can start now, with
    /// at most `at_once` shards under way (`view`'s map complete).
    fn copy_plan(view: &View, at_once: usize) -> Vec<placement::CopyStep> {
        let copies: Vec<placement::Copies> = view
            .owners
            .iter()
            .flatten()
            .map(|o| placement::Copies {
                owner: &o.node,
                replicas: &o.replicas,
                isr: &o.isr,
                removing: o.removing.as_deref(),
            })
            .collect();
        // Lost nodes an operator drained: their copies are replaced.
        let retired: Vec<&str> = view
            .drained
            .iter()
            .filter(|id| !view.nodes.contains_key(*id))
            .map(String::as_str)
            .collect();
        placement::rebalance_copies(
            &copies,
            &Cluster::candidates(view),
            &Cluster::movable(view),
            &retired,
            view.replication(),
            at_once,
        )
    }

    /// The moves that give every candidate its share of `view`'s map.
    fn plan(view: &View) -> Vec<placement::Move> {
        let owners: Vec<&str> = view
            .owners
            .iter()
            .flatten()
            .map(|o| o.node.as_str())
            .collect();
        placement::rebalance(&owners, &Cluster::candidates(view), &Cluster::movable(view))
    }

    /// This node's lease (0 before it registered).
    pub fn lease(&self) -> i64 {
        *self.lease.borrow()
    }

    /// The cluster as this node sees it, for `GET /admin/cluster`.
    pub fn status(&self) -> serde_json::Value {
        let view = self.view();
        let nodes: Vec<serde_json::Value> = view
            .known_nodes()
            .into_iter()
            .map(|id| {
                let owned = view.owned_by(&id);
                let copies = view
                    .owners
                    .iter()
                    .flatten()
                    .filter(|o| o.replicas.contains(&id))
                    .count();
                match view.nodes.get(&id) {
                    Some(n) => json!({
                        "id": id,
                        "state": n.state.name(),
                        "advertise": n.advertise,
                        "link": n.link,
                        "clients": n.clients,
                        "admin": n.admin,
                        "capacity": n.capacity,
                        "version": n.version,
                        "shards": owned,
                        "copies": copies,
                        "drained": view.drained.contains(&id),
                    }),
                    None => json!({ "id": id, "state": "lost", "shards": owned, "copies": copies }),
                }
            })
            .collect();
        let planned_moves = self.planned_moves(&view);
        let mut moves: Vec<serde_json::Value> = view
            .moves
            .iter()
            .map(|(shard, m)| {
                json!({
                    "shard": shard,
                    "from": m.record.from,
                    "to": m.record.to,
                    "state": if m.record.copied_lease.is_some() { "copied" } else { "copying" },
                })
            })
            .collect();
        // Replicated shards move a copy at a time: one added and not yet
        // removed is a move under way.
        let factor = view.replication() as usize;
        moves.extend(view.owners.iter().enumerate().filter_map(|(shard, o)| {
            let o = o
                .as_ref()
                .filter(|o| factor > 1 && o.replicas.len() > factor)?;
            Some(json!({
                "shard": shard,
                "replicas": o.replicas,
                "isr": o.isr,
                "state": "copy added",
            }))
        }));
        let epochs = view.owners.iter().flatten().map(|o| o.epoch);
        json!({
            "cluster": self.settings.name,
            "node": self.settings.node_id,
            "controller": view.controller,
            "this_node_is_controller": self.is_controller(),
            "etcd": if view.etcd_up { "up" } else { "unreachable: serving the last map read" },
            "lease": if self.lease_ok.load(Ordering::SeqCst) { "renewed" } else { "not renewed" },
            "revision": view.revision,
            "map": match (&view.config, view.map_complete()) {
                (None, _) => format!(
                    "not created: waiting for {} registered node(s)",
                    self.settings.initial_nodes
                ),
                (Some(_), false) => "being created".to_owned(),
                (Some(_), true) => "complete".to_owned(),
            },
            "shards": view.owners.len(),
            "shards_unavailable": view.unavailable(),
            "replication": view.replication(),
            "shards_under_replicated": view
                .owners
                .iter()
                .flatten()
                .filter(|o| (o.isr.len() as u32) < view.replication())
                .count(),
            "epochs": { "min": epochs.clone().min(), "max": epochs.max() },
            "planned_moves": planned_moves,
            "moves": moves,
            "nodes": nodes,
            "links": self.links.status(),
            "unreadable_keys": view.unreadable,
        })
    }

    /// Owners of every shard, by shard number (`GET /admin/cluster/shards`).
    pub fn shards(&self) -> serde_json::Value {
        let view = self.view();
        let shards: Vec<serde_json::Value> = view
            .owners
            .iter()
            .enumerate()
            .map(|(n, o)| match o {
                Some(o) => json!({
                    "shard": n,
                    "owner": o.node,
                    "epoch": o.epoch,
                    "replicas": o.replicas,
                    "isr": o.isr,
                    "available": view.nodes.contains_key(&o.node),
                }),
                None => json!({ "shard": n, "owner": null }),
            })
            .collect();
        json!({
            "revision": view.revision,
            "replication": view.replication(),
            "shards": shards,
        })
    }
}

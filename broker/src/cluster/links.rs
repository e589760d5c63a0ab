//! This node's links to the others: one per pair of nodes (the node with
//! the smaller id dials, the other accepts), kept up as the view changes,
//! and probed every second so the status and the metrics say which are up
//! and how long a round trip takes.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hmac::{Hmac, Mac};
use serde_json::json;
use sha2::Sha256;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::link::{self, Handler, LinkSettings, Peer};
use super::Cluster;

const PING: &[u8] = b"ping";
const PROBE_EVERY: Duration = Duration::from_secs(1);

/// The link key: derived from the cluster secret, so the links' MACs and
/// the clients' tokens never share a key even when the secret is shared.
pub fn link_key(secret: &[u8]) -> Arc<[u8]> {
    let mut m = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
    m.update(b"courier node-to-node link key v1");
    Arc::from(&m.finalize().into_bytes()[..])
}

/// What the node answers its peers: the links' own health probes, and
/// the data plane's requests (`route::Owner`).
struct NodeHandler {
    data: Arc<dyn Handler>,
}

impl Handler for NodeHandler {
    fn request(
        &self,
        from: &str,
        body: Bytes,
    ) -> Pin<Box<dyn Future<Output = Result<Bytes, String>> + Send>> {
        if &body[..] == PING {
            Box::pin(async { Ok(Bytes::from_static(b"pong")) })
        } else {
            self.data.request(from, body)
        }
    }

    fn message(&self, from: &str, body: Bytes) {
        self.data.message(from, body)
    }
}

struct Dialed {
    addr: String,
    peer: Arc<Peer>,
    stop: CancellationToken,
}

/// A peer's last probe.
#[derive(Clone, Copy)]
struct Probe {
    up: bool,
    rtt: Duration,
}

pub struct Links {
    settings: LinkSettings,
    handler: Arc<dyn Handler>,
    dialed: Mutex<HashMap<String, Dialed>>,
    accepted: Arc<Mutex<HashMap<String, Arc<Peer>>>>,
    probes: Mutex<BTreeMap<String, Probe>>,
    stop: CancellationToken,
}

impl Links {
    /// Starts accepting links on `listener`; `data` answers the data
    /// plane's requests.
    pub fn start(
        settings: LinkSettings,
        listener: TcpListener,
        data: Arc<dyn Handler>,
        stop: CancellationToken,
    ) -> Arc<Links> {
        let links = Arc::new(Links {
            settings,
            handler: Arc::new(NodeHandler { data }),
            dialed: Mutex::new(HashMap::new()),
            accepted: Arc::new(Mutex::new(HashMap::new())),
            probes: Mutex::new(BTreeMap::new()),
            stop,
        });
        tokio::spawn(link::accept(
            listener,
            links.settings.clone(),
            links.handler.clone(),
            links.accepted.clone(),
            links.stop.clone(),
        ));
        links
    }

    /// Whether `ip` is the address of a node this one has (or had) an
    /// authenticated link with: the source of the sessions it forwards.
    pub fn is_node_address(&self, ip: std::net::IpAddr) -> bool {
        let dialed = self.dialed.lock().expect("not poisoned");
        let accepted = self.accepted.lock().expect("not poisoned");
        dialed
            .values()
            .map(|d| &d.peer)
            .chain(accepted.values())
            .any(|p| p.remote_ip() == Some(ip))
    }

    /// The link to node `id`, if there is one (dialed or accepted).
    pub fn peer(&self, id: &str) -> Option<Arc<Peer>> {
        if let Some(d) = self.dialed.lock().expect("not poisoned").get(id) {
            return Some(d.peer.clone());
        }
        self.accepted.lock().expect("not poisoned").get(id).cloned()
    }

    /// Dials every registered node whose id is greater than this node's
    /// (at its current address); the others dial this one.
    fn follow_view(&self, nodes: &BTreeMap<String, super::view::NodeRecord>) {
        let me = self.settings.node_id.as_str();
        let mut dialed = self.dialed.lock().expect("not poisoned");
        for (id, record) in nodes {
            if id.as_str() <= me || record.link.is_empty() {
                continue;
            }
            if dialed.get(id).is_some_and(|d| d.addr == record.link) {
                continue;
            }
            if let Some(old) = dialed.remove(id) {
                old.stop.cancel();
            }
            let stop = self.stop.child_token();
            let peer = link::dial(
                self.settings.clone(),
                id.clone(),
                record.link.clone(),
                self.handler.clone(),
                stop.clone(),
            );
            dialed.insert(
                id.clone(),
                Dialed {
                    addr: record.link.clone(),
                    peer,
                    stop,
                },
            );
        }
    }

    /// Pings every peer of the view; records who answered and how fast.
    async fn probe(&self, ids: Vec<String>) {
        for id in ids {
            let probe = match self.peer(&id) {
                Some(peer) => {
                    let t = Instant::now();
                    let ok = peer
                        .request(Bytes::from_static(PING), PROBE_EVERY)
                        .await
                        .is_ok();
                    Probe {
                        up: ok,
                        rtt: t.elapsed(),
                    }
                }
                None => Probe {
                    up: false,
                    rtt: Duration::ZERO,
                },
            };
            self.probes.lock().expect("not poisoned").insert(id, probe);
        }
    }

    /// Each known peer's link: up or down, and the last round trip.
    pub fn status(&self) -> serde_json::Value {
        let probes = self.probes.lock().expect("not poisoned");
        let list: Vec<serde_json::Value> = probes
            .iter()
            .map(|(id, p)| {
                json!({
                    "node": id,
                    "state": if p.up { "up" } else { "down" },
                    "rtt_us": p.up.then_some(p.rtt.as_micros() as u64),
                })
            })
            .collect();
        serde_json::Value::Array(list)
    }

    pub fn up(&self) -> usize {
        self.probes
            .lock()
            .expect("not poisoned")
            .values()
            .filter(|p| p.up)
            .count()
    }
}

/// Keeps the links in step with the view and probes them, until the
/// cluster stops.
pub(super) async fn run(cluster: Arc<Cluster>, links: Arc<Links>) {
    let mut view_rx = cluster.view.clone();
    let mut tick = tokio::time::interval(PROBE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let view = view_rx.borrow_and_update().clone();
        links.follow_view(&view.nodes);
        tokio::select! {
            _ = cluster.stop.cancelled() => return,
            _ = view_rx.changed() => continue,
            _ = tick.tick() => {}
        }
        let me = cluster.node_id();
        let ids: Vec<String> = view
            .known_nodes()
            .into_iter()
            .filter(|id| id != me)
            .collect();
        links.probe(ids).await;
        cluster.gauges.links_up.set(links.up() as i64);
    }
}

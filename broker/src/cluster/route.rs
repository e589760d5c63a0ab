//! The data plane across nodes: where a command for an id goes, and what a
//! node does with the commands its peers send it.
//!
//! ```text
//!  session / shard ── cmd for id ──► Router::divert
//!     owner of shard_of(id) is this node ──► this node's shard (as on one node)
//!     owner is another node, link up ──────► link request SEND {shard, epoch, ...}
//!                                             └─► Owner::request: epoch checked,
//!                                                 its shard writes, answers the outcome
//!     ◄── outcome: the session's reply, the reader's receipt part, the broadcast copy
//!     owner lost, link down, no answer ───► SHARD_UNAVAILABLE (retryable, a hint)
//! ```
//!
//! Sessions do not cross nodes here: a client whose user another node owns
//! is forwarded to that node at the handshake (`session::forward`), so
//! every session lives on its user's owner and its own shard's commands
//! (registration, marks, fetches, a broadcast's plan) never leave the node.
//! What crosses is what one user's shard asks of another's: one message
//! for one inbox (a send, a receipt, a broadcast copy), a status view for
//! the poster's shard, and a read of posters' statuses. Group commands
//! whose group another node owns are refused (`DESTINATION_UNSUPPORTED`)
//! until the fan-out across nodes is built: refusing keeps every
//! acknowledgement true.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use courier_protocol::error::with_retry_after;
use courier_protocol::{ErrorCode, SendResult, Status};
use prometheus::{Histogram, HistogramOpts, IntCounterVec, IntGauge, Opts};
use tokio::sync::oneshot;
use tracing::debug;

use super::link::Handler;
use super::order;
use super::view;
use super::wire::{self, Answer, RemoteSend, RemoteStatuses, RemoteView, SendAnswer, ViewOutcome};
use super::Cluster;
use crate::error::BrokerError;
use crate::metrics::{Metrics, LATENCY_BUCKETS};
use crate::node::Node;
use crate::shard::messages::{failed, Completion, SendCmd, ShardCmd, StatusViewCmd};
use crate::shard::Remote;
use crate::state::social;

/// How long a send to another node may wait for its answer (the link's
/// queue, the owner's shard and its write) before it is answered
/// `SHARD_UNAVAILABLE`; the client's retry carries the same id, so a send
/// that was stored after all is stored once.
const REMOTE_DEADLINE: Duration = Duration::from_secs(5);

/// The retry-after hint of a `SHARD_UNAVAILABLE`: about how long a lost
/// link takes to come back, or a node to restart.
pub const RETRY_AFTER_MS: u64 = 500;

/// A send refused because its owner is out of reach, with the hint.
pub fn unavailable(client_msg_id: u64) -> SendResult {
    SendResult {
        timestamp_ms: RETRY_AFTER_MS,
        ..failed(client_msg_id, ErrorCode::SHARD_UNAVAILABLE)
    }
}

/// A request refused because its owner was out of reach, with the hint.
fn unreachable_owner() -> BrokerError {
    BrokerError::refused(
        ErrorCode::SHARD_UNAVAILABLE,
        with_retry_after(RETRY_AFTER_MS, "the owner's cluster node is out of reach"),
    )
}

/// The statuses `viewer` may see of `posters` that other nodes own (the
/// posters' side of the consent; the viewer's was read here), by poster.
/// One request per owner, all at once; any owner out of reach fails the
/// whole read (`SHARD_UNAVAILABLE`) rather than leave its posters out.
pub async fn remote_statuses(
    cluster: &Cluster,
    viewer: u64,
    posters: Vec<u64>,
) -> Result<Vec<Status>, BrokerError> {
    let read = async {
        let view = cluster.view();
        let mut by_owner: HashMap<String, Vec<u64>> = HashMap::new();
        for p in posters {
            let (_, owner) = view.owner_of(p).ok_or("no map")?;
            let owner = owner.ok_or("a poster's shard has no owner")?;
            by_owner.entry(owner.node.clone()).or_default().push(p);
        }
        let mut asks = Vec::new();
        for (owner, posters) in by_owner {
            let peer = cluster.links.peer(&owner).ok_or("no link to the owner")?;
            let body = RemoteStatuses { viewer, posters }.encode();
            let (_, answer) = peer
                .start_request(body, REMOTE_DEADLINE)
                .map_err(|_| "not queued on the link")?;
            asks.push(answer);
        }
        let mut out = Vec::new();
        for answer in asks {
            match answer.await.map(Answer::<Vec<Status>>::decode) {
                Ok(Ok(Answer::Done(statuses))) => out.extend(statuses),
                _ => return Err("no answer, a failure, or not the owner"),
            }
        }
        Ok(out)
    };
    read.await.map_err(|why| {
        debug!(why, "statuses across nodes failed");
        cluster
            .plane
            .unavailable
            .with_label_values(&["statuses"])
            .inc();
        unreachable_owner()
    })
}

/// What the data plane counts.
pub struct PlaneMetrics {
    /// Sends to other nodes, by outcome.
    remote_sends: IntCounterVec,
    /// Sessions forwarded to their user's owner, open now.
    pub forwarded_sessions: IntGauge,
    /// Commands refused because their owner was out of reach, by what.
    pub unavailable: IntCounterVec,
    /// A send's link request to its answer, at the sending node.
    remote_send_seconds: Histogram,
}

impl PlaneMetrics {
    pub fn new(metrics: &Metrics) -> PlaneMetrics {
        let remote_sends = IntCounterVec::new(
            Opts::new(
                "courier_cluster_remote_sends_total",
                "Messages for inboxes another node owns, sent over a link, by outcome (stored, refused: the owner answered an error, unavailable).",
            ),
            &["outcome"],
        )
        .expect("valid metric");
        let unavailable = IntCounterVec::new(
            Opts::new(
                "courier_cluster_unavailable_total",
                "Sends and sessions refused with SHARD_UNAVAILABLE, by what: send (the owner out of reach), held (an older send of the same conversation waits for its retry), session, view (a status view), statuses (a status fetch).",
            ),
            &["what"],
        )
        .expect("valid metric");
        let forwarded_sessions = IntGauge::new(
            "courier_cluster_forwarded_sessions",
            "Client connections this node forwards to their user's owner, open now.",
        )
        .expect("valid metric");
        let remote_send_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "courier_cluster_remote_send_seconds",
                "From a send's link request to the owner's answer, at the sending node: the link both ways and the owner's queue, write and sync.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
        )
        .expect("valid metric");
        metrics.register(remote_send_seconds.clone());
        // Every series from the start, at zero.
        for outcome in ["stored", "refused", "unavailable"] {
            remote_sends.with_label_values(&[outcome]);
        }
        for what in ["send", "held", "session", "view", "statuses"] {
            unavailable.with_label_values(&[what]);
        }
        metrics.register(remote_sends.clone());
        metrics.register(unavailable.clone());
        metrics.register(forwarded_sessions.clone());
        PlaneMetrics {
            remote_sends,
            forwarded_sessions,
            unavailable,
            remote_send_seconds,
        }
    }
}

/// Sends commands for other nodes' ids over the links.
pub struct Router {
    cluster: Arc<Cluster>,
    node: Weak<Node>,
    /// The network runtime, where the requests wait for their answers
    /// (a divert may be called from a shard's own thread).
    runtime: tokio::runtime::Handle,
    /// Each conversation's sends to other nodes, in the order sent.
    lines: Arc<order::Lines>,
}

impl Router {
    pub fn new(cluster: Arc<Cluster>, node: &Arc<Node>) -> Router {
        Router {
            cluster,
            node: Arc::downgrade(node),
            runtime: tokio::runtime::Handle::current(),
            lines: Arc::default(),
        }
    }

    fn metrics(&self) -> &PlaneMetrics {
        &self.cluster.plane
    }

    /// Sends `s` to `owner` (shard `shard`) and completes it from the answer.
    /// A client's send keeps its place in its conversation's line (see
    /// [`order`]): refused while an older send of the same conversation
    /// waits for its retry.
    fn forward(&self, shard: u32, owner: Option<&view::Owner>, s: SendCmd) {
        let peer = owner.and_then(|o| self.cluster.links.peer(&o.node));
        let line = matches!(s.done, Completion::Reply(_)).then_some(order::Key {
            sender: s.sender,
            device: s.sender_device,
            recipient: s.recipient,
        });
        let (id, done) = (s.client_msg_id, s.done);
        let body = owner.map(|owner| {
            RemoteSend {
                shard,
                epoch: owner.epoch,
                sender: s.sender,
                sender_device: s.sender_device,
                recipient: s.recipient,
                client_msg_id: id,
                scope: s.scope,
                kind: s.kind,
                destination: s.destination,
                payload: s.payload,
            }
            .encode()
        });
        // Queued on the link here, in the order of the calls (a session's
        // sends, a shard's receipts): the link keeps it, and the owner
        // queues each on its shard as it arrives.
        let start = || {
            let (Some(peer), Some(body)) = (&peer, body) else {
                return Err(("send", "no link to the owner".to_string()));
            };
            peer.start_request(body, REMOTE_DEADLINE).map_err(|e| {
                let why = format!("not queued on the link to {}: {e}", peer.peer_id);
                ("send", why)
            })
        };
        let started = match line {
            None => start(),
            Some(key) => {
                let connection = peer.as_ref().and_then(|p| p.connection());
                self.lines.with(key, |line| {
                    if !line.admit(id, connection, Instant::now()) {
                        return Err(match connection {
                            None => ("send", "no connection to the owner".to_string()),
                            Some(_) => (
                                "held",
                                "an older send of the conversation waits for its retry".into(),
                            ),
                        });
                    }
                    let started = start();
                    match &started {
                        Ok((number, _)) => line.went_out(id, *number),
                        Err(_) => line.answered(id, true, Instant::now()),
                    }
                    started
                })
            }
        };
        let answer = match started {
            Ok((_, answer)) => answer,
            Err((what, why)) => {
                debug!(why, "remote send refused as unavailable");
                self.metrics().unavailable.with_label_values(&[what]).inc();
                return self.complete(done, unavailable(id), false);
            }
        };
        let peer_id = peer.map(|p| p.peer_id.clone()).unwrap_or_default();
        let node = self.node.clone();
        let cluster = self.cluster.clone();
        let lines = self.lines.clone();
        let asked = Instant::now();
        self.runtime.spawn(async move {
            let answer = answer.await;
            Metrics::since(&cluster.plane.remote_send_seconds, asked);
            let (result, stored) = match answer {
                Ok(bytes) => match SendAnswer::decode(bytes, id) {
                    Ok(SendAnswer::Outcome { result, stored }) => (result, stored),
                    Ok(SendAnswer::NotOwner { owner, epoch }) => {
                        debug!(peer = %peer_id, %owner, epoch, "not the owner at our epoch");
                        (unavailable(id), false)
                    }
                    Err(e) => {
                        debug!(peer = %peer_id, error = %e, "unreadable answer");
                        (unavailable(id), false)
                    }
                },
                // Unavailable, overloaded, no answer in time, or failed
                // there: the client retries with the same id.
                Err(e) => {
                    debug!(peer = %peer_id, error = %e, "remote send failed");
                    (unavailable(id), false)
                }
            };
            let outcome = match result.code {
                ErrorCode::OK => "stored",
                ErrorCode::SHARD_UNAVAILABLE => "unavailable",
                _ => "refused",
            };
            if let Some(key) = line {
                let unavailable = result.code == ErrorCode::SHARD_UNAVAILABLE;
                lines.with(key, |line| line.answered(id, unavailable, Instant::now()));
            }
            cluster
                .plane
                .remote_sends
                .with_label_values(&[outcome])
                .inc();
            if let Some(node) = node.upgrade() {
                node.shards.complete(done, result, stored);
            }
        });
    }

    /// Asks `owner` to record a status view on the poster's shard; the
    /// answer completes the viewer's request.
    fn view(&self, shard: u32, owner: Option<&view::Owner>, v: StatusViewCmd) {
        let body = owner.map(|o| {
            RemoteView {
                shard,
                epoch: o.epoch,
                viewer: v.viewer,
                viewer_device: v.viewer_device,
                poster: v.poster,
                status_id: v.status_id,
            }
            .encode()
        });
        let peer = owner.and_then(|o| self.cluster.links.peer(&o.node));
        let started = match (peer, body) {
            (Some(peer), Some(body)) => peer.start_request(body, REMOTE_DEADLINE).ok(),
            _ => None,
        };
        let Some((_, answer)) = started else {
            self.metrics()
                .unavailable
                .with_label_values(&["view"])
                .inc();
            let _ = v.answer.send(Err(unreachable_owner()));
            return;
        };
        let cluster = self.cluster.clone();
        self.runtime.spawn(async move {
            let outcome = match answer.await.map(Answer::<ViewOutcome>::decode) {
                Ok(Ok(Answer::Done(Ok(())))) => Ok(()),
                Ok(Ok(Answer::Done(Err((code, why))))) => Err(BrokerError::refused(code, why)),
                other => {
                    debug!(?other, "status view across nodes failed");
                    cluster.plane.unavailable.with_label_values(&["view"]).inc();
                    Err(unreachable_owner())
                }
            };
            let _ = v.answer.send(outcome);
        });
    }

    fn complete(&self, done: Completion, result: SendResult, stored: bool) {
        if let Some(node) = self.node.upgrade() {
            node.shards.complete(done, result, stored);
        }
    }
}

impl Remote for Router {
    fn divert(&self, key: u64, cmd: ShardCmd) -> Option<ShardCmd> {
        let view = self.cluster.view();
        if view.holds(self.cluster.node_id(), key) {
            return Some(cmd);
        }
        // No map read yet, or the shard being assigned: out of reach (sends
        // and views answer so themselves). Otherwise group commands belong
        // to another node, which does not serve them across nodes yet.
        let (shard, owner) = view.owner_of(key).unwrap_or((0, None));
        let refusal = || match owner {
            None => unreachable_owner(),
            Some(_) => BrokerError::refused(
                ErrorCode::DESTINATION_UNSUPPORTED,
                "groups across cluster nodes are not served yet",
            ),
        };
        match cmd {
            ShardCmd::Send(s) => self.forward(shard, owner, s),
            ShardCmd::GroupSend(g) => g.reply.send(match owner {
                None => unavailable(g.client_msg_id),
                Some(_) => failed(g.client_msg_id, ErrorCode::DESTINATION_UNSUPPORTED),
            }),
            ShardCmd::GroupOp(op) => {
                let _ = op.answer.send(Err(refusal()));
            }
            ShardCmd::ReceiptQuery(q) => {
                let _ = q.answer.send(Err(refusal()));
            }
            ShardCmd::StatusView(v) => self.view(shard, owner, v),
            // The user's own shard (its sessions live on its owner), or a
            // part's outcome for the shard that waits, which is here.
            other => return Some(other),
        }
        None
    }
}

/// What this node answers its peers' data-plane requests.
pub struct Owner {
    pub node: Weak<Node>,
}

impl Handler for Owner {
    fn request(
        &self,
        _from: &str,
        body: Bytes,
    ) -> Pin<Box<dyn Future<Output = Result<Bytes, String>> + Send>> {
        let Some(node) = self.node.upgrade() else {
            return Box::pin(async { Err("the node is stopping".into()) });
        };
        match body.first() {
            Some(&wire::SEND) => match RemoteSend::decode(body) {
                // Queued on the shard now, in arrival order.
                Ok(s) => {
                    let answer = serve_send(&node, s);
                    Box::pin(async move { Ok(answer.await.encode()) })
                }
                Err(e) => Box::pin(async move { Err(format!("bad send: {e}")) }),
            },
            Some(&wire::VIEW) => match RemoteView::decode(body) {
                Ok(v) => {
                    let answer = serve_view(&node, v);
                    Box::pin(async move { Ok(answer.await.encode()) })
                }
                Err(e) => Box::pin(async move { Err(format!("bad view: {e}")) }),
            },
            Some(&wire::STATUSES) => match RemoteStatuses::decode(body) {
                Ok(q) => Box::pin(async move { Ok(serve_statuses(node, q).await?.encode()) }),
                Err(e) => Box::pin(async move { Err(format!("bad statuses: {e}")) }),
            },
            Some(&op) => Box::pin(async move { Err(format!("unknown request {op}")) }),
            None => Box::pin(async { Err("empty request".into()) }),
        }
    }

    fn message(&self, _from: &str, _body: Bytes) {}
}

/// Queues a send from another node on its shard now (so sends keep the
/// order they arrived in) if this node owns its shard at the epoch it was
/// routed by; the future is the answer.
fn serve_send(node: &Node, s: RemoteSend) -> impl Future<Output = SendAnswer> + Send + 'static {
    let queued = queue_send(node, s);
    async move {
        match queued {
            Ok((id, rx)) => match rx.await {
                Ok((result, stored)) => SendAnswer::Outcome { result, stored },
                Err(_) => SendAnswer::Outcome {
                    result: unavailable(id),
                    stored: false,
                },
            },
            Err(answer) => answer,
        }
    }
}

/// Whether this node owns shard `shard` at `epoch` and `id` is in it; if
/// not, who it believes does.
fn owned_here(node: &Node, shard: u32, epoch: i64, id: u64) -> Result<(), (String, i64)> {
    let Some(cluster) = node.cluster.get() else {
        return Err((String::new(), 0));
    };
    let view = cluster.view();
    let owner = view.owners.get(shard as usize).cloned().flatten();
    let ours = owner
        .as_ref()
        .is_some_and(|o| o.node == cluster.node_id() && o.epoch == epoch)
        && view.shard_of(id) == Some(shard);
    if ours {
        Ok(())
    } else {
        Err(owner.map_or((String::new(), 0), |o| (o.node, o.epoch)))
    }
}

/// Queues a status view from another node on the poster's shard now; the
/// future is the answer.
fn serve_view(node: &Node, v: RemoteView) -> impl Future<Output = Answer<ViewOutcome>> + Send {
    let queued = owned_here(node, v.shard, v.epoch, v.poster).map(|()| {
        let (tx, rx) = oneshot::channel();
        node.shards.send_peer(
            v.poster,
            ShardCmd::StatusView(StatusViewCmd {
                viewer: v.viewer,
                viewer_device: v.viewer_device,
                poster: v.poster,
                status_id: v.status_id,
                answer: tx,
            }),
        );
        rx
    });
    async move {
        match queued {
            Ok(rx) => Answer::Done(match rx.await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err((e.code(), e.to_string())),
                Err(_) => Err((ErrorCode::SHUTTING_DOWN, "the node is stopping".into())),
            }),
            Err((owner, epoch)) => Answer::NotOwner { owner, epoch },
        }
    }
}

/// Reads the statuses another node's viewer may see of posters this node
/// owns (the store read off the I/O threads); a failed read fails the
/// request (the asking node answers `SHARD_UNAVAILABLE`).
async fn serve_statuses(node: Arc<Node>, q: RemoteStatuses) -> Result<Answer<Vec<Status>>, String> {
    let Some(cluster) = node.cluster.get() else {
        return Err("not a cluster node".into());
    };
    let view = cluster.view();
    if let Some(p) = q
        .posters
        .iter()
        .find(|&&p| !view.holds(cluster.node_id(), p))
    {
        let (owner, epoch) = view
            .owner_of(*p)
            .and_then(|(_, o)| o.map(|o| (o.node.clone(), o.epoch)))
            .unwrap_or_default();
        return Ok(Answer::NotOwner { owner, epoch });
    }
    let now = node.clock.now_ms();
    let store = node.store.clone();
    let read = tokio::task::spawn_blocking(move || {
        let mut out = Vec::new();
        for p in q.posters {
            out.extend(social::poster_statuses(&*store, p, q.viewer, now)?);
        }
        Ok::<_, courier_storage::StoreError>(out)
    })
    .await;
    match read {
        Ok(Ok(statuses)) => Ok(Answer::Done(statuses)),
        Ok(Err(e)) => Err(format!("reading statuses: {e}")),
        Err(e) => Err(format!("reading statuses: {e}")),
    }
}

/// The send's id and where its outcome will come, or the answer at once.
#[allow(clippy::type_complexity)]
fn queue_send(
    node: &Node,
    s: RemoteSend,
) -> Result<(u64, oneshot::Receiver<(SendResult, bool)>), SendAnswer> {
    if let Err((owner, epoch)) = owned_here(node, s.shard, s.epoch, s.recipient) {
        return Err(SendAnswer::NotOwner { owner, epoch });
    }
    let id = s.client_msg_id;
    if node.disk_full.load(std::sync::atomic::Ordering::Relaxed) {
        return Err(SendAnswer::Outcome {
            result: failed(id, ErrorCode::STORAGE_FULL),
            stored: false,
        });
    }
    let (tx, rx) = oneshot::channel();
    let cmd = ShardCmd::Send(SendCmd {
        sender: s.sender,
        sender_device: s.sender_device,
        recipient: s.recipient,
        client_msg_id: id,
        destination: s.destination,
        scope: s.scope,
        kind: s.kind,
        payload: s.payload,
        done: Completion::Remote(tx),
        accepted: Instant::now(),
    });
    // The shard's unbounded peer queue, as for another shard's commands:
    // queued without waiting, so in arrival order; bounded in practice by
    // the senders' in-flight permits and outbox rows at the other node.
    node.shards.send_peer(s.recipient, cmd);
    Ok((id, rx))
}

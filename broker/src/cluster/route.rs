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
//! the poster's shard, a read of posters' statuses, a member's command for
//! its group's shard (a group send, a membership change or info, a receipt
//! query), a group shard's copies of a log entry for members on another
//! node, and members' group cursors for receipt counts.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use courier_protocol::error::with_retry_after;
use courier_protocol::{Body, ErrorCode, GroupRequest, Reason, ReceiptCounts, SendResult, Status};
use prometheus::{Histogram, IntCounterVec, IntGauge, Opts};
use tokio::sync::oneshot;
use tracing::debug;

use super::link::Handler;
use super::order;
use super::transfer::{ExportRequest, Slots};
use super::view;
use super::wire::{
    self, Answer, MemberCursors, RemoteCursors, RemoteGroupAsk, RemoteGroupSend, RemoteRefs,
    RemoteSend, RemoteStatuses, RemoteView, SendAnswer, ViewOutcome,
};
use super::Cluster;
use crate::error::BrokerError;
use crate::metrics::Metrics;
use crate::node::Node;
use crate::shard::messages::BusinessAskCmd;
use crate::shard::messages::{
    failed, Completion, GroupOpCmd, GroupReply, GroupSendCmd, ReceiptQueryCmd, RefsCmd, RefsReport,
    SendCmd, ShardCmd, StatusViewCmd,
};
use crate::shard::route::by_shard;
use crate::shard::Remote;
use crate::state::keys;
use crate::state::rows::Cursors;
use crate::state::social;

/// How long a send to another node may wait for its answer (the link's
/// queue, the owner's shard and its write) before it is answered
/// `SHARD_UNAVAILABLE`; the client's retry carries the same id, so a send
/// that was stored after all is stored once.
const REMOTE_DEADLINE: Duration = Duration::from_secs(5);

pub use crate::shard::messages::{unavailable, RETRY_AFTER_MS};

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
    let ask = |posters| RemoteStatuses { viewer, posters }.encode();
    ask_each_owner(
        cluster,
        "statuses",
        posters,
        ask,
        Answer::<Vec<Status>>::decode,
    )
    .await
}

/// Asks each owner of `ids` once, all at once, with the request `ask`
/// makes of the ids it owns, and gathers the answers; any owner out of
/// reach, failing or no longer the owner fails the whole read
/// (`SHARD_UNAVAILABLE`, counted under `what`) rather than leave its part
/// out.
async fn ask_each_owner<T>(
    cluster: &Cluster,
    what: &'static str,
    ids: Vec<u64>,
    ask: impl Fn(Vec<u64>) -> Bytes,
    decode: fn(Bytes) -> Result<Answer<Vec<T>>, wire::WireError>,
) -> Result<Vec<T>, BrokerError> {
    let read = async {
        let view = cluster.view();
        let mut by_owner: HashMap<String, Vec<u64>> = HashMap::new();
        for id in ids {
            let (_, owner) = view.owner_of(id).ok_or("no map")?;
            let owner = owner.ok_or("a shard has no owner")?;
            by_owner.entry(owner.node.clone()).or_default().push(id);
        }
        let mut asks = Vec::new();
        for (owner, ids) in by_owner {
            let peer = cluster.links.peer(&owner).ok_or("no link to the owner")?;
            let (_, answer) = peer
                .start_request(ask(ids), REMOTE_DEADLINE)
                .map_err(|_| "not queued on the link")?;
            asks.push(answer);
        }
        let mut out = Vec::new();
        for answer in asks {
            match answer.await.map(decode) {
                Ok(Ok(Answer::Done(part))) => out.extend(part),
                _ => return Err("no answer, a failure, or not the owner"),
            }
        }
        Ok(out)
    };
    read.await.map_err(|why| {
        debug!(why, what, "a read across nodes failed");
        cluster.plane.unavailable.with_label_values(&[what]).inc();
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
    /// How long a move's last round took, at the new owner (from asking
    /// for the pause to the last entry imported).
    pub move_pause: Histogram,
    /// Shards this node, as controller, gave to an in-sync copy.
    pub failovers: prometheus::IntCounter,
    /// Changes to replicated shards' copies this node, as controller,
    /// made for a join or a drain: add, lead, drop.
    pub copy_changes: IntCounterVec,
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
                "Sends and sessions refused with SHARD_UNAVAILABLE, by what: send (the owner out of reach), held (an older send of the same conversation waits for its retry), session, view (a status view), statuses (a status fetch), group (a membership change, group info or receipt query), copies (a part of a group fan-out to another node, sent again on the tick), cursors (receipt counts).",
            ),
            &["what"],
        )
        .expect("valid metric");
        let forwarded_sessions = IntGauge::new(
            "courier_cluster_forwarded_sessions",
            "Client connections this node forwards to their user's owner, open now.",
        )
        .expect("valid metric");
        let remote_send_seconds = metrics.latency_histogram(
            "courier_cluster_remote_send_seconds",
            "From a send's link request to the owner's answer, at the sending node: the link both ways and the owner's queue, write and sync.",
        );
        let move_pause = metrics.latency_histogram(
            "courier_cluster_move_pause_seconds",
            "How long a shard move's last round took, measured at the new owner: from asking the old owner to pause to the last entry imported (the pause clients see is courier_cluster_move_paused_writes_seconds, at the old owner).",
        );
        // Every series from the start, at zero.
        for outcome in ["stored", "refused", "unavailable"] {
            remote_sends.with_label_values(&[outcome]);
        }
        for what in [
            "send", "held", "session", "view", "statuses", "group", "copies", "cursors",
        ] {
            unavailable.with_label_values(&[what]);
        }
        metrics.register(remote_sends.clone());
        metrics.register(unavailable.clone());
        metrics.register(forwarded_sessions.clone());
        let failovers = prometheus::IntCounter::new(
            "courier_replication_failovers_total",
            "Shards this node, as the controller, gave to an in-sync copy because their primary was gone.",
        )
        .expect("valid metric");
        metrics.register(failovers.clone());
        let copy_changes = IntCounterVec::new(
            Opts::new(
                "courier_replication_copy_changes_total",
                "Changes this node, as the controller, made to replicated shards' copies for a join, a drain or a rebalance, by change: add (a new copy), lead (an in-sync copy made primary because the primary's node leaves), drop (a copy removed once the others are in sync).",
            ),
            &["change"],
        )
        .expect("valid metric");
        for change in ["add", "lead", "drop"] {
            copy_changes.with_label_values(&[change]);
        }
        metrics.register(copy_changes.clone());
        PlaneMetrics {
            remote_sends,
            forwarded_sessions,
            unavailable,
            remote_send_seconds,
            move_pause,
            failovers,
            copy_changes,
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
    /// Which shards are moving here or away (their local sends keep their
    /// lines too).
    slots: Arc<Slots>,
}

/// The "connection" a conversation's sends to an inbox of this node go
/// out on, in its line (link connections are numbered from 1).
const LOCAL: u64 = 0;

impl Router {
    pub fn new(cluster: Arc<Cluster>, node: &Arc<Node>, slots: Arc<Slots>) -> Router {
        Router {
            cluster,
            node: Arc::downgrade(node),
            runtime: tokio::runtime::Handle::current(),
            lines: Arc::default(),
            slots,
        }
    }

    /// A command for an id this node holds. A client's send or group send
    /// to a shard that is moving (see [`Slots::unsettled`]), or of a
    /// conversation whose line holds something (a send on its way to
    /// another node, or refused by a shard here), takes its place in its
    /// conversation's line, as a send to another node does: the pause may
    /// refuse it mid-session, and a conversation's sends that were refused
    /// by the old owner are retried here; either way the sends after it
    /// wait for its retry.
    ///
    /// With replicated shards (`replicated`) every client send goes in
    /// line: a shard's primary can change at any moment without a pause
    /// (a failover, a switch), so a send on its way to the shard here may
    /// be refused after the view names another primary, while the
    /// conversation's next send already goes there over a link. The line
    /// sees the first still on its way (locally) and holds the next until
    /// it is answered and, if refused, retried. (Without it the container
    /// test's checker found a one-to-one message stored after the next
    /// one, through a primary switch during a join.)
    fn local(&self, key: u64, cmd: ShardCmd, replicated: bool) -> Option<ShardCmd> {
        let Some(line) = client_line(&cmd) else {
            return Some(cmd);
        };
        if !replicated && !self.slots.unsettled(key) && !self.lines.holds(line) {
            return Some(cmd);
        }
        match cmd {
            ShardCmd::Send(mut s) => {
                let (tx, rx) = oneshot::channel();
                let Completion::Reply(reply) =
                    std::mem::replace(&mut s.done, Completion::Remote(tx))
                else {
                    unreachable!("a client's send (client_line)");
                };
                let outcome = async move { rx.await.map(|(result, _)| result) };
                self.in_line(line, s.client_msg_id, move |r| reply.send(r), outcome)
                    .then_some(ShardCmd::Send(s))
            }
            ShardCmd::GroupSend(mut g) => {
                let (tx, rx) = oneshot::channel();
                let GroupReply::Session(reply) =
                    std::mem::replace(&mut g.reply, GroupReply::Remote(tx))
                else {
                    unreachable!("a client's group send (client_line)");
                };
                self.in_line(line, g.client_msg_id, move |r| reply.send(r), rx)
                    .then_some(ShardCmd::GroupSend(g))
            }
            other => Some(other),
        }
    }

    /// Puts send `id`, bound for this node's shard, in conversation
    /// `line`: false (answered `SHARD_UNAVAILABLE` through `reply`, and
    /// counted as held) when an older refused send must be retried first;
    /// else the send goes ahead, and its `outcome`, when it comes, moves the
    /// line on and goes to `reply`.
    fn in_line<F>(
        &self,
        line: order::Key,
        id: u64,
        reply: impl FnOnce(SendResult) + Send + 'static,
        outcome: F,
    ) -> bool
    where
        F: Future<Output = Result<SendResult, oneshot::error::RecvError>> + Send + 'static,
    {
        if !self.admit_local(line, id) {
            reply(unavailable(id));
            return false;
        }
        let lines = self.lines.clone();
        self.runtime.spawn(async move {
            let result = outcome.await.unwrap_or_else(|_| unavailable(id));
            let refused = result.code == ErrorCode::SHARD_UNAVAILABLE;
            lines.with(line, |l| l.answered(id, refused, Instant::now()));
            reply(result);
        });
        true
    }

    /// Whether send `id` of conversation `line` may go to this node's shard
    /// now; if not it is refused (counted as held) and keeps its place.
    fn admit_local(&self, line: order::Key, id: u64) -> bool {
        let admitted = self
            .lines
            .with(line, |l| l.admit(id, Some(LOCAL), Instant::now()));
        if !admitted {
            self.metrics()
                .unavailable
                .with_label_values(&["held"])
                .inc();
        }
        admitted
    }

    fn metrics(&self) -> &PlaneMetrics {
        &self.cluster.plane
    }

    /// Sends `s` to `owner` (shard `shard`) and completes it from the answer.
    /// A client's send keeps its place in its conversation's line (see
    /// [`order`]): refused while an older send of the same conversation
    /// waits for its retry.
    fn forward(&self, shard: u32, owner: Option<&view::Owner>, s: SendCmd) {
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
                covers_seq: s.covers_seq,
            }
            .encode()
        });
        let node = self.node.clone();
        let finish = move |result, stored| {
            if let Some(node) = node.upgrade() {
                node.shards.complete(done, result, stored);
            }
        };
        self.relay(owner, line, id, body, Box::new(finish));
    }

    /// Sends a member's message to the group's owner; the answer goes to
    /// the member's session. In the conversation's line like a send.
    fn group_send(&self, shard: u32, owner: Option<&view::Owner>, g: GroupSendCmd) {
        let line = Some(order::Key {
            sender: g.sender,
            device: g.sender_device,
            recipient: g.group,
        });
        let body = owner.map(|owner| {
            RemoteGroupSend {
                shard,
                epoch: owner.epoch,
                sender: g.sender,
                sender_device: g.sender_device,
                group: g.group,
                client_msg_id: g.client_msg_id,
                kind: g.kind,
                payload: g.payload,
            }
            .encode()
        });
        let reply = g.reply;
        let finish = move |result, _stored| reply.send(result);
        self.relay(owner, line, g.client_msg_id, body, Box::new(finish));
    }

    /// Puts a send (`body`, `None` without an owner) on the link to
    /// `owner`, in its conversation's `line` if it is a client's, and
    /// calls `finish` with the outcome: the owner's answer, or
    /// `SHARD_UNAVAILABLE`.
    fn relay(
        &self,
        owner: Option<&view::Owner>,
        line: Option<order::Key>,
        id: u64,
        body: Option<Bytes>,
        finish: Box<dyn FnOnce(SendResult, bool) + Send>,
    ) {
        let peer = owner.and_then(|o| self.cluster.links.peer(&o.node));
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
                return finish(unavailable(id), false);
            }
        };
        let peer_id = peer.map(|p| p.peer_id.clone()).unwrap_or_default();
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
            finish(result, stored);
        });
    }

    /// Asks the group's owner a member's membership change, group info or
    /// receipt query (`body`, the client's frame); `take` reads the answer
    /// frame it expects, which completes `answer`.
    fn group_ask<T: Send + 'static>(
        &self,
        shard: u32,
        owner: Option<&view::Owner>,
        asker: u64,
        body: Body,
        answer: oneshot::Sender<Result<T, BrokerError>>,
        take: fn(Body) -> Option<T>,
    ) {
        let request = owner.map(|o| {
            RemoteGroupAsk {
                shard,
                epoch: o.epoch,
                asker,
                body,
            }
            .encode()
        });
        let peer = owner.and_then(|o| self.cluster.links.peer(&o.node));
        let started = match (peer, request) {
            (Some(peer), Some(request)) => peer.start_request(request, REMOTE_DEADLINE).ok(),
            _ => None,
        };
        let Some((_, reply)) = started else {
            self.metrics()
                .unavailable
                .with_label_values(&["group"])
                .inc();
            let _ = answer.send(Err(unreachable_owner()));
            return;
        };
        let cluster = self.cluster.clone();
        self.runtime.spawn(async move {
            let outcome = match reply.await.map(Answer::<Body>::decode) {
                Ok(Ok(Answer::Done(Body::Error(reason)))) => {
                    Err(BrokerError::refused(reason.code, reason.message))
                }
                Ok(Ok(Answer::Done(body))) => take(body).ok_or_else(|| {
                    debug!("an unexpected answer to a group request");
                    unreachable_owner()
                }),
                other => {
                    debug!(?other, "group request across nodes failed");
                    cluster
                        .plane
                        .unavailable
                        .with_label_values(&["group"])
                        .inc();
                    Err(unreachable_owner())
                }
            };
            let _ = answer.send(outcome);
        });
    }

    /// Sends copies of a group log entry to the nodes that hold `r`'s
    /// members, one request per node, and reports the part to the group's
    /// shard once every node has answered (any failure fails the part,
    /// which the group's shard sends again on its tick).
    fn copies(&self, r: RefsCmd) {
        let view = self.cluster.view();
        // By node: the (shard, epoch) pairs routed by, and the members.
        type Part = (Vec<(u32, i64)>, Vec<u64>);
        let mut by_node: HashMap<String, Part> = HashMap::new();
        let mut unplaced = false;
        for &m in &r.members {
            match view.owner_of(m) {
                Some((shard, Some(owner))) if owner.node != self.cluster.node_id() => {
                    let (epochs, members) = by_node.entry(owner.node.clone()).or_default();
                    if !epochs.iter().any(|&(s, _)| s == shard) {
                        epochs.push((shard, owner.epoch));
                    }
                    members.push(m);
                }
                // No owner, or this node after all (the map changed since
                // the shard split the members): fail, and the retry splits
                // them again.
                _ => unplaced = true,
            }
        }
        let (g, seq) = (r.group, r.message.seq);
        let mut asks = Vec::new();
        for (node, (epochs, members)) in by_node {
            let body = RemoteRefs {
                group: g,
                epochs,
                members,
                message: (*r.message).clone(),
            }
            .encode();
            // The group's entries reach each node in the group's order: a
            // line per (group, node), as a conversation's sends have. Once
            // an entry's copies for a node fail, later entries for that
            // node are held (failed, fanned out again on the tick) until
            // the failed one has gone out again.
            let key = order::Key {
                sender: g,
                device: 0,
                recipient: node_key(&node),
            };
            let peer = self.cluster.links.peer(&node);
            let connection = peer.as_ref().and_then(|p| p.connection());
            let started = self.lines.with(key, |line| {
                if !line.admit_entry(seq, connection, Instant::now()) {
                    return None;
                }
                let started = peer.as_ref().and_then(|p| {
                    p.start_request(body, REMOTE_DEADLINE)
                        .ok()
                        .map(|(number, answer)| (p.clone(), number, answer))
                });
                match &started {
                    Some((_, number, _)) => line.went_out(seq, *number),
                    None => line.answered(seq, true, Instant::now()),
                }
                started.map(|(_, _, answer)| answer)
            });
            match started {
                Some(answer) => asks.push((key, answer)),
                None => unplaced = true,
            }
        }
        let node = self.node.clone();
        let cluster = self.cluster.clone();
        let lines = self.lines.clone();
        self.runtime.spawn(async move {
            let mut code = if unplaced {
                ErrorCode::SHARD_UNAVAILABLE
            } else {
                ErrorCode::OK
            };
            for (key, answer) in asks {
                let answered = match answer.await.map(Answer::<ErrorCode>::decode) {
                    Ok(Ok(Answer::Done(ErrorCode::OK))) => ErrorCode::OK,
                    Ok(Ok(Answer::Done(failed))) => failed,
                    other => {
                        debug!(?other, group = g, seq, "group copies across nodes failed");
                        ErrorCode::SHARD_UNAVAILABLE
                    }
                };
                let failed = answered != ErrorCode::OK;
                lines.with(key, |line| line.answered(seq, failed, Instant::now()));
                if failed {
                    code = answered;
                }
            }
            if code != ErrorCode::OK {
                cluster
                    .plane
                    .unavailable
                    .with_label_values(&["copies"])
                    .inc();
            }
            if let Some(node) = node.upgrade() {
                r.report
                    .send(g, seq, code, |done| node.shards.send_peer(g, done));
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
}

impl Remote for Router {
    fn divert(&self, key: u64, cmd: ShardCmd) -> Option<ShardCmd> {
        // Copies for members on other nodes: the router splits them by node.
        let cmd = match cmd {
            ShardCmd::Refs(r) if r.copy => {
                self.copies(r);
                return None;
            }
            cmd => cmd,
        };
        let view = self.cluster.view();
        if view.holds(self.cluster.node_id(), key) {
            let replicated = view.config.as_ref().is_some_and(|c| c.replication > 1);
            return self.local(key, cmd, replicated);
        }
        // No map read yet, or the shard being assigned: out of reach (each
        // command answers so). Otherwise the owner serves it.
        let (shard, owner) = view.owner_of(key).unwrap_or((0, None));
        match cmd {
            ShardCmd::Send(s) => self.forward(shard, owner, s),
            ShardCmd::GroupSend(g) => self.group_send(shard, owner, g),
            ShardCmd::GroupOp(op) => {
                let request = GroupRequest {
                    op: op.op,
                    group: op.group,
                    users: op.users,
                };
                let body = Body::Group(request);
                self.group_ask(shard, owner, op.actor, body, op.answer, |b| match b {
                    Body::GroupInfo(info) => Some(info),
                    _ => None,
                });
            }
            ShardCmd::ReceiptQuery(q) => {
                let body = Body::ReceiptQuery {
                    group: q.group,
                    seq: q.seq,
                };
                self.group_ask(shard, owner, q.asker, body, q.answer, |b| match b {
                    Body::ReceiptCounts(counts) => Some(counts),
                    _ => None,
                });
            }
            ShardCmd::StatusView(v) => self.view(shard, owner, v),
            ShardCmd::BusinessAsk(a) => {
                let body = Body::Business(a.request);
                self.group_ask(shard, owner, a.customer, body, a.answer, |b| match b {
                    b @ (Body::BusinessInfo(_) | Body::TemplatePack(_)) => Some(b),
                    _ => None,
                });
            }
            // A business's send comes from its session, on its owner: here
            // only while its shard moves away (the session ends soon).
            ShardCmd::BusinessSend(b) => {
                b.reply.send(unavailable(b.client_msg_id));
                let _ = b.admitted.send(None);
            }
            ShardCmd::BusinessAdmin(a) => {
                let at = owner.map_or_else(|| "no node yet".to_owned(), |o| o.node.clone());
                let _ = a.answer.send(Err(crate::state::business::Invalid {
                    status: 421,
                    code: "not_here",
                    message: format!(
                        "business {key}'s shard is served by {at}: ask that node's admin port"
                    ),
                }));
            }
            // The user's own shard (its sessions live on its owner), or a
            // part's outcome for the shard that waits, which is here.
            other => return Some(other),
        }
        None
    }

    fn here(&self, id: u64) -> bool {
        self.cluster.owns(id)
    }

    fn shards_moving(&self) -> bool {
        self.slots.shards_moving()
    }

    fn split_here(&self, ids: Vec<u64>) -> (Vec<u64>, Vec<u64>) {
        let view = self.cluster.view();
        let me = self.cluster.node_id();
        ids.into_iter().partition(|&id| view.holds(me, id))
    }

    fn refused_here(&self, line: order::Key, id: u64) {
        self.lines
            .with(line, |l| l.refused_here(id, Instant::now()));
    }

    fn count_elsewhere(
        &self,
        counts: ReceiptCounts,
        members: Vec<u64>,
        answer: oneshot::Sender<Result<ReceiptCounts, BrokerError>>,
    ) {
        let cluster = self.cluster.clone();
        self.runtime.spawn(async move {
            let counted = member_cursors(&cluster, counts.group, members).await;
            let _ = answer.send(counted.map(|cursors| {
                let mut counts = counts;
                for (_, delivered, read) in cursors {
                    counts.delivered += u32::from(delivered >= counts.seq);
                    counts.read += u32::from(read >= counts.seq);
                }
                counts
            }));
        });
    }
}

/// The conversation line of a session's send or group send on this node
/// (`None` for anything else: a shard's receipts and copies, a send that
/// came over a link).
fn client_line(cmd: &ShardCmd) -> Option<order::Key> {
    match cmd {
        ShardCmd::Send(s) if matches!(s.done, Completion::Reply(_)) => Some(order::Key {
            sender: s.sender,
            device: s.sender_device,
            recipient: s.recipient,
        }),
        ShardCmd::GroupSend(g) if matches!(g.reply, GroupReply::Session(_)) => Some(order::Key {
            sender: g.sender,
            device: g.sender_device,
            recipient: g.group,
        }),
        _ => None,
    }
}

/// A node's id as a line's recipient (group lines are keyed by node).
fn node_key(node: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    node.hash(&mut h);
    h.finish()
}

/// The group cursors of `members` in group `g`, read from the nodes that
/// hold them (one request per node, all at once); any node out of reach
/// fails the read (`SHARD_UNAVAILABLE`) rather than undercount.
async fn member_cursors(
    cluster: &Cluster,
    g: u64,
    members: Vec<u64>,
) -> Result<MemberCursors, BrokerError> {
    let ask = |members| RemoteCursors { group: g, members }.encode();
    ask_each_owner(
        cluster,
        "cursors",
        members,
        ask,
        Answer::<MemberCursors>::decode,
    )
    .await
}

/// What this node answers its peers' data-plane requests.
pub struct Owner {
    pub node: Weak<Node>,
    /// What the store serves, and the export of a shard under way.
    pub slots: Arc<Slots>,
    /// The primary and backup sides of replicated shards.
    pub replication: Arc<super::replica::Replication>,
}

impl Handler for Owner {
    fn request(
        &self,
        from: &str,
        body: Bytes,
    ) -> Pin<Box<dyn Future<Output = Result<Bytes, String>> + Send>> {
        let Some(node) = self.node.upgrade() else {
            return Box::pin(async { Err("the node is stopping".into()) });
        };
        match body.first() {
            Some(&(wire::REPLICATE..=wire::REPL_STATUS)) => self.replication.request(from, body),
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
            Some(&wire::GROUP_SEND) => match RemoteGroupSend::decode(body) {
                Ok(g) => {
                    let answer = serve_group_send(&node, g);
                    Box::pin(async move { Ok(answer.await.encode()) })
                }
                Err(e) => Box::pin(async move { Err(format!("bad group send: {e}")) }),
            },
            Some(&wire::GROUP_ASK) => match RemoteGroupAsk::decode(body) {
                Ok(a) => {
                    let answer = serve_group_ask(&node, a);
                    Box::pin(async move { Ok(answer.await.encode()) })
                }
                Err(e) => Box::pin(async move { Err(format!("bad group request: {e}")) }),
            },
            Some(&wire::REFS) => match RemoteRefs::decode(body) {
                Ok(r) => {
                    let answer = serve_refs(&node, r);
                    Box::pin(async move { Ok(answer.await.encode()) })
                }
                Err(e) => Box::pin(async move { Err(format!("bad copies: {e}")) }),
            },
            Some(&wire::CURSORS) => match RemoteCursors::decode(body) {
                Ok(c) => Box::pin(async move { Ok(serve_cursors(node, c).await?.encode()) }),
                Err(e) => Box::pin(async move { Err(format!("bad cursors: {e}")) }),
            },
            Some(&wire::EXPORT) => match ExportRequest::decode(body) {
                Ok(r) => {
                    let slots = self.slots.clone();
                    let lease = node.cluster.get().map_or(0, |c| c.lease());
                    Box::pin(async move {
                        tokio::task::spawn_blocking(move || slots.export(r, lease).encode())
                            .await
                            .map_err(|e| format!("export step failed: {e}"))
                    })
                }
                Err(e) => Box::pin(async move { Err(format!("bad export step: {e}")) }),
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

/// Queues a member's group message from another node on the group's
/// shard now (in arrival order, like sends); the future is the answer.
fn serve_group_send(node: &Node, g: RemoteGroupSend) -> impl Future<Output = SendAnswer> + Send {
    let id = g.client_msg_id;
    let queued = owned_here(node, g.shard, g.epoch, g.group).map(|()| {
        let (tx, rx) = oneshot::channel();
        node.shards.send_peer(
            g.group,
            ShardCmd::GroupSend(GroupSendCmd {
                group: g.group,
                sender: g.sender,
                sender_device: g.sender_device,
                client_msg_id: id,
                kind: g.kind,
                payload: g.payload,
                reply: GroupReply::Remote(tx),
                accepted: Instant::now(),
            }),
        );
        rx
    });
    async move {
        match queued {
            Ok(rx) => SendAnswer::Outcome {
                result: rx.await.unwrap_or_else(|_| unavailable(id)),
                stored: false,
            },
            Err((owner, epoch)) => SendAnswer::NotOwner { owner, epoch },
        }
    }
}

/// Queues a member's membership change, group info or receipt query from
/// another node on the group's shard now; the future is the answer frame.
fn serve_group_ask(node: &Node, a: RemoteGroupAsk) -> impl Future<Output = Answer<Body>> + Send {
    let group = match &a.body {
        Body::Group(r) => r.group,
        Body::ReceiptQuery { group, .. } => *group,
        Body::Business(r) => r.business,
        _ => 0,
    };
    let queued = owned_here(node, a.shard, a.epoch, group).map(|()| match a.body {
        Body::Group(r) => {
            let (tx, rx) = oneshot::channel();
            let op = GroupOpCmd {
                group,
                actor: a.asker,
                op: r.op,
                users: r.users,
                answer: tx,
            };
            node.shards.send_peer(group, ShardCmd::GroupOp(op));
            Box::pin(async move { answer_frame(rx.await, Body::GroupInfo) })
                as Pin<Box<dyn Future<Output = Body> + Send>>
        }
        Body::ReceiptQuery { group, seq } => {
            let (tx, rx) = oneshot::channel();
            let q = ReceiptQueryCmd {
                group,
                seq,
                asker: a.asker,
                answer: tx,
            };
            node.shards.send_peer(group, ShardCmd::ReceiptQuery(q));
            Box::pin(async move { answer_frame(rx.await, Body::ReceiptCounts) })
        }
        Body::Business(request) => {
            let (tx, rx) = oneshot::channel();
            let ask = BusinessAskCmd {
                customer: a.asker,
                request,
                answer: tx,
            };
            node.shards.send_peer(group, ShardCmd::BusinessAsk(ask));
            Box::pin(async move { answer_frame(rx.await, |body| body) })
        }
        // The decoder lets no other frame through.
        _ => Box::pin(async { error_frame(ErrorCode::INVALID_REQUEST, "not a group request") }),
    });
    async move {
        match queued {
            Ok(answer) => Answer::Done(answer.await),
            Err((owner, epoch)) => Answer::NotOwner { owner, epoch },
        }
    }
}

/// The client-protocol frame that answers a group request.
fn answer_frame<T>(
    answer: Result<Result<T, BrokerError>, oneshot::error::RecvError>,
    body: fn(T) -> Body,
) -> Body {
    match answer {
        Ok(Ok(t)) => body(t),
        Ok(Err(e)) => error_frame(e.code(), &e.to_string()),
        Err(_) => error_frame(ErrorCode::SHUTTING_DOWN, "the node is stopping"),
    }
}

fn error_frame(code: ErrorCode, why: &str) -> Body {
    Body::Error(Reason::new(code, why))
}

/// Stores copies of a group log entry for members this node owns (at the
/// epochs the group's node routed by), through their shards' peer queues;
/// the future answers once every shard's part has an outcome.
fn serve_refs(node: &Node, r: RemoteRefs) -> impl Future<Output = Answer<ErrorCode>> + Send {
    let owned = r.members.iter().try_for_each(|&m| {
        let shard = node
            .cluster
            .get()
            .and_then(|c| c.view().shard_of(m))
            .unwrap_or(u32::MAX);
        let epoch = r.epochs.iter().find(|&&(s, _)| s == shard).map(|&(_, e)| e);
        owned_here(node, shard, epoch.unwrap_or(-1), m)
    });
    let parts = owned.map(|()| {
        let message = Arc::new(r.message);
        let mut parts = Vec::new();
        for (_, members) in by_shard(r.members, node.shards.count()) {
            let (tx, rx) = oneshot::channel();
            let first = members[0];
            let refs = RefsCmd {
                group: r.group,
                message: message.clone(),
                members,
                copy: true,
                report: RefsReport::Remote(tx),
                accepted: Instant::now(),
            };
            node.shards.send_peer(first, ShardCmd::Refs(refs));
            parts.push(rx);
        }
        parts
    });
    async move {
        match parts {
            Ok(parts) => {
                let mut code = ErrorCode::OK;
                for part in parts {
                    match part.await {
                        Ok(ErrorCode::OK) => {}
                        Ok(failed) => code = failed,
                        Err(_) => code = ErrorCode::SHUTTING_DOWN,
                    }
                }
                Answer::Done(code)
            }
            Err((owner, epoch)) => Answer::NotOwner { owner, epoch },
        }
    }
}

/// `NotOwner` with who this node believes owns the first of `ids` it does
/// not hold, if any.
fn first_not_held<T>(cluster: &Cluster, ids: &[u64]) -> Option<Answer<T>> {
    let view = cluster.view();
    let id = ids.iter().find(|&&id| !view.holds(cluster.node_id(), id))?;
    let (owner, epoch) = view
        .owner_of(*id)
        .and_then(|(_, o)| o.map(|o| (o.node.clone(), o.epoch)))
        .unwrap_or_default();
    Some(Answer::NotOwner { owner, epoch })
}

/// Reads the group cursors of members this node owns (off the I/O
/// threads); a failed read fails the request.
async fn serve_cursors(node: Arc<Node>, c: RemoteCursors) -> Result<Answer<MemberCursors>, String> {
    let Some(cluster) = node.cluster.get() else {
        return Err("not a cluster node".into());
    };
    if let Some(not_owner) = first_not_held(cluster, &c.members) {
        return Ok(not_owner);
    }
    let store = node.store.clone();
    let read = tokio::task::spawn_blocking(move || {
        let mut out = Vec::with_capacity(c.members.len());
        for m in c.members {
            let cursors = match store.get(&keys::cursor(c.group, m))? {
                Some(v) => Cursors::decode(&v),
                None => Cursors::default(),
            };
            out.push((m, cursors.delivered, cursors.read));
        }
        Ok::<_, courier_storage::StoreError>(out)
    })
    .await;
    match read {
        Ok(Ok(cursors)) => Ok(Answer::Done(cursors)),
        Ok(Err(e)) => Err(format!("reading group cursors: {e}")),
        Err(e) => Err(format!("reading group cursors: {e}")),
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
    if let Some(not_owner) = first_not_held(cluster, &q.posters) {
        return Ok(not_owner);
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
        covers_seq: s.covers_seq,
        done: Completion::Remote(tx),
        accepted: Instant::now(),
    });
    // The shard's unbounded peer queue, as for another shard's commands:
    // queued without waiting, so in arrival order; bounded in practice by
    // the senders' in-flight permits and outbox rows at the other node.
    node.shards.send_peer(s.recipient, cmd);
    Ok((id, rx))
}

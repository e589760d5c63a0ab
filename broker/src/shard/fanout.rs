//! Fan-out: how one message reaches many inboxes. Every plan is made here,
//! on the shard that owns the answer; sessions only ask.
//!
//! - **Group references** (groups up to `groups.log_threshold` members):
//!   after the log write, each members' shard appends a 25-byte reference
//!   to the log entry to each member's inbox (`RefsCmd`, one per shard) and
//!   reports with `RefsDone`. The sender's ack waits for every part, so an
//!   ack means durable for every member. References are idempotent per
//!   member (scoped key), and the log remembers how far fan-out is complete
//!   (the `F` row), so a crash between the log write and the references is
//!   repaired at start (`recover_fanouts`).
//! - **Group log** (larger groups): the log write is the whole durable
//!   write; the ack follows it. Online members get a live push through
//!   their shard (`GroupPush`); every session reads the logs of its
//!   log-strategy groups from its own cursor on catch-up.
//! - **Broadcast lists**: the sender's shard reads the list and plans one
//!   one-to-one copy per recipient (scoped idempotency keys); the session
//!   queues the copies on the recipients' shards, which check consent
//!   (the recipient has the sender as a contact; a copy without it is
//!   answered `FORBIDDEN` and counted skipped), each reports with
//!   `CopyDone`, and the sender's shard answers when all are durable.
//!
//! Receipts, the other fan-out (one mark, many senders), are in `receipts`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use courier_protocol::{BroadcastAck, Destination, ErrorCode, Message, SendResult};
use courier_storage::{KvOp, StoreError, StoredMessage};
use tracing::{debug, error, warn};

use super::business::Outgoing;
use super::core::Shard;
use super::groups::recipients_of;
use super::messages::{
    BroadcastCmd, BusinessOutcome, Completion, GroupReply, RefsCmd, RefsReport, SendCmd, ShardCmd,
};
use super::route::by_shard;
use super::tracking::{HeldFanout, PendingBroadcast, PendingFanout};
use crate::error::BrokerError;
use crate::state::keys;
use crate::state::message::to_wire;
use crate::state::rows::{FanMark, GroupState};
use crate::state::social;

/// How long a group entry's fan-out may stay open before it is logged
/// (once): its senders' answers wait for it, so a fan-out that fails for
/// that long is stuck somewhere worth a look.
const FANOUT_LONG: Duration = Duration::from_secs(60);

impl Shard {
    /// Sends a just-written membership event to the members.
    pub(crate) fn announce(&mut self, g: u64, message: Arc<Message>, state: &GroupState) {
        let recipients = recipients_of(state, &message);
        if message.seq >= state.log_from {
            self.push_log(g, message, recipients, Instant::now());
        } else {
            self.fan_refs(g, message, recipients, None, Instant::now());
        }
    }

    /// Live push of a log-strategy message to the recipients' sessions.
    pub(crate) fn push_log(
        &mut self,
        g: u64,
        message: Arc<Message>,
        recipients: Vec<u64>,
        accepted: Instant,
    ) {
        for (shard, users) in by_shard(recipients, self.peers.len()) {
            let push = ShardCmd::GroupPush {
                group: g,
                message: message.clone(),
                users,
                accepted,
            };
            self.to_shard(shard, push);
        }
    }

    /// Sends references to every recipient's shard; the last part's
    /// `RefsDone` sends `answer`.
    ///
    /// One fan-out of an entry at a time: a retry's answer joins the one
    /// under way (its parts count once), and waits for nothing when the
    /// last one stored every part. An entry held back behind an earlier
    /// one (see [`Shard::held_back`]) waits for its turn with its answers.
    pub(crate) fn fan_refs(
        &mut self,
        g: u64,
        message: Arc<Message>,
        recipients: Vec<u64>,
        answer: Option<(GroupReply, SendResult)>,
        accepted: Instant,
    ) {
        if let Some(p) = self
            .fanouts
            .get_mut(&g)
            .and_then(|f| f.get_mut(&message.seq))
        {
            if p.remaining > 0 || p.held.is_some() {
                p.answers.extend(answer);
                return;
            }
            if p.failed.is_none() {
                if let Some((reply, result)) = answer {
                    reply.send(result);
                }
                return;
            }
        }
        let seq = message.seq;
        if self.held_back(g, seq) {
            let held = PendingFanout {
                remaining: 0,
                failed: None,
                answers: answer.into_iter().collect(),
                held: Some(HeldFanout {
                    message,
                    recipients,
                    accepted,
                }),
                since: Instant::now(),
                warned: false,
            };
            debug!(shard = self.id, group = g, entry = seq, "fan-out held back");
            self.fanouts.entry(g).or_default().insert(seq, held);
            return;
        }
        self.send_refs(
            g,
            message,
            recipients,
            answer.into_iter().collect(),
            accepted,
        );
    }

    /// Whether entry `seq` of group `g` must wait for the entries before
    /// it: behind one that is held itself (always), or, while shards move
    /// (see [`Remote::shards_moving`](super::core::Remote::shards_moving)),
    /// behind any not yet stored for every member. A member's part can
    /// then fail at the node it is leaving while a later entry's part goes
    /// to the node it joined, and the retry would land after it; so the
    /// group's entries go one at a time, each once the one before is
    /// stored (chained in `refs_done`). Other groups are not held.
    fn held_back(&self, g: u64, seq: u64) -> bool {
        let Some(earlier) = self.fanouts.get(&g).map(|f| f.range(..seq)) else {
            return false;
        };
        let moving = self.shards_moving();
        earlier
            .into_iter()
            .any(|(_, p)| p.held.is_some() || moving && !p.succeeded())
    }

    /// Sends entry `message`'s fan-out: references by shard for members
    /// here, copies for members on other nodes.
    fn send_refs(
        &mut self,
        g: u64,
        message: Arc<Message>,
        recipients: Vec<u64>,
        answers: Vec<(GroupReply, SendResult)>,
        accepted: Instant,
    ) {
        // Members this node holds get references, by shard; the others
        // (on other cluster nodes) one bundle of copies, which the router
        // splits by node.
        let (here, elsewhere) = self.split_here(recipients);
        debug!(
            shard = self.id,
            group = g,
            entry = message.seq,
            here = here.len(),
            elsewhere = elsewhere.len(),
            "fan-out sent"
        );
        let parts = by_shard(here, self.peers.len());
        // A retry keeps the first attempt's time.
        let (since, warned) = self
            .fanouts
            .get(&g)
            .and_then(|f| f.get(&message.seq))
            .map_or((Instant::now(), false), |p| (p.since, p.warned));
        let mut pending = PendingFanout {
            remaining: parts.len() + usize::from(!elsewhere.is_empty()),
            failed: None,
            answers,
            held: None,
            since,
            warned,
        };
        if pending.remaining == 0 {
            pending.answer();
        }
        self.fanouts
            .entry(g)
            .or_default()
            .insert(message.seq, pending);
        // On a cluster node members here get copies too: shards move, and a
        // reference would outlive its log's place in this store (the group
        // or the member moving away).
        let copy_here = self.remote.get().is_some();
        for (shard, members) in parts {
            let refs = RefsCmd {
                group: g,
                message: message.clone(),
                members,
                copy: copy_here,
                report: RefsReport::Group,
                accepted,
            };
            self.to_shard(shard, ShardCmd::Refs(refs));
        }
        if let Some(&first) = elsewhere.first() {
            let copies = RefsCmd {
                group: g,
                message,
                members: elsewhere,
                copy: true,
                report: RefsReport::Group,
                accepted,
            };
            self.to_peer(first, ShardCmd::Refs(copies));
        }
    }

    /// Sends what group `g` may send now, oldest first: fan-outs that
    /// failed (again, to the members as the group stands now; members'
    /// shards skip what they already have) and held ones. While shards
    /// move, only up to the first entry not yet stored.
    fn advance(&mut self, g: u64) {
        let moving = self.shards_moving();
        let Some(entries) = self.fanouts.get(&g) else {
            return;
        };
        let mut next = Vec::new();
        let mut long = None;
        for (&seq, p) in entries {
            if p.succeeded() {
                continue;
            }
            if !p.warned && p.since.elapsed() > FANOUT_LONG {
                long.get_or_insert((seq, p.since.elapsed(), p.failed));
            }
            if p.to_retry() || p.held.is_some() {
                next.push(seq);
            }
            if moving {
                break;
            }
        }
        let mut not_here = false;
        for seq in next {
            let held = self
                .fanouts
                .get_mut(&g)
                .and_then(|f| f.get_mut(&seq))
                .and_then(|p| p.held.take().map(|h| (h, std::mem::take(&mut p.answers))));
            match held {
                Some((h, answers)) => {
                    self.send_refs(g, h.message, h.recipients, answers, h.accepted)
                }
                None => {
                    match self.refan(g, seq) {
                        Ok(()) => {}
                        // The group's shard is not served here now (a fenced
                        // copy, a shard leaving): retried on every tick until
                        // it is served again or gone, so not a warning each
                        // time.
                        Err(e @ StoreError::Unreplicated(_)) => {
                            not_here = true;
                            debug!(shard = self.id, group = g, seq, error = %e, "fan-out retry waits: the group is not served here now")
                        }
                        Err(e) => {
                            warn!(shard = self.id, group = g, seq, error = %e, "fan-out retry failed")
                        }
                    }
                }
            }
        }
        if let Some((seq, open_for, failed)) = long.filter(|_| !not_here) {
            // Said once per entry: its sends (and the entries after it,
            // while shards move) wait unanswered meanwhile. Not for a group
            // whose shard is not served here now: its owner fans it out.
            warn!(
                shard = self.id,
                group = g,
                entry = seq,
                open_for = ?open_for,
                failed = ?failed.map(|c| c.0),
                moving,
                "a group entry's fan-out has not reached every member for {FANOUT_LONG:?}: its senders' answers wait; it is sent again each tick"
            );
            if let Some(p) = self.fanouts.get_mut(&g).and_then(|f| f.get_mut(&seq)) {
                p.warned = true;
            }
        }
    }

    /// Reports one part of a reference fan-out to whoever counts the parts.
    pub(crate) fn report_refs(&self, report: RefsReport, g: u64, seq: u64, code: ErrorCode) {
        report.send(g, seq, code, |done| self.to_peer(g, done));
    }

    /// Sends again the reference fan-outs that a part failed (a member's
    /// node out of reach), and held ones whose turn came: on the shard's
    /// tick, until every part is stored.
    pub(crate) fn retry_fanouts(&mut self) {
        let groups: Vec<u64> = self
            .fanouts
            .iter()
            .filter(|(_, f)| f.values().any(|p| p.to_retry() || p.held.is_some()))
            .map(|(&g, _)| g)
            .collect();
        for g in groups {
            self.advance(g);
        }
    }

    /// Fans the log entry `seq` of group `g` out again, to its recipients
    /// as the group stands now.
    fn refan(&mut self, g: u64, seq: u64) -> Result<(), StoreError> {
        let Some(c) = self.group(g)? else {
            return Ok(());
        };
        let state = c.state.clone();
        match self.store.read_after(g, seq - 1, 1)?.into_iter().next() {
            // The sender's answer (if still waiting) was sent with the failure.
            Some(m) if m.seq == seq => self.fan_again(g, &state, m),
            _ => Ok(()),
        }
    }

    /// Fans a stored log entry of group `g` out again (recovery, retries),
    /// to its recipients in `state`; no one waits for the answer.
    fn fan_again(
        &mut self,
        g: u64,
        state: &GroupState,
        m: StoredMessage,
    ) -> Result<(), StoreError> {
        let msg = Arc::new(to_wire(m)?);
        let recipients = recipients_of(state, &msg);
        self.fan_refs(g, msg, recipients, None, Instant::now());
        Ok(())
    }

    /// One members' shard stored its part of a reference fan-out; an
    /// entry stored for every member lets the next ones of its group go.
    pub(crate) fn refs_done(&mut self, g: u64, seq: u64, code: ErrorCode) {
        debug!(
            shard = self.id,
            group = g,
            entry = seq,
            code = code.0,
            "fan-out part done"
        );
        match self.fanouts.get_mut(&g).and_then(|f| f.get_mut(&seq)) {
            Some(pending) => {
                pending.part_done(code);
                let held = |f: &BTreeMap<u64, PendingFanout>| f.values().any(|p| p.held.is_some());
                if pending.succeeded() && self.fanouts.get(&g).is_some_and(held) {
                    self.advance(g);
                }
            }
            None => error!(
                shard = self.id,
                group = g,
                seq,
                "a fan-out part for nothing in flight"
            ),
        }
    }

    /// Records how far reference fan-out is complete, for recovery. Looks
    /// only at groups with fan-outs not yet recorded, so a batch costs
    /// nothing for the other groups this shard has touched.
    pub(crate) fn note_fanned(&mut self) {
        let groups: Vec<u64> = self.fanouts.keys().copied().collect();
        for g in groups {
            let pending = self.fanouts.get_mut(&g).expect("listed");
            while let Some(entry) = pending.first_entry() {
                if entry.get().succeeded() {
                    entry.remove();
                } else {
                    break;
                }
            }
            let first_open = pending.first_key_value().map(|(&seq, _)| seq);
            if first_open.is_none() {
                self.fanouts.remove(&g);
            }
            let upto = match first_open {
                Some(seq) => seq - 1,
                // Everything written is fanned out: every log entry gets its
                // fan-out registered right after the write that stored it.
                None => match self.store.state(g) {
                    Ok(s) => s.head_seq,
                    Err(e) => {
                        warn!(shard = self.id, group = g, error = %e, "reading a group head failed");
                        continue;
                    }
                },
            };
            if let Some(c) = self.groups.get_mut(&g) {
                if upto > c.fanned {
                    c.fanned = upto;
                    self.kv.push(KvOp::Put {
                        key: keys::fanned(g),
                        value: FanMark(upto).encode(),
                    });
                }
            }
        }
    }

    /// Completes reference fan-outs a crash interrupted (`marks`: this
    /// shard's groups and their `F` marks, read once for all shards by
    /// `fan_out_marks`): every group entry after the recorded mark (and
    /// before the group switched to the log strategy) is fanned out again;
    /// members' shards skip references they already have.
    pub(crate) fn recover_fanouts(&mut self, marks: Vec<(u64, u64)>) {
        for (g, fanned) in marks {
            if let Err(e) = self.recover_group(g, fanned) {
                error!(shard = self.id, group = g, error = %e, "fan-out recovery failed");
            }
        }
    }

    fn recover_group(&mut self, g: u64, fanned: u64) -> Result<(), StoreError> {
        let Some(c) = self.group(g)? else {
            return Ok(());
        };
        let state = c.state.clone();
        let end = self
            .store
            .state(g)?
            .head_seq
            .min(state.log_from.saturating_sub(1));
        let mut after = fanned;
        let mut redone = 0usize;
        while after < end {
            let page = self.store.read_after(g, after, 256)?;
            if page.is_empty() {
                break;
            }
            for m in page {
                if m.seq > end {
                    break;
                }
                after = m.seq;
                self.fan_again(g, &state, m)?;
                redone += 1;
            }
        }
        if redone > 0 {
            warn!(
                shard = self.id,
                group = g,
                redone,
                "completed interrupted group fan-out"
            );
        }
        Ok(())
    }

    /// Plans a broadcast on the sender's shard: one copy per recipient on
    /// the list, handed back to the session to queue in order; each
    /// recipient's shard checks consent (see `plan_send`).
    pub(crate) fn plan_broadcast(&mut self, b: BroadcastCmd) {
        let recipients = match social::get_list(&*self.store, b.sender, b.list) {
            Ok(v) => v,
            Err(e) => {
                if let BrokerError::Storage(e) = &e {
                    error!(shard = self.id, error = %e, "broadcast list lookup failed");
                }
                b.reply.broadcast(Err(e.code()));
                let _ = b.copies.send(Vec::new());
                return;
            }
        };
        // A business's list: each recipient passes the business rules here
        // (the consent ledger, not the contact list) and gets its own
        // rendering; a recipient refused by a rule is skipped.
        let business = self.is_business(b.sender);
        let mut skipped = 0u16;
        let mut admitted: Vec<(u64, Bytes)> = Vec::with_capacity(recipients.len());
        for recipient in recipients {
            if !business {
                admitted.push((recipient, b.payload.clone()));
                continue;
            }
            let outgoing = Outgoing {
                business: b.sender,
                customer: recipient,
                client_msg_id: b.client_msg_id,
                kind: b.kind,
                payload: &b.payload,
                campaign: None,
            };
            match self.check_business_send(&outgoing) {
                Ok(payload) => admitted.push((recipient, payload)),
                Err(_) => skipped += 1,
            }
        }
        let token = self.token();
        let pending = PendingBroadcast {
            remaining: admitted.len(),
            failed: None,
            stored: 0,
            duplicates: 0,
            last_id: 0,
            last_ts: 0,
            reply: b.reply,
            ack: BroadcastAck {
                client_msg_id: b.client_msg_id,
                server_msg_id: 0,
                timestamp_ms: 0,
                delivered: 0,
                skipped,
                duplicate: false,
            },
        };
        if admitted.is_empty() {
            pending.answer();
            let _ = b.copies.send(Vec::new());
            return;
        }
        self.broadcasts.insert(token, pending);
        let accepted = Instant::now();
        let copies = admitted
            .into_iter()
            .map(|(recipient, payload)| SendCmd {
                sender: b.sender,
                sender_device: b.sender_device,
                recipient,
                client_msg_id: b.client_msg_id,
                // A business's copy is one-to-one for its customer: its
                // consent was checked here.
                destination: if business {
                    Destination::User(recipient)
                } else {
                    Destination::List(b.list)
                },
                scope: recipient,
                kind: b.kind,
                payload,
                covers_seq: 0,
                done: Completion::Copy {
                    sender: b.sender,
                    token,
                    recipient,
                },
                accepted,
            })
            .collect();
        let _ = b.copies.send(copies);
    }

    /// One copy of a broadcast has an outcome; the last one answers. A
    /// business's copy moves its message's status for the recipient.
    pub(crate) fn copy_done(
        &mut self,
        sender: u64,
        token: u64,
        recipient: u64,
        result: SendResult,
        stored: bool,
    ) {
        if self.campaign_outcome(token, recipient, result) {
            return;
        }
        if self.is_business(sender) {
            self.business_outcome(BusinessOutcome {
                business: sender,
                customer: recipient,
                result,
            });
        }
        let Some(pending) = self.broadcasts.get_mut(&token) else {
            error!(
                shard = self.id,
                token, "a broadcast copy for nothing in flight"
            );
            return;
        };
        if pending.copy_done(&result, stored) {
            pending.answer();
            self.broadcasts.remove(&token);
        }
    }
}

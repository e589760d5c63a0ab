//! Groups, as run by the shard that owns the group id.
//!
//! The owning shard is the group's only writer and its sequencer: the group
//! log is an inbox (keyed by the group id, whose top bit no user id has) that
//! holds every message and membership event once, in the order all members
//! see. Two ways to reach members (see `docs/ARCHITECTURE.md`):
//!
//! - **refs** (up to `groups.log_threshold` members): after the log write,
//!   each member's shard appends a 25-byte reference to the log entry to the
//!   member's inbox (`ShardCmd::Refs`, one command per shard). The sender's
//!   ack waits for every part ([`Fanout`]), so an ack means durable for every
//!   member. References are idempotent per member (scoped key), and the log
//!   remembers how far fan-out is complete (`F` key), so a crash between the
//!   log write and the references is repaired at start (`recover_fanouts`).
//! - **log** (larger groups): the log write is the whole durable write; the
//!   ack follows it. Online members get a live push through their shard
//!   (`ShardCmd::GroupPush`); every session reads the logs of its
//!   log-strategy groups from its own cursor on catch-up.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Instant;

use courier_protocol::{
    Destination, ErrorCode, GroupEvent, GroupEventKind, GroupInfo, GroupOp, Message, MessageKind,
    ReceiptCounts, Role, SendResult, Strategy, GROUP_ID_BIT,
};
use courier_storage::{
    AppendOutcome, IdempotencyKey, KvOp, NewMessage, Record, StoreError, StoredMessage,
};
use tracing::{error, warn};

use crate::keys::{self, GroupState, Member, NONE};
use crate::shard::{
    by_shard, fail, shard_of, to_wire, Fanout, FanoutAnswer, GroupOpCmd, GroupSendCmd, OpResult,
    Planned, RefsCmd, ReplyTo, Shard, ShardCmd,
};

/// A group this shard owns, as cached after first touch.
pub struct GroupCache {
    pub state: GroupState,
    /// Reference fan-outs not yet known complete, by group sequence.
    pub pending: BTreeMap<u64, Arc<Fanout>>,
    /// How far fan-out is recorded as complete (the `F` key).
    pub fanned: u64,
}

fn storage(e: StoreError) -> (ErrorCode, String) {
    error!(error = %e, "group storage error");
    (ErrorCode::INTERNAL, "storage error".into())
}

fn err<T>(code: ErrorCode, msg: impl Into<String>) -> OpResult<T> {
    Err((code, msg.into()))
}

/// A user id that may be a member (not 0, not a group id).
pub fn valid_user(u: u64) -> bool {
    u != 0 && u & GROUP_ID_BIT == 0
}

impl Shard {
    /// The group, loaded on first touch; `None` if it does not exist.
    pub(crate) fn group(&mut self, g: u64) -> Result<Option<&mut GroupCache>, StoreError> {
        if !self.groups.contains_key(&g) {
            let Some(v) = self.store.get(&keys::group(g))? else {
                return Ok(None);
            };
            let state = GroupState::decode(&v).ok_or_else(|| StoreError::Corrupt {
                what: "group state",
                detail: format!("group {g:#x}"),
            })?;
            let fanned = match self.store.get(&keys::fanned(g))? {
                Some(v) => keys::be_u64(&v, 0).unwrap_or(0),
                None => 0,
            };
            self.groups.insert(
                g,
                GroupCache {
                    state,
                    pending: BTreeMap::new(),
                    fanned,
                },
            );
        }
        Ok(self.groups.get_mut(&g))
    }

    /// Validates a group send and plans its log append.
    pub(crate) fn plan_group_send(
        &mut self,
        cmd: GroupSendCmd,
        appends: &mut Vec<NewMessage>,
    ) -> Option<Planned> {
        let recipients = match self.group(cmd.group) {
            Ok(Some(c)) if c.state.member(cmd.sender).is_some() => c
                .state
                .members
                .iter()
                .map(|m| m.user)
                .filter(|&u| u != cmd.sender)
                .collect(),
            Ok(_) => {
                cmd.reply
                    .send(fail(cmd.client_msg_id, ErrorCode::NOT_A_MEMBER));
                return None;
            }
            Err(e) => {
                error!(shard = self.id, error = %e, "loading a group failed");
                cmd.reply.send(fail(cmd.client_msg_id, ErrorCode::INTERNAL));
                return None;
            }
        };
        let (ts, id) = self.next_ids();
        appends.push(NewMessage {
            inbox: cmd.group,
            idempotency: Some(IdempotencyKey::new(cmd.sender, cmd.client_msg_id)),
            reference: None,
            record: Record {
                server_msg_id: id,
                sender: cmd.sender,
                sender_device: cmd.sender_device,
                client_msg_id: cmd.client_msg_id,
                timestamp_ms: ts,
                dest_tag: Destination::Group(cmd.group).tag(),
                dest_id: cmd.group,
                kind: cmd.kind as u8,
                payload: cmd.payload.clone(),
            },
        });
        Some(Planned::GroupSend { cmd, recipients })
    }

    pub(crate) fn finish_group_send(
        &mut self,
        cmd: GroupSendCmd,
        recipients: Vec<u64>,
        m: NewMessage,
        outcome: AppendOutcome,
    ) {
        let g = cmd.group;
        let (p, duplicate) = match outcome {
            AppendOutcome::Stored(p) => (p, false),
            AppendOutcome::Duplicate(p) => (p, true),
            AppendOutcome::Conflict => {
                cmd.reply
                    .send(fail(cmd.client_msg_id, ErrorCode::CLIENT_ID_REUSED));
                return;
            }
        };
        let result = SendResult {
            client_msg_id: cmd.client_msg_id,
            code: ErrorCode::OK,
            server_msg_id: p.server_msg_id,
            seq: p.seq,
            timestamp_ms: p.timestamp_ms,
            duplicate,
        };
        // A retry delivers the original (its ids and body), to the members
        // it was addressed to: the fan-out may not have completed before.
        let (message, recipients) = if duplicate {
            let original = match self.store.read_after(g, p.seq - 1, 1) {
                Ok(mut v) if v.first().map(|m| m.seq) == Some(p.seq) => v.remove(0),
                other => {
                    error!(
                        shard = self.id,
                        group = g,
                        ?other,
                        "group message of a retry not readable"
                    );
                    cmd.reply.send(fail(cmd.client_msg_id, ErrorCode::INTERNAL));
                    return;
                }
            };
            let recipients = match self.group(g) {
                Ok(Some(c)) => c
                    .state
                    .members
                    .iter()
                    .filter(|m| m.joined_seq < p.seq && m.user != cmd.sender)
                    .map(|m| m.user)
                    .collect(),
                _ => Vec::new(),
            };
            (original, recipients)
        } else {
            self.stats.group_messages.inc();
            crate::metrics::Metrics::since(&self.stats.accept_to_durable, cmd.accepted);
            (
                StoredMessage {
                    seq: p.seq,
                    record: m.record,
                    via: None,
                },
                recipients,
            )
        };
        let message = match to_wire(message) {
            Ok(m) => Arc::new(m),
            Err(e) => {
                error!(shard = self.id, error = %e, "group message not representable");
                cmd.reply.send(fail(cmd.client_msg_id, ErrorCode::INTERNAL));
                return;
            }
        };
        let log_from = self.groups.get(&g).map_or(NONE, |c| c.state.log_from);
        self.stats.fanout_size.observe(recipients.len() as f64);
        if p.seq >= log_from {
            cmd.reply.send(result);
            self.push_log(g, message, recipients, cmd.accepted);
        } else {
            self.fan_refs(
                g,
                message,
                recipients,
                Some(cmd.reply),
                result,
                cmd.accepted,
            );
        }
    }

    /// Live push of a log-strategy message to the recipients' sessions.
    fn push_log(&mut self, g: u64, message: Arc<Message>, recipients: Vec<u64>, accepted: Instant) {
        for (shard, users) in by_shard(recipients, self.peers.len()) {
            self.to_shard(
                shard,
                ShardCmd::GroupPush {
                    group: g,
                    message: message.clone(),
                    users,
                    accepted,
                },
            );
        }
    }

    /// Sends references to every recipient's shard; the last part answers.
    fn fan_refs(
        &mut self,
        g: u64,
        message: Arc<Message>,
        recipients: Vec<u64>,
        reply: Option<ReplyTo>,
        result: SendResult,
        accepted: Instant,
    ) {
        let parts = by_shard(recipients, self.peers.len());
        let fanout = Fanout::new(parts.len(), FanoutAnswer::Group(reply, result));
        if let Some(c) = self.groups.get_mut(&g) {
            c.pending.insert(message.seq, fanout.clone());
            self.fanning.insert(g);
        }
        if parts.is_empty() {
            fanout.answer();
            return;
        }
        for (shard, members) in parts {
            self.to_shard(
                shard,
                ShardCmd::Refs(RefsCmd {
                    group: g,
                    message: message.clone(),
                    members,
                    fanout: fanout.clone(),
                    accepted,
                }),
            );
        }
    }

    /// Records how far reference fan-out is complete, for recovery. Looks
    /// only at groups with fan-outs not yet recorded (`fanning`), so a batch
    /// costs nothing for the other groups this shard has touched.
    pub(crate) fn note_fanned(&mut self) {
        let fanning: Vec<u64> = self.fanning.iter().copied().collect();
        for g in fanning {
            let Some(c) = self.groups.get_mut(&g) else {
                self.fanning.remove(&g);
                continue;
            };
            while let Some(entry) = c.pending.first_entry() {
                if entry.get().succeeded() {
                    entry.remove();
                } else {
                    break;
                }
            }
            let upto = match c.pending.first_key_value() {
                Some((&seq, _)) => seq - 1,
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
            if upto > c.fanned {
                c.fanned = upto;
                self.kv.push(KvOp::Put {
                    key: keys::fanned(g),
                    value: upto.to_be_bytes().to_vec(),
                });
            }
            if c.pending.is_empty() {
                self.fanning.remove(&g);
            }
        }
    }

    /// Completes reference fan-outs a crash interrupted (`marks`: this
    /// shard's groups and their `F` marks, read once for all shards by
    /// [`fan_out_marks`]): every group entry
    /// after the recorded `F` mark (and before the group switched to the log
    /// strategy) is fanned out again; members' shards skip references they
    /// already have.
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
                let msg = Arc::new(to_wire(m)?);
                let recipients = recipients_of(&state, &msg);
                let result = SendResult {
                    client_msg_id: msg.client_msg_id,
                    code: ErrorCode::OK,
                    server_msg_id: msg.server_msg_id,
                    seq: msg.seq,
                    timestamp_ms: msg.timestamp_ms,
                    duplicate: true,
                };
                self.fan_refs(g, msg, recipients, None, result, Instant::now());
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

    pub(crate) fn group_op(&mut self, op: GroupOpCmd) {
        let result = self.try_group_op(&op);
        let _ = op.reply.send(result);
    }

    fn try_group_op(&mut self, op: &GroupOpCmd) -> OpResult<GroupInfo> {
        let g = op.group;
        let actor = op.actor;
        if let Some(&bad) = op.users.iter().find(|&&u| !valid_user(u)) {
            return err(
                ErrorCode::INVALID_REQUEST,
                format!("{bad:#x} is not a user id"),
            );
        }
        let mut users: Vec<u64> = Vec::with_capacity(op.users.len());
        for &u in &op.users {
            if !users.contains(&u) {
                users.push(u);
            }
        }
        let max_members = self.config.max_group_members;
        let existing = self.group(g).map_err(storage)?.map(|c| c.state.clone());
        // The store's head is the truth (every planned write is done).
        let head = self.store.state(g).map_err(storage)?.head_seq;
        // Where each current member joined, for the rows of those who leave.
        let joined: HashMap<u64, u64> = existing
            .iter()
            .flat_map(|s| s.members.iter().map(|m| (m.user, m.joined_seq)))
            .collect();
        let e = head + 1; // the event's group sequence
        let (state, kind, concerned) = match (op.op, existing) {
            (GroupOp::Create, Some(_)) => return err(ErrorCode::INVALID_REQUEST, "group exists"),
            (GroupOp::Create, None) => {
                users.retain(|&u| u != actor);
                if users.len() + 1 > max_members {
                    return err(
                        ErrorCode::GROUP_FULL,
                        format!("{} members; at most {max_members}", users.len() + 1),
                    );
                }
                let mut all = vec![actor];
                all.extend(&users);
                self.check_group_limits(&all)?;
                let mut members = vec![Member {
                    user: actor,
                    role: Role::Admin,
                    joined_seq: e,
                }];
                members.extend(users.iter().map(|&user| Member {
                    user,
                    role: Role::Member,
                    joined_seq: e,
                }));
                let state = GroupState {
                    strategy: Strategy::Refs,
                    log_from: NONE,
                    members,
                };
                (state, GroupEventKind::Created, all)
            }
            (_, None) => return err(ErrorCode::NOT_A_MEMBER, "no such group"),
            (_, Some(s)) if s.member(actor).is_none() => {
                return err(ErrorCode::NOT_A_MEMBER, "not a member of this group")
            }
            (GroupOp::Info, Some(s)) => return Ok(info(g, head, &s)),
            (GroupOp::Leave, Some(mut s)) => {
                s.members.retain(|m| m.user != actor);
                (s, GroupEventKind::Left, vec![actor])
            }
            (op_kind, Some(mut s)) => {
                if !s.is_admin(actor) {
                    return err(ErrorCode::NOT_GROUP_ADMIN, "only admins may do this");
                }
                if users.is_empty() {
                    return err(ErrorCode::INVALID_REQUEST, "no users given");
                }
                match op_kind {
                    GroupOp::Add => {
                        users.retain(|&u| s.member(u).is_none());
                        if users.is_empty() {
                            return err(ErrorCode::INVALID_REQUEST, "already members");
                        }
                        if s.members.len() + users.len() > max_members {
                            return err(
                                ErrorCode::GROUP_FULL,
                                format!(
                                    "{} members; at most {max_members}",
                                    s.members.len() + users.len()
                                ),
                            );
                        }
                        self.check_group_limits(&users)?;
                        s.members.extend(users.iter().map(|&user| Member {
                            user,
                            role: Role::Member,
                            joined_seq: e,
                        }));
                        (s, GroupEventKind::Added, users)
                    }
                    GroupOp::Remove | GroupOp::Promote | GroupOp::Demote => {
                        if let Some(u) = users.iter().find(|&&u| s.member(u).is_none()) {
                            return err(ErrorCode::INVALID_REQUEST, format!("{u} is not a member"));
                        }
                        let kind = match op_kind {
                            GroupOp::Remove => {
                                s.members.retain(|m| !users.contains(&m.user));
                                GroupEventKind::Removed
                            }
                            GroupOp::Promote | GroupOp::Demote => {
                                let role = if op_kind == GroupOp::Promote {
                                    Role::Admin
                                } else {
                                    Role::Member
                                };
                                for m in s.members.iter_mut().filter(|m| users.contains(&m.user)) {
                                    m.role = role;
                                }
                                if role == Role::Admin {
                                    GroupEventKind::Promoted
                                } else {
                                    GroupEventKind::Demoted
                                }
                            }
                            _ => unreachable!("matched above"),
                        };
                        (s, kind, users)
                    }
                    _ => return err(ErrorCode::INVALID_REQUEST, "unknown group operation"),
                }
            }
        };
        let mut state = state;
        // A group is never without an admin while it has members.
        if !state.members.is_empty() && !state.members.iter().any(|m| m.role == Role::Admin) {
            state.members[0].role = Role::Admin;
        }
        let mut kv = Vec::new();
        let switched =
            state.strategy == Strategy::Refs && state.members.len() > self.config.log_threshold;
        if switched {
            state.strategy = Strategy::Log;
            state.log_from = e;
        }
        let row = |m: &Member, left: u64, log_from: u64| {
            let mut v = keys::pair(m.joined_seq, left);
            v.extend_from_slice(&log_from.to_be_bytes());
            v
        };
        let gone = matches!(kind, GroupEventKind::Removed | GroupEventKind::Left);
        for m in &state.members {
            if switched
                || (!gone
                    && concerned.contains(&m.user)
                    && kind != GroupEventKind::Promoted
                    && kind != GroupEventKind::Demoted)
            {
                kv.push(KvOp::Put {
                    key: keys::user_group(m.user, g),
                    value: row(m, NONE, state.log_from),
                });
            }
        }
        if gone {
            for &u in &concerned {
                kv.push(if state.strategy == Strategy::Log {
                    // The member's log stream ends with this event.
                    KvOp::Put {
                        key: keys::user_group(u, g),
                        value: row(
                            &Member {
                                user: u,
                                role: Role::Member,
                                joined_seq: joined.get(&u).copied().unwrap_or(e),
                            },
                            e,
                            state.log_from,
                        ),
                    }
                } else {
                    KvOp::Delete {
                        key: keys::user_group(u, g),
                    }
                });
            }
        }
        kv.push(KvOp::Put {
            key: keys::group(g),
            value: state.encode(),
        });
        if op.op == GroupOp::Create {
            kv.push(KvOp::Put {
                key: keys::fanned(g),
                value: 0u64.to_be_bytes().to_vec(),
            });
        }
        let (ts, id) = self.next_ids();
        let event = GroupEvent {
            kind,
            actor,
            users: concerned.clone(),
        };
        let record = Record {
            server_msg_id: id,
            sender: actor,
            sender_device: 0,
            client_msg_id: 0,
            timestamp_ms: ts,
            dest_tag: Destination::Group(g).tag(),
            dest_id: g,
            kind: MessageKind::System as u8,
            payload: event.encode(),
        };
        let append = NewMessage {
            inbox: g,
            idempotency: None,
            reference: None,
            record: record.clone(),
        };
        let outcome = match self.store.append_with(&[append], &kv, crate::now_ms()) {
            Ok(o) => o,
            // The cache still holds the state before the change: valid.
            Err(e) => return Err(storage(e)),
        };
        match outcome.first() {
            Some(AppendOutcome::Stored(p)) if p.seq == e => {}
            other => {
                self.groups.remove(&g);
                error!(
                    shard = self.id,
                    group = g,
                    ?other,
                    expected = e,
                    "group event landed elsewhere"
                );
                return err(ErrorCode::INTERNAL, "storage error");
            }
        }
        match self.groups.get_mut(&g) {
            Some(c) => c.state = state.clone(),
            None => {
                self.groups.insert(
                    g,
                    GroupCache {
                        state: state.clone(),
                        pending: BTreeMap::new(),
                        fanned: 0,
                    },
                );
            }
        }
        let message = Arc::new(Message {
            seq: e,
            server_msg_id: id,
            sender: actor,
            sender_device: 0,
            client_msg_id: 0,
            timestamp_ms: ts,
            destination: Destination::Group(g),
            kind: MessageKind::System,
            payload: record.payload,
        });
        let recipients = recipients_of(&state, &message);
        if e >= state.log_from {
            self.push_log(g, message, recipients, Instant::now());
        } else {
            let result = SendResult {
                client_msg_id: 0,
                code: ErrorCode::OK,
                server_msg_id: id,
                seq: e,
                timestamp_ms: ts,
                duplicate: false,
            };
            self.fan_refs(g, message, recipients, None, result, Instant::now());
        }
        Ok(info(g, e, &state))
    }

    /// Refuses if any of `users` is already in `groups.max_per_user` groups.
    fn check_group_limits(&self, users: &[u64]) -> OpResult<()> {
        let max = self.config.max_groups_per_user;
        for &u in users {
            let rows = self
                .store
                .scan(&keys::user_groups(u), usize::MAX)
                .map_err(storage)?;
            let current = rows
                .iter()
                .filter(|(_, v)| keys::be_u64(v, 8) == Some(NONE))
                .count();
            if current >= max {
                return err(
                    ErrorCode::TOO_MANY_GROUPS,
                    format!("user {u} is in {current} groups; at most {max}"),
                );
            }
        }
        Ok(())
    }

    /// Aggregate receipts of one group message, from the members' cursors.
    pub(crate) fn receipt_counts(
        &mut self,
        g: u64,
        seq: u64,
        asker: u64,
    ) -> OpResult<ReceiptCounts> {
        let state = match self.group(g).map_err(storage)? {
            Some(c) => c.state.clone(),
            None => return err(ErrorCode::NOT_A_MEMBER, "no such group"),
        };
        let msg = match self.store.read_after(g, seq.saturating_sub(1), 1) {
            Ok(v) if v.first().map(|m| m.seq) == Some(seq) && seq > 0 => {
                v.into_iter().next().expect("one")
            }
            Ok(_) => return err(ErrorCode::INVALID_REQUEST, "no such group message"),
            Err(e) => return Err(storage(e)),
        };
        if msg.record.sender != asker {
            return err(
                ErrorCode::FORBIDDEN,
                "only the sender reads a message's receipts",
            );
        }
        let cursors: HashMap<u64, (u64, u64)> = self
            .store
            .scan(&keys::cursors(g), usize::MAX)
            .map_err(storage)?
            .into_iter()
            .filter_map(|(k, v)| {
                Some((
                    keys::last_u64(&k)?,
                    (keys::be_u64(&v, 0)?, keys::be_u64(&v, 8)?),
                ))
            })
            .collect();
        let (mut recipients, mut delivered, mut read) = (0, 0, 0);
        for m in &state.members {
            if m.joined_seq >= seq || m.user == asker {
                continue;
            }
            recipients += 1;
            let (d, r) = self
                .group_cursor_cached(g, m.user)
                .or_else(|| cursors.get(&m.user).copied())
                .unwrap_or((0, 0));
            delivered += u32::from(d >= seq);
            read += u32::from(r >= seq);
        }
        Ok(ReceiptCounts {
            group: g,
            seq,
            recipients,
            delivered,
            read,
        })
    }
}

/// Who receives a group log entry: for a chat message, the members who
/// joined before it except its sender; for a membership event, every member
/// after the change, and the users it removed.
pub(crate) fn recipients_of(state: &GroupState, m: &Message) -> Vec<u64> {
    if m.kind == MessageKind::System {
        let mut out: Vec<u64> = state
            .members
            .iter()
            .filter(|x| x.joined_seq <= m.seq)
            .map(|x| x.user)
            .collect();
        if let Ok(ev) = GroupEvent::decode(&m.payload) {
            if matches!(ev.kind, GroupEventKind::Removed | GroupEventKind::Left) {
                for u in ev.users {
                    if !out.contains(&u) {
                        out.push(u);
                    }
                }
            }
        }
        out
    } else {
        state
            .members
            .iter()
            .filter(|x| x.joined_seq < m.seq && x.user != m.sender)
            .map(|x| x.user)
            .collect()
    }
}

fn info(g: u64, head: u64, s: &GroupState) -> GroupInfo {
    GroupInfo {
        group: g,
        head_seq: head,
        strategy: s.strategy,
        members: s.members.iter().map(|m| (m.user, m.role)).collect(),
    }
}

/// Every group's fan-out mark, split by owning shard: one scan at start for
/// all shards.
pub(crate) fn fan_out_marks(
    store: &dyn courier_storage::InboxStore,
    shards: usize,
) -> Result<Vec<Vec<(u64, u64)>>, StoreError> {
    let mut out = vec![Vec::new(); shards];
    for (k, v) in store.scan(&keys::fanned_prefix(), usize::MAX)? {
        if let (Some(g), Some(fanned)) = (keys::last_u64(&k), keys::be_u64(&v, 0)) {
            out[shard_of(g, shards)].push((g, fanned));
        }
    }
    Ok(out)
}

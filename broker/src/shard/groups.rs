//! Groups, as run by the shard that owns the group id.
//!
//! The owning shard is the group's only writer and its sequencer: the group
//! log is an inbox (keyed by the group id, whose top bit no user id has)
//! that holds every message and membership event once, in the order all
//! members see. How the members are reached after the log write (references
//! or the log itself) is `fanout`'s job; this file validates sends, applies
//! membership changes, and answers receipt queries.

use std::collections::HashMap;
use std::sync::Arc;

use courier_protocol::{
    Destination, ErrorCode, GroupEvent, GroupEventKind, GroupInfo, GroupOp, Message, MessageKind,
    ReceiptCounts, Role, SendResult, Strategy,
};
use courier_storage::{
    AppendOutcome, Form, IdempotencyKey, KvOp, NewMessage, Record, StoreError, StoredMessage,
};
use tracing::{debug, error};

use super::core::Shard;
use super::lines::Conversation;
use super::messages::{failed, not_served, unavailable, GroupOpCmd, GroupReply, GroupSendCmd};
use super::route::shard_of;
use super::tracking::{Batch, GroupCache, Planned};
use crate::error::{refuse, BrokerResult};
use crate::metrics::Metrics;
use crate::state::ids::{valid_user, NONE};
use crate::state::keys;
use crate::state::message::to_wire;
use crate::state::rows::{corrupt, Cursors, FanMark, GroupState, Member, MemberRow};

/// A membership change, decided and not yet written.
struct Change {
    /// The group after the change.
    state: GroupState,
    kind: GroupEventKind,
    /// The users the event names.
    concerned: Vec<u64>,
    /// The group moved to the log strategy with this event.
    switched: bool,
}

impl Shard {
    /// The group, loaded on first touch; `None` if it does not exist.
    pub(crate) fn group(&mut self, g: u64) -> Result<Option<&mut GroupCache>, StoreError> {
        if !self.groups.contains_key(&g) {
            let Some(v) = self.store.get(&keys::group(g))? else {
                return Ok(None);
            };
            let state = GroupState::decode(&v)
                .ok_or_else(|| corrupt("group state", format!("group {g:#x}")))?;
            let fanned = match self.store.get(&keys::fanned(g))? {
                Some(v) => FanMark::decode(&v).0,
                None => 0,
            };
            self.groups.insert(g, GroupCache { state, fanned });
        }
        Ok(self.groups.get_mut(&g))
    }

    /// Validates a group send and plans its log append.
    pub(crate) fn plan_group_send(&mut self, cmd: GroupSendCmd, batch: &mut Batch) {
        let recipients = match self.group(cmd.group) {
            Ok(Some(c)) if c.state.member(cmd.sender).is_some() => c
                .state
                .members
                .iter()
                .map(|m| m.user)
                .filter(|&u| u != cmd.sender)
                .collect(),
            Ok(_) => {
                self.group_send_answered(&cmd, false);
                cmd.reply
                    .send(failed(cmd.client_msg_id, ErrorCode::NOT_A_MEMBER));
                return;
            }
            Err(e) => {
                error!(shard = self.id, error = %e, "loading a group failed");
                self.group_send_answered(&cmd, false);
                cmd.reply
                    .send(failed(cmd.client_msg_id, ErrorCode::INTERNAL));
                return;
            }
        };
        if !self.lines.admit(
            group_conversation(&cmd),
            cmd.client_msg_id,
            self.store.hides(cmd.group),
        ) {
            // An older send of the member's was refused here and waits for
            // its retry (see `lines`).
            self.stats.held_in_line.inc();
            self.group_send_answered(&cmd, true);
            cmd.reply.send(unavailable(cmd.client_msg_id));
            return;
        }
        let (ts, id) = self.next_ids();
        batch.appends.push(NewMessage {
            inbox: cmd.group,
            idempotency: Some(IdempotencyKey::new(cmd.sender, cmd.client_msg_id)),
            form: Form::Record,
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
        batch.plan.push(Planned::GroupSend { cmd, recipients });
    }

    /// Group send `cmd` is answered without its entry being readable:
    /// `refused` (`SHARD_UNAVAILABLE`) holds the member's sends to the
    /// group in line here until its retry, and, for a session of this
    /// node, on this node too; anything else is its last answer.
    pub(crate) fn group_send_answered(&mut self, cmd: &GroupSendCmd, refused: bool) {
        let line = group_conversation(cmd);
        if !refused {
            self.lines.answered(line, cmd.client_msg_id);
            return;
        }
        self.lines.refused(line, cmd.client_msg_id);
        if matches!(cmd.reply, GroupReply::Session(_)) {
            self.refused_here(cmd.sender, cmd.sender_device, cmd.group, cmd.client_msg_id);
        }
    }

    /// A group send's log write has an outcome: answer, and fan it out.
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
                self.group_send_answered(&cmd, false);
                cmd.reply
                    .send(failed(cmd.client_msg_id, ErrorCode::CLIENT_ID_REUSED));
                return;
            }
            // The group's shard is moving away (its new owner takes it), or
            // fenced a moment.
            AppendOutcome::NotServed => {
                self.group_send_answered(&cmd, true);
                cmd.reply.send(unavailable(cmd.client_msg_id));
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
        debug!(
            shard = self.id,
            group = g,
            sender = cmd.sender,
            client_msg_id = cmd.client_msg_id,
            entry = p.seq,
            duplicate,
            "group send written"
        );
        let stored = if duplicate {
            // A retry delivers the original (its ids and body), to the members
            // it was addressed to: the fan-out may not have completed before.
            match self.original_of_retry(g, p.seq, cmd.sender) {
                Ok(found) => Some(found),
                // Its write has not reached every in-sync copy (replicated
                // shards hide it until then): the retry is retried.
                Err(Unreadable::NotYet) => {
                    self.group_send_answered(&cmd, true);
                    cmd.reply.send(unavailable(cmd.client_msg_id));
                    return;
                }
                Err(Unreadable::Broken) => {
                    self.group_send_answered(&cmd, false);
                    cmd.reply
                        .send(failed(cmd.client_msg_id, ErrorCode::INTERNAL));
                    return;
                }
            }
        } else {
            self.stats.group_messages.inc();
            Metrics::since(&self.stats.accept_to_durable, cmd.accepted);
            let message = StoredMessage {
                seq: p.seq,
                record: m.record,
                via: None,
            };
            Some((message, recipients))
        };
        let Some((message, recipients)) = stored else {
            return;
        };
        // Readable in the log: the member's next send may follow it.
        self.lines
            .answered(group_conversation(&cmd), cmd.client_msg_id);
        let message = match to_wire(message) {
            Ok(m) => Arc::new(m),
            Err(e) => {
                error!(shard = self.id, error = %e, "group message not representable");
                cmd.reply
                    .send(failed(cmd.client_msg_id, ErrorCode::INTERNAL));
                return;
            }
        };
        let log_from = self.groups.get(&g).map_or(NONE, |c| c.state.log_from);
        self.stats.fanout_size.observe(recipients.len() as f64);
        if p.seq >= log_from {
            cmd.reply.send(result);
            self.push_log(g, message, recipients, cmd.accepted);
        } else {
            let answer = Some((cmd.reply, result));
            self.fan_refs(g, message, recipients, answer, cmd.accepted);
        }
    }

    /// The stored group message a retry names, and the members it was for;
    /// `NotYet` while its write is not visible (a replicated shard's copies
    /// have not confirmed it).
    fn original_of_retry(
        &mut self,
        g: u64,
        seq: u64,
        sender: u64,
    ) -> Result<(StoredMessage, Vec<u64>), Unreadable> {
        let original = match self.store.read_after(g, seq - 1, 1) {
            Ok(mut v) if v.first().map(|m| m.seq) == Some(seq) => v.remove(0),
            Ok(v) if v.is_empty() && self.store.state(g).is_ok_and(|s| s.head_seq < seq) => {
                return Err(Unreadable::NotYet);
            }
            // The group's shard is not served here now (fenced).
            Err(StoreError::Unreplicated(_)) => return Err(Unreadable::NotYet),
            other => {
                error!(
                    shard = self.id,
                    group = g,
                    ?other,
                    "group message of a retry not readable"
                );
                return Err(Unreadable::Broken);
            }
        };
        let recipients = match self.group(g) {
            Ok(Some(c)) => c
                .state
                .members
                .iter()
                .filter(|m| m.joined_seq < seq && m.user != sender)
                .map(|m| m.user)
                .collect(),
            _ => Vec::new(),
        };
        Ok((original, recipients))
    }

    pub(crate) fn group_op(&mut self, op: GroupOpCmd) {
        let result = self.try_group_op(&op);
        let _ = op.answer.send(result);
    }

    /// Decides the change, writes its event and rows in one write, updates
    /// the cache, and announces the event to the members.
    fn try_group_op(&mut self, op: &GroupOpCmd) -> BrokerResult<GroupInfo> {
        let (g, actor) = (op.group, op.actor);
        let users = distinct_users(&op.users)?;
        let existing = self.group(g)?.map(|c| c.state.clone());
        // The store's head is the truth (every planned write is done).
        let head = self.store.state(g)?.head_seq;
        let e = head + 1; // the event's group sequence
                          // Where each current member joined, for the rows of those who leave.
        let joined: HashMap<u64, u64> = existing
            .iter()
            .flat_map(|s| s.members.iter().map(|m| (m.user, m.joined_seq)))
            .collect();
        let change = match (op.op, existing) {
            (GroupOp::Create, Some(_)) => {
                return refuse(ErrorCode::INVALID_REQUEST, "group exists")
            }
            (GroupOp::Create, None) => self.create(actor, users, e)?,
            (_, None) => return refuse(ErrorCode::NOT_A_MEMBER, "no such group"),
            (_, Some(s)) if s.member(actor).is_none() => {
                return refuse(ErrorCode::NOT_A_MEMBER, "not a member of this group")
            }
            (GroupOp::Info, Some(s)) => return Ok(info(g, head, &s)),
            (GroupOp::Leave, Some(mut s)) => {
                s.members.retain(|m| m.user != actor);
                (s, GroupEventKind::Left, vec![actor])
            }
            (kind, Some(s)) => self.admin_op(kind, s, actor, users, e)?,
        };
        let change = self.settle(change, e);
        let mut kv = membership_rows(g, &change, &joined, e);
        kv.push(KvOp::Put {
            key: keys::group(g),
            value: change.state.encode(),
        });
        if op.op == GroupOp::Create {
            kv.push(KvOp::Put {
                key: keys::fanned(g),
                value: FanMark(0).encode(),
            });
        }
        let message = self.write_event(g, actor, &change, kv, e)?;
        let state = change.state;
        match self.groups.get_mut(&g) {
            Some(c) => c.state = state.clone(),
            None => {
                let cache = GroupCache {
                    state: state.clone(),
                    fanned: 0,
                };
                self.groups.insert(g, cache);
            }
        }
        self.announce(g, message, &state);
        Ok(info(g, e, &state))
    }

    /// A new group: the actor as its admin, the others as members.
    fn create(
        &self,
        actor: u64,
        mut users: Vec<u64>,
        e: u64,
    ) -> BrokerResult<(GroupState, GroupEventKind, Vec<u64>)> {
        let max_members = self.config.max_group_members;
        users.retain(|&u| u != actor);
        if users.len() + 1 > max_members {
            return refuse(
                ErrorCode::GROUP_FULL,
                format!("{} members; at most {max_members}", users.len() + 1),
            );
        }
        let mut all = vec![actor];
        all.extend(&users);
        self.check_group_limits(&all)?;
        let member = |user, role| Member {
            user,
            role,
            joined_seq: e,
        };
        let mut members = vec![member(actor, Role::Admin)];
        members.extend(users.iter().map(|&u| member(u, Role::Member)));
        let state = GroupState {
            strategy: Strategy::Refs,
            log_from: NONE,
            members,
        };
        Ok((state, GroupEventKind::Created, all))
    }

    /// Add, remove, promote or demote: admins only, on named users.
    fn admin_op(
        &self,
        kind: GroupOp,
        mut s: GroupState,
        actor: u64,
        mut users: Vec<u64>,
        e: u64,
    ) -> BrokerResult<(GroupState, GroupEventKind, Vec<u64>)> {
        if !s.is_admin(actor) {
            return refuse(ErrorCode::NOT_GROUP_ADMIN, "only admins may do this");
        }
        if users.is_empty() {
            return refuse(ErrorCode::INVALID_REQUEST, "no users given");
        }
        if kind == GroupOp::Add {
            users.retain(|&u| s.member(u).is_none());
            if users.is_empty() {
                return refuse(ErrorCode::INVALID_REQUEST, "already members");
            }
            let max_members = self.config.max_group_members;
            if s.members.len() + users.len() > max_members {
                let n = s.members.len() + users.len();
                return refuse(
                    ErrorCode::GROUP_FULL,
                    format!("{n} members; at most {max_members}"),
                );
            }
            self.check_group_limits(&users)?;
            s.members.extend(users.iter().map(|&user| Member {
                user,
                role: Role::Member,
                joined_seq: e,
            }));
            return Ok((s, GroupEventKind::Added, users));
        }
        if let Some(u) = users.iter().find(|&&u| s.member(u).is_none()) {
            return refuse(ErrorCode::INVALID_REQUEST, format!("{u} is not a member"));
        }
        let event = match kind {
            GroupOp::Remove => {
                s.members.retain(|m| !users.contains(&m.user));
                GroupEventKind::Removed
            }
            GroupOp::Promote | GroupOp::Demote => {
                let promote = kind == GroupOp::Promote;
                let role = if promote { Role::Admin } else { Role::Member };
                for m in s.members.iter_mut().filter(|m| users.contains(&m.user)) {
                    m.role = role;
                }
                if promote {
                    GroupEventKind::Promoted
                } else {
                    GroupEventKind::Demoted
                }
            }
            _ => return refuse(ErrorCode::INVALID_REQUEST, "unknown group operation"),
        };
        Ok((s, event, users))
    }

    /// The rules every change ends with: never without an admin while it
    /// has members; past `groups.log_threshold` members, the log strategy
    /// (never on a cluster node, whose threshold is unbounded: members read
    /// the log where it is, and shards move between nodes).
    fn settle(
        &self,
        (mut state, kind, concerned): (GroupState, GroupEventKind, Vec<u64>),
        e: u64,
    ) -> Change {
        if !state.members.is_empty() && !state.members.iter().any(|m| m.role == Role::Admin) {
            state.members[0].role = Role::Admin;
        }
        let switched =
            state.strategy == Strategy::Refs && state.members.len() > self.config.log_threshold;
        if switched {
            state.strategy = Strategy::Log;
            state.log_from = e;
        }
        Change {
            state,
            kind,
            concerned,
            switched,
        }
    }

    /// Writes the event at group sequence `e` with `kv`, in one write.
    fn write_event(
        &mut self,
        g: u64,
        actor: u64,
        change: &Change,
        kv: Vec<KvOp>,
        e: u64,
    ) -> BrokerResult<Arc<Message>> {
        let (ts, id) = self.next_ids();
        let event = GroupEvent {
            kind: change.kind,
            actor,
            users: change.concerned.clone(),
        };
        let message = Message {
            seq: e,
            server_msg_id: id,
            sender: actor,
            sender_device: 0,
            client_msg_id: 0,
            timestamp_ms: ts,
            destination: Destination::Group(g),
            kind: MessageKind::System,
            payload: event.encode(),
        };
        let append = NewMessage {
            inbox: g,
            idempotency: None,
            form: Form::Record,
            record: crate::state::message::record_of(&message),
        };
        // On failure the cache still holds the state before the change: valid.
        let outcome = self.store.append_with(&[append], &kv, self.now_ms())?;
        match outcome.first() {
            Some(AppendOutcome::Stored(p)) if p.seq == e => Ok(Arc::new(message)),
            Some(AppendOutcome::NotServed) => Err(not_served("the group's shard is moving")),
            other => {
                self.groups.remove(&g);
                error!(
                    shard = self.id,
                    group = g,
                    ?other,
                    expected = e,
                    "group event landed elsewhere"
                );
                refuse(ErrorCode::INTERNAL, "storage error")
            }
        }
    }

    /// Refuses if any of `users` is already in `groups.max_per_user` groups.
    fn check_group_limits(&self, users: &[u64]) -> BrokerResult<()> {
        let max = self.config.max_groups_per_user;
        for &u in users {
            let rows = self.store.scan(&keys::user_groups(u), usize::MAX)?;
            let current = rows
                .iter()
                .filter(|(_, v)| MemberRow::decode(v).is_some_and(|r| r.is_current()))
                .count();
            if current >= max {
                return refuse(
                    ErrorCode::TOO_MANY_GROUPS,
                    format!("user {u} is in {current} groups; at most {max}"),
                );
            }
        }
        Ok(())
    }

    /// Aggregate receipts of one group message, from the cursors of the
    /// members this node holds, and the members whose cursors other nodes
    /// hold (counted as recipients, not yet as delivered or read).
    pub(crate) fn receipt_counts(
        &mut self,
        g: u64,
        seq: u64,
        asker: u64,
    ) -> BrokerResult<(ReceiptCounts, Vec<u64>)> {
        let state = match self.group(g)? {
            Some(c) => c.state.clone(),
            None => return refuse(ErrorCode::NOT_A_MEMBER, "no such group"),
        };
        let msg = match self.store.read_after(g, seq.saturating_sub(1), 1)? {
            v if v.first().map(|m| m.seq) == Some(seq) && seq > 0 => {
                v.into_iter().next().expect("one")
            }
            _ => return refuse(ErrorCode::INVALID_REQUEST, "no such group message"),
        };
        if msg.record.sender != asker {
            return refuse(
                ErrorCode::FORBIDDEN,
                "only the sender reads a message's receipts",
            );
        }
        let stored: HashMap<u64, Cursors> = self
            .store
            .scan(&keys::cursors(g), usize::MAX)?
            .into_iter()
            .filter_map(|(k, v)| Some((keys::last_id(&k)?, Cursors::decode(&v))))
            .collect();
        let (mut recipients, mut delivered, mut read) = (0, 0, 0);
        let mut elsewhere = Vec::new();
        for m in &state.members {
            if m.joined_seq >= seq || m.user == asker {
                continue;
            }
            recipients += 1;
            if !self.here(m.user) {
                elsewhere.push(m.user);
                continue;
            }
            let c = self
                .group_cursor_cached(g, m.user)
                .or_else(|| stored.get(&m.user).copied())
                .unwrap_or_default();
            delivered += u32::from(c.delivered >= seq);
            read += u32::from(c.read >= seq);
        }
        let counts = ReceiptCounts {
            group: g,
            seq,
            recipients,
            delivered,
            read,
        };
        Ok((counts, elsewhere))
    }
}

/// The users a request names, each once; refuses ids that are not users.
fn distinct_users(given: &[u64]) -> BrokerResult<Vec<u64>> {
    if let Some(&bad) = given.iter().find(|&&u| !valid_user(u)) {
        return refuse(
            ErrorCode::INVALID_REQUEST,
            format!("{bad:#x} is not a user id"),
        );
    }
    let mut users: Vec<u64> = Vec::with_capacity(given.len());
    for &u in given {
        if !users.contains(&u) {
            users.push(u);
        }
    }
    Ok(users)
}

/// The `U` rows a change writes: each member it concerns (every member when
/// the group switched strategy), and for users who left, the end of their
/// log stream (log strategy) or no row at all (refs).
fn membership_rows(g: u64, change: &Change, joined: &HashMap<u64, u64>, e: u64) -> Vec<KvOp> {
    let state = &change.state;
    let kind = change.kind;
    let gone = matches!(kind, GroupEventKind::Removed | GroupEventKind::Left);
    let role_only = matches!(kind, GroupEventKind::Promoted | GroupEventKind::Demoted);
    let mut kv = Vec::new();
    for m in &state.members {
        if change.switched || (!gone && !role_only && change.concerned.contains(&m.user)) {
            let row = MemberRow {
                joined: m.joined_seq,
                left: NONE,
                log_from: state.log_from,
            };
            kv.push(KvOp::Put {
                key: keys::user_group(m.user, g),
                value: row.encode(),
            });
        }
    }
    if gone {
        for &u in &change.concerned {
            let key = keys::user_group(u, g);
            kv.push(if state.strategy == Strategy::Log {
                // The member's log stream ends with this event.
                let row = MemberRow {
                    joined: joined.get(&u).copied().unwrap_or(e),
                    left: e,
                    log_from: state.log_from,
                };
                KvOp::Put {
                    key,
                    value: row.encode(),
                }
            } else {
                KvOp::Delete { key }
            });
        }
    }
    kv
}

/// Who receives a group log entry: for a chat message, the members who
/// joined before it except its sender; for a membership event, every member
/// after the change, and the users it removed.
pub(crate) fn recipients_of(state: &GroupState, m: &Message) -> Vec<u64> {
    if m.kind != MessageKind::System {
        return state
            .members
            .iter()
            .filter(|x| x.joined_seq < m.seq && x.user != m.sender)
            .map(|x| x.user)
            .collect();
    }
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
/// all shards; or of the groups whose slot is in `run` (a cluster shard
/// that moved here), reading only that run where the store keeps slots
/// apart.
pub(crate) fn fan_out_marks(
    store: &dyn courier_storage::InboxStore,
    shards: usize,
    run: Option<std::ops::Range<u16>>,
) -> Result<Vec<Vec<(u64, u64)>>, StoreError> {
    let mut out = vec![Vec::new(); shards];
    let rows = match &run {
        Some(run) => store.scan_slots(&keys::fanned_prefix(), run.clone(), usize::MAX)?,
        None => store.scan(&keys::fanned_prefix(), usize::MAX)?,
    };
    let inside = |g: u64| {
        run.as_ref()
            .is_none_or(|r| r.contains(&u16::from(courier_storage::slot_of(g))))
    };
    for (k, v) in rows {
        if let (Some(g), true) = (keys::last_id(&k), v.len() >= 8) {
            if inside(g) {
                out[shard_of(g, shards)].push((g, FanMark::decode(&v).0));
            }
        }
    }
    Ok(out)
}

/// Why a retry's original group message could not be read.
#[derive(Debug)]
enum Unreadable {
    /// Written, not visible yet: the retry is answered retryably.
    NotYet,
    /// Missing or unreadable: a storage problem.
    Broken,
}

/// The conversation a group send is part of, for the lines here.
fn group_conversation(cmd: &GroupSendCmd) -> Conversation {
    Conversation::Group {
        sender: cmd.sender,
        device: cmd.sender_device,
        group: cmd.group,
    }
}

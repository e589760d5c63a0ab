//! A shard's users' inboxes and live sessions: appending one-to-one sends
//! and group references, pushing what was stored to online sessions (a full
//! session queue moves the session to catch-up), registering sessions, and
//! trimming acknowledged messages past retention.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use courier_protocol::{Destination, ErrorCode, Message, MessageKind, SendResult};
use courier_storage::{
    AppendOutcome, Form, IdempotencyKey, KvOp, LogRef, NewMessage, Record, StoredMessage,
};
use tracing::{debug, error, warn};

use super::core::Shard;
use super::lines::Conversation;
use super::messages::{
    failed, not_served, unavailable, Completion, Delivery, RefsCmd, RegisterCmd, SendCmd,
};
use super::recent::Fact;
use super::tracking::{Batch, Planned};
use crate::mailbox::TrySendError;
use crate::metrics::Metrics;
use crate::state::message::{record_of, to_wire};
use crate::state::social;

/// Inboxes trimmed per tick, so trimming never starves sends.
const TRIM_PER_TICK_MAX: usize = 1024;

impl Shard {
    /// Plans one inbox entry for a send. A broadcast copy goes only to a
    /// recipient who consents (has the sender as a contact), checked here,
    /// where the recipient's contacts are (on whichever node owns them):
    /// otherwise it is answered `FORBIDDEN`, which the broadcast counts as
    /// skipped.
    pub(crate) fn plan_send(&mut self, s: SendCmd, batch: &mut Batch) {
        if let Destination::List(_) = s.destination {
            match social::has_contact(&*self.store, s.recipient, s.sender) {
                Ok(true) => {}
                Ok(false) => {
                    self.send_answered(&s, false);
                    let result = failed(s.client_msg_id, ErrorCode::FORBIDDEN);
                    return self.complete(s.done, result, false);
                }
                Err(e) => {
                    error!(shard = self.id, error = %e, "consent lookup failed");
                    self.send_answered(&s, false);
                    let result = failed(s.client_msg_id, ErrorCode::INTERNAL);
                    return self.complete(s.done, result, false);
                }
            }
        }
        let alone = self.store.hides(s.recipient);
        if !self.lines.admit(conversation(&s), s.client_msg_id, alone) {
            // An older send of the conversation was refused here and waits
            // for its retry (see `lines`).
            self.stats.held_in_line.inc();
            return self.refuse_unavailable(s);
        }
        if let Err(wait) = self.marketing_admit(&s) {
            self.send_answered(&s, false);
            let result = SendResult {
                timestamp_ms: wait,
                ..failed(s.client_msg_id, ErrorCode::MARKETING_CAP_REACHED)
            };
            return self.complete(s.done, result, false);
        }
        if self.is_business(s.recipient) {
            self.customer_wrote(s.recipient, &s);
        }
        match self.is_fact(&s) {
            Ok(true) => return self.plan_fact(s, batch),
            Ok(false) => {}
            Err(e) => {
                error!(shard = self.id, user = s.recipient, error = %e, "reading whether a user takes receipt facts failed");
                self.send_answered(&s, false);
                let result = failed(s.client_msg_id, ErrorCode::INTERNAL);
                return self.complete(s.done, result, false);
            }
        }
        let (ts, id) = self.next_ids();
        batch.appends.push(NewMessage {
            inbox: s.recipient,
            idempotency: Some(IdempotencyKey {
                sender: s.sender,
                client_msg_id: s.client_msg_id,
                scope: s.scope,
            }),
            form: Form::Record,
            record: Record {
                server_msg_id: id,
                sender: s.sender,
                sender_device: s.sender_device,
                client_msg_id: s.client_msg_id,
                timestamp_ms: ts,
                dest_tag: s.destination.tag(),
                dest_id: s.destination.id(),
                kind: s.kind as u8,
                payload: s.payload.clone(),
            },
        });
        batch.plan.push(Planned::Send(s));
    }

    /// Answers send `s` `SHARD_UNAVAILABLE`; it keeps its place in its
    /// conversation's line.
    pub(crate) fn refuse_unavailable(&mut self, s: SendCmd) {
        self.send_answered(&s, true);
        self.complete(s.done, unavailable(s.client_msg_id), false);
    }

    /// Send `s` is answered without being stored. `refused`
    /// (`SHARD_UNAVAILABLE`): its conversation is held in line here until
    /// its retry, and, for a session of this node, on this node too (a
    /// later send may go to the shard's next owner); otherwise this is its
    /// last answer and the line moves on.
    pub(crate) fn send_answered(&mut self, s: &SendCmd, refused: bool) {
        if !refused {
            return self.lines.answered(conversation(s), s.client_msg_id);
        }
        self.lines.refused(conversation(s), s.client_msg_id);
        if matches!(s.done, Completion::Reply(_)) {
            self.refused_here(s.sender, s.sender_device, s.recipient, s.client_msg_id);
        }
    }

    /// Entry `seq` of `group` for `member`: refused (it keeps its place in
    /// the member's line for the group), or answered.
    pub(crate) fn entry_answered(&mut self, group: u64, member: u64, seq: u64, refused: bool) {
        let line = Conversation::Entries { group, member };
        if refused {
            self.lines.refused(line, seq);
        } else {
            self.lines.answered(line, seq);
        }
    }

    /// A session's send `id` from (`sender`, `device`) to `to` (an inbox
    /// or a group) was refused by this node: the node's line for that
    /// conversation holds the sends after it (see `Remote::refused_here`).
    pub(crate) fn refused_here(&self, sender: u64, device: u32, to: u64, id: u64) {
        if let Some(remote) = self.remote.get() {
            let line = crate::cluster::order::Key {
                sender,
                device,
                recipient: to,
            };
            remote.refused_here(line, id);
        }
    }

    /// Plans one reference to a group log entry per member (a copy of it
    /// when the log is on another cluster node). A member whose line here
    /// holds an older entry of the group (refused, waiting for its retry)
    /// gets none now, and the part fails.
    pub(crate) fn plan_refs(&mut self, mut r: RefsCmd, batch: &mut Batch) {
        let entry = r.message.seq;
        let before = r.members.len();
        r.members.retain(|&member| {
            let line = Conversation::Entries {
                group: r.group,
                member,
            };
            self.lines.admit(line, entry, false)
        });
        let held = r.members.len() < before;
        if held {
            self.stats.held_in_line.inc();
        }
        let record = record_of(&r.message);
        let at = LogRef {
            log: r.group,
            seq: r.message.seq,
        };
        let form = if r.copy {
            Form::Copy(at)
        } else {
            Form::Reference(at)
        };
        for &member in &r.members {
            batch.appends.push(NewMessage {
                inbox: member,
                idempotency: Some(IdempotencyKey {
                    sender: r.group,
                    client_msg_id: r.message.seq,
                    scope: member,
                }),
                form,
                record: record.clone(),
            });
        }
        batch.plan.push(Planned::Refs(r, held));
    }

    pub(crate) fn finish_send(&mut self, s: SendCmd, m: NewMessage, outcome: AppendOutcome) {
        let result = match outcome {
            AppendOutcome::Stored(p) | AppendOutcome::Duplicate(p) => SendResult {
                client_msg_id: s.client_msg_id,
                code: ErrorCode::OK,
                server_msg_id: p.server_msg_id,
                seq: p.seq,
                timestamp_ms: p.timestamp_ms,
                duplicate: matches!(outcome, AppendOutcome::Duplicate(_)),
            },
            AppendOutcome::Conflict => failed(s.client_msg_id, ErrorCode::CLIENT_ID_REUSED),
            // The recipient's shard is moving away: its new owner takes it.
            AppendOutcome::NotServed => unavailable(s.client_msg_id),
        };
        let stored = matches!(outcome, AppendOutcome::Stored(_));
        self.marketing_done(&s, stored);
        self.send_answered(&s, outcome == AppendOutcome::NotServed);
        debug!(
            shard = self.id,
            inbox = s.recipient,
            sender = s.sender,
            client_msg_id = s.client_msg_id,
            seq = result.seq,
            code = result.code.0,
            duplicate = result.duplicate,
            "send answered"
        );
        self.complete(s.done, result, stored);
        match outcome {
            AppendOutcome::Stored(p) => {
                Metrics::since(&self.stats.accept_to_durable, s.accepted);
                self.stats.messages_stored.inc();
                if s.kind == MessageKind::Receipt {
                    self.stats.receipts_stored.inc();
                }
                let stored = StoredMessage {
                    seq: p.seq,
                    record: m.record,
                    via: None,
                };
                self.remember(s.recipient, &stored);
                match to_wire(stored) {
                    Ok(msg) => self.push(s.recipient, Delivery::Inbox(Arc::new(msg)), s.accepted),
                    // Cannot happen for a record built above from a valid
                    // send; if it does, the writer's catch-up reports it.
                    Err(e) => {
                        error!(shard = self.id, error = %e, "stored message not representable")
                    }
                }
            }
            AppendOutcome::Duplicate(_) => self.stats.duplicates.inc(),
            AppendOutcome::Conflict | AppendOutcome::NotServed => {}
        }
    }

    pub(crate) fn register(&mut self, r: RegisterCmd) {
        let served = self
            .store
            .transfer()
            .is_none_or(|t| t.serves(courier_storage::slot_of(r.user)));
        if !self.here(r.user) || !served {
            // The user's shard moved away (or is pausing to, or is fenced)
            // after the handshake chose this node: no welcome from a node
            // that does not hold the inbox (its head here may be nothing,
            // and a client library resumes from a welcome's position), but
            // SHARD_UNAVAILABLE, and the client comes back to the owner.
            let _ = r
                .state
                .send(Err(not_served("the user's shard is not served here now")));
            return;
        }
        if r.facts {
            if let Err(e) = self.switch_to_facts(r.user) {
                let _ = r.state.send(Err(e.into()));
                return;
            }
        }
        self.sessions.entry(r.user).or_default().push(r.session);
        // The user's acknowledgements not yet written (they go with the
        // shard's next write) count as written: the session resumes after
        // them.
        let pending = self.kv.iter().filter_map(|op| match op {
            KvOp::Ack { inbox, up_to_seq } if *inbox == r.user => Some(*up_to_seq),
            _ => None,
        });
        let state = self.store.state(r.user).map(|mut s| {
            pending.for_each(|up_to| {
                s.ack(up_to);
            });
            s
        });
        let _ = r.state.send(state.map_err(Into::into));
    }

    pub(crate) fn unregister(&mut self, user: u64, session_id: u64) {
        if let Some(list) = self.sessions.get_mut(&user) {
            list.retain(|s| s.id != session_id);
            if list.is_empty() {
                self.sessions.remove(&user);
                self.recent.forget(user);
            }
        }
    }

    /// Remembers what a mark of a just-stored entry will owe, for users
    /// online now (they are the ones who acknowledge at once).
    pub(crate) fn remember(&mut self, user: u64, m: &StoredMessage) {
        if self.sessions.contains_key(&user) {
            self.recent.stored(user, m.seq, Fact::of(user, m));
        }
    }

    /// Live push of a log-strategy group message to these users' sessions.
    pub(crate) fn push_group(
        &mut self,
        group: u64,
        message: Arc<Message>,
        users: Vec<u64>,
        accepted: Instant,
    ) {
        for user in users {
            self.push(user, Delivery::Group(group, message.clone()), accepted);
        }
    }

    /// Offers a delivery to every live session of `user`. A full queue
    /// demotes the session to catch-up (its writer re-reads the store); it
    /// never blocks the shard and never drops the message from storage.
    pub(crate) fn push(&mut self, user: u64, d: Delivery, accepted: Instant) {
        let Some(list) = self.sessions.get_mut(&user) else {
            return;
        };
        let stats = &self.stats;
        list.retain(|session| {
            if session.lagging.load(Ordering::SeqCst) {
                return true;
            }
            match session.deliveries.try_send((d.clone(), accepted)) {
                Ok(()) => {
                    stats.live_pushes.inc();
                    true
                }
                Err(TrySendError::Full(_)) => {
                    session.catch_up();
                    stats.demotions.inc();
                    debug!(
                        user,
                        session = session.id,
                        "slow consumer moved to catch-up"
                    );
                    true
                }
                Err(TrySendError::Closed(_)) => false,
            }
        });
        if list.is_empty() {
            self.sessions.remove(&user);
        }
    }

    pub(crate) fn note_trim(&mut self, user: u64) {
        self.trim_pending.insert(user);
    }

    pub(crate) fn trim(&mut self) {
        if self.trim_pending.is_empty() {
            return;
        }
        let retention = self.config.acked_retention_ms;
        let cutoff = self
            .now_ms()
            .saturating_sub(retention)
            // Retention 0 means "trim on ack": include this very millisecond.
            .saturating_add(u64::from(retention == 0));
        let users: Vec<u64> = self
            .trim_pending
            .iter()
            .take(TRIM_PER_TICK_MAX)
            .copied()
            .collect();
        for user in users {
            match self.store.trim_acked(user, cutoff) {
                Ok(s) if s.oldest_seq <= s.acked_seq => {} // more to trim later
                Ok(_) => {
                    self.trim_pending.remove(&user);
                }
                Err(e) => {
                    warn!(shard = self.id, error = %e, "trimming an inbox failed");
                    self.trim_pending.remove(&user);
                }
            }
        }
    }
}

/// The conversation a send is part of, for the lines here.
pub(crate) fn conversation(s: &SendCmd) -> Conversation {
    Conversation::Send {
        sender: s.sender,
        device: s.sender_device,
        inbox: s.recipient,
    }
}

//! What a shard keeps between commands: the plan of the batch it is
//! building, the groups it has loaded, and the fan-outs it waits for (each
//! counted here, by the one shard that owns its answer, from the parts'
//! `*Done` messages).

use std::sync::Arc;
use std::time::Instant;

use courier_protocol::{BroadcastAck, ErrorCode, Message, ReceiptFact, SendResult};
use courier_storage::NewMessage;

use super::messages::{
    failed, unavailable, GroupReply, GroupSendCmd, MarkCmd, ReceiptQueryCmd, RefsCmd, ReplyTo,
    SendCmd,
};
use crate::state::rows::{Cursors, GroupState, ReceiptRow};

/// One drained batch of commands, as planned before its storage write.
#[derive(Default)]
pub(crate) struct Batch {
    /// Inbox entries to append in the batch's one write.
    pub appends: Vec<NewMessage>,
    /// What each planned command still needs once the write has an outcome,
    /// in the order of `appends`.
    pub plan: Vec<Planned>,
    /// Marks, applied after the write.
    pub marks: Vec<MarkCmd>,
    /// Receipt queries, answered last (they read the cursors marks moved).
    pub queries: Vec<ReceiptQueryCmd>,
    /// A `Stop` was among the commands.
    pub stop: bool,
}

/// What a planned command still needs once the batch's write has an outcome.
pub(crate) enum Planned {
    /// One inbox entry.
    Send(SendCmd),
    /// `members.len()` inbox references; true when some members were held
    /// back (their line here waits for an older entry's retry), which fails
    /// the part.
    Refs(RefsCmd, bool),
    /// One group log entry; `recipients` are the members it goes to.
    GroupSend {
        cmd: GroupSendCmd,
        recipients: Vec<u64>,
    },
    /// A receipt that moves its sender's fact row (`None`: a repeat that
    /// moves nothing); see `facts`.
    Fact(SendCmd, Option<ReceiptFact>),
}

/// A group this shard owns, as cached after first touch.
pub(crate) struct GroupCache {
    pub state: GroupState,
    /// How far fan-out is recorded as complete (the `F` row).
    pub fanned: u64,
}

/// A reference fan-out in flight, on the group's shard: one part per
/// members' shard, each answering with a `RefsDone`; or held back behind
/// an earlier entry of its group (see `Shard::held_back`).
pub(crate) struct PendingFanout {
    pub remaining: usize,
    /// The code of a failed part.
    pub failed: Option<ErrorCode>,
    /// The senders' answers: the send's, and its retries' that came while
    /// it was under way (none for membership events and recoveries).
    pub answers: Vec<(GroupReply, SendResult)>,
    /// Not sent yet: what to send once the entries before it are stored.
    pub held: Option<HeldFanout>,
    /// When the entry's first fan-out went out (kept through its
    /// retries), and whether its taking long was logged.
    pub since: Instant,
    pub warned: bool,
}

/// A fan-out waiting for its turn.
pub(crate) struct HeldFanout {
    pub message: Arc<Message>,
    pub recipients: Vec<u64>,
    pub accepted: Instant,
}

impl PendingFanout {
    /// Complete, and every part stored: the `F` mark may pass it.
    pub fn succeeded(&self) -> bool {
        self.remaining == 0 && self.failed.is_none() && self.held.is_none()
    }

    /// Sent, and some part of it failed: to be sent again.
    pub fn to_retry(&self) -> bool {
        self.remaining == 0 && self.failed.is_some()
    }

    /// Records one part; the last one answers the sender.
    pub fn part_done(&mut self, code: ErrorCode) {
        if code != ErrorCode::OK {
            self.failed = Some(code);
        }
        self.remaining = self.remaining.saturating_sub(1);
        if self.remaining == 0 {
            self.answer();
        }
    }

    /// Sends the answers (once: by the last part, or at once when there are none).
    pub fn answer(&mut self) {
        for (reply, result) in self.answers.drain(..) {
            reply.send(match self.failed {
                // A member's node out of reach: with the retry-after hint.
                Some(ErrorCode::SHARD_UNAVAILABLE) => unavailable(result.client_msg_id),
                Some(code) => failed(result.client_msg_id, code),
                None => result,
            });
        }
    }
}

/// A broadcast in flight, on the sender's shard: one copy per recipient,
/// each answering with a `CopyDone`.
pub(crate) struct PendingBroadcast {
    pub remaining: usize,
    pub failed: Option<ErrorCode>,
    /// Copies stored now, and copies that were already stored (a retry).
    pub stored: usize,
    pub duplicates: usize,
    /// Highest server message id and timestamp of the copies.
    pub last_id: u64,
    pub last_ts: u64,
    pub reply: ReplyTo,
    /// The answer's fixed fields (client id) and the recipients skipped.
    pub ack: BroadcastAck,
}

impl PendingBroadcast {
    /// Records one copy; true when it was the last. A copy answered
    /// `FORBIDDEN` found no consent at its recipient: skipped.
    pub fn copy_done(&mut self, result: &SendResult, stored: bool) -> bool {
        let ok = result.code == ErrorCode::OK;
        if result.code == ErrorCode::FORBIDDEN {
            self.ack.skipped += 1;
        } else if !ok {
            self.failed = Some(result.code);
        }
        self.last_id = self.last_id.max(result.server_msg_id);
        self.last_ts = self.last_ts.max(result.timestamp_ms);
        self.stored += usize::from(ok && stored);
        self.duplicates += usize::from(ok && !stored);
        self.remaining = self.remaining.saturating_sub(1);
        self.remaining == 0
    }

    pub fn answer(&self) {
        let delivered = self.stored + self.duplicates;
        self.reply.broadcast(match self.failed {
            Some(code) => Err(code),
            None => Ok(BroadcastAck {
                server_msg_id: self.last_id,
                timestamp_ms: self.last_ts,
                delivered: delivered as u16,
                duplicate: delivered > 0 && self.duplicates == delivered,
                ..self.ack
            }),
        });
    }
}

/// A user's `R` row as planned, and the cursors of the last one put in a
/// write. A mark that owes nothing (it covers the user's own messages,
/// receipts, group references) moves the row here only, while its read
/// cursor stays and its delivered cursor is within
/// `receipts::UNWRITTEN_MAX` of the written one: a sender acknowledging
/// the receipts it is pushed would
/// otherwise rewrite the row for each. Nothing is lost by a crash: the
/// next mark starts from the row on disk and finds that range owing
/// nothing again. The next mark that owes, or that reads, writes the row.
#[derive(Clone, Copy, Debug)]
pub(crate) struct KnownRow {
    pub(crate) row: ReceiptRow,
    pub(crate) written: Cursors,
}

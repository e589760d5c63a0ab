//! The vocabulary between sessions and shards, and between shards: every
//! command a shard takes ([`ShardCmd`]), what it answers ([`Reply`],
//! [`Answer`]) and what it pushes ([`Delivery`]).
//!
//! These are plain data: ids, payload bytes, shared immutable messages, the
//! time a send was accepted, and the ends of channels to answer on. Nothing
//! holds a socket or a session's internals, and no state is shared between
//! shards: a part of a fan-out reports back to the shard that waits for it
//! with a message of its own (`RefsDone`, `CopyDone`, `ReceiptPartDone`),
//! never through a shared counter. A remote gateway can therefore stand in
//! for a session by keeping the channel ends on its own node and carrying
//! what arrives on them over its link (`accepted` then travels as an age).

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use courier_protocol::{
    Body, BroadcastAck, BusinessRequest, Destination, ErrorCode, Frame, GroupInfo, GroupOp,
    Message, MessageKind, Reason, ReceiptCounts, ReceiptFact, ReceiptStatus, SendResult,
};
use courier_storage::InboxState;
use tokio::sync::{oneshot, Notify};

use crate::error::{BrokerError, BrokerResult};
use crate::mailbox;
use crate::state::business::{ConsentEntry, Invalid, Profile, TemplateDef, TemplateStatus};

/// Where a shard sends the one answer to a request a session waits for.
pub type Answer<T> = oneshot::Sender<BrokerResult<T>>;

/// A session's queue for answers, through which its writer writes them.
/// Unbounded in type but bounded in practice: each `SendResult` and
/// `Broadcast` answers a send that holds one of the session's
/// `limits.max_in_flight` permits.
pub type ReplyQueue = mailbox::Sender<Reply>;

/// Where the outcome of a send goes: a session's reply queue, and the
/// request it answers.
pub struct ReplyTo {
    pub tx: ReplyQueue,
    pub request_id: u32,
    /// Position in a `SendBatch`, or `None` for a single `Send`.
    pub index: Option<u16>,
    /// A business's admitted send: its business's shard, told the outcome
    /// too (the message's status).
    pub outcome: Option<Box<OutcomeTap>>,
}

/// Where a business send's outcome is also told: its business's shard's
/// peer queue (unbounded: an outcome is never dropped for a full queue).
pub struct OutcomeTap {
    pub queue: tokio::sync::mpsc::UnboundedSender<ShardCmd>,
    pub business: u64,
    pub customer: u64,
}

/// The outcome of a business's admitted send, for its business's shard.
pub struct BusinessOutcome {
    pub business: u64,
    pub customer: u64,
    pub result: SendResult,
}

impl ReplyTo {
    pub fn new(tx: ReplyQueue, request_id: u32, index: Option<u16>) -> ReplyTo {
        ReplyTo {
            tx,
            request_id,
            index,
            outcome: None,
        }
    }

    pub fn send(&self, result: SendResult) {
        if let Some(tap) = &self.outcome {
            let _ = tap.queue.send(ShardCmd::BusinessOutcome(BusinessOutcome {
                business: tap.business,
                customer: tap.customer,
                result,
            }));
        }
        // The session may be gone; its client will retry with the same id.
        let _ = self.tx.send(Reply::SendResult {
            request_id: self.request_id,
            index: self.index,
            result,
        });
    }

    /// The answer to a send to a broadcast list (returns its permit).
    pub fn broadcast(&self, ack: Result<BroadcastAck, ErrorCode>) {
        let _ = self.tx.send(Reply::Broadcast {
            request_id: self.request_id,
            ack,
        });
    }
}

/// What a session's writer receives besides live deliveries.
pub enum Reply {
    SendResult {
        request_id: u32,
        index: Option<u16>,
        result: SendResult,
    },
    /// The answer to a send to a broadcast list (returns its permit).
    Broadcast {
        request_id: u32,
        ack: Result<BroadcastAck, ErrorCode>,
    },
    /// A `SendBatch` of `count` items is under way (always queued before its items).
    BatchStart { request_id: u32, count: u16 },
    /// Any other frame; boxed, so that the common replies stay small (each
    /// session's reply queue allocates its first block of 32 up front).
    Frame(Box<Frame>),
    /// Write a `Goodbye` (if any), flush and close.
    Close(Option<Reason>),
}

impl Reply {
    pub fn frame(request_id: u32, body: Body) -> Reply {
        Reply::Frame(Box::new(Frame::new(request_id, body)))
    }
}

/// A failed send's result.
pub fn failed(client_msg_id: u64, code: ErrorCode) -> SendResult {
    SendResult {
        client_msg_id,
        code,
        server_msg_id: 0,
        seq: 0,
        timestamp_ms: 0,
        duplicate: false,
    }
}

/// The retry-after hint of a `SHARD_UNAVAILABLE`: about how long a lost
/// link takes to come back, or a cluster node to restart.
pub const RETRY_AFTER_MS: u64 = 500;

/// A request refused `SHARD_UNAVAILABLE` with the hint, saying `why`
/// (the shard it needs is moving, fenced or not served here now).
pub fn not_served(why: &str) -> BrokerError {
    BrokerError::refused(
        ErrorCode::SHARD_UNAVAILABLE,
        courier_protocol::error::with_retry_after(RETRY_AFTER_MS, why),
    )
}

/// A send refused because a node it needs is out of reach, with the hint.
pub fn unavailable(client_msg_id: u64) -> SendResult {
    SendResult {
        timestamp_ms: RETRY_AFTER_MS,
        ..failed(client_msg_id, ErrorCode::SHARD_UNAVAILABLE)
    }
}

/// Who is told when the write of one inbox entry has an outcome.
pub enum Completion {
    /// The sender's session.
    Reply(ReplyTo),
    /// One copy of a broadcast: the sender's shard, which holds the
    /// broadcast's answer under `token`, is sent a `CopyDone`.
    Copy {
        sender: u64,
        token: u64,
        recipient: u64,
    },
    /// One receipt from the reader's outbox: the reader's shard, which
    /// deletes the outbox row once the receipt is durable, is sent a
    /// `ReceiptPartDone`.
    Receipt { reader: u64, emission: u64 },
    /// A waiting request (a status view's receipt): whether it is stored.
    Stored(Answer<()>),
    /// A send that came over the link from another node (the gateway, or
    /// the shard that waits): the outcome and whether it is stored go back
    /// as the link request's answer, and that node completes the original.
    Remote(oneshot::Sender<(SendResult, bool)>),
}

/// One message to append to `recipient`'s inbox.
pub struct SendCmd {
    pub sender: u64,
    pub sender_device: u32,
    pub recipient: u64,
    pub client_msg_id: u64,
    /// Destination as recorded (the user, or the broadcast list it came through).
    pub destination: Destination,
    /// Idempotency scope (0 for a one-to-one send).
    pub scope: u64,
    pub kind: MessageKind,
    pub payload: Bytes,
    /// A receipt of one-to-one messages from a reader's outbox: the
    /// highest reader-inbox sequence it names, which is what a sender who
    /// takes receipts as facts is told. 0 for every other send.
    pub covers_seq: u64,
    pub done: Completion,
    /// When the session accepted the send (for latency metrics).
    pub accepted: Instant,
}

/// A message to a group, for the group's shard to sequence in its log.
pub struct GroupSendCmd {
    pub group: u64,
    pub sender: u64,
    pub sender_device: u32,
    pub client_msg_id: u64,
    pub kind: MessageKind,
    pub payload: Bytes,
    pub reply: GroupReply,
    pub accepted: Instant,
}

/// Where a group send's result goes.
pub enum GroupReply {
    /// The sender's session, on this node.
    Session(ReplyTo),
    /// The link request of the sender's node, which completes the original.
    Remote(oneshot::Sender<SendResult>),
}

impl GroupReply {
    pub fn send(self, result: SendResult) {
        match self {
            GroupReply::Session(reply) => reply.send(result),
            // The asking node may have given up; its client retries.
            GroupReply::Remote(tx) => {
                let _ = tx.send(result);
            }
        }
    }
}

/// References to one group log entry, for members on one shard (or, with
/// `copy`, copies of it for members on other cluster nodes). Its outcome
/// goes to `report`.
pub struct RefsCmd {
    pub group: u64,
    /// The group message (seq = group sequence).
    pub message: Arc<Message>,
    pub members: Vec<u64>,
    /// The members' node does not hold the group log: each inbox gets a
    /// copy of the entry (the record with the log position it copies)
    /// instead of a reference.
    pub copy: bool,
    pub report: RefsReport,
    /// When the group send was accepted.
    pub accepted: Instant,
}

/// Who is told the outcome of a part of a reference fan-out.
pub enum RefsReport {
    /// The group's shard, on this node (a `RefsDone`).
    Group,
    /// The link request of the group's node, which reports the part there.
    Remote(oneshot::Sender<ErrorCode>),
}

impl RefsReport {
    /// Reports the outcome of the part of group `group`'s entry `seq`:
    /// `to_group` queues a `RefsDone` for the group's shard.
    pub fn send(self, group: u64, seq: u64, code: ErrorCode, to_group: impl FnOnce(ShardCmd)) {
        match self {
            RefsReport::Group => to_group(ShardCmd::RefsDone { group, seq, code }),
            // The group's node may have given up; it fans out again.
            RefsReport::Remote(tx) => {
                let _ = tx.send(code);
            }
        }
    }
}

/// A membership change or an info request, for the group's shard.
pub struct GroupOpCmd {
    pub group: u64,
    pub actor: u64,
    pub op: GroupOp,
    pub users: Vec<u64>,
    pub answer: Answer<GroupInfo>,
}

/// A send to a broadcast list, for the sender's shard (which owns the
/// list): it plans one copy per consenting recipient and answers with them;
/// the session queues them on the recipients' shards in order, and the
/// sender's shard answers `reply` once every copy is durable. With no
/// recipient (or an error) it answers `reply` at once and `copies` empty.
pub struct BroadcastCmd {
    pub sender: u64,
    pub sender_device: u32,
    pub list: u64,
    pub client_msg_id: u64,
    pub kind: MessageKind,
    pub payload: Bytes,
    pub reply: ReplyTo,
    pub copies: oneshot::Sender<Vec<SendCmd>>,
}

/// A status view, for the poster's shard: if the viewer may see the status,
/// a `viewed` receipt goes into the poster's inbox (once per viewer and
/// status), and `answer` says whether it is stored.
pub struct StatusViewCmd {
    pub viewer: u64,
    pub viewer_device: u32,
    pub poster: u64,
    pub status_id: u64,
    pub answer: Answer<()>,
}

/// Aggregate receipts of one group message, for the group's shard.
pub struct ReceiptQueryCmd {
    pub group: u64,
    pub seq: u64,
    pub asker: u64,
    pub answer: Answer<ReceiptCounts>,
}

/// Delivered (`Ack`) or read marks on the user's inbox (stream 0) or a
/// log-strategy group's stream, for the user's shard.
pub struct MarkCmd {
    pub user: u64,
    pub stream: u64,
    pub up_to_seq: u64,
    pub status: ReceiptStatus,
}

/// Adds a live session and answers with the inbox state as of this point
/// in the shard's order: every mark queued before it is applied, every send
/// written by an earlier batch is counted, and sends of the same batch are
/// appended afterwards and therefore pushed to the new session.
pub struct RegisterCmd {
    pub user: u64,
    /// The session takes receipts as facts: the user is switched for good.
    pub facts: bool,
    pub session: Arc<SessionHandle>,
    pub state: Answer<InboxState>,
}

pub enum ShardCmd {
    Send(SendCmd),
    GroupSend(GroupSendCmd),
    Refs(RefsCmd),
    GroupOp(GroupOpCmd),
    Broadcast(BroadcastCmd),
    /// A business's send, for the business's shard to admit.
    BusinessSend(BusinessSendCmd),
    /// A customer's request about a business, for the business's shard.
    BusinessAsk(BusinessAskCmd),
    /// The admin API's request about a business, for the business's shard.
    BusinessAdmin(BusinessAdminCmd),
    /// What became of a business's admitted send.
    BusinessOutcome(BusinessOutcome),
    StatusView(StatusViewCmd),
    ReceiptQuery(ReceiptQueryCmd),
    Mark(MarkCmd),
    Register(RegisterCmd),
    Unregister {
        user: u64,
        session_id: u64,
    },
    /// Live push of a log-strategy group message to these users' sessions.
    GroupPush {
        group: u64,
        message: Arc<Message>,
        users: Vec<u64>,
        accepted: Instant,
    },
    /// One shard's part of a reference fan-out has an outcome.
    RefsDone {
        group: u64,
        seq: u64,
        code: ErrorCode,
    },
    /// One copy of a broadcast has an outcome.
    CopyDone {
        sender: u64,
        token: u64,
        recipient: u64,
        result: SendResult,
        stored: bool,
    },
    /// One receipt of a reader's outbox has an outcome.
    ReceiptPartDone {
        reader: u64,
        emission: u64,
        ok: bool,
    },
    /// The node's store stopped or started serving a run of slots (a
    /// shard moved away or here).
    Slots(SlotsChange),
    /// Entries of these inboxes that a failed write hid are readable now
    /// (replicated shards): no live push carried them, so the inboxes'
    /// sessions catch up.
    Shown(Vec<u64>),
    /// Finish what is queued before this, sync the store, and stop.
    Stop,
}

/// A shard of the cluster (a run of store slots) that moved.
pub enum SlotsChange {
    /// Moved to another node: its users' sessions here end, and what the
    /// shard kept of its ids is forgotten (the new owner redoes pending
    /// work from the rows it copied).
    Lost(std::ops::Range<u16>),
    /// Moved here: what was kept of its ids from an earlier ownership is
    /// forgotten, and its groups' interrupted fan-outs (`marks`, this
    /// shard's part) and its readers' receipt outbox are taken up, as at
    /// start.
    Gained {
        run: std::ops::Range<u16>,
        marks: Vec<(u64, u64)>,
    },
}

/// A business's send, for the business's shard to admit.
pub struct BusinessSendCmd {
    pub business: u64,
    pub device: u32,
    pub customer: u64,
    pub client_msg_id: u64,
    pub kind: MessageKind,
    pub payload: Bytes,
    pub reply: ReplyTo,
    pub accepted: Instant,
    /// The send to queue on the customer's shard; `None` when this shard
    /// answered `reply` itself (a refusal).
    pub admitted: oneshot::Sender<Option<SendCmd>>,
}

/// A customer's `Business` request, for the business's shard.
pub struct BusinessAskCmd {
    pub customer: u64,
    pub request: BusinessRequest,
    /// `BusinessInfo`, or `TemplatePack` for op `Templates`.
    pub answer: Answer<Body>,
}

/// What the admin API asks of a business's shard.
pub enum AdminOp {
    /// Registers the business or edits it. A display name given for a
    /// registered business waits for review (`Verify`).
    Put {
        display_name: Option<String>,
        profile: Option<Profile>,
    },
    Get,
    Verify {
        verified: bool,
        reason: String,
    },
    Limits {
        tier: Option<u8>,
        messages_per_sec: Option<u32>,
    },
    PutTemplate {
        name: String,
        def: TemplateDef,
    },
    Templates,
    SetTemplateStatus {
        name: String,
        status: TemplateStatus,
        reason: String,
    },
    Consent {
        customer: u64,
        entry: ConsentEntry,
    },
    ConsentOf {
        customer: u64,
    },
    Export {
        customer: Option<u64>,
    },
    /// Erases what the business holds of one customer (the ledger's
    /// entries, consent, window, block), leaving a tombstone with the time.
    Erase {
        customer: u64,
    },
    /// The business's events after a sequence.
    Events {
        after: u64,
        limit: usize,
    },
    /// The business reports a conversion for one of its messages to one
    /// customer.
    Convert {
        message: u64,
        customer: u64,
    },
    /// A customer opened a tracked link of one of the business's messages.
    Click {
        message: u64,
        customer: u64,
    },
    /// One message's status for one customer, or for each (`None`).
    MessageStatus {
        message: u64,
        customer: Option<u64>,
    },
    /// The business's engagement figures.
    Engagement,
    /// Labels a conversation (`Some`), or reads its labels.
    Labels {
        customer: u64,
        labels: Option<Vec<String>>,
    },
    /// Sets the business's time zone.
    TimeZone {
        utc_offset_minutes: i32,
    },
    /// Creates a campaign.
    CreateCampaign(Box<crate::state::campaigns::CampaignDef>),
    /// Every campaign of the business, or one.
    Campaigns,
    Campaign {
        id: u64,
    },
    /// Pauses, resumes or cancels a campaign.
    ControlCampaign {
        id: u64,
        action: &'static str,
    },
    /// The business's statistics per period.
    Stats {
        period: crate::state::business_events::Period,
    },
    /// Sets (or, with an empty url, removes) the business's webhook.
    SetWebhook {
        url: String,
        secret: String,
    },
    /// The webhook and how far it has delivered.
    Webhook,
    /// For the node's webhook sender: the webhook, and the events it has
    /// not taken yet (at most `limit`).
    WebhookBatch {
        limit: usize,
    },
    /// The webhook took (or gave up on) every event up to `up_to`.
    WebhookDelivered {
        up_to: u64,
    },
}

pub type AdminAnswer = oneshot::Sender<Result<serde_json::Value, Invalid>>;

pub struct BusinessAdminCmd {
    pub business: u64,
    pub op: AdminOp,
    pub answer: AdminAnswer,
}

/// A live delivery to one session.
#[derive(Clone)]
pub enum Delivery {
    /// An inbox message (seq = inbox sequence).
    Inbox(Arc<Message>),
    /// A log-strategy group message (seq = group sequence).
    Group(u64, Arc<Message>),
    /// A receipt fact of the user's (for sessions that take facts).
    Fact(ReceiptFact),
}

/// A live session as its user's shard sees it: where to push, and the flag
/// that moves it to catch-up.
pub struct SessionHandle {
    pub id: u64,
    /// Live deliveries with the time their send was accepted, bounded by
    /// `limits.outbound_queue_len`.
    pub deliveries: mailbox::Sender<(Delivery, Instant)>,
    /// Set by the shard when `deliveries` was full: the session is off live
    /// push and its writer catches up from the store, then clears it.
    pub lagging: AtomicBool,
    /// Wakes the writer when `lagging` is set.
    pub wake: Notify,
    /// Set (with `wake`) when the user's shard has moved to another node:
    /// the writer says `Goodbye` (`SHARD_UNAVAILABLE`, retry) and closes,
    /// and the client connects again, to land on the new owner.
    pub moved: AtomicBool,
}

impl SessionHandle {
    /// Takes the session off live push: its writer wakes and reads the
    /// store from what it delivered last, then clears `lagging`.
    pub fn catch_up(&self) {
        self.lagging
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.wake.notify_one();
    }

    /// Ends the session: its user's shard is another node's now.
    pub fn end_moved(&self) {
        self.moved.store(true, std::sync::atomic::Ordering::SeqCst);
        self.wake.notify_one();
    }
}

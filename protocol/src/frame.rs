//! Frame types and their byte layouts (see `PROTOCOL.md` for the full document).
//!
//! Every frame on the wire is:
//!
//! ```text
//! offset size  field
//! 0      4     length      u32 BE: bytes after this field (type + request id + body), >= 5
//! 4      1     type        u8 frame type (table in PROTOCOL.md)
//! 5      4     request_id  u32 BE: set by the requester, echoed in the reply; 0 = unsolicited
//! 9      ..    body        type-specific, all integers big-endian
//! ```

use bytes::Bytes;

use crate::error::ErrorCode;

/// The protocol version this crate speaks.
pub const PROTOCOL_VERSION: u16 = 1;
/// Bytes before the body: length (4) + type (1) + request id (4).
pub const HEADER_LEN: usize = 9;
/// Default maximum for the length field (1 MiB).
pub const DEFAULT_MAX_FRAME_LEN: u32 = 1 << 20;
/// Maximum token length accepted in `Hello`.
pub const MAX_TOKEN_LEN: usize = 1024;
/// Maximum length of the human-readable text in `Error` and `Goodbye`.
pub const MAX_REASON_LEN: usize = 1024;
/// Fixed part of an encoded [`Message`] (everything but the payload bytes).
pub const MESSAGE_FIXED_LEN: usize = 8 + 8 + 8 + 4 + 8 + 8 + 1 + 8 + 1 + 4;
/// Fixed part of an encoded [`Send`].
pub const SEND_FIXED_LEN: usize = 8 + 1 + 8 + 1 + 4;
/// Encoded size of one [`SendResult`].
pub const SEND_RESULT_LEN: usize = 8 + 2 + 8 + 8 + 8 + 1;

const _: () = assert!(HEADER_LEN == 4 + 1 + 4);
const _: () = assert!(MESSAGE_FIXED_LEN == 58);

/// Frame type bytes. Stable wire values.
pub mod frame_type {
    pub const HELLO: u8 = 0x01;
    pub const WELCOME: u8 = 0x02;
    pub const SEND: u8 = 0x03;
    pub const SEND_BATCH: u8 = 0x04;
    pub const SEND_ACK: u8 = 0x05;
    pub const SEND_BATCH_ACK: u8 = 0x06;
    pub const DELIVER: u8 = 0x07;
    pub const ACK: u8 = 0x08;
    pub const FETCH: u8 = 0x09;
    pub const FETCH_REPLY: u8 = 0x0A;
    pub const PING: u8 = 0x0B;
    pub const PONG: u8 = 0x0C;
    pub const ERROR: u8 = 0x0D;
    pub const GOODBYE: u8 = 0x0E;
    pub const GROUP: u8 = 0x0F;
    pub const GROUP_INFO: u8 = 0x10;
    pub const GROUP_DELIVER: u8 = 0x11;
    pub const MARK: u8 = 0x12;
    pub const CONTACTS: u8 = 0x13;
    pub const LIST: u8 = 0x14;
    pub const USERS: u8 = 0x15;
    pub const BROADCAST_ACK: u8 = 0x16;
    pub const RECEIPT_QUERY: u8 = 0x17;
    pub const RECEIPT_COUNTS: u8 = 0x18;
    pub const STATUS_POST: u8 = 0x19;
    pub const STATUS_POSTED: u8 = 0x1A;
    pub const STATUS_FETCH: u8 = 0x1B;
    pub const STATUS_LIST: u8 = 0x1C;
    pub const STATUS_VIEW: u8 = 0x1D;
    pub const DONE: u8 = 0x1E;
    pub const BUSINESS: u8 = 0x1F;
    pub const BUSINESS_INFO: u8 = 0x20;
    pub const TEMPLATE_PACK: u8 = 0x21;
    pub const EVENT_FETCH: u8 = 0x22;
    pub const EVENT_LIST: u8 = 0x23;
    pub const RECEIPTS: u8 = 0x24;
    /// The highest assigned frame type.
    pub const LAST: u8 = RECEIPTS;
}

/// Group ids have this bit set and user ids never do, so a group's log can
/// live in the same keyed store as user inboxes without colliding.
pub const GROUP_ID_BIT: u64 = 1 << 63;

/// Defines a `u8`-valued wire enum with `from_u8`.
macro_rules! wire_enum {
    ($(#[$m:meta])* $name:ident { $($(#[$vm:meta])* $v:ident = $n:expr),* $(,)? }) => {
        $(#[$m])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        #[repr(u8)]
        pub enum $name { $($(#[$vm])* $v = $n),* }
        impl $name {
            pub fn from_u8(v: u8) -> Option<$name> {
                match v { $($n => Some($name::$v),)* _ => None }
            }
        }
    };
}

wire_enum!(
    /// What a `Group` request does.
    GroupOp {
        /// Create a group; `group` is ignored (0) and the server assigns the
        /// id; `users` are the first members besides the creator (admin).
        Create = 1,
        Add = 2,
        Remove = 3,
        /// The sender leaves; `users` is empty.
        Leave = 4,
        Promote = 5,
        Demote = 6,
        /// Read the group's members and head; `users` is empty.
        Info = 7,
    }
);

wire_enum!(
    /// A member's role.
    Role { Member = 1, Admin = 2 }
);

wire_enum!(
    /// How a group's messages reach its members.
    Strategy {
        /// A reference in each member's inbox (body stored once, in the group log).
        Refs = 1,
        /// Members read the group log with their own cursor (`GroupDeliver`).
        Log = 2,
    }
);

wire_enum!(
    /// A message's delivery status, which only moves forward.
    ReceiptStatus { Delivered = 1, Read = 2, Viewed = 3 }
);

wire_enum!(
    /// What a `Contacts` request does.
    ContactsOp { Add = 1, Remove = 2, Get = 3 }
);

wire_enum!(
    /// What a `List` request does.
    ListOp {
        /// Create or replace the list with `users`.
        Set = 1,
        Delete = 2,
        Get = 3,
    }
);

wire_enum!(
    /// Who may see a status.
    Audience {
        /// Every contact of the poster (who has the poster as a contact too).
        Contacts = 1,
        /// Every such contact except `users`.
        ContactsExcept = 2,
        /// Only `users` (who must have the poster as a contact).
        Only = 3,
    }
);

wire_enum!(
    /// A membership change, as announced to members in a system message.
    GroupEventKind { Created = 1, Added = 2, Removed = 3, Left = 4, Promoted = 5, Demoted = 6 }
);

/// Where a message goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Destination {
    /// One user's inbox (tag 1).
    User(u64),
    /// A group (tag 2).
    Group(u64),
    /// A sender's broadcast list (tag 3).
    List(u64),
}

impl Destination {
    pub fn tag(self) -> u8 {
        match self {
            Destination::User(_) => 1,
            Destination::Group(_) => 2,
            Destination::List(_) => 3,
        }
    }
    pub fn id(self) -> u64 {
        match self {
            Destination::User(id) | Destination::Group(id) | Destination::List(id) => id,
        }
    }
    pub fn from_parts(tag: u8, id: u64) -> Option<Destination> {
        match tag {
            1 => Some(Destination::User(id)),
            2 => Some(Destination::Group(id)),
            3 => Some(Destination::List(id)),
            _ => None,
        }
    }
}

/// What a message is. Stable wire values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum MessageKind {
    Chat = 1,
    Receipt = 2,
    Status = 3,
    System = 4,
    Template = 5,
    /// A message erased on request (a customer's data erased for a
    /// business): the record keeps its place and ids, the payload is empty.
    Erased = 6,
}

impl MessageKind {
    pub fn from_u8(v: u8) -> Option<MessageKind> {
        Some(match v {
            1 => MessageKind::Chat,
            2 => MessageKind::Receipt,
            3 => MessageKind::Status,
            4 => MessageKind::System,
            5 => MessageKind::Template,
            6 => MessageKind::Erased,
            _ => return None,
        })
    }
}

/// Client -> server, first frame of every connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    pub version: u16,
    pub user_id: u64,
    pub device_id: u32,
    /// `Some(n)`: deliver everything after inbox sequence `n`.
    /// `None`: deliver everything not yet acknowledged.
    pub resume_after: Option<u64>,
    /// `Some(v)`: this session takes its one-to-one receipts as facts
    /// (`Receipts` frames), every fact after version `v` first (0: all).
    /// `None`: receipts come as `receipt` messages in the inbox.
    pub receipts_after: Option<u64>,
    pub token: Bytes,
}

/// Server -> client, reply to a successful `Hello`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Welcome {
    pub version: u16,
    pub session_id: u64,
    /// Highest sequence in the inbox (0 = never written).
    pub head_seq: u64,
    /// Lowest sequence still stored (`head_seq + 1` when nothing is stored).
    pub oldest_seq: u64,
    /// First sequence the server will deliver in this session.
    pub resume_from: u64,
    /// The requested resume point is older than what is retained: sequences
    /// `resume_after + 1 .. oldest_seq` are gone and will not be delivered.
    pub gap: bool,
    pub server_time_ms: u64,
    pub max_frame_len: u32,
    pub max_batch: u16,
    pub keepalive_ms: u32,
}

/// Client -> server: one message to send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Send {
    /// Chosen by the client, unique per sender; a retry reuses it.
    pub client_msg_id: u64,
    pub destination: Destination,
    pub kind: MessageKind,
    pub payload: Bytes,
}

/// Server -> client: the message is durable in the recipient's inbox.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SendAck {
    pub client_msg_id: u64,
    pub server_msg_id: u64,
    /// Sequence in the recipient's inbox.
    pub seq: u64,
    pub timestamp_ms: u64,
    /// This send was a retry of one already stored; the fields describe the original.
    pub duplicate: bool,
}

/// One item of a `SendBatchAck`: `code == OK` and the ack fields, or an error code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SendResult {
    pub client_msg_id: u64,
    pub code: ErrorCode,
    pub server_msg_id: u64,
    pub seq: u64,
    pub timestamp_ms: u64,
    pub duplicate: bool,
}

/// A stored message as delivered to (or fetched by) its recipient.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    pub seq: u64,
    pub server_msg_id: u64,
    pub sender: u64,
    pub sender_device: u32,
    pub client_msg_id: u64,
    pub timestamp_ms: u64,
    pub destination: Destination,
    pub kind: MessageKind,
    pub payload: Bytes,
}

/// Client -> server: read a range of one's own inbox.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fetch {
    /// Must be the session's own user id; anything else is `FORBIDDEN`.
    pub user_id: u64,
    pub after_seq: u64,
    pub limit: u16,
}

/// Server -> client: the messages of a `Fetch`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FetchReply {
    pub head_seq: u64,
    pub oldest_seq: u64,
    pub messages: Vec<Message>,
}

/// An error (`Error`) or the reason the server is closing (`Goodbye`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reason {
    pub code: ErrorCode,
    pub message: String,
}

impl Reason {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Reason {
        let mut message = message.into();
        if message.len() > MAX_REASON_LEN {
            let mut end = MAX_REASON_LEN;
            while !message.is_char_boundary(end) {
                end -= 1;
            }
            message.truncate(end);
        }
        Reason { code, message }
    }
}

/// Client -> server: a group operation. Answered by `GroupInfo` (the state
/// after the operation) or an `Error`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupRequest {
    pub op: GroupOp,
    pub group: u64,
    pub users: Vec<u64>,
}

/// Server -> client: a group's state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupInfo {
    pub group: u64,
    /// Highest sequence in the group log.
    pub head_seq: u64,
    pub strategy: Strategy,
    pub members: Vec<(u64, Role)>,
}

/// Client -> server: everything up to `up_to_seq` of a stream has reached the
/// status. `stream` 0 is the session's own inbox; a group id is that group's
/// log (for groups delivered by `GroupDeliver`). Answered with nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mark {
    pub stream: u64,
    pub up_to_seq: u64,
    pub status: ReceiptStatus,
}

/// What one reader has done with the session user's one-to-one messages:
/// every message to `reader` whose `SendAck.seq` is at most `delivered`
/// reached the reader, at most `read` was read. `version` orders the user's
/// facts (one counter per user; each change takes the next).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReceiptFact {
    pub reader: u64,
    pub delivered: u64,
    pub read: u64,
    pub version: u64,
}

/// Encoded size of one [`ReceiptFact`].
pub const RECEIPT_FACT_LEN: usize = 32;

/// Client -> server: edit or read one's contacts. Answered by `Users`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContactsRequest {
    pub op: ContactsOp,
    pub users: Vec<u64>,
}

/// Client -> server: edit or read one of one's broadcast lists. Answered by
/// `Users` (`Done` for a delete).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListRequest {
    pub op: ListOp,
    pub list: u64,
    pub users: Vec<u64>,
}

/// Server -> client: a set of users (contacts: `id` is the user; a list: the list id).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Users {
    pub id: u64,
    pub users: Vec<u64>,
}

/// Server -> client: a send to a broadcast list is durable in every
/// consenting recipient's inbox.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BroadcastAck {
    pub client_msg_id: u64,
    pub server_msg_id: u64,
    pub timestamp_ms: u64,
    /// Recipients whose inbox has the message.
    pub delivered: u16,
    /// Recipients skipped because they do not have the sender as a contact.
    pub skipped: u16,
    /// Every delivered copy was stored by an earlier try of this send.
    pub duplicate: bool,
}

/// Server -> client: aggregate receipts of one group message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReceiptCounts {
    pub group: u64,
    pub seq: u64,
    /// Members the message was addressed to (current members who were in
    /// the group when it was sent, except the sender).
    pub recipients: u32,
    pub delivered: u32,
    pub read: u32,
}

/// Client -> server: post a status.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StatusPost {
    pub audience: Audience,
    pub users: Vec<u64>,
    pub payload: Bytes,
}

/// One current status, as fetched by a viewer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Status {
    pub poster: u64,
    pub status_id: u64,
    pub posted_at_ms: u64,
    pub expires_at_ms: u64,
    pub payload: Bytes,
}

wire_enum!(
    /// What a customer's `Business` request does.
    BusinessOp {
        /// Read the business's profile and this customer's state with it.
        Info = 1,
        /// Stop every message from the business (counts against its quality).
        Block = 2,
        Unblock = 3,
        /// Report the business (`text`: the reason; counts against its quality).
        Report = 4,
        /// Opt in to messages for `purpose` (`text`: the wording shown).
        OptIn = 5,
        /// Withdraw the opt-in for `purpose`.
        OptOut = 6,
        /// Fetch the business's approved templates: answered by
        /// `TemplatePack`.
        Templates = 7,
    }
);

wire_enum!(
    /// What a business message is for; a template's category maps to one.
    Purpose {
        /// No purpose (info, block, unblock, report).
        None = 0,
        Marketing = 1,
        /// Utility and authentication templates.
        Utility = 2,
    }
);

/// Longest text in a `Business` request or a `BusinessInfo` field.
pub const MAX_BUSINESS_TEXT_LEN: usize = 4096;

/// Client -> server: a customer's request about a business. Answered by
/// `BusinessInfo` as it stands after the request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BusinessRequest {
    pub op: BusinessOp,
    pub business: u64,
    pub purpose: Purpose,
    /// The language of `text` (`en_US`), for an opt-in: the customer's
    /// preferred language for this business's templates. Empty otherwise.
    pub language: String,
    pub text: String,
}

/// Server -> client: a business as one customer sees it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BusinessInfo {
    pub business: u64,
    pub verified: bool,
    pub display_name: String,
    pub about: String,
    pub address: String,
    pub description: String,
    pub email: String,
    pub websites: Vec<String>,
    /// A reference to the profile picture (the platform's media store).
    pub picture: String,
    /// This customer blocks the business.
    pub blocked: bool,
    /// This customer's current opt-ins.
    pub marketing: bool,
    pub utility: bool,
}

/// Server -> client: a business's approved templates, every language, as
/// JSON (layout in PROTOCOL.md), and until when the client may keep them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TemplatePack {
    pub business: u64,
    pub valid_until_ms: u64,
    pub json: String,
}

/// The body of a frame, one variant per frame type.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Body {
    Hello(Hello),
    Welcome(Welcome),
    Send(Send),
    SendBatch(Vec<Send>),
    SendAck(SendAck),
    SendBatchAck(Vec<SendResult>),
    Deliver(Vec<Message>),
    Ack {
        up_to_seq: u64,
    },
    Fetch(Fetch),
    FetchReply(FetchReply),
    Ping {
        nonce: u64,
    },
    Pong {
        nonce: u64,
    },
    Error(Reason),
    Goodbye(Reason),
    Group(GroupRequest),
    GroupInfo(GroupInfo),
    GroupDeliver {
        group: u64,
        messages: Vec<Message>,
    },
    Mark(Mark),
    Contacts(ContactsRequest),
    List(ListRequest),
    Users(Users),
    BroadcastAck(BroadcastAck),
    ReceiptQuery {
        group: u64,
        seq: u64,
    },
    ReceiptCounts(ReceiptCounts),
    StatusPost(StatusPost),
    StatusPosted {
        status_id: u64,
        expires_at_ms: u64,
    },
    StatusFetch,
    StatusList(Vec<Status>),
    StatusView {
        poster: u64,
        status_id: u64,
    },
    Done,
    Business(BusinessRequest),
    /// Boxed: the largest body, rare.
    BusinessInfo(Box<BusinessInfo>),
    TemplatePack(TemplatePack),
    /// A business reads its events after a sequence.
    EventFetch {
        after: u64,
        limit: u16,
    },
    /// The events read: the last sequence there is, and the events as a
    /// JSON array (layout in PROTOCOL.md).
    EventList {
        last: u64,
        json: String,
    },
    /// Receipt facts, in version order; never acknowledged.
    Receipts(Vec<ReceiptFact>),
}

impl Body {
    pub fn frame_type(&self) -> u8 {
        use frame_type::*;
        match self {
            Body::Hello(_) => HELLO,
            Body::Welcome(_) => WELCOME,
            Body::Send(_) => SEND,
            Body::SendBatch(_) => SEND_BATCH,
            Body::SendAck(_) => SEND_ACK,
            Body::SendBatchAck(_) => SEND_BATCH_ACK,
            Body::Deliver(_) => DELIVER,
            Body::Ack { .. } => ACK,
            Body::Fetch(_) => FETCH,
            Body::FetchReply(_) => FETCH_REPLY,
            Body::Ping { .. } => PING,
            Body::Pong { .. } => PONG,
            Body::Error(_) => ERROR,
            Body::Goodbye(_) => GOODBYE,
            Body::Group(_) => GROUP,
            Body::GroupInfo(_) => GROUP_INFO,
            Body::GroupDeliver { .. } => GROUP_DELIVER,
            Body::Mark(_) => MARK,
            Body::Contacts(_) => CONTACTS,
            Body::List(_) => LIST,
            Body::Users(_) => USERS,
            Body::BroadcastAck(_) => BROADCAST_ACK,
            Body::ReceiptQuery { .. } => RECEIPT_QUERY,
            Body::ReceiptCounts(_) => RECEIPT_COUNTS,
            Body::StatusPost(_) => STATUS_POST,
            Body::StatusPosted { .. } => STATUS_POSTED,
            Body::StatusFetch => STATUS_FETCH,
            Body::StatusList(_) => STATUS_LIST,
            Body::StatusView { .. } => STATUS_VIEW,
            Body::Done => DONE,
            Body::Business(_) => BUSINESS,
            Body::BusinessInfo(_) => BUSINESS_INFO,
            Body::TemplatePack(_) => TEMPLATE_PACK,
            Body::EventFetch { .. } => EVENT_FETCH,
            Body::EventList { .. } => EVENT_LIST,
            Body::Receipts(_) => RECEIPTS,
        }
    }

    /// Frame type name, for logs and metrics labels.
    pub fn name(&self) -> &'static str {
        frame_type_name(self.frame_type())
    }
}

/// Name of a frame type byte ("unknown" for unassigned values).
pub fn frame_type_name(t: u8) -> &'static str {
    use frame_type::*;
    match t {
        HELLO => "hello",
        WELCOME => "welcome",
        SEND => "send",
        SEND_BATCH => "send_batch",
        SEND_ACK => "send_ack",
        SEND_BATCH_ACK => "send_batch_ack",
        DELIVER => "deliver",
        ACK => "ack",
        FETCH => "fetch",
        FETCH_REPLY => "fetch_reply",
        PING => "ping",
        PONG => "pong",
        ERROR => "error",
        GOODBYE => "goodbye",
        GROUP => "group",
        GROUP_INFO => "group_info",
        GROUP_DELIVER => "group_deliver",
        MARK => "mark",
        CONTACTS => "contacts",
        LIST => "list",
        USERS => "users",
        BROADCAST_ACK => "broadcast_ack",
        RECEIPT_QUERY => "receipt_query",
        RECEIPT_COUNTS => "receipt_counts",
        STATUS_POST => "status_post",
        STATUS_POSTED => "status_posted",
        STATUS_FETCH => "status_fetch",
        STATUS_LIST => "status_list",
        STATUS_VIEW => "status_view",
        DONE => "done",
        BUSINESS => "business",
        BUSINESS_INFO => "business_info",
        TEMPLATE_PACK => "template_pack",
        EVENT_FETCH => "event_fetch",
        EVENT_LIST => "event_list",
        RECEIPTS => "receipts",
        _ => "unknown",
    }
}

/// One frame: a request id and a body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub request_id: u32,
    pub body: Body,
}

impl Frame {
    pub fn new(request_id: u32, body: Body) -> Frame {
        Frame { request_id, body }
    }
}

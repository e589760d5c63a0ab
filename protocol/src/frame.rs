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
}

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
}

impl MessageKind {
    pub fn from_u8(v: u8) -> Option<MessageKind> {
        Some(match v {
            1 => MessageKind::Chat,
            2 => MessageKind::Receipt,
            3 => MessageKind::Status,
            4 => MessageKind::System,
            5 => MessageKind::Template,
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
    Ack { up_to_seq: u64 },
    Fetch(Fetch),
    FetchReply(FetchReply),
    Ping { nonce: u64 },
    Pong { nonce: u64 },
    Error(Reason),
    Goodbye(Reason),
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

//! The data plane's requests between nodes, as bytes on a link.
//!
//! A request body starts with its operation byte; every integer is
//! big-endian, as in the client protocol.
//!
//! ```text
//! SEND (1): shard u32 | epoch i64 | sender u64 | sender_device u32 |
//!           recipient u64 | client_msg_id u64 | scope u64 | kind u8 |
//!           destination (tag u8, id u64) | payload (u32 length, bytes) |
//!           covers_seq u64 (a receipt's highest reader-inbox sequence, or 0)
//! answer:   0 | code u16 | server_msg_id u64 | seq u64 | timestamp_ms u64 |
//!           duplicate u8 | stored u8
//!        or 1 (not the owner at that epoch) | epoch i64 | owner (u16 length, UTF-8)
//!
//! VIEW (2): shard u32 | epoch i64 | viewer u64 | viewer_device u32 |
//!           poster u64 | status_id u64
//! answer:   0 | code u16 | message (u16 length, UTF-8)   or 1 (not the owner, as above)
//!
//! STATUSES (3): viewer u64 | count u16 | poster u64 × count
//! answer:   0 | count u32 | (poster u64 | status_id u64 | posted_at_ms u64 |
//!           expires_at_ms u64 | payload (u32 length, bytes)) × count
//!        or 1 (not the owner of every poster's shard, as above)
//!
//! GROUP_SEND (4): shard u32 | epoch i64 | sender u64 | sender_device u32 |
//!           group u64 | client_msg_id u64 | kind u8 | payload (u32 length, bytes)
//! answer:   as SEND's (stored is 0)
//!
//! GROUP_ASK (5): shard u32 | epoch i64 | asker u64 | one client-protocol
//!           frame: Group (a membership change or info), ReceiptQuery, or
//!           Business (a customer's request, for the business's shard)
//! answer:   0 | one client-protocol frame: GroupInfo, ReceiptCounts,
//!           BusinessInfo or Error
//!        or 1 (not the owner, as above)
//!
//! REFS (6): group u64 | count u16 | (shard u32 | epoch i64) × count |
//!           members u16 | member u64 × members | one client-protocol
//!           Deliver frame holding the one group log entry
//! answer:   0 | code u16   or 1 (not the owner of every member's shard, as above)
//!
//! CURSORS (7): group u64 | count u16 | member u64 × count
//! answer:   0 | count u16 | (member u64 | delivered u64 | read u64) × count
//!        or 1 (not the owner of every member's shard, as above)
//!
//! EXPORT (8): a step of a shard's copy to its next owner; layout in
//!           transfer.rs
//!
//! Replication (replica.rs); each starts op u8 | shard u32 | epoch i64, and
//! each answer is 0 | what it asked, or 1 | why (u16 length, UTF-8):
//! REPLICATE (9): lsn u64 | entries (count u32 | entry × count, as EXPORT's)
//!           answer: applied u64 (the highest part applied durably; 0
//!           while the copy is still copying)
//! REPL_FOLLOW (10): (nothing)   answer: the first part's lsn u64 |
//!           follower id u64 (this following of the copy, at the primary)
//! REPL_CHUNK (11): from (as EXPORT's)   answer: next (as from) | entries
//! REPL_STATUS (12): applied u64 | follower id u64   answer: state u8
//!           (0 not following, 1 following, 2 in the in-sync set)
//! ```
//!
//! GROUP_SEND and GROUP_ASK carry a member's command to the node that owns
//! the group; REFS a group's shard's part of a fan-out to the members'
//! node, which stores copies of the entry; CURSORS reads members' group
//! cursors for the group's receipt counts.
//!
//! VIEW records a status view on the poster's shard (the viewer's side of
//! the consent was checked on the viewer's node); STATUSES reads the
//! posters' statuses that the viewer may see (the posters' side).
//!
//! A send here is one message for one inbox: a client's one-to-one send, a
//! receipt from a reader's shard, a broadcast copy. The node that sent it
//! keeps what waits for the outcome (the session's reply, the reader's
//! outbox row, the broadcast's answer) and completes it from the answer.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use courier_protocol::{
    Body, Destination, ErrorCode, Frame, Message, MessageKind, SendResult, Status,
};

pub const SEND: u8 = 1;
pub const VIEW: u8 = 2;
pub const STATUSES: u8 = 3;
pub const GROUP_SEND: u8 = 4;
pub const GROUP_ASK: u8 = 5;
pub const REFS: u8 = 6;
pub const CURSORS: u8 = 7;
/// A step of a shard's export to its next owner (`transfer.rs`).
pub const EXPORT: u8 = 8;
/// A primary's part of a write for a backup (`replica.rs`).
pub const REPLICATE: u8 = 9;
/// A copy asks to follow its primary.
pub const REPL_FOLLOW: u8 = 10;
/// A copy reads a chunk of its primary's shard.
pub const REPL_CHUNK: u8 = 11;
/// A copy says where it stands; the primary adds it to the in-sync set.
pub const REPL_STATUS: u8 = 12;

/// A member's message for a group whose shard the receiving node owns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoteGroupSend {
    pub shard: u32,
    pub epoch: i64,
    pub sender: u64,
    pub sender_device: u32,
    pub group: u64,
    pub client_msg_id: u64,
    pub kind: MessageKind,
    pub payload: Bytes,
}

/// A member's membership change, group info or receipt query, for a group
/// whose shard the receiving node owns: the client's frame as it came.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoteGroupAsk {
    pub shard: u32,
    pub epoch: i64,
    pub asker: u64,
    pub body: Body,
}

/// One group log entry for members whose shards the receiving node owns,
/// at the epochs the group's node routed by.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoteRefs {
    pub group: u64,
    pub epochs: Vec<(u32, i64)>,
    pub members: Vec<u64>,
    pub message: Message,
}

/// The group cursors of members whose shards the receiving node owns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoteCursors {
    pub group: u64,
    pub members: Vec<u64>,
}

/// A member's delivered and read cursors in a group.
pub type MemberCursors = Vec<(u64, u64, u64)>;

/// A status view for a poster whose shard the receiving node owns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoteView {
    pub shard: u32,
    pub epoch: i64,
    pub viewer: u64,
    pub viewer_device: u32,
    pub poster: u64,
    pub status_id: u64,
}

/// The statuses of posters whose shards the receiving node owns, as
/// `viewer` may see them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoteStatuses {
    pub viewer: u64,
    pub posters: Vec<u64>,
}

/// What the owner answers a view or a statuses request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer<T> {
    Done(T),
    /// See [`SendAnswer::NotOwner`].
    NotOwner {
        owner: String,
        epoch: i64,
    },
}

/// A message for the inbox of a user whose shard the receiving node owns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoteSend {
    /// The cluster shard and the epoch the sender routed it by.
    pub shard: u32,
    pub epoch: i64,
    pub sender: u64,
    pub sender_device: u32,
    pub recipient: u64,
    pub client_msg_id: u64,
    pub scope: u64,
    pub kind: MessageKind,
    pub destination: Destination,
    pub payload: Bytes,
    pub covers_seq: u64,
}

/// What the owner answers a `RemoteSend`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SendAnswer {
    /// The write's outcome (an error code, or where it was stored).
    Outcome { result: SendResult, stored: bool },
    /// The receiving node does not own the shard at the epoch asked for:
    /// this is who it believes does, at which epoch.
    NotOwner { owner: String, epoch: i64 },
}

/// Why bytes from a peer are not a request or an answer.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("truncated")]
    Truncated,
    #[error("unknown operation {0}")]
    UnknownOp(u8),
    #[error("unknown message kind {0}")]
    UnknownKind(u8),
    #[error("unknown destination tag {0}")]
    UnknownDestination(u8),
    #[error("{0} bytes after the end")]
    Trailing(usize),
    #[error("text is not UTF-8")]
    BadText,
    #[error("not a client-protocol frame this request carries: {0}")]
    BadFrame(String),
}

impl RemoteSend {
    pub fn encode(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(83 + self.payload.len());
        out.put_u8(SEND);
        out.put_u32(self.shard);
        out.put_i64(self.epoch);
        out.put_u64(self.sender);
        out.put_u32(self.sender_device);
        out.put_u64(self.recipient);
        out.put_u64(self.client_msg_id);
        out.put_u64(self.scope);
        out.put_u8(self.kind as u8);
        put_destination(&mut out, self.destination);
        out.put_u32(self.payload.len() as u32);
        out.put_slice(&self.payload);
        out.put_u64(self.covers_seq);
        out.freeze()
    }

    /// Decodes a body whose first byte is `SEND`.
    pub fn decode(mut b: Bytes) -> Result<RemoteSend, WireError> {
        need(&b, 1 + 4 + 8 + 8 + 4 + 8 + 8 + 8 + 1 + 9 + 4)?;
        match b.get_u8() {
            SEND => {}
            op => return Err(WireError::UnknownOp(op)),
        }
        let shard = b.get_u32();
        let epoch = b.get_i64();
        let sender = b.get_u64();
        let sender_device = b.get_u32();
        let recipient = b.get_u64();
        let client_msg_id = b.get_u64();
        let scope = b.get_u64();
        let kind = b.get_u8();
        let kind = MessageKind::from_u8(kind).ok_or(WireError::UnknownKind(kind))?;
        let destination = get_destination(&mut b)?;
        let len = b.get_u32() as usize;
        need(&b, len)?;
        let payload = b.split_to(len);
        need(&b, 8)?;
        let covers_seq = b.get_u64();
        done(&b)?;
        Ok(RemoteSend {
            shard,
            epoch,
            sender,
            sender_device,
            recipient,
            client_msg_id,
            scope,
            kind,
            destination,
            payload,
            covers_seq,
        })
    }
}

impl RemoteView {
    pub fn encode(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(45);
        out.put_u8(VIEW);
        out.put_u32(self.shard);
        out.put_i64(self.epoch);
        out.put_u64(self.viewer);
        out.put_u32(self.viewer_device);
        out.put_u64(self.poster);
        out.put_u64(self.status_id);
        out.freeze()
    }

    pub fn decode(mut b: Bytes) -> Result<RemoteView, WireError> {
        need(&b, 1 + 4 + 8 + 8 + 4 + 8 + 8)?;
        match b.get_u8() {
            VIEW => {}
            op => return Err(WireError::UnknownOp(op)),
        }
        let v = RemoteView {
            shard: b.get_u32(),
            epoch: b.get_i64(),
            viewer: b.get_u64(),
            viewer_device: b.get_u32(),
            poster: b.get_u64(),
            status_id: b.get_u64(),
        };
        done(&b)?;
        Ok(v)
    }
}

impl RemoteStatuses {
    pub fn encode(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(11 + 8 * self.posters.len());
        out.put_u8(STATUSES);
        out.put_u64(self.viewer);
        out.put_u16(self.posters.len() as u16);
        for p in &self.posters {
            out.put_u64(*p);
        }
        out.freeze()
    }

    pub fn decode(mut b: Bytes) -> Result<RemoteStatuses, WireError> {
        need(&b, 1 + 8 + 2)?;
        match b.get_u8() {
            STATUSES => {}
            op => return Err(WireError::UnknownOp(op)),
        }
        let viewer = b.get_u64();
        let n = b.get_u16() as usize;
        need(&b, 8 * n)?;
        let posters = (0..n).map(|_| b.get_u64()).collect();
        done(&b)?;
        Ok(RemoteStatuses { viewer, posters })
    }
}

/// A view's outcome: done, or refused with a code and why.
pub type ViewOutcome = Result<(), (ErrorCode, String)>;

impl Answer<ViewOutcome> {
    pub fn encode(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(16);
        match self {
            Answer::Done(outcome) => {
                out.put_u8(0);
                let (code, why) = match outcome {
                    Ok(()) => (ErrorCode::OK, ""),
                    Err((code, why)) => (*code, why.as_str()),
                };
                out.put_u16(code.0);
                put_text(&mut out, why);
            }
            Answer::NotOwner { owner, epoch } => put_not_owner(&mut out, owner, *epoch),
        }
        out.freeze()
    }

    pub fn decode(mut b: Bytes) -> Result<Answer<ViewOutcome>, WireError> {
        need(&b, 1)?;
        match b.get_u8() {
            0 => {
                need(&b, 2)?;
                let code = ErrorCode(b.get_u16());
                let why = get_text(&mut b)?;
                done(&b)?;
                Ok(Answer::Done(if code == ErrorCode::OK {
                    Ok(())
                } else {
                    Err((code, why))
                }))
            }
            1 => get_not_owner(b),
            op => Err(WireError::UnknownOp(op)),
        }
    }
}

impl Answer<Vec<Status>> {
    pub fn encode(&self) -> Bytes {
        let mut out = BytesMut::new();
        match self {
            Answer::Done(statuses) => {
                out.put_u8(0);
                out.put_u32(statuses.len() as u32);
                for s in statuses {
                    out.put_u64(s.poster);
                    out.put_u64(s.status_id);
                    out.put_u64(s.posted_at_ms);
                    out.put_u64(s.expires_at_ms);
                    out.put_u32(s.payload.len() as u32);
                    out.put_slice(&s.payload);
                }
            }
            Answer::NotOwner { owner, epoch } => put_not_owner(&mut out, owner, *epoch),
        }
        out.freeze()
    }

    pub fn decode(mut b: Bytes) -> Result<Answer<Vec<Status>>, WireError> {
        need(&b, 1)?;
        match b.get_u8() {
            0 => {
                need(&b, 4)?;
                let n = b.get_u32() as usize;
                let mut out = Vec::with_capacity(n.min(1024));
                for _ in 0..n {
                    need(&b, 8 * 4 + 4)?;
                    let (poster, status_id) = (b.get_u64(), b.get_u64());
                    let (posted_at_ms, expires_at_ms) = (b.get_u64(), b.get_u64());
                    let len = b.get_u32() as usize;
                    need(&b, len)?;
                    out.push(Status {
                        poster,
                        status_id,
                        posted_at_ms,
                        expires_at_ms,
                        payload: b.split_to(len),
                    });
                }
                done(&b)?;
                Ok(Answer::Done(out))
            }
            1 => get_not_owner(b),
            op => Err(WireError::UnknownOp(op)),
        }
    }
}

impl RemoteGroupSend {
    pub fn encode(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(46 + self.payload.len());
        out.put_u8(GROUP_SEND);
        out.put_u32(self.shard);
        out.put_i64(self.epoch);
        out.put_u64(self.sender);
        out.put_u32(self.sender_device);
        out.put_u64(self.group);
        out.put_u64(self.client_msg_id);
        out.put_u8(self.kind as u8);
        out.put_u32(self.payload.len() as u32);
        out.put_slice(&self.payload);
        out.freeze()
    }

    pub fn decode(mut b: Bytes) -> Result<RemoteGroupSend, WireError> {
        need(&b, 1 + 4 + 8 + 8 + 4 + 8 + 8 + 1 + 4)?;
        op(&mut b, GROUP_SEND)?;
        let (shard, epoch) = (b.get_u32(), b.get_i64());
        let (sender, sender_device) = (b.get_u64(), b.get_u32());
        let (group, client_msg_id) = (b.get_u64(), b.get_u64());
        let kind = b.get_u8();
        let kind = MessageKind::from_u8(kind).ok_or(WireError::UnknownKind(kind))?;
        let len = b.get_u32() as usize;
        need(&b, len)?;
        let payload = b.split_to(len);
        done(&b)?;
        Ok(RemoteGroupSend {
            shard,
            epoch,
            sender,
            sender_device,
            group,
            client_msg_id,
            kind,
            payload,
        })
    }
}

impl RemoteGroupAsk {
    pub fn encode(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(64);
        out.put_u8(GROUP_ASK);
        out.put_u32(self.shard);
        out.put_i64(self.epoch);
        out.put_u64(self.asker);
        courier_protocol::encode(&Frame::new(0, self.body.clone()), &mut out);
        out.freeze()
    }

    pub fn decode(mut b: Bytes) -> Result<RemoteGroupAsk, WireError> {
        need(&b, 1 + 4 + 8 + 8)?;
        op(&mut b, GROUP_ASK)?;
        let (shard, epoch, asker) = (b.get_u32(), b.get_i64(), b.get_u64());
        let body = get_frame(&mut b)?;
        if !matches!(
            body,
            Body::Group(_) | Body::ReceiptQuery { .. } | Body::Business(_)
        ) {
            return Err(WireError::BadFrame(format!("{body:?}")));
        }
        done(&b)?;
        Ok(RemoteGroupAsk {
            shard,
            epoch,
            asker,
            body,
        })
    }
}

impl Answer<Body> {
    pub fn encode(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(64);
        match self {
            Answer::Done(body) => {
                out.put_u8(0);
                courier_protocol::encode(&Frame::new(0, body.clone()), &mut out);
            }
            Answer::NotOwner { owner, epoch } => put_not_owner(&mut out, owner, *epoch),
        }
        out.freeze()
    }

    pub fn decode(mut b: Bytes) -> Result<Answer<Body>, WireError> {
        need(&b, 1)?;
        match b.get_u8() {
            0 => {
                let body = get_frame(&mut b)?;
                done(&b)?;
                Ok(Answer::Done(body))
            }
            1 => get_not_owner(b),
            op => Err(WireError::UnknownOp(op)),
        }
    }
}

impl RemoteRefs {
    pub fn encode(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(
            64 + 12 * self.epochs.len() + 8 * self.members.len() + self.message.payload.len(),
        );
        out.put_u8(REFS);
        out.put_u64(self.group);
        out.put_u16(self.epochs.len() as u16);
        for &(shard, epoch) in &self.epochs {
            out.put_u32(shard);
            out.put_i64(epoch);
        }
        out.put_u16(self.members.len() as u16);
        for m in &self.members {
            out.put_u64(*m);
        }
        courier_protocol::encode_deliver(0, std::slice::from_ref(&self.message), &mut out);
        out.freeze()
    }

    pub fn decode(mut b: Bytes) -> Result<RemoteRefs, WireError> {
        need(&b, 1 + 8 + 2)?;
        op(&mut b, REFS)?;
        let group = b.get_u64();
        let n = b.get_u16() as usize;
        need(&b, 12 * n + 2)?;
        let epochs = (0..n).map(|_| (b.get_u32(), b.get_i64())).collect();
        let n = b.get_u16() as usize;
        need(&b, 8 * n)?;
        let members = (0..n).map(|_| b.get_u64()).collect();
        let message = match get_frame(&mut b)? {
            Body::Deliver(mut v) if v.len() == 1 => v.remove(0),
            other => return Err(WireError::BadFrame(format!("{other:?}"))),
        };
        done(&b)?;
        Ok(RemoteRefs {
            group,
            epochs,
            members,
            message,
        })
    }
}

impl RemoteCursors {
    pub fn encode(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(11 + 8 * self.members.len());
        out.put_u8(CURSORS);
        out.put_u64(self.group);
        out.put_u16(self.members.len() as u16);
        for m in &self.members {
            out.put_u64(*m);
        }
        out.freeze()
    }

    pub fn decode(mut b: Bytes) -> Result<RemoteCursors, WireError> {
        need(&b, 1 + 8 + 2)?;
        op(&mut b, CURSORS)?;
        let group = b.get_u64();
        let n = b.get_u16() as usize;
        need(&b, 8 * n)?;
        let members = (0..n).map(|_| b.get_u64()).collect();
        done(&b)?;
        Ok(RemoteCursors { group, members })
    }
}

impl Answer<ErrorCode> {
    pub fn encode(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(3);
        match self {
            Answer::Done(code) => {
                out.put_u8(0);
                out.put_u16(code.0);
            }
            Answer::NotOwner { owner, epoch } => put_not_owner(&mut out, owner, *epoch),
        }
        out.freeze()
    }

    pub fn decode(mut b: Bytes) -> Result<Answer<ErrorCode>, WireError> {
        need(&b, 1)?;
        match b.get_u8() {
            0 => {
                need(&b, 2)?;
                let code = ErrorCode(b.get_u16());
                done(&b)?;
                Ok(Answer::Done(code))
            }
            1 => get_not_owner(b),
            op => Err(WireError::UnknownOp(op)),
        }
    }
}

impl Answer<MemberCursors> {
    pub fn encode(&self) -> Bytes {
        let mut out = BytesMut::new();
        match self {
            Answer::Done(cursors) => {
                out.put_u8(0);
                out.put_u16(cursors.len() as u16);
                for &(member, delivered, read) in cursors {
                    out.put_u64(member);
                    out.put_u64(delivered);
                    out.put_u64(read);
                }
            }
            Answer::NotOwner { owner, epoch } => put_not_owner(&mut out, owner, *epoch),
        }
        out.freeze()
    }

    pub fn decode(mut b: Bytes) -> Result<Answer<MemberCursors>, WireError> {
        need(&b, 1)?;
        match b.get_u8() {
            0 => {
                need(&b, 2)?;
                let n = b.get_u16() as usize;
                need(&b, 24 * n)?;
                let cursors = (0..n)
                    .map(|_| (b.get_u64(), b.get_u64(), b.get_u64()))
                    .collect();
                done(&b)?;
                Ok(Answer::Done(cursors))
            }
            1 => get_not_owner(b),
            op => Err(WireError::UnknownOp(op)),
        }
    }
}

/// Checks a request's operation byte.
pub(super) fn op(b: &mut Bytes, expected: u8) -> Result<(), WireError> {
    match b.get_u8() {
        op if op == expected => Ok(()),
        op => Err(WireError::UnknownOp(op)),
    }
}

/// One client-protocol frame, the rest of the body.
fn get_frame(b: &mut Bytes) -> Result<Body, WireError> {
    match courier_protocol::decode(b, u32::MAX) {
        Ok(Some((frame, used))) => {
            b.advance(used);
            Ok(frame.body)
        }
        Ok(None) => Err(WireError::Truncated),
        Err(e) => Err(WireError::BadFrame(e.to_string())),
    }
}

pub(super) fn put_text(out: &mut BytesMut, text: &str) {
    let text = &text.as_bytes()[..text.len().min(u16::MAX as usize)];
    out.put_u16(text.len() as u16);
    out.put_slice(text);
}

pub(super) fn get_text(b: &mut Bytes) -> Result<String, WireError> {
    need(b, 2)?;
    let len = b.get_u16() as usize;
    need(b, len)?;
    String::from_utf8(b.split_to(len).to_vec()).map_err(|_| WireError::BadText)
}

pub(super) fn put_not_owner(out: &mut BytesMut, owner: &str, epoch: i64) {
    out.put_u8(1);
    out.put_i64(epoch);
    put_text(out, owner);
}

/// The rest of a not-the-owner answer, after its `1`.
pub(super) fn get_not_owner<T>(mut b: Bytes) -> Result<Answer<T>, WireError> {
    need(&b, 8)?;
    let epoch = b.get_i64();
    let owner = get_text(&mut b)?;
    done(&b)?;
    Ok(Answer::NotOwner { owner, epoch })
}

impl SendAnswer {
    pub fn encode(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(40);
        match self {
            SendAnswer::Outcome { result, stored } => {
                out.put_u8(0);
                out.put_u16(result.code.0);
                out.put_u64(result.server_msg_id);
                out.put_u64(result.seq);
                out.put_u64(result.timestamp_ms);
                out.put_u8(result.duplicate as u8);
                out.put_u8(*stored as u8);
            }
            SendAnswer::NotOwner { owner, epoch } => put_not_owner(&mut out, owner, *epoch),
        }
        out.freeze()
    }

    /// Decodes the answer to the send of `client_msg_id`.
    pub fn decode(mut b: Bytes, client_msg_id: u64) -> Result<SendAnswer, WireError> {
        need(&b, 1)?;
        match b.get_u8() {
            0 => {
                need(&b, 2 + 8 + 8 + 8 + 1 + 1)?;
                let result = SendResult {
                    client_msg_id,
                    code: ErrorCode(b.get_u16()),
                    server_msg_id: b.get_u64(),
                    seq: b.get_u64(),
                    timestamp_ms: b.get_u64(),
                    duplicate: b.get_u8() != 0,
                };
                let stored = b.get_u8() != 0;
                done(&b)?;
                Ok(SendAnswer::Outcome { result, stored })
            }
            1 => match get_not_owner::<()>(b)? {
                Answer::NotOwner { owner, epoch } => Ok(SendAnswer::NotOwner { owner, epoch }),
                Answer::Done(()) => unreachable!("get_not_owner answers NotOwner"),
            },
            op => Err(WireError::UnknownOp(op)),
        }
    }
}

fn put_destination(out: &mut BytesMut, d: Destination) {
    out.put_u8(d.tag());
    out.put_u64(d.id());
}

fn get_destination(b: &mut Bytes) -> Result<Destination, WireError> {
    let tag = b.get_u8();
    let id = b.get_u64();
    Destination::from_parts(tag, id).ok_or(WireError::UnknownDestination(tag))
}

pub(super) fn need(b: &Bytes, n: usize) -> Result<(), WireError> {
    if b.remaining() < n {
        Err(WireError::Truncated)
    } else {
        Ok(())
    }
}

pub(super) fn done(b: &Bytes) -> Result<(), WireError> {
    match b.remaining() {
        0 => Ok(()),
        n => Err(WireError::Trailing(n)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn send() -> RemoteSend {
        RemoteSend {
            shard: 17,
            epoch: 42,
            sender: 7,
            sender_device: 2,
            recipient: 9,
            client_msg_id: 1234,
            scope: 0,
            kind: MessageKind::Chat,
            destination: Destination::User(9),
            payload: Bytes::from_static(b"hi"),
            covers_seq: 46,
        }
    }

    #[test]
    fn a_send_and_its_answers_round_trip() {
        let s = send();
        assert_eq!(RemoteSend::decode(s.encode()).unwrap(), s);
        let outcome = SendAnswer::Outcome {
            result: SendResult {
                client_msg_id: 1234,
                code: ErrorCode::OK,
                server_msg_id: 99,
                seq: 5,
                timestamp_ms: 1_700_000_000_000,
                duplicate: true,
            },
            stored: true,
        };
        assert_eq!(SendAnswer::decode(outcome.encode(), 1234).unwrap(), outcome);
        let moved = SendAnswer::NotOwner {
            owner: "node-b".into(),
            epoch: 77,
        };
        assert_eq!(SendAnswer::decode(moved.encode(), 1234).unwrap(), moved);
    }

    #[test]
    fn views_statuses_and_their_answers_round_trip() {
        let v = RemoteView {
            shard: 3,
            epoch: 9,
            viewer: 11,
            viewer_device: 2,
            poster: 12,
            status_id: 99,
        };
        assert_eq!(RemoteView::decode(v.encode()).unwrap(), v);
        for a in [
            Answer::Done(Ok(())),
            Answer::Done(Err((
                ErrorCode::NO_SUCH_STATUS,
                "no such status".to_string(),
            ))),
            Answer::NotOwner {
                owner: "n2".into(),
                epoch: 5,
            },
        ] {
            assert_eq!(Answer::<ViewOutcome>::decode(a.encode()).unwrap(), a);
        }
        let q = RemoteStatuses {
            viewer: 11,
            posters: vec![12, 13],
        };
        assert_eq!(RemoteStatuses::decode(q.encode()).unwrap(), q);
        let list = Answer::Done(vec![Status {
            poster: 12,
            status_id: 99,
            posted_at_ms: 1,
            expires_at_ms: 2,
            payload: Bytes::from_static(b"beach"),
        }]);
        let bytes = list.encode();
        assert_eq!(Answer::<Vec<Status>>::decode(bytes.clone()).unwrap(), list);
        for cut in 0..bytes.len() {
            assert_eq!(
                Answer::<Vec<Status>>::decode(bytes.slice(..cut)),
                Err(WireError::Truncated),
                "cut at {cut}"
            );
        }
        let good = v.encode();
        for cut in 0..good.len() {
            assert_eq!(
                RemoteView::decode(good.slice(..cut)),
                Err(WireError::Truncated)
            );
        }
    }

    #[test]
    fn group_requests_and_their_answers_round_trip() {
        let send = RemoteGroupSend {
            shard: 4,
            epoch: 8,
            sender: 7,
            sender_device: 1,
            group: 1 << 63 | 9,
            client_msg_id: 5,
            kind: MessageKind::Chat,
            payload: Bytes::from_static(b"to the group"),
        };
        assert_eq!(RemoteGroupSend::decode(send.encode()).unwrap(), send);
        let ask = RemoteGroupAsk {
            shard: 4,
            epoch: 8,
            asker: 7,
            body: Body::ReceiptQuery {
                group: 1 << 63 | 9,
                seq: 3,
            },
        };
        assert_eq!(RemoteGroupAsk::decode(ask.encode()).unwrap(), ask);
        for a in [
            Answer::Done(Body::Error(courier_protocol::Reason::new(
                ErrorCode::NOT_A_MEMBER,
                "no",
            ))),
            Answer::NotOwner {
                owner: "n3".into(),
                epoch: 2,
            },
        ] {
            assert_eq!(Answer::<Body>::decode(a.encode()).unwrap(), a);
        }
        let refs = RemoteRefs {
            group: 1 << 63 | 9,
            epochs: vec![(4, 8), (200, 9)],
            members: vec![11, 12],
            message: Message {
                seq: 3,
                server_msg_id: 77,
                sender: 7,
                sender_device: 1,
                client_msg_id: 5,
                timestamp_ms: 1_700_000_000_000,
                destination: Destination::Group(1 << 63 | 9),
                kind: MessageKind::Chat,
                payload: Bytes::from_static(b"to the group"),
            },
        };
        let bytes = refs.encode();
        assert_eq!(RemoteRefs::decode(bytes.clone()).unwrap(), refs);
        for cut in 0..bytes.len() {
            assert!(
                RemoteRefs::decode(bytes.slice(..cut)).is_err(),
                "cut at {cut}"
            );
        }
        let cursors = RemoteCursors {
            group: 1 << 63 | 9,
            members: vec![11, 12],
        };
        assert_eq!(RemoteCursors::decode(cursors.encode()).unwrap(), cursors);
        let counted = Answer::Done(vec![(11, 3, 2), (12, 3, 0)]);
        assert_eq!(
            Answer::<MemberCursors>::decode(counted.encode()).unwrap(),
            counted
        );
        let code = Answer::Done(ErrorCode::SHARD_UNAVAILABLE);
        assert_eq!(Answer::<ErrorCode>::decode(code.encode()).unwrap(), code);
        // A group request carries only group frames.
        let wrong = RemoteGroupAsk {
            body: Body::Ping { nonce: 1 },
            ..ask
        };
        assert!(matches!(
            RemoteGroupAsk::decode(wrong.encode()),
            Err(WireError::BadFrame(_))
        ));
    }

    #[test]
    fn bad_bytes_are_refused_by_what_is_wrong() {
        let good = send().encode();
        for cut in 0..good.len() {
            assert_eq!(
                RemoteSend::decode(good.slice(..cut)),
                Err(WireError::Truncated),
                "cut at {cut}"
            );
        }
        let mut long = BytesMut::from(&good[..]);
        long.put_u8(0);
        assert_eq!(
            RemoteSend::decode(long.freeze()),
            Err(WireError::Trailing(1))
        );
        let mut kind = BytesMut::from(&good[..]);
        kind[49] = 9;
        assert_eq!(
            RemoteSend::decode(kind.freeze()),
            Err(WireError::UnknownKind(9))
        );
        let mut tag = BytesMut::from(&good[..]);
        tag[50] = 4;
        assert_eq!(
            RemoteSend::decode(tag.freeze()),
            Err(WireError::UnknownDestination(4))
        );
        assert_eq!(
            SendAnswer::decode(Bytes::from_static(&[2]), 1),
            Err(WireError::UnknownOp(2))
        );
    }
}

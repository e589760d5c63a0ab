//! Encoding into a caller-owned buffer and decoding from a byte slice.
//!
//! Decoding follows check-then-parse: [`decode`] returns `Ok(None)` until a
//! whole frame is present, rejects an oversized length as soon as the four
//! length bytes are there (without waiting for the body), and never allocates
//! more than the bytes actually present: counts claimed by the peer only
//! bound loops, every length is checked against the remaining bytes first.

use bytes::{BufMut, Bytes, BytesMut};
use thiserror::Error;

use crate::error::ErrorCode;
use crate::frame::*;

/// Why a frame could not be decoded. Every variant means the stream can no
/// longer be trusted: the server answers with [`DecodeError::code`] and closes.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum DecodeError {
    #[error("frame length {len} exceeds the maximum {max}")]
    FrameTooLarge { len: u32, max: u32 },
    #[error("frame length {len} is shorter than the 5-byte type and request id")]
    FrameTooShort { len: u32 },
    #[error("unknown frame type 0x{0:02x}")]
    UnknownFrameType(u8),
    #[error("malformed {frame} frame: {reason}")]
    Malformed {
        frame: &'static str,
        reason: &'static str,
    },
}

impl DecodeError {
    /// The error code the server sends for this decode failure.
    pub fn code(&self) -> ErrorCode {
        match self {
            DecodeError::FrameTooLarge { .. } => ErrorCode::FRAME_TOO_LARGE,
            DecodeError::FrameTooShort { .. } | DecodeError::Malformed { .. } => {
                ErrorCode::MALFORMED_FRAME
            }
            DecodeError::UnknownFrameType(_) => ErrorCode::UNKNOWN_FRAME_TYPE,
        }
    }
}

/// Decodes one frame from the front of `buf`.
///
/// Returns `Ok(Some((frame, used)))` with the number of bytes consumed,
/// `Ok(None)` when more bytes are needed, or an error when the bytes can never
/// form a valid frame.
pub fn decode(buf: &[u8], max_frame_len: u32) -> Result<Option<(Frame, usize)>, DecodeError> {
    let Some(len_bytes) = buf.get(..4) else {
        return Ok(None);
    };
    let len = u32::from_be_bytes(len_bytes.try_into().expect("4 bytes"));
    if len > max_frame_len {
        return Err(DecodeError::FrameTooLarge {
            len,
            max: max_frame_len,
        });
    }
    if len < 5 {
        return Err(DecodeError::FrameTooShort { len });
    }
    // `len <= max_frame_len <= u32::MAX`, so this cannot overflow a usize on 32/64-bit.
    let total = 4 + len as usize;
    if buf.len() < total {
        return Ok(None);
    }
    let frame_type = buf[4];
    let request_id = u32::from_be_bytes(buf[5..9].try_into().expect("4 bytes"));
    let mut r = Reader {
        buf: &buf[HEADER_LEN..total],
        frame: frame_type_name(frame_type),
    };
    let body = decode_body(frame_type, &mut r)?;
    if !r.buf.is_empty() {
        return Err(r.malformed("trailing bytes after body"));
    }
    Ok(Some((Frame { request_id, body }, total)))
}

/// Only the length field of the frame at the front of `buf`, if present.
/// Lets a reader reserve buffer space for a frame it has validated.
pub fn peek_len(buf: &[u8]) -> Option<u32> {
    buf.get(..4)
        .map(|b| u32::from_be_bytes(b.try_into().expect("4 bytes")))
}

fn decode_body(frame_type: u8, r: &mut Reader<'_>) -> Result<Body, DecodeError> {
    use frame_type::*;
    Ok(match frame_type {
        HELLO => {
            let version = r.u16()?;
            let user_id = r.u64()?;
            let device_id = r.u32()?;
            let flags = r.u8()?;
            let after = r.u64()?;
            if flags & !3 != 0 {
                return Err(r.malformed("unknown flag bits"));
            }
            // One spelling per hello: without the resume bit the field is 0
            // (found by fuzzing: any value was accepted and dropped).
            if flags & 1 == 0 && after != 0 {
                return Err(r.malformed("resume_after set without the resume flag"));
            }
            // Bit 1: receipts as facts, from the version that follows.
            let receipts_after = if flags & 2 != 0 { Some(r.u64()?) } else { None };
            let token_len = r.u16()? as usize;
            if token_len > MAX_TOKEN_LEN {
                return Err(r.malformed("token longer than 1024 bytes"));
            }
            let token = r.bytes(token_len)?;
            Body::Hello(Hello {
                version,
                user_id,
                device_id,
                resume_after: (flags & 1 != 0).then_some(after),
                receipts_after,
                token,
            })
        }
        WELCOME => {
            let version = r.u16()?;
            let session_id = r.u64()?;
            let head_seq = r.u64()?;
            let oldest_seq = r.u64()?;
            let resume_from = r.u64()?;
            let flags = r.u8()?;
            if flags & !1 != 0 {
                return Err(r.malformed("unknown flag bits"));
            }
            Body::Welcome(Welcome {
                version,
                session_id,
                head_seq,
                oldest_seq,
                resume_from,
                gap: flags & 1 != 0,
                server_time_ms: r.u64()?,
                max_frame_len: r.u32()?,
                max_batch: r.u16()?,
                keepalive_ms: r.u32()?,
            })
        }
        SEND => Body::Send(decode_send(r)?),
        SEND_BATCH => {
            let count = r.u16()? as usize;
            if count == 0 {
                return Err(r.malformed("empty batch"));
            }
            let mut sends = Vec::with_capacity(count.min(r.buf.len() / SEND_FIXED_LEN));
            for _ in 0..count {
                sends.push(decode_send(r)?);
            }
            Body::SendBatch(sends)
        }
        SEND_ACK => {
            let client_msg_id = r.u64()?;
            let server_msg_id = r.u64()?;
            let seq = r.u64()?;
            let timestamp_ms = r.u64()?;
            let duplicate = r.flag()?;
            Body::SendAck(SendAck {
                client_msg_id,
                server_msg_id,
                seq,
                timestamp_ms,
                duplicate,
            })
        }
        SEND_BATCH_ACK => {
            let count = r.u16()? as usize;
            let mut results = Vec::with_capacity(count.min(r.buf.len() / SEND_RESULT_LEN));
            for _ in 0..count {
                let client_msg_id = r.u64()?;
                let code = ErrorCode(r.u16()?);
                let server_msg_id = r.u64()?;
                let seq = r.u64()?;
                let timestamp_ms = r.u64()?;
                let duplicate = r.flag()?;
                results.push(SendResult {
                    client_msg_id,
                    code,
                    server_msg_id,
                    seq,
                    timestamp_ms,
                    duplicate,
                });
            }
            Body::SendBatchAck(results)
        }
        DELIVER => Body::Deliver(decode_messages(r)?),
        ACK => Body::Ack {
            up_to_seq: r.u64()?,
        },
        FETCH => Body::Fetch(Fetch {
            user_id: r.u64()?,
            after_seq: r.u64()?,
            limit: r.u16()?,
        }),
        FETCH_REPLY => {
            let head_seq = r.u64()?;
            let oldest_seq = r.u64()?;
            Body::FetchReply(FetchReply {
                head_seq,
                oldest_seq,
                messages: decode_messages(r)?,
            })
        }
        PING => Body::Ping { nonce: r.u64()? },
        PONG => Body::Pong { nonce: r.u64()? },
        ERROR => Body::Error(decode_reason(r)?),
        GOODBYE => Body::Goodbye(decode_reason(r)?),
        GROUP => {
            let op = r.u8()?;
            let op = GroupOp::from_u8(op).ok_or_else(|| r.malformed("unknown group op"))?;
            let group = r.u64()?;
            Body::Group(GroupRequest {
                op,
                group,
                users: r.users()?,
            })
        }
        GROUP_INFO => {
            let group = r.u64()?;
            let head_seq = r.u64()?;
            let strategy = r.u8()?;
            let strategy =
                Strategy::from_u8(strategy).ok_or_else(|| r.malformed("unknown strategy"))?;
            let count = r.u16()? as usize;
            let mut members = Vec::with_capacity(count.min(r.buf.len() / 9));
            for _ in 0..count {
                let user = r.u64()?;
                let role = r.u8()?;
                members.push((
                    user,
                    Role::from_u8(role).ok_or_else(|| r.malformed("unknown role"))?,
                ));
            }
            Body::GroupInfo(GroupInfo {
                group,
                head_seq,
                strategy,
                members,
            })
        }
        GROUP_DELIVER => Body::GroupDeliver {
            group: r.u64()?,
            messages: decode_messages(r)?,
        },
        MARK => {
            let stream = r.u64()?;
            let up_to_seq = r.u64()?;
            let status = r.u8()?;
            Body::Mark(Mark {
                stream,
                up_to_seq,
                status: ReceiptStatus::from_u8(status)
                    .ok_or_else(|| r.malformed("unknown receipt status"))?,
            })
        }
        CONTACTS => {
            let op = r.u8()?;
            Body::Contacts(ContactsRequest {
                op: ContactsOp::from_u8(op).ok_or_else(|| r.malformed("unknown contacts op"))?,
                users: r.users()?,
            })
        }
        LIST => {
            let op = r.u8()?;
            let op = ListOp::from_u8(op).ok_or_else(|| r.malformed("unknown list op"))?;
            Body::List(ListRequest {
                op,
                list: r.u64()?,
                users: r.users()?,
            })
        }
        USERS => Body::Users(Users {
            id: r.u64()?,
            users: r.users()?,
        }),
        BROADCAST_ACK => Body::BroadcastAck(BroadcastAck {
            client_msg_id: r.u64()?,
            server_msg_id: r.u64()?,
            timestamp_ms: r.u64()?,
            delivered: r.u16()?,
            skipped: r.u16()?,
            duplicate: r.flag()?,
        }),
        RECEIPT_QUERY => Body::ReceiptQuery {
            group: r.u64()?,
            seq: r.u64()?,
        },
        RECEIPT_COUNTS => Body::ReceiptCounts(ReceiptCounts {
            group: r.u64()?,
            seq: r.u64()?,
            recipients: r.u32()?,
            delivered: r.u32()?,
            read: r.u32()?,
        }),
        STATUS_POST => {
            let audience = r.u8()?;
            let audience =
                Audience::from_u8(audience).ok_or_else(|| r.malformed("unknown audience"))?;
            let users = r.users()?;
            let len = r.u32()? as usize;
            Body::StatusPost(StatusPost {
                audience,
                users,
                payload: r.bytes(len)?,
            })
        }
        STATUS_POSTED => Body::StatusPosted {
            status_id: r.u64()?,
            expires_at_ms: r.u64()?,
        },
        STATUS_FETCH => Body::StatusFetch,
        STATUS_LIST => {
            let count = r.u16()? as usize;
            let mut list = Vec::with_capacity(count.min(r.buf.len() / 36));
            for _ in 0..count {
                let poster = r.u64()?;
                let status_id = r.u64()?;
                let posted_at_ms = r.u64()?;
                let expires_at_ms = r.u64()?;
                let len = r.u32()? as usize;
                list.push(Status {
                    poster,
                    status_id,
                    posted_at_ms,
                    expires_at_ms,
                    payload: r.bytes(len)?,
                });
            }
            Body::StatusList(list)
        }
        STATUS_VIEW => Body::StatusView {
            poster: r.u64()?,
            status_id: r.u64()?,
        },
        DONE => Body::Done,
        BUSINESS => {
            let op = r.u8()?;
            let op = BusinessOp::from_u8(op).ok_or_else(|| r.malformed("unknown business op"))?;
            let business = r.u64()?;
            let purpose = r.u8()?;
            Body::Business(BusinessRequest {
                op,
                business,
                purpose: Purpose::from_u8(purpose).ok_or_else(|| r.malformed("unknown purpose"))?,
                language: r.text()?,
                text: r.text()?,
            })
        }
        BUSINESS_INFO => {
            let business = r.u64()?;
            let verified = r.flag()?;
            let display_name = r.text()?;
            let about = r.text()?;
            let address = r.text()?;
            let description = r.text()?;
            let email = r.text()?;
            let count = r.u8()?;
            let mut websites = Vec::with_capacity(usize::from(count).min(r.buf.len() / 2));
            for _ in 0..count {
                websites.push(r.text()?);
            }
            Body::BusinessInfo(Box::new(BusinessInfo {
                business,
                verified,
                display_name,
                about,
                address,
                description,
                email,
                websites,
                picture: r.text()?,
                blocked: r.flag()?,
                marketing: r.flag()?,
                utility: r.flag()?,
            }))
        }
        TEMPLATE_PACK => {
            let business = r.u64()?;
            let valid_until_ms = r.u64()?;
            let len = r.u32()? as usize;
            let raw = r.slice(len)?;
            Body::TemplatePack(TemplatePack {
                business,
                valid_until_ms,
                json: std::str::from_utf8(raw)
                    .map_err(|_| r.malformed("template pack is not UTF-8"))?
                    .to_owned(),
            })
        }
        EVENT_FETCH => Body::EventFetch {
            after: r.u64()?,
            limit: r.u16()?,
        },
        EVENT_LIST => {
            let last = r.u64()?;
            let len = r.u32()? as usize;
            let raw = r.slice(len)?;
            Body::EventList {
                last,
                json: std::str::from_utf8(raw)
                    .map_err(|_| r.malformed("event list is not UTF-8"))?
                    .to_owned(),
            }
        }
        RECEIPTS => {
            let count = r.u16()? as usize;
            if count == 0 {
                return Err(r.malformed("no receipt facts"));
            }
            let mut facts = Vec::with_capacity(count.min(r.buf.len() / RECEIPT_FACT_LEN));
            for _ in 0..count {
                let fact = ReceiptFact {
                    reader: r.u64()?,
                    delivered: r.u64()?,
                    read: r.u64()?,
                    version: r.u64()?,
                };
                // Read implies delivered: a fact that says otherwise is
                // not one a server writes.
                if fact.read > fact.delivered {
                    return Err(r.malformed("a receipt fact read beyond delivered"));
                }
                facts.push(fact);
            }
            Body::Receipts(facts)
        }
        other => return Err(DecodeError::UnknownFrameType(other)),
    })
}

fn decode_destination(r: &mut Reader<'_>) -> Result<Destination, DecodeError> {
    let tag = r.u8()?;
    let id = r.u64()?;
    Destination::from_parts(tag, id).ok_or_else(|| r.malformed("unknown destination tag"))
}

fn decode_kind(r: &mut Reader<'_>) -> Result<MessageKind, DecodeError> {
    let v = r.u8()?;
    MessageKind::from_u8(v).ok_or_else(|| r.malformed("unknown message kind"))
}

fn decode_send(r: &mut Reader<'_>) -> Result<Send, DecodeError> {
    let client_msg_id = r.u64()?;
    let destination = decode_destination(r)?;
    let kind = decode_kind(r)?;
    let len = r.u32()? as usize;
    let payload = r.bytes(len)?;
    Ok(Send {
        client_msg_id,
        destination,
        kind,
        payload,
    })
}

fn decode_messages(r: &mut Reader<'_>) -> Result<Vec<Message>, DecodeError> {
    let count = r.u16()? as usize;
    let mut messages = Vec::with_capacity(count.min(r.buf.len() / MESSAGE_FIXED_LEN));
    for _ in 0..count {
        let seq = r.u64()?;
        let server_msg_id = r.u64()?;
        let sender = r.u64()?;
        let sender_device = r.u32()?;
        let client_msg_id = r.u64()?;
        let timestamp_ms = r.u64()?;
        let destination = decode_destination(r)?;
        let kind = decode_kind(r)?;
        let len = r.u32()? as usize;
        let payload = r.bytes(len)?;
        messages.push(Message {
            seq,
            server_msg_id,
            sender,
            sender_device,
            client_msg_id,
            timestamp_ms,
            destination,
            kind,
            payload,
        });
    }
    Ok(messages)
}

fn decode_reason(r: &mut Reader<'_>) -> Result<Reason, DecodeError> {
    let code = ErrorCode(r.u16()?);
    let len = r.u16()? as usize;
    if len > MAX_REASON_LEN {
        return Err(r.malformed("reason longer than 1024 bytes"));
    }
    let raw = r.slice(len)?;
    let message = std::str::from_utf8(raw)
        .map_err(|_| r.malformed("reason is not UTF-8"))?
        .to_owned();
    Ok(Reason { code, message })
}

/// A cursor over one frame's body. Every read checks the remaining length first.
struct Reader<'a> {
    buf: &'a [u8],
    frame: &'static str,
}

impl<'a> Reader<'a> {
    fn malformed(&self, reason: &'static str) -> DecodeError {
        DecodeError::Malformed {
            frame: self.frame,
            reason,
        }
    }

    fn slice(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.buf.len() < n {
            return Err(self.malformed("body shorter than its fields"));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        Ok(self.slice(N)?.try_into().expect("slice of N bytes"))
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.array::<1>()?[0])
    }
    fn flag(&mut self) -> Result<bool, DecodeError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(self.malformed("flag byte is neither 0 nor 1")),
        }
    }
    fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_be_bytes(self.array()?))
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.array()?))
    }
    /// A u16 count and that many user ids.
    fn users(&mut self) -> Result<Vec<u64>, DecodeError> {
        let count = self.u16()? as usize;
        let mut users = Vec::with_capacity(count.min(self.buf.len() / 8));
        for _ in 0..count {
            users.push(self.u64()?);
        }
        Ok(users)
    }
    /// A u16 length and that many bytes of UTF-8, at most
    /// `MAX_BUSINESS_TEXT_LEN`.
    fn text(&mut self) -> Result<String, DecodeError> {
        let len = self.u16()? as usize;
        if len > MAX_BUSINESS_TEXT_LEN {
            return Err(self.malformed("text longer than 4096 bytes"));
        }
        let raw = self.slice(len)?;
        std::str::from_utf8(raw)
            .map(str::to_owned)
            .map_err(|_| self.malformed("text is not UTF-8"))
    }
    /// Copies `n` bytes that are present (never sized by a claim alone).
    fn bytes(&mut self, n: usize) -> Result<Bytes, DecodeError> {
        Ok(Bytes::copy_from_slice(self.slice(n)?))
    }
}

/// Appends the encoding of `frame` to `out`.
///
/// Panics if the frame breaks a limit the encoder cannot express (a batch of
/// more than 65,535 items, a token over 1,024 bytes, a payload over 4 GiB):
/// those are programming errors on the sending side, never peer input.
pub fn encode(frame: &Frame, out: &mut BytesMut) {
    let start = out.len();
    out.put_u32(0); // length, patched below
    out.put_u8(frame.body.frame_type());
    out.put_u32(frame.request_id);
    encode_body(&frame.body, out);
    let len = u32::try_from(out.len() - start - 4).expect("frame length fits in u32");
    out[start..start + 4].copy_from_slice(&len.to_be_bytes());
}

/// Encodes `frame` into a fresh buffer.
pub fn encode_to_bytes(frame: &Frame) -> Bytes {
    let mut out = BytesMut::new();
    encode(frame, &mut out);
    out.freeze()
}

/// Encoded length of a `Deliver` frame carrying `messages`.
pub fn deliver_len<'a>(messages: impl IntoIterator<Item = &'a Message>) -> usize {
    HEADER_LEN
        + 2
        + messages
            .into_iter()
            .map(|m| MESSAGE_FIXED_LEN + m.payload.len())
            .sum::<usize>()
}

fn encode_body(body: &Body, out: &mut BytesMut) {
    match body {
        Body::Hello(h) => {
            assert!(h.token.len() <= MAX_TOKEN_LEN, "token too long");
            out.put_u16(h.version);
            out.put_u64(h.user_id);
            out.put_u32(h.device_id);
            let flags = h.resume_after.is_some() as u8 | (h.receipts_after.is_some() as u8) << 1;
            out.put_u8(flags);
            out.put_u64(h.resume_after.unwrap_or(0));
            if let Some(v) = h.receipts_after {
                out.put_u64(v);
            }
            out.put_u16(h.token.len() as u16);
            out.put_slice(&h.token);
        }
        Body::Welcome(w) => {
            out.put_u16(w.version);
            out.put_u64(w.session_id);
            out.put_u64(w.head_seq);
            out.put_u64(w.oldest_seq);
            out.put_u64(w.resume_from);
            out.put_u8(w.gap as u8);
            out.put_u64(w.server_time_ms);
            out.put_u32(w.max_frame_len);
            out.put_u16(w.max_batch);
            out.put_u32(w.keepalive_ms);
        }
        Body::Send(s) => encode_send(s, out),
        Body::SendBatch(sends) => {
            out.put_u16(u16::try_from(sends.len()).expect("batch of at most 65535"));
            for s in sends {
                encode_send(s, out);
            }
        }
        Body::SendAck(a) => {
            out.put_u64(a.client_msg_id);
            out.put_u64(a.server_msg_id);
            out.put_u64(a.seq);
            out.put_u64(a.timestamp_ms);
            out.put_u8(a.duplicate as u8);
        }
        Body::SendBatchAck(results) => {
            out.put_u16(u16::try_from(results.len()).expect("batch of at most 65535"));
            for r in results {
                out.put_u64(r.client_msg_id);
                out.put_u16(r.code.0);
                out.put_u64(r.server_msg_id);
                out.put_u64(r.seq);
                out.put_u64(r.timestamp_ms);
                out.put_u8(r.duplicate as u8);
            }
        }
        Body::Deliver(messages) => encode_messages(messages, out),
        Body::Ack { up_to_seq } => out.put_u64(*up_to_seq),
        Body::Fetch(f) => {
            out.put_u64(f.user_id);
            out.put_u64(f.after_seq);
            out.put_u16(f.limit);
        }
        Body::FetchReply(f) => {
            out.put_u64(f.head_seq);
            out.put_u64(f.oldest_seq);
            encode_messages(&f.messages, out);
        }
        Body::Ping { nonce } | Body::Pong { nonce } => out.put_u64(*nonce),
        Body::Error(r) | Body::Goodbye(r) => {
            assert!(r.message.len() <= MAX_REASON_LEN, "reason too long");
            out.put_u16(r.code.0);
            out.put_u16(r.message.len() as u16);
            out.put_slice(r.message.as_bytes());
        }
        Body::Group(g) => {
            out.put_u8(g.op as u8);
            out.put_u64(g.group);
            put_users(&g.users, out);
        }
        Body::GroupInfo(g) => {
            out.put_u64(g.group);
            out.put_u64(g.head_seq);
            out.put_u8(g.strategy as u8);
            out.put_u16(u16::try_from(g.members.len()).expect("at most 65535 members"));
            for (user, role) in &g.members {
                out.put_u64(*user);
                out.put_u8(*role as u8);
            }
        }
        Body::GroupDeliver { group, messages } => {
            out.put_u64(*group);
            encode_messages(messages, out);
        }
        Body::Mark(m) => {
            out.put_u64(m.stream);
            out.put_u64(m.up_to_seq);
            out.put_u8(m.status as u8);
        }
        Body::Contacts(c) => {
            out.put_u8(c.op as u8);
            put_users(&c.users, out);
        }
        Body::List(l) => {
            out.put_u8(l.op as u8);
            out.put_u64(l.list);
            put_users(&l.users, out);
        }
        Body::Users(u) => {
            out.put_u64(u.id);
            put_users(&u.users, out);
        }
        Body::BroadcastAck(a) => {
            out.put_u64(a.client_msg_id);
            out.put_u64(a.server_msg_id);
            out.put_u64(a.timestamp_ms);
            out.put_u16(a.delivered);
            out.put_u16(a.skipped);
            out.put_u8(a.duplicate as u8);
        }
        Body::ReceiptQuery { group, seq } => {
            out.put_u64(*group);
            out.put_u64(*seq);
        }
        Body::ReceiptCounts(c) => {
            out.put_u64(c.group);
            out.put_u64(c.seq);
            out.put_u32(c.recipients);
            out.put_u32(c.delivered);
            out.put_u32(c.read);
        }
        Body::StatusPost(p) => {
            out.put_u8(p.audience as u8);
            put_users(&p.users, out);
            out.put_u32(u32::try_from(p.payload.len()).expect("payload under 4 GiB"));
            out.put_slice(&p.payload);
        }
        Body::StatusPosted {
            status_id,
            expires_at_ms,
        } => {
            out.put_u64(*status_id);
            out.put_u64(*expires_at_ms);
        }
        Body::StatusFetch | Body::Done => {}
        Body::StatusList(list) => {
            out.put_u16(u16::try_from(list.len()).expect("at most 65535 statuses"));
            for st in list {
                out.put_u64(st.poster);
                out.put_u64(st.status_id);
                out.put_u64(st.posted_at_ms);
                out.put_u64(st.expires_at_ms);
                out.put_u32(u32::try_from(st.payload.len()).expect("payload under 4 GiB"));
                out.put_slice(&st.payload);
            }
        }
        Body::StatusView { poster, status_id } => {
            out.put_u64(*poster);
            out.put_u64(*status_id);
        }
        Body::Business(b) => {
            out.put_u8(b.op as u8);
            out.put_u64(b.business);
            out.put_u8(b.purpose as u8);
            put_text(&b.language, out);
            put_text(&b.text, out);
        }
        Body::BusinessInfo(i) => {
            out.put_u64(i.business);
            out.put_u8(i.verified as u8);
            for t in [
                &i.display_name,
                &i.about,
                &i.address,
                &i.description,
                &i.email,
            ] {
                put_text(t, out);
            }
            out.put_u8(u8::try_from(i.websites.len()).expect("at most 255 websites"));
            for w in &i.websites {
                put_text(w, out);
            }
            put_text(&i.picture, out);
            out.put_u8(i.blocked as u8);
            out.put_u8(i.marketing as u8);
            out.put_u8(i.utility as u8);
        }
        Body::TemplatePack(p) => {
            out.put_u64(p.business);
            out.put_u64(p.valid_until_ms);
            put_long_text(&p.json, out);
        }
        Body::EventFetch { after, limit } => {
            out.put_u64(*after);
            out.put_u16(*limit);
        }
        Body::EventList { last, json } => {
            out.put_u64(*last);
            put_long_text(json, out);
        }
        Body::Receipts(facts) => {
            assert!(!facts.is_empty(), "a Receipts frame carries a fact");
            out.put_u16(u16::try_from(facts.len()).expect("at most 65535 facts"));
            for f in facts {
                out.put_u64(f.reader);
                out.put_u64(f.delivered);
                out.put_u64(f.read);
                out.put_u64(f.version);
            }
        }
    }
}

/// (`TemplatePack`'s and `EventList`'s JSON: a u32 length and UTF-8.)
fn put_long_text(t: &str, out: &mut BytesMut) {
    out.put_u32(u32::try_from(t.len()).expect("text under 4 GiB"));
    out.put_slice(t.as_bytes());
}

/// A u16 length and the text's bytes (at most `MAX_BUSINESS_TEXT_LEN`).
fn put_text(t: &str, out: &mut BytesMut) {
    assert!(t.len() <= MAX_BUSINESS_TEXT_LEN, "text over 4096 bytes");
    out.put_u16(t.len() as u16);
    out.put_slice(t.as_bytes());
}

fn put_users(users: &[u64], out: &mut BytesMut) {
    out.put_u16(u16::try_from(users.len()).expect("at most 65535 users"));
    for u in users {
        out.put_u64(*u);
    }
}

fn encode_send(s: &Send, out: &mut BytesMut) {
    out.put_u64(s.client_msg_id);
    out.put_u8(s.destination.tag());
    out.put_u64(s.destination.id());
    out.put_u8(s.kind as u8);
    out.put_u32(u32::try_from(s.payload.len()).expect("payload under 4 GiB"));
    out.put_slice(&s.payload);
}

fn encode_messages(messages: &[Message], out: &mut BytesMut) {
    out.put_u16(u16::try_from(messages.len()).expect("at most 65535 messages"));
    for m in messages {
        encode_message(m, out);
    }
}

/// Appends one message record (the element of `Deliver` and `FetchReply`).
pub fn encode_message(m: &Message, out: &mut BytesMut) {
    out.put_u64(m.seq);
    out.put_u64(m.server_msg_id);
    out.put_u64(m.sender);
    out.put_u32(m.sender_device);
    out.put_u64(m.client_msg_id);
    out.put_u64(m.timestamp_ms);
    out.put_u8(m.destination.tag());
    out.put_u64(m.destination.id());
    out.put_u8(m.kind as u8);
    out.put_u32(u32::try_from(m.payload.len()).expect("payload under 4 GiB"));
    out.put_slice(&m.payload);
}

/// Appends a `Deliver` frame for `messages` without building a [`Frame`]
/// (the broker shares messages between sessions behind `Arc`s).
pub fn encode_deliver<M: std::borrow::Borrow<Message>>(
    request_id: u32,
    messages: &[M],
    out: &mut BytesMut,
) {
    let start = out.len();
    out.put_u32(0);
    out.put_u8(frame_type::DELIVER);
    out.put_u32(request_id);
    out.put_u16(u16::try_from(messages.len()).expect("at most 65535 messages"));
    for m in messages {
        encode_message(m.borrow(), out);
    }
    let len = u32::try_from(out.len() - start - 4).expect("frame length fits in u32");
    out[start..start + 4].copy_from_slice(&len.to_be_bytes());
}

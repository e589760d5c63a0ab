//! The data plane's requests between nodes, as bytes on a link.
//!
//! A request body starts with its operation byte; every integer is
//! big-endian, as in the client protocol.
//!
//! ```text
//! SEND (1): shard u32 | epoch i64 | sender u64 | sender_device u32 |
//!           recipient u64 | client_msg_id u64 | scope u64 | kind u8 |
//!           destination (tag u8, id u64) | payload (u32 length, bytes)
//! answer:   0 | code u16 | server_msg_id u64 | seq u64 | timestamp_ms u64 |
//!           duplicate u8 | stored u8
//!        or 1 (not the owner at that epoch) | epoch i64 | owner (u16 length, UTF-8)
//! ```
//!
//! A send here is one message for one inbox: a client's one-to-one send, a
//! receipt from a reader's shard, a broadcast copy. The node that sent it
//! keeps what waits for the outcome (the session's reply, the reader's
//! outbox row, the broadcast's answer) and completes it from the answer.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use courier_protocol::{Destination, ErrorCode, MessageKind, SendResult};

pub const SEND: u8 = 1;

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
    #[error("owner is not UTF-8")]
    BadOwner,
}

impl RemoteSend {
    pub fn encode(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(75 + self.payload.len());
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
        })
    }
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
            SendAnswer::NotOwner { owner, epoch } => {
                out.put_u8(1);
                out.put_i64(*epoch);
                out.put_u16(owner.len() as u16);
                out.put_slice(owner.as_bytes());
            }
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
            1 => {
                need(&b, 8 + 2)?;
                let epoch = b.get_i64();
                let len = b.get_u16() as usize;
                need(&b, len)?;
                let owner =
                    String::from_utf8(b.split_to(len).to_vec()).map_err(|_| WireError::BadOwner)?;
                done(&b)?;
                Ok(SendAnswer::NotOwner { owner, epoch })
            }
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

fn need(b: &Bytes, n: usize) -> Result<(), WireError> {
    if b.remaining() < n {
        Err(WireError::Truncated)
    } else {
        Ok(())
    }
}

fn done(b: &Bytes) -> Result<(), WireError> {
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

//! Payload layouts of the messages the server itself writes into inboxes
//! (kinds `Receipt` and `System`). Clients decode them from
//! [`crate::Message::payload`]; all integers big-endian.

use bytes::{BufMut, Bytes, BytesMut};

use crate::frame::{GroupEventKind, ReceiptStatus};

/// Why a payload could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed {0} payload")]
pub struct PayloadError(pub &'static str);

/// A `Receipt` message: `reader` has brought these messages (sent by the
/// inbox's owner) to `status`.
///
/// ```text
/// 0 u8 status  1 u64 reader  9 u16 count  11 count x (u64 client_msg_id, u64 server_msg_id)
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReceiptPayload {
    pub status: ReceiptStatus,
    pub reader: u64,
    /// (client message id, server message id) of each message.
    pub messages: Vec<(u64, u64)>,
}

impl ReceiptPayload {
    pub fn encode(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(11 + 16 * self.messages.len());
        out.put_u8(self.status as u8);
        out.put_u64(self.reader);
        out.put_u16(u16::try_from(self.messages.len()).expect("at most 65535 messages"));
        for (c, s) in &self.messages {
            out.put_u64(*c);
            out.put_u64(*s);
        }
        out.freeze()
    }

    pub fn decode(v: &[u8]) -> Result<ReceiptPayload, PayloadError> {
        let bad = PayloadError("receipt");
        if v.len() < 11 {
            return Err(bad);
        }
        let status = ReceiptStatus::from_u8(v[0]).ok_or(bad.clone())?;
        let reader = u64_at(v, 1);
        let count = u16::from_be_bytes([v[9], v[10]]) as usize;
        if v.len() != 11 + 16 * count {
            return Err(bad);
        }
        let messages = (0..count)
            .map(|i| (u64_at(v, 11 + 16 * i), u64_at(v, 19 + 16 * i)))
            .collect();
        Ok(ReceiptPayload {
            status,
            reader,
            messages,
        })
    }
}

/// A `System` message in a group: a membership change, in order with the
/// group's chat messages.
///
/// ```text
/// 0 u8 event  1 u64 actor  9 u16 count  11 count x u64 user
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupEvent {
    pub kind: GroupEventKind,
    /// Who made the change.
    pub actor: u64,
    /// Whom it concerns.
    pub users: Vec<u64>,
}

impl GroupEvent {
    pub fn encode(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(11 + 8 * self.users.len());
        out.put_u8(self.kind as u8);
        out.put_u64(self.actor);
        out.put_u16(u16::try_from(self.users.len()).expect("at most 65535 users"));
        for u in &self.users {
            out.put_u64(*u);
        }
        out.freeze()
    }

    pub fn decode(v: &[u8]) -> Result<GroupEvent, PayloadError> {
        let bad = PayloadError("group event");
        if v.len() < 11 {
            return Err(bad);
        }
        let kind = GroupEventKind::from_u8(v[0]).ok_or(bad.clone())?;
        let count = u16::from_be_bytes([v[9], v[10]]) as usize;
        if v.len() != 11 + 8 * count {
            return Err(bad);
        }
        Ok(GroupEvent {
            kind,
            actor: u64_at(v, 1),
            users: (0..count).map(|i| u64_at(v, 11 + 8 * i)).collect(),
        })
    }
}

fn u64_at(v: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(v[at..at + 8].try_into().expect("8 bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_round_trip_and_reject_bad_lengths() {
        let r = ReceiptPayload {
            status: ReceiptStatus::Read,
            reader: 7,
            messages: vec![(1, 100), (2, 200)],
        };
        let b = r.encode();
        assert_eq!(ReceiptPayload::decode(&b).unwrap(), r);
        assert!(ReceiptPayload::decode(&b[..b.len() - 1]).is_err());
        let g = GroupEvent {
            kind: GroupEventKind::Added,
            actor: 1,
            users: vec![2, 3],
        };
        let b = g.encode();
        assert_eq!(GroupEvent::decode(&b).unwrap(), g);
        assert!(GroupEvent::decode(&b[..10]).is_err());
        let mut bad = b.to_vec();
        bad[0] = 99;
        assert!(GroupEvent::decode(&bad).is_err());
    }
}

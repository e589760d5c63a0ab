//! Messages between the store's form ([`Record`], [`StoredMessage`]) and the
//! wire's ([`Message`]).

use courier_protocol::{Destination, Message, MessageKind};
use courier_storage::{Record, StoreError, StoredMessage};

use super::rows::corrupt;

/// The stored fields of a wire message.
pub fn record_of(m: &Message) -> Record {
    Record {
        server_msg_id: m.server_msg_id,
        sender: m.sender,
        sender_device: m.sender_device,
        client_msg_id: m.client_msg_id,
        timestamp_ms: m.timestamp_ms,
        dest_tag: m.destination.tag(),
        dest_id: m.destination.id(),
        kind: m.kind as u8,
        payload: m.payload.clone(),
    }
}

/// A stored message in its wire form. Fails on a record the store holds but
/// this version cannot represent (reported as corruption, never served).
pub fn to_wire(m: StoredMessage) -> Result<Message, StoreError> {
    let r = m.record;
    Ok(Message {
        seq: m.seq,
        server_msg_id: r.server_msg_id,
        sender: r.sender,
        sender_device: r.sender_device,
        client_msg_id: r.client_msg_id,
        timestamp_ms: r.timestamp_ms,
        destination: Destination::from_parts(r.dest_tag, r.dest_id)
            .ok_or_else(|| corrupt("inbox record", "unknown destination tag"))?,
        kind: MessageKind::from_u8(r.kind)
            .ok_or_else(|| corrupt("inbox record", "unknown message kind"))?,
        payload: r.payload,
    })
}

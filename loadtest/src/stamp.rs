//! The stamp every generator payload starts with: magic, conversation,
//! number in the conversation, intended send time (nanoseconds from the
//! run's start). Receivers read it back to check order and measure latency.

use bytes::{BufMut, Bytes, BytesMut};

/// Payload header: magic, conversation, number, intended send time.
const MAGIC: u32 = u32::from_be_bytes(*b"CLT1");
pub const HEADER_LEN: usize = 4 + 8 + 8 + 8;

pub(crate) fn payload(conversation: u64, n: u64, intended_ns: u64, size: usize) -> Bytes {
    let mut b = BytesMut::with_capacity(size.max(HEADER_LEN));
    put(&mut b, conversation, n, intended_ns, size);
    b.freeze()
}

/// Appends a payload of `size` bytes (at least the stamp) to `out`.
pub(crate) fn put(out: &mut BytesMut, conversation: u64, n: u64, intended_ns: u64, size: usize) {
    out.put_u32(MAGIC);
    out.put_u64(conversation);
    out.put_u64(n);
    out.put_u64(intended_ns);
    out.put_bytes(b'.', size.saturating_sub(HEADER_LEN));
}

/// (conversation, n, intended_ns) of a generator payload.
pub fn parse(p: &[u8]) -> Option<(u64, u64, u64)> {
    if p.len() < HEADER_LEN || p[..4] != MAGIC.to_be_bytes() {
        return None;
    }
    let at = |i: usize| u64::from_be_bytes(p[i..i + 8].try_into().expect("8 bytes"));
    Some((at(4), at(12), at(20)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_carry_their_stamp() {
        let p = payload(7, 9, 123, 100);
        assert_eq!(p.len(), 100);
        assert_eq!(parse(&p), Some((7, 9, 123)));
        assert_eq!(parse(b"short"), None);
        assert_eq!(parse(&[0u8; 40]), None);
    }
}

//! Fuzz target for every value layout the store decodes: inbox values
//! (records, references and copies), inbox meta, idempotency entries. Whatever the
//! bytes, decoding refuses them as corrupt or returns a value that encodes
//! back to exactly those bytes; it never panics. Run by `cargo fuzz` in
//! `fuzz/` and, briefly, by this crate's tests.

use bytes::BytesMut;

use crate::model::{encode_copy, encode_ref, Value};
use crate::rocks::{decode_idem, decode_meta, encode_idem, encode_meta};

pub fn values(data: &[u8]) {
    match Value::decode(data) {
        Ok(Value::Record(r)) => {
            let mut again = BytesMut::new();
            r.encode(&mut again);
            assert_eq!(&again[..], data, "a record re-encodes differently");
        }
        Ok(Value::Ref(r, ts)) => assert_eq!(&encode_ref(r, ts)[..], data),
        Ok(Value::Copy(at, r)) => {
            let mut again = BytesMut::new();
            encode_copy(at, &r, &mut again);
            assert_eq!(&again[..], data, "a copy re-encodes differently");
        }
        Err(_) => {}
    }
    if let Ok(s) = decode_meta(data) {
        assert!(
            s.acked_seq <= s.head_seq
                && s.oldest_seq >= 1
                && s.oldest_seq <= s.head_seq.saturating_add(1)
        );
        assert_eq!(&encode_meta(&s)[..], data);
    }
    if let Ok(e) = decode_idem(data) {
        assert_eq!(&encode_idem(&e)[..], data);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{InboxState, LogRef, Placement, Record};
    use crate::rocks::IdemEntry;

    /// The target on 20,000 inputs mutated from one value of each layout.
    #[test]
    fn stored_values_decode_or_are_refused_never_panic() {
        let record = Record {
            server_msg_id: 9,
            sender: 1,
            sender_device: 2,
            client_msg_id: 3,
            timestamp_ms: 4,
            dest_tag: 1,
            dest_id: 5,
            kind: 1,
            payload: bytes::Bytes::from_static(b"payload"),
        };
        let mut r = BytesMut::new();
        record.encode(&mut r);
        let mut copy = BytesMut::new();
        encode_copy(
            LogRef {
                log: 1 << 63,
                seq: 7,
            },
            &record,
            &mut copy,
        );
        let seeds = vec![
            r.to_vec(),
            copy.to_vec(),
            encode_ref(
                LogRef {
                    log: 1 << 63,
                    seq: 7,
                },
                8,
            )
            .to_vec(),
            encode_meta(&InboxState {
                head_seq: 10,
                acked_seq: 4,
                oldest_seq: 3,
            })
            .to_vec(),
            encode_idem(&IdemEntry {
                stored_at_ms: 1,
                placement: Placement {
                    inbox: 2,
                    seq: 3,
                    server_msg_id: 4,
                    timestamp_ms: 5,
                },
                dest_tag: 1,
                dest_id: 2,
            })
            .to_vec(),
        ];
        let seed = std::env::var("COURIER_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0x5eed);
        println!("fuzz seed {seed}");
        courier_protocol::fuzzing::drive("store values", seed, 20_000, &seeds, values);
    }
}

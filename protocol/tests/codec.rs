//! Round trips for every frame, decoding of hostile input, and a property
//! test that arbitrary bytes never panic the decoder.

use bytes::{Bytes, BytesMut};
use courier_protocol::*;
use proptest::prelude::*;

#[path = "vectors.rs"]
#[allow(dead_code, reason = "only the vector table is used here")]
mod vectors;

#[test]
fn every_frame_round_trips() {
    for (name, frame) in vectors::vectors() {
        let bytes = encode_to_bytes(&frame);
        let (decoded, used) = decode(&bytes, DEFAULT_MAX_FRAME_LEN).unwrap().unwrap();
        assert_eq!(used, bytes.len(), "{name}");
        assert_eq!(decoded, frame, "{name}");
    }
}

#[test]
fn partial_frames_ask_for_more_bytes() {
    for (name, frame) in vectors::vectors() {
        let bytes = encode_to_bytes(&frame);
        for cut in 0..bytes.len() {
            assert_eq!(
                decode(&bytes[..cut], DEFAULT_MAX_FRAME_LEN),
                Ok(None),
                "{name} cut at {cut}"
            );
        }
    }
}

#[test]
fn back_to_back_frames_decode_one_at_a_time() {
    let mut buf = BytesMut::new();
    let all = vectors::vectors();
    for (_, f) in &all {
        encode(f, &mut buf);
    }
    let mut at = 0;
    for (name, f) in &all {
        let (decoded, used) = decode(&buf[at..], DEFAULT_MAX_FRAME_LEN).unwrap().unwrap();
        assert_eq!(&decoded, f, "{name}");
        at += used;
    }
    assert_eq!(at, buf.len());
}

#[test]
fn oversized_length_is_refused_before_the_body_arrives() {
    let header = (DEFAULT_MAX_FRAME_LEN + 1).to_be_bytes();
    assert_eq!(
        decode(&header, DEFAULT_MAX_FRAME_LEN),
        Err(DecodeError::FrameTooLarge {
            len: DEFAULT_MAX_FRAME_LEN + 1,
            max: DEFAULT_MAX_FRAME_LEN
        })
    );
    assert_eq!(
        decode(&header, DEFAULT_MAX_FRAME_LEN).unwrap_err().code(),
        ErrorCode::FRAME_TOO_LARGE
    );
}

#[test]
fn hostile_frames_get_specific_errors() {
    let cases: Vec<(&str, Vec<u8>, ErrorCode)> = vec![
        (
            "length below header",
            vec![0, 0, 0, 4, 1, 0, 0, 0],
            ErrorCode::MALFORMED_FRAME,
        ),
        (
            "unknown type",
            vec![0, 0, 0, 5, 0x7f, 0, 0, 0, 1],
            ErrorCode::UNKNOWN_FRAME_TYPE,
        ),
        (
            "ping without nonce",
            vec![0, 0, 0, 5, 0x0b, 0, 0, 0, 1],
            ErrorCode::MALFORMED_FRAME,
        ),
        (
            "trailing bytes",
            vec![0, 0, 0, 14, 0x0b, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 7, 0xff],
            ErrorCode::MALFORMED_FRAME,
        ),
        (
            "batch claims 65535 items but carries none",
            vec![0, 0, 0, 7, 0x04, 0, 0, 0, 1, 0xff, 0xff],
            ErrorCode::MALFORMED_FRAME,
        ),
        (
            "empty batch",
            vec![0, 0, 0, 7, 0x04, 0, 0, 0, 1, 0, 0],
            ErrorCode::MALFORMED_FRAME,
        ),
    ];
    for (name, bytes, code) in cases {
        match decode(&bytes, DEFAULT_MAX_FRAME_LEN) {
            Err(e) => assert_eq!(e.code(), code, "{name}: {e}"),
            Ok(r) => panic!("{name}: decoded {r:?}"),
        }
    }
}

/// The documented `Receipts` vector with its body changed by `edit`.
fn receipts_with(edit: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let (_, frame) = vectors::vectors()
        .into_iter()
        .find(|(n, _)| *n == "receipts")
        .unwrap();
    let mut bytes = encode_to_bytes(&frame).to_vec();
    edit(&mut bytes);
    let len = (bytes.len() - 4) as u32;
    bytes[..4].copy_from_slice(&len.to_be_bytes());
    bytes
}

/// Receipt facts a server never writes, and a `Hello` whose facts flag
/// lacks its version, are refused as malformed.
#[test]
fn malformed_receipt_facts_and_facts_hellos_are_refused() {
    let (_, hello) = vectors::vectors()
        .into_iter()
        .find(|(n, _)| *n == "hello_receipt_facts")
        .unwrap();
    let hello = encode_to_bytes(&hello).to_vec();
    // Header 9, version 2, user 8, device 4: flags at 23, then resume_after,
    // receipts_after (8 bytes from 32), the token.
    let mut without_version = hello[..32].to_vec();
    without_version.extend_from_slice(&hello[40..]);
    let len = (without_version.len() - 4) as u32;
    without_version[..4].copy_from_slice(&len.to_be_bytes());
    let mut unknown_flag = hello.clone();
    unknown_flag[23] |= 4;
    let cases = [
        ("no facts", receipts_with(|b| b.truncate(11))),
        (
            "count without items",
            receipts_with(|b| b.truncate(9 + 2 + 31)),
        ),
        (
            "read beyond delivered",
            receipts_with(|b| b[9 + 2 + 23] = 0x2f), // read 47 > delivered 46
        ),
        ("facts flag without its version", without_version),
        ("an unknown hello flag", unknown_flag),
    ];
    for (name, bytes) in cases {
        match decode(&bytes, DEFAULT_MAX_FRAME_LEN) {
            Err(e) => assert_eq!(e.code(), ErrorCode::MALFORMED_FRAME, "{name}: {e}"),
            Ok(r) => panic!("{name}: decoded {r:?}"),
        }
    }
}

#[test]
fn a_flag_byte_other_than_0_or_1_is_malformed() {
    let (_, ack) = vectors::vectors()
        .into_iter()
        .find(|(n, _)| *n == "send_ack")
        .unwrap();
    let mut bytes = encode_to_bytes(&ack).to_vec();
    *bytes.last_mut().unwrap() = 5; // the duplicate flag
    assert_eq!(
        decode(&bytes, DEFAULT_MAX_FRAME_LEN).unwrap_err().code(),
        ErrorCode::MALFORMED_FRAME
    );
}

#[test]
fn send_with_a_payload_length_beyond_the_frame_is_malformed() {
    let frame = Frame::new(
        1,
        Body::Send(Send {
            client_msg_id: 1,
            destination: Destination::User(2),
            kind: MessageKind::Chat,
            payload: Bytes::from_static(b"abc"),
        }),
    );
    let mut bytes = encode_to_bytes(&frame).to_vec();
    // payload_len sits right before the 3 payload bytes: claim 4 GiB.
    let at = bytes.len() - 3 - 4;
    bytes[at..at + 4].copy_from_slice(&u32::MAX.to_be_bytes());
    let err = decode(&bytes, DEFAULT_MAX_FRAME_LEN).unwrap_err();
    assert_eq!(err.code(), ErrorCode::MALFORMED_FRAME);
}

#[test]
fn unknown_destination_tags_and_kinds_are_malformed() {
    let frame = Frame::new(
        1,
        Body::Send(Send {
            client_msg_id: 1,
            destination: Destination::User(2),
            kind: MessageKind::Chat,
            payload: Bytes::new(),
        }),
    );
    let good = encode_to_bytes(&frame).to_vec();
    let mut bad_tag = good.clone();
    bad_tag[HEADER_LEN + 8] = 9;
    assert!(matches!(
        decode(&bad_tag, DEFAULT_MAX_FRAME_LEN),
        Err(DecodeError::Malformed { .. })
    ));
    for kind in [0, 7, 255] {
        let mut bad_kind = good.clone();
        bad_kind[HEADER_LEN + 17] = kind;
        assert!(
            matches!(
                decode(&bad_kind, DEFAULT_MAX_FRAME_LEN),
                Err(DecodeError::Malformed { .. })
            ),
            "kind {kind}"
        );
    }
    // Kinds 1 to 6 are known (the server refuses the ones clients may not
    // send, but they decode).
    for kind in 1..=6u8 {
        let mut known = good.clone();
        known[HEADER_LEN + 17] = kind;
        let (frame, _) = decode(&known, DEFAULT_MAX_FRAME_LEN).unwrap().unwrap();
        let Body::Send(s) = frame.body else {
            panic!("a send")
        };
        assert_eq!(s.kind as u8, kind);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 4096, .. ProptestConfig::default() })]

    /// Arbitrary bytes: the decoder returns a frame, "need more", or an
    /// error, and never panics. A decoded frame re-encodes to the same bytes.
    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        if let Ok(Some((frame, used))) = decode(&bytes, DEFAULT_MAX_FRAME_LEN) {
            prop_assert!(used <= bytes.len());
            prop_assert_eq!(&encode_to_bytes(&frame)[..], &bytes[..used]);
        }
    }

    /// Valid headers with random bodies reach the body parsers.
    #[test]
    fn random_bodies_never_panic(frame_type in 1u8..=14, body in proptest::collection::vec(any::<u8>(), 0..256)) {
        let mut bytes = Vec::with_capacity(body.len() + HEADER_LEN);
        bytes.extend_from_slice(&((body.len() + 5) as u32).to_be_bytes());
        bytes.push(frame_type);
        bytes.extend_from_slice(&[0, 0, 0, 1]);
        bytes.extend_from_slice(&body);
        if let Ok(Some((frame, used))) = decode(&bytes, DEFAULT_MAX_FRAME_LEN) {
            prop_assert_eq!(used, bytes.len());
            prop_assert_eq!(&encode_to_bytes(&frame)[..], &bytes[..]);
        }
    }
}

/// Decoding allocates only for bytes present: a frame claiming a huge count
/// of records is rejected without reserving room for them. The allocator
/// counts bytes allocated while decoding.
mod allocation {
    use super::*;
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;

    struct Counting;
    thread_local!(static ALLOCATED: Cell<usize> = const { Cell::new(0) });
    unsafe impl GlobalAlloc for Counting {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            let _ = ALLOCATED.try_with(|a| a.set(a.get() + layout.size()));
            unsafe { System.alloc(layout) }
        }
        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            unsafe { System.dealloc(ptr, layout) }
        }
    }
    #[global_allocator]
    static GLOBAL: Counting = Counting;

    #[test]
    fn claimed_counts_do_not_size_allocations() {
        // Deliver claiming 65,535 messages, carrying 60 bytes.
        let mut bytes = vec![0, 0, 0, 5 + 2 + 60, 0x07, 0, 0, 0, 0, 0xff, 0xff];
        bytes.extend_from_slice(&[0u8; 60]);
        let before = ALLOCATED.with(|a| a.get());
        let r = decode(&bytes, DEFAULT_MAX_FRAME_LEN);
        let used = ALLOCATED.with(|a| a.get()) - before;
        assert!(r.is_err());
        assert!(
            used < 4096,
            "decoding allocated {used} bytes for a 71-byte frame"
        );
    }
}

/// The fuzz targets (`courier_protocol::fuzzing`, also run by `cargo fuzz`
/// in `fuzz/`) on 20,000 inputs each, mutated from the protocol document's
/// test vectors and from minted tokens. Seeded (COURIER_TEST_SEED replays).
#[test]
fn fuzz_targets_hold_on_mutated_vectors() {
    use courier_protocol::fuzzing::{drive, frames, payloads, token_key, tokens};
    use courier_protocol::token::Claims;
    let seed = std::env::var("COURIER_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand_seed);
    println!("fuzz seed {seed} (replay with COURIER_TEST_SEED={seed})");
    let doc = include_str!("../PROTOCOL.md");
    let vectors: Vec<Vec<u8>> = doc
        .split("```hex\n")
        .skip(1)
        .map(|v| {
            let hex: String = v
                .split("```")
                .next()
                .unwrap()
                .lines()
                .map(|l| l.split('#').next().unwrap().trim())
                .collect();
            courier_protocol::token::decode_hex(&hex).expect("vector hex")
        })
        .collect();
    assert!(vectors.len() >= 30, "{} vectors", vectors.len());
    drive("frames", seed, 20_000, &vectors, frames);
    let receipts = vec![
        ReceiptPayload {
            status: ReceiptStatus::Read,
            reader: 7,
            messages: vec![(1, 2), (3, 4)],
        }
        .encode()
        .to_vec(),
        GroupEvent {
            kind: GroupEventKind::Added,
            actor: 1,
            users: vec![2, 3],
        }
        .encode()
        .to_vec(),
    ];
    drive("payloads", seed, 20_000, &receipts, payloads);
    let key = token_key();
    let minted: Vec<Vec<u8>> = [(1u64, 1u32), (42, 7)]
        .iter()
        .map(|&(user, device)| {
            let token = key.mint(Claims {
                user_id: user,
                device_id: device,
                expires_at_s: 1 << 40,
            });
            let mut v = user.to_be_bytes().to_vec();
            v.extend_from_slice(&device.to_be_bytes());
            v.extend_from_slice(token.as_bytes());
            v
        })
        .collect();
    drive("tokens", seed, 20_000, &minted, tokens);
}

fn rand_seed() -> u64 {
    use std::time::{SystemTime, UNIX_EPOCH};
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

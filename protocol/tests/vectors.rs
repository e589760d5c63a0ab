//! The test vectors in PROTOCOL.md, checked against the code in both
//! directions, so the document and the codec cannot drift.

use bytes::Bytes;
use courier_protocol::*;

fn message(seq: u64) -> Message {
    Message {
        seq,
        server_msg_id: 0x0000_0195_0000_0401,
        sender: 1001,
        sender_device: 1,
        client_msg_id: 77,
        timestamp_ms: 1_700_000_000_000,
        destination: Destination::User(1002),
        kind: MessageKind::Chat,
        payload: Bytes::from_static(b"hi"),
    }
}

/// Every frame type, with fixed field values. The names are the vector names
/// in PROTOCOL.md.
pub fn vectors() -> Vec<(&'static str, Frame)> {
    vec![
        (
            "hello",
            Frame::new(
                1,
                Body::Hello(Hello {
                    version: 1,
                    user_id: 1001,
                    device_id: 1,
                    resume_after: Some(41),
                    receipts_after: None,
                    token: Bytes::from_static(b"tok"),
                }),
            ),
        ),
        (
            "hello_receipt_facts",
            Frame::new(
                1,
                Body::Hello(Hello {
                    version: 1,
                    user_id: 1001,
                    device_id: 1,
                    resume_after: Some(41),
                    receipts_after: Some(7),
                    token: Bytes::from_static(b"tok"),
                }),
            ),
        ),
        (
            "welcome",
            Frame::new(
                1,
                Body::Welcome(Welcome {
                    version: 1,
                    session_id: 9,
                    head_seq: 45,
                    oldest_seq: 40,
                    resume_from: 42,
                    gap: false,
                    server_time_ms: 1_700_000_000_000,
                    max_frame_len: 1 << 20,
                    max_batch: 256,
                    keepalive_ms: 40_000,
                }),
            ),
        ),
        (
            "send",
            Frame::new(
                2,
                Body::Send(Send {
                    client_msg_id: 77,
                    destination: Destination::User(1002),
                    kind: MessageKind::Chat,
                    payload: Bytes::from_static(b"hi"),
                }),
            ),
        ),
        (
            "send_batch",
            Frame::new(
                3,
                Body::SendBatch(vec![
                    Send {
                        client_msg_id: 78,
                        destination: Destination::User(1002),
                        kind: MessageKind::Chat,
                        payload: Bytes::from_static(b"a"),
                    },
                    Send {
                        client_msg_id: 79,
                        destination: Destination::List(5),
                        kind: MessageKind::Chat,
                        payload: Bytes::new(),
                    },
                ]),
            ),
        ),
        (
            "send_ack",
            Frame::new(
                2,
                Body::SendAck(SendAck {
                    client_msg_id: 77,
                    server_msg_id: 0x0000_0195_0000_0401,
                    seq: 46,
                    timestamp_ms: 1_700_000_000_000,
                    duplicate: false,
                }),
            ),
        ),
        (
            "send_batch_ack",
            Frame::new(
                3,
                Body::SendBatchAck(vec![
                    SendResult {
                        client_msg_id: 78,
                        code: ErrorCode::OK,
                        server_msg_id: 0x0000_0195_0000_0402,
                        seq: 47,
                        timestamp_ms: 1_700_000_000_001,
                        duplicate: true,
                    },
                    SendResult {
                        client_msg_id: 79,
                        code: ErrorCode::DESTINATION_UNSUPPORTED,
                        server_msg_id: 0,
                        seq: 0,
                        timestamp_ms: 0,
                        duplicate: false,
                    },
                ]),
            ),
        ),
        ("deliver", Frame::new(0, Body::Deliver(vec![message(46)]))),
        ("ack", Frame::new(0, Body::Ack { up_to_seq: 46 })),
        (
            "fetch",
            Frame::new(
                4,
                Body::Fetch(Fetch {
                    user_id: 1002,
                    after_seq: 45,
                    limit: 100,
                }),
            ),
        ),
        (
            "fetch_reply",
            Frame::new(
                4,
                Body::FetchReply(FetchReply {
                    head_seq: 46,
                    oldest_seq: 40,
                    messages: vec![message(46)],
                }),
            ),
        ),
        ("ping", Frame::new(5, Body::Ping { nonce: 7 })),
        ("pong", Frame::new(5, Body::Pong { nonce: 7 })),
        (
            "error",
            Frame::new(6, Body::Error(Reason::new(ErrorCode::FORBIDDEN, "no"))),
        ),
        (
            "error_retry_after",
            Frame::new(
                7,
                Body::Error(Reason::new(
                    ErrorCode::SHARD_UNAVAILABLE,
                    error::with_retry_after(500, "shard unavailable"),
                )),
            ),
        ),
        (
            "goodbye",
            Frame::new(
                0,
                Body::Goodbye(Reason::new(ErrorCode::SHUTTING_DOWN, "bye")),
            ),
        ),
        (
            "group",
            Frame::new(
                10,
                Body::Group(GroupRequest {
                    op: GroupOp::Add,
                    group: GROUP_ID_BIT | 5,
                    users: vec![1003, 1004],
                }),
            ),
        ),
        (
            "group_info",
            Frame::new(
                10,
                Body::GroupInfo(GroupInfo {
                    group: GROUP_ID_BIT | 5,
                    head_seq: 3,
                    strategy: Strategy::Refs,
                    members: vec![(1001, Role::Admin), (1003, Role::Member)],
                }),
            ),
        ),
        (
            "group_deliver",
            Frame::new(
                0,
                Body::GroupDeliver {
                    group: GROUP_ID_BIT | 5,
                    messages: vec![Message {
                        destination: Destination::Group(GROUP_ID_BIT | 5),
                        ..message(3)
                    }],
                },
            ),
        ),
        (
            "mark",
            Frame::new(
                11,
                Body::Mark(Mark {
                    stream: 0,
                    up_to_seq: 42,
                    status: ReceiptStatus::Read,
                }),
            ),
        ),
        (
            "contacts",
            Frame::new(
                12,
                Body::Contacts(ContactsRequest {
                    op: ContactsOp::Add,
                    users: vec![1002],
                }),
            ),
        ),
        (
            "list",
            Frame::new(
                13,
                Body::List(ListRequest {
                    op: ListOp::Set,
                    list: 1,
                    users: vec![1002, 1003],
                }),
            ),
        ),
        (
            "users",
            Frame::new(
                13,
                Body::Users(Users {
                    id: 1,
                    users: vec![1002, 1003],
                }),
            ),
        ),
        (
            "broadcast_ack",
            Frame::new(
                14,
                Body::BroadcastAck(BroadcastAck {
                    client_msg_id: 80,
                    server_msg_id: 0x0000_0195_0000_0402,
                    timestamp_ms: 1_700_000_000_000,
                    delivered: 1,
                    skipped: 1,
                    duplicate: false,
                }),
            ),
        ),
        (
            "receipt_query",
            Frame::new(
                15,
                Body::ReceiptQuery {
                    group: GROUP_ID_BIT | 5,
                    seq: 3,
                },
            ),
        ),
        (
            "receipt_counts",
            Frame::new(
                15,
                Body::ReceiptCounts(ReceiptCounts {
                    group: GROUP_ID_BIT | 5,
                    seq: 3,
                    recipients: 120,
                    delivered: 37,
                    read: 12,
                }),
            ),
        ),
        (
            "status_post",
            Frame::new(
                16,
                Body::StatusPost(StatusPost {
                    audience: Audience::ContactsExcept,
                    users: vec![1003],
                    payload: Bytes::from_static(b"hi"),
                }),
            ),
        ),
        (
            "status_posted",
            Frame::new(
                16,
                Body::StatusPosted {
                    status_id: 0x0000_0195_0000_0403,
                    expires_at_ms: 1_700_086_400_000,
                },
            ),
        ),
        ("status_fetch", Frame::new(17, Body::StatusFetch)),
        (
            "status_list",
            Frame::new(
                17,
                Body::StatusList(vec![Status {
                    poster: 1001,
                    status_id: 0x0000_0195_0000_0403,
                    posted_at_ms: 1_700_000_000_000,
                    expires_at_ms: 1_700_086_400_000,
                    payload: Bytes::from_static(b"hi"),
                }]),
            ),
        ),
        (
            "status_view",
            Frame::new(
                18,
                Body::StatusView {
                    poster: 1001,
                    status_id: 0x0000_0195_0000_0403,
                },
            ),
        ),
        ("done", Frame::new(18, Body::Done)),
        (
            "business",
            Frame::new(
                19,
                Body::Business(BusinessRequest {
                    op: BusinessOp::OptIn,
                    business: 5001,
                    purpose: Purpose::Utility,
                    language: "pt_BR".into(),
                    text: "Sim".into(),
                }),
            ),
        ),
        (
            "business_info",
            Frame::new(
                19,
                Body::BusinessInfo(Box::new(BusinessInfo {
                    business: 5001,
                    verified: true,
                    display_name: "Shop".into(),
                    about: "We ship".into(),
                    address: String::new(),
                    description: String::new(),
                    email: "a@b.co".into(),
                    websites: vec!["https://s.co".into()],
                    picture: String::new(),
                    blocked: false,
                    marketing: false,
                    utility: true,
                })),
            ),
        ),
        (
            "template_pack",
            Frame::new(
                20,
                Body::TemplatePack(TemplatePack {
                    business: 5001,
                    valid_until_ms: 1_702_678_400_000,
                    json: "[]".into(),
                }),
            ),
        ),
        (
            "event_fetch",
            Frame::new(
                21,
                Body::EventFetch {
                    after: 4,
                    limit: 100,
                },
            ),
        ),
        (
            "event_list",
            Frame::new(
                21,
                Body::EventList {
                    last: 4,
                    json: "[]".into(),
                },
            ),
        ),
        (
            "receipts",
            Frame::new(
                0,
                Body::Receipts(vec![ReceiptFact {
                    reader: 1002,
                    delivered: 46,
                    read: 45,
                    version: 8,
                }]),
            ),
        ),
    ]
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Vec<u8> {
    let s: String = s.chars().filter(|c| c.is_ascii_hexdigit()).collect();
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// Vectors in the document: a line `#### Vector: NAME` followed by a ```hex block.
fn document_vectors() -> Vec<(String, Vec<u8>)> {
    let doc = include_str!("../PROTOCOL.md");
    let mut out = Vec::new();
    let mut lines = doc.lines();
    while let Some(line) = lines.next() {
        let Some(name) = line.strip_prefix("#### Vector: ") else {
            continue;
        };
        let mut block = String::new();
        let mut inside = false;
        for l in lines.by_ref() {
            if l.trim() == "```hex" {
                inside = true;
            } else if inside && l.trim() == "```" {
                break;
            } else if inside {
                block.push_str(l.split('#').next().unwrap_or(""));
            }
        }
        out.push((name.trim().to_owned(), unhex(&block)));
    }
    out
}

#[test]
fn document_vectors_match_the_codec_both_ways() {
    let doc = document_vectors();
    let code = vectors();
    let mut missing = Vec::new();
    for (name, frame) in &code {
        let encoded = encode_to_bytes(frame);
        match doc.iter().find(|(n, _)| n == name) {
            None => missing.push(format!(
                "#### Vector: {name}\n```hex\n{}\n```",
                hex(&encoded)
            )),
            Some((_, bytes)) => {
                assert_eq!(
                    hex(bytes),
                    hex(&encoded),
                    "vector {name}: document differs from encoder"
                );
                let (decoded, used) = decode(bytes, DEFAULT_MAX_FRAME_LEN).unwrap().unwrap();
                assert_eq!(used, bytes.len(), "vector {name}");
                assert_eq!(
                    &decoded, frame,
                    "vector {name}: decoder differs from document"
                );
            }
        }
    }
    assert!(
        missing.is_empty(),
        "vectors missing from PROTOCOL.md:\n{}",
        missing.join("\n")
    );
    assert_eq!(
        doc.len(),
        code.len(),
        "PROTOCOL.md has vectors the code does not know"
    );
}

#[test]
fn every_frame_type_has_a_vector() {
    let types: Vec<u8> = vectors().iter().map(|(_, f)| f.body.frame_type()).collect();
    for t in 0x01..=frame_type::LAST {
        assert!(types.contains(&t), "frame type 0x{t:02x} has no vector");
    }
}

#[test]
fn the_retry_after_hint_reads_back_from_its_vector() {
    let (_, frame) = vectors()
        .into_iter()
        .find(|(name, _)| *name == "error_retry_after")
        .unwrap();
    let Body::Error(reason) = frame.body else {
        panic!("an error frame")
    };
    assert_eq!(error::retry_after_ms(&reason.message), Some(500));
    assert_eq!(error::retry_after_ms("shard unavailable"), None);
    assert_eq!(error::retry_after_ms("retry after soon ms: x"), None);
}

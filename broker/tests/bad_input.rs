//! Bad input gets its specific error code, and the server keeps serving others.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use courier_client::{Client, ClientError};
use courier_protocol::*;

/// After each abuse, a well-behaved pair still exchanges a message.
async fn still_serving(server: &Server) {
    let (a, _) = server.client(901).await;
    let (b, _) = server.client(902).await;
    exchange(&a, 902, &b, "still here").await;
}

async fn after_hello(server: &Server, user: u64) -> Raw {
    Raw::welcomed_from(server, user, 1).await
}

#[tokio::test]
async fn malformed_frames_close_the_connection_with_their_code() {
    let server = Server::start(&[]);
    // A ping whose body is too short.
    let mut raw = after_hello(&server, 1).await;
    raw.send_bytes(&[0, 0, 0, 6, 0x0b, 0, 0, 0, 1, 0xaa]).await;
    assert_eq!(raw.expect_goodbye().await, ErrorCode::MALFORMED_FRAME);
    // An unknown frame type.
    let mut raw = after_hello(&server, 1).await;
    raw.send_bytes(&[0, 0, 0, 5, 0x7f, 0, 0, 0, 1]).await;
    assert_eq!(raw.expect_goodbye().await, ErrorCode::UNKNOWN_FRAME_TYPE);
    // Garbage before any hello.
    let mut raw = Raw::connect(&server.addr).await;
    raw.send_bytes(b"\x00\x00\x00\x05GET / HTTP/1.1\r\n\r\n")
        .await;
    assert_eq!(raw.expect_goodbye().await, ErrorCode::UNKNOWN_FRAME_TYPE);
    still_serving(&server).await;
}

#[tokio::test]
async fn oversized_frames_are_refused_before_their_body() {
    let server = Server::start(&[]);
    let mut raw = after_hello(&server, 1).await;
    // Claim 64 MiB and send only the header: the server must not wait for it.
    raw.send_bytes(&(64u32 << 20).to_be_bytes()).await;
    assert_eq!(raw.expect_goodbye().await, ErrorCode::FRAME_TOO_LARGE);
    still_serving(&server).await;
}

#[tokio::test]
async fn wrong_version_is_refused() {
    let server = Server::start(&[]);
    let mut raw = Raw::connect(&server.addr).await;
    let mut hello = Raw::hello(1, &server.token(1, 1, u64::MAX / 2));
    if let Body::Hello(h) = &mut hello.body {
        h.version = 99;
    }
    raw.send(&hello).await;
    assert_eq!(raw.expect_goodbye().await, ErrorCode::UNSUPPORTED_VERSION);
    still_serving(&server).await;
}

#[tokio::test]
async fn bad_expired_and_foreign_tokens_are_refused() {
    let server = Server::start(&[]);
    let refused = |r: Result<(Client, Welcome), ClientError>| match r {
        Err(ClientError::Refused(code, _)) => code,
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("accepted"),
    };
    let mut cfg = server.config(1);
    cfg.token = "garbage".into();
    assert_eq!(refused(Client::connect(cfg).await), ErrorCode::AUTH_FAILED);

    let mut cfg = server.config(1);
    cfg.token = server.token(1, 1, 1_000); // expired in 1970
    assert_eq!(
        refused(Client::connect(cfg).await),
        ErrorCode::TOKEN_EXPIRED
    );

    let mut cfg = server.config(1);
    cfg.token = server.token(2, 1, u64::MAX / 2); // bob's token, claiming to be alice
    assert_eq!(refused(Client::connect(cfg).await), ErrorCode::AUTH_FAILED);

    let mut cfg = server.config(1);
    cfg.device_id = 9; // token for device 1
    assert_eq!(refused(Client::connect(cfg).await), ErrorCode::AUTH_FAILED);

    // A token signed with another secret.
    let other = courier_broker::auth::TokenKey::new(vec![1u8; 32]);
    let mut cfg = server.config(1);
    cfg.token = other.mint(courier_broker::auth::Claims {
        user_id: 1,
        device_id: 1,
        expires_at_s: u64::MAX / 2,
    });
    assert_eq!(refused(Client::connect(cfg).await), ErrorCode::AUTH_FAILED);
    still_serving(&server).await;
}

#[tokio::test]
async fn reading_another_users_inbox_is_forbidden() {
    let server = Server::start(&[]);
    let (alice, _) = server.client(1).await;
    alice
        .send(
            Destination::User(2),
            MessageKind::Chat,
            chat("for bob only"),
        )
        .await
        .unwrap();
    let (mallory, _) = server.client(3).await;
    let err = mallory.fetch_inbox(2, 0, 100).await.unwrap_err();
    assert!(
        matches!(err, ClientError::Rejected(ErrorCode::FORBIDDEN, _)),
        "{err}"
    );
    // The connection stays usable, and mallory's own inbox is empty.
    mallory.ping().await.unwrap();
    assert!(mallory.fetch(0, 100).await.unwrap().messages.is_empty());
    still_serving(&server).await;
}

#[tokio::test]
async fn requests_that_break_a_rule_get_their_code_and_the_session_goes_on() {
    let server = Server::start(&[
        ("COURIER_LIMITS_MAX_BATCH", "4"),
        ("COURIER_LIMITS_MAX_PAYLOAD_LEN", "1000"),
    ]);
    let (alice, welcome) = server.client(1).await;
    assert_eq!(welcome.max_batch, 4);
    assert_eq!(
        rejected(
            alice
                .send(Destination::Group(5), MessageKind::Chat, chat("g"))
                .await
        ),
        ErrorCode::INVALID_DESTINATION,
        "a group id has the top bit set"
    );
    assert_eq!(
        rejected(
            alice
                .send(
                    Destination::User(GROUP_ID_BIT | 2),
                    MessageKind::Chat,
                    chat("g")
                )
                .await
        ),
        ErrorCode::INVALID_DESTINATION,
        "a user id has the top bit clear"
    );
    assert_eq!(
        rejected(
            alice
                .send(
                    Destination::Group(GROUP_ID_BIT | 5),
                    MessageKind::Chat,
                    chat("g")
                )
                .await
        ),
        ErrorCode::NOT_A_MEMBER
    );
    assert_eq!(
        rejected(
            alice
                .send(Destination::List(5), MessageKind::Chat, chat("l"))
                .await
        ),
        ErrorCode::NO_SUCH_LIST
    );
    assert_eq!(
        rejected(
            alice
                .send(Destination::List(0), MessageKind::Chat, chat("l"))
                .await
        ),
        ErrorCode::INVALID_DESTINATION
    );
    assert_eq!(
        rejected(
            alice
                .send(Destination::User(0), MessageKind::Chat, chat("u0"))
                .await
        ),
        ErrorCode::INVALID_DESTINATION
    );
    for kind in [
        MessageKind::Receipt,
        MessageKind::System,
        MessageKind::Erased,
    ] {
        assert_eq!(
            rejected(alice.send(Destination::User(2), kind, chat("x")).await),
            ErrorCode::KIND_NOT_ALLOWED,
            "{kind:?}"
        );
    }
    assert_eq!(
        rejected(
            alice
                .send(
                    Destination::User(2),
                    MessageKind::Chat,
                    Bytes::from(vec![0u8; 1001])
                )
                .await
        ),
        ErrorCode::PAYLOAD_TOO_LARGE
    );
    let five: Vec<Send> = (0..5)
        .map(|i| Send {
            client_msg_id: i,
            destination: Destination::User(2),
            kind: MessageKind::Chat,
            payload: chat("x"),
        })
        .collect();
    match alice.send_batch(five).await {
        Err(ClientError::Rejected(ErrorCode::BATCH_TOO_LARGE, _)) => {}
        other => panic!("expected BATCH_TOO_LARGE, got {other:?}"),
    }
    // A batch with one bad item: the others are stored.
    let mixed = vec![
        Send {
            client_msg_id: 10,
            destination: Destination::User(2),
            kind: MessageKind::Chat,
            payload: chat("ok"),
        },
        Send {
            client_msg_id: 11,
            destination: Destination::List(1),
            kind: MessageKind::Chat,
            payload: chat("no"),
        },
        Send {
            client_msg_id: 13,
            destination: Destination::Group(GROUP_ID_BIT | 1),
            kind: MessageKind::Chat,
            payload: chat("no"),
        },
        Send {
            client_msg_id: 12,
            destination: Destination::User(2),
            kind: MessageKind::Chat,
            payload: chat("ok"),
        },
    ];
    let codes: Vec<ErrorCode> = alice
        .send_batch(mixed)
        .await
        .unwrap()
        .iter()
        .map(|r| r.code)
        .collect();
    assert_eq!(
        codes,
        vec![
            ErrorCode::OK,
            ErrorCode::DESTINATION_UNSUPPORTED,
            ErrorCode::NOT_A_MEMBER,
            ErrorCode::OK
        ]
    );
    // A server frame sent by a client.
    let mut raw = after_hello(&server, 1).await;
    raw.send(&Frame::new(9, Body::Pong { nonce: 1 })).await;
    raw.send(&Frame::new(10, Body::Deliver(vec![]))).await;
    match raw.next().await {
        Some(Frame {
            request_id: 10,
            body: Body::Error(r),
        }) => assert_eq!(r.code, ErrorCode::UNEXPECTED_FRAME),
        other => panic!("expected UNEXPECTED_FRAME, got {other:?}"),
    }
    // Nothing bad reached bob's inbox.
    let (bob, _) = server.client(2).await;
    let inbox = bob.fetch(0, 100).await.unwrap();
    assert_eq!(inbox.messages.len(), 2);
    still_serving(&server).await;
}

#[tokio::test]
async fn handshake_idle_and_connection_limits_close_with_their_codes() {
    let server = Server::start(&[
        ("COURIER_LIMITS_HANDSHAKE_TIMEOUT_MS", "300"),
        ("COURIER_LIMITS_IDLE_TIMEOUT_MS", "1500"),
        ("COURIER_LIMITS_MAX_CONNECTIONS", "3"),
    ]);
    // Connect and say nothing.
    let mut silent = Raw::connect(&server.addr).await;
    assert_eq!(silent.expect_goodbye().await, ErrorCode::HANDSHAKE_TIMEOUT);
    // Authenticate, then go quiet past the idle timeout.
    let mut idle = after_hello(&server, 1).await;
    assert_eq!(idle.expect_goodbye().await, ErrorCode::IDLE_TIMEOUT);
    // A client that pings stays.
    let (pinger, welcome) = server.client(2).await;
    assert_eq!(welcome.keepalive_ms, 500);
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        pinger.ping().await.unwrap();
    }
    // Three slots: pinger plus two more; the fourth is refused.
    let (_b, _) = server.client(3).await;
    let (_c, _) = server.client(4).await;
    let mut over = Raw::connect(&server.addr).await;
    assert_eq!(over.expect_goodbye().await, ErrorCode::TOO_MANY_CONNECTIONS);
}

#[tokio::test]
async fn sigterm_finishes_accepted_work_and_says_goodbye() {
    let mut server = Server::start(&[]);
    assert_eq!(server.admin_get("/healthz").await, (200, "ok\n".into()));
    assert_eq!(server.admin_get("/readyz").await.0, 200);
    let (alice, _) = server.client(1).await;
    let ack = alice
        .send(Destination::User(2), MessageKind::Chat, chat("before"))
        .await
        .unwrap();
    server.terminate();
    let reason = tokio::time::timeout(WAIT, alice.closed()).await.unwrap();
    assert_eq!(reason.map(|r| r.code), Some(ErrorCode::SHUTTING_DOWN));
    let status = tokio::task::spawn_blocking(move || {
        let status = server.child.wait().unwrap();
        (status, server)
    })
    .await
    .unwrap();
    assert!(status.0.success(), "clean exit: {:?}", status.0);
    let mut server = status.1;
    server.restart();
    let (bob, _) = server.client(2).await;
    let m = bob.recv_timeout(WAIT).await.unwrap();
    assert_eq!((m.seq, m.server_msg_id), (ack.seq, ack.server_msg_id));
}

/// Fan-out requests whose fields do not fit together: each gets its code,
/// the session goes on, nothing is written.
#[tokio::test]
async fn fan_out_requests_with_bad_fields_get_their_codes() {
    let server = Server::start(&[("COURIER_SOCIAL_MAX_CONTACTS", "2")]);
    let (alice, _) = server.client(1).await;
    use ErrorCode as E;
    assert_eq!(
        rejected(
            alice
                .group(GroupOp::Create, GROUP_ID_BIT | 3, vec![2])
                .await
        ),
        E::INVALID_REQUEST,
        "create names no group"
    );
    assert_eq!(
        rejected(alice.group(GroupOp::Info, 5, vec![]).await),
        E::INVALID_REQUEST,
        "5 is a user id"
    );
    assert_eq!(
        rejected(alice.create_group(vec![0]).await),
        E::INVALID_REQUEST
    );
    let g = alice.create_group(vec![2]).await.unwrap().group;
    assert_eq!(
        rejected(alice.group(GroupOp::Add, g, vec![]).await),
        E::INVALID_REQUEST
    );
    assert_eq!(
        rejected(alice.group(GroupOp::Add, g, vec![2]).await),
        E::INVALID_REQUEST,
        "already a member"
    );
    for mark in [
        Mark {
            stream: 7,
            up_to_seq: 1,
            status: ReceiptStatus::Read,
        },
        Mark {
            stream: 0,
            up_to_seq: 1,
            status: ReceiptStatus::Viewed,
        },
    ] {
        assert_eq!(
            rejected(alice.request(Body::Mark(mark)).await),
            E::INVALID_REQUEST
        );
    }
    assert_eq!(
        rejected(alice.receipt_counts(g, 99).await),
        E::INVALID_REQUEST,
        "no such group message"
    );
    assert_eq!(
        rejected(alice.receipt_counts(GROUP_ID_BIT | 12345, 1).await),
        E::NOT_A_MEMBER
    );
    assert_eq!(
        rejected(alice.contacts(ContactsOp::Add, vec![1]).await),
        E::INVALID_REQUEST,
        "oneself"
    );
    assert_eq!(
        rejected(alice.contacts(ContactsOp::Add, vec![g]).await),
        E::INVALID_REQUEST,
        "a group"
    );
    alice.contacts(ContactsOp::Add, vec![2, 3]).await.unwrap();
    assert_eq!(
        rejected(alice.contacts(ContactsOp::Add, vec![4]).await),
        E::TOO_MANY_CONTACTS
    );
    assert_eq!(
        alice.contacts(ContactsOp::Get, vec![]).await.unwrap(),
        vec![2, 3],
        "nothing written by the refused add"
    );
    assert_eq!(
        rejected(alice.list(ListOp::Set, 0, vec![2]).await),
        E::INVALID_REQUEST
    );
    assert_eq!(
        rejected(alice.list(ListOp::Set, 1, vec![]).await),
        E::LIST_TOO_LARGE,
        "an empty list"
    );
    assert_eq!(rejected(alice.view_status(2, 1).await), E::NO_SUCH_STATUS);
    assert_eq!(
        rejected(
            alice
                .post_status(Audience::Contacts, vec![], Bytes::from(vec![0; 70_000]))
                .await
        ),
        E::PAYLOAD_TOO_LARGE
    );
    alice.ping().await.unwrap();

    // A group id is never a user.
    let mut cfg = server.config(GROUP_ID_BIT | 1);
    cfg.token = server.token(GROUP_ID_BIT | 1, 1, u64::MAX / 2);
    match Client::connect(cfg).await {
        Err(ClientError::Refused(code, _)) => assert_eq!(code, E::AUTH_FAILED),
        other => panic!("expected a refusal, got {:?}", other.map(|_| ())),
    }

    // A group request with an unknown op cannot be parsed: malformed.
    let mut raw = after_hello(&server, 1).await;
    raw.send_bytes(&[
        0, 0, 0, 16, 0x0f, 0, 0, 0, 1, 99, 0x80, 0, 0, 0, 0, 0, 0, 1, 0, 0,
    ])
    .await;
    assert_eq!(raw.expect_goodbye().await, ErrorCode::MALFORMED_FRAME);
    still_serving(&server).await;
}

/// CPU time (user + system, in clock ticks) the process `pid` has used.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which is in parentheses).
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

/// A client that sends half a frame and stops must cost the server
/// nothing while it waits: the session waits for the rest (or the idle
/// timeout) without spinning, and the frame completes normally.
#[tokio::test]
async fn half_a_frame_is_waited_for_not_spun_on() {
    let server = Server::start(&[]);
    let mut raw = after_hello(&server, 1).await;
    // A ping frame (length 13, type 0x0b, request id 7, nonce 9), split.
    let ping = [0, 0, 0, 13, 0x0b, 0, 0, 0, 7, 0, 0, 0, 0, 0, 0, 0, 9];
    raw.send_bytes(&ping[..6]).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = cpu_ticks(server.child.id());
    tokio::time::sleep(Duration::from_secs(1)).await;
    let used = cpu_ticks(server.child.id()) - before;
    // A spinning reader burns a whole core: about 100 ticks in this second.
    assert!(
        used < 30,
        "the server used {used} ticks waiting for half a frame"
    );
    raw.send_bytes(&ping[6..]).await;
    match raw.next().await {
        Some(Frame {
            request_id: 7,
            body: Body::Pong { nonce: 9 },
        }) => {}
        other => panic!("expected the pong, got {other:?}"),
    }
}

/// Another program's variable with the node's prefix (a harness's
/// `COURIER_BIN`) does not stop `courier serve`: it is named in a warning
/// and the node serves.
#[tokio::test]
async fn unrelated_courier_variables_are_named_not_fatal() {
    let server = Server::start(&[("COURIER_BIN", "/usr/local/bin/courier")]);
    let warned = server.logged_soon("COURIER_BIN");
    assert_eq!(warned.len(), 1, "one warning names it: {warned:?}");
    assert!(warned[0].contains("name no setting"), "{warned:?}");
    still_serving(&server).await;
}

//! One-to-one delivery over real TCP against the real `courier` binary.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::*;
use courier_protocol::*;

#[tokio::test]
async fn two_users_exchange_messages() {
    let server = Server::start(&[]);
    let (alice, _) = server.client(1).await;
    let (bob, _) = server.client(2).await;

    let ack = alice
        .send(Destination::User(2), MessageKind::Chat, chat("hello bob"))
        .await
        .unwrap();
    assert_eq!(ack.seq, 1);
    assert!(!ack.duplicate);
    let m = bob.recv_timeout(WAIT).await.unwrap();
    assert_eq!(
        (m.seq, m.sender, m.client_msg_id),
        (1, 1, ack.client_msg_id)
    );
    assert_eq!(m.payload, chat("hello bob"));
    assert_eq!(m.destination, Destination::User(2));
    assert_eq!(m.server_msg_id, ack.server_msg_id);
    assert_eq!(m.timestamp_ms, ack.timestamp_ms);

    let reply = bob
        .send(Destination::User(1), MessageKind::Chat, chat("hi alice"))
        .await
        .unwrap();
    let m = alice.recv_timeout(WAIT).await.unwrap();
    assert_eq!(
        (m.seq, m.sender, m.payload.clone()),
        (1, 2, chat("hi alice"))
    );
    assert_eq!(m.server_msg_id, reply.server_msg_id);
}

#[tokio::test]
async fn every_device_of_a_user_gets_the_message() {
    let server = Server::start(&[]);
    let (alice, _) = server.client(1).await;
    let (phone, _) = server.client(2).await;
    let mut cfg = server.config(2);
    cfg.device_id = 2;
    cfg.token = server.token(2, 2, u64::MAX / 2);
    let (laptop, _) = courier_client::Client::connect(cfg).await.unwrap();
    alice
        .send(Destination::User(2), MessageKind::Chat, chat("both"))
        .await
        .unwrap();
    assert_eq!(
        phone.recv_timeout(WAIT).await.unwrap().payload,
        chat("both")
    );
    assert_eq!(
        laptop.recv_timeout(WAIT).await.unwrap().payload,
        chat("both")
    );
}

#[tokio::test]
async fn offline_user_receives_everything_on_connect_in_order() {
    let server = Server::start(&[]);
    let (alice, _) = server.client(1).await;
    send_numbered(&alice, 2, 1..=50).await;
    let (bob, welcome) = server.client(2).await;
    assert_eq!(
        (welcome.head_seq, welcome.resume_from, welcome.gap),
        (50, 1, false)
    );
    for i in 1..=50u64 {
        let m = bob.recv_timeout(WAIT).await.unwrap();
        assert_eq!(m.seq, i);
        assert_eq!(m.payload, chat(format!("m{i}")));
    }
}

#[tokio::test]
async fn resume_after_n_returns_exactly_the_rest() {
    let server = Server::start(&[]);
    let (alice, _) = server.client(1).await;
    send_numbered(&alice, 2, 1..=20).await;
    let (bob, welcome) = server.resume(2, 12).await;
    assert_eq!((welcome.resume_from, welcome.gap), (13, false));
    for seq in 13..=20 {
        assert_eq!(bob.recv_timeout(WAIT).await.unwrap().seq, seq);
    }
    // Nothing else is pending: the next delivery is the next new message.
    alice
        .send(Destination::User(2), MessageKind::Chat, chat("marker"))
        .await
        .unwrap();
    let next = bob.recv_timeout(WAIT).await.unwrap();
    assert_eq!((next.seq, next.payload), (21, chat("marker")));

    // Without a resume point the session starts after what was acknowledged.
    bob.ack(15).await.unwrap();
    // The ack is on bob's shard queue before the pong comes back, and the
    // next session registers behind it on that same queue.
    bob.ping().await.unwrap();
    drop(bob);
    let (bob2, welcome) = server.client(2).await;
    assert_eq!(welcome.resume_from, 16);
    assert_eq!(bob2.recv_timeout(WAIT).await.unwrap().seq, 16);
}

#[tokio::test]
async fn resume_older_than_retention_says_so() {
    // Acknowledged messages are trimmed at once.
    let server = Server::start(&[("COURIER_RETENTION_ACKED_RETENTION_MS", "0")]);
    let (alice, _) = server.client(1).await;
    send_numbered(&alice, 2, 1..=10).await;
    let (bob, _) = server.client(2).await;
    for _ in 1..=10 {
        bob.recv_timeout(WAIT).await.unwrap();
    }
    bob.ack(6).await.unwrap();
    // Trimming runs on the shard's tick; wait for it (bounded).
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let r = bob.fetch(0, 100).await.unwrap();
        if r.oldest_seq == 7 {
            assert_eq!(
                r.messages.iter().map(|m| m.seq).collect::<Vec<_>>(),
                vec![7, 8, 9, 10]
            );
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "acked messages never trimmed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (bob2, welcome) = server.resume(2, 3).await;
    assert!(
        welcome.gap,
        "resume point 3 is older than the oldest retained (7)"
    );
    assert_eq!((welcome.oldest_seq, welcome.resume_from), (7, 7));
    assert_eq!(bob2.recv_timeout(WAIT).await.unwrap().seq, 7);
    let (_bob3, welcome) = server.resume(2, 6).await;
    assert!(!welcome.gap, "nothing after 6 is missing");
}

#[tokio::test]
async fn retried_send_is_stored_once() {
    let server = Server::start(&[]);
    let (alice, _) = server.client(1).await;
    let first = alice
        .send_with_id(4242, Destination::User(2), MessageKind::Chat, chat("once"))
        .await
        .unwrap();
    // The client reconnects (as after a timeout) and retries with the same id.
    drop(alice);
    let (alice, _) = server.client(1).await;
    let retry = alice
        .send_with_id(4242, Destination::User(2), MessageKind::Chat, chat("once"))
        .await
        .unwrap();
    assert!(retry.duplicate);
    assert_eq!(
        (retry.seq, retry.server_msg_id),
        (first.seq, first.server_msg_id)
    );
    // In one batch, too.
    let results = alice
        .send_batch(vec![
            Send {
                client_msg_id: 4243,
                destination: Destination::User(2),
                kind: MessageKind::Chat,
                payload: chat("b"),
            },
            Send {
                client_msg_id: 4243,
                destination: Destination::User(2),
                kind: MessageKind::Chat,
                payload: chat("b"),
            },
        ])
        .await
        .unwrap();
    assert_eq!((results[0].duplicate, results[1].duplicate), (false, true));
    assert_eq!(results[0].seq, results[1].seq);
    // The same id for another recipient is refused, not stored.
    let err = alice
        .send_with_id(4242, Destination::User(3), MessageKind::Chat, chat("other"))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            courier_client::ClientError::Rejected(ErrorCode::CLIENT_ID_REUSED, _)
        ),
        "{err}"
    );

    let (bob, _) = server.client(2).await;
    let inbox = bob.fetch(0, 100).await.unwrap();
    assert_eq!(inbox.messages.len(), 2, "one copy per client message id");
    let (carol, _) = server.client(3).await;
    assert!(carol.fetch(0, 100).await.unwrap().messages.is_empty());
}

#[tokio::test]
async fn batches_are_acknowledged_per_item_in_order() {
    let server = Server::start(&[]);
    let (alice, _) = server.client(1).await;
    let sends: Vec<Send> = (0..100)
        .map(|i| Send {
            client_msg_id: 1000 + i,
            destination: Destination::User(2 + i % 3),
            kind: MessageKind::Chat,
            payload: chat(format!("b{i}")),
        })
        .collect();
    let results = alice.send_batch(sends).await.unwrap();
    assert_eq!(results.len(), 100);
    for (i, r) in results.iter().enumerate() {
        assert_eq!((r.client_msg_id, r.code), (1000 + i as u64, ErrorCode::OK));
        assert_eq!(
            r.seq,
            i as u64 / 3 + 1,
            "per-recipient sequences in send order"
        );
    }
}

#[tokio::test]
async fn a_slow_consumer_is_demoted_and_catches_up_without_loss() {
    let server = Server::start(&[("COURIER_LIMITS_OUTBOUND_QUEUE_LEN", "16")]);
    let (sender, _) = server.client(1).await;
    // Bob connects and then does not read: his client's queue fills, the
    // socket fills, the server's queue for him fills.
    let (bob, _) = server.client(2).await;
    let (carol, _) = server.client(3).await;
    let (dave, _) = server.client(4).await;

    // 24 MB: more than the client's queue and both sockets' buffers hold.
    const TOTAL: u64 = 12_000;
    let payload = chat(vec![b'x'; 2048]);
    let flood = {
        let payload = payload.clone();
        let sender = &sender;
        async move {
            let mut acked = 0;
            for batch in 0..TOTAL / 100 {
                let sends = (0..100)
                    .map(|i| Send {
                        client_msg_id: batch * 100 + i + 1,
                        destination: Destination::User(2),
                        kind: MessageKind::Chat,
                        payload: payload.clone(),
                    })
                    .collect();
                let r = sender.send_batch(sends).await.unwrap();
                acked += r.iter().filter(|r| r.code == ErrorCode::OK).count() as u64;
            }
            acked
        }
    };
    // Meanwhile carol and dave keep talking; each message must arrive.
    let chat_pair = async {
        for i in 0..200 {
            carol
                .send(
                    Destination::User(4),
                    MessageKind::Chat,
                    chat(format!("c{i}")),
                )
                .await
                .unwrap();
            let m = dave.recv_timeout(WAIT).await.unwrap();
            assert_eq!(m.payload, chat(format!("c{i}")));
        }
    };
    let (acked, ()) = tokio::join!(flood, chat_pair);
    assert_eq!(acked, TOTAL, "the sender is never refused or stalled");

    // Now bob reads: every message, once, in order.
    for seq in 1..=TOTAL {
        let m = bob.recv_timeout(WAIT).await.unwrap();
        assert_eq!(m.seq, seq);
        assert_eq!(m.client_msg_id, seq);
    }
    let metrics = server.admin_get("/metrics").await.1;
    let demotions: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("courier_slow_consumer_demotions_total "))
        .expect("demotion counter exported")
        .parse()
        .unwrap();
    assert!(
        demotions >= 1.0,
        "bob was never moved off live push:\n{metrics}"
    );
    // And nothing more.
    sender
        .send(Destination::User(2), MessageKind::Chat, chat("last"))
        .await
        .unwrap();
    assert_eq!(bob.recv_timeout(WAIT).await.unwrap().seq, TOTAL + 1);
}

#[tokio::test]
async fn fetch_reads_history_in_pages() {
    let server = Server::start(&[]);
    let (alice, _) = server.client(1).await;
    send_numbered(&alice, 2, 1..=30).await;
    let (bob, _) = server.client(2).await;
    let mut seen = HashSet::new();
    let mut after = 0;
    loop {
        let page = bob.fetch(after, 7).await.unwrap();
        assert_eq!(page.head_seq, 30);
        if page.messages.is_empty() {
            break;
        }
        assert!(page.messages.len() <= 7);
        for m in &page.messages {
            assert!(m.seq > after);
            assert!(seen.insert(m.seq));
            after = m.seq;
        }
    }
    assert_eq!(seen.len(), 30);
}

#[tokio::test]
async fn the_client_library_keeps_an_idle_session_alive() {
    let server = Server::start(&[("COURIER_LIMITS_IDLE_TIMEOUT_MS", "900")]);
    let (alice, _) = server.client(1).await;
    let (bob, welcome) = server.client(2).await;
    assert_eq!(welcome.keepalive_ms, 300);
    // Bob only listens, well past the idle timeout: his client pings for him.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(bob.close_reason().is_none(), "{:?}", bob.close_reason());
    exchange(&alice, 2, &bob, "still there?").await;
}

/// Sends that must wait (for one of the session's two in-flight permits,
/// and for room on the one shard's one-slot queue) are stored once each,
/// in each sender's order: the waits are the rare path the reader takes
/// out of line, and nothing may be lost, repeated or reordered there.
#[tokio::test]
async fn sends_that_wait_for_permits_and_queue_room_keep_their_order() {
    let server = Server::start(&[
        ("COURIER_SHARDS", "1"),
        ("COURIER_LIMITS_SHARD_QUEUE_LEN", "1"),
        ("COURIER_LIMITS_MAX_IN_FLIGHT", "2"),
    ]);
    let (receiver, _) = server.client(10).await;
    let senders = [1u64, 2, 3, 4];
    let (batches, singles) = (2u64, 50u64);
    let sent = senders.map(|user| {
        let server = &server;
        async move {
            let (client, _) = server.client(user).await;
            let mut last_seq = 0;
            for b in 0..batches {
                let sends: Vec<Send> = (0..100)
                    .map(|i| Send {
                        client_msg_id: user << 32 | (b * 100 + i),
                        destination: Destination::User(10),
                        kind: MessageKind::Chat,
                        payload: chat(format!("{user}:{}", b * 100 + i)),
                    })
                    .collect();
                for r in client.send_batch(sends).await.unwrap() {
                    assert_eq!(r.code, ErrorCode::OK);
                    assert!(r.seq > last_seq, "sender {user}: seqs in send order");
                    last_seq = r.seq;
                }
            }
            // Single sends in flight together: each waits for a permit.
            let acks = futures_util::future::join_all((0..singles).map(|i| {
                let n = batches * 100 + i;
                client.send(
                    Destination::User(10),
                    MessageKind::Chat,
                    chat(format!("{user}:{n}")),
                )
            }))
            .await;
            for ack in acks {
                assert!(
                    ack.unwrap().seq > last_seq,
                    "sender {user}: singles after the batches"
                );
            }
        }
    });
    tokio::time::timeout(
        Duration::from_secs(30),
        futures_util::future::join_all(sent),
    )
    .await
    .expect("every send acknowledged within 30 s");

    let per_sender = batches * 100 + singles;
    let total = per_sender * senders.len() as u64;
    let mut seen = HashSet::new();
    let mut next_in_batches = std::collections::HashMap::new();
    for seq in 1..=total {
        let m = receiver.recv_timeout(WAIT).await.unwrap();
        assert_eq!(m.seq, seq, "the inbox has no gap and no repeat");
        let text = String::from_utf8(m.payload.to_vec()).unwrap();
        let (user, n) = text.split_once(':').unwrap();
        let (user, n): (u64, u64) = (user.parse().unwrap(), n.parse().unwrap());
        assert!(seen.insert((user, n)), "{user}:{n} stored twice");
        if n < batches * 100 {
            let expected = next_in_batches.entry(user).or_insert(0u64);
            assert_eq!(n, *expected, "sender {user}'s batches arrive in order");
            *expected += 1;
        }
    }
    assert_eq!(
        seen.len() as u64,
        total,
        "every sender's every message arrived"
    );
    assert!(
        receiver
            .recv_timeout(Duration::from_millis(300))
            .await
            .is_err(),
        "nothing more"
    );
}

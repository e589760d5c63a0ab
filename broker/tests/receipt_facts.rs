//! Receipts as facts (`Hello` flags bit 1, `Receipts` frames) over real TCP
//! against the real `courier` binary: what a sender who takes facts is
//! told, live and after reconnecting, after a SIGKILL, and what stays a
//! receipt message.

mod common;

use std::time::Duration;

use common::*;
use courier_client::{Client, ClientError};
use courier_protocol::*;

/// A session of `user` that takes receipt facts after `after`.
async fn facts_client(server: &Server, user: u64, after: u64) -> Client {
    let mut config = server.config(user);
    config.receipts_after = Some(after);
    Client::connect(config).await.expect("connect").0
}

/// Waits until `c` was told a fact about `reader` for which `wanted` holds.
async fn fact_about(c: &Client, reader: u64, wanted: impl Fn(&ReceiptFact) -> bool) -> ReceiptFact {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(f) = c.receipt_fact(reader).filter(|f| wanted(f)) {
            return f;
        }
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match c.receipt_changes_timeout(left).await {
            Ok(_) => {}
            Err(e) => panic!(
                "no such fact about {reader}: {e:?}; last {:?}",
                c.receipt_fact(reader)
            ),
        }
    }
}

/// Asserts `c` is told no more facts (after a round trip that would have
/// carried any already pushed).
async fn no_more_facts(c: &Client) {
    c.ping().await.unwrap();
    match c.receipt_changes_timeout(Duration::from_millis(300)).await {
        Err(ClientError::Timeout) => {}
        other => panic!("expected no more facts, got {other:?}"),
    }
}

async fn send(c: &Client, to: u64, text: &str) -> SendAck {
    c.send(Destination::User(to), MessageKind::Chat, chat(text))
        .await
        .unwrap()
}

/// A sender who takes facts is told, per reader, the highest of its
/// messages' `SendAck.seq` delivered and read, live; a lower or repeated
/// mark tells nothing; and nothing lands in its inbox.
#[tokio::test]
async fn facts_tell_the_sender_what_each_reader_did_in_its_send_ack_sequences() {
    let server = Server::start(&[]);
    let alice = facts_client(&server, 1, 0).await;
    let (bob, _) = server.client(2).await;
    let (carol, _) = server.client(3).await;
    // Bob's inbox holds something else first, so his sequences are not
    // alice's count of messages.
    send(&carol, 2, "before").await;
    let acks = [send(&alice, 2, "m1").await, send(&alice, 2, "m2").await];
    assert_eq!((acks[0].seq, acks[1].seq), (2, 3));
    for _ in 0..3 {
        bob.recv_timeout(WAIT).await.unwrap();
    }
    bob.ack(2).await.unwrap();
    let f = fact_about(&alice, 2, |f| f.delivered == 2).await;
    assert_eq!((f.read, f.version), (0, 1), "{f:?}");
    bob.mark_read(3).await.unwrap();
    let f = fact_about(&alice, 2, |f| f.read == 3).await;
    assert_eq!(
        (f.delivered, f.version),
        (3, 2),
        "read implies delivered: {f:?}"
    );
    // Lower and repeated marks move nothing.
    bob.ack(1).await.unwrap();
    bob.mark_read(3).await.unwrap();
    no_more_facts(&alice).await;
    assert_eq!(server.metric("courier_receipt_facts_total").await, 2);
    // Carol's two (below); none of alice's.
    assert_eq!(server.metric("courier_receipts_stored_total").await, 2);
    assert_eq!(
        alice.fetch(0, 10).await.unwrap().head_seq,
        0,
        "no receipt message"
    );
    // Carol, who takes receipt messages, still gets them.
    for status in [ReceiptStatus::Delivered, ReceiptStatus::Read] {
        let m = carol.recv_timeout(WAIT).await.unwrap();
        assert_eq!(m.kind, MessageKind::Receipt, "{m:?}");
        let r = ReceiptPayload::decode(&m.payload).unwrap();
        assert_eq!((r.status, r.reader), (status, 2));
    }
}

/// Facts made while the sender was offline are sent when it comes back,
/// from the version it says it has; one session switches the user for
/// good, so a later session that asks nothing gets no receipt message.
#[tokio::test]
async fn facts_wait_for_the_sender_and_resume_from_its_version() {
    let server = Server::start(&[]);
    drop(facts_client(&server, 1, 0).await); // switches user 1
    let (alice, _) = server.client(1).await; // asks nothing
    let (bob, _) = server.client(2).await;
    let to_bob = send(&alice, 2, "hi bob").await;
    let (dave, _) = server.client(4).await;
    let to_dave = send(&alice, 4, "hi dave").await;
    drop(alice);
    bob.recv_timeout(WAIT).await.unwrap();
    bob.mark_read(to_bob.seq).await.unwrap();
    dave.recv_timeout(WAIT).await.unwrap();
    dave.ack(to_dave.seq).await.unwrap();
    server
        .wait_metric("courier_receipt_facts_total", "both facts", |n| n == 2)
        .await;
    assert_eq!(server.metric("courier_receipts_stored_total").await, 0);

    let alice = facts_client(&server, 1, 0).await;
    let b = fact_about(&alice, 2, |_| true).await;
    let d = fact_about(&alice, 4, |_| true).await;
    assert_eq!((b.delivered, b.read), (to_bob.seq, to_bob.seq));
    assert_eq!((d.delivered, d.read), (to_dave.seq, 0));
    assert_eq!(alice.receipts_version(), b.version.max(d.version));
    // From the later version: only the later fact.
    let later = b.version.max(d.version);
    let earlier = b.version.min(d.version);
    let again = facts_client(&server, 1, earlier).await;
    let f = again.receipt_changes_timeout(WAIT).await.unwrap();
    assert_eq!(f.len(), 1, "{f:?}");
    assert_eq!(f[0].version, later);
    no_more_facts(&again).await;
    // From the last version: nothing; then the next fact, live.
    let last = facts_client(&server, 1, later).await;
    no_more_facts(&last).await;
    dave.mark_read(to_dave.seq).await.unwrap();
    let f = fact_about(&last, 4, |f| f.read == to_dave.seq).await;
    assert_eq!(f.version, later + 1);
    // `reconnect` resumes from what the session was told.
    let (back, _) = last.reconnect().await.unwrap();
    assert_eq!(back.config().receipts_after, Some(later + 1));
    no_more_facts(&back).await;
}

/// A client that says it has seen a version the node never gave (a client
/// bug, or a store that lost its newest rows) is sent every fact there is,
/// and the next one live, instead of dropping them as seen.
#[tokio::test]
async fn a_version_past_the_last_is_answered_with_every_fact() {
    let server = Server::start(&[]);
    let alice = facts_client(&server, 1, 0).await;
    let (bob, _) = server.client(2).await;
    let ack = send(&alice, 2, "m").await;
    bob.recv_timeout(WAIT).await.unwrap();
    bob.ack(ack.seq).await.unwrap();
    let f = fact_about(&alice, 2, |f| f.delivered == ack.seq).await;
    let ahead = facts_client(&server, 1, f.version + 100).await;
    let told = fact_about(&ahead, 2, |_| true).await;
    assert_eq!(told, f);
    bob.mark_read(ack.seq).await.unwrap();
    let next = fact_about(&ahead, 2, |f| f.read == ack.seq).await;
    assert_eq!(next.version, f.version + 1);
}

/// Broadcast copies keep receipt messages (their sender knows no copy's
/// sequence), while one-to-one messages to the same reader become facts.
#[tokio::test]
async fn broadcast_copies_keep_receipt_messages() {
    let server = Server::start(&[]);
    let shop = facts_client(&server, 1, 0).await;
    let (bob, _) = server.client(2).await;
    bob.contacts(ContactsOp::Add, vec![1]).await.unwrap();
    shop.list(ListOp::Set, 7, vec![2]).await.unwrap();
    let copy = shop
        .broadcast_with_id(500, 7, MessageKind::Chat, chat("sale"))
        .await
        .unwrap();
    assert_eq!(copy.delivered, 1);
    let direct = send(&shop, 2, "and for you").await;
    let last = {
        bob.recv_timeout(WAIT).await.unwrap();
        bob.recv_timeout(WAIT).await.unwrap().seq
    };
    assert_eq!(last, direct.seq);
    bob.mark_read(last).await.unwrap();
    let f = fact_about(&shop, 2, |f| f.read == direct.seq).await;
    assert_eq!(f.delivered, direct.seq);
    let m = shop.recv_timeout(WAIT).await.unwrap();
    assert_eq!(m.kind, MessageKind::Receipt, "{m:?}");
    let r = ReceiptPayload::decode(&m.payload).unwrap();
    assert_eq!(
        (r.status, r.reader, r.messages),
        (ReceiptStatus::Read, 2, vec![(500, copy.server_msg_id)])
    );
}

/// A fact, once written, survives a SIGKILL: the sender, offline during
/// the crash, is told it after the restart; the versions given after the
/// restart are above every version given before, so a client that kept
/// its version misses nothing.
#[tokio::test]
async fn facts_survive_a_sigkill_and_versions_only_grow() {
    let mut server = Server::start(&[]);
    let alice = facts_client(&server, 1, 0).await;
    let (bob, _) = server.client(2).await;
    let first = send(&alice, 2, "one").await;
    let second = send(&alice, 2, "two").await;
    bob.recv_timeout(WAIT).await.unwrap();
    bob.recv_timeout(WAIT).await.unwrap();
    bob.ack(first.seq).await.unwrap();
    let before = fact_about(&alice, 2, |f| f.delivered == first.seq).await;
    drop(alice);
    bob.mark_read(first.seq).await.unwrap();
    server
        .wait_metric("courier_receipt_facts_total", "the read fact", |n| n == 2)
        .await;
    drop(bob);
    server.kill();
    server.restart();

    let alice = facts_client(&server, 1, before.version).await;
    let read = fact_about(&alice, 2, |f| f.read == first.seq).await;
    assert!(read.version > before.version, "{read:?} after {before:?}");
    let (bob, _) = server.resume(2, first.seq).await;
    bob.recv_timeout(WAIT).await.unwrap();
    bob.mark_read(second.seq).await.unwrap();
    let after = fact_about(&alice, 2, |f| f.read == second.seq).await;
    assert!(after.version > read.version, "{after:?} after {read:?}");
    assert_eq!(
        alice.fetch(0, 10).await.unwrap().head_seq,
        0,
        "no receipt message"
    );
}

/// A business account that asks for facts still gets receipt messages:
/// its list sends and campaigns reach customers as one-to-one copies
/// whose sequences it is not told.
#[tokio::test]
async fn a_business_keeps_receipt_messages() {
    let server = Server::start(&[]);
    let (code, body) = server
        .admin_json(
            "PUT",
            "/admin/businesses/7101",
            serde_json::json!({ "display_name": "Shop" }),
        )
        .await;
    assert_eq!(code, 200, "{body}");
    let shop = facts_client(&server, 7101, 0).await;
    let (customer, _) = server.client(7102).await;
    // The customer writes first: the service window lets the shop answer.
    send(&customer, 7101, "is my order out?").await;
    shop.recv_timeout(WAIT).await.unwrap();
    let answer = send(&shop, 7102, "yes, today").await;
    let m = customer.recv_timeout(WAIT).await.unwrap();
    customer.mark_read(m.seq).await.unwrap();
    let r = shop.recv_timeout(WAIT).await.unwrap();
    assert_eq!(r.kind, MessageKind::Receipt, "{r:?}");
    let r = ReceiptPayload::decode(&r.payload).unwrap();
    assert_eq!(
        (r.status, r.reader, r.messages),
        (
            ReceiptStatus::Read,
            7102,
            vec![(answer.client_msg_id, answer.server_msg_id)]
        )
    );
    no_more_facts(&shop).await;
    assert_eq!(server.metric("courier_receipt_facts_total").await, 0);
}

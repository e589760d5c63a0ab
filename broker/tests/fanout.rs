//! Groups, broadcast lists, receipts and statuses over real TCP against the
//! real `courier` binary. Group tests run for both delivery strategies:
//! `refs` (a reference in each member's inbox) and `log` (members read the
//! group log), selected by `groups.log_threshold`.

mod common;

use std::time::Duration;

use common::*;
use courier_client::{Client, ClientError, Delivery};
use courier_protocol::*;

/// Threshold that keeps every test group on references.
const REFS: &str = "100000";
/// Threshold that puts every group of more than one member on the log.
const LOG: &str = "1";

fn start(threshold: &str) -> Server {
    Server::start(&[("COURIER_GROUPS_LOG_THRESHOLD", threshold)])
}

/// The next delivery, confirmed on its stream.
async fn next(c: &Client) -> Delivery {
    let d = c.next_timeout(WAIT).await.expect("a delivery");
    c.confirm(&d).await.unwrap();
    d
}

/// Asserts nothing more arrives for `c` (after a round trip that would
/// have carried anything already pushed).
async fn nothing_more(c: &Client) {
    c.ping().await.unwrap();
    match c.next_timeout(Duration::from_millis(300)).await {
        Err(ClientError::Timeout) => {}
        other => panic!("expected nothing more, got {other:?}"),
    }
}

fn event(d: &Delivery) -> GroupEvent {
    assert_eq!(d.message.kind, MessageKind::System, "{d:?}");
    GroupEvent::decode(&d.message.payload).unwrap()
}

/// Every rule of group membership, in one story, for one strategy.
async fn membership_story(threshold: &str) {
    let server = start(threshold);
    let (alice, _) = server.client(1).await;
    let (bob, _) = server.client(2).await;
    let (carol, _) = server.client(3).await;
    let (dave, _) = server.client(4).await;

    let info = alice.create_group(vec![2, 3]).await.unwrap();
    let g = info.group;
    assert_ne!(g & GROUP_ID_BIT, 0);
    assert_eq!(
        info.members,
        vec![(1, Role::Admin), (2, Role::Member), (3, Role::Member)]
    );
    for c in [&alice, &bob, &carol] {
        let ev = event(&next(c).await);
        assert_eq!(
            (ev.kind, ev.actor, ev.users),
            (GroupEventKind::Created, 1, vec![1, 2, 3])
        );
    }

    // A message reaches every member but its sender.
    let ack = alice
        .send(Destination::Group(g), MessageKind::Chat, chat("first"))
        .await
        .unwrap();
    assert_eq!(ack.seq, 2, "group sequence: after the creation event");
    for c in [&bob, &carol] {
        let d = next(c).await;
        assert_eq!(d.message.payload, chat("first"));
        assert_eq!(d.message.destination, Destination::Group(g));
        assert_eq!(d.message.server_msg_id, ack.server_msg_id);
    }
    nothing_more(&alice).await;

    // A second message; then outsiders may not send, read or change the group.
    alice
        .send(Destination::Group(g), MessageKind::Chat, chat("x"))
        .await
        .unwrap();
    assert_eq!(
        rejected(
            dave.send(Destination::Group(g), MessageKind::Chat, chat("x"))
                .await
        ),
        ErrorCode::NOT_A_MEMBER
    );
    assert_eq!(
        rejected(dave.group(GroupOp::Info, g, vec![]).await),
        ErrorCode::NOT_A_MEMBER
    );
    assert_eq!(
        rejected(bob.group(GroupOp::Add, g, vec![4]).await),
        ErrorCode::NOT_GROUP_ADMIN
    );
    assert_eq!(
        rejected(alice.group(GroupOp::Remove, g, vec![4]).await),
        ErrorCode::INVALID_REQUEST
    );
    assert_eq!(
        rejected(alice.group(GroupOp::Add, g, vec![GROUP_ID_BIT | 1]).await),
        ErrorCode::INVALID_REQUEST
    );
    assert_eq!(
        rejected(
            alice
                .send(
                    Destination::Group(GROUP_ID_BIT | 999),
                    MessageKind::Chat,
                    chat("x")
                )
                .await
        ),
        ErrorCode::NOT_A_MEMBER
    );
    for c in [&bob, &carol] {
        assert_eq!(next(c).await.message.payload, chat("x"));
    }

    // Removal: carol sees her removal event last, and nothing after it.
    alice.group(GroupOp::Remove, g, vec![3]).await.unwrap();
    for c in [&alice, &bob, &carol] {
        let ev = event(&next(c).await);
        assert_eq!((ev.kind, ev.users), (GroupEventKind::Removed, vec![3]));
    }
    // A new member sees its own addition first, nothing from before.
    alice.group(GroupOp::Add, g, vec![4]).await.unwrap();
    for c in [&alice, &bob, &dave] {
        let ev = event(&next(c).await);
        assert_eq!((ev.kind, ev.users), (GroupEventKind::Added, vec![4]));
    }
    bob.send(Destination::Group(g), MessageKind::Chat, chat("after"))
        .await
        .unwrap();
    for c in [&alice, &dave] {
        assert_eq!(next(c).await.message.payload, chat("after"));
    }
    nothing_more(&carol).await;
    assert_eq!(
        rejected(
            carol
                .send(Destination::Group(g), MessageKind::Chat, chat("x"))
                .await
        ),
        ErrorCode::NOT_A_MEMBER
    );

    // Roles: a promoted member may add; the last admin leaving hands over.
    let info = alice.group(GroupOp::Promote, g, vec![2]).await.unwrap();
    assert!(info.members.contains(&(2, Role::Admin)));
    for c in [&alice, &bob, &dave] {
        assert_eq!(event(&next(c).await).kind, GroupEventKind::Promoted);
    }
    alice.group(GroupOp::Demote, g, vec![2]).await.unwrap();
    for c in [&alice, &bob, &dave] {
        assert_eq!(event(&next(c).await).kind, GroupEventKind::Demoted);
    }
    alice.group(GroupOp::Leave, g, vec![]).await.unwrap();
    let ev = event(&next(&alice).await);
    assert_eq!((ev.kind, ev.users), (GroupEventKind::Left, vec![1]));
    let info = bob.group(GroupOp::Info, g, vec![]).await.unwrap();
    assert_eq!(info.members, vec![(2, Role::Admin), (4, Role::Member)]);
    for c in [&bob, &dave] {
        assert_eq!(event(&next(c).await).kind, GroupEventKind::Left);
    }
    nothing_more(&alice).await;

    // A member who was offline gets everything since joining on resume.
    drop(dave);
    bob.send(Destination::Group(g), MessageKind::Chat, chat("while away"))
        .await
        .unwrap();
    let (dave, _) = server.client(4).await;
    assert_eq!(next(&dave).await.message.payload, chat("while away"));
    nothing_more(&dave).await;
}

#[tokio::test]
async fn group_membership_rules_refs() {
    membership_story(REFS).await;
}

#[tokio::test]
async fn group_membership_rules_log() {
    membership_story(LOG).await;
}

/// Four members send concurrently; every member sees one and the same
/// order (the group log's), missing only its own messages.
async fn shared_order(threshold: &str) {
    let server = start(threshold);
    let members: Vec<u64> = (1..=5).collect();
    let mut clients = Vec::new();
    for &u in &members {
        clients.push(server.client(u).await.0);
    }
    let g = clients[0]
        .create_group(members[1..].to_vec())
        .await
        .unwrap()
        .group;
    for c in &clients {
        event(&next(c).await);
    }
    const EACH: u64 = 40;
    let mut senders = Vec::new();
    for (i, &u) in members.iter().take(4).enumerate() {
        // A second session of the sender, so its deliveries and acks do
        // not share a queue with the session that checks the order.
        let c = Client::connect(server.config(u)).await.unwrap().0;
        senders.push(tokio::spawn(async move {
            let mut acks = Vec::new();
            for n in 0..EACH {
                let ack = c
                    .send(
                        Destination::Group(g),
                        MessageKind::Chat,
                        chat(format!("{i}-{n}")),
                    )
                    .await
                    .unwrap();
                acks.push(ack);
            }
            acks
        }));
    }
    // The group order, from the acks' group sequences.
    let mut order: Vec<(u64, u64, u64)> = Vec::new(); // (gseq, sender, server id)
    for (i, s) in senders.into_iter().enumerate() {
        for ack in s.await.unwrap() {
            order.push((ack.seq, members[i], ack.server_msg_id));
        }
    }
    order.sort();
    let seqs: Vec<u64> = order.iter().map(|o| o.0).collect();
    assert_eq!(
        seqs,
        (2..2 + 4 * EACH).collect::<Vec<_>>(),
        "gap-free group log"
    );
    let ids: Vec<u64> = order.iter().map(|o| o.2).collect();
    assert!(
        ids.windows(2).all(|w| w[0] < w[1]),
        "server ids follow the group order"
    );
    for (c, &u) in clients.iter().zip(&members) {
        let expected: Vec<u64> = order.iter().filter(|o| o.1 != u).map(|o| o.2).collect();
        let mut got = Vec::new();
        while got.len() < expected.len() {
            got.push(next(c).await.message.server_msg_id);
        }
        assert_eq!(got, expected, "member {u} sees the group order");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_share_one_order_under_concurrent_senders_refs() {
    shared_order(REFS).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_share_one_order_under_concurrent_senders_log() {
    shared_order(LOG).await;
}

/// A message and a removal race: the removed member gets the message
/// exactly when it precedes the removal in the group order every other
/// member sees.
async fn add_remove_race(threshold: &str) {
    let server = start(threshold);
    let (admin, _) = server.client(1).await;
    let (sender, _) = server.client(2).await;
    let (watcher, _) = server.client(3).await;
    let g = admin.create_group(vec![2, 3]).await.unwrap().group;
    for c in [&admin, &sender, &watcher] {
        event(&next(c).await);
    }
    let mut outcomes = [0usize; 2];
    for round in 0..12u64 {
        let victim = 100 + round;
        admin.group(GroupOp::Add, g, vec![victim]).await.unwrap();
        let (v, _) = server.client(victim).await;
        assert_eq!(event(&next(&v).await).kind, GroupEventKind::Added);
        let send = sender.send(
            Destination::Group(g),
            MessageKind::Chat,
            chat(format!("race {round}")),
        );
        let remove = admin.group(GroupOp::Remove, g, vec![victim]);
        let (ack, info) = tokio::join!(send, remove);
        let (msg_seq, removal_seq) = (ack.unwrap().seq, info.unwrap().head_seq);
        // The watcher's view of the order.
        let mut watcher_order = Vec::new();
        while watcher_order.len() < 3 {
            let d = next(&watcher).await;
            watcher_order.push(d.message.kind);
        }
        let msg_first = msg_seq < removal_seq;
        assert_eq!(
            watcher_order,
            if msg_first {
                vec![MessageKind::System, MessageKind::Chat, MessageKind::System]
            } else {
                vec![MessageKind::System, MessageKind::System, MessageKind::Chat]
            }
        );
        // The victim: the message (if first), then its removal, then nothing.
        let d = next(&v).await;
        if msg_first {
            assert_eq!(d.message.payload, chat(format!("race {round}")));
            assert_eq!(event(&next(&v).await).kind, GroupEventKind::Removed);
        } else {
            assert_eq!(event(&d).kind, GroupEventKind::Removed);
        }
        nothing_more(&v).await;
        while admin.next_timeout(Duration::from_millis(50)).await.is_ok() {}
        while sender.next_timeout(Duration::from_millis(50)).await.is_ok() {}
        outcomes[usize::from(msg_first)] += 1;
    }
    eprintln!("race outcomes (removal first, message first): {outcomes:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_remove_races_are_consistent_with_the_group_order_refs() {
    add_remove_race(REFS).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_remove_races_are_consistent_with_the_group_order_log() {
    add_remove_race(LOG).await;
}

/// A group at the default limit of 1,024 members: every member gets every
/// message (online members live, the rest when they connect), the 1,025th
/// member is refused, and the sender reads aggregate receipts.
async fn group_of_1024(threshold: &str) {
    let server = start(threshold);
    let (alice, _) = server.client(1).await;
    let others: Vec<u64> = (2..=1024).collect();
    let info = alice.create_group(others.clone()).await.unwrap();
    let g = info.group;
    assert_eq!(info.members.len(), 1024);
    assert_eq!(
        rejected(alice.group(GroupOp::Add, g, vec![5000]).await),
        ErrorCode::GROUP_FULL
    );
    // 100 members online while the messages are sent.
    let mut online = Vec::new();
    for &u in &others[..100] {
        online.push(server.client(u).await.0);
    }
    let mut acks = Vec::new();
    for i in 0..5 {
        acks.push(
            alice
                .send(
                    Destination::Group(g),
                    MessageKind::Chat,
                    chat(format!("all {i}")),
                )
                .await
                .unwrap(),
        );
    }
    let expect: Vec<u64> = acks.iter().map(|a| a.server_msg_id).collect();
    let check = |ds: Vec<Delivery>, u: u64| {
        assert_eq!(event(&ds[0]).kind, GroupEventKind::Created, "member {u}");
        let got: Vec<u64> = ds[1..].iter().map(|d| d.message.server_msg_id).collect();
        assert_eq!(got, expect, "member {u}");
    };
    for (c, &u) in online.iter().zip(&others) {
        let mut ds = Vec::new();
        for _ in 0..6 {
            ds.push(next(c).await);
        }
        check(ds, u);
    }
    drop(online);
    // Everyone else, as they come online (in waves of 100 connections).
    for wave in others[100..].chunks(100) {
        let mut clients = Vec::new();
        for &u in wave {
            clients.push((u, server.client(u).await.0));
        }
        for (u, c) in &clients {
            let mut ds = Vec::new();
            for _ in 0..6 {
                ds.push(next(c).await);
            }
            check(ds, *u);
            if *u % 4 == 0 {
                let d = ds_last_stream(c, g, &acks[0]).await;
                c.mark(d.0, d.1, ReceiptStatus::Read).await.unwrap();
            }
        }
        for (_, c) in clients {
            c.ping().await.unwrap(); // marks are processed before this answer
        }
    }
    // Every member confirmed delivery; the members divisible by 4 among
    // those who connected in the waves (104, 108, ..., 1024: 231 of them)
    // read the first message.
    let counts = wait_for_counts(&alice, g, acks[0].seq, 1023, 231).await;
    assert_eq!(counts.recipients, 1023);
    // Only the sender may ask.
    let (bob, _) = server.client(2).await;
    assert_eq!(
        rejected(bob.receipt_counts(g, acks[0].seq).await),
        ErrorCode::FORBIDDEN
    );
}

/// The stream and sequence to mark read for the first message.
async fn ds_last_stream(c: &Client, g: u64, first: &SendAck) -> (u64, u64) {
    // Log groups are marked on the group stream at the group sequence; refs
    // groups on the inbox at the inbox sequence (event 1, then messages).
    let reply = c.fetch(0, 10).await.unwrap();
    match reply
        .messages
        .iter()
        .find(|m| m.server_msg_id == first.server_msg_id)
    {
        Some(m) => (0, m.seq),
        None => (g, first.seq),
    }
}

async fn wait_for_counts(c: &Client, g: u64, seq: u64, delivered: u32, read: u32) -> ReceiptCounts {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let counts = c.receipt_counts(g, seq).await.unwrap();
        if counts.delivered == delivered && counts.read == read {
            return counts;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "counts never reached {delivered}/{read}: {counts:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_of_1024_members_refs() {
    group_of_1024(REFS).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_of_1024_members_log() {
    group_of_1024("256").await;
}

#[tokio::test]
async fn group_limits_have_their_errors() {
    let server = Server::start(&[
        ("COURIER_GROUPS_MAX_MEMBERS", "3"),
        ("COURIER_GROUPS_MAX_PER_USER", "2"),
    ]);
    let (alice, _) = server.client(1).await;
    assert_eq!(
        rejected(alice.create_group(vec![2, 3, 4]).await),
        ErrorCode::GROUP_FULL
    );
    let g1 = alice.create_group(vec![2]).await.unwrap().group;
    alice.create_group(vec![3]).await.unwrap();
    assert_eq!(
        rejected(alice.create_group(vec![4]).await),
        ErrorCode::TOO_MANY_GROUPS
    );
    // Leaving frees a slot.
    alice.group(GroupOp::Leave, g1, vec![]).await.unwrap();
    alice.create_group(vec![4]).await.unwrap();
    assert_eq!(
        rejected(
            alice
                .send(Destination::Group(5), MessageKind::Chat, chat("x"))
                .await
        ),
        ErrorCode::INVALID_DESTINATION,
        "a user id is not a group id"
    );
}

/// Group messages are not answered with a receipt per member; the counts
/// follow the members' marks, and never go backwards.
async fn group_receipts(threshold: &str) {
    let server = start(threshold);
    let (alice, _) = server.client(1).await;
    let (bob, _) = server.client(2).await;
    let (carol, _) = server.client(3).await;
    let (_dave, _) = server.client(4).await;
    let g = alice.create_group(vec![2, 3, 4]).await.unwrap().group;
    event(&next(&alice).await);
    let ack = alice
        .send(Destination::Group(g), MessageKind::Chat, chat("hello"))
        .await
        .unwrap();
    let counts = alice.receipt_counts(g, ack.seq).await.unwrap();
    assert_eq!(
        (counts.recipients, counts.delivered, counts.read),
        (3, 0, 0)
    );
    // Bob confirms delivery of everything; carol reads (which implies delivered).
    let mut last = (0, 0);
    for _ in 0..2 {
        let d = bob.next_timeout(WAIT).await.unwrap();
        last = (d.stream, d.message.seq);
    }
    bob.mark(last.0, last.1, ReceiptStatus::Delivered)
        .await
        .unwrap();
    for _ in 0..2 {
        let d = carol.next_timeout(WAIT).await.unwrap();
        last = (d.stream, d.message.seq);
    }
    carol
        .mark(last.0, last.1, ReceiptStatus::Read)
        .await
        .unwrap();
    // A late, lower delivered mark from carol changes nothing.
    carol
        .mark(last.0, 1, ReceiptStatus::Delivered)
        .await
        .unwrap();
    wait_for_counts(&alice, g, ack.seq, 2, 1).await;
    // No receipt messages reached alice for the group message.
    nothing_more(&alice).await;
    // The node counts what it did: one group message (events are not
    // counted there); references only for the refs strategy: the creation
    // event to all 4 members, the message to the 3 others.
    assert_eq!(server.metric("courier_group_messages_total").await, 1);
    assert_eq!(server.metric("courier_receipts_stored_total").await, 0);
    let refs = server.metric("courier_group_references_total").await;
    assert_eq!(refs, if threshold == REFS { 7 } else { 0 });
}

#[tokio::test]
async fn group_receipts_are_aggregated_refs() {
    group_receipts(REFS).await;
}

#[tokio::test]
async fn group_receipts_are_aggregated_log() {
    group_receipts(LOG).await;
}

fn receipt(m: &Message) -> ReceiptPayload {
    assert_eq!(m.kind, MessageKind::Receipt, "{m:?}");
    ReceiptPayload::decode(&m.payload).unwrap()
}

/// Receipts arrive in the sender's inbox even while it is offline, only
/// move forward (read before delivered, repeats, lower marks), and name
/// the messages by the sender's own ids.
#[tokio::test]
async fn receipts_reach_the_sender_after_it_reconnects_and_never_go_back() {
    let server = Server::start(&[]);
    let (alice, _) = server.client(1).await;
    let (bob, _) = server.client(2).await;
    let mut acks = Vec::new();
    for i in 1..=3 {
        acks.push(
            alice
                .send(
                    Destination::User(2),
                    MessageKind::Chat,
                    chat(format!("m{i}")),
                )
                .await
                .unwrap(),
        );
    }
    drop(alice);
    for _ in 0..3 {
        bob.recv_timeout(WAIT).await.unwrap();
    }
    bob.mark_read(2).await.unwrap(); // read 1-2 before any delivered mark
    bob.ack(3).await.unwrap(); // delivered 3
    bob.ack(1).await.unwrap(); // lower: nothing
    bob.mark_read(2).await.unwrap(); // repeat: nothing
    bob.ping().await.unwrap();

    let (alice, _) = server.resume(1, 0).await;
    let ids = |i: usize| (acks[i].client_msg_id, acks[i].server_msg_id);
    let first = receipt(&alice.recv_timeout(WAIT).await.unwrap());
    assert_eq!(
        (first.status, first.reader, first.messages),
        (ReceiptStatus::Read, 2, vec![ids(0), ids(1)])
    );
    let second = receipt(&alice.recv_timeout(WAIT).await.unwrap());
    assert_eq!(
        (second.status, second.messages),
        (ReceiptStatus::Delivered, vec![ids(2)])
    );
    // Reading 3 later moves it forward; nothing moves back.
    bob.mark_read(3).await.unwrap();
    let third = receipt(&alice.recv_timeout(WAIT).await.unwrap());
    assert_eq!(
        (third.status, third.messages),
        (ReceiptStatus::Read, vec![ids(2)])
    );
    nothing_more(&alice).await;
    assert_eq!(server.metric("courier_receipts_stored_total").await, 3);
    // Receipts are not receipted back.
    let m = alice.fetch(0, 10).await.unwrap();
    alice.mark_read(m.head_seq).await.unwrap();
    alice.ping().await.unwrap();
    nothing_more(&bob).await;
}

#[tokio::test]
async fn broadcast_reaches_only_consenting_recipients() {
    let server = Server::start(&[("COURIER_SOCIAL_MAX_LIST_LEN", "3")]);
    let (shop, _) = server.client(1).await;
    let (bob, _) = server.client(2).await;
    let (carol, _) = server.client(3).await;
    let (dave, _) = server.client(4).await;
    // Bob and carol have the shop as a contact; dave does not.
    for c in [&bob, &carol] {
        assert_eq!(c.contacts(ContactsOp::Add, vec![1]).await.unwrap(), vec![1]);
    }
    assert_eq!(
        shop.list(ListOp::Set, 7, vec![2, 3, 4]).await.unwrap(),
        Some(vec![2, 3, 4])
    );
    let ack = shop
        .broadcast_with_id(500, 7, MessageKind::Chat, chat("sale"))
        .await
        .unwrap();
    assert_eq!((ack.delivered, ack.skipped, ack.duplicate), (2, 1, false));
    for c in [&bob, &carol] {
        let m = c.recv_timeout(WAIT).await.unwrap();
        assert_eq!(
            (m.sender, m.destination, m.client_msg_id, m.payload.clone()),
            (1, Destination::List(7), 500, chat("sale"))
        );
    }
    nothing_more(&dave).await;
    // A retry stores no second copy anywhere.
    let again = shop
        .broadcast_with_id(500, 7, MessageKind::Chat, chat("sale"))
        .await
        .unwrap();
    assert_eq!(
        (again.delivered, again.skipped, again.duplicate),
        (2, 1, true)
    );
    nothing_more(&bob).await;
    // Consent withdrawn: carol is skipped from now on.
    carol.contacts(ContactsOp::Remove, vec![1]).await.unwrap();
    let ack = shop
        .broadcast_with_id(501, 7, MessageKind::Chat, chat("more"))
        .await
        .unwrap();
    assert_eq!((ack.delivered, ack.skipped), (1, 2));
    assert_eq!(bob.recv_timeout(WAIT).await.unwrap().client_msg_id, 501);
    nothing_more(&carol).await;
    // Errors.
    assert_eq!(
        rejected(shop.list(ListOp::Set, 8, vec![2, 3, 4, 5]).await),
        ErrorCode::LIST_TOO_LARGE
    );
    assert_eq!(
        rejected(
            shop.broadcast_with_id(502, 9, MessageKind::Chat, chat("x"))
                .await
        ),
        ErrorCode::NO_SUCH_LIST
    );
    assert_eq!(
        rejected(shop.list(ListOp::Set, 8, vec![1]).await),
        ErrorCode::INVALID_REQUEST,
        "a list of oneself"
    );
    // The same client message id for another list is a reuse, not a retry.
    shop.list(ListOp::Set, 10, vec![2]).await.unwrap();
    assert_eq!(
        rejected(
            shop.broadcast_with_id(500, 10, MessageKind::Chat, chat("other"))
                .await
        ),
        ErrorCode::CLIENT_ID_REUSED
    );
    nothing_more(&bob).await;
    assert_eq!(shop.list(ListOp::Delete, 7, vec![]).await.unwrap(), None);
    assert_eq!(
        rejected(shop.list(ListOp::Get, 7, vec![]).await),
        ErrorCode::NO_SUCH_LIST
    );
}

/// A broadcast copy keeps its place among the sender's one-to-one sends to
/// the same recipient: pipelined without waiting for acks, the recipient
/// gets them in the order they were sent (the copies are planned by the
/// sender's shard but queued by the sender's session, in order).
#[tokio::test]
async fn broadcasts_and_direct_sends_to_one_recipient_keep_their_order() {
    let server = Server::start(&[]);
    let (shop, _) = server.client(1).await;
    let shop = std::sync::Arc::new(shop);
    let (bob, _) = server.client(2).await;
    bob.contacts(ContactsOp::Add, vec![1]).await.unwrap();
    shop.list(ListOp::Set, 7, vec![2]).await.unwrap();
    let mut acks = Vec::new();
    for i in 0..40u64 {
        let body = chat(format!("m{i}"));
        if i % 2 == 0 {
            let ack = shop
                .start_broadcast(1000 + i, 7, MessageKind::Chat, body)
                .unwrap();
            acks.push(tokio::spawn(async move { ack.await.map(|_| ()) }));
        } else {
            let ack = shop
                .start_send(1000 + i, Destination::User(2), MessageKind::Chat, body)
                .unwrap();
            acks.push(tokio::spawn(async move { ack.await.map(|_| ()) }));
        }
    }
    for a in acks {
        a.await.unwrap().unwrap();
    }
    let mut got = Vec::new();
    for _ in 0..40 {
        got.push(bob.recv_timeout(WAIT).await.unwrap().client_msg_id);
    }
    assert_eq!(got, (1000..1040).collect::<Vec<u64>>(), "in the order sent");
    nothing_more(&bob).await;
}

/// Statuses: audience rules, view receipts once per viewer, and expiry
/// (a short `social.status_ttl_ms` stands in for 24 hours here; the
/// storage test `expired_entries_leave_the_disk_at_compaction` shows the
/// bytes leave the disk under an injected clock).
#[tokio::test]
async fn statuses_respect_the_audience_send_view_receipts_and_expire() {
    let ttl_ms = 2000;
    let server = Server::start(&[("COURIER_SOCIAL_STATUS_TTL_MS", "2000")]);
    let (alice, _) = server.client(1).await;
    let (bob, _) = server.client(2).await;
    let (carol, _) = server.client(3).await;
    let (eve, _) = server.client(5).await;
    alice.contacts(ContactsOp::Add, vec![2, 3]).await.unwrap();
    for c in [&bob, &carol, &eve] {
        c.contacts(ContactsOp::Add, vec![1]).await.unwrap();
    }
    let (id, expires) = alice
        .post_status(Audience::ContactsExcept, vec![3], chat("beach"))
        .await
        .unwrap();
    let (only_id, _) = alice
        .post_status(Audience::Only, vec![3], chat("for carol"))
        .await
        .unwrap();
    let seen = bob.statuses().await.unwrap();
    assert_eq!(seen.len(), 1);
    assert_eq!(
        (
            seen[0].poster,
            seen[0].status_id,
            seen[0].payload.clone(),
            seen[0].expires_at_ms
        ),
        (1, id, chat("beach"), expires)
    );
    let seen = carol.statuses().await.unwrap();
    assert_eq!(
        seen.iter().map(|s| s.status_id).collect::<Vec<_>>(),
        vec![only_id]
    );
    // Eve has alice as a contact, but alice does not have eve.
    assert!(eve.statuses().await.unwrap().is_empty());
    assert_eq!(
        rejected(eve.view_status(1, id).await),
        ErrorCode::NO_SUCH_STATUS
    );
    assert_eq!(
        rejected(carol.view_status(1, id).await),
        ErrorCode::NO_SUCH_STATUS
    );

    bob.view_status(1, id).await.unwrap();
    bob.view_status(1, id).await.unwrap();
    let r = receipt(&alice.recv_timeout(WAIT).await.unwrap());
    assert_eq!(
        (r.status, r.reader, r.messages),
        (ReceiptStatus::Viewed, 2, vec![(id, id)])
    );
    nothing_more(&alice).await;

    tokio::time::sleep(Duration::from_millis(ttl_ms + 200)).await;
    assert!(bob.statuses().await.unwrap().is_empty(), "expired");
    assert!(carol.statuses().await.unwrap().is_empty(), "expired");
    assert_eq!(
        rejected(bob.view_status(1, id).await),
        ErrorCode::NO_SUCH_STATUS
    );
}

#[tokio::test]
async fn fan_out_state_survives_a_restart() {
    let mut server = start(REFS);
    let (alice, _) = server.client(1).await;
    let g = alice.create_group(vec![2]).await.unwrap().group;
    alice.contacts(ContactsOp::Add, vec![2]).await.unwrap();
    let ack = alice
        .send(Destination::Group(g), MessageKind::Chat, chat("before"))
        .await
        .unwrap();
    drop(alice);
    server.kill();
    server.restart();
    let (bob, _) = server.client(2).await;
    let ds: Vec<Delivery> = vec![next(&bob).await, next(&bob).await];
    assert_eq!(ds[1].message.server_msg_id, ack.server_msg_id);
    let info = bob.group(GroupOp::Info, g, vec![]).await.unwrap();
    assert_eq!(info.head_seq, 2);
    let (alice, _) = server.client(1).await;
    assert_eq!(
        alice.contacts(ContactsOp::Get, vec![]).await.unwrap(),
        vec![2]
    );
}

/// A receipt, once the node has stored it, survives a SIGKILL like any
/// message: the sender, offline during the crash, gets it after restart.
#[tokio::test]
async fn receipts_survive_a_crash() {
    let mut server = Server::start(&[]);
    let (alice, _) = server.client(1).await;
    let (bob, _) = server.client(2).await;
    let ack = alice
        .send(Destination::User(2), MessageKind::Chat, chat("m"))
        .await
        .unwrap();
    drop(alice);
    let m = bob.recv_timeout(WAIT).await.unwrap();
    bob.mark_read(m.seq).await.unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    while server.metric("courier_receipts_stored_total").await < 1 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "receipt never stored"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(bob);
    server.kill();
    server.restart();
    let (alice, _) = server.resume(1, 0).await;
    let r = receipt(&alice.recv_timeout(WAIT).await.unwrap());
    assert_eq!(
        (r.status, r.reader, r.messages),
        (
            ReceiptStatus::Read,
            2,
            vec![(ack.client_msg_id, ack.server_msg_id)]
        )
    );
    nothing_more(&alice).await;
}

/// A member who goes away in the middle of reading a group's log back is a
/// client leaving, not a storage failure: nothing is logged as a storage
/// error, the storage-error counter stays at zero, and the member can still
/// read everything afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leaving_during_group_catch_up_is_not_a_storage_error() {
    let server = start(LOG);
    let alice = std::sync::Arc::new(server.client(1).await.0);
    let g = alice.create_group(vec![2]).await.unwrap().group;
    let body = chat(vec![b'x'; 4000]);
    let mut sends = Vec::new();
    for _ in 0..1500 {
        let id = alice.new_client_msg_id();
        let send = alice.start_send(id, Destination::Group(g), MessageKind::Chat, body.clone());
        sends.push(send.unwrap());
    }
    for s in sends {
        s.await.unwrap();
    }
    let token = server.token(2, 1, u32::MAX as u64);
    for _ in 0..10 {
        let mut raw = Raw::connect(&server.addr).await;
        raw.send(&Raw::hello(2, &token)).await;
        // The welcome, then the first group messages of ~6 MB: leave
        // with the rest unread (the kernel answers the node's next writes
        // with a reset).
        for _ in 0..3 {
            raw.next().await.expect("a frame");
        }
        drop(raw);
    }
    // Everything is still there for a member who stays.
    let (bob, _) = server.client(2).await;
    let mut got = 0;
    while got < 1501 {
        let d = bob.next_timeout(WAIT).await.expect("the whole log");
        got += 1;
        if got % 256 == 0 {
            bob.confirm(&d).await.unwrap();
        }
    }
    assert_eq!(
        server.metric("courier_catch_up_storage_errors_total").await,
        0
    );
    let storage = server.logged("storage");
    assert!(storage.is_empty(), "logged as storage errors: {storage:?}");
}

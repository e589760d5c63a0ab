//! The shard core on the in-memory store.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use courier_protocol::{Destination, ErrorCode, MessageKind, ReceiptStatus, SendResult};
use courier_storage::{
    Clock, IdempotencyKey, InboxStore, MemoryStore, NewMessage, Record, StoreConfig,
};
use tokio::sync::{mpsc, oneshot, Notify};

use super::core::{PeerQueue, Shard, ShardConfig};
use super::handle::Shards;
use super::messages::{
    Completion, Delivery, MarkCmd, RegisterCmd, Reply, ReplyTo, SendCmd, SessionHandle, ShardCmd,
};
use crate::metrics::ShardMetrics;

fn send(i: u64, reply: &mpsc::UnboundedSender<Reply>) -> ShardCmd {
    ShardCmd::Send(SendCmd {
        sender: 1,
        sender_device: 1,
        recipient: 2,
        client_msg_id: i,
        destination: Destination::User(2),
        scope: 0,
        kind: MessageKind::Chat,
        payload: Bytes::from_static(b"x"),
        done: Completion::Reply(ReplyTo {
            tx: reply.clone(),
            request_id: i as u32,
            index: None,
        }),
        accepted: Instant::now(),
    })
}

fn inbox_seq(d: Delivery) -> u64 {
    match d {
        Delivery::Inbox(m) => m.seq,
        Delivery::Group(..) => panic!("expected an inbox delivery"),
    }
}

async fn result(rx: &mut mpsc::UnboundedReceiver<Reply>) -> SendResult {
    match rx.recv().await.expect("a reply") {
        Reply::SendResult { result, .. } => result,
        _ => panic!("expected a send result"),
    }
}

/// The shard core on the in-memory store: acks follow the store's
/// outcome, pushes follow acks, and a full session queue demotes the
/// session instead of blocking or dropping anything from the inbox.
/// An ack reads back only the messages it newly covers (for their
/// receipts): 300 acks of one message each read about 300 messages, not
/// the inbox again each time.
#[tokio::test]
async fn acks_read_only_what_they_newly_cover() {
    let mem = Arc::new(MemoryStore::new(StoreConfig::default()));
    let store: Arc<dyn InboxStore> = mem.clone();
    let shards = Shards::start(1, ShardConfig::for_tests(), store).unwrap();
    let (rtx, mut rrx) = mpsc::unbounded_channel();
    for i in 1..=300 {
        assert!(shards.send(2, send(i, &rtx)).await);
    }
    for _ in 1..=300 {
        result(&mut rrx).await;
    }
    let before = mem.messages_read();
    for seq in 1..=300 {
        let mark = ShardCmd::Mark(MarkCmd {
            user: 2,
            stream: 0,
            up_to_seq: seq,
            status: ReceiptStatus::Delivered,
        });
        assert!(shards.send(2, mark).await);
    }
    // The shard's queue is in order: once this send is answered, every
    // mark before it was applied.
    assert!(shards.send(2, send(1000, &rtx)).await);
    result(&mut rrx).await;
    let read = mem.messages_read() - before;
    assert!(
        read <= 600,
        "{read} messages read for 300 acks of one message each"
    );
}

#[tokio::test]
async fn acks_pushes_duplicates_and_demotion() {
    let store: Arc<dyn InboxStore> = Arc::new(MemoryStore::new(StoreConfig::default()));
    let shards = Shards::start(2, ShardConfig::for_tests(), store.clone()).unwrap();
    let (dtx, mut drx) = mpsc::channel(2);
    let session = Arc::new(SessionHandle {
        id: 1,
        deliveries: dtx,
        lagging: AtomicBool::new(false),
        wake: Notify::new(),
    });
    let (stx, srx) = oneshot::channel();
    let cmd = ShardCmd::Register(RegisterCmd {
        user: 2,
        session: session.clone(),
        state: stx,
    });
    assert!(shards.send(2, cmd).await);
    assert_eq!(srx.await.unwrap().unwrap().head_seq, 0);

    let (rtx, mut rrx) = mpsc::unbounded_channel();
    for i in 1..=5 {
        assert!(shards.send(2, send(i, &rtx)).await);
    }
    for i in 1..=5 {
        let r = result(&mut rrx).await;
        assert_eq!((r.code, r.seq, r.duplicate), (ErrorCode::OK, i, false));
    }
    // A queue of two: two pushed, the third demoted the session, the
    // rest were not offered to it.
    assert_eq!(inbox_seq(drx.recv().await.unwrap().0), 1);
    assert_eq!(inbox_seq(drx.recv().await.unwrap().0), 2);
    assert!(drx.try_recv().is_err());
    assert!(session.lagging.load(Ordering::SeqCst));
    assert_eq!(shards.stats.demotions.get(), 1);
    assert_eq!(store.read_after(2, 0, 10).unwrap().len(), 5, "all stored");

    // A retry answers with the original placement and stores nothing.
    assert!(shards.send(2, send(3, &rtx)).await);
    let r = result(&mut rrx).await;
    assert_eq!((r.seq, r.duplicate), (3, true));
    assert_eq!(store.state(2).unwrap().head_seq, 5);

    // Acks reach the store; with zero retention the tick trims them.
    assert!(
        shards
            .send(
                2,
                ShardCmd::Mark(MarkCmd {
                    user: 2,
                    stream: 0,
                    up_to_seq: 4,
                    status: ReceiptStatus::Delivered,
                })
            )
            .await
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while store.state(2).unwrap().oldest_seq != 5 {
        assert!(tokio::time::Instant::now() < deadline, "never trimmed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    shards.stop().await;
    assert!(
        !shards.send(2, send(9, &rtx)).await,
        "stopped shards refuse work"
    );
}

#[test]
fn ids_are_unique_and_timestamps_monotonic_within_a_shard() {
    let store: Arc<dyn InboxStore> = Arc::new(MemoryStore::new(StoreConfig::default()));
    let (_tx, rx) = mpsc::channel(1);
    let (ptx, prx) = mpsc::unbounded_channel();
    let config = ShardConfig::for_tests();
    let stats = Arc::new(ShardMetrics::new(4));
    let peer = PeerQueue {
        tx: ptx,
        pushed: stats.queue_pushed[0].clone(),
    };
    let mut shard = Shard::new(3, rx, prx, vec![peer].into(), store, stats, &config);
    let mut seen = HashSet::new();
    let mut last_ts = 0;
    for _ in 0..5000 {
        let (ts, id) = shard.next_ids();
        assert!(ts >= last_ts);
        assert!(seen.insert(id), "duplicate id {id}");
        assert_eq!((id >> 10) & 0x3f, 3, "shard bits");
        last_ts = ts;
    }
}

/// A crash after a group message reached the group log but before every
/// member's reference was written: at start the owning shard fans it
/// out again, and members who already had it get no second copy.
#[tokio::test]
async fn interrupted_reference_fan_out_is_completed_at_start() {
    use crate::state::ids::NONE;
    use crate::state::keys;
    use crate::state::rows::{FanMark, GroupState, Member};
    use courier_protocol::{Role, Strategy, GROUP_ID_BIT};
    use courier_storage::{KvOp, LogRef};
    let store: Arc<dyn InboxStore> = Arc::new(MemoryStore::new(StoreConfig::default()));
    let g = GROUP_ID_BIT | 77;
    // Joined before both messages (a real group's creation event would
    // be at sequence 1; it does not matter here).
    let member = |user| Member {
        user,
        role: Role::Member,
        joined_seq: 0,
    };
    let state = GroupState {
        strategy: Strategy::Refs,
        log_from: NONE,
        members: vec![member(10), member(11), member(12)],
    };
    let record = |seq: u64| Record {
        server_msg_id: 100 + seq,
        sender: 10,
        sender_device: 1,
        client_msg_id: seq,
        timestamp_ms: 5,
        dest_tag: 2,
        dest_id: g,
        kind: MessageKind::Chat as u8,
        payload: Bytes::from_static(b"m"),
    };
    let entry = |seq: u64| NewMessage {
        inbox: g,
        idempotency: None,
        reference: None,
        record: record(seq),
    };
    // Two messages in the log (seq 1 and 2); the fan-out mark says none
    // is complete; member 11 already has the first reference.
    store
        .append_with(
            &[entry(1), entry(2)],
            &[
                KvOp::Put {
                    key: keys::group(g),
                    value: state.encode(),
                },
                KvOp::Put {
                    key: keys::fanned(g),
                    value: FanMark(0).encode(),
                },
            ],
            Clock::system().now_ms(),
        )
        .unwrap();
    store
        .append(
            &[NewMessage {
                inbox: 11,
                idempotency: Some(IdempotencyKey {
                    sender: g,
                    client_msg_id: 1,
                    scope: 11,
                }),
                reference: Some(LogRef { log: g, seq: 1 }),
                record: record(1),
            }],
            Clock::system().now_ms(),
        )
        .unwrap();
    let shards = Shards::start(2, ShardConfig::for_tests(), store.clone()).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let heads: Vec<u64> = [11, 12]
            .iter()
            .map(|&u| store.state(u).unwrap().head_seq)
            .collect();
        if heads == [2, 2] {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not recovered: {heads:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for u in [11, 12] {
        let got: Vec<u64> = store
            .read_after(u, 0, 10)
            .unwrap()
            .iter()
            .map(|m| m.record.client_msg_id)
            .collect();
        assert_eq!(got, vec![1, 2], "member {u}: both messages once, in order");
    }
    assert_eq!(store.state(10).unwrap().head_seq, 0, "not to the sender");
    shards.stop().await;
    let mark = store.get(&keys::fanned(g)).unwrap().unwrap();
    assert_eq!(FanMark::decode(&mark), FanMark(2), "completion recorded");
}

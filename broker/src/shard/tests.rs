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
use crate::mailbox;
use crate::metrics::ShardMetrics;

fn send(i: u64, reply: &mailbox::Sender<Reply>) -> ShardCmd {
    ShardCmd::Send(SendCmd {
        sender: 1,
        sender_device: 1,
        recipient: 2,
        client_msg_id: i,
        destination: Destination::User(2),
        scope: 0,
        kind: MessageKind::Chat,
        payload: Bytes::from_static(b"x"),
        covers_seq: 0,
        done: Completion::Reply(ReplyTo::new(reply.clone(), i as u32, None)),
        accepted: Instant::now(),
    })
}

fn inbox_seq(d: Delivery) -> u64 {
    match d {
        Delivery::Inbox(m) => m.seq,
        Delivery::Group(..) | Delivery::Fact(_) => panic!("expected an inbox delivery"),
    }
}

async fn result(rx: &mut mailbox::Receiver<Reply>) -> SendResult {
    match rx.recv().await.expect("a reply") {
        Reply::SendResult { result, .. } => result,
        _ => panic!("expected a send result"),
    }
}

/// A session of `user` registered on its shard, and the inbox state the
/// shard answered with.
async fn register(
    shards: &Shards,
    user: u64,
    deliveries: mailbox::Sender<(Delivery, Instant)>,
) -> (Arc<SessionHandle>, courier_storage::InboxState) {
    let (session, answer) = try_register(shards, user, deliveries).await;
    (session, answer.unwrap())
}

/// A session of `user` offered to its shard, and the shard's answer.
async fn try_register(
    shards: &Shards,
    user: u64,
    deliveries: mailbox::Sender<(Delivery, Instant)>,
) -> (
    Arc<SessionHandle>,
    Result<courier_storage::InboxState, crate::error::BrokerError>,
) {
    let session = Arc::new(SessionHandle {
        id: 1,
        deliveries,
        lagging: AtomicBool::new(false),
        wake: Notify::new(),
        moved: AtomicBool::new(false),
    });
    let (stx, srx) = oneshot::channel();
    let cmd = ShardCmd::Register(RegisterCmd {
        user,
        facts: false,
        session: session.clone(),
        state: stx,
    });
    assert!(shards.send(user, cmd).await);
    (session, srx.await.unwrap())
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
    let (rtx, mut rrx) = mailbox::unbounded();
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
    let (dtx, mut drx) = mailbox::bounded(2);
    let (session, state) = register(&shards, 2, dtx).await;
    assert_eq!(state.head_seq, 0);

    let (rtx, mut rrx) = mailbox::unbounded();
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
    use courier_storage::{Form, KvOp, LogRef};
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
        form: Form::Record,
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
                form: Form::Reference(LogRef { log: g, seq: 1 }),
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

/// One write the store carried out, in order: replaying a prefix of them
/// gives the state a crash right after that write leaves behind (kill -9
/// keeps every write that returned; the store's log is replayed in order).
#[derive(Clone)]
enum Write {
    Append(Vec<NewMessage>, Vec<courier_storage::KvOp>, u64),
    Lazy(Vec<courier_storage::KvOp>),
    Ack(u64, u64),
    Trim(u64, u64),
    Erase(u64, Vec<u64>, u8),
}

impl Write {
    fn apply(&self, store: &dyn InboxStore) {
        match self {
            Write::Append(m, kv, now) => drop(store.append_with(m, kv, *now).unwrap()),
            Write::Lazy(kv) => store.write_lazy(kv).unwrap(),
            Write::Ack(inbox, seq) => drop(store.ack(*inbox, *seq).unwrap()),
            Write::Erase(inbox, seqs, kind) => drop(store.erase(*inbox, seqs, *kind).unwrap()),
            Write::Trim(inbox, older) => drop(store.trim_acked(*inbox, *older).unwrap()),
        }
    }
}

/// The in-memory store, remembering every write in the order it was made.
struct Recording {
    inner: MemoryStore,
    log: std::sync::Mutex<Vec<Write>>,
}

impl Recording {
    fn record<T>(&self, w: Write, f: impl FnOnce(&MemoryStore) -> T) -> T {
        // One lock around the write and its record: the log's order is the
        // order the writes were applied in.
        let mut log = self.log.lock().unwrap();
        let out = f(&self.inner);
        log.push(w);
        out
    }
}

impl InboxStore for Recording {
    fn append_with(
        &self,
        batch: &[NewMessage],
        kv: &[courier_storage::KvOp],
        now_ms: u64,
    ) -> Result<Vec<courier_storage::AppendOutcome>, courier_storage::StoreError> {
        let w = Write::Append(batch.to_vec(), kv.to_vec(), now_ms);
        self.record(w, |s| s.append_with(batch, kv, now_ms))
    }
    fn write_lazy(&self, kv: &[courier_storage::KvOp]) -> Result<(), courier_storage::StoreError> {
        self.record(Write::Lazy(kv.to_vec()), |s| s.write_lazy(kv))
    }
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, courier_storage::StoreError> {
        self.inner.get(key)
    }
    fn scan(
        &self,
        prefix: &[u8],
        limit: usize,
    ) -> Result<courier_storage::KvPairs, courier_storage::StoreError> {
        self.inner.scan(prefix, limit)
    }
    fn scan_expiring(
        &self,
        prefix: &[u8],
        now_ms: u64,
        limit: usize,
    ) -> Result<courier_storage::ExpiringEntries, courier_storage::StoreError> {
        self.inner.scan_expiring(prefix, now_ms, limit)
    }
    fn read_after(
        &self,
        inbox: u64,
        after_seq: u64,
        limit: usize,
    ) -> Result<Vec<courier_storage::StoredMessage>, courier_storage::StoreError> {
        self.inner.read_after(inbox, after_seq, limit)
    }
    fn state(
        &self,
        inbox: u64,
    ) -> Result<courier_storage::InboxState, courier_storage::StoreError> {
        self.inner.state(inbox)
    }
    fn ack(
        &self,
        inbox: u64,
        up_to_seq: u64,
    ) -> Result<courier_storage::InboxState, courier_storage::StoreError> {
        self.record(Write::Ack(inbox, up_to_seq), |s| s.ack(inbox, up_to_seq))
    }
    fn trim_acked(
        &self,
        inbox: u64,
        older_than_ms: u64,
    ) -> Result<courier_storage::InboxState, courier_storage::StoreError> {
        let w = Write::Trim(inbox, older_than_ms);
        self.record(w, |s| s.trim_acked(inbox, older_than_ms))
    }
    fn erase(
        &self,
        inbox: u64,
        seqs: &[u64],
        kind: u8,
    ) -> Result<usize, courier_storage::StoreError> {
        let w = Write::Erase(inbox, seqs.to_vec(), kind);
        self.record(w, |s| s.erase(inbox, seqs, kind))
    }
    fn sync(&self) -> Result<(), courier_storage::StoreError> {
        Ok(())
    }
}

/// Senders 1 and 3 each sent chat messages 1..=PER_SENDER to reader 2.
const PER_SENDER: u64 = 6;

fn chat_to_2(sender: u64, i: u64, reply: &mailbox::Sender<Reply>) -> ShardCmd {
    let ShardCmd::Send(mut s) = send(i, reply) else {
        unreachable!()
    };
    s.sender = sender;
    ShardCmd::Send(s)
}

fn mark_2(up_to_seq: u64, status: ReceiptStatus) -> ShardCmd {
    ShardCmd::Mark(MarkCmd {
        user: 2,
        stream: 0,
        up_to_seq,
        status,
    })
}

/// How many receipts of each (client message id, status) sender `s` holds.
fn receipts_at(store: &dyn InboxStore, s: u64) -> std::collections::BTreeMap<(u64, u8), usize> {
    let mut counts = std::collections::BTreeMap::new();
    for m in store.read_after(s, 0, 10_000).unwrap() {
        assert_eq!(m.record.kind, MessageKind::Receipt as u8);
        let r = courier_protocol::ReceiptPayload::decode(&m.record.payload).unwrap();
        assert_eq!(r.reader, 2);
        for (client_id, _) in r.messages {
            *counts.entry((client_id, r.status as u8)).or_insert(0) += 1;
        }
    }
    counts
}

/// How many messages of sender `s` reader 2's inbox holds (ids 1..=n).
fn sent_by(store: &dyn InboxStore, s: u64) -> u64 {
    store
        .read_after(2, 0, 100)
        .unwrap()
        .iter()
        .filter(|m| m.record.sender == s)
        .count() as u64
}

/// Waits until every message in reader 2's inbox has its read receipt at
/// its sender and no more receipts arrive for a moment.
async fn receipts_settle(store: &dyn InboxStore, what: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut last = (0, 0);
    loop {
        let (a, b) = (receipts_at(store, 1), receipts_at(store, 3));
        let all_read = [(1, &a), (3, &b)].iter().all(|(s, c)| {
            (1..=sent_by(store, *s)).all(|i| c.contains_key(&(i, ReceiptStatus::Read as u8)))
        });
        let now = (a.values().sum(), b.values().sum());
        if all_read && now == last {
            return;
        }
        last = now;
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: receipts did not settle: {a:?} {b:?}"
        );
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
}

/// A reader marks its inbox in increasing steps while its receipts travel
/// to two senders on two shards. For every write of that run, a crash
/// right after it is replayed (a fresh store with the writes up to there),
/// the node starts again and the reader marks everything read: each sender
/// then holds exactly one read receipt per message and at most one
/// delivered receipt, never two, and none is missing. The second run has
/// three of the reader's own messages in the middle of its inbox and a
/// delivered mark that covers only them: a mark that owes nothing, which
/// moves the reader's `R` row in the shard's memory only, so a crash loses
/// that move and the next mark reads the range back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receipts_reach_each_sender_once_whatever_write_a_crash_follows() {
    use ReceiptStatus::{Delivered, Read};
    let chats_only = [
        (2, Read),
        (5, Delivered),
        (7, Read),
        (9, Delivered),
        (10, Read),
        (12, Read),
    ];
    crash_after_every_write(None, &chats_only).await;
    // Chats 1..=6 (seq 1..=6), the reader's own 7..=9, chats 10..=15.
    let own_in_the_middle = [
        (2, Read),
        (6, Delivered),
        (9, Delivered),
        (11, Delivered),
        (13, Read),
        (15, Read),
    ];
    crash_after_every_write(Some(3), &own_in_the_middle).await;
}

/// The run of the test above: senders 1 and 3 send reader 2 their chats in
/// turn, with three of the reader's own messages after round `own_after`;
/// the reader marks `steps`; then a crash after each write is replayed.
async fn crash_after_every_write(own_after: Option<u64>, steps: &[(u64, ReceiptStatus)]) {
    let rec = Arc::new(Recording {
        inner: MemoryStore::new(StoreConfig::default()),
        log: Default::default(),
    });
    let store: Arc<dyn InboxStore> = rec.clone();
    // The reader's messages stay (the tests' default trims them on ack):
    // the checks below count each sender's messages in its inbox, and a
    // trimmed inbox would leave nothing to check.
    let config = || ShardConfig {
        acked_retention_ms: 3_600_000,
        ..ShardConfig::for_tests()
    };
    let shards = Shards::start(2, config(), store.clone()).unwrap();
    let (rtx, mut rrx) = mailbox::unbounded();
    for i in 1..=PER_SENDER {
        for s in [1, 3] {
            assert!(shards.send(2, chat_to_2(s, i, &rtx)).await);
            assert_eq!(result(&mut rrx).await.code, ErrorCode::OK);
        }
        if own_after == Some(i) {
            for own in 100..103 {
                assert!(shards.send(2, chat_to_2(2, own, &rtx)).await);
                assert_eq!(result(&mut rrx).await.code, ErrorCode::OK);
            }
        }
    }
    for &(seq, status) in steps {
        assert!(shards.send(2, mark_2(seq, status)).await);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    receipts_settle(&*store, "first run").await;
    shards.stop().await;

    let log = rec.log.lock().unwrap().clone();
    assert!(log.len() > 10, "only {} writes recorded", log.len());
    for cut in 0..=log.len() {
        let after: Arc<dyn InboxStore> = Arc::new(MemoryStore::new(StoreConfig::default()));
        for w in &log[..cut] {
            w.apply(&*after);
        }
        let shards = Shards::start(2, config(), after.clone()).unwrap();
        let head = after.state(2).unwrap().head_seq;
        assert!(shards.send(2, mark_2(head, ReceiptStatus::Read)).await);
        let what = format!(
            "own after {own_after:?}: crash after write {cut} of {}",
            log.len()
        );
        receipts_settle(&*after, &what).await;
        shards.stop().await;
        for s in [1, 3] {
            let counts = receipts_at(&*after, s);
            assert!(
                sent_by(&*after, s) > 0 || cut < 3,
                "{what}: sender {s}'s messages are gone"
            );
            for i in 1..=sent_by(&*after, s) {
                assert_eq!(
                    counts.get(&(i, ReceiptStatus::Read as u8)),
                    Some(&1),
                    "{what}: sender {s} message {i}: read receipts {counts:?}"
                );
            }
            assert!(
                counts.values().all(|&n| n == 1),
                "{what}: sender {s} holds a receipt twice: {counts:?}"
            );
        }
    }
}

/// The receipts in `user`'s inbox: (status, client ids named), in order.
fn receipts_in(store: &dyn InboxStore, user: u64) -> Vec<(u8, Vec<u64>)> {
    store
        .read_after(user, 0, 100)
        .unwrap()
        .into_iter()
        .map(|m| {
            let p = courier_protocol::ReceiptPayload::decode(&m.record.payload).unwrap();
            (p.status as u8, p.messages.iter().map(|x| x.0).collect())
        })
        .collect()
}

/// Marks held for `mark_coalesce` merge into one cursor move per user:
/// three delivered marks and a read mark within the window give the sender
/// one read receipt (for what was read before its delivered mark applied)
/// and one delivered receipt; applied one by one, the same marks give four.
#[tokio::test]
async fn held_marks_merge_into_one_receipt_per_status() {
    for (coalesce, expected) in [
        (
            Duration::from_millis(100),
            vec![(2u8, vec![1, 2]), (1, vec![3])],
        ),
        (
            Duration::ZERO,
            vec![(1, vec![1]), (1, vec![2]), (1, vec![3]), (2, vec![1, 2])],
        ),
    ] {
        let store: Arc<dyn InboxStore> = Arc::new(MemoryStore::new(StoreConfig::default()));
        let config = ShardConfig {
            mark_coalesce: coalesce,
            ..ShardConfig::for_tests()
        };
        let shards = Shards::start(1, config, store.clone()).unwrap();
        let (rtx, mut rrx) = mailbox::unbounded();
        for i in 1..=6 {
            assert!(shards.send(2, send(i, &rtx)).await);
        }
        for _ in 1..=6 {
            assert_eq!(result(&mut rrx).await.code, ErrorCode::OK);
        }
        let mark = |up_to_seq, status| {
            ShardCmd::Mark(MarkCmd {
                user: 2,
                stream: 0,
                up_to_seq,
                status,
            })
        };
        for m in [
            mark(1, ReceiptStatus::Delivered),
            mark(2, ReceiptStatus::Delivered),
            mark(3, ReceiptStatus::Delivered),
            mark(2, ReceiptStatus::Read),
        ] {
            assert!(shards.send(2, m).await);
        }
        // The receipts land in the sender's (user 1's) inbox.
        let deadline = Instant::now() + Duration::from_secs(5);
        let receipts = loop {
            let got = receipts_in(&*store, 1);
            if got.len() >= expected.len() || Instant::now() > deadline {
                break got;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        assert_eq!(receipts, expected, "coalescing {coalesce:?}");
        // Nothing more comes later.
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(store.read_after(1, 0, 100).unwrap().len(), expected.len());
    }
}

/// Marks of what was just stored for an online user are planned from the
/// shard's memory of its recent entries, reading nothing back from the
/// store; an offline user's marks read the store; the receipts are the
/// same either way.
#[tokio::test]
async fn an_online_users_marks_read_nothing_back() {
    for online in [true, false] {
        let mem = Arc::new(MemoryStore::new(StoreConfig::default()));
        let store: Arc<dyn InboxStore> = mem.clone();
        let shards = Shards::start(1, ShardConfig::for_tests(), store.clone()).unwrap();
        let (dtx, _drx) = mailbox::bounded(1024);
        if online {
            register(&shards, 2, dtx).await;
        }
        let (rtx, mut rrx) = mailbox::unbounded();
        for i in 1..=6 {
            assert!(shards.send(2, send(i, &rtx)).await);
        }
        for _ in 1..=6 {
            assert_eq!(result(&mut rrx).await.code, ErrorCode::OK);
        }
        let before = mem.messages_read();
        for (up_to_seq, status) in [
            (3, ReceiptStatus::Delivered),
            (2, ReceiptStatus::Read),
            (6, ReceiptStatus::Delivered),
            (6, ReceiptStatus::Read),
        ] {
            let mark = MarkCmd {
                user: 2,
                stream: 0,
                up_to_seq,
                status,
            };
            assert!(shards.send(2, ShardCmd::Mark(mark)).await);
        }
        // Four receipts land in the sender's inbox.
        let deadline = Instant::now() + Duration::from_secs(5);
        while store.state(1).unwrap().head_seq < 4 {
            assert!(Instant::now() < deadline, "receipts never came");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let read_back = mem.messages_read() - before;
        if online {
            assert_eq!(read_back, 0, "an online user's marks read the store");
        } else {
            assert!(read_back >= 6, "{read_back} messages read");
        }
        assert_eq!(
            receipts_in(&*store, 1),
            [
                (1, vec![1, 2, 3]),
                (2, vec![1, 2]),
                (1, vec![4, 5, 6]),
                (2, vec![3, 4, 5, 6])
            ],
            "online: {online}"
        );
    }
}

/// A new session resumes after every mark its user sent before it, even
/// marks the shard still holds to merge (without it, a client that
/// acknowledged and reconnected within `mark_coalesce` would be sent again
/// what it had acknowledged).
#[tokio::test]
async fn a_new_session_sees_its_users_held_marks() {
    let store: Arc<dyn InboxStore> = Arc::new(MemoryStore::new(StoreConfig::default()));
    let config = ShardConfig {
        mark_coalesce: Duration::from_secs(3600),
        ..ShardConfig::for_tests()
    };
    let shards = Shards::start(1, config, store.clone()).unwrap();
    let (rtx, mut rrx) = mailbox::unbounded();
    for i in 1..=3 {
        assert!(shards.send(2, send(i, &rtx)).await);
        assert_eq!(result(&mut rrx).await.code, ErrorCode::OK);
    }
    let mark = MarkCmd {
        user: 2,
        stream: 0,
        up_to_seq: 2,
        status: ReceiptStatus::Delivered,
    };
    assert!(shards.send(2, ShardCmd::Mark(mark)).await);
    let (dtx, _drx) = mailbox::bounded(16);
    let (_, state) = register(&shards, 2, dtx).await;
    assert_eq!((state.head_seq, state.acked_seq), (3, 2));
}

/// A cluster node's router, as far as a group's fan-out asks it: every
/// member is here, and shards are moving or not as the test says.
struct MovingRemote(AtomicBool);

impl super::core::Remote for MovingRemote {
    fn divert(&self, _key: u64, cmd: ShardCmd) -> Option<ShardCmd> {
        Some(cmd)
    }
    fn here(&self, _id: u64) -> bool {
        true
    }
    fn split_here(&self, ids: Vec<u64>) -> (Vec<u64>, Vec<u64>) {
        (ids, Vec::new())
    }
    fn shards_moving(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
    fn count_elsewhere(
        &self,
        _counts: courier_protocol::ReceiptCounts,
        _members: Vec<u64>,
        _answer: super::messages::Answer<courier_protocol::ReceiptCounts>,
    ) {
        unreachable!("no receipt counts here")
    }
    fn refused_here(&self, _line: crate::cluster::order::Key, _id: u64) {}
}

/// While shards move, a group's entries fan out one at a time: a later
/// entry waits (its sender's answer too) until the one before it is
/// stored for every member, so a part refused by a pause is retried
/// before anything after it can reach the member elsewhere. Outside
/// moves they are pipelined.
#[test]
fn while_shards_move_a_groups_fan_outs_go_one_at_a_time() {
    use super::messages::GroupReply;
    use courier_protocol::Message;

    let store: Arc<dyn InboxStore> = Arc::new(MemoryStore::new(StoreConfig::default()));
    let (_tx, rx) = mpsc::channel(1);
    let (ptx, mut prx) = mpsc::unbounded_channel();
    let stats = Arc::new(ShardMetrics::new(1));
    let peer = PeerQueue {
        tx: ptx,
        pushed: stats.queue_pushed[0].clone(),
    };
    let config = ShardConfig::for_tests();
    let mut shard = Shard::new(0, rx, prx_dummy(), vec![peer].into(), store, stats, &config);
    let remote = Arc::new(MovingRemote(AtomicBool::new(true)));
    let _ = shard.remote.set(remote.clone());
    let g = 77;
    let entry = |seq: u64| {
        Arc::new(Message {
            seq,
            server_msg_id: seq,
            sender: 1,
            sender_device: 1,
            client_msg_id: seq,
            timestamp_ms: seq,
            destination: Destination::Group(g),
            kind: MessageKind::Chat,
            payload: Bytes::from_static(b"x"),
        })
    };
    let answer = |seq: u64| {
        let (tx, rx) = oneshot::channel();
        let result = SendResult {
            client_msg_id: seq,
            code: ErrorCode::OK,
            server_msg_id: seq,
            seq,
            timestamp_ms: seq,
            duplicate: false,
        };
        (Some((GroupReply::Remote(tx), result)), rx)
    };
    let mut sent = || {
        let mut seqs = Vec::new();
        while let Ok(cmd) = prx.try_recv() {
            if let ShardCmd::Refs(r) = cmd {
                seqs.push(r.message.seq);
            }
        }
        seqs
    };

    let (a1, mut r1) = answer(1);
    let (a2, mut r2) = answer(2);
    let (a3, mut r3) = answer(3);
    shard.fan_refs(g, entry(1), vec![10, 11], a1, Instant::now());
    shard.fan_refs(g, entry(2), vec![10, 11], a2, Instant::now());
    shard.fan_refs(g, entry(3), vec![10, 11], a3, Instant::now());
    assert_eq!(sent(), vec![1], "2 and 3 wait for 1");

    // 1 fails (the member's shard paused): nothing after it goes; its
    // sender hears SHARD_UNAVAILABLE, theirs nothing yet.
    shard.refs_done(g, 1, ErrorCode::SHARD_UNAVAILABLE);
    assert_eq!(r1.try_recv().unwrap().code, ErrorCode::SHARD_UNAVAILABLE);
    assert_eq!(sent(), Vec::<u64>::new());
    assert!(r2.try_recv().is_err() && r3.try_recv().is_err());

    // 1's retry (here by hand; the tick re-reads it from the log) is
    // stored: 2 goes, then 3 once 2 is stored; each answer follows its
    // own entry.
    shard.fan_refs(g, entry(1), vec![10, 11], None, Instant::now());
    assert_eq!(sent(), vec![1]);
    shard.refs_done(g, 1, ErrorCode::OK);
    assert_eq!(sent(), vec![2]);
    assert!(r2.try_recv().is_err(), "2 is not stored yet");
    shard.refs_done(g, 2, ErrorCode::OK);
    assert_eq!(r2.try_recv().unwrap().code, ErrorCode::OK);
    assert_eq!(sent(), vec![3]);
    shard.refs_done(g, 3, ErrorCode::OK);
    assert_eq!(r3.try_recv().unwrap().code, ErrorCode::OK);

    // No move: entries are pipelined.
    remote.0.store(false, Ordering::SeqCst);
    for seq in 4..=6 {
        shard.fan_refs(g, entry(seq), vec![10, 11], None, Instant::now());
    }
    assert_eq!(sent(), vec![4, 5, 6]);

    // The group's shard moves away with an entry under way and one held:
    // their senders hear SHARD_UNAVAILABLE at once (and retry at the new
    // owner) rather than waiting for nothing.
    remote.0.store(true, Ordering::SeqCst);
    let (a7, mut r7) = answer(7);
    let (a8, mut r8) = answer(8);
    shard.fan_refs(g, entry(7), vec![10, 11], a7, Instant::now());
    shard.fan_refs(g, entry(8), vec![10, 11], a8, Instant::now());
    let slot = u16::from(courier_storage::slot_of(g));
    shard.slots_changed(super::messages::SlotsChange::Lost(slot..slot + 1));
    assert_eq!(r7.try_recv().unwrap().code, ErrorCode::SHARD_UNAVAILABLE);
    assert_eq!(r8.try_recv().unwrap().code, ErrorCode::SHARD_UNAVAILABLE);
    assert!(shard.fanouts.is_empty());
}

fn prx_dummy() -> mpsc::UnboundedReceiver<ShardCmd> {
    mpsc::unbounded_channel().1
}

/// A store whose slots can stop being served a moment, as a replicated
/// primary's are while it is fenced.
fn slotted_store(dir: &std::path::Path) -> Arc<dyn InboxStore> {
    let config = StoreConfig {
        layout: crate::state::keys::slotted(),
        ..StoreConfig::default()
    };
    Arc::new(courier_storage::RocksStore::open(dir, config).unwrap())
}

fn serve(store: &dyn InboxStore, all: bool) {
    let all_slots = 0..courier_storage::SLOTS as u16;
    let runs: &[std::ops::Range<u16>] = if all {
        std::slice::from_ref(&all_slots)
    } else {
        &[]
    };
    store.transfer().expect("slotted").serve_only(runs);
}

/// Entry `seq` of group 77 for member 2, as the group's node sends it.
fn entry_for_2(seq: u64) -> (ShardCmd, oneshot::Receiver<ErrorCode>) {
    let (tx, rx) = oneshot::channel();
    let message = courier_protocol::Message {
        seq,
        server_msg_id: 1000 + seq,
        sender: 5,
        sender_device: 1,
        client_msg_id: seq,
        timestamp_ms: 1,
        destination: Destination::Group(77),
        kind: MessageKind::Chat,
        payload: Bytes::from_static(b"g"),
    };
    let refs = super::messages::RefsCmd {
        group: 77,
        message: Arc::new(message),
        members: vec![2],
        copy: true,
        report: super::messages::RefsReport::Remote(tx),
        accepted: Instant::now(),
    };
    (ShardCmd::Refs(refs), rx)
}

#[tokio::test]
async fn a_send_refused_while_its_shard_is_not_served_is_not_overtaken_by_the_next() {
    let dir = tempfile::tempdir().unwrap();
    let store = slotted_store(dir.path());
    serve(&*store, true);
    let shards = Shards::start(2, ShardConfig::for_tests(), store.clone()).unwrap();
    let (rtx, mut rrx) = mailbox::unbounded();
    let answer = |i: u64| shards.send(2, send(i, &rtx));
    assert!(answer(1).await);
    assert_eq!(result(&mut rrx).await.code, ErrorCode::OK);

    // Fenced a moment: 2 is refused. Served again: 3, sent before 2's
    // retry, must not be stored ahead of it.
    serve(&*store, false);
    assert!(answer(2).await);
    assert_eq!(result(&mut rrx).await.code, ErrorCode::SHARD_UNAVAILABLE);
    serve(&*store, true);
    assert!(answer(3).await);
    assert_eq!(
        result(&mut rrx).await.code,
        ErrorCode::SHARD_UNAVAILABLE,
        "3 waits for 2's retry"
    );
    assert_eq!(shards.stats.held_in_line.get(), 1);
    assert!(answer(2).await);
    assert_eq!(result(&mut rrx).await.seq, 2);
    assert!(answer(3).await);
    assert_eq!(result(&mut rrx).await.seq, 3);
    assert!(answer(4).await);
    assert_eq!(result(&mut rrx).await.seq, 4, "the line is gone");

    // A group's entries to one member: entry 11 refused, 12 held until
    // 11 is stored.
    serve(&*store, false);
    let (cmd, rx) = entry_for_2(11);
    assert!(shards.send(2, cmd).await);
    assert_eq!(rx.await.unwrap(), ErrorCode::SHARD_UNAVAILABLE);
    serve(&*store, true);
    let (cmd, rx) = entry_for_2(12);
    assert!(shards.send(2, cmd).await);
    assert_eq!(
        rx.await.unwrap(),
        ErrorCode::SHARD_UNAVAILABLE,
        "12 waits for 11"
    );
    for seq in [11, 12] {
        let (cmd, rx) = entry_for_2(seq);
        assert!(shards.send(2, cmd).await);
        assert_eq!(rx.await.unwrap(), ErrorCode::OK);
    }
    let inbox: Vec<(u64, u64)> = store
        .read_after(2, 0, 10)
        .unwrap()
        .into_iter()
        .map(|m| (m.record.sender, m.record.client_msg_id))
        .collect();
    assert_eq!(
        inbox,
        [(1, 1), (1, 2), (1, 3), (1, 4), (5, 11), (5, 12)],
        "in the order sent"
    );
    shards.stop().await;
}

/// Entries a failed write hid show later with no live push of their own
/// (replicated shards): `shown` sends their inboxes' sessions to catch up
/// (lagging, woken), and leaves other users' sessions on live push.
#[tokio::test]
async fn shown_inboxes_send_their_sessions_to_catch_up() {
    let store: Arc<dyn InboxStore> = Arc::new(MemoryStore::new(StoreConfig::default()));
    let shards = Shards::start(2, ShardConfig::for_tests(), store).unwrap();
    let (dtx, _drx) = mailbox::bounded(8);
    let (shown, _) = register(&shards, 2, dtx.clone()).await;
    let (other, _) = register(&shards, 3, dtx).await;
    shards.shown(vec![2, 9]);
    // Woken: the writer would run its catch-up now.
    tokio::time::timeout(std::time::Duration::from_secs(5), shown.wake.notified())
        .await
        .expect("the shown inbox's session is woken");
    assert!(shown.lagging.load(std::sync::atomic::Ordering::SeqCst));
    assert!(!other.lagging.load(std::sync::atomic::Ordering::SeqCst));
}

/// A session that reaches a shard whose slot is not served here (moved
/// away, pausing for a move, fenced) is refused SHARD_UNAVAILABLE with a
/// retry hint instead of welcomed with what this node's store says of an
/// inbox it does not hold (a head of nothing, after the move's deletion,
/// from which a client library would resume); served again, it registers.
#[tokio::test]
async fn a_session_for_a_slot_not_served_here_is_refused_not_welcomed() {
    let dir = tempfile::tempdir().unwrap();
    let store = slotted_store(dir.path());
    serve(&*store, true);
    let shards = Shards::start(1, ShardConfig::for_tests(), store.clone()).unwrap();
    let (rtx, mut rrx) = mailbox::unbounded();
    assert!(shards.send(2, send(1, &rtx)).await);
    assert_eq!(result(&mut rrx).await.seq, 1);

    serve(&*store, false);
    let (dtx, _refused_rx) = mailbox::bounded(8);
    let (_, answer) = try_register(&shards, 2, dtx).await;
    let refused = answer.expect_err("refused where not served");
    assert_eq!(refused.code(), ErrorCode::SHARD_UNAVAILABLE);
    assert!(
        refused.client_message().contains("retry after"),
        "{}",
        refused.client_message()
    );

    serve(&*store, true);
    let (deliveries, _drx) = mailbox::bounded(8);
    let (_session, state) = register(&shards, 2, deliveries).await;
    assert_eq!(state.head_seq, 1);
}

/// Marks that owe nothing (here, of the user's own messages) move the
/// user's `R` row in the shard's memory only, up to `UNWRITTEN_MAX` past
/// the row on disk; a mark past that bound writes it, a mark that moves the
/// read cursor writes it, and a stopping shard writes what its memory
/// moved. A mark's inbox acknowledgement goes in the same write as its row,
/// so the test waits for the acknowledgement and then reads the row.
#[tokio::test]
async fn marks_that_owe_nothing_rewrite_the_receipt_row_only_within_a_bound() {
    use super::receipts::UNWRITTEN_MAX;
    use crate::state::keys;
    use crate::state::rows::{Cursors, ReceiptRow};

    let store: Arc<dyn InboxStore> = Arc::new(MemoryStore::new(StoreConfig::default()));
    let shards = Shards::start(1, ShardConfig::for_tests(), store.clone()).unwrap();
    let (rtx, mut rrx) = mailbox::unbounded();
    let n = UNWRITTEN_MAX + 8;
    for i in 1..=n {
        let ShardCmd::Send(mut s) = send(i, &rtx) else {
            unreachable!()
        };
        s.sender = 2;
        assert!(shards.send(2, ShardCmd::Send(s)).await);
        assert_eq!(result(&mut rrx).await.code, ErrorCode::OK);
    }
    let on_disk = || {
        store
            .get(&keys::receipts(2))
            .unwrap()
            .map(|v| ReceiptRow::decode(&v).cursors)
    };
    let mark_until_acked = |up_to_seq, status| {
        let shards = &shards;
        let store = &store;
        async move {
            assert!(shards.send(2, mark_2(up_to_seq, status)).await);
            let deadline = Instant::now() + Duration::from_secs(5);
            while store.state(2).unwrap().acked_seq < up_to_seq {
                assert!(Instant::now() < deadline, "mark {up_to_seq} never applied");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    };
    for seq in [1, 10, UNWRITTEN_MAX] {
        mark_until_acked(seq, ReceiptStatus::Delivered).await;
    }
    assert_eq!(on_disk(), None, "marks owing nothing wrote the row");
    mark_until_acked(UNWRITTEN_MAX + 1, ReceiptStatus::Delivered).await;
    assert_eq!(
        on_disk(),
        Some(Cursors::new(UNWRITTEN_MAX + 1, 0)),
        "one past the bound is written"
    );
    mark_until_acked(UNWRITTEN_MAX + 2, ReceiptStatus::Delivered).await;
    assert_eq!(on_disk(), Some(Cursors::new(UNWRITTEN_MAX + 1, 0)));
    // Read marks acknowledge nothing new here: wait for the row itself.
    assert!(shards.send(2, mark_2(3, ReceiptStatus::Read)).await);
    let deadline = Instant::now() + Duration::from_secs(5);
    while on_disk() != Some(Cursors::new(UNWRITTEN_MAX + 2, 3)) {
        assert!(
            Instant::now() < deadline,
            "a read cursor's move was not written: {:?}",
            on_disk()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    mark_until_acked(n, ReceiptStatus::Delivered).await;
    assert_eq!(on_disk(), Some(Cursors::new(UNWRITTEN_MAX + 2, 3)));
    shards.stop().await;
    assert_eq!(
        on_disk(),
        Some(Cursors::new(n, 3)),
        "the stopping shard wrote its memory's row"
    );
}

/// A business's long reports are made on the reports thread: when its
/// queue is full, one is refused at once with 503 `busy` (the shard does
/// not wait, nor make it itself), a request for a user who is no business
/// is still answered 404 by the shard, and once the thread is free the
/// same request is answered.
#[tokio::test]
async fn a_full_reports_queue_refuses_a_report_at_once_with_busy() {
    use super::messages::{AdminOp, BusinessAdminCmd};
    use crate::reports::Reports;
    use crate::state::business::Invalid;
    use crate::state::business_events::Period;
    const WAIT: Duration = Duration::from_secs(10);

    let reports = Reports::start(1).unwrap();
    let config = ShardConfig {
        reports: reports.clone(),
        ..ShardConfig::for_tests()
    };
    let store: Arc<dyn InboxStore> = Arc::new(MemoryStore::new(StoreConfig::default()));
    let shards = Shards::start(2, config, store).unwrap();
    let ask = |b: u64, op: AdminOp| {
        let (answer, rx) = oneshot::channel();
        let sent = shards.send(
            b,
            ShardCmd::BusinessAdmin(BusinessAdminCmd {
                business: b,
                op,
                answer,
            }),
        );
        async move {
            assert!(sent.await, "the shard took the request");
            tokio::time::timeout(WAIT, rx)
                .await
                .expect("answered in time")
                .expect("answered")
        }
    };
    let shop = 500;
    let put = AdminOp::Put {
        display_name: Some("Corner Shop".into()),
        profile: None,
    };
    ask(shop, put).await.expect("registered");

    // The thread busy with one report, the queue's one place taken.
    let (gate_tx, gate_rx) = std::sync::mpsc::channel::<()>();
    let (started_tx, started_rx) = std::sync::mpsc::channel::<()>();
    reports.run(move |_| {
        started_tx.send(()).unwrap();
        let _ = gate_rx.recv_timeout(WAIT);
    });
    started_rx
        .recv_timeout(WAIT)
        .expect("the first report started");
    reports.run(|_| {});

    let stats = || AdminOp::Stats {
        period: Period::Day,
    };
    let busy = ask(shop, stats()).await.expect_err("refused");
    assert_eq!((busy.status, busy.code), (503, "busy"), "{busy:?}");
    let none: Invalid = ask(501, stats()).await.expect_err("not a business");
    assert_eq!((none.status, none.code), (404, "not_a_business"));

    gate_tx.send(()).unwrap();
    let made = ask(shop, stats())
        .await
        .expect("made once the thread is free");
    assert_eq!(made["business"], shop);
    assert_eq!(made["period"], "day");
    shards.stop().await;
}

//! Group fan-out through the real shard core on a real RocksDB store: one
//! iteration sends `PIPELINE` messages to a group of N members and waits
//! until every one is acknowledged (for `refs`, that is when every member's
//! reference is durable; for `log`, when the group log entry is). Throughput
//! is counted in deliveries (messages x recipients).
//!
//! `cargo bench --bench fanout -- --warm-up-time 1 --measurement-time 5`

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use courier_broker::shard::handle::Shards;
use courier_broker::shard::messages::{
    GroupOpCmd, GroupReply, GroupSendCmd, Reply, ReplyTo, ShardCmd,
};
use courier_broker::shard::ShardConfig;
use courier_protocol::{ErrorCode, GroupOp, MessageKind};
use courier_storage::{Clock, Durability, RocksStore, StoreConfig};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use tokio::sync::oneshot;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Messages in flight per iteration (a busy group chat's burst).
const PIPELINE: usize = 32;

fn fanout(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let payload = Bytes::from(vec![b'x'; 100]);
    for durability in [Durability::Wal, Durability::Fsync] {
        let mut g = c.benchmark_group(format!("group_send_{durability}"));
        g.sample_size(10);
        for strategy in ["refs", "log"] {
            for members in [10usize, 100, 1024] {
                let dir = tempfile::tempdir().unwrap();
                let clock = Clock::system();
                let store = Arc::new(
                    RocksStore::open(
                        dir.path(),
                        StoreConfig {
                            durability,
                            clock: clock.clone(),
                            ..StoreConfig::default()
                        },
                    )
                    .unwrap(),
                );
                let config = ShardConfig {
                    queue_len: 8192,
                    batch_max: 512,
                    acked_retention_ms: 3_600_000,
                    max_group_members: 1024,
                    max_groups_per_user: 1024,
                    log_threshold: if strategy == "refs" { 100_000 } else { 1 },
                    mark_coalesce: Duration::from_millis(10),
                    clock,
                    business: std::sync::Arc::default(),
                    directory: std::sync::Arc::new(
                        courier_broker::shard::business_state::Directory::new(
                            courier_broker::config::BusinessSettings::default().platform_account,
                        ),
                    ),
                    clicks: None,
                    reports: courier_broker::reports::Reports::start(
                        courier_broker::reports::QUEUE_LEN,
                    )
                    .expect("a reports thread"),
                };
                let shards = Shards::start(2, config, store).unwrap();
                let group = courier_protocol::GROUP_ID_BIT | 1;
                rt.block_on(async {
                    let (tx, rx) = oneshot::channel();
                    shards
                        .send(
                            group,
                            ShardCmd::GroupOp(GroupOpCmd {
                                group,
                                actor: 1,
                                op: GroupOp::Create,
                                users: (2..=members as u64).collect(),
                                answer: tx,
                            }),
                        )
                        .await;
                    rx.await.unwrap().unwrap();
                });
                let (rtx, mut rrx) = courier_broker::mailbox::unbounded();
                let mut next_id = 0u64;
                g.throughput(Throughput::Elements((PIPELINE * (members - 1)) as u64));
                g.bench_function(BenchmarkId::new(strategy, members), |b| {
                    b.iter(|| {
                        rt.block_on(async {
                            for _ in 0..PIPELINE {
                                next_id += 1;
                                let cmd = ShardCmd::GroupSend(GroupSendCmd {
                                    group,
                                    sender: 1,
                                    sender_device: 1,
                                    client_msg_id: next_id,
                                    kind: MessageKind::Chat,
                                    payload: payload.clone(),
                                    reply: GroupReply::Session(ReplyTo::new(rtx.clone(), 0, None)),
                                    accepted: std::time::Instant::now(),
                                });
                                shards.send(group, cmd).await;
                            }
                            for _ in 0..PIPELINE {
                                match rrx.recv().await {
                                    Some(Reply::SendResult { result, .. }) => {
                                        assert_eq!(result.code, ErrorCode::OK)
                                    }
                                    _ => panic!("expected a send result"),
                                }
                            }
                        })
                    })
                });
                rt.block_on(shards.stop());
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        g.finish();
    }
}

criterion_group!(benches, fanout);
criterion_main!(benches);

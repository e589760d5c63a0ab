//! RocksDB inbox store: batch append in both durability modes, and reads.
//!
//! `cargo bench -p courier-benches --bench storage`
//!
//! Each iteration appends one batch of `n` 100-byte messages spread over
//! 1,000 inboxes (as a shard's drained queue looks under load), in one write.
//! In `fsync` mode every batch pays one WAL sync: the batch size is what
//! amortises it (group commit).

use bytes::Bytes;
use courier_storage::*;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn batch(start: u64, n: usize, payload: &Bytes) -> Vec<NewMessage> {
    (0..n as u64)
        .map(|i| {
            let id = start + i;
            NewMessage {
                inbox: id % 1000 + 1,
                idempotency: Some(IdempotencyKey::new(7, id)),
                form: Form::Record,
                record: Record {
                    server_msg_id: id,
                    sender: 7,
                    sender_device: 1,
                    client_msg_id: id,
                    timestamp_ms: 1_700_000_000_000,
                    dest_tag: 1,
                    dest_id: id % 1000 + 1,
                    kind: 1,
                    payload: payload.clone(),
                },
            }
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let payload = Bytes::from(vec![b'x'; 100]);
    for durability in [Durability::Wal, Durability::Fsync] {
        let mut g = c.benchmark_group(format!("append_{durability}"));
        if durability == Durability::Fsync {
            g.sample_size(20);
        }
        for n in [1usize, 64, 512] {
            let dir = tempfile::tempdir().unwrap();
            let store = RocksStore::open(
                dir.path(),
                StoreConfig {
                    durability,
                    ..StoreConfig::default()
                },
            )
            .unwrap();
            let mut next = 0u64;
            g.throughput(Throughput::Elements(n as u64));
            g.bench_function(BenchmarkId::from_parameter(n), |b| {
                b.iter(|| {
                    let msgs = batch(next, n, &payload);
                    next += n as u64;
                    store.append(&msgs, 1_700_000_000_000).unwrap()
                })
            });
        }
        g.finish();
    }

    let dir = tempfile::tempdir().unwrap();
    let store = RocksStore::open(
        dir.path(),
        StoreConfig {
            durability: Durability::Wal,
            ..StoreConfig::default()
        },
    )
    .unwrap();
    for start in (0..100_000).step_by(500) {
        store
            .append(&batch(start, 500, &payload), 1_700_000_000_000)
            .unwrap();
    }
    let mut g = c.benchmark_group("read_after");
    g.throughput(Throughput::Elements(100));
    let mut inbox = 0;
    g.bench_function("100_of_100", |b| {
        b.iter(|| {
            inbox = inbox % 1000 + 1;
            store.read_after(inbox, 0, 100).unwrap()
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);

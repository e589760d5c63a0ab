//! The hand-off between threads that a shard's input is: many producers
//! (session tasks on the io threads) queue small commands, one consumer
//! (the shard) drains them in batches. Today's queues are tokio's `mpsc`
//! (bounded for sessions, unbounded between shards), whose consumer is a
//! task that awaits; crossbeam's channels are the alternative the design
//! names, whose consumer is a thread that blocks. Each iteration moves
//! `ITEMS` 64-byte commands from `PRODUCERS` producers to one consumer that
//! drains up to `BATCH` at a time, as the shard loop does.
//!
//! `cargo bench --bench queues -- --warm-up-time 1 --measurement-time 5`

use std::thread;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const ITEMS: usize = 100_000;
const PRODUCERS: usize = 2;
/// A shard's queue bound (`limits.shard_queue_len`) and batch
/// (`limits.shard_batch_max`).
const BOUND: usize = 8192;
const BATCH: usize = 512;

/// A command's size on the queue (a `ShardCmd` is about this large).
#[derive(Clone, Copy)]
struct Cmd([u64; 8]);

fn queues(c: &mut Criterion) {
    let mut g = c.benchmark_group("shard_input");
    g.throughput(Throughput::Elements(ITEMS as u64));
    g.sample_size(20);
    let per = ITEMS / PRODUCERS;

    // Producers and consumer are tasks on a two-thread runtime (the node's
    // shape: sessions and shards share the runtime's threads).
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .unwrap();
    g.bench_function("tokio_mpsc_bounded", |b| {
        b.iter(|| {
            rt.block_on(async {
                let (tx, mut rx) = tokio::sync::mpsc::channel::<Cmd>(BOUND);
                for p in 0..PRODUCERS {
                    let tx = tx.clone();
                    tokio::spawn(async move {
                        for i in 0..per {
                            tx.send(Cmd([(p * per + i) as u64; 8])).await.unwrap();
                        }
                    });
                }
                drop(tx);
                let consumer = tokio::spawn(async move {
                    let (mut n, mut sum) = (0, 0u64);
                    let mut batch = Vec::with_capacity(BATCH);
                    while rx.recv_many(&mut batch, BATCH).await > 0 {
                        n += batch.len();
                        sum += batch.iter().map(|c| c.0[0]).sum::<u64>();
                        batch.clear();
                    }
                    (n, sum)
                });
                assert_eq!(consumer.await.unwrap().0, ITEMS);
            })
        })
    });
    g.bench_function("tokio_mpsc_unbounded", |b| {
        b.iter(|| {
            rt.block_on(async {
                let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Cmd>();
                for p in 0..PRODUCERS {
                    let tx = tx.clone();
                    tokio::spawn(async move {
                        for i in 0..per {
                            tx.send(Cmd([(p * per + i) as u64; 8])).unwrap();
                        }
                    });
                }
                drop(tx);
                let consumer = tokio::spawn(async move {
                    let mut n = 0;
                    let mut batch = Vec::with_capacity(BATCH);
                    while rx.recv_many(&mut batch, BATCH).await > 0 {
                        n += batch.len();
                        batch.clear();
                    }
                    n
                });
                assert_eq!(consumer.await.unwrap(), ITEMS);
            })
        })
    });
    // Producers and consumer are threads that block (crossbeam has no
    // async receive: a shard on it would be a thread of its own).
    for (name, bounded) in [("crossbeam_bounded", true), ("crossbeam_unbounded", false)] {
        g.bench_function(name, |b| {
            b.iter(|| {
                let (tx, rx) = if bounded {
                    crossbeam_channel::bounded::<Cmd>(BOUND)
                } else {
                    crossbeam_channel::unbounded::<Cmd>()
                };
                let producers: Vec<_> = (0..PRODUCERS)
                    .map(|p| {
                        let tx = tx.clone();
                        thread::spawn(move || {
                            for i in 0..per {
                                tx.send(Cmd([(p * per + i) as u64; 8])).unwrap();
                            }
                        })
                    })
                    .collect();
                drop(tx);
                let mut n = 0;
                let mut batch = Vec::with_capacity(BATCH);
                while let Ok(first) = rx.recv() {
                    batch.push(first);
                    batch.extend(rx.try_iter().take(BATCH - 1));
                    n += batch.len();
                    batch.clear();
                }
                for p in producers {
                    p.join().unwrap();
                }
                assert_eq!(n, ITEMS);
            })
        });
    }
    g.finish();
}

criterion_group!(benches, queues);
criterion_main!(benches);

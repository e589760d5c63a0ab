//! The node-to-node link (`courier_broker::cluster::link`) on loopback:
//! what one request and its answer cost end to end (one in flight: the
//! round trip a cross-node command adds), and how many small requests a
//! link carries with many in flight (the writer batching what is queued).
//! Both ends run on one two-thread runtime, as two nodes' links would
//! share a machine's cores here.
//!
//! `cargo bench --bench link -- --warm-up-time 1 --measurement-time 5`

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use courier_broker::cluster::link::{self, Handler, LinkSettings};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use tokio_util::sync::CancellationToken;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Requests in flight for the throughput case, and per iteration.
const IN_FLIGHT: usize = 64;
const REQUESTS: usize = 10_240;
/// About a one-to-one send's size on the wire.
const BODY: usize = 128;

struct Echo;

impl Handler for Echo {
    fn request(
        &self,
        _from: &str,
        body: Bytes,
    ) -> Pin<Box<dyn Future<Output = Result<Bytes, String>> + Send>> {
        Box::pin(async move { Ok(body.slice(..16)) })
    }
    fn message(&self, _from: &str, _body: Bytes) {}
}

fn settings(id: &str) -> LinkSettings {
    LinkSettings {
        cluster: "bench".into(),
        node_id: id.into(),
        secret: Arc::from(&b"a bench secret of thirty-two bytes"[..]),
        queue_len: 4096,
        max_frame: 1 << 20,
        silence: std::time::Duration::from_secs(5),
    }
}

fn links(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let stop = CancellationToken::new();
    let peer = rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let accepted = Arc::new(Mutex::new(HashMap::new()));
        tokio::spawn(link::accept(
            listener,
            settings("b"),
            Arc::new(Echo),
            accepted,
            stop.clone(),
        ));
        let peer = link::dial(
            settings("a"),
            "b".into(),
            addr,
            Arc::new(Echo),
            stop.clone(),
        );
        while !peer.connected() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        peer
    });
    let body = Bytes::from(vec![7u8; BODY]);
    let deadline = Duration::from_secs(5);

    let mut g = c.benchmark_group("link");
    g.sample_size(20);
    g.bench_function("round_trip", |b| {
        b.iter(|| rt.block_on(peer.request(body.clone(), deadline)).unwrap())
    });
    g.throughput(Throughput::Elements(REQUESTS as u64));
    g.bench_function("requests_64_in_flight", |b| {
        b.iter(|| {
            rt.block_on(async {
                let mut tasks = Vec::new();
                for _ in 0..IN_FLIGHT {
                    let (peer, body) = (peer.clone(), body.clone());
                    tasks.push(tokio::spawn(async move {
                        for _ in 0..REQUESTS / IN_FLIGHT {
                            peer.request(body.clone(), deadline).await.unwrap();
                        }
                    }));
                }
                for t in tasks {
                    t.await.unwrap();
                }
            })
        })
    });
    g.finish();
    stop.cancel();
}

criterion_group!(benches, links);
criterion_main!(benches);

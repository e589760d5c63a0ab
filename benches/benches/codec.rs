//! Frame encode/decode throughput.
//!
//! `cargo bench -p courier-benches --bench codec`

use bytes::{Bytes, BytesMut};
use courier_protocol::*;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn message(seq: u64, payload: &Bytes) -> Message {
    Message {
        seq,
        server_msg_id: seq << 16,
        sender: 1001,
        sender_device: 1,
        client_msg_id: seq,
        timestamp_ms: 1_700_000_000_000,
        destination: Destination::User(1002),
        kind: MessageKind::Chat,
        payload: payload.clone(),
    }
}

fn bench(c: &mut Criterion) {
    let payload = Bytes::from(vec![b'x'; 100]);
    let send = Frame::new(
        7,
        Body::Send(Send {
            client_msg_id: 1,
            destination: Destination::User(2),
            kind: MessageKind::Chat,
            payload: payload.clone(),
        }),
    );

    let mut g = c.benchmark_group("send_100B");
    g.throughput(Throughput::Elements(1));
    let mut buf = BytesMut::with_capacity(4096);
    g.bench_function("encode", |b| {
        b.iter(|| {
            buf.clear();
            encode(&send, &mut buf);
        })
    });
    let bytes = encode_to_bytes(&send);
    g.bench_function("decode", |b| {
        b.iter(|| decode(&bytes, DEFAULT_MAX_FRAME_LEN).unwrap().unwrap())
    });
    g.finish();

    let mut g = c.benchmark_group("deliver_100B");
    for n in [1usize, 32, 128] {
        let messages: Vec<Message> = (0..n as u64).map(|i| message(i, &payload)).collect();
        g.throughput(Throughput::Elements(n as u64));
        let mut buf = BytesMut::with_capacity(64 << 10);
        g.bench_with_input(BenchmarkId::new("encode", n), &messages, |b, m| {
            b.iter(|| {
                buf.clear();
                encode_deliver(0, m, &mut buf);
            })
        });
        let mut enc = BytesMut::new();
        encode_deliver(0, &messages, &mut enc);
        g.bench_with_input(BenchmarkId::new("decode", n), &enc, |b, e| {
            b.iter(|| decode(e, DEFAULT_MAX_FRAME_LEN).unwrap().unwrap())
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);

//! Fuzz targets of the broker: every stored row's decoder, and the session
//! state machine driven with arbitrary bytes against an in-process node.
//!
//! Run by `cargo fuzz` in `fuzz/` (long, coverage-guided runs; see
//! `docs/RELIABILITY.md`) and, briefly, by this crate's tests with the
//! seeded mutator of `courier_protocol::fuzzing`.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use courier_protocol::token::{Claims, TokenKey};
use courier_protocol::{decode, encode, Body, Frame, Hello, PROTOCOL_VERSION};
use courier_storage::{Clock, MemoryStore, StoreConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::config::Config;
use crate::node::Node;
use crate::state::rows::{
    Cursors, FanMark, GroupState, MemberRow, OutboxRow, ReceiptRow, StatusRow, UserList,
};

/// Stored rows: decoding never panics, and what decodes is a fixed point
/// (decoding its encoding gives it back).
pub fn rows(data: &[u8]) {
    if let Some(g) = GroupState::decode(data) {
        assert_eq!(GroupState::decode(&g.encode()), Some(g));
    }
    if let Some(m) = MemberRow::decode(data) {
        assert_eq!(MemberRow::decode(&m.encode()), Some(m));
    }
    let c = Cursors::decode(data);
    assert_eq!(Cursors::decode(&c.encode()), c);
    let r = ReceiptRow::decode(data);
    assert_eq!(ReceiptRow::decode(&r.encode()), r);
    if let Some(o) = OutboxRow::decode(data) {
        assert_eq!(OutboxRow::decode(&o.encode()), Some(o));
    }
    let f = FanMark::decode(data);
    assert_eq!(FanMark::decode(&f.encode()), f);
    if let Some((l, used)) = UserList::decode_prefix(data) {
        assert!(used <= data.len());
        assert_eq!(UserList::decode(&l.encode()), Some(l));
    }
    if let Some(s) = StatusRow::decode(data) {
        assert_eq!(StatusRow::decode(&s.encode()), Some(s));
    }
}

/// The secret the session rig's tokens are minted with.
const RIG_SECRET: &[u8] = b"the session fuzz target's secret";

/// A node over the in-memory store, once per process, and the runtime
/// that drives it.
struct Rig {
    runtime: tokio::runtime::Runtime,
    node: Arc<Node>,
    listener: TcpListener,
    addr: SocketAddr,
}

fn rig() -> &'static Rig {
    static RIG: OnceLock<Rig> = OnceLock::new();
    RIG.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a runtime");
        let defaults = Config::default();
        let config = Config {
            shards: 2,
            limits: crate::config::Limits {
                handshake_timeout_ms: 2_000,
                idle_timeout_ms: 5_000,
                new_connections_per_source_per_sec: 0,
                max_unauthenticated_per_source: 1_000_000,
                sends_per_connection_per_sec: 0,
                sends_per_user_per_sec: 0,
                ..defaults.limits.clone()
            },
            ..defaults
        };
        let clock = Clock::system();
        let store = Arc::new(MemoryStore::new(StoreConfig {
            clock: clock.clone(),
            ..StoreConfig::default()
        }));
        let key = TokenKey::new(RIG_SECRET.to_vec());
        let node = Node::assemble(config, store, key, clock, 100_000, None).expect("a node");
        let listener = runtime
            .block_on(TcpListener::bind("127.0.0.1:0"))
            .expect("a loopback listener");
        let addr = listener.local_addr().expect("an address");
        Rig {
            runtime,
            node,
            listener,
            addr,
        }
    })
}

/// A valid `Hello` for `user` (device 1), encoded.
pub fn hello(user: u64) -> Vec<u8> {
    let token = TokenKey::new(RIG_SECRET.to_vec()).mint(Claims {
        user_id: user,
        device_id: 1,
        expires_at_s: u64::MAX / 2,
    });
    let frame = Frame::new(
        1,
        Body::Hello(Hello {
            version: PROTOCOL_VERSION,
            user_id: user,
            device_id: 1,
            resume_after: None,
            receipts_after: None,
            token: token.into_bytes().into(),
        }),
    );
    let mut out = BytesMut::new();
    encode(&frame, &mut out);
    out.to_vec()
}

/// The session state machine: the first byte of `data` picks a user (1 to
/// 4) and whether a valid `Hello` goes first (bit 7 clear) or the bytes go
/// raw; the rest is sent as it is, then the client half-closes. Must hold
/// for every input: the session task never panics, ends once the client
/// is gone (within 10 s), and everything the node sends decodes as a valid
/// frame; afterwards the node still serves a well-behaved session.
pub fn session(data: &[u8]) {
    let rig = rig();
    rig.runtime.block_on(async {
        let Some((&control, rest)) = data.split_first() else {
            return;
        };
        let mut input = Vec::with_capacity(rest.len() + 128);
        if control & 0x80 == 0 {
            input.extend_from_slice(&hello(1 + u64::from(control % 4)));
        }
        input.extend_from_slice(rest);
        let answers = converse(rig, &input).await;
        check_frames(&answers);
        // Still serving: a new session gets its welcome and a pong.
        let mut ping = hello(9);
        let mut frame = BytesMut::new();
        encode(&Frame::new(2, Body::Ping { nonce: 3 }), &mut frame);
        ping.put_slice(&frame);
        let answers = converse(rig, &ping).await;
        let frames = check_frames(&answers);
        assert!(
            frames.iter().any(|f| f.body == Body::Pong { nonce: 3 }),
            "the node stopped answering after that input: {frames:?}"
        );
    });
}

/// Sends `input` over a new loopback connection served by the node,
/// half-closes, and returns every byte the node sent until it closed.
async fn converse(rig: &Rig, input: &[u8]) -> Vec<u8> {
    let (client, accepted) = tokio::join!(TcpStream::connect(rig.addr), rig.listener.accept());
    let mut client = client.expect("connect");
    let (stream, peer) = accepted.expect("accept");
    let admitted = match rig
        .node
        .gate
        .admit(Some(peer.ip()), rig.node.clock.now_ms())
    {
        Ok(a) => a,
        Err(r) => panic!("the rig's gate refused a connection: {:?}", r.why),
    };
    let served = tokio::spawn(crate::session::serve(
        rig.node.clone(),
        stream,
        Some(peer),
        admitted,
    ));
    let (mut rd, mut wr) = client.split();
    let write = async {
        // The node may close first (a goodbye): a failed write is fine.
        let _ = wr.write_all(input).await;
        let _ = wr.shutdown().await;
    };
    let mut answers = Vec::new();
    let read = async {
        let _ = rd.read_to_end(&mut answers).await;
    };
    let done = tokio::time::timeout(Duration::from_secs(10), async {
        tokio::join!(write, read);
    })
    .await;
    assert!(
        done.is_ok(),
        "the session did not end after the client left"
    );
    let ended = tokio::time::timeout(Duration::from_secs(10), served).await;
    match ended {
        Ok(Ok(())) => {}
        Ok(Err(e)) => panic!("the session task failed: {e}"),
        Err(_) => panic!("the session task outlived its connection"),
    }
    answers
}

/// Every frame the node sent decodes (the node never sends garbage).
fn check_frames(mut bytes: &[u8]) -> Vec<Frame> {
    let mut frames = Vec::new();
    while !bytes.is_empty() {
        match decode(bytes, u32::MAX) {
            Ok(Some((f, used))) => {
                frames.push(f);
                bytes = &bytes[used..];
            }
            Ok(None) => panic!("the node sent half a frame: {bytes:02x?}"),
            Err(e) => panic!("the node sent an undecodable frame ({e}): {bytes:02x?}"),
        }
    }
    frames
}

#[cfg(test)]
mod tests {
    use super::*;
    use courier_protocol::fuzzing::drive;
    use courier_protocol::*;

    fn seed() -> u64 {
        std::env::var("COURIER_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0x5e55)
    }

    fn frames(list: &[Frame]) -> Vec<u8> {
        let mut out = BytesMut::new();
        for f in list {
            encode(f, &mut out);
        }
        out.to_vec()
    }

    #[test]
    fn rows_decode_or_are_refused_never_panic() {
        use crate::state::rows::Member;
        let seeds = vec![
            GroupState {
                strategy: Strategy::Refs,
                log_from: 3,
                members: vec![Member {
                    user: 1,
                    role: Role::Admin,
                    joined_seq: 1,
                }],
            }
            .encode(),
            MemberRow {
                joined: 1,
                left: 2,
                log_from: 3,
            }
            .encode(),
            ReceiptRow {
                cursors: Cursors::new(4, 2),
                emitted: 9,
            }
            .encode(),
            UserList(vec![1, 2, 3]).encode(),
            StatusRow {
                posted_at_ms: 1,
                audience: Audience::Only,
                users: vec![2],
                payload: bytes::Bytes::from_static(b"s"),
            }
            .encode(),
        ];
        drive("rows", seed(), 20_000, &seeds, rows);
    }

    /// The session target on 3,000 inputs mutated from request sequences
    /// of every kind (a few seconds).
    #[test]
    fn sessions_survive_mutated_request_sequences() {
        let send = |id, to| {
            Body::Send(Send {
                client_msg_id: id,
                destination: to,
                kind: MessageKind::Chat,
                payload: bytes::Bytes::from_static(b"hi"),
            })
        };
        let requests = vec![
            Frame::new(2, send(1, Destination::User(2))),
            Frame::new(
                3,
                Body::SendBatch(vec![Send {
                    client_msg_id: 2,
                    destination: Destination::User(3),
                    kind: MessageKind::Chat,
                    payload: bytes::Bytes::new(),
                }]),
            ),
            Frame::new(
                4,
                Body::Group(GroupRequest {
                    op: GroupOp::Create,
                    group: 0,
                    users: vec![2, 3],
                }),
            ),
            Frame::new(0, Body::Ack { up_to_seq: 1 }),
            Frame::new(
                5,
                Body::Mark(Mark {
                    stream: 0,
                    up_to_seq: 1,
                    status: ReceiptStatus::Read,
                }),
            ),
            Frame::new(
                6,
                Body::Fetch(Fetch {
                    user_id: 1,
                    after_seq: 0,
                    limit: 10,
                }),
            ),
            Frame::new(
                7,
                Body::Contacts(ContactsRequest {
                    op: ContactsOp::Add,
                    users: vec![2],
                }),
            ),
            Frame::new(
                8,
                Body::List(ListRequest {
                    op: ListOp::Set,
                    list: 1,
                    users: vec![2],
                }),
            ),
            Frame::new(9, send(3, Destination::List(1))),
            Frame::new(
                10,
                Body::StatusPost(StatusPost {
                    audience: Audience::Contacts,
                    users: vec![],
                    payload: bytes::Bytes::from_static(b"st"),
                }),
            ),
            Frame::new(11, Body::StatusFetch),
            Frame::new(
                12,
                Body::ReceiptQuery {
                    group: GROUP_ID_BIT | 1,
                    seq: 1,
                },
            ),
            Frame::new(13, Body::Ping { nonce: 1 }),
        ];
        let mut seeds: Vec<Vec<u8>> = requests
            .iter()
            .map(|f| {
                let mut v = vec![0u8];
                v.extend(frames(std::slice::from_ref(f)));
                v
            })
            .collect();
        let mut all = vec![1u8];
        all.extend(frames(&requests));
        seeds.push(all);
        let mut raw = vec![0x80u8];
        raw.extend(hello(2));
        raw.extend(frames(&requests[..3]));
        seeds.push(raw);
        drive("session", seed(), 3_000, &seeds, session);
    }
}

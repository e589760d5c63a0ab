//! A bare relay that speaks Courier's protocol with no storage and no
//! authentication: a send is acknowledged at once and written to the
//! recipients' connections. It is the ceiling a broker on this machine can
//! approach (the `relay` target), and, with [`Faults`], the test double that
//! shows the load generator's checker catches loss, duplication and
//! reordering.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::{Buf, BytesMut};
use courier_protocol::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

/// Misbehaviour on purpose: every n-th delivery is dropped, sent twice, or
/// held back and sent after the next one; and from the n-th send on, every
/// send is refused `SHARD_UNAVAILABLE` (a shard that never comes back).
/// 0 = never.
#[derive(Clone, Copy, Debug, Default)]
pub struct Faults {
    pub drop_every: u64,
    pub duplicate_every: u64,
    pub reorder_every: u64,
    pub unavailable_from: u64,
}

#[derive(Default)]
struct State {
    sessions: HashMap<u64, mpsc::UnboundedSender<Message>>,
    groups: HashMap<u64, Vec<u64>>,
}

struct Relay {
    state: Mutex<State>,
    faults: Faults,
    deliveries: AtomicU64,
    /// Sends seen (counted only with `Faults::unavailable_from`).
    sends: AtomicU64,
    next_id: AtomicU64,
}

/// Binds `addr` and serves until the task is dropped; returns the address.
pub async fn start(addr: &str, faults: Faults) -> std::io::Result<std::net::SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let relay = Arc::new(Relay {
        state: Mutex::new(State::default()),
        faults,
        deliveries: AtomicU64::new(0),
        sends: AtomicU64::new(0),
        next_id: AtomicU64::new(1),
    });
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let _ = stream.set_nodelay(true);
            tokio::spawn(serve(relay.clone(), stream));
        }
    });
    Ok(local)
}

async fn read_frame(rd: &mut tokio::net::tcp::OwnedReadHalf, buf: &mut BytesMut) -> Option<Frame> {
    loop {
        match decode(buf, DEFAULT_MAX_FRAME_LEN) {
            Ok(Some((f, used))) => {
                buf.advance(used);
                return Some(f);
            }
            Ok(None) => {}
            Err(_) => return None,
        }
        if rd.read_buf(buf).await.ok()? == 0 {
            return None;
        }
    }
}

async fn serve(relay: Arc<Relay>, stream: TcpStream) {
    let (mut rd, mut wr) = stream.into_split();
    let mut buf = BytesMut::with_capacity(64 << 10);
    let Some(Frame {
        request_id,
        body: Body::Hello(hello),
    }) = read_frame(&mut rd, &mut buf).await
    else {
        return;
    };
    let user = hello.user_id;
    let welcome = Welcome {
        version: PROTOCOL_VERSION,
        session_id: user,
        head_seq: 0,
        oldest_seq: 1,
        resume_from: 1,
        gap: false,
        server_time_ms: 0,
        max_frame_len: DEFAULT_MAX_FRAME_LEN,
        max_batch: 256,
        keepalive_ms: 3_600_000,
    };
    if wr
        .write_all(&encode_to_bytes(&Frame::new(
            request_id,
            Body::Welcome(welcome),
        )))
        .await
        .is_err()
    {
        return;
    }
    // The writer: replies and deliveries, many frames per write.
    let (out_tx, mut out_rx) = mpsc::unbounded_channel::<Frame>();
    let (dtx, mut drx) = mpsc::unbounded_channel::<Message>();
    let mine = dtx.clone();
    relay
        .state
        .lock()
        .expect("state")
        .sessions
        .insert(user, dtx);
    let writer = tokio::spawn(async move {
        let mut out = BytesMut::with_capacity(64 << 10);
        let mut seq = 0u64;
        loop {
            tokio::select! {
                f = out_rx.recv() => match f {
                    Some(f) => encode(&f, &mut out),
                    None => break,
                },
                m = drx.recv() => match m {
                    Some(mut m) => { seq += 1; m.seq = seq; encode_deliver(0, &[m], &mut out); }
                    None => break,
                },
            }
            while out.len() < (256 << 10) {
                if let Ok(f) = out_rx.try_recv() {
                    encode(&f, &mut out);
                } else if let Ok(mut m) = drx.try_recv() {
                    seq += 1;
                    m.seq = seq;
                    encode_deliver(0, &[m], &mut out);
                } else {
                    break;
                }
            }
            if wr.write_all(&out).await.is_err() {
                break;
            }
            out.clear();
        }
    });
    let mut held: Option<(u64, Message)> = None;
    while let Some(frame) = read_frame(&mut rd, &mut buf).await {
        let rid = frame.request_id;
        match frame.body {
            Body::Send(_) if relay.refuses_sends() => {
                let no = Reason::new(
                    ErrorCode::SHARD_UNAVAILABLE,
                    error::with_retry_after(100, "the relay's shard is gone for good"),
                );
                let _ = out_tx.send(Frame::new(rid, Body::Error(no)));
            }
            Body::Send(s) => {
                let id = relay.next_id.fetch_add(1, Ordering::Relaxed);
                let m = Message {
                    seq: 0,
                    server_msg_id: id,
                    sender: user,
                    sender_device: hello.device_id,
                    client_msg_id: s.client_msg_id,
                    timestamp_ms: 0,
                    destination: s.destination,
                    kind: s.kind,
                    payload: s.payload,
                };
                let recipients = match s.destination {
                    Destination::User(u) => vec![u],
                    Destination::Group(g) => relay
                        .state
                        .lock()
                        .expect("state")
                        .groups
                        .get(&g)
                        .map(|ms| ms.iter().copied().filter(|&u| u != user).collect())
                        .unwrap_or_default(),
                    Destination::List(_) => Vec::new(),
                };
                for r in recipients {
                    relay.deliver(r, m.clone(), &mut held);
                }
                let ack = SendAck {
                    client_msg_id: s.client_msg_id,
                    server_msg_id: id,
                    seq: id,
                    timestamp_ms: 0,
                    duplicate: false,
                };
                let _ = out_tx.send(Frame::new(rid, Body::SendAck(ack)));
            }
            Body::Group(g) if g.op == GroupOp::Create => {
                let id = GROUP_ID_BIT | relay.next_id.fetch_add(1, Ordering::Relaxed);
                let mut members = vec![user];
                members.extend(g.users);
                let info = GroupInfo {
                    group: id,
                    head_seq: 0,
                    strategy: Strategy::Log,
                    members: members.iter().map(|&u| (u, Role::Member)).collect(),
                };
                relay
                    .state
                    .lock()
                    .expect("state")
                    .groups
                    .insert(id, members);
                let _ = out_tx.send(Frame::new(rid, Body::GroupInfo(info)));
            }
            Body::Ping { nonce } => {
                let _ = out_tx.send(Frame::new(rid, Body::Pong { nonce }));
            }
            Body::Ack { .. } | Body::Mark(_) => {}
            other => {
                let _ = out_tx.send(Frame::new(
                    rid,
                    Body::Error(Reason::new(
                        ErrorCode::UNEXPECTED_FRAME,
                        format!("the relay does not serve {}", other.name()),
                    )),
                ));
            }
        }
    }
    {
        // Only this session's entry: a newer session of the same user (a
        // reconnect, or a generator's setup connection closing after the
        // run's connection arrived) keeps its own.
        let mut state = relay.state.lock().expect("state");
        if state
            .sessions
            .get(&user)
            .is_some_and(|tx| tx.same_channel(&mine))
        {
            state.sessions.remove(&user);
        }
    }
    drop(mine);
    drop(out_tx);
    let _ = writer.await;
}

impl Relay {
    /// Whether this send is refused (`Faults::unavailable_from`).
    fn refuses_sends(&self) -> bool {
        let from = self.faults.unavailable_from;
        from != 0 && self.sends.fetch_add(1, Ordering::Relaxed) + 1 >= from
    }

    fn deliver(&self, to: u64, m: Message, held: &mut Option<(u64, Message)>) {
        let n = self.deliveries.fetch_add(1, Ordering::Relaxed) + 1;
        let f = self.faults;
        let every = |k: u64| k != 0 && n.is_multiple_of(k);
        let tx = self.state.lock().expect("state").sessions.get(&to).cloned();
        let Some(tx) = tx else { return };
        if every(f.drop_every) {
            return;
        }
        if every(f.reorder_every) && held.is_none() {
            *held = Some((to, m));
            return;
        }
        let _ = tx.send(m.clone());
        if every(f.duplicate_every) {
            let _ = tx.send(m);
        }
        if let Some((held_to, held_m)) = held.take() {
            if held_to == to {
                let _ = tx.send(held_m);
            } else {
                *held = Some((held_to, held_m));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use courier_client::{Client, ClientConfig};

    use super::*;

    /// A user's older connection closing leaves its newer one registered:
    /// a message sent after the close still reaches the newer one.
    #[tokio::test]
    async fn an_older_session_closing_keeps_the_newer_one() {
        let addr = start("127.0.0.1:0", Faults::default()).await.unwrap();
        let connect = |user| Client::connect(ClientConfig::new(addr.to_string(), user, 1, "x"));
        let (older, _) = connect(1).await.unwrap();
        let (newer, _) = connect(1).await.unwrap();
        let (sender, _) = connect(2).await.unwrap();
        drop(older);
        // Time for the relay to see the older connection end (if it has
        // not, the message still reaches the newer one, and the test says
        // nothing: it can only pass wrongly, never fail wrongly).
        tokio::time::sleep(Duration::from_millis(200)).await;
        sender
            .send(Destination::User(1), MessageKind::Chat, "still here".into())
            .await
            .unwrap();
        let got = newer.recv_timeout(Duration::from_secs(5)).await.unwrap();
        assert_eq!(&got.payload[..], b"still here");
    }
}

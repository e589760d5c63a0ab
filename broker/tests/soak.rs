//! The kill soak: 100 SIGKILLs of the real node at seeded random moments
//! (after a seeded number of acknowledged sends) under mixed load (one-to-one and group sends, readers that acknowledge
//! what they receive at once and mark a share read after a short lag), the
//! durability mode alternating between `fsync` and `wal` from one start to
//! the next. Afterwards receipts are counted as strictly as messages: every
//! acknowledged send is in its recipient's inbox exactly once and in order,
//! and every one-to-one message has exactly one read receipt at its sender
//! (and at most one delivered receipt), none missing and none twice.
//! Seeded; the seed is printed (COURIER_TEST_SEED replays a run).

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use courier_client::{Client, ClientError};
use courier_protocol::*;
use rand::{Rng, SeedableRng};

const KILLS: usize = 100;
const SENDERS: [u64; 3] = [1, 2, 3];
const READERS: [u64; 3] = [11, 12, 13];

/// Where sender `s`'s message `id` goes: always the same place for the
/// same id, so a retry after a kill is the same send.
fn destination(s: u64, id: u64, group: u64) -> Destination {
    if s == 3 && id.is_multiple_of(4) {
        Destination::Group(group)
    } else {
        Destination::User(READERS[((s + id) % 3) as usize])
    }
}

#[derive(Default)]
struct Sender {
    next_id: u64,
    /// (id, destination) of every acknowledged send.
    acked: Vec<(u64, Destination)>,
}

async fn send_until_killed(c: Arc<Client>, s: u64, group: u64, state: Arc<Mutex<Sender>>) {
    loop {
        let id = state.lock().unwrap().next_id;
        let to = destination(s, id, group);
        match c
            .send_with_id(id, to, MessageKind::Chat, chat(format!("{s}-{id}")))
            .await
        {
            Ok(ack) => {
                assert_eq!(ack.client_msg_id, id);
                let mut st = state.lock().unwrap();
                st.acked.push((id, to));
                st.next_id += 1;
            }
            Err(_) => return,
        }
    }
}

/// Receives like a phone: acknowledges what arrived after every few
/// messages, marks a share read a few messages behind.
async fn read_until_killed(c: Client, seed: u64) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut unacked = 0;
    let mut batch = rng.gen_range(1..6);
    loop {
        let d = match c.next_timeout(Duration::from_millis(200)).await {
            Ok(d) => d,
            Err(ClientError::Timeout) => continue,
            Err(_) => return,
        };
        unacked += 1;
        if unacked >= batch && c.confirm(&d).await.is_err() {
            return;
        }
        if unacked >= batch {
            unacked = 0;
            batch = rng.gen_range(1..6);
        }
        if d.stream == 0 && rng.gen_bool(0.3) {
            let lag = rng.gen_range(0..4);
            if c.mark_read(d.message.seq.saturating_sub(lag))
                .await
                .is_err()
            {
                return;
            }
        }
    }
}

/// Drains what a sender receives (its receipts), so its connection never
/// stalls on a full delivery queue.
async fn drain(c: Arc<Client>) {
    while c.next().await.is_some() {}
}

fn seed() -> u64 {
    std::env::var("COURIER_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random)
}

/// Every message of an inbox, from the beginning.
async fn inbox(c: &Client) -> Vec<Message> {
    let mut all = Vec::new();
    let mut after = 0;
    loop {
        let page = tokio::time::timeout(WAIT, c.fetch(after, 1000))
            .await
            .expect("a fetch is answered in time")
            .unwrap();
        let Some(last) = page.messages.last() else {
            return all;
        };
        after = last.seq;
        all.extend(page.messages);
    }
}

/// (client message id, status) -> how many receipts from one reader one
/// sender's inbox holds.
type ReceiptTally = HashMap<(u64, u8), usize>;

/// What receipts from `reader` a sender's inbox holds.
fn receipts_from(messages: &[Message], reader: u64) -> ReceiptTally {
    let mut counts = HashMap::new();
    for m in messages.iter().filter(|m| m.kind == MessageKind::Receipt) {
        let r = ReceiptPayload::decode(&m.payload).unwrap();
        if r.reader != reader || m.sender != reader {
            continue;
        }
        for (id, _) in r.messages {
            *counts.entry((id, r.status as u8)).or_insert(0) += 1;
        }
    }
    counts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_kills_lose_and_repeat_no_message_and_no_receipt() {
    let seed = seed();
    println!("kill soak seed: {seed} (replay with COURIER_TEST_SEED={seed})");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    // Within the open-file limit: no warning about it at each of the 101
    // starts, so a failure's message is not buried in the node's log.
    let mut server = Server::start(&[
        ("COURIER_DURABILITY", "fsync"),
        ("COURIER_LIMITS_MAX_CONNECTIONS", "1000"),
    ]);
    let group = {
        let (c, _) = server.client(3).await;
        c.create_group(READERS.to_vec()).await.unwrap().group
    };
    let states: HashMap<u64, Arc<Mutex<Sender>>> = SENDERS
        .iter()
        .map(|&s| {
            (
                s,
                Arc::new(Mutex::new(Sender {
                    next_id: 1,
                    ..Default::default()
                })),
            )
        })
        .collect();
    for round in 0..KILLS {
        let mut tasks = Vec::new();
        for &s in &SENDERS {
            let (c, _) = server.client(s).await;
            let c = Arc::new(c);
            tokio::spawn(drain(c.clone()));
            tasks.push(tokio::spawn(send_until_killed(
                c,
                s,
                group,
                states[&s].clone(),
            )));
        }
        for &r in &READERS {
            let (c, _) = server.client(r).await;
            tasks.push(tokio::spawn(read_until_killed(c, rng.gen())));
        }
        // The kill comes after a seeded number of acknowledged sends (and a
        // seeded moment more), not after a time: the soak's volume and the
        // sends in flight at the kill do not depend on the machine's speed.
        let target = acked(&states) + rng.gen_range(20..150);
        let give_up = tokio::time::Instant::now() + WAIT;
        while acked(&states) < target {
            assert!(
                tokio::time::Instant::now() < give_up,
                "round {round}: no progress to {target} acknowledged sends (seed {seed})"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        tokio::time::sleep(Duration::from_millis(rng.gen_range(0..20))).await;
        server.kill();
        for t in tasks {
            tokio::time::timeout(WAIT, t)
                .await
                .expect("clients notice the kill")
                .unwrap();
        }
        let mode = if round % 2 == 0 { "wal" } else { "fsync" };
        server.set_env("COURIER_DURABILITY", mode);
        server.restart();
    }
    verify(&server, &states, group, seed).await;
}

/// Acknowledged sends so far, of every sender.
fn acked(states: &HashMap<u64, Arc<Mutex<Sender>>>) -> usize {
    states.values().map(|s| s.lock().unwrap().acked.len()).sum()
}

async fn verify(server: &Server, states: &HashMap<u64, Arc<Mutex<Sender>>>, group: u64, seed: u64) {
    // Each reader marks everything read; then each message's receipts.
    let mut views = HashMap::new();
    for &r in &READERS {
        let (c, welcome) = server.client(r).await;
        // Its inbox arrives as deliveries too: drained, so the connection
        // never stalls behind them (the fetches below read it instead).
        let c = Arc::new(c);
        tokio::spawn(drain(c.clone()));
        c.mark_read(welcome.head_seq).await.unwrap();
        let all = inbox(&c).await;
        assert_eq!(
            all.len() as u64,
            welcome.head_seq,
            "reader {r}: no gap (seed {seed})"
        );
        views.insert(r, all);
    }
    let mut total = 0;
    for &s in &SENDERS {
        let st = states[&s].lock().unwrap();
        for (&r, all) in &views {
            let to_r =
                |d: &Destination| *d == Destination::User(r) || *d == Destination::Group(group);
            let ids: Vec<u64> = all
                .iter()
                .filter(|m| m.sender == s && m.kind == MessageKind::Chat)
                .map(|m| m.client_msg_id)
                .collect();
            let mut sorted = ids.clone();
            sorted.sort_unstable();
            sorted.dedup();
            assert_eq!(
                sorted, ids,
                "sender {s} -> reader {r}: repeated or reordered (seed {seed})"
            );
            let acked: Vec<u64> = st
                .acked
                .iter()
                .filter(|(_, d)| to_r(d))
                .map(|(id, _)| *id)
                .collect();
            for id in &acked {
                assert!(
                    ids.binary_search(id).is_ok(),
                    "sender {s} -> reader {r}: acknowledged {id} lost (seed {seed})"
                );
            }
            assert!(
                ids.iter()
                    .all(|id| *id <= st.next_id && to_r(&destination(s, *id, group))),
                "sender {s} -> reader {r}: a message never sent there (seed {seed})"
            );
            total += acked.len();
        }
    }
    assert!(
        total > 1000,
        "only {total} messages acknowledged (seed {seed})"
    );

    // Receipts: one read receipt per one-to-one message, at most one
    // delivered; wait until every read receipt is there, then a moment
    // more for any repeat to show.
    let expected: Vec<(u64, u64, u64)> = views
        .iter()
        .flat_map(|(&r, all)| {
            all.iter()
                .filter(move |m| {
                    m.kind == MessageKind::Chat && m.destination == Destination::User(r)
                })
                .map(move |m| (m.sender, r, m.client_msg_id))
        })
        .collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut senders = HashMap::new();
    for &s in &SENDERS {
        let c = Arc::new(server.client(s).await.0);
        tokio::spawn(drain(c.clone()));
        senders.insert(s, c);
    }
    let mut settled_once = false;
    loop {
        let mut boxes = HashMap::new();
        for &s in &SENDERS {
            boxes.insert(s, inbox(&senders[&s]).await);
        }
        let counts: HashMap<(u64, u64), ReceiptTally> = SENDERS
            .iter()
            .flat_map(|&s| READERS.iter().map(move |&r| (s, r)))
            .map(|(s, r)| ((s, r), receipts_from(&boxes[&s], r)))
            .collect();
        let missing = expected
            .iter()
            .filter(|(s, r, id)| !counts[&(*s, *r)].contains_key(&(*id, ReceiptStatus::Read as u8)))
            .count();
        if missing == 0 && settled_once {
            check_receipts(&counts, &expected, &views, seed);
            println!(
                "{} messages, {} with their read receipt once",
                total,
                expected.len()
            );
            return;
        }
        if missing == 0 {
            settled_once = true;
            tokio::time::sleep(Duration::from_millis(500)).await;
            continue;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{missing} of {} read receipts never arrived (seed {seed})",
            expected.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `counts`: by (sender, reader), what `receipts_from` found.
fn check_receipts(
    counts: &HashMap<(u64, u64), ReceiptTally>,
    expected: &[(u64, u64, u64)],
    views: &HashMap<u64, Vec<Message>>,
    seed: u64,
) {
    for &s in &SENDERS {
        for &r in &READERS {
            let sent: std::collections::HashSet<u64> = expected
                .iter()
                .filter(|(es, er, _)| *es == s && *er == r)
                .map(|x| x.2)
                .collect();
            for (&(id, status), &n) in &counts[&(s, r)] {
                assert_eq!(
                    n, 1,
                    "sender {s}: {n} receipts of status {status} from reader {r} for message {id} (seed {seed})"
                );
                assert!(
                    sent.contains(&id),
                    "sender {s}: a receipt from {r} for {id}, which {r} never got (seed {seed}; {} in its inbox)",
                    views[&r].len()
                );
            }
        }
    }
}

//! Connection floods and send rates against the real node: connections
//! that never authenticate cannot lock real users out, one address cannot
//! take every waiting place nor open connections without limit, running
//! out of descriptors is answered with a goodbye (not a hang), the admin
//! port stays up and the log stays readable; sends beyond the per-user and
//! per-connection rates get their own code and the connection stays open.

mod common;

use std::time::Duration;

use common::*;
use courier_protocol::*;
use tokio::net::TcpStream;

/// What a connection that never says hello hears from the node within
/// `wait`: a goodbye's code, `None` if it is still open and silent.
async fn heard(stream: TcpStream, wait: Duration) -> Option<ErrorCode> {
    let mut raw = Raw::over(stream);
    match tokio::time::timeout(wait, raw.next()).await {
        Ok(Some(Frame {
            body: Body::Goodbye(r),
            ..
        })) => Some(r.code),
        Ok(other) => panic!("a silent connection got {other:?}"),
        Err(_) => None,
    }
}

/// Counts the codes a set of silent connections heard (`None`: still open).
async fn census(streams: Vec<TcpStream>, wait: Duration) -> Vec<(Option<ErrorCode>, usize)> {
    let heard = futures_util::future::join_all(streams.into_iter().map(|s| heard(s, wait))).await;
    let mut counts: Vec<(Option<ErrorCode>, usize)> = Vec::new();
    for code in heard {
        match counts.iter_mut().find(|(c, _)| *c == code) {
            Some((_, n)) => *n += 1,
            None => counts.push((code, 1)),
        }
    }
    counts
}

fn count(census: &[(Option<ErrorCode>, usize)], code: Option<ErrorCode>) -> usize {
    census
        .iter()
        .find(|(c, _)| *c == code)
        .map_or(0, |(_, n)| *n)
}

/// 130 silent connections from 13 addresses against a node that holds 100
/// connections, of which at most 20 may wait to authenticate: each address
/// gets at most 10 waiting places (the rest hear TOO_MANY_UNAUTHENTICATED),
/// the oldest waiting ones make room for newer ones (HANDSHAKE_TIMEOUT),
/// and real users from another address still get in and exchange messages
/// at once, long before any handshake timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_do_not_lock_real_users_out() {
    let server = Server::start(&[
        ("COURIER_LIMITS_MAX_CONNECTIONS", "100"),
        ("COURIER_LIMITS_MAX_UNAUTHENTICATED", "20"),
        ("COURIER_LIMITS_MAX_UNAUTHENTICATED_PER_SOURCE", "10"),
        ("COURIER_LIMITS_HANDSHAKE_TIMEOUT_MS", "600000"),
    ]);
    let mut silent = Vec::new();
    for source in 2..=14u8 {
        for _ in 0..10 {
            silent.push(connect_from(source, &server.addr).await);
        }
        // Admitted in this order: a connect returns before the node has
        // accepted it, and on io_uring each ring thread accepts from its
        // own listener, so later addresses could otherwise overtake.
        server
            .wait_for_metric("courier_connections_accepted_total", silent.len() as u64)
            .await;
    }
    // One address more than its share.
    let mut extra = Vec::new();
    for _ in 0..5 {
        extra.push(connect_from(14, &server.addr).await);
    }
    let (alice, _) = tokio::time::timeout(WAIT, server.client(1))
        .await
        .expect("a real user gets in while the flood waits");
    let (bob, _) = server.client(2).await;
    exchange(&alice, 2, &bob, "still here").await;

    let silent = census(silent, Duration::from_millis(500)).await;
    let extra = census(extra, Duration::from_millis(500)).await;
    println!("silent: {silent:?}; from the busy address: {extra:?}");
    assert_eq!(
        count(&extra, Some(ErrorCode::TOO_MANY_UNAUTHENTICATED)),
        5,
        "an address beyond its waiting places is refused: {extra:?}"
    );
    assert!(
        count(&silent, None) <= 20,
        "at most max_unauthenticated wait: {silent:?}"
    );
    assert_eq!(
        count(&silent, Some(ErrorCode::HANDSHAKE_TIMEOUT)) + count(&silent, None),
        130,
        "the others were closed to make room: {silent:?}"
    );
    assert!(server.metric("courier_handshakes_evicted_total").await >= 110);
    assert_eq!(
        server
            .metric("courier_connections_refused_total{reason=\"source_unauthenticated\"}")
            .await,
        5
    );
}

/// New connections per second from one address are limited: a burst past
/// the rate hears CONNECTION_RATE_LIMITED; another address is unaffected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_connections_per_address_are_rate_limited() {
    let server = Server::start(&[
        ("COURIER_LIMITS_NEW_CONNECTIONS_PER_SOURCE_PER_SEC", "20"),
        ("COURIER_LIMITS_HANDSHAKE_TIMEOUT_MS", "600000"),
    ]);
    let mut burst = Vec::new();
    for _ in 0..60 {
        burst.push(connect_from(3, &server.addr).await);
    }
    let heard = census(burst, Duration::from_millis(500)).await;
    let limited = count(&heard, Some(ErrorCode::CONNECTION_RATE_LIMITED));
    assert!(
        (30..=40).contains(&limited),
        "about 60 - 20 (plus what a second refilled) refused: {heard:?}"
    );
    let (alice, _) = server.client(1).await;
    alice.ping().await.unwrap();
    assert_eq!(
        server
            .metric("courier_connections_refused_total{reason=\"source_rate\"}")
            .await,
        limited as u64
    );
}

/// A node whose open-file limit allows fewer connections than
/// `limits.max_connections` says so at start with the real number, holds
/// that many, answers the next ones with TOO_MANY_CONNECTIONS (never an
/// accept that fails and leaves the client hanging), keeps its admin port
/// answering, and logs no accept storm.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_out_of_descriptors_is_a_goodbye_not_a_hang() {
    let server = Server::start_with_open_files(
        &[
            // Half of the reserve may be refusals being said: 150, more
            // than the 120 refused below.
            ("COURIER_LIMITS_RESERVED_FILES", "300"),
            ("COURIER_LIMITS_NEW_CONNECTIONS_PER_SOURCE_PER_SEC", "0"),
            ("COURIER_LIMITS_MAX_UNAUTHENTICATED_PER_SOURCE", "1000"),
            ("COURIER_LIMITS_HANDSHAKE_TIMEOUT_MS", "600000"),
            ("COURIER_LOG", "info"),
        ],
        600,
    );
    let warning = server.logged_soon("allows 300 connections");
    assert_eq!(
        warning.len(),
        1,
        "the start-up warning states the real number"
    );
    let mut held = Vec::new();
    for _ in 0..420 {
        held.push(TcpStream::connect(&server.addr).await.unwrap());
    }
    let (code, body) = server.admin_get("/healthz").await;
    assert_eq!((code, body.trim()), (200, "ok"), "the admin port answers");
    let heard = census(held, Duration::from_millis(1000)).await;
    assert_eq!(count(&heard, None), 300, "{heard:?}");
    assert_eq!(
        count(&heard, Some(ErrorCode::TOO_MANY_CONNECTIONS)),
        120,
        "{heard:?}"
    );
    // The census dropped them all: a real user gets in again.
    let (alice, _) = tokio::time::timeout(WAIT, server.client(1)).await.unwrap();
    alice.ping().await.unwrap();
    let storm = server.logged("accept failed");
    assert!(storm.len() <= 1, "accept errors logged: {storm:?}");
}

/// Sends beyond a connection's rate, and beyond a user's rate over two
/// connections, are refused with SEND_RATE_LIMITED and stored nowhere;
/// the connections stay open and send again after a pause.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sends_beyond_the_rates_are_refused_and_the_connection_stays() {
    let server = Server::start(&[
        ("COURIER_LIMITS_SENDS_PER_CONNECTION_PER_SEC", "30"),
        ("COURIER_LIMITS_SENDS_PER_USER_PER_SEC", "50"),
    ]);
    let (a1, _) = server.client(1).await;
    let (a2, _) = server.client(1).await;
    let mut ok = [0usize; 2];
    let mut limited = [0usize; 2];
    for i in 0..40 {
        for (k, c) in [&a1, &a2].into_iter().enumerate() {
            match c
                .send(
                    Destination::User(2),
                    MessageKind::Chat,
                    chat(format!("{i}")),
                )
                .await
            {
                Ok(_) => ok[k] += 1,
                Err(e) => {
                    assert_eq!(rejected::<()>(Err(e)), ErrorCode::SEND_RATE_LIMITED);
                    limited[k] += 1;
                }
            }
        }
    }
    println!("accepted {ok:?}, limited {limited:?}");
    // Each send is a synced write: the loop takes a while, and the buckets
    // refill meanwhile (a few tokens).
    assert!(ok.iter().all(|&n| n <= 30 + 5), "per connection: {ok:?}");
    let total = ok[0] + ok[1];
    assert!((50..=60).contains(&total), "per user: {total} accepted");
    let (bob, _) = server.client(2).await;
    let page = bob.fetch(0, 1000).await.unwrap();
    assert_eq!(
        page.messages.len(),
        total,
        "refused sends are stored nowhere"
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    a1.send(Destination::User(2), MessageKind::Chat, chat("later"))
        .await
        .expect("the connection stayed open and has a budget again");
    let refused = server
        .metric("courier_messages_rejected_total{code=\"SEND_RATE_LIMITED\"}")
        .await;
    assert_eq!(refused as usize, limited[0] + limited[1]);
}

//! A short run of the bundled load generator against the real node, for
//! correctness (not speed): every acknowledged message must arrive exactly
//! once, in order, at every intended recipient (for broadcasts: every
//! consenting one, and no other), and every message a reader acknowledged
//! or marked read must come back to its sender as exactly one delivered or
//! read receipt (as facts by default, as receipt messages when asked).

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use courier_broker::auth::load_or_create_secret;
use courier_loadtest::server::ServerProcess;
use courier_loadtest::{run, Options, Receipts, Scenario, Target};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_to_one_and_group_runs_lose_nothing() {
    let server = Server::start(&[]);
    // (scenario, group or list size, offered messages/s): bounded work.
    for (i, (scenario, group_size, rate)) in [
        (Scenario::OneToOne, 2, 2000.0),
        (Scenario::Group, 5, 1000.0),
        (Scenario::Broadcast, 9, 200.0),
        (Scenario::Mixed, 0, 1000.0),
    ]
    .into_iter()
    .enumerate()
    {
        // Mixed: groups of 3 and 8 (two of 3 for each of 8).
        let sizes = if scenario == Scenario::Mixed {
            vec![(3, 2), (8, 1)]
        } else {
            vec![(group_size, 1)]
        };
        let report = server
            .short_load(scenario, sizes, 10_000 * (i as u64 + 1), rate)
            .await;
        let v = &report.verdict;
        assert!(v.ok(), "{}", report.summary());
        assert!(report.acked > 100, "{}", report.summary());
        assert_eq!(report.acked, report.sent, "every send answered");
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        assert_eq!(
            v.deliveries, v.expected_deliveries,
            "nothing extra, nothing missing"
        );
        // Receipts were checked where the node writes them (not for
        // group messages, which get counts).
        if scenario != Scenario::Group {
            assert!(v.receipts_owed > 100, "{}", report.summary());
            assert!(report.receipts >= v.receipts_owed, "{}", report.summary());
        }
    }
    // One-to-one facts came as facts: no receipt message was stored for
    // them (the broadcast and mixed runs' list copies keep theirs).
    assert!(server.metric("courier_receipt_facts_total").await > 100);
}

/// Senders that take receipts as messages (the generator's old way) get
/// each one exactly once too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receipts_as_messages_are_checked_too() {
    let server = Server::start(&[]);
    let report = run(Options {
        scenario: Scenario::OneToOne,
        users: 20,
        first_user: 70_000,
        duration: Duration::from_secs(2),
        rate: Some(2000.0),
        group_sizes: vec![(2, 1)],
        receipts: Receipts::Messages,
        ..server.load_options()
    })
    .await
    .unwrap();
    println!("{}", report.summary());
    let v = &report.verdict;
    assert!(v.ok(), "{}", report.summary());
    assert!(v.receipts_owed > 100, "{}", report.summary());
    assert!(report.receipts >= v.receipts_owed, "{}", report.summary());
    assert_eq!(server.metric("courier_receipt_facts_total").await, 0);
    assert!(server.metric("courier_receipts_stored_total").await > 100);
}

/// Clients that drop their sessions every ~0.3 s, retry what was not
/// acknowledged and resume after what they saw: nothing lost, nothing
/// twice, nothing out of order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnect_storm_loses_nothing() {
    let server = Server::start(&[]);
    let report = run(Options {
        scenario: Scenario::Reconnect,
        users: 20,
        first_user: 50_000,
        duration: Duration::from_secs(3),
        rate: Some(1000.0),
        reconnect_every: Duration::from_millis(300),
        ..server.load_options()
    })
    .await
    .unwrap();
    println!("{}", report.summary());
    let v = &report.verdict;
    assert!(v.ok(), "{}", report.summary());
    assert!(report.reconnects >= 40, "{}", report.summary());
    assert!(report.acked > 1000, "{}", report.summary());
    assert_eq!(v.deliveries, v.expected_deliveries, "{}", report.summary());
    assert!(report.errors.is_empty(), "{:?}", report.errors);
}

/// `--chaos-kill`: the generator SIGKILLs the real server every second
/// and restarts it; clients reconnect, retry and resume, and every
/// acknowledged message (one-to-one and group) still arrives exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_kills_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let key = load_or_create_secret(&dir.path().join("secret.key")).unwrap();
    for (i, (scenario, sizes)) in [
        (Scenario::OneToOne, vec![(2, 1)]),
        (Scenario::Group, vec![(5, 1)]),
    ]
    .into_iter()
    .enumerate()
    {
        let addr = format!("127.0.0.1:{}", free_port());
        let command = vec![
            env!("CARGO_BIN_EXE_courier").to_string(),
            "serve".into(),
            "--listen".into(),
            addr.clone(),
            "--admin-listen".into(),
            "127.0.0.1:0".into(),
            "--data-dir".into(),
            dir.path().display().to_string(),
        ];
        let a = addr.clone();
        let server = tokio::task::spawn_blocking(move || ServerProcess::start(command, &a))
            .await
            .unwrap()
            .unwrap();
        let report = run(Options {
            scenario,
            users: 10,
            first_user: 60_000 + 1_000 * i as u64,
            duration: Duration::from_secs(4),
            rate: Some(500.0),
            group_sizes: sizes,
            chaos_kill: Some(Duration::from_millis(1200)),
            server: Some(Arc::new(server)),
            ..Options::new(Target::Courier, addr, key.clone())
        })
        .await
        .unwrap();
        println!("{}", report.summary());
        let v = &report.verdict;
        assert!(v.ok(), "{}", report.summary());
        assert!(report.kills >= 2, "{}", report.summary());
        assert!(report.reconnects >= 10, "{}", report.summary());
        assert!(report.acked > 200, "{}", report.summary());
        assert_eq!(v.deliveries, v.expected_deliveries, "{}", report.summary());
    }
}

/// Idle sessions over two loopback source addresses: all open, all still
/// answer after the hold, and the server's memory per connection is
/// measured (the figure itself is for docs/BENCHMARKS.md, not asserted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_held_and_measured() {
    let server = Server::start(&[]);
    let pid = server.child.id();
    let report = run(Options {
        scenario: Scenario::Idle,
        users: 2_000,
        first_user: 70_000,
        duration: Duration::from_secs(2),
        server: Some(Arc::new(ServerProcess::existing(pid, &server.addr))),
        source_addrs: vec!["127.0.0.1".parse().unwrap(), "127.0.0.2".parse().unwrap()],
        ..server.load_options()
    })
    .await
    .unwrap();
    println!("{}", report.summary());
    let idle = report.idle.as_ref().unwrap();
    assert_eq!(idle.connections, 2_000, "{}", report.summary());
    assert_eq!(idle.alive_at_end, 2_000, "{}", report.summary());
    assert!(idle.server_rss_after.is_some() && idle.server_bytes_per_connection.is_some());
}

/// The business scenario: businesses registered over the admin port send
/// their template to broadcast lists that the consent ledger filters, and
/// one customer of each opts out half-way. The checker holds that every
/// consenting customer got every acknowledged message once, in order, the
/// one who opted out none acknowledged after, and the customers who never
/// opted in (one in ten) nothing. The per-customer rate (one per 6 s) is opened up so that
/// a load can run; every other rule applies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_business_run_reaches_exactly_the_customers_who_opted_in() {
    let server = Server::start(&[
        ("COURIER_BUSINESS_PER_CUSTOMER_INTERVAL_MS", "1"),
        ("COURIER_BUSINESS_PER_CUSTOMER_BURST", "100000"),
    ]);
    let report = run(Options {
        scenario: Scenario::Business,
        // Two businesses with ten customers each.
        users: 22,
        first_user: 70_000,
        duration: Duration::from_secs(2),
        rate: Some(200.0),
        group_sizes: vec![(10, 1)],
        metrics: Some(server.admin.clone()),
        ..server.load_options()
    })
    .await
    .unwrap();
    println!("{}", report.summary());
    let v = &report.verdict;
    assert!(v.ok(), "{}", report.summary());
    assert!(report.acked > 100, "{}", report.summary());
    assert_eq!(report.acked, report.sent, "every send answered");
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(v.deliveries, v.expected_deliveries, "{}", report.summary());
    // Nine of each business's ten customers opted in; one of them opts
    // out half-way: the messages before go to nine, those after to eight.
    assert!(
        v.expected_deliveries > report.acked * 8 && v.expected_deliveries < report.acked * 9,
        "{}",
        report.summary()
    );
}

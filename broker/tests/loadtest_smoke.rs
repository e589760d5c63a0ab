//! A short run of the bundled load generator against the real node, for
//! correctness (not speed): every acknowledged message must arrive exactly
//! once, in order, at every intended recipient (for broadcasts: every
//! consenting one, and no other).

mod common;

use std::time::Duration;

use common::*;
use courier_broker::auth::load_or_create_secret;
use courier_loadtest::{run, Options, Scenario, Target};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_to_one_and_group_runs_lose_nothing() {
    let server = Server::start(&[]);
    let key = load_or_create_secret(&server.data_dir.join("secret.key")).unwrap();
    // (scenario, group or list size, offered messages/s): bounded work.
    for (i, (scenario, group_size, rate)) in [
        (Scenario::OneToOne, 0, 2000.0),
        (Scenario::Group, 5, 1000.0),
        (Scenario::Broadcast, 9, 200.0),
    ]
    .into_iter()
    .enumerate()
    {
        let report = run(Options {
            target: Target::Courier,
            addr: server.addr.clone(),
            key: key.clone(),
            scenario,
            users: 20,
            first_user: 10_000 * (i as u64 + 1),
            duration: Duration::from_secs(2),
            size: 100,
            rate: Some(rate),
            window: 16,
            group_size,
            progress: false,
        })
        .await
        .unwrap();
        println!("{}", report.summary());
        let v = &report.verdict;
        assert!(v.ok(), "{}", report.summary());
        assert!(report.acked > 100, "{}", report.summary());
        assert_eq!(report.acked, report.sent, "every send answered");
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        assert_eq!(
            v.deliveries, v.expected_deliveries,
            "nothing extra, nothing missing"
        );
    }
}

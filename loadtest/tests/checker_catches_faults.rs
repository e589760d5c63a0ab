//! The generator's checker against a relay that misbehaves on purpose: a
//! clean relay passes; one that drops, duplicates or reorders deliveries
//! (while acknowledging every send) is caught, each fault by its name.

use std::time::Duration;

use courier_loadtest::relay::{start, Faults};
use courier_loadtest::{run, Options, Report, Scenario, Target};
use courier_protocol::token::TokenKey;

async fn run_against(faults: Faults, scenario: Scenario) -> Report {
    run_paced(faults, scenario, Some(4000.0)).await
}

/// `rate` `None`: closed loop (the window always full).
async fn run_paced(faults: Faults, scenario: Scenario, rate: Option<f64>) -> Report {
    let addr = start("127.0.0.1:0", faults).await.unwrap();
    run(Options {
        scenario,
        users: 8,
        first_user: 1,
        duration: Duration::from_millis(1500),
        size: 64,
        rate,
        window: 8,
        group_sizes: vec![(4, 1)],
        ..Options::new(Target::Relay, addr.to_string(), TokenKey::new(vec![1; 32]))
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_faithful_relay_passes() {
    for scenario in [Scenario::OneToOne, Scenario::Group] {
        let r = run_against(Faults::default(), scenario).await;
        assert!(r.verdict.ok(), "{}", r.summary());
        assert!(r.acked > 1000, "{}", r.summary());
        assert_eq!(r.verdict.deliveries, r.verdict.expected_deliveries);
    }
    // Closed loop: every sender keeps its window full for the whole run.
    let r = run_paced(Faults::default(), Scenario::OneToOne, None).await;
    assert!(r.verdict.ok(), "{}", r.summary());
    assert!(r.acked > 1000, "{}", r.summary());
    assert_eq!(r.acked, r.sent, "{}", r.summary());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drops_duplicates_and_reorders_are_caught() {
    let r = run_against(
        Faults {
            drop_every: 97,
            ..Faults::default()
        },
        Scenario::OneToOne,
    )
    .await;
    assert!(r.verdict.lost > 0, "{}", r.summary());
    assert_eq!((r.verdict.duplicates, r.verdict.reordered), (0, 0));

    let r = run_against(
        Faults {
            duplicate_every: 89,
            ..Faults::default()
        },
        Scenario::OneToOne,
    )
    .await;
    assert!(r.verdict.duplicates > 0, "{}", r.summary());
    assert_eq!((r.verdict.lost, r.verdict.reordered), (0, 0));

    let r = run_against(
        Faults {
            reorder_every: 83,
            ..Faults::default()
        },
        Scenario::OneToOne,
    )
    .await;
    assert!(r.verdict.reordered > 0, "{}", r.summary());
    assert_eq!(r.verdict.duplicates, 0, "{}", r.summary());
}

/// A shard that never comes back: the resilient sender retries its
/// refused sends (as a phone does) only until 30 s after the sending time,
/// then gives them up, counted and named, and the run ends and reports
/// instead of waiting for ever. Nothing acknowledged is lost meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sends_refused_for_ever_are_abandoned_and_the_run_ends() {
    let addr = start(
        "127.0.0.1:0",
        Faults {
            unavailable_from: 300,
            ..Faults::default()
        },
    )
    .await
    .unwrap();
    let opts = Options {
        scenario: Scenario::OneToOne,
        users: 8,
        first_user: 1,
        duration: Duration::from_millis(1500),
        size: 64,
        rate: Some(1000.0),
        window: 4,
        resilient: true,
        // Resuming is Courier's: the relay speaks its protocol.
        ..Options::new(
            Target::Courier,
            addr.to_string(),
            TokenKey::new(vec![1; 32]),
        )
    };
    // Bounded here too: the generator's own bound is what is tested.
    let r = tokio::time::timeout(Duration::from_secs(120), run(opts))
        .await
        .expect("the run ended")
        .unwrap();
    println!("{}", r.summary());
    assert!(r.verdict.ok(), "{}", r.summary());
    assert!(r.retried > 0, "{}", r.summary());
    assert_eq!(r.acked, 299, "{}", r.summary());
    assert!(r.abandoned > 0, "{}", r.summary());
    assert_eq!(r.acked + r.abandoned, r.sent, "{}", r.summary());
    assert!(
        r.errors
            .keys()
            .any(|e| e.contains("refused SHARD_UNAVAILABLE")),
        "{}",
        r.summary()
    );
}

//! The idle scenario: many connections that only keep their sessions
//! alive. It measures what they cost (the server's resident memory per
//! connection, when the server's pid is known, and the generator's own),
//! how fast they can be opened, and whether every one still answers after
//! the hold (keepalives kept it open).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use courier_client::Client;
use futures_util::stream::{self, StreamExt};

use crate::checker::Verdict;
use crate::endpoint::courier::client_error;
use crate::latency::Percentiles;
use crate::options::Options;
use crate::report::{IdleReport, Report};
use crate::server::rss_bytes;

/// Handshakes in flight at once while connecting.
const CONNECTING: usize = 256;

pub(crate) async fn run(opts: Options) -> anyhow::Result<Report> {
    anyhow::ensure!(
        opts.target == crate::Target::Courier,
        "the idle scenario runs against Courier"
    );
    let server_rss = || opts.server.as_ref().and_then(|s| s.rss_bytes());
    let own_rss = || rss_bytes(std::process::id()).unwrap_or(0);
    let server_before = server_rss();
    let own_before = own_rss();

    let started = Instant::now();
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    let mut first_failure = None;
    let mut clients = Vec::with_capacity(opts.users as usize);
    let mut keepalive_ms = 0;
    let mut attempts = stream::iter(0..opts.users)
        .map(|i| {
            let mut config = opts.client_config(i);
            config.connect_timeout = Duration::from_secs(30);
            Client::connect(config)
        })
        .buffer_unordered(CONNECTING);
    let mut progress_at = Instant::now();
    while let Some(r) = attempts.next().await {
        match r {
            Ok((c, welcome)) => {
                keepalive_ms = welcome.keepalive_ms;
                clients.push(c);
            }
            Err(e) => {
                let reason = e.to_string();
                first_failure.get_or_insert_with(|| reason.clone());
                *errors.entry(client_error(e)).or_default() += 1;
            }
        }
        if opts.progress && progress_at.elapsed() >= Duration::from_secs(1) {
            progress_at = Instant::now();
            eprintln!(
                "connecting: {} open, {} failed",
                clients.len(),
                errors.values().sum::<u64>()
            );
        }
    }
    drop(attempts);
    let connect_s = started.elapsed().as_secs_f64();
    let failed = errors.values().sum();
    if opts.progress {
        eprintln!(
            "{} sessions open in {connect_s:.1} s ({failed} failed); holding for {:?}",
            clients.len(),
            opts.duration
        );
    }

    let hold = Instant::now();
    tokio::time::sleep(opts.duration).await;
    let held_s = hold.elapsed().as_secs_f64();
    let server_after = server_rss();
    let own_after = own_rss();

    // Every held session must still answer.
    let alive = stream::iter(clients.iter())
        .map(|c| async move { c.ping().await.is_ok() })
        .buffer_unordered(CONNECTING)
        .filter(|ok| std::future::ready(*ok))
        .count()
        .await as u64;
    let n = clients.len() as u64;
    drop(clients);

    let per = |before: u64, after: u64| after.saturating_sub(before) as f64 / n.max(1) as f64;
    Ok(Report {
        target: opts.target,
        scenario: opts.scenario,
        users: opts.users,
        size: 0,
        duration_s: held_s,
        mode: format!("{n} idle sessions held"),
        sent: 0,
        acked: 0,
        delivered: 0,
        errors,
        acked_per_s: 0.0,
        delivered_per_s: 0.0,
        end_to_end: Percentiles::default(),
        send_to_ack: Percentiles::default(),
        end_to_end_curve: Vec::new(),
        timeline: Vec::new(),
        verdict: Verdict::default(),
        reconnects: 0,
        retried: 0,
        redelivered: 0,
        unanswered: 0,
        abandoned: 0,
        kills: 0,
        idle: Some(IdleReport {
            connections: n,
            failed,
            first_failure,
            connect_s,
            connects_per_s: n as f64 / connect_s.max(1e-9),
            held_s,
            keepalive_ms,
            alive_at_end: alive,
            server_rss_before: server_before,
            server_rss_after: server_after,
            server_bytes_per_connection: server_before.zip(server_after).map(|(b, a)| per(b, a)),
            generator_bytes_per_connection: per(own_before, own_after),
        }),
        label: None,
        acks: None,
        receipts_as: None,
        read_share: 0.0,
        receipts: 0,
        generator_cpu: None,
        stages: Vec::new(),
    })
}

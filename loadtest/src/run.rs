//! Runs one scenario against a Courier node and measures it.
//!
//! Every simulated user is one connection (one `courier-client` session).
//! Senders stamp each payload with its conversation, its number in the
//! conversation and its *intended* send time; receivers measure end-to-end
//! latency against that intended time. In an open-loop run (`rate`) the
//! intended times follow the offered rate whatever the server does, so a
//! server that falls behind shows its queueing in the latencies instead of
//! slowing the generator down (no coordinated omission). In a closed-loop
//! run (`window`) each sender keeps that many sends in flight.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::stream::{FuturesUnordered, StreamExt};

use crate::checker::Checker;
use crate::endpoint::{connect_all, Endpoint, Source};
use crate::options::{Options, Scenario, Target};
use crate::pacer::Pacer;
use crate::plan::{client_msg_id, conversation, plan, Numbering, Route, Routes};
use crate::report::{report, Report};
use crate::stamp::{payload, HEADER_LEN};
use crate::tally::{Shared, Tally};

pub async fn run(opts: Options) -> anyhow::Result<Report> {
    anyhow::ensure!(
        opts.size >= HEADER_LEN,
        "message size must be at least {HEADER_LEN} bytes"
    );
    crate::fds::ensure_room(opts.users)?;
    if opts.scenario == Scenario::Idle {
        return crate::idle::run(opts).await;
    }
    if opts.resilient() {
        anyhow::ensure!(
            opts.target == Target::Courier,
            "reconnects and chaos kills need the courier target (resume is Courier's)"
        );
    }
    if opts.chaos_kill.is_some() {
        anyhow::ensure!(
            opts.server.as_ref().is_some_and(|s| s.can_restart()),
            "--chaos-kill needs a server this generator started (--server-cmd)"
        );
    }
    let plan = plan(&opts)?;
    let (endpoints, sources, routes) = connect_all(&opts, &plan).await?;
    let routes = Arc::new(routes);
    let sending = plan.routes.iter().filter(|r| !r.is_empty()).count();
    let shared = Arc::new(Shared::new(sending));

    let mut tasks = Vec::new();
    let mut sender_index = 0;
    for (i, ((endpoint, source), my_routes)) in endpoints
        .into_iter()
        .zip(sources)
        .zip(plan.routes)
        .enumerate()
    {
        let me = opts.first_user + i as u64;
        let pacer = Pacer::new(&opts, shared.start, sending, sender_index);
        if !my_routes.is_empty() {
            sender_index += 1;
        }
        if opts.resilient() {
            let Endpoint::Courier(client) = endpoint else {
                unreachable!("checked: courier target")
            };
            let user = crate::session::User {
                me,
                client,
                routes: my_routes,
                pacer,
                window: opts.window.max(1),
                size: opts.size,
                lifetime: (opts.scenario == Scenario::Reconnect).then_some(opts.reconnect_every),
            };
            tasks.push(tokio::spawn(user.run(shared.clone(), routes.clone())));
            continue;
        }
        let receiver = tokio::spawn(receive(me, source, shared.clone()));
        let sender = tokio::spawn(send(
            me,
            Arc::new(endpoint),
            my_routes,
            pacer,
            (opts.size, opts.window.max(1)),
            shared.clone(),
            routes.clone(),
        ));
        tasks.push(tokio::spawn(async move {
            let mut checker = sender.await.expect("sender task");
            checker.merge(receiver.await.expect("receiver task"));
            checker
        }));
    }

    let kills = Arc::new(AtomicU64::new(0));
    let chaos = match (opts.chaos_kill, opts.server.clone()) {
        (Some(every), Some(server)) => Some(tokio::spawn(chaos(
            every,
            server,
            shared.clone(),
            kills.clone(),
        ))),
        _ => None,
    };
    let progress = tokio::spawn(progress(shared.clone(), opts.progress));

    // Sending ends (every sender's last acks are in, or it gave up).
    while shared.sending_left.load(Ordering::Relaxed) > 0 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let send_end = shared.start.elapsed();
    if let Some(chaos) = chaos {
        chaos.await?;
    }
    // Deliveries drain: wait until every expected one arrived or nothing
    // moved for two seconds (bounded).
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = (shared.delivered.load(Ordering::Relaxed), Instant::now());
    loop {
        let d = shared.delivered.load(Ordering::Relaxed);
        let expected = shared.expected.load(Ordering::Relaxed);
        if d >= expected || last.1.elapsed() > Duration::from_secs(2) || Instant::now() > deadline {
            break;
        }
        if d != last.0 {
            last = (d, Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    shared.stop.store(true, Ordering::Relaxed);
    let mut checker = Checker::new();
    for t in tasks {
        checker.merge(t.await?);
    }
    let _ = progress.await;
    let (ack_h, e2e_h) = shared.totals.lock().expect("totals").clone();
    let mut report = report(&opts, &shared, send_end, &ack_h, &e2e_h, checker.verify());
    report.kills = kills.load(Ordering::Relaxed);
    Ok(report)
}

/// One connection's receiving: latencies and what arrived, until the run stops.
async fn receive(me: u64, mut source: Source, shared: Arc<Shared>) -> Checker {
    let mut checker = Checker::new();
    let mut tally = Tally::new();
    loop {
        let payload = match source.next(Duration::from_millis(200)).await {
            Ok(Some(p)) => p,
            Ok(None) => {
                if shared.stop.load(Ordering::Relaxed) {
                    break;
                }
                continue;
            }
            Err(()) => break,
        };
        shared.delivery(me, &payload, &mut checker, &mut tally);
    }
    tally.flush(&shared);
    checker
}

/// One user's sending: open or closed loop over its routes, acks awaited
/// together on this task (no task or lock per send).
async fn send(
    me: u64,
    endpoint: Arc<Endpoint>,
    my_routes: Vec<Route>,
    pacer: Pacer,
    (size, window): (usize, usize),
    shared: Arc<Shared>,
    routes: Arc<Routes>,
) -> Checker {
    let mut checker = Checker::new();
    if my_routes.is_empty() {
        return checker;
    }
    let mut tally = Tally::new();
    let mut numbering = Numbering::new(me, my_routes.len());
    let mut inflight = FuturesUnordered::new();
    let finish = |(ri, n, intended, r): (usize, u64, Instant, Result<(), String>),
                  checker: &mut Checker,
                  tally: &mut Tally| match r {
        Ok(()) => shared.acked(
            (conversation(me, ri), n, &my_routes[ri].recipients),
            intended,
            checker,
            tally,
        ),
        Err(e) => shared.error(e),
    };
    while let Some(intended) = pacer.intended(numbering.count) {
        // Wait for the intended time and for room in the window, taking
        // acks as they come.
        loop {
            let room = inflight.len() < window;
            if room && Instant::now() >= intended {
                break;
            }
            tokio::select! {
                _ = tokio::time::sleep_until(intended.into()), if room => {}
                Some(done) = inflight.next(), if !inflight.is_empty() => {
                    finish(done, &mut checker, &mut tally);
                }
            }
        }
        let (ri, n) = numbering.next(&my_routes);
        let body = payload(conversation(me, ri), n, shared.since_start(intended), size);
        shared.sent(&mut tally);
        // Queued now, in order; the ack is awaited with the others.
        let id = client_msg_id(routes.tag, ri, n);
        let pending = endpoint.start_send(me, id, my_routes[ri].dest, &routes, body);
        inflight.push(async move {
            let r = match pending {
                Ok(ack) => ack.await,
                Err(e) => Err(e),
            };
            (ri, n, intended, r)
        });
    }
    // This sender's last acks (bounded).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while let Ok(Some(done)) = tokio::time::timeout_at(deadline, inflight.next()).await {
        finish(done, &mut checker, &mut tally);
    }
    tally.flush(&shared);
    shared.sending_left.fetch_sub(1, Ordering::Relaxed);
    checker
}

/// Kills the server every `every` while messages are being sent, and
/// restarts it at once.
async fn chaos(
    every: Duration,
    server: Arc<crate::server::ServerProcess>,
    shared: Arc<Shared>,
    kills: Arc<AtomicU64>,
) {
    loop {
        tokio::time::sleep(every).await;
        if shared.sending_left.load(Ordering::Relaxed) == 0 {
            return;
        }
        let s = server.clone();
        match tokio::task::spawn_blocking(move || s.kill_and_restart()).await {
            Ok(Ok(())) => {
                kills.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Err(e)) => {
                shared.error(format!("restart failed: {e}"));
                return;
            }
            Err(e) => {
                shared.error(format!("restart failed: {e}"));
                return;
            }
        }
    }
}

/// A progress line every second until the run stops.
async fn progress(shared: Arc<Shared>, show: bool) {
    let mut last = (0, 0, 0);
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        if shared.stop.load(Ordering::Relaxed) {
            break;
        }
        let now = (
            shared.sent.load(Ordering::Relaxed),
            shared.acked.load(Ordering::Relaxed),
            shared.delivered.load(Ordering::Relaxed),
        );
        if show {
            let t = shared.start.elapsed().as_secs();
            let p99 = {
                let s = shared.seconds.lock().expect("seconds");
                s.get(t.saturating_sub(1) as usize)
                    .map(|x| x.3.value_at_quantile(0.99))
                    .unwrap_or(0)
            };
            let errors: u64 = shared.errors.lock().expect("errors").values().sum();
            eprintln!(
                "t={t:>3}s sent {:>8}/s acked {:>8}/s delivered {:>8}/s e2e p99 {:>7} us errors {errors} reconnects {}",
                now.0 - last.0,
                now.1 - last.1,
                now.2 - last.2,
                p99,
                shared.reconnects.load(Ordering::Relaxed),
            );
        }
        last = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use courier_protocol::token::TokenKey;

    /// Options that cannot work are refused before any connection.
    #[tokio::test]
    async fn impossible_options_are_refused_up_front() {
        let base = || Options::new(Target::Courier, "127.0.0.1:1", TokenKey::new(vec![1; 32]));
        let err = |o: Options| async move { run(o).await.unwrap_err().to_string() };
        let e = err(Options {
            chaos_kill: Some(Duration::from_secs(1)),
            ..base()
        })
        .await;
        assert!(e.contains("--server-cmd"), "{e}");
        let e = err(Options {
            scenario: Scenario::Reconnect,
            ..Options::new(Target::Nats, "127.0.0.1:1", TokenKey::new(vec![1; 32]))
        })
        .await;
        assert!(e.contains("courier target"), "{e}");
        let e = err(Options { size: 8, ..base() }).await;
        assert!(e.contains("at least"), "{e}");
        let e = err(Options { users: 3, ..base() }).await;
        assert!(e.contains("even number"), "{e}");
    }
}

//! Runs one scenario against a Courier node and measures it.
//!
//! Every simulated user is one connection. Courier and relay users run as
//! [`crate::driver`] loops over raw sessions, on one thread per core;
//! peer broker users (and Courier users that reconnect) as tasks.
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

use std::future::Future;
use std::pin::Pin;

use courier_client::RawSession;
use futures_util::stream::{FuturesUnordered, StreamExt};

use crate::checker::Checker;
use crate::driver::{drive, Habits, Sender};
use crate::endpoint::{connect_all, set_up_only, Endpoint};
use crate::options::{Options, Scenario, Target};
use crate::pacer::Pacer;
use crate::peers::Inbox;
use crate::plan::{client_msg_id, conversation, plan, Numbering, Plan, Route, Routes};
use crate::report::{report, Report};
use crate::stamp::{payload, HEADER_LEN};
use crate::tally::{Phase, Shared, Tally};

pub async fn run(opts: Options) -> anyhow::Result<Report> {
    anyhow::ensure!(
        opts.size >= HEADER_LEN,
        "message size must be at least {HEADER_LEN} bytes"
    );
    anyhow::ensure!(
        (0.0..=1.0).contains(&opts.read_share),
        "the read share is a fraction between 0 and 1"
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
    // The business scenario: each list's leaving customer, opting out
    // half-way through.
    let leavers: Vec<(u64, u64)> = plan
        .routes
        .iter()
        .flatten()
        .filter_map(|r| match r.dest {
            crate::plan::Dest::List(l) => r.leaving.map(|c| (plan.lists[l].0, c)),
            _ => None,
        })
        .collect();
    let driven = matches!(opts.target, Target::Courier | Target::Relay) && !opts.resilient();
    let (shared, users) = if driven {
        start_driven(&opts, plan).await?
    } else {
        start_tasks(&opts, plan).await?
    };
    let metrics_before = read_metrics(&opts).await;
    let cpu_at_start = process_cpu();

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
    if let (false, Some(admin)) = (leavers.is_empty(), opts.metrics.clone()) {
        let (key, half, shared) = (opts.key.clone(), opts.duration / 2, shared.clone());
        tokio::spawn(async move {
            tokio::time::sleep(half).await;
            for (business, customer) in leavers {
                let left =
                    crate::endpoint::courier::opt_out(&admin, &key, business, customer).await;
                if let Err(e) = left {
                    shared.error(format!("opting out: {e}"));
                }
            }
        });
    }

    // Sending ends (every sender's last acks are in, or it gave up). Each
    // sender bounds its own waits; this bounds the sum, so a sender that
    // still waits on something unforeseen ends the run with an error
    // instead of holding it (its unacknowledged sends are abandoned).
    let senders_limit = shared.start + opts.duration + SENDERS_GRACE;
    let mut senders_stuck = false;
    while shared.sending_left.load(Ordering::Relaxed) > 0 {
        if Instant::now() > senders_limit {
            senders_stuck = true;
            let left = shared.sending_left.load(Ordering::Relaxed);
            shared.error(format!(
                "{left} senders still sending {SENDERS_GRACE:?} after the sending time; stopped"
            ));
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let send_end = shared.start.elapsed();
    let cpu = process_cpu().saturating_sub(cpu_at_start);
    if let Some(chaos) = chaos {
        // It kills until sending ends, which it did not if senders stuck.
        if senders_stuck {
            chaos.abort();
        } else {
            chaos.await?;
        }
    }
    // Deliveries drain: wait until every expected one arrived or nothing
    // moved for two seconds (bounded).
    settle(&shared, Duration::from_secs(30), || {
        let d = shared.delivered.load(Ordering::Relaxed);
        (d, d >= shared.expected.load(Ordering::Relaxed))
    })
    .await;
    // Then every user acknowledges all it read, and the receipts that
    // calls for come back (Courier's users only: nobody else writes them).
    let receipts = driven && opts.target == Target::Courier;
    if receipts {
        shared.set_phase(Phase::Settling);
        settle(&shared, Duration::from_secs(15), || {
            (shared.receipts.load(Ordering::Relaxed), false)
        })
        .await;
    }
    let metrics_after = read_metrics(&opts).await;
    shared.set_phase(Phase::Stopped);
    let mut checker = Checker::new();
    for u in users {
        checker.merge(u.await?);
    }
    let _ = progress.await;
    let (ack_h, e2e_h) = shared.totals.lock().expect("totals").clone();
    let mut report = report(&opts, &shared, send_end, &ack_h, &e2e_h, checker.verify());
    report.kills = kills.load(Ordering::Relaxed);
    report.generator_cpu = Some(cpu.as_secs_f64() / send_end.as_secs_f64().max(1e-9));
    report.receipts = shared.receipts.load(Ordering::Relaxed);
    if let (Some(before), Some(after)) = (metrics_before, metrics_after) {
        report.stages = crate::stages::stages(&before, &after);
    }
    Ok(report)
}

/// How long after the sending time the run waits for its senders: past
/// each sender's own bounds (30 s of retrying or reconnecting after the
/// end, then a last answer's 30 s), so only a sender stuck on something
/// unforeseen meets it.
const SENDERS_GRACE: Duration = Duration::from_secs(90);

/// The node's metrics text, when asked for; a cluster's nodes' texts one
/// after another (their histograms add up). `None`, said why, if one could
/// not be read: the run's own figures stand without it.
async fn read_metrics(opts: &Options) -> Option<String> {
    let addrs = opts.metrics.clone()?;
    let read = move || -> std::io::Result<String> {
        let mut all = String::new();
        for addr in addrs.split(',').map(str::trim) {
            all.push_str(&crate::stages::scrape(addr)?);
            all.push('\n');
        }
        Ok(all)
    };
    match tokio::task::spawn_blocking(read).await {
        Ok(Ok(text)) => Some(text),
        Ok(Err(e)) => {
            eprintln!("loadtest: reading the node's metrics failed: {e}");
            None
        }
        Err(_) => None,
    }
}

/// Waits until `progress` says done, or its count stood still for two
/// seconds, or `limit` passed.
async fn settle(shared: &Shared, limit: Duration, progress: impl Fn() -> (u64, bool)) {
    let deadline = Instant::now() + limit;
    let mut last = (progress().0, Instant::now());
    loop {
        let (count, done) = progress();
        if done || last.1.elapsed() > Duration::from_secs(2) || Instant::now() > deadline {
            break;
        }
        if count != last.0 {
            last = (count, Instant::now());
        }
        if shared.stopped() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// What a user (or a thread of users) hands the checker at the end.
type Pending = Pin<Box<dyn Future<Output = anyhow::Result<Checker>> + Send>>;

/// Courier and relay users as driver loops, spread over one thread per
/// core (each a single-threaded runtime: a user's loop never moves between
/// cores). Every thread connects its users first; the clock starts when
/// all are connected.
async fn start_driven(opts: &Options, plan: Plan) -> anyhow::Result<(Arc<Shared>, Vec<Pending>)> {
    let routes = Arc::new(set_up_only(opts, &plan).await?);
    let threads = opts.threads().min(opts.users as usize).max(1);
    let sending = plan.routes.iter().filter(|r| !r.is_empty()).count();
    let mut assigned: Vec<Vec<(u64, Vec<Route>, usize)>> = vec![Vec::new(); threads];
    let mut sender_index = 0;
    for (i, r) in plan.routes.into_iter().enumerate() {
        let si = sender_index;
        if !r.is_empty() {
            sender_index += 1;
        }
        assigned[i % threads].push((i as u64, r, si));
    }
    let habits = Habits {
        acks: opts.acks,
        read_share: opts.read_share,
        read_delay: opts.read_delay,
        window: opts.window.max(1),
        size: opts.size,
        receipts: opts.target == Target::Courier,
        facts: opts.target == Target::Courier && opts.receipts == crate::options::Receipts::Facts,
    };
    let mut ready = Vec::new();
    let mut go = Vec::new();
    let mut done = Vec::new();
    for (t, users) in assigned.into_iter().enumerate() {
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<anyhow::Result<()>>();
        let (go_tx, go_rx) = std::sync::mpsc::sync_channel::<Arc<Shared>>(1);
        let (done_tx, done_rx) = tokio::sync::oneshot::channel::<Checker>();
        let (opts, routes) = (opts.clone(), routes.clone());
        std::thread::Builder::new()
            .name(format!("loadtest-{t}"))
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.into()));
                        return;
                    }
                };
                let sessions = rt.block_on(async {
                    let mut sessions = Vec::with_capacity(users.len());
                    for (i, _, _) in &users {
                        sessions.push(RawSession::open(&opts.client_config(*i)).await?);
                    }
                    anyhow::Ok(sessions)
                });
                let sessions = match sessions {
                    Ok(s) => {
                        let _ = ready_tx.send(Ok(()));
                        s
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let Ok(shared) = go_rx.recv() else { return };
                let checker = rt.block_on(async {
                    let mut loops = Vec::with_capacity(users.len());
                    for ((i, my_routes, si), session) in users.into_iter().zip(sessions) {
                        let sender = (!my_routes.is_empty()).then(|| Sender {
                            pacer: Pacer::new(&opts, shared.start, sending, si),
                            routes: my_routes,
                        });
                        loops.push(tokio::spawn(drive(
                            opts.first_user + i,
                            session,
                            sender,
                            habits,
                            shared.clone(),
                            routes.clone(),
                        )));
                    }
                    let mut checker = Checker::new();
                    for l in loops {
                        if let Ok(c) = l.await {
                            checker.merge(c);
                        }
                    }
                    checker
                });
                let _ = done_tx.send(checker);
            })?;
        ready.push(ready_rx);
        go.push(go_tx);
        done.push(done_rx);
    }
    for r in ready {
        r.await
            .map_err(|_| anyhow::anyhow!("a generator thread failed"))??;
    }
    let shared = Arc::new(Shared::new(sending));
    for g in go {
        g.send(shared.clone())?;
    }
    let pending = done
        .into_iter()
        .map(|d| -> Pending {
            Box::pin(async move {
                d.await
                    .map_err(|_| anyhow::anyhow!("a generator thread failed"))
            })
        })
        .collect();
    Ok((shared, pending))
}

/// Users as tasks on this runtime: a sender and a receiver per peer
/// broker user, one resilient task per Courier user that reconnects.
async fn start_tasks(opts: &Options, plan: Plan) -> anyhow::Result<(Arc<Shared>, Vec<Pending>)> {
    let (users, routes) = connect_all(opts, &plan).await?;
    let routes = Arc::new(routes);
    let sending = plan.routes.iter().filter(|r| !r.is_empty()).count();
    let shared = Arc::new(Shared::new(sending));
    let mut tasks: Vec<Pending> = Vec::new();
    let mut sender_index = 0;
    let addrs: Arc<Vec<String>> =
        Arc::new(opts.addr.split(',').map(|a| a.trim().to_owned()).collect());
    for (i, ((endpoint, inbox), my_routes)) in users.into_iter().zip(plan.routes).enumerate() {
        let me = opts.first_user + i as u64;
        let pacer = Pacer::new(opts, shared.start, sending, sender_index);
        if !my_routes.is_empty() {
            sender_index += 1;
        }
        let task = match (endpoint, inbox) {
            (Endpoint::Courier(client), _) => {
                let user = crate::session::User {
                    me,
                    client,
                    routes: my_routes,
                    pacer,
                    window: opts.window.max(1),
                    size: opts.size,
                    lifetime: (opts.scenario == Scenario::Reconnect)
                        .then_some(opts.reconnect_every),
                    addrs: addrs.clone(),
                };
                tokio::spawn(user.run(shared.clone(), routes.clone()))
            }
            (endpoint, inbox) => {
                let receiver = inbox.map(|i| tokio::spawn(receive(me, i, shared.clone())));
                let sender = tokio::spawn(send(
                    me,
                    Arc::new(endpoint),
                    my_routes,
                    pacer,
                    (opts.size, opts.window.max(1)),
                    shared.clone(),
                    routes.clone(),
                ));
                tokio::spawn(async move {
                    let mut checker = sender.await.expect("sender task");
                    if let Some(r) = receiver {
                        checker.merge(r.await.expect("receiver task"));
                    }
                    checker
                })
            }
        };
        tasks.push(Box::pin(async move { Ok(task.await?) }));
    }
    Ok((shared, tasks))
}

/// A peer user's receiving: latencies and what arrived, until the run stops.
async fn receive(me: u64, mut inbox: Inbox, shared: Arc<Shared>) -> Checker {
    let mut checker = Checker::new();
    let mut tally = Tally::new();
    loop {
        let payload = match tokio::time::timeout(Duration::from_millis(200), inbox.recv()).await {
            Ok(Some(p)) => p,
            Ok(None) => break,
            Err(_) => {
                if shared.stopped() {
                    break;
                }
                continue;
            }
        };
        shared.delivery(me, &payload, &mut checker, &mut tally);
    }
    tally.flush(&shared);
    checker
}

/// This process's CPU time (user and system, every thread) so far.
fn process_cpu() -> Duration {
    // SAFETY: getrusage writes the struct it is given and nothing else.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) } != 0 {
        return Duration::ZERO;
    }
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(u.ru_utime) + tv(u.ru_stime)
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
        if shared.stopped() {
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

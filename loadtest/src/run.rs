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

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use courier_client::{Client, ClientConfig, ClientError};
use courier_protocol::token::{Claims, TokenKey};
use courier_protocol::{Destination, MessageKind};
use futures_util::stream::{FuturesUnordered, StreamExt};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::checker::{Checker, Verdict};
use crate::latency::{histogram, percentile_curve, record, Percentiles, Second};

/// Payload header: magic, conversation, number, intended send time.
const MAGIC: u32 = u32::from_be_bytes(*b"CLT1");
pub const HEADER_LEN: usize = 4 + 8 + 8 + 8;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    /// Users chat in pairs: each user sends to its partner.
    OneToOne,
    /// Users form groups of `group_size`; each member sends to its group.
    Group,
    /// Users form blocks of one business and `group_size` customers; the
    /// business sends to a broadcast list of its customers, one in ten of
    /// whom has not consented (no contact) and must be skipped.
    Broadcast,
}

/// What the generator measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Target {
    /// A Courier node (tokens minted from its secret).
    Courier,
    /// The bare relay (`courier-loadtest --serve-relay`): no storage, no auth.
    Relay,
    /// NATS core: subjects per user and per group, no durability.
    Nats,
    /// NATS JetStream: one file stream, push consumers per subject.
    Jetstream,
    /// Redis Streams: a stream per inbox and per group.
    Redis,
    /// Mosquitto: MQTT QoS 1, persistent sessions, a topic per inbox and group.
    Mqtt,
}

#[derive(Clone)]
pub struct Options {
    pub target: Target,
    pub addr: String,
    pub key: TokenKey,
    pub scenario: Scenario,
    /// Simulated users (one connection each).
    pub users: u64,
    /// The first user id (ids `first_user .. first_user + users`).
    pub first_user: u64,
    pub duration: Duration,
    /// Payload bytes per message (at least `HEADER_LEN`).
    pub size: usize,
    /// Open loop: messages per second offered in total.
    pub rate: Option<f64>,
    /// Sends in flight per sender (the whole window in closed loop; the
    /// bound on queued sends in open loop).
    pub window: usize,
    pub group_size: usize,
    /// Print a progress line every second.
    pub progress: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Report {
    pub target: Target,
    pub scenario: Scenario,
    pub users: u64,
    pub size: usize,
    pub duration_s: f64,
    pub mode: String,
    pub sent: u64,
    pub acked: u64,
    pub delivered: u64,
    pub errors: BTreeMap<String, u64>,
    pub acked_per_s: f64,
    pub delivered_per_s: f64,
    pub end_to_end: Percentiles,
    pub send_to_ack: Percentiles,
    pub end_to_end_curve: Vec<(f64, u64)>,
    pub timeline: Vec<Second>,
    pub verdict: Verdict,
}

/// One second of the timeline: sent, acked, delivered, end-to-end latencies.
type SecondRow = (u64, u64, u64, Histogram<u64>);

struct Shared {
    start: Instant,
    stop: AtomicBool,
    sent: AtomicU64,
    acked: AtomicU64,
    delivered: AtomicU64,
    /// Nanoseconds from the start to the latest delivery.
    last_delivery_ns: AtomicU64,
    errors: Mutex<BTreeMap<String, u64>>,
    /// Per second: sent, acked, delivered; and end-to-end latencies.
    seconds: Mutex<Vec<SecondRow>>,
}

impl Shared {
    fn second(&self, at: Instant) -> usize {
        at.saturating_duration_since(self.start).as_secs() as usize
    }

    fn bump_at(&self, i: usize, f: impl FnOnce(&mut SecondRow)) {
        let mut s = self.seconds.lock().expect("seconds");
        while s.len() <= i {
            s.push((0, 0, 0, histogram()));
        }
        f(&mut s[i]);
    }

    fn error(&self, name: String) {
        *self.errors.lock().expect("errors").entry(name).or_default() += 1;
    }
}

/// One task's counts for the current second, added to the shared timeline
/// when the second changes: one lock per task per second, not per message.
struct Tally {
    second: usize,
    sent: u64,
    acked: u64,
    delivered: u64,
    e2e: Histogram<u64>,
}

impl Tally {
    fn new() -> Tally {
        Tally {
            second: 0,
            sent: 0,
            acked: 0,
            delivered: 0,
            e2e: histogram(),
        }
    }

    /// Moves to the second of `now`, flushing the previous one.
    fn at(&mut self, shared: &Shared, now: Instant) -> &mut Tally {
        let s = shared.second(now);
        if s != self.second {
            self.flush(shared);
            self.second = s;
        }
        self
    }

    fn flush(&mut self, shared: &Shared) {
        if self.sent + self.acked + self.delivered == 0 {
            return;
        }
        shared.bump_at(self.second, |x| {
            x.0 += self.sent;
            x.1 += self.acked;
            x.2 += self.delivered;
            x.3.add(&self.e2e).expect("same bounds");
        });
        self.sent = 0;
        self.acked = 0;
        self.delivered = 0;
        self.e2e.reset();
    }
}

fn payload(conversation: u64, n: u64, intended_ns: u64, size: usize) -> Bytes {
    let mut b = BytesMut::with_capacity(size.max(HEADER_LEN));
    b.put_u32(MAGIC);
    b.put_u64(conversation);
    b.put_u64(n);
    b.put_u64(intended_ns);
    b.resize(size.max(HEADER_LEN), b'.');
    b.freeze()
}

/// (conversation, n, intended_ns) of a generator payload.
pub fn parse(p: &[u8]) -> Option<(u64, u64, u64)> {
    if p.len() < HEADER_LEN || p[..4] != MAGIC.to_be_bytes() {
        return None;
    }
    let at = |i: usize| u64::from_be_bytes(p[i..i + 8].try_into().expect("8 bytes"));
    Some((at(4), at(12), at(20)))
}

fn client_error(e: ClientError) -> String {
    match e {
        ClientError::Rejected(code, _) => format!("{code:?}"),
        ClientError::Closed(_) => "closed".into(),
        ClientError::Timeout => "timeout".into(),
        _ => "io".into(),
    }
}

/// Where one user sends: a user, a group or a broadcast list (indexes into
/// the plan's groups and lists), or nowhere (a broadcast's customers).
#[derive(Clone, Copy)]
enum Dest {
    User(u64),
    Group(usize),
    List(usize),
    Nobody,
}

/// Who sends where: per user (destination, recipients); the groups'
/// members; the lists' (business, every customer, consenting customers).
struct Plan {
    targets: Vec<(Dest, Vec<u64>)>,
    groups: Vec<Vec<u64>>,
    lists: Vec<(u64, Vec<u64>, Vec<u64>)>,
}

/// What the senders need to name destinations on the target.
struct Routes {
    group_ids: Vec<u64>,
    /// Consenting recipients per list (peers have no lists: the sender
    /// writes to each, as an application on them would).
    lists: Vec<Vec<u64>>,
    tag: u64,
}

fn plan(opts: &Options) -> anyhow::Result<Plan> {
    let users: Vec<u64> = (0..opts.users).map(|i| opts.first_user + i).collect();
    match opts.scenario {
        Scenario::OneToOne => {
            anyhow::ensure!(
                opts.users >= 2 && opts.users.is_multiple_of(2),
                "one-to-one needs an even number of users"
            );
            Ok(Plan {
                targets: (0..users.len())
                    .map(|i| (Dest::User(users[i ^ 1]), vec![users[i ^ 1]]))
                    .collect(),
                groups: Vec::new(),
                lists: Vec::new(),
            })
        }
        Scenario::Group => {
            let k = opts.group_size.max(2);
            anyhow::ensure!(
                opts.users as usize >= k,
                "group needs at least group_size users"
            );
            let groups: Vec<Vec<u64>> = users.chunks(k).map(|c| c.to_vec()).collect();
            let mut targets = Vec::with_capacity(users.len());
            for (gi, members) in groups.iter().enumerate() {
                for &u in members {
                    let others = members.iter().copied().filter(|&m| m != u).collect();
                    targets.push((Dest::Group(gi), others));
                }
            }
            Ok(Plan {
                targets,
                groups,
                lists: Vec::new(),
            })
        }
        Scenario::Broadcast => {
            let k = opts.group_size.max(1) + 1;
            anyhow::ensure!(
                opts.users as usize >= k,
                "broadcast needs at least group_size + 1 users"
            );
            let mut targets = Vec::with_capacity(users.len());
            let mut lists = Vec::new();
            for block in users.chunks(k) {
                let business = block[0];
                let customers = block[1..].to_vec();
                let consenting: Vec<u64> = customers
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| i % 10 != 9)
                    .map(|(_, &c)| c)
                    .collect();
                targets.push((Dest::List(lists.len()), consenting.clone()));
                targets.extend(customers.iter().map(|_| (Dest::Nobody, Vec::new())));
                lists.push((business, customers, consenting));
            }
            Ok(Plan {
                targets,
                groups: Vec::new(),
                lists,
            })
        }
    }
}

type Ack = std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send>>;

/// One simulated user's connection to the target.
enum Endpoint {
    Courier(Arc<Client>),
    Nats(crate::peers::Nats),
    Js(crate::peers::JetStream),
    Redis(crate::peers::Redis),
    Mqtt(crate::peers::Mqtt),
}

/// Where a user's deliveries come from.
enum Source {
    Courier(Arc<Client>, u32),
    Peer(crate::peers::Inbox),
}

impl Source {
    /// The next payload; `Ok(None)` after `wait` without one; `Err` once closed.
    async fn next(&mut self, wait: Duration) -> Result<Option<Bytes>, ()> {
        match self {
            Source::Courier(c, unconfirmed) => match c.next_timeout(wait).await {
                Ok(d) => {
                    *unconfirmed += 1;
                    if *unconfirmed >= 256 {
                        let _ = c.confirm(&d).await;
                        *unconfirmed = 0;
                    }
                    Ok(Some(d.message.payload))
                }
                Err(ClientError::Timeout) => Ok(None),
                Err(_) => Err(()),
            },
            Source::Peer(rx) => match tokio::time::timeout(wait, rx.recv()).await {
                Ok(Some(p)) => Ok(Some(p)),
                Ok(None) => Err(()),
                Err(_) => Ok(None),
            },
        }
    }
}

/// Names of subjects and streams for peers; `tag` keeps runs apart.
fn user_name(tag: u64, u: u64) -> String {
    format!("in.{tag}.{u}")
}
fn group_name(tag: u64, g: usize) -> String {
    format!("g.{tag}.{g}")
}

/// Connects every user and sets up the groups; returns the endpoints, the
/// sources of their deliveries, and the Courier group ids (by plan index).
async fn connect_all(
    opts: &Options,
    plan: &Plan,
) -> anyhow::Result<(Vec<Endpoint>, Vec<Source>, Routes)> {
    let tag = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let mut endpoints = Vec::new();
    let mut sources = Vec::new();
    let my_groups = |u: u64| -> Vec<usize> {
        plan.groups
            .iter()
            .enumerate()
            .filter(|(_, m)| m.contains(&u))
            .map(|(i, _)| i)
            .collect()
    };
    for i in 0..opts.users {
        let u = opts.first_user + i;
        match opts.target {
            Target::Courier | Target::Relay => {
                let token = opts.key.mint(Claims {
                    user_id: u,
                    device_id: 1,
                    expires_at_s: u64::MAX / 2,
                });
                let mut config = ClientConfig::new(opts.addr.clone(), u, 1, token);
                // Start after everything already in the inbox: earlier runs are not ours.
                config.resume_after = Some(u64::MAX);
                let (client, _) = Client::connect(config).await?;
                let client = Arc::new(client);
                sources.push(Source::Courier(client.clone(), 0));
                endpoints.push(Endpoint::Courier(client));
            }
            Target::Nats => {
                let mut subjects = vec![user_name(tag, u)];
                subjects.extend(my_groups(u).into_iter().map(|g| group_name(tag, g)));
                let (c, inbox) = crate::peers::Nats::connect(&opts.addr, &subjects).await?;
                sources.push(Source::Peer(inbox));
                endpoints.push(Endpoint::Nats(c));
            }
            Target::Jetstream => {
                let mut subjects = vec![user_name(tag, u)];
                subjects.extend(my_groups(u).into_iter().map(|g| group_name(tag, g)));
                let stream = format!("CL{tag}");
                let all = [format!("in.{tag}.>"), format!("g.{tag}.>")];
                let (c, inbox) = crate::peers::JetStream::connect(
                    &opts.addr,
                    u,
                    &stream,
                    &all,
                    i == 0,
                    &subjects,
                )
                .await?;
                sources.push(Source::Peer(inbox));
                endpoints.push(Endpoint::Js(c));
            }
            Target::Mqtt => {
                let mut topics = vec![user_name(tag, u).replace('.', "/")];
                topics.extend(
                    my_groups(u)
                        .into_iter()
                        .map(|g| group_name(tag, g).replace('.', "/")),
                );
                let id = format!("u{u}-{tag}");
                let (c, inbox) = crate::peers::Mqtt::connect(&opts.addr, &id, u, &topics).await?;
                sources.push(Source::Peer(inbox));
                endpoints.push(Endpoint::Mqtt(c));
            }
            Target::Redis => {
                let mut streams = vec![user_name(tag, u)];
                streams.extend(my_groups(u).into_iter().map(|g| group_name(tag, g)));
                let (c, inbox) = crate::peers::Redis::connect(&opts.addr, u, streams).await?;
                sources.push(Source::Peer(inbox));
                endpoints.push(Endpoint::Redis(c));
            }
        }
    }
    let mut group_ids = Vec::new();
    if let (Target::Courier | Target::Relay, true) = (opts.target, !plan.groups.is_empty()) {
        for members in &plan.groups {
            let creator = (members[0] - opts.first_user) as usize;
            let Endpoint::Courier(c) = &endpoints[creator] else {
                unreachable!("courier endpoints")
            };
            group_ids.push(c.create_group(members[1..].to_vec()).await?.group);
        }
    } else {
        group_ids = (0..plan.groups.len() as u64).collect();
    }
    if !plan.lists.is_empty() {
        anyhow::ensure!(
            opts.target != Target::Relay,
            "the relay has no broadcast lists or contacts"
        );
    }
    if opts.target == Target::Courier {
        for (business, customers, consenting) in &plan.lists {
            for &c in consenting {
                let Endpoint::Courier(client) = &endpoints[(c - opts.first_user) as usize] else {
                    unreachable!("courier endpoints")
                };
                client
                    .contacts(courier_protocol::ContactsOp::Add, vec![*business])
                    .await?;
            }
            let Endpoint::Courier(client) = &endpoints[(business - opts.first_user) as usize]
            else {
                unreachable!("courier endpoints")
            };
            client
                .list(courier_protocol::ListOp::Set, 1, customers.clone())
                .await?;
        }
    }
    let routes = Routes {
        group_ids,
        lists: plan.lists.iter().map(|l| l.2.clone()).collect(),
        tag,
    };
    Ok((endpoints, sources, routes))
}

impl Endpoint {
    /// Queues message `n` now (in order) and returns the wait for its ack.
    fn start_send(
        &self,
        me: u64,
        n: u64,
        dest: Dest,
        routes: &Routes,
        body: Bytes,
    ) -> Result<Ack, String> {
        let tag = routes.tag;
        // Peers have no lists: one write per consenting recipient, all in
        // flight, acknowledged when every one is.
        if let (Dest::List(l), false) = (dest, matches!(self, Endpoint::Courier(_))) {
            let mut acks = Vec::with_capacity(routes.lists[l].len());
            for &r in &routes.lists[l] {
                acks.push(self.start_send(me, n, Dest::User(r), routes, body.clone())?);
            }
            return Ok(Box::pin(async move {
                for a in acks {
                    a.await?;
                }
                Ok(())
            }));
        }
        match self {
            Endpoint::Courier(c) => {
                let d = match dest {
                    Dest::User(u) => Destination::User(u),
                    Dest::Group(g) => Destination::Group(routes.group_ids[g]),
                    Dest::List(_) => Destination::List(1),
                    Dest::Nobody => unreachable!("nobody sends"),
                };
                if let Destination::List(list) = d {
                    let ack = c
                        .start_broadcast(n, list, MessageKind::Chat, body)
                        .map_err(client_error)?;
                    return Ok(Box::pin(async move {
                        ack.await.map(|_| ()).map_err(client_error)
                    }));
                }
                let ack = c
                    .start_send(n, d, MessageKind::Chat, body)
                    .map_err(client_error)?;
                Ok(Box::pin(async move {
                    ack.await.map(|_| ()).map_err(client_error)
                }))
            }
            peer => {
                // Peers name destinations by subject, stream or topic.
                let name = match dest {
                    Dest::User(u) => user_name(tag, u),
                    Dest::Group(g) => group_name(tag, g),
                    Dest::List(_) | Dest::Nobody => unreachable!("handled above"),
                };
                Ok(match peer {
                    Endpoint::Nats(c) => Box::pin(c.publish(&name, &body)?),
                    Endpoint::Js(c) => Box::pin(c.publish(&name, &body)?),
                    Endpoint::Mqtt(c) => Box::pin(c.publish(&name.replace('.', "/"), &body)?),
                    Endpoint::Redis(c) => Box::pin(c.xadd(&name, me, &body)?),
                    Endpoint::Courier(_) => unreachable!("matched above"),
                })
            }
        }
    }
}

pub async fn run(opts: Options) -> anyhow::Result<Report> {
    anyhow::ensure!(
        opts.size >= HEADER_LEN,
        "message size must be at least {HEADER_LEN} bytes"
    );
    let plan = plan(&opts)?;
    let (endpoints, sources, routes) = connect_all(&opts, &plan).await?;
    let routes = Arc::new(routes);
    let shared = Arc::new(Shared {
        start: Instant::now(),
        stop: AtomicBool::new(false),
        sent: AtomicU64::new(0),
        acked: AtomicU64::new(0),
        delivered: AtomicU64::new(0),
        last_delivery_ns: AtomicU64::new(0),
        errors: Mutex::new(BTreeMap::new()),
        seconds: Mutex::new(Vec::new()),
    });

    // Receivers: one task per connection, each with its own histogram and checker.
    let mut receivers = Vec::new();
    for (i, mut source) in sources.into_iter().enumerate() {
        let (shared, me) = (shared.clone(), opts.first_user + i as u64);
        receivers.push(tokio::spawn(async move {
            let mut h = histogram();
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
                let now = Instant::now();
                let Some((conv, n, intended_ns)) = parse(&payload) else {
                    continue; // group events and anything not from this run
                };
                if conv == me {
                    continue; // a peer echoing a member's own group message
                }
                let intended = shared.start + Duration::from_nanos(intended_ns);
                let us = now.saturating_duration_since(intended).as_micros() as u64;
                record(&mut h, us);
                checker.delivered(me, conv, n);
                shared.delivered.fetch_add(1, Ordering::Relaxed);
                shared.last_delivery_ns.fetch_max(
                    now.saturating_duration_since(shared.start).as_nanos() as u64,
                    Ordering::Relaxed,
                );
                let t = tally.at(&shared, now);
                t.delivered += 1;
                record(&mut t.e2e, us);
            }
            tally.flush(&shared);
            (h, checker)
        }));
    }

    // Senders.
    let sending = plan
        .targets
        .iter()
        .filter(|t| !matches!(t.0, Dest::Nobody))
        .count()
        .max(1);
    let per_sender_rate = opts.rate.map(|r| r / sending as f64);
    let mut senders = Vec::new();
    let endpoints: Vec<Arc<Endpoint>> = endpoints.into_iter().map(Arc::new).collect();
    for (i, (dest, recipients)) in plan.targets.into_iter().enumerate() {
        let c = endpoints[i].clone();
        let routes = routes.clone();
        let shared = shared.clone();
        let conv = opts.first_user + i as u64;
        let (size, window, duration) = (opts.size, opts.window.max(1), opts.duration);
        senders.push(tokio::spawn(async move {
            let mut h = histogram();
            let mut checker = Checker::new();
            if let Dest::Nobody = dest {
                return (h, checker);
            }
            let mut tally = Tally::new();
            // Sends in flight: their number, intended time and ack, polled
            // together on this task (no task or lock per send).
            let mut inflight = FuturesUnordered::new();
            let mut n = 0u64;
            let finish = |(n, intended, r): (u64, Instant, Result<(), String>),
                          h: &mut Histogram<u64>,
                          checker: &mut Checker,
                          tally: &mut Tally| {
                let now = Instant::now();
                match r {
                    Ok(()) => {
                        shared.acked.fetch_add(1, Ordering::Relaxed);
                        tally.at(&shared, now).acked += 1;
                        record(
                            h,
                            now.saturating_duration_since(intended).as_micros() as u64,
                        );
                        checker.acked(conv, n, &recipients);
                    }
                    Err(e) => shared.error(e),
                }
            };
            // Stagger the senders so an open-loop run does not start in lockstep.
            let offset = per_sender_rate
                .map(|r| (i as f64 * 0.618).fract() / r)
                .unwrap_or(0.0);
            loop {
                let intended = match per_sender_rate {
                    Some(r) => shared.start + Duration::from_secs_f64(offset + n as f64 / r),
                    None => Instant::now(),
                };
                if intended.saturating_duration_since(shared.start) >= duration {
                    break;
                }
                // Wait for the intended time and for room in the window,
                // taking acks as they come.
                loop {
                    let room = inflight.len() < window;
                    if room && Instant::now() >= intended {
                        break;
                    }
                    tokio::select! {
                        _ = tokio::time::sleep_until(intended.into()), if room => {}
                        Some(done) = inflight.next(), if !inflight.is_empty() => {
                            finish(done, &mut h, &mut checker, &mut tally);
                        }
                    }
                }
                n += 1;
                let intended_ns =
                    intended.saturating_duration_since(shared.start).as_nanos() as u64;
                let body = payload(conv, n, intended_ns, size);
                shared.sent.fetch_add(1, Ordering::Relaxed);
                tally.at(&shared, Instant::now()).sent += 1;
                // Queued now, in order; the ack is awaited with the others.
                let pending = c.start_send(conv, n, dest, &routes, body);
                inflight.push(async move {
                    let r = match pending {
                        Ok(ack) => ack.await,
                        Err(e) => Err(e),
                    };
                    (n, intended, r)
                });
            }
            // This sender's last acks (bounded).
            let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
            while let Ok(Some(done)) = tokio::time::timeout_at(deadline, inflight.next()).await {
                finish(done, &mut h, &mut checker, &mut tally);
            }
            tally.flush(&shared);
            (h, checker)
        }));
    }

    // Progress, once per second, until the senders are done.
    let progress = {
        let shared = shared.clone();
        let show = opts.progress;
        tokio::spawn(async move {
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
                        "t={t:>3}s sent {:>8}/s acked {:>8}/s delivered {:>8}/s e2e p99 {:>7} us errors {errors}",
                        now.0 - last.0,
                        now.1 - last.1,
                        now.2 - last.2,
                        p99
                    );
                }
                last = now;
            }
        })
    };

    let mut ack_h = histogram();
    let mut checker = Checker::new();
    for s in senders {
        let (h, c) = s.await?;
        ack_h.add(&h).expect("same bounds");
        checker.merge(c);
    }
    let send_end = shared.start.elapsed();
    // Deliveries drain: wait until every expected one arrived or nothing
    // moved for two seconds (bounded).
    let expected = checker.verify().expected_deliveries;
    let mut last = (shared.delivered.load(Ordering::Relaxed), Instant::now());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let d = shared.delivered.load(Ordering::Relaxed);
        if d >= expected || last.1.elapsed() > Duration::from_secs(2) || Instant::now() > deadline {
            break;
        }
        if d != last.0 {
            last = (d, Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    shared.stop.store(true, Ordering::Relaxed);
    let mut e2e_h = histogram();
    for r in receivers {
        let (h, c) = r.await?;
        e2e_h.add(&h).expect("same bounds");
        checker.merge(c);
    }
    let _ = progress.await;
    let verdict = checker.verify();
    let secs = send_end.as_secs_f64().max(1e-9);
    let timeline = shared
        .seconds
        .lock()
        .expect("seconds")
        .iter()
        .enumerate()
        .map(|(t, s)| Second {
            t_s: t as u64,
            sent: s.0,
            acked: s.1,
            delivered: s.2,
            e2e_p99_us: if s.3.is_empty() {
                0
            } else {
                s.3.value_at_quantile(0.99)
            },
        })
        .collect();
    let errors = shared.errors.lock().expect("errors").clone();
    Ok(Report {
        target: opts.target,
        scenario: opts.scenario,
        users: opts.users,
        size: opts.size,
        duration_s: secs,
        mode: match opts.rate {
            Some(r) => format!("open loop, {r} msg/s offered"),
            None => format!("closed loop, {} in flight per sender", opts.window),
        },
        sent: shared.sent.load(Ordering::Relaxed),
        acked: shared.acked.load(Ordering::Relaxed),
        delivered: shared.delivered.load(Ordering::Relaxed),
        errors,
        acked_per_s: shared.acked.load(Ordering::Relaxed) as f64 / secs,
        // Over the time deliveries took, which may outlast the sending (a
        // server that queues shows it here and in the latencies).
        delivered_per_s: shared.delivered.load(Ordering::Relaxed) as f64
            / (shared.last_delivery_ns.load(Ordering::Relaxed) as f64 / 1e9).max(secs),
        end_to_end: Percentiles::of(&e2e_h),
        send_to_ack: Percentiles::of(&ack_h),
        end_to_end_curve: percentile_curve(&e2e_h),
        timeline,
        verdict,
    })
}

impl Report {
    /// The human summary printed at the end of a run.
    pub fn summary(&self) -> String {
        let p = |x: &Percentiles| {
            format!(
                "p50 {} us, p90 {} us, p99 {} us, p99.9 {} us, max {} us ({} samples)",
                x.p50_us, x.p90_us, x.p99_us, x.p999_us, x.max_us, x.count
            )
        };
        let v = &self.verdict;
        let mut s = format!(
            "scenario {:?}, {} users, {} B messages, {}, {:.1} s\n\
             sent {}  acked {} ({:.0}/s)  delivered {} ({:.0}/s)\n\
             end to end: {}\n\
             send to ack: {}\n\
             errors: {:?}\n\
             correctness: {} acknowledged, {} deliveries expected, {} lost, {} duplicated, {} reordered: {}\n",
            self.scenario,
            self.users,
            self.size,
            self.mode,
            self.duration_s,
            self.sent,
            self.acked,
            self.acked_per_s,
            self.delivered,
            self.delivered_per_s,
            p(&self.end_to_end),
            p(&self.send_to_ack),
            self.errors,
            v.acknowledged,
            v.expected_deliveries,
            v.lost,
            v.duplicates,
            v.reordered,
            if v.ok() { "OK" } else { "FAILED" }
        );
        for e in &v.examples {
            s.push_str(&format!("  {e:?}\n"));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_carry_their_stamp() {
        let p = payload(7, 9, 123, 100);
        assert_eq!(p.len(), 100);
        assert_eq!(parse(&p), Some((7, 9, 123)));
        assert_eq!(parse(b"short"), None);
        assert_eq!(parse(&[0u8; 40]), None);
    }
}

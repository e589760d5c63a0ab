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
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use courier_client::{Client, ClientConfig, ClientError};
use courier_protocol::token::{Claims, TokenKey};
use courier_protocol::{Destination, MessageKind};
use futures_util::stream::{FuturesUnordered, StreamExt};
use hdrhistogram::Histogram;
use rand::SeedableRng;
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
    /// One-to-one pairs whose connections drop and resume all the time
    /// (each session lives `reconnect_every`, jittered ±50%): unacknowledged
    /// sends are retried with their ids, deliveries resume after the last
    /// one seen. Courier only.
    Reconnect,
    /// Connections that only hold their session (keepalives, no messages):
    /// what an idle connection costs. Courier only.
    Idle,
    /// A messenger's shape: everyone chats with a partner (7 sends in 10)
    /// and in one group sized by `group_sizes` (3 in 10).
    Mixed,
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
    /// Group sizes and their weights: groups are carved from the users in
    /// this proportion (for broadcast: the first size is the list size).
    pub group_sizes: Vec<(usize, u32)>,
    /// Reconnect scenario: how long a session lives on average.
    pub reconnect_every: Duration,
    /// Kill the server with SIGKILL this often and restart it (needs
    /// `server` to be one this generator started); clients reconnect,
    /// retry and resume, and the checker must still find nothing lost.
    pub chaos_kill: Option<Duration>,
    /// The server process, when known: its memory is sampled, and chaos
    /// kills restart it.
    pub server: Option<Arc<crate::server::ServerProcess>>,
    /// Local addresses connections are spread over (empty: the kernel's choice).
    pub source_addrs: Vec<std::net::IpAddr>,
    /// Print a progress line every second.
    pub progress: bool,
}

impl Options {
    /// The defaults of the command line, for a target at `addr`.
    pub fn new(target: Target, addr: impl Into<String>, key: TokenKey) -> Options {
        Options {
            target,
            addr: addr.into(),
            key,
            scenario: Scenario::OneToOne,
            users: 100,
            first_user: 1_000_000,
            duration: Duration::from_secs(10),
            size: 100,
            rate: None,
            window: 16,
            group_sizes: vec![(50, 1)],
            reconnect_every: Duration::from_secs(2),
            chaos_kill: None,
            server: None,
            source_addrs: Vec::new(),
            progress: false,
        }
    }

    /// Whether users run as one resilient task each (reconnecting,
    /// retrying, resuming) rather than as a sender and a receiver.
    fn resilient(&self) -> bool {
        self.scenario == Scenario::Reconnect || self.chaos_kill.is_some()
    }

    /// The session configuration of simulated user number `i`: its token
    /// minted from the node's key, resuming after everything already in its
    /// inbox (earlier runs are not ours), from its source address.
    pub(crate) fn client_config(&self, i: u64) -> ClientConfig {
        let u = self.first_user + i;
        let token = self.key.mint(Claims {
            user_id: u,
            device_id: 1,
            expires_at_s: u64::MAX / 2,
        });
        let mut config = ClientConfig::new(self.addr.clone(), u, 1, token);
        config.resume_after = Some(u64::MAX);
        config.local_addr = self.source(i);
        config
    }

    /// The local address of connection `i`.
    pub(crate) fn source(&self, i: u64) -> Option<std::net::IpAddr> {
        (!self.source_addrs.is_empty())
            .then(|| self.source_addrs[i as usize % self.source_addrs.len()])
    }
}

/// Parses `50` or `8x7,50x2,1024x1` (size x weight, ...).
pub fn parse_group_sizes(s: &str) -> Result<Vec<(usize, u32)>, String> {
    s.split(',')
        .map(|part| {
            let (size, weight) = part.split_once('x').unwrap_or((part, "1"));
            let size: usize = size
                .trim()
                .parse()
                .map_err(|_| format!("bad group size {part:?}"))?;
            let weight: u32 = weight
                .trim()
                .parse()
                .map_err(|_| format!("bad weight {part:?}"))?;
            if size < 2 || weight == 0 {
                return Err(format!(
                    "{part:?}: a group has at least 2 members and a weight of at least 1"
                ));
            }
            Ok((size, weight))
        })
        .collect()
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
    /// Sessions re-established (reconnect scenario, chaos kills).
    #[serde(default)]
    pub reconnects: u64,
    /// Deliveries seen again after a resume and dropped by sequence, as a
    /// client does (not duplicates: the same stored message twice).
    #[serde(default)]
    pub redelivered: u64,
    /// Times the server was killed and restarted.
    #[serde(default)]
    pub kills: u64,
    /// The idle scenario's figures.
    #[serde(default)]
    pub idle: Option<crate::idle::IdleReport>,
    /// The name of this run in tables (`--label`); the target's otherwise.
    #[serde(default)]
    pub label: Option<String>,
}

/// One second of the timeline: sent, acked, delivered, end-to-end latencies.
type SecondRow = (u64, u64, u64, Histogram<u64>);

pub(crate) struct Shared {
    pub start: Instant,
    pub stop: AtomicBool,
    /// Senders still sending (or waiting for their last acks).
    pub sending_left: AtomicUsize,
    pub sent: AtomicU64,
    pub acked: AtomicU64,
    /// Deliveries the acknowledged messages call for.
    pub expected: AtomicU64,
    pub delivered: AtomicU64,
    pub reconnects: AtomicU64,
    pub redelivered: AtomicU64,
    /// Nanoseconds from the start to the latest delivery.
    pub last_delivery_ns: AtomicU64,
    pub errors: Mutex<BTreeMap<String, u64>>,
    /// Per second: sent, acked, delivered; and end-to-end latencies.
    pub seconds: Mutex<Vec<SecondRow>>,
    /// The whole run's send-to-ack and end-to-end latencies. Tasks hold
    /// only a second's samples (an HDR histogram is ~170 KB: one per task
    /// would cost gigabytes at 10,000 connections).
    pub totals: Mutex<(Histogram<u64>, Histogram<u64>)>,
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

    pub(crate) fn error(&self, name: String) {
        *self.errors.lock().expect("errors").entry(name).or_default() += 1;
    }

    pub(crate) fn since_start(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.start).as_nanos() as u64
    }

    pub(crate) fn sent(&self, tally: &mut Tally) {
        self.sent.fetch_add(1, Ordering::Relaxed);
        tally.at(self, Instant::now()).sent += 1;
    }

    /// Message `n` of `conversation`, meant to go at `intended`, is
    /// acknowledged; `recipients` must each get it.
    pub(crate) fn acked(
        &self,
        (conversation, n, recipients): (u64, u64, &[u64]),
        intended: Instant,
        checker: &mut Checker,
        tally: &mut Tally,
    ) {
        let now = Instant::now();
        self.acked.fetch_add(1, Ordering::Relaxed);
        self.expected
            .fetch_add(recipients.len() as u64, Ordering::Relaxed);
        let t = tally.at(self, now);
        t.acked += 1;
        t.ack_us
            .push(now.saturating_duration_since(intended).as_micros() as u64);
        checker.acked(conversation, n, recipients);
    }

    /// `me` received `payload` (anything not a generator message is skipped).
    pub(crate) fn delivery(
        &self,
        me: u64,
        payload: &[u8],
        checker: &mut Checker,
        tally: &mut Tally,
    ) {
        let now = Instant::now();
        let Some((conv, n, intended_ns)) = parse(payload) else {
            return; // group events and anything not from this run
        };
        if sender_of(conv) == me {
            return; // a peer echoing a member's own group message
        }
        let intended = self.start + Duration::from_nanos(intended_ns);
        let us = now.saturating_duration_since(intended).as_micros() as u64;
        checker.delivered(me, conv, n);
        self.delivered.fetch_add(1, Ordering::Relaxed);
        self.last_delivery_ns
            .fetch_max(self.since_start(now), Ordering::Relaxed);
        let t = tally.at(self, now);
        t.delivered += 1;
        t.e2e_us.push(us);
    }
}

/// One task's counts and latencies for the current second, added to the
/// shared timeline and totals when the second changes (or the samples pile
/// up): a few locks per task per second, not one per message.
pub(crate) struct Tally {
    second: usize,
    sent: u64,
    acked: u64,
    delivered: u64,
    ack_us: Vec<u64>,
    e2e_us: Vec<u64>,
}

/// Samples a task keeps before flushing within a second.
const TALLY_SAMPLES_MAX: usize = 4096;

impl Tally {
    pub(crate) fn new() -> Tally {
        Tally {
            second: 0,
            sent: 0,
            acked: 0,
            delivered: 0,
            ack_us: Vec::new(),
            e2e_us: Vec::new(),
        }
    }

    /// Moves to the second of `now`, flushing the previous one.
    fn at(&mut self, shared: &Shared, now: Instant) -> &mut Tally {
        let s = shared.second(now);
        if s != self.second || self.ack_us.len() + self.e2e_us.len() >= TALLY_SAMPLES_MAX {
            self.flush(shared);
            self.second = s;
        }
        self
    }

    pub(crate) fn flush(&mut self, shared: &Shared) {
        if self.sent + self.acked + self.delivered == 0 {
            return;
        }
        shared.bump_at(self.second, |x| {
            x.0 += self.sent;
            x.1 += self.acked;
            x.2 += self.delivered;
            for &us in &self.e2e_us {
                record(&mut x.3, us);
            }
        });
        {
            let mut totals = shared.totals.lock().expect("totals");
            for &us in &self.ack_us {
                record(&mut totals.0, us);
            }
            for &us in &self.e2e_us {
                record(&mut totals.1, us);
            }
        }
        self.sent = 0;
        self.acked = 0;
        self.delivered = 0;
        // Keep no capacity: a quiet task should hold nothing.
        self.ack_us = Vec::new();
        self.e2e_us = Vec::new();
    }
}

pub(crate) fn payload(conversation: u64, n: u64, intended_ns: u64, size: usize) -> Bytes {
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

pub(crate) fn client_error(e: ClientError) -> String {
    match e {
        ClientError::Rejected(code, _) => format!("{code:?}"),
        ClientError::Closed(_) => "closed".into(),
        ClientError::Timeout => "timeout".into(),
        _ => "io".into(),
    }
}

/// Where one user sends: a user, a group or a broadcast list (indexes into
/// the plan's groups and lists).
#[derive(Clone, Copy)]
pub(crate) enum Dest {
    User(u64),
    Group(usize),
    List(usize),
}

/// One of a user's destinations: who receives it, how often it is chosen.
#[derive(Clone)]
pub(crate) struct Route {
    pub dest: Dest,
    pub recipients: Vec<u64>,
    pub weight: u32,
}

/// Who sends where: per user, its routes (none: it only receives); the
/// groups' members; the lists' (business, every customer, consenting).
pub(crate) struct Plan {
    pub routes: Vec<Vec<Route>>,
    pub groups: Vec<Vec<u64>>,
    pub lists: Vec<(u64, Vec<u64>, Vec<u64>)>,
}

/// What the senders need to name destinations on the target.
pub(crate) struct Routes {
    pub group_ids: Vec<u64>,
    /// Consenting recipients per list (peers have no lists: the sender
    /// writes to each, as an application on them would).
    pub lists: Vec<Vec<u64>>,
    pub tag: u64,
}

/// User ids fit in the low 48 bits; a conversation is a user's route:
/// `user | route << 48` (a sender's messages to its partner and to its
/// group are two conversations, each ordered on its own).
const USER_BITS: u32 = 48;

pub(crate) fn conversation(user: u64, route: usize) -> u64 {
    user | (route as u64) << USER_BITS
}

pub(crate) fn sender_of(conversation: u64) -> u64 {
    conversation & ((1 << USER_BITS) - 1)
}

/// The client message id of message `n` on `route` in the run `tag`:
/// unique per sender across routes, and across runs that reuse user ids.
pub(crate) fn client_msg_id(tag: u64, route: usize, n: u64) -> u64 {
    (tag & 0xFFFF) << 48 | (route as u64 & 0xFF) << 40 | n
}

/// A sender's numbering of its messages: which route each takes (by
/// weight, from an RNG seeded by the user, so runs repeat) and its number
/// on that route.
pub(crate) struct Numbering {
    pub rng: rand::rngs::StdRng,
    per_route: Vec<u64>,
    /// Messages numbered so far (the pacer's count).
    pub count: u64,
}

impl Numbering {
    pub(crate) fn new(me: u64, routes: usize) -> Numbering {
        Numbering {
            rng: rand::rngs::StdRng::seed_from_u64(me),
            per_route: vec![0; routes],
            count: 0,
        }
    }

    /// The next message: (route, its number on that route).
    pub(crate) fn next(&mut self, routes: &[Route]) -> (usize, u64) {
        self.count += 1;
        let ri = pick(routes, &mut self.rng);
        self.per_route[ri] += 1;
        (ri, self.per_route[ri])
    }
}

/// Picks a route by weight.
fn pick(routes: &[Route], rng: &mut impl rand::Rng) -> usize {
    if routes.len() == 1 {
        return 0;
    }
    let total: u32 = routes.iter().map(|r| r.weight).sum();
    let mut x = rng.gen_range(0..total);
    for (i, r) in routes.iter().enumerate() {
        if x < r.weight {
            return i;
        }
        x -= r.weight;
    }
    routes.len() - 1
}

/// Cuts `users` into groups whose sizes follow `sizes` (size, weight) in
/// a repeating pattern; a remainder too small for a group joins the last.
fn carve(users: &[u64], sizes: &[(usize, u32)]) -> Vec<Vec<u64>> {
    let pattern: Vec<usize> = sizes
        .iter()
        .flat_map(|&(size, w)| std::iter::repeat_n(size.max(2), w as usize))
        .collect();
    let mut groups: Vec<Vec<u64>> = Vec::new();
    let mut rest = users;
    let mut i = 0;
    while rest.len() >= 2 {
        let k = pattern[i % pattern.len()].min(rest.len());
        groups.push(rest[..k].to_vec());
        rest = &rest[k..];
        i += 1;
    }
    if let (Some(last), false) = (groups.last_mut(), rest.is_empty()) {
        last.extend_from_slice(rest);
    }
    groups
}

fn group_routes(groups: &[Vec<u64>], weight: u32) -> std::collections::HashMap<u64, Route> {
    let mut by_user = std::collections::HashMap::new();
    for (gi, members) in groups.iter().enumerate() {
        for &u in members {
            let others = members.iter().copied().filter(|&m| m != u).collect();
            by_user.insert(
                u,
                Route {
                    dest: Dest::Group(gi),
                    recipients: others,
                    weight,
                },
            );
        }
    }
    by_user
}

pub(crate) fn plan(opts: &Options) -> anyhow::Result<Plan> {
    let users: Vec<u64> = (0..opts.users).map(|i| opts.first_user + i).collect();
    anyhow::ensure!(
        opts.first_user + opts.users < 1 << USER_BITS,
        "user ids must stay below 2^48"
    );
    anyhow::ensure!(!opts.group_sizes.is_empty(), "no group sizes given");
    let pairs = || -> anyhow::Result<Vec<Route>> {
        anyhow::ensure!(
            opts.users >= 2 && opts.users.is_multiple_of(2),
            "{:?} needs an even number of users",
            opts.scenario
        );
        Ok((0..users.len())
            .map(|i| Route {
                dest: Dest::User(users[i ^ 1]),
                recipients: vec![users[i ^ 1]],
                weight: 7,
            })
            .collect())
    };
    match opts.scenario {
        Scenario::OneToOne | Scenario::Reconnect => Ok(Plan {
            routes: pairs()?.into_iter().map(|r| vec![r]).collect(),
            groups: Vec::new(),
            lists: Vec::new(),
        }),
        Scenario::Idle => Ok(Plan {
            routes: vec![Vec::new(); users.len()],
            groups: Vec::new(),
            lists: Vec::new(),
        }),
        Scenario::Group | Scenario::Mixed => {
            anyhow::ensure!(users.len() >= 2, "groups need at least 2 users");
            let groups = carve(&users, &opts.group_sizes);
            let mut in_group = group_routes(&groups, 3);
            let routes = if opts.scenario == Scenario::Group {
                users
                    .iter()
                    .map(|u| in_group.remove(u).into_iter().collect())
                    .collect()
            } else {
                pairs()?
                    .into_iter()
                    .zip(&users)
                    .map(|(pair, u)| std::iter::once(pair).chain(in_group.remove(u)).collect())
                    .collect()
            };
            Ok(Plan {
                routes,
                groups,
                lists: Vec::new(),
            })
        }
        Scenario::Broadcast => {
            let k = opts.group_sizes[0].0.max(1) + 1;
            anyhow::ensure!(
                opts.users as usize >= k,
                "broadcast needs at least list size + 1 users"
            );
            let mut routes = Vec::with_capacity(users.len());
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
                routes.push(vec![Route {
                    dest: Dest::List(lists.len()),
                    recipients: consenting.clone(),
                    weight: 1,
                }]);
                routes.extend(customers.iter().map(|_| Vec::new()));
                lists.push((business, customers, consenting));
            }
            Ok(Plan {
                routes,
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
                let (client, _) = Client::connect(opts.client_config(i)).await?;
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
    /// Queues the message with client id `id` now (in order) and returns
    /// the wait for its ack.
    fn start_send(
        &self,
        me: u64,
        id: u64,
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
                acks.push(self.start_send(me, id, Dest::User(r), routes, body.clone())?);
            }
            return Ok(Box::pin(async move {
                for a in acks {
                    a.await?;
                }
                Ok(())
            }));
        }
        match self {
            Endpoint::Courier(c) => courier_send(c, id, dest, routes, body)
                .map_err(client_error)
                .map(|ack| -> Ack { Box::pin(async move { ack.await.map_err(client_error) }) }),
            peer => {
                // Peers name destinations by subject, stream or topic.
                let name = match dest {
                    Dest::User(u) => user_name(tag, u),
                    Dest::Group(g) => group_name(tag, g),
                    Dest::List(_) => unreachable!("handled above"),
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

/// Queues a send on a Courier client; the future is its acknowledgement.
pub(crate) fn courier_send(
    c: &Arc<Client>,
    id: u64,
    dest: Dest,
    routes: &Routes,
    body: Bytes,
) -> Result<impl std::future::Future<Output = Result<(), ClientError>> + Send + 'static, ClientError>
{
    let ack: std::pin::Pin<Box<dyn std::future::Future<Output = _> + Send>> = match dest {
        Dest::List(_) => {
            let ack = c.start_broadcast(id, 1, MessageKind::Chat, body)?;
            Box::pin(async move { ack.await.map(|_| ()) })
        }
        Dest::User(u) => {
            let ack = c.start_send(id, Destination::User(u), MessageKind::Chat, body)?;
            Box::pin(async move { ack.await.map(|_| ()) })
        }
        Dest::Group(g) => {
            let d = Destination::Group(routes.group_ids[g]);
            let ack = c.start_send(id, d, MessageKind::Chat, body)?;
            Box::pin(async move { ack.await.map(|_| ()) })
        }
    };
    Ok(ack)
}

/// When each of a sender's messages is meant to go.
#[derive(Clone, Copy)]
pub(crate) struct Pacer {
    start: Instant,
    duration: Duration,
    /// Open loop: this sender's messages per second.
    rate: Option<f64>,
    /// Seconds this sender is shifted by, so senders are not in lockstep.
    offset: f64,
}

impl Pacer {
    fn new(opts: &Options, start: Instant, senders: usize, i: usize) -> Pacer {
        let rate = opts.rate.map(|r| r / senders.max(1) as f64);
        Pacer {
            start,
            duration: opts.duration,
            rate,
            offset: rate.map(|r| (i as f64 * 0.618).fract() / r).unwrap_or(0.0),
        }
    }

    /// The intended time of this sender's message `k` (from 0); `None`
    /// once that is past the run's sending time.
    pub(crate) fn intended(&self, k: u64) -> Option<Instant> {
        let at = match self.rate {
            Some(r) => self.start + Duration::from_secs_f64(self.offset + k as f64 / r),
            None => Instant::now(),
        };
        (at.saturating_duration_since(self.start) < self.duration).then_some(at)
    }

    /// When sending ends.
    pub(crate) fn end(&self) -> Instant {
        self.start + self.duration
    }
}

/// What one user's task hands back: send-to-ack and end-to-end latencies,
/// and its checker's observations.
/// What a task hands back: what it saw, for the checker (its latencies went
/// to `Shared::totals` as it ran).
pub(crate) type Outcome = Checker;

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
    let shared = Arc::new(Shared {
        start: Instant::now(),
        stop: AtomicBool::new(false),
        sending_left: AtomicUsize::new(sending),
        sent: AtomicU64::new(0),
        acked: AtomicU64::new(0),
        expected: AtomicU64::new(0),
        delivered: AtomicU64::new(0),
        reconnects: AtomicU64::new(0),
        redelivered: AtomicU64::new(0),
        last_delivery_ns: AtomicU64::new(0),
        errors: Mutex::new(BTreeMap::new()),
        seconds: Mutex::new(Vec::new()),
        totals: Mutex::new((histogram(), histogram())),
    });

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
async fn receive(me: u64, mut source: Source, shared: Arc<Shared>) -> Outcome {
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
) -> Outcome {
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

fn report(
    opts: &Options,
    shared: &Shared,
    send_end: Duration,
    ack_h: &Histogram<u64>,
    e2e_h: &Histogram<u64>,
    verdict: Verdict,
) -> Report {
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
    let acked = shared.acked.load(Ordering::Relaxed);
    let delivered = shared.delivered.load(Ordering::Relaxed);
    Report {
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
        acked,
        delivered,
        errors,
        acked_per_s: acked as f64 / secs,
        // Over the time deliveries took, which may outlast the sending (a
        // server that queues shows it here and in the latencies).
        delivered_per_s: delivered as f64
            / (shared.last_delivery_ns.load(Ordering::Relaxed) as f64 / 1e9).max(secs),
        end_to_end: Percentiles::of(e2e_h),
        send_to_ack: Percentiles::of(ack_h),
        end_to_end_curve: percentile_curve(e2e_h),
        timeline,
        verdict,
        reconnects: shared.reconnects.load(Ordering::Relaxed),
        redelivered: shared.redelivered.load(Ordering::Relaxed),
        kills: 0,
        idle: None,
        label: None,
    }
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
        if self.reconnects + self.kills + self.redelivered > 0 {
            s.push_str(&format!(
                "resilience: {} reconnects, {} server kills, {} redeliveries after resume dropped by sequence\n",
                self.reconnects, self.kills, self.redelivered
            ));
        }
        if let Some(i) = &self.idle {
            let mib = |b: Option<u64>| {
                b.map(|b| format!("{:.1} MiB", b as f64 / (1 << 20) as f64))
                    .unwrap_or_else(|| "unknown (no --server-pid)".into())
            };
            s.push_str(&format!(
                "idle: {} sessions open ({} failed{}), opened in {:.1} s ({:.0}/s), held {:.1} s \
                 with {} ms keepalives, {} answered at the end\n\
                 server memory: {} before, {} after: {} per connection; generator: {:.0} B per connection\n",
                i.connections,
                i.failed,
                i.first_failure
                    .as_ref()
                    .map(|f| format!(", first: {f}"))
                    .unwrap_or_default(),
                i.connect_s,
                i.connects_per_s,
                i.held_s,
                i.keepalive_ms,
                i.alive_at_end,
                mib(i.server_rss_before),
                mib(i.server_rss_after),
                i.server_bytes_per_connection
                    .map(|b| format!("{b:.0} B"))
                    .unwrap_or_else(|| "unknown".into()),
                i.generator_bytes_per_connection,
            ));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_size_specs_parse_or_say_what_is_wrong() {
        assert_eq!(parse_group_sizes("50"), Ok(vec![(50, 1)]));
        assert_eq!(
            parse_group_sizes("8x7, 50x2,1024x1"),
            Ok(vec![(8, 7), (50, 2), (1024, 1)])
        );
        for (bad, says) in [
            ("", "bad group size"),
            ("x3", "bad group size"),
            ("8xa", "bad weight"),
            ("1", "at least 2 members"),
            ("8x0", "weight of at least 1"),
        ] {
            let err = parse_group_sizes(bad).unwrap_err();
            assert!(err.contains(says), "{bad:?}: {err}");
        }
    }

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

    #[test]
    fn payloads_carry_their_stamp() {
        let p = payload(7, 9, 123, 100);
        assert_eq!(p.len(), 100);
        assert_eq!(parse(&p), Some((7, 9, 123)));
        assert_eq!(parse(b"short"), None);
        assert_eq!(parse(&[0u8; 40]), None);
    }
}

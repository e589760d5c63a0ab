//! What a run is told: the target, the scenario and the load's shape.

use std::sync::Arc;
use std::time::Duration;

use courier_client::ClientConfig;
use courier_protocol::token::{Claims, TokenKey};
use serde::{Deserialize, Serialize};

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
    /// The broadcast blocks, with business rules: each block's first user
    /// is a registered business (over the admin port, `--metrics`) with an
    /// approved template; it sends that template (the stamp is its
    /// parameter) to its broadcast list, which the consent ledger filters:
    /// one customer in ten never opted in and must get nothing. Courier only.
    Business,
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

/// How receivers acknowledge what they read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Acks {
    /// As a phone does: every batch read is acknowledged at once (Courier:
    /// `Ack` up to its last message, `Mark` for log groups), which is what
    /// makes the senders' delivered receipts flow.
    EachBatch,
    /// One acknowledgement per 256 deliveries (how the generator measured
    /// before it acknowledged like a phone; for comparison, named as such
    /// in tables).
    Lazy,
}

/// How a Courier target's senders take the receipts of their one-to-one
/// messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Receipts {
    /// As facts (`Receipts` frames: per reader, the highest sequence
    /// delivered and read), resolved against each message's `SendAck`.
    Facts,
    /// As `receipt` messages in the sender's inbox (how the generator
    /// measured before facts; for comparison, named as such in tables).
    Messages,
}

#[derive(Clone)]
pub struct Options {
    pub target: Target,
    /// The target's client address. A Courier cluster takes several,
    /// comma-separated: user `i` connects to address `i mod n`, so the
    /// users are spread evenly over the nodes.
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
    /// Users ride out faults injected from outside (a cluster's nodes
    /// killed, cut off, restarted): each reconnects, retries and resumes
    /// as under chaos kills, without planned drops.
    pub resilient: bool,
    /// The server process, when known: its memory is sampled, and chaos
    /// kills restart it.
    pub server: Option<Arc<crate::server::ServerProcess>>,
    /// Local addresses connections are spread over (empty: the kernel's choice).
    pub source_addrs: Vec<std::net::IpAddr>,
    /// Print a progress line every second.
    pub progress: bool,
    /// Speak TLS to a Courier target (the node's `tls.*` settings).
    pub tls: Option<courier_client::ClientTls>,
    /// How receivers acknowledge what they read.
    pub acks: Acks,
    /// How a Courier target's senders take their receipts.
    pub receipts: Receipts,
    /// Share of read batches a user opens (marks read), `read_delay`
    /// after it got them.
    pub read_share: f64,
    pub read_delay: Duration,
    /// Threads the Courier and relay users run on, each with a
    /// single-threaded runtime of its own (0: one per core).
    pub threads: usize,
    /// The node's admin address: its stage histograms are read before and
    /// after the run (the report's `stages`).
    pub metrics: Option<String>,
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
            resilient: false,
            server: None,
            source_addrs: Vec::new(),
            progress: false,
            tls: None,
            acks: Acks::EachBatch,
            receipts: Receipts::Facts,
            read_share: 0.25,
            read_delay: Duration::from_millis(200),
            threads: 0,
            metrics: None,
        }
    }

    /// The threads users run on (one per core unless told).
    pub(crate) fn threads(&self) -> usize {
        match self.threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        }
    }

    /// Whether users run as one resilient task each (reconnecting,
    /// retrying, resuming) rather than as a sender and a receiver.
    pub(crate) fn resilient(&self) -> bool {
        self.resilient || self.scenario == Scenario::Reconnect || self.chaos_kill.is_some()
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
        let mut config = ClientConfig::new(self.addr_of(i).to_owned(), u, 1, token);
        config.resume_after = Some(u64::MAX);
        if self.target == Target::Courier && self.receipts == Receipts::Facts {
            // Facts written from now on: earlier runs' are not ours.
            config.receipts_after = Some(u64::MAX);
        }
        config.local_addr = self.source(i);
        config.tls = self.tls.clone();
        config
    }

    /// The node simulated user number `i` connects to.
    pub(crate) fn addr_of(&self, i: u64) -> &str {
        let addrs: Vec<&str> = self.addr.split(',').map(str::trim).collect();
        addrs[(i % addrs.len() as u64) as usize]
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_are_spread_over_the_nodes_given() {
        let key = TokenKey::new(vec![7; 32]);
        let one = Options::new(Target::Courier, "127.0.0.1:7700", key.clone());
        assert_eq!(one.addr_of(5), "127.0.0.1:7700");
        let three = Options::new(Target::Courier, "a:1, b:2,c:3", key);
        let picked: Vec<&str> = (0..6).map(|i| three.addr_of(i)).collect();
        assert_eq!(picked, ["a:1", "b:2", "c:3", "a:1", "b:2", "c:3"]);
        assert_eq!(three.client_config(4).addr, "b:2");
    }

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
}

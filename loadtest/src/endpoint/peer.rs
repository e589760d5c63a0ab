//! The peer brokers' endpoints (NATS core, JetStream, Redis Streams,
//! Mosquitto): what each subscribes to, and how a send is published. Their
//! wire clients are in `crate::peers`.

use bytes::Bytes;

use crate::options::{Options, Target};
use crate::peers::{Inbox, JetStream, Mqtt, Nats, Redis};

/// The wait for one send's acknowledgement.
pub(crate) type Ack =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send>>;

/// One simulated user's connection to a peer.
pub(crate) enum Peer {
    Nats(Nats),
    Js(JetStream),
    Redis(Redis),
    Mqtt(Mqtt),
}

/// Names of subjects and streams for peers; `tag` keeps runs apart.
pub(crate) fn user_name(tag: u64, u: u64) -> String {
    format!("in.{tag}.{u}")
}

pub(crate) fn group_name(tag: u64, g: usize) -> String {
    format!("g.{tag}.{g}")
}

/// MQTT topics are separated by slashes.
fn topic(name: &str) -> String {
    name.replace('.', "/")
}

/// Connects user `u` (the run's `i`-th) to the peer and subscribes it to
/// its inbox and its groups' subjects.
pub(crate) async fn connect(
    opts: &Options,
    tag: u64,
    i: u64,
    u: u64,
    groups: &[usize],
) -> anyhow::Result<(Peer, Inbox)> {
    let mut names = vec![user_name(tag, u)];
    names.extend(groups.iter().map(|&g| group_name(tag, g)));
    Ok(match opts.target {
        Target::Nats => {
            let (c, inbox) = Nats::connect(&opts.addr, &names).await?;
            (Peer::Nats(c), inbox)
        }
        Target::Jetstream => {
            let stream = format!("CL{tag}");
            let all = [format!("in.{tag}.>"), format!("g.{tag}.>")];
            let (c, inbox) =
                JetStream::connect(&opts.addr, u, &stream, &all, i == 0, &names).await?;
            (Peer::Js(c), inbox)
        }
        Target::Mqtt => {
            let topics: Vec<String> = names.iter().map(|n| topic(n)).collect();
            let id = format!("u{u}-{tag}");
            let (c, inbox) = Mqtt::connect(&opts.addr, &id, u, &topics).await?;
            (Peer::Mqtt(c), inbox)
        }
        Target::Redis => {
            let (c, inbox) = Redis::connect(&opts.addr, u, names).await?;
            (Peer::Redis(c), inbox)
        }
        Target::Courier | Target::Relay => unreachable!("not a peer target"),
    })
}

impl Peer {
    /// Publishes `body` to the subject, stream or topic `name`.
    pub(crate) fn publish(&self, me: u64, name: &str, body: &Bytes) -> Result<Ack, String> {
        Ok(match self {
            Peer::Nats(c) => Box::pin(c.publish(name, body)?),
            Peer::Js(c) => Box::pin(c.publish(name, body)?),
            Peer::Mqtt(c) => Box::pin(c.publish(&topic(name), body)?),
            Peer::Redis(c) => Box::pin(c.xadd(name, me, body)?),
        })
    }
}

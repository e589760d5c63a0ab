//! One simulated user's connection to the target in the runs whose users
//! are tasks, and how it sends: `courier` for Courier users that reconnect
//! (and the groups and lists every Courier run sets up), `peer` for the
//! peer brokers.

pub(crate) mod courier;
pub(crate) mod peer;

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use courier_client::Client;

use self::courier::{client_error, courier_send};
use self::peer::{group_name, user_name, Ack, Peer};
use crate::options::{Options, Target};
use crate::peers::Inbox;
use crate::plan::{Dest, Plan, Routes};

/// One simulated user's connection to the target, in the runs whose users
/// are tasks (peer brokers; Courier users that reconnect): Courier users
/// that only send and receive run as [`crate::driver`] loops instead.
pub(crate) enum Endpoint {
    Courier(Arc<Client>),
    Peer(Peer),
}

/// Connects every user (with a peer's inbox of deliveries) and sets up the
/// groups and lists; returns them and the routes' names on the target.
pub(crate) async fn connect_all(
    opts: &Options,
    plan: &Plan,
) -> anyhow::Result<(Vec<(Endpoint, Option<Inbox>)>, Routes)> {
    let tag = run_tag();
    let mut users = Vec::new();
    for i in 0..opts.users {
        users.push(resiliently(opts, || connect_one(opts, plan, tag, i)).await?);
    }
    let clients: HashMap<u64, Arc<Client>> = users
        .iter()
        .enumerate()
        .filter_map(|(i, (e, _))| match e {
            Endpoint::Courier(c) => Some((opts.first_user + i as u64, c.clone())),
            Endpoint::Peer(_) => None,
        })
        .collect();
    // The users' own sessions first; after a failure (a resilient run's
    // node killed during the set-up), fresh sessions of the owners, as
    // `set_up_only`'s. A group made by a failed attempt stays, unused.
    let routes = match set_up(opts, plan, tag, &clients).await {
        Ok(routes) => routes,
        Err(_) if opts.resilient() => resiliently(opts, || set_up_fresh(opts, plan, tag)).await?,
        Err(e) => return Err(e),
    };
    Ok((users, routes))
}

/// `step` until it succeeds, for a resilient run (a phone connects again
/// when its network or the node it reached goes away; its set-up too),
/// for 60 s at most; once for the others.
async fn resiliently<T, F, Fut>(opts: &Options, mut step: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        match step().await {
            Err(_) if opts.resilient() && tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            }
            done => return done,
        }
    }
}

/// For runs whose Courier or relay users are driver loops: sets up the
/// plan's groups and lists over short-lived sessions of only the users
/// that own them (closed before the run's sessions connect, so the run
/// resumes after everything they caused).
pub(crate) async fn set_up_only(opts: &Options, plan: &Plan) -> anyhow::Result<Routes> {
    set_up_fresh(opts, plan, run_tag()).await
}

/// Sets up the plan's groups and lists over fresh sessions of the users
/// that own them, for the run tagged `tag`.
async fn set_up_fresh(opts: &Options, plan: &Plan, tag: u64) -> anyhow::Result<Routes> {
    let mut owners: Vec<u64> = plan.groups.iter().map(|m| m[0]).collect();
    if opts.target == Target::Courier {
        for (business, _, consenting) in &plan.lists {
            owners.push(*business);
            owners.extend(consenting);
        }
    }
    owners.sort_unstable();
    owners.dedup();
    let mut clients = HashMap::new();
    for u in owners {
        let (client, _) = Client::connect(opts.client_config(u - opts.first_user)).await?;
        clients.insert(u, Arc::new(client));
    }
    set_up(opts, plan, tag, &clients).await
}

/// A number that tells this run's messages from earlier runs' (the time).
fn run_tag() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Creates the plan's groups and lists through `clients` (Courier and the
/// relay; peers name groups by subject and have no lists).
async fn set_up(
    opts: &Options,
    plan: &Plan,
    tag: u64,
    clients: &HashMap<u64, Arc<Client>>,
) -> anyhow::Result<Routes> {
    let courier_target = matches!(opts.target, Target::Courier | Target::Relay);
    let group_ids = if courier_target && !plan.groups.is_empty() {
        courier::create_groups(clients, plan).await?
    } else {
        (0..plan.groups.len() as u64).collect()
    };
    if !plan.lists.is_empty() {
        anyhow::ensure!(
            opts.target != Target::Relay,
            "the relay has no broadcast lists or contacts"
        );
    }
    let business = opts.scenario == crate::options::Scenario::Business;
    if business {
        anyhow::ensure!(
            opts.target == Target::Courier,
            "the business scenario needs the courier target (business rules are Courier's)"
        );
        let admin = opts.metrics.as_deref().ok_or_else(|| {
            anyhow::anyhow!("the business scenario registers its businesses over the admin port: pass --metrics ADDR")
        })?;
        courier::set_up_businesses(admin, &opts.key, plan).await?;
    }
    if opts.target == Target::Courier {
        courier::create_lists(clients, plan, !business).await?;
    }
    Ok(Routes {
        group_ids,
        lists: plan.lists.iter().map(|l| l.2.clone()).collect(),
        tag,
        template: business,
    })
}

/// Connects the run's `i`-th user.
async fn connect_one(
    opts: &Options,
    plan: &Plan,
    tag: u64,
    i: u64,
) -> anyhow::Result<(Endpoint, Option<Inbox>)> {
    if matches!(opts.target, Target::Courier | Target::Relay) {
        let (client, _) = Client::connect(opts.client_config(i)).await?;
        return Ok((Endpoint::Courier(Arc::new(client)), None));
    }
    let u = opts.first_user + i;
    let groups: Vec<usize> = plan
        .groups
        .iter()
        .enumerate()
        .filter(|(_, m)| m.contains(&u))
        .map(|(i, _)| i)
        .collect();
    let (peer, inbox) = peer::connect(opts, tag, i, u, &groups).await?;
    Ok((Endpoint::Peer(peer), Some(inbox)))
}

impl Endpoint {
    /// Queues the message with client id `id` now (in order) and returns
    /// the wait for its ack.
    pub(crate) fn start_send(
        &self,
        me: u64,
        id: u64,
        dest: Dest,
        routes: &Routes,
        body: Bytes,
    ) -> Result<Ack, String> {
        let peer = match self {
            Endpoint::Courier(c) => {
                let ack = courier_send(c, id, dest, routes, body).map_err(client_error)?;
                return Ok(Box::pin(async move { ack.await.map_err(client_error) }));
            }
            Endpoint::Peer(p) => p,
        };
        // Peers name destinations by subject, stream or topic, and have no
        // lists: one write per consenting recipient, all in flight,
        // acknowledged when every one is.
        let name = match dest {
            Dest::User(u) => user_name(routes.tag, u),
            Dest::Group(g) => group_name(routes.tag, g),
            Dest::List(l) => {
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
        };
        peer.publish(me, &name, &body)
    }
}

//! One simulated user's connection to the target, and how it sends and
//! receives: `courier` for Courier and the relay, `peer` for the peer
//! brokers.

pub(crate) mod courier;
pub(crate) mod peer;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use courier_client::{Client, ClientError};

use self::courier::{client_error, courier_send};
use self::peer::{group_name, user_name, Ack, Peer};
use crate::options::{Options, Target};
use crate::peers::Inbox;
use crate::plan::{Dest, Plan, Routes};

/// One simulated user's connection to the target.
pub(crate) enum Endpoint {
    Courier(Arc<Client>),
    Peer(Peer),
}

/// Where a user's deliveries come from.
pub(crate) enum Source {
    /// A Courier session, and how many deliveries it has not yet confirmed.
    Courier(Arc<Client>, u32),
    Peer(Inbox),
}

impl Source {
    /// The next payload; `Ok(None)` after `wait` without one; `Err` once closed.
    pub(crate) async fn next(&mut self, wait: Duration) -> Result<Option<Bytes>, ()> {
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

/// Connects every user and sets up the groups and lists; returns the
/// endpoints, the sources of their deliveries, and the routes' names on
/// the target.
pub(crate) async fn connect_all(
    opts: &Options,
    plan: &Plan,
) -> anyhow::Result<(Vec<Endpoint>, Vec<Source>, Routes)> {
    let tag = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let mut endpoints = Vec::new();
    let mut sources = Vec::new();
    for i in 0..opts.users {
        let (endpoint, source) = connect_one(opts, plan, tag, i).await?;
        endpoints.push(endpoint);
        sources.push(source);
    }
    let courier_target = matches!(opts.target, Target::Courier | Target::Relay);
    let clients: Vec<Arc<Client>> = endpoints
        .iter()
        .filter_map(|e| match e {
            Endpoint::Courier(c) => Some(c.clone()),
            Endpoint::Peer(_) => None,
        })
        .collect();
    let group_ids = if courier_target && !plan.groups.is_empty() {
        courier::create_groups(&clients, plan, opts.first_user).await?
    } else {
        (0..plan.groups.len() as u64).collect()
    };
    if !plan.lists.is_empty() {
        anyhow::ensure!(
            opts.target != Target::Relay,
            "the relay has no broadcast lists or contacts"
        );
    }
    if opts.target == Target::Courier {
        courier::create_lists(&clients, plan, opts.first_user).await?;
    }
    let routes = Routes {
        group_ids,
        lists: plan.lists.iter().map(|l| l.2.clone()).collect(),
        tag,
    };
    Ok((endpoints, sources, routes))
}

/// Connects the run's `i`-th user.
async fn connect_one(
    opts: &Options,
    plan: &Plan,
    tag: u64,
    i: u64,
) -> anyhow::Result<(Endpoint, Source)> {
    if matches!(opts.target, Target::Courier | Target::Relay) {
        let (client, _) = Client::connect(opts.client_config(i)).await?;
        let client = Arc::new(client);
        return Ok((
            Endpoint::Courier(client.clone()),
            Source::Courier(client, 0),
        ));
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
    Ok((Endpoint::Peer(peer), Source::Peer(inbox)))
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

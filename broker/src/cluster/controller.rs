//! The controller: one node, elected through etcd's election API, the
//! only writer of the shard map. Every write it makes is a transaction
//! that holds only while its candidacy key is the one it was elected with
//! (`create_revision` unchanged): once its lease is gone, so is its power
//! to write, whatever it still believes.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Compare, CompareOp, LeaderKey, Txn, TxnOp};
use tracing::{info, warn};

use super::member::within;
use super::placement;
use super::view::{ClusterRecord, ShardRecord, View};
use super::Cluster;

/// Shards created per transaction (etcd refuses more than 128 operations
/// in one by default; each shard is one compare and one put).
const CREATE_CHUNK: usize = 64;

/// Campaigns for as long as the node runs; leads while elected.
pub(super) async fn run(cluster: Arc<Cluster>) {
    let mut lease_rx = cluster.lease.clone();
    loop {
        let lease = *lease_rx.borrow_and_update();
        if lease == 0 {
            tokio::select! {
                _ = cluster.stop.cancelled() => return,
                _ = lease_rx.changed() => continue,
            }
        }
        let mut client = cluster.etcd();
        let campaign = client.campaign(
            cluster.keys.election(),
            cluster.settings.node_id.clone(),
            lease,
        );
        let elected = tokio::select! {
            _ = cluster.stop.cancelled() => return,
            // A new lease: campaign again under it (the old candidacy went
            // with the old lease).
            _ = lease_rx.changed() => continue,
            r = campaign => r,
        };
        // The revision at which the campaign was won: a view read at or
        // after it shows this candidacy leading.
        let elected =
            elected.map(|mut r| (r.header().map_or(0, |h| h.revision()), r.take_leader()));
        let (won_at, leader) = match elected {
            Ok((won_at, Some(leader))) => (won_at, leader),
            Ok((_, None)) => continue,
            Err(e) => {
                warn!(error = %e, "campaign for controller failed; trying again");
                tokio::select! {
                    _ = cluster.stop.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                }
            }
        };
        cluster.controlling.store(true, Ordering::SeqCst);
        info!(
            revision = leader.rev(),
            "this node is the cluster's controller"
        );
        let why = lead(&cluster, &leader, lease, won_at).await;
        cluster.controlling.store(false, Ordering::SeqCst);
        info!(reason = why, "this node is no longer the controller");
    }
}

/// Leads until the node stops, its lease changes or its candidacy is no
/// longer the leader; returns why.
async fn lead(cluster: &Cluster, leader: &LeaderKey, lease: i64, won_at: i64) -> &'static str {
    let mut view_rx = cluster.view.clone();
    let mut lease_rx = cluster.lease.clone();
    lease_rx.borrow_and_update();
    let mut confirmed = false;
    let mut waiting_said = false;
    loop {
        let view = view_rx.borrow_and_update().clone();
        let (pinned, _) = cluster.etcd_pinned();
        // The view catches up with the election a moment after it (the
        // previous leader's key may still be in a view read since): act
        // once a view shows this node leading, and step down when a later
        // one no longer does.
        let leading = view.controller.as_deref() == Some(cluster.node_id());
        if leading && view.revision >= won_at {
            confirmed = true;
        } else if confirmed && view.etcd_up && !leading {
            return "another node's candidacy leads";
        }
        if !view.map_complete() && confirmed {
            let candidates = Cluster::candidates(&view).len();
            // Every copy of a shard on its own node, from the start.
            let wanted = cluster
                .settings
                .initial_nodes
                .max(cluster.settings.replication_factor) as usize;
            if view.config.is_some() || candidates >= wanted {
                match create_map(cluster, leader, &view).await {
                    Ok(true) => {}
                    Ok(false) => {
                        if !still_leader(cluster, leader).await {
                            return "its candidacy is gone (a transaction on it failed)";
                        }
                    }
                    Err(e) => {
                        warn!(error = %format!("{e:#}"), "cannot create the shard map yet; retrying");
                        cluster.etcd_failed(pinned);
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                }
            } else if !waiting_said {
                info!(
                    registered = candidates,
                    wanted,
                    "waiting for nodes before creating the shard map (cluster.initial_nodes)"
                );
                waiting_said = true;
            }
        } else if confirmed && view.etcd_up && view.replication() > 1 {
            if let Err(e) = failover(cluster, leader, &view).await {
                warn!(error = %format!("{e:#}"), "cannot fail shards over yet; retrying");
                cluster.etcd_failed(pinned);
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            if let Err(e) = super::moves::control_copies(cluster, leader, &view).await {
                warn!(error = %format!("{e:#}"), "cannot change shards' copies yet; retrying");
                cluster.etcd_failed(pinned);
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        } else if confirmed && view.etcd_up {
            if let Err(e) = super::moves::control(cluster, leader, &view).await {
                warn!(error = %format!("{e:#}"), "cannot run shard moves yet; retrying");
                cluster.etcd_failed(pinned);
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        }
        tokio::select! {
            _ = cluster.stop.cancelled() => return "the node is stopping",
            _ = lease_rx.changed() => if *lease_rx.borrow_and_update() != lease {
                return "the node's lease changed";
            },
            changed = view_rx.changed() => if changed.is_err() { return "the node is stopping" },
        }
    }
}

/// Gives every shard without an owner one (all of them for a new
/// cluster), in transactions conditioned on this controller's candidacy
/// and on each shard's record not existing. Ok(false): a condition failed.
async fn create_map(cluster: &Cluster, leader: &LeaderKey, view: &View) -> anyhow::Result<bool> {
    let count = view
        .config
        .as_ref()
        .map_or(cluster.settings.shards, |c| c.shards) as usize;
    let owners: Vec<Option<&str>> = if view.config.is_some() {
        view.owners
            .iter()
            .map(|o| o.as_ref().map(|o| o.node.as_str()))
            .collect()
    } else {
        vec![None; count]
    };
    let candidates = Cluster::candidates(view);
    let plan = placement::fill(&owners, &candidates);
    if plan.is_empty() {
        return Ok(true);
    }
    let factor = view
        .config
        .as_ref()
        .map_or(cluster.settings.replication_factor, |c| c.replication);
    info!(shards = plan.len(), of = count, "creating the shard map");
    let mut client = cluster.etcd();
    let keys = &cluster.keys;
    for (i, chunk) in plan.chunks(CREATE_CHUNK).enumerate() {
        let mut when = vec![Compare::create_revision(
            leader.key(),
            CompareOp::Equal,
            leader.rev(),
        )];
        let mut ops = Vec::new();
        if i == 0 && view.config.is_none() {
            let record = ClusterRecord {
                shards: count as u32,
                created_ms: courier_storage::Clock::system().now_ms(),
                replication: factor,
            };
            when.push(Compare::create_revision(keys.config(), CompareOp::Equal, 0));
            ops.push(TxnOp::put(
                keys.config(),
                serde_json::to_vec(&record).expect("a record serializes"),
                None,
            ));
        }
        for (shard, owner) in chunk {
            let key = keys.shard(*shard);
            when.push(Compare::create_revision(key.clone(), CompareOp::Equal, 0));
            let record = ShardRecord::placed(placement::replicas(owner, &candidates, factor));
            ops.push(TxnOp::put(
                key,
                serde_json::to_vec(&record).expect("a record serializes"),
                None,
            ));
        }
        let answer = within(
            "create shards",
            client.txn(Txn::new().when(when).and_then(ops)),
        )
        .await?;
        if !answer.succeeded() {
            return Ok(false);
        }
    }
    info!(shards = plan.len(), "shard map created");
    Ok(true)
}

/// Promotes an in-sync backup of every shard whose primary is gone (its
/// lease expired: it fenced itself before that), one transaction per
/// shard on the record's revision: the new primary alone is in sync until
/// the others have caught up with it (they may hold writes it never had,
/// which nobody acknowledged, so they copy the shard again). A shard
/// with no live in-sync copy waits for its primary to come back.
async fn failover(cluster: &Cluster, leader: &LeaderKey, view: &View) -> anyhow::Result<()> {
    let mut client = cluster.etcd();
    for (shard, owner) in view.owners.iter().enumerate() {
        let Some(o) = owner else { continue };
        if view.nodes.contains_key(&o.node) {
            continue;
        }
        // A live in-sync copy, preferring one that is not draining.
        let live = |n: &&String| view.nodes.contains_key(*n) && **n != o.node;
        let serving = |n: &&String| {
            view.nodes
                .get(*n)
                .is_some_and(|r| r.state != super::view::NodeState::Draining)
        };
        let Some(next) = o
            .isr
            .iter()
            .filter(live)
            .find(serving)
            .or_else(|| o.isr.iter().find(live))
        else {
            continue;
        };
        let record = o.promoted(next);
        let key = cluster.keys.shard(shard as u32);
        // Only while the old primary is still away: a primary whose lease
        // expired and that registered again since (etcd back after a
        // pause of its own) may already serve on a view read after it
        // registered, which showed no promotion.
        let txn = Txn::new()
            .when([
                Compare::create_revision(leader.key(), CompareOp::Equal, leader.rev()),
                Compare::mod_revision(key.clone(), CompareOp::Equal, o.revision),
                Compare::create_revision(cluster.keys.node(&o.node), CompareOp::Equal, 0),
            ])
            .and_then([TxnOp::put(
                key,
                serde_json::to_vec(&record).expect("a record serializes"),
                None,
            )]);
        let answer = within("fail a shard over", client.txn(txn)).await?;
        if answer.succeeded() {
            let epoch = answer.header().map_or(0, |h| h.revision());
            cluster.plane.failovers.inc();
            info!(shard, from = %o.node, to = %next, epoch, "shard failed over to an in-sync copy");
        }
    }
    Ok(())
}

/// Whether this controller's candidacy key still exists as elected.
async fn still_leader(cluster: &Cluster, leader: &LeaderKey) -> bool {
    let mut client = cluster.etcd();
    match within("read the candidacy", client.get(leader.key(), None)).await {
        Ok(r) => r
            .kvs()
            .first()
            .is_some_and(|kv| kv.create_revision() == leader.rev()),
        // Unknown: keep leading; every write is conditioned anyway.
        Err(_) => true,
    }
}

//! Where shards should live: each eligible node's share by capacity, and
//! the fewest moves that reach it. Pure functions of the map and the
//! nodes, so every controller computes the same plan.

use std::collections::BTreeMap;

/// A node that may own shards, with its relative capacity.
#[derive(Clone, Copy, Debug)]
pub struct Candidate<'a> {
    pub id: &'a str,
    pub capacity: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Move {
    pub shard: u32,
    pub from: String,
    pub to: String,
}

/// Each candidate's share of `total` shards, proportional to capacity
/// (largest remainders first, ties to the smaller id); sums to `total`.
fn targets<'a>(total: usize, nodes: &[Candidate<'a>]) -> BTreeMap<&'a str, usize> {
    let weight: u64 = nodes.iter().map(|n| u64::from(n.capacity)).sum();
    let mut out = BTreeMap::new();
    if weight == 0 {
        return out;
    }
    let mut rest: Vec<(u64, &str)> = Vec::new();
    let mut given = 0;
    for n in nodes {
        let exact = total as u64 * u64::from(n.capacity);
        let share = (exact / weight) as usize;
        given += share;
        out.insert(n.id, share);
        rest.push((exact % weight, n.id));
    }
    rest.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(b.1)));
    for (_, id) in rest.into_iter().take(total - given) {
        *out.get_mut(id).expect("a candidate") += 1;
    }
    out
}

/// Owners for the shards that have none (a new map, or one whose creation
/// stopped half way): each to the candidate furthest below its share.
pub fn fill(owners: &[Option<&str>], nodes: &[Candidate]) -> Vec<(u32, String)> {
    let target = targets(owners.len(), nodes);
    let mut count: BTreeMap<&str, usize> = target.keys().map(|id| (*id, 0)).collect();
    for o in owners.iter().flatten() {
        if let Some(c) = count.get_mut(o) {
            *c += 1;
        }
    }
    let mut out = Vec::new();
    for (shard, o) in owners.iter().enumerate() {
        if o.is_some() {
            continue;
        }
        // The largest deficit; ties to the smaller id (BTreeMap order).
        let Some(id) = count
            .iter()
            .max_by(|a, b| {
                let deficit = |(id, c): (&&str, &usize)| target[*id] as i64 - *c as i64;
                deficit(*a).cmp(&deficit(*b)).then(b.0.cmp(a.0))
            })
            .map(|(id, _)| *id)
        else {
            return out;
        };
        *count.get_mut(id).expect("counted") += 1;
        out.push((shard as u32, id.to_owned()));
    }
    out
}

/// The copies of a shard owned by `owner`, for replication factor
/// `factor`: the owner first, then the candidates that follow it in id
/// order, wrapping round (so each node's backups spread over the others
/// as its primaries do). Fewer when there are fewer candidates.
pub fn replicas(owner: &str, nodes: &[Candidate], factor: u32) -> Vec<String> {
    let mut ids: Vec<&str> = nodes
        .iter()
        .map(|n| n.id)
        .filter(|id| *id != owner)
        .collect();
    ids.sort_unstable();
    let after = ids.iter().position(|id| *id > owner).unwrap_or(0);
    ids.rotate_left(after);
    std::iter::once(owner)
        .chain(ids)
        .take(factor.max(1) as usize)
        .map(str::to_owned)
        .collect()
}

/// The fewest moves that give every candidate its share. Shards on nodes
/// that are not candidates but can take part in a move (`movable`:
/// registered, draining) all leave; shards on any other node (lost: not
/// registered) stay where they are, because a move needs its old owner,
/// and are left out of the shares.
pub fn rebalance(owners: &[&str], nodes: &[Candidate], movable: &[&str]) -> Vec<Move> {
    let is_candidate = |id: &str| nodes.iter().any(|n| n.id == id);
    let pinned = owners
        .iter()
        .filter(|o| !is_candidate(o) && !movable.contains(o))
        .count();
    let target = targets(owners.len() - pinned, nodes);
    let mut count: BTreeMap<&str, usize> = target.keys().map(|id| (*id, 0)).collect();
    for o in owners {
        if let Some(c) = count.get_mut(o) {
            *c += 1;
        }
    }
    // Shards that must go: every one on a movable non-candidate, and the
    // highest-numbered ones of a candidate over its share.
    let mut leaving = Vec::new();
    let mut over: BTreeMap<&str, usize> = count
        .iter()
        .filter(|(id, c)| **c > target[**id])
        .map(|(id, c)| (*id, c - target[*id]))
        .collect();
    for (shard, o) in owners.iter().enumerate().rev() {
        if movable.contains(o) && !is_candidate(o) {
            leaving.push((shard as u32, *o));
        } else if let Some(n) = over.get_mut(o).filter(|n| **n > 0) {
            *n -= 1;
            leaving.push((shard as u32, *o));
        }
    }
    leaving.sort();
    let mut moves = Vec::new();
    for (shard, from) in leaving {
        let Some(to) = count
            .iter()
            .filter(|(id, c)| **c < target[**id])
            .max_by(|a, b| {
                let deficit = |(id, c): (&&str, &usize)| target[*id] - *c;
                deficit(*a).cmp(&deficit(*b)).then(b.0.cmp(a.0))
            })
            .map(|(id, _)| *id)
        else {
            break;
        };
        *count.get_mut(to).expect("counted") += 1;
        moves.push(Move {
            shard,
            from: from.to_owned(),
            to: to.to_owned(),
        });
    }
    moves
}

/// One replicated shard as the map gives it: its primary, every copy
/// (the primary included) and the copies in sync.
#[derive(Clone, Copy, Debug)]
pub struct Copies<'a> {
    pub owner: &'a str,
    pub replicas: &'a [String],
    pub isr: &'a [String],
    /// The copy to remove once an added one is in sync (planned with the
    /// addition, kept in the shard's record).
    pub removing: Option<&'a str>,
}

/// One change to a replicated shard's copies (an etcd transaction each).
/// A copy moves as add, catch up, (switch,) remove: `Add` a copy, which
/// copies the shard and joins the in-sync set; then `Drop` the copy that
/// leaves, or first `Lead` (make an in-sync copy the primary) when the
/// one that leaves is the primary.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CopyStep {
    /// `removing`: the copy the new one replaces (none when the shard is
    /// short of copies).
    Add {
        shard: u32,
        to: String,
        removing: Option<String>,
    },
    Lead {
        shard: u32,
        to: String,
    },
    Drop {
        shard: u32,
        from: String,
    },
}

/// The next changes that bring replicated shards to their places: every
/// shard `factor` copies on distinct nodes, each candidate holding its
/// share of all copies (by capacity), none on a node that drains
/// (`movable`) nor on a lost node an operator drained (`retired`: its
/// copies are added elsewhere, then removed). At most `at_once` shards
/// are under way at a time (a copy being added, or copies being copied
/// again); a copy on any other node that is not registered (lost, or
/// restarting) stays where it is. Pure, so every controller plans the
/// same. Each call gives what can start now; the controller calls again
/// on every view.
pub fn rebalance_copies<'a>(
    shards: &[Copies<'a>],
    nodes: &[Candidate],
    movable: &[&str],
    retired: &[&str],
    factor: u32,
    at_once: usize,
) -> Vec<CopyStep> {
    let factor = factor.max(1) as usize;
    let is_candidate = |id: &str| nodes.iter().any(|n| n.id == id);
    let leaving = |id: &str| (movable.contains(&id) && !is_candidate(id)) || retired.contains(&id);
    let registered = |id: &str| is_candidate(id) || movable.contains(&id);
    let per_shard = factor.min(nodes.len());
    let target = targets(shards.len() * per_shard, nodes);
    let mut count: BTreeMap<&str, i64> = target.keys().map(|id| (*id, 0)).collect();
    let mut leads: BTreeMap<&str, usize> = target.keys().map(|id| (*id, 0)).collect();
    for s in shards {
        for r in s.replicas {
            if let Some(c) = count.get_mut(r.as_str()) {
                *c += 1;
            }
        }
        if let Some(l) = leads.get_mut(s.owner) {
            *l += 1;
        }
    }
    let surplus =
        |count: &BTreeMap<&str, i64>, id: &str| count.get(id).map_or(0, |c| c - target[id] as i64);
    // The copy to remove from a shard: one on a leaving node; else (once
    // a copy was added) one on a lost node; else the non-primary copy on
    // the node furthest over its share (ties to the larger id); else the
    // primary, if its node is over its share (a switch: a node that leads
    // every shard after failovers holds only primaries); else (once a
    // copy was added) the non-primary copy furthest over or least under.
    let choose_drop = |count: &BTreeMap<&str, i64>, s: &Copies<'a>, over_only: bool| {
        let r = s.replicas.iter().map(String::as_str);
        let others = r.clone().filter(|n| *n != s.owner);
        let furthest =
            |a: &&str, b: &&str| surplus(count, a).cmp(&surplus(count, b)).then(a.cmp(b));
        r.clone()
            .find(|n| leaving(n))
            .or_else(|| r.clone().find(|n| !over_only && !registered(n)))
            .or_else(|| {
                others
                    .clone()
                    .filter(|n| surplus(count, n) > 0)
                    .max_by(furthest)
            })
            .or_else(|| (surplus(count, s.owner) > 0).then_some(s.owner))
            .or_else(|| others.max_by(furthest).filter(|_| !over_only))
    };
    // The in-sync copy to lead instead of `s.owner`: a candidate, the one
    // leading the fewest shards (ties to the smaller id).
    let choose_lead = |leads: &BTreeMap<&str, usize>, s: &Copies<'a>| {
        s.isr
            .iter()
            .map(String::as_str)
            .filter(|n| *n != s.owner && is_candidate(n))
            .min_by(|a, b| leads[a].cmp(&leads[b]).then(a.cmp(b)))
    };
    let rebuilding = |s: &Copies<'_>| {
        s.replicas
            .iter()
            .any(|n| registered(n) && !s.isr.contains(n))
    };
    let mut steps = Vec::new();
    let mut under_way = 0;
    let mut stepped = vec![false; shards.len()];
    // Shards with a copy added: remove one once the rest are in sync.
    for (i, s) in shards.iter().enumerate() {
        if s.replicas.len() <= factor {
            if rebuilding(s) {
                under_way += 1;
                stepped[i] = true;
            }
            continue;
        }
        stepped[i] = true;
        let planned = s.removing.filter(|r| s.replicas.iter().any(|n| n == r));
        let Some(from) = planned.or_else(|| choose_drop(&count, s, false)) else {
            continue;
        };
        let rest_in_sync = s
            .isr
            .iter()
            .filter(|n| n.as_str() != from && registered(n))
            .count();
        if rest_in_sync < factor {
            under_way += 1;
            continue;
        }
        let shard = i as u32;
        if from == s.owner {
            match choose_lead(&leads, s) {
                Some(to) => {
                    *leads.get_mut(to).expect("a candidate") += 1;
                    under_way += 1;
                    steps.push(CopyStep::Lead {
                        shard,
                        to: to.to_owned(),
                    });
                }
                None => under_way += 1,
            }
        } else {
            if let Some(c) = count.get_mut(from) {
                *c -= 1;
            }
            steps.push(CopyStep::Drop {
                shard,
                from: from.to_owned(),
            });
        }
    }
    // New copies: for a shard short of copies, with one on a leaving node,
    // or with one on a node over its share, on the candidate furthest
    // below its share that holds none of the shard. A primary is the copy
    // to replace only when no shard has another copy over its share (a
    // switch costs the shard's other copies a whole copy).
    let mut added = false;
    for primaries_too in [false, true] {
        if primaries_too && (added || under_way > 0) {
            break;
        }
        for (i, s) in shards.iter().enumerate() {
            if under_way >= at_once {
                break;
            }
            if stepped[i] {
                continue;
            }
            let short = s.replicas.len() < per_shard;
            let leaving_copy = s.replicas.iter().map(String::as_str).find(|n| leaving(n));
            let removing = if short {
                None
            } else if leaving_copy.is_some() {
                leaving_copy
            } else {
                match choose_drop(&count, s, true) {
                    Some(d) if d != s.owner || primaries_too => Some(d),
                    _ => continue,
                }
            };
            let replace = short || leaving_copy.is_some();
            let to = count
                .iter()
                .filter(|(id, _)| !s.replicas.iter().any(|r| r == *id))
                .filter(|(id, _)| replace || surplus(&count, id) < 0)
                .min_by(|a, b| {
                    let over = |(id, _): &(&&str, &i64)| surplus(&count, id);
                    over(a).cmp(&over(b)).then(a.0.cmp(b.0))
                })
                .map(|(id, _)| *id);
            let shard = i as u32;
            match to {
                Some(to) => {
                    *count.get_mut(to).expect("a candidate") += 1;
                    if let Some(d) = removing.and_then(|d| count.get_mut(d)) {
                        *d -= 1;
                    }
                    under_way += 1;
                    stepped[i] = true;
                    added = true;
                    steps.push(CopyStep::Add {
                        shard,
                        to: to.to_owned(),
                        removing: removing.map(str::to_owned),
                    });
                }
                // Nowhere to put a new copy (fewer candidates than copies):
                // the primary at least leaves a draining node.
                None if leaving(s.owner) && !rebuilding(s) => {
                    if let Some(to) = choose_lead(&leads, s) {
                        *leads.get_mut(to).expect("a candidate") += 1;
                        under_way += 1;
                        stepped[i] = true;
                        steps.push(CopyStep::Lead {
                            shard,
                            to: to.to_owned(),
                        });
                    }
                }
                None => {}
            }
        }
    }
    steps
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nodes<'a>(ids: &[&'a str]) -> Vec<Candidate<'a>> {
        ids.iter()
            .map(|id| Candidate { id, capacity: 100 })
            .collect()
    }

    fn counts(owners: &[String]) -> BTreeMap<String, usize> {
        let mut c = BTreeMap::new();
        for o in owners {
            *c.entry(o.clone()).or_default() += 1;
        }
        c
    }

    fn create(n: usize, ids: &[&str]) -> Vec<String> {
        let empty = vec![None; n];
        fill(&empty, &nodes(ids))
            .into_iter()
            .map(|(_, o)| o)
            .collect()
    }

    #[test]
    fn a_new_map_is_spread_evenly_and_the_same_everywhere() {
        let owners = create(256, &["a", "b", "c"]);
        assert_eq!(owners.len(), 256);
        let c = counts(&owners);
        assert_eq!((c["a"], c["b"], c["c"]), (86, 85, 85));
        assert_eq!(owners, create(256, &["a", "b", "c"]), "deterministic");
        let weighted = fill(
            &vec![None; 300],
            &[
                Candidate {
                    id: "big",
                    capacity: 200,
                },
                Candidate {
                    id: "small",
                    capacity: 100,
                },
            ],
        );
        let c = counts(&weighted.into_iter().map(|(_, o)| o).collect::<Vec<_>>());
        assert_eq!((c["big"], c["small"]), (200, 100), "by capacity");
    }

    #[test]
    fn a_half_created_map_is_completed_without_touching_what_exists() {
        let mut owners: Vec<Option<&str>> = vec![Some("a"); 10];
        owners.extend(vec![None; 20]);
        let filled = fill(&owners, &nodes(&["a", "b", "c"]));
        assert_eq!(filled.len(), 20);
        assert!(filled.iter().all(|(s, _)| *s >= 10), "only the empty slots");
        let all: Vec<String> = owners
            .iter()
            .flatten()
            .map(|s| s.to_string())
            .chain(filled.into_iter().map(|(_, o)| o))
            .collect();
        let c = counts(&all);
        assert_eq!((c["a"], c["b"], c["c"]), (10, 10, 10));
    }

    #[test]
    fn a_join_moves_only_the_new_nodes_share() {
        let owners = create(256, &["a", "b", "c"]);
        let refs: Vec<&str> = owners.iter().map(String::as_str).collect();
        assert!(
            rebalance(&refs, &nodes(&["a", "b", "c"]), &[]).is_empty(),
            "balanced"
        );
        let moves = rebalance(&refs, &nodes(&["a", "b", "c", "d"]), &[]);
        assert_eq!(
            moves.len(),
            64,
            "256 / 4: nothing more than the newcomer's share"
        );
        assert!(moves.iter().all(|m| m.to == "d"));
        let mut after = owners.clone();
        for m in &moves {
            assert_eq!(after[m.shard as usize], m.from);
            after[m.shard as usize] = m.to.clone();
        }
        let c = counts(&after);
        assert_eq!(c.values().copied().collect::<Vec<_>>(), [64, 64, 64, 64]);
    }

    #[test]
    fn a_drain_moves_only_the_drained_nodes_shards_and_a_lost_node_keeps_its_own() {
        let owners = create(256, &["a", "b", "c"]);
        let refs: Vec<&str> = owners.iter().map(String::as_str).collect();
        let moves = rebalance(&refs, &nodes(&["a", "b"]), &["c"]);
        assert_eq!(moves.len(), 85);
        assert!(moves.iter().all(|m| m.from == "c" && m.to != "c"));
        let lost = rebalance(&refs, &nodes(&["a", "b"]), &[]);
        assert!(
            lost.iter().all(|m| m.from != "c"),
            "c is gone: nobody may take its shards"
        );
        assert!(
            lost.is_empty(),
            "a and b already hold equal shares of the rest"
        );
    }

    #[test]
    fn copies_follow_the_owner_round_the_ring_of_ids() {
        let nodes: Vec<Candidate> = ["n1", "n2", "n3", "n4"]
            .iter()
            .map(|id| Candidate { id, capacity: 100 })
            .collect();
        assert_eq!(replicas("n2", &nodes, 3), ["n2", "n3", "n4"]);
        assert_eq!(replicas("n4", &nodes, 3), ["n4", "n1", "n2"]);
        assert_eq!(replicas("n3", &nodes, 1), ["n3"]);
        assert_eq!(
            replicas("n1", &nodes[..2], 3),
            ["n1", "n2"],
            "fewer nodes than copies"
        );
        assert_eq!(replicas("gone", &nodes, 2), ["gone", "n1"]);
    }

    /// Shards as `n` records placed at creation, every copy in sync.
    fn placed(n: usize, ids: &[&str], factor: u32) -> Vec<(String, Vec<String>, Vec<String>)> {
        create(n, ids)
            .into_iter()
            .map(|o| {
                let r = replicas(&o, &nodes(ids), factor);
                (o, r.clone(), r)
            })
            .collect()
    }

    /// Runs the copy planner to its end as etcd and the copies would:
    /// each round the steps are applied, and every copy added or to be
    /// copied again is in sync by the next. Returns every step taken.
    fn settle(
        shards: &mut [(String, Vec<String>, Vec<String>)],
        ids: &[&str],
        movable: &[&str],
        retired: &[&str],
        factor: u32,
    ) -> Vec<CopyStep> {
        let mut all = Vec::new();
        let mut removing: Vec<Option<String>> = vec![None; shards.len()];
        for _ in 0..1000 {
            let copies: Vec<Copies> = shards
                .iter()
                .zip(&removing)
                .map(|((owner, replicas, isr), removing)| Copies {
                    owner,
                    replicas,
                    isr,
                    removing: removing.as_deref(),
                })
                .collect();
            let steps = rebalance_copies(&copies, &nodes(ids), movable, retired, factor, 2);
            let synced = shards.iter().all(|(_, replicas, isr)| isr == replicas);
            if steps.is_empty() && synced {
                return all;
            }
            // Copies in flight catch up (a round later than they began).
            for (_, replicas, isr) in shards.iter_mut() {
                *isr = replicas.clone();
            }
            for step in &steps {
                match step.clone() {
                    CopyStep::Add {
                        shard,
                        to,
                        removing: r,
                    } => {
                        let s = &mut shards[shard as usize];
                        assert!(!s.1.contains(&to), "{step:?}: a second copy on one node");
                        s.1.push(to);
                        removing[shard as usize] = r;
                    }
                    CopyStep::Lead { shard, to } => {
                        let s = &mut shards[shard as usize];
                        assert!(s.2.contains(&to), "{step:?}: only an in-sync copy leads");
                        s.0 = to.clone();
                        s.2 = vec![to];
                    }
                    CopyStep::Drop { shard, from } => {
                        let s = &mut shards[shard as usize];
                        assert_ne!(s.0, from, "{step:?}: the primary is never dropped");
                        s.1.retain(|n| *n != from);
                        s.2.retain(|n| *n != from);
                        removing[shard as usize] = None;
                    }
                }
            }
            all.extend(steps);
        }
        panic!("the copy plan never settled");
    }

    fn leads(steps: &[CopyStep]) -> usize {
        steps
            .iter()
            .filter(|s| matches!(s, CopyStep::Lead { .. }))
            .count()
    }

    /// Every shard on `factor` copies, all in sync, its primary among them.
    fn all_in_place(shards: &[(String, Vec<String>, Vec<String>)], factor: usize) {
        for (owner, replicas, isr) in shards {
            assert_eq!(replicas.len(), factor);
            assert_eq!(isr, replicas);
            assert!(replicas.contains(owner));
        }
    }

    /// Shards as the planner takes them, nothing being removed.
    fn as_copies(shards: &[(String, Vec<String>, Vec<String>)]) -> Vec<Copies<'_>> {
        shards
            .iter()
            .map(|(owner, replicas, isr)| Copies {
                owner,
                replicas,
                isr,
                removing: None,
            })
            .collect()
    }

    fn copy_counts(shards: &[(String, Vec<String>, Vec<String>)]) -> BTreeMap<String, usize> {
        counts(&shards.iter().flat_map(|s| s.1.clone()).collect::<Vec<_>>())
    }

    #[test]
    fn a_replicated_map_in_place_needs_no_change() {
        let mut shards = placed(32, &["a", "b", "c"], 3);
        assert!(settle(&mut shards, &["a", "b", "c"], &[], &[], 3).is_empty());
        let mut shards = placed(32, &["a", "b", "c", "d"], 2);
        assert!(settle(&mut shards, &["a", "b", "c", "d"], &[], &[], 2).is_empty());
    }

    #[test]
    fn a_join_adds_copies_to_the_new_node_and_drops_as_many_without_moving_a_primary() {
        let mut shards = placed(32, &["a", "b", "c"], 3);
        let owners: Vec<String> = shards.iter().map(|s| s.0.clone()).collect();
        let steps = settle(&mut shards, &["a", "b", "c", "d"], &[], &[], 3);
        let c = copy_counts(&shards);
        assert_eq!(c.values().copied().collect::<Vec<_>>(), [24, 24, 24, 24]);
        let adds = steps
            .iter()
            .filter(|s| matches!(s, CopyStep::Add { .. }))
            .count();
        assert_eq!(adds, 24, "only the newcomer's share is copied: {steps:?}");
        assert!(steps.iter().all(|s| !matches!(s, CopyStep::Lead { .. })));
        assert_eq!(
            owners,
            shards.iter().map(|s| s.0.clone()).collect::<Vec<_>>()
        );
        for (owner, replicas, _) in &shards {
            assert_eq!(replicas.len(), 3);
            assert!(replicas.contains(owner));
        }
    }

    #[test]
    fn a_join_after_failovers_left_one_node_leading_everything_still_balances_copies() {
        // After failovers c leads every shard: its copies are all primaries.
        let mut shards = placed(32, &["a", "b", "c"], 3);
        for (owner, replicas, _) in shards.iter_mut() {
            *owner = "c".to_owned();
            replicas.retain(|n| n != "c");
            replicas.insert(0, "c".to_owned());
        }
        let steps = settle(&mut shards, &["a", "b", "c", "d"], &[], &[], 3);
        let c = copy_counts(&shards);
        assert_eq!(c.values().copied().collect::<Vec<_>>(), [24, 24, 24, 24]);
        let switches = leads(&steps);
        assert_eq!(switches, 8, "c leaves 8 shards, each led by it: {steps:?}");
        all_in_place(&shards, 3);
    }

    #[test]
    fn a_drain_moves_every_copy_and_primary_off_the_node_when_others_can_hold_them() {
        let ids = ["a", "b", "c", "d"];
        let mut shards = placed(32, &ids, 3);
        let steps = settle(&mut shards, &["a", "c", "d"], &["b"], &[], 3);
        let c = copy_counts(&shards);
        assert_eq!(c.get("b"), None, "b holds nothing: {c:?}");
        assert_eq!(c.values().copied().collect::<Vec<_>>(), [32, 32, 32]);
        let led_by_b = placed(32, &ids, 3).iter().filter(|s| s.0 == "b").count();
        let switches = leads(&steps);
        assert_eq!(switches, led_by_b, "one switch per shard b led: {steps:?}");
        all_in_place(&shards, 3);
    }

    #[test]
    fn a_drain_below_the_factor_moves_only_the_primaries() {
        let mut shards = placed(16, &["a", "b", "c"], 3);
        let steps = settle(&mut shards, &["a", "c"], &["b"], &[], 3);
        assert!(steps.iter().all(|s| matches!(s, CopyStep::Lead { .. })));
        assert!(shards.iter().all(|s| s.0 != "b" && s.1.len() == 3));
    }

    #[test]
    fn a_lost_node_drained_by_an_operator_has_its_copies_replaced() {
        let mut shards = placed(16, &["a", "b", "c", "d"], 3);
        // d is lost: its shards were promoted to in-sync copies first.
        for (owner, _, isr) in shards.iter_mut() {
            isr.retain(|n| n != "d");
            if owner == "d" {
                *owner = isr[0].clone();
            }
        }
        let steps = settle(&mut shards, &["a", "b", "c"], &[], &["d"], 3);
        assert!(steps.iter().all(|s| !matches!(s, CopyStep::Lead { .. })));
        for (_, replicas, isr) in &shards {
            assert_eq!(replicas.len(), 3);
            assert!(!replicas.iter().any(|n| n == "d"));
            assert_eq!(isr, replicas);
        }
    }

    #[test]
    fn copies_on_a_lost_node_stay_and_nothing_starts_while_copies_are_copied_again() {
        let shards = placed(16, &["a", "b", "c", "d"], 3);
        let copies = as_copies(&shards);
        // d gone: the three others hold their shares of what is left.
        let steps = rebalance_copies(&copies, &nodes(&["a", "b", "c"]), &[], &[], 3, 2);
        assert!(steps.is_empty(), "{steps:?}");
        // Every copy of a's being copied again: under way, nothing new.
        let rebuilding: Vec<(String, Vec<String>, Vec<String>)> = shards
            .iter()
            .map(|(o, r, _)| (o.clone(), r.clone(), vec![o.clone()]))
            .collect();
        let copies = as_copies(&rebuilding);
        let more = ["a", "b", "c", "d", "e"];
        assert!(rebalance_copies(&copies, &nodes(&more), &[], &[], 3, 2).is_empty());
    }
}

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
}

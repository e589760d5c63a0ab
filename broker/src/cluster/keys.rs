//! The cluster's keys in etcd, all under `/courier/<cluster>/`:
//!
//! | key                       | value                                  | written by |
//! |---------------------------|----------------------------------------|------------|
//! | `config`                  | [`ClusterRecord`](super::view::ClusterRecord): shard count, creation time | the controller, once |
//! | `nodes/<id>`              | [`NodeRecord`](super::view::NodeRecord): addresses, capacity, state; under the node's lease | the node |
//! | `controller/<lease hex>`  | the candidate's node id (etcd's election API: the oldest key leads) | each node, campaigning |
//! | `shards/<nnnnn>`          | [`ShardRecord`](super::view::ShardRecord): the owner, its copies and the in-sync set; the epoch is the `mod_revision` of the write that made the owner the owner | the controller (creation, moves, failover) and the primary (in-sync set), in transactions on the current revision |
//! | `moves/<nnnnn>`           | [`MoveRecord`](super::view::MoveRecord): from, to, the epoch it moves from, the old owner's lease once copied | the controller (creates, switches, calls off); the new owner (copied); the old owner (calls off a pause that waited too long) |
//! | `drain/<id>`              | when the drain was asked (ms)          | `courier admin cluster drain` (any node) |
//! | `rebalance`               | when a rebalance was asked (ms): wakes the controller | `courier admin cluster rebalance` (any node) |

/// The key names of one cluster.
#[derive(Clone, Debug)]
pub struct Keys {
    root: String,
}

/// What a key under the root names.
#[derive(Debug, PartialEq, Eq)]
pub enum Key<'a> {
    Config,
    Node(&'a str),
    Candidate,
    Shard(u32),
    Move(u32),
    Drain(&'a str),
    Rebalance,
}

impl Keys {
    pub fn new(cluster: &str) -> Keys {
        Keys {
            root: format!("/courier/{cluster}/"),
        }
    }

    /// The prefix of everything the cluster keeps.
    pub fn root(&self) -> &str {
        &self.root
    }

    pub fn config(&self) -> String {
        format!("{}config", self.root)
    }

    pub fn node(&self, id: &str) -> String {
        format!("{}nodes/{id}", self.root)
    }

    /// The election's name (etcd puts each candidate at `name/<lease>`).
    pub fn election(&self) -> String {
        format!("{}controller", self.root)
    }

    pub fn shard(&self, shard: u32) -> String {
        format!("{}shards/{shard:05}", self.root)
    }

    pub fn moving(&self, shard: u32) -> String {
        format!("{}moves/{shard:05}", self.root)
    }

    pub fn drain(&self, id: &str) -> String {
        format!("{}drain/{id}", self.root)
    }

    pub fn rebalance(&self) -> String {
        format!("{}rebalance", self.root)
    }

    pub fn parse<'a>(&self, key: &'a str) -> Option<Key<'a>> {
        let rest = key.strip_prefix(self.root.as_str())?;
        if rest == "config" {
            return Some(Key::Config);
        }
        if rest == "rebalance" {
            return Some(Key::Rebalance);
        }
        if let Some(id) = rest.strip_prefix("nodes/") {
            return Some(Key::Node(id));
        }
        if rest.starts_with("controller/") {
            return Some(Key::Candidate);
        }
        if let Some(id) = rest.strip_prefix("drain/") {
            return Some(Key::Drain(id));
        }
        if let Some(n) = rest.strip_prefix("moves/") {
            return n.parse().ok().map(Key::Move);
        }
        rest.strip_prefix("shards/")
            .and_then(|n| n.parse().ok())
            .map(Key::Shard)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_parses_back_to_what_it_names() {
        let k = Keys::new("blue");
        assert_eq!(k.parse(&k.config()), Some(Key::Config));
        assert_eq!(k.parse(&k.node("n-1")), Some(Key::Node("n-1")));
        assert_eq!(k.parse(&k.shard(7)), Some(Key::Shard(7)));
        assert_eq!(k.parse(&k.moving(7)), Some(Key::Move(7)));
        assert_eq!(k.parse(&k.drain("n-2")), Some(Key::Drain("n-2")));
        assert_eq!(k.shard(7), "/courier/blue/shards/00007");
        assert_eq!(
            k.parse(&format!("{}/694d7c1a2b3c", k.election())),
            Some(Key::Candidate)
        );
        assert_eq!(k.parse("/courier/green/config"), None, "another cluster's");
        assert_eq!(k.parse("/courier/blue/shards/x"), None);
    }
}

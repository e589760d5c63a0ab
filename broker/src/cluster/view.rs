//! What a node knows of its cluster: one consistent read of the cluster's
//! keys at one etcd revision, refreshed whenever a watch reports a change.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::keys::{Key, Keys};

/// `config`: written once, when the controller creates the shard map.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct ClusterRecord {
    pub shards: u32,
    pub created_ms: u64,
    /// Copies of each shard (`cluster.replication_factor` at creation);
    /// absent in maps made before replication: 1.
    #[serde(default = "one")]
    pub replication: u32,
}

fn one() -> u32 {
    1
}

/// `nodes/<id>`: a node's registration, alive with its lease.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
pub struct NodeRecord {
    /// Where the other nodes reach it.
    pub advertise: String,
    /// Where the other nodes' links connect (HOST:PORT).
    #[serde(default)]
    pub link: String,
    /// Its client and admin listeners, as bound.
    pub clients: String,
    pub admin: String,
    pub capacity: u32,
    pub state: NodeState,
    pub version: String,
    pub started_ms: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeState {
    /// Registered, owning no shard yet.
    Joining,
    /// Owns shards and serves them.
    Serving,
    /// Shutting down: takes no new shards.
    Draining,
}

impl NodeState {
    pub fn name(self) -> &'static str {
        match self {
            NodeState::Joining => "joining",
            NodeState::Serving => "serving",
            NodeState::Draining => "draining",
        }
    }
}

/// `shards/<n>`: a shard's owner (its primary), its copies and which of
/// them are in sync. Its epoch is the revision of the write that made the
/// owner the owner (the key's `mod_revision` then), which no writer can
/// choose and every reader sees the same; a write that changes only the
/// in-sync set carries the epoch forward in `epoch`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
pub struct ShardRecord {
    pub owner: String,
    /// Every node holding a copy, the owner first (empty: the owner alone,
    /// as with replication factor 1).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub replicas: Vec<String>,
    /// The copies that have every acknowledged write of the shard, the
    /// owner included (empty: the owner alone). Only these may be promoted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub isr: Vec<String>,
    /// The owner's epoch, when this write kept the owner (an in-sync set
    /// change); absent: this write's revision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<i64>,
    /// The copy a copy added for a move replaces: removed once the added
    /// one is in sync (as Kafka's reassignment records its removing
    /// replicas), so the removal is the one planned with the addition.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub removing: Option<String>,
}

impl ShardRecord {
    /// A new shard owned by `replicas[0]` and copied to the others, which
    /// join its in-sync set once they follow it (the owner alone is in
    /// sync at first).
    pub fn placed(replicas: Vec<String>) -> ShardRecord {
        ShardRecord {
            owner: replicas[0].clone(),
            replicas: if replicas.len() > 1 {
                replicas
            } else {
                Vec::new()
            },
            isr: Vec::new(),
            epoch: None,
            removing: None,
        }
    }
}

/// `moves/<n>`: a shard moving from one node to another. `epoch` is the
/// shard's epoch when the move began (a move for any other is stale);
/// `copied_lease` is set by the new owner once it holds the whole shard
/// and the old owner has paused it, with the old owner's lease then (the
/// switch is conditioned on it: an old owner that restarted since has
/// forgotten its pause).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
pub struct MoveRecord {
    pub from: String,
    pub to: String,
    pub epoch: i64,
    #[serde(default)]
    pub copied_lease: Option<i64>,
}

/// A move as read, with its key's `mod_revision` (what writes to it are
/// conditioned on).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Move {
    pub record: MoveRecord,
    pub revision: i64,
    /// The key's `create_revision`: one incarnation of the move (a move
    /// called off and begun again is another).
    pub created: i64,
}

/// A shard's primary as the map gives it, with its copies.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Owner {
    pub node: String,
    /// The revision that made `node` the owner: commands routed by another
    /// are refused, backups refuse older ones' writes.
    pub epoch: i64,
    /// The record's `mod_revision`: what changes to it are conditioned on.
    pub revision: i64,
    /// Every copy, the owner first (the owner alone without replication).
    pub replicas: Vec<String>,
    /// The copies in sync, the owner included.
    pub isr: Vec<String>,
    /// The copy a move removes once the copy it added is in sync.
    pub removing: Option<String>,
}

impl Owner {
    pub(crate) fn from_record(r: ShardRecord, revision: i64) -> Owner {
        let alone = || vec![r.owner.clone()];
        Owner {
            epoch: r.epoch.unwrap_or(revision),
            revision,
            replicas: if r.replicas.is_empty() {
                alone()
            } else {
                r.replicas.clone()
            },
            isr: if r.isr.is_empty() {
                alone()
            } else {
                r.isr.clone()
            },
            node: r.owner,
            removing: r.removing,
        }
    }

    /// The record that makes in-sync copy `to` this shard's primary (a
    /// failover, or a switch for a move): alone in sync at a new epoch,
    /// the other copies copying the shard again from it.
    pub fn promoted(&self, to: &str) -> ShardRecord {
        let mut replicas = vec![to.to_owned()];
        replicas.extend(self.replicas.iter().filter(|n| *n != to).cloned());
        ShardRecord {
            owner: to.to_owned(),
            replicas,
            isr: vec![to.to_owned()],
            epoch: None,
            removing: self.removing.clone(),
        }
    }

    /// The record that says what this does, with `isr` as the in-sync set
    /// (an in-sync set change: the epoch carries forward).
    pub fn with_isr(&self, isr: Vec<String>) -> ShardRecord {
        ShardRecord {
            owner: self.node.clone(),
            replicas: self.replicas.clone(),
            isr,
            epoch: Some(self.epoch),
            removing: self.removing.clone(),
        }
    }
}

/// The cluster as one read saw it.
#[derive(Clone, Debug, Default)]
pub struct View {
    /// The etcd revision of the read.
    pub revision: i64,
    /// Set once the controller has created the map.
    pub config: Option<ClusterRecord>,
    /// One slot per shard (empty before the map exists); `None`: not yet
    /// assigned (a creation in progress).
    pub owners: Vec<Option<Owner>>,
    /// Registered (live) nodes.
    pub nodes: BTreeMap<String, NodeRecord>,
    /// The node whose candidacy is the oldest: the controller.
    pub controller: Option<String>,
    /// False while the last attempt to read or watch etcd failed: the view
    /// is the last one read, kept and served.
    pub etcd_up: bool,
    /// Values that did not parse (named in the status, never fatal).
    pub unreadable: Vec<String>,
    /// Moves under way, by shard.
    pub moves: BTreeMap<u32, Move>,
    /// Nodes asked to drain: they take no shards and give theirs away.
    pub drained: std::collections::BTreeSet<String>,
}

impl View {
    /// Builds the view from every key under the cluster's root, read at
    /// `revision`: `(key, value, create_revision, mod_revision)`.
    pub fn from_kvs<'a>(
        keys: &Keys,
        revision: i64,
        kvs: impl IntoIterator<Item = (&'a str, &'a [u8], i64, i64)>,
    ) -> View {
        let mut view = View {
            revision,
            etcd_up: true,
            ..View::default()
        };
        let mut shards = Vec::new();
        let mut oldest_candidate: Option<(i64, String)> = None;
        for (key, value, created, modified) in kvs {
            let Some(what) = keys.parse(key) else {
                continue;
            };
            match what {
                Key::Config => match serde_json::from_slice::<ClusterRecord>(value) {
                    // A shard is a run of slots: more shards than slots
                    // cannot be laid out (a map this version cannot serve).
                    Ok(c) if (1..=courier_storage::SLOTS as u32).contains(&c.shards) => {
                        view.config = Some(c)
                    }
                    _ => view.unreadable.push(key.to_owned()),
                },
                Key::Node(id) => match serde_json::from_slice(value) {
                    Ok(n) => drop(view.nodes.insert(id.to_owned(), n)),
                    Err(_) => view.unreadable.push(key.to_owned()),
                },
                Key::Candidate => {
                    let node = String::from_utf8_lossy(value).into_owned();
                    if oldest_candidate.as_ref().is_none_or(|(c, _)| created < *c) {
                        oldest_candidate = Some((created, node));
                    }
                }
                Key::Move(n) => match serde_json::from_slice::<MoveRecord>(value) {
                    Ok(record) => drop(view.moves.insert(
                        n,
                        Move {
                            record,
                            revision: modified,
                            created,
                        },
                    )),
                    Err(_) => view.unreadable.push(key.to_owned()),
                },
                Key::Drain(id) => drop(view.drained.insert(id.to_owned())),
                // Only wakes the controller (a change to the root).
                Key::Rebalance => {}
                Key::Shard(n) => match serde_json::from_slice::<ShardRecord>(value) {
                    Ok(r) => shards.push((n, Owner::from_record(r, modified))),
                    Err(_) => view.unreadable.push(key.to_owned()),
                },
            }
        }
        view.controller = oldest_candidate.map(|(_, n)| n);
        if let Some(c) = &view.config {
            view.owners = vec![None; c.shards as usize];
            for (n, owner) in shards {
                if let Some(slot) = view.owners.get_mut(n as usize) {
                    *slot = Some(owner);
                }
            }
        }
        view
    }

    /// Copies of each shard (1 before the map exists).
    pub fn replication(&self) -> u32 {
        self.config.as_ref().map_or(1, |c| c.replication)
    }

    /// The map exists and every shard has an owner.
    pub fn map_complete(&self) -> bool {
        self.config.is_some() && self.owners.iter().all(Option::is_some)
    }

    /// The shard a user (or group) belongs to: the one whose run of slots
    /// holds its slot, so a shard's data is one key range in the store.
    /// `None` before the map exists.
    pub fn shard_of(&self, id: u64) -> Option<u32> {
        let count = self.owners.len() as u32;
        (count > 0).then(|| courier_storage::shard_of_slot(courier_storage::slot_of(id), count))
    }

    /// The shard of `id` and its owner (`None` while being assigned);
    /// `None` before the map exists.
    pub fn owner_of(&self, id: u64) -> Option<(u32, Option<&Owner>)> {
        let shard = self.shard_of(id)?;
        Some((shard, self.owners[shard as usize].as_ref()))
    }

    /// Whether `node` holds `id` (a user or group): the map it has read
    /// gives `id`'s shard to it. Before a map is read (a node just started,
    /// or the cluster's map not created yet) a node holds nothing: serving
    /// from its own store then would take writes that belong to another
    /// node's shards.
    pub fn holds(&self, node: &str, id: u64) -> bool {
        self.owner_of(id)
            .is_some_and(|(_, o)| o.is_some_and(|o| o.node == node))
    }

    /// The runs of slots of the shards `node` owns (what its store serves).
    pub fn slots_of(&self, node: &str) -> Vec<std::ops::Range<u16>> {
        let count = self.owners.len() as u32;
        self.owners
            .iter()
            .enumerate()
            .filter(|(_, o)| o.as_ref().is_some_and(|o| o.node == node))
            .map(|(shard, _)| courier_storage::slots_of_shard(shard as u32, count))
            .collect()
    }

    /// Shards owned by `node`.
    pub fn owned_by(&self, node: &str) -> usize {
        self.owners
            .iter()
            .flatten()
            .filter(|o| o.node == node)
            .count()
    }

    /// Shards whose owner is not registered: unavailable until it returns
    /// with its disk, or (with replication) until an in-sync copy is
    /// promoted.
    pub fn unavailable(&self) -> usize {
        self.owners
            .iter()
            .flatten()
            .filter(|o| !self.nodes.contains_key(&o.node))
            .count()
    }

    /// Every node the cluster knows: registered ones and owners that are
    /// gone (lost: their shards wait for them).
    pub fn known_nodes(&self) -> Vec<String> {
        let mut all: Vec<String> = self.nodes.keys().cloned().collect();
        for o in self.owners.iter().flatten() {
            if !all.contains(&o.node) {
                all.push(o.node.clone());
            }
        }
        all.sort();
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(state: NodeState) -> Vec<u8> {
        serde_json::to_vec(&NodeRecord {
            advertise: "10.0.0.1:7700".into(),
            link: "10.0.0.1:7702".into(),
            clients: "10.0.0.1:7700".into(),
            admin: "10.0.0.1:7701".into(),
            capacity: 100,
            state,
            version: "0".into(),
            started_ms: 1,
        })
        .unwrap()
    }

    #[test]
    fn a_read_of_the_keys_becomes_the_map_with_epochs_and_the_oldest_candidate() {
        let k = Keys::new("blue");
        let config = br#"{"shards":3,"created_ms":5}"#.to_vec();
        let (n1, n2) = (node(NodeState::Serving), node(NodeState::Joining));
        let owner = |o: &str| format!(r#"{{"owner":"{o}"}}"#).into_bytes();
        let (s0, s1) = (owner("n1"), owner("gone"));
        let election = k.election();
        let rows: Vec<(String, Vec<u8>, i64, i64)> = vec![
            (k.config(), config, 10, 10),
            (k.node("n1"), n1, 3, 3),
            (k.node("n2"), n2, 4, 4),
            (format!("{election}/2"), b"n2".to_vec(), 8, 8),
            (format!("{election}/1"), b"n1".to_vec(), 6, 6),
            (k.shard(0), s0, 10, 12),
            (k.shard(1), s1, 10, 10),
            (k.shard(2), b"{".to_vec(), 10, 10),
            ("/courier/green/config".into(), b"?".to_vec(), 1, 1),
        ];
        let view = View::from_kvs(
            &k,
            20,
            rows.iter()
                .map(|(key, v, c, m)| (key.as_str(), v.as_slice(), *c, *m)),
        );
        assert_eq!(
            view.controller.as_deref(),
            Some("n1"),
            "oldest candidacy leads"
        );
        assert_eq!(
            view.owners[0],
            Some(Owner {
                node: "n1".into(),
                epoch: 12,
                revision: 12,
                replicas: vec!["n1".into()],
                isr: vec!["n1".into()],
                removing: None,
            }),
            "the epoch is the revision that last set the owner"
        );
        assert_eq!(view.owners[2], None, "an unreadable record is no owner");
        assert_eq!(view.unreadable, [k.shard(2)]);
        assert!(!view.map_complete());
        assert_eq!(view.owned_by("n1"), 1);
        assert_eq!(view.unavailable(), 1, "gone is not registered");
        assert_eq!(view.known_nodes(), ["gone", "n1", "n2"]);
        assert!(view.shard_of(42).is_some_and(|s| s < 3));
    }

    /// A node that has not read a map yet (just restarted, or the map not
    /// created) holds nothing: it must not take a send for another node's
    /// user into its own store. (Before, it held everything until its first
    /// read: a node restarted under load stored some sends for others'
    /// users during that moment, acknowledged and never delivered.)
    #[test]
    fn without_a_map_a_node_holds_nothing() {
        let none = View::default();
        assert!(!none.holds("n1", 42));
        assert_eq!(none.owner_of(42).map(|(s, _)| s), None);
        let view = View {
            owners: vec![
                Some(Owner {
                    node: "n1".into(),
                    epoch: 3,
                    ..Owner::default()
                }),
                None,
            ],
            ..View::default()
        };
        let in_shard = |s| (1u64..).find(|&u| view.shard_of(u) == Some(s)).unwrap();
        let (mine, unassigned) = (in_shard(0), in_shard(1));
        assert!(view.holds("n1", mine));
        assert!(!view.holds("n2", mine));
        assert!(!view.holds("n1", unassigned), "a shard being assigned");
    }
}

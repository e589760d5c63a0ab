//! A data directory remembers the one node of the one cluster it belongs
//! to (`cluster.toml` beside `db/`), and refuses to start as anything else:
//! another node's shards, or a single node's inboxes, are never served
//! under a name they were not written under.

use std::io::Write;
use std::path::Path;

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

const FILE: &str = "cluster.toml";

#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Identity {
    pub cluster: String,
    pub node_id: String,
}

/// Checks `data_dir` against how the node is started (`wanted`: the
/// cluster and node id, or `None` for a single node) and, for a cluster
/// node on a fresh directory, writes the identity (synced) before anything
/// else is created there.
pub fn check(data_dir: &Path, wanted: Option<&Identity>) -> anyhow::Result<()> {
    let path = data_dir.join(FILE);
    let found = match std::fs::read_to_string(&path) {
        Ok(text) => Some(toml::from_str::<Identity>(&text).with_context(|| {
            format!(
                "reading {} (the data dir's cluster identity)",
                path.display()
            )
        })?),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    match (found, wanted) {
        (None, None) => Ok(()),
        (Some(f), Some(w)) if f == *w => Ok(()),
        (Some(f), Some(w)) => bail!(
            "data dir {} belongs to node {:?} of cluster {:?}, not node {:?} of cluster {:?}: \
             a data dir serves one node of one cluster",
            data_dir.display(),
            f.node_id,
            f.cluster,
            w.node_id,
            w.cluster
        ),
        (Some(f), None) => bail!(
            "data dir {} belongs to node {:?} of cluster {:?}: start it with \
             --cluster {} --node-id {} --etcd URL",
            data_dir.display(),
            f.node_id,
            f.cluster,
            f.cluster,
            f.node_id
        ),
        (None, Some(w)) => {
            if data_dir.join("db").join("CURRENT").exists() {
                bail!(
                    "data dir {} holds a single node's store: a cluster node starts on an empty \
                     data dir (a single node's data cannot join a cluster)",
                    data_dir.display()
                );
            }
            write(data_dir, w).with_context(|| format!("writing {}", path.display()))
        }
    }
}

fn write(data_dir: &Path, id: &Identity) -> std::io::Result<()> {
    let tmp = data_dir.join(format!("{FILE}.tmp"));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(
        toml::to_string(id)
            .expect("an identity serializes")
            .as_bytes(),
    )?;
    f.sync_all()?;
    std::fs::rename(&tmp, data_dir.join(FILE))?;
    std::fs::File::open(data_dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(cluster: &str, node: &str) -> Identity {
        Identity {
            cluster: cluster.into(),
            node_id: node.into(),
        }
    }

    #[test]
    fn a_data_dir_serves_one_node_of_one_cluster() {
        let dir = tempfile::tempdir().unwrap();
        check(dir.path(), None).expect("a fresh dir starts a single node");
        check(dir.path(), Some(&id("blue", "n1"))).expect("a fresh dir joins a cluster");
        check(dir.path(), Some(&id("blue", "n1"))).expect("and restarts as the same node");
        for (other, named) in [
            (
                Some(id("green", "n1")),
                "cluster \"blue\", not node \"n1\" of cluster \"green\"",
            ),
            (
                Some(id("blue", "n2")),
                "node \"n1\" of cluster \"blue\", not node \"n2\"",
            ),
            (None, "start it with --cluster blue --node-id n1"),
        ] {
            let err = check(dir.path(), other.as_ref()).unwrap_err().to_string();
            assert!(err.contains(named), "{err}");
        }
    }

    #[test]
    fn a_single_nodes_store_does_not_join_a_cluster() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("db")).unwrap();
        std::fs::write(dir.path().join("db/CURRENT"), "MANIFEST-000001\n").unwrap();
        let err = check(dir.path(), Some(&id("blue", "n1")))
            .unwrap_err()
            .to_string();
        assert!(err.contains("holds a single node's store"), "{err}");
        assert!(
            !dir.path().join(FILE).exists(),
            "nothing written on refusal"
        );
        check(dir.path(), None).expect("it still starts as the single node it is");
    }
}

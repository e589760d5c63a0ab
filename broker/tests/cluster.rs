//! The cluster's control plane against a real etcd (Debian's
//! `etcd-server`, 3.4) and real nodes on loopback: registration under
//! leases, one controller, the shard map created once and agreed by
//! every node, a SIGKILLed node that keeps its shards (unavailable) until
//! it returns, a new controller when the old one dies, nodes that keep
//! serving their map while etcd is down, and data directories that stay
//! with their node.
//!
//! etcd comes from the Debian package `etcd-server` (`scripts/test`
//! installs it). Run elsewhere without it, these tests say loudly that
//! they skipped; with `TEST_REQUIRE_TOOLS=1` (set by `scripts/test`) a
//! missing etcd fails them instead.

mod common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// One etcd member on loopback, its data in a temporary directory.
struct Etcd {
    child: Option<Child>,
    client_port: u16,
    peer_port: u16,
    dir: tempfile::TempDir,
    binary: PathBuf,
}

impl Etcd {
    /// Starts etcd, or returns `None` after saying loudly that the test
    /// skips (panicking instead when the tools are required).
    fn start() -> Option<Etcd> {
        let binary = tool("etcd", "Debian package `etcd-server`")?;
        let mut etcd = Etcd {
            child: None,
            client_port: free_port(),
            peer_port: free_port(),
            dir: tempfile::tempdir().unwrap(),
            binary,
        };
        etcd.run();
        Some(etcd)
    }

    /// The cluster secret every node of a test shares (created once).
    fn cluster_secret(&self) -> String {
        let path = self.dir.path().join("cluster.key");
        courier_broker::auth::load_or_create_secret(&path).unwrap();
        path.display().to_string()
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    /// Starts (or starts again) the member on its data and ports, and
    /// waits until it answers `/health` (bounded).
    fn run(&mut self) {
        let client = self.url();
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let log = std::fs::File::create(self.dir.path().join("etcd.log")).unwrap();
        let child = Command::new(&self.binary)
            .args(["--name", "e1", "--data-dir"])
            .arg(self.dir.path().join("data"))
            .args([
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                &client,
            ])
            .args([
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
            ])
            // Courier pings its etcd connections every 2 s (etcd's default
            // minimum is 5 s: it would close them, too_many_pings).
            .args(["--grpc-keepalive-min-time", "1s"])
            .args(["--initial-cluster", &format!("e1={peer}")])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start etcd");
        self.child = Some(child);
        let deadline = Instant::now() + WAIT;
        while !self.healthy() {
            assert!(
                Instant::now() < deadline,
                "etcd did not become healthy; its log:\n{}",
                std::fs::read_to_string(self.dir.path().join("etcd.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn healthy(&self) -> bool {
        let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.client_port)) else {
            return false;
        };
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let _ = s.write_all(b"GET /health HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
        let mut answer = String::new();
        let _ = s.read_to_string(&mut answer);
        answer.contains("\"health\":\"true\"")
    }

    /// SIGKILL.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A node of cluster `name` with id `id` on etcd at `etcd`.
fn cluster_env(name: &str, id: &str, etcd: &Etcd, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let url = etcd.url();
    let secret = etcd.cluster_secret();
    let mut env: Vec<(String, String)> = [
        ("COURIER_CLUSTER_NAME", name),
        ("COURIER_CLUSTER_ETCD", url.as_str()),
        // The nodes share the token secret (a client's token is good on
        // every node: a gateway checks it, and the owner it forwards to
        // again), and their links authenticate with it.
        ("COURIER_AUTH_SECRET_FILE", secret.as_str()),
        ("COURIER_CLUSTER_SECRET_FILE", secret.as_str()),
        ("COURIER_CLUSTER_NODE_ID", id),
        // Short leases: a killed node is seen gone within seconds.
        ("COURIER_CLUSTER_LEASE_TTL_S", "2"),
        // Several nodes on one host: each its own link port.
        ("COURIER_CLUSTER_LINK_LISTEN", "127.0.0.1:0"),
        ("COURIER_SHARDS", "2"),
    ]
    .iter()
    .chain(extra)
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    env.dedup_by(|a, b| a.0 == b.0);
    env
}

fn start_node(name: &str, id: &str, etcd: &Etcd, extra: &[(&str, &str)]) -> Server {
    let env = cluster_env(name, id, etcd, extra);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    Server::start(&env)
}

/// Three nodes of cluster `name` started together (the map waits for all
/// three).
fn three_nodes(name: &str, ids: [&str; 3], etcd: &Etcd, extra: &[(&str, &str)]) -> Vec<Server> {
    let mut env = vec![("COURIER_CLUSTER_INITIAL_NODES", "3")];
    env.extend_from_slice(extra);
    ids.iter()
        .map(|id| start_node(name, id, etcd, &env))
        .collect()
}

/// Three nodes of cluster `name`, each serving and linked to the other two.
async fn three_linked(name: &str, ids: [&str; 3], etcd: &Etcd) -> Vec<Server> {
    three_linked_with(name, ids, etcd, &[]).await
}

/// `three_linked`, with settings besides.
async fn three_linked_with(
    name: &str,
    ids: [&str; 3],
    etcd: &Etcd,
    extra: &[(&str, &str)],
) -> Vec<Server> {
    let nodes = three_nodes(name, ids, etcd, extra);
    for (node, id) in nodes.iter().zip(ids) {
        wait_status(node, "serving, linked to the other two", |s| {
            all_serving(s, &ids)
                && ids
                    .iter()
                    .filter(|p| **p != id)
                    .all(|p| link_state(s, p) == "up")
        })
        .await;
    }
    nodes
}

async fn status(node: &Server) -> Value {
    let (code, body) = node.admin_request("/admin/cluster").await;
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

async fn shards(node: &Server) -> Vec<Value> {
    let (code, body) = node.admin_request("/admin/cluster/shards").await;
    assert_eq!(code, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    v["shards"].as_array().unwrap().clone()
}

/// Waits (bounded) until `check` holds for `node`'s status; the last
/// status seen goes into the failure.
async fn wait_status(node: &Server, what: &str, check: impl Fn(&Value) -> bool) -> Value {
    wait_status_for(node, what, WAIT, check).await
}

/// [`wait_status`] with its own bound.
async fn wait_status_for(
    node: &Server,
    what: &str,
    bound: Duration,
    check: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + bound;
    loop {
        let s = status(node).await;
        if check(&s) {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: never happened; last status {s:#}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn node_entry<'a>(status: &'a Value, id: &str) -> &'a Value {
    status["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["id"] == id)
        .unwrap_or_else(|| panic!("{id} not in {status:#}"))
}

/// The state of this node's link to `peer` in its status.
fn link_state(s: &Value, peer: &str) -> String {
    s["links"]
        .as_array()
        .and_then(|l| l.iter().find(|l| l["node"] == peer))
        .and_then(|l| l["state"].as_str())
        .unwrap_or("absent")
        .to_owned()
}

/// The load the move tests run through all of `nodes`: one-to-one pairs
/// and groups of 8 whose members are on every node, each user
/// reconnecting and resuming when its session ends, as a phone does.
fn moving_load(nodes: &[Server], first_user: u64, duration: Duration) -> courier_loadtest::Options {
    let addrs: Vec<String> = nodes.iter().map(|n| n.addr.clone()).collect();
    courier_loadtest::Options {
        addr: addrs.join(","),
        scenario: courier_loadtest::Scenario::Mixed,
        group_sizes: vec![(8, 1)],
        users: 32,
        first_user,
        duration,
        rate: Some(150.0),
        window: 4,
        resilient: true,
        ..nodes[0].load_options()
    }
}

/// No move under way and none planned, by a node's status.
fn no_moves(s: &Value) -> bool {
    s["moves"].as_array().is_some_and(Vec::is_empty) && s["planned_moves"] == 0
}

fn all_serving(s: &Value, ids: &[&str]) -> bool {
    s["map"] == "complete"
        && ids.iter().all(|id| {
            s["nodes"]
                .as_array()
                .unwrap()
                .iter()
                .any(|n| n["id"] == *id && n["state"] == "serving")
        })
}

/// Named so the epoll pass of `scripts/test` can skip them: the control
/// plane does not touch the network path.
mod control_plane {
    use super::*;

    /// Three nodes come up together (the map waits for all three), agree on
    /// one map of 256 shards spread 86/85/85 and on one controller. The
    /// controller is SIGKILLed: another node takes over, and the dead node's
    /// shards stay its own (unavailable, same epochs) until it comes back on
    /// its data dir, when it serves them again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn three_nodes_share_one_map_and_a_killed_node_keeps_its_shards() {
        let Some(etcd) = Etcd::start() else { return };
        let ids = ["n1", "n2", "n3"];
        let mut nodes = three_nodes("blue", ids, &etcd, &[]);
        for (node, id) in nodes.iter().zip(ids) {
            assert!(
                node.banner
                    .iter()
                    .any(|l| l.contains(&format!("cluster: blue as node {id}"))),
                "{:?}",
                node.banner
            );
        }
        let first = wait_status(
            &nodes[0],
            "the map complete with three serving nodes",
            |s| all_serving(s, &ids),
        )
        .await;
        assert_eq!(first["shards"], 256);
        let mut counts: Vec<u64> = ids
            .iter()
            .map(|id| node_entry(&first, id)["shards"].as_u64().unwrap())
            .collect();
        counts.sort();
        assert_eq!(counts, [85, 85, 86], "{first:#}");
        let controller = first["controller"].as_str().unwrap().to_owned();
        let map = shards(&nodes[0]).await;
        for node in &nodes[1..] {
            let s = wait_status(node, "the same view", |s| all_serving(s, &ids)).await;
            assert_eq!(s["controller"], controller.as_str());
            assert_eq!(
                shards(node).await,
                map,
                "every node reads the same owners and epochs"
            );
        }
        // Every node has an authenticated link to each other node.
        for (node, id) in nodes.iter().zip(ids) {
            wait_status(node, "links up to the other two", |s| {
                ids.iter()
                    .filter(|p| **p != id)
                    .all(|p| link_state(s, p) == "up")
            })
            .await;
        }
        let mut controllers = 0;
        let mut owned = 0;
        for node in &nodes {
            controllers += node.metric("courier_cluster_controller").await;
            owned += node.metric("courier_cluster_shards_owned").await;
            assert_eq!(node.metric("courier_cluster_etcd_up").await, 1);
        }
        assert_eq!(
            (controllers, owned),
            (1, 256),
            "one controller; every shard owned once"
        );

        // SIGKILL the controller.
        let dead = ids.iter().position(|id| *id == controller).unwrap();
        let dead_shards = node_entry(&first, &controller)["shards"].as_u64().unwrap();
        nodes[dead].kill();
        let survivor_at = (dead + 1) % 3;
        let survivor = &nodes[survivor_at];
        let after = wait_status(survivor, "a new controller and the dead node lost", |s| {
            s["controller"].as_str().is_some_and(|c| c != controller)
                && node_entry(s, &controller)["state"] == "lost"
        })
        .await;
        assert_eq!(
            node_entry(&after, &controller)["shards"].as_u64().unwrap(),
            dead_shards,
            "nobody takes a lost node's shards without replication"
        );
        assert_eq!(after["shards_unavailable"].as_u64().unwrap(), dead_shards);
        wait_status(survivor, "the link to the dead node down", |s| {
            link_state(s, &controller) == "down"
        })
        .await;
        let unavailable_map = shards(survivor).await;
        for (before, now) in map.iter().zip(&unavailable_map) {
            assert_eq!(before["owner"], now["owner"]);
            assert_eq!(
                before["epoch"], now["epoch"],
                "no ownership change, no new epoch"
            );
            assert_eq!(now["available"], now["owner"] != controller.as_str());
        }
        assert_eq!(
            survivor.metric("courier_cluster_shards_unavailable").await,
            dead_shards
        );

        // It comes back on its own disk and serves its shards again.
        nodes[dead].restart();
        let back = wait_status(&nodes[dead], "the node back and serving", |s| {
            all_serving(s, &ids) && s["shards_unavailable"] == 0
        })
        .await;
        assert_eq!(
            node_entry(&back, &controller)["shards"].as_u64().unwrap(),
            dead_shards
        );
        assert_eq!(shards(&nodes[dead]).await, map, "same owners, same epochs");
        wait_status(
            &nodes[survivor_at],
            "the link to the returned node up again",
            |s| link_state(s, &controller) == "up",
        )
        .await;
    }

    /// A node sends its etcd requests to one member at a time and moves to
    /// the next when one fails: listed first, a member that is down (here
    /// nothing listens on its port) does not keep it from registering,
    /// creating the map and serving it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dead_etcd_member_listed_first_does_not_keep_a_node_from_its_map() {
        let Some(etcd) = Etcd::start() else { return };
        let endpoints = format!("http://127.0.0.1:1,{}", etcd.url());
        let extra = [
            ("COURIER_CLUSTER_INITIAL_NODES", "1"),
            ("COURIER_CLUSTER_ETCD", endpoints.as_str()),
        ];
        let node = start_node("aspen", "a1", &etcd, &extra);
        let s = wait_status(
            &node,
            "a1 serving a map read through the second member",
            |s| all_serving(s, &["a1"]) && s["etcd"] == "up",
        )
        .await;
        assert_eq!(s["shards_unavailable"], 0, "{s:#}");
        assert_eq!(shards_of(&s, "a1"), s["shards"].as_u64().unwrap(), "{s:#}");
    }

    /// etcd dies: the nodes keep serving clients with the map they have and
    /// say so; etcd comes back on its data: they read and register again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn nodes_keep_serving_their_map_while_etcd_is_down() {
        let Some(mut etcd) = Etcd::start() else {
            return;
        };
        let extra = [("COURIER_CLUSTER_INITIAL_NODES", "2")];
        let a = start_node("green", "a", &etcd, &extra);
        let b = start_node("green", "b", &etcd, &extra);
        wait_status(&a, "the map", |s| all_serving(s, &["a", "b"])).await;
        let map = shards(&a).await;

        etcd.kill();
        let down = wait_status(&a, "etcd seen unreachable", |s| s["etcd"] != "up").await;
        assert_eq!(down["map"], "complete", "the map is kept");
        assert_eq!(shards(&a).await, map);
        assert_eq!(a.metric("courier_cluster_etcd_up").await, 0);
        // Clients are served meanwhile.
        let (alice, _) = a.client(11).await;
        let (bob, _) = a.client(12).await;
        exchange(&alice, 12, &bob, "while etcd is down").await;

        etcd.run();
        for node in [&a, &b] {
            wait_status(node, "etcd back, both registered", |s| {
                s["etcd"] == "up" && all_serving(s, &["a", "b"])
            })
            .await;
            assert_eq!(shards(node).await, map, "nothing moved meanwhile");
        }
    }

    /// Links authenticate: a node that does not hold the cluster secret
    /// gets no link to the others (they say why in their logs), while the
    /// ones that do are linked.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_node_without_the_cluster_secret_gets_no_link() {
        let Some(etcd) = Etcd::start() else { return };
        let a = start_node("teal", "a", &etcd, &[]);
        let b = start_node("teal", "b", &etcd, &[]);
        let wrong = tempfile::tempdir().unwrap();
        let wrong_key = wrong.path().join("other.key");
        courier_broker::auth::load_or_create_secret(&wrong_key).unwrap();
        let wrong_key = wrong_key.display().to_string();
        let c = start_node(
            "teal",
            "c",
            &etcd,
            &[("COURIER_CLUSTER_SECRET_FILE", wrong_key.as_str())],
        );
        wait_status(&a, "a linked to b", |s| link_state(s, "b") == "up").await;
        // Give c's links time to be tried (probes run every second).
        tokio::time::sleep(Duration::from_secs(3)).await;
        for (node, me) in [(&a, "a"), (&b, "b")] {
            let s = status(node).await;
            assert_eq!(link_state(&s, "c"), "down", "{me}: {s:#}");
        }
        let s = status(&c).await;
        assert_eq!(
            (link_state(&s, "a"), link_state(&s, "b")),
            ("down".into(), "down".into())
        );
        assert!(
            !a.logged_soon("cluster secret").is_empty()
                || !c.logged_soon("cluster secret").is_empty(),
            "the refusal is logged with its reason"
        );
    }

    /// What `courier serve` printed on stderr before it exited (it must exit
    /// within the bound).
    fn refused(dir: &Path, env: &[(String, String)]) -> String {
        let mut child = serve_command(dir)
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("COURIER_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                assert!(!status.success());
                let mut err = String::new();
                child
                    .stderr
                    .take()
                    .unwrap()
                    .read_to_string(&mut err)
                    .unwrap();
                return err;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("courier serve kept running where it should have refused to start");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A data dir serves one node of one cluster; a live node's id cannot be
    /// taken by another process; a single node's store does not join.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn data_dirs_and_node_ids_stay_with_their_node() {
        let Some(etcd) = Etcd::start() else { return };
        let mut n1 = start_node("red", "n1", &etcd, &[]);
        wait_status(&n1, "the map", |s| all_serving(s, &["n1"])).await;

        let elsewhere = tempfile::tempdir().unwrap();
        let err = refused(elsewhere.path(), &cluster_env("red", "n1", &etcd, &[]));
        assert!(err.contains("two nodes cannot share an id"), "{err}");

        n1.kill();
        let dir = n1.data_dir.clone();
        let err = refused(&dir, &cluster_env("black", "n1", &etcd, &[]));
        assert!(
            err.contains("not node \"n1\" of cluster \"black\""),
            "{err}"
        );
        let err = refused(&dir, &[]);
        assert!(
            err.contains("start it with --cluster red --node-id n1"),
            "{err}"
        );

        // Sessions are forwarded between nodes in plain TCP: a cluster node
        // with a TLS-only client port is refused, saying why.
        let tls_dir = tempfile::tempdir().unwrap();
        let tls = [("COURIER_TLS_CERT_FILE", "/nonexistent/fullchain.pem")];
        let err = refused(tls_dir.path(), &cluster_env("red", "n8", &etcd, &tls));
        assert!(
            err.contains("tls.cert_file cannot be used with a cluster yet"),
            "{err}"
        );

        let single_dir = tempfile::tempdir().unwrap();
        drop(Server::start_in(single_dir.path(), &[]));
        let err = refused(single_dir.path(), &cluster_env("red", "n9", &etcd, &[]));
        assert!(err.contains("holds a single node's store"), "{err}");

        // The original still restarts as itself (waiting out its old lease).
        n1.restart();
        wait_status(&n1, "n1 back", |s| all_serving(s, &["n1"])).await;
    }

    /// Shards move with their data. Under one-to-one and group load (users
    /// spread over the nodes, groups of 8 whose members and groups live on
    /// different nodes, every user reconnecting and resuming when its
    /// session ends, as a phone does), a fourth node joins three and takes
    /// its share, a few shards at a time; then a node is drained and gives
    /// all its shards away. The load generator's checker finds every
    /// acknowledged message delivered once and in its conversation's or
    /// group's order, and every receipt once, through both; each move
    /// paused its shard's writes for a last round (counted at the new
    /// owner). The drained node then leaves with no shard left unavailable.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn shards_move_to_a_joining_node_and_off_a_drained_one_under_load() {
        let Some(etcd) = Etcd::start() else { return };
        // 16 shards: the join moves 4 of them, the drain 4 more.
        let extra = [("COURIER_CLUSTER_SHARDS", "16")];
        let ids = ["m1", "m2", "m3"];
        let mut nodes = three_linked_with("cedar", ids, &etcd, &extra).await;
        let load = load_in_background(moving_load(&nodes, 5000, Duration::from_secs(24)));
        tokio::time::sleep(Duration::from_secs(2)).await;

        let m4 = start_node("cedar", "m4", &etcd, &extra);
        let joined = wait_status(&nodes[0], "m4 took its share", |s| {
            shards_of(s, "m4") == 4 && no_moves(s)
        })
        .await;
        for id in ids {
            assert_eq!(shards_of(&joined, id), 4, "{id}: {joined:#}");
        }
        let (code, body) = nodes[2].admin_post("/admin/cluster/drain/m2").await;
        assert_eq!(code, 202, "{body}");
        let drained = wait_status(&nodes[0], "m2 gave its shards away", |s| {
            shards_of(s, "m2") == 0 && no_moves(s)
        })
        .await;
        assert_eq!(node_entry(&drained, "m2")["drained"], true);
        let (code, body) = nodes[0].admin_post("/admin/cluster/rebalance").await;
        assert_eq!(code, 202, "{body}");
        let planned: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(planned["planned_moves"], 0, "balanced: {body}");
        let (code, body) = nodes[0].admin_post("/admin/cluster/drain/m9").await;
        assert_eq!(code, 409, "an unknown node: {body}");
        let refused: Value = serde_json::from_str(&body).unwrap();
        assert!(
            refused["error"]
                .as_str()
                .unwrap()
                .contains("no node \"m9\""),
            "{body}"
        );
        let pauses = m4.metric("courier_cluster_move_pause_seconds_count").await;
        assert!(pauses >= 4, "m4 took four shards: {pauses} pauses");
        // Every old owner counted the pause it made, up to the switch (as
        // its own view shows the switch: it may read it after m1 did).
        let deadline = Instant::now() + WAIT;
        loop {
            let mut paused = 0;
            for n in &nodes {
                paused += n
                    .metric("courier_cluster_move_paused_writes_seconds_count")
                    .await;
            }
            if paused >= 8 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "8 moves paused their old owners' writes: {paused}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }

        let report = load
            .join()
            .expect("the load's thread")
            .expect("the load ran");
        assert_load_held("shards moved", &report);

        // The drained node leaves: nothing it held is missing.
        nodes[1].terminate();
        let after = wait_status(&nodes[0], "m2 gone", |s| {
            s["nodes"]
                .as_array()
                .unwrap()
                .iter()
                .all(|n| n["id"] != "m2")
        })
        .await;
        assert_eq!(after["shards_unavailable"], 0, "{after:#}");
        drop(m4);
    }
}

/// Replicated shards (factor 3) on three nodes of one host.
mod replication {
    use super::*;

    /// Every shard's in-sync set, from `node`'s map: (owner, isr size).
    async fn in_sync(node: &Server) -> Vec<(String, usize)> {
        shards(node)
            .await
            .iter()
            .map(|s| {
                (
                    s["owner"].as_str().unwrap_or("").to_owned(),
                    s["isr"].as_array().map_or(0, Vec::len),
                )
            })
            .collect()
    }

    /// Waits (bounded) until every shard's three copies are in sync, as
    /// `node` reads the map.
    async fn all_in_sync(node: &Server, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let isr = in_sync(node).await;
            if isr.iter().all(|(_, n)| *n == 3) {
                return;
            }
            assert!(Instant::now() < deadline, "{what}: {isr:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Each node's digest of each shard it holds: shard -> [(node, role,
    /// digest)].
    async fn digests(
        nodes: &[&Server],
    ) -> std::collections::BTreeMap<u64, Vec<(String, String, String)>> {
        let mut out: std::collections::BTreeMap<u64, Vec<_>> = Default::default();
        for n in nodes {
            let (code, body) = n.admin_request("/admin/cluster/digests").await;
            assert_eq!(code, 200, "{body}");
            let v: Value = serde_json::from_str(&body).unwrap();
            for s in v["shards"].as_array().unwrap() {
                out.entry(s["shard"].as_u64().unwrap()).or_default().push((
                    v["node"].as_str().unwrap().to_owned(),
                    s["role"].as_str().unwrap().to_owned(),
                    format!("{} {}", s["entries"], s["digest"]),
                ));
            }
        }
        out
    }

    /// Waits (bounded) until all three copies of every shard digest the
    /// same, one primary and two backups.
    async fn copies_agree(nodes: &[&Server], what: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let d = digests(nodes).await;
            let agree = d.len() == 16
                && d.values().all(|copies| {
                    copies.len() == 3
                        && copies.iter().filter(|c| c.1 == "primary").count() == 1
                        && copies.iter().all(|c| c.2 == copies[0].2)
                });
            if agree {
                return;
            }
            assert!(Instant::now() < deadline, "{what}: {d:#?}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// With every shard on three nodes, under one-to-one and group load
    /// (users reconnecting and resuming as phones do): a node is SIGKILLed
    /// and its shards are promoted to in-sync copies within the lease, no
    /// shard left unavailable; it comes back on its disk and copies its
    /// shards again (it may hold writes nobody acknowledged) until all are
    /// in sync; another node loses its disk and rebuilds every copy from
    /// the others. The load generator's checker finds every acknowledged
    /// message delivered once and in order through both, and the three
    /// copies of each shard end identical (a digest per shard).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_killed_primary_fails_over_and_lost_copies_rebuild_under_load() {
        let Some(etcd) = Etcd::start() else { return };
        let extra = [
            ("COURIER_CLUSTER_SHARDS", "16"),
            ("COURIER_CLUSTER_REPLICATION_FACTOR", "3"),
        ];
        let ids = ["r1", "r2", "r3"];
        let mut nodes = three_linked_with("rowan", ids, &etcd, &extra).await;
        all_in_sync(&nodes[1], "three copies of every shard in sync").await;
        let owners = in_sync(&nodes[1]).await;
        let led_by_r1 = owners.iter().filter(|(o, _)| o == "r1").count();
        assert!(led_by_r1 >= 4, "r1 leads its share: {owners:?}");

        // The load goes through r2 and r3 only: r1 is killed under it.
        let addrs: Vec<String> = nodes[1..].iter().map(|n| n.addr.clone()).collect();
        let opts = courier_loadtest::Options {
            addr: addrs.join(","),
            scenario: courier_loadtest::Scenario::Mixed,
            group_sizes: vec![(8, 1)],
            users: 32,
            first_user: 7000,
            duration: Duration::from_secs(24),
            rate: Some(150.0),
            window: 4,
            resilient: true,
            ..nodes[1].load_options()
        };
        let load = load_in_background(opts);
        tokio::time::sleep(Duration::from_secs(3)).await;

        nodes[0].kill();
        let killed = Instant::now();
        let after = wait_status(&nodes[1], "r1's shards promoted", |s| {
            shards_of(s, "r1") == 0 && s["shards_unavailable"] == 0
        })
        .await;
        println!(
            "failover: r1's {led_by_r1} shards promoted {} ms after the kill",
            killed.elapsed().as_millis()
        );
        assert_eq!(shards_of(&after, "r2") + shards_of(&after, "r3"), 16);
        let failovers = nodes[1].metric("courier_replication_failovers_total").await
            + nodes[2].metric("courier_replication_failovers_total").await;
        assert_eq!(failovers as usize, led_by_r1, "one promotion per shard");

        // Back on its disk: it copies every shard again, and joins.
        nodes[0].restart();
        all_in_sync(&nodes[1], "r1 back in every in-sync set").await;

        // r3 loses its disk: back empty, it rebuilds from the others.
        nodes[2].kill();
        wait_status(&nodes[1], "r3's shards promoted", |s| {
            shards_of(s, "r3") == 0 && s["shards_unavailable"] == 0
        })
        .await;
        std::fs::remove_dir_all(&nodes[2].data_dir).unwrap();
        nodes[2].restart();
        all_in_sync(&nodes[1], "r3 rebuilt every copy").await;

        let report = load
            .join()
            .expect("the load's thread")
            .expect("the load ran");
        assert_load_held("replicated shards, killed and rebuilt", &report);
        let all: Vec<&Server> = nodes.iter().collect();
        copies_agree(&all, "the copies of every shard agree").await;
        let rebuilds = nodes[2].metric("courier_replication_rebuilds_total").await;
        assert!(rebuilds >= 16, "r3 copied every shard: {rebuilds}");
    }
    /// Three nodes with every shard on all three, in sync; a business led
    /// by the first and a customer led by the second.
    async fn business_on_three(name: &str, ids: [&str; 3], etcd: &Etcd) -> (Vec<Server>, u64, u64) {
        let extra = [
            ("COURIER_CLUSTER_SHARDS", "16"),
            ("COURIER_CLUSTER_REPLICATION_FACTOR", "3"),
        ];
        let nodes = three_linked_with(name, ids, etcd, &extra).await;
        all_in_sync(&nodes[1], "three copies of every shard in sync").await;
        let map = shards(&nodes[1]).await;
        let b = user_on(&map, ids[0], 600);
        let customer = user_on(&map, ids[1], 600);
        (nodes, b, customer)
    }

    /// SIGKILLs `nodes[0]` (`id`, the business's) and waits until its
    /// shards are promoted on the others: the other nodes lead all 16 (a
    /// status that lists no shards at all does not pass).
    async fn kill_the_business_node(nodes: &mut [Server], id: &str) {
        nodes[0].kill();
        wait_status(&nodes[1], &format!("{id}'s shards promoted"), |s| {
            shards_of(s, id) == 0 && shards_led(s) == 16 && s["shards_unavailable"] == 0
        })
        .await;
    }

    /// `user`'s session on `node` after a failover, connecting again as a
    /// client does while the node answers `SHARD_UNAVAILABLE` with a retry
    /// time (its view may not show the promotion yet), for 15 s at most.
    async fn client_after_failover(node: &Server, user: u64) -> courier_client::Client {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            match courier_client::Client::connect(node.config(user)).await {
                Ok((c, _)) => return c,
                Err(courier_client::ClientError::Refused(code, why))
                    if code == courier_protocol::ErrorCode::SHARD_UNAVAILABLE
                        && Instant::now() < deadline =>
                {
                    tokio::time::sleep(courier_client::retry_delay(&why)).await;
                }
                Err(e) => panic!("connect after the failover: {e:?}"),
            }
        }
    }

    /// A business's erasure of a customer's messages is on every in-sync
    /// copy of the business's shard before the admin API answers: the
    /// copy promoted once the business's node is SIGKILLed serves them
    /// erased, and the three copies agreed before the kill.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_business_erasure_is_on_every_copy_before_it_is_answered() {
        use courier_protocol::{Destination, MessageKind};
        let Some(etcd) = Etcd::start() else { return };
        let (mut nodes, b, customer) = business_on_three("elder", ["e1", "e2", "e3"], &etcd).await;
        let path = format!("/admin/businesses/{b}");
        let (status, answer) = nodes[0]
            .admin_json("PUT", &path, serde_json::json!({ "display_name": "Shop" }))
            .await;
        assert_eq!(status, 200, "{answer}");
        let (c, _) = nodes[2].client(customer).await;
        for text in ["my address is 1 Main St", "call me on 555 0100"] {
            c.send(Destination::User(b), MessageKind::Chat, chat(text))
                .await
                .unwrap();
        }
        let (status, erased) = nodes[0]
            .admin_json("POST", &format!("{path}/erase/{customer}"), Value::Null)
            .await;
        assert_eq!(status, 200, "{erased}");
        assert_eq!(erased["messages_erased"], 2, "{erased}");
        let all: Vec<&Server> = nodes.iter().collect();
        copies_agree(&all, "the copies agree after the erasure").await;

        kill_the_business_node(&mut nodes, "e1").await;
        let business = client_after_failover(&nodes[1], b).await;
        let read = business.fetch(0, 10).await.unwrap().messages;
        let seen: Vec<_> = read
            .iter()
            .map(|m| (m.seq, m.sender, m.kind, m.payload.len()))
            .collect();
        assert_eq!(
            seen,
            [
                (1, customer, MessageKind::Erased, 0),
                (2, customer, MessageKind::Erased, 0)
            ]
        );
    }

    /// A business's events are state of its shard: after its node is
    /// SIGKILLed, the promoted copy has every event told so far, goes on
    /// with the same sequence, and posts to the webhook from there.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_business_keeps_its_events_and_webhook_across_a_failover() {
        use common::hook::Hook;
        use courier_protocol::business::TemplateSend;
        use serde_json::json;
        let Some(etcd) = Etcd::start() else { return };
        let (mut nodes, b, customer) = business_on_three("fir", ["f1", "f2", "f3"], &etcd).await;
        let path = format!("/admin/businesses/{b}");
        let (hook, url) = Hook::start(false).await;
        let secret = "whsec_cluster-secret-0001";
        let def = json!({ "category": "utility", "versions": [{ "language": "en_US", "body": "Notice", "examples": {} }] });
        for (method, at, body) in [
            ("PUT", path.clone(), json!({ "display_name": "Shop" })),
            ("PUT", format!("{path}/templates/notice"), def),
            (
                "POST",
                format!("{path}/templates/notice/status"),
                json!({ "status": "approved" }),
            ),
            (
                "POST",
                format!("{path}/consent"),
                json!({ "customer": customer, "action": "opt_in", "purpose": "utility", "source": "web_form", "text": "Notices, please" }),
            ),
            (
                "PUT",
                format!("{path}/webhook"),
                json!({ "url": url, "secret": secret }),
            ),
        ] {
            let (status, answer) = nodes[0].admin_json(method, &at, body).await;
            assert_eq!(status, 200, "{at}: {answer}");
        }
        let notice = TemplateSend {
            name: "notice".into(),
            language: String::new(),
            params: Vec::new(),
        };
        let (c, _) = nodes[2].client(customer).await;
        let (business, _) = nodes[1].client(b).await;
        business.send_template(1, customer, &notice).await.unwrap();
        let m = c.recv_timeout(WAIT).await.unwrap();
        c.mark_read(m.seq).await.unwrap();
        let changes = |taken: &[Value], id: u64| -> Vec<String> {
            taken
                .iter()
                .filter(|e| e["message"] == id)
                .map(|e| e["change"].as_str().unwrap().to_owned())
                .collect()
        };
        hook.wait_until(secret, |t| changes(t, 1).iter().any(|c| c == "read"))
            .await;
        let all: Vec<&Server> = nodes.iter().collect();
        copies_agree(&all, "the copies agree on the events").await;

        kill_the_business_node(&mut nodes, "f1").await;
        let business = client_after_failover(&nodes[1], b).await;
        business.send_template(2, customer, &notice).await.unwrap();
        let taken = hook
            .wait_until(secret, |t| changes(t, 2).iter().any(|c| c == "sent"))
            .await;
        assert_eq!(changes(&taken, 2), ["accepted", "sent"]);
        let (last, json) = business.events(0, 100).await.unwrap();
        let events: Vec<Value> = serde_json::from_str(&json).unwrap();
        let seqs: Vec<u64> = events.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
        assert_eq!(
            seqs,
            (1..=last).collect::<Vec<_>>(),
            "one sequence across the failover"
        );
        assert_eq!(
            changes(&events, 1),
            ["accepted", "sent", "delivered", "read"]
        );
        assert_eq!(changes(&events, 2), ["accepted", "sent"]);
    }

    /// A campaign runs on its business's shard and is state of it: a
    /// two-variant campaign to 200 customers spread over three nodes goes
    /// on after SIGKILL of the business's node, on the promoted copy, from
    /// what was written. Every customer gets exactly one message, of the
    /// variant the seeded split gives it, and is counted once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_campaign_goes_on_after_its_business_node_is_killed() {
        use courier_protocol::business::TemplateMessage;
        use serde_json::json;
        let Some(etcd) = Etcd::start() else { return };
        let (mut nodes, b, _) = business_on_three("cedar", ["d1", "d2", "d3"], &etcd).await;
        let path = format!("/admin/businesses/{b}");
        let customers: Vec<u64> = (0..200).map(|i| 51_000 + i * 7).collect();
        nodes[0]
            .utility_business(
                b,
                &[("notice", "Notice"), ("notice_b", "Notice, again")],
                &customers,
            )
            .await;
        let (status, answer) = nodes[0]
            .admin_json(
                "POST",
                &format!("{path}/limits"),
                json!({ "tier": 4, "messages_per_sec": 40 }),
            )
            .await;
        assert_eq!(status, 200, "{answer}");
        let (status, created) = nodes[0]
            .admin_json(
                "POST",
                &format!("{path}/campaigns"),
                json!({
                    "name": "Notice to all",
                    "seed": 7,
                    "variants": [
                        { "name": "a", "template": "notice", "weight": 3 },
                        { "name": "b", "template": "notice_b", "weight": 1 }
                    ],
                    "segment": { "customers": customers },
                }),
            )
            .await;
        assert_eq!(status, 200, "{created}");
        let id = created["id"].as_u64().unwrap();
        let report = format!("{path}/campaigns/{id}");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (_, v) = nodes[0].admin_json("GET", &report, Value::Null).await;
            if v["processed"].as_u64().unwrap_or(0) >= 90 {
                assert!(v["processed"].as_u64().unwrap() < 200, "mid-campaign: {v}");
                break;
            }
            assert!(Instant::now() < deadline, "{v}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        kill_the_business_node(&mut nodes, "d1").await;
        let deadline = Instant::now() + Duration::from_secs(60);
        let done = 'done: loop {
            for n in [1, 2] {
                let (status, v) = nodes[n].admin_json("GET", &report, Value::Null).await;
                if status == 200 && v["state"] == "done" {
                    break 'done v;
                }
            }
            assert!(Instant::now() < deadline, "the campaign did not finish");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert_eq!(done["processed"], 200, "{done}");
        let resent = nodes[1]
            .metric("courier_campaign_customers_total{outcome=\"resent\"}")
            .await
            + nodes[2]
                .metric("courier_campaign_customers_total{outcome=\"resent\"}")
                .await;
        println!("campaign failover: {resent} sends repeated by the new owner");
        let variants = done["variants"].as_array().unwrap();
        let split = |c: u64| courier_broker::state::campaigns::pick(7, c, &[3, 1]);
        for (v, row) in variants.iter().enumerate() {
            let mine = customers.iter().filter(|&&c| split(c) == v).count() as u64;
            assert_eq!(row["targeted"], mine, "{row}");
            assert_eq!(row["sent"], mine, "{row}");
            assert_eq!(row["refused"], json!({}), "{row}");
        }
        for (i, &c) in customers.iter().enumerate() {
            let (client, _) = nodes[1 + i % 2].client(c).await;
            let got = client.fetch(0, 10).await.unwrap().messages;
            assert_eq!(got.len(), 1, "customer {c}: one message, whatever the kill");
            let t = TemplateMessage::decode(&got[0].payload).unwrap();
            assert_eq!(t.name, ["notice", "notice_b"][split(c)]);
        }
    }

    /// How many shards `id` holds a copy of, by a node's status.
    fn copies_of(s: &Value, id: &str) -> u64 {
        s["nodes"]
            .as_array()
            .and_then(|n| n.iter().find(|n| n["id"] == id))
            .and_then(|n| n["copies"].as_u64())
            .unwrap_or(0)
    }

    /// With every shard on three nodes of four, copies move the way the
    /// issue asks: add a copy, let it catch up and join the in-sync set,
    /// switch if the leaving copy is the primary, remove the old. Under
    /// one-to-one and group load, a fourth node joins three and takes its
    /// share of copies without a primary moving; then a node is drained:
    /// each copy it held is added on another node first, each shard it led
    /// switches to an in-sync copy, and it ends holding nothing, so it can
    /// leave with every shard still on three nodes. The checker finds every
    /// acknowledged message delivered once and in order through both, and
    /// the three copies of each shard end identical.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn copies_move_to_a_joining_node_and_off_a_drained_one_under_load() {
        let Some(etcd) = Etcd::start() else { return };
        let extra = [
            ("COURIER_CLUSTER_SHARDS", "16"),
            ("COURIER_CLUSTER_REPLICATION_FACTOR", "3"),
        ];
        let ids = ["c1", "c2", "c3"];
        let mut nodes = three_linked_with("larch", ids, &etcd, &extra).await;
        all_in_sync(&nodes[0], "three copies of every shard in sync").await;
        let load = load_in_background(moving_load(&nodes, 9000, Duration::from_secs(30)));
        tokio::time::sleep(Duration::from_secs(2)).await;

        let before: Vec<(String, usize)> = in_sync(&nodes[0]).await;
        let joining = Instant::now();
        let c4 = start_node("larch", "c4", &etcd, &extra);
        // A copy at a time per shard, two shards at once.
        let moving = Duration::from_secs(90);
        let joined = wait_status_for(&nodes[0], "c4 took its share of copies", moving, |s| {
            copies_of(s, "c4") == 12 && no_moves(s)
        })
        .await;
        for id in ids {
            assert_eq!(copies_of(&joined, id), 12, "{id}: {joined:#}");
        }
        println!(
            "join: c4 took 12 copies in {} ms",
            joining.elapsed().as_millis()
        );
        // A primary moves only when its node is over its share of copies
        // and holds no other copy that can go (a switch costs the shard's
        // other copies a whole copy): few, if any.
        let after_join = in_sync(&nodes[0]).await;
        let switched = before
            .iter()
            .zip(&after_join)
            .filter(|(b, a)| b.0 != a.0)
            .count();
        println!("join: {switched} primaries switched on the way");
        all_in_sync(
            &nodes[0],
            "every shard's three copies in sync after the join",
        )
        .await;

        let led_by_c2 = shards_of(&joined, "c2");
        let draining = Instant::now();
        let (code, body) = nodes[2].admin_post("/admin/cluster/drain/c2").await;
        assert_eq!(code, 202, "{body}");
        let drained = wait_status_for(&nodes[0], "c2 gave every copy away", moving, |s| {
            copies_of(s, "c2") == 0 && shards_of(s, "c2") == 0 && no_moves(s)
        })
        .await;
        println!(
            "drain: c2 gave away 12 copies, {led_by_c2} of them primaries, in {} ms",
            draining.elapsed().as_millis()
        );
        for id in ["c1", "c3", "c4"] {
            assert_eq!(copies_of(&drained, id), 16, "{id}: {drained:#}");
        }
        all_in_sync(
            &nodes[0],
            "every shard's three copies in sync after the drain",
        )
        .await;

        let report = load
            .join()
            .expect("the load's thread")
            .expect("the load ran");
        assert_load_held("copies moved", &report);

        let (mut adds, mut leads, mut drops) = (0, 0, 0);
        for n in nodes.iter().chain(std::iter::once(&c4)) {
            for (change, sum) in [
                ("add", &mut adds),
                ("lead", &mut leads),
                ("drop", &mut drops),
            ] {
                let name = format!("courier_replication_copy_changes_total{{change=\"{change}\"}}");
                *sum += n.metric(&name).await;
            }
        }
        // 12 copies in and 12 out, twice, at the least; the planner is
        // greedy, so a copy may move once more than it must.
        assert_eq!(adds, drops, "every copy added replaced one");
        assert!(
            (24..=28).contains(&adds),
            "12 copies in, 12 out, twice: {adds}"
        );
        assert!(
            leads >= led_by_c2,
            "a switch for each shard c2 led: {leads}"
        );

        // The drained node leaves; every shard still has three copies.
        nodes[1].terminate();
        let after = wait_status(&nodes[0], "c2 gone", |s| {
            s["nodes"]
                .as_array()
                .unwrap()
                .iter()
                .all(|n| n["id"] != "c2")
        })
        .await;
        assert_eq!(after["shards_unavailable"], 0, "{after:#}");
        assert_eq!(after["shards_under_replicated"], 0, "{after:#}");
        copies_agree(
            &[&nodes[0], &nodes[2], &c4],
            "the copies of every shard agree",
        )
        .await;
    }
}

/// The first user id (from `from` on) whose shard `owner` owns in `map`.
fn user_on(map: &[Value], owner: &str, from: u64) -> u64 {
    (from..)
        .find(|&u| {
            let shard =
                courier_storage::shard_of_slot(courier_storage::slot_of(u), map.len() as u32);
            map[shard as usize]["owner"] == owner
        })
        .unwrap()
}

/// The data plane across nodes: it crosses the network path (forwarded
/// sessions), so it runs in both passes of `scripts/test`.
mod data_plane {
    use super::*;
    use courier_client::ClientError;
    use courier_protocol::error::retry_after_ms;
    use courier_protocol::{
        Destination, ErrorCode, GroupOp, MessageKind, ReceiptPayload, ReceiptStatus, Send, Strategy,
    };
    use std::time::Instant;

    /// The next receipt message `client` receives: (reader, status, client
    /// message id) for each message it covers.
    async fn receipts(client: &courier_client::Client) -> Vec<(u64, u8, u64)> {
        let d = client.next_timeout(WAIT).await.expect("a receipt");
        assert_eq!(d.message.kind, MessageKind::Receipt);
        let r = ReceiptPayload::decode(&d.message.payload).unwrap();
        r.messages
            .into_iter()
            .map(|(id, _)| (r.reader, r.status as u8, id))
            .collect()
    }

    /// The group messages `client` receives within `quiet` of each other
    /// (after the first, which must come): (sender, client message id).
    async fn group_messages(client: &courier_client::Client, g: u64) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let mut wait = WAIT;
        while let Ok(d) = client.next_timeout(wait).await {
            wait = Duration::from_millis(700);
            if d.message.destination == Destination::Group(g) && d.message.kind == MessageKind::Chat
            {
                out.push((d.message.sender, d.message.client_msg_id));
            }
            client.confirm(&d).await.unwrap();
        }
        out
    }

    /// A group whose members are on all three nodes, each connected
    /// through another node than its own: members on any node send to it
    /// (the group's node sequences every message, one order for all),
    /// change it, and count its receipts; each member gets every message
    /// once, in the group's order, and an ack means durable in every
    /// member's inbox. With a member's node dead, a send is refused
    /// `SHARD_UNAVAILABLE` (its part there is not durable), and once the
    /// node is back the group's node completes the fan-out on its own: the
    /// member gets it once, and the sender's retry is a duplicate. Past
    /// the log threshold a group keeps references (copies for members
    /// elsewhere): in a cluster, where shards move, no group reads its log.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn groups_span_nodes_in_one_order_with_acks_receipts_and_changes() {
        let Some(etcd) = Etcd::start() else { return };
        let ids = ["g1", "g2", "g3"];
        let extra = [("COURIER_GROUPS_LOG_THRESHOLD", "3")];
        let mut nodes = three_linked_with("grape", ids, &etcd, &extra).await;
        let map = shards(&nodes[0]).await;
        let alice = user_on(&map, "g1", 100);
        let bob = user_on(&map, "g2", 100);
        let carol = user_on(&map, "g3", 100);
        let dave = user_on(&map, "g3", carol + 1);

        // Each through a node that is not its own.
        let a = std::sync::Arc::new(nodes[1].client(alice).await.0);
        let b = std::sync::Arc::new(nodes[2].client(bob).await.0);
        let c = std::sync::Arc::new(nodes[0].client(carol).await.0);
        let info = a.create_group(vec![bob, carol]).await.unwrap();
        let g = info.group;
        assert_eq!(info.members.len(), 3);
        for member in [&b, &c] {
            let event = member.next_timeout(WAIT).await.unwrap();
            assert_eq!(event.message.kind, MessageKind::System, "the creation");
            member.confirm(&event).await.unwrap();
        }

        // All three send at once, pipelined; the acks' group sequences are
        // the one order.
        let mut order = std::collections::HashMap::new();
        let senders = [(alice, &a), (bob, &b), (carol, &c)];
        let mut pending = Vec::new();
        for i in 0..30u64 {
            for (user, client) in senders {
                let ack = client
                    .start_send(10 + i, Destination::Group(g), MessageKind::Chat, chat("m"))
                    .unwrap();
                pending.push((user, 10 + i, ack));
            }
        }
        for (user, id, ack) in pending {
            let ack = tokio::time::timeout(WAIT, ack).await.unwrap().unwrap();
            order.insert((user, id), ack.seq);
        }
        for (user, client) in senders {
            let got = group_messages(client, g).await;
            assert_eq!(got.len(), 60, "the other two members' 60, once each");
            assert!(got.iter().all(|&(sender, _)| sender != user));
            let seqs: Vec<u64> = got.iter().map(|k| order[k]).collect();
            assert!(seqs.windows(2).all(|w| w[0] < w[1]), "the group's order");
        }

        // Receipts: Bob (g2) and Carol (g3) read Alice's message; she counts
        // them from her node, the group's.
        let ack = a
            .send_with_id(
                99,
                Destination::Group(g),
                MessageKind::Chat,
                chat("read me"),
            )
            .await
            .unwrap();
        for member in [&b, &c] {
            let got = member.next_timeout(WAIT).await.unwrap();
            assert_eq!(got.message.client_msg_id, 99);
            member.confirm(&got).await.unwrap();
            member.mark_read(got.message.seq).await.unwrap();
        }
        let deadline = Instant::now() + WAIT;
        loop {
            let counts = a.receipt_counts(g, ack.seq).await.unwrap();
            assert_eq!(counts.recipients, 2);
            if counts.read == 2 && counts.delivered == 2 {
                break;
            }
            assert!(Instant::now() < deadline, "read by both: {counts:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // Only the sender reads them, asked from another node too.
        assert_eq!(
            rejected(b.receipt_counts(g, ack.seq).await),
            ErrorCode::FORBIDDEN
        );

        // Changes from a member elsewhere: Alice makes Bob an admin, Bob
        // adds Dave (g3), and the group, now past the threshold of 3, keeps
        // references.
        a.group(GroupOp::Promote, g, vec![bob]).await.unwrap();
        let info = b.group(GroupOp::Add, g, vec![dave]).await.unwrap();
        assert_eq!(info.members.len(), 4);
        assert_eq!(info.strategy, Strategy::Refs, "members elsewhere: no log");
        let (d, _) = nodes[1].client(dave).await;
        let added = d.next_timeout(WAIT).await.unwrap();
        assert_eq!(
            (added.message.kind, added.message.destination),
            (MessageKind::System, Destination::Group(g))
        );
        d.confirm(&added).await.unwrap();
        for member in [&a, &b, &c] {
            let seen = group_events(member, g).await;
            assert!(seen >= 1, "every member hears of the change");
        }

        // Dave and Carol's node dies: a send is refused while their part
        // cannot be stored...
        let carol_seen = c.last_received_seq();
        nodes[2].kill();
        wait_status(&nodes[0], "g3's link down", |s| {
            link_state(s, "g3") == "down"
        })
        .await;
        let mut impatient = nodes[0].config(bob);
        impatient.unavailable_retry = Duration::ZERO;
        let (b2, _) = courier_client::Client::connect(impatient).await.unwrap();
        let refused = b2
            .send_with_id(200, Destination::Group(g), MessageKind::Chat, chat("later"))
            .await;
        assert_eq!(rejected(refused), ErrorCode::SHARD_UNAVAILABLE);
        // ...though Alice, whose part is durable, has it.
        let got = a.next_timeout(WAIT).await.unwrap();
        assert_eq!(got.message.client_msg_id, 200);
        // Alice's own send, on the group's node, has every recipient
        // elsewhere: refused too, not acknowledged before Carol's and
        // Dave's parts (Bob's are durable).
        let mut impatient = nodes[0].config(alice);
        impatient.unavailable_retry = Duration::ZERO;
        let (a2, _) = courier_client::Client::connect(impatient).await.unwrap();
        let refused = a2
            .send_with_id(
                201,
                Destination::Group(g),
                MessageKind::Chat,
                chat("all away"),
            )
            .await;
        assert_eq!(rejected(refused), ErrorCode::SHARD_UNAVAILABLE);
        // (Bob's session through g3 went with it; his other one has it.)
        let got = b2.next_timeout(WAIT).await.unwrap();
        assert_eq!(
            (got.message.sender, got.message.client_msg_id),
            (alice, 201)
        );
        // Back, Carol gets it without anyone's retry, once.
        nodes[2].restart();
        wait_status(&nodes[0], "g3 back and linked", |s| {
            all_serving(s, &ids) && link_state(s, "g3") == "up"
        })
        .await;
        let (c, _) = nodes[0].resume(carol, carol_seen).await;
        let got = group_messages(&c, g).await;
        assert_eq!(
            got,
            vec![(bob, 200), (alice, 201)],
            "completed by the group's node, in its order"
        );
        // Bob's retry of the same id (his session through g3 went with it)
        // is the original, stored nowhere twice.
        let (b, _) = nodes[1].client(bob).await;
        let again = b
            .send_with_id(200, Destination::Group(g), MessageKind::Chat, chat("later"))
            .await
            .unwrap();
        assert!(again.duplicate);
        assert!(c.next_timeout(Duration::from_millis(500)).await.is_err());
        assert!(a.next_timeout(Duration::from_millis(300)).await.is_err());

        // In a cluster shards move, so a group never reads its log there:
        // past the threshold, with every member on Alice's node, it keeps
        // references, and takes a member from elsewhere.
        let locals: Vec<u64> = (0..3).fold(Vec::new(), |mut v, _| {
            let from = v.last().map_or(alice + 1, |u| u + 1);
            v.push(user_on(&map, "g1", from));
            v
        });
        let big = a.create_group(locals).await.unwrap();
        assert_eq!(big.strategy, Strategy::Refs);
        let info = a.group(GroupOp::Add, big.group, vec![bob]).await.unwrap();
        assert_eq!(info.strategy, Strategy::Refs);
        drop(nodes);
    }

    /// The membership events `client` receives from group `g` until it is
    /// quiet, confirming them.
    async fn group_events(client: &courier_client::Client, g: u64) -> usize {
        let mut seen = 0;
        while let Ok(d) = client.next_timeout(Duration::from_secs(2)).await {
            if d.message.destination == Destination::Group(g) {
                assert_eq!(d.message.kind, MessageKind::System);
                seen += 1;
            }
            client.confirm(&d).await.unwrap();
        }
        seen
    }

    /// Three nodes, each user on the node that owns its shard, clients
    /// connected to other nodes than their users' (a gateway forwards them):
    /// a one-to-one message crosses from one owner to another and its
    /// delivered and read receipts come back, each once. The recipient's
    /// node is SIGKILLed: a send to it is refused with the retryable
    /// `SHARD_UNAVAILABLE` and a hint (a client that does not retry sees
    /// it), a connection for its user too; the client library's retry of
    /// the same id succeeds once the node is back, stored once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_to_one_crosses_nodes_from_any_gateway_and_waits_out_a_lost_owner() {
        let Some(etcd) = Etcd::start() else { return };
        let ids = ["p1", "p2", "p3"];
        let mut nodes = three_linked("plum", ids, &etcd).await;
        let map = shards(&nodes[0]).await;
        let alice = user_on(&map, "p1", 100);
        let bob = user_on(&map, "p3", 100);
        let carol = user_on(&map, "p2", 100);

        // Alice through p2, Bob through p1: neither on its own node.
        let (a, _) = nodes[1].client(alice).await;
        let (b, _) = nodes[0].client(bob).await;
        let ack = a
            .send_with_id(1, Destination::User(bob), MessageKind::Chat, chat("hi bob"))
            .await
            .unwrap();
        assert_eq!((ack.seq, ack.duplicate), (1, false));
        let got = b.next_timeout(WAIT).await.unwrap();
        assert_eq!(
            (got.message.sender, got.message.payload.clone()),
            (alice, chat("hi bob"))
        );
        b.confirm(&got).await.unwrap();
        b.mark_read(got.message.seq).await.unwrap();
        // The read receipt comes back (a delivered one too, unless the read
        // mark overtook it), each once.
        let mut seen = Vec::new();
        while !seen.contains(&(bob, ReceiptStatus::Read as u8, 1)) {
            seen.extend(receipts(&a).await);
        }
        assert!(a.next_timeout(Duration::from_millis(500)).await.is_err());
        let mut unique = seen.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), seen.len(), "no receipt twice: {seen:?}");
        assert!(nodes[1].metric("courier_cluster_forwarded_sessions").await >= 1);

        // Pipelined sends cross in the order they were sent.
        let pipe = std::sync::Arc::new(nodes[1].client(alice).await.0);
        let acks: Vec<_> = (1000..1200)
            .map(|id| {
                pipe.start_send(id, Destination::User(bob), MessageKind::Chat, chat("p"))
                    .unwrap()
            })
            .collect();
        for ack in acks {
            tokio::time::timeout(WAIT, ack).await.unwrap().unwrap();
        }
        for id in 1000..1200 {
            let got = b.next_timeout(WAIT).await.unwrap();
            assert_eq!(got.message.client_msg_id, id, "in the order sent");
        }
        drop(pipe);

        // Bob's node dies.
        nodes[2].kill();
        wait_status(&nodes[0], "p3's link down", |s| {
            link_state(s, "p3") == "down"
        })
        .await;
        let mut impatient = nodes[1].config(alice);
        impatient.unavailable_retry = Duration::ZERO;
        let (a2, _) = courier_client::Client::connect(impatient).await.unwrap();
        match a2
            .send_with_id(
                2,
                Destination::User(bob),
                MessageKind::Chat,
                chat("are you there"),
            )
            .await
        {
            Err(ClientError::Rejected(ErrorCode::SHARD_UNAVAILABLE, message)) => {
                assert!(
                    retry_after_ms(&message).is_some_and(|ms| ms > 0),
                    "{message}"
                )
            }
            other => panic!("expected SHARD_UNAVAILABLE, got {other:?}"),
        }
        // In a batch, the item says so, its hint in `timestamp_ms`.
        let items = a2
            .send_batch(vec![Send {
                client_msg_id: 3,
                destination: Destination::User(bob),
                kind: MessageKind::Chat,
                payload: chat("batched"),
            }])
            .await
            .unwrap();
        assert_eq!(items[0].code, ErrorCode::SHARD_UNAVAILABLE);
        assert!(items[0].timestamp_ms > 0, "the retry-after hint");
        // Refused where Alice's session lives: her node.
        let refused_sends = r#"courier_cluster_unavailable_total{what="send"}"#;
        assert!(nodes[0].metric(refused_sends).await >= 1);
        match courier_client::Client::connect(nodes[0].config(bob)).await {
            Err(ClientError::Refused(ErrorCode::SHARD_UNAVAILABLE, message)) => {
                assert!(retry_after_ms(&message).is_some(), "{message}")
            }
            other => panic!("expected a refused session, got {:?}", other.map(|_| ())),
        }

        // The patient client retries the same id until Bob's node is back.
        let retrying = {
            let a = std::sync::Arc::new(a);
            let a2 = a.clone();
            let task = tokio::spawn(async move {
                a2.send_with_id(
                    2,
                    Destination::User(bob),
                    MessageKind::Chat,
                    chat("are you there"),
                )
                .await
            });
            tokio::time::sleep(Duration::from_millis(1500)).await;
            assert!(!task.is_finished(), "nothing to store it in yet");
            (a, task)
        };
        nodes[2].restart();
        let ack = tokio::time::timeout(WAIT, retrying.1)
            .await
            .expect("the retry ends")
            .unwrap()
            .unwrap();
        assert_eq!(ack.seq, 202, "stored once, after the 201 before it");
        let (b, _) = nodes[1].resume(bob, 201).await;
        let got = b.next_timeout(WAIT).await.unwrap();
        assert_eq!((got.message.seq, got.message.client_msg_id), (202, 2));
        assert!(
            b.next_timeout(Duration::from_millis(300)).await.is_err(),
            "nothing twice"
        );

        // Carol, on the third node, reaches both through her own node.
        let (c, _) = nodes[1].client(carol).await;
        exchange(&c, alice, &retrying.0, "hello alice").await;
        exchange(&c, bob, &b, "hello bob").await;

        // Taking receipt facts (through another node's gateway), she is
        // told Bob's read across nodes: the receipt's covered sequence
        // crosses in the data plane's send.
        let mut config = nodes[0].config(carol);
        config.receipts_after = Some(0);
        let (cf, _) = courier_client::Client::connect(config).await.unwrap();
        let to_bob = cf
            .send_with_id(9, Destination::User(bob), MessageKind::Chat, chat("noted?"))
            .await
            .unwrap();
        assert_eq!(b.recv_timeout(WAIT).await.unwrap().seq, to_bob.seq);
        b.mark_read(to_bob.seq).await.unwrap();
        let deadline = tokio::time::Instant::now() + WAIT;
        while cf.receipt_fact(bob).is_none_or(|f| f.read < to_bob.seq) {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            cf.receipt_changes_timeout(left)
                .await
                .expect("bob's read, as a fact");
        }
        assert_eq!(cf.receipt_fact(bob).unwrap().delivered, to_bob.seq);
    }

    /// A client pipelines sends to a user whose node dies in the middle
    /// and comes back: the sends refused meanwhile (`SHARD_UNAVAILABLE`)
    /// are retried by the client library, each on its own timer, with
    /// their ids; the node holds a conversation's later sends until its
    /// oldest refused one is back, so the recipient gets every message
    /// once, in the order sent.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pipelined_sends_keep_their_order_through_the_recipients_node_dying() {
        use futures_util::stream::{FuturesOrdered, StreamExt};
        use std::task::Poll;
        const SENDS: u64 = 600;
        let Some(etcd) = Etcd::start() else { return };
        let ids = ["o1", "o2", "o3"];
        let mut nodes = three_linked("olive", ids, &etcd).await;
        let map = shards(&nodes[0]).await;
        let alice = user_on(&map, "o1", 100);
        let bob = user_on(&map, "o3", 100);
        let a = std::sync::Arc::new(nodes[0].client(alice).await.0);
        let acked = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let sender = {
            let acked = acked.clone();
            tokio::spawn(async move {
                let mut inflight = FuturesOrdered::new();
                let mut results = Vec::new();
                for id in 1..=SENDS {
                    let a = a.clone();
                    let acked = acked.clone();
                    inflight.push_back(async move {
                        let r = a
                            .send_with_id(id, Destination::User(bob), MessageKind::Chat, chat("o"))
                            .await;
                        acked.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        (id, r.map(|_| ()))
                    });
                    // Polled now, so each send leaves in the order made.
                    if let Poll::Ready(Some(done)) = futures_util::poll!(inflight.next()) {
                        results.push(done);
                    }
                    while inflight.len() >= 16 {
                        results.push(inflight.next().await.unwrap());
                    }
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                while let Some(done) = inflight.next().await {
                    results.push(done);
                }
                results
            })
        };
        // Bob's node dies with sends on their way, and stays away a while.
        let t = Instant::now();
        while acked.load(std::sync::atomic::Ordering::Relaxed) < 100 {
            assert!(t.elapsed() < WAIT, "the first sends were acknowledged");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        nodes[2].kill();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        nodes[2].restart();
        let results = tokio::time::timeout(Duration::from_secs(60), sender)
            .await
            .expect("every send ends")
            .unwrap();
        for (id, r) in &results {
            assert!(r.is_ok(), "send {id}: {r:?}");
        }
        let held = r#"courier_cluster_unavailable_total{what="held"}"#;
        let refused = r#"courier_cluster_unavailable_total{what="send"}"#;
        assert!(
            nodes[0].metric(refused).await >= 1,
            "some sends were refused while Bob's node was away"
        );
        let (b, _) = nodes[1].client(bob).await;
        for want in 1..=SENDS {
            let got = b.next_timeout(WAIT).await.expect("every message arrives");
            assert_eq!(
                got.message.client_msg_id,
                want,
                "in the order sent, each once ({} later sends held back)",
                nodes[0].metric(held).await
            );
        }
        assert!(
            b.next_timeout(Duration::from_millis(300)).await.is_err(),
            "nothing twice"
        );
    }

    /// A business's broadcast list holds customers on every node: each
    /// consenting customer gets the message once, wherever their inbox is
    /// (consent is read on the customer's own node), the one who has not
    /// consented is skipped, and a retry reaches nobody twice.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_broadcast_reaches_consenting_customers_on_every_node() {
        use courier_protocol::{ContactsOp, ListOp};
        let Some(etcd) = Etcd::start() else { return };
        let ids = ["b1", "b2", "b3"];
        let nodes = three_linked("birch", ids, &etcd).await;
        let map = shards(&nodes[0]).await;
        let shop = user_on(&map, "b1", 100);
        // Two customers on each node; the last one has not consented.
        let mut customers = Vec::new();
        for owner in ids {
            let first = user_on(&map, owner, 1000 + customers.len() as u64 * 1000);
            customers.push(first);
            customers.push(user_on(&map, owner, first + 1));
        }
        let mut clients = Vec::new();
        for (i, &c) in customers.iter().enumerate() {
            // Each through a gateway that is not necessarily its node.
            let (client, _) = nodes[i % 3].client(c).await;
            if i + 1 < customers.len() {
                client.contacts(ContactsOp::Add, vec![shop]).await.unwrap();
            }
            clients.push(client);
        }
        let (s, _) = nodes[2].client(shop).await;
        s.list(ListOp::Set, 7, customers.clone()).await.unwrap();
        let ack = s
            .broadcast_with_id(900, 7, MessageKind::Chat, chat("sale"))
            .await
            .unwrap();
        assert_eq!((ack.delivered, ack.skipped, ack.duplicate), (5, 1, false));
        for c in &clients[..5] {
            let m = c.recv_timeout(WAIT).await.expect("the broadcast arrives");
            assert_eq!(
                (m.sender, m.destination, m.client_msg_id, m.payload.clone()),
                (shop, Destination::List(7), 900, chat("sale"))
            );
        }
        let again = s
            .broadcast_with_id(900, 7, MessageKind::Chat, chat("sale"))
            .await
            .unwrap();
        assert_eq!(
            (again.delivered, again.skipped, again.duplicate),
            (5, 1, true)
        );
        for c in &clients {
            assert!(
                c.recv_timeout(Duration::from_millis(300)).await.is_err(),
                "nothing twice, nothing without consent"
            );
        }
        // Of b1's copies for the four customers on other nodes: three
        // stored (and found stored again by the retry), one without consent.
        let crossed = r#"courier_cluster_remote_sends_total{outcome="stored"}"#;
        let refused = r#"courier_cluster_remote_sends_total{outcome="refused"}"#;
        assert_eq!(nodes[0].metric(crossed).await, 6);
        assert_eq!(nodes[0].metric(refused).await, 2);
    }

    /// Statuses across nodes: a viewer sees the statuses of contacts whose
    /// inboxes are on other nodes (read by their owners, by the posters'
    /// side of the consent), a view of one reaches its poster as a receipt
    /// once, and someone the poster has not added sees nothing and may not
    /// view.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn statuses_are_seen_and_viewed_across_nodes() {
        use courier_protocol::{Audience, ContactsOp};
        let Some(etcd) = Etcd::start() else { return };
        let ids = ["s1", "s2", "s3"];
        let mut nodes = three_linked("spruce", ids, &etcd).await;
        let map = shards(&nodes[0]).await;
        let alice = user_on(&map, "s1", 100);
        let bob = user_on(&map, "s2", 100);
        let dan = user_on(&map, "s2", bob + 1);
        let carol = user_on(&map, "s3", 100);
        let (a, _) = nodes[2].client(alice).await;
        let (b, _) = nodes[0].client(bob).await;
        let (d, _) = nodes[1].client(dan).await;
        let (c, _) = nodes[1].client(carol).await;
        // Alice and Bob have each other, and Alice has Dan (on Bob's node)
        // and he her; Carol has Bob, but Bob not her.
        a.contacts(ContactsOp::Add, vec![bob, dan]).await.unwrap();
        b.contacts(ContactsOp::Add, vec![alice]).await.unwrap();
        d.contacts(ContactsOp::Add, vec![alice]).await.unwrap();
        c.contacts(ContactsOp::Add, vec![bob]).await.unwrap();
        let (bobs, _) = b
            .post_status(Audience::Contacts, vec![], chat("beach"))
            .await
            .unwrap();
        let (dans, _) = d
            .post_status(Audience::Contacts, vec![], chat("hike"))
            .await
            .unwrap();
        let seen = a.statuses().await.unwrap();
        let got: Vec<_> = seen.iter().map(|s| (s.poster, s.status_id)).collect();
        assert_eq!(got, vec![(bob, bobs), (dan, dans)], "in contact order");
        assert_eq!(seen[0].payload, chat("beach"));
        assert!(
            c.statuses().await.unwrap().is_empty(),
            "Bob has not added Carol"
        );
        a.view_status(bob, bobs).await.unwrap();
        let r = receipts(&b).await;
        assert_eq!(r, vec![(alice, ReceiptStatus::Viewed as u8, bobs)]);
        a.view_status(bob, bobs).await.unwrap();
        assert!(
            b.next_timeout(Duration::from_millis(300)).await.is_err(),
            "a second view is not a second receipt"
        );
        assert_eq!(
            rejected(c.view_status(bob, bobs).await),
            ErrorCode::NO_SUCH_STATUS
        );
        assert_eq!(
            rejected(a.view_status(carol, bobs).await),
            ErrorCode::NO_SUCH_STATUS,
            "not Alice's contact"
        );
        // Bob's and Dan's node dies: a fetch is refused, retryably, rather
        // than answered without them; so is a view of Bob's status.
        nodes[1].kill();
        wait_status(&nodes[0], "s2's link down", |s| {
            link_state(s, "s2") == "down"
        })
        .await;
        assert_eq!(rejected(a.statuses().await), ErrorCode::SHARD_UNAVAILABLE);
        assert_eq!(
            rejected(a.view_status(bob, bobs).await),
            ErrorCode::SHARD_UNAVAILABLE
        );
    }

    /// Three connections to `addr` from 127.0.0.40, one after another.
    async fn three_from_one_address(addr: &str) -> Vec<Raw> {
        let mut out = Vec::new();
        for _ in 0..3 {
            out.push(Raw::over(connect_from(40, addr).await));
        }
        out
    }

    /// A gateway forwards many users' sessions from one address: the
    /// owner's per-source budget (here two new connections a second) does
    /// not count them as one client, while a client connecting straight to
    /// the owner still meets it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_gateway_is_not_one_source_to_its_owners_admission_limits() {
        let Some(etcd) = Etcd::start() else { return };
        let extra = [
            ("COURIER_CLUSTER_INITIAL_NODES", "2"),
            ("COURIER_LIMITS_NEW_CONNECTIONS_PER_SOURCE_PER_SEC", "2"),
        ];
        let g1 = start_node("gold", "g1", &etcd, &extra);
        let g2 = start_node("gold", "g2", &etcd, &extra);
        for (node, peer) in [(&g1, "g2"), (&g2, "g1")] {
            wait_status(node, "serving and linked", |s| {
                all_serving(s, &["g1", "g2"]) && link_state(s, peer) == "up"
            })
            .await;
        }
        let map = shards(&g1).await;
        let mut user = 0;
        let mut held = Vec::new();
        for source in 20..26 {
            user = user_on(&map, "g1", user + 1);
            // Each from its own address, so g2's own budget is not the one tested.
            held.push(Raw::welcomed_from(&g2, user, source).await);
        }
        assert_eq!(g2.metric("courier_cluster_forwarded_sessions").await, 6);
        let rate_refused = r#"courier_connections_refused_total{reason="source_rate"}"#;
        assert_eq!(
            g1.metric(rate_refused).await,
            0,
            "no forwarded session refused"
        );
        // Three straight from one address within a second: one is refused.
        let _direct: Vec<Raw> = three_from_one_address(&g1.addr).await;
        g1.wait_for_metric(rate_refused, 1).await;
        assert_eq!(g1.metric(rate_refused).await, 1);
    }
}

/// Business messaging across nodes: the business's node holds its rules
/// and state; a customer on another node, connected through a third,
/// reads its profile and opts in (carried to the business's node), gets
/// its templates, and a STOP sent from there takes effect at once.
mod business {
    use super::*;
    use courier_protocol::business::{TemplateMessage, TemplateSend};
    use courier_protocol::{BusinessOp, Destination, ErrorCode, MessageKind, Purpose};
    use serde_json::json;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_business_and_its_customer_on_different_nodes_keep_every_rule() {
        let Some(etcd) = Etcd::start() else { return };
        let ids = ["b1", "b2", "b3"];
        let nodes = three_linked_with("bazaar", ids, &etcd, &[]).await;
        let map = shards(&nodes[0]).await;
        let b = user_on(&map, "b1", 500);
        let customer = user_on(&map, "b2", 500);
        let path = format!("/admin/businesses/{b}");

        // The admin API of a node that does not serve the business's shard
        // names the one that does.
        let (status, answer) = nodes[1]
            .admin_json("PUT", &path, json!({ "display_name": "Shop" }))
            .await;
        assert_eq!(
            (status, answer["code"].as_str()),
            (421, Some("not_here")),
            "{answer}"
        );
        assert!(answer["error"].as_str().unwrap().contains("b1"), "{answer}");
        let (status, answer) = nodes[0]
            .admin_json("PUT", &path, json!({ "display_name": "Shop" }))
            .await;
        assert_eq!(status, 200, "{answer}");
        let def = json!({ "category": "utility", "versions": [{ "language": "en_US", "body": "Order {{1}} shipped", "examples": { "1": "#1" } }] });
        let (status, answer) = nodes[0]
            .admin_json("PUT", &format!("{path}/templates/shipped"), def)
            .await;
        assert_eq!(status, 200, "{answer}");
        let (status, _) = nodes[0]
            .admin_json(
                "POST",
                &format!("{path}/templates/shipped/status"),
                json!({ "status": "approved" }),
            )
            .await;
        assert_eq!(status, 200);

        // The customer (b2), through b3; the business through b2.
        let (c, _) = nodes[2].client(customer).await;
        let (business, _) = nodes[1].client(b).await;
        let seen = c
            .business(BusinessOp::Info, b, Purpose::None, "", "")
            .await
            .unwrap();
        assert_eq!(seen.display_name, "Shop");
        let send = |id: &str| TemplateSend {
            name: "shipped".into(),
            language: String::new(),
            params: vec![(String::new(), id.into())],
        };
        assert_eq!(
            rejected(business.send_template(1, customer, &send("#1")).await),
            ErrorCode::NO_CONSENT
        );
        let seen = c
            .business(
                BusinessOp::OptIn,
                b,
                Purpose::Utility,
                "en_US",
                "Order updates, please",
            )
            .await
            .unwrap();
        assert!(seen.utility);
        business
            .send_template(2, customer, &send("#2"))
            .await
            .unwrap();
        let m = c.recv_timeout(WAIT).await.unwrap();
        let t = TemplateMessage::decode(&m.payload).unwrap();
        assert_eq!((m.sender, t.body.as_str()), (b, "Order #2 shipped"));

        // STOP from the customer's side: stored on the business's node,
        // where it withdraws the opt-in before anything after it.
        c.send(Destination::User(b), MessageKind::Chat, chat("STOP"))
            .await
            .unwrap();
        assert_eq!(
            rejected(business.send_template(3, customer, &send("#3")).await),
            ErrorCode::NO_CONSENT
        );
        // The STOP opened the window: the business may answer.
        business
            .send_with_id(
                4,
                Destination::User(customer),
                MessageKind::Chat,
                chat("Unsubscribed"),
            )
            .await
            .unwrap();
        assert_eq!(
            c.recv_timeout(WAIT).await.unwrap().payload,
            chat("Unsubscribed")
        );
    }
}

//! The cluster on a real cluster of containers: `deploy/cluster/compose.yaml`
//! (three etcd members, three Courier nodes, HAProxy) with images built in
//! the test from the binaries the suite already built and Debian's etcd
//! and haproxy, nothing pulled. Faults are real: `docker kill`, `docker
//! network disconnect`, the etcd leader killed, all of etcd stopped.
//!
//! Needs Docker with `docker-compose`. Elsewhere the test says loudly that
//! it skipped; with `TEST_REQUIRE_TOOLS=1` (set by `scripts/test`) a
//! missing Docker fails it instead. Everything it starts (containers,
//! networks, volumes) is removed when it ends, failed or not.

mod common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{assert_load_held, load_in_background, shards_of, tool};
use courier_broker::auth::{load_or_create_secret, Claims};
use courier_client::{Client, ClientConfig};
use courier_protocol::{Destination, MessageKind};
use serde_json::Value;

/// Bound on every wait for the cluster to reach a state.
const CLUSTER_WAIT: Duration = Duration::from_secs(60);
const NODES: [&str; 3] = ["courier-1", "courier-2", "courier-3"];
/// The cluster's shards (fewer than the default 256, so that a join and a
/// drain move 8 each within the suite's time).
const SHARDS: u64 = 32;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Runs a command, returning its standard output; panics with its output
/// if it fails.
fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

fn docker(args: &[&str]) -> String {
    run(Command::new("docker").args(args))
}

/// Docker and docker-compose work here; otherwise say so loudly (or fail
/// when the tools are required).
fn docker_available() -> bool {
    let ok = Command::new("docker")
        .arg("info")
        .output()
        .is_ok_and(|o| o.status.success())
        && Command::new("docker-compose")
            .arg("version")
            .output()
            .is_ok_and(|o| o.status.success());
    if !ok {
        let required = std::env::var("TEST_REQUIRE_TOOLS").is_ok_and(|v| v == "1");
        assert!(
            !required,
            "Docker with docker-compose is needed for the container tests"
        );
        eprintln!("\n*** SKIPPED: Docker with docker-compose is not available here. ***\n");
    }
    ok
}

/// One compose project of the cluster; taken down with its volumes on drop.
struct Deployment {
    project: String,
    env: Vec<(String, String)>,
    secret: PathBuf,
    _dir: tempfile::TempDir,
    /// Held until the deployment is down (dropped after `drop` ran).
    _one_at_a_time: std::sync::MutexGuard<'static, ()>,
}

/// Taken by each deployment for its whole life.
static ONE_CLUSTER: std::sync::Mutex<()> = std::sync::Mutex::new(());

impl Deployment {
    /// The cluster with `factor` copies of each shard. One deployment at a
    /// time: two clusters of six containers and their loads on a 2-core
    /// machine slow each other past what the tests measure.
    fn up(factor: u32) -> Deployment {
        let one_at_a_time = ONE_CLUSTER
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("secret.key");
        load_or_create_secret(&secret).unwrap();
        // The nodes run as an unprivileged user.
        std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o644))
            .unwrap();
        let build = repo().join("deploy/docker/build.sh");
        let tag = "cluster-test";
        for (what, image) in [
            ("courier", format!("courier:{tag}")),
            ("etcd", format!("courier-etcd:{tag}")),
            ("haproxy", format!("courier-haproxy:{tag}")),
            ("prometheus", format!("courier-prometheus:{tag}")),
        ] {
            let mut cmd = Command::new(&build);
            cmd.arg(what).env("IMAGE", &image);
            if what == "courier" {
                cmd.env("BIN", env!("CARGO_BIN_EXE_courier"));
            }
            run(&mut cmd);
        }
        let project = format!("couriertest{}r{factor}", std::process::id());
        let env: Vec<(String, String)> = [
            ("COURIER_IMAGE", format!("courier:{tag}")),
            ("ETCD_IMAGE", format!("courier-etcd:{tag}")),
            ("HAPROXY_IMAGE", format!("courier-haproxy:{tag}")),
            ("PROMETHEUS_IMAGE", format!("courier-prometheus:{tag}")),
            ("PROMETHEUS_PUBLISH", "127.0.0.1:".into()),
            ("COURIER_SECRET_FILE", secret.display().to_string()),
            // Any free host port for the load balancer.
            ("CLIENTS_PUBLISH", "127.0.0.1:".into()),
            ("COURIER_LEASE_TTL_S", "3".into()),
            ("COURIER_CLUSTER_SHARDS", SHARDS.to_string()),
            ("COURIER_CLUSTER_REPLICATION_FACTOR", factor.to_string()),
            // A killed node stays down until the test starts it.
            ("COURIER_RESTART", "no".into()),
            // More detail for a failure's logs: COURIER_TEST_LOG.
            (
                "COURIER_LOG",
                std::env::var("COURIER_TEST_LOG").unwrap_or_else(|_| "info".into()),
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        let d = Deployment {
            project,
            env,
            secret,
            _dir: dir,
            _one_at_a_time: one_at_a_time,
        };
        let mut services = vec!["etcd-1", "etcd-2", "etcd-3"];
        services.extend(NODES);
        services.extend(["haproxy", "prometheus"]);
        let mut args = vec!["up", "-d", "--no-build"];
        args.extend(services);
        d.compose(&args);
        d
    }

    fn compose(&self, args: &[&str]) -> String {
        let file = repo().join("deploy/cluster/compose.yaml");
        run(Command::new("docker-compose")
            .arg("-f")
            .arg(file)
            .args(["-p", &self.project])
            .args(args)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str()))))
    }

    fn container(&self, service: &str) -> String {
        format!("{}_{service}_1", self.project)
    }

    fn network(&self) -> String {
        format!("{}_cluster", self.project)
    }

    /// The project's network that etcd is on (with the nodes): cut a node
    /// off it, and it is cut off from etcd alone.
    fn control_network(&self) -> String {
        format!("{}_control", self.project)
    }

    /// `service`'s address on the project's `cluster` network (empty while
    /// it is off it).
    fn ip(&self, service: &str) -> String {
        let format = format!(
            "{{{{with index .NetworkSettings.Networks \"{}\"}}}}{{{{.IPAddress}}}}{{{{end}}}}",
            self.network()
        );
        let ip = docker(&["inspect", "-f", &format, &self.container(service)]);
        ip.trim().to_owned()
    }

    /// Cuts `service` off `networks`.
    fn disconnect(&self, service: &str, networks: &[String]) {
        for n in networks {
            docker(&["network", "disconnect", n, &self.container(service)]);
        }
    }

    /// Connects `service` to `networks` again, under its name.
    fn reconnect(&self, service: &str, networks: &[String]) {
        for n in networks {
            docker(&[
                "network",
                "connect",
                "--alias",
                service,
                n,
                &self.container(service),
            ]);
        }
    }

    /// HAProxy's published client port on this host.
    fn clients_addr(&self) -> String {
        let port = docker(&["port", &self.container("haproxy"), "7700"]);
        port.lines().next().unwrap().trim().to_owned()
    }

    /// The answer of Prometheus's HTTP API at `path`, over the project's
    /// network.
    fn prometheus(&self, path: &str) -> Option<Value> {
        let ip = self.ip("prometheus");
        let mut s = std::net::TcpStream::connect_timeout(
            &format!("{ip}:9090").parse().ok()?,
            Duration::from_secs(2),
        )
        .ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nhost: x\r\n\r\n").as_bytes())
            .ok()?;
        let mut text = String::new();
        s.read_to_string(&mut text).ok()?;
        serde_json::from_str(text.split_once("\r\n\r\n")?.1).ok()
    }

    fn admin_token(&self) -> String {
        load_or_create_secret(&self.secret).unwrap().mint(Claims {
            user_id: 0,
            device_id: 0,
            expires_at_s: u64::MAX / 2,
        })
    }

    /// `GET /admin/cluster` on a node, over the project's network; `None`
    /// if the node does not answer.
    fn status(&self, service: &str) -> Option<Value> {
        serde_json::from_str(&self.get(service, "/admin/cluster")?).ok()
    }

    /// The sum of a counter's or gauge's samples on a node whose labels
    /// contain `labels` (`""`: all).
    fn metric(&self, service: &str, name: &str, labels: &str) -> u64 {
        let text = self.get(service, "/metrics").unwrap_or_default();
        text.lines()
            .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
            .filter(|l| l.contains(labels))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64
    }

    /// The body of `GET path` on a node's admin port, over the project's
    /// network; `None` if the node does not answer.
    fn get(&self, service: &str, path: &str) -> Option<String> {
        self.admin("GET", service, path)
    }

    /// The body of `method path` on a node's admin port, over the
    /// project's network; `None` if the node does not answer.
    fn admin(&self, method: &str, service: &str, path: &str) -> Option<String> {
        let ip = self.ip(service);
        if ip.is_empty() {
            return None;
        }
        let mut s = std::net::TcpStream::connect_timeout(
            &format!("{ip}:7701").parse().ok()?,
            Duration::from_secs(2),
        )
        .ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        let token = self.admin_token();
        s.write_all(
            format!(
                "{method} {path} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {token}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
            )
            .as_bytes(),
        )
        .ok()?;
        let mut text = String::new();
        s.read_to_string(&mut text).ok()?;
        Some(text.split_once("\r\n\r\n")?.1.to_owned())
    }

    /// Waits (bounded) until `check` holds for `service`'s status.
    fn wait(&self, service: &str, what: &str, check: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + CLUSTER_WAIT;
        let mut last = None;
        loop {
            if let Some(s) = self.status(service) {
                if check(&s) {
                    return s;
                }
                last = Some(s);
            }
            if Instant::now() > deadline {
                let logs = Command::new("docker")
                    .args(["logs", "--tail", "40", &self.container(service)])
                    .output()
                    .map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
                    .unwrap_or_default();
                panic!(
                    "{service}: {what}: never happened; last status {last:#?}\nits log:\n{logs}"
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Deployment {
    fn drop(&mut self) {
        if std::thread::panicking() || std::env::var_os("COURIER_TEST_KEEP_LOGS").is_some() {
            // What the nodes said, kept for the failure's reader (and on
            // request: COURIER_TEST_KEEP_LOGS).
            for service in ["courier-1", "courier-2", "courier-3", "courier-4"] {
                let Ok(out) = Command::new("docker")
                    .args(["logs", &self.container(service)])
                    .output()
                else {
                    continue;
                };
                let path = std::env::temp_dir().join(format!("{}-{service}.log", self.project));
                let mut text = out.stdout;
                text.extend_from_slice(&out.stderr);
                if !text.is_empty() && std::fs::write(&path, &text).is_ok() {
                    eprintln!("{service}'s log: {}", path.display());
                }
                if std::thread::panicking() {
                    // The node's warnings and errors in the failure's own
                    // output (a CI run keeps nothing else of the nodes).
                    let text = String::from_utf8_lossy(&text);
                    let warned: Vec<&str> = text
                        .lines()
                        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
                        .collect();
                    let tail = &warned[warned.len().saturating_sub(30)..];
                    eprintln!(
                        "{service}: the last {} of its {} warnings and errors:\n{}",
                        tail.len(),
                        warned.len(),
                        tail.join("\n")
                    );
                }
            }
        }
        let file = repo().join("deploy/cluster/compose.yaml");
        let _ = Command::new("docker-compose")
            .arg("-f")
            .arg(file)
            .args(["-p", &self.project, "down", "-v", "-t", "0"])
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .output();
    }
}

fn state_of<'a>(status: &'a Value, id: &str) -> &'a str {
    status["nodes"]
        .as_array()
        .and_then(|n| n.iter().find(|n| n["id"] == id))
        .and_then(|n| n["state"].as_str())
        .unwrap_or("absent")
}

fn link_state(status: &Value, peer: &str) -> String {
    status["links"]
        .as_array()
        .and_then(|l| l.iter().find(|l| l["node"] == peer))
        .and_then(|l| l["state"].as_str())
        .unwrap_or("absent")
        .to_owned()
}

fn no_moves(s: &Value) -> bool {
    s["moves"].as_array().is_some_and(Vec::is_empty) && s["planned_moves"] == 0
}

fn all_serving(s: &Value) -> bool {
    s["map"] == "complete" && s["etcd"] == "up" && NODES.iter().all(|n| state_of(s, n) == "serving")
}

/// The etcd member that leads now (asked of etcd-1's etcdctl).
fn etcd_leader(d: &Deployment) -> String {
    let out = docker(&[
        "exec",
        &d.container("etcd-1"),
        "/usr/local/bin/etcdctl",
        "--endpoints=http://etcd-1:2379,http://etcd-2:2379,http://etcd-3:2379",
        "endpoint",
        "status",
        "-w",
        "json",
    ]);
    let v: Value = serde_json::from_str(&out).unwrap();
    let members = v.as_array().unwrap();
    let leader_id = members[0]["Status"]["leader"].as_u64().unwrap();
    let leader = members
        .iter()
        .find(|m| m["Status"]["header"]["member_id"].as_u64() == Some(leader_id))
        .unwrap();
    let endpoint = leader["Endpoint"].as_str().unwrap();
    endpoint
        .trim_start_matches("http://")
        .split(':')
        .next()
        .unwrap()
        .to_owned()
}

/// Named so the epoll pass of `scripts/test` skips it: the control plane
/// does not touch the network path.
mod control_plane {
    use super::*;

    #[test]
    fn a_cluster_in_containers_keeps_its_map_and_every_acknowledged_message_through_kills_cuts_etcd_outages_a_join_and_a_drain(
    ) {
        if !docker_available() {
            return;
        }
        let d = Deployment::up(1);
        let first = d.wait(
            "courier-1",
            "three serving nodes and a complete map",
            all_serving,
        );
        let mut counts: Vec<u64> = NODES.iter().map(|n| shards_of(&first, n)).collect();
        counts.sort();
        assert_eq!(counts, [10, 11, 11], "{first:#}");
        for n in &NODES[1..] {
            let s = d.wait(n, "the same view", all_serving);
            assert_eq!(s["controller"], first["controller"]);
        }

        // HAProxy passes clients to the nodes in turn; each node forwards
        // a client whose user another node owns. Six users in a ring each
        // send to the next: every message arrives, across nodes.
        let addr = d.clients_addr();
        let users: Vec<u64> = (7..13).collect();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let mut clients = Vec::new();
            for &user in &users {
                let token = load_or_create_secret(&d.secret).unwrap().mint(Claims {
                    user_id: user,
                    device_id: 1,
                    expires_at_s: u64::MAX / 2,
                });
                // HAProxy closes what it takes before its health checks
                // have marked a node up: a client tries again, as a phone
                // does, for a bounded time.
                let deadline = Instant::now() + Duration::from_secs(20);
                let (client, welcome) = loop {
                    let config = ClientConfig::new(addr.clone(), user, 1, token.clone());
                    let attempt =
                        tokio::time::timeout(Duration::from_secs(20), Client::connect(config))
                            .await
                            .expect("connect through HAProxy in time");
                    match attempt {
                        Ok(c) => break c,
                        Err(e) if Instant::now() < deadline => {
                            eprintln!("through HAProxy, {user}: {e}; again");
                            tokio::time::sleep(Duration::from_millis(250)).await;
                        }
                        Err(e) => panic!("welcomed through HAProxy: {e:?}"),
                    }
                };
                assert_eq!(welcome.head_seq, 0);
                clients.push(client);
            }
            for (i, c) in clients.iter().enumerate() {
                let to = users[(i + 1) % users.len()];
                let text = format!("ring {i}");
                tokio::time::timeout(
                    Duration::from_secs(20),
                    c.send(Destination::User(to), MessageKind::Chat, text.into()),
                )
                .await
                .expect("acknowledged in time")
                .expect("acknowledged");
            }
            for i in 0..clients.len() {
                let receiver = &clients[(i + 1) % clients.len()];
                let m = receiver
                    .recv_timeout(Duration::from_secs(20))
                    .await
                    .expect("the ring's message arrives");
                assert_eq!(
                    (m.sender, &m.payload[..]),
                    (users[i], format!("ring {i}").as_bytes())
                );
            }
            let forwarded: u64 = NODES
                .iter()
                .map(|n| d.metric(n, "courier_cluster_forwarded_sessions", ""))
                .sum();
            assert!(
                forwarded >= 1,
                "some clients reached another node than their user's"
            );
        });
        let crossed: u64 = NODES
            .iter()
            .map(|n| {
                d.metric(
                    n,
                    "courier_cluster_remote_sends_total",
                    "outcome=\"stored\"",
                )
            })
            .sum();
        assert!(crossed >= 1, "some of the ring crossed nodes");

        // Load through HAProxy with nothing wrong: users on all nodes, in
        // pairs and in groups of 8 that span the nodes, the checker clean.
        under_load(&d, "no fault", 2_000_000, || {});

        // SIGKILL a node under load: it is lost, its shards wait for it
        // (its users get retryable errors), it comes back; nothing
        // acknowledged is lost, duplicated or reordered.
        under_load(&d, "a node killed and restarted", 3_000_000, || {
            let killed = "courier-2";
            let its_shards = shards_of(&first, killed);
            docker(&["kill", &d.container(killed)]);
            let s = d.wait("courier-1", "courier-2 lost", |s| {
                state_of(s, killed) == "lost"
            });
            assert_eq!(
                shards_of(&s, killed),
                its_shards,
                "nobody takes a lost node's shards"
            );
            assert_eq!(s["shards_unavailable"].as_u64(), Some(its_shards));
            assert!(s["controller"].as_str().is_some_and(|c| c != killed));
            docker(&["start", &d.container(killed)]);
            let s = d.wait("courier-1", "courier-2 back", |s| {
                all_serving(s) && s["shards_unavailable"] == 0
            });
            assert_eq!(shards_of(&s, killed), its_shards);
        });
        let refused: u64 = NODES
            .iter()
            .map(|n| d.metric(n, "courier_cluster_unavailable_total", ""))
            .sum();
        assert!(refused >= 1, "sends or sessions were refused meanwhile");

        // Cut a node off the network under load: the others see it lost;
        // it keeps its own map meanwhile and says etcd is unreachable;
        // reconnected, all serve again.
        under_load(&d, "a node cut off and reconnected", 4_000_000, || {
            let cut = "courier-3";
            let networks = [d.network(), d.control_network()];
            d.disconnect(cut, &networks);
            d.wait("courier-1", "courier-3 lost, its link down", |s| {
                state_of(s, cut) == "lost" && link_state(s, cut) == "down"
            });
            d.reconnect(cut, &networks);
            for n in NODES {
                d.wait(n, "all serving after the cut healed, links up", |s| {
                    all_serving(s)
                        && s["shards_unavailable"] == 0
                        && NODES
                            .iter()
                            .filter(|p| **p != n)
                            .all(|p| link_state(s, p) == "up")
                });
            }
        });

        // Kill the etcd leader under load: the other two members keep the
        // quorum.
        under_load(&d, "the etcd leader killed", 5_000_000, || {
            let leader = etcd_leader(&d);
            docker(&["kill", &d.container(&leader)]);
            for n in NODES {
                d.wait(n, "serving with two etcd members", all_serving);
            }
            docker(&["start", &d.container(&leader)]);
        });

        // Stop all of etcd for a few seconds under load: nodes keep their
        // map and serve; then etcd is back.
        under_load(&d, "all of etcd stopped and started", 6_000_000, || {
            let before = d.status("courier-1").unwrap();
            docker(&[
                "stop",
                "-t",
                "0",
                &d.container("etcd-1"),
                &d.container("etcd-2"),
                &d.container("etcd-3"),
            ]);
            let during = d.wait("courier-1", "etcd seen unreachable", |s| s["etcd"] != "up");
            assert_eq!(during["map"], "complete");
            assert_eq!(
                NODES.map(|n| shards_of(&during, n)),
                NODES.map(|n| shards_of(&before, n)),
                "the map is kept while etcd is away"
            );
            std::thread::sleep(Duration::from_secs(3));
            docker(&[
                "start",
                &d.container("etcd-1"),
                &d.container("etcd-2"),
                &d.container("etcd-3"),
            ]);
            for n in NODES {
                d.wait(n, "etcd back, all serving", |s| {
                    all_serving(s) && s["shards_unavailable"] == 0
                });
            }
        });

        // A fourth node joins under load and takes its share: shards move
        // to it with their data (a copy while the old owner serves, a
        // pause of that shard's writes for the last round, the switch in
        // etcd), a few at a time, while clients whose shard moved
        // reconnect and resume.
        under_load(&d, "a fourth node joins", 7_000_000, || {
            d.compose(&["up", "-d", "--no-build", "courier-4"]);
            let s = d.wait("courier-1", "courier-4 took its share", |s| {
                shards_of(s, "courier-4") == SHARDS / 4 && no_moves(s)
            });
            for n in ["courier-1", "courier-2", "courier-3", "courier-4"] {
                assert_eq!(shards_of(&s, n), SHARDS / 4, "{n}: {s:#}");
            }
            assert_eq!(s["shards_unavailable"], 0, "{s:#}");
        });
        let paused = d.metric("courier-4", "courier_cluster_move_pause_seconds_count", "");
        assert!(
            paused >= SHARDS / 4,
            "each shard courier-4 took paused its writes for the last round: {paused}"
        );

        // A node drains under load (its shards move to the others) and
        // leaves: nothing it held is unavailable afterwards.
        under_load(&d, "a node drained and stopped", 8_000_000, || {
            let left = "courier-2";
            let answer = d
                .admin("POST", "courier-1", &format!("/admin/cluster/drain/{left}"))
                .expect("courier-1 answers the drain");
            assert!(answer.contains("draining"), "{answer}");
            d.wait("courier-1", "courier-2 gave its shards away", |s| {
                shards_of(s, left) == 0 && no_moves(s)
            });
            d.compose(&["stop", "-t", "30", left]);
            let s = d.wait("courier-1", "courier-2 gone", |s| {
                state_of(s, left) == "absent" && s["map"] == "complete"
            });
            assert_eq!(s["shards_unavailable"], 0, "{s:#}");
            let mut counts: Vec<u64> = ["courier-1", "courier-3", "courier-4"]
                .iter()
                .map(|n| shards_of(&s, n))
                .collect();
            counts.sort();
            assert_eq!(counts, [10, 11, 11], "{s:#}");
        });

        // Prometheus scrapes every node, and sees the sends cross.
        let deadline = Instant::now() + CLUSTER_WAIT;
        loop {
            let targets = d.prometheus("/api/v1/targets");
            let up = targets.as_ref().map_or(0, |t| {
                t["data"]["activeTargets"]
                    .as_array()
                    .map_or(0, |a| a.iter().filter(|t| t["health"] == "up").count())
            });
            let crossed = d
                .prometheus("/api/v1/query?query=sum(courier_cluster_remote_sends_total)")
                .and_then(|v| {
                    v["data"]["result"][0]["value"][1]
                        .as_str()
                        .and_then(|x| x.parse::<f64>().ok())
                })
                .unwrap_or(0.0);
            // courier-1, -3 and -4 run now (courier-2 left).
            if up == 3 && crossed > 0.0 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "Prometheus: {up} of 3 running nodes up, {crossed} remote sends seen; targets {targets:#?}"
            );
            std::thread::sleep(Duration::from_secs(1));
        }
    }
}

/// Replicated shards (factor 3) in containers, each fault under load.
/// Named so the epoll pass of `scripts/test` skips it.
mod replication {
    use super::*;
    use rand::seq::SliceRandom;
    use rand::{Rng, SeedableRng};

    /// Every shard has three copies in sync, as `service` reads the map.
    fn all_in_sync(d: &Deployment, service: &str, what: &str) {
        let deadline = Instant::now() + CLUSTER_WAIT;
        loop {
            let shards = d
                .get(service, "/admin/cluster/shards")
                .and_then(|b| serde_json::from_str::<Value>(&b).ok());
            let synced = shards.as_ref().is_some_and(|v| {
                v["shards"].as_array().is_some_and(|a| {
                    a.len() as u64 == SHARDS
                        && a.iter()
                            .all(|s| s["isr"].as_array().is_some_and(|i| i.len() == 3))
                })
            });
            if synced {
                return;
            }
            assert!(Instant::now() < deadline, "{what}: {shards:#?}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The cluster with three copies of every shard, serving, all in sync.
    fn up_in_sync() -> Deployment {
        let d = Deployment::up(3);
        d.wait(
            "courier-1",
            "three serving nodes and a complete map",
            all_serving,
        );
        all_in_sync(&d, "courier-1", "every shard's three copies in sync");
        d
    }

    /// The node that leads the most shards now (the fault's target: the
    /// primary of busy shards).
    fn busiest(d: &Deployment) -> &'static str {
        let s = d.wait("courier-1", "a status", |_| true);
        let node = NODES.into_iter().max_by_key(|n| shards_of(&s, n)).unwrap();
        assert!(shards_of(&s, node) > 0, "{s:#}");
        node
    }

    /// Waits until `node` leads no shard and none is unavailable: its
    /// shards went to in-sync copies. Returns how long that took.
    fn promoted_away(d: &Deployment, node: &str, since: Instant) -> Duration {
        let watcher = NODES.iter().find(|n| **n != node).unwrap();
        d.wait(watcher, &format!("{node}'s shards promoted"), |s| {
            shards_of(s, node) == 0 && s["shards_unavailable"] == 0 && s["etcd"] == "up"
        });
        since.elapsed()
    }

    /// The failover time: from a fault to the first send
    /// acknowledged on the new primary, for a recipient whose shard the
    /// faulted node led. A sender whose own shard another node leads, if
    /// one does (so its session lives on), sends through HAProxy once the
    /// fault's command has returned: one message, sent again with its id
    /// every 20 ms (whether or not the last try was answered: a refusal
    /// comes at once, the client library does not retry here) until
    /// acknowledged, reconnecting if its connection goes. The first acknowledgement of a send fired after
    /// that ends it (60 s at most). A node cut off from etcd alone still
    /// leads its shards until it fences itself: there only sends fired
    /// after its first refusal count.
    struct FailoverProbe {
        go: std::sync::mpsc::Sender<(Instant, bool)>,
        done: std::thread::JoinHandle<Option<Duration>>,
    }

    /// What became of one of the probe's sends: fired at, its client
    /// message id, acknowledged at (`None`: refused or failed).
    type Outcome = (Instant, u64, Option<Instant>);

    impl FailoverProbe {
        /// Connected and ready, before the fault on `node`.
        fn ready(d: &Deployment, node: &str, first_user: u64) -> FailoverProbe {
            let watcher = NODES.iter().find(|n| **n != node).unwrap();
            let shards: Value = d
                .get(watcher, "/admin/cluster/shards")
                .and_then(|b| serde_json::from_str(&b).ok())
                .expect("the shards' owners");
            let owner = |user: u64| {
                let shard =
                    courier_storage::shard_of_slot(courier_storage::slot_of(user), SHARDS as u32);
                shards["shards"][shard as usize]["owner"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned()
            };
            let mut users = (first_user + 1_000..first_user + 11_000).map(|u| (u, owner(u)));
            let recipient = users
                .find(|(_, o)| o == node)
                .expect("a user of the node")
                .0;
            // A node may lead every shard after earlier failovers (leaders
            // are not rebalanced): then the sender's session goes too, and
            // the first acknowledgement waits for both failovers.
            let sender = users
                .find(|(_, o)| o != node)
                .map_or(recipient + 1, |(u, _)| u);
            let addr = d.clients_addr();
            let token = load_or_create_secret(&d.secret).unwrap().mint(Claims {
                user_id: sender,
                device_id: 1,
                expires_at_s: u64::MAX / 2,
            });
            let (go, fault) = std::sync::mpsc::channel();
            let (connected_tx, connected) = std::sync::mpsc::channel();
            let done = std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                runtime.block_on(async move {
                    let connect = || {
                        let mut config = ClientConfig::new(addr.clone(), sender, 1, token.clone());
                        config.unavailable_retry = Duration::ZERO;
                        async move {
                            let connecting = Client::connect(config);
                            match tokio::time::timeout(Duration::from_secs(2), connecting).await {
                                Ok(Ok((c, _))) => Some(std::sync::Arc::new(c)),
                                _ => None,
                            }
                        }
                    };
                    let mut client = None;
                    for _ in 0..40 {
                        client = connect().await;
                        if client.is_some() {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(250)).await;
                    }
                    let _ = connected_tx.send(client.is_some());
                    let (t0, after_refusal): (Instant, bool) = fault.recv().ok()?;
                    let mut counts_from = (!after_refusal).then(Instant::now);
                    // One message at a time, retried with its id (as a
                    // phone retries) until acknowledged; a new one after an
                    // acknowledgement that does not count yet.
                    let mut id = (sender << 20) | (t0.elapsed().as_nanos() as u64 & 0xFFFF);
                    let (outcome_tx, mut outcomes) =
                        tokio::sync::mpsc::unbounded_channel::<Outcome>();
                    let mut tick = tokio::time::interval(Duration::from_millis(20));
                    while t0.elapsed() < Duration::from_secs(60) {
                        tokio::select! {
                            Some((fired, sent, acked)) = outcomes.recv() => {
                                match acked {
                                    Some(at) if counts_from.is_some_and(|from| fired >= from) => {
                                        return Some(at - t0);
                                    }
                                    Some(_) if sent == id => id += 1,
                                    Some(_) => {}
                                    None => {
                                        counts_from.get_or_insert_with(Instant::now);
                                    }
                                }
                                continue;
                            }
                            _ = tick.tick() => {}
                        }
                        if client.as_ref().is_none_or(|c| c.close_reason().is_some()) {
                            client = connect().await;
                        }
                        let Some(c) = client.clone() else { continue };
                        let outcome_tx = outcome_tx.clone();
                        tokio::spawn(async move {
                            let fired = Instant::now();
                            let to = Destination::User(recipient);
                            let send = c.send_with_id(id, to, MessageKind::Chat, "probe".into());
                            let acked = tokio::time::timeout(Duration::from_secs(10), send).await;
                            let at = matches!(acked, Ok(Ok(_))).then(Instant::now);
                            let _ = outcome_tx.send((fired, id, at));
                        });
                    }
                    None
                })
            });
            assert!(
                connected
                    .recv_timeout(Duration::from_secs(30))
                    .unwrap_or(false),
                "the failover probe connected"
            );
            FailoverProbe { go, done }
        }

        /// The fault's command, issued at `t0`, has returned: sends begin.
        fn fire(&self, t0: Instant, after_refusal: bool) {
            let _ = self.go.send((t0, after_refusal));
        }

        /// From the fault to the first send acknowledged on the new primary.
        fn first_ack(self) -> Duration {
            self.done
                .join()
                .expect("the probe's thread")
                .expect("a send to the failed node's user acknowledged within 60 s")
        }
    }

    /// Waits until all three copies of every shard, on `nodes`, agree (a
    /// digest each).
    fn copies_agree(d: &Deployment, nodes: &[&str]) {
        let deadline = Instant::now() + CLUSTER_WAIT;
        loop {
            let mut by_shard: std::collections::BTreeMap<u64, Vec<String>> = Default::default();
            for n in nodes {
                let Some(v) = d
                    .get(n, "/admin/cluster/digests")
                    .and_then(|b| serde_json::from_str::<Value>(&b).ok())
                else {
                    continue;
                };
                for s in v["shards"].as_array().unwrap() {
                    by_shard
                        .entry(s["shard"].as_u64().unwrap())
                        .or_default()
                        .push(format!("{} {} {}", s["role"], s["entries"], s["digest"]));
                }
            }
            let agree = by_shard.len() as u64 == SHARDS
                && by_shard.values().all(|c| {
                    let data = |x: &String| x.split_once(' ').map(|p| p.1.to_owned());
                    c.len() == 3
                        && c.iter().filter(|x| x.starts_with("\"primary\"")).count() == 1
                        && c.iter().all(|x| data(x) == data(&c[0]))
                });
            if agree {
                println!("all {SHARDS} shards: three copies with one digest each");
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the copies differ: {by_shard:#?}"
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// The faults of the suite; a SIGKILL runs twice.
    #[derive(Clone, Copy, Debug)]
    enum Fault {
        Kill,
        CutOff,
        EtcdCut,
        Pause,
        KillWithEtcdLeader,
        DiskLost,
    }

    /// The suite's seed: `COURIER_TEST_SEED` if set (to replay a run),
    /// else drawn from the clock. Printed either way.
    fn seed() -> u64 {
        let seed = std::env::var("COURIER_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(1, |d| d.as_nanos() as u64)
            });
        println!(
            "fault suite seed: {seed} (COURIER_TEST_SEED={seed} replays this order and timing)"
        );
        seed
    }

    /// Three etcd members and three Courier nodes, every shard on all
    /// three. Under load through HAProxy (users in pairs and groups of 8
    /// across the nodes, reconnecting and resuming as phones do), one
    /// fault at a time, in an order and at moments drawn from a seed: a
    /// primary SIGKILLed, twice; cut off from everything; cut off from
    /// etcd alone (its links and its clients stay: it fences itself, and
    /// retries of writes its copies never confirmed must not be
    /// acknowledged); paused past its lease and resumed (a long GC or VM
    /// stall); killed together with the etcd leader (a failover while etcd
    /// elects); and a node whose disk is lost, back empty. Each fault is
    /// bounded in time. Each time its shards go to in-sync copies with none
    /// unavailable, the node comes back as a backup and copies them until
    /// all are in sync, and the checker finds every acknowledged message
    /// delivered once and in order (a late write of the paused or cut-off
    /// primary acknowledged would be a loss). Then the three copies of
    /// every shard are identical. Last, copies move under load: a fourth
    /// node joins and takes its share of copies, a node is drained of
    /// all it holds and stopped, and the copies agree again.
    #[test]
    fn replicated_shards_keep_every_acknowledged_message_through_kills_cuts_pauses_and_a_lost_disk()
    {
        if !docker_available() {
            return;
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed());
        let mut faults = vec![
            Fault::Kill,
            Fault::Kill,
            Fault::CutOff,
            Fault::EtcdCut,
            Fault::Pause,
            Fault::KillWithEtcdLeader,
            Fault::DiskLost,
        ];
        faults.shuffle(&mut rng);
        println!("faults in this run's order: {faults:?}");
        let d = up_in_sync();
        let both = [d.network(), d.control_network()];
        let mut failovers = Vec::new();
        let mut lost_disk = None;

        for (i, fault) in faults.into_iter().enumerate() {
            let first_user = 11_000_000 + i as u64 * 1_000_000;
            // The fault strikes 1 to 5 s into the load.
            let after = Duration::from_millis(rng.gen_range(1_000..5_000));
            // A paused node stays paused 1 to 3 s past its shards' promotion.
            let paused_past = Duration::from_millis(rng.gen_range(1_000..3_000));
            let what = format!("{fault:?} {}", i + 1);
            under_load_at(&d, &what, first_user, after, || {
                let node = busiest(&d);
                let probe = FailoverProbe::ready(&d, node, first_user);
                let t0 = Instant::now();
                match fault {
                    Fault::Kill => {
                        docker(&["kill", &d.container(node)]);
                        probe.fire(t0, false);
                        let promoted = promoted_away(&d, node, Instant::now());
                        failovers.push((node, "SIGKILL", promoted, probe.first_ack()));
                        docker(&["start", &d.container(node)]);
                        all_in_sync(&d, "courier-1", "the killed node back in sync");
                    }
                    Fault::CutOff => {
                        d.disconnect(node, &both);
                        probe.fire(t0, false);
                        let promoted = promoted_away(&d, node, Instant::now());
                        failovers.push((node, "cut off", promoted, probe.first_ack()));
                        d.reconnect(node, &both);
                        all_in_sync(&d, node, "the cut-off node back in sync");
                    }
                    Fault::EtcdCut => {
                        let control = [d.control_network()];
                        d.disconnect(node, &control);
                        probe.fire(t0, true);
                        let promoted = promoted_away(&d, node, Instant::now());
                        // Fenced, it is not ready: HAProxy moves its
                        // clients to nodes that reach etcd (their sessions
                        // would otherwise stay on a node whose map is stale
                        // for as long as the cut lasts).
                        let readiness = d.get(node, "/readyz").unwrap_or_default();
                        assert!(readiness.starts_with("not ready"), "{node}: {readiness}");
                        failovers.push((node, "etcd cut", promoted, probe.first_ack()));
                        d.reconnect(node, &control);
                        all_in_sync(&d, node, "the node cut from etcd back in sync");
                        let deadline = Instant::now() + CLUSTER_WAIT;
                        while d.get(node, "/readyz").as_deref() != Some("ready\n") {
                            assert!(Instant::now() < deadline, "{node} ready again");
                            std::thread::sleep(Duration::from_millis(200));
                        }
                    }
                    Fault::Pause => {
                        docker(&["pause", &d.container(node)]);
                        probe.fire(t0, false);
                        let promoted = promoted_away(&d, node, Instant::now());
                        failovers.push((node, "paused", promoted, probe.first_ack()));
                        std::thread::sleep(paused_past);
                        docker(&["unpause", &d.container(node)]);
                        all_in_sync(&d, node, "the paused node back in sync");
                    }
                    Fault::KillWithEtcdLeader => {
                        let leader = etcd_leader(&d);
                        docker(&["kill", &d.container(node), &d.container(&leader)]);
                        probe.fire(t0, false);
                        let promoted = promoted_away(&d, node, Instant::now());
                        failovers.push((node, "with etcd's leader", promoted, probe.first_ack()));
                        docker(&["start", &d.container(&leader), &d.container(node)]);
                        all_in_sync(&d, node, "back in sync after etcd's new leader");
                    }
                    Fault::DiskLost => {
                        let volume = format!("{}_{node}", d.project);
                        docker(&["rm", "-f", &d.container(node)]);
                        probe.fire(t0, false);
                        docker(&["volume", "rm", &volume]);
                        let promoted = promoted_away(&d, node, Instant::now());
                        failovers.push((node, "disk lost", promoted, probe.first_ack()));
                        d.compose(&["up", "-d", "--no-build", node]);
                        all_in_sync(&d, node, "the node with a new disk rebuilt every copy");
                        lost_disk = Some(node);
                    }
                }
            });
        }
        for (node, how, promoted, first_ack) in &failovers {
            println!(
                "failover: {node} ({how}): its shards promoted after {} ms, the first send to one of its users acknowledged {} ms after the fault",
                promoted.as_millis(),
                first_ack.as_millis()
            );
        }
        copies_agree(&d, &NODES);
        let rebuilds = d.metric(
            lost_disk.expect("a disk was lost"),
            "courier_replication_rebuilds_total",
            "",
        );
        assert!(
            rebuilds >= SHARDS * 2 / 3,
            "the node with a new disk copied every shard it holds: {rebuilds}"
        );
        let promoted: u64 = NODES
            .iter()
            .map(|n| d.metric(n, "courier_replication_failovers_total", ""))
            .sum();
        assert!(promoted >= 7, "shards were promoted: {promoted}");

        // Copies move under load: a fourth node joins and takes its share
        // of copies (add, catch up, in sync, then one of the others
        // removed), then the node leading the fewest shards is drained
        // (each of its copies added elsewhere first, each shard it leads
        // switched to an in-sync copy) and stopped.
        let copies_of = |s: &Value, id: &str| {
            s["nodes"]
                .as_array()
                .and_then(|n| n.iter().find(|n| n["id"] == id))
                .and_then(|n| n["copies"].as_u64())
                .unwrap_or(0)
        };
        let settled = |s: &Value| {
            s["moves"].as_array().is_some_and(Vec::is_empty)
                && s["planned_moves"] == 0
                && s["shards_under_replicated"] == 0
        };
        under_load(&d, "a fourth node takes its copies", 17_000_000, || {
            let t0 = Instant::now();
            d.compose(&["up", "-d", "--no-build", "courier-4"]);
            let s = d.wait("courier-1", "courier-4 took its share of copies", |s| {
                copies_of(s, "courier-4") == SHARDS * 3 / 4 && settled(s)
            });
            println!(
                "join: courier-4 took {} copies in {} ms",
                SHARDS * 3 / 4,
                t0.elapsed().as_millis()
            );
            for n in NODES {
                assert_eq!(copies_of(&s, n), SHARDS * 3 / 4, "{n}: {s:#}");
            }
            // After the failovers one node may lead most shards: its
            // copies are primaries, so some of them switch to go.
            let switched: u64 = ["courier-1", "courier-2", "courier-3", "courier-4"]
                .iter()
                .map(|n| {
                    d.metric(
                        n,
                        "courier_replication_copy_changes_total",
                        "{change=\"lead\"}",
                    )
                })
                .sum();
            println!("join: {switched} primaries switched to in-sync copies on the way");
        });
        let s = d.wait("courier-1", "a status", |_| true);
        let left = NODES.into_iter().min_by_key(|n| shards_of(&s, n)).unwrap();
        under_load(&d, "a node's copies drained", 18_000_000, || {
            let t0 = Instant::now();
            let answer = d
                .admin("POST", "courier-1", &format!("/admin/cluster/drain/{left}"))
                .expect("courier-1 answers the drain");
            assert!(answer.contains("draining"), "{answer}");
            let s = d.wait("courier-1", &format!("{left} gave its copies away"), |s| {
                copies_of(s, left) == 0 && shards_of(s, left) == 0 && settled(s)
            });
            println!(
                "drain: {left} gave its copies away in {} ms",
                t0.elapsed().as_millis()
            );
            assert_eq!(s["shards_unavailable"], 0, "{s:#}");
        });
        d.compose(&["stop", "-t", "30", left]);
        let rest: Vec<&str> = ["courier-1", "courier-2", "courier-3", "courier-4"]
            .into_iter()
            .filter(|n| *n != left)
            .collect();
        let s = d.wait(rest[0], &format!("{left} gone"), |s| {
            state_of(s, left) == "absent"
        });
        assert_eq!(s["shards_unavailable"], 0, "{s:#}");
        assert_eq!(s["shards_under_replicated"], 0, "{s:#}");
        copies_agree(&d, &rest);
    }
}

/// How long each load runs; faults start [`FAULT_AFTER`] into it.
const LOAD_FOR: Duration = Duration::from_secs(15);
const FAULT_AFTER: Duration = Duration::from_secs(2);

/// Runs the load generator through HAProxy (one-to-one pairs whose users
/// HAProxy spreads over the nodes, each user reconnecting, retrying with
/// its ids and resuming when its session ends, as a phone does), injects
/// `fault` a moment in, and requires the checker's verdict clean (every
/// acknowledged message delivered, once, in its conversation's order) and
/// no send given up.
fn under_load(d: &Deployment, what: &str, first_user: u64, fault: impl FnOnce()) {
    under_load_at(d, what, first_user, FAULT_AFTER, fault)
}

/// [`under_load`] with the fault `after` that long into the load.
fn under_load_at(
    d: &Deployment,
    what: &str,
    first_user: u64,
    after: Duration,
    fault: impl FnOnce(),
) {
    let key = load_or_create_secret(&d.secret).unwrap();
    // A messenger's shape: everyone chats with a partner and in a group
    // of 8 (whose members are on all nodes: users are spread by hash).
    let opts = courier_loadtest::Options {
        scenario: courier_loadtest::Scenario::Mixed,
        group_sizes: vec![(8, 1)],
        users: 40,
        first_user,
        duration: LOAD_FOR,
        rate: Some(200.0),
        window: 4,
        resilient: true,
        ..courier_loadtest::Options::new(courier_loadtest::Target::Courier, d.clients_addr(), key)
    };
    let load = load_in_background(opts);
    std::thread::sleep(after);
    fault();
    let report = load
        .join()
        .expect("the load's thread")
        .unwrap_or_else(|e| panic!("{what}: the load did not run: {e:#}"));
    assert_load_held(what, &report);
}

/// The Kubernetes manifests (`deploy/k8s/`) are valid against the
/// Kubernetes API schema, strictly (no unknown fields), checked by
/// `kubernetes-validate` (PyPI; `scripts/test` installs it).
#[test]
fn the_kubernetes_manifests_follow_the_api_schema() {
    let Some(validator) = tool("kubernetes-validate", "PyPI package `kubernetes-validate`") else {
        return;
    };
    let dir = repo().join("deploy/k8s");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 2, "{files:?}");
    let out = Command::new(validator)
        .args(["--strict", "-k", "1.30.0"])
        .args(&files)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    for resource in [
        "statefulset/etcd",
        "statefulset/courier",
        "service/etcd",
        "service/courier",
        "service/courier-clients",
        "poddisruptionbudget/etcd",
        "poddisruptionbudget/courier",
    ] {
        assert!(
            text.contains(&format!("passed for resource {resource} ")),
            "{resource} not validated:\n{text}"
        );
    }
}

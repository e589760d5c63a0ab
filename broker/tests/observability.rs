//! Observability with the real tools operators use: a real Prometheus
//! server scrapes a real node under load and its HTTP API must report the
//! counts the load generator measured; `promtool` checks the exposition,
//! the alert rules and the scrape configurations; every query in the
//! Grafana dashboard and the alert rules names a metric the node exports;
//! the `courier admin` commands work against a running node and refuse
//! anyone without an admin token.
//!
//! Prometheus and promtool come from the Debian package `prometheus`
//! (`scripts/test` installs it). Run elsewhere without them, the tests that
//! need them say loudly that they skipped; with `TEST_REQUIRE_TOOLS=1`
//! (set by `scripts/test`) a missing tool fails the test instead.

mod common;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use courier_loadtest::Scenario;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Prometheus's programs, or a loud skip (`common::tool`).
fn tool(name: &str) -> Option<PathBuf> {
    common::tool(name, "Debian package `prometheus`")
}

/// Runs `promtool` with `args` (and `stdin`), requiring success.
fn promtool(promtool: &Path, args: &[&str], stdin: Option<&str>) -> String {
    let mut child = Command::new(promtool)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start promtool");
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
    }
    drop(child.stdin.take());
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?} failed:\n{text}");
    text
}

/// One GET against Prometheus's HTTP API; the parsed JSON answer.
fn prometheus_get(addr: &str, path_and_query: &str) -> Option<serde_json::Value> {
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path_and_query} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n"
    )
    .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    // The API answers with a fixed length or chunked; take the JSON object.
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        let start = body.find('{')?;
        let end = body.rfind('}')?;
        &body[start..=end]
    } else {
        body
    };
    serde_json::from_str(body).ok()
}

/// The value of an instant query's single sample, if there is one.
fn query(addr: &str, promql: &str) -> Option<f64> {
    let q: String = promql
        .bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect();
    let v = prometheus_get(addr, &format!("/api/v1/query?query={q}"))?;
    let result = v["data"]["result"].as_array()?;
    if result.len() != 1 {
        return None;
    }
    result[0]["value"][1].as_str()?.parse().ok()
}

struct Prometheus {
    child: Child,
    addr: String,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    /// Starts Prometheus scraping `target` every second, with the alert
    /// rules from deploy/ loaded.
    fn start(bin: &Path, target: &str) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        std::fs::copy(
            repo().join("deploy/prometheus/alerts.yml"),
            dir.path().join("alerts.yml"),
        )
        .unwrap();
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                 rule_files:\n  - alerts.yml\n\
                 scrape_configs:\n  - job_name: courier\n    static_configs:\n      - targets: [\"{target}\"]\n"
            ),
        )
        .unwrap();
        let addr = format!("127.0.0.1:{}", free_port());
        let child = Command::new(bin)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start prometheus");
        let deadline = Instant::now() + Duration::from_secs(60);
        while prometheus_get(&addr, "/api/v1/status/buildinfo").is_none() {
            assert!(Instant::now() < deadline, "prometheus did not start");
            std::thread::sleep(Duration::from_millis(200));
        }
        Prometheus {
            child,
            addr,
            _dir: dir,
        }
    }
}

/// Waits (bounded) until `promql` evaluates to `want` on the Prometheus at
/// `addr`; returns the last value.
fn wait_for(addr: &str, promql: &str, want: f64) -> Option<f64> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let v = query(addr, promql);
        if v == Some(want) || Instant::now() > deadline {
            return v;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A real Prometheus scrapes a node while the load generator runs
/// one-to-one and group traffic; its API must report exactly the sends the
/// generator had acknowledged, and the deploy/ alert rules load cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_the_counts_the_load_sent() {
    let (Some(prometheus), Some(promtool_bin)) = (tool("prometheus"), tool("promtool")) else {
        return;
    };
    let server = Server::start(&[]);
    let prom = Prometheus::start(&prometheus, &server.admin);
    let mut acked = 0;
    let mut group_acked = 0;
    for (i, (scenario, size)) in [(Scenario::OneToOne, 2), (Scenario::Group, 5)]
        .into_iter()
        .enumerate()
    {
        let report = server
            .short_load(scenario, vec![(size, 1)], 100_000 * (i as u64 + 1), 1000.0)
            .await;
        assert!(report.verdict.ok(), "{}", report.summary());
        assert_eq!(report.acked, report.sent, "{}", report.summary());
        acked += report.acked;
        if scenario == Scenario::Group {
            group_acked = report.acked;
        }
    }
    assert!(acked > 1000);
    // The generator's readers acknowledge as phones do, so the node also
    // wrote receipts: as facts for the senders, who ask for them.
    let facts = server.metric("courier_receipt_facts_total").await;
    assert!(facts > 0);
    // Stored receipt messages (broadcast copies' receipts) count among
    // the stored messages below.
    let receipts = server.metric("courier_receipts_stored_total").await;
    // Every session was closed by its client: 20 + 20 of the runs, and the
    // set-up sessions of the 4 group creators.
    let sessions = 20 + 20 + 4;

    let addr = prom.addr.clone();
    let checks = tokio::task::spawn_blocking(move || {
        let got = (
            wait_for(&addr, "up{job=\"courier\"}", 1.0),
            wait_for(&addr, "sum(courier_messages_accepted_total)", acked as f64),
            wait_for(
                &addr,
                "sum(courier_frames_in_total{type=\"send\"})",
                acked as f64,
            ),
            wait_for(
                &addr,
                "sum(courier_group_messages_total)",
                group_acked as f64,
            ),
            wait_for(&addr, "sum(courier_messages_rejected_total)", 0.0),
            wait_for(
                &addr,
                "sum(courier_connections_closed_total{reason=\"client_closed\"})",
                sessions as f64,
            ),
            wait_for(
                &addr,
                "courier_accept_to_durable_seconds_count",
                (acked + receipts) as f64,
            ),
        );
        let rules = prometheus_get(&addr, "/api/v1/rules").unwrap();
        (got, rules)
    })
    .await
    .unwrap();
    let (got, rules) = checks;
    assert_eq!(got.0, Some(1.0), "the node is up for Prometheus");
    assert_eq!(got.1, Some(acked as f64), "messages accepted");
    assert_eq!(got.2, Some(acked as f64), "send frames in");
    assert_eq!(got.3, Some(group_acked as f64), "group messages");
    assert_eq!(got.4, Some(0.0), "nothing rejected");
    assert_eq!(
        got.5,
        Some(sessions as f64),
        "sessions closed by their clients"
    );
    assert_eq!(
        got.6,
        Some((acked + receipts) as f64),
        "one durable latency per message and per receipt"
    );

    // The alert rules from deploy/ loaded and evaluate without errors.
    let groups = rules["data"]["groups"].as_array().unwrap();
    let loaded: Vec<&serde_json::Value> = groups
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap())
        .collect();
    assert!(loaded.len() >= 9, "{rules}");
    for r in &loaded {
        assert_ne!(r["health"], "err", "rule failed to evaluate: {r}");
    }

    // The exposition itself passes promtool's lint.
    let (_, body) = server.admin_get("/metrics").await;
    promtool(&promtool_bin, &["check", "metrics"], Some(&body));
}

#[test]
fn alert_rules_and_scrape_configs_pass_promtool() {
    let Some(promtool_bin) = tool("promtool") else {
        return;
    };
    let deploy = repo().join("deploy/prometheus");
    let out = promtool(
        &promtool_bin,
        &[
            "check",
            "rules",
            deploy.join("alerts.yml").to_str().unwrap(),
        ],
        None,
    );
    assert!(out.contains("SUCCESS"), "{out}");
    for config in ["prometheus.yml", "compose.yml"] {
        promtool(
            &promtool_bin,
            &["check", "config", deploy.join(config).to_str().unwrap()],
            None,
        );
    }
}

/// `courier_...` names used in `text` (PromQL or anything else).
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("courier_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.insert(tail[..end].to_string());
        rest = &tail[end..];
    }
    names
}

/// The metric families a node exports (histograms also as their series).
fn exported(body: &str) -> BTreeSet<String> {
    let mut families = BTreeSet::new();
    for line in body.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split(' ');
            let (name, kind) = (parts.next().unwrap(), parts.next().unwrap());
            families.insert(name.to_string());
            if kind == "histogram" {
                for s in ["_bucket", "_sum", "_count"] {
                    families.insert(format!("{name}{s}"));
                }
            }
        }
    }
    families
}

/// Every query of the dashboard and every alert names a metric a freshly
/// started node already exports (no metric appears only after traffic).
#[tokio::test]
async fn dashboard_and_alerts_name_only_exported_metrics() {
    let server = Server::start(&[]);
    let (status, body) = server.admin_get("/metrics").await;
    assert_eq!(status, 200);
    let exported = exported(&body);
    assert!(exported.len() > 30, "{exported:?}");

    let text =
        std::fs::read_to_string(repo().join("deploy/grafana/courier-dashboard.json")).unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
    let panels = dashboard["panels"].as_array().expect("panels");
    assert!(panels.len() >= 20);
    let mut exprs = Vec::new();
    for p in panels {
        let targets = p["targets"].as_array().expect("every panel has queries");
        assert!(!targets.is_empty(), "panel {} has no query", p["title"]);
        for t in targets {
            exprs.push(t["expr"].as_str().expect("expr").to_string());
        }
    }
    let mut used = BTreeSet::new();
    for e in &exprs {
        used.extend(metric_names(e));
    }
    let alerts = std::fs::read_to_string(repo().join("deploy/prometheus/alerts.yml")).unwrap();
    used.extend(metric_names(&alerts));
    let missing: Vec<_> = used.difference(&exported).collect();
    assert!(
        missing.is_empty(),
        "queries name metrics the node does not export: {missing:?}"
    );
    // And the dashboard covers what operators run by.
    for needed in [
        "courier_connections_open",
        "courier_messages_accepted_total",
        "courier_accept_to_durable_seconds_bucket",
        "courier_accept_to_push_seconds_bucket",
        "courier_rocksdb_write_stopped",
        "courier_slow_consumer_demotions_total",
    ] {
        assert!(used.contains(needed), "the dashboard lacks {needed}");
    }
}

fn courier(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_courier"))
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `courier admin` against a running node: stats, a user's inbox, a
/// group, and drain; refused without an admin token, with a user's token,
/// and with a forged one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_commands_work_and_need_an_admin_token() {
    let mut server = Server::start(&[]);
    let dir = server.data_dir.display().to_string();
    let admin = server.admin.clone();
    let (alice, _) = server.client(1).await;
    let (bob, _) = server.client(2).await;
    send_numbered(&alice, 2, 1..=3).await;
    let group = alice.create_group(vec![2]).await.unwrap().group;
    assert_eq!(bob.recv_timeout(WAIT).await.unwrap().seq, 1);

    // `courier admin` with a token minted from the node's secret.
    let admin_cmd = |args: &[&str]| {
        let mut all = vec!["admin", "--admin-addr", &admin, "--data-dir", &dir];
        all.extend_from_slice(args);
        courier(&all)
    };
    let json = |args: &[&str]| -> serde_json::Value {
        let (ok, out, err) = admin_cmd(args);
        assert!(ok, "courier {args:?}: {err}");
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
    };
    let stats = json(&["stats"]);
    assert_eq!(stats["connections_open"], 2, "{stats}");
    assert_eq!(stats["messages_accepted"], 3, "{stats}");
    assert_eq!(stats["ready"], true);
    assert_eq!(stats["shards"].as_array().unwrap().len(), 2, "{stats}");
    assert!(stats["storage"]["sst_bytes"].is_u64(), "{stats}");

    let user = json(&["user", "2"]);
    assert_eq!(user["user"], 2);
    // Three messages and the group's creation event (by reference).
    assert_eq!(user["head_seq"], 4, "{user}");

    let g = json(&["group", &group.to_string()]);
    let members: Vec<u64> = g["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["user"].as_u64().unwrap())
        .collect();
    assert_eq!(members, vec![1, 2], "{g}");
    assert_eq!(g["members"][0]["role"], "admin", "{g}");

    // No token, a user's token, a forged token: refused, nothing done.
    let (status, body) = server.admin_get("/admin/stats").await;
    assert_eq!(status, 401, "{body}");
    let user_token = server.token(1, 1, u64::MAX / 2);
    for (token, why) in [
        (user_token.as_str(), "a user's token"),
        ("forged", "a forged token"),
    ] {
        let (ok, _, err) = courier(&["admin", "--admin-addr", &admin, "--token", token, "drain"]);
        assert!(!ok, "{why} was accepted");
        assert!(err.contains("403"), "{why}: {err}");
    }
    assert_eq!(server.admin_get("/readyz").await.0, 200, "still serving");

    // An unknown group, a user id that is not one.
    let (ok, out, _) = admin_cmd(&["group", "9223372036854775809"]);
    assert!(!ok && out.contains("no such group"), "{out}");
    let (ok, out, _) = admin_cmd(&["user", "0"]);
    assert!(!ok && out.contains("user id"), "{out}");

    // Drain: the node says goodbye to its sessions and exits cleanly.
    let drained = json(&["drain"]);
    assert_eq!(drained["draining"], true);
    let closed = alice.closed().await;
    assert_eq!(
        closed.map(|r| r.code),
        Some(courier_protocol::ErrorCode::SHUTTING_DOWN)
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = server.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "the node did not exit after drain"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status}");
}

/// Connection metrics by reason: a bad token and an unknown frame type
/// each count once, under their own label.
#[tokio::test]
async fn refused_handshakes_are_counted_by_reason() {
    let server = Server::start(&[]);
    let mut config = server.config(5);
    config.token = server.token(6, 1, u64::MAX / 2); // another user's token
    assert!(courier_client::Client::connect(config).await.is_err());
    let mut config = server.config(5);
    config.token = "not-a-token".into();
    assert!(courier_client::Client::connect(config).await.is_err());
    let (c, _) = server.client(7).await;
    c.ping().await.unwrap();
    // A refused connection is counted once its goodbye is written and the
    // socket closed, which may come after the client has read the goodbye:
    // wait (bounded) for each count, then check it is exact.
    for (name, n) in [
        ("courier_auth_failures_total{reason=\"wrong_identity\"}", 1),
        ("courier_auth_failures_total{reason=\"bad_token\"}", 1),
        (
            "courier_connections_closed_total{reason=\"auth_failed\"}",
            2,
        ),
    ] {
        server.wait_for_metric(name, n).await;
        assert_eq!(server.metric(name).await, n, "{name}");
    }
    assert_eq!(server.metric("courier_connections_open").await, 1);
    assert_eq!(
        server
            .metric("courier_frames_in_total{type=\"ping\"}")
            .await,
        1
    );
    // A session that ends is no longer counted.
    drop(c);
    server
        .wait_metric(
            "courier_connections_open",
            "0 once the session closed",
            |n| n == 0,
        )
        .await;
}

/// A bad log filter or format stops `courier serve` before it opens
/// anything, naming what is wrong.
#[test]
fn bad_log_settings_are_refused_with_their_name() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().display().to_string();
    let serve = [
        "serve",
        "--data-dir",
        &data,
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
    ];
    let (ok, _, err) = courier(&[&serve[..], &["--log", "info,x=["]].concat());
    assert!(!ok && err.contains("bad log filter"), "{err}");
    let (ok, _, err) = courier(&[&serve[..], &["--log-format", "xml"]].concat());
    assert!(!ok && err.contains("--log-format"), "{err}");
    assert!(!dir.path().join("db").exists(), "nothing was opened");
}

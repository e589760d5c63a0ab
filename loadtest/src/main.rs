//! `courier-loadtest`: runs a scenario against a Courier node, prints a
//! progress line each second and a summary at the end, and exits non-zero
//! if any acknowledged message was lost, duplicated or reordered.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use courier_loadtest::server::ServerProcess;
use courier_loadtest::{run, Options, Scenario, Target};
use courier_protocol::token::TokenKey;

type GroupSizes = Vec<(usize, u32)>;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(version, about = "Courier's load generator")]
struct Args {
    /// Serve the bare relay on this address instead of generating load
    /// (run it in its own process, then `--target relay --addr ...`).
    #[arg(long)]
    serve_relay: Option<String>,
    /// Print the side-by-side Markdown table of these JSON reports and exit.
    #[arg(long, num_args = 1..)]
    table: Vec<PathBuf>,
    /// What to measure.
    #[arg(long, value_enum, default_value = "courier")]
    target: Target,
    /// What the simulated users do.
    #[arg(long, value_enum, default_value = "one-to-one")]
    scenario: Scenario,
    /// The node's client address; for a Courier cluster, several nodes'
    /// comma-separated (users are spread over them evenly).
    #[arg(long, default_value = "127.0.0.1:7700")]
    addr: String,
    /// The node's data directory (its `secret.key` mints the users' tokens).
    #[arg(long, default_value = "./courier-data", conflicts_with = "secret_file")]
    data_dir: PathBuf,
    /// The node's secret file, instead of `--data-dir`.
    #[arg(long)]
    secret_file: Option<PathBuf>,
    /// Simulated users, one connection each (the idle scenario's
    /// connections; 100,000 and more are spread over loopback source
    /// addresses automatically).
    #[arg(long, visible_alias = "connections", default_value_t = 100)]
    users: u64,
    /// The first user id; runs with different ranges do not see each other.
    #[arg(long, default_value_t = 1_000_000)]
    first_user: u64,
    /// Seconds of sending.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Payload bytes per message.
    #[arg(long, default_value_t = 100)]
    size: usize,
    /// Open loop: messages per second offered in total (omit for closed loop).
    #[arg(long)]
    rate: Option<f64>,
    /// Open loop at half the acknowledged rate of this earlier (closed-loop)
    /// JSON report: the "latency at half of peak" measurement.
    #[arg(long, conflicts_with = "rate")]
    half_of: Option<PathBuf>,
    /// Sends in flight per sender.
    #[arg(long, default_value_t = 16)]
    window: usize,
    /// Group sizes: `50`, or sizes with weights such as `8x7,50x2,1024x1`
    /// (seven groups of 8 for every two of 50 and one of 1,024). The
    /// broadcast scenario's list size is the first size.
    #[arg(long, default_value = "50", value_parser = courier_loadtest::options::parse_group_sizes)]
    group_size: GroupSizes,
    /// Reconnect scenario: seconds a session lives on average (jittered ±50%).
    #[arg(long, default_value_t = 2.0)]
    reconnect_every: f64,
    /// Kill the server with SIGKILL every this many seconds while sending,
    /// restart it, and still require zero loss (needs --server-cmd).
    #[arg(long, requires = "server_cmd")]
    chaos_kill: Option<f64>,
    /// Users reconnect (to the next address given), retry and resume when
    /// a session ends, as under --chaos-kill: for runs against a cluster
    /// whose nodes are killed or cut off from outside.
    #[arg(long)]
    resilient: bool,
    /// Start the server under test with this command (program and
    /// arguments, split on spaces; no shell) and stop it at the end. Its
    /// memory is sampled, and --chaos-kill restarts it.
    #[arg(long, conflicts_with = "server_pid")]
    server_cmd: Option<String>,
    /// The pid of a running server under test, to sample its memory.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Local addresses to connect from, comma separated (default: one
    /// address, or 127.0.0.1, 127.0.0.2, ... for more than 20,000
    /// connections to a loopback server).
    #[arg(long, value_delimiter = ',')]
    source_addrs: Vec<std::net::IpAddr>,
    /// Speak TLS to a Courier target that serves it, trusting the CA
    /// certificates in this PEM file.
    #[arg(long)]
    tls_ca: Option<PathBuf>,
    /// The name the node's certificate carries (with --tls-ca).
    #[arg(long, default_value = "localhost")]
    tls_name: String,
    /// How receivers acknowledge: each batch they read (as a phone does;
    /// the senders' delivered receipts flow) or lazily, every 256
    /// deliveries (the old generator's way, for comparison).
    #[arg(long, value_enum, default_value = "each-batch")]
    acks: courier_loadtest::Acks,
    /// How Courier senders take their one-to-one receipts: as facts (per
    /// reader, the highest sequence delivered and read) or as receipt
    /// messages in their inbox (the old way, for comparison).
    #[arg(long, value_enum, default_value = "facts")]
    receipts: courier_loadtest::Receipts,
    /// Share of read batches a user opens (marks read), 0 to 1.
    #[arg(long, default_value_t = 0.25)]
    read_share: f64,
    /// Milliseconds between receiving a batch and opening it.
    #[arg(long, default_value_t = 200)]
    read_delay_ms: u64,
    /// Threads for Courier and relay users, each with its own runtime
    /// (0: one per core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// The node's admin address (e.g. 127.0.0.1:7701): its stage
    /// histograms are read before and after the run and reported. A
    /// cluster's nodes: comma-separated, added together.
    #[arg(long)]
    metrics: Option<String>,
    /// Write every figure as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// The run's name in `--table` (e.g. "Courier (epoll)"); the target's by default.
    #[arg(long)]
    label: Option<String>,
    /// Write an SVG report (throughput and latency over time, percentiles).
    #[arg(long)]
    report: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    if !a.table.is_empty() {
        let mut reports = Vec::new();
        for p in &a.table {
            let text = std::fs::read(p).with_context(|| format!("reading {}", p.display()))?;
            reports.push(
                serde_json::from_slice(&text)
                    .with_context(|| format!("parsing {}", p.display()))?,
            );
        }
        print!("{}", courier_loadtest::table::markdown(&reports));
        return Ok(());
    }
    if let Some(addr) = &a.serve_relay {
        let local = courier_loadtest::relay::start(addr, Default::default()).await?;
        eprintln!("relay listening on {local}");
        std::future::pending::<()>().await;
    }
    // A server started here first: it creates the secret the tokens need.
    let server = match (&a.server_cmd, a.server_pid) {
        (Some(cmd), _) => {
            let words = cmd.split_whitespace().map(String::from).collect();
            let addr = a.addr.clone();
            let s =
                tokio::task::spawn_blocking(move || ServerProcess::start(words, &addr)).await??;
            Some(Arc::new(s))
        }
        (None, Some(pid)) => Some(Arc::new(ServerProcess::existing(pid, &a.addr))),
        (None, None) => None,
    };
    let key = match a.target {
        // Only Courier checks tokens; for the others any key will do.
        Target::Relay | Target::Nats | Target::Jetstream | Target::Redis | Target::Mqtt => {
            TokenKey::new(vec![0; 32])
        }
        Target::Courier => {
            let secret_path = a
                .secret_file
                .clone()
                .unwrap_or_else(|| a.data_dir.join("secret.key"));
            let text = std::fs::read_to_string(&secret_path)
                .with_context(|| format!("reading the node's secret {}", secret_path.display()))?;
            TokenKey::from_hex(&text)
                .with_context(|| format!("{} is not a node secret", secret_path.display()))?
        }
    };
    let rate = match &a.half_of {
        Some(p) => {
            let text = std::fs::read(p).with_context(|| format!("reading {}", p.display()))?;
            let peak: courier_loadtest::Report = serde_json::from_slice(&text)
                .with_context(|| format!("parsing {}", p.display()))?;
            Some((peak.acked_per_s / 2.0).max(1.0).round())
        }
        None => a.rate,
    };
    let source_addrs = if a.source_addrs.is_empty() {
        let first = a.addr.split(',').next().unwrap_or(&a.addr).trim();
        courier_loadtest::fds::auto_sources(first, a.users)
    } else {
        a.source_addrs
    };
    let tls = match &a.tls_ca {
        Some(ca) => Some(
            courier_client::ClientTls::from_files(ca, a.tls_name.clone(), None)
                .with_context(|| format!("TLS with the CAs in {}", ca.display()))?,
        ),
        None => None,
    };
    anyhow::ensure!(
        tls.is_none() || a.target == Target::Courier,
        "--tls-ca is for a Courier target"
    );
    let report = run(Options {
        tls,
        scenario: a.scenario,
        users: a.users,
        first_user: a.first_user,
        duration: Duration::from_secs(a.duration),
        size: a.size,
        rate,
        window: a.window,
        group_sizes: a.group_size,
        reconnect_every: Duration::from_secs_f64(a.reconnect_every),
        chaos_kill: a.chaos_kill.map(Duration::from_secs_f64),
        resilient: a.resilient,
        server,
        source_addrs,
        progress: true,
        acks: a.acks,
        receipts: a.receipts,
        read_share: a.read_share,
        read_delay: Duration::from_millis(a.read_delay_ms),
        threads: a.threads,
        metrics: a.metrics,
        ..Options::new(a.target, a.addr, key)
    })
    .await?;
    let report = courier_loadtest::Report {
        label: a.label,
        ..report
    };
    print!("{}", report.summary());
    if let Some(path) = a.json {
        std::fs::write(&path, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = a.report {
        std::fs::write(&path, courier_loadtest::svg::render(&report))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if !report.verdict.ok() {
        std::process::exit(1);
    }
    Ok(())
}

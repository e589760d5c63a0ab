//! `courier-loadtest`: runs a scenario against a Courier node, prints a
//! progress line each second and a summary at the end, and exits non-zero
//! if any acknowledged message was lost, duplicated or reordered.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use courier_loadtest::{run, Options, Scenario, Target};
use courier_protocol::token::TokenKey;

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
    /// The node's client address.
    #[arg(long, default_value = "127.0.0.1:7700")]
    addr: String,
    /// The node's data directory (its `secret.key` mints the users' tokens).
    #[arg(long, default_value = "./courier-data", conflicts_with = "secret_file")]
    data_dir: PathBuf,
    /// The node's secret file, instead of `--data-dir`.
    #[arg(long)]
    secret_file: Option<PathBuf>,
    /// Simulated users, one connection each.
    #[arg(long, default_value_t = 100)]
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
    /// Members per group (group scenario).
    #[arg(long, default_value_t = 50)]
    group_size: usize,
    /// Write every figure as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
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
    let report = run(Options {
        target: a.target,
        addr: a.addr,
        key,
        scenario: a.scenario,
        users: a.users,
        first_user: a.first_user,
        duration: Duration::from_secs(a.duration),
        size: a.size,
        rate,
        window: a.window,
        group_size: a.group_size,
        progress: true,
    })
    .await?;
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

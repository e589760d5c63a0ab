//! What a run reports: its figures, its timeline, the checker's verdict,
//! and the summary printed at the end.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::checker::Verdict;
use crate::latency::{percentile_curve, Percentiles, Second};
use crate::options::{Options, Scenario, Target};
use crate::tally::Shared;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Report {
    pub target: Target,
    pub scenario: Scenario,
    pub users: u64,
    pub size: usize,
    pub duration_s: f64,
    pub mode: String,
    pub sent: u64,
    pub acked: u64,
    pub delivered: u64,
    pub errors: BTreeMap<String, u64>,
    pub acked_per_s: f64,
    pub delivered_per_s: f64,
    pub end_to_end: Percentiles,
    pub send_to_ack: Percentiles,
    pub end_to_end_curve: Vec<(f64, u64)>,
    pub timeline: Vec<Second>,
    pub verdict: Verdict,
    /// Sessions re-established (reconnect scenario, chaos kills).
    #[serde(default)]
    pub reconnects: u64,
    /// Sends refused `SHARD_UNAVAILABLE` (their shard's node out of reach)
    /// and sent again with the same id.
    #[serde(default)]
    pub retried: u64,
    /// Deliveries seen again after a resume and dropped by sequence, as a
    /// client does (not duplicates: the same stored message twice).
    #[serde(default)]
    pub redelivered: u64,
    /// Sends not answered within 30 s on a live session (then retried on
    /// a new one): the server owes every send an answer, so 0 is right.
    #[serde(default)]
    pub unanswered: u64,
    /// Sends the generator gave up unacknowledged: still refused or
    /// unanswered 30 s after the sending time, or left when the run
    /// stopped waiting for its senders. A server that recovers from its
    /// faults leaves 0.
    #[serde(default)]
    pub abandoned: u64,
    /// Times the server was killed and restarted.
    #[serde(default)]
    pub kills: u64,
    /// The idle scenario's figures.
    #[serde(default)]
    pub idle: Option<IdleReport>,
    /// The name of this run in tables (`--label`); the target's otherwise.
    #[serde(default)]
    pub label: Option<String>,
    /// How receivers acknowledged (absent in reports from before the
    /// generator acknowledged like a phone: those were lazy).
    #[serde(default)]
    pub acks: Option<crate::options::Acks>,
    /// How a Courier target's senders took their receipts (absent in
    /// reports from before facts: those were messages).
    #[serde(default)]
    pub receipts_as: Option<crate::options::Receipts>,
    /// Share of read batches marked read.
    #[serde(default)]
    pub read_share: f64,
    /// Receipt items (one message's delivered or read) the senders got.
    #[serde(default)]
    pub receipts: u64,
    /// The generator's own CPU while sending, in cores (CPU seconds per
    /// second; includes the relay when it runs in this process).
    #[serde(default)]
    pub generator_cpu: Option<f64>,
    /// The node's stages over the run (with `--metrics`).
    #[serde(default)]
    pub stages: Vec<crate::stages::Stage>,
}

/// The idle scenario's figures.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct IdleReport {
    /// Sessions established (and then held).
    pub connections: u64,
    /// Connection attempts that failed, and the first failure's reason
    /// (for example the open-file limit or the server's connection limit).
    pub failed: u64,
    pub first_failure: Option<String>,
    pub connect_s: f64,
    pub connects_per_s: f64,
    pub held_s: f64,
    /// The keepalive interval the server asked for.
    pub keepalive_ms: u32,
    /// Sessions that answered a ping after the hold.
    pub alive_at_end: u64,
    pub server_rss_before: Option<u64>,
    pub server_rss_after: Option<u64>,
    /// (server after - before) / connections.
    pub server_bytes_per_connection: Option<f64>,
    pub generator_bytes_per_connection: f64,
}

pub(crate) fn report(
    opts: &Options,
    shared: &Shared,
    send_end: Duration,
    ack_h: &Histogram<u64>,
    e2e_h: &Histogram<u64>,
    verdict: Verdict,
) -> Report {
    let secs = send_end.as_secs_f64().max(1e-9);
    let timeline = shared
        .seconds
        .lock()
        .expect("seconds")
        .iter()
        .enumerate()
        .map(|(t, s)| Second {
            t_s: t as u64,
            sent: s.0,
            acked: s.1,
            delivered: s.2,
            e2e_p99_us: if s.3.is_empty() {
                0
            } else {
                s.3.value_at_quantile(0.99)
            },
        })
        .collect();
    let errors = shared.errors.lock().expect("errors").clone();
    let acked = shared.acked.load(Ordering::Relaxed);
    let delivered = shared.delivered.load(Ordering::Relaxed);
    Report {
        target: opts.target,
        scenario: opts.scenario,
        users: opts.users,
        size: opts.size,
        duration_s: secs,
        mode: match opts.rate {
            Some(r) => format!("open loop, {r} msg/s offered"),
            None => format!("closed loop, {} in flight per sender", opts.window),
        },
        sent: shared.sent.load(Ordering::Relaxed),
        acked,
        delivered,
        errors,
        acked_per_s: acked as f64 / secs,
        // Over the time deliveries took, which may outlast the sending (a
        // server that queues shows it here and in the latencies).
        delivered_per_s: delivered as f64
            / (shared.last_delivery_ns.load(Ordering::Relaxed) as f64 / 1e9).max(secs),
        end_to_end: Percentiles::of(e2e_h),
        send_to_ack: Percentiles::of(ack_h),
        end_to_end_curve: percentile_curve(e2e_h),
        timeline,
        verdict,
        reconnects: shared.reconnects.load(Ordering::Relaxed),
        retried: shared.retried.load(Ordering::Relaxed),
        redelivered: shared.redelivered.load(Ordering::Relaxed),
        unanswered: shared.unanswered.load(Ordering::Relaxed),
        abandoned: shared.abandoned.load(Ordering::Relaxed),
        kills: 0,
        idle: None,
        label: None,
        acks: matches!(opts.target, Target::Courier | Target::Relay).then_some(opts.acks),
        receipts_as: (opts.target == Target::Courier).then_some(opts.receipts),
        read_share: if opts.target == Target::Courier {
            opts.read_share
        } else {
            0.0
        },
        receipts: 0,
        generator_cpu: None,
        stages: Vec::new(),
    }
}

impl Report {
    /// The human summary printed at the end of a run.
    pub fn summary(&self) -> String {
        let p = |x: &Percentiles| {
            format!(
                "p50 {} us, p90 {} us, p99 {} us, p99.9 {} us, max {} us ({} samples)",
                x.p50_us, x.p90_us, x.p99_us, x.p999_us, x.max_us, x.count
            )
        };
        let v = &self.verdict;
        let mut s = format!(
            "scenario {:?}, {} users, {} B messages, {}, {:.1} s\n\
             sent {}  acked {} ({:.0}/s)  delivered {} ({:.0}/s)\n\
             end to end: {}\n\
             send to ack: {}\n\
             errors: {:?}\n\
             correctness: {} acknowledged, {} deliveries expected, {} lost, {} duplicated, {} reordered: {}\n",
            self.scenario,
            self.users,
            self.size,
            self.mode,
            self.duration_s,
            self.sent,
            self.acked,
            self.acked_per_s,
            self.delivered,
            self.delivered_per_s,
            p(&self.end_to_end),
            p(&self.send_to_ack),
            self.errors,
            v.acknowledged,
            v.expected_deliveries,
            v.lost,
            v.duplicates,
            v.reordered,
            if v.ok() { "OK" } else { "FAILED" }
        );
        if v.receipts_owed > 0 {
            s.push_str(&format!(
                "receipts: {} items received for {} messages that owed them; {} missing, {} duplicated, {} unexpected\n",
                self.receipts,
                v.receipts_owed,
                v.receipts_missing,
                v.receipts_duplicated,
                v.receipts_unexpected
            ));
        }
        if let Some(cpu) = self.generator_cpu {
            s.push_str(&format!(
                "generator: {:.0}% of a core while sending{}\n",
                cpu * 100.0,
                match self.acks {
                    Some(crate::options::Acks::Lazy) => ", lazy acks (every 256 deliveries)",
                    Some(crate::options::Acks::EachBatch) => ", acks each batch read",
                    None => "",
                }
            ));
        }
        for e in &v.examples {
            s.push_str(&format!("  {e:?}\n"));
        }
        for (recipient, missing) in &v.inbox_gaps {
            s.push_str(&format!(
                "  recipient {recipient}: inbox entries never delivered between its first and last delivery: {missing:?}\n"
            ));
        }
        if self.reconnects
            + self.kills
            + self.redelivered
            + self.retried
            + self.unanswered
            + self.abandoned
            > 0
        {
            s.push_str(&format!(
                "resilience: {} reconnects, {} server kills, {} sends retried after SHARD_UNAVAILABLE, {} redeliveries after resume dropped by sequence, {} sends unanswered for 30 s, {} sends abandoned unacknowledged\n",
                self.reconnects, self.kills, self.retried, self.redelivered, self.unanswered, self.abandoned
            ));
        }
        if let Some(i) = &self.idle {
            let mib = |b: Option<u64>| {
                b.map(|b| format!("{:.1} MiB", b as f64 / (1 << 20) as f64))
                    .unwrap_or_else(|| "unknown (no --server-pid)".into())
            };
            s.push_str(&format!(
                "idle: {} sessions open ({} failed{}), opened in {:.1} s ({:.0}/s), held {:.1} s \
                 with {} ms keepalives, {} answered at the end\n\
                 server memory: {} before, {} after: {} per connection; generator: {:.0} B per connection\n",
                i.connections,
                i.failed,
                i.first_failure
                    .as_ref()
                    .map(|f| format!(", first: {f}"))
                    .unwrap_or_default(),
                i.connect_s,
                i.connects_per_s,
                i.held_s,
                i.keepalive_ms,
                i.alive_at_end,
                mib(i.server_rss_before),
                mib(i.server_rss_after),
                i.server_bytes_per_connection
                    .map(|b| format!("{b:.0} B"))
                    .unwrap_or_else(|| "unknown".into()),
                i.generator_bytes_per_connection,
            ));
        }
        s
    }
}

//! Where the time goes inside the node: its stage histograms, read from its
//! Prometheus endpoint before and after the run, give each stage's count,
//! mean and percentiles over the run alone (the difference of the two
//! readings). With the generator's own send-to-ack and end-to-end figures
//! they split a message's latency into the session's read and the shard's
//! queue, the storage write and sync, the push to the recipient's session,
//! and the rest (the recipient's socket, the generator).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The node's stage histograms, in the order a message passes them.
pub const STAGES: &[(&str, &str)] = &[
    (
        "accept to durable (shard queue, write, sync)",
        "courier_accept_to_durable_seconds",
    ),
    (
        "storage write incl. sync (per batch)",
        "courier_storage_write_seconds",
    ),
    (
        "accept to push queued (durable, then handed to the session)",
        "courier_accept_to_push_seconds",
    ),
    (
        "a send across nodes, at the sender's node (link both ways, the owner's queue, write, sync)",
        "courier_cluster_remote_send_seconds",
    ),
];

/// One stage over the run.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Stage {
    pub name: String,
    pub count: u64,
    pub mean_us: f64,
    pub p50_us: f64,
    pub p99_us: f64,
}

/// Reads `http://addr/metrics` (the node's admin port); bounded.
pub fn scrape(addr: &str) -> std::io::Result<String> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.set_write_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET /metrics HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut body = String::new();
    s.take(64 << 20).read_to_string(&mut body)?;
    match body.split_once("\r\n\r\n") {
        Some((head, rest)) if head.starts_with("HTTP/1.") && head.contains(" 200 ") => {
            Ok(rest.to_string())
        }
        _ => Err(std::io::Error::other(
            "the metrics endpoint did not answer 200",
        )),
    }
}

/// A histogram as read: cumulative counts by upper bound, sum, count
/// (every label set of the name added together).
#[derive(Clone, Debug, Default, PartialEq)]
struct Histogram {
    buckets: Vec<(f64, f64)>,
    sum: f64,
    count: f64,
}

fn histogram(text: &str, name: &str) -> Histogram {
    let mut h = Histogram::default();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((key, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        let (metric, labels) = key.split_once('{').unwrap_or((key, ""));
        if metric == format!("{name}_sum") {
            h.sum += value;
        } else if metric == format!("{name}_count") {
            h.count += value;
        } else if metric == format!("{name}_bucket") {
            let Some(le) = labels
                .split(',')
                .find_map(|l| l.trim_end_matches('}').strip_prefix("le=\""))
                .map(|l| l.trim_end_matches('"'))
            else {
                continue;
            };
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                match le.parse() {
                    Ok(v) => v,
                    Err(_) => continue,
                }
            };
            match h.buckets.iter_mut().find(|b| b.0 == le) {
                Some(b) => b.1 += value,
                None => h.buckets.push((le, value)),
            }
        }
    }
    h.buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    h
}

impl Histogram {
    fn minus(&self, earlier: &Histogram) -> Histogram {
        let before = |le: f64| {
            earlier
                .buckets
                .iter()
                .find(|b| b.0 == le)
                .map_or(0.0, |b| b.1)
        };
        Histogram {
            buckets: self
                .buckets
                .iter()
                .map(|&(le, c)| (le, c - before(le)))
                .collect(),
            sum: self.sum - earlier.sum,
            count: self.count - earlier.count,
        }
    }

    /// The `q` quantile in seconds, interpolated within its bucket (the
    /// last finite bound where it falls in the `+Inf` one).
    fn quantile(&self, q: f64) -> f64 {
        let want = q * self.count;
        let mut lower = (0.0, 0.0);
        for &(le, c) in &self.buckets {
            if c >= want {
                if le.is_infinite() {
                    return lower.0;
                }
                let span = (c - lower.1).max(1e-9);
                return lower.0 + (le - lower.0) * ((want - lower.1) / span).clamp(0.0, 1.0);
            }
            lower = (le, c);
        }
        lower.0
    }
}

/// Every stage between two readings of the endpoint.
pub fn stages(before: &str, after: &str) -> Vec<Stage> {
    STAGES
        .iter()
        .map(|&(name, metric)| {
            let h = histogram(after, metric).minus(&histogram(before, metric));
            let us = 1e6;
            Stage {
                name: name.into(),
                count: h.count.max(0.0) as u64,
                mean_us: if h.count > 0.0 {
                    h.sum / h.count * us
                } else {
                    0.0
                },
                p50_us: h.quantile(0.5) * us,
                p99_us: h.quantile(0.99) * us,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const BEFORE: &str = "# HELP courier_accept_to_durable_seconds x\n\
        courier_accept_to_durable_seconds_bucket{le=\"0.001\"} 10\n\
        courier_accept_to_durable_seconds_bucket{le=\"0.002\"} 10\n\
        courier_accept_to_durable_seconds_bucket{le=\"+Inf\"} 10\n\
        courier_accept_to_durable_seconds_sum 0.005\n\
        courier_accept_to_durable_seconds_count 10\n";
    const AFTER: &str = "courier_accept_to_durable_seconds_bucket{le=\"0.001\"} 60\n\
        courier_accept_to_durable_seconds_bucket{le=\"0.002\"} 110\n\
        courier_accept_to_durable_seconds_bucket{le=\"+Inf\"} 110\n\
        courier_accept_to_durable_seconds_sum 0.130\n\
        courier_accept_to_durable_seconds_count 110\n";

    /// Only the run counts: 50 samples under 1 ms and 50 between 1 and
    /// 2 ms were added, with 125 ms in all.
    #[test]
    fn a_stage_is_the_difference_of_two_readings() {
        let s = &stages(BEFORE, AFTER)[0];
        assert_eq!(s.count, 100);
        assert!((s.mean_us - 1250.0).abs() < 1e-6, "{s:?}");
        assert!((s.p50_us - 1000.0).abs() < 1e-6, "{s:?}");
        assert!((s.p99_us - 1980.0).abs() < 1e-6, "{s:?}");
        // Stages the node did not report are empty, not errors.
        assert_eq!(stages(BEFORE, AFTER)[1].count, 0);
    }
}

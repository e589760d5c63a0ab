//! The side-by-side table: reports of several targets for the same
//! scenario, with each figure's ratio to Courier's.

use crate::options::{Acks, Receipts, Scenario, Target};
use crate::report::Report;

/// A run's name in the tables.
fn name(r: &Report) -> String {
    r.label.clone().unwrap_or_else(|| format!("{:?}", r.target))
}

/// A run with one message in flight per sender: the latency row.
fn latency_run(r: &Report) -> bool {
    r.mode.starts_with("closed loop, 1 in flight")
}

/// How the run's receivers acknowledged, for the load column.
fn acks(r: &Report) -> String {
    let acks = match r.acks {
        Some(Acks::EachBatch) if r.read_share > 0.0 => {
            format!("acks each batch, {:.0}% read", r.read_share * 100.0)
        }
        Some(Acks::EachBatch) => "acks each batch".into(),
        Some(Acks::Lazy) => "**lazy acks** (every 256)".into(),
        None => "the peer's own acks".into(),
    };
    match r.receipts_as {
        Some(Receipts::Messages) => format!("{acks}, receipt messages"),
        _ => acks,
    }
}

/// A Markdown table of `reports`, one section per scenario and number of
/// users (in the order they first appear), the latency runs (one message in
/// flight per sender) in sections of their own.
pub fn markdown(reports: &[Report]) -> String {
    let mut out = String::new();
    let mut sections: Vec<(Scenario, u64, bool)> = Vec::new();
    for r in reports {
        let s = (r.scenario, r.users, latency_run(r));
        let shown = matches!(
            r.scenario,
            Scenario::OneToOne | Scenario::Group | Scenario::Broadcast | Scenario::Business
        );
        if shown && !sections.contains(&s) {
            sections.push(s);
        }
    }
    for (scenario, users, latency) in sections {
        let rows: Vec<&Report> = reports
            .iter()
            .filter(|r| r.scenario == scenario && r.users == users && latency_run(r) == latency)
            .collect();
        // Ratios against Courier's closed-loop (peak) run with realistic acks.
        let courier = rows.iter().copied().find(|r| {
            r.target == Target::Courier
                && r.mode.starts_with("closed")
                && r.acks != Some(Acks::Lazy)
        });
        out.push_str(&format!(
            "\n**{scenario:?}{}** ({} users, {} B):\n\n",
            if latency { ", latency" } else { "" },
            rows[0].users,
            rows[0].size
        ));
        out.push_str("| target | load | acked msg/s | deliveries/s | Courier deliveries / this | e2e p50 | e2e p99 | e2e p99.9 | generator CPU | loss / dup / reorder / receipts wrong |\n");
        out.push_str("|--------|------|------------:|-------------:|--------------------------:|--------:|--------:|----------:|--------------:|---------------------|\n");
        for r in &rows {
            let ratio = courier
                .map(|c| format!("{:.2}", c.delivered_per_s / r.delivered_per_s.max(1e-9)))
                .unwrap_or_else(|| "-".into());
            let ms = |us: u64| format!("{:.2} ms", us as f64 / 1000.0);
            let v = &r.verdict;
            let receipts = if v.receipts_owed > 0 {
                (v.receipts_missing + v.receipts_duplicated + v.receipts_unexpected).to_string()
            } else {
                "-".into()
            };
            out.push_str(&format!(
                "| {} | {}; {} | {:.0} | {:.0} | {} | {} | {} | {} | {} | {} / {} / {} / {} |\n",
                name(r),
                r.mode,
                acks(r),
                r.acked_per_s,
                r.delivered_per_s,
                ratio,
                ms(r.end_to_end.p50_us),
                ms(r.end_to_end.p99_us),
                ms(r.end_to_end.p999_us),
                r.generator_cpu
                    .map(|c| format!("{:.0}%", c * 100.0))
                    .unwrap_or_else(|| "-".into()),
                v.lost,
                v.duplicates,
                v.reordered,
                receipts
            ));
        }
    }
    let staged: Vec<&Report> = reports.iter().filter(|r| !r.stages.is_empty()).collect();
    if !staged.is_empty() {
        out.push_str("\n**Where the time goes** (the node's stage histograms over each run; a stage's percentiles are interpolated within its buckets):\n\n");
        out.push_str("| run | load | stage | count | mean | p50 | p99 |\n");
        out.push_str("|-----|------|-------|------:|-----:|----:|----:|\n");
        for r in staged {
            for s in &r.stages {
                out.push_str(&format!(
                    "| {} {:?} | {} | {} | {} | {:.0} us | {:.0} us | {:.0} us |\n",
                    name(r),
                    r.scenario,
                    r.mode,
                    s.name,
                    s.count,
                    s.mean_us,
                    s.p50_us,
                    s.p99_us
                ));
            }
            out.push_str(&format!(
                "| {} {:?} | {} | generator: send to ack / end to end | {} | | {:.0} us / {:.0} us | {:.0} us / {:.0} us |\n",
                name(r),
                r.scenario,
                r.mode,
                r.acked,
                r.send_to_ack.p50_us,
                r.end_to_end.p50_us,
                r.send_to_ack.p99_us,
                r.end_to_end.p99_us
            ));
        }
    }
    let idle: Vec<(&Report, &crate::report::IdleReport)> = reports
        .iter()
        .filter_map(|r| Some((r, r.idle.as_ref()?)))
        .collect();
    if !idle.is_empty() {
        out.push_str("\n**Idle connections** (sessions held, keepalive pings only):\n\n");
        out.push_str("| target | sessions | failed | connects/s | server bytes / connection | generator bytes / connection | alive at end |\n");
        out.push_str("|--------|---------:|-------:|-----------:|--------------------------:|-----------------------------:|-------------:|\n");
        for (r, i) in idle {
            out.push_str(&format!(
                "| {} | {} | {} | {:.0} | {} | {:.0} | {} |\n",
                name(r),
                i.connections,
                i.failed,
                i.connects_per_s,
                i.server_bytes_per_connection
                    .map(|b| format!("{b:.0}"))
                    .unwrap_or_else(|| "-".into()),
                i.generator_bytes_per_connection,
                i.alive_at_end
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(json: &str) -> Report {
        serde_json::from_str(json).expect("a report")
    }

    #[test]
    fn one_section_per_scenario_and_connection_count_with_labels() {
        // As a report from before realistic acks and stage readings.
        let base = Report {
            acks: None,
            stages: Vec::new(),
            ..report(include_str!(
                "../../docs/bench/compare-courier-one-to-one.json"
            ))
        };
        let uring = Report {
            label: Some("Courier (uring)".into()),
            ..base.clone()
        };
        let epoll = Report {
            label: Some("Courier (epoll)".into()),
            ..base.clone()
        };
        let many = Report {
            users: 10_000,
            ..uring.clone()
        };
        let relay = report(include_str!(
            "../../docs/bench/compare-relay-one-to-one.json"
        ));
        let out = markdown(&[uring, epoll, relay, many]);
        let sections: Vec<&str> = out.lines().filter(|l| l.starts_with("**")).collect();
        assert_eq!(
            sections,
            [
                "**OneToOne** (100 users, 100 B):",
                "**OneToOne** (10000 users, 100 B):"
            ]
        );
        assert!(out.contains("| Courier (uring) | closed loop"), "{out}");
        assert!(out.contains("| Courier (epoll) | closed loop"), "{out}");
        assert!(out.contains("| Relay | closed loop"), "{out}");
        // Reports from before realistic acks say nothing of them.
        assert!(out.contains("; the peer's own acks |"), "{out}");
        // The first closed-loop Courier run of a section is the baseline.
        assert!(out.contains(" | 1.00 | "), "{out}");
    }

    #[test]
    fn idle_runs_get_their_own_table() {
        let mut r = report(include_str!(
            "../../docs/bench/compare-courier-one-to-one.json"
        ));
        r.scenario = Scenario::Idle;
        r.label = Some("Courier (epoll)".into());
        r.idle = Some(crate::report::IdleReport {
            connections: 18_000,
            server_bytes_per_connection: Some(10_748.4),
            generator_bytes_per_connection: 12_487.0,
            alive_at_end: 18_000,
            ..Default::default()
        });
        let out = markdown(&[r]);
        assert!(out.contains("**Idle connections**"), "{out}");
        assert!(
            out.contains("| Courier (epoll) | 18000 | 0 | 0 | 10748 | 12487 | 18000 |"),
            "{out}"
        );
        assert!(!out.contains("**OneToOne**"), "{out}");
    }

    #[test]
    fn latency_runs_and_lazy_acks_are_set_apart() {
        let base = Report {
            stages: Vec::new(),
            ..report(include_str!(
                "../../docs/bench/compare-courier-one-to-one.json"
            ))
        };
        let realistic = Report {
            acks: Some(Acks::EachBatch),
            read_share: 0.25,
            generator_cpu: Some(0.5),
            ..base.clone()
        };
        let lazy = Report {
            acks: Some(Acks::Lazy),
            delivered_per_s: realistic.delivered_per_s * 2.0,
            label: Some("Courier (lazy)".into()),
            ..base.clone()
        };
        let latency = Report {
            mode: "closed loop, 1 in flight per sender".into(),
            ..realistic.clone()
        };
        let out = markdown(&[lazy, realistic, latency]);
        let sections: Vec<&str> = out.lines().filter(|l| l.starts_with("**")).collect();
        assert_eq!(
            sections,
            [
                "**OneToOne** (100 users, 100 B):",
                "**OneToOne, latency** (100 users, 100 B):"
            ]
        );
        // The baseline is the realistic run, not the lazy one before it.
        assert!(
            out.contains("| Courier (lazy) | closed loop, 16 in flight per sender; **lazy acks** (every 256) |"),
            "{out}"
        );
        assert!(out.contains(" | 0.50 | "), "{out}");
        assert!(out.contains("acks each batch, 25% read"), "{out}");
        assert!(out.contains(" | 50% | "), "{out}");
    }

    #[test]
    fn the_nodes_stages_get_their_own_table() {
        let mut r = report(include_str!(
            "../../docs/bench/compare-courier-one-to-one.json"
        ));
        r.stages = vec![crate::stages::Stage {
            name: "storage write incl. sync (per batch)".into(),
            count: 10,
            mean_us: 2000.0,
            p50_us: 1900.0,
            p99_us: 4000.0,
        }];
        let out = markdown(&[r]);
        assert!(out.contains("**Where the time goes**"), "{out}");
        assert!(
            out.contains(
                "| storage write incl. sync (per batch) | 10 | 2000 us | 1900 us | 4000 us |"
            ),
            "{out}"
        );
    }
}

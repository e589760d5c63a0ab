//! The side-by-side table: reports of several targets for the same
//! scenario, with each figure's ratio to Courier's.

use crate::options::{Scenario, Target};
use crate::report::Report;

/// A run's name in the tables.
fn name(r: &Report) -> String {
    r.label.clone().unwrap_or_else(|| format!("{:?}", r.target))
}

/// A Markdown table of `reports`, one section per scenario and number of
/// users (in the order they first appear).
pub fn markdown(reports: &[Report]) -> String {
    let mut out = String::new();
    let mut sections: Vec<(Scenario, u64)> = Vec::new();
    for r in reports {
        let s = (r.scenario, r.users);
        let shown = matches!(
            r.scenario,
            Scenario::OneToOne | Scenario::Group | Scenario::Broadcast
        );
        if shown && !sections.contains(&s) {
            sections.push(s);
        }
    }
    for (scenario, users) in sections {
        let rows: Vec<&Report> = reports
            .iter()
            .filter(|r| r.scenario == scenario && r.users == users)
            .collect();
        // Ratios against Courier's closed-loop (peak) run.
        let courier = rows
            .iter()
            .copied()
            .find(|r| r.target == Target::Courier && r.mode.starts_with("closed"));
        out.push_str(&format!(
            "\n**{scenario:?}** ({} users, {} B):\n\n",
            rows[0].users, rows[0].size
        ));
        out.push_str("| target | load | acked msg/s | deliveries/s | Courier deliveries / this | e2e p50 | e2e p99 | e2e p99.9 | loss / dup / reorder |\n");
        out.push_str("|--------|------|------------:|-------------:|--------------------------:|--------:|--------:|----------:|---------------------|\n");
        for r in &rows {
            let ratio = courier
                .map(|c| format!("{:.2}", c.delivered_per_s / r.delivered_per_s.max(1e-9)))
                .unwrap_or_else(|| "-".into());
            let ms = |us: u64| format!("{:.2} ms", us as f64 / 1000.0);
            out.push_str(&format!(
                "| {} | {} | {:.0} | {:.0} | {} | {} | {} | {} | {} / {} / {} |\n",
                name(r),
                r.mode,
                r.acked_per_s,
                r.delivered_per_s,
                ratio,
                ms(r.end_to_end.p50_us),
                ms(r.end_to_end.p99_us),
                ms(r.end_to_end.p999_us),
                r.verdict.lost,
                r.verdict.duplicates,
                r.verdict.reordered
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
        let base = report(include_str!(
            "../../docs/bench/compare-courier-one-to-one.json"
        ));
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
}

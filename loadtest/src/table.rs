//! The side-by-side table: reports of several targets for the same
//! scenario, with each figure's ratio to Courier's.

use crate::run::{Report, Scenario, Target};

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
                r.label.clone().unwrap_or_else(|| format!("{:?}", r.target)),
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
    let idle: Vec<(&Report, &crate::idle::IdleReport)> = reports
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
                r.label.clone().unwrap_or_else(|| format!("{:?}", r.target)),
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

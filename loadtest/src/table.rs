//! The side-by-side table: reports of several targets for the same
//! scenario, with each figure's ratio to Courier's.

use crate::run::{Report, Scenario, Target};

/// A Markdown table of `reports`, one section per scenario.
pub fn markdown(reports: &[Report]) -> String {
    let mut out = String::new();
    for scenario in [Scenario::OneToOne, Scenario::Group, Scenario::Broadcast] {
        let rows: Vec<&Report> = reports.iter().filter(|r| r.scenario == scenario).collect();
        if rows.is_empty() {
            continue;
        }
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
                "| {:?} | {} | {:.0} | {:.0} | {} | {} | {} | {} | {} / {} / {} |\n",
                r.target,
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
    out
}

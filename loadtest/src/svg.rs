//! A self-contained SVG report of a run: throughput per second, end-to-end
//! p99 per second, and the end-to-end latency percentile curve. Opens in
//! any browser; needs nothing installed.

use std::fmt::Write;

use crate::report::Report;

/// A named, coloured line: (name, colour, points).
type Series<'a> = (&'a str, &'a str, Vec<(f64, f64)>);

const W: f64 = 900.0;
const PANEL_H: f64 = 220.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 20.0;

/// A line chart in a panel at vertical offset `top`: each series is
/// (name, colour, points (x, y)).
fn panel(
    out: &mut String,
    top: f64,
    title: &str,
    y_unit: &str,
    x_label: &str,
    series: &[Series<'_>],
) {
    let (x_max, y_max) = series
        .iter()
        .flat_map(|s| s.2.iter())
        .fold((1e-9f64, 1e-9f64), |(xm, ym), &(x, y)| {
            (xm.max(x), ym.max(y))
        });
    let plot_w = W - LEFT - RIGHT;
    let plot_h = PANEL_H - 60.0;
    let y0 = top + 30.0 + plot_h;
    let _ = write!(
        out,
        r#"<text x="{LEFT}" y="{}" font-size="14" font-weight="bold">{title}</text>"#,
        top + 18.0
    );
    let _ = write!(
        out,
        r##"<rect x="{LEFT}" y="{}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#999"/>"##,
        top + 30.0
    );
    for i in 0..=4 {
        let v = y_max * i as f64 / 4.0;
        let y = y0 - plot_h * i as f64 / 4.0;
        let _ = write!(
            out,
            r##"<text x="{}" y="{}" font-size="10" text-anchor="end">{:.0} {y_unit}</text><line x1="{LEFT}" x2="{}" y1="{y}" y2="{y}" stroke="#eee"/>"##,
            LEFT - 4.0,
            y + 3.0,
            v,
            LEFT + plot_w
        );
    }
    let _ = write!(
        out,
        r#"<text x="{}" y="{}" font-size="10" text-anchor="middle">{x_label} (max {:.1})</text>"#,
        LEFT + plot_w / 2.0,
        y0 + 16.0,
        x_max
    );
    for (k, (name, colour, pts)) in series.iter().enumerate() {
        let path: Vec<String> = pts
            .iter()
            .map(|&(x, y)| {
                format!(
                    "{:.1},{:.1}",
                    LEFT + plot_w * x / x_max,
                    y0 - plot_h * y / y_max
                )
            })
            .collect();
        let _ = write!(
            out,
            r#"<polyline fill="none" stroke="{colour}" stroke-width="2" points="{}"/>"#,
            path.join(" ")
        );
        let _ = write!(
            out,
            r#"<text x="{}" y="{}" font-size="11" fill="{colour}">{name}</text>"#,
            LEFT + 10.0 + 160.0 * k as f64,
            top + 44.0
        );
    }
}

pub fn render(r: &Report) -> String {
    let mut out = String::new();
    let h = 3.0 * PANEL_H + 40.0;
    let _ = write!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{h}" font-family="sans-serif">"#
    );
    let _ = write!(
        out,
        r#"<text x="{LEFT}" y="20" font-size="13">{:?}, {} users, {} B, {}: acked {:.0}/s, delivered {:.0}/s, e2e p99 {} us, {}</text>"#,
        r.scenario,
        r.users,
        r.size,
        r.mode,
        r.acked_per_s,
        r.delivered_per_s,
        r.end_to_end.p99_us,
        if r.verdict.ok() {
            "no loss, duplicate or reorder"
        } else {
            "CORRECTNESS FAILED"
        }
    );
    let t = |f: fn(&crate::latency::Second) -> u64| {
        r.timeline
            .iter()
            .map(|s| (s.t_s as f64, f(s) as f64))
            .collect::<Vec<_>>()
    };
    panel(
        &mut out,
        30.0,
        "Throughput per second",
        "/s",
        "seconds",
        &[
            ("sent", "#888", t(|s| s.sent)),
            ("acked", "#1f77b4", t(|s| s.acked)),
            ("delivered", "#2ca02c", t(|s| s.delivered)),
        ],
    );
    panel(
        &mut out,
        30.0 + PANEL_H,
        "End-to-end p99 per second",
        "us",
        "seconds",
        &[("p99", "#d62728", t(|s| s.e2e_p99_us))],
    );
    // Percentiles on a "nines" axis: x = -log10(1 - p/100).
    let curve: Vec<(f64, f64)> = r
        .end_to_end_curve
        .iter()
        .filter(|(p, _)| *p < 100.0)
        .map(|&(p, us)| (-(1.0 - p / 100.0).log10(), us as f64))
        .collect();
    panel(
        &mut out,
        30.0 + 2.0 * PANEL_H,
        "End-to-end latency by percentile (x: nines; 1 = p90, 2 = p99, 3 = p99.9)",
        "us",
        "nines",
        &[("latency", "#9467bd", curve)],
    );
    out.push_str("</svg>\n");
    out
}

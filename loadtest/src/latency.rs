//! Latency recording in HDR histograms (microseconds, 3 significant digits,
//! up to 10 minutes), and the per-second timeline of a run.

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

const MAX_US: u64 = 600_000_000;

pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_US, 3).expect("valid bounds")
}

/// Records `us` (clamped into the histogram's range).
pub fn record(h: &mut Histogram<u64>, us: u64) {
    h.record(us.clamp(1, MAX_US)).expect("clamped into range");
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Percentiles {
    pub count: u64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
    pub mean_us: f64,
}

impl Percentiles {
    pub fn of(h: &Histogram<u64>) -> Percentiles {
        if h.is_empty() {
            return Percentiles::default();
        }
        Percentiles {
            count: h.len(),
            p50_us: h.value_at_quantile(0.50),
            p90_us: h.value_at_quantile(0.90),
            p99_us: h.value_at_quantile(0.99),
            p999_us: h.value_at_quantile(0.999),
            max_us: h.max(),
            mean_us: (h.mean() * 10.0).round() / 10.0,
        }
    }
}

/// The latency distribution as (percentile, microseconds) points, for plots.
pub fn percentile_curve(h: &Histogram<u64>) -> Vec<(f64, u64)> {
    if h.is_empty() {
        return Vec::new();
    }
    [
        0.0, 50.0, 75.0, 90.0, 95.0, 99.0, 99.5, 99.9, 99.95, 99.99, 100.0,
    ]
    .iter()
    .map(|&p| (p, h.value_at_percentile(p)))
    .collect()
}

/// One second of a run.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Second {
    pub t_s: u64,
    pub sent: u64,
    pub acked: u64,
    pub delivered: u64,
    pub e2e_p99_us: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Known injected delays come back out at the right percentiles.
    #[test]
    fn percentiles_match_injected_delays() {
        let mut h = histogram();
        // 900 samples at 1 ms, 90 at 10 ms, 10 at 100 ms.
        for _ in 0..900 {
            record(&mut h, 1_000);
        }
        for _ in 0..90 {
            record(&mut h, 10_000);
        }
        for _ in 0..10 {
            record(&mut h, 100_000);
        }
        let p = Percentiles::of(&h);
        let close = |a: u64, b: u64| a.abs_diff(b) * 1000 <= b; // 0.1%
        assert!(close(p.p50_us, 1_000), "{p:?}");
        assert!(close(p.p90_us, 1_000), "{p:?}");
        assert!(close(p.p99_us, 10_000), "{p:?}");
        assert!(close(p.p999_us, 100_000), "{p:?}");
        assert!(close(p.max_us, 100_000), "{p:?}");
        assert_eq!(p.count, 1000);
    }
}

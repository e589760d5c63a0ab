//! When each of a sender's messages is meant to go: at the offered rate
//! (open loop), or now (closed loop), until the run's sending time ends.

use std::time::{Duration, Instant};

use crate::options::Options;

/// When each of a sender's messages is meant to go.
#[derive(Clone, Copy)]
pub(crate) struct Pacer {
    start: Instant,
    duration: Duration,
    /// Open loop: this sender's messages per second.
    rate: Option<f64>,
    /// Seconds this sender is shifted by, so senders are not in lockstep.
    offset: f64,
}

impl Pacer {
    pub(crate) fn new(opts: &Options, start: Instant, senders: usize, i: usize) -> Pacer {
        let rate = opts.rate.map(|r| r / senders.max(1) as f64);
        Pacer {
            start,
            duration: opts.duration,
            rate,
            offset: rate.map(|r| (i as f64 * 0.618).fract() / r).unwrap_or(0.0),
        }
    }

    /// The intended time of this sender's message `k` (from 0); `None`
    /// once that is past the run's sending time.
    pub(crate) fn intended(&self, k: u64) -> Option<Instant> {
        let at = match self.rate {
            Some(r) => self.start + Duration::from_secs_f64(self.offset + k as f64 / r),
            None => Instant::now(),
        };
        (at.saturating_duration_since(self.start) < self.duration).then_some(at)
    }

    /// When sending ends.
    pub(crate) fn end(&self) -> Instant {
        self.start + self.duration
    }
}

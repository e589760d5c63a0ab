//! Counting as the run goes: the shared counters and timeline, and each
//! task's tally of the current second (flushed a few times a second, not
//! locked per message).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use crate::checker::Checker;
use crate::latency::{histogram, record};
use crate::plan::sender_of;
use crate::stamp::parse;

/// One second of the timeline: sent, acked, delivered, end-to-end latencies.
pub(crate) type SecondRow = (u64, u64, u64, Histogram<u64>);

/// Where the run is, for the users' loops.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Phase {
    Running,
    /// Sending and delivering are over: every user acknowledges all it
    /// read (lazy ones too), and the receipts that calls for come in.
    Settling,
    Stopped,
}

pub(crate) struct Shared {
    pub start: Instant,
    phase: AtomicU8,
    /// Tells waiting user loops that the phase changed.
    phase_changed: tokio::sync::watch::Sender<()>,
    /// Senders still sending (or waiting for their last acks).
    pub sending_left: AtomicUsize,
    pub sent: AtomicU64,
    pub acked: AtomicU64,
    /// Deliveries the acknowledged messages call for.
    pub expected: AtomicU64,
    pub delivered: AtomicU64,
    /// Receipt items (one message's delivered or read) senders received.
    pub receipts: AtomicU64,
    pub reconnects: AtomicU64,
    /// Sends refused `SHARD_UNAVAILABLE` and sent again with their id.
    pub retried: AtomicU64,
    pub redelivered: AtomicU64,
    /// Sends not answered within the session's limit (the session was
    /// then given up and the send retried on the next).
    pub unanswered: AtomicU64,
    /// Sends given up unacknowledged (refused or unanswered until well
    /// after the end): each is also an error naming its user and why.
    pub abandoned: AtomicU64,
    /// Nanoseconds from the start to the latest delivery.
    pub last_delivery_ns: AtomicU64,
    pub errors: Mutex<BTreeMap<String, u64>>,
    /// Per second: sent, acked, delivered; and end-to-end latencies.
    pub seconds: Mutex<Vec<SecondRow>>,
    /// The whole run's send-to-ack and end-to-end latencies. Tasks hold
    /// only a second's samples (an HDR histogram is ~170 KB: one per task
    /// would cost gigabytes at 10,000 connections).
    pub totals: Mutex<(Histogram<u64>, Histogram<u64>)>,
}

impl Shared {
    /// Counters at zero, the clock started now, `sending` senders to wait for.
    pub(crate) fn new(sending: usize) -> Shared {
        Shared {
            start: Instant::now(),
            phase: AtomicU8::new(0),
            phase_changed: tokio::sync::watch::Sender::new(()),
            sending_left: AtomicUsize::new(sending),
            sent: AtomicU64::new(0),
            acked: AtomicU64::new(0),
            expected: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            receipts: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
            retried: AtomicU64::new(0),
            redelivered: AtomicU64::new(0),
            unanswered: AtomicU64::new(0),
            abandoned: AtomicU64::new(0),
            last_delivery_ns: AtomicU64::new(0),
            errors: Mutex::new(BTreeMap::new()),
            seconds: Mutex::new(Vec::new()),
            totals: Mutex::new((histogram(), histogram())),
        }
    }

    pub(crate) fn phase(&self) -> Phase {
        match self.phase.load(Ordering::Relaxed) {
            0 => Phase::Running,
            1 => Phase::Settling,
            _ => Phase::Stopped,
        }
    }

    pub(crate) fn set_phase(&self, p: Phase) {
        self.phase.store(p as u8, Ordering::Relaxed);
        self.phase_changed.send_replace(());
    }

    /// The run has ended: every user stops.
    pub(crate) fn stopped(&self) -> bool {
        self.phase() == Phase::Stopped
    }

    /// A receiver whose `changed()` completes at the next phase change.
    pub(crate) fn watch_phase(&self) -> tokio::sync::watch::Receiver<()> {
        self.phase_changed.subscribe()
    }

    fn second(&self, at: Instant) -> usize {
        at.saturating_duration_since(self.start).as_secs() as usize
    }

    fn bump_at(&self, i: usize, f: impl FnOnce(&mut SecondRow)) {
        let mut s = self.seconds.lock().expect("seconds");
        while s.len() <= i {
            s.push((0, 0, 0, histogram()));
        }
        f(&mut s[i]);
    }

    pub(crate) fn error(&self, name: String) {
        *self.errors.lock().expect("errors").entry(name).or_default() += 1;
    }

    pub(crate) fn since_start(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.start).as_nanos() as u64
    }

    pub(crate) fn sent(&self, tally: &mut Tally) {
        self.sent.fetch_add(1, Ordering::Relaxed);
        tally.at(self, Instant::now()).sent += 1;
    }

    /// Message `n` of `conversation`, meant to go at `intended`, is
    /// acknowledged; `recipients` must each get it.
    pub(crate) fn acked(
        &self,
        ack: (u64, u64, &[u64]),
        intended: Instant,
        checker: &mut Checker,
        tally: &mut Tally,
    ) {
        let expected = self.note_ack(ack, intended, Instant::now(), checker, tally);
        self.acked.fetch_add(1, Ordering::Relaxed);
        self.expected.fetch_add(expected, Ordering::Relaxed);
    }

    /// An acknowledgement in the task's checker and tally, not yet in the
    /// shared counters (a caller that counts many adds them at once);
    /// returns the deliveries it calls for.
    pub(crate) fn note_ack(
        &self,
        (conversation, n, recipients): (u64, u64, &[u64]),
        intended: Instant,
        now: Instant,
        checker: &mut Checker,
        tally: &mut Tally,
    ) -> u64 {
        let t = tally.at(self, now);
        t.acked += 1;
        t.ack_us
            .push(now.saturating_duration_since(intended).as_micros() as u64);
        checker.acked(conversation, n, recipients);
        recipients.len() as u64
    }

    /// `me` received `payload` (anything not a generator message is skipped).
    pub(crate) fn delivery(
        &self,
        me: u64,
        payload: &[u8],
        checker: &mut Checker,
        tally: &mut Tally,
    ) {
        let now = Instant::now();
        if self
            .note_delivery(me, payload, now, checker, tally)
            .is_some()
        {
            self.delivered.fetch_add(1, Ordering::Relaxed);
            self.last_delivery_ns
                .fetch_max(self.since_start(now), Ordering::Relaxed);
        }
    }

    /// A delivery in the task's checker and tally, not yet in the shared
    /// counters; returns its (conversation, number), or `None` for anything
    /// that is not another user's generator message.
    pub(crate) fn note_delivery(
        &self,
        me: u64,
        payload: &[u8],
        now: Instant,
        checker: &mut Checker,
        tally: &mut Tally,
    ) -> Option<(u64, u64)> {
        // Group events and anything not from this run carry no stamp.
        let (conv, n, intended_ns) = match parse(payload) {
            Some(stamp) => stamp,
            // The business scenario's template: the stamp is its body.
            None => parse(&crate::plan::template_stamp(payload)?)?,
        };
        if sender_of(conv) == me {
            return None; // a peer echoing a member's own group message
        }
        let intended = self.start + Duration::from_nanos(intended_ns);
        let us = now.saturating_duration_since(intended).as_micros() as u64;
        checker.delivered(me, conv, n);
        let t = tally.at(self, now);
        t.delivered += 1;
        t.e2e_us.push(us);
        Some((conv, n))
    }
}

/// One task's counts and latencies for the current second, added to the
/// shared timeline and totals when the second changes (or the samples pile
/// up): a few locks per task per second, not one per message.
pub(crate) struct Tally {
    second: usize,
    pub sent: u64,
    pub acked: u64,
    pub delivered: u64,
    pub ack_us: Vec<u64>,
    pub e2e_us: Vec<u64>,
}

/// Samples a task keeps before flushing within a second.
const TALLY_SAMPLES_MAX: usize = 4096;

impl Tally {
    pub(crate) fn new() -> Tally {
        Tally {
            second: 0,
            sent: 0,
            acked: 0,
            delivered: 0,
            ack_us: Vec::new(),
            e2e_us: Vec::new(),
        }
    }

    /// Moves to the second of `now`, flushing the previous one.
    pub(crate) fn at(&mut self, shared: &Shared, now: Instant) -> &mut Tally {
        let s = shared.second(now);
        if s != self.second || self.ack_us.len() + self.e2e_us.len() >= TALLY_SAMPLES_MAX {
            self.flush(shared);
            self.second = s;
        }
        self
    }

    pub(crate) fn flush(&mut self, shared: &Shared) {
        if self.sent + self.acked + self.delivered == 0 {
            return;
        }
        shared.bump_at(self.second, |x| {
            x.0 += self.sent;
            x.1 += self.acked;
            x.2 += self.delivered;
            for &us in &self.e2e_us {
                record(&mut x.3, us);
            }
        });
        {
            let mut totals = shared.totals.lock().expect("totals");
            for &us in &self.ack_us {
                record(&mut totals.0, us);
            }
            for &us in &self.e2e_us {
                record(&mut totals.1, us);
            }
        }
        self.sent = 0;
        self.acked = 0;
        self.delivered = 0;
        // Keep no capacity: a quiet task should hold nothing.
        self.ack_us = Vec::new();
        self.e2e_us = Vec::new();
    }
}

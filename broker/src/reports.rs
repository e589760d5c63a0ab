//! Long read-only reports, made on a thread of their own.
//!
//! A few admin requests read a business's whole history: its statistics
//! (every half hour it ever counted), one message's status for every
//! customer it went to (a campaign's: up to a million rows) and the export
//! of every customer's ledger. Made on the shard thread that received
//! them, such a scan would hold up every send, mark and push of that
//! shard's users for as long as it reads. The shard writes what it held
//! (as before every admin request), checks the request and hands the scan
//! here; its answer goes straight to whoever asked.
//!
//! One thread, in the order asked, behind a bounded queue: when the queue
//! is full, a new report is refused at once ([`Turn::Busy`]: the caller
//! answers "busy, retry") instead of queueing work without bound.

use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};

use tracing::error;

/// Reports waiting for the thread, at most (`run` refuses more).
pub const QUEUE_LEN: usize = 16;

/// How a job is called: on the reports thread, or at once because the
/// queue was full (it should then answer that the node is busy).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Turn {
    Run,
    Busy,
}

type Job = Box<dyn FnOnce(Turn) + Send>;

/// The handle shards give their reports to; clones share the one thread,
/// which ends once every handle is gone.
#[derive(Clone)]
pub struct Reports {
    tx: SyncSender<Job>,
}

impl Reports {
    /// Starts the reports thread with a queue of `queue_len`.
    pub fn start(queue_len: usize) -> std::io::Result<Reports> {
        let (tx, rx) = sync_channel::<Job>(queue_len);
        std::thread::Builder::new()
            .name("courier-reports".into())
            .spawn(move || {
                for job in rx {
                    // A job that panics loses its own answer (the asker
                    // sees its channel closed), not the thread.
                    let ran =
                        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(Turn::Run)));
                    if ran.is_err() {
                        error!("a report panicked; its request gets no answer");
                    }
                }
            })?;
        Ok(Reports { tx })
    }

    /// Queues `job`, or calls it with [`Turn::Busy`] now if the queue is
    /// full.
    pub fn run(&self, job: impl FnOnce(Turn) + Send + 'static) {
        match self.tx.try_send(Box::new(job)) {
            Ok(()) => {}
            Err(TrySendError::Full(job) | TrySendError::Disconnected(job)) => job(Turn::Busy),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::channel;
    use std::time::Duration;

    const WAIT: Duration = Duration::from_secs(10);

    #[test]
    fn reports_run_in_order_and_a_full_queue_refuses_at_once() {
        let reports = Reports::start(1).unwrap();
        let (done_tx, done_rx) = channel::<(u32, Turn)>();
        // The first holds the thread until the gate opens.
        let (gate_tx, gate_rx) = channel::<()>();
        let (started_tx, started_rx) = channel::<()>();
        let done = done_tx.clone();
        reports.run(move |turn| {
            started_tx.send(()).unwrap();
            let _ = gate_rx.recv_timeout(WAIT);
            done.send((1, turn)).unwrap();
        });
        started_rx
            .recv_timeout(WAIT)
            .expect("the first report started");
        // The second takes the queue's one place; the third finds it full
        // and is answered at once, while the first still runs.
        for n in [2, 3] {
            let done = done_tx.clone();
            reports.run(move |turn| done.send((n, turn)).unwrap());
        }
        assert_eq!(done_rx.recv_timeout(WAIT).unwrap(), (3, Turn::Busy));
        gate_tx.send(()).unwrap();
        assert_eq!(done_rx.recv_timeout(WAIT).unwrap(), (1, Turn::Run));
        assert_eq!(done_rx.recv_timeout(WAIT).unwrap(), (2, Turn::Run));
    }

    #[test]
    fn a_report_that_panics_leaves_the_thread_to_the_next() {
        let reports = Reports::start(4).unwrap();
        reports.run(|_| panic!("a report's bug"));
        let (tx, rx) = channel();
        reports.run(move |turn| tx.send(turn).unwrap());
        assert_eq!(rx.recv_timeout(WAIT).unwrap(), Turn::Run);
    }
}

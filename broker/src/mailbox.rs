//! A session's queues (live deliveries from its shard, replies from its
//! reader and the shards), which hold nothing while empty.
//!
//! tokio's `mpsc` allocates its first block of 32 slots when the channel is
//! made (room for 32 deliveries, and for 32 replies), for every
//! connection, idle or not. Here a queue is a `VecDeque` behind a mutex,
//! allocated by its first message and let go once a burst is drained, and a
//! `Notify` that wakes the one receiver when a message lands in an empty
//! queue. Senders are many (the shards, the reader), the receiver is the
//! session's writer; a lock is held only to push or pop.
//!
//! The API is the part of tokio's `mpsc` the session uses: `send` (no bound),
//! `try_send` (`Full` at the bound), `recv` (cancel-safe: a message is
//! either returned or left in the queue) and `try_recv`; the queue is closed
//! for the receiver once every sender is gone, and for senders once the
//! receiver is.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

/// Capacity a drained queue may keep (a busy session's usual burst);
/// beyond it the storage goes back to the allocator.
const KEEP: usize = 32;

struct Inner<T> {
    queue: Mutex<VecDeque<T>>,
    bound: usize,
    senders: AtomicUsize,
    receiver_gone: AtomicBool,
    /// Wakes the receiver: a message into an empty queue, or the last
    /// sender gone.
    ready: Notify,
}

pub struct Sender<T> {
    inner: Arc<Inner<T>>,
}

pub struct Receiver<T> {
    inner: Arc<Inner<T>>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum TrySendError<T> {
    /// The queue holds `bound` messages.
    Full(T),
    /// The receiver is gone.
    Closed(T),
}

#[derive(Debug, PartialEq, Eq)]
pub enum TryRecvError {
    Empty,
    /// Empty, and every sender is gone.
    Closed,
}

/// A queue of at most `bound` messages (`try_send` says `Full` beyond).
pub fn bounded<T>(bound: usize) -> (Sender<T>, Receiver<T>) {
    let inner = Arc::new(Inner {
        queue: Mutex::new(VecDeque::new()),
        bound: bound.max(1),
        senders: AtomicUsize::new(1),
        receiver_gone: AtomicBool::new(false),
        ready: Notify::new(),
    });
    (
        Sender {
            inner: inner.clone(),
        },
        Receiver { inner },
    )
}

/// A queue whose bound is kept by its users (replies: one per in-flight
/// permit).
pub fn unbounded<T>() -> (Sender<T>, Receiver<T>) {
    bounded(usize::MAX)
}

impl<T> Sender<T> {
    /// Queues `t`; gives it back if the receiver is gone.
    pub fn send(&self, t: T) -> Result<(), T> {
        self.try_send(t).map_err(|e| match e {
            TrySendError::Full(t) | TrySendError::Closed(t) => t,
        })
    }

    pub fn try_send(&self, t: T) -> Result<(), TrySendError<T>> {
        if self.inner.receiver_gone.load(Ordering::Acquire) {
            return Err(TrySendError::Closed(t));
        }
        let was_empty = {
            let mut q = self.inner.queue.lock().expect("mailbox lock");
            if q.len() >= self.inner.bound {
                return Err(TrySendError::Full(t));
            }
            q.push_back(t);
            q.len() == 1
        };
        // The receiver sleeps only on an empty queue it saw under the lock:
        // only the message that ends the emptiness needs to wake it (a
        // stored permit if it is not asleep yet).
        if was_empty {
            self.inner.ready.notify_one();
        }
        Ok(())
    }

    /// True once the receiver is gone.
    pub fn is_closed(&self) -> bool {
        self.inner.receiver_gone.load(Ordering::Acquire)
    }
}

impl<T> Clone for Sender<T> {
    fn clone(&self) -> Self {
        self.inner.senders.fetch_add(1, Ordering::Relaxed);
        Sender {
            inner: self.inner.clone(),
        }
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        if self.inner.senders.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.inner.ready.notify_one();
        }
    }
}

impl<T> Receiver<T> {
    /// The next message; `None` once the queue is empty and every sender
    /// is gone. Cancel-safe.
    pub async fn recv(&mut self) -> Option<T> {
        loop {
            match self.try_recv() {
                Ok(t) => return Some(t),
                Err(TryRecvError::Closed) => return None,
                Err(TryRecvError::Empty) => self.inner.ready.notified().await,
            }
        }
    }

    pub fn try_recv(&mut self) -> Result<T, TryRecvError> {
        let mut q = self.inner.queue.lock().expect("mailbox lock");
        match q.pop_front() {
            Some(t) => {
                if q.is_empty() && q.capacity() > KEEP {
                    *q = VecDeque::new();
                }
                Ok(t)
            }
            None if self.inner.senders.load(Ordering::Acquire) == 0 => Err(TryRecvError::Closed),
            None => Err(TryRecvError::Empty),
        }
    }
}

impl<T> Drop for Receiver<T> {
    fn drop(&mut self) {
        self.inner.receiver_gone.store(true, Ordering::Release);
        // What was queued goes now, not with the last sender.
        let drained = std::mem::take(&mut *self.inner.queue.lock().expect("mailbox lock"));
        drop(drained);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn messages_come_in_order_and_the_bound_holds() {
        let (tx, mut rx) = bounded(2);
        tx.try_send(1).unwrap();
        tx.send(2).unwrap();
        assert_eq!(tx.try_send(3), Err(TrySendError::Full(3)));
        assert_eq!(rx.recv().await, Some(1));
        tx.try_send(3).unwrap();
        assert_eq!(rx.try_recv(), Ok(2));
        assert_eq!(rx.try_recv(), Ok(3));
        assert_eq!(rx.try_recv(), Err(TryRecvError::Empty));
    }

    #[tokio::test]
    async fn the_receiver_wakes_for_a_message_and_for_the_last_sender() {
        let (tx, mut rx) = unbounded::<u32>();
        let tx2 = tx.clone();
        let waiting = tokio::spawn(async move {
            let first = rx.recv().await;
            let end = rx.recv().await;
            (first, end)
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        tx.send(7).unwrap();
        drop(tx);
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(tx2);
        let (first, end) = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("woken")
            .unwrap();
        assert_eq!((first, end), (Some(7), None));
    }

    #[tokio::test]
    async fn senders_learn_the_receiver_is_gone() {
        let (tx, rx) = bounded(4);
        tx.send(Arc::new(1)).unwrap();
        let queued = Arc::new(2);
        tx.send(queued.clone()).unwrap();
        drop(rx);
        // What was queued is dropped with the receiver.
        assert_eq!(Arc::strong_count(&queued), 1);
        assert!(tx.is_closed());
        assert!(matches!(
            tx.try_send(Arc::new(3)),
            Err(TrySendError::Closed(_))
        ));
    }

    /// A `recv` dropped before it finishes (a `select!` that took another
    /// branch) loses nothing, and many senders racing one receiver lose and
    /// repeat nothing.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn nothing_is_lost_to_cancelled_receives_or_racing_senders() {
        let (tx, mut rx) = unbounded::<u64>();
        let senders: Vec<_> = (0..4u64)
            .map(|s| {
                let tx = tx.clone();
                tokio::spawn(async move {
                    for i in 0..10_000 {
                        tx.send(s << 32 | i).unwrap();
                        if i % 512 == 0 {
                            tokio::task::yield_now().await;
                        }
                    }
                })
            })
            .collect();
        drop(tx);
        let mut last = [None::<u64>; 4];
        let mut got = 0;
        loop {
            tokio::select! {
                m = rx.recv() => match m {
                    Some(m) => {
                        let (s, i) = ((m >> 32) as usize, m & 0xFFFF_FFFF);
                        assert!(last[s].is_none_or(|l| l + 1 == i), "sender {s}: {i} after {:?}", last[s]);
                        last[s] = Some(i);
                        got += 1;
                    }
                    None => break,
                },
                _ = tokio::task::yield_now() => {}
            }
        }
        for s in senders {
            s.await.unwrap();
        }
        assert_eq!(got, 40_000);
    }
}

//! The node's handle to its shards: start them, queue commands on them,
//! stop them.
//!
//! Each shard runs on its own OS thread with a current-thread runtime, so a
//! blocking RocksDB write (with its fsync) never stalls the network threads.
//! Sessions reach a shard through its bounded command queue
//! (`limits.shard_queue_len`); when it is full the session's reader waits,
//! which stops reading that socket: backpressure reaches the client through
//! TCP and nothing grows without bound.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use courier_storage::InboxStore;
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;

use courier_protocol::SendResult;

use super::batch::complete;
use super::core::{PeerQueue, Remote, RemoteSlot, Shard, ShardConfig};
use super::groups::fan_out_marks;
use super::messages::{Completion, ShardCmd, SlotsChange};
use super::route::shard_of;
use crate::metrics::ShardMetrics;

/// What queuing without waiting came to (`Shards::send`, and a session's
/// sends, which may also wait for an in-flight permit); awaiting it waits
/// if it must.
pub enum Queued<'a> {
    /// Queued (`true`), or refused because the shard has stopped.
    Now(bool),
    /// No room (or a permit to wait for): the boxed wait, resolving like
    /// `Now`.
    Waiting(Pin<Box<dyn Future<Output = bool> + Send + 'a>>),
}

/// Resolves to whether the command was queued, waiting for it if it must.
impl Future for Queued<'_> {
    type Output = bool;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<bool> {
        match self.get_mut() {
            Queued::Now(queued) => Poll::Ready(*queued),
            Queued::Waiting(wait) => wait.as_mut().poll(cx),
        }
    }
}

/// Handles to every shard's queues and thread.
pub struct Shards {
    queues: Vec<mpsc::Sender<ShardCmd>>,
    /// Every shard's peer queue (outcomes of parts that came back over a
    /// link are queued here for the shard that waits).
    peers: Arc<[PeerQueue]>,
    /// Where commands for other cluster nodes' ids go.
    remote: RemoteSlot,
    threads: std::sync::Mutex<Vec<std::thread::JoinHandle<()>>>,
    pub stats: Arc<ShardMetrics>,
}

impl Shards {
    pub fn start(
        count: usize,
        config: ShardConfig,
        store: Arc<dyn InboxStore>,
    ) -> std::io::Result<Shards> {
        assert!((1..=64).contains(&count), "1 to 64 shards");
        let stats = Arc::new(ShardMetrics::new(count));
        let mut queues = Vec::with_capacity(count);
        let mut receivers = Vec::with_capacity(count);
        let mut peers = Vec::with_capacity(count);
        let mut peer_receivers = Vec::with_capacity(count);
        for i in 0..count {
            let (tx, rx) = mpsc::channel(config.queue_len);
            queues.push(tx);
            receivers.push(rx);
            let (ptx, prx) = mpsc::unbounded_channel();
            peers.push(PeerQueue {
                tx: ptx,
                pushed: stats.queue_pushed[i].clone(),
            });
            peer_receivers.push(prx);
        }
        let peers: Arc<[PeerQueue]> = peers.into();
        let marks = fan_out_marks(&*store, count, None).map_err(std::io::Error::other)?;
        let remote = RemoteSlot::default();
        let mut threads = Vec::with_capacity(count);
        for (id, ((rx, prx), marks)) in receivers
            .into_iter()
            .zip(peer_receivers)
            .zip(marks)
            .enumerate()
        {
            let mut shard = Shard::new(
                id as u64,
                rx,
                prx,
                peers.clone(),
                store.clone(),
                stats.clone(),
                &config,
            );
            shard.remote = remote.clone();
            let thread = std::thread::Builder::new()
                .name(format!("courier-shard-{id}"))
                .spawn(move || {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_time()
                        .build()
                        .expect("shard runtime");
                    rt.block_on(shard.run(marks));
                })?;
            threads.push(thread);
        }
        Ok(Shards {
            queues,
            peers,
            remote,
            threads: std::sync::Mutex::new(threads),
            stats,
        })
    }

    pub fn count(&self) -> usize {
        self.queues.len()
    }

    /// Queues `cmd` on the shard that owns `key` (a user or group id): now
    /// if its queue has room; awaiting the result waits for room if not,
    /// and resolves to `false` if the shard has stopped.
    ///
    /// The wait for room is a future of its own, boxed: it is rare, and its
    /// state (the command and the queue's permit request, over 500 bytes)
    /// would otherwise be part of every session's task for the session's
    /// whole life, idle or not.
    pub fn send(&self, key: u64, cmd: ShardCmd) -> Queued<'_> {
        let cmd = match self.remote.get() {
            Some(remote) => match remote.divert(key, cmd) {
                Some(cmd) => cmd,
                // Taken: answered by the node that owns `key` (or refused).
                None => return Queued::Now(true),
            },
            None => cmd,
        };
        self.send_here(key, cmd)
    }

    /// Queues `cmd` on this node's shard for `key`, wherever the cluster
    /// says `key` lives (for commands that came over a link, whose owner
    /// was checked where they arrived).
    pub fn send_here(&self, key: u64, cmd: ShardCmd) -> Queued<'_> {
        let i = shard_of(key, self.queues.len());
        match self.queues[i].try_send(cmd) {
            Ok(()) => {
                self.stats.queue_pushed[i].inc();
                Queued::Now(true)
            }
            Err(TrySendError::Closed(_)) => Queued::Now(false),
            Err(TrySendError::Full(cmd)) => Queued::Waiting(Box::pin(async move {
                let queued = self.queues[i].send(cmd).await.is_ok();
                if queued {
                    self.stats.queue_pushed[i].inc();
                }
                queued
            })),
        }
    }

    /// Queues `cmd` on this node's shard for `key` through its unbounded
    /// peer queue, without waiting (for commands from another node, whose
    /// order must be kept and whose number the other node bounds).
    pub fn send_peer(&self, key: u64, cmd: ShardCmd) {
        self.peers[shard_of(key, self.peers.len())].send(cmd);
    }

    /// Routes commands for ids that other cluster nodes own through
    /// `remote` from now on (set once, when the node joins its cluster).
    pub fn set_remote(&self, remote: Arc<dyn Remote>) {
        let _ = self.remote.set(remote);
    }

    /// Completes a send whose outcome came back from another node, as the
    /// shard that wrote it would have.
    pub fn complete(&self, done: Completion, result: SendResult, stored: bool) {
        complete(done, result, stored, |key, cmd| self.send_peer(key, cmd));
    }

    /// Sends the sessions of `inboxes` to catch up: entries a failed write
    /// hid are readable now, and no live push carried them.
    pub fn shown(&self, inboxes: Vec<u64>) {
        let mut by_shard: Vec<Vec<u64>> = vec![Vec::new(); self.peers.len()];
        for inbox in inboxes {
            by_shard[shard_of(inbox, self.peers.len())].push(inbox);
        }
        for (p, inboxes) in self.peers.iter().zip(by_shard) {
            if !inboxes.is_empty() {
                p.send(ShardCmd::Shown(inboxes));
            }
        }
    }

    /// Tells every shard that the store stopped serving the run of slots
    /// `run` (its cluster shard moved away).
    pub fn lost(&self, run: std::ops::Range<u16>) {
        for p in self.peers.iter() {
            p.send(ShardCmd::Slots(SlotsChange::Lost(run.clone())));
        }
    }

    /// Tells every shard that the store serves the run of slots `run` now
    /// (a cluster shard moved here), with the groups' fan-out marks of the
    /// run so that interrupted fan-outs go on.
    pub fn gained(
        &self,
        store: &dyn InboxStore,
        run: std::ops::Range<u16>,
    ) -> Result<(), courier_storage::StoreError> {
        let marks = fan_out_marks(store, self.peers.len(), Some(run.clone()))?;
        for (p, marks) in self.peers.iter().zip(marks) {
            p.send(ShardCmd::Slots(SlotsChange::Gained {
                run: run.clone(),
                marks,
            }));
        }
        Ok(())
    }

    /// Stops every shard after what is already queued, and waits for them.
    pub async fn stop(&self) {
        for q in &self.queues {
            let _ = q.send(ShardCmd::Stop).await;
        }
        let threads = std::mem::take(&mut *self.threads.lock().expect("threads lock"));
        tokio::task::spawn_blocking(move || {
            for t in threads {
                let _ = t.join();
            }
        })
        .await
        .ok();
    }
}

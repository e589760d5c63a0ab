//! What every connection of a node shares.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use courier_protocol::GROUP_ID_BIT;
use courier_storage::{Clock, InboxStore};
use tokio_util::sync::CancellationToken;

use crate::auth::TokenKey;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::shard::handle::Shards;

pub struct Node {
    pub config: Config,
    pub store: Arc<dyn InboxStore>,
    pub shards: Shards,
    pub metrics: Arc<Metrics>,
    pub key: TokenKey,
    /// The node's one clock: token expiry, server times, status expiry; the
    /// shards and the store read the same one.
    pub clock: Clock,
    /// Cancelled when shutdown starts.
    pub shutdown: CancellationToken,
    /// True once listeners are up and until shutdown starts.
    pub ready: AtomicBool,
    pub next_session: AtomicU64,
    /// Source of new group and status ids (low bits). Seeded from the clock
    /// at start so ids stay unique across restarts.
    pub next_group: AtomicU64,
    pub started: std::time::Instant,
}

impl Node {
    /// A new group id (`GROUP_ID_BIT` set).
    pub fn new_group_id(&self) -> u64 {
        GROUP_ID_BIT | (self.next_group.fetch_add(1, Ordering::Relaxed) & !GROUP_ID_BIT)
    }

    /// A new status id (from the same source, without the group bit).
    pub fn new_status_id(&self) -> u64 {
        self.new_group_id() & !GROUP_ID_BIT
    }
}

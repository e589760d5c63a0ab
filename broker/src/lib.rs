//! Courier's broker: the `courier` server.
//!
//! A client connection ([`conn`]) authenticates ([`auth`]), then its reader
//! sends requests to the shard that owns the destination user ([`shard`]);
//! a shard is the single writer of its users' inboxes in the store
//! (`courier-storage`) and pushes what it stored to the recipients' live
//! sessions. [`server`] binds the listeners, runs the accept loop and the
//! graceful shutdown; [`admin`] serves `/healthz` and `/readyz`; [`config`]
//! loads settings; [`cli`] is the command line. Fan-out lives in [`groups`]
//! (group logs and their two delivery strategies) and [`receipts`] (marks
//! and receipt messages); [`social`] holds contacts, broadcast lists and
//! statuses; [`keys`] lays out the broker's state in the store. `docs/ARCHITECTURE.md` draws
//! the whole data flow.

pub mod admin;
pub mod auth;
pub mod cli;
pub mod config;
pub mod conn;
pub mod groups;
pub mod keys;
pub mod metrics;
pub mod net;
pub mod receipts;
pub mod server;
pub mod shard;
pub mod social;

use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use courier_storage::InboxStore;
use tokio_util::sync::CancellationToken;

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// What every connection shares.
pub struct Node {
    pub config: config::Config,
    pub store: Arc<dyn InboxStore>,
    pub shards: shard::Shards,
    pub metrics: Arc<metrics::Metrics>,
    pub key: auth::TokenKey,
    /// Cancelled when shutdown starts.
    pub shutdown: CancellationToken,
    /// True once listeners are up and until shutdown starts.
    pub ready: AtomicBool,
    pub next_session: AtomicU64,
    /// Source of new group ids (low bits; `GROUP_ID_BIT` is added). Seeded
    /// from the clock at start so ids stay unique across restarts.
    pub next_group: AtomicU64,
    pub started: std::time::Instant,
}

impl Node {
    pub fn new_group_id(&self) -> u64 {
        courier_protocol::GROUP_ID_BIT
            | (self
                .next_group
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                & !courier_protocol::GROUP_ID_BIT)
    }
}

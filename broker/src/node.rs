//! What every connection of a node shares.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use courier_protocol::GROUP_ID_BIT;
use courier_storage::{Clock, InboxStore};
use tokio_util::sync::CancellationToken;

use crate::auth::TokenKey;
use crate::certs::TlsSettings;
use crate::config::Config;
use crate::gate::{Gate, GateLimits, SendRates, REFUSING_MAX};
use crate::metrics::Metrics;
use crate::shard::handle::Shards;
use crate::shard::ShardConfig;

pub struct Node {
    pub config: Config,
    pub store: Arc<dyn InboxStore>,
    pub shards: Shards,
    pub metrics: Arc<Metrics>,
    pub key: TokenKey,
    /// Admission: connection budgets, unauthenticated budgets, rates.
    pub gate: Gate,
    /// The client port's TLS configuration (`None`: plain TCP).
    pub tls: Option<TlsSettings>,
    /// Sends per second per user (`limits.sends_per_user_per_sec`).
    pub send_rates: SendRates,
    /// The node's one clock: token expiry, server times, status expiry; the
    /// shards and the store read the same one.
    pub clock: Clock,
    /// With `test_clock`: how far the admin port has moved `clock` forward.
    pub clock_shift: std::sync::OnceLock<Arc<AtomicU64>>,
    /// Which users of this node's shards are businesses, for the sessions.
    pub businesses: Arc<crate::shard::business_state::Directory>,
    /// Cancelled when shutdown starts.
    pub shutdown: CancellationToken,
    /// True once listeners are up and until shutdown starts.
    pub ready: AtomicBool,
    pub next_session: AtomicU64,
    /// Source of new group and status ids (low bits). Seeded from the clock
    /// at start so ids stay unique across restarts.
    pub next_group: AtomicU64,
    pub started: std::time::Instant,
    /// Lets the accept loops' error line through once per 10 seconds.
    pub accept_log: LogEvery,
    /// Free space on the data directory is under `storage.min_free_mb`:
    /// sends are refused with `STORAGE_FULL` (set by the disk watch).
    pub disk_full: AtomicBool,
    /// This node's cluster membership, set at start when the node was
    /// started with a cluster name (a single node has none).
    pub cluster: std::sync::OnceLock<Arc<crate::cluster::Cluster>>,
    /// The businesses the shards poke for their webhooks, until the server
    /// starts the sender that reads them (`webhooks::start`).
    pub webhook_pokes: std::sync::Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<u64>>>,
}

/// Lets a repeated log line through at most once per interval and counts
/// the occurrences in between, so a storm stays readable (the metric
/// beside it counts every one).
pub struct LogEvery {
    interval_ms: u64,
    next_ms: AtomicU64,
    count: AtomicU64,
}

impl LogEvery {
    pub fn new(interval_ms: u64) -> LogEvery {
        LogEvery {
            interval_ms,
            next_ms: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    /// Counts one occurrence; true if this one should be logged.
    pub fn due(&self, now_ms: u64) -> bool {
        self.count.fetch_add(1, Ordering::Relaxed);
        let next = self.next_ms.load(Ordering::Relaxed);
        now_ms >= next
            && self
                .next_ms
                .compare_exchange(
                    next,
                    now_ms + self.interval_ms,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
    }

    /// Occurrences since the last call (the one being logged included).
    pub fn take(&self) -> u64 {
        self.count.swap(0, Ordering::Relaxed)
    }
}

impl Node {
    /// A node over `store`: its shards started, its metrics, budgets and
    /// flags, serving nothing yet (the server binds the listeners; the
    /// session fuzz target drives sessions over loopback sockets).
    pub fn assemble(
        config: Config,
        store: Arc<dyn InboxStore>,
        key: TokenKey,
        clock: Clock,
        connections_max: usize,
        tls: Option<TlsSettings>,
    ) -> std::io::Result<Arc<Node>> {
        let limits = &config.limits;
        let businesses = Arc::new(crate::shard::business_state::Directory::new(
            config.business.platform_account,
        ));
        // Connected before the shards start: each pokes its businesses
        // with a webhook as it loads them.
        let (webhooks, pokes) = tokio::sync::mpsc::unbounded_channel();
        businesses.send_webhooks_to(webhooks);
        let shards = Shards::start(
            config.shard_count(),
            ShardConfig {
                queue_len: limits.shard_queue_len,
                batch_max: limits.shard_batch_max,
                acked_retention_ms: config.retention.acked_retention_ms,
                max_group_members: config.groups.max_members,
                max_groups_per_user: config.groups.max_per_user,
                // In a cluster shards move, so "every member on the group's
                // node" does not last: groups keep references (and copies
                // for members elsewhere) at any size there.
                log_threshold: if config.cluster.enabled() {
                    usize::MAX
                } else {
                    config.groups.log_threshold
                },
                mark_coalesce: Duration::from_millis(limits.mark_coalesce_ms),
                clock: clock.clone(),
                business: Arc::new(config.business.clone()),
                directory: businesses.clone(),
                clicks: (!config.business.click_base_url.is_empty()).then(|| {
                    Arc::new(crate::shard::ClickLinks {
                        base: config
                            .business
                            .click_base_url
                            .trim_end_matches('/')
                            .to_owned(),
                        key: key.clone(),
                    })
                }),
                reports: crate::reports::Reports::start(crate::reports::QUEUE_LEN)?,
            },
            store.clone(),
        )?;
        let gate = Gate::new(GateLimits {
            connections: connections_max,
            unauthenticated: limits.max_unauthenticated,
            unauthenticated_per_source: limits.max_unauthenticated_per_source,
            new_per_source_per_sec: limits.new_connections_per_source_per_sec,
            refusing: (limits.reserved_files / 2).min(REFUSING_MAX),
        });
        let send_rates = SendRates::new(limits.sends_per_user_per_sec);
        let metrics = Arc::new(Metrics::new(&shards.stats));
        Ok(Arc::new(Node {
            webhook_pokes: std::sync::Mutex::new(Some(pokes)),
            config,
            store,
            shards,
            metrics,
            key,
            gate,
            tls,
            send_rates,
            // Milliseconds since the epoch times 1,024: a restart a
            // millisecond later starts above every id handed out before
            // (at < 1,024 groups/ms).
            next_group: AtomicU64::new(clock.now_ms() << 10),
            clock,
            clock_shift: std::sync::OnceLock::new(),
            businesses,
            shutdown: CancellationToken::new(),
            ready: AtomicBool::new(false),
            next_session: AtomicU64::new(1),
            started: std::time::Instant::now(),
            accept_log: LogEvery::new(10_000),
            disk_full: AtomicBool::new(false),
            cluster: std::sync::OnceLock::new(),
        }))
    }

    /// A new group id (`GROUP_ID_BIT` set). In a cluster, one whose shard
    /// this node owns: the group lives beside its creator, and no two nodes
    /// can hand out the same id.
    /// `None` when this node holds no shard (a cluster node that has not
    /// read the map yet).
    pub fn new_group_id(&self) -> Option<u64> {
        // With any shard of 256 here, one id in 256 or more is ours: this
        // many tries miss one only if none is.
        for _ in 0..100_000 {
            let id = self.next_id() | GROUP_ID_BIT;
            if self.is_local(id) {
                return Some(id);
            }
        }
        None
    }

    fn next_id(&self) -> u64 {
        self.next_group.fetch_add(1, Ordering::Relaxed) & !GROUP_ID_BIT
    }

    /// Whether this node's shards hold `id` (a user or group): always on a
    /// single node; in a cluster, when the map it has read gives it `id`'s
    /// shard (never before it has read one).
    pub fn is_local(&self, id: u64) -> bool {
        self.cluster.get().is_none_or(|c| c.owns(id))
    }

    /// A new status id (from the same source, without the group bit; it
    /// is the poster's, so any node may draw it).
    pub fn new_status_id(&self) -> u64 {
        self.next_id()
    }
}

#[cfg(test)]
mod tests {
    use super::LogEvery;

    #[test]
    fn a_storm_is_logged_once_per_interval_with_its_count() {
        let log = LogEvery::new(10_000);
        assert!(log.due(1_000));
        assert_eq!(log.take(), 1);
        let logged = (0..600).filter(|i| log.due(1_000 + i * 10)).count();
        assert_eq!(logged, 0, "60 per second for 6 s: none within the interval");
        assert!(log.due(11_000));
        assert_eq!(log.take(), 601, "the line says how many there were");
    }
}

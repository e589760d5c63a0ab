//! Prometheus metrics, served at `/metrics` on the admin port.
//!
//! Every handle is resolved once, when the node starts (one counter per
//! frame type, per close reason, per error code, per shard), so the hot
//! path does an atomic add and never looks a label up. Label sets are small
//! and bounded: no user or group ids ever become labels.
//!
//! The shards keep their own counters ([`ShardMetrics`]) and the store
//! reports its health when `/metrics` is scraped; both are registered here.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use courier_protocol::{frame_type, frame_type_name, ErrorCode};
use courier_storage::StoreHealth;
use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use crate::gate::Refusal;
use crate::net::IoPath;

/// Latency buckets, in seconds: 20 µs to 5 s.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.00002, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
    0.5, 1.0, 2.5, 5.0,
];

/// Size buckets (members, commands, appends): 1 to 4,096.
pub const SIZE_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 4096.0,
];

/// Why a connection ended (the `reason` label of `courier_connections_closed_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseReason {
    /// The client closed it (or said goodbye).
    ClientClosed,
    /// A read or write failed (reset, broken pipe).
    IoError,
    /// Nothing received for `limits.idle_timeout_ms`.
    IdleTimeout,
    /// A frame that could not be decoded, or a frame out of place.
    ProtocolError,
    /// No valid hello in time, or an unsupported version.
    HandshakeFailed,
    /// The token did not verify.
    AuthFailed,
    /// The node was shutting down.
    ShuttingDown,
    /// Refused at accept: too many connections, or not ready.
    Refused,
    /// The store failed while the session was starting or catching up.
    StorageError,
    /// A cluster gateway forwarded the session to its user's node, where it
    /// ended (that node counts its own reason).
    Forwarded,
    /// The node that owns the user's shard was out of reach.
    Unavailable,
}

impl CloseReason {
    /// In declaration order: `reason as usize` indexes it.
    pub const ALL: [CloseReason; 11] = [
        CloseReason::ClientClosed,
        CloseReason::IoError,
        CloseReason::IdleTimeout,
        CloseReason::ProtocolError,
        CloseReason::HandshakeFailed,
        CloseReason::AuthFailed,
        CloseReason::ShuttingDown,
        CloseReason::Refused,
        CloseReason::StorageError,
        CloseReason::Forwarded,
        CloseReason::Unavailable,
    ];

    pub fn label(self) -> &'static str {
        match self {
            CloseReason::ClientClosed => "client_closed",
            CloseReason::IoError => "io_error",
            CloseReason::IdleTimeout => "idle_timeout",
            CloseReason::ProtocolError => "protocol_error",
            CloseReason::HandshakeFailed => "handshake_failed",
            CloseReason::AuthFailed => "auth_failed",
            CloseReason::ShuttingDown => "shutting_down",
            CloseReason::Refused => "refused",
            CloseReason::StorageError => "storage_error",
            CloseReason::Forwarded => "forwarded",
            CloseReason::Unavailable => "unavailable",
        }
    }

    /// The reason a server-sent goodbye code stands for.
    pub fn of_code(code: ErrorCode) -> CloseReason {
        match code {
            ErrorCode::IDLE_TIMEOUT => CloseReason::IdleTimeout,
            ErrorCode::SHUTTING_DOWN => CloseReason::ShuttingDown,
            ErrorCode::INTERNAL => CloseReason::StorageError,
            ErrorCode::AUTH_FAILED | ErrorCode::TOKEN_EXPIRED => CloseReason::AuthFailed,
            ErrorCode::HANDSHAKE_TIMEOUT | ErrorCode::UNSUPPORTED_VERSION => {
                CloseReason::HandshakeFailed
            }
            ErrorCode::TOO_MANY_CONNECTIONS => CloseReason::Refused,
            ErrorCode::SHARD_UNAVAILABLE => CloseReason::Unavailable,
            _ => CloseReason::ProtocolError,
        }
    }
}

/// Why a token was refused (the `reason` label of `courier_auth_failures_total`).
#[derive(Clone, Copy, Debug)]
pub enum AuthFailure {
    /// Not a token, or its signature does not verify.
    BadToken,
    /// Signed for another user or device.
    WrongIdentity,
    Expired,
    /// The user id itself is not a valid user (0, or a group id).
    InvalidUser,
}

impl AuthFailure {
    /// In declaration order: `reason as usize` indexes it.
    const ALL: [AuthFailure; 4] = [
        AuthFailure::BadToken,
        AuthFailure::WrongIdentity,
        AuthFailure::Expired,
        AuthFailure::InvalidUser,
    ];

    fn label(self) -> &'static str {
        match self {
            AuthFailure::BadToken => "bad_token",
            AuthFailure::WrongIdentity => "wrong_identity",
            AuthFailure::Expired => "expired",
            AuthFailure::InvalidUser => "invalid_user",
        }
    }
}

/// Counters the shards update (one set for all shards, plus per-shard
/// queue counters).
pub struct ShardMetrics {
    pub messages_stored: IntCounter,
    pub duplicates: IntCounter,
    pub held_in_line: IntCounter,
    pub live_pushes: IntCounter,
    pub demotions: IntCounter,
    pub storage_errors: IntCounter,
    pub group_messages: IntCounter,
    pub refs_stored: IntCounter,
    pub receipts_stored: IntCounter,
    /// Receipts that moved a sender's fact row (senders who take receipts
    /// as facts; a repeat that moves nothing is not counted).
    pub receipt_facts: IntCounter,
    /// Marks whose range was read back from the store (not all among the
    /// shard's remembered recent entries).
    pub receipt_range_reads: IntCounter,
    /// Commands put on each shard's queues, and taken off them (children
    /// of the two families, one per shard).
    pub queue_pushed: Vec<IntCounter>,
    pub queue_popped: Vec<IntCounter>,
    queue_families: [IntCounterVec; 2],
    /// Commands a shard took in one turn of its loop.
    pub shard_batch: Histogram,
    /// Appends in one storage write, and how long the write took.
    pub write_batch: Histogram,
    pub write_seconds: Histogram,
    /// Members a group message was addressed to.
    pub fanout_size: Histogram,
    /// From the connection accepting a send to its message being durable
    /// (in the recipient's inbox or the group's log).
    pub accept_to_durable: Histogram,
    /// Business messages' status changes, platform-wide, by change (never
    /// by business: the label's values are the seven changes).
    pub business_changes: IntCounterVec,
    /// `business_changes`' counters, by `Change` (its order).
    pub business_change: Vec<IntCounter>,
    /// Campaigns' customers, platform-wide: admitted, refused by a rule,
    /// and sends repeated (after a restart, a failover or no outcome).
    pub campaign_customers: IntCounterVec,
}

fn counter(name: &str, help: &str) -> IntCounter {
    IntCounter::new(name, help).expect("valid metric")
}

pub(crate) fn histogram(name: &str, help: &str, buckets: &[f64]) -> Histogram {
    Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec()))
        .expect("valid metric")
}

/// The business message changes, in `Change`'s order.
const CHANGES: [&str; 7] = [
    "accepted",
    "failed",
    "sent",
    "delivered",
    "read",
    "clicked",
    "converted",
];

impl ShardMetrics {
    pub fn new(shards: usize) -> ShardMetrics {
        let business_changes = IntCounterVec::new(
            Opts::new(
                "courier_business_message_changes_total",
                "Business messages' status changes, all businesses together, by change: accepted, failed, sent, delivered, read, clicked, converted.",
            ),
            &["change"],
        )
        .expect("valid metric");
        let family = |name: &str, help: &str| {
            IntCounterVec::new(Opts::new(name, help), &["shard"]).expect("valid metric")
        };
        let pushed = family(
            "courier_shard_queue_pushed_total",
            "Commands put on a shard's queues.",
        );
        let popped = family(
            "courier_shard_queue_popped_total",
            "Commands a shard took off its queues.",
        );
        let children = |v: &IntCounterVec| -> Vec<IntCounter> {
            (0..shards)
                .map(|s| v.with_label_values(&[&s.to_string()]))
                .collect()
        };
        ShardMetrics {
            messages_stored: counter(
                "courier_messages_stored_total",
                "Messages appended to inboxes.",
            ),
            duplicates: counter(
                "courier_duplicate_sends_total",
                "Sends answered from the idempotency index.",
            ),
            held_in_line: counter(
                "courier_sends_held_in_line_total",
                "Sends (and group entries for a member) refused SHARD_UNAVAILABLE because an older one of the conversation was refused here and waits for its retry.",
            ),
            live_pushes: counter(
                "courier_live_pushes_total",
                "Messages the shards handed to live sessions.",
            ),
            demotions: counter(
                "courier_slow_consumer_demotions_total",
                "Sessions moved from live push to catch-up because their queue was full.",
            ),
            storage_errors: counter(
                "courier_storage_errors_total",
                "Storage writes that failed (their sends were rejected).",
            ),
            group_messages: counter(
                "courier_group_messages_total",
                "Group messages appended to group logs.",
            ),
            refs_stored: counter(
                "courier_group_references_total",
                "References to group messages appended to member inboxes.",
            ),
            receipts_stored: counter(
                "courier_receipts_stored_total",
                "Receipt messages appended to senders' inboxes.",
            ),
            receipt_facts: counter(
                "courier_receipt_facts_total",
                "Receipts that moved a sender's receipt fact (senders who take receipts as facts).",
            ),
            receipt_range_reads: counter(
                "courier_receipt_range_reads_total",
                "Marks whose newly covered inbox range was read from the store (not remembered in memory).",
            ),
            queue_pushed: children(&pushed),
            queue_popped: children(&popped),
            queue_families: [pushed, popped],
            shard_batch: histogram(
                "courier_shard_batch_size",
                "Commands a shard handled in one turn.",
                SIZE_BUCKETS,
            ),
            write_batch: histogram(
                "courier_storage_write_batch_size",
                "Appends in one storage write.",
                SIZE_BUCKETS,
            ),
            write_seconds: histogram(
                "courier_storage_write_seconds",
                "Time of one storage write (including its WAL sync when durable).",
                LATENCY_BUCKETS,
            ),
            fanout_size: histogram(
                "courier_fanout_size",
                "Recipients of one group message.",
                SIZE_BUCKETS,
            ),
            accept_to_durable: histogram(
                "courier_accept_to_durable_seconds",
                "From a send accepted on its connection to its message being durable.",
                LATENCY_BUCKETS,
            ),
            business_change: CHANGES
                .iter()
                .map(|c| business_changes.with_label_values(&[c]))
                .collect(),
            business_changes,
            campaign_customers: {
                let v = IntCounterVec::new(
                    Opts::new(
                        "courier_campaign_customers_total",
                        "Campaigns' customers, all businesses together: admitted, refused (by a rule), resent (a send repeated after a restart, a failover or no outcome).",
                    ),
                    &["outcome"],
                )
                .expect("valid metric");
                for c in ["admitted", "refused", "resent"] {
                    v.with_label_values(&[c]);
                }
                v
            },
        }
    }

    fn register(&self, r: &Registry) {
        for c in [
            &self.messages_stored,
            &self.duplicates,
            &self.held_in_line,
            &self.live_pushes,
            &self.demotions,
            &self.storage_errors,
            &self.group_messages,
            &self.refs_stored,
            &self.receipts_stored,
            &self.receipt_facts,
            &self.receipt_range_reads,
        ] {
            register(r, c.clone());
        }
        for f in self
            .queue_families
            .iter()
            .chain([&self.business_changes, &self.campaign_customers])
        {
            register(r, f.clone());
        }
        for h in [
            &self.shard_batch,
            &self.write_batch,
            &self.write_seconds,
            &self.fanout_size,
            &self.accept_to_durable,
        ] {
            register(r, h.clone());
        }
    }
}

fn register<C: prometheus::core::Collector + 'static>(r: &Registry, c: C) {
    r.register(Box::new(c)).expect("metric names are unique");
}

/// The node's metrics: connection and protocol counters here, the shards'
/// in [`ShardMetrics`], the store's health read at each scrape.
pub struct Metrics {
    registry: Registry,
    pub connections_open: IntGauge,
    pub connections_accepted: IntCounter,
    closed: Vec<IntCounter>,
    /// By `Refusal` (declaration order).
    refused: Vec<IntCounter>,
    /// Accept errors: out of descriptors, other.
    accept_errors: [IntCounter; 2],
    /// Waiting handshakes closed to make room (`limits.max_unauthenticated`).
    pub handshakes_evicted: IntCounter,
    /// 1 while sends are refused for want of disk space.
    pub storage_full: IntGauge,
    /// TLS handshakes that failed or timed out.
    pub tls_handshake_failures: IntCounter,
    /// Successful reloads of the TLS certificates (SIGHUP).
    pub tls_reloads: IntCounter,
    auth_failures: Vec<IntCounter>,
    /// By frame type byte; the last slot counts unknown types.
    frames_in: Vec<IntCounter>,
    frames_out: Vec<IntCounter>,
    accepted: IntCounter,
    rejected: HashMap<u16, IntCounter>,
    rejected_other: IntCounter,
    pub deliveries_live: IntCounter,
    pub deliveries_catch_up: IntCounter,
    /// Sessions closed because a catch-up read from the store failed
    /// (never a client that went away).
    pub catch_up_storage_errors: IntCounter,
    /// From a send accepted on its connection to a recipient's session
    /// writing it to its socket (live pushes only).
    pub accept_to_push: Histogram,
    io_path: IntGaugeVec,
    store: StoreGauges,
    /// The store's own count, brought up to date at each scrape.
    wal_syncs: IntCounter,
    /// Serialises scrapes (the store figures are set, then gathered).
    scrape: Mutex<()>,
}

struct StoreGauges {
    pending_compaction_bytes: IntGauge,
    write_stopped: IntGauge,
    write_delayed: IntGauge,
    memtable_bytes: IntGauge,
    block_cache_bytes: IntGauge,
    live_data_bytes: IntGauge,
    sst_bytes: IntGauge,
    running_compactions: IntGauge,
    disk_free_bytes: IntGauge,
    disk_size_bytes: IntGauge,
}

impl Metrics {
    /// Adds a collector that lives elsewhere (the cluster's gauges) to
    /// what `/metrics` serves.
    pub fn register<C: prometheus::core::Collector + 'static>(&self, c: C) {
        register(&self.registry, c);
    }

    /// A histogram of durations in seconds ([`LATENCY_BUCKETS`]), served
    /// by `/metrics`, for a collector that lives elsewhere.
    pub fn latency_histogram(&self, name: &str, help: &str) -> Histogram {
        let h = histogram(name, help, LATENCY_BUCKETS);
        self.register(h.clone());
        h
    }

    pub fn new(shards: &ShardMetrics) -> Metrics {
        let r = Registry::new();
        shards.register(&r);
        let vec = |name: &str, help: &str, label: &str| {
            let v = IntCounterVec::new(Opts::new(name, help), &[label]).expect("valid metric");
            register(&r, v.clone());
            v
        };

        let closed_vec = vec(
            "courier_connections_closed_total",
            "Connections closed, by reason.",
            "reason",
        );
        let refused_vec = vec(
            "courier_connections_refused_total",
            "Connections refused at accept, by budget: connections, source_unauthenticated, source_rate.",
            "reason",
        );
        let accept_errors_vec = vec(
            "courier_accept_errors_total",
            "Accepts that failed, by kind: files (out of descriptors), other.",
            "kind",
        );
        let auth_vec = vec(
            "courier_auth_failures_total",
            "Handshakes refused for their token, by reason.",
            "reason",
        );
        let frames_in_vec = vec(
            "courier_frames_in_total",
            "Frames received from clients, by type.",
            "type",
        );
        let frames_out_vec = vec(
            "courier_frames_out_total",
            "Frames sent to clients, by type.",
            "type",
        );
        let rejected_vec = vec(
            "courier_messages_rejected_total",
            "Sends rejected, by error code.",
            "code",
        );
        let deliveries_vec = vec(
            "courier_deliveries_total",
            "Messages written to client sockets, by path: live push or catch-up from storage.",
            "path",
        );
        let types = (0..=frame_type::LAST)
            .map(frame_type_name)
            .chain(std::iter::once("unknown"));
        let frames_in = types
            .clone()
            .map(|t| frames_in_vec.with_label_values(&[t]))
            .collect();
        let frames_out = types
            .map(|t| frames_out_vec.with_label_values(&[t]))
            .collect();
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).expect("valid metric");
            register(&r, g.clone());
            g
        };
        let counter_r = |name: &str, help: &str| {
            let c = counter(name, help);
            register(&r, c.clone());
            c
        };
        let io_path = IntGaugeVec::new(
            Opts::new(
                "courier_io_path",
                "The network path in use (1 for the one running).",
            ),
            &["path"],
        )
        .expect("valid metric");
        register(&r, io_path.clone());
        let build = IntGaugeVec::new(
            Opts::new("courier_build_info", "Build of this node (always 1)."),
            &["version", "protocol"],
        )
        .expect("valid metric");
        register(&r, build.clone());
        build
            .with_label_values(&[
                env!("CARGO_PKG_VERSION"),
                &courier_protocol::PROTOCOL_VERSION.to_string(),
            ])
            .set(1);
        let accept_to_push = histogram(
            "courier_accept_to_push_seconds",
            "From a send accepted on its connection to a recipient's live session writing it to its socket.",
            LATENCY_BUCKETS,
        );
        register(&r, accept_to_push.clone());

        Metrics {
            connections_open: gauge("courier_connections_open", "Client sessions open now."),
            connections_accepted: counter_r(
                "courier_connections_accepted_total",
                "TCP connections accepted on the client listener.",
            ),
            closed: CloseReason::ALL
                .iter()
                .map(|r| closed_vec.with_label_values(&[r.label()]))
                .collect(),
            refused: Refusal::ALL
                .iter()
                .map(|r| refused_vec.with_label_values(&[r.label()]))
                .collect(),
            accept_errors: [
                accept_errors_vec.with_label_values(&["files"]),
                accept_errors_vec.with_label_values(&["other"]),
            ],
            tls_handshake_failures: counter_r(
                "courier_tls_handshake_failures_total",
                "TLS handshakes on the client port that failed or timed out.",
            ),
            tls_reloads: counter_r(
                "courier_tls_reloads_total",
                "TLS certificate reloads (SIGHUP) that succeeded.",
            ),
            storage_full: gauge(
                "courier_storage_full",
                "1 while sends are refused because the data disk has less than storage.min_free_mb free.",
            ),
            handshakes_evicted: counter_r(
                "courier_handshakes_evicted_total",
                "Oldest waiting handshakes closed because limits.max_unauthenticated connections were waiting.",
            ),
            auth_failures: AuthFailure::ALL
                .iter()
                .map(|r| auth_vec.with_label_values(&[r.label()]))
                .collect(),
            frames_in,
            frames_out,
            accepted: counter_r(
                "courier_messages_accepted_total",
                "Sends acknowledged to their sender (stored, or found stored by a retry).",
            ),
            rejected: ErrorCode::ALL
                .iter()
                .map(|c| (c.0, rejected_vec.with_label_values(&[c.name()])))
                .collect(),
            rejected_other: rejected_vec.with_label_values(&["UNKNOWN"]),
            deliveries_live: deliveries_vec.with_label_values(&["live"]),
            deliveries_catch_up: deliveries_vec.with_label_values(&["catch_up"]),
            catch_up_storage_errors: counter_r(
                "courier_catch_up_storage_errors_total",
                "Sessions closed because reading their catch-up from the store failed.",
            ),
            accept_to_push,
            io_path,
            store: StoreGauges {
                pending_compaction_bytes: gauge(
                    "courier_rocksdb_pending_compaction_bytes",
                    "Bytes RocksDB estimates compaction still has to rewrite.",
                ),
                write_stopped: gauge(
                    "courier_rocksdb_write_stopped",
                    "1 while RocksDB has stopped writes (a write stall).",
                ),
                write_delayed: gauge(
                    "courier_rocksdb_write_delayed",
                    "1 while RocksDB is slowing writes down.",
                ),
                memtable_bytes: gauge(
                    "courier_rocksdb_memtable_bytes",
                    "Memory in RocksDB memtables.",
                ),
                block_cache_bytes: gauge(
                    "courier_rocksdb_block_cache_bytes",
                    "Memory in RocksDB's block cache.",
                ),
                live_data_bytes: gauge(
                    "courier_rocksdb_live_data_bytes",
                    "RocksDB's estimate of live data size.",
                ),
                sst_bytes: gauge("courier_rocksdb_sst_bytes", "Bytes of SST files on disk."),
                running_compactions: gauge(
                    "courier_rocksdb_running_compactions",
                    "Compactions running now.",
                ),
                disk_free_bytes: gauge(
                    "courier_data_disk_free_bytes",
                    "Bytes available to the node on the data directory's file system.",
                ),
                disk_size_bytes: gauge(
                    "courier_data_disk_size_bytes",
                    "Size of the data directory's file system.",
                ),
            },
            wal_syncs: counter_r(
                "courier_wal_syncs_total",
                "Storage writes that synced the write-ahead log to disk.",
            ),
            scrape: Mutex::new(()),
            registry: r,
        }
    }

    /// Marks `path` as the network path in use (and the other as not).
    pub fn set_io_path(&self, path: IoPath) {
        for p in [IoPath::Epoll, IoPath::Uring] {
            self.io_path
                .with_label_values(&[p.name()])
                .set(i64::from(p == path));
        }
    }

    pub fn closed(&self, reason: CloseReason) {
        self.closed[reason as usize].inc();
    }

    pub fn refused(&self, why: Refusal) {
        self.refused[why as usize].inc();
    }

    pub fn accept_error(&self, e: &std::io::Error) {
        let out_of_files = matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE));
        self.accept_errors[usize::from(!out_of_files)].inc();
    }

    pub fn auth_failed(&self, reason: AuthFailure) {
        self.auth_failures[reason as usize].inc();
    }

    pub fn frame_in(&self, t: u8) {
        self.frame(&self.frames_in, t);
    }

    pub fn frame_out(&self, t: u8) {
        self.frame(&self.frames_out, t);
    }

    fn frame(&self, v: &[IntCounter], t: u8) {
        let i = (t as usize).min(v.len() - 1);
        v[i].inc();
    }

    pub fn accepted(&self) {
        self.accepted.inc();
    }

    pub fn messages_accepted(&self) -> u64 {
        self.accepted.get()
    }

    pub fn rejected(&self, code: ErrorCode) {
        self.rejected
            .get(&code.0)
            .unwrap_or(&self.rejected_other)
            .inc();
    }

    /// Observes the time since `accepted` into `h`.
    pub fn since(h: &Histogram, accepted: Instant) {
        h.observe(accepted.elapsed().as_secs_f64());
    }

    /// The exposition in Prometheus's text format, with the store's health
    /// read now.
    pub fn render(&self, health: Option<StoreHealth>, data_dir: &std::path::Path) -> String {
        let _one = self.scrape.lock().expect("scrape");
        if let Some((free, size)) = disk_space(data_dir) {
            self.store.disk_free_bytes.set(free as i64);
            self.store.disk_size_bytes.set(size as i64);
        }
        if let Some(h) = health {
            let g = &self.store;
            g.pending_compaction_bytes
                .set(h.pending_compaction_bytes as i64);
            g.write_stopped.set(i64::from(h.write_stopped));
            g.write_delayed.set(i64::from(h.write_delayed));
            g.memtable_bytes.set(h.memtable_bytes as i64);
            g.block_cache_bytes.set(h.block_cache_bytes as i64);
            g.live_data_bytes.set(h.live_data_bytes as i64);
            g.sst_bytes.set(h.sst_bytes as i64);
            g.running_compactions.set(h.running_compactions as i64);
            self.wal_syncs
                .inc_by(h.wal_syncs.saturating_sub(self.wal_syncs.get()));
        }
        let mut out = String::new();
        TextEncoder::new()
            .encode_utf8(&self.registry.gather(), &mut out)
            .expect("text encoding cannot fail");
        out
    }

    /// The content type of [`Metrics::render`]'s output.
    pub fn content_type() -> String {
        TextEncoder::new().format_type().to_string()
    }
}

/// (available, total) bytes of the file system holding `path`.
pub(crate) fn disk_space(path: &std::path::Path) -> Option<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs writes into the zeroed struct we own; `c` is a valid
    // NUL-terminated path.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
        return None;
    }
    let block = s.f_frsize as u64;
    Some((s.f_bavail as u64 * block, s.f_blocks as u64 * block))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `closed` and `auth_failed` index their counters by `reason as usize`.
    #[test]
    fn reason_lists_are_in_declaration_order() {
        for (i, r) in CloseReason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i, "{r:?}");
        }
        for (i, r) in AuthFailure::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i, "{r:?}");
        }
    }
}

#[cfg(test)]
mod change_order {
    /// `business_change` is indexed by `Change as usize`.
    #[test]
    fn the_change_counters_follow_the_changes_order() {
        use crate::state::business_events::Change::*;
        let all = [Accepted, Failed, Sent, Delivered, Read, Clicked, Converted];
        for (i, c) in all.into_iter().enumerate() {
            assert_eq!((c as usize, c.name()), (i, super::CHANGES[i]));
        }
    }
}

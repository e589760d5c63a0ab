//! Starting a node, the accept loop and graceful shutdown.
//!
//! Shutdown is signal-then-wait: SIGTERM or SIGINT cancels the node's token;
//! the accept loop stops, `/readyz` turns 503, every connection stops reading,
//! waits until its in-flight sends are answered, sends `Goodbye
//! SHUTTING_DOWN` and closes. The server waits for all of them (bounded by
//! `limits.shutdown_grace_ms`), then stops each shard after its queue is
//! drained and syncs the store.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use courier_protocol::ErrorCode;
use courier_storage::{RocksStore, StoreConfig};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::config::Config;
use crate::shard::{ShardConfig, Shards};
use crate::{admin, auth, conn, Node};

pub async fn run(config: Config) -> anyhow::Result<()> {
    let durability = config.durability()?;
    raise_open_file_limit(config.limits.max_connections);
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating data dir {}", config.data_dir.display()))?;
    let key = auth::load_or_create_secret(&config.secret_path())?;
    let db_path = config.data_dir.join("db");
    let store = RocksStore::open(
        &db_path,
        StoreConfig {
            durability,
            idempotency_window_ms: config.retention.idempotency_window_ms,
            block_cache_bytes: config.storage.block_cache_mb << 20,
            clock: courier_storage::Clock::system(),
        },
    )
    .with_context(|| format!("opening the store in {}", db_path.display()))?;
    let store: Arc<dyn courier_storage::InboxStore> = Arc::new(store);
    let shard_count = config.shard_count();
    let shards = Shards::start(
        shard_count,
        ShardConfig {
            queue_len: config.limits.shard_queue_len,
            batch_max: config.limits.shard_batch_max,
            acked_retention_ms: config.retention.acked_retention_ms,
            max_group_members: config.groups.max_members,
            max_groups_per_user: config.groups.max_per_user,
            log_threshold: config.groups.log_threshold,
        },
        store.clone(),
    )?;
    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding the client listener {}", config.listen))?;
    let admin_listener = TcpListener::bind(config.admin_listen)
        .await
        .with_context(|| format!("binding the admin listener {}", config.admin_listen))?;
    let client_addr = listener.local_addr()?;
    let admin_addr = admin_listener.local_addr()?;

    let metrics = Arc::new(crate::metrics::Metrics::new(&shards.stats));
    metrics.set_io_path("epoll");
    let node = Arc::new(Node {
        config,
        store: store.clone(),
        shards,
        metrics,
        key,
        shutdown: CancellationToken::new(),
        ready: AtomicBool::new(false),
        next_session: AtomicU64::new(1),
        // Milliseconds since the epoch times 1,024: a restart a millisecond
        // later starts above every id handed out before (at < 1,024 groups/ms).
        next_group: AtomicU64::new(crate::now_ms() << 10),
        started: std::time::Instant::now(),
    });
    tokio::spawn(admin::run(admin_listener, node.clone()));
    spawn_signal_handler(node.shutdown.clone());
    node.ready.store(true, Ordering::SeqCst);

    // Tests and scripts read these lines to find the ports.
    println!("courier {} serving", env!("CARGO_PKG_VERSION"));
    println!("  clients: {client_addr}");
    println!("  admin:   http://{admin_addr}/healthz");
    println!(
        "  data:    {} (durability {durability}, {shard_count} shards)",
        node.config.data_dir.display()
    );
    info!(%client_addr, %admin_addr, %durability, shard_count, "courier serving");

    let tracker = TaskTracker::new();
    let slots = Arc::new(Semaphore::new(node.config.limits.max_connections));
    loop {
        let (stream, _peer) = tokio::select! {
            _ = node.shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok(x) => {
                    node.metrics.connections_accepted.inc();
                    x
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off, keep serving.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        match slots.clone().try_acquire_owned() {
            Ok(slot) => {
                let node = node.clone();
                tracker.spawn(async move {
                    conn::serve(node, stream).await;
                    drop(slot);
                });
            }
            Err(_) => {
                node.metrics.closed(crate::metrics::CloseReason::Refused);
                tracker.spawn(conn::refuse(
                    stream,
                    ErrorCode::TOO_MANY_CONNECTIONS,
                    "connection limit reached",
                ));
            }
        }
    }

    info!("shutting down: no new connections; finishing accepted work");
    node.ready.store(false, Ordering::SeqCst);
    drop(listener);
    tracker.close();
    let grace =
        Duration::from_millis(node.config.limits.shutdown_grace_ms) + Duration::from_secs(2);
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        warn!(
            remaining = tracker.len(),
            "connections still open after the grace period; closing anyway"
        );
    }
    node.shards.stop().await;
    store.sync().context("final store sync")?;
    println!("courier stopped");
    info!("stopped");
    Ok(())
}

/// Every connection is a file descriptor (and RocksDB keeps its files
/// open): raise the soft open-file limit to the hard one, and warn when
/// even that is below `max_connections`.
fn raise_open_file_limit(max_connections: usize) {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) != 0 {
            return;
        }
        if r.rlim_cur < r.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: r.rlim_max,
                rlim_max: r.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                r = raised;
            }
        }
    }
    // RocksDB's files and the listeners need some of the descriptors.
    let room = r.rlim_cur.saturating_sub(1024);
    if (max_connections as u64) > room {
        warn!(
            open_files = r.rlim_cur,
            max_connections,
            "the open-file limit (RLIMIT_NOFILE) allows about {room} connections, fewer than \
             limits.max_connections; raise it (LimitNOFILE= in systemd, --ulimit nofile= in Docker)"
        );
    } else {
        info!(open_files = r.rlim_cur, "open-file limit");
    }
}

fn spawn_signal_handler(token: CancellationToken) {
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            warn!("cannot install signal handlers; stop the node with SIGKILL");
            return;
        };
        tokio::select! {
            _ = term.recv() => info!("SIGTERM received"),
            _ = int.recv() => info!("SIGINT received"),
        }
        token.cancel();
    });
}

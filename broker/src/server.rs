//! Starting a node, the accept loop and graceful shutdown.
//!
//! Shutdown is signal-then-wait: SIGTERM or SIGINT cancels the node's token;
//! the accept loop stops, `/readyz` turns 503, every connection stops reading,
//! waits until its in-flight sends are answered, sends `Goodbye
//! SHUTTING_DOWN` and closes. The server waits for all of them (bounded by
//! `limits.shutdown_grace_ms`), then stops each shard after its queue is
//! drained and syncs the store.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use courier_protocol::ErrorCode;
use courier_storage::{Clock, Layout, RocksStore, StoreConfig};
use tokio::net::TcpListener;
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};

use crate::certs::TlsSettings;
use crate::cluster::identity::Identity;
use crate::cluster::moves::Mover;
use crate::cluster::replica::Replication;
use crate::cluster::transfer::{Change, Slots};
use crate::cluster::Cluster;
use crate::config::Config;
use crate::gate::Admitted;
use crate::metrics::CloseReason;
use crate::net::seam::Transport;
use crate::net::tls::TlsWrite;
use crate::net::uring::UringStream;
use crate::net::{self, IoPath};
use crate::node::Node;
use crate::session::SpawnWriter;
use crate::{admin, auth, session};

pub async fn run(config: Config) -> anyhow::Result<()> {
    let durability = config.durability()?;
    if !config.unknown_env.is_empty() {
        warn!(
            variables = %config.unknown_env.join(", "),
            "ignoring COURIER_* environment variables that name no setting (see docs/CONFIGURATION.md)"
        );
    }
    // Before anything is opened: a forced io_uring that cannot run stops here.
    let (io, fallback) = net::choose(config.io)?;
    if let Some(why) = &fallback {
        warn!(reason = %why, "io_uring unavailable; using the epoll network path");
    }
    let connections_max = connection_budget(&config.limits);
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating data dir {}", config.data_dir.display()))?;
    // Before the store opens: a data dir serves one node of one cluster,
    // or a single node.
    let identity = config.cluster.enabled().then(|| Identity {
        cluster: config.cluster.name.clone(),
        node_id: config.cluster.node_id.clone(),
    });
    crate::cluster::identity::check(&config.data_dir, identity.as_ref())?;
    let key = auth::load_or_create_secret(&config.secret_path())?;
    // One clock for the store (idempotency window, expiring space), the
    // shards and the sessions.
    let shift = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let clock = if config.test_clock {
        warn!("test_clock is set: the admin port may move this node's clock forward");
        Clock::shifted(shift.clone())
    } else {
        Clock::system()
    };
    let db_path = config.data_dir.join("db");
    let store = RocksStore::open(
        &db_path,
        StoreConfig {
            durability,
            idempotency_window_ms: config.retention.idempotency_window_ms,
            block_cache_bytes: config.storage.block_cache_mb << 20,
            clock: clock.clone(),
            // A cluster node's shards move: each is a run of slots, one key
            // range per space.
            layout: if config.cluster.enabled() {
                crate::state::keys::slotted()
            } else {
                Layout::Flat
            },
        },
    )
    .with_context(|| format!("opening the store in {}", db_path.display()))?;
    let store: Arc<dyn courier_storage::InboxStore> = Arc::new(store);
    if let Some(t) = store.transfer() {
        // A cluster node serves no slot until it has read the map (below).
        t.serve_only(&[]);
    }
    let shard_count = config.shard_count();
    let listeners = Listeners::bind(io, config.listen, config.io_thread_count())
        .with_context(|| format!("binding the client listener {}", config.listen))?;
    let admin_listener = TcpListener::bind(config.admin_listen)
        .await
        .with_context(|| format!("binding the admin listener {}", config.admin_listen))?;
    let client_addr = listeners.local_addr()?;
    let admin_addr = admin_listener.local_addr()?;

    let tls = TlsSettings::load(&config.tls).context("loading the TLS certificates (tls.*)")?;
    // A cluster node's shards and sessions write through replication: a
    // write of a replicated shard returns once its copies have it (idle
    // until a map with a replication factor above 1).
    let replication = config
        .cluster
        .enabled()
        .then(|| Replication::new(config.cluster.node_id.clone(), store.clone()));
    let written = replication.as_ref().map_or(store.clone(), |r| r.store());
    let node = Node::assemble(config, written, key, clock, connections_max, tls)?;
    crate::webhooks::start(&node);
    node.metrics.set_io_path(io);
    if node.config.test_clock {
        let _ = node.clock_shift.set(shift);
    }
    if replication.is_none() {
        crate::cluster::replica::ReplicaMetrics::register_idle(&node.metrics);
    }
    if let Some(replication) = replication {
        let shards = Arc::downgrade(&node);
        replication.on_shown(Box::new(move |inboxes| {
            if let Some(node) = shards.upgrade() {
                node.shards.shown(inboxes);
            }
        }));
        let slots = Slots::new(
            store.clone(),
            node.config.cluster.node_id.clone(),
            &node.metrics,
        );
        let owner = Arc::new(crate::cluster::route::Owner {
            node: Arc::downgrade(&node),
            slots: slots.clone(),
            replication: replication.clone(),
        });
        // The store takes writes only for the slots of the shards the map
        // gives this node, from before anything routes by that map (none
        // until the first map is read); a shard that moved here has its
        // pending work taken up, one that moved away its sessions ended.
        let serve: crate::cluster::OnView = {
            let (slots, node) = (slots.clone(), Arc::downgrade(&node));
            let replication = replication.clone();
            Box::new(move |view| {
                // Tails of copies whose primary changed go first: the
                // promoted copy takes no more parts before it serves.
                replication.follow(view);
                let changes = slots.follow(view);
                let Some(node) = node.upgrade() else {
                    return;
                };
                for change in changes {
                    match change {
                        Change::Gained(shard, run) => {
                            info!(shard, "serving a shard that moved here");
                            if let Err(e) = node.shards.gained(&*node.store, run) {
                                error!(shard, error = %e, "reading the moved shard's fan-out marks failed");
                            }
                        }
                        Change::Lost(shard, run) => {
                            info!(shard, "a shard moved away; ending its sessions here");
                            node.shards.lost(run);
                        }
                    }
                }
            })
        };
        let cluster = Cluster::join(
            &node.config,
            client_addr,
            admin_addr,
            &node.metrics,
            owner,
            serve,
        )
        .await?;
        replication.start(cluster.clone(), slots.clone(), &node.metrics);
        let router = crate::cluster::route::Router::new(cluster.clone(), &node, slots.clone());
        node.shards.set_remote(Arc::new(router));
        tokio::spawn(Mover::new(cluster.clone(), store.clone(), slots).run());
        let _ = node.cluster.set(cluster);
    }
    let io_desc = match &listeners {
        Listeners::Epoll(_) => "epoll".to_owned(),
        Listeners::Uring(l) => format!("io_uring, {} rings", l.len()),
    };
    let tracker = TaskTracker::new();
    let (epoll_listener, rings) = match listeners {
        Listeners::Epoll(l) => (Some(l), Vec::new()),
        Listeners::Uring(l) => (None, start_rings(&node, l, &tracker)?),
    };
    tokio::spawn(admin::run(admin_listener, node.clone()));
    tokio::spawn(watch_disk(node.clone()));
    // The handlers are installed here, before the node announces itself:
    // a signal that came before a spawned task installed its own would
    // meet the default action (SIGHUP's ends the process).
    spawn_signal_handler(node.shutdown.clone());
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(hangup) => drop(tokio::spawn(reload_tls_on_hangup(node.clone(), hangup))),
        Err(e) => {
            warn!(error = %e, "cannot install the SIGHUP handler; TLS certificates will not be reloaded")
        }
    }
    node.ready.store(true, Ordering::SeqCst);

    // Tests and scripts read these lines to find the ports.
    println!("courier {} serving", env!("CARGO_PKG_VERSION"));
    println!("  clients: {client_addr}");
    println!("  admin:   http://{admin_addr}/healthz");
    println!(
        "  data:    {} (durability {durability}, {shard_count} shards)",
        node.config.data_dir.display()
    );
    if let Some(c) = node.cluster.get() {
        println!(
            "  cluster: {} as node {} (etcd {})",
            c.settings.name, c.settings.node_id, c.settings.etcd
        );
    }
    match &fallback {
        None => println!("  io:      {io_desc}"),
        Some(why) => println!("  io:      {io_desc} (io_uring unavailable: {why})"),
    }
    info!(%client_addr, %admin_addr, %durability, shard_count, io = io.name(), "courier serving");

    match epoll_listener {
        Some(listener) => accept_epoll(&node, listener, &tracker).await,
        // The rings accept on their own threads.
        None => node.shutdown.cancelled().await,
    }

    info!("shutting down: no new connections; finishing accepted work");
    node.ready.store(false, Ordering::SeqCst);
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
    if let Some(c) = node.cluster.get() {
        c.leave().await;
    }
    // Each ring stops once its connections are done (or its grace is over).
    tokio::task::spawn_blocking(move || {
        for r in rings {
            let _ = r.join();
        }
    })
    .await?;
    println!("courier stopped");
    info!("stopped");
    Ok(())
}

/// The client listeners of the chosen path: one tokio listener, or one
/// `SO_REUSEPORT` socket per io_uring thread (the kernel spreads new
/// connections over them).
enum Listeners {
    Epoll(TcpListener),
    Uring(Vec<std::net::TcpListener>),
}

impl Listeners {
    fn bind(io: IoPath, addr: SocketAddr, rings: usize) -> std::io::Result<Listeners> {
        match io {
            IoPath::Epoll => {
                let l = std::net::TcpListener::bind(addr)?;
                l.set_nonblocking(true)?;
                Ok(Listeners::Epoll(TcpListener::from_std(l)?))
            }
            IoPath::Uring => {
                let first = reuse_port_listener(addr)?;
                // Port 0: the others bind the port the first one got.
                let addr = first.local_addr()?;
                let mut all = vec![first];
                for _ in 1..rings.max(1) {
                    all.push(reuse_port_listener(addr)?);
                }
                Ok(Listeners::Uring(all))
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        match self {
            Listeners::Epoll(l) => l.local_addr(),
            Listeners::Uring(l) => l[0].local_addr(),
        }
    }
}

fn reuse_port_listener(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    s.bind(&addr.into())?;
    s.listen(1024)?;
    Ok(s.into())
}

/// What becomes of one accepted connection: served, refused with a
/// goodbye, or closed at once (no room left even to refuse politely).
enum Admission {
    Serve(Admitted),
    Refuse(ErrorCode, &'static str, OwnedSemaphorePermit),
    Close,
}

/// Asks the gate about a connection from `peer`, and counts the answer.
fn admit(node: &Node, peer: SocketAddr) -> Admission {
    node.metrics.connections_accepted.inc();
    // Another cluster node forwards many users' sessions from its one
    // address: per-source budgets are for clients, not for gateways.
    let gateway = node
        .cluster
        .get()
        .is_some_and(|c| c.links.is_node_address(peer.ip()));
    let source = (!gateway).then_some(peer.ip());
    match node.gate.admit(source, node.clock.now_ms()) {
        Ok(admitted) => {
            if admitted.evicted_another {
                node.metrics.handshakes_evicted.inc();
            }
            Admission::Serve(admitted)
        }
        Err(refused) => {
            node.metrics.refused(refused.why);
            node.metrics.closed(CloseReason::Refused);
            let (code, message) = refused.why.code();
            match refused.room {
                Some(room) => Admission::Refuse(code, message, room),
                None => Admission::Close,
            }
        }
    }
}

/// The next accepted connection, or `None` once the node stops. Accept
/// errors (out of descriptors, mostly) back off exponentially up to a
/// second, are counted, and are logged at most once per
/// 10 s (`Node::accept_log`) with how many there were since the last line.
async fn next_connection<S, F>(node: &Node, accept: impl Fn() -> F) -> Option<(S, SocketAddr)>
where
    F: std::future::Future<Output = std::io::Result<(S, SocketAddr)>>,
{
    let mut backoff = ACCEPT_BACKOFF_MIN;
    loop {
        tokio::select! {
            _ = node.shutdown.cancelled() => return None,
            r = accept() => match r {
                Ok(x) => return Some(x),
                Err(e) => {
                    node.metrics.accept_error(&e);
                    if node.accept_log.due(node.clock.now_ms()) {
                        let since = node.accept_log.take();
                        warn!(error = %e, errors = since, "accept failed; backing off (counted in courier_accept_errors_total)");
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                }
            },
        }
    }
}

/// The TLS handshake, then the session. The handshake is part of the
/// connection's handshake: inside `limits.handshake_timeout_ms`, holding a
/// waiting-handshake place (and closed if evicted from it).
async fn serve_tls<T: Transport>(node: Arc<Node>, stream: T, peer: SocketAddr, admitted: Admitted)
where
    TlsWrite<T::Wr>: SpawnWriter,
{
    let config = node
        .tls
        .as_ref()
        .expect("serve_tls runs with TLS")
        .current();
    let limit = Duration::from_millis(node.config.limits.handshake_timeout_ms);
    let shaken = tokio::select! {
        r = tokio::time::timeout(limit, net::tls::accept(stream, config)) => r.ok(),
        _ = admitted.handshaking.evicted.cancelled() => None,
    };
    match shaken {
        Some(Ok(stream)) => session::serve(node, stream, Some(peer), admitted).await,
        failed => {
            let why = match failed {
                Some(Err(e)) => e.to_string(),
                _ => "no TLS handshake in time".to_owned(),
            };
            debug!(%peer, error = %why, "TLS handshake failed");
            node.metrics.tls_handshake_failures.inc();
            node.metrics.closed(CloseReason::HandshakeFailed);
        }
    }
}

/// SIGHUP: read the TLS certificate files again (new handshakes use them;
/// sessions keep theirs). A failure keeps the old ones and says why.
/// Installed with or without TLS: SIGHUP's default action would end the
/// process.
async fn reload_tls_on_hangup(node: Arc<Node>, mut hangup: tokio::signal::unix::Signal) {
    loop {
        tokio::select! {
            _ = node.shutdown.cancelled() => return,
            _ = hangup.recv() => {}
        }
        let Some(tls) = &node.tls else {
            warn!("SIGHUP: no TLS certificates to reload (tls.cert_file is not set)");
            continue;
        };
        match tls.reload() {
            Ok(()) => {
                node.metrics.tls_reloads.inc();
                info!("SIGHUP: TLS certificates reloaded");
            }
            Err(e) => warn!(
                error = format!("{e:#}"),
                "SIGHUP: TLS certificates not reloaded; keeping the old ones"
            ),
        }
    }
}

const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(5);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

async fn accept_epoll(node: &Arc<Node>, listener: TcpListener, tracker: &TaskTracker) {
    while let Some((stream, peer)) = next_connection(node, || listener.accept()).await {
        match admit(node, peer) {
            Admission::Serve(admitted) if node.tls.is_some() => {
                tracker.spawn(serve_tls(node.clone(), stream, peer, admitted));
            }
            Admission::Serve(admitted) => {
                let node = node.clone();
                tracker.spawn(session::serve(node, stream, Some(peer), admitted));
            }
            Admission::Refuse(code, message, room) => {
                tracker.spawn(async move {
                    session::refuse(stream, code, message).await;
                    drop(room);
                });
            }
            Admission::Close => drop(stream),
        }
    }
}

/// Starts one io_uring thread per listener; returns once every ring runs,
/// or with the first one's error (a ring's memory may be refused even where
/// the probe's small ring was not).
fn start_rings(
    node: &Arc<Node>,
    listeners: Vec<std::net::TcpListener>,
    tracker: &TaskTracker,
) -> anyhow::Result<Vec<std::thread::JoinHandle<()>>> {
    let mut rings = Vec::new();
    let entries = node.config.io_ring_entries;
    for (i, l) in listeners.into_iter().enumerate() {
        let (node, tracker) = (node.clone(), tracker.clone());
        let (started_tx, started) = std::sync::mpsc::sync_channel(1);
        rings.push(
            std::thread::Builder::new()
                .name(format!("courier-ring-{i}"))
                .spawn(move || ring_thread(node, l, tracker, started_tx))
                .context("starting an io_uring thread")?,
        );
        started
            .recv()
            .context("an io_uring thread ended before it started")?
            .with_context(|| {
                format!("creating io_uring ring {i} ({entries} entries); io = \"epoll\" avoids io_uring")
            })?;
    }
    Ok(rings)
}

/// One io_uring thread: its own ring and current-thread runtime, its own
/// listener; its connections' tasks stay on it. The shards are shared.
fn ring_thread(
    node: Arc<Node>,
    listener: std::net::TcpListener,
    tracker: TaskTracker,
    started: std::sync::mpsc::SyncSender<std::io::Result<()>>,
) {
    let runtime =
        tokio_uring::Runtime::new(tokio_uring::builder().entries(node.config.io_ring_entries));
    let runtime = match runtime {
        Ok(r) => {
            let _ = started.send(Ok(()));
            r
        }
        Err(e) => {
            let _ = started.send(Err(e));
            return;
        }
    };
    runtime.block_on(async move {
        let listener = tokio_uring::net::TcpListener::from_std(listener);
        while let Some((stream, peer)) = next_connection(&node, || listener.accept()).await {
            let stream = UringStream(stream);
            match admit(&node, peer) {
                Admission::Serve(admitted) if node.tls.is_some() => {
                    let serve = serve_tls(node.clone(), stream, peer, admitted);
                    tokio_uring::spawn(tracker.track_future(serve));
                }
                Admission::Serve(admitted) => {
                    let serve = session::serve(node.clone(), stream, Some(peer), admitted);
                    tokio_uring::spawn(tracker.track_future(serve));
                }
                Admission::Refuse(code, message, room) => {
                    tokio_uring::spawn(tracker.track_future(async move {
                        session::refuse(stream, code, message).await;
                        drop(room);
                    }));
                }
                Admission::Close => drop(stream),
            }
        }
        drop(listener);
        // Keep the ring turning until this node's connections are done: the
        // runtime drops whatever tasks remain when this returns.
        let grace = Duration::from_millis(node.config.limits.shutdown_grace_ms);
        let _ = tokio::time::timeout(grace + Duration::from_secs(2), tracker.wait()).await;
    })
}

/// Every connection is a file descriptor: raises the soft open-file limit
/// to the hard one and returns how many connections the node will hold,
/// `limits.max_connections` or fewer if the descriptors left after
/// `limits.reserved_files` (the store's files, the admin port, refusals
/// being said) do not allow it. Beyond that number new clients get a
/// `Goodbye TOO_MANY_CONNECTIONS` instead of an accept that fails.
fn connection_budget(limits: &crate::config::Limits) -> usize {
    let open_files = raise_open_file_limit();
    let allowed = open_files
        .saturating_sub(limits.reserved_files as u64)
        .max(1);
    if (limits.max_connections as u64) > allowed {
        warn!(
            open_files,
            reserved_files = limits.reserved_files,
            max_connections = limits.max_connections,
            "the open-file limit (RLIMIT_NOFILE {open_files}) allows {allowed} connections after \
             limits.reserved_files; serving at most {allowed}. Raise the limit (LimitNOFILE= in \
             systemd, --ulimit nofile= in Docker) to serve limits.max_connections"
        );
        allowed as usize
    } else {
        info!(
            open_files,
            max_connections = limits.max_connections,
            "open-file limit"
        );
        limits.max_connections
    }
}

/// Raises the soft open-file limit to the hard one; returns the soft limit.
fn raise_open_file_limit() -> u64 {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) != 0 {
            return u64::MAX;
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
    r.rlim_cur
}

/// How often the free space of the data directory is read.
const DISK_WATCH_INTERVAL: Duration = Duration::from_millis(500);

/// Refuses sends while the data directory's file system has less than
/// `storage.min_free_mb` free, and lets them in again once it has more: the
/// store never fills the disk mid-write, reads and sessions go on, and
/// service comes back by itself.
async fn watch_disk(node: Arc<Node>) {
    let min_free = node.config.storage.min_free_mb << 20;
    let mut tick = tokio::time::interval(DISK_WATCH_INTERVAL);
    loop {
        tokio::select! {
            _ = node.shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let Some((free, _)) = crate::metrics::disk_space(&node.config.data_dir) else {
            continue;
        };
        let full = free < min_free;
        if node.disk_full.swap(full, Ordering::Relaxed) != full {
            node.metrics.storage_full.set(i64::from(full));
            if full {
                warn!(free_bytes = free, min_free_bytes = min_free, "the data disk is nearly full; refusing sends (STORAGE_FULL) until space returns");
            } else {
                info!(
                    free_bytes = free,
                    "the data disk has room again; accepting sends"
                );
            }
        }
    }
}

/// Installs the SIGTERM and SIGINT handlers now (the caller's moment) and
/// waits for either in a task.
fn spawn_signal_handler(token: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        warn!("cannot install signal handlers; stop the node with SIGKILL");
        return;
    };
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => info!("SIGTERM received"),
            _ = int.recv() => info!("SIGINT received"),
        }
        token.cancel();
    });
}

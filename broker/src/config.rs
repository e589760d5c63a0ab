//! Node configuration: defaults, overridden by a TOML file, overridden by
//! `COURIER_*` environment variables, overridden by command-line flags.
//!
//! Every setting, its default and its environment variable are listed in
//! `docs/CONFIGURATION.md`. An environment variable is `COURIER_` followed by
//! the setting's path in upper case with `_` between section and key, e.g.
//! `limits.max_batch` is `COURIER_LIMITS_MAX_BATCH`.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{bail, Context};
use courier_storage::Durability;
use serde::{Deserialize, Serialize};

pub use crate::net::IoMode;

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Where the RocksDB store and the token secret live.
    pub data_dir: PathBuf,
    /// Client protocol listener.
    pub listen: SocketAddr,
    /// Admin HTTP listener (`/healthz`, `/readyz`).
    pub admin_listen: SocketAddr,
    /// `fsync` (default: survives power loss) or `wal` (survives a process crash).
    pub durability: String,
    /// Number of shards (writer threads); 0 = one per CPU.
    pub shards: usize,
    /// Network path: `auto` (io_uring if the kernel allows it, else
    /// epoll), `uring` (fail if unavailable) or `epoll`.
    pub io: IoMode,
    /// io_uring threads (one ring and one listener each); 0 = one per CPU.
    pub io_threads: usize,
    /// io_uring only: submission queue entries per ring (a power of two).
    /// tokio-uring hands operations to the kernel only when the queue is
    /// full or the thread has nothing to run, so under load this is also
    /// how many operations wait to be submitted: smaller submits sooner,
    /// larger in bigger batches (measured in docs/BENCHMARKS.md).
    pub io_ring_entries: u32,
    pub limits: Limits,
    pub retention: Retention,
    pub auth: Auth,
    pub storage: Storage,
    pub groups: Groups,
    pub social: Social,
    pub tls: Tls,
    pub cluster: ClusterSettings,
    pub business: BusinessSettings,
    /// For tests only: the node's clock may be moved forward with
    /// `POST /admin/clock/advance/{ms}` (time rules are tested without
    /// waiting). Never set it in production.
    pub test_clock: bool,
    /// `COURIER_*` environment variables that name no setting (and are not
    /// one of the command line's): ignored, and named in a warning at start.
    #[serde(skip)]
    pub unknown_env: Vec<String>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Groups {
    /// Members a group may have.
    pub max_members: usize,
    /// Groups a user may be a member of.
    pub max_per_user: usize,
    /// Groups with more members than this are delivered from the group log
    /// (one write per message); up to it, by a reference in each member's
    /// inbox (one write per member, simplest for clients).
    pub log_threshold: usize,
}

impl Default for Groups {
    fn default() -> Self {
        Groups {
            max_members: 1024,
            max_per_user: 1024,
            log_threshold: 32,
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Social {
    /// Recipients per broadcast list.
    pub max_list_len: usize,
    /// Contacts per user.
    pub max_contacts: usize,
    /// How long a status post lives.
    pub status_ttl_ms: u64,
    /// Current statuses one poster may have.
    pub max_statuses: usize,
}

impl Default for Social {
    fn default() -> Self {
        Social {
            max_list_len: 256,
            max_contacts: 10_000,
            status_ttl_ms: 24 * 3600 * 1000,
            max_statuses: 100,
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Connections at once, authenticated or not. Lowered at start to what
    /// the open-file limit allows after `reserved_files`.
    pub max_connections: usize,
    /// Descriptors kept out of the connection budget: the store's files,
    /// the admin port, refusals being said.
    pub reserved_files: usize,
    /// Connections that have not completed their handshake, in all.
    pub max_unauthenticated: usize,
    /// Connections from one source address that have not completed their
    /// handshake.
    pub max_unauthenticated_per_source: usize,
    /// New connections per second from one source address (a burst of one
    /// second's worth); 0 = unlimited.
    pub new_connections_per_source_per_sec: u32,
    /// Messages one user may send per second, over all their connections
    /// (a burst of one second's worth; each item of a batch counts);
    /// 0 = unlimited.
    pub sends_per_user_per_sec: u32,
    /// Messages one connection may send per second (a burst of one second's
    /// worth); 0 = unlimited.
    pub sends_per_connection_per_sec: u32,
    pub max_frame_len: u32,
    pub max_payload_len: u32,
    pub max_batch: u16,
    /// Sends a connection may have awaiting acknowledgement; beyond it the
    /// server stops reading that connection (TCP backpressure).
    pub max_in_flight: usize,
    pub handshake_timeout_ms: u64,
    /// A connection that sends nothing (not even a ping) for this long is closed.
    pub idle_timeout_ms: u64,
    /// Live deliveries queued per connection; when full the connection is
    /// moved to catch-up from its inbox.
    pub outbound_queue_len: usize,
    /// Commands queued per shard; when full, senders wait (backpressure).
    pub shard_queue_len: usize,
    /// Commands a shard drains into one storage write.
    pub shard_batch_max: usize,
    /// How long a shard holds a user's delivered/read marks to merge them
    /// (0: each applies with its batch). Merged marks cost one cursor write
    /// and one receipt per original sender; receipts appear this much later.
    pub mark_coalesce_ms: u64,
    /// How long shutdown waits for connections to finish before closing them.
    pub shutdown_grace_ms: u64,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Retention {
    /// How long acknowledged messages stay in the inbox (for other devices
    /// and history fetch) before they are trimmed.
    pub acked_retention_ms: u64,
    /// How long a (sender, client message id) is remembered for de-duplication.
    pub idempotency_window_ms: u64,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Auth {
    /// Hex secret file; empty = `<data_dir>/secret.key`, created on first start.
    pub secret_file: PathBuf,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Storage {
    pub block_cache_mb: usize,
    /// Below this much free space on the data directory's file system the
    /// node refuses sends (`STORAGE_FULL`) and keeps serving reads, so the
    /// store never runs out of space mid-write; sends resume by themselves
    /// once space returns.
    pub min_free_mb: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::from("./courier-data"),
            listen: "127.0.0.1:7700".parse().expect("literal"),
            admin_listen: "127.0.0.1:7701".parse().expect("literal"),
            durability: "fsync".into(),
            shards: 0,
            io: IoMode::Auto,
            io_threads: 0,
            io_ring_entries: 256,
            limits: Limits::default(),
            retention: Retention::default(),
            auth: Auth::default(),
            storage: Storage::default(),
            groups: Groups::default(),
            social: Social::default(),
            tls: Tls::default(),
            cluster: ClusterSettings::default(),
            business: BusinessSettings::default(),
            test_clock: false,
            unknown_env: Vec::new(),
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 100_000,
            reserved_files: 1024,
            max_unauthenticated: 1024,
            // Half the waiting places: one address never takes them all.
            max_unauthenticated_per_source: 512,
            // A backstop: a load balancer or a NAT puts many real clients
            // behind one address (set it lower where clients connect
            // directly).
            new_connections_per_source_per_sec: 10_000,
            sends_per_user_per_sec: 10_000,
            sends_per_connection_per_sec: 10_000,
            max_frame_len: 1 << 20,
            max_payload_len: 64 << 10,
            max_batch: 256,
            max_in_flight: 1024,
            handshake_timeout_ms: 10_000,
            idle_timeout_ms: 120_000,
            outbound_queue_len: 1024,
            shard_queue_len: 8192,
            shard_batch_max: 512,
            mark_coalesce_ms: 10,
            shutdown_grace_ms: 10_000,
        }
    }
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            acked_retention_ms: 7 * 24 * 3600 * 1000,
            idempotency_window_ms: 24 * 3600 * 1000,
        }
    }
}

impl Default for Auth {
    fn default() -> Self {
        Auth {
            secret_file: PathBuf::new(),
        }
    }
}

impl Default for Storage {
    fn default() -> Self {
        Storage {
            block_cache_mb: 128,
            min_free_mb: 256,
        }
    }
}

const SECTIONS: &[&str] = &[
    "limits",
    "retention",
    "auth",
    "storage",
    "groups",
    "social",
    "tls",
    "cluster",
    "business",
];

/// The rules of business messaging (docs/BUSINESS.md). The defaults are
/// today's largest platform's.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct BusinessSettings {
    /// The platform's own verified business account, which may message
    /// every user about the service (utility; no opt-in, window or tier).
    pub platform_account: u64,
    /// How long a customer's message keeps the service window open.
    pub window_ms: u64,
    /// The rolling period a messaging tier counts new conversations over.
    pub tier_period_ms: u64,
    /// Messages per second a business may send unless set for it.
    pub messages_per_sec: u32,
    /// The most a business may be set to.
    pub max_messages_per_sec: u32,
    /// One message to the same customer per this interval...
    pub per_customer_interval_ms: u64,
    /// ...with bursts of this many.
    pub per_customer_burst: u32,
    /// Templates one business may have.
    pub max_templates: usize,
    /// Marketing templates one customer may receive from all businesses
    /// together...
    pub marketing_per_customer: u32,
    /// ...per this rolling period.
    pub marketing_period_ms: u64,
    /// A customer's message that is one of these (any case) withdraws
    /// every opt-in at once.
    pub opt_out_keywords: Vec<String>,
    /// ...and one of these restores what the last opt-out keyword withdrew.
    pub opt_in_keywords: Vec<String>,
    /// How long a webhook request may take before it counts as failed.
    pub webhook_timeout_ms: u64,
    /// The first wait before a failed webhook request is retried; each
    /// failure doubles it...
    pub webhook_retry_ms: u64,
    /// ...up to this.
    pub webhook_retry_max_ms: u64,
    /// Events the webhook has not taken this long after they happened are
    /// dropped (and counted).
    pub webhook_give_up_ms: u64,
    /// Events in one webhook request, at most.
    pub webhook_batch: usize,
    /// How long a business's events stay readable (admin API, protocol);
    /// at least `webhook_give_up_ms`: an event is deleted only once its
    /// webhook took it or gave up on it.
    pub events_kept_ms: u64,
    /// Where customers' taps on URL buttons of templates go first, to be
    /// counted (`clicked`) and redirected: this node's HTTP port as the
    /// public reaches it (`https://c.example.com`), whose `/c/<token>` the
    /// node answers. Empty: links are not tracked.
    pub click_base_url: String,
}

impl Default for BusinessSettings {
    fn default() -> Self {
        let words = |w: &[&str]| w.iter().map(|s| s.to_string()).collect();
        BusinessSettings {
            platform_account: (1 << 63) - 1,
            window_ms: 24 * 3600 * 1000,
            tier_period_ms: 24 * 3600 * 1000,
            messages_per_sec: 80,
            max_messages_per_sec: 1000,
            per_customer_interval_ms: 6000,
            per_customer_burst: 45,
            max_templates: 250,
            marketing_per_customer: 2,
            marketing_period_ms: 24 * 3600 * 1000,
            webhook_timeout_ms: 10_000,
            webhook_retry_ms: 1_000,
            webhook_retry_max_ms: 15 * 60 * 1000,
            webhook_give_up_ms: 7 * 24 * 3600 * 1000,
            webhook_batch: 100,
            events_kept_ms: 30 * 24 * 3600 * 1000,
            click_base_url: String::new(),
            opt_out_keywords: words(&[
                "STOP",
                "UNSUBSCRIBE",
                "END",
                "QUIT",
                "STOPALL",
                "REVOKE",
                "OPTOUT",
                "CANCEL",
                // pt, es, fr, de, it
                "PARAR",
                "SAIR",
                "CANCELAR",
                "BAJA",
                "ALTO",
                "ARRET",
                "ARRÊT",
                "STOPP",
                "ABMELDEN",
                "BASTA",
            ]),
            opt_in_keywords: words(&["START", "UNSTOP", "COMEÇAR", "INICIAR", "ALTA", "DÉMARRER"]),
        }
    }
}

/// Membership of a cluster (docs/ARCHITECTURE.md, "The cluster"). With no
/// `name` the node is a single node: embedded store, no etcd.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterSettings {
    /// The cluster's name (`--cluster`); empty: a single node.
    pub name: String,
    /// etcd's client URLs, comma-separated (`--etcd`).
    pub etcd: String,
    /// This node's id in the cluster (`--node-id`): letters, digits and
    /// `-`, remembered by its data directory.
    pub node_id: String,
    /// Where the other nodes reach this node, HOST:PORT (`--advertise`);
    /// empty: the client listener's address, when it names one host.
    pub advertise: String,
    /// Shards of a new cluster; fixed once the cluster exists (the stored
    /// count wins).
    pub shards: u32,
    /// Nodes that must be registered before the controller creates the
    /// shard map of a new cluster.
    pub initial_nodes: u32,
    /// Copies of each shard of a new cluster, on distinct nodes: 1 (no
    /// replication: a lost node's shards wait for it), 2, or 3 (for
    /// production). Fixed once the cluster exists (the stored value wins).
    pub replication_factor: u32,
    /// This node's share of shards relative to the others'.
    pub capacity: u32,
    /// Lifetime of the node's etcd lease: how long after a node stops
    /// renewing it the others see it gone.
    pub lease_ttl_s: u32,
    /// The node-to-node link listener (the port is advertised with the
    /// host of `advertise`).
    pub link_listen: SocketAddr,
    /// Hex secret the nodes' links authenticate with; empty: the token
    /// secret (`auth.secret_file`), which a cluster's nodes share anyway.
    pub secret_file: PathBuf,
}

impl Default for ClusterSettings {
    fn default() -> Self {
        ClusterSettings {
            name: String::new(),
            etcd: String::new(),
            node_id: String::new(),
            advertise: String::new(),
            shards: 256,
            initial_nodes: 1,
            replication_factor: 1,
            capacity: 100,
            lease_ttl_s: 10,
            link_listen: "0.0.0.0:7702".parse().expect("literal"),
            secret_file: PathBuf::new(),
        }
    }
}

impl ClusterSettings {
    pub fn enabled(&self) -> bool {
        !self.name.is_empty()
    }

    /// The etcd endpoints, trimmed, without empty items.
    pub fn endpoints(&self) -> Vec<String> {
        self.etcd
            .split(',')
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .map(str::to_owned)
            .collect()
    }

    fn validate(&self) -> anyhow::Result<()> {
        if !self.enabled() {
            anyhow::ensure!(
                self.etcd.is_empty() && self.node_id.is_empty() && self.advertise.is_empty(),
                "cluster.etcd, cluster.node_id and cluster.advertise need cluster.name (--cluster)"
            );
            return Ok(());
        }
        anyhow::ensure!(
            valid_name(&self.name),
            "cluster.name {:?}: 1 to 63 lowercase letters, digits or '-', starting with a letter or digit",
            self.name
        );
        anyhow::ensure!(
            valid_name(&self.node_id),
            "cluster.node_id {:?}: 1 to 63 lowercase letters, digits or '-', starting with a letter or digit (--node-id)",
            self.node_id
        );
        anyhow::ensure!(
            !self.endpoints().is_empty(),
            "cluster.etcd: a cluster node needs etcd's URLs (--etcd http://HOST:2379[,...])"
        );
        anyhow::ensure!(
            (1..=courier_storage::SLOTS as u32).contains(&self.shards),
            "cluster.shards must be 1 to {}: a shard is a run of the store's {} slots",
            courier_storage::SLOTS,
            courier_storage::SLOTS
        );
        anyhow::ensure!(
            self.initial_nodes >= 1,
            "cluster.initial_nodes must be at least 1"
        );
        anyhow::ensure!(
            (1..=5).contains(&self.replication_factor),
            "cluster.replication_factor must be 1 to 5 (copies of each shard on distinct nodes)"
        );
        anyhow::ensure!(
            (1..=10_000).contains(&self.capacity),
            "cluster.capacity must be 1 to 10000"
        );
        anyhow::ensure!(
            (2..=300).contains(&self.lease_ttl_s),
            "cluster.lease_ttl_s must be 2 to 300"
        );
        Ok(())
    }
}

/// A cluster or node name: what etcd keys, file names and container
/// hostnames all accept.
pub fn valid_name(s: &str) -> bool {
    (1..=63).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
}

/// TLS on the client port. Without a certificate the port speaks plain
/// TCP. Files are PEM; SIGHUP reads them again (new handshakes use the new
/// ones, open sessions keep theirs).
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Tls {
    /// Certificate chain, leaf first; empty: no TLS.
    pub cert_file: PathBuf,
    /// The leaf's private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
    /// CA certificates whose client certificates are accepted (service
    /// accounts); empty: clients are not asked for one.
    pub client_ca_file: PathBuf,
    /// With `client_ca_file`: refuse clients that present no certificate.
    pub require_client_cert: bool,
    /// Lowest TLS version accepted: `1.3` (when empty) or `1.2`.
    pub min_version: String,
}

/// Flag values that override everything else.
#[derive(Default, Debug)]
pub struct Overrides {
    pub data_dir: Option<PathBuf>,
    pub listen: Option<String>,
    pub admin_listen: Option<String>,
    pub durability: Option<String>,
    pub io: Option<String>,
    pub cluster: Option<String>,
    pub etcd: Option<String>,
    pub node_id: Option<String>,
    pub advertise: Option<String>,
}

impl Config {
    /// Builds the configuration from an optional TOML file, the environment
    /// (`vars`) and flag overrides, then validates it.
    pub fn load(
        file: Option<&std::path::Path>,
        vars: impl Iterator<Item = (String, String)>,
        flags: Overrides,
    ) -> anyhow::Result<Config> {
        let mut doc = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading config file {}", path.display()))?;
                text.parse::<toml::Table>()
                    .with_context(|| format!("parsing config file {}", path.display()))?
            }
            None => toml::Table::new(),
        };
        let known = Config::known_keys();
        let mut unknown_env = Vec::new();
        for (name, value) in vars {
            let Some(rest) = name.strip_prefix("COURIER_") else {
                continue;
            };
            // Variables of the command line, not settings.
            if ["CONFIG", "LOG", "LOG_FORMAT", "TOKEN", "ADMIN_TOKEN"].contains(&rest) {
                continue;
            }
            let key = rest.to_ascii_lowercase();
            let path = SECTIONS
                .iter()
                .find_map(|s| key.strip_prefix(&format!("{s}_")).map(|k| (Some(*s), k)))
                .unwrap_or((None, &key));
            let is_known = match path {
                (Some(section), k) => known
                    .get(section)
                    .and_then(toml::Value::as_table)
                    .is_some_and(|t| t.contains_key(k)),
                (None, k) => known.get(k).is_some_and(|v| !v.is_table()),
            };
            // Other programs' variables share the prefix (a test harness's
            // `COURIER_BIN`, say): named in a warning, never fatal.
            if !is_known {
                unknown_env.push(name);
                continue;
            }
            let (table, key) = match path {
                (Some(section), k) => {
                    let t = doc
                        .entry(section)
                        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
                    let toml::Value::Table(t) = t else {
                        bail!("config key {section} must be a table");
                    };
                    (t, k.to_owned())
                }
                (None, k) => (&mut doc, k.to_owned()),
            };
            table.insert(key, env_value(&value));
        }
        unknown_env.sort();
        let mut put = |k: &str, v: toml::Value| {
            doc.insert(k.to_owned(), v);
        };
        if let Some(v) = flags.data_dir {
            put("data_dir", toml::Value::String(v.display().to_string()));
        }
        if let Some(v) = flags.listen {
            put("listen", toml::Value::String(v));
        }
        if let Some(v) = flags.admin_listen {
            put("admin_listen", toml::Value::String(v));
        }
        if let Some(v) = flags.durability {
            put("durability", toml::Value::String(v));
        }
        if let Some(v) = flags.io {
            put("io", toml::Value::String(v));
        }
        let cluster_flags = [
            ("name", flags.cluster),
            ("etcd", flags.etcd),
            ("node_id", flags.node_id),
            ("advertise", flags.advertise),
        ];
        for (key, value) in cluster_flags {
            let Some(v) = value else { continue };
            let t = doc
                .entry("cluster")
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            let toml::Value::Table(t) = t else {
                bail!("config key cluster must be a table");
            };
            t.insert(key.to_owned(), toml::Value::String(v));
        }
        let mut config: Config = toml::Value::Table(doc)
            .try_into()
            .context("invalid configuration")?;
        config.validate()?;
        config.unknown_env = unknown_env;
        Ok(config)
    }

    /// Every setting's key, as the defaults serialize (sections as tables).
    fn known_keys() -> toml::Table {
        toml::Table::try_from(Config::default()).expect("the defaults serialize")
    }

    fn validate(&self) -> anyhow::Result<()> {
        self.durability()?;
        self.cluster.validate()?;
        // A gateway forwards the sessions of users another node owns to
        // that node's client port, in plain TCP inside the cluster's
        // network; a port that speaks only TLS cannot take them yet.
        anyhow::ensure!(
            !self.cluster.enabled() || self.tls.cert_file.as_os_str().is_empty(),
            "tls.cert_file cannot be used with a cluster yet: nodes forward sessions to each other's client ports in plain TCP (terminate TLS at the load balancer)"
        );
        let b = &self.business;
        anyhow::ensure!(
            b.messages_per_sec >= 1 && b.messages_per_sec <= b.max_messages_per_sec,
            "business.messages_per_sec must be from 1 to business.max_messages_per_sec"
        );
        anyhow::ensure!(
            b.webhook_timeout_ms >= 1
                && b.webhook_retry_ms >= 1
                && b.webhook_retry_max_ms >= b.webhook_retry_ms
                && (1..=1000).contains(&b.webhook_batch),
            "business.webhook_timeout_ms and webhook_retry_ms must be at least 1, webhook_retry_max_ms at least webhook_retry_ms, webhook_batch from 1 to 1000"
        );
        anyhow::ensure!(
            b.click_base_url.is_empty()
                || b.click_base_url.starts_with("http://")
                || b.click_base_url.starts_with("https://"),
            "business.click_base_url is empty or an http:// or https:// URL"
        );
        anyhow::ensure!(
            b.events_kept_ms >= b.webhook_give_up_ms,
            "business.events_kept_ms must be at least business.webhook_give_up_ms"
        );
        anyhow::ensure!(
            b.per_customer_burst >= 1 && b.per_customer_interval_ms >= 1,
            "business.per_customer_burst and business.per_customer_interval_ms must be at least 1"
        );
        anyhow::ensure!(
            crate::state::ids::valid_user(b.platform_account),
            "business.platform_account must be a user id (1 to 2^63-1)"
        );
        let g = &self.groups;
        anyhow::ensure!(
            (2..=u16::MAX as usize).contains(&g.max_members),
            "groups.max_members must be 2 to 65535"
        );
        anyhow::ensure!(
            g.max_per_user >= 1,
            "groups.max_per_user must be at least 1"
        );
        anyhow::ensure!(
            (1..=u16::MAX as usize).contains(&self.social.max_list_len),
            "social.max_list_len must be 1 to 65535"
        );
        anyhow::ensure!(
            (1..=u16::MAX as usize).contains(&self.social.max_contacts),
            "social.max_contacts must be 1 to 65535"
        );
        anyhow::ensure!(
            self.social.status_ttl_ms >= 1000,
            "social.status_ttl_ms must be at least 1000"
        );
        let l = &self.limits;
        anyhow::ensure!(l.max_batch >= 1, "limits.max_batch must be at least 1");
        anyhow::ensure!(
            l.max_frame_len >= 1024,
            "limits.max_frame_len must be at least 1024"
        );
        anyhow::ensure!(
            (l.max_payload_len as u64) + 256 <= l.max_frame_len as u64,
            "limits.max_payload_len must leave room for headers within limits.max_frame_len"
        );
        anyhow::ensure!(
            l.max_in_flight >= 1,
            "limits.max_in_flight must be at least 1"
        );
        anyhow::ensure!(
            l.max_connections >= 1 && l.max_unauthenticated >= 1 && l.max_unauthenticated_per_source >= 1,
            "limits.max_connections, limits.max_unauthenticated and limits.max_unauthenticated_per_source must be at least 1"
        );
        let t = &self.tls;
        anyhow::ensure!(
            t.cert_file.as_os_str().is_empty() == t.key_file.as_os_str().is_empty(),
            "tls.cert_file and tls.key_file go together"
        );
        anyhow::ensure!(
            ["", "1.2", "1.3"].contains(&t.min_version.as_str()),
            "tls.min_version must be 1.2 or 1.3"
        );
        anyhow::ensure!(
            !t.require_client_cert || !t.client_ca_file.as_os_str().is_empty(),
            "tls.require_client_cert needs tls.client_ca_file"
        );
        anyhow::ensure!(
            l.reserved_files >= 64,
            "limits.reserved_files must be at least 64 (the store and the admin port need descriptors)"
        );
        anyhow::ensure!(
            l.outbound_queue_len >= 1 && l.shard_queue_len >= 1 && l.shard_batch_max >= 1,
            "queue lengths must be at least 1"
        );
        anyhow::ensure!(self.shards <= 64, "at most 64 shards");
        anyhow::ensure!(self.io_threads <= 256, "at most 256 io_threads");
        anyhow::ensure!(
            self.io_ring_entries.is_power_of_two() && (2..=32768).contains(&self.io_ring_entries),
            "io_ring_entries must be a power of two from 2 to 32768"
        );
        Ok(())
    }

    pub fn durability(&self) -> anyhow::Result<Durability> {
        self.durability
            .parse()
            .map_err(|e: String| anyhow::anyhow!("durability: {e}"))
    }

    pub fn shard_count(&self) -> usize {
        if self.shards == 0 {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
                .min(64)
        } else {
            self.shards
        }
    }

    pub fn io_thread_count(&self) -> usize {
        if self.io_threads == 0 {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        } else {
            self.io_threads
        }
    }

    /// Where the other nodes of a cluster reach this one, given the
    /// client listener's bound address.
    pub fn advertise(&self, bound: SocketAddr) -> anyhow::Result<String> {
        if !self.cluster.advertise.is_empty() {
            return Ok(self.cluster.advertise.clone());
        }
        anyhow::ensure!(
            !bound.ip().is_unspecified(),
            "cluster.advertise (--advertise HOST:PORT) is needed when the client listener ({bound}) names no single address"
        );
        Ok(bound.to_string())
    }

    /// The cluster secret's file (the token secret unless set).
    pub fn cluster_secret_path(&self) -> PathBuf {
        if self.cluster.secret_file.as_os_str().is_empty() {
            self.secret_path()
        } else {
            self.cluster.secret_file.clone()
        }
    }

    pub fn secret_path(&self) -> PathBuf {
        if self.auth.secret_file.as_os_str().is_empty() {
            self.data_dir.join("secret.key")
        } else {
            self.auth.secret_file.clone()
        }
    }
}

/// Environment values are typed like TOML scalars: integers and booleans
/// parse as such, anything else is a string.
fn env_value(v: &str) -> toml::Value {
    if let Ok(i) = v.parse::<i64>() {
        toml::Value::Integer(i)
    } else if let Ok(b) = v.parse::<bool>() {
        toml::Value::Boolean(b)
    } else {
        toml::Value::String(v.to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(list: &[(&str, &str)]) -> impl Iterator<Item = (String, String)> {
        list.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<Vec<_>>()
            .into_iter()
    }

    #[test]
    fn precedence_is_flags_then_env_then_file_then_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(
            &file,
            "listen = \"127.0.0.1:1\"\nadmin_listen = \"127.0.0.1:2\"\n[limits]\nmax_batch = 10\nmax_in_flight = 5\n",
        )
        .unwrap();
        let c = Config::load(
            Some(&file),
            vars(&[
                ("COURIER_ADMIN_LISTEN", "127.0.0.1:3"),
                ("COURIER_LIMITS_MAX_BATCH", "20"),
                ("COURIER_LISTEN", "127.0.0.1:4"),
                ("OTHER", "x"),
            ]),
            Overrides {
                listen: Some("127.0.0.1:5".into()),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(c.listen.port(), 5, "flag wins");
        assert_eq!(c.admin_listen.port(), 3, "env beats file");
        assert_eq!(c.limits.max_batch, 20, "env beats file in a section");
        assert_eq!(c.limits.max_in_flight, 5, "file beats default");
        assert_eq!(c.limits.idle_timeout_ms, 120_000, "default");
        assert_eq!(c.durability().unwrap(), Durability::Fsync, "safe default");
    }

    #[test]
    fn command_line_variables_are_not_settings() {
        let c = Config::load(
            None,
            vars(&[
                ("COURIER_LOG", "debug"),
                ("COURIER_LOG_FORMAT", "json"),
                ("COURIER_TOKEN", "t"),
                ("COURIER_ADMIN_TOKEN", "t"),
                ("COURIER_CONFIG", "/nowhere"),
            ]),
            Overrides::default(),
        )
        .unwrap();
        assert_eq!(c.listen, Config::default().listen);
        assert!(c.unknown_env.is_empty(), "{:?}", c.unknown_env);
    }

    /// Another program's variable with the prefix, or a misspelt setting,
    /// is named and ignored; the node still starts.
    #[test]
    fn unknown_variables_are_named_not_fatal() {
        let c = Config::load(
            None,
            vars(&[
                ("COURIER_BIN", "/usr/bin/courier"),
                ("COURIER_TOKENS", "t"),
                ("COURIER_LIMITS_MAX_BATCHES", "3"),
                ("COURIER_LIMITS", "3"),
                ("COURIER_SHARDS", "3"),
            ]),
            Overrides::default(),
        )
        .unwrap();
        assert_eq!(c.shards, 3, "a known one next to them still applies");
        assert_eq!(
            c.unknown_env,
            [
                "COURIER_BIN",
                "COURIER_LIMITS",
                "COURIER_LIMITS_MAX_BATCHES",
                "COURIER_TOKENS"
            ]
        );
        assert_eq!(c.limits.max_batch, Limits::default().max_batch);
    }

    #[test]
    fn unknown_keys_in_a_file_stay_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "[limits]\nmax_batches = 3\n").unwrap();
        let err = Config::load(Some(&path), vars(&[]), Overrides::default()).unwrap_err();
        assert!(format!("{err:#}").contains("max_batches"), "{err:#}");
    }

    #[test]
    fn network_path_settings() {
        let c = Config::load(None, vars(&[]), Overrides::default()).unwrap();
        assert_eq!((c.io, c.io_ring_entries), (IoMode::Auto, 256));
        let c = Config::load(
            None,
            vars(&[
                ("COURIER_IO", "uring"),
                ("COURIER_IO_THREADS", "3"),
                ("COURIER_IO_RING_ENTRIES", "64"),
            ]),
            Overrides::default(),
        )
        .unwrap();
        assert_eq!(
            (c.io, c.io_threads, c.io_ring_entries),
            (IoMode::Uring, 3, 64)
        );
        assert_eq!(c.io_thread_count(), 3);
        let c = Config::load(
            None,
            vars(&[("COURIER_IO", "uring")]),
            Overrides {
                io: Some("epoll".into()),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(c.io, IoMode::Epoll, "the flag wins");
        for (k, v, named) in [
            ("COURIER_IO", "kqueue", "unknown variant `kqueue`"),
            (
                "COURIER_IO_RING_ENTRIES",
                "100",
                "io_ring_entries must be a power of two",
            ),
            (
                "COURIER_IO_RING_ENTRIES",
                "65536",
                "io_ring_entries must be a power of two",
            ),
            ("COURIER_IO_THREADS", "1000", "at most 256 io_threads"),
        ] {
            let err = Config::load(None, vars(&[(k, v)]), Overrides::default()).unwrap_err();
            assert!(format!("{err:#}").contains(named), "{k}={v}: {err:#}");
        }
    }

    #[test]
    fn bad_settings_are_refused_with_their_name() {
        let err = Config::load(
            None,
            vars(&[("COURIER_DURABILITY", "lazy")]),
            Overrides::default(),
        )
        .unwrap_err();
        assert!(format!("{err:#}").contains("durability"), "{err:#}");
        let err = Config::load(
            None,
            vars(&[("COURIER_LIMITS_MAX_BATCH", "0")]),
            Overrides::default(),
        )
        .unwrap_err();
        assert!(format!("{err:#}").contains("max_batch"), "{err:#}");
    }
}

//! What a shard keeps of its businesses between commands (the rules that
//! use it are in `business`), and the node's directory of businesses that
//! sessions read.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::RwLock;

use crate::state::business::{Bucket, BusinessRow, DayCounts, MarketingRow, PairRow, Template};
use crate::state::business_events::{Counts, Engagement, EventHead, MessageRow};

/// Which users of this node's shards are businesses: for sessions, which
/// send a business's messages through its shard. A bitmap answers "no" for
/// almost every user without a lock; the set behind it answers the rest.
pub struct Directory {
    bits: Box<[AtomicU64]>,
    ids: RwLock<HashSet<u64>>,
    /// The node's webhook sender, told of businesses with events to post
    /// (unset: no sender runs, as in a shard's unit tests).
    webhooks: std::sync::OnceLock<tokio::sync::mpsc::UnboundedSender<u64>>,
}

impl Directory {
    pub fn new(platform: u64) -> Directory {
        let d = Directory {
            bits: (0..64).map(|_| AtomicU64::new(0)).collect(),
            ids: RwLock::new(HashSet::new()),
            webhooks: std::sync::OnceLock::new(),
        };
        d.add(platform);
        d
    }

    fn bit(id: u64) -> (usize, u64) {
        let h = id.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 52; // 12 bits
        ((h >> 6) as usize, 1 << (h & 63))
    }

    /// Connects the node's webhook sender (once).
    pub fn send_webhooks_to(&self, tx: tokio::sync::mpsc::UnboundedSender<u64>) {
        let _ = self.webhooks.set(tx);
    }

    /// Business `b` has events its webhook has not taken.
    pub(crate) fn poke_webhook(&self, b: u64) {
        if let Some(tx) = self.webhooks.get() {
            let _ = tx.send(b);
        }
    }

    pub fn contains(&self, id: u64) -> bool {
        let (word, bit) = Directory::bit(id);
        self.bits[word].load(Ordering::Relaxed) & bit != 0
            && self.ids.read().expect("directory lock").contains(&id)
    }

    pub(crate) fn add(&self, id: u64) {
        self.ids.write().expect("directory lock").insert(id);
        let (word, bit) = Directory::bit(id);
        self.bits[word].fetch_or(bit, Ordering::Relaxed);
    }

    pub(crate) fn remove(&self, id: u64) {
        self.ids.write().expect("directory lock").remove(&id);
    }
}

/// A business this shard has loaded.
pub(crate) struct Loaded {
    pub(crate) row: BusinessRow,
    pub(crate) templates: HashMap<String, Template>,
    /// Customers it started a conversation with, and when (within the
    /// tier's period, pruned as they age).
    pub(crate) started: HashMap<u64, u64>,
    pub(crate) bucket: Bucket,
    /// Client message ids admitted lately (a retry skips the rules).
    pub(crate) admitted: HashSet<(u64, u64)>,
    pub(crate) admitted_order: VecDeque<(u64, u64)>,
    /// The quality rating's signals, by day (`Q` rows, the last 7 days).
    pub(crate) days: BTreeMap<u64, DayCounts>,
    /// Template messages sent lately, by (client id, customer): a read
    /// receipt for one counts for its template.
    pub(crate) sent_templates: HashMap<(u64, u64), (String, u64)>,
    pub(crate) sent_order: VecDeque<(u64, u64)>,
    /// When the tier was last considered for an upgrade.
    pub(crate) tier_checked_ms: u64,
}

/// A pair as cached: its row and its rate bucket.
pub(crate) struct Pair {
    pub(crate) row: PairRow,
    pub(crate) bucket: Bucket,
}

/// The business state a shard keeps.
#[derive(Default)]
pub(crate) struct Businesses {
    /// Businesses of this shard (the platform's account included, if it is
    /// this shard's).
    pub(crate) known: HashSet<u64>,
    pub(crate) loaded: HashMap<u64, Loaded>,
    pub(crate) pairs: HashMap<(u64, u64), Pair>,
    /// Pairs whose read hours changed since they were last written
    /// (written with the engagement rows, at most once a second, and
    /// before the cache starts over).
    pub(crate) pairs_changed: HashSet<(u64, u64)>,
    /// This shard's customers' marketing templates received lately (`M`
    /// rows), read on first touch.
    pub(crate) marketing: HashMap<u64, MarketingRow>,
    /// Entries counted by sends not yet written: (customer, sender, id).
    pub(crate) marketing_planned: HashSet<(u64, u64, u64)>,
    /// (business, day) quality counts changed since the last batch.
    pub(crate) counted: HashSet<(u64, u64)>,
    /// Businesses' event heads (`W` rows), read on first touch.
    pub(crate) heads: HashMap<u64, EventHead>,
    /// Business messages' statuses (`X` rows) by (business, client
    /// message id, customer), read on first touch.
    pub(crate) messages: HashMap<(u64, u64, u64), MessageRow>,
    /// Message rows and event heads changed since the last batch, and when
    /// the engagement rows were last written (the node's clock, ms).
    pub(crate) messages_changed: HashSet<(u64, u64, u64)>,
    /// New messages' acceptances not yet told (their rows are in
    /// `messages`), and when they were learned: the outcome, usually in a
    /// few milliseconds, is written and told with them.
    pub(crate) held: HashMap<(u64, u64, u64), u64>,
    pub(crate) heads_changed: HashSet<u64>,
    pub(crate) engagement_flushed_ms: u64,
    /// Statistics rows (`Y`) by key, read on first touch, and the keys
    /// changed since the last batch.
    pub(crate) stats: HashMap<Vec<u8>, Counts>,
    pub(crate) stats_changed: HashSet<Vec<u8>>,
    /// Businesses' engagement rows (`A`), read on first touch, and the
    /// businesses whose row changed since the last batch.
    pub(crate) engagement: HashMap<u64, Engagement>,
    pub(crate) engagement_changed: HashSet<u64>,
    /// Since when each (business, customer) waits for an answer (`Z`
    /// rows; 0: not waiting), read on first touch.
    pub(crate) awaiting: HashMap<(u64, u64), u64>,
    /// Conversations' labels (`N` rows), read on first touch.
    pub(crate) labels: HashMap<(u64, u64), Vec<String>>,
    /// When old events were last deleted (the node's clock, ms).
    pub(crate) pruned_at_ms: Option<u64>,
    /// Campaigns held: every unfinished one, and finished ones a fact
    /// touched (until written); by (business, campaign).
    pub(crate) campaigns: HashMap<(u64, u64), Campaign>,
    /// Which campaign each outcome token is.
    pub(crate) campaign_tokens: HashMap<u64, (u64, u64)>,
    pub(crate) campaign_token_of: HashMap<(u64, u64), u64>,
    /// Campaign rows changed since the last batch.
    pub(crate) campaigns_changed: HashSet<(u64, u64)>,
    /// When a campaign's turn is due next.
    pub(crate) campaigns_due: Option<std::time::Instant>,
}

/// A campaign as its shard holds it.
pub(crate) struct Campaign {
    pub(crate) row: crate::state::campaigns::CampaignRow,
    /// The token its sends' outcomes come back under.
    pub(crate) token: u64,
    /// Each variant's send, encoded once.
    pub(crate) sends: Vec<bytes::Bytes>,
    /// The segment row read last.
    pub(crate) chunk: Option<(u64, Vec<u64>)>,
    /// When each outstanding send was queued (absent: due now).
    pub(crate) queued: HashMap<u64, std::time::Instant>,
}

//! Business messaging on the business's shard: the account and its
//! templates, and per customer the service window, the conversation the
//! business started, consent and block. Every rule a business send must
//! pass is checked here, in the shard's one order, so a customer's opt-out
//! (a keyword message, or a `Business` request) and a business send are
//! ordered: a send admitted after the opt-out is refused.
//!
//! A business send comes from the business's session (which lives on the
//! business's node) as a `BusinessSend`: this shard admits it (renders a
//! template, counts the tier and the rates) and hands the session the
//! `Send` to queue on the customer's shard, or answers the refusal. A
//! customer's message to a business is appended here (the business's
//! inbox): it opens the window and may be a keyword. Customers' requests
//! (`Business` frames) and the admin API's come as `BusinessAsk` and
//! `BusinessAdmin`.
//!
//! What is kept in memory only: the rate buckets (a restart refills them)
//! and the client message ids admitted lately (a retry of one skips the
//! rules, so it is answered as the duplicate it is). Everything else is
//! written before it is answered, or with the batch of the message that
//! changed it.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::time::Instant;

use bytes::Bytes;
use courier_protocol::business::{Category, TemplateSend};
use courier_protocol::{
    Body, BusinessInfo, BusinessOp, BusinessRequest, Destination, ErrorCode, MessageKind, Purpose,
    ReceiptPayload, ReceiptStatus, SendResult, TemplatePack,
};
use courier_storage::{slot_of, InboxStore, KvOp};
use tokio::sync::oneshot;
use tracing::{error, warn};

use super::business_events::stats_report;
use super::business_state::{Loaded, Pair};
use super::core::Shard;
use super::messages::{
    failed, AdminAnswer, AdminOp, BusinessAdminCmd, BusinessAskCmd, BusinessSendCmd, Completion,
    OutcomeTap, SendCmd, ShardCmd,
};
use super::route::shard_of;
use crate::config::BusinessSettings;
use crate::error::BrokerError;
use crate::reports::Turn;
use crate::state::business::{
    check_display_name, check_template_name, invalid, keyword, weighted, Bucket, BusinessRow,
    ConsentEntry, DayCounts, Invalid, Keyword, PairRow, Quality, Template, TemplateStatus,
    QUALITY_DAYS, SOURCES, TIERS, VERIFIED_TIER,
};
use crate::state::business::{is_marketing, MarketingRow};
use crate::state::business_events::{Fact, MessageRow, Origin, Period};
use crate::state::keys;
use crate::state::rows::corrupt;

/// Pair rows kept in memory per shard before the cache starts over.
const PAIRS_CACHED_MAX: usize = 200_000;
/// Client message ids remembered per business as admitted.
const ADMITTED_MAX: usize = 65_536;

/// One message from a business to one customer, as the rules see it.
pub(crate) struct Outgoing<'a> {
    pub business: u64,
    pub customer: u64,
    pub client_msg_id: u64,
    pub kind: MessageKind,
    pub payload: &'a Bytes,
    /// The campaign and variant that sends it, if one does.
    pub campaign: Option<(u64, u8)>,
}

/// A template rendered for one customer.
pub(super) struct Rendered {
    pub(super) payload: Bytes,
    category: Category,
    name: String,
    language: String,
}

/// How long a client may keep a business's template pack.
const TEMPLATE_PACK_VALID_MS: u64 = 31 * 24 * 3600 * 1000;
/// A day, in milliseconds (the quality rating's unit).
const DAY_MS: u64 = 24 * 3600 * 1000;
/// How often a business's tier is considered for an upgrade.
const TIER_CHECK_MS: u64 = 6 * 3600 * 1000;

/// Pauses an approved template: 3 hours, then 6; the third pause
/// disables it.
fn pause(t: &mut Template, now: u64, reason: String) {
    t.status = TemplateStatus::Paused;
    t.status_reason = reason;
    t.status_at_ms = now;
    t.pauses += 1;
    match t.pauses {
        1 => t.paused_until_ms = now + 3 * 3600 * 1000,
        2 => t.paused_until_ms = now + 6 * 3600 * 1000,
        _ => t.status = TemplateStatus::Disabled,
    }
}

fn purpose_name(p: Purpose) -> Option<&'static str> {
    match p {
        Purpose::Marketing => Some("marketing"),
        Purpose::Utility => Some("utility"),
        Purpose::None => None,
    }
}

impl Shard {
    fn settings(&self) -> &BusinessSettings {
        &self.config.business
    }

    fn platform(&self) -> u64 {
        self.config.business.platform_account
    }

    /// Reads which of this shard's users are businesses (at start, and for
    /// a run of slots that moved here).
    pub(crate) fn load_businesses(&mut self, run: Option<&std::ops::Range<u16>>) {
        let scanned = match run {
            Some(run) => self
                .store
                .scan_slots(&keys::businesses(), run.clone(), usize::MAX),
            None => self.store.scan(&keys::businesses(), usize::MAX),
        };
        let shards = self.peers.len();
        match scanned {
            Ok(rows) => {
                for (k, v) in rows {
                    if let Some(id) = keys::last_id(&k) {
                        if shard_of(id, shards) == self.id as usize {
                            self.business.known.insert(id);
                            self.config.directory.add(id);
                            // Events the webhook may not have taken yet.
                            if serde_json::from_slice::<BusinessRow>(&v)
                                .is_ok_and(|r| !r.webhook_url.is_empty())
                            {
                                self.config.directory.poke_webhook(id);
                            }
                        }
                    }
                }
            }
            Err(e) => error!(shard = self.id, error = %e, "reading business accounts failed"),
        }
        let platform = self.platform();
        if shard_of(platform, shards) == self.id as usize {
            self.business.known.insert(platform);
        }
    }

    /// The marketing cap, on the customer's shard: a marketing template for
    /// `s.recipient` is let through if the customer had fewer than
    /// `business.marketing_per_customer` in the period (counted now, taken
    /// back by [`Shard::marketing_done`] if it is not stored), or if it is
    /// a retry of one counted (the store answers the duplicate). `Err`:
    /// the milliseconds until one more fits.
    pub(crate) fn marketing_admit(&mut self, s: &SendCmd) -> Result<(), u64> {
        if !is_marketing(s.kind, &s.payload) {
            return Ok(());
        }
        let now = self.now_ms();
        let (cap, period) = (
            self.config.business.marketing_per_customer as usize,
            self.config.business.marketing_period_ms,
        );
        let customer = s.recipient;
        if !self.business.marketing.contains_key(&customer) {
            if self.business.marketing.len() >= PAIRS_CACHED_MAX {
                self.business.marketing.clear();
            }
            let row = match self.store.get(&keys::marketing(customer)) {
                Ok(Some(v)) => MarketingRow::decode(&v).unwrap_or_default(),
                Ok(None) => MarketingRow::default(),
                Err(e) => {
                    error!(shard = self.id, error = %e, "reading a marketing row failed");
                    return Err(1000);
                }
            };
            self.business.marketing.insert(customer, row);
        }
        let row = self
            .business
            .marketing
            .get_mut(&customer)
            .expect("read above");
        row.0.retain(|&(at, ..)| at + period > now);
        if row
            .0
            .iter()
            .any(|&(_, sender, id)| sender == s.sender && id == s.client_msg_id)
        {
            return Ok(());
        }
        if row.0.len() >= cap {
            let oldest = row.0.iter().map(|&(at, ..)| at).min().unwrap_or(now);
            return Err((oldest + period).saturating_sub(now).max(1));
        }
        row.0.push((now, s.sender, s.client_msg_id));
        let value = row.encode();
        self.business
            .marketing_planned
            .insert((customer, s.sender, s.client_msg_id));
        self.kv.push(KvOp::Put {
            key: keys::marketing(customer),
            value,
        });
        Ok(())
    }

    /// A marketing template counted by [`Shard::marketing_admit`] has its
    /// outcome: one not stored now (a duplicate, a refusal, a failed write)
    /// is taken back.
    pub(crate) fn marketing_done(&mut self, s: &SendCmd, stored: bool) {
        // Only an entry this send added (a retry's original stays).
        let key = (s.recipient, s.sender, s.client_msg_id);
        if !self.business.marketing_planned.remove(&key) || stored {
            return;
        }
        let Some(row) = self.business.marketing.get_mut(&s.recipient) else {
            return;
        };
        let before = row.0.len();
        row.0
            .retain(|&(_, sender, id)| (sender, id) != (s.sender, s.client_msg_id));
        if row.0.len() != before {
            let value = row.encode();
            self.kv.push(KvOp::Put {
                key: keys::marketing(s.recipient),
                value,
            });
        }
    }

    /// Forgets the businesses and pairs of a run of slots that moved away.
    pub(crate) fn forget_businesses(&mut self, run: &std::ops::Range<u16>) {
        let inside = |id: u64| run.contains(&u16::from(slot_of(id)));
        let platform = self.platform();
        let gone: Vec<u64> = self
            .business
            .known
            .iter()
            .copied()
            .filter(|b| inside(*b) && *b != platform)
            .collect();
        for b in gone {
            self.business.known.remove(&b);
            self.config.directory.remove(b);
        }
        self.business.loaded.retain(|b, _| !inside(*b));
        self.business.marketing.retain(|c, _| !inside(*c));
        self.business.pairs.retain(|(b, _), _| !inside(*b));
        self.business.heads.retain(|b, _| !inside(*b));
        self.business.messages.retain(|(b, _, _), _| !inside(*b));
        self.business.held.retain(|(b, _, _), _| !inside(*b));
        self.forget_campaigns(inside);
    }

    /// Whether `id` is a business of this shard.
    pub(crate) fn is_business(&self, id: u64) -> bool {
        !self.business.known.is_empty() && self.business.known.contains(&id)
    }

    /// The business's account and templates, read on first touch.
    pub(super) fn loaded(&mut self, b: u64) -> Result<&mut Loaded, BrokerError> {
        if !self.business.loaded.contains_key(&b) {
            let now = self.now_ms();
            let row = match self.store.get(&keys::business(b))? {
                Some(v) => serde_json::from_slice(&v)
                    .map_err(|e| corrupt("business row", format!("business {b}: {e}")))?,
                None if b == self.platform() => BusinessRow {
                    display_name: "Courier".into(),
                    verified: true,
                    verification_reason: "the platform's own account".into(),
                    tier: (TIERS.len() - 1) as u8,
                    messages_per_sec: self.settings().max_messages_per_sec,
                    ..BusinessRow::default()
                },
                None => {
                    return Err(BrokerError::refused(
                        ErrorCode::NOT_A_BUSINESS,
                        format!("{b} is not a business"),
                    ))
                }
            };
            let mut templates = HashMap::new();
            for (_, v) in self.store.scan(&keys::templates(b), usize::MAX)? {
                match serde_json::from_slice::<Template>(&v) {
                    Ok(t) => {
                        templates.insert(t.name.clone(), t);
                    }
                    Err(e) => warn!(business = b, error = %e, "unreadable template skipped"),
                }
            }
            let period = self.settings().tier_period_ms;
            let mut started = HashMap::new();
            for (k, v) in self.store.scan(&keys::pairs(b), usize::MAX)? {
                if let (Some(c), Some(p)) = (keys::last_id(&k), PairRow::decode(&v)) {
                    if p.started_ms > 0 && p.started_ms + period > now {
                        started.insert(c, p.started_ms);
                    }
                }
            }
            let today = now / DAY_MS;
            let mut days = BTreeMap::new();
            for (k, v) in self.store.scan(&keys::quality_days(b), usize::MAX)? {
                if let (Some(day), Ok(c)) =
                    (keys::last_id(&k), serde_json::from_slice::<DayCounts>(&v))
                {
                    if day + QUALITY_DAYS > today {
                        days.insert(day, c);
                    }
                }
            }
            let burst = row.messages_per_sec;
            self.business.loaded.insert(
                b,
                Loaded {
                    row,
                    templates,
                    started,
                    bucket: Bucket::full(burst, now),
                    admitted: HashSet::new(),
                    admitted_order: VecDeque::new(),
                    days,
                    sent_templates: HashMap::new(),
                    sent_order: VecDeque::new(),
                    tier_checked_ms: 0,
                },
            );
        }
        Ok(self.business.loaded.get_mut(&b).expect("loaded above"))
    }

    /// The pair's state, read on first touch.
    pub(super) fn pair(&mut self, b: u64, customer: u64) -> Result<&mut Pair, BrokerError> {
        if !self.business.pairs.contains_key(&(b, customer)) {
            if self.business.pairs.len() >= PAIRS_CACHED_MAX {
                self.flush_pairs();
                self.business.pairs.clear();
            }
            let row = self.stored_pair(b, customer)?;
            let s = &self.config.business;
            let bucket = Bucket::full(s.per_customer_burst, self.now_ms());
            self.business
                .pairs
                .insert((b, customer), Pair { row, bucket });
        }
        Ok(self
            .business
            .pairs
            .get_mut(&(b, customer))
            .expect("read above"))
    }

    /// The pair's row as stored (the default for a pair never written),
    /// bypassing the cache.
    pub(super) fn stored_pair(&self, b: u64, customer: u64) -> Result<PairRow, BrokerError> {
        match self.store.get(&keys::pair(b, customer))? {
            Some(v) => PairRow::decode(&v)
                .ok_or_else(|| corrupt("pair row", format!("{b}.{customer}")).into()),
            None => Ok(PairRow::default()),
        }
    }

    /// Queues the pairs whose read hours changed for the next batch.
    pub(super) fn flush_pairs(&mut self) {
        for (b, customer) in std::mem::take(&mut self.business.pairs_changed) {
            if self.business.pairs.contains_key(&(b, customer)) {
                let write = self.pair_write(b, customer);
                self.kv.push(write);
            }
        }
    }

    fn pair_write(&self, b: u64, customer: u64) -> KvOp {
        let row = &self.business.pairs[&(b, customer)].row;
        KvOp::Put {
            key: keys::pair(b, customer),
            value: row.encode(),
        }
    }

    /// Writes `ops` now, synced (an admin change, a customer's request).
    fn write_now(&self, ops: &[KvOp]) -> Result<(), BrokerError> {
        self.store.append_with(&[], ops, self.now_ms())?;
        Ok(())
    }

    /// Appends `entry` to the pair's ledger and applies it: the writes.
    fn ledger_append(
        &mut self,
        b: u64,
        customer: u64,
        entry: ConsentEntry,
    ) -> Result<Vec<KvOp>, BrokerError> {
        let pair = self.pair(b, customer)?;
        let n = pair.row.ledger_len;
        pair.row.apply(&entry);
        let value = serde_json::to_vec(&entry).expect("an entry serializes");
        Ok(vec![
            KvOp::Put {
                key: keys::ledger_entry(b, customer, n),
                value,
            },
            self.pair_write(b, customer),
        ])
    }

    /// A customer's message to business `b` (planned for this batch): it
    /// opens the service window, and an opt-out or opt-in keyword takes
    /// effect now (the writes go with the message's).
    pub(crate) fn customer_wrote(&mut self, b: u64, s: &SendCmd) {
        if s.kind == MessageKind::Receipt {
            return self.receipt_for_business(b, &s.payload);
        }
        if s.kind != MessageKind::Chat || self.is_business(s.sender) {
            return;
        }
        let now = self.now_ms();
        let (out, inn) = (
            &self.config.business.opt_out_keywords,
            &self.config.business.opt_in_keywords,
        );
        let word = keyword(&s.payload, out, inn);
        let customer = s.sender;
        let mut ops = Vec::new();
        let pair = match self.pair(b, customer) {
            Ok(p) => p,
            Err(e) => {
                error!(shard = self.id, error = %e, "reading a pair row failed");
                return;
            }
        };
        pair.row.last_customer_ms = now;
        let (marketing, utility, withdrew) = (
            pair.row.marketing,
            pair.row.utility,
            pair.row.keyword_withdrew,
        );
        let entry = |action: &str, purpose: &str| ConsentEntry {
            at_ms: now,
            action: action.into(),
            purpose: purpose.into(),
            source: "keyword".into(),
            text_version: 0,
            text: String::from_utf8_lossy(&s.payload).trim().to_owned(),
            language: String::new(),
        };
        let mut entries = Vec::new();
        match word {
            Some(Keyword::OptOut) => {
                if marketing {
                    entries.push(entry("opt_out", "marketing"));
                }
                if utility {
                    entries.push(entry("opt_out", "utility"));
                }
                let bits = marketing as u8 | (utility as u8) << 1;
                if bits != 0 {
                    self.business
                        .pairs
                        .get_mut(&(b, customer))
                        .expect("read")
                        .row
                        .keyword_withdrew = bits;
                }
            }
            Some(Keyword::OptIn) => {
                if withdrew & 1 != 0 && !marketing {
                    entries.push(entry("opt_in", "marketing"));
                }
                if withdrew & 2 != 0 && !utility {
                    entries.push(entry("opt_in", "utility"));
                }
                self.business
                    .pairs
                    .get_mut(&(b, customer))
                    .expect("read")
                    .row
                    .keyword_withdrew = 0;
            }
            None => {}
        }
        for e in entries {
            match self.ledger_append(b, customer, e) {
                Ok(w) => ops.extend(w),
                Err(e) => error!(shard = self.id, error = %e, "a keyword's ledger entry failed"),
            }
        }
        ops.push(self.pair_write(b, customer));
        self.kv.extend(ops);
        self.engage_customer(b, customer);
    }

    /// Admits a business's send, or refuses it with its rule's code.
    pub(crate) fn admit_business_send(&mut self, cmd: BusinessSendCmd) {
        let client_msg_id = cmd.client_msg_id;
        let outgoing = Outgoing {
            business: cmd.business,
            customer: cmd.customer,
            client_msg_id,
            kind: cmd.kind,
            payload: &cmd.payload,
            campaign: None,
        };
        match self.check_business_send(&outgoing) {
            Ok(payload) => {
                let mut reply = cmd.reply;
                reply.outcome = Some(Box::new(OutcomeTap {
                    queue: self.peers[self.id as usize].tx.clone(),
                    business: cmd.business,
                    customer: cmd.customer,
                }));
                let send = SendCmd {
                    sender: cmd.business,
                    sender_device: cmd.device,
                    recipient: cmd.customer,
                    client_msg_id,
                    destination: Destination::User(cmd.customer),
                    scope: 0,
                    kind: cmd.kind,
                    payload,
                    covers_seq: 0,
                    done: Completion::Reply(reply),
                    accepted: cmd.accepted,
                };
                if let Err(unsent) = cmd.admitted.send(Some(send)) {
                    // The session is gone: its client retries.
                    drop(unsent);
                }
            }
            Err((code, retry_after_ms, why)) => {
                tracing::debug!(
                    shard = self.id,
                    business = cmd.business,
                    customer = cmd.customer,
                    ?code,
                    why,
                    "business send refused"
                );
                let result = SendResult {
                    timestamp_ms: retry_after_ms,
                    ..failed(client_msg_id, code)
                };
                cmd.reply.send(result);
                let _ = cmd.admitted.send(None);
            }
        }
    }

    /// The rules, in order; the payload to store, or the refusal (code,
    /// retry-after hint, why).
    pub(crate) fn check_business_send(
        &mut self,
        cmd: &Outgoing<'_>,
    ) -> Result<Bytes, (ErrorCode, u64, String)> {
        let (b, customer) = (cmd.business, cmd.customer);
        let internal = |e: BrokerError| {
            let code = e.code();
            (code, 0, e.to_string())
        };
        let platform = b == self.platform();
        if !self.is_business(b) {
            // Not (or no longer) a business: an ordinary send.
            return Ok(cmd.payload.clone());
        }
        let now = self.now_ms();
        let s = self.config.business.clone();
        let loaded = self.loaded(b).map_err(internal)?;
        if loaded.admitted.contains(&(cmd.client_msg_id, customer)) {
            // A retry: the customer's shard stores it at most once.
            return match cmd.kind {
                MessageKind::Template => self
                    .render(b, customer, cmd.client_msg_id, cmd.payload)
                    .map(|r| r.payload),
                _ => Ok(cmd.payload.clone()),
            };
        }
        let pair = self.pair(b, customer).map_err(internal)?;
        if pair.row.blocked {
            return Err((
                ErrorCode::BLOCKED_BY_CUSTOMER,
                0,
                "the customer blocks this business".into(),
            ));
        }
        let in_window =
            pair.row.last_customer_ms > 0 && now < pair.row.last_customer_ms + s.window_ms;
        let mut template = None;
        let (payload, new_conversation) =
            match cmd.kind {
                MessageKind::Template => {
                    let Rendered {
                        payload,
                        category,
                        name,
                        language,
                    } = self.render(b, customer, cmd.client_msg_id, cmd.payload)?;
                    template = Some((name, language));
                    let pair = &self.business.pairs[&(b, customer)];
                    if !platform && !pair.row.consents(category) {
                        let purpose = if category == Category::Marketing {
                            "marketing"
                        } else {
                            "utility"
                        };
                        return Err((
                            ErrorCode::NO_CONSENT,
                            0,
                            format!("the customer has no current opt-in for {purpose}"),
                        ));
                    }
                    let loaded = &self.business.loaded[&b];
                    let open = loaded
                        .started
                        .get(&customer)
                        .is_some_and(|&t| t + s.tier_period_ms > now);
                    (payload, !in_window && !open)
                }
                _ if platform || in_window => (cmd.payload.clone(), false),
                _ => return Err((
                    ErrorCode::OUTSIDE_WINDOW,
                    0,
                    "no message from the customer in the last 24 hours: send an approved template"
                        .into(),
                )),
            };
        // Rates: the business's, then the pair's; both are checked before
        // either is taken.
        let loaded = self.business.loaded.get_mut(&b).expect("loaded");
        let mps = loaded.row.messages_per_sec.max(1);
        let business_wait = loaded.bucket.wait_ms(1000.0 / f64::from(mps), mps, now);
        let pair = self.business.pairs.get_mut(&(b, customer)).expect("read");
        let pair_wait = if platform {
            0
        } else {
            pair.bucket
                .wait_ms(s.per_customer_interval_ms as f64, s.per_customer_burst, now)
        };
        if business_wait > 0 || pair_wait > 0 {
            let wait = business_wait.max(pair_wait);
            let why = if business_wait >= pair_wait {
                format!("over {mps} messages per second")
            } else {
                format!(
                    "over {} messages to one customer per {} ms, bursts of {}",
                    1, s.per_customer_interval_ms, s.per_customer_burst
                )
            };
            return Err((ErrorCode::BUSINESS_RATE_LIMITED, wait, why));
        }
        if new_conversation {
            self.maybe_upgrade_tier(b, now);
            let loaded = self.business.loaded.get_mut(&b).expect("loaded");
            loaded
                .started
                .retain(|_, &mut t| t + s.tier_period_ms > now);
            if let Some(limit) = loaded.row.tier_limit() {
                if loaded.started.len() >= limit as usize {
                    return Err((
                        ErrorCode::TIER_LIMIT_REACHED,
                        0,
                        format!(
                            "{limit} customers reached in the last 24 hours (the messaging tier)"
                        ),
                    ));
                }
            }
            loaded.started.insert(customer, now);
        }
        // Admitted: take the tokens, remember the id, write what changed.
        let loaded = self.business.loaded.get_mut(&b).expect("loaded");
        loaded.bucket.take();
        loaded.admitted.insert((cmd.client_msg_id, customer));
        loaded
            .admitted_order
            .push_back((cmd.client_msg_id, customer));
        if loaded.admitted_order.len() > ADMITTED_MAX {
            if let Some(old) = loaded.admitted_order.pop_front() {
                loaded.admitted.remove(&old);
            }
        }
        let pair = self.business.pairs.get_mut(&(b, customer)).expect("read");
        if !platform {
            pair.bucket.take();
        }
        if new_conversation {
            pair.row.started_ms = now;
            let w = self.pair_write(b, customer);
            self.kv.push(w);
        }
        if !platform {
            self.engage_business(b, customer);
        }
        let (campaign, variant) = cmd.campaign.unwrap_or_default();
        let (name, language) = template.clone().unwrap_or_default();
        let origin = Origin {
            template: name,
            language,
            campaign,
            variant,
        };
        self.message_fact(b, customer, cmd.client_msg_id, Fact::Accepted, Some(origin));
        if let Some((name, _)) = template {
            self.template_sent(b, customer, cmd.client_msg_id, name, new_conversation);
        }
        Ok(payload)
    }

    /// Counts today's signal `f` for business `b` (written with the next
    /// batch); days past the rating's look-back are dropped.
    fn count(&mut self, b: u64, f: impl FnOnce(&mut DayCounts)) {
        let today = self.now_ms() / DAY_MS;
        self.count_on(b, today, f);
    }

    /// [`Shard::count`] on day `day` (a read counts on its message's day;
    /// a day already past the look-back is not counted).
    fn count_on(&mut self, b: u64, day: u64, f: impl FnOnce(&mut DayCounts)) {
        let today = self.now_ms() / DAY_MS;
        if day + QUALITY_DAYS <= today {
            return;
        }
        let Some(l) = self.business.loaded.get_mut(&b) else {
            return;
        };
        f(l.days.entry(day).or_default());
        self.business.counted.insert((b, day));
        let old: Vec<u64> = l
            .days
            .keys()
            .copied()
            .filter(|&d| d + QUALITY_DAYS <= today)
            .collect();
        for d in old {
            l.days.remove(&d);
            self.kv.push(KvOp::Delete {
                key: keys::quality_day(b, d),
            });
        }
    }

    /// Writes the quality days counted since the last batch, once each
    /// (with the batch that is about to be written).
    pub(crate) fn flush_counts(&mut self) {
        self.flush_stats();
        if self.business.counted.is_empty() {
            return;
        }
        for (b, day) in std::mem::take(&mut self.business.counted) {
            let Some(c) = self.business.loaded.get(&b).and_then(|l| l.days.get(&day)) else {
                continue;
            };
            let value = serde_json::to_vec(c).expect("counts serialize");
            self.kv.push(KvOp::Put {
                key: keys::quality_day(b, day),
                value,
            });
        }
    }

    /// A template message admitted: counted, remembered (its read receipt
    /// counts too), and its template rated; a template rated low is paused.
    fn template_sent(&mut self, b: u64, customer: u64, id: u64, name: String, started: bool) {
        self.count(b, |c| {
            c.sent += 1;
            c.started += u64::from(started);
            c.templates.entry(name.clone()).or_default().0 += 1;
        });
        let today = self.now_ms() / DAY_MS;
        let Some(l) = self.business.loaded.get_mut(&b) else {
            return;
        };
        l.sent_templates
            .insert((id, customer), (name.clone(), today));
        l.sent_order.push_back((id, customer));
        if l.sent_order.len() > ADMITTED_MAX {
            if let Some(old) = l.sent_order.pop_front() {
                l.sent_templates.remove(&old);
            }
        }
        let w = weighted(&l.days, today, Some(&name));
        let quality = w.rating();
        let approved = l
            .templates
            .get(&name)
            .is_some_and(|t| t.status == TemplateStatus::Approved);
        if quality == Quality::Low && approved {
            let mut t = l.templates[&name].clone();
            let now = self.now_ms();
            pause(
                &mut t,
                now,
                format!(
                    "quality low: {:.0}% of its messages read, {:.1}% blocks and reports (7 days)",
                    100.0 * w.read_rate(),
                    100.0 * w.negative_rate()
                ),
            );
            match self.save_template(b, t.clone()) {
                Ok(()) => self.template_event(b, &t),
                Err(e) => error!(shard = self.id, error = %e, "pausing a template failed"),
            }
        }
    }

    /// Every 6 hours at most, a business at medium quality or better that
    /// used half its tier (new conversations in a day, within the last 7)
    /// moves up a tier.
    fn maybe_upgrade_tier(&mut self, b: u64, now: u64) {
        let today = now / DAY_MS;
        let Some(l) = self.business.loaded.get_mut(&b) else {
            return;
        };
        if now < l.tier_checked_ms + TIER_CHECK_MS || now < l.row.tier_at_ms + TIER_CHECK_MS {
            return;
        }
        l.tier_checked_ms = now;
        let Some(limit) = l.row.tier_limit() else {
            return;
        };
        let quality = weighted(&l.days, today, None).rating();
        let busiest_day = l.days.values().map(|c| c.started).max().unwrap_or(0);
        let used = busiest_day.max(l.started.len() as u64);
        if quality < Quality::Medium || used * 2 < u64::from(limit) {
            return;
        }
        let mut row = l.row.clone();
        row.tier += 1;
        row.tier_at_ms = now;
        if let Err(e) = self.save_row(b, row) {
            error!(shard = self.id, error = %e, "upgrading a tier failed");
        }
    }

    /// A receipt from `customer` in business `b`'s inbox: each message it
    /// covers moves on, and for a read receipt each template message it
    /// covers counts as read for the quality rating, once.
    fn receipt_for_business(&mut self, b: u64, payload: &[u8]) {
        let Ok(r) = ReceiptPayload::decode(payload) else {
            return;
        };
        let fact = match r.status {
            ReceiptStatus::Read => Some(Fact::Read),
            ReceiptStatus::Delivered => Some(Fact::Delivered),
            _ => None,
        };
        if let Some(fact) = fact {
            for (id, _) in &r.messages {
                self.receipted(b, r.reader, *id, fact);
            }
        }
        if r.status != ReceiptStatus::Read || self.loaded(b).is_err() {
            return;
        }
        let l = self.business.loaded.get_mut(&b).expect("loaded");
        let read: Vec<(String, u64)> = r
            .messages
            .iter()
            .filter_map(|(id, _)| l.sent_templates.remove(&(*id, r.reader)))
            .collect();
        for (name, day) in read {
            self.count_on(b, day, |c| {
                c.read += 1;
                c.templates.entry(name).or_default().1 += 1;
            });
        }
    }

    /// Renders a template send's payload for `customer`: the message's
    /// payload and the template's category.
    pub(super) fn render(
        &mut self,
        b: u64,
        customer: u64,
        message: u64,
        payload: &[u8],
    ) -> Result<Rendered, (ErrorCode, u64, String)> {
        let send = TemplateSend::decode(payload).map_err(|e| {
            (
                ErrorCode::TEMPLATE_PARAMS_INVALID,
                0,
                format!("template send: {e}"),
            )
        })?;
        let now = self.now_ms();
        let preferred = self
            .business
            .pairs
            .get(&(b, customer))
            .map(|p| p.row.language.clone())
            .unwrap_or_default();
        let loaded = self.business.loaded.get_mut(&b).expect("loaded");
        let verified = loaded.row.verified;
        let Some(t) = loaded.templates.get_mut(&send.name) else {
            return Err((
                ErrorCode::NO_SUCH_TEMPLATE,
                0,
                format!("no template {:?}", send.name),
            ));
        };
        if t.status == TemplateStatus::Paused && t.paused_until_ms <= now {
            // The pause is over.
            t.status = TemplateStatus::Approved;
        }
        match t.status {
            TemplateStatus::Approved => {}
            TemplateStatus::Paused => {
                return Err((
                    ErrorCode::TEMPLATE_PAUSED,
                    t.paused_until_ms - now,
                    format!("template {:?} is paused", t.name),
                ))
            }
            other => {
                return Err((
                    ErrorCode::TEMPLATE_NOT_APPROVED,
                    0,
                    format!("template {:?} is {other:?}", t.name).to_lowercase(),
                ))
            }
        }
        let Some(v) = t.version(&send.language, &preferred) else {
            return Err((
                ErrorCode::NO_SUCH_TEMPLATE,
                0,
                format!("template {:?} has no version in {}", t.name, send.language),
            ));
        };
        let mut m = t
            .render(v, &send, verified)
            .map_err(|why| (ErrorCode::TEMPLATE_PARAMS_INVALID, 0, why))?;
        if let Some(links) = &self.config.clicks {
            // The same link for a retry: the token is a function of its parts.
            for (i, button) in m.buttons.iter_mut().enumerate() {
                if button.kind == courier_protocol::business::ButtonKind::Url {
                    let click = crate::state::business_events::click::Click {
                        business: b,
                        message,
                        customer,
                        button: i as u8,
                        url: std::mem::take(&mut button.value),
                    };
                    let token = crate::state::business_events::click::mint(&links.key, &click);
                    button.value = format!("{}/c/{token}", links.base);
                }
            }
        }
        Ok(Rendered {
            payload: m.encode(),
            category: m.category,
            name: m.name,
            language: m.language,
        })
    }

    /// A customer's request about business `b`.
    pub(crate) fn business_ask(&mut self, a: BusinessAskCmd) {
        let answer = self.answer_ask(a.customer, a.request);
        let _ = a.answer.send(answer);
    }

    fn answer_ask(&mut self, customer: u64, r: BusinessRequest) -> Result<Body, BrokerError> {
        let b = r.business;
        if !self.is_business(b) {
            return Err(BrokerError::refused(
                ErrorCode::NOT_A_BUSINESS,
                format!("{b} is not a business"),
            ));
        }
        self.loaded(b)?;
        let now = self.now_ms();
        let mut ops = Vec::new();
        match r.op {
            BusinessOp::Info => {}
            BusinessOp::Templates => {
                let loaded = &self.business.loaded[&b];
                let mut approved: Vec<&Template> = loaded
                    .templates
                    .values()
                    .filter(|t| t.status == TemplateStatus::Approved)
                    .collect();
                approved.sort_by(|x, y| x.name.cmp(&y.name));
                let list: Vec<serde_json::Value> = approved
                    .iter()
                    .map(|t| {
                        serde_json::json!({
                            "name": t.name,
                            "category": t.def.category,
                            "versions": t.def.versions,
                        })
                    })
                    .collect();
                return Ok(Body::TemplatePack(TemplatePack {
                    business: b,
                    valid_until_ms: now + TEMPLATE_PACK_VALID_MS,
                    json: serde_json::Value::Array(list).to_string(),
                }));
            }
            BusinessOp::Block | BusinessOp::Unblock => {
                let pair = self.pair(b, customer)?;
                let newly = !pair.row.blocked && r.op == BusinessOp::Block;
                pair.row.blocked = r.op == BusinessOp::Block;
                ops.push(self.pair_write(b, customer));
                if newly {
                    self.count(b, |c| c.blocks += 1);
                }
            }
            BusinessOp::Report => {
                let pair = self.pair(b, customer)?;
                pair.row.reports += 1;
                ops.push(self.pair_write(b, customer));
                self.count(b, |c| c.reports += 1);
            }
            BusinessOp::OptIn | BusinessOp::OptOut => {
                let Some(purpose) = purpose_name(r.purpose) else {
                    return Err(BrokerError::refused(
                        ErrorCode::INVALID_REQUEST,
                        "an opt-in or opt-out names its purpose",
                    ));
                };
                let entry = ConsentEntry {
                    at_ms: now,
                    action: if r.op == BusinessOp::OptIn {
                        "opt_in"
                    } else {
                        "opt_out"
                    }
                    .into(),
                    purpose: purpose.into(),
                    source: "in_chat".into(),
                    text_version: 0,
                    text: r.text.clone(),
                    language: r.language.clone(),
                };
                ops = self.ledger_append(b, customer, entry)?;
            }
        }
        if !ops.is_empty() {
            if let Err(e) = self.write_now(&ops) {
                // What is in memory is ahead of the disk: read it again.
                self.business.pairs.remove(&(b, customer));
                return Err(e);
            }
        }
        let pair = &self.pair(b, customer)?.row;
        let (blocked, marketing, utility) = (pair.blocked, pair.marketing, pair.utility);
        Ok(Body::BusinessInfo(Box::new(info(
            b,
            &self.business.loaded[&b].row,
            blocked,
            marketing,
            utility,
        ))))
    }

    /// An admin API request for business `b`, answered once written.
    pub(crate) fn business_admin(&mut self, a: BusinessAdminCmd) {
        let shard = self.id;
        if let Some(report) = Report::of(&a.op, self.now_ms()) {
            return self.hand_report(a.business, report, a.answer);
        }
        let answer = self
            .answer_admin(a.business, a.op)
            .map_err(|e| admin_failure(shard, e));
        let _ = a.answer.send(answer);
    }

    /// A report that reads a business's whole history: checked here, made
    /// on the reports thread (`crate::reports`), whose answer goes to the
    /// asker. What this shard counted is already written: a
    /// `BusinessAdmin` runs after `write_batch`.
    fn hand_report(&mut self, b: u64, report: Report, answer: AdminAnswer) {
        let shard = self.id;
        if let Err(e) = self.admin_business(b) {
            let _ = answer.send(Err(admin_failure(shard, e)));
            return;
        }
        let store = self.store.clone();
        self.config.reports.run(move |turn| {
            let made = match turn {
                Turn::Run => report.make(&*store, b).map_err(|e| admin_failure(shard, e)),
                Turn::Busy => Err(Invalid {
                    status: 503,
                    code: "busy",
                    message: format!(
                        "{} reports are waiting to be made on this node; retry",
                        crate::reports::QUEUE_LEN
                    ),
                }),
            };
            let _ = answer.send(made);
        });
    }

    /// Business `b`, loaded, for an admin request (404 if it is none).
    fn admin_business(&mut self, b: u64) -> Result<(), AdminError> {
        if !self.is_business(b) {
            return Err(AdminError::Invalid(Invalid {
                status: 404,
                code: "not_a_business",
                message: format!("{b} is not a business"),
            }));
        }
        self.loaded(b)?;
        Ok(())
    }

    fn answer_admin(&mut self, b: u64, op: AdminOp) -> Result<serde_json::Value, AdminError> {
        let now = self.now_ms();
        let settings = self.config.business.clone();
        if let AdminOp::Put {
            display_name,
            profile,
        } = &op
        {
            if let Some(p) = profile {
                p.check()?;
            }
            if let Some(n) = display_name {
                check_display_name(n)?;
            }
            if !self.is_business(b) {
                let Some(name) = display_name else {
                    return Err(
                        invalid("display_name_invalid", "registering a business names it").into(),
                    );
                };
                let row = BusinessRow {
                    display_name: name.clone(),
                    profile: profile.clone().unwrap_or_default(),
                    messages_per_sec: settings.messages_per_sec,
                    registered_at_ms: now,
                    tier_at_ms: now,
                    ..BusinessRow::default()
                };
                self.write_now(&[business_write(b, &row)])?;
                self.business.known.insert(b);
                self.config.directory.add(b);
                self.business.loaded.remove(&b);
                return Ok(self.loaded(b)?.row.to_json(b));
            }
        }
        self.admin_business(b)?;
        let loaded = self.business.loaded.get_mut(&b).expect("loaded");
        let mut row = loaded.row.clone();
        let value = match op {
            AdminOp::Get => {
                let mut v = row.to_json(b);
                v["templates"] = loaded.templates.len().into();
                let today = now / DAY_MS;
                let quality = weighted(&loaded.days, today, None).rating();
                v["quality"] = serde_json::to_value(quality).expect("json");
                let sum = |f: fn(&DayCounts) -> u64| loaded.days.values().map(f).sum::<u64>();
                v["last_7_days"] = serde_json::json!({
                    "template_messages": sum(|c| c.sent),
                    "read": sum(|c| c.read),
                    "blocks": sum(|c| c.blocks),
                    "reports": sum(|c| c.reports),
                    "conversations_started": sum(|c| c.started),
                });
                v["conversations_started_in_period"] = loaded
                    .started
                    .values()
                    .filter(|&&t| t + settings.tier_period_ms > now)
                    .count()
                    .into();
                return Ok(v);
            }
            AdminOp::Put {
                display_name,
                profile,
            } => {
                if let Some(p) = profile {
                    row.profile = p;
                }
                if let Some(n) = display_name.filter(|n| *n != row.display_name) {
                    row.pending_display_name = Some(n);
                }
                self.save_row(b, row)?
            }
            AdminOp::Verify { verified, reason } => {
                if verified {
                    if let Some(n) = row.pending_display_name.take() {
                        row.display_name = n;
                    }
                    // A verified business starts at 2,000 customers.
                    if row.tier < VERIFIED_TIER {
                        row.tier = VERIFIED_TIER;
                        row.tier_at_ms = now;
                    }
                }
                row.verified = verified;
                row.verified_at_ms = now;
                row.verification_reason = reason;
                self.save_row(b, row)?
            }
            AdminOp::Limits {
                tier,
                messages_per_sec,
            } => {
                if let Some(t) = tier {
                    if usize::from(t) >= TIERS.len() {
                        return Err(invalid(
                            "tier_invalid",
                            "tier is 0 to 4 (250, 2,000, 10,000, 100,000, unlimited)",
                        )
                        .into());
                    }
                    row.tier = t;
                    row.tier_at_ms = now;
                }
                if let Some(m) = messages_per_sec {
                    if m == 0 || m > settings.max_messages_per_sec {
                        return Err(invalid(
                            "messages_per_sec_invalid",
                            format!("messages_per_sec is 1 to {}", settings.max_messages_per_sec),
                        )
                        .into());
                    }
                    row.messages_per_sec = m;
                }
                self.save_row(b, row)?
            }
            AdminOp::PutTemplate { name, def } => {
                check_template_name(&name)?;
                def.check()?;
                if !loaded.templates.contains_key(&name)
                    && loaded.templates.len() >= settings.max_templates
                {
                    return Err(invalid(
                        "too_many_templates",
                        format!("at most {} templates per business", settings.max_templates),
                    )
                    .into());
                }
                // A new or changed template is reviewed again.
                let t = Template {
                    name: name.clone(),
                    def,
                    status: TemplateStatus::Pending,
                    status_reason: "submitted".into(),
                    status_at_ms: now,
                    ..Template::default()
                };
                self.save_template(b, t.clone())?;
                self.template_event(b, &t);
                template_json(&t)
            }
            AdminOp::Templates => {
                let mut list: Vec<_> = loaded.templates.values().map(template_json).collect();
                list.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
                serde_json::Value::Array(list)
            }
            AdminOp::SetTemplateStatus {
                name,
                status,
                reason,
            } => {
                let Some(mut t) = loaded.templates.get(&name).cloned() else {
                    return Err(AdminError::Invalid(Invalid {
                        status: 404,
                        code: "no_such_template",
                        message: format!("no template {name:?}"),
                    }));
                };
                if status == TemplateStatus::Paused {
                    pause(&mut t, now, reason);
                } else {
                    t.status = status;
                    t.status_reason = reason;
                    t.status_at_ms = now;
                }
                self.save_template(b, t.clone())?;
                self.template_event(b, &t);
                template_json(&t)
            }
            AdminOp::Consent { customer, entry } => {
                if !crate::state::ids::valid_user(customer) || customer == b {
                    return Err(
                        invalid("customer_invalid", "a customer is another user's id").into(),
                    );
                }
                if !["opt_in", "opt_out"].contains(&entry.action.as_str()) {
                    return Err(invalid("action_invalid", "action is opt_in or opt_out").into());
                }
                if !["marketing", "utility"].contains(&entry.purpose.as_str()) {
                    return Err(
                        invalid("purpose_invalid", "purpose is marketing or utility").into(),
                    );
                }
                if !SOURCES.contains(&entry.source.as_str()) {
                    return Err(
                        invalid("source_invalid", format!("source is one of {SOURCES:?}")).into(),
                    );
                }
                if entry.action == "opt_in" && entry.text.trim().is_empty() {
                    return Err(
                        invalid("text_missing", "an opt-in records the wording shown").into(),
                    );
                }
                let entry = ConsentEntry {
                    at_ms: now,
                    ..entry
                };
                let ops = self.ledger_append(b, customer, entry)?;
                if let Err(e) = self.write_now(&ops) {
                    self.business.pairs.remove(&(b, customer));
                    return Err(e.into());
                }
                self.pair(b, customer)?.row.to_json()
            }
            AdminOp::ConsentOf { customer } => {
                let current = self.pair(b, customer)?.row.to_json();
                let history = history(&*self.store, b, Some(customer))?;
                serde_json::json!({ "business": b, "customer": customer, "current": current, "history": history })
            }
            AdminOp::Erase { customer } => {
                // The messages first, the tombstone last: an erasure cut
                // short leaves no tombstone, and its retry finishes it.
                let messages = self.erase_messages(b, customer)?;
                let mut ops: Vec<KvOp> = self
                    .store
                    .scan(&keys::ledger(b, customer), usize::MAX)?
                    .into_iter()
                    .map(|(key, _)| KvOp::Delete { key })
                    .collect();
                let erased = ops.len();
                // The statuses of the messages sent to the customer: no
                // later fact about them is counted or told.
                for (key, v) in self.store.scan(&keys::message_statuses(b), usize::MAX)? {
                    if MessageRow::decode(&v).is_some_and(|r| r.customer == customer) {
                        ops.push(KvOp::Delete { key });
                    }
                }
                self.business.messages.retain(|_, r| r.customer != customer);
                self.business.held.retain(|(_, _, c), _| *c != customer);
                ops.push(KvOp::Delete {
                    key: keys::awaiting(b, customer),
                });
                self.business.awaiting.remove(&(b, customer));
                ops.push(KvOp::Delete {
                    key: keys::labels(b, customer),
                });
                self.business.labels.remove(&(b, customer));
                // The tombstone: a pair row that holds nothing but when.
                let tombstone = PairRow {
                    erased_ms: now,
                    ..PairRow::default()
                };
                ops.push(KvOp::Put {
                    key: keys::pair(b, customer),
                    value: tombstone.encode(),
                });
                self.write_now(&ops)?;
                self.business.pairs.remove(&(b, customer));
                if let Some(l) = self.business.loaded.get_mut(&b) {
                    l.started.remove(&customer);
                }
                serde_json::json!({
                    "business": b,
                    "customer": customer,
                    "erased_at_ms": now,
                    "ledger_entries_erased": erased,
                    "messages_erased": messages,
                })
            }
            AdminOp::Export { customer } => export(&*self.store, b, customer, now)?,
            AdminOp::Events { after, limit } => {
                let (events, head) = self.events_after(b, after, limit)?;
                serde_json::json!({ "business": b, "last": head.last, "events": events })
            }
            AdminOp::MessageStatus {
                message,
                customer: Some(customer),
            } => self.message_json(b, message, customer)?,
            // `business_admin` hands these to the reports thread and never
            // brings them here; answered all the same, so that the match
            // stays whole for any other caller.
            AdminOp::Stats { period } => Report::Stats(period).make(&*self.store, b)?,
            AdminOp::MessageStatus {
                message,
                customer: None,
            } => Report::MessageStatuses(message).make(&*self.store, b)?,
            AdminOp::Engagement => self.engagement_report(b)?,
            AdminOp::Labels { customer, labels } => {
                if let Some(labels) = labels {
                    crate::state::business_events::check_labels(&labels)
                        .map_err(|why| invalid("labels_invalid", why))?;
                    self.set_labels(b, customer, labels)?;
                }
                let labels = self.labels(b, customer)?;
                serde_json::json!({ "business": b, "customer": customer, "labels": labels })
            }
            AdminOp::TimeZone { utc_offset_minutes } => {
                if !(-720..=840).contains(&utc_offset_minutes) {
                    return Err(invalid(
                        "time_zone_invalid",
                        "utc_offset_minutes is from -720 to 840",
                    )
                    .into());
                }
                let mut row = self.loaded(b)?.row.clone();
                row.utc_offset_minutes = utc_offset_minutes;
                self.save_row(b, row)?;
                self.engagement_report(b)?
            }
            AdminOp::SetWebhook { url, secret } => {
                if !url.is_empty() {
                    crate::webhooks::Endpoint::parse(&url)
                        .map_err(|why| invalid("webhook_url_invalid", why))?;
                    if secret.chars().count() < 16 {
                        return Err(invalid(
                            "webhook_secret_invalid",
                            "a webhook secret has at least 16 characters",
                        )
                        .into());
                    }
                }
                let mut row = self.loaded(b)?.row.clone();
                row.webhook_url = url;
                row.webhook_secret = secret;
                let hooked = !row.webhook_url.is_empty();
                self.save_row(b, row)?;
                if hooked {
                    self.config.directory.poke_webhook(b);
                }
                self.webhook_json(b)?
            }
            AdminOp::Webhook => self.webhook_json(b)?,
            AdminOp::WebhookBatch { limit } => {
                let row = &self.loaded(b)?.row;
                let (url, secret) = (row.webhook_url.clone(), row.webhook_secret.clone());
                let after = self.event_head(b)?.delivered;
                let events = if url.is_empty() {
                    Vec::new()
                } else {
                    self.events_after(b, after, limit)?.0
                };
                serde_json::json!({ "url": url, "secret": secret, "events": events })
            }
            AdminOp::WebhookDelivered { up_to } => {
                self.webhook_delivered(b, up_to)?;
                self.webhook_json(b)?
            }
            AdminOp::Convert { message, customer } => {
                self.reported(b, message, customer, Fact::Converted)?
            }
            AdminOp::Click { message, customer } => {
                self.reported(b, message, customer, Fact::Clicked)?
            }
            AdminOp::CreateCampaign(def) => self.create_campaign(b, *def)?,
            AdminOp::Campaigns => self.campaign_list(b)?,
            AdminOp::Campaign { id } => self.campaign_report(b, id)?,
            AdminOp::ControlCampaign { id, action } => self.control_campaign(b, id, action)?,
        };
        Ok(value)
    }

    /// Erases what `customer` left in business `b`'s inbox (messages to
    /// it, to lists it is on, receipts): each becomes kind `erased`, in
    /// place. Read a page at a time, each page's erasure one write; the
    /// customer's next message is appended on this thread, so none slips
    /// in between. Returns how many entries were erased.
    fn erase_messages(&self, b: u64, customer: u64) -> Result<usize, BrokerError> {
        const PAGE: usize = 1024;
        let mut after = self.store.state(b)?.oldest_seq.saturating_sub(1);
        let mut erased = 0;
        loop {
            let page = self.store.read_after(b, after, PAGE)?;
            let Some(last) = page.last() else {
                break;
            };
            after = last.seq;
            let seqs: Vec<u64> = page
                .iter()
                .filter(|m| m.record.sender == customer)
                .map(|m| m.seq)
                .collect();
            if !seqs.is_empty() {
                erased += self.store.erase(b, &seqs, MessageKind::Erased as u8)?;
            }
            if page.len() < PAGE {
                break;
            }
        }
        Ok(erased)
    }

    /// The webhook as the admin API shows it (not its secret).
    fn webhook_json(&mut self, b: u64) -> Result<serde_json::Value, BrokerError> {
        let url = self.loaded(b)?.row.webhook_url.clone();
        let head = self.event_head(b)?;
        Ok(serde_json::json!({
            "business": b,
            "url": url,
            "last_event": head.last,
            "delivered_up_to": head.delivered,
        }))
    }

    /// A fact the business (a conversion) or the customer's tap (a click)
    /// reports about one of its messages, written before it is answered:
    /// the message's row as it is then.
    fn reported(
        &mut self,
        b: u64,
        message: u64,
        customer: u64,
        fact: Fact,
    ) -> Result<serde_json::Value, AdminError> {
        self.message_json(b, message, customer)?;
        self.message_fact(b, customer, message, fact, None);
        self.flush_stats();
        let ops = std::mem::take(&mut self.kv);
        if let Err(e) = self.write_now(&ops) {
            // Not written: what the fact changed in memory is read again
            // from the store next time.
            self.business.heads.remove(&b);
            self.business.messages.remove(&(b, message, customer));
            self.business.stats.clear();
            self.business.engagement.remove(&b);
            return Err(e.into());
        }
        self.message_json(b, message, customer)
    }

    /// One message's status for one customer as the admin API shows it.
    fn message_json(
        &mut self,
        b: u64,
        message: u64,
        customer: u64,
    ) -> Result<serde_json::Value, AdminError> {
        match self.message_row(b, message, customer)? {
            Some(row) => {
                let mut v = serde_json::to_value(&row).expect("a message row serializes");
                v["business"] = b.into();
                v["message"] = message.into();
                Ok(v)
            }
            None => Err(no_such_message(b, message).into()),
        }
    }

    fn save_row(&mut self, b: u64, row: BusinessRow) -> Result<serde_json::Value, BrokerError> {
        self.write_now(&[business_write(b, &row)])?;
        let v = row.to_json(b);
        self.business.loaded.get_mut(&b).expect("loaded").row = row;
        Ok(v)
    }

    fn save_template(&mut self, b: u64, t: Template) -> Result<(), BrokerError> {
        self.write_now(&[KvOp::Put {
            key: keys::template(b, &t.name),
            value: serde_json::to_vec(&t).expect("a template serializes"),
        }])?;
        let loaded = self.business.loaded.get_mut(&b).expect("loaded");
        loaded.templates.insert(t.name.clone(), t);
        Ok(())
    }

    /// Tells the business of a template's new status: a `system` message
    /// from the platform's account in its inbox, its payload JSON.
    fn template_event(&mut self, b: u64, t: &Template) {
        let (_, id) = self.next_ids();
        let payload = serde_json::json!({
            "event": "template_status",
            "template": t.name,
            "status": t.status,
            "reason": t.status_reason,
            "at_ms": t.status_at_ms,
            "paused_until_ms": t.paused_until_ms,
        });
        let (tx, _rx) = oneshot::channel();
        let cmd = SendCmd {
            sender: self.platform(),
            sender_device: 0,
            recipient: b,
            client_msg_id: id,
            destination: Destination::User(b),
            scope: 0,
            kind: MessageKind::System,
            payload: Bytes::from(serde_json::to_vec(&payload).expect("json")),
            covers_seq: 0,
            done: Completion::Stored(tx),
            accepted: Instant::now(),
        };
        self.to_peer(b, ShardCmd::Send(cmd));
    }
}

pub(super) enum AdminError {
    Invalid(Invalid),
    Broker(BrokerError),
}

/// What an admin request that failed answers.
fn admin_failure(shard: u64, e: AdminError) -> Invalid {
    match e {
        AdminError::Invalid(i) => i,
        AdminError::Broker(
            e @ BrokerError::Storage(courier_storage::StoreError::Unreplicated(_)),
        ) => Invalid {
            status: 503,
            code: "unavailable",
            message: format!("{e}; retry"),
        },
        AdminError::Broker(e) => {
            error!(shard, error = %e, "a business admin request failed");
            Invalid {
                status: 500,
                code: "internal",
                message: e.to_string(),
            }
        }
    }
}

/// The admin requests made on the reports thread: each reads rows without
/// bound (every half hour a business counted, every customer a message
/// went to), only from the store.
enum Report {
    Stats(Period),
    MessageStatuses(u64),
    /// Every customer's ledger and tombstone, as of `now`.
    Export {
        now: u64,
    },
}

impl Report {
    fn of(op: &AdminOp, now: u64) -> Option<Report> {
        match *op {
            AdminOp::Export { customer: None } => Some(Report::Export { now }),
            AdminOp::Stats { period } => Some(Report::Stats(period)),
            AdminOp::MessageStatus {
                message,
                customer: None,
            } => Some(Report::MessageStatuses(message)),
            _ => None,
        }
    }

    fn make(&self, store: &dyn InboxStore, b: u64) -> Result<serde_json::Value, AdminError> {
        match *self {
            Report::Stats(period) => {
                let rows = stats_report(store, b, period)?;
                Ok(serde_json::json!({ "business": b, "period": period.name(), "rows": rows }))
            }
            Report::Export { now } => Ok(export(store, b, None, now)?),
            Report::MessageStatuses(message) => {
                let mut rows = Vec::new();
                for (_, v) in store.scan(&keys::message_statuses_of(b, message), usize::MAX)? {
                    let row = MessageRow::decode(&v).ok_or_else(|| {
                        BrokerError::from(corrupt("message status", format!("{b}.{message}")))
                    })?;
                    rows.push(row);
                }
                if rows.is_empty() {
                    return Err(no_such_message(b, message).into());
                }
                Ok(serde_json::json!({ "business": b, "message": message, "customers": rows }))
            }
        }
    }
}

impl From<Invalid> for AdminError {
    fn from(i: Invalid) -> AdminError {
        AdminError::Invalid(i)
    }
}

impl From<BrokerError> for AdminError {
    fn from(e: BrokerError) -> AdminError {
        match e {
            BrokerError::Refused { code, message } if code == ErrorCode::NOT_A_BUSINESS => {
                AdminError::Invalid(Invalid {
                    status: 404,
                    code: "not_a_business",
                    message,
                })
            }
            e => AdminError::Broker(e),
        }
    }
}

impl From<courier_storage::StoreError> for AdminError {
    fn from(e: courier_storage::StoreError) -> AdminError {
        AdminError::Broker(e.into())
    }
}

fn no_such_message(b: u64, message: u64) -> Invalid {
    Invalid {
        status: 404,
        code: "no_such_message",
        message: format!(
            "business {b} sent no message {message} to that customer through its rules"
        ),
    }
}

fn business_write(b: u64, row: &BusinessRow) -> KvOp {
    KvOp::Put {
        key: keys::business(b),
        value: serde_json::to_vec(row).expect("a business row serializes"),
    }
}

fn template_json(t: &Template) -> serde_json::Value {
    serde_json::json!({
        "name": t.name,
        "category": t.def.category,
        "languages": t.def.versions.iter().map(|v| v.language.clone()).collect::<Vec<_>>(),
        "status": t.status,
        "status_reason": t.status_reason,
        "status_at_ms": t.status_at_ms,
        "paused_until_ms": t.paused_until_ms,
        "pauses": t.pauses,
        "definition": t.def,
    })
}

fn info(b: u64, row: &BusinessRow, blocked: bool, marketing: bool, utility: bool) -> BusinessInfo {
    let p = &row.profile;
    BusinessInfo {
        business: b,
        verified: row.verified,
        display_name: row.display_name.clone(),
        about: p.about.clone(),
        address: p.address.clone(),
        description: p.description.clone(),
        email: p.email.clone(),
        websites: p.websites.clone(),
        picture: p.picture.clone(),
        blocked,
        marketing,
        utility,
    }
}

/// Business `b`'s export: one customer's ledger and tombstone, or every
/// customer's.
fn export(
    store: &dyn InboxStore,
    b: u64,
    customer: Option<u64>,
    now: u64,
) -> Result<serde_json::Value, BrokerError> {
    let history = history(store, b, customer)?;
    let erasures = erasures(store, b, customer)?;
    Ok(
        serde_json::json!({ "business": b, "exported_at_ms": now, "ledger": history, "erasures": erasures }),
    )
}

/// The ledger of one customer, or every customer, in order.
fn history(
    store: &dyn InboxStore,
    b: u64,
    customer: Option<u64>,
) -> Result<serde_json::Value, BrokerError> {
    let prefix = match customer {
        Some(c) => keys::ledger(b, c),
        None => keys::ledgers(b),
    };
    let mut out = Vec::new();
    for (k, v) in store.scan(&prefix, usize::MAX)? {
        let c = keys::be_u64(&k, 9).unwrap_or(0);
        match serde_json::from_slice::<ConsentEntry>(&v) {
            Ok(e) => {
                let mut j = serde_json::to_value(&e).expect("an entry serializes");
                j["customer"] = c.into();
                out.push(j);
            }
            Err(e) => warn!(business = b, error = %e, "unreadable ledger entry skipped"),
        }
    }
    Ok(serde_json::Value::Array(out))
}

/// The tombstones of erased customers (one customer's, or all).
fn erasures(
    store: &dyn InboxStore,
    b: u64,
    customer: Option<u64>,
) -> Result<serde_json::Value, BrokerError> {
    let prefix = match customer {
        Some(c) => keys::pair(b, c),
        None => keys::pairs(b),
    };
    let mut out = Vec::new();
    for (k, v) in store.scan(&prefix, usize::MAX)? {
        if let (Some(c), Some(p)) = (keys::last_id(&k), PairRow::decode(&v)) {
            if p.erased_ms > 0 {
                out.push(serde_json::json!({ "customer": c, "erased_at_ms": p.erased_ms }));
            }
        }
    }
    Ok(serde_json::Value::Array(out))
}

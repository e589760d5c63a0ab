//! Campaigns on the business's shard (state/campaigns.rs has the rows and
//! the pure rules; docs/BUSINESS.md the API).
//!
//! The shard's thread is the campaign's only runner, between batches
//! (`run_campaigns`, called every turn of the shard's loop when one is
//! due):
//! 1. A scheduled campaign starts once the node's clock reaches its start.
//! 2. A running one admits the next customers of its frozen segment, in
//!    order, through `check_business_send` (consent, window, template,
//!    tier, rates, exactly as a single send), while fewer than
//!    `CAMPAIGN_IN_FLIGHT` of its sends await their outcome and the
//!    business's rate has a token. A refused customer is counted under
//!    its rule's code; a server-side trouble (codes 50 to 53) stops the
//!    turn and is tried again.
//! 3. The turn's campaign rows, their admitted messages' status rows and
//!    events are written with one synced write, and only then are the
//!    sends queued on the customers' shards (anywhere in the cluster):
//!    a crash can lose a send, never an admission's record.
//! 4. Each send's outcome comes back as a `CopyDone` under the campaign's
//!    token: the status moves (sent, failed with its code) and the
//!    customer leaves `outstanding`, written with the batch.
//!
//! Customers admitted and not answered are sent again after a restart, a
//! failover, a `SHARD_UNAVAILABLE` outcome or `OVERDUE` without one: the
//! same client id and scope, so the customer's inbox stores it at most
//! once and a repeat is answered as the duplicate it is.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use courier_protocol::{Destination, ErrorCode, MessageKind, SendResult};
use courier_storage::KvOp;
use tracing::{debug, error, warn};

use super::business::{AdminError, Outgoing};
use super::business_state::Campaign;
use super::core::Shard;
use super::messages::{BusinessOutcome, Completion, SendCmd, ShardCmd};
use super::route::shard_of;
use crate::error::BrokerError;
use crate::state::business::{best_read_hour, invalid, Invalid};
use crate::state::business_events::MessageRow;
use crate::state::campaigns::{
    self, message_id, pick, CampaignDef, CampaignRow, CampaignState, Schedule, Segment,
    VariantCounts, CAMPAIGNS_MAX, CHUNK,
};
use crate::state::keys;
use crate::state::rows::corrupt;

/// Sends of one campaign awaiting their outcome at most.
const CAMPAIGN_IN_FLIGHT: usize = 256;
/// Customers one campaign's turn looks at, at most.
const TURN_MAX: usize = 1024;
/// A send without an outcome this long is sent again.
const OVERDUE: Duration = Duration::from_secs(30);
/// After a server-side trouble, the next try.
const RETRY: Duration = Duration::from_secs(1);
/// A scheduled campaign looks at the clock this often (the node's clock,
/// which tests move, is not a timer).
const SCHEDULE_POLL: Duration = Duration::from_secs(1);

/// A segment's customers' best hours (`ReadHours::best`), each and
/// over the sum of their counts (`None` while none of them read one).
struct SegmentHours {
    own: Vec<(u64, Option<usize>)>,
    best: Option<usize>,
}

/// Server-side troubles: not a rule's refusal, tried again.
fn transient(code: ErrorCode) -> bool {
    (50..=53).contains(&code.0)
}

impl Shard {
    /// Reads the unfinished campaigns of this shard's businesses (at
    /// start, or of a run of slots that moved here); their outstanding
    /// sends go again.
    pub(crate) fn load_campaigns(&mut self, run: Option<&std::ops::Range<u16>>) {
        let prefix = keys::all_campaigns();
        let scanned = match run {
            Some(run) => self.store.scan_slots(&prefix, run.clone(), usize::MAX),
            None => self.store.scan(&prefix, usize::MAX),
        };
        let rows = match scanned {
            Ok(rows) => rows,
            Err(e) => return error!(shard = self.id, error = %e, "reading campaigns failed"),
        };
        let shards = self.peers.len();
        for (k, v) in rows {
            let Some(b) = keys::be_u64(&k, 1) else {
                continue;
            };
            if shard_of(b, shards) != self.id as usize {
                continue;
            }
            match serde_json::from_slice::<CampaignRow>(&v) {
                Ok(row) if row.finished_ms == 0 => {
                    self.hold_campaign(b, row);
                }
                Ok(_) => {}
                Err(e) => {
                    error!(shard = self.id, business = b, error = %e, "a corrupt campaign row")
                }
            }
        }
        if !self.business.campaigns.is_empty() {
            self.wake_campaigns(Duration::ZERO);
        }
    }

    /// Keeps `row` in memory with a token for its outcomes.
    fn hold_campaign(&mut self, b: u64, row: CampaignRow) -> &mut Campaign {
        let id = row.id;
        // One token per campaign for the shard's life: a late repeat's
        // outcome still finds it.
        let token = match self.business.campaign_token_of.get(&(b, id)) {
            Some(&t) => t,
            None => {
                let t = self.token();
                self.business.campaign_tokens.insert(t, (b, id));
                self.business.campaign_token_of.insert((b, id), t);
                t
            }
        };
        let sends = row.variants.iter().map(|v| v.send().encode()).collect();
        self.business.campaigns.insert(
            (b, id),
            Campaign {
                row,
                token,
                sends,
                chunk: None,
                queued: HashMap::new(),
            },
        );
        self.business.campaigns.get_mut(&(b, id)).expect("inserted")
    }

    /// Forgets the campaigns of businesses in `run` (their shard moved).
    pub(crate) fn forget_campaigns(&mut self, inside: impl Fn(u64) -> bool) {
        self.business.campaigns.retain(|(b, _), _| !inside(*b));
        self.business
            .campaign_tokens
            .retain(|_, (b, _)| !inside(*b));
        self.business
            .campaign_token_of
            .retain(|(b, _), _| !inside(*b));
    }

    /// Runs the campaigns no later than `after`.
    fn wake_campaigns(&mut self, after: Duration) {
        let at = Instant::now() + after;
        if self.business.campaigns_due.is_none_or(|d| at < d) {
            self.business.campaigns_due = Some(at);
        }
    }

    /// When the shard's loop must turn for a campaign.
    pub(crate) fn campaigns_due(&self) -> Option<Instant> {
        self.business.campaigns_due
    }

    /// One turn of every campaign that is due (see the module's steps).
    pub(crate) fn run_campaigns(&mut self) {
        if self
            .business
            .campaigns_due
            .is_none_or(|d| d > Instant::now())
        {
            return;
        }
        self.business.campaigns_due = None;
        let ids: Vec<(u64, u64)> = self
            .business
            .campaigns
            .iter()
            .filter(|(_, c)| c.row.finished_ms == 0)
            .map(|(k, _)| *k)
            .collect();
        let mut sends = Vec::new();
        for (b, id) in ids {
            if let Err(e) = self.campaign_turn(b, id, &mut sends) {
                error!(shard = self.id, business = b, campaign = id, error = %e, "a campaign's turn failed");
                self.wake_campaigns(RETRY);
            }
        }
        if self.business.campaigns_changed.is_empty() && sends.is_empty() {
            return;
        }
        // The turn's admissions are written with it, not held.
        self.release_held(true);
        self.flush_counts();
        let kv = std::mem::take(&mut self.kv);
        match self.store.append_with(&[], &kv, self.now_ms()) {
            Ok(_) => {
                self.kv_written(true);
                for s in sends {
                    let recipient = s.recipient;
                    self.to_peer(recipient, ShardCmd::Send(s));
                }
            }
            Err(e) => {
                // Nothing was sent: read the campaigns again from what is
                // written, and go on from there.
                error!(shard = self.id, error = %e, "writing a campaign turn failed");
                self.kv_written(false);
                self.business.messages.clear();
                self.business.held.clear();
                self.business.stats.clear();
                self.business.heads.clear();
                self.business.campaigns.clear();
                self.load_campaigns(None);
                self.wake_campaigns(RETRY);
            }
        }
    }

    /// One campaign's turn: its start, its overdue sends, its admissions.
    fn campaign_turn(
        &mut self,
        b: u64,
        id: u64,
        sends: &mut Vec<SendCmd>,
    ) -> Result<(), BrokerError> {
        let now = self.now_ms();
        let at = Instant::now();
        let Some(c) = self.business.campaigns.get_mut(&(b, id)) else {
            return Ok(());
        };
        if c.row.state == CampaignState::Scheduled {
            if now < c.row.start_ms {
                self.wake_campaigns(SCHEDULE_POLL);
                return Ok(());
            }
            c.row.state = CampaignState::Running;
            self.business.campaigns_changed.insert((b, id));
        }
        // Sends again whatever is overdue (everything, after a restart).
        let c = self.business.campaigns.get_mut(&(b, id)).expect("held");
        let due: Vec<(u64, u8)> = c
            .row
            .outstanding
            .iter()
            .filter(|(customer, _)| c.queued.get(customer).is_none_or(|&q| q + OVERDUE <= at))
            .map(|(&customer, &v)| (customer, v))
            .collect();
        let token = c.token;
        for (customer, variant) in due {
            match self.campaign_resend(b, id, customer, variant, token) {
                Ok(send) => {
                    self.stats
                        .campaign_customers
                        .with_label_values(&["resent"])
                        .inc();
                    sends.push(send)
                }
                // Reading the business or the pair failed: again later.
                Err(code) if transient(code) => self.wake_campaigns(RETRY),
                Err(code) => {
                    // The template went away since: the send fails.
                    self.message_fact(
                        b,
                        customer,
                        message_id(id),
                        crate::state::business_events::Fact::Failed(code.0),
                        None,
                    );
                    let c = self.business.campaigns.get_mut(&(b, id)).expect("held");
                    c.row.outstanding.remove(&customer);
                    self.business.campaigns_changed.insert((b, id));
                }
            }
        }
        let c = self.business.campaigns.get_mut(&(b, id)).expect("held");
        if !c.row.outstanding.is_empty() {
            self.wake_campaigns(OVERDUE);
        }
        // Admissions.
        for turn in 0.. {
            let c = self.business.campaigns.get_mut(&(b, id)).expect("held");
            if !c.row.admitting() || c.row.outstanding.len() >= CAMPAIGN_IN_FLIGHT {
                break;
            }
            // The next customer's own hour has not come yet.
            if now < c.row.next_due_ms() {
                self.wake_campaigns(SCHEDULE_POLL);
                break;
            }
            if turn == TURN_MAX {
                // Refusals take no rate: other work goes first.
                self.wake_campaigns(Duration::ZERO);
                break;
            }
            let loaded = self.loaded(b)?;
            let mps = loaded.row.messages_per_sec.max(1);
            let wait = loaded.bucket.wait_ms(1000.0 / f64::from(mps), mps, now);
            if wait > 0 {
                self.wake_campaigns(Duration::from_millis(wait));
                break;
            }
            let index = self.business.campaigns[&(b, id)].row.next;
            let customer = self.segment_at(b, id, index)?;
            let c = self.business.campaigns.get_mut(&(b, id)).expect("held");
            let variant = pick(c.row.seed, customer, &c.row.weights());
            let payload = c.sends[variant].clone();
            let outgoing = Outgoing {
                business: b,
                customer,
                client_msg_id: message_id(id),
                kind: MessageKind::Template,
                payload: &payload,
                campaign: Some((id, variant as u8)),
            };
            match self.check_business_send(&outgoing) {
                Ok(rendered) => {
                    let c = self.business.campaigns.get_mut(&(b, id)).expect("held");
                    c.row.outstanding.insert(customer, variant as u8);
                    c.queued.insert(customer, at);
                    c.row.variants_counts[variant].targeted += 1;
                    sends.push(campaign_send(b, id, customer, rendered, c.token));
                    self.stats
                        .campaign_customers
                        .with_label_values(&["admitted"])
                        .inc();
                }
                Err((code, _, _)) if transient(code) => {
                    self.wake_campaigns(RETRY);
                    break;
                }
                Err((code, _, why)) => {
                    debug!(
                        shard = self.id,
                        business = b,
                        campaign = id,
                        customer,
                        ?code,
                        why,
                        "refused"
                    );
                    let c = self.business.campaigns.get_mut(&(b, id)).expect("held");
                    let counts = &mut c.row.variants_counts[variant];
                    counts.targeted += 1;
                    counts.refused.entry(code.0).or_default().add(customer);
                    self.stats
                        .campaign_customers
                        .with_label_values(&["refused"])
                        .inc();
                }
            }
            let c = self.business.campaigns.get_mut(&(b, id)).expect("held");
            c.row.next += 1;
            self.business.campaigns_changed.insert((b, id));
        }
        let c = self.business.campaigns.get_mut(&(b, id)).expect("held");
        let was = c.row.finished_ms;
        c.row.settle(now);
        if was != c.row.finished_ms {
            self.business.campaigns_changed.insert((b, id));
        }
        Ok(())
    }

    /// The send of an admitted customer, again (its rules were passed; the
    /// template is rendered anew). `Err`: the template cannot be rendered.
    fn campaign_resend(
        &mut self,
        b: u64,
        id: u64,
        customer: u64,
        variant: u8,
        token: u64,
    ) -> Result<SendCmd, ErrorCode> {
        let payload = self.business.campaigns[&(b, id)]
            .sends
            .get(usize::from(variant))
            .cloned()
            .ok_or(ErrorCode::INTERNAL)?;
        // After a restart or a failover, the business and the pair are
        // read here first.
        self.loaded(b).map_err(|_| ErrorCode::INTERNAL)?;
        self.pair(b, customer).map_err(|_| ErrorCode::INTERNAL)?;
        let rendered = self
            .render(b, customer, message_id(id), &payload)
            .map_err(|(code, _, _)| code)?
            .payload;
        let c = self.business.campaigns.get_mut(&(b, id)).expect("held");
        c.queued.insert(customer, Instant::now());
        Ok(campaign_send(b, id, customer, rendered, token))
    }

    /// The customer at `index` of campaign `id`'s segment.
    fn segment_at(&mut self, b: u64, id: u64, index: u64) -> Result<u64, BrokerError> {
        let chunk = index / CHUNK as u64;
        let c = self.business.campaigns.get_mut(&(b, id)).expect("held");
        if c.chunk.as_ref().is_none_or(|(n, _)| *n != chunk) {
            let v = self
                .store
                .get(&keys::segment(b, id, chunk))?
                .ok_or_else(|| corrupt("campaign segment", format!("{b}.{id}.{chunk}")))?;
            let ids = v
                .chunks_exact(8)
                .map(|x| u64::from_be_bytes(x.try_into().expect("8 bytes")))
                .collect();
            let c = self.business.campaigns.get_mut(&(b, id)).expect("held");
            c.chunk = Some((chunk, ids));
        }
        let c = &self.business.campaigns[&(b, id)];
        let (_, ids) = c.chunk.as_ref().expect("read");
        ids.get((index % CHUNK as u64) as usize)
            .copied()
            .ok_or_else(|| corrupt("campaign segment", format!("{b}.{id} at {index}")).into())
    }

    /// A campaign's send has its outcome (`CopyDone` under a campaign's
    /// token): the message's status moves, and the customer is answered
    /// unless the trouble was the server's (sent again shortly). False if
    /// `token` is not a campaign's.
    pub(crate) fn campaign_outcome(
        &mut self,
        token: u64,
        customer: u64,
        result: SendResult,
    ) -> bool {
        let Some(&(b, id)) = self.business.campaign_tokens.get(&token) else {
            return false;
        };
        let Some(c) = self.business.campaigns.get_mut(&(b, id)) else {
            return true;
        };
        if !c.row.outstanding.contains_key(&customer) {
            // A repeat's outcome after the first: already counted.
            return true;
        }
        if transient(result.code) {
            // Again, a little later.
            let now = Instant::now();
            c.queued
                .insert(customer, now.checked_sub(OVERDUE - RETRY).unwrap_or(now));
            self.wake_campaigns(RETRY);
            return true;
        }
        c.row.outstanding.remove(&customer);
        c.queued.remove(&customer);
        let admitting = c.row.admitting();
        self.business.campaigns_changed.insert((b, id));
        self.business_outcome(BusinessOutcome {
            business: b,
            customer,
            result,
        });
        let now = self.now_ms();
        let c = self.business.campaigns.get_mut(&(b, id)).expect("held");
        c.row.settle(now);
        if admitting || c.row.finished_ms != 0 {
            // Room in the window, or a finish to write.
            self.wake_campaigns(Duration::ZERO);
        }
        true
    }

    /// Counts a campaign message's status changes in its variant's figures
    /// (written with the batch): the statistics' dimension for it, if the
    /// campaign is there.
    pub(super) fn campaign_counted(
        &mut self,
        b: u64,
        id: u64,
        row: &MessageRow,
        changes: &[crate::state::business_events::Change],
    ) -> Result<Option<(String, String)>, BrokerError> {
        if !self.business.campaigns.contains_key(&(b, id)) {
            let Some(v) = self.store.get(&keys::campaign(b, id))? else {
                return Ok(None);
            };
            let row: CampaignRow = serde_json::from_slice(&v)
                .map_err(|e| corrupt("campaign", format!("{b}.{id}: {e}")))?;
            self.hold_campaign(b, row);
        }
        let c = self.business.campaigns.get_mut(&(b, id)).expect("held");
        let Some(counts) = c.row.variants_counts.get_mut(usize::from(row.variant)) else {
            return Ok(None);
        };
        for &change in changes {
            counts.counts.count(change, row.code, row.customer);
        }
        let variant = c.row.variants[usize::from(row.variant)].name.clone();
        self.business.campaigns_changed.insert((b, id));
        Ok(Some((format!("#{id}"), variant)))
    }

    /// Writes the campaign rows changed since the last batch (with it).
    /// A finished campaign leaves memory once its row is in the batch.
    pub(super) fn flush_campaigns(&mut self) {
        for (b, id) in std::mem::take(&mut self.business.campaigns_changed) {
            if let Some(c) = self.business.campaigns.get(&(b, id)) {
                self.kv.push(KvOp::Put {
                    key: keys::campaign(b, id),
                    value: serde_json::to_vec(&c.row).expect("a campaign row serializes"),
                });
                if c.row.finished_ms != 0 {
                    self.business.campaigns.remove(&(b, id));
                }
            }
        }
    }

    /// Creates a campaign of business `b` (written now); its first turn
    /// follows at once if it starts now.
    pub(super) fn create_campaign(
        &mut self,
        b: u64,
        def: CampaignDef,
    ) -> Result<serde_json::Value, AdminError> {
        def.check()?;
        let offset = self.loaded(b)?.row.utc_offset_minutes;
        for v in &def.variants {
            if !self.business.loaded[&b].templates.contains_key(&v.template) {
                return Err(Invalid {
                    status: 404,
                    code: "no_such_template",
                    message: format!("no template {:?}", v.template),
                }
                .into());
            }
        }
        let existing = self.store.scan(&keys::campaigns(b), usize::MAX)?;
        if existing.len() >= CAMPAIGNS_MAX {
            return Err(invalid(
                "too_many_campaigns",
                format!("a business keeps at most {CAMPAIGNS_MAX} campaigns"),
            )
            .into());
        }
        let id = existing
            .iter()
            .filter_map(|(k, _)| keys::last_id(k))
            .max()
            .unwrap_or(0)
            + 1;
        let (mut customers, label) = match def.segment {
            Segment::Customers(c) => (c, String::new()),
            Segment::Label(l) => (self.labelled(b, &l)?, l),
        };
        customers.sort_unstable();
        customers.dedup();
        customers.retain(|&c| c != b);
        if customers.is_empty() {
            return Err(invalid("segment_empty", "the segment has no customer").into());
        }
        let now = self.now_ms();
        let mut waves = Vec::new();
        let mut best_hour = None;
        if matches!(
            def.schedule,
            Schedule::BestHour | Schedule::CustomerBestHour
        ) {
            let hours = self.segment_hours(b, &customers)?;
            best_hour = match hours.best {
                Some(h) => Some(h as u64),
                None => self.engagement_report(b)?["best_hour"].as_u64(),
            };
            if def.schedule == Schedule::CustomerBestHour {
                let fallback = best_hour.map(|h| h as usize);
                (customers, waves) = campaigns::waves(hours.own, fallback, now, offset);
            }
        }
        let start_ms = match waves.first() {
            Some(w) => w.at_ms,
            None => campaigns::start_ms(&def.schedule, now, offset, best_hour),
        };
        let row = CampaignRow {
            id,
            name: def.name,
            seed: def.seed,
            schedule: def.schedule,
            label,
            created_ms: now,
            start_ms,
            finished_ms: 0,
            state: CampaignState::Scheduled,
            total: customers.len() as u64,
            next: 0,
            outstanding: Default::default(),
            variants_counts: vec![VariantCounts::default(); def.variants.len()],
            variants: def.variants,
            waves,
        };
        let mut ops: Vec<KvOp> = customers
            .chunks(CHUNK)
            .enumerate()
            .map(|(i, ids)| KvOp::Put {
                key: keys::segment(b, id, i as u64),
                value: ids.iter().flat_map(|c| c.to_be_bytes()).collect(),
            })
            .collect();
        ops.push(KvOp::Put {
            key: keys::campaign(b, id),
            value: serde_json::to_vec(&row).expect("a campaign row serializes"),
        });
        self.store.append_with(&[], &ops, now)?;
        let report = row.report();
        self.hold_campaign(b, row);
        self.wake_campaigns(Duration::ZERO);
        Ok(report)
    }

    /// Each customer's own best hour, and the segment's. A pair row read
    /// for each customer not in the cache, not kept there (a segment can be
    /// far larger than the cache).
    fn segment_hours(&mut self, b: u64, customers: &[u64]) -> Result<SegmentHours, BrokerError> {
        let (mut sent, mut read) = ([0u64; 24], [0u64; 24]);
        let mut own = Vec::with_capacity(customers.len());
        for &c in customers {
            let hours = match self.business.pairs.get(&(b, c)) {
                Some(p) => p.row.hours,
                None => self.stored_pair(b, c)?.hours,
            };
            hours.add_to(&mut sent, &mut read);
            own.push((c, hours.best()));
        }
        Ok(SegmentHours {
            own,
            best: best_read_hour(&sent, &read),
        })
    }

    /// The customers whose conversation with `b` carries `label`.
    fn labelled(&mut self, b: u64, label: &str) -> Result<Vec<u64>, BrokerError> {
        let mut out = Vec::new();
        for (k, v) in self.store.scan(&keys::labels_of(b), usize::MAX)? {
            let labels: Vec<String> =
                serde_json::from_slice(&v).map_err(|e| corrupt("labels", format!("{b}: {e}")))?;
            if labels.iter().any(|l| l == label) {
                if let Some(c) = keys::last_id(&k) {
                    out.push(c);
                }
            }
        }
        Ok(out)
    }

    /// Campaign `id` of business `b` as reports show it.
    pub(super) fn campaign_report(
        &mut self,
        b: u64,
        id: u64,
    ) -> Result<serde_json::Value, AdminError> {
        if let Some(c) = self.business.campaigns.get(&(b, id)) {
            return Ok(c.row.report());
        }
        match self.store.get(&keys::campaign(b, id))? {
            Some(v) => Ok(serde_json::from_slice::<CampaignRow>(&v)
                .map_err(|e| BrokerError::from(corrupt("campaign", format!("{b}.{id}: {e}"))))?
                .report()),
            None => Err(no_such_campaign(b, id).into()),
        }
    }

    /// Every campaign of business `b`, newest last.
    pub(super) fn campaign_list(&mut self, b: u64) -> Result<serde_json::Value, AdminError> {
        let mut out = Vec::new();
        for (k, _) in self.store.scan(&keys::campaigns(b), usize::MAX)? {
            if let Some(id) = keys::last_id(&k) {
                out.push(self.campaign_report(b, id)?);
            }
        }
        Ok(serde_json::json!({ "business": b, "campaigns": out }))
    }

    /// Pauses, resumes or cancels campaign `id` (written now).
    pub(super) fn control_campaign(
        &mut self,
        b: u64,
        id: u64,
        action: &str,
    ) -> Result<serde_json::Value, AdminError> {
        if !self.business.campaigns.contains_key(&(b, id)) {
            match self.store.get(&keys::campaign(b, id))? {
                Some(v) => {
                    let row: CampaignRow = serde_json::from_slice(&v).map_err(|e| {
                        BrokerError::from(corrupt("campaign", format!("{b}.{id}: {e}")))
                    })?;
                    self.hold_campaign(b, row);
                }
                None => return Err(no_such_campaign(b, id).into()),
            }
        }
        let now = self.now_ms();
        let c = self.business.campaigns.get_mut(&(b, id)).expect("held");
        let state = c.row.state;
        let next = match (action, state) {
            (_, CampaignState::Done | CampaignState::Cancelled) => {
                return Err(invalid(
                    "campaign_finished",
                    format!("campaign {id} is {state:?}").to_lowercase(),
                )
                .into())
            }
            ("pause", CampaignState::Running | CampaignState::Scheduled) => CampaignState::Paused,
            ("resume", CampaignState::Paused) if now < c.row.start_ms => CampaignState::Scheduled,
            ("resume", CampaignState::Paused) => CampaignState::Running,
            ("cancel", _) => CampaignState::Cancelled,
            ("pause" | "resume", _) => state,
            _ => return Err(invalid("action_invalid", "pause, resume or cancel").into()),
        };
        c.row.state = next;
        c.row.settle(now);
        let report = c.row.report();
        let finished = c.row.finished_ms != 0;
        let op = KvOp::Put {
            key: keys::campaign(b, id),
            value: serde_json::to_vec(&c.row).expect("a campaign row serializes"),
        };
        self.business.campaigns_changed.remove(&(b, id));
        // Its counts since the last batch go with it.
        self.flush_counts();
        let mut kv = std::mem::take(&mut self.kv);
        kv.push(op);
        let written = self.store.append_with(&[], &kv, now);
        self.kv_written(written.is_ok());
        if let Err(e) = written {
            warn!(shard = self.id, error = %e, "writing a campaign's state failed");
            self.business.campaigns.remove(&(b, id));
            return Err(BrokerError::from(e).into());
        }
        if finished {
            self.business.campaigns.remove(&(b, id));
        }
        self.wake_campaigns(Duration::ZERO);
        Ok(report)
    }
}

/// A campaign's send to one customer: one-to-one, scoped by the customer
/// as a list copy is, its outcome told under the campaign's token.
fn campaign_send(b: u64, id: u64, customer: u64, payload: Bytes, token: u64) -> SendCmd {
    SendCmd {
        sender: b,
        sender_device: 0,
        recipient: customer,
        client_msg_id: message_id(id),
        destination: Destination::User(customer),
        scope: customer,
        kind: MessageKind::Template,
        payload,
        covers_seq: 0,
        done: Completion::Copy {
            sender: b,
            token,
            recipient: customer,
        },
        accepted: Instant::now(),
    }
}

fn no_such_campaign(b: u64, id: u64) -> Invalid {
    Invalid {
        status: 404,
        code: "no_such_campaign",
        message: format!("business {b} has no campaign {id}"),
    }
}

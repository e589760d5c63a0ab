//! The statuses of a business's messages and the events that tell them,
//! on the business's shard (state/business_events.rs has the rules).
//!
//! Facts all reach this shard's thread:
//! - admission (`check_business_send`): accepted;
//! - the send's outcome, which the session's reply hands back here as a
//!   `BusinessOutcome` (see `ReplyTo::outcome`), or a list copy's
//!   `CopyDone`: sent, or failed with its code (`SHARD_UNAVAILABLE` is no
//!   outcome: the client retries);
//! - the customer's receipts, appended to the business's inbox here:
//!   delivered, read;
//! - the admin API: converted; a tracked link's tap: clicked.
//!
//! A new message's acceptance is held (in memory, at most `HOLD_MS`) until
//! its outcome, and then counted, told and written with it: one row write
//! for both. Every other fact's events go in the batch it is learned in,
//! and the message's
//! row and the event head join them when that batch is written
//! (`flush_stats`, called by every write of the shard's rows), so an event
//! exists exactly when its status does. A node that dies between a
//! send's admission and its outcome may have written neither: the
//! business's retry (every client retries an unanswered send) is admitted
//! again and its duplicate answer is the outcome. A campaign writes its
//! admissions before its sends leave (`campaigns.rs`).

use std::collections::BTreeMap;

use courier_protocol::ErrorCode;
use courier_storage::{InboxStore, KvOp};
use tracing::error;

use super::core::Shard;
use super::messages::BusinessOutcome;
use crate::error::BrokerError;
use crate::state::business_events::{
    local_slot, Change, Counts, Engagement, Event, EventHead, EventRow, Fact, MessageRow, Origin,
    Period,
};
use crate::state::keys;
use crate::state::rows::corrupt;

/// Message rows kept in memory per shard before the cache starts over.
const MESSAGES_CACHED_MAX: usize = 200_000;
/// How often old events are deleted, and at most how many per business a
/// time.
const PRUNE_INTERVAL_MS: u64 = 60_000;
const PRUNE_MAX: usize = 10_000;
/// A new message's acceptance waits this long for its outcome before it is
/// written and told on its own.
const HOLD_MS: u64 = 1000;
/// Engagement rows are written at most this often.
const ENGAGEMENT_FLUSH_MS: u64 = 1000;
/// Statistics rows kept in memory per shard before the cache starts over.
const STATS_CACHED_MAX: usize = 50_000;

impl Shard {
    /// Business `b`'s event head, read on first touch.
    pub(super) fn event_head(&mut self, b: u64) -> Result<EventHead, BrokerError> {
        if let Some(h) = self.business.heads.get(&b) {
            return Ok(*h);
        }
        let head = match self.store.get(&keys::event_head(b))? {
            Some(v) => EventHead::decode(&v)
                .ok_or_else(|| corrupt("event head", format!("business {b}")))?,
            None => EventHead::default(),
        };
        self.business.heads.insert(b, head);
        Ok(head)
    }

    /// The row of business `b`'s message `id` to `customer`, read on
    /// first touch (`None`: no fact about it yet).
    pub(super) fn message_row(
        &mut self,
        b: u64,
        id: u64,
        customer: u64,
    ) -> Result<Option<MessageRow>, BrokerError> {
        if let Some(row) = self.business.messages.get(&(b, id, customer)) {
            return Ok(Some(row.clone()));
        }
        let Some(v) = self.store.get(&keys::message_status(b, id, customer))? else {
            return Ok(None);
        };
        let row = MessageRow::decode(&v)
            .ok_or_else(|| corrupt("message status", format!("{b}.{id}.{customer}")))?;
        // Kept: the fact that asked is about to apply to it.
        self.business
            .messages
            .insert((b, id, customer), row.clone());
        Ok(Some(row))
    }

    /// Applies `fact` to business `b`'s message `id` to `customer`: its row
    /// and one event per change go with the next batch. `origin`: what the
    /// message is, for a message first seen here.
    pub(crate) fn message_fact(
        &mut self,
        b: u64,
        customer: u64,
        id: u64,
        fact: Fact,
        origin: Option<Origin>,
    ) {
        if let Err(e) = self.apply_fact(b, customer, id, fact, origin) {
            error!(shard = self.id, business = b, error = %e, "recording a message status failed");
        }
    }

    fn apply_fact(
        &mut self,
        b: u64,
        customer: u64,
        id: u64,
        fact: Fact,
        origin: Option<Origin>,
    ) -> Result<(), BrokerError> {
        self.loaded(b)?;
        let mut row = self.message_row(b, id, customer)?.unwrap_or_else(|| {
            let o = origin.unwrap_or_default();
            MessageRow {
                customer,
                template: o.template,
                language: o.language,
                campaign: o.campaign,
                variant: o.variant,
                ..MessageRow::default()
            }
        });
        let now = self.now_ms();
        let fresh = row.status.is_none();
        let mut changes = row.apply(fact, now);
        if changes.is_empty() {
            return Ok(());
        }
        let key = (b, id, customer);
        if fresh && fact == Fact::Accepted {
            // Held until the outcome, a few milliseconds away, so that the
            // row is written once for both (`HOLD_MS` at most).
            self.business.held.insert(key, now);
            self.business.messages.insert(key, row);
            return Ok(());
        }
        let mut first_at = now;
        if let Some(at) = self.business.held.remove(&key) {
            changes.insert(0, Change::Accepted);
            first_at = at;
        }
        self.tell(key, row, &changes, first_at, now)
    }

    /// Counts and tells `changes` of message `key`'s `row` (the first
    /// learned at `first_at`, the rest `now`) with the next batch.
    fn tell(
        &mut self,
        key: (u64, u64, u64),
        row: MessageRow,
        changes: &[Change],
        first_at: u64,
        now: u64,
    ) -> Result<(), BrokerError> {
        let (b, id, customer) = key;
        self.count_changes(b, &row, changes)?;
        let mut head = self.event_head(b)?;
        for &change in changes {
            self.stats.business_change[change as usize].inc();
        }
        for (i, &change) in changes.iter().enumerate() {
            head.last += 1;
            let event = EventRow {
                message: id,
                customer: row.customer,
                change,
                code: if change == Change::Failed {
                    row.code
                } else {
                    0
                },
                template: &row.template,
                language: &row.language,
                at_ms: if i == 0 { first_at } else { now },
            };
            self.kv.push(KvOp::Put {
                key: keys::event(b, head.last),
                value: event.encode(),
            });
        }
        // The head and the row are written once per batch, however many
        // facts the batch holds (`flush_stats`).
        self.business.heads.insert(b, head);
        self.business.heads_changed.insert(b);
        self.business.messages.insert((b, id, customer), row);
        self.business.messages_changed.insert((b, id, customer));
        Ok(())
    }

    /// Counts `changes` of `row` in the statistics of the periods it was
    /// sent in: the business's totals, and its template's and language's.
    fn count_changes(
        &mut self,
        b: u64,
        row: &MessageRow,
        changes: &[Change],
    ) -> Result<(), BrokerError> {
        let mut dims: Vec<(&str, &str)> = vec![("", "")];
        if !row.template.is_empty() {
            dims.push((row.template.as_str(), row.language.as_str()));
        }
        // A campaign's variant: template `#<campaign>`, language the
        // variant's name (no template name starts with `#`).
        let campaign = match row.campaign {
            0 => None,
            c => self.campaign_counted(b, c, row, changes)?,
        };
        if let Some((tag, variant)) = &campaign {
            dims.push((tag.as_str(), variant.as_str()));
        }
        // Half hours only: a day's and a month's rows are their half
        // hours' sums, made when asked for (`stats_report`).
        let start = Period::HalfHour.start(row.since_ms);
        for &(template, language) in &dims {
            let key = keys::stats(b, Period::HalfHour as u8, start, template, language);
            if !self.business.stats.contains_key(&key) {
                let counts = match self.store.get(&key)? {
                    Some(v) => Counts::decode(&v)
                        .ok_or_else(|| corrupt("statistics", format!("business {b}")))?,
                    None => Counts::default(),
                };
                self.business.stats.insert(key.clone(), counts);
            }
            let counts = self.business.stats.get_mut(&key).expect("read above");
            for &change in changes {
                counts.count(change, row.code, row.customer);
            }
            self.business.stats_changed.insert(key);
        }
        for &change in changes {
            if matches!(change, Change::Sent | Change::Read) {
                let read = change == Change::Read;
                let (e, offset) = self.engagement(b)?;
                e.sent_or_read(row.customer, row.since_ms, read, offset);
                // The customer's own hours (its pair row, written with the
                // engagement, at most once a second).
                let (_, hour) = local_slot(row.since_ms, offset);
                self.pair(b, row.customer)?.row.hours.count(hour, read);
                self.business.pairs_changed.insert((b, row.customer));
            }
        }
        Ok(())
    }

    /// Tells the acceptances held for `HOLD_MS` without an outcome (all of
    /// them with `all`, before a write that must have them: a campaign's
    /// turn, a cache that starts over).
    pub(crate) fn release_held(&mut self, all: bool) {
        if self.business.held.is_empty() {
            return;
        }
        let now = self.now_ms();
        let all = all || self.business.messages.len() >= MESSAGES_CACHED_MAX;
        let due: Vec<((u64, u64, u64), u64)> = self
            .business
            .held
            .iter()
            .filter(|(_, &at)| all || now >= at + HOLD_MS || now < at)
            .map(|(k, &at)| (*k, at))
            .collect();
        for (key, at) in due {
            self.business.held.remove(&key);
            let Some(row) = self.business.messages.get(&key).cloned() else {
                continue;
            };
            if let Err(e) = self.tell(key, row, &[Change::Accepted], at, now) {
                error!(shard = self.id, error = %e, "recording a message status failed");
            }
        }
    }

    /// Business `b`'s engagement row, read on first touch, marked changed.
    fn engagement(&mut self, b: u64) -> Result<(&mut Engagement, i32), BrokerError> {
        let offset = self.loaded(b)?.row.utc_offset_minutes;
        if !self.business.engagement.contains_key(&b) {
            let e = match self.store.get(&keys::engagement(b))? {
                Some(v) => serde_json::from_slice(&v)
                    .map_err(|e| corrupt("engagement", format!("{b}: {e}")))?,
                None => Engagement::default(),
            };
            self.business.engagement.insert(b, e);
        }
        self.business.engagement_changed.insert(b);
        Ok((
            self.business.engagement.get_mut(&b).expect("read above"),
            offset,
        ))
    }

    /// Since when `customer` waits for business `b`'s answer (0: not).
    fn awaiting(&mut self, b: u64, customer: u64) -> Result<u64, BrokerError> {
        if let Some(&t) = self.business.awaiting.get(&(b, customer)) {
            return Ok(t);
        }
        let t = self
            .store
            .get(&keys::awaiting(b, customer))?
            .and_then(|v| keys::be_u64(&v, 0))
            .unwrap_or(0);
        if self.business.awaiting.len() >= MESSAGES_CACHED_MAX {
            self.business.awaiting.clear();
        }
        self.business.awaiting.insert((b, customer), t);
        Ok(t)
    }

    /// The labels of business `b`'s conversation with `customer`.
    pub(crate) fn labels(&mut self, b: u64, customer: u64) -> Result<Vec<String>, BrokerError> {
        if let Some(l) = self.business.labels.get(&(b, customer)) {
            return Ok(l.clone());
        }
        let l: Vec<String> = match self.store.get(&keys::labels(b, customer))? {
            Some(v) => serde_json::from_slice(&v)
                .map_err(|e| corrupt("labels", format!("{b}.{customer}: {e}")))?,
            None => Vec::new(),
        };
        if self.business.labels.len() >= MESSAGES_CACHED_MAX {
            self.business.labels.clear();
        }
        self.business.labels.insert((b, customer), l.clone());
        Ok(l)
    }

    /// Labels business `b`'s conversation with `customer` (written now).
    pub(crate) fn set_labels(
        &mut self,
        b: u64,
        customer: u64,
        labels: Vec<String>,
    ) -> Result<(), BrokerError> {
        let key = keys::labels(b, customer);
        let op = if labels.is_empty() {
            KvOp::Delete { key }
        } else {
            KvOp::Put {
                key,
                value: serde_json::to_vec(&labels).expect("labels serialize"),
            }
        };
        self.store.append_with(&[], &[op], self.now_ms())?;
        self.business.labels.insert((b, customer), labels);
        Ok(())
    }

    /// A customer's message to business `b` (written with this batch): its
    /// hour counts, and the customer waits for an answer from now, unless
    /// already waiting.
    pub(crate) fn engage_customer(&mut self, b: u64, customer: u64) {
        let now = self.now_ms();
        let labels = self.labels(b, customer).unwrap_or_default();
        let done = self
            .engagement(b)
            .map(|(e, offset)| e.customer_wrote(customer, now, offset, &labels));
        let waits = self.awaiting(b, customer);
        match (done, waits) {
            (Ok(()), Ok(0)) => {
                self.business.awaiting.insert((b, customer), now);
                self.kv.push(KvOp::Put {
                    key: keys::awaiting(b, customer),
                    value: now.to_be_bytes().to_vec(),
                });
            }
            (Ok(()), Ok(_)) => {}
            (Err(e), _) | (_, Err(e)) => {
                error!(shard = self.id, error = %e, "counting engagement failed")
            }
        }
    }

    /// Business `b` admitted a message to `customer`: a first answer to a
    /// waiting customer counts its wait.
    pub(crate) fn engage_business(&mut self, b: u64, customer: u64) {
        let since = match self.awaiting(b, customer) {
            Ok(0) => return,
            Ok(t) => t,
            Err(e) => return error!(shard = self.id, error = %e, "reading a wait failed"),
        };
        let now = self.now_ms();
        let labels = self.labels(b, customer).unwrap_or_default();
        match self.engagement(b) {
            Ok((e, offset)) => e.answered(customer, since, now, offset, &labels),
            Err(e) => return error!(shard = self.id, error = %e, "counting engagement failed"),
        }
        self.business.awaiting.insert((b, customer), 0);
        self.kv.push(KvOp::Delete {
            key: keys::awaiting(b, customer),
        });
    }

    /// Business `b`'s engagement as reports show it.
    pub(crate) fn engagement_report(&mut self, b: u64) -> Result<serde_json::Value, BrokerError> {
        let (e, offset) = self.engagement(b)?;
        let mut v = e.report(offset);
        v["business"] = b.into();
        Ok(v)
    }

    /// Writes what the facts since the last batch changed, with the batch
    /// about to be written: each message row and event head once, the
    /// statistics; the engagement rows at most once a second (a crash may
    /// lose the last second of them). The caches start over when large.
    pub(crate) fn flush_stats(&mut self) {
        self.release_held(false);
        self.flush_campaigns();
        for (b, id, customer) in std::mem::take(&mut self.business.messages_changed) {
            if let Some(row) = self.business.messages.get(&(b, id, customer)) {
                self.kv.push(KvOp::Put {
                    key: keys::message_status(b, id, customer),
                    value: row.encode(),
                });
            }
        }
        if self.business.messages.len() >= MESSAGES_CACHED_MAX && self.business.held.is_empty() {
            self.business.messages.clear();
        }
        for b in std::mem::take(&mut self.business.heads_changed) {
            if let Some(head) = self.business.heads.get(&b) {
                self.kv.push(KvOp::Put {
                    key: keys::event_head(b),
                    value: head.encode(),
                });
            }
            if self
                .business
                .loaded
                .get(&b)
                .is_some_and(|l| !l.row.webhook_url.is_empty())
            {
                self.config.directory.poke_webhook(b);
            }
        }
        let now = self.now_ms();
        if now >= self.business.engagement_flushed_ms + ENGAGEMENT_FLUSH_MS
            || now < self.business.engagement_flushed_ms
        {
            self.flush_engagement();
        }
        if self.business.stats_changed.is_empty() {
            return;
        }
        for key in std::mem::take(&mut self.business.stats_changed) {
            if let Some(c) = self.business.stats.get(&key) {
                let value = c.encode();
                self.kv.push(KvOp::Put { key, value });
            }
        }
        if self.business.stats.len() >= STATS_CACHED_MAX {
            self.business.stats.clear();
        }
    }

    /// Queues the engagement rows and the customers' read hours changed
    /// since they were last written: once a second with the batches (a
    /// crash loses at most that second of them, BUSINESS.md), and when
    /// the shard stops.
    pub(crate) fn flush_engagement(&mut self) {
        self.business.engagement_flushed_ms = self.now_ms();
        self.flush_pairs();
        for b in std::mem::take(&mut self.business.engagement_changed) {
            if let Some(e) = self.business.engagement.get(&b) {
                self.kv.push(KvOp::Put {
                    key: keys::engagement(b),
                    value: serde_json::to_vec(e).expect("engagement serializes"),
                });
            }
        }
    }

    /// A receipt from `customer` for business `b`'s message `id`: moves
    /// a message the business sent through its rules (others have no row).
    pub(crate) fn receipted(&mut self, b: u64, customer: u64, id: u64, fact: Fact) {
        match self.message_row(b, id, customer) {
            Ok(Some(_)) => self.message_fact(b, customer, id, fact, None),
            Ok(None) => {}
            Err(e) => error!(shard = self.id, error = %e, "reading a message status failed"),
        }
    }

    /// The outcome of a business's admitted send, from its session's reply.
    pub(crate) fn business_outcome(&mut self, o: BusinessOutcome) {
        let fact = match o.result.code {
            ErrorCode::OK => Fact::Sent {
                server_msg_id: o.result.server_msg_id,
            },
            // Not an outcome: the client retries it.
            ErrorCode::SHARD_UNAVAILABLE => return,
            code => Fact::Failed(code.0),
        };
        self.message_fact(o.business, o.customer, o.result.client_msg_id, fact, None);
    }

    /// The webhook took every event of business `b` up to `up_to`.
    pub(super) fn webhook_delivered(&mut self, b: u64, up_to: u64) -> Result<(), BrokerError> {
        let mut head = self.event_head(b)?;
        head.delivered = head.delivered.max(up_to.min(head.last));
        self.store.append_with(
            &[],
            &[KvOp::Put {
                key: keys::event_head(b),
                value: head.encode(),
            }],
            self.now_ms(),
        )?;
        self.business.heads.insert(b, head);
        Ok(())
    }

    /// Deletes, every minute, the events of the loaded businesses older
    /// than `business.events_kept_ms` that the webhook took (or gave up
    /// on), oldest first, at most [`PRUNE_MAX`] per business a time.
    pub(crate) fn prune_events(&mut self) {
        let now = self.now_ms();
        // By the node's clock, which a test moves forward.
        let due = self
            .business
            .pruned_at_ms
            .is_none_or(|at| now >= at + PRUNE_INTERVAL_MS);
        if !due || self.business.heads.is_empty() {
            return;
        }
        self.business.pruned_at_ms = Some(now);
        let kept = self.config.business.events_kept_ms;
        let businesses: Vec<u64> = self.business.heads.keys().copied().collect();
        for b in businesses {
            if let Err(e) = self.prune_events_of(b, now.saturating_sub(kept)) {
                error!(shard = self.id, business = b, error = %e, "deleting old events failed");
            }
        }
    }

    fn prune_events_of(&mut self, b: u64, before_ms: u64) -> Result<(), BrokerError> {
        let hooked = !self.loaded(b)?.row.webhook_url.is_empty();
        let mut head = self.event_head(b)?;
        let upto = if hooked { head.delivered } else { head.last };
        let mut ops = Vec::new();
        let mut seq = head.pruned;
        while seq < upto.min(head.last) && ops.len() < PRUNE_MAX {
            let next = seq + 1;
            let key = keys::event(b, next);
            if let Some(v) = self.store.get(&key)? {
                let at = Event::decode(b, next, &v).map_or(0, |e| e.at_ms);
                if at >= before_ms {
                    break;
                }
                ops.push(KvOp::Delete { key });
            }
            seq = next;
        }
        if seq == head.pruned {
            return Ok(());
        }
        head.pruned = seq;
        ops.push(KvOp::Put {
            key: keys::event_head(b),
            value: head.encode(),
        });
        self.store.write_lazy(&ops)?;
        self.business.heads.insert(b, head);
        Ok(())
    }

    /// Business `b`'s events after `after`, at most `limit`, and its head.
    pub(crate) fn events_after(
        &mut self,
        b: u64,
        after: u64,
        limit: usize,
    ) -> Result<(Vec<serde_json::Value>, EventHead), BrokerError> {
        let head = self.event_head(b)?;
        let mut out = Vec::new();
        for seq in after.max(head.pruned).saturating_add(1)..=head.last {
            if out.len() >= limit {
                break;
            }
            // Events older than the retention are gone: skipped.
            if let Some(v) = self.store.get(&keys::event(b, seq))? {
                let event = Event::decode(b, seq, &v)
                    .ok_or_else(|| BrokerError::from(corrupt("event", format!("{b}.{seq}"))))?;
                out.push(serde_json::to_value(&event).expect("an event serializes"));
            }
        }
        Ok((out, head))
    }
}

/// Business `b`'s statistics per `period`, oldest first: each row's
/// period start, template and language (empty: all messages) and its
/// figures as reports show them. A day's or a month's row is the sum of
/// its half hours' (rows of those periods that earlier versions wrote
/// count the same facts and are not read).
pub(crate) fn stats_report(
    store: &dyn InboxStore,
    b: u64,
    period: Period,
) -> Result<Vec<serde_json::Value>, BrokerError> {
    let prefix = keys::stats_of(b, Period::HalfHour as u8);
    // By (start, dimension): the keys' own order.
    let mut rows: BTreeMap<(u64, Vec<u8>), Counts> = BTreeMap::new();
    for (k, v) in store.scan(&prefix, usize::MAX)? {
        let Some(start) = keys::be_u64(&k, prefix.len()) else {
            continue;
        };
        let counts = Counts::decode(&v)
            .ok_or_else(|| BrokerError::from(corrupt("statistics", format!("business {b}"))))?;
        let dim = k[prefix.len() + 8..].to_vec();
        rows.entry((period.start(start), dim))
            .or_default()
            .merge(&counts);
    }
    let mut out = Vec::new();
    for ((start, dim), counts) in rows {
        let (template, language) = match dim.iter().position(|&c| c == 0) {
            Some(i) => (&dim[..i], &dim[i + 1..]),
            None => (&dim[..], &[][..]),
        };
        let mut r = counts.report();
        r["start_ms"] = start.into();
        let (template, language) = (
            String::from_utf8_lossy(template),
            String::from_utf8_lossy(language),
        );
        match template.strip_prefix('#').map(str::parse::<u64>) {
            Some(Ok(campaign)) => {
                r["campaign"] = campaign.into();
                r["variant"] = language.into_owned().into();
                r["template"] = "".into();
                r["language"] = "".into();
            }
            _ => {
                r["template"] = template.into_owned().into();
                r["language"] = language.into_owned().into();
            }
        }
        out.push(r);
    }
    // Key order is start order: the start comes before the dimension.
    Ok(out)
}

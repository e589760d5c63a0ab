//! Campaigns: one template message (or two or more variants of it) to a
//! segment of a business's customers, sent by the business's shard at the
//! business's rate through every rule a single send passes. This module
//! holds the rows and the pure rules (validation, the variant split, the
//! schedule); the shard's side is in `shard/campaigns.rs`.
//!
//! Rows (docs/BUSINESS.md, "Campaigns"):
//! - `E` business . campaign: [`CampaignRow`] (JSON): definition, state,
//!   cursor, the customers admitted and not yet answered, refusals and the
//!   per-variant counts;
//! - `H` business . campaign . chunk: the segment, frozen at creation,
//!   sorted and without repeats, [`CHUNK`] big-endian customer ids a row.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::business::{check_template_name, invalid, Invalid};
use super::business_events::{days_from_civil, Counts, Figure};

/// The top bit of a campaign message's client id: the id is
/// `CAMPAIGN_BIT | campaign` for every customer of the campaign (each
/// customer's copy is told apart by its scope, as a list send's are).
pub const CAMPAIGN_BIT: u64 = 1 << 63;
/// Customer ids per segment row.
pub const CHUNK: usize = 4096;
/// The most customers one campaign reaches.
pub const SEGMENT_MAX: usize = 1_000_000;
/// The most variants of one campaign.
pub const VARIANTS_MAX: usize = 8;
/// The most campaigns a business keeps (finished ones count).
pub const CAMPAIGNS_MAX: usize = 1000;

/// The client message id of campaign `id`'s messages.
pub fn message_id(campaign: u64) -> u64 {
    CAMPAIGN_BIT | campaign
}

/// The campaign a client message id belongs to, if it is a campaign's.
pub fn campaign_of(client_msg_id: u64) -> Option<u64> {
    (client_msg_id & CAMPAIGN_BIT != 0).then_some(client_msg_id & !CAMPAIGN_BIT)
}

/// One variant: a template, its language (empty: each customer's own, by
/// the usual fallback) and its parameters, and its share of the segment.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Variant {
    pub name: String,
    pub template: String,
    #[serde(default)]
    pub language: String,
    /// Positional parameters, `{{1}}` first.
    #[serde(default)]
    pub params: Vec<String>,
    /// Named parameters.
    #[serde(default)]
    pub named: BTreeMap<String, String>,
    #[serde(default = "one")]
    pub weight: u32,
}

fn one() -> u32 {
    1
}

impl Variant {
    /// The send this variant makes (the same for every customer).
    pub fn send(&self) -> courier_protocol::business::TemplateSend {
        let mut params: Vec<(String, String)> = self
            .params
            .iter()
            .map(|v| (String::new(), v.clone()))
            .collect();
        params.extend(self.named.iter().map(|(k, v)| (k.clone(), v.clone())));
        courier_protocol::business::TemplateSend {
            name: self.template.clone(),
            language: self.language.clone(),
            params,
        }
    }
}

/// Who a campaign reaches, as asked: a list of customers, or the
/// customers whose conversation carries a label.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum Segment {
    Customers(Vec<u64>),
    Label(String),
}

/// When a campaign starts.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum Schedule {
    #[default]
    Now,
    /// `YYYY-MM-DDTHH:MM` in the business's time zone.
    LocalTime(String),
    /// The next start of the segment's best hour: the hour with the best
    /// read rate over the segment's customers' own counts, or the
    /// business's (its engagement's `best_hour`) while none of them has
    /// read a message; now if neither shows one yet.
    BestHour,
    /// Each customer at the next start of its own best hour (the hour its
    /// messages were read at the best rate); a customer who has read none
    /// yet at the segment's best hour, as `BestHour`.
    CustomerBestHour,
}

/// A run of a `customer_best_hour` campaign's segment whose customers
/// start at one time: the segment is ordered by start, and the customers
/// before `end` (after the previous wave's) start at `at_ms`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Wave {
    pub end: u64,
    /// The local hour, or `None` for customers with no hour of their own
    /// nor the segment's (they start at once).
    pub hour: Option<u8>,
    pub at_ms: u64,
}

/// Orders a segment by when each customer starts: `hours` gives each
/// customer (in any order) its own best local hour, or `None` for the
/// segment's `fallback` (or at once, without one). The customers come back
/// ordered by start, then id, with the waves that say where each start
/// begins.
pub fn waves(
    hours: Vec<(u64, Option<usize>)>,
    fallback: Option<usize>,
    now: u64,
    offset_min: i32,
) -> (Vec<u64>, Vec<Wave>) {
    let mut timed: Vec<(u64, Option<u8>, u64)> = hours
        .into_iter()
        .map(|(c, own)| {
            let hour = own.or(fallback);
            let at = hour.map_or(now, |h| next_hour_start(h, now, offset_min));
            (at, hour.map(|h| h as u8), c)
        })
        .collect();
    timed.sort_unstable();
    let mut waves: Vec<Wave> = Vec::new();
    for (i, &(at, hour, _)) in timed.iter().enumerate() {
        match waves.last_mut() {
            Some(w) if w.at_ms == at && w.hour == hour => w.end = i as u64 + 1,
            _ => waves.push(Wave {
                end: i as u64 + 1,
                hour,
                at_ms: at,
            }),
        }
    }
    (timed.into_iter().map(|(_, _, c)| c).collect(), waves)
}

/// The next start of local hour `hour` (0 to 23) at `offset_min` from
/// UTC, or `now` when inside that hour already.
pub fn next_hour_start(hour: usize, now: u64, offset_min: i32) -> u64 {
    let offset = i64::from(offset_min) * 60_000;
    let local = now as i64 + offset;
    let day = local.div_euclid(86_400_000) * 86_400_000;
    let mut at = day + hour as i64 * 3_600_000;
    if at + 3_600_000 <= local {
        at += 86_400_000;
    }
    ((at - offset).max(now as i64)) as u64
}

/// The body that creates a campaign.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CampaignDef {
    pub name: String,
    pub variants: Vec<Variant>,
    pub segment: Segment,
    #[serde(default)]
    pub schedule: Schedule,
    #[serde(default)]
    pub seed: u64,
}

impl CampaignDef {
    /// Checks everything but the segment's content and the templates'
    /// existence (the shard knows those).
    pub fn check(&self) -> Result<(), Invalid> {
        if self.name.trim().is_empty() || self.name.len() > 128 {
            return Err(invalid("name_invalid", "a campaign name is 1 to 128 bytes"));
        }
        if self.variants.is_empty() || self.variants.len() > VARIANTS_MAX {
            return Err(invalid(
                "variants_invalid",
                format!("a campaign has 1 to {VARIANTS_MAX} variants"),
            ));
        }
        let mut names = std::collections::HashSet::new();
        for v in &self.variants {
            let ok_name = !v.name.is_empty()
                && v.name.len() <= 32
                && v.name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
            if !ok_name || !names.insert(v.name.as_str()) {
                return Err(invalid(
                    "variants_invalid",
                    "variant names are 1 to 32 letters, digits, _ and -, each once",
                ));
            }
            check_template_name(&v.template)?;
            if !(1..=1000).contains(&v.weight) {
                return Err(invalid("variants_invalid", "a weight is 1 to 1000"));
            }
        }
        match &self.segment {
            Segment::Customers(c) if c.is_empty() || c.len() > SEGMENT_MAX => Err(invalid(
                "segment_invalid",
                format!("a segment has 1 to {SEGMENT_MAX} customers"),
            )),
            Segment::Customers(c) if c.iter().any(|&id| !super::ids::valid_user(id)) => {
                Err(invalid(
                    "segment_invalid",
                    "a customer is a user id from 1 to 2^63-1",
                ))
            }
            Segment::Label(l) => super::business_events::check_labels(std::slice::from_ref(l))
                .map_err(|why| invalid("segment_invalid", why)),
            Segment::Customers(_) => Ok(()),
        }?;
        if let Schedule::LocalTime(t) = &self.schedule {
            parse_local(t)?;
        }
        Ok(())
    }
}

/// `YYYY-MM-DDTHH:MM` as milliseconds since the epoch in local time.
pub fn parse_local(t: &str) -> Result<i64, Invalid> {
    let bad = || invalid("schedule_invalid", "a local time is YYYY-MM-DDTHH:MM");
    let b = t.as_bytes();
    if b.len() != 16 || b[4] != b'-' || b[7] != b'-' || b[10] != b'T' || b[13] != b':' {
        return Err(bad());
    }
    let num = |r: std::ops::Range<usize>| -> Result<u32, Invalid> {
        let s = &t[r];
        if !s.bytes().all(|c| c.is_ascii_digit()) {
            return Err(bad());
        }
        s.parse().map_err(|_| bad())
    };
    let (y, mo, d, h, mi) = (
        num(0..4)?,
        num(5..7)?,
        num(8..10)?,
        num(11..13)?,
        num(14..16)?,
    );
    let days_in = match mo {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        2 => 28,
        _ => return Err(bad()),
    };
    if y < 1970 || d == 0 || d > days_in || h > 23 || mi > 59 {
        return Err(bad());
    }
    let days = days_from_civil(i64::from(y), mo, d);
    Ok(days * 86_400_000 + i64::from(h) * 3_600_000 + i64::from(mi) * 60_000)
}

/// When a campaign asked to start at `schedule` starts, for a business
/// `offset_min` from UTC whose best hour is `best_hour`, created `now`.
pub fn start_ms(schedule: &Schedule, now: u64, offset_min: i32, best_hour: Option<u64>) -> u64 {
    let offset = i64::from(offset_min) * 60_000;
    match schedule {
        Schedule::Now => now,
        Schedule::LocalTime(t) => {
            let local = parse_local(t).expect("checked at creation");
            (local - offset).max(now as i64) as u64
        }
        Schedule::BestHour | Schedule::CustomerBestHour => match best_hour {
            None => now,
            Some(h) => next_hour_start(h as usize, now, offset_min),
        },
    }
}

/// SplitMix64's finaliser: the variant split's hash.
pub fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The variant `customer` gets: `splitmix64(seed XOR customer) mod` the
/// weights' sum, placed on the weights in order. The same customer gets
/// the same variant however often it is asked (a restart, a failover).
pub fn pick(seed: u64, customer: u64, weights: &[u32]) -> usize {
    let total: u64 = weights.iter().map(|&w| u64::from(w)).sum();
    let mut r = splitmix64(seed ^ customer) % total.max(1);
    for (i, &w) in weights.iter().enumerate() {
        if r < u64::from(w) {
            return i;
        }
        r -= u64::from(w);
    }
    weights.len() - 1
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CampaignState {
    /// Waiting for its start.
    Scheduled,
    Running,
    Paused,
    /// Stopped by the business: nobody else is admitted; what was admitted
    /// still gets its outcome.
    Cancelled,
    /// Every customer admitted or refused, every admitted one answered.
    Done,
}

/// What one variant counts.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct VariantCounts {
    /// Customers given this variant (admitted or refused).
    pub targeted: u64,
    /// Refused by a rule, by wire code.
    pub refused: BTreeMap<u16, Figure>,
    /// The admitted messages' statuses.
    pub counts: Counts,
}

/// Row `E` business . campaign (JSON).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CampaignRow {
    pub id: u64,
    pub name: String,
    pub variants: Vec<Variant>,
    pub seed: u64,
    pub schedule: Schedule,
    /// The label the segment was chosen by, if one was.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub label: String,
    pub created_ms: u64,
    pub start_ms: u64,
    #[serde(default)]
    pub finished_ms: u64,
    pub state: CampaignState,
    /// Customers in the segment, and how many were admitted or refused.
    pub total: u64,
    pub next: u64,
    /// Customers admitted whose send has no outcome yet, and their
    /// variant: sent again (the same id, so at most once) after a restart
    /// or when an outcome is overdue.
    #[serde(default)]
    pub outstanding: BTreeMap<u64, u8>,
    pub variants_counts: Vec<VariantCounts>,
    /// A `customer_best_hour` campaign's starts (empty otherwise: every
    /// customer starts at `start_ms`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub waves: Vec<Wave>,
}

impl CampaignRow {
    pub fn weights(&self) -> Vec<u32> {
        self.variants.iter().map(|v| v.weight).collect()
    }

    /// Whether customers may still be admitted.
    pub fn admitting(&self) -> bool {
        self.state == CampaignState::Running && self.next < self.total
    }

    /// When the next customer in order starts (0: with the campaign).
    pub fn next_due_ms(&self) -> u64 {
        self.waves
            .iter()
            .find(|w| self.next < w.end)
            .map_or(0, |w| w.at_ms)
    }

    /// Done when nobody is left to admit (or it was cancelled) and every
    /// admitted send is answered.
    pub fn settle(&mut self, now: u64) {
        let drained = self.next >= self.total || self.state == CampaignState::Cancelled;
        if drained && self.outstanding.is_empty() && self.finished_ms == 0 {
            self.finished_ms = now;
            if self.state == CampaignState::Running {
                self.state = CampaignState::Done;
            }
        }
    }

    /// The campaign as reports show it (figures of fewer than 5 customers
    /// as "< 5").
    pub fn report(&self) -> serde_json::Value {
        let variants: Vec<serde_json::Value> = self
            .variants
            .iter()
            .zip(&self.variants_counts)
            .map(|(v, c)| {
                let refused: serde_json::Map<String, serde_json::Value> = c
                    .refused
                    .iter()
                    .map(|(code, f)| {
                        (
                            courier_protocol::ErrorCode(*code).name().to_owned(),
                            f.show(),
                        )
                    })
                    .collect();
                let mut r = c.counts.report();
                r["failed"] = c
                    .counts
                    .failed
                    .iter()
                    .map(|(code, f)| {
                        (
                            courier_protocol::ErrorCode(*code).name().to_owned(),
                            f.show(),
                        )
                    })
                    .collect::<serde_json::Map<_, _>>()
                    .into();
                r["name"] = v.name.clone().into();
                r["template"] = v.template.clone().into();
                r["language"] = v.language.clone().into();
                r["weight"] = v.weight.into();
                r["targeted"] = c.targeted.into();
                r["refused"] = refused.into();
                r
            })
            .collect();
        serde_json::json!({
            "id": self.id,
            "name": self.name,
            "state": self.state,
            "schedule": self.schedule,
            "label": self.label,
            "seed": self.seed,
            "created_ms": self.created_ms,
            "start_ms": self.start_ms,
            "finished_ms": self.finished_ms,
            "message_id": message_id(self.id).to_string(),
            "customers": self.total,
            "processed": self.next,
            "awaiting_outcome": self.outstanding.len(),
            "variants": variants,
            "waves": self.waves_report(),
        })
    }

    /// The waves as reports show them: each start's hour, time and
    /// customers (fewer than 5 as "< 5").
    fn waves_report(&self) -> serde_json::Value {
        let mut from = 0;
        self.waves
            .iter()
            .map(|w| {
                let n = w.end - from;
                from = w.end;
                serde_json::json!({
                    "hour": w.hour,
                    "start_ms": w.at_ms,
                    "customers": if (1..5).contains(&n) { serde_json::json!("< 5") } else { n.into() },
                })
            })
            .collect::<Vec<_>>()
            .into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn def(json: serde_json::Value) -> CampaignDef {
        serde_json::from_value(json).expect("a campaign body")
    }

    #[test]
    fn the_split_follows_the_weights_and_is_stable() {
        let weights = [3, 1];
        let mut n = [0u32; 2];
        for c in 1..=40_000u64 {
            let v = pick(7, c, &weights);
            assert_eq!(v, pick(7, c, &weights), "stable");
            n[v] += 1;
        }
        let share = f64::from(n[0]) / 40_000.0;
        assert!((0.73..0.77).contains(&share), "{n:?}");
        // Another seed splits differently.
        let moved = (1..=1000u64)
            .filter(|&c| pick(7, c, &weights) != pick(8, c, &weights))
            .count();
        assert!(moved > 100, "{moved}");
        // The documented hash (a test vector for integrators).
        assert_eq!(splitmix64(0), 0xE220_A839_7B1D_CDAF);
    }

    #[test]
    fn bodies_are_checked_with_one_code_per_rule() {
        let good = serde_json::json!({
            "name": "Winter sale",
            "variants": [
                { "name": "a", "template": "promo", "weight": 1 },
                { "name": "b", "template": "promo_b", "params": ["x"], "weight": 1 }
            ],
            "segment": { "customers": [5, 6] },
            "schedule": { "local_time": "2026-12-24T09:00" },
        });
        def(good.clone()).check().unwrap();
        let code = |patch: serde_json::Value| {
            let mut v = good.clone();
            for (k, x) in patch.as_object().unwrap() {
                v[k] = x.clone();
            }
            def(v).check().unwrap_err().code
        };
        assert_eq!(code(serde_json::json!({ "name": "" })), "name_invalid");
        assert_eq!(
            code(serde_json::json!({ "variants": [] })),
            "variants_invalid"
        );
        assert_eq!(
            code(serde_json::json!({ "variants": [
                { "name": "a", "template": "promo" }, { "name": "a", "template": "promo" }
            ] })),
            "variants_invalid"
        );
        assert_eq!(
            code(serde_json::json!({ "variants": [{ "name": "a", "template": "Promo" }] })),
            "name_invalid"
        );
        assert_eq!(
            code(
                serde_json::json!({ "variants": [{ "name": "a", "template": "p", "weight": 0 }] })
            ),
            "variants_invalid"
        );
        assert_eq!(
            code(serde_json::json!({ "segment": { "customers": [] } })),
            "segment_invalid"
        );
        assert_eq!(
            code(serde_json::json!({ "segment": { "customers": [0] } })),
            "segment_invalid"
        );
        assert_eq!(
            code(serde_json::json!({ "schedule": { "local_time": "2026-02-30T09:00" } })),
            "schedule_invalid"
        );
        assert_eq!(
            code(serde_json::json!({ "schedule": { "local_time": "tomorrow" } })),
            "schedule_invalid"
        );
    }

    #[test]
    fn schedules_resolve_in_the_business_time_zone() {
        // 2026-12-06 08:25:33 UTC.
        let now = 1_796_545_533_123;
        assert_eq!(start_ms(&Schedule::Now, now, 120, None), now);
        // 09:00 at +02:00 is 07:00 UTC, already past: now.
        let at = |t: &str, off| start_ms(&Schedule::LocalTime(t.into()), now, off, None);
        assert_eq!(at("2026-12-06T09:00", 120), now);
        // 09:00 at -05:00 is 14:00 UTC.
        assert_eq!(
            at("2026-12-06T09:00", -300),
            parse_local("2026-12-06T14:00").unwrap() as u64
        );
        // Best hour 10 at +02:00: local now is 10:25, inside it: now.
        assert_eq!(start_ms(&Schedule::BestHour, now, 120, Some(10)), now);
        // Best hour 9 at +02:00: tomorrow 09:00 local, 07:00 UTC.
        assert_eq!(
            start_ms(&Schedule::BestHour, now, 120, Some(9)),
            parse_local("2026-12-07T07:00").unwrap() as u64
        );
        assert_eq!(start_ms(&Schedule::BestHour, now, 0, None), now);
    }

    #[test]
    fn each_customer_starts_at_its_own_hour_in_waves() {
        // 2026-12-06 08:25:33 UTC; the business at +02:00 (10:25 local).
        let now = 1_796_545_533_123;
        let utc = |t: &str| parse_local(t).unwrap() as u64;
        let hours = vec![
            (50, Some(9)),  // tomorrow 09:00 local: 07:00 UTC
            (40, None),     // the segment's hour, 14
            (30, Some(10)), // inside its hour: now
            (20, Some(14)),
            (10, Some(9)),
        ];
        let (order, waves) = super::waves(hours, Some(14), now, 120);
        assert_eq!(order, vec![30, 20, 40, 10, 50]);
        assert_eq!(
            waves,
            vec![
                Wave {
                    end: 1,
                    hour: Some(10),
                    at_ms: now
                },
                Wave {
                    end: 3,
                    hour: Some(14),
                    at_ms: utc("2026-12-06T12:00")
                },
                Wave {
                    end: 5,
                    hour: Some(9),
                    at_ms: utc("2026-12-07T07:00")
                },
            ]
        );
        // Without a segment hour, those with none of their own go at once.
        let (order, waves) = super::waves(vec![(7, None), (3, Some(11))], None, now, 120);
        assert_eq!(order, vec![7, 3]);
        assert_eq!(
            waves[0],
            Wave {
                end: 1,
                hour: None,
                at_ms: now
            }
        );
        assert_eq!(waves[1].at_ms, utc("2026-12-06T09:00"));
        // The row admits each wave at its time.
        let mut row = CampaignRow {
            id: 1,
            name: "w".into(),
            variants: Vec::new(),
            seed: 0,
            schedule: Schedule::CustomerBestHour,
            label: String::new(),
            created_ms: now,
            start_ms: now,
            finished_ms: 0,
            state: CampaignState::Running,
            total: 2,
            next: 0,
            outstanding: BTreeMap::new(),
            variants_counts: Vec::new(),
            waves,
        };
        assert_eq!(row.next_due_ms(), now);
        row.next = 1;
        assert_eq!(row.next_due_ms(), utc("2026-12-06T09:00"));
        assert_eq!(row.report()["waves"][1]["customers"], "< 5");
    }

    #[test]
    fn a_campaign_is_done_once_drained_and_answered() {
        let mut row = CampaignRow {
            id: 1,
            name: "x".into(),
            variants: Vec::new(),
            seed: 0,
            schedule: Schedule::Now,
            label: String::new(),
            created_ms: 0,
            start_ms: 0,
            finished_ms: 0,
            state: CampaignState::Running,
            total: 2,
            next: 2,
            outstanding: BTreeMap::from([(9, 0)]),
            variants_counts: Vec::new(),
            waves: Vec::new(),
        };
        row.settle(5);
        assert_eq!(row.state, CampaignState::Running, "one outcome to come");
        row.outstanding.clear();
        row.settle(6);
        assert_eq!((row.state, row.finished_ms), (CampaignState::Done, 6));
        assert_eq!(campaign_of(message_id(42)), Some(42));
        assert_eq!(campaign_of(42), None);
    }
}

//! What becomes of each message a business sends to a customer, and the
//! events that tell the business: the rules' pure parts (no store, no
//! clock), kept apart so that every order of facts can be tested.
//!
//! A message's status only moves up its ranks:
//!
//! ```text
//! accepted ─► failed ─► sent ─► delivered ─► read
//!     └──────────────────┘ (a retry that is stored after a failure)
//! ```
//!
//! Facts arrive in any order (a read receipt may overtake the outcome of
//! the send it reads). A fact at a higher rank implies the ranks below it
//! on the way (`read` implies `sent` and `delivered`, never `failed`), and
//! each rank passed is one event, in rank order; a fact at or below the
//! current rank changes nothing. `converted` is a mark beside the ranks
//! (the business reports a conversion), told once.

use serde::{Deserialize, Serialize};

use super::rows::{put_str, Fields};

/// A business message's rank.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Admitted by the business's rules, on its way to the customer.
    Accepted = 1,
    /// Admitted, then not stored (its code says why); a retry may still
    /// store it.
    Failed = 2,
    /// Durable in the customer's inbox.
    Sent = 3,
    /// On one of the customer's devices.
    Delivered = 4,
    /// Read by the customer.
    Read = 5,
}

/// What an event tells: a status reached, or a conversion.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Change {
    Accepted,
    Failed,
    Sent,
    Delivered,
    Read,
    Clicked,
    Converted,
}

impl Change {
    /// The name events and metrics give it.
    pub fn name(self) -> &'static str {
        match self {
            Change::Accepted => "accepted",
            Change::Failed => "failed",
            Change::Sent => "sent",
            Change::Delivered => "delivered",
            Change::Read => "read",
            Change::Clicked => "clicked",
            Change::Converted => "converted",
        }
    }

    /// Every change in the order of its byte in the binary rows
    /// (`change as u8`).
    const ALL: [Change; 7] = [
        Change::Accepted,
        Change::Failed,
        Change::Sent,
        Change::Delivered,
        Change::Read,
        Change::Clicked,
        Change::Converted,
    ];

    fn from_u8(v: u8) -> Option<Change> {
        Change::ALL.get(usize::from(v)).copied()
    }
}

impl Status {
    fn from_u8(v: u8) -> Option<Status> {
        match v {
            1 => Some(Status::Accepted),
            2 => Some(Status::Failed),
            3 => Some(Status::Sent),
            4 => Some(Status::Delivered),
            5 => Some(Status::Read),
            _ => None,
        }
    }
}

impl From<Status> for Change {
    fn from(s: Status) -> Change {
        match s {
            Status::Accepted => Change::Accepted,
            Status::Failed => Change::Failed,
            Status::Sent => Change::Sent,
            Status::Delivered => Change::Delivered,
            Status::Read => Change::Read,
        }
    }
}

/// Something learned about a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fact {
    Accepted,
    /// Not stored, with the wire error code.
    Failed(u16),
    /// Stored in the customer's inbox under this server id.
    Sent {
        server_msg_id: u64,
    },
    Delivered,
    Read,
    /// A tracked link of the message opened (implies read).
    Clicked,
    Converted,
}

/// The ranks on the way to `target` that a fact implies (`failed` is never
/// implied: a message read was stored).
const CHAIN: [Status; 4] = [
    Status::Accepted,
    Status::Sent,
    Status::Delivered,
    Status::Read,
];

/// The first byte of the binary rows below. Rows written before them are
/// JSON objects, which start with `{`: both are read.
const BINARY_V1: u8 = 1;

/// Whether a stored row is the JSON of an earlier version.
fn is_json(v: &[u8]) -> bool {
    v.first() == Some(&b'{')
}

/// Row `X` business . client message id . customer: one message's status
/// for one customer. Layout: 1 . customer u64 . status u8 (0: none) .
/// code u16 . flags u8 (1 converted, 2 clicked) . server_msg_id u64 .
/// since_ms u64 . campaign u64 . variant u8 . template . language (each a
/// u16 length and its bytes). Earlier versions wrote JSON, still read.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageRow {
    pub customer: u64,
    /// `None` until the first fact.
    pub status: Option<Status>,
    /// The wire code of the last failure (0: none).
    #[serde(default)]
    pub code: u16,
    #[serde(default)]
    pub converted: bool,
    #[serde(default)]
    pub clicked: bool,
    #[serde(default)]
    pub server_msg_id: u64,
    /// The template's name and language (empty for free-form messages).
    #[serde(default)]
    pub template: String,
    #[serde(default)]
    pub language: String,
    /// When the first fact was learned.
    #[serde(default)]
    pub since_ms: u64,
    /// The campaign it was sent by (0: none), and its variant there.
    #[serde(default, skip_serializing_if = "is_zero_u64")]
    pub campaign: u64,
    #[serde(default, skip_serializing_if = "is_zero_u8")]
    pub variant: u8,
}

fn is_zero_u64(v: &u64) -> bool {
    *v == 0
}

fn is_zero_u8(v: &u8) -> bool {
    *v == 0
}

/// What a message is, for its row's first fact: its template and
/// language (empty for free-form messages) and its campaign and variant.
#[derive(Clone, Debug, Default)]
pub struct Origin {
    pub template: String,
    pub language: String,
    pub campaign: u64,
    pub variant: u8,
}

impl MessageRow {
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(49 + self.template.len() + self.language.len());
        v.push(BINARY_V1);
        v.extend_from_slice(&self.customer.to_be_bytes());
        v.push(self.status.map_or(0, |s| s as u8));
        v.extend_from_slice(&self.code.to_be_bytes());
        v.push(self.converted as u8 | (self.clicked as u8) << 1);
        v.extend_from_slice(&self.server_msg_id.to_be_bytes());
        v.extend_from_slice(&self.since_ms.to_be_bytes());
        v.extend_from_slice(&self.campaign.to_be_bytes());
        v.push(self.variant);
        put_str(&mut v, &self.template);
        put_str(&mut v, &self.language);
        v
    }

    pub fn decode(v: &[u8]) -> Option<MessageRow> {
        if is_json(v) {
            return serde_json::from_slice(v).ok();
        }
        let mut f = Fields::new(v);
        (f.u8()? == BINARY_V1).then_some(())?;
        let customer = f.u64()?;
        let status = match f.u8()? {
            0 => None,
            s => Some(Status::from_u8(s)?),
        };
        let code = f.u16()?;
        let flags = f.u8()?;
        let row = MessageRow {
            customer,
            status,
            code,
            converted: flags & 1 != 0,
            clicked: flags & 2 != 0,
            server_msg_id: f.u64()?,
            since_ms: f.u64()?,
            campaign: f.u64()?,
            variant: f.u8()?,
            template: f.str()?,
            language: f.str()?,
        };
        f.end()?;
        Some(row)
    }

    /// Applies `fact`: the changes it makes, in order (one event each).
    pub fn apply(&mut self, fact: Fact, now_ms: u64) -> Vec<Change> {
        if self.since_ms == 0 {
            self.since_ms = now_ms;
        }
        let target = match fact {
            Fact::Converted => {
                if self.converted {
                    return Vec::new();
                }
                self.converted = true;
                return vec![Change::Converted];
            }
            Fact::Failed(code) => {
                if self.status >= Some(Status::Failed) {
                    return Vec::new();
                }
                let mut out = Vec::new();
                if self.status.is_none() {
                    out.push(Change::Accepted);
                }
                self.status = Some(Status::Failed);
                self.code = code;
                out.push(Change::Failed);
                return out;
            }
            Fact::Accepted => Status::Accepted,
            Fact::Sent { server_msg_id } => {
                self.server_msg_id = server_msg_id;
                Status::Sent
            }
            Fact::Delivered => Status::Delivered,
            Fact::Read | Fact::Clicked => Status::Read,
        };
        let mut out: Vec<Change> = CHAIN
            .iter()
            .filter(|&&s| s <= target && Some(s) > self.status)
            .map(|&s| s.into())
            .collect();
        if Some(target) > self.status {
            self.status = Some(target);
        }
        if fact == Fact::Clicked && !self.clicked {
            self.clicked = true;
            out.push(Change::Clicked);
        }
        out
    }
}

/// One event a business is told, with its own sequence (per business,
/// from 1, gap-free). Stored as row `V` business . seq ([`EventRow`]);
/// its JSON is what the admin API, the protocol and the webhooks carry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub seq: u64,
    /// Stable across redeliveries: `<business>-<seq>`.
    pub id: String,
    /// The business's client message id of the message.
    pub message: u64,
    pub customer: u64,
    pub change: Change,
    /// The failure's wire code (for `failed`).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub code: u16,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub template: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub language: String,
    pub at_ms: u64,
}

fn is_zero(v: &u16) -> bool {
    *v == 0
}

/// An event as row `V` business . seq stores it (the sequence is the key's,
/// the id follows from both). Layout: 1 . message u64 . customer u64 .
/// change u8 (0 accepted, 1 failed, 2 sent, 3 delivered, 4 read, 5 clicked,
/// 6 converted) . code u16 . at_ms u64 . template . language (each a u16
/// length and its bytes). Earlier versions wrote the event's JSON, still
/// read.
pub struct EventRow<'a> {
    pub message: u64,
    pub customer: u64,
    pub change: Change,
    pub code: u16,
    pub template: &'a str,
    pub language: &'a str,
    pub at_ms: u64,
}

impl EventRow<'_> {
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(32 + self.template.len() + self.language.len());
        v.push(BINARY_V1);
        v.extend_from_slice(&self.message.to_be_bytes());
        v.extend_from_slice(&self.customer.to_be_bytes());
        v.push(self.change as u8);
        v.extend_from_slice(&self.code.to_be_bytes());
        v.extend_from_slice(&self.at_ms.to_be_bytes());
        put_str(&mut v, self.template);
        put_str(&mut v, self.language);
        v
    }
}

impl Event {
    /// Business `b`'s event `seq` from its stored row.
    pub fn decode(b: u64, seq: u64, v: &[u8]) -> Option<Event> {
        if is_json(v) {
            return serde_json::from_slice(v).ok();
        }
        let mut f = Fields::new(v);
        (f.u8()? == BINARY_V1).then_some(())?;
        let event = Event {
            seq,
            id: format!("{b}-{seq}"),
            message: f.u64()?,
            customer: f.u64()?,
            change: Change::from_u8(f.u8()?)?,
            code: f.u16()?,
            at_ms: f.u64()?,
            template: f.str()?,
            language: f.str()?,
        };
        f.end()?;
        Some(event)
    }
}

/// Row `W` business: the business's event sequence, how far its webhook
/// has delivered and how far old events are deleted (24 bytes: last seq,
/// delivered up to, pruned up to).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventHead {
    /// The last sequence given (0: none yet).
    pub last: u64,
    /// Events up to here were accepted by the webhook (or there is none).
    pub delivered: u64,
    /// Events up to here are deleted (older than `business.events_kept_ms`).
    pub pruned: u64,
}

impl EventHead {
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(24);
        v.extend_from_slice(&self.last.to_be_bytes());
        v.extend_from_slice(&self.delivered.to_be_bytes());
        v.extend_from_slice(&self.pruned.to_be_bytes());
        v
    }

    pub fn decode(v: &[u8]) -> Option<EventHead> {
        let at = |i: usize| {
            v.get(i..i + 8)
                .map(|b| u64::from_be_bytes(b.try_into().expect("8")))
        };
        (v.len() == 24).then_some(())?;
        Some(EventHead {
            last: at(0)?,
            delivered: at(8)?,
            pruned: at(16)?,
        })
    }
}

/// The periods statistics are counted in (UTC), by the time the message
/// was accepted: each message counts in the period it was sent in, so a
/// period's rates compare its messages with what became of them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Period {
    HalfHour = 1,
    Day = 2,
    Month = 3,
}

const HALF_HOUR_MS: u64 = 30 * 60 * 1000;
const DAY_MS: u64 = 24 * 3600 * 1000;

impl Period {
    pub fn parse(s: &str) -> Option<Period> {
        match s {
            "half_hour" => Some(Period::HalfHour),
            "day" => Some(Period::Day),
            "month" => Some(Period::Month),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Period::HalfHour => "half_hour",
            Period::Day => "day",
            Period::Month => "month",
        }
    }

    /// The start (ms since the epoch, UTC) of the period holding `ms`.
    pub fn start(self, ms: u64) -> u64 {
        match self {
            Period::HalfHour => ms - ms % HALF_HOUR_MS,
            Period::Day => ms - ms % DAY_MS,
            Period::Month => {
                let (y, m, _) = civil_from_days((ms / DAY_MS) as i64);
                days_from_civil(y, m, 1) as u64 * DAY_MS
            }
        }
    }
}

/// The (year, month, day) of a day count since 1970-01-01 (Howard
/// Hinnant's civil calendar algorithms).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

pub(crate) fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Figures that describe fewer customers than this are shown as "< 5".
pub const FEWEST_SHOWN: usize = 5;

/// One figure: how many, and up to [`FEWEST_SHOWN`] of the distinct
/// customers it counts (enough to know whether it may be shown).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Figure {
    pub n: u64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub few: Vec<u64>,
}

impl Figure {
    pub fn add(&mut self, customer: u64) {
        self.n += 1;
        self.keep(customer);
    }

    /// Keeps `customer` among the few, while fewer than [`FEWEST_SHOWN`].
    fn keep(&mut self, customer: u64) {
        if self.few.len() < FEWEST_SHOWN && !self.few.contains(&customer) {
            self.few.push(customer);
        }
    }

    fn merge(&mut self, other: &Figure) {
        self.n += other.n;
        for &c in &other.few {
            self.keep(c);
        }
    }

    fn encode_into(&self, v: &mut Vec<u8>) {
        v.extend_from_slice(&self.n.to_be_bytes());
        let few = &self.few[..self.few.len().min(FEWEST_SHOWN)];
        v.push(few.len() as u8);
        for c in few {
            v.extend_from_slice(&c.to_be_bytes());
        }
    }

    fn decode(f: &mut Fields<'_>) -> Option<Figure> {
        let n = f.u64()?;
        let k = f.u8()?;
        if usize::from(k) > FEWEST_SHOWN {
            return None;
        }
        let few = (0..k).map(|_| f.u64()).collect::<Option<Vec<u64>>>()?;
        Some(Figure { n, few })
    }

    /// Whether the figure describes enough customers to be shown.
    pub fn shown(&self) -> bool {
        self.few.len() >= FEWEST_SHOWN
    }

    /// The figure as reports show it: the number, or "< 5".
    pub fn show(&self) -> serde_json::Value {
        if self.shown() {
            self.n.into()
        } else {
            format!("< {FEWEST_SHOWN}").into()
        }
    }
}

/// What one period counts for one dimension (row `Y`). Layout: 1 . the
/// figures accepted, sent, delivered, read, clicked, converted . count u16
/// . count x (code u16 . figure), where a figure is n u64 . k u8 . k x
/// customer u64. Earlier versions wrote JSON, still read; campaign rows
/// keep their counts as JSON.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Counts {
    pub accepted: Figure,
    pub sent: Figure,
    pub delivered: Figure,
    pub read: Figure,
    pub clicked: Figure,
    pub converted: Figure,
    /// By wire error code.
    pub failed: std::collections::BTreeMap<u16, Figure>,
}

impl Counts {
    pub fn count(&mut self, change: Change, code: u16, customer: u64) {
        match change {
            Change::Accepted => self.accepted.add(customer),
            Change::Failed => self.failed.entry(code).or_default().add(customer),
            Change::Sent => self.sent.add(customer),
            Change::Delivered => self.delivered.add(customer),
            Change::Read => self.read.add(customer),
            Change::Clicked => self.clicked.add(customer),
            Change::Converted => self.converted.add(customer),
        }
    }

    fn figures(&self) -> [&Figure; 6] {
        [
            &self.accepted,
            &self.sent,
            &self.delivered,
            &self.read,
            &self.clicked,
            &self.converted,
        ]
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(128);
        v.push(BINARY_V1);
        for fig in self.figures() {
            fig.encode_into(&mut v);
        }
        v.extend_from_slice(&(self.failed.len().min(usize::from(u16::MAX)) as u16).to_be_bytes());
        for (code, fig) in self.failed.iter().take(usize::from(u16::MAX)) {
            v.extend_from_slice(&code.to_be_bytes());
            fig.encode_into(&mut v);
        }
        v
    }

    pub fn decode(v: &[u8]) -> Option<Counts> {
        if is_json(v) {
            return serde_json::from_slice(v).ok();
        }
        let mut f = Fields::new(v);
        (f.u8()? == BINARY_V1).then_some(())?;
        let mut c = Counts {
            accepted: Figure::decode(&mut f)?,
            sent: Figure::decode(&mut f)?,
            delivered: Figure::decode(&mut f)?,
            read: Figure::decode(&mut f)?,
            clicked: Figure::decode(&mut f)?,
            converted: Figure::decode(&mut f)?,
            failed: Default::default(),
        };
        for _ in 0..f.u16()? {
            let code = f.u16()?;
            c.failed.insert(code, Figure::decode(&mut f)?);
        }
        f.end()?;
        Some(c)
    }

    /// Adds `other`'s counts (a longer period's row from its parts): the
    /// sums, and the customers kept up to [`FEWEST_SHOWN`]. A part that
    /// kept fewer than that kept all of its customers, so the sum shows
    /// exactly when the period's distinct customers are enough.
    pub fn merge(&mut self, other: &Counts) {
        self.accepted.merge(&other.accepted);
        self.sent.merge(&other.sent);
        self.delivered.merge(&other.delivered);
        self.read.merge(&other.read);
        self.clicked.merge(&other.clicked);
        self.converted.merge(&other.converted);
        for (code, f) in &other.failed {
            self.failed.entry(*code).or_default().merge(f);
        }
    }

    /// The counts as reports show them, with the rates (docs/BUSINESS.md
    /// gives the formulas): a rate is shown only when both its figures are.
    pub fn report(&self) -> serde_json::Value {
        let rate = |num: &Figure, den: &Figure| -> serde_json::Value {
            if num.shown() && den.shown() && den.n > 0 {
                ((num.n as f64 / den.n as f64 * 10_000.0).round() / 10_000.0).into()
            } else {
                serde_json::Value::Null
            }
        };
        let failed: serde_json::Map<String, serde_json::Value> = self
            .failed
            .iter()
            .map(|(code, f)| (code.to_string(), f.show()))
            .collect();
        serde_json::json!({
            "accepted": self.accepted.show(),
            "sent": self.sent.show(),
            "delivered": self.delivered.show(),
            "read": self.read.show(),
            "clicked": self.clicked.show(),
            "converted": self.converted.show(),
            "failed": failed,
            "delivery_rate": rate(&self.delivered, &self.sent),
            "read_rate": rate(&self.read, &self.delivered),
            "click_through_rate": rate(&self.clicked, &self.delivered),
            "conversion_rate": rate(&self.converted, &self.sent),
        })
    }
}

/// Upper bounds (seconds) of the response-time histogram's buckets; a
/// last bucket holds everything longer.
pub const WAIT_BOUNDS_S: [u64; 16] = [
    1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 14400, 86400,
];

/// Response times, bucketed by [`WAIT_BOUNDS_S`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Waits {
    pub replies: Figure,
    /// One count per bound, and one past the last.
    pub buckets: Vec<u64>,
}

impl Waits {
    pub fn add(&mut self, customer: u64, wait_ms: u64) {
        self.replies.add(customer);
        if self.buckets.len() != WAIT_BOUNDS_S.len() + 1 {
            self.buckets = vec![0; WAIT_BOUNDS_S.len() + 1];
        }
        let s = wait_ms.div_ceil(1000);
        let i = WAIT_BOUNDS_S
            .iter()
            .position(|&b| s <= b)
            .unwrap_or(WAIT_BOUNDS_S.len());
        self.buckets[i] += 1;
    }

    /// The `q` quantile (0 < q <= 1) as its bucket's upper bound in
    /// seconds: the smallest bound with at least ceil(q * n) replies at or
    /// under it (`None` with no replies; past the last bound: `u64::MAX`).
    pub fn quantile(&self, q: f64) -> Option<u64> {
        let n: u64 = self.buckets.iter().sum();
        if n == 0 {
            return None;
        }
        let want = ((q * n as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, c) in self.buckets.iter().enumerate() {
            seen += c;
            if seen >= want {
                return Some(WAIT_BOUNDS_S.get(i).copied().unwrap_or(u64::MAX));
            }
        }
        None
    }

    /// As reports show it: the count, median and p90 (hidden under 5
    /// customers).
    pub fn report(&self) -> serde_json::Value {
        if !self.replies.shown() {
            return serde_json::json!({ "replies": self.replies.show(), "median_s": null, "p90_s": null });
        }
        serde_json::json!({
            "replies": self.replies.n,
            "median_s": self.quantile(0.5),
            "p90_s": self.quantile(0.9),
        })
    }
}

/// A business's engagement (row `A`, JSON): when its customers write, how
/// long they wait for an answer, and when its messages are read, all by
/// the hour in the business's time zone.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Engagement {
    /// Customers' messages by weekday (0 Monday) x hour: 168 cells.
    pub writes: Vec<Figure>,
    /// Response times, all and by the hour the customer wrote.
    pub waits: Waits,
    pub waits_by_hour: Vec<Waits>,
    /// Messages sent and read by the hour they were sent.
    pub sent_by_hour: Vec<Figure>,
    pub read_by_hour: Vec<Figure>,
    /// Customers' messages and waits by the labels of their conversation.
    pub labels: std::collections::BTreeMap<String, LabelFigures>,
}

/// What one conversation label counts.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct LabelFigures {
    pub messages: Figure,
    pub waits: Waits,
}

/// A conversation label: 1 to 40 of `a-z`, `0-9`, `_`, `-`; at most
/// [`LABELS_MAX`] per conversation.
pub fn check_labels(labels: &[String]) -> Result<(), String> {
    if labels.len() > LABELS_MAX {
        return Err(format!("at most {LABELS_MAX} labels per conversation"));
    }
    for l in labels {
        let ok = (1..=40).contains(&l.len())
            && l.bytes()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_' || c == b'-');
        if !ok {
            return Err(format!("{l:?}: a label is 1 to 40 of a-z, 0-9, _ and -"));
        }
    }
    Ok(())
}

pub const LABELS_MAX: usize = 10;

/// The weekday (0 Monday) and hour of `ms` at `offset_min` from UTC.
pub fn local_slot(ms: u64, offset_min: i32) -> (usize, usize) {
    let local = ms as i64 + i64::from(offset_min) * 60_000;
    let day = local.div_euclid(DAY_MS as i64);
    let hour = local.rem_euclid(DAY_MS as i64) / 3_600_000;
    // 1970-01-01 was a Thursday (3 from Monday).
    ((day + 3).rem_euclid(7) as usize, hour as usize)
}

impl Engagement {
    fn sized(&mut self) {
        if self.writes.len() != 168 {
            self.writes = vec![Figure::default(); 168];
        }
        for v in [&mut self.sent_by_hour, &mut self.read_by_hour] {
            if v.len() != 24 {
                *v = vec![Figure::default(); 24];
            }
        }
        if self.waits_by_hour.len() != 24 {
            self.waits_by_hour = vec![Waits::default(); 24];
        }
    }

    pub fn customer_wrote(
        &mut self,
        customer: u64,
        at_ms: u64,
        offset_min: i32,
        labels: &[String],
    ) {
        self.sized();
        let (day, hour) = local_slot(at_ms, offset_min);
        self.writes[day * 24 + hour].add(customer);
        for l in labels {
            self.labels
                .entry(l.clone())
                .or_default()
                .messages
                .add(customer);
        }
    }

    /// The business's first answer to a customer who wrote at `since_ms`.
    pub fn answered(
        &mut self,
        customer: u64,
        since_ms: u64,
        now_ms: u64,
        offset_min: i32,
        labels: &[String],
    ) {
        self.sized();
        let wait = now_ms.saturating_sub(since_ms);
        self.waits.add(customer, wait);
        for l in labels {
            self.labels
                .entry(l.clone())
                .or_default()
                .waits
                .add(customer, wait);
        }
        let (_, hour) = local_slot(since_ms, offset_min);
        self.waits_by_hour[hour].add(customer, wait);
    }

    /// A message sent at `sent_ms` was sent (`read` false) or read.
    pub fn sent_or_read(&mut self, customer: u64, sent_ms: u64, read: bool, offset_min: i32) {
        self.sized();
        let (_, hour) = local_slot(sent_ms, offset_min);
        let v = if read {
            &mut self.read_by_hour
        } else {
            &mut self.sent_by_hour
        };
        v[hour].add(customer);
    }

    /// As reports show it (docs/BUSINESS.md): hidden figures as "< 5";
    /// the best hour is the one with the highest read rate among hours
    /// whose figures show (the earliest on a tie), or null.
    pub fn report(&self, offset_min: i32) -> serde_json::Value {
        let mut e = self.clone();
        e.sized();
        let heatmap: Vec<Vec<serde_json::Value>> = (0..7)
            .map(|d| (0..24).map(|h| e.writes[d * 24 + h].show()).collect())
            .collect();
        let mut best: Option<(usize, f64)> = None;
        let hours: Vec<serde_json::Value> = (0..24)
            .map(|h| {
                let (sent, read) = (&e.sent_by_hour[h], &e.read_by_hour[h]);
                let rate = (sent.shown() && read.shown() && sent.n > 0)
                    .then(|| (read.n as f64 / sent.n as f64 * 10_000.0).round() / 10_000.0);
                if let Some(r) = rate {
                    if best.is_none_or(|(_, b)| r > b) {
                        best = Some((h, r));
                    }
                }
                serde_json::json!({
                    "hour": h,
                    "sent": sent.show(),
                    "read": read.show(),
                    "read_rate": rate,
                    "wait": e.waits_by_hour[h].report(),
                })
            })
            .collect();
        let labels: serde_json::Map<String, serde_json::Value> = e
            .labels
            .iter()
            .map(|(l, f)| {
                (
                    l.clone(),
                    serde_json::json!({ "messages": f.messages.show(), "response": f.waits.report() }),
                )
            })
            .collect();
        serde_json::json!({
            "utc_offset_minutes": offset_min,
            "labels": labels,
            "heatmap": heatmap,
            "response": e.waits.report(),
            "hours": hours,
            "best_hour": best.map(|(h, _)| h),
        })
    }
}

/// A tracked link's token: which message, customer and button it is, and
/// where it goes, signed with the node's token secret (every node of a
/// cluster shares it, so any node can redirect it). Base64url of
/// `business u64 . message u64 . customer u64 . button u8 . url . tag[16]`.
pub mod click {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine;
    use courier_protocol::token::TokenKey;

    const DOMAIN: &str = "courier click";
    const FIXED: usize = 8 * 3 + 1;
    const TAG: usize = 16;

    /// What a click token says.
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub struct Click {
        pub business: u64,
        pub message: u64,
        pub customer: u64,
        pub button: u8,
        pub url: String,
    }

    pub fn mint(key: &TokenKey, c: &Click) -> String {
        let mut raw = Vec::with_capacity(FIXED + c.url.len() + TAG);
        raw.extend_from_slice(&c.business.to_be_bytes());
        raw.extend_from_slice(&c.message.to_be_bytes());
        raw.extend_from_slice(&c.customer.to_be_bytes());
        raw.push(c.button);
        raw.extend_from_slice(c.url.as_bytes());
        let tag = key.tag(DOMAIN, &raw);
        raw.extend_from_slice(&tag[..TAG]);
        URL_SAFE_NO_PAD.encode(raw)
    }

    /// The click, if `token` is one this secret signed.
    pub fn verify(key: &TokenKey, token: &str) -> Option<Click> {
        let raw = URL_SAFE_NO_PAD.decode(token).ok()?;
        if raw.len() < FIXED + TAG {
            return None;
        }
        let (signed, tag) = raw.split_at(raw.len() - TAG);
        let expected = key.tag(DOMAIN, signed);
        // Constant time: the tag must not leak by timing.
        let diff = expected[..TAG]
            .iter()
            .zip(tag)
            .fold(0u8, |d, (a, b)| d | (a ^ b));
        if diff != 0 {
            return None;
        }
        let at = |i: usize| u64::from_be_bytes(signed[i..i + 8].try_into().expect("8"));
        Some(Click {
            business: at(0),
            message: at(8),
            customer: at(16),
            button: signed[24],
            url: String::from_utf8(signed[FIXED..].to_vec()).ok()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_slots_and_wait_quantiles() {
        // 2026-12-06 (a Sunday) 08:25 UTC; at +02:00 10:25, at -09:00
        // Saturday 23:25.
        let t = 1_796_545_533_123;
        assert_eq!(local_slot(t, 0), (6, 8));
        assert_eq!(local_slot(t, 120), (6, 10));
        assert_eq!(local_slot(t, -540), (5, 23));
        let mut w = Waits::default();
        for (c, s) in [(1, 3), (2, 4), (3, 40), (4, 700), (5, 90_000)] {
            w.add(c, s * 1000);
        }
        // Bounds: 3 s and 4 s -> 5; 40 s -> 60; 700 s -> 900; 25 h -> past.
        assert_eq!(w.quantile(0.5), Some(60));
        assert_eq!(w.quantile(0.9), Some(u64::MAX));
        assert_eq!(w.quantile(0.4), Some(5));
        assert_eq!(Waits::default().quantile(0.5), None);
    }

    /// Every binary row: read back as written, and from the JSON earlier
    /// versions wrote; a short, long or unknown row reads as corrupt.
    #[test]
    fn binary_rows_round_trip_read_their_json_past_and_refuse_damage() {
        let row = MessageRow {
            customer: 42,
            status: Some(Status::Delivered),
            code: 0,
            converted: true,
            clicked: false,
            server_msg_id: 99,
            template: "order_ready".into(),
            language: "pt_BR".into(),
            since_ms: 1_796_545_533_123,
            campaign: 7,
            variant: 2,
        };
        let failed = MessageRow {
            status: Some(Status::Failed),
            code: 53,
            template: String::new(),
            ..row.clone()
        };
        let fresh = MessageRow::default();
        for r in [&row, &failed, &fresh] {
            let v = r.encode();
            assert_eq!(MessageRow::decode(&v).as_ref(), Some(r));
            assert_eq!(
                MessageRow::decode(&serde_json::to_vec(r).unwrap()).as_ref(),
                Some(r)
            );
            assert_eq!(MessageRow::decode(&v[..v.len() - 1]), None, "short");
            let mut long = v.clone();
            long.push(0);
            assert_eq!(MessageRow::decode(&long), None, "long");
        }
        let mut bad = row.encode();
        bad[9] = 6; // no such status
        assert_eq!(MessageRow::decode(&bad), None);
        bad[0] = 2; // no such version
        assert_eq!(MessageRow::decode(&bad), None);

        let written = EventRow {
            message: 17,
            customer: 42,
            change: Change::Failed,
            code: 53,
            template: "order_ready",
            language: "pt_BR",
            at_ms: 1_796_545_533_123,
        };
        let event = Event {
            seq: 9,
            id: "5001-9".into(),
            message: 17,
            customer: 42,
            change: Change::Failed,
            code: 53,
            template: "order_ready".into(),
            language: "pt_BR".into(),
            at_ms: 1_796_545_533_123,
        };
        let v = written.encode();
        assert_eq!(Event::decode(5001, 9, &v), Some(event.clone()));
        let json = serde_json::to_vec(&event).unwrap();
        assert_eq!(Event::decode(5001, 9, &json), Some(event));
        assert_eq!(Event::decode(5001, 9, &v[..v.len() - 1]), None);
        for change in Change::ALL {
            let v = EventRow { change, ..written }.encode();
            assert_eq!(Event::decode(1, 1, &v).map(|e| e.change), Some(change));
        }
        let mut bad = v.clone();
        bad[17] = 7; // no such change
        assert_eq!(Event::decode(5001, 9, &bad), None);

        let mut counts = Counts::default();
        for c in 1..=7 {
            counts.count(Change::Sent, 0, c);
        }
        counts.count(Change::Read, 0, 3);
        counts.count(Change::Failed, 53, 4);
        counts.count(Change::Failed, 45, 4);
        let v = counts.encode();
        assert_eq!(Counts::decode(&v), Some(counts.clone()));
        assert_eq!(
            Counts::decode(&serde_json::to_vec(&counts).unwrap()),
            Some(counts.clone())
        );
        assert_eq!(
            Counts::decode(&Counts::default().encode()),
            Some(Counts::default())
        );
        assert_eq!(Counts::decode(&v[..v.len() - 1]), None);
        let mut bad = v.clone();
        bad[9] = 6; // the first figure claims six customers kept
        assert_eq!(Counts::decode(&bad), None);
    }

    /// A day's row made from its half hours shows what the day's own
    /// count would: the same sums, and "< 5" exactly when fewer than 5
    /// distinct customers are counted, however they spread over the parts.
    #[test]
    fn a_longer_periods_counts_are_its_parts_merged() {
        // (half hour, customer) of each read: 4 customers over the day,
        // then a fifth; one half hour with 6 of its own.
        let spreads: [&[(usize, u64)]; 3] = [
            &[(0, 1), (0, 2), (1, 2), (1, 3), (2, 4), (3, 1)],
            &[(0, 1), (0, 2), (1, 2), (1, 3), (2, 4), (3, 5)],
            &[(0, 1), (0, 2), (0, 3), (0, 4), (0, 5), (0, 6), (1, 7)],
        ];
        for (i, reads) in spreads.iter().enumerate() {
            let mut day = Counts::default();
            let mut parts = vec![Counts::default(); 4];
            for &(part, c) in *reads {
                day.count(Change::Read, 0, c);
                parts[part].count(Change::Read, 0, c);
                parts[part].count(Change::Failed, 53, c);
            }
            let mut merged = Counts::default();
            for p in &parts {
                merged.merge(p);
            }
            assert_eq!(merged.read.n, day.read.n, "spread {i}");
            assert_eq!(merged.read.shown(), day.read.shown(), "spread {i}");
            assert_eq!(merged.failed[&53].n, reads.len() as u64);
            assert_eq!(merged.report()["read"], day.report()["read"], "spread {i}");
        }
    }

    #[test]
    fn click_tokens_round_trip_and_a_changed_byte_fails() {
        let key = courier_protocol::token::TokenKey::new(vec![7; 32]);
        let c = click::Click {
            business: 5001,
            message: 17,
            customer: 42,
            button: 0,
            url: "https://shop.test/t/#7".into(),
        };
        let token = click::mint(&key, &c);
        assert_eq!(click::verify(&key, &token), Some(c));
        let mut raw =
            base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, &token)
                .unwrap();
        raw[3] ^= 1;
        let forged = base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, raw);
        assert_eq!(click::verify(&key, &forged), None);
        let other = courier_protocol::token::TokenKey::new(vec![8; 32]);
        assert_eq!(click::verify(&other, &token), None);
        assert_eq!(click::verify(&key, "not base64!"), None);
    }

    #[test]
    fn periods_start_at_utc_half_hours_days_and_months() {
        // 2026-12-06T08:25:33.123Z
        let t = 1_796_545_533_123;
        assert_eq!(Period::HalfHour.start(t), 1_796_544_000_000);
        assert_eq!(Period::Day.start(t), 1_796_515_200_000);
        // 2026-12-01T00:00:00Z
        assert_eq!(Period::Month.start(t), 1_796_083_200_000);
        // The first of March in a leap year, and the epoch.
        assert_eq!(Period::Month.start(951_868_800_000 + 5), 951_868_800_000);
        assert_eq!(Period::Month.start(0), 0);
        for day in [0i64, 59, 365, 10_957, 20_000, 40_000] {
            let (y, m, d) = civil_from_days(day);
            assert_eq!(days_from_civil(y, m, d), day);
        }
    }

    #[test]
    fn a_figure_of_fewer_than_five_customers_is_not_shown() {
        let mut f = Figure::default();
        for c in [1, 1, 2, 3, 4, 4, 4] {
            f.add(c);
        }
        assert_eq!(
            (f.n, f.show()),
            (7, serde_json::json!("< 5")),
            "7 messages, 4 customers"
        );
        f.add(5);
        assert_eq!(f.show(), serde_json::json!(8));
        f.add(6);
        assert_eq!(f.few.len(), 5, "no more ids than needed");
        let mut c = Counts::default();
        for customer in 1..=10 {
            c.count(Change::Sent, 0, customer);
            c.count(Change::Delivered, 0, customer);
        }
        for customer in 1..=4 {
            c.count(Change::Read, 0, customer);
        }
        let r = c.report();
        assert_eq!(r["sent"], 10);
        assert_eq!(r["delivery_rate"], 1.0);
        assert_eq!(r["read"], "< 5");
        assert_eq!(r["read_rate"], serde_json::Value::Null);
    }

    fn run(facts: &[Fact]) -> (MessageRow, Vec<Change>) {
        let mut row = MessageRow::default();
        let mut out = Vec::new();
        for f in facts {
            out.extend(row.apply(*f, 1));
        }
        (row, out)
    }

    fn rank(c: Change) -> u8 {
        match c {
            Change::Accepted => 1,
            Change::Failed => 2,
            Change::Sent => 3,
            Change::Delivered => 4,
            Change::Read => 5,
            Change::Clicked => 6,
            Change::Converted => 7,
        }
    }

    #[test]
    fn facts_in_order_tell_each_status_once() {
        let (row, out) = run(&[
            Fact::Accepted,
            Fact::Sent { server_msg_id: 9 },
            Fact::Delivered,
            Fact::Delivered,
            Fact::Read,
            Fact::Converted,
            Fact::Converted,
        ]);
        use Change::*;
        assert_eq!(out, [Accepted, Sent, Delivered, Read, Converted]);
        assert_eq!(row.status, Some(Status::Read));
        assert_eq!(row.server_msg_id, 9);
    }

    #[test]
    fn a_failure_then_a_stored_retry_moves_on_and_nothing_fails_after_sent() {
        use Change::*;
        let (row, out) = run(&[
            Fact::Accepted,
            Fact::Failed(66),
            Fact::Sent { server_msg_id: 1 },
            Fact::Failed(66),
        ]);
        assert_eq!(out, [Accepted, Failed, Sent]);
        assert_eq!((row.status, row.code), (Some(Status::Sent), 66));
    }

    /// Every order of the facts of a message's life: the status ends the
    /// same, never goes down, and the events told are the ranks passed,
    /// each once, in rank order.
    #[test]
    fn every_order_of_facts_ends_the_same_and_never_goes_back() {
        let facts = [
            Fact::Accepted,
            Fact::Sent { server_msg_id: 3 },
            Fact::Delivered,
            Fact::Read,
            Fact::Clicked,
            Fact::Converted,
        ];
        let mut orders = vec![vec![]];
        for _ in 0..facts.len() {
            let mut next = Vec::new();
            for o in &orders {
                for i in 0..facts.len() {
                    if !o.contains(&i) {
                        let mut o = o.clone();
                        o.push(i);
                        next.push(o);
                    }
                }
            }
            orders = next;
        }
        assert_eq!(orders.len(), 720);
        for order in orders {
            let mut row = MessageRow::default();
            let mut told = Vec::new();
            for &i in &order {
                let before = row.status;
                told.extend(row.apply(facts[i], 1));
                assert!(row.status >= before, "{order:?}");
            }
            assert_eq!(row.status, Some(Status::Read), "{order:?}");
            assert!(row.converted);
            let statuses: Vec<Change> = told
                .iter()
                .copied()
                .filter(|c| !matches!(c, Change::Converted | Change::Clicked))
                .collect();
            use Change::*;
            assert_eq!(statuses, [Accepted, Sent, Delivered, Read], "{order:?}");
            assert!(statuses.windows(2).all(|w| rank(w[0]) < rank(w[1])));
            assert_eq!(told.iter().filter(|c| **c == Converted).count(), 1);
            assert_eq!(told.iter().filter(|c| **c == Clicked).count(), 1);
            assert!(row.clicked);
        }
    }

    #[test]
    fn heads_round_trip_and_bad_bytes_are_refused() {
        let h = EventHead {
            last: 7,
            delivered: 3,
            pruned: 1,
        };
        assert_eq!(EventHead::decode(&h.encode()), Some(h));
        assert_eq!(EventHead::decode(&[1, 2, 3]), None);
    }
}

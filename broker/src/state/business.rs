//! Business accounts as stored: the account and its profile, its
//! templates, and per customer the pair's state and the consent ledger.
//! Everything here is pure: checks, rendering, row encodings. The
//! business's shard applies it (`shard/business.rs`).
//!
//! Every row belongs to the business's shard (its key starts with the
//! business id, see [`super::keys`]): the account, the templates, the
//! pair rows and the ledger move with the business.

use std::collections::BTreeMap;

use courier_protocol::business::{
    Button, ButtonKind, Category, Header, TemplateMessage, TemplateSend,
};
use serde::{Deserialize, Serialize};

/// Customers a business may start conversations with per rolling window,
/// by tier (`None`: unlimited).
pub const TIERS: [Option<u32>; 5] = [Some(250), Some(2_000), Some(10_000), Some(100_000), None];
/// The tier a verified business starts at (2,000 customers).
pub const VERIFIED_TIER: u8 = 1;

/// A refusal of the admin API: HTTP status, a stable code, and words.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    pub status: u16,
    pub code: &'static str,
    pub message: String,
}

pub fn invalid(code: &'static str, message: impl Into<String>) -> Invalid {
    Invalid {
        status: 400,
        code,
        message: message.into(),
    }
}

/// What a business may edit about itself.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct Profile {
    pub about: String,
    pub address: String,
    pub description: String,
    pub email: String,
    pub websites: Vec<String>,
    /// A reference to the profile picture in the platform's media store.
    pub picture: String,
}

impl Profile {
    pub fn check(&self) -> Result<(), Invalid> {
        let limits = [
            ("about", &self.about, 139, "about_too_long"),
            ("address", &self.address, 256, "address_too_long"),
            (
                "description",
                &self.description,
                512,
                "description_too_long",
            ),
            ("email", &self.email, 128, "email_too_long"),
            ("picture", &self.picture, 1024, "picture_too_long"),
        ];
        for (field, value, max, code) in limits {
            let n = value.chars().count();
            if n > max {
                return Err(invalid(
                    code,
                    format!("{field}: {n} characters; at most {max}"),
                ));
            }
        }
        if !self.email.is_empty() && !self.email.contains('@') {
            return Err(invalid("email_invalid", "email: no @"));
        }
        if self.websites.len() > 2 {
            return Err(invalid(
                "too_many_websites",
                format!("{} websites; at most 2", self.websites.len()),
            ));
        }
        for w in &self.websites {
            if !(w.starts_with("https://") || w.starts_with("http://")) || w.len() > 256 {
                return Err(invalid(
                    "website_invalid",
                    format!("{w:?}: an http(s) URL of at most 256 characters"),
                ));
            }
        }
        Ok(())
    }
}

/// A business account (`B` row).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct BusinessRow {
    pub display_name: String,
    /// A new display name asked for, waiting for review: it replaces the
    /// current one when an admin verifies the business.
    pub pending_display_name: Option<String>,
    pub profile: Profile,
    pub verified: bool,
    pub verified_at_ms: u64,
    pub verification_reason: String,
    /// Index into [`TIERS`].
    pub tier: u8,
    /// Messages per second the business may send (`business.messages_per_sec`
    /// unless set for it).
    pub messages_per_sec: u32,
    pub registered_at_ms: u64,
    /// When the tier last changed (upgrades are checked every 6 hours).
    pub tier_at_ms: u64,
    /// Where the business's events are posted (`http://host:port/path`;
    /// empty: nowhere), and the secret they are signed with.
    pub webhook_url: String,
    pub webhook_secret: String,
    /// The business's time zone as an offset from UTC, in minutes (its
    /// engagement figures are by its local hour; a fixed offset: daylight
    /// saving is not followed).
    pub utc_offset_minutes: i32,
}

/// A display name: 1 to 255 characters, not blank.
pub fn check_display_name(name: &str) -> Result<(), Invalid> {
    let n = name.chars().count();
    if name.trim().is_empty() || n > 255 {
        return Err(invalid(
            "display_name_invalid",
            format!("display name of {n} characters; 1 to 255, not blank"),
        ));
    }
    Ok(())
}

impl BusinessRow {
    pub fn tier_limit(&self) -> Option<u32> {
        TIERS[usize::from(self.tier).min(TIERS.len() - 1)]
    }

    pub fn to_json(&self, id: u64) -> serde_json::Value {
        serde_json::json!({
            "business": id,
            "display_name": self.display_name,
            "pending_display_name": self.pending_display_name,
            "profile": self.profile,
            "verified": self.verified,
            "verified_at_ms": self.verified_at_ms,
            "verification_reason": self.verification_reason,
            "tier": self.tier_limit().map_or(serde_json::Value::from("unlimited"), serde_json::Value::from),
            "messages_per_sec": self.messages_per_sec,
            "registered_at_ms": self.registered_at_ms,
        })
    }
}

/// A template's place in its lifecycle.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum TemplateStatus {
    #[default]
    Pending,
    Approved,
    Rejected,
    Paused,
    Disabled,
}

/// A template's header as defined.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct HeaderDef {
    /// `none`, `text` or `media`.
    pub kind: String,
    /// The text (with at most one parameter) or the media reference.
    pub text: String,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct ButtonDef {
    /// `quick_reply`, `url` or `phone`.
    pub kind: String,
    pub text: String,
    /// The quick reply's payload, the URL (with at most one parameter) or
    /// the phone number.
    pub value: String,
}

/// One language's version of a template.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct Version {
    pub language: String,
    pub header: HeaderDef,
    pub body: String,
    pub footer: String,
    pub buttons: Vec<ButtonDef>,
    /// An example value for every parameter, by its name (`"1"` for `{{1}}`).
    pub examples: BTreeMap<String, String>,
}

/// A template as the business defines it (the admin API's body).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct TemplateDef {
    /// `marketing`, `utility` or `authentication`.
    pub category: String,
    /// The first is the default language (the last fallback).
    pub versions: Vec<Version>,
}

/// A stored template (`T` row): its definition and lifecycle.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct Template {
    pub name: String,
    pub def: TemplateDef,
    pub status: TemplateStatus,
    pub status_reason: String,
    pub status_at_ms: u64,
    /// While paused: when the pause ends.
    pub paused_until_ms: u64,
    /// Pauses so far (the third disables it).
    pub pauses: u32,
}

pub fn category_of(name: &str) -> Option<Category> {
    match name {
        "marketing" => Some(Category::Marketing),
        "utility" => Some(Category::Utility),
        "authentication" => Some(Category::Authentication),
        _ => None,
    }
}

/// The parameters in `text`: the names between `{{` and `}}`.
fn params_in(text: &str) -> Result<Vec<&str>, Invalid> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find("{{") {
        let after = &rest[at + 2..];
        let Some(end) = after.find("}}") else {
            return Err(invalid("param_unclosed", "a {{ without its }}"));
        };
        let name = &after[..end];
        let ok = !name.is_empty()
            && name.len() <= 64
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if !ok {
            return Err(invalid(
                "param_name_invalid",
                format!("{{{{{name}}}}}: a number or lower-case letters, digits and _"),
            ));
        }
        out.push(name);
        rest = &after[end + 2..];
    }
    Ok(out)
}

fn is_positional(name: &str) -> bool {
    name.bytes().all(|b| b.is_ascii_digit())
}

/// A language tag as templates use it: `en`, `en_US`, `pt_BR`.
fn language_ok(l: &str) -> bool {
    let (lang, region) = l.split_once('_').unwrap_or((l, ""));
    (2..=3).contains(&lang.len())
        && lang.bytes().all(|b| b.is_ascii_lowercase())
        && (region.is_empty()
            || ((2..=4).contains(&region.len())
                && region.bytes().all(|b| b.is_ascii_alphanumeric())))
}

fn too_long(field: &str, text: &str, max: usize, code: &'static str) -> Result<(), Invalid> {
    let n = text.chars().count();
    if n > max {
        return Err(invalid(
            code,
            format!("{field}: {n} characters; at most {max}"),
        ));
    }
    Ok(())
}

/// A template name: 1 to 512 of lower-case letters, digits and `_`.
pub fn check_template_name(name: &str) -> Result<(), Invalid> {
    let ok = !name.is_empty()
        && name.len() <= 512
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if !ok {
        return Err(invalid(
            "name_invalid",
            "a template name is 1 to 512 lower-case letters, digits and _",
        ));
    }
    Ok(())
}

impl TemplateDef {
    /// Checks the schema; each violation has its own code.
    pub fn check(&self) -> Result<Category, Invalid> {
        let category = category_of(&self.category).ok_or_else(|| {
            invalid(
                "category_invalid",
                format!(
                    "category {:?}: marketing, utility or authentication",
                    self.category
                ),
            )
        })?;
        if self.versions.is_empty() {
            return Err(invalid(
                "no_versions",
                "a template has at least one language version",
            ));
        }
        for (i, v) in self.versions.iter().enumerate() {
            if !language_ok(&v.language) {
                return Err(invalid(
                    "language_invalid",
                    format!("language {:?}: like en or pt_BR", v.language),
                ));
            }
            if self.versions[..i].iter().any(|o| o.language == v.language) {
                return Err(invalid(
                    "language_repeated",
                    format!("two versions in {}", v.language),
                ));
            }
            v.check()?;
        }
        Ok(category)
    }
}

impl Version {
    fn check(&self) -> Result<(), Invalid> {
        let mut params: Vec<&str> = Vec::new();
        match self.header.kind.as_str() {
            "" | "none" if self.header.text.is_empty() => {}
            "" | "none" => {
                return Err(invalid(
                    "header_invalid",
                    "a header of kind none has no text",
                ))
            }
            "text" => {
                too_long("header", &self.header.text, 60, "header_too_long")?;
                let p = params_in(&self.header.text)?;
                if p.len() > 1 {
                    return Err(invalid(
                        "header_too_many_params",
                        format!("{} parameters in the header; at most 1", p.len()),
                    ));
                }
                params.extend(p);
            }
            "media" if !self.header.text.is_empty() && self.header.text.len() <= 1024 => {}
            "media" => {
                return Err(invalid(
                    "header_invalid",
                    "a media header names its media reference (1 to 1024 bytes)",
                ))
            }
            other => {
                return Err(invalid(
                    "header_invalid",
                    format!("header kind {other:?}: none, text or media"),
                ))
            }
        }
        if self.body.trim().is_empty() {
            return Err(invalid("body_empty", "a template has a body"));
        }
        too_long("body", &self.body, 1024, "body_too_long")?;
        params.extend(params_in(&self.body)?);
        too_long("footer", &self.footer, 60, "footer_too_long")?;
        if !params_in(&self.footer)?.is_empty() {
            return Err(invalid("footer_has_params", "a footer has no parameters"));
        }
        if self.buttons.len() > 10 {
            return Err(invalid(
                "too_many_buttons",
                format!("{} buttons; at most 10", self.buttons.len()),
            ));
        }
        for b in &self.buttons {
            if b.text.trim().is_empty() || b.text.chars().count() > 25 {
                return Err(invalid(
                    "button_text_invalid",
                    "a button's text is 1 to 25 characters",
                ));
            }
            match b.kind.as_str() {
                "quick_reply" => {
                    too_long("quick reply payload", &b.value, 256, "button_value_invalid")?
                }
                "url" => {
                    let p = params_in(&b.value)?;
                    if p.len() > 1 {
                        return Err(invalid(
                            "url_too_many_params",
                            "a URL button has at most one parameter",
                        ));
                    }
                    if !(b.value.starts_with("https://") || b.value.starts_with("http://"))
                        || b.value.len() > 2000
                    {
                        return Err(invalid(
                            "button_value_invalid",
                            "a URL button's value is an http(s) URL",
                        ));
                    }
                    params.extend(p);
                }
                "phone" => {
                    let digits = b.value.strip_prefix('+').unwrap_or(&b.value);
                    if digits.len() < 4
                        || digits.len() > 20
                        || !digits.bytes().all(|d| d.is_ascii_digit())
                    {
                        return Err(invalid(
                            "button_value_invalid",
                            "a phone button's value is +digits",
                        ));
                    }
                }
                other => {
                    return Err(invalid(
                        "button_invalid",
                        format!("button kind {other:?}: quick_reply, url or phone"),
                    ))
                }
            }
        }
        let positional = params.iter().filter(|p| is_positional(p)).count();
        if positional > 0 && positional < params.len() {
            return Err(invalid(
                "params_mixed",
                "parameters are all positional ({{1}}) or all named ({{order_id}})",
            ));
        }
        if positional > 0 {
            let mut numbers: Vec<usize> = params.iter().filter_map(|p| p.parse().ok()).collect();
            numbers.sort_unstable();
            numbers.dedup();
            if numbers.iter().enumerate().any(|(i, &n)| n != i + 1) {
                return Err(invalid(
                    "params_not_in_sequence",
                    "positional parameters are {{1}}, {{2}}, ... without gaps",
                ));
            }
        }
        if let Some(p) = params.iter().find(|p| !self.examples.contains_key(**p)) {
            return Err(invalid(
                "example_missing",
                format!("no example value for {{{{{p}}}}}"),
            ));
        }
        Ok(())
    }

    /// The parameter names this version uses, each once.
    fn params(&self) -> Vec<String> {
        let mut all: Vec<String> = Vec::new();
        let texts = std::iter::once(self.header.text.as_str())
            .filter(|_| self.header.kind == "text")
            .chain(std::iter::once(self.body.as_str()))
            .chain(
                self.buttons
                    .iter()
                    .filter(|b| b.kind == "url")
                    .map(|b| b.value.as_str()),
            );
        for t in texts {
            for p in params_in(t).unwrap_or_default() {
                if !all.iter().any(|a| a == p) {
                    all.push(p.to_owned());
                }
            }
        }
        all
    }
}

/// Longest value of one parameter.
pub const MAX_PARAM_LEN: usize = 1024;

impl Template {
    /// The version to send: `asked` if given (none in it: `None`);
    /// otherwise the customer's `preferred` language, then one of the same
    /// language in another region (`pt_PT` for `pt_BR`), then the
    /// template's first version.
    pub fn version(&self, asked: &str, preferred: &str) -> Option<&Version> {
        let versions = &self.def.versions;
        if !asked.is_empty() {
            return versions.iter().find(|v| v.language == asked);
        }
        let base = |l: &str| l.split('_').next().unwrap_or("").to_owned();
        versions
            .iter()
            .find(|v| !preferred.is_empty() && v.language == preferred)
            .or_else(|| {
                versions
                    .iter()
                    .find(|v| !preferred.is_empty() && base(&v.language) == base(preferred))
            })
            .or_else(|| versions.first())
    }

    /// Renders version `v` with the send's parameters.
    pub fn render(
        &self,
        v: &Version,
        send: &TemplateSend,
        verified: bool,
    ) -> Result<TemplateMessage, String> {
        let names = v.params();
        let positional = names.first().is_some_and(|n| is_positional(n));
        let mut values: BTreeMap<String, &str> = BTreeMap::new();
        for (i, (name, value)) in send.params.iter().enumerate() {
            if value.chars().count() > MAX_PARAM_LEN {
                return Err(format!(
                    "parameter {} is over {MAX_PARAM_LEN} characters",
                    i + 1
                ));
            }
            let key = if name.is_empty() {
                if !positional {
                    return Err(format!("{} takes named parameters", self.name));
                }
                (i + 1).to_string()
            } else {
                if positional {
                    return Err(format!("{} takes positional parameters", self.name));
                }
                name.clone()
            };
            if !names.contains(&key) {
                return Err(format!("{} has no parameter {{{{{key}}}}}", self.name));
            }
            if values.insert(key.clone(), value).is_some() {
                return Err(format!("parameter {{{{{key}}}}} given twice"));
            }
        }
        if let Some(missing) = names.iter().find(|n| !values.contains_key(*n)) {
            return Err(format!("no value for {{{{{missing}}}}}"));
        }
        let fill = |t: &str| {
            let mut out = t.to_owned();
            for (k, v) in &values {
                out = out.replace(&format!("{{{{{k}}}}}"), v);
            }
            out
        };
        let header = match v.header.kind.as_str() {
            "text" => Header::Text(fill(&v.header.text)),
            "media" => Header::Media(v.header.text.clone()),
            _ => Header::None,
        };
        let buttons = v
            .buttons
            .iter()
            .map(|b| {
                let (kind, value) = match b.kind.as_str() {
                    "url" => (ButtonKind::Url, fill(&b.value)),
                    "phone" => (ButtonKind::Phone, b.value.clone()),
                    _ => (ButtonKind::QuickReply, b.value.clone()),
                };
                Button {
                    kind,
                    text: b.text.clone(),
                    value,
                }
            })
            .collect();
        Ok(TemplateMessage {
            verified,
            category: category_of(&self.def.category).unwrap_or(Category::Utility),
            name: self.name.clone(),
            language: v.language.clone(),
            header,
            body: fill(&v.body),
            footer: v.footer.clone(),
            buttons,
        })
    }
}

/// Where an opt-in or opt-out came from.
pub const SOURCES: [&str; 4] = ["in_chat", "web_form", "keyword", "api_import"];

/// One entry of the consent ledger (`J` row), never changed once written.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct ConsentEntry {
    pub at_ms: u64,
    /// `opt_in` or `opt_out`.
    pub action: String,
    /// `marketing` or `utility`.
    pub purpose: String,
    pub source: String,
    /// The version of the consent wording shown, and the wording.
    pub text_version: u32,
    pub text: String,
    /// The language of the wording: the customer's preferred language for
    /// this business's templates.
    pub language: String,
}

/// The pair (business, customer) as it stands (`P` row): the service
/// window, the conversation the business started, consent, block.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PairRow {
    /// The customer's last message to the business (0: never).
    pub last_customer_ms: u64,
    /// When the business last started a conversation (a template outside
    /// the window; 0: never).
    pub started_ms: u64,
    pub marketing: bool,
    pub utility: bool,
    pub blocked: bool,
    /// Purposes withdrawn by the customer's last opt-out keyword, which
    /// `START` restores (bit 0 marketing, bit 1 utility).
    pub keyword_withdrew: u8,
    pub reports: u32,
    /// Ledger entries written so far (the next entry's number).
    pub ledger_len: u64,
    pub language: String,
    /// The customer's data was erased at this time (0: never).
    pub erased_ms: u64,
    /// The business's messages to this customer sent, and read, by the
    /// hour (in the business's time zone) they were sent: what picks the
    /// customer's own best hour ([`ReadHours::best`]).
    pub hours: ReadHours,
}

/// Messages sent and read by the local hour they were sent, for one
/// customer: 24 pairs of saturating counters (halved together when one
/// would overflow, which keeps the rates). Encoded as 96 bytes at the end
/// of the pair row, absent while all are zero.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReadHours {
    pub sent: [u16; 24],
    pub read: [u16; 24],
}

impl ReadHours {
    pub fn is_empty(&self) -> bool {
        self.sent.iter().all(|&n| n == 0) && self.read.iter().all(|&n| n == 0)
    }

    /// A message sent at local `hour` was sent (`read` false) or read.
    pub fn count(&mut self, hour: usize, read: bool) {
        let counted = if read {
            self.read[hour]
        } else {
            self.sent[hour]
        };
        if counted == u16::MAX {
            for n in self.sent.iter_mut().chain(self.read.iter_mut()) {
                *n /= 2;
            }
        }
        let v = if read { &mut self.read } else { &mut self.sent };
        v[hour] += 1;
    }

    /// The hour with the highest read rate among hours with a read
    /// message (the earliest on a tie), or `None` while nothing was read.
    pub fn best(&self) -> Option<usize> {
        best_read_hour(&self.sent.map(u64::from), &self.read.map(u64::from))
    }

    /// Adds these counts to `sent` and `read` (a segment's sums).
    pub fn add_to(&self, sent: &mut [u64; 24], read: &mut [u64; 24]) {
        for h in 0..24 {
            sent[h] += u64::from(self.sent[h]);
            read[h] += u64::from(self.read[h]);
        }
    }
}

/// The hour with the highest rate `read / sent` among hours with a read
/// message (the earliest on a tie), or `None` while nothing was read. A
/// hour's `sent` counts as at least its `read` (a read can arrive for a
/// message whose sent fact was counted before the counters existed).
pub fn best_read_hour(sent: &[u64; 24], read: &[u64; 24]) -> Option<usize> {
    let mut best: Option<(usize, u128, u128)> = None;
    for h in 0..24 {
        let (r, n) = (u128::from(read[h]), u128::from(sent[h].max(read[h])));
        if r == 0 {
            continue;
        }
        // r/n > best_r/best_n, in integers.
        if best.is_none_or(|(_, br, bn)| r * bn > br * n) {
            best = Some((h, r, n));
        }
    }
    best.map(|(h, _, _)| h)
}

impl PairRow {
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(48 + self.language.len());
        v.extend_from_slice(&self.last_customer_ms.to_be_bytes());
        v.extend_from_slice(&self.started_ms.to_be_bytes());
        let flags = self.marketing as u8 | (self.utility as u8) << 1 | (self.blocked as u8) << 2;
        v.push(flags);
        v.push(self.keyword_withdrew);
        v.extend_from_slice(&self.reports.to_be_bytes());
        v.extend_from_slice(&self.ledger_len.to_be_bytes());
        v.extend_from_slice(&self.erased_ms.to_be_bytes());
        v.push(self.language.len().min(255) as u8);
        v.extend_from_slice(&self.language.as_bytes()[..self.language.len().min(255)]);
        if !self.hours.is_empty() {
            for n in self.hours.sent.iter().chain(&self.hours.read) {
                v.extend_from_slice(&n.to_be_bytes());
            }
        }
        v
    }

    pub fn decode(v: &[u8]) -> Option<PairRow> {
        let u64_at = |at: usize| super::keys::be_u64(v, at);
        let flags = *v.get(16)?;
        let len = usize::from(*v.get(38)?);
        let language = std::str::from_utf8(v.get(39..39 + len)?).ok()?.to_owned();
        let mut hours = ReadHours::default();
        match v.get(39 + len..) {
            Some([]) | None => {}
            Some(tail) if tail.len() == 96 => {
                let mut n = tail
                    .chunks_exact(2)
                    .map(|b| u16::from_be_bytes([b[0], b[1]]));
                for x in hours.sent.iter_mut().chain(hours.read.iter_mut()) {
                    *x = n.next()?;
                }
            }
            Some(_) => return None,
        }
        Some(PairRow {
            last_customer_ms: u64_at(0)?,
            started_ms: u64_at(8)?,
            marketing: flags & 1 != 0,
            utility: flags & 2 != 0,
            blocked: flags & 4 != 0,
            keyword_withdrew: *v.get(17)?,
            reports: u32::from_be_bytes(v.get(18..22)?.try_into().ok()?),
            ledger_len: u64_at(22)?,
            erased_ms: u64_at(30)?,
            language,
            hours,
        })
    }

    pub fn consents(&self, category: Category) -> bool {
        match category {
            Category::Marketing => self.marketing,
            Category::Utility | Category::Authentication => self.utility,
        }
    }

    /// Applies a ledger entry to the current state.
    pub fn apply(&mut self, e: &ConsentEntry) {
        let on = e.action == "opt_in";
        match e.purpose.as_str() {
            "marketing" => self.marketing = on,
            _ => self.utility = on,
        }
        if on && !e.language.is_empty() {
            self.language = e.language.clone();
        }
        self.ledger_len += 1;
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "marketing": self.marketing,
            "utility": self.utility,
            "blocked": self.blocked,
            "reports": self.reports,
            "language": self.language,
            "last_customer_message_ms": self.last_customer_ms,
            "conversation_started_ms": self.started_ms,
            "erased_ms": self.erased_ms,
        })
    }
}

/// What a customer's message to a business says about consent, read from
/// its text (a payload that is not UTF-8 says nothing).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Keyword {
    OptOut,
    OptIn,
}

/// Matches a message against the keyword lists (the whole message, case
/// and surrounding blanks and punctuation ignored).
pub fn keyword(payload: &[u8], opt_out: &[String], opt_in: &[String]) -> Option<Keyword> {
    let text = std::str::from_utf8(payload).ok()?;
    if text.len() > 64 {
        return None;
    }
    let word = text
        .trim()
        .trim_matches(|c: char| c.is_ascii_punctuation())
        .to_uppercase();
    let is = |list: &[String]| list.iter().any(|k| k.to_uppercase() == word);
    if is(opt_out) {
        Some(Keyword::OptOut)
    } else if is(opt_in) {
        Some(Keyword::OptIn)
    } else {
        None
    }
}

/// The marketing templates a customer received lately, from any business
/// (`M` row, on the customer's shard): (time, sender, client id) each.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MarketingRow(pub Vec<(u64, u64, u64)>);

impl MarketingRow {
    pub fn encode(&self) -> Vec<u8> {
        self.0
            .iter()
            .flat_map(|(a, b, c)| [a, b, c].map(|x| x.to_be_bytes()))
            .flatten()
            .collect()
    }

    pub fn decode(v: &[u8]) -> Option<MarketingRow> {
        if !v.len().is_multiple_of(24) {
            return None;
        }
        let at = |i: usize| super::keys::be_u64(v, i);
        (0..v.len() / 24)
            .map(|i| Some((at(24 * i)?, at(24 * i + 8)?, at(24 * i + 16)?)))
            .collect::<Option<Vec<_>>>()
            .map(MarketingRow)
    }
}

/// Whether a message is a business's marketing template, as rendered for
/// its customer (the `TemplateMessage` payload's category).
pub fn is_marketing(kind: courier_protocol::MessageKind, payload: &[u8]) -> bool {
    kind == courier_protocol::MessageKind::Template
        && payload.first() == Some(&courier_protocol::business::TEMPLATE_FORMAT)
        && payload.get(2) == Some(&(Category::Marketing as u8))
}

/// One day of a business's signals (`Q` row): template sends and reads,
/// blocks and reports, and per template its sends and reads.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct DayCounts {
    pub sent: u64,
    pub read: u64,
    pub blocks: u64,
    pub reports: u64,
    /// Conversations the business started.
    pub started: u64,
    /// Per template: (sent, read).
    pub templates: BTreeMap<String, (u64, u64)>,
}

/// A quality rating.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Quality {
    Low,
    Medium,
    High,
}

/// Days a rating looks back over.
pub const QUALITY_DAYS: u64 = 7;
/// Template messages (sent before today) below which the read rate says
/// nothing.
pub const QUALITY_MIN_SENT: u64 = 100;

/// A business's (or one template's) signals over the rating's days, each
/// day weighted by how recent it is (today 7, yesterday 6, ...). Reads
/// count for the day their message was sent, and only days before today
/// are judged on reads (a message sent today has not had its day yet).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Weighted {
    /// Messages sent (every day), and blocks and reports: the negative rate.
    pub sent: f64,
    pub negative: f64,
    /// Messages sent before today: how many, weighted, and their reads.
    pub judged: u64,
    pub judged_sent: f64,
    pub judged_read: f64,
}

impl Weighted {
    /// Low when blocks and reports reach 2% of the messages or, with enough
    /// judged, fewer than 20% are read; medium from 0.5% negative or under
    /// 50% read; else high.
    pub fn rating(&self) -> Quality {
        let neg = if self.sent > 0.0 {
            self.negative / self.sent
        } else {
            0.0
        };
        let read_rate = if self.judged >= QUALITY_MIN_SENT && self.judged_sent > 0.0 {
            self.judged_read / self.judged_sent
        } else {
            1.0
        };
        if neg >= 0.02 || read_rate < 0.2 {
            Quality::Low
        } else if neg >= 0.005 || read_rate < 0.5 {
            Quality::Medium
        } else {
            Quality::High
        }
    }

    pub fn read_rate(&self) -> f64 {
        self.judged_read / self.judged_sent.max(1.0)
    }

    pub fn negative_rate(&self) -> f64 {
        self.negative / self.sent.max(1.0)
    }
}

/// The weighted signals over the last [`QUALITY_DAYS`] days of the
/// business, or of one template (its own messages and reads, the
/// business's blocks and reports).
pub fn weighted(days: &BTreeMap<u64, DayCounts>, today: u64, template: Option<&str>) -> Weighted {
    let mut w = Weighted::default();
    for (&day, c) in days.range(today.saturating_sub(QUALITY_DAYS - 1)..=today) {
        let weight = (QUALITY_DAYS - (today - day)) as f64;
        let (sent, read) = match template {
            Some(t) => c.templates.get(t).copied().unwrap_or_default(),
            None => (c.sent, c.read),
        };
        w.sent += weight * sent as f64;
        w.negative += weight * (c.blocks + c.reports) as f64;
        if day < today {
            w.judged += sent;
            w.judged_sent += weight * sent as f64;
            w.judged_read += weight * read as f64;
        }
    }
    w
}

/// A token bucket over the node's clock: `per_ms` milliseconds per token,
/// at most `burst` tokens.
#[derive(Clone, Copy, Debug)]
pub struct Bucket {
    tokens: f64,
    at_ms: u64,
}

impl Bucket {
    pub fn full(burst: u32, now_ms: u64) -> Bucket {
        Bucket {
            tokens: f64::from(burst),
            at_ms: now_ms,
        }
    }

    fn refill(&mut self, per_ms: f64, burst: u32, now_ms: u64) {
        let elapsed = now_ms.saturating_sub(self.at_ms) as f64;
        self.tokens = (self.tokens + elapsed / per_ms).min(f64::from(burst));
        self.at_ms = self.at_ms.max(now_ms);
    }

    /// 0 if a token is there now, else the milliseconds until one is.
    pub fn wait_ms(&mut self, per_ms: f64, burst: u32, now_ms: u64) -> u64 {
        self.refill(per_ms, burst, now_ms);
        if self.tokens >= 1.0 {
            0
        } else {
            ((1.0 - self.tokens) * per_ms).ceil().max(1.0) as u64
        }
    }

    pub fn take(&mut self) {
        self.tokens -= 1.0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn version(body: &str) -> Version {
        Version {
            language: "en_US".into(),
            body: body.into(),
            examples: [
                ("1".to_owned(), "Ana".to_owned()),
                ("2".to_owned(), "#1".to_owned()),
            ]
            .into_iter()
            .collect(),
            ..Version::default()
        }
    }

    fn def(v: Version) -> TemplateDef {
        TemplateDef {
            category: "utility".into(),
            versions: vec![v],
        }
    }

    fn code(d: &TemplateDef) -> &'static str {
        d.check().err().map_or("ok", |e| e.code)
    }

    #[test]
    fn each_schema_violation_has_its_code() {
        assert_eq!(code(&def(version("Hi {{1}}, order {{2}}"))), "ok");
        assert_eq!(code(&def(version(""))), "body_empty");
        assert_eq!(code(&def(version(&"x".repeat(1025)))), "body_too_long");
        assert_eq!(code(&def(version("Hi {{1}} {{name}}"))), "params_mixed");
        assert_eq!(code(&def(version("Hi {{2}}"))), "params_not_in_sequence");
        assert_eq!(code(&def(version("Hi {{3}}"))), "params_not_in_sequence");
        assert_eq!(code(&def(version("Hi {{name}}"))), "example_missing");
        assert_eq!(code(&def(version("Hi {{Name}}"))), "param_name_invalid");
        assert_eq!(code(&def(version("Hi {{1"))), "param_unclosed");
        let mut v = version("Hi");
        v.header = HeaderDef {
            kind: "text".into(),
            text: "x".repeat(61),
        };
        assert_eq!(code(&def(v.clone())), "header_too_long");
        v.header.text = "{{1}} {{2}}".into();
        assert_eq!(code(&def(v.clone())), "header_too_many_params");
        v.header = HeaderDef {
            kind: "video".into(),
            text: String::new(),
        };
        assert_eq!(code(&def(v)), "header_invalid");
        let mut v = version("Hi");
        v.footer = "{{1}}".into();
        assert_eq!(code(&def(v.clone())), "footer_has_params");
        v.footer = "x".repeat(61);
        assert_eq!(code(&def(v)), "footer_too_long");
        let mut v = version("Hi");
        let button = ButtonDef {
            kind: "quick_reply".into(),
            text: "Yes".into(),
            value: "yes".into(),
        };
        v.buttons = vec![button.clone(); 11];
        assert_eq!(code(&def(v.clone())), "too_many_buttons");
        v.buttons = vec![ButtonDef {
            kind: "url".into(),
            text: "Open".into(),
            value: "https://x.test/{{1}}/{{2}}".into(),
        }];
        assert_eq!(code(&def(v.clone())), "url_too_many_params");
        v.buttons = vec![ButtonDef {
            kind: "fax".into(),
            ..button
        }];
        assert_eq!(code(&def(v)), "button_invalid");
        let mut d = def(version("Hi"));
        d.category = "spam".into();
        assert_eq!(code(&d), "category_invalid");
        d.category = "marketing".into();
        d.versions.push(version("Again"));
        assert_eq!(code(&d), "language_repeated");
        d.versions[1].language = "English".into();
        assert_eq!(code(&d), "language_invalid");
        d.versions.clear();
        assert_eq!(code(&d), "no_versions");
    }

    #[test]
    fn rendering_fills_parameters_and_refuses_wrong_ones() {
        let mut v = version("Hi {{1}}, order {{2}} shipped");
        v.buttons = vec![ButtonDef {
            kind: "url".into(),
            text: "Track".into(),
            value: "https://x.test/t/{{2}}".into(),
        }];
        let t = Template {
            name: "shipped".into(),
            def: def(v.clone()),
            ..Template::default()
        };
        let send = |params: &[(&str, &str)]| TemplateSend {
            name: "shipped".into(),
            language: String::new(),
            params: params
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        let m = t
            .render(&v, &send(&[("", "Ana"), ("", "#9")]), true)
            .unwrap();
        assert_eq!(m.body, "Hi Ana, order #9 shipped");
        assert_eq!(m.buttons[0].value, "https://x.test/t/#9");
        assert!(m.verified);
        assert!(
            t.render(&v, &send(&[("", "Ana")]), true).is_err(),
            "missing"
        );
        assert!(t
            .render(&v, &send(&[("", "a"), ("", "b"), ("", "c")]), true)
            .is_err());
        assert!(t
            .render(&v, &send(&[("name", "Ana"), ("", "b")]), true)
            .is_err());
    }

    #[test]
    fn language_fallback_goes_exact_then_same_language_then_first() {
        let mut a = version("Hello");
        a.language = "en_US".into();
        let mut b = version("Olá");
        b.language = "pt_PT".into();
        let t = Template {
            def: TemplateDef {
                category: "utility".into(),
                versions: vec![a, b],
            },
            ..Template::default()
        };
        assert_eq!(t.version("", "pt_PT").unwrap().body, "Olá");
        assert_eq!(t.version("", "pt_BR").unwrap().body, "Olá");
        assert_eq!(t.version("", "de_DE").unwrap().body, "Hello");
        assert_eq!(t.version("", "").unwrap().body, "Hello");
        assert!(t.version("de_DE", "").is_none(), "asked for, not there");
    }

    #[test]
    fn a_customers_best_hour_is_its_highest_read_rate() {
        let mut h = ReadHours::default();
        assert_eq!(h.best(), None, "nothing sent");
        for _ in 0..4 {
            h.count(8, false);
        }
        assert_eq!(h.best(), None, "sent, never read");
        h.count(8, true); // 1 of 4 at 08
        h.count(19, false);
        h.count(19, false);
        h.count(19, true); // 1 of 2 at 19
        assert_eq!(h.best(), Some(19));
        h.count(7, false);
        h.count(7, false);
        h.count(7, true); // 1 of 2 at 07 too: the earliest wins a tie
        assert_eq!(h.best(), Some(7));
        // Counters halve together rather than overflow: rates stay.
        let mut full = ReadHours::default();
        full.sent[3] = u16::MAX;
        full.read[3] = u16::MAX / 2;
        full.sent[4] = 100;
        full.read[4] = 10;
        full.count(3, false);
        assert_eq!(
            (full.sent[3], full.read[3]),
            (u16::MAX / 2 + 1, u16::MAX / 4)
        );
        assert_eq!((full.sent[4], full.read[4]), (50, 5));
        assert_eq!(full.best(), Some(3));
    }

    #[test]
    fn pair_rows_round_trip_and_keywords_match_whole_messages() {
        let p = PairRow {
            last_customer_ms: 5,
            started_ms: 6,
            marketing: true,
            utility: false,
            blocked: true,
            keyword_withdrew: 3,
            reports: 2,
            ledger_len: 9,
            language: "pt_BR".into(),
            erased_ms: 0,
            hours: ReadHours::default(),
        };
        assert_eq!(PairRow::decode(&p.encode()), Some(p.clone()));
        // With read hours: 96 bytes more, and back.
        let mut q = p.clone();
        q.hours.count(9, false);
        q.hours.count(9, true);
        q.hours.count(20, false);
        assert_eq!(q.encode().len(), p.encode().len() + 96);
        assert_eq!(PairRow::decode(&q.encode()), Some(q.clone()));
        // A tail of another length is a corrupt row.
        let mut bad = q.encode();
        bad.pop();
        assert_eq!(PairRow::decode(&bad), None);
        let out = vec!["STOP".to_owned(), "PARAR".to_owned()];
        let inn = vec!["START".to_owned()];
        assert_eq!(keyword(b" stop! ", &out, &inn), Some(Keyword::OptOut));
        assert_eq!(
            keyword("Parar".as_bytes(), &out, &inn),
            Some(Keyword::OptOut)
        );
        assert_eq!(keyword(b"start", &out, &inn), Some(Keyword::OptIn));
        assert_eq!(keyword(b"please stop", &out, &inn), None);
        assert_eq!(keyword(&[0xff, 0xfe], &out, &inn), None);
    }

    #[test]
    fn quality_weighs_recent_days_and_judges_reads_of_earlier_days() {
        let mut days = BTreeMap::new();
        let day = |sent, read, blocks| DayCounts {
            sent,
            read,
            blocks,
            ..DayCounts::default()
        };
        days.insert(10, day(500, 0, 0));
        assert_eq!(
            weighted(&days, 10, None).rating(),
            Quality::High,
            "today's are not judged on reads"
        );
        assert_eq!(
            weighted(&days, 11, None).rating(),
            Quality::Low,
            "a day later: none read"
        );
        days.insert(10, day(500, 150, 0));
        assert_eq!(
            weighted(&days, 11, None).rating(),
            Quality::Medium,
            "30% read"
        );
        days.insert(10, day(500, 300, 0));
        assert_eq!(weighted(&days, 11, None).rating(), Quality::High);
        days.insert(11, day(0, 0, 5));
        assert_eq!(
            weighted(&days, 11, None).rating(),
            Quality::Medium,
            "blocks: 5 of 500 (weighted 7 against 6)"
        );
        days.insert(11, day(0, 0, 10));
        assert_eq!(weighted(&days, 11, None).rating(), Quality::Low);
        assert_eq!(
            weighted(&days, 16, None).judged,
            500,
            "six days on, still counted"
        );
        assert_eq!(weighted(&days, 17, None).judged, 0, "seven days on, gone");
        days.insert(5, day(99, 0, 0));
        assert_eq!(
            weighted(&days, 6, None).rating(),
            Quality::High,
            "99 are too few to judge"
        );
    }

    #[test]
    fn a_bucket_allows_its_burst_then_one_per_interval() {
        let mut b = Bucket::full(45, 0);
        for _ in 0..45 {
            assert_eq!(b.wait_ms(6000.0, 45, 0), 0);
            b.take();
        }
        assert_eq!(b.wait_ms(6000.0, 45, 0), 6000);
        assert_eq!(b.wait_ms(6000.0, 45, 5999), 1);
        assert_eq!(b.wait_ms(6000.0, 45, 6000), 0);
    }
}

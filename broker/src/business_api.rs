//! The admin API's business requests (`/admin/businesses/<id>...`), each
//! answered by the business's shard once written. docs/BUSINESS.md lists
//! them with their bodies and error codes.
//!
//! Errors are JSON: `{"error": words, "code": a stable code}`; 400 for a
//! body that breaks a rule (one code per rule), 404 for a business or
//! template that does not exist, 421 for a business whose shard another
//! cluster node serves (ask that node).

use std::sync::Arc;

use serde::Deserialize;
use serde_json::json;
use tokio::sync::oneshot;

use crate::node::Node;
use crate::shard::messages::ShardCmd;
use crate::shard::messages::{AdminOp, BusinessAdminCmd};
use crate::state::business::{ConsentEntry, Invalid, Profile, TemplateDef, TemplateStatus};
use crate::state::business_events::Period;
use crate::state::campaigns::CampaignDef;
use crate::state::ids::valid_user;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PutBody {
    display_name: Option<String>,
    profile: Option<Profile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VerifyBody {
    verified: bool,
    #[serde(default)]
    reason: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitsBody {
    tier: Option<u8>,
    messages_per_sec: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StatusBody {
    status: TemplateStatus,
    #[serde(default)]
    reason: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConsentBody {
    customer: u64,
    action: String,
    purpose: String,
    source: String,
    #[serde(default)]
    text_version: u32,
    #[serde(default)]
    text: String,
    #[serde(default)]
    language: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LabelsBody {
    labels: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TimeZoneBody {
    utc_offset_minutes: i32,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WebhookBody {
    url: String,
    #[serde(default)]
    secret: String,
}

/// An answer: the HTTP status line's status, and the JSON body.
pub(crate) type Answer = (&'static str, serde_json::Value);

fn error(status: &'static str, message: &str) -> Answer {
    (status, json!({ "error": message }))
}

fn parse<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, Answer> {
    serde_json::from_slice(body).map_err(|e| {
        (
            "400 Bad Request",
            json!({ "error": format!("the body: {e}"), "code": "body_invalid" }),
        )
    })
}

/// The most events one request reads.
const EVENTS_MAX: usize = 1000;

/// `events[/<after>[/<limit>]]`: the events after a sequence (0), at most
/// `limit` (100).
fn events_op(rest: &[&str]) -> Result<AdminOp, Answer> {
    let number = |s: Option<&&str>, default: u64| match s {
        None => Some(default),
        Some(s) => s.parse::<u64>().ok(),
    };
    match (
        number(rest.first(), 0),
        number(rest.get(1), 100),
        rest.len(),
    ) {
        (Some(after), Some(limit), 0..=2) if (1..=EVENTS_MAX as u64).contains(&limit) => {
            Ok(AdminOp::Events {
                after,
                limit: limit as usize,
            })
        }
        _ => Err((
            "400 Bad Request",
            json!({
                "error": format!("events/<after>/<limit>: numbers, limit 1 to {EVENTS_MAX}"),
                "code": "range_invalid",
            }),
        )),
    }
}

/// A campaign id in a path: 1 to 2^63-1.
fn campaign_id(s: &str) -> Result<u64, Answer> {
    match s.parse::<u64>() {
        Ok(id) if id > 0 && id < crate::state::campaigns::CAMPAIGN_BIT => Ok(id),
        _ => Err(error("400 Bad Request", "a campaign id is a number from 1")),
    }
}

/// `rest` is the path after `/admin/businesses/`.
pub(crate) async fn route(node: &Arc<Node>, method: &str, rest: &str, body: &[u8]) -> Answer {
    let parts: Vec<&str> = rest.split('/').collect();
    let Some(b) = parts[0].parse::<u64>().ok().filter(|&b| valid_user(b)) else {
        return error(
            "400 Bad Request",
            "a business id is a user id from 1 to 2^63-1",
        );
    };
    let op = match (method, &parts[1..]) {
        ("PUT", []) => parse::<PutBody>(body).map(|p| AdminOp::Put {
            display_name: p.display_name,
            profile: p.profile,
        }),
        ("GET", []) => Ok(AdminOp::Get),
        ("POST", ["verify"]) => parse::<VerifyBody>(body).map(|v| AdminOp::Verify {
            verified: v.verified,
            reason: v.reason,
        }),
        ("POST", ["limits"]) => parse::<LimitsBody>(body).map(|l| AdminOp::Limits {
            tier: l.tier,
            messages_per_sec: l.messages_per_sec,
        }),
        ("GET", ["templates"]) => Ok(AdminOp::Templates),
        ("PUT", ["templates", name]) => {
            parse::<TemplateDef>(body).map(|def| AdminOp::PutTemplate {
                name: name.to_string(),
                def,
            })
        }
        ("POST", ["templates", name, "status"]) => {
            parse::<StatusBody>(body).map(|s| AdminOp::SetTemplateStatus {
                name: name.to_string(),
                status: s.status,
                reason: s.reason,
            })
        }
        ("POST", ["consent"]) => parse::<ConsentBody>(body).map(|c| AdminOp::Consent {
            customer: c.customer,
            entry: ConsentEntry {
                at_ms: 0,
                action: c.action,
                purpose: c.purpose,
                source: c.source,
                text_version: c.text_version,
                text: c.text,
                language: c.language,
            },
        }),
        ("GET", ["consent", customer]) => match customer.parse() {
            Ok(customer) => Ok(AdminOp::ConsentOf { customer }),
            Err(_) => Err(error("400 Bad Request", "a customer is a user id")),
        },
        ("POST", ["erase", customer]) => match customer.parse() {
            Ok(customer) => Ok(AdminOp::Erase { customer }),
            Err(_) => Err(error("400 Bad Request", "a customer is a user id")),
        },
        ("GET", ["export"]) => Ok(AdminOp::Export { customer: None }),
        ("GET", ["export", customer]) => match customer.parse() {
            Ok(customer) => Ok(AdminOp::Export {
                customer: Some(customer),
            }),
            Err(_) => Err(error("400 Bad Request", "a customer is a user id")),
        },
        ("GET", ["events", rest @ ..]) => events_op(rest),
        ("GET", ["messages", id]) => match id.parse() {
            Ok(message) => Ok(AdminOp::MessageStatus {
                message,
                customer: None,
            }),
            Err(_) => Err(error("400 Bad Request", "a message is a client message id")),
        },
        ("GET", ["messages", id, customer]) => match (id.parse(), customer.parse()) {
            (Ok(message), Ok(customer)) => Ok(AdminOp::MessageStatus {
                message,
                customer: Some(customer),
            }),
            _ => Err(error(
                "400 Bad Request",
                "messages/<client message id>/<customer>",
            )),
        },
        ("POST", ["messages", id, customer, "converted"]) => match (id.parse(), customer.parse()) {
            (Ok(message), Ok(customer)) => Ok(AdminOp::Convert { message, customer }),
            _ => Err(error(
                "400 Bad Request",
                "messages/<client message id>/<customer>/converted",
            )),
        },
        ("GET", ["engagement"]) => Ok(AdminOp::Engagement),
        ("GET" | "PUT", ["labels", customer]) => match customer.parse::<u64>() {
            Ok(customer) if method == "GET" => Ok(AdminOp::Labels {
                customer,
                labels: None,
            }),
            Ok(customer) => parse::<LabelsBody>(body).map(|l| AdminOp::Labels {
                customer,
                labels: Some(l.labels),
            }),
            Err(_) => Err(error("400 Bad Request", "a customer is a user id")),
        },
        ("PUT", ["time_zone"]) => parse::<TimeZoneBody>(body).map(|t| AdminOp::TimeZone {
            utc_offset_minutes: t.utc_offset_minutes,
        }),
        ("GET", ["stats", period]) => match Period::parse(period) {
            Some(period) => Ok(AdminOp::Stats { period }),
            None => Err((
                "400 Bad Request",
                json!({ "error": "a period is half_hour, day or month", "code": "period_invalid" }),
            )),
        },
        ("PUT", ["webhook"]) => parse::<WebhookBody>(body).map(|w| AdminOp::SetWebhook {
            url: w.url,
            secret: w.secret,
        }),
        ("GET", ["webhook"]) => Ok(AdminOp::Webhook),
        ("POST", ["campaigns"]) => {
            parse::<CampaignDef>(body).map(|d| AdminOp::CreateCampaign(Box::new(d)))
        }
        ("GET", ["campaigns"]) => Ok(AdminOp::Campaigns),
        ("GET", ["campaigns", id]) => campaign_id(id).map(|id| AdminOp::Campaign { id }),
        ("POST", ["campaigns", id, action @ ("pause" | "resume" | "cancel")]) => campaign_id(id)
            .map(|id| AdminOp::ControlCampaign {
                id,
                action: match *action {
                    "pause" => "pause",
                    "resume" => "resume",
                    _ => "cancel",
                },
            }),
        ("POST", ["campaigns", id, customer, "converted"]) => {
            match (campaign_id(id), customer.parse()) {
                (Ok(id), Ok(customer)) => Ok(AdminOp::Convert {
                    message: crate::state::campaigns::message_id(id),
                    customer,
                }),
                (Err(e), _) => Err(e),
                (_, Err(_)) => Err(error("400 Bad Request", "a customer is a user id")),
            }
        }
        ("GET" | "PUT" | "POST", _) => Err(error("404 Not Found", "no such business request")),
        _ => Err(error("405 Method Not Allowed", "method not allowed")),
    };
    let op = match op {
        Ok(op) => op,
        Err(answer) => return answer,
    };
    match ask(node, b, op).await {
        Some(Ok(v)) => ("200 OK", v),
        Some(Err(Invalid {
            status,
            code,
            message,
        })) => (
            match status {
                400 => "400 Bad Request",
                404 => "404 Not Found",
                421 => "421 Misdirected Request",
                503 => "503 Service Unavailable",
                _ => "500 Internal Server Error",
            },
            json!({ "error": message, "code": code }),
        ),
        None => error("503 Service Unavailable", "the node is stopping"),
    }
}

/// The statistics rows as CSV, one line per row, the columns of the JSON
/// (a hidden figure stays `< 5`; failures as `code:n` joined by `;`).
pub(crate) fn stats_csv(rows: &[serde_json::Value]) -> String {
    const COLUMNS: [&str; 16] = [
        "start_ms",
        "template",
        "language",
        "campaign",
        "variant",
        "accepted",
        "sent",
        "delivered",
        "read",
        "clicked",
        "converted",
        "failed",
        "delivery_rate",
        "read_rate",
        "click_through_rate",
        "conversion_rate",
    ];
    let cell = |v: &serde_json::Value| -> String {
        let text = match v {
            serde_json::Value::Null => String::new(),
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Object(m) => m
                .iter()
                .map(|(k, v)| format!("{k}:{}", v.as_str().map_or(v.to_string(), str::to_owned)))
                .collect::<Vec<_>>()
                .join(";"),
            other => other.to_string(),
        };
        if text.contains([',', '"', '\n']) {
            format!("\"{}\"", text.replace('"', "\"\""))
        } else {
            text
        }
    };
    let mut out = COLUMNS.join(",");
    out.push('\n');
    for r in rows {
        let line: Vec<String> = COLUMNS.iter().map(|c| cell(&r[*c])).collect();
        out.push_str(&line.join(","));
        out.push('\n');
    }
    out
}

/// Asks business `b`'s shard; `None` if the node is stopping.
pub(crate) async fn ask(
    node: &Node,
    b: u64,
    op: AdminOp,
) -> Option<Result<serde_json::Value, Invalid>> {
    let (tx, rx) = oneshot::channel();
    let cmd = ShardCmd::BusinessAdmin(BusinessAdminCmd {
        business: b,
        op,
        answer: tx,
    });
    if !node.shards.send(b, cmd).await {
        return None;
    }
    rx.await.ok()
}

//! The business dashboard on the HTTP (admin) port: one page
//! (`dashboard.html`: HTML, CSS and a small script, no library, charts
//! drawn as SVG by the script) and the one JSON request it polls.
//!
//! - `GET /dashboard`: the page. It asks for a business's token (the one
//!   its clients sign in with, `courier token --user <business id>`), keeps it in
//!   the tab's session storage, and sends it as `Authorization: Bearer`.
//! - `GET /dashboard/api[?after=<seq>]`: the signed-in business's
//!   campaigns, engagement and events (the latest 20, or at most 50 after
//!   `after`), all as the admin API reports them, "< 5" included. A token
//!   names one user: a business sees only its own figures; a token that is
//!   not a business's is refused (403), and a business another cluster
//!   node serves is answered 421, as the admin API does.

use std::sync::Arc;

use serde_json::{json, Value};

use crate::business_api::ask;
use crate::node::Node;
use crate::shard::messages::AdminOp;
use crate::state::ids::valid_user;

/// The page.
pub(crate) const PAGE: &str = include_str!("dashboard.html");

/// Events the feed starts with, and reads at most per poll.
const FEED_FIRST: u64 = 20;
const FEED_MAX: usize = 50;

/// `GET /dashboard/api`: (status line, JSON body).
pub(crate) async fn api(
    node: &Arc<Node>,
    bearer: Option<&str>,
    query: &str,
) -> (&'static str, Value) {
    let Some(token) = bearer else {
        return (
            "401 Unauthorized",
            json!({ "error": "sign in with the business's token (Authorization: Bearer)" }),
        );
    };
    let claims = match node
        .key
        .verify_any(token.as_bytes(), node.clock.now_ms() / 1000)
    {
        Ok(c) if valid_user(c.user_id) => c,
        Ok(_) => {
            return (
                "403 Forbidden",
                json!({ "error": "not a business's token" }),
            )
        }
        Err(e) => {
            return (
                "403 Forbidden",
                json!({ "error": format!("not a valid token: {e}") }),
            )
        }
    };
    let b = claims.user_id;
    let after = query
        .split('&')
        .find_map(|kv| kv.strip_prefix("after="))
        .map(|v| v.parse::<u64>());
    let after = match after {
        None => None,
        Some(Ok(a)) => Some(a),
        Some(Err(_)) => {
            return (
                "400 Bad Request",
                json!({ "error": "after is a sequence number" }),
            )
        }
    };
    let campaigns = match answer(node, b, AdminOp::Campaigns).await {
        Ok(v) => v,
        Err(e) => return e,
    };
    let engagement = match answer(node, b, AdminOp::Engagement).await {
        Ok(v) => v,
        Err(e) => return e,
    };
    let after = match after {
        Some(a) => a,
        None => match answer(node, b, AdminOp::Webhook).await {
            Ok(w) => w["last_event"]
                .as_u64()
                .unwrap_or(0)
                .saturating_sub(FEED_FIRST),
            Err(e) => return e,
        },
    };
    let events = match answer(
        node,
        b,
        AdminOp::Events {
            after,
            limit: FEED_MAX,
        },
    )
    .await
    {
        Ok(v) => v,
        Err(e) => return e,
    };
    (
        "200 OK",
        json!({
            "business": b,
            "campaigns": campaigns["campaigns"],
            "engagement": engagement,
            "events": events["events"],
            "last": events["last"],
        }),
    )
}

/// One request to business `b`'s shard, its refusal as an answer.
async fn answer(node: &Node, b: u64, op: AdminOp) -> Result<Value, (&'static str, Value)> {
    match ask(node, b, op).await {
        Some(Ok(v)) => Ok(v),
        Some(Err(e)) => Err((
            match e.status {
                404 => "403 Forbidden",
                421 => "421 Misdirected Request",
                503 => "503 Service Unavailable",
                _ => "500 Internal Server Error",
            },
            json!({ "error": if e.status == 404 { format!("user {b} is not a business") } else { e.message }, "code": e.code }),
        )),
        None => Err((
            "503 Service Unavailable",
            json!({ "error": "the node is stopping" }),
        )),
    }
}

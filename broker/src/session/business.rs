//! `Business`: a customer's request about a business (its profile, block,
//! report, opt-in and opt-out, its templates), answered by the business's
//! shard with `BusinessInfo` (or `TemplatePack`); and `EventFetch`, a
//! business reading its own events (`EventList`).

use courier_protocol::{Body, BusinessRequest, ErrorCode};

use super::reader::Reader;
use crate::shard::messages::ShardCmd;
use crate::shard::messages::{AdminOp, BusinessAskCmd};
use crate::state::ids::valid_user;

impl Reader {
    pub(super) async fn business(&mut self, rid: u32, request: BusinessRequest) -> bool {
        let b = request.business;
        if !valid_user(b) || b == self.user {
            self.error(
                rid,
                ErrorCode::INVALID_REQUEST,
                "the business is another user's id",
            );
            return true;
        }
        let customer = self.user;
        let answer = self
            .ask(b, |answer| {
                ShardCmd::BusinessAsk(BusinessAskCmd {
                    customer,
                    request,
                    answer,
                })
            })
            .await;
        self.answer(rid, answer, |body| body)
    }

    /// The session's business's events after `after`, at most `limit`.
    pub(super) async fn events(&mut self, rid: u32, after: u64, limit: u16) -> bool {
        if !self.node.businesses.contains(self.user) {
            self.error(rid, ErrorCode::NOT_A_BUSINESS, "only a business has events");
            return true;
        }
        if !(1..=1000).contains(&limit) {
            self.error(rid, ErrorCode::INVALID_REQUEST, "limit is 1 to 1000");
            return true;
        }
        let op = AdminOp::Events {
            after,
            limit: usize::from(limit),
        };
        match crate::business_api::ask(&self.node, self.user, op).await {
            None => false,
            Some(Ok(v)) => {
                let json = v["events"].to_string();
                let last = v["last"].as_u64().unwrap_or(0);
                self.reply(rid, Body::EventList { last, json });
                true
            }
            Some(Err(e)) => {
                let code = match e.status {
                    421 | 503 => ErrorCode::SHARD_UNAVAILABLE,
                    404 => ErrorCode::NOT_A_BUSINESS,
                    _ => ErrorCode::INTERNAL,
                };
                self.error(rid, code, e.message);
                true
            }
        }
    }
}

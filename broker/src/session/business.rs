//! `Business`: a customer's request about a business (its profile, block,
//! report, opt-in and opt-out, its templates), answered by the business's
//! shard with `BusinessInfo` (or `TemplatePack`).

use courier_protocol::{BusinessRequest, ErrorCode};

use super::reader::Reader;
use crate::shard::messages::BusinessAskCmd;
use crate::shard::messages::ShardCmd;
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
}

//! `Group` (create, change, leave, info) and `ReceiptQuery`, answered by the
//! group's shard.

use courier_protocol::error::with_retry_after;
use courier_protocol::{Body, ErrorCode, GroupOp, GroupRequest};

use super::reader::Reader;
use crate::cluster::route::RETRY_AFTER_MS;
use crate::shard::messages::{GroupOpCmd, ReceiptQueryCmd, ShardCmd};
use crate::state::ids::is_group;

impl Reader {
    pub(super) async fn group(&mut self, rid: u32, g: GroupRequest) -> bool {
        let group = if g.op == GroupOp::Create {
            if g.group != 0 {
                self.error(rid, ErrorCode::INVALID_REQUEST, "create with group 0");
                return true;
            }
            match self.node.new_group_id() {
                Some(id) => id,
                None => {
                    let message = with_retry_after(
                        RETRY_AFTER_MS,
                        "this cluster node holds no shard yet (the map is not read)",
                    );
                    self.error(rid, ErrorCode::SHARD_UNAVAILABLE, message);
                    return true;
                }
            }
        } else if !is_group(g.group) {
            self.error(rid, ErrorCode::INVALID_REQUEST, "not a group id");
            return true;
        } else {
            g.group
        };
        let actor = self.user;
        let answer = self
            .ask(group, |answer| {
                ShardCmd::GroupOp(GroupOpCmd {
                    group,
                    actor,
                    op: g.op,
                    users: g.users,
                    answer,
                })
            })
            .await;
        self.answer(rid, answer, Body::GroupInfo)
    }

    pub(super) async fn receipt_query(&mut self, rid: u32, group: u64, seq: u64) -> bool {
        let asker = self.user;
        let answer = self
            .ask(group, |answer| {
                ShardCmd::ReceiptQuery(ReceiptQueryCmd {
                    group,
                    seq,
                    asker,
                    answer,
                })
            })
            .await;
        self.answer(rid, answer, Body::ReceiptCounts)
    }
}

//! `Ack` and `Mark`: delivered and read marks, applied by the user's shard.

use courier_protocol::{ErrorCode, Mark, ReceiptStatus};

use super::reader::Reader;
use crate::shard::messages::{MarkCmd, ShardCmd};
use crate::state::ids::is_stream;

impl Reader {
    /// Everything up to `up_to_seq` of the inbox is delivered.
    pub(super) async fn ack(&mut self, up_to_seq: u64) -> bool {
        let user = self.user;
        let cmd = ShardCmd::Mark(MarkCmd {
            user,
            stream: 0,
            up_to_seq,
            status: ReceiptStatus::Delivered,
        });
        self.node.shards.send(user, cmd).await
    }

    /// Delivered or read, on the inbox (stream 0) or a group's stream.
    pub(super) async fn mark(&mut self, rid: u32, m: Mark) -> bool {
        if !is_stream(m.stream) || m.status == ReceiptStatus::Viewed {
            self.error(
                rid,
                ErrorCode::INVALID_REQUEST,
                "mark a stream (0 or a group) delivered or read; views use StatusView",
            );
            return true;
        }
        let user = self.user;
        let cmd = ShardCmd::Mark(MarkCmd {
            user,
            stream: m.stream,
            up_to_seq: m.up_to_seq,
            status: m.status,
        });
        self.node.shards.send(user, cmd).await
    }
}

//! `Fetch`: a page of the session's own inbox, read from the store.

use courier_protocol::{Body, ErrorCode, Fetch, FetchReply, HEADER_LEN, MESSAGE_FIXED_LEN};

use super::reader::Reader;
use crate::state::message::to_wire;

/// Messages per `FetchReply` at most.
const FETCH_LIMIT_MAX: usize = 1024;

impl Reader {
    pub(super) async fn fetch(&mut self, rid: u32, f: Fetch) -> bool {
        if f.user_id != self.user {
            self.error(
                rid,
                ErrorCode::FORBIDDEN,
                "a session reads only its own inbox",
            );
            return true;
        }
        let user = self.user;
        let limit = (f.limit as usize).min(FETCH_LIMIT_MAX);
        let budget = self.node.config.limits.max_frame_len as usize - 64;
        let r = self
            .blocking(move |store| {
                let state = store.state(user)?;
                let mut messages = Vec::new();
                let mut size = HEADER_LEN + 2 + 16;
                for m in store.read_after(user, f.after_seq, limit)? {
                    let m = to_wire(m)?;
                    size += MESSAGE_FIXED_LEN + m.payload.len();
                    if size > budget {
                        break;
                    }
                    messages.push(m);
                }
                Ok(FetchReply {
                    head_seq: state.head_seq,
                    oldest_seq: state.oldest_seq,
                    messages,
                })
            })
            .await;
        self.answer(rid, r, Body::FetchReply)
    }
}

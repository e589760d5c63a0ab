//! One log-strategy group as a session reads it.

use courier_protocol::{GroupEvent, GroupEventKind, Message, MessageKind};

pub(crate) struct GroupStream {
    /// Highest group sequence handed to the socket (or queued).
    pub delivered: u64,
    /// Last group sequence this user may see (`NONE` while a member).
    pub end: u64,
}

impl GroupStream {
    /// Takes `m` as the next message of the stream; false if it is not for
    /// this user (its own message, or past the end). Ends the stream at the
    /// event that removed the user.
    pub fn take(&mut self, user: u64, m: &Message) -> bool {
        self.delivered = m.seq;
        if m.kind == MessageKind::System {
            if let Ok(ev) = GroupEvent::decode(&m.payload) {
                if matches!(ev.kind, GroupEventKind::Removed | GroupEventKind::Left)
                    && ev.users.contains(&user)
                {
                    self.end = m.seq;
                }
            }
            return true;
        }
        m.sender != user
    }
}

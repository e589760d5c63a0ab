//! Ids and their kinds. Users and groups share one 64-bit space: a group id
//! has the top bit (`GROUP_ID_BIT`) set, a user id has it clear and is not
//! 0 (user 0 is the admin identity no session can take).

use courier_protocol::GROUP_ID_BIT;

/// "None" in stored sequence fields (still a member, not on the log strategy).
pub const NONE: u64 = u64::MAX;

/// A user id that may have a session or be a member (not 0, not a group id).
pub fn valid_user(u: u64) -> bool {
    u != 0 && u & GROUP_ID_BIT == 0
}

/// A group id (top bit set).
pub fn is_group(id: u64) -> bool {
    id & GROUP_ID_BIT != 0
}

/// A mark names a stream: 0 for the user's inbox, or a group's log.
pub fn is_stream(id: u64) -> bool {
    id == 0 || is_group(id)
}

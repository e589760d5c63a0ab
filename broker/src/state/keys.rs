//! Key layouts of the broker's state in the store's key-value spaces. One
//! leading byte names the table; ids are big-endian so a prefix is a range.
//! The values are the row types of [`super::rows`].
//!
//! | key                         | value ([`super::rows`])                  | written by |
//! |-----------------------------|------------------------------------------|------------|
//! | `G` group                   | [`GroupState`](super::rows::GroupState)  | group's shard |
//! | `F` group                   | [`FanMark`](super::rows::FanMark): refs fan-out done up to | group's shard |
//! | `U` user . group            | [`MemberRow`](super::rows::MemberRow): joined . left . log_from | group's shard |
//! | `C` group . user            | [`Cursors`](super::rows::Cursors): delivered . read (group seqs) | user's shard |
//! | `R` user                    | [`ReceiptRow`](super::rows::ReceiptRow): delivered . read (inbox seqs receipted) . emitted | user's shard |
//! | `O` user . emission         | [`OutboxRow`](super::rows::OutboxRow): a receipt not yet durable at its sender | user's shard |
//! | `K` user . contact          | empty                                    | user's session |
//! | `L` user . list             | [`UserList`](super::rows::UserList): count u16 . users | user's session |
//! | expiring `S` poster . expires_at . status_id | [`StatusRow`](super::rows::StatusRow): posted_at . audience . users . payload | poster's session |

fn key(tag: u8, ids: &[u64]) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + 8 * ids.len());
    k.push(tag);
    for id in ids {
        k.extend_from_slice(&id.to_be_bytes());
    }
    k
}

pub fn group(g: u64) -> Vec<u8> {
    key(b'G', &[g])
}
pub fn fanned(g: u64) -> Vec<u8> {
    key(b'F', &[g])
}
pub fn fanned_prefix() -> Vec<u8> {
    vec![b'F']
}
pub fn user_group(user: u64, g: u64) -> Vec<u8> {
    key(b'U', &[user, g])
}
pub fn user_groups(user: u64) -> Vec<u8> {
    key(b'U', &[user])
}
pub fn cursor(g: u64, user: u64) -> Vec<u8> {
    key(b'C', &[g, user])
}
pub fn cursors(g: u64) -> Vec<u8> {
    key(b'C', &[g])
}
pub fn receipts(user: u64) -> Vec<u8> {
    key(b'R', &[user])
}
pub fn outbox(reader: u64, emission: u64) -> Vec<u8> {
    key(b'O', &[reader, emission])
}
pub fn outbox_prefix() -> Vec<u8> {
    vec![b'O']
}
pub fn contact(user: u64, contact: u64) -> Vec<u8> {
    key(b'K', &[user, contact])
}
pub fn contacts(user: u64) -> Vec<u8> {
    key(b'K', &[user])
}
pub fn list(user: u64, list: u64) -> Vec<u8> {
    key(b'L', &[user, list])
}
pub fn status(poster: u64, expires_at_ms: u64, id: u64) -> Vec<u8> {
    key(b'S', &[poster, expires_at_ms, id])
}
pub fn statuses(poster: u64) -> Vec<u8> {
    key(b'S', &[poster])
}

/// The last id of a key (the group of a `U` row, the user of a `C` row...).
pub fn last_id(k: &[u8]) -> Option<u64> {
    k.len().checked_sub(8).and_then(|at| be_u64(k, at))
}

/// A big-endian u64 at `at`, if the bytes are there.
pub(crate) fn be_u64(v: &[u8], at: usize) -> Option<u64> {
    v.get(at..at + 8)
        .map(|b| u64::from_be_bytes(b.try_into().expect("8 bytes")))
}

//! Which shard owns an id.

use std::collections::BTreeMap;

/// The shard that owns `user` (or group), out of `shards`.
pub fn shard_of(user: u64, shards: usize) -> usize {
    // Fibonacci hashing: sequential ids spread evenly.
    ((user.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) % shards as u64) as usize
}

/// Groups `users` by the shard that owns them.
pub fn by_shard(users: impl IntoIterator<Item = u64>, shards: usize) -> BTreeMap<usize, Vec<u64>> {
    let mut out: BTreeMap<usize, Vec<u64>> = BTreeMap::new();
    for u in users {
        out.entry(shard_of(u, shards)).or_default().push(u);
    }
    out
}

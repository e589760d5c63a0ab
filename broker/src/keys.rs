//! Key layouts of the broker's state in the store's key-value spaces. One
//! leading byte names the table; ids are big-endian so a prefix is a range.
//!
//! | key                         | value                                    | written by |
//! |-----------------------------|------------------------------------------|------------|
//! | `G` group                   | [`GroupState`] encoding                  | group's shard |
//! | `F` group                   | fanned_upto u64 (refs fan-out done up to) | group's shard |
//! | `U` user . group            | joined u64 . left u64 . log_from u64     | group's shard |
//! | `C` group . user            | delivered u64 . read u64 (group seqs)    | user's shard |
//! | `R` user                    | delivered u64 . read u64 (inbox seqs receipted) | user's shard |
//! | `K` user . contact          | empty                                    | user's session |
//! | `L` user . list             | count u16 . users                        | user's session |
//! | expiring `S` poster . expires_at . status_id | posted_at u64 . audience u8 . users . payload | poster's session |

use courier_protocol::{Role, Strategy};

pub const NONE: u64 = u64::MAX;

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

pub fn be_u64(v: &[u8], at: usize) -> Option<u64> {
    v.get(at..at + 8)
        .map(|b| u64::from_be_bytes(b.try_into().expect("8 bytes")))
}

pub fn last_u64(k: &[u8]) -> Option<u64> {
    k.len().checked_sub(8).and_then(|at| be_u64(k, at))
}

pub fn pair(a: u64, b: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(16);
    v.extend_from_slice(&a.to_be_bytes());
    v.extend_from_slice(&b.to_be_bytes());
    v
}

pub fn encode_users(users: &[u64]) -> Vec<u8> {
    let mut v = Vec::with_capacity(2 + 8 * users.len());
    v.extend_from_slice(&(users.len() as u16).to_be_bytes());
    for u in users {
        v.extend_from_slice(&u.to_be_bytes());
    }
    v
}

/// Users and the number of bytes they took; `None` if malformed.
pub fn decode_users(v: &[u8]) -> Option<(Vec<u64>, usize)> {
    let n = u16::from_be_bytes(v.get(..2)?.try_into().ok()?) as usize;
    let end = 2 + 8 * n;
    if v.len() < end {
        return None;
    }
    Some((
        (0..n)
            .map(|i| be_u64(v, 2 + 8 * i).expect("in range"))
            .collect(),
        end,
    ))
}

/// One member of a group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Member {
    pub user: u64,
    pub role: Role,
    /// Group log sequence of the event that added the member.
    pub joined_seq: u64,
}

/// A group as stored under `G`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupState {
    pub strategy: Strategy,
    /// First group sequence delivered by the log strategy (`NONE` while refs).
    pub log_from: u64,
    /// Members in join order.
    pub members: Vec<Member>,
}

impl GroupState {
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(11 + 17 * self.members.len());
        v.push(self.strategy as u8);
        v.extend_from_slice(&self.log_from.to_be_bytes());
        v.extend_from_slice(&(self.members.len() as u16).to_be_bytes());
        for m in &self.members {
            v.extend_from_slice(&m.user.to_be_bytes());
            v.push(m.role as u8);
            v.extend_from_slice(&m.joined_seq.to_be_bytes());
        }
        v
    }

    pub fn decode(v: &[u8]) -> Option<GroupState> {
        let strategy = Strategy::from_u8(*v.first()?)?;
        let log_from = be_u64(v, 1)?;
        let n = u16::from_be_bytes(v.get(9..11)?.try_into().ok()?) as usize;
        if v.len() != 11 + 17 * n {
            return None;
        }
        let mut members = Vec::with_capacity(n);
        for i in 0..n {
            let at = 11 + 17 * i;
            members.push(Member {
                user: be_u64(v, at)?,
                role: Role::from_u8(v[at + 8])?,
                joined_seq: be_u64(v, at + 9)?,
            });
        }
        Some(GroupState {
            strategy,
            log_from,
            members,
        })
    }

    pub fn member(&self, user: u64) -> Option<&Member> {
        self.members.iter().find(|m| m.user == user)
    }

    pub fn is_admin(&self, user: u64) -> bool {
        self.member(user).is_some_and(|m| m.role == Role::Admin)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_state_round_trips_and_rejects_truncation() {
        let g = GroupState {
            strategy: Strategy::Log,
            log_from: 9,
            members: vec![
                Member {
                    user: 1,
                    role: Role::Admin,
                    joined_seq: 1,
                },
                Member {
                    user: 2,
                    role: Role::Member,
                    joined_seq: 3,
                },
            ],
        };
        let v = g.encode();
        assert_eq!(GroupState::decode(&v), Some(g));
        assert_eq!(GroupState::decode(&v[..v.len() - 1]), None);
        assert_eq!(decode_users(&encode_users(&[5, 6])), Some((vec![5, 6], 18)));
    }
}

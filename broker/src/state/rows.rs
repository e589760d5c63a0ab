//! Every value the broker stores, as a type with its encoding next to its
//! decoding. Decoding never trusts a length: a value that is short, long or
//! names an unknown enum value decodes to `None`, and the caller reports it
//! as corrupt (or, for cursors, treats it as "nothing yet", which at worst
//! repeats an idempotent receipt). Keys are in [`super::keys`].

use bytes::Bytes;
use courier_protocol::{Audience, Role, Strategy};
use courier_storage::StoreError;

use super::ids::NONE;
use super::keys::be_u64;

/// A decoding failure, reported as corrupt data (never served).
pub fn corrupt(what: &'static str, detail: impl Into<String>) -> StoreError {
    StoreError::Corrupt {
        what,
        detail: detail.into(),
    }
}

/// Reads a binary row front to back: each field is `None` past the end,
/// so a short row fails where it is short, never with a panic.
pub struct Fields<'a>(&'a [u8]);

impl<'a> Fields<'a> {
    pub fn new(v: &'a [u8]) -> Fields<'a> {
        Fields(v)
    }

    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, rest) = self.0.split_at_checked(n)?;
        self.0 = rest;
        Some(head)
    }

    pub fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }

    pub fn u16(&mut self) -> Option<u16> {
        Some(u16::from_be_bytes(self.take(2)?.try_into().ok()?))
    }

    pub fn u64(&mut self) -> Option<u64> {
        Some(u64::from_be_bytes(self.take(8)?.try_into().ok()?))
    }

    /// A string written by [`put_str`].
    pub fn str(&mut self) -> Option<String> {
        let n = usize::from(self.u16()?);
        Some(std::str::from_utf8(self.take(n)?).ok()?.to_owned())
    }

    /// `Some` when every byte was read (a row with bytes to spare is corrupt).
    pub fn end(self) -> Option<()> {
        self.0.is_empty().then_some(())
    }
}

/// Writes `s` as its length (u16) and bytes; [`Fields::str`] reads it.
/// Longer strings are cut at 65,535 bytes (names here are far shorter).
pub fn put_str(v: &mut Vec<u8>, s: &str) {
    let mut n = s.len().min(usize::from(u16::MAX));
    while !s.is_char_boundary(n) {
        n -= 1;
    }
    v.extend_from_slice(&(n as u16).to_be_bytes());
    v.extend_from_slice(&s.as_bytes()[..n]);
}

/// One member of a group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Member {
    pub user: u64,
    pub role: Role,
    /// Group log sequence of the event that added the member.
    pub joined_seq: u64,
}

/// `G` group: the group as its shard sees it.
/// Layout: strategy u8 . log_from u64 . count u16 . count x (user u64 . role u8 . joined_seq u64).
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

/// `U` user . group: one user's membership of one group, as the user's
/// sessions need it to read the group's log.
/// Layout: joined u64 . left u64 . log_from u64 (24 bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemberRow {
    /// Group sequence of the event that added the user.
    pub joined: u64,
    /// Group sequence of the event that removed the user (`NONE` while a member).
    pub left: u64,
    /// First group sequence on the log strategy (`NONE` while refs).
    pub log_from: u64,
}

impl MemberRow {
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(24);
        v.extend_from_slice(&self.joined.to_be_bytes());
        v.extend_from_slice(&self.left.to_be_bytes());
        v.extend_from_slice(&self.log_from.to_be_bytes());
        v
    }

    pub fn decode(v: &[u8]) -> Option<MemberRow> {
        Some(MemberRow {
            joined: be_u64(v, 0)?,
            left: be_u64(v, 8)?,
            log_from: be_u64(v, 16)?,
        })
    }

    /// Still a member (counts toward `groups.max_per_user`).
    pub fn is_current(&self) -> bool {
        self.left == NONE
    }
}

/// `C` group . user and `R` user: how far a user's delivered and read
/// receipts have gone (group sequences for `C`, inbox sequences for `R`).
/// Layout: delivered u64 . read u64 (16 bytes).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cursors {
    pub delivered: u64,
    pub read: u64,
}

impl Cursors {
    pub fn new(delivered: u64, read: u64) -> Cursors {
        Cursors { delivered, read }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(16);
        v.extend_from_slice(&self.delivered.to_be_bytes());
        v.extend_from_slice(&self.read.to_be_bytes());
        v
    }

    /// Missing halves read as 0 ("nothing receipted yet").
    pub fn decode(v: &[u8]) -> Cursors {
        Cursors {
            delivered: be_u64(v, 0).unwrap_or(0),
            read: be_u64(v, 8).unwrap_or(0),
        }
    }

    /// Moved forward by a mark up to `seq` (read implies delivered).
    pub fn advanced(self, seq: u64, read: bool) -> Cursors {
        let r = if read { self.read.max(seq) } else { self.read };
        Cursors {
            delivered: self.delivered.max(seq).max(r),
            read: r,
        }
    }
}

/// `R` user: how far the user's receipts have been planned, and how many
/// receipt emissions (outbox entries) were ever planned for the user.
/// Layout: delivered u64 . read u64 . emitted u64 (24 bytes; a 16-byte row
/// from before emissions were counted reads as `emitted` 0).
///
/// The row moves in the same atomic write as the outbox entries (`O` rows)
/// of the mark that moved it, so a mark's range is receipted once: after a
/// crash either both are there (the outbox is re-sent, its keys absorb the
/// repeat) or neither (the next mark covers the range again).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReceiptRow {
    pub cursors: Cursors,
    /// Emission numbers handed out so far; the next is `emitted + 1`. Each
    /// one is the receipt's client message id, unique for the reader.
    pub emitted: u64,
}

impl ReceiptRow {
    pub fn encode(&self) -> Vec<u8> {
        let mut v = self.cursors.encode();
        v.extend_from_slice(&self.emitted.to_be_bytes());
        v
    }

    /// Missing parts read as 0 (nothing receipted, nothing emitted yet).
    pub fn decode(v: &[u8]) -> ReceiptRow {
        ReceiptRow {
            cursors: Cursors::decode(v),
            emitted: be_u64(v, 16).unwrap_or(0),
        }
    }
}

/// `O` reader . emission: one receipt message planned and not yet known to
/// be durable in the original sender's inbox. Deleted once it is.
/// Layout: sender u64 . receipt payload (the wire `ReceiptPayload`) .
/// covers u64. A row from before `covers` (the payload alone) reads as
/// covers 0: the two lengths never agree, since a payload is 11 + 16n bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutboxRow {
    /// The original sender: whose inbox the receipt goes to.
    pub sender: u64,
    pub payload: Bytes,
    /// The highest reader-inbox sequence of the one-to-one messages the
    /// receipt names (what a sender who takes receipts as facts is told);
    /// 0 for broadcast copies, which stay receipt messages.
    pub covers: u64,
}

impl OutboxRow {
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(16 + self.payload.len());
        v.extend_from_slice(&self.sender.to_be_bytes());
        v.extend_from_slice(&self.payload);
        v.extend_from_slice(&self.covers.to_be_bytes());
        v
    }

    /// `None` for a value too short to name a sender or whose payload is not
    /// a receipt.
    pub fn decode(v: &[u8]) -> Option<OutboxRow> {
        let sender = be_u64(v, 0)?;
        let rest = &v[8..];
        let (payload, covers) = match courier_protocol::ReceiptPayload::decode(rest) {
            Ok(_) => (rest, 0),
            Err(_) => {
                let at = rest.len().checked_sub(8)?;
                courier_protocol::ReceiptPayload::decode(&rest[..at]).ok()?;
                (&rest[..at], be_u64(rest, at)?)
            }
        };
        Some(OutboxRow {
            sender,
            payload: Bytes::copy_from_slice(payload),
            covers,
        })
    }
}

/// `D` sender . reader: what `reader` has done with `sender`'s one-to-one
/// messages, for a sender who takes receipts as facts: the reader-inbox
/// sequences delivered and read (moved as the `R` row's cursors are) and
/// `version`, the sender's counter when the row last changed.
/// Layout: delivered u64 . read u64 . version u64.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FactRow {
    pub cursors: Cursors,
    pub version: u64,
}

impl FactRow {
    pub fn encode(&self) -> Vec<u8> {
        let mut v = self.cursors.encode();
        v.extend_from_slice(&self.version.to_be_bytes());
        v
    }

    pub fn decode(v: &[u8]) -> Result<FactRow, StoreError> {
        match be_u64(v, 16) {
            Some(version) if v.len() == 24 => Ok(FactRow {
                cursors: Cursors::decode(v),
                version,
            }),
            _ => Err(corrupt("receipt fact row", format!("{} bytes", v.len()))),
        }
    }

    /// The row as the protocol tells it to the sender.
    pub fn fact(&self, reader: u64) -> courier_protocol::ReceiptFact {
        courier_protocol::ReceiptFact {
            reader,
            delivered: self.cursors.delivered,
            read: self.cursors.read,
            version: self.version,
        }
    }
}

/// `F` group: reference fan-out is complete up to this group sequence.
/// Layout: u64.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FanMark(pub u64);

impl FanMark {
    pub fn encode(&self) -> Vec<u8> {
        self.0.to_be_bytes().to_vec()
    }

    /// A short value reads as 0: everything is fanned out again, which the
    /// references' idempotency keys absorb.
    pub fn decode(v: &[u8]) -> FanMark {
        FanMark(be_u64(v, 0).unwrap_or(0))
    }
}

/// A list of users (`L` rows, and inside a [`StatusRow`]).
/// Layout: count u16 . count x user u64.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserList(pub Vec<u64>);

impl UserList {
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(2 + 8 * self.0.len());
        self.encode_into(&mut v);
        v
    }

    fn encode_into(&self, v: &mut Vec<u8>) {
        v.extend_from_slice(&(self.0.len() as u16).to_be_bytes());
        for u in &self.0 {
            v.extend_from_slice(&u.to_be_bytes());
        }
    }

    /// The list and the number of bytes it took; `None` if short.
    pub fn decode_prefix(v: &[u8]) -> Option<(UserList, usize)> {
        let n = u16::from_be_bytes(v.get(..2)?.try_into().ok()?) as usize;
        let end = 2 + 8 * n;
        if v.len() < end {
            return None;
        }
        let users = (0..n)
            .map(|i| be_u64(v, 2 + 8 * i).expect("in range"))
            .collect();
        Some((UserList(users), end))
    }

    pub fn decode(v: &[u8]) -> Option<UserList> {
        Self::decode_prefix(v).map(|(l, _)| l)
    }
}

/// Expiring `S` poster . expires_at . status_id: one status post.
/// Layout: posted_at u64 . audience u8 . users ([`UserList`]) . payload (the rest).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StatusRow {
    pub posted_at_ms: u64,
    pub audience: Audience,
    pub users: Vec<u64>,
    pub payload: Bytes,
}

impl StatusRow {
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(9 + 2 + 8 * self.users.len() + self.payload.len());
        v.extend_from_slice(&self.posted_at_ms.to_be_bytes());
        v.push(self.audience as u8);
        UserList(self.users.clone()).encode_into(&mut v);
        v.extend_from_slice(&self.payload);
        v
    }

    pub fn decode(v: &[u8]) -> Option<StatusRow> {
        let posted_at_ms = be_u64(v, 0)?;
        let audience = Audience::from_u8(*v.get(8)?)?;
        let (users, used) = UserList::decode_prefix(v.get(9..)?)?;
        Some(StatusRow {
            posted_at_ms,
            audience,
            users: users.0,
            payload: Bytes::copy_from_slice(&v[9 + used..]),
        })
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
        let users = UserList(vec![5, 6]);
        assert_eq!(UserList::decode_prefix(&users.encode()), Some((users, 18)));
    }

    #[test]
    fn rows_round_trip_and_short_values_are_refused() {
        let row = MemberRow {
            joined: 3,
            left: NONE,
            log_from: 7,
        };
        assert_eq!(MemberRow::decode(&row.encode()), Some(row));
        assert_eq!(MemberRow::decode(&row.encode()[..23]), None);
        assert!(row.is_current());
        let c = Cursors::new(9, 4);
        assert_eq!(Cursors::decode(&c.encode()), c);
        assert_eq!(Cursors::decode(&[]), Cursors::default());
        assert_eq!(Cursors::new(2, 0).advanced(5, true), Cursors::new(5, 5));
        assert_eq!(Cursors::new(8, 1).advanced(5, false), Cursors::new(8, 1));
        assert_eq!(FanMark::decode(&FanMark(12).encode()), FanMark(12));
        let s = StatusRow {
            posted_at_ms: 1,
            audience: Audience::Only,
            users: vec![4, 5],
            payload: Bytes::from_static(b"sunset"),
        };
        assert_eq!(StatusRow::decode(&s.encode()), Some(s.clone()));
        assert_eq!(StatusRow::decode(&s.encode()[..12]), None);
        assert_eq!(UserList::decode(&[0, 2, 0]), None);
    }

    #[test]
    fn receipt_rows_round_trip_and_read_the_older_layout() {
        let r = ReceiptRow {
            cursors: Cursors::new(9, 4),
            emitted: 17,
        };
        assert_eq!(ReceiptRow::decode(&r.encode()), r);
        // A row written before emissions were counted.
        let old = ReceiptRow::decode(&Cursors::new(9, 4).encode());
        assert_eq!((old.cursors, old.emitted), (Cursors::new(9, 4), 0));
        let o = OutboxRow {
            sender: 5,
            payload: courier_protocol::ReceiptPayload {
                status: courier_protocol::ReceiptStatus::Read,
                reader: 6,
                messages: vec![(1, 2)],
            }
            .encode(),
            covers: 46,
        };
        assert_eq!(OutboxRow::decode(&o.encode()), Some(o.clone()));
        assert_eq!(OutboxRow::decode(&o.encode()[..7]), None);
        assert_eq!(OutboxRow::decode(&o.encode()[..20]), None);
        assert_eq!(OutboxRow::decode(&o.encode()[..40]), None);
        // A row written before `covers`: the sender and the payload.
        let before = o.encode()[..o.encode().len() - 8].to_vec();
        let read = OutboxRow::decode(&before).expect("the older layout");
        assert_eq!((read.payload, read.covers), (o.payload, 0));
    }

    #[test]
    fn fact_rows_round_trip_and_refuse_other_lengths() {
        let f = FactRow {
            cursors: Cursors::new(9, 4),
            version: 12,
        };
        assert_eq!(FactRow::decode(&f.encode()).unwrap(), f);
        assert!(FactRow::decode(&f.encode()[..23]).is_err());
        assert!(FactRow::decode(&[f.encode(), vec![0]].concat()).is_err());
        let told = f.fact(7);
        assert_eq!(
            (told.reader, told.delivered, told.read, told.version),
            (7, 9, 4, 12)
        );
        // A receipt moves the row's cursors as a mark moves a member's:
        // only forward, read implying delivered.
        let c = f.cursors;
        assert_eq!(c.advanced(5, false), c, "a lower delivered changes nothing");
        assert_eq!(c.advanced(11, false), Cursors::new(11, 4));
        assert_eq!(
            c.advanced(11, true),
            Cursors::new(11, 11),
            "read implies delivered"
        );
        assert_eq!(c.advanced(6, true), Cursors::new(9, 6));
    }
}

//! Replication's requests and answers as bytes on a link (layouts in
//! `cluster/wire.rs`).

use super::*;

/// Every replication request starts `op u8 | shard u32 | epoch i64`.
pub(super) struct Head {
    pub(super) op: u8,
    pub(super) shard: u32,
    pub(super) epoch: i64,
}

impl Head {
    pub(super) fn decode(b: &mut Bytes) -> Result<Head, WireError> {
        wire::need(b, 13)?;
        Ok(Head {
            op: b.get_u8(),
            shard: b.get_u32(),
            epoch: b.get_i64(),
        })
    }
}

/// A replication request, after its head (layouts in `wire.rs`).
pub(super) enum Request<'a> {
    Replicate {
        lsn: u64,
        entries: &'a [RawEntry],
    },
    Follow,
    Chunk {
        from: &'a Option<(Space, Vec<u8>)>,
    },
    Status {
        applied: u64,
        /// Which following of the copy this is (the primary's id for it).
        follower: u64,
    },
}

impl Request<'_> {
    pub(super) fn encode(&self, shard: u32, epoch: i64) -> Bytes {
        let mut out = BytesMut::with_capacity(64);
        let op = match self {
            Request::Replicate { .. } => wire::REPLICATE,
            Request::Follow => wire::REPL_FOLLOW,
            Request::Chunk { .. } => wire::REPL_CHUNK,
            Request::Status { .. } => wire::REPL_STATUS,
        };
        out.put_u8(op);
        out.put_u32(shard);
        out.put_i64(epoch);
        match self {
            Request::Replicate { lsn, entries } => {
                out.put_u64(*lsn);
                put_entries(&mut out, entries);
            }
            Request::Follow => {}
            Request::Chunk { from } => put_at(&mut out, from),
            Request::Status { applied, follower } => {
                out.put_u64(*applied);
                out.put_u64(*follower);
            }
        }
        out.freeze()
    }
}

/// A replication answer: `0 | what the request asked` or `1 | why
/// (u16 length, UTF-8)`.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Answer {
    Done(Bytes),
    Refused(String),
}

impl Answer {
    pub(super) fn encode(&self) -> Bytes {
        let mut out = BytesMut::new();
        match self {
            Answer::Done(b) => {
                out.put_u8(0);
                out.put_slice(b);
            }
            Answer::Refused(why) => {
                out.put_u8(1);
                wire::put_text(&mut out, why);
            }
        }
        out.freeze()
    }

    pub(super) fn decode(mut b: Bytes) -> Result<Answer, WireError> {
        wire::need(&b, 1)?;
        match b.get_u8() {
            0 => Ok(Answer::Done(b)),
            1 => Ok(Answer::Refused(wire::get_text(&mut b)?)),
            v => Err(WireError::UnknownOp(v)),
        }
    }

    pub(super) fn done(self) -> anyhow::Result<Bytes> {
        match self {
            Answer::Done(b) => Ok(b),
            Answer::Refused(why) => anyhow::bail!("the primary refused: {why}"),
        }
    }
}

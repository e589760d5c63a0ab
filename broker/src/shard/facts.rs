//! Receipts as facts, on the sender's shard.
//!
//! A user whose session asked for facts (`Hello` flags bit 1) is switched
//! for good (`I` row). From then on a receipt of one-to-one messages that
//! reaches the user's shard from a reader's outbox is not stored as a
//! message in the user's inbox: it moves the user's `D` row for that
//! reader (the highest reader-inbox sequences delivered and read) by
//! maximum, and the row takes the user's next version. The row goes in the
//! batch's synced write; once that is durable the receipt is answered (the
//! reader's outbox row goes) and the fact is pushed to the user's sessions,
//! which never acknowledge it: a session that missed one reads the `D`
//! rows after the last version it sent (see `session::catch_up`).
//!
//! A repeat (the outbox sends a row again after a crash) moves nothing and
//! writes nothing, so no idempotency entry is needed. Broadcast copies and
//! status views stay receipt messages: their sender knows no inbox
//! sequence to compare with. So do a business's receipts: its list sends
//! and campaigns reach customers as one-to-one messages whose sequences it
//! is not told (its statuses and events come from the same receipts).
//!
//! Versions are per user and never reused: the `I` row holds a ceiling the
//! shard may give versions up to, raised by `VERSIONS_RESERVED` in the same
//! write as the first fact beyond it. After a restart (or a cache miss) the
//! next version is above the ceiling, so versions jump once; a session sees
//! the jump as a gap and reads the rows.

use courier_protocol::{ErrorCode, ReceiptFact, ReceiptStatus, SendResult};
use courier_storage::{slot_of, KvOp, StoreError};
use tracing::{error, warn};

use super::core::Shard;
use super::facts_state::{Versions, VERSIONS_RESERVED};
use super::messages::{failed, unavailable, Delivery, SendCmd};
use super::tracking::{Batch, Planned};
use crate::state::keys;
use crate::state::keys::be_u64;
use crate::state::rows::FactRow;

/// A receipt's status, from its payload's first byte.
fn status_of(payload: &[u8]) -> Option<ReceiptStatus> {
    payload.first().and_then(|b| ReceiptStatus::from_u8(*b))
}

impl Shard {
    /// Whether receipt `s` is to become a fact: a receipt of one-to-one
    /// messages from an outbox, to a user who takes facts and is not a
    /// business.
    pub(crate) fn is_fact(&mut self, s: &SendCmd) -> Result<bool, StoreError> {
        if s.covers_seq == 0
            || self.is_business(s.recipient)
            || !matches!(
                status_of(&s.payload),
                Some(ReceiptStatus::Delivered | ReceiptStatus::Read)
            )
        {
            return Ok(false);
        }
        Ok(self.versions(s.recipient)?.is_some())
    }

    /// `user`'s versions if it takes facts, read from its `I` row on first
    /// use.
    fn versions(&mut self, user: u64) -> Result<Option<Versions>, StoreError> {
        if let Some(v) = self.facts.users.get(&user) {
            return Ok(*v);
        }
        let v = self.store.get(&keys::facts_on(user))?.map(|row| {
            // Every version given out is at most the ceiling: the next
            // one is above it.
            let ceiling = be_u64(&row, 0).unwrap_or(0);
            Versions {
                last: ceiling,
                ceiling,
            }
        });
        self.facts.users.insert(user, v);
        Ok(v)
    }

    /// Switches `user` to facts (its session asked); no-op if it is.
    pub(crate) fn switch_to_facts(&mut self, user: u64) -> Result<(), StoreError> {
        if self.versions(user)?.is_some() {
            return Ok(());
        }
        self.facts.users.insert(user, Some(Versions::default()));
        self.kv.push(KvOp::Put {
            key: keys::facts_on(user),
            value: 0u64.to_be_bytes().to_vec(),
        });
        Ok(())
    }

    /// The next version of `user` (which takes facts); raises the ceiling
    /// in this write when it is reached.
    fn next_version(&mut self, user: u64) -> u64 {
        let v = self
            .facts
            .users
            .get_mut(&user)
            .and_then(Option::as_mut)
            .expect("a user who takes facts, read by is_fact");
        v.last += 1;
        let next = v.last;
        if next > v.ceiling {
            v.ceiling = next + VERSIONS_RESERVED - 1;
            let ceiling = v.ceiling;
            self.kv.push(KvOp::Put {
                key: keys::facts_on(user),
                value: ceiling.to_be_bytes().to_vec(),
            });
        }
        next
    }

    fn fact_row(&mut self, sender: u64, reader: u64) -> Result<FactRow, StoreError> {
        if let Some(r) = self.facts.rows.get(&(sender, reader)) {
            return Ok(*r);
        }
        let row = match self.store.get(&keys::fact(sender, reader))? {
            Some(v) => FactRow::decode(&v)?,
            None => FactRow::default(),
        };
        self.facts.rows.insert((sender, reader), row);
        Ok(row)
    }

    /// Plans receipt `s` (to a user who takes facts) as a move of the
    /// user's row for the reader; answered once the batch is written.
    pub(crate) fn plan_fact(&mut self, s: SendCmd, batch: &mut Batch) {
        let (sender, reader) = (s.recipient, s.sender);
        let old = match self.fact_row(sender, reader) {
            Ok(r) => r,
            Err(e) => {
                error!(shard = self.id, sender, reader, error = %e, "reading a receipt fact failed");
                self.send_answered(&s, false);
                let result = failed(s.client_msg_id, ErrorCode::INTERNAL);
                return self.complete(s.done, result, false);
            }
        };
        let read = status_of(&s.payload) == Some(ReceiptStatus::Read);
        let cursors = old.cursors.advanced(s.covers_seq, read);
        let fact = (cursors != old.cursors).then(|| {
            let new = FactRow {
                cursors,
                version: self.next_version(sender),
            };
            self.facts.rows.insert((sender, reader), new);
            self.kv.push(KvOp::Put {
                key: keys::fact(sender, reader),
                value: new.encode(),
            });
            new.fact(reader)
        });
        batch.plan.push(Planned::Fact(s, fact));
    }

    /// A planned fact's write succeeded: the receipt is answered and the
    /// fact pushed. If the sender's slot stopped being served meanwhile, the
    /// write may have dropped the row: the receipt is refused (retryable)
    /// and comes again, to whoever serves the slot.
    pub(crate) fn finish_fact(&mut self, s: SendCmd, fact: Option<ReceiptFact>) {
        let served = self
            .store
            .transfer()
            .is_none_or(|t| t.serves(slot_of(s.recipient)));
        if !served {
            warn!(
                shard = self.id,
                sender = s.recipient,
                "a receipt fact's slot stopped being served; refused for its retry"
            );
            self.send_answered(&s, true);
            return self.complete(s.done, unavailable(s.client_msg_id), false);
        }
        self.send_answered(&s, false);
        let result = SendResult {
            client_msg_id: s.client_msg_id,
            code: ErrorCode::OK,
            server_msg_id: 0,
            seq: 0,
            timestamp_ms: self.now_ms(),
            duplicate: fact.is_none(),
        };
        self.complete(s.done, result, true);
        if let Some(f) = fact {
            self.stats.receipt_facts.inc();
            self.push(s.recipient, Delivery::Fact(f), s.accepted);
        }
    }
}

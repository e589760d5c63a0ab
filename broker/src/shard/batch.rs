//! A batch's one storage write, and what each planned command gets once it
//! has an outcome: its answer, its pushes, its part's report.

use std::sync::Arc;
use std::time::Instant;

use courier_protocol::{ErrorCode, Message, SendResult};
use courier_storage::{AppendOutcome, NewMessage, StoredMessage};
use tracing::{debug, error, warn};

use super::core::Shard;
use super::messages::{failed, Completion, Delivery, ShardCmd};
use super::tracking::{Batch, Planned};
use crate::error::BrokerError;

impl Shard {
    /// Writes the planned appends (and pending key-value writes) in one
    /// storage write, then answers and pushes.
    pub(crate) fn write_batch(&mut self, batch: &mut Batch) {
        // Rows the business facts changed go with the events they wrote.
        self.flush_counts();
        if batch.appends.is_empty() && self.kv.is_empty() {
            for p in batch.plan.drain(..) {
                self.finish(p, &mut std::iter::empty());
            }
            return;
        }
        let kv = std::mem::take(&mut self.kv);
        let started = Instant::now();
        let written = self.store.append_with(&batch.appends, &kv, self.now_ms());
        self.stats
            .write_seconds
            .observe(started.elapsed().as_secs_f64());
        self.stats.write_batch.observe(batch.appends.len() as f64);
        if !kv.is_empty() {
            self.kv_written(written.is_ok());
        }
        match written {
            Ok(outcomes) => {
                let mut it = batch.appends.drain(..).zip(outcomes);
                for p in batch.plan.drain(..) {
                    self.finish(p, &mut it);
                }
            }
            Err(e) => {
                let inboxes: Vec<u64> = batch.appends.iter().map(|m| m.inbox).take(16).collect();
                error!(shard = self.id, error = %e, count = batch.appends.len(), ?inboxes, "storage append failed; rejecting the batch");
                self.stats.storage_errors.inc();
                batch.appends.clear();
                // A full disk is told as such (the client retries later);
                // anything else is an internal error.
                let code = BrokerError::from(e).code();
                // Planning a send changes no cached group state (only a
                // membership change does, after its own write succeeded), so
                // the caches, and the fan-outs they track, stay valid.
                for p in batch.plan.drain(..) {
                    self.reject(p, code);
                }
            }
        }
    }

    /// Writes pending key-value writes on their own (marks, receipt cursors).
    pub(crate) fn write_kv(&mut self) {
        self.flush_counts();
        if self.kv.is_empty() {
            return;
        }
        let kv = std::mem::take(&mut self.kv);
        // Cursors, fan-out marks and the receipt outbox: losing the last of
        // them in a power failure loses nothing acknowledged. Receipts are
        // sent only after their outbox rows are written, and each is stored
        // with a synced write that comes later in the same log, so a receipt
        // that survives has its outbox row and `R` row with it.
        let written = self.store.write_lazy(&kv);
        if let Err(e) = &written {
            warn!(shard = self.id, error = %e, "writing cursors failed");
        }
        self.kv_written(written.is_ok());
    }

    /// Answers a planned command whose write failed with `code`. A
    /// retryable refusal keeps the command's place in its conversation's
    /// line here (see `lines`).
    fn reject(&mut self, p: Planned, code: ErrorCode) {
        let retryable = code == ErrorCode::SHARD_UNAVAILABLE;
        match p {
            Planned::Send(s) => {
                self.marketing_done(&s, false);
                self.send_answered(&s, retryable);
                let result = failed(s.client_msg_id, code);
                self.complete(s.done, result, false);
            }
            Planned::Refs(r, _) => {
                for &member in &r.members {
                    self.entry_answered(r.group, member, r.message.seq, retryable);
                }
                self.report_refs(r.report, r.group, r.message.seq, code)
            }
            Planned::GroupSend { cmd, .. } => {
                self.group_send_answered(&cmd, retryable);
                cmd.reply.send(failed(cmd.client_msg_id, code))
            }
            Planned::Fact(s, _) => {
                self.send_answered(&s, retryable);
                self.complete(s.done, failed(s.client_msg_id, code), false);
            }
        }
    }

    fn finish(
        &mut self,
        p: Planned,
        outcomes: &mut dyn Iterator<Item = (NewMessage, AppendOutcome)>,
    ) {
        match p {
            Planned::Send(s) => {
                let (m, outcome) = outcomes.next().expect("one outcome per send");
                self.finish_send(s, m, outcome);
            }
            Planned::Refs(r, held) => {
                let mut code = if held {
                    ErrorCode::SHARD_UNAVAILABLE
                } else {
                    ErrorCode::OK
                };
                for _ in 0..r.members.len() {
                    let (m, outcome) = outcomes.next().expect("one outcome per reference");
                    let refused = outcome == AppendOutcome::NotServed;
                    self.entry_answered(r.group, m.inbox, r.message.seq, refused);
                    debug!(
                        shard = self.id,
                        group = r.group,
                        entry = r.message.seq,
                        inbox = m.inbox,
                        ?outcome,
                        "reference answered"
                    );
                    match outcome {
                        AppendOutcome::Stored(p) => {
                            self.stats.refs_stored.inc();
                            self.remember(
                                m.inbox,
                                &StoredMessage {
                                    seq: p.seq,
                                    record: m.record,
                                    via: m.form.via(),
                                },
                            );
                            let msg = Message {
                                seq: p.seq,
                                ..(*r.message).clone()
                            };
                            self.push(m.inbox, Delivery::Inbox(Arc::new(msg)), r.accepted);
                        }
                        AppendOutcome::Duplicate(_) => {}
                        AppendOutcome::Conflict => {
                            error!(shard = self.id, group = r.group, "reference key conflict")
                        }
                        // A member's shard is moving away: the part fails
                        // and is fanned out again (to its new owner).
                        AppendOutcome::NotServed => code = ErrorCode::SHARD_UNAVAILABLE,
                    }
                }
                self.report_refs(r.report, r.group, r.message.seq, code);
            }
            Planned::GroupSend { cmd, recipients } => {
                let (m, outcome) = outcomes.next().expect("one outcome per group send");
                self.finish_group_send(cmd, recipients, m, outcome);
            }
            Planned::Fact(s, fact) => self.finish_fact(s, fact),
        }
    }

    /// Delivers an outcome to whoever waits for it.
    pub(crate) fn complete(&mut self, done: Completion, result: SendResult, stored: bool) {
        complete(done, result, stored, |key, cmd| self.to_peer(key, cmd));
    }
}

/// Delivers a send's outcome to whoever waits for it: `to_peer` queues a
/// part's outcome on the shard that waits (a shard's own peer queues, or a
/// node's when the outcome came back over a link).
pub(crate) fn complete(
    done: Completion,
    result: SendResult,
    stored: bool,
    to_peer: impl FnOnce(u64, ShardCmd),
) {
    let ok = result.code == ErrorCode::OK;
    match done {
        Completion::Reply(r) => r.send(result),
        Completion::Copy {
            sender,
            token,
            recipient,
        } => to_peer(
            sender,
            ShardCmd::CopyDone {
                sender,
                token,
                recipient,
                result,
                stored,
            },
        ),
        Completion::Receipt { reader, emission } => to_peer(
            reader,
            ShardCmd::ReceiptPartDone {
                reader,
                emission,
                ok,
            },
        ),
        Completion::Stored(answer) => {
            let _ = answer.send(if ok {
                Ok(())
            } else if result.code == ErrorCode::SHARD_UNAVAILABLE {
                Err(BrokerError::refused(
                    result.code,
                    "the poster's node is out of reach",
                ))
            } else {
                Err(BrokerError::refused(ErrorCode::INTERNAL, "storage error"))
            });
        }
        Completion::Remote(answer) => {
            let _ = answer.send((result, stored));
        }
    }
}

//! `Send` and `SendBatch`: checked here, sequenced and stored by the
//! destination's shard (the recipient's, the group's, or for a broadcast
//! list the sender's, which plans the copies).

use std::time::Instant;

use courier_protocol::{Destination, ErrorCode, MessageKind, Send};
use tokio::sync::{oneshot, TryAcquireError};

use super::reader::Reader;
use crate::error::{refuse, BrokerResult};
use crate::shard::handle::Queued;
use crate::shard::messages::BusinessSendCmd;
use crate::shard::messages::{
    failed, BroadcastCmd, Completion, GroupReply, GroupSendCmd, Reply, ReplyTo, SendCmd, ShardCmd,
};
use crate::state::ids::{is_group, valid_user};

impl Reader {
    /// A single send; false when the node is stopping.
    pub(super) async fn send(&mut self, rid: u32, s: Send) -> bool {
        match self.validate(&s).and_then(|d| self.may_send().map(|_| d)) {
            Ok(_) => self.dispatch(s, rid, None).await,
            Err(e) => {
                self.node.metrics.rejected(e.code());
                self.failed(rid, &e);
                true
            }
        }
    }

    /// A batch of sends, answered with one `SendBatchAck` (the writer
    /// collects the results); broadcast lists are not batched.
    pub(super) async fn send_batch(&mut self, rid: u32, sends: Vec<Send>) -> bool {
        let max = self.node.config.limits.max_batch;
        if sends.len() > max as usize {
            let message = format!("{} items; at most {max}", sends.len());
            self.error(rid, ErrorCode::BATCH_TOO_LARGE, message);
            return true;
        }
        let start = Reply::BatchStart {
            request_id: rid,
            count: sends.len() as u16,
        };
        let _ = self.replies.send(start);
        for (i, s) in sends.into_iter().enumerate() {
            let index = Some(i as u16);
            let checked = self
                .validate(&s)
                .and_then(|d| match d {
                    Destination::List(_) => refuse(
                        ErrorCode::DESTINATION_UNSUPPORTED,
                        "broadcast lists are sent with Send",
                    ),
                    d => Ok(d),
                })
                .and_then(|d| self.may_send().map(|_| d));
            let sent = match checked {
                Ok(_) => self.dispatch(s, rid, index).await,
                Err(e) => {
                    self.reject_item(rid, index, s.client_msg_id, e.code())
                        .await
                }
            };
            if !sent {
                return false;
            }
        }
        true
    }

    /// Answers one refused item of a batch in its slot.
    async fn reject_item(
        &self,
        rid: u32,
        index: Option<u16>,
        client_msg_id: u64,
        code: ErrorCode,
    ) -> bool {
        // The writer returns a permit per result: take one.
        match self.inflight.acquire().await {
            Ok(p) => p.forget(),
            Err(_) => return false,
        }
        let _ = self.replies.send(Reply::SendResult {
            request_id: rid,
            index,
            result: failed(client_msg_id, code),
        });
        true
    }

    /// Whether a valid send may go on: the disk has room
    /// (`storage.min_free_mb`, else `STORAGE_FULL`), and one send is taken
    /// from the connection's and the user's budgets
    /// (`limits.sends_per_connection_per_sec`, `limits.sends_per_user_per_sec`;
    /// over either: `SEND_RATE_LIMITED`). A refused send is not stored; the
    /// connection stays open.
    fn may_send(&mut self) -> BrokerResult<()> {
        if self
            .node
            .disk_full
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            return refuse(
                ErrorCode::STORAGE_FULL,
                "the node's disk is full; retry later",
            );
        }
        let limits = &self.node.config.limits;
        let now_ms = self.node.clock.now_ms();
        let per_connection = limits.sends_per_connection_per_sec;
        if !self.send_bucket.take(per_connection, now_ms) {
            let why = format!("more than {per_connection} sends per second on this connection");
            return refuse(ErrorCode::SEND_RATE_LIMITED, why);
        }
        if !self.node.send_rates.take(self.user, now_ms) {
            let per_user = limits.sends_per_user_per_sec;
            let why = format!("more than {per_user} sends per second from this user");
            return refuse(ErrorCode::SEND_RATE_LIMITED, why);
        }
        Ok(())
    }

    /// Checks a send and says where it goes.
    fn validate(&self, s: &Send) -> BrokerResult<Destination> {
        match s.destination {
            Destination::User(id) if !valid_user(id) => {
                return refuse(
                    ErrorCode::INVALID_DESTINATION,
                    format!("{id:#x} is not a user id"),
                )
            }
            Destination::Group(id) if !is_group(id) => {
                return refuse(
                    ErrorCode::INVALID_DESTINATION,
                    format!("{id:#x} is not a group id"),
                )
            }
            Destination::List(0) => return refuse(ErrorCode::INVALID_DESTINATION, "list id 0"),
            _ => {}
        }
        if !matches!(s.kind, MessageKind::Chat | MessageKind::Template) {
            return refuse(
                ErrorCode::KIND_NOT_ALLOWED,
                format!("kind {:?} is not sent with Send", s.kind),
            );
        }
        if s.kind == MessageKind::Template
            && !matches!(s.destination, Destination::Group(_))
            && !self.node.businesses.contains(self.user)
        {
            return refuse(
                ErrorCode::KIND_NOT_ALLOWED,
                "template messages to a user or a list come from businesses",
            );
        }
        let max = self.node.config.limits.max_payload_len as usize;
        if s.payload.len() > max {
            return refuse(
                ErrorCode::PAYLOAD_TOO_LARGE,
                format!("payload of {} bytes exceeds {max}", s.payload.len()),
            );
        }
        Ok(s.destination)
    }

    /// Takes an in-flight permit and queues the send on the shard that owns
    /// its destination; resolves to false if the shards have stopped.
    ///
    /// Done at the call when a permit and room on the queue are free (the
    /// usual case); only a wait for either, or a broadcast (which waits for
    /// its plan), is a future of its own, boxed (see `Shards::send`).
    fn dispatch(&self, s: Send, request_id: u32, index: Option<u16>) -> Queued<'_> {
        match self.inflight.try_acquire() {
            // The permit is returned by the writer when the result is written.
            Ok(permit) => {
                permit.forget();
                self.queue(s, request_id, index)
            }
            Err(TryAcquireError::Closed) => Queued::Now(false),
            Err(TryAcquireError::NoPermits) => Queued::Waiting(Box::pin(async move {
                match self.inflight.acquire().await {
                    Ok(permit) => permit.forget(),
                    Err(_) => return false,
                }
                self.queue(s, request_id, index).await
            })),
        }
    }

    /// Queues a send whose permit is taken (given back if the shard has
    /// stopped).
    fn queue(&self, s: Send, request_id: u32, index: Option<u16>) -> Queued<'_> {
        let reply = ReplyTo::new(self.replies.clone(), request_id, index);
        let accepted = Instant::now();
        let (key, cmd) = match s.destination {
            // A business's messages pass its rules on its own shard first.
            Destination::User(customer) if self.node.businesses.contains(self.user) => {
                return Queued::Waiting(Box::pin(self.business_send(s, customer, reply, accepted)))
            }
            Destination::User(recipient) => (
                recipient,
                ShardCmd::Send(SendCmd {
                    sender: self.user,
                    sender_device: self.device,
                    recipient,
                    client_msg_id: s.client_msg_id,
                    destination: s.destination,
                    scope: 0,
                    kind: s.kind,
                    payload: s.payload,
                    covers_seq: 0,
                    done: Completion::Reply(reply),
                    accepted,
                }),
            ),
            Destination::Group(group) => (
                group,
                ShardCmd::GroupSend(GroupSendCmd {
                    group,
                    sender: self.user,
                    sender_device: self.device,
                    client_msg_id: s.client_msg_id,
                    kind: s.kind,
                    payload: s.payload,
                    reply: GroupReply::Session(reply),
                    accepted,
                }),
            ),
            Destination::List(list) => {
                return Queued::Waiting(Box::pin(self.broadcast(s, list, reply)))
            }
        };
        let give_back = |queued: bool| {
            if !queued {
                self.inflight.add_permits(1);
            }
            queued
        };
        match self.node.shards.send(key, cmd) {
            Queued::Now(queued) => Queued::Now(give_back(queued)),
            Queued::Waiting(wait) => {
                Queued::Waiting(Box::pin(async move { give_back(wait.await) }))
            }
        }
    }

    /// A business's send: its shard checks the rules (consent, window,
    /// template, tier, rates) and answers a refusal itself, or gives back
    /// the message to queue on the customer's shard, which this session
    /// does in order, as for its other sends.
    async fn business_send(
        &self,
        s: Send,
        customer: u64,
        reply: ReplyTo,
        accepted: Instant,
    ) -> bool {
        let (tx, rx) = oneshot::channel();
        let cmd = ShardCmd::BusinessSend(BusinessSendCmd {
            business: self.user,
            device: self.device,
            customer,
            client_msg_id: s.client_msg_id,
            kind: s.kind,
            payload: s.payload,
            reply,
            accepted,
            admitted: tx,
        });
        if !self.node.shards.send(self.user, cmd).await {
            return false;
        }
        match rx.await {
            Ok(Some(send)) => self.node.shards.send(customer, ShardCmd::Send(send)).await,
            Ok(None) => true,
            Err(_) => false,
        }
    }

    /// A send to a broadcast list: the sender's shard plans the copies and
    /// answers once all are durable; this session queues them on the
    /// recipients' shards in order (so they keep their place among the
    /// session's later sends), waiting where a queue is full. Holds the
    /// permit `dispatch` took until the answer is written.
    async fn broadcast(&self, s: Send, list: u64, reply: ReplyTo) -> bool {
        let (tx, rx) = oneshot::channel();
        let plan = ShardCmd::Broadcast(BroadcastCmd {
            sender: self.user,
            sender_device: self.device,
            list,
            client_msg_id: s.client_msg_id,
            kind: s.kind,
            payload: s.payload,
            reply,
            copies: tx,
        });
        if !self.node.shards.send(self.user, plan).await {
            return false;
        }
        let Ok(copies) = rx.await else {
            return false;
        };
        for copy in copies {
            let recipient = copy.recipient;
            if !self.node.shards.send(recipient, ShardCmd::Send(copy)).await {
                return false;
            }
        }
        true
    }
}

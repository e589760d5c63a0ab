//! The shards: one writer per shard.
//!
//! Users (and groups) are partitioned over shards by a hash of their id. A
//! shard owns its users' inboxes (it is their only writer), their live
//! sessions, and its groups' logs. Everyone else talks to it in the
//! vocabulary of [`messages`], through its bounded command queue (sessions)
//! or its peer queue (other shards), so the network path and, later, a
//! remote node can feed it unchanged.
//!
//! - [`messages`]: every command, reply and delivery (plain data);
//! - [`handle`]: `Shards`, the node's handle (start, queue, stop);
//! - [`route`]: which shard owns an id;
//! - `core`: a shard's state, its loop and its one dispatch;
//! - `tracking`: the batch being planned and the fan-outs it waits for;
//! - `batch`: the batch's storage write and each command's outcome;
//! - `inbox`: one-to-one appends, live pushes, sessions, trimming;
//! - `lines`: a conversation's order through this shard's retryable refusals;
//! - `groups`: group sends, membership changes, receipt counts;
//! - `fanout`: references, log pushes and broadcast lists, with recovery;
//! - `business`, `business_state`: business rules on the business's shard, and what it keeps;
//! - `business_events`: the statuses of a business's messages and their events;
//! - `receipts`: marks, receipt messages and status views;
//! - `facts`, `facts_state`: receipts as facts, on the sender's shard, and what it keeps;
//! - `recent`: online users' latest inbox entries and what marks of them owe.

mod batch;
pub mod business;
mod business_events;
pub mod business_state;
mod campaigns;
mod core;
mod facts;
mod facts_state;
mod fanout;
mod groups;
pub mod handle;
mod inbox;
mod lines;
pub mod messages;
mod receipts;
mod recent;
pub mod route;
mod tracking;

pub use self::core::{ClickLinks, Remote, ShardConfig};

#[cfg(test)]
mod tests;

//! Courier's broker: the `courier` server.
//!
//! A client connection is a session ([`session`]): it authenticates
//! ([`auth`]), then its reader turns each request into a command for the
//! shard that owns the destination ([`shard`]). A shard is the single
//! writer of its users' inboxes and its groups' logs in the store
//! (`courier-storage`), plans every fan-out, and pushes what it stored to
//! the recipients' live sessions. The map, from the bottom up:
//!
//! - [`net`]: the two network paths (epoll, io_uring) behind one socket
//!   seam; imports nothing from sessions or shards;
//! - [`state`]: every stored row as a type, the key layouts, ids and their
//!   kinds, store-to-wire conversions, contacts/lists/statuses;
//! - [`error`]: the broker's error type, mapped to protocol codes at the
//!   session edge;
//! - [`shard`]: the message vocabulary ([`shard::messages`]), the shard
//!   loop, and one file per domain a shard runs (inbox, groups, receipts,
//!   fan-out);
//! - [`session`]: handshake, reader with one dispatch, one handler per
//!   request kind, writer and catch-up;
//! - [`cluster`]: membership, the controller and the shard map on etcd
//!   (a node started with a cluster name);
//! - the node: [`config`], [`metrics`], [`auth`], [`certs`] (the client
//!   port's TLS configuration, reloaded on SIGHUP), [`gate`] (admission:
//!   connection, unauthenticated and per-source budgets), [`node`] (what
//!   every connection shares), [`server`] (start, accept loops, shutdown),
//!   [`admin`] (health, metrics, admin API), [`webhooks`] (businesses'
//!   events posted to their endpoints), [`reports`] (long read-only admin
//!   reports, off the shard threads) and [`cli`].
//!
//! [`fuzzing`] holds the fuzz targets (stored rows, the session state
//! machine against an in-process node) that `fuzz/` and the tests drive.
//!
//! `docs/ARCHITECTURE.md` draws the whole data flow.

pub mod admin;
pub mod auth;
pub mod business_api;
pub mod certs;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod dashboard;
pub mod error;
pub mod fuzzing;
pub mod gate;
pub mod mailbox;
pub mod metrics;
pub mod net;
pub mod node;
pub mod reports;
pub mod server;
pub mod session;
pub mod shard;
pub mod state;
pub mod webhooks;

//! Courier's load generator, as a library (the `courier-loadtest` binary is
//! a command line over it; the broker's tests run it in-process).
//!
//! Map, in the order a run uses it:
//! - [`options`]: the target, the scenario and the load's shape;
//! - [`plan`]: who sends where (routes, groups, lists) and the numbering of
//!   each sender's messages;
//! - [`stamp`]: the stamp at the start of every payload (conversation,
//!   number, intended send time);
//! - `driver`: a Courier or relay user as one loop over its raw session
//!   (acknowledges what it reads like a phone, marks a share read, counts
//!   the receipts it gets; one thread per core);
//! - `endpoint`: setting up groups and lists; a user's connection where
//!   users are tasks (the peer brokers, whose wire clients are in
//!   [`peers`]; Courier users that reconnect);
//! - `pacer`: when each message is meant to go (open or closed loop);
//! - `tally`: the shared counters and each task's per-second tally;
//! - [`run`]: connects, runs the senders and receivers, drains, checks;
//! - [`report`]: the figures, the timeline and the summary;
//! - scenarios beyond send-and-receive: `session` (a user that reconnects,
//!   retries and resumes: the reconnect scenario and `--chaos-kill`),
//!   [`idle`] (idle connections);
//! - [`checker`]: the end-of-run correctness check (loss, duplicates, order,
//!   receipts);
//! - [`stages`]: the node's stage histograms over the run (where the
//!   milliseconds go);
//! - [`latency`]: HDR histograms, percentiles and the per-second timeline;
//! - [`table`]: the side-by-side Markdown table of several runs; [`svg`]:
//!   the run's report as a self-contained SVG;
//! - [`relay`]: a storage-free relay speaking the protocol (the machine's
//!   ceiling, and with faults the checker's test double);
//! - [`server`]: the server under test as a process (memory, chaos kills);
//!   [`fds`]: open-file limits and loopback source addresses.

pub mod checker;
mod driver;
mod endpoint;
pub mod fds;
pub mod idle;
pub mod latency;
pub mod options;
mod pacer;
pub mod peers;
mod plan;
pub mod relay;
pub mod report;
pub mod run;
pub mod server;
mod session;
pub mod stages;
pub mod stamp;
pub mod svg;
pub mod table;
mod tally;

pub use checker::{Checker, Verdict};
pub use options::{Acks, Options, Receipts, Scenario, Target};
pub use report::Report;
pub use run::run;

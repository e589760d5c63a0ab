//! Courier's load generator, as a library (the `courier-loadtest` binary is
//! a command line over it; the broker's tests run it in-process).
//!
//! Map:
//! - [`run`]: scenarios against a Courier node: connections, senders
//!   (open or closed loop), receivers, the report;
//! - [`checker`]: the end-of-run correctness check (loss, duplicates, order);
//! - [`latency`]: HDR histograms, percentiles and the per-second timeline;
//! - [`peers`]: NATS core and Redis Streams clients for side-by-side runs;
//! - [`table`]: the side-by-side Markdown table of several runs;
//! - [`svg`]: the run's report as a self-contained SVG;
//! - [`relay`]: a storage-free relay speaking the protocol (the machine's
//!   ceiling, and with faults the checker's test double);
//! - `session`: a user that reconnects, retries and resumes (the
//!   reconnect scenario and `--chaos-kill`);
//! - [`idle`]: the idle-connections scenario;
//! - [`server`]: the server under test as a process (memory, chaos kills);
//! - [`fds`]: open-file limits and loopback source addresses.

pub mod checker;
pub mod fds;
pub mod idle;
pub mod latency;
pub mod peers;
pub mod relay;
pub mod run;
pub mod server;
mod session;
pub mod svg;
pub mod table;

pub use checker::{Checker, Verdict};
pub use run::{run, Options, Report, Scenario, Target};

//! The two network paths: epoll (tokio's reactor) and io_uring
//! (tokio-uring, one ring per I/O thread). Both hand the session code a
//! socket through the small traits of [`seam`], so the session, its writer
//! and the shards are one implementation for both. This module is the
//! bottom of the broker: it imports nothing from sessions or shards.
//!
//! - [`path`]: the `io` setting, the io_uring probe and the fallback;
//! - [`seam`]: `Transport` (a socket split in two), `NetRead`, `NetWrite`;
//! - [`epoll`], [`uring`]: the two implementations of the seam;
//! - [`tls`]: TLS over either of them (rustls, sans-IO, through the seam).
//!
//! Buffers are owned, as io_uring needs: the kernel writes into memory it
//! holds until the operation completes, so a read takes the buffer and
//! gives it back, and a write takes the encoded frames and drops them after.
//! One write carries everything the writer gathered (many frames).

pub mod epoll;
pub mod path;
pub mod seam;
pub mod tls;
pub mod uring;

pub use path::{choose, probe_uring, IoMode, IoPath};

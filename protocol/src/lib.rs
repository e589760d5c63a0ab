//! Courier's wire protocol, version 1: a sans-IO codec.
//!
//! This crate knows nothing about sockets or runtimes. [`decode`] takes a
//! byte slice and returns a frame and the number of bytes it used (or "need
//! more bytes"); [`encode`] appends a frame to a buffer the caller owns. The
//! byte layout of every frame is in `PROTOCOL.md` beside this crate, with test
//! vectors that `tests/vectors.rs` checks against this code.
//!
//! Map:
//! - [`frame`]: the frame types, their fields and the wire constants;
//! - [`codec`]: encoding and decoding;
//! - [`error`]: the stable numeric error codes;
//! - [`business`]: payloads of business messages (a template asked for, a template rendered);
//! - [`payload`]: payloads of the receipt and group-event messages the server writes;
//! - [`token`]: the `Hello` token format (minting and verification);
//! - [`fuzzing`]: fuzz targets for every decoder here, and a seeded mutator
//!   the test suites drive them with.

pub mod business;
pub mod codec;
pub mod error;
pub mod frame;
pub mod fuzzing;
pub mod payload;
pub mod token;

pub use codec::{decode, encode, encode_deliver, encode_to_bytes, DecodeError};
pub use error::ErrorCode;
pub use frame::*;
pub use payload::{GroupEvent, PayloadError, ReceiptPayload};

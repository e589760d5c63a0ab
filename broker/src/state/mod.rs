//! The broker's state in the store, as types.
//!
//! Every key layout is in [`keys`] and every stored value is a row type in
//! [`rows`] with its encode and decode side by side, so no other file reads
//! a byte offset. [`ids`] says which ids are users and which are groups;
//! [`message`] converts between the store's records and the wire's
//! messages; [`social`] reads and writes a user's contacts, broadcast lists
//! and statuses (state that needs no sequencing); [`business`] is business
//! accounts, templates, consent and the rules' pure parts;
//! [`business_events`] the statuses of business messages and their events.

pub mod business;
pub mod business_events;
pub mod campaigns;
pub mod ids;
pub mod keys;
pub mod message;
pub mod rows;
pub mod social;

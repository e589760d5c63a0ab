//! Contacts, broadcast lists and status posts: per-user state that needs no
//! sequencing. The user's sessions read and write it directly in the store
//! (blocking calls, run on the blocking pool); the shards read it for
//! consent (a broadcast's recipients, a status view).
//!
//! Consent is the contact list: a broadcast reaches a recipient only if the
//! recipient has the sender as a contact, and a status is shown only to
//! viewers who have the poster as a contact and whom the poster has too.
//! Statuses live in the store's expiring space (key `S` poster . expires_at
//! . id): reads skip expired ones, each new post range-deletes the poster's
//! expired ones, and compaction drops any left, so an expired status leaves
//! the disk rather than being hidden.

use bytes::Bytes;
use courier_protocol::{Audience, ContactsOp, ErrorCode, ListOp, Status};
use courier_storage::{InboxStore, KvOp, StoreError};

use super::ids::valid_user;
use super::keys;
use super::rows::{corrupt, StatusRow, UserList};
use crate::error::{refuse, BrokerResult};

fn write(store: &dyn InboxStore, ops: &[KvOp], now_ms: u64) -> BrokerResult<()> {
    store.append_with(&[], ops, now_ms)?;
    Ok(())
}

fn check_users(users: &[u64], me: u64) -> BrokerResult<()> {
    match users.iter().find(|&&u| !valid_user(u) || u == me) {
        Some(u) => refuse(
            ErrorCode::INVALID_REQUEST,
            format!("{u:#x} is not another user's id"),
        ),
        None => Ok(()),
    }
}

pub fn contact_list(store: &dyn InboxStore, user: u64) -> Result<Vec<u64>, StoreError> {
    Ok(store
        .scan(&keys::contacts(user), usize::MAX)?
        .iter()
        .filter_map(|(k, _)| keys::last_id(k))
        .collect())
}

pub fn has_contact(store: &dyn InboxStore, user: u64, contact: u64) -> Result<bool, StoreError> {
    Ok(store.get(&keys::contact(user, contact))?.is_some())
}

/// Adds, removes or reads contacts; answers with the whole list after.
pub fn contacts(
    store: &dyn InboxStore,
    user: u64,
    op: ContactsOp,
    users: &[u64],
    max: usize,
    now_ms: u64,
) -> BrokerResult<Vec<u64>> {
    check_users(users, user)?;
    let ops: Vec<KvOp> = match op {
        ContactsOp::Get => Vec::new(),
        ContactsOp::Add => {
            let current = contact_list(store, user)?;
            let new = users.iter().filter(|u| !current.contains(u)).count();
            if current.len() + new > max {
                return refuse(
                    ErrorCode::TOO_MANY_CONTACTS,
                    format!("{} contacts; at most {max}", current.len() + new),
                );
            }
            users
                .iter()
                .map(|&u| KvOp::Put {
                    key: keys::contact(user, u),
                    value: Vec::new(),
                })
                .collect()
        }
        ContactsOp::Remove => users
            .iter()
            .map(|&u| KvOp::Delete {
                key: keys::contact(user, u),
            })
            .collect(),
    };
    if !ops.is_empty() {
        write(store, &ops, now_ms)?;
    }
    Ok(contact_list(store, user)?)
}

/// The recipients of `user`'s broadcast list `list`.
pub fn get_list(store: &dyn InboxStore, user: u64, list: u64) -> BrokerResult<Vec<u64>> {
    match store.get(&keys::list(user, list))? {
        Some(v) => match UserList::decode(&v) {
            Some(l) => Ok(l.0),
            None => Err(corrupt("broadcast list", format!("user {user} list {list}")).into()),
        },
        None => refuse(ErrorCode::NO_SUCH_LIST, format!("no list {list}")),
    }
}

/// Sets, deletes or reads a broadcast list. `Ok(None)` after a delete.
pub fn list(
    store: &dyn InboxStore,
    user: u64,
    op: ListOp,
    list: u64,
    users: &[u64],
    max: usize,
    now_ms: u64,
) -> BrokerResult<Option<Vec<u64>>> {
    if list == 0 {
        return refuse(ErrorCode::INVALID_REQUEST, "list id 0");
    }
    match op {
        ListOp::Get => get_list(store, user, list).map(Some),
        ListOp::Delete => {
            get_list(store, user, list)?;
            let key = keys::list(user, list);
            write(store, &[KvOp::Delete { key }], now_ms)?;
            Ok(None)
        }
        ListOp::Set => {
            check_users(users, user)?;
            let mut members = Vec::with_capacity(users.len());
            for &u in users {
                if !members.contains(&u) {
                    members.push(u);
                }
            }
            if members.is_empty() || members.len() > max {
                return refuse(
                    ErrorCode::LIST_TOO_LARGE,
                    format!("{} recipients; 1 to {max} allowed", members.len()),
                );
            }
            let row = KvOp::Put {
                key: keys::list(user, list),
                value: UserList(members.clone()).encode(),
            };
            write(store, &[row], now_ms)?;
            Ok(Some(members))
        }
    }
}

/// A status post as it arrives from its poster.
pub struct NewStatus {
    pub poster: u64,
    pub status_id: u64,
    pub audience: Audience,
    pub users: Vec<u64>,
    pub payload: Bytes,
}

/// Posts a status; returns its expiry. Also deletes the poster's expired
/// statuses (one range tombstone).
pub fn post_status(
    store: &dyn InboxStore,
    post: NewStatus,
    now_ms: u64,
    ttl_ms: u64,
    max: usize,
) -> BrokerResult<u64> {
    let poster = post.poster;
    check_users(&post.users, poster)?;
    let live = store.scan_expiring(&keys::statuses(poster), now_ms, max + 1)?;
    if live.len() >= max {
        return refuse(
            ErrorCode::INVALID_REQUEST,
            format!("at most {max} current statuses"),
        );
    }
    let expires_at_ms = now_ms + ttl_ms;
    let value = StatusRow {
        posted_at_ms: now_ms,
        audience: post.audience,
        users: post.users,
        payload: post.payload,
    }
    .encode();
    let ops = [
        KvOp::DeleteExpiringRange {
            from: keys::status(poster, 0, 0),
            to: keys::status(poster, now_ms + 1, 0),
        },
        KvOp::PutExpiring {
            key: keys::status(poster, expires_at_ms, post.status_id),
            expires_at_ms,
            value,
        },
    ];
    write(store, &ops, now_ms)?;
    Ok(expires_at_ms)
}

fn visible(s: &StatusRow, viewer: u64) -> bool {
    match s.audience {
        Audience::Contacts => true,
        Audience::ContactsExcept => !s.users.contains(&viewer),
        Audience::Only => s.users.contains(&viewer),
    }
}

/// The poster's current statuses that `viewer` may see, by the poster's
/// side of the consent (the poster has the viewer as a contact, and the
/// audience includes the viewer); the viewer's side (the viewer has the
/// poster) is the caller's, read where the viewer's contacts are.
pub fn poster_statuses(
    store: &dyn InboxStore,
    poster: u64,
    viewer: u64,
    now_ms: u64,
) -> Result<Vec<Status>, StoreError> {
    // Mutual contacts only: the poster must have the viewer too.
    if !has_contact(store, poster, viewer)? {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for (k, expires_at_ms, v) in store.scan_expiring(&keys::statuses(poster), now_ms, usize::MAX)? {
        let s =
            StatusRow::decode(&v).ok_or_else(|| corrupt("status", format!("poster {poster}")))?;
        if visible(&s, viewer) {
            out.push(Status {
                poster,
                status_id: keys::last_id(&k).unwrap_or(0),
                posted_at_ms: s.posted_at_ms,
                expires_at_ms,
                payload: s.payload,
            });
        }
    }
    out.sort_by_key(|s| (s.posted_at_ms, s.status_id));
    Ok(out)
}

/// Whether `viewer` may see `poster`'s current status `status_id`, by the
/// poster's side of the consent (see [`poster_statuses`]).
pub fn poster_shows(
    store: &dyn InboxStore,
    viewer: u64,
    poster: u64,
    status_id: u64,
    now_ms: u64,
) -> Result<bool, StoreError> {
    if !valid_user(poster) {
        return Ok(false);
    }
    Ok(poster_statuses(store, poster, viewer, now_ms)?
        .iter()
        .any(|s| s.status_id == status_id))
}

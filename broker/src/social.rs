//! Contacts, broadcast lists and status posts: per-user state that needs no
//! sequencing, read and written by the user's own sessions directly in the
//! store (blocking calls; the connection runs them on the blocking pool).
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
use tracing::error;

use crate::groups::valid_user;
use crate::keys;
use crate::shard::OpResult;

fn storage(e: StoreError) -> (ErrorCode, String) {
    error!(error = %e, "storage error");
    (ErrorCode::INTERNAL, "storage error".into())
}

fn write(store: &dyn InboxStore, ops: &[KvOp]) -> OpResult<()> {
    store
        .append_with(&[], ops, crate::now_ms())
        .map(|_| ())
        .map_err(storage)
}

fn check_users(users: &[u64], me: u64) -> OpResult<()> {
    match users.iter().find(|&&u| !valid_user(u) || u == me) {
        Some(u) => Err((
            ErrorCode::INVALID_REQUEST,
            format!("{u:#x} is not another user's id"),
        )),
        None => Ok(()),
    }
}

pub fn contact_list(store: &dyn InboxStore, user: u64) -> OpResult<Vec<u64>> {
    Ok(store
        .scan(&keys::contacts(user), usize::MAX)
        .map_err(storage)?
        .iter()
        .filter_map(|(k, _)| keys::last_u64(k))
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
) -> OpResult<Vec<u64>> {
    check_users(users, user)?;
    match op {
        ContactsOp::Get => {}
        ContactsOp::Add => {
            let current = contact_list(store, user)?;
            let new = users.iter().filter(|u| !current.contains(u)).count();
            if current.len() + new > max {
                return Err((
                    ErrorCode::TOO_MANY_CONTACTS,
                    format!("{} contacts; at most {max}", current.len() + new),
                ));
            }
            let ops: Vec<_> = users
                .iter()
                .map(|&u| KvOp::Put {
                    key: keys::contact(user, u),
                    value: Vec::new(),
                })
                .collect();
            write(store, &ops)?;
        }
        ContactsOp::Remove => {
            let ops: Vec<_> = users
                .iter()
                .map(|&u| KvOp::Delete {
                    key: keys::contact(user, u),
                })
                .collect();
            write(store, &ops)?;
        }
    }
    contact_list(store, user)
}

pub fn get_list(store: &dyn InboxStore, user: u64, list: u64) -> OpResult<Vec<u64>> {
    match store.get(&keys::list(user, list)).map_err(storage)? {
        Some(v) => keys::decode_users(&v).map(|(u, _)| u).ok_or_else(|| {
            storage(StoreError::Corrupt {
                what: "broadcast list",
                detail: format!("user {user} list {list}"),
            })
        }),
        None => Err((ErrorCode::NO_SUCH_LIST, format!("no list {list}"))),
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
) -> OpResult<Option<Vec<u64>>> {
    if list == 0 {
        return Err((ErrorCode::INVALID_REQUEST, "list id 0".into()));
    }
    match op {
        ListOp::Get => get_list(store, user, list).map(Some),
        ListOp::Delete => {
            get_list(store, user, list)?;
            write(
                store,
                &[KvOp::Delete {
                    key: keys::list(user, list),
                }],
            )?;
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
                return Err((
                    ErrorCode::LIST_TOO_LARGE,
                    format!("{} recipients; 1 to {max} allowed", members.len()),
                ));
            }
            write(
                store,
                &[KvOp::Put {
                    key: keys::list(user, list),
                    value: keys::encode_users(&members),
                }],
            )?;
            Ok(Some(members))
        }
    }
}

/// Splits a list's recipients into those who consent (have `sender` as a
/// contact) and the number skipped.
pub fn consenting(
    store: &dyn InboxStore,
    sender: u64,
    recipients: &[u64],
) -> Result<(Vec<u64>, usize), StoreError> {
    let mut yes = Vec::with_capacity(recipients.len());
    for &r in recipients {
        if has_contact(store, r, sender)? {
            yes.push(r);
        }
    }
    let skipped = recipients.len() - yes.len();
    Ok((yes, skipped))
}

struct StoredStatus {
    posted_at_ms: u64,
    audience: Audience,
    users: Vec<u64>,
    payload: Bytes,
}

fn encode_status(s: &StoredStatus) -> Vec<u8> {
    let mut v = Vec::with_capacity(9 + 2 + 8 * s.users.len() + s.payload.len());
    v.extend_from_slice(&s.posted_at_ms.to_be_bytes());
    v.push(s.audience as u8);
    v.extend_from_slice(&keys::encode_users(&s.users));
    v.extend_from_slice(&s.payload);
    v
}

fn decode_status(v: &[u8]) -> Option<StoredStatus> {
    let posted_at_ms = keys::be_u64(v, 0)?;
    let audience = Audience::from_u8(*v.get(8)?)?;
    let (users, used) = keys::decode_users(v.get(9..)?)?;
    Some(StoredStatus {
        posted_at_ms,
        audience,
        users,
        payload: Bytes::copy_from_slice(&v[9 + used..]),
    })
}

/// Posts a status; returns its expiry. Also deletes the poster's expired
/// statuses (one range tombstone).
#[allow(clippy::too_many_arguments, reason = "one call site, plain data")]
pub fn post_status(
    store: &dyn InboxStore,
    poster: u64,
    status_id: u64,
    now_ms: u64,
    ttl_ms: u64,
    max: usize,
    audience: Audience,
    users: Vec<u64>,
    payload: Bytes,
) -> OpResult<u64> {
    check_users(&users, poster)?;
    let live = store
        .scan_expiring(&keys::statuses(poster), now_ms, max + 1)
        .map_err(storage)?;
    if live.len() >= max {
        return Err((
            ErrorCode::INVALID_REQUEST,
            format!("at most {max} current statuses"),
        ));
    }
    let expires_at_ms = now_ms + ttl_ms;
    let value = encode_status(&StoredStatus {
        posted_at_ms: now_ms,
        audience,
        users,
        payload,
    });
    write(
        store,
        &[
            KvOp::DeleteExpiringRange {
                from: keys::status(poster, 0, 0),
                to: keys::status(poster, now_ms + 1, 0),
            },
            KvOp::PutExpiring {
                key: keys::status(poster, expires_at_ms, status_id),
                expires_at_ms,
                value,
            },
        ],
    )?;
    Ok(expires_at_ms)
}

fn visible(s: &StoredStatus, viewer: u64) -> bool {
    match s.audience {
        Audience::Contacts => true,
        Audience::ContactsExcept => !s.users.contains(&viewer),
        Audience::Only => s.users.contains(&viewer),
    }
}

fn poster_statuses(
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
        let Some(s) = decode_status(&v) else {
            return Err(StoreError::Corrupt {
                what: "status",
                detail: format!("poster {poster}"),
            });
        };
        if visible(&s, viewer) {
            out.push(Status {
                poster,
                status_id: keys::last_u64(&k).unwrap_or(0),
                posted_at_ms: s.posted_at_ms,
                expires_at_ms,
                payload: s.payload,
            });
        }
    }
    out.sort_by_key(|s| (s.posted_at_ms, s.status_id));
    Ok(out)
}

/// Every current status of the viewer's contacts that the viewer may see.
pub fn fetch_statuses(store: &dyn InboxStore, viewer: u64, now_ms: u64) -> OpResult<Vec<Status>> {
    let mut out = Vec::new();
    for poster in contact_list(store, viewer)? {
        out.extend(poster_statuses(store, poster, viewer, now_ms).map_err(storage)?);
    }
    Ok(out)
}

/// Whether `viewer` may see `poster`'s current status `status_id`.
pub fn can_view(
    store: &dyn InboxStore,
    viewer: u64,
    poster: u64,
    status_id: u64,
    now_ms: u64,
) -> OpResult<bool> {
    if !valid_user(poster) || !has_contact(store, viewer, poster).map_err(storage)? {
        return Ok(false);
    }
    Ok(poster_statuses(store, poster, viewer, now_ms)
        .map_err(storage)?
        .iter()
        .any(|s| s.status_id == status_id))
}

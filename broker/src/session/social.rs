//! Contacts, broadcast lists and statuses: read and written in the store
//! directly (no sequencing needed), except a status view, whose receipt the
//! poster's shard writes.

use courier_protocol::{Body, ContactsRequest, ErrorCode, ListRequest, Status, StatusPost, Users};

use super::reader::Reader;
use crate::cluster::route;
use crate::shard::messages::{ShardCmd, StatusViewCmd};
use crate::state::social::{self, NewStatus};

impl Reader {
    pub(super) async fn contacts(&mut self, rid: u32, c: ContactsRequest) -> bool {
        let (user, max) = (self.user, self.node.config.social.max_contacts);
        let now = self.node.clock.now_ms();
        let r = self
            .blocking(move |store| social::contacts(store, user, c.op, &c.users, max, now))
            .await;
        self.answer(rid, r, |users| Body::Users(Users { id: user, users }))
    }

    pub(super) async fn list(&mut self, rid: u32, l: ListRequest) -> bool {
        let (user, max) = (self.user, self.node.config.social.max_list_len);
        let now = self.node.clock.now_ms();
        let id = l.list;
        let r = self
            .blocking(move |store| social::list(store, user, l.op, l.list, &l.users, max, now))
            .await;
        self.answer(rid, r, |users| match users {
            Some(users) => Body::Users(Users { id, users }),
            None => Body::Done,
        })
    }

    pub(super) async fn post_status(&mut self, rid: u32, p: StatusPost) -> bool {
        let config = &self.node.config;
        let (ttl, max) = (config.social.status_ttl_ms, config.social.max_statuses);
        if p.payload.len() > config.limits.max_payload_len as usize {
            self.error(
                rid,
                ErrorCode::PAYLOAD_TOO_LARGE,
                "status payload too large",
            );
            return true;
        }
        let status_id = self.node.new_status_id();
        let post = NewStatus {
            poster: self.user,
            status_id,
            audience: p.audience,
            users: p.users,
            payload: p.payload,
        };
        let now = self.node.clock.now_ms();
        let r = self
            .blocking(move |store| social::post_status(store, post, now, ttl, max))
            .await;
        self.answer(rid, r, |expires_at_ms| Body::StatusPosted {
            status_id,
            expires_at_ms,
        })
    }

    /// The current statuses of the viewer's contacts that the viewer may
    /// see, contact by contact: read here for posters this node owns, asked
    /// of their owners for the others.
    pub(super) async fn fetch_statuses(&mut self, rid: u32) -> bool {
        let viewer = self.user;
        let node = self.node.clone();
        // One decision per contact: read here, or asked of its owner.
        let here = self
            .blocking(move |store| {
                let now = node.clock.now_ms();
                let (mut contacts, mut local, mut remote) = (Vec::new(), Vec::new(), Vec::new());
                for poster in social::contact_list(store, viewer)? {
                    if node.is_local(poster) {
                        local.extend(social::poster_statuses(store, poster, viewer, now)?);
                    } else {
                        remote.push(poster);
                    }
                    contacts.push(poster);
                }
                Ok((contacts, local, remote))
            })
            .await;
        let r = match (here, self.node.cluster.get()) {
            (Ok((contacts, mut statuses, remote)), Some(cluster)) if !remote.is_empty() => {
                route::remote_statuses(cluster, viewer, remote)
                    .await
                    .map(|more| {
                        statuses.extend(more);
                        in_contact_order(&contacts, statuses)
                    })
            }
            (here, _) => here.map(|(_, statuses, _)| statuses),
        };
        self.answer(rid, r, Body::StatusList)
    }

    /// Records a status view as a `viewed` receipt in the poster's inbox
    /// (once per viewer and status), then answers `Done`.
    pub(super) async fn view_status(&mut self, rid: u32, poster: u64, status_id: u64) -> bool {
        let (viewer, viewer_device) = (self.user, self.device);
        // The viewer's side of the consent (the viewer has the poster as a
        // contact) is read here, where the viewer's contacts are; the
        // poster's side on the poster's shard.
        let theirs = self
            .blocking(move |store| Ok(social::has_contact(store, viewer, poster)?))
            .await;
        match theirs {
            Ok(true) => {}
            Ok(false) => {
                self.error(rid, ErrorCode::NO_SUCH_STATUS, "no such status for you");
                return true;
            }
            Err(e) => return self.answer(rid, Err::<(), _>(e), |()| Body::Done),
        }
        // Any id has a shard; one that is not a user's has no status there,
        // and is answered like any status the viewer may not see.
        let answer = self
            .ask(poster, |answer| {
                ShardCmd::StatusView(StatusViewCmd {
                    viewer,
                    viewer_device,
                    poster,
                    status_id,
                    answer,
                })
            })
            .await;
        self.answer(rid, answer, |()| Body::Done)
    }
}

/// Statuses ordered contact by contact (each poster's in the order read).
fn in_contact_order(contacts: &[u64], statuses: Vec<Status>) -> Vec<Status> {
    let mut by_poster: std::collections::HashMap<u64, Vec<Status>> =
        std::collections::HashMap::new();
    for s in statuses {
        by_poster.entry(s.poster).or_default().push(s);
    }
    contacts
        .iter()
        .flat_map(|p| by_poster.remove(p).unwrap_or_default())
        .collect()
}

//! Catch-up: a session's writer reads what it missed from the store.
//!
//! The inbox from the last delivered sequence up to its head, then every
//! log-strategy group stream from its cursor (from the user's `U` rows and
//! `C` cursors) up to the log's head or the event that removed the user.
//! Then, for a session that takes receipt facts, the user's fact rows
//! after the last version it sent. It clears `lagging` before reading and
//! reads once more if the shard set it again meanwhile, so no message (or
//! fact) falls between live push and catch-up.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use courier_protocol::{Body, ErrorCode, Frame, Message, Reason};
use courier_storage::StoreError;
use tracing::{error, warn};

use super::streams::GroupStream;
use super::writer::Writer;
use crate::net::seam::NetWrite;
use crate::state::ids::NONE;
use crate::state::keys;
use crate::state::message::to_wire;
use crate::state::rows::{Cursors, FactRow, MemberRow};

/// Messages read from the store per catch-up step.
const CATCH_UP_PAGE: usize = 256;
/// Receipt fact rows one catch-up reads at most (one per reader the user
/// ever wrote to and heard from).
const FACTS_READ_MAX: usize = 1 << 20;

/// Why a group catch-up stopped. Classified where it happens: a socket
/// error is the client going away (not the node's fault, not logged as an
/// error); a store error is the node's, logged and told to the client.
enum CatchUpError {
    Socket(std::io::Error),
    Store(StoreError),
}

impl From<StoreError> for CatchUpError {
    fn from(e: StoreError) -> Self {
        CatchUpError::Store(e)
    }
}

/// A read task that did not finish (it panicked): the store read failed.
fn read_task_failed(e: tokio::task::JoinError) -> StoreError {
    StoreError::Io(format!("catch-up read task: {e}"))
}

impl<W: NetWrite> Writer<W> {
    /// Reads the inbox after `delivered` up to its head and sends it, until
    /// no push was missed in between (see the module comment).
    pub(super) async fn catch_up(&mut self) -> std::io::Result<()> {
        self.flush().await?;
        loop {
            self.session.lagging.store(false, Ordering::SeqCst);
            loop {
                let user = self.user;
                let page = self
                    .read_page(user, self.delivered)
                    .await
                    .map_err(std::io::Error::other)?;
                let page = match page {
                    Ok(p) => p,
                    Err(e) => {
                        error!(user, error = %e, "catch-up read failed; closing session");
                        return self.storage_goodbye(e).await;
                    }
                };
                let n = page.len();
                tracing::debug!(
                    user,
                    after = self.delivered,
                    n,
                    last = page.last().map(|m| m.seq),
                    "catch-up page"
                );
                self.metrics.deliveries_catch_up.inc_by(n as u64);
                for m in page {
                    debug_assert!(m.seq > self.delivered);
                    self.delivered = m.seq;
                    self.pending.push(Arc::new(m));
                }
                self.flush().await?;
                if n < CATCH_UP_PAGE {
                    break;
                }
            }
            match self.catch_up_groups().await {
                Ok(()) => {}
                Err(CatchUpError::Socket(e)) => return Err(e),
                Err(CatchUpError::Store(e)) => {
                    error!(user = self.user, error = %e, "group catch-up failed; closing session");
                    return self.storage_goodbye(e).await;
                }
            }
            match self.catch_up_facts().await {
                Ok(()) => {}
                Err(CatchUpError::Socket(e)) => return Err(e),
                Err(CatchUpError::Store(e)) => {
                    error!(user = self.user, error = %e, "receipt fact catch-up failed; closing session");
                    return self.storage_goodbye(e).await;
                }
            }
            if !self.session.lagging.load(Ordering::SeqCst) {
                return Ok(());
            }
        }
    }

    /// Reads the user's group rows: which log-strategy groups to read, from
    /// where (the confirmed cursor, or where the user joined) and to where.
    async fn load_streams(&mut self) -> Result<(), StoreError> {
        let store = self.store.clone();
        let user = self.user;
        let rows = tokio::task::spawn_blocking(move || {
            let mut out = Vec::new();
            for (k, v) in store.scan(&keys::user_groups(user), usize::MAX)? {
                let (Some(g), Some(row)) = (keys::last_id(&k), MemberRow::decode(&v)) else {
                    continue;
                };
                if row.log_from == NONE {
                    continue;
                }
                let confirmed = match store.get(&keys::cursor(g, user))? {
                    Some(c) => Cursors::decode(&c).delivered,
                    None => 0,
                };
                let (joined, left, log_from) = (row.joined, row.left, row.log_from);
                out.push((g, joined.max(log_from), left, confirmed));
            }
            Ok::<_, StoreError>(out)
        })
        .await
        .map_err(read_task_failed)??;
        for (g, from, left, confirmed) in rows {
            let fresh = GroupStream {
                delivered: confirmed.max(from - 1),
                end: left,
            };
            match self.groups.get_mut(&g) {
                // Removed earlier in this session and added again since.
                Some(s) if from > s.end => *s = fresh,
                Some(s) => s.end = s.end.min(left),
                None => {
                    self.groups.insert(g, fresh);
                }
            }
        }
        Ok(())
    }

    /// Reads every group stream up to its log's head (or its end).
    async fn catch_up_groups(&mut self) -> Result<(), CatchUpError> {
        if self.rescan {
            self.load_streams().await?;
            self.rescan = false;
        }
        let groups: Vec<u64> = self.groups.keys().copied().collect();
        for g in groups {
            loop {
                let stream = &self.groups[&g];
                if stream.delivered >= stream.end {
                    break;
                }
                let page = self
                    .read_page(g, stream.delivered)
                    .await
                    .map_err(read_task_failed)??;
                let n = page.len();
                let stream = self.groups.get_mut(&g).expect("present");
                for m in page {
                    if m.seq > stream.end {
                        break;
                    }
                    if stream.take(self.user, &m) {
                        self.pending_group.push((g, Arc::new(m)));
                        self.metrics.deliveries_catch_up.inc();
                    }
                }
                self.flush().await.map_err(CatchUpError::Socket)?;
                if n < CATCH_UP_PAGE {
                    break;
                }
            }
        }
        Ok(())
    }

    /// One page of `inbox` (the user's, or a group log) after `after`, in
    /// wire form, read on the blocking pool.
    /// For a session that takes receipt facts: reads the user's fact rows
    /// and sends those after the last version sent, in version order. A
    /// client that says it has seen a version beyond every row (a client
    /// bug, or a store that lost its newest rows) is sent every row after
    /// the highest there is, so that the next facts are not dropped as
    /// seen.
    async fn catch_up_facts(&mut self) -> Result<(), CatchUpError> {
        let Some(after) = self.facts_after else {
            return Ok(());
        };
        let store = self.store.clone();
        let user = self.user;
        let rows =
            tokio::task::spawn_blocking(move || store.scan(&keys::facts(user), FACTS_READ_MAX))
                .await
                .map_err(read_task_failed)??;
        if rows.len() == FACTS_READ_MAX {
            warn!(
                user,
                "more than {FACTS_READ_MAX} receipt fact rows; the rest are sent as they change"
            );
        }
        let mut facts = Vec::new();
        let mut highest = 0;
        for (key, value) in rows {
            let (Some(reader), Ok(row)) = (keys::last_id(&key), FactRow::decode(&value)) else {
                error!(user, key = ?key, "corrupt receipt fact row; skipped");
                continue;
            };
            highest = highest.max(row.version);
            facts.push(row.fact(reader));
        }
        // `u64::MAX` is "from now on", as for the inbox.
        let after = if after == u64::MAX {
            highest
        } else if after > highest {
            warn!(
                user,
                after, highest, "a client resumes receipt facts past the last version"
            );
            0
        } else {
            after
        };
        facts.retain(|f| f.version > after);
        facts.sort_unstable_by_key(|f| f.version);
        self.pending_facts.extend(facts);
        self.facts_after = Some(highest);
        self.flush().await.map_err(CatchUpError::Socket)
    }

    async fn read_page(
        &self,
        inbox: u64,
        after: u64,
    ) -> Result<Result<Vec<Message>, StoreError>, tokio::task::JoinError> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || {
            store
                .read_after(inbox, after, CATCH_UP_PAGE)?
                .into_iter()
                .map(to_wire)
                .collect::<Result<Vec<_>, _>>()
        })
        .await
    }

    /// Tells the client why the store could not be read (a replicated
    /// shard not served here: retryable; else a storage error) and ends
    /// the writer.
    async fn storage_goodbye(&mut self, e: StoreError) -> std::io::Result<()> {
        let e = crate::error::BrokerError::from(e);
        let code = e.code();
        if code != ErrorCode::SHARD_UNAVAILABLE {
            self.metrics.catch_up_storage_errors.inc();
        }
        let reason = Reason::new(code, e.client_message());
        self.encode(&Frame::new(0, Body::Goodbye(reason)));
        self.flush().await?;
        Err(std::io::Error::other(e.to_string()))
    }
}

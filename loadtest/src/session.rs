//! A simulated user that behaves like a real mobile client whose network
//! comes and goes: one task that sends and receives on one session, and
//! when the session ends (the server was killed, or the reconnect scenario
//! drops it on purpose) connects again, retries every send not yet
//! acknowledged with its original client id (the server answers a repeat
//! with the stored message's ack, so nothing is stored twice), and resumes
//! deliveries after the last one it saw.
//!
//! Deliveries are kept or dropped by their stream sequence, as a client
//! does: after a resume the server may send again what this client already
//! had but had not confirmed; those are counted as `redelivered` and not
//! shown to the checker. A message stored twice has two sequences and is
//! shown twice, so the checker still catches a duplicate.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use courier_client::{retry_delay, Client, ClientError};
use courier_protocol::ErrorCode;
use futures_util::stream::{FuturesUnordered, StreamExt};
use rand::Rng;

use crate::checker::Checker;
use crate::endpoint::courier::{client_error, courier_send};
use crate::pacer::Pacer;
use crate::plan::{client_msg_id, conversation, Numbering, Route, Routes};
use crate::stamp::payload;
use crate::tally::{Shared, Tally};

/// How long to keep trying to reconnect after sending has ended.
const GIVE_UP_AFTER: Duration = Duration::from_secs(30);
/// How long a send waits for its answer before the session counts as
/// lost (a phone gives up on a silent connection, reconnects and sends
/// again with the same id); such sends are counted (`unanswered`).
const ANSWER_LIMIT: Duration = Duration::from_secs(30);
/// How long a connection attempt (TCP and the handshake) may take.
const CONNECT_LIMIT: Duration = Duration::from_secs(10);

pub(crate) struct User {
    pub me: u64,
    /// The session opened by the set-up (groups and contacts are made on it).
    pub client: Arc<Client>,
    pub routes: Vec<Route>,
    pub pacer: Pacer,
    pub window: usize,
    pub size: usize,
    /// Reconnect scenario: each session lives this long on average.
    pub lifetime: Option<Duration>,
    /// Every address the run was given (a cluster's nodes): a reconnect
    /// that fails tries the next.
    pub addrs: Arc<Vec<String>>,
}

/// A send not yet acknowledged: retried on the next session.
struct Unacked {
    route: usize,
    n: u64,
    intended: Instant,
    body: Bytes,
}

/// Why a session ended.
enum End {
    /// The connection failed or closed: connect again.
    Lost,
    /// The session's planned lifetime is over: connect again.
    Dropped,
    /// Sending is done and the run is stopping.
    Finished,
}

impl User {
    pub(crate) async fn run(self, shared: Arc<Shared>, routes: Arc<Routes>) -> Checker {
        let mut state = State {
            me: self.me,
            checker: Checker::new(),
            tally: Tally::new(),
            numbering: Numbering::new(self.me, self.routes.len()),
            unacked: BTreeMap::new(),
            last_seq: HashMap::new(),
            sending: !self.routes.is_empty(),
            since_confirm: 0,
            retry: Vec::new(),
            retry_at: None,
            refusal: None,
        };
        // The set-up session resumed after everything already there.
        state.last_seq.insert(0, self.client.last_received_seq());
        let mut client = Some(self.client.clone());
        let mut why_end = "unanswered when the run stopped".to_owned();
        loop {
            let c = match client.take() {
                Some(c) => c,
                None => match self.reconnect(&state, &shared).await {
                    Some(c) => {
                        shared.reconnects.fetch_add(1, Ordering::Relaxed);
                        c
                    }
                    None => {
                        why_end = format!(
                            "no session to send it on until {GIVE_UP_AFTER:?} after the end"
                        );
                        break;
                    }
                },
            };
            match self.session(&c, &mut state, &shared, &routes).await {
                End::Finished => break,
                End::Lost | End::Dropped => {}
            }
        }
        if state.sending {
            // Gave up reconnecting: what is still unacknowledged is not
            // expected anywhere (it was never acknowledged).
            state.done_sending(&shared);
        }
        if !state.unacked.is_empty() {
            state.abandon_all(&shared, &why_end);
        }
        state.tally.flush(&shared);
        state.checker
    }

    /// Connects again, resuming the inbox after the last delivery seen;
    /// `None` once the run is over or reconnecting has failed for too long.
    async fn reconnect(&self, state: &State, shared: &Shared) -> Option<Arc<Client>> {
        let mut config = self.client.config().clone();
        config.resume_after = Some(state.last_seq.get(&0).copied().unwrap_or(0));
        let mut backoff = Duration::from_millis(20);
        let give_up = self.pacer.end() + GIVE_UP_AFTER;
        let mut next_addr = self
            .addrs
            .iter()
            .position(|a| *a == config.addr)
            .unwrap_or(0);
        loop {
            if shared.stopped() || Instant::now() > give_up {
                return None;
            }
            let attempt = tokio::time::timeout(CONNECT_LIMIT, Client::connect(config.clone()))
                .await
                .unwrap_or(Err(ClientError::Timeout));
            match attempt {
                Ok((c, _)) => return Some(Arc::new(c)),
                Err(ClientError::Refused(code, _)) => {
                    // The server is up and says no: counted, and tried
                    // again like any client would.
                    shared.error(format!("refused {code:?}"));
                }
                // Down or out of reach: the next node may serve us.
                Err(_) => {
                    next_addr = (next_addr + 1) % self.addrs.len().max(1);
                    if let Some(addr) = self.addrs.get(next_addr) {
                        config.addr = addr.clone();
                    }
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_millis(500));
        }
    }

    /// Sends, receives and takes acks on one session until it ends.
    async fn session(
        &self,
        c: &Arc<Client>,
        state: &mut State,
        shared: &Shared,
        routes: &Routes,
    ) -> End {
        let mut inflight = FuturesUnordered::new();
        let queue = |k: u64, u: &Unacked| {
            let id = client_msg_id(routes.tag, u.route, u.n);
            let pending = courier_send(c, id, self.routes[u.route].dest, routes, u.body.clone());
            async move {
                let r = match pending {
                    Ok(ack) => tokio::time::timeout(ANSWER_LIMIT, ack)
                        .await
                        .unwrap_or(Err(ClientError::Timeout)),
                    Err(e) => Err(e),
                };
                (k, r)
            }
        };
        // Retry what the last session left unacknowledged, in order.
        for (&k, u) in &state.unacked {
            inflight.push(queue(k, u));
        }
        state.retry.clear();
        state.retry_at = None;
        // Told when the run's phase changes: a user ends once it stops.
        let mut phase = shared.watch_phase();
        let lifetime = self.lifetime.map(|m| {
            let jitter = state.numbering.rng.gen_range(0.5..1.5);
            tokio::time::Instant::now() + m.mul_f64(jitter)
        });
        let mut next_at = if state.sending {
            self.pacer.intended(state.numbering.count)
        } else {
            None
        };
        // Past this, nothing new is sent and refused sends are not tried
        // again: a shard out of reach for so long is the run's finding,
        // and the run must end to report it.
        let give_up = self.pacer.end() + GIVE_UP_AFTER;
        loop {
            if shared.stopped() {
                // Sending is over (or the run stopped waiting for this
                // sender: what it holds is abandoned).
                return End::Finished;
            }
            if next_at.is_some() && Instant::now() > give_up {
                next_at = None;
            }
            if state.sending && next_at.is_none() && inflight.is_empty() && state.retry.is_empty() {
                state.done_sending(shared);
            }
            // Sends waiting to be retried hold their place in the window.
            let room = inflight.len() + state.retry.len() < self.window;
            tokio::select! {
                // A new message, when its time has come and there is room.
                _ = tokio::time::sleep_until(next_at.unwrap_or_else(Instant::now).into()),
                    if room && next_at.is_some() =>
                {
                    let intended = next_at.expect("guarded");
                    let k = state.numbering.count;
                    let (route, n) = state.numbering.next(&self.routes);
                    let conv = conversation(self.me, route);
                    let body = payload(conv, n, shared.since_start(intended), self.size);
                    let u = Unacked { route, n, intended, body };
                    shared.sent(&mut state.tally);
                    inflight.push(queue(k, &u));
                    state.unacked.insert(k, u);
                    next_at = self.pacer.intended(state.numbering.count);
                }
                Some((k, r)) = inflight.next(), if !inflight.is_empty() => match r {
                    Ok(()) => {
                        if let Some(u) = state.unacked.remove(&k) {
                            let recipients = &self.routes[u.route].recipients;
                            let conv = conversation(self.me, u.route);
                            shared.acked(
                                (conv, u.n, recipients),
                                u.intended,
                                &mut state.checker,
                                &mut state.tally,
                            );
                        }
                    }
                    // Its shard's node is out of reach: sent again with its
                    // id after the hint, with every other such send, oldest
                    // first (the node holds a conversation's later sends
                    // until the oldest refused one comes back).
                    Err(ClientError::Rejected(ErrorCode::SHARD_UNAVAILABLE, message)) => {
                        state.retry.push(k);
                        state.retry_at
                            .get_or_insert(tokio::time::Instant::now() + retry_delay(&message));
                        state.refusal = Some(message);
                    }
                    Err(e @ ClientError::Rejected(..)) => {
                        state.unacked.remove(&k);
                        shared.error(client_error(e));
                    }
                    // Not answered in time: the session is as good as
                    // gone (counted: a server owes every send an answer).
                    Err(ClientError::Timeout) => {
                        shared.unanswered.fetch_add(1, Ordering::Relaxed);
                        return End::Lost;
                    }
                    // The session is gone: retried on the next one.
                    Err(_) => return End::Lost,
                },
                _ = tokio::time::sleep_until(state.retry_at.unwrap_or_else(tokio::time::Instant::now)),
                    if state.retry_at.is_some() =>
                {
                    state.retry_at = None;
                    if Instant::now() > give_up {
                        let why = format!(
                            "refused SHARD_UNAVAILABLE until {GIVE_UP_AFTER:?} after the end ({})",
                            state.refusal.as_deref().unwrap_or_default()
                        );
                        for k in std::mem::take(&mut state.retry) {
                            state.abandon(k, shared, &why);
                        }
                        continue;
                    }
                    state.retry.sort_unstable();
                    for k in std::mem::take(&mut state.retry) {
                        if let Some(u) = state.unacked.get(&k) {
                            shared.retried.fetch_add(1, Ordering::Relaxed);
                            inflight.push(queue(k, u));
                        }
                    }
                }
                d = c.next() => match d {
                    Some(d) => state.delivered(c, d, shared).await,
                    None => return End::Lost,
                },
                _ = tokio::time::sleep_until(lifetime.unwrap_or_else(tokio::time::Instant::now)),
                    if lifetime.is_some() && state.sending =>
                {
                    return End::Dropped;
                }
                // Checked at the loop's top.
                _ = phase.changed() => {}
            }
        }
    }
}

/// What a user carries from one session to the next.
struct State {
    me: u64,
    checker: Checker,
    tally: Tally,
    numbering: Numbering,
    unacked: BTreeMap<u64, Unacked>,
    /// The last sequence seen per stream (0: the inbox; else a group's log).
    last_seq: HashMap<u64, u64>,
    sending: bool,
    since_confirm: u32,
    /// Sends refused `SHARD_UNAVAILABLE`, to send again at `retry_at`.
    retry: Vec<u64>,
    retry_at: Option<tokio::time::Instant>,
    /// The last such refusal's message (its hint, for the report).
    refusal: Option<String>,
}

impl State {
    fn done_sending(&mut self, shared: &Shared) {
        self.sending = false;
        shared.sending_left.fetch_sub(1, Ordering::Relaxed);
    }

    /// Send `k` is given up unacknowledged: counted, and said why (one
    /// line per user and reason in the report's errors).
    fn abandon(&mut self, k: u64, shared: &Shared, why: &str) {
        if let Some(u) = self.unacked.remove(&k) {
            shared.abandoned.fetch_add(1, Ordering::Relaxed);
            shared.error(format!(
                "user {} gave up a send on route {}: {why}",
                self.me, u.route
            ));
        }
    }

    fn abandon_all(&mut self, shared: &Shared, why: &str) {
        let left: Vec<u64> = self.unacked.keys().copied().collect();
        for k in left {
            self.abandon(k, shared, why);
        }
    }

    async fn delivered(&mut self, c: &Arc<Client>, d: courier_client::Delivery, shared: &Shared) {
        let last = self.last_seq.entry(d.stream).or_insert(0);
        if d.message.seq <= *last {
            shared.redelivered.fetch_add(1, Ordering::Relaxed);
            return;
        }
        *last = d.message.seq;
        if d.stream == 0 {
            self.checker.inbox_seq(self.me, d.message.seq);
        }
        self.since_confirm += 1;
        if self.since_confirm >= 256 {
            self.since_confirm = 0;
            let _ = c.confirm(&d).await;
        }
        shared.delivery(
            self.me,
            &d.message.payload,
            &mut self.checker,
            &mut self.tally,
        );
    }
}

//! Admission: which accepted connections the node keeps, and which it
//! refuses (and how), before a single byte is read from them.
//!
//! Budgets, each a setting with its own refusal code and metric label:
//! - every connection (`limits.max_connections`, lowered at start to what
//!   the open-file limit allows after `limits.reserved_files`): refused with
//!   `TOO_MANY_CONNECTIONS`;
//! - connections that have not authenticated yet per source address
//!   (`limits.max_unauthenticated_per_source`): refused with
//!   `TOO_MANY_UNAUTHENTICATED`;
//! - connections that have not authenticated yet in all
//!   (`limits.max_unauthenticated`): when it is full, the *oldest* waiting
//!   handshake is closed to make room (`Goodbye HANDSHAKE_TIMEOUT`), so
//!   silent connections, even from many addresses, hold at most this many
//!   slots and only until newer ones arrive, while a real client's
//!   handshake (one round trip) completes long before it becomes the
//!   oldest. A connection leaves this budget when its handshake ends,
//!   welcomed or not;
//! - new connections per second per source address
//!   (`limits.new_connections_per_source_per_sec`, a token bucket with a
//!   burst of one second's worth): refused with `CONNECTION_RATE_LIMITED`.
//!
//! A refusal is said with a `Goodbye` and a short linger (so the goodbye is
//! not lost to a reset), which holds a descriptor; at most `REFUSING_MAX`
//! refusals (and no more than half of `limits.reserved_files`) are said at
//! once, and beyond that a refused socket is closed at once. So a flood costs the node a bounded number of descriptors.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use courier_protocol::ErrorCode;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

/// Refusals (goodbye + linger) in progress at most.
pub const REFUSING_MAX: usize = 256;
/// Source addresses remembered before the idle ones are forgotten.
const SOURCES_SOFT_MAX: usize = 65_536;

/// The budgets, from `limits`.
#[derive(Clone, Copy, Debug)]
pub struct GateLimits {
    pub connections: usize,
    pub unauthenticated: usize,
    pub unauthenticated_per_source: usize,
    /// 0: no rate limit.
    pub new_per_source_per_sec: u32,
    /// Refusals said at once (each holds a descriptor while it lingers).
    pub refusing: usize,
}

/// Why a connection was refused; `label` is its metric label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    Connections,
    SourceUnauthenticated,
    SourceRate,
}

impl Refusal {
    pub const ALL: [Refusal; 3] = [
        Refusal::Connections,
        Refusal::SourceUnauthenticated,
        Refusal::SourceRate,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Refusal::Connections => "connections",
            Refusal::SourceUnauthenticated => "source_unauthenticated",
            Refusal::SourceRate => "source_rate",
        }
    }

    /// What the refused client is told.
    pub fn code(self) -> (ErrorCode, &'static str) {
        match self {
            Refusal::Connections => (ErrorCode::TOO_MANY_CONNECTIONS, "connection limit reached"),
            Refusal::SourceUnauthenticated => (
                ErrorCode::TOO_MANY_UNAUTHENTICATED,
                "too many connections from your address waiting to authenticate",
            ),
            Refusal::SourceRate => (
                ErrorCode::CONNECTION_RATE_LIMITED,
                "too many new connections from your address; retry after a pause",
            ),
        }
    }
}

/// A token bucket: `rate` a second, a burst of one second's worth.
#[derive(Clone, Copy, Debug)]
pub struct Bucket {
    tokens: f64,
    refilled_ms: u64,
}

impl Bucket {
    /// Full at `now_ms`.
    pub fn full(rate: u32, now_ms: u64) -> Bucket {
        Bucket {
            tokens: f64::from(rate),
            refilled_ms: now_ms,
        }
    }

    /// Takes one token if there is one at `now_ms`; `rate` 0 is unlimited.
    pub fn take(&mut self, rate: u32, now_ms: u64) -> bool {
        if rate == 0 {
            return true;
        }
        let rate = f64::from(rate);
        let elapsed_s = now_ms.saturating_sub(self.refilled_ms) as f64 / 1000.0;
        self.tokens = (self.tokens + elapsed_s * rate).min(rate);
        self.refilled_ms = now_ms.max(self.refilled_ms);
        if self.tokens < 1.0 {
            return false;
        }
        self.tokens -= 1.0;
        true
    }

    /// Would be full again by now (nothing to remember about it).
    fn idle(&self, now_ms: u64) -> bool {
        now_ms.saturating_sub(self.refilled_ms) >= 1000
    }
}

/// One source address's unauthenticated connections and rate bucket.
#[derive(Debug)]
struct Source {
    unauthenticated: usize,
    /// New connections it may still open.
    bucket: Bucket,
}

type Sources = Arc<Mutex<HashMap<IpAddr, Source>>>;

/// Handshakes waiting, oldest first (ids only grow): each one's token
/// closes it to make room.
type Waiting = Arc<Mutex<std::collections::BTreeMap<u64, CancellationToken>>>;

/// The node's admission state, shared by every accept loop.
pub struct Gate {
    limits: GateLimits,
    connections: Arc<Semaphore>,
    waiting: Waiting,
    next_id: std::sync::atomic::AtomicU64,
    refusing: Arc<Semaphore>,
    sources: Sources,
}

/// A connection let in: its connection slot for its whole life, and its
/// place in the unauthenticated budget until the handshake ends.
pub struct Admitted {
    pub slot: OwnedSemaphorePermit,
    pub handshaking: Handshaking,
    /// An older waiting handshake was closed to make room for this one.
    pub evicted_another: bool,
}

/// A place in the unauthenticated budget (in all and for its source);
/// given back when dropped.
pub struct Handshaking {
    id: u64,
    /// Cancelled when the handshake is closed to make room for a newer one.
    pub evicted: CancellationToken,
    waiting: Waiting,
    source: Option<IpAddr>,
    sources: Sources,
}

impl Drop for Handshaking {
    fn drop(&mut self) {
        self.waiting.lock().expect("waiting lock").remove(&self.id);
        let Some(ip) = self.source else { return };
        let mut sources = self.sources.lock().expect("sources lock");
        if let Some(s) = sources.get_mut(&ip) {
            s.unauthenticated = s.unauthenticated.saturating_sub(1);
        }
    }
}

/// A refused connection: why, and whether there is room to say it (a
/// goodbye and a linger) or the socket must be closed at once.
pub struct Refused {
    pub why: Refusal,
    pub room: Option<OwnedSemaphorePermit>,
}

impl Gate {
    pub fn new(limits: GateLimits) -> Gate {
        Gate {
            limits,
            connections: Arc::new(Semaphore::new(limits.connections)),
            waiting: Arc::default(),
            next_id: std::sync::atomic::AtomicU64::new(0),
            refusing: Arc::new(Semaphore::new(limits.refusing)),
            sources: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    pub fn limits(&self) -> GateLimits {
        self.limits
    }

    /// Connections that hold a slot now (authenticated or not).
    pub fn connections(&self) -> usize {
        self.limits.connections - self.connections.available_permits()
    }

    /// Connections that have not finished their handshake now.
    pub fn unauthenticated(&self) -> usize {
        self.waiting.lock().expect("waiting lock").len()
    }

    /// Decides on a connection just accepted from `source` at `now_ms`.
    pub fn admit(&self, source: Option<IpAddr>, now_ms: u64) -> Result<Admitted, Refused> {
        let refused = |why| {
            Err(Refused {
                why,
                room: self.refusing.clone().try_acquire_owned().ok(),
            })
        };
        let mut sources = self.sources.lock().expect("sources lock");
        if sources.len() > SOURCES_SOFT_MAX {
            sources.retain(|_, s| s.unauthenticated > 0 || !s.bucket.idle(now_ms));
        }
        let rate = self.limits.new_per_source_per_sec;
        let mut entry = source.map(|ip| {
            sources.entry(ip).or_insert(Source {
                unauthenticated: 0,
                bucket: Bucket::full(rate, now_ms),
            })
        });
        if let Some(s) = entry.as_deref_mut() {
            if !s.bucket.take(rate, now_ms) {
                return refused(Refusal::SourceRate);
            }
        }
        if entry
            .as_ref()
            .is_some_and(|s| s.unauthenticated >= self.limits.unauthenticated_per_source)
        {
            return refused(Refusal::SourceUnauthenticated);
        }
        let Ok(slot) = self.connections.clone().try_acquire_owned() else {
            return refused(Refusal::Connections);
        };
        if let Some(s) = entry {
            s.unauthenticated += 1;
        }
        drop(sources);
        let id = self
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let evicted = CancellationToken::new();
        let mut waiting = self.waiting.lock().expect("waiting lock");
        let mut evicted_another = false;
        while waiting.len() >= self.limits.unauthenticated {
            let (_, oldest) = waiting.pop_first().expect("not empty");
            oldest.cancel();
            evicted_another = true;
        }
        waiting.insert(id, evicted.clone());
        Ok(Admitted {
            slot,
            handshaking: Handshaking {
                id,
                evicted,
                waiting: self.waiting.clone(),
                source,
                sources: self.sources.clone(),
            },
            evicted_another,
        })
    }
}

/// Sends per second per user, over all the user's connections (the
/// connection's own bucket lives in its reader). Striped so that readers
/// of different users rarely meet on one lock.
pub struct SendRates {
    rate: u32,
    stripes: Vec<Mutex<HashMap<u64, Bucket>>>,
}

/// Users one stripe remembers before the idle ones are forgotten.
const USERS_PER_STRIPE_SOFT_MAX: usize = 4096;

impl SendRates {
    pub fn new(per_user_per_sec: u32) -> SendRates {
        SendRates {
            rate: per_user_per_sec,
            stripes: (0..64).map(|_| Mutex::new(HashMap::new())).collect(),
        }
    }

    /// Takes one send from `user`'s budget at `now_ms`.
    pub fn take(&self, user: u64, now_ms: u64) -> bool {
        if self.rate == 0 {
            return true;
        }
        let stripe = &self.stripes[(user % self.stripes.len() as u64) as usize];
        let mut users = stripe.lock().expect("send rates lock");
        if users.len() > USERS_PER_STRIPE_SOFT_MAX {
            users.retain(|_, b| !b.idle(now_ms));
        }
        users
            .entry(user)
            .or_insert_with(|| Bucket::full(self.rate, now_ms))
            .take(self.rate, now_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gate(connections: usize, unauth: usize, per_source: usize, rate: u32) -> Gate {
        Gate::new(GateLimits {
            connections,
            unauthenticated: unauth,
            unauthenticated_per_source: per_source,
            new_per_source_per_sec: rate,
            refusing: REFUSING_MAX,
        })
    }

    fn ip(last: u8) -> Option<IpAddr> {
        Some(IpAddr::from([127, 0, 0, last]))
    }

    fn why(r: Result<Admitted, Refused>) -> Refusal {
        match r {
            Ok(_) => panic!("admitted"),
            Err(r) => r.why,
        }
    }

    #[test]
    fn a_full_unauthenticated_budget_closes_the_oldest_waiting_handshake() {
        let g = gate(10, 4, 100, 0);
        let silent: Vec<_> = (0..4).map(|i| g.admit(ip(i), 0).ok().unwrap()).collect();
        assert!(silent.iter().all(|a| !a.evicted_another));
        let user = g.admit(ip(9), 0).ok().expect("room is made");
        assert!(user.evicted_another);
        assert!(
            silent[0].handshaking.evicted.is_cancelled(),
            "the oldest goes"
        );
        assert!(silent[1..]
            .iter()
            .all(|a| !a.handshaking.evicted.is_cancelled()));
        assert_eq!((g.connections(), g.unauthenticated()), (5, 4));
        // A handshake that ends gives its place back (and only once, even
        // for the evicted one); the connection slot stays for the session.
        let mut silent = silent.into_iter();
        let evicted = silent.next().unwrap();
        drop(evicted.handshaking);
        assert_eq!(g.unauthenticated(), 4);
        drop(user.handshaking);
        assert_eq!((g.connections(), g.unauthenticated()), (5, 3));
        let next = g.admit(ip(9), 0).ok().unwrap();
        assert!(!next.evicted_another, "there was room");
        drop(evicted.slot);
        drop(user.slot);
        assert_eq!((g.connections(), g.unauthenticated()), (4, 4));
    }

    #[test]
    fn one_source_cannot_take_the_whole_unauthenticated_budget() {
        let g = gate(100, 50, 3, 0);
        let held: Vec<_> = (0..3).map(|_| g.admit(ip(2), 0).ok().unwrap()).collect();
        assert_eq!(why(g.admit(ip(2), 0)), Refusal::SourceUnauthenticated);
        assert!(g.admit(ip(3), 0).is_ok(), "another address still gets in");
        drop(held);
        assert!(g.admit(ip(2), 0).is_ok(), "its places come back");
        assert!(
            g.admit(None, 0).is_ok(),
            "no address: only the global budgets"
        );
    }

    #[test]
    fn new_connections_per_source_are_rate_limited() {
        let g = gate(1000, 1000, 1000, 5);
        let mut kept = Vec::new();
        for _ in 0..5 {
            kept.push(g.admit(ip(2), 1_000).ok().unwrap());
        }
        assert_eq!(why(g.admit(ip(2), 1_000)), Refusal::SourceRate);
        assert!(g.admit(ip(3), 1_000).is_ok(), "per source");
        // 200 ms later one more token is there, and only one.
        assert!(g.admit(ip(2), 1_200).is_ok());
        assert_eq!(why(g.admit(ip(2), 1_200)), Refusal::SourceRate);
        // A long pause refills to the burst, not beyond.
        for _ in 0..5 {
            kept.push(g.admit(ip(2), 60_000).ok().unwrap());
        }
        assert_eq!(why(g.admit(ip(2), 60_000)), Refusal::SourceRate);
    }

    #[test]
    fn the_connection_budget_comes_first_and_refusals_are_bounded() {
        let g = gate(2, 10, 10, 0);
        let _a = g.admit(ip(1), 0).ok().unwrap();
        let _b = g.admit(ip(1), 0).ok().unwrap();
        let mut said = Vec::new();
        for _ in 0..REFUSING_MAX {
            let r = g.admit(ip(1), 0).err().unwrap();
            assert_eq!(r.why, Refusal::Connections);
            said.push(r.room.expect("room to say it"));
        }
        let r = g.admit(ip(1), 0).err().unwrap();
        assert!(r.room.is_none(), "beyond REFUSING_MAX: closed at once");
    }

    #[test]
    fn sends_per_user_are_counted_over_all_their_connections() {
        let rates = SendRates::new(3);
        assert!((0..3).all(|_| rates.take(7, 0)));
        assert!(!rates.take(7, 0), "a fourth in the same second");
        assert!(rates.take(8, 0), "another user has a budget of its own");
        assert!(rates.take(7, 334), "a third of a second brings one back");
        assert!(SendRates::new(0).take(7, 0) && SendRates::new(0).take(7, 0));
        let mut b = Bucket::full(2, 0);
        assert!(b.take(2, 0) && b.take(2, 0) && !b.take(2, 0));
        assert!(b.take(0, 0), "rate 0 is unlimited");
    }
}

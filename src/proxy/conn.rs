//! Data-plane connections: how many may be open at once (overall and per peer uid), when an
//! idle one is closed, and how often a failing `accept` is reported.
//!
//! A connection that sends nothing, or only the HTTP/2 preface, holds a file descriptor; with
//! no bound, enough of them exhaust the process's descriptors and then nothing is accepted,
//! not even on the admin socket. This module counts and times; `server` accepts and serves.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::lock;

/// Open data-plane connections, overall and by peer, against their caps.
pub struct ConnectionLimits {
    /// Open connections by peer: the uid on the Unix socket, `None` for TCP (whose peers
    /// cannot be told apart by uid, so they share one peer's cap).
    open: Mutex<HashMap<Option<u32>, usize>>,
    /// Every open connection.
    total: Mutex<usize>,
    /// Most connections open at once (after fitting the descriptor limit).
    max_total: usize,
    /// Most connections one peer uid may hold.
    max_per_peer: usize,
}

/// Why a new connection was closed at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Full {
    /// `max_connections` connections are open.
    Total(usize),
    /// This peer holds `max_connections_per_uid` of them.
    Peer(Option<u32>, usize),
}

impl std::fmt::Display for Full {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Full::Total(n) => write!(f, "{n} connections are open (limits.max_connections)"),
            Full::Peer(Some(uid), n) => write!(
                f,
                "uid {uid} has {n} connections open (limits.max_connections_per_uid)"
            ),
            Full::Peer(None, n) => write!(
                f,
                "TCP peers have {n} connections open (limits.max_connections_per_uid)"
            ),
        }
    }
}

impl ConnectionLimits {
    /// Caps of `max_total` connections, `max_per_peer` of them for one peer.
    pub fn new(max_total: usize, max_per_peer: usize) -> Arc<ConnectionLimits> {
        Arc::new(ConnectionLimits {
            open: Mutex::new(HashMap::new()),
            total: Mutex::new(0),
            max_total,
            max_per_peer,
        })
    }

    /// Counts a new connection from `peer` until the guard drops, or says which cap it hits.
    pub fn admit(self: &Arc<Self>, peer: Option<u32>) -> Result<ConnectionGuard, Full> {
        let mut total = lock(&self.total);
        if *total >= self.max_total {
            return Err(Full::Total(self.max_total));
        }
        let mut open = lock(&self.open);
        let n = open.entry(peer).or_insert(0);
        if *n >= self.max_per_peer {
            return Err(Full::Peer(peer, self.max_per_peer));
        }
        *n += 1;
        *total += 1;
        Ok(ConnectionGuard {
            limits: self.clone(),
            peer,
        })
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        *lock(&self.total)
    }

    /// The overall cap in force.
    pub fn max_total(&self) -> usize {
        self.max_total
    }
}

/// One open connection's place in the counts; given back on drop.
pub struct ConnectionGuard {
    limits: Arc<ConnectionLimits>,
    peer: Option<u32>,
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        let mut total = lock(&self.limits.total);
        *total -= 1;
        let mut open = lock(&self.limits.open);
        if let Some(n) = open.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.peer);
            }
        }
    }
}

/// The descriptors left for app connections: half of what the process may open beyond a
/// reserve for the admin socket, the databases and journal, listeners and the runtime; the
/// other half is for upstream connections. `nofile` is the soft `RLIMIT_NOFILE`.
pub fn connections_that_fit(nofile: u64) -> usize {
    const RESERVE: u64 = 128;
    (nofile.saturating_sub(RESERVE) / 2).max(1) as usize
}

/// Requests open on one connection, so it can be closed once it has been idle long enough.
#[derive(Clone)]
pub struct Activity(Arc<watch::Sender<usize>>);

/// A request open on a connection; the connection is not idle until it drops.
pub struct Busy(Arc<watch::Sender<usize>>);

impl Activity {
    /// A connection with no request open yet.
    pub fn new() -> Activity {
        Activity(Arc::new(watch::Sender::new(0)))
    }

    /// Marks a request open until the returned guard drops.
    pub fn enter(&self) -> Busy {
        self.0.send_modify(|n| *n += 1);
        Busy(self.0.clone())
    }

    /// Resolves once no request has been open for `idle` without a break.
    pub async fn idle_for(&self, idle: Duration) {
        let mut rx = self.0.subscribe();
        loop {
            if *rx.borrow_and_update() > 0 {
                if rx.changed().await.is_err() {
                    return std::future::pending().await;
                }
                continue;
            }
            match tokio::time::timeout(idle, rx.changed()).await {
                Err(_) => return,
                Ok(Ok(())) => continue,
                Ok(Err(_)) => return std::future::pending().await,
            }
        }
    }
}

impl Default for Activity {
    fn default() -> Self {
        Activity::new()
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n -= 1);
    }
}

/// Reports a recurring failure at most once per interval, with how many were not reported.
pub struct Throttle {
    every: Duration,
    state: Mutex<(Option<Instant>, u64)>,
}

impl Throttle {
    /// At most one report per `every`.
    pub const fn new(every: Duration) -> Throttle {
        Throttle {
            every,
            state: Mutex::new((None, 0)),
        }
    }

    /// `Some(n)` when this occurrence should be reported, `n` being the occurrences
    /// suppressed since the last report; `None` to stay quiet.
    pub fn tick(&self, now: Instant) -> Option<u64> {
        let mut state = lock(&self.state);
        let (last, suppressed) = &mut *state;
        match last {
            Some(t) if now.duration_since(*t) < self.every => {
                *suppressed += 1;
                None
            }
            _ => {
                *last = Some(now);
                Some(std::mem::take(suppressed))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_are_capped_overall_and_per_peer() {
        let limits = ConnectionLimits::new(3, 2);
        let a1 = limits.admit(Some(1000)).unwrap();
        let _a2 = limits.admit(Some(1000)).unwrap();
        assert_eq!(
            limits.admit(Some(1000)).err(),
            Some(Full::Peer(Some(1000), 2))
        );
        let _b = limits.admit(Some(1001)).unwrap();
        assert_eq!(limits.admit(None).err(), Some(Full::Total(3)));
        drop(a1);
        assert_eq!(limits.open(), 2);
        let _tcp = limits.admit(None).unwrap();
        assert!(
            Full::Total(3)
                .to_string()
                .contains("limits.max_connections")
        );
        assert!(
            Full::Peer(Some(7), 2)
                .to_string()
                .contains("uid 7 has 2 connections open (limits.max_connections_per_uid)")
        );
    }

    #[test]
    fn connections_fit_the_descriptor_limit_with_room_to_spare() {
        assert_eq!(connections_that_fit(1024), 448);
        assert_eq!(connections_that_fit(256), 64);
        assert_eq!(connections_that_fit(100), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_is_idle_only_while_no_request_is_open() {
        let activity = Activity::new();
        let busy = activity.enter();
        let idle = Duration::from_secs(60);
        let started = tokio::time::Instant::now();
        let waiting = tokio::spawn({
            let activity = activity.clone();
            async move { activity.idle_for(idle).await }
        });
        tokio::time::sleep(Duration::from_secs(300)).await;
        assert!(!waiting.is_finished(), "idle while a request is open");
        drop(busy);
        waiting.await.unwrap();
        assert_eq!(started.elapsed(), Duration::from_secs(360));

        // A request in between restarts the idle time.
        let started = tokio::time::Instant::now();
        let waiting = tokio::spawn({
            let activity = activity.clone();
            async move { activity.idle_for(idle).await }
        });
        tokio::time::sleep(Duration::from_secs(50)).await;
        drop(activity.enter());
        waiting.await.unwrap();
        assert_eq!(started.elapsed(), Duration::from_secs(110));
    }

    #[test]
    fn a_recurring_failure_is_reported_once_per_interval_with_a_count() {
        let throttle = Throttle::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(throttle.tick(t0), Some(0));
        for i in 1..=500 {
            assert_eq!(throttle.tick(t0 + Duration::from_millis(i * 10)), None);
        }
        assert_eq!(throttle.tick(t0 + Duration::from_secs(10)), Some(500));
        assert_eq!(throttle.tick(t0 + Duration::from_secs(11)), None);
    }
}

//! Shares of the data plane's capacity: how many requests one client and one tenant may have in
//! flight at once, so that one authenticated caller holding its requests open (a body trickled
//! a byte at a time, a stream left open) cannot take the slots every other tenant needs.
//!
//! It also counts the request-body bytes keyward holds (a body read while looking for its
//! `model`, a body kept for a failover) against one budget for all requests together.
//!
//! This module only counts; `call` decides when a request takes its share and answers 503
//! `overloaded` when there is none.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::lock;

/// In-flight requests per client id and per tenant id, against their limits.
pub struct RequestShares {
    /// Counts by client id and by tenant id; an entry is removed when it drops to zero.
    counts: Mutex<Counts>,
    /// `limits.max_requests_per_client` (reloadable).
    per_client: AtomicUsize,
    /// `limits.max_requests_per_tenant` (reloadable).
    per_tenant: AtomicUsize,
}

#[derive(Default)]
struct Counts {
    clients: HashMap<String, usize>,
    tenants: HashMap<String, usize>,
}

/// Which share is used up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exhausted {
    /// The client has `limits.max_requests_per_client` requests in flight.
    Client(usize),
    /// The tenant's clients have `limits.max_requests_per_tenant` requests in flight.
    Tenant(usize),
}

impl Exhausted {
    /// The message the app gets with 503 `overloaded`.
    pub fn message(self) -> String {
        match self {
            Exhausted::Client(n) => format!(
                "this client already has {n} requests in flight (limits.max_requests_per_client); \
                 retry when one has finished"
            ),
            Exhausted::Tenant(n) => format!(
                "this tenant's clients already have {n} requests in flight \
                 (limits.max_requests_per_tenant); retry when one has finished"
            ),
        }
    }
}

impl RequestShares {
    /// Shares of at most `per_client` and `per_tenant` requests.
    pub fn new(per_client: usize, per_tenant: usize) -> Arc<RequestShares> {
        Arc::new(RequestShares {
            counts: Mutex::new(Counts::default()),
            per_client: AtomicUsize::new(per_client),
            per_tenant: AtomicUsize::new(per_tenant),
        })
    }

    /// Takes new limits (a config reload); requests already in flight keep their place, and
    /// new ones are admitted against the new limits.
    pub fn set_limits(&self, per_client: usize, per_tenant: usize) {
        self.per_client.store(per_client, Ordering::Relaxed);
        self.per_tenant.store(per_tenant, Ordering::Relaxed);
    }

    /// Takes one request of `client`'s and `tenant`'s shares, until the returned guard drops.
    pub fn try_take(self: &Arc<Self>, client: &str, tenant: &str) -> Result<ShareGuard, Exhausted> {
        let mut counts = lock(&self.counts);
        let (per_client, per_tenant) = (
            self.per_client.load(Ordering::Relaxed),
            self.per_tenant.load(Ordering::Relaxed),
        );
        let c = counts.clients.get(client).copied().unwrap_or(0);
        if c >= per_client {
            return Err(Exhausted::Client(per_client));
        }
        let t = counts.tenants.get(tenant).copied().unwrap_or(0);
        if t >= per_tenant {
            return Err(Exhausted::Tenant(per_tenant));
        }
        counts.clients.insert(client.to_string(), c + 1);
        counts.tenants.insert(tenant.to_string(), t + 1);
        Ok(ShareGuard {
            shares: self.clone(),
            client: client.to_string(),
            tenant: tenant.to_string(),
        })
    }

    /// Requests in flight for `client` (for tests and status).
    pub fn client_in_flight(&self, client: &str) -> usize {
        lock(&self.counts).clients.get(client).copied().unwrap_or(0)
    }
}

/// One request's place in its client's and tenant's shares; given back on drop.
pub struct ShareGuard {
    shares: Arc<RequestShares>,
    client: String,
    tenant: String,
}

impl Drop for ShareGuard {
    fn drop(&mut self) {
        let mut counts = lock(&self.shares.counts);
        let Counts { clients, tenants } = &mut *counts;
        for (map, key) in [(clients, &self.client), (tenants, &self.tenant)] {
            if let Some(n) = map.get_mut(key.as_str()) {
                *n -= 1;
                if *n == 0 {
                    map.remove(key.as_str());
                }
            }
        }
    }
}

/// Request-body bytes held in memory by all requests together, against
/// `limits.max_buffered_bodies`.
pub struct BodyBudget {
    /// Bytes held now.
    held: AtomicU64,
    /// Most bytes that may be held.
    limit: u64,
}

impl BodyBudget {
    /// A budget of `limit` bytes.
    pub fn new(limit: u64) -> Arc<BodyBudget> {
        Arc::new(BodyBudget {
            held: AtomicU64::new(0),
            limit,
        })
    }

    /// An empty hold on the budget, for one request's body.
    pub fn hold(self: &Arc<Self>) -> BodyHold {
        BodyHold {
            budget: self.clone(),
            bytes: 0,
        }
    }

    /// Bytes held now by every request.
    pub fn held(&self) -> u64 {
        self.held.load(Ordering::Relaxed)
    }

    /// The budget's size.
    pub fn limit(&self) -> u64 {
        self.limit
    }
}

/// The body bytes one request holds; given back when it shrinks or drops.
pub struct BodyHold {
    budget: Arc<BodyBudget>,
    bytes: u64,
}

impl BodyHold {
    /// Holds `n` more bytes, or returns false (holding nothing more) when the budget would be
    /// exceeded.
    pub fn grow(&mut self, n: u64) -> bool {
        let limit = self.budget.limit;
        let taken = self
            .budget
            .held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                held.checked_add(n).filter(|&total| total <= limit)
            })
            .is_ok();
        if taken {
            self.bytes += n;
        }
        taken
    }

    /// Gives back `n` of the bytes held.
    pub fn shrink(&mut self, n: u64) {
        let n = n.min(self.bytes);
        self.bytes -= n;
        self.budget.held.fetch_sub(n, Ordering::AcqRel);
    }

    /// Bytes this request holds.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

impl Drop for BodyHold {
    fn drop(&mut self) {
        self.budget.held.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_and_a_tenant_get_their_share_and_no_more() {
        let shares = RequestShares::new(2, 3);
        let a1 = shares.try_take("a", "t").unwrap();
        let _a2 = shares.try_take("a", "t").unwrap();
        assert_eq!(shares.try_take("a", "t").err(), Some(Exhausted::Client(2)));
        let _b1 = shares.try_take("b", "t").unwrap();
        // The tenant is full although client b has room.
        assert_eq!(shares.try_take("b", "t").err(), Some(Exhausted::Tenant(3)));
        // Another tenant is not affected.
        let _c = shares.try_take("c", "u").unwrap();
        drop(a1);
        assert_eq!(shares.client_in_flight("a"), 1);
        let _b2 = shares.try_take("b", "t").unwrap();
        assert!(
            Exhausted::Client(2)
                .message()
                .contains("max_requests_per_client")
        );
        assert!(
            Exhausted::Tenant(3)
                .message()
                .contains("max_requests_per_tenant")
        );
    }

    #[test]
    fn released_shares_leave_no_entries_behind() {
        let shares = RequestShares::new(1, 1);
        for i in 0..1000 {
            let _g = shares.try_take(&format!("c{i}"), &format!("t{i}")).unwrap();
        }
        let counts = lock(&shares.counts);
        assert!(counts.clients.is_empty() && counts.tenants.is_empty());
    }

    #[test]
    fn body_bytes_are_held_within_one_budget_and_given_back() {
        let budget = BodyBudget::new(100);
        let mut a = budget.hold();
        let mut b = budget.hold();
        assert!(a.grow(60));
        assert!(!b.grow(41), "over the budget");
        assert_eq!(b.bytes(), 0);
        assert!(b.grow(40));
        assert_eq!(budget.held(), 100);
        a.shrink(10);
        assert!(b.grow(10));
        drop(a);
        assert_eq!(budget.held(), 50);
        b.shrink(1000);
        assert_eq!(budget.held(), 0);
    }
}

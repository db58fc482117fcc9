//! keyward: a credential-injecting sidecar. Applications send ordinary HTTP requests to a Unix
//! socket; keyward authenticates the caller, resolves the provider key its tenant and scope
//! allow, unseals it into locked memory, injects it, makes the TLS call itself and streams back
//! only the response. Keys go in; they never come out.
//!
//! Data flows one way through a request: `proxy` accepts → `auth` identifies → `scope`
//! selects → `audit` commits → `seal` unseals → `providers` injects → `proxy` sends and
//! streams back → `audit` completes.

#![deny(unsafe_code)]

pub mod admin;
pub mod audit;
pub mod auth;
pub mod bundle;
pub mod catalog;
pub mod cli;
pub mod config;
pub mod custody;
pub mod daemon;
pub mod governance;
pub mod harden;
mod hex;
pub mod identity;
pub mod logging;
pub mod metrics;
pub mod ownership;
pub mod pool;
pub mod prices;
pub mod providers;
pub mod proxy;
pub mod scope;
pub mod seal;
pub mod state;
pub mod store;
pub mod systemd;
pub mod traces;
pub mod units;
pub mod wire;

/// Locks `m`, carrying on if a thread panicked while holding it. Every mutex here guards state
/// that stays consistent at each step (a queue, a pool, a counter map), and a daemon that
/// stopped serving because one request panicked would be worse than the panic.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

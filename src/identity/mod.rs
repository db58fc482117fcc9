//! Cloud identities (README, "Credential kinds"): what a credential's secret is — a static API
//! key or a JSON document from which keyward derives what it injects (an OAuth2 access token,
//! AWS session credentials) — how each document is checked when it is added, and the cache
//! that keeps derived secrets in locked memory until shortly before they expire.
//!
//! `identity` sits low in the tree: it must not do I/O, know HTTP, SQL or the catalog. Fetching
//! a derived secret is a future the caller hands to [`cache::DerivedCache::get`]; the caller owns
//! the network.

pub mod cache;
pub mod kind;
pub mod oauth;

pub use cache::{DerivedCache, Fresh};
pub use kind::{CredentialKind, KindError};

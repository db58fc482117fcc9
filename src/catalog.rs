//! The in-memory catalog: an immutable snapshot of tenants, clients and credentials, indexed
//! for the data plane, swapped whole after every admin change.
//!
//! The data plane reads only this (no SQLite read per request). `catalog` must not decrypt.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use crate::store::{ClientRow, CredentialRow, Snapshot, TenantRow, VersionRow};

/// How a credential version stands at a given moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VersionState {
    /// The newest live version.
    Current,
    /// Superseded by a rotation but still a fallback until the overlap ends.
    Overlapping,
    /// The overlap ended.
    Retired,
    /// Revoked (the version or the whole credential).
    Revoked,
}

impl VersionState {
    /// Lower-case name used in listings.
    pub fn as_str(self) -> &'static str {
        match self {
            VersionState::Current => "current",
            VersionState::Overlapping => "overlapping",
            VersionState::Retired => "retired",
            VersionState::Revoked => "revoked",
        }
    }
}

/// The state of `version` of `cred` at Unix time `now`.
pub fn version_state(cred: &CredentialRow, version: &VersionRow, now: i64) -> VersionState {
    if cred.revoked_at.is_some() || version.revoked_at.is_some() {
        return VersionState::Revoked;
    }
    if version.retired_at.is_some() {
        return VersionState::Retired;
    }
    match version.overlap_until {
        Some(until) if until <= now => VersionState::Retired,
        Some(_) => VersionState::Overlapping,
        None => VersionState::Current,
    }
}

/// An indexed, immutable view of the store.
#[derive(Debug, Default)]
pub struct Catalog {
    /// Tenants by id.
    pub tenants: HashMap<String, Arc<TenantRow>>,
    /// Tenant ids by name.
    pub tenant_ids: HashMap<String, String>,
    /// Active clients by SHA-256 of their token.
    pub clients_by_token: HashMap<Vec<u8>, Arc<ClientRow>>,
    /// Active clients by bound uid.
    pub clients_by_uid: HashMap<u32, Arc<ClientRow>>,
    /// Credentials by tenant id, in creation order.
    pub credentials_by_tenant: HashMap<String, Vec<Arc<CredentialRow>>>,
}

impl Catalog {
    /// Indexes a snapshot.
    pub fn build(snapshot: Snapshot) -> Catalog {
        let mut cat = Catalog::default();
        for t in snapshot.tenants {
            cat.tenant_ids.insert(t.name.clone(), t.id.clone());
            cat.tenants.insert(t.id.clone(), Arc::new(t));
        }
        for c in snapshot
            .clients
            .into_iter()
            .filter(|c| c.revoked_at.is_none())
        {
            let c = Arc::new(c);
            if let Some(uid) = c.uid {
                cat.clients_by_uid.insert(uid, c.clone());
            }
            cat.clients_by_token.insert(c.token_hash.clone(), c);
        }
        for c in snapshot.credentials {
            cat.credentials_by_tenant
                .entry(c.tenant_id.clone())
                .or_default()
                .push(Arc::new(c));
        }
        cat
    }

    /// The (credential id, version) pairs that can still serve at `now` (Unix seconds): current
    /// or overlapping, of a credential that still exists.
    pub fn serving_versions(&self, now: i64) -> std::collections::HashSet<(String, u32)> {
        self.credentials_by_tenant
            .values()
            .flatten()
            .flat_map(|c| {
                c.versions
                    .iter()
                    .filter(move |v| {
                        matches!(
                            version_state(c, v, now),
                            VersionState::Current | VersionState::Overlapping
                        )
                    })
                    .map(move |v| (c.id.clone(), v.version))
            })
            .collect()
    }

    /// The tenant with this id.
    pub fn tenant(&self, id: &str) -> Option<&Arc<TenantRow>> {
        self.tenants.get(id)
    }

    /// Whether an active (not revoked) client has this id.
    pub fn has_client(&self, id: &str) -> bool {
        self.clients_by_token.values().any(|c| c.id == id)
            || self.clients_by_uid.values().any(|c| c.id == id)
    }

    /// The credentials of a tenant.
    pub fn credentials(&self, tenant_id: &str) -> &[Arc<CredentialRow>] {
        self.credentials_by_tenant
            .get(tenant_id)
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }
}

/// The current catalog, replaced atomically. Readers clone an `Arc` and never wait on a
/// writer for longer than that clone.
#[derive(Debug, Default)]
pub struct CatalogHandle {
    /// The snapshot in force.
    current: RwLock<Arc<Catalog>>,
    /// Bumped on every replace, so a long-lived reader (a streaming response) notices a change
    /// with one atomic load and looks at the new snapshot only then.
    generation: AtomicU64,
}

impl CatalogHandle {
    /// Starts with `catalog`.
    pub fn new(catalog: Catalog) -> CatalogHandle {
        CatalogHandle {
            current: RwLock::new(Arc::new(catalog)),
            generation: AtomicU64::new(0),
        }
    }

    /// How many times the snapshot was replaced.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The snapshot in force now.
    pub fn load(&self) -> Arc<Catalog> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Replaces the snapshot.
    pub fn replace(&self, catalog: Catalog) {
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(catalog);
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// Whether client `id` is still active, re-checked only when the snapshot changed since
    /// `seen` (which is updated): a streaming response asks this for every chunk.
    pub fn client_still_active(&self, id: &str, seen: &mut u64) -> bool {
        let now = self.generation();
        if now == *seen {
            return true;
        }
        *seen = now;
        self.load().has_client(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(id: &str, uid: Option<u32>, revoked_at: Option<i64>) -> ClientRow {
        ClientRow {
            id: id.into(),
            tenant_id: "t".into(),
            name: id.into(),
            team: None,
            uid,
            workflows: vec![],
            token_hash: id.as_bytes().to_vec(),
            created_at: 0,
            revoked_at,
        }
    }

    #[test]
    fn revoked_clients_are_neither_indexed_nor_active() {
        let cat = Catalog::build(Snapshot {
            tenants: vec![],
            clients: vec![
                client("cli_token", None, None),
                client("cli_uid", Some(1000), None),
                client("cli_gone", None, Some(5)),
                client("cli_gone_uid", Some(1001), Some(5)),
            ],
            credentials: vec![],
        });
        assert!(cat.has_client("cli_token"));
        assert!(cat.has_client("cli_uid"));
        // Other active clients, token-only and uid-bound, must not vouch for a revoked one.
        for gone in ["cli_gone", "cli_gone_uid", "cli_never"] {
            assert!(!cat.has_client(gone), "{gone} counts as active");
        }
        assert!(!cat.clients_by_token.contains_key(b"cli_gone".as_slice()));
        assert!(!cat.clients_by_uid.contains_key(&1001));
        assert_eq!(cat.clients_by_uid[&1000].id, "cli_uid");
    }
}

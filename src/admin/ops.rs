//! What each admin operation does: validate, change the store and commit its audit event,
//! refresh the catalog, and answer with the typed response of [`super::api`].
//!
//! `ops` must not run raw SQL (it calls `store` and `audit`) and no response ever carries a
//! secret; a client token is returned once, by `create_client`. These functions block (SQLite,
//! the audit writer): the server calls them on the blocking pool.

use crate::audit::{AuditError, Event, EventKind};
use crate::catalog::{Catalog, version_state};
use crate::identity::CredentialKind;
use crate::seal::{CredentialRef, Purpose, Secret, seal_with_tenant_key};
use crate::state::State;
use crate::store::{self, ClientRow, CredentialRow, StoreError, TenantRow, VersionRow};
use crate::units::{format_duration, now_unix};

use super::api::{self, ApiError, ErrorCode};

type Reply<T> = Result<T, ApiError>;

/// How a change refused for want of its audit record begins (answered 503).
const AUDIT_NOT_APPLIED: &str = "not applied: the audit record could not be written";

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        let code = match &e {
            StoreError::Conflict(m) if m.starts_with(AUDIT_NOT_APPLIED) => {
                ErrorCode::AuditUnavailable
            }
            StoreError::NotFound { .. } => ErrorCode::NotFound,
            StoreError::Invalid(_) => ErrorCode::BadRequest,
            StoreError::Duplicate { .. } | StoreError::Conflict(_) => ErrorCode::Conflict,
            _ => ErrorCode::Internal,
        };
        ApiError::new(code, e.to_string())
    }
}

impl From<AuditError> for ApiError {
    fn from(e: AuditError) -> ApiError {
        ApiError::internal(e.to_string())
    }
}

/// `GET /v1/status`.
pub fn status(state: &State) -> api::system::Status {
    let cat = state.catalog.load();
    let config = state.config.load();
    api::system::Status {
        version: env!("CARGO_PKG_VERSION").to_string(),
        pid: std::process::id(),
        uptime_s: state.started.elapsed().as_secs(),
        state_dir: config.state_dir.display().to_string(),
        socket: config.socket.display().to_string(),
        admin_socket: config.admin_socket.display().to_string(),
        listen_tcp: config.listen_tcp.map(|a| a.to_string()),
        tenants: cat.tenants.len(),
        clients: cat.clients_by_token.len(),
        credentials: cat
            .credentials_by_tenant
            .values()
            .map(Vec::len)
            .sum::<usize>(),
        memory_lock: state.memory_lock.clone(),
        master_key_source: state.master.identity(),
        master_key_provider: state.master.provider().to_string(),
        kek_operations: state.master.operations(),
        instance: state.instance.clone(),
        audit_export: state.audit.export_status(),
        bundle: state.bundle.as_ref().map(|b| b.status()),
        in_flight: state.in_flight(),
        connections: state.connections.open(),
        max_connections: state.connections.max_total(),
        buffered_body_bytes: state.bodies.held(),
        store_accesses: state.store.accesses(),
        governance: state.governance.status(),
    }
}

/// Every change: refused on a daemon serving a bundle; otherwise `f` validates, changes the
/// store and commits its audit event in one store transaction (the audit commit happens
/// first; if it fails the change rolls back), then the catalog is refreshed.
fn change<T>(state: &State, f: impl FnOnce() -> Reply<T>) -> Reply<T> {
    if let Some(bundle) = &state.bundle {
        return Err(ApiError::conflict(bundle.read_only()));
    }
    let reply = f()?;
    state.reload_catalog()?;
    Ok(reply)
}

/// `POST /v1/tenants`.
pub fn create_tenant(state: &State, new: api::tenants::NewTenant) -> Reply<api::tenants::Tenant> {
    change(state, || tenant_add(state, new))
}

/// `POST /v1/credentials`.
pub fn create_credential(
    state: &State,
    new: api::credentials::NewCredential,
) -> Reply<api::credentials::CredentialCreated> {
    change(state, || cred_add(state, new))
}

/// `POST /v1/credentials/{id}/rotate`.
pub fn rotate_credential(
    state: &State,
    id: &str,
    rotate: api::credentials::RotateCredential,
) -> Reply<api::credentials::CredentialRotated> {
    change(state, || {
        cred_rotate(state, id, rotate.overlap_s, rotate.secret.0)
    })
}

/// `POST /v1/credentials/{id}/revoke`.
pub fn revoke_credential(
    state: &State,
    id: &str,
    revoke: api::credentials::RevokeCredential,
) -> Reply<api::credentials::CredentialRevoked> {
    change(state, || cred_revoke(state, id, revoke.version))
}

/// `DELETE /v1/credentials/{id}`.
pub fn delete_credential(state: &State, id: &str) -> Reply<api::credentials::CredentialDeleted> {
    change(state, || cred_delete(state, id))
}

/// `POST /v1/credentials/{id}/test`: one read-only call with the credential through the data
/// plane (README, "Testing a credential"). Unlike the other operations it does not block: it
/// awaits the call. Refused (404) for an unknown id or version, (409) for a credential that
/// cannot serve or a target keyward knows no read-only call for; the provider's refusal of the
/// key is an answer (`ok: false`), not a refusal.
pub async fn test_credential(
    state: std::sync::Arc<State>,
    id: &str,
    test: api::credentials::TestCredential,
    peer: Option<crate::auth::PeerCred>,
) -> Reply<api::credentials::CredentialTested> {
    use crate::proxy::operator::{Pinned, operator_call};
    use crate::scope::{PinError, pinned};
    let catalog = state.catalog.load();
    let (candidate, tenant_id) =
        pinned(&catalog, id, test.version, now_unix()).map_err(|e| match e {
            PinError::Unknown(_) => ApiError::not_found(e.to_string()),
            other => ApiError::conflict(other.to_string()),
        })?;
    let config = state.config.load_full();
    let target = config
        .targets
        .lookup(&candidate.credential.target)
        .map_err(|e| ApiError::conflict(e.to_string()))?;
    let path = crate::providers::test_path(target).ok_or_else(|| {
        ApiError::conflict(format!(
            "target {} is of family none: keyward knows no read-only call to test its keys with; \
             make a call through the data socket instead",
            target.name
        ))
    })?;
    let (version, preview) = {
        let v = candidate.version();
        (v.version, v.preview.clone())
    };
    let target_name = target.name.clone();
    let family = target.family;
    let pinned = Pinned {
        candidate,
        tenant_id,
        peer,
    };
    let answer = operator_call(state, pinned, path)
        .await
        .map_err(ApiError::internal)?;
    let (status, error, error_message) = match answer.error {
        Some((code, message)) => (None, Some(code), Some(message)),
        None => (Some(answer.status), None, None),
    };
    let ok = status.is_some_and(|s| (200..300).contains(&s));
    let verdict = test_verdict(
        id,
        family,
        status,
        error.as_deref(),
        error_message.as_deref(),
    );
    Ok(api::credentials::CredentialTested {
        id: id.to_string(),
        version,
        preview,
        target: target_name,
        request: format!("GET {path}"),
        status,
        error,
        error_message,
        latency_ms: answer.head_latency.as_millis() as u64,
        call_id: answer.call_id,
        ok,
        verdict,
    })
}

/// What a test call's outcome means for the key, and what to do.
fn test_verdict(
    id: &str,
    family: crate::providers::Family,
    status: Option<u16>,
    error: Option<&str>,
    message: Option<&str>,
) -> String {
    match (status, error) {
        (Some(200..=299), _) => "the provider accepted the key".into(),
        (Some(s @ (401 | 403)), _) => {
            let permission = match family {
                crate::providers::Family::Bedrock if s == 403 => {
                    " (or lacks the bedrock:ListAsyncInvokes permission this test needs)"
                }
                _ => "",
            };
            format!(
                "the provider refused the key ({s}): it is wrong, revoked or expired at the \
                 provider{permission}; check it in the provider's console, then replace it \
                 with `keyward cred rotate {id}` (new key on stdin) or take it out of service \
                 with `keyward cred revoke {id}`"
            )
        }
        (Some(429), _) => "the provider is rate limiting this key or its quota is used up \
                           (429): the key was recognised; retry later or raise the quota"
            .into(),
        (Some(404), _) => "the provider has no such endpoint (404): the key was not judged; \
                           check the target's base_url"
            .into(),
        (Some(s @ 500..), _) => {
            format!("the provider failed ({s}): the key was not judged; try again later")
        }
        (Some(s), _) => format!("the provider answered {s}: the key was not judged"),
        (None, Some(code)) => format!(
            "keyward could not complete the call ({code}): {}",
            message.unwrap_or("no message")
        ),
        (None, None) => "the call got no answer".into(),
    }
}

/// `POST /v1/clients`.
pub fn create_client(
    state: &State,
    new: api::clients::NewClient,
) -> Reply<api::clients::ClientCreated> {
    change(state, || {
        client_add(
            state,
            &new.tenant,
            new.name,
            new.team,
            new.uid,
            new.workflows,
        )
    })
}

/// `POST /v1/clients/{id}/revoke`.
pub fn revoke_client(state: &State, id: &str) -> Reply<api::clients::ClientRevoked> {
    change(state, || client_revoke(state, id))
}

/// Names of tenants, clients, credentials, teams and workflows: short, printable, no spaces.
fn check_name(kind: &str, name: &str) -> Result<(), ApiError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(ApiError::bad_request(format!(
            "{kind} name `{}` is invalid: use 1-64 characters from a-z, A-Z, 0-9, '-', '_', '.'",
            name.escape_debug()
        )))
    }
}

/// Checks a secret against its kind and returns the preview to store: a key by the rules of
/// [`check_secret`], a document by its kind's (README, "Credential kinds").
fn check_kind_secret(kind: CredentialKind, secret: &Secret) -> Result<String, ApiError> {
    if !kind.is_document() {
        check_secret(secret)?;
    } else if secret.is_empty() {
        return Err(ApiError::bad_request(format!(
            "the secret is empty: pipe {} on standard input",
            kind.expected_input()
        )));
    } else if secret.len() > 16384 {
        return Err(ApiError::bad_request(format!(
            "the {kind} secret is longer than 16384 bytes; pipe {} on standard input",
            kind.expected_input()
        )));
    }
    kind.check(secret)
        .map_err(|e| ApiError::bad_request(e.to_string()))
}

/// Provider keys go into an HTTP header: printable ASCII only. The message never shows the key.
fn check_secret(secret: &Secret) -> Result<(), ApiError> {
    if secret.is_empty() {
        return Err(ApiError::bad_request(
            "the secret is empty: pipe the provider key on standard input",
        ));
    }
    if secret.len() > 8192 {
        return Err(ApiError::bad_request(
            "the secret is longer than 8192 bytes; is this the right input?",
        ));
    }
    if let Some(pos) = secret
        .expose_secret()
        .iter()
        .position(|b| !(0x21..=0x7e).contains(b))
    {
        return Err(ApiError::bad_request(format!(
            "the secret has a space, control or non-ASCII byte at position {pos}; provider keys \
             are printable ASCII (did a trailing newline or \\r sneak in?)"
        )));
    }
    Ok(())
}

fn audit_now(state: &State, event: Event) -> Result<u64, StoreError> {
    let handle = state.runtime.clone();
    handle
        .block_on(state.audit.commit(event))
        .map_err(|e| StoreError::Conflict(format!("{AUDIT_NOT_APPLIED} ({e})")))
}

fn tenant_add(state: &State, new: api::tenants::NewTenant) -> Reply<api::tenants::Tenant> {
    let api::tenants::NewTenant {
        name,
        max_key_age_s,
        on_expiry,
        rotation_overlap_s,
    } = new;
    check_name("tenant", &name)?;
    let on_expiry = on_expiry
        .unwrap_or(api::tenants::OnExpiry::Deny)
        .as_str()
        .to_string();
    // Stored as SQLite integers: a figure past i64 seconds is no policy anyone means.
    for (what, s) in [
        ("max_key_age_s", max_key_age_s),
        ("rotation_overlap_s", rotation_overlap_s),
    ] {
        if s.is_some_and(|s| s > MAX_POLICY_SECONDS) {
            return Err(ApiError::bad_request(format!(
                "{what} is over {MAX_POLICY_SECONDS} seconds (100 years)"
            )));
        }
    }
    let id = store::new_id("ten");
    let wrap = |purpose| {
        state
            .master
            .new_wrapped_key(purpose)
            .map_err(|e| ApiError::internal(format!("cannot create the tenant's keys: {e}")))
    };
    let row = TenantRow {
        wrapped_key: wrap(Purpose::TenantKey { tenant: &id })?,
        wrapped_fp_key: wrap(Purpose::FingerprintKey { tenant: &id })?,
        id,
        name,
        max_key_age_s: max_key_age_s.map(|s| s as i64),
        on_expiry,
        rotation_overlap_s: rotation_overlap_s.map(|s| s as i64),
        created_at: now_unix(),
    };
    state.store.write(|tx| {
        store::insert_tenant(tx, &row)?;
        audit_now(
            state,
            Event {
                tenant: Some(row.name.clone()),
                detail: Some(tenant_policy_text(&row)),
                ..Event::new(EventKind::TenantCreated)
            },
        )
    })?;
    Ok(tenant_view(&row))
}

fn tenant_policy_text(t: &TenantRow) -> String {
    let age = t
        .max_key_age_s
        .map(|s| format_duration(std::time::Duration::from_secs(s as u64)));
    let overlap = t
        .rotation_overlap_s
        .map(|s| format_duration(std::time::Duration::from_secs(s as u64)));
    format!(
        "max_key_age={} on_expiry={} rotation_overlap={}",
        age.as_deref().unwrap_or("none"),
        t.on_expiry,
        overlap.as_deref().unwrap_or("24h")
    )
}

/// Longest key age or overlap a tenant policy takes, seconds (100 years).
const MAX_POLICY_SECONDS: u64 = 100 * 365 * 86_400;

fn tenant_view(t: &TenantRow) -> api::tenants::Tenant {
    let dur = |s: i64| format_duration(std::time::Duration::from_secs(s.max(0) as u64));
    api::tenants::Tenant {
        id: t.id.clone(),
        name: t.name.clone(),
        max_key_age: t.max_key_age_s.map(dur),
        on_expiry: t.on_expiry.clone(),
        rotation_overlap: dur(t.rotation_overlap_s.unwrap_or(86_400)),
        created_at: crate::units::format_time(t.created_at),
    }
}

/// `GET /v1/tenants`, by name.
pub fn list_tenants(state: &State) -> Vec<api::tenants::Tenant> {
    let cat = state.catalog.load();
    let mut tenants: Vec<&TenantRow> = cat.tenants.values().map(|t| t.as_ref()).collect();
    tenants.sort_by(|a, b| a.name.cmp(&b.name));
    tenants.into_iter().map(tenant_view).collect()
}

fn cred_add(
    state: &State,
    new: api::credentials::NewCredential,
) -> Reply<api::credentials::CredentialCreated> {
    let api::credentials::NewCredential {
        tenant,
        target,
        name,
        models,
        capabilities,
        teams,
        workflows,
        priority,
        kind,
        secret,
    } = new;
    let (tenant, secret) = (tenant.as_str(), secret.0);
    check_name("credential", &name)?;
    let kind: CredentialKind =
        kind.as_deref().unwrap_or("api-key").parse().map_err(
            |e: crate::identity::kind::UnknownKind| ApiError::bad_request(e.to_string()),
        )?;
    {
        let config = state.config.load();
        let t = config
            .targets
            .lookup(&target)
            .map_err(|e| ApiError::bad_request(e.to_string()))?;
        crate::providers::check_kind(t, kind).map_err(ApiError::bad_request)?;
    }
    let preview = check_kind_secret(kind, &secret)?;
    for m in &models {
        if m.is_empty() || m.len() > 128 || m.chars().any(|c| c.is_control() || c == ' ') {
            return Err(ApiError::bad_request(format!(
                "--model `{}` is not a valid model glob",
                m.escape_debug()
            )));
        }
    }
    for c in &capabilities {
        c.parse::<crate::scope::attrs::Capability>()
            .map_err(|e| ApiError::bad_request(e.to_string()))?;
    }
    for t in &teams {
        check_name("team", t)?;
    }
    for w in &workflows {
        check_name("workflow", w)?;
    }
    let now = now_unix();
    let reply = state.store.write(|tx| {
        let t = store::tenant_by_name(tx, tenant)?;
        let id = store::new_id("cred");
        let cred = CredentialRow {
            id: id.clone(),
            tenant_id: t.id.clone(),
            target: target.clone(),
            name: name.clone(),
            models: models.clone(),
            capabilities: capabilities.clone(),
            teams: teams.clone(),
            workflows: workflows.clone(),
            priority: priority.unwrap_or(100),
            created_at: now,
            revoked_at: None,
            kind,
            versions: vec![],
        };
        store::insert_credential(tx, &cred, &t.name)?;
        let keys = state
            .tenant_keys_of(&t)
            .map_err(|e| StoreError::Conflict(format!("cannot seal: {e}")))?;
        let sealed = seal_with_tenant_key(
            &keys.tenant,
            CredentialRef {
                tenant: &t.id,
                credential: &id,
                version: 1,
            },
            &secret,
        );
        store::insert_version(tx, &id, &VersionRow::new(1, sealed, preview.clone(), now))?;
        audit_now(
            state,
            Event {
                tenant: Some(t.name.clone()),
                target: Some(target.clone()),
                credential_id: Some(id.clone()),
                credential_version: Some(1),
                detail: Some(format!("name={name} kind={kind} {}", scope_text(&cred))),
                ..Event::new(EventKind::CredentialCreated)
            },
        )?;
        Ok(api::credentials::CredentialCreated {
            id,
            version: 1,
            preview: preview.clone(),
            tenant: t.name.clone(),
            target: target.clone(),
            name: name.clone(),
            kind: kind.as_str().to_string(),
        })
    })?;
    Ok(reply)
}

fn scope_text(c: &CredentialRow) -> String {
    let part = |label: &str, list: &[String]| {
        if list.is_empty() {
            None
        } else {
            Some(format!("{label}={}", list.join(",")))
        }
    };
    let parts: Vec<String> = [
        part("models", &c.models),
        part("capabilities", &c.capabilities),
        part("teams", &c.teams),
        part("workflows", &c.workflows),
    ]
    .into_iter()
    .flatten()
    .collect();
    if parts.is_empty() {
        "any".into()
    } else {
        parts.join(" ")
    }
}

fn cred_rotate(
    state: &State,
    id: &str,
    overlap_s: Option<u64>,
    secret: Secret,
) -> Reply<api::credentials::CredentialRotated> {
    if overlap_s.is_some_and(|s| s > MAX_POLICY_SECONDS) {
        return Err(ApiError::bad_request(format!(
            "overlap_s is over {MAX_POLICY_SECONDS} seconds (100 years)"
        )));
    }
    let now = now_unix();
    let reply = state.store.write(|tx| {
        let cred = store::credential(tx, id)?;
        // The new version is a secret of the same kind as the first.
        let preview =
            check_kind_secret(cred.kind, &secret).map_err(|e| StoreError::Invalid(e.message))?;
        if cred.revoked_at.is_some() {
            return Err(StoreError::Conflict(format!(
                "credential {id} is revoked and cannot be rotated; add a new credential with \
                 `keyward cred add`"
            )));
        }
        let tenant = state
            .catalog
            .load()
            .tenant(&cred.tenant_id)
            .cloned()
            .ok_or_else(|| StoreError::Conflict(format!("tenant of credential {id} is missing")))?;
        let version = store::latest_version(tx, id)? + 1;
        let overlap = overlap_s
            .map(|s| s as i64)
            .or(tenant.rotation_overlap_s)
            .unwrap_or(86_400);
        let superseded = store::start_overlap(tx, id, version, now + overlap)?;
        let keys = state
            .tenant_keys_of(&tenant)
            .map_err(|e| StoreError::Conflict(format!("cannot seal: {e}")))?;
        let sealed = seal_with_tenant_key(
            &keys.tenant,
            CredentialRef {
                tenant: &tenant.id,
                credential: id,
                version,
            },
            &secret,
        );
        store::insert_version(
            tx,
            id,
            &VersionRow::new(version, sealed, preview.clone(), now),
        )?;
        let until = crate::units::format_time(now + overlap);
        audit_now(
            state,
            Event {
                tenant: Some(tenant.name.clone()),
                target: Some(cred.target.clone()),
                credential_id: Some(id.to_string()),
                credential_version: Some(version),
                detail: Some(format!(
                    "previous versions {superseded:?} overlap until {until}"
                )),
                ..Event::new(EventKind::CredentialRotated)
            },
        )?;
        Ok(api::credentials::CredentialRotated {
            id: id.to_string(),
            version,
            preview: preview.clone(),
            overlap_until: until,
        })
    })?;
    Ok(reply)
}

fn cred_revoke(
    state: &State,
    id: &str,
    version: Option<u32>,
) -> Reply<api::credentials::CredentialRevoked> {
    let now = now_unix();
    let reply = state.store.write(|tx| {
        let cred = store::credential(tx, id)?;
        let versions = store::revoke_credential(tx, id, version, now)?;
        let tenant = tenant_name(&state.catalog.load(), &cred.tenant_id);
        for v in &versions {
            audit_now(
                state,
                Event {
                    tenant: Some(tenant.clone()),
                    target: Some(cred.target.clone()),
                    credential_id: Some(id.to_string()),
                    credential_version: Some(*v),
                    ..Event::new(EventKind::CredentialRevoked)
                },
            )?;
        }
        Ok(api::credentials::CredentialRevoked {
            id: id.to_string(),
            revoked_versions: versions,
        })
    })?;
    Ok(reply)
}

fn cred_delete(state: &State, id: &str) -> Reply<api::credentials::CredentialDeleted> {
    let reply = state.store.write(|tx| {
        let cred = store::delete_credential(tx, id)?;
        audit_now(
            state,
            Event {
                tenant: Some(tenant_name(&state.catalog.load(), &cred.tenant_id)),
                target: Some(cred.target.clone()),
                credential_id: Some(id.to_string()),
                detail: Some("wrapped data keys destroyed".into()),
                ..Event::new(EventKind::CredentialDeleted)
            },
        )?;
        Ok(api::credentials::CredentialDeleted {
            id: id.to_string(),
            deleted: true,
        })
    })?;
    state.store.checkpoint()?;
    Ok(reply)
}

fn tenant_name(cat: &Catalog, tenant_id: &str) -> String {
    cat.tenant(tenant_id)
        .map(|t| t.name.clone())
        .unwrap_or_else(|| tenant_id.to_string())
}

/// `GET /v1/credentials`: every version, by tenant and name, newest version first.
pub fn list_credentials(
    state: &State,
    tenant: Option<&str>,
) -> Reply<Vec<api::credentials::CredentialVersion>> {
    let cat = state.catalog.load();
    let tenant_id = match tenant {
        Some(name) => Some(cat.tenant_ids.get(name).cloned().ok_or_else(|| {
            ApiError::not_found(format!(
                "tenant `{name}` does not exist (see `keyward tenant list`)"
            ))
        })?),
        None => None,
    };
    let now = now_unix();
    let wall_now = std::time::SystemTime::now();
    let mut lines = Vec::new();
    let mut creds: Vec<_> = cat
        .credentials_by_tenant
        .iter()
        .filter(|(t, _)| tenant_id.as_ref().is_none_or(|id| id == *t))
        .flat_map(|(_, list)| list.iter())
        .collect();
    creds.sort_by(|a, b| {
        (tenant_name(&cat, &a.tenant_id), &a.name).cmp(&(tenant_name(&cat, &b.tenant_id), &b.name))
    });
    for c in creds {
        let t = cat.tenant(&c.tenant_id);
        for v in c.versions.iter().rev() {
            let lifecycle = version_state(c, v, now);
            let expired = t
                .and_then(|t| t.max_key_age_s)
                .is_some_and(|max| now - v.created_at > max);
            let overlap_until = v
                .overlap_until
                .filter(|_| lifecycle == crate::catalog::VersionState::Overlapping);
            let (state_name, until) = shown_state(
                lifecycle,
                overlap_until,
                expired,
                state.pool.status(&c.id, v.version, wall_now),
            );
            lines.push(api::credentials::CredentialVersion {
                id: c.id.clone(),
                tenant: tenant_name(&cat, &c.tenant_id),
                target: c.target.clone(),
                kind: c.kind.as_str().to_string(),
                name: c.name.clone(),
                version: v.version,
                preview: v.preview.clone(),
                state: state_name.to_string(),
                until: until.map(crate::units::format_time),
                lifecycle: lifecycle.as_str().to_string(),
                overlap_until: overlap_until.map(crate::units::format_time),
                expired,
                priority: c.priority,
                created_at: crate::units::format_time(v.created_at),
                age: format_duration(std::time::Duration::from_secs(
                    (now - v.created_at).max(0) as u64
                )),
                scope: scope_text(c),
            });
        }
    }
    Ok(lines)
}

/// The state `cred list` shows for a version and until when it lasts (Unix seconds): what
/// takes it out of service wins over what merely describes it — revoked and retired first,
/// then quarantined, cooling down, expired (past the tenant's max key age), and finally
/// current or overlapping.
fn shown_state(
    lifecycle: crate::catalog::VersionState,
    overlap_until: Option<i64>,
    expired: bool,
    pool: crate::pool::PoolStatus,
) -> (&'static str, Option<i64>) {
    use crate::catalog::VersionState;
    use crate::pool::unix_secs;
    match lifecycle {
        VersionState::Revoked | VersionState::Retired => (lifecycle.as_str(), None),
        _ if pool.quarantine_until.is_some() => {
            ("quarantined", pool.quarantine_until.map(unix_secs))
        }
        _ if pool.cooldown_until.is_some() => ("cooling_down", pool.cooldown_until.map(unix_secs)),
        _ if expired => ("expired", None),
        VersionState::Overlapping => ("overlapping", overlap_until),
        VersionState::Current => ("current", None),
    }
}

fn client_add(
    state: &State,
    tenant: &str,
    name: String,
    team: Option<String>,
    uid: Option<u32>,
    workflows: Vec<String>,
) -> Reply<api::clients::ClientCreated> {
    check_name("client", &name)?;
    if let Some(t) = &team {
        check_name("team", t)?;
    }
    for w in &workflows {
        check_name("workflow", w)?;
    }
    let (token, token_hash) = crate::auth::new_token();
    let reply = state.store.write(|tx| {
        let t = store::tenant_by_name(tx, tenant)?;
        let row = ClientRow {
            id: store::new_id("cli"),
            tenant_id: t.id.clone(),
            name: name.clone(),
            team: team.clone(),
            uid,
            workflows: workflows.clone(),
            token_hash: token_hash.clone(),
            created_at: now_unix(),
            revoked_at: None,
        };
        store::insert_client(tx, &row, &t.name)?;
        audit_now(
            state,
            Event {
                tenant: Some(t.name.clone()),
                client_id: Some(row.id.clone()),
                team: team.clone(),
                peer_uid: uid,
                detail: Some(format!("name={name}")),
                ..Event::new(EventKind::ClientCreated)
            },
        )?;
        Ok(api::clients::ClientCreated {
            id: row.id.clone(),
            tenant: t.name.clone(),
            name: name.clone(),
            team: team.clone(),
            uid,
            token: token.clone(),
        })
    })?;
    Ok(reply)
}

/// `GET /v1/clients`.
pub fn list_clients(state: &State, tenant: Option<&str>) -> Reply<Vec<api::clients::Client>> {
    let snapshot = match &state.bundle {
        Some(bundle) => store::Snapshot {
            tenants: state
                .catalog
                .load()
                .tenants
                .values()
                .map(|t| t.as_ref().clone())
                .collect(),
            clients: bundle.clients(),
            credentials: Vec::new(),
        },
        None => state.store.snapshot()?,
    };
    let names: std::collections::HashMap<&str, &str> = snapshot
        .tenants
        .iter()
        .map(|t| (t.id.as_str(), t.name.as_str()))
        .collect();
    if let Some(name) = tenant
        && !names.values().any(|n| *n == name)
    {
        return Err(ApiError::not_found(format!(
            "tenant `{name}` does not exist (see `keyward tenant list`)"
        )));
    }
    let lines = snapshot
        .clients
        .iter()
        .filter(|c| tenant.is_none_or(|n| names.get(c.tenant_id.as_str()) == Some(&n)))
        .map(|c| api::clients::Client {
            id: c.id.clone(),
            tenant: names.get(c.tenant_id.as_str()).map(|n| n.to_string()),
            name: c.name.clone(),
            team: c.team.clone(),
            uid: c.uid,
            workflows: c.workflows.clone(),
            state: if c.revoked_at.is_some() {
                "revoked"
            } else {
                "active"
            }
            .to_string(),
            created_at: crate::units::format_time(c.created_at),
        })
        .collect();
    Ok(lines)
}

fn client_revoke(state: &State, id: &str) -> Reply<api::clients::ClientRevoked> {
    state
        .store
        .write(|tx| {
            let (_, tenant) = store::revoke_client(tx, id, now_unix())?;
            audit_now(
                state,
                Event {
                    tenant: Some(tenant),
                    client_id: Some(id.to_string()),
                    ..Event::new(EventKind::ClientRevoked)
                },
            )?;
            Ok(api::clients::ClientRevoked {
                id: id.to_string(),
                revoked: true,
            })
        })
        .map_err(Into::into)
}

// === audit ===

/// `GET /v1/spend`: one row per group, the dimension under its own name (`model`, `day`, ...).
pub fn spend(state: &State, f: api::system::SpendFilter) -> Reply<Vec<api::system::SpendRow>> {
    if let Some(name) = &f.tenant
        && !state.catalog.load().tenant_ids.contains_key(name)
    {
        return Err(ApiError::not_found(format!(
            "tenant `{name}` does not exist (see `keyward tenant list`)"
        )));
    }
    let query = crate::audit::SpendQuery {
        tenant: f.tenant,
        by: f.by,
        since_ms: f.since.map(|s| s.saturating_mul(1000)),
        until_ms: f.until.map(|s| s.saturating_mul(1000)),
    };
    let rows = state.audit.spend(&query)?;
    Ok(rows
        .into_iter()
        .map(|r| api::system::SpendRow::of(f.by, r))
        .collect())
}

// === budgets and limits (README, "Spend and limits") ===

/// Checks that the tenant exists and the scope's client or credential belongs to it.
fn check_scope(
    state: &State,
    tenant: &str,
    scope: &crate::governance::Scope,
) -> Result<(), ApiError> {
    use crate::governance::Scope;
    let cat = state.catalog.load();
    let Some(tenant_id) = cat.tenant_ids.get(tenant) else {
        return Err(ApiError::not_found(format!(
            "tenant `{tenant}` does not exist (see `keyward tenant list`)"
        )));
    };
    match scope {
        Scope::Tenant => Ok(()),
        Scope::Team(team) => check_name("team", team),
        Scope::Client(id) => {
            let ours = |c: &std::sync::Arc<ClientRow>| c.id == *id && c.tenant_id == *tenant_id;
            if cat.clients_by_token.values().any(ours) || cat.clients_by_uid.values().any(ours) {
                Ok(())
            } else {
                Err(ApiError::bad_request(format!(
                    "client `{id}` is not a client of tenant `{tenant}` (see `keyward client list \
                     --tenant {tenant}`)"
                )))
            }
        }
        Scope::Credential(id) => {
            if cat.credentials(tenant_id).iter().any(|c| &c.id == id) {
                Ok(())
            } else {
                Err(ApiError::bad_request(format!(
                    "credential `{id}` is not a credential of tenant `{tenant}` (see `keyward \
                     cred list --tenant {tenant}`)"
                )))
            }
        }
    }
}

/// `POST /v1/budgets`. Budgets and limits are this keyward's own settings, not catalog
/// data: they can be changed while a bundle is served.
pub fn set_budget(
    state: &State,
    req: api::governance::NewBudget,
) -> Reply<api::governance::Budget> {
    let (scope, limit_micros, period, on_exceed, alerts) =
        req.validate().map_err(ApiError::bad_request)?;
    check_scope(state, &req.tenant, &scope)?;
    let budget = crate::governance::Budget {
        id: store::new_id("bud"),
        tenant: req.tenant.clone(),
        scope,
        limit_micros,
        period,
        on_exceed,
        alerts,
        created_at: now_unix(),
    };
    let stored = state.store.write(|tx| {
        let stored = store::upsert_budget(tx, &budget)?;
        let mut event =
            crate::governance::scope_event(EventKind::BudgetSet, &stored.tenant, &stored.scope);
        event.detail = Some(stored.describe());
        audit_now(state, event)?;
        Ok(stored)
    })?;
    state.reload_rules()?;
    budget_statuses(state, vec![stored])
        .pop()
        .ok_or_else(|| ApiError::internal("the budget was stored but cannot be read back"))
}

/// `GET /v1/budgets`.
pub fn list_budgets(state: &State, tenant: Option<String>) -> Reply<Vec<api::governance::Budget>> {
    let budgets: Vec<_> = state
        .store
        .write(store::budgets)?
        .into_iter()
        .filter(|b| tenant.as_ref().is_none_or(|t| *t == b.tenant))
        .collect();
    Ok(budget_statuses(state, budgets))
}

fn budget_statuses(
    state: &State,
    budgets: Vec<crate::governance::Budget>,
) -> Vec<api::governance::Budget> {
    use crate::governance::rules::usd;
    let spent = state.runtime.block_on(state.governance.spent(&budgets));
    let now = crate::units::now_unix_ms();
    budgets
        .into_iter()
        .zip(spent)
        .map(|(b, (spent, source))| {
            let (start, end) = b.period.bounds(now);
            crate::governance::BudgetStatus {
                scope: b.scope.kind().to_owned(),
                scope_id: Some(b.scope.value().to_owned()).filter(|v| !v.is_empty()),
                period: b.period.as_str().to_owned(),
                limit_usd: usd(b.limit_micros),
                spent_usd: usd(spent),
                limit_micros: b.limit_micros,
                spent_micros: spent,
                on_exceed: b.on_exceed.as_str().to_owned(),
                alerts: b.alerts,
                period_start: crate::units::format_time_ms(start),
                resets_at: crate::units::format_time_ms(end),
                source: source.to_owned(),
                id: b.id,
                tenant: b.tenant,
            }
        })
        .collect()
}

/// `DELETE /v1/budgets/{id}`.
pub fn delete_budget(state: &State, id: &str) -> Reply<api::governance::RuleDeleted> {
    let gone = state.store.write(|tx| {
        let gone = store::delete_budget(tx, id)?;
        let mut event =
            crate::governance::scope_event(EventKind::BudgetDeleted, &gone.tenant, &gone.scope);
        event.detail = Some(gone.describe());
        audit_now(state, event)?;
        Ok(gone)
    })?;
    state.reload_rules()?;
    Ok(api::governance::RuleDeleted {
        id: gone.id,
        deleted: true,
    })
}

/// `POST /v1/limits`.
pub fn set_limit(state: &State, req: api::governance::NewLimit) -> Reply<api::governance::Limit> {
    let (scope, rpm, tpm) = req.validate().map_err(ApiError::bad_request)?;
    check_scope(state, &req.tenant, &scope)?;
    let limit = crate::governance::RateLimit {
        id: store::new_id("lim"),
        tenant: req.tenant.clone(),
        scope,
        rpm,
        tpm,
        created_at: now_unix(),
    };
    let stored = state.store.write(|tx| {
        let stored = store::upsert_rate_limit(tx, &limit)?;
        let mut event =
            crate::governance::scope_event(EventKind::LimitSet, &stored.tenant, &stored.scope);
        event.detail = Some(stored.describe());
        audit_now(state, event)?;
        Ok(stored)
    })?;
    state.reload_rules()?;
    limit_statuses(state, vec![stored])
        .pop()
        .ok_or_else(|| ApiError::internal("the limit was stored but cannot be read back"))
}

/// `GET /v1/limits`.
pub fn list_limits(state: &State, tenant: Option<String>) -> Reply<Vec<api::governance::Limit>> {
    let limits: Vec<_> = state
        .store
        .write(store::rate_limits)?
        .into_iter()
        .filter(|l| tenant.as_ref().is_none_or(|t| *t == l.tenant))
        .collect();
    Ok(limit_statuses(state, limits))
}

fn limit_statuses(
    state: &State,
    limits: Vec<crate::governance::RateLimit>,
) -> Vec<api::governance::Limit> {
    let used = state.runtime.block_on(state.governance.usage(&limits));
    limits
        .into_iter()
        .zip(used)
        .map(|(l, (requests, tokens))| crate::governance::LimitStatus {
            scope: l.scope.kind().to_owned(),
            scope_id: Some(l.scope.value().to_owned()).filter(|v| !v.is_empty()),
            rpm: l.rpm,
            tpm: l.tpm,
            requests_this_minute: requests,
            tokens_this_minute: tokens,
            id: l.id,
            tenant: l.tenant,
        })
        .collect()
}

/// `DELETE /v1/limits/{id}`.
pub fn delete_limit(state: &State, id: &str) -> Reply<api::governance::RuleDeleted> {
    let gone = state.store.write(|tx| {
        let gone = store::delete_rate_limit(tx, id)?;
        let mut event =
            crate::governance::scope_event(EventKind::LimitDeleted, &gone.tenant, &gone.scope);
        event.detail = Some(gone.describe());
        audit_now(state, event)?;
        Ok(gone)
    })?;
    state.reload_rules()?;
    Ok(api::governance::RuleDeleted {
        id: gone.id,
        deleted: true,
    })
}

/// `GET /v1/audit/events` and `POST /v1/audit/search`: newest first.
pub fn audit_query(
    state: &State,
    args: api::audit::AuditQuery,
) -> Reply<Vec<api::audit::AuditRow>> {
    let cat = state.catalog.load();
    let event = match &args.event {
        Some(e) => Some(
            e.parse::<EventKind>()
                .map_err(|e| ApiError::bad_request(e.to_string()))?,
        ),
        None => None,
    };
    // Tenants are never deleted, so a name that is not one now never had a row: say so rather
    // than answer with an empty table that looks like "no traffic".
    let tenant = match args.tenant.as_deref() {
        Some(name) => Some(cat.tenant_ids.get(name).ok_or_else(|| {
            ApiError::not_found(format!(
                "tenant `{name}` does not exist (see `keyward tenant list`)"
            ))
        })?),
        None => None,
    };
    let fingerprint = match &args.payload_hex {
        None => None,
        Some(hex) => {
            let tenant_id = tenant.ok_or_else(|| {
                ApiError::bad_request(
                    "--payload-file needs --tenant: fingerprints are keyed per tenant",
                )
            })?;
            let t = cat.tenant(tenant_id).expect("indexed tenant");
            let payload = crate::hex::decode(hex)
                .ok_or_else(|| ApiError::bad_request("payload_hex is not hex"))?;
            Some(crate::audit::fingerprint(
                &fingerprint_key(state, t)?.fingerprint,
                &payload,
            ))
        }
    };
    let filter = crate::audit::Filter {
        tenant: args.tenant,
        credential_id: args.credential,
        client_id: args.client,
        call_id: args.call_id,
        event,
        // Saturating: a bound near the integer limits means "beyond every row", never a wrap
        // to the other end of time.
        since_ms: args.since.map(|s| s.saturating_mul(1000)),
        until_ms: args.until.map(|s| s.saturating_mul(1000)),
        fingerprint,
        limit: Some(args.limit.unwrap_or(100)),
    };
    // Rows nobody waits on (request.completed) may sit in the writer briefly: show them too.
    state.runtime.block_on(state.audit.flush());
    let rows = state.audit.query(&filter)?;
    Ok(rows)
}

/// `GET /v1/audit/verify`.
pub fn audit_verify(state: &State) -> Reply<api::audit::VerifyReport> {
    Ok(state.audit.verify()?.into())
}

/// `GET /v1/audit/lifecycle/{id}`.
pub fn audit_lifecycle(state: &State, id: &str) -> Reply<Vec<api::audit::AuditRow>> {
    state.runtime.block_on(state.audit.flush());
    let rows = state.audit.lifecycle(id)?;
    if rows.is_empty() {
        return Err(ApiError::not_found(format!(
            "no audit history for credential `{id}` (see `keyward cred list` for ids)"
        )));
    }
    Ok(rows)
}

/// A tenant's fingerprint key, from the tenant key cache.
pub fn fingerprint_key(
    state: &State,
    tenant: &TenantRow,
) -> Result<std::sync::Arc<crate::seal::TenantKeys>, ApiError> {
    state
        .tenant_keys_of(tenant)
        .map_err(|e| ApiError::internal(format!("tenant `{}` fingerprint key: {e}", tenant.name)))
}

// === dev mode ===

/// `serve --dev`: ensures tenant `dev` exists and adds a fresh client; returns its token.
pub fn dev_client(state: &State) -> Result<String, ApiError> {
    if !state.catalog.load().tenant_ids.contains_key("dev") {
        tenant_add(
            state,
            api::tenants::NewTenant {
                name: "dev".into(),
                max_key_age_s: None,
                on_expiry: None,
                rotation_overlap_s: None,
            },
        )?;
        state.reload_catalog()?;
    }
    let name = format!("dev-{}", &store::new_id("x")[2..10]);
    let reply = client_add(state, "dev", name, None, None, vec![])?;
    state.reload_catalog()?;
    Ok(reply.token)
}

// === bundles ===

/// `bundle export`: seals the named tenants (all when none are named) from the store into a
/// bundle with the next serial.
pub fn bundle_export(state: &State, tenants: &[String]) -> Reply<api::system::Bundle> {
    if let Some(bundle) = &state.bundle {
        return Err(ApiError::conflict(format!(
            "this keyward serves bundle {} (serial {}); export bundles on the authoring keyward",
            bundle.path().display(),
            bundle.serial()
        )));
    }
    let snapshot = state.store.snapshot()?;
    let serial = crate::bundle::next_serial(&state.config.load().state_dir).map_err(|e| {
        ApiError::internal(format!(
            "cannot record the bundle serial in {}: {e}",
            state.config.load().state_dir.display()
        ))
    })?;
    let exported =
        crate::bundle::export(&state.master, &snapshot, tenants, &state.instance, serial)
            .map_err(ApiError::bad_request)?;
    tracing::info!(
        serial,
        tenants = exported.tenants,
        credentials = exported.credentials,
        "bundle exported"
    );
    Ok(api::system::Bundle {
        text: exported.text,
        serial: exported.serial,
        tenants: exported.tenants,
        clients: exported.clients,
        credentials: exported.credentials,
    })
}

//! The admin socket: a local, peer-checked API for managing tenants, clients and credentials
//! and for querying the audit trail. One JSON request per line, one JSON response per line.
//!
//! The peer uid is checked before a byte of the request is read. `admin` must not run raw SQL
//! (it calls `store` and `audit`) and no response ever carries a secret; a client token is
//! returned once, by `client.add`.

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use zeroize::Zeroize;

use crate::audit::{Event, EventKind};
use crate::catalog::{Catalog, version_state};
use crate::daemon::State;
use crate::identity::CredentialKind;
use crate::seal::{CredentialRef, Purpose, Secret, seal_with_tenant_key};
use crate::store::{self, ClientRow, CredentialRow, StoreError, TenantRow, VersionRow};
use crate::units::{format_duration, now_unix};

/// Largest request line accepted (a payload file for fingerprint lookup can be large).
pub const MAX_REQUEST_LINE: usize = 64 << 20;

/// A secret in transit from the CLI to the daemon. Deserialized straight into locked memory;
/// prints as `[REDACTED]`.
pub struct WireSecret(pub Secret);

impl fmt::Debug for WireSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[REDACTED]")
    }
}

impl Serialize for WireSecret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        // The CLI needs the text on the wire to hand it to the daemon; it zeroizes the buffer
        // it serializes into.
        let text =
            std::str::from_utf8(self.0.expose_secret()).map_err(serde::ser::Error::custom)?;
        s.serialize_str(text)
    }
}

impl<'de> Deserialize<'de> for WireSecret {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = WireSecret;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a secret string")
            }
            fn visit_str<E>(self, v: &str) -> Result<WireSecret, E> {
                Ok(WireSecret(Secret::from_slice(v.as_bytes())))
            }
            fn visit_string<E>(self, v: String) -> Result<WireSecret, E> {
                Ok(WireSecret(Secret::from_vec(v.into_bytes())))
            }
        }
        d.deserialize_str(V)
    }
}

/// One admin operation. Durations travel as seconds; the CLI parses the human form.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Daemon status.
    Status,
    /// `metrics`: the `/metrics` text (README, "Metrics and health").
    Metrics,
    /// `reload`: re-read the config file (README, "Reload").
    Reload,
    /// `tenant add`.
    TenantAdd {
        /// Tenant name.
        name: String,
        /// Key age limit, seconds.
        max_key_age_s: Option<u64>,
        /// "deny" or "warn".
        on_expiry: Option<String>,
        /// Default rotation overlap, seconds.
        rotation_overlap_s: Option<u64>,
    },
    /// `tenant list`.
    TenantList,
    /// `cred add`.
    CredAdd(NewCredential),
    /// `cred list`.
    CredList {
        /// Only this tenant.
        tenant: Option<String>,
    },
    /// `cred rotate`.
    CredRotate {
        /// Credential id.
        id: String,
        /// Overlap, seconds.
        overlap_s: Option<u64>,
        /// The new provider key.
        secret: WireSecret,
    },
    /// `cred revoke`.
    CredRevoke {
        /// Credential id.
        id: String,
        /// Only this version.
        version: Option<u32>,
    },
    /// `cred delete`.
    CredDelete {
        /// Credential id.
        id: String,
    },
    /// `client add`.
    ClientAdd {
        /// Tenant name.
        tenant: String,
        /// Client name.
        name: String,
        /// Team.
        team: Option<String>,
        /// Bound uid.
        uid: Option<u32>,
        /// Allowed workflows.
        workflows: Vec<String>,
    },
    /// `client list`.
    ClientList {
        /// Only this tenant.
        tenant: Option<String>,
    },
    /// `client revoke`.
    ClientRevoke {
        /// Client id.
        id: String,
    },
    /// `audit query`.
    AuditQuery {
        /// Filters.
        #[serde(flatten)]
        filter: AuditQueryArgs,
    },
    /// `audit verify`.
    AuditVerify,
    /// `audit lifecycle`.
    AuditLifecycle {
        /// Credential id.
        id: String,
    },
    /// `bundle export`: seal the named tenants (every tenant when empty) into a bundle.
    BundleExport {
        /// Tenant names.
        tenants: Vec<String>,
    },
    /// `spend`: cost and tokens from the audit trail's aggregate.
    Spend {
        /// Only this tenant.
        tenant: Option<String>,
        /// `tenant`, `team`, `client`, `credential`, `model` or `day`.
        by: crate::audit::SpendBy,
        /// Unix seconds.
        since: Option<i64>,
        /// Unix seconds.
        until: Option<i64>,
    },
    /// `prices`: the price table in effect.
    Prices {
        /// Only this target.
        target: Option<String>,
    },
    /// `budget set`.
    BudgetSet(crate::governance::BudgetSet),
    /// `budget list`.
    BudgetList {
        /// Only this tenant.
        tenant: Option<String>,
    },
    /// `budget delete`.
    BudgetDelete {
        /// Budget id.
        id: String,
    },
    /// `limit set`.
    LimitSet(crate::governance::LimitSet),
    /// `limit list`.
    LimitList {
        /// Only this tenant.
        tenant: Option<String>,
    },
    /// `limit delete`.
    LimitDelete {
        /// Limit id.
        id: String,
    },
}

/// What `cred add` sends: the credential's scope and its first secret.
#[derive(Debug, Serialize, Deserialize)]
pub struct NewCredential {
    /// Tenant name.
    pub tenant: String,
    /// Target name.
    pub target: String,
    /// Credential name.
    pub name: String,
    /// Model globs.
    pub models: Vec<String>,
    /// Capabilities.
    pub capabilities: Vec<String>,
    /// Teams.
    pub teams: Vec<String>,
    /// Workflows.
    pub workflows: Vec<String>,
    /// Priority (lower wins).
    pub priority: Option<i64>,
    /// Credential kind (`api-key` when absent).
    #[serde(default)]
    pub kind: Option<String>,
    /// The provider key, or the kind's JSON document.
    pub secret: WireSecret,
}

/// Filters of `audit query`, as sent by the CLI.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct AuditQueryArgs {
    /// Tenant name.
    pub tenant: Option<String>,
    /// Credential id.
    pub credential: Option<String>,
    /// Client id.
    pub client: Option<String>,
    /// Call id.
    pub call_id: Option<String>,
    /// Event name.
    pub event: Option<String>,
    /// Unix seconds.
    pub since: Option<i64>,
    /// Unix seconds.
    pub until: Option<i64>,
    /// Max rows.
    pub limit: Option<usize>,
    /// Hex of a payload whose fingerprint to look for (needs `tenant`).
    pub payload_hex: Option<String>,
}

/// A refusal, shown to the operator as one line.
#[derive(Debug)]
pub struct AdminError(pub String);

impl<E: std::error::Error> From<E> for AdminError {
    fn from(e: E) -> Self {
        AdminError(e.to_string())
    }
}

type Reply = Result<Value, AdminError>;

/// Serves the admin socket until `shutdown` resolves.
pub async fn serve(
    listener: UnixListener,
    state: Arc<State>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let state = state.clone();
                    tokio::spawn(async move { handle_connection(stream, state).await });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "admin socket accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            },
        }
    }
}

/// Root and the daemon's own uid may administer it.
fn peer_allowed(stream: &UnixStream) -> Result<u32, String> {
    let cred = stream
        .peer_cred()
        .map_err(|e| format!("cannot read peer credentials: {e}"))?;
    admit(cred.uid(), nix::unistd::geteuid().as_raw())
}

/// The admin socket's rule: peer `uid` may administer a daemon running as `own` when it is
/// root or `own`.
fn admit(uid: u32, own: u32) -> Result<u32, String> {
    if uid == 0 || uid == own {
        Ok(uid)
    } else {
        Err(format!(
            "uid {uid} may not use the admin socket (allowed: root and uid {own})"
        ))
    }
}

async fn handle_connection(mut stream: UnixStream, state: Arc<State>) {
    if let Err(refusal) = peer_allowed(&stream) {
        tracing::warn!(reason = %refusal, "admin connection refused");
        let line = json!({"ok": false, "error": refusal}).to_string() + "\n";
        let _ = stream.write_all(line.as_bytes()).await;
        return;
    }
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    loop {
        let mut line = match read_line_capped(&mut reader, MAX_REQUEST_LINE).await {
            Ok(Some(line)) => line,
            Ok(None) => return,
            Err(e) => {
                let out = json!({"ok": false, "error": e.to_string()}).to_string() + "\n";
                let _ = write.write_all(out.as_bytes()).await;
                return;
            }
        };
        let parsed = serde_json::from_slice::<Request>(&line);
        line.zeroize();
        let reply = match parsed {
            Ok(request) => dispatch(&state, request).await,
            Err(e) => Err(malformed(&e)),
        };
        let body = match reply {
            Ok(data) => json!({"ok": true, "data": data}),
            Err(AdminError(message)) => json!({"ok": false, "error": message}),
        };
        let out = body.to_string() + "\n";
        if write.write_all(out.as_bytes()).await.is_err() {
            return;
        }
    }
}

/// Reads one line (without the newline), refusing lines over `max` bytes. `None` at EOF.
async fn read_line_capped<R: tokio::io::AsyncBufRead + Unpin>(
    reader: &mut R,
    max: usize,
) -> std::io::Result<Option<Vec<u8>>> {
    let mut line = Vec::new();
    loop {
        let available = reader.fill_buf().await?;
        if available.is_empty() {
            return Ok(if line.is_empty() { None } else { Some(line) });
        }
        let (used, done) = match available.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (available.len(), false),
        };
        line.extend_from_slice(&available[..used]);
        reader.consume(used);
        if line.len() > max {
            line.zeroize();
            return Err(std::io::Error::other(format!(
                "request larger than {max} bytes"
            )));
        }
        if done {
            line.pop();
            return Ok(Some(line));
        }
    }
}

async fn dispatch(state: &Arc<State>, request: Request) -> Reply {
    let state = state.clone();
    match request {
        Request::Status => Ok(status(&state)),
        Request::Metrics => Ok(json!({ "text": crate::metrics::render(&state) })),
        Request::Reload => {
            blocking(move || {
                let done = state.reload()?;
                Ok(serde_json::to_value(done)?)
            })
            .await
        }
        Request::AuditQuery { filter } => blocking(move || audit_query(&state, filter)).await,
        Request::AuditVerify => blocking(move || audit_verify(&state)).await,
        Request::AuditLifecycle { id } => blocking(move || audit_lifecycle(&state, &id)).await,
        Request::BundleExport { tenants } => {
            blocking(move || bundle_export(&state, &tenants)).await
        }
        Request::Spend {
            tenant,
            by,
            since,
            until,
        } => blocking(move || spend(&state, tenant, by, since, until)).await,
        Request::Prices { target } => Ok(Value::Array(
            state
                .config
                .load()
                .prices
                .rows(target.as_deref())
                .map(crate::prices::Price::to_json)
                .collect(),
        )),
        // Budgets and limits are this keyward's own settings, not catalog data: they can be
        // changed while a bundle is served.
        Request::BudgetSet(req) => blocking(move || budget_set(&state, req)).await,
        Request::BudgetList { tenant } => blocking(move || budget_list(&state, tenant)).await,
        Request::BudgetDelete { id } => blocking(move || budget_delete(&state, &id)).await,
        Request::LimitSet(req) => blocking(move || limit_set(&state, req)).await,
        Request::LimitList { tenant } => blocking(move || limit_list(&state, tenant)).await,
        Request::LimitDelete { id } => blocking(move || limit_delete(&state, &id)).await,
        other => blocking(move || mutate(&state, other)).await,
    }
}

async fn blocking(f: impl FnOnce() -> Reply + Send + 'static) -> Reply {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(AdminError(format!("internal error: {e}"))))
}

fn status(state: &State) -> Value {
    let cat = state.catalog.load();
    let config = state.config.load();
    json!({
        "version": env!("CARGO_PKG_VERSION"),
        "pid": std::process::id(),
        "uptime_s": state.started.elapsed().as_secs(),
        "state_dir": config.state_dir,
        "socket": config.socket,
        "admin_socket": config.admin_socket,
        "listen_tcp": config.listen_tcp.map(|a| a.to_string()),
        "tenants": cat.tenants.len(),
        "clients": cat.clients_by_token.len(),
        "credentials": cat.credentials_by_tenant.values().map(Vec::len).sum::<usize>(),
        "memory_lock": state.memory_lock.clone(),
        "master_key_source": state.master.identity(),
        "master_key_provider": state.master.provider(),
        "kek_operations": state.master.operations(),
        "instance": state.instance,
        "audit_export": state.audit.export_status(),
        "bundle": state.bundle.as_ref().map(|b| b.status()),
        "in_flight": state.in_flight(),
        "connections": state.connections.open(),
        "max_connections": state.connections.max_total(),
        "buffered_body_bytes": state.bodies.held(),
        "store_accesses": state.store.accesses(),
        "governance": state.governance.status(),
    })
}

/// Every change: validate, change the store and commit its audit event in one store
/// transaction (the audit commit happens first; if it fails the change rolls back), then
/// refresh the catalog.
fn mutate(state: &State, request: Request) -> Reply {
    let listing = matches!(
        request,
        Request::TenantList | Request::CredList { .. } | Request::ClientList { .. }
    );
    if !listing && let Some(bundle) = &state.bundle {
        return Err(AdminError(bundle.read_only()));
    }
    let reply = match request {
        Request::TenantAdd {
            name,
            max_key_age_s,
            on_expiry,
            rotation_overlap_s,
        } => tenant_add(state, name, max_key_age_s, on_expiry, rotation_overlap_s),
        Request::TenantList => return Ok(tenant_list(state)),
        Request::CredAdd(new) => cred_add(state, new),
        Request::CredList { tenant } => return cred_list(state, tenant.as_deref()),
        Request::CredRotate {
            id,
            overlap_s,
            secret,
        } => cred_rotate(state, &id, overlap_s, secret.0),
        Request::CredRevoke { id, version } => cred_revoke(state, &id, version),
        Request::CredDelete { id } => cred_delete(state, &id),
        Request::ClientAdd {
            tenant,
            name,
            team,
            uid,
            workflows,
        } => client_add(state, &tenant, name, team, uid, workflows),
        Request::ClientList { tenant } => return client_list(state, tenant.as_deref()),
        Request::ClientRevoke { id } => client_revoke(state, &id),
        Request::Status
        | Request::Metrics
        | Request::Reload
        | Request::AuditQuery { .. }
        | Request::AuditVerify
        | Request::AuditLifecycle { .. }
        | Request::BundleExport { .. }
        | Request::Prices { .. }
        | Request::Spend { .. }
        | Request::BudgetSet(_)
        | Request::BudgetList { .. }
        | Request::BudgetDelete { .. }
        | Request::LimitSet(_)
        | Request::LimitList { .. }
        | Request::LimitDelete { .. } => {
            unreachable!("dispatched elsewhere")
        }
    }?;
    state.reload_catalog()?;
    Ok(reply)
}

/// Names of tenants, clients, credentials, teams and workflows: short, printable, no spaces.
fn check_name(kind: &str, name: &str) -> Result<(), AdminError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(AdminError(format!(
            "{kind} name `{}` is invalid: use 1-64 characters from a-z, A-Z, 0-9, '-', '_', '.'",
            name.escape_debug()
        )))
    }
}

/// Provider keys go into an HTTP header: printable ASCII only. The message never shows the key.
/// Checks a secret against its kind and returns the preview to store: a key by the rules of
/// [`check_secret`], a document by its kind's (README, "Credential kinds").
fn check_kind_secret(kind: CredentialKind, secret: &Secret) -> Result<String, AdminError> {
    if !kind.is_document() {
        check_secret(secret)?;
    } else if secret.is_empty() {
        return Err(AdminError(format!(
            "the secret is empty: pipe {} on standard input",
            kind.expected_input()
        )));
    } else if secret.len() > 16384 {
        return Err(AdminError(format!(
            "the {kind} secret is longer than 16384 bytes; pipe {} on standard input",
            kind.expected_input()
        )));
    }
    kind.check(secret).map_err(|e| AdminError(e.to_string()))
}

fn check_secret(secret: &Secret) -> Result<(), AdminError> {
    if secret.is_empty() {
        return Err(AdminError(
            "the secret is empty: pipe the provider key on standard input".into(),
        ));
    }
    if secret.len() > 8192 {
        return Err(AdminError(
            "the secret is longer than 8192 bytes; is this the right input?".into(),
        ));
    }
    if let Some(pos) = secret
        .expose_secret()
        .iter()
        .position(|b| !(0x21..=0x7e).contains(b))
    {
        return Err(AdminError(format!(
            "the secret has a space, control or non-ASCII byte at position {pos}; provider keys \
             are printable ASCII (did a trailing newline or \\r sneak in?)"
        )));
    }
    Ok(())
}

/// Why a request line was not understood, without serde's own text: for a value of the wrong
/// type it quotes the value, which may be a provider key sent by a mismatched client.
fn malformed(e: &serde_json::Error) -> AdminError {
    use serde_json::error::Category;
    let what = match e.classify() {
        Category::Syntax | Category::Eof | Category::Io => "not valid JSON",
        Category::Data => {
            "not a request this daemon knows (unknown command or field, or a value of the wrong \
             type)"
        }
    };
    let at = match e.line() {
        0 => String::new(),
        line => format!(" at line {line} column {}", e.column()),
    };
    AdminError(format!(
        "malformed admin request: {what}{at}; are the CLI and the daemon the same version?"
    ))
}

fn audit_now(state: &State, event: Event) -> Result<u64, StoreError> {
    let handle = state.runtime.clone();
    handle.block_on(state.audit.commit(event)).map_err(|e| {
        StoreError::Conflict(format!(
            "not applied: the audit record could not be written ({e})"
        ))
    })
}

fn tenant_add(
    state: &State,
    name: String,
    max_key_age_s: Option<u64>,
    on_expiry: Option<String>,
    rotation_overlap_s: Option<u64>,
) -> Reply {
    check_name("tenant", &name)?;
    let on_expiry = on_expiry.unwrap_or_else(|| "deny".into());
    if on_expiry != "deny" && on_expiry != "warn" {
        return Err(AdminError(format!(
            "--on-expiry must be deny or warn, not `{on_expiry}`"
        )));
    }
    let id = store::new_id("ten");
    let wrap = |purpose| {
        state
            .master
            .new_wrapped_key(purpose)
            .map_err(|e| AdminError(format!("cannot create the tenant's keys: {e}")))
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
    Ok(tenant_json(&row))
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

fn tenant_json(t: &TenantRow) -> Value {
    use std::time::Duration;
    let overlap_s = t.rotation_overlap_s.unwrap_or(86_400);
    json!({
        "id": t.id,
        "name": t.name,
        "max_key_age": t.max_key_age_s.map(|s| format_duration(Duration::from_secs(s as u64))),
        "on_expiry": t.on_expiry,
        "rotation_overlap": format_duration(Duration::from_secs(overlap_s as u64)),
        "created_at": crate::units::format_time(t.created_at),
    })
}

fn tenant_list(state: &State) -> Value {
    let cat = state.catalog.load();
    let mut tenants: Vec<&TenantRow> = cat.tenants.values().map(|t| t.as_ref()).collect();
    tenants.sort_by(|a, b| a.name.cmp(&b.name));
    Value::Array(tenants.into_iter().map(tenant_json).collect())
}

fn cred_add(state: &State, new: NewCredential) -> Reply {
    let NewCredential {
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
    let kind: CredentialKind = kind
        .as_deref()
        .unwrap_or("api-key")
        .parse()
        .map_err(|e: crate::identity::kind::UnknownKind| AdminError(e.to_string()))?;
    {
        let config = state.config.load();
        let t = config
            .targets
            .lookup(&target)
            .map_err(|e| AdminError(e.to_string()))?;
        crate::providers::check_kind(t, kind).map_err(AdminError)?;
    }
    let preview = check_kind_secret(kind, &secret)?;
    for m in &models {
        if m.is_empty() || m.len() > 128 || m.chars().any(|c| c.is_control() || c == ' ') {
            return Err(AdminError(format!(
                "--model `{}` is not a valid model glob",
                m.escape_debug()
            )));
        }
    }
    for c in &capabilities {
        c.parse::<crate::scope::attrs::Capability>()
            .map_err(|e| AdminError(e.to_string()))?;
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
        let at = CredentialRef {
            tenant: &t.id,
            credential: &id,
            version: 1,
        };
        let sealed = seal_with_tenant_key(&keys.tenant, at, &secret);
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
        Ok(json!({
            "id": id, "version": 1, "preview": preview,
            "tenant": t.name, "target": target, "name": name, "kind": kind.as_str(),
        }))
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

fn cred_rotate(state: &State, id: &str, overlap_s: Option<u64>, secret: Secret) -> Reply {
    let now = now_unix();
    let reply = state.store.write(|tx| {
        let cred = store::credential(tx, id)?;
        // The new version is a secret of the same kind as the first.
        let preview =
            check_kind_secret(cred.kind, &secret).map_err(|e| StoreError::Conflict(e.0))?;
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
        Ok(json!({"id": id, "version": version, "preview": preview, "overlap_until": until}))
    })?;
    Ok(reply)
}

fn cred_revoke(state: &State, id: &str, version: Option<u32>) -> Reply {
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
        Ok(json!({"id": id, "revoked_versions": versions}))
    })?;
    Ok(reply)
}

fn cred_delete(state: &State, id: &str) -> Reply {
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
        Ok(json!({"id": id, "deleted": true}))
    })?;
    state.store.checkpoint()?;
    Ok(reply)
}

fn tenant_name(cat: &Catalog, tenant_id: &str) -> String {
    cat.tenant(tenant_id)
        .map(|t| t.name.clone())
        .unwrap_or_else(|| tenant_id.to_string())
}

fn cred_list(state: &State, tenant: Option<&str>) -> Reply {
    let cat = state.catalog.load();
    let tenant_id = match tenant {
        Some(name) => Some(cat.tenant_ids.get(name).cloned().ok_or_else(|| {
            AdminError(format!(
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
            lines.push(json!({
                "id": c.id,
                "tenant": tenant_name(&cat, &c.tenant_id),
                "target": c.target,
                "kind": c.kind.as_str(),
                "name": c.name,
                "version": v.version,
                "preview": v.preview,
                "state": state_name,
                "until": until.map(crate::units::format_time),
                "lifecycle": lifecycle.as_str(),
                "overlap_until": overlap_until.map(crate::units::format_time),
                "expired": expired,
                "priority": c.priority,
                "created_at": crate::units::format_time(v.created_at),
                "age": format_duration(std::time::Duration::from_secs(
                    (now - v.created_at).max(0) as u64
                )),
                "scope": scope_text(c),
            }));
        }
    }
    Ok(Value::Array(lines))
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
) -> Reply {
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
        Ok(json!({
            "id": row.id, "tenant": t.name, "name": name,
            "team": team, "uid": uid, "token": token,
        }))
    })?;
    Ok(reply)
}

fn client_list(state: &State, tenant: Option<&str>) -> Reply {
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
        return Err(AdminError(format!(
            "tenant `{name}` does not exist (see `keyward tenant list`)"
        )));
    }
    let lines = snapshot
        .clients
        .iter()
        .filter(|c| tenant.is_none_or(|n| names.get(c.tenant_id.as_str()) == Some(&n)))
        .map(|c| {
            json!({
                "id": c.id,
                "tenant": names.get(c.tenant_id.as_str()),
                "name": c.name,
                "team": c.team,
                "uid": c.uid,
                "workflows": c.workflows,
                "state": if c.revoked_at.is_some() { "revoked" } else { "active" },
                "created_at": crate::units::format_time(c.created_at),
            })
        })
        .collect();
    Ok(Value::Array(lines))
}

fn client_revoke(state: &State, id: &str) -> Reply {
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
            Ok(json!({"id": id, "revoked": true}))
        })
        .map_err(Into::into)
}

// === audit ===

/// `spend`: one object per group, the dimension under its own name (`model`, `day`, ...).
fn spend(
    state: &State,
    tenant: Option<String>,
    by: crate::audit::SpendBy,
    since: Option<i64>,
    until: Option<i64>,
) -> Reply {
    if let Some(name) = &tenant
        && !state.catalog.load().tenant_ids.contains_key(name)
    {
        return Err(AdminError(format!(
            "tenant `{name}` does not exist (see `keyward tenant list`)"
        )));
    }
    let query = crate::audit::SpendQuery {
        tenant,
        by,
        since_ms: since.map(|s| s.saturating_mul(1000)),
        until_ms: until.map(|s| s.saturating_mul(1000)),
    };
    let name = serde_json::to_value(by)?
        .as_str()
        .unwrap_or("key")
        .to_owned();
    let rows = state.audit.spend(&query)?;
    Ok(Value::Array(
        rows.into_iter()
            .map(|r| {
                let mut v = serde_json::to_value(&r).expect("plain struct");
                if let Some(map) = v.as_object_mut()
                    && let Some(key) = map.remove("key")
                {
                    map.insert(name.clone(), key);
                }
                v
            })
            .collect(),
    ))
}

// === budgets and limits (README, "Spend and limits") ===

/// Checks that the tenant exists and the scope's client or credential belongs to it.
fn check_scope(
    state: &State,
    tenant: &str,
    scope: &crate::governance::Scope,
) -> Result<(), AdminError> {
    use crate::governance::Scope;
    let cat = state.catalog.load();
    let Some(tenant_id) = cat.tenant_ids.get(tenant) else {
        return Err(AdminError(format!(
            "tenant `{tenant}` does not exist (see `keyward tenant list`)"
        )));
    };
    match scope {
        Scope::Tenant => Ok(()),
        Scope::Team(team) => check_name("team", team),
        Scope::Client(id) => {
            let ours = |c: &Arc<ClientRow>| c.id == *id && c.tenant_id == *tenant_id;
            if cat.clients_by_token.values().any(ours) || cat.clients_by_uid.values().any(ours) {
                Ok(())
            } else {
                Err(AdminError(format!(
                    "client `{id}` is not a client of tenant `{tenant}` (see `keyward client list \
                     --tenant {tenant}`)"
                )))
            }
        }
        Scope::Credential(id) => {
            if cat.credentials(tenant_id).iter().any(|c| &c.id == id) {
                Ok(())
            } else {
                Err(AdminError(format!(
                    "credential `{id}` is not a credential of tenant `{tenant}` (see `keyward \
                     cred list --tenant {tenant}`)"
                )))
            }
        }
    }
}

fn budget_set(state: &State, req: crate::governance::BudgetSet) -> Reply {
    let (scope, limit_micros, period, on_exceed, alerts) = req.validate().map_err(AdminError)?;
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
    Ok(budget_statuses(state, vec![stored])
        .pop()
        .unwrap_or(Value::Null))
}

fn budget_list(state: &State, tenant: Option<String>) -> Reply {
    let budgets: Vec<_> = state
        .store
        .write(store::budgets)?
        .into_iter()
        .filter(|b| tenant.as_ref().is_none_or(|t| *t == b.tenant))
        .collect();
    Ok(Value::Array(budget_statuses(state, budgets)))
}

fn budget_statuses(state: &State, budgets: Vec<crate::governance::Budget>) -> Vec<Value> {
    use crate::governance::rules::usd;
    let spent = state.runtime.block_on(state.governance.spent(&budgets));
    let now = crate::units::now_unix_ms();
    budgets
        .into_iter()
        .zip(spent)
        .map(|(b, (spent, source))| {
            let (start, end) = b.period.bounds(now);
            let status = crate::governance::BudgetStatus {
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
            };
            serde_json::to_value(status).expect("plain struct")
        })
        .collect()
}

fn budget_delete(state: &State, id: &str) -> Reply {
    let gone = state.store.write(|tx| {
        let gone = store::delete_budget(tx, id)?;
        let mut event =
            crate::governance::scope_event(EventKind::BudgetDeleted, &gone.tenant, &gone.scope);
        event.detail = Some(gone.describe());
        audit_now(state, event)?;
        Ok(gone)
    })?;
    state.reload_rules()?;
    Ok(json!({ "id": gone.id, "deleted": true }))
}

fn limit_set(state: &State, req: crate::governance::LimitSet) -> Reply {
    let (scope, rpm, tpm) = req.validate().map_err(AdminError)?;
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
    Ok(limit_statuses(state, vec![stored])
        .pop()
        .unwrap_or(Value::Null))
}

fn limit_list(state: &State, tenant: Option<String>) -> Reply {
    let limits: Vec<_> = state
        .store
        .write(store::rate_limits)?
        .into_iter()
        .filter(|l| tenant.as_ref().is_none_or(|t| *t == l.tenant))
        .collect();
    Ok(Value::Array(limit_statuses(state, limits)))
}

fn limit_statuses(state: &State, limits: Vec<crate::governance::RateLimit>) -> Vec<Value> {
    let used = state.runtime.block_on(state.governance.usage(&limits));
    limits
        .into_iter()
        .zip(used)
        .map(|(l, (requests, tokens))| {
            let status = crate::governance::LimitStatus {
                scope: l.scope.kind().to_owned(),
                scope_id: Some(l.scope.value().to_owned()).filter(|v| !v.is_empty()),
                rpm: l.rpm,
                tpm: l.tpm,
                requests_this_minute: requests,
                tokens_this_minute: tokens,
                id: l.id,
                tenant: l.tenant,
            };
            serde_json::to_value(status).expect("plain struct")
        })
        .collect()
}

fn limit_delete(state: &State, id: &str) -> Reply {
    let gone = state.store.write(|tx| {
        let gone = store::delete_rate_limit(tx, id)?;
        let mut event =
            crate::governance::scope_event(EventKind::LimitDeleted, &gone.tenant, &gone.scope);
        event.detail = Some(gone.describe());
        audit_now(state, event)?;
        Ok(gone)
    })?;
    state.reload_rules()?;
    Ok(json!({ "id": gone.id, "deleted": true }))
}

fn audit_query(state: &State, args: AuditQueryArgs) -> Reply {
    let cat = state.catalog.load();
    let event = match &args.event {
        Some(e) => Some(
            e.parse::<EventKind>()
                .map_err(|e| AdminError(e.to_string()))?,
        ),
        None => None,
    };
    // Tenants are never deleted, so a name that is not one now never had a row: say so rather
    // than answer with an empty table that looks like "no traffic".
    let tenant = match args.tenant.as_deref() {
        Some(name) => Some(cat.tenant_ids.get(name).ok_or_else(|| {
            AdminError(format!(
                "tenant `{name}` does not exist (see `keyward tenant list`)"
            ))
        })?),
        None => None,
    };
    let fingerprint = match &args.payload_hex {
        None => None,
        Some(hex) => {
            let tenant_id = tenant.ok_or_else(|| {
                AdminError(
                    "--payload-file needs --tenant: fingerprints are keyed per tenant".into(),
                )
            })?;
            let t = cat.tenant(tenant_id).expect("indexed tenant");
            let payload = crate::hex::decode(hex)
                .ok_or_else(|| AdminError("payload_hex is not hex".into()))?;
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
    Ok(serde_json::to_value(rows)?)
}

fn audit_verify(state: &State) -> Reply {
    let report = state.audit.verify()?;
    let mut value = serde_json::to_value(&report)?;
    value["ok"] = Value::Bool(report.ok());
    Ok(value)
}

fn audit_lifecycle(state: &State, id: &str) -> Reply {
    state.runtime.block_on(state.audit.flush());
    let rows = state.audit.lifecycle(id)?;
    if rows.is_empty() {
        return Err(AdminError(format!(
            "no audit history for credential `{id}` (see `keyward cred list` for ids)"
        )));
    }
    Ok(serde_json::to_value(rows)?)
}

/// A tenant's fingerprint key, from the tenant key cache.
pub fn fingerprint_key(
    state: &State,
    tenant: &TenantRow,
) -> Result<std::sync::Arc<crate::seal::TenantKeys>, AdminError> {
    state
        .tenant_keys_of(tenant)
        .map_err(|e| AdminError(format!("tenant `{}` fingerprint key: {e}", tenant.name)))
}

// === dev mode ===

/// `serve --dev`: ensures tenant `dev` exists and adds a fresh client; returns its token.
pub fn dev_client(state: &State) -> Result<String, AdminError> {
    if !state.catalog.load().tenant_ids.contains_key("dev") {
        tenant_add(state, "dev".into(), None, None, None)?;
        state.reload_catalog()?;
    }
    let name = format!("dev-{}", &store::new_id("x")[2..10]);
    let reply = client_add(state, "dev", name, None, None, vec![])?;
    state.reload_catalog()?;
    Ok(reply["token"].as_str().unwrap_or_default().to_string())
}

// === bundles ===

/// `bundle export`: seals the named tenants (all when none are named) from the store into a
/// bundle with the next serial.
fn bundle_export(state: &State, tenants: &[String]) -> Reply {
    if let Some(bundle) = &state.bundle {
        return Err(AdminError(format!(
            "this keyward serves bundle {} (serial {}); export bundles on the authoring keyward",
            bundle.path().display(),
            bundle.serial()
        )));
    }
    let snapshot = state.store.snapshot()?;
    let serial = crate::bundle::next_serial(&state.config.load().state_dir).map_err(|e| {
        AdminError(format!(
            "cannot record the bundle serial in {}: {e}",
            state.config.load().state_dir.display()
        ))
    })?;
    let exported =
        crate::bundle::export(&state.master, &snapshot, tenants, &state.instance, serial)
            .map_err(AdminError)?;
    tracing::info!(
        serial,
        tenants = exported.tenants,
        credentials = exported.credentials,
        "bundle exported"
    );
    Ok(serde_json::to_value(exported)?)
}

#[cfg(test)]
mod tests {
    use super::admit;

    #[test]
    fn only_root_and_the_daemons_own_uid_are_admitted() {
        // A daemon running as root.
        assert_eq!(admit(0, 0), Ok(0));
        let refused = admit(1000, 0).unwrap_err();
        assert_eq!(
            refused,
            "uid 1000 may not use the admin socket (allowed: root and uid 0)"
        );
        // A daemon running as an unprivileged user: root and that user, no one else.
        assert_eq!(admit(0, 998), Ok(0));
        assert_eq!(admit(998, 998), Ok(998));
        for other in [1, 997, 999, 1000, 65534, u32::MAX] {
            assert!(admit(other, 998).is_err(), "uid {other} was admitted");
        }
    }
}

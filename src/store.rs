//! The credential store: SQLite schema, migrations and typed queries over tenants, clients and
//! sealed credential versions.
//!
//! `store` holds ciphertext only and must not decrypt: sealing happens in `seal`, driven by
//! `admin`. The audit trail lives in its own file and is owned by `audit`.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use rusqlite::{Connection, OptionalExtension, Transaction, params};

use crate::identity::CredentialKind;
use crate::seal::{MasterKeyProvider, Purpose, SealError};

/// 2 added `credentials.kind` (rows from version 1 are `api-key`).
const SCHEMA_VERSION: i64 = 2;

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS tenants (
    id                 TEXT PRIMARY KEY,
    name               TEXT NOT NULL UNIQUE,
    wrapped_key        BLOB NOT NULL,
    wrapped_fp_key     BLOB NOT NULL,
    max_key_age_s      INTEGER,
    on_expiry          TEXT NOT NULL DEFAULT 'deny',
    rotation_overlap_s INTEGER,
    created_at         INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS clients (
    id         TEXT PRIMARY KEY,
    tenant_id  TEXT NOT NULL REFERENCES tenants(id),
    name       TEXT NOT NULL,
    team       TEXT,
    uid        INTEGER,
    workflows  TEXT NOT NULL DEFAULT '[]',
    token_hash BLOB NOT NULL UNIQUE,
    created_at INTEGER NOT NULL,
    revoked_at INTEGER,
    UNIQUE (tenant_id, name)
);
CREATE TABLE IF NOT EXISTS credentials (
    id           TEXT PRIMARY KEY,
    tenant_id    TEXT NOT NULL REFERENCES tenants(id),
    target       TEXT NOT NULL,
    name         TEXT NOT NULL,
    models       TEXT NOT NULL DEFAULT '[]',
    capabilities TEXT NOT NULL DEFAULT '[]',
    teams        TEXT NOT NULL DEFAULT '[]',
    workflows    TEXT NOT NULL DEFAULT '[]',
    priority     INTEGER NOT NULL DEFAULT 100,
    created_at   INTEGER NOT NULL,
    revoked_at   INTEGER,
    kind         TEXT NOT NULL DEFAULT 'api-key',
    UNIQUE (tenant_id, name)
);
CREATE TABLE IF NOT EXISTS credential_versions (
    credential_id    TEXT NOT NULL REFERENCES credentials(id),
    version          INTEGER NOT NULL,
    wrapped_data_key BLOB NOT NULL,
    ciphertext       BLOB NOT NULL,
    preview          TEXT NOT NULL,
    created_at       INTEGER NOT NULL,
    overlap_until    INTEGER,
    retired_at       INTEGER,
    revoked_at       INTEGER,
    PRIMARY KEY (credential_id, version)
);
CREATE TABLE IF NOT EXISTS budgets (
    id           TEXT PRIMARY KEY,
    tenant       TEXT NOT NULL,
    scope_kind   TEXT NOT NULL,
    scope_value  TEXT NOT NULL,
    period       TEXT NOT NULL,
    limit_micros INTEGER NOT NULL,
    on_exceed    TEXT NOT NULL,
    alerts       TEXT NOT NULL DEFAULT '[]',
    created_at   INTEGER NOT NULL,
    UNIQUE (tenant, scope_kind, scope_value, period)
);
CREATE TABLE IF NOT EXISTS rate_limits (
    id          TEXT PRIMARY KEY,
    tenant      TEXT NOT NULL,
    scope_kind  TEXT NOT NULL,
    scope_value TEXT NOT NULL,
    rpm         INTEGER,
    tpm         INTEGER,
    created_at  INTEGER NOT NULL,
    UNIQUE (tenant, scope_kind, scope_value)
);
"#;

/// A store operation that failed; messages name the object and say what to do.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The master key in use is not the one this store was created with.
    #[error(
        "master key does not match this store ({path}): {given} is not the key that wrapped it \
         ({recorded}); start with that key, or name it in [master_key.previous] to migrate"
    )]
    WrongMasterKey {
        /// The database file.
        path: String,
        /// The key given (provider identity, never key bytes).
        given: String,
        /// The key recorded as having wrapped the store, with a hint where to find it.
        recorded: String,
    },
    /// The master key's provider could not be asked.
    #[error(transparent)]
    Custody(#[from] SealError),
    /// The database was written by a newer keyward.
    #[error(
        "database {path} has schema version {found}; this keyward supports up to {supported}: \
         upgrade keyward"
    )]
    TooNew {
        /// The database file.
        path: String,
        /// Version found.
        found: i64,
        /// Newest version understood.
        supported: i64,
    },
    /// A named object does not exist.
    #[error("{kind} `{name}` does not exist{hint}")]
    NotFound {
        /// tenant, client or credential.
        kind: &'static str,
        /// The name or id given.
        name: String,
        /// How to find valid values.
        hint: &'static str,
    },
    /// A unique name is taken.
    #[error("{kind} `{name}` already exists{scope}")]
    Duplicate {
        /// tenant, client or credential.
        kind: &'static str,
        /// The name given.
        name: String,
        /// Where it must be unique.
        scope: String,
    },
    /// The operation does not apply in the object's current state.
    #[error("{0}")]
    Conflict(String),
    /// The request itself is wrong whatever the state (for example a secret that is not of the
    /// credential's kind); the message says what to send instead.
    #[error("{0}")]
    Invalid(String),
    /// SQLite failed.
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The state directory could not be prepared.
    #[error("state directory {path}: {source}")]
    Io {
        /// The directory.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
}

/// A tenant row, with its wrapped keys.
#[derive(Debug, Clone)]
pub struct TenantRow {
    /// Stable id (`ten_…`), bound into every seal of the tenant.
    pub id: String,
    /// Unique name used on the CLI.
    pub name: String,
    /// Tenant key wrapped by the master key.
    pub wrapped_key: Vec<u8>,
    /// Fingerprint key wrapped by the master key.
    pub wrapped_fp_key: Vec<u8>,
    /// Key age limit in seconds.
    pub max_key_age_s: Option<i64>,
    /// "deny" or "warn".
    pub on_expiry: String,
    /// Default rotation overlap in seconds.
    pub rotation_overlap_s: Option<i64>,
    /// Unix seconds.
    pub created_at: i64,
}

/// A client row (the token itself is never stored, only its hash).
#[derive(Debug, Clone)]
pub struct ClientRow {
    /// Stable id (`cli_…`).
    pub id: String,
    /// Owning tenant id.
    pub tenant_id: String,
    /// Unique name within the tenant.
    pub name: String,
    /// Optional team.
    pub team: Option<String>,
    /// Optional peer uid binding.
    pub uid: Option<u32>,
    /// Allowed workflows (empty = any).
    pub workflows: Vec<String>,
    /// SHA-256 of the token.
    pub token_hash: Vec<u8>,
    /// Unix seconds.
    pub created_at: i64,
    /// Unix seconds, when revoked.
    pub revoked_at: Option<i64>,
}

/// A credential row; versions are separate.
#[derive(Debug, Clone)]
pub struct CredentialRow {
    /// Stable id (`cred_…`).
    pub id: String,
    /// Owning tenant id.
    pub tenant_id: String,
    /// Target name.
    pub target: String,
    /// Unique name within the tenant.
    pub name: String,
    /// Model globs (empty = any).
    pub models: Vec<String>,
    /// Capabilities (empty = any).
    pub capabilities: Vec<String>,
    /// Teams (empty = any).
    pub teams: Vec<String>,
    /// Workflows (empty = any).
    pub workflows: Vec<String>,
    /// Lower wins.
    pub priority: i64,
    /// Unix seconds.
    pub created_at: i64,
    /// Unix seconds, when the whole credential was revoked.
    pub revoked_at: Option<i64>,
    /// What the secret is (README, "Credential kinds").
    pub kind: CredentialKind,
    /// All versions, oldest first.
    pub versions: Vec<VersionRow>,
}

/// One sealed version of a credential.
#[derive(Clone)]
pub struct VersionRow {
    /// 1, 2, …
    pub version: u32,
    /// Data key wrapped by the tenant key.
    pub wrapped_data_key: Vec<u8>,
    /// Secret sealed by the data key.
    pub ciphertext: Vec<u8>,
    /// Masked preview (first 4 … last 4).
    pub preview: String,
    /// Unix seconds.
    pub created_at: i64,
    /// While set and in the future, this superseded version is a fallback.
    pub overlap_until: Option<i64>,
    /// Unix seconds, when retired.
    pub retired_at: Option<i64>,
    /// Unix seconds, when revoked.
    pub revoked_at: Option<i64>,
}

impl VersionRow {
    /// A new, live version holding `sealed`.
    pub fn new(
        version: u32,
        sealed: crate::seal::SealedCredential,
        preview: String,
        created_at: i64,
    ) -> VersionRow {
        VersionRow {
            version,
            wrapped_data_key: sealed.wrapped_data_key,
            ciphertext: sealed.ciphertext,
            preview,
            created_at,
            overlap_until: None,
            retired_at: None,
            revoked_at: None,
        }
    }
}

impl std::fmt::Debug for VersionRow {
    // The blobs are ciphertext, but they are noise in logs; print their sizes only.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VersionRow")
            .field("version", &self.version)
            .field(
                "wrapped_data_key",
                &format_args!("<{} bytes>", self.wrapped_data_key.len()),
            )
            .field(
                "ciphertext",
                &format_args!("<{} bytes>", self.ciphertext.len()),
            )
            .field("preview", &self.preview)
            .field("created_at", &self.created_at)
            .field("overlap_until", &self.overlap_until)
            .field("retired_at", &self.retired_at)
            .field("revoked_at", &self.revoked_at)
            .finish()
    }
}

/// Everything the data plane needs, read in one go.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// All tenants.
    pub tenants: Vec<TenantRow>,
    /// All clients, revoked ones included.
    pub clients: Vec<ClientRow>,
    /// All credentials with their versions.
    pub credentials: Vec<CredentialRow>,
}

/// The SQLite credential store. One connection behind a mutex: admin writes are rare and the
/// data plane reads from the in-memory catalog, never from here.
pub struct Store {
    /// The database file.
    path: PathBuf,
    /// The connection; lock it only on blocking threads.
    conn: Mutex<Connection>,
    /// How many times the database was used (read or written), shown by `status` so an
    /// operator can see the data plane never touches it.
    accesses: AtomicU64,
}

/// What [`rewrap_master_key`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rewrap {
    /// No database yet: the new key will create it.
    NoStore,
    /// The store was already wrapped by the new key (a migration finished earlier).
    AlreadyNew,
    /// This many tenants' keys (and the key-check value) were rewrapped in one transaction.
    Rewrapped {
        /// Tenants whose tenant and fingerprint keys were rewrapped.
        tenants: usize,
    },
}

/// Rewraps every key the master key wraps in `<state_dir>/keyward.db` (each tenant's tenant
/// and fingerprint key, and the key-check value) from `old` to `new`, in one SQLite transaction:
/// killed half-way, the store is still wholly under `old`. Data keys and secrets are untouched.
/// Records the migration as pending (meta `master_key_migrated_from`) until the audit event is
/// written ([`take_pending_migration`]).
pub fn rewrap_master_key(
    state_dir: &Path,
    old: &MasterKeyProvider,
    new: &MasterKeyProvider,
) -> Result<Rewrap, StoreError> {
    let path = state_dir.join("keyward.db");
    if !path.exists() {
        return Ok(Rewrap::NoStore);
    }
    let display = path.display().to_string();
    let mut conn = Connection::open(&path)?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let kcv: Option<Vec<u8>> = tx
        .query_row("SELECT value FROM meta WHERE key = 'key_check'", [], |r| {
            r.get(0)
        })
        .optional()?;
    let Some(kcv) = kcv else {
        return Ok(Rewrap::NoStore);
    };
    if new.matches_check_value(&kcv)? {
        return Ok(Rewrap::AlreadyNew);
    }
    if !old.matches_check_value(&kcv)? {
        return Err(StoreError::WrongMasterKey {
            path: display,
            given: format!(
                "neither {} nor the previous {}",
                new.identity(),
                old.identity()
            ),
            recorded: recorded_master_key(&tx)?,
        });
    }
    let tenants: Vec<(String, Vec<u8>, Vec<u8>)> = {
        let mut stmt = tx.prepare("SELECT id, wrapped_key, wrapped_fp_key FROM tenants")?;
        stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
            .collect::<Result<_, _>>()?
    };
    for (id, wrapped_key, wrapped_fp_key) in &tenants {
        let tenant = Purpose::TenantKey { tenant: id };
        let fingerprint = Purpose::FingerprintKey { tenant: id };
        let key = new.wrap(tenant, &old.unwrap(tenant, wrapped_key)?)?;
        let fp = new.wrap(fingerprint, &old.unwrap(fingerprint, wrapped_fp_key)?)?;
        tx.execute(
            "UPDATE tenants SET wrapped_key = ?1, wrapped_fp_key = ?2 WHERE id = ?3",
            params![key, fp, id],
        )?;
    }
    tx.execute(
        "UPDATE meta SET value = ?1 WHERE key = 'key_check'",
        [new.key_check_value()?],
    )?;
    set_master_key_record(&tx, new)?;
    tx.execute(
        "INSERT OR REPLACE INTO meta (key, value) VALUES ('master_key_migrated_from', ?1)",
        [format!("{}: {}", old.provider(), old.identity())],
    )?;
    tx.commit()?;
    Ok(Rewrap::Rewrapped {
        tenants: tenants.len(),
    })
}

/// The key a finished migration came from, if its `master.rewrapped` audit event is not
/// written yet; `clear` removes the record once it is.
pub fn pending_migration(tx: &Transaction<'_>, clear: bool) -> Result<Option<String>, StoreError> {
    let from: Option<String> = tx
        .query_row(
            "SELECT CAST(value AS TEXT) FROM meta WHERE key = 'master_key_migrated_from'",
            [],
            |r| r.get(0),
        )
        .optional()?;
    if clear && from.is_some() {
        tx.execute(
            "DELETE FROM meta WHERE key = 'master_key_migrated_from'",
            [],
        )?;
    }
    Ok(from)
}

/// Records which key wraps the store's keys (meta `master_key`: provider and identity, never
/// key bytes), for error messages and migrations.
pub fn set_master_key_record(
    tx: &Transaction<'_>,
    master: &MasterKeyProvider,
) -> Result<(), StoreError> {
    tx.execute(
        "INSERT OR REPLACE INTO meta (key, value) VALUES ('master_key', ?1)",
        [format!("{}: {}", master.provider(), master.identity())],
    )?;
    Ok(())
}

/// The recorded wrapping key, or where a store made before the record existed got its key.
fn recorded_master_key(tx: &Transaction<'_>) -> Result<String, StoreError> {
    let recorded: Option<String> = tx
        .query_row(
            "SELECT CAST(value AS TEXT) FROM meta WHERE key = 'master_key'",
            [],
            |r| r.get(0),
        )
        .optional()?;
    Ok(match recorded {
        Some(r) => format!("it was wrapped by {r}"),
        None => "check master_key_file, $CREDENTIALS_DIRECTORY/master-key, $KEYWARD_MASTER_KEY"
            .to_string(),
    })
}

/// A new random id with a type prefix, e.g. `cred_3f9a1c0b7e2d4a65`.
pub fn new_id(prefix: &str) -> String {
    let mut bytes = [0u8; 8];
    crate::seal::fill_random(&mut bytes);
    format!("{prefix}_{}", crate::hex::encode(&bytes))
}

/// Brings a store written by an older keyward (schema `from`) up to [`SCHEMA_VERSION`], inside
/// the opening transaction.
fn migrate(tx: &Transaction<'_>, from: i64) -> Result<(), StoreError> {
    if from < 2 {
        // `CREATE TABLE IF NOT EXISTS` left the old credentials table as it was.
        let has_kind: bool = tx.query_row(
            "SELECT EXISTS(SELECT 1 FROM pragma_table_info('credentials') WHERE name = 'kind')",
            [],
            |r| r.get(0),
        )?;
        if !has_kind {
            tx.execute_batch(
                "ALTER TABLE credentials ADD COLUMN kind TEXT NOT NULL DEFAULT 'api-key'",
            )?;
        }
    }
    if from < SCHEMA_VERSION {
        tx.execute(
            "UPDATE meta SET value = ?1 WHERE key = 'schema_version'",
            [SCHEMA_VERSION],
        )?;
    }
    Ok(())
}

fn json_list(list: &[String]) -> String {
    serde_json::to_string(list).expect("a list of strings serializes")
}

fn parse_list(text: String) -> Vec<String> {
    serde_json::from_str(&text).unwrap_or_default()
}

impl Store {
    /// Opens (creating if needed) `<state_dir>/keyward.db` and checks that `master` is the key
    /// the store was created with; a new store records `master`'s check value.
    pub fn open(state_dir: &Path, master: &MasterKeyProvider) -> Result<Store, StoreError> {
        let io = |source| StoreError::Io {
            path: state_dir.display().to_string(),
            source,
        };
        std::fs::create_dir_all(state_dir).map_err(io)?;
        let path = state_dir.join("keyward.db");
        let mut conn = Connection::open(&path)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        // Deleted rows (crypto-shredded keys) are overwritten, not left in free pages.
        conn.pragma_update(None, "secure_delete", "ON")?;
        restrict_permissions(&path);
        let tx = conn.transaction()?;
        tx.execute_batch(SCHEMA)?;
        let display = path.display().to_string();
        let version: Option<i64> = tx
            .query_row(
                "SELECT value FROM meta WHERE key = 'schema_version'",
                [],
                |r| r.get(0),
            )
            .optional()?;
        match version {
            Some(v) if v > SCHEMA_VERSION => {
                return Err(StoreError::TooNew {
                    path: display,
                    found: v,
                    supported: SCHEMA_VERSION,
                });
            }
            Some(v) => migrate(&tx, v)?,
            None => {
                tx.execute(
                    "INSERT INTO meta (key, value) VALUES ('schema_version', ?1)",
                    [SCHEMA_VERSION],
                )?;
            }
        }
        let kcv: Option<Vec<u8>> = tx
            .query_row("SELECT value FROM meta WHERE key = 'key_check'", [], |r| {
                r.get(0)
            })
            .optional()?;
        match kcv {
            Some(stored) if !master.matches_check_value(&stored)? => {
                return Err(StoreError::WrongMasterKey {
                    path: display,
                    given: master.identity(),
                    recorded: recorded_master_key(&tx)?,
                });
            }
            Some(_) => {}
            None => {
                tx.execute(
                    "INSERT INTO meta (key, value) VALUES ('key_check', ?1)",
                    [master.key_check_value()?],
                )?;
                set_master_key_record(&tx, master)?;
            }
        }
        tx.commit()?;
        Ok(Store {
            path,
            conn: Mutex::new(conn),
            accesses: AtomicU64::new(0),
        })
    }

    /// The database file path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        self.accesses.fetch_add(1, Ordering::Relaxed);
        crate::lock(&self.conn)
    }

    /// How many transactions, snapshots and checkpoints have used the database since start.
    pub fn accesses(&self) -> u64 {
        self.accesses.load(Ordering::Relaxed)
    }

    /// Runs `f` in a transaction that rolls back unless `f` succeeds.
    pub fn write<T>(
        &self,
        f: impl FnOnce(&Transaction<'_>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let value = f(&tx)?;
        tx.commit()?;
        Ok(value)
    }

    /// Reads everything the data plane and listings need.
    pub fn snapshot(&self) -> Result<Snapshot, StoreError> {
        let conn = self.conn();
        let mut snap = Snapshot::default();
        let mut stmt = conn.prepare(&format!(
            "SELECT {TENANT_COLUMNS} FROM tenants ORDER BY name"
        ))?;
        snap.tenants = stmt.query_map([], tenant_row)?.collect::<Result<_, _>>()?;
        let mut stmt = conn.prepare(
            "SELECT id, tenant_id, name, team, uid, workflows, token_hash, created_at, revoked_at
             FROM clients ORDER BY created_at, id",
        )?;
        snap.clients = stmt
            .query_map([], |r| {
                Ok(ClientRow {
                    id: r.get(0)?,
                    tenant_id: r.get(1)?,
                    name: r.get(2)?,
                    team: r.get(3)?,
                    uid: r.get(4)?,
                    workflows: parse_list(r.get(5)?),
                    token_hash: r.get(6)?,
                    created_at: r.get(7)?,
                    revoked_at: r.get(8)?,
                })
            })?
            .collect::<Result<_, _>>()?;
        let mut stmt = conn.prepare(&format!(
            "SELECT {CREDENTIAL_COLUMNS} FROM credentials ORDER BY created_at, id"
        ))?;
        let mut creds: Vec<CredentialRow> = stmt
            .query_map([], credential_row)?
            .collect::<Result<_, _>>()?;
        let mut stmt = conn.prepare(
            "SELECT credential_id, version, wrapped_data_key, ciphertext, preview, created_at,
                    overlap_until, retired_at, revoked_at
             FROM credential_versions ORDER BY credential_id, version",
        )?;
        let versions = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                VersionRow {
                    version: r.get(1)?,
                    wrapped_data_key: r.get(2)?,
                    ciphertext: r.get(3)?,
                    preview: r.get(4)?,
                    created_at: r.get(5)?,
                    overlap_until: r.get(6)?,
                    retired_at: r.get(7)?,
                    revoked_at: r.get(8)?,
                },
            ))
        })?;
        let index: std::collections::HashMap<String, usize> = creds
            .iter()
            .enumerate()
            .map(|(i, c)| (c.id.clone(), i))
            .collect();
        for v in versions {
            let (cred_id, row) = v?;
            if let Some(&i) = index.get(&cred_id) {
                creds[i].versions.push(row);
            }
        }
        snap.credentials = creds;
        Ok(snap)
    }
}

// === row mapping ===

const TENANT_COLUMNS: &str = "id, name, wrapped_key, wrapped_fp_key, max_key_age_s, on_expiry, \
                              rotation_overlap_s, created_at";

fn tenant_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<TenantRow> {
    Ok(TenantRow {
        id: r.get(0)?,
        name: r.get(1)?,
        wrapped_key: r.get(2)?,
        wrapped_fp_key: r.get(3)?,
        max_key_age_s: r.get(4)?,
        on_expiry: r.get(5)?,
        rotation_overlap_s: r.get(6)?,
        created_at: r.get(7)?,
    })
}

const CREDENTIAL_COLUMNS: &str = "id, tenant_id, target, name, models, capabilities, teams, \
                                  workflows, priority, created_at, revoked_at, kind";

/// A credential row without its versions.
fn credential_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<CredentialRow> {
    Ok(CredentialRow {
        id: r.get(0)?,
        tenant_id: r.get(1)?,
        target: r.get(2)?,
        name: r.get(3)?,
        models: parse_list(r.get(4)?),
        capabilities: parse_list(r.get(5)?),
        teams: parse_list(r.get(6)?),
        workflows: parse_list(r.get(7)?),
        priority: r.get(8)?,
        created_at: r.get(9)?,
        revoked_at: r.get(10)?,
        kind: {
            let text: String = r.get(11)?;
            text.parse()
                .map_err(|e: crate::identity::kind::UnknownKind| {
                    rusqlite::Error::FromSqlConversionFailure(
                        11,
                        rusqlite::types::Type::Text,
                        e.into(),
                    )
                })?
        },
        versions: Vec::new(),
    })
}

// === tenants ===

/// Looks a tenant up by name inside a transaction.
pub fn tenant_by_name(tx: &Transaction<'_>, name: &str) -> Result<TenantRow, StoreError> {
    tx.query_row(
        &format!("SELECT {TENANT_COLUMNS} FROM tenants WHERE name = ?1"),
        [name],
        tenant_row,
    )
    .optional()?
    .ok_or_else(|| StoreError::NotFound {
        kind: "tenant",
        name: name.to_string(),
        hint: " (see `keyward tenant list`; create it with `keyward tenant add NAME`)",
    })
}

/// Inserts a tenant; the name must be new.
pub fn insert_tenant(tx: &Transaction<'_>, t: &TenantRow) -> Result<(), StoreError> {
    let exists: bool = tx.query_row(
        "SELECT EXISTS(SELECT 1 FROM tenants WHERE name = ?1)",
        [&t.name],
        |r| r.get(0),
    )?;
    if exists {
        return Err(StoreError::Duplicate {
            kind: "tenant",
            name: t.name.clone(),
            scope: String::new(),
        });
    }
    tx.execute(
        "INSERT INTO tenants (id, name, wrapped_key, wrapped_fp_key, max_key_age_s, on_expiry,
                              rotation_overlap_s, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        params![
            t.id,
            t.name,
            t.wrapped_key,
            t.wrapped_fp_key,
            t.max_key_age_s,
            t.on_expiry,
            t.rotation_overlap_s,
            t.created_at
        ],
    )?;
    Ok(())
}

// === clients ===

/// Inserts a client; its name must be new in the tenant and its uid, if any, unbound.
pub fn insert_client(
    tx: &Transaction<'_>,
    c: &ClientRow,
    tenant_name: &str,
) -> Result<(), StoreError> {
    let exists: bool = tx.query_row(
        "SELECT EXISTS(SELECT 1 FROM clients WHERE tenant_id = ?1 AND name = ?2)",
        params![c.tenant_id, c.name],
        |r| r.get(0),
    )?;
    if exists {
        return Err(StoreError::Duplicate {
            kind: "client",
            name: c.name.clone(),
            scope: format!(" in tenant `{tenant_name}`"),
        });
    }
    if let Some(uid) = c.uid {
        let holder: Option<String> = tx
            .query_row(
                "SELECT id FROM clients WHERE uid = ?1 AND revoked_at IS NULL",
                [uid],
                |r| r.get(0),
            )
            .optional()?;
        if let Some(holder) = holder {
            return Err(StoreError::Conflict(format!(
                "uid {uid} is already bound to client {holder}; a uid identifies one client \
                 (revoke {holder} first, or use another uid)"
            )));
        }
    }
    tx.execute(
        "INSERT INTO clients (id, tenant_id, name, team, uid, workflows, token_hash, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        params![
            c.id,
            c.tenant_id,
            c.name,
            c.team,
            c.uid,
            json_list(&c.workflows),
            c.token_hash,
            c.created_at
        ],
    )?;
    Ok(())
}

/// Marks a client revoked; revoking twice is an error that says so.
pub fn revoke_client(
    tx: &Transaction<'_>,
    id: &str,
    now: i64,
) -> Result<(String, String), StoreError> {
    let row: Option<(String, Option<i64>, String)> = tx
        .query_row(
            "SELECT c.tenant_id, c.revoked_at, t.name FROM clients c JOIN tenants t ON t.id = \
             c.tenant_id WHERE c.id = ?1",
            [id],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .optional()?;
    let (tenant_id, revoked_at, tenant_name) = row.ok_or_else(|| StoreError::NotFound {
        kind: "client",
        name: id.to_string(),
        hint: " (see `keyward client list`)",
    })?;
    if revoked_at.is_some() {
        return Err(StoreError::Conflict(format!(
            "client {id} is already revoked"
        )));
    }
    tx.execute(
        "UPDATE clients SET revoked_at = ?2 WHERE id = ?1",
        params![id, now],
    )?;
    Ok((tenant_id, tenant_name))
}

// === credentials ===

/// Looks a credential up by id (without versions).
pub fn credential(tx: &Transaction<'_>, id: &str) -> Result<CredentialRow, StoreError> {
    tx.query_row(
        &format!("SELECT {CREDENTIAL_COLUMNS} FROM credentials WHERE id = ?1"),
        [id],
        credential_row,
    )
    .optional()?
    .ok_or_else(|| StoreError::NotFound {
        kind: "credential",
        name: id.to_string(),
        hint: " (see `keyward cred list`)",
    })
}

/// Inserts a credential row (its first version is added with [`insert_version`]).
pub fn insert_credential(
    tx: &Transaction<'_>,
    c: &CredentialRow,
    tenant_name: &str,
) -> Result<(), StoreError> {
    let exists: bool = tx.query_row(
        "SELECT EXISTS(SELECT 1 FROM credentials WHERE tenant_id = ?1 AND name = ?2)",
        params![c.tenant_id, c.name],
        |r| r.get(0),
    )?;
    if exists {
        return Err(StoreError::Duplicate {
            kind: "credential",
            name: c.name.clone(),
            scope: format!(" in tenant `{tenant_name}`"),
        });
    }
    tx.execute(
        "INSERT INTO credentials (id, tenant_id, target, name, models, capabilities, teams,
                                  workflows, priority, created_at, kind)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
        params![
            c.id,
            c.tenant_id,
            c.target,
            c.name,
            json_list(&c.models),
            json_list(&c.capabilities),
            json_list(&c.teams),
            json_list(&c.workflows),
            c.priority,
            c.created_at,
            c.kind.as_str()
        ],
    )?;
    Ok(())
}

/// The highest version number of a credential (0 when none).
pub fn latest_version(tx: &Transaction<'_>, credential_id: &str) -> Result<u32, StoreError> {
    Ok(tx.query_row(
        "SELECT COALESCE(MAX(version), 0) FROM credential_versions WHERE credential_id = ?1",
        [credential_id],
        |r| r.get(0),
    )?)
}

/// Inserts a sealed version.
pub fn insert_version(
    tx: &Transaction<'_>,
    credential_id: &str,
    v: &VersionRow,
) -> Result<(), StoreError> {
    tx.execute(
        "INSERT INTO credential_versions (credential_id, version, wrapped_data_key, ciphertext,
                                          preview, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![
            credential_id,
            v.version,
            v.wrapped_data_key,
            v.ciphertext,
            v.preview,
            v.created_at
        ],
    )?;
    Ok(())
}

/// Gives every live (not revoked, not retired, not already overlapping) version below
/// `new_version` an overlap window ending at `until`.
pub fn start_overlap(
    tx: &Transaction<'_>,
    credential_id: &str,
    new_version: u32,
    until: i64,
) -> Result<Vec<u32>, StoreError> {
    let mut stmt = tx.prepare(
        "UPDATE credential_versions SET overlap_until = ?3
         WHERE credential_id = ?1 AND version < ?2 AND revoked_at IS NULL
           AND retired_at IS NULL AND overlap_until IS NULL
         RETURNING version",
    )?;
    let versions = stmt
        .query_map(params![credential_id, new_version, until], |r| r.get(0))?
        .collect::<Result<Vec<u32>, _>>()?;
    Ok(versions)
}

/// Revokes one version, or the whole credential (every version) when `version` is None.
/// Returns the versions newly revoked.
pub fn revoke_credential(
    tx: &Transaction<'_>,
    id: &str,
    version: Option<u32>,
    now: i64,
) -> Result<Vec<u32>, StoreError> {
    let cred = credential(tx, id)?;
    if cred.revoked_at.is_some() {
        return Err(StoreError::Conflict(format!(
            "credential {id} is already revoked"
        )));
    }
    match version {
        Some(v) => {
            let state: Option<Option<i64>> = tx
                .query_row(
                    "SELECT revoked_at FROM credential_versions WHERE credential_id = ?1 AND \
                     version = ?2",
                    params![id, v],
                    |r| r.get(0),
                )
                .optional()?;
            match state {
                None => Err(StoreError::NotFound {
                    kind: "credential version",
                    name: format!("{id}/v{v}"),
                    hint: " (see `keyward cred list`)",
                }),
                Some(Some(_)) => Err(StoreError::Conflict(format!(
                    "credential {id} version {v} is already revoked"
                ))),
                Some(None) => {
                    tx.execute(
                        "UPDATE credential_versions SET revoked_at = ?3 WHERE credential_id = ?1 \
                         AND version = ?2",
                        params![id, v, now],
                    )?;
                    Ok(vec![v])
                }
            }
        }
        None => {
            tx.execute(
                "UPDATE credentials SET revoked_at = ?2 WHERE id = ?1",
                params![id, now],
            )?;
            let mut stmt = tx.prepare(
                "UPDATE credential_versions SET revoked_at = ?2 WHERE credential_id = ?1 AND \
                 revoked_at IS NULL RETURNING version",
            )?;
            let versions = stmt
                .query_map(params![id, now], |r| r.get(0))?
                .collect::<Result<Vec<u32>, _>>()?;
            Ok(versions)
        }
    }
}

/// Marks versions whose overlap window has ended as retired; returns (credential, version)
/// pairs retired now.
pub fn retire_due(tx: &Transaction<'_>, now: i64) -> Result<Vec<(String, u32)>, StoreError> {
    let mut stmt = tx.prepare(
        "UPDATE credential_versions SET retired_at = overlap_until
         WHERE overlap_until IS NOT NULL AND overlap_until <= ?1
           AND retired_at IS NULL AND revoked_at IS NULL
         RETURNING credential_id, version",
    )?;
    let rows = stmt
        .query_map([now], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

/// Deletes a credential and destroys its wrapped data keys (crypto-shredding): with
/// `secure_delete` the bytes are overwritten in the database file.
pub fn delete_credential(tx: &Transaction<'_>, id: &str) -> Result<CredentialRow, StoreError> {
    let cred = credential(tx, id)?;
    // Overwrite the blobs before deleting so no page, WAL frame or free-list entry written
    // after this point holds the wrapped key.
    tx.execute(
        "UPDATE credential_versions SET wrapped_data_key = zeroblob(length(wrapped_data_key)),
                ciphertext = zeroblob(length(ciphertext)) WHERE credential_id = ?1",
        [id],
    )?;
    tx.execute(
        "DELETE FROM credential_versions WHERE credential_id = ?1",
        [id],
    )?;
    tx.execute("DELETE FROM credentials WHERE id = ?1", [id])?;
    Ok(cred)
}

// === governance ===
// Budgets and rate limits (`src/governance/`). The tables were added after schema version 1
// with CREATE TABLE IF NOT EXISTS, so opening an older store adds them and an older keyward
// ignores them.

/// Every budget, oldest first.
pub fn budgets(tx: &Transaction<'_>) -> Result<Vec<crate::governance::Budget>, StoreError> {
    use crate::governance::{Budget, OnExceed, Period, Scope};
    let mut stmt = tx.prepare(
        "SELECT id, tenant, scope_kind, scope_value, period, limit_micros, on_exceed, alerts, \
         created_at FROM budgets ORDER BY created_at, id",
    )?;
    let rows = stmt.query_map([], |r| {
        let kind: String = r.get(2)?;
        let value: String = r.get(3)?;
        let period: String = r.get(4)?;
        let on_exceed: String = r.get(6)?;
        let alerts: String = r.get(7)?;
        Ok(Budget {
            id: r.get(0)?,
            tenant: r.get(1)?,
            scope: Scope::from_parts(&kind, &value).unwrap_or(Scope::Tenant),
            period: Period::parse(&period).unwrap_or(Period::Day),
            limit_micros: r.get::<_, i64>(5)?.max(0) as u64,
            on_exceed: if on_exceed == "warn" {
                OnExceed::Warn
            } else {
                OnExceed::Deny
            },
            alerts: serde_json::from_str(&alerts).unwrap_or_default(),
            created_at: r.get(8)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Inserts `b`, or replaces the limit, action and alerts of the budget with its scope and
/// period; returns the budget as stored (its id is the existing one on replace).
pub fn upsert_budget(
    tx: &Transaction<'_>,
    b: &crate::governance::Budget,
) -> Result<crate::governance::Budget, StoreError> {
    tx.execute(
        "INSERT INTO budgets (id, tenant, scope_kind, scope_value, period, limit_micros, \
         on_exceed, alerts, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9) \
         ON CONFLICT (tenant, scope_kind, scope_value, period) DO UPDATE SET \
         limit_micros = excluded.limit_micros, on_exceed = excluded.on_exceed, \
         alerts = excluded.alerts",
        params![
            b.id,
            b.tenant,
            b.scope.kind(),
            b.scope.value(),
            b.period.as_str(),
            b.limit_micros.min(i64::MAX as u64) as i64,
            b.on_exceed.as_str(),
            serde_json::to_string(&b.alerts).expect("numbers serialize"),
            b.created_at,
        ],
    )?;
    budgets(tx)?
        .into_iter()
        .find(|s| s.tenant == b.tenant && s.scope == b.scope && s.period == b.period)
        .ok_or_else(|| StoreError::Conflict("the budget vanished while it was written".into()))
}

/// Deletes budget `id`; returns it.
pub fn delete_budget(
    tx: &Transaction<'_>,
    id: &str,
) -> Result<crate::governance::Budget, StoreError> {
    let found = budgets(tx)?
        .into_iter()
        .find(|b| b.id == id)
        .ok_or_else(|| StoreError::NotFound {
            kind: "budget",
            name: id.to_owned(),
            hint: " (see `keyward budget list`)",
        })?;
    tx.execute("DELETE FROM budgets WHERE id = ?1", [id])?;
    Ok(found)
}

/// Every rate limit, oldest first.
pub fn rate_limits(tx: &Transaction<'_>) -> Result<Vec<crate::governance::RateLimit>, StoreError> {
    use crate::governance::{RateLimit, Scope};
    let mut stmt = tx.prepare(
        "SELECT id, tenant, scope_kind, scope_value, rpm, tpm, created_at FROM rate_limits \
         ORDER BY created_at, id",
    )?;
    let rows = stmt.query_map([], |r| {
        let kind: String = r.get(2)?;
        let value: String = r.get(3)?;
        let n = |v: Option<i64>| v.map(|v| v.max(0) as u64);
        Ok(RateLimit {
            id: r.get(0)?,
            tenant: r.get(1)?,
            scope: Scope::from_parts(&kind, &value).unwrap_or(Scope::Tenant),
            rpm: n(r.get(4)?),
            tpm: n(r.get(5)?),
            created_at: r.get(6)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Inserts `l`, or replaces the rpm and tpm of the limit on its scope; returns it as stored.
pub fn upsert_rate_limit(
    tx: &Transaction<'_>,
    l: &crate::governance::RateLimit,
) -> Result<crate::governance::RateLimit, StoreError> {
    let n = |v: Option<u64>| v.map(|v| v.min(i64::MAX as u64) as i64);
    tx.execute(
        "INSERT INTO rate_limits (id, tenant, scope_kind, scope_value, rpm, tpm, created_at) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) ON CONFLICT (tenant, scope_kind, scope_value) \
         DO UPDATE SET rpm = excluded.rpm, tpm = excluded.tpm",
        params![
            l.id,
            l.tenant,
            l.scope.kind(),
            l.scope.value(),
            n(l.rpm),
            n(l.tpm),
            l.created_at,
        ],
    )?;
    rate_limits(tx)?
        .into_iter()
        .find(|s| s.tenant == l.tenant && s.scope == l.scope)
        .ok_or_else(|| StoreError::Conflict("the limit vanished while it was written".into()))
}

/// Deletes rate limit `id`; returns it.
pub fn delete_rate_limit(
    tx: &Transaction<'_>,
    id: &str,
) -> Result<crate::governance::RateLimit, StoreError> {
    let found = rate_limits(tx)?
        .into_iter()
        .find(|l| l.id == id)
        .ok_or_else(|| StoreError::NotFound {
            kind: "limit",
            name: id.to_owned(),
            hint: " (see `keyward limit list`)",
        })?;
    tx.execute("DELETE FROM rate_limits WHERE id = ?1", [id])?;
    Ok(found)
}

impl Store {
    /// Folds the WAL back into the database and truncates it, so shredded pages do not linger
    /// in the log.
    pub fn checkpoint(&self) -> Result<(), StoreError> {
        self.conn()
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
        Ok(())
    }
}

fn restrict_permissions(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    for suffix in ["", "-wal", "-shm"] {
        let mut p = path.as_os_str().to_owned();
        p.push(suffix);
        let _ = std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::seal::{MasterKey, Purpose};

    fn tenant(master: &MasterKeyProvider, name: &str) -> TenantRow {
        let id = new_id("ten");
        TenantRow {
            wrapped_key: master
                .new_wrapped_key(Purpose::TenantKey { tenant: &id })
                .unwrap(),
            wrapped_fp_key: master
                .new_wrapped_key(Purpose::FingerprintKey { tenant: &id })
                .unwrap(),
            id,
            name: name.into(),
            max_key_age_s: None,
            on_expiry: "deny".into(),
            rotation_overlap_s: None,
            created_at: 1,
        }
    }

    /// A tenant and one credential whose single version holds `blob` as both its wrapped data
    /// key and its ciphertext; returns the credential's id.
    fn store_with_credential(store: &Store, master: &MasterKeyProvider, blob: &[u8]) -> String {
        let t = tenant(master, "acme");
        let cred = CredentialRow {
            id: new_id("cred"),
            tenant_id: t.id.clone(),
            target: "openai".into(),
            name: "main".into(),
            models: vec![],
            capabilities: vec![],
            teams: vec![],
            workflows: vec![],
            priority: 0,
            created_at: 1,
            revoked_at: None,
            kind: CredentialKind::ApiKey,
            versions: vec![],
        };
        let version = VersionRow {
            version: 1,
            wrapped_data_key: blob.to_vec(),
            ciphertext: blob.to_vec(),
            preview: "sk-…".into(),
            created_at: 1,
            overlap_until: None,
            retired_at: None,
            revoked_at: None,
        };
        store
            .write(|tx| {
                insert_tenant(tx, &t)?;
                insert_credential(tx, &cred, "acme")?;
                insert_version(tx, &cred.id, &version)
            })
            .unwrap();
        // Into the database file itself, as a long-lived store's would be.
        store.checkpoint().unwrap();
        cred.id
    }

    /// The database file and its WAL, concatenated.
    fn file_bytes(dir: &Path) -> Vec<u8> {
        ["keyward.db", "keyward.db-wal"]
            .iter()
            .filter_map(|f| std::fs::read(dir.join(f)).ok())
            .flatten()
            .collect()
    }

    fn holds(haystack: &[u8], needle: &[u8]) -> bool {
        haystack.windows(needle.len()).any(|w| w == needle)
    }

    fn random_blob() -> Vec<u8> {
        use ring::rand::SecureRandom;
        let mut blob = vec![0u8; 48];
        ring::rand::SystemRandom::new().fill(&mut blob).unwrap();
        blob
    }

    #[test]
    fn delete_credential_overwrites_its_blobs_even_where_secure_delete_is_off() {
        // Crypto-shredding must not rest on the pragma alone (a SQLite built or opened without
        // it): delete_credential overwrites the blobs itself before deleting the rows.
        let dir = tempfile::tempdir().unwrap();
        let master = MasterKeyProvider::from(MasterKey::generate());
        let store = Store::open(dir.path(), &master).unwrap();
        store
            .conn()
            .pragma_update(None, "secure_delete", "OFF")
            .unwrap();
        let blob = random_blob();
        let id = store_with_credential(&store, &master, &blob);
        assert!(
            holds(&file_bytes(dir.path()), &blob),
            "the blob is found while it exists"
        );
        store.write(|tx| delete_credential(tx, &id)).unwrap();
        store.checkpoint().unwrap();
        assert!(
            !holds(&file_bytes(dir.path()), &blob),
            "a deleted credential's blob is still in the database file"
        );
    }

    #[test]
    fn rows_deleted_from_an_opened_store_are_overwritten_in_the_file() {
        // secure_delete, set by Store::open: a plain DELETE, without delete_credential's own
        // overwrite, leaves no byte of the row behind.
        let dir = tempfile::tempdir().unwrap();
        let master = MasterKeyProvider::from(MasterKey::generate());
        let store = Store::open(dir.path(), &master).unwrap();
        let blob = random_blob();
        let id = store_with_credential(&store, &master, &blob);
        assert!(
            holds(&file_bytes(dir.path()), &blob),
            "the blob is found while it exists"
        );
        store
            .write(|tx| {
                tx.execute(
                    "DELETE FROM credential_versions WHERE credential_id = ?1",
                    [&id],
                )?;
                Ok(())
            })
            .unwrap();
        store.checkpoint().unwrap();
        assert!(
            !holds(&file_bytes(dir.path()), &blob),
            "a deleted row's bytes are still in the database file"
        );
    }

    #[test]
    fn reopening_with_another_master_key_fails() {
        let dir = tempfile::tempdir().unwrap();
        let master = MasterKeyProvider::from(MasterKey::generate());
        drop(Store::open(dir.path(), &master).unwrap());
        assert!(Store::open(dir.path(), &master).is_ok());
        let err = Store::open(dir.path(), &MasterKey::generate().into())
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("master key does not match this store"),
            "{err}"
        );
    }

    #[test]
    fn duplicate_names_and_unknown_ids_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let master = MasterKeyProvider::from(MasterKey::generate());
        let store = Store::open(dir.path(), &master).unwrap();
        store
            .write(|tx| insert_tenant(tx, &tenant(&master, "acme")))
            .unwrap();
        let err = store
            .write(|tx| insert_tenant(tx, &tenant(&master, "acme")))
            .unwrap_err()
            .to_string();
        assert_eq!(err, "tenant `acme` already exists");
        let err = store
            .write(|tx| tenant_by_name(tx, "nope"))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("tenant `nope` does not exist"), "{err}");
        let err = store
            .write(|tx| revoke_credential(tx, "cred_x", None, 5))
            .unwrap_err()
            .to_string();
        assert!(err.contains("credential `cred_x` does not exist"), "{err}");
        let snap = store.snapshot().unwrap();
        assert_eq!(snap.tenants.len(), 1);
    }
}

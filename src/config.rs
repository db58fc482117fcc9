//! Configuration: embedded defaults, the optional TOML file, environment-derived paths, and
//! validation of all of it into a typed [`Config`] before anything is bound.
//!
//! `config` must not bind sockets or read secrets (the master key file is only named here).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::providers::{TargetSpec, Targets};
use crate::units::{parse_duration, parse_size};

/// Whether to lock all process memory or only the pages that hold secrets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockMemory {
    /// `mlockall(MCL_CURRENT | MCL_FUTURE)`.
    All,
    /// Only `Secret` allocations are locked.
    Secrets,
}

/// How hard the audit writer pushes each commit to disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuditSync {
    /// WAL with `synchronous = NORMAL`: survives a process crash, may lose the last commits on
    /// power loss.
    Normal,
    /// `synchronous = FULL`: every commit is fsynced.
    Full,
}

/// Where committed audit rows are also written as JSON lines (`audit_export`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuditExport {
    /// Standard output (the container log stream).
    Stdout,
    /// Appended to this file (created 0600).
    File(PathBuf),
}

impl std::fmt::Display for AuditExport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AuditExport::Stdout => f.write_str("stdout"),
            AuditExport::File(p) => write!(f, "file:{}", p.display()),
        }
    }
}

/// Resource limits for the data plane.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest request body accepted (413 above it).
    pub max_request_body: u64,
    /// Most body bytes read (and held) while looking for a JSON body's top-level `model`
    /// (400 when it is not within them).
    pub max_model_scan: u64,
    /// Most request-body bytes all requests together may hold in memory (bodies read while
    /// looking for the model, bodies kept for a failover); a request that would need more
    /// while looking for its model gets 503 `overloaded`, one kept for a failover stops being
    /// kept (no failover for it).
    pub max_buffered_bodies: u64,
    /// Requests served at once (503 `overloaded` above it).
    pub max_concurrent_requests: usize,
    /// Requests one client may have in flight at once (503 `overloaded` above it), so one
    /// client cannot hold every slot.
    pub max_requests_per_client: usize,
    /// Requests the clients of one tenant may have in flight together (503 `overloaded` above
    /// it), so one tenant cannot hold every slot.
    pub max_requests_per_tenant: usize,
    /// Time allowed for the upstream to answer with headers.
    pub upstream_timeout: Duration,
    /// Time allowed between two chunks of a streamed response.
    pub stream_idle_timeout: Duration,
    /// Time allowed between two chunks of a request body from the app (a stalled upload must
    /// not hold a concurrency slot).
    pub request_idle_timeout: Duration,
    /// Time allowed for the app to send its whole request body, from the request's headers
    /// on (a body trickled a byte at a time must not hold a slot for long).
    pub request_body_timeout: Duration,
    /// Largest total size of request or response headers.
    pub max_header_bytes: usize,
    /// A data connection with no request open for this long is closed (HTTP/1 keep-alive,
    /// HTTP/2 without a stream, a connection that never sent a request).
    pub idle_connection_timeout: Duration,
    /// Data connections open at once; more are closed as soon as they are accepted. Lowered at
    /// start to what the file-descriptor limit leaves room for.
    pub max_connections: usize,
    /// Data connections one peer uid may hold open (TCP peers count as one peer).
    pub max_connections_per_uid: usize,
    /// How long SIGTERM waits for in-flight requests before exiting.
    pub shutdown_grace: Duration,
}

impl Default for Limits {
    /// The defaults the README's deployment checklist lists.
    fn default() -> Limits {
        Limits {
            max_request_body: 16 << 20,
            max_model_scan: 4 << 20,
            max_buffered_bodies: 256 << 20,
            max_concurrent_requests: 4096,
            max_requests_per_client: 256,
            max_requests_per_tenant: 1024,
            upstream_timeout: Duration::from_secs(600),
            stream_idle_timeout: Duration::from_secs(300),
            request_idle_timeout: Duration::from_secs(30),
            request_body_timeout: Duration::from_secs(60),
            max_header_bytes: 64 << 10,
            idle_connection_timeout: Duration::from_secs(60),
            max_connections: 4096,
            max_connections_per_uid: 1024,
            shutdown_grace: Duration::from_secs(30),
        }
    }
}

/// Key-pool behaviour on upstream failures.
#[derive(Debug, Clone)]
pub struct PoolSettings {
    /// Cooldown after a 429 that carries no usable `Retry-After`.
    pub default_cooldown: Duration,
    /// How long a key answered with 401/403 is skipped.
    pub quarantine: Duration,
}

/// Where the master key is held: the `[master_key]` table (README, "Key custody").
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MasterKeyConfig {
    /// `provider = "file"`: 64 hex characters in this process's locked memory.
    File {
        /// `path`; without it, the sources of the README's "Master key" section
        /// (`master_key_file`, `$CREDENTIALS_DIRECTORY/master-key`, `$KEYWARD_MASTER_KEY`, the
        /// generated `<state dir>/master.key`).
        path: Option<PathBuf>,
    },
    /// `provider = "pkcs11"`: an AES-256 key inside an HSM, used through a PKCS#11 module.
    Pkcs11 {
        /// The PKCS#11 module (shared library), e.g. `/usr/lib/softhsm/libsofthsm2.so`.
        module: PathBuf,
        /// `CKA_LABEL` of the token.
        token_label: String,
        /// `CKA_LABEL` of the AES-256 secret key on it.
        key_label: String,
        /// File holding the user PIN (one trailing newline trimmed).
        pin_file: PathBuf,
    },
    /// `provider = "aws-kms"`: a symmetric AWS KMS key, used through `Encrypt`/`Decrypt`.
    AwsKms {
        /// Key ARN, key id or `alias/NAME`.
        key_id: String,
        /// AWS region, e.g. `eu-west-1`.
        region: String,
        /// `https://` endpoint; default `https://kms.<region>.amazonaws.com`.
        endpoint: Option<String>,
        /// PEM CA bundle trusted for the endpoint instead of the public roots (a private CA in
        /// front of a VPC endpoint, a test server).
        ca_file: Option<PathBuf>,
    },
}

impl MasterKeyConfig {
    /// The provider's name as written in the config.
    pub fn provider(&self) -> &'static str {
        match self {
            MasterKeyConfig::File { .. } => "file",
            MasterKeyConfig::Pkcs11 { .. } => "pkcs11",
            MasterKeyConfig::AwsKms { .. } => "aws-kms",
        }
    }
}

/// The whole validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file this came from, if any.
    pub source: Option<PathBuf>,
    /// Database and generated master key live here.
    pub state_dir: PathBuf,
    /// Data socket path.
    pub socket: PathBuf,
    /// Group owning the data socket (mode 0660).
    pub socket_group: Option<String>,
    /// Admin socket path (mode 0600).
    pub admin_socket: PathBuf,
    /// Explicit master key file.
    pub master_key_file: Option<PathBuf>,
    /// Refuse to generate a master key.
    pub require_external_master_key: bool,
    /// Where the master key is held (`[master_key]`; without it, the file sources).
    pub master_key: MasterKeyConfig,
    /// The key to migrate from (`[master_key.previous]`): `serve` rewraps every key it wrapped
    /// under [`Config::master_key`] before serving.
    pub previous_master_key: Option<MasterKeyConfig>,
    /// Optional TCP listener (token auth only).
    pub listen_tcp: Option<SocketAddr>,
    /// Where `/metrics`, `/healthz` and `/readyz` are served (`metrics_listen`; off when
    /// unset).
    pub metrics_listen: Option<SocketAddr>,
    /// Base URL of an OTLP/HTTP collector (`otlp_endpoint`, e.g. `http://127.0.0.1:4318`);
    /// spans go to `{otlp_endpoint}/v1/traces`. Off when unset.
    pub otlp_endpoint: Option<String>,
    /// Memory locking mode.
    pub lock_memory: LockMemory,
    /// Audit durability.
    pub audit_sync: AuditSync,
    /// Async worker threads serving requests; the audit thread that folds rows into SQLite runs
    /// besides them.
    pub worker_threads: usize,
    /// Audit rows older than this are pruned (None keeps everything).
    pub audit_retention: Option<Duration>,
    /// Where committed audit rows are also shipped as JSON lines.
    pub audit_export: Option<AuditExport>,
    /// Most bytes of audit lines that may wait for the export sink before commits are
    /// refused.
    pub audit_export_buffer: usize,
    /// A sealed bundle to serve read-only (a file, or a directory holding `keyward.bundle`).
    pub bundle: Option<PathBuf>,
    /// How a new bundle is noticed.
    pub bundle_watch: crate::bundle::Watch,
    /// How often the bundle file is read again regardless of inotify.
    pub bundle_poll_interval: Duration,
    /// Data-plane limits.
    pub limits: Limits,
    /// Pool failure handling.
    pub pool: PoolSettings,
    /// Presets merged with config overrides and custom targets.
    pub targets: Targets,
    /// The shipped price table extended and overridden by `[[prices]]`.
    pub prices: crate::prices::PriceTable,
    /// Where budget and rate counters live (`[governance]`).
    pub governance: crate::governance::Settings,
}

/// An invalid configuration: names the file, the key and what is wrong.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// TOML syntax or an unknown/mistyped key.
    #[error("invalid config file {path}: {message}")]
    Syntax {
        /// The file.
        path: String,
        /// The parser's message (includes the key and line).
        message: String,
    },
    /// A key has a value that is well-typed but not acceptable.
    #[error("invalid config {origin}: key `{key}`: {reason}")]
    Value {
        /// The file, or "(defaults)".
        origin: String,
        /// Dotted key path.
        key: String,
        /// What is wrong and what is expected.
        reason: String,
    },
}

/// The TOML file as written; every key optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    socket: Option<PathBuf>,
    socket_group: Option<String>,
    admin_socket: Option<PathBuf>,
    state_dir: Option<PathBuf>,
    master_key_file: Option<PathBuf>,
    require_external_master_key: Option<bool>,
    master_key: Option<RawMasterKey>,
    listen_tcp: Option<String>,
    listen_tcp_allow_remote: Option<bool>,
    metrics_listen: Option<String>,
    otlp_endpoint: Option<String>,
    lock_memory: Option<String>,
    audit_sync: Option<String>,
    audit_retention: Option<String>,
    audit_export: Option<String>,
    audit_export_buffer: Option<String>,
    bundle: Option<PathBuf>,
    bundle_watch: Option<String>,
    bundle_poll_interval: Option<String>,
    worker_threads: Option<i64>,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    pool: RawPool,
    #[serde(default)]
    targets: BTreeMap<String, TargetSpec>,
    #[serde(default)]
    prices: Vec<RawPrice>,
    #[serde(default)]
    governance: RawGovernance,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGovernance {
    redis_url: Option<String>,
    on_backend_error: Option<String>,
    timeout: Option<String>,
}

/// One `[[prices]]` row: USD per million tokens.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPrice {
    target: String,
    model: String,
    input: f64,
    /// Defaults to `input`.
    cached_input: Option<f64>,
    /// Defaults to `input`.
    cache_write: Option<f64>,
    output: f64,
    /// `YYYY-MM-DD` the figures were taken.
    as_of: Option<String>,
}

/// Validates the `[[prices]]` rows; errors are (dotted key, reason).
fn price_rows(raw: Vec<RawPrice>) -> Result<Vec<crate::prices::Price>, (String, String)> {
    raw.into_iter()
        .enumerate()
        .map(|(i, r)| {
            let key = |name: &str| format!("prices[{i}].{name}");
            if r.target.trim().is_empty() {
                return Err((
                    key("target"),
                    "must name a target such as \"openai\"".into(),
                ));
            }
            if r.model.trim().is_empty() {
                return Err((
                    key("model"),
                    "must be a model name or glob such as \"gpt-4o*\"".into(),
                ));
            }
            let usd = |name: &str, v: f64| {
                crate::prices::pico_per_token(v).ok_or_else(|| {
                    (
                        key(name),
                        "must be USD per million tokens, from 0 to 1000000".to_string(),
                    )
                })
            };
            if let Some(d) = &r.as_of
                && !(d.len() == 10
                    && d.bytes().enumerate().all(|(i, b)| {
                        if i == 4 || i == 7 {
                            b == b'-'
                        } else {
                            b.is_ascii_digit()
                        }
                    }))
            {
                return Err((key("as_of"), "must be a date YYYY-MM-DD".into()));
            }
            Ok(crate::prices::Price {
                input: usd("input", r.input)?,
                cached_input: usd("cached_input", r.cached_input.unwrap_or(r.input))?,
                cache_write: usd("cache_write", r.cache_write.unwrap_or(r.input))?,
                output: usd("output", r.output)?,
                target: r.target,
                model: r.model,
                as_of: r.as_of,
                source: "config",
            })
        })
        .collect()
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMasterKey {
    provider: Option<String>,
    path: Option<PathBuf>,
    module: Option<PathBuf>,
    token_label: Option<String>,
    key_label: Option<String>,
    pin_file: Option<PathBuf>,
    key_id: Option<String>,
    region: Option<String>,
    endpoint: Option<String>,
    ca_file: Option<PathBuf>,
    previous: Option<Box<RawMasterKey>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    max_request_body: Option<String>,
    max_model_scan: Option<String>,
    max_buffered_bodies: Option<String>,
    max_concurrent_requests: Option<i64>,
    max_requests_per_client: Option<i64>,
    max_requests_per_tenant: Option<i64>,
    upstream_timeout: Option<String>,
    stream_idle_timeout: Option<String>,
    request_idle_timeout: Option<String>,
    request_body_timeout: Option<String>,
    max_header_bytes: Option<String>,
    idle_connection_timeout: Option<String>,
    max_connections: Option<i64>,
    max_connections_per_uid: Option<i64>,
    shutdown_grace: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPool {
    default_cooldown: Option<String>,
    quarantine: Option<String>,
}

/// Reads the environment; a function so tests can supply their own.
pub type EnvLookup<'a> = &'a dyn Fn(&str) -> Option<String>;

/// The process environment.
pub fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

impl Config {
    /// Loads the config: `explicit` (the `--config` flag), else `$KEYWARD_CONFIG`, else
    /// defaults only. Validates everything, including target CA files.
    pub fn load(explicit: Option<&Path>, env: EnvLookup<'_>) -> Result<Config, ConfigError> {
        let path = explicit
            .map(Path::to_path_buf)
            .or_else(|| env("KEYWARD_CONFIG").map(PathBuf::from));
        let raw = match &path {
            Some(p) => read_raw(p)?,
            None => RawConfig::default(),
        };
        build(raw, path, env)
    }

    /// Parses config text (for tests and `--check` style callers).
    pub fn from_toml(text: &str, origin: &Path, env: EnvLookup<'_>) -> Result<Config, ConfigError> {
        build(parse(text, origin)?, Some(origin.to_path_buf()), env)
    }
}

fn read_raw(path: &Path) -> Result<RawConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.display().to_string(),
        source,
    })?;
    parse(&text, path)
}

/// Parses config text. The message names the line and the parser's complaint but never quotes
/// the file: toml's own rendering repeats the offending line, which may hold a key someone
/// pasted into the wrong place.
fn parse(text: &str, path: &Path) -> Result<RawConfig, ConfigError> {
    toml::from_str(text).map_err(|e| {
        let message = without_value(&e.message().trim().replace('\n', " "));
        let line = e
            .span()
            .map(|span| text[..span.start.min(text.len())].matches('\n').count() + 1);
        ConfigError::Syntax {
            path: path.display().to_string(),
            message: match line {
                Some(line) => format!("line {line}: {message}"),
                None => message,
            },
        }
    })
}

/// serde quotes the offending value in some messages (`invalid type: string "<value>",
/// expected …`, `unknown variant `<value>`, expected one of …`); a value may be a pasted key,
/// so only the kind of mistake and what was expected are kept. The value may itself hold
/// `", expected`, hence the last occurrence.
fn without_value(message: &str) -> String {
    const QUOTING: [(&str, &str); 3] = [
        ("invalid type: string ", "invalid type: a string"),
        ("invalid value: string ", "invalid value: a string"),
        ("unknown variant ", "unknown variant"),
    ];
    for (prefix, kind) in QUOTING {
        if message.starts_with(prefix) {
            return match message.rsplit_once(", expected ") {
                Some((_, expected)) => format!("{kind}, expected {expected}"),
                None => kind.to_string(),
            };
        }
    }
    message.to_string()
}

/// Validates one `[master_key]` table; errors are (dotted key, reason).
fn master_key_table(raw: RawMasterKey, at: &str) -> Result<MasterKeyConfig, (String, String)> {
    let key = |name: &str| format!("{at}.{name}");
    let provider = raw.provider.as_deref().ok_or_else(|| {
        (
            key("provider"),
            "missing: say where the master key is held: \"file\", \"pkcs11\" or \"aws-kms\"".into(),
        )
    })?;
    let given: [(&str, bool); 9] = [
        ("path", raw.path.is_some()),
        ("module", raw.module.is_some()),
        ("token_label", raw.token_label.is_some()),
        ("key_label", raw.key_label.is_some()),
        ("pin_file", raw.pin_file.is_some()),
        ("key_id", raw.key_id.is_some()),
        ("region", raw.region.is_some()),
        ("endpoint", raw.endpoint.is_some()),
        ("ca_file", raw.ca_file.is_some()),
    ];
    let allowed: &[&str] = match provider {
        "file" => &["path"],
        "pkcs11" => &["module", "token_label", "key_label", "pin_file"],
        "aws-kms" => &["key_id", "region", "endpoint", "ca_file"],
        _ => {
            return Err((
                key("provider"),
                "unknown provider: use \"file\", \"pkcs11\" or \"aws-kms\"".into(),
            ));
        }
    };
    if let Some((name, _)) = given.iter().find(|(n, set)| *set && !allowed.contains(n)) {
        return Err((
            key(name),
            format!(
                "not a setting of provider \"{provider}\" (its settings: {})",
                allowed.join(", ")
            ),
        ));
    }
    let text = |name: &str, v: Option<String>| -> Result<String, (String, String)> {
        match v {
            Some(v) if !v.trim().is_empty() => Ok(v),
            Some(_) => Err((key(name), "must not be empty".into())),
            None => Err((
                key(name),
                format!("missing: provider \"{provider}\" needs it"),
            )),
        }
    };
    let absolute = |name: &str, v: Option<PathBuf>| -> Result<PathBuf, (String, String)> {
        match v {
            Some(p) if p.is_absolute() => Ok(p),
            Some(_) => Err((key(name), "must be an absolute path".into())),
            None => Err((
                key(name),
                format!("missing: provider \"{provider}\" needs it"),
            )),
        }
    };
    Ok(match provider {
        "file" => MasterKeyConfig::File {
            path: raw.path.map(|p| absolute("path", Some(p))).transpose()?,
        },
        "pkcs11" => MasterKeyConfig::Pkcs11 {
            module: absolute("module", raw.module)?,
            token_label: text("token_label", raw.token_label)?,
            key_label: text("key_label", raw.key_label)?,
            pin_file: absolute("pin_file", raw.pin_file)?,
        },
        _ => {
            let region = text("region", raw.region)?;
            if !region
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            {
                return Err((
                    key("region"),
                    "must be an AWS region name such as \"eu-west-1\"".into(),
                ));
            }
            let endpoint = match raw.endpoint {
                None => None,
                Some(e) => Some(kms_endpoint(&e).map_err(|r| (key("endpoint"), r))?),
            };
            MasterKeyConfig::AwsKms {
                key_id: text("key_id", raw.key_id)?,
                region,
                endpoint,
                ca_file: raw
                    .ca_file
                    .map(|p| absolute("ca_file", Some(p)))
                    .transpose()?,
            }
        }
    })
}

/// A KMS endpoint must be `https://host[:port]` with no path: the request carries the master
/// key's wraps, so it is never sent in the clear.
fn kms_endpoint(text: &str) -> Result<String, String> {
    let Some(rest) = text.strip_prefix("https://") else {
        return Err("must start with https:// (wrapped keys never travel in the clear)".into());
    };
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    if authority.is_empty() || authority.contains(['/', '?', '#', '@', ' ']) {
        return Err("must be https://HOST or https://HOST:PORT, without a path".into());
    }
    Ok(format!("https://{authority}"))
}

/// Default state directory (README, "Configuration").
pub fn default_state_dir(env: EnvLookup<'_>) -> PathBuf {
    if let Some(home) = env("KEYWARD_HOME") {
        return PathBuf::from(home);
    }
    if let Some(dir) = env("STATE_DIRECTORY") {
        // systemd may pass several colon-separated directories; the first is ours.
        return PathBuf::from(dir.split(':').next().unwrap_or(&dir));
    }
    if let Some(xdg) = env("XDG_STATE_HOME") {
        return Path::new(&xdg).join("keyward");
    }
    let home = env("HOME").unwrap_or_else(|| "/".to_string());
    Path::new(&home).join(".local/state/keyward")
}

/// Default socket directory (README, "Configuration"), given the state directory in force.
pub fn default_socket_dir(env: EnvLookup<'_>, state_dir: &Path) -> PathBuf {
    if let Some(home) = env("KEYWARD_HOME") {
        return PathBuf::from(home);
    }
    if let Some(dir) = env("RUNTIME_DIRECTORY") {
        return PathBuf::from(dir.split(':').next().unwrap_or(&dir));
    }
    if let Some(xdg) = env("XDG_RUNTIME_DIR") {
        return Path::new(&xdg).join("keyward");
    }
    state_dir.to_path_buf()
}

/// The admin socket a CLI command talks to: `--admin-socket`, `$KEYWARD_ADMIN_SOCKET`, the
/// `admin_socket` of `$KEYWARD_CONFIG` if that file names one, then the default `serve` uses.
pub fn admin_socket_for_cli(flag: Option<&Path>, env: EnvLookup<'_>) -> PathBuf {
    if let Some(p) = flag {
        return p.to_path_buf();
    }
    if let Some(p) = env("KEYWARD_ADMIN_SOCKET") {
        return PathBuf::from(p);
    }
    let raw = env("KEYWARD_CONFIG")
        .and_then(|p| {
            read_raw(Path::new(&p))
                .map_err(|e| {
                    // The socket guessed without it is likely wrong: say why it was skipped.
                    eprintln!("keyward: warning: $KEYWARD_CONFIG not used: {e}");
                })
                .ok()
        })
        .unwrap_or_default();
    if let Some(p) = raw.admin_socket {
        return p;
    }
    let state = raw.state_dir.unwrap_or_else(|| default_state_dir(env));
    default_socket_dir(env, &state).join("admin.sock")
}

fn build(
    raw: RawConfig,
    source: Option<PathBuf>,
    env: EnvLookup<'_>,
) -> Result<Config, ConfigError> {
    let origin = source
        .as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "(defaults)".into());
    let value_err = |key: &str, reason: String| ConfigError::Value {
        origin: origin.clone(),
        key: key.to_string(),
        reason,
    };
    let duration =
        |key: &str, v: &Option<String>, default: Duration| -> Result<Duration, ConfigError> {
            match v {
                None => Ok(default),
                Some(t) => parse_duration(t).map_err(|e| value_err(key, e.to_string())),
            }
        };
    // A timeout of zero would fail every request; refuse it rather than run that way.
    let timeout =
        |key: &str, v: &Option<String>, default: Duration| -> Result<Duration, ConfigError> {
            let d = duration(key, v, default)?;
            if d.is_zero() {
                return Err(value_err(
                    key,
                    "0 would time out every request; give a positive duration such as \"30s\""
                        .into(),
                ));
            }
            Ok(d)
        };

    let state_dir = raw.state_dir.unwrap_or_else(|| default_state_dir(env));
    let socket_dir = default_socket_dir(env, &state_dir);
    let socket = raw
        .socket
        .unwrap_or_else(|| socket_dir.join("keyward.sock"));
    let admin_socket = raw
        .admin_socket
        .unwrap_or_else(|| socket_dir.join("admin.sock"));
    if socket == admin_socket {
        return Err(value_err(
            "admin_socket",
            "must differ from `socket`".into(),
        ));
    }
    for (key, path) in [("socket", &socket), ("admin_socket", &admin_socket)] {
        // sockaddr_un holds 108 bytes including the terminating NUL.
        if path.as_os_str().len() > 107 {
            return Err(value_err(
                key,
                format!(
                    "{} is longer than the 107 bytes a Unix socket path may have",
                    path.display()
                ),
            ));
        }
    }
    let listen_tcp = match raw.listen_tcp {
        None => None,
        Some(t) => Some(t.parse::<SocketAddr>().map_err(|_| {
            value_err(
                "listen_tcp",
                "not an IP address and port (hostnames are not resolved): use one like \
                 127.0.0.1:8787"
                    .into(),
            )
        })?),
    };
    if let Some(addr) = listen_tcp
        && !addr.ip().is_loopback()
        && raw.listen_tcp_allow_remote != Some(true)
    {
        return Err(value_err(
            "listen_tcp",
            format!(
                "{addr} is not a loopback address: the TCP listener has no TLS, so client \
                 tokens, prompts and answers would cross the network in clear text; use \
                 127.0.0.1 or [::1], or put a TLS-terminating proxy in front and set \
                 listen_tcp_allow_remote = true"
            ),
        ));
    }
    let metrics_listen = match raw.metrics_listen {
        None => None,
        Some(t) => Some(t.parse::<SocketAddr>().map_err(|_| {
            value_err(
                "metrics_listen",
                "not an IP address and port (hostnames are not resolved): use one like \
                 127.0.0.1:9464"
                    .into(),
            )
        })?),
    };
    let otlp_endpoint = raw
        .otlp_endpoint
        .map(|u| otlp_endpoint(&u).map_err(|r| value_err("otlp_endpoint", r)))
        .transpose()?;
    let lock_memory = match raw.lock_memory.as_deref() {
        None | Some("all") => LockMemory::All,
        Some("secrets") => LockMemory::Secrets,
        Some(_) => {
            return Err(value_err(
                "lock_memory",
                "must be one of \"all\", \"secrets\"".into(),
            ));
        }
    };
    let audit_sync = match raw.audit_sync.as_deref() {
        None | Some("normal") => AuditSync::Normal,
        Some("full") => AuditSync::Full,
        Some(_) => {
            return Err(value_err(
                "audit_sync",
                "must be one of \"normal\", \"full\"".into(),
            ));
        }
    };
    let audit_retention = match &raw.audit_retention {
        None => None,
        Some(t) => {
            let keep =
                parse_duration(t).map_err(|e| value_err("audit_retention", e.to_string()))?;
            if keep.is_zero() {
                return Err(value_err(
                    "audit_retention",
                    "0 would delete every audit row; omit audit_retention to keep everything"
                        .into(),
                ));
            }
            Some(keep)
        }
    };
    let audit_export = match raw.audit_export.as_deref() {
        None => None,
        Some("stdout") => Some(AuditExport::Stdout),
        Some(other) => match other.strip_prefix("file:") {
            Some(path) if Path::new(path).is_absolute() => {
                Some(AuditExport::File(PathBuf::from(path)))
            }
            _ => {
                return Err(value_err(
                    "audit_export",
                    "must be \"stdout\" or \"file:/absolute/path\"".into(),
                ));
            }
        },
    };
    let bundle_watch = match raw.bundle_watch.as_deref() {
        None | Some("notify") => crate::bundle::Watch::Notify,
        Some("poll") => crate::bundle::Watch::Poll,
        Some(_) => {
            return Err(value_err(
                "bundle_watch",
                "must be one of \"notify\", \"poll\"".into(),
            ));
        }
    };
    let bundle_poll_interval = timeout(
        "bundle_poll_interval",
        &raw.bundle_poll_interval,
        Duration::from_secs(10),
    )?;
    if let Some(b) = &raw.bundle
        && !b.is_absolute()
    {
        return Err(value_err(
            "bundle",
            "must be an absolute path (a bundle file, or a directory holding keyward.bundle)"
                .into(),
        ));
    }
    let audit_export_buffer = match &raw.audit_export_buffer {
        None => 8 << 20,
        Some(t) => {
            match parse_size(t).map_err(|e| value_err("audit_export_buffer", e.to_string()))? {
                n if n >= 4096 => n as usize,
                _ => {
                    return Err(value_err(
                        "audit_export_buffer",
                        "must be at least 4KiB (one batch of lines)".into(),
                    ));
                }
            }
        }
    };
    let d = Limits::default();
    let max_request_body = match &raw.limits.max_request_body {
        None => d.max_request_body,
        Some(t) => {
            match parse_size(t).map_err(|e| value_err("limits.max_request_body", e.to_string()))? {
                0 => {
                    return Err(value_err(
                        "limits.max_request_body",
                        "0 would refuse every request with a body; give a size such as \"16MiB\""
                            .into(),
                    ));
                }
                n => n,
            }
        }
    };
    let size = |key: &str, v: &Option<String>, default: u64| -> Result<u64, ConfigError> {
        match v {
            None => Ok(default),
            Some(t) => match parse_size(t).map_err(|e| value_err(key, e.to_string()))? {
                0 => Err(value_err(
                    key,
                    "0 would refuse every request with a body; give a size such as \"4MiB\"".into(),
                )),
                n => Ok(n),
            },
        }
    };
    let max_header_bytes = match &raw.limits.max_header_bytes {
        None => d.max_header_bytes,
        Some(t) => {
            parse_size(t).map_err(|e| value_err("limits.max_header_bytes", e.to_string()))? as usize
        }
    };
    let count = |key: &str, v: Option<i64>, default: usize| -> Result<usize, ConfigError> {
        match v {
            None => Ok(default),
            Some(n) if n >= 1 => Ok(n as usize),
            Some(n) => Err(value_err(key, format!("{n} must be at least 1"))),
        }
    };
    let limits = Limits {
        max_request_body,
        max_model_scan: size(
            "limits.max_model_scan",
            &raw.limits.max_model_scan,
            d.max_model_scan,
        )?,
        max_buffered_bodies: size(
            "limits.max_buffered_bodies",
            &raw.limits.max_buffered_bodies,
            d.max_buffered_bodies,
        )?,
        max_concurrent_requests: count(
            "limits.max_concurrent_requests",
            raw.limits.max_concurrent_requests,
            d.max_concurrent_requests,
        )?,
        max_requests_per_client: count(
            "limits.max_requests_per_client",
            raw.limits.max_requests_per_client,
            d.max_requests_per_client,
        )?,
        max_requests_per_tenant: count(
            "limits.max_requests_per_tenant",
            raw.limits.max_requests_per_tenant,
            d.max_requests_per_tenant,
        )?,
        upstream_timeout: timeout(
            "limits.upstream_timeout",
            &raw.limits.upstream_timeout,
            d.upstream_timeout,
        )?,
        stream_idle_timeout: timeout(
            "limits.stream_idle_timeout",
            &raw.limits.stream_idle_timeout,
            d.stream_idle_timeout,
        )?,
        request_idle_timeout: timeout(
            "limits.request_idle_timeout",
            &raw.limits.request_idle_timeout,
            d.request_idle_timeout,
        )?,
        request_body_timeout: timeout(
            "limits.request_body_timeout",
            &raw.limits.request_body_timeout,
            d.request_body_timeout,
        )?,
        max_header_bytes,
        idle_connection_timeout: timeout(
            "limits.idle_connection_timeout",
            &raw.limits.idle_connection_timeout,
            d.idle_connection_timeout,
        )?,
        max_connections: count(
            "limits.max_connections",
            raw.limits.max_connections,
            d.max_connections,
        )?,
        max_connections_per_uid: count(
            "limits.max_connections_per_uid",
            raw.limits.max_connections_per_uid,
            d.max_connections_per_uid,
        )?,
        shutdown_grace: duration(
            "limits.shutdown_grace",
            &raw.limits.shutdown_grace,
            d.shutdown_grace,
        )?,
    };
    let pool = PoolSettings {
        default_cooldown: duration(
            "pool.default_cooldown",
            &raw.pool.default_cooldown,
            Duration::from_secs(30),
        )?,
        quarantine: duration(
            "pool.quarantine",
            &raw.pool.quarantine,
            Duration::from_secs(900),
        )?,
    };
    let targets = Targets::resolve(&raw.targets).map_err(|e| ConfigError::Value {
        origin: origin.clone(),
        key: e.key,
        reason: e.reason,
    })?;
    let worker_threads = match raw.worker_threads {
        // One core is left to the audit thread (folding rows into SQLite, and `full` commits on
        // blocking threads) and the kernel's network work: on 2 cores a second async worker
        // only added cross-core wake-ups (compare bench, 3 pairs: 140 vs 184 µs CPU per request
        // at 1,000 req/s, peak equal).
        None => {
            std::thread::available_parallelism().map_or(1, |n| n.get().saturating_sub(1).max(1))
        }
        Some(n) if (1..=1024).contains(&n) => n as usize,
        Some(n) => {
            return Err(value_err(
                "worker_threads",
                format!("{n} must be between 1 and 1024"),
            ));
        }
    };
    let (master_key, previous_master_key) = match raw.master_key {
        None => (MasterKeyConfig::File { path: None }, None),
        Some(mut table) => {
            if raw.master_key_file.is_some() {
                return Err(value_err(
                    "master_key_file",
                    "the [master_key] table names the master key too: keep one (for a key file, \
                     [master_key] provider = \"file\" with path = ...)"
                        .into(),
                ));
            }
            let previous = table.previous.take();
            let new = master_key_table(table, "master_key").map_err(|(k, r)| value_err(&k, r))?;
            let previous = match previous {
                None => None,
                Some(p) => {
                    if p.previous.is_some() {
                        return Err(value_err(
                            "master_key.previous.previous",
                            "migration goes from one key to one key: migrate once, then again"
                                .into(),
                        ));
                    }
                    let old = master_key_table(*p, "master_key.previous")
                        .map_err(|(k, r)| value_err(&k, r))?;
                    if old == new {
                        return Err(value_err(
                            "master_key.previous",
                            "it names the same key as [master_key]: remove [master_key.previous] \
                             once a migration is done"
                                .into(),
                        ));
                    }
                    Some(old)
                }
            };
            (new, previous)
        }
    };
    let prices =
        crate::prices::PriceTable::new(price_rows(raw.prices).map_err(|(k, r)| value_err(&k, r))?);
    let governance = {
        let g = raw.governance;
        if let Some(url) = &g.redis_url {
            crate::governance::check_redis_url(url)
                .map_err(|reason| value_err("governance.redis_url", reason))?;
        }
        let on_backend_error = match g.on_backend_error.as_deref() {
            None | Some("deny") => crate::governance::OnBackendError::Deny,
            Some("local") => crate::governance::OnBackendError::Local,
            Some(other) => {
                return Err(value_err(
                    "governance.on_backend_error",
                    format!("must be \"deny\" or \"local\", not {other:?}"),
                ));
            }
        };
        crate::governance::Settings {
            redis_url: g.redis_url,
            on_backend_error,
            timeout: timeout(
                "governance.timeout",
                &g.timeout,
                crate::governance::Settings::default().timeout,
            )?,
        }
    };
    Ok(Config {
        governance,
        prices,
        source,
        master_key,
        previous_master_key,
        worker_threads,
        state_dir,
        socket,
        socket_group: raw.socket_group,
        admin_socket,
        master_key_file: raw.master_key_file,
        require_external_master_key: raw.require_external_master_key.unwrap_or(false),
        listen_tcp,
        metrics_listen,
        otlp_endpoint,
        lock_memory,
        audit_sync,
        audit_retention,
        audit_export,
        audit_export_buffer,
        bundle: raw.bundle,
        bundle_watch,
        bundle_poll_interval,
        limits,
        pool,
        targets,
    })
}

/// Checks `otlp_endpoint`: an `http` or `https` URL with a host, no user name or password
/// (they would be logged with the URL; collectors that need a token take it from
/// `OTEL_EXPORTER_OTLP_HEADERS`), no query or fragment. Returns it without a trailing `/`.
fn otlp_endpoint(text: &str) -> Result<String, String> {
    let uri: http::Uri = text.parse().map_err(|_| {
        "not a URL: write the collector's OTLP/HTTP base URL, like http://127.0.0.1:4318"
            .to_string()
    })?;
    match uri.scheme_str() {
        Some("http" | "https") => {}
        _ => {
            return Err(
                "must start with http:// or https:// (OTLP over HTTP; gRPC is not supported)"
                    .into(),
            );
        }
    }
    let authority = uri.authority().ok_or("names no host")?;
    if authority.as_str().contains('@') {
        return Err(
            "holds a user name or password; put collector credentials in \
                    OTEL_EXPORTER_OTLP_HEADERS instead"
                .into(),
        );
    }
    if uri.query().is_some() || text.contains('#') {
        return Err(
            "must not have a query or fragment: give the base URL; keyward adds \
                    /v1/traces"
                .into(),
        );
    }
    Ok(text.trim_end_matches('/').to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_of(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |k| {
            pairs
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn defaults_follow_keyward_home() {
        let env = env_of(&[
            ("KEYWARD_HOME", "/tmp/kwh"),
            ("XDG_RUNTIME_DIR", "/run/user/1"),
        ]);
        let c = Config::load(None, &env).unwrap();
        assert_eq!(c.state_dir, Path::new("/tmp/kwh"));
        assert_eq!(c.socket, Path::new("/tmp/kwh/keyward.sock"));
        assert_eq!(c.admin_socket, Path::new("/tmp/kwh/admin.sock"));
        assert_eq!(c.limits.max_request_body, 16 << 20);
        assert_eq!(c.lock_memory, LockMemory::All);
    }

    #[test]
    fn systemd_and_xdg_directories() {
        let env = env_of(&[
            ("STATE_DIRECTORY", "/var/lib/keyward"),
            ("RUNTIME_DIRECTORY", "/run/keyward"),
        ]);
        let c = Config::load(None, &env).unwrap();
        assert_eq!(c.state_dir, Path::new("/var/lib/keyward"));
        assert_eq!(c.socket, Path::new("/run/keyward/keyward.sock"));
        let env = env_of(&[("XDG_STATE_HOME", "/h/.state"), ("HOME", "/h")]);
        let c = Config::load(None, &env).unwrap();
        assert_eq!(c.state_dir, Path::new("/h/.state/keyward"));
        assert_eq!(c.socket, Path::new("/h/.state/keyward/keyward.sock"));
        let env = env_of(&[("HOME", "/h")]);
        assert_eq!(
            Config::load(None, &env).unwrap().state_dir,
            Path::new("/h/.local/state/keyward")
        );
    }

    #[test]
    fn zero_where_it_would_break_everything_is_refused() {
        let env = env_of(&[("KEYWARD_HOME", "/tmp/x")]);
        let f = Path::new("/etc/kw.toml");
        for (text, key, hint) in [
            (
                "audit_retention = \"0s\"",
                "audit_retention",
                "keep everything",
            ),
            (
                "[limits]\nupstream_timeout = \"0s\"",
                "limits.upstream_timeout",
                "positive",
            ),
            (
                "[limits]\nstream_idle_timeout = \"0m\"",
                "limits.stream_idle_timeout",
                "positive",
            ),
            (
                "[limits]\nrequest_idle_timeout = \"0s\"",
                "limits.request_idle_timeout",
                "positive",
            ),
            (
                "[limits]\nmax_request_body = \"0\"",
                "limits.max_request_body",
                "16MiB",
            ),
        ] {
            let e = Config::from_toml(text, f, &env).unwrap_err().to_string();
            assert!(e.contains(key) && e.contains(hint), "{text}: {e}");
        }
        // Zero stays allowed where it means "none": no drain wait.
        assert!(Config::from_toml("[limits]\nshutdown_grace = \"0s\"", f, &env).is_ok());
    }

    #[test]
    fn price_rows_extend_the_table_and_bad_ones_name_their_key() {
        let env = env_of(&[("KEYWARD_HOME", "/tmp/x")]);
        let f = Path::new("/etc/keyward/keyward.toml");
        let c = Config::from_toml(
            "[[prices]]\ntarget = \"openai\"\nmodel = \"ft:*\"\ninput = 3.0\noutput = 12.0\n\
             as_of = \"2026-01-02\"",
            f,
            &env,
        )
        .unwrap();
        let p = c.prices.lookup("openai", "ft:gpt-4o:acme").unwrap();
        assert_eq!(
            (p.input, p.cached_input, p.cache_write),
            (3_000_000, 3_000_000, 3_000_000)
        );
        assert_eq!((p.output, p.source), (12_000_000, "config"));
        assert!(
            c.prices.lookup("openai", "gpt-4o").is_some(),
            "shipped rows stay"
        );
        for (text, key) in [
            (
                "target = \"openai\"\nmodel = \"x\"\ninput = -1.0\noutput = 1.0",
                "prices[0].input",
            ),
            (
                "target = \"openai\"\nmodel = \"\"\ninput = 1.0\noutput = 1.0",
                "prices[0].model",
            ),
            (
                "target = \"\"\nmodel = \"x\"\ninput = 1.0\noutput = 1.0",
                "prices[0].target",
            ),
            (
                "target = \"openai\"\nmodel = \"x\"\ninput = 1.0\noutput = 1.0\nas_of = \"June\"",
                "prices[0].as_of",
            ),
        ] {
            let e = Config::from_toml(&format!("[[prices]]\n{text}"), f, &env)
                .unwrap_err()
                .to_string();
            assert!(e.contains(key), "{text}: {e}");
        }
        let e = Config::from_toml(
            "[[prices]]\ntarget = \"openai\"\nmodel = \"x\"\ninput = 1.0",
            f,
            &env,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("output"), "{e}");
    }

    #[test]
    fn syntax_errors_name_the_line_but_never_repeat_it() {
        let env = env_of(&[("KEYWARD_HOME", "/tmp/x")]);
        let f = Path::new("/etc/keyward/keyward.toml");
        let secret = "sk-live-0123456789abcdefSECRET";
        for text in [
            format!("socket = \"/x\"\n[targets.openai]\napi_key = \"{secret}\"\n"),
            format!("socket = \"/x\"\n\nworker_threads = \"{secret}\"\n"),
            format!("socket = \"/x\"\n\nmaster_key = {secret}\n"),
            // A value holding serde's own separator.
            format!("socket = \"/x\"\n\nworker_threads = \"{secret}\\\", expected {secret}\"\n"),
        ] {
            let e = Config::from_toml(&text, f, &env).unwrap_err().to_string();
            assert!(!e.contains("SECRET"), "{e}");
            assert!(e.contains("line 3"), "{e}");
            assert!(e.contains("/etc/keyward/keyward.toml"), "{e}");
        }
        // Values of the right type but not accepted are refused by key, without the value.
        for (text, key) in [
            (format!("lock_memory = \"{secret}\""), "lock_memory"),
            (format!("audit_sync = \"{secret}\""), "audit_sync"),
            (format!("listen_tcp = \"{secret}\""), "listen_tcp"),
            (
                format!("[limits]\nupstream_timeout = \"a\\\", b{secret}\""),
                "limits.upstream_timeout",
            ),
            (
                format!("[limits]\nmax_request_body = \"{secret}\""),
                "limits.max_request_body",
            ),
        ] {
            let e = Config::from_toml(&text, f, &env).unwrap_err().to_string();
            assert!(!e.contains("SECRET") && e.contains(key), "{e}");
        }
    }

    #[test]
    fn bad_values_name_file_key_and_reason() {
        let env = env_of(&[("KEYWARD_HOME", "/tmp/x")]);
        let f = Path::new("/etc/kw.toml");
        // Each bad value, and every text its error must name.
        let cases: [(&str, &[&str]); 9] = [
            (
                "listen_tcp = \"0.0.0.0:8787\"",
                &[
                    "listen_tcp",
                    "not a loopback address",
                    "clear text",
                    "listen_tcp_allow_remote",
                ],
            ),
            (
                "listen_tcp = \"[::]:8787\"",
                &["listen_tcp", "not a loopback address"],
            ),
            (
                "[limits]\nupstream_timeout = \"soon\"",
                &["/etc/kw.toml", "limits.upstream_timeout", "30s"],
            ),
            ("lock_memory = \"some\"", &["lock_memory", "\"all\""]),
            ("sokcet = \"/x\"", &["/etc/kw.toml", "sokcet"]),
            (
                "listen_tcp = \"localhost:8787\"",
                &["listen_tcp", "hostnames are not resolved"],
            ),
            (
                "worker_threads = 0",
                &["worker_threads", "between 1 and 1024"],
            ),
            (
                "worker_threads = 1025",
                &["worker_threads", "between 1 and 1024"],
            ),
            (
                "[limits]\nmax_concurrent_requests = 0",
                &["max_concurrent_requests"],
            ),
        ];
        for (text, needles) in cases {
            let e = Config::from_toml(text, f, &env).unwrap_err().to_string();
            for needle in needles {
                assert!(e.contains(needle), "{text}: {e} lacks {needle}");
            }
        }
    }

    #[test]
    fn otlp_endpoints_are_http_base_urls_without_credentials() {
        let env = env_of(&[("KEYWARD_HOME", "/tmp/x")]);
        let f = Path::new("/etc/kw.toml");
        let c = Config::from_toml("", f, &env).unwrap();
        assert_eq!(c.otlp_endpoint, None);
        for (text, want) in [
            ("http://127.0.0.1:4318", "http://127.0.0.1:4318"),
            ("https://otel.example:4318/", "https://otel.example:4318"),
            ("http://collector/prefix", "http://collector/prefix"),
        ] {
            let c = Config::from_toml(&format!("otlp_endpoint = \"{text}\""), f, &env).unwrap();
            assert_eq!(c.otlp_endpoint.as_deref(), Some(want));
        }
        for (text, needle) in [
            ("127.0.0.1:4318", "http:// or https://"),
            ("grpc://127.0.0.1:4317", "gRPC is not supported"),
            (
                "http://user:pw@collector:4318",
                "OTEL_EXPORTER_OTLP_HEADERS",
            ),
            ("http://collector:4318/?token=x", "query"),
            ("not a url", "not a URL"),
        ] {
            let e = Config::from_toml(&format!("otlp_endpoint = \"{text}\""), f, &env)
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("otlp_endpoint") && e.contains(needle),
                "{text}: {e}"
            );
            assert!(!e.contains("pw@"), "{e}");
        }
    }

    #[test]
    fn a_remote_tcp_listener_needs_the_explicit_setting() {
        let env = env_of(&[("KEYWARD_HOME", "/tmp/x")]);
        let f = Path::new("/etc/kw.toml");
        let c = Config::from_toml("listen_tcp = \"127.0.0.1:8787\"", f, &env).unwrap();
        assert!(c.listen_tcp.unwrap().ip().is_loopback());
        let c = Config::from_toml(
            "listen_tcp = \"0.0.0.0:8787\"\nlisten_tcp_allow_remote = true",
            f,
            &env,
        )
        .unwrap();
        assert_eq!(c.listen_tcp.unwrap().to_string(), "0.0.0.0:8787");
    }

    #[test]
    fn master_key_tables_parse_per_provider() {
        let env = env_of(&[("KEYWARD_HOME", "/tmp/x")]);
        let f = Path::new("/etc/kw.toml");
        let c = Config::from_toml("", f, &env).unwrap();
        assert_eq!(c.master_key, MasterKeyConfig::File { path: None });
        assert_eq!(c.previous_master_key, None);
        let c = Config::from_toml(
            r#"
            [master_key]
            provider = "pkcs11"
            module = "/usr/lib/softhsm/libsofthsm2.so"
            token_label = "keyward"
            key_label = "keyward-master"
            pin_file = "/run/credentials/keyward.service/hsm-pin"
            [master_key.previous]
            provider = "file"
            path = "/etc/keyward/master.key"
            "#,
            f,
            &env,
        )
        .unwrap();
        assert_eq!(c.master_key.provider(), "pkcs11");
        assert_eq!(
            c.previous_master_key,
            Some(MasterKeyConfig::File {
                path: Some("/etc/keyward/master.key".into())
            })
        );
        let c = Config::from_toml(
            "[master_key]\nprovider = \"aws-kms\"\nkey_id = \"alias/keyward\"\nregion = \
             \"eu-west-1\"\nendpoint = \"https://kms.eu-west-1.amazonaws.com/\"\n",
            f,
            &env,
        )
        .unwrap();
        assert_eq!(
            c.master_key,
            MasterKeyConfig::AwsKms {
                key_id: "alias/keyward".into(),
                region: "eu-west-1".into(),
                endpoint: Some("https://kms.eu-west-1.amazonaws.com".into()),
                ca_file: None,
            }
        );
    }

    #[test]
    fn bad_master_key_tables_name_the_key_and_the_fix() {
        let env = env_of(&[("KEYWARD_HOME", "/tmp/x")]);
        let f = Path::new("/etc/kw.toml");
        let pkcs11 = "provider = \"pkcs11\"\nmodule = \"/m.so\"\ntoken_label = \"t\"\n\
                      key_label = \"k\"\npin_file = \"/p\"\n";
        let kms = "provider = \"aws-kms\"\nkey_id = \"alias/k\"\nregion = \"eu-west-1\"\n";
        let cases: Vec<(String, &[&str])> = vec![
            (
                "[master_key]\npath = \"/k\"".into(),
                &["master_key.provider", "missing", "pkcs11"],
            ),
            (
                "[master_key]\nprovider = \"vault\"".into(),
                &["master_key.provider", "unknown provider", "aws-kms"],
            ),
            (
                "[master_key]\nprovider = \"pkcs11\"\nmodule = \"/m.so\"".into(),
                &["master_key.token_label", "missing"],
            ),
            (
                format!("[master_key]\n{pkcs11}region = \"eu-west-1\""),
                &["master_key.region", "not a setting of provider \"pkcs11\""],
            ),
            (
                format!("[master_key]\n{pkcs11}").replace("/m.so", "m.so"),
                &["master_key.module", "absolute"],
            ),
            (
                format!("[master_key]\n{pkcs11}").replace("key_label = \"k\"", "key_label = \" \""),
                &["master_key.key_label", "empty"],
            ),
            (
                format!("[master_key]\n{kms}endpoint = \"http://127.0.0.1:1\""),
                &["master_key.endpoint", "https://"],
            ),
            (
                format!("[master_key]\n{kms}endpoint = \"https://kms.example/x\""),
                &["master_key.endpoint", "without a path"],
            ),
            (
                format!("[master_key]\n{kms}").replace("eu-west-1", "EU West"),
                &["master_key.region", "region name"],
            ),
            (
                format!("master_key_file = \"/k\"\n[master_key]\n{kms}"),
                &["master_key_file", "keep one"],
            ),
            (
                format!("[master_key]\n{kms}[master_key.previous]\n{kms}"),
                &["master_key.previous", "same key"],
            ),
            (
                format!(
                    "[master_key]\n{kms}[master_key.previous]\n{pkcs11}\
                     [master_key.previous.previous]\n{kms}"
                ),
                &["master_key.previous.previous", "migrate once"],
            ),
            (
                "[master_key]\nprovider = \"file\"\npin = \"1234\"".into(),
                &["/etc/kw.toml", "pin"],
            ),
        ];
        for (text, needles) in cases {
            let e = Config::from_toml(&text, f, &env).unwrap_err().to_string();
            for needle in needles {
                assert!(e.contains(needle), "{text}: {e} lacks {needle}");
            }
        }
    }

    #[test]
    fn full_example_parses() {
        let env = env_of(&[]);
        let text = r#"
            socket = "/run/keyward/keyward.sock"
            socket_group = "keyward-clients"
            admin_socket = "/run/keyward/admin.sock"
            state_dir = "/var/lib/keyward"
            master_key_file = "/etc/keyward/master.key"
            require_external_master_key = true
            listen_tcp = "127.0.0.1:8787"
            lock_memory = "secrets"
            audit_sync = "full"
            audit_retention = "400d"
            [limits]
            max_request_body = "16MiB"
            max_concurrent_requests = 4096
            upstream_timeout = "600s"
            stream_idle_timeout = "300s"
        "#;
        let c = Config::from_toml(text, Path::new("x.toml"), &env).unwrap();
        assert_eq!(c.audit_sync, AuditSync::Full);
        assert_eq!(c.lock_memory, LockMemory::Secrets);
        assert_eq!(c.audit_retention, Some(Duration::from_secs(400 * 86_400)));
        assert!(c.require_external_master_key);
        assert_eq!(c.listen_tcp.unwrap().port(), 8787);
    }
}

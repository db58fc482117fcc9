//! The command line: `serve` starts the daemon; every other command is a thin client of the
//! running daemon's admin socket and prints its answer as a table or JSON lines.
//!
//! `cli` must not open the database or any key file. Secrets are read from standard input only.

use std::io::{BufRead, IsTerminal, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use serde_json::Value;
use zeroize::Zeroizing;

use crate::admin::{WireSecret, api};
use crate::config::{admin_socket_for_cli, process_env};
use crate::identity::CredentialKind;
use crate::seal::Secret;
use crate::units::{now_unix, parse_duration, parse_time};

/// Exit code: the daemon is not reachable (EX_UNAVAILABLE).
pub const EXIT_UNREACHABLE: u8 = 69;

/// keyward: keeps provider API keys away from applications.
#[derive(Debug, Parser)]
#[command(name = "keyward", version, about)]
pub struct Cli {
    /// Admin socket of the running daemon (default: $KEYWARD_ADMIN_SOCKET, then serve's default).
    #[arg(long, global = true, value_name = "PATH")]
    pub admin_socket: Option<PathBuf>,
    /// Print one JSON object per line instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
    /// The user the daemon runs as, when it is neither root nor you (a name or a uid; default:
    /// $KEYWARD_DAEMON_USER). The CLI sends nothing to an admin socket served by anyone else.
    #[arg(long, global = true, value_name = "USER")]
    pub daemon_user: Option<String>,
    /// The command.
    #[command(subcommand)]
    pub command: Command,
}

/// Top-level commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon (no config needed: embedded defaults).
    Serve {
        /// TOML config file (default: $KEYWARD_CONFIG, else none).
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Master key file (64 hex characters).
        #[arg(long, value_name = "FILE")]
        master_key_file: Option<PathBuf>,
        /// Print a ready-to-use client token and a sample request.
        #[arg(long)]
        dev: bool,
    },
    /// Show the running daemon's status.
    Status,
    /// Print the daemon's Prometheus metrics (the text `/metrics` serves on `metrics_listen`).
    Metrics,
    /// Re-read the config file: targets, limits and pool apply at once; an invalid file
    /// changes nothing.
    Reload,
    /// Manage tenants.
    #[command(subcommand)]
    Tenant(TenantCommand),
    /// Manage provider credentials (secrets are read from standard input).
    #[command(subcommand)]
    Cred(CredCommand),
    /// Manage clients (applications) and their tokens.
    #[command(subcommand)]
    Client(ClientCommand),
    /// Query and verify the audit trail.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Seal tenants, clients and credentials into a bundle for sidecars.
    #[command(subcommand)]
    Bundle(BundleCommand),
    /// Cost and tokens from the audit trail, grouped (times bucketed by UTC hour).
    Spend {
        /// Only this tenant.
        #[arg(long)]
        tenant: Option<String>,
        /// Group by this dimension.
        #[arg(
            long,
            value_parser = ["tenant", "team", "client", "credential", "model", "day"],
            default_value = "tenant"
        )]
        by: String,
        /// RFC 3339 time or a duration ago (e.g. 30d).
        #[arg(long, value_name = "TIME", value_parser = parse_cli_time)]
        since: Option<i64>,
        /// RFC 3339 time or a duration ago.
        #[arg(long, value_name = "TIME", value_parser = parse_cli_time)]
        until: Option<i64>,
    },
    /// Show the price table in effect (USD per million tokens): shipped rows and `[[prices]]`.
    Prices {
        /// Only this target.
        #[arg(long)]
        target: Option<String>,
    },
    /// Spend budgets per tenant, team, client or credential (periods in UTC).
    #[command(subcommand)]
    Budget(BudgetCommand),
    /// Requests- and tokens-per-minute limits per tenant, team or client.
    #[command(subcommand)]
    Limit(LimitCommand),
}

/// `keyward budget …`
#[derive(Debug, Subcommand)]
pub enum BudgetCommand {
    /// Set the budget of a scope and period (replaces an existing one of the same scope and
    /// period).
    Set {
        /// Tenant name.
        #[arg(long)]
        tenant: String,
        /// Only this team's clients.
        #[arg(long, group = "scope")]
        team: Option<String>,
        /// Only this client (id).
        #[arg(long, group = "scope")]
        client: Option<String>,
        /// Only calls this credential (id) serves.
        #[arg(long, group = "scope")]
        credential: Option<String>,
        /// Most spend per period, USD (e.g. 10 or 2.50).
        #[arg(long, value_name = "USD")]
        limit: String,
        /// When the spend resets: UTC day, ISO week (Monday) or UTC month.
        #[arg(long, value_parser = ["day", "week", "month"])]
        period: String,
        /// Once spent: refuse with 429 budget_exceeded (deny, default) or serve and flag (warn).
        #[arg(long, value_parser = ["deny", "warn"])]
        on_exceed: Option<String>,
        /// Write a budget.threshold audit event when spend crosses PCT percent (repeatable).
        #[arg(
            long = "alert",
            value_name = "PCT",
            value_parser = clap::value_parser!(u8).range(1..=100)
        )]
        alerts: Vec<u8>,
    },
    /// List budgets with spent, limit and reset time.
    List {
        /// Only this tenant.
        #[arg(long)]
        tenant: Option<String>,
    },
    /// Delete a budget.
    Delete {
        /// Budget id (`bud_…`).
        id: String,
    },
}

/// `keyward limit …`
#[derive(Debug, Subcommand)]
pub enum LimitCommand {
    /// Set the rate limit of a scope (replaces an existing one of the same scope).
    Set {
        /// Tenant name.
        #[arg(long)]
        tenant: String,
        /// Only this team's clients.
        #[arg(long, group = "scope")]
        team: Option<String>,
        /// Only this client (id).
        #[arg(long, group = "scope")]
        client: Option<String>,
        /// Requests per UTC minute.
        #[arg(long)]
        rpm: Option<u64>,
        /// Tokens (input + output, as providers report them) per UTC minute.
        #[arg(long)]
        tpm: Option<u64>,
    },
    /// List rate limits with this minute's use.
    List {
        /// Only this tenant.
        #[arg(long)]
        tenant: Option<String>,
    },
    /// Delete a rate limit.
    Delete {
        /// Limit id (`lim_…`).
        id: String,
    },
}

/// `keyward tenant …`
#[derive(Debug, Subcommand)]
pub enum TenantCommand {
    /// Add a tenant.
    Add {
        /// Tenant name.
        name: String,
        /// Refuse or flag keys older than this (e.g. 90d).
        #[arg(long, value_name = "DUR", value_parser = parse_duration)]
        max_key_age: Option<Duration>,
        /// What to do with keys past --max-key-age.
        #[arg(long, value_parser = ["deny", "warn"])]
        on_expiry: Option<String>,
        /// Default overlap after `cred rotate` (default 24h).
        #[arg(long, value_name = "DUR", value_parser = parse_duration)]
        rotation_overlap: Option<Duration>,
    },
    /// List tenants.
    List,
}

/// `keyward cred …`
#[derive(Debug, Subcommand)]
pub enum CredCommand {
    /// Add a credential; the provider key is read from standard input.
    Add(CredAdd),
    /// List credentials and their versions.
    List {
        /// Only this tenant.
        #[arg(long)]
        tenant: Option<String>,
    },
    /// Add a new version (new secret on standard input); the old one overlaps, then retires.
    Rotate {
        /// Credential id.
        id: String,
        /// How long the previous version stays valid as a fallback.
        #[arg(long, value_name = "DUR", value_parser = parse_duration)]
        overlap: Option<Duration>,
    },
    /// Revoke a credential (all versions) or one version, immediately.
    Revoke {
        /// Credential id.
        id: String,
        /// Only this version.
        #[arg(long = "version", id = "only_version", value_name = "N")]
        version: Option<u32>,
    },
    /// Delete a credential and destroy its wrapped keys.
    Delete {
        /// Credential id.
        id: String,
    },
    /// Make one read-only call (the target's models list) with this credential through the
    /// data plane, audited like any call; exit 1 unless the provider accepts the key.
    Test {
        /// Credential id.
        id: String,
        /// Test this version (default: the current one).
        #[arg(long = "version", id = "test_version", value_name = "N")]
        version: Option<u32>,
    },
}

/// Arguments of `cred add`.
#[derive(Debug, Args)]
pub struct CredAdd {
    /// Tenant name.
    #[arg(long)]
    pub tenant: String,
    /// Target (openai, anthropic, gemini, … or a custom target).
    #[arg(long)]
    pub target: String,
    /// Credential name, unique in the tenant.
    #[arg(long)]
    pub name: String,
    /// Allowed model glob (repeatable; default any).
    #[arg(long = "model", value_name = "GLOB")]
    pub models: Vec<String>,
    /// Allowed capability (repeatable; default any).
    #[arg(long = "capability", value_name = "CAP")]
    pub capabilities: Vec<String>,
    /// Allowed team (repeatable; default any).
    #[arg(long = "team")]
    pub teams: Vec<String>,
    /// Allowed workflow (repeatable; default any).
    #[arg(long = "workflow", value_name = "WF")]
    pub workflows: Vec<String>,
    /// Lower wins; equal priorities share load round-robin.
    #[arg(long)]
    pub priority: Option<i64>,
    /// What the secret on stdin is: api-key (the key), aws-access-key, aws-assume-role,
    /// gcp-service-account or azure-entra (a JSON document; README, "Credential kinds").
    #[arg(long, default_value = "api-key", value_name = "KIND", value_parser = kind_names())]
    pub kind: String,
    /// Right after adding it, test the credential as `cred test` does. A failed test keeps the
    /// credential: the command says it was added and exits 1.
    #[arg(long)]
    pub test: bool,
}

fn kind_names() -> clap::builder::PossibleValuesParser {
    clap::builder::PossibleValuesParser::new(
        crate::identity::kind::ALL_KINDS.iter().map(|k| k.as_str()),
    )
}

/// `keyward client …`
#[derive(Debug, Subcommand)]
pub enum ClientCommand {
    /// Add a client; prints its token once.
    Add {
        /// Tenant name.
        #[arg(long)]
        tenant: String,
        /// Client name, unique in the tenant.
        #[arg(long)]
        name: String,
        /// Team.
        #[arg(long)]
        team: Option<String>,
        /// Bind to this socket peer uid.
        #[arg(long)]
        uid: Option<u32>,
        /// Allowed workflow (repeatable; default any).
        #[arg(long = "workflow", value_name = "WF")]
        workflows: Vec<String>,
    },
    /// List clients.
    List {
        /// Only this tenant.
        #[arg(long)]
        tenant: Option<String>,
    },
    /// Revoke a client's token.
    Revoke {
        /// Client id.
        id: String,
    },
}

/// `keyward audit …`
#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Show audit rows, newest first.
    Query(AuditQuery),
    /// Recompute the chain; exit 1 if any row fails. With --jsonl, check shipped audit lines
    /// instead (locally, with the master key; no daemon needed).
    Verify(AuditVerify),
    /// Replay a credential's history.
    Lifecycle {
        /// Credential id.
        credential_id: String,
    },
}

/// `keyward bundle …`
#[derive(Debug, Subcommand)]
pub enum BundleCommand {
    /// Write a sealed bundle of the named tenants (default: every tenant).
    Export {
        /// The bundle file to write (replaced atomically, mode 0600).
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        /// A tenant to include (repeatable).
        #[arg(long = "tenant", value_name = "T")]
        tenants: Vec<String>,
    },
}

/// Options of `audit verify`.
#[derive(Debug, Args)]
pub struct AuditVerify {
    /// A file of audit lines shipped by `audit_export` (many instances may be interleaved);
    /// checked here with the master key rather than by a daemon.
    #[arg(long, value_name = "FILE")]
    pub jsonl: Option<PathBuf>,
    /// Only this instance's lines.
    #[arg(long, value_name = "ID", requires = "jsonl")]
    pub instance: Option<String>,
    /// Config whose master key settings to use (default: $KEYWARD_CONFIG).
    #[arg(long, value_name = "FILE", requires = "jsonl")]
    pub config: Option<PathBuf>,
    /// Master key file (64 hex characters).
    #[arg(long, value_name = "FILE", requires = "jsonl")]
    pub master_key_file: Option<PathBuf>,
}

/// Filters of `audit query`.
#[derive(Debug, Args)]
pub struct AuditQuery {
    /// Tenant name.
    #[arg(long)]
    pub tenant: Option<String>,
    /// Credential id.
    #[arg(long)]
    pub credential: Option<String>,
    /// Client id.
    #[arg(long)]
    pub client: Option<String>,
    /// Call id.
    #[arg(long)]
    pub call_id: Option<String>,
    /// Event name (e.g. request.resolved).
    #[arg(long)]
    pub event: Option<String>,
    /// RFC 3339 time or a duration ago (e.g. 1h).
    #[arg(long, value_name = "TIME", value_parser = parse_cli_time)]
    pub since: Option<i64>,
    /// RFC 3339 time or a duration ago.
    #[arg(long, value_name = "TIME", value_parser = parse_cli_time)]
    pub until: Option<i64>,
    /// Maximum rows (default 100).
    #[arg(long)]
    pub limit: Option<usize>,
    /// Find the calls that sent exactly this payload (needs --tenant).
    #[arg(long, value_name = "FILE")]
    pub payload_file: Option<PathBuf>,
}

fn parse_cli_time(text: &str) -> Result<i64, crate::units::UnitError> {
    parse_time(text, now_unix())
}

/// A failed command: its exit code and one line for stderr.
struct Failure(u8, String);

/// Runs a parsed client command (everything except `serve`).
pub fn run(cli: Cli) -> ExitCode {
    if let Command::Audit(AuditCommand::Verify(v)) = &cli.command
        && let Some(file) = &v.jsonl
    {
        return match verify_jsonl(v, file, cli.json) {
            Ok(()) => ExitCode::SUCCESS,
            Err(Failure(code, message)) => {
                eprintln!("keyward: {message}");
                ExitCode::from(code)
            }
        };
    }
    let socket = admin_socket_for_cli(cli.admin_socket.as_deref(), &process_env);
    let daemon = match trusted_daemon_uids(cli.daemon_user.as_deref()) {
        Ok(uids) => uids,
        Err(Failure(code, message)) => {
            eprintln!("keyward: {message}");
            return ExitCode::from(code);
        }
    };
    match execute(&cli.command, &Endpoint { socket, daemon }, cli.json) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure(code, message)) => {
            eprintln!("keyward: {message}");
            ExitCode::from(code)
        }
    }
}

/// The admin socket and the uids its server may run as.
struct Endpoint {
    /// The socket path.
    socket: PathBuf,
    /// Root, this process's uid and `--daemon-user`: the only servers a request is sent to.
    daemon: Vec<u32>,
}

/// Root, our own uid and the `--daemon-user` / `$KEYWARD_DAEMON_USER` (a name or a uid):
/// mirrors the daemon's own rule for its peers (root and its uid).
fn trusted_daemon_uids(flag: Option<&str>) -> Result<Vec<u32>, Failure> {
    let mut uids = vec![0, nix::unistd::getuid().as_raw()];
    let named = flag
        .map(str::to_string)
        .or_else(|| process_env("KEYWARD_DAEMON_USER"));
    if let Some(name) = named.filter(|n| !n.is_empty()) {
        let uid = match name.parse::<u32>() {
            Ok(uid) => uid,
            Err(_) => match nix::unistd::User::from_name(&name) {
                Ok(Some(user)) => user.uid.as_raw(),
                _ => {
                    return Err(Failure(
                        2,
                        format!(
                            "--daemon-user {name:?}: no such user; give the name or uid the \
                             daemon runs as"
                        ),
                    ));
                }
            },
        };
        uids.push(uid);
    }
    Ok(uids)
}

fn execute(command: &Command, endpoint: &Endpoint, json: bool) -> Result<(), Failure> {
    let (call, decode) = build_request(command)?;
    let data = send(endpoint, call, decode)?;
    if let Command::Bundle(BundleCommand::Export { out, .. }) = command {
        return write_bundle(out, &data, json);
    }
    print(command, &data, json)?;
    match command {
        Command::Cred(CredCommand::Add(a)) if a.test => test_added(endpoint, &data, json),
        Command::Cred(CredCommand::Test { .. }) => tested(&data),
        _ => Ok(()),
    }
}

/// `cred add --test`: tests the credential just added. Whatever happens, the credential stays
/// added, and a failure says so.
fn test_added(endpoint: &Endpoint, added: &Value, json: bool) -> Result<(), Failure> {
    let id = added["id"].as_str().unwrap_or_default();
    let kept = |why: String| format!("credential {id} was added and is kept, but {why}");
    let call = Call::post(
        format!("/v1/credentials/{}/test", segment(id)?),
        &api::credentials::TestCredential::default(),
    )?;
    let data = send(endpoint, call, typed::<api::credentials::CredentialTested>).map_err(
        |Failure(code, why)| Failure(code, kept(format!("it could not be tested: {why}"))),
    )?;
    print_test(&data, json);
    tested(&data).map_err(|Failure(code, why)| Failure(code, kept(why)))
}

/// A test whose provider did not accept the key is exit 1, with the verdict.
fn tested(data: &Value) -> Result<(), Failure> {
    if data["ok"].as_bool() == Some(true) {
        Ok(())
    } else {
        Err(Failure(
            1,
            format!("its test failed: {}", plain(&data["verdict"])),
        ))
    }
}

/// Prints a test call's outcome: id, version and preview, the call, the provider's status,
/// the latency and the audit call id.
fn print_test(data: &Value, json: bool) {
    if json {
        println!("{data}");
        return;
    }
    println!(
        "tested   {}/v{} ({}) on target {}: {}",
        plain(&data["id"]),
        plain(&data["version"]),
        plain(&data["preview"]),
        plain(&data["target"]),
        plain(&data["request"])
    );
    match data["status"].as_u64() {
        Some(status) => println!("status   {status} from the provider"),
        None => println!(
            "status   none: keyward answered itself ({})",
            plain(&data["error"])
        ),
    }
    println!("latency  {} ms", plain(&data["latency_ms"]));
    println!("call id  {}", plain(&data["call_id"]));
    println!("result   {}", plain(&data["verdict"]));
}

/// Writes an exported bundle next to `out` and renames it into place, so a reader (or a
/// `kubectl create secret` run meanwhile) never sees half a bundle.
fn write_bundle(out: &std::path::Path, data: &Value, json: bool) -> Result<(), Failure> {
    use std::os::unix::fs::OpenOptionsExt;
    let text = data["text"].as_str().unwrap_or_default();
    let fail = |e: std::io::Error| Failure(1, format!("cannot write {}: {e}", out.display()));
    let mut tmp = out.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(fail)?;
    file.write_all(text.as_bytes()).map_err(fail)?;
    file.sync_all().map_err(fail)?;
    std::fs::rename(&tmp, out).map_err(fail)?;
    let summary = serde_json::json!({
        "out": out,
        "serial": data["serial"],
        "tenants": data["tenants"],
        "clients": data["clients"],
        "credentials": data["credentials"],
    });
    if json {
        println!("{summary}");
    } else {
        println!(
            "bundle serial {} written to {}: {} tenants, {} clients, {} credentials",
            plain(&data["serial"]),
            out.display(),
            plain(&data["tenants"]),
            plain(&data["clients"]),
            plain(&data["credentials"])
        );
    }
    Ok(())
}

/// One request of the admin API: method, path with its query string, and JSON body (empty
/// for none; wiped when dropped, as it may hold a provider key).
struct Call {
    method: http::Method,
    path: String,
    body: Zeroizing<Vec<u8>>,
}

impl Call {
    fn get(path: impl Into<String>) -> Call {
        Call {
            method: http::Method::GET,
            path: path.into(),
            body: Zeroizing::new(Vec::new()),
        }
    }

    fn delete(path: impl Into<String>) -> Call {
        Call {
            method: http::Method::DELETE,
            ..Call::get(path)
        }
    }

    fn post<T: serde::Serialize>(path: impl Into<String>, body: &T) -> Result<Call, Failure> {
        Ok(Call {
            method: http::Method::POST,
            path: path.into(),
            body: Zeroizing::new(serde_json::to_vec(body).map_err(|e| Failure(1, e.to_string()))?),
        })
    }

    /// `path?query` for a filter, or `path` when it has no parameters set.
    fn get_with<T: serde::Serialize>(path: &str, filter: &T) -> Result<Call, Failure> {
        let query = serde_urlencoded::to_string(filter).map_err(|e| Failure(2, e.to_string()))?;
        Ok(Call::get(if query.is_empty() {
            path.to_string()
        } else {
            format!("{path}?{query}")
        }))
    }
}

/// Reads a successful answer's body as the typed response `T`, then as a JSON value for the
/// printers (which show its fields by name).
type Decode = fn(&[u8]) -> Result<Value, String>;

fn typed<T: serde::de::DeserializeOwned + serde::Serialize>(body: &[u8]) -> Result<Value, String> {
    let value: T = serde_json::from_slice(body).map_err(|e| e.to_string())?;
    serde_json::to_value(value).map_err(|e| e.to_string())
}

/// The Prometheus text of `/v1/metrics`, as `{"text": ...}` for `--json`.
fn text(body: &[u8]) -> Result<Value, String> {
    Ok(serde_json::json!({ "text": String::from_utf8_lossy(body) }))
}

/// An id as a path segment: ids are plain (`cred_…`); anything else cannot name a resource.
fn segment(id: &str) -> Result<&str, Failure> {
    let plain = !id.is_empty()
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if plain && id != "." && id != ".." {
        Ok(id)
    } else {
        Err(Failure(
            1,
            format!(
                "`{}` is not an id (ids look like cred_… or cli_…; see the list commands)",
                id.escape_debug()
            ),
        ))
    }
}

fn build_request(command: &Command) -> Result<(Call, Decode), Failure> {
    use api::{audit, clients, credentials, governance, system, tenants};
    let secs = |d: &Option<Duration>| d.map(|d| d.as_secs());
    Ok(match command {
        Command::Serve { .. } => unreachable!("serve is handled by main"),
        Command::Status => (Call::get("/v1/status"), typed::<system::Status>),
        Command::Metrics => (Call::get("/v1/metrics"), text),
        Command::Reload => (
            Call::post("/v1/reload", &serde_json::json!({}))?,
            typed::<system::Reloaded>,
        ),
        Command::Tenant(TenantCommand::Add {
            name,
            max_key_age,
            on_expiry,
            rotation_overlap,
        }) => (
            Call::post(
                "/v1/tenants",
                &tenants::NewTenant {
                    name: name.clone(),
                    max_key_age_s: secs(max_key_age),
                    on_expiry: match on_expiry.as_deref() {
                        None => None,
                        Some("warn") => Some(tenants::OnExpiry::Warn),
                        Some(_) => Some(tenants::OnExpiry::Deny),
                    },
                    rotation_overlap_s: secs(rotation_overlap),
                },
            )?,
            typed::<tenants::Tenant>,
        ),
        Command::Tenant(TenantCommand::List) => {
            (Call::get("/v1/tenants"), typed::<Vec<tenants::Tenant>>)
        }
        Command::Cred(CredCommand::Add(a)) => (
            Call::post(
                "/v1/credentials",
                &credentials::NewCredential {
                    tenant: a.tenant.clone(),
                    target: a.target.clone(),
                    name: a.name.clone(),
                    models: a.models.clone(),
                    capabilities: a.capabilities.clone(),
                    teams: a.teams.clone(),
                    workflows: a.workflows.clone(),
                    priority: a.priority,
                    kind: Some(a.kind.clone()),
                    secret: WireSecret(read_secret(&match a.kind.parse::<CredentialKind>() {
                        Ok(kind) if kind.is_document() => format!("{kind} JSON for {}", a.name),
                        _ => format!("provider key for {}", a.name),
                    })?),
                },
            )?,
            typed::<credentials::CredentialCreated>,
        ),
        Command::Cred(CredCommand::List { tenant }) => (
            Call::get_with(
                "/v1/credentials",
                &credentials::CredentialFilter {
                    tenant: tenant.clone(),
                },
            )?,
            typed::<Vec<credentials::CredentialVersion>>,
        ),
        Command::Cred(CredCommand::Rotate { id, overlap }) => (
            Call::post(
                format!("/v1/credentials/{}/rotate", segment(id)?),
                &credentials::RotateCredential {
                    overlap_s: secs(overlap),
                    secret: WireSecret(read_secret(&format!("new provider key for {id}"))?),
                },
            )?,
            typed::<credentials::CredentialRotated>,
        ),
        Command::Cred(CredCommand::Revoke { id, version }) => (
            Call::post(
                format!("/v1/credentials/{}/revoke", segment(id)?),
                &credentials::RevokeCredential { version: *version },
            )?,
            typed::<credentials::CredentialRevoked>,
        ),
        Command::Cred(CredCommand::Delete { id }) => (
            Call::delete(format!("/v1/credentials/{}", segment(id)?)),
            typed::<credentials::CredentialDeleted>,
        ),
        Command::Cred(CredCommand::Test { id, version }) => (
            Call::post(
                format!("/v1/credentials/{}/test", segment(id)?),
                &credentials::TestCredential { version: *version },
            )?,
            typed::<credentials::CredentialTested>,
        ),
        Command::Client(ClientCommand::Add {
            tenant,
            name,
            team,
            uid,
            workflows,
        }) => (
            Call::post(
                "/v1/clients",
                &clients::NewClient {
                    tenant: tenant.clone(),
                    name: name.clone(),
                    team: team.clone(),
                    uid: *uid,
                    workflows: workflows.clone(),
                },
            )?,
            typed::<clients::ClientCreated>,
        ),
        Command::Client(ClientCommand::List { tenant }) => (
            Call::get_with(
                "/v1/clients",
                &clients::ClientFilter {
                    tenant: tenant.clone(),
                },
            )?,
            typed::<Vec<clients::Client>>,
        ),
        Command::Client(ClientCommand::Revoke { id }) => (
            Call::post(
                format!("/v1/clients/{}/revoke", segment(id)?),
                &serde_json::json!({}),
            )?,
            typed::<clients::ClientRevoked>,
        ),
        Command::Audit(AuditCommand::Query(q)) => {
            let payload_hex = match &q.payload_file {
                None => None,
                Some(path) => {
                    let bytes = std::fs::read(path).map_err(|e| {
                        Failure(
                            1,
                            format!("cannot read --payload-file {}: {e}", path.display()),
                        )
                    })?;
                    Some(crate::hex::encode(&bytes))
                }
            };
            (
                Call::post(
                    "/v1/audit/search",
                    &audit::AuditQuery {
                        tenant: q.tenant.clone(),
                        credential: q.credential.clone(),
                        client: q.client.clone(),
                        call_id: q.call_id.clone(),
                        event: q.event.clone(),
                        since: q.since,
                        until: q.until,
                        limit: q.limit,
                        payload_hex,
                    },
                )?,
                typed::<Vec<audit::AuditRow>>,
            )
        }
        Command::Audit(AuditCommand::Verify(_)) => {
            (Call::get("/v1/audit/verify"), typed::<audit::VerifyReport>)
        }
        Command::Audit(AuditCommand::Lifecycle { credential_id }) => (
            Call::get(format!("/v1/audit/lifecycle/{}", segment(credential_id)?)),
            typed::<Vec<audit::AuditRow>>,
        ),
        Command::Bundle(BundleCommand::Export { tenants, .. }) => (
            Call::post(
                "/v1/bundle",
                &system::ExportBundle {
                    tenants: tenants.clone(),
                },
            )?,
            typed::<system::Bundle>,
        ),
        Command::Spend {
            tenant,
            by,
            since,
            until,
        } => (
            Call::get_with(
                "/v1/spend",
                &system::SpendFilter {
                    tenant: tenant.clone(),
                    by: serde_json::from_value(Value::String(by.clone()))
                        .map_err(|e| Failure(2, format!("--by {by}: {e}")))?,
                    since: *since,
                    until: *until,
                },
            )?,
            typed::<Vec<system::SpendRow>>,
        ),
        Command::Prices { target } => (
            Call::get_with(
                "/v1/prices",
                &system::PriceFilter {
                    target: target.clone(),
                },
            )?,
            typed::<Vec<system::Price>>,
        ),
        Command::Budget(BudgetCommand::Set {
            tenant,
            team,
            client,
            credential,
            limit,
            period,
            on_exceed,
            alerts,
        }) => (
            Call::post(
                "/v1/budgets",
                &governance::NewBudget {
                    tenant: tenant.clone(),
                    team: team.clone(),
                    client: client.clone(),
                    credential: credential.clone(),
                    limit_usd: limit.clone(),
                    period: period.clone(),
                    on_exceed: on_exceed.clone(),
                    alerts: alerts.clone(),
                },
            )?,
            typed::<governance::Budget>,
        ),
        Command::Budget(BudgetCommand::List { tenant }) => (
            Call::get_with(
                "/v1/budgets",
                &governance::RuleFilter {
                    tenant: tenant.clone(),
                },
            )?,
            typed::<Vec<governance::Budget>>,
        ),
        Command::Budget(BudgetCommand::Delete { id }) => (
            Call::delete(format!("/v1/budgets/{}", segment(id)?)),
            typed::<governance::RuleDeleted>,
        ),
        Command::Limit(LimitCommand::Set {
            tenant,
            team,
            client,
            rpm,
            tpm,
        }) => (
            Call::post(
                "/v1/limits",
                &governance::NewLimit {
                    tenant: tenant.clone(),
                    team: team.clone(),
                    client: client.clone(),
                    rpm: *rpm,
                    tpm: *tpm,
                },
            )?,
            typed::<governance::Limit>,
        ),
        Command::Limit(LimitCommand::List { tenant }) => (
            Call::get_with(
                "/v1/limits",
                &governance::RuleFilter {
                    tenant: tenant.clone(),
                },
            )?,
            typed::<Vec<governance::Limit>>,
        ),
        Command::Limit(LimitCommand::Delete { id }) => (
            Call::delete(format!("/v1/limits/{}", segment(id)?)),
            typed::<governance::RuleDeleted>,
        ),
    })
}

/// Reads a secret: all of stdin with one trailing newline trimmed, or a no-echo prompt on a
/// terminal. Never from argv or the environment.
fn read_secret(what: &str) -> Result<Secret, Failure> {
    let stdin = std::io::stdin();
    let mut buf = Zeroizing::new(Vec::new());
    if stdin.is_terminal() {
        // Echo goes off before the prompt appears, so nothing typed after it is ever shown.
        let restore = disable_echo();
        eprint!("{what} (input hidden): ");
        let _ = std::io::stderr().flush();
        let mut line = Zeroizing::new(String::new());
        let read = stdin.lock().read_line(&mut line);
        if let Some(saved) = restore {
            let _ = nix::sys::termios::tcsetattr(
                std::io::stdin(),
                nix::sys::termios::SetArg::TCSANOW,
                &saved,
            );
        }
        eprintln!();
        read.map_err(|e| Failure(1, format!("cannot read the secret: {e}")))?;
        buf.extend_from_slice(line.as_bytes());
    } else {
        stdin
            .lock()
            .read_to_end(&mut buf)
            .map_err(|e| Failure(1, format!("cannot read the secret from stdin: {e}")))?;
    }
    if buf.ends_with(b"\n") {
        buf.pop();
        if buf.ends_with(b"\r") {
            buf.pop();
        }
    }
    if buf.is_empty() {
        return Err(Failure(
            1,
            "the secret is empty: pipe the provider key on standard input, e.g. printf %s \
             \"$KEY\" | keyward cred add …"
                .into(),
        ));
    }
    if std::str::from_utf8(&buf).is_err() {
        return Err(Failure(
            1,
            "the secret is not valid UTF-8 text; provider keys are printable ASCII".into(),
        ));
    }
    Ok(Secret::from_slice(&buf))
}

fn disable_echo() -> Option<nix::sys::termios::Termios> {
    use nix::sys::termios::{LocalFlags, SetArg, tcgetattr, tcsetattr};
    let saved = tcgetattr(std::io::stdin()).ok()?;
    let mut quiet = saved.clone();
    quiet.local_flags.remove(LocalFlags::ECHO);
    tcsetattr(std::io::stdin(), SetArg::TCSANOW, &quiet).ok()?;
    Some(saved)
}

/// Refuses to talk to an admin socket served by a uid the CLI does not trust: whoever controls
/// the socket's directory could otherwise bind a fake `admin.sock` and collect the secrets
/// `cred add` sends. Checked on the connected socket (SO_PEERCRED) before a byte is written.
fn check_server(stream: &UnixStream, endpoint: &Endpoint) -> Result<(), Failure> {
    use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
    let cred = getsockopt(stream, PeerCredentials).map_err(|e| {
        Failure(
            1,
            format!(
                "cannot read who serves the admin socket {}: {e}; nothing was sent",
                endpoint.socket.display()
            ),
        )
    })?;
    let uid = cred.uid() as u32;
    if endpoint.daemon.contains(&uid) {
        return Ok(());
    }
    let name = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
        .ok()
        .flatten()
        .map(|u| format!(" ({})", u.name))
        .unwrap_or_default();
    Err(Failure(
        1,
        format!(
            "refusing to talk to the admin socket {}: it is served by uid {uid}{name} (pid {}), \
             which is neither root nor you (uid {}); nothing was sent. If keyward really runs as \
             that user, name it with --daemon-user or $KEYWARD_DAEMON_USER; otherwise someone \
             else controls that socket",
            endpoint.socket.display(),
            cred.pid(),
            nix::unistd::getuid()
        ),
    ))
}

/// Connects, checks who serves the socket, sends one request and returns the decoded body of
/// a successful answer; a refusal is exit 1 with the daemon's message.
fn send(endpoint: &Endpoint, call: Call, decode: Decode) -> Result<Value, Failure> {
    let socket = endpoint.socket.as_path();
    let unreachable = |reason: String| {
        Failure(
            EXIT_UNREACHABLE,
            format!(
                "cannot reach the keyward daemon at {}: {reason} (is `keyward serve` running? \
                 point --admin-socket or $KEYWARD_ADMIN_SOCKET at its admin socket)",
                socket.display()
            ),
        )
    };
    let stream = UnixStream::connect(socket).map_err(|e| {
        if e.kind() == std::io::ErrorKind::PermissionDenied {
            Failure(
                EXIT_UNREACHABLE,
                format!(
                    "permission denied on the admin socket {}: it is open only to the daemon's \
                     user and root (uid {} here); run the command as one of them",
                    socket.display(),
                    nix::unistd::getuid()
                ),
            )
        } else {
            unreachable(e.to_string())
        }
    })?;
    check_server(&stream, endpoint)?;
    let answer = crate::admin::client::exchange(stream, call.method, &call.path, call.body)
        .map_err(|e| unreachable(e.0))?;
    if (200..300).contains(&answer.status) {
        return decode(&answer.body)
            .map_err(|e| Failure(1, format!("unreadable answer from the daemon: {e}")));
    }
    let refusal = serde_json::from_slice::<api::ErrorBody>(&answer.body)
        .map(|b| b.error.message)
        .unwrap_or_else(|_| {
            format!(
                "the daemon refused the request (HTTP {}); are the CLI and the daemon the same \
                 version?",
                answer.status
            )
        });
    Err(Failure(1, refusal))
}

// === output ===

fn print(command: &Command, data: &Value, json: bool) -> Result<(), Failure> {
    let rows = |v: &Value| v.as_array().cloned().unwrap_or_else(|| vec![v.clone()]);
    if json {
        for row in rows(data) {
            println!("{row}");
        }
        if let Command::Audit(AuditCommand::Verify(_)) = command {
            return verify_outcome(data).map(|_| ());
        }
        return Ok(());
    }
    match command {
        Command::Serve { .. } | Command::Bundle(_) => {}
        Command::Metrics => print!("{}", data["text"].as_str().unwrap_or_default()),
        Command::Reload => {
            let list = |key: &str| {
                data[key]
                    .as_array()
                    .map(|a| a.iter().map(plain).collect::<Vec<_>>().join(", "))
                    .filter(|s| !s.is_empty())
            };
            println!(
                "reloaded {}: {}",
                plain(&data["file"]),
                list("changed").map_or("no change".into(), |c| format!("changed {c}"))
            );
            if let Some(keys) = list("restart_needed") {
                println!(
                    "not applied, restart keyward for: {keys} (sockets, state directory, master \
                     key and listeners are set up at start)"
                );
            }
        }
        Command::Status => {
            if let Some(map) = data.as_object() {
                for (k, v) in map {
                    println!("{k:<18} {}", plain(v));
                }
            }
        }
        Command::Tenant(TenantCommand::Add { .. }) => println!(
            "tenant {} created ({})",
            plain(&data["name"]),
            plain(&data["id"])
        ),
        Command::Tenant(TenantCommand::List) => table(
            &rows(data),
            &[
                ("NAME", "name"),
                ("ID", "id"),
                ("MAX_KEY_AGE", "max_key_age"),
                ("ON_EXPIRY", "on_expiry"),
                ("OVERLAP", "rotation_overlap"),
                ("CREATED", "created_at"),
            ],
        ),
        Command::Cred(CredCommand::Add(_)) | Command::Cred(CredCommand::Rotate { .. }) => {
            println!("id       {}", plain(&data["id"]));
            println!("version  {}", plain(&data["version"]));
            println!("preview  {}", plain(&data["preview"]));
            if !data["overlap_until"].is_null() {
                println!(
                    "previous versions stay valid until {}",
                    plain(&data["overlap_until"])
                );
            }
        }
        Command::Cred(CredCommand::List { .. }) => table(
            &rows(data)
                .into_iter()
                .map(|mut r| {
                    let mut state = plain(&r["state"]);
                    if !r["until"].is_null() {
                        state = format!("{state} until {}", plain(&r["until"]));
                    }
                    if r["expired"].as_bool() == Some(true) && r["state"] != "expired" {
                        state.push_str(" (expired)");
                    }
                    r["state"] = Value::String(state);
                    r
                })
                .collect::<Vec<_>>(),
            &[
                ("ID", "id"),
                ("TENANT", "tenant"),
                ("TARGET", "target"),
                ("KIND", "kind"),
                ("NAME", "name"),
                ("VER", "version"),
                ("PREVIEW", "preview"),
                ("STATE", "state"),
                ("PRIO", "priority"),
                ("AGE", "age"),
                ("SCOPE", "scope"),
            ],
        ),
        Command::Cred(CredCommand::Revoke { id, .. }) => {
            println!("revoked {id} versions {}", plain(&data["revoked_versions"]))
        }
        Command::Cred(CredCommand::Delete { id }) => {
            println!("deleted {id}; its wrapped data keys are destroyed")
        }
        Command::Cred(CredCommand::Test { .. }) => print_test(data, false),
        Command::Client(ClientCommand::Add { .. }) => {
            println!("id     {}", plain(&data["id"]));
            println!("token  {}", plain(&data["token"]));
            println!("store the token now: it is not shown again (only its hash is kept)");
        }
        Command::Client(ClientCommand::List { .. }) => table(
            &rows(data),
            &[
                ("ID", "id"),
                ("TENANT", "tenant"),
                ("NAME", "name"),
                ("TEAM", "team"),
                ("UID", "uid"),
                ("STATE", "state"),
                ("WORKFLOWS", "workflows"),
                ("CREATED", "created_at"),
            ],
        ),
        Command::Client(ClientCommand::Revoke { id }) => println!("revoked client {id}"),
        Command::Audit(AuditCommand::Query(_)) | Command::Audit(AuditCommand::Lifecycle { .. }) => {
            table(
                &rows(data),
                &[
                    ("SEQ", "seq"),
                    ("TIME", "time"),
                    ("EVENT", "event"),
                    ("CALL_ID", "call_id"),
                    ("TENANT", "tenant"),
                    ("CLIENT", "client_id"),
                    ("TARGET", "target"),
                    ("MODEL", "model"),
                    ("CREDENTIAL", "credential_id"),
                    ("VER", "credential_version"),
                    ("STATUS", "upstream_status"),
                    ("DETAIL", "detail"),
                ],
            )
        }
        Command::Spend { by, .. } => {
            let rows: Vec<Value> = rows(data)
                .into_iter()
                .map(|mut r| {
                    let micros = r["cost_micros"].as_u64().unwrap_or(0);
                    r["cost_usd"] =
                        Value::String(format!("{}.{:06}", micros / 1_000_000, micros % 1_000_000));
                    r
                })
                .collect();
            table(
                &rows,
                &[
                    (by.to_uppercase().as_str(), by.as_str()),
                    ("CALLS", "calls"),
                    ("INPUT", "input_tokens"),
                    ("CACHED", "cached_input_tokens"),
                    ("CACHE_WRITE", "cache_write_tokens"),
                    ("OUTPUT", "output_tokens"),
                    ("COST_USD", "cost_usd"),
                    ("UNPRICED", "unpriced_calls"),
                ],
            )
        }
        Command::Budget(BudgetCommand::Set { .. }) => println!(
            "budget {} on {} {}: {} USD per {} (UTC), on_exceed {}; spent {} USD this period, \
             resets at {}",
            plain(&data["id"]),
            plain(&data["scope"]),
            data["scope_id"]
                .as_str()
                .unwrap_or(data["tenant"].as_str().unwrap_or("-")),
            plain(&data["limit_usd"]),
            plain(&data["period"]),
            plain(&data["on_exceed"]),
            plain(&data["spent_usd"]),
            plain(&data["resets_at"]),
        ),
        Command::Budget(BudgetCommand::List { .. }) => table(
            &rows(data),
            &[
                ("ID", "id"),
                ("TENANT", "tenant"),
                ("SCOPE", "scope"),
                ("SCOPE_ID", "scope_id"),
                ("PERIOD", "period"),
                ("SPENT_USD", "spent_usd"),
                ("LIMIT_USD", "limit_usd"),
                ("ON_EXCEED", "on_exceed"),
                ("ALERTS", "alerts"),
                ("RESETS_AT", "resets_at"),
                ("SOURCE", "source"),
            ],
        ),
        Command::Budget(BudgetCommand::Delete { id }) => println!("deleted budget {id}"),
        Command::Limit(LimitCommand::Set { .. }) => println!(
            "limit {} on {} {}: rpm {} tpm {} (UTC minutes)",
            plain(&data["id"]),
            plain(&data["scope"]),
            data["scope_id"]
                .as_str()
                .unwrap_or(data["tenant"].as_str().unwrap_or("-")),
            plain(&data["rpm"]),
            plain(&data["tpm"]),
        ),
        Command::Limit(LimitCommand::List { .. }) => table(
            &rows(data),
            &[
                ("ID", "id"),
                ("TENANT", "tenant"),
                ("SCOPE", "scope"),
                ("SCOPE_ID", "scope_id"),
                ("RPM", "rpm"),
                ("TPM", "tpm"),
                ("REQUESTS_NOW", "requests_this_minute"),
                ("TOKENS_NOW", "tokens_this_minute"),
            ],
        ),
        Command::Limit(LimitCommand::Delete { id }) => println!("deleted limit {id}"),
        Command::Prices { .. } => table(
            &rows(data),
            &[
                ("TARGET", "target"),
                ("MODEL", "model"),
                ("INPUT", "input"),
                ("CACHED_INPUT", "cached_input"),
                ("CACHE_WRITE", "cache_write"),
                ("OUTPUT", "output"),
                ("AS_OF", "as_of"),
                ("SOURCE", "source"),
            ],
        ),
        Command::Audit(AuditCommand::Verify(_)) => {
            let (ok, text) = verify_outcome(data)?;
            if ok {
                println!("{text}");
            }
        }
    }
    Ok(())
}

/// The master key for work done here rather than by a daemon (`audit verify --jsonl`): the
/// sources `serve` uses, in its order — `--master-key-file`, else `master_key_file` of the
/// config (`--config`, else `$KEYWARD_CONFIG`), `$CREDENTIALS_DIRECTORY/master-key`,
/// `$KEYWARD_MASTER_KEY`, and an existing `<state dir>/master.key`. Never creates one.
pub fn local_master_key(
    config: Option<&std::path::Path>,
    master_key_file: Option<&std::path::Path>,
) -> Result<crate::seal::MasterKeyProvider, String> {
    let config = crate::config::Config::load(config, &process_env).map_err(|e| e.to_string())?;
    let file = master_key_file.or(config.master_key_file.as_deref());
    let generated = config.state_dir.join("master.key");
    let require_external = config.require_external_master_key || !generated.exists();
    match crate::custody::open_provider(
        &config.master_key,
        file,
        &config.state_dir,
        require_external,
    ) {
        Ok(opened) => Ok(opened.provider),
        Err(crate::seal::SealError::MissingMasterKey) => Err(
            "no master key: give --master-key-file FILE, a --config (or $KEYWARD_CONFIG) whose \
             master_key_file or [master_key] names it, $CREDENTIALS_DIRECTORY/master-key or \
             $KEYWARD_MASTER_KEY"
                .into(),
        ),
        Err(e) => Err(e.to_string()),
    }
}

/// `audit verify --jsonl FILE`: checks shipped lines here, with the master key.
fn verify_jsonl(v: &AuditVerify, file: &std::path::Path, json: bool) -> Result<(), Failure> {
    let master = local_master_key(v.config.as_deref(), v.master_key_file.as_deref())
        .map_err(|e| Failure(1, e))?;
    let report = crate::audit::verify_jsonl_file(file, &master, v.instance.as_deref())
        .map_err(|e| Failure(1, format!("cannot read {}: {e}", file.display())))?;
    if let Some(only) = &v.instance
        && report.instances.is_empty()
    {
        return Err(Failure(
            1,
            format!("{} holds no audit lines of instance {only}", file.display()),
        ));
    }
    if report.instances.is_empty() && report.problem.is_none() {
        return Err(Failure(
            1,
            format!(
                "{} holds no audit lines (is it the output of audit_export?)",
                file.display()
            ),
        ));
    }
    let rows: Vec<Value> = report
        .instances
        .iter()
        .map(|i| serde_json::to_value(i).expect("a report serializes"))
        .collect();
    if json {
        for row in &rows {
            println!("{row}");
        }
    } else {
        table(
            &rows,
            &[
                ("INSTANCE", "instance"),
                ("ROWS", "rows_checked"),
                ("FIRST", "first_seq"),
                ("LAST", "last_seq"),
                ("DUPLICATES", "duplicates"),
                ("STOPPED", "stopped"),
                ("PROBLEM", "problem"),
            ],
        );
    }
    if report.ok() {
        if !json {
            let total: u64 = report.instances.iter().map(|i| i.rows_checked).sum();
            println!(
                "audit lines ok: {total} rows of {} instance(s) checked",
                report.instances.len()
            );
        }
        return Ok(());
    }
    let first = report
        .problem
        .clone()
        .or_else(|| {
            report.instances.iter().find_map(|i| {
                i.problem
                    .as_ref()
                    .map(|p| format!("instance {}: {p}", i.instance))
            })
        })
        .unwrap_or_default();
    Err(Failure(
        1,
        format!("audit lines FAILED verification: {first}"),
    ))
}

/// Reads a verify report; a broken chain is a failure (exit 1).
fn verify_outcome(data: &Value) -> Result<(bool, String), Failure> {
    let rows = plain(&data["rows_checked"]);
    if data["ok"].as_bool() == Some(true) {
        Ok((true, format!("audit trail ok: {rows} rows checked")))
    } else {
        Err(Failure(
            1,
            format!(
                "audit trail FAILED verification at seq {}: {} ({rows} rows checked)",
                plain(&data["first_bad_seq"]),
                plain(&data["reason"])
            ),
        ))
    }
}

fn plain(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        Value::Array(items) => {
            if items.is_empty() {
                "-".into()
            } else {
                items.iter().map(plain).collect::<Vec<_>>().join(",")
            }
        }
        other => other.to_string(),
    }
}

fn table(rows: &[Value], columns: &[(&str, &str)]) {
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| columns.iter().map(|(_, key)| plain(&r[*key])).collect())
        .collect();
    let widths: Vec<usize> = columns
        .iter()
        .enumerate()
        .map(|(i, (title, _))| {
            cells
                .iter()
                .map(|row| row[i].chars().count())
                .max()
                .unwrap_or(0)
                .max(title.len())
        })
        .collect();
    let line = |items: Vec<&str>| {
        let mut out = String::new();
        for (i, item) in items.iter().enumerate() {
            if i + 1 == items.len() {
                out.push_str(item);
            } else {
                out.push_str(&format!("{item:<w$}  ", w = widths[i]));
            }
        }
        println!("{}", out.trim_end());
    };
    line(columns.iter().map(|(t, _)| *t).collect());
    for row in &cells {
        line(row.iter().map(String::as_str).collect());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn command_line_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn revoke_takes_a_version() {
        let cli =
            Cli::try_parse_from(["keyward", "cred", "revoke", "cred_x", "--version", "2"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Cred(CredCommand::Revoke {
                version: Some(2),
                ..
            })
        ));
    }
}

//! `keyward serve`: validate the config, harden the process, load the master key, open the
//! store and the audit trail, take or bind the sockets, serve, and drain on SIGTERM.
//!
//! Everything that can fail because of the operator's input fails here, before any socket is
//! bound. `daemon` wires modules together and holds no request logic.

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::audit::{Audit, Event, EventKind};
use crate::catalog::{Catalog, CatalogHandle};
use crate::config::{Config, process_env};
use crate::harden::{MemoryLock, harden};
use crate::proxy::upstream::Upstream;
use crate::seal::MasterKeyProvider;
use crate::state::{Opened, State};
use crate::store::{self, Store, StoreError};

/// Options of `keyward serve`.
#[derive(Debug, Clone, Default)]
pub struct ServeOptions {
    /// `--config FILE`.
    pub config: Option<PathBuf>,
    /// `--master-key-file FILE`.
    pub master_key_file: Option<PathBuf>,
    /// `--dev`: print a ready-to-use client token and a sample request.
    pub dev: bool,
}

/// Why `serve` could not start. Each message names what to fix.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// The master key could not be loaded.
    #[error(transparent)]
    MasterKey(#[from] crate::seal::SealError),
    /// The store could not be opened (including a wrong master key).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The audit trail could not be opened.
    #[error("audit trail: {0}")]
    Audit(#[from] crate::audit::AuditError),
    /// The master key migration (`[master_key.previous]`) stopped.
    #[error(transparent)]
    Migrate(#[from] crate::custody::MigrateError),
    /// A state or socket directory, database or key file another user could have planted.
    #[error(transparent)]
    Untrusted(#[from] crate::ownership::OwnershipError),
    /// The upstream TLS setup failed.
    #[error("upstream TLS setup: {0}")]
    Upstream(String),
    /// A socket could not be bound.
    #[error("cannot listen on {path}: {reason}")]
    Bind {
        /// The socket path or address.
        path: String,
        /// Why.
        reason: String,
    },
    /// Socket activation was malformed.
    #[error("socket activation: {0}")]
    Activation(#[from] crate::systemd::SystemdError),
    /// The configured bundle could not be served.
    #[error("{0}")]
    Bundle(String),
    /// The async runtime could not start.
    #[error("cannot start the runtime: {0}")]
    Runtime(std::io::Error),
    /// The trace exporter for `otlp_endpoint` could not start.
    #[error(transparent)]
    Traces(#[from] crate::traces::TraceError),
}

/// Sockets taken over from systemd or bound by us, still synchronous.
struct Listeners {
    data: std::os::unix::net::UnixListener,
    admin: std::os::unix::net::UnixListener,
    tcp: Option<std::net::TcpListener>,
    /// `metrics_listen`.
    metrics: Option<std::net::TcpListener>,
    activated: bool,
    /// Socket files bound here (not passed by systemd), removed on a clean exit.
    bound: Vec<BoundSocket>,
}

/// A socket file this process created, identified by its inode so that a file another process
/// put at the same path later is never removed.
struct BoundSocket {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl BoundSocket {
    fn new(path: &Path) -> Option<BoundSocket> {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::symlink_metadata(path).ok()?;
        Some(BoundSocket {
            path: path.to_path_buf(),
            dev: meta.dev(),
            ino: meta.ino(),
        })
    }

    /// Removes the file if it is still the socket bound here.
    fn remove(&self) {
        use std::os::unix::fs::MetadataExt;
        let ours = std::fs::symlink_metadata(&self.path)
            .is_ok_and(|m| m.dev() == self.dev && m.ino() == self.ino);
        if ours && let Err(e) = std::fs::remove_file(&self.path) {
            tracing::warn!(
                path = %self.path.display(),
                error = %e,
                "cannot remove the socket file",
            );
        }
    }
}

/// Runs the daemon until SIGTERM/SIGINT. Returns after a drain.
pub fn serve(options: ServeOptions) -> Result<(), ServeError> {
    let mut config = Config::load(options.config.as_deref(), &process_env)?;
    if options.master_key_file.is_some() {
        config.master_key_file = options.master_key_file.clone();
    }
    check_socket_group(&config)?;
    crate::logging::init();
    // Before any secret is read: no core dumps, no ptrace by same-uid processes, locked memory.
    let hardening = harden(config.lock_memory);
    let memory_lock = match &hardening.memory {
        MemoryLock::All => "all (mlockall)".to_string(),
        MemoryLock::SecretsOnly => "secret pages".to_string(),
        MemoryLock::FellBackToSecrets(why) => {
            eprintln!(
                "warning: lock_memory = \"all\" is not available: {why}; locking secret pages only"
            );
            "secret pages (fallback)".to_string()
        }
    };
    open_state_dir(&config.state_dir)?;
    if options.master_key_file.is_some()
        && !matches!(
            config.master_key,
            crate::config::MasterKeyConfig::File { .. }
        )
    {
        return Err(crate::config::ConfigError::Value {
            origin: config
                .source
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            key: "master_key.provider".into(),
            reason: format!(
                "--master-key-file names a key file, but the master key is held by provider \
                 \"{}\": drop the flag",
                config.master_key.provider()
            ),
        }
        .into());
    }
    let opened = crate::custody::open_provider(
        &config.master_key,
        config.master_key_file.as_deref(),
        &config.state_dir,
        config.require_external_master_key,
    )?;
    if let Some(path) = &opened.generated {
        eprintln!(
            "\n*** WARNING: generated a new master key at {} ***\n\
             Anyone who can read this file and the database can decrypt every stored key.\n\
             For production, keep the master key outside the state directory (master_key_file,\n\
             systemd LoadCredential=master-key:..., $KEYWARD_MASTER_KEY, or an HSM or KMS\n\
             through [master_key]) and set require_external_master_key = true.\n",
            path.display()
        );
    }
    let migration = match &config.previous_master_key {
        None => None,
        Some(previous) => {
            // The previous key is only read, never generated.
            let previous = crate::custody::open_provider(previous, None, &config.state_dir, true)?;
            Some(crate::custody::migrate(
                &config.state_dir,
                &previous.provider,
                &opened.provider,
            )?)
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.worker_threads)
        .enable_all()
        .thread_name("keyward")
        .build()
        .map_err(ServeError::Runtime)?;
    let server = Server::open(
        config,
        opened.provider,
        memory_lock,
        runtime.handle().clone(),
    )?;
    crate::custody::record_migration(server.state())?;
    if let Some(flag) = options.master_key_file {
        let _ = server.state().master_key_flag.set(flag);
    }
    print_banner(server.state(), &hardening, &server.listeners);
    if let Some(line) = &migration {
        println!("  migration     {line}");
    }
    if options.dev {
        runtime.block_on(dev_mode(server.state()));
    }
    // The handlers are installed now, before READY=1: a SIGTERM sent the moment the manager
    // hears READY must drain, not hit the default action and kill the process.
    let shutdown = {
        let _context = runtime.enter();
        shutdown_signal()
    };
    runtime.block_on(server.run(shutdown))
}

/// A daemon with its store, audit trail, upstream clients and sockets open, ready to serve.
/// `serve` builds one after hardening the process; the offline demo builds one in-process.
pub struct Server {
    /// Shared state for the data plane and the admin socket.
    state: Arc<State>,
    /// Sockets taken from systemd or bound here.
    listeners: Listeners,
}

impl Server {
    /// Opens the store (checking `master` against it), the audit trail and the upstream
    /// clients, then takes or binds the sockets. Must be called with `runtime` available.
    pub fn open(
        config: Config,
        master: MasterKeyProvider,
        memory_lock: String,
        runtime: tokio::runtime::Handle,
    ) -> Result<Server, ServeError> {
        let store = Store::open(&config.state_dir, &master)?;
        let instance =
            crate::audit::instance_id(&config.state_dir).map_err(|source| StoreError::Io {
                path: config
                    .state_dir
                    .join(crate::audit::INSTANCE_FILE)
                    .display()
                    .to_string(),
                source,
            })?;
        let export = config
            .audit_export
            .clone()
            .map(|sink| crate::audit::ExportOptions {
                sink,
                buffer: config.audit_export_buffer,
                instance: instance.clone(),
                master_key: crate::audit::master_identity(&master),
            });
        let audit = Audit::open_exporting(
            &config.state_dir,
            &master,
            config.audit_sync,
            config.audit_retention,
            export,
        )?;
        let (bundle, snapshot) = match &config.bundle {
            Some(path) => {
                let (source, snapshot) = crate::bundle::BundleSource::open(
                    path,
                    &config.state_dir,
                    config.bundle_watch,
                    config.bundle_poll_interval,
                    &master,
                )
                .map_err(ServeError::Bundle)?;
                (Some(source), snapshot)
            }
            None => (None, store.snapshot()?),
        };
        let listeners = take_or_bind(&config)?;
        let max_connections = fit_connections(config.limits.max_connections);
        let catalog = CatalogHandle::new(Catalog::build(snapshot));
        let upstream = {
            let _guard = runtime.enter();
            Upstream::new(&config.targets, &config.limits)
                .map_err(|e| ServeError::Upstream(e.to_string()))?
        };
        let governance = Arc::new(
            crate::governance::Governance::new(&config.governance, audit.clone()).map_err(|e| {
                crate::config::ConfigError::Value {
                    origin: config
                        .source
                        .as_ref()
                        .map_or_else(|| "(defaults)".into(), |p| p.display().to_string()),
                    key: "governance.redis_url".into(),
                    reason: e,
                }
            })?,
        );
        let state = Arc::new(State::new(
            config,
            Opened {
                master,
                memory_lock,
                store,
                audit,
                instance,
                bundle,
                catalog,
                upstream,
                governance,
                max_connections,
                runtime,
            },
        ));
        state.reload_rules()?;
        let endpoint = state.config.load().otlp_endpoint.clone();
        state
            .traces
            .configure(endpoint.as_deref(), &state.instance)?;
        Ok(Server { state, listeners })
    }

    /// The shared state (for in-process callers such as the demo).
    pub fn state(&self) -> &Arc<State> {
        &self.state
    }

    /// Serves until `shutdown` resolves, then drains in-flight requests (bounded by
    /// `limits.shutdown_grace`) and flushes the audit trail.
    pub async fn run(
        self,
        shutdown: impl std::future::Future<Output = &'static str>,
    ) -> Result<(), ServeError> {
        run(self.state, self.listeners, shutdown).await
    }
}

/// Raises the soft descriptor limit to the hard one, then lowers `max_connections` to what
/// fits in it (see [`crate::proxy::conn::connections_that_fit`]) with a warning, so that app
/// connections can never take the descriptors the admin socket and the audit trail need.
fn fit_connections(configured: usize) -> usize {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return configured;
    };
    let soft = if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        hard
    } else {
        soft
    };
    let fits = crate::proxy::conn::connections_that_fit(soft);
    if fits < configured {
        tracing::warn!(
            configured,
            lowered_to = fits,
            nofile = soft,
            "limits.max_connections does not fit the file-descriptor limit (RLIMIT_NOFILE); \
             raise it (systemd LimitNOFILE=, ulimit -n) to allow more connections"
        );
        eprintln!(
            "warning: limits.max_connections lowered from {configured} to {fits}: the \
             file-descriptor limit is {soft} (raise it with LimitNOFILE= or ulimit -n)"
        );
        return fits;
    }
    configured
}

fn check_socket_group(config: &Config) -> Result<(), ServeError> {
    if let Some(group) = &config.socket_group {
        match nix::unistd::Group::from_name(group) {
            Ok(Some(_)) => {}
            _ => {
                return Err(crate::config::ConfigError::Value {
                    origin: config
                        .source
                        .as_ref()
                        .map(|p| p.display().to_string())
                        .unwrap_or_default(),
                    key: "socket_group".into(),
                    reason: format!(
                        "group `{group}` does not exist (create it with groupadd, or remove \
                         the key)"
                    ),
                }
                .into());
            }
        }
    }
    Ok(())
}

/// Creates the state directory (0700) if it is missing, then refuses it, or anything in it,
/// when another user could have planted or could replace it (README "Deployment checklist").
/// Never changes the mode or owner of a directory that already exists.
fn open_state_dir(dir: &Path) -> Result<(), ServeError> {
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| StoreError::Io {
                path: dir.display().to_string(),
                source: e,
            })?;
    }
    crate::ownership::check_private_dir("state directory", dir)?;
    crate::ownership::check_state_entries(dir)?;
    Ok(())
}

fn take_or_bind(config: &Config) -> Result<Listeners, ServeError> {
    let activated = crate::systemd::listen_fds()?;
    let tcp = match config.listen_tcp {
        None => None,
        Some(addr) => Some(
            std::net::TcpListener::bind(addr)
                .and_then(|l| l.set_nonblocking(true).map(|_| l))
                .map_err(|e| ServeError::Bind {
                    path: addr.to_string(),
                    reason: e.to_string(),
                })?,
        ),
    };
    let metrics = match config.metrics_listen {
        None => None,
        Some(addr) => Some(
            std::net::TcpListener::bind(addr)
                .and_then(|l| l.set_nonblocking(true).map(|_| l))
                .map_err(|e| ServeError::Bind {
                    path: format!("metrics_listen {addr}"),
                    reason: e.to_string(),
                })?,
        ),
    };
    let was_activated = !activated.is_empty();
    let mut bound = Vec::new();
    let data = match activated.data {
        Some(l) => l,
        None => {
            let l = bind_unix(&config.socket, 0o660, config.socket_group.as_deref())?;
            bound.extend(BoundSocket::new(&config.socket));
            l
        }
    };
    let admin = match activated.admin {
        Some(l) => l,
        None => {
            let l = bind_unix(&config.admin_socket, 0o600, None)?;
            bound.extend(BoundSocket::new(&config.admin_socket));
            l
        }
    };
    Ok(Listeners {
        data,
        admin,
        tcp,
        metrics,
        activated: was_activated,
        bound,
    })
}

/// Binds a Unix socket with `mode` from the first instant (umask), replacing a stale socket
/// file but refusing to steal one a live daemon is serving.
fn bind_unix(
    path: &Path,
    mode: u32,
    group: Option<&str>,
) -> Result<std::os::unix::net::UnixListener, ServeError> {
    let bind_err = |reason: String| ServeError::Bind {
        path: path.display().to_string(),
        reason,
    };
    if let Some(parent) = path.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(parent)
            .map_err(|e| bind_err(format!("cannot create {}: {e}", parent.display())))?;
        crate::ownership::check_private_dir("socket directory", parent)?;
    }
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        if !meta.file_type().is_socket() {
            return Err(bind_err(
                "something that is not a socket is already there; remove it or choose another \
                 path"
                    .into(),
            ));
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(bind_err(
                "another process is serving on it (is keyward already running?)".into(),
            ));
        }
        std::fs::remove_file(path)
            .map_err(|e| bind_err(format!("cannot remove the stale socket file: {e}")))?;
    }
    let mask = nix::sys::stat::Mode::from_bits_truncate(0o777 & !mode);
    let previous = nix::sys::stat::umask(mask);
    let bound = std::os::unix::net::UnixListener::bind(path);
    nix::sys::stat::umask(previous);
    let listener = bound.map_err(|e| bind_err(e.to_string()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| bind_err(e.to_string()))?;
    if let Some(group) = group
        && let Ok(Some(g)) = nix::unistd::Group::from_name(group)
    {
        nix::unistd::chown(path, None, Some(g.gid))
            .map_err(|e| bind_err(format!("chown to group {group}: {e}")))?;
    }
    listener
        .set_nonblocking(true)
        .map_err(|e| bind_err(e.to_string()))?;
    Ok(listener)
}

fn print_banner(state: &State, hardening: &crate::harden::Hardening, listeners: &Listeners) {
    let c = state.config.load();
    // With `audit_export = "stdout"`, standard output carries only audit lines.
    let to_stderr = c.audit_export == Some(crate::config::AuditExport::Stdout);
    macro_rules! println {
        ($($arg:tt)*) => {
            if to_stderr { eprintln!($($arg)*) } else { std::println!($($arg)*) }
        };
    }
    let how = if listeners.activated {
        " (socket-activated)"
    } else {
        ""
    };
    // Socket-activated listeners may live elsewhere than the config says: print where they are.
    let path_of = |l: &std::os::unix::net::UnixListener, fallback: &Path| {
        l.local_addr()
            .ok()
            .and_then(|a| a.as_pathname().map(Path::to_path_buf))
            .unwrap_or_else(|| fallback.to_path_buf())
    };
    println!("keyward {} serving{how}", env!("CARGO_PKG_VERSION"));
    println!(
        "  config        {}",
        c.source
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or("(none: embedded defaults)".into())
    );
    println!("  state dir     {}", c.state_dir.display());
    println!("  database      {}", state.store.path().display());
    println!("  audit         {}", c.state_dir.join("audit.db").display());
    println!(
        "  data socket   {} (0660)",
        path_of(&listeners.data, &c.socket).display()
    );
    println!(
        "  admin socket  {} (0600)",
        path_of(&listeners.admin, &c.admin_socket).display()
    );
    if let Some(addr) = c.listen_tcp {
        println!("  tcp           {addr} (client tokens only)");
    }
    println!(
        "  master key    {} ({})",
        state.master.identity(),
        state.master.provider()
    );
    println!("  instance      {}", state.instance);
    if let Some(export) = &c.audit_export {
        println!("  audit export  {export}");
    }
    if let Some(addr) = c.metrics_listen {
        if addr.ip().is_loopback() {
            println!("  metrics       http://{addr}/metrics, /healthz, /readyz");
        } else {
            println!(
                "  metrics       http://{addr}/metrics, /healthz, /readyz (NOT loopback: anyone \
                 who can reach this address can read them)"
            );
        }
    }
    println!(
        "  hardening     core dumps {}, memory locked: {}",
        if hardening.not_dumpable && hardening.no_core {
            "off"
        } else {
            "NOT fully off"
        },
        state.memory_lock
    );
}

/// `--dev`: a tenant `dev` and a fresh client, with its token and a sample request printed.
async fn dev_mode(state: &Arc<State>) {
    let st = state.clone();
    let made = tokio::task::spawn_blocking(move || crate::admin::dev_client(&st)).await;
    match made {
        Ok(Ok(token)) => {
            println!("\ndev mode: a client of tenant `dev` (token shown once):\n  {token}");
            println!(
                "add a provider key for it:\n  printf %s \"$OPENAI_API_KEY\" | keyward cred add \
                 --tenant dev --target openai --name dev"
            );
            println!(
                "then call through keyward:\n  curl --unix-socket {} \
                 http://keyward/openai/v1/chat/completions \\\n    -H 'Authorization: Bearer \
                 {token}' -H 'content-type: application/json' \\\n    -d \
                 '{{\"model\":\"gpt-4o-mini\",\"messages\":[{{\"role\":\"user\",\
                 \"content\":\"hello\"}}]}}'\n",
                state.config.load().socket.display()
            );
        }
        Ok(Err(e)) => eprintln!("dev mode: could not create a client: {e}"),
        Err(e) => eprintln!("dev mode: {e}"),
    }
}

async fn run(
    state: Arc<State>,
    listeners: Listeners,
    shutdown: impl std::future::Future<Output = &'static str>,
) -> Result<(), ServeError> {
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let wait_stop = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let admin =
        tokio::net::UnixListener::from_std(listeners.admin).map_err(|e| ServeError::Bind {
            path: "admin socket".into(),
            reason: e.to_string(),
        })?;
    let data =
        tokio::net::UnixListener::from_std(listeners.data).map_err(|e| ServeError::Bind {
            path: "data socket".into(),
            reason: e.to_string(),
        })?;
    let admin_task = tokio::spawn(crate::admin::serve(
        admin,
        state.clone(),
        wait_stop(stop_rx.clone()),
    ));
    let data_task = tokio::spawn(crate::proxy::server::serve(
        data,
        state.clone(),
        stop_rx.clone(),
    ));
    let tcp_task = match listeners.tcp {
        Some(l) => {
            let l = tokio::net::TcpListener::from_std(l).map_err(|e| ServeError::Bind {
                path: "tcp".into(),
                reason: e.to_string(),
            })?;
            Some(tokio::spawn(crate::proxy::server::serve(
                l,
                state.clone(),
                stop_rx.clone(),
            )))
        }
        None => None,
    };
    let metrics_task = match listeners.metrics {
        Some(l) => {
            let l = tokio::net::TcpListener::from_std(l).map_err(|e| ServeError::Bind {
                path: "metrics_listen".into(),
                reason: e.to_string(),
            })?;
            Some(tokio::spawn(crate::metrics::serve(
                l,
                state.clone(),
                stop_rx.clone(),
            )))
        }
        None => None,
    };
    let retire_task = tokio::spawn(retire_loop(state.clone(), stop_rx.clone()));
    let governance_task = tokio::spawn(maintain_governance(state.clone(), stop_rx.clone()));
    if let Err(e) = crate::bundle::watch(&state) {
        tracing::error!(error = %e, "cannot watch the bundle; new bundles need a restart");
    }
    // SIGHUP would end the process by default; from here on it reloads the config.
    let hangup =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).map_err(|e| {
            ServeError::Bind {
                path: "SIGHUP handler".into(),
                reason: e.to_string(),
            }
        })?;
    let hangup_task = tokio::spawn(reload_on_hangup(state.clone(), hangup, stop_rx.clone()));
    notify("READY=1");

    let signal = shutdown.await;
    tracing::info!(
        signal,
        "shutting down: no new connections, draining in-flight requests"
    );
    notify("STOPPING=1");
    let _ = stop_tx.send(true);
    // No longer accepting: a socket file left behind would tell a health check (or the next
    // start) that someone serves there. Sockets systemd passed in are its to keep.
    for socket in &listeners.bound {
        socket.remove();
    }
    let grace = state.config.load().limits.shutdown_grace;
    let drained = tokio::time::timeout(grace, async {
        let _ = data_task.await;
        if let Some(t) = tcp_task {
            let _ = t.await;
        }
    })
    .await;
    match drained {
        Ok(()) => tracing::info!("drained: every in-flight request finished"),
        Err(_) => tracing::warn!(
            in_flight = state.in_flight(),
            ?grace,
            "grace period over: exiting with requests in flight"
        ),
    }
    let _ = admin_task.await;
    let _ = retire_task.await;
    let _ = governance_task.await;
    let _ = hangup_task.await;
    if let Some(t) = metrics_task {
        let _ = t.await;
    }
    state.audit.flush().await;
    let st = state.clone();
    let flushed = tokio::task::spawn_blocking(move || st.traces.shutdown(Duration::from_secs(5)))
        .await
        .unwrap_or(false);
    if !flushed {
        tracing::warn!("spans still waiting for the OTLP collector at exit were not sent");
    }
    if !state.audit.stop_export(Duration::from_secs(5)).await {
        tracing::warn!(
            "audit lines still waiting for the export sink at exit; the next start over this \
             state directory writes them again"
        );
    }
    Ok(())
}

/// Tells the service manager our state; a failure is logged, never fatal.
fn notify(state: &str) {
    if let Err(e) = crate::systemd::notify(state) {
        tracing::warn!(error = %e, state, "sd_notify failed");
    }
}

/// Installs the SIGTERM and SIGINT handlers at once (call it inside the runtime's context) and
/// returns a future that resolves on either, naming which.
pub fn shutdown_signal() -> impl std::future::Future<Output = &'static str> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    async move {
        tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        }
    }
}

/// Reloads the config on every SIGHUP and logs what changed or why nothing did.
async fn reload_on_hangup(
    state: Arc<State>,
    mut hangup: tokio::signal::unix::Signal,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = crate::proxy::server::stopped(&mut stop) => return,
            got = hangup.recv() => if got.is_none() { return },
        }
        let st = state.clone();
        match tokio::task::spawn_blocking(move || st.reload()).await {
            Ok(Ok(done)) => tracing::info!(
                file = %done.file,
                changed = ?done.changed,
                restart_needed = ?done.restart_needed,
                "SIGHUP: config reloaded"
            ),
            Ok(Err(e)) => {
                tracing::error!(error = %e, "SIGHUP: config not reloaded, nothing changed")
            }
            Err(e) => tracing::error!(error = %e, "SIGHUP: reload failed"),
        }
    }
}

/// Keeps the Redis connection of the governance counters up and retries charges it missed.
async fn maintain_governance(state: Arc<State>, mut stop: tokio::sync::watch::Receiver<bool>) {
    loop {
        state.governance.maintain().await;
        tokio::select! {
            _ = crate::proxy::server::stopped(&mut stop) => return,
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
        }
    }
}

/// Retires versions whose rotation overlap has ended, on time even without traffic.
async fn retire_loop(state: Arc<State>, mut stop: tokio::sync::watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = crate::proxy::server::stopped(&mut stop) => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        announce_expiring(&state);
        let now = crate::units::now_unix();
        // The catalog mirrors the store, so the database is touched only when a version is due.
        // A bundle's versions retire by their overlap time alone (read-only: nothing to mark).
        if state.bundle.is_some() || !retirement_due(&state.catalog.load(), now) {
            continue;
        }
        let st = state.clone();
        let result = tokio::task::spawn_blocking(move || retire_due(&st, now)).await;
        if let Ok(Err(e)) = result {
            tracing::warn!(
                error = %e,
                "retiring overlapped credential versions failed; will retry",
            );
        }
    }
}

/// Whether any version's overlap has ended without it being marked retired yet (the same
/// rule as `store::retire_due`).
fn retirement_due(catalog: &Catalog, now: i64) -> bool {
    catalog.credentials_by_tenant.values().flatten().any(|c| {
        c.versions.iter().any(|v| {
            v.retired_at.is_none()
                && v.revoked_at.is_none()
                && v.overlap_until.is_some_and(|until| until <= now)
        })
    })
}

/// Logs, once per version, that a key passes its tenant's max key age within a week.
fn announce_expiring(state: &State) {
    let now = crate::units::now_unix();
    for e in state
        .expiry_watch
        .newly_expiring(&state.catalog.load(), now)
    {
        tracing::warn!(
            tenant = %e.tenant,
            credential = %e.credential,
            name = %e.name,
            version = e.version,
            expires_at = %crate::units::format_time(e.expires_at),
            on_expiry = %e.policy,
            "credential version passes the tenant's max key age within a week; rotate it with \
             `keyward cred rotate`"
        );
    }
}

fn retire_due(state: &State, now: i64) -> Result<(), StoreError> {
    let retired = state.store.write(|tx| {
        let retired = store::retire_due(tx, now)?;
        for (cred_id, version) in &retired {
            let cred = store::credential(tx, cred_id)?;
            let tenant = state
                .catalog
                .load()
                .tenant(&cred.tenant_id)
                .map(|t| t.name.clone());
            state
                .runtime
                .block_on(state.audit.commit(Event {
                    tenant,
                    target: Some(cred.target.clone()),
                    credential_id: Some(cred_id.clone()),
                    credential_version: Some(*version),
                    detail: Some("rotation overlap ended".into()),
                    ..Event::new(EventKind::CredentialRetired)
                }))
                .map_err(|e| StoreError::Conflict(format!("audit unavailable: {e}")))?;
        }
        Ok(retired)
    })?;
    if !retired.is_empty() {
        state.reload_catalog()?;
    }
    Ok(())
}

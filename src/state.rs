//! The state a running keyward shares between its data plane, admin socket and metrics
//! endpoint: the configuration snapshot, store, catalog, audit trail, upstream clients, limits
//! and caches, and the config reload that swaps what can change while serving.
//!
//! `daemon` opens the parts (store, audit trail, master key, sockets) and builds a [`State`]
//! from them; `proxy`, `admin` and `metrics` receive it. This module binds no socket and holds
//! no request logic.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use arc_swap::ArcSwap;

use crate::audit::Audit;
use crate::bundle::BundleSource;
use crate::catalog::{Catalog, CatalogHandle};
use crate::config::{Config, process_env};
use crate::proxy::upstream::Upstream;
use crate::seal::MasterKeyProvider;
use crate::store::{self, Store, StoreError};

/// Everything a running daemon shares between its data plane and admin socket.
pub struct State {
    /// The validated configuration; `reload` swaps it whole (README, "Reload"). A request
    /// takes one snapshot (`config.load_full()`) and keeps it to its end.
    pub config: ArcSwap<Config>,
    /// `--master-key-file` given to `serve`, which overrides the file's `master_key_file`.
    pub master_key_flag: std::sync::OnceLock<PathBuf>,
    /// One reload at a time.
    reloading: std::sync::Mutex<()>,
    /// The permits `limiter` was sized for (`limits.max_concurrent_requests`).
    limit_total: std::sync::Mutex<usize>,
    /// The master key's provider (in locked memory, or an HSM or KMS holding it).
    pub master: MasterKeyProvider,
    /// What memory locking achieved (printed by `status`).
    pub memory_lock: String,
    /// The credential store.
    pub store: Store,
    /// The in-memory catalog the data plane reads.
    pub catalog: CatalogHandle,
    /// The audit trail.
    pub audit: Audit,
    /// The sealed bundle served read-only, when `bundle` is set; the catalog then comes from
    /// it rather than from the store.
    pub bundle: Option<crate::bundle::BundleSource>,
    /// This keyward's instance id (`<state_dir>/instance.id`; in shipped audit lines and
    /// bundles).
    pub instance: String,
    /// Pooled upstream TLS clients, rebuilt by a reload that changes targets or their limits;
    /// a request keeps the one it started with.
    pub upstream: ArcSwap<Upstream>,
    /// Start time.
    pub started: Instant,
    /// Start time on the wall clock (`keyward_start_time_seconds`).
    pub started_at: std::time::SystemTime,
    /// The per-request metric families (README, "Metrics and health").
    pub metrics: crate::metrics::Metrics,
    /// Spans for `otlp_endpoint` (README, "Traces"); off when it is unset.
    pub traces: crate::traces::Tracing,
    /// The runtime, for blocking admin work that must await the audit writer.
    pub runtime: tokio::runtime::Handle,
    /// Data-plane requests being served now.
    in_flight: AtomicUsize,
    /// Permits for `limits.max_concurrent_requests`; a request without one gets 503.
    pub limiter: Arc<tokio::sync::Semaphore>,
    /// Open data connections against `limits.max_connections` (as fitted to the descriptor
    /// limit) and `limits.max_connections_per_uid`.
    pub connections: Arc<crate::proxy::conn::ConnectionLimits>,
    /// Request-body bytes held in memory, against `limits.max_buffered_bodies`.
    pub bodies: Arc<crate::proxy::limits::BodyBudget>,
    /// Requests in flight per client and per tenant, against their shares of the limiter.
    pub shares: Arc<crate::proxy::limits::RequestShares>,
    /// Unwrapped tenant and fingerprint keys, in locked memory.
    pub tenant_keys: crate::seal::TenantKeyCache,
    /// Access tokens derived from `gcp-service-account` and `azure-entra` credentials, in
    /// locked memory, refreshed single-flight shortly before they expire.
    pub tokens: crate::proxy::token::TokenSource,
    /// Round-robin counter for pools of equal priority.
    pub rotation: AtomicUsize,
    /// Cooldowns and quarantines of credential versions (process lifetime).
    pub pool: crate::pool::Pool,
    /// Versions already announced as expiring within a week.
    pub expiry_watch: crate::pool::ExpiryWatch,
    /// Budgets, rate limits and their counters (README, "Spend and limits").
    pub governance: Arc<crate::governance::Governance>,
    /// Session credentials of assumed AWS roles (README, "Bedrock").
    pub aws_sessions: crate::proxy::aws_session::AwsSessions,
}

/// What `daemon` opened for a [`State`]; the limiters and caches are built from the config.
pub struct Opened {
    /// The master key's provider, already checked against the store.
    pub master: MasterKeyProvider,
    /// What memory locking achieved (printed by `status`).
    pub memory_lock: String,
    /// The credential store.
    pub store: Store,
    /// The audit trail.
    pub audit: Audit,
    /// This keyward's instance id.
    pub instance: String,
    /// The sealed bundle served read-only, when `bundle` is set.
    pub bundle: Option<BundleSource>,
    /// The catalog built from the store or the bundle.
    pub catalog: CatalogHandle,
    /// The upstream TLS clients for the config's targets.
    pub upstream: Upstream,
    /// Budgets and rate limits, connected to the audit trail (and Redis, when set).
    pub governance: Arc<crate::governance::Governance>,
    /// `limits.max_connections`, as fitted to the file-descriptor limit.
    pub max_connections: usize,
    /// The runtime the daemon serves on.
    pub runtime: tokio::runtime::Handle,
}

impl State {
    /// Builds the shared state from what was opened, with the request limiter, connection
    /// caps, body budget, request shares and key pool sized by `config`.
    pub fn new(config: Config, opened: Opened) -> State {
        let limits = &config.limits;
        State {
            governance: opened.governance,
            master_key_flag: Default::default(),
            reloading: Default::default(),
            limit_total: std::sync::Mutex::new(limits.max_concurrent_requests),
            memory_lock: opened.memory_lock,
            master: opened.master,
            store: opened.store,
            catalog: opened.catalog,
            audit: opened.audit,
            instance: opened.instance,
            bundle: opened.bundle,
            upstream: ArcSwap::from_pointee(opened.upstream),
            started: Instant::now(),
            started_at: std::time::SystemTime::now(),
            metrics: crate::metrics::Metrics::new(),
            traces: Default::default(),
            runtime: opened.runtime,
            in_flight: AtomicUsize::new(0),
            limiter: Arc::new(tokio::sync::Semaphore::new(limits.max_concurrent_requests)),
            connections: crate::proxy::conn::ConnectionLimits::new(
                opened.max_connections,
                limits.max_connections_per_uid,
            ),
            bodies: crate::proxy::limits::BodyBudget::new(limits.max_buffered_bodies),
            shares: crate::proxy::limits::RequestShares::new(
                limits.max_requests_per_client,
                limits.max_requests_per_tenant,
            ),
            rotation: AtomicUsize::new(0),
            tenant_keys: Default::default(),
            tokens: Default::default(),
            pool: crate::pool::Pool::new(&config.pool),
            expiry_watch: crate::pool::ExpiryWatch::default(),
            aws_sessions: Default::default(),
            config: ArcSwap::from_pointee(config),
        }
    }
    /// A tenant's unwrapped tenant and fingerprint keys, asking the master key's provider only
    /// the first time in this process. Blocks on a miss: call it from a blocking thread.
    pub fn tenant_keys_of(
        &self,
        tenant: &crate::store::TenantRow,
    ) -> Result<Arc<crate::seal::TenantKeys>, crate::seal::SealError> {
        self.tenant_keys.get(
            &self.master,
            &tenant.id,
            &tenant.wrapped_key,
            &tenant.wrapped_fp_key,
        )
    }

    /// Rebuilds the catalog from the store after a change.
    pub fn reload_catalog(&self) -> Result<(), StoreError> {
        if self.bundle.is_some() {
            // The bundle's watcher owns the catalog; the store holds none of it.
            return Ok(());
        }
        self.catalog.replace(Catalog::build(self.store.snapshot()?));
        self.forget_derived();
        Ok(())
    }

    /// Drops the access tokens and AWS sessions of credential versions that can no longer
    /// serve (deleted, revoked, retired by rotation), so none of them is used again and none
    /// stays in memory. Called whenever the catalog is replaced.
    pub fn forget_derived(&self) {
        let serving = self
            .catalog
            .load()
            .serving_versions(crate::units::now_unix());
        self.tokens
            .retain(|(id, version)| serving.contains(&(id.clone(), *version)));
        self.aws_sessions
            .retain(|id, version| serving.contains(&(id.to_string(), version)));
    }

    /// Gives the governance engine the budgets and limits in the store, and starts the counter
    /// of each budget's current period at what the audit trail says was spent in it so far
    /// (this keyward's own calls; with Redis, the shared counter already holds the fleet's).
    /// Blocking (SQLite).
    pub fn reload_rules(&self) -> Result<(), StoreError> {
        use crate::governance::Scope;
        let (budgets, limits) = self
            .store
            .write(|tx| Ok((store::budgets(tx)?, store::rate_limits(tx)?)))?;
        let now = crate::units::now_unix_ms();
        for b in &budgets {
            let by = match b.scope {
                Scope::Tenant => crate::audit::SpendBy::Tenant,
                Scope::Team(_) => crate::audit::SpendBy::Team,
                Scope::Client(_) => crate::audit::SpendBy::Client,
                Scope::Credential(_) => crate::audit::SpendBy::Credential,
            };
            let query = crate::audit::SpendQuery {
                tenant: Some(b.tenant.clone()),
                by,
                since_ms: Some(b.period.bounds(now).0),
                until_ms: None,
            };
            let want = match &b.scope {
                Scope::Tenant => b.tenant.as_str(),
                other => other.value(),
            };
            match self.audit.spend(&query) {
                Ok(rows) => {
                    let spent = rows
                        .iter()
                        .find(|r| r.key == want)
                        .map_or(0, |r| r.cost_micros);
                    self.governance.seed(b, spent);
                }
                Err(e) => tracing::warn!(
                    budget = %b.id,
                    error = %e,
                    "cannot read this period's spend from the audit trail; the budget counts \
                     from now"
                ),
            }
        }
        self.governance.set_rules(budgets, limits);
        Ok(())
    }

    /// Requests being served now.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Counts a request in flight until the guard drops.
    pub fn track_request(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }
}

impl crate::bundle::BundleHost for State {
    fn bundle(&self) -> Option<&crate::bundle::BundleSource> {
        self.bundle.as_ref()
    }
    fn master(&self) -> &MasterKeyProvider {
        &self.master
    }
    fn catalog(&self) -> &CatalogHandle {
        &self.catalog
    }
    fn catalog_replaced(&self) {
        self.forget_derived();
    }
}

/// What a reload did (README, "Reload").
#[derive(Debug, Clone, serde::Serialize)]
pub struct Reloaded {
    /// The file read, or `(defaults)`.
    pub file: String,
    /// Reloadable sections whose value changed and now apply (`targets`, `limits`, `pool`, …).
    pub changed: Vec<String>,
    /// Keys that changed in the file but need a restart; their running values stay.
    pub restart_needed: Vec<String>,
}

/// Why a reload changed nothing.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReloadError {
    /// The file is invalid: names the file, the key and the reason.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// The new targets' upstream TLS setup failed (an unreadable `ca_file`, …).
    #[error("upstream TLS setup: {0}")]
    Upstream(String),
    /// The trace exporter for a new `otlp_endpoint` could not start.
    #[error(transparent)]
    Traces(#[from] crate::traces::TraceError),
}

impl State {
    /// Re-reads the config file and applies what can change while serving: `targets`,
    /// `limits`, `pool`, and every other key not listed in [`RESTART_KEYS`]. An invalid file
    /// changes nothing. Requests in flight keep the configuration and upstream clients they
    /// started with; new requests get the new ones. Blocking (reads files): call it off the
    /// async workers.
    pub fn reload(&self) -> Result<Reloaded, ReloadError> {
        let _one = crate::lock(&self.reloading);
        let old = self.config.load_full();
        let mut new = Config::load(old.source.as_deref(), &process_env)?;
        if let Some(flag) = self.master_key_flag.get() {
            new.master_key_file = Some(flag.clone());
        }
        let differs =
            |a: &dyn std::fmt::Debug, b: &dyn std::fmt::Debug| format!("{a:?}") != format!("{b:?}");
        let mut restart_needed = Vec::new();
        // Keys bound to what was set up at start: report them, keep the running values.
        macro_rules! keep {
            ($($field:ident),* $(,)?) => {$(
                if differs(&old.$field, &new.$field) {
                    restart_needed.push(stringify!($field).to_string());
                }
                new.$field = old.$field.clone();
            )*};
        }
        keep!(
            state_dir,
            socket,
            socket_group,
            admin_socket,
            master_key_file,
            require_external_master_key,
            master_key,
            previous_master_key,
            listen_tcp,
            metrics_listen,
            lock_memory,
            audit_sync,
            audit_retention,
            audit_export,
            audit_export_buffer,
            worker_threads,
            bundle,
            bundle_watch,
            bundle_poll_interval,
        );
        let mut changed = Vec::new();
        for (name, a, b) in [
            (
                "targets",
                &old.targets as &dyn std::fmt::Debug,
                &new.targets as &dyn std::fmt::Debug,
            ),
            ("limits", &old.limits, &new.limits),
            ("pool", &old.pool, &new.pool),
            ("prices", &old.prices, &new.prices),
            ("governance", &old.governance, &new.governance),
            ("otlp_endpoint", &old.otlp_endpoint, &new.otlp_endpoint),
        ] {
            if differs(a, b) {
                changed.push(name.to_string());
            }
        }
        // Any other key (added later) is reloadable: report it by comparing the rest.
        if changed.is_empty() && differs(&*old, &new) {
            changed.push("other settings".to_string());
        }
        let upstream_settings = |c: &Config| {
            format!(
                "{:?} {:?} {:?} {:?}",
                c.targets,
                c.limits.upstream_timeout,
                c.limits.stream_idle_timeout,
                c.limits.max_header_bytes
            )
        };
        let upstream = if upstream_settings(&old) == upstream_settings(&new) {
            None
        } else {
            let _guard = self.runtime.enter();
            Some(
                Upstream::new(&new.targets, &new.limits)
                    .map_err(|e| ReloadError::Upstream(e.to_string()))?,
            )
        };
        if old.governance != new.governance {
            let _guard = self.runtime.enter();
            self.governance
                .apply_settings(&new.governance)
                .map_err(|e| {
                    ReloadError::Config(crate::config::ConfigError::Value {
                        origin: new
                            .source
                            .as_ref()
                            .map_or_else(|| "(defaults)".into(), |p| p.display().to_string()),
                        key: "governance.redis_url".into(),
                        reason: e,
                    })
                })?;
        }
        // Spans of requests that start from here on go to the new collector; the old
        // exporter sends what it queued, then ends.
        self.traces
            .configure(new.otlp_endpoint.as_deref(), &self.instance)?;
        // Everything is validated: apply.
        self.resize_limiter(new.limits.max_concurrent_requests);
        self.shares.set_limits(
            new.limits.max_requests_per_client,
            new.limits.max_requests_per_tenant,
        );
        self.pool.set_settings(&new.pool);
        if let Some(upstream) = upstream {
            self.upstream.store(Arc::new(upstream));
        }
        let file = new
            .source
            .as_ref()
            .map_or_else(|| "(defaults)".to_string(), |p| p.display().to_string());
        self.config.store(Arc::new(new));
        Ok(Reloaded {
            file,
            changed,
            restart_needed,
        })
    }

    /// Sizes the request limiter to `to` permits: more at once, fewer as requests in flight
    /// finish (permits are withdrawn as they come back).
    fn resize_limiter(&self, to: usize) {
        let mut total = crate::lock(&self.limit_total);
        if to > *total {
            self.limiter.add_permits(to - *total);
        } else if to < *total {
            let owed = *total - to;
            let rest = owed - self.limiter.forget_permits(owed);
            if rest > 0 {
                let limiter = self.limiter.clone();
                self.runtime.spawn(async move {
                    if let Ok(permits) = limiter.acquire_many_owned(rest as u32).await {
                        permits.forget();
                    }
                });
            }
        }
        *total = to;
    }
}

/// Config keys a reload does not apply: they name what was bound, opened or locked at start
/// (sockets, state directory, master key, listeners, process setup). A reload reports them.
pub const RESTART_KEYS: [&str; 19] = [
    "state_dir",
    "socket",
    "socket_group",
    "admin_socket",
    "master_key_file",
    "require_external_master_key",
    "master_key",
    "previous_master_key",
    "listen_tcp",
    "metrics_listen",
    "lock_memory",
    "audit_sync",
    "audit_retention",
    "audit_export",
    "audit_export_buffer",
    "worker_threads",
    "bundle",
    "bundle_watch",
    "bundle_poll_interval",
];

/// Decrements the in-flight count on drop.
pub struct InFlight(Arc<State>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

//! Spend governance (README, "Spend and limits"): budgets on a tenant, team, client or
//! credential, and requests- and tokens-per-minute limits on a tenant, team or client.
//!
//! `governance` owns the decision before a request is sent ([`Governance::check`], made after
//! the credential candidates are known and before the resolution is audited or a key
//! unsealed) and the charge when it completes ([`Governance::charge`]), the counters (in this
//! process, or in Redis shared by replicas), and the `budget.threshold` alerts. It must not
//! touch keys, upstreams or SQL: the rules come from `store` through [`Governance::set_rules`],
//! and the spend already in the audit trail through [`Governance::seed`].
//!
//! Counters are fixed windows keyed by scope, never by rule id, so replicas that hold the same
//! budget share its counter: spend per budget period (UTC day, ISO week, UTC month), requests
//! and tokens per UTC minute. A request counts toward its minute when admitted; its cost and
//! tokens count when it completes, so calls in flight can overshoot a budget by their own cost.

mod counters;
mod redis;
pub mod rules;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};

use crate::audit::{Audit, Event, EventKind};
pub use rules::{
    Budget, BudgetSet, BudgetStatus, LimitSet, LimitStatus, OnExceed, Period, RateLimit, Scope,
};
use rules::{WINDOW_MS, usd, window_retry_after};

/// What to do while the Redis backend cannot be reached (`[governance] on_backend_error`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnBackendError {
    /// Refuse requests that a budget or limit applies to: 503 `governance_unavailable`.
    Deny,
    /// Count in this process alone until Redis is back.
    Local,
}

/// `[governance]` of the config file.
#[derive(Clone, PartialEq, Eq)]
pub struct Settings {
    /// `redis://HOST:PORT[/DB]`; `None` keeps the counters in this process.
    pub redis_url: Option<String>,
    /// While Redis is unreachable.
    pub on_backend_error: OnBackendError,
    /// Longest wait for one Redis call (connect included).
    pub timeout: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            redis_url: None,
            on_backend_error: OnBackendError::Deny,
            timeout: Duration::from_millis(250),
        }
    }
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL may carry a password: shown without it, plus a digest so a reload still
        // notices a changed password.
        let url = self.redis_url.as_deref().map(|u| {
            let digest = ring::digest::digest(&ring::digest::SHA256, u.as_bytes());
            format!(
                "{} #{}",
                shown_url(u),
                crate::hex::encode(&digest.as_ref()[..4])
            )
        });
        f.debug_struct("Settings")
            .field("redis_url", &url)
            .field("on_backend_error", &self.on_backend_error)
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// Checks `[governance] redis_url`: `redis://` with a host (TLS is not built in). Errors say
/// what is expected.
pub fn check_redis_url(url: &str) -> Result<(), String> {
    if !url.starts_with("redis://") {
        return Err(
            "must be redis://HOST:PORT (rediss:// and unix sockets are not supported)".into(),
        );
    }
    ::redis::Client::open(url)
        .map(|_| ())
        .map_err(|e| format!("not a Redis URL ({e}); write redis://HOST:PORT"))
}

/// `url` without its userinfo (a password never reaches a message or log).
pub fn shown_url(url: &str) -> String {
    match (url.split_once("://"), url.find('@')) {
        (Some((scheme, rest)), Some(_)) => {
            let host = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
            format!("{scheme}://…@{host}")
        }
        _ => url.to_owned(),
    }
}

/// One admission check, evaluated atomically by a backend: budgets are read (a `hard` one at or
/// over its limit refuses), token counters are read (at or over refuses), request counters are
/// checked and, when nothing refused, each counts one more request.
pub(crate) struct Admit {
    /// (counter key, limit in micro-USD, refuses when reached).
    pub budgets: Vec<(String, u64, bool)>,
    /// (counter key, tokens per minute).
    pub tpm: Vec<(String, u64)>,
    /// (counter key, requests per minute).
    pub rpm: Vec<(String, u64)>,
    /// Time to live of a new request counter, ms.
    pub rpm_ttl_ms: i64,
}

/// A backend's answer to [`Admit`].
#[derive(Debug)]
pub(crate) enum Verdict {
    /// Admitted; the spend read for each budget, in order.
    Pass { spent: Vec<u64> },
    /// `budgets[index]` is hard and spent at least its limit.
    Budget { index: usize, spent: u64 },
    /// `tpm[index]` has used its tokens this minute.
    Tokens { index: usize, used: u64 },
    /// `rpm[index]` has admitted its requests this minute.
    Requests { index: usize, used: u64 },
}

/// The caller a check is about, as authenticated.
#[derive(Debug, Clone, Copy)]
pub struct Caller<'a> {
    /// Tenant name.
    pub tenant: &'a str,
    /// The client's team.
    pub team: Option<&'a str>,
    /// Client id.
    pub client: &'a str,
}

/// Why [`Governance::check`] refused a request; the message names the rule and its numbers.
#[derive(Debug, Clone)]
pub enum Refusal {
    /// 429 `budget_exceeded`.
    Budget(String),
    /// 429 `rate_limited`, with `Retry-After` seconds.
    Rate {
        /// What was exceeded.
        message: String,
        /// Seconds until the window lets the request through.
        retry_after: u64,
    },
    /// 503 `governance_unavailable`: Redis is unreachable and `on_backend_error = "deny"`.
    Unavailable(String),
}

/// What an admitted request carries to its completion: the rules to charge.
#[derive(Debug, Default, Clone)]
pub struct Ticket {
    budgets: Vec<Arc<Budget>>,
    tpm: Vec<Arc<RateLimit>>,
    /// Credentials whose `deny` budget is spent: not to be used for this request, with why.
    pub blocked: Vec<(String, String)>,
    /// `warn` budgets that are spent (their descriptions), for the audit flag and header.
    pub warnings: Vec<String>,
}

impl Ticket {
    /// True when no rule applies (nothing to charge).
    pub fn is_empty(&self) -> bool {
        self.budgets.is_empty() && self.tpm.is_empty()
    }
}

#[derive(Default)]
struct Rules {
    by_tenant: HashMap<String, TenantRules>,
}

#[derive(Default)]
struct TenantRules {
    budgets: Vec<Arc<Budget>>,
    limits: Vec<Arc<RateLimit>>,
}

/// A charge Redis did not take, retried when it is back.
struct Pending {
    budgets: Vec<Arc<Budget>>,
    deltas: Vec<(String, u64, i64)>,
}

/// Budgets, limits and their counters; one per daemon.
pub struct Governance {
    rules: ArcSwap<Rules>,
    local: counters::LocalCounters,
    redis: ArcSwapOption<redis::RedisBackend>,
    settings: ArcSwap<Settings>,
    pending: Mutex<Vec<Pending>>,
    audit: Audit,
}

/// Most charges kept while Redis is down (each is a few keys); older ones are dropped.
const MAX_PENDING: usize = 100_000;

impl Governance {
    /// An engine with no rules, counting per `settings` (not connected yet: see
    /// [`Governance::maintain`]).
    pub fn new(settings: &Settings, audit: Audit) -> Result<Governance, String> {
        let g = Governance {
            rules: ArcSwap::from_pointee(Rules::default()),
            local: counters::LocalCounters::default(),
            redis: ArcSwapOption::empty(),
            settings: ArcSwap::from_pointee(settings.clone()),
            pending: Mutex::new(Vec::new()),
            audit,
        };
        g.apply_settings(settings)?;
        Ok(g)
    }

    /// Applies changed `[governance]` settings (reload); a new Redis URL gets a new backend.
    pub fn apply_settings(&self, settings: &Settings) -> Result<(), String> {
        let old = self.settings.load_full();
        let backend_changed =
            old.redis_url != settings.redis_url || old.timeout != settings.timeout;
        if backend_changed || (self.redis.load().is_none() && settings.redis_url.is_some()) {
            let backend = match &settings.redis_url {
                Some(url) => Some(Arc::new(redis::RedisBackend::new(
                    url,
                    shown_url(url),
                    settings.timeout,
                )?)),
                None => None,
            };
            self.redis.store(backend);
        }
        self.settings.store(Arc::new(settings.clone()));
        Ok(())
    }

    /// Replaces the rules (after a change in the store, and at start).
    pub fn set_rules(&self, budgets: Vec<Budget>, limits: Vec<RateLimit>) {
        let mut rules = Rules::default();
        for b in budgets {
            rules
                .by_tenant
                .entry(b.tenant.clone())
                .or_default()
                .budgets
                .push(Arc::new(b));
        }
        for l in limits {
            rules
                .by_tenant
                .entry(l.tenant.clone())
                .or_default()
                .limits
                .push(Arc::new(l));
        }
        self.rules.store(Arc::new(rules));
    }

    /// Starts this process's counter of `budget`'s current period at `spent` (micro-USD), when
    /// it has none yet: the spend the audit trail holds for the period so far.
    pub fn seed(&self, budget: &Budget, spent: u64) {
        let now = crate::units::now_unix_ms();
        let (_, end) = budget.period.bounds(now);
        self.local
            .seed(&budget.key(now), spent, end + budget.key_ttl_ms(), now);
    }

    /// Decides whether a request of `caller`, which may be served by `credentials`, goes
    /// ahead; counts it toward its rate limits when it does. Nothing applies → no backend call.
    pub async fn check(&self, caller: Caller<'_>, credentials: &[&str]) -> Result<Ticket, Refusal> {
        let rules = self.rules.load();
        let Some(tenant) = rules.by_tenant.get(caller.tenant) else {
            return Ok(Ticket::default());
        };
        let applies = |scope: &Scope| match scope {
            Scope::Tenant => true,
            Scope::Team(t) => caller.team == Some(t.as_str()),
            Scope::Client(c) => caller.client == c,
            Scope::Credential(c) => credentials.contains(&c.as_str()),
        };
        let budgets: Vec<Arc<Budget>> = tenant
            .budgets
            .iter()
            .filter(|b| applies(&b.scope))
            .cloned()
            .collect();
        let limits: Vec<&Arc<RateLimit>> =
            tenant.limits.iter().filter(|l| applies(&l.scope)).collect();
        if budgets.is_empty() && limits.is_empty() {
            return Ok(Ticket::default());
        }
        let now = crate::units::now_unix_ms();
        let rpm: Vec<&Arc<RateLimit>> =
            limits.iter().copied().filter(|l| l.rpm.is_some()).collect();
        let tpm: Vec<Arc<RateLimit>> = limits
            .iter()
            .copied()
            .filter(|l| l.tpm.is_some())
            .cloned()
            .collect();
        let op = Admit {
            budgets: budgets
                .iter()
                .map(|b| {
                    let hard =
                        b.on_exceed == OnExceed::Deny && !matches!(b.scope, Scope::Credential(_));
                    (b.key(now), b.limit_micros, hard)
                })
                .collect(),
            tpm: tpm
                .iter()
                .map(|l| (l.tpm_key(now), l.tpm.unwrap_or(0)))
                .collect(),
            rpm: rpm
                .iter()
                .map(|l| (l.rpm_key(now), l.rpm.unwrap_or(0)))
                .collect(),
            rpm_ttl_ms: 2 * WINDOW_MS,
        };
        let verdict = self.admit(&op, now).await?;
        let spent = match verdict {
            Verdict::Pass { spent } => spent,
            Verdict::Budget { index, spent } => {
                return Err(Refusal::Budget(exhausted(&budgets[index], spent, now)));
            }
            Verdict::Tokens { index, used } => {
                let l = &tpm[index];
                let retry_after = window_retry_after(now);
                return Err(Refusal::Rate {
                    message: format!(
                        "rate limit {} on {} allows {} tokens per minute and {used} were used \
                         this minute (UTC); retry in {retry_after}s",
                        l.id,
                        l.scope.describe(&l.tenant),
                        l.tpm.unwrap_or(0)
                    ),
                    retry_after,
                });
            }
            Verdict::Requests { index, used } => {
                let l = rpm[index];
                let retry_after = window_retry_after(now);
                return Err(Refusal::Rate {
                    message: format!(
                        "rate limit {} on {} allows {} requests per minute and {used} were made \
                         this minute (UTC); retry in {retry_after}s",
                        l.id,
                        l.scope.describe(&l.tenant),
                        l.rpm.unwrap_or(0)
                    ),
                    retry_after,
                });
            }
        };
        let mut ticket = Ticket {
            budgets: budgets.clone(),
            tpm,
            ..Ticket::default()
        };
        for (b, spent) in budgets.iter().zip(spent) {
            if spent < b.limit_micros {
                continue;
            }
            match (b.on_exceed, &b.scope) {
                (OnExceed::Deny, Scope::Credential(id)) => {
                    ticket.blocked.push((id.clone(), exhausted(b, spent, now)));
                }
                (OnExceed::Warn, _) => ticket.warnings.push(format!(
                    "{} spent {} of {} USD",
                    b.id,
                    usd(spent),
                    usd(b.limit_micros)
                )),
                (OnExceed::Deny, _) => {}
            }
        }
        Ok(ticket)
    }

    /// Runs `op` on Redis, or on this process's counters without Redis or per
    /// `on_backend_error` while it is down.
    async fn admit(&self, op: &Admit, now: i64) -> Result<Verdict, Refusal> {
        if let Some(redis) = self.redis.load_full() {
            match redis.admit(op).await {
                Ok(v) => return Ok(v),
                Err(why) => {
                    if self.settings.load().on_backend_error == OnBackendError::Deny {
                        return Err(Refusal::Unavailable(format!(
                            "the shared budget and rate counters (Redis at {}) cannot be reached \
                             ({why}) and [governance] on_backend_error = \"deny\"; retry shortly",
                            redis.shown
                        )));
                    }
                }
            }
        }
        Ok(self.local.admit(op, now))
    }

    /// Charges a completed call: `cost_micros` to the budgets of its ticket (the credential's
    /// only when it served), `tokens` to its token limits. Never blocks: the Redis part runs
    /// on the runtime.
    pub fn charge(
        self: &Arc<Self>,
        ticket: &Ticket,
        credential: Option<&str>,
        cost_micros: Option<u64>,
        tokens: Option<u64>,
    ) {
        if ticket.is_empty() {
            return;
        }
        let now = crate::units::now_unix_ms();
        let mut budgets = Vec::new();
        let mut deltas = Vec::new();
        if let Some(cost) = cost_micros.filter(|c| *c > 0) {
            for b in &ticket.budgets {
                if let Scope::Credential(id) = &b.scope
                    && Some(id.as_str()) != credential
                {
                    continue;
                }
                let (_, end) = b.period.bounds(now);
                deltas.push((b.key(now), cost, end - now + b.key_ttl_ms()));
                budgets.push(b.clone());
            }
        }
        if let Some(tokens) = tokens.filter(|t| *t > 0) {
            for l in &ticket.tpm {
                deltas.push((l.tpm_key(now), tokens, 2 * WINDOW_MS));
            }
        }
        if deltas.is_empty() {
            return;
        }
        let values = self.local.charge(&deltas, now);
        match self.redis.load_full() {
            None => self.alerts(&budgets, &deltas, &values, now),
            Some(_) => {
                let Ok(runtime) = tokio::runtime::Handle::try_current() else {
                    return;
                };
                let this = self.clone();
                runtime.spawn(async move { this.charge_shared(Pending { budgets, deltas }).await });
            }
        }
    }

    async fn charge_shared(&self, p: Pending) {
        let Some(redis) = self.redis.load_full() else {
            return;
        };
        match redis.charge(&p.deltas).await {
            Ok(values) => self.alerts(&p.budgets, &p.deltas, &values, crate::units::now_unix_ms()),
            Err(_) => {
                let mut pending = crate::lock(&self.pending);
                if pending.len() < MAX_PENDING {
                    pending.push(p);
                }
            }
        }
    }

    /// Writes `budget.threshold` (and logs) for every alert threshold a charge crossed: the
    /// counter was below it before this charge and is at or above it now, which happens once
    /// per threshold and period, fleet-wide with Redis (its INCRBY is atomic).
    fn alerts(
        &self,
        budgets: &[Arc<Budget>],
        deltas: &[(String, u64, i64)],
        values: &[u64],
        now: i64,
    ) {
        for ((b, (_, delta, _)), &after) in budgets.iter().zip(deltas).zip(values) {
            let before = after.saturating_sub(*delta);
            let mut crossed: Vec<u8> = b
                .alerts
                .iter()
                .copied()
                .filter(|pct| {
                    let at = threshold(b.limit_micros, *pct);
                    before < at && after >= at
                })
                .collect();
            crossed.sort_unstable();
            for pct in crossed {
                let (_, end) = b.period.bounds(now);
                let detail = format!(
                    "budget {} on {}: {pct}% of {} USD per {} reached, spent {} USD; resets at {}",
                    b.id,
                    b.scope.describe(&b.tenant),
                    usd(b.limit_micros),
                    b.period.as_str(),
                    usd(after),
                    crate::units::format_time_ms(end)
                );
                tracing::warn!(budget = %b.id, tenant = %b.tenant, percent = pct, "{detail}");
                let mut event = scope_event(EventKind::BudgetThreshold, &b.tenant, &b.scope);
                event.detail = Some(detail);
                self.audit.enqueue(event);
            }
        }
    }

    /// Reconnects Redis while it is down and retries the charges it missed; the daemon runs it
    /// every 250 ms. Without Redis it does nothing.
    pub async fn maintain(&self) {
        let Some(redis) = self.redis.load_full() else {
            return;
        };
        if !redis.is_up() && !redis.reconnect().await {
            return;
        }
        let waiting = std::mem::take(&mut *crate::lock(&self.pending));
        for p in waiting {
            self.charge_shared(p).await;
        }
    }

    /// For `keyward status`: where the counters are, whether Redis answers, and how many
    /// charges wait for it.
    pub fn status(&self) -> serde_json::Value {
        let pending = crate::lock(&self.pending).len();
        match self.redis.load_full() {
            None => serde_json::json!({ "counters": "local" }),
            Some(redis) => serde_json::json!({
                "counters": redis.shown,
                "redis_up": redis.is_up(),
                "on_backend_error": match self.settings.load().on_backend_error {
                    OnBackendError::Deny => "deny",
                    OnBackendError::Local => "local",
                },
                "charges_waiting": pending,
            }),
        }
    }

    /// Spent this period per budget: from Redis when it is used and reachable, else from this
    /// process's counters. Returns (spent, source) per budget.
    pub async fn spent(&self, budgets: &[Budget]) -> Vec<(u64, &'static str)> {
        let now = crate::units::now_unix_ms();
        let keys: Vec<String> = budgets.iter().map(|b| b.key(now)).collect();
        if let Some(redis) = self.redis.load_full()
            && let Ok(values) = redis.values(&keys).await
        {
            return values.into_iter().map(|v| (v, "redis")).collect();
        }
        keys.iter()
            .map(|k| (self.local.value(k, now), "local"))
            .collect()
    }

    /// Requests and tokens counted this minute per limit: Redis when reachable, else local.
    pub async fn usage(&self, limits: &[RateLimit]) -> Vec<(u64, u64)> {
        let now = crate::units::now_unix_ms();
        let keys: Vec<String> = limits
            .iter()
            .flat_map(|l| [l.rpm_key(now), l.tpm_key(now)])
            .collect();
        let values = match self.redis.load_full() {
            Some(redis) => redis.values(&keys).await.ok(),
            None => None,
        }
        .unwrap_or_else(|| keys.iter().map(|k| self.local.value(k, now)).collect());
        values.chunks(2).map(|c| (c[0], c[1])).collect()
    }
}

/// The micro-USD at which `pct` percent of `limit` is reached (rounded up).
fn threshold(limit: u64, pct: u8) -> u64 {
    (u128::from(limit) * u128::from(pct)).div_ceil(100) as u64
}

/// The refusal message of a spent budget.
fn exhausted(b: &Budget, spent: u64, now: i64) -> String {
    let (_, end) = b.period.bounds(now);
    format!(
        "budget {} on {} is exhausted: spent {} USD of its {} USD per {}; it resets at {} \
         (periods are UTC)",
        b.id,
        b.scope.describe(&b.tenant),
        usd(spent),
        usd(b.limit_micros),
        b.period.as_str(),
        crate::units::format_time_ms(end)
    )
}

/// An audit event about a rule on `scope`, with the fields that make it show up in the
/// scope's own queries (`--tenant`, `--client`, `audit lifecycle CREDENTIAL`).
pub fn scope_event(kind: EventKind, tenant: &str, scope: &Scope) -> Event {
    let mut e = Event {
        tenant: Some(tenant.to_owned()),
        ..Event::new(kind)
    };
    match scope {
        Scope::Tenant => {}
        Scope::Team(t) => e.team = Some(t.clone()),
        Scope::Client(c) => e.client_id = Some(c.clone()),
        Scope::Credential(c) => e.credential_id = Some(c.clone()),
    }
    e
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds_round_up_so_an_alert_never_fires_early() {
        assert_eq!(threshold(10_000_000, 80), 8_000_000);
        assert_eq!(threshold(3, 50), 2);
        assert_eq!(threshold(u64::MAX, 100), u64::MAX);
    }

    #[test]
    fn passwords_never_show() {
        assert_eq!(
            shown_url("redis://:s3cret@10.0.0.1:6379/2"),
            "redis://…@10.0.0.1:6379/2"
        );
        assert_eq!(
            shown_url("redis://127.0.0.1:6379"),
            "redis://127.0.0.1:6379"
        );
        let s = Settings {
            redis_url: Some("redis://user:s3cret@h:1".into()),
            ..Settings::default()
        };
        assert!(!format!("{s:?}").contains("s3cret"));
        assert!(check_redis_url("rediss://h:1").is_err());
        assert!(check_redis_url("http://h:1").is_err());
        assert!(check_redis_url("redis://127.0.0.1:6379").is_ok());
    }
}

//! What budgets and rate limits are: their scopes, periods and windows (all in UTC), the admin
//! request and response shapes, and the counter keys both backends use. Pure: no I/O.

use serde::{Deserialize, Serialize};

/// What a budget or a rate limit covers. Always inside one tenant.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", content = "value", rename_all = "snake_case")]
pub enum Scope {
    /// Every call of the tenant.
    Tenant,
    /// Calls of the tenant's clients in this team.
    Team(String),
    /// Calls of this client (id).
    Client(String),
    /// Calls served by this credential (id). Budgets only.
    Credential(String),
}

impl Scope {
    /// `tenant`, `team`, `client` or `credential`.
    pub fn kind(&self) -> &'static str {
        match self {
            Scope::Tenant => "tenant",
            Scope::Team(_) => "team",
            Scope::Client(_) => "client",
            Scope::Credential(_) => "credential",
        }
    }

    /// The team name, client id or credential id; `""` for the whole tenant.
    pub fn value(&self) -> &str {
        match self {
            Scope::Tenant => "",
            Scope::Team(v) | Scope::Client(v) | Scope::Credential(v) => v,
        }
    }

    /// Rebuilds a scope from its stored kind and value.
    pub fn from_parts(kind: &str, value: &str) -> Option<Scope> {
        Some(match kind {
            "tenant" => Scope::Tenant,
            "team" => Scope::Team(value.to_owned()),
            "client" => Scope::Client(value.to_owned()),
            "credential" => Scope::Credential(value.to_owned()),
            _ => return None,
        })
    }

    /// How people read it: `tenant acme`, `team research of acme`, ...
    pub fn describe(&self, tenant: &str) -> String {
        match self {
            Scope::Tenant => format!("tenant {tenant}"),
            other => format!("{} {} of tenant {tenant}", other.kind(), other.value()),
        }
    }
}

/// A budget's period; periods start at 00:00 UTC (weeks on Monday, months on the 1st).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Period {
    /// A UTC calendar day.
    Day,
    /// An ISO week, Monday 00:00 UTC to the next Monday.
    Week,
    /// A UTC calendar month.
    Month,
}

const DAY_MS: i64 = 86_400_000;

impl Period {
    /// `day`, `week` or `month`.
    pub fn as_str(self) -> &'static str {
        match self {
            Period::Day => "day",
            Period::Week => "week",
            Period::Month => "month",
        }
    }

    /// Parses `day`, `week` or `month`.
    pub fn parse(text: &str) -> Option<Period> {
        match text {
            "day" => Some(Period::Day),
            "week" => Some(Period::Week),
            "month" => Some(Period::Month),
            _ => None,
        }
    }

    /// The period holding `now_ms`: `(start, end)` in ms since the epoch, end exclusive.
    pub fn bounds(self, now_ms: i64) -> (i64, i64) {
        let day = now_ms.div_euclid(DAY_MS);
        match self {
            Period::Day => (day * DAY_MS, (day + 1) * DAY_MS),
            Period::Week => {
                // 1970-01-01 was a Thursday: Monday-based weekday is (day + 3) mod 7.
                let monday = day - (day + 3).rem_euclid(7);
                (monday * DAY_MS, (monday + 7) * DAY_MS)
            }
            Period::Month => {
                let (y, m, _) = civil_from_days(day);
                let start = days_from_civil(y, m, 1);
                let end = if m == 12 {
                    days_from_civil(y + 1, 1, 1)
                } else {
                    days_from_civil(y, m + 1, 1)
                };
                (start * DAY_MS, end * DAY_MS)
            }
        }
    }
}

/// Year, month (1-12), day (1-31) of a day count since 1970-01-01 (proleptic Gregorian).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// Days since 1970-01-01 of a civil date (inverse of [`civil_from_days`]).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// What happens to a request while its scope is over the budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnExceed {
    /// Refused with 429 `budget_exceeded` before anything is sent.
    Deny,
    /// Served, flagged `budget_exceeded_warn` in the audit and the `keyward-budget` header.
    Warn,
}

impl OnExceed {
    /// `deny` or `warn`.
    pub fn as_str(self) -> &'static str {
        match self {
            OnExceed::Deny => "deny",
            OnExceed::Warn => "warn",
        }
    }
}

/// A spend budget (`keyward budget set`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Budget {
    /// `bud_…`.
    pub id: String,
    /// Tenant name.
    pub tenant: String,
    /// What it covers.
    pub scope: Scope,
    /// Most spend per period, micro-USD.
    pub limit_micros: u64,
    /// The period it resets on.
    pub period: Period,
    /// Deny or warn once spent reaches the limit.
    pub on_exceed: OnExceed,
    /// Percentages of the limit (1-100) whose crossing writes `budget.threshold`.
    pub alerts: Vec<u8>,
    /// Unix seconds.
    pub created_at: i64,
}

impl Budget {
    /// The counter key of the period holding `now_ms`: the same on every replica that has a
    /// budget on this scope and period, whatever its id, so replicas share one counter.
    pub fn key(&self, now_ms: i64) -> String {
        let (start, _) = self.period.bounds(now_ms);
        format!(
            "b:{}:{}:{}:{}:{start}",
            self.tenant,
            self.scope.kind(),
            self.scope.value(),
            self.period.as_str()
        )
    }

    /// How long a period's counter must outlive its period, in ms (a month and a day).
    pub fn key_ttl_ms(&self) -> i64 {
        32 * DAY_MS
    }

    /// `budget.set` detail and `budget list` summary.
    pub fn describe(&self) -> String {
        let alerts = if self.alerts.is_empty() {
            "none".to_owned()
        } else {
            self.alerts
                .iter()
                .map(|a| format!("{a}%"))
                .collect::<Vec<_>>()
                .join(",")
        };
        format!(
            "budget {} on {}: {} USD per {} (UTC), on_exceed={}, alerts={alerts}",
            self.id,
            self.scope.describe(&self.tenant),
            usd(self.limit_micros),
            self.period.as_str(),
            self.on_exceed.as_str()
        )
    }
}

/// A rate limit (`keyward limit set`): requests and tokens per minute, fixed UTC minutes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RateLimit {
    /// `lim_…`.
    pub id: String,
    /// Tenant name.
    pub tenant: String,
    /// Tenant, team or client.
    pub scope: Scope,
    /// Requests admitted per minute.
    pub rpm: Option<u64>,
    /// Tokens (input + output, as the provider reported them) charged per minute.
    pub tpm: Option<u64>,
    /// Unix seconds.
    pub created_at: i64,
}

/// Milliseconds in a rate window.
pub const WINDOW_MS: i64 = 60_000;

impl RateLimit {
    /// The request counter key of the minute holding `now_ms`.
    pub fn rpm_key(&self, now_ms: i64) -> String {
        self.key("r", now_ms)
    }

    /// The token counter key of the minute holding `now_ms`.
    pub fn tpm_key(&self, now_ms: i64) -> String {
        self.key("t", now_ms)
    }

    fn key(&self, what: &str, now_ms: i64) -> String {
        format!(
            "{what}:{}:{}:{}:{}",
            self.tenant,
            self.scope.kind(),
            self.scope.value(),
            now_ms.div_euclid(WINDOW_MS)
        )
    }

    /// `limit.set` detail and `limit list` summary.
    pub fn describe(&self) -> String {
        let n = |v: Option<u64>| v.map_or("none".to_owned(), |v| v.to_string());
        format!(
            "limit {} on {}: rpm={} tpm={}",
            self.id,
            self.scope.describe(&self.tenant),
            n(self.rpm),
            n(self.tpm)
        )
    }
}

/// Seconds from `now_ms` until the window holding it ends, rounded up (a `Retry-After` that
/// is never early).
pub fn window_retry_after(now_ms: i64) -> u64 {
    let end = (now_ms.div_euclid(WINDOW_MS) + 1) * WINDOW_MS;
    ((end - now_ms) as u64).div_ceil(1000).max(1)
}

/// Micro-USD as a decimal USD string with up to six decimals (`12.5`, `0.000381`).
pub fn usd(micros: u64) -> String {
    let whole = micros / 1_000_000;
    let frac = micros % 1_000_000;
    if frac == 0 {
        return format!("{whole}.00");
    }
    let text = format!("{frac:06}");
    let text = text.trim_end_matches('0');
    if text.len() < 2 {
        format!("{whole}.{text}0")
    } else {
        format!("{whole}.{text}")
    }
}

/// Parses a USD amount (`10`, `2.5`, `0.000001`) into micro-USD; at most six decimals.
pub fn parse_usd(text: &str) -> Option<u64> {
    let t = text.trim();
    let (whole, frac) = t.split_once('.').unwrap_or((t, ""));
    if whole.is_empty() && frac.is_empty()
        || !whole.bytes().all(|b| b.is_ascii_digit())
        || !frac.bytes().all(|b| b.is_ascii_digit())
        || frac.len() > 6
    {
        return None;
    }
    let whole: u64 = if whole.is_empty() {
        0
    } else {
        whole.parse().ok()?
    };
    let frac: u64 = if frac.is_empty() {
        0
    } else {
        format!("{frac:0<6}").parse().ok()?
    };
    whole.checked_mul(1_000_000)?.checked_add(frac)
}

// === admin API shapes ===

/// `budget set` / `POST /v1/budgets`: creates the budget of this scope and period, or replaces
/// its limit, action and alerts (the id stays).
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(
    as = NewBudget,
    example = json!({"tenant": "acme", "limit_usd": "10", "period": "day", "alerts": [80]})
)]
pub struct BudgetSet {
    /// Tenant name.
    pub tenant: String,
    /// Only this team's clients (at most one of `team`, `client`, `credential`; none: the
    /// whole tenant).
    #[serde(default)]
    pub team: Option<String>,
    /// Only this client (id).
    #[serde(default)]
    pub client: Option<String>,
    /// Only calls this credential (id) serves.
    #[serde(default)]
    pub credential: Option<String>,
    /// Most spend per period, USD, as a decimal string (`10`, `2.50`; at most six decimals).
    pub limit_usd: String,
    /// `day`, `week` (ISO, from Monday) or `month`, in UTC.
    pub period: String,
    /// `deny` (default: 429 `budget_exceeded`) or `warn` (serve and flag).
    #[serde(default)]
    pub on_exceed: Option<String>,
    /// Percentages of the limit (1–100) at which a `budget.threshold` event is written.
    #[serde(default)]
    pub alerts: Vec<u8>,
}

impl BudgetSet {
    /// Checks the request's own values (not whether its tenant, client or credential exist):
    /// returns the scope, limit (micro-USD), period, action and sorted distinct alerts.
    pub fn validate(&self) -> Result<(Scope, u64, Period, OnExceed, Vec<u8>), String> {
        let scope = one_scope(&self.team, &self.client, &self.credential)?;
        let limit = parse_usd(&self.limit_usd).ok_or_else(|| {
            format!(
                "--limit {:?} is not an amount in USD: write a decimal number such as 10 or 2.50 \
                 (at most six decimals)",
                self.limit_usd
            )
        })?;
        if limit == 0 {
            return Err("--limit must be more than 0 USD (delete the budget to lift it)".into());
        }
        let period = Period::parse(&self.period)
            .ok_or_else(|| format!("--period must be day, week or month, not {:?}", self.period))?;
        let on_exceed = match self.on_exceed.as_deref() {
            None | Some("deny") => OnExceed::Deny,
            Some("warn") => OnExceed::Warn,
            Some(other) => return Err(format!("--on-exceed must be deny or warn, not {other:?}")),
        };
        let mut alerts = self.alerts.clone();
        if let Some(bad) = alerts.iter().find(|a| !(1..=100).contains(*a)) {
            return Err(format!("--alert {bad} is not a percentage from 1 to 100"));
        }
        alerts.sort_unstable();
        alerts.dedup();
        Ok((scope, limit, period, on_exceed, alerts))
    }
}

impl LimitSet {
    /// Checks the request's own values: returns the scope, rpm and tpm.
    pub fn validate(&self) -> Result<(Scope, Option<u64>, Option<u64>), String> {
        let scope = one_scope(&self.team, &self.client, &None)?;
        if self.rpm.is_none() && self.tpm.is_none() {
            return Err("give --rpm N, --tpm N or both".into());
        }
        if self.rpm == Some(0) || self.tpm == Some(0) {
            return Err("--rpm and --tpm must be at least 1 (delete the limit to lift it)".into());
        }
        Ok((scope, self.rpm, self.tpm))
    }
}

/// The scope named by at most one of `--team`, `--client`, `--credential`.
fn one_scope(
    team: &Option<String>,
    client: &Option<String>,
    credential: &Option<String>,
) -> Result<Scope, String> {
    match (team, client, credential) {
        (None, None, None) => Ok(Scope::Tenant),
        (Some(t), None, None) => Ok(Scope::Team(t.clone())),
        (None, Some(c), None) => Ok(Scope::Client(c.clone())),
        (None, None, Some(c)) => Ok(Scope::Credential(c.clone())),
        _ => Err("name at most one of --team, --client and --credential".into()),
    }
}

/// `limit set` / `POST /v1/limits`: creates or replaces the rate limit of this scope.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = NewLimit, example = json!({"tenant": "acme", "rpm": 600, "tpm": 200000}))]
pub struct LimitSet {
    /// Tenant name.
    pub tenant: String,
    /// Only this team's clients (at most one of `team`, `client`; none: the whole tenant).
    #[serde(default)]
    pub team: Option<String>,
    /// Only this client (id).
    #[serde(default)]
    pub client: Option<String>,
    /// Requests per UTC minute.
    #[serde(default)]
    pub rpm: Option<u64>,
    /// Tokens (input + output, as providers report them) per UTC minute.
    #[serde(default)]
    pub tpm: Option<u64>,
}

/// A budget with its spend in the current period (`budget list`, `GET /v1/budgets`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[schema(as = Budget)]
pub struct BudgetStatus {
    /// Budget id (`bud_…`).
    pub id: String,
    /// Tenant name.
    pub tenant: String,
    /// `tenant`, `team`, `client` or `credential`.
    pub scope: String,
    /// Team name, client id or credential id (`null` for the tenant).
    pub scope_id: Option<String>,
    /// `day`, `week` or `month`.
    pub period: String,
    /// Limit, micro-USD.
    pub limit_micros: u64,
    /// Spent in the current period, micro-USD.
    pub spent_micros: u64,
    /// Limit, USD.
    pub limit_usd: String,
    /// Spent, USD.
    pub spent_usd: String,
    /// `deny` or `warn`.
    pub on_exceed: String,
    /// Alert thresholds, percent.
    pub alerts: Vec<u8>,
    /// Start of the current period, RFC 3339 UTC.
    pub period_start: String,
    /// When the spend resets, RFC 3339 UTC.
    pub resets_at: String,
    /// Where the spend was read: `local` or `redis`.
    pub source: String,
}

/// A rate limit with this minute's use (`limit list`, `GET /v1/limits`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[schema(as = Limit)]
pub struct LimitStatus {
    /// Limit id (`lim_…`).
    pub id: String,
    /// Tenant name.
    pub tenant: String,
    /// `tenant`, `team` or `client`.
    pub scope: String,
    /// Team name or client id (`null` for the tenant).
    pub scope_id: Option<String>,
    /// Requests per minute.
    pub rpm: Option<u64>,
    /// Tokens per minute.
    pub tpm: Option<u64>,
    /// Requests admitted in the current minute.
    pub requests_this_minute: u64,
    /// Tokens charged in the current minute.
    pub tokens_this_minute: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(text: &str) -> i64 {
        humantime::parse_rfc3339(text)
            .unwrap()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64
    }

    #[test]
    fn periods_start_at_utc_midnight_monday_and_the_first() {
        let now = ms("2026-12-03T17:45:12Z"); // a Thursday
        assert_eq!(
            Period::Day.bounds(now),
            (ms("2026-12-03T00:00:00Z"), ms("2026-12-04T00:00:00Z"))
        );
        assert_eq!(
            Period::Week.bounds(now),
            (ms("2026-11-30T00:00:00Z"), ms("2026-12-07T00:00:00Z"))
        );
        assert_eq!(
            Period::Month.bounds(now),
            (ms("2026-12-01T00:00:00Z"), ms("2027-01-01T00:00:00Z"))
        );
        assert_eq!(
            Period::Month.bounds(ms("2028-02-29T23:59:59Z")),
            (ms("2028-02-01T00:00:00Z"), ms("2028-03-01T00:00:00Z"))
        );
        // A Monday at midnight starts its own week.
        let monday = ms("2026-11-30T00:00:00Z");
        assert_eq!(Period::Week.bounds(monday).0, monday);
        assert_eq!(Period::Week.bounds(monday - 1).1, monday);
    }

    #[test]
    fn usd_amounts_parse_exactly_and_print_back() {
        assert_eq!(parse_usd("10"), Some(10_000_000));
        assert_eq!(parse_usd("2.5"), Some(2_500_000));
        assert_eq!(parse_usd("0.000381"), Some(381));
        assert_eq!(parse_usd(".5"), Some(500_000));
        for bad in ["", ".", "-1", "1.0000001", "1e3", "abc", "1.2.3"] {
            assert_eq!(parse_usd(bad), None, "{bad}");
        }
        assert_eq!(usd(10_000_000), "10.00");
        assert_eq!(usd(2_500_000), "2.50");
        assert_eq!(usd(381), "0.000381");
        assert_eq!(usd(7_381), "0.007381");
    }

    #[test]
    fn retry_after_reaches_the_next_window_and_never_says_zero() {
        assert_eq!(window_retry_after(60_000), 60);
        assert_eq!(window_retry_after(60_001), 60);
        assert_eq!(window_retry_after(119_000), 1);
        assert_eq!(window_retry_after(119_999), 1);
        assert_eq!(window_retry_after(90_500), 30);
    }

    #[test]
    fn replicas_with_the_same_budget_share_its_key() {
        let a = Budget {
            id: "bud_a".into(),
            tenant: "acme".into(),
            scope: Scope::Team("research".into()),
            limit_micros: 1,
            period: Period::Day,
            on_exceed: OnExceed::Deny,
            alerts: vec![],
            created_at: 0,
        };
        let b = Budget {
            id: "bud_b".into(),
            limit_micros: 5,
            ..a.clone()
        };
        let now = ms("2026-12-03T17:45:12Z");
        assert_eq!(a.key(now), b.key(now));
        assert_ne!(a.key(now), a.key(now + DAY_MS));
    }
}

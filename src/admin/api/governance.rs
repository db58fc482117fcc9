//! `/v1/budgets` and `/v1/limits`: spend budgets and rate limits (README, "Spend and limits").

use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

/// `POST /v1/budgets` (`keyward budget set`): replaces the budget of the same scope and period.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"tenant": "acme", "limit_usd": "10", "period": "day", "alerts": [80]}))]
pub struct NewBudget {
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

impl From<NewBudget> for crate::governance::BudgetSet {
    fn from(b: NewBudget) -> crate::governance::BudgetSet {
        crate::governance::BudgetSet {
            tenant: b.tenant,
            team: b.team,
            client: b.client,
            credential: b.credential,
            limit_usd: b.limit_usd,
            period: b.period,
            on_exceed: b.on_exceed,
            alerts: b.alerts,
        }
    }
}

/// A budget with its spend in the current period.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Budget {
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

impl From<crate::governance::BudgetStatus> for Budget {
    fn from(b: crate::governance::BudgetStatus) -> Budget {
        Budget {
            id: b.id,
            tenant: b.tenant,
            scope: b.scope,
            scope_id: b.scope_id,
            period: b.period,
            limit_micros: b.limit_micros,
            spent_micros: b.spent_micros,
            limit_usd: b.limit_usd,
            spent_usd: b.spent_usd,
            on_exceed: b.on_exceed,
            alerts: b.alerts,
            period_start: b.period_start,
            resets_at: b.resets_at,
            source: b.source,
        }
    }
}

/// `POST /v1/limits` (`keyward limit set`): replaces the limit of the same scope.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"tenant": "acme", "rpm": 600, "tpm": 200000}))]
pub struct NewLimit {
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

impl From<NewLimit> for crate::governance::LimitSet {
    fn from(l: NewLimit) -> crate::governance::LimitSet {
        crate::governance::LimitSet {
            tenant: l.tenant,
            team: l.team,
            client: l.client,
            rpm: l.rpm,
            tpm: l.tpm,
        }
    }
}

/// A rate limit with this minute's use.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Limit {
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

impl From<crate::governance::LimitStatus> for Limit {
    fn from(l: crate::governance::LimitStatus) -> Limit {
        Limit {
            id: l.id,
            tenant: l.tenant,
            scope: l.scope,
            scope_id: l.scope_id,
            rpm: l.rpm,
            tpm: l.tpm,
            requests_this_minute: l.requests_this_minute,
            tokens_this_minute: l.tokens_this_minute,
        }
    }
}

/// Query of `GET /v1/budgets` and `GET /v1/limits`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct RuleFilter {
    /// Only this tenant.
    #[serde(default)]
    pub tenant: Option<String>,
}

/// What `DELETE /v1/budgets/{id}` and `DELETE /v1/limits/{id}` return.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct RuleDeleted {
    /// The id.
    pub id: String,
    /// Always true.
    pub deleted: bool,
}

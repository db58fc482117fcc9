//! `/v1/budgets` and `/v1/limits`: spend budgets and rate limits (README, "Spend and limits").

use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

/// `POST /v1/budgets` (`keyward budget set`): replaces the budget of the same scope and period.
pub use crate::governance::BudgetSet as NewBudget;

/// A budget with its spend in the current period.
pub use crate::governance::BudgetStatus as Budget;

/// `POST /v1/limits` (`keyward limit set`): replaces the limit of the same scope.
pub use crate::governance::LimitSet as NewLimit;

/// A rate limit with this minute's use.
pub use crate::governance::LimitStatus as Limit;

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

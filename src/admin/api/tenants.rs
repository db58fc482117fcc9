//! `/v1/tenants`: create and list tenants.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// `POST /v1/tenants` (`keyward tenant add`).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewTenant {
    /// Tenant name: 1–64 characters from `A-Z a-z 0-9 - _ .`.
    #[schema(pattern = "^[A-Za-z0-9._-]{1,64}$", example = "acme")]
    pub name: String,
    /// Refuse or flag keys older than this many seconds.
    #[serde(default)]
    pub max_key_age_s: Option<u64>,
    /// What happens to keys past `max_key_age_s` (default `deny`).
    #[serde(default)]
    pub on_expiry: Option<OnExpiry>,
    /// Default overlap after a rotation, seconds (default 86400).
    #[serde(default)]
    pub rotation_overlap_s: Option<u64>,
}

/// A tenant's policy for keys past its maximum age.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum OnExpiry {
    /// Refuse requests whose only matching keys are too old (`policy_violation`).
    Deny,
    /// Serve them and flag them.
    Warn,
}

impl OnExpiry {
    /// `deny` or `warn`.
    pub fn as_str(self) -> &'static str {
        match self {
            OnExpiry::Deny => "deny",
            OnExpiry::Warn => "warn",
        }
    }
}

/// A tenant as `GET /v1/tenants` lists it and `POST /v1/tenants` returns it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Tenant {
    /// Tenant id (`ten_…`).
    pub id: String,
    /// Tenant name.
    pub name: String,
    /// Maximum key age as a duration (`90d`), if set.
    pub max_key_age: Option<String>,
    /// `deny` or `warn`.
    pub on_expiry: String,
    /// Default rotation overlap as a duration (`24h`).
    pub rotation_overlap: String,
    /// Creation time, RFC 3339 UTC.
    pub created_at: String,
}

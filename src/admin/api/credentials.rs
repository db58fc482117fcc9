//! `/v1/credentials`: provider keys — add, list, rotate, revoke, delete, test.
//!
//! Secrets travel only in [`NewCredential`] and [`RotateCredential`]; every response carries
//! at most the masked preview (`sk-p…xK2m`).

use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::WireSecret;

/// `POST /v1/credentials` (`keyward cred add`): the credential's scope and its first secret.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({
    "tenant": "acme", "target": "openai", "name": "primary", "models": ["gpt-4o*"],
    "secret": "sk-proj-Example0000000000000000000000000000"
}))]
pub struct NewCredential {
    /// Tenant name.
    #[schema(example = "acme")]
    pub tenant: String,
    /// Target name (`openai`, `anthropic`, … or a custom target).
    #[schema(example = "openai")]
    pub target: String,
    /// Credential name, unique in the tenant: 1–64 characters from `A-Z a-z 0-9 - _ .`.
    #[schema(pattern = "^[A-Za-z0-9._-]{1,64}$", example = "main")]
    pub name: String,
    /// Allowed model globs (empty: any).
    #[serde(default)]
    pub models: Vec<String>,
    /// Allowed capabilities (empty: any).
    #[serde(default)]
    pub capabilities: Vec<String>,
    /// Allowed teams (empty: any).
    #[serde(default)]
    pub teams: Vec<String>,
    /// Allowed workflows (empty: any).
    #[serde(default)]
    pub workflows: Vec<String>,
    /// Priority, lower wins (default 100).
    #[serde(default)]
    pub priority: Option<i64>,
    /// Credential kind: `api-key` (default), `aws-access-key`, `aws-assume-role`,
    /// `gcp-service-account` or `azure-entra` (README, "Credential kinds").
    #[serde(default)]
    #[schema(example = "api-key")]
    pub kind: Option<String>,
    /// The provider key, or the kind's JSON document.
    #[schema(example = "sk-proj-Example0000000000000000000000000000")]
    pub secret: WireSecret,
}

/// What `POST /v1/credentials` returns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct CredentialCreated {
    /// Credential id (`cred_…`).
    pub id: String,
    /// Always 1.
    pub version: u32,
    /// Masked preview: the first 4 and last 4 characters.
    pub preview: String,
    /// Tenant name.
    pub tenant: String,
    /// Target name.
    pub target: String,
    /// Credential name.
    pub name: String,
    /// Credential kind (`api-key`, …).
    pub kind: String,
}

/// Query of `GET /v1/credentials`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct CredentialFilter {
    /// Only this tenant.
    #[serde(default)]
    pub tenant: Option<String>,
}

/// One version of a credential, as `GET /v1/credentials` lists it (newest version first).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct CredentialVersion {
    /// Credential id.
    pub id: String,
    /// Tenant name.
    pub tenant: String,
    /// Target name.
    pub target: String,
    /// Credential kind (`api-key`, …).
    pub kind: String,
    /// Credential name.
    pub name: String,
    /// Version number, from 1.
    pub version: u32,
    /// Masked preview.
    pub preview: String,
    /// `current`, `overlapping`, `quarantined`, `cooling_down`, `expired`, `revoked` or
    /// `retired`: what takes the version out of service wins.
    pub state: String,
    /// Until when `state` lasts, RFC 3339 UTC (overlap, quarantine, cooldown).
    pub until: Option<String>,
    /// The version's place in the rotation: `current`, `overlapping`, `retired`, `revoked`.
    pub lifecycle: String,
    /// End of the overlap window, for an overlapping version.
    pub overlap_until: Option<String>,
    /// Older than the tenant's maximum key age.
    pub expired: bool,
    /// Priority, lower wins.
    pub priority: i64,
    /// When this version was added, RFC 3339 UTC.
    pub created_at: String,
    /// Age of this version as a duration (`3d`).
    pub age: String,
    /// The scope as text: `any`, or `models=… capabilities=… teams=… workflows=…`.
    pub scope: String,
}

/// `POST /v1/credentials/{id}/rotate` (`keyward cred rotate`).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({
    "overlap_s": 3600, "secret": "sk-proj-Rotated0000000000000000000000000000"
}))]
pub struct RotateCredential {
    /// How long the previous version stays valid, seconds (default: the tenant's overlap).
    #[serde(default)]
    pub overlap_s: Option<u64>,
    /// The new provider key.
    #[schema(example = "sk-proj-Rotated0000000000000000000000000000")]
    pub secret: WireSecret,
}

/// What `POST /v1/credentials/{id}/rotate` returns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct CredentialRotated {
    /// Credential id.
    pub id: String,
    /// The new version.
    pub version: u32,
    /// The new version's masked preview.
    pub preview: String,
    /// Until when the previous versions stay valid, RFC 3339 UTC.
    pub overlap_until: String,
}

/// `POST /v1/credentials/{id}/revoke` (`keyward cred revoke`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RevokeCredential {
    /// Only this version (default: all).
    #[serde(default)]
    pub version: Option<u32>,
}

/// What `POST /v1/credentials/{id}/revoke` returns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct CredentialRevoked {
    /// Credential id.
    pub id: String,
    /// The versions revoked now.
    pub revoked_versions: Vec<u32>,
}

/// What `DELETE /v1/credentials/{id}` returns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct CredentialDeleted {
    /// Credential id.
    pub id: String,
    /// Always true: the wrapped data keys are destroyed.
    pub deleted: bool,
}

/// `POST /v1/credentials/{id}/test` (`keyward cred test`); the body is optional.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TestCredential {
    /// Test this version (default: the current one). It must still be able to serve: current,
    /// or overlapping after a rotation.
    #[serde(default)]
    pub version: Option<u32>,
}

/// What `POST /v1/credentials/{id}/test` returns: the outcome of one read-only call to the
/// target (its models list, or the family's equivalent) made with this one credential version
/// through the data plane, audited like any app call (README, "Testing a credential"). Says
/// nothing of the key beyond its masked preview, and nothing of the provider's answer beyond
/// its status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct CredentialTested {
    /// Credential id.
    pub id: String,
    /// The version that made the call (no other is tried).
    pub version: u32,
    /// That version's masked preview.
    pub preview: String,
    /// Target name.
    pub target: String,
    /// Method and provider path called, e.g. `GET /v1/models`.
    pub request: String,
    /// The provider's HTTP status; absent when keyward answered itself (see `error`).
    pub status: Option<u16>,
    /// Why keyward answered itself (`upstream_unreachable`, `budget_exceeded`, …), when it did.
    pub error: Option<String>,
    /// keyward's message for `error`.
    pub error_message: Option<String>,
    /// Time until the response head arrived, milliseconds.
    pub latency_ms: u64,
    /// The audit call id of the call (`keyward audit query --call-id`).
    pub call_id: Option<String>,
    /// True when the provider accepted the key (a 2xx answer).
    pub ok: bool,
    /// What the outcome means and what to do about it.
    pub verdict: String,
}

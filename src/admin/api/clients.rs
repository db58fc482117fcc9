//! `/v1/clients`: applications and their tokens.

use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

/// `POST /v1/clients` (`keyward client add`).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewClient {
    /// Tenant name.
    #[schema(example = "acme")]
    pub tenant: String,
    /// Client name, unique in the tenant: 1–64 characters from `A-Z a-z 0-9 - _ .`.
    #[schema(pattern = "^[A-Za-z0-9._-]{1,64}$", example = "app")]
    pub name: String,
    /// Team.
    #[serde(default)]
    pub team: Option<String>,
    /// Bind the client to this socket peer uid.
    #[serde(default)]
    pub uid: Option<u32>,
    /// Allowed workflows (empty: any).
    #[serde(default)]
    pub workflows: Vec<String>,
}

/// What `POST /v1/clients` returns: the client and its token, shown this once (only a hash of
/// it is kept).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ClientCreated {
    /// Client id (`cli_…`).
    pub id: String,
    /// Tenant name.
    pub tenant: String,
    /// Client name.
    pub name: String,
    /// Team.
    pub team: Option<String>,
    /// Bound uid.
    pub uid: Option<u32>,
    /// The client token (`kw_…`); not retrievable later.
    pub token: String,
}

/// A client as `GET /v1/clients` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Client {
    /// Client id.
    pub id: String,
    /// Tenant name.
    pub tenant: Option<String>,
    /// Client name.
    pub name: String,
    /// Team.
    pub team: Option<String>,
    /// Bound uid.
    pub uid: Option<u32>,
    /// Allowed workflows (empty: any).
    pub workflows: Vec<String>,
    /// `active` or `revoked`.
    pub state: String,
    /// Creation time, RFC 3339 UTC.
    pub created_at: String,
}

/// Query of `GET /v1/clients`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ClientFilter {
    /// Only this tenant.
    #[serde(default)]
    pub tenant: Option<String>,
}

/// What `POST /v1/clients/{id}/revoke` returns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ClientRevoked {
    /// Client id.
    pub id: String,
    /// Always true.
    pub revoked: bool,
}

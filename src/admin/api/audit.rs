//! `/v1/audit/...`: query, verify, credential lifecycle, export state.

use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

/// Filters of `GET /v1/audit/events` (query string) and `POST /v1/audit/search` (body).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct AuditQuery {
    /// Tenant name.
    #[serde(default)]
    pub tenant: Option<String>,
    /// Credential id.
    #[serde(default)]
    pub credential: Option<String>,
    /// Client id.
    #[serde(default)]
    pub client: Option<String>,
    /// Call id.
    #[serde(default)]
    pub call_id: Option<String>,
    /// Event name, e.g. `request.resolved`.
    #[serde(default)]
    pub event: Option<String>,
    /// From this time, Unix seconds.
    #[serde(default)]
    pub since: Option<i64>,
    /// Up to this time, Unix seconds.
    #[serde(default)]
    pub until: Option<i64>,
    /// Maximum rows, newest first (default 100).
    #[serde(default)]
    pub limit: Option<usize>,
    /// Hex of a payload: only the calls whose request fingerprint matches it (needs `tenant`).
    /// Only in the body of `POST /v1/audit/search`.
    #[serde(default)]
    #[param(ignore)]
    pub payload_hex: Option<String>,
}

/// One audit row: the audit module's own row type, so the API cannot drift from what is stored.
pub use crate::audit::Row as AuditRow;

/// What `GET /v1/audit/verify` returns (`keyward audit verify`). A broken chain is a
/// successful answer with `ok: false`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct VerifyReport {
    /// True when every row verified and the anchor matches.
    pub ok: bool,
    /// Rows read and checked.
    pub rows_checked: u64,
    /// The first row that failed, when one is to blame.
    pub first_bad_seq: Option<u64>,
    /// Why verification failed; absent when it passed.
    pub reason: Option<String>,
    /// The last seq in the database.
    pub last_seq: u64,
    /// Rows up to this seq were pruned by retention (0 if none).
    pub checkpoint_seq: u64,
    /// The seq recorded in the anchor file.
    pub anchored_seq: u64,
}

impl From<crate::audit::VerifyReport> for VerifyReport {
    fn from(r: crate::audit::VerifyReport) -> VerifyReport {
        VerifyReport {
            ok: r.ok(),
            rows_checked: r.rows_checked,
            first_bad_seq: r.first_bad_seq,
            reason: r.reason,
            last_seq: r.last_seq,
            checkpoint_seq: r.checkpoint_seq,
            anchored_seq: r.anchored_seq,
        }
    }
}

/// What `GET /v1/audit/export` returns: whether `audit_export` is on, and its state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct AuditExport {
    /// True when committed rows are shipped as JSON lines.
    pub enabled: bool,
    /// The shipper's state (`sink`, `written_seq`, `waiting_bytes`, `buffer_bytes`, `error`).
    #[schema(value_type = Option<Object>)]
    pub status: Option<serde_json::Value>,
}

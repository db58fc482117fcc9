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

/// One audit row (README, "Audit"): its place in the chain, its time, the event and its
/// fields (absent fields are omitted), and the chain MAC.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct AuditRow {
    /// Position in the chain, from 1, contiguous.
    pub seq: u64,
    /// When the row was recorded, RFC 3339 UTC with milliseconds.
    pub time: String,
    /// The same instant, milliseconds since the Unix epoch.
    pub time_ms: i64,
    /// The event, e.g. `credential.created`, `request.completed`.
    pub event: String,
    /// The request's call id (also returned to the app).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub call_id: Option<String>,
    /// Tenant name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// Client id (never its token).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    /// Peer uid from the socket's credentials.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_uid: Option<u32>,
    /// Peer pid from the socket's credentials.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_pid: Option<u32>,
    /// Target name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// Model the request asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Capability (`chat`, `embeddings`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capability: Option<String>,
    /// Team of the client.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub team: Option<String>,
    /// Workflow named by the request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workflow: Option<String>,
    /// Credential id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential_id: Option<String>,
    /// Credential version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential_version: Option<u32>,
    /// Request fingerprint: lowercase hex HMAC-SHA256 of the body under the tenant's
    /// fingerprint key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
    /// HTTP status the upstream answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream_status: Option<u16>,
    /// Time from accept to the end of the response, milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<u64>,
    /// Request body bytes sent upstream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_in: Option<u64>,
    /// Response body bytes returned to the app.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_out: Option<u64>,
    /// Every prompt token the provider reported, cached or not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_tokens: Option<u64>,
    /// Completion tokens the provider reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_tokens: Option<u64>,
    /// Total tokens the provider reported (or input + output).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_tokens: Option<u64>,
    /// Short reason, e.g. a denial code.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// Markers such as `expired_key_warn`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub flags: Vec<String>,
    /// The part of `input_tokens` read from the provider's prompt cache.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cached_input_tokens: Option<u64>,
    /// The part of `input_tokens` written to the provider's prompt cache.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_write_tokens: Option<u64>,
    /// What the call cost at the configured prices, micro-USD.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost_micros: Option<u64>,
    /// The chain MAC, lowercase hex.
    pub mac: String,
}

impl From<crate::audit::Row> for AuditRow {
    fn from(row: crate::audit::Row) -> AuditRow {
        let e = row.event;
        AuditRow {
            seq: row.seq,
            time: row.time,
            time_ms: row.time_ms,
            event: e.kind.as_str().to_string(),
            call_id: e.call_id,
            tenant: e.tenant,
            client_id: e.client_id,
            peer_uid: e.peer_uid,
            peer_pid: e.peer_pid,
            target: e.target,
            model: e.model,
            capability: e.capability,
            team: e.team,
            workflow: e.workflow,
            credential_id: e.credential_id,
            credential_version: e.credential_version,
            fingerprint: e.fingerprint,
            upstream_status: e.upstream_status,
            latency_ms: e.latency_ms,
            bytes_in: e.bytes_in,
            bytes_out: e.bytes_out,
            input_tokens: e.input_tokens,
            output_tokens: e.output_tokens,
            total_tokens: e.total_tokens,
            detail: e.detail,
            flags: e.flags,
            cached_input_tokens: e.cached_input_tokens,
            cache_write_tokens: e.cache_write_tokens,
            cost_micros: e.cost_micros,
            mac: row.mac,
        }
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{Event, EventKind, Row};

    #[test]
    fn an_audit_row_reads_as_the_stored_rows_json() {
        let event = Event {
            call_id: Some("c".into()),
            tenant: Some("t".into()),
            client_id: Some("cli".into()),
            peer_uid: Some(1),
            peer_pid: Some(2),
            target: Some("openai".into()),
            model: Some("m".into()),
            capability: Some("chat".into()),
            team: Some("team".into()),
            workflow: Some("wf".into()),
            credential_id: Some("cred".into()),
            credential_version: Some(3),
            fingerprint: Some("ab".into()),
            upstream_status: Some(200),
            latency_ms: Some(4),
            bytes_in: Some(5),
            bytes_out: Some(6),
            input_tokens: Some(7),
            output_tokens: Some(8),
            total_tokens: Some(15),
            detail: Some("d".into()),
            flags: vec!["f".into()],
            cached_input_tokens: Some(1),
            cache_write_tokens: Some(2),
            cost_micros: Some(9),
            ..Event::new(EventKind::RequestCompleted)
        };
        let row = Row {
            seq: 1,
            time: "2026-01-01T00:00:00.000Z".into(),
            time_ms: 1,
            event: event.clone(),
            mac: "00".into(),
        };
        // Every field of the stored row survives, under the same name.
        let stored = serde_json::to_value(&row).unwrap();
        assert_eq!(serde_json::to_value(AuditRow::from(row)).unwrap(), stored);
        let sparse = Row {
            seq: 2,
            time: "t".into(),
            time_ms: 2,
            event: Event::new(EventKind::TenantCreated),
            mac: "01".into(),
        };
        let stored = serde_json::to_value(&sparse).unwrap();
        assert_eq!(
            serde_json::to_value(AuditRow::from(sparse)).unwrap(),
            stored
        );
    }
}

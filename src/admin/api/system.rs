//! The daemon as a whole: `/v1/status`, `/v1/reload`, `/v1/bundle`, `/v1/spend`, `/v1/prices`
//! (and `/v1/metrics`, which answers Prometheus text rather than JSON).

use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

/// What `GET /v1/status` returns (`keyward status`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Status {
    /// keyward's version.
    pub version: String,
    /// The daemon's process id.
    pub pid: u32,
    /// Seconds since start.
    pub uptime_s: u64,
    /// State directory.
    pub state_dir: String,
    /// Data socket.
    pub socket: String,
    /// Admin socket.
    pub admin_socket: String,
    /// TCP listener of the data plane, if any.
    pub listen_tcp: Option<String>,
    /// Tenants.
    pub tenants: usize,
    /// Active clients.
    pub clients: usize,
    /// Credentials.
    pub credentials: usize,
    /// How memory is locked (`all`, `secret pages`, …).
    pub memory_lock: String,
    /// Where the master key comes from (never key bytes).
    pub master_key_source: String,
    /// The master key's provider (`file`, `aws-kms`, `pkcs11`, …).
    pub master_key_provider: String,
    /// Wrap and unwrap operations asked of the master key's provider.
    pub kek_operations: u64,
    /// This keyward's instance id.
    pub instance: String,
    /// The state of `audit_export`, when it is on.
    #[schema(value_type = Option<Object>)]
    pub audit_export: Option<serde_json::Value>,
    /// The bundle served, when this keyward serves one.
    #[schema(value_type = Option<Object>)]
    pub bundle: Option<serde_json::Value>,
    /// Data-plane requests in flight.
    pub in_flight: usize,
    /// Open data-plane connections.
    pub connections: usize,
    /// Most data-plane connections at once.
    pub max_connections: usize,
    /// Request-body bytes held by the data plane now.
    pub buffered_body_bytes: u64,
    /// Store accesses since start.
    pub store_accesses: u64,
    /// Where the budget and rate counters are (`local` or the Redis URL), whether Redis
    /// answers and how many charges wait for it.
    #[schema(value_type = Object)]
    pub governance: serde_json::Value,
}

/// What `POST /v1/reload` returns (`keyward reload`); an invalid file is a 400 and changes
/// nothing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Reloaded {
    /// The file read, or `(defaults)`.
    pub file: String,
    /// Reloadable sections whose value changed and now apply (`targets`, `limits`, `pool`, …).
    pub changed: Vec<String>,
    /// Keys that changed in the file but need a restart; their running values stay.
    pub restart_needed: Vec<String>,
}

/// `POST /v1/bundle` (`keyward bundle export`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExportBundle {
    /// Tenant names to include (empty: every tenant).
    #[serde(default)]
    pub tenants: Vec<String>,
}

/// What `POST /v1/bundle` returns: the sealed bundle (ciphertext only) and what is in it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Bundle {
    /// The bundle file's text.
    pub text: String,
    /// Its serial.
    pub serial: u64,
    /// Tenants in it.
    pub tenants: usize,
    /// Clients in it (revoked ones included).
    pub clients: usize,
    /// Credentials in it.
    pub credentials: usize,
}

/// The dimension `GET /v1/spend` groups by: the audit module's own, so the API cannot drift.
pub use crate::audit::SpendBy;

/// Query of `GET /v1/spend` (`keyward spend`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct SpendFilter {
    /// Only this tenant.
    #[serde(default)]
    pub tenant: Option<String>,
    /// Group by (default `tenant`).
    #[serde(default)]
    pub by: SpendBy,
    /// From this time, Unix seconds.
    #[serde(default)]
    pub since: Option<i64>,
    /// Up to this time, Unix seconds.
    #[serde(default)]
    pub until: Option<i64>,
}

/// One group of `GET /v1/spend`: the group's value under the dimension's own name (only that
/// one of `tenant` … `day` is present), then sums over its completed calls.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SpendRow {
    /// Tenant name (grouped by tenant).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// Team (grouped by team).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub team: Option<String>,
    /// Client id (grouped by client).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client: Option<String>,
    /// Credential id (grouped by credential).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential: Option<String>,
    /// Model (grouped by model).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// UTC day (grouped by day).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub day: Option<String>,
    /// Completed calls.
    pub calls: u64,
    /// Input tokens (all prompt tokens).
    pub input_tokens: u64,
    /// Cached input tokens.
    pub cached_input_tokens: u64,
    /// Cache-write tokens.
    pub cache_write_tokens: u64,
    /// Output tokens.
    pub output_tokens: u64,
    /// Cost of the priced calls, micro-USD.
    pub cost_micros: u64,
    /// Calls without a price (their cost is not in `cost_micros`).
    pub unpriced_calls: u64,
}

impl SpendRow {
    /// The row of `group` under dimension `by`.
    pub fn of(by: SpendBy, group: crate::audit::SpendRow) -> SpendRow {
        let key = Some(group.key);
        let mut row = SpendRow {
            calls: group.calls,
            input_tokens: group.input_tokens,
            cached_input_tokens: group.cached_input_tokens,
            cache_write_tokens: group.cache_write_tokens,
            output_tokens: group.output_tokens,
            cost_micros: group.cost_micros,
            unpriced_calls: group.unpriced_calls,
            ..SpendRow::default()
        };
        match by {
            SpendBy::Tenant => row.tenant = key,
            SpendBy::Team => row.team = key,
            SpendBy::Client => row.client = key,
            SpendBy::Credential => row.credential = key,
            SpendBy::Model => row.model = key,
            SpendBy::Day => row.day = key,
        }
        row
    }
}

/// Query of `GET /v1/prices` (`keyward prices`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct PriceFilter {
    /// Only this target.
    #[serde(default)]
    pub target: Option<String>,
}

/// One row of the price table in effect, USD per million tokens.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Price {
    /// Target name.
    pub target: String,
    /// Model glob.
    pub model: String,
    /// Uncached input.
    pub input: f64,
    /// Input read from the prompt cache.
    pub cached_input: f64,
    /// Input written to the prompt cache.
    pub cache_write: f64,
    /// Output.
    pub output: f64,
    /// When the figures were taken (`YYYY-MM-DD`), if known.
    pub as_of: Option<String>,
    /// `shipped` or `config`.
    pub source: String,
}

impl From<&crate::prices::Price> for Price {
    fn from(p: &crate::prices::Price) -> Price {
        let usd = |pico: u64| pico as f64 / 1e6;
        Price {
            target: p.target.clone(),
            model: p.model.clone(),
            input: usd(p.input),
            cached_input: usd(p.cached_input),
            cache_write: usd(p.cache_write),
            output: usd(p.output),
            as_of: p.as_of.clone(),
            source: p.source.to_string(),
        }
    }
}

//! The admin API's wire types, shared by the daemon (which serves them) and the CLI (which
//! sends and reads them): one file per resource, the error shape, and the path router.
//!
//! Everything here is plain data with no I/O, so the server, the CLI, the OpenAPI document and
//! the fuzz target all read the same definitions. A secret appears only in request types
//! ([`WireSecret`]); no response type has a field that could hold one — the masked preview is
//! the most a response says about a key.

pub mod audit;
pub mod clients;
pub mod credentials;
pub mod governance;
pub mod system;
pub mod tenants;

use std::fmt;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::seal::Secret;

/// Largest request body the admin API accepts, bytes (a payload for a fingerprint search can
/// be large).
pub const MAX_REQUEST_BODY: usize = 64 << 20;

/// A secret in transit from the CLI to the daemon: a JSON string, deserialized straight into
/// locked memory; prints as `[REDACTED]`. Only request bodies carry one.
pub struct WireSecret(pub Secret);

impl fmt::Debug for WireSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[REDACTED]")
    }
}

impl Serialize for WireSecret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        // The CLI needs the text on the wire to hand it to the daemon; it zeroizes the buffer
        // it serializes into.
        let text =
            std::str::from_utf8(self.0.expose_secret()).map_err(serde::ser::Error::custom)?;
        s.serialize_str(text)
    }
}

impl<'de> Deserialize<'de> for WireSecret {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = WireSecret;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a secret string")
            }
            fn visit_str<E>(self, v: &str) -> Result<WireSecret, E> {
                Ok(WireSecret(Secret::from_slice(v.as_bytes())))
            }
            fn visit_string<E>(self, v: String) -> Result<WireSecret, E> {
                Ok(WireSecret(Secret::from_vec(v.into_bytes())))
            }
        }
        d.deserialize_str(V)
    }
}

impl utoipa::PartialSchema for WireSecret {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        utoipa::openapi::ObjectBuilder::new()
            .schema_type(utoipa::openapi::schema::Type::String)
            .format(Some(utoipa::openapi::SchemaFormat::KnownFormat(
                utoipa::openapi::KnownFormat::Password,
            )))
            .min_length(Some(1))
            .max_length(Some(16384))
            .description(Some(
                "A provider key (printable ASCII, no spaces, at most 8192 bytes) or, for the \
                 document kinds, their JSON document as a string. Sent only in request bodies; \
                 no response ever returns it.",
            ))
            .into()
    }
}

impl ToSchema for WireSecret {}

// === errors ===

/// The codes of errors the admin API answers with; each has one HTTP status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ErrorCode {
    /// 400: the request is malformed or a value is invalid.
    BadRequest,
    /// 403: the peer uid may not use the admin socket.
    Forbidden,
    /// 404: no such resource or path.
    NotFound,
    /// 405: the path exists but not with this method.
    MethodNotAllowed,
    /// 409: the change conflicts with the current state (a taken name, a revoked credential,
    /// a daemon serving a read-only bundle).
    Conflict,
    /// 413: the body is larger than [`MAX_REQUEST_BODY`].
    BodyTooLarge,
    /// 415: a body that is not `application/json`.
    UnsupportedMediaType,
    /// 500: keyward failed (the database, the master key's provider).
    Internal,
    /// 503: the audit record could not be committed, so nothing changed.
    AuditUnavailable,
    /// 503: too many admin connections at once.
    Overloaded,
}

impl ErrorCode {
    /// The HTTP status this code is answered with.
    pub fn status(self) -> u16 {
        match self {
            ErrorCode::BadRequest => 400,
            ErrorCode::Forbidden => 403,
            ErrorCode::NotFound => 404,
            ErrorCode::MethodNotAllowed => 405,
            ErrorCode::Conflict => 409,
            ErrorCode::BodyTooLarge => 413,
            ErrorCode::UnsupportedMediaType => 415,
            ErrorCode::Internal => 500,
            ErrorCode::AuditUnavailable | ErrorCode::Overloaded => 503,
        }
    }

    /// The code's name as it appears in `keyward-error` and after `keyward.` in `type`.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::NotFound => "not_found",
            ErrorCode::MethodNotAllowed => "method_not_allowed",
            ErrorCode::Conflict => "conflict",
            ErrorCode::BodyTooLarge => "body_too_large",
            ErrorCode::UnsupportedMediaType => "unsupported_media_type",
            ErrorCode::Internal => "internal",
            ErrorCode::AuditUnavailable => "audit_unavailable",
            ErrorCode::Overloaded => "overloaded",
        }
    }
}

/// A refusal: its code and one line for the operator (never a secret or a request value
/// that could be one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// What kind of refusal (and so the HTTP status).
    pub code: ErrorCode,
    /// What was wrong and how to fix it.
    pub message: String,
}

impl ApiError {
    /// A refusal with `code`.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> ApiError {
        ApiError {
            code,
            message: message.into(),
        }
    }

    /// 400 `bad_request`.
    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(ErrorCode::BadRequest, message)
    }

    /// 404 `not_found`.
    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(ErrorCode::NotFound, message)
    }

    /// 409 `conflict`.
    pub fn conflict(message: impl Into<String>) -> ApiError {
        ApiError::new(ErrorCode::Conflict, message)
    }

    /// 500 `internal`.
    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(ErrorCode::Internal, message)
    }

    /// The body answered with it.
    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            error: ErrorDetail {
                kind: format!("keyward.{}", self.code.as_str()),
                message: self.message.clone(),
                call_id: None,
            },
        }
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ApiError {}

/// Every error body, in the data plane's shape:
/// `{"error":{"type":"keyward.<code>","message":"..."}}`, with header `keyward-error: <code>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// The inside of [`ErrorBody`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ErrorDetail {
    /// `keyward.` and the code, e.g. `keyward.not_found`.
    #[serde(rename = "type")]
    pub kind: String,
    /// What was wrong and how to fix it.
    pub message: String,
    /// The audit call id, when the refusal was audited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub call_id: Option<String>,
}

// === routes ===

/// HTTP methods the admin API uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// Read.
    Get,
    /// Create or act.
    Post,
    /// Delete.
    Delete,
}

/// One operation of the admin API: what a (method, path) pair names. Path parameters are
/// checked ids (see [`route`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// `GET /v1/status`.
    Status,
    /// `GET /v1/metrics`: Prometheus text.
    Metrics,
    /// `POST /v1/reload`.
    Reload,
    /// `GET /v1/openapi.json`.
    OpenApi,
    /// `GET /v1/tenants`.
    ListTenants,
    /// `POST /v1/tenants`.
    CreateTenant,
    /// `GET /v1/credentials`.
    ListCredentials,
    /// `POST /v1/credentials`.
    CreateCredential,
    /// `POST /v1/credentials/{id}/rotate`.
    RotateCredential(String),
    /// `POST /v1/credentials/{id}/revoke`.
    RevokeCredential(String),
    /// `DELETE /v1/credentials/{id}`.
    DeleteCredential(String),
    /// `POST /v1/credentials/{id}/test`.
    TestCredential(String),
    /// `GET /v1/clients`.
    ListClients,
    /// `POST /v1/clients`.
    CreateClient,
    /// `POST /v1/clients/{id}/revoke`.
    RevokeClient(String),
    /// `GET /v1/audit/events`: filters in the query string.
    AuditEvents,
    /// `POST /v1/audit/search`: filters (and a payload to fingerprint) in the body.
    AuditSearch,
    /// `GET /v1/audit/verify`.
    AuditVerify,
    /// `GET /v1/audit/lifecycle/{credential id}`.
    AuditLifecycle(String),
    /// `GET /v1/audit/export`: the state of `audit_export`.
    AuditExport,
    /// `POST /v1/bundle`.
    ExportBundle,
    /// `GET /v1/spend`.
    Spend,
    /// `GET /v1/prices`.
    Prices,
    /// `GET /v1/budgets`.
    ListBudgets,
    /// `POST /v1/budgets`.
    SetBudget,
    /// `DELETE /v1/budgets/{id}`.
    DeleteBudget(String),
    /// `GET /v1/limits`.
    ListLimits,
    /// `POST /v1/limits`.
    SetLimit,
    /// `DELETE /v1/limits/{id}`.
    DeleteLimit(String),
}

/// Maps a method and a path (without the query string) to a [`Route`]: 404 `not_found` for a
/// path the API does not have, 405 `method_not_allowed` for one it has with other methods. An
/// id in a path is 1–128 characters from `A-Z a-z 0-9 - _ .` (no percent-encoding: ids never
/// need it).
pub fn route(method: Method, path: &str) -> Result<Route, ApiError> {
    use Method::{Delete, Get, Post};
    let rest = path
        .strip_prefix("/v1/")
        .ok_or_else(|| unknown_path(path))?;
    let segments: Vec<&str> = rest.split('/').collect();
    let id = |s: &str| -> Result<String, ApiError> {
        let ok = !s.is_empty()
            && s.len() <= 128
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
            && s != "."
            && s != "..";
        if ok {
            Ok(s.to_string())
        } else {
            Err(unknown_path(path))
        }
    };
    let (found, allowed): (Option<Route>, &'static str) = match segments.as_slice() {
        ["status"] => (matches!(method, Get).then_some(Route::Status), "GET"),
        ["metrics"] => (matches!(method, Get).then_some(Route::Metrics), "GET"),
        ["reload"] => (matches!(method, Post).then_some(Route::Reload), "POST"),
        ["openapi.json"] => (matches!(method, Get).then_some(Route::OpenApi), "GET"),
        ["tenants"] => (
            match method {
                Get => Some(Route::ListTenants),
                Post => Some(Route::CreateTenant),
                Delete => None,
            },
            "GET, POST",
        ),
        ["credentials"] => (
            match method {
                Get => Some(Route::ListCredentials),
                Post => Some(Route::CreateCredential),
                Delete => None,
            },
            "GET, POST",
        ),
        ["credentials", cred] => {
            let cred = id(cred)?;
            (
                matches!(method, Delete).then_some(Route::DeleteCredential(cred)),
                "DELETE",
            )
        }
        ["credentials", cred, action] => {
            let cred = id(cred)?;
            let found = match *action {
                "rotate" => Route::RotateCredential(cred),
                "revoke" => Route::RevokeCredential(cred),
                "test" => Route::TestCredential(cred),
                _ => return Err(unknown_path(path)),
            };
            (matches!(method, Post).then_some(found), "POST")
        }
        ["clients"] => (
            match method {
                Get => Some(Route::ListClients),
                Post => Some(Route::CreateClient),
                Delete => None,
            },
            "GET, POST",
        ),
        ["clients", client, "revoke"] => {
            let client = id(client)?;
            (
                matches!(method, Post).then_some(Route::RevokeClient(client)),
                "POST",
            )
        }
        ["audit", "events"] => (matches!(method, Get).then_some(Route::AuditEvents), "GET"),
        ["audit", "search"] => (matches!(method, Post).then_some(Route::AuditSearch), "POST"),
        ["audit", "verify"] => (matches!(method, Get).then_some(Route::AuditVerify), "GET"),
        ["audit", "export"] => (matches!(method, Get).then_some(Route::AuditExport), "GET"),
        ["audit", "lifecycle", cred] => {
            let cred = id(cred)?;
            (
                matches!(method, Get).then_some(Route::AuditLifecycle(cred)),
                "GET",
            )
        }
        ["bundle"] => (
            matches!(method, Post).then_some(Route::ExportBundle),
            "POST",
        ),
        ["spend"] => (matches!(method, Get).then_some(Route::Spend), "GET"),
        ["prices"] => (matches!(method, Get).then_some(Route::Prices), "GET"),
        ["budgets"] => (
            match method {
                Get => Some(Route::ListBudgets),
                Post => Some(Route::SetBudget),
                Delete => None,
            },
            "GET, POST",
        ),
        ["budgets", budget] => {
            let budget = id(budget)?;
            (
                matches!(method, Delete).then_some(Route::DeleteBudget(budget)),
                "DELETE",
            )
        }
        ["limits"] => (
            match method {
                Get => Some(Route::ListLimits),
                Post => Some(Route::SetLimit),
                Delete => None,
            },
            "GET, POST",
        ),
        ["limits", limit] => {
            let limit = id(limit)?;
            (
                matches!(method, Delete).then_some(Route::DeleteLimit(limit)),
                "DELETE",
            )
        }
        _ => return Err(unknown_path(path)),
    };
    found.ok_or_else(|| {
        ApiError::new(
            ErrorCode::MethodNotAllowed,
            format!("{path} allows only {allowed}"),
        )
    })
}

fn unknown_path(path: &str) -> ApiError {
    // The path is echoed escaped and cut short: it is the caller's own text, but need not be
    // printable.
    let shown: String = path.chars().take(200).collect();
    ApiError::not_found(format!(
        "no admin API resource at {}; see GET /v1/openapi.json for the paths",
        shown.escape_debug()
    ))
}

/// Decodes a JSON request body into `T` without serde's own message, which for a value of the
/// wrong type quotes the value (it may be a provider key sent to the wrong field).
pub fn parse_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| malformed(&e, "body"))
}

/// Decodes a query string (without the `?`) into `T`; an unknown or mistyped parameter is a
/// 400 that names no value.
pub fn parse_query<T: serde::de::DeserializeOwned>(query: &str) -> Result<T, ApiError> {
    serde_urlencoded::from_str(query).map_err(|_| {
        ApiError::bad_request(
            "malformed query string: an unknown parameter or a value of the wrong type; see \
             GET /v1/openapi.json for the parameters",
        )
    })
}

fn malformed(e: &serde_json::Error, what: &str) -> ApiError {
    use serde_json::error::Category;
    let why = match e.classify() {
        Category::Syntax | Category::Eof | Category::Io => "not valid JSON",
        Category::Data => {
            "not a request this API knows (a missing or unknown field, or a value of the wrong \
             type)"
        }
    };
    let at = match e.line() {
        0 => String::new(),
        line => format!(" at line {line} column {}", e.column()),
    };
    ApiError::bad_request(format!(
        "malformed request {what}: {why}{at}; are the CLI and the daemon the same version? \
         (see GET /v1/openapi.json)"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_name_their_operation_and_refuse_other_methods() {
        assert_eq!(route(Method::Get, "/v1/tenants"), Ok(Route::ListTenants));
        assert_eq!(route(Method::Post, "/v1/tenants"), Ok(Route::CreateTenant));
        assert_eq!(
            route(Method::Post, "/v1/credentials/cred_abc/rotate"),
            Ok(Route::RotateCredential("cred_abc".into()))
        );
        assert_eq!(
            route(Method::Post, "/v1/credentials/cred_abc/test"),
            Ok(Route::TestCredential("cred_abc".into()))
        );
        assert_eq!(
            route(Method::Delete, "/v1/credentials/cred_abc"),
            Ok(Route::DeleteCredential("cred_abc".into()))
        );
        assert_eq!(
            route(Method::Get, "/v1/audit/lifecycle/cred_1"),
            Ok(Route::AuditLifecycle("cred_1".into()))
        );
        let e = route(Method::Delete, "/v1/tenants").unwrap_err();
        assert_eq!(e.code, ErrorCode::MethodNotAllowed);
        assert!(e.message.contains("GET, POST"), "{}", e.message);
        for bad in [
            "/v1/credentials/../rotate",
            "/v1/credentials/%2e%2e/rotate",
            "/v1/credentials//rotate",
            "/v1/credentials/a/b/c",
            "/v1/credentials/a/unknown",
            "/v2/tenants",
            "/v1/tenants/",
            "",
            "/v1/",
        ] {
            let e = route(Method::Post, bad).unwrap_err();
            assert_eq!(e.code, ErrorCode::NotFound, "{bad}");
        }
    }

    #[test]
    fn a_mistyped_body_is_refused_without_quoting_its_values() {
        let key = "sk-this-is-not-a-number-0123456789";
        let body = format!(r#"{{"name":"t","max_key_age_s":"{key}"}}"#);
        let e = parse_body::<tenants::NewTenant>(body.as_bytes()).unwrap_err();
        assert_eq!(e.code, ErrorCode::BadRequest);
        assert!(!e.message.contains(key), "{}", e.message);
        assert!(e.message.contains("wrong type"), "{}", e.message);
        let e = parse_body::<tenants::NewTenant>(b"{\"name\": tenant}").unwrap_err();
        assert!(
            e.message.contains("not valid JSON at line 1 column"),
            "{}",
            e.message
        );
    }

    #[test]
    fn error_bodies_have_the_data_planes_shape() {
        let e = ApiError::not_found("no such credential");
        let v = serde_json::to_value(e.body()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "error": {"type": "keyward.not_found", "message": "no such credential"}
            })
        );
        assert_eq!(e.code.status(), 404);
    }
}

//! The error contract of the data plane (README, "How applications connect"): the closed set of
//! codes keyward itself answers with, their HTTP statuses, and the one function that renders them.
//!
//! Every keyward-made error response goes through [`error_response`], so the header
//! `keyward-error`, the JSON shape and the call id are uniform. This module must not decide
//! *when* an error happens, and a message passed to it must never contain a secret, a client
//! token or a request payload: it is sent to the app verbatim.

use bytes::Bytes;
use http::{HeaderValue, StatusCode, header};
use http_body_util::{BodyExt, Full};

use super::upstream::UpstreamBody;

/// Header naming the keyward error code on every response keyward itself produced.
pub const ERROR_HEADER: &str = "keyward-error";
/// Header carrying the audit call id.
pub const CALL_ID_HEADER: &str = "keyward-call-id";

/// A reason keyward refused or failed a request itself (as opposed to an upstream answer).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorCode {
    /// No valid client token or peer binding (401).
    Unauthenticated,
    /// No credential of the client's tenant allows this request (403).
    ScopeDenied,
    /// The only matching keys are past the tenant's maximum key age (403).
    PolicyViolation,
    /// No such target (404).
    UnknownTarget,
    /// Malformed or steering request (400).
    BadRequest,
    /// Request body over `max_request_body` (413).
    BodyTooLarge,
    /// The audit record could not be committed; nothing was sent upstream (503).
    AuditUnavailable,
    /// Over `max_concurrent_requests` (503, with `Retry-After`).
    Overloaded,
    /// Connect or TLS failure toward the upstream (502).
    UpstreamUnreachable,
    /// The upstream did not answer in time (504).
    UpstreamTimeout,
    /// A `deny` budget of the request's scope is spent (429).
    BudgetExceeded,
    /// A rate limit of the request's scope is reached (429, with `Retry-After`).
    RateLimited,
    /// The shared budget and rate counters (Redis) are unreachable and
    /// `on_backend_error = "deny"` (503, with `Retry-After`).
    GovernanceUnavailable,
}

impl ErrorCode {
    /// Every code, for exhaustive tests and documentation.
    pub const ALL: [ErrorCode; 13] = [
        ErrorCode::Unauthenticated,
        ErrorCode::ScopeDenied,
        ErrorCode::PolicyViolation,
        ErrorCode::UnknownTarget,
        ErrorCode::BadRequest,
        ErrorCode::BodyTooLarge,
        ErrorCode::AuditUnavailable,
        ErrorCode::Overloaded,
        ErrorCode::UpstreamUnreachable,
        ErrorCode::UpstreamTimeout,
        ErrorCode::BudgetExceeded,
        ErrorCode::RateLimited,
        ErrorCode::GovernanceUnavailable,
    ];

    /// The HTTP status this code is answered with.
    pub fn status(self) -> StatusCode {
        match self {
            ErrorCode::Unauthenticated => StatusCode::UNAUTHORIZED,
            ErrorCode::ScopeDenied | ErrorCode::PolicyViolation => StatusCode::FORBIDDEN,
            ErrorCode::UnknownTarget => StatusCode::NOT_FOUND,
            ErrorCode::BadRequest => StatusCode::BAD_REQUEST,
            ErrorCode::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::AuditUnavailable | ErrorCode::Overloaded => StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::UpstreamUnreachable => StatusCode::BAD_GATEWAY,
            ErrorCode::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            ErrorCode::BudgetExceeded | ErrorCode::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            ErrorCode::GovernanceUnavailable => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The snake_case wire name (`keyward-error` header and `keyward.<code>` type).
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::Unauthenticated => "unauthenticated",
            ErrorCode::ScopeDenied => "scope_denied",
            ErrorCode::PolicyViolation => "policy_violation",
            ErrorCode::UnknownTarget => "unknown_target",
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::BodyTooLarge => "body_too_large",
            ErrorCode::AuditUnavailable => "audit_unavailable",
            ErrorCode::Overloaded => "overloaded",
            ErrorCode::UpstreamUnreachable => "upstream_unreachable",
            ErrorCode::UpstreamTimeout => "upstream_timeout",
            ErrorCode::BudgetExceeded => "budget_exceeded",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::GovernanceUnavailable => "governance_unavailable",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Renders a keyward error: status of `code`, headers `keyward-error`, `keyward-call-id`,
/// `content-type: application/json` (and `Retry-After: 1` when overloaded or the governance
/// counters are unreachable), and body
/// `{"error":{"type":"keyward.<code>","message":...,"call_id":...}}`.
pub fn error_response(
    code: ErrorCode,
    message: &str,
    call_id: &str,
) -> http::Response<UpstreamBody> {
    let body = serde_json::json!({
        "error": {
            "type": format!("keyward.{}", code.as_str()),
            "message": message,
            "call_id": call_id,
        }
    });
    let bytes = Bytes::from(body.to_string());
    let mut response =
        http::Response::new(Full::new(bytes).map_err(|never| match never {}).boxed());
    *response.status_mut() = code.status();
    let headers = response.headers_mut();
    headers.insert(ERROR_HEADER, HeaderValue::from_static(code.as_str()));
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    // A call id is a UUID we generated; should a caller ever pass something that is not a
    // valid header value, the body still carries it and the header is simply left out.
    if let Ok(value) = HeaderValue::from_str(call_id) {
        headers.insert(CALL_ID_HEADER, value);
    }
    // A rate limit's Retry-After depends on its window: the caller sets it.
    if matches!(
        code,
        ErrorCode::Overloaded | ErrorCode::GovernanceUnavailable
    ) {
        headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    response
}

/// A refusal keyward produces itself: the code, the message the app reads (never a secret),
/// and for a rate limit the seconds after which to retry.
#[derive(Debug)]
pub(crate) struct Reject {
    /// What went wrong, as one of the contract's codes.
    pub code: ErrorCode,
    /// Sent to the app verbatim: what was wrong and how to fix it.
    pub message: String,
    /// `Retry-After` seconds, for a rate limit.
    pub retry_after: Option<u64>,
}

impl Reject {
    /// A refusal with `code` and `message` and no `Retry-After`.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Reject {
        Reject {
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    /// The response the app gets: [`error_response`], plus `Retry-After` for a rate limit.
    pub fn response(&self, call_id: &str) -> http::Response<UpstreamBody> {
        let mut response = error_response(self.code, &self.message, call_id);
        if let Some(secs) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

impl From<crate::governance::Refusal> for Reject {
    fn from(r: crate::governance::Refusal) -> Reject {
        use crate::governance::Refusal;
        match r {
            Refusal::Budget(message) => Reject::new(ErrorCode::BudgetExceeded, message),
            Refusal::Rate {
                message,
                retry_after,
            } => Reject {
                retry_after: Some(retry_after),
                ..Reject::new(ErrorCode::RateLimited, message)
            },
            Refusal::Unavailable(message) => Reject::new(ErrorCode::GovernanceUnavailable, message),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn render(
        code: ErrorCode,
        message: &str,
        call_id: &str,
    ) -> (http::response::Parts, serde_json::Value) {
        let (parts, body) = error_response(code, message, call_id).into_parts();
        let bytes = body.collect().await.expect("in-memory body").to_bytes();
        let json = serde_json::from_slice(&bytes).expect("error body is JSON");
        (parts, json)
    }

    #[test]
    fn every_code_has_the_specified_status_and_name() {
        let expected = [
            (ErrorCode::Unauthenticated, 401, "unauthenticated"),
            (ErrorCode::ScopeDenied, 403, "scope_denied"),
            (ErrorCode::PolicyViolation, 403, "policy_violation"),
            (ErrorCode::UnknownTarget, 404, "unknown_target"),
            (ErrorCode::BadRequest, 400, "bad_request"),
            (ErrorCode::BodyTooLarge, 413, "body_too_large"),
            (ErrorCode::AuditUnavailable, 503, "audit_unavailable"),
            (ErrorCode::Overloaded, 503, "overloaded"),
            (ErrorCode::UpstreamUnreachable, 502, "upstream_unreachable"),
            (ErrorCode::UpstreamTimeout, 504, "upstream_timeout"),
            (ErrorCode::BudgetExceeded, 429, "budget_exceeded"),
            (ErrorCode::RateLimited, 429, "rate_limited"),
            (
                ErrorCode::GovernanceUnavailable,
                503,
                "governance_unavailable",
            ),
        ];
        assert_eq!(expected.len(), ErrorCode::ALL.len());
        for (code, status, name) in expected {
            assert_eq!(code.status().as_u16(), status, "{name}");
            assert_eq!(code.as_str(), name);
            assert_eq!(code.to_string(), name);
        }
    }

    #[tokio::test]
    async fn every_code_renders_headers_and_json_body() {
        for code in ErrorCode::ALL {
            let (parts, json) = render(code, "what went wrong", "call-123").await;
            assert_eq!(parts.status, code.status());
            assert_eq!(parts.headers[ERROR_HEADER], code.as_str());
            assert_eq!(parts.headers[CALL_ID_HEADER], "call-123");
            assert_eq!(parts.headers[header::CONTENT_TYPE], "application/json");
            assert_eq!(
                json["error"]["type"],
                format!("keyward.{}", code.as_str()),
                "{code}"
            );
            assert_eq!(json["error"]["message"], "what went wrong");
            assert_eq!(json["error"]["call_id"], "call-123");
            assert_eq!(
                parts.headers.contains_key(header::RETRY_AFTER),
                matches!(
                    code,
                    ErrorCode::Overloaded | ErrorCode::GovernanceUnavailable
                ),
                "Retry-After: 1 only on overloaded and governance_unavailable ({code})"
            );
        }
    }

    #[tokio::test]
    async fn overloaded_asks_the_client_to_retry_after_one_second() {
        let (parts, _) = render(ErrorCode::Overloaded, "busy", "c").await;
        assert_eq!(parts.status, 503);
        assert_eq!(parts.headers[header::RETRY_AFTER], "1");
    }

    #[tokio::test]
    async fn message_is_json_escaped() {
        let nasty = "quote \" backslash \\ newline \n tab \t nul \u{0} </script> ünïcode";
        let (_, json) = render(ErrorCode::BadRequest, nasty, "c").await;
        assert_eq!(json["error"]["message"], nasty);
    }

    #[tokio::test]
    async fn unusable_call_id_stays_in_body_but_not_in_header() {
        let (parts, json) = render(ErrorCode::BadRequest, "m", "bad\nid").await;
        assert!(!parts.headers.contains_key(CALL_ID_HEADER));
        assert_eq!(json["error"]["call_id"], "bad\nid");
    }
}

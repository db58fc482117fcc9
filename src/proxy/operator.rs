//! Operator test calls (`keyward cred test`, README "Testing a credential"): one read-only
//! call with one pinned credential version, made from the admin socket through the same
//! phases as an app's request ([`super::call`]) over an in-memory HTTP/1.1 connection. The
//! call enters with [`Caller::Operator`]: its principal is the credential's tenant (client
//! [`OPERATOR_CLIENT`]) and its only candidate the pinned version, so no failover hides which
//! version failed.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::BodyExt;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;

use super::call::{Caller, handle};
use super::error::{CALL_ID_HEADER, ErrorCode, Reject, error_response};
use super::respond::CREDENTIAL_HEADER;
use crate::auth::{PeerCred, Principal};
use crate::lock;
use crate::scope::Candidate;
use crate::state::State;

/// Client id on the audit rows of an operator's test call (`keyward cred test`); app clients'
/// ids are `cli_…`, so no app call carries it.
pub const OPERATOR_CLIENT: &str = "operator";
/// Flag on every audit row of an operator's test call.
pub const OPERATOR_TEST_FLAG: &str = "operator_test";
/// Detail of the `request.resolved` row of an operator's test call.
pub(super) const OPERATOR_TEST_DETAIL: &str =
    "operator test call (keyward cred test) from the admin socket";

/// The fixed parts of an operator's test call: the one credential version it uses and who
/// asked (README, "Testing a credential").
pub struct Pinned {
    /// The credential version that makes the call; no other is tried.
    pub candidate: Candidate,
    /// Its tenant's id.
    pub tenant_id: String,
    /// The admin socket's peer, for the audit rows.
    pub peer: Option<PeerCred>,
}

impl Pinned {
    /// The call's principal: the credential's tenant, as client [`OPERATOR_CLIENT`], with no
    /// team or workflow.
    pub(super) fn principal(&self, catalog: &crate::catalog::Catalog) -> Result<Principal, Reject> {
        let tenant = catalog.tenant(&self.tenant_id).ok_or_else(|| {
            Reject::new(
                ErrorCode::ScopeDenied,
                "the credential's tenant no longer exists",
            )
        })?;
        Ok(Principal {
            client_id: OPERATOR_CLIENT.into(),
            tenant_id: tenant.id.clone(),
            tenant_name: tenant.name.clone(),
            team: None,
            workflow: None,
            peer: self.peer,
        })
    }
}

/// What the answer to an operator's test call said. Holds no header value or body byte of
/// the provider's answer: only its status, and keyward's own headers and error.
#[derive(Debug, Clone)]
pub struct OperatorAnswer {
    /// The HTTP status the call was answered with (the provider's, or keyward's own error).
    pub status: u16,
    /// `keyward-call-id`.
    pub call_id: Option<String>,
    /// `keyward-credential`: `cred_…/vN`, the version that served.
    pub credential: Option<String>,
    /// `keyward-error` and its message, when keyward itself answered.
    pub error: Option<(String, String)>,
    /// Time until the response head arrived.
    pub head_latency: Duration,
    /// Response body bytes (scrubbed), read to the end so the call completes.
    pub bytes: u64,
}

/// Makes an operator's test call: `GET /{target}{path_and_query}` with `pinned`'s credential,
/// through the same per-call processing as an app's request (audit rows first and fail
/// closed, unsealing, injection or signing, the upstream TLS call, scrubbing, the completion
/// row), over an in-memory HTTP/1.1 connection. Returns once the response has been read to
/// its end and the call's audit rows are committed. Errors only when the in-memory exchange
/// itself fails.
pub async fn operator_call(
    state: Arc<State>,
    pinned: Pinned,
    path_and_query: &str,
) -> Result<OperatorAnswer, String> {
    let target = &pinned.candidate.credential.target;
    let request = Request::get(format!("/{target}{path_and_query}"))
        .header(http::header::HOST, "keyward")
        .body(http_body_util::Empty::<Bytes>::new())
        .map_err(|e| format!("cannot build the test request: {e}"))?;
    let (client_io, server_io) = tokio::io::duplex(64 * 1024);
    let caller = Arc::new(Mutex::new(Some(Caller::Operator(pinned))));
    let st = state.clone();
    let service = service_fn(move |req| {
        let (st, caller) = (st.clone(), lock(&caller).take());
        async move {
            Ok::<_, Infallible>(match caller {
                Some(caller) => handle(st, req, caller, None).await,
                None => error_response(
                    ErrorCode::BadRequest,
                    "one request per operator test call",
                    "",
                ),
            })
        }
    });
    let server = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(server_io), service);
    let server = tokio::spawn(server);
    let fail = |e: hyper::Error| format!("the test call failed inside keyward: {e}");
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(client_io))
        .await
        .map_err(fail)?;
    let driver = tokio::spawn(connection);
    let sent = Instant::now();
    let response = sender.send_request(request).await.map_err(fail)?;
    let head_latency = sent.elapsed();
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let (status, call_id, credential) = (
        response.status().as_u16(),
        header(CALL_ID_HEADER),
        header(CREDENTIAL_HEADER),
    );
    let code = header(super::error::ERROR_HEADER);
    let mut body = response.into_body();
    let (mut bytes, mut kept, mut broken) = (0u64, Vec::new(), None);
    while let Some(frame) = body.frame().await {
        let frame = match frame {
            Ok(frame) => frame,
            Err(e) => {
                broken = Some(format!("the response stream failed: {e}"));
                break;
            }
        };
        if let Some(data) = frame.data_ref() {
            bytes += data.len() as u64;
            // Only keyward's own error body is read, for its message.
            if code.is_some() && kept.len() < 64 * 1024 {
                kept.extend_from_slice(data);
            }
        }
    }
    drop((body, sender));
    driver.abort();
    let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
    let error = match code {
        Some(code) => {
            let message = serde_json::from_slice::<serde_json::Value>(&kept)
                .ok()
                .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
                .unwrap_or_default();
            Some((code, message))
        }
        None => broken.map(|why| ("upstream_stream".to_string(), why)),
    };
    // The completion row is queued as the body ends; the answer waits until it is in the
    // trail, so `audit query` right after the test finds it.
    state.audit.flush().await;
    Ok(OperatorAnswer {
        status,
        call_id,
        credential,
        error,
        head_latency,
        bytes,
    })
}

//! The admin socket's HTTP/1.1 server: the peer-uid check before a byte is read, connection
//! caps and timeouts, and the mapping of each [`Route`] to its operation in [`super::ops`].
//!
//! A hostile local client cannot starve it: at most [`MAX_CONNECTIONS`] connections are served
//! at once (the next waits in the kernel's backlog), headers must arrive within
//! [`HEADER_TIMEOUT`], a body within [`BODY_TIMEOUT`], and a connection lives at most
//! [`CONNECTION_LIFETIME`].

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use tokio::io::AsyncWriteExt;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Semaphore;
use zeroize::Zeroizing;

use super::api::{self, ApiError, ErrorCode, MAX_REQUEST_BODY, Method, Route};
use super::ops;
use crate::state::State;

/// Most admin connections served at once.
pub const MAX_CONNECTIONS: usize = 32;
/// Time allowed for a request's headers to arrive (also while a kept-alive connection idles).
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Time allowed for a request's body to arrive.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest a connection is kept, however busy.
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(600);

/// Serves the admin socket until `shutdown` resolves.
pub async fn serve(
    listener: UnixListener,
    state: Arc<State>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    tokio::pin!(shutdown);
    loop {
        // The slot is taken before accepting: over the cap, callers wait in the backlog
        // rather than in memory.
        let slot = tokio::select! {
            _ = &mut shutdown => return,
            slot = slots.clone().acquire_owned() => slot.expect("never closed"),
        };
        tokio::select! {
            _ = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let state = state.clone();
                    tokio::spawn(async move {
                        handle_connection(stream, state).await;
                        drop(slot);
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "admin socket accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
}

/// Root and the daemon's own uid may administer it.
fn peer_allowed(stream: &UnixStream) -> Result<u32, String> {
    let cred = stream
        .peer_cred()
        .map_err(|e| format!("cannot read peer credentials: {e}"))?;
    admit(cred.uid(), nix::unistd::geteuid().as_raw())
}

/// The admin socket's rule: peer `uid` may administer a daemon running as `own` when it is
/// root or `own`.
fn admit(uid: u32, own: u32) -> Result<u32, String> {
    if uid == 0 || uid == own {
        Ok(uid)
    } else {
        Err(format!(
            "uid {uid} may not use the admin socket (allowed: root and uid {own})"
        ))
    }
}

async fn handle_connection(mut stream: UnixStream, state: Arc<State>) {
    if let Err(refusal) = peer_allowed(&stream) {
        tracing::warn!(reason = %refusal, "admin connection refused");
        // Answered without reading a byte of the request. The connection stays open a moment
        // so that a client still writing its request can read the answer rather than a
        // broken pipe.
        let body = serde_json::to_vec(&ApiError::new(ErrorCode::Forbidden, refusal).body())
            .expect("plain struct");
        let head = format!(
            "HTTP/1.1 403 Forbidden\r\ncontent-type: application/json\r\nkeyward-error: \
             forbidden\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
            body.len()
        );
        let _ = stream.write_all(head.as_bytes()).await;
        let _ = stream.write_all(&body).await;
        let _ = stream.flush().await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        return;
    }
    // Who asked, for the audit rows of a test call.
    let peer = stream.peer_cred().ok().map(|c| crate::auth::PeerCred {
        uid: c.uid(),
        gid: c.gid(),
        pid: c.pid().unwrap_or(0),
    });
    let service = hyper::service::service_fn(move |req| {
        let state = state.clone();
        async move { Ok::<_, Infallible>(handle(state, req, peer).await) }
    });
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
    if tokio::time::timeout(CONNECTION_LIFETIME, connection)
        .await
        .is_err()
    {
        tracing::info!("admin connection closed after its maximum lifetime");
    }
}

/// One request: route, read the body, run the operation, answer JSON.
async fn handle(
    state: Arc<State>,
    req: Request<Incoming>,
    peer: Option<crate::auth::PeerCred>,
) -> Response<Full<Bytes>> {
    match answer(state, req, peer).await {
        Ok(response) => response,
        Err(e) => error_response(&e),
    }
}

/// The response for a refusal: its status, `keyward-error: <code>` and the error body.
pub fn error_response(e: &ApiError) -> Response<Full<Bytes>> {
    let body = serde_json::to_vec(&e.body()).expect("plain struct");
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() =
        StatusCode::from_u16(e.code.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert("keyward-error", HeaderValue::from_static(e.code.as_str()));
    if e.code == ErrorCode::MethodNotAllowed
        && let Some(allowed) = e.message.rsplit("allows only ").next()
        && let Ok(v) = HeaderValue::from_str(allowed)
    {
        headers.insert(header::ALLOW, v);
    }
    response
}

fn json_response<T: serde::Serialize>(status: StatusCode, value: &T) -> Response<Full<Bytes>> {
    let body = serde_json::to_vec(value).expect("plain struct");
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

fn ok<T: serde::Serialize>(value: &T) -> Response<Full<Bytes>> {
    json_response(StatusCode::OK, value)
}

/// Reads the body into a buffer that is wiped when dropped (it may hold a provider key).
async fn read_body(body: Incoming) -> Result<Zeroizing<Vec<u8>>, ApiError> {
    let collected =
        tokio::time::timeout(BODY_TIMEOUT, Limited::new(body, MAX_REQUEST_BODY).collect())
            .await
            .map_err(|_| {
                ApiError::bad_request(format!(
                    "the request body did not arrive within {}s",
                    BODY_TIMEOUT.as_secs()
                ))
            })?;
    match collected {
        Ok(c) => Ok(Zeroizing::new(Vec::from(c.to_bytes()))),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(ApiError::new(
            ErrorCode::BodyTooLarge,
            format!("the request body is larger than {MAX_REQUEST_BODY} bytes"),
        )),
        Err(e) => Err(ApiError::bad_request(format!(
            "the request body could not be read: {e}"
        ))),
    }
}

/// A JSON body, required.
fn required<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    if body.is_empty() {
        return Err(ApiError::bad_request(
            "this request needs a JSON body (see GET /v1/openapi.json)",
        ));
    }
    api::parse_body(body)
}

/// A JSON body, or the defaults when there is none.
fn optional<T: serde::de::DeserializeOwned + Default>(body: &[u8]) -> Result<T, ApiError> {
    if body.is_empty() {
        Ok(T::default())
    } else {
        api::parse_body(body)
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(ApiError::internal(format!("internal error: {e}"))))
}

async fn answer(
    state: Arc<State>,
    req: Request<Incoming>,
    peer: Option<crate::auth::PeerCred>,
) -> Result<Response<Full<Bytes>>, ApiError> {
    let method = match *req.method() {
        http::Method::GET => Method::Get,
        http::Method::POST => Method::Post,
        http::Method::DELETE => Method::Delete,
        ref other => {
            // Say which methods the path has, or that it does not exist.
            let known = api::route(Method::Get, req.uri().path())
                .or_else(|_| api::route(Method::Post, req.uri().path()))
                .or_else(|_| api::route(Method::Delete, req.uri().path()));
            return Err(match known {
                Err(e) if e.code == ErrorCode::NotFound => e,
                _ => ApiError::new(
                    ErrorCode::MethodNotAllowed,
                    format!("method {other} is not used by the admin API"),
                ),
            });
        }
    };
    let route = api::route(method, req.uri().path())?;
    let query = req.uri().query().unwrap_or("").to_string();
    if let Some(ct) = req.headers().get(header::CONTENT_TYPE) {
        let json = ct
            .to_str()
            .ok()
            .and_then(|v| v.split(';').next())
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"));
        if !json {
            return Err(ApiError::new(
                ErrorCode::UnsupportedMediaType,
                "request bodies are JSON: send content-type: application/json",
            ));
        }
    }
    let body = read_body(req.into_body()).await?;
    let st = state.clone();
    Ok(match route {
        Route::Status => ok(&ops::status(&state)),
        Route::Metrics => {
            let mut response =
                Response::new(Full::new(Bytes::from(crate::metrics::render(&state))));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            response
        }
        Route::OpenApi => {
            let mut response = Response::new(Full::new(Bytes::from(super::openapi::document())));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            response
        }
        Route::Reload => ok(&blocking(move || {
            let done = st
                .reload()
                .map_err(|e| ApiError::bad_request(e.to_string()))?;
            Ok(api::system::Reloaded {
                file: done.file,
                changed: done.changed,
                restart_needed: done.restart_needed,
            })
        })
        .await?),
        Route::ListTenants => ok(&ops::list_tenants(&state)),
        Route::CreateTenant => {
            let new = required(&body)?;
            json_response(
                StatusCode::CREATED,
                &blocking(move || ops::create_tenant(&st, new)).await?,
            )
        }
        Route::ListCredentials => {
            let f: api::credentials::CredentialFilter = api::parse_query(&query)?;
            ok(&ops::list_credentials(&state, f.tenant.as_deref())?)
        }
        Route::CreateCredential => {
            let new = required(&body)?;
            drop(body);
            json_response(
                StatusCode::CREATED,
                &blocking(move || ops::create_credential(&st, new)).await?,
            )
        }
        Route::RotateCredential(id) => {
            let rotate = required(&body)?;
            drop(body);
            ok(&blocking(move || ops::rotate_credential(&st, &id, rotate)).await?)
        }
        Route::RevokeCredential(id) => {
            let revoke = optional(&body)?;
            ok(&blocking(move || ops::revoke_credential(&st, &id, revoke)).await?)
        }
        Route::DeleteCredential(id) => {
            ok(&blocking(move || ops::delete_credential(&st, &id)).await?)
        }
        Route::TestCredential(id) => {
            let test = optional(&body)?;
            ok(&ops::test_credential(st, &id, test, peer).await?)
        }
        Route::ListClients => {
            let f: api::clients::ClientFilter = api::parse_query(&query)?;
            ok(&blocking(move || ops::list_clients(&st, f.tenant.as_deref())).await?)
        }
        Route::CreateClient => {
            let new = required(&body)?;
            json_response(
                StatusCode::CREATED,
                &blocking(move || ops::create_client(&st, new)).await?,
            )
        }
        Route::RevokeClient(id) => ok(&blocking(move || ops::revoke_client(&st, &id)).await?),
        Route::AuditEvents => {
            let q: api::audit::AuditQuery = api::parse_query(&query)?;
            if q.payload_hex.is_some() {
                return Err(ApiError::bad_request(
                    "payload_hex goes in the body of POST /v1/audit/search, not in a URL",
                ));
            }
            ok(&blocking(move || ops::audit_query(&st, q)).await?)
        }
        Route::AuditSearch => {
            let q = optional(&body)?;
            ok(&blocking(move || ops::audit_query(&st, q)).await?)
        }
        Route::AuditVerify => ok(&blocking(move || ops::audit_verify(&st)).await?),
        Route::AuditLifecycle(id) => ok(&blocking(move || ops::audit_lifecycle(&st, &id)).await?),
        Route::AuditExport => {
            let status = state.audit.export_status();
            ok(&api::audit::AuditExport {
                enabled: status.is_some(),
                status,
            })
        }
        Route::ExportBundle => {
            let b: api::system::ExportBundle = optional(&body)?;
            ok(&blocking(move || ops::bundle_export(&st, &b.tenants)).await?)
        }
        Route::Spend => {
            let f: api::system::SpendFilter = api::parse_query(&query)?;
            ok(&blocking(move || ops::spend(&st, f)).await?)
        }
        Route::ListBudgets => {
            let f: api::governance::RuleFilter = api::parse_query(&query)?;
            ok(&blocking(move || ops::list_budgets(&st, f.tenant)).await?)
        }
        Route::SetBudget => {
            let new = required(&body)?;
            ok(&blocking(move || ops::set_budget(&st, new)).await?)
        }
        Route::DeleteBudget(id) => ok(&blocking(move || ops::delete_budget(&st, &id)).await?),
        Route::ListLimits => {
            let f: api::governance::RuleFilter = api::parse_query(&query)?;
            ok(&blocking(move || ops::list_limits(&st, f.tenant)).await?)
        }
        Route::SetLimit => {
            let new = required(&body)?;
            ok(&blocking(move || ops::set_limit(&st, new)).await?)
        }
        Route::DeleteLimit(id) => ok(&blocking(move || ops::delete_limit(&st, &id)).await?),
        Route::Prices => {
            let f: api::system::PriceFilter = api::parse_query(&query)?;
            let rows: Vec<api::system::Price> = state
                .config
                .load()
                .prices
                .rows(f.target.as_deref())
                .map(Into::into)
                .collect();
            ok(&rows)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::admit;

    #[test]
    fn only_root_and_the_daemons_own_uid_are_admitted() {
        // A daemon running as root.
        assert_eq!(admit(0, 0), Ok(0));
        let refused = admit(1000, 0).unwrap_err();
        assert_eq!(
            refused,
            "uid 1000 may not use the admin socket (allowed: root and uid 0)"
        );
        // A daemon running as an unprivileged user: root and that user, no one else.
        assert_eq!(admit(0, 998), Ok(0));
        assert_eq!(admit(998, 998), Ok(998));
        for other in [1, 997, 999, 1000, 65534, u32::MAX] {
            assert!(admit(other, 998).is_err(), "uid {other} was admitted");
        }
    }
}

//! The data-plane server: accepts connections on the data socket (and optional TCP), and runs
//! each request through the one-way pipeline `auth` → `scope` → `audit` → `seal` →
//! `providers` → upstream → scrub → `audit`.
//!
//! The request is the envelope: `POST /{target}/{provider path}`. Bodies stream in both
//! directions; only the prefix needed to read the model is held before the credential is chosen.
//!
//! Failover: `scope` lists the keys that may serve, `pool` moves those cooling down or
//! quarantined to the back, and the request tries them in that order. A 401, 403, 429 or 5xx
//! answer, or a connect/TLS failure, moves it to the next key; the decision is made on the
//! status and headers, before a byte of the response reaches the app. The request body is kept
//! (within `max_request_body`) while another attempt may need it. The audit trail gets one
//! `request.resolved` row for the first key, then one `request.failover` row per move (naming
//! the key that failed, the key taken next and why), committed before the next key is unsealed
//! — fail closed, like the resolution — and `request.completed` naming the key that served.
//! When every key fails, the app gets the last attempt's result: the upstream's answer
//! (scrubbed, with `keyward-credential` naming the last key), or keyward's 502/504 error when
//! the last attempt got no answer.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, CONTENT_TYPE, HeaderName, HeaderValue};
use http::{HeaderMap, Request, Response};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::body::{Body, Frame, SizeHint};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::sync::watch;

use super::app_conn::{AppConn, ConnCheck};
use super::aws_session::{SessionCredentials, StsTarget};
use super::body::{BodyScanner, Scan, declared_length, read_model, read_whole, too_large};
use super::conn::{Activity, ConnectionGuard, Full, Throttle};
use super::error::{CALL_ID_HEADER, ErrorCode, Reject, error_response};
use super::failover::{self, Step};
use super::limits::ShareGuard;
use super::replay::Replay;
use super::route::{
    PathRules, Route, RouteError, app_base, rewrite_upstream_urls, target_name_of, upstream_uri,
};
use super::scrub::{ScrubBody, ScrubSet, Scrubber};
use super::token::{Derived, TokenKey, TokenRequest};
use super::upstream::{BoxError, IdleTimeoutBody, ResponseBody, UpstreamBody};
use crate::audit::usage::UsageTap;
use crate::audit::{Event, EventKind, Fingerprinter};
use crate::auth::{AuthError, PeerCred, Principal, authenticate};
use crate::identity::CredentialKind;
use crate::lock;
use crate::pool::{Change, unix_secs};
use crate::providers::{
    AuthScheme, AwsSigningKey, Family, Target, bearer_auth, prepare_signed_headers,
    prepare_upstream_headers, prepare_upstream_headers_as,
};
use crate::scope::attrs::{ModelSource, capability, model_source};
use crate::scope::{Candidate, Denial, RequestAttrs, select};
use crate::seal::{CredentialRef, Secret, open_with_tenant_key};
use crate::state::State;
use crate::units::format_time;

/// The app's request body, cut off when it stalls for `limits.request_idle_timeout`.
type AppBody = IdleTimeoutBody<Incoming>;

/// Response header naming the credential version that served the request.
pub const CREDENTIAL_HEADER: &str = "keyward-credential";
/// Header on a response served over a `warn` budget: which budgets are spent, by how much.
pub const BUDGET_HEADER: &str = "keyward-budget";

/// A listener the data plane accepts from: the data socket (with peer credentials) or the
/// optional TCP listener (client tokens only, no peer credentials).
pub trait DataListener: Send + 'static {
    /// The accepted stream.
    type Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static;
    /// Waits for the next connection and says who is on the other end, where knowable.
    fn accept_peer(
        &self,
    ) -> impl Future<Output = std::io::Result<(Self::Io, Option<PeerCred>)>> + Send;
}

impl DataListener for tokio::net::UnixListener {
    type Io = tokio::net::UnixStream;
    async fn accept_peer(&self) -> std::io::Result<(Self::Io, Option<PeerCred>)> {
        let (stream, _) = self.accept().await?;
        let peer = stream.peer_cred().ok().map(|c| PeerCred {
            uid: c.uid(),
            gid: c.gid(),
            pid: c.pid().unwrap_or(0),
        });
        Ok((stream, peer))
    }
}

impl DataListener for tokio::net::TcpListener {
    type Io = tokio::net::TcpStream;
    async fn accept_peer(&self) -> std::io::Result<(Self::Io, Option<PeerCred>)> {
        let (stream, _) = self.accept().await?;
        let _ = stream.set_nodelay(true);
        Ok((stream, None))
    }
}

/// Serves `listener` until `stop` turns true, then closes it and waits for open connections to
/// finish their in-flight requests (the caller bounds that wait). A connection over
/// `limits.max_connections` or `limits.max_connections_per_uid` is closed as soon as it is
/// accepted; one with no request open for `limits.idle_connection_timeout` is closed.
pub async fn serve(
    listener: impl DataListener,
    state: Arc<State>,
    mut stop: watch::Receiver<bool>,
) {
    // Every connection task holds a sender; when the last one is gone, all have finished.
    let (open_tx, mut open_rx) = tokio::sync::mpsc::channel::<()>(1);
    loop {
        tokio::select! {
            _ = stopped(&mut stop) => break,
            accepted = listener.accept_peer() => match accepted {
                Ok((stream, peer)) => match state.connections.admit(peer.map(|p| p.uid)) {
                    Ok(guard) => {
                        let max_head = state.config.load().limits.max_header_bytes.max(8192);
                        let (conn, check) = AppConn::new(stream, max_head);
                        serve_connection(
                            TokioIo::new(conn),
                            peer,
                            check,
                            &state,
                            stop.clone(),
                            (guard, open_tx.clone()),
                        )
                    }
                    Err(full) => refuse_connection(stream, full),
                },
                Err(e) => accept_failed(e).await,
            },
        }
    }
    drop(listener);
    drop(open_tx);
    let _ = open_rx.recv().await;
}

/// Resolves once `stop` turns true (or its sender is gone).
pub async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

async fn accept_failed(e: std::io::Error) {
    // EMFILE and friends: back off instead of spinning, and say so at most every 10 s, or the
    // log grows as fast as the loop can fail.
    static THROTTLE: Throttle = Throttle::new(Duration::from_secs(10));
    if let Some(suppressed) = THROTTLE.tick(std::time::Instant::now()) {
        tracing::warn!(error = %e, suppressed, "data socket accept failed");
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
}

/// Closes a connection over a cap at once: the peer sees it end instead of hanging in the
/// listen backlog, and the descriptor is free again.
fn refuse_connection<S>(stream: S, full: Full) {
    static THROTTLE: Throttle = Throttle::new(Duration::from_secs(10));
    if let Some(suppressed) = THROTTLE.tick(std::time::Instant::now()) {
        tracing::warn!(reason = %full, suppressed, "data connection closed at once");
    }
    drop(stream);
}

fn serve_connection<I>(
    io: I,
    peer: Option<PeerCred>,
    check: Arc<ConnCheck>,
    state: &Arc<State>,
    mut stop: watch::Receiver<bool>,
    guards: (ConnectionGuard, tokio::sync::mpsc::Sender<()>),
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let config = state.config.load();
    let limits = &config.limits;
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .max_buf_size(limits.max_header_bytes.max(8192))
        .timer(hyper_util::rt::TokioTimer::new());
    builder
        .http2()
        .max_header_list_size(limits.max_header_bytes as u32)
        .max_concurrent_streams(256)
        .timer(hyper_util::rt::TokioTimer::new());
    let st = state.clone();
    let activity = Activity::new();
    let requests = activity.clone();
    let service = service_fn(move |req| {
        let st = st.clone();
        let refused = check.next_request();
        // Counted from the request's headers until its response body is gone.
        let busy = requests.enter();
        async move {
            let response = handle(st, req, Caller::App(peer), refused).await;
            Ok::<_, Infallible>(response.map(|inner| {
                Held {
                    inner,
                    _guards: busy,
                }
                .boxed()
            }))
        }
    });
    let idle = limits.idle_connection_timeout;
    let conn = builder.serve_connection(io, service).into_owned();
    tokio::spawn(async move {
        let _guards = guards;
        tokio::pin!(conn);
        let idled = tokio::select! {
            _ = conn.as_mut() => return,
            _ = activity.idle_for(idle) => true,
            _ = stopped(&mut stop) => false,
        };
        // HTTP/1 closes between requests, HTTP/2 sends GOAWAY and closes once its open streams
        // are done, a connection that never sent a byte closes at once. On shutdown the caller
        // bounds this wait; an idle connection has nothing open, and a peer that does not even
        // read the GOAWAY is dropped after another idle period.
        conn.as_mut().graceful_shutdown();
        if idled {
            let _ = tokio::time::timeout(idle, conn).await;
        } else {
            let _ = conn.await;
        }
    });
}

/// What is known about a request so far, for its audit rows.
#[derive(Default)]
struct Known {
    principal: Option<Principal>,
    target: Option<String>,
    model: Option<String>,
    capability: Option<String>,
    /// Where the app reaches keyward (`http://keyward`), for upstream URLs handed back to it.
    app_base: Option<String>,
    /// The candidate of the latest attempt, once the request was resolved: a failure after
    /// that point completes the call rather than denying it.
    attempted: Option<Candidate>,
    /// The request's place in its client's and tenant's shares, held until the response ends.
    share: Option<ShareGuard>,
    /// The upstream clients this request uses, kept until its response ends.
    upstream: Option<Arc<super::upstream::Upstream>>,
    /// Time spent waiting for upstream response heads, over all attempts.
    upstream_time: std::time::Duration,
    /// The budgets and limits to charge when the call completes (README, "Spend and limits").
    ticket: crate::governance::Ticket,
    /// Flags every later audit row of the call carries (`budget_exceeded_warn`).
    flags: Vec<String>,
}

impl Known {
    fn event(&self, kind: EventKind, call_id: &str) -> Event {
        let p = self.principal.as_ref();
        Event {
            call_id: Some(call_id.to_string()),
            tenant: p.map(|p| p.tenant_name.clone()),
            client_id: p.map(|p| p.client_id.clone()),
            peer_uid: p.and_then(|p| p.peer).map(|c| c.uid),
            peer_pid: p.and_then(|p| p.peer).map(|c| c.pid.max(0) as u32),
            team: p.and_then(|p| p.team.clone()),
            workflow: p.and_then(|p| p.workflow.clone()),
            target: self.target.clone(),
            model: self.model.clone(),
            capability: self.capability.clone(),
            flags: self.flags.clone(),
            ..Event::new(kind)
        }
    }
}

/// A fresh call id: a UUIDv7, so it is time-ordered (the audit index on call ids grows at its
/// end instead of touching a random page per row, and operators can sort by it). Its 74
/// non-time bits are a per-process counter encrypted with a random AES key: distinct for every
/// call, yet they tell an app nothing about other calls (not how many were made in between,
/// nor what another tenant's next id will be), and minting one makes no system call.
fn new_call_id() -> String {
    use aes_gcm::aes::Aes128;
    use aes_gcm::aes::cipher::{BlockCipherEncrypt, KeyInit};
    static CIPHER: std::sync::OnceLock<Aes128> = std::sync::OnceLock::new();
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let cipher = CIPHER.get_or_init(|| {
        let mut key = [0; 16];
        crate::seal::fill_random(&mut key);
        Aes128::new(&key.into())
    });
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut block = [0; 16];
    block[..8].copy_from_slice(&n.to_be_bytes());
    cipher.encrypt_block((&mut block).into());
    let bits: [u8; 10] = block[..10].try_into().expect("10 of 16 bytes");
    let millis = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    uuid::Builder::from_unix_timestamp_millis(millis, &bits)
        .into_uuid()
        .to_string()
}

async fn handle(
    state: Arc<State>,
    req: Request<Incoming>,
    caller: Caller,
    bad_framing: Option<String>,
) -> Response<UpstreamBody> {
    let started = Instant::now();
    let call_id = new_call_id();
    if let Some(reason) = bad_framing {
        // Nothing after this head is read (see `app_conn`): the connection ends with the answer.
        drop(req);
        tracing::info!(call_id, code = "bad_request", %reason, "request refused");
        count(
            &state,
            None,
            ErrorCode::BadRequest.status().as_u16(),
            ErrorCode::BadRequest.as_str(),
            started,
            Default::default(),
        );
        trace_refusal(
            &state,
            &Known::default(),
            &call_id,
            started,
            ErrorCode::BadRequest,
        );
        let mut response = error_response(ErrorCode::BadRequest, &reason, &call_id);
        response
            .headers_mut()
            .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
        return response;
    }
    let Ok(permit) = state.limiter.clone().try_acquire_owned() else {
        count(
            &state,
            None,
            ErrorCode::Overloaded.status().as_u16(),
            ErrorCode::Overloaded.as_str(),
            started,
            Default::default(),
        );
        trace_refusal(
            &state,
            &Known::default(),
            &call_id,
            started,
            ErrorCode::Overloaded,
        );
        return error_response(
            ErrorCode::Overloaded,
            "too many requests in flight (limits.max_concurrent_requests); retry shortly",
            &call_id,
        );
    };
    let in_flight = state.track_request();
    let mut known = Known::default();
    match process(&state, req, caller, &call_id, started, &mut known).await {
        // The slot and the in-flight count last until the response body is done, so open
        // streams count against max_concurrent_requests and SIGTERM waits for them.
        Ok(response) => {
            count(
                &state,
                known.target.as_deref(),
                response.status().as_u16(),
                "none",
                started,
                known.upstream_time,
            );
            response.map(|inner| {
                Held {
                    inner,
                    _guards: (permit, in_flight, known.share.take(), known.upstream.take()),
                }
                .boxed()
            })
        }
        Err(reject) => {
            // Only authenticated callers leave audit rows; anonymous refusals are logged.
            if known.principal.is_some() {
                let kind = match known.attempted {
                    Some(_) => EventKind::RequestCompleted,
                    None => EventKind::RequestDenied,
                };
                let mut event = known.event(kind, &call_id);
                if let Some(chosen) = &known.attempted {
                    name_credential(&mut event, chosen);
                    event.latency_ms = Some(started.elapsed().as_millis() as u64);
                }
                event.detail = Some(format!("{}: {}", reject.code.as_str(), reject.message));
                state.audit.enqueue(event);
            }
            tracing::info!(
                call_id,
                code = reject.code.as_str(),
                reason = %reject.message,
                "request refused",
            );
            count(
                &state,
                known.target.as_deref(),
                reject.code.status().as_u16(),
                reject.code.as_str(),
                started,
                known.upstream_time,
            );
            trace_refusal(&state, &known, &call_id, started, reject.code);
            reject.response(&call_id)
        }
    }
}

/// Counts an answered request and the time keyward added to it (README, "Metrics and health").
fn count(
    state: &State,
    target: Option<&str>,
    status: u16,
    error: &'static str,
    started: Instant,
    upstream: std::time::Duration,
) {
    let target = target.unwrap_or(crate::metrics::UNKNOWN);
    state.metrics.request(target, status, error);
    state
        .metrics
        .overhead(target, started.elapsed().saturating_sub(upstream));
}

/// Records the span of a call keyward refused (README, "Traces").
fn trace_refusal(state: &State, known: &Known, call_id: &str, started: Instant, code: ErrorCode) {
    state.traces.record(|| {
        let end = SystemTime::now();
        crate::traces::CallSpan {
            call_id: call_id.to_string(),
            start: end - started.elapsed(),
            end,
            target: known.target.clone(),
            capability: known.capability.clone(),
            model: known.model.clone(),
            tenant: known.principal.as_ref().map(|p| p.tenant_name.clone()),
            credential: known
                .attempted
                .as_ref()
                .map(|c| (c.credential.id.clone(), c.version().version)),
            status: code.status().as_u16(),
            error: Some(code.as_str().into()),
            input_tokens: None,
            output_tokens: None,
        }
    });
}

/// Records the span of a call whose response reached the app, from its completion row.
fn trace_completion(state: &State, event: &Event, started: Instant, detail: Option<&str>) {
    state.traces.record(|| {
        let end = SystemTime::now();
        let status = event.upstream_status.unwrap_or(0);
        let error = match detail {
            // Why the stream ended early, as a class (the detail itself stays in the audit).
            Some(d) if d.starts_with("response stream failed") => Some("upstream_stream".into()),
            Some(d) if d.starts_with("the client was revoked") => Some("client_revoked".into()),
            Some(_) => Some("client_closed".into()),
            None if status >= 400 => Some(status.to_string().into()),
            None => None,
        };
        crate::traces::CallSpan {
            call_id: event.call_id.clone().unwrap_or_default(),
            start: end - started.elapsed(),
            end,
            target: event.target.clone(),
            capability: event.capability.clone(),
            model: event.model.clone(),
            tenant: event.tenant.clone(),
            credential: event.credential_id.clone().zip(event.credential_version),
            status,
            error,
            input_tokens: event.input_tokens,
            output_tokens: event.output_tokens,
        }
    });
}

async fn process(
    state: &Arc<State>,
    req: Request<Incoming>,
    caller: Caller,
    call_id: &str,
    started: Instant,
    known: &mut Known,
) -> Result<Response<UpstreamBody>, Reject> {
    // Authenticate first: a caller without credentials costs one hash lookup, never path
    // decoding, and leaves no audit row it could use to flood the trail.
    let catalog = state.catalog.load();
    let (principal, pinned) = match caller {
        Caller::App(peer) => {
            let principal = authenticate(&catalog, req.headers(), peer).map_err(|e| match e {
                AuthError::WorkflowNotAllowed { .. } | AuthError::BadWorkflow => {
                    Reject::new(ErrorCode::ScopeDenied, e.to_string())
                }
                other => Reject::new(ErrorCode::Unauthenticated, other.to_string()),
            })?;
            (principal, None)
        }
        Caller::Operator(pinned) => {
            known.flags.push(OPERATOR_TEST_FLAG.into());
            (pinned.principal(&catalog)?, Some(pinned.candidate))
        }
    };
    // Its share is taken before anything else is read, so a client at its limit costs no more.
    let share = state
        .shares
        .try_take(&principal.client_id, &principal.tenant_id)
        .map_err(|e| Reject::new(ErrorCode::Overloaded, e.message()))?;
    known.share = Some(share);
    known.principal = Some(principal.clone());
    known.app_base = Some(app_base(&req));
    let route = Route::from_request(&req)
        .or_else(|e| match e {
            // The AWS SDKs encode the `:` and `/` of Bedrock model ids (README, "Bedrock").
            RouteError::EncodedColon | RouteError::EncodedSlash if is_bedrock(state, req.uri()) => {
                Route::from_request_with(&req, PathRules::BedrockModelId)
            }
            e => Err(e),
        })
        .map_err(|e| Reject::new(ErrorCode::BadRequest, e.to_string()))?;
    // One snapshot of the configuration and upstream clients serves the whole request, across
    // a reload (README, "Reload").
    let config = state.config.load_full();
    let upstream = state.upstream.load_full();
    known.upstream = Some(upstream.clone());
    let target = config
        .targets
        .lookup(route.target())
        .map_err(|e| Reject::new(ErrorCode::UnknownTarget, e.to_string()))?;
    known.target = Some(target.name.clone());

    let limit = config.limits.max_request_body;
    let declared = declared_length(req.headers());
    if declared.is_some_and(|n| n > limit) {
        return Err(too_large(limit));
    }
    let cap = capability(target.family, route.path());
    known.capability = Some(cap.as_str().to_string());
    let req_content_type = req
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let (parts, body) = req.into_parts();
    let mut body = IdleTimeoutBody::for_app(
        body,
        config.limits.request_idle_timeout,
        config.limits.request_body_timeout,
    );
    let mut prefix = Vec::new();
    let mut held = state.bodies.hold();
    let mut scanner = None;
    let model = match model_source(target.family, route.path()) {
        ModelSource::Path(m) => Some(m),
        ModelSource::Unknown => None,
        ModelSource::JsonBody => {
            let mut s = BodyScanner::for_content_type(req_content_type.as_deref());
            let scan = Scan {
                limit,
                window: config.limits.max_model_scan,
                budget: state.bodies.limit(),
            };
            let (model, ended) =
                read_model(&mut body, &mut s, &mut prefix, &mut held, scan).await?;
            if !ended {
                scanner = Some(s);
            }
            model
        }
    };
    known.model = model.clone();
    // SigV4 signs the body's hash, so a signed request's body is read whole before it is sent.
    let body_sha256 = if matches!(target.auth, AuthScheme::SigV4 { .. }) {
        let scan = Scan {
            limit,
            window: limit,
            budget: state.bodies.limit(),
        };
        Some(read_whole(&mut body, &mut prefix, &mut held, scan).await?)
    } else {
        None
    };
    let attrs = RequestAttrs {
        target: target.name.clone(),
        model,
        capability: cap,
    };
    let rotation = state
        .rotation
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let candidates = match pinned {
        // An operator's test call uses its one key: no other is tried, so a refusal names it.
        Some(candidate) => vec![candidate],
        None => select(
            &catalog,
            &principal,
            &attrs,
            crate::units::now_unix(),
            rotation,
        )
        .map_err(|d| match d {
            Denial::Scope { message, .. } => Reject::new(ErrorCode::ScopeDenied, message),
            Denial::Policy(message) => Reject::new(ErrorCode::PolicyViolation, message),
        })?,
    };
    let mut candidates = state.pool.arrange(candidates, SystemTime::now());
    // Budgets and rate limits, before the resolution is audited or any key unsealed.
    let ticket = {
        let ids: Vec<&str> = candidates
            .iter()
            .map(|c| c.credential.id.as_str())
            .collect();
        let caller = crate::governance::Caller {
            tenant: &principal.tenant_name,
            team: principal.team.as_deref(),
            client: &principal.client_id,
        };
        state.governance.check(caller, &ids).await?
    };
    if !ticket.blocked.is_empty() {
        let first_block = ticket.blocked[0].1.clone();
        candidates.retain(|c| !ticket.blocked.iter().any(|(id, _)| *id == c.credential.id));
        if candidates.is_empty() {
            return Err(Reject::new(ErrorCode::BudgetExceeded, first_block));
        }
    }
    if !ticket.warnings.is_empty() {
        tracing::warn!(
            call_id,
            budgets = %ticket.warnings.join("; "),
            "serving over a budget (on_exceed: warn)"
        );
        known.flags.push("budget_exceeded_warn".into());
    }
    known.ticket = ticket;
    let tenant = catalog
        .tenant(&principal.tenant_id)
        .cloned()
        .ok_or_else(|| {
            Reject::new(
                ErrorCode::Unauthenticated,
                "the client's tenant no longer exists",
            )
        })?;
    let first = candidates
        .first()
        .expect("select returns at least one candidate");

    // Fail closed: the resolution is durable before the key is unsealed or anything is sent.
    let mut resolved = known.event(EventKind::RequestResolved, call_id);
    name_credential(&mut resolved, first);
    if known.flags.iter().any(|f| f == OPERATOR_TEST_FLAG) {
        resolved.detail = Some(OPERATOR_TEST_DETAIL.into());
    }
    let keys = tenant_keys(state, &tenant).await.map_err(|e| {
        Reject::new(
            ErrorCode::AuditUnavailable,
            format!("fingerprint key unavailable: {e}"),
        )
    })?;
    let rest = (body_sha256.is_none() && !body.is_end_stream()).then_some(body);
    let replay = Replay::new(
        (prefix, held),
        rest,
        scanner,
        Fingerprinter::new(&keys.fingerprint),
        limit,
        candidates.len() > 1,
    );
    resolved.fingerprint = replay.fingerprint();
    let committing = Instant::now();
    let committed = state.audit.commit(resolved).await;
    state.metrics.audit_commit(committing.elapsed());
    committed.map_err(|e| {
        Reject::new(
            ErrorCode::AuditUnavailable,
            format!("the audit record could not be written, so nothing was sent upstream: {e}"),
        )
    })?;

    let request = Outgoing {
        method: parts.method,
        headers: parts.headers,
        target,
        route: &route,
        declared,
        upstream: &upstream,
        body_sha256,
    };
    let mut attempts = KeyAttempts {
        state,
        tenant: (&tenant.id, &keys),
        request: &request,
        candidates: &candidates,
        replay: &replay,
        known,
        call_id,
        sent_at: SystemTime::now(),
    };
    let (index, (response, used)) = failover::run(&mut attempts, candidates.len(), &replay).await?;
    Ok(respond(
        state,
        response,
        &used,
        &candidates[index],
        known,
        call_id,
        started,
        replay,
        target,
    ))
}

/// The I/O of a call's attempts with its candidate keys, for [`failover::run`].
struct KeyAttempts<'a> {
    state: &'a Arc<State>,
    /// The tenant's id and unwrapped keys.
    tenant: (&'a str, &'a crate::seal::TenantKeys),
    request: &'a Outgoing<'a>,
    candidates: &'a [Candidate],
    replay: &'a Replay<AppBody>,
    known: &'a mut Known,
    call_id: &'a str,
    /// When the latest attempt's request went out.
    sent_at: SystemTime,
}

impl failover::Attempts for KeyAttempts<'_> {
    type Answer = Answer;

    async fn attempt(&mut self, index: usize) -> Step<Answer> {
        let chosen = &self.candidates[index];
        self.known.attempted = Some(chosen.clone());
        if chosen.expired_warn {
            tracing::warn!(
                call_id = self.call_id,
                credential = %chosen.credential.id,
                version = chosen.version().version,
                "serving a key past the tenant's max key age (policy: warn)",
            );
        }
        self.sent_at = SystemTime::now();
        attempt(
            self.state,
            self.tenant,
            self.request,
            chosen,
            self.replay,
            index as u32,
            &mut self.known.upstream_time,
        )
        .await
    }

    async fn assess(&mut self, index: usize, (response, used): &Answer) -> (u16, Change) {
        let status = response.status().as_u16();
        // A refused access token is not offered again: the next request fetches anew.
        if status == 401
            && let Some((key, token)) = &used.token
        {
            self.state.tokens.refused(key, token).await;
        }
        let chosen = &self.candidates[index];
        let change = report(
            self.state,
            self.known,
            self.call_id,
            chosen,
            response,
            self.sent_at,
        );
        (status, change)
    }

    async fn record_failover(
        &mut self,
        from: usize,
        to: usize,
        reason: &str,
        status: Option<u16>,
    ) -> Result<(), ()> {
        let (chosen, next) = (&self.candidates[from], &self.candidates[to]);
        let call_id = self.call_id;
        let mut row = self.known.event(EventKind::RequestFailover, call_id);
        name_credential(&mut row, chosen);
        row.upstream_status = status;
        row.detail = Some(format!(
            "from {} to {}: {reason}",
            label(chosen),
            label(next)
        ));
        // Flags the row when either key is past its max age (policy: warn), once.
        if next.expired_warn && !row.flags.iter().any(|f| f == "expired_key_warn") {
            row.flags.push("expired_key_warn".into());
        }
        // Same rule as the resolution: the next key is not used until this row is durable.
        let committing = Instant::now();
        let committed = self.state.audit.commit(row).await;
        self.state.metrics.audit_commit(committing.elapsed());
        if let Err(e) = committed {
            tracing::error!(
                call_id,
                error = %e,
                "failover not possible: its audit record could not be written",
            );
            return Err(());
        }
        tracing::info!(
            call_id,
            from = %label(chosen),
            to = %label(next),
            reason,
            "failing over to the next key",
        );
        Ok(())
    }
}

/// The parts of the app's request every attempt reuses.
struct Outgoing<'a> {
    method: http::Method,
    /// The app's headers, before credential stripping and injection.
    headers: HeaderMap,
    target: &'a Target,
    route: &'a Route,
    declared: Option<u64>,
    /// The upstream clients of the request's configuration snapshot.
    upstream: &'a super::upstream::Upstream,
    /// Hex SHA-256 of the whole body, for SigV4 targets (whose body is read whole first).
    body_sha256: Option<String>,
}

/// An upstream answer, with what was injected to get it (for scrubbing).
type Answer = (Response<ResponseBody>, Used);

/// Sends the request once with `chosen`.
async fn attempt(
    state: &State,
    tenant: (&str, &crate::seal::TenantKeys),
    request: &Outgoing<'_>,
    chosen: &Candidate,
    replay: &Replay<AppBody>,
    number: u32,
    upstream_time: &mut std::time::Duration,
) -> Step<Answer> {
    let kind = chosen.credential.kind;
    let signed = matches!(request.target.auth, AuthScheme::SigV4 { .. });
    let signing_kind = matches!(
        kind,
        CredentialKind::AwsAccessKey | CredentialKind::AwsAssumeRole
    );
    if signed != signing_kind {
        return Step::Failed {
            reject: Reject::new(
                ErrorCode::UpstreamUnreachable,
                format!(
                    "credential {} is of kind {kind}, which this keyward cannot use for target {}",
                    chosen.credential.id, request.target.name
                ),
            ),
            retryable: true,
        };
    }
    let secret = match unseal(tenant, chosen) {
        Ok(secret) => secret,
        Err(reject) => {
            return Step::Failed {
                reject,
                retryable: true,
            };
        }
    };
    let mut headers = request.headers.clone();
    let uri = upstream_uri(request.target, request.route);
    let signing = if signed {
        Some(sign(state, request, chosen, &uri, &mut headers, &secret).await)
    } else {
        None
    };
    let used = match signing {
        Some(Ok((scrub, session))) => Used {
            scrub,
            token: None,
            session,
        },
        Some(Err(reject)) => {
            return Step::Failed {
                reject,
                retryable: true,
            };
        }
        None => match inject(state, request.target, chosen, secret, &mut headers).await {
            Ok(used) => used,
            Err(failed) => return failed,
        },
    };
    let body = replay.attempt(number, request.declared);
    let mut upstream_req = Request::new(body.boxed());
    *upstream_req.method_mut() = request.method.clone();
    *upstream_req.uri_mut() = uri;
    *upstream_req.headers_mut() = headers;
    let sending = Instant::now();
    let sent = request.upstream.send(request.target, upstream_req).await;
    let took = sending.elapsed();
    *upstream_time += took;
    state.metrics.upstream(&request.target.name, took);
    match sent {
        Ok(response) if is_encoded(response.headers()) => Step::Failed {
            // keyward asked for an identity body (no Accept-Encoding); an encoded one could carry
            // the key past the scrubber, so it is never relayed.
            reject: Reject::new(
                ErrorCode::UpstreamUnreachable,
                format!(
                    "upstream {} answered with an encoded body (Content-Encoding or \
                     Transfer-Encoding other than chunked) although none was accepted; keyward \
                     cannot scrub it and refuses to relay it",
                    request.target.upstream.authority
                ),
            ),
            retryable: false,
        },
        Ok(response) => {
            // A refused session may have been revoked: the next request assumes the role again.
            if let Some(session) = &used.session
                && matches!(response.status().as_u16(), 401 | 403)
            {
                let version = chosen.version().version;
                state
                    .aws_sessions
                    .invalidate(&chosen.credential.id, version, session)
                    .await;
            }
            Step::Answer((response, used))
        }
        Err(e) => Step::Failed {
            retryable: failover::retryable(&e),
            reject: Reject::new(e.code(), e.to_string()),
        },
    }
}

/// What one attempt put into the request, kept until its response is scrubbed.
struct Used {
    /// Every secret the response must not carry: the key, or a document's secret parts and the
    /// token derived from it.
    scrub: ScrubSet,
    /// The derived access token and its cache key, to forget it if the upstream refuses it.
    token: Option<(TokenKey, Arc<Derived>)>,
    /// The assumed-role session that signed the request, to forget it if it is refused.
    session: Option<Arc<SessionCredentials>>,
}

/// Puts `chosen`'s credential into `headers`: a key as the target takes it, or for a token kind
/// (README, "Credential kinds") a cached or freshly fetched access token as
/// `Authorization: Bearer`.
async fn inject(
    state: &State,
    target: &Target,
    chosen: &Candidate,
    secret: Secret,
    headers: &mut HeaderMap,
) -> Result<Used, Step<Answer>> {
    let kind = chosen.credential.kind;
    let refused = |e: crate::providers::InjectError| Step::Failed {
        reject: Reject::new(ErrorCode::BadRequest, e.to_string()),
        retryable: false,
    };
    match kind {
        CredentialKind::ApiKey => {
            prepare_upstream_headers(target, headers, &secret).map_err(refused)?;
            Ok(Used {
                scrub: ScrubSet::new(std::slice::from_ref(&secret), &[]),
                token: None,
                session: None,
            })
        }
        CredentialKind::GcpServiceAccount | CredentialKind::AzureEntra => {
            let key = (chosen.credential.id.clone(), chosen.version().version);
            let token = state
                .tokens
                .token(TokenRequest {
                    key: key.clone(),
                    kind,
                    secret: &secret,
                    token_url: target.token_url.as_deref(),
                    authority: target.authority.as_deref(),
                    ca_file: target.ca_file.as_deref(),
                })
                .await
                .map_err(|e| {
                    tracing::warn!(
                        credential = %chosen.credential.id,
                        version = key.1,
                        error = %e,
                        "no access token for the credential",
                    );
                    Step::Failed {
                        reject: Reject::new(
                            ErrorCode::UpstreamUnreachable,
                            format!(
                                "credential {}/v{} ({kind}) got no access token: {e}",
                                key.0, key.1
                            ),
                        ),
                        retryable: true,
                    }
                })?;
            prepare_upstream_headers_as(target, &bearer_auth(), headers, &token.token)
                .map_err(refused)?;
            drop(secret);
            Ok(Used {
                scrub: token.scrub.clone(),
                token: Some((key, token)),
                session: None,
            })
        }
        other => Err(Step::Failed {
            reject: Reject::new(
                ErrorCode::UpstreamUnreachable,
                format!(
                    "credential {} is of kind {other}, which this keyward cannot use for \
                     target {}",
                    chosen.credential.id, target.name
                ),
            ),
            retryable: true,
        }),
    }
}

/// Signs the request for a SigV4 target with `chosen` (an `aws-access-key`, or the session of
/// an `aws-assume-role`). Returns the secrets to scrub from the answer and the session used, or
/// why it cannot (another key may do better).
async fn sign(
    state: &State,
    request: &Outgoing<'_>,
    chosen: &Candidate,
    uri: &http::Uri,
    headers: &mut HeaderMap,
    secret: &Secret,
) -> Result<(ScrubSet, Option<Arc<SessionCredentials>>), Reject> {
    use crate::identity::kind::{AwsAccessKey, AwsAssumeRole};
    let target = request.target;
    let id = &chosen.credential.id;
    let unusable = |what: String| {
        Reject::new(
            ErrorCode::UpstreamUnreachable,
            format!(
                "credential {id} cannot sign for target {}: {what}",
                target.name
            ),
        )
    };
    let body_sha256 = request
        .body_sha256
        .as_deref()
        .ok_or_else(|| unusable("the body was not read whole".into()))?;
    let sign = |headers: &mut HeaderMap, key: &AwsSigningKey<'_>| {
        prepare_signed_headers(
            target,
            &request.method,
            uri,
            headers,
            body_sha256,
            key,
            SystemTime::now(),
        )
        .map_err(|e| Reject::new(ErrorCode::UpstreamUnreachable, e.to_string()))
    };
    let kind = chosen.credential.kind;
    match kind {
        CredentialKind::AwsAccessKey => {
            let doc = AwsAccessKey::parse(secret).map_err(|e| unusable(e.to_string()))?;
            let key = AwsSigningKey {
                access_key_id: &doc.access_key_id,
                secret_access_key: &doc.secret_access_key,
                session_token: doc.session_token.as_ref(),
            };
            sign(headers, &key)?;
            Ok((ScrubSet::new(&kind.secret_parts(secret).whole, &[]), None))
        }
        CredentialKind::AwsAssumeRole => {
            let doc = AwsAssumeRole::parse(secret).map_err(|e| unusable(e.to_string()))?;
            let AuthScheme::SigV4 {
                region,
                sts_endpoint,
                ..
            } = &target.auth
            else {
                return Err(unusable("the target does not sign".into()));
            };
            let sts = StsTarget {
                endpoint: sts_endpoint,
                region,
                ca_file: target.ca_file.as_ref(),
            };
            let session = state
                .aws_sessions
                .session(id, chosen.version().version, doc, sts)
                .await
                .map_err(|e| Reject::new(ErrorCode::UpstreamUnreachable, e))?;
            let key = AwsSigningKey {
                access_key_id: &session.access_key_id,
                secret_access_key: &session.secret_access_key,
                session_token: Some(&session.session_token),
            };
            sign(headers, &key)?;
            let mut scrub = kind.secret_parts(secret).whole;
            for s in [&session.secret_access_key, &session.session_token] {
                scrub.push(Secret::from_slice(s.expose_secret()));
            }
            Ok((ScrubSet::new(&scrub, &[]), Some(session)))
        }
        other => Err(unusable(format!("a {other} credential cannot sign"))),
    }
}

/// Whether the request names a Bedrock-family target (whose model ids may carry `%3A`, `%2F`).
fn is_bedrock(state: &State, uri: &http::Uri) -> bool {
    state
        .config
        .load()
        .targets
        .get(target_name_of(uri))
        .is_some_and(|t| t.family == Family::Bedrock)
}

/// True when the response body is not plain bytes keyward can scrub.
fn is_encoded(headers: &HeaderMap) -> bool {
    let not = |name, allowed: &[&str]| {
        headers.get_all(name).iter().any(|v| {
            v.to_str().map_or(true, |v| {
                v.split(',')
                    .map(str::trim)
                    .any(|t| !t.is_empty() && !allowed.iter().any(|a| t.eq_ignore_ascii_case(a)))
            })
        })
    };
    not(http::header::CONTENT_ENCODING, &["identity"])
        || not(http::header::TRANSFER_ENCODING, &["chunked"])
}

/// Tells the pool what the upstream's status means for the key, and audits a quarantine.
fn report(
    state: &State,
    known: &Known,
    call_id: &str,
    chosen: &Candidate,
    response: &Response<ResponseBody>,
    sent_at: SystemTime,
) -> Change {
    let now = SystemTime::now();
    let status = response.status().as_u16();
    let Some(outcome) = failover::outcome(status, response.headers(), sent_at, now) else {
        return Change::None;
    };
    let version = chosen.version().version;
    let change = state
        .pool
        .report(&chosen.credential.id, version, outcome, now);
    if let Change::Quarantined(until) = change {
        let until = format_time(unix_secs(until));
        tracing::warn!(
            call_id,
            credential = %chosen.credential.id,
            version,
            status,
            %until,
            "upstream refused the key: it may be revoked or leaked; quarantined",
        );
        let mut event = known.event(EventKind::CredentialQuarantined, call_id);
        name_credential(&mut event, chosen);
        event.upstream_status = Some(status);
        event.detail = Some(format!(
            "upstream answered {status}: the key may be revoked or leaked; skipped until {until} \
             while other keys can serve"
        ));
        state.audit.enqueue(event);
    }
    change
}

/// `cred_x/v2`, as in the `keyward-credential` header.
fn label(c: &Candidate) -> String {
    format!("{}/v{}", c.credential.id, c.version().version)
}

/// Puts the candidate's id, version and policy flag on an audit row.
fn name_credential(event: &mut Event, c: &Candidate) {
    event.credential_id = Some(c.credential.id.clone());
    event.credential_version = Some(c.version().version);
    if c.expired_warn {
        event.flags.push("expired_key_warn".into());
    }
}

/// Opens the chosen version's key into locked memory, with the tenant's key already unwrapped
/// for this request.
fn unseal(
    (tenant, keys): (&str, &crate::seal::TenantKeys),
    chosen: &Candidate,
) -> Result<Secret, Reject> {
    let v = chosen.version();
    open_with_tenant_key(
        &keys.tenant,
        CredentialRef {
            tenant,
            credential: &chosen.credential.id,
            version: v.version,
        },
        &v.wrapped_data_key,
        &v.ciphertext,
    )
    .map_err(|e| {
        tracing::error!(
            credential = %chosen.credential.id,
            version = v.version,
            error = %e,
            "stored credential failed to open",
        );
        Reject::new(
            ErrorCode::UpstreamUnreachable,
            "the stored credential could not be opened; ask the operator to rotate it",
        )
    })
}

/// The tenant's unwrapped keys, from the cache; a miss asks the master key's provider (an HSM
/// or KMS round trip) on a blocking thread.
async fn tenant_keys(
    state: &Arc<State>,
    tenant: &crate::store::TenantRow,
) -> Result<Arc<crate::seal::TenantKeys>, crate::seal::SealError> {
    if let Some(keys) = state.tenant_keys.cached(&tenant.id) {
        return Ok(keys);
    }
    let (st, tenant) = (state.clone(), tenant.clone());
    tokio::task::spawn_blocking(move || st.tenant_keys_of(&tenant))
        .await
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
}

#[allow(clippy::too_many_arguments)]
fn respond(
    state: &Arc<State>,
    response: Response<ResponseBody>,
    secret: &Used,
    chosen: &Candidate,
    known: &Known,
    call_id: &str,
    started: Instant,
    replay: Replay<AppBody>,
    target: &Target,
) -> Response<UpstreamBody> {
    let (mut parts, body) = response.into_parts();
    // The client stores things like the HTTP/1 reason phrase here, which hyper's server would
    // write back verbatim: nothing of the upstream's response travels unscrubbed.
    parts.extensions = http::Extensions::new();
    // Connection-level headers are not relayed, and an upstream must not forge keyward-*.
    crate::providers::strip_hop_by_hop_and_keyward(&mut parts.headers);
    // URLs into the provider's API come back through keyward, where the key and the audit are.
    if let Some(base) = &known.app_base {
        rewrite_upstream_urls(&mut parts.headers, target, base);
    }
    // Scrubbing may change the body's length.
    parts.headers.remove(CONTENT_LENGTH);
    let mut scrubber = Scrubber::from_set(&secret.scrub);
    scrubber.scrub_headers(&mut parts.headers);
    let version = chosen.version().version;
    parts.headers.insert(
        HeaderName::from_static(CALL_ID_HEADER),
        header_value(call_id),
    );
    parts.headers.insert(
        HeaderName::from_static(CREDENTIAL_HEADER),
        header_value(&format!("{}/v{version}", chosen.credential.id)),
    );
    if !known.ticket.warnings.is_empty() {
        parts.headers.insert(
            HeaderName::from_static(BUDGET_HEADER),
            header_value(&format!("exceeded; {}", known.ticket.warnings.join("; "))),
        );
    }
    let content_type = parts
        .headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let mut completed = known.event(EventKind::RequestCompleted, call_id);
    name_credential(&mut completed, chosen);
    completed.upstream_status = Some(parts.status.as_u16());
    let mut body = CompletionBody {
        model_label: crate::metrics::model_label(&chosen.credential.models, known.model.as_deref()),
        client: known.principal.as_ref().map(|p| p.client_id.clone()),
        catalog_seen: state.catalog.generation(),
        inner: ScrubBody::new(
            match &known.upstream {
                Some(upstream) => upstream.idle_guard(body),
                None => state.upstream.load().idle_guard(body),
            },
            scrubber,
        )
        .framed_by(content_type.as_deref()),
        usage: Some(UsageTap::new(content_type.as_deref())),
        bytes_out: 0,
        started,
        event: Some(completed),
        ticket: known.ticket.clone(),
        replay,
        state: state.clone(),
    };
    // An empty body (204, 304, Content-Length: 0) is never polled: delivered with the head.
    if body.inner.is_end_stream() {
        body.complete(None);
    }
    tracing::debug!(
        call_id,
        target = %target.name,
        status = parts.status.as_u16(),
        "upstream answered",
    );
    Response::from_parts(parts, body.boxed())
}

fn header_value(text: &str) -> HeaderValue {
    HeaderValue::from_str(text).unwrap_or_else(|_| HeaderValue::from_static("-"))
}

// === response body ===

/// A response body that keeps request-scoped guards alive until it is dropped.
struct Held<B, G> {
    inner: B,
    _guards: G,
}

impl<B, G> Body for Held<B, G>
where
    B: Body<Data = Bytes> + Unpin,
    G: Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The response body on its way to the app: counts bytes, taps token usage, and writes the
/// `request.completed` row when the stream ends or the app goes away.
struct CompletionBody<B> {
    /// The model's label in `keyward_tokens_total` ([`crate::metrics::model_label`]).
    model_label: String,
    /// The client the response is for: once it is revoked, no further byte reaches it.
    client: Option<String>,
    /// The catalog generation the client was last seen active in.
    catalog_seen: u64,
    inner: B,
    usage: Option<UsageTap>,
    bytes_out: u64,
    started: Instant,
    event: Option<Event>,
    /// Budgets and limits the call's cost and tokens are charged to.
    ticket: crate::governance::Ticket,
    /// The request body, for its size and fingerprint.
    replay: Replay<AppBody>,
    state: Arc<State>,
}

impl<B> CompletionBody<B> {
    fn complete(&mut self, detail: Option<String>) {
        let Some(mut event) = self.event.take() else {
            return;
        };
        event.latency_ms = Some(self.started.elapsed().as_millis() as u64);
        event.bytes_in = Some(self.replay.received());
        event.bytes_out = Some(self.bytes_out);
        event.fingerprint = self.replay.fingerprint();
        if let Some(usage) = self.usage.take().and_then(UsageTap::finish) {
            event.input_tokens = usage.input_tokens;
            event.cached_input_tokens = usage.cached_input_tokens;
            event.cache_write_tokens = usage.cache_write_tokens;
            event.output_tokens = usage.output_tokens;
            event.total_tokens = usage.total_tokens;
            if let Some(target) = &event.target {
                self.state.metrics.tokens(
                    target,
                    &self.model_label,
                    usage.input_tokens,
                    usage.output_tokens,
                );
            }
            let config = self.state.config.load();
            let price = match (&event.target, &event.model) {
                (Some(target), Some(model)) => config.prices.lookup(target, model),
                _ => None,
            };
            match price {
                Some(price) => {
                    let cost = price.cost_micros(&usage);
                    event.cost_micros = Some(cost);
                    if let Some(target) = &event.target {
                        self.state.metrics.cost(target, &self.model_label, cost);
                    }
                }
                None => event.flags.push("unpriced".into()),
            }
        }
        trace_completion(&self.state, &event, self.started, detail.as_deref());
        event.detail = detail;
        let tokens = match (event.input_tokens, event.output_tokens) {
            (None, None) => event.total_tokens,
            (i, o) => Some(i.unwrap_or(0).saturating_add(o.unwrap_or(0))),
        };
        self.state.governance.charge(
            &self.ticket,
            event.credential_id.as_deref(),
            event.cost_micros,
            tokens,
        );
        self.state.audit.enqueue(event);
    }
}

impl<B> Body for CompletionBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => {
                this.complete(None);
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                let e: BoxError = e.into();
                this.complete(Some(format!("response stream failed: {e}")));
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(client) = &this.client
                    && !this
                        .state
                        .catalog
                        .client_still_active(client, &mut this.catalog_seen)
                {
                    this.complete(Some(
                        "the client was revoked while the response streamed; the rest was not \
                         delivered"
                            .into(),
                    ));
                    return Poll::Ready(Some(Err("client revoked".into())));
                }
                if let Some(data) = frame.data_ref() {
                    this.bytes_out += data.len() as u64;
                    if let Some(tap) = this.usage.as_mut() {
                        tap.feed(data);
                    }
                }
                // A body whose end is known from its framing (Content-Length, HTTP/2
                // END_STREAM on the last frame) ends with this frame: the server sends it and
                // never polls again, so this is where the answer is delivered.
                if this.inner.is_end_stream() {
                    this.complete(None);
                }
                Poll::Ready(Some(Ok(frame)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

impl<B> Drop for CompletionBody<B> {
    fn drop(&mut self) {
        if self.event.is_some() {
            self.complete(Some(
                "the app closed the connection before the response ended".into(),
            ));
        }
    }
}

// === operator test calls ===

/// Client id on the audit rows of an operator's test call (`keyward cred test`); app clients'
/// ids are `cli_…`, so no app call carries it.
pub const OPERATOR_CLIENT: &str = "operator";
/// Flag on every audit row of an operator's test call.
pub const OPERATOR_TEST_FLAG: &str = "operator_test";
/// Detail of the `request.resolved` row of an operator's test call.
const OPERATOR_TEST_DETAIL: &str = "operator test call (keyward cred test) from the admin socket";

/// Who a request is for.
enum Caller {
    /// An app on the data socket or the TCP listener, authenticated from its headers and peer.
    App(Option<PeerCred>),
    /// An operator's test call, made from the admin socket: never authenticated from headers.
    Operator(Pinned),
}

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
    fn principal(&self, catalog: &crate::catalog::Catalog) -> Result<Principal, Reject> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn call_ids_are_distinct_time_ordered_v7_uuids() {
        let before = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        let ids: Vec<String> = (0..10_000).map(|_| new_call_id()).collect();
        let distinct: std::collections::HashSet<&String> = ids.iter().collect();
        assert_eq!(distinct.len(), ids.len(), "call ids repeat");
        // Consecutive ids must not reveal a count: their random parts share no long prefix
        // and do not differ by a small amount (as `base + counter` would).
        let random_part =
            |id: &str| u128::from_str_radix(&id.replace('-', ""), 16).unwrap() & ((1 << 62) - 1);
        let close = ids
            .windows(2)
            .filter(|w| random_part(&w[0]).abs_diff(random_part(&w[1])) < 1 << 40)
            .count();
        assert!(
            close < 5,
            "{close} of 9,999 consecutive ids differ only in low bits"
        );
        for id in [&ids[0], &ids[9_999]] {
            let u = uuid::Uuid::parse_str(id).unwrap();
            assert_eq!(u.get_version_num(), 7, "{id}");
            let (secs, nanos) = u.get_timestamp().unwrap().to_unix();
            let millis = secs * 1000 + u64::from(nanos) / 1_000_000;
            assert!(
                millis >= before && millis < before + 60_000,
                "{id}: {millis} vs {before}"
            );
        }
    }
}

//! The data-plane server: accepts connections on the data socket (and optional TCP), and runs
//! each request through the one-way pipeline `auth` → `scope` → `audit` → `seal` →
//! `providers` → upstream → scrub → `audit`.
//!
//! The request is the envelope: `POST /{target}/{provider path}`. Bodies stream in both
//! directions; only the prefix needed to read the model is held before the credential is chosen.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, CONTENT_TYPE, HeaderName, HeaderValue};
use http::{HeaderMap, Request, Response};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::body::{Body, Frame, SizeHint};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::sync::watch;

use super::error::{ErrorCode, error_response};
use super::route::{Route, upstream_uri};
use super::scrub::{ScrubBody, scrub_headers};
use super::upstream::{BoxError, UpstreamBody};
use crate::audit::usage::UsageTap;
use crate::audit::{Event, EventKind, Fingerprinter};
use crate::auth::{AuthError, PeerCred, Principal, authenticate};
use crate::daemon::State;
use crate::providers::{Target, prepare_upstream_headers};
use crate::scope::attrs::{ModelScanner, ModelSource, ScanState, capability, model_source};
use crate::scope::{Candidate, Denial, RequestAttrs, select};
use crate::seal::{Context, CredentialRef, Secret};

/// Response header naming the audit call id.
pub const CALL_ID_HEADER: &str = "keyward-call-id";
/// Response header naming the credential version that served the request.
pub const CREDENTIAL_HEADER: &str = "keyward-credential";

/// Serves the data socket until `stop` turns true, then waits for open connections to finish
/// their in-flight requests (the caller bounds that wait).
pub async fn serve_unix(
    listener: tokio::net::UnixListener,
    state: Arc<State>,
    mut stop: watch::Receiver<bool>,
) {
    let graceful = GracefulShutdown::new();
    loop {
        tokio::select! {
            _ = stopped(&mut stop) => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let peer = stream.peer_cred().ok().map(|c| PeerCred {
                        uid: c.uid(),
                        gid: c.gid(),
                        pid: c.pid().unwrap_or(0),
                    });
                    serve_connection(TokioIo::new(stream), peer, &state, &graceful);
                }
                Err(e) => accept_failed(e).await,
            },
        }
    }
    drop(listener);
    graceful.shutdown().await;
}

/// Serves the optional TCP listener: client tokens only, no peer credentials.
pub async fn serve_tcp(
    listener: tokio::net::TcpListener,
    state: Arc<State>,
    mut stop: watch::Receiver<bool>,
) {
    let graceful = GracefulShutdown::new();
    loop {
        tokio::select! {
            _ = stopped(&mut stop) => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    serve_connection(TokioIo::new(stream), None, &state, &graceful);
                }
                Err(e) => accept_failed(e).await,
            },
        }
    }
    drop(listener);
    graceful.shutdown().await;
}

/// Resolves once `stop` turns true (or its sender is gone).
pub async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

async fn accept_failed(e: std::io::Error) {
    // EMFILE and friends: back off instead of spinning.
    tracing::warn!(error = %e, "data socket accept failed");
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
}

fn serve_connection<I>(
    io: I,
    peer: Option<PeerCred>,
    state: &Arc<State>,
    graceful: &GracefulShutdown,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let limits = &state.config.limits;
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
    let service = service_fn(move |req| {
        let st = st.clone();
        async move { Ok::<_, Infallible>(handle(st, req, peer).await) }
    });
    let conn = builder.serve_connection(io, service).into_owned();
    let watched = graceful.watch(conn);
    tokio::spawn(async move {
        let _ = watched.await;
    });
}

/// A refusal produced by keyward itself.
struct Reject {
    code: ErrorCode,
    message: String,
}

impl Reject {
    fn new(code: ErrorCode, message: impl Into<String>) -> Reject {
        Reject {
            code,
            message: message.into(),
        }
    }
}

/// What is known about a request so far, for its audit rows.
#[derive(Default)]
struct Known {
    principal: Option<Principal>,
    target: Option<String>,
    model: Option<String>,
    capability: Option<String>,
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
            ..Event::new(kind)
        }
    }
}

async fn handle(
    state: Arc<State>,
    req: Request<Incoming>,
    peer: Option<PeerCred>,
) -> Response<UpstreamBody> {
    let started = Instant::now();
    let call_id = uuid::Uuid::new_v4().to_string();
    let Ok(_permit) = state.limiter.try_acquire() else {
        return error_response(
            ErrorCode::Overloaded,
            "too many requests in flight (limits.max_concurrent_requests); retry shortly",
            &call_id,
        );
    };
    let _in_flight = state.track_request();
    let mut known = Known::default();
    match process(&state, req, peer, &call_id, started, &mut known).await {
        Ok(response) => response,
        Err(reject) => {
            if known.principal.is_some() || reject.code != ErrorCode::Unauthenticated {
                let mut event = known.event(EventKind::RequestDenied, &call_id);
                event.detail = Some(format!("{}: {}", reject.code.as_str(), reject.message));
                state.audit.enqueue(event);
            }
            tracing::info!(call_id, code = reject.code.as_str(), reason = %reject.message, "request refused");
            error_response(reject.code, &reject.message, &call_id)
        }
    }
}

async fn process(
    state: &Arc<State>,
    req: Request<Incoming>,
    peer: Option<PeerCred>,
    call_id: &str,
    started: Instant,
    known: &mut Known,
) -> Result<Response<UpstreamBody>, Reject> {
    let route =
        Route::from_request(&req).map_err(|e| Reject::new(ErrorCode::BadRequest, e.to_string()))?;
    let target = state
        .config
        .targets
        .lookup(route.target())
        .map_err(|e| Reject::new(ErrorCode::UnknownTarget, e.to_string()))?
        .clone();
    known.target = Some(target.name.clone());
    let catalog = state.catalog.load();
    let principal = authenticate(&catalog, req.headers(), peer).map_err(|e| match e {
        AuthError::WorkflowNotAllowed { .. } | AuthError::BadWorkflow => {
            Reject::new(ErrorCode::ScopeDenied, e.to_string())
        }
        other => Reject::new(ErrorCode::Unauthenticated, other.to_string()),
    })?;
    known.principal = Some(principal.clone());

    let limit = state.config.limits.max_request_body;
    let declared = declared_length(req.headers());
    if declared.is_some_and(|n| n > limit) {
        return Err(too_large(limit));
    }
    let cap = capability(target.family, route.path());
    known.capability = Some(cap.as_str().to_string());
    let (parts, mut body) = req.into_parts();
    let mut prefix = Vec::new();
    let mut scanner = None;
    let model = match model_source(target.family, route.path()) {
        ModelSource::Path(m) => Some(m),
        ModelSource::Unknown => None,
        ModelSource::JsonBody => {
            let mut s = ModelScanner::new();
            let (model, ended) = read_model(&mut body, &mut s, &mut prefix, limit).await?;
            if !ended {
                scanner = Some(s);
            }
            model
        }
    };
    known.model = model.clone();
    let attrs = RequestAttrs {
        target: target.name.clone(),
        model,
        capability: cap,
    };
    let rotation = state
        .rotation
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let candidates = select(
        &catalog,
        &principal,
        &attrs,
        crate::units::now_unix(),
        rotation,
    )
    .map_err(|d| match d {
        Denial::Scope { message, .. } => Reject::new(ErrorCode::ScopeDenied, message),
        Denial::Policy(message) => Reject::new(ErrorCode::PolicyViolation, message),
    })?;
    let chosen = candidates
        .into_iter()
        .next()
        .expect("select returns at least one candidate");
    let tenant = catalog
        .tenant(&principal.tenant_id)
        .cloned()
        .ok_or_else(|| {
            Reject::new(
                ErrorCode::Unauthenticated,
                "the client's tenant no longer exists",
            )
        })?;

    // Fail closed: the resolution is durable before the key is unsealed or anything is sent.
    let mut resolved = known.event(EventKind::RequestResolved, call_id);
    resolved.credential_id = Some(chosen.credential.id.clone());
    resolved.credential_version = Some(chosen.version().version);
    if chosen.expired_warn {
        resolved.flags.push("expired_key_warn".into());
    }
    let fp_key = state
        .master
        .unwrap_key(
            Context::AuxKey {
                purpose: &crate::admin::fingerprint_purpose(&tenant.id),
            },
            &tenant.wrapped_fp_key,
        )
        .map_err(|e| {
            Reject::new(
                ErrorCode::AuditUnavailable,
                format!("fingerprint key unavailable: {e}"),
            )
        })?;
    let mut fingerprint = Fingerprinter::new(&fp_key);
    if body.is_end_stream() {
        for chunk in &prefix {
            fingerprint.update(chunk);
        }
        resolved.fingerprint = Some(fingerprint.clone().finish());
    }
    state.audit.commit(resolved).await.map_err(|e| {
        Reject::new(
            ErrorCode::AuditUnavailable,
            format!("the audit record could not be written, so nothing was sent upstream: {e}"),
        )
    })?;
    if chosen.expired_warn {
        tracing::warn!(call_id, credential = %chosen.credential.id, "serving a key past the tenant's max key age (policy: warn)");
    }

    let secret = unseal(state, &tenant, &chosen)?;
    let mut headers = parts.headers;
    prepare_upstream_headers(&target, &mut headers, &secret)
        .map_err(|e| Reject::new(ErrorCode::BadRequest, e.to_string()))?;
    let outcome = Arc::new(Mutex::new(BodyOutcome::default()));
    let forward = ForwardBody {
        prefix: prefix.into(),
        rest: (!body.is_end_stream()).then_some(body),
        scanner,
        fingerprint: Some(fingerprint),
        sent: 0,
        limit,
        declared,
        outcome: outcome.clone(),
    };
    let mut upstream_req = Request::new(forward.boxed());
    *upstream_req.method_mut() = parts.method;
    *upstream_req.uri_mut() = upstream_uri(&target, &route);
    *upstream_req.headers_mut() = headers;

    let response = match state.upstream.send(&target, upstream_req).await {
        Ok(r) => r,
        Err(e) => {
            let violation = outcome
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .violation
                .take();
            return Err(match violation {
                Some(v) => v,
                None => Reject::new(e.code(), e.to_string()),
            });
        }
    };
    Ok(respond(
        state, response, &secret, &chosen, known, call_id, started, outcome, &target,
    ))
}

/// Reads body frames until the model is known or the body ends. Returns the model and whether
/// the body has ended.
async fn read_model(
    body: &mut Incoming,
    scanner: &mut ModelScanner,
    prefix: &mut Vec<Bytes>,
    limit: u64,
) -> Result<(Option<String>, bool), Reject> {
    let mut received = 0u64;
    loop {
        let Some(frame) = body.frame().await else {
            return match scanner.finish() {
                ScanState::Found(m) => Ok((Some(m), true)),
                ScanState::Ambiguous => Err(ambiguous()),
                _ => Ok((None, true)),
            };
        };
        let frame = frame.map_err(|e| {
            Reject::new(
                ErrorCode::BadRequest,
                format!("reading the request body failed: {e}"),
            )
        })?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        received += data.len() as u64;
        if received > limit {
            return Err(too_large(limit));
        }
        let state = scanner.feed(&data);
        prefix.push(data);
        match state {
            ScanState::NeedMore => {}
            ScanState::Found(m) => return Ok((Some(m), body.is_end_stream())),
            ScanState::Absent => return Ok((None, body.is_end_stream())),
            ScanState::Ambiguous => return Err(ambiguous()),
        }
    }
}

fn ambiguous() -> Reject {
    Reject::new(
        ErrorCode::BadRequest,
        "the JSON body names its top-level \"model\" more than once or is malformed after it; send one model",
    )
}

fn too_large(limit: u64) -> Reject {
    Reject::new(
        ErrorCode::BodyTooLarge,
        format!("request body is larger than limits.max_request_body ({limit} bytes)"),
    )
}

fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Opens the chosen version's key into locked memory.
fn unseal(
    state: &State,
    tenant: &crate::store::TenantRow,
    chosen: &Candidate,
) -> Result<Secret, Reject> {
    let v = chosen.version();
    state
        .master
        .open_credential(
            &tenant.wrapped_key,
            CredentialRef { tenant: &tenant.id, credential: &chosen.credential.id, version: v.version },
            &v.wrapped_data_key,
            &v.ciphertext,
        )
        .map_err(|e| {
            tracing::error!(credential = %chosen.credential.id, version = v.version, error = %e, "stored credential failed to open");
            Reject::new(ErrorCode::UpstreamUnreachable, "the stored credential could not be opened; ask the operator to rotate it")
        })
}

/// Hop-by-hop response headers that must not be relayed.
const HOP_BY_HOP: [&str; 7] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

#[allow(clippy::too_many_arguments)]
fn respond(
    state: &Arc<State>,
    response: Response<Incoming>,
    secret: &Secret,
    chosen: &Candidate,
    known: &Known,
    call_id: &str,
    started: Instant,
    outcome: Arc<Mutex<BodyOutcome>>,
    target: &Target,
) -> Response<UpstreamBody> {
    let (mut parts, body) = response.into_parts();
    if let Some(names) = parts
        .headers
        .get(http::header::CONNECTION)
        .and_then(|v| v.to_str().ok())
    {
        let named: Vec<String> = names
            .split(',')
            .map(|s| s.trim().to_ascii_lowercase())
            .collect();
        for name in named {
            parts.headers.remove(name.as_str());
        }
    }
    for name in HOP_BY_HOP {
        parts.headers.remove(name);
    }
    // Scrubbing may change the body's length.
    parts.headers.remove(CONTENT_LENGTH);
    scrub_headers(&mut parts.headers, secret);
    let version = chosen.version().version;
    parts.headers.insert(
        HeaderName::from_static(CALL_ID_HEADER),
        header_value(call_id),
    );
    parts.headers.insert(
        HeaderName::from_static(CREDENTIAL_HEADER),
        header_value(&format!("{}/v{version}", chosen.credential.id)),
    );
    let content_type = parts
        .headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let mut completed = known.event(EventKind::RequestCompleted, call_id);
    completed.credential_id = Some(chosen.credential.id.clone());
    completed.credential_version = Some(version);
    completed.upstream_status = Some(parts.status.as_u16());
    let body = CompletionBody {
        inner: ScrubBody::new(state.upstream.idle_guard(body), secret),
        usage: Some(UsageTap::new(content_type.as_deref())),
        bytes_out: 0,
        started,
        event: Some(completed),
        outcome,
        state: state.clone(),
    };
    tracing::debug!(call_id, target = %target.name, status = parts.status.as_u16(), "upstream answered");
    Response::from_parts(parts, body.boxed())
}

fn header_value(text: &str) -> HeaderValue {
    HeaderValue::from_str(text).unwrap_or_else(|_| HeaderValue::from_static("-"))
}

// === request body ===

/// What the forwarded request body learned; read when the call completes.
#[derive(Default)]
struct BodyOutcome {
    /// Bytes sent upstream.
    bytes_in: u64,
    /// Fingerprint of the whole body, once it ended.
    fingerprint: Option<String>,
    /// Why the body was cut (too large, ambiguous model).
    violation: Option<Reject>,
}

/// The request body on its way upstream: the prefix read for the model, then the rest as it
/// arrives, fingerprinted and size-checked on the fly.
struct ForwardBody {
    prefix: std::collections::VecDeque<Bytes>,
    rest: Option<Incoming>,
    scanner: Option<ModelScanner>,
    fingerprint: Option<Fingerprinter>,
    sent: u64,
    limit: u64,
    declared: Option<u64>,
    outcome: Arc<Mutex<BodyOutcome>>,
}

impl ForwardBody {
    fn fail(&mut self, reject: Reject) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let message = reject.message.clone();
        self.outcome
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .violation = Some(reject);
        self.rest = None;
        Poll::Ready(Some(Err(message.into())))
    }

    fn pass(&mut self, data: Bytes) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(fp) = self.fingerprint.as_mut() {
            fp.update(&data);
        }
        self.sent += data.len() as u64;
        Poll::Ready(Some(Ok(Frame::data(data))))
    }

    fn finish(&mut self) {
        let mut outcome = self.outcome.lock().unwrap_or_else(|p| p.into_inner());
        outcome.bytes_in = self.sent;
        if let Some(fp) = self.fingerprint.take() {
            outcome.fingerprint = Some(fp.finish());
        }
    }
}

impl Body for ForwardBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if let Some(chunk) = this.prefix.pop_front() {
            return this.pass(chunk);
        }
        let Some(rest) = this.rest.as_mut() else {
            this.finish();
            return Poll::Ready(None);
        };
        match Pin::new(rest).poll_frame(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => {
                this.rest = None;
                if let Some(ScanState::Ambiguous) = this.scanner.as_mut().map(ModelScanner::finish)
                {
                    return this.fail(ambiguous());
                }
                this.finish();
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(Box::new(e)))),
            Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                Ok(data) => {
                    if this.sent + data.len() as u64 > this.limit {
                        let limit = this.limit;
                        return this.fail(too_large(limit));
                    }
                    if let Some(ScanState::Ambiguous) = this.scanner.as_mut().map(|s| s.feed(&data))
                    {
                        return this.fail(ambiguous());
                    }
                    this.pass(data)
                }
                Err(frame) => Poll::Ready(Some(Ok(frame))),
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.prefix.is_empty() && self.rest.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        match self.declared {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}

// === response body ===

/// The response body on its way to the app: counts bytes, taps token usage, and writes the
/// `request.completed` row when the stream ends or the app goes away.
struct CompletionBody<B> {
    inner: B,
    usage: Option<UsageTap>,
    bytes_out: u64,
    started: Instant,
    event: Option<Event>,
    outcome: Arc<Mutex<BodyOutcome>>,
    state: Arc<State>,
}

impl<B> CompletionBody<B> {
    fn complete(&mut self, detail: Option<String>) {
        let Some(mut event) = self.event.take() else {
            return;
        };
        let outcome = self.outcome.lock().unwrap_or_else(|p| p.into_inner());
        event.latency_ms = Some(self.started.elapsed().as_millis() as u64);
        event.bytes_in = Some(outcome.bytes_in);
        event.bytes_out = Some(self.bytes_out);
        event.fingerprint = outcome.fingerprint.clone();
        if let Some(usage) = self.usage.take().and_then(UsageTap::finish) {
            event.input_tokens = usage.input_tokens;
            event.output_tokens = usage.output_tokens;
            event.total_tokens = usage.total_tokens;
        }
        event.detail = detail;
        drop(outcome);
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
                if let Some(data) = frame.data_ref() {
                    this.bytes_out += data.len() as u64;
                    if let Some(tap) = this.usage.as_mut() {
                        tap.feed(data);
                    }
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

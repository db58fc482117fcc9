//! One call through the data plane, as named phases over one per-call context ([`Call`]):
//!
//! 1. [`admit`]: a call id, the framing check, a slot of `limits.max_concurrent_requests`;
//! 2. [`authenticate`]: the client token and peer → `Principal`, and the client's share;
//! 3. [`route`]: the envelope `/{target}/{provider path}` → `Route` and the target;
//! 4. [`read_body`]: the body prefix up to the model (or the whole body, for a signing target);
//! 5. [`resolve_scope`]: `scope` lists the keys that may serve, `pool` orders them;
//! 6. [`govern`]: budgets and rate limits, before anything is audited or unsealed;
//! 7. [`audit_resolution`]: the `request.resolved` row is durable before a key is unsealed;
//! 8. [`upstream`]: unseal, inject or sign, send — and fail over ([`super::attempt`],
//!    [`super::failover`], [`super::replay`]);
//! 9. [`super::respond`]: scrub the answer and stream it back; `request.completed` is written
//!    when it ends.
//!
//! A phase that refuses returns a [`Reject`]; [`handle`] turns it into the error response and,
//! for an authenticated caller, the audit row. Data flows one way: each phase reads what the
//! earlier ones put into the context and adds its own.

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderValue};
use http::{Request, Response};
use http_body_util::BodyExt;
use hyper::body::{Body, Incoming};

use super::attempt::{KeyAttempts, Outgoing, name_credential, tenant_keys};
use super::body::{BodyScanner, Scan, declared_length, read_model, read_whole, too_large};
use super::error::{ErrorCode, Reject};
use super::failover;
use super::limits::{BodyHold, ShareGuard};
use super::operator::{OPERATOR_TEST_DETAIL, OPERATOR_TEST_FLAG, Pinned};
use super::replay::Replay;
use super::respond::respond;
use super::route::{PathRules, Route, RouteError, app_base, target_name_of};
use super::server::Held;
use super::upstream::{IdleTimeoutBody, Upstream, UpstreamBody};
use crate::audit::{Event, EventKind, Fingerprinter};
use crate::auth::{AuthError, PeerCred, Principal};
use crate::catalog::Catalog;
use crate::config::Config;
use crate::providers::{AuthScheme, Capability, Family, Target};
use crate::scope::attrs::{ModelSource, capability, model_source};
use crate::scope::{Candidate, Denial, RequestAttrs, select};
use crate::seal::TenantKeys;
use crate::state::State;

/// The app's request body, cut off when it stalls for `limits.request_idle_timeout`.
pub(super) type AppBody = IdleTimeoutBody<Incoming>;

/// The per-call context: what the phases learned so far, for the audit rows, the span and the
/// metrics of the call, and the guards it holds until its response ends.
pub(super) struct Call {
    /// The call id: on every audit row, span and response of the call.
    pub id: String,
    /// When the request's head was read.
    pub started: Instant,
    /// The daemon's shared state.
    pub state: Arc<State>,
    /// Who is calling, once authenticated.
    pub principal: Option<Principal>,
    /// The target's name, once routed.
    pub target: Option<String>,
    /// The model the request names, once read.
    pub model: Option<String>,
    /// The capability of the provider path (`chat`, `embeddings`, …).
    pub capability: Option<Capability>,
    /// Where the app reaches keyward (`http://keyward`), for upstream URLs handed back to it.
    pub app_base: Option<String>,
    /// The candidate of the latest attempt, once the request was resolved: a failure after
    /// that point completes the call rather than denying it.
    pub attempted: Option<Candidate>,
    /// The request's place in its client's and tenant's shares, held until the response ends.
    pub share: Option<ShareGuard>,
    /// The upstream clients this request uses, kept until its response ends.
    pub upstream: Option<Arc<Upstream>>,
    /// Time spent waiting for upstream response heads, over all attempts.
    pub upstream_time: std::time::Duration,
    /// The budgets and limits to charge when the call completes (README, "Spend and limits").
    pub ticket: crate::governance::Ticket,
    /// Flags every later audit row of the call carries (`budget_exceeded_warn`).
    pub flags: Vec<String>,
}

impl Call {
    fn new(state: Arc<State>) -> Call {
        Call {
            id: new_call_id(),
            started: Instant::now(),
            state,
            principal: None,
            target: None,
            model: None,
            capability: None,
            app_base: None,
            attempted: None,
            share: None,
            upstream: None,
            upstream_time: Default::default(),
            ticket: Default::default(),
            flags: Vec::new(),
        }
    }

    /// The capability's name, as audit rows and spans carry it.
    pub fn capability_label(&self) -> Option<String> {
        self.capability.map(|c| c.as_str().to_string())
    }

    /// An audit row of `kind` carrying what is known about the call.
    pub fn event(&self, kind: EventKind) -> Event {
        let p = self.principal.as_ref();
        Event {
            call_id: Some(self.id.clone()),
            tenant: p.map(|p| p.tenant_name.clone()),
            client_id: p.map(|p| p.client_id.clone()),
            peer_uid: p.and_then(|p| p.peer).map(|c| c.uid),
            peer_pid: p.and_then(|p| p.peer).map(|c| c.pid.max(0) as u32),
            team: p.and_then(|p| p.team.clone()),
            workflow: p.and_then(|p| p.workflow.clone()),
            target: self.target.clone(),
            model: self.model.clone(),
            capability: self.capability_label(),
            flags: self.flags.clone(),
            ..Event::new(kind)
        }
    }
}

/// Who a request is for.
pub(super) enum Caller {
    /// An app on the data socket or the TCP listener, authenticated from its headers and peer.
    App(Option<PeerCred>),
    /// An operator's test call, made from the admin socket: never authenticated from headers.
    Operator(Pinned),
}

/// How the call's candidate keys are chosen: by `scope` from the caller's tenant, or pinned
/// to one version by an operator's test call.
enum Selection {
    /// `scope::select` over the keys of the caller's tenant, then `pool` ordering.
    Scope,
    /// The one version an operator's test call uses; no other is tried.
    Pinned(Candidate),
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

/// Serves one request (an app's, or an operator's test call): admits it, runs its phases, and
/// answers — with the upstream's scrubbed response, or keyward's error (audited when the caller
/// was authenticated).
pub(super) async fn handle(
    state: Arc<State>,
    req: Request<Incoming>,
    caller: Caller,
    bad_framing: Option<String>,
) -> Response<UpstreamBody> {
    let mut call = Call::new(state);
    if let Some(reason) = bad_framing {
        // Nothing after this head is read (see `app_conn`): the connection ends with the answer.
        drop(req);
        let mut response = refuse(&mut call, Reject::new(ErrorCode::BadRequest, reason));
        response
            .headers_mut()
            .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
        return response;
    }
    let admitted = match admit(&call) {
        Ok(admitted) => admitted,
        Err(reject) => return refuse(&mut call, reject),
    };
    match process(&mut call, req, caller).await {
        // The slot and the in-flight count last until the response body is done, so open
        // streams count against max_concurrent_requests and SIGTERM waits for them.
        Ok(response) => {
            count(&call, response.status().as_u16(), "none");
            response.map(|inner| {
                Held::new(inner, (admitted, call.share.take(), call.upstream.take())).boxed()
            })
        }
        Err(reject) => refuse(&mut call, reject),
    }
}

/// The slot a call holds until its response ends.
type Admitted = (tokio::sync::OwnedSemaphorePermit, crate::state::InFlight);

/// Phase 1: a slot of `limits.max_concurrent_requests`, held with the in-flight count until
/// the response ends. (A head `app_conn` found malformed is refused before this.)
fn admit(call: &Call) -> Result<Admitted, Reject> {
    let permit = call
        .state
        .limiter
        .clone()
        .try_acquire_owned()
        .map_err(|_| {
            Reject::new(
                ErrorCode::Overloaded,
                "too many requests in flight (limits.max_concurrent_requests); retry shortly",
            )
        })?;
    Ok((permit, call.state.track_request()))
}

/// Answers a refused call with keyward's error, after the audit row (for an authenticated
/// caller; anonymous refusals are only logged), the metrics and the span.
fn refuse(call: &mut Call, reject: Reject) -> Response<UpstreamBody> {
    if call.principal.is_some() {
        let kind = match call.attempted {
            Some(_) => EventKind::RequestCompleted,
            None => EventKind::RequestDenied,
        };
        let mut event = call.event(kind);
        if let Some(chosen) = &call.attempted {
            name_credential(&mut event, chosen);
            event.latency_ms = Some(call.started.elapsed().as_millis() as u64);
        }
        event.detail = Some(format!("{}: {}", reject.code.as_str(), reject.message));
        call.state.audit.enqueue(event);
    }
    // A flood over the limiter is counted, not logged line by line.
    if call.principal.is_some() || reject.code != ErrorCode::Overloaded {
        tracing::info!(
            call_id = call.id,
            code = reject.code.as_str(),
            reason = %reject.message,
            "request refused",
        );
    }
    count(call, reject.code.status().as_u16(), reject.code.as_str());
    trace_refusal(call, reject.code);
    reject.response(&call.id)
}

/// Counts an answered request and the time keyward added to it (README, "Metrics and health").
fn count(call: &Call, status: u16, error: &'static str) {
    let metrics = &call.state.metrics;
    let target = call.target.as_deref().unwrap_or(crate::metrics::UNKNOWN);
    metrics.request(target, status, error);
    metrics.overhead(
        target,
        call.started.elapsed().saturating_sub(call.upstream_time),
    );
}

/// Records the span of a call keyward refused (README, "Traces").
fn trace_refusal(call: &Call, code: ErrorCode) {
    call.state.traces.record(|| {
        let end = SystemTime::now();
        crate::traces::CallSpan {
            call_id: call.id.clone(),
            start: end - call.started.elapsed(),
            end,
            target: call.target.clone(),
            capability: call.capability_label(),
            model: call.model.clone(),
            tenant: call.principal.as_ref().map(|p| p.tenant_name.clone()),
            credential: call
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

/// Phases 2 to 9 of an admitted call, in order.
async fn process(
    call: &mut Call,
    req: Request<Incoming>,
    caller: Caller,
) -> Result<Response<UpstreamBody>, Reject> {
    let catalog = call.state.catalog.load();
    let selection = authenticate(call, &catalog, &req, caller)?;
    // One snapshot of the configuration and upstream clients serves the whole request, across
    // a reload (README, "Reload").
    let config = call.state.config.load_full();
    let (route, target) = route(call, &config, &req)?;
    let body = read_body(call, &config, target, &route, req).await?;
    let candidates = resolve_scope(call, &catalog, target, selection)?;
    let candidates = govern(call, candidates).await?;
    let resolution = audit_resolution(call, &catalog, &candidates, &config, body).await?;
    let (index, answer) = upstream(call, &resolution, &candidates, target, &route).await?;
    Ok(respond(
        call,
        answer,
        &candidates[index],
        resolution.replay,
        target,
    ))
}

/// Phase 2: who is calling (README, "How applications connect"), and its place in its
/// client's and tenant's shares of the limiter. First, so a caller without credentials costs
/// one hash lookup, never path decoding, and leaves no audit row it could use to flood the
/// trail; the share is taken before anything else is read, so a client at its limit costs no
/// more. An operator's test call is not authenticated from headers: its principal is the
/// pinned credential's tenant, and it says which key [`resolve_scope`] takes.
fn authenticate(
    call: &mut Call,
    catalog: &Catalog,
    req: &Request<Incoming>,
    caller: Caller,
) -> Result<Selection, Reject> {
    let (principal, selection) = match caller {
        Caller::App(peer) => {
            let principal =
                crate::auth::authenticate(catalog, req.headers(), peer).map_err(|e| match e {
                    AuthError::WorkflowNotAllowed { .. } | AuthError::BadWorkflow => {
                        Reject::new(ErrorCode::ScopeDenied, e.to_string())
                    }
                    other => Reject::new(ErrorCode::Unauthenticated, other.to_string()),
                })?;
            (principal, Selection::Scope)
        }
        Caller::Operator(pinned) => {
            call.flags.push(OPERATOR_TEST_FLAG.into());
            (
                pinned.principal(catalog)?,
                Selection::Pinned(pinned.candidate),
            )
        }
    };
    let share = call
        .state
        .shares
        .try_take(&principal.client_id, &principal.tenant_id)
        .map_err(|e| Reject::new(ErrorCode::Overloaded, e.message()))?;
    call.share = Some(share);
    call.principal = Some(principal);
    Ok(selection)
}

/// Phase 3: the envelope `POST /{target}/{provider path}` → the route and its target in the
/// call's configuration snapshot, and the capability of the provider path.
fn route<'c>(
    call: &mut Call,
    config: &'c Config,
    req: &Request<Incoming>,
) -> Result<(Route, &'c Target), Reject> {
    call.app_base = Some(app_base(req));
    let route = Route::from_request(req)
        .or_else(|e| match e {
            // The AWS SDKs encode the `:` and `/` of Bedrock model ids (README, "Bedrock").
            RouteError::EncodedColon | RouteError::EncodedSlash
                if is_bedrock(config, req.uri()) =>
            {
                Route::from_request_with(req, PathRules::BedrockModelId)
            }
            e => Err(e),
        })
        .map_err(|e| Reject::new(ErrorCode::BadRequest, e.to_string()))?;
    call.upstream = Some(call.state.upstream.load_full());
    let target = config
        .targets
        .lookup(route.target())
        .map_err(|e| Reject::new(ErrorCode::UnknownTarget, e.to_string()))?;
    call.target = Some(target.name.clone());
    Ok((route, target))
}

/// Whether the request names a Bedrock-family target (whose model ids may carry `%3A`).
fn is_bedrock(config: &Config, uri: &http::Uri) -> bool {
    config
        .targets
        .get(target_name_of(uri))
        .is_some_and(|t| t.family == Family::Bedrock)
}

/// What [`read_body`] read of the app's request, and the rest still to come.
struct Intake {
    /// The request's method and headers (the body is in `prefix` and `rest`).
    parts: http::request::Parts,
    /// The app's `Content-Length`, when it declared one.
    declared: Option<u64>,
    /// Body chunks read so far, counted in `held`.
    prefix: Vec<Bytes>,
    /// The bytes of `prefix`, against `limits.max_buffered_bodies`.
    held: BodyHold,
    /// The body not read yet; `None` once it has ended.
    rest: Option<AppBody>,
    /// Watches the rest for a second model.
    scanner: Option<BodyScanner>,
    /// Hex SHA-256 of the whole body, for SigV4 targets (whose body is read whole first).
    body_sha256: Option<String>,
}

/// Phase 4: reads the body as far as choosing a key needs — up to the model it names (within
/// `limits.max_model_scan`), or whole for a target that signs the body's hash — holding what
/// was read against `limits.max_buffered_bodies`. Refuses a body declared or found larger
/// than `limits.max_request_body`.
async fn read_body(
    call: &mut Call,
    config: &Config,
    target: &Target,
    route: &Route,
    req: Request<Incoming>,
) -> Result<Intake, Reject> {
    let limits = &config.limits;
    let limit = limits.max_request_body;
    let declared = declared_length(req.headers());
    if declared.is_some_and(|n| n > limit) {
        return Err(too_large(limit));
    }
    call.capability = Some(capability(target.family, route.path()));
    let content_type = req
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let (parts, body) = req.into_parts();
    let mut body = IdleTimeoutBody::for_app(
        body,
        limits.request_idle_timeout,
        limits.request_body_timeout,
    );
    let mut prefix = Vec::new();
    let bodies = &call.state.bodies;
    let mut held = bodies.hold();
    let mut scanner = None;
    let model = match model_source(target.family, route.path()) {
        ModelSource::Path(m) => Some(m),
        ModelSource::Unknown => None,
        ModelSource::JsonBody => {
            let mut s = BodyScanner::for_content_type(content_type.as_deref());
            let scan = Scan {
                limit,
                window: limits.max_model_scan,
                budget: bodies.limit(),
            };
            let (model, ended) =
                read_model(&mut body, &mut s, &mut prefix, &mut held, scan).await?;
            if !ended {
                scanner = Some(s);
            }
            model
        }
    };
    call.model = model;
    // SigV4 signs the body's hash, so a signed request's body is read whole before it is sent.
    let body_sha256 = if matches!(target.auth, AuthScheme::SigV4 { .. }) {
        let scan = Scan {
            limit,
            window: limit,
            budget: bodies.limit(),
        };
        Some(read_whole(&mut body, &mut prefix, &mut held, scan).await?)
    } else {
        None
    };
    let rest = (body_sha256.is_none() && !body.is_end_stream()).then_some(body);
    Ok(Intake {
        parts,
        declared,
        prefix,
        held,
        rest,
        scanner,
        body_sha256,
    })
}

/// Phase 5: the keys of the caller's tenant whose scope allows this target, model and
/// capability (`scope`), or the one key an operator's test call pinned, in the order to try
/// them: `pool` moves those cooling down or quarantined to the back.
fn resolve_scope(
    call: &mut Call,
    catalog: &Catalog,
    target: &Target,
    selection: Selection,
) -> Result<Vec<Candidate>, Reject> {
    let principal = call.principal.as_ref().expect("authenticated");
    let attrs = RequestAttrs {
        target: target.name.clone(),
        model: call.model.clone(),
        capability: call.capability.expect("read_body sets it"),
    };
    let rotation = call
        .state
        .rotation
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let candidates = match selection {
        // An operator's test call uses its one key: no other is tried, so a refusal names it.
        Selection::Pinned(candidate) => vec![candidate],
        Selection::Scope => select(
            catalog,
            principal,
            &attrs,
            crate::units::now_unix(),
            rotation,
        )
        .map_err(|d| match d {
            Denial::Scope { message, .. } => Reject::new(ErrorCode::ScopeDenied, message),
            Denial::Policy(message) => Reject::new(ErrorCode::PolicyViolation, message),
        })?,
    };
    Ok(call.state.pool.arrange(candidates, SystemTime::now()))
}

/// Phase 6: budgets and rate limits (README, "Spend and limits"), before the resolution is
/// audited or any key unsealed. Keys whose own budget is spent are dropped; the ticket to
/// charge when the call completes goes into the context.
async fn govern(call: &mut Call, mut candidates: Vec<Candidate>) -> Result<Vec<Candidate>, Reject> {
    let principal = call.principal.as_ref().expect("authenticated");
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
        call.state.governance.check(caller, &ids).await?
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
            call_id = call.id,
            budgets = %ticket.warnings.join("; "),
            "serving over a budget (on_exceed: warn)"
        );
        call.flags.push("budget_exceeded_warn".into());
    }
    call.ticket = ticket;
    Ok(candidates)
}

/// What [`audit_resolution`] settled: the tenant whose keys serve, and the body every attempt
/// sends.
struct Resolution {
    /// The tenant's id.
    tenant: String,
    /// The tenant's unwrapped keys.
    keys: Arc<TenantKeys>,
    /// The request body, shared by the attempts.
    replay: Replay<AppBody>,
    /// The app's method and headers, which every attempt reuses.
    parts: http::request::Parts,
    /// The app's `Content-Length`, when it declared one.
    declared: Option<u64>,
    /// Hex SHA-256 of the whole body, for SigV4 targets.
    body_sha256: Option<String>,
}

/// Phase 7: fail closed — the `request.resolved` row naming the first key is durable before
/// any key is unsealed or anything is sent.
async fn audit_resolution(
    call: &mut Call,
    catalog: &Catalog,
    candidates: &[Candidate],
    config: &Config,
    body: Intake,
) -> Result<Resolution, Reject> {
    let principal = call.principal.as_ref().expect("authenticated");
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
    let mut resolved = call.event(EventKind::RequestResolved);
    name_credential(&mut resolved, first);
    if call.flags.iter().any(|f| f == OPERATOR_TEST_FLAG) {
        resolved.detail = Some(OPERATOR_TEST_DETAIL.into());
    }
    let keys = tenant_keys(&call.state, &tenant).await.map_err(|e| {
        Reject::new(
            ErrorCode::AuditUnavailable,
            format!("fingerprint key unavailable: {e}"),
        )
    })?;
    let replay = Replay::new(
        (body.prefix, body.held),
        body.rest,
        body.scanner,
        Fingerprinter::new(&keys.fingerprint),
        config.limits.max_request_body,
        candidates.len() > 1,
    );
    resolved.fingerprint = replay.fingerprint();
    let committing = Instant::now();
    let committed = call.state.audit.commit(resolved).await;
    call.state.metrics.audit_commit(committing.elapsed());
    committed.map_err(|e| {
        Reject::new(
            ErrorCode::AuditUnavailable,
            format!("the audit record could not be written, so nothing was sent upstream: {e}"),
        )
    })?;
    Ok(Resolution {
        tenant: tenant.id.clone(),
        keys,
        replay,
        parts: body.parts,
        declared: body.declared,
        body_sha256: body.body_sha256,
    })
}

/// Phase 8: sends the request with each candidate key in turn until one's answer is handed to
/// the app ([`failover::run`]); returns which candidate that was and its answer.
async fn upstream(
    call: &mut Call,
    resolution: &Resolution,
    candidates: &[Candidate],
    target: &Target,
    route: &Route,
) -> Result<(usize, super::attempt::Answer), Reject> {
    let upstream = call.upstream.clone().expect("routed");
    let request = Outgoing {
        method: &resolution.parts.method,
        headers: &resolution.parts.headers,
        target,
        route,
        declared: resolution.declared,
        upstream: &upstream,
        body_sha256: resolution.body_sha256.as_deref(),
    };
    let mut attempts = KeyAttempts::new(
        call,
        (&resolution.tenant, &resolution.keys),
        &request,
        candidates,
        &resolution.replay,
    );
    failover::run(&mut attempts, candidates.len(), &resolution.replay).await
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

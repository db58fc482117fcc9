//! Phase 9 of a call ([`super::call`]): the answer that reaches the app. Headers are cleaned
//! and scrubbed here; the body is scrubbed as it streams ([`super::scrub`]), counted, tapped
//! for token usage, and ends in the `request.completed` row, the spend charge and the span.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use http::Response;
use http::header::{CONTENT_LENGTH, CONTENT_TYPE, HeaderName, HeaderValue};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, SizeHint};

use super::attempt::{Answer, name_credential};
use super::call::{AppBody, Call};
use super::error::CALL_ID_HEADER;
use super::replay::Replay;
use super::route::rewrite_upstream_urls;
use super::scrub::{ScrubBody, Scrubber};
use super::upstream::{BoxError, UpstreamBody};
use crate::audit::usage::UsageTap;
use crate::audit::{Event, EventKind};
use crate::providers::Target;
use crate::scope::Candidate;
use crate::state::State;

/// Response header naming the credential version that served the request.
pub(super) const CREDENTIAL_HEADER: &str = "keyward-credential";
/// Header on a response served over a `warn` budget: which budgets are spent, by how much.
pub(super) const BUDGET_HEADER: &str = "keyward-budget";

/// Phase 9 of a call: the answer of the key that served, on its way to the app — without
/// connection-level or forged `keyward-*` headers, with upstream URLs pointing back at
/// keyward, scrubbed of every secret in `used`, with `keyward-call-id`, `keyward-credential`
/// (and `keyward-budget` over a `warn` budget) added, its body counted and tapped for usage
/// until it ends and the `request.completed` row is written.
pub(super) fn respond(
    call: &Call,
    (response, used): Answer,
    chosen: &Candidate,
    replay: Replay<AppBody>,
    target: &Target,
) -> Response<UpstreamBody> {
    let (state, call_id) = (&call.state, call.id.as_str());
    let (mut parts, body) = response.into_parts();
    // The client stores things like the HTTP/1 reason phrase here, which hyper's server would
    // write back verbatim: nothing of the upstream's response travels unscrubbed.
    parts.extensions = http::Extensions::new();
    // Connection-level headers are not relayed, and an upstream must not forge keyward-*.
    crate::wire::strip_hop_by_hop_and_keyward(&mut parts.headers);
    // URLs into the provider's API come back through keyward, where the key and the audit are.
    if let Some(base) = &call.app_base {
        rewrite_upstream_urls(&mut parts.headers, target, base);
    }
    // Scrubbing may change the body's length.
    parts.headers.remove(CONTENT_LENGTH);
    let mut scrubber = Scrubber::from_set(&used.scrub);
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
    if !call.ticket.warnings.is_empty() {
        parts.headers.insert(
            HeaderName::from_static(BUDGET_HEADER),
            header_value(&format!("exceeded; {}", call.ticket.warnings.join("; "))),
        );
    }
    let content_type = parts
        .headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let mut completed = call.event(EventKind::RequestCompleted);
    name_credential(&mut completed, chosen);
    completed.upstream_status = Some(parts.status.as_u16());
    let mut body = CompletionBody {
        model_label: crate::metrics::model_label(&chosen.credential.models, call.model.as_deref()),
        client: call.principal.as_ref().map(|p| p.client_id.clone()),
        catalog_seen: state.catalog.generation(),
        inner: ScrubBody::new(
            match &call.upstream {
                Some(upstream) => upstream.idle_guard(body),
                None => state.upstream.load().idle_guard(body),
            },
            scrubber,
        )
        .framed_by(content_type.as_deref()),
        usage: Some(UsageTap::new(content_type.as_deref())),
        bytes_out: 0,
        started: call.started,
        event: Some(completed),
        ticket: call.ticket.clone(),
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

/// The response body on its way to the app: counts bytes, taps token usage, and writes the
/// `request.completed` row when the stream ends or the app goes away.
pub(super) struct CompletionBody<B> {
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
        cx: &mut Context<'_>,
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

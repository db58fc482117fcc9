//! OpenTelemetry traces (README, "Traces"): one span per data-plane call, exported over
//! OTLP/HTTP with protobuf bodies to `otlp_endpoint`.
//!
//! The request path only fills a [`CallSpan`] from what its audit row already holds (ids,
//! names, numbers) and offers it to a bounded queue with `try_send`: when the queue is full the
//! span is dropped and counted, so a slow or dead collector never slows a call. A thread of its
//! own, with a single-threaded runtime, turns queued spans into OTLP spans, batches them and
//! posts them with `opentelemetry-otlp`'s exporter over a hyper + rustls (ring) client, the
//! same stack keyward uses upstream. A batch the collector refuses or cannot take is dropped
//! and counted, not retried: the next batch tries again.
//!
//! Attributes follow the OpenTelemetry GenAI semantic conventions
//! (<https://opentelemetry.io/docs/specs/semconv/gen-ai/gen-ai-spans/>) plus keyward's call
//! id, tenant and credential. A span never carries a header value, token, payload or secret:
//! [`CallSpan`] has no field that could hold one.

use std::borrow::Cow;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use opentelemetry::trace::{
    SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState,
};
use opentelemetry::{InstrumentationScope, KeyValue};
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanExporter, SpanLinks};

/// Spans that may wait for export; more are dropped and counted.
pub const QUEUE: usize = 2048;
/// Most spans in one export request.
const MAX_BATCH: usize = 512;
/// Longest a span waits for its batch to fill before the batch is sent.
const BATCH_DELAY: Duration = Duration::from_millis(500);
/// Longest one export request may take (connect, send, answer).
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest collector answer read.
const MAX_ANSWER: usize = 1 << 20;

/// What one data-plane call contributes to its span: identifiers, names and counts keyward
/// decided or the provider reported, never a header value, token, payload or secret.
#[derive(Debug, Clone)]
pub struct CallSpan {
    /// keyward's call id (a UUID, as in `keyward-call-id`); also the span's trace id.
    pub call_id: String,
    /// When keyward received the request.
    pub start: SystemTime,
    /// When the call ended: the last response byte, or keyward's refusal.
    pub end: SystemTime,
    /// The configured target, when the request named one.
    pub target: Option<String>,
    /// keyward's capability name (`chat`, `embeddings`, …).
    pub capability: Option<String>,
    /// The model the request asked for.
    pub model: Option<String>,
    /// The authenticated client's tenant.
    pub tenant: Option<String>,
    /// The credential that served the call, and its version.
    pub credential: Option<(String, u32)>,
    /// The HTTP status the app got.
    pub status: u16,
    /// keyward's error code, the upstream's error status, or why the response stream ended
    /// early; `None` when the call succeeded.
    pub error: Option<Cow<'static, str>>,
    /// Input tokens the provider reported.
    pub input_tokens: Option<u64>,
    /// Output tokens the provider reported.
    pub output_tokens: Option<u64>,
}

/// `gen_ai.provider.name` for a target: the well-known value of the GenAI conventions for the
/// built-in presets, the target's own name otherwise.
pub fn provider_name(target: &str) -> &str {
    match target {
        "gemini" => "gcp.gemini",
        "vertex" | "vertex-ai" => "gcp.vertex_ai",
        "azure-openai" => "azure.ai.openai",
        "bedrock" => "aws.bedrock",
        "mistral" => "mistral_ai",
        "xai" => "x_ai",
        other => other,
    }
}

/// `gen_ai.operation.name` for a capability: the conventions' names where one applies
/// (`chat`, `text_completion`, `embeddings`), keyward's capability name otherwise.
pub fn operation_name(capability: &str) -> &str {
    match capability {
        "completions" => "text_completion",
        other => other,
    }
}

/// The 16 bytes of a UUID in its text form, or `None`.
fn uuid_bytes(text: &str) -> Option<[u8; 16]> {
    uuid::Uuid::parse_str(text).ok().map(|u| u.into_bytes())
}

impl CallSpan {
    /// The OTLP span: trace id = the call id's 128 bits (so a trace is found from
    /// `keyward-call-id`), span id = its last 64 bits, kind `CLIENT`, named
    /// `{operation} {model}` as the GenAI conventions ask.
    pub fn to_span_data(&self, scope: &InstrumentationScope) -> SpanData {
        let id = uuid_bytes(&self.call_id).unwrap_or_else(|| {
            let mut b = [0; 16];
            crate::seal::fill_random(&mut b);
            b
        });
        let mut span_id: [u8; 8] = id[8..].try_into().expect("8 of 16 bytes");
        if span_id == [0; 8] {
            span_id[7] = 1;
        }
        let operation = self.capability.as_deref().map(operation_name);
        let name = match (operation, &self.model) {
            (Some(op), Some(model)) => format!("{op} {model}"),
            (Some(op), None) => op.to_string(),
            (None, _) => "keyward call".to_string(),
        };
        let mut attributes = Vec::with_capacity(16);
        let mut add = |key: &'static str, value: opentelemetry::Value| {
            attributes.push(KeyValue::new(key, value));
        };
        if let Some(target) = &self.target {
            let provider = provider_name(target).to_string();
            add("gen_ai.provider.name", provider.clone().into());
            // The attribute the conventions used before `gen_ai.provider.name`.
            add("gen_ai.system", provider.into());
            add("keyward.target", target.clone().into());
        }
        if let Some(op) = operation {
            add("gen_ai.operation.name", op.to_string().into());
        }
        if let Some(model) = &self.model {
            add("gen_ai.request.model", model.clone().into());
        }
        if let Some(n) = self.input_tokens {
            add("gen_ai.usage.input_tokens", (n as i64).into());
        }
        if let Some(n) = self.output_tokens {
            add("gen_ai.usage.output_tokens", (n as i64).into());
        }
        add("http.response.status_code", i64::from(self.status).into());
        if let Some(error) = &self.error {
            add("error.type", error.to_string().into());
        }
        add("keyward.call_id", self.call_id.clone().into());
        if let Some(tenant) = &self.tenant {
            add("keyward.tenant", tenant.clone().into());
        }
        if let Some((id, version)) = &self.credential {
            add("keyward.credential.id", id.clone().into());
            add("keyward.credential.version", i64::from(*version).into());
        }
        if let Some(capability) = &self.capability {
            add("keyward.capability", capability.clone().into());
        }
        SpanData {
            span_context: SpanContext::new(
                TraceId::from_bytes(id),
                SpanId::from_bytes(span_id),
                TraceFlags::SAMPLED,
                false,
                TraceState::NONE,
            ),
            parent_span_id: SpanId::INVALID,
            parent_span_is_remote: false,
            span_kind: SpanKind::Client,
            name: name.into(),
            start_time: self.start,
            end_time: self.end.max(self.start),
            attributes,
            dropped_attributes_count: 0,
            events: SpanEvents::default(),
            links: SpanLinks::default(),
            status: match &self.error {
                Some(e) => Status::error(e.to_string()),
                None => Status::Unset,
            },
            instrumentation_scope: scope.clone(),
        }
    }
}

/// Counts of spans by fate, over the process lifetime (`/metrics`).
#[derive(Debug, Default)]
pub struct Counts {
    /// Spans the collector accepted.
    pub exported: AtomicU64,
    /// Spans dropped because the queue was full.
    pub dropped: AtomicU64,
    /// Spans in batches the collector refused or could not be reached for.
    pub failed: AtomicU64,
}

/// The trace pipeline of a running keyward: off, or one exporter for `otlp_endpoint`.
/// Switching endpoints (a reload) starts a new exporter and lets the old one flush and end.
#[derive(Default)]
pub struct Tracing {
    exporter: ArcSwapOption<Exporter>,
    counts: Arc<Counts>,
}

/// One queue and the thread that empties it into a collector.
struct Exporter {
    /// The collector's base URL as configured.
    endpoint: String,
    queue: tokio::sync::mpsc::Sender<CallSpan>,
    /// Told when the thread has flushed the queue and ended.
    done: Mutex<Option<std::sync::mpsc::Receiver<()>>>,
}

impl Tracing {
    /// Whether spans are being recorded.
    pub fn enabled(&self) -> bool {
        self.exporter.load().is_some()
    }

    /// The span counts.
    pub fn counts(&self) -> &Counts {
        &self.counts
    }

    /// The collector spans go to, if any.
    pub fn endpoint(&self) -> Option<String> {
        self.exporter.load().as_ref().map(|e| e.endpoint.clone())
    }

    /// Offers the span `make` builds to the queue; `make` runs only when tracing is on. Never
    /// waits: a full queue drops the span and counts it.
    pub fn record(&self, make: impl FnOnce() -> CallSpan) {
        let guard = self.exporter.load();
        let Some(exporter) = guard.as_ref() else {
            return;
        };
        if exporter.queue.try_send(make()).is_err() {
            self.counts.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Points the pipeline at `endpoint` (`None` turns it off). Does nothing when it already
    /// goes there; otherwise starts the new exporter first, then lets the old one flush in the
    /// background. `instance` becomes the `service.instance.id` resource attribute.
    pub fn configure(&self, endpoint: Option<&str>, instance: &str) -> Result<(), TraceError> {
        let current = self.exporter.load();
        if current.as_ref().map(|e| e.endpoint.as_str()) == endpoint {
            return Ok(());
        }
        let next = match endpoint {
            Some(url) => Some(Arc::new(Exporter::start(
                url,
                instance,
                self.counts.clone(),
            )?)),
            None => None,
        };
        self.exporter.store(next);
        Ok(())
    }

    /// Stops recording and waits up to `grace` for queued spans to be sent. Returns whether
    /// the exporter finished in time (true when tracing was off).
    pub fn shutdown(&self, grace: Duration) -> bool {
        let Some(exporter) = self.exporter.swap(None) else {
            return true;
        };
        let done = crate::lock(&exporter.done).take();
        // The queue closes when the last sender goes; a request still holding a load guard
        // lets it go when it returns.
        drop(exporter);
        done.is_none_or(|d| d.recv_timeout(grace).is_ok())
    }
}

/// Why the trace exporter could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TraceError {
    /// The OTLP exporter refused its settings.
    #[error("otlp_endpoint {endpoint}: {reason}")]
    Exporter {
        /// The configured endpoint.
        endpoint: String,
        /// What the exporter said.
        reason: String,
    },
    /// The export thread could not be started.
    #[error("cannot start the trace export thread: {0}")]
    Thread(std::io::Error),
}

impl Exporter {
    fn start(endpoint: &str, instance: &str, counts: Arc<Counts>) -> Result<Exporter, TraceError> {
        let url = format!("{}/v1/traces", endpoint.trim_end_matches('/'));
        let err = |reason: String| TraceError::Exporter {
            endpoint: endpoint.to_string(),
            reason,
        };
        let mut otlp = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
            .with_endpoint(url)
            .with_timeout(EXPORT_TIMEOUT)
            .with_retry_policy(opentelemetry_otlp::RetryPolicy::disabled())
            .with_http_client(OtlpClient::new())
            .build()
            .map_err(|e| err(e.to_string()))?;
        otlp.set_resource(
            &opentelemetry_sdk::Resource::builder()
                .with_service_name("keyward")
                .with_attributes([
                    KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
                    KeyValue::new("service.instance.id", instance.to_string()),
                ])
                .build(),
        );
        let (queue, rx) = tokio::sync::mpsc::channel(QUEUE);
        let (done_tx, done) = std::sync::mpsc::channel();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(TraceError::Thread)?;
        let target = endpoint.to_string();
        std::thread::Builder::new()
            .name("keyward-otlp".into())
            .spawn(move || {
                runtime.block_on(export_loop(rx, otlp, counts, &target));
                let _ = done_tx.send(());
            })
            .map_err(TraceError::Thread)?;
        Ok(Exporter {
            endpoint: endpoint.to_string(),
            queue,
            done: Mutex::new(Some(done)),
        })
    }
}

/// Sends batches until the queue is closed and empty.
async fn export_loop(
    mut rx: tokio::sync::mpsc::Receiver<CallSpan>,
    otlp: opentelemetry_otlp::SpanExporter,
    counts: Arc<Counts>,
    endpoint: &str,
) {
    let scope = InstrumentationScope::builder("keyward")
        .with_version(env!("CARGO_PKG_VERSION"))
        .build();
    let mut failing = false;
    let mut batch = Vec::with_capacity(MAX_BATCH);
    loop {
        let Some(first) = rx.recv().await else {
            return;
        };
        batch.push(first);
        let deadline = tokio::time::Instant::now() + BATCH_DELAY;
        let mut closed = false;
        while batch.len() < MAX_BATCH {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(span)) => batch.push(span),
                Ok(None) => {
                    closed = true;
                    break;
                }
                Err(_) => break,
            }
        }
        let n = batch.len() as u64;
        let spans = batch.drain(..).map(|s| s.to_span_data(&scope)).collect();
        let result = tokio::time::timeout(EXPORT_TIMEOUT * 2, otlp.export(spans)).await;
        match result {
            Ok(Ok(())) => {
                counts.exported.fetch_add(n, Ordering::Relaxed);
                if failing {
                    tracing::info!(endpoint, "trace export works again");
                    failing = false;
                }
            }
            Ok(Err(e)) => {
                counts.failed.fetch_add(n, Ordering::Relaxed);
                if !failing {
                    tracing::warn!(
                        endpoint,
                        error = %e,
                        "trace export failed; spans are dropped (and counted) until it works",
                    );
                    failing = true;
                }
            }
            Err(_) => {
                counts.failed.fetch_add(n, Ordering::Relaxed);
                if !failing {
                    tracing::warn!(endpoint, "trace export timed out; spans are dropped");
                    failing = true;
                }
            }
        }
        if closed {
            return;
        }
    }
}

/// The HTTP client of the OTLP exporter: hyper over rustls with the ring provider and the web
/// PKI roots, for `http://` and `https://` collectors.
#[derive(Clone)]
struct OtlpClient {
    client: hyper_util::client::legacy::Client<
        hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
        Full<Bytes>,
    >,
}

impl std::fmt::Debug for OtlpClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OtlpClient")
    }
}

impl OtlpClient {
    fn new() -> OtlpClient {
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .expect("the ring provider supports TLS 1.2 and 1.3")
        .with_root_certificates(roots)
        .with_no_client_auth();
        let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(EXPORT_TIMEOUT));
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .pool_timer(hyper_util::rt::TokioTimer::new())
                .pool_idle_timeout(Duration::from_secs(30))
                .build(connector);
        OtlpClient { client }
    }
}

#[async_trait::async_trait]
impl opentelemetry_http::HttpClient for OtlpClient {
    async fn send_bytes(
        &self,
        request: http::Request<Bytes>,
    ) -> Result<http::Response<Bytes>, opentelemetry_http::HttpError> {
        let (parts, body) = request.into_parts();
        let request = http::Request::from_parts(parts, Full::new(body));
        let exchange = async {
            let response = self.client.request(request).await?;
            let (parts, body) = response.into_parts();
            let body = Limited::new(body, MAX_ANSWER).collect().await?.to_bytes();
            Ok::<_, opentelemetry_http::HttpError>(http::Response::from_parts(parts, body))
        };
        tokio::time::timeout(EXPORT_TIMEOUT, exchange)
            .await
            .map_err(|_| format!("no answer within {EXPORT_TIMEOUT:?}"))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::Value;

    fn span() -> CallSpan {
        let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        CallSpan {
            call_id: "01937a4e-1b2c-7d3e-8f40-5a6b7c8d9e0f".into(),
            start,
            end: start + Duration::from_millis(250),
            target: Some("gemini".into()),
            capability: Some("chat".into()),
            model: Some("gemini-2.5-pro".into()),
            tenant: Some("acme".into()),
            credential: Some(("cred_1".into(), 3)),
            status: 200,
            error: None,
            input_tokens: Some(12),
            output_tokens: Some(34),
        }
    }

    fn attr<'a>(data: &'a SpanData, key: &str) -> Option<&'a Value> {
        data.attributes
            .iter()
            .find(|kv| kv.key.as_str() == key)
            .map(|kv| &kv.value)
    }

    #[test]
    fn a_call_becomes_a_genai_client_span_keyed_by_its_call_id() {
        let scope = InstrumentationScope::builder("keyward").build();
        let data = span().to_span_data(&scope);
        assert_eq!(
            data.span_context.trace_id().to_string(),
            "01937a4e1b2c7d3e8f405a6b7c8d9e0f"
        );
        assert_eq!(data.span_context.span_id().to_string(), "8f405a6b7c8d9e0f");
        assert_eq!(data.span_kind, SpanKind::Client);
        assert_eq!(data.name, "chat gemini-2.5-pro");
        assert_eq!(data.status, Status::Unset);
        for (key, want) in [
            ("gen_ai.provider.name", Value::from("gcp.gemini")),
            ("gen_ai.system", Value::from("gcp.gemini")),
            ("gen_ai.operation.name", Value::from("chat")),
            ("gen_ai.request.model", Value::from("gemini-2.5-pro")),
            ("gen_ai.usage.input_tokens", Value::I64(12)),
            ("gen_ai.usage.output_tokens", Value::I64(34)),
            ("http.response.status_code", Value::I64(200)),
            ("keyward.tenant", Value::from("acme")),
            ("keyward.credential.id", Value::from("cred_1")),
            ("keyward.credential.version", Value::I64(3)),
        ] {
            assert_eq!(attr(&data, key), Some(&want), "{key}");
        }
        assert_eq!(attr(&data, "error.type"), None);
    }

    #[test]
    fn a_refusal_is_an_error_span_named_by_its_code() {
        let scope = InstrumentationScope::builder("keyward").build();
        let mut s = span();
        s.status = 403;
        s.error = Some("scope_denied".into());
        s.credential = None;
        s.input_tokens = None;
        s.capability = Some("completions".into());
        let data = s.to_span_data(&scope);
        assert_eq!(data.name, "text_completion gemini-2.5-pro");
        assert_eq!(data.status, Status::error("scope_denied"));
        assert_eq!(
            attr(&data, "error.type"),
            Some(&Value::from("scope_denied"))
        );
        assert_eq!(attr(&data, "keyward.credential.id"), None);
        assert_eq!(attr(&data, "gen_ai.usage.input_tokens"), None);
        // An end before the start (a clock step) never makes a negative span.
        s.end = s.start - Duration::from_secs(1);
        assert_eq!(s.to_span_data(&scope).end_time, s.start);
    }

    #[test]
    fn preset_targets_use_the_conventions_provider_names() {
        assert_eq!(provider_name("openai"), "openai");
        assert_eq!(provider_name("anthropic"), "anthropic");
        assert_eq!(provider_name("azure-openai"), "azure.ai.openai");
        assert_eq!(provider_name("mistral"), "mistral_ai");
        assert_eq!(provider_name("my-vllm"), "my-vllm");
    }

    #[test]
    fn a_full_queue_drops_and_counts_without_waiting() {
        // No collector listens on port 9 (discard): exports fail, the queue fills meanwhile.
        let tracing = Tracing::default();
        tracing
            .configure(Some("http://127.0.0.1:9"), "i-1")
            .unwrap();
        assert!(tracing.enabled());
        for _ in 0..QUEUE * 3 {
            tracing.record(span);
        }
        // A waiting queue would have taken them all; this one kept at most QUEUE plus the
        // batches the thread took meanwhile (one per BATCH_DELAY).
        let dropped = tracing.counts().dropped.load(Ordering::Relaxed);
        assert!(dropped >= QUEUE as u64, "{dropped} dropped");
        assert!(tracing.shutdown(Duration::from_secs(30)));
        assert!(!tracing.enabled());
        let c = tracing.counts();
        assert_eq!(c.exported.load(Ordering::Relaxed), 0);
        assert_eq!(
            c.failed.load(Ordering::Relaxed) + dropped,
            (QUEUE * 3) as u64
        );
    }
}

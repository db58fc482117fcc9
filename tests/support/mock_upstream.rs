//! An in-process mock LLM provider over real TLS, for integration tests, the demo and benches.
//!
//! It generates a throwaway CA and a leaf certificate with `rcgen` at start, listens on
//! `127.0.0.1:0`, speaks HTTP/2 and HTTP/1.1 (ALPN), records every request it receives, counts
//! TCP connections, and answers in the JSON and SSE shapes of OpenAI, Anthropic and Gemini,
//! plus a set of adversarial endpoints (key leaks, redirects, stalls, big bodies).
//!
//! This file must stay self-contained: it is included with `#[path = ...]` from `examples/`
//! and `benches/`, so it may use only crates from `Cargo.toml` and nothing from `tests/`.
//!
//! ```ignore
//! let mock = MockUpstream::builder()
//!     .on_key("sk-a", Reply::status(429).header("retry-after", "2"))
//!     .start()
//!     .await;
//! let ca = mock.write_ca(dir.path());
//! ```

#![allow(dead_code)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Version};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, mpsc, watch};

/// Prompt token count every provider shape reports.
pub const MOCK_PROMPT_TOKENS: u64 = 9;
/// Assistant text returned unless the builder sets another with `.text(..)`.
pub const DEFAULT_TEXT: &str = "Hello from the mock upstream.";
/// `/leak` body text before the key.
pub const LEAK_PREFIX: &str = "debug: upstream saw key ";
/// `/leak` body text after the key.
pub const LEAK_SUFFIX: &str = " (end of leak)\n";
/// Largest request body kept in a [`RecordedRequest`]; longer bodies are only counted.
pub const RECORD_BODY_CAP: usize = 1 << 20;
/// Chunk size of `/big` responses.
pub const BIG_CHUNK: usize = 16 * 1024;

type MockBody = BoxBody<Bytes, std::io::Error>;

// === RecordedRequest ===

/// One request as the mock received it.
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    /// HTTP method.
    pub method: Method,
    /// Path and query exactly as received, e.g. `/v1/models?limit=2`.
    pub path_and_query: String,
    /// HTTP version the request arrived with (`HTTP_2` when h2 was negotiated).
    pub version: Version,
    /// All request headers.
    pub headers: HeaderMap,
    /// Request body (first [`RECORD_BODY_CAP`] bytes).
    pub body: Bytes,
    /// Total request body length in bytes.
    pub body_len: u64,
    /// Request trailers, if any arrived.
    pub trailers: Option<HeaderMap>,
}

impl RecordedRequest {
    /// Path without the query.
    pub fn path(&self) -> &str {
        self.path_and_query
            .split_once('?')
            .map_or(self.path_and_query.as_str(), |(p, _)| p)
    }

    /// Query string without `?`, if any.
    pub fn query(&self) -> Option<&str> {
        self.path_and_query.split_once('?').map(|(_, q)| q)
    }

    /// A header's value as text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The body parsed as JSON (`Value::Null` if it is not JSON).
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
}

/// The API key a request carried: `Authorization: Bearer`, `x-api-key`, `api-key` or
/// `x-goog-api-key` (first found, in that order).
pub fn key_of(req: &RecordedRequest) -> Option<String> {
    key_in_headers(&req.headers)
}

fn key_in_headers(headers: &HeaderMap) -> Option<String> {
    if let Some(v) = headers.get("authorization").and_then(|v| v.to_str().ok()) {
        let v = v.trim();
        if let Some(rest) = v
            .strip_prefix("Bearer ")
            .or_else(|| v.strip_prefix("bearer "))
        {
            return Some(rest.trim().to_string());
        }
    }
    ["x-api-key", "api-key", "x-goog-api-key"]
        .iter()
        .find_map(|name| headers.get(*name).and_then(|v| v.to_str().ok()))
        .map(|v| v.trim().to_string())
}

// === Reply ===

/// A canned response, programmed per key with `on_key` / `set_key_reply`.
#[derive(Debug, Clone)]
pub struct Reply {
    status: StatusCode,
    headers: Vec<(String, String)>,
    body: Option<Bytes>,
}

impl Reply {
    /// A reply with this status and, unless `.body(..)` is called, an OpenAI-style error body.
    pub fn status(code: u16) -> Reply {
        Reply {
            status: StatusCode::from_u16(code).expect("valid status code"),
            headers: Vec::new(),
            body: None,
        }
    }

    /// A 200 reply with this JSON body.
    pub fn json(value: Value) -> Reply {
        Reply::status(200)
            .header("content-type", "application/json")
            .body(value.to_string())
    }

    /// Adds a response header.
    pub fn header(mut self, name: &str, value: &str) -> Reply {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }

    /// Sets the response body.
    pub fn body(mut self, body: impl Into<Bytes>) -> Reply {
        self.body = Some(body.into());
        self
    }

    fn render(&self) -> Response<MockBody> {
        let body = self.body.clone().unwrap_or_else(|| {
            let message = format!("mock upstream: programmed {} reply", self.status.as_u16());
            Bytes::from(
                json!({"error": {"message": message, "type": "mock_error", "code": self.status.as_u16()}})
                    .to_string(),
            )
        });
        let mut resp = Response::new(full(body));
        *resp.status_mut() = self.status;
        if self.body.is_none() {
            resp.headers_mut()
                .insert("content-type", HeaderValue::from_static("application/json"));
        }
        for (name, value) in &self.headers {
            resp.headers_mut().append(
                HeaderName::from_bytes(name.as_bytes()).expect("valid header name"),
                HeaderValue::from_str(value).expect("valid header value"),
            );
        }
        resp
    }
}

// === Builder ===

/// Configures a [`MockUpstream`] before it starts.
#[derive(Debug, Clone)]
pub struct MockUpstreamBuilder {
    leaf_names: Vec<String>,
    http1_only: bool,
    plaintext: bool,
    text: String,
    key_replies: HashMap<String, Reply>,
}

impl MockUpstreamBuilder {
    /// Subject names of the server certificate (default `localhost` and `127.0.0.1`); set
    /// others to make a hostname-mismatch server.
    pub fn leaf_names<I, S>(mut self, names: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.leaf_names = names.into_iter().map(Into::into).collect();
        self
    }

    /// Offer only `http/1.1` in ALPN and serve only HTTP/1.1.
    pub fn http1_only(mut self) -> Self {
        self.http1_only = true;
        self
    }

    /// Serve plain HTTP instead of TLS (for loopback targets such as ollama).
    pub fn plaintext(mut self) -> Self {
        self.plaintext = true;
        self
    }

    /// The assistant text every provider shape answers with.
    pub fn text(mut self, text: &str) -> Self {
        self.text = text.to_string();
        self
    }

    /// Answer every request that carries `key` with `reply`, before routing.
    pub fn on_key(mut self, key: &str, reply: Reply) -> Self {
        self.key_replies.insert(key.to_string(), reply);
        self
    }

    /// Generates certificates, binds `127.0.0.1:0` and starts serving.
    pub async fn start(self) -> MockUpstream {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let ca_key = rcgen::KeyPair::generate().expect("generate CA key");
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "keyward mock upstream test CA");
        ca_params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).expect("self-sign CA");

        let leaf_key = rcgen::KeyPair::generate().expect("generate leaf key");
        let mut leaf_params =
            rcgen::CertificateParams::new(self.leaf_names.clone()).expect("leaf params");
        leaf_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "mock upstream");
        leaf_params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        let leaf = leaf_params.signed_by(&leaf_key, &ca).expect("sign leaf");

        let tls = if self.plaintext {
            None
        } else {
            let key = rustls::pki_types::PrivateKeyDer::Pkcs8(
                rustls::pki_types::PrivatePkcs8KeyDer::from(leaf_key.serialize_der()),
            );
            let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .expect("protocol versions")
            .with_no_client_auth()
            .with_single_cert(vec![leaf.der().clone(), ca.der().clone()], key)
            .expect("server certificate");
            config.alpn_protocols = if self.http1_only {
                vec![b"http/1.1".to_vec()]
            } else {
                vec![b"h2".to_vec(), b"http/1.1".to_vec()]
            };
            Some(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
        };

        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local addr");
        let state = Arc::new(State {
            requests: Mutex::new(Vec::new()),
            connections: AtomicUsize::new(0),
            key_replies: Mutex::new(self.key_replies),
            gate: Semaphore::new(0),
            text: self.text,
            cut: watch::channel(0).0,
        });
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        tokio::spawn(accept_loop(
            listener,
            tls,
            self.http1_only,
            state.clone(),
            shutdown_rx,
        ));
        MockUpstream {
            addr,
            ca_pem: ca.pem(),
            plaintext: self.plaintext,
            state,
            shutdown: shutdown_tx,
        }
    }
}

// === MockUpstream ===

struct State {
    requests: Mutex<Vec<RecordedRequest>>,
    connections: AtomicUsize,
    key_replies: Mutex<HashMap<String, Reply>>,
    /// One permit per `release()`; `/gated-sse` takes one before each event after the first.
    gate: Semaphore,
    text: String,
    /// Bumped by `cut_connections()`; every open connection closes when it changes.
    cut: watch::Sender<u64>,
}

/// A running mock provider; stops serving when dropped.
pub struct MockUpstream {
    addr: SocketAddr,
    ca_pem: String,
    plaintext: bool,
    state: Arc<State>,
    shutdown: watch::Sender<bool>,
}

impl std::fmt::Debug for MockUpstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MockUpstream")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl Drop for MockUpstream {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
    }
}

impl MockUpstream {
    /// A builder with the defaults: TLS, h2 + http/1.1, leaf for `localhost` and `127.0.0.1`.
    pub fn builder() -> MockUpstreamBuilder {
        MockUpstreamBuilder {
            leaf_names: vec!["localhost".into(), "127.0.0.1".into()],
            http1_only: false,
            plaintext: false,
            text: DEFAULT_TEXT.into(),
            key_replies: HashMap::new(),
        }
    }

    /// Starts a mock with the defaults.
    pub async fn start() -> MockUpstream {
        MockUpstream::builder().start().await
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `https://127.0.0.1:PORT` (`http://` for a plaintext mock).
    pub fn base_url(&self) -> String {
        format!("{}://127.0.0.1:{}", self.scheme(), self.addr.port())
    }

    /// `https://localhost:PORT` (`http://` for a plaintext mock).
    pub fn localhost_url(&self) -> String {
        format!("{}://localhost:{}", self.scheme(), self.addr.port())
    }

    fn scheme(&self) -> &'static str {
        if self.plaintext { "http" } else { "https" }
    }

    /// The test CA certificate, PEM.
    pub fn ca_pem(&self) -> String {
        self.ca_pem.clone()
    }

    /// Writes the CA certificate to `dir/mock-ca-PORT.pem` and returns that path.
    pub fn write_ca(&self, dir: &Path) -> PathBuf {
        let path = dir.join(format!("mock-ca-{}.pem", self.addr.port()));
        std::fs::write(&path, &self.ca_pem).expect("write mock CA file");
        path
    }

    /// Every request received so far, in arrival order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.state.requests.lock().unwrap().clone()
    }

    /// Number of requests received so far.
    pub fn request_count(&self) -> usize {
        self.state.requests.lock().unwrap().len()
    }

    /// The most recent request, if any.
    pub fn last_request(&self) -> Option<RecordedRequest> {
        self.state.requests.lock().unwrap().last().cloned()
    }

    /// Closes every open connection at once, without a GOAWAY, as a restarting upstream or
    /// a load balancer dropping idle connections would.
    pub fn cut_connections(&self) {
        self.state.cut.send_modify(|n| *n += 1);
    }

    /// Number of TCP connections accepted so far.
    pub fn connection_count(&self) -> usize {
        self.state.connections.load(Ordering::SeqCst)
    }

    /// Lets `/gated-sse` send one more event.
    pub fn release(&self) {
        self.state.gate.add_permits(1);
    }

    /// Programs (or reprograms) the reply for requests carrying `key`.
    pub fn set_key_reply(&self, key: &str, reply: Reply) {
        self.state
            .key_replies
            .lock()
            .unwrap()
            .insert(key.to_string(), reply);
    }

    /// Removes a programmed reply so `key` is routed normally again.
    pub fn clear_key_reply(&self, key: &str) {
        self.state.key_replies.lock().unwrap().remove(key);
    }
}

// === Server ===

async fn accept_loop(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    http1_only: bool,
    state: Arc<State>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let (tcp, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(_) => continue,
            },
            _ = shutdown.changed() => return,
        };
        state.connections.fetch_add(1, Ordering::SeqCst);
        let _ = tcp.set_nodelay(true);
        let state = state.clone();
        let tls = tls.clone();
        let mut shutdown = shutdown.clone();
        let mut cut = state.cut.subscribe();
        tokio::spawn(async move {
            let serve = async move {
                match tls {
                    Some(acceptor) => {
                        // A client that rejects our certificate ends the handshake; that is
                        // an expected outcome in trust tests, not a mock failure.
                        let Ok(stream) = acceptor.accept(tcp).await else {
                            return;
                        };
                        serve_io(stream, http1_only, state).await;
                    }
                    None => serve_io(tcp, http1_only, state).await,
                }
            };
            tokio::select! {
                _ = serve => {}
                _ = shutdown.changed() => {}
                _ = cut.changed() => {}
            }
        });
    }
}

async fn serve_io<IO>(io: IO, http1_only: bool, state: Arc<State>)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    if http1_only {
        builder = builder.http1_only();
    }
    let service = service_fn(move |req| handle(state.clone(), req));
    let _ = builder.serve_connection(TokioIo::new(io), service).await;
}

async fn handle(
    state: Arc<State>,
    req: Request<Incoming>,
) -> Result<Response<MockBody>, Infallible> {
    let (parts, body) = req.into_parts();
    if parts.uri.path() == "/answer-first" {
        // Answers before reading the request body, then says how much of it arrived, as a
        // streaming upload API or an upstream refusing early would.
        let (tx, out) = channel_body();
        tokio::spawn(async move {
            let _ = tx.send(Bytes::from_static(b"answered\n")).await;
            let (_, len, _) = read_body(body).await;
            let _ = tx.send(Bytes::from(format!("received {len}\n"))).await;
        });
        return Ok(Response::new(out));
    }
    let (body, body_len, trailers) = read_body(body).await;
    let recorded = RecordedRequest {
        method: parts.method.clone(),
        path_and_query: parts.uri.path_and_query().map_or_else(
            || parts.uri.path().to_string(),
            |pq| pq.as_str().to_string(),
        ),
        version: parts.version,
        headers: parts.headers.clone(),
        body,
        body_len,
        trailers,
    };
    state.requests.lock().unwrap().push(recorded.clone());

    if let Some(key) = key_of(&recorded) {
        let programmed = state.key_replies.lock().unwrap().get(&key).cloned();
        if let Some(reply) = programmed {
            return Ok(reply.render());
        }
    }
    Ok(route(&state, &recorded).await)
}

async fn read_body(mut body: Incoming) -> (Bytes, u64, Option<HeaderMap>) {
    let mut kept = Vec::new();
    let mut total = 0u64;
    let mut trailers = None;
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else { break };
        match frame.into_data() {
            Ok(data) => {
                total += data.len() as u64;
                let room = RECORD_BODY_CAP.saturating_sub(kept.len());
                kept.extend_from_slice(&data[..data.len().min(room)]);
            }
            Err(frame) => trailers = frame.into_trailers().ok(),
        }
    }
    (Bytes::from(kept), total, trailers)
}

async fn route(state: &Arc<State>, req: &RecordedRequest) -> Response<MockBody> {
    let path = req.path();
    let query = req.query().unwrap_or("");
    let method = &req.method;
    let text = state.text.as_str();

    if path == "/echo" || path.starts_with("/echo/") {
        return echo(req);
    }
    match (method, path) {
        (&Method::POST, "/v1/chat/completions") => openai_chat(req, text),
        (&Method::POST, "/v1/responses") => openai_responses(req, text),
        (&Method::POST, "/v1/embeddings") => openai_embeddings(req),
        (&Method::GET, "/v1/models") => openai_models(),
        // The models lists of Azure OpenAI's data plane, Gemini and Vertex AI's Model Garden
        // (`keyward cred test` calls them).
        (&Method::GET, "/openai/models") => openai_models(),
        (&Method::GET, "/v1beta/models") => json_response(
            StatusCode::OK,
            json!({"models": [{"name": "models/gemini-2.0-flash"}], "nextPageToken": "p2"}),
        ),
        (&Method::GET, "/v1beta1/publishers/google/models") => json_response(
            StatusCode::OK,
            json!({"publisherModels": [{"name": "publishers/google/models/gemini-2.0-flash"}]}),
        ),
        (&Method::POST, "/v1/files") => json_response(
            StatusCode::OK,
            json!({
                "id": "file-mock",
                "object": "file",
                "bytes": req.body_len,
                "created_at": 1_700_000_000,
                "filename": "upload",
                "purpose": "assistants",
                "status": "processed",
            }),
        ),
        (&Method::POST, "/v1/messages") => anthropic_messages(req, text),
        (&Method::POST, p) if p.starts_with("/v1beta/models/") => gemini(req, text),
        // Vertex AI: Google's models answer like Gemini, Anthropic's (rawPredict,
        // streamRawPredict) like the Messages API.
        (&Method::POST, p) if p.contains("/publishers/google/models/") => gemini(req, text),
        (&Method::POST, p) if p.contains("/publishers/anthropic/models/") => {
            anthropic_messages(req, text)
        }
        (&Method::POST, p)
            if p.starts_with("/openai/deployments/") && p.ends_with("/chat/completions") =>
        {
            openai_chat(req, text)
        }
        (_, "/leak") => leak(req, query),
        (_, "/leak-error") => leak_error(req),
        (_, "/leak-hostile") => leak_hostile(req, query),
        (_, "/redirect") => {
            let mut resp = Response::new(full(Bytes::new()));
            *resp.status_mut() = StatusCode::FOUND;
            resp.headers_mut().insert(
                "location",
                HeaderValue::from_static("https://evil.example/steal"),
            );
            resp
        }
        (_, "/slow") => {
            let ms = query_u64(query, "ms").unwrap_or(1000);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            json_response(StatusCode::OK, json!({"slept_ms": ms}))
        }
        (_, "/stall") => {
            let ms = query_u64(query, "ms").unwrap_or(1000);
            let (tx, body) = channel_body();
            tokio::spawn(async move {
                if tx.send(Bytes::from_static(b"first\n")).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(ms)).await;
                let _ = tx.send(Bytes::from_static(b"rest\n")).await;
            });
            with_type(Response::new(body), "text/plain")
        }
        (_, "/trailers") => {
            // A body that ends with trailers, as gRPC-style and some streaming APIs send.
            let mut trailers = HeaderMap::new();
            trailers.insert("x-checksum", HeaderValue::from_static("42"));
            let frames = [
                Ok(Frame::data(Bytes::from_static(b"body\n"))),
                Ok(Frame::trailers(trailers)),
            ];
            let body = StreamBody::new(futures_util::stream::iter(frames)).boxed();
            with_type(Response::new(body), "text/plain")
        }
        (_, "/gated-sse") => gated_sse(state, query),
        (_, "/big") => {
            let bytes = query_u64(query, "bytes").unwrap_or(1 << 20);
            let (tx, body) = channel_body();
            tokio::spawn(async move {
                let mut sent = 0u64;
                while sent < bytes {
                    let n = (bytes - sent).min(BIG_CHUNK as u64) as usize;
                    let chunk: Vec<u8> = (0..n)
                        .map(|i| b'a' + ((sent as usize + i) % 26) as u8)
                        .collect();
                    if tx.send(Bytes::from(chunk)).await.is_err() {
                        return;
                    }
                    sent += n as u64;
                }
            });
            with_type(Response::new(body), "application/octet-stream")
        }
        _ => json_response(
            StatusCode::NOT_FOUND,
            json!({"error": {"message": format!("mock upstream: no route for {method} {path}"), "type": "not_found"}}),
        ),
    }
}

// === Provider shapes ===

fn words(text: &str) -> Vec<String> {
    // Keep the separating space on each piece so concatenating the deltas gives back `text`.
    let mut out = Vec::new();
    let mut current = String::new();
    for ch in text.chars() {
        current.push(ch);
        if ch == ' ' {
            out.push(std::mem::take(&mut current));
        }
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

fn completion_tokens(text: &str) -> u64 {
    words(text).len() as u64
}

/// Request header that sets the token usage the mock reports, so cost and budgets in tests
/// are exact: `mock-usage: input=11007,cached=9800,cache_write=1200,output=50,reasoning=30`
/// (missing names are 0). Each provider shape reports it in that provider's own way:
/// Anthropic's `input_tokens` leaves out the cached and cache-written tokens, Gemini's
/// `candidatesTokenCount` leaves out the thinking tokens, OpenAI's counts include both.
pub const MOCK_USAGE_HEADER: &str = "mock-usage";

/// Token usage a mock answer reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MockUsage {
    /// Every prompt token, cached or not.
    pub input: u64,
    /// Prompt tokens read from the cache.
    pub cached: u64,
    /// Prompt tokens written to the cache (Anthropic only).
    pub cache_write: u64,
    /// Output tokens, reasoning included.
    pub output: u64,
    /// The reasoning part of `output`.
    pub reasoning: u64,
}

impl MockUsage {
    /// The header value that asks the mock for this usage.
    pub fn header(&self) -> String {
        format!(
            "input={},cached={},cache_write={},output={},reasoning={}",
            self.input, self.cached, self.cache_write, self.output, self.reasoning
        )
    }

    /// The usage `req` asked for with [`MOCK_USAGE_HEADER`], if it did.
    fn requested(req: &RecordedRequest) -> Option<MockUsage> {
        let spec = req.header(MOCK_USAGE_HEADER)?;
        let mut u = MockUsage::default();
        for part in spec.split(',') {
            let (name, value) = part.split_once('=')?;
            let value: u64 = value.trim().parse().ok()?;
            match name.trim() {
                "input" => u.input = value,
                "cached" => u.cached = value,
                "cache_write" => u.cache_write = value,
                "output" => u.output = value,
                "reasoning" => u.reasoning = value,
                _ => return None,
            }
        }
        Some(u)
    }
}

fn model_of(body: &Value, fallback: &str) -> String {
    body.get("model")
        .and_then(Value::as_str)
        .unwrap_or(fallback)
        .to_string()
}

fn openai_chat(req: &RecordedRequest, text: &str) -> Response<MockBody> {
    let body = req.json();
    let model = model_of(&body, "gpt-4o-mini");
    let completion = completion_tokens(text);
    let usage = match MockUsage::requested(req) {
        None => json!({
            "prompt_tokens": MOCK_PROMPT_TOKENS,
            "completion_tokens": completion,
            "total_tokens": MOCK_PROMPT_TOKENS + completion,
        }),
        Some(u) => json!({
            "prompt_tokens": u.input,
            "completion_tokens": u.output,
            "total_tokens": u.input + u.output,
            "prompt_tokens_details": {"cached_tokens": u.cached, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": u.reasoning, "audio_tokens": 0},
        }),
    };
    let stream = body.get("stream").and_then(Value::as_bool) == Some(true);
    if !stream {
        return json_response(
            StatusCode::OK,
            json!({
                "id": "chatcmpl-mock",
                "object": "chat.completion",
                "created": 1_700_000_000,
                "model": model,
                "system_fingerprint": "fp_mock",
                "choices": [{
                    "index": 0,
                    "message": {"role": "assistant", "content": text, "refusal": null},
                    "logprobs": null,
                    "finish_reason": "stop",
                }],
                "usage": usage,
            }),
        );
    }
    let include_usage = body
        .pointer("/stream_options/include_usage")
        .and_then(Value::as_bool)
        == Some(true);
    let chunk = |choices: Value, usage: Value| {
        let mut c = json!({
            "id": "chatcmpl-mock",
            "object": "chat.completion.chunk",
            "created": 1_700_000_000,
            "model": model,
            "system_fingerprint": "fp_mock",
            "choices": choices,
        });
        if include_usage {
            c["usage"] = usage;
        }
        format!("data: {c}\n\n")
    };
    let mut events = vec![chunk(
        json!([{"index": 0, "delta": {"role": "assistant", "content": "", "refusal": null}, "logprobs": null, "finish_reason": null}]),
        Value::Null,
    )];
    for piece in words(text) {
        events.push(chunk(
            json!([{"index": 0, "delta": {"content": piece}, "logprobs": null, "finish_reason": null}]),
            Value::Null,
        ));
    }
    events.push(chunk(
        json!([{"index": 0, "delta": {}, "logprobs": null, "finish_reason": "stop"}]),
        Value::Null,
    ));
    if include_usage {
        events.push(chunk(json!([]), usage));
    }
    events.push("data: [DONE]\n\n".to_string());
    sse_response(events)
}

fn openai_responses(req: &RecordedRequest, text: &str) -> Response<MockBody> {
    let body = req.json();
    let model = model_of(&body, "gpt-4o-mini");
    let u = MockUsage::requested(req).unwrap_or(MockUsage {
        input: MOCK_PROMPT_TOKENS,
        output: completion_tokens(text),
        ..MockUsage::default()
    });
    let usage = json!({
        "input_tokens": u.input,
        "input_tokens_details": {"cached_tokens": u.cached},
        "output_tokens": u.output,
        "output_tokens_details": {"reasoning_tokens": u.reasoning},
        "total_tokens": u.input + u.output,
    });
    let response = |status: &str, text: &str, usage: Value| {
        json!({
            "id": "resp_mock",
            "object": "response",
            "created_at": 1_700_000_000,
            "status": status,
            "model": model,
            "output": [{
                "type": "message", "id": "msg_mock", "status": status, "role": "assistant",
                "content": [{"type": "output_text", "text": text, "annotations": []}],
            }],
            "usage": usage,
        })
    };
    if body.get("stream").and_then(Value::as_bool) != Some(true) {
        return json_response(StatusCode::OK, response("completed", text, usage));
    }
    let event = |name: &str, data: Value| format!("event: {name}\ndata: {data}\n\n");
    let mut events = vec![event(
        "response.created",
        json!({"type": "response.created", "response": response("in_progress", "", Value::Null)}),
    )];
    for piece in words(text) {
        events.push(event(
            "response.output_text.delta",
            json!({"type": "response.output_text.delta", "item_id": "msg_mock", "output_index": 0, "content_index": 0, "delta": piece}),
        ));
    }
    events.push(event(
        "response.completed",
        json!({"type": "response.completed", "response": response("completed", text, usage)}),
    ));
    sse_response(events)
}

fn openai_embeddings(req: &RecordedRequest) -> Response<MockBody> {
    let body = req.json();
    let model = model_of(&body, "text-embedding-3-small");
    let inputs = match body.get("input") {
        Some(Value::Array(items)) => items.len().max(1),
        _ => 1,
    };
    let base64 = body.get("encoding_format").and_then(Value::as_str) == Some("base64");
    let vector = [0.125f32, -0.25, 0.5, 0.75];
    let data: Vec<Value> = (0..inputs)
        .map(|index| {
            // The official SDKs ask for base64 by default and decode little-endian f32s.
            let embedding = if base64 {
                let raw: Vec<u8> = vector.iter().flat_map(|f| f.to_le_bytes()).collect();
                Value::String(base64_encode(&raw))
            } else {
                json!(vector)
            };
            json!({"object": "embedding", "index": index, "embedding": embedding})
        })
        .collect();
    json_response(
        StatusCode::OK,
        json!({
            "object": "list",
            "data": data,
            "model": model,
            "usage": {"prompt_tokens": MOCK_PROMPT_TOKENS, "total_tokens": MOCK_PROMPT_TOKENS},
        }),
    )
}

fn openai_models() -> Response<MockBody> {
    let models: Vec<Value> = ["gpt-4o-mini", "gpt-4o", "text-embedding-3-small"]
        .iter()
        .map(
            |id| json!({"id": id, "object": "model", "created": 1_700_000_000, "owned_by": "mock"}),
        )
        .collect();
    json_response(StatusCode::OK, json!({"object": "list", "data": models}))
}

fn anthropic_messages(req: &RecordedRequest, text: &str) -> Response<MockBody> {
    let body = req.json();
    let model = model_of(&body, "claude-3-5-haiku-latest");
    let mut output = completion_tokens(text);
    let mut usage = json!({"input_tokens": MOCK_PROMPT_TOKENS, "output_tokens": output});
    if let Some(u) = MockUsage::requested(req) {
        output = u.output;
        usage = json!({
            "input_tokens": u.input - u.cached - u.cache_write,
            "cache_creation_input_tokens": u.cache_write,
            "cache_read_input_tokens": u.cached,
            "output_tokens": u.output,
        });
    }
    let stream = body.get("stream").and_then(Value::as_bool) == Some(true);
    if !stream {
        return json_response(
            StatusCode::OK,
            json!({
                "id": "msg_mock",
                "type": "message",
                "role": "assistant",
                "model": model,
                "content": [{"type": "text", "text": text}],
                "stop_reason": "end_turn",
                "stop_sequence": null,
                "usage": usage,
            }),
        );
    }
    // `message_start` carries the input and cache counts, `message_delta` the final output.
    let mut start_usage = usage.clone();
    start_usage["output_tokens"] = json!(1);
    let event = |name: &str, data: Value| format!("event: {name}\ndata: {data}\n\n");
    let mut events = vec![
        event(
            "message_start",
            json!({"type": "message_start", "message": {
                "id": "msg_mock", "type": "message", "role": "assistant", "model": model,
                "content": [], "stop_reason": null, "stop_sequence": null,
                "usage": start_usage,
            }}),
        ),
        event(
            "content_block_start",
            json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        ),
        event("ping", json!({"type": "ping"})),
    ];
    for piece in words(text) {
        events.push(event(
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": piece}}),
        ));
    }
    events.push(event(
        "content_block_stop",
        json!({"type": "content_block_stop", "index": 0}),
    ));
    events.push(event(
        "message_delta",
        json!({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": null}, "usage": {"output_tokens": output}}),
    ));
    events.push(event("message_stop", json!({"type": "message_stop"})));
    sse_response(events)
}

fn gemini(req: &RecordedRequest, text: &str) -> Response<MockBody> {
    let rest = req
        .path()
        .rsplit_once("/models/")
        .map_or("", |(_, rest)| rest);
    let Some((model, method)) = rest.split_once(':') else {
        return json_response(
            StatusCode::NOT_FOUND,
            json!({"error": {"code": 404, "message": "mock upstream: expected /v1beta/models/{model}:{method}", "status": "NOT_FOUND"}}),
        );
    };
    let candidates = completion_tokens(text);
    let usage = match MockUsage::requested(req) {
        None => json!({
            "promptTokenCount": MOCK_PROMPT_TOKENS,
            "candidatesTokenCount": candidates,
            "totalTokenCount": MOCK_PROMPT_TOKENS + candidates,
        }),
        Some(u) => json!({
            "promptTokenCount": u.input,
            "cachedContentTokenCount": u.cached,
            "candidatesTokenCount": u.output - u.reasoning,
            "thoughtsTokenCount": u.reasoning,
            "totalTokenCount": u.input + u.output,
        }),
    };
    let response = |parts_text: &str, finish: Option<&str>, usage: Option<&Value>| {
        let mut candidate = json!({
            "content": {"parts": [{"text": parts_text}], "role": "model"},
            "index": 0,
        });
        if let Some(f) = finish {
            candidate["finishReason"] = json!(f);
        }
        let mut r = json!({"candidates": [candidate], "modelVersion": model});
        if let Some(u) = usage {
            r["usageMetadata"] = u.clone();
        }
        r
    };
    match (req.method.clone(), method) {
        (Method::POST, "generateContent") => {
            json_response(StatusCode::OK, response(text, Some("STOP"), Some(&usage)))
        }
        (Method::POST, "streamGenerateContent") => {
            let pieces = words(text);
            let last = pieces.len().saturating_sub(1);
            let chunks: Vec<Value> = pieces
                .iter()
                .enumerate()
                .map(|(i, p)| {
                    if i == last {
                        response(p, Some("STOP"), Some(&usage))
                    } else {
                        response(p, None, None)
                    }
                })
                .collect();
            if query_param(req.query().unwrap_or(""), "alt") == Some("sse") {
                sse_response(
                    chunks
                        .iter()
                        .map(|c| format!("data: {c}\r\n\r\n"))
                        .collect(),
                )
            } else {
                json_response(StatusCode::OK, Value::Array(chunks))
            }
        }
        (Method::POST, "countTokens") => {
            json_response(StatusCode::OK, json!({"totalTokens": MOCK_PROMPT_TOKENS}))
        }
        (Method::POST, "embedContent") => json_response(
            StatusCode::OK,
            json!({"embedding": {"values": [0.125, -0.25, 0.5, 0.75]}}),
        ),
        _ => json_response(
            StatusCode::NOT_FOUND,
            json!({"error": {"code": 404, "message": format!("mock upstream: no Gemini method {method}"), "status": "NOT_FOUND"}}),
        ),
    }
}

// === Test endpoints ===

fn echo(req: &RecordedRequest) -> Response<MockBody> {
    let mut headers = serde_json::Map::new();
    for name in req.headers.keys() {
        let values: Vec<Value> = req
            .headers
            .get_all(name)
            .iter()
            .map(|v| Value::String(String::from_utf8_lossy(v.as_bytes()).into_owned()))
            .collect();
        let value = if values.len() == 1 {
            values.into_iter().next().unwrap()
        } else {
            Value::Array(values)
        };
        headers.insert(name.as_str().to_string(), value);
    }
    let body = json!({
        "method": req.method.as_str(),
        "path": req.path(),
        "query": req.query(),
        "version": format!("{:?}", req.version),
        "headers": headers,
        "body_len": req.body_len,
    });
    let mut resp = json_response(StatusCode::OK, body);
    let h = resp.headers_mut();
    h.insert(
        "x-echo-method",
        HeaderValue::from_str(req.method.as_str()).unwrap(),
    );
    if let Ok(v) = HeaderValue::from_str(req.path()) {
        h.insert("x-echo-path", v);
    }
    if let Some(Ok(v)) = req.query().map(HeaderValue::from_str) {
        h.insert("x-echo-query", v);
    }
    h.insert(
        "x-echo-body-len",
        HeaderValue::from_str(&req.body_len.to_string()).unwrap(),
    );
    resp
}

fn leak(req: &RecordedRequest, query: &str) -> Response<MockBody> {
    let key = key_of(req).unwrap_or_default();
    let text = format!("{LEAK_PREFIX}{key}{LEAK_SUFFIX}").into_bytes();
    // `split=N` or `split=N,M,...`: byte offsets at which the body is cut into chunks.
    let mut cuts: Vec<usize> = query_param(query, "split")
        .unwrap_or("")
        .split(',')
        .filter_map(|s| s.parse().ok())
        .filter(|&n| n > 0 && n < text.len())
        .collect();
    cuts.sort_unstable();
    cuts.dedup();
    let mut chunks = Vec::new();
    let mut start = 0;
    for cut in cuts {
        chunks.push(Bytes::copy_from_slice(&text[start..cut]));
        start = cut;
    }
    chunks.push(Bytes::copy_from_slice(&text[start..]));
    let (tx, body) = channel_body();
    tokio::spawn(async move {
        for chunk in chunks {
            if tx.send(chunk).await.is_err() {
                return;
            }
            // A pause makes each chunk its own write (and frame) instead of being coalesced.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    let mut resp = with_type(Response::new(body), "text/plain");
    if let Ok(v) = HeaderValue::from_str(&key) {
        resp.headers_mut().insert("x-debug-key", v);
    }
    resp
}

fn leak_error(req: &RecordedRequest) -> Response<MockBody> {
    let key = key_of(req).unwrap_or_default();
    json_response(
        StatusCode::UNAUTHORIZED,
        json!({"error": {
            "message": format!("Incorrect API key provided: {key}. You can find your API key at https://platform.openai.com/account/api-keys."),
            "type": "invalid_request_error",
            "param": null,
            "code": "invalid_api_key",
        }}),
    )
}

/// Ways a hostile upstream may try to get the key back to the app besides the body:
/// `?via=reason` (HTTP/1 reason phrase), `gzip` (an encoded body keyward asked not to get),
/// `split-header` (the key cut across two values of one header), `forge` (keyward-* headers).
fn leak_hostile(req: &RecordedRequest, query: &str) -> Response<MockBody> {
    let key = key_of(req).unwrap_or_default();
    let via = query
        .split('&')
        .find_map(|kv| kv.strip_prefix("via="))
        .unwrap_or("");
    let mut resp = Response::new(full(Bytes::from(format!("{{\"echo\":\"{key}\"}}"))));
    let h = resp.headers_mut();
    match via {
        "reason" => {
            *resp.status_mut() = StatusCode::UNAUTHORIZED;
            let phrase = hyper::ext::ReasonPhrase::try_from(format!("bad key {key}").into_bytes())
                .expect("a key is a valid reason phrase");
            resp.extensions_mut().insert(phrase);
        }
        "gzip" => {
            h.insert("content-encoding", HeaderValue::from_static("gzip"));
        }
        "split-header" => {
            let (a, b) = key.split_at(key.len() / 2);
            h.append("x-part", HeaderValue::from_str(a).expect("ascii"));
            h.append("x-part", HeaderValue::from_str(b).expect("ascii"));
        }
        "forge" => {
            h.insert("keyward-error", HeaderValue::from_static("forged"));
            h.insert(
                "keyward-credential",
                HeaderValue::from_static("cred_forged/v9"),
            );
            h.insert("keyward-anything", HeaderValue::from_static("forged"));
        }
        _ => {}
    }
    resp
}

fn gated_sse(state: &Arc<State>, query: &str) -> Response<MockBody> {
    let events = query_u64(query, "events").unwrap_or(3).max(1);
    let (tx, body) = channel_body();
    let state = state.clone();
    tokio::spawn(async move {
        for n in 1..=events {
            if n > 1 {
                match state.gate.acquire().await {
                    Ok(permit) => permit.forget(),
                    Err(_) => return,
                }
            }
            let event = format!("event: tick\ndata: {}\n\n", json!({"n": n, "of": events}));
            if tx.send(Bytes::from(event)).await.is_err() {
                return;
            }
        }
    });
    sse_headers(Response::new(body))
}

// === Helpers ===

fn full(bytes: Bytes) -> MockBody {
    Full::new(bytes).map_err(|never| match never {}).boxed()
}

fn channel_body() -> (mpsc::Sender<Bytes>, MockBody) {
    let (tx, rx) = mpsc::channel::<Bytes>(4);
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|chunk| (Ok::<_, std::io::Error>(Frame::data(chunk)), rx))
    });
    (tx, StreamBody::new(stream).boxed())
}

fn with_type(mut resp: Response<MockBody>, content_type: &'static str) -> Response<MockBody> {
    resp.headers_mut()
        .insert("content-type", HeaderValue::from_static(content_type));
    resp
}

fn json_response(status: StatusCode, value: Value) -> Response<MockBody> {
    let mut resp = with_type(
        Response::new(full(Bytes::from(value.to_string()))),
        "application/json",
    );
    *resp.status_mut() = status;
    resp
}

fn sse_headers(mut resp: Response<MockBody>) -> Response<MockBody> {
    let h = resp.headers_mut();
    h.insert(
        "content-type",
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert("cache-control", HeaderValue::from_static("no-cache"));
    resp
}

fn sse_response(events: Vec<String>) -> Response<MockBody> {
    let (tx, body) = channel_body();
    tokio::spawn(async move {
        for event in events {
            if tx.send(Bytes::from(event)).await.is_err() {
                return;
            }
        }
    });
    sse_headers(Response::new(body))
}

fn query_param<'q>(query: &'q str, name: &str) -> Option<&'q str> {
    query
        .split('&')
        .filter_map(|pair| pair.split_once('=').or(Some((pair, ""))))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

fn query_u64(query: &str, name: &str) -> Option<u64> {
    query_param(query, name).and_then(|v| v.parse().ok())
}

fn base64_encode(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

//! The load generator: one hyper HTTP/1.1 client per connection, over a Unix socket (proxies),
//! loopback TCP (LiteLLM) or TLS (the direct baseline), driven either at a fixed rate with
//! latencies measured from each request's intended start (coordinated-omission corrected, as
//! wrk2 does) or flat out with a fixed number of connections.
//!
//! It only measures; it starts no servers and knows nothing about the peers.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;

use crate::mock::{TS_MARKER, now_ns};

/// How the load generator reaches a peer.
#[derive(Clone)]
pub enum Endpoint {
    /// HTTP/1.1 over a Unix socket.
    Unix(PathBuf),
    /// Plain HTTP/1.1 over loopback TCP.
    Tcp(SocketAddr),
    /// HTTP/1.1 over TLS (the direct baseline talks to the mock this way).
    Tls {
        /// Mock address.
        addr: SocketAddr,
        /// Connector trusting the mock's CA.
        connector: tokio_rustls::TlsConnector,
    },
}

/// One peer as the load generator sees it.
#[derive(Clone)]
pub struct Target {
    /// Where to connect.
    pub endpoint: Endpoint,
    /// Request path, e.g. `/openai/v1/chat/completions`.
    pub path: String,
    /// `Authorization` header value the client sends.
    pub authorization: String,
}

/// Builds a TLS connector that trusts only the PEM CA at `ca_pem`, offering HTTP/1.1.
pub fn tls_connector(ca_pem: &str) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    let mut reader = std::io::BufReader::new(ca_pem.as_bytes());
    for cert in rustls_pemfile_certs(&mut reader) {
        roots.add(cert).expect("mock CA is a valid certificate");
    }
    let mut config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

fn rustls_pemfile_certs(
    reader: &mut dyn std::io::BufRead,
) -> Vec<rustls::pki_types::CertificateDer<'static>> {
    use rustls::pki_types::pem::PemObject;
    let mut pem = Vec::new();
    let _ = reader.read_to_end(&mut pem);
    rustls::pki_types::CertificateDer::pem_slice_iter(&pem)
        .filter_map(Result::ok)
        .collect()
}

type Sender = SendRequest<Full<Bytes>>;

async fn connect(endpoint: &Endpoint) -> Result<Sender, String> {
    macro_rules! handshake {
        ($io:expr) => {{
            let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new($io))
                .await
                .map_err(|e| format!("HTTP handshake: {e}"))?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            Ok(sender)
        }};
    }
    match endpoint {
        Endpoint::Unix(path) => {
            let s = tokio::net::UnixStream::connect(path)
                .await
                .map_err(|e| format!("connect {}: {e}", path.display()))?;
            handshake!(s)
        }
        Endpoint::Tcp(addr) => {
            let s = tokio::net::TcpStream::connect(addr)
                .await
                .map_err(|e| format!("connect {addr}: {e}"))?;
            let _ = s.set_nodelay(true);
            handshake!(s)
        }
        Endpoint::Tls { addr, connector } => {
            let s = tokio::net::TcpStream::connect(addr)
                .await
                .map_err(|e| format!("connect {addr}: {e}"))?;
            let _ = s.set_nodelay(true);
            let name = ServerName::IpAddress(addr.ip().into());
            let tls = connector
                .connect(name, s)
                .await
                .map_err(|e| format!("TLS to {addr}: {e}"))?;
            handshake!(tls)
        }
    }
}

/// The chat request body every peer receives (about 200 bytes).
pub fn chat_body(stream: bool) -> Bytes {
    Bytes::from(format!(
        r#"{{"model":"bench-model","messages":[{{"role":"system","content":"You are terse."}},{{"role":"user","content":"Say hello to the benchmark, in one short sentence please."}}],"max_tokens":64{}}}"#,
        if stream { r#","stream":true"# } else { "" }
    ))
}

fn request(target: &Target, body: &Bytes) -> Request<Full<Bytes>> {
    Request::post(target.path.as_str())
        .header(http::header::HOST, "localhost")
        .header(http::header::CONTENT_TYPE, "application/json")
        .header(http::header::AUTHORIZATION, target.authorization.as_str())
        .body(Full::new(body.clone()))
        .expect("static request")
}

/// What one phase measured.
#[derive(Default, Debug, Clone)]
pub struct PhaseResult {
    /// Latencies of successful requests, nanoseconds, sorted.
    pub latencies_ns: Vec<u64>,
    /// Requests answered 2xx.
    pub ok: u64,
    /// Requests that failed (non-2xx, I/O) or were never sent before the phase's deadline.
    pub errors: u64,
    /// Scheduled requests the generator could not even start before the deadline.
    pub unsent: u64,
    /// The first failure, word for word, so a broken peer says how it broke.
    pub first_error: Option<String>,
    /// Wall time of the phase.
    pub elapsed: Duration,
}

impl PhaseResult {
    fn merge(&mut self, other: PhaseResult) {
        self.latencies_ns.extend(other.latencies_ns);
        self.ok += other.ok;
        self.errors += other.errors;
        self.unsent += other.unsent;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
    }

    fn note_error(&mut self, e: String) {
        self.errors += 1;
        if self.first_error.is_none() {
            self.first_error = Some(e);
        }
    }

    /// The `q` quantile (0..=1) in microseconds.
    pub fn pct_us(&self, q: f64) -> Option<f64> {
        percentile(&self.latencies_ns, q).map(|ns| ns as f64 / 1000.0)
    }

    /// Successful requests per second.
    pub fn rps(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Nearest-rank percentile of sorted data.
pub fn percentile(sorted: &[u64], q: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    Some(sorted[rank - 1])
}

async fn send_one(
    sender: &mut Option<Sender>,
    target: &Target,
    body: &Bytes,
) -> Result<(), String> {
    if sender.as_ref().is_none_or(|s| s.is_closed()) {
        *sender = Some(connect(&target.endpoint).await?);
    }
    let s = sender.as_mut().expect("connected above");
    if s.ready().await.is_err() {
        *sender = Some(connect(&target.endpoint).await?);
    }
    let s = sender.as_mut().expect("connected above");
    let response = match s.send_request(request(target, body)).await {
        Ok(r) => r,
        Err(e) => {
            *sender = None;
            return Err(format!("request: {e}"));
        }
    };
    let status = response.status();
    let bytes = response
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("response body: {e}"))?
        .to_bytes();
    if status != StatusCode::OK {
        let text = String::from_utf8_lossy(&bytes[..bytes.len().min(300)]).into_owned();
        return Err(format!("HTTP {status}: {text}"));
    }
    Ok(())
}

/// Sends `total` requests at `rate` per second over `connections` connections. A request's
/// latency runs from its intended start when its connection was still busy at that moment
/// (so stalls count against the peer), and from its actual start otherwise (so timer jitter
/// of the generator does not). Requests not started by `rate`'s schedule plus `grace` count
/// as unsent errors.
pub async fn fixed_rate(
    target: &Target,
    rate: f64,
    duration: Duration,
    connections: usize,
) -> PhaseResult {
    let total = (rate * duration.as_secs_f64()).round().max(1.0) as u64;
    let period_ns = 1e9 / rate;
    let start = Instant::now() + Duration::from_millis(20);
    let hard_stop = start + duration + Duration::from_secs(5);
    let next = Arc::new(AtomicU64::new(0));
    let body = chat_body(false);
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let target = target.clone();
        let next = next.clone();
        let body = body.clone();
        tasks.push(tokio::spawn(async move {
            let mut out = PhaseResult::default();
            let mut sender = connect(&target.endpoint).await.ok();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    break;
                }
                let intended = start + Duration::from_nanos((i as f64 * period_ns) as u64);
                let free_at = Instant::now();
                if free_at > hard_stop {
                    out.unsent += 1;
                    out.note_error("not sent before the phase deadline (peer saturated)".into());
                    continue;
                }
                tokio::time::sleep_until(intended.into()).await;
                let from = if free_at >= intended {
                    intended
                } else {
                    Instant::now()
                };
                match send_one(&mut sender, &target, &body).await {
                    Ok(()) => {
                        out.ok += 1;
                        out.latencies_ns.push(from.elapsed().as_nanos() as u64);
                    }
                    Err(e) => out.note_error(e),
                }
            }
            out
        }));
    }
    collect(tasks, start).await
}

/// Keeps `connections` requests in flight for `duration`; returns what completed.
pub async fn flat_out(target: &Target, duration: Duration, connections: usize) -> PhaseResult {
    let start = Instant::now();
    let stop = start + duration;
    let body = chat_body(false);
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let target = target.clone();
        let body = body.clone();
        tasks.push(tokio::spawn(async move {
            let mut out = PhaseResult::default();
            let mut sender = connect(&target.endpoint).await.ok();
            while Instant::now() < stop {
                let t = Instant::now();
                match send_one(&mut sender, &target, &body).await {
                    Ok(()) => {
                        out.ok += 1;
                        out.latencies_ns.push(t.elapsed().as_nanos() as u64);
                    }
                    Err(e) => {
                        out.note_error(e);
                        // A dead peer must not turn this into a busy loop.
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
            }
            out
        }));
    }
    collect(tasks, start).await
}

/// Sends exactly `total` requests over `connections` connections, each as soon as its
/// connection is free: a fixed amount of work, for counting instructions per call.
pub async fn count(target: &Target, total: u64, connections: usize) -> PhaseResult {
    let start = Instant::now();
    let next = Arc::new(AtomicU64::new(0));
    let body = chat_body(false);
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let target = target.clone();
        let next = next.clone();
        let body = body.clone();
        tasks.push(tokio::spawn(async move {
            let mut out = PhaseResult::default();
            let mut sender = connect(&target.endpoint).await.ok();
            while next.fetch_add(1, Ordering::Relaxed) < total {
                let t = Instant::now();
                match send_one(&mut sender, &target, &body).await {
                    Ok(()) => {
                        out.ok += 1;
                        out.latencies_ns.push(t.elapsed().as_nanos() as u64);
                    }
                    Err(e) => out.note_error(e),
                }
            }
            out
        }));
    }
    collect(tasks, start).await
}

async fn collect(tasks: Vec<tokio::task::JoinHandle<PhaseResult>>, start: Instant) -> PhaseResult {
    let mut all = PhaseResult::default();
    for t in tasks {
        if let Ok(r) = t.await {
            all.merge(r);
        }
    }
    all.elapsed = start.elapsed();
    all.latencies_ns.sort_unstable();
    all
}

/// What the SSE phase measured.
#[derive(Default, Debug, Clone)]
pub struct SseResult {
    /// Time to first body byte per stream, nanoseconds, sorted.
    pub ttfb_ns: Vec<u64>,
    /// Upstream send → client receive per event, nanoseconds, sorted.
    pub event_delay_ns: Vec<u64>,
    /// Streams that completed with a 200.
    pub streams_ok: u64,
    /// Streams whose timestamped event count differed from what the mock sent.
    pub streams_mismatched: u64,
    /// Timestamped events the mock sent in total (streams × events).
    pub events_in: u64,
    /// Timestamped events the client received in total.
    pub events_out: u64,
    /// Failed streams.
    pub errors: u64,
    /// The first failure, word for word.
    pub first_error: Option<String>,
}

/// Runs `streams` SSE calls, `concurrency` at a time.
pub async fn sse(target: &Target, streams: usize, concurrency: usize) -> SseResult {
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let target = target.clone();
        let next = next.clone();
        tasks.push(tokio::spawn(async move {
            let mut out = SseResult::default();
            let mut sender: Option<Sender> = None;
            let body = chat_body(true);
            while next.fetch_add(1, Ordering::Relaxed) < streams as u64 {
                match one_stream(&mut sender, &target, &body, &mut out).await {
                    Ok(events) => {
                        out.streams_ok += 1;
                        out.events_in += crate::mock::SSE_EVENTS as u64;
                        out.events_out += events;
                        if events != crate::mock::SSE_EVENTS as u64 {
                            out.streams_mismatched += 1;
                        }
                    }
                    Err(e) => {
                        out.errors += 1;
                        out.first_error.get_or_insert(e);
                        sender = None;
                    }
                }
            }
            out
        }));
    }
    let mut all = SseResult::default();
    for t in tasks {
        if let Ok(r) = t.await {
            all.ttfb_ns.extend(r.ttfb_ns);
            all.event_delay_ns.extend(r.event_delay_ns);
            all.streams_ok += r.streams_ok;
            all.streams_mismatched += r.streams_mismatched;
            all.events_in += r.events_in;
            all.events_out += r.events_out;
            all.errors += r.errors;
            if all.first_error.is_none() {
                all.first_error = r.first_error;
            }
        }
    }
    all.ttfb_ns.sort_unstable();
    all.event_delay_ns.sort_unstable();
    all
}

async fn one_stream(
    sender: &mut Option<Sender>,
    target: &Target,
    body: &Bytes,
    out: &mut SseResult,
) -> Result<u64, String> {
    if sender.as_ref().is_none_or(|s| s.is_closed()) {
        *sender = Some(connect(&target.endpoint).await?);
    }
    let s = sender.as_mut().expect("connected above");
    s.ready().await.map_err(|e| format!("connection: {e}"))?;
    let t0 = Instant::now();
    let response = s
        .send_request(request(target, body))
        .await
        .map_err(|e| format!("request: {e}"))?;
    let status = response.status();
    let mut body = response.into_body();
    let mut first = true;
    let mut pending = Vec::new();
    let mut events = 0u64;
    let mut all = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| format!("stream: {e}"))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        let arrived = now_ns();
        if first {
            out.ttfb_ns.push(t0.elapsed().as_nanos() as u64);
            first = false;
        }
        if status != StatusCode::OK {
            all.extend_from_slice(&data);
            continue;
        }
        pending.extend_from_slice(&data);
        while let Some(pos) = pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = pending.drain(..=pos).collect();
            if let Some(sent) = sent_at(&line) {
                events += 1;
                out.event_delay_ns.push(arrived.saturating_sub(sent));
            }
        }
    }
    if status != StatusCode::OK {
        let text = String::from_utf8_lossy(&all[..all.len().min(300)]).into_owned();
        return Err(format!("HTTP {status}: {text}"));
    }
    Ok(events)
}

fn sent_at(line: &[u8]) -> Option<u64> {
    let text = std::str::from_utf8(line).ok()?;
    if !text.starts_with("data:") {
        return None;
    }
    let at = text.find(TS_MARKER)? + TS_MARKER.len();
    let digits: String = text[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

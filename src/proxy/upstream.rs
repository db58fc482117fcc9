//! The upstream client: per-target TLS trust, pooled HTTP/2 and HTTP/1.1 connections to
//! providers, the response-header deadline, the stream idle deadline, and readable
//! connect/TLS failure reasons.
//!
//! The scheme, host and port of every upstream request come from the [`Target`] alone:
//! [`Upstream::send`] keeps only the path and query of the request it is given. Certificate and
//! hostname verification cannot be turned off; a target's `ca_file` only adds trust anchors to the
//! bundled web PKI roots. This module must not choose credentials or look at header values: the
//! request it sends carries the injected key, so no error it returns may include any part of the
//! request beyond the target's host.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::Uri;
use http::uri::PathAndQuery;
use http_body_util::combinators::BoxBody;
use hyper::body::{Body, Frame, SizeHint};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use tokio::time::{Instant, Sleep};

use super::error::ErrorCode;
pub use super::lane::ResponseBody;
use super::lane::{Http1Client, Lane, POOL_IDLE_TIMEOUT, StashConnector};
use crate::config::Limits;
use crate::providers::{Target, Targets};

/// A boxed, thread-safe error, as carried by bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body type of requests sent upstream (and of keyward's own responses).
pub type UpstreamBody = BoxBody<Bytes, BoxError>;

/// Upper bound on TCP connect time, so a black-holed address fails as unreachable (and can
/// fail over) well before the overall response deadline.
const MAX_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// TCP keepalive probe interval on upstream sockets.
const TCP_KEEPALIVE: Duration = Duration::from_secs(60);

/// Why an upstream call failed. No variant carries a header value or body.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UpstreamError {
    /// DNS, TCP connect or TLS failure: nothing reached the upstream application.
    #[error("upstream {host} is unreachable: {reason}")]
    Unreachable {
        /// The target's host (and port).
        host: String,
        /// What failed and, where it helps, how to fix it.
        reason: String,
    },
    /// The connection was established but the exchange failed before response headers.
    #[error("upstream {host} failed: {reason}")]
    Failed {
        /// The target's host (and port).
        host: String,
        /// What failed.
        reason: String,
    },
    /// No response headers within `limits.upstream_timeout`.
    #[error("upstream {host} did not answer within {}", humantime::format_duration(*after))]
    Timeout {
        /// The target's host (and port).
        host: String,
        /// The deadline that passed.
        after: Duration,
    },
    /// A streamed response sent nothing for `limits.stream_idle_timeout`.
    #[error("upstream stream was idle for {}; cut off", humantime::format_duration(*after))]
    StreamIdle {
        /// The idle deadline that passed.
        after: Duration,
    },
    /// A target's `ca_file` cannot be used as a trust anchor.
    #[error("ca_file {path} for target {target}: {reason}")]
    CaFile {
        /// The target naming the file.
        target: String,
        /// The file.
        path: String,
        /// What is wrong and what is expected.
        reason: String,
    },
}

impl UpstreamError {
    /// The error code keyward answers the app with for this failure.
    pub fn code(&self) -> ErrorCode {
        match self {
            UpstreamError::Timeout { .. } | UpstreamError::StreamIdle { .. } => {
                ErrorCode::UpstreamTimeout
            }
            _ => ErrorCode::UpstreamUnreachable,
        }
    }
}

// === Upstream ===

/// The connections toward every target: one [`Lane`] per distinct trust configuration and
/// authority, so targets with the same `ca_file` and host share connections.
pub struct Upstream {
    /// Keyed by target name. Built once at start: the request path only reads it, so no lock
    /// is taken per request.
    lanes: HashMap<String, Arc<Lane>>,
    /// Deadline for response headers.
    upstream_timeout: Duration,
    /// Deadline between two frames of a response body.
    stream_idle_timeout: Duration,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("upstream_timeout", &self.upstream_timeout)
            .field("stream_idle_timeout", &self.stream_idle_timeout)
            .finish_non_exhaustive()
    }
}

impl Upstream {
    /// Builds the lanes for every target up front, so an unusable `ca_file` fails at start.
    pub fn new(targets: &Targets, limits: &Limits) -> Result<Upstream, UpstreamError> {
        Upstream::with_idle_timeout(targets, limits, POOL_IDLE_TIMEOUT)
    }

    /// [`Upstream::new`], closing HTTP/2 connections after `idle` unused instead of
    /// [`POOL_IDLE_TIMEOUT`]; tests use it to see a connection retire.
    #[doc(hidden)]
    pub fn with_idle_timeout(
        targets: &Targets,
        limits: &Limits,
        idle: Duration,
    ) -> Result<Upstream, UpstreamError> {
        let mut trust_sets: HashMap<Option<PathBuf>, (StashConnector, Http1Client)> =
            HashMap::new();
        let mut shared: HashMap<(Option<PathBuf>, Uri), Arc<Lane>> = HashMap::new();
        let mut lanes = HashMap::new();
        for target in targets.iter() {
            let key = target.ca_file.clone();
            if !trust_sets.contains_key(&key) {
                let tls = tls_config(key.as_deref(), &target.name)?;
                trust_sets.insert(key.clone(), build_clients(tls, limits));
            }
            let origin = Uri::builder()
                .scheme(target.upstream.scheme.clone())
                .authority(target.upstream.authority.clone())
                .path_and_query("/")
                .build()
                .map_err(|e| UpstreamError::Unreachable {
                    host: authority_of(target),
                    reason: format!("cannot form an upstream URI for the target: {e}"),
                })?;
            let lane = shared
                .entry((key.clone(), origin.clone()))
                .or_insert_with(|| {
                    let (connector, http1) = &trust_sets[&key];
                    Lane::new(
                        origin,
                        connector.clone(),
                        http1.clone(),
                        limits.max_header_bytes as u32,
                        idle,
                    )
                });
            lanes.insert(target.name.clone(), lane.clone());
        }
        Ok(Upstream {
            lanes,
            upstream_timeout: limits.upstream_timeout,
            stream_idle_timeout: limits.stream_idle_timeout,
        })
    }

    /// Sends `req` to `target` and waits (at most `limits.upstream_timeout`) for response
    /// headers. `req`'s path and query are the full upstream path (prefix included, as
    /// `route::upstream_uri` builds it); its scheme and authority are always replaced by the
    /// target's. Redirects are returned, never followed.
    pub async fn send(
        &self,
        target: &Target,
        mut req: http::Request<UpstreamBody>,
    ) -> Result<http::Response<ResponseBody>, UpstreamError> {
        let lane = self
            .lanes
            .get(&target.name)
            .ok_or_else(|| UpstreamError::Unreachable {
                host: authority_of(target),
                reason: format!(
                    "target {} was not configured when keyward started",
                    target.name
                ),
            })?;
        *req.uri_mut() =
            upstream_uri(target, req.uri()).map_err(|reason| UpstreamError::Unreachable {
                host: authority_of(target),
                reason,
            })?;
        match tokio::time::timeout(self.upstream_timeout, lane.send(req)).await {
            Err(_) => Err(UpstreamError::Timeout {
                host: authority_of(target),
                after: self.upstream_timeout,
            }),
            Ok(result) => result,
        }
    }

    /// Wraps a response body so it errors after `stream_idle_timeout` without a frame.
    pub fn idle_guard<B>(&self, body: B) -> IdleTimeoutBody<B> {
        IdleTimeoutBody::new(body, self.stream_idle_timeout)
    }
}

/// The rustls configuration for one trust set: web PKI roots plus `ca_file`, TLS 1.3 and 1.2.
/// ALPN (h2, then http/1.1) is set by the connector builder, which refuses a preset list.
pub(super) fn tls_config(
    ca_file: Option<&Path>,
    target_name: &str,
) -> Result<rustls::ClientConfig, UpstreamError> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = ca_file {
        for cert in read_ca_file(path, target_name)? {
            roots.add(cert).map_err(|e| UpstreamError::CaFile {
                target: target_name.to_string(),
                path: path.display().to_string(),
                reason: format!("a certificate cannot be used as a trust anchor: {e}"),
            })?;
        }
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
    .expect("the ring provider supports TLS 1.2 and 1.3")
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(config)
}

fn read_ca_file(
    path: &Path,
    target_name: &str,
) -> Result<Vec<CertificateDer<'static>>, UpstreamError> {
    let err = |reason: String| UpstreamError::CaFile {
        target: target_name.to_string(),
        path: path.display().to_string(),
        reason,
    };
    let pem = std::fs::read(path).map_err(|e| err(format!("cannot read it: {e}")))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(format!("not valid PEM: {e}")))?;
    if certs.is_empty() {
        return Err(err(
            "contains no `BEGIN CERTIFICATE` block; give a PEM CA bundle".into(),
        ));
    }
    Ok(certs)
}

/// The connector and the HTTP/1.1 client for one trust set.
fn build_clients(tls: rustls::ClientConfig, limits: &Limits) -> (StashConnector, Http1Client) {
    let upstream_timeout = limits.upstream_timeout;
    let mut http = HttpConnector::new();
    // The HTTPS connector decides which schemes are allowed; the inner one must accept https.
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_keepalive(Some(TCP_KEEPALIVE));
    http.set_connect_timeout(Some(upstream_timeout.min(MAX_CONNECT_TIMEOUT)));
    let connector = StashConnector::new(
        hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_all_versions()
            .wrap_connector(http),
    );
    let client = Client::builder(TokioExecutor::new())
        .pool_idle_timeout(POOL_IDLE_TIMEOUT)
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        // A hostile upstream must not make keyward buffer unbounded response headers.
        .http1_max_buf_size(limits.max_header_bytes.max(8192))
        .http2_max_header_list_size(limits.max_header_bytes as u32)
        .build(connector.clone());
    (connector, client)
}

fn authority_of(target: &Target) -> String {
    target.upstream.authority.to_string()
}

/// `{target scheme}://{target authority}{path and query of the request}`. The path is taken as
/// the full upstream path (the target's prefix already included, as `route::upstream_uri` builds
/// it); whatever scheme and authority the request named are replaced.
fn upstream_uri(target: &Target, given: &Uri) -> Result<Uri, String> {
    let pq = given
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    Uri::builder()
        .scheme(target.upstream.scheme.clone())
        .authority(target.upstream.authority.clone())
        .path_and_query(pq)
        .build()
        .map_err(|e| format!("cannot form an upstream URI for the target: {e}"))
}

// === Failure reasons ===

/// A connect or TLS failure, with a reason naming what failed.
pub(super) fn connect_error(err: &(dyn std::error::Error + 'static), host: &str) -> UpstreamError {
    UpstreamError::Unreachable {
        host: host.to_string(),
        reason: reason_from_chain(err, host),
    }
}

/// Turns a client error into a reason naming what failed, from the innermost known cause.
pub(super) fn classify(err: &hyper_util::client::legacy::Error, host: &str) -> UpstreamError {
    let reason = reason_from_chain(err, host);
    if err.is_connect() || reason.starts_with("TLS:") {
        UpstreamError::Unreachable {
            host: host.to_string(),
            reason,
        }
    } else {
        UpstreamError::Failed {
            host: host.to_string(),
            reason,
        }
    }
}

fn reason_from_chain(err: &(dyn std::error::Error + 'static), host: &str) -> String {
    if let Some(tls) = find_tls_error(err) {
        return tls_reason(tls, host);
    }
    let mut dns = false;
    let mut io_reason = None;
    let mut hyper_reason = None;
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = current {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            io_reason.get_or_insert_with(|| io_reason_text(io));
        }
        if let Some(h) = e.downcast_ref::<hyper::Error>() {
            hyper_reason.get_or_insert_with(|| h.to_string());
        }
        // hyper-util's connect error type is private; its message is the stable marker.
        if e.to_string() == "dns error" {
            dns = true;
        }
        current = e.source();
    }
    match (dns, io_reason, hyper_reason) {
        (true, Some(io), _) => format!("DNS lookup failed: {io}"),
        (true, None, _) => "DNS lookup failed".into(),
        (false, Some(io), _) => io,
        (false, None, Some(h)) => h,
        (false, None, None) => err.to_string(),
    }
}

/// Finds a rustls error anywhere in the chain. `io::Error::source()` skips the error it wraps
/// (and TLS errors arrive as io errors wrapping io errors), so wrapped errors are opened
/// explicitly as well as followed through `source()`.
fn find_tls_error<'a>(err: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    if let Some(tls) = err.downcast_ref::<rustls::Error>() {
        return Some(tls);
    }
    if let Some(inner) = err
        .downcast_ref::<std::io::Error>()
        .and_then(std::io::Error::get_ref)
    {
        let inner: &(dyn std::error::Error + 'static) = inner;
        if let Some(tls) = find_tls_error(inner) {
            return Some(tls);
        }
    }
    err.source().and_then(find_tls_error)
}

fn io_reason_text(io: &std::io::Error) -> String {
    use std::io::ErrorKind;
    match io.kind() {
        ErrorKind::ConnectionRefused => "connection refused".into(),
        ErrorKind::ConnectionReset => "connection reset by peer".into(),
        ErrorKind::ConnectionAborted => "connection aborted".into(),
        ErrorKind::TimedOut => "connect timed out".into(),
        ErrorKind::UnexpectedEof => "connection closed by the upstream during the handshake".into(),
        ErrorKind::HostUnreachable | ErrorKind::NetworkUnreachable => "no route to host".into(),
        _ => io.to_string(),
    }
}

fn tls_reason(err: &rustls::Error, host: &str) -> String {
    use rustls::CertificateError as C;
    let bare_host = host
        .rsplit_once(':')
        .map_or(host, |(h, _)| h)
        .trim_start_matches('[')
        .trim_end_matches(']');
    match err {
        rustls::Error::InvalidCertificate(cert) => match cert {
            C::UnknownIssuer => "TLS: certificate is not trusted (unknown issuer); set ca_file \
                                 for this target to the CA that signed it"
                .into(),
            C::NotValidForName | C::NotValidForNameContext { .. } => format!(
                "TLS: certificate is not valid for host {bare_host}; the base_url host must be \
                 one of the certificate's names"
            ),
            C::Expired | C::ExpiredContext { .. } => "TLS: certificate has expired".into(),
            C::NotValidYet | C::NotValidYetContext { .. } => {
                "TLS: certificate is not valid yet (check the system clock)".into()
            }
            C::Revoked => "TLS: certificate has been revoked".into(),
            C::BadSignature => "TLS: certificate has a bad signature".into(),
            other => format!("TLS: invalid certificate ({other:?})"),
        },
        rustls::Error::AlertReceived(alert) => {
            format!("TLS: the upstream refused the handshake (alert {alert:?})")
        }
        rustls::Error::NoApplicationProtocol => {
            "TLS: no common application protocol (ALPN h2 or http/1.1)".into()
        }
        other => format!("TLS: {other}"),
    }
}

// === IdleTimeoutBody ===

/// A body that fails when no frame arrives for the idle deadline, so a stalled stream (the
/// upstream's response, or the app's request body) is cut instead of holding a request open.
pub struct IdleTimeoutBody<B> {
    /// The wrapped body.
    inner: B,
    /// Allowed gap between frames.
    idle: Duration,
    /// Fires when the current gap exceeds `idle`; reset on every frame.
    deadline: Pin<Box<Sleep>>,
    /// Set once the deadline fired, so the body ends after reporting it.
    expired: bool,
    /// The error reported when the deadline fires.
    on_idle: fn(Duration) -> BoxError,
    /// For the app's body: when the whole body must have arrived, and the allowance it came
    /// from (for the message). A body trickled faster than `idle` is still cut here.
    total: Option<(Pin<Box<Sleep>>, Duration)>,
}

impl<B> IdleTimeoutBody<B> {
    /// Wraps an upstream response body; fails with [`UpstreamError::StreamIdle`]. The first
    /// frame must arrive within `idle` from now.
    pub fn new(inner: B, idle: Duration) -> Self {
        Self::with_error(inner, idle, |after| {
            Box::new(UpstreamError::StreamIdle { after })
        })
    }

    /// Wraps the app's request body: it fails when nothing arrives for `idle`
    /// (`limits.request_idle_timeout`) or when the whole body has not arrived within `total`
    /// from now (`limits.request_body_timeout`); each error names its limit.
    pub fn for_app(inner: B, idle: Duration, total: Duration) -> Self {
        let mut body = Self::with_error(inner, idle, |after| {
            format!(
                "the app sent nothing for {} (limits.request_idle_timeout); cut off",
                humantime::format_duration(after)
            )
            .into()
        });
        body.total = Some((Box::pin(tokio::time::sleep(total)), total));
        body
    }

    fn with_error(inner: B, idle: Duration, on_idle: fn(Duration) -> BoxError) -> Self {
        IdleTimeoutBody {
            inner,
            idle,
            deadline: Box::pin(tokio::time::sleep(idle)),
            expired: false,
            on_idle,
            total: None,
        }
    }
}

impl<B> Body for IdleTimeoutBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if this.expired {
            return Poll::Ready(None);
        }
        if let Some((deadline, total)) = this.total.as_mut()
            && deadline.as_mut().poll(cx).is_ready()
        {
            this.expired = true;
            return Poll::Ready(Some(Err(format!(
                "the app did not send the whole request body within {} \
                 (limits.request_body_timeout); cut off",
                humantime::format_duration(*total)
            )
            .into())));
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                let next = Instant::now() + this.idle;
                this.deadline.as_mut().reset(next);
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => match this.deadline.as_mut().poll(cx) {
                Poll::Ready(()) => {
                    this.expired = true;
                    Poll::Ready(Some(Err((this.on_idle)(this.idle))))
                }
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.expired || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[test]
    fn tls_reasons_say_what_to_fix() {
        let unknown = rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        let reason = tls_reason(&unknown, "127.0.0.1:443");
        assert!(reason.contains("unknown issuer"), "{reason}");
        assert!(reason.contains("ca_file"), "{reason}");

        let name = rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName);
        let reason = tls_reason(&name, "[::1]:8443");
        assert!(reason.contains("not valid for host ::1;"), "{reason}");
    }

    #[test]
    fn tls_error_inside_io_error_is_found() {
        let tls = rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, tls);
        let outer = std::io::Error::other(io);
        let reason = reason_from_chain(&outer, "h:1");
        assert!(
            reason.starts_with("TLS: certificate is not trusted"),
            "{reason}"
        );
    }

    /// Stands in for hyper-util's private connect error, which is recognised by its message.
    #[derive(Debug)]
    struct Wrapped(&'static str, std::io::Error);

    impl std::fmt::Display for Wrapped {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.0)
        }
    }

    impl std::error::Error for Wrapped {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.1)
        }
    }

    #[test]
    fn dns_failure_is_named() {
        let err = Wrapped(
            "dns error",
            std::io::Error::other("failed to lookup address information"),
        );
        assert_eq!(
            reason_from_chain(&err, "nowhere.invalid:443"),
            "DNS lookup failed: failed to lookup address information"
        );
        let tcp = Wrapped(
            "tcp connect error",
            std::io::Error::from(std::io::ErrorKind::ConnectionRefused),
        );
        assert_eq!(reason_from_chain(&tcp, "h:1"), "connection refused");
    }

    #[test]
    fn refused_connection_is_named() {
        let io = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert_eq!(reason_from_chain(&io, "h:1"), "connection refused");
    }

    #[test]
    fn error_codes_map_to_the_contract() {
        let t = UpstreamError::Timeout {
            host: "h:1".into(),
            after: Duration::from_secs(1),
        };
        assert_eq!(t.code(), ErrorCode::UpstreamTimeout);
        let u = UpstreamError::Unreachable {
            host: "h:1".into(),
            reason: "connection refused".into(),
        };
        assert_eq!(u.code(), ErrorCode::UpstreamUnreachable);
        assert_eq!(
            u.to_string(),
            "upstream h:1 is unreachable: connection refused"
        );
    }

    #[test]
    fn ca_file_without_certificates_is_refused_with_a_fix() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("empty.pem");
        std::fs::write(&path, "not a certificate\n").unwrap();
        let err = tls_config(Some(&path), "internal").unwrap_err();
        let text = err.to_string();
        assert!(text.contains("internal"), "{text}");
        assert!(text.contains("BEGIN CERTIFICATE"), "{text}");

        let missing = tls_config(Some(&dir.path().join("missing.pem")), "internal").unwrap_err();
        assert!(missing.to_string().contains("cannot read it"), "{missing}");
    }

    #[tokio::test]
    async fn idle_body_errors_when_no_frame_arrives() {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, BoxError>>(1);
        let stream =
            futures_util::stream::unfold(
                rx,
                |mut rx| async move { rx.recv().await.map(|f| (f, rx)) },
            );
        let inner = http_body_util::StreamBody::new(Box::pin(stream));
        let idle = Duration::from_millis(300);
        let mut body = IdleTimeoutBody::new(inner, idle);

        tx.send(Ok(Frame::data(Bytes::from_static(b"one"))))
            .await
            .unwrap();
        let first = body.frame().await.unwrap().unwrap();
        assert_eq!(first.into_data().unwrap(), "one");

        // Frames keep arriving within the deadline: the timer is reset each time.
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            tx.send(Ok(Frame::data(Bytes::from_static(b"more"))))
                .await
                .unwrap();
            assert!(body.frame().await.unwrap().is_ok());
        }

        let err = body.frame().await.unwrap().unwrap_err();
        let err = err.downcast::<UpstreamError>().unwrap();
        assert!(matches!(*err, UpstreamError::StreamIdle { after } if after == idle));
        assert!(
            body.frame().await.is_none(),
            "body ends after the idle error"
        );
        drop(tx);
    }

    #[tokio::test(start_paused = true)]
    async fn an_app_body_trickled_past_its_total_allowance_is_cut() {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, BoxError>>(1);
        let stream =
            futures_util::stream::unfold(
                rx,
                |mut rx| async move { rx.recv().await.map(|f| (f, rx)) },
            );
        let inner = http_body_util::StreamBody::new(Box::pin(stream));
        let mut body =
            IdleTimeoutBody::for_app(inner, Duration::from_secs(10), Duration::from_secs(30));
        // One byte every 5 s never trips the 10 s idle limit, but 30 s end the body.
        let mut got = 0;
        let err = loop {
            tokio::time::sleep(Duration::from_secs(5)).await;
            let _ = tx.try_send(Ok(Frame::data(Bytes::from_static(b"x"))));
            match body.frame().await.unwrap() {
                Ok(_) => got += 1,
                Err(e) => break e,
            }
        };
        assert_eq!(got, 5, "bytes within the allowance pass");
        assert!(
            err.to_string().contains("limits.request_body_timeout"),
            "{err}"
        );
        assert!(body.frame().await.is_none());
    }
}

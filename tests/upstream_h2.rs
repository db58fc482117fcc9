//! The upstream client against HTTP/2 servers that behave at the edges of the protocol:
//! a low stream limit, a failing handshake, early answers with RST_STREAM, GOAWAY after every
//! call. Each server is a raw `h2` server over real TLS on loopback, so the test controls
//! exactly what the upstream sends.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper::body::{Body, Frame};
use keyward::config::Limits;
use keyward::providers::{Target, TargetSpec, Targets};
use keyward::proxy::upstream::{BoxError, Upstream, UpstreamBody, UpstreamError};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio_rustls::server::TlsStream;

fn limits(upstream_timeout: Duration) -> Limits {
    Limits {
        max_request_body: 16 << 20,
        max_concurrent_requests: 64,
        upstream_timeout,
        stream_idle_timeout: Duration::from_secs(10),
        request_idle_timeout: Duration::from_secs(10),
        max_header_bytes: 64 << 10,
        shutdown_grace: Duration::from_secs(1),
        ..Limits::default()
    }
}

/// A TLS listener on loopback with a fresh CA, offering only h2.
struct Server {
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    ca_pem: String,
    dir: tempfile::TempDir,
}

impl Server {
    async fn bind() -> Server {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
        let leaf_key = rcgen::KeyPair::generate().unwrap();
        let mut leaf = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
        leaf.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        let leaf = leaf.signed_by(&leaf_key, &ca).unwrap();
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(
            rustls::pki_types::PrivatePkcs8KeyDer::from(leaf_key.serialize_der()),
        );
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![leaf.der().clone(), ca.der().clone()], key)
        .unwrap();
        config.alpn_protocols = vec![b"h2".to_vec()];
        Server {
            listener: TcpListener::bind("127.0.0.1:0").await.unwrap(),
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
            ca_pem: ca.pem(),
            dir: tempfile::tempdir().unwrap(),
        }
    }

    /// Accepts connections forever, counting them, and hands each TLS stream to `serve`.
    fn run<F, Fut>(self, connections: Arc<AtomicUsize>, serve: F) -> Running
    where
        F: Fn(TlsStream<TcpStream>) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let Server {
            listener,
            acceptor,
            ca_pem,
            dir,
        } = self;
        let port = listener.local_addr().unwrap().port();
        let serve = Arc::new(serve);
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                connections.fetch_add(1, Ordering::SeqCst);
                let (acceptor, serve) = (acceptor.clone(), serve.clone());
                tokio::spawn(async move {
                    if let Ok(tls) = acceptor.accept(tcp).await {
                        serve(tls).await;
                    }
                });
            }
        });
        Running { port, ca_pem, dir }
    }
}

/// A running server: enough to build clients toward it.
struct Running {
    port: u16,
    ca_pem: String,
    dir: tempfile::TempDir,
}

impl Running {
    /// The upstream client and a target pointing at this server, trusting its CA.
    fn client(&self, limits: &Limits, idle: Option<Duration>) -> (Upstream, Target) {
        let ca = self.dir.path().join("ca.pem");
        std::fs::write(&ca, &self.ca_pem).unwrap();
        let spec = TargetSpec {
            base_url: Some(format!("https://127.0.0.1:{}", self.port)),
            auth_header: Some("Authorization".into()),
            auth_format: Some("Bearer {key}".into()),
            family: Some("openai".into()),
            ca_file: Some(ca),
            ..Default::default()
        };
        let targets = Targets::resolve(&BTreeMap::from([("h2".to_string(), spec)])).unwrap();
        let upstream = match idle {
            Some(idle) => Upstream::with_idle_timeout(&targets, limits, idle),
            None => Upstream::new(&targets, limits),
        };
        (upstream.unwrap(), targets.get("h2").unwrap().clone())
    }
}

fn get(path: &str) -> Request<UpstreamBody> {
    let body = Empty::<Bytes>::new().map_err(|n| match n {}).boxed();
    Request::get(path).body(body).unwrap()
}

fn answer(respond: &mut h2::server::SendResponse<Bytes>, status: StatusCode, text: &'static str) {
    let mut response = Response::new(());
    *response.status_mut() = status;
    if let Ok(mut stream) = respond.send_response(response, false) {
        let _ = stream.send_data(Bytes::from_static(text.as_bytes()), true);
    }
}

/// Waits (bounded) until `flag` is set; true if it was.
async fn eventually(flag: &AtomicBool) -> bool {
    for _ in 0..100 {
        if flag.load(Ordering::SeqCst) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// A request body that yields one chunk and then stays pending without ever waking, as an
/// app's body whose waker a later failover attempt took over; records when it is dropped.
struct Stuck {
    sent: bool,
    dropped: Arc<AtomicBool>,
}

impl Body for Stuck {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.sent {
            return Poll::Pending;
        }
        self.sent = true;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"0123456789")))))
    }
}

impl Drop for Stuck {
    fn drop(&mut self) {
        self.dropped.store(true, Ordering::SeqCst);
    }
}

fn stuck_upload(dropped: &Arc<AtomicBool>) -> Request<UpstreamBody> {
    let body = Stuck {
        sent: false,
        dropped: dropped.clone(),
    };
    Request::post("/upload").body(body.boxed()).unwrap()
}

/// An upstream that holds every call until the test lets it go, counting what reached it.
struct Holding {
    server: Running,
    /// TCP connections accepted.
    connections: Arc<AtomicUsize>,
    /// Calls received.
    received: Arc<AtomicUsize>,
    /// One permit answers one held call to any path but `/short`.
    hold: Arc<Semaphore>,
    /// One permit answers one call to `/short`.
    short: Arc<Semaphore>,
    /// Set to make every connection announce GOAWAY; streams still held keep it open, as on
    /// an upstream that is restarting.
    goaway: watch::Sender<bool>,
}

impl Holding {
    /// Allows `limit` streams per connection; with `first_only`, every connection after the
    /// first is dropped at once, as an upstream capping connections per client would.
    async fn start(limit: u32, first_only: bool) -> Holding {
        let connections = Arc::new(AtomicUsize::new(0));
        let received = Arc::new(AtomicUsize::new(0));
        let (hold, short) = (Arc::new(Semaphore::new(0)), Arc::new(Semaphore::new(0)));
        let goaway = watch::channel(false).0;
        let server = {
            let (seen, hold, short) = (received.clone(), hold.clone(), short.clone());
            let (goaway, served) = (goaway.clone(), Arc::new(AtomicUsize::new(0)));
            Server::bind().await.run(connections.clone(), move |tls| {
                let (seen, hold, short) = (seen.clone(), hold.clone(), short.clone());
                let refuse = first_only && served.fetch_add(1, Ordering::SeqCst) > 0;
                let mut shutdown = goaway.subscribe();
                async move {
                    if refuse {
                        return;
                    }
                    let mut conn = h2::server::Builder::new()
                        .max_concurrent_streams(limit)
                        .handshake::<_, Bytes>(tls)
                        .await
                        .unwrap();
                    let mut announced = false;
                    loop {
                        let next = tokio::select! {
                            next = conn.accept() => next,
                            _ = shutdown.changed(), if !announced => {
                                announced = true;
                                conn.graceful_shutdown();
                                continue;
                            }
                        };
                        let Some(Ok((req, mut respond))) = next else {
                            break;
                        };
                        seen.fetch_add(1, Ordering::SeqCst);
                        let gate = if req.uri().path() == "/short" {
                            short.clone()
                        } else {
                            hold.clone()
                        };
                        tokio::spawn(async move {
                            gate.acquire().await.unwrap().forget();
                            answer(&mut respond, StatusCode::OK, "ok");
                        });
                    }
                }
            })
        };
        Holding {
            server,
            connections,
            received,
            hold,
            short,
            goaway,
        }
    }

    /// An upstream client toward this server, with this call deadline and idle timeout.
    fn client(&self, deadline: Duration, idle: Option<Duration>) -> (Arc<Upstream>, Target) {
        let (upstream, target) = self.server.client(&limits(deadline), idle);
        (Arc::new(upstream), target)
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    /// Waits (bounded) until `n` calls in all reached the upstream.
    async fn received(&self, n: usize) -> bool {
        reaches(&self.received, n, Duration::from_secs(20)).await
    }
}

/// Waits until `count` reaches `want`, for at most `within`; true if it did.
async fn reaches(count: &AtomicUsize, want: usize, within: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    while count.load(Ordering::SeqCst) < want {
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    true
}

fn spawn_calls(
    upstream: &Arc<Upstream>,
    target: &Target,
    n: usize,
) -> Vec<
    tokio::task::JoinHandle<
        Result<http::Response<keyward::proxy::upstream::ResponseBody>, UpstreamError>,
    >,
> {
    (0..n)
        .map(|i| {
            let (upstream, target) = (upstream.clone(), target.clone());
            tokio::spawn(async move { upstream.send(&target, get(&format!("/{i}"))).await })
        })
        .collect()
}

#[tokio::test]
async fn streams_beyond_the_upstream_limit_go_to_another_connection_not_refused() {
    let upstream_side = Holding::start(10, false).await;
    let (upstream, target) = upstream_side.client(Duration::from_secs(30), None);

    // Forty calls arrive before any connection exists; the upstream allows ten streams per
    // connection and holds every answer, as long SSE streams do.
    for wave in 1..=2 {
        let calls = spawn_calls(&upstream, &target, 40);
        assert!(
            upstream_side.received(40 * wave).await,
            "only {} of 40 calls reached the upstream: the rest queue behind held streams",
            upstream_side.received.load(Ordering::SeqCst) - 40 * (wave - 1)
        );
        upstream_side.hold.add_permits(40);
        for call in calls {
            let response = call.await.unwrap().expect("answered, not refused");
            assert_eq!(response.status(), StatusCode::OK);
        }
        // The second wave finds the streams of the first given back.
        assert_eq!(upstream_side.connections(), 4);
    }
}

#[tokio::test]
async fn a_lane_opens_at_most_64_connections_then_queues() {
    let upstream_side = Holding::start(1, false).await;
    let (upstream, target) = upstream_side.client(Duration::from_secs(60), None);

    // One stream per connection and 65 held calls: the 65th must wait for a stream rather
    // than open a 65th connection (the lane's MAX_H2_CONNECTIONS is 64).
    let calls = spawn_calls(&upstream, &target, 65);
    assert!(
        upstream_side.received(64).await,
        "the first 64 calls got through"
    );
    assert!(
        !reaches(&upstream_side.connections, 65, Duration::from_secs(1)).await,
        "a 65th connection was opened"
    );
    upstream_side.hold.add_permits(65);
    for call in calls {
        let response = call
            .await
            .unwrap()
            .expect("answered once a stream was free");
        assert_eq!(response.status(), StatusCode::OK);
    }
    assert_eq!(upstream_side.connections(), 64);
}

#[tokio::test]
async fn calls_waiting_on_a_failing_connect_share_its_failure() {
    // Accepts TCP, then closes it after a while without a TLS handshake.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let connections = Arc::new(AtomicUsize::new(0));
    let counted = connections.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(200)).await;
                drop(tcp);
            });
        }
    });
    let spec = TargetSpec {
        base_url: Some(format!("https://127.0.0.1:{port}")),
        ..TargetSpec::default()
    };
    let targets = Targets::resolve(&BTreeMap::from([("h2".to_string(), spec)])).unwrap();
    let upstream = Arc::new(Upstream::new(&targets, &limits(Duration::from_secs(30))).unwrap());
    let target = targets.get("h2").unwrap().clone();

    let calls: Vec<_> = (0..6)
        .map(|i| {
            let (upstream, target) = (upstream.clone(), target.clone());
            tokio::spawn(async move { upstream.send(&target, get(&format!("/{i}"))).await })
        })
        .collect();
    for call in calls {
        let err = call.await.unwrap().unwrap_err();
        assert!(matches!(&err, UpstreamError::Unreachable { .. }), "{err}");
    }
    assert_eq!(
        connections.load(Ordering::SeqCst),
        1,
        "the waiting calls took the failure of the connect in flight"
    );
    // A later call tries again.
    upstream.send(&target, get("/again")).await.unwrap_err();
    assert_eq!(connections.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn an_upstream_reset_stops_sending_the_body() {
    let server = Server::bind().await;
    let server = server.run(Arc::default(), |tls| async move {
        let mut conn = h2::server::handshake(tls).await.unwrap();
        while let Some(Ok((req, mut respond))) = conn.accept().await {
            answer(&mut respond, StatusCode::TOO_MANY_REQUESTS, "slow down");
            // Dropping the unread body makes h2 send RST_STREAM(NO_ERROR).
            drop(req);
        }
    });
    let (upstream, target) = server.client(&limits(Duration::from_secs(30)), None);
    let dropped = Arc::new(AtomicBool::new(false));
    let response = upstream
        .send(&target, stuck_upload(&dropped))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    // Kept alive on purpose: only the reset may end the body's sending here.
    let _response = response;
    assert!(
        eventually(&dropped).await,
        "the request body is still held after the upstream reset its stream"
    );
}

#[tokio::test]
async fn dropping_the_answer_stops_sending_the_body() {
    let server = Server::bind().await;
    let server = server.run(Arc::default(), |tls| async move {
        let mut conn = h2::server::handshake(tls).await.unwrap();
        let mut unread = Vec::new();
        while let Some(Ok((req, mut respond))) = conn.accept().await {
            answer(&mut respond, StatusCode::OK, "ok");
            // Neither reads nor resets: the body would wait for it forever.
            unread.push(req);
        }
    });
    let (upstream, target) = server.client(&limits(Duration::from_secs(30)), None);
    let dropped = Arc::new(AtomicBool::new(false));
    let response = upstream
        .send(&target, stuck_upload(&dropped))
        .await
        .unwrap();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "ok");
    assert!(
        eventually(&dropped).await,
        "the request body outlived the response"
    );
}

#[tokio::test]
async fn a_timed_out_call_resets_its_stream() {
    let server = Server::bind().await;
    let reset = Arc::new(AtomicBool::new(false));
    let seen = reset.clone();
    let server = server.run(Arc::default(), move |tls| {
        let seen = seen.clone();
        async move {
            let mut conn = h2::server::handshake(tls).await.unwrap();
            while let Some(Ok((_req, mut respond))) = conn.accept().await {
                let seen = seen.clone();
                tokio::spawn(async move {
                    let reason = std::future::poll_fn(|cx| respond.poll_reset(cx)).await;
                    seen.store(reason.ok() == Some(h2::Reason::CANCEL), Ordering::SeqCst);
                });
            }
        }
    });
    let (upstream, target) = server.client(&limits(Duration::from_millis(300)), None);
    let err = upstream.send(&target, get("/never")).await.unwrap_err();
    assert!(matches!(err, UpstreamError::Timeout { .. }), "{err}");
    assert!(
        eventually(&reset).await,
        "the upstream was not told to stop"
    );
}

#[tokio::test]
async fn goaway_after_every_call_costs_no_call() {
    let server = Server::bind().await;
    let connections = Arc::new(AtomicUsize::new(0));
    let server = server.run(connections.clone(), |tls| async move {
        let mut conn = h2::server::handshake(tls).await.unwrap();
        if let Some(Ok((_req, mut respond))) = conn.accept().await {
            answer(&mut respond, StatusCode::OK, "ok");
        }
        // As load balancers that cap calls per connection do.
        conn.graceful_shutdown();
        while let Some(Ok((_req, mut respond))) = conn.accept().await {
            answer(&mut respond, StatusCode::OK, "ok");
        }
    });
    let (upstream, target) = server.client(&limits(Duration::from_secs(30)), None);
    for i in 0..50 {
        let response = upstream.send(&target, get(&format!("/{i}"))).await;
        let body = response.expect("answered").into_body().collect().await;
        assert_eq!(body.unwrap().to_bytes(), "ok");
    }
    assert!(connections.load(Ordering::SeqCst) > 1);
}

#[tokio::test]
async fn the_injected_key_is_in_no_error() {
    let server = Server::bind().await;
    let server = server.run(Arc::default(), |tls| async move {
        let mut conn = h2::server::handshake(tls).await.unwrap();
        while let Some(Ok((_req, mut respond))) = conn.accept().await {
            respond.send_reset(h2::Reason::REFUSED_STREAM);
        }
    });
    let (upstream, target) = server.client(&limits(Duration::from_secs(30)), None);
    let mut random = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut random).unwrap();
    let key: String = random.iter().map(|b| format!("{b:02x}")).collect();
    let mut req = get("/refused");
    req.headers_mut()
        .insert("authorization", format!("Bearer {key}").parse().unwrap());
    let err = upstream.send(&target, req).await.unwrap_err();
    let shown = format!("{err} {err:?}");
    assert!(shown.contains("refused stream"), "{shown}");
    assert!(!shown.contains(&key), "{shown}");
}

#[tokio::test]
async fn a_connection_carrying_a_stream_is_not_retired_as_idle() {
    let upstream_side = Holding::start(10, false).await;
    let idle = Duration::from_millis(300);
    let (upstream, target) = upstream_side.client(Duration::from_secs(30), Some(idle));

    // One long stream outlasts the idle timeout; no call takes the connection meanwhile.
    let long = spawn_calls(&upstream, &target, 1);
    assert!(upstream_side.received(1).await);
    tokio::time::sleep(idle * 3).await;
    let next = spawn_calls(&upstream, &target, 1);
    assert!(upstream_side.received(2).await);
    assert_eq!(
        upstream_side.connections(),
        1,
        "the connection was retired while it carried a stream"
    );
    upstream_side.hold.add_permits(2);
    for call in long.into_iter().chain(next) {
        assert_eq!(call.await.unwrap().unwrap().status(), StatusCode::OK);
    }
}

#[tokio::test]
async fn goaway_on_every_pooled_connection_costs_no_call() {
    let upstream_side = Holding::start(2, false).await;
    let (upstream, target) = upstream_side.client(Duration::from_secs(30), None);
    let call = |path: &'static str| {
        let (upstream, target) = (upstream.clone(), target.clone());
        tokio::spawn(async move { upstream.send(&target, get(path)).await })
    };

    // Two connections, each left with one held stream and room for another.
    let first = call("/hold");
    assert!(upstream_side.received(1).await);
    let filler = call("/short");
    assert!(upstream_side.received(2).await);
    let second = call("/hold");
    assert!(upstream_side.received(3).await);
    assert_eq!(upstream_side.connections(), 2);
    upstream_side.short.add_permits(1);
    let _ = filler.await.unwrap().unwrap().into_body().collect().await;

    upstream_side.goaway.send_replace(true);
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Both pooled connections refuse new streams now; the call must end on a new one.
    upstream_side.short.add_permits(1);
    let response = call("/short")
        .await
        .unwrap()
        .expect("a fresh connection served it");
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(upstream_side.connections(), 3);
    upstream_side.hold.add_permits(2);
    for held in [first, second] {
        assert_eq!(held.await.unwrap().unwrap().status(), StatusCode::OK);
    }
}

#[tokio::test]
async fn when_another_connection_fails_calls_wait_for_a_stream_on_an_open_one() {
    let upstream_side = Holding::start(1, true).await;
    let (upstream, target) = upstream_side.client(Duration::from_secs(30), None);

    let first = spawn_calls(&upstream, &target, 1);
    assert!(upstream_side.received(1).await);
    // The first connection is full; the second connect fails; the call queues instead.
    let second = spawn_calls(&upstream, &target, 1);
    assert!(reaches(&upstream_side.connections, 2, Duration::from_secs(10)).await);
    // Calls right after the failure queue too, without each trying to connect again.
    let more = spawn_calls(&upstream, &target, 3);
    assert!(
        !reaches(&upstream_side.connections, 3, Duration::from_millis(300)).await,
        "a call connected again right after a failed connect"
    );
    upstream_side.hold.add_permits(5);
    for call in first.into_iter().chain(second).chain(more) {
        let response = call.await.unwrap().expect("served on the open connection");
        assert_eq!(response.status(), StatusCode::OK);
    }
}

#[tokio::test]
async fn a_connection_that_announced_goaway_is_not_a_fallback() {
    let upstream_side = Holding::start(1, true).await;
    let (upstream, target) = upstream_side.client(Duration::from_secs(30), None);
    let held = spawn_calls(&upstream, &target, 1);
    assert!(upstream_side.received(1).await);
    upstream_side.goaway.send_replace(true);
    tokio::time::sleep(Duration::from_millis(200)).await;

    // The only open connection refuses new streams and a new one cannot be opened: the call
    // fails with the connect's reason after one attempt, not one attempt per retry.
    let err = upstream.send(&target, get("/x")).await.unwrap_err();
    assert!(matches!(err, UpstreamError::Unreachable { .. }), "{err}");
    assert_eq!(upstream_side.connections(), 2);
    upstream_side.hold.add_permits(1);
    for call in held {
        assert_eq!(call.await.unwrap().unwrap().status(), StatusCode::OK);
    }
}

//! The lean upstream for the comparison: a TLS (rustls) OpenAI look-alike that runs in its own
//! process, so its CPU time is never counted as the proxy's.
//!
//! It answers `POST …/chat/completions` with about 1 KiB of JSON, or, when the body asks for
//! `"stream": true`, with an SSE stream of [`SSE_EVENTS`] chunks spaced [`SSE_GAP`] apart, each
//! carrying its send time as `@ts=<unix ns>` inside the delta text (the one field every proxy
//! passes through). A request whose `Authorization` is not `Bearer <the bench key>` gets 401,
//! so a proxy that failed to inject the key shows up as errors, not as fast answers.
//! It records nothing: memory stays flat under load.

use std::convert::Infallible;
use std::io::{BufRead, Write};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

/// Argument that turns the bench binary into the mock upstream process.
pub const MOCK_FLAG: &str = "--mock-upstream";
/// Content chunks per SSE stream.
pub const SSE_EVENTS: usize = 20;
/// Gap between SSE chunks, like tokens arriving from a model.
pub const SSE_GAP: Duration = Duration::from_millis(2);
/// Marker before the send timestamp inside each SSE chunk's text.
pub const TS_MARKER: &str = "@ts=";

type Body = BoxBody<Bytes, Infallible>;

/// Wall-clock nanoseconds since the epoch; both processes use it, so differences are latencies.
pub fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// Entry point of the mock process: `--mock-upstream DIR`, bench key in `BENCH_UPSTREAM_KEY`.
/// Writes `DIR/mock-ca.pem`, prints `PORT <n>` and serves until its stdin closes.
pub fn run(dir: &Path) -> ! {
    let key =
        std::env::var("BENCH_UPSTREAM_KEY").expect("BENCH_UPSTREAM_KEY is set by the harness");
    let expected: Arc<str> = format!("Bearer {key}").into();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("mock runtime");
    runtime.block_on(async move {
        let acceptor = tls_acceptor(dir);
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind mock");
        let port = listener.local_addr().expect("mock addr").port();
        println!("PORT {port}");
        std::io::stdout().flush().ok();
        // The harness holds our stdin; when it goes away (even killed), so do we.
        std::thread::spawn(|| {
            let mut sink = String::new();
            while std::io::stdin()
                .lock()
                .read_line(&mut sink)
                .is_ok_and(|n| n > 0)
            {}
            std::process::exit(0);
        });
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let expected = expected.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = service_fn(move |req| answer(req, expected.clone()));
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    std::process::exit(0)
}

fn tls_acceptor(dir: &Path) -> tokio_rustls::TlsAcceptor {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let ca_key = rcgen::KeyPair::generate().expect("CA key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "keyward bench CA");
    ca_params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).expect("self-sign CA");
    let leaf_key = rcgen::KeyPair::generate().expect("leaf key");
    let mut leaf_params =
        rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .expect("leaf params");
    leaf_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "bench upstream");
    leaf_params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let leaf = leaf_params.signed_by(&leaf_key, &ca).expect("sign leaf");
    std::fs::write(dir.join("mock-ca.pem"), ca.pem()).expect("write mock CA");
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(rustls::pki_types::PrivatePkcs8KeyDer::from(
        leaf_key.serialize_der(),
    ));
    let mut config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(vec![leaf.der().clone(), ca.der().clone()], key)
        .expect("server certificate");
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}

async fn answer(req: Request<Incoming>, expected: Arc<str>) -> Result<Response<Body>, Infallible> {
    let authorized = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .is_some_and(|v| v.as_bytes() == expected.as_bytes());
    let path_ok = req.uri().path().ends_with("/chat/completions");
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    if !authorized {
        return Ok(json(
            StatusCode::UNAUTHORIZED,
            r#"{"error":{"message":"bench mock: missing or wrong API key","type":"invalid_request_error"}}"#.into(),
        ));
    }
    if !path_ok {
        return Ok(json(
            StatusCode::NOT_FOUND,
            r#"{"error":{"message":"bench mock: only /v1/chat/completions","type":"invalid_request_error"}}"#.into(),
        ));
    }
    if wants_stream(&body) {
        return Ok(sse());
    }
    Ok(json(StatusCode::OK, completion()))
}

fn wants_stream(body: &[u8]) -> bool {
    let text = String::from_utf8_lossy(body);
    let compact: String = text.chars().filter(|c| !c.is_whitespace()).collect();
    compact.contains("\"stream\":true")
}

fn json(status: StatusCode, body: String) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)).boxed())
        .expect("static response")
}

/// An OpenAI chat completion of about 1 KiB.
fn completion() -> String {
    let text = "The quick brown fox jumps over the lazy dog. ".repeat(14);
    format!(
        r#"{{"id":"chatcmpl-bench0000000000000000000000","object":"chat.completion","created":1700000000,"model":"bench-model","system_fingerprint":"fp_bench","choices":[{{"index":0,"message":{{"role":"assistant","content":"{}","refusal":null}},"logprobs":null,"finish_reason":"stop"}}],"usage":{{"prompt_tokens":9,"completion_tokens":140,"total_tokens":149}}}}"#,
        text.trim_end()
    )
}

fn chunk(content: &str, finish: Option<&str>) -> Bytes {
    let finish = finish.map_or("null".to_string(), |f| format!("\"{f}\""));
    Bytes::from(format!(
        "data: {{\"id\":\"chatcmpl-bench\",\"object\":\"chat.completion.chunk\",\"created\":1700000000,\"model\":\"bench-model\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{content}\"}},\"finish_reason\":{finish}}}]}}\n\n"
    ))
}

fn sse() -> Response<Body> {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(4);
    tokio::spawn(async move {
        for i in 0..SSE_EVENTS {
            if i > 0 {
                tokio::time::sleep(SSE_GAP).await;
            }
            let content = format!("tok{i} {TS_MARKER}{} ", now_ns());
            if tx
                .send(Ok(Frame::data(chunk(&content, None))))
                .await
                .is_err()
            {
                return;
            }
        }
        let _ = tx.send(Ok(Frame::data(chunk("", Some("stop"))))).await;
        let _ = tx
            .send(Ok(Frame::data(Bytes::from_static(b"data: [DONE]\n\n"))))
            .await;
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(http::header::CONTENT_TYPE, "text/event-stream")
        .header(http::header::CACHE_CONTROL, "no-cache")
        .body(BodyExt::boxed(StreamBody::new(stream)))
        .expect("static response")
}

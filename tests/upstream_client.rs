//! The upstream client against the in-process TLS mock provider: trust via `ca_file`,
//! certificate and hostname failures with readable reasons, timeouts, HTTP/2 negotiation,
//! connection reuse, idle cut-off of stalled streams — and the mock's own provider shapes.

mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, StatusCode, Version};
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::Frame;
use keyward::config::Limits;
use keyward::providers::{Target, TargetSpec, Targets};
use keyward::proxy::upstream::{BoxError, ResponseBody, Upstream, UpstreamBody, UpstreamError};
use serde_json::{Value, json};
use support::mock_upstream::{
    BIG_CHUNK, DEFAULT_TEXT, LEAK_PREFIX, LEAK_SUFFIX, MOCK_PROMPT_TOKENS, MockUpstream, Reply,
    key_of,
};

const KEY: &str = "sk-test-0123456789abcdefSECRET";

fn limits(upstream_timeout: Duration, idle: Duration) -> Limits {
    Limits {
        max_request_body: 16 << 20,
        max_concurrent_requests: 64,
        upstream_timeout,
        stream_idle_timeout: idle,
        request_idle_timeout: idle,
        max_header_bytes: 64 << 10,
        shutdown_grace: Duration::from_secs(1),
        ..Limits::default()
    }
}

fn default_limits() -> Limits {
    limits(Duration::from_secs(10), Duration::from_secs(10))
}

/// A custom target `mock` at `base_url`, optionally trusting `ca_file`.
fn targets(base_url: &str, ca_file: Option<&Path>) -> Targets {
    let spec = TargetSpec {
        base_url: Some(base_url.to_string()),
        auth_header: Some("Authorization".into()),
        auth_format: Some("Bearer {key}".into()),
        family: Some("openai".into()),
        ca_file: ca_file.map(Path::to_path_buf),
        ..Default::default()
    };
    Targets::resolve(&BTreeMap::from([("mock".to_string(), spec)])).expect("valid mock target")
}

/// An upstream client and the `mock` target, trusting the mock's CA.
fn trusted(mock: &MockUpstream, dir: &Path, limits: &Limits) -> (Upstream, Target) {
    let ca = mock.write_ca(dir);
    let targets = targets(&mock.base_url(), Some(&ca));
    let upstream = Upstream::new(&targets, limits).expect("upstream client");
    (upstream, targets.get("mock").expect("mock target").clone())
}

fn empty() -> UpstreamBody {
    Empty::<Bytes>::new()
        .map_err(|never| match never {})
        .boxed()
}

fn json_body(value: Value) -> UpstreamBody {
    Full::new(Bytes::from(value.to_string()))
        .map_err(|never| match never {})
        .boxed()
}

fn get(path: &str) -> Request<UpstreamBody> {
    Request::get(path)
        .header("authorization", format!("Bearer {KEY}"))
        .body(empty())
        .unwrap()
}

fn post(path: &str, body: Value) -> Request<UpstreamBody> {
    Request::post(path)
        .header("authorization", format!("Bearer {KEY}"))
        .header("content-type", "application/json")
        .body(json_body(body))
        .unwrap()
}

async fn text(resp: http::Response<ResponseBody>) -> String {
    let bytes = resp.into_body().collect().await.expect("body").to_bytes();
    String::from_utf8(bytes.to_vec()).expect("utf-8 body")
}

async fn json_of(resp: http::Response<ResponseBody>) -> Value {
    serde_json::from_str(&text(resp).await).expect("JSON body")
}

fn assert_no_key(err: &UpstreamError) {
    let shown = format!("{err} {err:?}");
    assert!(!shown.contains(KEY), "error exposes the key: {shown}");
}

fn sse_data(body: &str) -> Vec<Value> {
    body.split("\n\n")
        .filter_map(|event| {
            event
                .lines()
                .find_map(|l| l.strip_prefix("data: "))
                .map(str::trim)
        })
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str(d).expect("SSE data is JSON"))
        .collect()
}

// === Trust and failure reasons ===

#[tokio::test]
async fn trusted_via_ca_file_returns_200() {
    let mock = MockUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (upstream, target) = trusted(&mock, dir.path(), &default_limits());

    let resp = upstream.send(&target, get("/v1/models")).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let models = json_of(resp).await;
    assert_eq!(models["object"], "list");
    assert_eq!(mock.request_count(), 1);
    assert_eq!(key_of(&mock.requests()[0]).as_deref(), Some(KEY));
}

#[tokio::test]
async fn without_ca_file_the_mock_is_unreachable_for_unknown_issuer() {
    let mock = MockUpstream::start().await;
    let targets = targets(&mock.base_url(), None);
    let upstream = Upstream::new(&targets, &default_limits()).unwrap();
    let target = targets.get("mock").unwrap();

    let err = upstream.send(target, get("/v1/models")).await.unwrap_err();
    match &err {
        UpstreamError::Unreachable { host, reason } => {
            assert_eq!(host, &format!("127.0.0.1:{}", mock.addr().port()));
            assert!(reason.contains("unknown issuer"), "{reason}");
            assert!(reason.contains("ca_file"), "{reason}");
        }
        other => panic!("expected Unreachable, got {other:?}"),
    }
    assert_eq!(err.code().as_str(), "upstream_unreachable");
    assert_no_key(&err);
    assert_eq!(
        mock.request_count(),
        0,
        "no request may pass an untrusted handshake"
    );
}

#[tokio::test]
async fn certificate_for_another_name_is_refused_with_the_host() {
    let mock = MockUpstream::builder()
        .leaf_names(["other.example"])
        .start()
        .await;
    let dir = tempfile::tempdir().unwrap();
    let (upstream, target) = trusted(&mock, dir.path(), &default_limits());

    let err = upstream.send(&target, get("/v1/models")).await.unwrap_err();
    match &err {
        UpstreamError::Unreachable { reason, .. } => {
            assert!(reason.contains("not valid for host 127.0.0.1"), "{reason}");
        }
        other => panic!("expected Unreachable, got {other:?}"),
    }
    assert_no_key(&err);
    assert_eq!(mock.request_count(), 0);
}

#[tokio::test]
async fn closed_port_is_connection_refused() {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let targets = targets(&format!("https://127.0.0.1:{port}"), None);
    let upstream = Upstream::new(&targets, &default_limits()).unwrap();

    let err = upstream
        .send(targets.get("mock").unwrap(), get("/v1/models"))
        .await
        .unwrap_err();
    match &err {
        UpstreamError::Unreachable { reason, .. } => assert_eq!(reason, "connection refused"),
        other => panic!("expected Unreachable, got {other:?}"),
    }
    assert_no_key(&err);
}

#[tokio::test]
async fn slow_upstream_times_out_at_the_deadline() {
    let mock = MockUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let limits = limits(Duration::from_millis(300), Duration::from_secs(10));
    let (upstream, target) = trusted(&mock, dir.path(), &limits);

    let started = Instant::now();
    let err = upstream
        .send(&target, get("/slow?ms=3000"))
        .await
        .unwrap_err();
    let elapsed = started.elapsed();
    assert!(
        matches!(err, UpstreamError::Timeout { after, .. } if after == Duration::from_millis(300)),
        "{err:?}"
    );
    assert_eq!(err.code().as_str(), "upstream_timeout");
    assert!(elapsed < Duration::from_secs(2), "took {elapsed:?}");

    // A fast answer under the same deadline still works.
    let ok = upstream.send(&target, get("/slow?ms=10")).await.unwrap();
    assert_eq!(json_of(ok).await["slept_ms"], 10);
}

#[tokio::test]
async fn idle_body_is_cut_when_the_upstream_stalls() {
    let mock = MockUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let limits = limits(Duration::from_secs(10), Duration::from_millis(300));
    let (upstream, target) = trusted(&mock, dir.path(), &limits);

    let resp = upstream.send(&target, get("/stall?ms=5000")).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = upstream.idle_guard(resp.into_body());
    let started = Instant::now();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(first, "first\n");
    let err = body.frame().await.unwrap().unwrap_err();
    let err = err.downcast::<UpstreamError>().expect("an UpstreamError");
    assert!(matches!(*err, UpstreamError::StreamIdle { .. }), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(3));

    // With a longer idle deadline the same endpoint completes.
    let resp = upstream.send(&target, get("/stall?ms=100")).await.unwrap();
    let all = upstream
        .idle_guard(resp.into_body())
        .collect()
        .await
        .unwrap();
    assert_eq!(all.to_bytes(), "first\nrest\n");
}

// === Protocol and pooling ===

#[tokio::test]
async fn h2_is_used_when_offered() {
    let mock = MockUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (upstream, target) = trusted(&mock, dir.path(), &default_limits());

    let resp = upstream.send(&target, get("/echo/v")).await.unwrap();
    assert_eq!(resp.version(), Version::HTTP_2);
    let echoed = json_of(resp).await;
    assert_eq!(echoed["version"], "HTTP/2.0");
    assert_eq!(mock.requests()[0].version, Version::HTTP_2);
}

#[tokio::test]
async fn http1_is_used_when_only_it_is_offered() {
    let mock = MockUpstream::builder().http1_only().start().await;
    let dir = tempfile::tempdir().unwrap();
    let (upstream, target) = trusted(&mock, dir.path(), &default_limits());

    let resp = upstream.send(&target, get("/echo/v")).await.unwrap();
    assert_eq!(resp.version(), Version::HTTP_11);
    let echoed = json_of(resp).await;
    assert_eq!(echoed["version"], "HTTP/1.1");
    // hyper sets Host from the URI the client built, i.e. from the target.
    assert_eq!(
        echoed["headers"]["host"],
        format!("127.0.0.1:{}", mock.addr().port())
    );
}

async fn sequential_requests_share_one_connection(mock: MockUpstream) {
    let dir = tempfile::tempdir().unwrap();
    let (upstream, target) = trusted(&mock, dir.path(), &default_limits());
    for i in 0..20 {
        let resp = upstream
            .send(&target, get(&format!("/echo/{i}")))
            .await
            .unwrap();
        assert_eq!(json_of(resp).await["path"], format!("/echo/{i}"));
    }
    assert_eq!(mock.request_count(), 20);
    assert_eq!(
        mock.connection_count(),
        1,
        "the pooled connection is reused"
    );
}

#[tokio::test]
async fn twenty_sequential_h2_requests_use_one_connection() {
    sequential_requests_share_one_connection(MockUpstream::start().await).await;
}

#[tokio::test]
async fn twenty_sequential_http1_requests_use_one_connection() {
    sequential_requests_share_one_connection(MockUpstream::builder().http1_only().start().await)
        .await;
}

#[tokio::test]
async fn a_burst_of_first_requests_opens_one_h2_connection() {
    let mock = MockUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (upstream, target) = trusted(&mock, dir.path(), &default_limits());
    let upstream = std::sync::Arc::new(upstream);

    // All start before any connection exists: each would open its own without the lane's
    // connect gate.
    let calls = (0..16).map(|i| {
        let (upstream, target) = (upstream.clone(), target.clone());
        tokio::spawn(async move {
            let resp = upstream.send(&target, get(&format!("/echo/{i}"))).await;
            json_of(resp.expect("answer")).await
        })
    });
    for (i, call) in calls.collect::<Vec<_>>().into_iter().enumerate() {
        assert_eq!(call.await.unwrap()["path"], format!("/echo/{i}"));
    }
    assert_eq!(mock.request_count(), 16);
    assert_eq!(mock.connection_count(), 1, "one handshake served the burst");
}

#[tokio::test]
async fn a_connection_the_upstream_cut_is_replaced() {
    for mock in [
        MockUpstream::start().await,
        MockUpstream::builder().http1_only().start().await,
    ] {
        let dir = tempfile::tempdir().unwrap();
        let (upstream, target) = trusted(&mock, dir.path(), &default_limits());
        json_of(upstream.send(&target, get("/echo/1")).await.unwrap()).await;
        mock.cut_connections();
        // Give the client a moment to see the connection close, as it would between calls.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let resp = upstream.send(&target, get("/echo/2")).await.unwrap();
        assert_eq!(json_of(resp).await["path"], "/echo/2");
        assert_eq!(mock.connection_count(), 2);
    }
}

#[tokio::test]
async fn an_idle_h2_connection_is_closed_and_the_next_call_reconnects() {
    let mock = MockUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let ca = mock.write_ca(dir.path());
    let targets = targets(&mock.base_url(), Some(&ca));
    let target = targets.get("mock").unwrap();
    let idle = Duration::from_millis(600);
    let upstream = Upstream::with_idle_timeout(&targets, &default_limits(), idle).unwrap();

    // Calls closer together than the idle timeout keep the connection.
    for i in 0..3 {
        json_of(
            upstream
                .send(target, get(&format!("/echo/{i}")))
                .await
                .unwrap(),
        )
        .await;
        tokio::time::sleep(idle / 3).await;
    }
    assert_eq!(mock.connection_count(), 1);
    // Unused for longer than the timeout (plus the check interval), it is closed.
    tokio::time::sleep(idle * 2).await;
    json_of(upstream.send(target, get("/echo/later")).await.unwrap()).await;
    assert_eq!(mock.connection_count(), 2);
}

#[tokio::test]
async fn targets_with_the_same_ca_file_share_a_pool() {
    let mock = MockUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let ca = mock.write_ca(dir.path());
    let spec = |url: String| TargetSpec {
        base_url: Some(url),
        ca_file: Some(ca.clone()),
        ..TargetSpec::default()
    };
    let targets = Targets::resolve(&BTreeMap::from([
        ("one".to_string(), spec(mock.base_url())),
        ("two".to_string(), spec(mock.base_url())),
    ]))
    .unwrap();
    let upstream = Upstream::new(&targets, &default_limits()).unwrap();
    for name in ["one", "two", "one", "two"] {
        let resp = upstream
            .send(targets.get(name).unwrap(), get("/echo/x"))
            .await
            .unwrap();
        resp.into_body().collect().await.unwrap();
    }
    assert_eq!(mock.request_count(), 4);
    // Separate clients would each have opened their own connection.
    assert_eq!(mock.connection_count(), 1);
}

#[tokio::test]
async fn destination_comes_only_from_the_target() {
    let mock = MockUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let ca = mock.write_ca(dir.path());
    let targets = targets(&mock.base_url(), Some(&ca));
    let upstream = Upstream::new(&targets, &default_limits()).unwrap();

    // An absolute URI naming another host must not steer the request anywhere else.
    let req = Request::get("https://evil.example:8443/echo/prefix/v1/x?a=1&b=2")
        .body(empty())
        .unwrap();
    let resp = upstream
        .send(targets.get("mock").unwrap(), req)
        .await
        .unwrap();
    let echoed = json_of(resp).await;
    assert_eq!(echoed["path"], "/echo/prefix/v1/x");
    assert_eq!(echoed["query"], "a=1&b=2");
    assert_eq!(
        mock.requests()[0].path_and_query,
        "/echo/prefix/v1/x?a=1&b=2"
    );
}

#[tokio::test]
async fn redirects_are_returned_not_followed() {
    let mock = MockUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (upstream, target) = trusted(&mock, dir.path(), &default_limits());

    let resp = upstream.send(&target, get("/redirect")).await.unwrap();
    assert_eq!(resp.status(), StatusCode::FOUND);
    assert_eq!(resp.headers()["location"], "https://evil.example/steal");
    assert_eq!(mock.request_count(), 1);
}

#[tokio::test]
async fn plain_http_loopback_target_works() {
    let mock = MockUpstream::builder().plaintext().start().await;
    assert!(mock.base_url().starts_with("http://127.0.0.1:"));
    let targets = targets(&mock.base_url(), None);
    let upstream = Upstream::new(&targets, &default_limits()).unwrap();
    let resp = upstream
        .send(targets.get("mock").unwrap(), get("/v1/models"))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(mock.request_count(), 1);
}

#[tokio::test]
async fn unusable_ca_file_fails_at_construction() {
    let dir = tempfile::tempdir().unwrap();
    let mock = MockUpstream::start().await;
    let ca = mock.write_ca(dir.path());
    let targets = targets(&mock.base_url(), Some(&ca));
    // The file was valid when the config was read and broke afterwards.
    std::fs::write(&ca, "garbage\n").unwrap();
    let err = Upstream::new(&targets, &default_limits()).unwrap_err();
    assert!(matches!(err, UpstreamError::CaFile { .. }), "{err:?}");
    assert!(err.to_string().contains("mock"), "{err}");
}

// === Provider shapes of the mock ===

#[tokio::test]
async fn openai_chat_json_and_stream_with_usage() {
    let mock = MockUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (upstream, target) = trusted(&mock, dir.path(), &default_limits());

    let body = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]});
    let resp = upstream
        .send(&target, post("/v1/chat/completions", body))
        .await
        .unwrap();
    let completion = json_of(resp).await;
    assert_eq!(completion["object"], "chat.completion");
    assert_eq!(completion["model"], "gpt-4o-mini");
    assert_eq!(completion["choices"][0]["message"]["content"], DEFAULT_TEXT);
    assert_eq!(completion["usage"]["prompt_tokens"], MOCK_PROMPT_TOKENS);

    let body = json!({"model": "gpt-4o", "messages": [], "stream": true,
                      "stream_options": {"include_usage": true}});
    let resp = upstream
        .send(&target, post("/v1/chat/completions", body))
        .await
        .unwrap();
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let raw = text(resp).await;
    assert!(raw.ends_with("data: [DONE]\n\n"), "{raw}");
    let chunks = sse_data(&raw);
    assert!(
        chunks
            .iter()
            .all(|c| c["object"] == "chat.completion.chunk")
    );
    let streamed: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(streamed, DEFAULT_TEXT);
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"], json!([]));
    assert_eq!(last["usage"]["prompt_tokens"], MOCK_PROMPT_TOKENS);

    // Without include_usage no chunk carries usage.
    let body = json!({"model": "gpt-4o", "messages": [], "stream": true});
    let resp = upstream
        .send(&target, post("/v1/chat/completions", body))
        .await
        .unwrap();
    assert!(
        sse_data(&text(resp).await)
            .iter()
            .all(|c| c.get("usage").is_none())
    );
}

#[tokio::test]
async fn anthropic_stream_has_the_event_sequence() {
    let mock = MockUpstream::builder().text("one two three").start().await;
    let dir = tempfile::tempdir().unwrap();
    let (upstream, target) = trusted(&mock, dir.path(), &default_limits());

    let body = json!({"model": "claude-x", "max_tokens": 10, "messages": [], "stream": true});
    let raw = text(
        upstream
            .send(&target, post("/v1/messages", body))
            .await
            .unwrap(),
    )
    .await;
    let names: Vec<&str> = raw
        .lines()
        .filter_map(|l| l.strip_prefix("event: "))
        .collect();
    assert_eq!(
        names,
        [
            "message_start",
            "content_block_start",
            "ping",
            "content_block_delta",
            "content_block_delta",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop"
        ]
    );
    let data = sse_data(&raw);
    assert_eq!(
        data[0]["message"]["usage"]["input_tokens"],
        MOCK_PROMPT_TOKENS
    );
    assert_eq!(data[7]["usage"]["output_tokens"], 3);

    let body = json!({"model": "claude-x", "max_tokens": 10, "messages": []});
    let msg = json_of(
        upstream
            .send(&target, post("/v1/messages", body))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(msg["content"][0]["text"], "one two three");
    assert_eq!(msg["usage"]["output_tokens"], 3);
}

#[tokio::test]
async fn gemini_generate_and_stream() {
    let mock = MockUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (upstream, target) = trusted(&mock, dir.path(), &default_limits());

    let body = json!({"contents": [{"parts": [{"text": "hi"}]}]});
    let resp = upstream
        .send(
            &target,
            post(
                "/v1beta/models/gemini-2.0-flash:generateContent",
                body.clone(),
            ),
        )
        .await
        .unwrap();
    let r = json_of(resp).await;
    assert_eq!(
        r["candidates"][0]["content"]["parts"][0]["text"],
        DEFAULT_TEXT
    );
    assert_eq!(r["modelVersion"], "gemini-2.0-flash");
    assert_eq!(r["usageMetadata"]["promptTokenCount"], MOCK_PROMPT_TOKENS);

    let resp = upstream
        .send(
            &target,
            post(
                "/v1beta/models/gemini-2.0-flash:streamGenerateContent?alt=sse",
                body,
            ),
        )
        .await
        .unwrap();
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let chunks = sse_data(&text(resp).await.replace("\r\n", "\n"));
    let joined: String = chunks
        .iter()
        .filter_map(|c| c["candidates"][0]["content"]["parts"][0]["text"].as_str())
        .collect();
    assert_eq!(joined, DEFAULT_TEXT);
    assert!(chunks.last().unwrap().get("usageMetadata").is_some());
}

#[tokio::test]
async fn embeddings_in_float_and_base64() {
    let mock = MockUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (upstream, target) = trusted(&mock, dir.path(), &default_limits());

    let floats = json_of(
        upstream
            .send(
                &target,
                post("/v1/embeddings", json!({"model": "e", "input": ["a", "b"]})),
            )
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(floats["data"].as_array().unwrap().len(), 2);
    assert_eq!(floats["data"][1]["embedding"][0], 0.125);

    let b64 = json_of(
        upstream
            .send(
                &target,
                post(
                    "/v1/embeddings",
                    json!({"model": "e", "input": "a", "encoding_format": "base64"}),
                ),
            )
            .await
            .unwrap(),
    )
    .await;
    // 0.125f32, -0.25, 0.5, 0.75 little-endian.
    assert_eq!(b64["data"][0]["embedding"], "AAAAPgAAgL4AAAA/AABAPw==");
}

#[tokio::test]
async fn per_key_replies_apply_before_routing_and_switch_at_runtime() {
    let mock = MockUpstream::builder()
        .on_key(KEY, Reply::status(429).header("retry-after", "2"))
        .start()
        .await;
    let dir = tempfile::tempdir().unwrap();
    let (upstream, target) = trusted(&mock, dir.path(), &default_limits());

    let resp = upstream.send(&target, get("/v1/models")).await.unwrap();
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(resp.headers()["retry-after"], "2");
    resp.into_body().collect().await.unwrap();

    mock.set_key_reply(KEY, Reply::status(401));
    let resp = upstream.send(&target, get("/v1/models")).await.unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    resp.into_body().collect().await.unwrap();

    // x-api-key carries a key too; another key routes normally.
    let other = Request::get("/v1/models")
        .header("x-api-key", "sk-other")
        .body(empty())
        .unwrap();
    assert_eq!(upstream.send(&target, other).await.unwrap().status(), 200);

    mock.clear_key_reply(KEY);
    assert_eq!(
        upstream
            .send(&target, get("/v1/models"))
            .await
            .unwrap()
            .status(),
        200
    );
    let keys: Vec<Option<String>> = mock.requests().iter().map(key_of).collect();
    assert_eq!(keys[2].as_deref(), Some("sk-other"));
    assert_eq!(keys[3].as_deref(), Some(KEY));
}

#[tokio::test]
async fn leak_endpoints_return_the_key_in_split_chunks_and_headers() {
    let mock = MockUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (upstream, target) = trusted(&mock, dir.path(), &default_limits());

    let split = LEAK_PREFIX.len() + 5;
    let resp = upstream
        .send(&target, get(&format!("/leak?split={split}")))
        .await
        .unwrap();
    assert_eq!(resp.headers()["x-debug-key"], KEY);
    let mut body = resp.into_body();
    let mut chunks = Vec::new();
    while let Some(frame) = body.frame().await {
        // h2 may end the stream with an empty DATA frame; only bytes matter here.
        if let Ok(data) = frame.unwrap().into_data()
            && !data.is_empty()
        {
            chunks.push(data);
        }
    }
    assert_eq!(chunks.len(), 2, "{chunks:?}");
    assert_eq!(chunks[0].len(), split);
    let whole: Vec<u8> = chunks.concat();
    assert_eq!(whole, format!("{LEAK_PREFIX}{KEY}{LEAK_SUFFIX}").as_bytes());

    let resp = upstream.send(&target, get("/leak-error")).await.unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    let err = json_of(resp).await;
    assert_eq!(err["error"]["code"], "invalid_api_key");
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with(&format!("Incorrect API key provided: {KEY}."))
    );
}

#[tokio::test]
async fn gated_sse_waits_for_release() {
    let mock = MockUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (upstream, target) = trusted(&mock, dir.path(), &default_limits());

    let resp = upstream
        .send(&target, get("/gated-sse?events=2"))
        .await
        .unwrap();
    let mut body = resp.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert!(String::from_utf8_lossy(&first).contains("\"n\":1"));
    let held = tokio::time::timeout(Duration::from_millis(200), body.frame()).await;
    assert!(held.is_err(), "event 2 must wait for release()");
    mock.release();
    let second = tokio::time::timeout(Duration::from_secs(5), body.frame())
        .await
        .expect("released event arrives")
        .unwrap()
        .unwrap()
        .into_data()
        .unwrap();
    assert!(String::from_utf8_lossy(&second).contains("\"n\":2"));
}

#[tokio::test]
async fn big_bodies_stream_both_ways() {
    let mock = MockUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (upstream, target) = trusted(&mock, dir.path(), &default_limits());

    let size = 3 * BIG_CHUNK + 123;
    let resp = upstream
        .send(&target, get(&format!("/big?bytes={size}")))
        .await
        .unwrap();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(bytes.len(), size);
    assert!(
        bytes
            .iter()
            .enumerate()
            .all(|(i, &b)| b == b'a' + (i % 26) as u8)
    );

    // Upload 3 MiB as a stream of 64 KiB frames; the mock counts what arrived.
    let frames = (0..48).map(|_| Ok::<_, BoxError>(Frame::data(Bytes::from(vec![7u8; 64 << 10]))));
    let body = StreamBody::new(futures_util::stream::iter(frames)).boxed();
    let req = Request::builder()
        .method(Method::POST)
        .uri("/v1/files")
        .body(body)
        .unwrap();
    let file = json_of(upstream.send(&target, req).await.unwrap()).await;
    assert_eq!(file["bytes"], 48 * (64 << 10));
    assert_eq!(mock.last_request().unwrap().body_len, 48 * (64 << 10));
}

#[tokio::test]
async fn the_body_keeps_streaming_after_an_early_answer() {
    for mock in [
        MockUpstream::start().await,
        MockUpstream::builder().http1_only().start().await,
    ] {
        let dir = tempfile::tempdir().unwrap();
        let (upstream, target) = trusted(&mock, dir.path(), &default_limits());
        let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(4);
        let frames = futures_util::stream::unfold(rx, |mut rx| async move {
            let data = rx.recv().await?;
            Some((Ok::<_, BoxError>(Frame::data(data)), rx))
        });
        let req = Request::builder()
            .method(Method::POST)
            .uri("/answer-first")
            .body(StreamBody::new(frames).boxed())
            .unwrap();
        tx.send(Bytes::from_static(b"first")).await.unwrap();

        // The answer arrives while the body is still open.
        let resp = upstream.send(&target, req).await.unwrap();
        let mut body = resp.into_body();
        let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(first, "answered\n");
        // The rest, past the bytes sent without waiting for flow control, still arrives.
        for _ in 0..8 {
            tx.send(Bytes::from(vec![1u8; 32 << 10])).await.unwrap();
        }
        drop(tx);
        let rest = tokio::time::timeout(Duration::from_secs(10), body.collect())
            .await
            .expect("the upstream read the whole body")
            .unwrap()
            .to_bytes();
        assert_eq!(rest, format!("received {}\n", 5 + 8 * (32 << 10)));
    }
}

#[tokio::test]
async fn h2_response_trailers_arrive_after_the_data() {
    let mock = MockUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (upstream, target) = trusted(&mock, dir.path(), &default_limits());
    let resp = upstream.send(&target, get("/trailers")).await.unwrap();
    assert_eq!(resp.version(), Version::HTTP_2);
    let all = resp.into_body().collect().await.unwrap();
    assert_eq!(all.trailers().unwrap()["x-checksum"], "42");
    assert_eq!(all.to_bytes(), "body\n");
}

#[tokio::test]
async fn echo_reports_what_the_upstream_received() {
    let mock = MockUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (upstream, target) = trusted(&mock, dir.path(), &default_limits());

    let req = Request::put("/echo/a/b?x=1")
        .header("x-custom", "one")
        .header("x-multi", "a")
        .header("x-multi", "b")
        .body(json_body(json!({"k": 1})))
        .unwrap();
    let resp = upstream.send(&target, req).await.unwrap();
    assert_eq!(resp.headers()["x-echo-method"], "PUT");
    assert_eq!(resp.headers()["x-echo-path"], "/echo/a/b");
    let echoed = json_of(resp).await;
    assert_eq!(echoed["method"], "PUT");
    assert_eq!(echoed["query"], "x=1");
    assert_eq!(echoed["headers"]["x-custom"], "one");
    assert_eq!(echoed["headers"]["x-multi"], json!(["a", "b"]));
    assert_eq!(echoed["body_len"], 7);
    assert_eq!(mock.requests()[0].json(), json!({"k": 1}));
}

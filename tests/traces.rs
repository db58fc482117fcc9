//! OTLP traces with the real binary: spans reach a collector (a receiver built on the official
//! `opentelemetry-proto` Python package) with the GenAI attributes and never a secret; a dead
//! collector fails no call; a reload moves spans to another collector.

mod support;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::daemon::{Daemon, random_key};
use support::uds::{bearer, call, post};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The venv holding `opentelemetry-proto` (created by `.ci/run`; made here when missing).
fn otel_python(test: &str) -> Option<PathBuf> {
    let venv = root().join("target/otel-venv");
    let python = venv.join("bin/python");
    let probe = |python: &Path| {
        Command::new(python)
            .args([
                "-c",
                "import opentelemetry.proto.collector.trace.v1.trace_service_pb2",
            ])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if !probe(&python) {
        let _ = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status();
        let _ = Command::new(venv.join("bin/pip"))
            .args([
                "install",
                "-q",
                "opentelemetry-proto==1.45.2",
                "protobuf==7.36.2",
            ])
            .status();
    }
    support::needs::holds(
        test,
        probe(&python),
        "target/otel-venv lacks opentelemetry-proto (.ci/run installs it)",
    )
    .then_some(python)
}

/// A running `tests/support/otlp_receiver.py`.
struct Receiver {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Receiver {
    fn start(python: &Path) -> Receiver {
        let dir = tempfile::tempdir().unwrap();
        let mut child = Command::new(python)
            .arg(root().join("tests/support/otlp_receiver.py"))
            .arg(dir.path())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port = line.trim().parse().unwrap_or_else(|_| panic!("{line:?}"));
        Receiver { child, port, dir }
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The spans received so far.
    fn spans(&self) -> Vec<Value> {
        std::fs::read_to_string(self.dir.path().join("spans.jsonl"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// Waits up to 20 s for at least `n` spans.
    fn wait_spans(&self, n: usize) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let spans = self.spans();
            if spans.len() >= n || Instant::now() > deadline {
                return spans;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Every byte the collector received.
    fn raw(&self) -> Vec<u8> {
        std::fs::read(self.dir.path().join("raw.bin")).unwrap_or_default()
    }
}

/// The sample value of `keyward_trace_spans_total{outcome="…"}` in `keyward metrics`.
fn span_count(d: &Daemon, outcome: &str) -> u64 {
    let text = d.ok(&["metrics"]);
    let prefix = format!("keyward_trace_spans_total{{outcome=\"{outcome}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no {prefix} in\n{text}"))
        .parse()
        .unwrap()
}

fn span_of<'a>(spans: &'a [Value], call_id: &str) -> &'a Value {
    let hex = call_id.replace('-', "");
    let found: Vec<&Value> = spans.iter().filter(|s| s["trace_id"] == hex).collect();
    assert_eq!(found.len(), 1, "one span for call {call_id} in {spans:#?}");
    found[0]
}

/// A chat body whose prompt carries `marker`, so the test can look for the payload.
fn chat(model: &str, marker: &str, stream: bool) -> String {
    json!({
        "model": model,
        "messages": [{"role": "user", "content": format!("say {marker}")}],
        "stream": stream,
        "stream_options": {"include_usage": true},
    })
    .to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn every_call_is_one_genai_span_at_the_collector_and_no_secret_is() {
    const TEST: &str = "every_call_is_one_genai_span_at_the_collector_and_no_secret_is";
    let Some(python) = otel_python(TEST) else {
        return;
    };
    let receiver = Receiver::start(&python);
    let s = support::setup(
        &["openai"],
        &format!("otlp_endpoint = \"{}\"", receiver.endpoint()),
    )
    .await;
    let key = random_key("sk-proj-");
    let (token, cred) = s
        .daemon
        .provision("acme", "openai", &key, &["--model", "gpt-4o*"]);
    let marker = format!("PAYLOAD-{}", &random_key("")[..16]);
    let auth = bearer(&token);
    let started = std::time::SystemTime::now();

    let mut calls = Vec::new();
    for (body, want) in [
        (chat("gpt-4o-mini", &marker, false), 200),
        (chat("gpt-4o-mini", &marker, true), 200),
        // Outside the credential's scope: refused before anything goes upstream.
        (chat("o3-pro", &marker, false), 403),
    ] {
        let req = post(
            "/openai/v1/chat/completions",
            &[("authorization", &auth)],
            &body,
        );
        let (status, headers, text) = call(&s.daemon.socket(), req).await;
        assert_eq!(status, want, "{text}");
        calls.push(headers["keyward-call-id"].to_str().unwrap().to_string());
    }
    let req = post(
        "/openai/v1/chat/completions",
        &[("authorization", "Bearer kw_not_a_token")],
        &chat("gpt-4o-mini", &marker, false),
    );
    let (status, headers, _) = call(&s.daemon.socket(), req).await;
    assert_eq!(status, 401);
    calls.push(headers["keyward-call-id"].to_str().unwrap().to_string());

    let spans = receiver.wait_spans(calls.len());
    assert_eq!(spans.len(), calls.len(), "{spans:#?}");
    let instance = s.daemon.json_lines(&["status"])[0]["instance"].clone();
    for span in &spans {
        assert_eq!(span["resource"]["service.name"], "keyward");
        assert_eq!(span["resource"]["service.instance.id"], instance);
        assert_eq!(span["scope"], "keyward");
        // SPAN_KIND_CLIENT.
        assert_eq!(span["kind"], 3);
        let (start, end) = (
            span["start_unix_nano"].as_u64().unwrap(),
            span["end_unix_nano"].as_u64().unwrap(),
        );
        let since = started
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64;
        assert!(since - 1_000_000_000 <= start && start <= end, "{span}");
    }

    for (i, streamed) in [(0, false), (1, true)] {
        let span = span_of(&spans, &calls[i]);
        let a = &span["attributes"];
        assert_eq!(span["name"], "chat gpt-4o-mini", "streamed: {streamed}");
        assert_eq!(span["status_code"], 0, "unset on success: {span}");
        assert_eq!(a["gen_ai.provider.name"], "openai");
        assert_eq!(a["gen_ai.system"], "openai");
        assert_eq!(a["gen_ai.operation.name"], "chat");
        assert_eq!(a["gen_ai.request.model"], "gpt-4o-mini");
        // The mock reports 9 prompt tokens, and some completion tokens.
        assert_eq!(a["gen_ai.usage.input_tokens"], 9, "{span}");
        assert!(
            a["gen_ai.usage.output_tokens"].as_i64().unwrap() > 0,
            "{span}"
        );
        assert_eq!(a["http.response.status_code"], 200);
        assert!(a.get("error.type").is_none(), "{span}");
        assert_eq!(a["keyward.call_id"], calls[i].as_str());
        assert_eq!(a["keyward.tenant"], "acme");
        assert_eq!(a["keyward.credential.id"], cred.as_str());
        assert_eq!(a["keyward.credential.version"], 1);
    }
    let denied = span_of(&spans, &calls[2]);
    assert_eq!(denied["status_code"], 2, "STATUS_CODE_ERROR: {denied}");
    let a = &denied["attributes"];
    assert_eq!(a["error.type"], "scope_denied");
    assert_eq!(a["http.response.status_code"], 403);
    assert_eq!(a["gen_ai.request.model"], "o3-pro");
    assert_eq!(a["keyward.tenant"], "acme");
    assert!(a.get("keyward.credential.id").is_none(), "{denied}");
    assert!(a.get("gen_ai.usage.input_tokens").is_none(), "{denied}");
    let anonymous = &span_of(&spans, &calls[3])["attributes"];
    assert_eq!(anonymous["error.type"], "unauthenticated");
    assert!(anonymous.get("keyward.tenant").is_none(), "{anonymous}");

    // Nothing secret or private reached the collector: not the key, the client token (bad or
    // good), the Authorization header, the prompt or the answer.
    let raw = receiver.raw();
    assert!(!raw.is_empty());
    for secret in [
        key.as_str(),
        token.as_str(),
        auth.as_str(),
        "kw_not_a_token",
        marker.as_str(),
        support::mock_upstream::DEFAULT_TEXT,
        "Bearer",
    ] {
        assert!(
            !support::daemon::contains(&raw, secret),
            "{secret} reached the collector"
        );
    }
    assert_eq!(span_count(&s.daemon, "exported"), calls.len() as u64);
    assert_eq!(span_count(&s.daemon, "dropped"), 0);
    assert_eq!(span_count(&s.daemon, "failed"), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dead_collector_fails_no_call_and_a_reload_moves_spans_to_a_live_one() {
    const TEST: &str = "a_dead_collector_fails_no_call_and_a_reload_moves_spans_to_a_live_one";
    let Some(python) = otel_python(TEST) else {
        return;
    };
    // Nothing listens on this port: every export fails at connect.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let s = support::setup(
        &["openai"],
        &format!("otlp_endpoint = \"http://127.0.0.1:{dead}\""),
    )
    .await;
    let (token, _) = s
        .daemon
        .provision("acme", "openai", &random_key("sk-"), &[]);
    let auth = bearer(&token);
    for _ in 0..20 {
        let req = post(
            "/openai/v1/chat/completions",
            &[("authorization", &auth)],
            &chat("gpt-4o", "x", false),
        );
        let (status, _, body) = call(&s.daemon.socket(), req).await;
        assert_eq!(status, 200, "{body}");
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while span_count(&s.daemon, "failed") < 20 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(span_count(&s.daemon, "failed"), 20);
    assert_eq!(span_count(&s.daemon, "exported"), 0);

    // otlp_endpoint reloads: spans of later calls go to the new collector.
    let receiver = Receiver::start(&python);
    let config = s.daemon.home.join("keyward.toml");
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace(&format!("http://127.0.0.1:{dead}"), &receiver.endpoint());
    std::fs::write(&config, text).unwrap();
    let out = s.daemon.ok(&["reload"]);
    assert!(
        out.contains("otlp_endpoint") && !out.contains("restart"),
        "{out}"
    );
    let req = post(
        "/openai/v1/chat/completions",
        &[("authorization", &auth)],
        &chat("gpt-4o", "x", false),
    );
    let (status, headers, _) = call(&s.daemon.socket(), req).await;
    assert_eq!(status, 200);
    let spans = receiver.wait_spans(1);
    span_of(&spans, headers["keyward-call-id"].to_str().unwrap());
    assert_eq!(spans.len(), 1, "{spans:#?}");

    // A bad URL is refused by reload, which changes nothing.
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace(&receiver.endpoint(), "grpc://127.0.0.1:4317");
    std::fs::write(&config, text).unwrap();
    let out = s.daemon.cli(&["reload"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("otlp_endpoint") && err.contains("http://"),
        "{err}"
    );
    let req = post(
        "/openai/v1/chat/completions",
        &[("authorization", &auth)],
        &chat("gpt-4o", "x", false),
    );
    assert_eq!(call(&s.daemon.socket(), req).await.0, 200);
    assert_eq!(receiver.wait_spans(2).len(), 2);
}

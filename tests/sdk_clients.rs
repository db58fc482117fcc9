//! Unmodified official SDKs (OpenAI and Anthropic for Python, OpenAI for Node) and plain curl,
//! run as subprocesses from `examples/clients/` against the real daemon's Unix socket, with the
//! in-process TLS mock as the provider. Each test checks that the app got the provider's answer
//! for a normal and a streamed call, that the provider saw the real key in the right header and
//! never the client token, and that neither the app's output nor the daemon's logs hold the key.
//!
//! The SDKs come from `examples/clients/setup.sh` (pinned versions, PyPI and npm), run once per
//! test binary.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use serde_json::Value;
use support::daemon::{Daemon, random_key};
use support::mock_upstream::{MockUpstream, RecordedRequest, key_of};

/// What the mock answers; distinctive, and several words so a stream has several deltas.
const ANSWER: &str = "keyward relayed this answer from the mock provider";
/// Deltas the mock streams for [`ANSWER`] (one per word).
const ANSWER_WORDS: usize = 8;
/// Longest an example may run; the SDKs start in a few seconds.
const EXAMPLE_TIMEOUT: Duration = Duration::from_secs(180);

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn examples() -> PathBuf {
    root().join("examples/clients")
}

fn python() -> PathBuf {
    root().join("target/sdk-venv/bin/python")
}

/// Runs `setup.sh` once for all tests in this binary; the script itself locks against other
/// processes and is a no-op when the pinned SDKs are already installed.
fn sdks() {
    static SETUP: OnceLock<Result<(), String>> = OnceLock::new();
    let result = SETUP.get_or_init(|| {
        let out = std::process::Command::new("bash")
            .arg(examples().join("setup.sh"))
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("could not run setup.sh: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "examples/clients/setup.sh failed ({}); it needs PyPI and npm.\nstdout:\n{}\nstderr:\n{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    });
    if let Err(why) = result {
        panic!("{why}");
    }
}

// === Fixture ===

/// A mock provider and a daemon whose `openai` and `anthropic` targets point at it, with one
/// tenant holding a random key for each.
struct Stack {
    mock: MockUpstream,
    daemon: Daemon,
    _ca_dir: tempfile::TempDir,
    /// Client token the app uses (works for both targets: credentials are per tenant).
    token: String,
    openai_key: String,
    openai_cred: String,
    anthropic_key: String,
    anthropic_cred: String,
}

impl Stack {
    async fn start() -> Stack {
        sdks();
        let mock = MockUpstream::builder().text(ANSWER).start().await;
        let ca_dir = tempfile::Builder::new()
            .prefix("kwca")
            .tempdir_in("/tmp")
            .unwrap();
        let ca = mock.write_ca(ca_dir.path());
        let config = format!(
            "[targets.openai]\nbase_url = \"{base}\"\nca_file = \"{ca}\"\n\n\
             [targets.anthropic]\nbase_url = \"{base}\"\nca_file = \"{ca}\"\n",
            base = mock.base_url(),
            ca = ca.display()
        );
        let daemon = Daemon::builder().config(&config).start();
        let openai_key = random_key("sk-proj-");
        let anthropic_key = random_key("sk-ant-api03-");
        let (token, openai_cred) = daemon.provision("acme", "openai", &openai_key, &[]);
        let (_, anthropic_cred) = daemon.provision("acme", "anthropic", &anthropic_key, &[]);
        Stack {
            mock,
            daemon,
            _ca_dir: ca_dir,
            token,
            openai_key,
            openai_cred,
            anthropic_key,
            anthropic_cred,
        }
    }

    /// Runs `program args...` with only `PATH` and the two variables an app needs.
    async fn run(&self, program: &Path, args: &[PathBuf], token: &str) -> Example {
        let mut cmd = tokio::process::Command::new(program);
        cmd.args(args)
            .current_dir(examples())
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("KEYWARD_SOCKET", self.daemon.socket())
            .env("KEYWARD_TOKEN", token)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", program.display()));
        let output = tokio::time::timeout(EXAMPLE_TIMEOUT, child.wait_with_output())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "{} {args:?} ran longer than {EXAMPLE_TIMEOUT:?}",
                    program.display()
                )
            })
            .unwrap();
        Example::new(output)
    }

    /// Everything the daemon logged so far.
    fn logs(&self) -> String {
        format!("{}\n{}", self.daemon.stdout(), self.daemon.stderr())
    }

    /// Requests the mock received on `path`.
    fn requests_to(&self, path: &str) -> Vec<RecordedRequest> {
        self.mock
            .requests()
            .into_iter()
            .filter(|r| r.path() == path)
            .collect()
    }

    /// The invariants every test ends with: no request reached the provider carrying the client
    /// token, and the daemon logged neither a provider key nor the token.
    fn assert_nothing_leaked(&self, example: &Example) {
        for req in self.mock.requests() {
            for (name, value) in &req.headers {
                assert!(
                    !String::from_utf8_lossy(value.as_bytes()).contains(&self.token),
                    "provider received the client token in header {name}"
                );
            }
            assert!(
                !support::daemon::contains(&req.body, &self.token),
                "provider received the client token in the body of {}",
                req.path_and_query
            );
        }
        let logs = self.logs();
        for (what, secret) in [
            ("OpenAI key", &self.openai_key),
            ("Anthropic key", &self.anthropic_key),
            ("client token", &self.token),
        ] {
            assert!(
                !logs.contains(secret.as_str()),
                "daemon logs contain the {what}:\n{logs}"
            );
        }
        for secret in [&self.openai_key, &self.anthropic_key] {
            assert!(
                !example.stdout.contains(secret.as_str())
                    && !example.stderr.contains(secret.as_str()),
                "the app's output contains a provider key:\n{}",
                example.transcript()
            );
        }
    }
}

/// A finished example process.
struct Example {
    success: bool,
    status: String,
    stdout: String,
    stderr: String,
}

impl Example {
    fn new(output: Output) -> Example {
        Example {
            success: output.status.success(),
            status: output.status.to_string(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }

    fn transcript(&self) -> String {
        format!(
            "status: {}\nstdout:\n{}\nstderr:\n{}",
            self.status, self.stdout, self.stderr
        )
    }

    fn assert_ok(&self) {
        assert!(self.success, "example failed\n{}", self.transcript());
    }

    /// The value of the `name: value` line the example printed.
    fn field(&self, name: &str) -> &str {
        let prefix = format!("{name}: ");
        self.stdout
            .lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .unwrap_or_else(|| panic!("example printed no `{name}:` line\n{}", self.transcript()))
    }

    /// Checks the lines every SDK example prints for its normal and streamed call.
    fn assert_sdk_answers(&self, credential: &str) {
        self.assert_ok();
        assert_eq!(
            self.field("chat"),
            ANSWER,
            "normal call\n{}",
            self.transcript()
        );
        assert_eq!(
            self.field("stream"),
            ANSWER,
            "streamed call\n{}",
            self.transcript()
        );
        // The answer arrived as separate deltas, not one buffered blob re-parsed at the end.
        assert_eq!(
            self.field("stream chunks"),
            ANSWER_WORDS.to_string(),
            "{}",
            self.transcript()
        );
        assert_eq!(self.field("keyward-credential"), format!("{credential}/v1"));
        let call_id = self.field("keyward-call-id");
        assert_eq!(
            call_id.len(),
            36,
            "keyward-call-id should be a UUID, got {call_id:?}"
        );
    }
}

/// Checks the two calls (normal, then streamed) the mock received on `path` and returns them.
fn two_calls(stack: &Stack, path: &str) -> [RecordedRequest; 2] {
    let reqs = stack.requests_to(path);
    assert_eq!(
        reqs.len(),
        2,
        "provider should see one normal and one streamed call on {path}"
    );
    let stream_flags: Vec<Option<bool>> = reqs
        .iter()
        .map(|r| r.json().get("stream").and_then(Value::as_bool))
        .collect();
    assert_ne!(stream_flags[0], Some(true), "first call is the normal one");
    assert_eq!(stream_flags[1], Some(true), "second call asks for a stream");
    [reqs[0].clone(), reqs[1].clone()]
}

fn assert_openai_auth(stack: &Stack, req: &RecordedRequest) {
    assert_eq!(
        req.header("authorization"),
        Some(format!("Bearer {}", stack.openai_key).as_str()),
        "OpenAI must receive the real key as Bearer"
    );
    assert_eq!(req.header("x-api-key"), None);
}

fn assert_anthropic_auth(stack: &Stack, req: &RecordedRequest) {
    assert_eq!(key_of(req).as_deref(), Some(stack.anthropic_key.as_str()));
    assert_eq!(
        req.header("x-api-key"),
        Some(stack.anthropic_key.as_str()),
        "Anthropic must receive the real key as x-api-key"
    );
    assert_eq!(
        req.header("authorization"),
        None,
        "no Authorization header towards Anthropic"
    );
    assert!(
        req.header("anthropic-version").is_some(),
        "anthropic-version reaches the provider"
    );
}

// === Python ===

#[tokio::test(flavor = "multi_thread")]
async fn python_openai_sdk_chats_and_streams_with_the_real_key_injected() {
    let stack = Stack::start().await;
    let script = examples().join("python/openai_chat.py");
    let out = stack.run(&python(), &[script], &stack.token).await;

    out.assert_sdk_answers(&stack.openai_cred);
    assert_eq!(out.field("usage"), "9 prompt, 8 completion");
    for req in two_calls(&stack, "/v1/chat/completions") {
        assert_openai_auth(&stack, &req);
        assert_eq!(req.json()["model"], "gpt-4o-mini");
    }
    stack.assert_nothing_leaked(&out);
}

#[tokio::test(flavor = "multi_thread")]
async fn python_anthropic_sdk_chats_and_streams_with_the_real_key_injected() {
    let stack = Stack::start().await;
    let script = examples().join("python/anthropic_chat.py");
    let out = stack.run(&python(), &[script], &stack.token).await;

    out.assert_sdk_answers(&stack.anthropic_cred);
    assert_eq!(out.field("usage"), "9 input, 8 output");
    assert_eq!(out.field("stream stop_reason"), "end_turn");
    for req in two_calls(&stack, "/v1/messages") {
        assert_anthropic_auth(&stack, &req);
    }
    assert!(stack.requests_to("/v1/chat/completions").is_empty());
    stack.assert_nothing_leaked(&out);
}

#[tokio::test(flavor = "multi_thread")]
async fn python_sdk_with_a_wrong_token_gets_401_and_the_provider_is_never_called() {
    let stack = Stack::start().await;
    let script = examples().join("python/openai_chat.py");
    let forged = format!("kw_{}", random_key(""));
    let out = stack.run(&python(), &[script], &forged).await;

    assert!(
        !out.success,
        "a forged token must not get an answer\n{}",
        out.transcript()
    );
    assert!(
        out.stderr
            .contains("error: HTTP 401, keyward-error: unauthenticated"),
        "the SDK should surface keyward's own 401\n{}",
        out.transcript()
    );
    assert_eq!(
        stack.mock.request_count(),
        0,
        "nothing may reach the provider"
    );
    stack.assert_nothing_leaked(&out);
}

// === Node ===

#[tokio::test(flavor = "multi_thread")]
async fn node_openai_sdk_chats_and_streams_with_the_real_key_injected() {
    let stack = Stack::start().await;
    let script = examples().join("node/openai_chat.mjs");
    let out = stack.run(Path::new("node"), &[script], &stack.token).await;

    out.assert_sdk_answers(&stack.openai_cred);
    assert_eq!(out.field("usage"), "9 prompt, 8 completion");
    for req in two_calls(&stack, "/v1/chat/completions") {
        assert_openai_auth(&stack, &req);
    }
    stack.assert_nothing_leaked(&out);
}

// === curl ===

/// The body printed after `== {title} ==`, up to the next section.
fn section<'a>(stdout: &'a str, title: &str) -> &'a str {
    let marker = format!("== {title} ==\n");
    let start = stdout
        .find(&marker)
        .unwrap_or_else(|| panic!("curl.sh printed no {title} section:\n{stdout}"))
        + marker.len();
    let rest = &stdout[start..];
    rest.find("\n== ").map_or(rest, |end| &rest[..end])
}

#[tokio::test(flavor = "multi_thread")]
async fn curl_script_chats_streams_and_calls_anthropic_through_the_socket() {
    let stack = Stack::start().await;
    let script = examples().join("curl.sh");
    let out = stack.run(Path::new("bash"), &[script], &stack.token).await;
    out.assert_ok();

    let chat: Value = serde_json::from_str(section(&out.stdout, "openai chat").trim())
        .unwrap_or_else(|e| panic!("openai chat is not JSON ({e})\n{}", out.transcript()));
    assert_eq!(chat["choices"][0]["message"]["content"], ANSWER);

    let events: Vec<Value> = section(&out.stdout, "openai stream")
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str(d).expect("each SSE data line is JSON"))
        .collect();
    let streamed: String = events
        .iter()
        .filter_map(|e| e["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(streamed, ANSWER, "{}", out.transcript());
    assert!(section(&out.stdout, "openai stream").contains("data: [DONE]"));

    let message: Value = serde_json::from_str(section(&out.stdout, "anthropic messages").trim())
        .unwrap_or_else(|e| panic!("anthropic messages is not JSON ({e})\n{}", out.transcript()));
    assert_eq!(message["content"][0]["text"], ANSWER);

    for req in two_calls(&stack, "/v1/chat/completions") {
        assert_openai_auth(&stack, &req);
    }
    let anthropic = stack.requests_to("/v1/messages");
    assert_eq!(anthropic.len(), 1);
    assert_anthropic_auth(&stack, &anthropic[0]);
    // curl sends no anthropic-version; keyward adds the preset default.
    assert_eq!(anthropic[0].header("anthropic-version"), Some("2023-06-01"));
    stack.assert_nothing_leaked(&out);
}

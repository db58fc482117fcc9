//! The data plane end to end: an app on the Unix socket, the real keyward binary, and an
//! in-process TLS mock provider. Every test uses random keys and checks what the upstream saw.

mod support;

use std::path::PathBuf;
use std::time::Duration;

use http_body_util::BodyExt;
use support::daemon::{Daemon, contains, random_key};
use support::mock_upstream::{MockUpstream, key_of};
use support::uds::{bearer, call, call_as, chat_body, error_code, post, raw, send};

const PRESETS: [&str; 11] = [
    "openai",
    "anthropic",
    "gemini",
    "mistral",
    "cohere",
    "groq",
    "openrouter",
    "deepseek",
    "xai",
    "together",
    "azure-openai",
];

/// A config pointing every preset at the mock, plus `extra` TOML.
fn config_for(mock: &MockUpstream, dir: &std::path::Path, extra: &str) -> String {
    support::targets_config(mock, dir, &PRESETS, extra)
}

/// A request that scope must refuse: path, model, extra headers, expected message part.
type DenialCase<'a> = (&'a str, &'a str, &'a [(&'a str, &'a str)], &'a str);

async fn setup(extra: &str) -> support::Setup {
    support::setup(&PRESETS, extra).await
}

#[tokio::test(flavor = "multi_thread")]
async fn chat_call_carries_the_real_key_and_none_of_the_apps_credentials() {
    let s = setup("").await;
    let key = random_key("sk-proj-");
    let (token, cred) = s
        .daemon
        .provision("acme", "openai", &key, &["--model", "gpt-4o*"]);
    let req = post(
        "/openai/v1/chat/completions?trace=1",
        &[
            ("authorization", &bearer(&token)),
            ("x-api-key", "sk-app-fake"),
            ("proxy-authorization", "Basic Zm9v"),
            ("keyward-credential", "cred_spoofed/v9"),
        ],
        &chat_body("gpt-4o-mini", false),
    );
    let (status, headers, body) = call(&s.daemon.socket(), req).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("Hello from the mock upstream."), "{body}");
    assert_eq!(
        headers["keyward-credential"].to_str().unwrap(),
        format!("{cred}/v1")
    );
    assert!(!headers["keyward-call-id"].is_empty());
    let seen = s.mock.last_request().unwrap();
    assert_eq!(seen.header("authorization"), Some(bearer(&key).as_str()));
    assert_eq!(seen.header("x-api-key"), None);
    assert_eq!(seen.header("proxy-authorization"), None);
    assert_eq!(seen.header("keyward-credential"), None);
    assert_eq!(seen.query(), Some("trace=1"));
    assert!(!body.contains(&key) && !body.contains(&token));
    let logs = s.daemon.stdout() + &s.daemon.stderr();
    assert!(!logs.contains(&key) && !logs.contains(&token));
}

#[tokio::test(flavor = "multi_thread")]
async fn every_preset_injects_its_own_header() {
    let s = setup("").await;
    let expect = |target: &str, key: &str| -> (String, String) {
        match target {
            "anthropic" => ("x-api-key".into(), key.into()),
            "gemini" => ("x-goog-api-key".into(), key.into()),
            "azure-openai" => ("api-key".into(), key.into()),
            _ => ("authorization".into(), bearer(key)),
        }
    };
    for target in PRESETS {
        let key = random_key("k-");
        let (token, _) = s
            .daemon
            .provision(&format!("t-{target}"), target, &key, &[]);
        let path = match target {
            "gemini" => {
                "/gemini/v1beta/models/gemini-1.5-pro:generateContent?key=kw_app_query".to_string()
            }
            "azure-openai" => {
                "/azure-openai/openai/deployments/gpt4o/chat/completions?api-version=2024-06-01"
                    .to_string()
            }
            _ => format!("/{target}/echo/x"),
        };
        let (status, _, body) = call(
            &s.daemon.socket(),
            post(&path, &[("x-api-key", &token)], &chat_body("m", false)),
        )
        .await;
        let seen = s.mock.last_request().unwrap();
        let (header, value) = expect(target, &key);
        assert_eq!(
            seen.header(&header),
            Some(value.as_str()),
            "{target}: {status} {body}"
        );
        assert_eq!(key_of(&seen).as_deref(), Some(key.as_str()), "{target}");
        if target == "gemini" {
            assert!(
                !seen.query().unwrap_or("").contains("key="),
                "gemini must never use ?key=: {:?}",
                seen.query()
            );
        }
        if target == "anthropic" {
            assert_eq!(seen.header("anthropic-version"), Some("2023-06-01"));
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn custom_targets_from_the_config_work() {
    let mock = MockUpstream::builder().start().await;
    let dir = tempfile::tempdir().unwrap();
    let ca = mock.write_ca(dir.path());
    let toml = format!(
        "[targets.local-llm]\nbase_url = \"{}/v1\"\nauth_header = \"X-Custom-Key\"\nauth_format = \"Token {{key}}\"\nfamily = \"openai\"\nca_file = \"{}\"\n",
        mock.localhost_url(),
        ca.display()
    );
    let daemon = Daemon::builder().config(&toml).start();
    let key = random_key("custom-");
    let (token, _) = daemon.provision("acme", "local-llm", &key, &[]);
    let (status, _, body) = call_as(
        &daemon.socket(),
        &token,
        "/local-llm/chat/completions",
        &chat_body("llama", false),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let seen = mock.last_request().unwrap();
    assert_eq!(seen.path(), "/v1/chat/completions");
    assert_eq!(
        seen.header("x-custom-key"),
        Some(format!("Token {key}").as_str())
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn scope_is_enforced_before_the_upstream_is_contacted() {
    let s = setup("").await;
    let d = &s.daemon;
    d.ok(&["tenant", "add", "acme"]);
    let client: serde_json::Value = serde_json::from_str(
        d.ok(&[
            "client",
            "add",
            "--tenant",
            "acme",
            "--name",
            "app",
            "--team",
            "ads",
            "--workflow",
            "batch",
            "--json",
        ])
        .trim(),
    )
    .unwrap();
    let token = client["token"].as_str().unwrap();
    d.ok_stdin(
        &[
            "cred",
            "add",
            "--tenant",
            "acme",
            "--target",
            "openai",
            "--name",
            "k",
            "--model",
            "gpt-4o*",
            "--capability",
            "chat",
            "--team",
            "search",
        ],
        random_key("sk-").as_bytes(),
    );
    // (path, model, extra headers, what the 403 must say)
    let cases: &[DenialCase] = &[
        ("/openai/v1/chat/completions", "o1-preview", &[], "model"),
        (
            "/openai/v1/embeddings",
            "gpt-4o",
            &[],
            "capability `embeddings`",
        ),
        ("/openai/v1/chat/completions", "gpt-4o", &[], "team `ads`"),
        (
            "/anthropic/v1/messages",
            "claude-3",
            &[],
            "no credential for target `anthropic`",
        ),
        (
            "/openai/v1/chat/completions",
            "gpt-4o",
            &[("keyward-workflow", "chat")],
            "workflow `chat` is not allowed",
        ),
    ];
    for (path, model, extra, needle) in cases {
        let mut headers = vec![("authorization", bearer(token))];
        headers.extend(extra.iter().map(|(k, v)| (*k, v.to_string())));
        let hdrs: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let (status, h, body) =
            call(&d.socket(), post(path, &hdrs, &chat_body(model, false))).await;
        assert_eq!(status, 403, "{path} {model}: {body}");
        assert_eq!(error_code(&h), "scope_denied");
        assert!(body.contains(needle), "{needle} not in {body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["error"]["type"], "keyward.scope_denied");
        assert_eq!(
            v["error"]["call_id"].as_str().unwrap(),
            h["keyward-call-id"].to_str().unwrap()
        );
    }
    assert_eq!(
        s.mock.request_count(),
        0,
        "a denied request reached the upstream"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn client_tokens_work_in_every_sdk_header_and_bad_ones_are_refused() {
    let s = setup("").await;
    let key = random_key("sk-");
    let (token, _) = s.daemon.provision("acme", "openai", &key, &[]);
    for (name, value) in [
        ("authorization", bearer(&token)),
        ("x-api-key", token.clone()),
        ("api-key", token.clone()),
        ("x-goog-api-key", token.clone()),
    ] {
        let (status, _, body) = call(
            &s.daemon.socket(),
            post(
                "/openai/v1/chat/completions",
                &[(name, &value)],
                &chat_body("gpt-4o", false),
            ),
        )
        .await;
        assert_eq!(status, 200, "{name}: {body}");
    }
    let before = s.mock.request_count();
    for headers in [
        vec![],
        vec![("authorization", "Bearer kw_bogus")],
        vec![("authorization", "Bearer sk-a-provider-key")],
    ] {
        let (status, h, body) = call(
            &s.daemon.socket(),
            post(
                "/openai/v1/chat/completions",
                &headers,
                &chat_body("gpt-4o", false),
            ),
        )
        .await;
        assert_eq!(status, 401, "{body}");
        assert_eq!(error_code(&h), "unauthenticated");
    }
    assert_eq!(s.mock.request_count(), before);
}

#[tokio::test(flavor = "multi_thread")]
async fn peer_uid_binding_authenticates_and_must_agree_with_the_token() {
    let s = setup("").await;
    let d = &s.daemon;
    d.ok(&["tenant", "add", "acme"]);
    d.ok_stdin(
        &[
            "cred", "add", "--tenant", "acme", "--target", "openai", "--name", "k",
        ],
        random_key("sk-").as_bytes(),
    );
    let me = nix::unistd::geteuid().as_raw();
    d.ok(&[
        "client",
        "add",
        "--tenant",
        "acme",
        "--name",
        "by-uid",
        "--uid",
        &me.to_string(),
    ]);
    // No token at all: the socket peer's uid identifies the client.
    let (status, _, body) = call(
        &d.socket(),
        post(
            "/openai/v1/chat/completions",
            &[],
            &chat_body("gpt-4o", false),
        ),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    // A token of a client bound to another uid is refused from this uid.
    let other: serde_json::Value = serde_json::from_str(
        d.ok(&[
            "client",
            "add",
            "--tenant",
            "acme",
            "--name",
            "elsewhere",
            "--uid",
            "4242",
            "--json",
        ])
        .trim(),
    )
    .unwrap();
    let (status, _, body) = call(
        &d.socket(),
        post(
            "/openai/v1/chat/completions",
            &[("authorization", &bearer(other["token"].as_str().unwrap()))],
            &chat_body("gpt-4o", false),
        ),
    )
    .await;
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("do not agree"), "{body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn tenants_stay_isolated_under_concurrent_interleaved_requests() {
    let s = setup("").await;
    let key_a = random_key("sk-a-");
    let key_b = random_key("sk-b-");
    let (tok_a, _) = s.daemon.provision("tenant-a", "openai", &key_a, &[]);
    let (tok_b, _) = s.daemon.provision("tenant-b", "openai", &key_b, &[]);
    let socket = s.daemon.socket();
    let mut tasks = Vec::new();
    for i in 0..200 {
        let (tok, tenant) = if i % 2 == 0 {
            (tok_a.clone(), "tenant-a")
        } else {
            (tok_b.clone(), "tenant-b")
        };
        let socket = socket.clone();
        tasks.push(tokio::spawn(async move {
            let body = serde_json::json!({"model": "gpt-4o", "messages": [{"role": "user", "content": format!("{tenant} #{i}")}]}).to_string();
            let (status, _, _) = call(&socket, post("/openai/v1/chat/completions", &[("authorization", &bearer(&tok))], &body)).await;
            status
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    let seen = s.mock.requests();
    assert_eq!(seen.len(), 200);
    for r in seen {
        let content = r.json()["messages"][0]["content"]
            .as_str()
            .unwrap()
            .to_string();
        let expected = if content.starts_with("tenant-a") {
            &key_a
        } else {
            &key_b
        };
        assert_eq!(
            key_of(&r).as_deref(),
            Some(expected.as_str()),
            "request {content} carried another tenant's key"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn steering_attempts_are_refused_and_nothing_reaches_the_upstream() {
    let s = setup("").await;
    let (token, _) = s
        .daemon
        .provision("acme", "openai", &random_key("sk-"), &[]);
    let targets = [
        "http://evil.example/openai/v1/chat/completions",
        "evil.example:443",
        "/openai/../anthropic/v1/messages",
        "/openai/v1/%2e%2e/%2e%2e/x",
        "/openai/v1/%2E%2e/x",
        "/openai/v1%2fchat",
        "/openai/v1%5cchat",
        "/openai/v1\\chat",
        "/openai/./v1/chat/completions",
        "/openai//v1/chat/completions",
        "//openai/v1/chat",
        "/openai/v1/chat%00",
        "/openai/v1/%252e%252e/x",
        "/user@evil.example/v1/chat",
        "/OpenAI/v1/chat/completions",
        "*",
    ];
    for t in targets {
        let req = format!(
            "POST {t} HTTP/1.1\r\nHost: keyward\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}"
        );
        let answer = raw(&s.daemon.socket(), req.as_bytes()).await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{t}: {answer}");
        // keyward's own refusal, with its error code, not a parser's bare 400.
        assert!(
            answer.contains("keyward-error: bad_request"),
            "{t}: {answer}"
        );
    }
    let connect = format!(
        "CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
    );
    let answer = raw(&s.daemon.socket(), connect.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 400"), "CONNECT: {answer}");
    assert_eq!(
        s.mock.request_count(),
        0,
        "a steering attempt reached the upstream"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn redirects_are_returned_not_followed() {
    let s = setup("").await;
    let (token, _) = s
        .daemon
        .provision("acme", "openai", &random_key("sk-"), &[]);
    let (status, headers, _) = call_as(&s.daemon.socket(), &token, "/openai/redirect", "{}").await;
    assert_eq!(status, 302);
    assert_eq!(headers["location"], "https://evil.example/steal");
    assert_eq!(s.mock.request_count(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn sse_events_reach_the_app_as_soon_as_keyward_reads_them() {
    let s = setup("").await;
    let (token, _) = s
        .daemon
        .provision("acme", "openai", &random_key("sk-"), &[]);
    let resp = send(
        &s.daemon.socket(),
        post(
            "/openai/gated-sse",
            &[("authorization", &bearer(&token))],
            "{}",
        ),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let mut seen = String::new();
    // The mock sends event 1 and then waits for us: if keyward buffered, this would hang.
    for round in 1..=3 {
        while !seen.contains(&format!("\"n\":{round}"))
            && !seen.contains(&format!("event {round}"))
            && !seen.contains(&format!("{round}\n"))
        {
            let frame = tokio::time::timeout(Duration::from_secs(20), body.frame())
                .await
                .expect("event not delivered while the upstream waits")
                .unwrap()
                .unwrap();
            if let Some(d) = frame.data_ref() {
                seen.push_str(&String::from_utf8_lossy(d));
            }
        }
        s.mock.release();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_key_echoed_by_the_upstream_is_redacted_wherever_it_splits() {
    let s = setup("").await;
    let key = random_key("sk-proj-");
    let (token, _) = s.daemon.provision("acme", "openai", &key, &[]);
    for split in [
        0,
        1,
        3,
        key.len() / 2,
        key.len() - 1,
        key.len(),
        key.len() + 5,
    ] {
        let (status, headers, body) = call_as(
            &s.daemon.socket(),
            &token,
            &format!("/openai/leak?split={split}"),
            "{}",
        )
        .await;
        assert_eq!(status, 200);
        assert!(!body.contains(&key), "split {split}: key leaked in body");
        assert!(body.contains("[REDACTED]"), "split {split}: {body}");
        let all_headers = format!("{headers:?}");
        assert!(!all_headers.contains(&key), "key leaked in headers");
        assert_eq!(headers["x-debug-key"], "[REDACTED]");
    }
    let (status, _, body) = call_as(&s.daemon.socket(), &token, "/openai/leak-error", "{}").await;
    assert_eq!(status, 401);
    assert!(
        body.contains("Incorrect API key provided: [REDACTED]"),
        "{body}"
    );
    assert!(!body.contains(&key));
}

#[tokio::test(flavor = "multi_thread")]
async fn error_contract_for_unknown_target_body_too_large_and_upstream_failures() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mock = MockUpstream::builder().start().await;
    let wrong_name = MockUpstream::builder()
        .leaf_names(["other.example"])
        .start()
        .await;
    let dir = tempfile::tempdir().unwrap();
    let ca = mock.write_ca(dir.path());
    let ca2 = wrong_name.write_ca(&mkdir(dir.path().join("w")));
    let toml = format!(
        "[limits]\nmax_request_body = \"1KiB\"\nupstream_timeout = \"1s\"\n\
         [targets.openai]\nbase_url = \"{}\"\nca_file = \"{}\"\n\
         [targets.closed]\nbase_url = \"https://{closed}\"\nauth_header = \"authorization\"\nauth_format = \"Bearer {{key}}\"\nfamily = \"openai\"\n\
         [targets.untrusted]\nbase_url = \"{}\"\nauth_header = \"authorization\"\nauth_format = \"Bearer {{key}}\"\nfamily = \"openai\"\n\
         [targets.misnamed]\nbase_url = \"{}\"\nauth_header = \"authorization\"\nauth_format = \"Bearer {{key}}\"\nfamily = \"openai\"\nca_file = \"{}\"\n",
        mock.base_url(),
        ca.display(),
        mock.base_url(),
        wrong_name.base_url(),
        ca2.display()
    );
    let d = Daemon::builder().config(&toml).start();
    let key = random_key("sk-");
    let (token, _) = d.provision("acme", "openai", &key, &[]);
    for t in ["closed", "untrusted", "misnamed"] {
        let cred = d.ok_stdin(
            &[
                "cred", "add", "--tenant", "acme", "--target", t, "--name", t,
            ],
            key.as_bytes(),
        );
        assert!(cred.contains("version"));
    }
    let auth = [("authorization", bearer(&token))];
    let auth: Vec<(&str, &str)> = auth.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let expect = |status: u16, code: &str, needle: &str, got: (u16, http::HeaderMap, String)| {
        assert_eq!(got.0, status, "{code}: {}", got.2);
        assert_eq!(error_code(&got.1), code);
        assert!(
            got.2.contains(needle),
            "{code}: `{needle}` not in {}",
            got.2
        );
        assert!(!got.2.contains(&key), "{code}: key in error body");
        let v: serde_json::Value = serde_json::from_str(&got.2).unwrap();
        assert_eq!(v["error"]["type"], format!("keyward.{code}"));
    };
    expect(
        404,
        "unknown_target",
        "nosuch",
        call(&d.socket(), post("/nosuch/v1/x", &auth, "{}")).await,
    );
    expect(
        400,
        "bad_request",
        "'.' or '..' segment",
        call(&d.socket(), post("/openai/../x", &auth, "{}")).await,
    );
    let big = format!("{{\"model\":\"gpt-4o\",\"pad\":\"{}\"}}", "x".repeat(4096));
    expect(
        413,
        "body_too_large",
        "max_request_body",
        call(
            &d.socket(),
            post("/openai/v1/chat/completions", &auth, &big),
        )
        .await,
    );
    expect(
        401,
        "unauthenticated",
        "no client credentials",
        call(&d.socket(), post("/openai/v1/chat/completions", &[], "{}")).await,
    );
    expect(
        502,
        "upstream_unreachable",
        "127.0.0.1",
        call(
            &d.socket(),
            post("/closed/v1/chat/completions", &auth, "{}"),
        )
        .await,
    );
    expect(
        502,
        "upstream_unreachable",
        "certificate is not trusted (unknown issuer); set ca_file",
        call(
            &d.socket(),
            post("/untrusted/v1/chat/completions", &auth, "{}"),
        )
        .await,
    );
    expect(
        502,
        "upstream_unreachable",
        "certificate is not valid for host 127.0.0.1",
        call(
            &d.socket(),
            post("/misnamed/v1/chat/completions", &auth, "{}"),
        )
        .await,
    );
    expect(
        504,
        "upstream_timeout",
        "did not answer within 1s",
        call(&d.socket(), post("/openai/slow?ms=5000", &auth, "{}")).await,
    );
    let logs = d.stdout() + &d.stderr();
    assert!(!logs.contains(&key));
}

fn mkdir(path: PathBuf) -> PathBuf {
    std::fs::create_dir_all(&path).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread")]
async fn policy_violation_when_only_expired_keys_match() {
    let s = setup("").await;
    let d = &s.daemon;
    d.ok(&[
        "tenant",
        "add",
        "strict",
        "--max-key-age",
        "1s",
        "--on-expiry",
        "deny",
    ]);
    let (token, _) = d.provision("strict", "openai", &random_key("sk-"), &[]);
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let (status, h, body) = call_as(
        &d.socket(),
        &token,
        "/openai/v1/chat/completions",
        &chat_body("gpt-4o", false),
    )
    .await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(error_code(&h), "policy_violation");
    assert_eq!(s.mock.request_count(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn audit_unavailable_fails_closed_and_sends_nothing() {
    let s = setup("").await;
    let (token, _) = s
        .daemon
        .provision("acme", "openai", &random_key("sk-"), &[]);
    let request = || {
        post(
            "/openai/v1/chat/completions",
            &[("authorization", &bearer(&token))],
            &chat_body("gpt-4o", false),
        )
    };
    let conn = rusqlite::Connection::open(s.daemon.home.join("audit.db")).unwrap();
    conn.execute_batch("BEGIN EXCLUSIVE").unwrap();
    // Rows are durable in the journal first; once they cannot be moved into the locked
    // audit.db (within a fold interval plus the busy timeout), requests are refused.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let (status, h, body, sent_before) = loop {
        let sent_before = s.mock.request_count();
        let (status, h, body) = call(&s.daemon.socket(), request()).await;
        if status != 200 || std::time::Instant::now() > deadline {
            break (status, h, body, sent_before);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(status, 503, "{body}");
    assert_eq!(error_code(&h), "audit_unavailable");
    assert!(body.contains("locked by another process"), "{body}");
    assert_eq!(
        s.mock.request_count(),
        sent_before,
        "the upstream was called without an audit record"
    );
    conn.execute_batch("COMMIT").unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let (status, _, body) = call(&s.daemon.socket(), request()).await;
        if status == 200 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "requests were still refused after the lock was released: {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Every call that reached the upstream has its resolved row, and the trail verifies.
    let verify = s.daemon.cli(&["audit", "verify"]);
    assert!(verify.status.success(), "{verify:?}");
    let rows = s
        .daemon
        .cli(&["audit", "query", "--event", "request.resolved", "--json"]);
    let resolved = String::from_utf8_lossy(&rows.stdout)
        .matches("request.resolved")
        .count();
    assert_eq!(resolved, s.mock.request_count());
}

#[tokio::test(flavor = "multi_thread")]
async fn over_max_concurrent_requests_answers_503_with_retry_after() {
    let s = setup("[limits]\nmax_concurrent_requests = 1\n").await;
    let (token, _) = s
        .daemon
        .provision("acme", "openai", &random_key("sk-"), &[]);
    let socket = s.daemon.socket();
    let t = token.clone();
    let slow = tokio::spawn(async move {
        call(
            &socket,
            post(
                "/openai/slow?ms=3000",
                &[("authorization", &bearer(&t))],
                "{}",
            ),
        )
        .await
    });
    tokio::time::sleep(Duration::from_millis(800)).await;
    let (status, h, _) = call_as(
        &s.daemon.socket(),
        &token,
        "/openai/v1/chat/completions",
        &chat_body("gpt-4o", false),
    )
    .await;
    assert_eq!(status, 503);
    assert_eq!(error_code(&h), "overloaded");
    assert!(h.contains_key("retry-after"));
    assert_eq!(slow.await.unwrap().0, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn large_bodies_stream_both_ways() {
    let s = setup("").await;
    let (token, _) = s
        .daemon
        .provision("acme", "openai", &random_key("sk-"), &[]);
    let upload = "y".repeat(8 << 20);
    let req = http::Request::post("/openai/v1/files")
        .header("authorization", bearer(&token))
        .header("content-type", "application/octet-stream")
        .body(http_body_util::Full::new(bytes::Bytes::from(upload)))
        .unwrap();
    let (status, _, body) = call(&s.daemon.socket(), req).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(&(8u64 << 20).to_string()), "{body}");
    let (status, _, body) = call_as(
        &s.daemon.socket(),
        &token,
        "/openai/big?bytes=5000000",
        "{}",
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(body.len(), 5_000_000);
}

#[tokio::test(flavor = "multi_thread")]
async fn tcp_listener_accepts_tokens_only() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let s = setup(&format!("listen_tcp = \"127.0.0.1:{port}\"\n")).await;
    let (token, _) = s
        .daemon
        .provision("acme", "openai", &random_key("sk-"), &[]);
    let me = nix::unistd::geteuid().as_raw();
    s.daemon.ok(&[
        "client",
        "add",
        "--tenant",
        "acme",
        "--name",
        "uidbound",
        "--uid",
        &me.to_string(),
    ]);
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let body = chat_body("gpt-4o", false);
    let req = format!(
        "POST /openai/v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    stream.read_to_string(&mut out).await.unwrap();
    assert!(
        out.starts_with("HTTP/1.1 401"),
        "no peer credentials on TCP: {out}"
    );
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let req = format!(
        "POST /openai/v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    stream.read_to_string(&mut out).await.unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn dev_mode_prints_a_working_token_and_curl_line() {
    let mock = MockUpstream::builder().start().await;
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::builder()
        .config(&config_for(&mock, dir.path(), ""))
        .arg("--dev")
        .start();
    let out = d.stdout();
    let token = out
        .split_whitespace()
        .find(|w| w.starts_with("kw_"))
        .expect("dev mode prints a token")
        .to_string();
    assert!(out.contains("curl --unix-socket"), "{out}");
    let key = random_key("sk-");
    d.ok_stdin(
        &[
            "cred", "add", "--tenant", "dev", "--target", "openai", "--name", "dev",
        ],
        key.as_bytes(),
    );
    let (status, _, body) = call_as(
        &d.socket(),
        &token,
        "/openai/v1/chat/completions",
        &chat_body("gpt-4o-mini", false),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    // Everything the daemon printed, read after the key was added and used.
    let printed = d.stdout() + &d.stderr();
    assert!(
        printed.contains(&token),
        "sanity: the captured output is the daemon's"
    );
    assert!(!contains(printed.as_bytes(), &key));
    assert!(!contains(body.as_bytes(), &key));
}

#[tokio::test(flavor = "multi_thread")]
async fn http2_with_prior_knowledge_is_served_on_the_socket() {
    let s = setup("").await;
    let (token, _) = s
        .daemon
        .provision("acme", "openai", &random_key("sk-"), &[]);
    let stream = tokio::net::UnixStream::connect(s.daemon.socket())
        .await
        .unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    for _ in 0..3 {
        let req = http::Request::post("http://keyward/openai/v1/chat/completions")
            .header("authorization", bearer(&token))
            .body(http_body_util::Full::new(bytes::Bytes::from(chat_body(
                "gpt-4o", false,
            ))))
            .unwrap();
        let resp = sender.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.version(), http::Version::HTTP_2);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn upstream_connections_are_pooled_and_use_http2_when_offered() {
    let s = setup("").await;
    let (token, _) = s
        .daemon
        .provision("acme", "openai", &random_key("sk-"), &[]);
    for _ in 0..20 {
        let (status, _, _) = call_as(
            &s.daemon.socket(),
            &token,
            "/openai/v1/chat/completions",
            &chat_body("gpt-4o", false),
        )
        .await;
        assert_eq!(status, 200);
    }
    assert_eq!(
        s.mock.connection_count(),
        1,
        "20 sequential calls should reuse one upstream connection"
    );
    assert!(
        s.mock
            .requests()
            .iter()
            .all(|r| r.version == http::Version::HTTP_2)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn oversized_request_headers_are_refused() {
    let s = setup("[limits]\nmax_header_bytes = \"16KiB\"\n").await;
    let (token, _) = s
        .daemon
        .provision("acme", "openai", &random_key("sk-"), &[]);
    let huge = "a".repeat(64 * 1024);
    let req = format!(
        "POST /openai/v1/chat/completions HTTP/1.1\r\nHost: k\r\nAuthorization: Bearer {token}\r\nX-Big: {huge}\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}"
    );
    let answer = raw(&s.daemon.socket(), req.as_bytes()).await;
    assert!(
        answer.starts_with("HTTP/1.1 431"),
        "{}",
        &answer[..answer.len().min(200)]
    );
    assert_eq!(s.mock.request_count(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn oversized_upstream_response_headers_are_refused() {
    let key = random_key("sk-");
    let huge = "b".repeat(100 * 1024);
    let mock = MockUpstream::builder()
        .http1_only()
        .on_key(
            &key,
            support::mock_upstream::Reply::status(200).header("x-huge", &huge),
        )
        .start()
        .await;
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::builder()
        .config(&config_for(
            &mock,
            dir.path(),
            "[limits]\nmax_header_bytes = \"16KiB\"\n",
        ))
        .start();
    let (token, _) = d.provision("acme", "openai", &key, &[]);
    let (status, h, body) = call_as(
        &d.socket(),
        &token,
        "/openai/v1/chat/completions",
        &chat_body("gpt-4o", false),
    )
    .await;
    assert_eq!(status, 502, "{body}");
    assert_eq!(error_code(&h), "upstream_unreachable");
    assert!(!body.contains(&huge[..100]));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hostile_upstream_cannot_return_the_key_outside_the_body() {
    let mock = MockUpstream::builder().http1_only().start().await;
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::builder()
        .config(&config_for(&mock, dir.path(), ""))
        .start();
    let key = random_key("sk-proj-");
    let (token, _) = d.provision("acme", "openai", &key, &[]);
    let auth = bearer(&token);
    let ask = |via: &str| {
        format!(
            "POST /openai/leak-hostile?via={via} HTTP/1.1\r\nHost: k\r\nAuthorization: {auth}\r\nContent-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}"
        )
    };
    // The HTTP/1 reason phrase is the upstream's and must not be relayed.
    let answer = raw(&d.socket(), ask("reason").as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
    assert!(
        !answer.contains(&key),
        "key in the relayed status line: {}",
        answer.lines().next().unwrap()
    );
    assert!(
        answer.contains("[REDACTED]"),
        "the body echo is still scrubbed: {answer}"
    );
    // An encoded body cannot be scrubbed, so it is refused.
    let answer = raw(&d.socket(), ask("gzip").as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 502"), "{answer}");
    assert!(
        answer.contains("keyward-error: upstream_unreachable") && answer.contains("encoded body"),
        "{answer}"
    );
    assert!(!answer.contains(&key));
    // A key cut across two values of one header does not survive either.
    let answer = raw(&d.socket(), ask("split-header").as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("\r\nx-part: [REDACTED]\r\n"), "{answer}");
    assert!(
        !answer.replace("\r\nx-part: ", "").contains(&key),
        "{answer}"
    );
    // keyward-* headers are keyward's alone.
    let answer = raw(&d.socket(), ask("forge").as_bytes())
        .await
        .to_ascii_lowercase();
    assert!(!answer.contains("forged"), "{answer}");
    assert!(answer.contains("keyward-credential: cred_"), "{answer}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stalled_request_body_is_cut_and_frees_its_slot() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = setup("[limits]\nmax_concurrent_requests = 1\nrequest_idle_timeout = \"1s\"\n").await;
    let (token, _) = s
        .daemon
        .provision("acme", "openai", &random_key("sk-"), &[]);
    let mut slow = tokio::net::UnixStream::connect(s.daemon.socket())
        .await
        .unwrap();
    let head = format!(
        "POST /openai/v1/chat/completions HTTP/1.1\r\nHost: k\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n{{\"messages\":["
    );
    slow.write_all(head.as_bytes()).await.unwrap();
    let mut answer = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(20), slow.read(&mut answer))
        .await
        .expect("a stalled body must be cut")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]).to_string();
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    // The app is told its own body stalled, not that the upstream did.
    assert!(answer.contains("limits.request_idle_timeout"), "{answer}");
    assert!(!answer.contains("upstream"), "{answer}");
    let (status, _, body) = call_as(
        &s.daemon.socket(),
        &token,
        "/openai/v1/chat/completions",
        &chat_body("gpt-4o", false),
    )
    .await;
    assert_eq!(status, 200, "the slot was not freed: {body}");
    assert_eq!(s.mock.request_count(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_open_response_stream_counts_against_max_concurrent_requests() {
    let s = setup("[limits]\nmax_concurrent_requests = 1\n").await;
    let (token, _) = s
        .daemon
        .provision("acme", "openai", &random_key("sk-"), &[]);
    let stream = send(
        &s.daemon.socket(),
        post(
            "/openai/gated-sse?events=2",
            &[("authorization", &bearer(&token))],
            "{}",
        ),
    )
    .await;
    assert_eq!(stream.status(), 200);
    let (status, h, _) = call_as(
        &s.daemon.socket(),
        &token,
        "/openai/v1/chat/completions",
        &chat_body("gpt-4o", false),
    )
    .await;
    assert_eq!(
        status, 503,
        "a streaming response must hold its slot until it ends"
    );
    assert_eq!(error_code(&h), "overloaded");
    s.mock.release();
    let _ = stream.into_body().collect().await.unwrap();
    let (status, _, _) = call_as(
        &s.daemon.socket(),
        &token,
        "/openai/v1/chat/completions",
        &chat_body("gpt-4o", false),
    )
    .await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn request_trailers_never_reach_the_upstream() {
    // A trailer would bypass the stripping of app credentials and `keyward-*` headers.
    let s = setup("").await;
    let (token, _) = s
        .daemon
        .provision("acme", "openai", &random_key("sk-"), &[]);
    let body = chat_body("gpt-4o", false);
    let req = format!(
        "POST /openai/v1/chat/completions HTTP/1.1\r\nHost: k\r\nAuthorization: Bearer {token}\r\n\
         Transfer-Encoding: chunked\r\nTrailer: authorization, keyward-credential\r\n\
         Connection: close\r\n\r\n{:x}\r\n{body}\r\n0\r\nauthorization: Bearer {token}\r\n\
         keyward-credential: cred_spoofed\r\n\r\n",
        body.len()
    );
    let answer = raw(&s.daemon.socket(), req.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let seen = s.mock.last_request().expect("the call reached the mock");
    assert_eq!(seen.body_len, body.len() as u64);
    assert!(
        seen.trailers.is_none(),
        "trailers forwarded: {:?}",
        seen.trailers
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn encoded_forms_of_a_key_with_reserved_bytes_are_scrubbed() {
    // Keys of custom targets may hold `/`, `+` and `=`; an upstream may echo them encoded.
    let key = format!("{}/a+b=", random_key("cu"));
    let pct = |hex: fn(u8) -> String| {
        key.bytes()
            .map(|b| {
                if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                    (b as char).to_string()
                } else {
                    hex(b)
                }
            })
            .collect::<String>()
    };
    let upper = pct(|b| format!("%{b:02X}"));
    let lower = pct(|b| format!("%{b:02x}"));
    let unicode = pct(|b| format!("\\u{b:04x}"));
    let body = format!(r#"{{"url":"https://x/?k={upper}","json":"{unicode}"}}"#);
    let mock = MockUpstream::builder()
        .http1_only()
        .on_key(
            &key,
            support::mock_upstream::Reply::status(200)
                .header("x-echo", &format!("k={lower}"))
                .body(body.clone()),
        )
        .start()
        .await;
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::builder()
        .config(&config_for(&mock, dir.path(), ""))
        .start();
    let (token, _) = d.provision("acme", "openai", &key, &[]);
    let (status, h, got) = call_as(
        &d.socket(),
        &token,
        "/openai/v1/chat/completions",
        &chat_body("gpt-4o", false),
    )
    .await;
    assert_eq!(status, 200, "{got}");
    assert_eq!(
        key_of(&mock.last_request().unwrap()).as_deref(),
        Some(&*key)
    );
    for form in [&key, &upper, &lower, &unicode] {
        assert!(
            !got.contains(form.as_str()),
            "{form} reached the app: {got}"
        );
    }
    assert_eq!(
        got,
        r#"{"url":"https://x/?k=[REDACTED]","json":"[REDACTED]"}"#
    );
    assert_eq!(h["x-echo"], "k=[REDACTED]");
}

/// Reads frames until `needle` shows up or the body ends; returns what was read and whether
/// the body ended in an error.
async fn read_until(
    body: &mut hyper::body::Incoming,
    seen: &mut String,
    needle: &str,
) -> Option<bool> {
    while !seen.contains(needle) {
        match tokio::time::timeout(Duration::from_secs(20), body.frame())
            .await
            .expect("the stream stalled")
        {
            None => return Some(false),
            Some(Err(_)) => return Some(true),
            Some(Ok(frame)) => {
                if let Some(d) = frame.data_ref() {
                    seen.push_str(&String::from_utf8_lossy(d));
                }
            }
        }
    }
    None
}

#[tokio::test(flavor = "multi_thread")]
async fn client_revoke_stops_its_streaming_responses_cred_revoke_lets_them_finish() {
    let s = setup("").await;
    let (token, cred) = s
        .daemon
        .provision("acme", "openai", &random_key("sk-"), &[]);
    let socket = s.daemon.socket();
    // Revoking the credential: the call it already served finishes.
    let resp = send(
        &socket,
        post(
            "/openai/gated-sse?events=3",
            &[("authorization", &bearer(&token))],
            "{}",
        ),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let mut seen = String::new();
    assert_eq!(read_until(&mut body, &mut seen, "\"n\":1").await, None);
    s.daemon.ok(&["cred", "revoke", &cred]);
    s.mock.release();
    s.mock.release();
    assert_eq!(
        read_until(&mut body, &mut seen, "\"n\":3").await,
        None,
        "{seen}"
    );

    // Revoking the client: nothing more reaches it, even what the upstream sends next.
    let (token2, _) = s
        .daemon
        .provision("acme", "openai", &random_key("sk-"), &[]);
    let resp = send(
        &socket,
        post(
            "/openai/gated-sse?events=3",
            &[("authorization", &bearer(&token2))],
            "{}",
        ),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let call_id = resp.headers()["keyward-call-id"]
        .to_str()
        .unwrap()
        .to_string();
    let mut body = resp.into_body();
    let mut seen = String::new();
    assert_eq!(read_until(&mut body, &mut seen, "\"n\":1").await, None);
    let resolved = s
        .daemon
        .json_lines(&["audit", "query", "--call-id", &call_id]);
    let client = resolved
        .iter()
        .find_map(|r| r["client_id"].as_str().map(str::to_string))
        .expect("the call's client id");
    s.daemon.ok(&["client", "revoke", &client]);
    s.mock.release();
    s.mock.release();
    let ended = read_until(&mut body, &mut seen, "\"n\":2").await;
    assert_eq!(
        ended,
        Some(true),
        "event 2 reached a revoked client: {seen}"
    );
    assert!(!seen.contains("\"n\":3"));
    // The trail says why the call ended early.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let rows = s.daemon.json_lines(&[
            "audit",
            "query",
            "--call-id",
            &call_id,
            "--event",
            "request.completed",
        ]);
        if let Some(row) = rows.first() {
            assert!(
                row["detail"].as_str().unwrap_or("").contains("revoked"),
                "{row}"
            );
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no completion row");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

//! Token kinds through the real binary (README, "Vertex AI", "Azure OpenAI with Entra ID"):
//! keyward mints access tokens from `gcp-service-account` and `azure-entra` credentials at a
//! token endpoint that checks them as Google and Microsoft do (`support/token_endpoint.py`,
//! verifying with pyca/cryptography, not keyward's ring), caches them, injects them as
//! `Authorization: Bearer`, refreshes them once per burst, forgets one the upstream refuses,
//! and keeps them, like the credentials' secret fields, out of responses, logs, the audit and
//! the disk.

mod support;

use serde_json::{Value, json};
use support::daemon::{Daemon, contains};
use support::mock_upstream::{MockUpstream, Reply};
use support::token_endpoint::TokenEndpoint;
use support::uds::{call_as, error_code};

const GEMINI: &str =
    "/vertex/v1/projects/kw-test/locations/us-east5/publishers/google/models/gemini-2.0-flash";
const CLAUDE: &str = "/vertex/v1/projects/kw-test/locations/us-east5/publishers/anthropic/models/\
                      claude-sonnet-4@20250514";

fn gemini_body() -> String {
    json!({"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}).to_string()
}

/// A token endpoint, a mock provider and a daemon whose `vertex` and `azure-openai` targets
/// point at the mock, trusting both CAs.
struct Stack {
    tokens: TokenEndpoint,
    mock: MockUpstream,
    daemon: Daemon,
    _dir: tempfile::TempDir,
}

impl Stack {
    async fn start(test: &str) -> Option<Stack> {
        let tokens = TokenEndpoint::start(test)?;
        let mock = MockUpstream::start().await;
        let dir = tempfile::tempdir().unwrap();
        let ca = tokens.ca_bundle(&mock.ca_pem());
        let config = format!(
            "[targets.vertex]\nbase_url = \"{base}\"\nca_file = \"{ca}\"\n\n\
             [targets.azure-openai]\nbase_url = \"{base}\"\nca_file = \"{ca}\"\n\
             authority = \"{authority}\"\n",
            base = mock.base_url(),
            ca = ca.display(),
            authority = tokens.base,
        );
        let daemon = Daemon::builder().config(&config).start();
        Some(Stack {
            tokens,
            mock,
            daemon,
            _dir: dir,
        })
    }

    /// A client token and the credential id of a `kind` credential for `target` made from the
    /// token endpoint's file `doc`.
    fn provision(&self, target: &str, kind: &str, doc: &str) -> (String, String) {
        self.daemon
            .provision("acme", target, &self.tokens.read(doc), &["--kind", kind])
    }

    /// The service account's private key, its base64 lines one by one, and the key id.
    fn key_material(&self, doc: &str) -> Vec<String> {
        let sa = self.tokens.json(doc);
        let pem = sa["private_key"].as_str().unwrap();
        let mut parts: Vec<String> = pem
            .lines()
            .filter(|l| !l.starts_with("-----"))
            .map(str::to_string)
            .collect();
        parts.push(pem.to_string());
        parts
    }

    /// Every place a secret could surface for an operator or on disk.
    fn assert_nowhere(&self, secrets: &[String]) {
        let d = &self.daemon;
        let audit = d.ok(&["audit", "query", "--json"]);
        let creds = d.ok(&["cred", "list", "--json"]);
        let state = d.all_state_bytes();
        let (out, err) = (d.stdout(), d.stderr());
        for s in secrets {
            assert!(!audit.contains(s.as_str()), "a secret in the audit");
            assert!(!creds.contains(s.as_str()), "a secret in cred list");
            assert!(!contains(&state, s), "a secret in the state directory");
            assert!(
                !out.contains(s.as_str()) && !err.contains(s.as_str()),
                "a secret logged"
            );
        }
    }
}

fn issued(tokens: &TokenEndpoint) -> Vec<String> {
    tokens.stats()["issued"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap().to_string())
        .collect()
}

fn bearer_seen(mock: &MockUpstream) -> String {
    mock.last_request()
        .unwrap()
        .header("authorization")
        .unwrap()
        .to_string()
}

#[tokio::test]
async fn vertex_requests_carry_a_token_minted_from_the_service_account() {
    let Some(s) =
        Stack::start("vertex_requests_carry_a_token_minted_from_the_service_account").await
    else {
        return;
    };
    let (token, cred) = s.provision("vertex", "gcp-service-account", "sa.json");
    let sock = s.daemon.socket();
    let (status, headers, body) = call_as(
        &sock,
        &token,
        &format!("{GEMINI}:generateContent"),
        &gemini_body(),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("candidates"), "{body}");
    assert_eq!(
        headers["keyward-credential"].to_str().unwrap(),
        format!("{cred}/v1")
    );
    // The endpoint verified the JWT and issued one token, which the provider got.
    assert_eq!(s.tokens.count("google"), 1, "{}", s.tokens.stats());
    assert_eq!(s.tokens.count("google_refused"), 0, "{}", s.tokens.stats());
    let minted = issued(&s.tokens).remove(0);
    assert_eq!(bearer_seen(&s.mock), format!("Bearer {minted}"));
    let seen = s.mock.last_request().unwrap();
    assert!(!seen.headers.contains_key("x-goog-api-key"));

    // Streaming and an Anthropic partner model reuse the cached token.
    let (status, _, body) = call_as(
        &sock,
        &token,
        &format!("{GEMINI}:streamGenerateContent?alt=sse"),
        &gemini_body(),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(body.starts_with("data: "), "{body}");
    let claude = json!({"anthropic_version": "vertex-2023-10-16", "max_tokens": 16,
                        "messages": [{"role": "user", "content": "hi"}]});
    let (status, _, body) = call_as(
        &sock,
        &token,
        &format!("{CLAUDE}:rawPredict"),
        &claude.to_string(),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(s.tokens.count("google"), 1);
    assert_eq!(bearer_seen(&s.mock), format!("Bearer {minted}"));

    // Model, capability and usage reach the audit from both shapes.
    let done = s
        .daemon
        .json_lines(&["audit", "query", "--event", "request.completed"]);
    assert_eq!(done.len(), 3, "{done:?}");
    for row in &done {
        assert_eq!(row["capability"], "chat", "{row}");
        assert_eq!(row["input_tokens"], 9, "{row}");
        assert!(row["output_tokens"].as_u64().unwrap() > 0, "{row}");
    }
    assert!(done.iter().any(|r| r["model"] == "gemini-2.0-flash"));
    assert!(
        done.iter()
            .any(|r| r["model"] == "claude-sonnet-4@20250514")
    );

    let mut secrets = s.key_material("sa.json");
    secrets.push(minted);
    s.assert_nowhere(&secrets);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_burst_after_expiry_makes_one_token_request() {
    let Some(s) = Stack::start("a_burst_after_expiry_makes_one_token_request").await else {
        return;
    };
    // Two-second tokens are refreshed 0.2 s before they expire; each answer takes 300 ms, so
    // the burst arrives while the refresh is under way.
    s.tokens.control(2, 300, &[]);
    let (token, _) = s.provision("vertex", "gcp-service-account", "sa.json");
    let sock = s.daemon.socket();
    let path = format!("{GEMINI}:generateContent");
    let (status, _, body) = call_as(&sock, &token, &path, &gemini_body()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(s.tokens.count("google"), 1);
    // The refreshed token lives an hour: on a loaded machine a burst call that reached the cache
    // more than 1.8 s after the refresh would otherwise start a second, legitimate refresh.
    s.tokens.control(3600, 300, &[]);
    tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
    let before = s.mock.request_count();
    let calls: Vec<_> = (0..20)
        .map(|_| {
            let (sock, token, path) = (sock.clone(), token.clone(), path.clone());
            tokio::spawn(async move { call_as(&sock, &token, &path, &gemini_body()).await })
        })
        .collect();
    for c in calls {
        let (status, _, body) = c.await.unwrap();
        assert_eq!(status, 200, "{body}");
    }
    assert_eq!(s.tokens.count("google"), 2, "{}", s.tokens.stats());
    let fresh = format!("Bearer {}", issued(&s.tokens)[1]);
    let requests = s.mock.requests();
    assert_eq!(requests.len() - before, 20);
    for r in &requests[before..] {
        assert_eq!(r.header("authorization"), Some(fresh.as_str()));
    }
}

#[tokio::test]
async fn a_key_the_endpoint_does_not_know_is_refused_with_its_reason() {
    let Some(s) = Stack::start("a_key_the_endpoint_does_not_know_is_refused_with_its_reason").await
    else {
        return;
    };
    // Same account and key id, another private key: the signature does not verify.
    let (token, cred) = s.provision("vertex", "gcp-service-account", "sa_other.json");
    let (status, headers, body) = call_as(
        &s.daemon.socket(),
        &token,
        &format!("{GEMINI}:generateContent"),
        &gemini_body(),
    )
    .await;
    assert_eq!(status, 502, "{body}");
    assert_eq!(error_code(&headers), "upstream_unreachable");
    let message = serde_json::from_str::<Value>(&body).unwrap()["error"]["message"]
        .as_str()
        .unwrap()
        .to_string();
    for part in [
        cred.as_str(),
        &format!("{}/token", s.tokens.base),
        "invalid_grant",
        "Invalid JWT Signature",
    ] {
        assert!(message.contains(part), "{part} not in: {message}");
    }
    assert_eq!(s.tokens.count("google_refused"), 1);
    assert_eq!(s.mock.request_count(), 0, "nothing went to the provider");
    s.assert_nowhere(&s.key_material("sa_other.json"));
    assert!(!body.contains("PRIVATE KEY"));
}

#[tokio::test]
async fn echoed_tokens_and_key_material_are_redacted_and_a_refused_token_is_dropped() {
    let Some(s) =
        Stack::start("echoed_tokens_and_key_material_are_redacted_and_a_refused_token_is_dropped")
            .await
    else {
        return;
    };
    let first = format!("ya29.first-{}", support::daemon::random_key(""));
    let second = format!("ya29.second-{}", support::daemon::random_key(""));
    s.tokens.control(3599, 0, &[&first, &second]);
    let (token, _) = s.provision("vertex", "gcp-service-account", "sa.json");
    let pem_line = s.key_material("sa.json")[3].clone();
    s.mock.set_key_reply(
        &first,
        Reply::json(json!({"debug": {"token": first, "key": pem_line}}))
            .header("x-debug-token", &first),
    );
    let sock = s.daemon.socket();
    let path = format!("{GEMINI}:generateContent");
    let (status, headers, body) = call_as(&sock, &token, &path, &gemini_body()).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("[REDACTED]"), "{body}");
    assert!(
        !body.contains(&first) && !body.contains(&pem_line),
        "{body}"
    );
    assert_eq!(headers["x-debug-token"], "[REDACTED]");

    // The provider refuses the token: the app gets that answer, the token is forgotten, and
    // the next request is served with a new one.
    s.mock.set_key_reply(&first, Reply::status(401));
    let (status, _, _) = call_as(&sock, &token, &path, &gemini_body()).await;
    assert_eq!(status, 401);
    assert_eq!(s.tokens.count("google"), 1);
    let (status, _, body) = call_as(&sock, &token, &path, &gemini_body()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(s.tokens.count("google"), 2);
    assert_eq!(bearer_seen(&s.mock), format!("Bearer {second}"));
    s.assert_nowhere(&[first, second, pem_line]);
}

// === Azure OpenAI with Entra ID ===

const AZURE_CHAT: &str = "/azure-openai/openai/deployments/gpt-4o/chat/completions\
                          ?api-version=2024-10-21";

/// `keyward cred test` on token kinds: a Vertex service account and an Entra ID credential
/// each list models with a freshly minted token; a service account the token endpoint refuses
/// fails the test with the endpoint's reason, names the credential, and sends nothing upstream.
// Multi-threaded: the CLI blocks this thread while the in-process mock answers the call.
#[tokio::test(flavor = "multi_thread")]
async fn cred_test_mints_a_token_for_vertex_and_azure_and_names_a_refused_account() {
    let Some(s) =
        Stack::start("cred_test_mints_a_token_for_vertex_and_azure_and_names_a_refused_account")
            .await
    else {
        return;
    };
    let d = &s.daemon;
    let test = |id: &str| {
        let out = d.cli(&["cred", "test", id, "--json"]);
        let stdout = String::from_utf8(out.stdout).unwrap();
        let stderr = String::from_utf8(out.stderr).unwrap();
        let answer: Value = serde_json::from_str(stdout.trim()).unwrap();
        (out.status.code(), answer, format!("{stdout}{stderr}"))
    };
    let mut printed = String::new();

    let (_, vertex) = s.provision("vertex", "gcp-service-account", "sa.json");
    let (code, answer, text) = test(&vertex);
    printed.push_str(&text);
    assert_eq!(code, Some(0), "{text}");
    assert_eq!(answer["status"], 200);
    let minted = issued(&s.tokens).remove(0);
    let seen = s.mock.last_request().unwrap();
    assert_eq!(
        seen.path_and_query,
        "/v1beta1/publishers/google/models?pageSize=1"
    );
    assert_eq!(bearer_seen(&s.mock), format!("Bearer {minted}"));

    let (_, azure) = s.provision("azure-openai", "azure-entra", "entra.json");
    let (code, answer, text) = test(&azure);
    printed.push_str(&text);
    assert_eq!(code, Some(0), "{text}");
    assert_eq!(
        s.mock.last_request().unwrap().path_and_query,
        "/openai/models?api-version=2024-10-21"
    );
    let minted_entra = issued(&s.tokens).pop().unwrap();
    assert_ne!(minted_entra, minted);
    assert_eq!(bearer_seen(&s.mock), format!("Bearer {minted_entra}"));
    assert_eq!(
        answer["request"],
        "GET /openai/models?api-version=2024-10-21"
    );

    // Same account and key id, another private key: no token, so nothing goes upstream.
    let before = s.mock.request_count();
    let (_, other) = s.provision("vertex", "gcp-service-account", "sa_other.json");
    let (code, answer, text) = test(&other);
    printed.push_str(&text);
    assert_eq!(code, Some(1), "{text}");
    assert!(answer["status"].is_null(), "{answer}");
    assert_eq!(answer["error"], "upstream_unreachable");
    for part in [
        "keyward could not complete the call (upstream_unreachable)",
        other.as_str(),
        "invalid_grant",
    ] {
        assert!(text.contains(part), "{part} not in: {text}");
    }
    assert_eq!(
        s.mock.request_count(),
        before,
        "nothing went to the provider"
    );

    let entra = s.tokens.json("entra.json");
    let mut secrets = s.key_material("sa.json");
    secrets.extend(s.key_material("sa_other.json"));
    secrets.push(entra["client_secret"].as_str().unwrap().to_string());
    secrets.extend([minted, minted_entra]);
    for secret in &secrets {
        assert!(
            !printed.contains(secret.as_str()),
            "a secret in the CLI's output"
        );
    }
    s.assert_nowhere(&secrets);
}

fn azure_body(stream: bool) -> String {
    json!({"model": "gpt-4o", "stream": stream,
           "messages": [{"role": "user", "content": "hi"}]})
    .to_string()
}

#[tokio::test]
async fn azure_openai_takes_an_entra_token_and_a_wrong_secret_is_named_not_shown() {
    let Some(s) =
        Stack::start("azure_openai_takes_an_entra_token_and_a_wrong_secret_is_named_not_shown")
            .await
    else {
        return;
    };
    let minted = format!("eyJ0eXAi.entra-{}", support::daemon::random_key(""));
    s.tokens.control(3599, 0, &[&minted]);
    let entra = s.tokens.json("entra.json");
    let client_secret = entra["client_secret"].as_str().unwrap().to_string();
    let (token, cred) = s.provision("azure-openai", "azure-entra", "entra.json");
    // The provider echoes the token and the client secret back.
    s.mock.set_key_reply(
        &minted,
        Reply::json(json!({"debug": [minted, client_secret]})).header("x-secret", &client_secret),
    );
    let sock = s.daemon.socket();
    let (status, headers, body) = call_as(&sock, &token, AZURE_CHAT, &azure_body(false)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        headers["keyward-credential"].to_str().unwrap(),
        format!("{cred}/v1")
    );
    assert!(body.contains("[REDACTED]"), "{body}");
    assert!(
        !body.contains(&minted) && !body.contains(&client_secret),
        "{body}"
    );
    assert_eq!(headers["x-secret"], "[REDACTED]");
    let seen = s.mock.last_request().unwrap();
    assert_eq!(
        seen.header("authorization"),
        Some(format!("Bearer {minted}").as_str())
    );
    assert!(
        seen.header("api-key").is_none(),
        "an api-key header went upstream"
    );
    assert_eq!(s.tokens.count("entra"), 1, "{}", s.tokens.stats());
    // Streaming reuses the token.
    s.mock.clear_key_reply(&minted);
    let (status, _, body) = call_as(&sock, &token, AZURE_CHAT, &azure_body(true)).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("data: "), "{body}");
    assert_eq!(s.tokens.count("entra"), 1);

    // Another tenant's registration with a wrong secret: refused by the endpoint, named by
    // keyward, never shown.
    let wrong = format!("Q~{}", support::daemon::random_key(""));
    let mut doc = entra.clone();
    doc["client_secret"] = json!(wrong);
    let (other_token, other_cred) = s.daemon.provision(
        "other",
        "azure-openai",
        &doc.to_string(),
        &["--kind", "azure-entra"],
    );
    let (status, headers, body) =
        call_as(&sock, &other_token, AZURE_CHAT, &azure_body(false)).await;
    assert_eq!(status, 502, "{body}");
    assert_eq!(error_code(&headers), "upstream_unreachable");
    let endpoint = format!(
        "{}/contoso.onmicrosoft.com/oauth2/v2.0/token",
        s.tokens.base
    );
    for part in [
        other_cred.as_str(),
        &endpoint,
        "invalid_client",
        "AADSTS7000215",
    ] {
        assert!(body.contains(part), "{part} not in: {body}");
    }
    assert!(!body.contains(&wrong) && !body.contains(&client_secret));
    assert_eq!(s.tokens.count("entra_refused"), 1);
    s.assert_nowhere(&[minted, client_secret, wrong]);
}

// === official SDKs ===

fn root() -> &'static std::path::Path {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Runs `examples/clients/setup.sh` once per test binary (pinned SDKs; a no-op when present).
fn sdks() {
    static SETUP: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    let result = SETUP.get_or_init(|| {
        let out = std::process::Command::new("bash")
            .arg(root().join("examples/clients/setup.sh"))
            .stdin(std::process::Stdio::null())
            .output()
            .map_err(|e| format!("could not run setup.sh: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "examples/clients/setup.sh failed; it needs PyPI and npm:\n{}",
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    });
    if let Err(why) = result {
        panic!("{why}");
    }
}

/// Runs a Python example against the daemon as an app holding only `token`; returns its
/// stdout after checking it succeeded.
async fn example(s: &Stack, script: &str, token: &str) -> String {
    sdks();
    let out = tokio::process::Command::new(root().join("target/sdk-venv/bin/python"))
        .arg(root().join("examples/clients/python").join(script))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("KEYWARD_SOCKET", s.daemon.socket())
        .env("KEYWARD_TOKEN", token)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(std::time::Duration::from_secs(180), out)
        .await
        .expect("the example finished")
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(out.status.success(), "{script}:\n{stdout}\n{stderr}");
    let text = support::mock_upstream::DEFAULT_TEXT;
    assert!(stdout.contains(&format!("chat: {text}")), "{stdout}");
    assert!(stdout.contains(&format!("stream: {text}")), "{stdout}");
    let chunks: usize = stdout
        .lines()
        .find_map(|l| l.strip_prefix("stream chunks: "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(chunks > 1, "the stream came in one piece: {stdout}");
    stdout
}

/// The provider saw only minted tokens, never the app's client token.
fn provider_saw_only(s: &Stack, app_token: &str, minted: &[String]) {
    for r in s.mock.requests() {
        let auth = r.header("authorization").unwrap_or("");
        assert!(
            minted.iter().any(|t| auth == format!("Bearer {t}")),
            "{} carried {auth:?}",
            r.path()
        );
        for (name, value) in &r.headers {
            assert!(
                !String::from_utf8_lossy(value.as_bytes()).contains(app_token),
                "the client token reached the provider in {name}"
            );
        }
    }
}

#[tokio::test]
async fn anthropic_vertex_sdk_normal_and_streaming() {
    let Some(s) = Stack::start("anthropic_vertex_sdk_normal_and_streaming").await else {
        return;
    };
    let (token, cred) = s.provision("vertex", "gcp-service-account", "sa.json");
    let stdout = example(&s, "anthropic_vertex_chat.py", &token).await;
    assert!(
        stdout.contains(&format!("keyward-credential: {cred}/v1")),
        "{stdout}"
    );
    let paths: Vec<String> = s
        .mock
        .requests()
        .iter()
        .map(|r| r.path().to_string())
        .collect();
    let base = "/v1/projects/my-project/locations/us-east5/publishers/anthropic/models/\
                claude-sonnet-4@20250514";
    assert_eq!(
        paths,
        [
            format!("{base}:rawPredict"),
            format!("{base}:streamRawPredict")
        ]
    );
    assert_eq!(s.tokens.count("google"), 1);
    let minted = issued(&s.tokens);
    provider_saw_only(&s, &token, &minted);
    let mut secrets = s.key_material("sa.json");
    secrets.extend(minted.iter().cloned());
    s.assert_nowhere(&secrets);
    for m in &minted {
        assert!(!stdout.contains(m.as_str()));
    }
}

#[tokio::test]
async fn azure_openai_sdk_with_an_entra_token_normal_and_streaming() {
    let Some(s) = Stack::start("azure_openai_sdk_with_an_entra_token_normal_and_streaming").await
    else {
        return;
    };
    let (token, cred) = s.provision("azure-openai", "azure-entra", "entra.json");
    let stdout = example(&s, "azure_openai_entra_chat.py", &token).await;
    assert!(
        stdout.contains(&format!("keyward-credential: {cred}/v1")),
        "{stdout}"
    );
    let requests = s.mock.requests();
    assert_eq!(requests.len(), 2);
    for r in &requests {
        assert_eq!(r.path(), "/openai/deployments/gpt-4o/chat/completions");
        assert!(r.header("api-key").is_none());
    }
    assert_eq!(s.tokens.count("entra"), 1);
    let minted = issued(&s.tokens);
    provider_saw_only(&s, &token, &minted);
    let client_secret = s.tokens.json("entra.json")["client_secret"]
        .as_str()
        .unwrap()
        .to_string();
    let mut secrets = vec![client_secret];
    secrets.extend(minted.iter().cloned());
    s.assert_nowhere(&secrets);
    assert!(!stdout.contains(&secrets[0]));
}

// === configured token endpoints ===

/// A target's `token_url` and `authority` decide where tokens come from: the Vertex key's own
/// `token_uri` names a host that does not resolve and the mock's Google endpoint lives under a
/// private path; the Entra authority is another host name with a path, as a sovereign cloud's.
#[tokio::test]
async fn configured_token_url_and_authority_are_where_tokens_come_from() {
    let Some(tokens) = TokenEndpoint::start("configured_token_url_and_authority") else {
        return;
    };
    let mock = MockUpstream::start().await;
    let ca = tokens.ca_bundle(&mock.ca_pem());
    let port = tokens.base.rsplit(':').next().unwrap();
    let config = format!(
        "[targets.vertex]\nbase_url = \"{base}\"\nca_file = \"{ca}\"\n\
         token_url = \"https://localhost:{port}/private/oauth2/token\"\n\n\
         [targets.azure-openai]\nbase_url = \"{base}\"\nca_file = \"{ca}\"\n\
         authority = \"https://localhost:{port}/sovereign\"\n",
        base = mock.base_url(),
        ca = ca.display(),
    );
    let daemon = Daemon::builder().config(&config).start();
    let (vertex_token, _) = daemon.provision(
        "acme",
        "vertex",
        &tokens.read("sa_private.json"),
        &["--kind", "gcp-service-account"],
    );
    let (azure_token, _) = daemon.provision(
        "acme",
        "azure-openai",
        &tokens.read("entra.json"),
        &["--kind", "azure-entra"],
    );
    let sock = daemon.socket();
    let (status, _, body) = call_as(
        &sock,
        &vertex_token,
        &format!("{GEMINI}:generateContent"),
        &gemini_body(),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (status, _, body) = call_as(&sock, &azure_token, AZURE_CHAT, &azure_body(false)).await;
    assert_eq!(status, 200, "{body}");
    let stats = tokens.stats();
    assert_eq!(
        stats["paths"],
        json!([
            "/private/oauth2/token",
            "/sovereign/contoso.onmicrosoft.com/oauth2/v2.0/token"
        ]),
        "{stats}"
    );
    assert_eq!((tokens.count("google"), tokens.count("entra")), (1, 1));
    let minted = issued(&tokens);
    let seen: Vec<String> = mock
        .requests()
        .iter()
        .map(|r| r.header("authorization").unwrap().to_string())
        .collect();
    assert_eq!(
        seen,
        minted
            .iter()
            .map(|t| format!("Bearer {t}"))
            .collect::<Vec<_>>()
    );
}

/// `keyward_derived_secrets{kind="access_token"}` as `keyward metrics` prints it.
fn cached_tokens(daemon: &Daemon) -> u64 {
    let text = daemon.ok(&["metrics"]);
    text.lines()
        .find_map(|l| l.strip_prefix("keyward_derived_secrets{kind=\"access_token\"} "))
        .unwrap_or_else(|| panic!("no derived_secrets line in:\n{text}"))
        .trim()
        .parse()
        .unwrap()
}

/// A token belongs to one credential version: rotating the version away (no overlap) drops
/// it, and the next call gets a new token from the new version; deleting the credential drops
/// that one too. The dropped tokens never reach the provider again.
#[tokio::test]
async fn tokens_of_rotated_away_or_deleted_versions_are_dropped() {
    let Some(s) = Stack::start("tokens_of_rotated_away_or_deleted_versions_are_dropped").await
    else {
        return;
    };
    let (token, cred) = s.provision("vertex", "gcp-service-account", "sa.json");
    let sock = s.daemon.socket();
    let path = format!("{GEMINI}:generateContent");
    let (status, _, body) = call_as(&sock, &token, &path, &gemini_body()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(cached_tokens(&s.daemon), 1);
    let first = issued(&s.tokens).remove(0);

    s.daemon.ok_stdin(
        &["cred", "rotate", &cred, "--overlap", "0s"],
        s.tokens.read("sa.json").as_bytes(),
    );
    assert_eq!(cached_tokens(&s.daemon), 0, "v1's token outlived v1");
    let (status, headers, body) = call_as(&sock, &token, &path, &gemini_body()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(headers["keyward-credential"], format!("{cred}/v2").as_str());
    assert_eq!(s.tokens.count("google"), 2, "v2 fetched its own token");
    let second = issued(&s.tokens).remove(1);
    assert_eq!(bearer_seen(&s.mock), format!("Bearer {second}"));
    assert_eq!(cached_tokens(&s.daemon), 1);

    s.daemon.ok(&["cred", "delete", &cred]);
    assert_eq!(
        cached_tokens(&s.daemon),
        0,
        "a deleted credential's token outlived it"
    );
    let (status, _, _) = call_as(&sock, &token, &path, &gemini_body()).await;
    assert_eq!(status, 403);
    let sent: Vec<String> = s
        .mock
        .requests()
        .iter()
        .map(|r| r.header("authorization").unwrap().to_string())
        .collect();
    assert_eq!(
        sent,
        [format!("Bearer {first}"), format!("Bearer {second}")],
        "each token went out only while its version served"
    );
}

/// Adds a second credential of `kind` from `doc` for `target` to tenant acme, at `priority`;
/// returns its id.
fn add_cred(daemon: &Daemon, target: &str, kind: &str, doc: &str, priority: &str) -> String {
    let name = format!("second-{}", &support::daemon::random_key("")[..6]);
    let out = daemon.ok_stdin(
        &[
            "cred",
            "add",
            "--tenant",
            "acme",
            "--target",
            target,
            "--name",
            &name,
            "--kind",
            kind,
            "--priority",
            priority,
            "--json",
        ],
        doc.as_bytes(),
    );
    let row: Value = serde_json::from_str(out.trim()).unwrap();
    row["id"].as_str().unwrap().to_string()
}

/// A token endpoint that refuses a credential (Google `invalid_grant` for a key it does not
/// know, Entra ID `invalid_client` for a wrong secret) fails the call over to the next key like
/// a provider's 401: the refused version is quarantined and skipped by the next call, and the
/// failover and quarantine rows name the endpoint and its reason, never a secret.
#[tokio::test]
async fn a_token_endpoint_refusal_fails_over_and_quarantines_the_credential() {
    let Some(s) =
        Stack::start("a_token_endpoint_refusal_fails_over_and_quarantines_the_credential").await
    else {
        return;
    };
    let sock = s.daemon.socket();
    let (token, bad_sa) = s.daemon.provision(
        "acme",
        "vertex",
        &s.tokens.read("sa_other.json"),
        &["--kind", "gcp-service-account", "--priority", "1"],
    );
    let good_sa = add_cred(
        &s.daemon,
        "vertex",
        "gcp-service-account",
        &s.tokens.read("sa.json"),
        "2",
    );
    let entra = s.tokens.json("entra.json");
    let wrong = format!("Q~{}", support::daemon::random_key(""));
    let mut wrong_doc = entra.clone();
    wrong_doc["client_secret"] = json!(wrong);
    let bad_entra = add_cred(
        &s.daemon,
        "azure-openai",
        "azure-entra",
        &wrong_doc.to_string(),
        "1",
    );
    let good_entra = add_cred(
        &s.daemon,
        "azure-openai",
        "azure-entra",
        &entra.to_string(),
        "2",
    );
    let gemini = format!("{GEMINI}:generateContent");
    for _ in 0..2 {
        let (status, headers, body) = call_as(&sock, &token, &gemini, &gemini_body()).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(
            headers["keyward-credential"],
            format!("{good_sa}/v1").as_str()
        );
        let (status, headers, body) = call_as(&sock, &token, AZURE_CHAT, &azure_body(false)).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(
            headers["keyward-credential"],
            format!("{good_entra}/v1").as_str()
        );
    }
    // Each refused credential was asked for a token once: the second calls skipped it.
    let stats = s.tokens.stats();
    assert_eq!(
        (
            s.tokens.count("google_refused"),
            s.tokens.count("entra_refused")
        ),
        (1, 1),
        "{stats}"
    );
    let mut rows = s.daemon.json_lines(&["audit", "query", "--limit", "200"]);
    rows.sort_by_key(|r| r["seq"].as_u64());
    let google = format!("{}/token", s.tokens.base);
    let microsoft = format!(
        "{}/contoso.onmicrosoft.com/oauth2/v2.0/token",
        s.tokens.base
    );
    for (bad, good, endpoint, reason) in [
        (&bad_sa, &good_sa, &google, "invalid_grant"),
        (&bad_entra, &good_entra, &microsoft, "invalid_client"),
    ] {
        let of = |event: &str| -> Vec<&Value> {
            rows.iter()
                .filter(|r| r["event"] == event && r["credential_id"] == bad.as_str())
                .collect()
        };
        let failovers = of("request.failover");
        assert_eq!(failovers.len(), 1, "{rows:?}");
        let detail = failovers[0]["detail"].as_str().unwrap();
        for part in [
            format!("from {bad}/v1 to {good}/v1"),
            endpoint.clone(),
            reason.to_string(),
            "quarantined until".to_string(),
        ] {
            assert!(detail.contains(&part), "{part} not in {detail}");
        }
        let quarantined = of("credential.quarantined");
        assert_eq!(quarantined.len(), 1, "{rows:?}");
        let detail = quarantined[0]["detail"].as_str().unwrap();
        assert!(
            detail.contains(endpoint.as_str()) && detail.contains(reason),
            "{detail}"
        );
        let resolved = of("request.resolved");
        assert_eq!(
            resolved.len(),
            1,
            "the quarantined key led only the first call"
        );
    }
    let mut secrets = s.key_material("sa.json");
    secrets.extend(s.key_material("sa_other.json"));
    secrets.push(wrong);
    secrets.push(entra["client_secret"].as_str().unwrap().to_string());
    secrets.extend(issued(&s.tokens));
    s.assert_nowhere(&secrets);
}

#[tokio::test]
async fn google_genai_sdk_in_vertex_mode_normal_and_streaming() {
    let Some(s) = Stack::start("google_genai_sdk_in_vertex_mode_normal_and_streaming").await else {
        return;
    };
    let (token, cred) = s.provision("vertex", "gcp-service-account", "sa.json");
    let stdout = example(&s, "google_genai_vertex_chat.py", &token).await;
    assert!(
        stdout.contains(&format!("keyward-credential: {cred}/v1")),
        "{stdout}"
    );
    assert!(stdout.contains("usage: 9 input"), "{stdout}");
    let paths: Vec<String> = s
        .mock
        .requests()
        .iter()
        .map(|r| r.path().to_string())
        .collect();
    let base = "/v1/projects/my-project/locations/us-central1/publishers/google/models/\
                gemini-2.0-flash";
    assert_eq!(
        paths,
        [
            format!("{base}:generateContent"),
            format!("{base}:streamGenerateContent")
        ]
    );
    assert_eq!(s.tokens.count("google"), 1);
    let minted = issued(&s.tokens);
    provider_saw_only(&s, &token, &minted);
    let mut secrets = s.key_material("sa.json");
    secrets.extend(minted.iter().cloned());
    s.assert_nowhere(&secrets);
    for m in &minted {
        assert!(!stdout.contains(m.as_str()));
    }
}

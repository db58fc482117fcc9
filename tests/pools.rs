//! Key pools end to end with the real binary: failover on 401/403/429/5xx and connect
//! failures, cooldown and quarantine, rotation overlap, revocation, key-age policy, and the
//! in-memory hot path. The mock provider is programmed per key, so each test decides exactly
//! which key fails and how, and checks what the upstream saw and what the audit trail says.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http_body_util::BodyExt;
use serde_json::Value;
use support::daemon::{Daemon, random_key};
use support::mock_upstream::{MockUpstream, Reply, key_of};
use support::uds::{bearer, call, call_as, chat_body, post};

/// A daemon whose `openai` target is the mock, with `extra` TOML on top.
async fn setup(extra: &str) -> support::Setup {
    support::setup(&["openai"], extra).await
}

/// Adds one more credential for `target` to `tenant`; returns its id.
fn add_key(d: &Daemon, tenant: &str, target: &str, key: &str, priority: &str) -> String {
    let name = format!("key-{}", &random_key("")[..8]);
    let out = d.ok_stdin(
        &[
            "cred",
            "add",
            "--tenant",
            tenant,
            "--target",
            target,
            "--name",
            &name,
            "--priority",
            priority,
            "--json",
        ],
        key.as_bytes(),
    );
    let v: Value = serde_json::from_str(out.trim()).unwrap();
    v["id"].as_str().unwrap().to_string()
}

/// One chat call; returns (status, `keyward-credential`, body).
async fn chat(d: &Daemon, token: &str) -> (u16, String, String) {
    let (status, headers, body) = call(
        &d.socket(),
        post(
            "/openai/v1/chat/completions",
            &[("authorization", &bearer(token))],
            &chat_body("gpt-4o-mini", false),
        ),
    )
    .await;
    let served = headers
        .get("keyward-credential")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    (status, served, body)
}

/// Audit rows of one event kind, oldest first.
fn audit(d: &Daemon, event: &str) -> Vec<Value> {
    let mut rows = d.json_lines(&["audit", "query", "--event", event, "--limit", "100000"]);
    rows.sort_by_key(|r| r["seq"].as_u64());
    rows
}

/// Waits (bounded) until `f` holds; the audit writer commits some rows asynchronously.
async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Requests the mock received carrying `key`.
fn sent_with(mock: &MockUpstream, key: &str) -> usize {
    mock.requests()
        .iter()
        .filter(|r| key_of(r).as_deref() == Some(key))
        .count()
}

/// The `cred list --json` line of credential `id`, version `v`.
fn listed(d: &Daemon, id: &str, v: u64) -> Value {
    d.json_lines(&["cred", "list"])
        .into_iter()
        .find(|c| c["id"] == id && c["version"] == v)
        .unwrap_or_else(|| panic!("{id}/v{v} not listed"))
}

fn parse_time(v: &Value) -> SystemTime {
    humantime::parse_rfc3339(v.as_str().unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_key_refused_with_401_is_quarantined_once_and_requests_fail_over() {
    let s = setup("[pool]\nquarantine = \"1h\"").await;
    let d = &s.daemon;
    let bad = random_key("sk-bad-");
    let good = random_key("sk-good-");
    s.mock.set_key_reply(&bad, Reply::status(401));
    let (token, bad_id) = d.provision("acme", "openai", &bad, &["--priority", "1"]);
    let good_id = add_key(d, "acme", "openai", &good, "1");
    for _ in 0..6 {
        let (status, served, body) = chat(d, &token).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(served, format!("{good_id}/v1"));
    }
    // Round-robin would have offered the bad key to every other request: after the first
    // refusal it is skipped.
    assert_eq!(sent_with(&s.mock, &bad), 1);
    assert_eq!(sent_with(&s.mock, &good), 6);

    let failovers = audit(d, "request.failover");
    assert_eq!(failovers.len(), 1, "{failovers:?}");
    let f = &failovers[0];
    assert_eq!(f["credential_id"], bad_id.as_str());
    assert_eq!(f["upstream_status"], 401);
    let detail = f["detail"].as_str().unwrap();
    assert!(
        detail.starts_with(&format!(
            "from {bad_id}/v1 to {good_id}/v1: upstream answered 401; quarantined until"
        )),
        "{detail}"
    );
    // The resolution named the first key, the failover is committed before the second key is
    // used, and the completion names the key that served.
    let call_id = f["call_id"].as_str().unwrap();
    eventually("the completion row", || {
        d.json_lines(&["audit", "query", "--call-id", call_id])
            .iter()
            .any(|r| r["event"] == "request.completed")
    })
    .await;
    let mut rows = d.json_lines(&["audit", "query", "--call-id", call_id]);
    rows.sort_by_key(|r| r["seq"].as_u64());
    let kinds: Vec<&str> = rows.iter().map(|r| r["event"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        [
            "request.resolved",
            "credential.quarantined",
            "request.failover",
            "request.completed"
        ]
    );
    assert_eq!(rows[0]["credential_id"], bad_id.as_str());
    let completed = d.json_lines(&[
        "audit",
        "query",
        "--call-id",
        call_id,
        "--event",
        "request.completed",
    ]);
    assert_eq!(completed[0]["credential_id"], good_id.as_str());
    assert_eq!(completed[0]["upstream_status"], 200);

    eventually("the quarantine event", || {
        !audit(d, "credential.quarantined").is_empty()
    })
    .await;
    let q = audit(d, "credential.quarantined");
    assert_eq!(q.len(), 1, "one event per entry into quarantine: {q:?}");
    assert_eq!(q[0]["credential_id"], bad_id.as_str());
    assert!(
        q[0]["detail"]
            .as_str()
            .unwrap()
            .contains("revoked or leaked")
    );

    let line = listed(d, &bad_id, 1);
    assert_eq!(line["state"], "quarantined", "{line}");
    let until = parse_time(&line["until"]);
    let ahead = until.duration_since(SystemTime::now()).unwrap();
    assert!(
        ahead > Duration::from_secs(3500) && ahead <= Duration::from_secs(3600),
        "{ahead:?}"
    );
    assert_eq!(listed(d, &good_id, 1)["state"], "current");
    let table = d.ok(&["cred", "list"]);
    assert!(table.contains("quarantined until"), "{table}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_403_also_quarantines_and_the_last_key_returns_the_refusal() {
    let s = setup("").await;
    let d = &s.daemon;
    let key = random_key("sk-");
    s.mock.set_key_reply(&key, Reply::status(403));
    let (token, id) = d.provision("acme", "openai", &key, &[]);
    // A single key has nowhere to fail over to: the app gets the upstream's answer.
    let (status, served, body) = chat(d, &token).await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(served, format!("{id}/v1"));
    assert!(body.contains("programmed 403"), "{body}");
    assert!(audit(d, "request.failover").is_empty());
    // Quarantined, but still used while no other key can serve.
    assert_eq!(listed(d, &id, 1)["state"], "quarantined");
    s.mock.clear_key_reply(&key);
    let (status, _, body) = chat(d, &token).await;
    assert_eq!(status, 200, "{body}");
    // The success lifts the quarantine.
    assert_eq!(listed(d, &id, 1)["state"], "current");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_429_key_cools_down_until_retry_after_then_serves_again() {
    let s = setup("").await;
    let d = &s.daemon;
    let limited = random_key("sk-rl-");
    let backup = random_key("sk-backup-");
    s.mock
        .set_key_reply(&limited, Reply::status(429).header("retry-after", "2"));
    let (token, limited_id) = d.provision("acme", "openai", &limited, &["--priority", "1"]);
    let backup_id = add_key(d, "acme", "openai", &backup, "2");

    let (status, served, body) = chat(d, &token).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        served,
        format!("{backup_id}/v1"),
        "failed over to the next priority"
    );
    let line = listed(d, &limited_id, 1);
    assert_eq!(line["state"], "cooling_down", "{line}");
    let ahead = parse_time(&line["until"])
        .duration_since(SystemTime::now())
        .unwrap_or_default();
    assert!(ahead <= Duration::from_secs(2), "{ahead:?}");
    let f = audit(d, "request.failover");
    assert_eq!(f.len(), 1);
    assert_eq!(f[0]["upstream_status"], 429);
    assert!(
        f[0]["detail"]
            .as_str()
            .unwrap()
            .contains("upstream answered 429; cooling down until"),
        "{}",
        f[0]
    );

    // While it cools down, the lower-priority key serves without the limited one being tried.
    let (status, served, _) = chat(d, &token).await;
    assert_eq!((status, served), (200, format!("{backup_id}/v1")));
    assert_eq!(sent_with(&s.mock, &limited), 1);

    s.mock.clear_key_reply(&limited);
    tokio::time::sleep(Duration::from_millis(2300)).await;
    let (status, served, _) = chat(d, &token).await;
    assert_eq!((status, served), (200, format!("{limited_id}/v1")));
    assert_eq!(listed(d, &limited_id, 1)["state"], "current");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_429_without_retry_after_uses_the_configured_default_cooldown() {
    let s = setup("[pool]\ndefault_cooldown = \"10m\"").await;
    let d = &s.daemon;
    let limited = random_key("sk-rl-");
    s.mock.set_key_reply(&limited, Reply::status(429));
    let (token, id) = d.provision("acme", "openai", &limited, &[]);
    add_key(d, "acme", "openai", &random_key("sk-ok-"), "200");
    let (status, _, _) = chat(d, &token).await;
    assert_eq!(status, 200);
    let line = listed(d, &id, 1);
    assert_eq!(line["state"], "cooling_down");
    let ahead = parse_time(&line["until"])
        .duration_since(SystemTime::now())
        .unwrap();
    assert!(
        ahead > Duration::from_secs(590) && ahead <= Duration::from_secs(600),
        "{ahead:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn server_errors_fail_over_without_penalty_and_the_last_answer_is_returned_scrubbed() {
    let s = setup("").await;
    let d = &s.daemon;
    let first = random_key("sk-first-");
    let second = random_key("sk-second-");
    s.mock.set_key_reply(&first, Reply::status(500));
    let (token, first_id) = d.provision("acme", "openai", &first, &["--priority", "1"]);
    let second_id = add_key(d, "acme", "openai", &second, "2");

    for round in 1..=2 {
        let (status, served, body) = chat(d, &token).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(served, format!("{second_id}/v1"));
        // A 5xx says nothing about the key: it is tried first again every time.
        assert_eq!(sent_with(&s.mock, &first), round);
    }
    assert_eq!(listed(d, &first_id, 1)["state"], "current");
    let f = audit(d, "request.failover");
    assert_eq!(f.len(), 2);
    assert_eq!(
        f[0]["detail"],
        format!("from {first_id}/v1 to {second_id}/v1: upstream answered 500")
    );

    // Every key fails: the app gets the last upstream answer, naming the last key, with that
    // key scrubbed from the body.
    s.mock.set_key_reply(
        &second,
        Reply::status(503)
            .header("content-type", "text/plain")
            .body(format!("overloaded; your key {second} is fine")),
    );
    let (status, served, body) = chat(d, &token).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(served, format!("{second_id}/v1"));
    assert_eq!(body, "overloaded; your key [REDACTED] is fine");
}

#[tokio::test(flavor = "multi_thread")]
async fn connection_refused_fails_over_through_the_pool_then_answers_502() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let toml = format!(
        "[targets.closed]\nbase_url = \"https://{closed}\"\nauth_header = \"authorization\"\n\
         auth_format = \"Bearer {{key}}\"\nfamily = \"openai\"\n"
    );
    let d = Daemon::builder().config(&toml).start();
    let (token, a) = d.provision("acme", "closed", &random_key("sk-a-"), &["--priority", "1"]);
    let b = add_key(&d, "acme", "closed", &random_key("sk-b-"), "2");
    let (status, headers, body) = call_as(
        &d.socket(),
        &token,
        "/closed/v1/chat/completions",
        &chat_body("m", false),
    )
    .await;
    assert_eq!(status, 502, "{body}");
    assert_eq!(headers["keyward-error"], "upstream_unreachable");
    assert!(body.contains("127.0.0.1"), "{body}");
    let f = audit(&d, "request.failover");
    assert_eq!(f.len(), 1, "{f:?}");
    let detail = f[0]["detail"].as_str().unwrap();
    assert!(
        detail.starts_with(&format!("from {a}/v1 to {b}/v1: upstream 127.0.0.1"))
            && detail.contains("unreachable"),
        "{detail}"
    );
    // A connect failure is not the key's fault: neither key is benched.
    assert_eq!(listed(&d, &a, 1)["state"], "current");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_streamed_body_is_replayed_byte_for_byte_to_the_next_key() {
    let s = setup("").await;
    let d = &s.daemon;
    let bad = random_key("sk-bad-");
    let good = random_key("sk-good-");
    s.mock.set_key_reply(&bad, Reply::status(401));
    let (token, _) = d.provision("acme", "openai", &bad, &["--priority", "1"]);
    let good_id = add_key(d, "acme", "openai", &good, "2");

    // The model comes first; the rest arrives in 40 chunks over time, so the first attempt is
    // refused while most of the body is still on its way from the app.
    let head = "{\"model\":\"gpt-4o\",\"messages\":[{\"role\":\"user\",\"content\":\"".to_string();
    let chunks: Vec<String> = (0..40)
        .map(|i| format!("{i:03}-{}", "abcdefgh".repeat(1000)))
        .collect();
    let tail = "\"}]}".to_string();
    let mut parts = vec![head];
    parts.extend(chunks);
    parts.push(tail);
    let whole: String = parts.concat();
    let stream = futures_util::stream::unfold(parts.into_iter(), |mut it| async move {
        let next = it.next()?;
        tokio::time::sleep(Duration::from_millis(5)).await;
        Some((
            Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(Bytes::from(next))),
            it,
        ))
    });
    let req = http::Request::post("/openai/v1/chat/completions")
        .header("host", "keyward")
        .header("content-type", "application/json")
        .header("authorization", bearer(&token))
        .body(http_body_util::StreamBody::new(stream))
        .unwrap();
    let socket = tokio::net::UnixStream::connect(d.socket()).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(socket))
            .await
            .unwrap();
    tokio::spawn(conn);
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["keyward-credential"],
        format!("{good_id}/v1").as_str()
    );
    let _ = resp.into_body().collect().await.unwrap();

    let served = s
        .mock
        .requests()
        .into_iter()
        .find(|r| key_of(r).as_deref() == Some(good.as_str()))
        .unwrap();
    assert_eq!(served.body_len, whole.len() as u64);
    assert_eq!(served.body, whole.as_bytes());

    // The fingerprint covers the body once, whatever was replayed: a lookup by payload finds
    // the call.
    let payload = s.dir.path().join("payload.json");
    std::fs::write(&payload, &whole).unwrap();
    eventually("the completion row", || {
        !audit(d, "request.completed").is_empty()
    })
    .await;
    let found = d.json_lines(&[
        "audit",
        "query",
        "--tenant",
        "acme",
        "--payload-file",
        payload.to_str().unwrap(),
    ]);
    assert!(
        found
            .iter()
            .any(|r| r["event"] == "request.completed" && r["bytes_in"] == whole.len() as u64),
        "{found:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn rotation_keeps_the_old_version_as_fallback_until_it_retires_on_time() {
    let s = setup("").await;
    let d = &s.daemon;
    let v1 = random_key("sk-v1-");
    let v2 = random_key("sk-v2-");
    let (token, id) = d.provision("acme", "openai", &v1, &[]);
    d.ok_stdin(&["cred", "rotate", &id, "--overlap", "3s"], v2.as_bytes());

    let (status, served, _) = chat(d, &token).await;
    assert_eq!(
        (status, served),
        (200, format!("{id}/v2")),
        "new version is current"
    );
    assert_eq!(sent_with(&s.mock, &v1), 0);

    s.mock.set_key_reply(&v2, Reply::status(500));
    let (status, served, _) = chat(d, &token).await;
    assert_eq!(
        (status, served),
        (200, format!("{id}/v1")),
        "old version is the fallback"
    );
    let f = audit(d, "request.failover");
    assert_eq!(f.len(), 1);
    assert!(
        f[0]["detail"]
            .as_str()
            .unwrap()
            .starts_with(&format!("from {id}/v2 to {id}/v1"))
    );
    assert_eq!(listed(d, &id, 1)["state"], "overlapping");

    // No traffic: the version retires on time anyway, with an audit row.
    eventually("credential.retired", || {
        audit(d, "credential.retired")
            .iter()
            .any(|r| r["credential_id"] == id.as_str() && r["credential_version"] == 1)
    })
    .await;
    assert_eq!(listed(d, &id, 1)["state"], "retired");
    let (status, served, _) = chat(d, &token).await;
    assert_eq!(
        (status, served),
        (500, format!("{id}/v2")),
        "no fallback once retired"
    );
    assert_eq!(sent_with(&s.mock, &v1), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn revocation_takes_effect_on_the_next_request() {
    let s = setup("").await;
    let d = &s.daemon;
    let a = random_key("sk-a-");
    let b = random_key("sk-b-");
    let (token, a_id) = d.provision("acme", "openai", &a, &["--priority", "1"]);
    let b_id = add_key(d, "acme", "openai", &b, "2");
    assert_eq!(chat(d, &token).await.1, format!("{a_id}/v1"));
    d.ok(&["cred", "revoke", &a_id, "--version", "1"]);
    assert_eq!(chat(d, &token).await.1, format!("{b_id}/v1"));
    assert_eq!(sent_with(&s.mock, &a), 1);
    d.ok(&["cred", "revoke", &b_id]);
    let (status, _, body) = chat(d, &token).await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("scope_denied"), "{body}");
    assert_eq!(s.mock.request_count(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn key_age_policy_warn_serves_and_flags_deny_skips_and_a_week_ahead_is_logged() {
    let s = setup("").await;
    let d = &s.daemon;
    d.ok(&[
        "tenant",
        "add",
        "lenient",
        "--max-key-age",
        "1s",
        "--on-expiry",
        "warn",
    ]);
    d.ok(&[
        "tenant",
        "add",
        "strict",
        "--max-key-age",
        "3s",
        "--on-expiry",
        "deny",
    ]);
    d.ok(&[
        "tenant",
        "add",
        "soon",
        "--max-key-age",
        "7d",
        "--on-expiry",
        "warn",
    ]);
    let (warn_token, warn_id) = d.provision("lenient", "openai", &random_key("sk-w-"), &[]);
    let old = random_key("sk-old-");
    let (deny_token, old_id) = d.provision("strict", "openai", &old, &["--priority", "1"]);
    let (_, soon_id) = d.provision("soon", "openai", &random_key("sk-s-"), &[]);
    // Ages are whole seconds: 4.1 s makes the 3 s key unambiguously too old.
    tokio::time::sleep(Duration::from_millis(4100)).await;
    let fresh_id = add_key(d, "strict", "openai", &random_key("sk-new-"), "2");

    // warn: served, flagged in the audit and in `cred list`, and logged.
    let (status, served, body) = chat(d, &warn_token).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(served, format!("{warn_id}/v1"));
    let resolved = audit(d, "request.resolved");
    let row = resolved
        .iter()
        .find(|r| r["credential_id"] == warn_id.as_str())
        .unwrap();
    assert_eq!(row["flags"], serde_json::json!(["expired_key_warn"]));
    let line = listed(d, &warn_id, 1);
    assert_eq!(
        (line["state"].as_str(), line["expired"].as_bool()),
        (Some("expired"), Some(true))
    );

    // deny: the expired key is never offered while a fresh one matches.
    let (status, served, _) = chat(d, &deny_token).await;
    assert_eq!((status, served), (200, format!("{fresh_id}/v1")));
    assert_eq!(sent_with(&s.mock, &old), 0);
    assert_eq!(listed(d, &old_id, 1)["state"], "expired");

    // A key that passes its max age within a week is announced once in the log.
    eventually("the expiry notice", || {
        d.stderr()
            .lines()
            .any(|l| l.contains("within a week") && l.contains(&soon_id))
    })
    .await;
    let logs = d.stderr();
    assert!(
        logs.lines()
            .any(|l| l.contains("past the tenant's max key age") && l.contains(&warn_id))
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let notices = d
        .stderr()
        .lines()
        .filter(|l| l.contains("within a week") && l.contains(&soon_id))
        .count();
    assert_eq!(notices, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_thousand_requests_over_three_keys_survive_one_turning_429_midway() {
    let s = setup("").await;
    let d = Arc::new(s.daemon);
    let mock = Arc::new(s.mock);
    let keys: Vec<String> = (0..3).map(|i| random_key(&format!("sk-{i}-"))).collect();
    let (token, first) = d.provision("acme", "openai", &keys[0], &["--priority", "5"]);
    let ids = [
        first,
        add_key(&d, "acme", "openai", &keys[1], "5"),
        add_key(&d, "acme", "openai", &keys[2], "5"),
    ];
    let total = 1000;
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let (d, mock, next, token) = (d.clone(), mock.clone(), next.clone(), token.clone());
        let limited = keys[1].clone();
        tasks.push(tokio::spawn(async move {
            let mut results = Vec::new();
            loop {
                let n = next.fetch_add(1, Ordering::SeqCst);
                if n >= total {
                    return results;
                }
                if n == total / 2 {
                    mock.set_key_reply(&limited, Reply::status(429).header("retry-after", "600"));
                }
                let (status, served, body) = chat(&d, &token).await;
                results.push((status, served, body));
            }
        }));
    }
    let mut results = Vec::new();
    for t in tasks {
        results.extend(
            tokio::time::timeout(Duration::from_secs(300), t)
                .await
                .unwrap()
                .unwrap(),
        );
    }
    assert_eq!(results.len(), total);
    for (status, _, body) in &results {
        assert_eq!(*status, 200, "{body}");
    }
    let count = |id: &str| {
        results
            .iter()
            .filter(|(_, s, _)| s == &format!("{id}/v1"))
            .count()
    };
    // Every key took its share of the first half.
    assert!(
        ids.iter().all(|id| count(id) > 100),
        "{:?}",
        ids.map(|i| count(&i))
    );

    let failovers = audit(&d, "request.failover");
    assert!(!failovers.is_empty());
    // Only requests already on their way when the first 429 came back can hit the key.
    assert!(failovers.len() <= 32, "{} failovers", failovers.len());
    for f in &failovers {
        assert_eq!(f["credential_id"], ids[1].as_str());
        assert!(
            f["detail"]
                .as_str()
                .unwrap()
                .contains("429; cooling down until"),
            "{f}"
        );
    }
    // Every request that reached the limited key was either served by it (before the switch)
    // or failed over from it: none was lost or answered 429.
    assert_eq!(
        sent_with(&mock, &keys[1]),
        count(&ids[1]) + failovers.len(),
        "each hit of the 429 key failed over exactly once"
    );
    assert_eq!(listed(&d, &ids[1], 1)["state"], "cooling_down");
    eventually("1000 completion rows", || {
        audit(&d, "request.completed").len() == total
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_data_plane_never_reads_the_store() {
    let s = setup("").await;
    let d = &s.daemon;
    let bad = random_key("sk-bad-");
    s.mock.set_key_reply(&bad, Reply::status(429));
    let (token, _) = d.provision("acme", "openai", &bad, &["--priority", "1"]);
    add_key(d, "acme", "openai", &random_key("sk-ok-"), "2");
    let accesses = || {
        d.json_lines(&["status"])[0]["store_accesses"]
            .as_u64()
            .unwrap()
    };
    let before = accesses();
    for _ in 0..50 {
        assert_eq!(chat(d, &token).await.0, 200);
    }
    // Listing credentials reads the in-memory catalog too.
    d.json_lines(&["cred", "list"]);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(
        accesses(),
        before,
        "a request or the retirement tick touched SQLite"
    );
    // ...and the counter does move when the store is used.
    add_key(d, "acme", "openai", &random_key("sk-more-"), "3");
    assert!(accesses() > before);
}

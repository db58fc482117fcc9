//! The audit trail through the real binary: what real traffic records (and never records),
//! payload fingerprint lookups, tamper detection by `keyward audit verify`, retention, lifecycle
//! replay, and crash safety under kill -9.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use support::daemon::{Daemon, contains, random_key};
use support::mock_upstream::MockUpstream;
use support::uds::{bearer, call, call_as, chat_body, post};

fn config(mock: &MockUpstream, dir: &std::path::Path, extra: &str) -> String {
    support::targets_config(mock, dir, &["openai"], extra)
}

fn events(d: &Daemon, args: &[&str]) -> Vec<serde_json::Value> {
    let mut all = vec!["audit", "query", "--limit", "100000"];
    all.extend_from_slice(args);
    d.json_lines(&all)
}

#[tokio::test(flavor = "multi_thread")]
async fn real_traffic_is_recorded_without_keys_tokens_or_payloads() {
    let mock = MockUpstream::builder().start().await;
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::builder()
        .config(&config(&mock, dir.path(), ""))
        .start();
    let key = random_key("sk-proj-");
    let (token, cred) = d.provision("acme", "openai", &key, &[]);
    let marker = format!("distinctive-payload-{}", random_key(""));
    let body = serde_json::json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": marker}], "stream": true, "stream_options": {"include_usage": true}}).to_string();
    let (status, headers, _) =
        call_as(&d.socket(), &token, "/openai/v1/chat/completions", &body).await;
    assert_eq!(status, 200);
    let call_id = headers["keyward-call-id"].to_str().unwrap().to_string();
    // request.completed is written after the stream ends; give the writer a moment.
    let mut rows = Vec::new();
    for _ in 0..100 {
        rows = events(&d, &["--call-id", &call_id]);
        if rows.iter().any(|r| r["event"] == "request.completed") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let resolved = rows
        .iter()
        .find(|r| r["event"] == "request.resolved")
        .expect("resolved row");
    let completed = rows
        .iter()
        .find(|r| r["event"] == "request.completed")
        .expect("completed row");
    assert!(resolved["seq"].as_u64() < completed["seq"].as_u64());
    for r in [resolved, completed] {
        assert_eq!(r["tenant"], "acme");
        assert_eq!(r["target"], "openai");
        assert_eq!(r["model"], "gpt-4o-mini");
        assert_eq!(r["capability"], "chat");
        assert_eq!(r["credential_id"], cred.as_str());
        assert_eq!(r["credential_version"], 1);
        assert!(r["client_id"].as_str().unwrap().starts_with("cli_"));
        assert!(r["peer_uid"].is_u64() && r["peer_pid"].is_u64(), "{r}");
    }
    assert_eq!(completed["upstream_status"], 200);
    assert_eq!(completed["bytes_in"], body.len());
    assert!(completed["bytes_out"].as_u64().unwrap() > 0);
    assert!(
        completed["input_tokens"].as_u64().unwrap() > 0,
        "usage from the final SSE event: {completed}"
    );
    assert!(completed["output_tokens"].as_u64().is_some());
    assert_eq!(completed["fingerprint"].as_str().unwrap().len(), 64);

    let db = d.all_state_bytes();
    assert!(!contains(&db, &key), "provider key in a state file");
    assert!(!contains(&db, &token), "client token in a state file");
    assert!(!contains(&db, &marker), "payload in a state file");
    assert!(contains(&db, &call_id), "sanity: the call id is stored");
}

#[tokio::test(flavor = "multi_thread")]
async fn payload_file_finds_exactly_the_calls_that_sent_it() {
    let mock = MockUpstream::builder().start().await;
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::builder()
        .config(&config(&mock, dir.path(), ""))
        .start();
    let (token, _) = d.provision("acme", "openai", &random_key("sk-"), &[]);
    let (token_b, _) = d.provision("other", "openai", &random_key("sk-"), &[]);
    let sent = chat_body("gpt-4o", false).replace("hi", "the prompt under investigation");
    let mut ids = Vec::new();
    for _ in 0..2 {
        let (_, h, _) = call_as(&d.socket(), &token, "/openai/v1/chat/completions", &sent).await;
        ids.push(h["keyward-call-id"].to_str().unwrap().to_string());
    }
    call_as(
        &d.socket(),
        &token,
        "/openai/v1/chat/completions",
        &chat_body("gpt-4o", false),
    )
    .await;
    call(
        &d.socket(),
        post(
            "/openai/v1/chat/completions",
            &[("authorization", &format!("Bearer {token_b}"))],
            &sent,
        ),
    )
    .await;
    let file = dir.path().join("payload.json");
    std::fs::write(&file, &sent).unwrap();
    let rows = events(
        &d,
        &["--tenant", "acme", "--payload-file", file.to_str().unwrap()],
    );
    let mut found: Vec<String> = rows
        .iter()
        .map(|r| r["call_id"].as_str().unwrap().to_string())
        .collect();
    found.sort();
    found.dedup();
    ids.sort();
    assert_eq!(
        found, ids,
        "exactly the two calls of tenant acme that sent this payload"
    );
    std::fs::write(&file, format!("{sent} ")).unwrap();
    assert!(
        events(
            &d,
            &["--tenant", "acme", "--payload-file", file.to_str().unwrap()]
        )
        .is_empty()
    );
    let out = d.cli(&["audit", "query", "--payload-file", file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("needs --tenant"));
}

#[test]
fn verify_detects_an_edited_row_and_truncation_through_the_cli() {
    let d = Daemon::builder().start();
    for i in 0..5 {
        d.ok(&["tenant", "add", &format!("t{i}")]);
    }
    assert!(d.ok(&["audit", "verify"]).contains("ok: 5 rows checked"));
    let db = rusqlite::Connection::open(d.home.join("audit.db")).unwrap();
    db.execute(
        "UPDATE audit_events SET tenant = 'mallory' WHERE seq = 3",
        [],
    )
    .unwrap();
    let out = d.cli(&["audit", "verify"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("seq 3"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    db.execute("UPDATE audit_events SET tenant = 't2' WHERE seq = 3", [])
        .unwrap();
    assert_eq!(d.cli(&["audit", "verify"]).status.code(), Some(0));
    db.execute("DELETE FROM audit_events WHERE seq >= 4", [])
        .unwrap();
    let out = d.cli(&["audit", "verify"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "truncating the newest rows must be detected"
    );
}

#[test]
fn lifecycle_replays_creation_rotation_and_revocation() {
    let d = Daemon::builder().start();
    d.ok(&["tenant", "add", "acme"]);
    let out = d.ok_stdin(
        &[
            "cred", "add", "--tenant", "acme", "--target", "openai", "--name", "k", "--json",
        ],
        random_key("sk-").as_bytes(),
    );
    let id = serde_json::from_str::<serde_json::Value>(out.trim()).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    d.ok_stdin(&["cred", "rotate", &id], random_key("sk-").as_bytes());
    d.ok(&["cred", "revoke", &id]);
    let rows = d.json_lines(&["audit", "lifecycle", &id]);
    let kinds: Vec<&str> = rows.iter().map(|r| r["event"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        [
            "credential.created",
            "credential.rotated",
            "credential.revoked",
            "credential.revoked"
        ]
    );
    let table = d.ok(&["audit", "lifecycle", &id]);
    assert!(table.contains("credential.rotated"));
    let out = d.cli(&["audit", "lifecycle", "cred_unknown"]);
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn retention_prunes_old_rows_and_what_remains_still_verifies() {
    let mut d = Daemon::builder().start();
    for i in 0..4 {
        d.ok(&["tenant", "add", &format!("old{i}")]);
    }
    let home = d.home.clone();
    assert_eq!(d.terminate(), Some(0));
    std::thread::sleep(Duration::from_millis(2200));
    let d2 = Daemon::builder()
        .home(&home)
        .config("audit_retention = \"2s\"\n")
        .start();
    d2.ok(&["tenant", "add", "fresh"]);
    let rows = d2.json_lines(&["audit", "query"]);
    assert!(
        rows.iter().all(|r| r["tenant"] != "old0"),
        "old rows were not pruned: {rows:?}"
    );
    assert!(rows.iter().any(|r| r["tenant"] == "fresh"));
    assert_eq!(
        d2.cli(&["audit", "verify"]).status.code(),
        Some(0),
        "{}",
        d2.ok(&["audit", "query"])
    );
    drop(d);
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_under_load_loses_no_resolved_row_and_the_trail_still_verifies() {
    let mock = MockUpstream::builder().start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::builder()
        .config(&config(&mock, dir.path(), ""))
        .start();
    let (token, _) = d.provision("acme", "openai", &random_key("sk-"), &[]);
    let answered = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (socket, token, answered, stop) =
            (d.socket(), token.clone(), answered.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let req = post(
                    "/openai/v1/chat/completions",
                    &[("authorization", &bearer(&token))],
                    &chat_body("gpt-4o", false),
                );
                let Ok(stream) = tokio::net::UnixStream::connect(&socket).await else {
                    break;
                };
                let Ok((mut sender, conn)) =
                    hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                        .await
                else {
                    break;
                };
                tokio::spawn(conn);
                match sender.send_request(req).await {
                    Ok(resp) => {
                        if let Some(id) = resp.headers().get("keyward-call-id") {
                            answered
                                .lock()
                                .unwrap()
                                .push(id.to_str().unwrap().to_string());
                        }
                    }
                    Err(_) => break,
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    d.kill9();
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    let answered = answered.lock().unwrap().clone();
    assert!(
        answered.len() > 20,
        "load too light to mean anything: {}",
        answered.len()
    );
    for db in ["audit.db", "keyward.db"] {
        let conn = rusqlite::Connection::open(d.home.join(db)).unwrap();
        let check: String = conn
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .unwrap();
        assert_eq!(check, "ok", "{db}");
    }
    let home = d.home.clone();
    let d2 = Daemon::builder()
        .home(&home)
        .config(&config(&mock, dir.path(), ""))
        .start();
    let resolved: std::collections::HashSet<String> = events(&d2, &["--event", "request.resolved"])
        .iter()
        .map(|r| r["call_id"].as_str().unwrap().to_string())
        .collect();
    let missing: Vec<&String> = answered
        .iter()
        .filter(|id| !resolved.contains(*id))
        .collect();
    assert!(
        missing.is_empty(),
        "{} answered requests have no request.resolved row",
        missing.len()
    );
    let out = d2.cli(&["audit", "verify"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(d);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_upstream_failure_after_resolution_completes_the_call_instead_of_denying_it() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let toml = format!(
        "[targets.closed]\nbase_url = \"https://{closed}\"\nauth_header = \"authorization\"\nauth_format = \"Bearer {{key}}\"\nfamily = \"openai\"\n"
    );
    let d = Daemon::builder().config(&toml).start();
    // A key past its (warn-only) age: the completed row must carry the flag like a served one.
    d.ok(&[
        "tenant",
        "add",
        "acme",
        "--max-key-age",
        "1s",
        "--on-expiry",
        "warn",
    ]);
    let (token, cred) = d.provision("acme", "closed", &random_key("sk-"), &[]);
    tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
    let (status, h, _) = call_as(
        &d.socket(),
        &token,
        "/closed/v1/chat/completions",
        &chat_body("m", false),
    )
    .await;
    assert_eq!(status, 502);
    let call_id = h["keyward-call-id"].to_str().unwrap().to_string();
    let rows = events(&d, &["--call-id", &call_id]);
    let kinds: Vec<&str> = rows
        .iter()
        .rev()
        .map(|r| r["event"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["request.resolved", "request.completed"], "{rows:?}");
    let completed = &rows[0];
    assert_eq!(completed["credential_id"], cred.as_str());
    assert_eq!(completed["flags"], serde_json::json!(["expired_key_warn"]));
    assert!(
        completed["detail"]
            .as_str()
            .unwrap()
            .starts_with("upstream_unreachable"),
        "{completed}"
    );
    assert!(completed["upstream_status"].is_null());
}

//! `keyward cred test ID` and `cred add --test` with the real binary: one read-only call (the
//! target's models list) with one pinned credential version, made through the data plane
//! against the TLS mock provider, audited as an operator test; what the CLI prints and exits
//! with, what the admin API answers, and that the key appears in none of it.

mod support;

use serde_json::Value;
use support::daemon::{Daemon, admin_http, contains, random_key};
use support::mock_upstream::{Reply, key_of};

/// A daemon whose `openai` target is the mock.
async fn setup() -> support::Setup {
    support::setup(&["openai"], "").await
}

/// Everything the CLI printed in these tests, for [`no_key_anywhere`] (keys are random, so
/// one test's keys are never in another's output).
static PRINTED: std::sync::Mutex<String> = std::sync::Mutex::new(String::new());

/// Runs the CLI, keeping what it printed.
fn cli(d: &Daemon, args: &[&str], stdin: Option<&[u8]>) -> std::process::Output {
    let out = d.cli_stdin(args, stdin);
    let mut printed = PRINTED.lock().unwrap();
    printed.push_str(&String::from_utf8_lossy(&out.stdout));
    printed.push_str(&String::from_utf8_lossy(&out.stderr));
    out
}

/// `cred test ID --json`: (exit code, the answer, stderr).
fn test_json(d: &Daemon, args: &[&str]) -> (i32, Value, String) {
    let mut all = vec!["cred", "test"];
    all.extend_from_slice(args);
    all.push("--json");
    let out = cli(d, &all, None);
    let stdout = String::from_utf8(out.stdout).unwrap();
    let answer = serde_json::from_str(stdout.trim()).unwrap_or(Value::Null);
    (
        out.status.code().unwrap(),
        answer,
        String::from_utf8(out.stderr).unwrap(),
    )
}

/// The audit rows of one call, oldest first.
fn call_rows(d: &Daemon, call_id: &str) -> Vec<Value> {
    let mut rows = d.json_lines(&["audit", "query", "--call-id", call_id]);
    rows.sort_by_key(|r| r["seq"].as_u64());
    rows
}

/// Adds a credential for `openai` to tenant `acme` (which must exist); returns its id.
fn add(d: &Daemon, key: &str, priority: &str) -> String {
    let name = format!("key-{}", &random_key("")[..8]);
    let out = d.ok_stdin(
        &[
            "cred",
            "add",
            "--tenant",
            "acme",
            "--target",
            "openai",
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

#[tokio::test(flavor = "multi_thread")]
async fn cred_test_calls_the_models_list_with_that_key_and_audits_an_operator_test() {
    let s = setup().await;
    let d = &s.daemon;
    let key = random_key("sk-proj-");
    let (_, id) = d.provision("acme", "openai", &key, &[]);

    // The table for people.
    let out = cli(d, &["cred", "test", &id], None);
    let stdout = String::from_utf8(out.stdout).unwrap();
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(
        stdout.contains(&format!("tested   {id}/v1 (sk-p")),
        "{stdout}"
    );
    assert!(
        stdout.contains("on target openai: GET /v1/models"),
        "{stdout}"
    );
    assert!(
        stdout.contains("status   200 from the provider"),
        "{stdout}"
    );
    assert!(stdout.contains("latency  "), "{stdout}");
    assert!(
        stdout.contains("result   the provider accepted the key"),
        "{stdout}"
    );
    let upstream = s.mock.last_request().unwrap();
    assert_eq!(upstream.method, http::Method::GET);
    assert_eq!(upstream.path(), "/v1/models");
    assert_eq!(key_of(&upstream).as_deref(), Some(key.as_str()));

    // The same as JSON, with the call id to find its audit rows.
    let (code, answer, _) = test_json(d, &[&id]);
    assert_eq!(code, 0);
    assert_eq!(answer["id"], id.as_str());
    assert_eq!(answer["version"], 1);
    assert_eq!(answer["status"], 200);
    assert_eq!(answer["ok"], true);
    assert_eq!(answer["target"], "openai");
    assert_eq!(answer["request"], "GET /v1/models");
    assert!(answer["error"].is_null(), "{answer}");
    assert!(answer["latency_ms"].is_u64(), "{answer}");
    let call_id = answer["call_id"].as_str().unwrap();
    let rows = call_rows(d, call_id);
    let events: Vec<&str> = rows.iter().map(|r| r["event"].as_str().unwrap()).collect();
    assert_eq!(
        events,
        ["request.resolved", "request.completed"],
        "{rows:?}"
    );
    for row in &rows {
        // An operator test, never mistaken for an app call.
        assert_eq!(row["client_id"], "operator", "{row}");
        assert!(
            row["flags"]
                .as_array()
                .is_some_and(|f| f.iter().any(|f| f == "operator_test")),
            "{row}"
        );
        assert_eq!(row["tenant"], "acme");
        assert_eq!(row["target"], "openai");
        assert_eq!(row["capability"], "models");
        assert_eq!(row["credential_id"], id.as_str());
        assert_eq!(row["credential_version"], 1);
        assert_eq!(row["peer_uid"], nix::unistd::getuid().as_raw(), "{row}");
    }
    assert!(
        rows[0]["detail"]
            .as_str()
            .is_some_and(|d| d.contains("operator test call (keyward cred test)")),
        "{}",
        rows[0]
    );
    assert_eq!(rows[1]["upstream_status"], 200);
    assert!(rows[1]["bytes_out"].as_u64().unwrap() > 0, "{}", rows[1]);
    // The credential's history shows the calls it served.
    let lifecycle = d.json_lines(&["audit", "lifecycle", &id]);
    assert!(
        lifecycle
            .iter()
            .any(|r| r["call_id"] == call_id && r["event"] == "request.completed"),
        "{lifecycle:?}"
    );

    // After a rotation the current version is tested; the overlapping one on request.
    let rotated = random_key("sk-proj-");
    d.ok_stdin(&["cred", "rotate", &id], rotated.as_bytes());
    let (code, answer, _) = test_json(d, &[&id]);
    assert_eq!((code, answer["version"].as_u64()), (0, Some(2)), "{answer}");
    assert_eq!(
        key_of(&s.mock.last_request().unwrap()).as_deref(),
        Some(rotated.as_str())
    );
    let (code, answer, _) = test_json(d, &[&id, "--version", "1"]);
    assert_eq!((code, answer["version"].as_u64()), (0, Some(1)), "{answer}");
    assert_eq!(
        key_of(&s.mock.last_request().unwrap()).as_deref(),
        Some(key.as_str())
    );
    let (code, _, stderr) = test_json(d, &[&id, "--version", "7"]);
    assert_eq!(code, 1);
    assert!(
        stderr.contains(&format!("no credential {id} version 7")),
        "{stderr}"
    );

    audit_verifies(d);
    no_key_anywhere(d, &[&key, &rotated]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refused_key_names_its_version_exits_1_and_is_kept_without_failover() {
    let s = setup().await;
    let d = &s.daemon;
    let good = random_key("sk-proj-");
    let (token, good_id) = d.provision("acme", "openai", &good, &["--priority", "2"]);
    let bad = random_key("sk-proj-");
    let bad_id = add(d, &bad, "1");
    s.mock.set_key_reply(
        &bad,
        Reply::status(401).body(
            r#"{"error":{"message":"Incorrect API key provided","type":"invalid_request_error"}}"#,
        ),
    );

    let before = s.mock.request_count();
    let out = cli(d, &["cred", "test", &bad_id], None);
    let stdout = String::from_utf8(out.stdout).unwrap();
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    let first_call = stdout
        .lines()
        .find_map(|l| l.strip_prefix("call id  "))
        .unwrap()
        .trim()
        .to_string();
    let first_call = first_call.as_str();
    assert!(
        stdout.contains(&format!("tested   {bad_id}/v1")),
        "{stdout}"
    );
    assert!(
        stdout.contains("status   401 from the provider"),
        "{stdout}"
    );
    assert!(
        stderr
            .contains("its test failed: the provider refused the key (401): it is wrong, revoked"),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("keyward cred rotate {bad_id}")),
        "{stderr}"
    );
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    // One call, with the pinned key only: a test does not fail over to the good key.
    assert_eq!(s.mock.request_count(), before + 1);
    assert_eq!(
        key_of(&s.mock.last_request().unwrap()).as_deref(),
        Some(bad.as_str())
    );

    let (code, answer, _) = test_json(d, &[&bad_id]);
    assert_eq!(code, 1);
    assert_eq!(answer["status"], 401);
    assert_eq!(answer["ok"], false);
    assert_eq!(answer["id"], bad_id.as_str());
    assert_eq!(answer["version"], 1);
    let call_id = answer["call_id"].as_str().unwrap();
    let rows = call_rows(d, call_id);
    assert!(
        !rows.iter().any(|r| r["event"] == "request.failover"),
        "{rows:?}"
    );
    let completed = rows
        .iter()
        .find(|r| r["event"] == "request.completed")
        .unwrap_or_else(|| panic!("{rows:?}"));
    assert_eq!(completed["upstream_status"], 401);
    assert_eq!(completed["credential_id"], bad_id.as_str());
    assert_eq!(completed["credential_version"], 1);

    // The credential is kept, quarantined in the pool as an app call's 401 would leave it,
    // and the quarantine is audited as part of the operator's test.
    let listed = d.json_lines(&["cred", "list", "--tenant", "acme"]);
    assert!(
        listed
            .iter()
            .any(|c| c["id"] == bad_id && c["state"] == "quarantined"),
        "{listed:?}"
    );
    let quarantined = rows
        .iter()
        .chain(call_rows(d, first_call).iter())
        .filter(|r| r["event"] == "credential.quarantined")
        .cloned()
        .collect::<Vec<_>>();
    assert!(
        quarantined
            .iter()
            .any(|r| r["credential_id"] == bad_id.as_str()
                && r["flags"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|f| f == "operator_test")),
        "{rows:?}"
    );
    let (status, headers, _) = support::uds::call(
        &d.socket(),
        support::uds::post(
            "/openai/v1/chat/completions",
            &[("authorization", &support::uds::bearer(&token))],
            &support::uds::chat_body("gpt-4o-mini", false),
        ),
    )
    .await;
    assert_eq!(status, 200);
    assert!(
        headers["keyward-credential"]
            .to_str()
            .unwrap()
            .starts_with(&good_id)
    );

    audit_verifies(d);
    no_key_anywhere(d, &[&good, &bad]);
}

#[tokio::test(flavor = "multi_thread")]
async fn cred_add_test_reports_both_and_a_failed_test_keeps_the_credential() {
    let s = setup().await;
    let d = &s.daemon;
    d.ok(&["tenant", "add", "acme"]);
    let add_test = |key: &str, name: &str, json: bool| {
        let mut args = vec![
            "cred", "add", "--tenant", "acme", "--target", "openai", "--name", name, "--test",
        ];
        if json {
            args.push("--json");
        }
        cli(d, &args, Some(key.as_bytes()))
    };

    let good = random_key("sk-proj-");
    let out = add_test(&good, "good", false);
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("id       cred_"), "{stdout}");
    assert!(
        stdout.contains("status   200 from the provider"),
        "{stdout}"
    );
    assert!(stdout.contains("call id  "), "{stdout}");
    assert_eq!(
        key_of(&s.mock.last_request().unwrap()).as_deref(),
        Some(good.as_str())
    );

    // A key the provider refuses: added, kept, and the command says so and exits 1.
    let bad = random_key("sk-proj-");
    s.mock.set_key_reply(&bad, Reply::status(403));
    let out = add_test(&bad, "bad", true);
    let stdout = String::from_utf8(out.stdout).unwrap();
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    let lines: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    let id = lines[0]["id"].as_str().unwrap();
    assert_eq!(lines[1]["id"], id);
    assert_eq!(lines[1]["status"], 403);
    assert_eq!(lines[1]["ok"], false);
    assert!(
        stderr.contains(&format!(
            "credential {id} was added and is kept, but its test failed: the provider refused \
             the key (403)"
        )),
        "{stderr}"
    );
    let listed = d.json_lines(&["cred", "list"]);
    assert!(
        listed.iter().any(|c| c["id"] == id && c["name"] == "bad"),
        "{listed:?}"
    );
    no_key_anywhere(d, &[&good, &bad]);
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_and_revoked_credentials_are_refused_clearly_over_the_cli_and_the_api() {
    let s = setup().await;
    let d = &s.daemon;
    let key = random_key("sk-proj-");
    let (_, id) = d.provision("acme", "openai", &key, &[]);
    let before = s.mock.request_count();

    let out = cli(d, &["cred", "test", "cred_nope"], None);
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr.contains("no credential cred_nope; see `keyward cred list`"),
        "{stderr}"
    );
    let (status, body) = admin_http(
        &d.admin_socket(),
        "POST",
        "/v1/credentials/cred_nope/test",
        "",
    );
    assert_eq!(status, 404, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"]["type"], "keyward.not_found");

    // The API answer: typed, with the preview and never the key.
    let (status, body) = admin_http(
        &d.admin_socket(),
        "POST",
        &format!("/v1/credentials/{id}/test"),
        "{}",
    );
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["status"], 200);
    assert_eq!(v["preview"].as_str().unwrap().chars().count(), 9, "{v}");
    assert!(
        !body.contains(&key) && !body.contains(&key[8..20]),
        "{body}"
    );
    let (status, body) = admin_http(
        &d.admin_socket(),
        "POST",
        &format!("/v1/credentials/{id}/test"),
        r#"{"model":"x"}"#,
    );
    assert_eq!(status, 400, "{body}");

    d.ok(&["cred", "revoke", &id]);
    let out = cli(d, &["cred", "test", &id], None);
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr.contains(&format!(
            "credential {id} is revoked; there is nothing to test"
        )),
        "{stderr}"
    );
    // Only the one successful test reached the provider.
    assert_eq!(s.mock.request_count(), before + 1);
    no_key_anywhere(d, &[&key]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_test_call_counts_against_the_tenants_rate_limit_and_says_when_it_is_refused() {
    let s = setup().await;
    let d = &s.daemon;
    let key = random_key("sk-proj-");
    let (_, id) = d.provision("acme", "openai", &key, &[]);
    d.ok(&["limit", "set", "--tenant", "acme", "--rpm", "1"]);
    let (code, answer, _) = test_json(d, &[&id]);
    assert_eq!(
        (code, answer["status"].as_u64()),
        (0, Some(200)),
        "{answer}"
    );
    let before = s.mock.request_count();
    let (code, answer, stderr) = test_json(d, &[&id]);
    assert_eq!(code, 1, "{answer}");
    assert!(answer["status"].is_null(), "{answer}");
    assert_eq!(answer["error"], "rate_limited", "{answer}");
    assert!(
        stderr.contains("its test failed: keyward could not complete the call (rate_limited)"),
        "{stderr}"
    );
    assert_eq!(
        s.mock.request_count(),
        before,
        "a refused test reached the provider"
    );
    // The admitted test is spend of the tenant, under the client `operator` (a models list
    // reports no tokens, so it costs nothing).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        let rows = d.json_lines(&["spend", "--tenant", "acme", "--by", "client"]);
        if let Some(row) = rows.iter().find(|r| r["client"] == "operator") {
            assert_eq!(
                (row["calls"].as_u64(), row["cost_micros"].as_u64()),
                (Some(1), Some(0))
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no operator spend row: {rows:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    // The refusal is audited like an app's, as an operator test.
    let rows = call_rows(d, answer["call_id"].as_str().unwrap());
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0]["event"], "request.denied");
    assert_eq!(rows[0]["client_id"], "operator");
}

fn audit_verifies(d: &Daemon) {
    let out = d.cli(&["audit", "verify"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// No key in the daemon's output, its state files, or any audit row.
fn no_key_anywhere(d: &Daemon, keys: &[&str]) {
    let audit = d.ok(&["audit", "query", "--limit", "100000", "--json"]);
    let listing = d.ok(&["cred", "list", "--json"]);
    let state = d.all_state_bytes();
    for key in keys {
        for (what, text) in [
            ("daemon stdout", d.stdout()),
            ("daemon stderr", d.stderr()),
            ("audit", audit.clone()),
            ("cred list", listing.clone()),
            ("CLI output", PRINTED.lock().unwrap().clone()),
        ] {
            assert!(!text.contains(key), "key in {what}");
        }
        assert!(!contains(&state, key), "key in the state directory");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn each_family_is_tested_with_its_own_models_list_and_auth_header() {
    let s = support::setup(&["anthropic", "gemini"], "").await;
    let d = &s.daemon;
    let anthropic = random_key("sk-ant-");
    let (_, anthropic_id) = d.provision("acme", "anthropic", &anthropic, &[]);
    let gemini = random_key("AIza");
    let (_, gemini_id) = d.provision("acme", "gemini", &gemini, &[]);

    let (code, answer, _) = test_json(d, &[&anthropic_id]);
    assert_eq!(
        (code, answer["status"].as_u64()),
        (0, Some(200)),
        "{answer}"
    );
    let seen = s.mock.last_request().unwrap();
    assert_eq!(seen.path_and_query, "/v1/models");
    assert_eq!(seen.header("x-api-key"), Some(anthropic.as_str()));
    assert_eq!(seen.header("anthropic-version"), Some("2023-06-01"));

    let (code, answer, _) = test_json(d, &[&gemini_id]);
    assert_eq!(
        (code, answer["status"].as_u64()),
        (0, Some(200)),
        "{answer}"
    );
    assert_eq!(answer["request"], "GET /v1beta/models?pageSize=1");
    let seen = s.mock.last_request().unwrap();
    assert_eq!(seen.path_and_query, "/v1beta/models?pageSize=1");
    assert_eq!(seen.header("x-goog-api-key"), Some(gemini.as_str()));
    // The key goes in its header only, never in the query.
    assert!(!seen.path_and_query.contains(&gemini));
    no_key_anywhere(d, &[&anthropic, &gemini]);
}

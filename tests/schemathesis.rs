//! The admin API against its own OpenAPI document, by schemathesis (property-based API
//! testing): generated requests for every operation must never get a 5xx, every answer must
//! match the document's schema, and no answer may hold a provider key — neither the ones the
//! daemon was seeded with nor any the run itself sent.
//!
//! schemathesis runs from the venv `.ci/run` makes (`target/schemathesis-venv`) and reaches the
//! Unix socket through `socat` (TCP on loopback → the admin socket; socat runs as our uid, so
//! the peer-uid check admits it).

mod support;

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::daemon::{Daemon, random_key};
use support::needs;

const SCHEMATHESIS: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/target/schemathesis-venv/bin/schemathesis"
);

/// Kills the relay when the test ends, however it ends.
struct Relay(Child);

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn generated_requests_get_no_server_error_match_the_schema_and_never_see_a_key() {
    let name = "generated_requests_get_no_server_error_match_the_schema_and_never_see_a_key";
    if !needs::program(name, "socat", "-V") || !needs::program(name, SCHEMATHESIS, "--version") {
        return;
    }
    let d = Daemon::builder().start();
    // Seed: tenants, clients and credentials with random keys, one rotated.
    let mut keys = Vec::new();
    let mut ids = Vec::new();
    for tenant in ["acme", "globex"] {
        let key = random_key("sk-proj-");
        let (_, id) = d.provision(tenant, "openai", &key, &[]);
        keys.push(key);
        ids.push(id);
    }
    let rotated = random_key("sk-ant-");
    d.ok_stdin(&["cred", "rotate", &ids[0]], rotated.as_bytes());
    keys.push(rotated);

    let port = free_port();
    let relay = Relay(
        Command::new("socat")
            .arg(format!("TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork"))
            .arg(format!("UNIX-CONNECT:{}", d.admin_socket().display()))
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let started = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "socat did not listen"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let reports = tempfile::tempdir().unwrap();
    let har = reports.path().join("run.har");
    let out = Command::new(SCHEMATHESIS)
        .args(["run", &format!("http://127.0.0.1:{port}/v1/openapi.json")])
        .args([
            "--checks",
            "not_a_server_error,response_schema_conformance",
            "--max-examples",
            "25",
            "--seed",
            "20261130",
            "--workers",
            "1",
            "--request-timeout",
            "30",
            "--report",
            "har",
        ])
        .arg("--report-har-path")
        .arg(&har)
        .env("SCHEMATHESIS_HOOKS", "")
        .env("NO_COLOR", "1")
        .current_dir(reports.path())
        .output()
        .unwrap();
    drop(relay);
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!(
        "schemathesis took {:?}:\n{}",
        started.elapsed(),
        stdout
            .lines()
            .filter(|l| !l.trim().is_empty())
            .rev()
            .take(30)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(
        out.status.success(),
        "schemathesis found failures:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Every answer the run recorded.
    let har: Value = serde_json::from_slice(&std::fs::read(&har).unwrap()).unwrap();
    let entries = har["log"]["entries"].as_array().unwrap();
    assert!(
        entries.len() > 100,
        "only {} requests were made",
        entries.len()
    );
    let mut sent_secrets = Vec::new();
    let mut answers = String::new();
    for e in entries {
        let response = &e["response"];
        answers.push_str(response["content"]["text"].as_str().unwrap_or(""));
        for h in response["headers"].as_array().into_iter().flatten() {
            answers.push_str(h["value"].as_str().unwrap_or(""));
        }
        // Secrets the run sent that the daemon accepted (a created or rotated credential).
        let status = response["status"].as_u64().unwrap_or(0);
        let body = e["request"]["postData"]["text"].as_str().unwrap_or("");
        if (200..300).contains(&status)
            && let Ok(sent) = serde_json::from_str::<Value>(body)
            && let Some(secret) = sent["secret"].as_str()
        {
            // A secret that is also the name or another field of the same request is
            // echoed as that field, not leaked.
            let elsewhere = sent
                .as_object()
                .unwrap()
                .iter()
                .any(|(k, v)| k != "secret" && v.to_string().contains(secret));
            if secret.len() >= 9 && !elsewhere {
                sent_secrets.push(secret.to_string());
            }
        }
    }
    // The document's examples alone make the run add at least one credential.
    assert!(!sent_secrets.is_empty(), "the run added no credential");
    for key in keys.iter().chain(&sent_secrets) {
        assert!(
            !answers.contains(key.as_str()),
            "an answer holds a provider key"
        );
    }
    eprintln!(
        "{} requests; no answer held any of {} seeded and {} generated accepted keys",
        entries.len(),
        keys.len(),
        sent_secrets.len()
    );
}

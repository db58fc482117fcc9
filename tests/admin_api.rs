//! The admin API over its Unix socket: driven with the real `curl --unix-socket`, raw HTTP and
//! the CLI against the real daemon.

mod support;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::daemon::{Daemon, admin_http, random_key};
use support::needs;

/// `curl --unix-socket SOCKET http://keyward{path}` with extra args: (status, headers, body).
fn curl(d: &Daemon, args: &[&str], path: &str) -> (u16, String, String) {
    let out = Command::new("curl")
        .args(["-sS", "-i", "--unix-socket"])
        .arg(d.admin_socket())
        .args(args)
        .arg(format!("http://keyward{path}"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "curl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, head.to_ascii_lowercase(), body.to_string())
}

#[test]
fn curl_manages_tenants_credentials_and_clients_and_no_answer_holds_a_key() {
    if !needs::program(
        "curl_manages_tenants_credentials_and_clients_and_no_answer_holds_a_key",
        "curl",
        "--version",
    ) {
        return;
    }
    let d = Daemon::builder().start();
    let json = ["-H", "content-type: application/json", "-d"];
    let mut answers = String::new();
    let mut call = |args: &[&str], path: &str| {
        let (status, head, body) = curl(&d, args, path);
        answers.push_str(&head);
        answers.push_str(&body);
        (status, head, body)
    };
    let (status, head, body) = call(
        &[&json[..], &[r#"{"name":"acme"}"#]].concat(),
        "/v1/tenants",
    );
    assert_eq!(status, 201, "{body}");
    assert!(head.contains("content-type: application/json"), "{head}");
    let tenant: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(tenant["name"], "acme");
    assert!(tenant["id"].as_str().unwrap().starts_with("ten_"));

    let key = random_key("sk-proj-");
    let new =
        serde_json::json!({"tenant": "acme", "target": "openai", "name": "main", "secret": key});
    let (status, _, body) = call(
        &[&json[..], &[&new.to_string()]].concat(),
        "/v1/credentials",
    );
    assert_eq!(status, 201, "{body}");
    let cred: Value = serde_json::from_str(&body).unwrap();
    let id = cred["id"].as_str().unwrap().to_string();
    assert_eq!(
        cred["preview"],
        format!("{}…{}", &key[..4], &key[key.len() - 4..])
    );

    // The listing curl sees is the one the CLI prints with --json.
    let (status, _, body) = call(&[], "/v1/credentials");
    assert_eq!(status, 200);
    let listed: Vec<Value> = serde_json::from_str(&body).unwrap();
    assert_eq!(listed, d.json_lines(&["cred", "list"]));
    assert_eq!(listed[0]["id"], id.as_str());
    assert_eq!(listed[0]["state"], "current");

    let rotated_key = random_key("sk-proj-");
    let rotate = serde_json::json!({"secret": rotated_key, "overlap_s": 60});
    let (status, _, body) = call(
        &[&json[..], &[&rotate.to_string()]].concat(),
        &format!("/v1/credentials/{id}/rotate"),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["version"], 2);
    // A secret that is not a provider key is the request's fault (400), whatever the state.
    let spaced = serde_json::json!({"secret": format!("{} x", random_key("sk-"))});
    let (status, _, body) = call(
        &[&json[..], &[&spaced.to_string()]].concat(),
        &format!("/v1/credentials/{id}/rotate"),
    );
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("at position"), "{body}");
    // An overlap past any calendar is refused, not added to the clock.
    let absurd = serde_json::json!({"secret": random_key("sk-"), "overlap_s": i64::MAX});
    let (status, _, body) = call(
        &[&json[..], &[&absurd.to_string()]].concat(),
        &format!("/v1/credentials/{id}/rotate"),
    );
    assert_eq!(status, 400, "{body}");

    let (status, _, body) = call(
        &[&json[..], &[r#"{"tenant":"acme","name":"app"}"#]].concat(),
        "/v1/clients",
    );
    assert_eq!(status, 201, "{body}");
    let client: Value = serde_json::from_str(&body).unwrap();
    assert!(client["token"].as_str().unwrap().starts_with("kw_"));
    let (status, _, body) = call(&[], "/v1/clients?tenant=acme");
    assert_eq!(status, 200);
    assert!(!body.contains(client["token"].as_str().unwrap()), "{body}");

    // Audit through the query string.
    let (status, _, body) = call(
        &[],
        &format!("/v1/audit/events?credential={id}&event=credential.rotated"),
    );
    assert_eq!(status, 200, "{body}");
    let rows: Vec<Value> = serde_json::from_str(&body).unwrap();
    assert_eq!(rows.len(), 1, "{body}");
    assert_eq!(rows[0]["credential_version"], 2);
    let (status, _, body) = call(&[], "/v1/audit/verify");
    assert_eq!(status, 200);
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["ok"], true);
    let (status, _, body) = call(&[], &format!("/v1/audit/lifecycle/{id}"));
    assert_eq!(status, 200);
    assert!(serde_json::from_str::<Vec<Value>>(&body).unwrap().len() >= 2);

    // Revoke one version, then delete.
    let (status, _, body) = call(
        &[&json[..], &[r#"{"version":1}"#]].concat(),
        &format!("/v1/credentials/{id}/revoke"),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["revoked_versions"],
        serde_json::json!([1])
    );
    let (status, _, body) = call(&["-X", "DELETE"], &format!("/v1/credentials/{id}"));
    assert_eq!(status, 200, "{body}");

    // Errors: the data plane's shape, a keyward-error header, the right status.
    let (status, head, body) = call(&["-X", "DELETE"], &format!("/v1/credentials/{id}"));
    assert_eq!(status, 404, "{body}");
    assert!(head.contains("keyward-error: not_found"), "{head}");
    let e: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(e["error"]["type"], "keyward.not_found");
    assert!(e["error"]["message"].as_str().unwrap().contains(&id));
    let (status, head, _) = call(&["-X", "PUT"], "/v1/tenants");
    assert_eq!(status, 405);
    assert!(head.contains("keyward-error: method_not_allowed"), "{head}");
    let (status, _, body) = call(
        &[&json[..], &[r#"{"name":"acme"}"#]].concat(),
        "/v1/tenants",
    );
    assert_eq!(status, 409, "{body}");
    let (status, _, body) = call(&[], "/v1/credentials?tenant=nobody");
    assert_eq!(status, 404, "{body}");
    let (status, _, body) = call(&[], "/v1/credentials?bogus=1");
    assert_eq!(status, 400, "{body}");
    // A form body (curl -d without a JSON content type) is told what to send.
    let (status, _, body) = call(&["-d", "name=x"], "/v1/tenants");
    assert_eq!(status, 415, "{body}");

    // Metrics and the OpenAPI document.
    let (status, head, body) = call(&[], "/v1/metrics");
    assert_eq!(status, 200);
    assert!(head.contains("content-type: text/plain"), "{head}");
    assert!(body.contains("# TYPE"), "{body}");
    let (status, _, body) = call(&[], "/v1/openapi.json");
    assert_eq!(status, 200);
    assert_eq!(
        body,
        std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/src/admin/openapi.json"
        ))
        .unwrap()
    );

    for secret in [&key, &rotated_key] {
        assert!(!answers.contains(secret.as_str()), "an answer holds a key");
    }
}

#[test]
fn a_daemon_serving_nothing_yet_answers_status_and_empty_lists() {
    let d = Daemon::builder().start();
    let (status, body) = admin_http(&d.admin_socket(), "GET", "/v1/status", "");
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["pid"], d.pid());
    assert_eq!(v["tenants"], 0);
    for path in ["/v1/tenants", "/v1/credentials", "/v1/clients", "/v1/spend"] {
        assert_eq!(
            admin_http(&d.admin_socket(), "GET", path, ""),
            (200, "[]".to_string()),
            "{path}"
        );
    }
    let (status, body) = admin_http(&d.admin_socket(), "GET", "/v1/audit/export", "");
    assert_eq!(
        (status, serde_json::from_str::<Value>(&body).unwrap()),
        (200, serde_json::json!({"enabled": false, "status": null}))
    );
}

#[test]
fn idle_connections_that_never_send_a_request_cannot_lock_operators_out() {
    let d = Daemon::builder().start();
    // More silent connections than the server serves at once.
    let idle: Vec<UnixStream> = (0..40)
        .map(|_| UnixStream::connect(d.admin_socket()).unwrap())
        .collect();
    // The header timeout frees their slots; the operator's command then goes through.
    let started = Instant::now();
    let out = d.cli(&["tenant", "list"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!(
        "served after {:?} behind 40 idle connections",
        started.elapsed()
    );
    // Each idle connection was closed by the server (end of file, not our read timeout).
    for mut s in idle {
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut buf = Vec::new();
        s.read_to_end(&mut buf)
            .expect("the server closes an idle connection");
    }
}

#[test]
fn an_oversized_body_is_refused_with_413() {
    let d = Daemon::builder().start();
    let mut stream = UnixStream::connect(d.admin_socket()).unwrap();
    let size = (64 << 20) + 1;
    let head = format!(
        "POST /v1/audit/search HTTP/1.1\r\nhost: keyward\r\ncontent-type: application/json\r\n\
         content-length: {size}\r\nconnection: close\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).unwrap();
    // Send until the server answers and stops reading.
    let chunk = vec![b' '; 1 << 20];
    for _ in 0..=64 {
        if stream.write_all(&chunk).is_err() {
            break;
        }
    }
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("keyward.body_too_large"), "{answer}");
}

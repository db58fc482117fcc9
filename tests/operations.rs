//! Operator interfaces with the real binary: `/metrics` (checked by `promtool`), `/healthz`,
//! `/readyz` (failing on a full audit file system), and `keyward metrics` over the admin
//! socket.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use support::daemon::{Daemon, random_key};
use support::needs;
use support::uds::{bearer, call, chat_body, post};

/// A loopback port nothing listens on right now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `GET path` on 127.0.0.1:`port`: (status, content type, body).
fn get(port: u16, path: &str) -> (u16, String, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").expect("an HTTP response");
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    let content_type = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-type: ")
                .map(str::to_owned)
        })
        .unwrap_or_default();
    // The answers are small: hyper sends them with a content-length, not chunked.
    (status, content_type, body.to_string())
}

/// The metric family names in Prometheus text (from `# TYPE` lines).
fn families(text: &str) -> std::collections::BTreeSet<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .map(|l| l.split(' ').next().unwrap().to_string())
        .collect()
}

/// The value of the sample whose line starts with `prefix` (name and labels).
fn sample(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_count_requests_tokens_and_keys_and_pass_promtool() {
    const TEST: &str = "metrics_count_requests_tokens_and_keys_and_pass_promtool";
    if !needs::program(TEST, "promtool", "--version") {
        return;
    }
    let port = free_port();
    let s = support::setup(
        &["openai", "anthropic"],
        &format!("metrics_listen = \"127.0.0.1:{port}\""),
    )
    .await;
    let key = random_key("sk-proj-");
    let (token, cred) = s
        .daemon
        .provision("acme", "openai", &key, &["--model", "gpt-4o*"]);
    let mut call_ids = Vec::new();
    for _ in 0..3 {
        let req = post(
            "/openai/v1/chat/completions",
            &[("authorization", &bearer(&token))],
            &chat_body("gpt-4o-mini", false),
        );
        let (status, headers, body) = call(&s.daemon.socket(), req).await;
        assert_eq!(status, 200, "{body}");
        call_ids.push(headers["keyward-call-id"].to_str().unwrap().to_string());
    }
    // A model the app invents must not become a label.
    let invented = format!("made-up-{}", &random_key("")[..12]);
    let req = post(
        "/openai/v1/chat/completions",
        &[("authorization", &bearer(&token))],
        &chat_body(&invented, false),
    );
    assert_eq!(call(&s.daemon.socket(), req).await.0, 403);
    let req = post(
        "/nowhere-target/v1/chat/completions",
        &[("authorization", &bearer(&token))],
        &chat_body("gpt-4o-mini", false),
    );
    assert_eq!(call(&s.daemon.socket(), req).await.0, 404);
    let req = post(
        "/openai/v1/chat/completions",
        &[("authorization", "Bearer kw_not_a_token")],
        "{}",
    );
    assert_eq!(call(&s.daemon.socket(), req).await.0, 401);

    // The completion rows (and token counts) land when the response bodies end.
    let deadline = Instant::now() + Duration::from_secs(10);
    let text = loop {
        let (status, content_type, text) = get(port, "/metrics");
        assert_eq!(status, 200);
        assert!(
            content_type.starts_with("text/plain; version=0.0.4"),
            "{content_type}"
        );
        if sample(
            &text,
            "keyward_tokens_total{target=\"openai\",model=\"gpt-4o*\",direction=\"input\"}",
        )
        .is_some_and(|v| v >= 27.0)
            || Instant::now() > deadline
        {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let expect = |prefix: &str| {
        sample(&text, prefix).unwrap_or_else(|| panic!("no sample {prefix} in\n{text}"))
    };
    assert_eq!(
        expect("keyward_requests_total{target=\"openai\",status=\"200\",error=\"none\"}"),
        3.0
    );
    assert_eq!(
        expect("keyward_requests_total{target=\"openai\",status=\"403\",error=\"scope_denied\"}"),
        1.0
    );
    assert_eq!(
        expect(
            "keyward_requests_total{target=\"unknown\",status=\"404\",error=\"unknown_target\"}"
        ),
        1.0
    );
    assert_eq!(
        expect(
            "keyward_requests_total{target=\"unknown\",status=\"401\",error=\"unauthenticated\"}"
        ),
        1.0
    );
    // The mock reports 9 prompt tokens per call.
    assert_eq!(
        expect("keyward_tokens_total{target=\"openai\",model=\"gpt-4o*\",direction=\"input\"}"),
        27.0
    );
    assert!(
        expect("keyward_tokens_total{target=\"openai\",model=\"gpt-4o*\",direction=\"output\"}")
            > 0.0
    );
    // Shipped prices cover gpt-4o-mini: the calls were priced.
    assert!(expect("keyward_cost_usd_total{target=\"openai\",model=\"gpt-4o*\"}") > 0.0);
    assert_eq!(
        expect("keyward_upstream_response_seconds_count{target=\"openai\"}"),
        3.0
    );
    assert_eq!(
        expect("keyward_overhead_seconds_count{target=\"openai\"}"),
        4.0
    );
    assert!(expect("keyward_audit_commit_seconds_count") >= 3.0);
    assert_eq!(
        expect("keyward_credential_versions{target=\"openai\",state=\"current\"}"),
        1.0
    );
    let age = expect(&format!(
        "keyward_credential_key_age_seconds{{tenant=\"acme\",credential=\"{cred}\",target=\"openai\"}}"
    ));
    assert!((0.0..120.0).contains(&age), "{age}");
    assert!(text.contains(&format!(
        "keyward_build_info{{version=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION")
    )));
    for name in [
        "keyward_requests_in_flight",
        "keyward_audit_queue_depth",
        "keyward_audit_dropped_events_total",
        "keyward_start_time_seconds",
        "keyward_cost_usd_total",
    ] {
        assert!(
            families(&text).contains(name),
            "no family {name} in\n{text}"
        );
    }
    // Bounded labels: no call id, app-invented model, token or key.
    for secret in call_ids.iter().chain([&invented, &token, &key]) {
        assert!(!text.contains(secret.as_str()), "{secret} in /metrics");
    }

    // promtool checks the format and Prometheus naming conventions.
    let mut promtool = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = promtool.wait_with_output().unwrap();
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool check metrics:\n{}{}\n---\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // `keyward metrics` prints the same families over the admin socket.
    let cli = s.daemon.ok(&["metrics"]);
    assert_eq!(families(&cli), families(&text));
    assert!(
        sample(
            &cli,
            "keyward_requests_total{target=\"openai\",status=\"200\",error=\"none\"}"
        ) == Some(3.0),
        "{cli}"
    );

    let (status, _, body) = get(port, "/healthz");
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    let (status, _, body) = get(port, "/readyz");
    assert_eq!(status, 200, "{body}");
    for check in ["store ok", "master_key ok", "audit ok"] {
        assert!(body.contains(check), "{body}");
    }
    assert_eq!(get(port, "/").0, 404);
}

#[test]
fn metrics_are_off_by_default_and_a_bad_address_is_named() {
    let port = free_port();
    let d = Daemon::builder().start();
    assert!(
        !d.stdout().contains("metrics "),
        "metrics announced without metrics_listen:\n{}",
        d.stdout()
    );
    assert!(TcpStream::connect(("127.0.0.1", port)).is_err());
    drop(d);
    let err = Daemon::builder()
        .config("metrics_listen = \"localhost:9464\"")
        .try_start()
        .err()
        .expect("a hostname must be refused");
    assert!(
        err.1.contains("metrics_listen") && err.1.contains("127.0.0.1:9464"),
        "{err:?}"
    );
    // Another address than loopback is the operator's explicit choice, and said so.
    let d = Daemon::builder()
        .config(&format!("metrics_listen = \"0.0.0.0:{port}\""))
        .start();
    assert!(d.stdout().contains("NOT loopback"), "{}", d.stdout());
    assert_eq!(get(port, "/healthz").0, 200);
}

/// A tmpfs mounted for one test, unmounted on drop.
struct Mount(PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// Writes zeros into `path` until the file system is full.
fn fill(path: &Path) {
    let mut f = std::fs::File::create(path).unwrap();
    let block = [0u8; 4096];
    while f.write_all(&block).is_ok() {}
    let _ = f.sync_all();
}

#[tokio::test(flavor = "multi_thread")]
async fn readiness_fails_while_the_audit_file_system_is_full_and_recovers() {
    const TEST: &str = "readiness_fails_while_the_audit_file_system_is_full_and_recovers";
    if !needs::root(TEST) || !needs::program(TEST, "mount", "--version") {
        return;
    }
    let base = tempfile::tempdir().unwrap();
    let state = base.path().join("state");
    std::fs::create_dir(&state).unwrap();
    let status = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=16m,mode=0700", "tmpfs"])
        .arg(&state)
        .status()
        .expect("run mount");
    assert!(
        status.success(),
        "mount -t tmpfs failed although running as root"
    );
    let _mount = Mount(state.clone());

    let port = free_port();
    let s = support::setup(
        &["openai"],
        &format!(
            "metrics_listen = \"127.0.0.1:{port}\"\nstate_dir = \"{}\"",
            state.display()
        ),
    )
    .await;
    let (token, _) = s
        .daemon
        .provision("acme", "openai", &random_key("sk-"), &[]);
    let (status, _, body) = get(port, "/readyz");
    assert_eq!(status, 200, "{body}");

    let filler = state.join("filler");
    fill(&filler);
    let (status, _, body) = get(port, "/readyz");
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("audit FAIL") && body.contains("No space left on device"),
        "{body}"
    );
    assert!(
        body.contains("store ok") && body.contains("master_key ok"),
        "{body}"
    );
    // Liveness is not readiness: the process is alive and says so.
    assert_eq!(get(port, "/healthz").0, 200);
    // And what readiness predicts is what an app gets: nothing goes upstream unaudited.
    // (A row may still fit in a journal page already allocated, so a few may pass.)
    let mut refused = false;
    for _ in 0..50 {
        let req = post(
            "/openai/v1/chat/completions",
            &[("authorization", &bearer(&token))],
            &chat_body("gpt-4o-mini", false),
        );
        let (status, headers, _) = call(&s.daemon.socket(), req).await;
        if status == 503 {
            assert_eq!(headers["keyward-error"], "audit_unavailable");
            refused = true;
            break;
        }
        assert_eq!(status, 200);
    }
    assert!(refused, "requests kept passing on a full audit file system");

    std::fs::remove_file(&filler).unwrap();
    let (status, _, body) = get(port, "/readyz");
    assert_eq!(status, 200, "{body}");
    drop(s);
}

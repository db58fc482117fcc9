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
    // A keyward serving its own store has no bundle serial to report.
    assert!(!families(&text).contains("keyward_bundle_serial"), "{text}");
    // Bounded labels: no call id, app-invented model, token or key.
    for secret in call_ids.iter().chain([&invented, &token, &key]) {
        assert!(!text.contains(secret.as_str()), "{secret} in /metrics");
    }

    // Every metric the example Grafana dashboard queries is in this output.
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/grafana/keyward.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let exprs: Vec<String> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().unwrap().clone())
        .map(|t| t["expr"].as_str().unwrap().to_string())
        .collect();
    assert!(exprs.len() >= 10, "{exprs:?}");
    let known = families(&text);
    let mut queried = 0;
    for expr in &exprs {
        for (i, _) in expr.match_indices("keyward_") {
            let name: String = expr[i..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s).filter(|f| known.contains(*f)))
                .unwrap_or(&name);
            assert!(
                known.contains(family),
                "the dashboard queries {name}, which /metrics lacks"
            );
            queried += 1;
        }
    }
    assert!(
        queried >= exprs.len(),
        "{queried} metric names in {exprs:?}"
    );

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

/// The daemon's config file, as the test support writes it.
fn config_path(d: &Daemon) -> PathBuf {
    d.home.join("keyward.toml")
}

#[tokio::test(flavor = "multi_thread")]
async fn reload_applies_targets_and_limits_without_dropping_a_request() {
    let s = support::setup(&["openai"], "").await;
    let key = random_key("sk-");
    let (token, _) = s.daemon.provision("acme", "openai", &key, &[]);
    let original = std::fs::read_to_string(config_path(&s.daemon)).unwrap();
    let socket = s.daemon.socket();

    // Requests in flight across the reload: slow answers and a stream that pauses.
    let mut in_flight = Vec::new();
    for i in 0..16 {
        let (socket, token) = (socket.clone(), token.clone());
        let path = if i % 2 == 0 {
            "/openai/slow?ms=1500".to_string()
        } else {
            "/openai/stall?ms=1500".to_string()
        };
        in_flight.push(tokio::spawn(async move {
            call(
                &socket,
                post(&path, &[("authorization", &bearer(&token))], "{}"),
            )
            .await
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    // A second target toward the same upstream and a small body limit.
    let ca = s.mock.write_ca(s.dir.path());
    let reloaded = format!(
        "{original}\n[limits]\nmax_request_body = \"1KiB\"\n\n[targets.second]\nbase_url = \"{}\"\nca_file = \"{}\"\nfamily = \"openai\"\nauth_header = \"Authorization\"\nauth_format = \"Bearer {{key}}\"\n",
        s.mock.base_url(),
        ca.display()
    );
    std::fs::write(config_path(&s.daemon), &reloaded).unwrap();
    let out = s.daemon.ok(&["reload"]);
    assert!(
        out.contains("changed targets, limits") && !out.contains("restart"),
        "{out}"
    );
    for (i, h) in in_flight.into_iter().enumerate() {
        let (status, _, body) = h.await.unwrap();
        assert_eq!(status, 200, "request {i} across the reload: {body}");
        let whole = if i % 2 == 0 {
            body.contains("slept_ms")
        } else {
            body == "first\nrest\n"
        };
        assert!(whole, "request {i} was cut: {body:?}");
    }
    // New requests get the new limits and targets.
    let big = format!("{{\"model\":\"gpt-4o\",\"pad\":\"{}\"}}", "x".repeat(2048));
    let auth = [("authorization", bearer(&token))];
    let auth: Vec<(&str, &str)> = auth.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let (status, headers, _) =
        call(&socket, post("/openai/v1/chat/completions", &auth, &big)).await;
    assert_eq!(
        (status, headers["keyward-error"].to_str().unwrap()),
        (413, "body_too_large")
    );
    let (token2, _) = s
        .daemon
        .provision("acme", "second", &random_key("sk-"), &[]);
    let (status, _, body) = call(
        &socket,
        post(
            "/second/v1/chat/completions",
            &[("authorization", &bearer(&token2))],
            &chat_body("gpt-4o-mini", false),
        ),
    )
    .await;
    assert_eq!(status, 200, "{body}");

    // An invalid file changes nothing, and says where and why.
    let broken = reloaded.replace("max_request_body = \"1KiB\"", "max_request_body = \"lots\"");
    std::fs::write(config_path(&s.daemon), &broken).unwrap();
    let out = s.daemon.cli(&["reload"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&config_path(&s.daemon).display().to_string())
            && err.contains("limits.max_request_body"),
        "{err}"
    );
    let (status, _, _) = call(&socket, post("/openai/v1/chat/completions", &auth, &big)).await;
    assert_eq!(status, 413, "the invalid reload changed the limit");

    // A key that needs a restart is named and not applied; the rest is.
    let port = free_port();
    std::fs::write(
        config_path(&s.daemon),
        format!("metrics_listen = \"127.0.0.1:{port}\"\n{original}"),
    )
    .unwrap();
    let out = s.daemon.ok(&["reload"]);
    assert!(
        out.contains("restart keyward for: metrics_listen")
            && out.contains("changed targets, limits"),
        "{out}"
    );
    assert!(TcpStream::connect(("127.0.0.1", port)).is_err());
    let (status, _, body) = call(&socket, post("/openai/v1/chat/completions", &auth, &big)).await;
    assert_eq!(status, 200, "the old limit is back: {body}");
    let (status, headers, _) = call(
        &socket,
        post(
            "/second/v1/chat/completions",
            &[("authorization", &bearer(&token2))],
            &chat_body("gpt-4o-mini", false),
        ),
    )
    .await;
    assert_eq!(
        (status, headers["keyward-error"].to_str().unwrap()),
        (404, "unknown_target")
    );

    // SIGHUP does the same as `keyward reload`, and the daemon lives on.
    std::fs::write(config_path(&s.daemon), &reloaded).unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(s.daemon.pid() as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, _, _) = call(&socket, post("/openai/v1/chat/completions", &auth, &big)).await;
        if status == 413 {
            break;
        }
        assert!(Instant::now() < deadline, "SIGHUP did not reload");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(s.daemon.ok(&["status"]).contains("pid"));
    assert!(
        s.daemon.stdout().contains("SIGHUP: config reloaded")
            || s.daemon.stderr().contains("SIGHUP: config reloaded")
    );
}

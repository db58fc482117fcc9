//! Cases rebuilt from real-world failures of other gateways and credential injectors, through
//! the real binary: clean exits, framing, forwarding headers, early refusals, uploads and the
//! audit of delivered answers. Raw sockets where an HTTP library would hide the fault.

mod support;

use support::daemon::{Daemon, random_key};
use support::uds::{chat_body, raw};

#[test]
fn a_clean_exit_removes_the_sockets_keyward_bound() {
    let mut d = Daemon::builder().start();
    let (data, admin) = (d.socket(), d.admin_socket());
    assert!(data.exists() && admin.exists());
    let home = d.home.clone();
    assert_eq!(d.terminate(), Some(0), "{}", d.stderr());
    assert!(!data.exists(), "data socket left behind after SIGTERM");
    assert!(!admin.exists(), "admin socket left behind after SIGTERM");
    // The next start over the same home binds afresh and serves.
    let d2 = Daemon::builder().home(&home).start();
    assert!(d2.socket().exists() && d2.admin_socket().exists());
}

#[test]
fn a_clean_exit_leaves_a_socket_file_another_process_put_there() {
    let mut d = Daemon::builder().start();
    let data = d.socket();
    // Someone replaced the file while keyward ran: it is not keyward's to remove.
    std::fs::remove_file(&data).unwrap();
    let other = std::os::unix::net::UnixListener::bind(&data).unwrap();
    assert_eq!(d.terminate(), Some(0), "{}", d.stderr());
    assert!(data.exists(), "keyward removed a socket it did not bind");
    assert!(!d.admin_socket().exists());
    drop(other);
}

// === ambiguous framing ===

/// A chat request head with `framing` lines, authenticated with `token`.
fn head(token: &str, framing: &str) -> String {
    format!(
        "POST /openai/v1/chat/completions HTTP/1.1\r\nHost: keyward\r\n\
         Authorization: Bearer {token}\r\nContent-Type: application/json\r\n{framing}\r\n"
    )
}

/// `body` in the chunked coding, as one chunk and the last chunk.
fn chunked(body: &str) -> String {
    format!("{:x}\r\n{body}\r\n0\r\n\r\n", body.len())
}

/// The responses in a raw answer: their status lines.
fn status_lines(answer: &str) -> Vec<&str> {
    answer
        .lines()
        .filter(|l| l.starts_with("HTTP/1."))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn content_length_with_transfer_encoding_is_refused_and_nothing_after_it_is_read() {
    let s = support::setup(&["openai"], "").await;
    let (token, _) = s
        .daemon
        .provision("acme", "openai", &random_key("sk-"), &[]);
    let body = chat_body("gpt-4o", false);
    // The chunked body carries a second request: a server that takes Content-Length would
    // see it as the next request on the connection.
    let smuggled = "GET /openai/v1/models HTTP/1.1\r\nHost: keyward\r\n\r\n";
    for framing in [
        format!(
            "Content-Length: {}\r\nTransfer-Encoding: chunked\r\n",
            body.len()
        ),
        format!(
            "Transfer-Encoding: chunked\r\nContent-Length: {}\r\n",
            body.len()
        ),
    ] {
        let request = format!("{}{}{smuggled}", head(&token, &framing), chunked(&body));
        let answer = raw(&s.daemon.socket(), request.as_bytes()).await;
        assert_eq!(
            status_lines(&answer),
            ["HTTP/1.1 400 Bad Request"],
            "{answer}"
        );
        assert!(answer.contains("keyward-error: bad_request"), "{answer}");
        assert!(
            answer.contains("both Content-Length and Transfer-Encoding"),
            "{answer}"
        );
        assert!(answer.contains("connection: close"), "{answer}");
    }
    assert_eq!(
        s.mock.request_count(),
        0,
        "an ambiguous request reached the upstream"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn every_kind_of_ambiguous_framing_gets_keywards_400() {
    let s = support::setup(&["openai"], "").await;
    let (token, _) = s
        .daemon
        .provision("acme", "openai", &random_key("sk-"), &[]);
    let body = chat_body("gpt-4o", false);
    let n = body.len();
    // (framing lines, body as sent, what the message must say)
    let cases: Vec<(String, String, &str)> = vec![
        (
            format!("Content-Length: {n}\r\nContent-Length: {}\r\n", n + 1),
            body.clone(),
            "several Content-Length headers that differ",
        ),
        (
            format!("Content-Length: {n}x\r\n"),
            body.clone(),
            "Content-Length is not a number",
        ),
        ("Transfer-Encoding: gzip\r\n".into(), body.clone(), "`gzip`"),
        (
            "Transfer-Encoding: gzip, chunked\r\n".into(),
            chunked(&body),
            "`gzip, chunked`",
        ),
        (
            "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n".into(),
            chunked(&body),
            "`chunked, chunked`",
        ),
        (
            "Transfer-Encoding: identity\r\n".into(),
            body.clone(),
            "`identity`",
        ),
    ];
    for (framing, sent, needle) in &cases {
        let request = format!("{}{sent}", head(&token, framing));
        let answer = raw(&s.daemon.socket(), request.as_bytes()).await;
        assert_eq!(
            status_lines(&answer),
            ["HTTP/1.1 400 Bad Request"],
            "{framing}: {answer}"
        );
        assert!(
            answer.contains("keyward-error: bad_request"),
            "{framing}: {answer}"
        );
        assert!(answer.contains(needle), "{needle} not in {answer}");
    }
    // HTTP/1.0 has no chunked coding.
    let request = format!(
        "POST /openai/v1/chat/completions HTTP/1.0\r\nAuthorization: Bearer {token}\r\n\
         Transfer-Encoding: chunked\r\n\r\n{}",
        chunked(&body)
    );
    let answer = raw(&s.daemon.socket(), request.as_bytes()).await;
    assert!(
        answer.starts_with("HTTP/1.0 400") || answer.starts_with("HTTP/1.1 400"),
        "{answer}"
    );
    assert!(answer.contains("keyward-error: bad_request"), "{answer}");
    assert!(
        answer.contains("HTTP/1.0 with a Transfer-Encoding"),
        "{answer}"
    );
    assert_eq!(s.mock.request_count(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn well_framed_requests_share_a_connection_until_an_ambiguous_one() {
    let s = support::setup(&["openai"], "").await;
    let (token, _) = s
        .daemon
        .provision("acme", "openai", &random_key("sk-"), &[]);
    let body = chat_body("gpt-4o", false);
    // Chunked with an extension and a trailer, then Content-Length, then one that is refused,
    // then one that must never be read: all written at once.
    let chunked_odd = format!(
        "{:X};ext=1\r\n{}\r\n3\r\n{}\r\n0\r\nx-trailer: 1\r\n\r\n",
        body.len() - 3,
        &body[..body.len() - 3],
        &body[body.len() - 3..]
    );
    let request = format!(
        "{}{chunked_odd}{}{body}{}{}{}{body}",
        head(&token, "Transfer-Encoding: chunked\r\n"),
        head(&token, &format!("Content-Length: {}\r\n", body.len())),
        head(
            &token,
            &format!(
                "Transfer-Encoding: chunked\r\nContent-Length: {}\r\n",
                body.len()
            )
        ),
        chunked(&body),
        head(&token, &format!("Content-Length: {}\r\n", body.len())),
    );
    let answer = raw(&s.daemon.socket(), request.as_bytes()).await;
    assert_eq!(
        status_lines(&answer),
        [
            "HTTP/1.1 200 OK",
            "HTTP/1.1 200 OK",
            "HTTP/1.1 400 Bad Request"
        ],
        "{answer}"
    );
    assert_eq!(s.mock.request_count(), 2);
    for seen in s.mock.requests() {
        assert_eq!(seen.json()["model"], "gpt-4o");
    }
}

// === early answers reach the app ===

/// Like Python's `http.client` or curl without `Expect`: writes the whole request, and only
/// then reads. Returns the answer, or why writing or reading failed (a reset, a broken pipe).
fn write_all_then_read(socket: &std::path::Path, request: Vec<u8>) -> Result<String, String> {
    use std::io::{Read, Write};
    let mut stream = std::os::unix::net::UnixStream::connect(socket).unwrap();
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .unwrap();
    stream
        .set_write_timeout(Some(std::time::Duration::from_secs(30)))
        .unwrap();
    stream
        .write_all(&request)
        .map_err(|e| format!("writing the request failed: {e}"))?;
    let mut answer = Vec::new();
    stream
        .read_to_end(&mut answer)
        .map_err(|e| format!("reading the answer failed: {e}"))?;
    Ok(String::from_utf8_lossy(&answer).into_owned())
}

/// A POST of `body` to `path` with `Content-Length`, authenticated with `token`.
fn big_post(path: &str, token: &str, body: &[u8]) -> Vec<u8> {
    let mut request = format!(
        "POST {path} HTTP/1.1\r\nHost: keyward\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(body);
    request
}

/// A chat body of about `size` bytes naming `model` first.
fn sized_body(model: &str, size: usize) -> Vec<u8> {
    let filler = "a".repeat(size);
    format!(r#"{{"model":"{model}","messages":[{{"role":"user","content":"{filler}"}}]}}"#)
        .into_bytes()
}

#[tokio::test(flavor = "multi_thread")]
async fn answers_given_before_the_body_is_read_reach_an_app_that_writes_it_all_first() {
    let s = support::setup(
        &["openai"],
        "[limits]\nmax_request_body = \"512KiB\"\nmax_concurrent_requests = 1",
    )
    .await;
    let (token, _) = s.daemon.provision(
        "acme",
        "openai",
        &random_key("sk-"),
        &["--model", "gpt-4o*"],
    );
    let socket = s.daemon.socket();
    let big = sized_body("gpt-4o", 1 << 20);
    // (what, request, expected status line start, keyward-error code)
    let cases: Vec<(&str, Vec<u8>, &str, &str)> = vec![
        (
            "wrong token, 1 MB body",
            big_post("/openai/v1/chat/completions", "kw_wrong", &big),
            "HTTP/1.1 401",
            "unauthenticated",
        ),
        (
            // Under max_request_body, so that scope is what refuses it.
            "model outside the scope, 400 KB body",
            big_post(
                "/openai/v1/chat/completions",
                &token,
                &sized_body("o1", 400 << 10),
            ),
            "HTTP/1.1 403",
            "scope_denied",
        ),
        (
            "unknown target, 1 MB body",
            big_post("/nosuch/v1/chat/completions", &token, &big),
            "HTTP/1.1 404",
            "unknown_target",
        ),
        (
            "steering path, 1 MB body",
            big_post("/openai/v1/%2e%2e/x", &token, &big),
            "HTTP/1.1 400",
            "bad_request",
        ),
        (
            "over max_request_body, 1 MB body",
            big_post("/openai/v1/chat/completions", &token, &big),
            "HTTP/1.1 413",
            "body_too_large",
        ),
        (
            "ambiguous framing, 1 MB body",
            {
                let mut r = format!(
                    "POST /openai/v1/chat/completions HTTP/1.1\r\nHost: keyward\r\n\
                     Authorization: Bearer {token}\r\nContent-Length: {}\r\n\
                     Transfer-Encoding: chunked\r\n\r\n",
                    big.len()
                )
                .into_bytes();
                r.extend_from_slice(&big);
                r
            },
            "HTTP/1.1 400",
            "bad_request",
        ),
    ];
    for (what, request, status, code) in cases {
        let sock = socket.clone();
        let answer = tokio::task::spawn_blocking(move || write_all_then_read(&sock, request))
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert!(answer.starts_with(status), "{what}: {answer}");
        assert!(
            answer.contains(&format!("keyward-error: {code}")),
            "{what}: {answer}"
        );
    }
    // A 200 KB request header: the server's own 431.
    let sock = socket.clone();
    let request = format!(
        "GET /openai/v1/models HTTP/1.1\r\nHost: keyward\r\nx-big: {}\r\n\r\n",
        "b".repeat(200 << 10)
    );
    let answer = tokio::task::spawn_blocking(move || write_all_then_read(&sock, request.into()))
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("200 KB header: {e}"));
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");

    // Over max_concurrent_requests: one stream holds the only slot.
    let held = support::uds::send(
        &socket,
        support::uds::post(
            "/openai/gated-sse",
            &[("authorization", &support::uds::bearer(&token))],
            &chat_body("gpt-4o", true),
        ),
    )
    .await;
    assert_eq!(held.status(), 200);
    let sock = socket.clone();
    let padded = big_post("/openai/v1/chat/completions", &token, &big);
    let answer = tokio::task::spawn_blocking(move || write_all_then_read(&sock, padded))
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("overloaded: {e}"));
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains("keyward-error: overloaded"), "{answer}");
    drop(held);
    assert_eq!(
        s.mock.request_count(),
        1,
        "only the held stream reached the upstream"
    );
}

// === forwarding headers ===

#[tokio::test(flavor = "multi_thread")]
async fn forwarding_and_override_headers_never_reach_the_provider() {
    let s = support::setup(&["openai"], "").await;
    let (token, _) = s
        .daemon
        .provision("acme", "openai", &random_key("sk-"), &[]);
    let dropped = [
        ("x-forwarded-host", "evil.example"),
        ("x-forwarded-for", "10.0.0.1"),
        ("x-forwarded-proto", "http"),
        ("x-forwarded-port", "8443"),
        ("x-forwarded-prefix", "/admin"),
        ("x-forwarded-server", "evil"),
        ("forwarded", "for=10.0.0.1;host=evil.example;proto=http"),
        ("via", "1.1 evil"),
        ("x-real-ip", "10.0.0.1"),
        ("x-client-ip", "10.0.0.1"),
        ("x-cluster-client-ip", "10.0.0.1"),
        ("true-client-ip", "10.0.0.1"),
        ("cf-connecting-ip", "10.0.0.1"),
        ("fastly-client-ip", "10.0.0.1"),
        ("x-proxyuser-ip", "10.0.0.1"),
        ("x-originating-ip", "10.0.0.1"),
        ("x-host", "evil.example"),
        ("x-original-host", "evil.example"),
        ("x-original-url", "/admin/keys"),
        ("x-original-uri", "/admin/keys"),
        ("x-rewrite-url", "/admin/keys"),
        ("x-http-method-override", "DELETE"),
        ("x-http-method", "DELETE"),
        ("x-method-override", "DELETE"),
        ("x-envoy-original-path", "/admin/keys"),
        ("x-envoy-internal", "true"),
    ];
    let mut headers = vec![("authorization", support::uds::bearer(&token))];
    headers.extend(dropped.iter().map(|(k, v)| (*k, v.to_string())));
    headers.push(("x-request-id", "kept-1".into()));
    headers.push(("openai-beta", "assistants=v2".into()));
    let hdrs: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let (status, _, body) = support::uds::call(
        &s.daemon.socket(),
        support::uds::post("/openai/echo/x", &hdrs, &chat_body("gpt-4o", false)),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let seen = s.mock.last_request().unwrap();
    for (name, _) in dropped {
        assert_eq!(seen.header(name), None, "{name} reached the provider");
    }
    assert_eq!(seen.header("x-request-id"), Some("kept-1"));
    assert_eq!(seen.header("openai-beta"), Some("assistants=v2"));
}

// === delivered answers are audited as delivered ===

/// The `request.completed` row of `call_id`, once the writer committed it.
async fn completed_row(d: &Daemon, call_id: &str) -> serde_json::Value {
    for _ in 0..200 {
        let rows = d.json_lines(&["audit", "query", "--call-id", call_id]);
        if let Some(row) = rows.into_iter().find(|r| r["event"] == "request.completed") {
            return row;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("no request.completed row for {call_id}");
}

#[tokio::test(flavor = "multi_thread")]
async fn answers_read_to_the_end_are_audited_as_delivered_for_every_framing() {
    use support::mock_upstream::{MockUpstream, Reply};
    for http1 in [true, false] {
        let builder = MockUpstream::builder();
        let mock = if http1 { builder.http1_only() } else { builder }
            .start()
            .await;
        let dir = tempfile::tempdir().unwrap();
        let d = Daemon::builder()
            .config(&support::targets_config(&mock, dir.path(), &["openai"], ""))
            .start();
        let key = random_key("sk-");
        let (token, _) = d.provision("acme", "openai", &key, &[]);
        let sse = "data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\ndata: [DONE]\n\n";
        // (what, programmed reply or None for the mock's own streaming route, path)
        let cases: Vec<(&str, Option<Reply>, &str)> = vec![
            (
                "JSON with Content-Length",
                Some(Reply::json(serde_json::json!({"ok": true}))),
                "/openai/v1/chat/completions",
            ),
            (
                "SSE whose last frame ends the stream",
                Some(
                    Reply::status(200)
                        .header("content-type", "text/event-stream")
                        .body(sse),
                ),
                "/openai/v1/chat/completions",
            ),
            (
                "empty 204",
                Some(Reply::status(204).body("")),
                "/openai/v1/chat/completions",
            ),
            ("streamed SSE", None, "/openai/v1/chat/completions"),
            ("streamed bytes", None, "/openai/big?bytes=100000"),
        ];
        for (what, reply, path) in cases {
            let what = format!("{what} over {}", if http1 { "HTTP/1.1" } else { "HTTP/2" });
            match reply {
                Some(reply) => mock.set_key_reply(&key, reply),
                None => mock.clear_key_reply(&key),
            }
            let (status, headers, body) =
                support::uds::call_as(&d.socket(), &token, path, &chat_body("gpt-4o", true)).await;
            assert!(status == 200 || status == 204, "{what}: {status} {body}");
            let call_id = headers["keyward-call-id"].to_str().unwrap();
            let row = completed_row(&d, call_id).await;
            assert!(row["detail"].is_null(), "{what}: {row}");
            assert_eq!(row["bytes_out"], body.len() as u64, "{what}: {row}");
            assert_eq!(row["upstream_status"], status, "{what}: {row}");
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn real_aborts_are_still_audited_as_aborts_on_either_side() {
    use http_body_util::BodyExt;
    use support::mock_upstream::MockUpstream;
    for http1 in [true, false] {
        let builder = MockUpstream::builder();
        let mock = if http1 { builder.http1_only() } else { builder }
            .start()
            .await;
        let dir = tempfile::tempdir().unwrap();
        let d = Daemon::builder()
            .config(&support::targets_config(&mock, dir.path(), &["openai"], ""))
            .start();
        let (token, _) = d.provision("acme", "openai", &random_key("sk-"), &[]);
        let auth = support::uds::bearer(&token);
        let gated = || {
            support::uds::post(
                "/openai/gated-sse?events=3",
                &[("authorization", &auth)],
                &chat_body("gpt-4o", true),
            )
        };

        // The app reads the first event and goes away.
        let resp = support::uds::send(&d.socket(), gated()).await;
        let call_id = resp.headers()["keyward-call-id"]
            .to_str()
            .unwrap()
            .to_string();
        let mut body = resp.into_body();
        let first = body.frame().await.unwrap().unwrap();
        assert!(first.data_ref().is_some_and(|d| !d.is_empty()));
        drop(body);
        let row = completed_row(&d, &call_id).await;
        assert_eq!(
            row["detail"], "the app closed the connection before the response ended",
            "http1={http1}: {row}"
        );

        // The upstream goes away mid-stream.
        let resp = support::uds::send(&d.socket(), gated()).await;
        let call_id = resp.headers()["keyward-call-id"]
            .to_str()
            .unwrap()
            .to_string();
        let mut body = resp.into_body();
        body.frame().await.unwrap().unwrap();
        mock.cut_connections();
        while let Some(Ok(_)) = body.frame().await {}
        let row = completed_row(&d, &call_id).await;
        assert!(
            row["detail"]
                .as_str()
                .is_some_and(|d| d.starts_with("response stream failed")),
            "http1={http1}: {row}"
        );
    }
}

// === the model of multipart/form-data uploads ===

/// Runs curl against the data socket; returns (status, body).
fn curl(socket: &std::path::Path, args: &[&str]) -> (u16, String) {
    let out = std::process::Command::new("curl")
        .args(["-sS", "--unix-socket"])
        .arg(socket)
        .args(["-w", "\n%{http_code}"])
        .args(args)
        .output()
        .expect("curl is installed (.ci/run installs it)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (
        code.trim()
            .parse()
            .unwrap_or_else(|_| panic!("curl: {text} {out:?}")),
        body.to_string(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn the_model_of_a_form_upload_is_read_and_held_to_the_scope() {
    let s = support::setup(&["openai"], "").await;
    let (token, cred) = s.daemon.provision(
        "acme",
        "openai",
        &random_key("sk-"),
        &["--model", "whisper-1", "--model", "gpt-image-*"],
    );
    let audio = s.dir.path().join("a.mp3");
    // Binary content with CRLFs and dashes, as a real file has.
    let mut bytes: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    bytes.extend_from_slice(b"\r\n--\r\n--not-a-boundary\r\n");
    std::fs::write(&audio, &bytes).unwrap();
    let auth = format!("Authorization: Bearer {token}");
    let file = format!("file=@{}", audio.display());
    let socket = s.daemon.socket();
    let url = |path: &str| format!("http://keyward/openai/v1/{path}");

    // The model first (as SDKs send it) and after the file (as `curl -F` in that order does).
    for (path, fields) in [
        ("audio/transcriptions", vec!["model=whisper-1", &file]),
        ("audio/translations", vec![&file, "model=whisper-1"]),
        (
            "images/edits",
            vec!["model=gpt-image-1", "prompt=a cat", &file],
        ),
    ] {
        let before = s.mock.request_count();
        let mut args = vec!["-H", &auth];
        for f in &fields {
            args.extend(["-F", f]);
        }
        let u = url(path);
        args.push(&u);
        let (status, body) = curl(&socket, &args);
        // The mock has no such route: its 404 shows the call reached the provider.
        assert_eq!(status, 404, "{path}: {body}");
        assert!(body.contains("mock upstream: no route"), "{path}: {body}");
        assert_eq!(s.mock.request_count(), before + 1);
        let seen = s.mock.last_request().unwrap();
        assert_eq!(seen.path(), format!("/v1/{path}"));
        assert!(
            seen.body_len > bytes.len() as u64,
            "{path}: the whole upload reached the provider"
        );
    }
    let rows = s
        .daemon
        .json_lines(&["audit", "query", "--event", "request.resolved"]);
    let models: Vec<&str> = rows.iter().filter_map(|r| r["model"].as_str()).collect();
    assert!(
        models.contains(&"whisper-1") && models.contains(&"gpt-image-1"),
        "{rows:?}"
    );
    assert!(rows.iter().all(|r| r["credential_id"] == cred.as_str()));

    // Outside the scope, twice named, or not named: refused before the provider is called.
    let before = s.mock.request_count();
    for (fields, status, needle) in [
        (vec!["model=whisper-2", &file], 403, "scope_denied"),
        (
            vec!["model=whisper-1", "model=whisper-2", &file],
            400,
            "bad_request",
        ),
        (vec![&file], 403, "scope_denied"),
    ] {
        let mut args = vec!["-H", &auth];
        for f in &fields {
            args.extend(["-F", f]);
        }
        let u = url("audio/transcriptions");
        args.push(&u);
        let (got, body) = curl(&socket, &args);
        assert_eq!(got, status, "{fields:?}: {body}");
        assert!(body.contains(needle), "{fields:?}: {body}");
    }
    assert_eq!(
        s.mock.request_count(),
        before,
        "a refused upload reached the provider"
    );

    // A second model after the file is found while the upload streams: the call is cut before
    // the field that names it leaves keyward.
    let mut args = vec!["-H", &auth, "-F", "model=whisper-1", "-F", &file];
    args.extend(["-F", "model=gpt-image-1"]);
    let u = url("audio/transcriptions");
    args.push(&u);
    let (got, body) = curl(&socket, &args);
    assert_eq!(got, 400, "{body}");
    assert!(body.contains("bad_request"), "{body}");
    if let Some(seen) = s.mock.requests().get(before) {
        assert!(
            !String::from_utf8_lossy(&seen.body).contains("gpt-image-1"),
            "the second model reached the provider"
        );
    }
}

// === upstream URLs lead back through keyward ===

#[tokio::test(flavor = "multi_thread")]
async fn a_resumable_upload_url_comes_back_through_keyward_and_works() {
    use support::mock_upstream::Reply;
    let s = support::setup(&["gemini"], "").await;
    let key = random_key("AIza");
    let (token, _) = s.daemon.provision("acme", "gemini", &key, &[]);
    let base = s.mock.base_url();
    s.mock.set_key_reply(
        &key,
        Reply::json(serde_json::json!({}))
            .header(
                "x-goog-upload-url",
                &format!("{base}/upload/v1beta/files?upload_id=u-1"),
            )
            .header("x-goog-upload-status", "active")
            .header("location", &format!("{base}/v1beta/files/f-1"))
            .header(
                "link",
                &format!("<{base}/v1beta/files?page=2>; rel=\"next\""),
            )
            .header("x-elsewhere", "https://evil.example/upload?upload_id=u-1"),
    );
    let auth = [
        ("x-goog-api-key", token.as_str()),
        ("x-goog-upload-protocol", "resumable"),
        ("x-goog-upload-command", "start"),
    ];
    let (status, headers, body) = support::uds::call(
        &s.daemon.socket(),
        support::uds::post("/gemini/upload/v1beta/files", &auth, "{\"file\":{}}"),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let upload = headers["x-goog-upload-url"].to_str().unwrap();
    assert_eq!(
        upload,
        "http://keyward/gemini/upload/v1beta/files?upload_id=u-1"
    );
    assert_eq!(
        headers["location"],
        "http://keyward/gemini/v1beta/files/f-1"
    );
    assert_eq!(
        headers["link"],
        "<http://keyward/gemini/v1beta/files?page=2>; rel=\"next\""
    );
    assert_eq!(
        headers["x-elsewhere"],
        "https://evil.example/upload?upload_id=u-1"
    );

    // The app follows the URL it was given: through keyward, with the key injected and audited.
    s.mock.clear_key_reply(&key);
    let path = upload.strip_prefix("http://keyward").unwrap();
    let (_, headers, _) = support::uds::call(
        &s.daemon.socket(),
        support::uds::post(
            path,
            &[
                ("x-goog-api-key", token.as_str()),
                ("x-goog-upload-command", "upload, finalize"),
            ],
            "bytes",
        ),
    )
    .await;
    assert!(headers.contains_key("keyward-call-id"));
    let seen = s.mock.last_request().unwrap();
    assert_eq!(seen.path(), "/upload/v1beta/files");
    assert_eq!(seen.query(), Some("upload_id=u-1"));
    assert_eq!(seen.header("x-goog-api-key"), Some(key.as_str()));
}

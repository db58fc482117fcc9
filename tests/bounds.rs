//! Resource bounds through the real binary: no client can hold the slots, connections, file
//! descriptors or memory the other tenants need.

mod support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use support::daemon::random_key;
use support::uds::{call_as, chat_body};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::mpsc;

/// What one attacking request ended with: status, `keyward-error`, body.
type Outcome = (u16, String, String);

/// Opens a chat request on an HTTP/2 connection that sends `{"messages":[` and then one
/// space a second, until keyward answers or `for_how_long` passes.
async fn trickle_h2(
    sender: h2::client::SendRequest<Bytes>,
    token: String,
    for_how_long: Duration,
    out: mpsc::UnboundedSender<Outcome>,
) {
    let Ok(mut sender) = sender.ready().await else {
        return;
    };
    let req = http::Request::post("http://keyward/openai/v1/chat/completions")
        .header("authorization", format!("Bearer {token}"))
        .header("content-type", "application/json")
        .body(())
        .unwrap();
    let Ok((response, mut body)) = sender.send_request(req, false) else {
        return;
    };
    let _ = body.send_data(Bytes::from_static(b"{\"messages\":["), false);
    let trickle = async {
        let until = Instant::now() + for_how_long;
        while Instant::now() < until {
            tokio::time::sleep(Duration::from_secs(1)).await;
            body.reserve_capacity(1);
            if body.send_data(Bytes::from_static(b" "), false).is_err() {
                break;
            }
        }
        std::future::pending::<()>().await;
    };
    let answered = async {
        let response = response.await.ok()?;
        let status = response.status().as_u16();
        let code = response
            .headers()
            .get("keyward-error")
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default();
        let mut recv = response.into_body();
        let mut text = Vec::new();
        while let Some(Ok(chunk)) = recv.data().await {
            let _ = recv.flow_control().release_capacity(chunk.len());
            text.extend_from_slice(&chunk);
        }
        Some((status, code, String::from_utf8_lossy(&text).into_owned()))
    };
    tokio::select! {
        _ = trickle => {}
        got = tokio::time::timeout(for_how_long, answered) => {
            // A request that got no answer is missing from the count the test checks.
            if let Ok(Some(outcome)) = got {
                let _ = out.send(outcome);
            }
        }
    }
}

/// The same over an HTTP/1.1 connection of its own.
async fn trickle_h1(
    socket: PathBuf,
    token: String,
    for_how_long: Duration,
    out: mpsc::UnboundedSender<Outcome>,
) {
    let Ok(stream) = UnixStream::connect(&socket).await else {
        return;
    };
    let (mut read, mut write) = stream.into_split();
    let head = format!(
        "POST /openai/v1/chat/completions HTTP/1.1\r\nhost: keyward\r\n\
         authorization: Bearer {token}\r\ncontent-type: application/json\r\n\
         content-length: 100000\r\n\r\n{{\"messages\":["
    );
    if write.write_all(head.as_bytes()).await.is_err() {
        return;
    }
    let trickle = async {
        let until = Instant::now() + for_how_long;
        while Instant::now() < until {
            tokio::time::sleep(Duration::from_secs(1)).await;
            if write.write_all(b" ").await.is_err() {
                break;
            }
        }
        std::future::pending::<()>().await;
    };
    let answered = async {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        // Enough of the answer to read its status line, headers and JSON error.
        loop {
            match read.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
            if let Some(end) = find(&buf, b"\r\n\r\n")
                && buf[end..].contains(&b'}')
            {
                break;
            }
        }
        let text = String::from_utf8_lossy(&buf).into_owned();
        let status = text.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
        let code = text
            .lines()
            .find_map(|l| l.strip_prefix("keyward-error: "))
            .unwrap_or_default()
            .to_string();
        Some((status, code, text))
    };
    tokio::select! {
        _ = trickle => {}
        got = tokio::time::timeout(for_how_long, answered) => {
            // A request that got no answer is missing from the count the test checks.
            if let Ok(Some(outcome)) = got {
                let _ = out.send(outcome);
            }
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Starts `streams` trickling requests on each of `connections` HTTP/2 connections.
async fn h2_attack(
    socket: &Path,
    token: &str,
    connections: usize,
    streams: usize,
    for_how_long: Duration,
    out: &mpsc::UnboundedSender<Outcome>,
) {
    for _ in 0..connections {
        let io = UnixStream::connect(socket).await.unwrap();
        let (sender, conn) = h2::client::handshake(io).await.unwrap();
        tokio::spawn(async move {
            let _ = conn.await;
        });
        for _ in 0..streams {
            tokio::spawn(trickle_h2(
                sender.clone(),
                token.to_string(),
                for_how_long,
                out.clone(),
            ));
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn one_client_trickling_request_bodies_cannot_starve_another_tenant() {
    let s = support::setup(
        &["openai"],
        "[limits]\nmax_concurrent_requests = 64\nmax_requests_per_client = 16\n\
         max_requests_per_tenant = 24\nrequest_body_timeout = \"4s\"\n",
    )
    .await;
    let (greedy_a, _) = s
        .daemon
        .provision("greedy", "openai", &random_key("sk-"), &[]);
    let (greedy_b, _) = s
        .daemon
        .provision("greedy", "openai", &random_key("sk-"), &[]);
    let (victim, _) = s
        .daemon
        .provision("victim", "openai", &random_key("sk-"), &[]);
    let socket = s.daemon.socket();

    // Two clients of one tenant: 2 × (4 HTTP/2 connections × 32 streams + 16 HTTP/1
    // connections), each request trickling a byte a second: 288 requests, 4.5 times the
    // daemon's 64 slots.
    let attack = Duration::from_secs(15);
    let (tx, mut rx) = mpsc::unbounded_channel();
    for token in [&greedy_a, &greedy_b] {
        h2_attack(&socket, token, 4, 32, attack, &tx).await;
        for _ in 0..16 {
            tokio::spawn(trickle_h1(
                socket.clone(),
                token.clone(),
                attack,
                tx.clone(),
            ));
        }
    }
    drop(tx);
    tokio::time::sleep(Duration::from_millis(1500)).await;

    // Meanwhile another tenant calls as usual.
    let started = Instant::now();
    let mut refused = Vec::new();
    for _ in 0..20 {
        let (status, _, body) = call_as(
            &socket,
            &victim,
            "/openai/v1/chat/completions",
            &chat_body("gpt-4o", false),
        )
        .await;
        if status != 200 {
            refused.push(format!("{status} {body}"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "victim refused on {} of 20 calls over {:?} of attack",
        refused.len(),
        started.elapsed()
    );
    assert!(
        refused.is_empty(),
        "another tenant was refused: {refused:?}"
    );

    let mut outcomes = Vec::new();
    while let Some(o) = rx.recv().await {
        outcomes.push(o);
    }
    let overloaded: Vec<&Outcome> = outcomes
        .iter()
        .filter(|(status, code, _)| *status == 503 && code == "overloaded")
        .collect();
    let cut: Vec<&Outcome> = outcomes
        .iter()
        .filter(|(status, _, body)| *status == 400 && body.contains("limits.request_body_timeout"))
        .collect();
    assert_eq!(
        overloaded.len() + cut.len(),
        outcomes.len(),
        "every attacking request is refused or cut: {outcomes:?}"
    );
    // The tenant's share (24) is what the two clients got, never all 64 slots.
    assert_eq!(cut.len(), 24, "admitted attacking requests");
    assert_eq!(outcomes.len(), 288, "every attacking request was answered");
    assert!(
        overloaded
            .iter()
            .any(|(_, _, b)| b.contains("limits.max_requests_per_client")),
        "a refusal names the per-client limit"
    );
    assert!(
        overloaded
            .iter()
            .any(|(_, _, b)| b.contains("limits.max_requests_per_tenant")),
        "a refusal names the per-tenant limit"
    );
}

/// Descriptors the process holds now.
fn descriptors(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// Waits until the peer closes `stream` (EOF or reset), up to `within`; false if it did not.
async fn closed_by_peer(stream: &mut UnixStream, within: Duration) -> bool {
    let mut buf = [0u8; 1024];
    let until = Instant::now() + within;
    loop {
        let left = until.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            // A GOAWAY or an error response before the close.
            Ok(Ok(_)) => continue,
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn silent_connections_are_capped_and_closed_and_the_admin_socket_still_answers() {
    let mock = support::mock_upstream::MockUpstream::builder()
        .start()
        .await;
    let dir = tempfile::tempdir().unwrap();
    // 256 descriptors: without a cap, 600 connections exhaust them.
    let daemon = support::daemon::Daemon::builder()
        .nofile(256)
        .config(&support::targets_config(
            &mock,
            dir.path(),
            &["openai"],
            "[limits]\nidle_connection_timeout = \"2s\"\nmax_connections_per_uid = 48\n",
        ))
        .start();
    let (token, _) = daemon.provision("acme", "openai", &random_key("sk-"), &[]);
    let socket = daemon.socket();
    let pid = daemon.pid();
    let baseline = descriptors(pid);

    // A third send nothing, a third only the HTTP/2 preface, a third half a request head.
    let mut silent = Vec::new();
    let mut refused_connects = 0;
    for i in 0..600 {
        let Ok(mut s) = UnixStream::connect(&socket).await else {
            refused_connects += 1;
            continue;
        };
        let _ = match i % 3 {
            0 => Ok(()),
            1 => s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await,
            _ => {
                s.write_all(b"POST /openai/v1/chat/completions HTTP/1.1\r\nhost: k")
                    .await
            }
        };
        silent.push(s);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let held = descriptors(pid);

    // The admin socket answers while the data socket is at its cap.
    let admin = tokio::time::timeout(
        Duration::from_secs(20),
        tokio::task::spawn_blocking({
            let admin = daemon.admin_socket();
            move || {
                std::process::Command::new(support::daemon::KEYWARD)
                    .args(["status", "--json"])
                    .env("KEYWARD_ADMIN_SOCKET", admin)
                    .output()
                    .unwrap()
            }
        }),
    )
    .await;
    eprintln!(
        "descriptors: {baseline} before, {held} with 600 silent connections \
         ({refused_connects} connects refused); status answered: {}",
        admin.is_ok()
    );
    let status = admin.expect("keyward status hangs").unwrap();
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(status["connections"], 48, "{status}");
    assert!(
        held <= baseline + 48 + 8,
        "descriptors grew from {baseline} to {held} for at most 48 connections"
    );

    // Connections past the cap were closed at once; the rest once idle for 2 s.
    let started = Instant::now();
    let mut open = 0;
    for s in &mut silent {
        if !closed_by_peer(s, Duration::from_secs(10)).await {
            open += 1;
        }
    }
    eprintln!("silent connections closed after {:?}", started.elapsed());
    assert_eq!(
        open, 0,
        "silent connections still open after the idle timeout"
    );
    drop(silent);

    // A connection that made a request is closed once idle, on HTTP/1 and on HTTP/2.
    let mut h1 = UnixStream::connect(&socket).await.unwrap();
    let req = format!(
        "POST /openai/v1/chat/completions HTTP/1.1\r\nhost: k\r\nauthorization: Bearer {token}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n{}",
        chat_body("gpt-4o", false).len(),
        chat_body("gpt-4o", false)
    );
    h1.write_all(req.as_bytes()).await.unwrap();
    assert!(closed_by_peer(&mut h1, Duration::from_secs(10)).await);
    let io = UnixStream::connect(&socket).await.unwrap();
    let (mut h2, conn) = h2::client::handshake(io).await.unwrap();
    let conn = tokio::spawn(conn);
    let req = http::Request::get("http://keyward/openai/v1/models")
        .header("authorization", format!("Bearer {token}"))
        .body(())
        .unwrap();
    let (response, _) = h2.send_request(req, true).unwrap();
    assert_eq!(response.await.unwrap().status(), 200);
    tokio::time::timeout(Duration::from_secs(10), conn)
        .await
        .expect("an idle HTTP/2 connection is closed")
        .unwrap()
        .unwrap();

    // Every descriptor is given back, and the data plane still serves.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = descriptors(pid);
    assert!(
        after <= baseline + 4,
        "{baseline} descriptors before, {after} after"
    );
    let (status, _, body) = call_as(
        &socket,
        &token,
        "/openai/v1/chat/completions",
        &chat_body("gpt-4o", false),
    )
    .await;
    assert_eq!(status, 200, "{body}");
}

/// A chat body whose top-level `model` comes after `filler` bytes of message text, the order
/// the Python SDKs write.
fn model_last(filler: usize) -> String {
    format!(
        "{{\"messages\":[{{\"role\":\"user\",\"content\":\"{}\"}}],\"model\":\"gpt-4o\"}}",
        "x".repeat(filler)
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn a_body_hiding_its_model_is_bounded_alone_and_with_the_others() {
    let s = support::setup(
        &["openai"],
        "[limits]\nmax_model_scan = \"64KiB\"\nmax_buffered_bodies = \"1MiB\"\n",
    )
    .await;
    let (token, _) = s
        .daemon
        .provision("acme", "openai", &random_key("sk-"), &[]);
    let socket = s.daemon.socket();
    let path = "/openai/v1/chat/completions";

    // Alone: the model must come within max_model_scan, wherever the rest of the body goes.
    let (status, headers, body) = call_as(&socket, &token, path, &model_last(200 << 10)).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(support::uds::error_code(&headers), "bad_request");
    assert!(
        body.contains("limits.max_model_scan") && body.contains("65536"),
        "{body}"
    );
    let (status, _, body) = call_as(&socket, &token, path, &model_last(10 << 10)).await;
    assert_eq!(status, 200, "{body}");
    let model_first = format!(
        "{{\"model\":\"gpt-4o\",\"messages\":[{{\"role\":\"user\",\"content\":\"{}\"}}]}}",
        "x".repeat(2 << 20)
    );
    let (status, _, body) = call_as(&socket, &token, path, &model_first).await;
    assert_eq!(status, 200, "{body}");

    // Together: 60 KiB of model-less body held by each of 30 stalled requests would be
    // 1.8 MiB; 17 fit in 1 MiB, the others are refused with 503, and the memory is given back.
    let head = format!(
        "POST {path} HTTP/1.1\r\nhost: k\r\nauthorization: Bearer {token}\r\n\
         content-type: application/json\r\ncontent-length: 1000000\r\n\r\n\
         {{\"messages\":[{{\"role\":\"user\",\"content\":\"{}",
        "x".repeat(60 << 10)
    );
    let mut stalled = Vec::new();
    for _ in 0..30 {
        let mut c = UnixStream::connect(&socket).await.unwrap();
        c.write_all(head.as_bytes()).await.unwrap();
        stalled.push(c);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut refused = Vec::new();
    for c in &mut stalled {
        let mut buf = vec![0u8; 4096];
        if let Ok(Ok(n)) = tokio::time::timeout(Duration::from_millis(100), c.read(&mut buf)).await
            && n > 0
        {
            refused.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }
    assert!(
        refused.len() >= 13,
        "at most 17 bodies of 60 KiB fit in 1 MiB: {} refused",
        refused.len()
    );
    for answer in &refused {
        assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
        assert!(answer.contains("keyward-error: overloaded"), "{answer}");
        assert!(answer.contains("limits.max_buffered_bodies"), "{answer}");
    }
    let status = s.daemon.json_lines(&["status"]);
    let held = status[0]["buffered_body_bytes"].as_u64().unwrap();
    assert!(held <= 1 << 20, "{held} bytes held");
    drop(stalled);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let status = s.daemon.json_lines(&["status"]);
    assert_eq!(status[0]["buffered_body_bytes"], 0, "every hold given back");
    let (status, _, body) = call_as(&socket, &token, path, &model_last(10 << 10)).await;
    assert_eq!(status, 200, "{body}");
}

/// A tmpfs mounted for one test, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Tmpfs {
        let status = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir)
            .status()
            .unwrap();
        assert!(status.success(), "mount -t tmpfs failed");
        Tmpfs(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// Fills the filesystem holding `path` by appending to one file until a write fails for lack
/// of space.
fn fill(path: &Path) {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap();
    let block = vec![0u8; 64 << 10];
    loop {
        if let Err(e) = f.write_all(&block) {
            assert_eq!(e.kind(), std::io::ErrorKind::StorageFull, "{e}");
            break;
        }
    }
    // Whatever fits in the last partial block.
    while f.write_all(&[0u8; 512]).is_ok() {}
}

#[tokio::test(flavor = "multi_thread")]
async fn on_a_full_disk_rows_nobody_waits_on_are_kept_and_written_once_there_is_room() {
    if !support::needs::root(
        "on_a_full_disk_rows_nobody_waits_on_are_kept_and_written_once_there_is_room",
    ) {
        return;
    }
    let mock = support::mock_upstream::MockUpstream::builder()
        .start()
        .await;
    let dir = tempfile::tempdir().unwrap();
    let home = tempfile::Builder::new()
        .prefix("kwfull")
        .tempdir_in("/tmp")
        .unwrap();
    let _tmpfs = Tmpfs::mount(home.path(), "16m");
    let daemon = support::daemon::Daemon::builder()
        .home(home.path())
        .config(&support::targets_config(&mock, dir.path(), &["openai"], ""))
        .start();
    let (token, _) = daemon.provision("acme", "openai", &random_key("sk-"), &[]);
    let socket = daemon.socket();

    // A call is served and streaming when the disk fills up.
    let stream = support::uds::send(
        &socket,
        support::uds::post(
            "/openai/gated-sse?events=2",
            &[("authorization", &support::uds::bearer(&token))],
            "{}",
        ),
    )
    .await;
    assert_eq!(stream.status(), 200);
    let call_id = stream.headers()["keyward-call-id"]
        .to_str()
        .unwrap()
        .to_string();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let filler = home.path().join("filler");
    // Filled again after the daemon's own clean-ups (WAL checkpoints) had a chance to free
    // pages.
    for _ in 0..3 {
        fill(&filler);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // It ends: its request.completed row cannot be written now.
    mock.release();
    let _ = http_body_util::BodyExt::collect(stream.into_body())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    fill(&filler);
    // Fail closed meanwhile: a new call is refused, nothing is sent.
    let (status, headers, body) = call_as(
        &socket,
        &token,
        "/openai/v1/chat/completions",
        &chat_body("gpt-4o", false),
    )
    .await;
    assert_eq!(
        status,
        503,
        "{body}\n{}\n{:?}",
        daemon.stderr(),
        std::process::Command::new("df").arg(home.path()).output()
    );
    assert_eq!(support::uds::error_code(&headers), "audit_unavailable");

    // Room again: the kept row is written without any new call to carry it.
    std::fs::remove_file(&filler).unwrap();
    let until = Instant::now() + Duration::from_secs(15);
    let completed = loop {
        let rows = daemon.json_lines(&["audit", "query", "--call-id", &call_id]);
        if let Some(row) = rows.iter().find(|r| r["event"] == "request.completed") {
            break row.clone();
        }
        assert!(
            Instant::now() < until,
            "request.completed of {call_id} never written after the disk had room: {rows:?}\n{}",
            daemon.stderr()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(completed["upstream_status"], 200, "{completed}");
    assert!(completed["bytes_out"].as_u64().unwrap() > 0, "{completed}");
    let verify = daemon.cli(&["audit", "verify"]);
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stdout)
    );
    let (status, _, body) = call_as(
        &socket,
        &token,
        "/openai/v1/chat/completions",
        &chat_body("gpt-4o", false),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    drop(daemon);
}

/// The daemon's resident set, in MiB.
fn rss_mib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    kib / 1024
}

#[tokio::test(flavor = "multi_thread")]
async fn memory_used_at_a_peak_is_given_back_with_all_memory_locked() {
    // mlockall needs root or an unlimited RLIMIT_MEMLOCK; as anyone else keyward falls back to
    // locking secret pages only, which is not what this test is about.
    if !support::needs::root("memory_used_at_a_peak_is_given_back_with_all_memory_locked") {
        return;
    }
    let s = support::setup(&["openai"], "lock_memory = \"all\"\n").await;
    let status = s.daemon.json_lines(&["status"]);
    assert_eq!(status[0]["memory_lock"], "all (mlockall)", "{status:?}");
    let (token, _) = s
        .daemon
        .provision("acme", "openai", &random_key("sk-"), &[]);
    let pid = s.daemon.pid();
    let idle = rss_mib(pid);

    // 24 requests each hold 3 MiB of a body whose model has not come yet.
    let head = format!(
        "POST /openai/v1/chat/completions HTTP/1.1\r\nhost: k\r\nauthorization: Bearer {token}\r\n\
         content-type: application/json\r\ncontent-length: 16000000\r\n\r\n\
         {{\"messages\":[{{\"role\":\"user\",\"content\":\"{}",
        "x".repeat(3 << 20)
    );
    let mut held = Vec::new();
    for _ in 0..24 {
        let mut c = UnixStream::connect(s.daemon.socket()).await.unwrap();
        c.write_all(head.as_bytes()).await.unwrap();
        held.push(c);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let peak = rss_mib(pid);
    assert!(
        peak >= idle + 60,
        "the attack did not raise memory: {idle} → {peak} MiB"
    );
    drop(held);

    // Three quarters of what the peak added must be given back.
    let back = idle + (peak - idle) / 4;
    let started = Instant::now();
    let settled = loop {
        let now = rss_mib(pid);
        if now <= back || started.elapsed() > Duration::from_secs(60) {
            break now;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    eprintln!(
        "RSS {idle} MiB idle, {peak} MiB at the peak, {settled} MiB {:?} later",
        started.elapsed()
    );
    assert!(
        settled <= back,
        "memory stays resident after the peak: {idle} MiB idle, {peak} at the peak, {settled} a minute later"
    );
}

//! Security properties through the real binary, each with a test that fails when it breaks:
//! absent attributes against allowlists, client revocation, crypto-shredding on `cred delete`,
//! a second `model` in a body, the uid/token cross-check, the resolution row committed before
//! the upstream call on a full disk, and the zero-on-free allocator in the shipped binary.

mod support;

use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use support::daemon::{Daemon, KEYWARD, random_key};
use support::needs;
use support::uds::{bearer, call, call_as, chat_body, error_code, post};

const CHAT: &str = "/openai/v1/chat/completions";

/// A chat body that names no model.
const NO_MODEL: &str = r#"{"messages":[{"role":"user","content":"hi"}]}"#;

/// `client add` with extra arguments; returns (client id, token).
fn add_client(d: &Daemon, tenant: &str, name: &str, extra: &[&str]) -> (String, String) {
    let mut args = vec!["client", "add", "--tenant", tenant, "--name", name];
    args.extend_from_slice(extra);
    args.push("--json");
    let v: serde_json::Value = serde_json::from_str(d.ok(&args).trim()).unwrap();
    (
        v["id"].as_str().unwrap().to_string(),
        v["token"].as_str().unwrap().to_string(),
    )
}

/// `cred add` of `key` with extra scope arguments; returns the credential id.
fn add_cred(d: &Daemon, tenant: &str, name: &str, key: &str, extra: &[&str]) -> String {
    let mut args = vec![
        "cred", "add", "--tenant", tenant, "--target", "openai", "--name", name,
    ];
    args.extend_from_slice(extra);
    args.push("--json");
    let v: serde_json::Value =
        serde_json::from_str(d.ok_stdin(&args, key.as_bytes()).trim()).unwrap();
    v["id"].as_str().unwrap().to_string()
}

/// Extra request headers.
type Headers<'a> = &'a [(&'a str, &'a str)];

/// True when `needle` occurs in `haystack`.
fn has_bytes(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test(flavor = "multi_thread")]
async fn an_absent_model_team_or_workflow_does_not_pass_an_allowlist() {
    let s = support::setup(&["openai"], "").await;
    let d = &s.daemon;
    // One tenant per limited attribute, so each denial has a single cause.
    for t in ["models", "teams", "flows"] {
        d.ok(&["tenant", "add", t]);
    }
    add_cred(
        d,
        "models",
        "k",
        &random_key("sk-"),
        &["--model", "gpt-4o*"],
    );
    add_cred(d, "teams", "k", &random_key("sk-"), &["--team", "search"]);
    add_cred(
        d,
        "flows",
        "k",
        &random_key("sk-"),
        &["--workflow", "batch"],
    );
    let (_, models) = add_client(d, "models", "app", &[]);
    let (_, no_team) = add_client(d, "teams", "app", &[]);
    let (_, search) = add_client(d, "teams", "search-app", &["--team", "search"]);
    let (_, flows) = add_client(d, "flows", "app", &[]);

    // (token, body, extra headers, what the 403 must say)
    let denied: [(&str, &str, Headers, &str); 3] = [
        (&models, NO_MODEL, &[], "names no model"),
        (
            &no_team,
            &chat_body("gpt-4o", false),
            &[],
            "limited to teams and this client has none",
        ),
        (
            &flows,
            &chat_body("gpt-4o", false),
            &[],
            "limited to workflows",
        ),
    ];
    for (token, body, extra, needle) in denied {
        let mut headers = vec![("authorization", bearer(token))];
        headers.extend(extra.iter().map(|(k, v)| (*k, v.to_string())));
        let hdrs: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let (status, h, text) = call(&d.socket(), post(CHAT, &hdrs, body)).await;
        assert_eq!(status, 403, "{needle}: {text}");
        assert_eq!(error_code(&h), "scope_denied");
        assert!(text.contains(needle), "{needle} not in {text}");
    }
    assert_eq!(
        s.mock.request_count(),
        0,
        "a request without the attribute reached the upstream"
    );

    // The same keys serve once the attribute is present and allowed.
    let allowed: [(&str, &str, Headers); 3] = [
        (&models, "gpt-4o-mini", &[]),
        (&search, "gpt-4o", &[]),
        (&flows, "gpt-4o", &[("keyward-workflow", "batch")]),
    ];
    for (token, model, extra) in allowed {
        let mut hdrs = vec![("authorization", bearer(token))];
        hdrs.extend(extra.iter().map(|(k, v)| (*k, v.to_string())));
        let hdrs: Vec<(&str, &str)> = hdrs.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let (status, _, text) =
            call(&d.socket(), post(CHAT, &hdrs, &chat_body(model, false))).await;
        assert_eq!(status, 200, "{model}: {text}");
    }
    assert_eq!(s.mock.request_count(), 3);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_revoked_client_is_refused_on_its_next_request() {
    let s = support::setup(&["openai"], "").await;
    let d = &s.daemon;
    d.ok(&["tenant", "add", "acme"]);
    add_cred(d, "acme", "k", &random_key("sk-"), &[]);
    let (gone_id, gone) = add_client(d, "acme", "gone", &[]);
    let (_, stays) = add_client(d, "acme", "stays", &[]);
    let body = chat_body("gpt-4o", false);

    // A token.
    assert_eq!(call_as(&d.socket(), &gone, CHAT, &body).await.0, 200);
    d.ok(&["client", "revoke", &gone_id]);
    let before = s.mock.request_count();
    let (status, h, text) = call_as(&d.socket(), &gone, CHAT, &body).await;
    assert_eq!(status, 401, "the revoked token still works: {text}");
    assert_eq!(error_code(&h), "unauthenticated");
    assert!(text.contains("unknown or revoked"), "{text}");
    assert_eq!(s.mock.request_count(), before);
    // Revocation is of that client only.
    assert_eq!(call_as(&d.socket(), &stays, CHAT, &body).await.0, 200);

    // A uid binding.
    let me = nix::unistd::geteuid().as_raw().to_string();
    let (by_uid_id, _) = add_client(d, "acme", "by-uid", &["--uid", &me]);
    let no_token = || post(CHAT, &[], &body);
    let (status, _, text) = call(&d.socket(), no_token()).await;
    assert_eq!(status, 200, "{text}");
    d.ok(&["client", "revoke", &by_uid_id]);
    let before = s.mock.request_count();
    let (status, h, text) = call(&d.socket(), no_token()).await;
    assert_eq!(status, 401, "the revoked uid binding still works: {text}");
    assert_eq!(error_code(&h), "unauthenticated");
    assert_eq!(s.mock.request_count(), before);
}

/// Three guards keep deleted keys out of the files, and any one of them suffices here: the
/// checkpoint after the delete (only this test notices it missing), `delete_credential`'s own
/// overwrite and `secure_delete` (each tested alone by `store::tests`).
#[test]
fn cred_delete_leaves_no_byte_of_its_wrapped_data_keys_in_the_database_or_its_wal() {
    let d = Daemon::builder().start();
    d.ok(&["tenant", "add", "acme"]);
    let doomed = add_cred(&d, "acme", "doomed", &random_key("sk-"), &[]);
    d.ok_stdin(&["cred", "rotate", &doomed], random_key("sk-").as_bytes());
    let kept = add_cred(&d, "acme", "kept", &random_key("sk-"), &[]);
    let blobs = |id: &str| -> Vec<(Vec<u8>, Vec<u8>)> {
        let conn = rusqlite::Connection::open_with_flags(
            d.home.join("keyward.db"),
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )
        .unwrap();
        let mut stmt = conn
            .prepare(
                "SELECT wrapped_data_key, ciphertext FROM credential_versions WHERE credential_id = ?1",
            )
            .unwrap();
        stmt.query_map([id], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    };
    let doomed_blobs = blobs(&doomed);
    let kept_blobs = blobs(&kept);
    assert_eq!(doomed_blobs.len(), 2, "two versions, two data keys");
    // The grep finds them while they exist, so its silence afterwards means something.
    let before = d.all_state_bytes();
    for (wrapped, ciphertext) in doomed_blobs.iter().chain(&kept_blobs) {
        assert!(wrapped.len() >= 32, "{} bytes", wrapped.len());
        assert!(has_bytes(&before, wrapped) && has_bytes(&before, ciphertext));
    }

    d.ok(&["cred", "delete", &doomed]);
    let after = d.all_state_bytes();
    for (wrapped, ciphertext) in &doomed_blobs {
        assert!(
            !has_bytes(&after, wrapped),
            "a deleted wrapped data key is still in a state file"
        );
        assert!(
            !has_bytes(&after, ciphertext),
            "a deleted key's ciphertext is still in a state file"
        );
    }
    for (wrapped, _) in &kept_blobs {
        assert!(has_bytes(&after, wrapped), "the other credential was lost");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_model_in_the_body_never_reaches_the_provider_whole_or_streamed() {
    let s = support::setup(&["openai"], "").await;
    let d = &s.daemon;
    let (token, _) = d.provision(
        "acme",
        "openai",
        &random_key("sk-"),
        &["--model", "gpt-4o*"],
    );

    // Whole: both names arrive in one piece.
    let whole =
        r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}],"model":"o1-pro"}"#;
    let (status, _, text) = call_as(&d.socket(), &token, CHAT, whole).await;
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("more than once"), "{text}");
    assert_eq!(s.mock.request_count(), 0);

    // Streamed: the allowed model first, the second one much later, after keyward already
    // started forwarding.
    let mut parts = vec![r#"{"model":"gpt-4o","messages":[{"role":"user","content":""#.to_string()];
    parts.extend((0..20).map(|i| format!("{i:03}-{}", "abcdefgh".repeat(500))));
    parts.push(r#""}],"model":"o1-pro"}"#.to_string());
    let stream = futures_util::stream::unfold(parts.into_iter(), |mut it| async move {
        let next = it.next()?;
        tokio::time::sleep(Duration::from_millis(10)).await;
        Some((
            Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(Bytes::from(next))),
            it,
        ))
    });
    let req = http::Request::post(CHAT)
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
    let answer = match sender.send_request(req).await {
        Ok(resp) => {
            let status = resp.status().as_u16();
            let body = resp.into_body().collect().await.map(|b| b.to_bytes());
            Some((
                status,
                body.map(|b| String::from_utf8_lossy(&b).into_owned()),
            ))
        }
        // Cutting the connection is a refusal too.
        Err(_) => None,
    };
    if let Some((status, body)) = &answer {
        assert_ne!(
            status / 100,
            2,
            "the ambiguous stream was answered: {body:?}"
        );
    }
    for r in s.mock.requests() {
        assert!(
            !has_bytes(&r.body, b"o1-pro"),
            "the second model reached the provider ({} of the body)",
            r.body_len
        );
        assert!(
            r.json().is_null(),
            "the provider got a complete body it could parse"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_uid_bound_to_one_client_cannot_borrow_another_clients_token() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let s = support::setup(&["openai"], &format!("listen_tcp = \"127.0.0.1:{port}\"\n")).await;
    let d = &s.daemon;
    d.ok(&["tenant", "add", "acme"]);
    add_cred(d, "acme", "k", &random_key("sk-"), &[]);
    let me = nix::unistd::geteuid().as_raw().to_string();
    let (_, unbound) = add_client(d, "acme", "unbound", &[]);
    let body = chat_body("gpt-4o", false);
    // Before this uid is bound, the unbound client's token works from it.
    assert_eq!(call_as(&d.socket(), &unbound, CHAT, &body).await.0, 200);
    let (_, mine) = add_client(d, "acme", "mine", &["--uid", &me]);
    let before = s.mock.request_count();

    let (status, h, text) = call_as(&d.socket(), &unbound, CHAT, &body).await;
    assert_eq!(
        status, 401,
        "a bound uid used another client's token: {text}"
    );
    assert_eq!(error_code(&h), "unauthenticated");
    assert!(
        text.contains(&format!("peer uid {me} do not agree")),
        "{text}"
    );
    // Its own token agrees with it.
    assert_eq!(call_as(&d.socket(), &mine, CHAT, &body).await.0, 200);
    assert_eq!(s.mock.request_count(), before + 1);

    // Over TCP no peer uid can be checked, so a uid-bound client's token is refused there.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let req = format!(
        "POST {CHAT} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {mine}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    stream.read_to_string(&mut out).await.unwrap();
    assert!(out.starts_with("HTTP/1.1 401"), "{out}");
    assert!(out.contains("must connect over the Unix socket"), "{out}");
    assert_eq!(s.mock.request_count(), before + 1);
}

/// Unmounts (lazily) when the test ends.
struct Mount(std::path::PathBuf);
impl Drop for Mount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn on_a_full_disk_no_call_reaches_the_upstream_without_its_resolution_row() {
    const TEST: &str = "on_a_full_disk_no_call_reaches_the_upstream_without_its_resolution_row";
    if !needs::root(TEST) || !needs::program(TEST, "mount", "--version") {
        return;
    }
    let mock = support::mock_upstream::MockUpstream::builder()
        .start()
        .await;
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    std::fs::create_dir(&home).unwrap();
    let status = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=8m,mode=0700", "tmpfs"])
        .arg(&home)
        .status()
        .expect("run mount");
    assert!(
        status.success(),
        "mount -t tmpfs failed although running as root"
    );
    let _mount = Mount(home.clone());
    let d = Daemon::builder()
        .home(&home)
        .config(&support::targets_config(&mock, dir.path(), &["openai"], ""))
        .start();
    let (token, _) = d.provision("acme", "openai", &random_key("sk-"), &[]);
    let body = chat_body("gpt-4o", false);
    assert_eq!(call_as(&d.socket(), &token, CHAT, &body).await.0, 200);

    let filler = home.join("filler");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler).unwrap();
        let block = [0u8; 4096];
        while f.write_all(&block).is_ok() {}
    }
    // Pages already allocated may take a few more rows; then every call is refused.
    let mut refused = None;
    for _ in 0..200 {
        let sent_before = mock.request_count();
        let (status, h, text) = call_as(&d.socket(), &token, CHAT, &body).await;
        if status != 200 {
            refused = Some((status, error_code(&h), text, sent_before));
            break;
        }
    }
    let (status, code, text, sent_before) = refused.expect("no call was refused on a full disk");
    assert_eq!(status, 503, "{text}");
    assert_eq!(code, "audit_unavailable");
    assert!(text.contains("disk full"), "{text}");
    assert_eq!(
        mock.request_count(),
        sent_before,
        "the upstream was called without a committed resolution row"
    );

    std::fs::remove_file(&filler).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (status, _, text) = call_as(&d.socket(), &token, CHAT, &body).await;
        if status == 200 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "calls were still refused after space was freed: {text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Every call the upstream saw has its resolution row, and the trail verifies.
    let verify = d.cli(&["audit", "verify"]);
    assert!(verify.status.success(), "{verify:?}");
    let resolved = d.json_lines(&["audit", "query", "--event", "request.resolved"]);
    assert_eq!(resolved.len(), mock.request_count());
}

/// Names of the function symbols in an ELF64 little-endian file's `.symtab`.
fn elf_function_symbols(elf: &[u8]) -> Vec<String> {
    let u16_at = |o: usize| u16::from_le_bytes(elf[o..o + 2].try_into().unwrap()) as usize;
    let u32_at = |o: usize| u32::from_le_bytes(elf[o..o + 4].try_into().unwrap()) as usize;
    let u64_at = |o: usize| u64::from_le_bytes(elf[o..o + 8].try_into().unwrap()) as usize;
    assert_eq!(
        &elf[..6],
        b"\x7fELF\x02\x01",
        "not an ELF64 little-endian file"
    );
    let (shoff, shentsize, shnum) = (u64_at(0x28), u16_at(0x3a), u16_at(0x3c));
    let section = |i: usize| {
        let h = shoff + i * shentsize;
        (
            u32_at(h + 4),
            u64_at(h + 0x18),
            u64_at(h + 0x20),
            u32_at(h + 0x28),
        )
    };
    let mut names = Vec::new();
    for i in 0..shnum {
        let (kind, offset, size, link) = section(i);
        if kind != 2 {
            continue; // SHT_SYMTAB
        }
        let (_, str_off, _, _) = section(link);
        for sym in elf[offset..offset + size].chunks_exact(24) {
            let name = u32::from_le_bytes(sym[..4].try_into().unwrap()) as usize;
            if sym[4] & 0xf != 2 {
                continue; // STT_FUNC
            }
            let start = str_off + name;
            let end = start + elf[start..].iter().position(|&b| b == 0).unwrap();
            names.push(String::from_utf8_lossy(&elf[start..end]).into_owned());
        }
    }
    names
}

#[test]
fn the_shipped_binary_frees_through_the_zero_on_free_allocator() {
    // The binary instantiates `ZeroOnFree`'s `dealloc` only while main.rs installs it as the
    // `#[global_allocator]` (the library never uses it as a value).
    let elf = std::fs::read(KEYWARD).unwrap();
    let symbols = elf_function_symbols(&elf);
    assert!(symbols.len() > 1000, "no symbol table in {KEYWARD}");
    assert!(
        symbols.iter().any(|s| s.contains("ZeroOnFree")
            && s.contains("GlobalAlloc")
            && s.contains("dealloc")),
        "{KEYWARD} does not free through ZeroOnFree"
    );
}

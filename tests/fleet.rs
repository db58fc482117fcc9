//! From one sidecar to a fleet, through the real binary: audit rows shipped as JSON lines and
//! verified with the master key alone, across instances interleaved in one file.

mod support;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::daemon::{Daemon, KEYWARD, contains, random_key};
use support::mock_upstream::MockUpstream;
use support::uds::{call_as, chat_body, error_code};

/// A random master key file (64 hex characters) in `dir`.
fn master_key_file(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(
        &path,
        format!("{}{}", random_key(""), &random_key("")[..16]),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

/// Runs `keyward` here (not against a daemon) and returns (exit code, stdout, stderr).
fn local(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(KEYWARD)
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("KEYWARD_HOME", "/nonexistent-keyward-home")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `keyward audit verify --jsonl FILE --master-key-file KEY [extra]`.
fn verify(file: &Path, key: &Path, extra: &[&str]) -> (i32, String, String) {
    let mut args = vec![
        "audit",
        "verify",
        "--jsonl",
        file.to_str().unwrap(),
        "--master-key-file",
        key.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    local(&args)
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

fn write_lines(path: &Path, lines: &[String]) {
    std::fs::write(path, lines.join("\n") + "\n").unwrap();
}

fn status(d: &Daemon) -> Value {
    serde_json::from_str(d.ok(&["status", "--json"]).trim()).unwrap()
}

/// Waits until `path` holds at least `n` lines that are audit rows.
fn wait_rows(path: &Path, n: usize) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let all = std::fs::read_to_string(path).unwrap_or_default();
        let rows: Vec<String> = all
            .lines()
            .filter(|l| l.contains("\"seq\"") && !l.contains("\"export\""))
            .map(str::to_string)
            .collect();
        if rows.len() >= n || Instant::now() > deadline {
            return rows;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Index of the line of `instance` with this seq.
fn find_row(lines: &[String], instance: &str, seq: u64) -> usize {
    lines
        .iter()
        .position(|l| {
            let Ok(v) = serde_json::from_str::<Value>(l) else {
                return false;
            };
            v["instance"] == instance && v["seq"] == seq && v.get("export").is_none()
        })
        .unwrap_or_else(|| panic!("row {seq} of {instance}"))
}

/// Two sidecars under one master key ship to their own files; the lines, interleaved as a log
/// pipeline would deliver them, verify with the master key alone, and every kind of damage is
/// named.
#[tokio::test(flavor = "multi_thread")]
async fn shipped_rows_of_two_instances_verify_interleaved_and_damage_is_named() {
    let mock = MockUpstream::builder().start().await;
    let dir = tempfile::tempdir().unwrap();
    let key = master_key_file(dir.path(), "master.key");
    let mut sidecars = Vec::new();
    let mut secrets = Vec::new();
    for name in ["a", "b"] {
        let out = dir.path().join(format!("{name}.jsonl"));
        let extra = format!(
            "master_key_file = \"{}\"\naudit_export = \"file:{}\"",
            key.display(),
            out.display()
        );
        let d = Daemon::builder()
            .config(&support::targets_config(
                &mock,
                dir.path(),
                &["openai"],
                &extra,
            ))
            .start();
        let provider_key = random_key("sk-proj-");
        let (token, _) = d.provision("acme", "openai", &provider_key, &[]);
        for _ in 0..3 {
            let (code, _, _) = call_as(
                &d.socket(),
                &token,
                "/openai/v1/chat/completions",
                &chat_body("gpt-4o", false),
            )
            .await;
            assert_eq!(code, 200);
        }
        secrets.push(provider_key);
        secrets.push(token);
        sidecars.push((d, out));
    }
    // Every committed row is shipped: as many lines as `audit query` has rows.
    let mut instances = Vec::new();
    for (d, out) in &mut sidecars {
        let instance = status(d)["instance"].as_str().unwrap().to_string();
        assert!(!instance.is_empty());
        let committed = d.json_lines(&["audit", "query", "--limit", "100000"]).len();
        let shipped = wait_rows(out, committed);
        assert_eq!(shipped.len(), committed, "one line per committed row");
        let first: Value = serde_json::from_str(&shipped[0]).unwrap();
        assert_eq!(first["instance"], instance.as_str());
        assert_eq!(first["seq"], 1);
        assert!(first["audit_key"].is_string() && first["instance_tag"].is_string());
        assert!(first["prev_mac"].is_string() && first["mac"].is_string());
        // A clean stop ends the stream with a stop line.
        assert_eq!(d.terminate(), Some(0));
        let last: Value = serde_json::from_str(lines(out).last().unwrap()).unwrap();
        assert_eq!(last["export"], "stop");
        assert_eq!(last["seq"], committed as u64);
        instances.push(instance);
    }
    let (a, b) = (lines(&sidecars[0].1), lines(&sidecars[1].1));
    for secret in &secrets {
        for l in a.iter().chain(&b) {
            assert!(
                !l.contains(secret.as_str()),
                "a key or token in a shipped line"
            );
        }
    }
    // Interleave the two streams line by line, with other log output in between.
    let mut merged = Vec::new();
    for i in 0..a.len().max(b.len()) {
        merged.extend(a.get(i).cloned());
        merged.push("some other log line".to_string());
        merged.extend(b.get(i).cloned());
    }
    let file = dir.path().join("merged.jsonl");
    write_lines(&file, &merged);
    let (code, out, err) = verify(&file, &key, &["--json"]);
    assert_eq!(code, 0, "{out}{err}");
    let reports: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(reports.len(), 2);
    for r in &reports {
        assert!(r["problem"].is_null(), "{r}");
        assert_eq!(r["stopped"], true);
        assert_eq!(r["first_seq"], 1);
    }
    assert_eq!(
        reports[0]["rows_checked"].as_u64().unwrap() as usize,
        a.len() - 1
    );
    // --instance checks one instance only.
    let (code, out, _) = verify(&file, &key, &["--instance", &instances[1], "--json"]);
    assert_eq!(code, 0);
    assert_eq!(out.lines().count(), 1);
    assert!(out.contains(&instances[1]));
    // A line delivered twice (at-least-once pipelines) is a duplicate, not an error.
    let mut twice = merged.clone();
    twice.insert(10, merged[find_row(&merged, &instances[0], 3)].clone());
    write_lines(&file, &twice);
    let (code, out, err) = verify(&file, &key, &["--json"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("\"duplicates\":1"), "{out}");

    let damaged = |name: &str, edit: &dyn Fn(&mut Vec<String>), expect: &[&str]| {
        let mut copy = merged.clone();
        edit(&mut copy);
        write_lines(&file, &copy);
        let (code, out, err) = verify(&file, &key, &[]);
        assert_eq!(code, 1, "{name}: {out}{err}");
        for needle in expect {
            assert!(
                err.contains(needle) || out.contains(needle),
                "{name}: {needle} not in {out}{err}"
            );
        }
    };
    let ia = instances[0].clone();
    damaged(
        "edit",
        &|l| {
            let i = find_row(l, &ia, 4);
            let mut v: Value = serde_json::from_str(&l[i]).unwrap();
            v["tenant"] = "evil".into();
            l[i] = v.to_string();
        },
        &["edited: row 4", &ia],
    );
    damaged(
        "gap",
        &|l| {
            let i = find_row(l, &ia, 5);
            l.remove(i);
        },
        &["gap: rows 5..=5 are missing"],
    );
    damaged(
        "reorder",
        &|l| {
            let (i, j) = (find_row(l, &ia, 5), find_row(l, &ia, 6));
            l.swap(i, j);
        },
        &["reordered"],
    );
    damaged(
        "truncation before the stop line",
        &|l| {
            let last = a.len() as u64 - 1;
            let i = find_row(l, &ia, last);
            l.remove(i);
        },
        &["truncated: the instance stopped after row"],
    );
    damaged(
        "a cut last line",
        &|l| {
            let last = l.pop().unwrap();
            l.push(last[..last.len() / 2].to_string());
        },
        &["truncated: the last line"],
    );
    damaged(
        "relabelled instance",
        &|l| {
            for line in l.iter_mut() {
                *line = line.replace(&ia, "impostor");
            }
        },
        &["instance tag does not match"],
    );
    // Another master key cannot unwrap the audit keys: named, exit 1.
    write_lines(&file, &merged);
    let other = master_key_file(dir.path(), "other.key");
    let (code, _, err) = verify(&file, &other, &[]);
    assert_eq!(code, 1);
    assert!(
        err.contains("does not unwrap under this master key"),
        "{err}"
    );
    // No master key at all: a clear message, exit 1.
    let (code, _, err) = local(&["audit", "verify", "--jsonl", file.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(
        err.contains("no master key") && err.contains("--master-key-file"),
        "{err}"
    );
}

/// The instance id survives a restart; rows committed by a run that died before writing them
/// out are written by the next start, so the stream has no gap.
#[tokio::test(flavor = "multi_thread")]
async fn a_restart_keeps_the_instance_and_continues_the_stream() {
    let dir = tempfile::tempdir().unwrap();
    let key = master_key_file(dir.path(), "master.key");
    let out = dir.path().join("audit.jsonl");
    let config = format!(
        "master_key_file = \"{}\"\naudit_export = \"file:{}\"",
        key.display(),
        out.display()
    );
    let mut d = Daemon::builder().config(&config).start();
    let home = d.home.clone();
    let instance = status(&d)["instance"].as_str().unwrap().to_string();
    d.ok(&["tenant", "add", "one"]);
    wait_rows(&out, 1);
    d.kill9();
    // A run whose rows never reached the sink: pretend the last write was lost.
    std::fs::write(home.join("audit.export.seq"), "0\n").unwrap();
    std::fs::write(&out, "").unwrap();
    let d = Daemon::builder().config(&config).home(&home).start();
    assert_eq!(status(&d)["instance"], instance.as_str());
    d.ok(&["tenant", "add", "two"]);
    let rows = wait_rows(&out, 2);
    assert_eq!(rows.len(), 2, "{rows:?}");
    let (code, out_text, err) = verify(&out, &key, &["--json"]);
    assert_eq!(code, 0, "{out_text}{err}");
    assert!(out_text.contains("\"rows_checked\":2"), "{out_text}");
}

/// A started daemon whose stdout is a pipe the test controls.
struct PipedDaemon {
    child: Child,
    home: tempfile::TempDir,
}

impl Drop for PipedDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl PipedDaemon {
    fn start(config: &str) -> PipedDaemon {
        let home = tempfile::Builder::new()
            .prefix("kw")
            .tempdir_in("/tmp")
            .unwrap();
        let mut cmd = Daemon::builder().config(config).command(home.path());
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(home.path().join("serve.err")).unwrap())
            .spawn()
            .unwrap();
        let d = PipedDaemon { child, home };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !d.cli(&["status"]).status.success() {
            assert!(
                Instant::now() < deadline,
                "daemon did not start: {}",
                d.stderr()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        d
    }

    fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(KEYWARD)
            .args(args)
            .env_clear()
            .env("KEYWARD_ADMIN_SOCKET", self.home.path().join("admin.sock"))
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(self.home.path().join("serve.err")).unwrap_or_default()
    }
}

/// When nobody reads standard output, commits are refused (503 audit_unavailable, nothing sent
/// upstream) instead of rows being dropped; once the pipe is read again, requests pass, and
/// every committed row is in the stream.
#[tokio::test(flavor = "multi_thread")]
async fn a_blocked_stdout_refuses_requests_and_loses_no_row() {
    let mock = MockUpstream::builder().start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = support::targets_config(
        &mock,
        dir.path(),
        &["openai"],
        "audit_export = \"stdout\"\naudit_export_buffer = \"4KiB\"",
    );
    let mut d = PipedDaemon::start(&config);
    let ok = |out: std::process::Output| {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    ok(d.cli(&["tenant", "add", "acme"]));
    let client: Value = serde_json::from_str(
        ok(d.cli(&[
            "client", "add", "--tenant", "acme", "--name", "app", "--json",
        ]))
        .trim(),
    )
    .unwrap();
    let token = client["token"].as_str().unwrap().to_string();
    let provider_key = random_key("sk-");
    let mut cmd = Command::new(KEYWARD);
    cmd.args([
        "cred", "add", "--tenant", "acme", "--target", "openai", "--name", "k",
    ])
    .env_clear()
    .env("KEYWARD_ADMIN_SOCKET", d.home.path().join("admin.sock"))
    .stdin(Stdio::piped())
    .stdout(Stdio::null());
    let mut child = cmd.spawn().unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), provider_key.as_bytes()).unwrap();
    assert!(child.wait().unwrap().success());
    let socket = d.home.path().join("keyward.sock");
    // Fill the pipe (64 KiB) and the export buffer (4 KiB) until requests are refused. A refusal
    // can also come from the export thread merely lagging behind (a loaded machine may not run
    // it for a few requests); that buffer then drains on its own, so keep going until status
    // shows bytes stuck behind the blocked pipe.
    let mut refused = None;
    let mut served = 0;
    for _ in 0..2000 {
        let (code, headers, body) = call_as(
            &socket,
            &token,
            "/openai/v1/chat/completions",
            &chat_body("gpt-4o", false),
        )
        .await;
        if code == 200 {
            served += 1;
            continue;
        }
        assert_eq!(
            (code, error_code(&headers).as_str()),
            (503, "audit_unavailable"),
            "{body}"
        );
        assert!(body.contains("not keeping up"), "{body}");
        assert_eq!(
            mock.request_count(),
            served,
            "nothing was sent for the refused request"
        );
        let status: Value = serde_json::from_str(ok(d.cli(&["status", "--json"])).trim()).unwrap();
        if status["audit_export"]["waiting_bytes"].as_u64().unwrap() > 0 {
            refused = Some(status);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let status = refused.expect("requests refused while stdout is blocked");
    assert!(
        status["audit_export"]["buffer_bytes"].as_u64().unwrap() == 4096,
        "{status}"
    );
    // Read the pipe again: requests pass.
    let mut stdout = d.child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut all = Vec::new();
        let _ = stdout.read_to_end(&mut all);
        all
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (code, _, _) = call_as(
            &socket,
            &token,
            "/openai/v1/chat/completions",
            &chat_body("gpt-4o", false),
        )
        .await;
        if code == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "requests still refused after the pipe drained"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let committed: Vec<Value> = ok(d.cli(&["audit", "query", "--limit", "100000", "--json"]))
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    // A clean stop flushes the stream; then every committed row is in it, each once, in order.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(d.child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(d.child.wait().unwrap().success());
    let shipped = String::from_utf8(reader.join().unwrap()).unwrap();
    assert!(!contains(shipped.as_bytes(), &provider_key));
    assert!(!contains(shipped.as_bytes(), &token));
    let seqs: Vec<u64> = shipped
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).expect("stdout holds only audit lines"))
        .filter(|v| v.get("export").is_none())
        .map(|v| v["seq"].as_u64().unwrap())
        .collect();
    let max = committed
        .iter()
        .map(|r| r["seq"].as_u64().unwrap())
        .max()
        .unwrap();
    assert!(seqs.len() as u64 >= max);
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
    let file = dir.path().join("stdout.jsonl");
    std::fs::write(&file, &shipped).unwrap();
    let key_file = d.home.path().join("master.key");
    let (code, out, err) = verify(&file, &key_file, &[]);
    assert_eq!(code, 0, "{out}{err}");
}

// === bundles ===

/// A Kubernetes Secret volume as the kubelet writes it: `keyward.bundle` is a symlink to
/// `..data/keyward.bundle`, `..data` a symlink to a timestamped directory, and an update
/// writes a new directory and renames a new `..data` symlink over the old one.
struct SecretDir {
    dir: PathBuf,
    current: Option<PathBuf>,
    n: usize,
}

impl SecretDir {
    fn new(dir: &Path, bundle: &[u8]) -> SecretDir {
        std::fs::create_dir_all(dir).unwrap();
        let mut s = SecretDir {
            dir: dir.to_path_buf(),
            current: None,
            n: 0,
        };
        s.swap(bundle);
        std::os::unix::fs::symlink("..data/keyward.bundle", dir.join("keyward.bundle")).unwrap();
        s
    }

    /// Atomically replaces the bundle, the way the kubelet updates a Secret volume.
    fn swap(&mut self, bundle: &[u8]) {
        self.n += 1;
        let name = format!("..2026_11_30_12_00_{:02}.{}", self.n % 60, self.n);
        let data = self.dir.join(&name);
        std::fs::create_dir(&data).unwrap();
        std::fs::write(data.join("keyward.bundle"), bundle).unwrap();
        let tmp = self.dir.join("..data_tmp");
        std::os::unix::fs::symlink(&name, &tmp).unwrap();
        std::fs::rename(&tmp, self.dir.join("..data")).unwrap();
        if let Some(old) = self.current.replace(data) {
            std::fs::remove_dir_all(old).unwrap();
        }
    }
}

/// An authoring keyward (its admin socket is where credentials are managed) and its master key.
struct Author {
    d: Daemon,
    dir: PathBuf,
    exports: usize,
}

impl Author {
    fn start(mock: &MockUpstream, dir: &Path, key: &Path) -> Author {
        let extra = format!("master_key_file = \"{}\"", key.display());
        let d = Daemon::builder()
            .config(&support::targets_config(
                mock,
                dir,
                &["openai", "anthropic"],
                &extra,
            ))
            .start();
        Author {
            d,
            dir: dir.to_path_buf(),
            exports: 0,
        }
    }

    /// Exports every tenant; returns the bundle's bytes.
    fn export(&mut self) -> Vec<u8> {
        self.exports += 1;
        let out = self.dir.join(format!("export-{}.bundle", self.exports));
        let summary: Value = serde_json::from_str(
            self.d
                .ok(&["bundle", "export", "--out", out.to_str().unwrap(), "--json"])
                .trim(),
        )
        .unwrap();
        assert_eq!(summary["serial"], self.exports as u64);
        std::fs::read(out).unwrap()
    }

    fn rotate(&self, cred: &str, secret: &str) {
        self.d.ok_stdin(
            &["cred", "rotate", cred, "--overlap", "0s"],
            secret.as_bytes(),
        );
    }
}

/// A sidecar serving `bundle` (a path) with the authoring master key.
fn sidecar(mock: &MockUpstream, dir: &Path, key: &Path, bundle: &Path, extra: &str) -> Daemon {
    let extra = format!(
        "master_key_file = \"{}\"\nbundle = \"{}\"\n{extra}",
        key.display(),
        bundle.display()
    );
    // A home the test owns, so it outlives the daemon (restarts over the same state dir).
    let home = dir.join(format!("sidecar-{}", &random_key("")[..8]));
    std::fs::create_dir(&home).unwrap();
    Daemon::builder()
        .config(&support::targets_config(
            mock,
            dir,
            &["openai", "anthropic"],
            &extra,
        ))
        .home(&home)
        .start()
}

/// `keyward_bundle_serial` in `keyward metrics`, after `promtool check metrics` passed the text.
fn bundle_serial_metric(test: &str, d: &Daemon) -> u64 {
    let text = d.ok(&["metrics"]);
    if support::needs::program(test, "promtool", "--version") {
        let mut promtool = std::process::Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        std::io::Write::write_all(&mut promtool.stdin.take().unwrap(), text.as_bytes()).unwrap();
        let out = promtool.wait_with_output().unwrap();
        assert!(
            out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
            "promtool check metrics:\n{}{}\n---\n{text}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert!(
        text.contains("# TYPE keyward_bundle_serial gauge"),
        "{text}"
    );
    text.lines()
        .find_map(|l| l.strip_prefix("keyward_bundle_serial "))
        .unwrap_or_else(|| panic!("no keyward_bundle_serial sample in\n{text}"))
        .parse()
        .unwrap()
}

fn bundle_status(d: &Daemon) -> Value {
    status(d)["bundle"].clone()
}

/// Waits until the sidecar serves `serial`, or its refusal reason contains `refused`; returns
/// how long that took.
fn wait_bundle(d: &Daemon, serial: u64, refused: Option<&str>) -> Duration {
    let start = Instant::now();
    loop {
        let b = bundle_status(d);
        match refused {
            None if b["serial"] == serial => return start.elapsed(),
            Some(text)
                if b["refused"]["reason"]
                    .as_str()
                    .is_some_and(|r| r.contains(text)) =>
            {
                assert_eq!(
                    b["serial"], serial,
                    "the last good bundle keeps serving: {b}"
                );
                return start.elapsed();
            }
            _ => {}
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "bundle serial {serial} / refusal {refused:?} not seen: {b}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

async fn chat(d: &Daemon, token: &str, target: &str) -> (u16, String) {
    let path = if target == "anthropic" {
        "/anthropic/v1/messages"
    } else {
        "/openai/v1/chat/completions"
    };
    let (code, headers, _) = call_as(&d.socket(), token, path, &chat_body("gpt-4o", false)).await;
    (code, error_code(&headers))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bundle_is_served_read_only_and_replaced_like_a_kubernetes_secret() {
    let mock = MockUpstream::builder().start().await;
    let tmp = tempfile::tempdir().unwrap();
    let key = master_key_file(tmp.path(), "master.key");
    let mut author = Author::start(&mock, tmp.path(), &key);
    let openai_v1 = random_key("sk-proj-");
    let anthropic_key = random_key("sk-ant-");
    let (token, openai_cred) = author.d.provision("acme", "openai", &openai_v1, &[]);
    let (_, anthropic_cred) = author.d.provision("acme", "anthropic", &anthropic_key, &[]);
    let bundle1 = author.export();
    for secret in [&openai_v1, &anthropic_key, &token] {
        assert!(!contains(&bundle1, secret), "a key or token in the bundle");
    }
    let v: Value = serde_json::from_slice(&bundle1).unwrap();
    assert_eq!(v["format"], "keyward-bundle/v1");
    assert_eq!(v["serial"], 1);
    assert_eq!(v["instance"], status(&author.d)["instance"]);

    let mut secret_dir = SecretDir::new(&tmp.path().join("secret"), &bundle1);
    let s = sidecar(
        &mock,
        tmp.path(),
        &key,
        &secret_dir.dir,
        "bundle_poll_interval = \"1h\"",
    );
    assert_eq!(bundle_status(&s)["serial"], 1);
    const TEST: &str = "a_bundle_is_served_read_only_and_replaced_like_a_kubernetes_secret";
    assert_eq!(bundle_serial_metric(TEST, &s), 1);
    assert_eq!(chat(&s, &token, "openai").await.0, 200);
    assert_eq!(
        support::mock_upstream::key_of(&mock.last_request().unwrap()).as_deref(),
        Some(openai_v1.as_str())
    );
    assert_eq!(chat(&s, &token, "anthropic").await.0, 200);
    // Read-only: changes are refused naming the bundle and its serial.
    for args in [
        vec!["tenant", "add", "other"],
        vec!["client", "add", "--tenant", "acme", "--name", "x"],
        vec!["cred", "revoke", &openai_cred],
    ] {
        let out = s.cli(&args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(secret_dir.dir.to_str().unwrap()) && err.contains("serial 1"),
            "{err}"
        );
    }
    let out = s.cli_stdin(
        &[
            "cred", "add", "--tenant", "acme", "--target", "openai", "--name", "y",
        ],
        Some(b"sk-some-key-123456789"),
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("read-only"));
    // Listings and the local audit trail still work.
    assert_eq!(s.json_lines(&["cred", "list"]).len(), 2);
    assert_eq!(s.json_lines(&["client", "list"]).len(), 2);
    let rows = s.json_lines(&["audit", "query", "--tenant", "acme"]);
    assert!(
        rows.iter().any(|r| r["event"] == "request.resolved"),
        "{rows:?}"
    );

    // Rotate one key, revoke the other, roll out: inotify sees the swap within seconds.
    let openai_v2 = random_key("sk-proj-");
    author.rotate(&openai_cred, &openai_v2);
    author.d.ok(&["cred", "revoke", &anthropic_cred]);
    let bundle2 = author.export();
    assert!(!contains(&bundle2, &openai_v2));
    secret_dir.swap(&bundle2);
    let swapped = Instant::now();
    loop {
        let (code, _) = chat(&s, &token, "openai").await;
        assert_eq!(code, 200);
        let seen = support::mock_upstream::key_of(&mock.last_request().unwrap()).unwrap();
        if seen == openai_v2 {
            break;
        }
        assert_eq!(seen, openai_v1);
        assert!(
            swapped.elapsed() < Duration::from_secs(10),
            "rotation not picked up"
        );
    }
    eprintln!(
        "reload latency (inotify, swap to rotated key serving): {:?}",
        swapped.elapsed()
    );
    assert_eq!(bundle_status(&s)["serial"], 2);
    assert_eq!(bundle_serial_metric(TEST, &s), 2);
    let before = mock.request_count();
    let (code, error) = chat(&s, &token, "anthropic").await;
    assert_eq!((code, error.as_str()), (403, "scope_denied"));
    assert_eq!(mock.request_count(), before, "a revoked key is never sent");

    // Refused: the last good bundle keeps serving, status says why.
    let mut flipped = bundle2.clone();
    let at = flipped
        .windows(8)
        .position(|w| w == b"preview\\")
        .expect("a preview in the payload");
    flipped[at + 14] ^= 0x01;
    let foreign = {
        let other_dir = tmp.path().join("other");
        std::fs::create_dir(&other_dir).unwrap();
        let other_key = master_key_file(&other_dir, "master.key");
        let mut other = Author::start(&mock, &other_dir, &other_key);
        other.d.ok(&["tenant", "add", "acme"]);
        for _ in 0..5 {
            other.export();
        }
        other.export()
    };
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("flipped byte", flipped, "fails its MAC"),
        (
            "truncated",
            bundle2[..bundle2.len() / 2].to_vec(),
            "truncated",
        ),
        (
            "foreign master key",
            foreign,
            "exported under another master key",
        ),
        ("lower serial", bundle1.clone(), "not newer than serial 2"),
        (
            "not a bundle",
            b"apiVersion: v1\nkind: Secret\n".to_vec(),
            "is not a keyward bundle",
        ),
    ];
    for (name, bytes, reason) in cases {
        secret_dir.swap(&bytes);
        wait_bundle(&s, 2, Some(reason));
        let (code, _) = chat(&s, &token, "openai").await;
        assert_eq!(code, 200, "{name}: still serving");
        assert_eq!(
            support::mock_upstream::key_of(&mock.last_request().unwrap()).as_deref(),
            Some(openai_v2.as_str()),
            "{name}"
        );
        assert_eq!(bundle_serial_metric(TEST, &s), 2, "{name}");
    }
    // A good bundle after refusals is served, and the refusal is cleared.
    let bundle3 = author.export();
    secret_dir.swap(&bundle3);
    wait_bundle(&s, 3, None);
    assert!(bundle_status(&s)["refused"].is_null());
    assert_eq!(bundle_serial_metric(TEST, &s), 3);

    // Rollback across a restart: the state dir remembers serial 3.
    let home = s.home.clone();
    drop(s);
    secret_dir.swap(&bundle2);
    let extra = format!(
        "master_key_file = \"{}\"\nbundle = \"{}\"",
        key.display(),
        secret_dir.dir.display()
    );
    let config = support::targets_config(&mock, tmp.path(), &["openai"], &extra);
    let Err((_, err)) = Daemon::builder().config(&config).home(&home).try_start() else {
        panic!("a sidecar started from an older bundle");
    };
    assert!(
        err.contains("serial 2") && err.contains("already served serial 3"),
        "{err}"
    );
    secret_dir.swap(&bundle3);
    let s = Daemon::builder().config(&config).home(&home).start();
    assert_eq!(bundle_status(&s)["serial"], 3);
}

/// Without inotify (`bundle_watch = "poll"`), a replaced bundle file is found by polling.
#[tokio::test(flavor = "multi_thread")]
async fn polling_finds_a_replaced_bundle_file() {
    let mock = MockUpstream::builder().start().await;
    let tmp = tempfile::tempdir().unwrap();
    let key = master_key_file(tmp.path(), "master.key");
    let mut author = Author::start(&mock, tmp.path(), &key);
    let v1 = random_key("sk-");
    let (token, cred) = author.d.provision("acme", "openai", &v1, &[]);
    let file = tmp.path().join("served.bundle");
    std::fs::write(&file, author.export()).unwrap();
    let s = sidecar(
        &mock,
        tmp.path(),
        &key,
        &file,
        "bundle_watch = \"poll\"\nbundle_poll_interval = \"200ms\"",
    );
    assert_eq!(bundle_status(&s)["watch"], "poll");
    let v2 = random_key("sk-");
    author.rotate(&cred, &v2);
    let tmp_file = tmp.path().join("served.bundle.new");
    std::fs::write(&tmp_file, author.export()).unwrap();
    std::fs::rename(&tmp_file, &file).unwrap();
    let took = wait_bundle(&s, 2, None);
    eprintln!("reload latency (polling every 200ms, swap to serial served): {took:?}");
    assert_eq!(chat(&s, &token, "openai").await.0, 200);
    assert_eq!(
        support::mock_upstream::key_of(&mock.last_request().unwrap()).as_deref(),
        Some(v2.as_str())
    );
}

fn proc_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

fn proc_status_kb(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .map(|v| v.trim().trim_end_matches(" kB").trim().parse().unwrap())
        .unwrap()
}

/// Requests running through reloads keep working (0 failed of N), a request streaming across a
/// swap finishes, and 100 swaps while serving leak neither file descriptors nor locked memory
/// and end with the last bundle served.
#[tokio::test(flavor = "multi_thread")]
async fn reloads_under_load_fail_nothing_and_a_storm_leaks_nothing() {
    let mock = MockUpstream::builder().start().await;
    let tmp = tempfile::tempdir().unwrap();
    let key = master_key_file(tmp.path(), "master.key");
    let mut author = Author::start(&mock, tmp.path(), &key);
    let (token, cred) = author
        .d
        .provision("acme", "openai", &random_key("sk-"), &[]);
    let mut secret_dir = SecretDir::new(&tmp.path().join("secret"), &author.export());
    let s = sidecar(
        &mock,
        tmp.path(),
        &key,
        &secret_dir.dir,
        "lock_memory = \"secrets\"\nbundle_poll_interval = \"1h\"",
    );
    // A streamed response that started before a swap finishes after it, even though the swap
    // rotated the key that serves it.
    let stream = {
        let req = support::uds::post(
            "/openai/stall?ms=1500",
            &[("authorization", &support::uds::bearer(&token))],
            "{}",
        );
        support::uds::send(&s.socket(), req).await
    };
    assert_eq!(stream.status(), 200);
    let mut body = stream.into_body();
    let first = http_body_util::BodyExt::frame(&mut body)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.into_data().unwrap(), "first\n");
    author.rotate(&cred, &random_key("sk-"));
    secret_dir.swap(&author.export());
    wait_bundle(&s, 2, None);
    let rest = http_body_util::BodyExt::collect(body)
        .await
        .unwrap()
        .to_bytes();
    assert_eq!(rest, "rest\n");

    // Load: 8 clients call in a loop. A first round without swaps brings the process to its
    // working set (locked pages for 8 concurrent secrets, connections); the baseline is taken
    // after it, and the second round runs while 100 bundles are swapped in.
    let load = |stop: std::sync::Arc<std::sync::atomic::AtomicBool>| {
        (0..8)
            .map(|_| {
                let (socket, token, stop) = (s.socket(), token.clone(), stop.clone());
                tokio::spawn(async move {
                    let (mut ok, mut failed) = (0u32, Vec::new());
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        let (code, headers, body) = call_as(
                            &socket,
                            &token,
                            "/openai/v1/chat/completions",
                            &chat_body("gpt-4o", false),
                        )
                        .await;
                        if code == 200 {
                            ok += 1;
                        } else {
                            failed.push(format!("{code} {} {body}", error_code(&headers)));
                        }
                    }
                    (ok, failed)
                })
            })
            .collect::<Vec<_>>()
    };
    let warm = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let warmers = load(warm.clone());
    tokio::time::sleep(Duration::from_secs(2)).await;
    warm.store(true, std::sync::atomic::Ordering::Relaxed);
    for w in warmers {
        assert!(w.await.unwrap().1.is_empty());
    }
    std::thread::sleep(Duration::from_millis(200));
    let pid = s.pid();
    let (fds_before, locked_before) = (proc_fds(pid), proc_status_kb(pid, "VmLck:"));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let workers = load(stop.clone());
    let bundles: Vec<Vec<u8>> = (0..100).map(|_| author.export()).collect();
    let last_serial = author.exports as u64;
    for b in &bundles {
        secret_dir.swap(b);
        std::thread::sleep(Duration::from_millis(20));
    }
    wait_bundle(&s, last_serial, None);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut ok, mut failed) = (0, Vec::new());
    for w in workers {
        let (o, f) = w.await.unwrap();
        ok += o;
        failed.extend(f);
    }
    eprintln!(
        "during 100 swaps: {ok} requests served, {} failed; reloads: {}",
        failed.len(),
        bundle_status(&s)["reloads"]
    );
    assert!(
        failed.is_empty(),
        "0 failed of {}: {failed:?}",
        ok as usize + failed.len()
    );
    assert!(ok > 0);
    assert_eq!(bundle_status(&s)["serial"], last_serial);
    assert_eq!(chat(&s, &token, "openai").await.0, 200);
    std::thread::sleep(Duration::from_millis(200));
    let (fds_after, locked_after) = (proc_fds(pid), proc_status_kb(pid, "VmLck:"));
    eprintln!("fds {fds_before} -> {fds_after}, VmLck {locked_before} kB -> {locked_after} kB");
    assert!(
        fds_after <= fds_before + 2,
        "fds {fds_before} -> {fds_after}"
    );
    // Every locked allocation takes at least one page of its own (between guard pages), so a
    // leak of one per swap would show as 400 KiB or more after 100 swaps; a few pages of slack
    // absorb caches that warm up late on a loaded machine.
    assert!(
        locked_after <= locked_before + 64,
        "locked memory {locked_before} kB -> {locked_after} kB"
    );
}

/// Sends admin requests straight to the socket, one JSON line each (faster than a CLI process
/// per request when thousands are needed).
fn admin_batch(socket: &Path, requests: impl Iterator<Item = (&'static str, Value)>) {
    for (path, body) in requests {
        let (status, answer) = support::daemon::admin_http(socket, "POST", path, &body.to_string());
        assert!((200..300).contains(&status), "{path} {body}: {answer}");
    }
}

/// Measurement, not a check (run with `--ignored --nocapture`): the size of a bundle of 1,000
/// tenants × 5 credentials, the time to load it, and the RSS of a sidecar serving it.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "a measurement; run with --ignored --nocapture"]
async fn measure_a_sidecar_serving_1000_tenants_by_5_credentials() {
    let mock = MockUpstream::builder().start().await;
    let tmp = tempfile::tempdir().unwrap();
    let key = master_key_file(tmp.path(), "master.key");
    let mut author = Author::start(&mock, tmp.path(), &key);
    let started = Instant::now();
    admin_batch(
        &author.d.admin_socket(),
        (0..1000).flat_map(|t| {
            let tenant = format!("tenant-{t:04}");
            let mut reqs = vec![("/v1/tenants", serde_json::json!({"name": tenant}))];
            reqs.push(("/v1/clients", serde_json::json!({"tenant": tenant, "name": "app", "team": null, "uid": null, "workflows": []})));
            for c in 0..5 {
                reqs.push(("/v1/credentials", serde_json::json!({
                    "tenant": tenant, "target": "openai", "name": format!("key-{c}"),
                    "models": [], "capabilities": [], "teams": [], "workflows": [], "priority": null,
                    "secret": random_key("sk-proj-"),
                })));
            }
            reqs
        }),
    );
    eprintln!(
        "authored 1000 tenants x 5 credentials in {:?}",
        started.elapsed()
    );
    let bundle = author.export();
    eprintln!("bundle: {} bytes", bundle.len());
    let mut secret_dir = SecretDir::new(&tmp.path().join("secret"), &bundle);
    let started = Instant::now();
    let s = sidecar(
        &mock,
        tmp.path(),
        &key,
        &secret_dir.dir,
        "bundle_poll_interval = \"1h\"",
    );
    eprintln!(
        "sidecar started serving the bundle in {:?}",
        started.elapsed()
    );
    let (token, _) = author
        .d
        .provision("tenant-0999", "openai", &random_key("sk-"), &[]);
    secret_dir.swap(&author.export());
    let took = wait_bundle(&s, 2, None);
    eprintln!("reload of the 1000x5 bundle (inotify, swap to served): {took:?}");
    for _ in 0..200 {
        assert_eq!(chat(&s, &token, "openai").await.0, 200);
    }
    let pid = s.pid();
    eprintln!(
        "sidecar RSS after 200 requests: {} kB (VmHWM {} kB)",
        proc_status_kb(pid, "VmRSS:"),
        proc_status_kb(pid, "VmHWM:")
    );
}

// === Kubernetes manifests ===

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The venv holding `kubernetes-validate` (created by `.ci/run`; made here when missing).
fn k8s_venv(test: &str) -> Option<PathBuf> {
    let venv = root().join("target/k8s-venv");
    let validate = venv.join("bin/kubernetes-validate");
    if !validate.exists() {
        let _ = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status();
        let _ = Command::new(venv.join("bin/pip"))
            .args(["install", "-q", "kubernetes-validate==1.37.0"])
            .status();
    }
    support::needs::program(test, validate.to_str().unwrap(), "--version").then_some(venv)
}

fn manifests() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(root().join("examples/kubernetes"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 2, "{files:?}");
    files
}

/// Every manifest passes the Kubernetes schema (strict: no unknown field), the sidecar is a
/// native sidecar probed with `keyward status`, its config is one keyward accepts, and the app
/// container can reach the data socket but mounts neither the master key, nor the bundle, nor
/// keyward's state, and gets no KMS credentials.
#[test]
fn kubernetes_manifests_validate_and_keep_keys_away_from_the_app() {
    let test = "kubernetes_manifests_validate_and_keep_keys_away_from_the_app";
    let Some(venv) = k8s_venv(test) else { return };
    let validate = |file: &Path| {
        Command::new(venv.join("bin/kubernetes-validate"))
            .args(["--strict", "-k", "1.33.0"])
            .arg(file)
            .output()
            .unwrap()
    };
    for file in manifests() {
        let out = validate(&file);
        assert!(
            out.status.success(),
            "{}: {}{}",
            file.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // The validator does reject a wrong field (so a pass above means something).
    let tmp = tempfile::tempdir().unwrap();
    let broken = tmp.path().join("broken.yaml");
    let text = std::fs::read_to_string(root().join("examples/kubernetes/kms.yaml")).unwrap();
    std::fs::write(
        &broken,
        text.replace("restartPolicy: Always", "restartPolicyy: Always"),
    )
    .unwrap();
    assert!(!validate(&broken).status.success());

    for file in manifests() {
        let out = Command::new(venv.join("bin/python"))
            .args([
                "-c",
                "import json, sys, yaml; print(json.dumps(list(yaml.safe_load_all(open(sys.argv[1])))))",
            ])
            .arg(&file)
            .output()
            .unwrap();
        assert!(out.status.success());
        let docs: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
        let name = file.display().to_string();
        let mut deployments = 0;
        for doc in &docs {
            if doc["kind"] == "ConfigMap" {
                let toml = doc["data"]["keyward.toml"].as_str().unwrap();
                let env = |_: &str| None;
                let config = keyward::config::Config::from_toml(toml, &file, &env)
                    .unwrap_or_else(|e| panic!("{name}: keyward refuses its config: {e}"));
                assert_eq!(
                    config.audit_export,
                    Some(keyward::config::AuditExport::Stdout)
                );
                assert!(config.bundle.is_some() && config.require_external_master_key);
            }
            if doc["kind"] != "Deployment" {
                continue;
            }
            deployments += 1;
            let pod = &doc["spec"]["template"]["spec"];
            let volumes = pod["volumes"].as_array().unwrap();
            let sidecar = pod["initContainers"]
                .as_array()
                .unwrap()
                .iter()
                .find(|c| c["name"] == "keyward")
                .expect("keyward in initContainers");
            assert_eq!(
                sidecar["restartPolicy"], "Always",
                "{name}: a native sidecar"
            );
            assert_eq!(
                sidecar["startupProbe"]["exec"]["command"],
                serde_json::json!(["keyward", "status"]),
                "{name}"
            );
            assert!(
                sidecar["resources"]["requests"]["memory"].is_string(),
                "{name}"
            );
            // What only keyward may see: Secret volumes (bundle, master key) and its state.
            let private: Vec<&str> = volumes
                .iter()
                .filter(|v| v.get("secret").is_some() || v["name"] == "keyward-state")
                .map(|v| v["name"].as_str().unwrap())
                .collect();
            assert!(private.contains(&"keyward-bundle"), "{name}: {private:?}");
            let socket_volume = volumes
                .iter()
                .find(|v| v["name"] == "keyward-socket")
                .expect("socket volume");
            assert!(socket_volume.get("emptyDir").is_some(), "{name}");
            let mounts = |c: &Value| -> Vec<String> {
                c["volumeMounts"]
                    .as_array()
                    .map(|m| {
                        m.iter()
                            .map(|m| m["name"].as_str().unwrap().to_string())
                            .collect()
                    })
                    .unwrap_or_default()
            };
            assert!(mounts(sidecar).contains(&"keyward-socket".to_string()));
            let apps: Vec<&Value> = pod["containers"].as_array().unwrap().iter().collect();
            assert!(!apps.is_empty());
            let skipped = doc["spec"]["template"]["metadata"]["annotations"]
                ["eks.amazonaws.com/skip-containers"]
                .as_str()
                .unwrap_or("");
            for app in apps {
                let app_name = app["name"].as_str().unwrap();
                let m = mounts(app);
                assert!(
                    m.contains(&"keyward-socket".to_string()),
                    "{name}: {app_name} reaches the socket"
                );
                for p in &private {
                    assert!(!m.contains(&p.to_string()), "{name}: {app_name} mounts {p}");
                }
                // No environment variable or envFrom drawn from the bundle or key Secrets.
                let text = app.to_string();
                for secret in volumes
                    .iter()
                    .filter_map(|v| v["secret"]["secretName"].as_str())
                {
                    assert!(
                        !text.contains(secret),
                        "{name}: {app_name} reads Secret {secret}"
                    );
                }
                // With IRSA, the pod identity webhook must not give the app KMS credentials.
                if pod["serviceAccountName"].is_string() {
                    assert!(
                        skipped.split(',').any(|s| s.trim() == app_name),
                        "{name}: {app_name} would get the IRSA token"
                    );
                }
            }
        }
        assert_eq!(deployments, 1, "{name}");
    }
}

// === the walk-through ===

/// `examples/fleet.sh` runs end to end: three sidecars serve one bundle, a rotation reaches all
/// three, and their merged audit streams verify.
#[test]
fn the_fleet_walkthrough_runs() {
    let test = "the_fleet_walkthrough_runs";
    if !support::needs::program(test, "curl", "--version")
        || !support::needs::program(test, "python3", "--version")
    {
        return;
    }
    let out = Command::new("bash")
        .arg(root().join("examples/fleet.sh"))
        .env("KEYWARD", KEYWARD)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    for i in 1..=3 {
        assert!(
            text.contains(&format!(
                "sidecar-{i}: serial 2, served with the key ending BBBB"
            )),
            "{text}"
        );
    }
    assert!(text.contains("read-only"), "{text}");
    assert!(
        text.contains("audit lines ok: 12 rows of 3 instance(s) checked"),
        "{text}"
    );
}

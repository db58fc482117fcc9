//! Local trust: keyward and its CLI refuse what another local user could have planted — a fake
//! admin socket, a state directory or key file that user owns or can write — before anything
//! secret is read or sent. These tests act as a second uid (65534, `nobody`), so they need root.

mod support;

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::daemon::{Daemon, KEYWARD, random_key};

const NOBODY: u32 = 65534;

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn chown(path: &Path, uid: u32) {
    nix::unistd::chown(
        path,
        Some(nix::unistd::Uid::from_raw(uid)),
        Some(nix::unistd::Gid::from_raw(uid)),
    )
    .unwrap();
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A fake admin socket served by `nobody` in a directory `nobody` controls: it answers every
/// request with success and records how many bytes it was sent.
struct FakeAdmin {
    child: std::process::Child,
    socket: std::path::PathBuf,
    received: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl FakeAdmin {
    fn start() -> FakeAdmin {
        let dir = tempfile::Builder::new()
            .prefix("kw-fake")
            .tempdir_in("/tmp")
            .unwrap();
        chmod(dir.path(), 0o755);
        chown(dir.path(), NOBODY);
        let socket = dir.path().join("admin.sock");
        let received = dir.path().join("received");
        let script = r#"
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.bind(sys.argv[1]); s.listen(1)
import os; os.chmod(sys.argv[1], 0o666)
total = 0
while True:
    c, _ = s.accept()
    c.settimeout(2)
    try:
        c.sendall(b'HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n[]')
        while True:
            b = c.recv(65536)
            if not b: break
            total += len(b)
    except Exception:
        pass
    open(sys.argv[2], "w").write(str(total))
    c.close()
"#;
        let child = Command::new("/usr/bin/python3")
            .args(["-c", script])
            .arg(&socket)
            .arg(&received)
            .uid(NOBODY)
            .gid(NOBODY)
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn the fake admin server");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            assert!(
                Instant::now() < deadline,
                "fake admin socket never appeared"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(100));
        FakeAdmin {
            child,
            socket,
            received,
            _dir: dir,
        }
    }
}

impl Drop for FakeAdmin {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn the_cli_sends_no_secret_to_an_admin_socket_served_by_another_user() {
    if !support::needs::root("the_cli_sends_no_secret_to_an_admin_socket_served_by_another_user") {
        return;
    }
    let fake = FakeAdmin::start();
    let key = random_key("sk-live-");
    let mut child = Command::new(KEYWARD)
        .args(["cred", "add", "--tenant", "acme", "--target", "openai"])
        .args(["--name", "prod", "--admin-socket"])
        .arg(&fake.socket)
        .env_remove("KEYWARD_DAEMON_USER")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(key.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("served by uid 65534") && err.contains("nothing was sent"),
        "{err}"
    );
    assert!(!err.contains(&key) && !String::from_utf8_lossy(&out.stdout).contains(&key));
    // The fake server saw the connection close without a single byte.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !fake.received.exists() {
        assert!(
            Instant::now() < deadline,
            "the fake server never saw the close"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(std::fs::read_to_string(&fake.received).unwrap(), "0");

    // Named explicitly as the daemon's user, the same server is trusted (how an operator
    // reaches a daemon that runs as a service account): the request is sent.
    let out = Command::new(KEYWARD)
        .args([
            "tenant",
            "list",
            "--daemon-user",
            "nobody",
            "--admin-socket",
        ])
        .arg(&fake.socket)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn a_state_directory_planted_by_another_user_is_refused_and_left_untouched() {
    if !support::needs::root(
        "a_state_directory_planted_by_another_user_is_refused_and_left_untouched",
    ) {
        return;
    }
    let outer = tempfile::Builder::new()
        .prefix("kw-plant")
        .tempdir_in("/tmp")
        .unwrap();
    let home = outer.path().join("kw");
    std::fs::create_dir(&home).unwrap();
    let planted_key = "ab".repeat(32);
    std::fs::write(home.join("master.key"), &planted_key).unwrap();
    chmod(&home.join("master.key"), 0o644);
    chown(&home.join("master.key"), NOBODY);
    chmod(&home, 0o777);
    chown(&home, NOBODY);

    let out = Command::new(KEYWARD)
        .arg("serve")
        .env_clear()
        .env("KEYWARD_HOME", &home)
        .output()
        .unwrap();
    let err = stderr(&out);
    assert!(!out.status.success());
    assert!(
        err.contains(&format!("state directory {}", home.display()))
            && err.contains("owned by uid 65534"),
        "{err}"
    );
    assert!(!err.contains(&planted_key), "{err}");
    // Nothing was bound, and the directory's mode and owner are as the other user left them.
    assert!(!home.join("admin.sock").exists() && !home.join("keyward.sock").exists());
    let meta = std::fs::metadata(&home).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!((meta.uid(), meta.mode() & 0o7777), (NOBODY, 0o777));
    assert!(!home.join("keyward.db").exists());

    // Our own directory, but writable by others: refused with the fix.
    chown(&home, 0);
    let out = Command::new(KEYWARD)
        .arg("serve")
        .env_clear()
        .env("KEYWARD_HOME", &home)
        .output()
        .unwrap();
    let err = stderr(&out);
    assert!(
        err.contains("writable by group and others") && err.contains("chmod go-w"),
        "{err}"
    );

    // Our own 0700 directory, but a key file inside that another user owns.
    chmod(&home, 0o700);
    let out = Command::new(KEYWARD)
        .arg("serve")
        .env_clear()
        .env("KEYWARD_HOME", &home)
        .output()
        .unwrap();
    let err = stderr(&out);
    assert!(
        err.contains(&format!("{}", home.join("master.key").display()))
            && err.contains("owned by uid 65534"),
        "{err}"
    );
    assert!(!home.join("keyward.db").exists(), "nothing may be created");
}

#[test]
fn key_files_readable_by_others_or_behind_a_symlink_are_refused() {
    if !support::needs::root("key_files_readable_by_others_or_behind_a_symlink_are_refused") {
        return;
    }
    let keys = tempfile::tempdir().unwrap();
    let file = keys.path().join("master.key");
    std::fs::write(&file, "cd".repeat(32)).unwrap();
    chmod(&file, 0o644);
    let err = Daemon::builder()
        .arg("--master-key-file")
        .arg(file.to_str().unwrap())
        .try_start()
        .err()
        .expect("a world-readable key file must be refused");
    assert!(
        err.1.contains("other users can read it") && err.1.contains("chmod 600"),
        "{}",
        err.1
    );
    chmod(&file, 0o600);
    let link = keys.path().join("link.key");
    std::os::unix::fs::symlink(&file, &link).unwrap();
    let err = Daemon::builder()
        .arg("--master-key-file")
        .arg(link.to_str().unwrap())
        .try_start()
        .err()
        .expect("a symlinked key file must be refused");
    assert!(err.1.contains("symbolic link"), "{}", err.1);
    // Root-owned and group-readable (root:keyward 0640) serves a daemon running as nobody.
    chmod(&file, 0o640);
    nix::unistd::chown(&file, Some(nix::unistd::Uid::from_raw(0)), None).unwrap();
    nix::unistd::chown(keys.path(), None, Some(nix::unistd::Gid::from_raw(NOBODY))).unwrap();
    chmod(keys.path(), 0o750);
    nix::unistd::chown(&file, None, Some(nix::unistd::Gid::from_raw(NOBODY))).unwrap();
    let d = Daemon::builder()
        .uid(NOBODY)
        .arg("--master-key-file")
        .arg(file.to_str().unwrap())
        .start();
    assert!(
        d.json_lines(&["status"])[0]["master_key_source"]
            .as_str()
            .unwrap()
            .contains("master.key")
    );
}

#[test]
fn a_state_file_planted_by_another_user_is_refused() {
    if !support::needs::root("a_state_file_planted_by_another_user_is_refused") {
        return;
    }
    let d = Daemon::builder().start();
    let home = d.home.clone();
    let mut d = d;
    assert_eq!(d.terminate(), Some(0));
    // Another user swaps in its own database (or one it can write).
    chown(&home.join("keyward.db"), NOBODY);
    let err = Daemon::builder()
        .home(&home)
        .try_start()
        .err()
        .expect("a foreign database must be refused");
    assert!(
        err.1.contains("keyward.db") && err.1.contains("owned by uid 65534"),
        "{}",
        err.1
    );
    chown(&home.join("keyward.db"), 0);
    chmod(&home.join("keyward.db"), 0o666);
    let err = Daemon::builder()
        .home(&home)
        .try_start()
        .err()
        .expect("a world-writable database must be refused");
    assert!(
        err.1.contains("keyward.db") && err.1.contains("writable by"),
        "{}",
        err.1
    );
    chmod(&home.join("keyward.db"), 0o600);
    Daemon::builder().home(&home).start();
    drop(d);
}

#[test]
fn a_remote_tcp_listener_is_refused_unless_explicitly_allowed() {
    let err = Daemon::builder()
        .config("listen_tcp = \"0.0.0.0:0\"\n")
        .try_start()
        .err()
        .expect("a non-loopback listener must be refused");
    assert!(
        err.1.contains("not a loopback address")
            && err.1.contains("clear text")
            && err.1.contains("listen_tcp_allow_remote"),
        "{}",
        err.1
    );
    let d = Daemon::builder()
        .config("listen_tcp = \"0.0.0.0:0\"\nlisten_tcp_allow_remote = true\n")
        .start();
    assert!(
        d.json_lines(&["status"])[0]["listen_tcp"]
            .as_str()
            .unwrap()
            .starts_with("0.0.0.0:")
    );
}

#[test]
fn audit_time_bounds_near_the_integer_limits_do_not_wrap() {
    let d = Daemon::builder().start();
    d.ok(&["tenant", "add", "acme"]);
    let ask = |filter: &str| -> (u16, serde_json::Value) {
        let (status, body) = support::daemon::admin_http(
            &d.admin_socket(),
            "POST",
            "/v1/audit/search",
            &format!("{{{filter}}}"),
        );
        (status, serde_json::from_str(&body).unwrap())
    };
    let rows = |v: &serde_json::Value| v.as_array().map(Vec::len);
    // Sanity: the tenant row is there without bounds.
    assert!(rows(&ask("\"limit\":10").1).unwrap() >= 1);
    for filter in [
        format!("\"since\":{}", i64::MAX),
        format!("\"since\":{}", i64::MAX / 1000 + 1),
        format!("\"until\":{}", i64::MIN),
        format!("\"until\":{}", i64::MIN / 1000 - 1),
    ] {
        let (status, answer) = ask(&filter);
        assert_eq!(status, 200, "{filter}: {answer}");
        assert_eq!(rows(&answer), Some(0), "{filter} wrapped around: {answer}");
    }
    // The same through the query string of GET /v1/audit/events.
    let (status, body) = support::daemon::admin_http(
        &d.admin_socket(),
        "GET",
        &format!("/v1/audit/events?since={}", i64::MAX),
        "",
    );
    assert_eq!((status, body.as_str()), (200, "[]"));
    // A "that long ago" longer than time itself means every row, not none.
    let out = d.json_lines(&["audit", "query", "--since", &format!("{}s", u64::MAX)]);
    assert!(!out.is_empty());
}

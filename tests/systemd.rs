//! systemd integration, end to end: the real `keyward` binary started through
//! `systemd-socket-activate` (socket activation) and with `NOTIFY_SOCKET` (readiness).
//!
//! Needs `systemd-socket-activate` on `PATH` (Debian package `systemd`).

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

const KEYWARD: &str = env!("CARGO_BIN_EXE_keyward");
const SOCKET_ACTIVATE: &str = "systemd-socket-activate";
/// Debug builds on a busy two-core machine can take a while to open the store and serve.
const START_TIMEOUT: Duration = Duration::from_secs(30);

// === fixtures ===

/// A running daemon that is killed (and reaped) when the test ends, even on panic.
struct Daemon {
    child: Child,
    stdout: PathBuf,
    stderr: PathBuf,
}

impl Daemon {
    /// Starts `command` with stdout/stderr captured to files in `dir`.
    fn spawn(mut command: Command, dir: &Path) -> Daemon {
        let stdout = dir.join("daemon.out");
        let stderr = dir.join("daemon.err");
        let child = command
            .stdin(Stdio::null())
            .stdout(File::create(&stdout).unwrap())
            .stderr(File::create(&stderr).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {command:?}: {e}"));
        Daemon {
            child,
            stdout,
            stderr,
        }
    }

    fn output(&self) -> String {
        let out = std::fs::read_to_string(&self.stdout).unwrap_or_default();
        let err = std::fs::read_to_string(&self.stderr).unwrap_or_default();
        format!("--- stdout ---\n{out}\n--- stderr ---\n{err}")
    }

    /// Waits for the process to exit on its own.
    fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A fresh `KEYWARD_HOME`, short enough for socket paths (108-byte limit).
fn home() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("kw-sd-")
        .tempdir_in("/tmp")
        .unwrap()
}

/// `systemd-socket-activate` listening on `sockets`, exec'ing `keyward serve` on first contact.
fn socket_activated(home: &Path, sockets: &[&Path], fdnames: Option<&str>) -> Command {
    let found = Command::new(SOCKET_ACTIVATE)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    assert!(
        found.is_ok_and(|s| s.success()),
        "{SOCKET_ACTIVATE} not found on PATH: install the Debian package `systemd`"
    );
    let mut command = Command::new(SOCKET_ACTIVATE);
    for socket in sockets {
        command.arg("--listen").arg(socket);
    }
    if let Some(names) = fdnames {
        command.arg(format!("--fdname={names}"));
    }
    // systemd-socket-activate passes only a handful of variables through; name the rest.
    command
        .arg(format!("--setenv=KEYWARD_HOME={}", home.display()))
        .arg(KEYWARD)
        .arg("serve")
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default());
    command
}

fn wait_for_path(path: &Path, daemon: &mut Daemon) {
    let deadline = Instant::now() + START_TIMEOUT;
    while !path.exists() {
        if let Some(status) = daemon.child.try_wait().unwrap() {
            panic!(
                "launcher exited ({status}) before creating {}\n{}",
                path.display(),
                daemon.output()
            );
        }
        assert!(
            Instant::now() < deadline,
            "{} never appeared\n{}",
            path.display(),
            daemon.output()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn status(admin_socket: &Path) -> Output {
    Command::new(KEYWARD)
        .arg("status")
        .arg("--admin-socket")
        .arg(admin_socket)
        .env_remove("KEYWARD_ADMIN_SOCKET")
        .env_remove("NOTIFY_SOCKET")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// Runs `keyward status` until it succeeds (the daemon may still be starting) or time runs out.
fn status_until_ok(admin_socket: &Path, daemon: &mut Daemon) -> Output {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        let out = status(admin_socket);
        if out.status.success() {
            return out;
        }
        if let Some(exit) = daemon.child.try_wait().unwrap() {
            panic!(
                "daemon exited ({exit}); last status: {}\n{}",
                String::from_utf8_lossy(&out.stderr),
                daemon.output()
            );
        }
        assert!(
            Instant::now() < deadline,
            "`keyward status` kept failing ({}): {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            daemon.output()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Identity of the socket file: replaced if the daemon unlinked and bound it again.
fn inode(path: &Path) -> (u64, u64) {
    let meta = std::fs::metadata(path).unwrap();
    (meta.dev(), meta.ino())
}

/// Sends a bare HTTP/1.1 request over `socket` and returns the raw response head and body.
fn http_get(socket: &Path, path: &str) -> String {
    let mut stream = UnixStream::connect(socket).unwrap();
    stream.set_read_timeout(Some(START_TIMEOUT)).unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: keyward\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    response
}

// === socket activation ===

#[test]
fn socket_activated_daemon_serves_on_the_passed_sockets() {
    let home = home();
    let data = home.path().join("keyward.sock");
    let admin = home.path().join("admin.sock");
    let mut daemon = Daemon::spawn(
        socket_activated(home.path(), &[&data, &admin], Some("data:admin")),
        home.path(),
    );
    wait_for_path(&admin, &mut daemon);
    wait_for_path(&data, &mut daemon);
    let before = (inode(&data), inode(&admin));

    // The first connection is what makes the launcher exec keyward.
    let out = status_until_ok(&admin, &mut daemon);
    assert!(
        !out.stdout.is_empty(),
        "`keyward status` printed nothing\n{}",
        daemon.output()
    );

    // Same socket files: keyward served the inherited listeners instead of binding its own.
    assert_eq!(
        (inode(&data), inode(&admin)),
        before,
        "a socket file was replaced\n{}",
        daemon.output()
    );
    assert!(
        daemon.output().contains("socket-activated"),
        "the daemon does not report using activated sockets\n{}",
        daemon.output()
    );

    // The data listener is served too: an unauthenticated request gets keyward's own refusal.
    let response = http_get(&data, "/openai/v1/models");
    assert!(
        response.starts_with("HTTP/1.1 401"),
        "unexpected data-plane answer: {response}\n{}",
        daemon.output()
    );
    assert!(
        response
            .to_ascii_lowercase()
            .contains("keyward-error: unauthenticated"),
        "{response}"
    );
    assert!(
        daemon.child.try_wait().unwrap().is_none(),
        "daemon exited\n{}",
        daemon.output()
    );
}

#[test]
fn unnamed_activated_sockets_are_data_then_admin() {
    let home = home();
    let data = home.path().join("keyward.sock");
    let admin = home.path().join("admin.sock");
    let mut daemon = Daemon::spawn(
        socket_activated(home.path(), &[&data, &admin], None),
        home.path(),
    );
    wait_for_path(&admin, &mut daemon);
    let before = inode(&admin);
    status_until_ok(&admin, &mut daemon);
    assert_eq!(inode(&admin), before, "{}", daemon.output());
    let response = http_get(&data, "/openai/v1/models");
    assert!(response.starts_with("HTTP/1.1 401"), "{response}");
}

#[test]
fn unknown_socket_name_stops_the_daemon_with_its_name() {
    let home = home();
    let data = home.path().join("keyward.sock");
    let other = home.path().join("metrics.sock");
    let mut daemon = Daemon::spawn(
        socket_activated(home.path(), &[&data, &other], Some("data:metrics")),
        home.path(),
    );
    wait_for_path(&data, &mut daemon);
    // Trigger activation; the daemon must refuse rather than guess what `metrics` is.
    let _poke = UnixStream::connect(&data).unwrap();
    let exit = daemon
        .wait_exit(START_TIMEOUT)
        .unwrap_or_else(|| panic!("daemon kept running\n{}", daemon.output()));
    assert!(!exit.success(), "{}", daemon.output());
    let output = daemon.output();
    assert!(output.contains("\"metrics\""), "{output}");
    assert!(output.contains("FileDescriptorName="), "{output}");
    assert!(
        !home.path().join("admin.sock").exists(),
        "daemon bound an admin socket after refusing activation\n{output}"
    );
}

// === readiness ===

#[test]
fn ready_is_sent_once_the_admin_socket_answers() {
    let home = home();
    let notify_path = home.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    let admin = home.path().join("admin.sock");

    let mut command = Command::new(KEYWARD);
    command
        .arg("serve")
        .env("KEYWARD_HOME", home.path())
        .env("NOTIFY_SOCKET", &notify_path)
        .env_remove("LISTEN_PID")
        .env_remove("LISTEN_FDS")
        .env_remove("LISTEN_FDNAMES")
        .env_remove("KEYWARD_CONFIG")
        .env_remove("KEYWARD_MASTER_KEY")
        .env_remove("CREDENTIALS_DIRECTORY");
    let mut daemon = Daemon::spawn(command, home.path());

    notify
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let deadline = Instant::now() + START_TIMEOUT;
    let mut seen = Vec::new();
    loop {
        let mut buf = [0u8; 4096];
        match notify.recv(&mut buf) {
            Ok(n) => {
                let message = String::from_utf8_lossy(&buf[..n]).into_owned();
                let ready = message.lines().any(|l| l == "READY=1");
                seen.push(message);
                if ready {
                    break;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => panic!("notify socket: {e}"),
        }
        if let Some(exit) = daemon.child.try_wait().unwrap() {
            panic!(
                "daemon exited ({exit}) before READY=1; got {seen:?}\n{}",
                daemon.output()
            );
        }
        assert!(
            Instant::now() < deadline,
            "no READY=1 within {START_TIMEOUT:?}; got {seen:?}\n{}",
            daemon.output()
        );
    }

    // Ready means ready: the very first attempt must be answered, no retry.
    let out = status(&admin);
    assert!(
        out.status.success(),
        "admin socket did not answer right after READY=1: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        daemon.output()
    );
    assert!(
        daemon.child.try_wait().unwrap().is_none(),
        "{}",
        daemon.output()
    );

    // SIGTERM: the manager is told the daemon is stopping, and the drain ends in a clean exit.
    let pid = nix::unistd::Pid::from_raw(daemon.child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        let mut buf = [0u8; 4096];
        if let Ok(n) = notify.recv(&mut buf)
            && String::from_utf8_lossy(&buf[..n])
                .lines()
                .any(|l| l == "STOPPING=1")
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no STOPPING=1 after SIGTERM\n{}",
            daemon.output()
        );
    }
    let exit = daemon
        .wait_exit(START_TIMEOUT)
        .unwrap_or_else(|| panic!("daemon did not exit after SIGTERM\n{}", daemon.output()));
    assert!(exit.success(), "exit {exit}\n{}", daemon.output());
}

// === clean exit ===

#[test]
fn sigterm_keeps_the_passed_socket_and_removes_the_one_keyward_bound() {
    let home = home();
    let data = home.path().join("keyward.sock");
    let admin = home.path().join("admin.sock");
    // Only the data socket comes from the manager; keyward binds the admin socket itself.
    let mut daemon = Daemon::spawn(
        socket_activated(home.path(), &[&data], Some("data")),
        home.path(),
    );
    wait_for_path(&data, &mut daemon);
    let passed = inode(&data);
    let _poke = UnixStream::connect(&data).unwrap();
    status_until_ok(&admin, &mut daemon);
    let pid = nix::unistd::Pid::from_raw(daemon.child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let exit = daemon
        .wait_exit(START_TIMEOUT)
        .unwrap_or_else(|| panic!("daemon did not exit after SIGTERM\n{}", daemon.output()));
    assert!(exit.success(), "exit {exit}\n{}", daemon.output());
    assert_eq!(
        inode(&data),
        passed,
        "the socket systemd passed in was removed or replaced\n{}",
        daemon.output()
    );
    assert!(
        !admin.exists(),
        "the admin socket keyward bound itself is still there after a clean exit\n{}",
        daemon.output()
    );
}

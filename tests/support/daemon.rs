//! A real `keyward serve` process in a temporary home, driven through its CLI and sockets.
//! Killed (and reaped) on drop, so a failing test leaves no daemon behind.

#![allow(dead_code)]

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The binary under test.
pub const KEYWARD: &str = env!("CARGO_BIN_EXE_keyward");

/// A random provider-style key, different in every test, so greps for it are meaningful.
pub fn random_key(prefix: &str) -> String {
    let mut bytes = [0u8; 24];
    getrandom_fill(&mut bytes);
    let body: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("{prefix}{body}")
}

fn getrandom_fill(buf: &mut [u8]) {
    use std::io::Read;
    std::fs::File::open("/dev/urandom")
        .unwrap()
        .read_exact(buf)
        .unwrap();
}

/// How to start a daemon.
#[derive(Default)]
pub struct DaemonBuilder {
    config: Option<String>,
    env: Vec<(String, String)>,
    args: Vec<String>,
    home: Option<PathBuf>,
    uid: Option<u32>,
    nofile: Option<u64>,
}

impl DaemonBuilder {
    /// Writes `toml` to `<home>/keyward.toml` and passes `--config`.
    pub fn config(mut self, toml: &str) -> Self {
        self.config = Some(toml.to_string());
        self
    }

    /// Sets an environment variable for the daemon.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Extra `serve` arguments.
    pub fn arg(mut self, arg: &str) -> Self {
        self.args.push(arg.into());
        self
    }

    /// Runs the daemon as this uid (and gid), with its home owned by it. Needs root.
    pub fn uid(mut self, uid: u32) -> Self {
        self.uid = Some(uid);
        self
    }

    /// Runs the daemon with this many file descriptors at most (soft and hard `RLIMIT_NOFILE`,
    /// set by util-linux `prlimit`, which then execs the daemon: same pid).
    pub fn nofile(mut self, n: u64) -> Self {
        self.nofile = Some(n);
        self
    }

    /// Reuses an existing home (to restart over the same store).
    pub fn home(mut self, home: &Path) -> Self {
        self.home = Some(home.to_path_buf());
        self
    }

    /// The `serve` command this builder describes, with a fresh or given home.
    pub fn command(&self, home: &Path) -> Command {
        let mut cmd = match self.nofile {
            Some(n) => {
                let mut cmd = Command::new("prlimit");
                cmd.arg(format!("--nofile={n}:{n}")).arg("--").arg(KEYWARD);
                cmd
            }
            None => Command::new(KEYWARD),
        };
        cmd.arg("serve").args(&self.args);
        if let Some(uid) = self.uid {
            use std::os::unix::process::CommandExt;
            nix::unistd::chown(
                home,
                Some(nix::unistd::Uid::from_raw(uid)),
                Some(nix::unistd::Gid::from_raw(uid)),
            )
            .unwrap();
            cmd.uid(uid).gid(uid);
        }
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("KEYWARD_HOME", home)
            .env("KEYWARD_LOG", "info");
        if let Some(toml) = &self.config {
            let path = home.join("keyward.toml");
            std::fs::write(&path, toml).unwrap();
            cmd.arg("--config").arg(path);
        }
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd
    }

    /// Starts the daemon and waits until its admin socket answers.
    pub fn start(self) -> Daemon {
        self.try_start().unwrap_or_else(|(out, err)| {
            panic!("daemon did not start\nstdout:\n{out}\nstderr:\n{err}")
        })
    }

    /// Starts the daemon; on failure returns its stdout and stderr.
    pub fn try_start(self) -> Result<Daemon, (String, String)> {
        let (tmp, home) = match &self.home {
            Some(h) => (None, h.clone()),
            None => {
                let t = tempfile::Builder::new()
                    .prefix("kw")
                    .tempdir_in("/tmp")
                    .unwrap();
                let h = t.path().to_path_buf();
                (Some(t), h)
            }
        };
        let out = home.join(format!("serve-{}.out", std::process::id()));
        let err = home.join(format!("serve-{}.err", std::process::id()));
        let mut cmd = self.command(&home);
        cmd.stdin(Stdio::null())
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(&err).unwrap());
        let child = cmd.spawn().expect("spawn keyward serve");
        let mut daemon = Daemon {
            child: Some(child),
            uid: self.uid,
            _tmp: tmp,
            home,
            out,
            err,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = daemon.child.as_mut().unwrap().try_wait().unwrap() {
                let _ = status;
                return Err((daemon.stdout(), daemon.stderr()));
            }
            if UnixStream::connect(daemon.admin_socket()).is_ok()
                && daemon.cli(&["status"]).status.success()
            {
                return Ok(daemon);
            }
            if Instant::now() > deadline {
                return Err((daemon.stdout(), daemon.stderr()));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// A running daemon.
pub struct Daemon {
    child: Option<Child>,
    /// The uid the daemon runs as, when not the test's own (the CLI is told to trust it).
    uid: Option<u32>,
    _tmp: Option<tempfile::TempDir>,
    /// `KEYWARD_HOME`.
    pub home: PathBuf,
    out: PathBuf,
    err: PathBuf,
}

impl Daemon {
    /// A builder with embedded defaults.
    pub fn builder() -> DaemonBuilder {
        DaemonBuilder::default()
    }

    /// Data socket path.
    pub fn socket(&self) -> PathBuf {
        self.home.join("keyward.sock")
    }

    /// Admin socket path.
    pub fn admin_socket(&self) -> PathBuf {
        self.home.join("admin.sock")
    }

    /// Runs a CLI command against this daemon.
    pub fn cli(&self, args: &[&str]) -> Output {
        self.cli_stdin(args, None)
    }

    /// Runs a CLI command with `stdin` piped in.
    pub fn cli_stdin(&self, args: &[&str], stdin: Option<&[u8]>) -> Output {
        let mut cmd = Command::new(KEYWARD);
        cmd.args(args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("KEYWARD_ADMIN_SOCKET", self.admin_socket())
            .env(
                "KEYWARD_DAEMON_USER",
                self.uid.map(|u| u.to_string()).unwrap_or_default(),
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn keyward");
        {
            let mut pipe = child.stdin.take().unwrap();
            if let Some(data) = stdin {
                pipe.write_all(data).unwrap();
            }
        }
        child.wait_with_output().unwrap()
    }

    /// Runs a CLI command and returns stdout, panicking with stderr on failure.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "keyward {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Like [`Daemon::ok`] with stdin.
    pub fn ok_stdin(&self, args: &[&str], stdin: &[u8]) -> String {
        let out = self.cli_stdin(args, Some(stdin));
        assert!(
            out.status.success(),
            "keyward {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Runs a `--json` listing and parses each line.
    pub fn json_lines(&self, args: &[&str]) -> Vec<serde_json::Value> {
        let mut all = args.to_vec();
        all.push("--json");
        self.ok(&all)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// Adds tenant, client and credential; returns (client token, credential id).
    pub fn provision(
        &self,
        tenant: &str,
        target: &str,
        key: &str,
        extra: &[&str],
    ) -> (String, String) {
        let tenants = self.json_lines(&["tenant", "list"]);
        if !tenants.iter().any(|t| t["name"] == tenant) {
            self.ok(&["tenant", "add", tenant]);
        }
        let client: serde_json::Value = serde_json::from_str(
            self.ok(&[
                "client",
                "add",
                "--tenant",
                tenant,
                "--name",
                &format!("app-{}", &random_key("")[..8]),
                "--json",
            ])
            .trim(),
        )
        .unwrap();
        let mut args = vec![
            "cred", "add", "--tenant", tenant, "--target", target, "--name",
        ];
        let name = format!("key-{}", &random_key("")[..8]);
        args.push(&name);
        args.extend_from_slice(extra);
        args.push("--json");
        let cred: serde_json::Value =
            serde_json::from_str(self.ok_stdin(&args, key.as_bytes()).trim()).unwrap();
        (
            client["token"].as_str().unwrap().to_string(),
            cred["id"].as_str().unwrap().to_string(),
        )
    }

    /// What the daemon printed on stdout so far.
    pub fn stdout(&self) -> String {
        std::fs::read_to_string(&self.out).unwrap_or_default()
    }

    /// What the daemon printed on stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.err).unwrap_or_default()
    }

    /// The daemon's pid.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Sends SIGTERM and waits for exit; returns the exit code.
    pub fn terminate(&mut self) -> Option<i32> {
        let mut child = self.child.take()?;
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status.code();
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL, no drain.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Every file in the state directory, concatenated (database, WAL, audit, logs...).
    pub fn all_state_bytes(&self) -> Vec<u8> {
        let mut all = Vec::new();
        for entry in std::fs::read_dir(&self.home).unwrap().flatten() {
            if entry.file_type().map(|t| t.is_file()).unwrap_or(false) {
                all.extend(std::fs::read(entry.path()).unwrap_or_default());
            }
        }
        all
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// True when `needle` occurs in `haystack`.
pub fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

/// Runs `serve` to completion; it must refuse to start (exit 1) and bind neither socket.
/// Returns its output.
pub fn refused(builder: DaemonBuilder, home: &Path) -> std::process::Output {
    // A daemon killed earlier in the test leaves its socket files behind.
    for stale in ["keyward.sock", "admin.sock"] {
        let _ = std::fs::remove_file(home.join(stale));
    }
    let output = builder
        .command(home)
        .stdin(Stdio::null())
        .output()
        .expect("run keyward serve");
    assert_eq!(
        output.status.code(),
        Some(1),
        "serve must fail\nstdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(!home.join("keyward.sock").exists(), "data socket bound");
    assert!(!home.join("admin.sock").exists(), "admin socket bound");
    output
}

/// One raw HTTP/1.1 request to the admin API on `socket` (`connection: close`): the status
/// and the body text. Raw, so tests see exactly what goes over the wire.
pub fn admin_http(socket: &Path, method: &str, path: &str, body: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut stream = UnixStream::connect(socket).expect("connect to the admin socket");
    let head = format!(
        "{method} {path} HTTP/1.1\r\nhost: keyward\r\nconnection: close\r\ncontent-type: \
         application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(body.as_bytes()).unwrap();
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).unwrap();
    let text = String::from_utf8_lossy(&answer).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {text}"));
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

//! Starting and stopping the things being compared: the mock upstream process, keyward (the
//! release binary, provisioned through its own CLI), nginx from Debian and the LiteLLM proxy
//! from PyPI. Every peer is a child process in its own temp dir, killed when dropped.
//!
//! A peer that cannot be started comes back as `Err(reason)`, which the report prints as
//! "skipped: reason"; nothing here decides what is measured.

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::load::{Endpoint, Target};

/// The keyward binary cargo built for this bench.
pub const KEYWARD: &str = env!("CARGO_BIN_EXE_keyward");
/// LiteLLM version installed into the bench venv.
pub const LITELLM_VERSION: &str = "1.80.0";

// === Mock ===

/// The mock upstream process.
pub struct Mock {
    child: Child,
    /// Its loopback port.
    pub port: u16,
    /// PEM of its CA, also written to `ca_path`.
    pub ca_pem: String,
    /// File holding the CA certificate.
    pub ca_path: PathBuf,
}

impl Mock {
    /// Re-runs this bench binary as the mock, in `dir`, expecting `key`.
    pub fn start(dir: &Path, key: &str) -> Result<Mock, String> {
        let exe = std::env::current_exe().map_err(|e| format!("current exe: {e}"))?;
        let mut child = Command::new(exe)
            .arg(crate::mock::MOCK_FLAG)
            .arg(dir)
            .env("BENCH_UPSTREAM_KEY", key)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("spawn mock upstream: {e}"))?;
        let stdout = child.stdout.take().expect("piped");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .map_err(|e| format!("mock upstream output: {e}"))?;
        let port = line
            .trim()
            .strip_prefix("PORT ")
            .and_then(|p| p.parse().ok())
            .ok_or_else(|| format!("mock upstream said {line:?} instead of its port"))?;
        let ca_path = dir.join("mock-ca.pem");
        let ca_pem = std::fs::read_to_string(&ca_path).map_err(|e| format!("mock CA: {e}"))?;
        Ok(Mock {
            child,
            port,
            ca_pem,
            ca_path,
        })
    }

    /// `https://127.0.0.1:PORT`.
    pub fn base_url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// The direct baseline: the same client, TLS straight to the mock.
    pub fn direct_target(&self, key: &str) -> Target {
        Target {
            endpoint: Endpoint::Tls {
                addr: SocketAddr::from(([127, 0, 0, 1], self.port)),
                connector: crate::load::tls_connector(&self.ca_pem),
            },
            path: "/v1/chat/completions".into(),
            authorization: format!("Bearer {key}"),
        }
    }
}

impl Drop for Mock {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// === Peer ===

/// A running proxy.
pub struct Peer {
    /// Row label.
    pub name: String,
    /// How the client reaches it, for the table.
    pub transport: &'static str,
    /// What the load generator talks to.
    pub target: Target,
    /// Root pid of its process tree.
    pub pid: u32,
    child: Child,
    /// Its temp dir (config, sockets, logs); removed on drop.
    _dir: tempfile::TempDir,
}

impl Peer {
    /// Stops the peer with SIGTERM, waiting up to `grace` for it to exit before killing it (a
    /// peer under a profiler needs longer to write its report).
    pub fn stop(mut self, grace: Duration) {
        self.terminate(grace);
    }

    fn terminate(&mut self, grace: Duration) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        // SIGTERM first so nginx's master takes its workers down with it.
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.pid.to_string())
            .status();
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        self.terminate(Duration::from_secs(5));
    }
}

fn temp_dir(prefix: &str) -> Result<tempfile::TempDir, String> {
    // Short paths: Unix socket paths are limited to 108 bytes.
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in("/tmp")
        .map_err(|e| format!("temp dir: {e}"))
}

fn log_files(dir: &Path, name: &str) -> Result<(std::fs::File, std::fs::File), String> {
    let out = std::fs::File::create(dir.join(format!("{name}.out"))).map_err(|e| e.to_string())?;
    let err = std::fs::File::create(dir.join(format!("{name}.err"))).map_err(|e| e.to_string())?;
    Ok((out, err))
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(5)..].join(" | ")
}

fn wait_until(
    child: &mut Child,
    timeout: Duration,
    mut ready: impl FnMut() -> bool,
) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("exited during start-up ({status})"));
        }
        if ready() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("not ready after {}s", timeout.as_secs()));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

// === keyward ===

/// How to run keyward: which binary, under what wrapper, with which extra config lines.
pub struct KeywardOptions {
    /// The binary (default: the one cargo built for this bench).
    pub bin: PathBuf,
    /// Command prefix, e.g. `perf record -o FILE --`.
    pub wrap: Vec<String>,
    /// TOML lines added to the top of the generated config.
    pub extra_config: String,
}

/// Starts `keyward serve` with `audit_sync` and provisions tenant, client and credential
/// through the CLI.
pub fn start_keyward(
    mock: &Mock,
    key: &str,
    audit_sync: &str,
    opts: &KeywardOptions,
) -> Result<Peer, String> {
    let bin = opts.bin.as_path();
    let dir = temp_dir("kwb")?;
    let home = dir.path();
    let config = format!(
        "{}\naudit_sync = \"{audit_sync}\"\n\n[targets.openai]\nbase_url = \"{}\"\nca_file = \"{}\"\n",
        opts.extra_config,
        mock.base_url(),
        mock.ca_path.display()
    );
    let config_path = home.join("keyward.toml");
    std::fs::write(&config_path, config).map_err(|e| e.to_string())?;
    let (out, err) = log_files(home, "keyward")?;
    let mut cmd = match opts.wrap.split_first() {
        Some((first, rest)) => {
            let mut c = Command::new(first);
            c.args(rest).arg(bin);
            c
        }
        None => Command::new(bin),
    };
    cmd.arg("serve")
        .arg("--config")
        .arg(&config_path)
        .env("KEYWARD_HOME", home)
        .env_remove("KEYWARD_CONFIG")
        .env_remove("KEYWARD_ADMIN_SOCKET")
        .env_remove("KEYWARD_MASTER_KEY")
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("spawn {}: {e}", bin.display()))?;
    let admin = home.join("admin.sock");
    let started = wait_until(&mut child, Duration::from_secs(60), || {
        admin.exists() && cli(bin, home, &["status"], None).is_ok()
    });
    let fail = |child: &mut Child, e: String| {
        let _ = child.kill();
        let _ = child.wait();
        format!("keyward {e}: {}", tail(&home.join("keyward.err")))
    };
    if let Err(e) = started {
        return Err(fail(&mut child, e));
    }
    let provisioned = (|| -> Result<String, String> {
        cli(bin, home, &["tenant", "add", "bench"], None)?;
        let client = cli(
            bin,
            home,
            &[
                "client", "add", "--tenant", "bench", "--name", "load", "--json",
            ],
            None,
        )?;
        let client: serde_json::Value = serde_json::from_str(client.trim())
            .map_err(|e| format!("client add --json printed {client:?}: {e}"))?;
        let token = client["token"]
            .as_str()
            .ok_or("client add --json printed no token")?
            .to_string();
        cli(
            bin,
            home,
            &[
                "cred", "add", "--tenant", "bench", "--target", "openai", "--name", "k",
            ],
            Some(key),
        )?;
        Ok(token)
    })();
    let token = match provisioned {
        Ok(t) => t,
        Err(e) => return Err(fail(&mut child, format!("provisioning failed: {e}"))),
    };
    let pid = child.id();
    Ok(Peer {
        name: if audit_sync == "normal" {
            "keyward".into()
        } else {
            format!("keyward (audit_sync={audit_sync})")
        },
        transport: "unix socket",
        target: Target {
            endpoint: Endpoint::Unix(home.join("keyward.sock")),
            path: "/openai/v1/chat/completions".into(),
            authorization: format!("Bearer {token}"),
        },
        pid,
        child,
        _dir: dir,
    })
}

/// Runs a keyward CLI command against the daemon in `home`; stdout on success.
fn cli(bin: &Path, home: &Path, args: &[&str], stdin: Option<&str>) -> Result<String, String> {
    let mut child = Command::new(bin)
        .args(args)
        .env("KEYWARD_ADMIN_SOCKET", home.join("admin.sock"))
        .env("KEYWARD_HOME", home)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("spawn keyward {}: {e}", args.join(" ")))?;
    {
        let mut pipe = child.stdin.take().expect("piped");
        if let Some(data) = stdin {
            pipe.write_all(data.as_bytes()).map_err(|e| e.to_string())?;
        }
    }
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "`keyward {}` exited {}: {}",
            args.first().copied().unwrap_or(""),
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

// === nginx ===

/// Starts nginx in the foreground with a generated config that injects the key.
/// Starts nginx; with `wrap` (a profiler command, for `--calls`) as one process (no master,
/// one worker) under that command, so the profiler sees every request.
pub fn start_nginx(mock: &Mock, key: &str, wrap: &[String]) -> Result<Peer, String> {
    let binary = ["/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/bin/nginx"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .ok_or("nginx not installed (apt-get install nginx-light)")?;
    let dir = temp_dir("ngb")?;
    let d = dir.path().display();
    let root = nix::unistd::geteuid().is_root();
    let config = format!(
        r#"daemon off;
{user}{processes}
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {d}/body;
  proxy_temp_path {d}/proxy;
  fastcgi_temp_path {d}/fastcgi;
  uwsgi_temp_path {d}/uwsgi;
  scgi_temp_path {d}/scgi;
  upstream mock {{
    server 127.0.0.1:{port};
    keepalive 64;
  }}
  server {{
    listen unix:{d}/nginx.sock;
    location / {{
      proxy_pass https://mock;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host localhost;
      proxy_set_header Authorization "Bearer {key}";
      proxy_ssl_verify on;
      proxy_ssl_trusted_certificate {ca};
      proxy_ssl_name localhost;
      proxy_ssl_server_name on;
      proxy_ssl_session_reuse on;
      proxy_buffering off;
    }}
  }}
}}
"#,
        user = if root { "user root;\n" } else { "" },
        processes = if wrap.is_empty() {
            "worker_processes auto;"
        } else {
            "master_process off;\nworker_processes 1;"
        },
        port = mock.port,
        ca = mock.ca_path.display(),
    );
    let config_path = dir.path().join("nginx.conf");
    std::fs::write(&config_path, config).map_err(|e| e.to_string())?;
    let (out, err) = log_files(dir.path(), "nginx")?;
    let mut cmd = match wrap.split_first() {
        Some((first, rest)) => {
            let mut c = Command::new(first);
            c.args(rest).arg(binary);
            c
        }
        None => Command::new(binary),
    };
    let mut child = cmd
        .arg("-c")
        .arg(&config_path)
        .arg("-p")
        .arg(dir.path())
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .map_err(|e| format!("spawn {binary}: {e}"))?;
    let socket = dir.path().join("nginx.sock");
    if let Err(e) = wait_until(&mut child, Duration::from_secs(20), || socket.exists()) {
        let _ = child.kill();
        let _ = child.wait();
        return Err(format!(
            "nginx {e}: {} {}",
            tail(&dir.path().join("nginx.err")),
            tail(&dir.path().join("error.log"))
        ));
    }
    let pid = child.id();
    Ok(Peer {
        name: "nginx".into(),
        transport: "unix socket",
        target: Target {
            endpoint: Endpoint::Unix(socket),
            path: "/v1/chat/completions".into(),
            authorization: "Bearer client-side-placeholder".into(),
        },
        pid,
        child,
        _dir: dir,
    })
}

// === LiteLLM ===

/// The bench venv, beside cargo's target dir.
pub fn litellm_venv() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench/litellm-venv")
}

/// Creates the venv and installs the pinned LiteLLM unless it is already there.
pub fn ensure_litellm(install: bool) -> Result<PathBuf, String> {
    let venv = litellm_venv();
    let python = venv.join("bin/python");
    let installed = || {
        Command::new(&python)
            .args([
                "-c",
                "import importlib.metadata as m; print(m.version('litellm'))",
            ])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    if installed().as_deref() == Some(LITELLM_VERSION) && venv.join("bin/litellm").exists() {
        return Ok(venv);
    }
    if !install {
        return Err(format!(
            "LiteLLM {LITELLM_VERSION} not installed in {} (run without --no-install)",
            venv.display()
        ));
    }
    eprintln!(
        "installing litellm[proxy]=={LITELLM_VERSION} into {} ...",
        venv.display()
    );
    if !python.exists() {
        let out = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .output()
            .map_err(|e| format!("python3 not available: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "python3 -m venv failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
    }
    let out = Command::new(venv.join("bin/pip"))
        .args([
            "install",
            "-q",
            &format!("litellm[proxy]=={LITELLM_VERSION}"),
        ])
        .output()
        .map_err(|e| format!("pip: {e}"))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let last = err
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("");
        return Err(format!(
            "pip install litellm[proxy]=={LITELLM_VERSION} failed: {last}"
        ));
    }
    Ok(venv)
}

/// Starts the LiteLLM proxy on a loopback port with the mock as an OpenAI `api_base`.
pub fn start_litellm(mock: &Mock, key: &str, install: bool) -> Result<Peer, String> {
    let venv = ensure_litellm(install)?;
    let dir = temp_dir("llb")?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| format!("free port: {e}"))?
        .port();
    let config = format!(
        "model_list:\n  - model_name: bench-model\n    litellm_params:\n      model: openai/bench-model\n      api_base: {}/v1\n      api_key: {key}\nlitellm_settings:\n  telemetry: false\n  ssl_verify: {}\n",
        mock.base_url(),
        mock.ca_path.display()
    );
    let config_path = dir.path().join("litellm.yaml");
    std::fs::write(&config_path, config).map_err(|e| e.to_string())?;
    let (out, err) = log_files(dir.path(), "litellm")?;
    let mut child = Command::new(venv.join("bin/litellm"))
        .arg("--config")
        .arg(&config_path)
        .args([
            "--host",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "--num_workers",
            "1",
        ])
        .env("SSL_CERT_FILE", &mock.ca_path)
        .env("REQUESTS_CA_BUNDLE", &mock.ca_path)
        .env("LITELLM_LOCAL_MODEL_COST_MAP", "True")
        .env("LITELLM_TELEMETRY", "False")
        .env("LITELLM_LOG", "ERROR")
        .env("NO_DOCS", "True")
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .map_err(|e| format!("spawn litellm: {e}"))?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let ready = wait_until(&mut child, Duration::from_secs(180), || {
        http_get_ok(addr, "/health/liveliness")
    });
    if let Err(e) = ready {
        let _ = child.kill();
        let _ = child.wait();
        return Err(format!(
            "litellm {e}: {}",
            tail(&dir.path().join("litellm.err"))
        ));
    }
    let pid = child.id();
    Ok(Peer {
        name: format!("LiteLLM {LITELLM_VERSION}"),
        transport: "loopback TCP",
        target: Target {
            endpoint: Endpoint::Tcp(addr),
            path: "/v1/chat/completions".into(),
            authorization: "Bearer client-side-placeholder".into(),
        },
        pid,
        child,
        _dir: dir,
    })
}

fn http_get_ok(addr: SocketAddr, path: &str) -> bool {
    use std::io::Read;
    let Ok(mut s) = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let req = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    if s.write_all(req.as_bytes()).is_err() {
        return false;
    }
    let mut buf = [0u8; 16];
    matches!(s.read(&mut buf), Ok(n) if n >= 12 && &buf[9..12] == b"200")
}

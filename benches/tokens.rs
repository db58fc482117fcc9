//! What a cached access token costs per request: the same call through the real daemon, once
//! with an `api-key` credential and once with a `gcp-service-account` credential whose token is
//! cached (README, "Vertex AI"). Both go to the same TLS mock, same path and same answer; only
//! the credential kind differs (and the keyed target reads the path as `gemini`, which finds no
//! model in it, where `vertex` reads the model: a split of a few segments). Reports latency p50/p99 and the daemon's CPU time per request
//! (from /proc), and the difference.
//!
//! ```text
//! cargo bench --bench tokens                 # 5 rounds of 2,000 sequential calls per kind
//! cargo bench --bench tokens -- --quick      # 2 rounds of 300
//! ```
//!
//! The token endpoint stand-in is `tests/support/token_endpoint.py`, run with the Python of
//! `target/moto-venv` (installed by `.ci/run`); it is asked once, at warm-up. This is a
//! measurement, not a test: it asserts no target.

#[path = "../tests/support/mock_upstream.rs"]
mod mock_upstream;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use mock_upstream::MockUpstream;

const PATH: &str = "/v1/projects/kw-bench/locations/us-east5/publishers/google/models/\
                    gemini-2.0-flash:generateContent";
const BODY: &str = r#"{"contents":[{"role":"user","parts":[{"text":"hi"}]}]}"#;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

struct Kill(Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_for(path: &Path, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !path.exists() {
        assert!(Instant::now() < deadline, "{what} did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn cli(home: &Path, args: &[&str], stdin: Option<&[u8]>) -> String {
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_keyward"))
        .args(args)
        .env("KEYWARD_HOME", home)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.unwrap_or_default())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "keyward {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// utime + stime of `pid`, in clock ticks (100 per second).
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = after.split(' ').collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

/// `n` sequential calls over one keep-alive connection; returns each call's latency.
async fn round(socket: &Path, target: &str, token: &str, n: usize) -> Vec<Duration> {
    let stream = tokio::net::UnixStream::connect(socket).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut took = Vec::with_capacity(n);
    for _ in 0..n {
        let req = http::Request::post(format!("/{target}{PATH}"))
            .header("host", "keyward")
            .header("content-type", "application/json")
            .header("authorization", format!("Bearer {token}"))
            .body(Full::new(Bytes::from_static(BODY.as_bytes())))
            .unwrap();
        send.ready().await.unwrap();
        let start = Instant::now();
        let resp = send.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        resp.into_body().collect().await.unwrap();
        took.push(start.elapsed());
    }
    took
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1e6
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let (rounds, per_round) = if quick { (2, 300) } else { (5, 2000) };
    let python = root().join("target/moto-venv/bin/python");
    if !python.exists() {
        println!(
            "tokens bench NOT RUN: {} is missing (run .ci/run, which installs it)",
            python.display()
        );
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let mock = MockUpstream::start().await;
        let dir = tempfile::tempdir().unwrap();
        let tokens_dir = dir.path().join("tokens");
        std::fs::create_dir(&tokens_dir).unwrap();
        let _endpoint = Kill(
            Command::new(&python)
                .arg(root().join("tests/support/token_endpoint.py"))
                .arg(&tokens_dir)
                .stdin(Stdio::null())
                .spawn()
                .unwrap(),
        );
        wait_for(&tokens_dir.join("port"), "token endpoint");
        let ca: PathBuf = dir.path().join("ca.pem");
        std::fs::write(
            &ca,
            format!(
                "{}{}",
                std::fs::read_to_string(tokens_dir.join("ca.pem")).unwrap(),
                mock.ca_pem()
            ),
        )
        .unwrap();
        let home = dir.path().join("home");
        std::fs::create_dir(&home).unwrap();
        let config = dir.path().join("keyward.toml");
        std::fs::write(
            &config,
            format!(
                "[targets.vertex]\nbase_url = \"{base}\"\nca_file = \"{ca}\"\n\n\
                 [targets.keyed]\nbase_url = \"{base}\"\nca_file = \"{ca}\"\n\
                 auth_header = \"Authorization\"\nauth_format = \"Bearer {{key}}\"\n\
                 family = \"gemini\"\n",
                base = mock.base_url(),
                ca = ca.display()
            ),
        )
        .unwrap();
        let daemon = Kill(
            Command::new(env!("CARGO_BIN_EXE_keyward"))
                .args(["serve", "--config", config.to_str().unwrap()])
                .env("KEYWARD_HOME", &home)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
        wait_for(&home.join("keyward.sock"), "keyward");
        wait_for(&home.join("admin.sock"), "keyward admin socket");
        let pid = daemon.0.id();
        cli(&home, &["tenant", "add", "bench"], None);
        let client: serde_json::Value = serde_json::from_str(&cli(
            &home,
            &[
                "client", "add", "--tenant", "bench", "--name", "app", "--json",
            ],
            None,
        ))
        .unwrap();
        let token = client["token"].as_str().unwrap().to_string();
        let mut random = [0u8; 24];
        keyward::seal::fill_random(&mut random);
        let key: String = random.iter().map(|b| format!("{b:02x}")).collect();
        let key = format!("sk-bench-{key}");
        cli(
            &home,
            &[
                "cred", "add", "--tenant", "bench", "--target", "keyed", "--name", "key",
            ],
            Some(key.as_bytes()),
        );
        let sa = std::fs::read(tokens_dir.join("sa.json")).unwrap();
        cli(
            &home,
            &[
                "cred",
                "add",
                "--tenant",
                "bench",
                "--target",
                "vertex",
                "--name",
                "sa",
                "--kind",
                "gcp-service-account",
            ],
            Some(&sa),
        );
        let socket = home.join("keyward.sock");
        // Warm-up: connections, tenant keys, and the one token request.
        for target in ["keyed", "vertex"] {
            round(&socket, target, &token, 200).await;
        }
        let mut results = Vec::new();
        for (target, label) in [("keyed", "api-key"), ("vertex", "cached token")] {
            let (mut all, mut ticks) = (Vec::new(), 0);
            for _ in 0..rounds {
                let before = cpu_ticks(pid);
                all.extend(round(&socket, target, &token, per_round).await);
                ticks += cpu_ticks(pid) - before;
            }
            all.sort();
            let cpu_us = ticks as f64 * 10_000.0 / all.len() as f64;
            results.push((label, pct(&all, 0.5), pct(&all, 0.99), cpu_us, all.len()));
        }
        println!("| credential | calls | p50 µs | p99 µs | keyward CPU µs/call |");
        println!("| --- | --- | --- | --- | --- |");
        for (label, p50, p99, cpu, n) in &results {
            println!("| {label} | {n} | {p50:.0} | {p99:.0} | {cpu:.0} |");
        }
        let (a, t) = (&results[0], &results[1]);
        println!(
            "\ncached token vs api-key: {:+.0} µs p50, {:+.0} µs p99, {:+.0} µs CPU per call",
            t.1 - a.1,
            t.2 - a.2,
            t.3 - a.3
        );
    });
}

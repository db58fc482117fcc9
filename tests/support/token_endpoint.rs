//! A stand-in for Google's and Entra ID's OAuth2 token endpoints (`token_endpoint.py`, run with
//! the Python of `target/moto-venv`, which `.ci/run` installs and which carries
//! pyca/cryptography), over TLS with its own test CA. It verifies service account JWTs against
//! the account's public key and Entra client secrets the way the real services do, counts what
//! it answered, and issues tokens the test may choose in advance.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// A running token endpoint.
pub struct TokenEndpoint {
    child: Child,
    dir: tempfile::TempDir,
    /// `https://127.0.0.1:PORT`.
    pub base: String,
}

impl TokenEndpoint {
    /// Starts it, or `None` (after saying so) when the venv is missing and the run accepts
    /// skips (see `needs.rs`).
    pub fn start(test: &str) -> Option<TokenEndpoint> {
        let python = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/moto-venv/bin/python");
        if !super::needs::program(test, python.to_str().unwrap(), "--version") {
            return None;
        }
        let dir = tempfile::Builder::new()
            .prefix("kwtok")
            .tempdir_in("/tmp")
            .unwrap();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/token_endpoint.py");
        let child = Command::new(&python)
            .arg(&script)
            .arg(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        let port = loop {
            if let Ok(p) = std::fs::read_to_string(dir.path().join("port")) {
                break p;
            }
            assert!(Instant::now() < deadline, "token endpoint did not start");
            std::thread::sleep(Duration::from_millis(50));
        };
        Some(TokenEndpoint {
            child,
            base: format!("https://127.0.0.1:{}", port.trim()),
            dir,
        })
    }

    /// A file it wrote (`ca.pem`, `sa.json`, `sa_other.json`, `entra.json`).
    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The text of a file it wrote.
    pub fn read(&self, name: &str) -> String {
        std::fs::read_to_string(self.file(name)).unwrap()
    }

    /// A JSON file it wrote.
    pub fn json(&self, name: &str) -> Value {
        serde_json::from_str(&self.read(name)).unwrap()
    }

    /// Sets `expires_in`, a delay before each answer, and tokens to issue first.
    pub fn control(&self, expires_in: u64, delay_ms: u64, tokens: &[&str]) {
        let tmp = self.dir.path().join(".control.tmp");
        std::fs::write(
            &tmp,
            serde_json::json!({"expires_in": expires_in, "delay_ms": delay_ms, "tokens": tokens})
                .to_string(),
        )
        .unwrap();
        std::fs::rename(tmp, self.dir.path().join("control.json")).unwrap();
    }

    /// What it answered so far: `google`, `entra` (tokens issued), `google_refused`,
    /// `entra_refused`, `issued` (the tokens), `reasons` (of refusals).
    pub fn stats(&self) -> Value {
        self.json("stats.json")
    }

    /// `stats()[field]` as a number.
    pub fn count(&self, field: &str) -> u64 {
        self.stats()[field].as_u64().unwrap()
    }

    /// A CA bundle trusting both this endpoint and `mock`, for a target's `ca_file`.
    pub fn ca_bundle(&self, mock_ca_pem: &str) -> PathBuf {
        let path = self.dir.path().join("bundle.pem");
        std::fs::write(&path, format!("{}{}", self.read("ca.pem"), mock_ca_pem)).unwrap();
        path
    }
}

impl Drop for TokenEndpoint {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

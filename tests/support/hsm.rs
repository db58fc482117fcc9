//! A real SoftHSM2 token store in a temporary directory (its own `SOFTHSM2_CONF`), set up with
//! the distribution's tools (`softhsm2-util`, OpenSC's `pkcs11-tool`) as an operator would.

#![allow(dead_code)]

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Where Debian puts the SoftHSM2 module.
const MODULES: [&str; 2] = [
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
];

/// A SoftHSM2 configuration and token directory of its own.
pub struct SoftHsm {
    dir: tempfile::TempDir,
    /// The `SOFTHSM2_CONF` file.
    pub conf: PathBuf,
    /// The PKCS#11 module.
    pub module: PathBuf,
}

/// Whether this run must not skip tests that need a program (`CI=true`).
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

impl SoftHsm {
    /// A fresh token store, or `None` (after saying so) when SoftHSM2 or OpenSC is not
    /// installed outside CI. In CI a missing tool fails the test.
    pub fn new(test: &str) -> Option<SoftHsm> {
        let module = MODULES.iter().map(PathBuf::from).find(|p| p.exists());
        let tools = ["softhsm2-util", "pkcs11-tool"].iter().all(|t| {
            Command::new("sh")
                .arg("-c")
                .arg(format!("command -v {t}"))
                .output()
                .is_ok_and(|o| o.status.success())
        });
        let Some(module) = module.filter(|_| tools) else {
            assert!(
                !in_ci(),
                "{test}: SoftHSM2 and OpenSC must be installed in CI (.ci/run installs softhsm2 and opensc)"
            );
            eprintln!(
                "{test}: DID NOT RUN: softhsm2 or opensc is not installed (apt-get install softhsm2 opensc)"
            );
            return None;
        };
        let dir = tempfile::Builder::new()
            .prefix("kwhsm")
            .tempdir_in("/tmp")
            .unwrap();
        std::fs::create_dir(dir.path().join("tokens")).unwrap();
        let conf = dir.path().join("softhsm2.conf");
        std::fs::write(
            &conf,
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
                dir.path().join("tokens").display()
            ),
        )
        .unwrap();
        Some(SoftHsm { dir, conf, module })
    }

    fn run(&self, program: &str, args: &[&str]) -> String {
        let out = Command::new(program)
            .args(args)
            .env("SOFTHSM2_CONF", &self.conf)
            .output()
            .unwrap_or_else(|e| panic!("run {program}: {e}"));
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "{program} {args:?} failed:\n{text}");
        text
    }

    /// Initialises a token with this label and user PIN (SO PIN `so-<pin>`).
    pub fn init_token(&self, label: &str, pin: &str) {
        self.run(
            "softhsm2-util",
            &[
                "--init-token",
                "--free",
                "--label",
                label,
                "--so-pin",
                &format!("so-{pin}"),
                "--pin",
                pin,
            ],
        );
    }

    /// Generates an AES-256 key in the token, sensitive and (unless `extractable`) never
    /// extractable.
    pub fn keygen(&self, token: &str, pin: &str, label: &str, extractable: bool) {
        let module = self.module.display().to_string();
        let mut args = vec![
            "--module",
            &module,
            "--token-label",
            token,
            "--login",
            "--pin",
            pin,
            "--keygen",
            "--key-type",
            "AES:32",
            "--label",
            label,
            "--sensitive",
        ];
        if extractable {
            args.push("--extractable");
        }
        let out = self.run("pkcs11-tool", &args);
        assert_eq!(
            out.contains("never extractable"),
            !extractable,
            "pkcs11-tool made a key of the wrong kind:\n{out}"
        );
    }

    /// Writes `pin` into a 0600 file and returns its path.
    pub fn pin_file(&self, name: &str, pin: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .unwrap();
        writeln!(f, "{pin}").unwrap();
        path
    }

    /// A `[master_key]` (or `[master_key.previous]`, by `table`) table for this store.
    pub fn table(&self, table: &str, token: &str, key: &str, pin_file: &Path) -> String {
        format!(
            "[{table}]\nprovider = \"pkcs11\"\nmodule = \"{}\"\ntoken_label = \"{token}\"\nkey_label = \"{key}\"\npin_file = \"{}\"\n",
            self.module.display(),
            pin_file.display()
        )
    }

    /// The token directory (to check no key material lands elsewhere).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

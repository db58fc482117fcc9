//! A real `moto_server` (PyPI `moto[server]`, installed by `.ci/run` into `target/moto-venv`)
//! serving AWS KMS and STS over TLS on a loopback port, with a test CA from `rcgen`.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The region the tests use.
pub const REGION: &str = "eu-west-1";

fn venv_bin(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target/moto-venv/bin")
        .join(name)
}

/// A running moto server and the CA its certificate chains to.
pub struct Moto {
    child: Child,
    dir: tempfile::TempDir,
    /// `https://127.0.0.1:PORT`.
    pub endpoint: String,
    /// PEM file of the test CA (for `ca_file`).
    pub ca: PathBuf,
}

impl Moto {
    /// Starts moto with TLS, or `None` (after saying so) when the venv is missing and the run
    /// accepts skips (see `needs.rs`).
    pub fn start(test: &str) -> Option<Moto> {
        Moto::start_with(test, None)
    }

    /// Starts moto checking SigV4 signatures and IAM policies after the first `free` requests
    /// (moto's `INITIAL_NO_AUTH_ACTION_COUNT`).
    pub fn start_with_auth(test: &str, free: u32) -> Option<Moto> {
        Moto::start_with(test, Some(free))
    }

    fn start_with(test: &str, free: Option<u32>) -> Option<Moto> {
        let server = venv_bin("moto_server");
        if !super::needs::program(test, server.to_str().unwrap(), "--help") {
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "keyward moto test CA");
        ca_params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
        let leaf_key = rcgen::KeyPair::generate().unwrap();
        let mut leaf_params =
            rcgen::CertificateParams::new(vec!["127.0.0.1".into(), "localhost".into()]).unwrap();
        leaf_params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        let leaf = leaf_params.signed_by(&leaf_key, &ca).unwrap();
        let cert = dir.path().join("cert.pem");
        let key = dir.path().join("key.pem");
        let ca_pem = dir.path().join("ca.pem");
        std::fs::write(&cert, format!("{}{}", leaf.pem(), ca.pem())).unwrap();
        std::fs::write(&key, leaf_key.serialize_pem()).unwrap();
        std::fs::write(&ca_pem, ca.pem()).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut command = Command::new(&server);
        if let Some(n) = free {
            command.env("INITIAL_NO_AUTH_ACTION_COUNT", n.to_string());
        }
        let child = command
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .arg("-c")
            .arg(&cert)
            .arg("-k")
            .arg(&key)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start moto_server");
        let moto = Moto {
            child,
            dir,
            endpoint: format!("https://127.0.0.1:{port}"),
            ca: ca_pem,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "moto_server did not listen");
            std::thread::sleep(Duration::from_millis(100));
        }
        Some(moto)
    }

    /// Runs `code` in the venv's Python with `kms` and `sts` boto3 clients for this server
    /// and returns its stdout.
    pub fn python(&self, code: &str) -> String {
        let prelude = format!(
            "import boto3\nkw = dict(region_name='{REGION}', endpoint_url='{}', verify='{}', \
             aws_access_key_id='testing', aws_secret_access_key='testing')\n\
             kms = boto3.client('kms', **kw)\nsts = boto3.client('sts', **kw)\n",
            self.endpoint,
            self.ca.display()
        );
        let out = Command::new(venv_bin("python"))
            .arg("-c")
            .arg(format!("{prelude}{code}"))
            .output()
            .expect("run the venv's python");
        assert!(
            out.status.success(),
            "python failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }

    /// A new symmetric KMS key; its ARN.
    pub fn create_key(&self) -> String {
        self.python("print(kms.create_key()['KeyMetadata']['Arn'])")
    }

    /// The `[table]` for this server and `key_id`.
    pub fn table(&self, table: &str, key_id: &str) -> String {
        format!(
            "[{table}]\nprovider = \"aws-kms\"\nkey_id = \"{key_id}\"\nregion = \"{REGION}\"\n\
             endpoint = \"{}\"\nca_file = \"{}\"\n",
            self.endpoint,
            self.ca.display()
        )
    }

    /// A web identity token file (moto's STS accepts any token).
    pub fn token_file(&self) -> PathBuf {
        let p = self.dir.path().join("web-identity-token");
        std::fs::write(&p, "eyJhbGciOiJSUzI1NiJ9.e30.c2lnbmF0dXJl").unwrap();
        p
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

//! `provider = "aws-kms"` against a real KMS-compatible server (moto) over TLS on loopback,
//! through the real binary: first start, restart, credentials from the environment and from a
//! web identity token, wrong key, unreachable endpoint, cross-tenant swaps and migration.

mod support;

use std::path::Path;
use std::process::Output;

use support::daemon::{Daemon, DaemonBuilder, contains, random_key};
use support::kms::Moto;
use support::mock_upstream::{MockUpstream, key_of};
use support::uds::{call_as, chat_body};

/// Runs `serve` to completion (it must refuse to start) and returns its output.
fn refused(builder: DaemonBuilder, home: &Path) -> Output {
    for stale in ["keyward.sock", "admin.sock"] {
        let _ = std::fs::remove_file(home.join(stale));
    }
    let output = builder
        .command(home)
        .stdin(std::process::Stdio::null())
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

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A chat call as `token` answered 200 by the mock with `key`.
async fn served_with(d: &Daemon, mock: &MockUpstream, token: &str, key: &str) {
    let (status, _, body) = call_as(
        &d.socket(),
        token,
        "/openai/v1/chat/completions",
        &chat_body("gpt-4o-mini", false),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let seen = mock.requests();
    assert_eq!(key_of(seen.last().unwrap()).as_deref(), Some(key));
}

fn home() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("kw")
        .tempdir_in("/tmp")
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn aws_kms_with_environment_credentials_starts_restarts_and_serves() {
    let Some(moto) = Moto::start("aws_kms_with_environment_credentials") else {
        return;
    };
    let arn = moto.create_key();
    let secret = random_key("");
    let mock = MockUpstream::builder().start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = support::targets_config(
        &mock,
        dir.path(),
        &["openai"],
        &moto.table("master_key", &arn),
    );
    let home_dir = home();
    let start = || {
        Daemon::builder()
            .home(home_dir.path())
            .config(&config)
            .env("AWS_ACCESS_KEY_ID", "AKIAKEYWARDTEST")
            .env("AWS_SECRET_ACCESS_KEY", &secret)
    };
    let mut d = start().start();
    assert!(d.stdout().contains(&arn), "{}", d.stdout());
    assert!(d.stdout().contains("(aws-kms)"), "{}", d.stdout());
    assert!(!d.home.join("master.key").exists(), "no key file with KMS");
    let key_a = random_key("sk-acme-");
    let key_g = random_key("sk-globex-");
    let (token_a, _) = d.provision("acme", "openai", &key_a, &[]);
    let (token_g, _) = d.provision("globex", "openai", &key_g, &[]);
    served_with(&d, &mock, &token_a, &key_a).await;
    served_with(&d, &mock, &token_g, &key_g).await;
    let status = &d.json_lines(&["status"])[0];
    assert_eq!(status["master_key_provider"], "aws-kms");
    assert_eq!(d.terminate(), Some(0));

    let d = start().start();
    served_with(&d, &mock, &token_a, &key_a).await;
    served_with(&d, &mock, &token_g, &key_g).await;
    served_with(&d, &mock, &token_a, &key_a).await;
    // Key check + audit MAC key at start, then two unwraps per tenant on its first request.
    assert_eq!(d.json_lines(&["status"])[0]["kek_operations"], 6);
    let status_text = d.ok(&["status", "--json"]);
    assert!(status_text.contains(&arn), "{status_text}");
    for (what, bytes) in [
        ("stdout", d.stdout().into_bytes()),
        ("stderr", d.stderr().into_bytes()),
        ("state", d.all_state_bytes()),
        ("status", status_text.into_bytes()),
    ] {
        assert!(
            !contains(&bytes, &secret),
            "the AWS secret leaked into {what}"
        );
        assert!(
            !contains(&bytes, &key_a),
            "a provider key leaked into {what}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn aws_kms_wrong_key_and_unreachable_endpoint_are_refused_at_start() {
    let Some(moto) = Moto::start("aws_kms_wrong_key_and_unreachable") else {
        return;
    };
    let arn = moto.create_key();
    let other = moto.create_key();
    let secret = random_key("");
    let home_dir = home();
    let start = |table: String| {
        Daemon::builder()
            .home(home_dir.path())
            .config(&table)
            .env("AWS_ACCESS_KEY_ID", "AKIAKEYWARDTEST")
            .env("AWS_SECRET_ACCESS_KEY", &secret)
    };
    let d = start(moto.table("master_key", &arn)).start();
    d.provision("acme", "openai", &random_key("sk-acme-"), &[]);
    drop(d);

    let out = refused(start(moto.table("master_key", &other)), home_dir.path());
    assert!(
        stderr(&out).contains("master key does not match this store"),
        "{}",
        stderr(&out)
    );

    // Nothing listens on a port just released.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let table = moto
        .table("master_key", &arn)
        .replace(&moto.endpoint, &format!("https://127.0.0.1:{closed}"));
    let out = refused(start(table), home_dir.path());
    let err = stderr(&out);
    assert!(!contains(&out.stderr, &secret) && !contains(&out.stdout, &secret));
    assert!(err.contains("cannot reach aws-kms"), "{err}");
    assert!(err.contains(&format!("127.0.0.1:{closed}")), "{err}");

    // No credentials anywhere (IMDS off, as the SDKs' AWS_EC2_METADATA_DISABLED): the chain
    // names what to set.
    let out = refused(
        Daemon::builder()
            .home(home_dir.path())
            .config(&moto.table("master_key", &arn))
            .env("AWS_EC2_METADATA_DISABLED", "true"),
        home_dir.path(),
    );
    let err = stderr(&out);
    assert!(
        err.contains("cannot reach aws-kms") && err.contains("AWS_ACCESS_KEY_ID"),
        "{err}"
    );
}

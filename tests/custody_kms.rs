//! `provider = "aws-kms"` against a real KMS-compatible server (moto) over TLS on loopback,
//! through the real binary: first start, restart, credentials from the environment and from a
//! web identity token, wrong key, unreachable endpoint, cross-tenant swaps and migration.

mod support;

use std::path::Path;
use std::process::Output;

use support::daemon::{Daemon, contains, random_key};
use support::kms::Moto;
use support::mock_upstream::{MockUpstream, key_of};
use support::uds::{call_as, chat_body};

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

    let out = support::daemon::refused(start(moto.table("master_key", &other)), home_dir.path());
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
    let out = support::daemon::refused(start(table), home_dir.path());
    let err = stderr(&out);
    assert!(!contains(&out.stderr, &secret) && !contains(&out.stdout, &secret));
    assert!(err.contains("cannot reach aws-kms"), "{err}");
    assert!(err.contains(&format!("127.0.0.1:{closed}")), "{err}");

    // No credentials anywhere (IMDS off, as the SDKs' AWS_EC2_METADATA_DISABLED): the chain
    // names what to set.
    let out = support::daemon::refused(
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

#[tokio::test(flavor = "multi_thread")]
async fn aws_kms_with_a_web_identity_token_assumes_the_role_at_sts() {
    let Some(moto) = Moto::start("aws_kms_with_a_web_identity_token") else {
        return;
    };
    let arn = moto.create_key();
    let token_file = moto.token_file();
    let mock = MockUpstream::builder().start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = support::targets_config(
        &mock,
        dir.path(),
        &["openai"],
        &moto.table("master_key", &arn),
    );
    let home_dir = home();
    let start = |token_file: &Path| {
        Daemon::builder()
            .home(home_dir.path())
            .config(&config)
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env("AWS_WEB_IDENTITY_TOKEN_FILE", token_file.to_str().unwrap())
            .env("AWS_ROLE_ARN", "arn:aws:iam::123456789012:role/keyward")
            .env("AWS_ENDPOINT_URL_STS", &moto.endpoint)
    };
    let mut d = start(&token_file).start();
    assert!(d.stdout().contains(&arn), "{}", d.stdout());
    let key = random_key("sk-acme-");
    let (token, _) = d.provision("acme", "openai", &key, &[]);
    served_with(&d, &mock, &token, &key).await;
    assert_eq!(d.terminate(), Some(0));
    let d = start(&token_file).start();
    served_with(&d, &mock, &token, &key).await;
    drop(d);

    // Without its token file the web identity source names the file; without the STS
    // endpoint it names the endpoint.
    let missing = dir.path().join("no-such-token");
    let out = support::daemon::refused(start(&missing), home_dir.path());
    let err = stderr(&out);
    assert!(
        err.contains("cannot reach aws-kms")
            && err.contains("web identity")
            && err.contains("no-such-token"),
        "{err}"
    );
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let out = support::daemon::refused(
        start(&token_file).env(
            "AWS_ENDPOINT_URL_STS",
            &format!("https://127.0.0.1:{closed}"),
        ),
        home_dir.path(),
    );
    let err = stderr(&out);
    assert!(
        err.contains("cannot reach aws-kms") && err.contains(&format!("127.0.0.1:{closed}")),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn aws_kms_tenant_keys_swapped_between_tenants_do_not_unwrap() {
    let Some(moto) = Moto::start("aws_kms_tenant_keys_swapped") else {
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
    let key_a = random_key("sk-acme-");
    let key_g = random_key("sk-globex-");
    let (token_a, _) = d.provision("acme", "openai", &key_a, &[]);
    let (token_g, _) = d.provision("globex", "openai", &key_g, &[]);
    assert_eq!(d.terminate(), Some(0));

    // Each tenant row now holds the other tenant's KMS ciphertext (the same KMS key wrapped
    // both; only the EncryptionContext differs).
    let db = rusqlite::Connection::open(home_dir.path().join("keyward.db")).unwrap();
    let wrapped = |name: &str| -> Vec<u8> {
        db.query_row(
            "SELECT wrapped_key FROM tenants WHERE name = ?1",
            [name],
            |r| r.get(0),
        )
        .unwrap()
    };
    let (acme, globex) = (wrapped("acme"), wrapped("globex"));
    assert_ne!(acme, globex);
    for (name, blob) in [("acme", &globex), ("globex", &acme)] {
        let n = db
            .execute(
                "UPDATE tenants SET wrapped_key = ?1 WHERE name = ?2",
                rusqlite::params![blob, name],
            )
            .unwrap();
        assert_eq!(n, 1);
    }
    drop(db);

    let d = start().start();
    let before = mock.requests().len();
    for token in [&token_a, &token_g] {
        let (status, _, body) = call_as(
            &d.socket(),
            token,
            "/openai/v1/chat/completions",
            &chat_body("gpt-4o-mini", false),
        )
        .await;
        assert_ne!(status, 200, "a swapped tenant key unwrapped: {body}");
        assert!(!body.contains(&key_a) && !body.contains(&key_g), "{body}");
    }
    assert_eq!(
        mock.requests().len(),
        before,
        "nothing may reach the provider"
    );
}

fn file_table(table: &str, path: &Path) -> String {
    format!(
        "[{table}]\nprovider = \"file\"\npath = \"{}\"\n",
        path.display()
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn migration_file_to_aws_kms_and_kms_key_a_to_b_keeps_every_secret() {
    let Some(moto) = Moto::start("migration_file_to_aws_kms") else {
        return;
    };
    let kms_a = moto.create_key();
    let kms_b = moto.create_key();
    let secret = random_key("");
    let keys = tempfile::tempdir().unwrap();
    let file = keys.path().join("a.key");
    std::fs::write(
        &file,
        format!(
            "{}\n",
            &format!("{}{}", random_key(""), random_key(""))[..64]
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let mock = MockUpstream::builder().start().await;
    let dir = tempfile::tempdir().unwrap();
    let home_dir = home();
    let start = |tables: String| {
        let config = support::targets_config(&mock, dir.path(), &["openai"], &tables);
        Daemon::builder()
            .home(home_dir.path())
            .config(&config)
            .env("AWS_ACCESS_KEY_ID", "AKIAKEYWARDTEST")
            .env("AWS_SECRET_ACCESS_KEY", &secret)
    };

    let d = start(file_table("master_key", &file)).start();
    let mut tenants = Vec::new();
    for name in ["acme", "globex", "initech"] {
        let key = random_key(&format!("sk-{name}-"));
        let (token, _) = d.provision(name, "openai", &key, &[]);
        tenants.push((token, key));
    }
    drop(d);

    // file → KMS key A.
    let d =
        start(moto.table("master_key", &kms_a) + &file_table("master_key.previous", &file)).start();
    assert!(
        d.stdout().contains("rewrapped 3 tenants' keys"),
        "{}",
        d.stdout()
    );
    for (token, key) in &tenants {
        served_with(&d, &mock, token, key).await;
    }
    drop(d);

    // KMS key A → KMS key B.
    let d = start(moto.table("master_key", &kms_b) + &moto.table("master_key.previous", &kms_a))
        .start();
    assert!(
        d.stdout().contains("rewrapped 3 tenants' keys"),
        "{}",
        d.stdout()
    );
    drop(d);
    let d = start(moto.table("master_key", &kms_b)).start();
    for (token, key) in &tenants {
        served_with(&d, &mock, token, key).await;
    }
    let events = d.json_lines(&["audit", "query", "--event", "master.rewrapped"]);
    assert_eq!(events.len(), 2, "{events:?}");
    assert!(
        events.iter().any(|e| {
            let detail = e["detail"].as_str().unwrap_or("");
            detail.contains(&format!("aws-kms: {kms_a} to aws-kms: {kms_b}"))
        }),
        "{events:?}"
    );
    assert!(d.cli(&["audit", "verify"]).status.success());
    drop(d);
    for old in [
        moto.table("master_key", &kms_a),
        file_table("master_key", &file),
    ] {
        let out = support::daemon::refused(start(old), home_dir.path());
        assert!(
            stderr(&out).contains("master key does not match this store"),
            "{}",
            stderr(&out)
        );
    }
}

/// The EncryptionContext binds each wrap to its purpose and tenant at KMS itself: a ciphertext
/// asked back for another tenant or purpose is refused by the server, whatever the store does.
#[test]
fn aws_kms_refuses_a_wrap_asked_back_for_another_tenant_or_purpose() {
    use keyward::custody::aws_kms::{AwsKmsKek, AwsKmsSettings};
    use keyward::seal::{Kek, Purpose, SealError};
    let Some(moto) = Moto::start("aws_kms_refuses_a_wrap_for_another_tenant") else {
        return;
    };
    let arn = moto.create_key();
    let settings = AwsKmsSettings {
        key_id: arn.clone(),
        region: support::kms::REGION.into(),
        endpoint: Some(moto.endpoint.clone()),
        ca_file: Some(moto.ca.clone()),
    };
    let secret = random_key("");
    let env = |name: &str| match name {
        "AWS_ACCESS_KEY_ID" => Some("AKIAKEYWARDTEST".to_string()),
        "AWS_SECRET_ACCESS_KEY" => Some(secret.clone()),
        _ => None,
    };
    let plain = AwsKmsSettings {
        endpoint: Some(moto.endpoint.replace("https://", "http://")),
        ..settings.clone()
    };
    let refused = AwsKmsKek::open_with_env(plain, &env)
        .err()
        .unwrap()
        .to_string();
    assert!(refused.contains("must be https://"), "{refused}");
    let kek = AwsKmsKek::open_with_env(settings, &env).unwrap();
    assert_eq!(kek.identity(), arn);
    let plaintext: Vec<u8> = random_key("").bytes().take(32).collect();
    let acme = Purpose::TenantKey { tenant: "ten_acme" };
    let wrapped = kek.wrap(acme, &plaintext).unwrap();
    assert_eq!(
        kek.unwrap(acme, &wrapped).unwrap().expose_secret(),
        &plaintext[..]
    );
    for other in [
        Purpose::TenantKey {
            tenant: "ten_globex",
        },
        Purpose::FingerprintKey { tenant: "ten_acme" },
        Purpose::AuditMacKey,
        Purpose::KeyCheck,
    ] {
        assert!(
            matches!(kek.unwrap(other, &wrapped), Err(SealError::Unauthentic)),
            "{other:?} opened acme's tenant key"
        );
    }
    let mut tampered = wrapped.clone();
    let last = tampered.len() - 1;
    tampered[last] ^= 1;
    assert!(kek.unwrap(acme, &tampered).is_err());
}

/// moto checking signatures as AWS does: the SigV4 of every call is verified against an IAM
/// user's secret, and a wrong secret is refused at start.
#[tokio::test(flavor = "multi_thread")]
async fn aws_kms_requests_carry_a_sigv4_signature_the_server_verifies() {
    // Four unauthenticated set-up calls: the IAM user, its access key, its policy, the KMS key.
    let Some(moto) = Moto::start_with_auth("aws_kms_requests_carry_a_sigv4_signature", 4) else {
        return;
    };
    let line = moto.python(
        "import json\n\
         iam = boto3.client('iam', **kw)\n\
         iam.create_user(UserName='keyward')\n\
         k = iam.create_access_key(UserName='keyward')['AccessKey']\n\
         iam.put_user_policy(UserName='keyward', PolicyName='kms', PolicyDocument=json.dumps(\
         {'Version': '2012-10-17', 'Statement': [{'Effect': 'Allow', \
         'Action': ['kms:Encrypt', 'kms:Decrypt'], 'Resource': '*'}]}))\n\
         print(kms.create_key()['KeyMetadata']['Arn'], k['AccessKeyId'], k['SecretAccessKey'])",
    );
    let parts: Vec<&str> = line.split_whitespace().collect();
    let [arn, id, secret] = parts[..] else {
        panic!("{line}")
    };
    let mock = MockUpstream::builder().start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = support::targets_config(
        &mock,
        dir.path(),
        &["openai"],
        &moto.table("master_key", arn),
    );
    let home_dir = home();
    let start = |secret: &str| {
        Daemon::builder()
            .home(home_dir.path())
            .config(&config)
            .env("AWS_ACCESS_KEY_ID", id)
            .env("AWS_SECRET_ACCESS_KEY", secret)
    };
    let mut d = start(secret).start();
    let key = random_key("sk-acme-");
    let (token, _) = d.provision("acme", "openai", &key, &[]);
    served_with(&d, &mock, &token, &key).await;
    assert_eq!(d.terminate(), Some(0));
    let d = start(secret).start();
    served_with(&d, &mock, &token, &key).await;
    drop(d);

    let wrong = random_key("");
    let out = support::daemon::refused(start(&wrong), home_dir.path());
    let err = stderr(&out);
    assert!(
        err.contains("cannot reach aws-kms") && err.contains("SignatureDoesNotMatch"),
        "{err}"
    );
    assert!(!contains(&out.stderr, &wrong) && !contains(&out.stdout, &wrong));
    assert!(!contains(&out.stderr, secret) && !contains(&out.stdout, secret));
}

/// A container credentials endpoint (the ECS agent, the EKS Pod Identity agent) on loopback:
/// answers `GET /v1/credentials` with session credentials valid for an hour when the
/// `Authorization` header carries `token`, 401 otherwise; counts the requests it answered 200.
fn credentials_endpoint(token: &str) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::io::{BufRead, BufReader, Write};
    use std::sync::atomic::Ordering;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!(
        "http://127.0.0.1:{}/v1/credentials",
        listener.local_addr().unwrap().port()
    );
    let served = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = served.clone();
    let token = token.to_string();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut request_line = String::new();
            let _ = reader.read_line(&mut request_line);
            let mut authorized = false;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                if let Some((name, value)) = line.split_once(':')
                    && name.eq_ignore_ascii_case("authorization")
                    && value.trim() == token
                {
                    authorized = true;
                }
            }
            let (status, body) = if authorized && request_line.starts_with("GET /v1/credentials ") {
                count.fetch_add(1, Ordering::SeqCst);
                let expires = std::time::SystemTime::now() + std::time::Duration::from_secs(3600);
                (
                    "200 OK",
                    serde_json::json!({
                        "AccessKeyId": "ASIAKEYWARDCONTAINER",
                        "SecretAccessKey": "container-secret-value",
                        "Token": "container-session-token",
                        "Expiration": humantime::format_rfc3339_seconds(expires).to_string(),
                    })
                    .to_string(),
                )
            } else {
                (
                    "401 Unauthorized",
                    "{\"message\":\"unauthorized\"}".to_string(),
                )
            };
            let _ = write!(
                stream,
                "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
                 connection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    (url, served)
}

#[tokio::test(flavor = "multi_thread")]
async fn aws_kms_with_container_credentials_asks_the_agent_once_per_expiry() {
    let Some(moto) = Moto::start("aws_kms_with_container_credentials") else {
        return;
    };
    let arn = moto.create_key();
    let agent_token = random_key("pod-identity-");
    let (url, served) = credentials_endpoint(&agent_token);
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("eks-pod-identity-token");
    std::fs::write(&token_file, format!("{agent_token}\n")).unwrap();
    let mock = MockUpstream::builder().start().await;
    let config = support::targets_config(
        &mock,
        dir.path(),
        &["openai"],
        &moto.table("master_key", &arn),
    );
    let home_dir = home();
    let start = |token_file: &Path| {
        Daemon::builder()
            .home(home_dir.path())
            .config(&config)
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env("AWS_CONTAINER_CREDENTIALS_FULL_URI", &url)
            .env(
                "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
                token_file.to_str().unwrap(),
            )
    };
    let d = start(&token_file).start();
    let key = random_key("sk-acme-");
    let (token, _) = d.provision("acme", "openai", &key, &[]);
    served_with(&d, &mock, &token, &key).await;
    // Several KMS calls (key resolution, key check, audit key, the tenant's keys), one fetch:
    // the session credentials are cached until shortly before they expire.
    assert!(
        d.json_lines(&["status"])[0]["kek_operations"]
            .as_u64()
            .unwrap()
            >= 3
    );
    assert_eq!(served.load(std::sync::atomic::Ordering::SeqCst), 1);
    for (what, bytes) in [
        ("stdout", d.stdout().into_bytes()),
        ("stderr", d.stderr().into_bytes()),
        ("state", d.all_state_bytes()),
    ] {
        for secret in [
            agent_token.as_str(),
            "container-secret-value",
            "container-session-token",
        ] {
            assert!(!contains(&bytes, secret), "{secret} leaked into {what}");
        }
    }
    drop(d);

    let wrong = dir.path().join("wrong-token");
    std::fs::write(&wrong, random_key("pod-identity-")).unwrap();
    let out = support::daemon::refused(start(&wrong), home_dir.path());
    let err = stderr(&out);
    assert!(
        err.contains("cannot reach aws-kms")
            && err.contains("container credentials")
            && err.contains("HTTP 401"),
        "{err}"
    );
}

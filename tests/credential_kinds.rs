//! Credential kinds through the real binary: `cred add --kind` checks each kind's JSON document
//! and the target it is for, names what is wrong without echoing the secret, stores the kind
//! (migrating an older store), lists it, audits it, and carries it through a bundle to a
//! sidecar.

mod support;

use std::path::Path;

use serde_json::Value;
use support::daemon::{Daemon, contains, random_key};
use support::mock_upstream::MockUpstream;

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn entra_doc(secret: &str) -> String {
    format!(
        r#"{{"tenant_id":"contoso.onmicrosoft.com","client_id":"{}","client_secret":"{secret}"}}"#,
        "11111111-2222-3333-4444-555555555555"
    )
}

fn config(mock: &MockUpstream, dir: &Path, extra: &str) -> String {
    support::targets_config(mock, dir, &["openai", "azure-openai"], extra)
}

#[tokio::test]
async fn cred_add_checks_the_kind_document_and_target_and_never_echoes_the_secret() {
    let mock = MockUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::builder()
        .config(&config(&mock, dir.path(), ""))
        .start();
    d.ok(&["tenant", "add", "acme"]);
    let secret = random_key("Q~");
    let add = |name: &str, target: &str, kind: Option<&str>, stdin: &str| {
        let mut args = vec![
            "cred", "add", "--tenant", "acme", "--target", target, "--name", name,
        ];
        if let Some(kind) = kind {
            args.extend(["--kind", kind]);
        }
        d.cli_stdin(&args, Some(stdin.as_bytes()))
    };

    // Each broken document is refused (exit 1) with the field named and the secret absent.
    let cases = [
        (
            format!(r#"{{"tenant_id":"t","client_id":"c","client_secrt":"{secret}"}}"#),
            "unknown field `client_secrt`",
        ),
        (
            format!(r#"{{"tenant_id":"t","client_secret":"{secret}"}}"#),
            "missing field `client_id`",
        ),
        (
            format!(r#"{{"tenant_id":"t","client_id":"c","client_secret":"{secret}"#),
            "not valid JSON",
        ),
        (secret.clone(), "not valid JSON"),
    ];
    for (doc, want) in &cases {
        let out = add("entra", "azure-openai", Some("azure-entra"), doc);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(err.contains(want), "{err}");
        assert!(
            err.contains("client_secret"),
            "names the fields it wants: {err}"
        );
        assert!(!err.contains(&secret[2..]), "the secret was echoed: {err}");
    }
    // A kind the target does not take, named with the ones it does.
    let out = add("wrong", "openai", Some("azure-entra"), &entra_doc(&secret));
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("target `openai`") && err.contains("--kind api-key"),
        "{err}"
    );
    let out = add(
        "gcp",
        "azure-openai",
        Some("gcp-service-account"),
        r#"{"type":"service_account"}"#,
    );
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("--kind api-key or --kind azure-entra"),
        "{err}"
    );
    // An unknown kind is a usage error.
    let out = add("x", "openai", Some("oauth"), "k");
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("azure-entra"), "{}", stderr(&out));
    // Nothing was stored by the refusals.
    assert!(d.json_lines(&["cred", "list"]).is_empty());

    // A good document is stored with its kind; the preview masks the client id.
    let added: Value = serde_json::from_str(
        d.ok_stdin(
            &[
                "cred",
                "add",
                "--tenant",
                "acme",
                "--target",
                "azure-openai",
                "--name",
                "entra",
                "--kind",
                "azure-entra",
                "--json",
            ],
            entra_doc(&secret).as_bytes(),
        )
        .trim(),
    )
    .unwrap();
    assert_eq!(added["kind"], "azure-entra");
    assert_eq!(added["preview"], "1111…5555");
    // The default kind is api-key, also for azure-openai.
    let key = random_key("az-");
    d.ok_stdin(
        &[
            "cred",
            "add",
            "--tenant",
            "acme",
            "--target",
            "azure-openai",
            "--name",
            "key",
        ],
        key.as_bytes(),
    );
    let list = d.json_lines(&["cred", "list"]);
    let kind_of = |name: &str| {
        list.iter()
            .find(|c| c["name"] == name)
            .map(|c| c["kind"].clone())
            .unwrap()
    };
    assert_eq!(kind_of("entra"), "azure-entra");
    assert_eq!(kind_of("key"), "api-key");
    let table = d.ok(&["cred", "list"]);
    assert!(
        table.contains("KIND") && table.contains("azure-entra"),
        "{table}"
    );

    // Rotation takes a document of the same kind only.
    let id = added["id"].as_str().unwrap();
    let out = d.cli_stdin(&["cred", "rotate", id], Some(b"sk-plain-key-0123456789"));
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("azure-entra secret"), "{err}");
    let rotated = random_key("Q~");
    d.ok_stdin(&["cred", "rotate", id], entra_doc(&rotated).as_bytes());

    // The audit names the kind; no secret anywhere the operator or disk can see.
    let created = d.json_lines(&["audit", "query", "--event", "credential.created"]);
    assert!(
        created.iter().any(|r| r["detail"]
            .as_str()
            .unwrap_or("")
            .contains("kind=azure-entra")),
        "{created:?}"
    );
    let audit = d.ok(&["audit", "query", "--json"]);
    let listing = d.ok(&["cred", "list", "--json"]);
    let state = d.all_state_bytes();
    for s in [&secret, &rotated, &key] {
        assert!(!audit.contains(s.as_str()) && !listing.contains(s.as_str()));
        assert!(!contains(&state, s), "a secret in the state directory");
        assert!(!d.stdout().contains(s.as_str()) && !d.stderr().contains(s.as_str()));
    }
}

#[tokio::test]
async fn a_store_from_before_kinds_is_migrated_and_its_keys_are_api_keys() {
    let mock = MockUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    std::fs::create_dir(&home).unwrap();
    let cfg = config(&mock, dir.path(), "");
    let mut d = Daemon::builder().config(&cfg).home(&home).start();
    let key = random_key("sk-");
    let (token, cred) = d.provision("acme", "openai", &key, &[]);
    assert_eq!(d.terminate(), Some(0));
    // Make it a schema-1 store: no kind column.
    {
        let db = rusqlite::Connection::open(home.join("keyward.db")).unwrap();
        db.execute_batch(
            "ALTER TABLE credentials DROP COLUMN kind;
             UPDATE meta SET value = 1 WHERE key = 'schema_version';",
        )
        .unwrap();
    }
    let d = Daemon::builder().config(&cfg).home(&home).start();
    let list = d.json_lines(&["cred", "list"]);
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["id"], cred.as_str());
    assert_eq!(list[0]["kind"], "api-key");
    let bearer = support::uds::bearer(&token);
    let (status, _, _) = support::uds::call(
        &d.socket(),
        support::uds::post(
            "/openai/v1/chat/completions",
            &[("authorization", &bearer)],
            &support::uds::chat_body("gpt-4o", false),
        ),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        support::mock_upstream::key_of(&mock.last_request().unwrap()).as_deref(),
        Some(key.as_str())
    );
    let db = rusqlite::Connection::open(home.join("keyward.db")).unwrap();
    let version: i64 = db
        .query_row(
            "SELECT value FROM meta WHERE key = 'schema_version'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(version, 2);
}

#[tokio::test]
async fn the_kind_survives_a_bundle_to_a_sidecar() {
    let mock = MockUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("master.key");
    std::fs::write(
        &key_file,
        format!("{}{}", random_key(""), &random_key("")[..16]),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let master = format!("master_key_file = \"{}\"", key_file.display());
    let author = Daemon::builder()
        .config(&config(&mock, dir.path(), &master))
        .start();
    author.ok(&["tenant", "add", "acme"]);
    let secret = random_key("Q~");
    author.ok_stdin(
        &[
            "cred",
            "add",
            "--tenant",
            "acme",
            "--target",
            "azure-openai",
            "--name",
            "entra",
            "--kind",
            "azure-entra",
        ],
        entra_doc(&secret).as_bytes(),
    );
    let key = random_key("sk-");
    author.ok_stdin(
        &[
            "cred", "add", "--tenant", "acme", "--target", "openai", "--name", "key",
        ],
        key.as_bytes(),
    );
    let bundle = dir.path().join("fleet.bundle");
    author.ok(&["bundle", "export", "--out", bundle.to_str().unwrap()]);
    let bytes = std::fs::read(&bundle).unwrap();
    assert!(!contains(&bytes, &secret) && !contains(&bytes, &key));

    let home = dir.path().join("sidecar");
    std::fs::create_dir(&home).unwrap();
    let sidecar = Daemon::builder()
        .config(&config(
            &mock,
            dir.path(),
            &format!("{master}\nbundle = \"{}\"", bundle.display()),
        ))
        .home(&home)
        .start();
    let list = sidecar.json_lines(&["cred", "list"]);
    let kinds: Vec<(String, String)> = list
        .iter()
        .map(|c| {
            (
                c["name"].as_str().unwrap().to_string(),
                c["kind"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert!(
        kinds.contains(&("entra".into(), "azure-entra".into())),
        "{kinds:?}"
    );
    assert!(
        kinds.contains(&("key".into(), "api-key".into())),
        "{kinds:?}"
    );
    // The preview travelled too.
    let entra = list.iter().find(|c| c["name"] == "entra").unwrap();
    assert_eq!(entra["preview"], "1111…5555");
}

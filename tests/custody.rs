//! Key custody: the master key's provider named by `[master_key]`, driven through the real
//! binary — first start, restart, wrong key, the status counter, and refusals at start.

mod support;

use std::path::Path;
use std::process::Output;

use support::daemon::{Daemon, contains, random_key};

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn write_key(dir: &Path, name: &str) -> (std::path::PathBuf, String) {
    let hex = format!("{}{}", random_key(""), random_key(""))[..64].to_string();
    let path = dir.join(name);
    std::fs::write(&path, format!("{hex}\n")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    (path, hex)
}

#[test]
fn file_provider_table_serves_restarts_and_refuses_another_key() {
    let keys = tempfile::tempdir().unwrap();
    let (a, a_hex) = write_key(keys.path(), "a.key");
    let (b, b_hex) = write_key(keys.path(), "b.key");
    let table = |p: &Path| {
        format!(
            "[master_key]\nprovider = \"file\"\npath = \"{}\"\n",
            p.display()
        )
    };

    let mut d = Daemon::builder().config(&table(&a)).start();
    assert!(
        d.stdout().contains(&format!("{} (file)", a.display())),
        "{}",
        d.stdout()
    );
    d.provision("acme", "openai", &random_key("sk-"), &[]);
    let status = &d.json_lines(&["status"])[0];
    assert_eq!(status["master_key_provider"], "file");
    assert_eq!(status["master_key_source"], format!("file {}", a.display()));
    // Key check at start, audit MAC key, then tenant add (tenant + fingerprint wraps) and cred
    // add (tenant + fingerprint unwraps, once): each is one operation of the provider.
    assert!(status["kek_operations"].as_u64().unwrap() >= 4, "{status}");
    let home = d.home.clone();
    assert_eq!(d.terminate(), Some(0));

    let d = Daemon::builder().home(&home).config(&table(&a)).start();
    assert_eq!(d.json_lines(&["tenant", "list"])[0]["name"], "acme");
    drop(d);

    let out = support::daemon::refused(Daemon::builder().home(&home).config(&table(&b)), &home);
    let err = stderr(&out);
    assert!(
        err.contains("master key does not match this store"),
        "{err}"
    );
    // It names the key that wrapped the store, so the operator knows which one to bring.
    assert!(err.contains(&a.display().to_string()), "{err}");
    assert!(!err.contains(&a_hex) && !err.contains(&b_hex), "{err}");
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn bad_master_key_tables_are_refused_before_anything_is_bound() {
    let home = tempfile::Builder::new()
        .prefix("kw")
        .tempdir_in("/tmp")
        .unwrap();
    let out = support::daemon::refused(
        Daemon::builder()
            .home(home.path())
            .config("[master_key]\nprovider = \"vault\"\n"),
        home.path(),
    );
    assert!(
        stderr(&out).contains("master_key.provider"),
        "{}",
        stderr(&out)
    );
    assert!(!home.path().join("keyward.db").exists());
    let out = support::daemon::refused(
        Daemon::builder()
            .home(home.path())
            .config("[master_key]\nprovider = \"file\"\npath = \"relative.key\"\n"),
        home.path(),
    );
    assert!(
        stderr(&out).contains("master_key.path") && stderr(&out).contains("absolute"),
        "{}",
        stderr(&out)
    );
    assert!(!contains(&out.stdout, "serving"));
}

// === pkcs11 (SoftHSM2) ===

use support::hsm::SoftHsm;
use support::mock_upstream::{MockUpstream, key_of};
use support::uds::{call_as, chat_body};

fn digits_pin() -> String {
    random_key("")
        .bytes()
        .take(8)
        .map(|b| char::from(b'0' + b % 10))
        .collect()
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

#[tokio::test(flavor = "multi_thread")]
async fn pkcs11_first_start_restart_and_requests_unwrap_inside_the_token() {
    let Some(hsm) = SoftHsm::new("pkcs11_first_start_restart") else {
        return;
    };
    let pin = digits_pin();
    hsm.init_token("keyward", &pin);
    hsm.keygen("keyward", &pin, "keyward-master", false);
    let pin_file = hsm.pin_file("hsm-pin", &pin);
    let mock = MockUpstream::builder().start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = support::targets_config(
        &mock,
        dir.path(),
        &["openai"],
        &hsm.table("master_key", "keyward", "keyward-master", &pin_file),
    );
    let conf = hsm.conf.to_str().unwrap().to_string();
    let mut d = Daemon::builder()
        .config(&config)
        .env("SOFTHSM2_CONF", &conf)
        .start();
    assert!(
        d.stdout()
            .contains("token `keyward` key `keyward-master` (module"),
        "{}",
        d.stdout()
    );
    assert!(d.stdout().contains("(pkcs11)"), "{}", d.stdout());
    assert!(
        !d.home.join("master.key").exists(),
        "no key file with an HSM"
    );
    let key_a = random_key("sk-acme-");
    let key_g = random_key("sk-globex-");
    let (token_a, _) = d.provision("acme", "openai", &key_a, &[]);
    let (token_g, _) = d.provision("globex", "openai", &key_g, &[]);
    served_with(&d, &mock, &token_a, &key_a).await;
    served_with(&d, &mock, &token_g, &key_g).await;
    let status = &d.json_lines(&["status"])[0];
    assert_eq!(status["master_key_provider"], "pkcs11");
    let home = d.home.clone();
    assert_eq!(d.terminate(), Some(0));

    let d = Daemon::builder()
        .home(&home)
        .config(&config)
        .env("SOFTHSM2_CONF", &conf)
        .start();
    served_with(&d, &mock, &token_a, &key_a).await;
    served_with(&d, &mock, &token_g, &key_g).await;
    // Key check + audit MAC key at start, then two unwraps per tenant on its first request.
    assert_eq!(d.json_lines(&["status"])[0]["kek_operations"], 6);
    for (what, bytes) in [
        ("stdout", d.stdout().into_bytes()),
        ("stderr", d.stderr().into_bytes()),
        ("state", d.all_state_bytes()),
        ("status", d.ok(&["status", "--json"]).into_bytes()),
    ] {
        assert!(!contains(&bytes, &pin), "the PIN leaked into {what}");
        assert!(
            !contains(&bytes, &key_a),
            "a provider key leaked into {what}"
        );
    }
}

#[test]
fn pkcs11_wrong_key_wrong_pin_and_missing_parts_are_refused_at_start() {
    let Some(hsm) = SoftHsm::new("pkcs11_refusals") else {
        return;
    };
    let pin = digits_pin();
    hsm.init_token("keyward", &pin);
    hsm.keygen("keyward", &pin, "master-a", false);
    hsm.keygen("keyward", &pin, "master-b", false);
    hsm.keygen("keyward", &pin, "loose", true);
    hsm.init_token("other", &pin);
    hsm.keygen("other", &pin, "master-a", false);
    let pin_file = hsm.pin_file("hsm-pin", &pin);
    let conf = hsm.conf.to_str().unwrap().to_string();
    let with = |home: &Path, table: String| {
        Daemon::builder()
            .home(home)
            .config(&table)
            .env("SOFTHSM2_CONF", &conf)
    };
    let home_dir = tempfile::Builder::new()
        .prefix("kw")
        .tempdir_in("/tmp")
        .unwrap();
    let home = home_dir.path().to_path_buf();
    let d = with(
        &home,
        hsm.table("master_key", "keyward", "master-a", &pin_file),
    )
    .start();
    d.ok(&["tenant", "add", "acme"]);
    drop(d);

    // Another key on the same token, the same label on another token: the store refuses them.
    for (token, key) in [("keyward", "master-b"), ("other", "master-a")] {
        let out = support::daemon::refused(
            with(&home, hsm.table("master_key", token, key, &pin_file)),
            &home,
        );
        let err = stderr(&out);
        assert!(
            err.contains("master key does not match this store"),
            "{err}"
        );
        assert!(err.contains("token `keyward` key `master-a`"), "{err}");
    }

    let wrong_pin = hsm.pin_file("wrong-pin", "99999999");
    let missing_module = hsm
        .table("master_key", "keyward", "master-a", &pin_file)
        .replace(
            &hsm.module.display().to_string(),
            "/nonexistent/libpkcs11.so",
        );
    for (table, needles) in [
        (
            hsm.table("master_key", "keyward", "master-a", &wrong_pin),
            &["cannot reach pkcs11", "refused the PIN", "pin_file"][..],
        ),
        (
            missing_module,
            &[
                "cannot reach pkcs11",
                "cannot load the module",
                "master_key.module",
            ][..],
        ),
        (
            hsm.table("master_key", "nosuch", "master-a", &pin_file),
            &[
                "cannot reach pkcs11",
                "no token labelled `nosuch`",
                "keyward, other",
            ][..],
        ),
        (
            hsm.table("master_key", "keyward", "nosuch", &pin_file),
            &[
                "cannot reach pkcs11",
                "no AES key labelled `nosuch`",
                "--keygen",
            ][..],
        ),
        (
            hsm.table("master_key", "keyward", "loose", &pin_file),
            &["cannot reach pkcs11", "CKA_EXTRACTABLE = true"][..],
        ),
        (
            hsm.table(
                "master_key",
                "keyward",
                "master-a",
                &hsm.dir().join("absent"),
            ),
            &["cannot reach pkcs11", "cannot read the PIN file"][..],
        ),
        (
            hsm.table("master_key", "keyward", "master-a", &{
                // A PIN file other users can read is refused like a master key file.
                let loose = hsm.pin_file("loose-pin", &pin);
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o644)).unwrap();
                loose
            }),
            &["HSM PIN file", "other users can read it", "chmod 600"][..],
        ),
    ] {
        let out = support::daemon::refused(with(&home, table), &home);
        let err = stderr(&out);
        for needle in needles {
            assert!(err.contains(needle), "{err} lacks {needle}");
        }
        assert!(!err.contains(&pin) && !err.contains("99999999"), "{err}");
        assert_eq!(out.status.code(), Some(1), "{err}");
    }
    // The right key still opens the store afterwards.
    let d = with(
        &home,
        hsm.table("master_key", "keyward", "master-a", &pin_file),
    )
    .start();
    assert_eq!(d.json_lines(&["tenant", "list"])[0]["name"], "acme");
}

// === migration ===

fn file_table(table: &str, path: &Path) -> String {
    format!(
        "[{table}]\nprovider = \"file\"\npath = \"{}\"\n",
        path.display()
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn migration_file_to_pkcs11_and_back_keeps_every_secret() {
    let Some(hsm) = SoftHsm::new("migration_file_pkcs11") else {
        return;
    };
    let pin = digits_pin();
    hsm.init_token("keyward", &pin);
    hsm.keygen("keyward", &pin, "master", false);
    let pin_file = hsm.pin_file("hsm-pin", &pin);
    let conf = hsm.conf.to_str().unwrap().to_string();
    let keys = tempfile::tempdir().unwrap();
    let (file_a, _) = write_key(keys.path(), "a.key");
    let (file_b, _) = write_key(keys.path(), "b.key");
    let mock = MockUpstream::builder().start().await;
    let dir = tempfile::tempdir().unwrap();
    let home_dir = tempfile::Builder::new()
        .prefix("kw")
        .tempdir_in("/tmp")
        .unwrap();
    let home = home_dir.path().to_path_buf();
    let start = |tables: String| {
        let config = support::targets_config(&mock, dir.path(), &["openai"], &tables);
        Daemon::builder()
            .home(&home)
            .config(&config)
            .env("SOFTHSM2_CONF", &conf)
    };
    let hsm_table = |t: &str| hsm.table(t, "keyward", "master", &pin_file);

    let d = start(file_table("master_key", &file_a)).start();
    let mut tenants = Vec::new();
    for name in ["acme", "globex", "initech"] {
        let key = random_key(&format!("sk-{name}-"));
        let (token, _) = d.provision(name, "openai", &key, &[]);
        tenants.push((token, key));
    }
    drop(d);

    // file A → pkcs11.
    let d = start(hsm_table("master_key") + &file_table("master_key.previous", &file_a)).start();
    assert!(
        d.stdout().contains("rewrapped 3 tenants' keys"),
        "{}",
        d.stdout()
    );
    for (token, key) in &tenants {
        served_with(&d, &mock, token, key).await;
    }
    let events = d.json_lines(&["audit", "query", "--event", "master.rewrapped"]);
    assert_eq!(events.len(), 1, "{events:?}");
    let detail = events[0]["detail"].as_str().unwrap();
    assert!(
        detail.contains(&file_a.display().to_string()) && detail.contains("token `keyward`"),
        "{detail}"
    );
    assert!(d.cli(&["audit", "verify"]).status.success());
    drop(d);

    // Only the new table from now on; the old key no longer opens the store.
    let d = start(hsm_table("master_key")).start();
    for (token, key) in &tenants {
        served_with(&d, &mock, token, key).await;
    }
    drop(d);
    let out = support::daemon::refused(start(file_table("master_key", &file_a)), &home);
    assert!(
        stderr(&out).contains("master key does not match this store")
            && stderr(&out).contains("token `keyward` key `master`"),
        "{}",
        stderr(&out)
    );

    // pkcs11 → file B.
    let d = start(file_table("master_key", &file_b) + &hsm_table("master_key.previous")).start();
    assert!(
        d.stdout().contains("rewrapped 3 tenants' keys"),
        "{}",
        d.stdout()
    );
    drop(d);
    let d = start(file_table("master_key", &file_b)).start();
    for (token, key) in &tenants {
        served_with(&d, &mock, token, key).await;
    }
    let events = d.json_lines(&["audit", "query", "--event", "master.rewrapped"]);
    assert_eq!(events.len(), 2, "{events:?}");
    assert!(d.cli(&["audit", "verify"]).status.success());
    // Starting again with both tables changes nothing and writes no event.
    drop(d);
    let d = start(file_table("master_key", &file_b) + &hsm_table("master_key.previous")).start();
    assert!(d.stdout().contains("done earlier"), "{}", d.stdout());
    assert_eq!(
        d.json_lines(&["audit", "query", "--event", "master.rewrapped"])
            .len(),
        2
    );
}

/// The store's rewrap is one SQLite transaction whatever the provider, so this runs file →
/// file: SoftHSM2 itself rewrites its token file at login without an atomic rename, and a kill -9
/// at that moment destroys the token, which would test SoftHSM2 rather than keyward.
#[test]
fn migration_killed_half_way_leaves_a_store_one_key_opens_and_finishes_on_restart() {
    let keys = tempfile::tempdir().unwrap();
    let (file_a, _) = write_key(keys.path(), "a.key");
    let (file_b, _) = write_key(keys.path(), "b.key");
    let home_dir = tempfile::Builder::new()
        .prefix("kw")
        .tempdir_in("/tmp")
        .unwrap();
    let home = home_dir.path().to_path_buf();
    let builder = |tables: String| Daemon::builder().home(&home).config(&tables);
    let old = file_table("master_key", &file_a);
    let new = file_table("master_key", &file_b);
    let both = new.clone() + &file_table("master_key.previous", &file_a);
    let back = old.clone() + &file_table("master_key.previous", &file_b);
    const TENANTS: usize = 400;
    let d = builder(old.clone()).start();
    std::thread::scope(|s| {
        for part in 0..4 {
            let d = &d;
            s.spawn(move || {
                for i in (part..TENANTS).step_by(4) {
                    d.ok(&["tenant", "add", &format!("t{i:03}")]);
                }
            });
        }
    });
    drop(d);
    let tenants_listed = |d: &Daemon| d.json_lines(&["tenant", "list"]).len();
    // How long a migrating start takes to serve, to spread the kills over it.
    let began = std::time::Instant::now();
    let d = builder(both.clone()).start();
    let full = began.elapsed();
    assert!(
        d.stdout().contains("rewrapped 400 tenants"),
        "{}",
        d.stdout()
    );
    drop(d);
    drop(builder(back.clone()).start());

    let mut outcomes = Vec::new();
    for step in 1..=12u32 {
        for stale in ["keyward.sock", "admin.sock"] {
            let _ = std::fs::remove_file(home.join(stale));
        }
        let mut child = builder(both.clone())
            .command(&home)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(full * step / 12);
        child.kill().unwrap();
        child.wait().unwrap();
        // Exactly one key alone opens the whole state directory, with every tenant.
        match builder(old.clone()).try_start() {
            Ok(d) => {
                assert_eq!(tenants_listed(&d), TENANTS);
                outcomes.push("old");
            }
            Err((_, err)) => {
                assert!(
                    err.contains("master key does not match this store"),
                    "{err}"
                );
                let d = builder(new.clone()).start();
                assert_eq!(tenants_listed(&d), TENANTS);
                assert!(d.cli(&["audit", "verify"]).status.success());
                outcomes.push("new");
                drop(d);
                // Migrated: move the state back under the old key for the next round.
                drop(builder(back.clone()).start());
            }
        }
    }
    eprintln!(
        "a migrating start of {TENANTS} tenants served after {full:?}; killed at twelfths of that, \
         the state was under: {outcomes:?}"
    );
    // And a start with both tables finishes the migration; the new key alone opens it after.
    drop(builder(both).start());
    let d = builder(new).start();
    assert_eq!(tenants_listed(&d), TENANTS);
    assert!(d.cli(&["audit", "verify"]).status.success());
    assert!(
        outcomes.contains(&"old"),
        "no kill landed before the commit: {outcomes:?}"
    );
}

/// The provider is asked once per tenant per process, not per request: 1,000 requests across
/// 10 tenants after a restart cost 2 provider operations at start (key check, audit MAC key)
/// and 2 per tenant (tenant key, fingerprint key) on its first request.
#[tokio::test(flavor = "multi_thread")]
async fn a_thousand_requests_across_ten_tenants_ask_the_hsm_twenty_two_times() {
    let Some(hsm) = SoftHsm::new("kek_operations") else {
        return;
    };
    let pin = digits_pin();
    hsm.init_token("keyward", &pin);
    hsm.keygen("keyward", &pin, "master", false);
    let pin_file = hsm.pin_file("hsm-pin", &pin);
    let conf = hsm.conf.to_str().unwrap().to_string();
    let mock = MockUpstream::builder().start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = support::targets_config(
        &mock,
        dir.path(),
        &["openai"],
        &hsm.table("master_key", "keyward", "master", &pin_file),
    );
    let home_dir = tempfile::Builder::new()
        .prefix("kw")
        .tempdir_in("/tmp")
        .unwrap();
    let start = || {
        Daemon::builder()
            .home(home_dir.path())
            .config(&config)
            .env("SOFTHSM2_CONF", &conf)
            .start()
    };
    let d = start();
    let tenants: Vec<(String, String)> = (0..10)
        .map(|i| {
            let key = random_key(&format!("sk-t{i}-"));
            (d.provision(&format!("t{i}"), "openai", &key, &[]).0, key)
        })
        .collect();
    drop(d);
    let d = start();
    assert_eq!(d.json_lines(&["status"])[0]["kek_operations"], 2);
    let socket = d.socket();
    for n in 0..1000 {
        let (token, _) = &tenants[n % 10];
        let (status, _, body) = call_as(
            &socket,
            token,
            "/openai/v1/chat/completions",
            &chat_body("gpt-4o-mini", false),
        )
        .await;
        assert_eq!(status, 200, "{body}");
    }
    let ops = d.json_lines(&["status"])[0]["kek_operations"]
        .as_u64()
        .unwrap();
    eprintln!("1,000 requests across 10 tenants: {ops} provider operations since start");
    assert_eq!(ops, 22);
}

/// The unit's documented HSM settings keep its `systemd-analyze security` exposure at or below
/// 1.5: each commented HSM line of systemd/keyward.service is switched on and rated offline.
#[test]
fn unit_with_the_hsm_settings_keeps_its_exposure_at_most_one_and_a_half() {
    let available = std::process::Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !available {
        assert!(
            !support::hsm::in_ci(),
            "systemd-analyze must be installed in CI"
        );
        eprintln!("unit exposure: DID NOT RUN: systemd-analyze is not installed");
        return;
    }
    let unit = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd/keyward.service"),
    )
    .unwrap();
    let hsm_lines = [
        "LoadCredential=hsm-pin:/etc/keyward/hsm-pin",
        "ReadWritePaths=/var/lib/softhsm/tokens",
        "SupplementaryGroups=softhsm",
        "Environment=SOFTHSM2_CONF=/etc/softhsm/softhsm2.conf",
        "ReadOnlyPaths=/etc/hsm-client",
        "PrivateDevices=no",
        "DeviceAllow=char-usb_device rw",
    ];
    let mut with_hsm = unit.replace("PrivateDevices=yes\n", "");
    for line in hsm_lines {
        let commented = format!("#{line}\n");
        assert!(with_hsm.contains(&commented), "the unit documents {line}");
        with_hsm = with_hsm.replace(&commented, &format!("{line}\n"));
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keyward.service");
    std::fs::write(&path, with_hsm).unwrap();
    let out = std::process::Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--root=/"])
        .arg(&path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let level: f64 = text
        .lines()
        .find_map(|l| l.split("Overall exposure level for").nth(1))
        .and_then(|rest| rest.split(": ").nth(1))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            panic!(
                "no exposure level in:\n{text}{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    assert!(
        level <= 1.5,
        "exposure {level} with the HSM settings:\n{text}"
    );
}

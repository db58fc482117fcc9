//! Runs every file of the committed fuzz corpora (`fuzz/corpus/<target>/`) through the same
//! checks the cargo-fuzz targets run, on stable Rust: inputs the fuzzers found interesting, and
//! every crash they ever found, stay regression tests. `fuzz/run.sh` grows the corpora.

#[path = "../fuzz/checks.rs"]
mod checks;

use std::path::Path;

/// Feeds every corpus file of `target` to `check`; fails naming the file that panics.
fn run_corpus(target: &str, check: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    assert!(
        !files.is_empty(),
        "no corpus for {target} in {}",
        dir.display()
    );
    for file in &files {
        let data = std::fs::read(file).unwrap();
        if std::panic::catch_unwind(|| check(&data)).is_err() {
            panic!("{target}: {} fails its check", file.display());
        }
    }
}

#[test]
fn route_corpus() {
    run_corpus("route", checks::route);
}

#[test]
fn json_scanners_corpus() {
    run_corpus("json_scanners", checks::json_scanners);
}

#[test]
fn multipart_corpus() {
    run_corpus("multipart", checks::multipart);
}

#[test]
fn scrub_corpus() {
    run_corpus("scrub", checks::scrub);
}

#[test]
fn config_corpus() {
    run_corpus("config", checks::config);
}

#[test]
fn framing_corpus() {
    run_corpus("framing", checks::framing);
}

#[test]
fn usage_corpus() {
    run_corpus("usage", checks::usage);
}

#[test]
fn eventstream_corpus() {
    run_corpus("eventstream", checks::eventstream);
}

#[test]
fn bundle_corpus() {
    run_corpus("bundle", checks::bundle);
}

/// Writes the seed corpus of the `bundle` target: bundles `keyward::bundle::export` seals under
/// the fuzz master key (whole files, and their payloads for the sealed-payload mode). Run with
/// `cargo test --test fuzz_corpus -- --ignored` to make them again after a format change.
#[test]
#[ignore = "writes fuzz/corpus/bundle; run by hand after a bundle format change"]
fn write_bundle_seeds() {
    use keyward::seal::{MasterKeyProvider, Purpose};
    use keyward::store::{ClientRow, CredentialRow, Snapshot, TenantRow, VersionRow};
    let master: MasterKeyProvider = keyward::seal::MasterKey::from_secret(
        keyward::seal::Secret::from_slice(&checks::BUNDLE_MASTER_KEY),
    )
    .into();
    let tenant = |id: &str, name: &str| TenantRow {
        id: id.into(),
        name: name.into(),
        wrapped_key: master
            .new_wrapped_key(Purpose::TenantKey { tenant: id })
            .unwrap(),
        wrapped_fp_key: master
            .new_wrapped_key(Purpose::FingerprintKey { tenant: id })
            .unwrap(),
        max_key_age_s: Some(86_400),
        on_expiry: "warn".into(),
        rotation_overlap_s: Some(3600),
        created_at: 1_700_000_000,
    };
    let version = |n: u32, revoked: Option<i64>| VersionRow {
        version: n,
        wrapped_data_key: vec![n as u8; 60],
        ciphertext: vec![0xa5; 48],
        preview: format!("sk-…{n:04}"),
        created_at: 1_700_000_100 + i64::from(n),
        overlap_until: None,
        retired_at: None,
        revoked_at: revoked,
    };
    let full = Snapshot {
        tenants: vec![tenant("ten_a", "acme"), tenant("ten_b", "globex")],
        clients: vec![ClientRow {
            id: "cli_1".into(),
            tenant_id: "ten_a".into(),
            name: "app".into(),
            team: Some("search".into()),
            uid: Some(1000),
            workflows: vec!["summarise".into()],
            token_hash: vec![7; 32],
            created_at: 1_700_000_050,
            revoked_at: None,
        }],
        credentials: vec![CredentialRow {
            id: "cred_1".into(),
            tenant_id: "ten_a".into(),
            target: "openai".into(),
            name: "prod".into(),
            models: vec!["gpt-4o*".into()],
            capabilities: vec!["chat".into()],
            teams: vec![],
            workflows: vec![],
            priority: 10,
            created_at: 1_700_000_060,
            revoked_at: None,
            kind: Default::default(),
            versions: vec![version(1, Some(1_700_000_500)), version(2, None)],
        }],
    };
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/bundle");
    std::fs::create_dir_all(&dir).unwrap();
    for (name, snapshot, serial) in [("full", &full, 7), ("empty", &Snapshot::default(), 1)] {
        let text = keyward::bundle::export(&master, snapshot, &[], "seed", serial)
            .unwrap()
            .text;
        let opened = keyward::bundle::open(text.as_bytes(), Path::new("seed"), &master).unwrap();
        assert_eq!(opened.serial, serial);
        let mut file = vec![0u8];
        file.extend_from_slice(text.as_bytes());
        std::fs::write(dir.join(format!("seed-{name}-file")), &file).unwrap();
        let envelope: serde_json::Value = serde_json::from_str(&text).unwrap();
        let mut payload = vec![1u8];
        payload.extend_from_slice(envelope["payload"].as_str().unwrap().as_bytes());
        std::fs::write(dir.join(format!("seed-{name}-payload")), &payload).unwrap();
    }
}

#[test]
fn admin_api_corpus() {
    run_corpus("admin_api", checks::admin_api);
}

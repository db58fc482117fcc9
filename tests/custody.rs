//! Key custody: the master key's provider named by `[master_key]`, driven through the real
//! binary — first start, restart, wrong key, the status counter, and refusals at start.

mod support;

use std::path::Path;
use std::process::Output;

use support::daemon::{Daemon, DaemonBuilder, contains, random_key};

/// Runs `serve` to completion (it must refuse to start) and returns its output.
fn refused(builder: DaemonBuilder, home: &Path) -> Output {
    // A daemon killed earlier in the test leaves its socket files behind.
    for stale in ["keyward.sock", "admin.sock"] {
        let _ = std::fs::remove_file(home.join(stale));
    }
    let output = builder
        .command(home)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run keyward serve");
    assert!(
        !output.status.success(),
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

fn write_key(dir: &Path, name: &str) -> (std::path::PathBuf, String) {
    let hex = format!("{}{}", random_key(""), random_key(""))[..64].to_string();
    let path = dir.join(name);
    std::fs::write(&path, format!("{hex}\n")).unwrap();
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

    let out = refused(Daemon::builder().home(&home).config(&table(&b)), &home);
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
    let out = refused(
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
    let out = refused(
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

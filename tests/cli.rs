//! The vault through the real binary: `serve` on embedded defaults, every admin command over
//! the real admin socket, master key sources, restarts, and the errors a user can cause.

mod support;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::process::Command;

use support::daemon::{Daemon, KEYWARD, admin_http, contains, random_key};
use support::needs;

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn zero_config_serve_prints_paths_and_binds_sockets_with_their_modes() {
    let d = Daemon::builder().start();
    let banner = d.stdout();
    for needle in [
        "state dir",
        "data socket",
        "admin socket",
        "keyward.db",
        "audit.db",
    ] {
        assert!(banner.contains(needle), "banner lacks {needle}: {banner}");
    }
    assert!(banner.contains(d.home.to_str().unwrap()));
    assert!(
        d.stderr().contains("WARNING: generated a new master key"),
        "{}",
        d.stderr()
    );
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&d.socket()), 0o660);
    assert_eq!(mode(&d.admin_socket()), 0o600);
    assert_eq!(mode(&d.home.join("master.key")), 0o600);
    assert_eq!(mode(&d.home.join("keyward.db")), 0o600);
    let status = d.json_lines(&["status"]);
    assert_eq!(status[0]["tenants"], 0);
}

#[test]
fn tenants_clients_and_credentials_round_trip_through_the_cli() {
    let d = Daemon::builder().start();
    let key = random_key("sk-proj-");
    assert!(
        d.ok(&[
            "tenant",
            "add",
            "acme",
            "--max-key-age",
            "90d",
            "--on-expiry",
            "warn"
        ])
        .contains("acme")
    );
    let tenants = d.json_lines(&["tenant", "list"]);
    assert_eq!(tenants.len(), 1);
    assert_eq!(tenants[0]["max_key_age"], "90d");
    assert_eq!(tenants[0]["on_expiry"], "warn");

    let out = d.ok(&[
        "client", "add", "--tenant", "acme", "--name", "web", "--team", "search",
    ]);
    assert!(out.contains("token  kw_"), "{out}");
    let clients = d.json_lines(&["client", "list"]);
    assert_eq!(clients[0]["name"], "web");
    assert_eq!(clients[0]["team"], "search");
    assert!(
        clients[0].get("token").is_none(),
        "client list must not show tokens"
    );

    let added = d.ok_stdin(
        &[
            "cred", "add", "--tenant", "acme", "--target", "openai", "--name", "prod", "--model",
            "gpt-4o*",
        ],
        format!("{key}\n").as_bytes(),
    );
    let preview = format!("{}…{}", &key[..4], &key[key.len() - 4..]);
    assert!(
        added.contains(&preview) && added.contains("version  1"),
        "{added}"
    );
    let creds = d.json_lines(&["cred", "list", "--tenant", "acme"]);
    assert_eq!(creds.len(), 1);
    let c = &creds[0];
    for field in [
        "id",
        "tenant",
        "target",
        "name",
        "version",
        "preview",
        "state",
        "priority",
        "created_at",
        "scope",
    ] {
        assert!(!c[field].is_null(), "cred list lacks {field}: {c}");
    }
    assert_eq!(c["state"], "current");
    assert_eq!(c["preview"], preview);
    assert_eq!(c["scope"], "models=gpt-4o*");
    let id = c["id"].as_str().unwrap().to_string();

    let key2 = random_key("sk-proj-");
    let rotated = d.ok_stdin(&["cred", "rotate", &id, "--overlap", "1h"], key2.as_bytes());
    assert!(rotated.contains("version  2"), "{rotated}");
    let creds = d.json_lines(&["cred", "list"]);
    let states: Vec<(u64, String)> = creds
        .iter()
        .map(|c| {
            (
                c["version"].as_u64().unwrap(),
                c["state"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        states,
        vec![(2, "current".to_string()), (1, "overlapping".to_string())]
    );

    d.ok(&["cred", "revoke", &id, "--version", "1"]);
    let creds = d.json_lines(&["cred", "list"]);
    assert_eq!(creds[1]["state"], "revoked");
    d.ok(&["cred", "revoke", &id]);
    assert!(
        d.json_lines(&["cred", "list"])
            .iter()
            .all(|c| c["state"] == "revoked")
    );
    d.ok(&["cred", "delete", &id]);
    assert!(d.json_lines(&["cred", "list"]).is_empty());

    let client_id = clients[0]["id"].as_str().unwrap().to_string();
    d.ok(&["client", "revoke", &client_id]);
    assert_eq!(d.json_lines(&["client", "list"])[0]["state"], "revoked");

    // Every change left an audit row.
    let events: Vec<String> = d
        .json_lines(&["audit", "query"])
        .iter()
        .map(|r| r["event"].as_str().unwrap().to_string())
        .collect();
    for e in [
        "tenant.created",
        "client.created",
        "credential.created",
        "credential.rotated",
        "credential.revoked",
        "credential.deleted",
        "client.revoked",
    ] {
        assert!(events.iter().any(|x| x == e), "missing {e} in {events:?}");
    }
}

#[test]
fn plaintext_key_never_reaches_disk_logs_or_cli_output() {
    let d = Daemon::builder().start();
    let key = random_key("sk-ant-api03-");
    let key2 = random_key("sk-ant-api03-");
    let mut outputs = Vec::new();
    let mut run = |args: &[&str], stdin: Option<&[u8]>| {
        let out = d.cli_stdin(args, stdin);
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
        outputs.extend(out.stdout);
        outputs.extend(out.stderr);
    };
    run(&["tenant", "add", "t1"], None);
    run(
        &[
            "cred",
            "add",
            "--tenant",
            "t1",
            "--target",
            "anthropic",
            "--name",
            "k",
        ],
        Some(key.as_bytes()),
    );
    run(&["cred", "list"], None);
    run(&["cred", "list", "--json"], None);
    let id = d.json_lines(&["cred", "list"])[0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    run(&["cred", "rotate", &id], Some(key2.as_bytes()));
    run(&["cred", "list", "--json"], None);
    run(&["audit", "query", "--json"], None);
    run(&["status", "--json"], None);
    let mut everything = d.all_state_bytes();
    everything.extend(&outputs);
    everything.extend(d.stdout().into_bytes());
    everything.extend(d.stderr().into_bytes());
    for k in [&key, &key2] {
        assert!(!contains(&everything, k), "the plaintext key leaked");
        // Nothing longer than the 4+4 preview either: no 9-character run of the key's
        // random part (its constant `sk-ant-…` prefix is public) appears anywhere.
        let random = &k[k.len() - 48..];
        for i in 0..=random.len() - 9 {
            assert!(
                !contains(&everything, &random[i..i + 9]),
                "9 characters of the key at offset {i} leaked"
            );
        }
    }
    assert!(contains(
        &outputs,
        &format!("{}…{}", &key[..4], &key[key.len() - 4..])
    ));
}

#[test]
fn restart_keeps_data_and_a_wrong_master_key_is_refused_at_start() {
    let mut d = Daemon::builder().start();
    d.ok(&["tenant", "add", "persist"]);
    let home = d.home.clone();
    assert_eq!(d.terminate(), Some(0));
    // Same home (and its generated master key): everything is still there.
    let d2 = Daemon::builder().home(&home).start();
    assert_eq!(d2.json_lines(&["tenant", "list"])[0]["name"], "persist");
    drop(d2);
    // Another master key for the same store: refused at start with the contract's message.
    let other = "11".repeat(32);
    let err = Daemon::builder()
        .home(&home)
        .env("KEYWARD_MASTER_KEY", &other)
        .try_start()
        .err()
        .expect("must not start");
    assert!(
        err.1.contains("master key does not match this store"),
        "{}",
        err.1
    );
    assert!(!err.1.contains(&other));
    drop(d);
}

#[test]
fn master_key_from_environment_is_removed_from_the_process_environment() {
    let key = "ab".repeat(32);
    let d = Daemon::builder().env("KEYWARD_MASTER_KEY", &key).start();
    assert!(d.stdout().contains("$KEYWARD_MASTER_KEY"), "{}", d.stdout());
    assert!(
        !d.home.join("master.key").exists(),
        "must not generate a key when one is given"
    );
    // The original environment block (what /proc/PID/environ and a dump would show) no longer
    // holds the key.
    let environ = std::fs::read(format!("/proc/{}/environ", d.pid())).unwrap();
    assert!(
        !contains(&environ, &key),
        "master key still in the process environment block"
    );
    let status = d.json_lines(&["status"]);
    assert_eq!(status[0]["master_key_source"], "$KEYWARD_MASTER_KEY");
}

#[test]
fn master_key_from_credentials_directory_and_file_and_required_external() {
    let creds = tempfile::tempdir().unwrap();
    std::fs::write(creds.path().join("master-key"), "cd".repeat(32) + "\n").unwrap();
    std::fs::set_permissions(
        creds.path().join("master-key"),
        std::fs::Permissions::from_mode(0o400),
    )
    .unwrap();
    let d = Daemon::builder()
        .env("CREDENTIALS_DIRECTORY", creds.path().to_str().unwrap())
        .start();
    assert!(d.stdout().contains("systemd credential"), "{}", d.stdout());
    drop(d);

    let file = creds.path().join("mk.hex");
    std::fs::write(&file, "ef".repeat(32)).unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let d = Daemon::builder()
        .arg("--master-key-file")
        .arg(file.to_str().unwrap())
        .start();
    assert!(
        d.stdout().contains(file.to_str().unwrap()),
        "{}",
        d.stdout()
    );
    drop(d);

    let err = Daemon::builder()
        .config("require_external_master_key = true\n")
        .try_start()
        .err()
        .expect("must refuse");
    assert!(err.1.contains("require_external_master_key"), "{}", err.1);

    std::fs::write(&file, "not hex").unwrap();
    let err = Daemon::builder()
        .arg("--master-key-file")
        .arg(file.to_str().unwrap())
        .try_start()
        .err()
        .unwrap();
    assert!(err.1.contains("64 hex characters"), "{}", err.1);
}

#[test]
fn invalid_config_is_refused_before_anything_is_bound() {
    let home = tempfile::Builder::new()
        .prefix("kw")
        .tempdir_in("/tmp")
        .unwrap();
    let err = Daemon::builder()
        .home(home.path())
        .config("[limits]\nupstream_timeout = \"soonish\"\n")
        .try_start()
        .err()
        .expect("must refuse");
    assert!(
        err.1.contains("keyward.toml") && err.1.contains("limits.upstream_timeout"),
        "{}",
        err.1
    );
    assert!(!home.path().join("keyward.sock").exists());
    assert!(!home.path().join("admin.sock").exists());
    assert!(!home.path().join("keyward.db").exists());
    let err = Daemon::builder()
        .home(home.path())
        .config("sokcet = \"/tmp/x\"\n")
        .try_start()
        .err()
        .unwrap();
    assert!(err.1.contains("sokcet"), "{}", err.1);
}

#[test]
fn user_errors_are_clear_and_exit_with_the_contract_codes() {
    let d = Daemon::builder().start();
    let check = |args: &[&str], stdin: Option<&[u8]>, code: i32, needle: &str| {
        let out = d.cli_stdin(args, stdin);
        assert_eq!(out.status.code(), Some(code), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(needle), "{args:?}: {}", stderr(&out));
    };
    check(
        &["client", "add", "--tenant", "ghost", "--name", "x"],
        None,
        1,
        "tenant `ghost` does not exist",
    );
    d.ok(&["tenant", "add", "acme"]);
    check(
        &["tenant", "add", "acme"],
        None,
        1,
        "tenant `acme` already exists",
    );
    check(&["tenant", "add", "bad name"], None, 1, "tenant name");
    d.ok(&["client", "add", "--tenant", "acme", "--name", "web"]);
    check(
        &["client", "add", "--tenant", "acme", "--name", "web"],
        None,
        1,
        "client `web` already exists in tenant `acme`",
    );
    check(
        &[
            "cred", "add", "--tenant", "acme", "--target", "openai", "--name", "k",
        ],
        Some(b""),
        1,
        "secret is empty",
    );
    check(
        &[
            "cred", "add", "--tenant", "acme", "--target", "openai", "--name", "k",
        ],
        Some(b"\n"),
        1,
        "secret is empty",
    );
    check(
        &[
            "cred", "add", "--tenant", "acme", "--target", "nosuch", "--name", "k",
        ],
        Some(b"sk-123456789012345"),
        1,
        "unknown target `nosuch`",
    );
    check(
        &[
            "cred",
            "add",
            "--tenant",
            "acme",
            "--target",
            "openai",
            "--name",
            "k",
            "--capability",
            "teleport",
        ],
        Some(b"sk-123456789012345"),
        1,
        "teleport",
    );
    d.ok_stdin(
        &[
            "cred", "add", "--tenant", "acme", "--target", "openai", "--name", "k",
        ],
        b"sk-123456789012345",
    );
    check(
        &[
            "cred", "add", "--tenant", "acme", "--target", "openai", "--name", "k",
        ],
        Some(b"sk-123456789012345"),
        1,
        "credential `k` already exists",
    );
    let id = d.json_lines(&["cred", "list"])[0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    d.ok(&["cred", "revoke", &id]);
    check(
        &["cred", "rotate", &id],
        Some(b"sk-abcdefghijklmnop"),
        1,
        "is revoked and cannot be rotated",
    );
    check(&["cred", "revoke", &id], None, 1, "already revoked");
    check(
        &["cred", "delete", "cred_nope"],
        None,
        1,
        "credential `cred_nope` does not exist",
    );
    check(
        &["tenant", "add", "x", "--max-key-age", "ninety days"],
        None,
        2,
        "like 30s, 15m, 24h or 90d",
    );
    check(
        &["audit", "query", "--since", "last tuesday"],
        None,
        2,
        "RFC 3339",
    );
    check(
        &["audit", "query", "--event", "request.exploded"],
        None,
        1,
        "unknown audit event",
    );
    check(
        &["audit", "query", "--tenant", "acne"],
        None,
        1,
        "tenant `acne` does not exist (see `keyward tenant list`)",
    );
}

#[test]
fn daemon_not_running_exits_69_naming_the_socket() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("admin.sock");
    let out = Command::new(KEYWARD)
        .args(["status", "--admin-socket", socket.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(69));
    assert!(
        stderr(&out).contains(socket.to_str().unwrap()),
        "{}",
        stderr(&out)
    );
    // The environment variable is honoured too.
    let out = Command::new(KEYWARD)
        .arg("tenant")
        .arg("list")
        .env("KEYWARD_ADMIN_SOCKET", &socket)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(69));
    assert!(stderr(&out).contains(socket.to_str().unwrap()));
    // A $KEYWARD_CONFIG that cannot be used is named, not silently skipped.
    let missing = dir.path().join("nosuch.toml");
    let out = Command::new(KEYWARD)
        .arg("status")
        .env_remove("KEYWARD_ADMIN_SOCKET")
        .env("KEYWARD_HOME", dir.path())
        .env("KEYWARD_CONFIG", &missing)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(69));
    assert!(
        stderr(&out).contains("$KEYWARD_CONFIG not used") && stderr(&out).contains("nosuch.toml"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn admin_socket_refuses_a_uid_that_is_not_root_or_the_daemon() {
    if !needs::root("admin_socket_refuses_a_uid_that_is_not_root_or_the_daemon") {
        return;
    }
    let d = Daemon::builder().start();
    std::fs::set_permissions(&d.home, std::fs::Permissions::from_mode(0o755)).unwrap();
    // With the contract's 0600 mode another uid cannot even connect.
    let out = Command::new(KEYWARD)
        .args([
            "tenant",
            "list",
            "--admin-socket",
            d.admin_socket().to_str().unwrap(),
        ])
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(69), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("permission denied") && stderr(&out).contains("uid 65534"),
        "{}",
        stderr(&out)
    );
    // Even if the socket's mode is loosened by mistake, the peer-uid check refuses the caller.
    std::fs::set_permissions(d.admin_socket(), std::fs::Permissions::from_mode(0o666)).unwrap();
    let out = Command::new(KEYWARD)
        .args([
            "tenant",
            "add",
            "intruder",
            "--admin-socket",
            d.admin_socket().to_str().unwrap(),
        ])
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("uid 65534 may not use the admin socket"),
        "{}",
        stderr(&out)
    );
    assert!(
        d.json_lines(&["tenant", "list"]).is_empty(),
        "the refused request must change nothing"
    );
    assert_eq!(std::fs::metadata(d.admin_socket()).unwrap().uid(), 0);
}

#[test]
fn a_daemon_running_as_a_user_admits_root_and_that_user_and_refuses_any_other_uid() {
    if !needs::root(
        "a_daemon_running_as_a_user_admits_root_and_that_user_and_refuses_any_other_uid",
    ) {
        return;
    }
    // The daemon runs as nobody; its home and admin socket are opened up so that the kernel
    // lets every uid connect and only the daemon's peer-uid check decides.
    let d = Daemon::builder().uid(65534).start();
    std::fs::set_permissions(&d.home, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(d.admin_socket(), std::fs::Permissions::from_mode(0o666)).unwrap();
    let socket = d.admin_socket();
    let as_uid = |uid: u32, args: &[&str]| {
        Command::new(KEYWARD)
            .args(args)
            .arg("--admin-socket")
            .arg(&socket)
            .env_clear()
            // Every caller trusts the daemon's user, so the daemon's own check is what decides.
            .env("KEYWARD_DAEMON_USER", "65534")
            .uid(uid)
            .gid(uid)
            .output()
            .unwrap()
    };
    let out = as_uid(0, &["tenant", "add", "by-root"]);
    assert!(out.status.success(), "root was refused: {}", stderr(&out));
    let out = as_uid(65534, &["tenant", "add", "by-owner"]);
    assert!(
        out.status.success(),
        "the daemon's own uid was refused: {}",
        stderr(&out)
    );
    for uid in [1, 4242, 65533] {
        let out = as_uid(uid, &["tenant", "add", &format!("by-{uid}")]);
        assert_eq!(out.status.code(), Some(1), "uid {uid}: {}", stderr(&out));
        assert!(
            stderr(&out).contains(&format!(
                "uid {uid} may not use the admin socket (allowed: root and uid 65534)"
            )),
            "{}",
            stderr(&out)
        );
    }
    let mut names: Vec<String> = d
        .json_lines(&["tenant", "list"])
        .iter()
        .map(|t| t["name"].as_str().unwrap().to_string())
        .collect();
    names.sort();
    assert_eq!(names, ["by-owner", "by-root"]);
}

#[test]
fn sigterm_drains_and_exits_zero() {
    let mut d = Daemon::builder().start();
    assert_eq!(d.terminate(), Some(0));
    assert!(d.stderr().contains("shutting down"), "{}", d.stderr());
}

#[test]
fn data_socket_group_comes_from_the_config_and_an_unknown_group_is_refused() {
    let group = nix::unistd::Group::from_name("daemon")
        .unwrap()
        .expect("Debian has a `daemon` group");
    let d = Daemon::builder()
        .config("socket_group = \"daemon\"\n")
        .start();
    let meta = std::fs::metadata(d.socket()).unwrap();
    assert_eq!(meta.gid(), group.gid.as_raw());
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    let err = Daemon::builder()
        .config("socket_group = \"no-such-group-kw\"\n")
        .try_start()
        .err()
        .unwrap();
    assert!(
        err.1.contains("socket_group") && err.1.contains("no-such-group-kw"),
        "{}",
        err.1
    );
}

#[test]
fn hardening_disables_core_dumps_and_falls_back_to_secret_pages_without_privilege() {
    if !needs::root(
        "hardening_disables_core_dumps_and_falls_back_to_secret_pages_without_privilege",
    ) {
        return;
    }
    let d = Daemon::builder().start();
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", d.pid())).unwrap();
    let core = limits
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .unwrap();
    assert_eq!(
        core.split_whitespace().skip(4).take(2).collect::<Vec<_>>(),
        ["0", "0"],
        "{core}"
    );
    assert_eq!(
        d.json_lines(&["status"])[0]["memory_lock"],
        "all (mlockall)"
    );
    let status = std::fs::read_to_string(format!("/proc/{}/status", d.pid())).unwrap();
    let locked: u64 = status
        .lines()
        .find(|l| l.starts_with("VmLck:"))
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    assert!(locked > 0, "mlockall locked nothing: {status}");
    drop(d);

    // An unprivileged daemon with a finite RLIMIT_MEMLOCK cannot lock everything safely.
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_MEMLOCK).unwrap();
    let finite = hard.min(8 << 20);
    setrlimit(Resource::RLIMIT_MEMLOCK, finite, finite).unwrap();
    let d = Daemon::builder().uid(65534).start();
    assert!(
        d.stderr().contains("locking secret pages only"),
        "{}",
        d.stderr()
    );
    assert_eq!(
        d.json_lines(&["status"])[0]["memory_lock"],
        "secret pages (fallback)"
    );
    // PR_SET_DUMPABLE=0: the kernel makes the process's /proc files root-owned.
    let owner = std::fs::metadata(format!("/proc/{}/environ", d.pid()))
        .unwrap()
        .uid();
    assert_eq!(owner, 0, "the daemon is still dumpable");
}

#[test]
fn a_terminal_gets_a_prompt_without_echo() {
    // `script` runs the CLI on a pseudo-terminal, as a person typing the key would.
    if !needs::program(
        "a_terminal_gets_a_prompt_without_echo",
        "script",
        "--version",
    ) {
        return;
    }
    let d = Daemon::builder().start();
    d.ok(&["tenant", "add", "acme"]);
    let key = random_key("sk-typed-");
    let cmd = format!("{KEYWARD} cred add --tenant acme --target openai --name typed");
    let mut child = Command::new("script")
        .args(["-q", "-e", "-c", &cmd, "/dev/null"])
        .env("KEYWARD_ADMIN_SOCKET", d.admin_socket())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Type only once the prompt is on the screen, as a person would.
    let mut stdout = child.stdout.take().unwrap();
    let mut screen = Vec::new();
    let mut buf = [0u8; 256];
    while !String::from_utf8_lossy(&screen).contains("(input hidden)") {
        use std::io::Read;
        let n = stdout.read(&mut buf).unwrap();
        assert!(n > 0, "no prompt: {}", String::from_utf8_lossy(&screen));
        screen.extend_from_slice(&buf[..n]);
    }
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(format!("{key}\n").as_bytes()).unwrap();
    }
    {
        use std::io::Read;
        stdout.read_to_end(&mut screen).unwrap();
    }
    let status = child.wait().unwrap();
    let screen = String::from_utf8_lossy(&screen).to_string();
    assert!(status.success(), "{screen}");
    assert!(screen.contains("(input hidden)"), "{screen}");
    assert!(!screen.contains(&key), "the key was echoed: {screen}");
    let creds = d.json_lines(&["cred", "list"]);
    assert_eq!(
        creds[0]["preview"],
        format!("{}…{}", &key[..4], &key[key.len() - 4..])
    );
}

#[test]
fn a_malformed_admin_request_is_refused_without_repeating_its_values() {
    let d = Daemon::builder().start();
    let key = random_key("sk-");
    // A value of the wrong type: serde's own message would quote it.
    let body = format!(
        "{{\"tenant\":\"acme\",\"target\":\"openai\",\"name\":\"k\",\"models\":[],\"capabilities\":[],\"teams\":[],\"workflows\":[],\"priority\":\"{key}\",\"secret\":\"{key}\"}}"
    );
    let (status, reply) = admin_http(&d.admin_socket(), "POST", "/v1/credentials", &body);
    assert_eq!(status, 400, "{reply}");
    let v: serde_json::Value = serde_json::from_str(&reply).unwrap();
    assert_eq!(v["error"]["type"], "keyward.bad_request", "{reply}");
    assert!(reply.contains("malformed request body"), "{reply}");
    assert!(!reply.contains(&key), "the reply repeats the key: {reply}");
    // Broken JSON gets a position.
    let (status, reply2) = admin_http(
        &d.admin_socket(),
        "POST",
        "/v1/tenants",
        "{\"name\": tenant}",
    );
    assert_eq!(status, 400, "{reply2}");
    assert!(
        reply2.contains("not valid JSON at line 1 column"),
        "{reply2}"
    );
    // Nothing was created by either.
    assert!(d.json_lines(&["tenant", "list"]).is_empty());
    // An unknown path and a wrong method are told apart.
    let (status, reply) = admin_http(&d.admin_socket(), "GET", "/v1/nothing", "");
    assert_eq!(status, 404, "{reply}");
    let (status, reply) = admin_http(&d.admin_socket(), "DELETE", "/v1/tenants", "");
    assert_eq!(status, 405, "{reply}");
}

#[test]
fn serve_refuses_to_replace_a_file_that_is_not_a_socket() {
    let dir = tempfile::tempdir().unwrap();
    let precious = dir.path().join("keyward.toml.bak");
    std::fs::write(&precious, "keep me").unwrap();
    let config = dir.path().join("keyward.toml");
    std::fs::write(
        &config,
        format!(
            "state_dir = \"{}\"\nsocket = \"{}\"\nadmin_socket = \"{}\"\n",
            dir.path().join("state").display(),
            precious.display(),
            dir.path().join("admin.sock").display()
        ),
    )
    .unwrap();
    let out = Command::new(KEYWARD)
        .args(["serve", "--config", config.to_str().unwrap()])
        .env("KEYWARD_MASTER_KEY", "11".repeat(32))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("not a socket"), "{}", stderr(&out));
    assert_eq!(std::fs::read_to_string(&precious).unwrap(), "keep me");
}

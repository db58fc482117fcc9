//! Tests that need root or an outside program. Under CI (`CI=true`) such a test must run, so a
//! missing need fails it. Elsewhere it fails too, naming what is missing, unless
//! `KEYWARD_TEST_ALLOW_SKIP=1` says whoever runs the suite accepts that it did not run; then it
//! prints `NOT RUN` on stderr and returns early. Nothing passes silently by skipping.

#![allow(dead_code)]

/// The opt-out variable for runs outside CI without root or the programs.
pub const ALLOW_SKIP: &str = "KEYWARD_TEST_ALLOW_SKIP";

/// True when the test may go on; false (after printing `NOT RUN`) only outside CI with the
/// opt-out set. Panics otherwise.
fn unmet(test: &str, why: &str) -> bool {
    let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
    let allowed = std::env::var(ALLOW_SKIP).is_ok_and(|v| v == "1");
    if ci || !allowed {
        panic!(
            "{test} cannot run: {why}. Run the suite as root with the programs .ci/run installs{}",
            if ci {
                " (CI=true: this test must run)".to_string()
            } else {
                format!(", or set {ALLOW_SKIP}=1 to accept that it does not run")
            }
        );
    }
    // Straight to the process's stderr: the test harness captures `eprintln!` of passing tests,
    // and this line must be seen.
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "NOT RUN: {test}: {why} ({ALLOW_SKIP}=1)");
    false
}

/// Whether `test` can go on as root (see the module doc).
pub fn root(test: &str) -> bool {
    nix::unistd::geteuid().is_root() || unmet(test, "it needs root")
}

/// Whether `program` can be started (with `probe_arg`, e.g. `--version`).
pub fn program(test: &str, program: &str, probe_arg: &str) -> bool {
    std::process::Command::new(program)
        .arg(probe_arg)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok()
        || unmet(test, &format!("the program `{program}` is not installed"))
}

/// Whether `test` can go on, given whether some other need holds; `why` says what is missing
/// when it does not.
pub fn holds(test: &str, holds: bool, why: &str) -> bool {
    holds || unmet(test, why)
}

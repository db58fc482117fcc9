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

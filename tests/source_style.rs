//! Checks on the source text that rustfmt does not make: string literals that swallowed the
//! indentation of a broken line (a message that shows a run of spaces to the user), and
//! comments citing documents that are not in the repository.

use std::path::{Path, PathBuf};

/// Longest run of spaces a one-line string literal may hold (column alignment in tables).
const MAX_SPACE_RUN: usize = 11;

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The line numbers of one-line string literals in `text` holding a run of more than
/// `MAX_SPACE_RUN` spaces. Spaces skipped by a `\` line continuation are not part of the
/// string.
fn space_runs(text: &str) -> Vec<usize> {
    let bytes = text.as_bytes();
    let mut found = Vec::new();
    let mut line = 1;
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'\n' {
            line += 1;
        }
        if bytes[i..].starts_with(b"//") {
            while i < bytes.len() && bytes[i] != b'\n' {
                i += 1;
            }
            continue;
        }
        // Char literals such as '"' and '\'' are not strings.
        if b == b'\'' && i + 2 < bytes.len() {
            if bytes[i + 1] == b'\\' {
                if let Some(end) = find(&bytes[i + 2..], b"'") {
                    i += 2 + end + 1;
                    continue;
                }
            } else if bytes[i + 2] == b'\'' {
                i += 3;
                continue;
            }
        }
        // Raw strings: r"..." and r#"..."#.
        if b == b'r' && (bytes.get(i + 1) == Some(&b'"') || bytes.get(i + 1) == Some(&b'#')) {
            let hashes = bytes[i + 1..].iter().take_while(|&&c| c == b'#').count();
            if bytes.get(i + 1 + hashes) == Some(&b'"') {
                let close = format!("\"{}", "#".repeat(hashes));
                let start = i + 2 + hashes;
                let end =
                    find(&bytes[start..], close.as_bytes()).map_or(bytes.len(), |e| start + e);
                line += bytes[i..end].iter().filter(|&&c| c == b'\n').count();
                i = end + close.len();
                continue;
            }
        }
        if b != b'"' {
            i += 1;
            continue;
        }
        // A string literal. One that spans lines without `\` (SQL, say) may align columns.
        i += 1;
        let mut run = 0;
        let mut runs = Vec::new();
        let mut multiline = false;
        while i < bytes.len() && bytes[i] != b'"' {
            match bytes[i] {
                b'\\' if bytes.get(i + 1) == Some(&b'\n') => {
                    line += 1;
                    i += 2;
                    while i < bytes.len() && bytes[i].is_ascii_whitespace() {
                        if bytes[i] == b'\n' {
                            line += 1;
                        }
                        i += 1;
                    }
                    run = 0;
                    continue;
                }
                b'\\' => {
                    i += 2;
                    run = 0;
                    continue;
                }
                b' ' => {
                    run += 1;
                    if run == MAX_SPACE_RUN + 1 {
                        runs.push(line);
                    }
                }
                b'\n' => {
                    line += 1;
                    run = 0;
                    multiline = true;
                }
                _ => run = 0,
            }
            i += 1;
        }
        if !multiline {
            found.extend(runs);
        }
        i += 1;
    }
    found
}

/// The offset of `needle` in `haystack`.
fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[test]
fn the_space_run_check_finds_what_it_must() {
    assert_eq!(space_runs("let s = \"a                      b\";\n"), [1]);
    assert_eq!(
        space_runs("let s = \"a \\\n                      b\";\n"),
        Vec::<usize>::new()
    );
    assert_eq!(
        space_runs("// \"a                      b\"\nx"),
        Vec::<usize>::new()
    );
    assert_eq!(
        space_runs("let c = '\"';\nlet s = r#\"x\"#;\nlet t = \"ok\";\n\"a              b\""),
        [4]
    );
}

#[test]
fn no_string_literal_in_src_holds_a_swallowed_indentation() {
    let mut files = Vec::new();
    rust_files(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
        &mut files,
    );
    let mut bad = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        for line in space_runs(&text) {
            bad.push(format!("{}:{line}", file.display()));
        }
    }
    assert!(
        bad.is_empty(),
        "string literals with a run of spaces (end the line with `\\` to continue a string): {bad:#?}"
    );
}

#[test]
fn comments_cite_only_what_is_in_the_repository() {
    let mut files = Vec::new();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    rust_files(&root.join("src"), &mut files);
    let mut bad = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        for (n, line) in text.lines().enumerate() {
            if line.contains("SPEC") || line.contains("STYLE.md") {
                bad.push(format!("{}:{}: {}", file.display(), n + 1, line.trim()));
            }
        }
    }
    assert!(
        bad.is_empty(),
        "cite the README or the code instead: {bad:#?}"
    );
}

/// Longest line allowed in `src/`, in characters (rustfmt's `max_width`, which it does not
/// enforce inside string literals, macros and comments).
const MAX_LINE: usize = 100;

/// The 1-based numbers of the lines of `text` longer than `MAX_LINE` characters.
fn long_lines(text: &str) -> Vec<usize> {
    text.lines()
        .enumerate()
        .filter(|(_, line)| line.chars().count() > MAX_LINE)
        .map(|(n, _)| n + 1)
        .collect()
}

#[test]
fn the_line_length_check_counts_characters() {
    let ok = "x".repeat(MAX_LINE);
    let long = "x".repeat(MAX_LINE + 1);
    // Multi-byte characters count once: 100 arrows are 300 bytes but one short line.
    let arrows = "→".repeat(MAX_LINE);
    assert_eq!(
        long_lines(&format!("{ok}\n{long}\n{arrows}\n{long}")),
        [2, 4]
    );
}

#[test]
fn no_line_in_src_is_longer_than_100_characters() {
    let mut files = Vec::new();
    rust_files(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
        &mut files,
    );
    let mut bad = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        for n in long_lines(&text) {
            bad.push(format!("{}:{n}", file.display()));
        }
    }
    assert!(
        bad.is_empty(),
        "lines over {MAX_LINE} characters (break strings with a trailing `\\`, SQL over \
         lines, doc tables into lists): {bad:#?}"
    );
}

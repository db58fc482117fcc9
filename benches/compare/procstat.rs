//! CPU time and memory of a peer's whole process tree, read from `/proc` (nginx and uvicorn
//! fork workers, so the root pid alone would undercount).

use std::collections::HashSet;

/// The root pid and every live descendant.
pub fn tree(root: u32) -> Vec<u32> {
    let mut parent_of = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            if let Some(ppid) = stat_fields(pid).and_then(|f| f.get(1).and_then(|p| p.parse().ok()))
            {
                parent_of.push((pid, ppid));
            }
        }
    }
    let mut members: HashSet<u32> = HashSet::from([root]);
    loop {
        let before = members.len();
        for &(pid, ppid) in &parent_of {
            if members.contains(&ppid) {
                members.insert(pid);
            }
        }
        if members.len() == before {
            break;
        }
    }
    members.into_iter().collect()
}

/// Fields of `/proc/PID/stat` after the command name: index 0 is state, 1 ppid, 11 utime,
/// 12 stime.
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &text[text.rfind(')')? + 2..];
    Some(after.split_whitespace().map(str::to_string).collect())
}

/// Clock ticks per second for `/proc` CPU times.
pub fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// User + system CPU seconds of the tree rooted at `root`.
pub fn cpu_seconds(root: u32, ticks: f64) -> f64 {
    tree(root)
        .into_iter()
        .filter_map(stat_fields)
        .map(|f| {
            let user: f64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0);
            let system: f64 = f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
            (user + system) / ticks
        })
        .sum()
}

/// Sum over the tree of a `/proc/PID/status` field given in kB, as bytes.
pub fn status_bytes(root: u32, field: &str) -> u64 {
    tree(root)
        .into_iter()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/status")).ok())
        .filter_map(|text| {
            text.lines()
                .find(|l| l.starts_with(field) && l[field.len()..].starts_with(':'))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map(|kb| kb * 1024)
        .sum()
}

/// User + system CPU seconds of the threads of `pid` named `name` (Linux thread names, as in
/// `/proc/PID/task/TID/comm`); 0 when there are none.
pub fn thread_cpu_seconds(pid: u32, name: &str, ticks: f64) -> f64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0.0;
    };
    let mut total = 0.0;
    for task in tasks.flatten() {
        let dir = task.path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        if comm.trim_end() != name {
            continue;
        }
        let Ok(text) = std::fs::read_to_string(dir.join("stat")) else {
            continue;
        };
        let Some(after) = text.rfind(')').map(|i| &text[i + 2..]) else {
            continue;
        };
        let f: Vec<&str> = after.split_whitespace().collect();
        let tick = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        total += (tick(11) + tick(12)) / ticks;
    }
    total
}

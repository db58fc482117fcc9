//! Side-by-side benchmark: the same OpenAI-style call made directly to a TLS mock upstream, and
//! through keyward (audit_sync normal and full), nginx and the LiteLLM proxy, each injecting the
//! `Authorization` header, all in one run on this machine. Prints a Markdown table to stdout
//! and writes the raw figures as JSON.
//!
//! ```text
//! cargo bench --bench compare                 # full run, a few minutes
//! cargo bench --bench compare -- --quick      # smoke run
//! cargo bench --bench compare -- --only keyward,nginx --json /tmp/compare.json
//! ```
//!
//! This is a measurement, not a test: it asserts no target, it reports them. The mock runs in
//! its own process so that only the proxy's process tree is charged for CPU.

#[path = "compare/load.rs"]
mod load;
#[path = "compare/mock.rs"]
mod mock;
#[path = "compare/peers.rs"]
mod peers;
#[path = "compare/procstat.rs"]
mod procstat;
#[path = "compare/report.rs"]
mod report;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use load::{PhaseResult, Target};
use peers::{Mock, Peer};
use report::{Fixed, PeerReport, Run};

/// The provider key every proxy injects and the mock insists on.
const UPSTREAM_KEY: &str = "sk-bench-4fJq9ZtX2mKp7LwR0cVb8NhY3sDe6GuA";
/// The fixed rate the targets are stated at.
const BASE_RATE: f64 = 1000.0;
/// Connections the load generator keeps open per phase.
const CONNECTIONS: usize = 32;
/// Concurrent SSE streams.
const SSE_CONCURRENCY: usize = 8;
/// The name of keyward's audit maintenance thread, whose CPU is reported on its own.
const AUDIT_THREAD: &str = "keyward-audit";

/// Command-line options (after `cargo bench --bench compare --`).
struct Options {
    quick: bool,
    phase: Duration,
    json: PathBuf,
    only: Option<Vec<String>>,
    install: bool,
    keyward: peers::KeywardOptions,
    /// A profiler attached to each peer's pid during its fixed 1,000 req/s phase.
    attach: Vec<String>,
    /// Attach during the 80 %-of-peak phase instead (`--attach-loaded`).
    attach_loaded: bool,
    /// Instead of the comparison: send exactly this many calls through keyward and stop it
    /// (`--calls N`, for instruction counts under `--keyward-wrap "valgrind --tool=callgrind"`).
    calls: Option<u64>,
    /// Connections those calls use (`--calls-conns C`).
    calls_conns: usize,
    /// Whom those calls go through: `keyward` or `nginx` (`--calls-peer`), wrapped in
    /// `--keyward-wrap` either way.
    calls_peer: String,
}

fn parse_args() -> Result<Options, String> {
    let mut o = Options {
        quick: false,
        phase: Duration::from_secs(5),
        json: PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/bench/compare.json"),
        only: None,
        install: true,
        keyward: peers::KeywardOptions {
            bin: PathBuf::from(peers::KEYWARD),
            wrap: Vec::new(),
            extra_config: String::new(),
        },
        attach: Vec::new(),
        attach_loaded: false,
        calls: None,
        calls_conns: 1,
        calls_peer: "keyward".into(),
    };
    let mut phase_set = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = |name: &str| args.next().ok_or(format!("{name} needs a value"));
        match a.as_str() {
            // cargo bench passes --bench to harness = false targets.
            "--bench" => {}
            "--quick" => o.quick = true,
            "--no-install" => o.install = false,
            "--json" => o.json = PathBuf::from(value("--json")?),
            "--only" => {
                o.only = Some(
                    value("--only")?
                        .split(',')
                        .map(|s| s.trim().to_lowercase())
                        .collect(),
                )
            }
            "--phase-secs" => {
                let v = value("--phase-secs")?;
                let secs: f64 = v
                    .parse()
                    .map_err(|_| format!("--phase-secs wants seconds, got {v:?}"))?;
                o.phase = Duration::from_secs_f64(secs.max(0.2));
                phase_set = true;
            }
            "--keyward-wrap" => {
                o.keyward.wrap = value("--keyward-wrap")?
                    .split_whitespace()
                    .map(str::to_string)
                    .collect()
            }
            "--attach-loaded" => o.attach_loaded = true,
            "--calls" => {
                let v = value("--calls")?;
                o.calls = Some(
                    v.parse()
                        .map_err(|_| format!("--calls wants a count, got {v:?}"))?,
                );
            }
            "--calls-peer" => o.calls_peer = value("--calls-peer")?,
            "--calls-conns" => {
                let v = value("--calls-conns")?;
                o.calls_conns = v
                    .parse::<usize>()
                    .map_err(|_| format!("--calls-conns wants a count, got {v:?}"))?
                    .max(1);
            }
            "--attach" => {
                o.attach = value("--attach")?
                    .split_whitespace()
                    .map(str::to_string)
                    .collect()
            }
            "--keyward-bin" => o.keyward.bin = PathBuf::from(value("--keyward-bin")?),
            "--keyward-config" => {
                o.keyward.extra_config.push_str(&value("--keyward-config")?);
                o.keyward.extra_config.push('\n');
            }
            "-h" | "--help" => {
                println!(
                    "usage: cargo bench --bench compare -- [--quick] [--phase-secs S] [--only keyward,keyward-full,nginx,litellm]\n\
                     \x20                                     [--json FILE] [--no-install] [--keyward-wrap \"CMD ARGS\"]\n\
                     \x20                                     [--keyward-bin PATH] [--keyward-config 'TOML LINE']...\n\
                     \x20                                     [--attach \"perf stat -p {{pid}}\" [--attach-loaded]]\n\
                     \x20      or: cargo bench --bench compare -- --calls N [--calls-conns C] [--calls-peer keyward|nginx] [--keyward-wrap ...] [--keyward-bin PATH]"
                );
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?} (try --help)")),
        }
    }
    if o.quick && !phase_set {
        o.phase = Duration::from_millis(1500);
    }
    Ok(o)
}

fn main() {
    let mut raw = std::env::args().skip(1);
    if raw.next().as_deref() == Some(mock::MOCK_FLAG) {
        let dir = PathBuf::from(raw.next().expect("mock dir argument"));
        mock::run(&dir);
    }
    let opts = match parse_args() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("compare: {e}");
            std::process::exit(2);
        }
    };
    let _ = rustls::crypto::ring::default_provider().install_default();
    // One thread: the generator takes one core and leaves the other to the peer and the mock,
    // the same for every peer.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("load generator runtime");
    if let Some(n) = opts.calls {
        std::process::exit(rt.block_on(calls(&opts, n)));
    }
    let run = rt.block_on(run(&opts));
    let markdown = report::markdown(&run);
    println!("{markdown}");
    if let Some(parent) = opts.json.parent() {
        let _ = std::fs::create_dir_all(parent);
    }
    match std::fs::write(&opts.json, report::json(&run).to_string()) {
        Ok(()) => eprintln!("raw figures written to {}", opts.json.display()),
        Err(e) => eprintln!("could not write {}: {e}", opts.json.display()),
    }
}

fn wanted(opts: &Options, key: &str) -> bool {
    opts.only
        .as_ref()
        .is_none_or(|list| list.iter().any(|w| w == key))
}

async fn run(opts: &Options) -> Run {
    let started = Instant::now();
    let ticks = procstat::clock_ticks();
    let mock_dir = tempfile::Builder::new()
        .prefix("mockb")
        .tempdir_in("/tmp")
        .expect("temp dir");
    let mock = Mock::start(mock_dir.path(), UPSTREAM_KEY).unwrap_or_else(|e| {
        eprintln!("compare: {e}");
        std::process::exit(1);
    });
    let direct = mock.direct_target(UPSTREAM_KEY);
    let streams = if opts.quick { 40 } else { 200 };

    eprintln!("direct: warm-up, peak, {BASE_RATE} req/s, SSE");
    let _ = load::flat_out(&direct, opts.phase / 2, CONNECTIONS).await;
    let direct_peak = load::flat_out(&direct, opts.phase, CONNECTIONS).await;
    let direct_base = load::fixed_rate(&direct, BASE_RATE, opts.phase, CONNECTIONS).await;
    let direct_sse = load::sse(&direct, streams, SSE_CONCURRENCY).await;
    if direct_base.ok == 0 {
        eprintln!(
            "compare: the direct baseline failed: {}",
            direct_base.first_error.as_deref().unwrap_or("no answer")
        );
        std::process::exit(1);
    }

    let mut peers = Vec::new();
    let plan: [(&str, &str); 4] = [
        ("keyward", "keyward"),
        ("keyward-full", "keyward (audit_sync=full)"),
        ("nginx", "nginx"),
        ("litellm", "LiteLLM"),
    ];
    for (key, label) in plan {
        if !wanted(opts, key) {
            continue;
        }
        eprintln!("{label}: starting");
        let t = Instant::now();
        let peer = match key {
            "keyward" => peers::start_keyward(&mock, UPSTREAM_KEY, "normal", &opts.keyward),
            "keyward-full" => peers::start_keyward(&mock, UPSTREAM_KEY, "full", &opts.keyward),
            "nginx" => peers::start_nginx(&mock, UPSTREAM_KEY, &[]),
            _ => peers::start_litellm(&mock, UPSTREAM_KEY, opts.install),
        };
        let report = match peer {
            Ok(peer) => {
                eprintln!(
                    "{}: up in {:.1}s, measuring",
                    peer.name,
                    t.elapsed().as_secs_f64()
                );
                measure(&peer, &direct, opts, streams, ticks).await
            }
            Err(reason) => {
                eprintln!("{label}: skipped: {reason}");
                PeerReport::skipped(label, &reason)
            }
        };
        peers.push(report);
    }
    Run {
        quick: opts.quick,
        phase: opts.phase,
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        connections: CONNECTIONS,
        base_rate: BASE_RATE,
        direct_peak,
        direct_base,
        direct_sse,
        peers,
        wall: started.elapsed(),
    }
}

/// `--calls N`: starts the mock and keyward (under `--keyward-wrap`, if given), sends exactly
/// `n` calls, then stops keyward with a long grace so a wrapping profiler can write its output.
/// Run it for two values of `n`: the difference of the profiler's totals divided by the
/// difference of `n` is the cost of one call without start-up and shutdown (benches/callgrind.sh).
async fn calls(opts: &Options, n: u64) -> i32 {
    let mock_dir = tempfile::Builder::new()
        .prefix("mockb")
        .tempdir_in("/tmp")
        .expect("temp dir");
    let mock = match Mock::start(mock_dir.path(), UPSTREAM_KEY) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("compare: {e}");
            return 1;
        }
    };
    let started = match opts.calls_peer.as_str() {
        "keyward" => peers::start_keyward(&mock, UPSTREAM_KEY, "normal", &opts.keyward),
        "nginx" => peers::start_nginx(&mock, UPSTREAM_KEY, &opts.keyward.wrap),
        other => Err(format!("--calls-peer {other:?}: keyward or nginx")),
    };
    let peer = match started {
        Ok(p) => p,
        Err(e) => {
            eprintln!("compare: {e}");
            return 1;
        }
    };
    let ticks = procstat::clock_ticks();
    let cpu0 = procstat::cpu_seconds(peer.pid, ticks);
    let result = load::count(&peer.target, n, opts.calls_conns).await;
    let cpu = procstat::cpu_seconds(peer.pid, ticks) - cpu0;
    eprintln!(
        "calls: {} ok, {} failed in {:.1}s over {} connection(s), {:.1} µs of {} CPU per call{}",
        result.ok,
        result.errors,
        result.elapsed.as_secs_f64(),
        opts.calls_conns,
        cpu * 1e6 / result.ok.max(1) as f64,
        peer.name,
        result
            .first_error
            .as_deref()
            .map(|e| format!("; first error: {e}"))
            .unwrap_or_default()
    );
    peer.stop(Duration::from_secs(120));
    i32::from(result.ok != n)
}

/// One fixed-rate comparison: direct first, then the peer, back to back.
async fn fixed(peer: &Peer, direct: &Target, rate: f64, opts: &Options, ticks: f64) -> Fixed {
    let direct_result = load::fixed_rate(direct, rate, opts.phase, CONNECTIONS).await;
    let profiler = ((rate == BASE_RATE) != opts.attach_loaded)
        .then(|| attach(&opts.attach, peer.pid))
        .flatten();
    let cpu0 = procstat::cpu_seconds(peer.pid, ticks);
    let audit0 = procstat::thread_cpu_seconds(peer.pid, AUDIT_THREAD, ticks);
    let peer_result = load::fixed_rate(&peer.target, rate, opts.phase, CONNECTIONS).await;
    let cpu = procstat::cpu_seconds(peer.pid, ticks) - cpu0;
    let audit_cpu = procstat::thread_cpu_seconds(peer.pid, AUDIT_THREAD, ticks) - audit0;
    if let Some(child) = profiler {
        detach(child);
    }
    Fixed {
        rate,
        direct: direct_result,
        peer: peer_result,
        cpu_seconds: cpu,
        audit_cpu_seconds: audit_cpu,
    }
}

/// Starts the `--attach` command with `{pid}` replaced by the peer's pid.
fn attach(command: &[String], pid: u32) -> Option<std::process::Child> {
    let (program, args) = command.split_first()?;
    let args = args.iter().map(|a| a.replace("{pid}", &pid.to_string()));
    match std::process::Command::new(program).args(args).spawn() {
        Ok(child) => {
            // Let the profiler attach before the phase starts.
            std::thread::sleep(Duration::from_millis(300));
            Some(child)
        }
        Err(e) => {
            eprintln!("compare: --attach {program}: {e}");
            None
        }
    }
}

/// Stops an attached profiler the way Ctrl-C would, so it writes its report.
fn detach(mut child: std::process::Child) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    );
    let _ = child.wait();
}

async fn measure(
    peer: &Peer,
    direct: &Target,
    opts: &Options,
    streams: usize,
    ticks: f64,
) -> PeerReport {
    // Settle after start-up before calling it idle.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let idle_rss = procstat::status_bytes(peer.pid, "VmRSS");
    let _ = load::flat_out(&peer.target, opts.phase / 2, CONNECTIONS).await;

    let cpu0 = procstat::cpu_seconds(peer.pid, ticks);
    let audit0 = procstat::thread_cpu_seconds(peer.pid, AUDIT_THREAD, ticks);
    let peak: PhaseResult = load::flat_out(&peer.target, opts.phase, CONNECTIONS).await;
    let peak_cpu = procstat::cpu_seconds(peer.pid, ticks) - cpu0;
    let peak_audit_cpu = procstat::thread_cpu_seconds(peer.pid, AUDIT_THREAD, ticks) - audit0;
    eprintln!("{}: peak {:.0} req/s", peer.name, peak.rps());

    let base = fixed(peer, direct, BASE_RATE, opts, ticks).await;
    let at80 = if peak.ok > 0 {
        Some(fixed(peer, direct, (peak.rps() * 0.8).max(1.0), opts, ticks).await)
    } else {
        None
    };
    let direct_sse = load::sse(direct, streams, SSE_CONCURRENCY).await;
    let peer_sse = load::sse(&peer.target, streams, SSE_CONCURRENCY).await;
    let peak_rss = procstat::status_bytes(peer.pid, "VmHWM");
    let rss_after = procstat::status_bytes(peer.pid, "VmRSS");
    PeerReport {
        name: peer.name.clone(),
        transport: peer.transport.to_string(),
        skipped: None,
        idle_rss,
        peak_rss,
        rss_after,
        peak: Some(peak),
        peak_cpu_seconds: peak_cpu,
        peak_audit_cpu_seconds: peak_audit_cpu,
        base: Some(base),
        at80,
        sse: Some((peer_sse, direct_sse)),
    }
}

//! Turning measurements into the Markdown table (stdout) and the JSON file. Pure formatting:
//! nothing here measures or starts anything.

use std::time::Duration;

use serde_json::{Value, json};

use crate::load::{PhaseResult, SseResult, percentile};

/// A fixed-rate comparison: the direct baseline and the peer at the same rate, back to back.
pub struct Fixed {
    /// Requests per second asked for.
    pub rate: f64,
    /// Direct baseline at that rate.
    pub direct: PhaseResult,
    /// The peer at that rate.
    pub peer: PhaseResult,
    /// CPU seconds the peer's process tree used during its phase.
    pub cpu_seconds: f64,
    /// Of those, keyward's audit maintenance thread.
    pub audit_cpu_seconds: f64,
}

impl Fixed {
    fn added_us(&self, q: f64) -> Option<f64> {
        Some(self.peer.pct_us(q)? - self.direct.pct_us(q)?)
    }

    fn cpu_us_per_request(&self) -> Option<f64> {
        (self.peer.ok > 0).then(|| self.cpu_seconds * 1e6 / self.peer.ok as f64)
    }

    /// The peer could not keep up with the asked rate.
    fn saturated(&self) -> bool {
        self.peer.unsent > 0 || self.peer.rps() < self.rate * 0.95
    }
}

/// Everything measured for one peer.
pub struct PeerReport {
    /// Row label.
    pub name: String,
    /// How the client reached it.
    pub transport: String,
    /// Why it was not measured, if it was not.
    pub skipped: Option<String>,
    /// VmRSS of the tree after start-up, before any load.
    pub idle_rss: u64,
    /// Sum of VmHWM over the tree at the end.
    pub peak_rss: u64,
    /// VmRSS of the tree at the end.
    pub rss_after: u64,
    /// Flat-out phase.
    pub peak: Option<PhaseResult>,
    /// CPU seconds during the flat-out phase.
    pub peak_cpu_seconds: f64,
    /// Of those, keyward's audit maintenance thread (folding journaled rows into SQLite).
    pub peak_audit_cpu_seconds: f64,
    /// At the base rate (1,000 req/s).
    pub base: Option<Fixed>,
    /// At 80 % of the peer's own peak.
    pub at80: Option<Fixed>,
    /// SSE: (peer, direct run just before it).
    pub sse: Option<(SseResult, SseResult)>,
}

impl PeerReport {
    /// A row for a peer that could not be started.
    pub fn skipped(name: &str, reason: &str) -> PeerReport {
        PeerReport {
            name: name.into(),
            transport: String::new(),
            skipped: Some(reason.into()),
            idle_rss: 0,
            peak_rss: 0,
            rss_after: 0,
            peak: None,
            peak_cpu_seconds: 0.0,
            peak_audit_cpu_seconds: 0.0,
            base: None,
            at80: None,
            sse: None,
        }
    }

    fn errors(&self) -> u64 {
        self.peak.as_ref().map_or(0, |p| p.errors)
            + self.base.as_ref().map_or(0, |f| f.peer.errors)
            + self.at80.as_ref().map_or(0, |f| f.peer.errors)
            + self.sse.as_ref().map_or(0, |(s, _)| s.errors)
    }

    fn first_error(&self) -> Option<&str> {
        [
            self.peak.as_ref().and_then(|p| p.first_error.as_deref()),
            self.base
                .as_ref()
                .and_then(|f| f.peer.first_error.as_deref()),
            self.at80
                .as_ref()
                .and_then(|f| f.peer.first_error.as_deref()),
            self.sse
                .as_ref()
                .and_then(|(s, _)| s.first_error.as_deref()),
        ]
        .into_iter()
        .flatten()
        .next()
    }

    fn peak_cpu_us(&self) -> Option<f64> {
        let p = self.peak.as_ref()?;
        (p.ok > 0).then(|| self.peak_cpu_seconds * 1e6 / p.ok as f64)
    }
}

/// The whole run.
pub struct Run {
    /// `--quick` was given.
    pub quick: bool,
    /// Length of each measured phase.
    pub phase: Duration,
    /// CPUs available.
    pub cpus: usize,
    /// Connections per phase.
    pub connections: usize,
    /// The fixed rate targets are stated at.
    pub base_rate: f64,
    /// Direct, flat out.
    pub direct_peak: PhaseResult,
    /// Direct at the base rate.
    pub direct_base: PhaseResult,
    /// Direct SSE.
    pub direct_sse: SseResult,
    /// The proxies.
    pub peers: Vec<PeerReport>,
    /// Total wall time.
    pub wall: Duration,
}

fn us(v: Option<f64>) -> String {
    v.map_or("–".into(), |v| format!("{v:.0} µs"))
}

fn signed_us(v: Option<f64>) -> String {
    v.map_or("–".into(), |v| format!("{v:+.0} µs"))
}

fn mib(bytes: u64) -> String {
    if bytes == 0 {
        "–".into()
    } else {
        format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
    }
}

fn sse_p50_us(v: &[u64]) -> Option<f64> {
    percentile(v, 0.5).map(|ns| ns as f64 / 1000.0)
}

/// The Markdown report.
pub fn markdown(run: &Run) -> String {
    let mut s = String::new();
    s.push_str(&format!(
        "## keyward vs direct, nginx and LiteLLM\n\n{} CPUs, {:.1} s phases{}, {} connections, \
         one-thread load generator, 1 KiB JSON answers, SSE {} events × {} ms; run took {:.0} s.\n\
         Added latency = peer percentile − direct percentile at the same rate, measured back to \
         back; fixed-rate latencies are coordinated-omission corrected.\n\n",
        run.cpus,
        run.phase.as_secs_f64(),
        if run.quick { " (--quick)" } else { "" },
        run.connections,
        crate::mock::SSE_EVENTS,
        crate::mock::SSE_GAP.as_millis(),
        run.wall.as_secs_f64(),
    ));
    s.push_str(
        "| peer | client transport | +p50 @1k/s | +p99 @1k/s | 80 % of peak | +p50 @80 % | +p99 @80 % \
         | peak req/s | CPU/req @1k/s | CPU/req @peak | RSS idle | RSS peak | SSE +TTFB p50 | SSE +event p50 \
         | SSE events in = out | errors |\n",
    );
    s.push_str("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    let sse_direct = &run.direct_sse;
    s.push_str(&format!(
        "| direct (baseline) | TLS to mock | p50 {} | p99 {} | – | – | – | {:.0} | – | – | – | – | TTFB {} | event {} | {} | {} |\n",
        us(run.direct_base.pct_us(0.5)),
        us(run.direct_base.pct_us(0.99)),
        run.direct_peak.rps(),
        us(sse_p50_us(&sse_direct.ttfb_ns)),
        us(sse_p50_us(&sse_direct.event_delay_ns)),
        events_cell(sse_direct),
        run.direct_peak.errors + run.direct_base.errors + sse_direct.errors,
    ));
    for p in &run.peers {
        if let Some(reason) = &p.skipped {
            s.push_str(&format!(
                "| {} | – | skipped: {} | | | | | | | | | | | | | |\n",
                p.name,
                reason.replace('|', "/")
            ));
            continue;
        }
        let base = p.base.as_ref();
        let at80 = p.at80.as_ref();
        let mark = |f: Option<&Fixed>| {
            if f.is_some_and(Fixed::saturated) {
                " (saturated)"
            } else {
                ""
            }
        };
        let (sse_ttfb, sse_event, sse_events) = match &p.sse {
            Some((peer, direct)) => (
                signed_us(
                    sse_p50_us(&peer.ttfb_ns)
                        .zip(sse_p50_us(&direct.ttfb_ns))
                        .map(|(a, b)| a - b),
                ),
                signed_us(
                    sse_p50_us(&peer.event_delay_ns)
                        .zip(sse_p50_us(&direct.event_delay_ns))
                        .map(|(a, b)| a - b),
                ),
                events_cell(peer),
            ),
            None => ("–".into(), "–".into(), "–".into()),
        };
        s.push_str(&format!(
            "| {} | {} | {}{} | {} | {} | {}{} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            p.name,
            p.transport,
            signed_us(base.and_then(|f| f.added_us(0.5))),
            mark(base),
            signed_us(base.and_then(|f| f.added_us(0.99))),
            at80.map_or("–".into(), |f| format!("{:.0} req/s", f.rate)),
            signed_us(at80.and_then(|f| f.added_us(0.5))),
            mark(at80),
            signed_us(at80.and_then(|f| f.added_us(0.99))),
            p.peak.as_ref().map_or("–".into(), |r| format!("{:.0}", r.rps())),
            us(base.and_then(Fixed::cpu_us_per_request)),
            us(p.peak_cpu_us()),
            mib(p.idle_rss),
            mib(p.peak_rss),
            sse_ttfb,
            sse_event,
            sse_events,
            p.errors(),
        ));
    }

    s.push_str("\n### Absolute latencies (direct measured just before each peer)\n\n");
    s.push_str("| peer | rate | direct p50 | direct p99 | peer p50 | peer p99 | peer p99.9 | achieved req/s |\n|---|---|---|---|---|---|---|---|\n");
    for p in run.peers.iter().filter(|p| p.skipped.is_none()) {
        for f in [p.base.as_ref(), p.at80.as_ref()].into_iter().flatten() {
            s.push_str(&format!(
                "| {} | {:.0} req/s | {} | {} | {} | {} | {} | {:.0} |\n",
                p.name,
                f.rate,
                us(f.direct.pct_us(0.5)),
                us(f.direct.pct_us(0.99)),
                us(f.peer.pct_us(0.5)),
                us(f.peer.pct_us(0.99)),
                us(f.peer.pct_us(0.999)),
                f.peer.rps(),
            ));
        }
    }

    s.push_str(&targets(run));

    let failures: Vec<String> = run
        .peers
        .iter()
        .filter_map(|p| {
            p.first_error().map(|e| {
                format!(
                    "- {} ({} failed requests), first failure: `{}`",
                    p.name,
                    p.errors(),
                    e
                )
            })
        })
        .collect();
    if !failures.is_empty() {
        s.push_str("\n### Failures\n\n");
        s.push_str(&failures.join("\n"));
        s.push('\n');
    }
    s
}

fn events_cell(r: &SseResult) -> String {
    if r.streams_ok == 0 {
        return "no stream completed".into();
    }
    let verdict = if r.events_in == r.events_out && r.streams_mismatched == 0 {
        "yes"
    } else {
        "NO"
    };
    format!("{verdict} ({}/{})", r.events_out, r.events_in)
}

fn targets(run: &Run) -> String {
    let nginx_peak = run
        .peers
        .iter()
        .find(|p| p.name == "nginx" && p.skipped.is_none())
        .and_then(|p| p.peak.as_ref().map(PhaseResult::rps));
    let mut s = String::from("\n### keyward against its targets (measured, not asserted)\n\n");
    s.push_str("| peer | +p50 @1k/s ≤ 50 µs | +p99 @1k/s ≤ 250 µs | CPU/req @1k/s ≤ 50 µs | CPU/req @peak ≤ 50 µs | peak ≥ nginx | RSS idle ≤ 16 MiB |\n|---|---|---|---|---|---|---|\n");
    let verdict = |ok: Option<bool>| match ok {
        Some(true) => "met",
        Some(false) => "MISSED",
        None => "n/a",
    };
    for p in run
        .peers
        .iter()
        .filter(|p| p.name.starts_with("keyward") && p.skipped.is_none())
    {
        let base = p.base.as_ref();
        let p50 = base.and_then(|f| f.added_us(0.5));
        let p99 = base.and_then(|f| f.added_us(0.99));
        let cpu = base.and_then(Fixed::cpu_us_per_request);
        let peak_cpu = p.peak_cpu_us();
        let peak = p.peak.as_ref().map(PhaseResult::rps);
        s.push_str(&format!(
            "| {} | {} {} | {} {} | {} {} | {} {} | {} {} | {} {} |\n",
            p.name,
            signed_us(p50),
            verdict(p50.map(|v| v <= 50.0)),
            signed_us(p99),
            verdict(p99.map(|v| v <= 250.0)),
            us(cpu),
            verdict(cpu.map(|v| v <= 50.0)),
            us(peak_cpu),
            verdict(peak_cpu.map(|v| v <= 50.0)),
            peak.map_or("–".into(), |v| format!(
                "{v:.0} vs {}",
                nginx_peak.map_or("–".into(), |n| format!("{n:.0}"))
            )),
            verdict(peak.zip(nginx_peak).map(|(k, n)| k >= n)),
            mib(p.idle_rss),
            verdict((p.idle_rss > 0).then_some(p.idle_rss <= 16 * 1024 * 1024)),
        ));
    }
    for p in run
        .peers
        .iter()
        .filter(|p| p.name.starts_with("keyward") && p.skipped.is_none())
    {
        let per_request = |seconds: f64, ok: u64| seconds * 1e6 / ok as f64;
        let at_peak = p.peak.as_ref().filter(|r| r.ok > 0);
        let at_base = p.base.as_ref().filter(|f| f.peer.ok > 0);
        if let (Some(peak), Some(base)) = (at_peak, at_base) {
            s.push_str(&format!(
                "\n{}: of its CPU/req, the audit thread folding journaled rows into `audit.db` \
                 is {:.1} µs at 1,000 req/s and {:.1} µs at peak.",
                p.name,
                per_request(base.audit_cpu_seconds, base.peer.ok),
                per_request(p.peak_audit_cpu_seconds, peak.ok),
            ));
        }
    }
    s.push('\n');
    s
}

fn phase_json(r: &PhaseResult) -> Value {
    json!({
        "ok": r.ok,
        "errors": r.errors,
        "unsent": r.unsent,
        "first_error": r.first_error,
        "elapsed_s": r.elapsed.as_secs_f64(),
        "rps": r.rps(),
        "p50_us": r.pct_us(0.5),
        "p90_us": r.pct_us(0.9),
        "p99_us": r.pct_us(0.99),
        "p999_us": r.pct_us(0.999),
        "max_us": r.pct_us(1.0),
    })
}

fn sse_json(r: &SseResult) -> Value {
    let p = |v: &[u64], q: f64| percentile(v, q).map(|ns| ns as f64 / 1000.0);
    json!({
        "streams_ok": r.streams_ok,
        "streams_mismatched": r.streams_mismatched,
        "events_in": r.events_in,
        "events_out": r.events_out,
        "errors": r.errors,
        "first_error": r.first_error,
        "ttfb_p50_us": p(&r.ttfb_ns, 0.5),
        "ttfb_p99_us": p(&r.ttfb_ns, 0.99),
        "event_delay_p50_us": p(&r.event_delay_ns, 0.5),
        "event_delay_p99_us": p(&r.event_delay_ns, 0.99),
    })
}

fn fixed_json(f: &Fixed) -> Value {
    json!({
        "rate": f.rate,
        "direct": phase_json(&f.direct),
        "peer": phase_json(&f.peer),
        "added_p50_us": f.added_us(0.5),
        "added_p99_us": f.added_us(0.99),
        "cpu_seconds": f.cpu_seconds,
        "audit_thread_cpu_seconds": f.audit_cpu_seconds,
        "cpu_us_per_request": f.cpu_us_per_request(),
        "saturated": f.saturated(),
    })
}

/// The raw figures.
pub fn json(run: &Run) -> Value {
    let peers: Vec<Value> = run
        .peers
        .iter()
        .map(|p| {
            json!({
                "name": p.name,
                "transport": p.transport,
                "skipped": p.skipped,
                "idle_rss_bytes": p.idle_rss,
                "peak_rss_bytes": p.peak_rss,
                "rss_after_bytes": p.rss_after,
                "peak": p.peak.as_ref().map(phase_json),
                "peak_cpu_seconds": p.peak_cpu_seconds,
                "peak_audit_thread_cpu_seconds": p.peak_audit_cpu_seconds,
                "peak_cpu_us_per_request": p.peak_cpu_us(),
                "at_base_rate": p.base.as_ref().map(fixed_json),
                "at_80_percent_of_peak": p.at80.as_ref().map(fixed_json),
                "sse": p.sse.as_ref().map(|(peer, direct)| json!({
                    "peer": sse_json(peer),
                    "direct": sse_json(direct),
                })),
            })
        })
        .collect();
    json!({
        "quick": run.quick,
        "phase_seconds": run.phase.as_secs_f64(),
        "cpus": run.cpus,
        "connections": run.connections,
        "base_rate": run.base_rate,
        "sse_events_per_stream": crate::mock::SSE_EVENTS,
        "wall_seconds": run.wall.as_secs_f64(),
        "direct": {
            "peak": phase_json(&run.direct_peak),
            "at_base_rate": phase_json(&run.direct_base),
            "sse": sse_json(&run.direct_sse),
        },
        "peers": peers,
    })
}

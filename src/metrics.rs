//! Prometheus metrics and health probes (README, "Metrics and health").
//!
//! [`Metrics`] holds the families the data plane updates per request (counters and
//! histograms, lock-free after a label set's first use); [`render`] adds the families read
//! from the daemon's state at scrape time (in-flight requests, audit queue, pool states, key
//! ages, the bundle serial served) and encodes everything in the Prometheus text format 0.0.4
//! (<https://prometheus.io/docs/instrumenting/exposition_formats/>).
//!
//! Label values are bounded: targets are the configured ones (`unknown` otherwise), models are
//! the configured scopes' model patterns (an exact name when a scope lists it, the glob when
//! one matched, `other` otherwise), and no call id, client token, header or payload is ever a
//! label. [`serve`] answers `GET /metrics`, `/healthz` and `/readyz` on `metrics_listen`.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Registry, Unit};

use crate::state::State;

/// `Content-Type` of `/metrics`: the Prometheus text format, version 0.0.4.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// Label value for a request that named no configured target.
pub const UNKNOWN: &str = "unknown";
/// Label value for a model no configured scope names.
pub const OTHER_MODEL: &str = "other";

/// Labels of `keyward_requests_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    /// A configured target, or `unknown`.
    target: String,
    /// The HTTP status the app got.
    status: u16,
    /// keyward's error code (`keyward-error`), or `none` for an upstream's answer.
    error: &'static str,
}

/// A label set with only the target.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TargetLabel {
    target: String,
}

/// Labels of `keyward_cost_usd_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CostLabels {
    target: String,
    /// See [`model_label`].
    model: String,
}

/// Labels of `keyward_tokens_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TokenLabels {
    target: String,
    /// See [`model_label`].
    model: String,
    /// `input` or `output`.
    direction: &'static str,
}

/// Histogram buckets in seconds for time keyward adds to a request (sub-millisecond to 1 s).
fn overhead_buckets() -> impl Iterator<Item = f64> {
    [
        0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
        1.0,
    ]
    .into_iter()
}

/// Histogram buckets in seconds for upstream answers and audit commits (1 ms to 5 min).
fn upstream_buckets() -> impl Iterator<Item = f64> {
    [
        0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
        300.0,
    ]
    .into_iter()
}

/// The per-request metric families, shared by every request.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    overhead: Family<TargetLabel, Histogram>,
    upstream: Family<TargetLabel, Histogram>,
    tokens: Family<TokenLabels, Counter>,
    cost: Family<CostLabels, Counter<f64>>,
    audit_commit: Histogram,
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics::new()
    }
}

impl Metrics {
    /// Registers every per-request family under the `keyward_` prefix.
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("keyward");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Data-plane requests answered, by target, HTTP status and keyward error code \
             (none: the upstream's answer)",
            requests.clone(),
        );
        let overhead = Family::<TargetLabel, Histogram>::new_with_constructor(|| {
            Histogram::new(overhead_buckets())
        });
        registry.register_with_unit(
            "overhead",
            "Time keyward added to a request until the response head, excluding the \
             upstream's time to answer",
            Unit::Seconds,
            overhead.clone(),
        );
        let upstream = Family::<TargetLabel, Histogram>::new_with_constructor(|| {
            Histogram::new(upstream_buckets())
        });
        registry.register_with_unit(
            "upstream_response",
            "Time from sending a request upstream to its response head, per attempt",
            Unit::Seconds,
            upstream.clone(),
        );
        let tokens = Family::<TokenLabels, Counter>::default();
        registry.register(
            "tokens",
            "Tokens the upstream reported in responses, by target, model (a configured \
             scope's model pattern, or other) and direction",
            tokens.clone(),
        );
        let cost = Family::<CostLabels, Counter<f64>>::default();
        registry.register(
            "cost_usd",
            "Cost of priced responses in US dollars, from the configured prices, by target \
             and model (as in keyward_tokens_total)",
            cost.clone(),
        );
        let audit_commit = Histogram::new(upstream_buckets());
        registry.register_with_unit(
            "audit_commit",
            "Time an audit record took to become durable, for records a request waited on",
            Unit::Seconds,
            audit_commit.clone(),
        );
        registry.register(
            "build",
            "keyward's version",
            Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]),
        );
        Metrics {
            registry,
            requests,
            overhead,
            upstream,
            tokens,
            cost,
            audit_commit,
        }
    }

    /// Counts an answered request. `target` must be a configured target or [`UNKNOWN`];
    /// `error` is keyward's error code or `none`.
    pub fn request(&self, target: &str, status: u16, error: &'static str) {
        self.requests
            .get_or_create(&RequestLabels {
                target: target.to_string(),
                status,
                error,
            })
            .inc();
    }

    /// Records the time keyward added to a request.
    pub fn overhead(&self, target: &str, took: Duration) {
        self.overhead
            .get_or_create(&TargetLabel {
                target: target.to_string(),
            })
            .observe(took.as_secs_f64());
    }

    /// Records one upstream attempt's time to its response head.
    pub fn upstream(&self, target: &str, took: Duration) {
        self.upstream
            .get_or_create(&TargetLabel {
                target: target.to_string(),
            })
            .observe(took.as_secs_f64());
    }

    /// Adds the tokens a response reported. `model` comes from [`model_label`].
    pub fn tokens(&self, target: &str, model: &str, input: Option<u64>, output: Option<u64>) {
        for (direction, n) in [("input", input), ("output", output)] {
            if let Some(n) = n {
                self.tokens
                    .get_or_create(&TokenLabels {
                        target: target.to_string(),
                        model: model.to_string(),
                        direction,
                    })
                    .inc_by(n);
            }
        }
    }

    /// Adds the cost of a priced response, given in micro-USD.
    pub fn cost(&self, target: &str, model: &str, micros: u64) {
        self.cost
            .get_or_create(&CostLabels {
                target: target.to_string(),
                model: model.to_string(),
            })
            .inc_by(micros as f64 / 1e6);
    }

    /// Records how long an awaited audit commit took.
    pub fn audit_commit(&self, took: Duration) {
        self.audit_commit.observe(took.as_secs_f64());
    }
}

/// The model label for tokens served by a credential whose scope lists `patterns`: the model
/// itself when a pattern names it exactly, the first glob that matches it, else
/// [`OTHER_MODEL`]. So the label set is bounded by what operators configured, never by what
/// apps send.
pub fn model_label(patterns: &[String], model: Option<&str>) -> String {
    let Some(model) = model else {
        return OTHER_MODEL.to_string();
    };
    if patterns.iter().any(|p| p == model) {
        return model.to_string();
    }
    patterns
        .iter()
        .find(|p| p.contains('*') && crate::scope::glob_match(p, model))
        .cloned()
        .unwrap_or_else(|| OTHER_MODEL.to_string())
}

/// Labels of scrape-time families about credential versions.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PoolLabels {
    target: String,
    /// `current`, `overlapping`, `cooling_down` or `quarantined` (serving states only).
    state: &'static str,
}

/// Labels of `keyward_trace_spans_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SpanLabels {
    /// `exported`, `dropped` or `failed`.
    outcome: &'static str,
}

/// Labels of `keyward_derived_secrets`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DerivedLabels {
    /// `access_token` or `aws_session`.
    kind: &'static str,
}

/// Labels of the key age family.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KeyLabels {
    tenant: String,
    credential: String,
    target: String,
}

/// The whole `/metrics` text: the per-request families, then those read from `state` now.
pub fn render(state: &State) -> String {
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &state.metrics.registry);
    let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &scrape_registry(state));
    out
}

fn scrape_registry(state: &State) -> Registry {
    let mut registry = Registry::with_prefix("keyward");
    let gauge = |v: i64| {
        let g = Gauge::<i64>::default();
        g.set(v);
        g
    };
    registry.register(
        "requests_in_flight",
        "Data-plane requests being served now",
        gauge(state.in_flight() as i64),
    );
    registry.register(
        "audit_queue_depth",
        "Audit records waiting to be committed",
        gauge(state.audit.queue_depth() as i64),
    );
    let dropped = Counter::<u64>::default();
    dropped.inc_by(state.audit.dropped_events());
    registry.register(
        "audit_dropped_events",
        "Audit records of finished requests dropped because the queue was full",
        dropped,
    );
    let spans = Family::<SpanLabels, Counter>::default();
    let counts = state.traces.counts();
    for (outcome, n) in [
        ("exported", &counts.exported),
        ("dropped", &counts.dropped),
        ("failed", &counts.failed),
    ] {
        spans
            .get_or_create(&SpanLabels { outcome })
            .inc_by(n.load(std::sync::atomic::Ordering::Relaxed));
    }
    registry.register(
        "trace_spans",
        "Spans for otlp_endpoint by outcome: exported (the collector took them), dropped (the \
         export queue was full) or failed (the collector refused them or could not be reached)",
        spans,
    );
    if let Some(bundle) = &state.bundle {
        registry.register(
            "bundle_serial",
            "Serial of the sealed bundle being served (absent when the catalog comes from the \
             local store); a refused bundle leaves it unchanged",
            gauge(bundle.serial() as i64),
        );
    }
    let started = state
        .started_at
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    registry.register_with_unit(
        "start_time",
        "When this process started, Unix time",
        Unit::Seconds,
        gauge(started),
    );

    let derived = Family::<DerivedLabels, Gauge>::default();
    for (kind, n) in [
        ("access_token", state.tokens.cached()),
        ("aws_session", state.aws_sessions.cached()),
    ] {
        derived.get_or_create(&DerivedLabels { kind }).set(n as i64);
    }
    registry.register(
        "derived_secrets",
        "Credential versions whose derived secret is cached in locked memory, by kind \
         (access_token: Vertex and Entra ID; aws_session: assumed AWS roles); a deleted, revoked \
         or retired version's is dropped when the catalog changes",
        derived,
    );
    let catalog = state.catalog.load();
    let now = SystemTime::now();
    let now_unix = crate::units::now_unix();
    let versions = Family::<PoolLabels, Gauge>::default();
    let ages = Family::<KeyLabels, Gauge>::default();
    for (tenant_id, creds) in &catalog.credentials_by_tenant {
        let tenant = catalog
            .tenant(tenant_id)
            .map_or_else(|| tenant_id.clone(), |t| t.name.clone());
        for cred in creds {
            let mut newest_serving = None;
            for v in &cred.versions {
                let serving = match crate::catalog::version_state(cred, v, now_unix) {
                    crate::catalog::VersionState::Current => "current",
                    crate::catalog::VersionState::Overlapping => "overlapping",
                    _ => continue,
                };
                newest_serving = Some(v.created_at);
                let pool = state.pool.status(&cred.id, v.version, now);
                let label = if pool.quarantine_until.is_some() {
                    "quarantined"
                } else if pool.cooldown_until.is_some() {
                    "cooling_down"
                } else {
                    serving
                };
                versions
                    .get_or_create(&PoolLabels {
                        target: cred.target.clone(),
                        state: label,
                    })
                    .inc();
            }
            if let Some(created) = newest_serving {
                ages.get_or_create(&KeyLabels {
                    tenant: tenant.clone(),
                    credential: cred.id.clone(),
                    target: cred.target.clone(),
                })
                .set((now_unix - created).max(0));
            }
        }
    }
    registry.register(
        "credential_versions",
        "Credential versions that can serve, by target and pool state (current, \
         overlapping, cooling_down, quarantined)",
        versions,
    );
    registry.register_with_unit(
        "credential_key_age",
        "Age of each credential's newest serving version",
        Unit::Seconds,
        ages,
    );
    registry
}

/// One readiness condition and whether it holds.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Check {
    /// `store`, `master_key` or `audit`.
    pub name: &'static str,
    /// Whether it holds.
    pub ok: bool,
    /// What was found (an error names the path and the OS reason, never a secret).
    pub detail: String,
}

/// Runs the readiness checks: the store is loaded, the master key's provider answers, the
/// audit trail's directory takes a durable write. Blocking (file I/O, maybe an HSM or KMS call).
pub fn readiness(state: &State) -> Vec<Check> {
    let store_path = state.store.path();
    let store = match std::fs::metadata(store_path) {
        Ok(_) => Check {
            name: "store",
            ok: true,
            detail: format!(
                "{} loaded ({} tenants)",
                store_path.display(),
                state.catalog.load().tenants.len()
            ),
        },
        Err(e) => Check {
            name: "store",
            ok: false,
            detail: format!("{}: {e}", store_path.display()),
        },
    };
    let master = match state.master.key_check_value() {
        Ok(_) => Check {
            name: "master_key",
            ok: true,
            detail: format!("{} answers", state.master.provider()),
        },
        Err(e) => Check {
            name: "master_key",
            ok: false,
            detail: e.to_string(),
        },
    };
    let audit = match state.audit.probe_writable() {
        Ok(()) => Check {
            name: "audit",
            ok: true,
            detail: "writable".into(),
        },
        Err(why) => Check {
            name: "audit",
            ok: false,
            detail: why,
        },
    };
    vec![store, master, audit]
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `listener` until `stop` turns true.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<State>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = crate::proxy::server::stopped(&mut stop) => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let state = state.clone();
                    tokio::spawn(async move {
                        let service = hyper::service::service_fn(move |req| {
                            let state = state.clone();
                            async move { Ok::<_, Infallible>(answer(&state, req).await) }
                        });
                        let _ = hyper::server::conn::http1::Builder::new()
                            .timer(hyper_util::rt::TokioTimer::new())
                            .header_read_timeout(Duration::from_secs(10))
                            .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                            .await;
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "metrics listener accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
}

async fn answer<B>(state: &Arc<State>, req: Request<B>) -> Response<Full<Bytes>> {
    let text = |status: StatusCode, content_type: &str, body: String| {
        Response::builder()
            .status(status)
            .header(http::header::CONTENT_TYPE, content_type)
            .body(Full::new(Bytes::from(body)))
            .expect("static response parts")
    };
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "only GET\n".into(),
        );
    }
    match req.uri().path() {
        "/metrics" => text(StatusCode::OK, CONTENT_TYPE, render(state)),
        "/healthz" => text(StatusCode::OK, "text/plain", "ok\n".into()),
        "/readyz" => {
            let st = state.clone();
            let checks = tokio::task::spawn_blocking(move || readiness(&st))
                .await
                .unwrap_or_default();
            let ready = !checks.is_empty() && checks.iter().all(|c| c.ok);
            let mut body = String::new();
            for c in &checks {
                body.push_str(&format!(
                    "{} {}: {}\n",
                    c.name,
                    if c.ok { "ok" } else { "FAIL" },
                    c.detail
                ));
            }
            let status = if ready {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            text(status, "text/plain", body)
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: try /metrics, /healthz or /readyz\n".into(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_labels_come_from_configured_patterns_only() {
        let patterns = vec!["gpt-4o*".to_string(), "o3".to_string()];
        assert_eq!(model_label(&patterns, Some("o3")), "o3");
        assert_eq!(model_label(&patterns, Some("gpt-4o-mini")), "gpt-4o*");
        assert_eq!(model_label(&patterns, Some("anything-else")), OTHER_MODEL);
        assert_eq!(model_label(&[], Some("gpt-4o")), OTHER_MODEL);
        assert_eq!(model_label(&patterns, None), OTHER_MODEL);
    }

    #[test]
    fn per_request_families_encode_with_units_and_suffixes() {
        let m = Metrics::new();
        m.request("openai", 200, "none");
        m.overhead("openai", Duration::from_micros(120));
        m.upstream("openai", Duration::from_millis(30));
        m.tokens("openai", "gpt-4o*", Some(12), Some(7));
        let mut out = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut out, &m.registry).unwrap();
        for line in [
            "keyward_requests_total{target=\"openai\",status=\"200\",error=\"none\"} 1",
            "keyward_overhead_seconds_count{target=\"openai\"} 1",
            "keyward_upstream_response_seconds_count{target=\"openai\"} 1",
            "keyward_tokens_total{target=\"openai\",model=\"gpt-4o*\",direction=\"input\"} 12",
            "keyward_tokens_total{target=\"openai\",model=\"gpt-4o*\",direction=\"output\"} 7",
            "keyward_build_info{version=\"",
        ] {
            assert!(out.contains(line), "missing {line} in\n{out}");
        }
    }
}

//! What traces cost a request (README, "Traces"): the work on the request path to record one
//! call's span, with `otlp_endpoint` unset, with a collector that answers, and with a dead
//! collector (the queue is full, so each span is dropped and counted). Encoding and sending
//! happen on the export thread and are measured apart, per span. For comparison, the metric
//! updates of one request, which run whatever the settings.

use std::borrow::Cow;
use std::convert::Infallible;
use std::time::{Duration, SystemTime};

use criterion::{Criterion, criterion_group, criterion_main};
use keyward::metrics::{Metrics, model_label};
use keyward::traces::{CallSpan, Tracing};

/// A span as the data plane fills it for a completed chat call (clones of the row's fields).
fn span(call_id: &str, tenant: &str, cred: &str) -> CallSpan {
    let end = SystemTime::now();
    CallSpan {
        call_id: call_id.to_string(),
        start: end - Duration::from_millis(300),
        end,
        target: Some("openai".to_string()),
        capability: Some("chat".to_string()),
        model: Some("gpt-4o-mini".to_string()),
        tenant: Some(tenant.to_string()),
        credential: Some((cred.to_string(), 2)),
        status: 200,
        error: None::<Cow<'static, str>>,
        input_tokens: Some(9),
        output_tokens: Some(12),
    }
}

/// An OTLP/HTTP collector on loopback that takes every export (answers 200, empty body).
fn collector() -> (String, tokio::runtime::Runtime) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    runtime.spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let service = hyper::service::service_fn(
                    |req: hyper::Request<hyper::body::Incoming>| async move {
                        use http_body_util::BodyExt;
                        let _ = req.into_body().collect().await;
                        Ok::<_, Infallible>(hyper::Response::new(http_body_util::Full::new(
                            bytes::Bytes::new(),
                        )))
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (url, runtime)
}

fn per_request(c: &mut Criterion) {
    let call_id = "01937a4e-1b2c-7d3e-8f40-5a6b7c8d9e0f";
    let (tenant, cred) = ("acme", "cred_0123456789abcdef");
    let mut group = c.benchmark_group("span of one request");

    let off = Tracing::default();
    group.bench_function("otlp_endpoint unset", |b| {
        b.iter(|| off.record(|| span(call_id, tenant, cred)))
    });

    let (url, _runtime) = collector();
    let live = Tracing::default();
    live.configure(Some(&url), "bench").unwrap();
    group.bench_function("collector answering", |b| {
        b.iter(|| live.record(|| span(call_id, tenant, cred)))
    });
    live.shutdown(Duration::from_secs(10));
    let c_live = live.counts();
    eprintln!(
        "collector answering: {} exported, {} dropped (queue full while the exporter caught up)",
        c_live.exported.load(std::sync::atomic::Ordering::Relaxed),
        c_live.dropped.load(std::sync::atomic::Ordering::Relaxed)
    );

    let dead_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dead = Tracing::default();
    dead.configure(Some(&format!("http://127.0.0.1:{dead_port}")), "bench")
        .unwrap();
    group.bench_function("collector dead", |b| {
        b.iter(|| dead.record(|| span(call_id, tenant, cred)))
    });
    dead.shutdown(Duration::from_secs(10));
    group.finish();

    // Off the request path: what the export thread does per span before sending.
    let scope = opentelemetry::InstrumentationScope::builder("keyward").build();
    let one = span(call_id, tenant, cred);
    c.bench_function("span to OTLP span data (export thread)", |b| {
        b.iter(|| std::hint::black_box(one.to_span_data(&scope)))
    });

    let m = Metrics::new();
    let patterns = vec!["gpt-4o*".to_string(), "o3".to_string()];
    c.bench_function("metric updates of one request (always on)", |b| {
        b.iter(|| {
            m.request(std::hint::black_box("openai"), 200, "none");
            m.overhead("openai", Duration::from_micros(150));
            m.upstream("openai", Duration::from_millis(20));
            m.audit_commit(Duration::from_micros(80));
            let label = model_label(&patterns, Some(std::hint::black_box("gpt-4o-mini")));
            m.tokens("openai", &label, Some(9), Some(12));
            m.cost("openai", &label, 3);
        })
    });
}

criterion_group!(benches, per_request);
criterion_main!(benches);

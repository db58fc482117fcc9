//! What the Prometheus metrics cost a request: the updates the data plane makes for one
//! answered request with a priced, token-reporting response (README, "Metrics and health").
//! The updates run whether or not `metrics_listen` is set; only scrapes depend on it.

use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use keyward::metrics::{Metrics, model_label};

fn per_request(c: &mut Criterion) {
    let m = Metrics::new();
    let patterns = vec!["gpt-4o*".to_string(), "o3".to_string()];
    c.bench_function("metric updates of one request", |b| {
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

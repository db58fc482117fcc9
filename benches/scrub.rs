//! Throughput of the response scrubber against a plain copy into `BytesMut` (the least any
//! body adapter does), on whole 1 KiB and 64 KiB chunks and on a stream of small SSE events.
//! Compare the `copy` and `scrub` lines of each group: their ratio is the scrubbing cost.

use std::hint::black_box;

use bytes::BytesMut;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use keyward::proxy::scrub::Scrubber;
use keyward::seal::Secret;

const KEY: &[u8] = b"sk-proj-4fJq9ZtX2mKp7LwR0cVb8NhY3sDe6GuA1oIi5TyUrEwQ";

/// An SSE event of a chat completion stream; it contains `s` and `sk-` near misses so the
/// matcher leaves its fast state now and then, as it would on real text.
fn sse_event(i: usize) -> String {
    format!(
        "data: {{\"id\":\"chatcmpl-{i}\",\"object\":\"chat.completion.chunk\",\"model\":\
         \"gpt-4o\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\" tasks skip sk-pro\
         ject\"}},\"finish_reason\":null}}]}}\n\n"
    )
}

fn text(len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 256);
    let mut i = 0;
    while out.len() < len {
        out.extend_from_slice(sse_event(i).as_bytes());
        i += 1;
    }
    out.truncate(len);
    out
}

fn whole_chunks(c: &mut Criterion) {
    let secret = Secret::from_slice(KEY);
    let mut group = c.benchmark_group("scrub_chunk");
    for size in [1024, 64 * 1024] {
        let input = text(size);
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_with_input(BenchmarkId::new("copy", size), &input, |b, input| {
            let mut out = BytesMut::with_capacity(size * 2);
            b.iter(|| {
                out.clear();
                out.extend_from_slice(black_box(input));
                black_box(&out);
            });
        });
        group.bench_with_input(BenchmarkId::new("scrub", size), &input, |b, input| {
            let mut scrubber = Scrubber::new(&secret);
            let mut out = BytesMut::with_capacity(size * 2);
            b.iter(|| {
                out.clear();
                scrubber.push(black_box(input), &mut out);
                scrubber.finish_into(&mut out);
                black_box(&out);
            });
        });
    }
    group.finish();
}

fn sse_stream(c: &mut Criterion) {
    let secret = Secret::from_slice(KEY);
    let events: Vec<Vec<u8>> = (0..256).map(|i| sse_event(i).into_bytes()).collect();
    let total: usize = events.iter().map(Vec::len).sum();
    let mut group = c.benchmark_group("scrub_sse");
    group.throughput(Throughput::Bytes(total as u64));
    group.bench_function("copy", |b| {
        let mut out = BytesMut::with_capacity(total * 2);
        b.iter(|| {
            out.clear();
            for event in &events {
                out.extend_from_slice(black_box(event));
            }
            black_box(&out);
        });
    });
    group.bench_function("scrub", |b| {
        let mut scrubber = Scrubber::new(&secret);
        let mut out = BytesMut::with_capacity(total * 2);
        b.iter(|| {
            out.clear();
            for event in &events {
                scrubber.push(black_box(event), &mut out);
            }
            scrubber.finish_into(&mut out);
            black_box(&out);
        });
    });
    group.finish();
}

criterion_group!(benches, whole_chunks, sse_stream);
criterion_main!(benches);

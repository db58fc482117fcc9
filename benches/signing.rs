//! Cost per request of the credential step on the request path: injecting an API key
//! (`prepare_upstream_headers`, the openai preset) against signing with SigV4
//! (`prepare_signed_headers`, the bedrock preset, a Converse request with a precomputed body
//! hash), plus hashing a 4 KiB body, which SigV4 needs and key injection does not. Both start
//! from the same headers an SDK sends. Compare `api_key` with `sigv4` (+ `body_sha256`).

use std::collections::BTreeMap;
use std::hint::black_box;
use std::time::SystemTime;

use criterion::{Criterion, criterion_group, criterion_main};
use http::{HeaderMap, HeaderValue, Method, Uri};
use keyward::providers::{
    AwsSigningKey, TargetSpec, Targets, prepare_signed_headers, prepare_upstream_headers,
};
use keyward::seal::Secret;

fn app_headers(auth: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (n, v) in [
        ("content-type", "application/json"),
        (
            "user-agent",
            "Boto3/1.44.8 md/Botocore#1.44.8 ua/2.1 os/linux lang/python#3.11",
        ),
        (
            "amz-sdk-invocation-id",
            "6b1f1c8e-5d2a-4b8e-9c7d-0a1b2c3d4e5f",
        ),
        ("amz-sdk-request", "attempt=1; max=3"),
        ("x-amz-date", "20261130T230000Z"),
        ("content-length", "87"),
    ] {
        h.insert(n, HeaderValue::from_static(v));
    }
    h.insert("authorization", HeaderValue::from_str(auth).unwrap());
    h
}

fn signing(c: &mut Criterion) {
    let specs: BTreeMap<String, TargetSpec> = BTreeMap::from([(
        "bedrock".to_string(),
        TargetSpec {
            region: Some("us-east-1".into()),
            ..TargetSpec::default()
        },
    )]);
    let targets = Targets::resolve(&specs).unwrap();
    let openai = targets.get("openai").unwrap();
    let bedrock = targets.get("bedrock").unwrap();
    let key = Secret::from_slice(b"sk-proj-4fJq9ZtX2mKp7LwR0cVb8NhY3sDe6GuA1oIi5TyUrEwQ");
    let secret = Secret::from_slice(b"wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY");
    let aws = AwsSigningKey {
        access_key_id: "AKIAIOSFODNN7EXAMPLE",
        secret_access_key: &secret,
        session_token: None,
    };
    let uri: Uri = "https://bedrock-runtime.us-east-1.amazonaws.com/model/\
                    anthropic.claude-3-5-sonnet-20240620-v1%3A0/converse"
        .parse()
        .unwrap();
    let token = "kw_0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    let bearer = app_headers(&format!("Bearer {token}"));
    let sigv4 = app_headers(&format!(
        "AWS4-HMAC-SHA256 Credential={token}/20261130/us-east-1/bedrock/aws4_request, \
         SignedHeaders=content-type;host;x-amz-date, Signature=00"
    ));
    let body = vec![b'x'; 4096];
    let hash = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
    let mut group = c.benchmark_group("credential_step");
    group.bench_function("api_key", |b| {
        b.iter(|| {
            let mut h = bearer.clone();
            prepare_upstream_headers(openai, &mut h, &key).unwrap();
            black_box(h)
        })
    });
    group.bench_function("sigv4", |b| {
        b.iter(|| {
            let mut h = sigv4.clone();
            let now = SystemTime::now();
            prepare_signed_headers(bedrock, &Method::POST, &uri, &mut h, hash, &aws, now).unwrap();
            black_box(h)
        })
    });
    group.bench_function("body_sha256_4KiB", |b| {
        b.iter(|| {
            black_box(ring::digest::digest(
                &ring::digest::SHA256,
                black_box(&body),
            ))
        })
    });
    group.finish();
}

criterion_group!(benches, signing);
criterion_main!(benches);

//! Audit writer figures: group-commit throughput with many concurrent committers, and the
//! latency of one `commit` under light load, for `normal` and `full` sync. Prints a table;
//! targets with `normal` are ≥100,000 rows/s and ≤100 µs p50.

use std::time::{Duration, Instant};

use keyward::audit::{Audit, Event, EventKind};
use keyward::config::AuditSync;
use keyward::seal::{MasterKey, Secret};

fn event(i: u64) -> Event {
    Event {
        call_id: Some(format!("call_{i:016x}")),
        tenant: Some("acme".into()),
        client_id: Some("cli_0123456789".into()),
        peer_uid: Some(1000),
        peer_pid: Some(4242),
        target: Some("openai".into()),
        model: Some("gpt-4o-mini".into()),
        capability: Some("chat".into()),
        credential_id: Some(format!("cred_{}", i % 8)),
        credential_version: Some(3),
        fingerprint: Some("ab".repeat(32)),
        ..Event::new(EventKind::RequestResolved)
    }
}

fn open(dir: &std::path::Path, sync: AuditSync) -> Audit {
    let master: keyward::seal::MasterKeyProvider =
        MasterKey::from_secret(Secret::from_slice(&[7; 32])).into();
    Audit::open(dir, &master, sync, None).expect("open audit")
}

async fn throughput(sync: AuditSync, committers: u64, per_task: u64) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let audit = open(dir.path(), sync);
    let start = Instant::now();
    let tasks: Vec<_> = (0..committers)
        .map(|t| {
            let audit = audit.clone();
            tokio::spawn(async move {
                for i in 0..per_task {
                    audit.commit(event(t * per_task + i)).await.unwrap();
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let elapsed = start.elapsed();
    audit.shutdown().await;
    (committers * per_task) as f64 / elapsed.as_secs_f64()
}

async fn latency(sync: AuditSync, n: usize) -> (Duration, Duration) {
    let dir = tempfile::tempdir().unwrap();
    let audit = open(dir.path(), sync);
    for i in 0..100 {
        audit.commit(event(i)).await.unwrap();
    }
    let mut samples = Vec::with_capacity(n);
    for i in 0..n {
        let t = Instant::now();
        audit.commit(event(i as u64)).await.unwrap();
        samples.push(t.elapsed());
        // Light load: a short gap so every commit is its own batch.
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    audit.shutdown().await;
    samples.sort_unstable();
    (samples[n / 2], samples[n * 99 / 100])
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    println!("sync    committers  rows/s      commit p50   commit p99");
    for (sync, name, per_task) in [
        (AuditSync::Normal, "normal", 1_000),
        (AuditSync::Full, "full", 250),
    ] {
        let committers = 512;
        let rate = rt.block_on(throughput(sync, committers, per_task));
        let (p50, p99) = rt.block_on(latency(sync, 2_000));
        println!(
            "{name:<7} {committers:>10}  {rate:>10.0}  {:>9.1} µs  {:>9.1} µs",
            p50.as_secs_f64() * 1e6,
            p99.as_secs_f64() * 1e6
        );
    }
}

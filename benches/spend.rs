//! `keyward spend` on a large trail: 1,000,000 `request.completed` rows over 30 days (10
//! tenants × 10 clients in 3 teams × 3 models × 2 credentials), then the time of
//! `Audit::spend` for the queries an operator runs. Prints a table; the target is well under a
//! second per query.
//!
//! Rows are committed through the real writer (so the aggregate is maintained by the fold, as
//! in production); their times are then spread over 30 days in the database and the aggregate
//! rebuilt from them on reopen (the path an older database takes), because the writer stamps
//! every row with the current time. That edit breaks the MAC chain, which this bench does not
//! check.

use std::time::{Duration, Instant};

use keyward::audit::{Audit, Event, EventKind, SpendBy, SpendQuery};
use keyward::config::AuditSync;
use keyward::seal::{MasterKey, Secret};

/// Rows committed; `SPEND_BENCH_ROWS` overrides (for a quick run on a busy machine).
fn rows() -> u64 {
    std::env::var("SPEND_BENCH_ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000)
}
const DAY_MS: i64 = 86_400_000;

fn event(i: u64) -> Event {
    let tenant = i % 10;
    let client = (i / 10) % 10;
    Event {
        call_id: Some(format!("call_{i:016x}")),
        tenant: Some(format!("tenant{tenant}")),
        client_id: Some(format!("cli_{tenant}_{client}")),
        team: Some(format!("team{}", client % 3)),
        target: Some("openai".into()),
        model: Some(["gpt-4o", "gpt-4o-mini", "o3"][(i / 100 % 3) as usize].into()),
        credential_id: Some(format!("cred_{tenant}_{}", i / 300 % 2)),
        credential_version: Some(1),
        upstream_status: Some(200),
        input_tokens: Some(1_000 + i % 500),
        cached_input_tokens: Some(200),
        output_tokens: Some(100 + i % 50),
        cost_micros: Some(3_500 + i % 100),
        ..Event::new(EventKind::RequestCompleted)
    }
}

fn open(dir: &std::path::Path) -> Audit {
    let master: keyward::seal::MasterKeyProvider =
        MasterKey::from_secret(Secret::from_slice(&[7; 32])).into();
    Audit::open(dir, &master, AuditSync::Normal, None).expect("open audit")
}

fn time(audit: &Audit, q: &SpendQuery) -> (Duration, usize) {
    let mut runs = Vec::new();
    let mut groups = 0;
    for _ in 0..7 {
        let start = Instant::now();
        groups = audit.spend(q).unwrap().len();
        runs.push(start.elapsed());
    }
    runs.sort();
    (runs[runs.len() / 2], groups)
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let audit = open(dir.path());
    let rows = rows();
    let start = Instant::now();
    rt.block_on(async {
        let tasks: Vec<_> = (0..16u64)
            .map(|t| {
                let audit = audit.clone();
                tokio::spawn(async move {
                    let mut i = t;
                    while i < rows {
                        // A commit the writer could not confirm in time (a slow disk) is
                        // refused; the bench only needs the rows, so it tries again.
                        while audit.commit(event(i)).await.is_err() {
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                        i += 16;
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
    });
    let committed = start.elapsed();
    rt.block_on(audit.clone().shutdown());
    drop(audit);

    let conn = rusqlite::Connection::open(dir.path().join("audit.db")).unwrap();
    let now: i64 = conn
        .query_row("SELECT max(time_ms) FROM audit_events", [], |r| r.get(0))
        .unwrap();
    conn.execute(
        "UPDATE audit_events SET time_ms = ?1 + seq * ?2",
        [now - 30 * DAY_MS, 30 * DAY_MS / rows as i64],
    )
    .unwrap();
    conn.execute_batch(
        "DELETE FROM audit_meta WHERE key = 'spend_aggregate'; DELETE FROM audit_spend;",
    )
    .unwrap();
    let buckets_before = Instant::now();
    drop(conn);
    let audit = open(dir.path());
    let rebuilt = buckets_before.elapsed();
    let conn = rusqlite::Connection::open(dir.path().join("audit.db")).unwrap();
    let buckets: i64 = conn
        .query_row("SELECT count(*) FROM audit_spend", [], |r| r.get(0))
        .unwrap();

    println!("rows: {rows} request.completed over 30 days; aggregate rows: {buckets}");
    println!(
        "commit through the writer: {:.1} s; aggregate rebuilt on open in {:.1} s",
        committed.as_secs_f64(),
        rebuilt.as_secs_f64()
    );
    println!("{:<52} {:>10} {:>7}", "query", "median", "groups");
    let since = |days: i64| Some(now - days * DAY_MS);
    let queries = [
        (
            "--tenant tenant3 --by model --since 30d",
            SpendQuery {
                tenant: Some("tenant3".into()),
                by: SpendBy::Model,
                since_ms: since(30),
                until_ms: None,
            },
        ),
        (
            "--tenant tenant3 --by team --since 7d",
            SpendQuery {
                tenant: Some("tenant3".into()),
                by: SpendBy::Team,
                since_ms: since(7),
                until_ms: None,
            },
        ),
        (
            "--tenant tenant3 --by client",
            SpendQuery {
                tenant: Some("tenant3".into()),
                by: SpendBy::Client,
                since_ms: None,
                until_ms: None,
            },
        ),
        (
            "--by day (all tenants)",
            SpendQuery {
                tenant: None,
                by: SpendBy::Day,
                since_ms: None,
                until_ms: None,
            },
        ),
        (
            "--by credential (all tenants)",
            SpendQuery {
                tenant: None,
                by: SpendBy::Credential,
                since_ms: None,
                until_ms: None,
            },
        ),
        (
            "--by tenant --since 30d",
            SpendQuery {
                tenant: None,
                by: SpendBy::Tenant,
                since_ms: since(30),
                until_ms: None,
            },
        ),
    ];
    for (name, q) in queries {
        let (median, groups) = time(&audit, &q);
        println!(
            "{name:<52} {:>8.1}ms {groups:>7}",
            median.as_secs_f64() * 1e3
        );
    }
}

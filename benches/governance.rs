//! What budgets and rate limits cost a request (README, "Spend and limits"): the check before
//! sending and the charge at completion, with the counters in this process and in a real
//! `redis-server` on loopback (skipped, saying so, when it is not installed). The rules are a
//! tenant budget with alerts, a team budget, a credential budget and a client limit with rpm and
//! tpm: seven counters per request. Prints a table.

use std::sync::Arc;
use std::time::{Duration, Instant};

use keyward::audit::Audit;
use keyward::config::AuditSync;
use keyward::governance::{
    Budget, Caller, Governance, OnBackendError, OnExceed, Period, RateLimit, Scope, Settings,
};
use keyward::seal::{MasterKey, Secret};

fn rules() -> (Vec<Budget>, Vec<RateLimit>) {
    let budget = |id: &str, scope: Scope| Budget {
        id: id.into(),
        tenant: "acme".into(),
        scope,
        limit_micros: u64::MAX / 4,
        period: Period::Month,
        on_exceed: OnExceed::Deny,
        alerts: vec![50, 80, 100],
        created_at: 0,
    };
    (
        vec![
            budget("bud_t", Scope::Tenant),
            budget("bud_team", Scope::Team("research".into())),
            budget("bud_cred", Scope::Credential("cred_a".into())),
        ],
        vec![RateLimit {
            id: "lim_c".into(),
            tenant: "acme".into(),
            scope: Scope::Client("cli_a".into()),
            rpm: Some(u64::MAX / 4),
            tpm: Some(u64::MAX / 4),
            created_at: 0,
        }],
    )
}

const CALLER: Caller<'static> = Caller {
    tenant: "acme",
    team: Some("research"),
    client: "cli_a",
};

fn engine(dir: &std::path::Path, settings: &Settings) -> Arc<Governance> {
    let master: keyward::seal::MasterKeyProvider =
        MasterKey::from_secret(Secret::from_slice(&[7; 32])).into();
    let audit = Audit::open(dir, &master, AuditSync::Normal, None).expect("open audit");
    let g = Arc::new(Governance::new(settings, audit).expect("governance"));
    let (budgets, limits) = rules();
    g.set_rules(budgets, limits);
    g
}

/// Mean time per call of `check` then `charge`, sequentially, and the check's p50 and p99.
async fn sequential(g: &Arc<Governance>, n: usize) -> (Duration, Duration, Duration, Duration) {
    let mut checks = Vec::with_capacity(n);
    let start = Instant::now();
    for _ in 0..n {
        let t = Instant::now();
        let ticket = g
            .check(CALLER, &["cred_a", "cred_b"])
            .await
            .expect("admitted");
        checks.push(t.elapsed());
        g.charge(&ticket, Some("cred_a"), Some(3_500), Some(1_150));
    }
    let total = start.elapsed();
    checks.sort();
    let mean_check = checks.iter().sum::<Duration>() / n as u32;
    (
        total / n as u32,
        mean_check,
        checks[n / 2],
        checks[n * 99 / 100],
    )
}

/// Checks per second with `tasks` concurrent callers.
async fn concurrent(g: &Arc<Governance>, tasks: usize, per_task: usize) -> f64 {
    let start = Instant::now();
    let handles: Vec<_> = (0..tasks)
        .map(|_| {
            let g = g.clone();
            tokio::spawn(async move {
                for _ in 0..per_task {
                    let ticket = g.check(CALLER, &["cred_a"]).await.expect("admitted");
                    g.charge(&ticket, Some("cred_a"), Some(3_500), Some(1_150));
                }
            })
        })
        .collect();
    for h in handles {
        h.await.unwrap();
    }
    (tasks * per_task) as f64 / start.elapsed().as_secs_f64()
}

fn redis_server() -> Option<(std::process::Child, u16)> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .ok()?
        .local_addr()
        .ok()?
        .port();
    let child = std::process::Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .ok()?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Some((child, port))
}

fn row(name: &str, figures: (Duration, Duration, Duration, Duration)) {
    let (per_request, mean, p50, p99) = figures;
    println!(
        "{name:<34} {:>12.2?} {:>12.2?} {:>10.2?} {:>10.2?}",
        per_request, mean, p50, p99
    );
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        println!(
            "{:<34} {:>12} {:>12} {:>10} {:>10}",
            "counters", "check+charge", "check mean", "check p50", "check p99"
        );
        let dir = tempfile::tempdir().unwrap();
        let local = engine(dir.path(), &Settings::default());
        // Another tenant: no rule applies, so no counter is touched.
        let none = Caller {
            tenant: "globex",
            ..CALLER
        };
        let n = 200_000;
        let start = Instant::now();
        for _ in 0..n {
            std::hint::black_box(local.check(none, &["cred_x"]).await.unwrap());
        }
        let free = start.elapsed() / n as u32;
        println!("{:<34} {:>12.2?}", "no rule applies", free);
        row("local (7 counters)", sequential(&local, n as usize).await);
        println!(
            "{:<34} {:>12.0} checks+charges/s",
            "local, 16 concurrent callers",
            concurrent(&local, 16, 20_000).await
        );
        match redis_server() {
            None => println!("redis: NOT RUN (redis-server is not installed or did not start)"),
            Some((mut child, port)) => {
                let dir = tempfile::tempdir().unwrap();
                let settings = Settings {
                    redis_url: Some(format!("redis://127.0.0.1:{port}")),
                    on_backend_error: OnBackendError::Deny,
                    timeout: Duration::from_secs(1),
                };
                let shared = engine(dir.path(), &settings);
                sequential(&shared, 1_000).await;
                row(
                    "redis on loopback (7 counters)",
                    sequential(&shared, 20_000).await,
                );
                println!(
                    "{:<34} {:>12.0} checks+charges/s",
                    "redis, 32 concurrent callers",
                    concurrent(&shared, 32, 2_000).await
                );
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    });
}

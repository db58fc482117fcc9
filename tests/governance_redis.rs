//! Budgets and rate limits shared through a real `redis-server` (Debian package `redis-server`,
//! installed by `.ci/run`) on a free loopback port: three keywards holding one budget, and what
//! happens while Redis is down (`on_backend_error = "deny"` and `"local"`) and after it is back.

mod support;

use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::daemon::{Daemon, random_key};
use support::mock_upstream::{MOCK_USAGE_HEADER, MockUpstream, MockUsage};
use support::uds::{bearer, call, error_code, post};

const PRICES: &str = "[[prices]]\ntarget = \"openai\"\nmodel = \"gpt-4o\"\ninput = 1.0\n\
                      cached_input = 1.0\ncache_write = 1.0\noutput = 1.0\n";

/// A `redis-server` child on `port`, without persistence (a restart starts empty).
struct Redis {
    child: Option<Child>,
    port: u16,
}

impl Redis {
    /// Starts Redis on a free port, or `None` when the program is missing and the run accepts
    /// that (see `needs.rs`).
    fn start(test: &str) -> Option<Redis> {
        if !support::needs::program(test, "redis-server", "--version") {
            return None;
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut r = Redis { child: None, port };
        r.restart();
        Some(r)
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// (Re)starts the server on the same port and waits until it accepts connections.
    fn restart(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL: connections drop, nothing answers on the port.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn spend(d: &Daemon, token: &str, tokens: u64) -> (u16, http::HeaderMap, String) {
    let usage = MockUsage {
        input: tokens,
        ..MockUsage::default()
    };
    let body = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]});
    // A dead Redis must not hang a request: each call is bounded by [governance] timeout.
    tokio::time::timeout(
        Duration::from_secs(30),
        call(
            &d.socket(),
            post(
                "/openai/v1/chat/completions",
                &[
                    ("authorization", &bearer(token)),
                    (MOCK_USAGE_HEADER, &usage.header()),
                ],
                &body.to_string(),
            ),
        ),
    )
    .await
    .expect("the request hung")
}

fn daemon(mock: &MockUpstream, dir: &std::path::Path, governance: &str) -> Daemon {
    Daemon::builder()
        .config(&support::targets_config(
            mock,
            dir,
            &["openai"],
            &format!("[governance]\n{governance}\n{PRICES}"),
        ))
        .start()
}

/// Rows of `event` in `d`'s audit.
fn events(d: &Daemon, event: &str) -> Vec<Value> {
    d.json_lines(&["audit", "query", "--event", event])
}

/// Three keywards with the same budget in one Redis: calls from all three, concurrently, stop
/// being served once the fleet's spend reaches the limit; the total served is at most the limit
/// plus what was in flight; the 50% alert is written once in the whole fleet.
#[tokio::test(flavor = "multi_thread")]
async fn three_keywards_share_one_budget() {
    let test = "three_keywards_share_one_budget";
    let Some(redis) = Redis::start(test) else {
        return;
    };
    let mock = MockUpstream::builder().start().await;
    let dir = tempfile::tempdir().unwrap();
    let settings = format!("redis_url = \"{}\"\n", redis.url());
    let mut fleet = Vec::new();
    for _ in 0..3 {
        let d = daemon(&mock, dir.path(), &settings);
        let (token, _) = d.provision("acme", "openai", &random_key("sk-"), &[]);
        d.ok(&[
            "budget", "set", "--tenant", "acme", "--limit", "0.003", "--period", "day", "--alert",
            "50",
        ]);
        fleet.push((d, token));
    }
    let fleet = std::sync::Arc::new(fleet);
    let mut tasks = Vec::new();
    for i in 0..3 {
        let fleet = fleet.clone();
        tasks.push(tokio::spawn(async move {
            let (d, token) = &fleet[i];
            let mut served = 0u64;
            for _ in 0..100 {
                let (status, headers, body) = spend(d, token, 100).await;
                match status {
                    200 => served += 1,
                    429 => {
                        assert_eq!(error_code(&headers), "budget_exceeded", "{body}");
                        return served;
                    }
                    other => panic!("{other} {body}"),
                }
            }
            panic!("replica {i} was never refused");
        }));
    }
    let mut served = 0;
    for t in tasks {
        served += t.await.unwrap();
    }
    let cost = served * 100;
    // Each replica has at most one call in flight and its charge on the way to Redis.
    assert!(
        (3_000..=3_000 + 3 * 2 * 100).contains(&cost),
        "served {served} calls = {cost} micro-USD for a 3,000 budget"
    );
    assert_eq!(mock.request_count() as u64, served);
    tokio::time::sleep(Duration::from_millis(500)).await;
    for (d, _) in fleet.iter() {
        let b = &d.json_lines(&["budget", "list"])[0];
        assert_eq!(b["source"], "redis", "{b}");
        assert_eq!(b["spent_micros"], cost, "{b}");
    }
    let alerts: usize = fleet
        .iter()
        .map(|(d, _)| events(d, "budget.threshold").len())
        .sum();
    assert_eq!(alerts, 1, "the 50% alert is written once in the fleet");
    drop(redis);
}

/// With `on_backend_error = "deny"`, a request that a limit applies to is refused with 503
/// `governance_unavailable` while Redis is down (nothing reaches the provider, nothing hangs),
/// a request no rule applies to is served, and the limit holds again once Redis is back,
/// without a restart.
#[tokio::test(flavor = "multi_thread")]
async fn redis_down_denies_then_recovers() {
    let test = "redis_down_denies_then_recovers";
    let Some(mut redis) = Redis::start(test) else {
        return;
    };
    let mock = MockUpstream::builder().start().await;
    let dir = tempfile::tempdir().unwrap();
    let d = daemon(
        &mock,
        dir.path(),
        &format!(
            "redis_url = \"{}\"\non_backend_error = \"deny\"\ntimeout = \"200ms\"\n",
            redis.url()
        ),
    );
    let (token, _) = d.provision("acme", "openai", &random_key("sk-"), &[]);
    let (free, _) = d.provision("globex", "openai", &random_key("sk-"), &[]);
    d.ok(&["limit", "set", "--tenant", "acme", "--rpm", "1000"]);
    assert_eq!(spend(&d, &token, 1).await.0, 200);

    redis.kill();
    let before = mock.request_count();
    for _ in 0..3 {
        let (status, headers, body) = spend(&d, &token, 1).await;
        assert_eq!(status, 503, "{body}");
        assert_eq!(error_code(&headers), "governance_unavailable");
        assert_eq!(headers["retry-after"], "1");
        assert!(
            body.contains(&redis.url()) && body.contains("on_backend_error"),
            "{body}"
        );
    }
    assert_eq!(mock.request_count(), before, "nothing was sent upstream");
    assert_eq!(
        spend(&d, &free, 1).await.0,
        200,
        "no rule applies to globex"
    );
    assert!(d.stderr().contains("Redis unreachable"));
    let status = &d.json_lines(&["status"])[0];
    assert_eq!(status["governance"]["redis_up"], false, "{status}");
    assert_eq!(status["governance"]["counters"], redis.url());

    redis.restart();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, _, body) = spend(&d, &token, 1).await;
        if status == 200 {
            break;
        }
        assert_eq!(status, 503, "{body}");
        assert!(Instant::now() < deadline, "not recovered: {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(d.stderr().contains("Redis reachable again"));
    assert_eq!(d.json_lines(&["status"])[0]["governance"]["redis_up"], true);
}

/// With `on_backend_error = "local"`, this keyward counts alone while Redis is down (its own
/// spend still refuses once it reaches the budget), and the charges Redis missed reach it once
/// it is back.
#[tokio::test(flavor = "multi_thread")]
async fn redis_down_counts_locally_then_catches_up() {
    let test = "redis_down_counts_locally_then_catches_up";
    let Some(mut redis) = Redis::start(test) else {
        return;
    };
    let mock = MockUpstream::builder().start().await;
    let dir = tempfile::tempdir().unwrap();
    let d = daemon(
        &mock,
        dir.path(),
        &format!(
            "redis_url = \"{}\"\non_backend_error = \"local\"\ntimeout = \"200ms\"\n",
            redis.url()
        ),
    );
    let (token, _) = d.provision("acme", "openai", &random_key("sk-"), &[]);
    d.ok(&[
        "budget", "set", "--tenant", "acme", "--limit", "0.001", "--period", "month",
    ]);
    assert_eq!(spend(&d, &token, 400).await.0, 200);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(d.json_lines(&["budget", "list"])[0]["source"], "redis");

    redis.kill();
    // Counted here: 400 before the outage, then 400 + 400.
    assert_eq!(spend(&d, &token, 400).await.0, 200);
    assert_eq!(spend(&d, &token, 400).await.0, 200);
    let (status, headers, body) = spend(&d, &token, 400).await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(error_code(&headers), "budget_exceeded");
    let b = &d.json_lines(&["budget", "list"])[0];
    assert_eq!(
        (b["source"].as_str(), b["spent_micros"].as_u64()),
        (Some("local"), Some(1_200))
    );

    // Redis comes back empty (no persistence): the two charges it missed are replayed into it.
    redis.restart();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let b = &d.json_lines(&["budget", "list"])[0];
        if b["source"] == "redis" && b["spent_micros"] == 800 {
            break;
        }
        assert!(Instant::now() < deadline, "charges not replayed: {b}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A reload picks up `[governance]` changes: from local counters to Redis.
#[tokio::test(flavor = "multi_thread")]
async fn reload_moves_the_counters_to_redis() {
    let test = "reload_moves_the_counters_to_redis";
    let Some(redis) = Redis::start(test) else {
        return;
    };
    let mock = MockUpstream::builder().start().await;
    let dir = tempfile::tempdir().unwrap();
    let d = daemon(&mock, dir.path(), "");
    let (token, _) = d.provision("acme", "openai", &random_key("sk-"), &[]);
    d.ok(&[
        "budget", "set", "--tenant", "acme", "--limit", "1", "--period", "day",
    ]);
    assert_eq!(spend(&d, &token, 10).await.0, 200);
    assert_eq!(d.json_lines(&["budget", "list"])[0]["source"], "local");
    let config = d.home.join("keyward.toml");
    let text = std::fs::read_to_string(&config).unwrap().replace(
        "[governance]\n",
        &format!("[governance]\nredis_url = \"{}\"\n", redis.url()),
    );
    std::fs::write(&config, text).unwrap();
    let out = d.ok(&["reload"]);
    assert!(out.contains("governance"), "{out}");
    assert_eq!(spend(&d, &token, 10).await.0, 200);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let b = &d.json_lines(&["budget", "list"])[0];
        if b["source"] == "redis" && b["spent_micros"] == 10 {
            break;
        }
        assert!(Instant::now() < deadline, "{b}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

//! Budgets and rate limits through the real binary, against a mock provider that reports exactly
//! the usage each request asks for, priced at 1 micro-USD per token so every cost is exact.

mod support;

use std::time::Duration;

use serde_json::{Value, json};
use support::daemon::{Daemon, random_key};
use support::mock_upstream::{MOCK_USAGE_HEADER, MockUpstream, MockUsage};
use support::uds::{bearer, call, error_code, post};

/// gpt-4o at 1 USD per million tokens of every kind: a call costs its token count in micro-USD.
const PRICES: &str = "[[prices]]\ntarget = \"openai\"\nmodel = \"gpt-4o\"\ninput = 1.0\n\
                      cached_input = 1.0\ncache_write = 1.0\noutput = 1.0\n";

const PATH: &str = "/openai/v1/chat/completions";

fn chat() -> String {
    json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}).to_string()
}

/// One call costing `tokens` micro-USD (all input); returns (status, headers, body).
async fn spend(d: &Daemon, token: &str, tokens: u64) -> (u16, http::HeaderMap, String) {
    let usage = MockUsage {
        input: tokens,
        ..MockUsage::default()
    };
    call(
        &d.socket(),
        post(
            PATH,
            &[
                ("authorization", &bearer(token)),
                (MOCK_USAGE_HEADER, &usage.header()),
            ],
            &chat(),
        ),
    )
    .await
}

/// A mock provider and a daemon pointed at it with [`PRICES`] and `extra` config.
async fn start(extra: &str) -> (MockUpstream, Daemon, tempfile::TempDir) {
    let mock = MockUpstream::builder().start().await;
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::builder()
        .config(&support::targets_config(
            &mock,
            dir.path(),
            &["openai"],
            &format!("{PRICES}\n{extra}"),
        ))
        .start();
    (mock, d, dir)
}

/// A new client of `tenant` (in `team` when given); returns (token, id).
fn client(d: &Daemon, tenant: &str, team: Option<&str>) -> (String, String) {
    let name = format!("app-{}", &random_key("")[..8]);
    let mut args = vec!["client", "add", "--tenant", tenant, "--name", &name];
    if let Some(team) = team {
        args.extend_from_slice(&["--team", team]);
    }
    let v = &d.json_lines(&args)[0];
    (
        v["token"].as_str().unwrap().to_string(),
        v["id"].as_str().unwrap().to_string(),
    )
}

/// Rows of `event`, oldest first.
fn events(d: &Daemon, event: &str) -> Vec<Value> {
    let mut rows = d.json_lines(&["audit", "query", "--event", event]);
    rows.reverse();
    rows
}

/// Sleeps past the end of the current UTC minute when less than `margin` of it is left, so a
/// test that counts within one rate window does not straddle two.
async fn fresh_minute(margin: Duration) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    let into = Duration::from_millis((now.as_millis() % 60_000) as u64);
    if Duration::from_secs(60) - into < margin {
        tokio::time::sleep(Duration::from_secs(60) - into + Duration::from_millis(200)).await;
    }
}

/// The next UTC midnight, RFC 3339 at second precision.
fn next_midnight() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let t = std::time::UNIX_EPOCH + Duration::from_secs((now / 86_400 + 1) * 86_400);
    humantime::format_rfc3339_seconds(t).to_string()
}

/// A tenant's deny budget: calls are served and charged at completion until spent reaches
/// the limit; the next request gets 429 `budget_exceeded` naming the budget, spent, limit and
/// reset time, and the mock never sees it. Each alert threshold is audited once.
#[tokio::test(flavor = "multi_thread")]
async fn a_spent_deny_budget_refuses_before_the_upstream_is_contacted() {
    let (mock, d, _dir) = start("").await;
    let (token, _) = d.provision("acme", "openai", &random_key("sk-"), &[]);
    let set = &d.json_lines(&[
        "budget", "set", "--tenant", "acme", "--limit", "0.001", "--period", "day", "--alert",
        "90", "--alert", "50",
    ])[0];
    let id = set["id"].as_str().unwrap().to_string();
    assert!(id.starts_with("bud_"), "{set}");
    assert_eq!(set["limit_micros"], 1_000);
    assert_eq!(
        set["resets_at"].as_str().unwrap()[..19],
        next_midnight()[..19]
    );

    // 400 + 400 + 400: the third is admitted at 800 spent and overshoots by its own cost.
    for _ in 0..3 {
        let (status, _, body) = spend(&d, &token, 400).await;
        assert_eq!(status, 200, "{body}");
    }
    assert_eq!(mock.request_count(), 3);
    let (status, headers, body) = spend(&d, &token, 400).await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(error_code(&headers), "budget_exceeded");
    let message = serde_json::from_str::<Value>(&body).unwrap()["error"]["message"]
        .as_str()
        .unwrap()
        .to_string();
    for part in [
        id.as_str(),
        "tenant acme",
        "spent 0.0012 USD",
        "0.001 USD per day",
    ] {
        assert!(message.contains(part), "{part} missing: {message}");
    }
    assert!(message.contains(&next_midnight()[..19]), "{message}");
    assert_eq!(mock.request_count(), 3, "nothing was sent upstream");

    let list = d.json_lines(&["budget", "list"]);
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["spent_micros"], 1_200);
    assert_eq!(list[0]["source"], "local");
    let table = d.ok(&["budget", "list"]);
    assert!(table.starts_with("ID"), "{table}");
    assert!(table.contains("0.0012") && table.contains(&id), "{table}");

    // 50% was crossed by the second call, 90% by the third: once each.
    let alerts = events(&d, "budget.threshold");
    assert_eq!(alerts.len(), 2, "{alerts:?}");
    assert!(alerts[0]["detail"].as_str().unwrap().contains("50%"));
    assert!(alerts[1]["detail"].as_str().unwrap().contains("90%"));
    assert!(d.stderr().contains("90% of 0.001 USD per day reached"));
    assert_eq!(events(&d, "budget.set").len(), 1);
    let denied = events(&d, "request.denied");
    assert!(
        denied.last().unwrap()["detail"]
            .as_str()
            .unwrap()
            .starts_with("budget_exceeded: "),
        "{denied:?}"
    );

    // A restart reads this period's spend back from the audit trail.
    let home = d.home.clone();
    let mut d = d;
    d.terminate();
    let d2 = Daemon::builder()
        .home(&home)
        .config(&std::fs::read_to_string(home.join("keyward.toml")).unwrap())
        .start();
    assert_eq!(d2.json_lines(&["budget", "list"])[0]["spent_micros"], 1_200);
    let (status, headers, _) = spend(&d2, &token, 1).await;
    assert_eq!(
        (status, error_code(&headers).as_str()),
        (429, "budget_exceeded")
    );
    assert_eq!(mock.request_count(), 3);

    // Deleting lifts it, and is audited.
    d2.ok(&["budget", "delete", &id]);
    assert_eq!(spend(&d2, &token, 1).await.0, 200);
    assert_eq!(events(&d2, "budget.deleted").len(), 1);
    let verify = d2.cli(&["audit", "verify"]);
    assert!(verify.status.success(), "{verify:?}");
}

/// A warn budget on a team serves over its limit, flags the calls in the audit and tells the
/// app in `keyward-budget`; another team is not affected.
#[tokio::test(flavor = "multi_thread")]
async fn a_warn_budget_serves_and_flags() {
    let (mock, d, _dir) = start("").await;
    d.provision("acme", "openai", &random_key("sk-"), &[]);
    let (research, _) = client(&d, "acme", Some("research"));
    let (search, _) = client(&d, "acme", Some("search"));
    let id = d.json_lines(&[
        "budget",
        "set",
        "--tenant",
        "acme",
        "--team",
        "research",
        "--limit",
        "0.0001",
        "--period",
        "week",
        "--on-exceed",
        "warn",
    ])[0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let (status, headers, _) = spend(&d, &research, 150).await;
    assert_eq!(status, 200);
    assert!(headers.get("keyward-budget").is_none());
    let (status, headers, _) = spend(&d, &research, 10).await;
    assert_eq!(status, 200);
    let warning = headers["keyward-budget"].to_str().unwrap();
    assert!(
        warning.contains(&id) && warning.contains("0.00015"),
        "{warning}"
    );
    let (status, headers, _) = spend(&d, &search, 10).await;
    assert_eq!(status, 200);
    assert!(headers.get("keyward-budget").is_none());
    assert_eq!(mock.request_count(), 3);
    let call_id = headers["keyward-call-id"].to_str().unwrap().to_string();
    let _ = call_id;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let flagged: Vec<Value> = d
        .json_lines(&["audit", "query", "--tenant", "acme"])
        .into_iter()
        .filter(|r| {
            r["flags"]
                .as_array()
                .is_some_and(|f| f.contains(&json!("budget_exceeded_warn")))
        })
        .collect();
    // The second research call's resolution and completion rows.
    assert_eq!(flagged.len(), 2, "{flagged:?}");
    assert!(flagged.iter().all(|r| r["team"] == "research"));
    let set = events(&d, "budget.set");
    assert_eq!(set[0]["team"], "research");
    let week = &d.json_lines(&["budget", "list", "--tenant", "acme"])[0];
    assert_eq!(week["period"], "week");
    assert_eq!(week["spent_micros"], 160);
}

/// Budgets on a client and on a credential: a spent credential budget moves calls to the
/// pool's other key; a spent client budget refuses that client only. `audit lifecycle` of the
/// credential shows its budget.
#[tokio::test(flavor = "multi_thread")]
async fn client_and_credential_budgets_apply_to_their_scope_only() {
    let (mock, d, _dir) = start("").await;
    let (first, cred_a) = d.provision("acme", "openai", &random_key("sk-"), &[]);
    // The only client so far is the one `provision` made for `first`.
    let first_id = d.json_lines(&["client", "list", "--tenant", "acme"])[0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let (_, cred_b) = d.provision("acme", "openai", &random_key("sk-"), &["--priority", "200"]);
    let (second, _) = client(&d, "acme", None);
    d.ok(&[
        "budget",
        "set",
        "--tenant",
        "acme",
        "--credential",
        &cred_a,
        "--limit",
        "0.0001",
        "--period",
        "month",
    ]);
    let (status, headers, _) = spend(&d, &first, 100).await;
    assert_eq!(status, 200);
    assert!(
        headers["keyward-credential"]
            .to_str()
            .unwrap()
            .starts_with(&cred_a)
    );
    // cred_a is spent: the next call goes to cred_b, whose budget is unlimited.
    let (status, headers, _) = spend(&d, &second, 100).await;
    assert_eq!(status, 200);
    assert!(
        headers["keyward-credential"]
            .to_str()
            .unwrap()
            .starts_with(&cred_b)
    );

    d.ok(&[
        "budget", "set", "--tenant", "acme", "--client", &first_id, "--limit", "0.00015",
        "--period", "day",
    ]);
    // first spent 100 of 150 so far: one more call, then refused; second goes on.
    assert_eq!(spend(&d, &first, 100).await.0, 200);
    let (status, headers, body) = spend(&d, &first, 1).await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(error_code(&headers), "budget_exceeded");
    assert!(
        body.contains(&format!("client {first_id} of tenant acme")),
        "{body}"
    );
    assert_eq!(spend(&d, &second, 1).await.0, 200);
    assert_eq!(mock.request_count(), 4);

    let lifecycle = d.json_lines(&["audit", "lifecycle", &cred_a]);
    assert!(
        lifecycle.iter().any(|r| r["event"] == "budget.set"),
        "{lifecycle:?}"
    );
    let by_client = d.json_lines(&[
        "audit",
        "query",
        "--client",
        &first_id,
        "--event",
        "budget.set",
    ]);
    assert_eq!(by_client.len(), 1);

    // Clear refusals for scopes that do not exist or mix.
    for (args, want) in [
        (
            vec!["--client", "cli_nope", "--limit", "1", "--period", "day"],
            "client `cli_nope` is not a client of tenant `acme`",
        ),
        (
            vec![
                "--credential",
                "cred_nope",
                "--limit",
                "1",
                "--period",
                "day",
            ],
            "credential `cred_nope` is not a credential of tenant `acme`",
        ),
        (
            vec!["--limit", "ten", "--period", "day"],
            "is not an amount in USD",
        ),
        (vec!["--limit", "0", "--period", "day"], "more than 0 USD"),
    ] {
        let mut all = vec!["budget", "set", "--tenant", "acme"];
        all.extend(args);
        let out = d.cli(&all);
        assert_eq!(out.status.code(), Some(1), "{all:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "{err}");
    }
    let out = d.cli(&[
        "budget", "set", "--tenant", "nope", "--limit", "1", "--period", "day",
    ]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("tenant `nope` does not exist"));
}

/// `--rpm`: the request over the limit gets 429 `rate_limited` with a Retry-After that reaches
/// the next minute, and the mock never sees it. `--tpm`: tokens are charged at completion and a
/// request is refused once the minute's tokens are used.
#[tokio::test(flavor = "multi_thread")]
async fn rate_limits_refuse_with_a_truthful_retry_after() {
    let (mock, d, _dir) = start("").await;
    let (token, _) = d.provision("acme", "openai", &random_key("sk-"), &[]);
    let (team_token, team_client) = client(&d, "acme", Some("bots"));
    let _ = team_client;
    let set = &d.json_lines(&["limit", "set", "--tenant", "acme", "--rpm", "3"])[0];
    assert_eq!(set["rpm"], 3);
    assert_eq!(events(&d, "limit.set").len(), 1);
    d.ok(&[
        "limit", "set", "--tenant", "acme", "--team", "bots", "--tpm", "500",
    ]);

    fresh_minute(Duration::from_secs(20)).await;
    assert_eq!(spend(&d, &team_token, 400).await.0, 200);
    // 400 of 500 tokens used: admitted, and now 800.
    assert_eq!(spend(&d, &team_token, 400).await.0, 200);
    let (status, headers, body) = spend(&d, &team_token, 1).await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(error_code(&headers), "rate_limited");
    assert!(
        body.contains("500 tokens per minute") && body.contains("800"),
        "{body}"
    );
    let retry: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry), "{retry}");
    // The tenant's rpm counted the two admitted team calls: one more fits.
    assert_eq!(spend(&d, &token, 1).await.0, 200);
    let (status, headers, body) = spend(&d, &token, 1).await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(error_code(&headers), "rate_limited");
    assert!(body.contains("3 requests per minute"), "{body}");
    let retry: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    let now_s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let left = 60 - now_s % 60;
    assert!(
        retry >= left.saturating_sub(1) && retry <= left + 1,
        "{retry} vs {left}"
    );
    assert_eq!(mock.request_count(), 3);
    let limits = d.json_lines(&["limit", "list"]);
    let tenant_wide = limits.iter().find(|l| l["scope"] == "tenant").unwrap();
    assert_eq!(tenant_wide["requests_this_minute"], 3);
    let bots = limits.iter().find(|l| l["scope"] == "team").unwrap();
    assert_eq!(bots["tokens_this_minute"], 800);

    // After Retry-After, the request goes through.
    tokio::time::sleep(Duration::from_secs(retry)).await;
    assert_eq!(spend(&d, &token, 1).await.0, 200);
    let id = tenant_wide["id"].as_str().unwrap();
    d.ok(&["limit", "delete", id]);
    assert_eq!(events(&d, "limit.deleted").len(), 1);
    let out = d.cli(&["limit", "set", "--tenant", "acme"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("give --rpm N, --tpm N or both"));
}

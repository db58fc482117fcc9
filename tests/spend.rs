//! Spend governance through the real binary: token counts as every family reports them, with a
//! mock provider that reports exactly the usage each request asks for.

mod support;

use std::time::Duration;

use serde_json::{Value, json};
use support::daemon::{Daemon, random_key};
use support::mock_upstream::{MOCK_USAGE_HEADER, MockUpstream, MockUsage};
use support::uds::{bearer, call, post};

/// The `request.completed` row of `call_id`, once the writer has it.
async fn completed(d: &Daemon, call_id: &str) -> Value {
    for _ in 0..200 {
        let rows = d.json_lines(&["audit", "query", "--call-id", call_id]);
        if let Some(r) = rows.into_iter().find(|r| r["event"] == "request.completed") {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("no request.completed row for {call_id}");
}

/// One call through keyward asking the mock for `usage`; returns (status, call id).
async fn spend_call(
    d: &Daemon,
    token: &str,
    path: &str,
    body: &Value,
    usage: &MockUsage,
) -> (u16, String) {
    let (status, headers, text) = call(
        &d.socket(),
        post(
            path,
            &[
                ("authorization", &bearer(token)),
                (MOCK_USAGE_HEADER, &usage.header()),
            ],
            &body.to_string(),
        ),
    )
    .await;
    assert!(status == 200 || status == 429, "{status} {text}");
    let id = headers
        .get("keyward-call-id")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    (status, id)
}

/// The same usage (11,007 prompt tokens of which 9,800 cached and, on Anthropic, 1,200
/// written to the cache; 50 output tokens of which 30 reasoning) reported in every family's
/// JSON and stream shape is audited as the same input, cached input, cache writes and output.
#[tokio::test(flavor = "multi_thread")]
async fn every_family_and_shape_is_audited_with_true_token_counts() {
    let mock = MockUpstream::builder().start().await;
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::builder()
        .config(&support::targets_config(
            &mock,
            dir.path(),
            &["openai", "anthropic", "gemini"],
            "",
        ))
        .start();
    let (openai, _) = d.provision("acme", "openai", &random_key("sk-"), &[]);
    let (anthropic, _) = d.provision("acme2", "anthropic", &random_key("sk-ant-"), &[]);
    let (gemini, _) = d.provision("acme3", "gemini", &random_key("AIza"), &[]);
    let usage = MockUsage {
        input: 11_007,
        cached: 9_800,
        cache_write: 0,
        output: 50,
        reasoning: 30,
    };
    let with_write = MockUsage {
        cache_write: 1_200,
        ..usage
    };
    let chat = |stream: bool| json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "stream": stream, "stream_options": {"include_usage": true}});
    let cases = [
        (&openai, "/openai/v1/chat/completions", chat(false), usage),
        (&openai, "/openai/v1/chat/completions", chat(true), usage),
        (
            &openai,
            "/openai/v1/responses",
            json!({"model": "gpt-4o", "input": "hi"}),
            usage,
        ),
        (
            &openai,
            "/openai/v1/responses",
            json!({"model": "gpt-4o", "input": "hi", "stream": true}),
            usage,
        ),
        (
            &anthropic,
            "/anthropic/v1/messages",
            json!({"model": "claude-sonnet-4-5", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}),
            with_write,
        ),
        (
            &anthropic,
            "/anthropic/v1/messages",
            json!({"model": "claude-sonnet-4-5", "max_tokens": 10, "stream": true, "messages": [{"role": "user", "content": "hi"}]}),
            with_write,
        ),
        (
            &gemini,
            "/gemini/v1beta/models/gemini-2.5-pro:generateContent",
            json!({"contents": [{"parts": [{"text": "hi"}]}]}),
            usage,
        ),
        (
            &gemini,
            "/gemini/v1beta/models/gemini-2.5-pro:streamGenerateContent",
            json!({"contents": [{"parts": [{"text": "hi"}]}]}),
            usage,
        ),
        (
            &gemini,
            "/gemini/v1beta/models/gemini-2.5-pro:streamGenerateContent?alt=sse",
            json!({"contents": [{"parts": [{"text": "hi"}]}]}),
            usage,
        ),
    ];
    for (token, path, body, want) in cases {
        let (status, id) = spend_call(&d, token, path, &body, &want).await;
        assert_eq!(status, 200, "{path}");
        let row = completed(&d, &id).await;
        let what = format!("{path} {body}: {row}");
        assert_eq!(row["input_tokens"], 11_007, "{what}");
        assert_eq!(row["cached_input_tokens"], 9_800, "{what}");
        assert_eq!(row["output_tokens"], 50, "{what}");
        assert_eq!(row["total_tokens"], 11_057, "{what}");
        if want.cache_write > 0 {
            assert_eq!(row["cache_write_tokens"], 1_200, "{what}");
        } else {
            assert!(
                row["cache_write_tokens"].as_u64().unwrap_or(0) == 0,
                "{what}"
            );
        }
    }
    let verify = d.cli(&["audit", "verify"]);
    assert!(verify.status.success(), "{verify:?}");
}

/// `[[prices]]` rows override and extend the shipped table; `request.completed` carries the
/// exact cost in micro-USD, or the flag `unpriced`; `keyward prices` prints the table.
#[tokio::test(flavor = "multi_thread")]
async fn calls_carry_their_cost_or_the_unpriced_flag() {
    let mock = MockUpstream::builder().start().await;
    let dir = tempfile::tempdir().unwrap();
    let prices = "[[prices]]\ntarget = \"openai\"\nmodel = \"gpt-4o\"\ninput = 2.0\n\
                  cached_input = 0.5\noutput = 8.0\nas_of = \"2026-01-02\"\n\
                  [[prices]]\ntarget = \"anthropic\"\nmodel = \"house-*\"\ninput = 1.0\n\
                  cached_input = 0.1\ncache_write = 1.25\noutput = 5.0\n";
    let d = Daemon::builder()
        .config(&support::targets_config(
            &mock,
            dir.path(),
            &["openai", "anthropic"],
            prices,
        ))
        .start();
    let (openai, _) = d.provision("acme", "openai", &random_key("sk-"), &[]);
    let (anthropic, _) = d.provision("acme2", "anthropic", &random_key("sk-ant-"), &[]);
    let usage = MockUsage {
        input: 11_007,
        cached: 9_800,
        cache_write: 1_200,
        output: 50,
        reasoning: 0,
    };
    let chat = |model: &str| json!({"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5});
    let openai_usage = MockUsage {
        cache_write: 0,
        ..usage
    };
    // gpt-4o from the config: 1,207 plain × 2 + 9,800 × 0.5 + 50 × 8 = 2,414 + 4,900 + 400.
    // gpt-4o-mini stays shipped (0.15 / 0.075 / 0.60): 181.05 + 735 + 30 = 946.05 → 946.
    // house-model from the config: 7 × 1 + 9,800 × 0.1 + 1,200 × 1.25 + 50 × 5 = 2,737.
    for (token, path, model, u, want) in [
        (
            &openai,
            "/openai/v1/chat/completions",
            "gpt-4o",
            openai_usage,
            Some(7_714),
        ),
        (
            &openai,
            "/openai/v1/chat/completions",
            "gpt-4o-mini",
            openai_usage,
            Some(946),
        ),
        (
            &openai,
            "/openai/v1/chat/completions",
            "my-finetune",
            openai_usage,
            None,
        ),
        (
            &anthropic,
            "/anthropic/v1/messages",
            "house-model",
            usage,
            Some(2_737),
        ),
    ] {
        let (status, id) = spend_call(&d, token, path, &chat(model), &u).await;
        assert_eq!(status, 200);
        let row = completed(&d, &id).await;
        match want {
            Some(cost) => {
                assert_eq!(row["cost_micros"], cost, "{model}: {row}");
                assert!(row.get("flags").is_none(), "{model}: {row}");
            }
            None => {
                assert!(row.get("cost_micros").is_none(), "{row}");
                assert_eq!(row["flags"], json!(["unpriced"]), "{row}");
            }
        }
    }
    let table = d.json_lines(&["prices", "--target", "openai"]);
    assert!(table.iter().all(|r| r["target"] == "openai"));
    let mine = table
        .iter()
        .find(|r| r["model"] == "gpt-4o" && r["source"] == "config")
        .expect("config row listed");
    assert_eq!(mine["input"], 2.0);
    assert_eq!(mine["cache_write"], 2.0, "cache_write defaults to input");
    assert_eq!(mine["as_of"], "2026-01-02");
    assert!(table.iter().any(|r| r["model"] == "gpt-4o-mini*"
        && r["source"] == "shipped"
        && r["as_of"].is_string()));
    let text = d.ok(&["prices"]);
    assert!(
        text.contains("claude-sonnet-4*") && text.contains("house-*"),
        "{text}"
    );
    assert!(
        text.lines().next().unwrap().contains("CACHED_INPUT"),
        "{text}"
    );
    let verify = d.cli(&["audit", "verify"]);
    assert!(verify.status.success(), "{verify:?}");
}

/// A bad `[[prices]]` row stops the start with a message naming the key.
#[test]
fn a_bad_price_row_is_refused_at_start() {
    let started = Daemon::builder()
        .config("[[prices]]\ntarget = \"openai\"\nmodel = \"gpt-4o\"\ninput = -2.0\noutput = 1.0\n")
        .try_start();
    let Err((_, stderr)) = started else {
        panic!("a negative price was accepted");
    };
    assert!(stderr.contains("prices[0].input"), "{stderr}");
}

/// A client of `tenant` in `team`; returns (token, client id).
fn team_client(d: &Daemon, tenant: &str, team: &str) -> (String, String) {
    let out = d.ok(&[
        "client",
        "add",
        "--tenant",
        tenant,
        "--name",
        &format!("app-{}", &random_key("")[..8]),
        "--team",
        team,
        "--json",
    ]);
    let v: Value = serde_json::from_str(out.trim()).unwrap();
    (
        v["token"].as_str().unwrap().to_string(),
        v["id"].as_str().unwrap().to_string(),
    )
}

/// `keyward spend` sums exact costs and tokens by every dimension, for one tenant or all,
/// within --since/--until, as a table and as JSON.
#[tokio::test(flavor = "multi_thread")]
async fn spend_sums_cost_and_tokens_by_every_dimension() {
    let mock = MockUpstream::builder().start().await;
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::builder()
        .config(&support::targets_config(&mock, dir.path(), &["openai"], ""))
        .start();
    let (_, cred) = d.provision("acme", "openai", &random_key("sk-"), &[]);
    let (_, other_cred) = d.provision("globex", "openai", &random_key("sk-"), &[]);
    let (research, research_id) = team_client(&d, "acme", "research");
    let (search, search_id) = team_client(&d, "acme", "search");
    let (globex, _) = team_client(&d, "globex", "ops");
    let chat =
        |model: &str| json!({"model": model, "messages": [{"role": "user", "content": "hi"}]});
    // gpt-4o at 2.50 / 1.25 / 10: 1,000 plain + 0 cached + 100 out = 2,500 + 1,000 = 3,500.
    let u = MockUsage {
        input: 1_000,
        output: 100,
        ..MockUsage::default()
    };
    // gpt-4o-mini at 0.15 / 0.075 / 0.60: 2,000 × 0.15 + 1,000 × 0.075 + 10 × 0.6 = 381.
    let mini = MockUsage {
        input: 3_000,
        cached: 1_000,
        output: 10,
        ..MockUsage::default()
    };
    let path = "/openai/v1/chat/completions";
    let mut ids = Vec::new();
    for (token, model, usage) in [
        (&research, "gpt-4o", u),
        (&research, "gpt-4o", u),
        (&research, "gpt-4o-mini", mini),
        (&search, "gpt-4o-mini", mini),
        (&search, "unpriced-model", u),
        (&globex, "gpt-4o", u),
    ] {
        let (status, id) = spend_call(&d, token, path, &chat(model), &usage).await;
        assert_eq!(status, 200);
        ids.push(id);
    }
    for id in &ids {
        completed(&d, id).await;
    }
    let by = |args: &[&str]| -> Vec<Value> {
        let mut all = vec!["spend"];
        all.extend_from_slice(args);
        d.json_lines(&all)
    };
    let find = |rows: &[Value], name: &str, key: &str| -> Value {
        rows.iter()
            .find(|r| r[name] == key)
            .unwrap_or_else(|| panic!("no {name}={key} in {rows:?}"))
            .clone()
    };
    let models = by(&["--tenant", "acme", "--by", "model"]);
    assert_eq!(models.len(), 3, "{models:?}");
    let gpt4o = find(&models, "model", "gpt-4o");
    assert_eq!(
        (gpt4o["calls"].as_u64(), gpt4o["cost_micros"].as_u64()),
        (Some(2), Some(7_000))
    );
    assert_eq!(gpt4o["input_tokens"], 2_000);
    assert_eq!(gpt4o["output_tokens"], 200);
    let m = find(&models, "model", "gpt-4o-mini");
    assert_eq!(
        (m["cost_micros"].as_u64(), m["cached_input_tokens"].as_u64()),
        (Some(762), Some(2_000))
    );
    let unpriced = find(&models, "model", "unpriced-model");
    assert_eq!(
        (
            unpriced["cost_micros"].as_u64(),
            unpriced["unpriced_calls"].as_u64()
        ),
        (Some(0), Some(1))
    );
    // Highest cost first.
    assert_eq!(models[0]["model"], "gpt-4o");

    let teams = by(&["--tenant", "acme", "--by", "team"]);
    assert_eq!(find(&teams, "team", "research")["cost_micros"], 7_381);
    assert_eq!(find(&teams, "team", "search")["cost_micros"], 381);
    let clients = by(&["--tenant", "acme", "--by", "client"]);
    assert_eq!(find(&clients, "client", &research_id)["calls"], 3);
    assert_eq!(find(&clients, "client", &search_id)["calls"], 2);
    let creds = by(&["--by", "credential"]);
    assert_eq!(find(&creds, "credential", &cred)["cost_micros"], 7_762);
    assert_eq!(
        find(&creds, "credential", &other_cred)["cost_micros"],
        3_500
    );
    let tenants = by(&[]);
    assert_eq!(find(&tenants, "tenant", "acme")["calls"], 5);
    assert_eq!(find(&tenants, "tenant", "globex")["calls"], 1);
    let days = by(&["--by", "day", "--since", "1h"]);
    assert_eq!(days.len(), 1, "{days:?}");
    assert_eq!(days[0]["calls"], 6);
    let today = humantime::format_rfc3339(std::time::SystemTime::now()).to_string();
    assert_eq!(days[0]["day"], &today[..10]);
    assert!(
        by(&["--until", "2h"]).is_empty(),
        "nothing was spent before two hours ago"
    );

    let text = d.ok(&["spend", "--tenant", "acme", "--by", "team"]);
    assert!(text.lines().next().unwrap().starts_with("TEAM"), "{text}");
    assert!(text.contains("0.007381"), "{text}");
    let unknown = d.cli(&["spend", "--tenant", "nope"]);
    assert!(!unknown.status.success());
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("tenant `nope` does not exist"));
}

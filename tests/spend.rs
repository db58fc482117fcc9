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

//! Token usage read from a provider's response as it streams past, for `request.completed`.
//! Which keys and fields each family uses lives in that family's file (`USAGE`); the lexing is
//! [`super::json_scan::ObjectTap`].
//!
//! [`UsageTap`] scans the bytes once, in any chunking, without buffering the body: it keeps
//! only the few bytes of the current object key and, once it meets a `"usage"` (OpenAI,
//! Anthropic) or `"usageMetadata"` (Gemini) key, the object that follows (capped). Later usage
//! objects update earlier ones field by field, which is how Anthropic's stream reports input
//! tokens in `message_start` and output tokens in `message_delta`, how OpenAI's final stream
//! chunk (`stream_options.include_usage`) and the Responses API's `response.completed` event
//! carry the totals, and how every Gemini `streamGenerateContent` chunk repeats the running
//! counts. It never fails: anything it does not understand yields `None`.
//!
//! Each family reports the same four quantities differently; [`Usage`] holds them normalised:
//!
//! - input (all prompt tokens): OpenAI chat `prompt_tokens`; OpenAI Responses `input_tokens`;
//!   Anthropic `input_tokens` + `cache_creation_input_tokens` + `cache_read_input_tokens`;
//!   Gemini `promptTokenCount` + `toolUsePromptTokenCount`.
//! - cached input: OpenAI chat `prompt_tokens_details.cached_tokens`; OpenAI Responses
//!   `input_tokens_details.cached_tokens`; Anthropic `cache_read_input_tokens`; Gemini
//!   `cachedContentTokenCount`.
//! - cache writes: Anthropic `cache_creation_input_tokens` (the others report none).
//! - output (with reasoning): OpenAI chat `completion_tokens`; OpenAI Responses and Anthropic
//!   `output_tokens`; Gemini `candidatesTokenCount` + `thoughtsTokenCount`.
//!
//! Sources: the `usage` objects of the OpenAI Chat Completions and Responses API references,
//! Anthropic's Messages API and prompt-caching documentation (its `input_tokens` leaves out
//! the cached and cache-written tokens), and Gemini's `UsageMetadata` reference.

use serde::{Deserialize, Serialize};

use super::json_scan::ObjectTap;

/// Token counts the provider reported, normalised across families (see the module table).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Every prompt token, cached or not, including tokens written to a prompt cache.
    pub input_tokens: Option<u64>,
    /// The part of `input_tokens` read from the provider's prompt cache.
    pub cached_input_tokens: Option<u64>,
    /// The part of `input_tokens` written to the provider's prompt cache (Anthropic).
    pub cache_write_tokens: Option<u64>,
    /// Completion / output tokens, reasoning ("thinking") tokens included.
    pub output_tokens: Option<u64>,
    /// Input + output when both are known, else what the provider reported as its total.
    pub total_tokens: Option<u64>,
}

/// Where one family puts its token counts inside its usage object. Every list is read in
/// order, first present field wins.
#[derive(Debug)]
pub(crate) struct UsageFields {
    /// Keys whose object is the usage report (`usage`, `usageMetadata`).
    pub keys: &'static [&'static str],
    /// Prompt tokens.
    pub input: &'static [&'static str],
    /// Output tokens.
    pub output: &'static [&'static str],
    /// The provider's own total.
    pub total: &'static [&'static str],
    /// Prompt-cache reads, top-level in the usage object.
    pub cache_read: &'static [&'static str],
    /// Prompt-cache reads one object down: `(outer, inner)`.
    pub cache_read_nested: &'static [(&'static str, &'static str)],
    /// Prompt-cache writes.
    pub cache_write: &'static [&'static str],
    /// Prompt tokens counted apart from `input` (Gemini tool use).
    pub extra_input: &'static [&'static str],
    /// Output tokens counted apart from `output` (Gemini thoughts).
    pub extra_output: &'static [&'static str],
    /// `input` leaves the cache reads and writes out, so they are added to it.
    pub cache_outside_input: bool,
}

/// The families whose usage a response may carry, in the order their field names are tried.
/// Anthropic comes first so its `input_tokens` is read with its cache semantics.
const FAMILIES: &[&UsageFields] = &[
    &super::anthropic::USAGE,
    &super::openai::USAGE,
    &super::gemini::USAGE,
    &super::bedrock::USAGE,
    &super::bedrock::INVOCATION_METRICS,
];

/// The media type of AWS event streams (Bedrock's streaming responses).
const EVENT_STREAM: &str = "application/vnd.amazon.eventstream";

/// Every usage key of every family.
const USAGE_KEYS: &[&[&str]] = &[
    super::anthropic::USAGE.keys,
    super::openai::USAGE.keys,
    super::gemini::USAGE.keys,
    super::bedrock::USAGE.keys,
    super::bedrock::INVOCATION_METRICS.keys,
];

/// The raw counts as last reported, before they are combined per family in
/// [`UsageTap::finish`]. Later reports replace earlier ones field by field.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Raw {
    /// `prompt_tokens` / `input_tokens` / `promptTokenCount`.
    prompt: Option<u64>,
    /// Gemini `toolUsePromptTokenCount`.
    tool_prompt: Option<u64>,
    /// `cached_tokens` under the prompt/input details, `cache_read_input_tokens`,
    /// `cachedContentTokenCount`.
    cache_read: Option<u64>,
    /// Anthropic `cache_creation_input_tokens`.
    cache_write: Option<u64>,
    /// `completion_tokens` / `output_tokens` / `candidatesTokenCount`.
    output: Option<u64>,
    /// Gemini `thoughtsTokenCount` (not part of `candidatesTokenCount`).
    thoughts: Option<u64>,
    /// `total_tokens` / `totalTokenCount`.
    total: Option<u64>,
    /// A family whose input count leaves the cache tokens out (Anthropic) reported cache
    /// fields, so `prompt` leaves them out.
    anthropic_cache: bool,
}

/// Streaming usage extractor for one response body.
#[derive(Debug)]
pub struct UsageTap {
    /// Finds the usage objects.
    tap: ObjectTap,
    /// For `application/vnd.amazon.eventstream` bodies: the message payloads, each read by a
    /// fresh tap.
    events: Option<super::bedrock::EventStreamUsage>,
    /// Counts so far.
    raw: Raw,
    /// A usage object with at least one count was seen.
    found: bool,
}

impl UsageTap {
    /// A tap for a response with this `Content-Type` (`text/event-stream` means SSE).
    pub fn new(content_type: Option<&str>) -> UsageTap {
        let sse = content_type.is_some_and(|c| {
            c.split(';')
                .next()
                .is_some_and(|m| m.trim().eq_ignore_ascii_case("text/event-stream"))
        });
        let events = content_type
            .and_then(|c| c.split(';').next())
            .is_some_and(|m| m.trim().eq_ignore_ascii_case(EVENT_STREAM))
            .then(super::bedrock::EventStreamUsage::default);
        UsageTap {
            tap: ObjectTap::new(USAGE_KEYS, sse),
            events,
            raw: Raw::default(),
            found: false,
        }
    }

    /// Scans the next chunk of the body.
    pub fn feed(&mut self, chunk: &[u8]) {
        let UsageTap {
            tap,
            events,
            raw,
            found,
        } = self;
        match events {
            Some(events) => events.feed(chunk, &mut |payload| {
                ObjectTap::new(USAGE_KEYS, false).feed(payload, &mut |o| merge(raw, found, o))
            }),
            None => tap.feed(chunk, &mut |object| merge(raw, found, object)),
        }
    }

    /// The usage seen, or `None` when the body reported none.
    pub fn finish(self) -> Option<Usage> {
        if !self.found {
            return None;
        }
        let r = self.raw;
        let add = |a: Option<u64>, b: Option<u64>| match (a, b) {
            (None, None) => None,
            (a, b) => Some(a.unwrap_or(0).saturating_add(b.unwrap_or(0))),
        };
        let mut input = add(r.prompt, r.tool_prompt);
        if r.anthropic_cache {
            input = add(add(input, r.cache_read), r.cache_write);
        }
        let output = add(r.output, r.thoughts);
        let total = match (input, output) {
            (Some(i), Some(o)) => Some(i.saturating_add(o)),
            _ => r.total,
        };
        Some(Usage {
            input_tokens: input,
            cached_input_tokens: r.cache_read,
            cache_write_tokens: r.cache_write,
            output_tokens: output,
            total_tokens: total,
        })
    }

    #[cfg(test)]
    fn buffered(&self) -> usize {
        self.tap.buffered()
    }

    #[cfg(test)]
    fn byte(&mut self, b: u8) {
        let UsageTap {
            tap, raw, found, ..
        } = self;
        tap.byte(b, &mut |object| merge(raw, found, object));
    }
}

/// Folds one usage object into `raw`: later reports replace earlier ones field by field.
fn merge(raw: &mut Raw, found: &mut bool, object: &[u8]) {
    let Ok(serde_json::Value::Object(map)) = serde_json::from_slice(object) else {
        return;
    };
    let get = |pick: &dyn Fn(&UsageFields) -> &'static [&'static str]| {
        FAMILIES
            .iter()
            .flat_map(|f| pick(f).iter())
            .find_map(|n| map.get(*n)?.as_u64())
    };
    let prompt = get(&|f| f.input);
    let output = get(&|f| f.output);
    let total = get(&|f| f.total);
    if prompt.is_none() && output.is_none() && total.is_none() {
        return;
    }
    *found = true;
    let mut cache_outside_input = false;
    let mut cache_read = None;
    for f in FAMILIES {
        let flat = f.cache_read.iter().find_map(|n| map.get(*n)?.as_u64());
        let nested = || {
            f.cache_read_nested
                .iter()
                .find_map(|(o, i)| map.get(*o)?.as_object()?.get(*i)?.as_u64())
        };
        let write = f.cache_write.iter().find_map(|n| map.get(*n)?.as_u64());
        if f.cache_outside_input && (flat.is_some() || write.is_some()) {
            cache_outside_input = true;
        }
        if cache_read.is_none() {
            cache_read = flat.or_else(nested);
        }
    }
    let cache_write = get(&|f| f.cache_write);
    if cache_outside_input {
        raw.anthropic_cache = true;
    }
    for (slot, value) in [
        (&mut raw.prompt, prompt),
        (&mut raw.tool_prompt, get(&|f| f.extra_input)),
        (&mut raw.cache_read, cache_read),
        (&mut raw.cache_write, cache_write),
        (&mut raw.output, output),
        (&mut raw.thoughts, get(&|f| f.extra_output)),
        (&mut raw.total, total),
    ] {
        if value.is_some() {
            *slot = value;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::json_scan::{MAX_CAPTURE, MAX_KEY};

    const OPENAI_JSON: &str = concat!(
        r#"{"id":"chatcmpl-1","object":"chat.completion","choices":[{"index":0,"#,
        r#""message":{"role":"assistant","#,
        r#""content":"the word \"usage\": {\"prompt_tokens\": 999} is just text"}}],"#,
        r#""usage":{"prompt_tokens":12,"completion_tokens":34,"total_tokens":46,"#,
        r#""completion_tokens_details":{"reasoning_tokens":0}}}"#,
    );

    const OPENAI_SSE: &str = "data: {\"id\":\"c1\",\"choices\":[{\"delta\":{\"content\":\"Hi\"}}]\
    ,\"usage\":null}\n\n\
data: {\"id\":\"c1\",\"choices\":[{\"delta\":{},\"finish_reason\":\"stop\"}],\"usage\":null}\n\n\
data: {\"id\":\"c1\",\"choices\":[],\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":3,\
    \"total_tokens\":10}}\n\n\
data: [DONE]\n\n";

    const ANTHROPIC_JSON: &str = concat!(
        r#"{"id":"msg_1","type":"message","role":"assistant","content":[{"type":"text","#,
        r#""text":"Hello"}],"model":"claude-sonnet-4","stop_reason":"end_turn","#,
        r#""usage":{"input_tokens":25,"output_tokens":11}}"#,
    );

    const ANTHROPIC_SSE: &str = "event: message_start\n\
data: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"type\":\"message\",\"role\":\
    \"assistant\",\"content\":[],\"usage\":{\"input_tokens\":25,\"output_tokens\":1}}}\n\n\
event: content_block_delta\n\
data: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\
    \"usage\"}}\n\n\
event: message_delta\n\
data: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\
    \"output_tokens\":15}}\n\n\
event: message_stop\n\
data: {\"type\":\"message_stop\"}\n\n";

    const GEMINI_JSON: &str = concat!(
        r#"{"candidates":[],"usageMetadata":{"promptTokenCount":4,"candidatesTokenCount":6,"#,
        r#""totalTokenCount":10}}"#,
    );

    fn run(ct: Option<&str>, chunks: &[&[u8]]) -> Option<Usage> {
        let mut tap = UsageTap::new(ct);
        for c in chunks {
            tap.feed(c);
        }
        tap.finish()
    }

    /// Same answer whole, split in two at every offset, and fed one byte at a time.
    fn check_every_split(ct: Option<&str>, body: &str, want: Usage) {
        let b = body.as_bytes();
        assert_eq!(run(ct, &[b]), Some(want), "whole");
        for i in 0..=b.len() {
            assert_eq!(run(ct, &[&b[..i], &b[i..]]), Some(want), "split at {i}");
        }
        let bytes: Vec<&[u8]> = b.chunks(1).collect();
        assert_eq!(run(ct, &bytes), Some(want), "byte by byte");
    }

    fn usage(i: u64, o: u64, t: u64) -> Usage {
        Usage {
            input_tokens: Some(i),
            output_tokens: Some(o),
            total_tokens: Some(t),
            ..Usage::default()
        }
    }

    /// Input, cached input, cache writes, output; total = input + output.
    fn full(i: u64, cached: Option<u64>, write: Option<u64>, o: u64) -> Usage {
        Usage {
            input_tokens: Some(i),
            cached_input_tokens: cached,
            cache_write_tokens: write,
            output_tokens: Some(o),
            total_tokens: Some(i + o),
        }
    }

    const OPENAI_CACHED_JSON: &str = concat!(
        r#"{"id":"chatcmpl-2","object":"chat.completion","model":"o3","#,
        r#""choices":[{"index":0,"message":{"role":"assistant","content":"ok"}}],"#,
        r#""usage":{"prompt_tokens":11007,"completion_tokens":50,"total_tokens":11057,"#,
        r#""prompt_tokens_details":{"cached_tokens":9800,"audio_tokens":0},"#,
        r#""completion_tokens_details":{"reasoning_tokens":30,"audio_tokens":0,"#,
        r#""accepted_prediction_tokens":0,"rejected_prediction_tokens":0}}}"#,
    );

    const OPENAI_CACHED_SSE: &str = "data: {\"id\":\"c2\",\"choices\":[{\"index\":0,\"delta\":{\
    \"content\":\"ok\"}}],\"usage\":null}\n\n\
data: {\"id\":\"c2\",\"choices\":[],\"usage\":{\"prompt_tokens\":11007,\"completion_tokens\":50,\
    \"total_tokens\":11057,\"prompt_tokens_details\":{\"cached_tokens\":9800},\
    \"completion_tokens_details\":{\"reasoning_tokens\":30}}}\n\n\
data: [DONE]\n\n";

    const RESPONSES_JSON: &str = concat!(
        r#"{"id":"resp_1","object":"response","status":"completed","model":"gpt-5","#,
        r#""output":[{"type":"message","content":[{"type":"output_text","text":"usage"}]}],"#,
        r#""usage":{"input_tokens":11007,"input_tokens_details":{"cached_tokens":9800},"#,
        r#""output_tokens":50,"output_tokens_details":{"reasoning_tokens":30},"#,
        r#""total_tokens":11057}}"#,
    );

    const RESPONSES_SSE: &str = "event: response.created\n\
data: {\"type\":\"response.created\",\"response\":{\"id\":\"resp_1\",\"status\":\"in_progress\",\
    \"usage\":null}}\n\n\
event: response.output_text.delta\n\
data: {\"type\":\"response.output_text.delta\",\"delta\":\"\\\"usage\\\": {\
    \\\"input_tokens\\\": 5}\"}\n\n\
event: response.completed\n\
data: {\"type\":\"response.completed\",\"response\":{\"id\":\"resp_1\",\"status\":\"completed\",\
    \"usage\":{\"input_tokens\":11007,\"input_tokens_details\":{\"cached_tokens\":9800},\
    \"output_tokens\":50,\"output_tokens_details\":{\"reasoning_tokens\":30},\"total_tokens\":\
    11057}}}\n\n";

    const ANTHROPIC_CACHED_JSON: &str = concat!(
        r#"{"id":"msg_2","type":"message","role":"assistant","content":[{"type":"text","#,
        r#""text":"Hi"}],"model":"claude-sonnet-4-5","usage":{"input_tokens":7,"#,
        r#""cache_creation_input_tokens":1200,"cache_read_input_tokens":9800,"#,
        r#""cache_creation":{"ephemeral_5m_input_tokens":1200,"#,
        r#""ephemeral_1h_input_tokens":0},"output_tokens":50,"service_tier":"standard"}}"#,
    );

    const ANTHROPIC_CACHED_SSE: &str = "event: message_start\n\
data: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_2\",\"content\":[],\"usage\":{\
    \"input_tokens\":7,\"cache_creation_input_tokens\":1200,\"cache_read_input_tokens\":9800,\
    \"output_tokens\":1}}}\n\n\
event: content_block_delta\n\
data: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\
    \"Hi\"}}\n\n\
event: message_delta\n\
data: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\
    \"output_tokens\":50}}\n\n\
event: message_stop\n\
data: {\"type\":\"message_stop\"}\n\n";

    const GEMINI_CACHED_JSON: &str = concat!(
        r#"{"candidates":[{"content":{"parts":[{"text":"ok"}],"role":"model"}}],"#,
        r#""usageMetadata":{"promptTokenCount":11000,"cachedContentTokenCount":9800,"#,
        r#""candidatesTokenCount":20,"thoughtsTokenCount":30,"toolUsePromptTokenCount":7,"#,
        r#""totalTokenCount":11057},"modelVersion":"gemini-2.5-pro"}"#,
    );

    /// `streamGenerateContent` without `alt=sse` streams a JSON array whose every element
    /// repeats the running counts; with `alt=sse` each element is an event.
    const GEMINI_STREAM_ARRAY: &str = "[{\"candidates\":[{\"content\":{\"parts\":[{\"text\":\
    \"o\"}]}}],\"usageMetadata\":{\"promptTokenCount\":11000,\"cachedContentTokenCount\":9800,\
    \"toolUsePromptTokenCount\":7}}\r\n,{\"candidates\":[{\"content\":{\"parts\":[{\"text\":\
    \"k\"}]}}],\"usageMetadata\":{\"promptTokenCount\":11000,\"cachedContentTokenCount\":9800,\
    \"candidatesTokenCount\":20,\"thoughtsTokenCount\":30,\"toolUsePromptTokenCount\":7,\
    \"totalTokenCount\":11057}}]";

    const GEMINI_SSE: &str = "data: {\"candidates\":[{\"content\":{\"parts\":[{\"text\":\"o\"}]}}\
    ],\"usageMetadata\":{\"promptTokenCount\":11000,\"cachedContentTokenCount\":9800,\
    \"toolUsePromptTokenCount\":7,\"thoughtsTokenCount\":30,\"totalTokenCount\":11037}}\r\n\r\n\
data: {\"candidates\":[{\"content\":{\"parts\":[{\"text\":\"k\"}]}}],\"usageMetadata\":{\
    \"promptTokenCount\":11000,\"cachedContentTokenCount\":9800,\"candidatesTokenCount\":20,\
    \"thoughtsTokenCount\":30,\"toolUsePromptTokenCount\":7,\"totalTokenCount\":11057}}\r\n\r\n";

    /// The same prompt (11,007 tokens, 9,800 of them from the cache) and answer (50 tokens,
    /// 30 of them reasoning) as every family reports it, JSON and streamed, whole, split at
    /// every byte and byte by byte: the normalised counts agree.
    #[test]
    fn every_family_counts_cached_and_reasoning_tokens_the_same_way() {
        let openai = full(11007, Some(9800), None, 50);
        let anthropic = full(11007, Some(9800), Some(1200), 50);
        let gemini = full(11007, Some(9800), None, 50);
        for (name, ct, body, want) in [
            (
                "openai json",
                "application/json",
                OPENAI_CACHED_JSON,
                openai,
            ),
            ("openai sse", "text/event-stream", OPENAI_CACHED_SSE, openai),
            ("responses json", "application/json", RESPONSES_JSON, openai),
            ("responses sse", "text/event-stream", RESPONSES_SSE, openai),
            (
                "anthropic json",
                "application/json",
                ANTHROPIC_CACHED_JSON,
                anthropic,
            ),
            (
                "anthropic sse",
                "text/event-stream",
                ANTHROPIC_CACHED_SSE,
                anthropic,
            ),
            (
                "gemini json",
                "application/json",
                GEMINI_CACHED_JSON,
                gemini,
            ),
            (
                "gemini array",
                "application/json",
                GEMINI_STREAM_ARRAY,
                gemini,
            ),
            ("gemini sse", "text/event-stream", GEMINI_SSE, gemini),
        ] {
            eprintln!("{name}");
            check_every_split(Some(ct), body, want);
        }
    }

    /// Newer Anthropic streams repeat the cumulative input and cache counts in
    /// `message_delta`; they replace, never add to, the `message_start` figures.
    #[test]
    fn anthropic_cumulative_message_delta_is_not_counted_twice() {
        let sse = "event: message_start\n\
data: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":7,\
    \"cache_creation_input_tokens\":1200,\"cache_read_input_tokens\":9800,\"output_tokens\":1}}}\
    \n\n\
event: message_delta\n\
data: {\"type\":\"message_delta\",\"usage\":{\"input_tokens\":7,\"cache_creation_input_tokens\":\
    1200,\"cache_read_input_tokens\":9800,\"output_tokens\":50}}\n\n";
        check_every_split(
            Some("text/event-stream"),
            sse,
            full(11007, Some(9800), Some(1200), 50),
        );
    }

    #[test]
    fn openai_json() {
        check_every_split(Some("application/json"), OPENAI_JSON, usage(12, 34, 46));
    }

    #[test]
    fn openai_sse_final_usage_chunk() {
        check_every_split(
            Some("text/event-stream; charset=utf-8"),
            OPENAI_SSE,
            usage(7, 3, 10),
        );
    }

    #[test]
    fn anthropic_json() {
        check_every_split(Some("application/json"), ANTHROPIC_JSON, usage(25, 11, 36));
    }

    #[test]
    fn anthropic_sse_combines_message_start_and_message_delta() {
        check_every_split(Some("text/event-stream"), ANTHROPIC_SSE, usage(25, 15, 40));
    }

    #[test]
    fn gemini_usage_metadata() {
        check_every_split(None, GEMINI_JSON, usage(4, 6, 10));
    }

    #[test]
    fn garbage_and_bodies_without_usage_give_none() {
        let cases: &[&[u8]] = &[
            b"",
            b"not json at all",
            b"\xff\xfe\x00\x01{{{{\"",
            br#"{"usage": null}"#,
            br#"{"usage": {"prompt_tokens": "many"}}"#,
            br#"{"usage": {"prompt_tokens": 5"#,
            br#"{"usage": 5}"#,
            br#"{"note": "usage"}"#,
            br#"{"usage": {"unrelated": 1}}"#,
            br#"}}}}"usage":{}}}"#,
        ];
        for c in cases {
            assert_eq!(run(Some("application/json"), &[c]), None, "{c:?}");
            assert_eq!(run(Some("text/event-stream"), &[c]), None, "{c:?}");
        }
        // A broken SSE event does not stop a later good one from counting.
        let sse = "data: {\"a\":\"unterminated\ndata: {\"usage\":{\"input_tokens\":1,\
    \"output_tokens\":2}}\n\n";
        assert_eq!(
            run(Some("text/event-stream"), &[sse.as_bytes()]),
            Some(usage(1, 2, 3))
        );
    }

    /// The string-interior skip in `feed` must leave the tap exactly where stepping every
    /// byte would: compared after every chunk on random bodies built from the bytes that
    /// matter (quotes, escapes, newlines, braces, long runs and keys around `MAX_KEY`).
    #[test]
    fn feed_matches_stepping_every_byte() {
        const PIECES: &[&[u8]] = &[
            b"\"",
            b"\\",
            b"\n",
            b"{",
            b"}",
            b":",
            b" ",
            b"usage",
            b"usageMetadata",
            b"\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":4}",
            b"\"input_tokens\":9",
            b"abcdefghijklmnop",
            b"q",
            b"0123456789012345678",
        ];
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move |n: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % n as u64) as usize
        };
        for round in 0..2000 {
            let mut body = Vec::new();
            for _ in 0..next(60) {
                body.extend_from_slice(PIECES[next(PIECES.len())]);
            }
            let ct = if round % 2 == 0 {
                "text/event-stream"
            } else {
                "application/json"
            };
            let (mut fast, mut slow) = (UsageTap::new(Some(ct)), UsageTap::new(Some(ct)));
            let mut rest = body.as_slice();
            while !rest.is_empty() {
                let (chunk, tail) = rest.split_at(1 + next(rest.len()));
                fast.feed(chunk);
                chunk.iter().for_each(|&b| slow.byte(b));
                assert_eq!(format!("{fast:?}"), format!("{slow:?}"), "{body:?}");
                rest = tail;
            }
            assert_eq!(fast.finish(), slow.finish(), "{body:?}");
        }
    }

    #[test]
    fn huge_bodies_use_bounded_memory() {
        // 32 MiB of content with no usage, in 64 KiB chunks.
        let mut tap = UsageTap::new(Some("application/json"));
        tap.feed(br#"{"data":""#);
        let chunk = vec![b'x'; 64 * 1024];
        for _ in 0..512 {
            tap.feed(&chunk);
            assert!(tap.buffered() <= 2 * MAX_CAPTURE + MAX_KEY);
        }
        tap.feed(br#""}"#);
        assert_eq!(tap.finish(), None);

        // A "usage" object that never ends is dropped at the cap, not buffered whole.
        let mut tap = UsageTap::new(Some("application/json"));
        tap.feed(br#"{"usage":{"pad":""#);
        for _ in 0..64 {
            tap.feed(&chunk);
            assert!(tap.buffered() <= 2 * MAX_CAPTURE + MAX_KEY);
        }
        assert_eq!(tap.finish(), None);
    }

    /// Bedrock: Converse JSON, a ConverseStream `metadata` event, and the invocation metrics in
    /// the last InvokeModel stream chunk (base64 inside the event payload), at every split.
    #[test]
    fn bedrock_converse_and_event_streams() {
        use base64::Engine;
        let converse = concat!(
            r#"{"output":{"message":{"role":"assistant","content":[{"text":"usage"}]}},"#,
            r#""stopReason":"end_turn","usage":{"inputTokens":7,"outputTokens":50,"#,
            r#""totalTokens":11057,"cacheReadInputTokens":9800,"cacheWriteInputTokens":1200},"#,
            r#""metrics":{"latencyMs":12}}"#,
        );
        let want = full(11007, Some(9800), Some(1200), 50);
        check_every_split(Some("application/json"), converse, want);

        let msg = crate::providers::bedrock::tests_support::message;
        let mut stream = msg("messageStart", br#"{"role":"assistant"}"#);
        stream.extend(msg(
            "contentBlockDelta",
            br#"{"contentBlockIndex":0,"delta":{"text":"\"usage\":{\"inputTokens\":1}"}}"#,
        ));
        stream.extend(msg(
            "metadata",
            concat!(
                r#"{"usage":{"inputTokens":7,"outputTokens":50,"totalTokens":11057,"#,
                r#""cacheReadInputTokens":9800,"cacheWriteInputTokens":1200},"#,
                r#""metrics":{"latencyMs":3}}"#
            )
            .as_bytes(),
        ));
        let ct = Some("application/vnd.amazon.eventstream");
        for cut in 0..=stream.len() {
            assert_eq!(
                run(ct, &[&stream[..cut], &stream[cut..]]),
                Some(want),
                "{cut}"
            );
        }

        let last = concat!(
            r#"{"type":"message_stop","amazon-bedrock-invocationMetrics":{"#,
            r#""inputTokenCount":7,"outputTokenCount":50,"invocationLatency":9,"#,
            r#""cacheReadInputTokenCount":9800,"cacheWriteInputTokenCount":1200}}"#
        );
        let b64 = base64::engine::general_purpose::STANDARD.encode(last);
        let mut stream = msg("chunk", br#"{"bytes":"eyJ0eXBlIjoibWVzc2FnZV9zdGFydCJ9"}"#);
        stream.extend(msg("chunk", format!(r#"{{"bytes":"{b64}"}}"#).as_bytes()));
        for cut in 0..=stream.len() {
            assert_eq!(
                run(ct, &[&stream[..cut], &stream[cut..]]),
                Some(want),
                "{cut}"
            );
        }
        // The same bytes read as JSON find nothing.
        assert_eq!(run(Some("application/json"), &[&stream]), None);
    }
}

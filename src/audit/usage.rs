//! Token usage read from a provider's response as it streams past, for `request.completed`.
//!
//! [`UsageTap`] scans the bytes once, in any chunking, without buffering the body: it keeps
//! only the few bytes of the current object key and, once it meets a `"usage"` (OpenAI,
//! Anthropic) or `"usageMetadata"` (Gemini) key, the object that follows (capped). Later usage
//! objects update earlier ones field by field, which is how Anthropic's stream reports input
//! tokens in `message_start` and output tokens in `message_delta`, and how OpenAI's final
//! stream chunk carries the totals. It never fails: anything it does not understand yields
//! `None`.

use serde::{Deserialize, Serialize};

/// Largest usage object kept; real ones are a few hundred bytes.
const MAX_CAPTURE: usize = 4096;
/// Longest key remembered while looking for `usage`.
const MAX_KEY: usize = 16;

/// Token counts the provider reported.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Prompt / input tokens.
    pub input_tokens: Option<u64>,
    /// Completion / output tokens.
    pub output_tokens: Option<u64>,
    /// Total tokens (reported, or input + output).
    pub total_tokens: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pending {
    /// Nothing of interest just happened.
    None,
    /// A string that could be the `usage` key just ended.
    UsageKey,
    /// `"usage":` seen; an object may follow.
    ExpectObject,
}

#[derive(Debug)]
enum State {
    Outside,
    InString {
        escaped: bool,
    },
    Capture {
        depth: u32,
        in_string: bool,
        escaped: bool,
    },
}

/// Streaming usage extractor for one response body.
#[derive(Debug)]
pub struct UsageTap {
    /// Newlines end an event: state is reset there so one broken event cannot swallow the
    /// rest of the stream.
    sse: bool,
    state: State,
    pending: Pending,
    key: Vec<u8>,
    key_ok: bool,
    capture: Vec<u8>,
    usage: Usage,
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
        UsageTap {
            sse,
            state: State::Outside,
            pending: Pending::None,
            key: Vec::with_capacity(MAX_KEY),
            key_ok: false,
            capture: Vec::new(),
            usage: Usage::default(),
            found: false,
        }
    }

    /// Scans the next chunk of the body.
    pub fn feed(&mut self, mut chunk: &[u8]) {
        while let Some((&b, rest)) = chunk.split_first() {
            self.byte(b);
            chunk = rest;
            if matches!(self.state, State::InString { escaped: false }) {
                chunk = self.skip_string_interior(chunk);
            }
        }
    }

    /// Inside a string only `"`, `\` and (for SSE) a newline change the state; every other
    /// byte just extends the key being remembered. Skips to the next of those three, so a long
    /// string value costs one vectorised search instead of a state step per byte.
    fn skip_string_interior<'a>(&mut self, chunk: &'a [u8]) -> &'a [u8] {
        let end = memchr::memchr3(b'"', b'\\', b'\n', chunk).unwrap_or(chunk.len());
        let (plain, rest) = chunk.split_at(end);
        let room = MAX_KEY - self.key.len();
        self.key.extend_from_slice(&plain[..plain.len().min(room)]);
        if plain.len() > room {
            self.key_ok = false;
        }
        rest
    }

    /// The usage seen, or `None` when the body reported none.
    pub fn finish(self) -> Option<Usage> {
        if !self.found {
            return None;
        }
        let mut u = self.usage;
        if u.total_tokens.is_none()
            && let (Some(i), Some(o)) = (u.input_tokens, u.output_tokens)
        {
            u.total_tokens = Some(i.saturating_add(o));
        }
        Some(u)
    }

    #[cfg(test)]
    fn buffered(&self) -> usize {
        self.capture.capacity() + self.key.capacity()
    }

    fn reset(&mut self) {
        self.state = State::Outside;
        self.pending = Pending::None;
        self.capture = Vec::new();
    }

    fn byte(&mut self, b: u8) {
        if self.sse && b == b'\n' {
            self.reset();
            return;
        }
        match &mut self.state {
            State::Capture {
                depth,
                in_string,
                escaped,
            } => {
                self.capture.push(b);
                if *in_string {
                    if *escaped {
                        *escaped = false;
                    } else if b == b'\\' {
                        *escaped = true;
                    } else if b == b'"' {
                        *in_string = false;
                    }
                } else if b == b'"' {
                    *in_string = true;
                } else if b == b'{' {
                    *depth += 1;
                } else if b == b'}' {
                    *depth -= 1;
                    if *depth == 0 {
                        let object = std::mem::take(&mut self.capture);
                        self.reset();
                        self.merge(&object);
                        return;
                    }
                }
                if self.capture.len() > MAX_CAPTURE {
                    self.reset();
                }
            }
            State::InString { escaped } => {
                if *escaped {
                    *escaped = false;
                    self.key_ok = false;
                } else if b == b'\\' {
                    *escaped = true;
                } else if b == b'"' {
                    self.state = State::Outside;
                    self.pending = if self.key_ok
                        && matches!(self.key.as_slice(), b"usage" | b"usageMetadata")
                    {
                        Pending::UsageKey
                    } else {
                        Pending::None
                    };
                } else if self.key.len() < MAX_KEY {
                    self.key.push(b);
                } else {
                    self.key_ok = false;
                }
            }
            State::Outside => match b {
                b' ' | b'\t' | b'\r' | b'\n' => {}
                b'"' => {
                    self.state = State::InString { escaped: false };
                    self.key.clear();
                    self.key_ok = true;
                    self.pending = Pending::None;
                }
                b':' if self.pending == Pending::UsageKey => self.pending = Pending::ExpectObject,
                b'{' if self.pending == Pending::ExpectObject => {
                    self.pending = Pending::None;
                    self.capture.clear();
                    self.capture.push(b'{');
                    self.state = State::Capture {
                        depth: 1,
                        in_string: false,
                        escaped: false,
                    };
                }
                _ => self.pending = Pending::None,
            },
        }
    }

    fn merge(&mut self, object: &[u8]) {
        let Ok(serde_json::Value::Object(map)) = serde_json::from_slice(object) else {
            return;
        };
        let get = |names: &[&str]| names.iter().find_map(|n| map.get(*n)?.as_u64());
        let input = get(&["input_tokens", "prompt_tokens", "promptTokenCount"]);
        let output = get(&["output_tokens", "completion_tokens", "candidatesTokenCount"]);
        let total = get(&["total_tokens", "totalTokenCount"]);
        if input.is_none() && output.is_none() && total.is_none() {
            return;
        }
        self.found = true;
        if input.is_some() {
            self.usage.input_tokens = input;
        }
        if output.is_some() {
            self.usage.output_tokens = output;
        }
        if total.is_some() {
            self.usage.total_tokens = total;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OPENAI_JSON: &str = r#"{"id":"chatcmpl-1","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"the word \"usage\": {\"prompt_tokens\": 999} is just text"}}],"usage":{"prompt_tokens":12,"completion_tokens":34,"total_tokens":46,"completion_tokens_details":{"reasoning_tokens":0}}}"#;

    const OPENAI_SSE: &str = "data: {\"id\":\"c1\",\"choices\":[{\"delta\":{\"content\":\"Hi\"}}],\"usage\":null}\n\n\
data: {\"id\":\"c1\",\"choices\":[{\"delta\":{},\"finish_reason\":\"stop\"}],\"usage\":null}\n\n\
data: {\"id\":\"c1\",\"choices\":[],\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":3,\"total_tokens\":10}}\n\n\
data: [DONE]\n\n";

    const ANTHROPIC_JSON: &str = r#"{"id":"msg_1","type":"message","role":"assistant","content":[{"type":"text","text":"Hello"}],"model":"claude-sonnet-4","stop_reason":"end_turn","usage":{"input_tokens":25,"output_tokens":11}}"#;

    const ANTHROPIC_SSE: &str = "event: message_start\n\
data: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"type\":\"message\",\"role\":\"assistant\",\"content\":[],\"usage\":{\"input_tokens\":25,\"output_tokens\":1}}}\n\n\
event: content_block_delta\n\
data: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"usage\"}}\n\n\
event: message_delta\n\
data: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":15}}\n\n\
event: message_stop\n\
data: {\"type\":\"message_stop\"}\n\n";

    const GEMINI_JSON: &str = r#"{"candidates":[],"usageMetadata":{"promptTokenCount":4,"candidatesTokenCount":6,"totalTokenCount":10}}"#;

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
        }
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
        let sse = "data: {\"a\":\"unterminated\ndata: {\"usage\":{\"input_tokens\":1,\"output_tokens\":2}}\n\n";
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
}

//! The Amazon Bedrock family (Bedrock Runtime API): the model id is the path segment after
//! `/model/` (`/model/{modelId}/(invoke|invoke-with-response-stream|converse|converse-stream)`),
//! percent-decoded because the AWS SDKs encode the `:` of ids like
//! `anthropic.claude-3-5-sonnet-20240620-v1:0`; requests are signed with SigV4 (signing name
//! `bedrock`, the target's `region`); usage comes from the Converse `usage` object
//! (`inputTokens`, `outputTokens`, `cacheReadInputTokens`, `cacheWriteInputTokens`) and from
//! the `amazon-bedrock-invocationMetrics` of an InvokeModel stream's last chunk; streams are
//! `application/vnd.amazon.eventstream` (the AWS event stream encoding: prelude with total and
//! header lengths and a CRC32, headers, payload, message CRC32), read by [`EventStreamUsage`].

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;

use super::usage::UsageFields;
use super::{Capability, ModelSource, TargetSpec, percent_decode};

/// SigV4 signing name of the Bedrock runtime.
pub const SIGNING_NAME: &str = "bedrock";

/// The read-only call `keyward cred test` makes: ListAsyncInvokes (`GET /async-invoke`), the
/// runtime API's only list call (it lists no models), one result per page. It needs the
/// `bedrock:ListAsyncInvokes` permission: a 403 may mean the key lacks that permission rather
/// than that it is wrong.
pub(super) const TEST_PATH: &str = "/async-invoke?maxResults=1";

/// What a bedrock target without a region is told.
pub(super) const REGION_HINT: &str = concat!(
    "needs region = \"us-east-1\" (or another AWS region): it signs requests for that region ",
    "and its base URL defaults to https://bedrock-runtime.{region}.amazonaws.com"
);

/// `https://bedrock-runtime.{region}.amazonaws.com`.
pub(super) fn default_base_url(region: &str) -> String {
    format!("https://bedrock-runtime.{region}.amazonaws.com")
}

/// The region and STS endpoint of a bedrock target, or `(field, reason)`.
pub(super) fn signing_config(spec: &TargetSpec) -> Result<(String, String), (&str, String)> {
    let region = spec
        .region
        .clone()
        .ok_or(("region", REGION_HINT.to_string()))?;
    let valid = (1..=32).contains(&region.len())
        && region
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if !valid {
        return Err((
            "region",
            format!("`{region}` is not an AWS region name (like us-east-1)"),
        ));
    }
    let sts = match &spec.sts_endpoint {
        None => format!("https://sts.{region}.amazonaws.com"),
        Some(url) => {
            let up = super::parse_base_url(url).map_err(|r| ("sts_endpoint", r))?;
            if !up.is_https() {
                return Err((
                    "sts_endpoint",
                    format!("`{url}` must be https://: STS answers carry session credentials"),
                ));
            }
            if !up.path_prefix.is_empty() {
                return Err(("sts_endpoint", format!("`{url}` must not have a path")));
            }
            url.trim_end_matches('/').to_string()
        }
    };
    Ok((region, sts))
}

/// Converse `usage` (`TokenUsage` in the Bedrock API reference): `inputTokens` leaves the cache
/// reads and writes out, as with Anthropic.
pub(super) const USAGE: UsageFields = UsageFields {
    keys: &["usage"],
    input: &["inputTokens"],
    output: &["outputTokens"],
    total: &["totalTokens"],
    cache_read: &["cacheReadInputTokens"],
    cache_read_nested: &[],
    cache_write: &["cacheWriteInputTokens"],
    extra_input: &[],
    extra_output: &[],
    cache_outside_input: true,
};

/// `amazon-bedrock-invocationMetrics` of the last InvokeModel stream chunk.
pub(super) const INVOCATION_METRICS: UsageFields = UsageFields {
    keys: &["amazon-bedrock-invocationMetrics"],
    input: &["inputTokenCount"],
    output: &["outputTokenCount"],
    total: &[],
    cache_read: &["cacheReadInputTokenCount"],
    cache_read_nested: &[],
    cache_write: &["cacheWriteInputTokenCount"],
    extra_input: &[],
    extra_output: &[],
    cache_outside_input: true,
};

/// The methods of `/model/{modelId}/{method}` that generate text.
const CHAT_METHODS: &[&str] = &[
    "invoke",
    "invoke-with-response-stream",
    "converse",
    "converse-stream",
];

/// The raw model-id segment of `/model/{modelId}/{method}`, and the method.
pub(crate) fn model_segment<'a>(segs: &[&'a str]) -> Option<(&'a str, &'a str)> {
    match segs {
        ["model", id, method] => Some((id, method)),
        _ => None,
    }
}

/// The model id, percent-decoded.
pub(super) fn model_source(segs: &[&str]) -> ModelSource {
    match model_segment(segs).and_then(|(id, _)| percent_decode(id)) {
        Some(id) => ModelSource::Path(id),
        None => ModelSource::Unknown,
    }
}

/// The capability of a path.
pub(super) fn capability(segs: &[&str]) -> Capability {
    match model_segment(segs) {
        Some((_, m)) if CHAT_METHODS.contains(&m) => Capability::Chat,
        Some((_, "count-tokens")) => Capability::Tokens,
        _ if segs.first() == Some(&"async-invoke") => Capability::Batches,
        _ => Capability::Other,
    }
}

// === event streams ===

/// Largest event-stream message whose payload is read for usage; larger ones pass through
/// unread (usage events are a few hundred bytes).
const MAX_MESSAGE: usize = 64 * 1024;

/// Reads the payloads of `application/vnd.amazon.eventstream` messages as they stream past, and
/// hands each one to a sink (for usage). InvokeModel stream chunks (`{"bytes":"<base64>"}`) are
/// handed over decoded. Messages are never held back: this only watches a copy of the bytes.
///
/// A message whose checksums fail (one the scrubber shortened by redacting a secret in it) is
/// dropped, and reading resumes at the next byte where a prelude's checksum holds, so the
/// messages after it (the `metadata` event with the usage) are still read.
#[derive(Debug, Default)]
pub struct EventStreamUsage {
    /// Bytes not yet consumed start at `start`.
    buf: Vec<u8>,
    /// Offset of the first unconsumed byte of `buf`.
    start: usize,
    /// Bytes of an over-long message still to skip.
    skip: usize,
}

/// Prelude length (total length, headers length, prelude CRC).
const PRELUDE: usize = 12;

impl EventStreamUsage {
    /// Feeds the next chunk; calls `sink` with each message's JSON payload.
    pub fn feed(&mut self, mut chunk: &[u8], sink: &mut dyn FnMut(&[u8])) {
        loop {
            if self.skip > 0 {
                let n = self.skip.min(chunk.len());
                self.skip -= n;
                chunk = &chunk[n..];
                if self.skip > 0 {
                    return;
                }
            }
            let need = self.parse(sink);
            if chunk.is_empty() || self.skip > 0 {
                if chunk.is_empty() {
                    return;
                }
                continue;
            }
            let n = need.min(chunk.len());
            self.buf.extend_from_slice(&chunk[..n]);
            chunk = &chunk[n..];
        }
    }

    /// Reads every complete message in the buffer; returns how many more bytes the next one
    /// needs (at least one).
    fn parse(&mut self, sink: &mut dyn FnMut(&[u8])) -> usize {
        loop {
            let pending = &self.buf[self.start..];
            if pending.len() < PRELUDE {
                let need = PRELUDE - pending.len();
                self.compact();
                return need;
            }
            let word = |i: usize| u32::from_be_bytes(pending[i..i + 4].try_into().expect("4"));
            let total = word(0) as usize;
            if total < 16 || crc32(&pending[..8]) != word(8) {
                // Not a message start: resynchronise one byte later.
                self.start += 1;
                continue;
            }
            if total > MAX_MESSAGE {
                self.skip = total - pending.len().min(total);
                self.start += pending.len().min(total);
                self.compact();
                return 1;
            }
            if pending.len() < total {
                let need = total - pending.len();
                self.compact();
                return need;
            }
            match message_payload(&pending[..total]) {
                Some(payload) => {
                    payload_json(payload, sink);
                    self.start += total;
                }
                None => self.start += 1,
            }
        }
    }

    /// Drops consumed bytes.
    fn compact(&mut self) {
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
    }
}

/// The payload of one complete message, if its prelude and message CRCs hold.
fn message_payload(message: &[u8]) -> Option<&[u8]> {
    let total = u32::from_be_bytes(message.get(..4)?.try_into().ok()?) as usize;
    let headers = u32::from_be_bytes(message.get(4..8)?.try_into().ok()?) as usize;
    let prelude_crc = u32::from_be_bytes(message.get(8..12)?.try_into().ok()?);
    if total != message.len() || 12 + headers + 4 > total {
        return None;
    }
    let crc = u32::from_be_bytes(message[total - 4..].try_into().ok()?);
    if crc32(&message[..8]) != prelude_crc || crc32(&message[..total - 4]) != crc {
        return None;
    }
    Some(&message[12 + headers..total - 4])
}

/// A payload as JSON for the usage reader: InvokeModel chunks carry the model's own JSON
/// base64-encoded in `bytes`.
fn payload_json(payload: &[u8], sink: &mut dyn FnMut(&[u8])) {
    #[derive(serde::Deserialize)]
    struct Chunk {
        bytes: String,
    }
    match serde_json::from_slice::<Chunk>(payload) {
        Ok(chunk) => {
            if let Ok(inner) = B64.decode(chunk.bytes.as_bytes()) {
                sink(&inner);
            }
        }
        Err(_) => sink(payload),
    }
}

/// Total length of an event-stream message from its 12-byte prelude, if the prelude's checksum
/// holds and the length can describe a message (at least prelude, header length fitting, and
/// message CRC).
pub(crate) fn prelude_total(prelude: &[u8]) -> Option<usize> {
    let word = |i: usize| Some(u32::from_be_bytes(prelude.get(i..i + 4)?.try_into().ok()?));
    let (total, headers, crc) = (word(0)? as usize, word(4)? as usize, word(8)?);
    (crc32(&prelude[..8]) == crc && total >= PRELUDE + 4 && PRELUDE + headers + 4 <= total)
        .then_some(total)
}

/// One header of an event-stream message: its name, value type (0-9) and the value's encoded
/// bytes (with the 2-byte length of types 6, byte array, and 7, string).
pub(crate) struct Header<'a> {
    /// Header name (1-255 bytes).
    pub name: &'a [u8],
    /// Value type: 0/1 true/false, 2 byte, 3 short, 4 integer, 5 long, 6 bytes, 7 string,
    /// 8 timestamp, 9 UUID.
    pub kind: u8,
    /// The encoded value as it follows the type byte.
    pub value: &'a [u8],
}

impl Header<'_> {
    /// The bytes of a byte-array or string value (after its length), or `None` for the other
    /// types, which hold no text.
    pub fn text(&self) -> Option<&[u8]> {
        matches!(self.kind, 6 | 7).then(|| &self.value[2..])
    }
}

/// The headers and payload of one complete message whose checksums hold.
pub(crate) fn split_message(message: &[u8]) -> Option<(Vec<Header<'_>>, &[u8])> {
    let payload = message_payload(message)?;
    let header_len = u32::from_be_bytes(message[4..8].try_into().ok()?) as usize;
    let mut rest = &message[PRELUDE..PRELUDE + header_len];
    let mut headers = Vec::new();
    while let Some((&name_len, after)) = rest.split_first() {
        let name = after.get(..usize::from(name_len))?;
        let (&kind, after) = after.get(usize::from(name_len)..)?.split_first()?;
        let len = match kind {
            0 | 1 => 0,
            2 => 1,
            3 => 2,
            4 => 4,
            5 | 8 => 8,
            9 => 16,
            6 | 7 => 2 + usize::from(u16::from_be_bytes(after.get(..2)?.try_into().ok()?)),
            _ => return None,
        };
        headers.push(Header {
            name,
            kind,
            value: after.get(..len)?,
        });
        rest = &after[len..];
    }
    Some((headers, payload))
}

/// Encodes one message: `headers` as (name, type, encoded value) and `payload`, with its
/// prelude and message checksums. `None` when a name or value is too long for the encoding.
pub(crate) fn encode_message(headers: &[(&[u8], u8, Vec<u8>)], payload: &[u8]) -> Option<Vec<u8>> {
    let mut head = Vec::new();
    for (name, kind, value) in headers {
        head.push(u8::try_from(name.len()).ok()?);
        head.extend_from_slice(name);
        head.push(*kind);
        head.extend_from_slice(value);
    }
    let total = u32::try_from(PRELUDE + head.len() + payload.len() + 4).ok()?;
    let mut m = Vec::with_capacity(total as usize);
    m.extend_from_slice(&total.to_be_bytes());
    m.extend_from_slice(&u32::try_from(head.len()).ok()?.to_be_bytes());
    let c = crc32(&m);
    m.extend_from_slice(&c.to_be_bytes());
    m.extend_from_slice(&head);
    m.extend_from_slice(payload);
    let c = crc32(&m);
    m.extend_from_slice(&c.to_be_bytes());
    Some(m)
}

/// The model output an InvokeModel stream chunk carries base64-encoded in `bytes`
/// (`{"bytes":"<base64>","p":"<padding>"}`), rewritten by `rewrite`: the chunk's JSON with the
/// re-encoded output, or `None` when the payload is not such a chunk or `rewrite` changes
/// nothing.
pub(crate) fn rewrite_chunk_bytes(
    payload: &[u8],
    rewrite: impl FnOnce(&[u8]) -> Option<Vec<u8>>,
) -> Option<Vec<u8>> {
    let mut chunk: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(payload).ok()?;
    let inner = B64.decode(chunk.get("bytes")?.as_str()?).ok()?;
    let rewritten = rewrite(&inner)?;
    chunk.insert("bytes".into(), B64.encode(rewritten).into());
    serde_json::to_vec(&chunk).ok()
}

/// CRC-32 (IEEE 802.3, the event stream checksum), table-driven or SIMD by `crc32fast`: every
/// message of a stream is checked, so a bit-at-a-time loop would sit on the streaming path.
fn crc32(bytes: &[u8]) -> u32 {
    crc32fast::hash(bytes)
}

/// Event-stream encoding for tests.
#[cfg(test)]
pub(crate) mod tests_support {
    use super::crc32;

    /// One event-stream message with string `:event-type` and `:message-type` headers.
    pub(crate) fn message(event: &str, payload: &[u8]) -> Vec<u8> {
        let mut headers = Vec::new();
        for (name, value) in [(":event-type", event), (":message-type", "event")] {
            headers.push(name.len() as u8);
            headers.extend_from_slice(name.as_bytes());
            headers.push(7);
            headers.extend_from_slice(&(value.len() as u16).to_be_bytes());
            headers.extend_from_slice(value.as_bytes());
        }
        let total = 12 + headers.len() + payload.len() + 4;
        let mut m = Vec::new();
        m.extend_from_slice(&(total as u32).to_be_bytes());
        m.extend_from_slice(&(headers.len() as u32).to_be_bytes());
        let c = crc32(&m);
        m.extend_from_slice(&c.to_be_bytes());
        m.extend_from_slice(&headers);
        m.extend_from_slice(payload);
        let c = crc32(&m);
        m.extend_from_slice(&c.to_be_bytes());
        m
    }
}

#[cfg(test)]
mod tests {
    use super::tests_support::message;
    use super::*;
    use crate::providers::{Capability, Family, ModelSource, capability, model_source};

    #[test]
    fn crc32_is_the_ieee_checksum() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32(b""), 0);
    }

    #[test]
    fn model_id_is_decoded_and_methods_are_chat() {
        let cases = [
            (
                "/model/anthropic.claude-3-5-sonnet-20240620-v1%3A0/converse",
                Some("anthropic.claude-3-5-sonnet-20240620-v1:0"),
                Capability::Chat,
            ),
            (
                "/model/us.anthropic.claude-3-7-sonnet-20250219-v1:0/converse-stream",
                Some("us.anthropic.claude-3-7-sonnet-20250219-v1:0"),
                Capability::Chat,
            ),
            (
                "/model/amazon.titan-text-express-v1/invoke",
                Some("amazon.titan-text-express-v1"),
                Capability::Chat,
            ),
            (
                "/model/meta.llama3-8b-instruct-v1%3A0/invoke-with-response-stream",
                Some("meta.llama3-8b-instruct-v1:0"),
                Capability::Chat,
            ),
            ("/model/x/count-tokens", Some("x"), Capability::Tokens),
            ("/async-invoke", None, Capability::Batches),
            ("/model/x", None, Capability::Other),
            ("/guardrail/g/version/1/apply", None, Capability::Other),
        ];
        for (path, model, cap) in cases {
            let got = match model_source(Family::Bedrock, path) {
                ModelSource::Path(m) => Some(m),
                ModelSource::Unknown => None,
                ModelSource::JsonBody => panic!("{path}: body"),
            };
            assert_eq!(got.as_deref(), model, "{path}");
            assert_eq!(capability(Family::Bedrock, path), cap, "{path}");
        }
    }

    fn payloads(stream: &[u8], cuts: &[usize]) -> Vec<Vec<u8>> {
        let mut r = EventStreamUsage::default();
        let mut out = Vec::new();
        let mut last = 0;
        for &c in cuts.iter().chain([&stream.len()]) {
            r.feed(&stream[last..c], &mut |p| out.push(p.to_vec()));
            last = c;
        }
        out
    }

    #[test]
    fn event_stream_payloads_are_read_at_every_split_and_chunks_decoded() {
        let inner =
            br#"{"type":"message_stop","amazon-bedrock-invocationMetrics":{"inputTokenCount":5}}"#;
        let chunk = format!(r#"{{"bytes":"{}"}}"#, B64.encode(inner));
        let mut stream = message("messageStart", br#"{"role":"assistant"}"#);
        stream.extend(message("chunk", chunk.as_bytes()));
        stream.extend(message("metadata", br#"{"usage":{"inputTokens":3}}"#));
        let want = vec![
            br#"{"role":"assistant"}"#.to_vec(),
            inner.to_vec(),
            br#"{"usage":{"inputTokens":3}}"#.to_vec(),
        ];
        for cut in 0..=stream.len() {
            assert_eq!(payloads(&stream, &[cut]), want, "cut at {cut}");
        }
        let bytes: Vec<usize> = (1..stream.len()).collect();
        assert_eq!(payloads(&stream, &bytes), want);
    }

    #[test]
    fn corrupt_or_huge_messages_are_skipped_without_buffering() {
        let mut bad = message("metadata", br#"{"usage":{"inputTokens":3}}"#);
        let n = bad.len();
        bad[n - 6] ^= 1;
        let good = message("metadata", br#"{"usage":{"inputTokens":4}}"#);
        let mut stream = bad.clone();
        stream.extend(&good);
        assert_eq!(
            payloads(&stream, &[]),
            vec![br#"{"usage":{"inputTokens":4}}"#.to_vec()]
        );

        let big = message("chunk", &vec![b'x'; MAX_MESSAGE * 2]);
        let mut r = EventStreamUsage::default();
        let mut seen = 0;
        for piece in big.chunks(1000) {
            r.feed(piece, &mut |_| seen += 1);
            assert!(r.buf.capacity() <= 1024, "{}", r.buf.capacity());
        }
        r.feed(&good, &mut |_| seen += 1);
        assert_eq!(seen, 1);

        let mut r = EventStreamUsage::default();
        r.feed(b"{\"usage\":{}}", &mut |_| seen += 100);
        assert_eq!(seen, 1, "JSON is not an event stream");

        // A message shortened by redaction: its checksums fail, the next one is still read.
        let mut short = message("contentBlockDelta", br#"{"delta":{"text":"SECRETSECRET"}}"#);
        let at = short.len() - 20;
        short.splice(at..at + 12, b"[R]".iter().copied());
        let mut stream = short;
        stream.extend(&good);
        for cut in 0..=stream.len() {
            assert_eq!(
                payloads(&stream, &[cut]),
                vec![br#"{"usage":{"inputTokens":4}}"#.to_vec()],
                "cut at {cut}"
            );
        }
    }
}

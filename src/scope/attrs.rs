//! Request attributes that scope decisions are made on: the capability a provider path
//! exercises and the model a request names, read per provider [`Family`] (README, "Targets"),
//! including an incremental scanner for the top-level `"model"` of a JSON body.
//!
//! `attrs` only reads what it is given: it must not buffer bodies, do I/O or decide whether a
//! request is allowed.

use std::fmt;
use std::str::FromStr;

use crate::providers::Family;

/// What a request does, in the vocabulary of the README ("Targets").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Capability {
    /// Chat-style generation (chat/completions, responses, messages, generateContent).
    Chat,
    /// Legacy text completions.
    Completions,
    /// Embeddings.
    Embeddings,
    /// Image generation and editing.
    Images,
    /// Speech and transcription.
    Audio,
    /// Moderation.
    Moderations,
    /// Listing or reading models.
    Models,
    /// File upload and management.
    Files,
    /// Batch jobs.
    Batches,
    /// Fine-tuning jobs.
    FineTuning,
    /// Token counting.
    Tokens,
    /// Anything else.
    Other,
}

/// Every capability, in vocabulary order.
pub const ALL_CAPABILITIES: [Capability; 12] = [
    Capability::Chat,
    Capability::Completions,
    Capability::Embeddings,
    Capability::Images,
    Capability::Audio,
    Capability::Moderations,
    Capability::Models,
    Capability::Files,
    Capability::Batches,
    Capability::FineTuning,
    Capability::Tokens,
    Capability::Other,
];

impl Capability {
    /// The vocabulary spelling (`fine_tuning`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Capability::Chat => "chat",
            Capability::Completions => "completions",
            Capability::Embeddings => "embeddings",
            Capability::Images => "images",
            Capability::Audio => "audio",
            Capability::Moderations => "moderations",
            Capability::Models => "models",
            Capability::Files => "files",
            Capability::Batches => "batches",
            Capability::FineTuning => "fine_tuning",
            Capability::Tokens => "tokens",
            Capability::Other => "other",
        }
    }
}

impl fmt::Display for Capability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A capability name outside the vocabulary.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown capability `{0}`: use one of chat, completions, embeddings, images, audio, \
     moderations, models, files, batches, fine_tuning, tokens, other"
)]
pub struct UnknownCapability(pub String);

impl FromStr for Capability {
    type Err = UnknownCapability;

    fn from_str(s: &str) -> Result<Capability, UnknownCapability> {
        ALL_CAPABILITIES
            .into_iter()
            .find(|c| c.as_str() == s)
            .ok_or_else(|| UnknownCapability(s.to_string()))
    }
}

// === capability and model from the path ===

/// Where a request's model is named, for a family and provider path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// In the path (Gemini model, Azure deployment).
    Path(String),
    /// In the JSON body's top-level `"model"`: feed the body to a [`ModelScanner`].
    JsonBody,
    /// This family or endpoint names no model.
    Unknown,
}

/// Splits a provider path into its non-empty segments.
fn segments(path: &str) -> Vec<&str> {
    path.split('/').filter(|s| !s.is_empty()).collect()
}

/// Gemini: `/{version}/models/{model}[:{method}]` (also `/{version}/tunedModels/...`), the
/// model percent-decoded. Returns `(model, method)`.
fn gemini_model_and_method<'a>(segs: &[&'a str]) -> Option<(String, Option<&'a str>)> {
    match segs {
        [_version, "models", rest] => {
            let (model, method) = match rest.split_once(':') {
                Some((m, meth)) => (m, Some(meth)),
                None => (*rest, None),
            };
            Some((percent_decode(model)?, method))
        }
        _ => None,
    }
}

/// Azure: `/openai/deployments/{deployment}/...`. Returns the decoded deployment and the rest.
fn azure_deployment<'a>(segs: &'a [&'a str]) -> Option<(String, &'a [&'a str])> {
    match segs {
        ["openai", "deployments", dep, rest @ ..] => Some((percent_decode(dep)?, rest)),
        _ => None,
    }
}

fn percent_decode(s: &str) -> Option<String> {
    let out = crate::proxy::route::percent_decode_once(s.as_bytes(), true, false)?;
    String::from_utf8(out).ok().filter(|m| !m.is_empty())
}

/// Where the model of a request to `provider_path` is found for `family`.
pub fn model_source(family: Family, provider_path: &str) -> ModelSource {
    let segs = segments(provider_path);
    match family {
        Family::OpenAi | Family::Anthropic => ModelSource::JsonBody,
        Family::Gemini => match gemini_model_and_method(&segs) {
            Some((model, _)) => ModelSource::Path(model),
            // Gemini's OpenAI-compatible endpoint takes the model in the body.
            None if segs.get(1) == Some(&"openai") => ModelSource::JsonBody,
            None => ModelSource::Unknown,
        },
        Family::Azure => match azure_deployment(&segs) {
            Some((dep, _)) => ModelSource::Path(dep),
            // The v1 API, responses and batches name the model in the body.
            None => ModelSource::JsonBody,
        },
        Family::None => ModelSource::Unknown,
    }
}

/// The model named in the path (Gemini model, Azure deployment), if this family puts it there.
pub fn model_from_path(family: Family, provider_path: &str) -> Option<String> {
    match model_source(family, provider_path) {
        ModelSource::Path(m) => Some(m),
        _ => None,
    }
}

/// The capability a request to `provider_path` exercises for `family`.
pub fn capability(family: Family, provider_path: &str) -> Capability {
    let segs = segments(provider_path);
    match family {
        Family::None => Capability::Other,
        Family::OpenAi | Family::Anthropic => rest_capability(&segs),
        Family::Gemini => {
            if let Some((_, method)) = gemini_model_and_method(&segs) {
                return match method {
                    None => Capability::Models,
                    Some(m) => gemini_method(m),
                };
            }
            if segs.get(1) == Some(&"openai") {
                return rest_capability(&segs[2..]);
            }
            match segs.as_slice() {
                [_, "models"] => Capability::Models,
                [_, "files", ..] | ["upload", _, "files", ..] => Capability::Files,
                [_, "batches", ..] => Capability::Batches,
                [_, "tunedModels", ..] => Capability::FineTuning,
                _ => Capability::Other,
            }
        }
        // The deployment name is chosen by the operator and may be any word, so it is never
        // read as a capability.
        Family::Azure => match azure_deployment(&segs) {
            Some((_, rest)) => rest_capability(rest),
            None => rest_capability(&segs),
        },
    }
}

fn gemini_method(method: &str) -> Capability {
    match method {
        "generateContent" | "streamGenerateContent" | "generateMessage" => Capability::Chat,
        "generateText" => Capability::Completions,
        "embedContent" | "batchEmbedContents" | "embedText" | "batchEmbedText" => {
            Capability::Embeddings
        }
        "countTokens" | "countMessageTokens" | "countTextTokens" => Capability::Tokens,
        "batchGenerateContent" | "asyncBatchEmbedContent" => Capability::Batches,
        _ => Capability::Other,
    }
}

/// REST-style paths (OpenAI, Anthropic, Azure after the deployment, Cohere, Mistral, ollama).
/// More specific words are checked first: `messages/count_tokens` is tokens, `messages/batches`
/// batches, `chat/moderations` moderations, `fim/completions` completions.
fn rest_capability(segs: &[&str]) -> Capability {
    let has = |words: &[&str]| segs.iter().any(|s| words.contains(s));
    if has(&["count_tokens", "tokenize", "detokenize"]) {
        Capability::Tokens
    } else if has(&["batches"]) {
        Capability::Batches
    } else if has(&["moderations"]) {
        Capability::Moderations
    } else if has(&["fine_tuning", "fine-tunes", "fine_tunes"]) {
        Capability::FineTuning
    } else if has(&["fim"]) {
        Capability::Completions
    } else if has(&["chat", "responses", "messages"]) {
        Capability::Chat
    } else if has(&["completions", "complete", "generate"]) {
        Capability::Completions
    } else if has(&["embeddings", "embed", "embedding"]) {
        Capability::Embeddings
    } else if has(&["images"]) {
        Capability::Images
    } else if has(&["audio"]) {
        Capability::Audio
    } else if has(&["files", "uploads"]) {
        Capability::Files
    } else if has(&["models", "tags"]) {
        Capability::Models
    } else {
        Capability::Other
    }
}

// === model from a JSON body ===

/// Longest model name the scanner keeps; a longer one makes the model unreadable.
pub const MAX_MODEL_LEN: usize = 256;

/// Deepest nesting the scanner follows; deeper bodies make the model unreadable.
const MAX_DEPTH: usize = 512;

/// What a [`ModelScanner`] knows after the bytes fed so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScanState {
    /// The top-level `"model"` has not been read yet; feed more.
    NeedMore,
    /// The top-level `"model"` is this string. Keep feeding the rest of the body before
    /// forwarding it: the verdict can still turn into [`ScanState::Ambiguous`].
    Found(String),
    /// The body names no usable model (not a JSON object, no top-level `"model"`, not a string,
    /// over [`MAX_MODEL_LEN`] bytes, or malformed before the model was read). Final.
    Absent,
    /// A model was found, but the body then named a second top-level `"model"` or stopped being
    /// valid JSON, so an upstream parser may read another model: the request must be aborted
    /// before the offending bytes are forwarded. Final.
    Ambiguous,
}

/// Which string is being read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StrKind {
    /// A key of the top-level object, compared against `model` as it is decoded.
    TopKey,
    /// A key of a nested object, skipped (a `:` follows it).
    NestedKey,
    /// The value of the top-level `"model"`, collected.
    Model,
    /// Any other string, validated and skipped.
    Skip,
}

/// Where inside a JSON number the scanner is (RFC 8259 §6 grammar).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Num {
    /// After `-`.
    Minus,
    /// After a leading `0`.
    Zero,
    /// In the integer digits.
    Int,
    /// After `.`.
    Dot,
    /// In the fraction digits.
    Frac,
    /// After `e`/`E`.
    Exp,
    /// After the exponent sign.
    ExpSign,
    /// In the exponent digits.
    ExpDigits,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lex {
    /// Before the first byte of the body.
    Start,
    /// After `{`: a key or `}`.
    KeyOrClose,
    /// After `,` in an object: a key.
    Key,
    /// After a key: `:`.
    Colon,
    /// A value is expected.
    Value,
    /// After `[`: a value or `]`.
    ValueOrClose,
    /// After a value: `,` or the closing bracket of the container.
    AfterValue,
    /// Inside a string.
    Str(StrKind),
    /// After `\` in a string.
    Escape(StrKind),
    /// Inside `\uXXXX`: digits read so far and their value.
    Unicode(StrKind, u8, u16),
    /// Inside a number.
    Number(Num),
    /// Inside `true`/`false`/`null`: the literal and how much of it matched.
    Literal(&'static [u8], u8),
    /// The top-level object is closed: only whitespace may follow.
    Done,
}

/// Finds the top-level `"model"` string of a JSON body fed in chunks of any size, without
/// buffering the body. It validates the JSON it skips, so a nested or quoted `"model"` is
/// never mistaken for the top-level one, and it keeps at most [`MAX_MODEL_LEN`] bytes and a
/// nesting stack of bounded depth.
#[derive(Debug, Clone)]
pub struct ModelScanner {
    /// Lexer state.
    lex: Lex,
    /// Open containers, `true` for an object.
    stack: Vec<bool>,
    /// How much of `model` the current top-level key has matched; `None` once it differs.
    key_match: Option<u8>,
    /// The key just read is the top-level `model`.
    key_is_model: bool,
    /// The model value being read (raw UTF-8 after escape decoding).
    value: Vec<u8>,
    /// A high surrogate waiting for its low half, inside the model value.
    high_surrogate: Option<u16>,
    /// The model, once its string has closed.
    found: Option<String>,
    /// A final verdict.
    finished: Option<ScanState>,
}

impl Default for ModelScanner {
    fn default() -> Self {
        ModelScanner::new()
    }
}

const MODEL: &[u8] = b"model";

/// How many leading bytes of `bytes` a string the scanner does not keep can pass over without
/// a state step: everything before the next `"`, `\` or control character (the last makes
/// the JSON invalid, so the step must see it).
fn skippable_string_bytes(bytes: &[u8]) -> usize {
    let run = memchr::memchr2(b'"', b'\\', bytes).unwrap_or(bytes.len());
    let plain = &bytes[..run];
    if plain.iter().fold(false, |ctl, &b| ctl | (b < 0x20)) {
        plain.iter().position(|&b| b < 0x20).unwrap_or(run)
    } else {
        run
    }
}

impl ModelScanner {
    /// A scanner at the start of a body.
    pub fn new() -> ModelScanner {
        ModelScanner {
            lex: Lex::Start,
            stack: Vec::new(),
            key_match: Some(0),
            key_is_model: false,
            value: Vec::new(),
            high_surrogate: None,
            found: None,
            finished: None,
        }
    }

    /// Feeds the next chunk of the body and reports what is known.
    pub fn feed(&mut self, chunk: &[u8]) -> ScanState {
        if let Some(done) = &self.finished {
            return done.clone();
        }
        let mut rest = chunk;
        while let Some((&b, tail)) = rest.split_first() {
            if let Err(verdict) = self.step(b) {
                self.finished = Some(verdict.clone());
                return verdict;
            }
            rest = tail;
            if let Lex::Str(StrKind::Skip | StrKind::NestedKey) = self.lex {
                rest = &rest[skippable_string_bytes(rest)..];
            }
        }
        self.current()
    }

    /// The body has ended: the final verdict. A model counts only if the JSON was complete.
    pub fn finish(&mut self) -> ScanState {
        if let Some(done) = &self.finished {
            return done.clone();
        }
        let verdict = match (&self.found, self.lex) {
            (Some(m), Lex::Done) => ScanState::Found(m.clone()),
            (Some(_), _) => ScanState::Ambiguous,
            (None, _) => ScanState::Absent,
        };
        self.finished = Some(verdict.clone());
        verdict
    }

    fn current(&self) -> ScanState {
        match &self.found {
            Some(m) => ScanState::Found(m.clone()),
            None => ScanState::NeedMore,
        }
    }

    /// The verdict when the body turns out not to be what the scanner can vouch for.
    fn bad(&self) -> ScanState {
        if self.found.is_some() {
            ScanState::Ambiguous
        } else {
            ScanState::Absent
        }
    }

    fn step(&mut self, b: u8) -> Result<(), ScanState> {
        let ws = matches!(b, b' ' | b'\t' | b'\n' | b'\r');
        match self.lex {
            Lex::Start => {
                if ws {
                } else if b == b'{' {
                    self.stack.push(true);
                    self.lex = Lex::KeyOrClose;
                } else {
                    return Err(ScanState::Absent);
                }
            }
            Lex::KeyOrClose | Lex::Key => {
                if ws {
                } else if b == b'"' {
                    self.begin_key();
                } else if b == b'}' && self.lex == Lex::KeyOrClose {
                    self.close()?;
                } else {
                    return Err(self.bad());
                }
            }
            Lex::Colon => {
                if ws {
                } else if b == b':' {
                    self.lex = Lex::Value;
                } else {
                    return Err(self.bad());
                }
            }
            Lex::Value | Lex::ValueOrClose => {
                if ws {
                } else if b == b']' && self.lex == Lex::ValueOrClose {
                    self.close()?;
                } else {
                    self.begin_value(b)?;
                }
            }
            Lex::AfterValue => {
                let in_object = *self.stack.last().expect("a container is open");
                if ws {
                } else if b == b',' {
                    self.lex = if in_object { Lex::Key } else { Lex::Value };
                } else if (b == b'}' && in_object) || (b == b']' && !in_object) {
                    self.close()?;
                } else {
                    return Err(self.bad());
                }
            }
            Lex::Str(kind) => match b {
                b'"' => self.end_string(kind)?,
                b'\\' => self.lex = Lex::Escape(kind),
                0x00..=0x1f => return Err(self.bad()),
                _ => self.string_byte(kind, b)?,
            },
            Lex::Escape(kind) => {
                let decoded = match b {
                    b'"' => b'"',
                    b'\\' => b'\\',
                    b'/' => b'/',
                    b'b' => 0x08,
                    b'f' => 0x0c,
                    b'n' => b'\n',
                    b'r' => b'\r',
                    b't' => b'\t',
                    b'u' => {
                        self.lex = Lex::Unicode(kind, 0, 0);
                        return Ok(());
                    }
                    _ => return Err(self.bad()),
                };
                self.lex = Lex::Str(kind);
                self.string_byte(kind, decoded)?;
            }
            Lex::Unicode(kind, n, acc) => {
                let d = u16::from(crate::hex::digit(b).ok_or_else(|| self.bad())?);
                let acc = (acc << 4) | d;
                if n < 3 {
                    self.lex = Lex::Unicode(kind, n + 1, acc);
                } else {
                    self.lex = Lex::Str(kind);
                    self.string_unit(kind, acc)?;
                }
            }
            Lex::Number(state) => {
                let next = match (state, b) {
                    (Num::Minus, b'0') => Some(Num::Zero),
                    (Num::Minus, b'1'..=b'9') => Some(Num::Int),
                    (Num::Int, b'0'..=b'9') => Some(Num::Int),
                    (Num::Zero | Num::Int, b'.') => Some(Num::Dot),
                    (Num::Dot | Num::Frac, b'0'..=b'9') => Some(Num::Frac),
                    (Num::Zero | Num::Int | Num::Frac, b'e' | b'E') => Some(Num::Exp),
                    (Num::Exp, b'+' | b'-') => Some(Num::ExpSign),
                    (Num::Exp | Num::ExpSign | Num::ExpDigits, b'0'..=b'9') => Some(Num::ExpDigits),
                    _ => None,
                };
                match next {
                    Some(n) => self.lex = Lex::Number(n),
                    None if matches!(state, Num::Zero | Num::Int | Num::Frac | Num::ExpDigits) => {
                        // The number ended; this byte belongs to what follows it.
                        self.lex = Lex::AfterValue;
                        return self.step(b);
                    }
                    None => return Err(self.bad()),
                }
            }
            Lex::Literal(word, i) => {
                if word[i as usize] != b {
                    return Err(self.bad());
                }
                self.lex = if i as usize + 1 == word.len() {
                    Lex::AfterValue
                } else {
                    Lex::Literal(word, i + 1)
                };
            }
            Lex::Done => {
                if !ws {
                    return Err(self.bad());
                }
            }
        }
        Ok(())
    }

    fn begin_key(&mut self) {
        if self.stack.len() == 1 {
            self.key_match = Some(0);
            self.lex = Lex::Str(StrKind::TopKey);
        } else {
            self.lex = Lex::Str(StrKind::NestedKey);
        }
    }

    fn begin_value(&mut self, b: u8) -> Result<(), ScanState> {
        let is_model = std::mem::take(&mut self.key_is_model);
        if is_model {
            if self.found.is_some() {
                // Parsers disagree on which duplicate wins, so neither may be trusted.
                return Err(ScanState::Ambiguous);
            }
            if b != b'"' {
                return Err(ScanState::Absent);
            }
            self.lex = Lex::Str(StrKind::Model);
            return Ok(());
        }
        self.lex = match b {
            b'"' => Lex::Str(StrKind::Skip),
            b'{' | b'[' => {
                if self.stack.len() >= MAX_DEPTH {
                    return Err(self.bad());
                }
                self.stack.push(b == b'{');
                if b == b'{' {
                    Lex::KeyOrClose
                } else {
                    Lex::ValueOrClose
                }
            }
            b'-' => Lex::Number(Num::Minus),
            b'0' => Lex::Number(Num::Zero),
            b'1'..=b'9' => Lex::Number(Num::Int),
            b't' => Lex::Literal(b"true", 1),
            b'f' => Lex::Literal(b"false", 1),
            b'n' => Lex::Literal(b"null", 1),
            _ => return Err(self.bad()),
        };
        Ok(())
    }

    fn close(&mut self) -> Result<(), ScanState> {
        self.stack.pop();
        if self.stack.is_empty() {
            self.lex = Lex::Done;
            if self.found.is_none() {
                return Err(ScanState::Absent);
            }
        } else {
            self.lex = Lex::AfterValue;
        }
        Ok(())
    }

    fn end_string(&mut self, kind: StrKind) -> Result<(), ScanState> {
        match kind {
            StrKind::TopKey => {
                self.key_is_model = self.key_match == Some(MODEL.len() as u8);
                self.lex = Lex::Colon;
            }
            StrKind::Model => {
                if self.high_surrogate.is_some() {
                    return Err(ScanState::Absent);
                }
                let value = std::mem::take(&mut self.value);
                let model = String::from_utf8(value).map_err(|_| ScanState::Absent)?;
                self.found = Some(model);
                self.lex = Lex::AfterValue;
            }
            StrKind::NestedKey => self.lex = Lex::Colon,
            StrKind::Skip => self.lex = Lex::AfterValue,
        }
        Ok(())
    }

    fn string_byte(&mut self, kind: StrKind, b: u8) -> Result<(), ScanState> {
        match kind {
            StrKind::TopKey => self.key_char(u16::from(b)),
            StrKind::Model => {
                if self.high_surrogate.is_some() {
                    return Err(ScanState::Absent);
                }
                self.push_model(&[b])?;
            }
            StrKind::NestedKey | StrKind::Skip => {}
        }
        Ok(())
    }

    /// Keys are matched ignoring ASCII case: upstreams with case-insensitive JSON binding (Go's
    /// encoding/json, many gateways) read `"Model"` as `model`, so `{"model":"a","Model":"b"}`
    /// must count as two models.
    fn key_char(&mut self, unit: u16) {
        let unit = if unit < 0x80 {
            u16::from((unit as u8).to_ascii_lowercase())
        } else {
            unit
        };
        self.key_match = match self.key_match {
            Some(i) if (i as usize) < MODEL.len() && unit == u16::from(MODEL[i as usize]) => {
                Some(i + 1)
            }
            _ => None,
        };
    }

    /// A `\uXXXX` escape.
    fn string_unit(&mut self, kind: StrKind, unit: u16) -> Result<(), ScanState> {
        match kind {
            StrKind::TopKey => self.key_char(unit),
            StrKind::NestedKey | StrKind::Skip => {}
            StrKind::Model => {
                let c = match (self.high_surrogate.take(), unit) {
                    (None, 0xD800..=0xDBFF) => {
                        self.high_surrogate = Some(unit);
                        return Ok(());
                    }
                    (Some(hi), 0xDC00..=0xDFFF) => {
                        let cp =
                            0x10000 + ((u32::from(hi) - 0xD800) << 10) + (u32::from(unit) - 0xDC00);
                        char::from_u32(cp)
                    }
                    (None, _) => char::from_u32(u32::from(unit)),
                    (Some(_), _) => None,
                };
                let c = c.ok_or(ScanState::Absent)?;
                let mut buf = [0u8; 4];
                self.push_model(c.encode_utf8(&mut buf).as_bytes())?;
            }
        }
        Ok(())
    }

    fn push_model(&mut self, bytes: &[u8]) -> Result<(), ScanState> {
        if self.value.len() + bytes.len() > MAX_MODEL_LEN {
            return Err(ScanState::Absent);
        }
        self.value.extend_from_slice(bytes);
        Ok(())
    }
}

/// The top-level `"model"` string of a complete JSON body.
pub fn model_from_json(body: &[u8]) -> Option<String> {
    let mut scanner = ModelScanner::new();
    scanner.feed(body);
    match scanner.finish() {
        ScanState::Found(m) => Some(m),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The string skip in `feed` must leave the scanner exactly where stepping every byte
    /// would: compared after every chunk on random JSON objects (nested containers, `model`
    /// keys at every depth, escapes, long strings) with an occasional control character or
    /// stray byte dropped in.
    #[test]
    fn feed_matches_stepping_every_byte() {
        struct Gen(u64);
        impl Gen {
            fn below(&mut self, n: usize) -> usize {
                self.0 ^= self.0 << 13;
                self.0 ^= self.0 >> 7;
                self.0 ^= self.0 << 17;
                (self.0 % n as u64) as usize
            }
            fn string(&mut self, out: &mut Vec<u8>) {
                const PARTS: &[&[u8]] = &[
                    b"model",
                    b"Model",
                    b"text with spaces",
                    b"\\\"",
                    b"\\\\",
                    b"\\u00e9",
                    b"\xc3\xa9",
                    b"x",
                ];
                out.push(b'"');
                for _ in 0..self.below(6) {
                    out.extend_from_slice(PARTS[self.below(PARTS.len())]);
                    if self.below(40) == 0 {
                        out.push([0x01, b'\n', 0x1f][self.below(3)]);
                    }
                }
                out.push(b'"');
            }
            fn value(&mut self, out: &mut Vec<u8>, depth: usize) {
                match self.below(if depth > 3 { 3 } else { 5 }) {
                    0 => self.string(out),
                    1 => out.extend_from_slice(b"12.5e3"),
                    2 => out.extend_from_slice(b"true"),
                    3 => {
                        out.push(b'[');
                        for i in 0..self.below(4) {
                            if i > 0 {
                                out.push(b',');
                            }
                            self.value(out, depth + 1);
                        }
                        out.push(b']');
                    }
                    _ => self.object(out, depth + 1),
                }
            }
            fn object(&mut self, out: &mut Vec<u8>, depth: usize) {
                out.push(b'{');
                for i in 0..self.below(5) {
                    if i > 0 {
                        out.push(b',');
                    }
                    if self.below(4) == 0 {
                        out.extend_from_slice(b"\"model\"");
                    } else {
                        self.string(out);
                    }
                    out.extend_from_slice(b" : ");
                    self.value(out, depth);
                }
                out.push(b'}');
            }
        }
        let mut g = Gen(0x2545_f491_4f6c_dd1d);
        for _ in 0..3000 {
            let mut body = Vec::new();
            g.object(&mut body, 0);
            let (mut fast, mut slow) = (ModelScanner::new(), ModelScanner::new());
            let mut rest = body.as_slice();
            while !rest.is_empty() {
                let (chunk, tail) = rest.split_at(1 + g.below(rest.len()));
                let got = fast.feed(chunk);
                for &b in chunk {
                    if slow.finished.is_none()
                        && let Err(verdict) = slow.step(b)
                    {
                        slow.finished = Some(verdict);
                    }
                }
                let want = slow.finished.clone().unwrap_or_else(|| slow.current());
                assert_eq!(got, want, "{body:?}");
                assert_eq!(format!("{fast:?}"), format!("{slow:?}"), "{body:?}");
                rest = tail;
            }
            assert_eq!(fast.finish(), slow.finish(), "{body:?}");
        }
    }

    #[test]
    fn capability_names_round_trip_and_unknown_lists_valid_values() {
        for c in ALL_CAPABILITIES {
            assert_eq!(c.as_str().parse::<Capability>().unwrap(), c);
            assert_eq!(c.to_string(), c.as_str());
        }
        let e = "chats".parse::<Capability>().unwrap_err().to_string();
        assert!(
            e.contains("`chats`") && e.contains("fine_tuning") && e.contains("tokens"),
            "{e}"
        );
        assert!("Chat".parse::<Capability>().is_err());
    }

    #[test]
    fn openai_and_anthropic_capabilities() {
        use Capability::*;
        let cases = [
            (Family::OpenAi, "/v1/chat/completions", Chat),
            (Family::OpenAi, "/v1/responses", Chat),
            (Family::OpenAi, "/v1/responses/resp_1/input_items", Chat),
            (Family::OpenAi, "/v1/completions", Completions),
            (Family::OpenAi, "/v1/fim/completions", Completions),
            (Family::OpenAi, "/v1/embeddings", Embeddings),
            (Family::OpenAi, "/v1/images/generations", Images),
            (Family::OpenAi, "/v1/audio/transcriptions", Audio),
            (Family::OpenAi, "/v1/moderations", Moderations),
            (Family::OpenAi, "/v1/chat/moderations", Moderations),
            (Family::OpenAi, "/v1/models", Models),
            (Family::OpenAi, "/v1/models/gpt-4o", Models),
            (Family::OpenAi, "/v1/files/file-1/content", Files),
            (Family::OpenAi, "/v1/uploads", Files),
            (Family::OpenAi, "/v1/batches", Batches),
            (Family::OpenAi, "/v1/fine_tuning/jobs", FineTuning),
            (Family::OpenAi, "/v1/assistants", Other),
            (Family::OpenAi, "/v2/chat", Chat),
            (Family::OpenAi, "/v1/embed", Embeddings),
            (Family::OpenAi, "/v1/tokenize", Tokens),
            (Family::OpenAi, "/api/chat", Chat),
            (Family::OpenAi, "/api/generate", Completions),
            (Family::OpenAi, "/api/tags", Models),
            (Family::Anthropic, "/v1/messages", Chat),
            (Family::Anthropic, "/v1/messages/count_tokens", Tokens),
            (Family::Anthropic, "/v1/messages/batches", Batches),
            (Family::Anthropic, "/v1/complete", Completions),
            (Family::Anthropic, "/v1/models", Models),
            (Family::None, "/v1/chat/completions", Other),
        ];
        for (family, path, want) in cases {
            assert_eq!(capability(family, path), want, "{family} {path}");
        }
    }

    #[test]
    fn gemini_model_and_capability_from_path() {
        use Capability::*;
        let cases = [
            (
                "/v1beta/models/gemini-1.5-pro:generateContent",
                Some("gemini-1.5-pro"),
                Chat,
            ),
            (
                "/v1beta/models/gemini-2.0-flash:streamGenerateContent",
                Some("gemini-2.0-flash"),
                Chat,
            ),
            (
                "/v1/models/gemini-pro:generateContent",
                Some("gemini-pro"),
                Chat,
            ),
            (
                "/v1beta/models/text-embedding-004:embedContent",
                Some("text-embedding-004"),
                Embeddings,
            ),
            (
                "/v1beta/models/text-embedding-004:batchEmbedContents",
                Some("text-embedding-004"),
                Embeddings,
            ),
            (
                "/v1beta/models/gemini-pro:countTokens",
                Some("gemini-pro"),
                Tokens,
            ),
            (
                "/v1beta/models/gemini-pro:batchGenerateContent",
                Some("gemini-pro"),
                Batches,
            ),
            ("/v1beta/models/imagen-3:predict", Some("imagen-3"), Other),
            (
                "/v1beta/models/gemini%2D1.5:generateContent",
                Some("gemini-1.5"),
                Chat,
            ),
            ("/v1beta/models/gemini-pro", Some("gemini-pro"), Models),
            ("/v1beta/models", None, Models),
            ("/v1beta/files", None, Files),
            ("/upload/v1beta/files", None, Files),
            ("/v1beta/tunedModels", None, FineTuning),
            ("/v1beta/cachedContents", None, Other),
            ("/v1beta/openai/chat/completions", None, Chat),
            ("/v1beta/openai/embeddings", None, Embeddings),
        ];
        for (path, model, cap) in cases {
            assert_eq!(
                model_from_path(Family::Gemini, path).as_deref(),
                model,
                "{path}"
            );
            assert_eq!(capability(Family::Gemini, path), cap, "{path}");
        }
        assert_eq!(
            model_source(Family::Gemini, "/v1beta/openai/chat/completions"),
            ModelSource::JsonBody
        );
        assert_eq!(
            model_source(Family::Gemini, "/v1beta/files"),
            ModelSource::Unknown
        );
    }

    #[test]
    fn azure_deployment_is_the_model_and_never_a_capability_word() {
        use Capability::*;
        let cases = [
            (
                "/openai/deployments/gpt4o/chat/completions",
                Some("gpt4o"),
                Chat,
            ),
            (
                "/openai/deployments/embeddings/chat/completions",
                Some("embeddings"),
                Chat,
            ),
            (
                "/openai/deployments/chat/embeddings",
                Some("chat"),
                Embeddings,
            ),
            (
                "/openai/deployments/dalle/images/generations",
                Some("dalle"),
                Images,
            ),
            (
                "/openai/deployments/whisper/audio/transcriptions",
                Some("whisper"),
                Audio,
            ),
            (
                "/openai/deployments/old/completions",
                Some("old"),
                Completions,
            ),
            ("/openai/models", None, Models),
            ("/openai/files", None, Files),
            ("/openai/v1/chat/completions", None, Chat),
        ];
        for (path, model, cap) in cases {
            assert_eq!(
                model_from_path(Family::Azure, path).as_deref(),
                model,
                "{path}"
            );
            assert_eq!(capability(Family::Azure, path), cap, "{path}");
        }
        assert_eq!(
            model_source(Family::Azure, "/openai/v1/responses"),
            ModelSource::JsonBody
        );
        assert_eq!(
            model_from_path(Family::OpenAi, "/openai/deployments/x/chat/completions"),
            None
        );
        assert_eq!(
            model_source(Family::OpenAi, "/v1/chat/completions"),
            ModelSource::JsonBody
        );
        assert_eq!(
            model_source(Family::None, "/v1/chat/completions"),
            ModelSource::Unknown
        );
    }

    /// Feeds `body` split at every offset (two chunks), one byte at a time, and whole; all three
    /// must agree with `want` at the end.
    fn scan_everywhere(body: &[u8]) -> Option<String> {
        let whole = model_from_json(body);
        let mut s = ModelScanner::new();
        for b in body {
            s.feed(std::slice::from_ref(b));
        }
        assert_eq!(
            final_model(s.finish()),
            whole,
            "byte-by-byte: {}",
            String::from_utf8_lossy(body)
        );
        for cut in 0..=body.len() {
            let mut s = ModelScanner::new();
            s.feed(&body[..cut]);
            s.feed(&body[cut..]);
            assert_eq!(
                final_model(s.finish()),
                whole,
                "cut at {cut}: {}",
                String::from_utf8_lossy(body)
            );
        }
        whole
    }

    fn final_model(s: ScanState) -> Option<String> {
        match s {
            ScanState::Found(m) => Some(m),
            _ => None,
        }
    }

    #[test]
    fn finds_the_top_level_model_at_every_chunk_boundary() {
        let cases: &[(&str, Option<&str>)] = &[
            (r#"{"model":"gpt-4o","messages":[]}"#, Some("gpt-4o")),
            (" \r\n\t{ \"model\" :\t\"gpt-4o\" } \n", Some("gpt-4o")),
            (
                r#"{"messages":[{"role":"user","content":"x","model":"nested"}],"model":"top"}"#,
                Some("top"),
            ),
            (
                r#"{"metadata":{"model":"nested"},"model":"top"}"#,
                Some("top"),
            ),
            (
                r#"{"content":"\"model\":\"fake\"","model":"real"}"#,
                Some("real"),
            ),
            (r#"{"mod\u0065l":"escaped-key"}"#, Some("escaped-key")),
            (
                r#"{"model":"with \"quotes\" and \\ and \/"}"#,
                Some("with \"quotes\" and \\ and /"),
            ),
            (
                r#"{"model":"caf\u00e9-\ud83d\ude00"}"#,
                Some("caf\u{e9}-\u{1F600}"),
            ),
            ("{\"model\":\"caf\u{e9}\"}", Some("caf\u{e9}")),
            (
                r#"{"n":-0.5e+10,"t":true,"f":false,"z":null,"a":[1,[2,{}],[]],"model":"m"}"#,
                Some("m"),
            ),
            (
                r#"{"models":"x","mode":"y","Model":"z","model ":"w"}"#,
                Some("z"),
            ),
            (r#"{"messages":[]}"#, None),
            (r#"{"model":42}"#, None),
            (r#"{"model":null}"#, None),
            (r#"{"model":{"name":"x"}}"#, None),
            (r#"["model","x"]"#, None),
            (r#""model""#, None),
            ("model=gpt-4o", None),
            ("", None),
            (r#"{"model":"a","model":"b"}"#, None),
            (r#"{"model":"a","x":{"y":[1,2]},"model":"a"}"#, None),
            (r#"{"model":"a"} {"model":"b"}"#, None),
            (r#"{"model":"a","x":NaN,"model":"b"}"#, None),
            (r#"{"model":"a","x":01}"#, None),
            (r#"{"model":"a","x":[1}]"#, None),
            (r#"{"model":"a""#, None),
            (r#"{"model":"a",}"#, None),
            ("{\"model\":\"a\nb\"}", None),
            (r#"{"model":"\ud800"}"#, None),
            (r#"{"model":"\x41"}"#, None),
            ("\u{feff}{\"model\":\"bom\"}", None),
        ];
        for (body, want) in cases {
            assert_eq!(scan_everywhere(body.as_bytes()).as_deref(), *want, "{body}");
        }
    }

    #[test]
    fn a_differently_cased_model_key_counts_as_a_second_model() {
        assert_eq!(
            model_from_json(br#"{"Model":"gpt-4o"}"#),
            Some("gpt-4o".into())
        );
        let mut s = ModelScanner::new();
        s.feed(br#"{"model":"cheap","MODEL":"expensive"}"#);
        assert_eq!(s.finish(), ScanState::Ambiguous);
    }

    #[test]
    fn reports_the_model_before_the_body_ends_and_flags_a_later_duplicate() {
        let mut s = ModelScanner::new();
        assert_eq!(s.feed(br#"{"model":"gpt"#), ScanState::NeedMore);
        assert_eq!(
            s.feed(br#"-4o","messages":[{"content":"#),
            ScanState::Found("gpt-4o".into())
        );
        assert_eq!(s.feed(br#""hi"}]"#), ScanState::Found("gpt-4o".into()));
        assert_eq!(s.feed(br#","model":"o1"}"#), ScanState::Ambiguous);
        assert_eq!(s.feed(b"}"), ScanState::Ambiguous);
        assert_eq!(s.finish(), ScanState::Ambiguous);

        let mut s = ModelScanner::new();
        assert_eq!(
            s.feed(br#"{"model":"a","stream":tru"#),
            ScanState::Found("a".into())
        );
        assert_eq!(s.feed(b"x}"), ScanState::Ambiguous);

        let mut s = ModelScanner::new();
        assert_eq!(s.feed(br#"{"messages":[]"#), ScanState::NeedMore);
        assert_eq!(s.feed(b"}"), ScanState::Absent);
        assert_eq!(s.feed(br#"{"model":"late"}"#), ScanState::Absent);

        let mut s = ModelScanner::new();
        assert_eq!(s.feed(br#"{"model":"a""#), ScanState::Found("a".into()));
        assert_eq!(
            s.finish(),
            ScanState::Ambiguous,
            "a truncated body is not trusted"
        );
    }

    #[test]
    fn memory_is_capped() {
        let ok = format!(r#"{{"model":"{}"}}"#, "m".repeat(MAX_MODEL_LEN));
        assert_eq!(
            model_from_json(ok.as_bytes()).map(|m| m.len()),
            Some(MAX_MODEL_LEN)
        );
        let long = format!(r#"{{"model":"{}"}}"#, "m".repeat(MAX_MODEL_LEN + 1));
        let mut s = ModelScanner::new();
        assert_eq!(s.feed(long.as_bytes()), ScanState::Absent);
        assert!(s.value.capacity() <= 2 * MAX_MODEL_LEN);
        let deep = format!(
            r#"{{"a":{}{}, "model":"m"}}"#,
            "[".repeat(MAX_DEPTH + 10),
            "]".repeat(MAX_DEPTH + 10)
        );
        assert_eq!(model_from_json(deep.as_bytes()), None);
        let fine = format!(
            r#"{{"a":{}{}, "model":"m"}}"#,
            "[".repeat(100),
            "]".repeat(100)
        );
        assert_eq!(model_from_json(fine.as_bytes()).as_deref(), Some("m"));
        let long_key = format!(r#"{{"{}":1,"model":"m"}}"#, "k".repeat(1 << 20));
        let mut s = ModelScanner::new();
        assert_eq!(s.feed(long_key.as_bytes()), ScanState::Found("m".into()));
        assert!(s.value.capacity() <= 2 * MAX_MODEL_LEN);
    }
}

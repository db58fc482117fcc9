//! The one streaming JSON scanner module: every reader of JSON request and response bodies
//! (the model a request names, the token usage a response reports) is built from the two
//! lexers here, so there is one place to get JSON lexing right.
//!
//! - [`ModelScanner`] is strict: it validates the whole document and reads one top-level
//!   string (`"model"`). Because its verdict decides which key may serve a request, anything
//!   that an upstream parser could read differently (duplicates, invalid JSON after the model)
//!   makes the verdict final and unfavourable.
//! - [`ObjectTap`] is tolerant: it finds `"KEY": {...}` objects for a few key names at any
//!   depth, in JSON, JSON arrays and server-sent events alike, and hands each complete object
//!   to its caller. It only informs the audit record, so it never fails; on SSE it restarts at
//!   every newline so one broken event cannot swallow the rest.
//!
//! Both take a body in chunks of any size, buffer at most a bounded few bytes, and skip the
//! interior of strings they do not keep with one vectorised search.
//!
//! `json_scan` knows no provider: which keys matter is the caller's business.

// === ModelScanner: one top-level string, strictly ===

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

// === ObjectTap: objects under given keys, tolerantly ===

/// Largest captured object; real usage objects are a few hundred bytes.
pub const MAX_CAPTURE: usize = 4096;
/// Longest key remembered while looking for a wanted key.
pub const MAX_KEY: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pending {
    /// Nothing of interest just happened.
    None,
    /// A string that could be a wanted key just ended.
    WantedKey,
    /// `"KEY":` seen; an object may follow.
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

/// Finds every `"KEY": {...}` object, for the keys it was made with, at any depth of a body
/// fed in chunks, and passes each complete object (its raw bytes, at most [`MAX_CAPTURE`]) to
/// the sink given to [`ObjectTap::feed`]. Keys are compared byte for byte; a key written with
/// escapes never matches.
#[derive(Debug)]
pub struct ObjectTap {
    /// The key names whose objects are wanted, in groups (one per caller's source).
    keys: &'static [&'static [&'static str]],
    /// Newlines end an event: state is reset there so one broken event cannot swallow the
    /// rest of the stream.
    sse: bool,
    /// Lexer state.
    state: State,
    /// What the last tokens make possible.
    pending: Pending,
    /// The current string, up to [`MAX_KEY`] bytes.
    key: Vec<u8>,
    /// The current string still fits in `key` and has no escape.
    key_ok: bool,
    /// The object being captured.
    capture: Vec<u8>,
}

impl ObjectTap {
    /// A tap for objects under any key of `keys` (each at most [`MAX_KEY`] bytes); `sse`
    /// restarts the lexer at every newline.
    pub fn new(keys: &'static [&'static [&'static str]], sse: bool) -> ObjectTap {
        debug_assert!(
            keys.iter()
                .flat_map(|g| g.iter())
                .all(|k| k.len() <= MAX_KEY)
        );
        ObjectTap {
            keys,
            sse,
            state: State::Outside,
            pending: Pending::None,
            key: Vec::with_capacity(MAX_KEY),
            key_ok: false,
            capture: Vec::new(),
        }
    }

    /// Scans the next chunk, calling `sink` with each complete wanted object.
    pub fn feed(&mut self, mut chunk: &[u8], sink: &mut dyn FnMut(&[u8])) {
        while let Some((&b, rest)) = chunk.split_first() {
            self.byte(b, sink);
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

    /// Bytes held in buffers (for memory-bound tests).
    pub fn buffered(&self) -> usize {
        self.capture.capacity() + self.key.capacity()
    }

    fn reset(&mut self) {
        self.state = State::Outside;
        self.pending = Pending::None;
        self.capture = Vec::new();
    }

    /// One state step; `feed` is this for every byte, with string interiors skipped.
    pub fn byte(&mut self, b: u8, sink: &mut dyn FnMut(&[u8])) {
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
                        sink(&object);
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
                        && self
                            .keys
                            .iter()
                            .flat_map(|g| g.iter())
                            .any(|k| k.as_bytes() == self.key.as_slice())
                    {
                        Pending::WantedKey
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
                b':' if self.pending == Pending::WantedKey => self.pending = Pending::ExpectObject,
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

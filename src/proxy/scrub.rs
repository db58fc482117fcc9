//! Response scrubbing: replaces every occurrence of the injected key in upstream response
//! headers, body and trailers with `[REDACTED]` (README, "What an app cannot do"), so a
//! provider that echoes the key (an "incorrect API key" error, an echo endpoint, a debug
//! header) cannot hand it to the app.
//!
//! The body is scrubbed as a stream. [`Scrubber`] emits every byte the moment it is known not
//! to start an occurrence and holds back only the longest suffix of what it has seen that is a
//! proper prefix of a needle, so an SSE event is never delayed unless its tail could be the start
//! of the key. Matching is Knuth–Morris–Pratt: linear time, no allocation per byte.
//!
//! Which forms of the key are found (each only as a whole; a partial key such as a 4-character
//! preview is deliberately left alone):
//! - the raw bytes;
//! - the JSON string form when it differs from the raw bytes: `"` and `\` escaped as `\"` and
//!   `\\`, and, when the key contains `/`, both with `/` left as is and escaped as `\/` (PHP and
//!   some Java encoders do the latter). Typical provider keys (`[A-Za-z0-9_-]`) have one form.
//!
//! - when the key holds bytes outside RFC 3986's unreserved set (`/`, `+`, `=` in the keys of
//!   custom targets), those bytes percent-encoded (`%2F`, as in a URL or form body) and
//!   `\u`-escaped (`\u002F`, as .NET's and HTML-safe JSON encoders write them), each with
//!   upper- and lowercase hex digits.
//!
//! Bedrock event streams are scrubbed message by message and encoded again, so they stay valid
//! (see [`ScrubBody::framed_by`]); their InvokeModel chunks' base64 output is decoded for it.
//!
//! Not handled: mixtures of those forms within one occurrence, base64 (but for those chunks),
//! control characters (a key cannot hold them: it travels in a header), and case changes,
//! except in header *names*, which HTTP lowercases and which are compared case-insensitively.
//! A secret split across two event-stream messages (two text deltas) is not found.
//!
//! This module must not log, return or store the key anywhere but locked memory ([`Secret`]),
//! and must not decide which responses are scrubbed: the proxy scrubs every upstream response.

use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderValue};
use hyper::body::{Body, Frame, SizeHint};

use crate::seal::Secret;

/// What every occurrence of the key is replaced with.
pub const REDACTED: &[u8] = b"[REDACTED]";

// === impl Needle ===

/// One byte string to find, with its KMP failure function. Both live in locked memory: the
/// bytes are (an encoding of) the key, and the failure function describes its self-overlaps.
struct Needle {
    /// The bytes to find; never empty.
    bytes: Secret,
    /// `fail[i]` (u32 little-endian) is the length of the longest proper prefix of
    /// `bytes[..=i]` that is also a suffix of it.
    fail: Secret,
}

impl Needle {
    /// Builds the failure function for `bytes` (which must not be empty).
    fn new(bytes: Secret) -> Needle {
        let len = bytes.len();
        assert!(
            len > 0 && u32::try_from(len).is_ok(),
            "needle length out of range"
        );
        let mut fail = Secret::zeroed(len * 4);
        {
            let pat = bytes.expose_secret();
            let table = fail.expose_secret_mut();
            let mut k = 0usize;
            for i in 1..len {
                while k > 0 && pat[i] != pat[k] {
                    k = read_u32(table, k - 1);
                }
                if pat[i] == pat[k] {
                    k += 1;
                }
                table[i * 4..i * 4 + 4].copy_from_slice(&(k as u32).to_le_bytes());
            }
        }
        Needle { bytes, fail }
    }
}

fn read_u32(table: &[u8], i: usize) -> usize {
    let raw: [u8; 4] = table[i * 4..i * 4 + 4].try_into().expect("4-byte slot");
    u32::from_le_bytes(raw) as usize
}

/// The KMP transition: the state after reading `b` in state `q` (`q < pat.len()`).
#[inline(always)]
fn step(pat: &[u8], fail: &[u8], mut q: usize, b: u8) -> usize {
    loop {
        if pat[q] == b {
            return q + 1;
        }
        if q == 0 {
            return 0;
        }
        q = read_u32(fail, q - 1);
    }
}

/// The forms of `secret` a response may carry (see the module doc), deduplicated, each in
/// locked memory. Empty when the secret is empty: there is nothing to find.
fn needles_for(secret: &Secret) -> Vec<Needle> {
    let raw = secret.expose_secret();
    if raw.is_empty() {
        return Vec::new();
    }
    let mut needles = vec![Needle::new(Secret::from_slice(raw))];
    let quotes = raw.iter().any(|&b| b == b'"' || b == b'\\');
    let slash = raw.contains(&b'/');
    if quotes {
        needles.push(Needle::new(json_escaped(raw, false)));
    }
    if slash {
        needles.push(Needle::new(json_escaped(raw, true)));
    }
    if raw.iter().any(|&b| !unreserved(b)) {
        for form in [
            Encoding::Percent(HEX_UPPER),
            Encoding::Percent(HEX_LOWER),
            Encoding::Unicode(HEX_UPPER),
            Encoding::Unicode(HEX_LOWER),
        ] {
            let needle = encoded(raw, form);
            if !needles
                .iter()
                .any(|n| n.bytes.expose_secret() == needle.expose_secret())
            {
                needles.push(Needle::new(needle));
            }
        }
    }
    needles
}

/// The raw bytes of `secret` and its JSON string forms (`"`, `\` and `/` escaped), without
/// the percent and `\u` encodings.
fn json_needles_for(secret: &Secret) -> Vec<Needle> {
    let raw = secret.expose_secret();
    if raw.is_empty() {
        return Vec::new();
    }
    let mut needles = vec![Needle::new(Secret::from_slice(raw))];
    if raw.iter().any(|&b| b == b'"' || b == b'\\') {
        needles.push(Needle::new(json_escaped(raw, false)));
    }
    if raw.contains(&b'/') {
        needles.push(Needle::new(json_escaped(raw, true)));
    }
    needles
}

const HEX_UPPER: &[u8; 16] = b"0123456789ABCDEF";
const HEX_LOWER: &[u8; 16] = b"0123456789abcdef";

/// RFC 3986 unreserved characters: the only bytes no encoder changes.
fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// How an encoder writes a byte that is not [`unreserved`].
#[derive(Clone, Copy)]
enum Encoding {
    /// `%2F` (RFC 3986 percent-encoding, as in a URL or a form body), with these hex digits.
    Percent(&'static [u8; 16]),
    /// `\u002F` (a JSON string escape, as .NET and HTML-safe JSON encoders write `+`, `/`, `=`).
    Unicode(&'static [u8; 16]),
}

/// `raw` with every byte that is not [`unreserved`] written in `form`, straight into locked
/// memory.
fn encoded(raw: &[u8], form: Encoding) -> Secret {
    let (prefix, hex): (&[u8], _) = match form {
        Encoding::Percent(hex) => (b"%", hex),
        Encoding::Unicode(hex) => (b"\\u00", hex),
    };
    let wide = prefix.len() + 2;
    let len = raw
        .iter()
        .map(|&b| if unreserved(b) { 1 } else { wide })
        .sum();
    let mut out = Secret::zeroed(len);
    let buf = out.expose_secret_mut();
    let mut at = 0;
    for &b in raw {
        if unreserved(b) {
            buf[at] = b;
            at += 1;
        } else {
            buf[at..at + prefix.len()].copy_from_slice(prefix);
            buf[at + prefix.len()] = hex[usize::from(b >> 4)];
            buf[at + prefix.len() + 1] = hex[usize::from(b & 15)];
            at += wide;
        }
    }
    out
}

/// `raw` with `"` and `\` (and `/` when `escape_slash`) backslash-escaped, written straight into
/// locked memory so no copy of the key lands on the ordinary heap.
fn json_escaped(raw: &[u8], escape_slash: bool) -> Secret {
    let escapes = |b: u8| b == b'"' || b == b'\\' || (escape_slash && b == b'/');
    let len = raw.len() + raw.iter().filter(|&&b| escapes(b)).count();
    let mut out = Secret::zeroed(len);
    let buf = out.expose_secret_mut();
    let mut at = 0;
    for &b in raw {
        if escapes(b) {
            buf[at] = b'\\';
            at += 1;
        }
        buf[at] = b;
        at += 1;
    }
    out
}

/// The distinct first bytes of a needle set, for skipping input that cannot start a match.
/// The forms of one key start with its first byte, `\` or `%`, so there are at most three;
/// several secrets (a document's parts and a derived token) may have more, looked up in a
/// table.
struct FirstBytes {
    bytes: [u8; 3],
    len: usize,
    /// Set when more than three distinct bytes start a needle.
    table: Option<Box<[bool; 256]>>,
}

fn first_bytes(needles: &[Needle]) -> FirstBytes {
    let mut f = FirstBytes {
        bytes: [0; 3],
        len: 0,
        table: None,
    };
    let mut table = [false; 256];
    let mut distinct = 0;
    for n in needles {
        let b = n.bytes.expose_secret()[0];
        if !table[b as usize] {
            table[b as usize] = true;
            distinct += 1;
            if f.len < f.bytes.len() {
                f.bytes[f.len] = b;
                f.len += 1;
            }
        }
    }
    if distinct > f.bytes.len() {
        f.table = Some(Box::new(table));
    }
    f
}

impl FirstBytes {
    /// Offset of the first byte in `hay` that starts some needle.
    fn find(&self, hay: &[u8]) -> Option<usize> {
        if let Some(table) = &self.table {
            return hay.iter().position(|&b| table[b as usize]);
        }
        let [a, b, c] = self.bytes;
        match self.len {
            0 => None,
            1 => memchr::memchr(a, hay),
            2 => memchr::memchr2(a, b, hay),
            _ => memchr::memchr3(a, b, c, hay),
        }
    }
}

// === impl Scrubber ===

/// A piece of scrubbed output, in order.
enum Piece<'a> {
    /// Bytes held back from earlier chunks (a prefix of a needle that did not complete).
    Held(&'a [u8]),
    /// A range of the current chunk.
    Chunk(std::ops::Range<usize>),
    /// One replaced occurrence.
    Redacted,
}

/// A streaming redactor for one secret: feed it the response bytes in order with
/// [`push`](Scrubber::push), then call [`finish`](Scrubber::finish) once at the end.
///
/// When needles overlap in the input, the occurrence that ends first is replaced (the longest
/// one among those ending at the same byte) and matching restarts after it; for a single needle
/// this is exactly `str::replace`.
pub struct Scrubber {
    /// The forms of the secret to find; empty for an empty secret.
    needles: Arc<Vec<Needle>>,
    /// Per needle, how many bytes of it the unemitted tail of the input currently matches.
    states: Vec<usize>,
}

/// The needles for a set of secrets, built once and shared by every response that needs them
/// (a cached access token and its credential's secret parts serve many requests).
#[derive(Clone)]
pub struct ScrubSet {
    /// The forms of every secret.
    needles: Arc<Vec<Needle>>,
}

impl fmt::Debug for ScrubSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScrubSet")
            .field("needles", &self.needles.len())
            .finish()
    }
}

impl ScrubSet {
    /// Every form (see the module doc) of each of `whole`, and for each of `fragments` (the
    /// base64 lines of a private key, say: many, and of a fixed alphabet) the raw bytes and
    /// their JSON string forms only.
    pub fn new(whole: &[Secret], fragments: &[Secret]) -> ScrubSet {
        let needles = whole
            .iter()
            .flat_map(needles_for)
            .chain(fragments.iter().flat_map(json_needles_for))
            .collect();
        ScrubSet {
            needles: Arc::new(needles),
        }
    }
}

impl fmt::Debug for Scrubber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Scrubber")
            .field("needles", &self.needles.len())
            .field("held_back", &self.held_back())
            .finish_non_exhaustive()
    }
}

impl Scrubber {
    /// A scrubber for `secret`, copying it (and its encoded forms) into locked memory.
    pub fn new(secret: &Secret) -> Scrubber {
        Scrubber::for_secrets(std::slice::from_ref(secret))
    }

    /// A scrubber for every one of `secrets` (a key, or a document's secret parts and the
    /// token derived from it).
    pub fn for_secrets(secrets: &[Secret]) -> Scrubber {
        Scrubber::from_set(&ScrubSet::new(secrets, &[]))
    }

    /// A scrubber for a prepared set, sharing its needles.
    pub fn from_set(set: &ScrubSet) -> Scrubber {
        Scrubber {
            needles: set.needles.clone(),
            states: vec![0; set.needles.len()],
        }
    }

    /// How many bytes are currently held back (at most the longest needle's length minus one).
    pub fn held_back(&self) -> usize {
        self.states.iter().copied().max().unwrap_or(0)
    }

    /// Scrubs the next chunk of the stream, appending everything that is now known to be safe
    /// to `out`.
    pub fn push(&mut self, chunk: &[u8], out: &mut BytesMut) {
        self.scan(chunk, |piece| match piece {
            Piece::Held(bytes) => out.extend_from_slice(bytes),
            Piece::Chunk(range) => out.extend_from_slice(&chunk[range]),
            Piece::Redacted => out.extend_from_slice(REDACTED),
        });
    }

    /// Like [`push`](Scrubber::push) for an owned chunk; when nothing was held back and nothing
    /// is replaced, the result is a slice of `chunk` (no copy), which is the common case.
    pub fn push_bytes(&mut self, chunk: Bytes) -> Bytes {
        let mut first: Option<std::ops::Range<usize>> = None;
        let mut copied: Option<BytesMut> = None;
        self.scan(&chunk, |piece| {
            if copied.is_none() {
                if let (None, Piece::Chunk(range)) = (&first, &piece) {
                    first = Some(range.clone());
                    return;
                }
                let mut buf = BytesMut::with_capacity(chunk.len() + REDACTED.len());
                if let Some(range) = first.take() {
                    buf.extend_from_slice(&chunk[range]);
                }
                copied = Some(buf);
            }
            let buf = copied.as_mut().expect("set above");
            match piece {
                Piece::Held(bytes) => buf.extend_from_slice(bytes),
                Piece::Chunk(range) => buf.extend_from_slice(&chunk[range]),
                Piece::Redacted => buf.extend_from_slice(REDACTED),
            }
        });
        match (copied, first) {
            (Some(buf), _) => buf.freeze(),
            (None, Some(range)) => chunk.slice(range),
            (None, None) => Bytes::new(),
        }
    }

    /// Ends the stream: returns the held-back bytes (which turned out not to be the secret)
    /// and resets the scrubber for reuse.
    pub fn finish(&mut self) -> Bytes {
        let mut out = BytesMut::new();
        self.finish_into(&mut out);
        out.freeze()
    }

    /// Like [`finish`](Scrubber::finish), appending to `out`.
    pub fn finish_into(&mut self, out: &mut BytesMut) {
        if let Some((k, q)) = self.longest_state() {
            out.extend_from_slice(&self.needles[k].bytes.expose_secret()[..q]);
        }
        self.states.iter_mut().for_each(|q| *q = 0);
    }

    /// The needle whose partial match is longest, and its length, if any bytes are held.
    fn longest_state(&self) -> Option<(usize, usize)> {
        self.states
            .iter()
            .copied()
            .enumerate()
            .max_by_key(|&(_, q)| q)
            .filter(|&(_, q)| q > 0)
    }

    /// Runs the matcher over `chunk`, handing the output to `sink` in order.
    ///
    /// Positions are counted in `held ++ chunk`, where `held` is the held-back prefix: because
    /// it is always a prefix of the needle with the longest partial match, it is re-read from
    /// that needle instead of being buffered.
    fn scan(&mut self, chunk: &[u8], mut sink: impl FnMut(Piece<'_>)) {
        let (held_needle, held) = self.longest_state().unwrap_or((0, 0));
        let Scrubber {
            needles, states, ..
        } = self;
        let emit = |from: usize, to: usize, sink: &mut dyn FnMut(Piece<'_>)| {
            if from < held.min(to) {
                sink(Piece::Held(
                    &needles[held_needle].bytes.expose_secret()[from..held.min(to)],
                ));
            }
            if to > held.max(from) {
                sink(Piece::Chunk(from.max(held) - held..to - held));
            }
        };
        let mut emitted = 0;
        if let [needle] = needles.as_slice() {
            // One needle is the usual case; keep its loop free of the per-needle bookkeeping.
            let pat = needle.bytes.expose_secret();
            let fail = needle.fail.expose_secret();
            let mut q = states[0];
            let mut i = 0;
            while i < chunk.len() {
                if q == 0 {
                    // Outside a partial match only the first byte of the key matters; finding
                    // it with a tight scan is several times faster than stepping the automaton.
                    match memchr::memchr(pat[0], &chunk[i..]) {
                        Some(skip) => i += skip,
                        None => break,
                    }
                }
                q = step(pat, fail, q, chunk[i]);
                i += 1;
                if q == pat.len() {
                    let end = held + i;
                    emit(emitted, end - pat.len(), &mut sink);
                    sink(Piece::Redacted);
                    emitted = end;
                    q = 0;
                }
            }
            states[0] = q;
        } else {
            let firsts = first_bytes(needles);
            let mut i = 0;
            while i < chunk.len() {
                if states.iter().all(|&q| q == 0) {
                    match firsts.find(&chunk[i..]) {
                        Some(skip) => i += skip,
                        None => break,
                    }
                }
                let b = chunk[i];
                i += 1;
                let mut matched = 0;
                for (needle, q) in needles.iter().zip(states.iter_mut()) {
                    let pat = needle.bytes.expose_secret();
                    *q = step(pat, needle.fail.expose_secret(), *q, b);
                    if *q == pat.len() {
                        matched = matched.max(*q);
                    }
                }
                if matched > 0 {
                    let end = held + i;
                    emit(emitted, end - matched, &mut sink);
                    sink(Piece::Redacted);
                    emitted = end;
                    states.iter_mut().for_each(|q| *q = 0);
                }
            }
        }
        let keep = states.iter().copied().max().unwrap_or(0);
        emit(emitted, held + chunk.len() - keep, &mut sink);
    }

    /// Scrubs one complete byte string; `None` when it contains no occurrence. The scrubber
    /// must be between streams (nothing held back) and is again afterwards.
    fn scrub_whole(&mut self, input: &[u8]) -> Option<BytesMut> {
        debug_assert_eq!(self.held_back(), 0, "scrub_whole in the middle of a stream");
        // Most values hold no occurrence: find that out without building any output.
        let mut replaced = false;
        self.scan(input, |piece| replaced |= matches!(piece, Piece::Redacted));
        self.states.iter_mut().for_each(|q| *q = 0);
        if !replaced {
            return None;
        }
        let mut out = BytesMut::with_capacity(input.len() + REDACTED.len());
        self.push(input, &mut out);
        self.finish_into(&mut out);
        Some(out)
    }

    /// Whether `name` holds the key in any of its forms, ignoring ASCII case (HTTP lowercases
    /// header names). Not only the raw form: `%` is a token character, so a percent form fits
    /// an HTTP header name where the raw `/`, `+` or `=` cannot, and an event-stream header
    /// name may hold any byte. A name shorter than a form cannot hold it, and most are.
    fn names_key(&self, name: &[u8]) -> bool {
        self.needles.iter().any(|n| {
            let form = n.bytes.expose_secret();
            name.len() >= form.len()
                && name
                    .windows(form.len())
                    .any(|w| w.eq_ignore_ascii_case(form))
        })
    }

    /// Replaces every occurrence of the key inside any header value with `[REDACTED]`, keeping
    /// the header, and removes any header whose *name* contains the key (names cannot hold
    /// `[REDACTED]`). Call between streams: before the body, or after [`Scrubber::finish`].
    pub fn scrub_headers(&mut self, headers: &mut HeaderMap) {
        if self.needles.is_empty() {
            return;
        }
        let leaking_names: Vec<_> = headers
            .keys()
            .filter(|name| self.names_key(name.as_str().as_bytes()))
            .cloned()
            .collect();
        for name in leaking_names {
            headers.remove(&name);
        }
        for value in headers.values_mut() {
            if let Some(scrubbed) = self.scrub_whole(value.as_bytes()) {
                let sensitive = value.is_sensitive();
                // Removing bytes from a valid value and inserting visible ASCII keeps it valid.
                let mut new = HeaderValue::from_maybe_shared(scrubbed.freeze())
                    .expect("a scrubbed header value stays valid");
                new.set_sensitive(sensitive);
                *value = new;
            }
        }
        // A key cut across repeated values of one header (`x-part: sk-ab`, `x-part: cd…`) is
        // whole again for any app that joins them; such a header is replaced by one redacted
        // value.
        let repeated: Vec<_> = headers
            .keys()
            .filter(|n| headers.get_all(*n).iter().nth(1).is_some())
            .cloned()
            .collect();
        for name in repeated {
            let joined: Vec<u8> = headers
                .get_all(&name)
                .iter()
                .flat_map(|v| v.as_bytes().iter().copied())
                .collect();
            if self.scrub_whole(&joined).is_some() {
                headers.remove(&name);
                headers.insert(name, HeaderValue::from_static("[REDACTED]"));
            }
        }
    }
}

// === headers ===

// === impl ScrubBody ===

// === impl EventStreamScrub ===

/// Largest event-stream message held back to be scrubbed as a whole; a longer one is scrubbed
/// as plain bytes while it streams (Bedrock's messages are a few KiB).
const MAX_HELD_MESSAGE: usize = 1024 * 1024;

/// Scrubs an `application/vnd.amazon.eventstream` body (Bedrock's streams) message by message,
/// so that what reaches the app is still a valid event stream: each message is passed on as
/// soon as its last byte arrives; one that held a secret is encoded again, with the secret
/// replaced in its header values and payload and fresh lengths and checksums, and an InvokeModel
/// chunk's base64 `bytes` are decoded, scrubbed and encoded again (a plain byte scrubber could
/// not see a secret inside base64).
///
/// A message longer than [`MAX_HELD_MESSAGE`], one whose checksums fail, and everything after a
/// prelude that is not one fall back to plain byte scrubbing: the secret is still replaced, and
/// the SDK refuses that message's checksum instead of receiving it.
#[derive(Debug, Default)]
struct EventStreamScrub {
    /// Bytes of the message being collected.
    buf: BytesMut,
    /// Bytes of an over-long message still to pass through the byte scrubber.
    raw_left: usize,
    /// The body is not an event stream after all: byte-scrub the rest.
    broken: bool,
}

/// Event-stream prelude length (total length, headers length, prelude CRC).
const PRELUDE: usize = 12;

impl EventStreamScrub {
    /// Scrubs the next chunk; returns what can be sent now.
    fn push(&mut self, mut chunk: Bytes, scrubber: &mut Scrubber) -> Bytes {
        let mut out = BytesMut::new();
        while !chunk.is_empty() {
            if self.broken {
                out.extend_from_slice(&scrubber.push_bytes(chunk));
                break;
            }
            if self.raw_left > 0 {
                let n = self.raw_left.min(chunk.len());
                scrubber.push(&chunk.split_to(n), &mut out);
                self.raw_left -= n;
                if self.raw_left == 0 {
                    scrubber.finish_into(&mut out);
                }
                continue;
            }
            let want = if self.buf.len() < PRELUDE {
                PRELUDE
            } else {
                crate::providers::bedrock::prelude_total(&self.buf[..PRELUDE])
                    .expect("checked when the prelude was complete")
            };
            let n = (want - self.buf.len()).min(chunk.len());
            self.buf.extend_from_slice(&chunk.split_to(n));
            if self.buf.len() == PRELUDE {
                match crate::providers::bedrock::prelude_total(&self.buf) {
                    None => {
                        self.broken = true;
                        let held = self.buf.split();
                        scrubber.push(&held, &mut out);
                        continue;
                    }
                    Some(total) if total > MAX_HELD_MESSAGE => {
                        self.raw_left = total - PRELUDE;
                        let held = self.buf.split();
                        scrubber.push(&held, &mut out);
                        continue;
                    }
                    Some(_) => {}
                }
            }
            if self.buf.len() > PRELUDE && self.buf.len() == want {
                let message = self.buf.split();
                scrub_message(&message, scrubber, &mut out);
            }
        }
        out.freeze()
    }

    /// Ends the stream: a message cut short is byte-scrubbed and sent as it is.
    fn finish(&mut self, scrubber: &mut Scrubber, out: &mut BytesMut) {
        let held = self.buf.split();
        scrubber.push(&held, out);
        scrubber.finish_into(out);
    }

    /// Bytes collected and not yet sent.
    fn held(&self) -> usize {
        self.buf.len()
    }
}

/// Appends `message` to `out`, encoded again without the secret if it held one.
fn scrub_message(message: &[u8], scrubber: &mut Scrubber, out: &mut BytesMut) {
    use crate::providers::bedrock::{encode_message, rewrite_chunk_bytes, split_message};
    let rebuilt = split_message(message).and_then(|(headers, payload)| {
        let mut changed = false;
        let mut new_headers = Vec::with_capacity(headers.len());
        for h in &headers {
            let value = match h.text().and_then(|t| scrubber.scrub_whole(t)) {
                Some(text) => {
                    changed = true;
                    let mut v = u16::try_from(text.len()).ok()?.to_be_bytes().to_vec();
                    v.extend_from_slice(&text);
                    v
                }
                None => h.value.to_vec(),
            };
            if scrubber.names_key(h.name) {
                // A name cannot hold `[REDACTED]` (its length is fixed by the schema): drop it.
                changed = true;
                continue;
            }
            new_headers.push((h.name, h.kind, value));
        }
        let decoded = rewrite_chunk_bytes(payload, |inner| {
            scrubber.scrub_whole(inner).map(|b| b.to_vec())
        });
        let payload = decoded.as_deref().unwrap_or(payload);
        let scrubbed = scrubber.scrub_whole(payload);
        changed |= decoded.is_some() || scrubbed.is_some();
        if !changed {
            return Some(None);
        }
        let payload = scrubbed.as_deref().unwrap_or(payload);
        encode_message(&new_headers, payload).map(Some)
    });
    match rebuilt {
        Some(None) => out.extend_from_slice(message),
        Some(Some(clean)) => out.extend_from_slice(&clean),
        None => {
            scrubber.push(message, out);
            scrubber.finish_into(out);
        }
    }
}

/// A response body whose data frames pass through a [`Scrubber`] and whose trailers are
/// scrubbed like headers. At the end of the stream the held-back bytes are sent before the
/// trailers. Errors of the inner body pass through unchanged (held-back bytes are dropped).
///
/// Replacement changes the length, so [`size_hint`](Body::size_hint) never claims an exact
/// size, and the proxy must drop `Content-Length` from scrubbed responses.
///
/// The inner body must be `Unpin` (as `hyper::body::Incoming` is); pin others with `Box::pin`.
pub struct ScrubBody<B> {
    /// The upstream body.
    inner: B,
    /// The body scrubber, holding its copy of the secret in locked memory; it scrubs the
    /// trailers too, once the data is done.
    scrubber: Scrubber,
    /// For event-stream bodies: the message being collected, scrubbed as a whole.
    events: Option<EventStreamScrub>,
    /// Trailers received while bytes were still held back; sent after those bytes.
    pending_trailers: Option<HeaderMap>,
    /// The inner body has ended (or sent trailers); only the flush and the trailers remain.
    inner_done: bool,
    /// Everything, including trailers, has been returned.
    done: bool,
}

impl<B> fmt::Debug for ScrubBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScrubBody")
            .field("scrubber", &self.scrubber)
            .field("inner_done", &self.inner_done)
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}

impl<B> ScrubBody<B> {
    /// Wraps `inner`, scrubbing the scrubber's key out of its data and trailers. The scrubber
    /// may already have scrubbed the response headers.
    pub fn new(inner: B, scrubber: Scrubber) -> ScrubBody<B> {
        ScrubBody {
            inner,
            scrubber,
            events: None,
            pending_trailers: None,
            inner_done: false,
            done: false,
        }
    }

    /// Scrubs the body message by message when `content_type` is
    /// `application/vnd.amazon.eventstream`, so that it stays a valid event stream (see
    /// [`EventStreamScrub`]); other bodies are scrubbed as bytes.
    pub fn framed_by(mut self, content_type: Option<&str>) -> ScrubBody<B> {
        let event_stream = content_type
            .and_then(|c| c.split(';').next())
            .is_some_and(|m| {
                m.trim()
                    .eq_ignore_ascii_case("application/vnd.amazon.eventstream")
            });
        if event_stream && !self.scrubber.needles.is_empty() {
            self.events = Some(EventStreamScrub::default());
        }
        self
    }

    /// The end-of-stream sequence: held-back bytes, then trailers, then `None`.
    fn drain(&mut self) -> Option<Frame<Bytes>> {
        if let Some(events) = self.events.as_mut().filter(|e| e.held() > 0) {
            let mut out = BytesMut::new();
            events.finish(&mut self.scrubber, &mut out);
            return Some(Frame::data(out.freeze()));
        }
        if self.scrubber.held_back() > 0 {
            return Some(Frame::data(self.scrubber.finish()));
        }
        if let Some(trailers) = self.pending_trailers.take() {
            self.done = true;
            let mut trailers = trailers;
            self.scrubber.scrub_headers(&mut trailers);
            return Some(Frame::trailers(trailers));
        }
        self.done = true;
        None
    }
}

impl<B> Body for ScrubBody<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.get_mut();
        loop {
            if this.done {
                return Poll::Ready(None);
            }
            if this.inner_done {
                return Poll::Ready(this.drain().map(Ok));
            }
            let frame = match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
                None => {
                    this.inner_done = true;
                    continue;
                }
                Some(Err(err)) => {
                    this.done = true;
                    return Poll::Ready(Some(Err(err)));
                }
                Some(Ok(frame)) => frame,
            };
            match frame.into_data() {
                Ok(data) => {
                    let out = match &mut this.events {
                        Some(events) => events.push(data, &mut this.scrubber),
                        None => this.scrubber.push_bytes(data),
                    };
                    // An empty data frame would be wasted work for hyper; wait for more input.
                    if !out.is_empty() {
                        return Poll::Ready(Some(Ok(Frame::data(out))));
                    }
                }
                Err(frame) => match frame.into_trailers() {
                    Ok(trailers) => {
                        this.pending_trailers = Some(trailers);
                        this.inner_done = true;
                    }
                    // A frame kind this code does not know carries no data to scrub.
                    Err(other) => return Poll::Ready(Some(Ok(other))),
                },
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
            || (self.inner.is_end_stream()
                && self.scrubber.held_back() == 0
                && self.events.as_ref().is_none_or(|e| e.held() == 0)
                && self.pending_trailers.is_none())
    }

    fn size_hint(&self) -> SizeHint {
        // Replacing a key with `[REDACTED]` can shrink or grow the body: no exact size.
        SizeHint::default()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::convert::Infallible;

    use futures_util::stream;
    use http::HeaderName;
    use http_body_util::{BodyExt, StreamBody};

    use super::*;

    fn secret(s: &str) -> Secret {
        Secret::from_slice(s.as_bytes())
    }

    /// Feeds `chunks` through a fresh scrubber, returning the output of each push and of finish.
    fn run_chunks(secret_text: &str, chunks: &[&[u8]]) -> (Vec<Vec<u8>>, Vec<u8>) {
        let mut scrubber = Scrubber::new(&secret(secret_text));
        let longest = scrubber
            .needles
            .iter()
            .map(|n| n.bytes.len())
            .max()
            .unwrap_or(1);
        let mut outs = Vec::new();
        for chunk in chunks {
            let mut out = BytesMut::new();
            scrubber.push(chunk, &mut out);
            assert!(scrubber.held_back() < longest);
            outs.push(out.to_vec());
        }
        (outs, scrubber.finish().to_vec())
    }

    fn scrub_all(secret_text: &str, chunks: &[&[u8]]) -> Vec<u8> {
        let (outs, tail) = run_chunks(secret_text, chunks);
        let mut all = outs.concat();
        all.extend_from_slice(&tail);
        all
    }

    const KEY: &str = "sk-proj-Abc123_xyz-789";

    /// Runs an event stream through [`EventStreamScrub`] cut at `cuts`, returning the output
    /// of each push and the end.
    fn event_stream(stream: &[u8], cuts: &[usize]) -> Vec<Vec<u8>> {
        let mut scrubber = Scrubber::new(&secret(KEY));
        let mut events = EventStreamScrub::default();
        let mut outs = Vec::new();
        let mut last = 0;
        for &c in cuts.iter().chain([&stream.len()]) {
            let chunk = Bytes::copy_from_slice(&stream[last..c]);
            outs.push(events.push(chunk, &mut scrubber).to_vec());
            last = c;
        }
        let mut end = BytesMut::new();
        events.finish(&mut scrubber, &mut end);
        outs.push(end.to_vec());
        outs
    }

    /// The payloads of the messages of `stream`, which must all be complete and valid.
    fn messages(mut stream: &[u8]) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        while !stream.is_empty() {
            let total = crate::providers::bedrock::prelude_total(stream).expect("a prelude");
            let (_, payload) =
                crate::providers::bedrock::split_message(&stream[..total]).expect("valid message");
            out.push(payload.to_vec());
            stream = &stream[total..];
        }
        out
    }

    #[test]
    fn event_stream_messages_stay_valid_with_the_key_replaced_inside_them() {
        use crate::providers::bedrock::tests_support::message;
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD;
        let delta = format!(r#"{{"delta":{{"text":"the key is {KEY}."}}}}"#);
        let inner = format!(r#"{{"type":"content_block_delta","delta":{{"text":"{KEY}"}}}}"#);
        let chunk = format!(r#"{{"bytes":"{}","p":"abc"}}"#, b64.encode(&inner));
        let start = message("messageStart", br#"{"role":"assistant"}"#);
        let mut stream = start.clone();
        stream.extend(message("contentBlockDelta", delta.as_bytes()));
        stream.extend(message("chunk", chunk.as_bytes()));
        stream.extend(message("metadata", br#"{"usage":{"inputTokens":3}}"#));
        let want_inner = r#"{"type":"content_block_delta","delta":{"text":"[REDACTED]"}}"#;
        for cut in 0..=stream.len() {
            let outs = event_stream(&stream, &[cut]);
            let all = outs.concat();
            assert!(!contains(&all, KEY.as_bytes()), "cut at {cut}");
            let payloads = messages(&all);
            assert_eq!(payloads.len(), 4, "cut at {cut}");
            assert_eq!(payloads[0], br#"{"role":"assistant"}"#);
            assert_eq!(
                payloads[1],
                br#"{"delta":{"text":"the key is [REDACTED]."}}"#
            );
            let rechunked: serde_json::Value = serde_json::from_slice(&payloads[2]).unwrap();
            let decoded = b64.decode(rechunked["bytes"].as_str().unwrap()).unwrap();
            assert_eq!(decoded, want_inner.as_bytes(), "cut at {cut}");
            assert_eq!(rechunked["p"], "abc");
            assert_eq!(payloads[3], br#"{"usage":{"inputTokens":3}}"#);
            // A message leaves as soon as its last byte is in: nothing waits for the next one.
            if cut >= start.len() {
                assert!(outs[0].starts_with(&start), "cut at {cut}");
            }
        }
        // Messages without the key pass unchanged, byte for byte.
        let clean = [start.clone(), message("metadata", b"{}")].concat();
        assert_eq!(event_stream(&clean, &[5, 30]).concat(), clean);
    }

    #[test]
    fn event_stream_that_cannot_be_reframed_is_still_scrubbed_as_bytes() {
        use crate::providers::bedrock::tests_support::message;
        let good = message("metadata", br#"{"usage":{"inputTokens":3}}"#);
        // A message whose checksum fails, then a good one.
        let mut bad = message("contentBlockDelta", format!("x{KEY}x").as_bytes());
        let n = bad.len();
        bad[n - 1] ^= 1;
        let stream = [bad.clone(), good.clone()].concat();
        for cut in 0..=stream.len() {
            let all = event_stream(&stream, &[cut]).concat();
            assert!(!contains(&all, KEY.as_bytes()) && contains(&all, REDACTED));
            assert!(all.ends_with(&good), "cut at {cut}");
        }
        // Not an event stream at all, and a message cut short by the end of the body.
        for body in [format!("plain {KEY} text").into_bytes(), {
            let m = message("contentBlockDelta", format!("x{KEY}x").as_bytes());
            m[..m.len() - 3].to_vec()
        }] {
            for cut in 0..=body.len() {
                let all = event_stream(&body, &[cut]).concat();
                assert!(!contains(&all, KEY.as_bytes()), "cut at {cut}");
            }
        }
        // An over-long message streams through the byte scrubber without being held.
        let big_text = format!("{}{KEY}", "y".repeat(MAX_HELD_MESSAGE));
        let big = message("chunk", big_text.as_bytes());
        let mut scrubber = Scrubber::new(&secret(KEY));
        let mut events = EventStreamScrub::default();
        let mut all = Vec::new();
        for piece in big.chunks(4096).chain([good.as_slice()]) {
            all.extend_from_slice(&events.push(Bytes::copy_from_slice(piece), &mut scrubber));
            assert!(events.held() <= good.len(), "{}", events.held());
        }
        assert!(!contains(&all, KEY.as_bytes()));
        assert!(all.ends_with(&good));
    }

    fn contains(hay: &[u8], needle: &[u8]) -> bool {
        hay.windows(needle.len()).any(|w| w == needle)
    }

    /// A credential document's secrets and those derived from it, with more distinct first
    /// bytes than one key's forms have, are all found, split at every offset.
    #[test]
    fn first_bytes_find_the_first_byte_that_starts_a_needle_and_no_other() {
        // Sets of zero to four distinct first bytes: the three that fit in `bytes` (their
        // unused slots hold 0) and the table past them.
        for starts in [&b""[..], b"s", b"s%", b"s%\\", b"s%\\a"] {
            let needles: Vec<Needle> = starts
                .iter()
                .map(|&b| Needle::new(Secret::from_slice(&[b, b'k', b'e', b'y'])))
                .collect();
            let firsts = first_bytes(&needles);
            // Every other byte value, NUL first.
            let others: Vec<u8> = (0..=255u8).filter(|b| !starts.contains(b)).collect();
            assert_eq!(firsts.find(&others), None, "{starts:?}");
            for &b in starts {
                let hay = [&others[..], &[b], &others[..]].concat();
                assert_eq!(firsts.find(&hay), Some(others.len()), "{starts:?}: {b}");
            }
        }
    }

    #[test]
    fn several_secrets_are_all_replaced() {
        let secrets = [
            "wJalrXUtnFEMI/K7MDENG+bPxRfiCY",
            "FwoGZXIvYXdzEBY",
            "ASIAxyz",
            "%q\\z",
        ];
        let parts: Vec<Secret> = secrets
            .iter()
            .map(|s| Secret::from_slice(s.as_bytes()))
            .collect();
        let text = format!(
            "a{}b{}c{}d{}e",
            secrets[0], secrets[1], secrets[2], secrets[3]
        );
        for cut in 0..=text.len() {
            let (x, y) = text.as_bytes().split_at(cut);
            let mut scrubber = Scrubber::for_secrets(&parts);
            let mut out = BytesMut::new();
            scrubber.push(x, &mut out);
            scrubber.push(y, &mut out);
            scrubber.finish_into(&mut out);
            assert_eq!(
                &out[..],
                b"a[REDACTED]b[REDACTED]c[REDACTED]d[REDACTED]e",
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn several_secrets_with_many_first_bytes_are_all_replaced_across_chunks() {
        // A document's parts and a derived token: more distinct first bytes than one key's
        // forms, and one part inside another.
        let parts = [
            "ya29.a0AfB_token",
            "MIIEvQIBADANBgkq",
            "Q~client/secret",
            "kq",
        ];
        let secrets: Vec<Secret> = parts.iter().map(|p| secret(p)).collect();
        let input = "t=ya29.a0AfB_token k=MIIEvQIBADANBgkqhk c=Q~client\\/secret x";
        for cut in 0..input.len() {
            let mut s = Scrubber::for_secrets(&secrets);
            let mut out = BytesMut::new();
            s.push(&input.as_bytes()[..cut], &mut out);
            s.push(&input.as_bytes()[cut..], &mut out);
            s.finish_into(&mut out);
            assert_eq!(
                std::str::from_utf8(&out).unwrap(),
                "t=[REDACTED] k=[REDACTED]hk c=[REDACTED] x",
                "cut at {cut}"
            );
        }
        let mut headers = HeaderMap::new();
        headers.insert("x-echo", HeaderValue::from_static("Q~client/secret"));
        headers.insert("x-ya29.a0afb_token", HeaderValue::from_static("1"));
        Scrubber::for_secrets(&secrets).scrub_headers(&mut headers);
        assert_eq!(headers["x-echo"], "[REDACTED]");
        assert!(!headers.contains_key("x-ya29.a0afb_token"));
    }

    #[test]
    fn whole_secret_in_one_chunk_is_replaced() {
        let text = format!("before {KEY} after");
        assert_eq!(
            scrub_all(KEY, &[text.as_bytes()]),
            b"before [REDACTED] after"
        );
    }

    #[test]
    fn secret_split_across_two_chunks_at_every_offset_is_replaced() {
        let text = format!("x{KEY}y");
        for cut in 0..=text.len() {
            let (a, b) = text.as_bytes().split_at(cut);
            assert_eq!(scrub_all(KEY, &[a, b]), b"x[REDACTED]y", "cut at {cut}");
        }
    }

    #[test]
    fn secret_in_one_byte_chunks_is_replaced() {
        let text = format!("a{KEY}b{KEY}{KEY}c");
        let chunks: Vec<&[u8]> = text.as_bytes().chunks(1).collect();
        assert_eq!(
            scrub_all(KEY, &chunks),
            b"a[REDACTED]b[REDACTED][REDACTED]c"
        );
    }

    #[test]
    fn self_overlapping_patterns_match_like_replace() {
        assert_eq!(scrub_all("aaab", &[b"aaaab"]), b"a[REDACTED]");
        assert_eq!(scrub_all("abab", &[b"ababab"]), b"[REDACTED]ab");
        assert_eq!(scrub_all("abab", &[b"abababab"]), b"[REDACTED][REDACTED]");
        assert_eq!(scrub_all("aa", &[b"aaaaa"]), b"[REDACTED][REDACTED]a");
        for chunks in [&[&b"aa"[..], b"aab"][..], &[b"a", b"a", b"a", b"a", b"b"]] {
            assert_eq!(scrub_all("aaab", chunks), b"a[REDACTED]");
        }
    }

    #[test]
    fn openai_style_error_body_is_scrubbed() {
        let body = format!(
            "{{\n    \"error\": {{\n        \"message\": \"Incorrect API key provided: {KEY}. You \
             can find your API key at https://platform.openai.com/account/api-keys.\",\n        \
             \"type\": \"invalid_request_error\",\n        \"param\": null,\n        \"code\": \
             \"invalid_api_key\"\n    }}\n}}\n"
        );
        let expected = body.replace(KEY, "[REDACTED]");
        for chunk_len in [1, 7, 64, body.len()] {
            let chunks: Vec<&[u8]> = body.as_bytes().chunks(chunk_len).collect();
            let out = scrub_all(KEY, &chunks);
            assert_eq!(String::from_utf8(out).unwrap(), expected);
        }
    }

    #[test]
    fn prefix_that_does_not_complete_is_released_exactly_in_order() {
        // "sk-proj-Ab" is a prefix of KEY, then the text diverges.
        let (outs, tail) = run_chunks(KEY, &[b"one sk-proj-Ab", b"X two", b" sk-pr"]);
        assert_eq!(outs[0], b"one ");
        assert_eq!(outs[1], b"sk-proj-AbX two");
        assert_eq!(outs[2], b" ");
        assert_eq!(tail, b"sk-pr");
    }

    #[test]
    fn divergence_that_starts_a_new_prefix_keeps_only_the_new_prefix() {
        // After "sk-sk-" only the second "sk-" can still start the key.
        let (outs, tail) = run_chunks(KEY, &[b"sk-", b"sk-"]);
        assert_eq!(outs, vec![b"".to_vec(), b"sk-".to_vec()]);
        assert_eq!(tail, b"sk-");
    }

    #[test]
    fn bytes_that_cannot_start_the_secret_are_emitted_immediately() {
        let mut scrubber = Scrubber::new(&secret("sk-.."));
        let mut out = BytesMut::new();
        scrubber.push(b"hello ", &mut out);
        assert_eq!(&out[..], b"hello ");
        assert_eq!(scrubber.held_back(), 0);
        scrubber.push(b"world s", &mut out);
        assert_eq!(&out[..], b"hello world ");
        assert_eq!(scrubber.held_back(), 1);
    }

    #[test]
    fn push_bytes_returns_the_input_without_copy_when_clean() {
        let mut scrubber = Scrubber::new(&secret(KEY));
        let chunk = Bytes::from_static(b"data: {\"delta\":\"hi\"}\n\n");
        let out = scrubber.push_bytes(chunk.clone());
        assert_eq!(out, chunk);
        assert_eq!(out.as_ptr(), chunk.as_ptr(), "clean chunk is not copied");
        let held = scrubber.push_bytes(Bytes::from_static(b"tail sk-proj"));
        assert_eq!(held, Bytes::from_static(b"tail "));
        let out = scrubber.push_bytes(Bytes::from_static(b"-Abc123_xyz-789!"));
        assert_eq!(out, Bytes::from_static(b"[REDACTED]!"));
        assert!(scrubber.finish().is_empty());
    }

    #[test]
    fn empty_secret_scrubs_nothing() {
        assert_eq!(scrub_all("", &[b"abc", b""]), b"abc");
    }

    #[test]
    fn json_escaped_slash_form_is_scrubbed_too() {
        let key = "ab/cd/ef";
        let out = scrub_all(key, &[br#"{"raw":"ab/cd/ef","php":"ab\/cd\/ef"}"#]);
        assert_eq!(out, br#"{"raw":"[REDACTED]","php":"[REDACTED]"}"#);
        let chunks: Vec<&[u8]> = br#"x ab\/cd\/ef y"#.chunks(1).collect();
        assert_eq!(scrub_all(key, &chunks), b"x [REDACTED] y");
    }

    #[test]
    fn json_escaped_quote_and_backslash_forms_are_scrubbed_too() {
        let key = r#"k"e\y/z"#;
        let inputs: [&[u8]; 3] = [br#"k"e\y/z"#, br#"k\"e\\y/z"#, br#"k\"e\\y\/z"#];
        for input in inputs {
            for cut in 0..=input.len() {
                let (a, b) = input.split_at(cut);
                assert_eq!(scrub_all(key, &[b"<", a, b, b">"]), b"<[REDACTED]>");
            }
        }
    }

    #[test]
    fn percent_encoded_and_unicode_escaped_forms_are_scrubbed_at_every_split() {
        let key = "kw/Ab+c=d";
        let inputs: [&[u8]; 5] = [
            b"kw%2FAb%2Bc%3Dd",
            b"kw%2fAb%2bc%3dd",
            br"kw/Ab+c=d",
            br"kw/Ab+c=d",
            br"kw\/Ab+c=d",
        ];
        for input in inputs {
            for cut in 0..=input.len() {
                let (a, b) = input.split_at(cut);
                assert_eq!(
                    scrub_all(key, &[b"<", a, b, b">"]),
                    b"<[REDACTED]>",
                    "{}",
                    String::from_utf8_lossy(input)
                );
            }
        }
        // A key of unreserved bytes only has no encoded forms to find.
        assert_eq!(scrub_all("sk-abc", &[b"sk%2Dabc"]), b"sk%2Dabc");
    }

    #[test]
    fn a_key_starting_with_a_reserved_byte_is_found_in_every_form() {
        let key = "/abc=";
        let text = br#"a /abc= b %2Fabc%3D c /abc= d"#;
        let chunks: Vec<&[u8]> = text.chunks(1).collect();
        assert_eq!(
            scrub_all(key, &chunks),
            b"a [REDACTED] b [REDACTED] c [REDACTED] d"
        );
    }

    #[test]
    fn partial_key_preview_is_left_alone() {
        let text = b"key sk-p...-789 is invalid";
        assert_eq!(scrub_all(KEY, &[text]), text);
    }

    /// xorshift64*: deterministic, good enough to pick lengths and bytes.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    /// Splits `text` at random points (including empty chunks).
    fn random_chunks<'a>(rng: &mut Rng, text: &'a [u8]) -> Vec<&'a [u8]> {
        let mut chunks = Vec::new();
        let mut rest = text;
        while !rest.is_empty() {
            let n = rng.below(rest.len().min(9) + 1);
            let (a, b) = rest.split_at(n);
            chunks.push(a);
            rest = b;
        }
        chunks
    }

    #[test]
    fn random_streams_match_replace_on_the_whole_text() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for round in 0..4000 {
            // A small alphabet makes overlaps and near misses frequent.
            let alphabet = &b"ab-k"[..2 + rng.below(3)];
            let key: String = (0..1 + rng.below(7))
                .map(|_| alphabet[rng.below(alphabet.len())] as char)
                .collect();
            let mut text = String::new();
            for _ in 0..rng.below(60) {
                if rng.below(8) == 0 {
                    text.push_str(&key);
                } else {
                    text.push(alphabet[rng.below(alphabet.len())] as char);
                }
            }
            let chunks = random_chunks(&mut rng, text.as_bytes());
            let mut scrubber = Scrubber::new(&secret(&key));
            let mut out = BytesMut::new();
            let mut seen = 0;
            for chunk in &chunks {
                scrubber.push(chunk, &mut out);
                seen += chunk.len();
                // Only a proper prefix of the key is ever held, and it is exactly the unsent tail.
                let held = scrubber.held_back();
                assert!(held < key.len(), "round {round}");
                assert!(
                    key.as_bytes()
                        .starts_with(&text.as_bytes()[seen - held..seen])
                );
            }
            let mut via_bytes = Vec::new();
            let mut scrubber2 = Scrubber::new(&secret(&key));
            for chunk in &chunks {
                via_bytes.extend_from_slice(&scrubber2.push_bytes(Bytes::copy_from_slice(chunk)));
            }
            via_bytes.extend_from_slice(&scrubber2.finish());
            out.extend_from_slice(&scrubber.finish());
            let expected = text.replace(&key, "[REDACTED]");
            assert_eq!(
                String::from_utf8(out.to_vec()).unwrap(),
                expected,
                "round {round}: key {key:?} text {text:?} chunks {chunks:?}"
            );
            assert_eq!(String::from_utf8(via_bytes).unwrap(), expected);
        }
    }

    /// Reference for several needles: replace the occurrence that ends first (longest on a
    /// tie), restart after it.
    fn reference_multi(needles: &[Vec<u8>], text: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut start = 0;
        let mut end = 0;
        while end < text.len() {
            end += 1;
            let hit = needles
                .iter()
                .filter(|n| end - start >= n.len() && text[..end].ends_with(n))
                .map(|n| n.len())
                .max();
            if let Some(len) = hit {
                out.extend_from_slice(&text[start..end - len]);
                out.extend_from_slice(REDACTED);
                start = end;
            }
        }
        out.extend_from_slice(&text[start..]);
        out
    }

    #[test]
    fn random_streams_with_escaped_forms_match_the_reference() {
        let mut rng = Rng(0x1234_5678_9abc_def1);
        let alphabet = br#"a/\""#;
        // Filler no key form starts with, so the skip-ahead between matches is exercised too.
        let text_alphabet = br#"a/\"xyz"#;
        for round in 0..3000 {
            let key: Vec<u8> = (0..1 + rng.below(5))
                .map(|_| alphabet[rng.below(alphabet.len())])
                .collect();
            let needles: Vec<Vec<u8>> = needles_for(&Secret::from_slice(&key))
                .iter()
                .map(|n| n.bytes.expose_secret().to_vec())
                .collect();
            let mut text = Vec::new();
            for _ in 0..rng.below(50) {
                if rng.below(6) == 0 {
                    text.extend_from_slice(&needles[rng.below(needles.len())]);
                } else {
                    text.push(text_alphabet[rng.below(text_alphabet.len())]);
                }
            }
            let chunks = random_chunks(&mut rng, &text);
            let mut scrubber = Scrubber::new(&Secret::from_slice(&key));
            let mut out = BytesMut::new();
            for chunk in &chunks {
                scrubber.push(chunk, &mut out);
            }
            scrubber.finish_into(&mut out);
            assert_eq!(
                out.to_vec(),
                reference_multi(&needles, &text),
                "round {round}: key {:?} text {:?}",
                String::from_utf8_lossy(&key),
                String::from_utf8_lossy(&text)
            );
        }
    }

    #[test]
    fn header_values_are_scrubbed_and_kept() {
        let mut headers = HeaderMap::new();
        headers.insert("x-debug-auth", format!("Bearer {KEY}").parse().unwrap());
        headers.append("x-echo", format!("{KEY},{KEY}").parse().unwrap());
        headers.append("x-echo", "clean".parse().unwrap());
        headers.insert("content-type", "application/json".parse().unwrap());
        Scrubber::new(&secret(KEY)).scrub_headers(&mut headers);
        assert_eq!(headers["x-debug-auth"], "Bearer [REDACTED]");
        let echoes: Vec<_> = headers.get_all("x-echo").iter().collect();
        assert_eq!(echoes, ["[REDACTED],[REDACTED]", "clean"]);
        assert_eq!(headers["content-type"], "application/json");
    }

    /// The response's one scrubber does the headers first and then the body: what a header
    /// value ends with must not carry over into the body, in either direction.
    #[test]
    fn headers_then_body_share_one_scrubber_without_carry_over() {
        let mut scrubber = Scrubber::new(&secret(KEY));
        let (head, tail) = KEY.split_at(8);
        let mut whole = HeaderMap::new();
        whole.insert("x-whole", format!("<{KEY}>").parse().unwrap());
        let mut partial = HeaderMap::new();
        partial.insert("x-tail", format!("ends with {head}").parse().unwrap());
        scrubber.scrub_headers(&mut partial);
        assert_eq!(partial["x-tail"], format!("ends with {head}").as_str());
        assert_eq!(scrubber.held_back(), 0);
        scrubber.scrub_headers(&mut whole);
        assert_eq!(whole["x-whole"], "<[REDACTED]>");
        scrubber.scrub_headers(&mut partial);
        assert_eq!(scrubber.held_back(), 0);
        let mut out = BytesMut::new();
        scrubber.push(tail.as_bytes(), &mut out);
        scrubber.push(format!(" then {KEY}").as_bytes(), &mut out);
        scrubber.finish_into(&mut out);
        assert_eq!(&out[..], format!("{tail} then [REDACTED]").as_bytes());
    }

    #[test]
    fn header_named_after_the_secret_is_removed() {
        let key = "AbCdEf0123456789";
        let mut headers = HeaderMap::new();
        let name = HeaderName::from_bytes(format!("x-{key}").as_bytes()).unwrap();
        headers.insert(name, "1".parse().unwrap());
        headers.insert("x-other", "2".parse().unwrap());
        Scrubber::new(&secret(key)).scrub_headers(&mut headers);
        assert_eq!(headers.len(), 1);
        assert_eq!(headers["x-other"], "2");
    }

    #[test]
    fn debug_output_shows_no_secret() {
        let scrubber = Scrubber::new(&secret(KEY));
        let shown = format!("{scrubber:?}");
        assert!(!shown.contains("sk-"), "{shown}");
        let body = ScrubBody::new(
            http_body_util::Empty::<Bytes>::new(),
            Scrubber::new(&secret(KEY)),
        );
        let shown = format!("{body:?}");
        assert!(!shown.contains("sk-"), "{shown}");
    }

    type Frames = VecDeque<Result<Frame<Bytes>, Infallible>>;

    fn body_of(frames: Frames) -> impl Body<Data = Bytes, Error = Infallible> + Unpin {
        ScrubBody::new(
            StreamBody::new(stream::iter(frames)),
            Scrubber::new(&secret(KEY)),
        )
    }

    async fn collect_frames<B>(mut body: B) -> (Vec<Bytes>, Option<HeaderMap>)
    where
        B: Body<Data = Bytes, Error = Infallible> + Unpin,
    {
        let mut data = Vec::new();
        let mut trailers = None;
        while let Some(frame) = body.frame().await {
            let frame = frame.unwrap();
            assert!(trailers.is_none(), "nothing may follow trailers");
            match frame.into_data() {
                Ok(bytes) => data.push(bytes),
                Err(frame) => trailers = Some(frame.into_trailers().unwrap()),
            }
        }
        assert!(body.is_end_stream());
        (data, trailers)
    }

    #[tokio::test]
    async fn body_scrubs_across_frames_and_flushes_before_trailers() {
        let (a, b) = KEY.split_at(9);
        let mut trailer = HeaderMap::new();
        trailer.insert("x-echo", format!("key={KEY}").parse().unwrap());
        let frames: Frames = [
            Frame::data(Bytes::from("data: hello\n\n")),
            Frame::data(Bytes::from(format!("data: {a}"))),
            Frame::data(Bytes::from(format!("{b}\n\nsk-p"))),
            Frame::trailers(trailer),
        ]
        .into_iter()
        .map(Ok)
        .collect();
        let (data, trailers) = collect_frames(body_of(frames)).await;
        assert_eq!(
            data,
            [
                Bytes::from("data: hello\n\n"),
                Bytes::from("data: "),
                Bytes::from("[REDACTED]\n\n"),
                Bytes::from("sk-p"),
            ]
        );
        assert_eq!(trailers.unwrap()["x-echo"], "key=[REDACTED]");
    }

    #[tokio::test]
    async fn body_without_trailers_flushes_held_bytes_at_end() {
        let frames: Frames = [
            Frame::data(Bytes::from("abc sk-proj")),
            Frame::data(Bytes::from("")),
            Frame::data(Bytes::from("-A")),
        ]
        .into_iter()
        .map(Ok)
        .collect();
        let body = body_of(frames);
        assert!(body.size_hint().exact().is_none());
        let (data, trailers) = collect_frames(body).await;
        assert_eq!(data, [Bytes::from("abc "), Bytes::from("sk-proj-A")]);
        assert!(trailers.is_none());
    }

    #[tokio::test]
    async fn body_delivers_each_clean_frame_as_it_arrives() {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(1);
        let stream = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        });
        let mut body = ScrubBody::new(
            StreamBody::new(Box::pin(stream)),
            Scrubber::new(&secret(KEY)),
        );
        tx.send(Ok(Frame::data(Bytes::from("data: 1\n\n"))))
            .await
            .unwrap();
        let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(first, "data: 1\n\n");
        tx.send(Ok(Frame::data(Bytes::from(format!("data: {KEY}\n\n")))))
            .await
            .unwrap();
        let second = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(second, "data: [REDACTED]\n\n");
        drop(tx);
        assert!(body.frame().await.is_none());
    }

    /// The forms of `key` a response may carry, written here independently of `needles_for`:
    /// the raw bytes, the JSON string forms, and for a whole secret with bytes outside RFC
    /// 3986's unreserved set the percent and `\u` encodings in both cases of hex digit.
    fn expected_forms(key: &[u8], whole: bool) -> Vec<Vec<u8>> {
        let json = |slash: bool| -> Vec<u8> {
            let mut out = Vec::new();
            for &b in key {
                if b == b'"' || b == b'\\' || (slash && b == b'/') {
                    out.push(b'\\');
                }
                out.push(b);
            }
            out
        };
        let plain = |b: u8| b.is_ascii_alphanumeric() || b"-._~".contains(&b);
        let mut forms = vec![key.to_vec()];
        if key.iter().any(|&b| b == b'"' || b == b'\\') {
            forms.push(json(false));
        }
        if key.contains(&b'/') {
            forms.push(json(true));
        }
        if whole && !key.iter().all(|&b| plain(b)) {
            let encodings: [fn(u8) -> String; 4] = [
                |b| format!("%{b:02X}"),
                |b| format!("%{b:02x}"),
                |b| format!("\\u{b:04X}"),
                |b| format!("\\u{b:04x}"),
            ];
            for encode in encodings {
                let mut out = Vec::new();
                for &b in key {
                    if plain(b) {
                        out.push(b);
                    } else {
                        out.extend_from_slice(encode(b).as_bytes());
                    }
                }
                forms.push(out);
            }
        }
        forms
    }

    /// Every form of a whole secret is replaced, a fragment's raw and JSON forms only, and
    /// nothing else: random keys over bytes that each form treats differently, in text that
    /// holds every candidate form, against [`reference_multi`] over the forms listed
    /// independently above.
    #[test]
    fn each_kind_of_secret_is_found_in_exactly_its_forms() {
        let mut rng = Rng(0x0dd_ba11_cafe_f00d);
        let key_alphabet = br#"aZ9~/\"+%"#;
        let filler = br#"ax/\"%2Fu0"#;
        let fixed: [&[u8]; 9] = [
            b"\"", b"\\", b"\"\"", b"\\\\", b"/", b"a\"", b"+", b"~a", b"Z9",
        ];
        for round in 0..3000 {
            let key: Vec<u8> = match fixed.get(round) {
                Some(k) => k.to_vec(),
                None => (0..1 + rng.below(4))
                    .map(|_| key_alphabet[rng.below(key_alphabet.len())])
                    .collect(),
            };
            let candidates = expected_forms(&key, true);
            let mut text = Vec::new();
            for _ in 0..rng.below(40) {
                if rng.below(4) == 0 {
                    text.extend_from_slice(&candidates[rng.below(candidates.len())]);
                } else {
                    text.push(filler[rng.below(filler.len())]);
                }
            }
            let chunks = random_chunks(&mut rng, &text);
            for whole in [true, false] {
                let secrets = [Secret::from_slice(&key)];
                let set = if whole {
                    ScrubSet::new(&secrets, &[])
                } else {
                    ScrubSet::new(&[], &secrets)
                };
                let mut scrubber = Scrubber::from_set(&set);
                let mut out = BytesMut::new();
                for chunk in &chunks {
                    scrubber.push(chunk, &mut out);
                }
                scrubber.finish_into(&mut out);
                assert_eq!(
                    out.to_vec(),
                    reference_multi(&expected_forms(&key, whole), &text),
                    "round {round} whole {whole}: key {:?} text {:?}",
                    String::from_utf8_lossy(&key),
                    String::from_utf8_lossy(&text)
                );
            }
        }
    }

    #[test]
    fn only_a_header_name_holding_the_key_is_removed() {
        let key = "Ab12";
        let mut headers = HeaderMap::new();
        // Longer than the key, without it: kept.
        headers.insert("x-a-long-header-name", HeaderValue::from_static("1"));
        headers.insert("x-ab1-ab12", HeaderValue::from_static("2"));
        headers.insert("x-ab1", HeaderValue::from_static("3"));
        Scrubber::new(&secret(key)).scrub_headers(&mut headers);
        assert_eq!(headers.len(), 2, "{headers:?}");
        assert_eq!(headers["x-a-long-header-name"], "1");
        assert_eq!(headers["x-ab1"], "3");
    }

    /// A string header as [`crate::providers::bedrock::encode_message`] takes it.
    fn string_header<'a>(name: &'a str, value: &str) -> (&'a [u8], u8, Vec<u8>) {
        let mut v = (value.len() as u16).to_be_bytes().to_vec();
        v.extend_from_slice(value.as_bytes());
        (name.as_bytes(), 7, v)
    }

    #[test]
    fn event_stream_header_values_are_scrubbed_and_a_header_named_after_the_key_dropped() {
        use crate::providers::bedrock::encode_message;
        let named = format!("x-{KEY}");
        let kept = |echo: &str| {
            vec![
                string_header(":event-type", "contentBlockDelta"),
                string_header("x-echo", echo),
                string_header(":message-type", "event"),
            ]
        };
        let mut headers = kept(&format!("key {KEY}"));
        headers.insert(2, string_header(&named, "1"));
        let message = encode_message(&headers, b"{}").unwrap();
        let want = encode_message(&kept("key [REDACTED]"), b"{}").unwrap();
        for cut in 0..=message.len() {
            assert_eq!(
                event_stream(&message, &[cut]).concat(),
                want,
                "cut at {cut}"
            );
        }
        // Only a name holding the key is dropped: the same message without it, and with the
        // key only in the name, loses just that header.
        let headers = [kept("clean"), vec![string_header(&named, "1")]].concat();
        let message = encode_message(&headers, b"{}").unwrap();
        let want = encode_message(&kept("clean"), b"{}").unwrap();
        assert_eq!(event_stream(&message, &[7]).concat(), want);
    }

    #[test]
    fn event_stream_message_of_the_largest_held_size_is_encoded_again() {
        use crate::providers::bedrock::tests_support::message;
        let overhead = message("chunk", b"").len();
        let pad = "y".repeat(MAX_HELD_MESSAGE - overhead - KEY.len() - 1);
        let at_limit = message("chunk", format!("{pad}{KEY}.").as_bytes());
        assert_eq!(at_limit.len(), MAX_HELD_MESSAGE);
        let out = event_stream(&at_limit, &[4096, 700_000]).concat();
        assert_eq!(messages(&out), [format!("{pad}[REDACTED].").into_bytes()]);
        // So is one of a few hundred KiB (Bedrock's are a few KiB).
        let text = "y".repeat(300_000);
        let big = message("chunk", format!("{text}{KEY}.").as_bytes());
        let out = event_stream(&big, &[4096, 200_000]).concat();
        assert_eq!(messages(&out), [format!("{text}[REDACTED].").into_bytes()]);
        // One byte longer streams as bytes: the key is replaced, the checksum no longer holds.
        let over = message("chunk", format!("{pad}y{KEY}.").as_bytes());
        let out = event_stream(&over, &[4096, 700_000]).concat();
        let want = [
            &over[..over.len() - KEY.len() - 5],
            REDACTED,
            &over[over.len() - 5..],
        ]
        .concat();
        assert_eq!(out, want);
    }

    /// An over-long message passes through the byte scrubber for exactly its length, keeping
    /// a key cut across chunks inside it, and the message after it is collected and encoded
    /// again.
    #[test]
    fn event_stream_resumes_message_framing_after_an_over_long_message() {
        use crate::providers::bedrock::tests_support::message;
        let big = message(
            "chunk",
            format!("{}{KEY}z", "y".repeat(MAX_HELD_MESSAGE)).as_bytes(),
        );
        let key_at = big.len() - 4 - 1 - KEY.len();
        let next = message("contentBlockDelta", format!("x{KEY}x").as_bytes());
        let stream = [big.clone(), next.clone()].concat();
        let cuts = [
            5000,
            key_at + 5,
            big.len() - 2,
            big.len() + 30,
            big.len() + next.len() - 8,
        ];
        let want = [
            &big[..key_at],
            REDACTED,
            &big[key_at + KEY.len()..],
            &message("contentBlockDelta", b"x[REDACTED]x"),
        ]
        .concat();
        assert_eq!(event_stream(&stream, &cuts).concat(), want);
    }

    #[test]
    fn event_stream_message_cut_short_is_sent_scrubbed_at_the_end() {
        use crate::providers::bedrock::tests_support::message;
        let m = message("contentBlockDelta", format!("x{KEY}x").as_bytes());
        let cut_short = &m[..m.len() - 3];
        let key_at = m.len() - 4 - 1 - KEY.len();
        let want = [&m[..key_at], REDACTED, &m[key_at + KEY.len()..m.len() - 3]].concat();
        for cut in [0, 11, 12, 40, key_at + 3, cut_short.len()] {
            let outs = event_stream(cut_short, &[cut]);
            assert_eq!(outs.concat(), want, "cut at {cut}");
            assert_eq!(outs.last().unwrap(), &want, "sent only at the end");
        }
    }

    /// A body of scripted frames that says it has ended once none are left (as hyper's
    /// `Incoming` does after its last frame).
    struct Scripted(VecDeque<Frame<Bytes>>);

    impl Body for Scripted {
        type Data = Bytes;
        type Error = Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
            Poll::Ready(self.0.pop_front().map(Ok))
        }

        fn is_end_stream(&self) -> bool {
            self.0.is_empty()
        }
    }

    fn scripted(frames: Vec<Frame<Bytes>>, content_type: Option<&str>) -> ScrubBody<Scripted> {
        ScrubBody::new(Scripted(frames.into()), Scrubber::new(&secret(KEY))).framed_by(content_type)
    }

    /// Polls `body` to its end (at most 50 frames), noting after each frame whether the body
    /// said it had ended.
    async fn frames_and_ends(mut body: ScrubBody<Scripted>) -> (Vec<Frame<Bytes>>, Vec<bool>) {
        let mut frames = Vec::new();
        let mut ends = vec![body.is_end_stream()];
        while let Some(frame) = body.frame().await {
            frames.push(frame.unwrap());
            ends.push(body.is_end_stream());
            assert!(frames.len() < 50, "the body does not end");
        }
        assert!(body.is_end_stream());
        (frames, ends)
    }

    fn data_of(frames: &[Frame<Bytes>]) -> Vec<Bytes> {
        frames
            .iter()
            .filter_map(|f| f.data_ref().cloned())
            .collect()
    }

    #[tokio::test]
    async fn body_ends_only_when_nothing_is_held_or_pending() {
        // Bytes held after the inner body's last frame: not the end until they are sent.
        let frames = vec![Frame::data(Bytes::from("abc sk-proj"))];
        let (got, ends) = frames_and_ends(scripted(frames, None)).await;
        assert_eq!(data_of(&got), [Bytes::from("abc "), Bytes::from("sk-proj")]);
        assert_eq!(ends, [false, false, true]);
        // Nothing held: the end as soon as the inner body's last frame is through.
        let frames = vec![
            Frame::data(Bytes::from("one ")),
            Frame::data(Bytes::from("two")),
        ];
        let (got, ends) = frames_and_ends(scripted(frames, None)).await;
        assert_eq!(data_of(&got), [Bytes::from("one "), Bytes::from("two")]);
        assert_eq!(ends, [false, false, true]);
        // Trailers behind held bytes: not the end until they are sent too.
        let mut trailers = HeaderMap::new();
        trailers.insert("x-t", HeaderValue::from_static("1"));
        let frames = vec![
            Frame::data(Bytes::from("abc sk-proj")),
            Frame::trailers(trailers),
        ];
        let (got, ends) = frames_and_ends(scripted(frames, None)).await;
        assert_eq!(data_of(&got), [Bytes::from("abc "), Bytes::from("sk-proj")]);
        assert_eq!(got[2].trailers_ref().unwrap()["x-t"], "1");
        assert_eq!(ends, [false, false, false, true]);
    }

    #[tokio::test]
    async fn event_stream_body_is_framed_by_its_content_type_only() {
        use crate::providers::bedrock::tests_support::message;
        let m = message("contentBlockDelta", format!("x{KEY}x").as_bytes());
        let clean = message("contentBlockDelta", b"x[REDACTED]x");
        let split = |m: &[u8]| {
            vec![
                Frame::data(Bytes::copy_from_slice(&m[..20])),
                Frame::data(Bytes::copy_from_slice(&m[20..])),
            ]
        };
        for content_type in [
            "application/vnd.amazon.eventstream",
            "Application/Vnd.Amazon.EventStream ; charset=utf-8",
        ] {
            let (got, ends) = frames_and_ends(scripted(split(&m), Some(content_type))).await;
            assert_eq!(
                data_of(&got),
                [Bytes::from(clean.clone())],
                "{content_type}"
            );
            assert_eq!(ends, [false, true]);
        }
        // A message cut short is held, so the body has not ended when the inner one has; it
        // is sent scrubbed as bytes at the end.
        let cut_short = &m[..m.len() - 3];
        let stream = [&m[..], cut_short].concat();
        let body = scripted(split(&stream), Some("application/vnd.amazon.eventstream"));
        let (got, ends) = frames_and_ends(body).await;
        let want = [
            Bytes::from(clean.clone()),
            Bytes::from(cut_short.replace_key()),
        ];
        assert_eq!(data_of(&got), want);
        assert_eq!(ends, [false, false, true]);
        // Any other body streams as bytes, each frame as it comes, however short.
        for content_type in [None, Some("text/event-stream")] {
            let frames = vec![
                Frame::data(Bytes::from("hi")),
                Frame::data(Bytes::from(" x")),
            ];
            let (got, _) = frames_and_ends(scripted(frames, content_type)).await;
            assert_eq!(data_of(&got), [Bytes::from("hi"), Bytes::from(" x")]);
        }
    }

    trait ReplaceKey {
        fn replace_key(&self) -> Vec<u8>;
    }

    impl ReplaceKey for [u8] {
        /// The bytes with every occurrence of [`KEY`] replaced.
        fn replace_key(&self) -> Vec<u8> {
            let (mut out, mut rest) = (Vec::new(), self);
            while let Some(at) = rest.windows(KEY.len()).position(|w| w == KEY.as_bytes()) {
                out.extend_from_slice(&rest[..at]);
                out.extend_from_slice(REDACTED);
                rest = &rest[at + KEY.len()..];
            }
            out.extend_from_slice(rest);
            out
        }
    }

    #[test]
    fn debug_output_shows_counts_and_state() {
        let set = ScrubSet::new(&[secret("a/b")], &[secret("cd")]);
        // a/b: raw, \/ form, %2F, %2f, \u002F, \u002f; cd: raw.
        assert_eq!(format!("{set:?}"), "ScrubSet { needles: 7 }");
        let mut scrubber = Scrubber::from_set(&set);
        scrubber.push(b"x a", &mut BytesMut::new());
        assert_eq!(
            format!("{scrubber:?}"),
            "Scrubber { needles: 7, held_back: 1, .. }"
        );
        let body = ScrubBody::new(http_body_util::Empty::<Bytes>::new(), scrubber);
        assert_eq!(
            format!("{body:?}"),
            "ScrubBody { scrubber: Scrubber { needles: 7, held_back: 1, .. }, \
             inner_done: false, done: false, .. }"
        );
    }

    #[test]
    fn a_key_cut_across_repeated_header_values_replaces_that_header() {
        let (head, tail) = KEY.split_at(9);
        let mut headers = HeaderMap::new();
        headers.append("x-part", head.parse().unwrap());
        headers.append("x-part", tail.parse().unwrap());
        headers.append("x-list", "a".parse().unwrap());
        headers.append("x-list", "b".parse().unwrap());
        Scrubber::new(&secret(KEY)).scrub_headers(&mut headers);
        let parts: Vec<_> = headers.get_all("x-part").iter().collect();
        assert_eq!(parts, ["[REDACTED]"]);
        let list: Vec<_> = headers.get_all("x-list").iter().collect();
        assert_eq!(list, ["a", "b"]);
    }

    /// `%` is a token character, so a key's percent form can stand in a header name (lowercased
    /// by HTTP) where its raw bytes (`/`, `+`, `=`) cannot.
    #[test]
    fn a_header_name_holding_the_keys_percent_form_is_removed() {
        let key = "kw/Ab+c=d";
        let mut headers = HeaderMap::new();
        headers.insert("x-kw%2fab%2bc%3dd", HeaderValue::from_static("1"));
        headers.insert("x-kw%2fab", HeaderValue::from_static("2"));
        Scrubber::new(&secret(key)).scrub_headers(&mut headers);
        assert_eq!(headers.len(), 1, "{headers:?}");
        assert_eq!(headers["x-kw%2fab"], "2");
        // The same in an event-stream message, whose header names are bytes.
        use crate::providers::bedrock::encode_message;
        let kept = vec![string_header(":event-type", "chunk")];
        let headers = [kept.clone(), vec![string_header("x-kw%2FAb%2Bc%3Dd", "1")]].concat();
        let message = encode_message(&headers, b"{}").unwrap();
        let mut scrubber = Scrubber::new(&secret(key));
        let mut out = BytesMut::new();
        scrub_message(&message, &mut scrubber, &mut out);
        assert_eq!(&out[..], encode_message(&kept, b"{}").unwrap());
    }
}

//! The properties the fuzz targets check, one function per target. Shared by the cargo-fuzz
//! targets (`fuzz/fuzz_targets/*.rs`) and by `tests/fuzz_corpus.rs`, which runs every file of
//! the committed corpora through them on stable Rust.
//!
//! Each function takes arbitrary bytes, must not panic on any input, and asserts the property
//! its parser promises (the same answer however the input is split into chunks, never a URL
//! outside the target, a scrubbed stream equal to a plain search-and-replace...).

#![allow(dead_code)]

use keyward::scope::attrs::{MAX_MODEL_LEN, ModelScanner, ScanState};

/// Chunk sizes drawn from `seed`, for splitting an input "anywhere" reproducibly.
fn pieces(seed: &[u8]) -> Vec<usize> {
    let mut out: Vec<usize> = seed.iter().map(|&b| usize::from(b % 17) + 1).collect();
    if out.is_empty() {
        out.push(1);
    }
    out
}

/// Splits `data` into chunks of the sizes in `sizes` (cycled).
fn split<'a>(data: &'a [u8], sizes: &[usize]) -> Vec<&'a [u8]> {
    let mut out = Vec::new();
    let mut rest = data;
    let mut i = 0;
    while !rest.is_empty() {
        let n = sizes[i % sizes.len()].clamp(1, rest.len());
        out.push(&rest[..n]);
        rest = &rest[n..];
        i += 1;
    }
    out
}

/// Input layout shared by the differential targets: one length byte, that many split-seed
/// bytes, then the payload.
fn seed_and_payload(data: &[u8]) -> (Vec<usize>, &[u8]) {
    let Some((&n, rest)) = data.split_first() else {
        return (vec![1], data);
    };
    let n = usize::from(n % 16).min(rest.len());
    (pieces(&rest[..n]), &rest[n..])
}

/// Request-target routing and percent-decoding: a target that parses routes to a preset's
/// base URL only, with no dot segment, backslash or encoded slash left in its path. Under
/// Bedrock's rules an encoded slash may appear only in the model id after `/model/`, encoded
/// once, and still leaves no dot segment and no `..` however often the path is decoded.
pub fn route(data: &[u8]) {
    use keyward::proxy::route::{PathRules, Route, upstream_uri};
    let Ok(uri) = http::Uri::try_from(data) else {
        return;
    };
    for rules in [PathRules::Strict, PathRules::BedrockModelId] {
        let Ok(route) = Route::parse_with(&http::Method::POST, http::Version::HTTP_11, &uri, rules)
        else {
            continue;
        };
        assert!(!route.target().is_empty());
        assert!(route.path().starts_with('/') || route.path().is_empty());
        let targets = keyward::providers::Targets::resolve(&Default::default()).unwrap();
        let target = targets.get("openai").unwrap();
        let up = upstream_uri(target, &route);
        assert_eq!(up.scheme_str(), Some("https"), "{up}");
        assert_eq!(
            up.authority().map(|a| a.as_str()),
            Some("api.openai.com"),
            "{up}"
        );
        let path = up.path();
        // Whatever an upstream decodes, it finds no way out of the base URL.
        let mut decoded = path.as_bytes().to_vec();
        for _ in 0..4 {
            decoded = percent_decode(&decoded);
        }
        let text = String::from_utf8_lossy(&decoded);
        for seg in text.split('/') {
            assert!(seg != ".." && seg != ".", "dot segment in {up}");
        }
        assert!(!text.contains('\\'), "backslash in {up}");
        // Which raw segments gain a '/' from decoding: none, or only a Bedrock model id.
        let segments: Vec<&str> = route.path().split('/').skip(1).collect();
        for (i, seg) in segments.iter().enumerate() {
            let once = percent_decode(seg.as_bytes());
            let mut all = once.clone();
            for _ in 0..4 {
                all = percent_decode(&all);
            }
            let slashes = |b: &[u8]| b.iter().filter(|&&c| c == b'/').count();
            if slashes(&all) == 0 {
                continue;
            }
            assert_eq!(rules, PathRules::BedrockModelId, "encoded slash in {up}");
            assert!(
                i == 1 && segments[0] == "model",
                "encoded slash outside the id: {up}"
            );
            assert!(
                i + 1 < segments.len() && !segments[i + 1].is_empty(),
                "{up}"
            );
            assert_eq!(slashes(&once), slashes(&all), "slash encoded twice: {up}");
            assert!(!all.windows(2).any(|w| w == b".."), "'..' in the id: {up}");
        }
    }
}

/// A lenient percent-decoder, as an upstream or a proxy in front of it might run.
fn percent_decode(b: &[u8]) -> Vec<u8> {
    let hex = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2]))
        {
            out.push(h * 16 + l);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
}

/// Feeds `chunks` to a JSON model scanner and returns its verdict.
fn json_model(chunks: &[&[u8]]) -> ScanState {
    let mut s = ModelScanner::new();
    for c in chunks {
        if let v @ (ScanState::Ambiguous | ScanState::Absent) = s.feed(c) {
            return v;
        }
    }
    s.finish()
}

/// The JSON model scanner and the usage scanner give the same answer however the body is split,
/// and a model found is at most `MAX_MODEL_LEN` bytes.
pub fn json_scanners(data: &[u8]) {
    let (sizes, body) = seed_and_payload(data);
    let whole = json_model(&[body]);
    let parts = json_model(&split(body, &sizes));
    assert_eq!(whole, parts, "model verdict depends on the split");
    if let ScanState::Found(m) = &whole {
        assert!(m.len() <= MAX_MODEL_LEN);
    }
    for content_type in ["application/json", "text/event-stream"] {
        let usage = |chunks: &[&[u8]]| {
            let mut tap = keyward::audit::usage::UsageTap::new(Some(content_type));
            for c in chunks {
                tap.feed(c);
            }
            tap.finish()
        };
        assert_eq!(
            usage(&[body]),
            usage(&split(body, &sizes)),
            "usage depends on the split ({content_type})"
        );
    }
}

/// Boundary the multipart target uses; inputs write bodies around it.
pub const MULTIPART_BOUNDARY: &str = "XyZ";

/// The multipart model reader gives the same answer however the body is split.
pub fn multipart(data: &[u8]) {
    use keyward::scope::multipart::MultipartScanner;
    let (sizes, body) = seed_and_payload(data);
    let run = |chunks: &[&[u8]]| {
        let mut s = MultipartScanner::new(MULTIPART_BOUNDARY);
        for c in chunks {
            if let v @ (ScanState::Ambiguous | ScanState::Absent) = s.feed(c) {
                return v;
            }
        }
        s.finish()
    };
    let whole = run(&[body]);
    assert_eq!(
        whole,
        run(&split(body, &sizes)),
        "verdict depends on the split"
    );
    for single in [1usize, 2, 3] {
        assert_eq!(whole, run(&split(body, &[single])), "split every {single}");
    }
    if let ScanState::Found(m) = &whole {
        assert!(!m.is_empty() && m.len() <= MAX_MODEL_LEN);
        let marker = format!("\r\n\r\n{m}\r\n--{MULTIPART_BOUNDARY}");
        assert!(
            body.windows(marker.len()).any(|w| w == marker.as_bytes()),
            "found a model the body does not hold as a field value"
        );
    }
}

/// The scrubber, fed chunks split anywhere, gives exactly what a plain search-and-replace of
/// the key over the joined chunks gives, for keys with one form (unreserved characters).
pub fn scrub(data: &[u8]) {
    use keyward::proxy::scrub::{REDACTED, Scrubber};
    let Some((&klen, rest)) = data.split_first() else {
        return;
    };
    let klen = usize::from(klen % 24) + 1;
    if rest.len() < klen {
        return;
    }
    let alphabet = b"abcAB01-_.~";
    let key: Vec<u8> = rest[..klen]
        .iter()
        .map(|b| alphabet[usize::from(*b) % alphabet.len()])
        .collect();
    let (sizes, text) = seed_and_payload(&rest[klen..]);
    // Map the text onto a small alphabet too, so occurrences and near misses are common.
    let text: Vec<u8> = text
        .iter()
        .map(|b| {
            if b % 3 == 0 {
                *b
            } else {
                alphabet[usize::from(*b) % alphabet.len()]
            }
        })
        .collect();
    let secret = keyward::seal::Secret::from_slice(&key);
    let mut scrubber = Scrubber::new(&secret);
    let mut out = Vec::new();
    for chunk in split(&text, &sizes) {
        out.extend_from_slice(&scrubber.push_bytes(bytes::Bytes::copy_from_slice(chunk)));
        // Only a proper prefix of the key may be held back.
        assert!(scrubber.held_back() < key.len());
    }
    out.extend_from_slice(&scrubber.finish());
    let mut expected = Vec::new();
    let mut i = 0;
    while i < text.len() {
        if text[i..].starts_with(&key) {
            expected.extend_from_slice(REDACTED);
            i += key.len();
        } else {
            expected.push(text[i]);
            i += 1;
        }
    }
    assert!(
        out == expected,
        "scrubbed output differs from search-and-replace"
    );
}

/// The config parser returns a config or an error naming what is wrong, never panics.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let env = |_: &str| None;
    match keyward::config::Config::from_toml(text, std::path::Path::new("/fuzz/keyward.toml"), &env)
    {
        Ok(config) => {
            let _ = format!("{:?}", config.limits);
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
}

/// The HTTP/1 framing check hands the server the same bytes, and refuses the same head, however
/// the stream arrives.
pub fn framing(data: &[u8]) {
    use keyward::proxy::app_conn::check_stream;
    let (sizes, stream) = seed_and_payload(data);
    let whole = check_stream(stream, &[stream.len().max(1)]);
    assert_eq!(
        whole,
        check_stream(stream, &sizes),
        "framing depends on the split"
    );
    assert_eq!(whole, check_stream(stream, &[1]), "framing byte by byte");
    let (out, heads, refused) = whole;
    assert!(out.len() <= stream.len());
    if let Some(n) = refused {
        assert_eq!(n, heads, "only the last head can be refused");
    }
}

/// Content types the usage target reads a body as: plain JSON (OpenAI, Anthropic, Gemini's
/// JSON array stream) and SSE.
const USAGE_CONTENT_TYPES: [Option<&str>; 3] = [
    Some("application/json"),
    Some("text/event-stream; charset=utf-8"),
    None,
];

/// The usage reader gives the same counts over any split of a response as over the whole of
/// it, including one byte at a time, and its totals add up.
pub fn usage(data: &[u8]) {
    use keyward::audit::usage::UsageTap;
    let (sizes, body) = seed_and_payload(data);
    for content_type in USAGE_CONTENT_TYPES {
        let read = |chunks: &[&[u8]]| {
            let mut tap = UsageTap::new(content_type);
            for c in chunks {
                tap.feed(c);
            }
            tap.finish()
        };
        let whole = read(&[body]);
        assert_eq!(
            whole,
            read(&split(body, &sizes)),
            "usage depends on the split ({content_type:?})"
        );
        assert_eq!(
            whole,
            read(&split(body, &[1])),
            "usage read one byte at a time differs ({content_type:?})"
        );
        if let Some(u) = whole
            && let (Some(i), Some(o)) = (u.input_tokens, u.output_tokens)
        {
            assert_eq!(u.total_tokens, Some(i.saturating_add(o)), "{u:?}");
        }
    }
}

/// The master key the bundle corpus was sealed under (a fixed test key, never a real one).
pub const BUNDLE_MASTER_KEY: [u8; 32] = *b"keyward fuzz bundle master key!!";

fn bundle_master() -> &'static keyward::seal::MasterKeyProvider {
    static MASTER: std::sync::OnceLock<keyward::seal::MasterKeyProvider> =
        std::sync::OnceLock::new();
    MASTER.get_or_init(|| {
        keyward::seal::MasterKey::from_secret(keyward::seal::Secret::from_slice(&BUNDLE_MASTER_KEY))
            .into()
    })
}

/// The sealed-bundle reader a sidecar runs on every file it is handed. The first byte picks
/// the input: even, the rest is a whole bundle file; odd, the rest is a payload text that is
/// sealed properly first, so what `open` does after the MAC check is reached too. Whatever
/// the bytes, `open` answers without panicking; a refusal names the file; a bundle it accepts
/// builds a catalog, and exporting that content again gives a bundle it accepts with the same
/// serial and counts.
pub fn bundle(data: &[u8]) {
    use keyward::bundle::{export, open, seal_payload_text};
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let master = bundle_master();
    let file = std::path::Path::new("/fuzz/keyward.bundle");
    let bytes = if mode % 2 == 0 {
        rest.to_vec()
    } else {
        let Ok(text) = std::str::from_utf8(rest) else {
            return;
        };
        // The header serial must match the payload's for `open` to go on.
        let serial = serde_json::from_str::<serde_json::Value>(text)
            .ok()
            .and_then(|v| v.get("serial").and_then(serde_json::Value::as_u64))
            .unwrap_or(1);
        seal_payload_text(master, "fuzz", serial, text.to_string())
            .unwrap()
            .into_bytes()
    };
    let loaded = match open(&bytes, file, master) {
        Ok(loaded) => loaded,
        Err(e) => {
            assert!(e.contains("/fuzz/keyward.bundle"), "{e}");
            return;
        }
    };
    let counts =
        |s: &keyward::store::Snapshot| (s.tenants.len(), s.clients.len(), s.credentials.len());
    let before = counts(&loaded.snapshot);
    let again = export(master, &loaded.snapshot, &[], "fuzz", loaded.serial).unwrap();
    let _ = keyward::catalog::Catalog::build(loaded.snapshot);
    let reopened = open(again.text.as_bytes(), file, master).unwrap();
    assert_eq!(reopened.serial, loaded.serial);
    // Clients and credentials of tenants the bundle does not hold are not exported again.
    let after = counts(&reopened.snapshot);
    assert_eq!(after.0, before.0);
    assert!(
        after.1 <= before.1 && after.2 <= before.2,
        "{before:?} -> {after:?}"
    );
    let _ = keyward::catalog::Catalog::build(reopened.snapshot);
}

/// The admin API's request parsing: the first byte picks the method, the bytes up to the first
/// newline are the path (with an optional query), the rest is the body. The router answers a
/// route or a 404/405 and never panics; a routed id is one the router's rule admits; every
/// body type and every query type parses or is refused with a message that quotes no value of
/// the input (a provider key sent to the wrong field must not come back in an error).
pub fn admin_api(data: &[u8]) {
    use keyward::admin::api::{self, ErrorCode, Method, Route};
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let method = [Method::Get, Method::Post, Method::Delete][usize::from(selector % 3)];
    let (target, body) = match rest.iter().position(|&b| b == b'\n') {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, &[][..]),
    };
    let target = String::from_utf8_lossy(target);
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    match api::route(method, path) {
        Ok(route) => {
            assert!(path.starts_with("/v1/"), "{path:?} routed");
            let id = match &route {
                Route::RotateCredential(id)
                | Route::RevokeCredential(id)
                | Route::DeleteCredential(id)
                | Route::RevokeClient(id)
                | Route::AuditLifecycle(id)
                | Route::DeleteBudget(id)
                | Route::DeleteLimit(id) => Some(id),
                _ => None,
            };
            if let Some(id) = id {
                assert!(!id.is_empty() && id.len() <= 128 && id != "." && id != "..");
                assert!(
                    id.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.')),
                    "id {id:?} routed"
                );
                assert!(path.contains(id.as_str()));
            }
            // The same request routes the same way.
            assert_eq!(api::route(method, path).ok(), Some(route));
        }
        Err(e) => assert!(
            matches!(e.code, ErrorCode::NotFound | ErrorCode::MethodNotAllowed),
            "{path:?}: {e:?}"
        ),
    }
    use api::{audit, clients, credentials, governance, system, tenants};
    // Values of the input that an error message must not repeat.
    let values: Vec<String> = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .map(|v| {
            let mut out = Vec::new();
            strings(&v, &mut out);
            out
        })
        .unwrap_or_default();
    // What the messages say of their own accord (a value that is part of that text proves
    // nothing); they differ from each other only in line and column numbers.
    let own_words = [
        api::parse_body::<tenants::NewTenant>(b"x")
            .unwrap_err()
            .message,
        api::parse_body::<tenants::NewTenant>(b"[]")
            .unwrap_err()
            .message,
        api::parse_query::<system::SpendFilter>("x=1")
            .unwrap_err()
            .message,
    ]
    .concat();
    let echoes = |message: &str, v: &str| {
        message.contains(v)
            && !own_words.contains(v)
            && !v.chars().all(|c| c.is_ascii_digit() || c == ' ')
    };
    let quiet = |e: api::ApiError| {
        assert_eq!(e.code, ErrorCode::BadRequest);
        for v in &values {
            assert!(!echoes(&e.message, v), "{:?} quotes {v:?}", e.message);
        }
    };
    macro_rules! bodies {
        ($($t:ty),*) => {$(
            if let Err(e) = api::parse_body::<$t>(body) {
                quiet(e);
            }
        )*};
    }
    bodies!(
        tenants::NewTenant,
        credentials::NewCredential,
        credentials::RotateCredential,
        credentials::RevokeCredential,
        clients::NewClient,
        audit::AuditQuery,
        system::ExportBundle,
        governance::NewBudget,
        governance::NewLimit
    );
    macro_rules! queries {
        ($($t:ty),*) => {$(
            if let Err(e) = api::parse_query::<$t>(query) {
                assert_eq!(e.code, ErrorCode::BadRequest);
                for pair in query.split('&') {
                    for part in pair.split('=').filter(|p| p.len() >= 4) {
                        assert!(!echoes(&e.message, part), "{:?} quotes {part:?}", e.message);
                    }
                }
            }
        )*};
    }
    queries!(
        credentials::CredentialFilter,
        clients::ClientFilter,
        audit::AuditQuery,
        system::SpendFilter,
        system::PriceFilter,
        governance::RuleFilter
    );
}

/// Every string of `v` (keys and values) of 4 characters or more.
fn strings(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::String(s) if s.chars().count() >= 4 => out.push(s.clone()),
        serde_json::Value::Array(items) => items.iter().for_each(|i| strings(i, out)),
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                if k.chars().count() >= 4 {
                    out.push(k.clone());
                }
                strings(v, out);
            }
        }
        _ => {}
    }
}

/// CRC-32 (IEEE), the event-stream checksum, for building messages below.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// One event-stream message with a `:event-type` header and `payload`, checksums right.
fn event_message(event: &[u8], payload: &[u8]) -> Vec<u8> {
    let mut headers = vec![11u8];
    headers.extend_from_slice(b":event-type");
    headers.push(7);
    headers.extend_from_slice(&(event.len() as u16).to_be_bytes());
    headers.extend_from_slice(event);
    let total = 12 + headers.len() + payload.len() + 4;
    let mut m = Vec::with_capacity(total);
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

/// The body the `eventstream` target reads: with an even first byte, the rest as it is; with
/// an odd one, the rest as records (one length byte, then that many payload bytes, wrapped in
/// a message with valid checksums; a length byte over 200 flips a bit of the previous message
/// instead), so the reader sees well-formed messages, corrupt ones and resynchronisation, not
/// only noise that fails the first checksum.
pub fn eventstream_body(data: &[u8]) -> Vec<u8> {
    let Some((&mode, mut rest)) = data.split_first() else {
        return Vec::new();
    };
    if mode % 2 == 0 {
        return rest.to_vec();
    }
    let mut out = Vec::new();
    while let Some((&n, after)) = rest.split_first() {
        if n > 200 {
            if !out.is_empty() {
                let at = usize::from(n) * 7 % out.len();
                out[at] ^= 1 << (n % 8);
            }
            rest = after;
            continue;
        }
        let n = usize::from(n).min(after.len());
        let event: &[u8] = if n % 3 == 0 { b"chunk" } else { b"metadata" };
        out.extend(event_message(event, &after[..n]));
        rest = &after[n..];
    }
    out
}

/// The Bedrock event-stream reader (`application/vnd.amazon.eventstream`): the same message
/// payloads, and so the same usage counts, over any split of the body as over the whole of it,
/// one byte at a time included; never a panic; the usage totals add up.
pub fn eventstream(data: &[u8]) {
    use keyward::audit::usage::UsageTap;
    use keyward::providers::bedrock::EventStreamUsage;
    let (sizes, rest) = seed_and_payload(data);
    let body = eventstream_body(rest);
    let payloads = |chunks: &[&[u8]]| {
        let mut reader = EventStreamUsage::default();
        let mut out = Vec::new();
        for c in chunks {
            reader.feed(c, &mut |p| out.push(p.to_vec()));
        }
        out
    };
    let whole = payloads(&[&body]);
    assert_eq!(
        whole,
        payloads(&split(&body, &sizes)),
        "payloads depend on the split"
    );
    assert_eq!(
        whole,
        payloads(&split(&body, &[1])),
        "payloads read byte by byte differ"
    );
    let usage = |chunks: &[&[u8]]| {
        let mut tap = UsageTap::new(Some("application/vnd.amazon.eventstream"));
        for c in chunks {
            tap.feed(c);
        }
        tap.finish()
    };
    let counts = usage(&[&body]);
    assert_eq!(
        counts,
        usage(&split(&body, &sizes)),
        "usage depends on the split"
    );
    assert_eq!(
        counts,
        usage(&split(&body, &[1])),
        "usage byte by byte differs"
    );
    if let Some(u) = counts
        && let (Some(i), Some(o)) = (u.input_tokens, u.output_tokens)
    {
        assert_eq!(u.total_tokens, Some(i.saturating_add(o)), "{u:?}");
    }
}

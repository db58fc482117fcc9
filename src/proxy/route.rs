//! Request routing: turns the request target an app sent (`/{target}/{provider path}?query`)
//! into a validated [`Route`], and a route plus a [`Target`] into the upstream URI.
//!
//! This is where "the app cannot steer the key anywhere else" (README, "What an app cannot
//! do") is enforced: anything that could make an upstream — or a proxy in front of it that
//! decodes again — see a URL other than `{base_url}{provider path}` is rejected here, before
//! credentials are even looked at.
//! `route` must not look up targets, credentials or bodies, and does no I/O.

use http::uri::{PathAndQuery, Uri};
use http::{Method, Version};

use crate::providers::{Target, is_target_name, strip_query_credentials};
use crate::wire::{MAX_DECODE_PASSES, percent_decode_once};

/// A validated request target. Only [`Route::parse`] builds one, so its parts always satisfy
/// the checks below.
#[derive(Clone, PartialEq, Eq)]
pub struct Route {
    /// Target name (`[a-z0-9][a-z0-9._-]*`).
    target: String,
    /// Provider path, starting with `/`.
    path: String,
    /// Query as sent (credential parameters are removed only in [`upstream_uri`]).
    query: Option<String>,
}

/// Why a request target was refused; the message goes back to the app as 400 `bad_request`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RouteError {
    /// `CONNECT` cannot be proxied.
    #[error("CONNECT is not supported: send POST /{{target}}/{{provider path}} instead")]
    Connect,
    /// `http://host/...` or `host:port` instead of a path.
    #[error(
        "absolute-form and authority-form request targets are refused: send only the path, \
         /{{target}}/{{provider path}}"
    )]
    NotOriginForm,
    /// `OPTIONS *` or anything else that does not start with `/`.
    #[error("the request target must start with '/': send /{{target}}/{{provider path}}")]
    NoLeadingSlash,
    /// `/` or `//...`.
    #[error(
        "the request path has no target name: send /{{target}}/{{provider path}}, like \
         /openai/v1/models"
    )]
    EmptyTarget,
    /// The first segment is not a valid target name.
    #[error(
        "the target name (first path segment) may only contain a-z, 0-9, '.', '_' and '-' and \
         must start with a letter or digit, unencoded"
    )]
    BadTargetName,
    /// `/openai` with nothing after it.
    #[error("no provider path after the target name: send /{{target}}/{{provider path}}")]
    NoProviderPath,
    /// A byte that is not printable ASCII.
    #[error("the request target contains a control, space or non-ASCII byte; percent-encode data")]
    ControlOrNonAscii,
    /// `%` not followed by two hex digits.
    #[error(
        "the request target contains a malformed percent-escape ('%' must be followed by two hex \
         digits)"
    )]
    BadPercentEscape,
    /// A percent-escape that decodes (possibly after several rounds) to a control character.
    #[error("the request target contains an encoded control character (%00-%1F or %7F)")]
    EncodedControl,
    /// Percent-escapes that decode to bytes that are not UTF-8 (e.g. overlong `%C0%AE` for `.`).
    #[error(
        "the request target contains percent-escapes that do not decode to UTF-8 (like %C0%AE)"
    )]
    NotUtf8,
    /// `\` raw or encoded.
    #[error("the request path contains a backslash (raw or encoded as %5C)")]
    Backslash,
    /// `%2F` (possibly double-encoded).
    #[error("the request path contains an encoded slash (%2F); send path separators unencoded")]
    EncodedSlash,
    /// `%3A` (possibly double-encoded): Gemini's `model:method` separator could be hidden from
    /// keyward's scope check yet decoded by the provider.
    #[error("the request path contains an encoded ':' (%3A); send ':' unencoded")]
    EncodedColon,
    /// Percent-encoding nested deeper than any legitimate client produces.
    #[error(
        "the request target is percent-encoded more than {MAX_DECODE_PASSES} times over; send it \
         encoded once"
    )]
    TooDeeplyEncoded,
    /// The whole request target is longer than [`MAX_TARGET_LEN`].
    #[error("the request target is longer than {MAX_TARGET_LEN} bytes")]
    TooLong,
    /// `%3F` or `%23` (possibly double-encoded): could turn into a query or fragment upstream.
    #[error("the request path contains an encoded '?' or '#' (%3F, %23)")]
    EncodedDelimiter,
    /// `.` or `..` (or `.%2e`, `..;x`, `..%20`, ...).
    #[error(
        "the request path contains a '.' or '..' segment (raw or percent-encoded); send a \
         normalised path"
    )]
    DotSegment,
    /// `//` inside the path.
    #[error("the request path contains an empty segment ('//'); remove the doubled slash")]
    EmptySegment,
}

/// What a provider path may contain beyond the strict rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum PathRules {
    /// Every check applies.
    Strict,
    /// Bedrock: the AWS SDKs percent-encode the model id as one path segment, so `:` becomes
    /// `%3A` (`/model/anthropic.claude-3-5-sonnet-20240620-v1%3A0/converse`) and the `/` of an
    /// inference-profile, provisioned-model or imported-model ARN becomes `%2F`
    /// (`/model/arn%3Aaws%3Abedrock%3Aus-east-1%3A123456789012%3Ainference-profile%2Fus.x%3A0/
    /// converse`). `%3A` and `%2F` are accepted in the segment after `/model/`, when a method
    /// segment follows it, encoded once, and nowhere else; once decoded, that segment must
    /// still hold no `.` or `..` segment, no empty segment and no `..` at all. Bedrock's path
    /// has no `model:method` separator that an encoded `:` could hide.
    BedrockModelId,
}

/// The request's first path segment, the target name as sent (unchecked), for choosing its
/// [`PathRules`] before the route is validated.
pub fn target_name_of(uri: &Uri) -> &str {
    let path = uri.path().strip_prefix('/').unwrap_or("");
    path.split('/').next().unwrap_or("")
}

// === impl Route ===

/// The query may carry a credential the app sent (`?key=`); `Debug` shows it without.
impl std::fmt::Debug for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Route")
            .field("target", &self.target)
            .field("path", &self.path)
            .field("query", &self.query.as_deref().map(strip_query_credentials))
            .finish()
    }
}

impl Route {
    /// Validates a request as received. `version` matters because HTTP/2 requests always carry
    /// scheme and authority (from `:scheme`/`:authority`), which are then ignored, while on
    /// HTTP/1 they mean absolute-form and are refused.
    pub fn parse(method: &Method, version: Version, uri: &Uri) -> Result<Route, RouteError> {
        Route::parse_with(method, version, uri, PathRules::Strict)
    }

    /// [`Route::parse`] with the leniency a target family needs for what its SDKs send.
    pub fn parse_with(
        method: &Method,
        version: Version,
        uri: &Uri,
        rules: PathRules,
    ) -> Result<Route, RouteError> {
        if method == Method::CONNECT {
            return Err(RouteError::Connect);
        }
        let is_h2 = matches!(version, Version::HTTP_2 | Version::HTTP_3);
        if !is_h2 && (uri.scheme().is_some() || uri.authority().is_some()) {
            return Err(RouteError::NotOriginForm);
        }
        let path = uri.path();
        let query = uri.query();
        if path.len() + query.map_or(0, str::len) > MAX_TARGET_LEN {
            return Err(RouteError::TooLong);
        }
        check_bytes(path)?;
        if let Some(q) = query {
            check_bytes(q)?;
        }
        let Some(rest) = path.strip_prefix('/') else {
            return Err(RouteError::NoLeadingSlash);
        };
        let (target, provider) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        if target.is_empty() {
            return Err(RouteError::EmptyTarget);
        }
        if !is_target_name(target) {
            return Err(RouteError::BadTargetName);
        }
        if provider.is_empty() {
            return Err(RouteError::NoProviderPath);
        }
        check_path(provider, rules)?;
        if let Some(q) = query {
            check_query(q)?;
        }
        Ok(Route {
            target: target.to_string(),
            path: provider.to_string(),
            query: query.map(str::to_string),
        })
    }

    /// Validates `req`'s method, version and URI (see [`Route::parse`]).
    pub fn from_request<B>(req: &http::Request<B>) -> Result<Route, RouteError> {
        Route::parse(req.method(), req.version(), req.uri())
    }

    /// [`Route::from_request`] under `rules`.
    pub fn from_request_with<B>(
        req: &http::Request<B>,
        rules: PathRules,
    ) -> Result<Route, RouteError> {
        Route::parse_with(req.method(), req.version(), req.uri(), rules)
    }

    /// The target name (first path segment).
    pub fn target(&self) -> &str {
        &self.target
    }

    /// The provider path, starting with `/`.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The query as the app sent it (before credential parameters are removed).
    pub fn query(&self) -> Option<&str> {
        self.query.as_deref()
    }
}

/// Where an app reaches keyward, for URLs handed back to it: `http://` and the authority the
/// request named (HTTP/2 `:authority` or `Host`), else `http://keyward`.
pub fn app_base<B>(req: &http::Request<B>) -> String {
    let named = req
        .uri()
        .authority()
        .map(|a| a.as_str().to_string())
        .or_else(|| {
            req.headers()
                .get(http::header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_string)
        });
    let host = named
        .filter(|h| !h.contains('@'))
        .and_then(|h| h.parse::<http::uri::Authority>().ok())
        .map_or_else(|| "keyward".to_string(), |a| a.as_str().to_string());
    format!("http://{host}")
}

/// Rewrites absolute URLs in response header values that point into `target`'s base URL so that
/// they lead through keyward: `{base_url}/rest` becomes `{app_base}/{target}/rest` (a Gemini
/// resumable upload's `x-goog-upload-url`, a `Location`, a `Link`). URLs elsewhere, on the
/// provider's host outside the base path included, are left as they are.
pub fn rewrite_upstream_urls(headers: &mut http::HeaderMap, target: &Target, app_base: &str) {
    let up = &target.upstream;
    let scheme = format!("{}://", up.scheme.as_str().to_ascii_lowercase());
    let replacement = format!("{app_base}/{}", target.name);
    for value in headers.values_mut() {
        let Ok(text) = value.to_str() else {
            continue;
        };
        if !text.to_ascii_lowercase().contains(&scheme) {
            continue;
        }
        let rewritten = rewrite_urls_in(text, &scheme, up, &replacement);
        if rewritten != text
            && let Ok(mut new) = http::HeaderValue::from_str(&rewritten)
        {
            new.set_sensitive(value.is_sensitive());
            *value = new;
        }
    }
}

/// Characters that end a URL inside a header value (`Link: <url>; rel=...`, quoted values,
/// lists).
fn ends_url(c: char) -> bool {
    matches!(c, '>' | '"' | '\'' | ' ' | ',' | ';' | '\t')
}

fn rewrite_urls_in(text: &str, scheme: &str, up: &crate::providers::Upstream, to: &str) -> String {
    let lower = text.to_ascii_lowercase();
    let default_port = if up.is_https() { 443 } else { 80 };
    let mut out = String::with_capacity(text.len());
    let mut at = 0;
    while let Some(found) = lower[at..].find(scheme) {
        let start = at + found;
        let preceded_ok = text[..start]
            .chars()
            .next_back()
            .is_none_or(|c| !c.is_ascii_alphanumeric() && c != '+' && c != '.' && c != '-');
        let auth_start = start + scheme.len();
        let auth_len = text[auth_start..]
            .find(|c: char| c == '/' || c == '?' || c == '#' || ends_url(c))
            .unwrap_or(text.len() - auth_start);
        let authority = &text[auth_start..auth_start + auth_len];
        let same_host = authority.parse::<http::uri::Authority>().is_ok_and(|a| {
            !authority.contains('@')
                && a.host()
                    .trim_matches(['[', ']'])
                    .eq_ignore_ascii_case(&up.host)
                && a.port_u16().unwrap_or(default_port) == up.port
        });
        let rest = &text[auth_start + auth_len..];
        let in_base = rest.starts_with(up.path_prefix.as_str())
            && rest[up.path_prefix.len()..]
                .chars()
                .next()
                .is_none_or(|c| c == '/' || c == '?' || c == '#' || ends_url(c));
        out.push_str(&text[at..start]);
        if preceded_ok && same_host && in_base {
            out.push_str(to);
            at = auth_start + auth_len + up.path_prefix.len();
        } else {
            out.push_str(&text[start..auth_start]);
            at = auth_start;
        }
    }
    out.push_str(&text[at..]);
    out
}

/// The upstream URI for `route`: scheme and authority only ever come from `target`; the path is
/// the target's prefix followed by the route's provider path; the query loses its credential
/// parameters.
pub fn upstream_uri(target: &Target, route: &Route) -> Uri {
    let mut pq = String::with_capacity(
        target.upstream.path_prefix.len()
            + route.path.len()
            + route.query.as_ref().map_or(0, |q| q.len() + 1),
    );
    pq.push_str(&target.upstream.path_prefix);
    pq.push_str(&route.path);
    if let Some(q) = &route.query {
        let q = strip_query_credentials(q);
        if !q.is_empty() {
            pq.push('?');
            pq.push_str(&q);
        }
    }
    // Both halves were validated (the prefix by config, the route by `Route::parse`, which is the
    // only constructor) to printable ASCII without '#', so this cannot fail.
    let pq = PathAndQuery::try_from(pq).expect("validated path and query form a valid URI part");
    Uri::builder()
        .scheme(target.upstream.scheme.clone())
        .authority(target.upstream.authority.clone())
        .path_and_query(pq)
        .build()
        .expect("scheme, authority and path come from validated parts")
}

/// Only printable ASCII without spaces may appear raw; `http` already refuses most of the rest
/// but the check must not depend on which parser built the `Uri`.
fn check_bytes(s: &str) -> Result<(), RouteError> {
    if s.bytes().any(|b| !(0x21..0x7f).contains(&b)) {
        return Err(RouteError::ControlOrNonAscii);
    }
    if s.contains('#') {
        return Err(RouteError::EncodedDelimiter);
    }
    Ok(())
}

/// Every form the string takes as an upstream decodes it 0, 1, 2, ... times, until decoding
/// changes nothing. Checking each form means no number of decoding passes downstream can turn
/// an accepted path into a dangerous one.
///
/// Bounded: a target nested deeper than [`MAX_DECODE_PASSES`] is refused, so the work is linear
/// in the target's length (an unbounded loop was quadratic: `%252525…` sheds two bytes a pass).
fn decoded_forms(s: &str) -> Result<Vec<Vec<u8>>, RouteError> {
    let mut forms = vec![s.as_bytes().to_vec()];
    loop {
        let cur = forms.last().expect("at least the raw form");
        if !cur.contains(&b'%') {
            return Ok(forms);
        }
        // A bad escape is refused in the raw form (upstreams disagree on what it means).
        let next = percent_decode_once(cur, forms.len() == 1, false)
            .ok_or(RouteError::BadPercentEscape)?;
        if next == *cur {
            return Ok(forms);
        }
        if forms.len() > MAX_DECODE_PASSES {
            return Err(RouteError::TooDeeplyEncoded);
        }
        forms.push(next);
    }
}

/// Longest request target accepted (path and query).
pub const MAX_TARGET_LEN: usize = 8192;

fn is_control(b: u8) -> bool {
    b < 0x20 || b == 0x7f
}

fn check_path(provider: &str, rules: PathRules) -> Result<(), RouteError> {
    let forms = decoded_forms(provider)?;
    for (level, form) in forms.iter().enumerate() {
        if form.iter().any(|&b| is_control(b)) {
            return Err(RouteError::EncodedControl);
        }
        if std::str::from_utf8(form).is_err() {
            return Err(RouteError::NotUtf8);
        }
        if form.contains(&b'\\') {
            return Err(RouteError::Backslash);
        }
        let lenient = rules == PathRules::BedrockModelId;
        if level > 0
            && count(form, b'/') != count(&forms[0], b'/')
            && !(lenient && decoded_only_in_model_id(&forms, level, b'/'))
        {
            return Err(RouteError::EncodedSlash);
        }
        if level > 0 && (form.contains(&b'?') || form.contains(&b'#')) {
            return Err(RouteError::EncodedDelimiter);
        }
        if level > 0
            && count(form, b':') != count(&forms[0], b':')
            && !(lenient && decoded_only_in_model_id(&forms, level, b':'))
        {
            return Err(RouteError::EncodedColon);
        }
        // An ARN never holds `..`; refusing it outright once the id's slashes are decoded
        // leaves no dot-segment spelling (`..;x`, `.. `) to reason about.
        if level > 0
            && count(form, b'/') != count(&forms[0], b'/')
            && form.windows(2).any(|w| w == b"..")
        {
            return Err(RouteError::DotSegment);
        }
        // `provider` starts with '/', so the first split piece is the empty string before it.
        let segments: Vec<&[u8]> = form.split(|&b| b == b'/').skip(1).collect();
        let last = segments.len() - 1;
        for (i, seg) in segments.iter().enumerate() {
            // A single trailing slash is a real resource name on some APIs; only an empty
            // segment in the middle can be collapsed by a normalising hop.
            if seg.is_empty() && i != last {
                return Err(RouteError::EmptySegment);
            }
            if is_dot_segment(seg) {
                return Err(RouteError::DotSegment);
            }
        }
    }
    Ok(())
}

fn count(form: &[u8], byte: u8) -> usize {
    form.iter().filter(|&&b| b == byte).count()
}

/// True when every `byte` (`:` or `/`) that decoding up to `level` added is in the segment
/// after `/model/`, that segment is followed by another, and each such `byte` came from one
/// pass of decoding (`%3A`, not `%253A`). Each raw segment is decoded on its own: the raw
/// separators are literal `/`, which no escape can span, so this equals decoding the whole.
fn decoded_only_in_model_id(forms: &[Vec<u8>], level: usize, byte: u8) -> bool {
    let decode = |seg: &[u8], times: usize| {
        let mut cur = seg.to_vec();
        for _ in 0..times {
            cur = percent_decode_once(&cur, false, false).expect("lenient decoding never fails");
        }
        cur
    };
    let raw: Vec<&[u8]> = forms[0].split(|&b| b == b'/').skip(1).collect();
    if raw.len() < 3 || raw[0] != b"model" || raw[2].is_empty() {
        return false;
    }
    raw.iter().enumerate().all(|(i, seg)| {
        let once = decode(seg, 1);
        let now = decode(seg, level);
        count(&now, byte) == count(&once, byte)
            && (i == 1 || count(&once, byte) == count(seg, byte))
    })
}

/// `.`/`..` and what some servers treat as such: `..;param` (Tomcat), `.. ` and `...`
/// (Windows trims trailing dots and spaces).
fn is_dot_segment(seg: &[u8]) -> bool {
    let before_param = seg.split(|&b| b == b';').next().unwrap_or(seg);
    let trimmed: &[u8] = {
        let mut end = before_param.len();
        while end > 0 && matches!(before_param[end - 1], b'.' | b' ') {
            end -= 1;
        }
        &before_param[..end]
    };
    !before_param.is_empty() && trimmed.is_empty() && before_param.contains(&b'.')
}

fn check_query(query: &str) -> Result<(), RouteError> {
    for form in decoded_forms(query)? {
        if form.iter().any(|&b| is_control(b)) {
            return Err(RouteError::EncodedControl);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_urls_in_response_headers_are_led_back_through_keyward() {
        let spec = |name: &str, url: &str| {
            let text = format!("[{name}]\nbase_url = \"{url}\"\nfamily = \"openai\"\n");
            let specs: std::collections::BTreeMap<String, crate::providers::TargetSpec> =
                toml::from_str(&text).unwrap();
            crate::providers::Targets::resolve(&specs).unwrap()
        };
        let targets = spec("gw", "https://Api.Example.com:443/base");
        let target = targets.get("gw").unwrap();
        let cases = [
            (
                "https://api.example.com/base/upload/v1?upload_id=x",
                "http://keyward/gw/upload/v1?upload_id=x",
            ),
            ("HTTPS://API.EXAMPLE.COM:443/base", "http://keyward/gw"),
            (
                "<https://api.example.com/base/v1/a?p=2>; rel=\"next\", \
                 <https://api.example.com/base/v1/a?p=1>; rel=\"prev\"",
                "<http://keyward/gw/v1/a?p=2>; rel=\"next\", <http://keyward/gw/v1/a?p=1>; \
                 rel=\"prev\"",
            ),
            // Outside the base URL: another host, port, scheme, path, or userinfo.
            ("https://evil.example/base/x", "https://evil.example/base/x"),
            (
                "https://api.example.com:8443/base/x",
                "https://api.example.com:8443/base/x",
            ),
            (
                "http://api.example.com/base/x",
                "http://api.example.com/base/x",
            ),
            (
                "https://api.example.com/basement",
                "https://api.example.com/basement",
            ),
            (
                "https://api.example.com/other",
                "https://api.example.com/other",
            ),
            (
                "https://u@api.example.com/base/x",
                "https://u@api.example.com/base/x",
            ),
            (
                "https://api.example.com.evil/base",
                "https://api.example.com.evil/base",
            ),
            (
                "xhttps://api.example.com/base",
                "xhttps://api.example.com/base",
            ),
        ];
        for (from, want) in cases {
            let mut h = http::HeaderMap::new();
            h.insert(
                "x-goog-upload-url",
                http::HeaderValue::from_str(from).unwrap(),
            );
            rewrite_upstream_urls(&mut h, target, "http://keyward");
            assert_eq!(h["x-goog-upload-url"], want, "{from}");
        }
        let mut req = http::Request::new(());
        req.headers_mut()
            .insert("host", http::HeaderValue::from_static("127.0.0.1:8787"));
        assert_eq!(app_base(&req), "http://127.0.0.1:8787");
        req.headers_mut()
            .insert("host", http::HeaderValue::from_static("a@b/c"));
        assert_eq!(app_base(&req), "http://keyward");
    }
    use crate::providers::{TargetSpec, Targets};
    use std::collections::BTreeMap;

    fn parse(target: &str) -> Result<Route, RouteError> {
        parse_as(Method::POST, Version::HTTP_11, target)
    }

    fn parse_as(method: Method, version: Version, target: &str) -> Result<Route, RouteError> {
        let uri: Uri = target.parse().map_err(|_| RouteError::ControlOrNonAscii)?;
        Route::parse(&method, version, &uri)
    }

    fn targets() -> Targets {
        let mut specs = BTreeMap::new();
        specs.insert(
            "azure-openai".to_string(),
            TargetSpec {
                base_url: Some("https://res.openai.azure.com".into()),
                ..TargetSpec::default()
            },
        );
        specs.insert(
            "local".to_string(),
            TargetSpec {
                base_url: Some("https://llm.internal.example:8443/v1".into()),
                ..TargetSpec::default()
            },
        );
        Targets::resolve(&specs).unwrap()
    }

    fn upstream(target: &str) -> String {
        let route = parse(target).unwrap();
        let t = targets();
        upstream_uri(t.get(route.target()).unwrap(), &route).to_string()
    }

    #[test]
    fn normal_provider_paths_map_to_base_url_plus_path() {
        let cases = [
            (
                "/openai/v1/chat/completions",
                "https://api.openai.com/v1/chat/completions",
            ),
            (
                "/openai/v1/models?limit=5&after=m1",
                "https://api.openai.com/v1/models?limit=5&after=m1",
            ),
            (
                "/anthropic/v1/messages",
                "https://api.anthropic.com/v1/messages",
            ),
            (
                "/gemini/v1beta/models/gemini-1.5-pro:streamGenerateContent?alt=sse&key=AIzaLEAK",
                "https://generativelanguage.googleapis.com/v1beta/models/gemini-1.5-pro:\
                 streamGenerateContent?alt=sse",
            ),
            (
                "/azure-openai/openai/deployments/gpt4o/chat/completions?api-version=2024-06-01",
                "https://res.openai.azure.com/openai/deployments/gpt4o/chat/completions\
                 ?api-version=2024-06-01",
            ),
            (
                "/groq/v1/chat/completions",
                "https://api.groq.com/openai/v1/chat/completions",
            ),
            (
                "/openrouter/v1/models/",
                "https://openrouter.ai/api/v1/models/",
            ),
            ("/ollama/api/chat", "http://127.0.0.1:11434/api/chat"),
            (
                "/local/chat/completions?key=x",
                "https://llm.internal.example:8443/v1/chat/completions",
            ),
            (
                "/openai/v1/files/file-abc%20x/content",
                "https://api.openai.com/v1/files/file-abc%20x/content",
            ),
            (
                "/anthropic/v1/models/claude@2024",
                "https://api.anthropic.com/v1/models/claude@2024",
            ),
        ];
        for (input, want) in cases {
            assert_eq!(upstream(input), want, "{input}");
        }
        let r = parse("/gemini/v1beta/models/m:generateContent?key=k").unwrap();
        assert_eq!(
            (r.target(), r.path(), r.query()),
            ("gemini", "/v1beta/models/m:generateContent", Some("key=k"))
        );
        assert_eq!(parse("/openai/").unwrap().path(), "/");
    }

    #[test]
    fn http2_scheme_and_authority_are_ignored_not_used() {
        let r = parse_as(
            Method::POST,
            Version::HTTP_2,
            "http://evil.example/openai/v1/models",
        )
        .unwrap();
        assert_eq!((r.target(), r.path()), ("openai", "/v1/models"));
        let t = targets();
        let u = upstream_uri(t.get("openai").unwrap(), &r);
        assert_eq!(u.authority().unwrap().as_str(), "api.openai.com");
    }

    #[test]
    fn refused_request_targets() {
        use RouteError::*;
        let cases: &[(&str, RouteError)] = &[
            ("http://evil.example/openai/v1/models", NotOriginForm),
            ("https://api.openai.com/openai/v1/models", NotOriginForm),
            ("evil.example:443", NotOriginForm),
            ("*", NoLeadingSlash),
            ("/", EmptyTarget),
            ("//openai/v1", EmptyTarget),
            ("//evil.example/v1", EmptyTarget),
            ("/openai", NoProviderPath),
            ("/OpenAI/v1/models", BadTargetName),
            ("/open%61i/v1/models", BadTargetName),
            ("/user@evil.example/v1", BadTargetName),
            ("/evil.example:443/v1", BadTargetName),
            ("/_x/v1", BadTargetName),
            ("/openai/v1/../../admin", DotSegment),
            ("/openai/./v1/models", DotSegment),
            ("/openai/v1/..", DotSegment),
            ("/openai/v1/%2e%2e/x", DotSegment),
            ("/openai/v1/%2E%2e/x", DotSegment),
            ("/openai/v1/.%2E/x", DotSegment),
            ("/openai/v1/%2e/x", DotSegment),
            ("/openai/v1/%252e%252e/x", DotSegment),
            ("/openai/v1/%25252e%25252E/x", DotSegment),
            ("/openai/v1/..;jsessionid=1/x", DotSegment),
            ("/openai/v1/..%20/x", DotSegment),
            ("/openai/v1/.../x", DotSegment),
            ("/openai/v1/%2f..%2fadmin", EncodedSlash),
            ("/openai/v1%2Fmodels", EncodedSlash),
            ("/openai/v1%252fmodels", EncodedSlash),
            ("/openai/v1%5cmodels", Backslash),
            ("/openai/v1%5Cmodels", Backslash),
            ("/openai/v1%255cmodels", Backslash),
            ("/openai/v1/models%00", EncodedControl),
            ("/openai/v1/models%0d%0aHost:%20evil", EncodedControl),
            ("/openai/v1/models%1F", EncodedControl),
            ("/openai/v1/models%7f", EncodedControl),
            ("/openai/v1/models%2500", EncodedControl),
            ("/openai/v1/models?x=%0a", EncodedControl),
            ("/openai/v1/models?x=%250a", EncodedControl),
            ("/openai/v1/models%3fkey=x", EncodedDelimiter),
            ("/openai/v1/models%23frag", EncodedDelimiter),
            ("/openai/v1/models%253F", EncodedDelimiter),
            ("/openai/v1//models", EmptySegment),
            ("/openai//v1/models", EmptySegment),
            ("/openai/v1/%zz", BadPercentEscape),
            ("/openai/v1/%2", BadPercentEscape),
            ("/openai/v1/models?x=%g1", BadPercentEscape),
            ("/openai/v1/%c0%ae%c0%ae/x", NotUtf8),
            ("/openai/v1/%ff", NotUtf8),
            (
                "/gemini/v1beta/models/gemini-1.5-flash%3AgenerateContent",
                EncodedColon,
            ),
            (
                "/gemini/v1beta/models/gemini-1.5-flash%253agenerateContent",
                EncodedColon,
            ),
            ("/openai/v1/%2525252e%2525252e/x", TooDeeplyEncoded),
        ];
        for (input, want) in cases {
            assert_eq!(parse(input).as_ref(), Err(want), "{input}");
        }
        assert_eq!(
            parse_as(Method::CONNECT, Version::HTTP_11, "api.openai.com:443"),
            Err(Connect)
        );
        assert_eq!(
            parse_as(Method::OPTIONS, Version::HTTP_11, "*"),
            Err(NoLeadingSlash)
        );
    }

    #[test]
    fn bedrock_model_ids_may_carry_an_encoded_colon_or_slash_and_nothing_else_reopens() {
        use RouteError::*;
        let bedrock = |t: &str| {
            Route::parse_with(
                &Method::POST,
                Version::HTTP_11,
                &t.parse().unwrap(),
                PathRules::BedrockModelId,
            )
        };
        let ok = "/bedrock/model/anthropic.claude-3-5-sonnet-20240620-v1%3A0/converse";
        assert_eq!(parse(ok), Err(EncodedColon), "strict by default");
        let r = bedrock(ok).unwrap();
        assert_eq!(r.target(), "bedrock");
        assert_eq!(
            r.path(),
            "/model/anthropic.claude-3-5-sonnet-20240620-v1%3A0/converse"
        );
        bedrock("/bedrock/model/us.meta.llama3-2-1b-instruct-v1%3a0/converse-stream").unwrap();
        bedrock("/bedrock/model/plain-id:0/invoke").unwrap();
        // What boto3 sends for inference-profile, provisioned-model and imported-model ARNs.
        let arns = [
            concat!(
                "/bedrock/model/arn%3Aaws%3Abedrock%3Aus-east-1%3A123456789012%3A",
                "inference-profile%2Fus.anthropic.claude-3-5-sonnet-20240620-v1%3A0/converse"
            ),
            concat!(
                "/bedrock/model/arn%3Aaws%3Abedrock%3Aus-east-1%3A123456789012%3A",
                "provisioned-model%2Fabc123xyz/invoke-with-response-stream"
            ),
            concat!(
                "/bedrock/model/arn%3aaws%3abedrock%3aus-east-1%3a123456789012%3a",
                "imported-model%2fmy-model/invoke"
            ),
        ];
        for arn in arns {
            assert_eq!(parse(arn), Err(EncodedSlash), "strict by default: {arn}");
            let r = bedrock(arn).unwrap_or_else(|e| panic!("{arn}: {e}"));
            assert_eq!(
                r.path(),
                &arn["/bedrock".len()..],
                "sent upstream as received"
            );
        }
        let t = targets();
        let r = bedrock(arns[0]).unwrap();
        assert_eq!(
            upstream_uri(t.get("openai").unwrap(), &r).path(),
            &arns[0]["/bedrock".len()..]
        );
        let refused: &[(&str, RouteError)] = &[
            ("/bedrock/model/anthropic.x-v1%253A0/converse", EncodedColon),
            ("/bedrock/model/x/conv%3Aerse", EncodedColon),
            ("/bedrock/mod%3Ael/x/converse", EncodedColon),
            (
                "/bedrock/v1beta/models/gemini%3AgenerateContent",
                EncodedColon,
            ),
            ("/bedrock/model/%2e%2e/converse", DotSegment),
            ("/bedrock/model/x%3A0/..", DotSegment),
            ("/bedrock/model/x%3A0%5c/converse", Backslash),
            ("/bedrock/model/x%3A0%0a/converse", EncodedControl),
            ("/bedrock/model/x%3A0%3f/converse", EncodedDelimiter),
            // An encoded slash anywhere but the model id, or encoded twice.
            ("/bedrock/model/x/converse%2Fx", EncodedSlash),
            ("/bedrock/mod%2Fel/x/converse", EncodedSlash),
            ("/bedrock/guardrail%2Fx/y/z", EncodedSlash),
            ("/bedrock/v1%2Fmodel/x/converse", EncodedSlash),
            ("/bedrock/model/arn%252Fx/converse", EncodedSlash),
            ("/bedrock/model/arn%25252Fx/converse", EncodedSlash),
            ("/bedrock/model/arn%2Fx", EncodedSlash),
            ("/bedrock/model/arn%2Fx/", EncodedSlash),
            // Dot segments, empty segments or `..` once the id's slashes are decoded.
            ("/bedrock/model/..%2F..%2Fguardrail/converse", DotSegment),
            ("/bedrock/model/arn%2F..%2F..%2Fx/converse", DotSegment),
            ("/bedrock/model/arn%2F.%2Fx/converse", DotSegment),
            ("/bedrock/model/arn%2F..;x/converse", DotSegment),
            ("/bedrock/model/arn%2F..%20/converse", DotSegment),
            ("/bedrock/model/arn%2Fa..b/converse", DotSegment),
            ("/bedrock/model/%2e%2e%2Fx/converse", DotSegment),
            ("/bedrock/model/%2Fx/converse", EmptySegment),
            ("/bedrock/model/x%2F/converse", EmptySegment),
            ("/bedrock/model/x%2F%2Fy/converse", EmptySegment),
            ("/bedrock/model/x%2F%5cy/converse", Backslash),
            ("/bedrock/model/x%2F%3fy/converse", EncodedDelimiter),
        ];
        for (input, want) in refused {
            assert_eq!(bedrock(input).as_ref(), Err(want), "{input}");
        }
        assert_eq!(target_name_of(&ok.parse().unwrap()), "bedrock");
    }

    #[test]
    fn deeply_nested_escapes_cost_linear_work_and_long_targets_are_refused() {
        // `%25` nested thousands of times sheds only two bytes per decoding pass; the check
        // must stop after a few passes instead of keeping every intermediate form.
        let nested = format!("/openai/v1/%{}2e", "25".repeat(20_000));
        assert_eq!(
            parse(&nested[..nested.len().min(MAX_TARGET_LEN)]),
            Err(RouteError::TooDeeplyEncoded)
        );
        assert_eq!(parse(&nested), Err(RouteError::TooLong));
    }

    #[test]
    fn raw_bytes_the_uri_parser_may_let_through_are_refused() {
        // `http` accepts some of these in paths; the check must not rely on it.
        let mut parsed = 0;
        for raw in [
            "/openai/v1\\models",
            "/openai/v1/mo\"dels",
            "/openai/v1/{x}",
            "/openai/v1/m|x",
            "/openai/v1/m^x",
            "/openai/v1/m`x",
        ] {
            match raw.parse::<Uri>() {
                Err(_) => {}
                Ok(uri) => {
                    parsed += 1;
                    let r = Route::parse(&Method::GET, Version::HTTP_11, &uri);
                    if raw.contains('\\') {
                        assert_eq!(r, Err(RouteError::Backslash), "{raw}");
                    } else {
                        // Printable ASCII that is merely unusual cannot redirect anything.
                        assert!(r.is_ok(), "{raw}: {r:?}");
                    }
                }
            }
        }
        assert!(parsed > 0, "no input reached Route::parse");
        let uri = Uri::builder()
            .path_and_query("/openai/v1/caf\u{e9}")
            .build();
        if let Ok(uri) = uri {
            assert_eq!(
                Route::parse(&Method::GET, Version::HTTP_11, &uri),
                Err(RouteError::ControlOrNonAscii)
            );
        }
    }

    #[test]
    fn debug_does_not_show_a_query_credential() {
        let r = parse("/gemini/v1beta/models?key=AIzaAPPKEY&pageSize=5").unwrap();
        let shown = format!("{r:?}");
        assert!(
            !shown.contains("AIzaAPPKEY") && shown.contains("pageSize=5"),
            "{shown}"
        );
    }

    #[test]
    fn error_messages_say_what_to_send_instead() {
        let e = parse("/openai/v1/../x").unwrap_err().to_string();
        assert!(e.contains("'..'"), "{e}");
        let e = parse("http://x/openai/v1").unwrap_err().to_string();
        assert!(e.contains("/{target}/{provider path}"), "{e}");
    }

    /// Every accepted hostile-looking input still yields the target's own authority and a path
    /// under the target's prefix.
    #[test]
    fn upstream_authority_is_always_the_targets() {
        let t = targets();
        let pieces = [
            "",
            "/",
            "//",
            ".",
            "..",
            "%2e",
            "%2E",
            "%252e",
            "%2f",
            "%2F",
            "%5c",
            "%255c",
            "@",
            "evil.example",
            ":443",
            "%40",
            "%3a",
            "?",
            "&",
            "=",
            "key=",
            "%00",
            "%0a",
            "%25",
            "%",
            "#",
            "\\",
            ";",
            "..;",
            "%20",
            "~",
            "http:",
            "//evil.example",
            "a",
            "v1",
            "models",
            "%ff",
            "%c0%ae",
            "+",
            "%2B",
        ];
        let names = [
            "openai",
            "anthropic",
            "gemini",
            "azure-openai",
            "groq",
            "ollama",
            "local",
        ];
        let mut accepted = 0usize;
        let mut n = 0u64;
        for name in names {
            let target = t.get(name).unwrap();
            for a in pieces {
                for b in pieces {
                    for c in pieces {
                        n += 1;
                        let input = format!("/{name}/{a}{b}/x{c}?q={c}{a}");
                        let Ok(uri) = input.parse::<Uri>() else {
                            continue;
                        };
                        let version = if n.is_multiple_of(3) {
                            Version::HTTP_2
                        } else {
                            Version::HTTP_11
                        };
                        let Ok(route) = Route::parse(&Method::POST, version, &uri) else {
                            continue;
                        };
                        accepted += 1;
                        assert_eq!(route.target(), name, "{input}");
                        let up = upstream_uri(target, &route);
                        assert_eq!(up.scheme(), Some(&target.upstream.scheme), "{input}");
                        assert_eq!(up.authority(), Some(&target.upstream.authority), "{input}");
                        assert!(
                            up.path()
                                .starts_with(&format!("{}/", target.upstream.path_prefix)),
                            "{input}"
                        );
                        let reparsed: Uri = up.to_string().parse().unwrap();
                        assert_eq!(
                            reparsed.authority(),
                            Some(&target.upstream.authority),
                            "{input}"
                        );
                        assert!(
                            !up.path().split('/').any(|s| s == "." || s == ".."),
                            "{input}"
                        );
                        assert!(
                            !up.query()
                                .unwrap_or("")
                                .split('&')
                                .any(|p| p.to_ascii_lowercase().starts_with("key=")),
                            "{input}"
                        );
                    }
                }
            }
        }
        assert!(
            accepted > 1000,
            "only {accepted} inputs accepted; the loop tests too little"
        );
    }

    /// The query counts toward [`MAX_TARGET_LEN`]: a short path cannot carry an oversized
    /// target past the limit in its query.
    #[test]
    fn the_query_counts_toward_the_target_length_limit() {
        let path = format!("/openai/v1/{}", "p".repeat(5000));
        let fill = |total: usize| format!("{path}?q={}", "a".repeat(total - path.len() - 2));
        let at_limit = fill(MAX_TARGET_LEN);
        assert_eq!(at_limit.len(), MAX_TARGET_LEN + 1, "path, '?' and query");
        assert!(parse(&at_limit).is_ok());
        assert_eq!(parse(&fill(MAX_TARGET_LEN + 1)), Err(RouteError::TooLong));
        assert_eq!(parse(&fill(2 * MAX_TARGET_LEN)), Err(RouteError::TooLong));
    }

    /// `..` inside a segment is a name, not a dot segment; only a decoded model-id slash makes
    /// any `..` suspect (and only under [`PathRules::BedrockModelId`]).
    #[test]
    fn two_dots_inside_a_segment_are_a_name_not_a_dot_segment() {
        for input in [
            "/openai/v1/files/file..v2/content",
            "/openai/v1/files/a..b%20c/content",
            "/openai/v1/files/..a/content",
            "/openai/v1/files/a../content",
        ] {
            assert_eq!(
                upstream(input),
                format!("https://api.openai.com{}", &input[7..])
            );
        }
    }

    /// What the rewrite must and must not touch at the edges of a URL: the base path followed by
    /// a query, a fragment or the end of a `Link` entry, a path that merely has the prefix's
    /// length, a URL that ends at its authority, and a base URL without a path.
    #[test]
    fn upstream_urls_are_rewritten_only_inside_the_base_url_up_to_where_they_end() {
        let resolve = |name: &str, url: &str| {
            let text = format!("[{name}]\nbase_url = \"{url}\"\nfamily = \"openai\"\n");
            let specs: BTreeMap<String, TargetSpec> = toml::from_str(&text).unwrap();
            Targets::resolve(&specs).unwrap()
        };
        let rewrite = |targets: &Targets, name: &str, from: &str| {
            let mut h = http::HeaderMap::new();
            h.insert("location", http::HeaderValue::from_str(from).unwrap());
            rewrite_upstream_urls(&mut h, targets.get(name).unwrap(), "http://keyward");
            h["location"].to_str().unwrap().to_string()
        };
        let based = resolve("gw", "https://api.example.com/base");
        for (from, want) in [
            (
                "https://api.example.com/base?upload_id=x",
                "http://keyward/gw?upload_id=x",
            ),
            (
                "https://api.example.com/base#part",
                "http://keyward/gw#part",
            ),
            (
                "<https://api.example.com/base>; rel=\"next\"",
                "<http://keyward/gw>; rel=\"next\"",
            ),
            // Outside the base: a path as long as the prefix, or no path at all.
            (
                "https://api.example.com/evil/x",
                "https://api.example.com/evil/x",
            ),
            (
                "https://api.example.com/evil",
                "https://api.example.com/evil",
            ),
            ("https://api.example.com", "https://api.example.com"),
        ] {
            assert_eq!(rewrite(&based, "gw", from), want, "{from}");
        }
        let bare = resolve("gw", "https://api.example.com");
        for (from, want) in [
            ("https://api.example.com", "http://keyward/gw"),
            ("https://api.example.com?x=1", "http://keyward/gw?x=1"),
            ("https://api.example.com#f", "http://keyward/gw#f"),
            (
                "<https://api.example.com>; rel=x",
                "<http://keyward/gw>; rel=x",
            ),
            ("https://api.example.com/v1/x", "http://keyward/gw/v1/x"),
            (
                "https://api.example.com.evil/v1",
                "https://api.example.com.evil/v1",
            ),
            ("https://api.example.com:444", "https://api.example.com:444"),
        ] {
            assert_eq!(rewrite(&bare, "gw", from), want, "{from}");
        }
    }
}

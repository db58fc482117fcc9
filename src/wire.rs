//! What every layer shares about HTTP on the wire: one percent-decoding pass (route checks,
//! model ids in paths, credential query parameters) and the classes of headers keyward never
//! relays (hop-by-hop, its own `keyward-*`).
//!
//! At the bottom of the tree: it knows bytes and header names, not targets, keys or calls.

use http::{HeaderMap, HeaderName};

/// Decoding passes examined; deeper nesting is refused.
pub const MAX_DECODE_PASSES: usize = 3;

/// One percent-decoding pass, the one every module uses. A `%` without two hex digits is
/// `None` when `strict`, else kept as it is (as a lenient decoder would); `plus_as_space`
/// decodes `+` as form decoders do.
pub(crate) fn percent_decode_once(b: &[u8], strict: bool, plus_as_space: bool) -> Option<Vec<u8>> {
    let hex = crate::hex::digit;
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            match (
                b.get(i + 1).and_then(|&c| hex(c)),
                b.get(i + 2).and_then(|&c| hex(c)),
            ) {
                (Some(h), Some(l)) => {
                    out.push((h << 4) | l);
                    i += 3;
                    continue;
                }
                _ if strict => return None,
                _ => {}
            }
        }
        out.push(if plus_as_space && b[i] == b'+' {
            b' '
        } else {
            b[i]
        });
        i += 1;
    }
    Some(out)
}

/// Headers that describe one connection, not the request (RFC 9110 §7.6.1).
pub(crate) const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-connection",
];

/// Removes the headers that describe one connection (those listed in every `Connection`
/// value, and the standard hop-by-hop set) and every `keyward-*` header, which only keyward
/// may set. Shared by the request side (app → upstream) and the response side (upstream →
/// app).
pub fn strip_hop_by_hop_and_keyward(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .chain(
            // One pass over the names present instead of a lookup per listed name (header
            // names are stored lowercase, as the list is written).
            headers
                .keys()
                .filter(|n| {
                    let n = n.as_str();
                    n.starts_with("keyward-") || HOP_BY_HOP.contains(&n)
                })
                .cloned(),
        )
        .collect();
    for name in named {
        headers.remove(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_pass_decodes_once_and_says_what_a_bad_escape_means() {
        assert_eq!(
            percent_decode_once(b"a%2Fb%252F", true, false).unwrap(),
            b"a/b%2F"
        );
        assert_eq!(percent_decode_once(b"100%", true, false), None);
        assert_eq!(percent_decode_once(b"%zz", true, false), None);
        assert_eq!(percent_decode_once(b"100%", false, false).unwrap(), b"100%");
        assert_eq!(percent_decode_once(b"a+b", false, true).unwrap(), b"a b");
        assert_eq!(percent_decode_once(b"a+b", false, false).unwrap(), b"a+b");
    }

    #[test]
    fn connection_headers_and_keywards_own_are_stripped_and_nothing_else() {
        let mut h = HeaderMap::new();
        for (name, value) in [
            ("connection", "close, x-session"),
            ("x-session", "1"),
            ("keep-alive", "timeout=5"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "h2c"),
            ("keyward-credential", "forged"),
            ("keyward-error", "forged"),
            ("content-type", "application/json"),
            ("x-request-id", "r1"),
        ] {
            h.append(name, value.parse().unwrap());
        }
        strip_hop_by_hop_and_keyward(&mut h);
        let mut left: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        left.sort();
        assert_eq!(left, ["content-type", "x-request-id"]);
        // Header names are stored lowercase and compared as written: a listed name with a
        // capital would never match.
        for name in HOP_BY_HOP {
            assert_eq!(*name, name.to_ascii_lowercase());
        }
        let mut every = HeaderMap::new();
        for name in HOP_BY_HOP {
            every.append(*name, "x".parse().unwrap());
        }
        strip_hop_by_hop_and_keyward(&mut every);
        assert!(every.is_empty(), "{every:?}");
    }
}

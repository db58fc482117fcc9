//! Hex encoding and decoding, the one copy every module uses (ids, tokens, MACs, fingerprints,
//! the master key file, `--payload-file`).

const DIGITS: &[u8; 16] = b"0123456789abcdef";

/// Lowercase hex of `bytes`.
pub(crate) fn encode(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    encode_into(&mut s, bytes);
    s
}

/// Appends lowercase hex of `bytes` to `out`, with no other allocation (for secrets, whose
/// digits must only ever land in the caller's buffer).
pub(crate) fn encode_into(out: &mut String, bytes: &[u8]) {
    for &b in bytes {
        out.push(DIGITS[(b >> 4) as usize] as char);
        out.push(DIGITS[(b & 15) as usize] as char);
    }
}

/// Lowercase hex of `bytes` into `out`, which must be exactly twice as long.
///
/// # Panics
/// When `out.len() != 2 * bytes.len()`.
pub(crate) fn encode_to_slice(out: &mut [u8], bytes: &[u8]) {
    assert_eq!(out.len(), 2 * bytes.len(), "hex output of the wrong length");
    for (pair, &b) in out.chunks_exact_mut(2).zip(bytes) {
        pair[0] = DIGITS[(b >> 4) as usize];
        pair[1] = DIGITS[(b & 15) as usize];
    }
}

/// The value of one hex digit, either case.
pub(crate) fn digit(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// Parses hex of either case; `None` for an odd length or a non-hex character.
pub(crate) fn decode(s: &str) -> Option<Vec<u8>> {
    let s = s.as_bytes();
    if !s.len().is_multiple_of(2) {
        return None;
    }
    s.chunks(2)
        .map(|pair| Some((digit(pair[0])? << 4) | digit(pair[1])?))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_bad_input() {
        let b = [0u8, 1, 0xab, 0xff];
        assert_eq!(encode(&b), "0001abff");
        assert_eq!(decode("0001abff").unwrap(), b);
        assert_eq!(decode("0001ABFF").unwrap(), b);
        assert_eq!(decode("0g"), None);
        assert_eq!(decode("abc"), None);
        assert_eq!(decode("+1"), None);
        assert_eq!(decode(""), Some(vec![]));
        let mut out = [0u8; 8];
        encode_to_slice(&mut out, &b);
        assert_eq!(&out, b"0001abff");
    }
}

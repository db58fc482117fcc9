//! Request fingerprints: HMAC-SHA256 of a body under a per-tenant key, so an operator holding
//! a payload can prove whether it was sent without the trail ever storing it.

use ring::hmac;

use crate::hex;
use crate::seal::Secret;

/// The fingerprint of `body` under `key`: 64 lowercase hex characters.
pub fn fingerprint(key: &Secret, body: &[u8]) -> String {
    let mut f = Fingerprinter::new(key);
    f.update(body);
    f.finish()
}

/// Incremental [`fingerprint`] for a body that arrives in chunks; a clone fingerprints a
/// prefix without ending the original.
#[derive(Clone)]
pub struct Fingerprinter(hmac::Context);

impl Fingerprinter {
    /// Starts a fingerprint under `key` (the tenant's fingerprint key).
    pub fn new(key: &Secret) -> Fingerprinter {
        let key = hmac::Key::new(hmac::HMAC_SHA256, key.expose_secret());
        Fingerprinter(hmac::Context::with_key(&key))
    }

    /// Adds the next chunk of the body.
    pub fn update(&mut self, chunk: &[u8]) {
        self.0.update(chunk);
    }

    /// The fingerprint of everything fed so far.
    pub fn finish(self) -> String {
        hex::encode(self.0.sign().as_ref())
    }
}

impl std::fmt::Debug for Fingerprinter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Fingerprinter([REDACTED])")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn incremental_matches_one_shot_and_depends_on_key_and_body() {
        let key = Secret::from_slice(&[9; 32]);
        let body = br#"{"model":"gpt-4o","messages":[]}"#;
        let whole = fingerprint(&key, body);
        assert_eq!(whole.len(), 64);
        for split in 0..=body.len() {
            let mut f = Fingerprinter::new(&key);
            f.update(&body[..split]);
            f.update(&body[split..]);
            assert_eq!(f.finish(), whole);
        }
        assert_ne!(fingerprint(&Secret::from_slice(&[8; 32]), body), whole);
        assert_ne!(fingerprint(&key, b"other"), whole);
        // Known answer (RFC 4231 test case 2) so the digest is plain HMAC-SHA256.
        assert_eq!(
            fingerprint(
                &Secret::from_slice(b"Jefe"),
                b"what do ya want for nothing?"
            ),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}

//! Envelope encryption: AES-256-GCM seals bound to their context by associated data.
//!
//! Blob layout is `nonce (12) ‖ ciphertext ‖ tag (16)`. The associated data names the level and
//! every identifier the ciphertext belongs to, so a blob copied to another row, tenant,
//! credential or version fails to open.

use aes_gcm::aead::{AeadInOut, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce, Tag};

use super::{SealError, Secret, fill_random};

/// Length of a key at every level.
pub const KEY_LEN: usize = 32;
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;

/// What a sealed blob is and whom it belongs to; encoded as the GCM associated data.
#[derive(Clone, Copy, Debug)]
pub enum Context<'a> {
    /// A tenant key wrapped by the master key.
    TenantKey { tenant: &'a str },
    /// A per-version data key wrapped by its tenant key.
    DataKey {
        tenant: &'a str,
        credential: &'a str,
        version: u32,
    },
    /// A provider secret sealed by its data key.
    Secret {
        tenant: &'a str,
        credential: &'a str,
        version: u32,
    },
    /// An auxiliary key (audit MAC, request fingerprints) wrapped by the master key.
    AuxKey { purpose: &'a str },
}

impl Context<'_> {
    /// Unambiguous encoding: a level tag, then each field length-prefixed.
    pub(crate) fn encode(&self) -> Vec<u8> {
        fn field(out: &mut Vec<u8>, value: &[u8]) {
            out.extend_from_slice(&(value.len() as u32).to_be_bytes());
            out.extend_from_slice(value);
        }
        let mut out = b"keyward/v1".to_vec();
        match *self {
            Context::TenantKey { tenant } => {
                field(&mut out, b"tenant-key");
                field(&mut out, tenant.as_bytes());
            }
            Context::DataKey {
                tenant,
                credential,
                version,
            } => {
                field(&mut out, b"data-key");
                field(&mut out, tenant.as_bytes());
                field(&mut out, credential.as_bytes());
                field(&mut out, &version.to_be_bytes());
            }
            Context::Secret {
                tenant,
                credential,
                version,
            } => {
                field(&mut out, b"secret");
                field(&mut out, tenant.as_bytes());
                field(&mut out, credential.as_bytes());
                field(&mut out, &version.to_be_bytes());
            }
            Context::AuxKey { purpose } => {
                field(&mut out, b"aux-key");
                field(&mut out, purpose.as_bytes());
            }
        }
        out
    }
}

/// Seals `plaintext` under `key` with a fresh random nonce.
pub fn seal(key: &Secret, context: Context<'_>, plaintext: &[u8]) -> Vec<u8> {
    let cipher = cipher(key);
    let mut nonce = [0u8; NONCE_LEN];
    fill_random(&mut nonce);
    let mut blob = Vec::with_capacity(NONCE_LEN + plaintext.len() + TAG_LEN);
    blob.extend_from_slice(&nonce);
    blob.extend_from_slice(plaintext);
    let tag = cipher
        .encrypt_inout_detached(
            &Nonce::from(nonce),
            &context.encode(),
            (&mut blob[NONCE_LEN..]).into(),
        )
        .expect("AES-GCM encryption of a bounded buffer cannot fail");
    blob.extend_from_slice(&tag);
    blob
}

/// Opens a blob made by [`seal`] with the same key and context, decrypting straight into
/// locked memory so the plaintext never touches the ordinary heap.
pub fn open(key: &Secret, context: Context<'_>, blob: &[u8]) -> Result<Secret, SealError> {
    if blob.len() < NONCE_LEN + TAG_LEN {
        return Err(SealError::Malformed);
    }
    let (nonce, rest) = blob.split_at(NONCE_LEN);
    let (ciphertext, tag) = rest.split_at(rest.len() - TAG_LEN);
    let mut out = Secret::from_slice(ciphertext);
    let nonce: [u8; NONCE_LEN] = nonce.try_into().expect("split at NONCE_LEN");
    let tag: [u8; TAG_LEN] = tag.try_into().expect("split at TAG_LEN");
    cipher(key)
        .decrypt_inout_detached(
            &Nonce::from(nonce),
            &context.encode(),
            out.expose_secret_mut().into(),
            &Tag::from(tag),
        )
        .map_err(|_| SealError::Unauthentic)?;
    Ok(out)
}

fn cipher(key: &Secret) -> Aes256Gcm {
    assert_eq!(key.len(), KEY_LEN, "AES-256 keys are 32 bytes");
    Aes256Gcm::new_from_slice(key.expose_secret()).expect("32-byte key")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> Context<'static> {
        Context::Secret {
            tenant: "t1",
            credential: "cred_a",
            version: 1,
        }
    }

    #[test]
    fn round_trips() {
        let key = Secret::random(KEY_LEN);
        let blob = seal(&key, ctx(), b"sk-hello");
        assert_eq!(
            open(&key, ctx(), &blob).unwrap().expose_secret(),
            b"sk-hello"
        );
    }

    #[test]
    fn same_plaintext_sealed_twice_differs() {
        let key = Secret::random(KEY_LEN);
        assert_ne!(
            seal(&key, ctx(), b"sk-hello"),
            seal(&key, ctx(), b"sk-hello")
        );
    }

    #[test]
    fn every_flipped_byte_fails_to_open() {
        let key = Secret::random(KEY_LEN);
        let blob = seal(&key, ctx(), b"sk-hello-world");
        for i in 0..blob.len() {
            let mut bad = blob.clone();
            bad[i] ^= 0x01;
            assert!(
                matches!(open(&key, ctx(), &bad), Err(SealError::Unauthentic)),
                "byte {i}"
            );
        }
        assert!(matches!(
            open(&key, ctx(), &blob[..20]),
            Err(SealError::Malformed)
        ));
    }

    #[test]
    fn empty_plaintext_opens_and_every_shorter_blob_is_malformed() {
        // The shortest blob is a nonce and a tag around nothing: it must open, and one byte
        // less must be refused as malformed rather than split out of bounds.
        let key = Secret::random(KEY_LEN);
        let blob = seal(&key, ctx(), b"");
        assert_eq!(blob.len(), NONCE_LEN + TAG_LEN);
        assert!(open(&key, ctx(), &blob).unwrap().is_empty());
        for len in 0..blob.len() {
            assert!(
                matches!(open(&key, ctx(), &blob[..len]), Err(SealError::Malformed)),
                "{len} bytes"
            );
        }
    }

    #[test]
    fn other_context_fails_to_open() {
        let key = Secret::random(KEY_LEN);
        let blob = seal(&key, ctx(), b"sk-hello");
        let others = [
            Context::Secret {
                tenant: "t2",
                credential: "cred_a",
                version: 1,
            },
            Context::Secret {
                tenant: "t1",
                credential: "cred_b",
                version: 1,
            },
            Context::Secret {
                tenant: "t1",
                credential: "cred_a",
                version: 2,
            },
            Context::DataKey {
                tenant: "t1",
                credential: "cred_a",
                version: 1,
            },
        ];
        for other in others {
            assert!(open(&key, other, &blob).is_err(), "{other:?}");
        }
        assert!(open(&Secret::random(KEY_LEN), ctx(), &blob).is_err());
    }
}

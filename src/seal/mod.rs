//! Key handling: locked memory, the master key, and the three-level envelope
//! (master key → tenant key → data key → secret).
//!
//! `seal` knows nothing of HTTP, SQL or providers: it takes and returns byte blobs and
//! [`Secret`]s. It holds the crate's only `unsafe` code (in [`locked`]).

pub mod alloc;
mod envelope;
mod locked;
mod master;

pub use envelope::{Context, KEY_LEN, open, seal};
pub use locked::Secret;
pub use master::{MasterKeySource, load_master_key};

use ring::hmac;

/// Why a seal could not be opened or a key could not be loaded. No variant carries key
/// material.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SealError {
    /// The blob is too short to be a sealed value.
    #[error("sealed value is malformed (too short)")]
    Malformed,
    /// Wrong key, wrong context, or the blob was altered.
    #[error("sealed value failed authentication (wrong key, wrong context or tampered data)")]
    Unauthentic,
    /// The master key text is not 64 hex characters.
    #[error("master key from {source_name} must be 64 hex characters (32 bytes); {problem}")]
    BadMasterKey {
        /// Where the key came from (a path or variable name, never the key).
        source_name: String,
        /// What is wrong with it.
        problem: &'static str,
    },
    /// No master key source was configured and an external key is required.
    #[error(
        "no master key: require_external_master_key is set, but none of master_key_file, \
         --master-key-file, $CREDENTIALS_DIRECTORY/master-key or $KEYWARD_MASTER_KEY is given"
    )]
    MissingMasterKey,
    /// Reading or creating the key file failed.
    #[error("master key file {path}: {source}")]
    Io {
        /// The file involved.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
}

/// Fills `buf` from the operating system's CSPRNG.
pub fn fill_random(buf: &mut [u8]) {
    use ring::rand::SecureRandom;
    ring::rand::SystemRandom::new()
        .fill(buf)
        .expect("the system random number generator failed");
}

/// The 32-byte root key. It never leaves the process and never touches the database.
pub struct MasterKey(Secret);

impl MasterKey {
    /// Wraps raw key bytes (must be [`KEY_LEN`] long).
    pub fn from_secret(key: Secret) -> MasterKey {
        assert_eq!(key.len(), KEY_LEN);
        MasterKey(key)
    }

    /// A fresh random master key.
    pub fn generate() -> MasterKey {
        MasterKey(Secret::random(KEY_LEN))
    }

    /// A value stored beside the data that proves, at start, that this is the key the store
    /// was created with — without revealing anything about the key.
    pub fn key_check_value(&self) -> Vec<u8> {
        let key = hmac::Key::new(hmac::HMAC_SHA256, self.0.expose_secret());
        hmac::sign(&key, b"keyward/v1 key-check").as_ref().to_vec()
    }

    /// True when `stored` is this key's check value (constant time).
    pub fn matches_check_value(&self, stored: &[u8]) -> bool {
        let key = hmac::Key::new(hmac::HMAC_SHA256, self.0.expose_secret());
        hmac::verify(&key, b"keyward/v1 key-check", stored).is_ok()
    }

    /// Creates a random key for `context` (a tenant or auxiliary key) and returns it wrapped.
    pub fn new_wrapped_key(&self, context: Context<'_>) -> Vec<u8> {
        seal(&self.0, context, Secret::random(KEY_LEN).expose_secret())
    }

    /// Unwraps a key made by [`MasterKey::new_wrapped_key`] into locked memory.
    pub fn unwrap_key(&self, context: Context<'_>, wrapped: &[u8]) -> Result<Secret, SealError> {
        let key = open(&self.0, context, wrapped)?;
        if key.len() != KEY_LEN {
            return Err(SealError::Malformed);
        }
        Ok(key)
    }

    /// Seals a provider secret for one credential version: a fresh data key seals the secret,
    /// the tenant key wraps the data key.
    pub fn seal_credential(
        &self,
        wrapped_tenant_key: &[u8],
        at: CredentialRef<'_>,
        secret: &Secret,
    ) -> Result<SealedCredential, SealError> {
        let tenant_key =
            self.unwrap_key(Context::TenantKey { tenant: at.tenant }, wrapped_tenant_key)?;
        let data_key = Secret::random(KEY_LEN);
        Ok(SealedCredential {
            wrapped_data_key: seal(&tenant_key, at.data_key_context(), data_key.expose_secret()),
            ciphertext: seal(&data_key, at.secret_context(), secret.expose_secret()),
        })
    }

    /// Opens a credential version's secret into locked memory for one request.
    pub fn open_credential(
        &self,
        wrapped_tenant_key: &[u8],
        at: CredentialRef<'_>,
        wrapped_data_key: &[u8],
        ciphertext: &[u8],
    ) -> Result<Secret, SealError> {
        let tenant_key =
            self.unwrap_key(Context::TenantKey { tenant: at.tenant }, wrapped_tenant_key)?;
        open_with_tenant_key(&tenant_key, at, wrapped_data_key, ciphertext)
    }
}

/// Opens a credential version's secret with an already unwrapped tenant key (see
/// [`TenantKeyCache`]): the data key and the secret are still unsealed per request.
pub fn open_with_tenant_key(
    tenant_key: &Secret,
    at: CredentialRef<'_>,
    wrapped_data_key: &[u8],
    ciphertext: &[u8],
) -> Result<Secret, SealError> {
    let data_key = open(tenant_key, at.data_key_context(), wrapped_data_key)?;
    open(&data_key, at.secret_context(), ciphertext)
}

/// A tenant's unwrapped keys, in locked memory.
pub struct TenantKeys {
    /// Wraps the tenant's data keys.
    pub tenant: Secret,
    /// Keys the tenant's request fingerprints.
    pub fingerprint: Secret,
}

/// Unwrapped tenant keys, kept for the life of the process like the master key that unwraps
/// them, so a request unseals only its own data key and secret (two AES-GCM opens, not four).
#[derive(Default)]
pub struct TenantKeyCache {
    /// By tenant id. Tenant keys never change, so entries never go stale.
    keys: std::sync::RwLock<std::collections::HashMap<String, std::sync::Arc<TenantKeys>>>,
}

impl TenantKeyCache {
    /// The keys of `tenant`, unwrapping them with `master` on first use.
    pub fn get(
        &self,
        master: &MasterKey,
        tenant: &str,
        wrapped_tenant_key: &[u8],
        fingerprint_purpose: impl FnOnce() -> String,
        wrapped_fingerprint_key: &[u8],
    ) -> Result<std::sync::Arc<TenantKeys>, SealError> {
        if let Some(keys) = self
            .keys
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(tenant)
        {
            return Ok(keys.clone());
        }
        let purpose = fingerprint_purpose();
        let keys = std::sync::Arc::new(TenantKeys {
            tenant: master.unwrap_key(Context::TenantKey { tenant }, wrapped_tenant_key)?,
            fingerprint: master.unwrap_key(
                Context::AuxKey { purpose: &purpose },
                wrapped_fingerprint_key,
            )?,
        });
        self.keys
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(tenant.to_string(), keys.clone());
        Ok(keys)
    }
}

/// Which credential version a seal belongs to.
#[derive(Clone, Copy, Debug)]
pub struct CredentialRef<'a> {
    /// Tenant id.
    pub tenant: &'a str,
    /// Credential id.
    pub credential: &'a str,
    /// Version number.
    pub version: u32,
}

impl CredentialRef<'_> {
    fn data_key_context(&self) -> Context<'_> {
        Context::DataKey {
            tenant: self.tenant,
            credential: self.credential,
            version: self.version,
        }
    }
    fn secret_context(&self) -> Context<'_> {
        Context::Secret {
            tenant: self.tenant,
            credential: self.credential,
            version: self.version,
        }
    }
}

/// The two blobs stored for one credential version.
pub struct SealedCredential {
    /// The data key, wrapped by the tenant key.
    pub wrapped_data_key: Vec<u8>,
    /// The secret, sealed by the data key.
    pub ciphertext: Vec<u8>,
}

/// The masked preview stored beside a secret: first 4 and last 4 characters. Secrets of 12
/// bytes or fewer show only their length, since 8 characters would reveal most of them.
pub fn preview(secret: &Secret) -> String {
    let bytes = secret.expose_secret();
    let printable = |b: &[u8]| {
        b.iter()
            .map(|&c| if c.is_ascii_graphic() { c as char } else { '?' })
            .collect::<String>()
    };
    if bytes.len() <= 12 {
        return format!("…({} bytes)", bytes.len());
    }
    format!(
        "{}…{}",
        printable(&bytes[..4]),
        printable(&bytes[bytes.len() - 4..])
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(tenant: &'static str, credential: &'static str, version: u32) -> CredentialRef<'static> {
        CredentialRef {
            tenant,
            credential,
            version,
        }
    }

    #[test]
    fn three_level_round_trip() {
        let master = MasterKey::generate();
        let tk = master.new_wrapped_key(Context::TenantKey { tenant: "t1" });
        let secret = Secret::from_slice(b"sk-proj-abcdefghijklmnop");
        let sealed = master
            .seal_credential(&tk, at("t1", "c1", 1), &secret)
            .unwrap();
        let opened = master
            .open_credential(
                &tk,
                at("t1", "c1", 1),
                &sealed.wrapped_data_key,
                &sealed.ciphertext,
            )
            .unwrap();
        assert_eq!(opened.expose_secret(), secret.expose_secret());
    }

    #[test]
    fn moved_ciphertext_fails_for_other_tenant_credential_or_version() {
        let master = MasterKey::generate();
        let tk1 = master.new_wrapped_key(Context::TenantKey { tenant: "t1" });
        let tk2 = master.new_wrapped_key(Context::TenantKey { tenant: "t2" });
        let sealed = master
            .seal_credential(
                &tk1,
                at("t1", "c1", 1),
                &Secret::from_slice(b"sk-secret-value-1"),
            )
            .unwrap();
        let (dk, ct) = (&sealed.wrapped_data_key, &sealed.ciphertext);
        // Another tenant's key and id, the same tenant's key under another id, another
        // credential, another version: all must fail.
        assert!(
            master
                .open_credential(&tk2, at("t2", "c1", 1), dk, ct)
                .is_err()
        );
        assert!(
            master
                .open_credential(&tk1, at("t2", "c1", 1), dk, ct)
                .is_err()
        );
        assert!(
            master
                .open_credential(&tk1, at("t1", "c2", 1), dk, ct)
                .is_err()
        );
        assert!(
            master
                .open_credential(&tk1, at("t1", "c1", 2), dk, ct)
                .is_err()
        );
        // A tenant key copied to another tenant's row does not unwrap there.
        assert!(
            master
                .unwrap_key(Context::TenantKey { tenant: "t2" }, &tk1)
                .is_err()
        );
    }

    #[test]
    fn flipping_any_byte_of_any_level_fails() {
        let master = MasterKey::generate();
        let tk = master.new_wrapped_key(Context::TenantKey { tenant: "t1" });
        let sealed = master
            .seal_credential(
                &tk,
                at("t1", "c1", 1),
                &Secret::from_slice(b"sk-0123456789abcdef"),
            )
            .unwrap();
        let a = at("t1", "c1", 1);
        for i in 0..tk.len() {
            let mut bad = tk.clone();
            bad[i] ^= 0x80;
            assert!(
                master
                    .open_credential(&bad, a, &sealed.wrapped_data_key, &sealed.ciphertext)
                    .is_err()
            );
        }
        for i in 0..sealed.wrapped_data_key.len() {
            let mut bad = sealed.wrapped_data_key.clone();
            bad[i] ^= 0x80;
            assert!(
                master
                    .open_credential(&tk, a, &bad, &sealed.ciphertext)
                    .is_err()
            );
        }
        for i in 0..sealed.ciphertext.len() {
            let mut bad = sealed.ciphertext.clone();
            bad[i] ^= 0x80;
            assert!(
                master
                    .open_credential(&tk, a, &sealed.wrapped_data_key, &bad)
                    .is_err()
            );
        }
    }

    #[test]
    fn tenant_keys_are_unwrapped_once_and_open_credentials() {
        let master = MasterKey::generate();
        let tk = master.new_wrapped_key(Context::TenantKey { tenant: "t1" });
        let fk = master.new_wrapped_key(Context::AuxKey { purpose: "fp:t1" });
        let sealed = master
            .seal_credential(
                &tk,
                at("t1", "c1", 1),
                &Secret::from_slice(b"sk-cached-path-key"),
            )
            .unwrap();
        let cache = TenantKeyCache::default();
        let a = cache
            .get(&master, "t1", &tk, || "fp:t1".into(), &fk)
            .unwrap();
        let b = cache
            .get(&master, "t1", &tk, || "fp:t1".into(), &fk)
            .unwrap();
        assert!(std::sync::Arc::ptr_eq(&a, &b));
        let opened = open_with_tenant_key(
            &a.tenant,
            at("t1", "c1", 1),
            &sealed.wrapped_data_key,
            &sealed.ciphertext,
        )
        .unwrap();
        assert_eq!(opened.expose_secret(), b"sk-cached-path-key");
        // Another tenant's wrapped key under this id fails to unwrap, and is not cached.
        let other = master.new_wrapped_key(Context::TenantKey { tenant: "t2" });
        assert!(
            cache
                .get(&master, "t3", &other, || "fp:t3".into(), &fk)
                .is_err()
        );
    }

    #[test]
    fn wrong_master_key_is_detected_by_check_value() {
        let a = MasterKey::generate();
        let b = MasterKey::generate();
        let kcv = a.key_check_value();
        assert!(a.matches_check_value(&kcv));
        assert!(!b.matches_check_value(&kcv));
    }

    #[test]
    fn preview_masks_the_middle() {
        assert_eq!(
            preview(&Secret::from_slice(b"sk-proj-1234567890xK2m")),
            "sk-p…xK2m"
        );
        assert_eq!(preview(&Secret::from_slice(b"short")), "…(5 bytes)");
    }
}

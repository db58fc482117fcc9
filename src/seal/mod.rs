//! Key handling: locked memory, the master key, and the three-level envelope
//! (master key → tenant key → data key → secret).
//!
//! `seal` knows nothing of HTTP, SQL or providers: it takes and returns byte blobs and
//! [`Secret`]s. It holds the crate's only `unsafe` code (in [`locked`]).

pub mod alloc;
mod envelope;
mod locked;
mod master;
mod provider;

pub use envelope::{Context, KEY_LEN, open, seal};
pub use locked::Secret;
pub use master::{MasterKeySource, load_master_key};
pub use provider::{FileKek, Kek, MasterKeyProvider, Purpose};

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
    /// The provider holding the master key (an HSM, a KMS) could not be asked.
    #[error("cannot reach {provider}: {reason}; {hint}")]
    Unreachable {
        /// `pkcs11`, `aws-kms`.
        provider: &'static str,
        /// What failed (never a PIN or a secret).
        reason: String,
        /// What to check.
        hint: String,
    },
    /// A key file another user could have planted, replaced or read.
    #[error(transparent)]
    Untrusted(#[from] crate::ownership::OwnershipError),
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
}

/// Seals a provider secret for one credential version with an unwrapped tenant key (see
/// [`TenantKeyCache`]): a fresh data key seals the secret, the tenant key wraps the data key.
pub fn seal_with_tenant_key(
    tenant_key: &Secret,
    at: CredentialRef<'_>,
    secret: &Secret,
) -> SealedCredential {
    let data_key = Secret::random(KEY_LEN);
    SealedCredential {
        wrapped_data_key: seal(tenant_key, at.data_key_context(), data_key.expose_secret()),
        ciphertext: seal(&data_key, at.secret_context(), secret.expose_secret()),
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

/// Unwrapped tenant keys, kept for the life of the process, so the master key's provider is
/// asked once per tenant per process and a request unseals only its own data key and secret.
#[derive(Default)]
pub struct TenantKeyCache {
    /// By tenant id. Tenant keys never change, so entries never go stale.
    keys: std::sync::RwLock<std::collections::HashMap<String, std::sync::Arc<TenantKeys>>>,
}

impl TenantKeyCache {
    /// The keys of `tenant` if they were unwrapped already (never asks the provider).
    pub fn cached(&self, tenant: &str) -> Option<std::sync::Arc<TenantKeys>> {
        self.keys
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(tenant)
            .cloned()
    }

    /// The keys of `tenant` (its id), unwrapping them with `master` on first use. Blocks while
    /// the provider is asked: call it from a blocking thread when it may miss.
    pub fn get(
        &self,
        master: &MasterKeyProvider,
        tenant: &str,
        wrapped_tenant_key: &[u8],
        wrapped_fingerprint_key: &[u8],
    ) -> Result<std::sync::Arc<TenantKeys>, SealError> {
        if let Some(keys) = self.cached(tenant) {
            return Ok(keys);
        }
        let keys = std::sync::Arc::new(TenantKeys {
            tenant: master.unwrap(Purpose::TenantKey { tenant }, wrapped_tenant_key)?,
            fingerprint: master
                .unwrap(Purpose::FingerprintKey { tenant }, wrapped_fingerprint_key)?,
        });
        // Two threads missing at once both unwrap; the first insert wins and both are correct.
        Ok(self
            .keys
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .entry(tenant.to_string())
            .or_insert(keys)
            .clone())
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

    fn tenant_key(master: &MasterKeyProvider, tenant: &str) -> Vec<u8> {
        master
            .new_wrapped_key(Purpose::TenantKey { tenant })
            .unwrap()
    }

    fn seal_credential(
        master: &MasterKeyProvider,
        wrapped_tenant_key: &[u8],
        at: CredentialRef<'_>,
        secret: &Secret,
    ) -> SealedCredential {
        let tk = master
            .unwrap(Purpose::TenantKey { tenant: at.tenant }, wrapped_tenant_key)
            .unwrap();
        seal_with_tenant_key(&tk, at, secret)
    }

    fn open_credential(
        master: &MasterKeyProvider,
        wrapped_tenant_key: &[u8],
        at: CredentialRef<'_>,
        wrapped_data_key: &[u8],
        ciphertext: &[u8],
    ) -> Result<Secret, SealError> {
        let tk = master.unwrap(Purpose::TenantKey { tenant: at.tenant }, wrapped_tenant_key)?;
        open_with_tenant_key(&tk, at, wrapped_data_key, ciphertext)
    }

    #[test]
    fn three_level_round_trip() {
        let master = MasterKeyProvider::from(MasterKey::generate());
        let tk = tenant_key(&master, "t1");
        let secret = Secret::from_slice(b"sk-proj-abcdefghijklmnop");
        let sealed = seal_credential(&master, &tk, at("t1", "c1", 1), &secret);
        let opened = open_credential(
            &master,
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
        let master = MasterKeyProvider::from(MasterKey::generate());
        let tk1 = tenant_key(&master, "t1");
        let tk2 = tenant_key(&master, "t2");
        let sealed = seal_credential(
            &master,
            &tk1,
            at("t1", "c1", 1),
            &Secret::from_slice(b"sk-secret-value-1"),
        );
        let (dk, ct) = (&sealed.wrapped_data_key, &sealed.ciphertext);
        // Another tenant's key and id, the same tenant's key under another id, another
        // credential, another version: all must fail.
        assert!(open_credential(&master, &tk2, at("t2", "c1", 1), dk, ct).is_err());
        assert!(open_credential(&master, &tk1, at("t2", "c1", 1), dk, ct).is_err());
        assert!(open_credential(&master, &tk1, at("t1", "c2", 1), dk, ct).is_err());
        assert!(open_credential(&master, &tk1, at("t1", "c1", 2), dk, ct).is_err());
        // A tenant key copied to another tenant's row does not unwrap there.
        assert!(
            master
                .unwrap(Purpose::TenantKey { tenant: "t2" }, &tk1)
                .is_err()
        );
    }

    #[test]
    fn flipping_any_byte_of_any_level_fails() {
        let master = MasterKeyProvider::from(MasterKey::generate());
        let tk = tenant_key(&master, "t1");
        let sealed = seal_credential(
            &master,
            &tk,
            at("t1", "c1", 1),
            &Secret::from_slice(b"sk-0123456789abcdef"),
        );
        let a = at("t1", "c1", 1);
        let (dk, ct) = (&sealed.wrapped_data_key, &sealed.ciphertext);
        for i in 0..tk.len() {
            let mut bad = tk.clone();
            bad[i] ^= 0x80;
            assert!(open_credential(&master, &bad, a, dk, ct).is_err());
        }
        for i in 0..dk.len() {
            let mut bad = dk.clone();
            bad[i] ^= 0x80;
            assert!(open_credential(&master, &tk, a, &bad, ct).is_err());
        }
        for i in 0..ct.len() {
            let mut bad = ct.clone();
            bad[i] ^= 0x80;
            assert!(open_credential(&master, &tk, a, dk, &bad).is_err());
        }
    }

    #[test]
    fn tenant_keys_are_unwrapped_once_and_open_credentials() {
        let master = MasterKeyProvider::from(MasterKey::generate());
        let tk = tenant_key(&master, "t1");
        let fk = master
            .new_wrapped_key(Purpose::FingerprintKey { tenant: "t1" })
            .unwrap();
        let sealed = seal_credential(
            &master,
            &tk,
            at("t1", "c1", 1),
            &Secret::from_slice(b"sk-cached-path-key"),
        );
        let cache = TenantKeyCache::default();
        let before = master.operations();
        let a = cache.get(&master, "t1", &tk, &fk).unwrap();
        let b = cache.get(&master, "t1", &tk, &fk).unwrap();
        assert!(std::sync::Arc::ptr_eq(&a, &b));
        // Two unwraps (tenant key, fingerprint key) for the first get, none for the second.
        assert_eq!(master.operations() - before, 2);
        let opened = open_with_tenant_key(
            &a.tenant,
            at("t1", "c1", 1),
            &sealed.wrapped_data_key,
            &sealed.ciphertext,
        )
        .unwrap();
        assert_eq!(opened.expose_secret(), b"sk-cached-path-key");
        // Another tenant's wrapped keys under this id fail to unwrap, and are not cached.
        let other = tenant_key(&master, "t2");
        assert!(cache.get(&master, "t3", &other, &fk).is_err());
        assert!(cache.cached("t3").is_none());
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

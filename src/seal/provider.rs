//! The master key as a key-encryption key (KEK) held by a provider: in this process
//! ([`MasterKey`], the sources of the README's "Master key" section), or outside it (an HSM
//! through PKCS#11, a cloud KMS), in which case its bytes never enter keyward's memory.
//!
//! Every key the master key wraps is wrapped for a typed [`Purpose`] (a tenant's key, a tenant's
//! fingerprint key, the audit MAC key, the key-check value) bound as associated data, so a
//! ciphertext copied to another tenant or purpose fails to unwrap under every provider.

use std::sync::atomic::{AtomicU64, Ordering};

use super::{Context, KEY_LEN, MasterKey, MasterKeySource, SealError, Secret, open, seal};

/// What a key wrapped by the master key is for, and whose it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Purpose<'a> {
    /// The tenant key of tenant `tenant` (its id, `ten_…`): wraps the tenant's data keys.
    TenantKey {
        /// Tenant id.
        tenant: &'a str,
    },
    /// The key of tenant `tenant`'s request fingerprints (HMAC-SHA256 of request bodies).
    FingerprintKey {
        /// Tenant id.
        tenant: &'a str,
    },
    /// The key of the audit trail's MAC chain.
    AuditMacKey,
    /// The MAC key of one sealed bundle (README "Running many sidecars"): a sidecar that can
    /// unwrap it shares the authoring keyward's master key.
    BundleKey,
    /// A random value whose successful unwrap proves, at start, that the provider holds the key
    /// the store was created with.
    KeyCheck,
}

impl Purpose<'_> {
    /// Runs `f` with the envelope context of this purpose; its encoding is the associated data
    /// of AES-GCM wraps (in this process and inside a PKCS#11 token).
    pub fn with_context<R>(&self, f: impl FnOnce(Context<'_>) -> R) -> R {
        match *self {
            Purpose::TenantKey { tenant } => f(Context::TenantKey { tenant }),
            Purpose::FingerprintKey { tenant } => {
                let purpose = format!("fingerprint:{tenant}");
                f(Context::AuxKey { purpose: &purpose })
            }
            Purpose::AuditMacKey => f(Context::AuxKey {
                purpose: "audit-mac",
            }),
            Purpose::KeyCheck => f(Context::AuxKey {
                purpose: "key-check",
            }),
            Purpose::BundleKey => f(Context::AuxKey {
                purpose: "bundle-mac",
            }),
        }
    }

    /// The associated data bound to a wrap for this purpose (length-prefixed fields, see
    /// [`Context`]).
    pub fn associated_data(&self) -> Vec<u8> {
        self.with_context(|c| c.encode())
    }

    /// The purpose as string pairs, for providers whose binding is a map (AWS KMS
    /// `EncryptionContext`): `keyward:purpose` and, for per-tenant keys, `keyward:tenant`.
    pub fn encryption_context(&self) -> Vec<(&'static str, String)> {
        let (purpose, tenant) = match *self {
            Purpose::TenantKey { tenant } => ("tenant-key", Some(tenant)),
            Purpose::FingerprintKey { tenant } => ("fingerprint-key", Some(tenant)),
            Purpose::AuditMacKey => ("audit-mac-key", None),
            Purpose::KeyCheck => ("key-check", None),
            Purpose::BundleKey => ("bundle-mac-key", None),
        };
        let mut pairs = vec![("keyward:purpose", purpose.to_string())];
        if let Some(tenant) = tenant {
            pairs.push(("keyward:tenant", tenant.to_string()));
        }
        pairs
    }
}

/// A key-encryption key: wraps and unwraps small keys for a [`Purpose`]. Implementations that
/// talk to a device or a service block the calling thread; callers on an async runtime use a
/// blocking thread.
pub trait Kek: Send + Sync {
    /// The provider's name as written in the config: `file`, `pkcs11`, `aws-kms`.
    fn provider(&self) -> &'static str;

    /// Which key this is, for `keyward status`, the start banner and the store's record of who
    /// wrapped it (a file path, a token and key label, a KMS key ARN); never key bytes or a PIN.
    fn identity(&self) -> String;

    /// Wraps `plaintext` (a 32-byte key) for `purpose`.
    fn wrap(&self, purpose: Purpose<'_>, plaintext: &[u8]) -> Result<Vec<u8>, SealError>;

    /// Unwraps a blob made by [`Kek::wrap`] for the same purpose into locked memory.
    /// [`SealError::Unauthentic`] means another key, another purpose or altered data;
    /// [`SealError::Unreachable`] that the provider could not be asked.
    fn unwrap(&self, purpose: Purpose<'_>, wrapped: &[u8]) -> Result<Secret, SealError>;

    /// A value stored beside the data that proves, at start, that this is the key the store was
    /// created with. By default a random value wrapped for [`Purpose::KeyCheck`].
    fn key_check_value(&self) -> Result<Vec<u8>, SealError> {
        self.wrap(Purpose::KeyCheck, Secret::random(KEY_LEN).expose_secret())
    }

    /// Whether `stored` is this key's check value: `Ok(false)` for another key, an error only
    /// when the provider cannot be asked.
    fn matches_check_value(&self, stored: &[u8]) -> Result<bool, SealError> {
        match self.unwrap(Purpose::KeyCheck, stored) {
            Ok(_) => Ok(true),
            Err(SealError::Unauthentic | SealError::Malformed) => Ok(false),
            Err(e) => Err(e),
        }
    }
}

/// The master key in this process's locked memory (`provider = "file"`: a key file, a systemd
/// credential, `$KEYWARD_MASTER_KEY` or the generated state-dir file).
pub struct FileKek {
    key: MasterKey,
    identity: String,
}

impl FileKek {
    /// The key and where it came from.
    pub fn new(key: MasterKey, source: &MasterKeySource) -> FileKek {
        let identity = match source {
            // The same file on every later start: one name for it.
            MasterKeySource::Generated(path) => MasterKeySource::StateFile(path.clone()),
            other => other.clone(),
        }
        .to_string();
        FileKek { key, identity }
    }
}

impl Kek for FileKek {
    fn provider(&self) -> &'static str {
        "file"
    }

    fn identity(&self) -> String {
        self.identity.clone()
    }

    fn wrap(&self, purpose: Purpose<'_>, plaintext: &[u8]) -> Result<Vec<u8>, SealError> {
        Ok(purpose.with_context(|c| seal(&self.key.0, c, plaintext)))
    }

    fn unwrap(&self, purpose: Purpose<'_>, wrapped: &[u8]) -> Result<Secret, SealError> {
        purpose.with_context(|c| open(&self.key.0, c, wrapped))
    }

    /// HMAC-SHA256 of a fixed label: stores made before other providers existed keep theirs.
    fn key_check_value(&self) -> Result<Vec<u8>, SealError> {
        Ok(self.key.key_check_value())
    }

    fn matches_check_value(&self, stored: &[u8]) -> Result<bool, SealError> {
        Ok(self.key.matches_check_value(stored))
    }
}

/// The master key of a running daemon: a [`Kek`] plus a count of the operations asked of it
/// (`kek_operations` in `keyward status`), which shows the provider is asked once per tenant
/// per process, not per request.
pub struct MasterKeyProvider {
    kek: Box<dyn Kek>,
    operations: AtomicU64,
}

impl From<MasterKey> for MasterKeyProvider {
    /// A file provider around an in-memory key (tests, the offline demo).
    fn from(key: MasterKey) -> MasterKeyProvider {
        MasterKeyProvider::new(Box::new(FileKek {
            key,
            identity: "in-memory key".into(),
        }))
    }
}

impl MasterKeyProvider {
    /// Wraps a KEK.
    pub fn new(kek: Box<dyn Kek>) -> MasterKeyProvider {
        MasterKeyProvider {
            kek,
            operations: AtomicU64::new(0),
        }
    }

    /// `file`, `pkcs11` or `aws-kms`.
    pub fn provider(&self) -> &'static str {
        self.kek.provider()
    }

    /// Which key (see [`Kek::identity`]); never key bytes or a PIN.
    pub fn identity(&self) -> String {
        self.kek.identity()
    }

    /// Wraps, unwraps and key checks asked of the provider since start.
    pub fn operations(&self) -> u64 {
        self.operations.load(Ordering::Relaxed)
    }

    fn count(&self) {
        self.operations.fetch_add(1, Ordering::Relaxed);
    }

    /// Wraps `key` for `purpose`.
    pub fn wrap(&self, purpose: Purpose<'_>, key: &Secret) -> Result<Vec<u8>, SealError> {
        self.count();
        self.kek.wrap(purpose, key.expose_secret())
    }

    /// Creates a random 32-byte key for `purpose` and returns it wrapped.
    pub fn new_wrapped_key(&self, purpose: Purpose<'_>) -> Result<Vec<u8>, SealError> {
        self.wrap(purpose, &Secret::random(KEY_LEN))
    }

    /// Unwraps a 32-byte key wrapped for `purpose` into locked memory.
    pub fn unwrap(&self, purpose: Purpose<'_>, wrapped: &[u8]) -> Result<Secret, SealError> {
        self.count();
        let key = self.kek.unwrap(purpose, wrapped)?;
        if key.len() != KEY_LEN {
            return Err(SealError::Malformed);
        }
        Ok(key)
    }

    /// A new key-check value (see [`Kek::key_check_value`]).
    pub fn key_check_value(&self) -> Result<Vec<u8>, SealError> {
        self.count();
        self.kek.key_check_value()
    }

    /// Whether `stored` is this key's check value (see [`Kek::matches_check_value`]).
    pub fn matches_check_value(&self, stored: &[u8]) -> Result<bool, SealError> {
        self.count();
        self.kek.matches_check_value(stored)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_wraps_are_bound_to_their_purpose_and_tenant() {
        let kek = MasterKeyProvider::from(MasterKey::generate());
        let a = kek
            .new_wrapped_key(Purpose::TenantKey { tenant: "ten_a" })
            .unwrap();
        assert!(
            kek.unwrap(Purpose::TenantKey { tenant: "ten_a" }, &a)
                .is_ok()
        );
        for other in [
            Purpose::TenantKey { tenant: "ten_b" },
            Purpose::FingerprintKey { tenant: "ten_a" },
            Purpose::AuditMacKey,
            Purpose::KeyCheck,
        ] {
            assert!(
                matches!(kek.unwrap(other, &a), Err(SealError::Unauthentic)),
                "{other:?}"
            );
        }
        assert_eq!(kek.operations(), 6);
    }

    #[test]
    fn file_purposes_keep_the_associated_data_of_existing_stores() {
        // Stores written before providers existed bound these contexts; they must still open.
        let key = MasterKey::generate();
        let old = seal(
            &key.0,
            Context::AuxKey {
                purpose: "fingerprint:ten_a",
            },
            &[9; 32],
        );
        let audit = seal(
            &key.0,
            Context::AuxKey {
                purpose: "audit-mac",
            },
            &[8; 32],
        );
        let kek = MasterKeyProvider::from(key);
        let fp = kek
            .unwrap(Purpose::FingerprintKey { tenant: "ten_a" }, &old)
            .unwrap();
        assert_eq!(fp.expose_secret(), &[9; 32]);
        let mac = kek.unwrap(Purpose::AuditMacKey, &audit).unwrap();
        assert_eq!(mac.expose_secret(), &[8; 32]);
    }

    #[test]
    fn key_check_tells_another_key_apart() {
        let a = MasterKeyProvider::from(MasterKey::generate());
        let b = MasterKeyProvider::from(MasterKey::generate());
        let kcv = a.key_check_value().unwrap();
        assert!(a.matches_check_value(&kcv).unwrap());
        assert!(!b.matches_check_value(&kcv).unwrap());
    }

    /// A KEK that implements only wrap and unwrap (as the PKCS#11 and KMS providers do), so
    /// the key check is the trait's own: a random value wrapped for [`Purpose::KeyCheck`].
    struct WrapOnly(FileKek);

    impl Kek for WrapOnly {
        fn provider(&self) -> &'static str {
            "wrap-only"
        }
        fn identity(&self) -> String {
            "a test key".into()
        }
        fn wrap(&self, purpose: Purpose<'_>, plaintext: &[u8]) -> Result<Vec<u8>, SealError> {
            self.0.wrap(purpose, plaintext)
        }
        fn unwrap(&self, purpose: Purpose<'_>, wrapped: &[u8]) -> Result<Secret, SealError> {
            self.0.unwrap(purpose, wrapped)
        }
    }

    fn wrap_only() -> MasterKeyProvider {
        let source = MasterKeySource::ConfigFile("/etc/keyward/master.key".into());
        MasterKeyProvider::new(Box::new(WrapOnly(FileKek::new(
            MasterKey::generate(),
            &source,
        ))))
    }

    #[test]
    fn the_default_key_check_is_a_wrap_only_this_key_opens() {
        let a = wrap_only();
        let b = wrap_only();
        let kcv = a.key_check_value().unwrap();
        // A wrapped 32-byte key: nonce, key, tag.
        assert_eq!(kcv.len(), 12 + KEY_LEN + 16);
        assert!(a.matches_check_value(&kcv).unwrap());
        assert!(!b.matches_check_value(&kcv).unwrap());
        // Something that is not a wrap at all is another key's value, not an error.
        assert!(!a.matches_check_value(b"short").unwrap());
        // A value wrapped for another purpose is not a check value.
        let other = a.new_wrapped_key(Purpose::AuditMacKey).unwrap();
        assert!(!a.matches_check_value(&other).unwrap());
        assert_eq!(a.operations(), 5);
    }

    #[test]
    fn provider_and_identity_name_the_kek_and_its_source() {
        let source = MasterKeySource::ConfigFile("/etc/keyward/master.key".into());
        let file = MasterKeyProvider::new(Box::new(FileKek::new(MasterKey::generate(), &source)));
        assert_eq!(file.provider(), "file");
        assert_eq!(file.identity(), "file /etc/keyward/master.key");
        // A key generated on this start is named as the state file later starts will read.
        let generated = MasterKeySource::Generated("/var/lib/keyward/master.key".into());
        let kek = FileKek::new(MasterKey::generate(), &generated);
        assert_eq!(kek.identity(), "generated file /var/lib/keyward/master.key");
        let other = wrap_only();
        assert_eq!(other.provider(), "wrap-only");
        assert_eq!(other.identity(), "a test key");
        assert_eq!(
            MasterKeyProvider::from(MasterKey::generate()).identity(),
            "in-memory key"
        );
    }

    #[test]
    fn an_unwrapped_key_of_another_length_is_malformed() {
        let kek = MasterKeyProvider::from(MasterKey::generate());
        let short = kek
            .wrap(Purpose::AuditMacKey, &Secret::from_slice(&[7; 16]))
            .unwrap();
        assert!(matches!(
            kek.unwrap(Purpose::AuditMacKey, &short),
            Err(SealError::Malformed)
        ));
        let good = kek.new_wrapped_key(Purpose::AuditMacKey).unwrap();
        assert_eq!(
            kek.unwrap(Purpose::AuditMacKey, &good).unwrap().len(),
            KEY_LEN
        );
    }

    #[test]
    fn associated_data_is_the_purposes_envelope_context() {
        // What a PKCS#11 token binds to its wraps: the same bytes the file provider binds.
        assert_eq!(
            Purpose::TenantKey { tenant: "ten_a" }.associated_data(),
            Context::TenantKey { tenant: "ten_a" }.encode()
        );
        assert_eq!(
            Purpose::AuditMacKey.associated_data(),
            Context::AuxKey {
                purpose: "audit-mac"
            }
            .encode()
        );
        let all = [
            Purpose::TenantKey { tenant: "ten_a" },
            Purpose::TenantKey { tenant: "ten_b" },
            Purpose::FingerprintKey { tenant: "ten_a" },
            Purpose::AuditMacKey,
            Purpose::BundleKey,
            Purpose::KeyCheck,
        ]
        .map(|p| p.associated_data());
        for (i, a) in all.iter().enumerate() {
            for b in &all[i + 1..] {
                assert_ne!(a, b);
            }
        }
    }

    #[test]
    fn encryption_context_names_purpose_and_tenant() {
        assert_eq!(
            Purpose::FingerprintKey { tenant: "ten_a" }.encryption_context(),
            vec![
                ("keyward:purpose", "fingerprint-key".to_string()),
                ("keyward:tenant", "ten_a".to_string())
            ]
        );
        assert_eq!(
            Purpose::AuditMacKey.encryption_context(),
            vec![("keyward:purpose", "audit-mac-key".to_string())]
        );
    }
}

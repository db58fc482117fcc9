//! `provider = "pkcs11"`: the master key is an AES-256 secret key inside an HSM
//! (`CKA_EXTRACTABLE = false`), reached through the vendor's PKCS#11 module (OASIS PKCS#11
//! v2.40/3.0, through the `cryptoki` binding). Wraps are `CKM_AES_GCM` computed inside the token
//! with a fresh random 96-bit IV and the purpose (and tenant) as associated data; a wrapped key is
//! stored as `IV (12) ‖ ciphertext ‖ tag (16)`. The key's bytes never enter this process.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::types::RawAuthPin;

use crate::seal::{Kek, Purpose, SealError, Secret, fill_random};

const IV_LEN: usize = 12;
const TAG_BITS: u64 = 128;
const TAG_LEN: usize = 16;
const PROVIDER: &str = "pkcs11";

/// Where the key is: the config's `[master_key]` settings for `provider = "pkcs11"`.
#[derive(Debug, Clone)]
pub struct Pkcs11Settings {
    /// The PKCS#11 module (shared library).
    pub module: PathBuf,
    /// `CKA_LABEL` of the token.
    pub token_label: String,
    /// `CKA_LABEL` of the AES-256 key.
    pub key_label: String,
    /// File holding the user PIN.
    pub pin_file: PathBuf,
}

/// An AES-256 key in a PKCS#11 token, with one logged-in session (sessions are not shared
/// between threads: calls are serialised, which costs nothing at one call per tenant per
/// process).
pub struct Pkcs11Kek {
    settings: Pkcs11Settings,
    /// The user PIN, in locked memory, for logging in again if the token drops the session.
    pin: Secret,
    module: Pkcs11,
    open: Mutex<Option<Open>>,
}

struct Open {
    session: Session,
    key: ObjectHandle,
}

fn unreachable(reason: String, hint: impl Into<String>) -> SealError {
    SealError::Unreachable {
        provider: PROVIDER,
        reason,
        hint: hint.into(),
    }
}

/// The short name of a PKCS#11 return value (`CKR_PIN_INCORRECT` style text is in the
/// binding's long description; the variant name is enough to look it up).
fn rv_text(e: &Error) -> String {
    match e {
        Error::Pkcs11(rv, function) => format!("{function} returned {rv:?}"),
        other => other.to_string(),
    }
}

/// Each module is loaded and initialised once per process and never finalised: a migration
/// between two keys of the same module must not have one provider finalise the library under
/// the other.
fn load_module(path: &Path) -> Result<Pkcs11, SealError> {
    static MODULES: OnceLock<Mutex<HashMap<PathBuf, Pkcs11>>> = OnceLock::new();
    let mut modules = crate::lock(MODULES.get_or_init(Default::default));
    if let Some(m) = modules.get(path) {
        return Ok(m.clone());
    }
    let hint = "check master_key.module names the HSM vendor's PKCS#11 library (for SoftHSM2: \
                /usr/lib/softhsm/libsofthsm2.so) and that keyward's user may read it";
    let module = Pkcs11::new(path).map_err(|e| {
        unreachable(
            format!("cannot load the module {}: {e}", path.display()),
            hint,
        )
    })?;
    match module.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(Error::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => {
            return Err(unreachable(
                format!(
                    "the module {} failed to initialise: {}",
                    path.display(),
                    rv_text(&e)
                ),
                "check the module's own configuration (for SoftHSM2: $SOFTHSM2_CONF and its \
                 tokendir)",
            ));
        }
    }
    modules.insert(path.to_path_buf(), module.clone());
    Ok(module)
}

/// Reads the PIN file (one trailing newline trimmed) into locked memory. The file is a key
/// file: opened with `O_NOFOLLOW` and refused when another user could read or replace it
/// (README "Deployment checklist").
fn read_pin(path: &Path) -> Result<Secret, SealError> {
    let bytes = crate::ownership::read_key_file("HSM PIN file", path).map_err(|e| match e {
        crate::ownership::OwnershipError::Io { source, .. } => unreachable(
            format!("cannot read the PIN file {}: {source}", path.display()),
            "check master_key.pin_file (with systemd: LoadCredential=hsm-pin:... and \
             $CREDENTIALS_DIRECTORY/hsm-pin)",
        ),
        untrusted => SealError::Untrusted(untrusted),
    })?;
    let mut pin = Secret::from_slice(&bytes);
    drop(bytes);
    let mut len = pin.len();
    while len > 0 && matches!(pin.expose_secret()[len - 1], b'\n' | b'\r') {
        len -= 1;
    }
    if len == 0 {
        return Err(unreachable(
            format!("the PIN file {} is empty", path.display()),
            "write the token's user PIN into it",
        ));
    }
    if len != pin.len() {
        let trimmed = Secret::from_slice(&pin.expose_secret()[..len]);
        pin.expose_secret_mut().fill(0);
        pin = trimmed;
    }
    Ok(pin)
}

impl Pkcs11Kek {
    /// Loads the module, finds the token and the key, logs in, and checks the key is a
    /// non-extractable AES-256 key allowed to encrypt and decrypt. Every failure is
    /// [`SealError::Unreachable`] with what to check; the PIN never appears in an error.
    pub fn open(settings: Pkcs11Settings) -> Result<Pkcs11Kek, SealError> {
        let module = load_module(&settings.module)?;
        let pin = read_pin(&settings.pin_file)?;
        let kek = Pkcs11Kek {
            settings,
            pin,
            module,
            open: Mutex::new(None),
        };
        *crate::lock(&kek.open) = Some(kek.connect()?);
        Ok(kek)
    }

    fn connect(&self) -> Result<Open, SealError> {
        let s = &self.settings;
        let slots = self.module.get_slots_with_token().map_err(|e| {
            unreachable(
                format!("cannot list the module's tokens: {}", rv_text(&e)),
                "check the HSM is connected and its module configured",
            )
        })?;
        let mut labels = Vec::new();
        let mut slot = None;
        for candidate in slots {
            if let Ok(info) = self.module.get_token_info(candidate) {
                let label = info.label().trim_end().to_string();
                if label == s.token_label {
                    slot = Some(candidate);
                    break;
                }
                if !label.is_empty() {
                    labels.push(label);
                }
            }
        }
        labels.sort();
        let Some(slot) = slot else {
            return Err(unreachable(
                format!(
                    "no token labelled `{}` (tokens found: {})",
                    s.token_label,
                    if labels.is_empty() {
                        "none".to_string()
                    } else {
                        labels.join(", ")
                    }
                ),
                format!(
                    "check master_key.token_label; list tokens with `pkcs11-tool --module {} \
                     --list-slots`",
                    s.module.display()
                ),
            ));
        };
        let session = self.module.open_ro_session(slot).map_err(|e| {
            unreachable(
                format!(
                    "cannot open a session on token `{}`: {}",
                    s.token_label,
                    rv_text(&e)
                ),
                "check the HSM is reachable",
            )
        })?;
        let pin = RawAuthPin::new(Box::new(self.pin.expose_secret().to_vec()));
        match session.login_with_raw(UserType::User, &pin) {
            Ok(()) | Err(Error::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
            Err(Error::Pkcs11(rv @ (RvError::PinIncorrect | RvError::PinLenRange), _)) => {
                return Err(unreachable(
                    format!("token `{}` refused the PIN ({rv:?})", s.token_label),
                    format!(
                        "check master_key.pin_file ({}) holds the token's user PIN",
                        s.pin_file.display()
                    ),
                ));
            }
            Err(e) => {
                return Err(unreachable(
                    format!(
                        "cannot log in to token `{}`: {}",
                        s.token_label,
                        rv_text(&e)
                    ),
                    "check the token's user PIN is set and not locked",
                ));
            }
        }
        drop(pin);
        let found = session
            .find_objects(&[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::KeyType(KeyType::AES),
                Attribute::Label(s.key_label.as_bytes().to_vec()),
            ])
            .map_err(|e| {
                unreachable(
                    format!("cannot search token `{}`: {}", s.token_label, rv_text(&e)),
                    "check the HSM is reachable",
                )
            })?;
        let create_hint = format!(
            "create a non-extractable AES-256 key labelled `{}` on token `{}` (for example \
             `pkcs11-tool --module {} --login --keygen --key-type AES:32 --label {} --sensitive`), \
             or fix master_key.key_label",
            s.key_label,
            s.token_label,
            s.module.display(),
            s.key_label
        );
        let key = match found.as_slice() {
            [key] => *key,
            [] => {
                return Err(unreachable(
                    format!(
                        "no AES key labelled `{}` on token `{}`",
                        s.key_label, s.token_label
                    ),
                    create_hint,
                ));
            }
            more => {
                return Err(unreachable(
                    format!(
                        "{} AES keys are labelled `{}` on token `{}`; the label must name one",
                        more.len(),
                        s.key_label,
                        s.token_label
                    ),
                    "give the master key a label of its own",
                ));
            }
        };
        self.check_key(&session, key, &create_hint)?;
        Ok(Open { session, key })
    }

    /// Refuses a key whose bytes could leave the HSM, or that is not AES-256 for encrypt and
    /// decrypt.
    fn check_key(&self, session: &Session, key: ObjectHandle, hint: &str) -> Result<(), SealError> {
        let s = &self.settings;
        let attributes = session
            .get_attributes(
                key,
                &[
                    AttributeType::Extractable,
                    AttributeType::ValueLen,
                    AttributeType::Encrypt,
                    AttributeType::Decrypt,
                ],
            )
            .map_err(|e| {
                unreachable(
                    format!(
                        "cannot read the attributes of key `{}`: {}",
                        s.key_label,
                        rv_text(&e)
                    ),
                    "check the HSM is reachable",
                )
            })?;
        let mut problems = Vec::new();
        for attribute in attributes {
            match attribute {
                Attribute::Extractable(true) => problems.push(
                    "it is extractable (CKA_EXTRACTABLE = true), so its bytes could leave the HSM",
                ),
                Attribute::ValueLen(len) if u64::from(len) != 32 => {
                    problems.push("it is not 256 bits long")
                }
                Attribute::Encrypt(false) => {
                    problems.push("it may not encrypt (CKA_ENCRYPT = false)")
                }
                Attribute::Decrypt(false) => {
                    problems.push("it may not decrypt (CKA_DECRYPT = false)")
                }
                _ => {}
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(unreachable(
                format!(
                    "key `{}` on token `{}` cannot be the master key: {}",
                    s.key_label,
                    s.token_label,
                    problems.join("; ")
                ),
                hint.to_string(),
            ))
        }
    }

    /// Runs `op` on the open session; if the token dropped the session (HSM restarted, token
    /// reinserted), logs in again once and retries.
    fn with_session<T>(
        &self,
        op: impl Fn(&Open) -> Result<T, Error>,
    ) -> Result<Result<T, Error>, SealError> {
        let mut open = crate::lock(&self.open);
        if let Some(current) = open.as_ref() {
            match op(current) {
                Err(Error::Pkcs11(
                    RvError::SessionHandleInvalid
                    | RvError::SessionClosed
                    | RvError::UserNotLoggedIn
                    | RvError::DeviceRemoved
                    | RvError::TokenNotPresent,
                    _,
                )) => {}
                done => return Ok(done),
            }
        }
        *open = None;
        let fresh = self.connect()?;
        let result = op(&fresh);
        *open = Some(fresh);
        Ok(result)
    }
}

impl Kek for Pkcs11Kek {
    fn provider(&self) -> &'static str {
        PROVIDER
    }

    fn identity(&self) -> String {
        format!(
            "token `{}` key `{}` (module {})",
            self.settings.token_label,
            self.settings.key_label,
            self.settings.module.display()
        )
    }

    fn wrap(&self, purpose: Purpose<'_>, plaintext: &[u8]) -> Result<Vec<u8>, SealError> {
        let aad = purpose.associated_data();
        let mut iv = [0u8; IV_LEN];
        fill_random(&mut iv);
        let sealed = self
            .with_session(|open| {
                let mut iv = iv;
                let params = GcmParams::new(&mut iv, &aad, TAG_BITS.into())?;
                open.session
                    .encrypt(&Mechanism::AesGcm(params), open.key, plaintext)
            })?
            .map_err(|e| {
                unreachable(
                    format!("the token could not wrap a key: {}", rv_text(&e)),
                    "check the key may encrypt with CKM_AES_GCM",
                )
            })?;
        let mut blob = Vec::with_capacity(IV_LEN + sealed.len());
        blob.extend_from_slice(&iv);
        blob.extend_from_slice(&sealed);
        Ok(blob)
    }

    fn unwrap(&self, purpose: Purpose<'_>, wrapped: &[u8]) -> Result<Secret, SealError> {
        if wrapped.len() < IV_LEN + TAG_LEN {
            return Err(SealError::Malformed);
        }
        let aad = purpose.associated_data();
        let (iv, sealed) = wrapped.split_at(IV_LEN);
        let opened = self.with_session(|open| {
            let mut iv: [u8; IV_LEN] = iv.try_into().expect("split at IV_LEN");
            let params = GcmParams::new(&mut iv, &aad, TAG_BITS.into())?;
            open.session
                .decrypt(&Mechanism::AesGcm(params), open.key, sealed)
        })?;
        match opened {
            Ok(plain) => Ok(Secret::from_vec(plain)),
            // A tag that does not verify: another key, another purpose or tenant, or altered
            // data. Tokens report it as invalid ciphertext; SoftHSM2 2.6 reports it as
            // CKR_GENERAL_ERROR, which is why that code counts as "another key" here too.
            Err(Error::Pkcs11(
                RvError::EncryptedDataInvalid
                | RvError::EncryptedDataLenRange
                | RvError::GeneralError,
                _,
            )) => Err(SealError::Unauthentic),
            Err(e) => Err(unreachable(
                format!("the token could not unwrap a key: {}", rv_text(&e)),
                "check the key may decrypt with CKM_AES_GCM",
            )),
        }
    }
}

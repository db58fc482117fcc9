//! Key custody: builds the master key's provider from `[master_key]` (README, "Key custody")
//! and migrates a state directory from one master key to another.
//!
//! The providers that hold the key outside this process (an HSM through PKCS#11, AWS KMS) live
//! here, behind [`crate::seal::Kek`]; `seal` itself knows nothing of devices or HTTP.

pub mod pkcs11;

use std::path::{Path, PathBuf};

use crate::config::MasterKeyConfig;
use crate::seal::{FileKek, MasterKeyProvider, MasterKeySource, SealError, load_master_key};

/// A provider ready to wrap and unwrap, and whether it generated a new key file.
pub struct Opened {
    /// The master key's provider.
    pub provider: MasterKeyProvider,
    /// A `<state dir>/master.key` created by this start (the caller warns about it).
    pub generated: Option<PathBuf>,
}

/// Opens the provider `config` names. For `provider = "file"` without `path`,
/// `master_key_file` (or `--master-key-file`) and the other sources of the README's "Master
/// key" section apply, and `<state_dir>/master.key` is generated unless `require_external`.
///
/// Fails with [`SealError::Unreachable`] when an HSM or KMS cannot be asked, and with the key
/// file's own errors otherwise. Must run before the process starts other threads (it may remove
/// `KEYWARD_MASTER_KEY` from the environment).
pub fn open_provider(
    config: &MasterKeyConfig,
    master_key_file: Option<&Path>,
    state_dir: &Path,
    require_external: bool,
) -> Result<Opened, SealError> {
    match config {
        MasterKeyConfig::File { path } => {
            let file = path.as_deref().or(master_key_file);
            let (key, source) = load_master_key(file, state_dir, require_external)?;
            let generated = match &source {
                MasterKeySource::Generated(p) => Some(p.clone()),
                _ => None,
            };
            Ok(Opened {
                provider: MasterKeyProvider::new(Box::new(FileKek::new(key, &source))),
                generated,
            })
        }
        MasterKeyConfig::Pkcs11 {
            module,
            token_label,
            key_label,
            pin_file,
        } => {
            let kek = pkcs11::Pkcs11Kek::open(pkcs11::Pkcs11Settings {
                module: module.clone(),
                token_label: token_label.clone(),
                key_label: key_label.clone(),
                pin_file: pin_file.clone(),
            })?;
            Ok(Opened {
                provider: MasterKeyProvider::new(Box::new(kek)),
                generated: None,
            })
        }
        other => Err(SealError::Unreachable {
            provider: other.provider(),
            reason: "this build of keyward has no support for it".into(),
            hint: "use provider = \"file\"".into(),
        }),
    }
}

//! Key custody: builds the master key's provider from `[master_key]` (README, "Key custody")
//! and migrates a state directory from one master key to another.
//!
//! The providers that hold the key outside this process (an HSM through PKCS#11, AWS KMS) live
//! here, behind [`crate::seal::Kek`]; `seal` itself knows nothing of devices or HTTP.

pub mod aws_kms;
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
        MasterKeyConfig::AwsKms {
            key_id,
            region,
            endpoint,
            ca_file,
        } => {
            let kek = aws_kms::AwsKmsKek::open(aws_kms::AwsKmsSettings {
                key_id: key_id.clone(),
                region: region.clone(),
                endpoint: endpoint.clone(),
                ca_file: ca_file.clone(),
            })?;
            Ok(Opened {
                provider: MasterKeyProvider::new(Box::new(kek)),
                generated: None,
            })
        }
    }
}

/// Why a master-key migration stopped; each message names what to fix.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MigrateError {
    /// The audit database's MAC key could not be rewrapped.
    #[error("audit trail: {0}")]
    Audit(#[from] crate::audit::AuditError),
    /// The store's wrapped keys could not be rewrapped (including a wrong previous key).
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

/// Migrates `state_dir` from the `old` master key to the `new` one, as Vault's seal migration:
/// the store's wrapped keys (every tenant's tenant and fingerprint key, the key-check value) in
/// one SQLite transaction, after the audit MAC key's new wrap is staged beside its old one in the
/// audit database. Until the store's transaction commits the old key alone opens everything, from
/// then on the new key alone does (the audit trail keeps the new wrap on its first open), so a
/// start killed half-way never leaves a state directory that neither key opens, and running it
/// again finishes. Data keys and secrets are never touched. Returns a line for the banner.
pub fn migrate(
    state_dir: &Path,
    old: &MasterKeyProvider,
    new: &MasterKeyProvider,
) -> Result<String, MigrateError> {
    // The audit key first, staged beside the old wrap: the old key alone still opens
    // everything until the store's transaction commits, the new key alone from then on.
    let audit = crate::audit::stage_rewrap(state_dir, old, new)?;
    let store = crate::store::rewrap_master_key(state_dir, old, new)?;
    Ok(match store {
        crate::store::Rewrap::NoStore => format!(
            "no store yet; created under the new key (remove [master_key.previous]; {} is not \
             used)",
            old.identity()
        ),
        crate::store::Rewrap::AlreadyNew => format!(
            "done earlier{}: the store is under the new key; remove [master_key.previous] ({})",
            if audit {
                " (audit key finished now)"
            } else {
                ""
            },
            old.identity()
        ),
        crate::store::Rewrap::Rewrapped { tenants } => format!(
            "rewrapped {tenants} tenants' keys, the audit key and the key check from {} ({}); \
             remove [master_key.previous]",
            old.identity(),
            old.provider()
        ),
    })
}

/// Writes the `master.rewrapped` audit event of a migration whose store transaction committed,
/// and clears its pending record in the same store transaction (so a crash before the event is
/// written leaves it pending for the next start).
pub fn record_migration(state: &crate::state::State) -> Result<(), crate::store::StoreError> {
    use crate::audit::{Event, EventKind};
    state.store.write(|tx| {
        if let Some(from) = crate::store::pending_migration(tx, true)? {
            let event = Event {
                detail: Some(format!(
                    "master key changed from {from} to {}: {}",
                    state.master.provider(),
                    state.master.identity()
                )),
                ..Event::new(EventKind::MasterRewrapped)
            };
            state
                .runtime
                .block_on(state.audit.commit(event))
                .map_err(|e| {
                    crate::store::StoreError::Conflict(format!("audit unavailable: {e}"))
                })?;
        }
        Ok(())
    })
}

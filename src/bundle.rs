//! Sealed bundles: tenants, clients and credentials authored once, exported as ciphertext, and
//! served read-only by any number of sidecars that share the master key (README "Running many
//! sidecars").
//!
//! # Format (`keyward-bundle/v1`)
//! One JSON object:
//! `{"format", "serial", "instance", "exported_at", "master_key": {"provider", "identity"},
//! "bundle_key", "payload", "mac"}`. `bundle_key` is a fresh random 32-byte key per export,
//! wrapped by the master key for `Purpose::BundleKey` (hex). `payload` is a JSON text (a string
//! inside the object, so its bytes are exactly what the MAC covers) holding `serial` again and
//! the selected `tenants` (id, name, wrapped tenant and fingerprint keys, policy), `clients`
//! (token SHA-256, team, uid, workflows, revocation) and `credentials` with every version
//! (wrapped data key, ciphertext, preview, scope, priority, overlap, retirement, revocation).
//! `mac` is `HMAC-SHA256(bundle key, "keyward/bundle/v1" ‖ each header field and the payload,
//! each u32-length-prefixed)`, hex. Blobs are lowercase hex. Nothing in it is plaintext key
//! material or a token: secrets stay sealed under data keys, data keys under tenant keys,
//! tenant keys under the master key.
//!
//! # Serving
//! A sidecar with `bundle = "PATH"` reads `PATH` (or `PATH/keyward.bundle` when `PATH` is a
//! directory, such as a Kubernetes Secret volume), checks format, master key, MAC and serial,
//! and builds its catalog from it. A watcher thread (inotify through `notify`, plus polling)
//! loads each new file and swaps the catalog in one step ([`crate::catalog::CatalogHandle`]);
//! a file that fails any check is refused with the reason kept for `status`, and the last good
//! bundle keeps serving. The highest serial served is kept in `<state_dir>/bundle.serial.seen`
//! so an older bundle is refused after a restart too.

use std::path::{Path, PathBuf};
use std::sync::mpsc::{RecvTimeoutError, channel};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use ring::hmac;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::catalog::Catalog;
use crate::hex;
use crate::identity::CredentialKind;
use crate::seal::{KEY_LEN, MasterKeyProvider, Purpose, Secret};
use crate::store::{ClientRow, CredentialRow, Snapshot, TenantRow, VersionRow};

/// The format tag of a bundle whose credentials are all `api-key`s (readable by every keyward
/// that reads bundles).
pub const FORMAT: &str = "keyward-bundle/v1";
/// The format tag of a bundle holding a credential of another kind (README, "Credential
/// kinds"). A keyward from before kinds would ignore the `kind` field and inject a kind's JSON
/// document (a service account key, an Entra client secret) as if it were an API key; it
/// refuses this tag instead.
pub const FORMAT_KINDS: &str = "keyward-bundle/v2";
/// The file read inside a bundle directory.
pub const BUNDLE_FILE: &str = "keyward.bundle";
/// The authoring keyward's last exported serial.
const EXPORT_SERIAL_FILE: &str = "bundle.serial";
/// The highest serial a sidecar served.
const SEEN_SERIAL_FILE: &str = "bundle.serial.seen";
/// Largest bundle read (a bundle of 1,000 tenants × 5 credentials is about 4 MiB).
const MAX_BUNDLE_BYTES: u64 = 512 << 20;

/// The master key a bundle was exported under, as the provider names it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct MasterKeyId {
    /// `file`, `pkcs11`, `aws-kms`.
    pub provider: String,
    /// A key file path, an HSM key label, a KMS key ARN.
    pub identity: String,
}

#[derive(Serialize, Deserialize)]
struct Envelope {
    format: String,
    serial: u64,
    instance: String,
    exported_at: String,
    master_key: MasterKeyId,
    bundle_key: String,
    payload: String,
    mac: String,
}

#[derive(Serialize, Deserialize)]
struct Payload {
    serial: u64,
    tenants: Vec<TenantOut>,
    clients: Vec<ClientOut>,
    credentials: Vec<CredentialOut>,
}

#[derive(Serialize, Deserialize)]
struct TenantOut {
    id: String,
    name: String,
    wrapped_key: String,
    wrapped_fp_key: String,
    max_key_age_s: Option<i64>,
    on_expiry: String,
    rotation_overlap_s: Option<i64>,
    created_at: i64,
}

#[derive(Serialize, Deserialize)]
struct ClientOut {
    id: String,
    tenant_id: String,
    name: String,
    team: Option<String>,
    uid: Option<u32>,
    workflows: Vec<String>,
    token_sha256: String,
    created_at: i64,
    revoked_at: Option<i64>,
}

#[derive(Serialize, Deserialize)]
struct CredentialOut {
    id: String,
    tenant_id: String,
    target: String,
    name: String,
    models: Vec<String>,
    capabilities: Vec<String>,
    teams: Vec<String>,
    workflows: Vec<String>,
    priority: i64,
    created_at: i64,
    revoked_at: Option<i64>,
    /// Absent in bundles written before credential kinds: those are all `api-key`.
    #[serde(default = "api_key")]
    kind: String,
    versions: Vec<VersionOut>,
}

fn api_key() -> String {
    CredentialKind::ApiKey.as_str().to_string()
}

#[derive(Serialize, Deserialize)]
struct VersionOut {
    version: u32,
    wrapped_data_key: String,
    ciphertext: String,
    preview: String,
    created_at: i64,
    overlap_until: Option<i64>,
    retired_at: Option<i64>,
    revoked_at: Option<i64>,
}

/// Equality that takes the same time wherever the first difference is.
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn unhex(what: &str, text: &str) -> Result<Vec<u8>, String> {
    hex::decode(text).ok_or_else(|| format!("{what} is not hex"))
}

fn mac(key: &Secret, e: &Envelope) -> [u8; 32] {
    let key = hmac::Key::new(hmac::HMAC_SHA256, key.expose_secret());
    let mut ctx = hmac::Context::with_key(&key);
    ctx.update(b"keyward/bundle/v1");
    for part in [
        e.format.as_bytes(),
        &e.serial.to_be_bytes(),
        e.instance.as_bytes(),
        e.exported_at.as_bytes(),
        e.master_key.provider.as_bytes(),
        e.master_key.identity.as_bytes(),
        e.bundle_key.as_bytes(),
        e.payload.as_bytes(),
    ] {
        ctx.update(&(part.len() as u32).to_be_bytes());
        ctx.update(part);
    }
    ctx.sign().as_ref().try_into().expect("32 bytes")
}

/// What an export wrote.
#[derive(Debug, Clone, Serialize)]
pub struct Exported {
    /// The bundle text.
    pub text: String,
    /// Its serial.
    pub serial: u64,
    /// Tenants, clients and credentials in it.
    pub tenants: usize,
    /// Clients in it (revoked ones included, so their revocation reaches every sidecar).
    pub clients: usize,
    /// Credentials in it.
    pub credentials: usize,
}

/// Seals `tenants` (names; every tenant when empty) of `snapshot` into a bundle with `serial`.
/// Fails naming an unknown tenant, or when the master key cannot wrap the bundle key.
pub fn export(
    master: &MasterKeyProvider,
    snapshot: &Snapshot,
    tenants: &[String],
    instance: &str,
    serial: u64,
) -> Result<Exported, String> {
    for name in tenants {
        if !snapshot.tenants.iter().any(|t| &t.name == name) {
            return Err(format!(
                "tenant `{name}` does not exist (see `keyward tenant list`)"
            ));
        }
    }
    let chosen: Vec<&TenantRow> = snapshot
        .tenants
        .iter()
        .filter(|t| tenants.is_empty() || tenants.contains(&t.name))
        .collect();
    let ids: std::collections::HashSet<&str> = chosen.iter().map(|t| t.id.as_str()).collect();
    let payload = Payload {
        serial,
        tenants: chosen
            .iter()
            .map(|t| TenantOut {
                id: t.id.clone(),
                name: t.name.clone(),
                wrapped_key: hex::encode(&t.wrapped_key),
                wrapped_fp_key: hex::encode(&t.wrapped_fp_key),
                max_key_age_s: t.max_key_age_s,
                on_expiry: t.on_expiry.clone(),
                rotation_overlap_s: t.rotation_overlap_s,
                created_at: t.created_at,
            })
            .collect(),
        clients: snapshot
            .clients
            .iter()
            .filter(|c| ids.contains(c.tenant_id.as_str()))
            .map(|c| ClientOut {
                id: c.id.clone(),
                tenant_id: c.tenant_id.clone(),
                name: c.name.clone(),
                team: c.team.clone(),
                uid: c.uid,
                workflows: c.workflows.clone(),
                token_sha256: hex::encode(&c.token_hash),
                created_at: c.created_at,
                revoked_at: c.revoked_at,
            })
            .collect(),
        credentials: snapshot
            .credentials
            .iter()
            .filter(|c| ids.contains(c.tenant_id.as_str()))
            .map(|c| CredentialOut {
                id: c.id.clone(),
                tenant_id: c.tenant_id.clone(),
                target: c.target.clone(),
                name: c.name.clone(),
                models: c.models.clone(),
                capabilities: c.capabilities.clone(),
                teams: c.teams.clone(),
                workflows: c.workflows.clone(),
                priority: c.priority,
                created_at: c.created_at,
                revoked_at: c.revoked_at,
                kind: c.kind.as_str().to_string(),
                versions: c
                    .versions
                    .iter()
                    .map(|v| VersionOut {
                        version: v.version,
                        wrapped_data_key: hex::encode(&v.wrapped_data_key),
                        ciphertext: hex::encode(&v.ciphertext),
                        preview: v.preview.clone(),
                        created_at: v.created_at,
                        overlap_until: v.overlap_until,
                        retired_at: v.retired_at,
                        revoked_at: v.revoked_at,
                    })
                    .collect(),
            })
            .collect(),
    };
    let format = if snapshot_has_other_kinds(&payload.credentials) {
        FORMAT_KINDS
    } else {
        FORMAT
    };
    let text = seal(
        master,
        instance,
        serial,
        serde_json::to_string(&payload).expect("a payload serializes"),
        format,
    )?;
    Ok(Exported {
        text,
        serial,
        tenants: payload.tenants.len(),
        clients: payload.clients.len(),
        credentials: payload.credentials.len(),
    })
}

/// The next export serial of the authoring keyward in `state_dir` (1, 2, …), recorded before
/// it is returned so two exports never share one.
pub fn next_serial(state_dir: &Path) -> std::io::Result<u64> {
    static LOCK: Mutex<()> = Mutex::new(());
    let _guard = crate::lock(&LOCK);
    let path = state_dir.join(EXPORT_SERIAL_FILE);
    let last = read_serial(&path)?.unwrap_or(0);
    let next = last + 1;
    write_serial(&path, next)?;
    Ok(next)
}

fn read_serial(path: &Path) -> std::io::Result<Option<u64>> {
    match std::fs::read_to_string(path) {
        Ok(t) => t.trim().parse().map(Some).map_err(|_| {
            std::io::Error::other(format!(
                "{} does not hold a serial number; fix or remove it",
                path.display()
            ))
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

fn write_serial(path: &Path, serial: u64) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(format!("{serial}\n").as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// A bundle that passed every check.
#[derive(Debug)]
pub struct Loaded {
    /// Its serial.
    pub serial: u64,
    /// The authoring keyward's instance id.
    pub instance: String,
    /// When it was exported (RFC 3339).
    pub exported_at: String,
    /// Its content, ready for [`Catalog::build`].
    pub snapshot: Snapshot,
}

/// The file a configured `bundle` path means: the path itself, or `keyward.bundle` in it when
/// it is a directory.
pub fn bundle_file(path: &Path) -> PathBuf {
    if path.is_dir() {
        path.join(BUNDLE_FILE)
    } else {
        path.to_path_buf()
    }
}

/// Seals a payload JSON text, taken as it is, into a bundle text under `master`: a fresh
/// bundle key wrapped by the master key, the header (tagged [`FORMAT`]), and the MAC over both.
/// [`export`] makes real bundles the same way; the fuzz target for [`open`] uses it to reach
/// what `open` does after the MAC check. Fails when the master key cannot wrap the bundle key.
#[doc(hidden)]
pub fn seal_payload_text(
    master: &MasterKeyProvider,
    instance: &str,
    serial: u64,
    payload: String,
) -> Result<String, String> {
    seal(master, instance, serial, payload, FORMAT)
}

/// True when a credential of the payload is not an `api-key`: such a bundle is tagged
/// [`FORMAT_KINDS`].
fn snapshot_has_other_kinds(credentials: &[CredentialOut]) -> bool {
    credentials
        .iter()
        .any(|c| c.kind != CredentialKind::ApiKey.as_str())
}

/// [`seal_payload_text`] with the format tag chosen by the caller.
fn seal(
    master: &MasterKeyProvider,
    instance: &str,
    serial: u64,
    payload: String,
    format: &str,
) -> Result<String, String> {
    let key = Secret::random(KEY_LEN);
    let wrapped = master
        .wrap(Purpose::BundleKey, &key)
        .map_err(|e| format!("cannot wrap the bundle key: {e}"))?;
    let mut envelope = Envelope {
        format: format.into(),
        serial,
        instance: instance.into(),
        exported_at: crate::units::format_time(crate::units::now_unix()),
        master_key: MasterKeyId {
            provider: master.provider().into(),
            identity: master.identity(),
        },
        bundle_key: hex::encode(&wrapped),
        payload,
        mac: String::new(),
    };
    envelope.mac = hex::encode(&mac(&key, &envelope));
    Ok(serde_json::to_string_pretty(&envelope).expect("a bundle serializes") + "\n")
}

/// Checks and decodes bundle `bytes` read from `file` (named in messages) under `master`.
pub fn open(bytes: &[u8], file: &Path, master: &MasterKeyProvider) -> Result<Loaded, String> {
    let not_bundle = |why: String| format!("{} is not a keyward bundle: {why}", file.display());
    let envelope: Envelope = serde_json::from_slice(bytes).map_err(|e| {
        not_bundle(if e.is_eof() {
            "it is cut short (truncated)".into()
        } else {
            format!("damaged or another file ({e})")
        })
    })?;
    if envelope.format != FORMAT && envelope.format != FORMAT_KINDS {
        return Err(not_bundle(format!(
            "format `{}` is neither {FORMAT} nor {FORMAT_KINDS}; is this keyward older than the \
             one that exported it?",
            envelope.format.escape_debug()
        )));
    }
    let wrapped = unhex("bundle_key", &envelope.bundle_key).map_err(&not_bundle)?;
    let key = master
        .unwrap(Purpose::BundleKey, &wrapped)
        .map_err(|e| match e {
            crate::seal::SealError::Unauthentic | crate::seal::SealError::Malformed => format!(
                "{} (serial {}) was exported under another master key ({} {}); this keyward uses \
             {} {}: sidecars need the master key of the authoring keyward",
                file.display(),
                envelope.serial,
                envelope.master_key.provider,
                envelope.master_key.identity,
                master.provider(),
                master.identity()
            ),
            other => format!("{}: cannot unwrap its bundle key: {other}", file.display()),
        })?;
    let want = mac(&key, &envelope);
    let got = unhex("mac", &envelope.mac).map_err(&not_bundle)?;
    if !ct_eq(&want, &got) {
        return Err(format!(
            "{} (serial {}) fails its MAC: it was altered after export; export it again",
            file.display(),
            envelope.serial
        ));
    }
    let payload: Payload = serde_json::from_str(&envelope.payload)
        .map_err(|e| not_bundle(format!("its payload does not decode ({e})")))?;
    if payload.serial != envelope.serial {
        return Err(not_bundle(
            "its payload serial differs from its header".into(),
        ));
    }
    Ok(Loaded {
        serial: envelope.serial,
        instance: envelope.instance,
        exported_at: envelope.exported_at,
        snapshot: snapshot_of(payload).map_err(not_bundle)?,
    })
}

fn snapshot_of(p: Payload) -> Result<Snapshot, String> {
    let mut snap = Snapshot::default();
    for t in p.tenants {
        snap.tenants.push(TenantRow {
            wrapped_key: unhex("wrapped_key", &t.wrapped_key)?,
            wrapped_fp_key: unhex("wrapped_fp_key", &t.wrapped_fp_key)?,
            id: t.id,
            name: t.name,
            max_key_age_s: t.max_key_age_s,
            on_expiry: t.on_expiry,
            rotation_overlap_s: t.rotation_overlap_s,
            created_at: t.created_at,
        });
    }
    for c in p.clients {
        snap.clients.push(ClientRow {
            token_hash: unhex("token_sha256", &c.token_sha256)?,
            id: c.id,
            tenant_id: c.tenant_id,
            name: c.name,
            team: c.team,
            uid: c.uid,
            workflows: c.workflows,
            created_at: c.created_at,
            revoked_at: c.revoked_at,
        });
    }
    for c in p.credentials {
        let mut versions = Vec::with_capacity(c.versions.len());
        for v in c.versions {
            versions.push(VersionRow {
                version: v.version,
                wrapped_data_key: unhex("wrapped_data_key", &v.wrapped_data_key)?,
                ciphertext: unhex("ciphertext", &v.ciphertext)?,
                preview: v.preview,
                created_at: v.created_at,
                overlap_until: v.overlap_until,
                retired_at: v.retired_at,
                revoked_at: v.revoked_at,
            });
        }
        let kind = c
            .kind
            .parse()
            .map_err(|e: crate::identity::kind::UnknownKind| format!("credential {}: {e}", c.id))?;
        snap.credentials.push(CredentialRow {
            id: c.id,
            tenant_id: c.tenant_id,
            target: c.target,
            name: c.name,
            models: c.models,
            capabilities: c.capabilities,
            teams: c.teams,
            workflows: c.workflows,
            priority: c.priority,
            created_at: c.created_at,
            revoked_at: c.revoked_at,
            kind,
            versions,
        });
    }
    Ok(snap)
}

// === serving ===

/// How a sidecar notices a new bundle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Watch {
    /// inotify on the bundle's directory (through `notify`), plus a poll every interval as a
    /// safety net.
    Notify,
    /// Only a poll every interval (filesystems without inotify).
    Poll,
}

/// What `status` reports about the bundle.
#[derive(Default)]
struct Served {
    serial: u64,
    instance: String,
    exported_at: String,
    loaded_at: i64,
    digest: Vec<u8>,
    /// Clients of the served bundle, revoked ones included (for `client list`).
    clients: Vec<ClientRow>,
    reloads: u64,
    refused: Option<Refused>,
}

struct Refused {
    reason: String,
    at: i64,
    digest: Vec<u8>,
}

/// The bundle a sidecar serves, and its watcher's findings.
pub struct BundleSource {
    /// The configured path.
    path: PathBuf,
    state_dir: PathBuf,
    watch: Watch,
    poll: Duration,
    served: Mutex<Served>,
}

fn digest(bytes: &[u8]) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA256, bytes)
        .as_ref()
        .to_vec()
}

fn read_capped(file: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut out = Vec::new();
    std::fs::File::open(file)?
        .take(MAX_BUNDLE_BYTES + 1)
        .read_to_end(&mut out)?;
    if out.len() as u64 > MAX_BUNDLE_BYTES {
        return Err(std::io::Error::other(format!(
            "larger than {MAX_BUNDLE_BYTES} bytes"
        )));
    }
    Ok(out)
}

impl BundleSource {
    /// Loads the bundle at `path` for a start: it must pass every check and have a serial at
    /// least the highest this state directory served. Returns the source and the snapshot to
    /// serve.
    pub fn open(
        path: &Path,
        state_dir: &Path,
        watch: Watch,
        poll: Duration,
        master: &MasterKeyProvider,
    ) -> Result<(BundleSource, Snapshot), String> {
        let file = bundle_file(path);
        let bytes = read_capped(&file).map_err(|e| format!("bundle {}: {e}", file.display()))?;
        let loaded = open(&bytes, &file, master)?;
        let seen_path = state_dir.join(SEEN_SERIAL_FILE);
        let seen = read_serial(&seen_path).map_err(|e| e.to_string())?;
        if let Some(seen) = seen
            && loaded.serial < seen
        {
            return Err(format!(
                "{} has serial {}, but this state directory already served serial {seen}: an \
                 older bundle is refused (rollback); roll out a bundle with serial {seen} or \
                 newer",
                file.display(),
                loaded.serial
            ));
        }
        write_serial(&seen_path, loaded.serial)
            .map_err(|e| format!("{}: {e}", seen_path.display()))?;
        let source = BundleSource {
            path: path.to_path_buf(),
            state_dir: state_dir.to_path_buf(),
            watch,
            poll,
            served: Mutex::new(Served {
                serial: loaded.serial,
                instance: loaded.instance,
                exported_at: loaded.exported_at,
                loaded_at: crate::units::now_unix(),
                digest: digest(&bytes),
                clients: loaded.snapshot.clients.clone(),
                reloads: 0,
                refused: None,
            }),
        };
        Ok((source, loaded.snapshot))
    }

    /// The serial being served.
    pub fn serial(&self) -> u64 {
        crate::lock(&self.served).serial
    }

    /// The configured path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The refusal of a change on a bundle-served keyward.
    pub fn read_only(&self) -> String {
        format!(
            "this keyward serves bundle {} (serial {}) read-only: make the change on the \
             authoring keyward, then export and roll out a new bundle",
            self.path.display(),
            self.serial()
        )
    }

    /// Clients of the served bundle, revoked ones included.
    pub fn clients(&self) -> Vec<ClientRow> {
        crate::lock(&self.served).clients.clone()
    }

    /// `status`'s `bundle` object.
    pub fn status(&self) -> Value {
        let s = crate::lock(&self.served);
        json!({
            "path": self.path,
            "serial": s.serial,
            "authoring_instance": s.instance,
            "exported_at": s.exported_at,
            "loaded_at": crate::units::format_time(s.loaded_at),
            "reloads": s.reloads,
            "watch": match self.watch { Watch::Notify => "notify", Watch::Poll => "poll" },
            "refused": s.refused.as_ref().map(|r| json!({
                "reason": r.reason,
                "at": crate::units::format_time(r.at),
            })),
        })
    }

    /// Reads the file and, when it is new, checks it and swaps `catalog`. Returns the serial
    /// loaded, if one was.
    fn reload(
        &self,
        master: &MasterKeyProvider,
        catalog: &crate::catalog::CatalogHandle,
    ) -> Option<u64> {
        let file = bundle_file(&self.path);
        let bytes = match read_capped(&file) {
            Ok(b) => b,
            Err(e) => {
                self.refuse(format!("bundle {}: {e}", file.display()), Vec::new());
                return None;
            }
        };
        let d = digest(&bytes);
        {
            let s = crate::lock(&self.served);
            if s.digest == d || s.refused.as_ref().is_some_and(|r| r.digest == d) {
                return None;
            }
        }
        let loaded = match open(&bytes, &file, master) {
            Ok(l) => l,
            Err(why) => {
                self.refuse(why, d);
                return None;
            }
        };
        let served = self.serial();
        if loaded.serial <= served {
            self.refuse(
                format!(
                    "{} has serial {}, not newer than serial {served} being served: an older or \
                     equal bundle is refused (export a new one: serials increase on every export)",
                    file.display(),
                    loaded.serial
                ),
                d,
            );
            return None;
        }
        if let Err(e) = write_serial(&self.state_dir.join(SEEN_SERIAL_FILE), loaded.serial) {
            tracing::warn!(
                error = %e,
                "cannot record the bundle serial served; rollback protection after a restart \
                 is weaker",
            );
        }
        let clients = loaded.snapshot.clients.clone();
        catalog.replace(Catalog::build(loaded.snapshot));
        let mut s = crate::lock(&self.served);
        s.serial = loaded.serial;
        s.instance = loaded.instance;
        s.exported_at = loaded.exported_at;
        s.loaded_at = crate::units::now_unix();
        s.digest = d;
        s.clients = clients;
        s.reloads += 1;
        s.refused = None;
        tracing::info!(serial = loaded.serial, file = %file.display(), "bundle loaded");
        Some(loaded.serial)
    }

    fn refuse(&self, reason: String, digest: Vec<u8>) {
        tracing::warn!(reason = %reason, "bundle refused; the last good bundle keeps serving");
        crate::lock(&self.served).refused = Some(Refused {
            reason,
            at: crate::units::now_unix(),
            digest,
        });
    }
}

/// What the watcher needs from the daemon; a trait so the watcher does not hold the daemon.
pub trait BundleHost: Send + Sync + 'static {
    /// The bundle source, when the daemon serves one.
    fn bundle(&self) -> Option<&BundleSource>;
    /// The master key's provider.
    fn master(&self) -> &MasterKeyProvider;
    /// The catalog to swap.
    fn catalog(&self) -> &crate::catalog::CatalogHandle;
    /// Called after a new bundle replaced the catalog.
    fn catalog_replaced(&self) {}
}

/// Starts the watcher thread for `host`'s bundle; it stops when `host` is dropped. inotify
/// events on the bundle's directory (a Kubernetes Secret swaps its `..data` symlink there)
/// trigger a reload after 50 ms of quiet; the poll interval triggers one regardless.
pub fn watch<H: BundleHost>(host: &Arc<H>) -> std::io::Result<()> {
    let Some(source) = host.bundle() else {
        return Ok(());
    };
    let (mode, poll) = (source.watch, source.poll);
    let dir = {
        let p = &source.path;
        if p.is_dir() {
            p.clone()
        } else {
            p.parent()
                .map(Path::to_path_buf)
                .unwrap_or_else(|| ".".into())
        }
    };
    let (tx, rx) = channel::<()>();
    let watcher = match mode {
        Watch::Poll => None,
        Watch::Notify => {
            use notify::Watcher;
            let tx = tx.clone();
            let mut w = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                if event.is_ok() {
                    let _ = tx.send(());
                }
            })
            .map_err(std::io::Error::other)?;
            w.watch(&dir, notify::RecursiveMode::NonRecursive)
                .map_err(std::io::Error::other)?;
            Some(w)
        }
    };
    let weak: Weak<H> = Arc::downgrade(host);
    std::thread::Builder::new()
        .name("keyward-bundle".into())
        .spawn(move || {
            // Held so the channel stays open in poll mode too.
            let (_watcher, _tx) = (watcher, tx);
            let mut next_poll = Instant::now() + poll;
            loop {
                let wait = next_poll.saturating_duration_since(Instant::now());
                let due = match rx.recv_timeout(wait.min(Duration::from_secs(1))) {
                    Ok(()) => {
                        // Let a burst of events (a Secret update renames and deletes several
                        // entries) settle.
                        std::thread::sleep(Duration::from_millis(50));
                        while rx.try_recv().is_ok() {}
                        true
                    }
                    Err(RecvTimeoutError::Timeout) => Instant::now() >= next_poll,
                    Err(RecvTimeoutError::Disconnected) => Instant::now() >= next_poll,
                };
                let Some(host) = weak.upgrade() else { return };
                if due {
                    if let Some(source) = host.bundle()
                        && source.reload(host.master(), host.catalog()).is_some()
                    {
                        host.catalog_replaced();
                    }
                    next_poll = Instant::now() + poll;
                }
            }
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::seal::MasterKey;

    fn snapshot(master: &MasterKeyProvider) -> Snapshot {
        let tenant = |id: &str, name: &str| TenantRow {
            id: id.into(),
            name: name.into(),
            wrapped_key: master
                .new_wrapped_key(Purpose::TenantKey { tenant: id })
                .unwrap(),
            wrapped_fp_key: master
                .new_wrapped_key(Purpose::FingerprintKey { tenant: id })
                .unwrap(),
            max_key_age_s: Some(86_400),
            on_expiry: "warn".into(),
            rotation_overlap_s: None,
            created_at: 1,
        };
        Snapshot {
            tenants: vec![tenant("ten_a", "acme"), tenant("ten_b", "other")],
            clients: vec![ClientRow {
                id: "cli_1".into(),
                tenant_id: "ten_b".into(),
                name: "app".into(),
                team: None,
                uid: Some(1000),
                workflows: vec![],
                token_hash: vec![7; 32],
                created_at: 2,
                revoked_at: None,
            }],
            credentials: vec![],
        }
    }

    #[test]
    fn a_bundle_round_trips_and_any_change_is_refused() {
        let master: MasterKeyProvider = MasterKey::generate().into();
        let snap = snapshot(&master);
        let all = export(&master, &snap, &[], "author-1", 7).unwrap();
        assert_eq!((all.tenants, all.clients), (2, 1));
        let file = Path::new("/b");
        let loaded = open(all.text.as_bytes(), file, &master).unwrap();
        assert_eq!(loaded.serial, 7);
        assert_eq!(loaded.instance, "author-1");
        assert_eq!(
            loaded.snapshot.tenants[1].wrapped_key,
            snap.tenants[1].wrapped_key
        );
        assert_eq!(loaded.snapshot.clients[0].token_hash, vec![7; 32]);
        // Only the named tenant, and only its clients.
        let one = export(&master, &snap, &["acme".into()], "author-1", 8).unwrap();
        assert_eq!((one.tenants, one.clients), (1, 0));
        let err = export(&master, &snap, &["nope".into()], "a", 9).unwrap_err();
        assert!(err.contains("tenant `nope` does not exist"), "{err}");
        // A header field changed, the payload changed, another master key: refused, named.
        let bumped = all.text.replace("\"serial\": 7", "\"serial\": 70");
        assert!(
            open(bumped.as_bytes(), file, &master)
                .unwrap_err()
                .contains("fails its MAC")
        );
        let edited = all.text.replace("warn", "deny");
        assert!(
            open(edited.as_bytes(), file, &master)
                .unwrap_err()
                .contains("fails its MAC")
        );
        let other: MasterKeyProvider = MasterKey::generate().into();
        let err = open(all.text.as_bytes(), file, &other).unwrap_err();
        assert!(err.contains("another master key"), "{err}");
        let cut = &all.text.as_bytes()[..all.text.len() - 10];
        assert!(open(cut, file, &master).unwrap_err().contains("truncated"));
    }

    #[test]
    fn a_bundle_with_other_kinds_is_tagged_so_older_readers_refuse_it() {
        let master: MasterKeyProvider = MasterKey::generate().into();
        let mut snap = snapshot(&master);
        let credential = |id: &str, kind: CredentialKind| CredentialRow {
            id: id.into(),
            tenant_id: "ten_a".into(),
            target: "azure".into(),
            name: id.into(),
            models: vec![],
            capabilities: vec![],
            teams: vec![],
            workflows: vec![],
            priority: 100,
            created_at: 3,
            revoked_at: None,
            kind,
            versions: vec![],
        };
        snap.credentials = vec![credential("cred_key", CredentialKind::ApiKey)];
        let keys_only = export(&master, &snap, &[], "author-1", 1).unwrap();
        assert!(
            keys_only
                .text
                .contains(&format!("\"format\": \"{FORMAT}\""))
        );
        snap.credentials
            .push(credential("cred_entra", CredentialKind::AzureEntra));
        let with_kinds = export(&master, &snap, &[], "author-1", 2).unwrap();
        assert!(
            with_kinds
                .text
                .contains(&format!("\"format\": \"{FORMAT_KINDS}\"")),
            "{}",
            with_kinds.text
        );
        // This keyward reads both; the kind survives.
        let file = Path::new("/b");
        let loaded = open(with_kinds.text.as_bytes(), file, &master).unwrap();
        let kinds: Vec<CredentialKind> =
            loaded.snapshot.credentials.iter().map(|c| c.kind).collect();
        assert_eq!(kinds, [CredentialKind::ApiKey, CredentialKind::AzureEntra]);
        open(keys_only.text.as_bytes(), file, &master).unwrap();
        // A tag neither knows is refused, named (the header is checked before the MAC).
        let future = with_kinds.text.replace(FORMAT_KINDS, "keyward-bundle/v9");
        let err = open(future.as_bytes(), file, &master).unwrap_err();
        assert!(
            err.contains("keyward-bundle/v9") && err.contains("older"),
            "{err}"
        );
    }

    #[test]
    fn export_serials_increase() {
        let dir = tempfile::tempdir().unwrap();
        let serials: Vec<u64> = (0..3).map(|_| next_serial(dir.path()).unwrap()).collect();
        assert_eq!(serials, [1, 2, 3]);
    }
}

//! The tamper-evident, fail-closed audit trail: event types, the MAC chain, the journal, the
//! writer, verification, queries and retention. It must never record a header value, token, body or
//! secret, and it does not decide anything about requests: callers commit, and must not proceed
//! when a commit fails.
//!
//! # Storage
//! A row becomes durable in the **journal** (`<state_dir>/audit.journal.<seq>` segments, see
//! `journal.rs`): one append per batch on the committing caller's path. The maintenance thread
//! folds journaled rows into `<state_dir>/audit.db` every 50 ms, in one transaction per fold,
//! and deletes the segments. `audit.db` is its own SQLite file (WAL; `synchronous` per
//! [`AuditSync`]; a 200 ms busy timeout so a locked database fails the fold instead of hanging
//! it). Its `audit_meta` table holds the audit MAC key, random per store and wrapped by the
//! master key (`Context::AuxKey { purpose: "audit-mac" }`), and the retention checkpoint.
//! Queries and verification fold first, so they see every committed row; `open` replays what a
//! crash left in the journal after checking it continues the chain.

//! # Chain
//! Row `n` stores `mac_n = HMAC-SHA256(audit key, mac_{n-1} ‖ canonical(row_n))`, where the
//! canonical encoding (defined only in `event.rs`) covers every column including seq and time,
//! and `mac_0` is 32 zero bytes (the per-store key already binds the chain to its store).
//! Editing, deleting, inserting or reordering rows breaks the MAC of the first affected row.
//!
//! # Truncation anchor
//! Deleting the newest rows leaves a valid chain, so the head (last seq and MAC, itself MACed
//! under a separate domain) is anchored outside the database in `<state_dir>/audit.head`,
//! rewritten in place (one 256-byte write, fsynced with `full`) after every journaled batch.
//! If the process dies between the journal append and the anchor write, the trail is ahead of
//! the anchor; those rows chain from the anchored row, so they verify, and the next open moves
//! the anchor forward. An anchor *ahead* of the rows in the database and the journal means rows
//! were removed: `verify` reports it, and `open` refuses to start ([`AuditError::Truncated`])
//! rather than overwrite the evidence. With `audit_sync = "normal"`, a power loss (not a
//! process crash) can lose the newest commits of both files in either order and trip this
//! check; use `full` where that matters.

//! # Retention
//! Pruning deletes a prefix of rows, after checking they still verify, and stores the last
//! deleted row's seq and MAC as a MACed checkpoint in the same transaction; verification starts
//! from there.
//!
//! # Writer
//! Callers put events on a bounded queue; whoever holds the writer takes everything queued (up
//! to 4096) as one batch, computes the MACs, appends it to the journal, moves the anchor and
//! only then answers each waiter with its seq. With `audit_sync = "normal"` the caller's own
//! task does this (no thread hand-off on a request's path); with `full` a blocking-pool thread
//! does, so fsync never blocks an async worker (see `writer.rs`). When a batch cannot be
//! journaled (disk full, I/O error), or while journaled rows cannot be folded into `audit.db`
//! (lock held by another process, disk full), every waiter gets [`AuditError::Unavailable`]
//! and the chain head does not move; later batches retry from the same head. When the
//! records were journaled but the anchor write then failed, the rows stay in the chain (they
//! verify, and the next anchor write covers them) while their callers are still refused. The
//! same holds for a caller that gave up waiting: refused, though its row may land.

mod chain;
mod db;
mod event;
mod export;
mod fingerprint;
mod journal;
pub mod usage;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::Connection;
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

pub use event::{Event, EventKind, MAX_DETAIL_LEN, MAX_FIELD_LEN, Row, UnknownEventKind};
pub use export::{
    INSTANCE_FILE, InstanceReport, JsonlReport, instance_id, master_identity, verify_jsonl,
};
pub use fingerprint::{Fingerprinter, fingerprint};

use crate::config::{AuditExport, AuditSync};
use crate::seal::{MasterKeyProvider, Purpose, SealError};
use chain::{Anchor, MacKey, Position};
use writer::{Db, Refused, Shared, Writer};

/// Events that can wait in the queue; beyond this `commit` fails fast and `enqueue` drops.
const QUEUE_CAPACITY: usize = 8192;
/// Longest a caller waits for its commit; the writer's own waits are bounded by the busy
/// timeout, so this only fires on a stalled disk.
const COMMIT_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the audit trail refused an operation. Nothing here carries key material or payloads.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuditError {
    /// The event could not be made durable; the caller must not proceed.
    #[error("audit trail unavailable, refusing to proceed: {reason}")]
    Unavailable {
        /// What failed and what to do about it.
        reason: String,
    },
    /// The audit MAC key does not unwrap under this master key.
    #[error(
        "master key does not match this store: the audit key in {path} cannot be unwrapped; \
         start with the master key this state directory was created with"
    )]
    WrongMasterKey {
        /// The audit database.
        path: String,
    },
    /// The master key's provider could not be asked.
    #[error(transparent)]
    Custody(SealError),
    /// `audit.head` records rows the database no longer has.
    #[error(
        "audit trail truncated: {dir}/audit.head records seq {anchored_seq} but audit.db ends \
         at seq {db_seq}, so the newest rows were deleted; keep both files for investigation, \
         then move audit.db*, audit.journal.* and audit.head aside to start a new trail"
    )]
    Truncated {
        /// The seq the anchor records.
        anchored_seq: u64,
        /// The last seq in the database.
        db_seq: u64,
        /// The state directory.
        dir: String,
    },
    /// The trail failed an integrity check that must hold before writing can continue.
    #[error(
        "audit trail in {dir} failed its integrity check: {reason}; keep the files for \
         investigation, then move audit.db*, audit.journal.* and audit.head aside to start a \
         new trail"
    )]
    Tampered {
        /// What did not verify.
        reason: String,
        /// The state directory.
        dir: String,
    },
    /// An event a caller built is not storable (a programming error, not a runtime one).
    #[error("audit event rejected: {0}")]
    InvalidEvent(String),
    /// Opening or reading the audit database failed.
    #[error(
        "audit database {path}: {source}; check that the file is a keyward audit database and is \
         readable"
    )]
    Database {
        /// The database file.
        path: String,
        /// The SQLite error.
        source: rusqlite::Error,
    },
    /// A file next to the database could not be read or written.
    #[error("audit file {path}: {source}; check the state directory's permissions and free space")]
    Io {
        /// The file or directory.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
}

/// What `query` selects; every field narrows, `None` means any.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Filter {
    /// Tenant name.
    pub tenant: Option<String>,
    /// Credential id.
    pub credential_id: Option<String>,
    /// Client id.
    pub client_id: Option<String>,
    /// Call id.
    pub call_id: Option<String>,
    /// Event kind.
    pub event: Option<EventKind>,
    /// Rows at or after this time (ms since the epoch).
    pub since_ms: Option<i64>,
    /// Rows at or before this time (ms since the epoch).
    pub until_ms: Option<i64>,
    /// Request fingerprint (hex).
    pub fingerprint: Option<String>,
    /// At most this many rows (newest first); `None` returns every match, so interactive
    /// callers should set one.
    pub limit: Option<usize>,
}

/// The dimension `spend` (and `GET /v1/spend`) groups by.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SpendBy {
    /// Tenant name.
    #[default]
    Tenant,
    /// The client's team (`""` for clients without one).
    Team,
    /// Client id.
    Client,
    /// Credential id.
    Credential,
    /// Model as the request named it.
    Model,
    /// UTC day, `YYYY-MM-DD`.
    Day,
}

/// What [`Audit::spend`] sums. Times are bucketed by UTC hour: a call counts when the hour it
/// completed in starts within `[since_ms, until_ms]` rounded down to the hour.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SpendQuery {
    /// Only this tenant.
    pub tenant: Option<String>,
    /// Grouping.
    pub by: SpendBy,
    /// From this time (ms since the epoch).
    pub since_ms: Option<i64>,
    /// Up to this time (ms since the epoch).
    pub until_ms: Option<i64>,
}

/// One group of [`Audit::spend`]: sums over the `request.completed` rows in it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpendRow {
    /// The group's value of the chosen dimension.
    pub key: String,
    /// Completed calls.
    pub calls: u64,
    /// Input tokens (all prompt tokens).
    pub input_tokens: u64,
    /// Cached input tokens.
    pub cached_input_tokens: u64,
    /// Cache-write tokens.
    pub cache_write_tokens: u64,
    /// Output tokens.
    pub output_tokens: u64,
    /// Cost of the priced calls, micro-USD.
    pub cost_micros: u64,
    /// Calls flagged `unpriced` (their cost is not in `cost_micros`).
    pub unpriced_calls: u64,
}

/// The result of walking the chain.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyReport {
    /// Rows read and checked.
    pub rows_checked: u64,
    /// The first row that failed (a missing row's own seq); `None` when no row is to blame
    /// or everything verified.
    pub first_bad_seq: Option<u64>,
    /// Why verification failed; `None` means the trail verified.
    pub reason: Option<String>,
    /// The last seq in the database.
    pub last_seq: u64,
    /// Rows up to this seq were pruned by retention (0 if none).
    pub checkpoint_seq: u64,
    /// The seq recorded in `audit.head`.
    pub anchored_seq: u64,
}

impl VerifyReport {
    /// True when every row verified and the anchor matches.
    pub fn ok(&self) -> bool {
        self.reason.is_none()
    }
}

/// How committed rows are shipped (`audit_export`, README "Running many sidecars").
#[derive(Debug, Clone)]
pub struct ExportOptions {
    /// Standard output or a file.
    pub sink: AuditExport,
    /// Most bytes of lines that may wait for the sink before commits are refused.
    pub buffer: usize,
    /// This keyward's instance id ([`instance_id`]).
    pub instance: String,
    /// Which master key wraps the audit key ([`master_identity`]).
    pub master_key: String,
}

/// Handle to the audit trail; cheap to clone, all clones share one writer.
#[derive(Clone)]
pub struct Audit {
    inner: Arc<Inner>,
}

struct Inner {
    /// The queue and the write connection.
    shared: Arc<Shared>,
    /// Ships committed rows as JSON lines, when `audit_export` is set.
    export: Option<Arc<export::Exporter>>,
    /// The state directory.
    dir: PathBuf,
    /// For verification on read connections.
    key: Arc<MacKey>,
    /// Idle read-only connections.
    readers: Mutex<Vec<Connection>>,
    /// Fire-and-forget events dropped because the queue was full.
    dropped: AtomicU64,
}

impl Drop for Inner {
    /// The last handle is gone: the maintenance thread commits what is left and stops.
    fn drop(&mut self) {
        self.shared.close();
        if let Some(export) = &self.export {
            // Lines already buffered are still written; the export thread then exits.
            export.close();
        }
    }
}

impl std::fmt::Debug for Audit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Audit")
            .field("dir", &self.inner.dir)
            .finish_non_exhaustive()
    }
}

impl Audit {
    /// Opens or creates `<state_dir>/audit.db`, checks its head against `audit.head`, and
    /// starts the maintenance thread. Fails on a wrong master key, on truncation, or when the head
    /// does not match the anchor.
    pub fn open(
        state_dir: &Path,
        master: &MasterKeyProvider,
        sync: AuditSync,
        retention: Option<Duration>,
    ) -> Result<Audit, AuditError> {
        Audit::open_exporting(state_dir, master, sync, retention, None)
    }

    /// [`Audit::open`], also shipping every committed row as a JSON line per `export`. Rows
    /// an earlier run committed but did not write out (per `audit.export.seq`) are written
    /// first; when export was never on here, it starts with the next row.
    pub fn open_exporting(
        state_dir: &Path,
        master: &MasterKeyProvider,
        sync: AuditSync,
        retention: Option<Duration>,
        export: Option<ExportOptions>,
    ) -> Result<Audit, AuditError> {
        let dir = state_dir.to_path_buf();
        std::fs::create_dir_all(&dir).map_err(|source| AuditError::Io {
            path: dir.display().to_string(),
            source,
        })?;
        let mut conn = db::open_writer(&dir, sync)?;
        let key = Arc::new(load_key(&mut conn, &dir, master, true)?);
        let tampered = |reason: String| AuditError::Tampered {
            reason,
            dir: dir.display().to_string(),
        };
        let tip = db::tip(&conn, &key).map_err(tampered)?;
        let tip = replay_journal(&mut conn, &key, &dir, tip)?;
        let anchor = chain::read_anchor(&key, &dir).map_err(|source| AuditError::Io {
            path: dir.join(chain::HEAD_FILE).display().to_string(),
            source,
        })?;
        check_anchor(&conn, &key, &dir, anchor, tip)?;
        chain::write_anchor(&key, &dir, &tip, sync == AuditSync::Full).map_err(|source| {
            AuditError::Io {
                path: dir.join(chain::HEAD_FILE).display().to_string(),
                source,
            }
        })?;
        let last_time: i64 = conn
            .query_row(
                // The newest row's time is the latest (times never decrease along seq).
                "SELECT coalesce((SELECT time_ms FROM audit_events ORDER BY seq DESC LIMIT 1), 0)",
                [],
                |r| r.get(0),
            )
            .map_err(|source| AuditError::Database {
                path: dir.join(db::DB_FILE).display().to_string(),
                source,
            })?;
        let mut writer = Writer::new(
            key.clone(),
            dir.clone(),
            sync == AuditSync::Full,
            tip,
            last_time,
        );
        let exporter = match export {
            None => None,
            Some(options) => Some(start_export(&conn, &key, &dir, tip, options)?),
        };
        writer.export = exporter.clone();
        let db = Db {
            conn,
            key: key.clone(),
            dir: dir.clone(),
            retention,
            rows: Vec::new(),
            segments: Vec::new(),
        };
        let shared = Shared::new(writer, db, QUEUE_CAPACITY);
        let weak = Arc::downgrade(&shared);
        std::thread::Builder::new()
            .name("keyward-audit".into())
            .spawn(move || Shared::run_thread(weak))
            .map_err(|source| AuditError::Io {
                path: "audit maintenance thread".into(),
                source,
            })?;
        let inner = Arc::new(Inner {
            shared,
            export: exporter,
            dir: dir.clone(),
            key,
            readers: Mutex::new(Vec::new()),
            dropped: AtomicU64::new(0),
        });
        Ok(Audit { inner })
    }

    /// Records `event` and returns its seq once it is committed and anchored; any error means
    /// it was not recorded and the caller must not proceed.
    pub async fn commit(&self, mut event: Event) -> Result<u64, AuditError> {
        event.sanitize().map_err(AuditError::InvalidEvent)?;
        let (reply, mut rx) = oneshot::channel();
        match self.inner.shared.push(event, Some(reply)) {
            Ok(()) => {}
            Err(Refused::Full) => {
                return Err(AuditError::Unavailable {
                    reason: format!(
                        "the audit queue is full ({QUEUE_CAPACITY} events waiting); the disk \
                         is too slow for the request rate"
                    ),
                });
            }
            Err(Refused::Closed) => return Err(stopped()),
        }
        self.inner.shared.commit_queued().await;
        // Usually this task wrote the batch itself and the answer is already there.
        match rx.try_recv() {
            Ok(result) => return result,
            Err(oneshot::error::TryRecvError::Closed) => return Err(stopped()),
            Err(oneshot::error::TryRecvError::Empty) => {}
        }
        match tokio::time::timeout(COMMIT_TIMEOUT, rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(stopped()),
            Err(_) => Err(AuditError::Unavailable {
                reason: format!(
                    "the audit writer did not confirm within {COMMIT_TIMEOUT:?}; check the disk \
                     holding {}",
                    self.inner.dir.display()
                ),
            }),
        }
    }

    /// Queues `event` without waiting (for events nobody waits on, such as
    /// `request.completed`). Never blocks; a full queue drops the event, counts it and logs.
    pub fn enqueue(&self, mut event: Event) {
        if let Err(why) = event.sanitize() {
            tracing::warn!("audit event {} dropped: {why}", event.kind);
            return;
        }
        let kind = event.kind;
        match self.inner.shared.push(event, None) {
            Ok(()) => self.inner.shared.linger(),
            Err(Refused::Full) => {
                let n = self.inner.dropped.fetch_add(1, Ordering::Relaxed) + 1;
                // Logging every drop under overload would add to the overload.
                if n.is_power_of_two() {
                    tracing::warn!(dropped_total = n, "audit queue full: {kind} event dropped");
                }
            }
            Err(Refused::Closed) => {
                tracing::warn!("audit writer stopped: {kind} event dropped");
            }
        }
    }

    /// Events waiting in the queue to be committed.
    pub fn queue_depth(&self) -> usize {
        self.inner.shared.queue_len()
    }

    /// Whether the trail's directory takes a durable write now: writes 4 KiB to a probe file
    /// next to the journal, fsyncs it and removes it. The error names the path and the OS
    /// reason (a read-only or full file system, lost permissions). Blocking.
    pub fn probe_writable(&self) -> Result<(), String> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let path = self.inner.dir.join("audit.probe");
        let result = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(&path)
            .and_then(|mut f| {
                f.write_all(&[0u8; 4096])?;
                f.sync_all()
            });
        let _ = std::fs::remove_file(&path);
        result.map_err(|e| format!("cannot write to {}: {e}", path.display()))
    }

    /// How many `enqueue`d events were dropped because the queue was full.
    pub fn dropped_events(&self) -> u64 {
        self.inner.dropped.load(Ordering::Relaxed)
    }

    /// Rows matching `filter`, newest first, including every row committed before the call.
    /// Blocking (SQLite): call from `spawn_blocking` in async code.
    pub fn query(&self, filter: &Filter) -> Result<Vec<Row>, AuditError> {
        self.fold_now();
        self.with_reader(|conn| db::query(conn, filter))
    }

    /// Cost and tokens of `request.completed` rows, grouped per [`SpendQuery`], from the
    /// per-hour aggregate the fold maintains in the same transaction as the rows (so it never
    /// disagrees with them, and it survives retention pruning). Blocking, like `query`.
    pub fn spend(&self, q: &SpendQuery) -> Result<Vec<SpendRow>, AuditError> {
        self.fold_now();
        self.with_reader(|conn| db::spend(conn, q))
    }

    /// Every row naming `credential_id`, oldest first. Blocking, like [`Audit::query`].
    pub fn lifecycle(&self, credential_id: &str) -> Result<Vec<Row>, AuditError> {
        self.fold_now();
        self.with_reader(|conn| db::lifecycle(conn, credential_id))
    }

    /// Recomputes the whole chain (database and journal) and checks it against the checkpoint
    /// and `audit.head`. Blocking, like [`Audit::query`].
    pub fn verify(&self) -> Result<VerifyReport, AuditError> {
        self.fold_now();
        let anchor = chain::read_anchor(&self.inner.key, &self.inner.dir).map_err(|source| {
            AuditError::Io {
                path: self.inner.dir.join(chain::HEAD_FILE).display().to_string(),
                source,
            }
        })?;
        let (journal, damage) = read_journal(&self.inner.dir)?;
        let key = self.inner.key.clone();
        let report = self.with_reader(move |conn| db::verify(conn, &key, anchor, journal))?;
        Ok(with_damage(report, damage))
    }

    /// Deletes rows older than `older_than` (after checking they verify) and moves the
    /// checkpoint; returns how many rows were deleted.
    pub async fn prune(&self, older_than: Duration) -> Result<u64, AuditError> {
        let cutoff =
            writer::now_ms().saturating_sub(older_than.as_millis().min(i64::MAX as u128) as i64);
        let shared = self.inner.shared.clone();
        tokio::task::spawn_blocking(move || shared.with_db(|db| db.prune(cutoff)))
            .await
            .map_err(|_| stopped())?
    }

    /// Waits until everything queued before this call is committed and in `audit.db` (or
    /// has failed).
    pub async fn flush(&self) {
        let shared = self.inner.shared.clone();
        let _ = tokio::task::spawn_blocking(move || shared.with_db(|_| ())).await;
    }

    /// Writes the export's stop line after the last committed row and waits up to `grace`
    /// for every line to reach the sink. Call once, at shutdown, after the last commit; true
    /// when there is no export or everything was written.
    pub async fn stop_export(&self, grace: Duration) -> bool {
        let Some(export) = self.inner.export.clone() else {
            return true;
        };
        let shared = self.inner.shared.clone();
        tokio::task::spawn_blocking(move || export.stop(shared.drained_head(), grace))
            .await
            .unwrap_or(false)
    }

    /// The export's sink, last written seq, bytes waiting and last error (`status`), or
    /// `None` without `audit_export`.
    pub fn export_status(&self) -> Option<serde_json::Value> {
        self.inner.export.as_ref().map(|e| e.status())
    }

    /// [`Audit::flush`] for blocking callers.
    fn fold_now(&self) {
        self.inner.shared.with_db(|_| ());
    }

    /// Commits everything queued and stops accepting events (SIGTERM drain); later commits
    /// fail with `Unavailable`.
    pub async fn shutdown(self) {
        self.inner.shared.close();
        self.flush().await;
    }

    fn with_reader<T>(
        &self,
        f: impl FnOnce(&mut Connection) -> rusqlite::Result<T>,
    ) -> Result<T, AuditError> {
        let pooled = self.inner.readers.lock().expect("reader pool").pop();
        let mut conn = match pooled {
            Some(c) => c,
            None => db::open_reader(&self.inner.dir)?,
        };
        let result = f(&mut conn).map_err(|source| AuditError::Database {
            path: self.inner.dir.join(db::DB_FILE).display().to_string(),
            source,
        });
        self.inner.readers.lock().expect("reader pool").push(conn);
        result
    }
}

fn stopped() -> AuditError {
    AuditError::Unavailable {
        reason: "the audit writer has shut down".into(),
    }
}

/// Starts the exporter and queues the rows an earlier run committed but did not write out.
fn start_export(
    conn: &Connection,
    key: &Arc<MacKey>,
    dir: &Path,
    tip: Position,
    options: ExportOptions,
) -> Result<Arc<export::Exporter>, AuditError> {
    let io = |source| AuditError::Io {
        path: dir.join(export::EXPORTED_FILE).display().to_string(),
        source,
    };
    let db_err = |source| AuditError::Database {
        path: dir.join(db::DB_FILE).display().to_string(),
        source,
    };
    let wrapped_key = db::get_meta(conn, db::META_MAC_KEY)
        .map_err(db_err)?
        .unwrap_or_default();
    // Where the stream continues: after the last row written, when that row is still here
    // to chain from; otherwise (export newly on, rows pruned meanwhile) with the next row.
    let written = export::exported_seq(dir).map_err(io)?;
    let checkpoint = db::checkpoint(conn, key).unwrap_or(Position::START);
    let resume = match written {
        Some(0) if checkpoint.seq == 0 => Some(Position::START),
        Some(seq) if seq < tip.seq && seq == checkpoint.seq => Some(checkpoint),
        Some(seq) if seq < tip.seq => db::mac_at(conn, seq)
            .map_err(db_err)?
            .and_then(|m| m.try_into().ok())
            .map(|mac| Position { seq, mac }),
        _ => None,
    };
    let start = resume.unwrap_or(tip);
    if let (Some(seq), None) = (written, resume)
        && seq < tip.seq
    {
        tracing::warn!(
            from = seq + 1,
            to = tip.seq,
            "audit rows committed while the export was off or before retention pruned them \
             are not in the exported stream"
        );
    }
    let exporter = export::Exporter::start(
        &options.sink,
        options.buffer,
        export::ExportIdentity {
            instance: options.instance,
            wrapped_key,
            master_key: options.master_key,
        },
        key.clone(),
        dir,
        start.seq,
    )
    .map_err(|source| AuditError::Io {
        path: format!("audit_export {}", options.sink),
        source,
    })?;
    if start.seq < tip.seq {
        let rows = db::rows_after(conn, start.seq).map_err(|reason| AuditError::Tampered {
            reason,
            dir: dir.display().to_string(),
        })?;
        let mut lines = Vec::new();
        let mut prev = start.mac;
        let mut with_key = true;
        let mut last = start.seq;
        for row in rows.iter().take_while(|r| r.seq as u64 <= tip.seq) {
            let Ok(mac) = <[u8; chain::MAC_LEN]>::try_from(row.mac.as_slice()) else {
                break;
            };
            exporter.render(
                &mut lines,
                export::LineRow {
                    seq: row.seq as u64,
                    time_ms: row.time_ms,
                    event: &row.event,
                    prev: &prev,
                    mac: &mac,
                },
                with_key,
            );
            with_key = false;
            prev = mac;
            last = row.seq as u64;
        }
        tracing::info!(
            rows = last - start.seq,
            "writing audit rows an earlier run committed but did not export"
        );
        exporter.push(&lines, last);
    }
    Ok(exporter)
}

/// Checks a file of shipped audit lines (`keyward audit verify --jsonl`) with `master`, which
/// unwraps each instance's audit key from its key line. See [`verify_jsonl`].
pub fn verify_jsonl_file(
    path: &Path,
    master: &MasterKeyProvider,
    only: Option<&str>,
) -> std::io::Result<JsonlReport> {
    let file = std::fs::File::open(path)?;
    let unwrap = |wrapped: &[u8]| master.unwrap(Purpose::AuditMacKey, wrapped).ok();
    verify_jsonl(std::io::BufReader::new(file), &unwrap, only)
}

/// Verifies the trail in `state_dir` without a running writer (offline checks, forensics).
pub fn verify_dir(
    state_dir: &Path,
    master: &MasterKeyProvider,
) -> Result<VerifyReport, AuditError> {
    let mut conn = db::open_reader(state_dir)?;
    let key = load_key(&mut conn, state_dir, master, false)?;
    let anchor = chain::read_anchor(&key, state_dir).map_err(|source| AuditError::Io {
        path: state_dir.join(chain::HEAD_FILE).display().to_string(),
        source,
    })?;
    let (journal, damage) = read_journal(state_dir)?;
    let report =
        db::verify(&mut conn, &key, anchor, journal).map_err(|source| AuditError::Database {
            path: state_dir.join(db::DB_FILE).display().to_string(),
            source,
        })?;
    Ok(with_damage(report, damage))
}

/// The journaled rows in `dir`, and a description of any damaged record.
fn read_journal(dir: &Path) -> Result<(Vec<db::RawRow>, Option<String>), AuditError> {
    let io = |source| AuditError::Io {
        path: dir.display().to_string(),
        source,
    };
    let segments = journal::segments(dir).map_err(io)?;
    Ok(match journal::read(&segments).map_err(io)? {
        Ok(rows) => (rows, None),
        Err(damage) => (Vec::new(), Some(damage)),
    })
}

/// A report that also fails on journal damage found before the walk. The damage is named
/// first: its rows were left out of the walk, so a "truncated" finding after it is a
/// consequence, not the cause.
fn with_damage(mut report: VerifyReport, damage: Option<String>) -> VerifyReport {
    if let Some(damage) = damage {
        report.reason = Some(match report.reason.take() {
            Some(then) => format!("{damage}; without its rows: {then}"),
            None => damage,
        });
    }
    report
}

/// Moves the rows a crash left in the journal into the database (after checking that they
/// continue the chain from `tip`), deletes the segments, and returns the new tip.
fn replay_journal(
    conn: &mut Connection,
    key: &MacKey,
    dir: &Path,
    tip: Position,
) -> Result<Position, AuditError> {
    let tampered = |reason: String| AuditError::Tampered {
        reason,
        dir: dir.display().to_string(),
    };
    let segments = journal::segments(dir).map_err(|source| AuditError::Io {
        path: dir.display().to_string(),
        source,
    })?;
    if segments.is_empty() {
        return Ok(tip);
    }
    let rows = journal::read(&segments)
        .map_err(|source| AuditError::Io {
            path: dir.display().to_string(),
            source,
        })?
        .map_err(tampered)?;
    let mut pos = tip;
    let mut replay = Vec::new();
    for row in rows.into_iter().filter(|r| r.seq as u64 > tip.seq) {
        let seq = row.seq as u64;
        if seq != pos.seq + 1 {
            return Err(tampered(format!(
                "the journal skips from row {} to row {seq}",
                pos.seq
            )));
        }
        let want = key.row_mac(&pos.mac, seq, row.time_ms, &row.event);
        if !chain::ct_eq(&row.mac, &want) {
            return Err(tampered(format!("journaled row {seq} fails its MAC")));
        }
        pos = Position { seq, mac: want };
        replay.push(row);
    }
    if !replay.is_empty() {
        writer::insert_rows(conn, &replay).map_err(|source| AuditError::Database {
            path: dir.join(db::DB_FILE).display().to_string(),
            source,
        })?;
        tracing::info!(
            rows = replay.len(),
            "audit rows recovered from the journal after an unclean stop"
        );
    }
    for path in segments {
        std::fs::remove_file(&path).map_err(|source| AuditError::Io {
            path: path.display().to_string(),
            source,
        })?;
    }
    Ok(pos)
}

/// The audit MAC key wrapped by the new master key of a migration in progress, beside the one
/// wrapped by the old key until the new key first opens the trail.
const META_MAC_KEY_NEXT: &str = "mac_key_next";

/// First step of a master key migration: stores the audit MAC key wrapped by `new` beside the
/// one wrapped by `old` (the MAC key itself, and so every row's MAC, is unchanged). Until the
/// store's own rewrap commits, `old` alone still opens the trail; after it, `new` alone does (the
/// first open under `new` keeps the new wrap and drops the old). Returns whether it staged a
/// wrap: `false` when there is no trail yet or the key is already under `new`.
pub fn stage_rewrap(
    state_dir: &Path,
    old: &MasterKeyProvider,
    new: &MasterKeyProvider,
) -> Result<bool, AuditError> {
    let file = state_dir.join(db::DB_FILE);
    if !file.exists() {
        return Ok(false);
    }
    let path = file.display().to_string();
    let db_err = |source| AuditError::Database {
        path: path.clone(),
        source,
    };
    let mut conn = db::open_writer(state_dir, AuditSync::Full)?;
    let tx = conn
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .map_err(db_err)?;
    let Some(wrapped) = db::get_meta(&tx, db::META_MAC_KEY).map_err(db_err)? else {
        return Ok(false);
    };
    let purpose = Purpose::AuditMacKey;
    match new.unwrap(purpose, &wrapped) {
        Ok(_) => return Ok(false),
        Err(e @ SealError::Unreachable { .. }) => return Err(AuditError::Custody(e)),
        Err(_) => {}
    }
    let key = old.unwrap(purpose, &wrapped).map_err(|e| match e {
        SealError::Unreachable { .. } => AuditError::Custody(e),
        _ => AuditError::WrongMasterKey { path: path.clone() },
    })?;
    let rewrapped = new.wrap(purpose, &key).map_err(AuditError::Custody)?;
    tx.execute(
        "INSERT OR REPLACE INTO audit_meta (key, value) VALUES (?1, ?2)",
        rusqlite::params![META_MAC_KEY_NEXT, rewrapped],
    )
    .map_err(db_err)?;
    tx.commit().map_err(db_err)?;
    Ok(true)
}

/// Reads (or, with `create` on an empty store, creates) the wrapped audit key and unwraps it.
fn load_key(
    conn: &mut Connection,
    dir: &Path,
    master: &MasterKeyProvider,
    create: bool,
) -> Result<MacKey, AuditError> {
    let path = dir.join(db::DB_FILE).display().to_string();
    let db_err = |source| AuditError::Database {
        path: path.clone(),
        source,
    };
    let purpose = Purpose::AuditMacKey;
    let mut wrapped = db::get_meta(conn, db::META_MAC_KEY).map_err(db_err)?;
    if wrapped.is_none() && create {
        let tx = conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(db_err)?;
        let rows: i64 = tx
            .query_row("SELECT count(*) FROM audit_events", [], |r| r.get(0))
            .map_err(db_err)?;
        if rows > 0 {
            return Err(AuditError::Tampered {
                reason: "audit.db has rows but no audit key".into(),
                dir: dir.display().to_string(),
            });
        }
        // OR IGNORE: another process may have created it first; its key wins.
        tx.execute(
            "INSERT OR IGNORE INTO audit_meta (key, value) VALUES (?1, ?2)",
            rusqlite::params![
                db::META_MAC_KEY,
                master
                    .new_wrapped_key(purpose)
                    .map_err(AuditError::Custody)?
            ],
        )
        .map_err(db_err)?;
        tx.commit().map_err(db_err)?;
        wrapped = db::get_meta(conn, db::META_MAC_KEY).map_err(db_err)?;
    }
    let Some(wrapped) = wrapped else {
        return Err(AuditError::Tampered {
            reason: "audit.db has no audit key".into(),
            dir: dir.display().to_string(),
        });
    };
    let wrong = |e: SealError| match e {
        SealError::Unreachable { .. } => AuditError::Custody(e),
        _ => AuditError::WrongMasterKey { path: path.clone() },
    };
    let secret = match master.unwrap(purpose, &wrapped) {
        Ok(secret) => secret,
        Err(e @ SealError::Unreachable { .. }) => return Err(AuditError::Custody(e)),
        Err(e) => {
            // A migration staged the key under the new master key; once that key opens the
            // trail, its wrap is the only one kept.
            let Some(next) = db::get_meta(conn, META_MAC_KEY_NEXT).map_err(db_err)? else {
                return Err(wrong(e));
            };
            let secret = master.unwrap(purpose, &next).map_err(wrong)?;
            if create {
                let tx = conn
                    .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
                    .map_err(db_err)?;
                tx.execute(
                    "UPDATE audit_meta SET value = ?1 WHERE key = ?2",
                    rusqlite::params![next, db::META_MAC_KEY],
                )
                .map_err(db_err)?;
                tx.execute("DELETE FROM audit_meta WHERE key = ?1", [META_MAC_KEY_NEXT])
                    .map_err(db_err)?;
                tx.commit().map_err(db_err)?;
            }
            secret
        }
    };
    Ok(MacKey::new(&secret))
}

/// Refuses to continue a chain whose anchor is ahead of, or disagrees with, the database.
fn check_anchor(
    conn: &Connection,
    key: &MacKey,
    dir: &Path,
    anchor: Anchor,
    tip: Position,
) -> Result<(), AuditError> {
    let tampered = |reason: String| AuditError::Tampered {
        reason,
        dir: dir.display().to_string(),
    };
    let a = match anchor {
        Anchor::At(a) => a,
        Anchor::Missing if tip.seq == 0 => return Ok(()),
        Anchor::Missing => {
            return Err(tampered(format!(
                "{} is missing while audit.db holds rows up to seq {}, so truncation cannot be \
                 ruled out",
                chain::HEAD_FILE,
                tip.seq
            )));
        }
        Anchor::Invalid(why) => {
            return Err(tampered(format!(
                "{} is not valid: {why}",
                chain::HEAD_FILE
            )));
        }
    };
    if a.seq > tip.seq {
        return Err(AuditError::Truncated {
            anchored_seq: a.seq,
            db_seq: tip.seq,
            dir: dir.display().to_string(),
        });
    }
    let checkpoint = db::checkpoint(conn, key).map_err(tampered)?;
    let stored: Option<Vec<u8>> = if a.seq == checkpoint.seq {
        Some(checkpoint.mac.to_vec())
    } else if a.seq < checkpoint.seq {
        // Pruned past the anchor: nothing left to compare with.
        return Ok(());
    } else {
        use rusqlite::OptionalExtension;
        conn.query_row(
            "SELECT mac FROM audit_events WHERE seq = ?1",
            [a.seq as i64],
            |r| r.get(0),
        )
        .optional()
        .map_err(|e| tampered(e.to_string()))?
    };
    if stored.as_deref() != Some(&a.mac[..]) {
        return Err(tampered(format!(
            "row {} does not match the MAC recorded in {}",
            a.seq,
            chain::HEAD_FILE
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::seal::Secret;

    fn master() -> MasterKeyProvider {
        crate::seal::MasterKey::from_secret(Secret::from_slice(&[3; 32])).into()
    }

    fn event(i: u64) -> Event {
        Event {
            tenant: Some(format!("tenant-{i}")),
            call_id: Some(format!("call-{i}")),
            ..Event::new(EventKind::RequestResolved)
        }
    }

    /// What a kill -9 after rows 4..=6 were committed but before they were folded leaves
    /// behind: the rows in a journal segment and the anchor at 6, audit.db ending at 3.
    async fn crashed_trail() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let audit = Audit::open(dir.path(), &master(), AuditSync::Normal, None).unwrap();
        for i in 1..=3 {
            audit.commit(event(i)).await.unwrap();
        }
        audit.shutdown().await;
        let mut conn = db::open_writer(dir.path(), AuditSync::Normal).unwrap();
        let key = Arc::new(load_key(&mut conn, dir.path(), &master(), false).unwrap());
        let tip = db::tip(&conn, &key).unwrap();
        let mut writer = Writer::new(key, dir.path().to_path_buf(), false, tip, 0);
        let mut batch: Vec<writer::Queued> = (4..=6).map(|i| (event(i), None)).collect();
        assert!(writer.commit_batch(&mut batch));
        dir
    }

    #[tokio::test]
    async fn open_replays_rows_a_crash_left_in_the_journal() {
        let dir = crashed_trail().await;
        assert_eq!(journal::segments(dir.path()).unwrap().len(), 1);
        // Offline verification walks the journal after the database.
        let report = verify_dir(dir.path(), &master()).unwrap();
        assert!(report.ok(), "{report:?}");
        assert_eq!((report.last_seq, report.anchored_seq), (6, 6));

        let audit = Audit::open(dir.path(), &master(), AuditSync::Normal, None).unwrap();
        assert!(journal::segments(dir.path()).unwrap().is_empty());
        assert_eq!(audit.commit(event(7)).await.unwrap(), 7);
        let rows = audit.query(&Filter::default()).unwrap();
        let tenants: Vec<_> = rows.iter().filter_map(|r| r.event.tenant.clone()).collect();
        let want: Vec<_> = (1..=7).rev().map(|i| format!("tenant-{i}")).collect();
        assert_eq!(tenants, want);
        assert!(audit.verify().unwrap().ok());
    }

    /// Byte offset of `needle` in a segment (MACs are binary, so no lossy text search).
    fn find(bytes: &[u8], needle: &[u8]) -> usize {
        bytes
            .windows(needle.len())
            .position(|w| w == needle)
            .expect("needle in segment")
    }

    #[tokio::test]
    async fn an_edited_journal_refuses_to_open_and_fails_verification() {
        let dir = crashed_trail().await;
        let segment = journal::segments(dir.path()).unwrap().remove(0);
        let bytes = std::fs::read(&segment).unwrap();
        let at = find(&bytes, b"tenant-5");
        let mut edited = bytes.clone();
        edited[at + 7] = b'9';
        std::fs::write(&segment, &edited).unwrap();

        let report = verify_dir(dir.path(), &master()).unwrap();
        assert!(!report.ok());
        assert_eq!(report.first_bad_seq, Some(5), "{report:?}");
        let err = Audit::open(dir.path(), &master(), AuditSync::Normal, None).unwrap_err();
        assert!(
            err.to_string().contains("journaled row 5 fails its MAC"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn an_undecodable_journal_record_is_named_before_what_follows_from_it() {
        let dir = crashed_trail().await;
        let segment = journal::segments(dir.path()).unwrap().remove(0);
        let mut bytes = std::fs::read(&segment).unwrap();
        let at = find(&bytes, b"audit-row/v1");
        bytes[at + "audit-row/v".len()] = b'9';
        std::fs::write(&segment, &bytes).unwrap();

        let report = verify_dir(dir.path(), &master()).unwrap();
        let reason = report.reason.clone().unwrap_or_default();
        assert!(
            reason.contains("is not an audit row at byte 0; without its rows:")
                && reason.contains("truncated"),
            "{reason}"
        );
    }

    #[tokio::test]
    async fn audit_verify_reports_a_row_edited_in_the_database() {
        let dir = tempfile::tempdir().unwrap();
        let audit = Audit::open(dir.path(), &master(), AuditSync::Normal, None).unwrap();
        for i in 1..=3 {
            audit.commit(event(i)).await.unwrap();
        }
        let report = audit.verify().unwrap();
        assert!(report.ok(), "{report:?}");
        assert_eq!((report.rows_checked, report.anchored_seq), (3, 3));
        let conn = Connection::open(dir.path().join(db::DB_FILE)).unwrap();
        conn.execute(
            "UPDATE audit_events SET tenant = 'tenant-9' WHERE seq = 2",
            [],
        )
        .unwrap();
        let report = audit.verify().unwrap();
        assert_eq!(report.first_bad_seq, Some(2), "{report:?}");
        assert!(!report.ok());
    }

    /// A crash after a fold stored rows 4 and 5 but before it deleted their segment: `open`
    /// replays row 6 only, and every row is in the database once.
    #[tokio::test]
    async fn open_replays_only_the_journaled_rows_the_database_lacks() {
        let dir = crashed_trail().await;
        let (journal, damage) = read_journal(dir.path()).unwrap();
        assert!(damage.is_none());
        let folded: Vec<db::RawRow> = journal.into_iter().filter(|r| r.seq <= 5).collect();
        let mut conn = db::open_writer(dir.path(), AuditSync::Normal).unwrap();
        writer::insert_rows(&mut conn, &folded).unwrap();
        drop(conn);

        let audit = Audit::open(dir.path(), &master(), AuditSync::Normal, None).unwrap();
        assert!(journal::segments(dir.path()).unwrap().is_empty());
        assert_eq!(audit.commit(event(7)).await.unwrap(), 7);
        let rows = audit.query(&Filter::default()).unwrap();
        let seqs: Vec<u64> = rows.iter().map(|r| r.seq).collect();
        assert_eq!(seqs, [7, 6, 5, 4, 3, 2, 1]);
        assert_eq!(rows[1].event.tenant.as_deref(), Some("tenant-6"));
        assert!(audit.verify().unwrap().ok());
    }

    /// A record cut short at the end of the journal (the process died mid-write, so its
    /// commit was never confirmed nor anchored) is not replayed; the rows before it are.
    #[tokio::test]
    async fn a_record_cut_short_at_the_end_of_the_journal_is_left_out() {
        let dir = crashed_trail().await;
        let segment = journal::segments(dir.path()).unwrap().remove(0);
        let mut bytes = std::fs::read(&segment).unwrap();
        let partial = bytes[..bytes.len() / 4].to_vec();
        bytes.extend_from_slice(&partial);
        std::fs::write(&segment, &bytes).unwrap();

        let report = verify_dir(dir.path(), &master()).unwrap();
        assert!(report.ok(), "{report:?}");
        assert_eq!((report.rows_checked, report.last_seq), (6, 6));
        let audit = Audit::open(dir.path(), &master(), AuditSync::Normal, None).unwrap();
        assert_eq!(audit.commit(event(7)).await.unwrap(), 7);
        assert!(audit.verify().unwrap().ok());
    }

    #[tokio::test]
    async fn a_shipped_file_verifies_and_an_edited_line_does_not() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("shipped.jsonl");
        let options = ExportOptions {
            sink: AuditExport::File(file.clone()),
            buffer: 1 << 20,
            instance: instance_id(dir.path()).unwrap(),
            master_key: master_identity(&master()),
        };
        let audit = Audit::open_exporting(
            dir.path(),
            &master(),
            AuditSync::Normal,
            None,
            Some(options),
        )
        .unwrap();
        for i in 1..=3 {
            audit.commit(event(i)).await.unwrap();
        }
        assert!(audit.stop_export(Duration::from_secs(10)).await);
        audit.shutdown().await;

        let report = verify_jsonl_file(&file, &master(), None).unwrap();
        assert!(report.ok(), "{report:?}");
        assert_eq!(report.instances.len(), 1);
        let one = &report.instances[0];
        assert_eq!(
            (one.rows_checked, one.last_seq, one.stopped),
            (3, Some(3), true)
        );

        let text = std::fs::read_to_string(&file).unwrap();
        assert!(text.contains("\"tenant-2\""));
        std::fs::write(&file, text.replace("\"tenant-2\"", "\"tenant-9\"")).unwrap();
        let report = verify_jsonl_file(&file, &master(), None).unwrap();
        assert!(!report.ok());
        assert_eq!(report.instances[0].first_bad_seq, Some(2), "{report:?}");
    }

    #[tokio::test]
    async fn a_deleted_journal_is_truncation() {
        let dir = crashed_trail().await;
        std::fs::remove_file(journal::segments(dir.path()).unwrap().remove(0)).unwrap();
        let report = verify_dir(dir.path(), &master()).unwrap();
        assert!(!report.ok());
        assert_eq!(report.first_bad_seq, Some(4), "{report:?}");
        assert!(matches!(
            Audit::open(dir.path(), &master(), AuditSync::Normal, None),
            Err(AuditError::Truncated {
                anchored_seq: 6,
                db_seq: 3,
                ..
            })
        ));
    }
}

//! Group commit through the journal. Callers put events on one queue; whoever holds the
//! [`Writer`] takes everything queued into one batch, sequences and MACs it, appends it to the
//! journal (`journal.rs`) in one write, moves the head anchor, then answers every waiter. A
//! failed batch answers every waiter with `Unavailable` and leaves the chain head where it was.
//!
//! With `audit_sync = "normal"` a batch is one append and one anchor write into the page cache, so
//! the calling task commits itself: no thread hand-off sits on a request's path. When commits come
//! close together (within [`BATCH_WINDOW`]) it yields once first, so that other callers that are
//! ready put their rows in the same batch. With `full` every batch
//! waits for fsync, so callers commit from the blocking pool instead of an async worker. Rows
//! nobody waits on are committed with the next commit, or alone after [`LINGER`]. The maintenance
//! thread folds journaled rows into `audit.db` ([`Db`]) every [`FOLD_INTERVAL`], runs retention,
//! and drains everything at shutdown. While folding fails (another process holds `audit.db` locked,
//! the disk is full) new commits are refused, so the journal cannot grow without bound and the
//! trail stays fail-closed.
//!
//! A row nobody waits on (`request.completed` of a call already served) has no caller to
//! refuse: when its batch fails it is kept, in order, and committed with the next batch or by
//! the maintenance thread once writing works again. At most [`RETRY_CAP`] rows are kept; one
//! beyond that is counted as lost and logged as an error, never dropped silently.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, ErrorCode, OptionalExtension, TransactionBehavior};
use tokio::sync::oneshot;

use super::AuditError;
use super::chain::{self, MacKey, Position};
use super::db::{self, DB_FILE, INSERT, META_CHECKPOINT, RawRow};
use super::event::{Event, canonical};
use super::journal::{self, Segment};
use crate::lock;

/// Most events put into one batch; bounds the time the first waiter of a batch waits.
const BATCH_CAP: usize = 4096;
/// How long rows nobody waits on may wait for company before they are committed alone.
const LINGER: Duration = Duration::from_millis(5);
/// How often journaled rows are folded into `audit.db`.
const FOLD_INTERVAL: Duration = Duration::from_millis(50);
/// How often the maintenance thread looks around when there is nothing to fold.
const IDLE_WAKE: Duration = Duration::from_secs(1);
/// Most rows nobody waits on kept for another attempt after their batch failed. Every such
/// row belongs to a call resolved before writing failed (no new call is resolved while it
/// fails), so this is reached only by far more calls in flight than `max_concurrent_requests`.
pub(crate) const RETRY_CAP: usize = 65_536;
/// How often automatic retention runs.
const PRUNE_INTERVAL: Duration = Duration::from_secs(600);
/// A commit that follows the previous one within this long yields once before it writes, so
/// that callers ready at the same moment share its batch (one journal append and one anchor
/// write for all of them). Further apart, a yield finds nobody to wait for and only adds a
/// trip through the scheduler (and its poll of the I/O driver) to the call, so the row is
/// written at once.
const BATCH_WINDOW: Duration = Duration::from_micros(250);

/// The answer a committing caller waits for.
pub(crate) type Reply = oneshot::Sender<Result<u64, AuditError>>;

/// One queued event and, unless nobody waits on it, where its answer goes.
pub(crate) type Queued = (Event, Option<Reply>);

/// Why an event was not queued.
pub(crate) enum Refused {
    /// The queue holds its capacity.
    Full,
    /// The trail has shut down.
    Closed,
}

/// Events waiting for a batch.
struct Queue {
    events: Vec<Queued>,
    /// Most events that may wait.
    capacity: usize,
    /// No more events are accepted (and the maintenance thread stops).
    closed: bool,
}

/// What every handle, the maintenance thread and the committing caller share. Lock order:
/// `db`, then `writer`, then `queue`.
pub(crate) struct Shared {
    queue: Mutex<Queue>,
    /// Wakes the maintenance thread.
    kick: Condvar,
    /// The chain head and the journal: whoever holds it commits.
    writer: Mutex<Writer>,
    /// The database connection rows are folded into.
    db: Mutex<Db>,
    /// Callers commit on their own thread (`normal`) rather than handing off (`full`).
    inline: bool,
    /// A linger timer is pending for unwaited rows.
    linger_armed: AtomicBool,
    /// The journal holds rows the database does not have yet.
    unfolded: AtomicBool,
    /// The writer keeps rows of a failed batch for another attempt.
    retry_pending: AtomicBool,
    /// When the trail was opened: the origin of `last_commit`.
    opened: Instant,
    /// Nanoseconds after `opened` of the latest inline commit (see [`BATCH_WINDOW`]).
    last_commit: AtomicU64,
}

impl Shared {
    pub(crate) fn new(writer: Writer, db: Db, capacity: usize) -> Arc<Shared> {
        Arc::new(Shared {
            inline: !writer.durable,
            queue: Mutex::new(Queue {
                events: Vec::new(),
                capacity,
                closed: false,
            }),
            kick: Condvar::new(),
            writer: Mutex::new(writer),
            db: Mutex::new(db),
            linger_armed: AtomicBool::new(false),
            unfolded: AtomicBool::new(false),
            retry_pending: AtomicBool::new(false),
            opened: Instant::now(),
            last_commit: AtomicU64::new(0),
        })
    }

    /// Events waiting in the queue now.
    pub(crate) fn queue_len(&self) -> usize {
        lock(&self.queue).events.len()
    }

    /// Appends an event to the queue.
    pub(crate) fn push(&self, event: Event, reply: Option<Reply>) -> Result<(), Refused> {
        let mut q = lock(&self.queue);
        if q.closed {
            return Err(Refused::Closed);
        }
        if q.events.len() >= q.capacity {
            return Err(Refused::Full);
        }
        q.events.push((event, reply));
        Ok(())
    }

    /// Gets a queued waiter's row committed: on this task in inline mode, else on a blocking
    /// thread, so an fsync never stalls an async worker.
    pub(crate) async fn commit_queued(self: &Arc<Self>) {
        if self.inline {
            let now = self.opened.elapsed().as_nanos().min(u64::MAX as u128) as u64;
            let previous = self.last_commit.swap(now, Ordering::Relaxed);
            if now.saturating_sub(previous) < BATCH_WINDOW.as_nanos() as u64 {
                tokio::task::yield_now().await;
            }
            self.drive();
        } else {
            let shared = self.clone();
            let _ = tokio::task::spawn_blocking(move || shared.drive()).await;
        }
    }

    /// Makes sure unwaited rows get committed within [`LINGER`] even if no waited commit
    /// comes along to take them.
    pub(crate) fn linger(self: &Arc<Self>) {
        if self.linger_armed.swap(true, Ordering::AcqRel) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            // A caller outside any runtime may block: commit now.
            self.linger_armed.store(false, Ordering::Release);
            self.drive();
            return;
        };
        let shared = self.clone();
        runtime.spawn(async move {
            tokio::time::sleep(LINGER).await;
            shared.linger_armed.store(false, Ordering::Release);
            shared.commit_queued().await;
        });
    }

    /// Commits everything queued, unless another thread holds the writer right now, in which
    /// case that thread takes these rows too: every holder of the writer calls `drive` after
    /// letting go of it, so a row queued meanwhile is never left behind.
    pub(crate) fn drive(&self) {
        loop {
            let mut writer = match self.writer.try_lock() {
                Ok(w) => w,
                Err(std::sync::TryLockError::WouldBlock) => return,
                Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            };
            self.commit_all(&mut writer);
            drop(writer);
            if lock(&self.queue).events.is_empty() {
                return;
            }
        }
    }

    /// Commits everything queued up to now and returns the chain head after it.
    pub(crate) fn drained_head(&self) -> Position {
        self.drain();
        lock(&self.writer).head
    }

    /// Waits for the writer and commits everything queued up to now.
    pub(crate) fn drain(&self) {
        let mut writer = lock(&self.writer);
        self.commit_all(&mut writer);
        drop(writer);
        self.drive();
    }

    fn commit_all(&self, writer: &mut Writer) {
        // Rows kept from a failed batch go first, once per call: a failing disk must not make
        // this loop spin.
        let mut retried = writer.retry.is_empty();
        loop {
            {
                let mut q = lock(&self.queue);
                if q.events.is_empty() && retried {
                    break;
                }
                if q.events.len() <= BATCH_CAP {
                    std::mem::swap(&mut q.events, &mut writer.batch);
                } else {
                    writer.batch.extend(q.events.drain(..BATCH_CAP));
                }
            }
            let mut batch = std::mem::take(&mut writer.batch);
            if !retried {
                retried = true;
                let kept = std::mem::take(&mut writer.retry);
                writer.kept_in_batch = kept.len();
                batch.splice(0..0, kept.into_iter().map(|event| (event, None)));
            }
            if writer.commit_batch(&mut batch) {
                self.unfolded.store(true, Ordering::Release);
            }
            writer.batch = batch;
        }
        self.retry_pending
            .store(!writer.retry.is_empty(), Ordering::Release);
    }

    /// Moves every journaled row into `audit.db` and deletes the segments that held them. A
    /// failure keeps the rows for the next attempt and refuses new commits until then.
    pub(crate) fn fold(&self) {
        let mut db = lock(&self.db);
        {
            // Callers finding the writer held here leave their rows queued: see the end.
            let mut w = lock(&self.writer);
            self.unfolded.store(false, Ordering::Release);
            db.rows.append(&mut w.unfolded);
            db.segments.append(&mut w.spent);
            if let Some(segment) = w.segment.take() {
                db.segments.push(segment.path().to_path_buf());
            }
        }
        let result = db.fold();
        let mut w = lock(&self.writer);
        match result {
            Ok(()) => {
                if w.refusing.take().is_some() {
                    tracing::info!("audit database writable again, accepting commits");
                }
            }
            Err(reason) => {
                self.unfolded.store(true, Ordering::Release);
                if w.refusing.is_none() {
                    tracing::error!(
                        "audit rows cannot be moved into the database, refusing new commits \
                         until they can: {reason}"
                    );
                }
                w.refusing = Some(reason);
            }
        }
        drop(w);
        drop(db);
        self.drive();
    }

    /// Everything committed so far is in `audit.db` when `f` runs.
    pub(crate) fn with_db<T>(&self, f: impl FnOnce(&mut Db) -> T) -> T {
        self.drain();
        self.fold();
        f(&mut lock(&self.db))
    }

    /// Refuses new events and lets the maintenance thread finish. Events queued before are
    /// still committed by the next `drain`.
    pub(crate) fn close(&self) {
        lock(&self.queue).closed = true;
        self.kick.notify_one();
    }

    /// The maintenance thread: folds, runs retention, and stops once the trail is closed and
    /// drained or every handle is gone. It never commits for callers, so a long fold or
    /// retention pass delays no commit.
    pub(crate) fn run_thread(shared: Weak<Shared>) {
        let mut next_prune = Instant::now();
        let mut last_fold = Instant::now();
        loop {
            let Some(this) = shared.upgrade() else { return };
            if Instant::now() >= next_prune {
                this.with_db(Db::auto_prune);
                next_prune = Instant::now() + PRUNE_INTERVAL;
            }
            let wait = if this.unfolded.load(Ordering::Acquire) {
                FOLD_INTERVAL.saturating_sub(last_fold.elapsed())
            } else {
                IDLE_WAKE
            };
            let closing = {
                let q = lock(&this.queue);
                let (q, _) = this
                    .kick
                    .wait_timeout_while(q, wait, |q| !q.closed)
                    .unwrap_or_else(|p| p.into_inner());
                q.closed
            };
            if closing {
                this.drain();
            }
            let due = this.unfolded.load(Ordering::Acquire) && last_fold.elapsed() >= FOLD_INTERVAL;
            if due || closing {
                this.fold();
                last_fold = Instant::now();
            }
            // Kept rows are retried even when no new commit comes along to take them.
            if this.retry_pending.load(Ordering::Acquire) {
                this.drive();
                if closing {
                    this.fold();
                }
            }
            if closing {
                let w = lock(&this.writer);
                if !w.retry.is_empty() || w.lost > 0 {
                    tracing::error!(
                        rows = w.retry.len() as u64 + w.lost,
                        "audit rows nobody waited on could not be written before exit and are lost"
                    );
                }
                return;
            }
        }
    }
}

/// The chain head and the journal: everything a commit touches.
pub(crate) struct Writer {
    /// The audit MAC key.
    pub key: Arc<MacKey>,
    /// The state directory (for the journal, the anchor file and messages).
    pub dir: PathBuf,
    /// fsync the journal and the anchor (`AuditSync::Full`).
    pub durable: bool,
    /// The last committed row.
    pub head: Position,
    /// Time of the last committed row; new rows never go back in time.
    pub last_time: i64,
    /// `audit.head`, kept open between batches (reopened after an error).
    pub anchor_file: Option<std::fs::File>,
    /// The segment being appended to; a new one starts after each fold.
    pub segment: Option<Segment>,
    /// Committed rows not yet handed to the fold, oldest first.
    pub unfolded: Vec<RawRow>,
    /// Segments given up after a write error, to delete once their rows are folded.
    pub spent: Vec<PathBuf>,
    /// Why commits are refused (folding into the database fails), if they are.
    pub refusing: Option<String>,
    /// The batch being committed (kept for its capacity).
    pub batch: Vec<Queued>,
    /// Rows nobody waits on whose batch failed, oldest first, for the next attempt.
    pub retry: Vec<Event>,
    /// Rows nobody waits on that could not be kept (over [`RETRY_CAP`]).
    pub lost: u64,
    /// How many rows at the head of the batch being committed are kept rows retried.
    pub kept_in_batch: usize,
    /// The batch's journal records (kept for its capacity).
    pub records: Vec<u8>,
    /// Ships every committed row as a JSON line (`audit_export`), if configured.
    pub export: Option<Arc<super::export::Exporter>>,
    /// The batch's export lines (kept for its capacity).
    pub lines: Vec<u8>,
}

pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

impl Writer {
    /// A writer continuing the chain from `head`.
    pub(crate) fn new(
        key: Arc<MacKey>,
        dir: PathBuf,
        durable: bool,
        head: Position,
        last_time: i64,
    ) -> Writer {
        Writer {
            key,
            dir,
            durable,
            head,
            last_time,
            anchor_file: None,
            segment: None,
            unfolded: Vec::new(),
            spent: Vec::new(),
            refusing: None,
            batch: Vec::new(),
            retry: Vec::new(),
            lost: 0,
            kept_in_batch: 0,
            records: Vec::new(),
            export: None,
            lines: Vec::new(),
        }
    }

    /// Keeps a row nobody waits on for the next attempt, or counts it lost past
    /// [`RETRY_CAP`].
    fn keep_for_retry(&mut self, event: Event) {
        if self.retry.len() < RETRY_CAP {
            self.retry.push(event);
            return;
        }
        self.lost += 1;
        if self.lost.is_power_of_two() {
            tracing::error!(
                lost_total = self.lost,
                "audit rows lost: {RETRY_CAP} rows already wait for the audit trail to be \
                 writable again; {} not recorded",
                event.kind
            );
        }
    }

    fn write_anchor(&mut self) -> std::io::Result<()> {
        if self.anchor_file.is_none() {
            self.anchor_file = Some(chain::open_anchor(&self.dir)?);
        }
        let file = self.anchor_file.as_ref().expect("opened above");
        let written = chain::write_anchor_to(file, &self.key, &self.head, self.durable);
        if written.is_err() {
            self.anchor_file = None;
        }
        written
    }

    /// Commits `batch` and answers its waiters; true when rows reached the journal.
    pub(crate) fn commit_batch(&mut self, batch: &mut Vec<Queued>) -> bool {
        if batch.is_empty() {
            return false;
        }
        let first = self.head.seq + 1;
        let time = now_ms().max(self.last_time);
        let (macs, outcome) = match self.refusing.clone() {
            Some(reason) => (None, Err(reason)),
            None => self.append(batch, time),
        };
        // A batch of nothing but rows already kept fails again each second while the disk is
        // full: it was reported when they were first kept.
        let only_kept = batch.len() <= self.kept_in_batch;
        self.kept_in_batch = 0;
        if let Err(reason) = &outcome
            && !only_kept
        {
            let unwaited = batch.iter().filter(|(_, r)| r.is_none()).count();
            tracing::error!(
                events = batch.len(),
                unwaited,
                "audit batch failed, callers refused, rows nobody waits on kept for another \
                 attempt: {reason}"
            );
        }
        let journaled = macs.is_some();
        for (i, (event, reply)) in batch.drain(..).enumerate() {
            let seq = first + i as u64;
            let waited = reply.is_some();
            if let Some(reply) = reply {
                let _ = reply.send(match &outcome {
                    Ok(()) => Ok(seq),
                    Err(reason) => Err(AuditError::Unavailable {
                        reason: reason.clone(),
                    }),
                });
            }
            if let Some(macs) = &macs {
                self.unfolded.push(RawRow {
                    seq: seq as i64,
                    time_ms: time,
                    event,
                    mac: macs[i].to_vec(),
                });
            } else if !waited {
                self.keep_for_retry(event);
            }
        }
        journaled
    }

    /// Sequences, MACs and journals the batch, then moves the anchor. Returns the rows' MACs
    /// when the records reached the journal: from then on the head has moved whatever happens
    /// next. A failed anchor write still fails the batch, because until the anchor catches up
    /// a truncation of these rows would go unnoticed.
    fn append(
        &mut self,
        batch: &[Queued],
        time: i64,
    ) -> (Option<Vec<[u8; chain::MAC_LEN]>>, Result<(), String>) {
        self.records.clear();
        let mut pos = self.head;
        let mut macs = Vec::with_capacity(batch.len());
        for (event, _) in batch {
            let seq = pos.seq + 1;
            let bytes = canonical(seq, time, event);
            let mac = self.key.canonical_mac(&pos.mac, &bytes);
            journal::encode(&mut self.records, &bytes, &mac);
            macs.push(mac);
            pos = Position { seq, mac };
        }
        // The export lines must fit before anything is journaled: a row is never committed
        // without its line (export.rs).
        if let Some(export) = self.export.clone() {
            self.lines.clear();
            let mut prev = self.head.mac;
            let mut with_key = export.needs_key();
            for (i, (event, _)) in batch.iter().enumerate() {
                let seq = self.head.seq + 1 + i as u64;
                let row = super::export::LineRow {
                    seq,
                    time_ms: time,
                    event,
                    prev: &prev,
                    mac: &macs[i],
                };
                export.render(&mut self.lines, row, with_key);
                with_key = false;
                prev = macs[i];
            }
            if let Err(reason) = export.check_room(self.lines.len()) {
                return (None, Err(reason));
            }
        }
        if self.segment.is_none() {
            let first = self.head.seq + 1;
            match Segment::create(&self.dir, first, self.durable) {
                Ok(segment) => self.segment = Some(segment),
                Err(e) => {
                    let path = Segment::path_for(&self.dir, first);
                    return (None, Err(io_reason(&e, &path)));
                }
            }
        }
        let segment = self.segment.as_mut().expect("created above");
        if let Err(e) = segment.append(&self.records, self.durable) {
            let reason = io_reason(&e, segment.path());
            // Start a new segment next time; this one's whole records are still folded.
            if let Some(old) = self.segment.take().and_then(Segment::abandon) {
                self.spent.push(old);
            }
            return (None, Err(reason));
        }
        self.head = pos;
        self.last_time = time;
        if let Some(export) = &self.export {
            export.push(&self.lines, pos.seq);
        }
        let anchored = self
            .write_anchor()
            .map_err(|e| io_reason(&e, &self.dir.join(chain::HEAD_FILE)));
        (Some(macs), anchored)
    }
}

/// The database side: the write connection and the rows on their way into it.
pub(crate) struct Db {
    /// The only connection that writes `audit.db`.
    pub conn: Connection,
    /// The audit MAC key (retention verifies before it deletes).
    pub key: Arc<MacKey>,
    /// The state directory.
    pub dir: PathBuf,
    /// Automatic retention.
    pub retention: Option<Duration>,
    /// Journaled rows to insert, oldest first.
    pub rows: Vec<RawRow>,
    /// Segments to delete once `rows` are in.
    pub segments: Vec<PathBuf>,
}

impl Db {
    /// Inserts `rows` in one transaction, then deletes the segments they came from.
    fn fold(&mut self) -> Result<(), String> {
        if !self.rows.is_empty() {
            let reason = |e: rusqlite::Error| sqlite_reason(&e, &self.dir);
            // After a commit that reported failure but did land, the retry must not insert
            // the same seqs again.
            let last: i64 = self
                .conn
                .query_row("SELECT coalesce(max(seq), 0) FROM audit_events", [], |r| {
                    r.get(0)
                })
                .map_err(reason)?;
            self.rows.retain(|r| r.seq > last);
            insert_rows(&mut self.conn, &self.rows).map_err(reason)?;
            self.rows.clear();
        }
        for path in self.segments.drain(..) {
            if let Err(e) = std::fs::remove_file(&path)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                tracing::warn!(
                    path = %path.display(),
                    "folded audit journal segment not deleted: {e}",
                );
            }
        }
        Ok(())
    }

    fn auto_prune(&mut self) {
        let Some(keep) = self.retention else { return };
        let cutoff = now_ms().saturating_sub(keep.as_millis().min(i64::MAX as u128) as i64);
        match self.prune(cutoff) {
            Ok(0) => {}
            Ok(n) => tracing::info!(rows = n, "audit retention pruned old rows"),
            Err(e) => tracing::error!("audit retention failed: {e}"),
        }
    }

    /// Deletes every row older than `cutoff_ms` after checking that those rows still verify
    /// (so pruning can never launder an edited row), and records the last deleted row's
    /// position as the new checkpoint in the same transaction.
    pub(crate) fn prune(&mut self, cutoff_ms: i64) -> Result<u64, AuditError> {
        let unavailable = |e: rusqlite::Error, dir: &std::path::Path| AuditError::Unavailable {
            reason: sqlite_reason(&e, dir),
        };
        let dir = self.dir.clone();
        if !self.conn.is_autocommit() {
            let _ = self.conn.execute_batch("ROLLBACK");
        }
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| unavailable(e, &dir))?;
        // The rows before the first one at or after the cutoff (times never decrease along
        // seq, `db::first_seq_at`); verify_prefix below checks each of them.
        let end = db::first_seq_at(&tx, cutoff_ms)
            .map_err(|e| unavailable(e, &dir))?
            .unwrap_or(i64::MAX);
        let last: Option<i64> = tx
            .query_row(
                "SELECT max(seq) FROM audit_events WHERE seq < ?1",
                [end],
                |r| r.get(0),
            )
            .optional()
            .map_err(|e| unavailable(e, &dir))?
            .flatten();
        let Some(last) = last else { return Ok(0) };
        let start = db::checkpoint(&tx, &self.key).map_err(|reason| AuditError::Tampered {
            reason,
            dir: dir.display().to_string(),
        })?;
        let prev = db::verify_prefix(&tx, &self.key, start, last as u64).map_err(|reason| {
            AuditError::Tampered {
                reason: format!("{reason}; refusing to prune over it"),
                dir: dir.display().to_string(),
            }
        })?;
        let deleted = tx
            .execute("DELETE FROM audit_events WHERE seq <= ?1", [last])
            .map_err(|e| unavailable(e, &dir))?;
        tx.execute(
            "INSERT OR REPLACE INTO audit_meta (key, value) VALUES (?1, ?2)",
            rusqlite::params![META_CHECKPOINT, chain::encode_checkpoint(&self.key, &prev)],
        )
        .map_err(|e| unavailable(e, &dir))?;
        tx.commit().map_err(|e| unavailable(e, &dir))?;
        Ok(deleted as u64)
    }
}

/// Rows one statement of [`insert_rows`] inserts: one `INSERT` of this many value lists costs
/// SQLite one statement start and end (cursors on the table and every index, the statement
/// transaction) where single-row inserts pay it per row.
const INSERT_CHUNK: usize = 32;

/// An `INSERT` of [`INSERT_CHUNK`] rows of every column ([`db::COLUMNS`]).
fn chunk_insert_sql() -> &'static str {
    static SQL: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    SQL.get_or_init(|| {
        let one = format!("({})", vec!["?"; db::COLUMN_COUNT].join(", "));
        format!(
            "INSERT INTO audit_events ({}) VALUES {}",
            db::COLUMNS,
            vec![one; INSERT_CHUNK].join(", ")
        )
    })
}

/// Binds `rows` (exactly [`INSERT_CHUNK`] of them) to the statement of [`chunk_insert_sql`]
/// with [`db::bind_row`], one after another, and runs it.
fn insert_chunk(stmt: &mut rusqlite::CachedStatement<'_>, rows: &[RawRow]) -> rusqlite::Result<()> {
    debug_assert_eq!(rows.len(), INSERT_CHUNK);
    let mut index = 1;
    for row in rows {
        index = db::bind_row(stmt, index, row.seq, row.time_ms, &row.event, &row.mac)?;
    }
    stmt.raw_execute().map(|_| ())
}

/// Inserts already sequenced and MACed rows in one transaction: [`INSERT_CHUNK`] rows per
/// statement, the rest one by one.
pub(crate) fn insert_rows(conn: &mut Connection, rows: &[RawRow]) -> rusqlite::Result<()> {
    if !conn.is_autocommit() {
        // A failed rollback after an earlier error can leave a transaction open.
        let _ = conn.execute_batch("ROLLBACK");
    }
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    {
        let mut spend = db::SpendBatch::default();
        let mut chunks = rows.chunks_exact(INSERT_CHUNK);
        if chunks.len() > 0 {
            let mut stmt = tx.prepare_cached(chunk_insert_sql())?;
            for chunk in &mut chunks {
                insert_chunk(&mut stmt, chunk)?;
            }
        }
        let mut stmt = tx.prepare_cached(INSERT)?;
        for row in chunks.remainder() {
            db::insert(&mut stmt, row.seq as u64, row.time_ms, &row.event, &row.mac)?;
        }
        for row in rows {
            spend.add(row.time_ms, &row.event);
        }
        spend.write(&mut tx.prepare_cached(db::SPEND_UPSERT)?)?;
    }
    tx.commit()
}

/// What to tell a refused caller about a failed SQLite write.
pub(crate) fn sqlite_reason(e: &rusqlite::Error, dir: &std::path::Path) -> String {
    let path = dir.join(DB_FILE);
    match e.sqlite_error_code() {
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => format!(
            "audit database is locked by another process ({}); stop whatever else has it open \
             for writing",
            path.display()
        ),
        Some(ErrorCode::DiskFull) => format!(
            "disk full writing {}; free space on that filesystem",
            path.display()
        ),
        Some(ErrorCode::ReadOnly | ErrorCode::PermissionDenied | ErrorCode::CannotOpen) => {
            format!(
                "cannot write {} ({e}); check its permissions and that the filesystem is writable",
                path.display()
            )
        }
        _ => format!(
            "error writing {} ({e}); check the disk and the file",
            path.display()
        ),
    }
}

/// What to tell a refused caller about a failed file write.
pub(crate) fn io_reason(e: &std::io::Error, path: &std::path::Path) -> String {
    if matches!(
        e.kind(),
        std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
    ) {
        format!(
            "disk full writing {} ({e}); free space on that filesystem",
            path.display()
        )
    } else {
        format!(
            "error writing {} ({e}); check the disk and the directory's permissions",
            path.display()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{EventKind, Filter};
    use crate::config::AuditSync;
    use crate::seal::Secret;

    /// A chained trail whose rows carry exactly `times` (non-decreasing, repeats and gaps
    /// included), starting at seq `first` as after retention pruned a prefix.
    fn trail(first: u64, times: &[i64]) -> (tempfile::TempDir, Db) {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = db::open_writer(dir.path(), AuditSync::Normal).unwrap();
        let key = Arc::new(MacKey::new(&Secret::random(32)));
        let rows = db::chained(
            &key,
            Position::START,
            times.iter().enumerate().map(|(i, &time_ms)| {
                let event = Event {
                    call_id: Some(format!("call-{}", i / 2)),
                    ..Event::new(EventKind::RequestResolved)
                };
                (first + i as u64, time_ms, event)
            }),
        );
        insert_rows(&mut conn, &rows).unwrap();
        let db = Db {
            conn,
            key,
            dir: dir.path().to_path_buf(),
            retention: None,
            rows: Vec::new(),
            segments: Vec::new(),
        };
        (dir, db)
    }

    /// Row `i` of a fold, with fields set or left out depending on `i`, and every field set
    /// for some rows.
    fn varied_row(i: u64) -> RawRow {
        let text = |what: &str| (!i.is_multiple_of(3)).then(|| format!("{what}-{}", i % 5));
        let num = |k: u64| (i % 4 != k).then_some(i * 1000 + k);
        let event = Event {
            call_id: text("call"),
            tenant: text("tenant"),
            client_id: text("client"),
            peer_uid: num(1).map(|n| n as u32),
            peer_pid: num(2).map(|n| n as u32),
            target: text("target"),
            model: text("model"),
            capability: text("chat"),
            team: i.is_multiple_of(2).then(|| "team".to_owned()),
            workflow: text("wf"),
            credential_id: text("cred"),
            credential_version: num(3).map(|n| n as u32),
            fingerprint: text("fp"),
            upstream_status: num(0).map(|_| 200 + (i % 3) as u16),
            latency_ms: num(1),
            bytes_in: num(2),
            bytes_out: num(3),
            input_tokens: num(0),
            output_tokens: num(1),
            total_tokens: num(2),
            detail: i
                .is_multiple_of(7)
                .then(|| "detail, with a comma".to_owned()),
            flags: if i.is_multiple_of(3) {
                vec!["unpriced".to_owned(), "stream".to_owned()]
            } else {
                Vec::new()
            },
            cached_input_tokens: num(3),
            cache_write_tokens: num(0),
            cost_micros: (!i.is_multiple_of(5)).then_some(i * 7),
            ..Event::new(if i.is_multiple_of(2) {
                EventKind::RequestResolved
            } else {
                EventKind::RequestCompleted
            })
        };
        RawRow {
            seq: i as i64,
            time_ms: 1_700_000_000_000 + (i as i64 / 3) * 1_000_000,
            event,
            mac: vec![i as u8; 32],
        }
    }

    /// Every column and the spend aggregate of a database, in seq (and key) order.
    fn contents(conn: &Connection) -> Vec<Vec<rusqlite::types::Value>> {
        let mut out = Vec::new();
        for sql in [
            "SELECT * FROM audit_events ORDER BY seq",
            "SELECT * FROM audit_spend ORDER BY tenant, hour, team, client_id, credential_id, \
             model, target",
        ] {
            let mut stmt = conn.prepare(sql).unwrap();
            let columns = stmt.column_count();
            let rows = stmt
                .query_map([], |r| {
                    (0..columns)
                        .map(|i| r.get::<_, rusqlite::types::Value>(i))
                        .collect::<Result<Vec<_>, _>>()
                })
                .unwrap();
            out.extend(rows.map(Result::unwrap));
            out.push(Vec::new());
        }
        out
    }

    #[test]
    fn chunked_inserts_store_exactly_what_single_row_inserts_store() {
        // Two whole chunks and a remainder, in two folds.
        let rows: Vec<RawRow> = (1..=2 * INSERT_CHUNK as u64 + 7).map(varied_row).collect();
        let (split_at, n) = (INSERT_CHUNK + 3, rows.len());
        let chunked = tempfile::tempdir().unwrap();
        let mut conn = db::open_writer(chunked.path(), AuditSync::Normal).unwrap();
        insert_rows(&mut conn, &rows[..split_at]).unwrap();
        insert_rows(&mut conn, &rows[split_at..]).unwrap();
        let single = tempfile::tempdir().unwrap();
        let one = db::open_writer(single.path(), AuditSync::Normal).unwrap();
        {
            let mut stmt = one.prepare_cached(INSERT).unwrap();
            let mut upsert = one.prepare_cached(db::SPEND_UPSERT).unwrap();
            for row in &rows {
                db::insert(&mut stmt, row.seq as u64, row.time_ms, &row.event, &row.mac).unwrap();
                let mut spend = db::SpendBatch::default();
                spend.add(row.time_ms, &row.event);
                spend.write(&mut upsert).unwrap();
            }
        }
        let want = contents(&one);
        assert!(want.len() > n + 2 + 5, "every row and some spend cells");
        assert_eq!(contents(&conn), want);
        // Rows read back decode to the events that went in.
        let back = db::rows_after(&conn, 0).unwrap();
        assert_eq!(back.len(), n);
        for (got, sent) in back.iter().zip(&rows) {
            assert_eq!(
                (got.seq, got.time_ms, &got.mac),
                (sent.seq, sent.time_ms, &sent.mac)
            );
            assert_eq!(format!("{:?}", got.event), format!("{:?}", sent.event));
        }
    }

    const TIMES: [i64; 12] = [100, 100, 101, 105, 105, 105, 106, 200, 200, 201, 350, 351];

    #[test]
    fn time_bounds_select_exactly_the_rows_in_the_window() {
        let (_dir, db) = trail(40, &TIMES);
        let seqs = |since: Option<i64>, until: Option<i64>, limit: Option<usize>| {
            let filter = Filter {
                since_ms: since,
                until_ms: until,
                limit,
                ..Filter::default()
            };
            db::query(&db.conn, &filter)
                .unwrap()
                .iter()
                .map(|r| r.seq)
                .collect::<Vec<u64>>()
        };
        let bounds = [None, Some(i64::MIN), Some(0), Some(i64::MAX)]
            .into_iter()
            .chain((98..=353).map(Some));
        for since in bounds.clone() {
            for until in bounds.clone() {
                let want: Vec<u64> = (0..TIMES.len())
                    .rev()
                    .filter(|&i| since.is_none_or(|s| TIMES[i] >= s))
                    .filter(|&i| until.is_none_or(|u| TIMES[i] <= u))
                    .map(|i| 40 + i as u64)
                    .collect();
                assert_eq!(seqs(since, until, None), want, "{since:?}..={until:?}");
                let newest: Vec<u64> = want.iter().copied().take(2).collect();
                assert_eq!(seqs(since, until, Some(2)), newest, "{since:?}..={until:?}");
            }
        }
        // Combined with another filter.
        let filter = Filter {
            call_id: Some("call-2".into()),
            since_ms: Some(105),
            ..Filter::default()
        };
        let rows = db::query(&db.conn, &filter).unwrap();
        assert_eq!(rows.iter().map(|r| r.seq).collect::<Vec<_>>(), [45, 44]);
    }

    #[test]
    fn first_seq_at_finds_the_first_row_at_or_after_a_time() {
        let (_dir, db) = trail(7, &TIMES);
        for t in 90..=360 {
            let want = TIMES.iter().position(|&x| x >= t).map(|i| 7 + i as i64);
            assert_eq!(db::first_seq_at(&db.conn, t).unwrap(), want, "time {t}");
        }
        assert_eq!(db::first_seq_at(&db.conn, i64::MIN).unwrap(), Some(7));
        assert_eq!(db::first_seq_at(&db.conn, i64::MAX).unwrap(), None);
        let (_empty, db) = trail(1, &[]);
        assert_eq!(db::first_seq_at(&db.conn, 0).unwrap(), None);
    }

    #[test]
    fn a_database_with_the_old_time_index_loses_it_on_open() {
        let (dir, db) = trail(1, &TIMES);
        db.conn
            .execute_batch("CREATE INDEX audit_events_time ON audit_events(time_ms)")
            .unwrap();
        drop(db);
        let conn = db::open_writer(dir.path(), AuditSync::Normal).unwrap();
        let indexes: Vec<String> = conn
            .prepare("SELECT name FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert!(
            !indexes.iter().any(|i| i == "audit_events_time"),
            "{indexes:?}"
        );
        assert_eq!(indexes.len(), 3, "{indexes:?}");
    }

    #[test]
    fn prune_deletes_exactly_the_rows_before_the_cutoff() {
        for cutoff in [0, 100, 101, 105, 106, 107, 200, 201, 351, 352, i64::MAX] {
            let (_dir, mut db) = trail(1, &TIMES);
            let older = TIMES.iter().filter(|&&t| t < cutoff).count() as u64;
            assert_eq!(db.prune(cutoff).unwrap(), older, "cutoff {cutoff}");
            let left: Vec<u64> = db::query(&db.conn, &Filter::default())
                .unwrap()
                .iter()
                .map(|r| r.seq)
                .rev()
                .collect();
            assert_eq!(left, (older + 1..=TIMES.len() as u64).collect::<Vec<_>>());
            if older > 0 {
                assert_eq!(db::checkpoint(&db.conn, &db.key).unwrap().seq, older);
            }
        }
    }
}

//! The single writer thread: owns the write connection and the in-memory chain head, drains
//! the queue into one transaction per batch (group commit), moves the head anchor, then
//! answers every waiter. A failed batch answers every waiter with `Unavailable` and leaves the
//! chain head where it was.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, ErrorCode, OptionalExtension, TransactionBehavior};
use tokio::sync::oneshot;

use super::AuditError;
use super::chain::{self, MacKey, Position};
use super::db::{self, DB_FILE, INSERT, META_CHECKPOINT};
use super::event::Event;

/// Most events put into one transaction; bounds the time the first waiter of a batch waits.
const BATCH_CAP: usize = 4096;
/// How long rows nobody waits on may wait for company before they are committed alone.
const LINGER: Duration = Duration::from_millis(5);
/// How often automatic retention runs.
const PRUNE_INTERVAL: Duration = Duration::from_secs(600);

/// The answer a committing caller waits for.
pub(crate) type Reply = oneshot::Sender<Result<u64, AuditError>>;

/// What callers send the writer.
// Nearly every message is an event, so boxing it would add an allocation per event and
// save no queue space.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Msg {
    /// Record an event; `reply` is `None` for fire-and-forget events.
    Event(Event, Option<Reply>),
    /// Answer once everything queued before it is committed (or has failed).
    Flush(oneshot::Sender<()>),
    /// Delete rows older than the cutoff and move the checkpoint.
    Prune(i64, Reply),
    /// Like `Flush`, then stop.
    Shutdown(oneshot::Sender<()>),
}

/// The writer's state; lives on its own thread.
pub(crate) struct Writer {
    /// The only connection that writes.
    pub conn: Connection,
    /// The audit MAC key.
    pub key: Arc<MacKey>,
    /// The state directory (for the anchor file and messages).
    pub dir: PathBuf,
    /// fsync the anchor file (`AuditSync::Full`).
    pub durable: bool,
    /// The last committed row.
    pub head: Position,
    /// Time of the last committed row; new rows never go back in time.
    pub last_time: i64,
    /// Automatic retention.
    pub retention: Option<Duration>,
    /// `audit.head`, kept open between batches (reopened after an error).
    pub anchor_file: Option<std::fs::File>,
}

pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

impl Writer {
    pub(crate) fn run(mut self, rx: Receiver<Msg>) {
        let mut batch: Vec<(Event, Option<Reply>)> = Vec::new();
        let mut next_prune = Instant::now();
        loop {
            if self.retention.is_some() && Instant::now() >= next_prune {
                self.auto_prune();
                next_prune = Instant::now() + PRUNE_INTERVAL;
            }
            let first = match rx.recv_timeout(PRUNE_INTERVAL) {
                Ok(m) => m,
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => break,
            };
            let mut pending = Some(first);
            let mut stop = None;
            while let Some(msg) = pending.take().or_else(|| {
                (batch.len() < BATCH_CAP)
                    .then(|| rx.try_recv().ok())
                    .flatten()
                    .or_else(|| self.linger(&batch, &rx))
            }) {
                match msg {
                    Msg::Event(e, reply) => batch.push((e, reply)),
                    Msg::Flush(done) => {
                        self.commit_batch(&mut batch);
                        let _ = done.send(());
                    }
                    Msg::Prune(cutoff, reply) => {
                        self.commit_batch(&mut batch);
                        let _ = reply.send(self.prune(cutoff));
                    }
                    Msg::Shutdown(done) => {
                        stop = Some(done);
                        break;
                    }
                }
            }
            self.commit_batch(&mut batch);
            if let Some(done) = stop {
                let _ = done.send(());
                break;
            }
        }
    }

    /// When nobody waits on the batch (only `request.completed`-style rows), waits briefly for
    /// the next message so those rows share a transaction with it instead of costing one of
    /// their own: at moderate load that halves the commits per request.
    fn linger(&self, batch: &[(Event, Option<Reply>)], rx: &Receiver<Msg>) -> Option<Msg> {
        if batch.is_empty() || batch.len() >= BATCH_CAP || batch.iter().any(|(_, r)| r.is_some()) {
            return None;
        }
        rx.recv_timeout(LINGER).ok()
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

    fn commit_batch(&mut self, batch: &mut Vec<(Event, Option<Reply>)>) {
        if batch.is_empty() {
            return;
        }
        let time = now_ms().max(self.last_time);
        let result = self.write(batch, time);
        let outcome: Result<u64, String> = match result {
            Ok(head) => {
                self.head = head;
                self.last_time = time;
                // The rows are in the database whatever happens next, so the head has moved;
                // a failed anchor write still fails the batch, because until the anchor
                // catches up a truncation of these rows would go unnoticed.
                match self.write_anchor() {
                    Ok(()) => Ok(head.seq - batch.len() as u64),
                    Err(e) => Err(io_reason(&e, chain::HEAD_FILE, &self.dir)),
                }
            }
            Err(reason) => Err(reason),
        };
        match outcome {
            Ok(before) => {
                for (i, (_, reply)) in batch.drain(..).enumerate() {
                    if let Some(reply) = reply {
                        let _ = reply.send(Ok(before + 1 + i as u64));
                    }
                }
            }
            Err(reason) => {
                let unwaited = batch.iter().filter(|(_, r)| r.is_none()).count();
                tracing::error!(
                    events = batch.len(),
                    unwaited,
                    "audit batch failed, callers refused: {reason}"
                );
                for (_, reply) in batch.drain(..) {
                    if let Some(reply) = reply {
                        let _ = reply.send(Err(AuditError::Unavailable {
                            reason: reason.clone(),
                        }));
                    }
                }
            }
        }
    }

    fn write(&mut self, batch: &[(Event, Option<Reply>)], time: i64) -> Result<Position, String> {
        let reason = |e: rusqlite::Error| sqlite_reason(&e, &self.dir);
        if !self.conn.is_autocommit() {
            // A failed rollback after an earlier error can leave a transaction open.
            let _ = self.conn.execute_batch("ROLLBACK");
        }
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(reason)?;
        let mut pos = self.head;
        {
            let mut stmt = tx.prepare_cached(INSERT).map_err(reason)?;
            for (event, _) in batch {
                let seq = pos.seq + 1;
                let mac = self.key.row_mac(&pos.mac, seq, time, event);
                db::insert(&mut stmt, seq, time, event, &mac).map_err(reason)?;
                pos = Position { seq, mac };
            }
        }
        tx.commit().map_err(reason)?;
        Ok(pos)
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
        let last: Option<i64> = tx
            .query_row(
                "SELECT max(seq) FROM audit_events WHERE time_ms < ?1",
                [cutoff_ms],
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
pub(crate) fn io_reason(e: &std::io::Error, name: &str, dir: &std::path::Path) -> String {
    let path = dir.join(name);
    if e.raw_os_error() == Some(28) {
        format!(
            "disk full writing {}; free space on that filesystem",
            path.display()
        )
    } else {
        format!(
            "error writing {} ({e}); check the disk and the directory's permissions",
            path.display()
        )
    }
}

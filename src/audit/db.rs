//! The audit database file: schema, connections, the insert statement, decoding rows, the
//! query filter, and the chain verification walk.

use std::path::Path;
use std::time::Duration;

use rusqlite::types::Value;
use rusqlite::{Connection, OpenFlags, OptionalExtension, params_from_iter};

use super::chain::{self, Anchor, MAC_LEN, MacKey, Position};
use super::event::{Event, EventKind, Row, rfc3339_ms};
use super::{AuditError, Filter, VerifyReport};
use crate::config::AuditSync;

/// The database file's name inside the state directory.
pub(crate) const DB_FILE: &str = "audit.db";

/// How long a statement waits for another process's lock before failing; short, because a
/// request waiting on the audit is a request the caller is holding open.
const BUSY_TIMEOUT: Duration = Duration::from_millis(200);

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS audit_meta (
    key   TEXT PRIMARY KEY,
    value BLOB NOT NULL
) STRICT;
CREATE TABLE IF NOT EXISTS audit_events (
    seq                INTEGER PRIMARY KEY,
    time_ms            INTEGER NOT NULL,
    event              TEXT NOT NULL,
    call_id            TEXT,
    tenant             TEXT,
    client_id          TEXT,
    peer_uid           INTEGER,
    peer_pid           INTEGER,
    target             TEXT,
    model              TEXT,
    capability         TEXT,
    team               TEXT,
    workflow           TEXT,
    credential_id      TEXT,
    credential_version INTEGER,
    fingerprint        TEXT,
    upstream_status    INTEGER,
    latency_ms         INTEGER,
    bytes_in           INTEGER,
    bytes_out          INTEGER,
    input_tokens       INTEGER,
    output_tokens      INTEGER,
    total_tokens       INTEGER,
    detail             TEXT,
    flags              TEXT,
    mac                BLOB NOT NULL,
    cached_input_tokens INTEGER,
    cache_write_tokens INTEGER,
    cost_micros        INTEGER
);
CREATE INDEX IF NOT EXISTS audit_events_credential ON audit_events(credential_id)
    WHERE credential_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS audit_events_call ON audit_events(call_id) WHERE call_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS audit_events_tenant ON audit_events(tenant, seq)
    WHERE tenant IS NOT NULL;
CREATE TABLE IF NOT EXISTS audit_spend (
    tenant        TEXT NOT NULL,
    hour          INTEGER NOT NULL,
    team          TEXT NOT NULL,
    client_id     TEXT NOT NULL,
    credential_id TEXT NOT NULL,
    model         TEXT NOT NULL,
    target        TEXT NOT NULL,
    calls         INTEGER NOT NULL,
    input         INTEGER NOT NULL,
    cached_input  INTEGER NOT NULL,
    cache_write   INTEGER NOT NULL,
    output        INTEGER NOT NULL,
    cost_micros   INTEGER NOT NULL,
    unpriced      INTEGER NOT NULL,
    PRIMARY KEY (tenant, hour, team, client_id, credential_id, model, target)
) WITHOUT ROWID;
";

/// Milliseconds per spend bucket: the aggregate sums `request.completed` rows per UTC hour.
pub(crate) const SPEND_BUCKET_MS: i64 = 3_600_000;

/// `audit_meta` key set once the spend aggregate covers every row of the database.
const META_SPEND: &str = "spend_aggregate";

/// Adds `calls` `request.completed` rows, summed, to the spend aggregate (in the caller's
/// transaction).
pub(crate) const SPEND_UPSERT: &str = "INSERT INTO audit_spend (tenant, hour, team, client_id, \
     credential_id, model, target, calls, input, cached_input, cache_write, output, cost_micros, \
     unpriced) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?14, ?8, ?9, ?10, ?11, ?12, ?13) \
     ON CONFLICT DO UPDATE SET calls = calls + excluded.calls, input = input + excluded.input, \
     cached_input = cached_input + excluded.cached_input, \
     cache_write = cache_write + excluded.cache_write, output = output + excluded.output, \
     cost_micros = cost_micros + excluded.cost_micros, unpriced = unpriced + excluded.unpriced";

/// One cell of the spend aggregate: tenant, hour, team, client, credential, model, target.
type SpendKey<'a> = (&'a str, i64, &'a str, &'a str, &'a str, &'a str, &'a str);

/// The spend of a batch of rows, summed per aggregate cell before it is written: one upsert
/// per cell instead of one per row (a fold of many calls of one client on one model is one
/// statement).
#[derive(Default)]
pub(crate) struct SpendBatch<'a> {
    /// calls, input, cached input, cache write, output, cost, unpriced; per cell, in order of
    /// first appearance.
    cells: Vec<(SpendKey<'a>, [i64; 7])>,
    /// Index into `cells` by key.
    index: std::collections::HashMap<SpendKey<'a>, usize>,
}

impl<'a> SpendBatch<'a> {
    /// Counts `e` when it is a `request.completed` row of a tenant.
    pub(crate) fn add(&mut self, time_ms: i64, e: &'a Event) {
        let Some(tenant) = e
            .tenant
            .as_deref()
            .filter(|_| e.kind == EventKind::RequestCompleted)
        else {
            return;
        };
        let text = |v: &'a Option<String>| v.as_deref().unwrap_or_default();
        let n = |v: Option<u64>| v.unwrap_or(0).min(i64::MAX as u64) as i64;
        let key = (
            tenant,
            time_ms.div_euclid(SPEND_BUCKET_MS),
            text(&e.team),
            text(&e.client_id),
            text(&e.credential_id),
            text(&e.model),
            text(&e.target),
        );
        let add = [
            1,
            n(e.input_tokens),
            n(e.cached_input_tokens),
            n(e.cache_write_tokens),
            n(e.output_tokens),
            n(e.cost_micros),
            i64::from(e.flags.iter().any(|f| f == "unpriced")),
        ];
        let at = *self.index.entry(key).or_insert_with(|| {
            self.cells.push((key, [0; 7]));
            self.cells.len() - 1
        });
        for (sum, v) in self.cells[at].1.iter_mut().zip(add) {
            *sum = sum.saturating_add(v);
        }
    }

    /// Writes every cell with [`SPEND_UPSERT`] and empties the batch.
    pub(crate) fn write(
        &mut self,
        stmt: &mut rusqlite::CachedStatement<'_>,
    ) -> rusqlite::Result<()> {
        for ((tenant, hour, team, client, credential, model, target), sums) in self.cells.drain(..)
        {
            let [calls, input, cached, cache_write, output, cost, unpriced] = sums;
            stmt.execute(rusqlite::params![
                tenant,
                hour,
                team,
                client,
                credential,
                model,
                target,
                input,
                cached,
                cache_write,
                output,
                cost,
                unpriced,
                calls,
            ])?;
        }
        self.index.clear();
        Ok(())
    }
}

/// Builds the spend aggregate from the rows already in a database that predates it, once.
fn backfill_spend(conn: &mut Connection) -> rusqlite::Result<()> {
    if get_meta(conn, META_SPEND)?.is_some() {
        return Ok(());
    }
    let tx = conn.transaction()?;
    tx.execute("DELETE FROM audit_spend", [])?;
    {
        let mut read = tx.prepare(&format!(
            "SELECT {COLUMNS} FROM audit_events WHERE event = 'request.completed' ORDER BY seq"
        ))?;
        let mut write = tx.prepare_cached(SPEND_UPSERT)?;
        let mut rows = read.query([])?;
        while let Some(r) = rows.next()? {
            if let Ok(raw) = decode(r)? {
                let mut one = SpendBatch::default();
                one.add(raw.time_ms, &raw.event);
                one.write(&mut write)?;
            }
        }
    }
    tx.execute(
        "INSERT OR REPLACE INTO audit_meta (key, value) VALUES (?1, ?2)",
        rusqlite::params![META_SPEND, b"1".to_vec()],
    )?;
    tx.commit()
}

/// Every column of `audit_events`, in the order rows are read and bound.
pub(crate) const COLUMNS: &str = "seq, time_ms, event, call_id, tenant, client_id, peer_uid, \
     peer_pid, target, model, capability, team, workflow, credential_id, credential_version, \
     fingerprint, upstream_status, latency_ms, bytes_in, bytes_out, input_tokens, output_tokens, \
     total_tokens, detail, flags, cached_input_tokens, cache_write_tokens, cost_micros, mac";

/// How many columns [`COLUMNS`] names: the values one row binds.
pub(crate) const COLUMN_COUNT: usize = 29;

/// Columns added after the first schema, added to an older database when it is opened.
const ADDED_COLUMNS: [&str; 3] = ["cached_input_tokens", "cache_write_tokens", "cost_micros"];

pub(crate) const INSERT: &str = "INSERT INTO audit_events (seq, time_ms, event, call_id, \
     tenant, client_id, peer_uid, peer_pid, target, model, capability, team, workflow, \
     credential_id, credential_version, fingerprint, upstream_status, latency_ms, bytes_in, \
     bytes_out, input_tokens, output_tokens, total_tokens, detail, flags, cached_input_tokens, \
     cache_write_tokens, cost_micros, mac) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, \
     ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20, ?21, ?22, ?23, ?24, ?25, ?26, ?27, ?28, \
     ?29)";

pub(crate) const META_MAC_KEY: &str = "mac_key";
pub(crate) const META_CHECKPOINT: &str = "checkpoint";

fn db_err(path: &Path, source: rusqlite::Error) -> AuditError {
    AuditError::Database {
        path: path.display().to_string(),
        source,
    }
}

/// Opens (creating if needed) the writer's connection with WAL and the configured sync level.
pub(crate) fn open_writer(dir: &Path, sync: AuditSync) -> Result<Connection, AuditError> {
    let path = dir.join(DB_FILE);
    let conn = Connection::open(&path).map_err(|e| db_err(&path, e))?;
    conn.busy_timeout(BUSY_TIMEOUT)
        .map_err(|e| db_err(&path, e))?;
    let mode: String = conn
        .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
        .map_err(|e| db_err(&path, e))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(AuditError::Io {
            path: path.display().to_string(),
            source: std::io::Error::other(format!(
                "SQLite could not switch it to WAL mode (still `{mode}`); put the state \
                 directory on a local filesystem that supports shared memory"
            )),
        });
    }
    let level = match sync {
        AuditSync::Normal => "NORMAL",
        AuditSync::Full => "FULL",
    };
    conn.pragma_update(None, "synchronous", level)
        .map_err(|e| db_err(&path, e))?;
    // Rows arrive here in large batches from the journal, off every request's path, so the
    // default page size and automatic checkpoints cost nobody a wait.
    // Index pages touched by a batch stay cached between folds.
    conn.pragma_update(None, "cache_size", -16_384)
        .map_err(|e| db_err(&path, e))?;
    conn.execute_batch(SCHEMA).map_err(|e| db_err(&path, e))?;
    // Earlier versions indexed `time_ms`; times never decrease along `seq` (see
    // [`first_seq_at`]), so the rowid serves every time bound and the index only cost a
    // b-tree insert per row.
    conn.execute_batch("DROP INDEX IF EXISTS audit_events_time")
        .map_err(|e| db_err(&path, e))?;
    add_missing_columns(&conn).map_err(|e| db_err(&path, e))?;
    let mut conn = conn;
    backfill_spend(&mut conn).map_err(|e| db_err(&path, e))?;
    restrict_permissions(&path);
    Ok(conn)
}

/// Brings a database created by an older version up to [`SCHEMA`]: the added columns are
/// NULL on old rows, which is what their canonical encoding says, so they still verify.
fn add_missing_columns(conn: &Connection) -> rusqlite::Result<()> {
    let have: Vec<String> = conn
        .prepare("SELECT name FROM pragma_table_info('audit_events')")?
        .query_map([], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    for column in ADDED_COLUMNS {
        if !have.iter().any(|h| h == column) {
            conn.execute_batch(&format!(
                "ALTER TABLE audit_events ADD COLUMN {column} INTEGER"
            ))?;
        }
    }
    Ok(())
}

/// Opens a read-only connection for queries and verification (WAL readers never block the
/// writer).
pub(crate) fn open_reader(dir: &Path) -> Result<Connection, AuditError> {
    let path = dir.join(DB_FILE);
    let conn = Connection::open_with_flags(
        &path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| db_err(&path, e))?;
    conn.busy_timeout(BUSY_TIMEOUT)
        .map_err(|e| db_err(&path, e))?;
    Ok(conn)
}

pub(crate) fn get_meta(conn: &Connection, key: &str) -> rusqlite::Result<Option<Vec<u8>>> {
    conn.query_row("SELECT value FROM audit_meta WHERE key = ?1", [key], |r| {
        r.get(0)
    })
    .optional()
}

/// The last row's position, the checkpoint's when every row was pruned, else the start.
pub(crate) fn tip(conn: &Connection, key: &MacKey) -> Result<Position, String> {
    let last: Option<(i64, Vec<u8>)> = conn
        .query_row(
            "SELECT seq, mac FROM audit_events ORDER BY seq DESC LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()
        .map_err(|e| e.to_string())?;
    if let Some((seq, mac)) = last {
        if mac.len() != MAC_LEN || seq < 1 {
            return Err(format!("the newest row (seq {seq}) is malformed"));
        }
        return Ok(Position {
            seq: seq as u64,
            mac: mac.try_into().expect("length checked"),
        });
    }
    checkpoint(conn, key)
}

/// The retention checkpoint, or the start when nothing was ever pruned.
pub(crate) fn checkpoint(conn: &Connection, key: &MacKey) -> Result<Position, String> {
    match get_meta(conn, META_CHECKPOINT).map_err(|e| e.to_string())? {
        None => Ok(Position::START),
        Some(blob) => chain::decode_checkpoint(key, &blob)
            .ok_or_else(|| "the retention checkpoint's MAC does not verify".to_owned()),
    }
}

/// Runs the prepared [`INSERT`] for one row.
pub(crate) fn insert(
    stmt: &mut rusqlite::CachedStatement<'_>,
    seq: u64,
    time_ms: i64,
    e: &Event,
    mac: &[u8],
) -> rusqlite::Result<()> {
    bind_row(stmt, 1, seq as i64, time_ms, e, mac)?;
    stmt.raw_execute().map(|_| ())
}

/// Binds one row's [`COLUMN_COUNT`] values, in [`COLUMNS`] order, to the parameters
/// `first .. first + COLUMN_COUNT` (1-based, as SQLite numbers them) of `stmt`, and returns the
/// index after the last. [`insert`] binds one row at 1; a multi-row `INSERT` binds each row
/// after the one before.
pub(crate) fn bind_row(
    stmt: &mut rusqlite::CachedStatement<'_>,
    first: usize,
    seq: i64,
    time_ms: i64,
    e: &Event,
    mac: &[u8],
) -> rusqlite::Result<usize> {
    use rusqlite::ToSql;
    let flags = e.flags_column();
    // Sanitized events hold no value above i64::MAX; the clamp only keeps this total.
    let n = |v: Option<u64>| v.map(|n| n.min(i64::MAX as u64) as i64);
    let (latency, bytes_in, bytes_out) = (n(e.latency_ms), n(e.bytes_in), n(e.bytes_out));
    let (input, output, total) = (n(e.input_tokens), n(e.output_tokens), n(e.total_tokens));
    let (cached, cache_write, cost) = (
        n(e.cached_input_tokens),
        n(e.cache_write_tokens),
        n(e.cost_micros),
    );
    let params: [&dyn ToSql; COLUMN_COUNT] = [
        &seq,
        &time_ms,
        &e.kind.as_str(),
        &e.call_id,
        &e.tenant,
        &e.client_id,
        &e.peer_uid,
        &e.peer_pid,
        &e.target,
        &e.model,
        &e.capability,
        &e.team,
        &e.workflow,
        &e.credential_id,
        &e.credential_version,
        &e.fingerprint,
        &e.upstream_status,
        &latency,
        &bytes_in,
        &bytes_out,
        &input,
        &output,
        &total,
        &e.detail,
        &flags,
        &cached,
        &cache_write,
        &cost,
        &mac,
    ];
    for (i, param) in params.into_iter().enumerate() {
        stmt.raw_bind_parameter(first + i, param)?;
    }
    Ok(first + params.len())
}

/// A row exactly as stored, before its MAC is checked.
#[derive(Debug, Clone)]
pub(crate) struct RawRow {
    pub seq: i64,
    pub time_ms: i64,
    pub event: Event,
    pub mac: Vec<u8>,
}

/// Decodes one `SELECT {COLUMNS}` row. Any column of the wrong type or range is an error
/// string rather than a failure of the whole read, since verify must report such a row.
fn decode(r: &rusqlite::Row<'_>) -> rusqlite::Result<Result<RawRow, (i64, String)>> {
    let seq: Value = r.get(0)?;
    let Value::Integer(seq) = seq else {
        return Ok(Err((0, "seq is not an integer".into())));
    };
    let mut cols = Vec::with_capacity(COLUMN_COUNT);
    for i in 0..COLUMN_COUNT {
        cols.push(r.get::<_, Value>(i)?);
    }
    Ok(decode_values(cols).map_err(|m| (seq, m)))
}

fn decode_values(cols: Vec<Value>) -> Result<RawRow, String> {
    let mut it = cols.into_iter();
    let mut next = || it.next().unwrap_or(Value::Null);
    fn int(v: Value, name: &str) -> Result<i64, String> {
        match v {
            Value::Integer(i) => Ok(i),
            _ => Err(format!("{name} is not an integer")),
        }
    }
    fn opt_s(v: Value, name: &str) -> Result<Option<String>, String> {
        match v {
            Value::Null => Ok(None),
            Value::Text(s) => Ok(Some(s)),
            _ => Err(format!("{name} is not text")),
        }
    }
    fn opt_n<T: TryFrom<i64>>(v: Value, name: &str) -> Result<Option<T>, String> {
        match v {
            Value::Null => Ok(None),
            Value::Integer(i) => T::try_from(i)
                .map(Some)
                .map_err(|_| format!("{name} is out of range")),
            _ => Err(format!("{name} is not an integer")),
        }
    }
    let seq = int(next(), "seq")?;
    let time_ms = int(next(), "time_ms")?;
    let kind = match next() {
        Value::Text(s) => s.parse::<EventKind>().map_err(|e| e.to_string())?,
        _ => return Err("event is not text".into()),
    };
    let event = Event {
        kind,
        call_id: opt_s(next(), "call_id")?,
        tenant: opt_s(next(), "tenant")?,
        client_id: opt_s(next(), "client_id")?,
        peer_uid: opt_n(next(), "peer_uid")?,
        peer_pid: opt_n(next(), "peer_pid")?,
        target: opt_s(next(), "target")?,
        model: opt_s(next(), "model")?,
        capability: opt_s(next(), "capability")?,
        team: opt_s(next(), "team")?,
        workflow: opt_s(next(), "workflow")?,
        credential_id: opt_s(next(), "credential_id")?,
        credential_version: opt_n(next(), "credential_version")?,
        fingerprint: opt_s(next(), "fingerprint")?,
        upstream_status: opt_n(next(), "upstream_status")?,
        latency_ms: opt_n(next(), "latency_ms")?,
        bytes_in: opt_n(next(), "bytes_in")?,
        bytes_out: opt_n(next(), "bytes_out")?,
        input_tokens: opt_n(next(), "input_tokens")?,
        output_tokens: opt_n(next(), "output_tokens")?,
        total_tokens: opt_n(next(), "total_tokens")?,
        detail: opt_s(next(), "detail")?,
        flags: opt_s(next(), "flags")?
            .map(|f| f.split(',').map(str::to_owned).collect())
            .unwrap_or_default(),
        cached_input_tokens: opt_n(next(), "cached_input_tokens")?,
        cache_write_tokens: opt_n(next(), "cache_write_tokens")?,
        cost_micros: opt_n(next(), "cost_micros")?,
    };
    let mac = match next() {
        Value::Blob(b) => b,
        _ => return Err("mac is not a blob".into()),
    };
    Ok(RawRow {
        seq,
        time_ms,
        event,
        mac,
    })
}

fn to_row(raw: RawRow) -> Row {
    Row {
        seq: raw.seq.max(0) as u64,
        time: rfc3339_ms(raw.time_ms),
        time_ms: raw.time_ms,
        event: raw.event,
        mac: crate::hex::encode(&raw.mac),
    }
}

/// Rows matching `filter`, newest first.
pub(crate) fn query(conn: &Connection, filter: &Filter) -> rusqlite::Result<Vec<Row>> {
    let mut sql = format!("SELECT {COLUMNS} FROM audit_events WHERE 1=1");
    let mut args: Vec<Value> = Vec::new();
    let mut eq = |col: &str, v: &Option<String>, sql: &mut String| {
        if let Some(v) = v {
            args.push(Value::Text(v.clone()));
            sql.push_str(&format!(" AND {col} = ?{}", args.len()));
        }
    };
    eq("tenant", &filter.tenant, &mut sql);
    eq("credential_id", &filter.credential_id, &mut sql);
    eq("client_id", &filter.client_id, &mut sql);
    eq("call_id", &filter.call_id, &mut sql);
    eq("fingerprint", &filter.fingerprint, &mut sql);
    eq(
        "event",
        &filter.event.map(|k| k.as_str().to_owned()),
        &mut sql,
    );
    // Time bounds become seq bounds (times never decrease along seq), so SQLite walks only
    // the rows in the window; the time conditions stay as they are.
    if let Some(t) = filter.since_ms {
        let from = first_seq_at(conn, t)?.unwrap_or(i64::MAX);
        args.push(Value::Integer(from));
        sql.push_str(&format!(" AND seq >= ?{}", args.len()));
        args.push(Value::Integer(t));
        sql.push_str(&format!(" AND time_ms >= ?{}", args.len()));
    }
    if let Some(t) = filter.until_ms {
        if let Some(after) = t.checked_add(1)
            && let Some(end) = first_seq_at(conn, after)?
        {
            args.push(Value::Integer(end));
            sql.push_str(&format!(" AND seq < ?{}", args.len()));
        }
        args.push(Value::Integer(t));
        sql.push_str(&format!(" AND time_ms <= ?{}", args.len()));
    }
    sql.push_str(" ORDER BY seq DESC");
    if let Some(limit) = filter.limit {
        sql.push_str(&format!(" LIMIT {}", limit.min(i64::MAX as usize)));
    }
    collect(conn, &sql, args)
}

/// The seq of the first row whose time is at or after `time_ms`, `None` when no row's is.
///
/// Row times never decrease along seq: the writer stamps a batch with the later of the clock
/// and the previous row's time (`writer.rs`, starting from the newest stored row's time at
/// open), replay keeps the journaled times, and retention deletes a prefix. So this is a
/// binary search over the rowid, about 2·log2(rows) point lookups, where a `time_ms` index
/// would cost every insert a b-tree write.
pub(crate) fn first_seq_at(conn: &Connection, time_ms: i64) -> rusqlite::Result<Option<i64>> {
    let (first, last): (Option<i64>, Option<i64>) =
        conn.query_row("SELECT min(seq), max(seq) FROM audit_events", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })?;
    let (Some(first), Some(last)) = (first, last) else {
        return Ok(None);
    };
    let mut at_or_after = conn.prepare_cached(
        "SELECT seq, time_ms FROM audit_events WHERE seq >= ?1 ORDER BY seq LIMIT 1",
    )?;
    let mut row_from = |seq: i64| -> rusqlite::Result<Option<(i64, i64)>> {
        at_or_after
            .query_row([seq], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()
    };
    // The smallest `s` in first..=last+1 whose first row at or after it is late enough (or
    // absent): that property only ever turns from false to true as `s` grows.
    let (mut lo, mut hi) = (first, last + 1);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        match row_from(mid)? {
            Some((_, t)) if t < time_ms => lo = mid + 1,
            _ => hi = mid,
        }
    }
    Ok(row_from(lo)?.map(|(seq, _)| seq))
}

/// Sums of the spend aggregate, grouped by `by`, for tenants (all when `None`) and hours
/// `since_hour..=until_hour`; highest cost first.
pub(crate) fn spend(
    conn: &Connection,
    q: &super::SpendQuery,
) -> rusqlite::Result<Vec<super::SpendRow>> {
    let key = match q.by {
        super::SpendBy::Tenant => "tenant",
        super::SpendBy::Team => "team",
        super::SpendBy::Client => "client_id",
        super::SpendBy::Credential => "credential_id",
        super::SpendBy::Model => "model",
        super::SpendBy::Day => "CAST(hour / 24 AS TEXT)",
    };
    let mut sql = format!(
        "SELECT {key}, sum(calls), sum(input), sum(cached_input), sum(cache_write), sum(output), \
         sum(cost_micros), sum(unpriced) FROM audit_spend WHERE hour >= ?1 AND hour <= ?2"
    );
    let mut args = vec![
        Value::Integer(q.since_ms.unwrap_or(i64::MIN).div_euclid(SPEND_BUCKET_MS)),
        Value::Integer(q.until_ms.unwrap_or(i64::MAX).div_euclid(SPEND_BUCKET_MS)),
    ];
    if let Some(t) = &q.tenant {
        args.push(Value::Text(t.clone()));
        sql.push_str(" AND tenant = ?3");
    }
    sql.push_str(&format!(
        " GROUP BY {key} ORDER BY sum(cost_micros) DESC, {key}"
    ));
    let mut stmt = conn.prepare(&sql)?;
    let rows = stmt.query_map(params_from_iter(args), |r| {
        let n = |i: usize| r.get::<_, i64>(i).map(|v| v.max(0) as u64);
        let mut key: String = r.get(0)?;
        if q.by == super::SpendBy::Day {
            let day: i64 = key.parse().unwrap_or(0);
            key = rfc3339_ms(day * 86_400_000)[..10].to_owned();
        }
        Ok(super::SpendRow {
            key,
            calls: n(1)?,
            input_tokens: n(2)?,
            cached_input_tokens: n(3)?,
            cache_write_tokens: n(4)?,
            output_tokens: n(5)?,
            cost_micros: n(6)?,
            unpriced_calls: n(7)?,
        })
    })?;
    rows.collect()
}

/// One credential's rows, oldest first.
pub(crate) fn lifecycle(conn: &Connection, credential_id: &str) -> rusqlite::Result<Vec<Row>> {
    let sql =
        format!("SELECT {COLUMNS} FROM audit_events WHERE credential_id = ?1 ORDER BY seq ASC");
    collect(conn, &sql, vec![Value::Text(credential_id.to_owned())])
}

fn collect(conn: &Connection, sql: &str, args: Vec<Value>) -> rusqlite::Result<Vec<Row>> {
    let mut stmt = conn.prepare(sql)?;
    let mut rows = stmt.query(params_from_iter(args))?;
    let mut out = Vec::new();
    while let Some(r) = rows.next()? {
        // A row that no longer decodes (someone edited the file) is left to `verify`; the
        // query still shows everything else.
        if let Ok(raw) = decode(r)? {
            out.push(to_row(raw));
        }
    }
    Ok(out)
}

/// Rows after `seq`, oldest first, exactly as stored (to write again what the export did not).
pub(crate) fn rows_after(conn: &Connection, seq: u64) -> Result<Vec<RawRow>, String> {
    let mut stmt = conn
        .prepare(&format!(
            "SELECT {COLUMNS} FROM audit_events WHERE seq > ?1 ORDER BY seq ASC"
        ))
        .map_err(|e| e.to_string())?;
    let mut rows = stmt.query([seq as i64]).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    while let Some(r) = rows.next().map_err(|e| e.to_string())? {
        out.push(
            decode(r)
                .map_err(|e| e.to_string())?
                .map_err(|(seq, why)| format!("row {seq} is malformed: {why}"))?,
        );
    }
    Ok(out)
}

/// The stored MAC of row `seq`, if that row is in the database.
pub(crate) fn mac_at(conn: &Connection, seq: u64) -> rusqlite::Result<Option<Vec<u8>>> {
    conn.query_row(
        "SELECT mac FROM audit_events WHERE seq = ?1",
        [seq as i64],
        |r| r.get(0),
    )
    .optional()
}

// === verification ===

/// Checks rows `start.seq + 1 ..= last` against the chain and returns the position at `last`.
pub(crate) fn verify_prefix(
    conn: &Connection,
    key: &MacKey,
    start: Position,
    last: u64,
) -> Result<Position, String> {
    let mut stmt = conn
        .prepare(&format!(
            "SELECT {COLUMNS} FROM audit_events WHERE seq <= ?1 ORDER BY seq ASC"
        ))
        .map_err(|e| e.to_string())?;
    let mut rows = stmt.query([last as i64]).map_err(|e| e.to_string())?;
    let mut prev = start;
    while let Some(r) = rows.next().map_err(|e| e.to_string())? {
        let raw = decode(r)
            .map_err(|e| e.to_string())?
            .map_err(|(seq, why)| format!("row {seq} is malformed: {why}"))?;
        let seq = raw.seq.max(0) as u64;
        if seq != prev.seq + 1 {
            return Err(format!("row {} is missing", prev.seq + 1));
        }
        let want = key.row_mac(&prev.mac, seq, raw.time_ms, &raw.event);
        if !chain::ct_eq(&raw.mac, &want) {
            return Err(format!("row {seq} fails its MAC"));
        }
        prev = Position { seq, mac: want };
    }
    if prev.seq != last {
        return Err(format!("rows after {} are missing", prev.seq));
    }
    Ok(prev)
}

/// Walks the whole chain in one read snapshot, continued by the `journal` rows the database
/// does not have yet, and checks it against the checkpoint and the head anchor. Read the
/// anchor first, then the journal, then start the snapshot: the anchor only moves after its
/// rows are journaled, and a segment is deleted only after its rows are in the database, so
/// every anchored row is in one of the two.
pub(crate) fn verify(
    conn: &mut Connection,
    key: &MacKey,
    anchor: Anchor,
    journal: Vec<RawRow>,
) -> rusqlite::Result<VerifyReport> {
    let tx = conn.transaction()?;
    let mut report = VerifyReport::default();
    let fail = |report: &mut VerifyReport, seq: Option<u64>, reason: String| {
        if report.reason.is_none() {
            report.first_bad_seq = seq;
            report.reason = Some(reason);
        }
    };
    let start = match checkpoint(&tx, key) {
        Ok(p) => p,
        Err(reason) => {
            fail(&mut report, None, reason);
            Position::START
        }
    };
    report.checkpoint_seq = start.seq;
    let mut prev = start;
    // The MAC of the anchored seq as found in the db, to compare with the anchor's.
    let anchor_pos = match &anchor {
        Anchor::At(p) => Some(*p),
        _ => None,
    };
    let mut anchored_mac_seen = anchor_pos.filter(|a| a.seq == start.seq).map(|_| start.mac);
    {
        let mut stmt = tx.prepare(&format!(
            "SELECT {COLUMNS} FROM audit_events ORDER BY seq ASC"
        ))?;
        let mut rows = stmt.query([])?;
        let mut journal = journal.into_iter();
        loop {
            // Database rows first, then the journaled rows the database does not have yet.
            let decoded = match rows.next()? {
                Some(r) => decode(r)?,
                None => match journal.find(|j| j.seq as u64 > prev.seq) {
                    Some(j) => Ok(j),
                    None => break,
                },
            };
            report.rows_checked += 1;
            let expected = prev.seq + 1;
            let raw = match decoded {
                Ok(raw) => raw,
                Err((seq, why)) => {
                    fail(
                        &mut report,
                        Some(seq.max(0) as u64),
                        format!("row {seq} is malformed: {why}"),
                    );
                    // Without a decodable row the chain cannot continue from it.
                    prev = Position {
                        seq: seq.max(0) as u64,
                        mac: [0; MAC_LEN],
                    };
                    continue;
                }
            };
            let seq = raw.seq.max(0) as u64;
            if seq != expected {
                let reason = if seq > expected {
                    if expected == seq - 1 {
                        format!("row {expected} is missing (deleted)")
                    } else {
                        format!("rows {expected}..={} are missing (deleted)", seq - 1)
                    }
                } else {
                    format!("row {seq} is out of sequence")
                };
                fail(&mut report, Some(expected.min(seq)), reason);
            }
            let stored: Option<[u8; MAC_LEN]> = raw.mac.as_slice().try_into().ok();
            let want = key.row_mac(&prev.mac, seq, raw.time_ms, &raw.event);
            let ok = stored.is_some_and(|m| chain::ct_eq(&m, &want));
            if !ok && seq == expected {
                fail(
                    &mut report,
                    Some(seq),
                    format!(
                        "row {seq} fails its MAC: it was edited, inserted or moved, or the row \
                         before it was"
                    ),
                );
            }
            // Continue from what is stored so one bad row does not hide the rest of the walk.
            prev = Position {
                seq,
                mac: stored.unwrap_or([0; MAC_LEN]),
            };
            if anchor_pos.is_some_and(|a| a.seq == seq) {
                anchored_mac_seen = Some(prev.mac);
            }
        }
    }
    tx.finish()?;
    report.last_seq = prev.seq;
    match anchor {
        Anchor::Missing => {
            if prev.seq > 0 {
                fail(
                    &mut report,
                    None,
                    format!(
                        "{} is missing, so truncation of the newest rows cannot be ruled out",
                        chain::HEAD_FILE
                    ),
                );
            }
        }
        Anchor::Invalid(why) => fail(
            &mut report,
            None,
            format!("{} is not valid: {why}", chain::HEAD_FILE),
        ),
        Anchor::At(a) => {
            report.anchored_seq = a.seq;
            if a.seq > prev.seq {
                fail(
                    &mut report,
                    Some(prev.seq + 1),
                    format!(
                        "the newest rows were truncated: {} records seq {} but the database ends \
                         at seq {}",
                        chain::HEAD_FILE,
                        a.seq,
                        prev.seq
                    ),
                );
            } else if a.seq >= start.seq {
                match anchored_mac_seen {
                    Some(m) if m == a.mac => {}
                    _ => fail(
                        &mut report,
                        Some(a.seq),
                        format!(
                            "row {} does not match the MAC recorded in {}",
                            a.seq,
                            chain::HEAD_FILE
                        ),
                    ),
                }
            }
        }
    }
    Ok(report)
}

/// The audit files hold metadata only, but nobody else needs to read them.
fn restrict_permissions(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    for suffix in ["", "-wal", "-shm"] {
        let mut p = path.as_os_str().to_owned();
        p.push(suffix);
        let _ = std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600));
    }
}

/// Rows for tests: each `(seq, time_ms, event)` MACed onto the one before it, the first onto
/// `from`, as the writer chains them.
#[cfg(test)]
pub(crate) fn chained(
    key: &MacKey,
    from: Position,
    rows: impl IntoIterator<Item = (u64, i64, Event)>,
) -> Vec<RawRow> {
    let mut prev = from;
    rows.into_iter()
        .map(|(seq, time_ms, event)| {
            let mac = key.row_mac(&prev.mac, seq, time_ms, &event);
            prev = Position { seq, mac };
            RawRow {
                seq: seq as i64,
                time_ms,
                event,
                mac: mac.to_vec(),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::seal::Secret;

    /// A fresh database file in a temporary directory and a random audit key.
    struct Store {
        _dir: tempfile::TempDir,
        conn: Connection,
        key: MacKey,
    }

    fn store() -> Store {
        let dir = tempfile::tempdir().unwrap();
        let conn = open_writer(dir.path(), AuditSync::Normal).unwrap();
        Store {
            _dir: dir,
            conn,
            key: MacKey::new(&Secret::random(32)),
        }
    }

    /// An event with every field set, each to a value no other row or field has, so a column
    /// read back from the wrong place, as NULL or as a default, changes the row.
    fn full_event(kind: EventKind, i: u64) -> Event {
        let small = |base: u32| Some(base + i as u32);
        Event {
            kind,
            call_id: Some(format!("call-{i}")),
            tenant: Some(format!("tenant-{i}")),
            client_id: Some(format!("client-{i}")),
            peer_uid: small(1_000),
            peer_pid: small(40_000),
            target: Some(format!("target-{i}")),
            model: Some(format!("model-{i}")),
            capability: Some(format!("capability-{i}")),
            team: Some(format!("team-{i}")),
            workflow: Some(format!("workflow-{i}")),
            credential_id: Some(format!("cred_{i}")),
            credential_version: small(2),
            fingerprint: Some(format!("{:064x}", 0xf00 + i)),
            upstream_status: Some(200 + i as u16),
            latency_ms: Some(11 + i),
            bytes_in: Some(1_100 + i),
            bytes_out: Some(2_200 + i),
            input_tokens: Some(3_300 + i),
            output_tokens: Some(4_400 + i),
            total_tokens: Some(7_700 + i),
            detail: Some(format!("detail {i}")),
            flags: vec!["unpriced".into(), format!("flag-{i}")],
            cached_input_tokens: Some(330 + i),
            cache_write_tokens: Some(55 + i),
            cost_micros: Some(9_000 + i),
        }
    }

    /// `n` rows chained on from `from`: each kind in turn, first with every field empty, then
    /// with every field set.
    fn chain(key: &MacKey, from: Position, n: u64) -> Vec<RawRow> {
        let rows = (from.seq + 1..=from.seq + n).map(|seq| {
            let kind = EventKind::ALL[((seq - 1) / 2) as usize % EventKind::ALL.len()];
            let event = if seq % 2 == 0 {
                full_event(kind, seq)
            } else {
                Event::new(kind)
            };
            (seq, 1_700_000_000_000 + seq as i64 * 1_000, event)
        });
        chained(key, from, rows)
    }

    fn at(row: &RawRow) -> Position {
        Position {
            seq: row.seq as u64,
            mac: row.mac.as_slice().try_into().unwrap(),
        }
    }

    fn put(conn: &mut Connection, rows: &[RawRow]) {
        let tx = conn.transaction().unwrap();
        {
            let mut stmt = tx.prepare_cached(INSERT).unwrap();
            for r in rows {
                insert(&mut stmt, r.seq as u64, r.time_ms, &r.event, &r.mac).unwrap();
            }
        }
        tx.commit().unwrap();
    }

    #[test]
    fn column_count_is_the_number_of_columns_named_and_inserted() {
        assert_eq!(COLUMNS.split(',').count(), COLUMN_COUNT);
        assert!(INSERT.contains(&format!("?{COLUMN_COUNT})")));
        assert!(!INSERT.contains(&format!("?{}", COLUMN_COUNT + 1)));
    }

    fn sql(conn: &Connection, statement: &str) {
        conn.execute_batch(statement).unwrap();
    }

    fn set_checkpoint(s: &Store, pos: &Position) {
        s.conn
            .execute(
                "INSERT OR REPLACE INTO audit_meta (key, value) VALUES (?1, ?2)",
                rusqlite::params![META_CHECKPOINT, chain::encode_checkpoint(&s.key, pos)],
            )
            .unwrap();
    }

    fn check(s: &mut Store, anchor: Anchor, journal: Vec<RawRow>) -> VerifyReport {
        verify(&mut s.conn, &s.key, anchor, journal).unwrap()
    }

    fn assert_same(got: &[RawRow], want: &[RawRow]) {
        let seqs = |rows: &[RawRow]| rows.iter().map(|r| r.seq).collect::<Vec<_>>();
        assert_eq!(seqs(got), seqs(want));
        for (g, w) in got.iter().zip(want) {
            assert_eq!(g.time_ms, w.time_ms, "row {}", w.seq);
            assert_eq!(g.event, w.event, "row {}", w.seq);
            assert_eq!(g.mac, w.mac, "row {}", w.seq);
        }
    }

    #[test]
    fn every_field_of_every_kind_reads_back_as_written_and_verifies() {
        let mut s = store();
        let rows = chain(&s.key, Position::START, 2 * EventKind::ALL.len() as u64);
        put(&mut s.conn, &rows);
        assert_same(&rows_after(&s.conn, 0).unwrap(), &rows);
        let tip = at(rows.last().unwrap());
        let report = check(&mut s, Anchor::At(tip), Vec::new());
        assert_eq!(
            report,
            VerifyReport {
                rows_checked: 40,
                first_bad_seq: None,
                reason: None,
                last_seq: 40,
                checkpoint_seq: 0,
                anchored_seq: 40,
            }
        );
    }

    #[test]
    fn rows_after_starts_after_the_seq_given_and_names_a_row_that_does_not_decode() {
        let mut s = store();
        let rows = chain(&s.key, Position::START, 5);
        put(&mut s.conn, &rows);
        assert_same(&rows_after(&s.conn, 0).unwrap(), &rows);
        assert_same(&rows_after(&s.conn, 2).unwrap(), &rows[2..]);
        assert_same(&rows_after(&s.conn, 4).unwrap(), &rows[4..]);
        assert!(rows_after(&s.conn, 5).unwrap().is_empty());

        sql(
            &s.conn,
            "UPDATE audit_events SET peer_uid = 'x' WHERE seq = 4",
        );
        assert_eq!(
            rows_after(&s.conn, 0).unwrap_err(),
            "row 4 is malformed: peer_uid is not an integer"
        );
        assert!(rows_after(&s.conn, 4).is_ok());
    }

    #[test]
    fn mac_at_is_the_stored_mac_of_that_row_only() {
        let mut s = store();
        let rows = chain(&s.key, Position::START, 4);
        put(&mut s.conn, &rows);
        for r in &rows {
            assert_eq!(mac_at(&s.conn, r.seq as u64).unwrap(), Some(r.mac.clone()));
        }
        assert_eq!(mac_at(&s.conn, 0).unwrap(), None);
        assert_eq!(mac_at(&s.conn, 5).unwrap(), None);
    }

    #[test]
    fn tip_is_the_newest_row_else_the_checkpoint_else_the_start() {
        let mut s = store();
        assert_eq!(tip(&s.conn, &s.key).unwrap(), Position::START);
        assert_eq!(checkpoint(&s.conn, &s.key).unwrap(), Position::START);
        let rows = chain(&s.key, Position::START, 5);
        put(&mut s.conn, &rows[..1]);
        assert_eq!(tip(&s.conn, &s.key).unwrap(), at(&rows[0]));
        put(&mut s.conn, &rows[1..3]);
        assert_eq!(tip(&s.conn, &s.key).unwrap(), at(&rows[2]));

        // Rows 1..=3 pruned: the tip is the checkpoint until newer rows arrive, then theirs.
        set_checkpoint(&s, &at(&rows[2]));
        sql(&s.conn, "DELETE FROM audit_events WHERE seq <= 3");
        assert_eq!(checkpoint(&s.conn, &s.key).unwrap(), at(&rows[2]));
        assert_eq!(tip(&s.conn, &s.key).unwrap(), at(&rows[2]));
        put(&mut s.conn, &rows[3..]);
        assert_eq!(tip(&s.conn, &s.key).unwrap(), at(&rows[4]));
        assert_eq!(checkpoint(&s.conn, &s.key).unwrap(), at(&rows[2]));

        // A checkpoint under another key is refused, and so is a tip resting on it.
        let other = MacKey::new(&Secret::random(32));
        let forged = chain::encode_checkpoint(&other, &at(&rows[4]));
        s.conn
            .execute(
                "UPDATE audit_meta SET value = ?1 WHERE key = ?2",
                rusqlite::params![forged, META_CHECKPOINT],
            )
            .unwrap();
        let refused = "the retention checkpoint's MAC does not verify";
        assert_eq!(checkpoint(&s.conn, &s.key).unwrap_err(), refused);
        sql(&s.conn, "DELETE FROM audit_events");
        assert_eq!(tip(&s.conn, &s.key).unwrap_err(), refused);
    }

    #[test]
    fn a_newest_row_with_a_short_mac_or_a_seq_below_one_is_no_tip() {
        let mut s = store();
        put(&mut s.conn, &chain(&s.key, Position::START, 2));
        sql(
            &s.conn,
            "UPDATE audit_events SET mac = zeroblob(31) WHERE seq = 2",
        );
        assert_eq!(
            tip(&s.conn, &s.key).unwrap_err(),
            "the newest row (seq 2) is malformed"
        );

        for seq in [0, -3] {
            let mut s = store();
            let mut row = chain(&s.key, Position::START, 1).remove(0);
            row.seq = seq;
            put(&mut s.conn, &[row]);
            assert_eq!(
                tip(&s.conn, &s.key).unwrap_err(),
                format!("the newest row (seq {seq}) is malformed")
            );
        }
    }

    #[test]
    fn verify_prefix_checks_every_row_up_to_the_last_one_asked_for() {
        let mut s = store();
        let rows = chain(&s.key, Position::START, 5);
        put(&mut s.conn, &rows);
        let start = Position::START;
        assert_eq!(
            verify_prefix(&s.conn, &s.key, start, 3).unwrap(),
            at(&rows[2])
        );
        assert_eq!(
            verify_prefix(&s.conn, &s.key, start, 5).unwrap(),
            at(&rows[4])
        );
        assert_eq!(
            verify_prefix(&s.conn, &s.key, start, 7).unwrap_err(),
            "rows after 5 are missing"
        );

        // After a prune of rows 1..=2 the walk starts from the checkpoint.
        sql(&s.conn, "DELETE FROM audit_events WHERE seq <= 2");
        let checkpoint = at(&rows[1]);
        assert_eq!(
            verify_prefix(&s.conn, &s.key, checkpoint, 4).unwrap(),
            at(&rows[3])
        );
        assert_eq!(
            verify_prefix(&s.conn, &s.key, start, 4).unwrap_err(),
            "row 1 is missing"
        );

        sql(
            &s.conn,
            "UPDATE audit_events SET tenant = 'other' WHERE seq = 3",
        );
        assert_eq!(
            verify_prefix(&s.conn, &s.key, checkpoint, 4).unwrap_err(),
            "row 3 fails its MAC"
        );
        sql(
            &s.conn,
            "UPDATE audit_events SET mac = 'text' WHERE seq = 3",
        );
        assert_eq!(
            verify_prefix(&s.conn, &s.key, checkpoint, 4).unwrap_err(),
            "row 3 is malformed: mac is not a blob"
        );
    }

    /// Every stored column of a row with every field set (row 4) changed, and every empty one
    /// of a row without fields (row 3) filled in: each edit fails that row's MAC, and the walk
    /// still reads the rows after it.
    #[test]
    fn an_edit_of_any_column_fails_that_rows_mac() {
        let mut s = store();
        let rows = chain(&s.key, Position::START, 5);
        put(&mut s.conn, &rows);
        let anchor = at(&rows[4]);
        let text = [
            "call_id",
            "tenant",
            "client_id",
            "target",
            "model",
            "capability",
            "team",
            "workflow",
            "credential_id",
            "fingerprint",
            "detail",
            "flags",
        ];
        let number = [
            "peer_uid",
            "peer_pid",
            "credential_version",
            "upstream_status",
            "latency_ms",
            "bytes_in",
            "bytes_out",
            "input_tokens",
            "output_tokens",
            "total_tokens",
            "cached_input_tokens",
            "cache_write_tokens",
            "cost_micros",
        ];
        let mut edits: Vec<(i64, &str, String)> = Vec::new();
        for c in text {
            edits.push((4, c, format!("{c} || 'x'")));
            edits.push((3, c, "'x'".to_owned()));
        }
        for c in number {
            edits.push((4, c, format!("{c} + 1")));
            edits.push((3, c, "7".to_owned()));
        }
        edits.push((4, "time_ms", "time_ms + 1".to_owned()));
        edits.push((4, "event", "'limit.deleted'".to_owned()));
        edits.push((3, "event", "'request.completed'".to_owned()));
        edits.push((4, "mac", "zeroblob(32)".to_owned()));
        for (seq, column, value) in edits {
            let was: Value = s
                .conn
                .query_row(
                    &format!("SELECT {column} FROM audit_events WHERE seq = ?1"),
                    [seq],
                    |r| r.get(0),
                )
                .unwrap();
            sql(
                &s.conn,
                &format!("UPDATE audit_events SET {column} = {value} WHERE seq = {seq}"),
            );
            let report = check(&mut s, Anchor::At(anchor), Vec::new());
            assert_eq!(
                report.first_bad_seq,
                Some(seq as u64),
                "{column}: {report:?}"
            );
            assert_eq!(
                report.reason.as_deref(),
                Some(
                    format!(
                        "row {seq} fails its MAC: it was edited, inserted or moved, or the row \
                         before it was"
                    )
                    .as_str()
                ),
                "{column}"
            );
            assert_eq!((report.rows_checked, report.last_seq), (5, 5), "{column}");
            s.conn
                .execute(
                    &format!("UPDATE audit_events SET {column} = ?1 WHERE seq = ?2"),
                    rusqlite::params![was, seq],
                )
                .unwrap();
        }
        assert!(check(&mut s, Anchor::At(anchor), Vec::new()).ok());
    }

    #[test]
    fn deleted_rows_are_named_by_their_seqs() {
        for (delete, first, reason) in [
            ("seq = 3", 3, "row 3 is missing (deleted)"),
            ("seq IN (2, 3)", 2, "rows 2..=3 are missing (deleted)"),
            ("seq = 1", 1, "row 1 is missing (deleted)"),
        ] {
            let mut s = store();
            let rows = chain(&s.key, Position::START, 6);
            put(&mut s.conn, &rows);
            sql(&s.conn, &format!("DELETE FROM audit_events WHERE {delete}"));
            let report = check(&mut s, Anchor::At(at(&rows[5])), Vec::new());
            assert_eq!(report.first_bad_seq, Some(first), "{delete}");
            assert_eq!(report.reason.as_deref(), Some(reason), "{delete}");
            assert_eq!(report.last_seq, 6);
        }
    }

    #[test]
    fn a_row_before_row_one_is_out_of_sequence() {
        let mut s = store();
        let rows = chain(&s.key, Position::START, 3);
        let mut early = rows[0].clone();
        early.seq = 0;
        put(&mut s.conn, &[early]);
        put(&mut s.conn, &rows);
        let report = check(&mut s, Anchor::At(at(&rows[2])), Vec::new());
        assert_eq!(report.first_bad_seq, Some(0));
        assert_eq!(report.reason.as_deref(), Some("row 0 is out of sequence"));
    }

    #[test]
    fn a_row_that_does_not_decode_is_malformed_at_its_seq_and_the_walk_goes_on() {
        for (edit, why) in [
            ("mac = 'text'", "mac is not a blob"),
            ("peer_pid = -1", "peer_pid is out of range"),
            ("event = 'no.such'", "unknown audit event `no.such`"),
            ("tenant = X'01'", "tenant is not text"),
            ("time_ms = 'soon'", "time_ms is not an integer"),
        ] {
            let mut s = store();
            let rows = chain(&s.key, Position::START, 5);
            put(&mut s.conn, &rows);
            sql(
                &s.conn,
                &format!("UPDATE audit_events SET {edit} WHERE seq = 3"),
            );
            let report = check(&mut s, Anchor::At(at(&rows[4])), Vec::new());
            assert_eq!(report.first_bad_seq, Some(3), "{edit}");
            let reason = report.reason.unwrap_or_default();
            assert!(
                reason.starts_with(&format!("row 3 is malformed: {why}")),
                "{edit}: {reason}"
            );
            assert_eq!((report.rows_checked, report.last_seq), (5, 5), "{edit}");
        }
    }

    #[test]
    fn the_anchor_must_be_present_valid_and_match_the_row_it_names() {
        let mut s = store();
        let report = check(&mut s, Anchor::Missing, Vec::new());
        assert!(report.ok() && report.rows_checked == 0, "{report:?}");
        let report = check(&mut s, Anchor::At(Position::START), Vec::new());
        assert!(report.ok(), "{report:?}");

        let rows = chain(&s.key, Position::START, 4);
        put(&mut s.conn, &rows[..3]);
        let report = check(&mut s, Anchor::Missing, Vec::new());
        assert_eq!(report.first_bad_seq, None);
        assert_eq!(
            report.reason.as_deref(),
            Some("audit.head is missing, so truncation of the newest rows cannot be ruled out")
        );
        let report = check(&mut s, Anchor::Invalid("bad tag".into()), Vec::new());
        assert_eq!(
            report.reason.as_deref(),
            Some("audit.head is not valid: bad tag")
        );

        // The trail may be ahead of its anchor (the next open moves it), never behind it.
        let report = check(&mut s, Anchor::At(at(&rows[1])), Vec::new());
        assert!(report.ok() && report.anchored_seq == 2, "{report:?}");
        let report = check(&mut s, Anchor::At(at(&rows[3])), Vec::new());
        assert_eq!(report.first_bad_seq, Some(4));
        assert_eq!(
            report.reason.as_deref(),
            Some(
                "the newest rows were truncated: audit.head records seq 4 but the database \
                 ends at seq 3"
            )
        );
        let wrong = Position {
            seq: 2,
            mac: [7; MAC_LEN],
        };
        let report = check(&mut s, Anchor::At(wrong), Vec::new());
        assert_eq!(report.first_bad_seq, Some(2));
        assert_eq!(
            report.reason.as_deref(),
            Some("row 2 does not match the MAC recorded in audit.head")
        );
    }

    #[test]
    fn after_a_prune_the_walk_starts_at_the_checkpoint() {
        let mut s = store();
        let rows = chain(&s.key, Position::START, 5);
        put(&mut s.conn, &rows);
        set_checkpoint(&s, &at(&rows[2]));
        sql(&s.conn, "DELETE FROM audit_events WHERE seq <= 3");
        let report = check(&mut s, Anchor::At(at(&rows[4])), Vec::new());
        assert_eq!(
            report,
            VerifyReport {
                rows_checked: 2,
                first_bad_seq: None,
                reason: None,
                last_seq: 5,
                checkpoint_seq: 3,
                anchored_seq: 5,
            }
        );
        // An anchor the prune went past has nothing left to compare with.
        assert!(check(&mut s, Anchor::At(at(&rows[1])), Vec::new()).ok());
        let wrong = Position {
            seq: 2,
            mac: [7; MAC_LEN],
        };
        assert!(check(&mut s, Anchor::At(wrong), Vec::new()).ok());

        // Every row pruned: the anchor at the checkpoint is checked against it.
        sql(&s.conn, "DELETE FROM audit_events");
        set_checkpoint(&s, &at(&rows[4]));
        let report = check(&mut s, Anchor::At(at(&rows[4])), Vec::new());
        assert!(report.ok(), "{report:?}");
        assert_eq!((report.rows_checked, report.last_seq), (0, 5));
        let wrong = Position {
            seq: 5,
            mac: [7; MAC_LEN],
        };
        assert_eq!(
            check(&mut s, Anchor::At(wrong), Vec::new()).first_bad_seq,
            Some(5)
        );

        let other = MacKey::new(&Secret::random(32));
        s.conn
            .execute(
                "UPDATE audit_meta SET value = ?1 WHERE key = ?2",
                rusqlite::params![
                    chain::encode_checkpoint(&other, &at(&rows[4])),
                    META_CHECKPOINT
                ],
            )
            .unwrap();
        let report = check(&mut s, Anchor::At(at(&rows[4])), Vec::new());
        assert_eq!(report.first_bad_seq, None);
        assert_eq!(
            report.reason.as_deref(),
            Some("the retention checkpoint's MAC does not verify")
        );
    }

    #[test]
    fn journaled_rows_continue_the_database_and_rows_it_already_has_are_skipped() {
        let mut s = store();
        let rows = chain(&s.key, Position::START, 6);
        put(&mut s.conn, &rows[..3]);
        // A fold stored rows 1..=3 but their segment (from row 2) is not deleted yet.
        let journal = rows[1..].to_vec();
        let report = check(&mut s, Anchor::At(at(&rows[5])), journal);
        assert!(report.ok(), "{report:?}");
        assert_eq!((report.rows_checked, report.last_seq), (6, 6));

        let mut journal: Vec<RawRow> = rows[3..].to_vec();
        journal[1].event.tenant = Some("other".into());
        let report = check(&mut s, Anchor::At(at(&rows[5])), journal);
        assert_eq!(report.first_bad_seq, Some(5), "{report:?}");
    }
}

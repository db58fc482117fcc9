//! Shipping the trail: with `audit_export`, every committed row is also written as one JSON
//! line to standard output or a file, for the log pipeline the platform runs, and
//! [`verify_jsonl`] checks such lines (from many instances, interleaved) with the master key
//! alone.
//!
//! # Line format (README "Running many sidecars")
//! A row line is the row as `audit query --json` prints it (`seq`, `time`, `time_ms`, `event`
//! and every field of the event that is set) plus `instance`, `prev_mac` and `mac` (lowercase
//! hex). The first row line an instance writes after each start also carries `audit_key` (the
//! audit MAC key wrapped by the master key, hex), `master_key` (which master key wrapped it)
//! and `instance_tag` (`HMAC(audit key, "keyward/audit-export-instance/v1" ‖ instance)`, so
//! lines cannot be relabelled as another instance's). A clean stop writes one stop line
//! `{"instance", "export": "stop", "seq", "mac", "tag"}`, the tag binding instance and
//! position, so rows cut from the end of a stopped instance's stream are detected.
//!
//! # Never blocking, never dropping
//! The writer renders a batch's lines while it holds the chain head and checks, *before* the
//! batch is journaled, that the export buffer has room for them; if it has not (the pipeline
//! stopped reading standard output), the batch is refused like any failed commit
//! (`audit_unavailable`), so a row is never committed without its line. Committed lines go to
//! the buffer and a dedicated thread writes them out, so a blocked pipe stalls that thread and
//! nothing else. The thread records the last seq it wrote in `<state_dir>/audit.export.seq`;
//! the next start writes again every row after it (a crash between a write and that record
//! repeats lines, which [`verify_jsonl`] accepts as duplicates).

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{self, BufRead, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::chain::{self, MAC_LEN, MacKey, Position};
use super::event::{Event, canonical, rfc3339_ms};
use crate::config::AuditExport;
use crate::hex;
use crate::lock;

/// The file recording the last seq written to the export sink.
pub(crate) const EXPORTED_FILE: &str = "audit.export.seq";
/// The file holding the instance id.
pub const INSTANCE_FILE: &str = "instance.id";
/// Domain of the tag on the line that carries the audit key.
const INSTANCE_DOMAIN: &str = "audit-export-instance";
/// Domain of the tag on a stop line.
const STOP_DOMAIN: &str = "audit-export-stop";

/// This keyward's instance id: read from `<state_dir>/instance.id`, created there on first
/// use as `<host name>-<8 random hex digits>` (the host name cut to 40 characters of
/// `[A-Za-z0-9.-]`; in Kubernetes that is the pod name). One state directory is one instance:
/// one audit chain, one serial history.
pub fn instance_id(state_dir: &Path) -> io::Result<String> {
    let path = state_dir.join(INSTANCE_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let id = text.trim();
            if valid_instance(id) {
                return Ok(id.to_string());
            }
            return Err(io::Error::other(format!(
                "{} does not hold an instance id (1-64 of [A-Za-z0-9._-]); delete it to get a \
                 new one",
                path.display()
            )));
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let host: String = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap_or_default()
        .trim()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-'))
        .take(40)
        .collect();
    let mut rnd = [0u8; 4];
    crate::seal::fill_random(&mut rnd);
    let id = if host.is_empty() {
        format!("kw-{}", hex::encode(&rnd))
    } else {
        format!("{host}-{}", hex::encode(&rnd))
    };
    let created = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path);
    match created {
        Ok(mut f) => {
            f.write_all(format!("{id}\n").as_bytes())?;
            f.sync_all()?;
            Ok(id)
        }
        // Another process made it first: its id wins.
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => instance_id(state_dir),
        Err(e) => Err(e),
    }
}

fn valid_instance(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// How a shipping sidecar identifies itself and its key in the stream.
pub(crate) struct ExportIdentity {
    /// The instance id.
    pub instance: String,
    /// The audit MAC key as stored: wrapped by the master key.
    pub wrapped_key: Vec<u8>,
    /// Which master key wrapped it (printed by the verifier when it cannot unwrap).
    pub master_key: String,
}

/// A committed row, as [`Exporter::render`] needs it.
pub(crate) struct LineRow<'a> {
    pub seq: u64,
    pub time_ms: i64,
    pub event: &'a Event,
    pub prev: &'a [u8; MAC_LEN],
    pub mac: &'a [u8; MAC_LEN],
}

/// One row line as written.
#[derive(Serialize)]
struct RowOut<'a> {
    instance: &'a str,
    seq: u64,
    time: String,
    time_ms: i64,
    #[serde(flatten)]
    event: &'a Event,
    prev_mac: String,
    mac: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    audit_key: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    master_key: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    instance_tag: Option<&'a str>,
}

/// One row line as read back.
#[derive(Deserialize)]
struct RowIn {
    seq: u64,
    time_ms: i64,
    #[serde(flatten)]
    event: Event,
    prev_mac: String,
    mac: String,
    #[serde(default)]
    audit_key: Option<String>,
    #[serde(default)]
    master_key: Option<String>,
    #[serde(default)]
    instance_tag: Option<String>,
}

/// A stop line.
#[derive(Serialize, Deserialize)]
struct StopLine {
    instance: String,
    export: String,
    seq: u64,
    mac: String,
    tag: String,
}

/// What waits to be written, shared by the writer (producer) and the export thread.
struct Pending {
    /// Lines not yet taken by the thread.
    buf: Vec<u8>,
    /// Seq of the last row in `buf`.
    buf_seq: u64,
    /// Bytes the thread holds and is writing.
    writing: usize,
    /// Last seq known written to the sink.
    written_seq: u64,
    /// The key fields went out with a row of this run.
    key_sent: bool,
    /// The last write error, until a write succeeds.
    error: Option<String>,
    /// No more lines; the thread exits once `buf` is written.
    closed: bool,
    /// The thread has exited.
    finished: bool,
}

/// The export buffer and its writing thread.
pub(crate) struct Exporter {
    pending: Mutex<Pending>,
    /// Wakes the thread when lines arrive or the exporter closes.
    wake: Condvar,
    /// Wakes those waiting for the buffer to empty.
    drained: Condvar,
    /// Most bytes that may wait (buffer + being written) before commits are refused; a batch
    /// arriving at an empty buffer is always taken, whatever its size.
    capacity: usize,
    identity: ExportIdentity,
    /// `audit_key`, `instance_tag` as written on a key line.
    key_hex: String,
    instance_tag_hex: String,
    /// `stdout` or the file path, for messages.
    sink_name: String,
    key: Arc<MacKey>,
}

/// Where lines go.
enum Sink {
    Stdout,
    File(File),
}

impl Sink {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        match self {
            // Straight to fd 1, past the standard library's line buffer, so "written" means
            // the pipe took it.
            Sink::Stdout => Ok(nix::unistd::write(io::stdout(), bytes)?),
            Sink::File(f) => f.write(bytes),
        }
    }
}

impl Exporter {
    /// Opens the sink (a file is created 0600 and appended to) and starts the writing thread.
    /// `exported_seq` is the last seq already written by an earlier run.
    pub(crate) fn start(
        spec: &AuditExport,
        capacity: usize,
        identity: ExportIdentity,
        key: Arc<MacKey>,
        state_dir: &Path,
        exported_seq: u64,
    ) -> io::Result<Arc<Exporter>> {
        let (sink, sink_name) = match spec {
            AuditExport::Stdout => (Sink::Stdout, "stdout".to_string()),
            AuditExport::File(path) => (
                Sink::File(
                    std::fs::OpenOptions::new()
                        .append(true)
                        .create(true)
                        .mode(0o600)
                        .open(path)
                        .map_err(|e| {
                            io::Error::new(e.kind(), format!("{}: {e}", path.display()))
                        })?,
                ),
                path.display().to_string(),
            ),
        };
        let marker = open_marker(state_dir)?;
        marker.write_all_at(format!("{exported_seq:020}\n").as_bytes(), 0)?;
        let instance_tag = key.tag(INSTANCE_DOMAIN, &[identity.instance.as_bytes()]);
        let exporter = Arc::new(Exporter {
            pending: Mutex::new(Pending {
                buf: Vec::new(),
                buf_seq: exported_seq,
                writing: 0,
                written_seq: exported_seq,
                key_sent: false,
                error: None,
                closed: false,
                finished: false,
            }),
            wake: Condvar::new(),
            drained: Condvar::new(),
            capacity,
            key_hex: hex::encode(&identity.wrapped_key),
            instance_tag_hex: hex::encode(&instance_tag),
            identity,
            sink_name,
            key,
        });
        let this = exporter.clone();
        std::thread::Builder::new()
            .name("keyward-export".into())
            .spawn(move || this.run(sink, marker))?;
        Ok(exporter)
    }

    /// Appends the line of one row to `out`; `with_key` adds the key fields (the first row
    /// line of a run).
    pub(crate) fn render(&self, out: &mut Vec<u8>, row: LineRow<'_>, with_key: bool) {
        let LineRow {
            seq,
            time_ms,
            event,
            prev,
            mac,
        } = row;
        let line = RowOut {
            instance: &self.identity.instance,
            seq,
            time: rfc3339_ms(time_ms),
            time_ms,
            event,
            prev_mac: hex::encode(prev),
            mac: hex::encode(mac),
            audit_key: with_key.then_some(self.key_hex.as_str()),
            master_key: with_key.then_some(self.identity.master_key.as_str()),
            instance_tag: with_key.then_some(self.instance_tag_hex.as_str()),
        };
        serde_json::to_writer(&mut *out, &line).expect("an audit row serializes");
        out.push(b'\n');
    }

    /// Whether the next pushed row must carry the key fields.
    pub(crate) fn needs_key(&self) -> bool {
        !lock(&self.pending).key_sent
    }

    /// Refuses a batch whose `bytes` of lines do not fit, naming the sink and what to do.
    pub(crate) fn check_room(&self, bytes: usize) -> Result<(), String> {
        let p = lock(&self.pending);
        let waiting = p.buf.len() + p.writing;
        if p.closed {
            return Err("the audit export has stopped (shutting down)".into());
        }
        if waiting == 0 || waiting + bytes <= self.capacity {
            return Ok(());
        }
        Err(format!(
            "audit export to {} is not keeping up: {waiting} bytes of audit lines wait to be \
             written (audit_export_buffer is {} bytes){}; requests are refused until the log \
             pipeline reads again",
            self.sink_name,
            self.capacity,
            p.error
                .as_ref()
                .map(|e| format!(", last write error: {e}"))
                .unwrap_or_default()
        ))
    }

    /// Hands committed lines (rows up to `last_seq`) to the thread. Call only after
    /// [`Exporter::check_room`] accepted them.
    pub(crate) fn push(&self, lines: &[u8], last_seq: u64) {
        if lines.is_empty() {
            return;
        }
        let mut p = lock(&self.pending);
        p.buf.extend_from_slice(lines);
        p.buf_seq = last_seq;
        p.key_sent = true;
        drop(p);
        self.wake.notify_one();
    }

    /// Writes the stop line after the rows up to `head`, then waits up to `grace` for every
    /// line to be written. False when lines were still waiting at the deadline (they will be
    /// written again by the next start from `audit.export.seq`).
    pub(crate) fn stop(&self, head: Position, grace: Duration) -> bool {
        let mut p = lock(&self.pending);
        if p.closed {
            return p.finished;
        }
        // A run that exported nothing has no key line; its stop line could not be checked.
        if p.key_sent {
            let tag = self.key.tag(
                STOP_DOMAIN,
                &[
                    self.identity.instance.as_bytes(),
                    &head.seq.to_be_bytes(),
                    &head.mac,
                ],
            );
            let line = StopLine {
                instance: self.identity.instance.clone(),
                export: "stop".into(),
                seq: head.seq,
                mac: hex::encode(&head.mac),
                tag: hex::encode(&tag),
            };
            serde_json::to_writer(&mut p.buf, &line).expect("a stop line serializes");
            p.buf.push(b'\n');
        }
        p.closed = true;
        self.wake.notify_one();
        let deadline = Instant::now() + grace;
        while !p.finished {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            p = self
                .drained
                .wait_timeout(p, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        true
    }

    /// Stops taking lines without a stop line and without waiting (the trail was dropped
    /// without [`Exporter::stop`]); what is buffered is still written.
    pub(crate) fn close(&self) {
        lock(&self.pending).closed = true;
        self.wake.notify_one();
    }

    /// What `status` shows.
    pub(crate) fn status(&self) -> serde_json::Value {
        let p = lock(&self.pending);
        serde_json::json!({
            "sink": self.sink_name,
            "written_seq": p.written_seq,
            "waiting_bytes": p.buf.len() + p.writing,
            "buffer_bytes": self.capacity,
            "error": p.error,
        })
    }

    /// The writing thread: takes what is buffered, writes all of it (retrying after errors,
    /// never skipping a byte), records the seq, repeats.
    fn run(self: Arc<Self>, mut sink: Sink, marker: File) {
        let mut chunk: Vec<u8> = Vec::new();
        loop {
            let seq = {
                let mut p = lock(&self.pending);
                p.writing = 0;
                while p.buf.is_empty() && !p.closed {
                    self.drained.notify_all();
                    p = self.wake.wait(p).unwrap_or_else(|e| e.into_inner());
                }
                if p.buf.is_empty() {
                    p.finished = true;
                    self.drained.notify_all();
                    return;
                }
                chunk.clear();
                std::mem::swap(&mut chunk, &mut p.buf);
                p.writing = chunk.len();
                p.buf_seq
            };
            let mut done = 0;
            let mut backoff = Duration::from_millis(10);
            while done < chunk.len() {
                match sink.write(&chunk[done..]) {
                    Ok(0) => {
                        self.note_error("the sink accepts no more bytes".into());
                        std::thread::sleep(backoff);
                        backoff = (backoff * 2).min(Duration::from_secs(1));
                    }
                    Ok(n) => {
                        done += n;
                        lock(&self.pending).writing = chunk.len() - done;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        self.note_error(e.to_string());
                        std::thread::sleep(backoff);
                        backoff = (backoff * 2).min(Duration::from_secs(1));
                    }
                }
            }
            let _ = marker.write_all_at(format!("{seq:020}\n").as_bytes(), 0);
            let mut p = lock(&self.pending);
            if p.error.take().is_some() {
                tracing::info!(sink = %self.sink_name, "audit export writes again");
            }
            p.written_seq = seq;
        }
    }

    fn note_error(&self, error: String) {
        let mut p = lock(&self.pending);
        if p.error.is_none() {
            tracing::error!(sink = %self.sink_name, "audit export cannot write: {error}");
        }
        p.error = Some(error);
    }
}

fn open_marker(state_dir: &Path) -> io::Result<File> {
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(state_dir.join(EXPORTED_FILE))
}

/// The last seq an earlier run wrote to the sink, or `None` when export never ran here.
pub(crate) fn exported_seq(state_dir: &Path) -> io::Result<Option<u64>> {
    match std::fs::read_to_string(state_dir.join(EXPORTED_FILE)) {
        Ok(text) => Ok(text.trim().parse().ok()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

// === verification of shipped lines ===

/// What [`verify_jsonl`] found for one instance.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct InstanceReport {
    /// The instance id.
    pub instance: String,
    /// Rows whose MAC was checked.
    pub rows_checked: u64,
    /// Exact repeats of a row already checked (at-least-once delivery), not counted above.
    pub duplicates: u64,
    /// Seq of the first row seen.
    pub first_seq: Option<u64>,
    /// Seq of the last row checked.
    pub last_seq: Option<u64>,
    /// The instance wrote a stop line after its last row (it stopped cleanly); when false,
    /// it may still be running, or the newest rows of the stream are missing.
    pub stopped: bool,
    /// The first problem: gap, edit, reorder, truncation, or a key that does not unwrap.
    pub problem: Option<String>,
    /// The seq the problem is at, when one row is to blame.
    pub first_bad_seq: Option<u64>,
}

/// The outcome of checking a file of shipped lines.
#[derive(Debug, Clone, Default, Serialize)]
pub struct JsonlReport {
    /// One report per instance, by instance id.
    pub instances: Vec<InstanceReport>,
    /// Lines that are not audit lines (other log output), skipped.
    pub other_lines: u64,
    /// A problem with the file itself (a damaged or cut line), with its line number.
    pub problem: Option<String>,
}

impl JsonlReport {
    /// True when every instance and the file verified.
    pub fn ok(&self) -> bool {
        self.problem.is_none() && self.instances.iter().all(|i| i.problem.is_none())
    }
}

/// Everything read for one instance, in file order.
#[derive(Default)]
struct Collected {
    rows: Vec<(usize, RowIn)>,
    stops: Vec<(usize, StopLine)>,
}

/// Unwraps a wrapped audit key found in the stream; the caller binds the master key.
pub type UnwrapKey<'a> = &'a dyn Fn(&[u8]) -> Option<crate::seal::Secret>;

/// Checks shipped audit lines from `input`: for each instance (or only `only`), its key line
/// must unwrap under the master key (`unwrap`) and carry a valid instance tag, and its rows,
/// in the order they appear, must form one unbroken chain: each row's MAC verifies over its
/// `prev_mac` and fields, each `prev_mac` is the previous row's MAC, seqs follow each other
/// without a gap, and a stop line's position is the row before it. Exact repeats of a row are
/// counted as duplicates. Lines that are not JSON objects (other log output) are skipped; a
/// text from the first `{` of a line is taken, so log prefixes such as the container runtime's
/// (`<time> stdout F `) are fine.
pub fn verify_jsonl(
    input: impl BufRead,
    unwrap: UnwrapKey<'_>,
    only: Option<&str>,
) -> io::Result<JsonlReport> {
    let mut report = JsonlReport::default();
    let mut by_instance: BTreeMap<String, Collected> = BTreeMap::new();
    let mut lines = input.lines().enumerate().peekable();
    while let Some((i, line)) = lines.next() {
        let line = line?;
        let number = i + 1;
        let Some(start) = line.find('{') else {
            report.other_lines += 1;
            continue;
        };
        let text = &line[start..];
        let value: serde_json::Value = match serde_json::from_str(text) {
            Ok(v) => v,
            Err(_) => {
                if report.problem.is_none() {
                    report.problem = Some(if lines.peek().is_none() {
                        format!("truncated: the last line ({number}) is cut off")
                    } else {
                        format!("line {number} is damaged (not valid JSON)")
                    });
                }
                continue;
            }
        };
        let Some(instance) = value.get("instance").and_then(|v| v.as_str()) else {
            report.other_lines += 1;
            continue;
        };
        if only.is_some_and(|o| o != instance) {
            continue;
        }
        let instance = instance.to_string();
        let entry = by_instance.entry(instance.clone()).or_default();
        if value.get("export").is_some() {
            match serde_json::from_value::<StopLine>(value) {
                Ok(stop) if stop.export == "stop" => entry.stops.push((number, stop)),
                _ => {
                    report.problem.get_or_insert(format!(
                        "line {number} of instance {instance} is not a valid stop line"
                    ));
                }
            }
            continue;
        }
        match serde_json::from_value::<RowIn>(value) {
            Ok(row) => entry.rows.push((number, row)),
            Err(e) => {
                report.problem.get_or_insert(format!(
                    "line {number} of instance {instance} is not a valid audit row ({e})"
                ));
            }
        }
    }
    for (instance, collected) in by_instance {
        report
            .instances
            .push(check_instance(&instance, collected, unwrap));
    }
    Ok(report)
}

fn mac_of(hex_text: &str) -> Option<[u8; MAC_LEN]> {
    hex::decode(hex_text).and_then(|b| b.try_into().ok())
}

fn check_instance(instance: &str, c: Collected, unwrap: UnwrapKey<'_>) -> InstanceReport {
    let mut r = InstanceReport {
        instance: instance.to_string(),
        ..Default::default()
    };
    let fail = |r: &mut InstanceReport, seq: Option<u64>, why: String| {
        if r.problem.is_none() {
            r.problem = Some(why);
            r.first_bad_seq = seq;
        }
    };
    // The key: every key line must unwrap to the same key and carry a valid instance tag.
    let mut key: Option<(MacKey, Vec<u8>)> = None;
    for (number, row) in &c.rows {
        let Some(wrapped_hex) = &row.audit_key else {
            continue;
        };
        let master = row.master_key.as_deref().unwrap_or("an unnamed master key");
        let Some(wrapped) = hex::decode(wrapped_hex) else {
            fail(
                &mut r,
                Some(row.seq),
                format!("line {number}: audit_key is not hex"),
            );
            return r;
        };
        let Some(secret) = unwrap(&wrapped) else {
            fail(
                &mut r,
                None,
                format!(
                    "the audit key on line {number} does not unwrap under this master key (it was \
                     wrapped by {master}); verify with the master key of that instance"
                ),
            );
            return r;
        };
        let candidate = MacKey::new(&secret);
        let tag_ok = row
            .instance_tag
            .as_deref()
            .and_then(mac_of)
            .is_some_and(|t| {
                chain::ct_eq(&candidate.tag(INSTANCE_DOMAIN, &[instance.as_bytes()]), &t)
            });
        if !tag_ok {
            fail(
                &mut r,
                Some(row.seq),
                format!(
                    "line {number}: the instance tag does not match instance {instance} (lines \
                     relabelled from another instance, or edited)"
                ),
            );
            return r;
        }
        match &key {
            None => key = Some((candidate, secret.expose_secret().to_vec())),
            Some((_, bytes)) if bytes.as_slice() == secret.expose_secret() => {}
            Some(_) => {
                fail(
                    &mut r,
                    Some(row.seq),
                    format!(
                        "line {number} carries another audit key than instance {instance}'s \
                         earlier lines (two trails under one instance id)"
                    ),
                );
                return r;
            }
        }
    }
    let Some((key, mut key_bytes)) = key else {
        fail(
            &mut r,
            None,
            format!(
                "no line carries the audit key of instance {instance} (it rides on the first \
                 row each start writes): the stream misses that line, so no row can be checked"
            ),
        );
        return r;
    };
    zeroize::Zeroize::zeroize(&mut key_bytes);

    let present: std::collections::HashSet<u64> = c.rows.iter().map(|(_, row)| row.seq).collect();
    let mut seen: HashMap<u64, [u8; MAC_LEN]> = HashMap::new();
    let mut head: Option<Position> = None;
    let mut stops = c.stops.iter().peekable();
    for (number, row) in &c.rows {
        // Stop lines that came before this row in the file close the run before it.
        while let Some((stop_line, stop)) = stops.peek() {
            if stop_line > number {
                break;
            }
            if let Err((seq, why)) = check_stop(&key, instance, stop, *stop_line, head) {
                fail(&mut r, seq, why);
                return r;
            }
            r.stopped = true;
            stops.next();
        }
        let (Some(prev), Some(mac)) = (mac_of(&row.prev_mac), mac_of(&row.mac)) else {
            fail(
                &mut r,
                Some(row.seq),
                format!("line {number}: row {} has a malformed MAC", row.seq),
            );
            return r;
        };
        let want = key.canonical_mac(&prev, &canonical(row.seq, row.time_ms, &row.event));
        if !chain::ct_eq(&want, &mac) {
            fail(
                &mut r,
                Some(row.seq),
                format!(
                    "edited: row {} (line {number}) fails its MAC, so its fields are not the ones \
                     committed",
                    row.seq
                ),
            );
            return r;
        }
        if let Some(earlier) = seen.get(&row.seq) {
            if chain::ct_eq(earlier, &mac) {
                r.duplicates += 1;
                continue;
            }
            fail(
                &mut r,
                Some(row.seq),
                format!(
                    "row {} (line {number}) appears twice with different content",
                    row.seq
                ),
            );
            return r;
        }
        match head {
            None => r.first_seq = Some(row.seq),
            Some(h) if row.seq == h.seq + 1 => {
                if !chain::ct_eq(&prev, &h.mac) {
                    fail(
                        &mut r,
                        Some(row.seq),
                        format!(
                            "edited: row {} (line {number}) does not chain from row {} (prev_mac \
                             differs)",
                            row.seq, h.seq
                        ),
                    );
                    return r;
                }
            }
            Some(h) if row.seq > h.seq + 1 => {
                let missing = h.seq + 1;
                let why = if present.contains(&missing) {
                    format!(
                        "reordered: row {} (line {number}) arrives before row {missing}",
                        row.seq
                    )
                } else {
                    format!(
                        "gap: rows {missing}..={} are missing before row {} (line {number})",
                        row.seq - 1,
                        row.seq
                    )
                };
                fail(&mut r, Some(missing), why);
                return r;
            }
            Some(h) => {
                fail(
                    &mut r,
                    Some(row.seq),
                    format!(
                        "reordered: row {} (line {number}) arrives after row {}",
                        row.seq, h.seq
                    ),
                );
                return r;
            }
        }
        r.stopped = false;
        r.rows_checked += 1;
        r.last_seq = Some(row.seq);
        seen.insert(row.seq, mac);
        head = Some(Position { seq: row.seq, mac });
    }
    for (stop_line, stop) in stops {
        if let Err((seq, why)) = check_stop(&key, instance, stop, *stop_line, head) {
            fail(&mut r, seq, why);
            return r;
        }
        r.stopped = true;
    }
    r
}

/// A stop line must be authentic and sit right after the row it names.
fn check_stop(
    key: &MacKey,
    instance: &str,
    stop: &StopLine,
    line: usize,
    head: Option<Position>,
) -> Result<(), (Option<u64>, String)> {
    let mac = mac_of(&stop.mac);
    let tag = mac_of(&stop.tag);
    let authentic = match (mac, tag) {
        (Some(mac), Some(tag)) => chain::ct_eq(
            &key.tag(
                STOP_DOMAIN,
                &[instance.as_bytes(), &stop.seq.to_be_bytes(), &mac],
            ),
            &tag,
        ),
        _ => false,
    };
    if !authentic {
        return Err((
            None,
            format!("edited: the stop line on line {line} fails its MAC"),
        ));
    }
    match head {
        Some(h) if h.seq == stop.seq && mac == Some(h.mac) => Ok(()),
        Some(h) if h.seq < stop.seq => Err((
            Some(h.seq + 1),
            format!(
                "truncated: the instance stopped after row {} (line {line}) but its rows end at {}",
                stop.seq, h.seq
            ),
        )),
        None if stop.seq > 0 => Err((
            None,
            format!(
                "truncated: the instance stopped after row {} (line {line}) but none of its rows \
                 came before",
                stop.seq
            ),
        )),
        _ => Err((
            None,
            format!(
                "reordered: the stop line on line {line} (after row {}) does not follow that row",
                stop.seq
            ),
        )),
    }
}

/// How the stream names a master key: its provider and identity (a key file's path, an HSM key
/// label, a KMS key ARN), never key bytes.
pub fn master_identity(master: &crate::seal::MasterKeyProvider) -> String {
    format!("{} {}", master.provider(), master.identity())
}

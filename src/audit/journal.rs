//! The commit journal: where an audit row becomes durable on a request's path. A commit appends
//! its rows, already sequenced and MACed, to a segment file with one `write` (plus `fdatasync`
//! with `audit_sync = "full"`); the maintenance thread folds them into `audit.db` in large
//! transactions a few times a second and then deletes the segment. A row is therefore always
//! in a segment, in the database, or in both, and `open` replays whatever a crash left behind.
//!
//! Segments are `audit.journal.<first seq, 20 digits>`, so name order is seq order. A record is
//! `u32 big-endian length ‖ canonical row (event.rs) ‖ MAC`: the same bytes the chain MAC
//! covers, so nothing is encoded twice and a record checks itself against the chain.

use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use super::chain::MAC_LEN;
use super::db::RawRow;
use super::event::decode_canonical;

/// Segment file names start with this.
pub(crate) const PREFIX: &str = "audit.journal.";

/// Appends one record for a row whose canonical bytes and MAC are given.
pub(crate) fn encode(out: &mut Vec<u8>, canonical: &[u8], mac: &[u8; MAC_LEN]) {
    out.extend_from_slice(&(canonical.len() as u32).to_be_bytes());
    out.extend_from_slice(canonical);
    out.extend_from_slice(mac);
}

/// The segment being appended to.
pub(crate) struct Segment {
    file: File,
    path: PathBuf,
    /// Bytes of whole records written so far.
    len: u64,
}

impl Segment {
    /// The segment file for rows starting at `first_seq`.
    pub(crate) fn path_for(dir: &Path, first_seq: u64) -> PathBuf {
        dir.join(format!("{PREFIX}{first_seq:020}"))
    }

    /// Creates a new segment (0600) for rows starting at `first_seq`; never reopens an old
    /// one. With `durable` the directory entry is synced too, so the file itself survives a
    /// power loss along with the records later synced into it.
    pub(crate) fn create(dir: &Path, first_seq: u64, durable: bool) -> io::Result<Segment> {
        let path = Segment::path_for(dir, first_seq);
        let file = fs::OpenOptions::new()
            .append(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)?;
        if durable {
            File::open(dir)?.sync_all()?;
        }
        Ok(Segment { file, path, len: 0 })
    }

    /// Gives the segment up after a failed append. An empty one is removed, so the next
    /// batch (which reuses its first seq) can create it again; one holding records is
    /// returned, to be deleted once those records are folded.
    pub(crate) fn abandon(self) -> Option<PathBuf> {
        if self.len == 0 && fs::remove_file(&self.path).is_ok() {
            return None;
        }
        Some(self.path)
    }

    /// Writes `records` in one call; `durable` waits for the disk. On failure the file is cut
    /// back to its last whole record, so a partial write never sits in front of the next one.
    pub(crate) fn append(&mut self, records: &[u8], durable: bool) -> io::Result<()> {
        let written = (&self.file).write_all(records).and_then(|()| {
            if durable {
                self.file.sync_data()
            } else {
                Ok(())
            }
        });
        match written {
            Ok(()) => {
                self.len += records.len() as u64;
                Ok(())
            }
            Err(e) => {
                let _ = self.file.set_len(self.len);
                Err(e)
            }
        }
    }

    /// The segment's file.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }
}

/// Every segment file in `dir`, oldest first.
pub(crate) fn segments(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut found = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if let Some(digits) = name.strip_prefix(PREFIX)
            && !digits.is_empty()
            && digits.bytes().all(|b| b.is_ascii_digit())
        {
            found.push(entry.path());
        }
    }
    found.sort();
    Ok(found)
}

/// The rows recorded in `paths`, sorted by seq. A record cut short at the end of a segment
/// (the process or the disk stopped mid-write; its commit was never confirmed) ends that
/// segment. A segment that vanished meanwhile was folded and deleted, so it is skipped. A
/// whole record that does not decode is damage and is returned as `Err` naming the file.
pub(crate) fn read(paths: &[PathBuf]) -> io::Result<Result<Vec<RawRow>, String>> {
    let mut rows = Vec::new();
    for path in paths {
        let bytes = match fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        let mut rest = &bytes[..];
        while rest.len() >= 4 {
            let len = u32::from_be_bytes(rest[..4].try_into().expect("4 bytes")) as usize;
            let Some(record) = rest.get(4..4 + len + MAC_LEN) else {
                break;
            };
            let (canonical, mac) = record.split_at(len);
            let Some((seq, time_ms, event)) = decode_canonical(canonical) else {
                return Ok(Err(format!(
                    "{} holds a record that is not an audit row at byte {}",
                    path.display(),
                    bytes.len() - rest.len()
                )));
            };
            rows.push(RawRow {
                seq: seq.min(i64::MAX as u64) as i64,
                time_ms,
                event,
                mac: mac.to_vec(),
            });
            rest = &rest[4 + len + MAC_LEN..];
        }
    }
    rows.sort_by_key(|r| r.seq);
    Ok(Ok(rows))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::event::{Event, EventKind, canonical};

    fn record(seq: u64) -> Vec<u8> {
        let e = Event {
            tenant: Some(format!("t{seq}")),
            ..Event::new(EventKind::RequestResolved)
        };
        let mut out = Vec::new();
        encode(&mut out, &canonical(seq, 5, &e), &[seq as u8; MAC_LEN]);
        out
    }

    #[test]
    fn segments_read_back_in_seq_order_and_a_torn_tail_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let mut late = Segment::create(dir.path(), 3, false).unwrap();
        late.append(&[record(3), record(4)].concat(), false)
            .unwrap();
        let mut early = Segment::create(dir.path(), 1, false).unwrap();
        early
            .append(&[record(1), record(2)].concat(), true)
            .unwrap();
        // A crash mid-write leaves part of a record at the end of the newest segment.
        let torn = record(5);
        (&late.file).write_all(&torn[..torn.len() - 3]).unwrap();
        fs::write(dir.path().join("audit.journal.x"), b"not a segment").unwrap();

        let paths = segments(dir.path()).unwrap();
        assert_eq!(paths.len(), 2);
        let rows = read(&paths).unwrap().unwrap();
        let seqs: Vec<i64> = rows.iter().map(|r| r.seq).collect();
        assert_eq!(seqs, [1, 2, 3, 4]);
        assert_eq!(rows[2].event.tenant.as_deref(), Some("t3"));
        assert_eq!(rows[3].mac, vec![4u8; MAC_LEN]);
    }

    #[test]
    fn a_segment_folded_away_meanwhile_is_skipped_and_any_other_read_failure_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let mut seg = Segment::create(dir.path(), 2, false).unwrap();
        seg.append(&record(2), false).unwrap();
        let gone = Segment::path_for(dir.path(), 1);
        let rows = read(&[gone, Segment::path_for(dir.path(), 2)])
            .unwrap()
            .unwrap();
        assert_eq!(rows.iter().map(|r| r.seq).collect::<Vec<_>>(), [2]);
        // A path that exists but cannot be read is not "folded away": the rows behind it
        // must not be silently passed over.
        let unreadable = dir.path().join("audit.journal.00000000000000000009");
        fs::create_dir(&unreadable).unwrap();
        assert!(read(&[unreadable]).is_err());
    }

    #[test]
    fn a_whole_record_that_is_not_a_row_is_damage() {
        let dir = tempfile::tempdir().unwrap();
        let mut seg = Segment::create(dir.path(), 1, false).unwrap();
        let mut bad = record(1);
        bad[10] ^= 0xff; // inside the domain tag
        seg.append(&bad, false).unwrap();
        let err = read(&segments(dir.path()).unwrap()).unwrap().unwrap_err();
        assert!(err.contains("audit.journal.00000000000000000001"), "{err}");
        assert!(err.contains("byte 0"), "{err}");
    }

    #[test]
    fn a_segment_is_never_reopened_and_an_empty_abandoned_one_frees_its_name() {
        let dir = tempfile::tempdir().unwrap();
        let seg = Segment::create(dir.path(), 7, true).unwrap();
        // Appending to an old file with stale records would put two rows with one seq side
        // by side; creating the same segment again is refused instead.
        assert!(Segment::create(dir.path(), 7, false).is_err());
        assert_eq!(seg.abandon(), None);
        let mut again = Segment::create(dir.path(), 7, false).unwrap();
        again.append(&record(7), false).unwrap();
        // One holding records is kept until they are folded.
        assert_eq!(again.abandon(), Some(Segment::path_for(dir.path(), 7)));
        assert_eq!(segments(dir.path()).unwrap().len(), 1);
    }
}

//! The MAC chain: the audit key, per-row MACs, the head anchor file and the retention
//! checkpoint. Pure computation plus the one small file outside the database.

use std::fs;
use std::path::Path;

use ring::hmac;

use super::event::{Event, canonical};
use crate::hex;
use crate::seal::Secret;

/// Length of every MAC in the chain.
pub(crate) const MAC_LEN: usize = 32;
/// `prev_mac` of row 1: a fixed zero block. The chain is already bound to its store by the
/// store's own random audit key, so a random genesis would add nothing.
pub(crate) const GENESIS: [u8; MAC_LEN] = [0; MAC_LEN];

/// The audit MAC key, built once from the unwrapped `Secret`.
pub(crate) struct MacKey(hmac::Key);

impl MacKey {
    pub(crate) fn new(secret: &Secret) -> MacKey {
        MacKey(hmac::Key::new(hmac::HMAC_SHA256, secret.expose_secret()))
    }

    /// `HMAC(key, prev_mac ‖ canonical row)`.
    pub(crate) fn row_mac(
        &self,
        prev: &[u8; MAC_LEN],
        seq: u64,
        time_ms: i64,
        e: &Event,
    ) -> [u8; MAC_LEN] {
        self.canonical_mac(prev, &canonical(seq, time_ms, e))
    }

    /// [`MacKey::row_mac`] over canonical bytes already encoded.
    pub(crate) fn canonical_mac(&self, prev: &[u8; MAC_LEN], canonical: &[u8]) -> [u8; MAC_LEN] {
        let mut ctx = hmac::Context::with_key(&self.0);
        ctx.update(prev);
        ctx.update(canonical);
        to_mac(ctx.sign().as_ref())
    }

    /// Tag over length-prefixed `parts` under the domain `keyward/<domain>/v1`, for records
    /// outside the chain that must not be forged or moved (the shipped stream's key and stop
    /// lines, `export.rs`).
    pub(crate) fn tag(&self, domain: &str, parts: &[&[u8]]) -> [u8; MAC_LEN] {
        let mut ctx = hmac::Context::with_key(&self.0);
        ctx.update(format!("keyward/{domain}/v1").as_bytes());
        for part in parts {
            ctx.update(&(part.len() as u32).to_be_bytes());
            ctx.update(part);
        }
        to_mac(ctx.sign().as_ref())
    }

    /// Tag over a (seq, mac) position, domain-separated by `what` so an anchor cannot be
    /// passed off as a checkpoint or the reverse.
    fn position_tag(&self, what: &[u8], pos: &Position) -> [u8; MAC_LEN] {
        let mut ctx = hmac::Context::with_key(&self.0);
        ctx.update(b"keyward/audit-");
        ctx.update(what);
        ctx.update(b"/v1");
        ctx.update(&pos.seq.to_be_bytes());
        ctx.update(&pos.mac);
        to_mac(ctx.sign().as_ref())
    }
}

fn to_mac(b: &[u8]) -> [u8; MAC_LEN] {
    let mut m = [0; MAC_LEN];
    m.copy_from_slice(b);
    m
}

/// A point in the chain: the last row's seq and MAC (seq 0 + genesis for an empty chain).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Position {
    pub seq: u64,
    pub mac: [u8; MAC_LEN],
}

impl Position {
    pub(crate) const START: Position = Position {
        seq: 0,
        mac: GENESIS,
    };
}

// === checkpoint (stored in the audit db's meta table) ===

/// Encodes the retention checkpoint: `seq (8) ‖ mac (32) ‖ tag (32)`.
pub(crate) fn encode_checkpoint(key: &MacKey, pos: &Position) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + 2 * MAC_LEN);
    out.extend_from_slice(&pos.seq.to_be_bytes());
    out.extend_from_slice(&pos.mac);
    out.extend_from_slice(&key.position_tag(b"checkpoint", pos));
    out
}

/// Decodes and authenticates a checkpoint; `None` when it is malformed or forged.
pub(crate) fn decode_checkpoint(key: &MacKey, blob: &[u8]) -> Option<Position> {
    if blob.len() != 8 + 2 * MAC_LEN {
        return None;
    }
    let pos = Position {
        seq: u64::from_be_bytes(blob[..8].try_into().ok()?),
        mac: to_mac(&blob[8..8 + MAC_LEN]),
    };
    let tag = &blob[8 + MAC_LEN..];
    ct_eq(&key.position_tag(b"checkpoint", &pos), tag).then_some(pos)
}

// === head anchor (a file beside audit.db) ===

/// The anchor file's name inside the state directory.
pub(crate) const HEAD_FILE: &str = "audit.head";

/// What the anchor file says, before and after authentication.
pub(crate) enum Anchor {
    /// No anchor file.
    Missing,
    /// Present but unreadable or its tag does not verify.
    Invalid(String),
    /// An authentic position.
    At(Position),
}

/// The anchor record is padded to this size and rewritten in place at offset 0: one small
/// write, no create/rename per batch (that metadata churn dominated commit latency). A write
/// this small within one page is not torn by a process crash; a power loss with
/// `audit_sync = "normal"` can lose or tear it, which `open` then reports (see the module doc).
const SLOT: usize = 256;

/// Reads `<dir>/audit.head`.
pub(crate) fn read_anchor(key: &MacKey, dir: &Path) -> std::io::Result<Anchor> {
    let bytes = match fs::read(dir.join(HEAD_FILE)) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Anchor::Missing),
        Err(e) => return Err(e),
    };
    let text = String::from_utf8_lossy(&bytes);
    Ok(match parse_slot(key, text.trim_end_matches([' ', '\n'])) {
        Ok(pos) => Anchor::At(pos),
        Err(why) => Anchor::Invalid(why),
    })
}

fn parse_slot(key: &MacKey, text: &str) -> Result<Position, String> {
    let mut lines = text.lines();
    if lines.next() != Some("keyward-audit-head v1") {
        return Err("unknown header line".into());
    }
    let (mut seq, mut mac, mut tag) = (None, None, None);
    for line in lines {
        match line.split_once('=') {
            Some(("seq", v)) => seq = v.parse::<u64>().ok(),
            Some(("mac", v)) => mac = hex::decode(v).filter(|m| m.len() == MAC_LEN),
            Some(("tag", v)) => tag = hex::decode(v).filter(|m| m.len() == MAC_LEN),
            _ => {}
        }
    }
    let (Some(seq), Some(mac), Some(tag)) = (seq, mac, tag) else {
        return Err("missing or malformed seq/mac/tag".into());
    };
    let pos = Position {
        seq,
        mac: to_mac(&mac),
    };
    if !ct_eq(&key.position_tag(b"head", &pos), &tag) {
        return Err("its MAC does not verify (edited, or from another store)".into());
    }
    Ok(pos)
}

/// Opens (creating, 0600) `<dir>/audit.head` for in-place anchor writes.
pub(crate) fn open_anchor(dir: &Path) -> std::io::Result<fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(dir.join(HEAD_FILE))
}

/// Writes the anchor for `pos` at offset 0 of `<dir>/audit.head`, in place; with `durable` the
/// data is fsynced so the anchor survives power loss along with the rows.
pub(crate) fn write_anchor(
    key: &MacKey,
    dir: &Path,
    pos: &Position,
    durable: bool,
) -> std::io::Result<()> {
    write_anchor_to(&open_anchor(dir)?, key, pos, durable)
}

/// [`write_anchor`] into an already open anchor file (the writer keeps it open).
pub(crate) fn write_anchor_to(
    file: &fs::File,
    key: &MacKey,
    pos: &Position,
    durable: bool,
) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    file.write_all_at(&anchor_slot(key, pos), 0)?;
    if durable {
        file.sync_data()?;
    }
    Ok(())
}

/// The anchor record for `pos`: `keyward-audit-head v1\nseq=<seq>\nmac=<hex>\ntag=<hex>\n`,
/// padded with spaces to [`SLOT`] bytes, the last of which is a newline. Written straight into
/// the slot (it is rewritten after every journaled batch, so no formatting machinery or
/// temporary strings).
fn anchor_slot(key: &MacKey, pos: &Position) -> [u8; SLOT] {
    let mut slot = [b' '; SLOT];
    let mut at = 0;
    let mut put = |bytes: &[u8]| {
        slot[at..at + bytes.len()].copy_from_slice(bytes);
        at += bytes.len();
    };
    put(b"keyward-audit-head v1\nseq=");
    let mut digits = [0u8; 20];
    let mut start = digits.len();
    let mut n = pos.seq;
    loop {
        start -= 1;
        digits[start] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    put(&digits[start..]);
    let mut hex = [0u8; 2 * MAC_LEN];
    put(b"\nmac=");
    hex::encode_to_slice(&mut hex, &pos.mac);
    put(&hex);
    put(b"\ntag=");
    hex::encode_to_slice(&mut hex, &key.position_tag(b"head", pos));
    put(&hex);
    put(b"\n");
    slot[SLOT - 1] = b'\n';
    slot
}

/// Equality that takes the same time wherever the first difference is.
pub(crate) fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoint_round_trips_and_rejects_forgery() {
        let key = MacKey::new(&Secret::random(32));
        let pos = Position {
            seq: 42,
            mac: [7; MAC_LEN],
        };
        let blob = encode_checkpoint(&key, &pos);
        assert_eq!(decode_checkpoint(&key, &blob), Some(pos));
        let mut moved = blob.clone();
        moved[7] = 43;
        assert_eq!(decode_checkpoint(&key, &moved), None);
        let other = MacKey::new(&Secret::random(32));
        assert_eq!(decode_checkpoint(&other, &blob), None);
    }

    #[test]
    fn an_anchor_that_cannot_be_read_is_an_error_not_a_missing_anchor() {
        // Only a file that is not there is "missing" (verification then says truncation
        // cannot be ruled out); any other read failure is reported as itself.
        let dir = tempfile::tempdir().unwrap();
        let key = MacKey::new(&Secret::random(32));
        fs::create_dir(dir.path().join(HEAD_FILE)).unwrap();
        assert!(read_anchor(&key, dir.path()).is_err());
    }

    #[test]
    fn tags_bind_the_key_the_domain_and_each_part() {
        let key = MacKey::new(&Secret::random(32));
        let tag = key.tag("audit-key", &[b"i-1", b"abc"]);
        assert_eq!(tag, key.tag("audit-key", &[b"i-1", b"abc"]));
        let others = [
            MacKey::new(&Secret::random(32)).tag("audit-key", &[b"i-1", b"abc"]),
            key.tag("audit-stop", &[b"i-1", b"abc"]),
            key.tag("audit-key", &[b"i-2", b"abc"]),
            // Parts are length-prefixed: moving a byte across a boundary is another tag.
            key.tag("audit-key", &[b"i-1a", b"bc"]),
            key.tag("audit-key", &[b"i-1", b"abc", b""]),
        ];
        for (i, other) in others.iter().enumerate() {
            assert_ne!(&tag, other, "variant {i}");
        }
    }

    #[test]
    fn row_macs_bind_the_previous_mac_and_the_row() {
        let key = MacKey::new(&Secret::random(32));
        let mac = key.canonical_mac(&GENESIS, b"row 1");
        assert_eq!(mac, key.canonical_mac(&GENESIS, b"row 1"));
        assert_ne!(mac, key.canonical_mac(&[1; MAC_LEN], b"row 1"));
        assert_ne!(mac, key.canonical_mac(&GENESIS, b"row 2"));
        let other = MacKey::new(&Secret::random(32));
        assert_ne!(mac, other.canonical_mac(&GENESIS, b"row 1"));
        // The MAC is the HMAC output itself, not a constant or a truncated copy.
        assert_ne!(mac, [0; MAC_LEN]);
        assert_ne!(mac, [1; MAC_LEN]);
        // A row's MAC covers its canonical encoding: seq, time and every field.
        let e = Event::new(crate::audit::EventKind::RequestResolved);
        let row = key.row_mac(&GENESIS, 1, 1_700_000_000_000, &e);
        assert_eq!(
            row,
            key.canonical_mac(&GENESIS, &canonical(1, 1_700_000_000_000, &e))
        );
        assert_ne!(row, key.row_mac(&GENESIS, 2, 1_700_000_000_000, &e));
        assert_ne!(row, key.row_mac(&GENESIS, 1, 1_700_000_000_001, &e));
    }

    #[test]
    fn ct_eq_needs_equal_lengths_and_every_byte_equal() {
        assert!(ct_eq(b"", b""));
        assert!(ct_eq(&[1, 2, 3], &[1, 2, 3]));
        // A prefix is not equal, whichever side is shorter.
        assert!(!ct_eq(&[1, 2], &[1, 2, 3]));
        assert!(!ct_eq(&[1, 2, 3], &[1, 2]));
        assert!(!ct_eq(&[1, 2, 3], &[1, 2, 4]));
        // Two differences that cancel out when combined with XOR instead of OR.
        assert!(!ct_eq(&[1, 1], &[0, 0]));
    }

    #[test]
    fn anchor_slot_is_the_documented_text() {
        let key = MacKey::new(&Secret::random(32));
        for (seq, mac) in [
            (0, [0; MAC_LEN]),
            (9, [3; MAC_LEN]),
            (u64::MAX, [0xa7; MAC_LEN]),
        ] {
            let pos = Position { seq, mac };
            let text = format!(
                "keyward-audit-head v1\nseq={seq}\nmac={}\ntag={}\n",
                hex::encode(&mac),
                hex::encode(&key.position_tag(b"head", &pos))
            );
            let mut want = [b' '; SLOT];
            want[..text.len()].copy_from_slice(text.as_bytes());
            want[SLOT - 1] = b'\n';
            assert_eq!(anchor_slot(&key, &pos), want, "seq {seq}");
            let read = String::from_utf8(want.to_vec()).unwrap();
            assert_eq!(
                parse_slot(&key, read.trim_end_matches([' ', '\n'])),
                Ok(pos)
            );
        }
    }

    #[test]
    fn anchor_round_trips_and_rejects_edits() {
        let dir = tempfile::tempdir().unwrap();
        let key = MacKey::new(&Secret::random(32));
        assert!(matches!(
            read_anchor(&key, dir.path()).unwrap(),
            Anchor::Missing
        ));
        let pos = Position {
            seq: 9,
            mac: [3; MAC_LEN],
        };
        write_anchor(&key, dir.path(), &pos, true).unwrap();
        assert!(matches!(read_anchor(&key, dir.path()).unwrap(), Anchor::At(p) if p == pos));
        let path = dir.path().join(HEAD_FILE);
        let text = fs::read_to_string(&path).unwrap();
        fs::write(&path, text.replace("seq=9", "seq=8")).unwrap();
        assert!(matches!(
            read_anchor(&key, dir.path()).unwrap(),
            Anchor::Invalid(_)
        ));
    }
}

//! What an audit row holds: the event kinds, the optional fields, the stored row, and the one
//! canonical byte encoding the chain MAC is computed over.
//!
//! Every field is an identifier, a number or a short reason; there is no field for a header
//! value, a token, a body or a secret, and free text is clamped so a payload cannot be parked
//! in it.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Longest identifier-like field kept (bytes); longer values are cut, since no legitimate id,
/// model name or target is this long and a body must not fit.
pub const MAX_FIELD_LEN: usize = 256;
/// Longest `detail` kept (bytes).
pub const MAX_DETAIL_LEN: usize = 512;

/// What happened. The string forms are the `event` column and the `--event` filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub enum EventKind {
    /// A tenant was added.
    #[serde(rename = "tenant.created")]
    TenantCreated,
    /// A tenant's policy changed.
    #[serde(rename = "tenant.updated")]
    TenantUpdated,
    /// A client (token) was issued.
    #[serde(rename = "client.created")]
    ClientCreated,
    /// A client was revoked.
    #[serde(rename = "client.revoked")]
    ClientRevoked,
    /// A credential was added.
    #[serde(rename = "credential.created")]
    CredentialCreated,
    /// A credential got a new version.
    #[serde(rename = "credential.rotated")]
    CredentialRotated,
    /// A credential (or one version) was revoked.
    #[serde(rename = "credential.revoked")]
    CredentialRevoked,
    /// An old version left its overlap window.
    #[serde(rename = "credential.retired")]
    CredentialRetired,
    /// A credential was deleted and its data keys destroyed.
    #[serde(rename = "credential.deleted")]
    CredentialDeleted,
    /// A credential was taken out of its pool (e.g. repeated 401s).
    #[serde(rename = "credential.quarantined")]
    CredentialQuarantined,
    /// A request was bound to a credential; committed before the upstream call.
    #[serde(rename = "request.resolved")]
    RequestResolved,
    /// A request finished (status, latency, bytes, usage).
    #[serde(rename = "request.completed")]
    RequestCompleted,
    /// A request was refused before any upstream call.
    #[serde(rename = "request.denied")]
    RequestDenied,
    /// A request moved from one pool key to another.
    #[serde(rename = "request.failover")]
    RequestFailover,
    /// Every key the master key wraps was rewrapped under a new master key (migration).
    #[serde(rename = "master.rewrapped")]
    MasterRewrapped,
    /// A budget was created or changed (`keyward budget set`).
    #[serde(rename = "budget.set")]
    BudgetSet,
    /// A budget was deleted.
    #[serde(rename = "budget.deleted")]
    BudgetDeleted,
    /// A budget's spend crossed one of its alert thresholds (once per threshold and period).
    #[serde(rename = "budget.threshold")]
    BudgetThreshold,
    /// A rate limit was created or changed (`keyward limit set`).
    #[serde(rename = "limit.set")]
    LimitSet,
    /// A rate limit was deleted.
    #[serde(rename = "limit.deleted")]
    LimitDeleted,
}

impl EventKind {
    /// Every kind, in declaration order.
    pub const ALL: [EventKind; 20] = [
        EventKind::TenantCreated,
        EventKind::TenantUpdated,
        EventKind::ClientCreated,
        EventKind::ClientRevoked,
        EventKind::CredentialCreated,
        EventKind::CredentialRotated,
        EventKind::CredentialRevoked,
        EventKind::CredentialRetired,
        EventKind::CredentialDeleted,
        EventKind::CredentialQuarantined,
        EventKind::RequestResolved,
        EventKind::RequestCompleted,
        EventKind::RequestDenied,
        EventKind::RequestFailover,
        EventKind::MasterRewrapped,
        EventKind::BudgetSet,
        EventKind::BudgetDeleted,
        EventKind::BudgetThreshold,
        EventKind::LimitSet,
        EventKind::LimitDeleted,
    ];

    /// The dotted name stored in the database (`request.resolved`).
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::TenantCreated => "tenant.created",
            EventKind::TenantUpdated => "tenant.updated",
            EventKind::ClientCreated => "client.created",
            EventKind::ClientRevoked => "client.revoked",
            EventKind::CredentialCreated => "credential.created",
            EventKind::CredentialRotated => "credential.rotated",
            EventKind::CredentialRevoked => "credential.revoked",
            EventKind::CredentialRetired => "credential.retired",
            EventKind::CredentialDeleted => "credential.deleted",
            EventKind::CredentialQuarantined => "credential.quarantined",
            EventKind::RequestResolved => "request.resolved",
            EventKind::RequestCompleted => "request.completed",
            EventKind::RequestDenied => "request.denied",
            EventKind::RequestFailover => "request.failover",
            EventKind::MasterRewrapped => "master.rewrapped",
            EventKind::BudgetSet => "budget.set",
            EventKind::BudgetDeleted => "budget.deleted",
            EventKind::BudgetThreshold => "budget.threshold",
            EventKind::LimitSet => "limit.set",
            EventKind::LimitDeleted => "limit.deleted",
        }
    }
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An unknown event name (e.g. from `--event`).
#[derive(Debug, thiserror::Error)]
#[error(
    "unknown audit event `{0}`; expected one of: {list}",
    list = EventKind::ALL.map(EventKind::as_str).join(", ")
)]
pub struct UnknownEventKind(pub String);

impl FromStr for EventKind {
    type Err = UnknownEventKind;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        EventKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| UnknownEventKind(s.to_owned()))
    }
}

/// One event to record. Build with `Event { tenant: Some(..), ..Event::new(kind) }`; the writer
/// sets the sequence number and the time. Also part of the admin API's row type ([`Row`]), so
/// its field docs are the API's descriptions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[schema(
    as = AuditEvent,
    description = "An audit event and its fields (absent fields are omitted)."
)]
pub struct Event {
    /// The event, e.g. `credential.created`, `request.completed`.
    #[serde(rename = "event")]
    #[schema(value_type = String)]
    pub kind: EventKind,
    /// The request's call id (also returned to the app).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub call_id: Option<String>,
    /// Tenant name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// Client id (never its token).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    /// Peer uid from the socket's credentials.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_uid: Option<u32>,
    /// Peer pid from the socket's credentials.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_pid: Option<u32>,
    /// Target name (`openai`, `anthropic`, a custom target).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// Model the request asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Capability (`chat`, `embeddings`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capability: Option<String>,
    /// Team of the client.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub team: Option<String>,
    /// Workflow named by the request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workflow: Option<String>,
    /// Credential id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential_id: Option<String>,
    /// Credential version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential_version: Option<u32>,
    /// Request fingerprint: lowercase hex HMAC-SHA256 of the body under the tenant's
    /// fingerprint key (`keyward audit search`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
    /// HTTP status the upstream answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream_status: Option<u16>,
    /// Time from accept to the end of the response, milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<u64>,
    /// Request body bytes sent upstream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_in: Option<u64>,
    /// Response body bytes returned to the app.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_out: Option<u64>,
    /// Every prompt token the provider reported, cached or not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_tokens: Option<u64>,
    /// Completion tokens the provider reported, reasoning tokens included.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_tokens: Option<u64>,
    /// Total tokens the provider reported (or input + output).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_tokens: Option<u64>,
    /// Short reason, e.g. a denial code or `from cred_x/v1 to cred_y/v2: 429`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// Markers such as `expired_key_warn` (lowercase letters, digits, `_`, `.`, `-`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub flags: Vec<String>,
    /// The part of `input_tokens` read from the provider's prompt cache.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cached_input_tokens: Option<u64>,
    /// The part of `input_tokens` written to the provider's prompt cache.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_write_tokens: Option<u64>,
    /// What the call cost at the configured prices, in micro-USD (1 USD = 1,000,000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost_micros: Option<u64>,
}

impl Event {
    /// An event of `kind` with every field empty.
    pub fn new(kind: EventKind) -> Event {
        Event {
            kind,
            call_id: None,
            tenant: None,
            client_id: None,
            peer_uid: None,
            peer_pid: None,
            target: None,
            model: None,
            capability: None,
            team: None,
            workflow: None,
            credential_id: None,
            credential_version: None,
            fingerprint: None,
            upstream_status: None,
            latency_ms: None,
            bytes_in: None,
            bytes_out: None,
            input_tokens: None,
            output_tokens: None,
            total_tokens: None,
            detail: None,
            flags: Vec::new(),
            cached_input_tokens: None,
            cache_write_tokens: None,
            cost_micros: None,
        }
    }

    /// Brings the event into the shape that is stored: strings clamped, numbers that SQLite
    /// cannot hold clamped, flags checked. Fails only on a malformed fingerprint, which would
    /// mean a caller put something other than a digest there.
    pub(crate) fn sanitize(&mut self) -> Result<(), String> {
        for s in [
            &mut self.call_id,
            &mut self.tenant,
            &mut self.client_id,
            &mut self.target,
            &mut self.model,
            &mut self.capability,
            &mut self.team,
            &mut self.workflow,
            &mut self.credential_id,
        ]
        .into_iter()
        .flatten()
        {
            clamp(s, MAX_FIELD_LEN);
        }
        if let Some(d) = &mut self.detail {
            clamp(d, MAX_DETAIL_LEN);
        }
        for n in [
            &mut self.latency_ms,
            &mut self.bytes_in,
            &mut self.bytes_out,
            &mut self.input_tokens,
            &mut self.output_tokens,
            &mut self.total_tokens,
            &mut self.cached_input_tokens,
            &mut self.cache_write_tokens,
            &mut self.cost_micros,
        ]
        .into_iter()
        .flatten()
        {
            *n = (*n).min(i64::MAX as u64);
        }
        if let Some(fp) = &self.fingerprint
            && !(fp.len() == 64 && fp.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
        {
            return Err(
                "fingerprint must be the 64-character lowercase hex digest from audit::fingerprint"
                    .into(),
            );
        }
        for flag in &self.flags {
            let ok = !flag.is_empty()
                && flag.len() <= 64
                && flag.bytes().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'.' | b'-')
                });
            if !ok {
                return Err(format!(
                    "flag {:?} must be 1-64 of [a-z0-9_.-]",
                    flag.chars().take(16).collect::<String>()
                ));
            }
        }
        Ok(())
    }

    /// Flags as stored: comma-joined, or NULL when there are none.
    pub(crate) fn flags_column(&self) -> Option<String> {
        (!self.flags.is_empty()).then(|| self.flags.join(","))
    }
}

/// Cuts `s` to at most `max` bytes on a char boundary and replaces control characters, so a
/// stored value prints on one line.
fn clamp(s: &mut String, max: usize) {
    if s.len() > max {
        let mut end = max - '…'.len_utf8();
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push('…');
    }
    // Printable ASCII (the usual case) needs no char decoding to be known clean.
    if !s.bytes().all(|b| (0x20..0x7f).contains(&b)) && s.chars().any(char::is_control) {
        *s = s
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect();
    }
}

/// One stored audit row (README, "Audit"), as `query`, `lifecycle`, the admin API and the
/// CLI's `--json` present it: its place in the chain, its time, the event and its fields
/// (absent fields are omitted), and the chain MAC.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[schema(
    as = AuditRow,
    description = "One audit row (README, \"Audit\"): its place in the chain, its time, the \
                   event and its fields (absent fields are omitted), and the chain MAC."
)]
pub struct Row {
    /// Position in the chain, from 1, contiguous.
    pub seq: u64,
    /// When the writer recorded it, RFC 3339 UTC with milliseconds.
    pub time: String,
    /// The same instant in milliseconds since the Unix epoch.
    pub time_ms: i64,
    /// The event and its fields.
    #[serde(flatten)]
    pub event: Event,
    /// The chain MAC, lowercase hex.
    pub mac: String,
}

/// RFC 3339 with milliseconds for a Unix-epoch millisecond count.
pub(crate) fn rfc3339_ms(time_ms: i64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(time_ms.max(0) as u64);
    humantime::format_rfc3339_millis(t).to_string()
}

// === canonical encoding ===

/// Tag of the trailing block that holds the fields added after the first format:
/// `cached_input_tokens`, `cache_write_tokens`, `cost_micros`.
const EXT_SPEND: u8 = 1;

/// The bytes the chain MAC covers for one row. Defined only here: a domain tag, then seq and
/// time as fixed 8-byte big-endian, then the kind and every field in a fixed order, each
/// optional field as a presence byte followed by a u32-length-prefixed string or an 8-byte
/// big-endian number. Nothing is left out, so editing any column changes the MAC.
///
/// Fields added later go in a trailing block (tag byte [`EXT_SPEND`], then each as an
/// optional number) written only when one of them is set, so a row without them encodes to
/// exactly the bytes older versions wrote and MACed, and their rows keep verifying; setting
/// or clearing one of them on any row changes its bytes.
pub(crate) fn canonical(seq: u64, time_ms: i64, e: &Event) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(b"keyward/audit-row/v1");
    out.extend_from_slice(&seq.to_be_bytes());
    out.extend_from_slice(&time_ms.to_be_bytes());
    put_str(&mut out, e.kind.as_str());
    put_opt_str(&mut out, &e.call_id);
    put_opt_str(&mut out, &e.tenant);
    put_opt_str(&mut out, &e.client_id);
    put_opt_num(&mut out, e.peer_uid.map(u64::from));
    put_opt_num(&mut out, e.peer_pid.map(u64::from));
    put_opt_str(&mut out, &e.target);
    put_opt_str(&mut out, &e.model);
    put_opt_str(&mut out, &e.capability);
    put_opt_str(&mut out, &e.team);
    put_opt_str(&mut out, &e.workflow);
    put_opt_str(&mut out, &e.credential_id);
    put_opt_num(&mut out, e.credential_version.map(u64::from));
    put_opt_str(&mut out, &e.fingerprint);
    put_opt_num(&mut out, e.upstream_status.map(u64::from));
    put_opt_num(&mut out, e.latency_ms);
    put_opt_num(&mut out, e.bytes_in);
    put_opt_num(&mut out, e.bytes_out);
    put_opt_num(&mut out, e.input_tokens);
    put_opt_num(&mut out, e.output_tokens);
    put_opt_num(&mut out, e.total_tokens);
    put_opt_str(&mut out, &e.detail);
    out.extend_from_slice(&(e.flags.len() as u32).to_be_bytes());
    for f in &e.flags {
        put_str(&mut out, f);
    }
    let ext = [e.cached_input_tokens, e.cache_write_tokens, e.cost_micros];
    if ext.iter().any(Option::is_some) {
        out.push(EXT_SPEND);
        for n in ext {
            put_opt_num(&mut out, n);
        }
    }
    out
}

/// The inverse of [`canonical`]: `None` unless `b` is exactly one canonical row.
pub(crate) fn decode_canonical(b: &[u8]) -> Option<(u64, i64, Event)> {
    let mut r = Reader(b);
    if r.take(b"keyward/audit-row/v1".len())? != b"keyward/audit-row/v1" {
        return None;
    }
    let seq = r.u64()?;
    let time_ms = r.u64()? as i64;
    let kind: EventKind = r.str()?.parse().ok()?;
    let narrow =
        |n: Option<Option<u64>>| -> Option<Option<u32>> { n?.map(u32::try_from).transpose().ok() };
    let mut event = Event {
        call_id: r.opt_str()?,
        tenant: r.opt_str()?,
        client_id: r.opt_str()?,
        peer_uid: narrow(r.opt_num())?,
        peer_pid: narrow(r.opt_num())?,
        target: r.opt_str()?,
        model: r.opt_str()?,
        capability: r.opt_str()?,
        team: r.opt_str()?,
        workflow: r.opt_str()?,
        credential_id: r.opt_str()?,
        credential_version: narrow(r.opt_num())?,
        fingerprint: r.opt_str()?,
        ..Event::new(kind)
    };
    event.upstream_status = r.opt_num()?.map(u16::try_from).transpose().ok()?;
    event.latency_ms = r.opt_num()?;
    event.bytes_in = r.opt_num()?;
    event.bytes_out = r.opt_num()?;
    event.input_tokens = r.opt_num()?;
    event.output_tokens = r.opt_num()?;
    event.total_tokens = r.opt_num()?;
    event.detail = r.opt_str()?;
    let flags = r.u32()?;
    for _ in 0..flags {
        event.flags.push(r.str()?);
    }
    if !r.0.is_empty() {
        if r.take(1)? != [EXT_SPEND] {
            return None;
        }
        event.cached_input_tokens = r.opt_num()?;
        event.cache_write_tokens = r.opt_num()?;
        event.cost_micros = r.opt_num()?;
        // The block is written only when it holds something, so each row has one encoding.
        let ext = [
            event.cached_input_tokens,
            event.cache_write_tokens,
            event.cost_micros,
        ];
        if ext.iter().all(Option::is_none) {
            return None;
        }
    }
    r.0.is_empty().then_some((seq, time_ms, event))
}

/// A cursor over canonical bytes.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_be_bytes(self.take(4)?.try_into().ok()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_be_bytes(self.take(8)?.try_into().ok()?))
    }
    fn str(&mut self) -> Option<String> {
        let n = self.u32()? as usize;
        String::from_utf8(self.take(n)?.to_vec()).ok()
    }
    fn present(&mut self) -> Option<bool> {
        match self.take(1)?[0] {
            0 => Some(false),
            1 => Some(true),
            _ => None,
        }
    }
    fn opt_str(&mut self) -> Option<Option<String>> {
        if self.present()? {
            self.str().map(Some)
        } else {
            Some(None)
        }
    }
    fn opt_num(&mut self) -> Option<Option<u64>> {
        if self.present()? {
            self.u64().map(Some)
        } else {
            Some(None)
        }
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_opt_str(out: &mut Vec<u8>, s: &Option<String>) {
    match s {
        None => out.push(0),
        Some(s) => {
            out.push(1);
            put_str(out, s);
        }
    }
}

fn put_opt_num(out: &mut Vec<u8>, n: Option<u64>) {
    match n {
        None => out.push(0),
        Some(n) => {
            out.push(1);
            out.extend_from_slice(&n.to_be_bytes());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kind_names_round_trip_and_match_serde() {
        for k in EventKind::ALL {
            assert_eq!(k.as_str().parse::<EventKind>().unwrap(), k);
            assert_eq!(
                serde_json::to_string(&k).unwrap(),
                format!("\"{}\"", k.as_str())
            );
        }
        let err = "request.bogus".parse::<EventKind>().unwrap_err();
        assert!(err.to_string().contains("request.resolved"));
    }

    #[test]
    fn canonical_decodes_back_to_the_same_row() {
        let full = Event {
            call_id: Some("c".into()),
            tenant: Some("acme".into()),
            client_id: Some("svc".into()),
            peer_uid: Some(1000),
            peer_pid: Some(42),
            target: Some("openai".into()),
            model: Some("gpt-4o".into()),
            capability: Some("chat".into()),
            team: Some("".into()),
            workflow: None,
            credential_id: Some("cred_1".into()),
            credential_version: Some(3),
            fingerprint: Some("ab".repeat(32)),
            upstream_status: Some(200),
            latency_ms: Some(7),
            bytes_in: Some(0),
            bytes_out: Some(u64::MAX),
            input_tokens: Some(1),
            output_tokens: None,
            total_tokens: Some(9),
            detail: Some("d".into()),
            flags: vec!["expired_key_warn".into(), "x".into()],
            cached_input_tokens: Some(5),
            cache_write_tokens: None,
            cost_micros: Some(0),
            ..Event::new(EventKind::RequestCompleted)
        };
        let older = Event {
            cached_input_tokens: None,
            cost_micros: None,
            ..full.clone()
        };
        for e in [full, older, Event::new(EventKind::TenantCreated)] {
            let bytes = canonical(7, 1_700_000_000_123, &e);
            assert_eq!(
                decode_canonical(&bytes),
                Some((7, 1_700_000_000_123, e.clone()))
            );
            // Every proper prefix and any trailing byte is refused, except the cut just before
            // the trailing block, which is the same row without its newer fields (a different
            // row, so a different MAC).
            let first_format = Event {
                cached_input_tokens: None,
                cache_write_tokens: None,
                cost_micros: None,
                ..e.clone()
            };
            let first_len = canonical(7, 1_700_000_000_123, &first_format).len();
            for cut in 0..bytes.len() {
                let want = (cut == first_len).then(|| (7, 1_700_000_000_123, first_format.clone()));
                assert_eq!(
                    decode_canonical(&bytes[..cut]),
                    want,
                    "prefix of {cut} bytes"
                );
            }
            let mut longer = bytes.clone();
            longer.push(0);
            assert_eq!(decode_canonical(&longer), None);
        }
    }

    /// A row written before the spend fields existed, encoded by hand in that format: the
    /// encoder still produces exactly these bytes (so its MAC still verifies) and the decoder
    /// reads them; a trailing block that holds nothing is refused, so no row has two encodings.
    #[test]
    fn rows_of_the_first_format_keep_their_bytes() {
        let e = Event {
            call_id: Some("c1".into()),
            peer_uid: Some(7),
            input_tokens: Some(11),
            flags: vec!["f".into()],
            ..Event::new(EventKind::RequestCompleted)
        };
        let mut want = b"keyward/audit-row/v1".to_vec();
        want.extend_from_slice(&3u64.to_be_bytes());
        want.extend_from_slice(&9i64.to_be_bytes());
        want.extend_from_slice(&17u32.to_be_bytes());
        want.extend_from_slice(b"request.completed");
        want.extend_from_slice(&[1, 0, 0, 0, 2, b'c', b'1']); // call_id
        want.extend_from_slice(&[0, 0]); // tenant, client_id
        want.push(1);
        want.extend_from_slice(&7u64.to_be_bytes()); // peer_uid
        want.extend_from_slice(&[0; 10]); // peer_pid .. upstream_status
        want.extend_from_slice(&[0, 0, 0]); // latency, bytes in/out
        want.push(1);
        want.extend_from_slice(&11u64.to_be_bytes()); // input_tokens
        want.extend_from_slice(&[0, 0, 0]); // output, total, detail
        want.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 1, b'f']); // one flag
        assert_eq!(canonical(3, 9, &e), want);
        assert_eq!(decode_canonical(&want), Some((3, 9, e)));
        let mut empty_block = want.clone();
        empty_block.extend_from_slice(&[EXT_SPEND, 0, 0, 0]);
        assert_eq!(decode_canonical(&empty_block), None);
        let mut other_tag = want;
        other_tag.extend_from_slice(&[2, 1, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0]);
        assert_eq!(decode_canonical(&other_tag), None);
    }

    #[test]
    fn canonical_distinguishes_absent_empty_and_shifted_fields() {
        let a = Event::new(EventKind::RequestResolved);
        let b = Event {
            call_id: Some(String::new()),
            ..a.clone()
        };
        // Same bytes moved between adjacent fields must not collide.
        let c = Event {
            call_id: Some("ab".into()),
            tenant: Some("c".into()),
            ..a.clone()
        };
        let d = Event {
            call_id: Some("a".into()),
            tenant: Some("bc".into()),
            ..a.clone()
        };
        let all = [
            canonical(1, 0, &a),
            canonical(1, 0, &b),
            canonical(1, 0, &c),
            canonical(1, 0, &d),
            canonical(2, 0, &a),
            canonical(1, 1, &a),
        ];
        for i in 0..all.len() {
            for j in i + 1..all.len() {
                assert_ne!(all[i], all[j], "{i} vs {j}");
            }
        }
    }

    #[test]
    fn sanitize_clamps_text_and_rejects_non_digest_fingerprints() {
        let mut e = Event {
            model: Some("m".repeat(10_000)),
            detail: Some("line1\nline2".into()),
            latency_ms: Some(u64::MAX),
            ..Event::new(EventKind::RequestDenied)
        };
        e.sanitize().unwrap();
        assert!(e.model.as_ref().unwrap().len() <= MAX_FIELD_LEN);
        assert_eq!(e.detail.as_deref(), Some("line1 line2"));
        assert_eq!(e.latency_ms, Some(i64::MAX as u64));
        // DEL and C1 controls too, next to multi-byte text that stays.
        for (raw, want) in [
            ("a\u{7f}b", "a b"),
            ("é\u{85}ü", "é ü"),
            ("tab\there", "tab here"),
            ("plain ascii ~", "plain ascii ~"),
        ] {
            let mut s = raw.to_string();
            clamp(&mut s, MAX_FIELD_LEN);
            assert_eq!(s, want, "{raw:?}");
        }

        let mut bad = Event {
            fingerprint: Some("Bearer sk-live-abcdef".into()),
            ..Event::new(EventKind::RequestResolved)
        };
        assert!(bad.sanitize().is_err());
        let mut bad_flag = Event {
            flags: vec!["Authorization: x".into()],
            ..Event::new(EventKind::RequestResolved)
        };
        assert!(bad_flag.sanitize().is_err());
    }

    #[test]
    fn row_json_is_snake_case_and_omits_nulls() {
        let row = Row {
            seq: 7,
            time: rfc3339_ms(1_700_000_000_123),
            time_ms: 1_700_000_000_123,
            event: Event {
                call_id: Some("call_1".into()),
                upstream_status: Some(200),
                flags: vec!["expired_key_warn".into()],
                ..Event::new(EventKind::RequestCompleted)
            },
            mac: "00".repeat(32),
        };
        let v: serde_json::Value = serde_json::to_value(&row).unwrap();
        assert_eq!(v["event"], "request.completed");
        assert_eq!(v["call_id"], "call_1");
        assert_eq!(v["upstream_status"], 200);
        assert_eq!(v["time"], "2023-11-14T22:13:20.123Z");
        assert_eq!(v["flags"][0], "expired_key_warn");
        assert!(v.get("tenant").is_none());
        let back: Row = serde_json::from_value(v).unwrap();
        assert_eq!(back, row);
    }
}

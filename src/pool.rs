//! Runtime pool state: which credential versions are cooling down after a 429 or quarantined
//! after a 401/403, and until when; the order in which a request tries its candidates given
//! that state; and the "expires within a week" watch for tenants with a max key age.
//!
//! The state lives in memory for the life of the process, keyed by (credential id, version):
//! a restart forgets it, which is safe because a key that is still rate-limited or rejected
//! simply earns its cooldown or quarantine again on its first failure. `pool` is told outcomes
//! by `proxy` and answers questions about the present; it must not do I/O, touch secrets or
//! choose which credentials match a request (that is `scope`).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::catalog::{Catalog, VersionState, version_state};
use crate::config::PoolSettings;
use crate::scope::Candidate;

/// Longest cooldown a `Retry-After` can impose. A buggy or hostile upstream answering
/// "retry in a year" must not take a key out of service for longer than a day; an operator can
/// still revoke it.
pub const MAX_COOLDOWN: Duration = Duration::from_secs(86_400);

/// How far ahead of its max-age expiry a key is announced in the log.
pub const EXPIRY_NOTICE: Duration = Duration::from_secs(7 * 86_400);

/// Identifies one credential version.
type VersionKey = (String, u32);

/// Why a version is out of rotation right now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Entry {
    /// Rate limited until then.
    cooldown_until: Option<SystemTime>,
    /// Rejected by the upstream (401/403) until then.
    quarantine_until: Option<SystemTime>,
    /// When the last failure was reported: a success only lifts blocks older than its
    /// request.
    reported_at: Option<SystemTime>,
}

impl Entry {
    fn blocked_until(&self, now: SystemTime) -> Option<SystemTime> {
        [self.cooldown_until, self.quarantine_until]
            .into_iter()
            .flatten()
            .filter(|t| *t > now)
            .max()
    }

    fn expired(&self, now: SystemTime) -> bool {
        self.blocked_until(now).is_none()
    }
}

/// What the upstream's answer means for the key that was used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The key worked (any answer that does not condemn the key) for a request sent at
    /// `sent_at`.
    Served {
        /// When the request that was served went out.
        sent_at: SystemTime,
    },
    /// 429: rate limited; `retry_after` is what the upstream asked for, if it said.
    RateLimited {
        /// Parsed `Retry-After`.
        retry_after: Option<Duration>,
    },
    /// 401 or 403: the key was refused, so it may be revoked or leaked.
    Rejected {
        /// The status the upstream answered.
        status: u16,
    },
}

/// What [`Pool::report`] changed, so the caller can audit it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// Nothing worth recording.
    None,
    /// The version now cools down until then.
    CoolingDown(SystemTime),
    /// The version entered quarantine (it was not quarantined before) until then.
    Quarantined(SystemTime),
    /// The version was already quarantined; the quarantine now lasts until then.
    QuarantineExtended(SystemTime),
}

/// How a version stands in its pool at a given moment (for `cred list`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolStatus {
    /// Cooling down after a 429 until then.
    pub cooldown_until: Option<SystemTime>,
    /// Quarantined after a 401/403 until then.
    pub quarantine_until: Option<SystemTime>,
}

/// Cooldowns and quarantines of every credential version, shared by all requests.
#[derive(Debug)]
pub struct Pool {
    /// Only versions with a cooldown or quarantine (possibly lapsed) have an entry; the map is
    /// pruned whenever it is written.
    entries: RwLock<HashMap<VersionKey, Entry>>,
    /// Cooldown after a 429 without a usable `Retry-After`, in milliseconds (reloadable).
    default_cooldown: AtomicU64,
    /// Quarantine after a 401/403, in milliseconds (reloadable).
    quarantine: AtomicU64,
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Pool {
    /// An empty pool state with the configured durations.
    pub fn new(settings: &PoolSettings) -> Pool {
        Pool {
            entries: RwLock::new(HashMap::new()),
            default_cooldown: AtomicU64::new(millis(settings.default_cooldown)),
            quarantine: AtomicU64::new(millis(settings.quarantine)),
        }
    }

    /// Takes new durations (a config reload); cooldowns and quarantines already running keep
    /// their end.
    pub fn set_settings(&self, settings: &PoolSettings) {
        self.default_cooldown
            .store(millis(settings.default_cooldown), Ordering::Relaxed);
        self.quarantine
            .store(millis(settings.quarantine), Ordering::Relaxed);
    }

    /// The order to try `candidates` in now: those free to serve keep `scope`'s order
    /// (priority, round-robin, overlapping last); versions in cooldown or quarantine go after
    /// all of them, soonest-available first, so they are used only when nothing else can serve.
    pub fn arrange(&self, candidates: Vec<Candidate>, now: SystemTime) -> Vec<Candidate> {
        let entries = self.entries.read().unwrap_or_else(|p| p.into_inner());
        if entries.is_empty() {
            return candidates;
        }
        let (mut free, mut blocked): (Vec<_>, Vec<_>) = (Vec::new(), Vec::new());
        for c in candidates {
            let until = entries
                .get(&(c.credential.id.clone(), c.version().version))
                .and_then(|e| e.blocked_until(now));
            match until {
                None => free.push(c),
                Some(t) => blocked.push((t, c)),
            }
        }
        // Stable: equal times keep scope's order.
        blocked.sort_by_key(|(t, _)| *t);
        free.extend(blocked.into_iter().map(|(_, c)| c));
        free
    }

    /// Records what happened when `credential`/`version` was used at `now`.
    pub fn report(
        &self,
        credential: &str,
        version: u32,
        outcome: Outcome,
        now: SystemTime,
    ) -> Change {
        let key = (credential.to_string(), version);
        if let Outcome::Served { sent_at } = outcome {
            // The hot path: a read lock, and a write only when a lapsed or last-resort entry
            // must go. A block reported after this request went out is newer news than its
            // success (a slow request succeeding must not lift a fresh 429 cooldown).
            let stale = |e: &Entry| e.reported_at.is_none_or(|t| t <= sent_at);
            let present = self
                .entries
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .get(&key)
                .is_some_and(stale);
            if present {
                let mut entries = self.entries.write().unwrap_or_else(|p| p.into_inner());
                if entries.get(&key).is_some_and(stale) {
                    entries.remove(&key);
                }
            }
            return Change::None;
        }
        let mut entries = self.entries.write().unwrap_or_else(|p| p.into_inner());
        entries.retain(|_, e| !e.expired(now));
        let entry = entries.entry(key).or_default();
        entry.reported_at = Some(now);
        match outcome {
            Outcome::Served { .. } => unreachable!("handled above"),
            Outcome::RateLimited { retry_after } => {
                let wait = retry_after
                    .unwrap_or(Duration::from_millis(
                        self.default_cooldown.load(Ordering::Relaxed),
                    ))
                    .min(MAX_COOLDOWN);
                let until = now + wait;
                // Concurrent 429s must not shorten a cooldown another request just set.
                let until = entry.cooldown_until.map_or(until, |t| t.max(until));
                entry.cooldown_until = Some(until);
                Change::CoolingDown(until)
            }
            Outcome::Rejected { .. } => {
                let was = entry.quarantine_until.is_some_and(|t| t > now);
                let until = now + Duration::from_millis(self.quarantine.load(Ordering::Relaxed));
                let until = entry.quarantine_until.map_or(until, |t| t.max(until));
                entry.quarantine_until = Some(until);
                if was {
                    Change::QuarantineExtended(until)
                } else {
                    Change::Quarantined(until)
                }
            }
        }
    }

    /// The cooldown and quarantine of a version still in force at `now`.
    pub fn status(&self, credential: &str, version: u32, now: SystemTime) -> PoolStatus {
        let entries = self.entries.read().unwrap_or_else(|p| p.into_inner());
        let Some(e) = entries.get(&(credential.to_string(), version)) else {
            return PoolStatus::default();
        };
        PoolStatus {
            cooldown_until: e.cooldown_until.filter(|t| *t > now),
            quarantine_until: e.quarantine_until.filter(|t| *t > now),
        }
    }
}

/// Reads a `Retry-After` value: delay-seconds or an HTTP date (IMF-fixdate, as RFC 9110
/// requires senders to use). A date in the past means "now". `None` when unparseable, so the
/// caller falls back to `pool.default_cooldown`.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        // Longer than u64 is "forever", which MAX_COOLDOWN clamps anyway.
        return Some(Duration::from_secs(value.parse().unwrap_or(u64::MAX)));
    }
    let at = parse_http_date(value)?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// Parses `Sun, 06 Nov 1994 08:49:37 GMT`.
fn parse_http_date(text: &str) -> Option<SystemTime> {
    let rest = text.split_once(", ")?.1;
    let mut parts = rest.split(' ');
    let day: u32 = parts.next()?.parse().ok()?;
    let month = match parts.next()? {
        "Jan" => 1,
        "Feb" => 2,
        "Mar" => 3,
        "Apr" => 4,
        "May" => 5,
        "Jun" => 6,
        "Jul" => 7,
        "Aug" => 8,
        "Sep" => 9,
        "Oct" => 10,
        "Nov" => 11,
        "Dec" => 12,
        _ => return None,
    };
    let year: i64 = parts.next()?.parse().ok()?;
    let mut hms = parts.next()?.split(':');
    let h: u64 = hms.next()?.parse().ok()?;
    let m: u64 = hms.next()?.parse().ok()?;
    let s: u64 = hms.next()?.parse().ok()?;
    if parts.next()? != "GMT" || parts.next().is_some() || hms.next().is_some() {
        return None;
    }
    if !(1..=31).contains(&day) || h > 23 || m > 59 || s > 60 || year < 1970 {
        return None;
    }
    let days = days_from_civil(year, month, day);
    let secs = u64::try_from(days).ok()? * 86_400 + h * 3600 + m * 60 + s;
    Some(UNIX_EPOCH + Duration::from_secs(secs))
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(month);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Unix seconds of a `SystemTime` (for listings and audit details).
pub fn unix_secs(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

// === expiry notices ===

/// A live credential version that passes its tenant's max key age within [`EXPIRY_NOTICE`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expiring {
    /// Tenant name.
    pub tenant: String,
    /// Credential id.
    pub credential: String,
    /// Credential name.
    pub name: String,
    /// Version.
    pub version: u32,
    /// Unix seconds at which it becomes too old.
    pub expires_at: i64,
    /// The tenant's `--on-expiry` policy.
    pub policy: String,
}

/// Remembers which versions were already announced, so each is logged once per process.
#[derive(Debug, Default)]
pub struct ExpiryWatch {
    /// Versions already announced.
    announced: Mutex<HashSet<VersionKey>>,
}

impl ExpiryWatch {
    /// Versions of `catalog` that expire within a week of `now` and were not announced yet.
    pub fn newly_expiring(&self, catalog: &Catalog, now: i64) -> Vec<Expiring> {
        let mut announced = crate::lock(&self.announced);
        let mut out = Vec::new();
        for (tenant_id, creds) in &catalog.credentials_by_tenant {
            let Some(tenant) = catalog.tenant(tenant_id) else {
                continue;
            };
            let Some(max_age) = tenant.max_key_age_s else {
                continue;
            };
            for cred in creds {
                for v in &cred.versions {
                    if !matches!(
                        version_state(cred, v, now),
                        VersionState::Current | VersionState::Overlapping
                    ) {
                        continue;
                    }
                    let expires_at = v.created_at + max_age;
                    let notice = EXPIRY_NOTICE.as_secs() as i64;
                    if expires_at <= now || expires_at - now > notice {
                        continue;
                    }
                    if announced.insert((cred.id.clone(), v.version)) {
                        out.push(Expiring {
                            tenant: tenant.name.clone(),
                            credential: cred.id.clone(),
                            name: cred.name.clone(),
                            version: v.version,
                            expires_at,
                            policy: tenant.on_expiry.clone(),
                        });
                    }
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{CredentialRow, Snapshot, TenantRow, VersionRow};
    use std::sync::Arc;

    fn settings() -> PoolSettings {
        PoolSettings {
            default_cooldown: Duration::from_secs(30),
            quarantine: Duration::from_secs(900),
        }
    }

    fn version(v: u32, created_at: i64) -> VersionRow {
        VersionRow {
            version: v,
            wrapped_data_key: vec![],
            ciphertext: vec![],
            preview: String::new(),
            created_at,
            overlap_until: None,
            retired_at: None,
            revoked_at: None,
        }
    }

    fn cred(id: &str, versions: Vec<VersionRow>) -> Arc<CredentialRow> {
        Arc::new(CredentialRow {
            id: id.into(),
            tenant_id: "t".into(),
            target: "openai".into(),
            name: id.into(),
            models: vec![],
            capabilities: vec![],
            teams: vec![],
            workflows: vec![],
            priority: 1,
            created_at: 0,
            revoked_at: None,
            kind: Default::default(),
            versions,
        })
    }

    fn candidate(id: &str) -> Candidate {
        Candidate {
            credential: cred(id, vec![version(1, 0)]),
            version_index: 0,
            expired_warn: false,
            overlapping: false,
        }
    }

    fn ids(list: &[Candidate]) -> Vec<String> {
        list.iter().map(|c| c.credential.id.clone()).collect()
    }

    #[test]
    fn blocked_versions_go_last_and_come_back_when_their_time_is_up() {
        let pool = Pool::new(&settings());
        let t0 = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let all = || vec![candidate("a"), candidate("b"), candidate("c")];
        assert_eq!(ids(&pool.arrange(all(), t0)), ["a", "b", "c"]);
        let change = pool.report(
            "a",
            1,
            Outcome::RateLimited {
                retry_after: Some(Duration::from_secs(5)),
            },
            t0,
        );
        assert_eq!(change, Change::CoolingDown(t0 + Duration::from_secs(5)));
        assert_eq!(
            pool.report("b", 1, Outcome::Rejected { status: 401 }, t0),
            Change::Quarantined(t0 + Duration::from_secs(900))
        );
        // a is available sooner than b, so it is the first fallback.
        assert_eq!(ids(&pool.arrange(all(), t0)), ["c", "a", "b"]);
        let later = t0 + Duration::from_secs(6);
        assert_eq!(ids(&pool.arrange(all(), later)), ["a", "c", "b"]);
        assert_eq!(pool.status("a", 1, later), PoolStatus::default());
        assert_eq!(
            pool.status("b", 1, later).quarantine_until,
            Some(t0 + Duration::from_secs(900))
        );
    }

    #[test]
    fn quarantine_is_announced_once_per_entry() {
        let pool = Pool::new(&settings());
        let t0 = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let rejected = Outcome::Rejected { status: 403 };
        assert!(matches!(
            pool.report("a", 1, rejected, t0),
            Change::Quarantined(_)
        ));
        assert!(matches!(
            pool.report("a", 1, rejected, t0 + Duration::from_secs(1)),
            Change::QuarantineExtended(_)
        ));
        // Once it lapses, a new refusal is a new entry into quarantine.
        let after = t0 + Duration::from_secs(2000);
        assert!(matches!(
            pool.report("a", 1, rejected, after),
            Change::Quarantined(_)
        ));
        // A success sent before the refusal was reported (a slow request) does not lift it...
        let early = Outcome::Served {
            sent_at: after - Duration::from_secs(1),
        };
        pool.report("a", 1, early, after + Duration::from_secs(1));
        assert!(pool.status("a", 1, after).quarantine_until.is_some());
        // ...a success sent after it (tried as the last resort) does.
        let late = Outcome::Served { sent_at: after };
        pool.report("a", 1, late, after + Duration::from_secs(1));
        assert_eq!(pool.status("a", 1, after), PoolStatus::default());
    }

    #[test]
    fn cooldowns_default_never_shrink_and_are_capped() {
        let pool = Pool::new(&settings());
        let t0 = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let limited = |s: Option<u64>| Outcome::RateLimited {
            retry_after: s.map(Duration::from_secs),
        };
        assert_eq!(
            pool.report("a", 1, limited(None), t0),
            Change::CoolingDown(t0 + Duration::from_secs(30))
        );
        assert_eq!(
            pool.report("a", 1, limited(Some(1)), t0),
            Change::CoolingDown(t0 + Duration::from_secs(30))
        );
        assert_eq!(
            pool.report("b", 1, limited(Some(10 * 86_400)), t0),
            Change::CoolingDown(t0 + MAX_COOLDOWN)
        );
    }

    #[test]
    fn retry_after_in_seconds_or_http_date() {
        let now = UNIX_EPOCH + Duration::from_secs(784_111_777); // Sun, 06 Nov 1994 08:49:37 GMT
        assert_eq!(parse_retry_after("2", now), Some(Duration::from_secs(2)));
        assert_eq!(
            parse_retry_after(" 120 ", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:50:07 GMT", now),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            parse_retry_after("Sat, 01 Jan 2000 00:00:00 GMT", now),
            Some(Duration::from_secs(946_684_800 - 784_111_777))
        );
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        for bad in [
            "",
            "soon",
            "-5",
            "1.5",
            "Sun, 06 Nov 1994 08:49:37 UTC",
            "Sun, 32 Nov 1994 08:49:37 GMT",
        ] {
            assert_eq!(parse_retry_after(bad, now), None, "{bad}");
        }
    }

    #[test]
    fn expiry_notice_once_a_week_ahead() {
        let day = 86_400;
        let now = 100 * day;
        let catalog = Catalog::build(Snapshot {
            tenants: vec![TenantRow {
                id: "t".into(),
                name: "acme".into(),
                wrapped_key: vec![],
                wrapped_fp_key: vec![],
                max_key_age_s: Some(30 * day),
                on_expiry: "warn".into(),
                rotation_overlap_s: None,
                created_at: 0,
            }],
            clients: vec![],
            credentials: vec![
                // Expires in 3 days: announce.
                (*cred("soon", vec![version(1, now - 27 * day)])).clone(),
                // Expires in 10 days: not yet.
                (*cred("later", vec![version(1, now - 20 * day)])).clone(),
                // Already expired: `scope` and `cred list` flag it; no advance notice.
                (*cred("gone", vec![version(1, now - 40 * day)])).clone(),
            ],
        });
        let watch = ExpiryWatch::default();
        let first = watch.newly_expiring(&catalog, now);
        assert_eq!(first.len(), 1);
        assert_eq!(first[0].credential, "soon");
        assert_eq!(first[0].expires_at, now + 3 * day);
        assert!(watch.newly_expiring(&catalog, now + 1).is_empty());
        assert_eq!(
            watch.newly_expiring(&catalog, now + 4 * day)[0].credential,
            "later"
        );
    }
}

//! Human units shared by the config file and the CLI: durations (`30s`, `15m`, `24h`, `90d`),
//! byte sizes (`16MiB`) and times (RFC 3339, or a duration meaning "that long ago").

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A value that could not be read as the unit it should be; the message says what is expected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct UnitError(String);

/// Parses `500ms`, `30s`, `15m`, `24h`, `90d` or `2w`.
pub fn parse_duration(text: &str) -> Result<Duration, UnitError> {
    let bad = || {
        UnitError(
            "not a duration: use a whole number with a unit, like 30s, 15m, 24h or 90d".into(),
        )
    };
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
    let (digits, unit) = t.split_at(split);
    let n: u64 = digits.parse().map_err(|_| bad())?;
    let secs = match unit {
        "ms" => return Ok(Duration::from_millis(n)),
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 7 * 86_400,
        _ => return Err(bad()),
    };
    n.checked_mul(secs).map(Duration::from_secs).ok_or_else(bad)
}

/// Formats a duration the way [`parse_duration`] reads it, using the largest exact unit.
pub fn format_duration(d: Duration) -> String {
    let s = d.as_secs();
    if d.is_zero() {
        return "0s".into();
    }
    if d.subsec_millis() != 0 || s == 0 {
        return format!("{}ms", d.as_millis());
    }
    for (unit, size) in [("d", 86_400), ("h", 3600), ("m", 60)] {
        if s.is_multiple_of(size) {
            return format!("{}{unit}", s / size);
        }
    }
    format!("{s}s")
}

/// Parses a byte size: a plain number of bytes, or with `KiB`, `MiB`, `GiB`, `KB`, `MB`, `GB`.
pub fn parse_size(text: &str) -> Result<u64, UnitError> {
    let bad = || UnitError("not a size: use bytes or a unit, like 16MiB or 512KiB".into());
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let n: u64 = digits.parse().map_err(|_| bad())?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        _ => return Err(bad()),
    };
    n.checked_mul(mult).ok_or_else(bad)
}

/// Seconds since the Unix epoch, now.
pub fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Milliseconds since the Unix epoch, now.
pub fn now_unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// RFC 3339 (UTC, seconds) for a Unix time in seconds.
pub fn format_time(unix_secs: i64) -> String {
    let t = UNIX_EPOCH + Duration::from_secs(unix_secs.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

/// RFC 3339 (UTC, milliseconds) for a Unix time in milliseconds.
pub fn format_time_ms(unix_ms: i64) -> String {
    let t = UNIX_EPOCH + Duration::from_millis(unix_ms.max(0) as u64);
    humantime::format_rfc3339_millis(t).to_string()
}

/// Reads a CLI `TIME`: RFC 3339, or a duration meaning that long before `now_unix`.
/// Returns Unix seconds.
pub fn parse_time(text: &str, now_unix: i64) -> Result<i64, UnitError> {
    if let Ok(d) = parse_duration(text) {
        let ago = i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
        return Ok(now_unix.saturating_sub(ago));
    }
    humantime::parse_rfc3339_weak(text.trim())
        .map(|t| {
            t.duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .unwrap_or(0)
        })
        .map_err(|_| {
            UnitError(
                "not a time: use RFC 3339 (2026-01-31T12:00:00Z) or a duration meaning \
                 that long ago (15m, 24h, 7d)"
                    .into(),
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_duration_longer_than_time_itself_saturates_instead_of_wrapping() {
        let t = parse_time(&format!("{}s", u64::MAX), 1_000).unwrap();
        assert_eq!(t, 1_000 - i64::MAX);
        let t = parse_time(&format!("{}s", i64::MAX), 1_000).unwrap();
        assert!(t < 0, "{t}");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("15m").unwrap(), Duration::from_secs(900));
        assert_eq!(parse_duration("24h").unwrap(), Duration::from_secs(86_400));
        assert_eq!(
            parse_duration("90d").unwrap(),
            Duration::from_secs(90 * 86_400)
        );
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        for bad in ["", "30", "s", "3x", "-5s", "1.5h", "99999999999999999999d"] {
            let err = parse_duration(bad).unwrap_err().to_string();
            assert!(err.contains("like 30s, 15m, 24h or 90d"), "{bad}: {err}");
        }
        assert_eq!(format_duration(Duration::from_secs(86_400)), "1d");
        assert_eq!(format_duration(Duration::from_secs(90)), "90s");
        assert_eq!(format_duration(Duration::from_secs(7200)), "2h");
        assert_eq!(format_duration(Duration::ZERO), "0s");
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("16MiB").unwrap(), 16 << 20);
        assert_eq!(parse_size("1024").unwrap(), 1024);
        assert_eq!(parse_size("2KB").unwrap(), 2000);
        assert!(
            parse_size("16 potatoes")
                .unwrap_err()
                .to_string()
                .contains("16MiB")
        );
    }

    #[test]
    fn times() {
        assert_eq!(
            parse_time("2026-01-01T00:00:00Z", 0).unwrap(),
            1_767_225_600
        );
        assert_eq!(parse_time("1h", 10_000).unwrap(), 6_400);
        assert!(
            parse_time("yesterday", 0)
                .unwrap_err()
                .to_string()
                .contains("RFC 3339")
        );
        assert_eq!(format_time(1_767_225_600), "2026-01-01T00:00:00Z");
    }
}

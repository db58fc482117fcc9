//! Per-process counters: the backend without Redis, and the fallback with
//! `on_backend_error = "local"`. The same two operations as the Redis scripts (`redis.rs`), with
//! the same meaning, under one mutex so each is atomic.

use std::collections::HashMap;
use std::sync::Mutex;

use super::{Admit, Verdict};

/// Counters by key, each with the time (ms since the epoch) after which it is gone.
#[derive(Default)]
pub(crate) struct LocalCounters {
    map: Mutex<HashMap<String, (u64, i64)>>,
}

/// Above this many keys, expired ones are swept on the next write.
const SWEEP_ABOVE: usize = 4096;

impl LocalCounters {
    fn get(map: &HashMap<String, (u64, i64)>, key: &str, now_ms: i64) -> u64 {
        match map.get(key) {
            Some(&(v, until)) if until > now_ms => v,
            _ => 0,
        }
    }

    /// Reads the budgets and token counters and, when nothing refuses, counts one request on
    /// every request counter; see [`Admit`].
    pub(crate) fn admit(&self, op: &Admit, now_ms: i64) -> Verdict {
        let mut map = crate::lock(&self.map);
        let mut spent = Vec::with_capacity(op.budgets.len());
        for (i, (key, limit, hard)) in op.budgets.iter().enumerate() {
            let v = Self::get(&map, key, now_ms);
            if *hard && v >= *limit {
                return Verdict::Budget { index: i, spent: v };
            }
            spent.push(v);
        }
        for (i, (key, limit)) in op.tpm.iter().enumerate() {
            let v = Self::get(&map, key, now_ms);
            if v >= *limit {
                return Verdict::Tokens { index: i, used: v };
            }
        }
        for (i, (key, limit)) in op.rpm.iter().enumerate() {
            let v = Self::get(&map, key, now_ms);
            if v >= *limit {
                return Verdict::Requests { index: i, used: v };
            }
        }
        Self::sweep(&mut map, now_ms);
        for (key, _) in &op.rpm {
            let entry = map
                .entry(key.clone())
                .or_insert((0, now_ms + op.rpm_ttl_ms));
            if entry.1 <= now_ms {
                *entry = (0, now_ms + op.rpm_ttl_ms);
            }
            entry.0 += 1;
        }
        Verdict::Pass { spent }
    }

    /// Adds each delta to its counter (created with its time to live); returns the new values.
    pub(crate) fn charge(&self, deltas: &[(String, u64, i64)], now_ms: i64) -> Vec<u64> {
        let mut map = crate::lock(&self.map);
        Self::sweep(&mut map, now_ms);
        deltas
            .iter()
            .map(|(key, delta, ttl)| {
                let entry = map.entry(key.clone()).or_insert((0, now_ms + ttl));
                if entry.1 <= now_ms {
                    *entry = (0, now_ms + ttl);
                }
                entry.0 = entry.0.saturating_add(*delta);
                entry.0
            })
            .collect()
    }

    /// Sets a counter that does not exist yet (spend read back from the audit trail at start).
    pub(crate) fn seed(&self, key: &str, value: u64, until_ms: i64, now_ms: i64) {
        let mut map = crate::lock(&self.map);
        match map.get(key) {
            Some(&(_, until)) if until > now_ms => {}
            _ => {
                map.insert(key.to_owned(), (value, until_ms));
            }
        }
    }

    /// The counter's value now (0 when absent or expired).
    pub(crate) fn value(&self, key: &str, now_ms: i64) -> u64 {
        Self::get(&crate::lock(&self.map), key, now_ms)
    }

    fn sweep(map: &mut HashMap<String, (u64, i64)>, now_ms: i64) {
        if map.len() > SWEEP_ABOVE {
            map.retain(|_, (_, until)| *until > now_ms);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(rpm: u64) -> Admit {
        Admit {
            budgets: vec![("b".into(), 100, true)],
            tpm: vec![("t".into(), 50)],
            rpm: vec![("r".into(), rpm)],
            rpm_ttl_ms: 1000,
        }
    }

    #[test]
    fn requests_are_counted_only_when_admitted() {
        let c = LocalCounters::default();
        assert!(matches!(c.admit(&op(2), 0), Verdict::Pass { .. }));
        assert!(matches!(c.admit(&op(2), 0), Verdict::Pass { .. }));
        assert!(matches!(
            c.admit(&op(2), 0),
            Verdict::Requests { index: 0, used: 2 }
        ));
        assert_eq!(c.value("r", 0), 2, "a refused request is not counted");
        // The window's counter expires with it.
        assert!(matches!(c.admit(&op(2), 1000), Verdict::Pass { .. }));
        assert_eq!(c.value("r", 1000), 1);
    }

    #[test]
    fn budgets_and_tokens_refuse_at_their_limit_before_requests_count() {
        let c = LocalCounters::default();
        assert_eq!(c.charge(&[("t".into(), 50, 1000)], 0), vec![50]);
        assert!(matches!(
            c.admit(&op(10), 0),
            Verdict::Tokens { index: 0, used: 50 }
        ));
        assert_eq!(c.value("r", 0), 0);
        c.seed("b", 100, 10_000, 0);
        c.seed("b", 5, 10_000, 0);
        assert!(matches!(
            c.admit(&op(10), 2000),
            Verdict::Budget {
                index: 0,
                spent: 100
            }
        ));
    }
}

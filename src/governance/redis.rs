//! Counters in Redis, shared by every keyward pointed at it (`[governance] redis_url`). Each
//! operation is one Lua script, so a check-and-count or a charge is atomic across replicas, and
//! each call is bounded by `[governance] timeout`. A failed or timed-out call marks the backend
//! down; callers then apply `on_backend_error` without waiting on Redis, while
//! [`RedisBackend::reconnect`] (driven by the governance maintenance task) brings it back.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use redis::aio::MultiplexedConnection;

use super::{Admit, Verdict};

/// Prefix of every key keyward writes.
pub(crate) const KEY_PREFIX: &str = "keyward:";

/// KEYS: budgets, then token counters, then request counters. ARGV: their counts; per budget
/// its limit and whether reaching it refuses (`1`); token limits; request limits; the request
/// counters' time to live (ms). Returns `{0, spent...}` or `{kind, index, value}` with kind 1
/// budget, 2 tokens, 3 requests.
const ADMIT: &str = r"
local nb, nt, nr = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local a = 4
local spent = {}
for i = 1, nb do
  local v = tonumber(redis.call('GET', KEYS[i]) or '0')
  spent[i] = v
  if ARGV[a + 1] == '1' and v >= tonumber(ARGV[a]) then return {1, i - 1, v} end
  a = a + 2
end
for i = 1, nt do
  local v = tonumber(redis.call('GET', KEYS[nb + i]) or '0')
  if v >= tonumber(ARGV[a]) then return {2, i - 1, v} end
  a = a + 1
end
local limits = a
for i = 1, nr do
  local v = tonumber(redis.call('GET', KEYS[nb + nt + i]) or '0')
  if v >= tonumber(ARGV[a]) then return {3, i - 1, v} end
  a = a + 1
end
for i = 1, nr do
  local k = KEYS[nb + nt + i]
  if redis.call('INCR', k) == 1 then redis.call('PEXPIRE', k, ARGV[a]) end
end
local out = {0}
for i = 1, nb do out[#out + 1] = spent[i] end
return out
";

/// KEYS: counters; ARGV: per key its delta and time to live (ms). Adds each delta, sets the
/// time to live of a counter it created, returns the new values.
const CHARGE: &str = r"
local out = {}
for i = 1, #KEYS do
  local d = tonumber(ARGV[2 * i - 1])
  local v = redis.call('INCRBY', KEYS[i], d)
  if v == d then redis.call('PEXPIRE', KEYS[i], ARGV[2 * i]) end
  out[i] = v
end
return out
";

/// Why a Redis call did not give an answer.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RedisDown {
    /// No connection (down since an earlier failure, or never connected).
    #[error("not connected")]
    NotConnected,
    /// The call did not finish within the timeout.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// Redis or the connection reported an error.
    #[error("{0}")]
    Failed(String),
}

/// A Redis server holding the counters.
pub(crate) struct RedisBackend {
    client: redis::Client,
    /// The URL without userinfo, for messages and logs.
    pub(crate) shown: String,
    /// `Some` while the backend is up.
    conn: ArcSwapOption<MultiplexedConnection>,
    timeout: Duration,
    /// Set when a failure was logged, so an outage logs once and its end once.
    down_logged: AtomicBool,
    /// Set once a connection was attempted: before that (just after start or a reload), the
    /// first call connects itself rather than finding the backend "down".
    tried: AtomicBool,
    admit: redis::Script,
    charge: redis::Script,
}

impl RedisBackend {
    /// A backend for `url` (checked by the config), not yet connected.
    pub(crate) fn new(url: &str, shown: String, timeout: Duration) -> Result<Self, String> {
        let client = redis::Client::open(url).map_err(|e| e.to_string())?;
        Ok(RedisBackend {
            client,
            shown,
            conn: ArcSwapOption::empty(),
            timeout,
            down_logged: AtomicBool::new(false),
            tried: AtomicBool::new(false),
            admit: redis::Script::new(ADMIT),
            charge: redis::Script::new(CHARGE),
        })
    }

    /// Whether the last call (or reconnect) succeeded.
    pub(crate) fn is_up(&self) -> bool {
        self.conn.load().is_some()
    }

    /// Connects and checks with PING, each within the timeout; logs the recovery.
    pub(crate) async fn reconnect(&self) -> bool {
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout));
        let attempt = async {
            let mut conn = self
                .client
                .get_multiplexed_async_connection_with_config(&config)
                .await?;
            redis::cmd("PING").query_async::<String>(&mut conn).await?;
            Ok::<_, redis::RedisError>(conn)
        };
        self.tried.store(true, Ordering::Relaxed);
        match tokio::time::timeout(self.timeout * 2, attempt).await {
            Ok(Ok(conn)) => {
                self.conn.store(Some(std::sync::Arc::new(conn)));
                if self.down_logged.swap(false, Ordering::Relaxed) {
                    tracing::warn!(
                        redis = %self.shown,
                        "governance counters: Redis reachable again"
                    );
                } else {
                    tracing::info!(redis = %self.shown, "governance counters in Redis");
                }
                true
            }
            Ok(Err(e)) => {
                self.mark_down(&RedisDown::Failed(e.to_string()));
                false
            }
            Err(_) => {
                self.mark_down(&RedisDown::Timeout(self.timeout * 2));
                false
            }
        }
    }

    fn mark_down(&self, why: &RedisDown) {
        self.conn.store(None);
        if !self.down_logged.swap(true, Ordering::Relaxed) {
            tracing::error!(
                redis = %self.shown,
                reason = %why,
                "governance counters: Redis unreachable"
            );
        }
    }

    /// The connection, connecting first when none was ever attempted.
    async fn connection(&self) -> Result<MultiplexedConnection, RedisDown> {
        if self.conn.load().is_none() && !self.tried.load(Ordering::Relaxed) {
            self.reconnect().await;
        }
        match self.conn.load_full() {
            Some(conn) => Ok((*conn).clone()),
            None => Err(RedisDown::NotConnected),
        }
    }

    async fn run<T: redis::FromRedisValue>(
        &self,
        invocation: redis::ScriptInvocation<'_>,
    ) -> Result<T, RedisDown> {
        let mut conn = self.connection().await?;
        let result =
            match tokio::time::timeout(self.timeout, invocation.invoke_async(&mut conn)).await {
                Ok(Ok(v)) => Ok(v),
                Ok(Err(e)) => Err(RedisDown::Failed(e.to_string())),
                Err(_) => Err(RedisDown::Timeout(self.timeout)),
            };
        if let Err(why) = &result {
            self.mark_down(why);
        }
        result
    }

    /// [`super::counters::LocalCounters::admit`] in Redis, atomically for the whole fleet.
    pub(crate) async fn admit(&self, op: &Admit) -> Result<Verdict, RedisDown> {
        let mut inv = self.admit.prepare_invoke();
        for (key, _, _) in &op.budgets {
            inv.key(format!("{KEY_PREFIX}{key}"));
        }
        for (key, _) in op.tpm.iter().chain(&op.rpm) {
            inv.key(format!("{KEY_PREFIX}{key}"));
        }
        inv.arg(op.budgets.len())
            .arg(op.tpm.len())
            .arg(op.rpm.len());
        for (_, limit, hard) in &op.budgets {
            inv.arg(*limit).arg(if *hard { "1" } else { "0" });
        }
        for (_, limit) in op.tpm.iter().chain(&op.rpm) {
            inv.arg(*limit);
        }
        inv.arg(op.rpm_ttl_ms);
        let out: Vec<i64> = self.run(inv).await?;
        let n = |i: usize| out.get(i).copied().unwrap_or(0).max(0) as u64;
        Ok(match out.first().copied() {
            Some(0) => Verdict::Pass {
                spent: (1..out.len()).map(n).collect(),
            },
            Some(1) => Verdict::Budget {
                index: n(1) as usize,
                spent: n(2),
            },
            Some(2) => Verdict::Tokens {
                index: n(1) as usize,
                used: n(2),
            },
            Some(3) => Verdict::Requests {
                index: n(1) as usize,
                used: n(2),
            },
            _ => {
                return Err(RedisDown::Failed(
                    "unexpected answer to the admit script".into(),
                ));
            }
        })
    }

    /// [`super::counters::LocalCounters::charge`] in Redis.
    pub(crate) async fn charge(
        &self,
        deltas: &[(String, u64, i64)],
    ) -> Result<Vec<u64>, RedisDown> {
        let mut inv = self.charge.prepare_invoke();
        for (key, delta, ttl) in deltas {
            inv.key(format!("{KEY_PREFIX}{key}"));
            inv.arg(*delta).arg(*ttl);
        }
        let out: Vec<i64> = self.run(inv).await?;
        Ok(out.into_iter().map(|v| v.max(0) as u64).collect())
    }

    /// The counters' values (0 for absent ones).
    pub(crate) async fn values(&self, keys: &[String]) -> Result<Vec<u64>, RedisDown> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let mut conn = self.connection().await?;
        let mut cmd = redis::cmd("MGET");
        for key in keys {
            cmd.arg(format!("{KEY_PREFIX}{key}"));
        }
        let result =
            tokio::time::timeout(self.timeout, cmd.query_async::<Vec<Option<u64>>>(&mut conn))
                .await;
        let result = match result {
            Ok(Ok(v)) => Ok(v.into_iter().map(|v| v.unwrap_or(0)).collect()),
            Ok(Err(e)) => Err(RedisDown::Failed(e.to_string())),
            Err(_) => Err(RedisDown::Timeout(self.timeout)),
        };
        if let Err(why) = &result {
            self.mark_down(why);
        }
        result
    }
}

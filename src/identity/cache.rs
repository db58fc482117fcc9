//! The derived-secret cache: access tokens and session credentials that keyward obtained from a
//! token endpoint, kept (in whatever locked type the caller caches, such as [`Secret`]) until
//! shortly before they expire.
//!
//! Each key has its own slot behind a `tokio::sync::Mutex`, so refreshes are single-flight: when
//! a burst of requests finds the value stale, the first one fetches while the others wait on the
//! slot, and all of them get that one answer — a value, or the fetch's error. An error is handed
//! to the requests that waited for that fetch and then forgotten: the next request tries again.
//!
//! [`Secret`]: crate::seal::Secret

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// Longest time before expiry at which a value is refreshed.
pub const MAX_REFRESH_MARGIN: Duration = Duration::from_secs(300);

/// A freshly derived value and how long the issuer says it lasts (`expires_in`).
#[derive(Debug)]
pub struct Fresh<V> {
    /// The derived secret.
    pub value: V,
    /// Lifetime from the moment the fetch began.
    pub lifetime: Duration,
}

/// How long before expiry a value of `lifetime` is refreshed: 10 % of its lifetime, at most
/// [`MAX_REFRESH_MARGIN`] — a one-hour token is replaced after 55 minutes, a one-minute token
/// after 54 seconds.
pub fn refresh_margin(lifetime: Duration) -> Duration {
    (lifetime / 10).min(MAX_REFRESH_MARGIN)
}

/// A cached value and until when it is served.
struct Held<V> {
    value: Arc<V>,
    refresh_at: Instant,
}

/// What one slot knows.
struct SlotState<V, E> {
    held: Option<Held<V>>,
    /// The error of the last fetch and the fetch number it belongs to, for the requests that
    /// were waiting on it.
    failed: Option<(u64, E)>,
}

struct Slot<V, E> {
    /// Number of fetches finished on this slot; read without the lock by arriving requests.
    fetches: AtomicU64,
    state: tokio::sync::Mutex<SlotState<V, E>>,
}

/// Derived secrets by key (a credential id and version, say), each refreshed single-flight.
pub struct DerivedCache<K, V, E> {
    slots: std::sync::Mutex<HashMap<K, Arc<Slot<V, E>>>>,
}

impl<K, V, E> std::fmt::Debug for DerivedCache<K, V, E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DerivedCache")
            .field("entries", &crate::lock(&self.slots).len())
            .finish()
    }
}

impl<K, V, E> Default for DerivedCache<K, V, E> {
    fn default() -> Self {
        DerivedCache {
            slots: std::sync::Mutex::new(HashMap::new()),
        }
    }
}

impl<K: Eq + Hash + Clone, V, E: Clone> DerivedCache<K, V, E> {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    fn slot(&self, key: &K) -> Arc<Slot<V, E>> {
        crate::lock(&self.slots)
            .entry(key.clone())
            .or_insert_with(|| {
                Arc::new(Slot {
                    fetches: AtomicU64::new(0),
                    state: tokio::sync::Mutex::new(SlotState {
                        held: None,
                        failed: None,
                    }),
                })
            })
            .clone()
    }

    /// The value for `key`: the cached one while it is before its refresh time, else the result
    /// of `fetch`, run once for all the requests that arrive while it runs. `fetch` must bound
    /// its own duration (the token client's timeouts): the others wait for it.
    pub async fn get<F, Fut>(&self, key: &K, fetch: F) -> Result<Arc<V>, E>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<Fresh<V>, E>>,
    {
        let slot = self.slot(key);
        let seen = slot.fetches.load(Ordering::Acquire);
        let mut state = slot.state.lock().await;
        if let Some(held) = &state.held
            && Instant::now() < held.refresh_at
        {
            return Ok(held.value.clone());
        }
        // A fetch finished while this request waited for the slot, and failed: its answer is
        // this request's answer too, rather than one more call to an endpoint that just refused.
        if let Some((number, error)) = &state.failed
            && *number > seen
        {
            return Err(error.clone());
        }
        let started = Instant::now();
        let outcome = fetch().await;
        let number = slot.fetches.fetch_add(1, Ordering::AcqRel) + 1;
        match outcome {
            Ok(fresh) => {
                let value = Arc::new(fresh.value);
                let refresh_at = started
                    + fresh
                        .lifetime
                        .saturating_sub(refresh_margin(fresh.lifetime));
                state.held = Some(Held {
                    value: value.clone(),
                    refresh_at,
                });
                state.failed = None;
                Ok(value)
            }
            Err(e) => {
                // A stale value is not served after a failed refresh: it may be revoked.
                state.held = None;
                state.failed = Some((number, e.clone()));
                Err(e)
            }
        }
    }

    /// Forgets `value` for `key` (the upstream refused it), unless a newer one replaced it
    /// already. The next [`get`](DerivedCache::get) fetches.
    pub async fn invalidate(&self, key: &K, value: &Arc<V>) {
        let slot = self.slot(key);
        let mut state = slot.state.lock().await;
        if state
            .held
            .as_ref()
            .is_some_and(|h| Arc::ptr_eq(&h.value, value))
        {
            state.held = None;
        }
    }

    /// Drops every slot whose key fails `keep` (credentials deleted or versions retired).
    pub fn retain(&self, mut keep: impl FnMut(&K) -> bool) {
        crate::lock(&self.slots).retain(|k, _| keep(k));
    }

    /// Number of keys holding a value, or fetching one now (a slot in use counts as holding).
    pub fn held(&self) -> usize {
        crate::lock(&self.slots)
            .values()
            .filter(|slot| slot.state.try_lock().map_or(true, |s| s.held.is_some()))
            .count()
    }

    /// Number of keys with a slot.
    pub fn len(&self) -> usize {
        crate::lock(&self.slots).len()
    }

    /// True when no key has a slot.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;
    use crate::seal::Secret;

    type Cache = DerivedCache<String, Secret, String>;

    async fn token(
        fetches: &AtomicUsize,
        lifetime: Duration,
        delay: Duration,
    ) -> Result<Fresh<Secret>, String> {
        let n = fetches.fetch_add(1, Ordering::SeqCst) + 1;
        tokio::time::sleep(delay).await;
        Ok(Fresh {
            value: Secret::from_slice(format!("token-{n}").as_bytes()),
            lifetime,
        })
    }

    /// 50 concurrent gets of `key`, each of which must see `expected`.
    async fn burst(
        cache: &Arc<Cache>,
        fetches: &Arc<AtomicUsize>,
        key: &str,
        expected: &'static [u8],
    ) {
        let mut tasks = Vec::new();
        for _ in 0..50 {
            let (cache, fetches, key) = (cache.clone(), fetches.clone(), key.to_string());
            tasks.push(tokio::spawn(async move {
                let v = cache
                    .get(&key, || {
                        token(
                            &fetches,
                            Duration::from_secs(3600),
                            Duration::from_millis(200),
                        )
                    })
                    .await
                    .unwrap();
                v.expose_secret().to_vec()
            }));
        }
        for t in tasks {
            assert_eq!(t.await.unwrap(), expected);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_at_expiry_makes_one_fetch() {
        let cache = Arc::new(Cache::new());
        let fetches = Arc::new(AtomicUsize::new(0));
        let key = "cred_a/v1".to_string();
        burst(&cache, &fetches, &key, b"token-1").await;
        assert_eq!(fetches.load(Ordering::SeqCst), 1);

        // Past the refresh time, a second burst again makes exactly one fetch.
        tokio::time::advance(Duration::from_secs(3600 - 300)).await;
        burst(&cache, &fetches, &key, b"token-2").await;
        assert_eq!(fetches.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn values_are_refreshed_a_margin_before_expiry() {
        assert_eq!(
            refresh_margin(Duration::from_secs(3600)),
            Duration::from_secs(300)
        );
        assert_eq!(
            refresh_margin(Duration::from_secs(60)),
            Duration::from_secs(6)
        );
        let cache = Cache::new();
        let fetches = AtomicUsize::new(0);
        let key = "k".to_string();
        let get = || {
            cache.get(&key, || {
                token(&fetches, Duration::from_secs(60), Duration::ZERO)
            })
        };
        get().await.unwrap();
        tokio::time::advance(Duration::from_secs(53)).await;
        assert_eq!(get().await.unwrap().expose_secret(), b"token-1");
        tokio::time::advance(Duration::from_millis(1500)).await;
        assert_eq!(get().await.unwrap().expose_secret(), b"token-2");
        assert_eq!(fetches.load(Ordering::SeqCst), 2);
        // Other keys have their own values.
        let other = "k2".to_string();
        let v = cache
            .get(&other, || {
                token(&fetches, Duration::from_secs(60), Duration::ZERO)
            })
            .await
            .unwrap();
        assert_eq!(v.expose_secret(), b"token-3");
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_refresh_reaches_all_waiters_and_is_not_kept() {
        let cache = Arc::new(Cache::new());
        let fetches = Arc::new(AtomicUsize::new(0));
        let key = "k".to_string();
        let mut tasks = Vec::new();
        for _ in 0..20 {
            let (cache, fetches, key) = (cache.clone(), fetches.clone(), key.clone());
            tasks.push(tokio::spawn(async move {
                cache
                    .get(&key, || async {
                        fetches.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        Err::<Fresh<Secret>, _>("invalid_grant".to_string())
                    })
                    .await
                    .map(|_| ())
            }));
        }
        for t in tasks {
            assert_eq!(t.await.unwrap(), Err("invalid_grant".to_string()));
        }
        assert_eq!(fetches.load(Ordering::SeqCst), 1);
        // The next request tries again, and a success is cached.
        let v = cache
            .get(&key, || {
                token(&fetches, Duration::from_secs(3600), Duration::ZERO)
            })
            .await
            .unwrap();
        assert_eq!(v.expose_secret(), b"token-2");
    }

    #[tokio::test(start_paused = true)]
    async fn invalidate_drops_only_the_refused_value() {
        let cache = Cache::new();
        let fetches = AtomicUsize::new(0);
        let key = "k".to_string();
        let get = || {
            cache.get(&key, || {
                token(&fetches, Duration::from_secs(3600), Duration::ZERO)
            })
        };
        let first = get().await.unwrap();
        cache.invalidate(&key, &first).await;
        let second = get().await.unwrap();
        assert_eq!(second.expose_secret(), b"token-2");
        // A late report about the first value leaves the second in place.
        cache.invalidate(&key, &first).await;
        assert_eq!(get().await.unwrap().expose_secret(), b"token-2");
        assert_eq!(fetches.load(Ordering::SeqCst), 2);
        cache.retain(|_| false);
        assert!(cache.is_empty());
    }
}

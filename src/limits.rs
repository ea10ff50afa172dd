//! Abuse limits, held in memory by each process: message rates per
//! connection, new sessions and open sockets per IP, open sockets per
//! credential, login failures per account and per IP, and a small pool for
//! password hashing so a login flood cannot take the CPU from chat traffic.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter};
use tokio::sync::{Semaphore, SemaphorePermit};

use crate::config::LimitArgs;

/// The limiters shared by every request and connection.
pub struct Limits {
    pub settings: LimitArgs,
    /// New anonymous chat sessions per client IP.
    sessions_per_ip: DefaultKeyedRateLimiter<IpAddr>,
    sockets_per_ip: Arc<Counter<IpAddr>>,
    sockets_per_credential: Arc<Counter<[u8; 32]>>,
    logins: LoginThrottle,
    /// At most this many password hashes are computed at once.
    hashing: Semaphore,
}

impl Limits {
    pub fn new(settings: LimitArgs) -> Self {
        let per_minute =
            NonZeroU32::new(settings.sessions_per_ip_per_minute.max(1)).unwrap_or(NonZeroU32::MIN);
        Self {
            sessions_per_ip: RateLimiter::keyed(Quota::per_minute(per_minute)),
            sockets_per_ip: Arc::default(),
            sockets_per_credential: Arc::default(),
            logins: LoginThrottle::new(
                settings.login_failures,
                Duration::from_secs(settings.login_lock_minutes * 60),
            ),
            hashing: Semaphore::new(settings.password_hash_workers.max(1)),
            settings,
        }
    }

    /// May this IP create another chat session now? `Err` says when to retry.
    pub fn new_session(&self, ip: IpAddr) -> Result<(), Duration> {
        // Forget addresses whose quota has refilled, so the table stays small.
        if self.sessions_per_ip.len() > 10_000 {
            self.sessions_per_ip.retain_recent();
        }
        self.sessions_per_ip.check_key(&ip).map_err(|not_until| {
            not_until.wait_time_from(governor::clock::Clock::now(&governor::clock::DefaultClock::default()))
        })
    }

    /// A slot for one more open socket from this IP with this credential, or
    /// `None` when either is at its limit.
    pub fn open_socket(&self, ip: IpAddr, credential: [u8; 32]) -> Option<SocketSlots> {
        let ip_slot = Counter::acquire(&self.sockets_per_ip, ip, self.settings.max_sockets_per_ip)?;
        let credential_slot = Counter::acquire(
            &self.sockets_per_credential,
            credential,
            self.settings.max_sockets_per_credential,
        )?;
        Some(SocketSlots { _ip: ip_slot, _credential: credential_slot })
    }

    /// A per-connection message limiter: `message_rate`/s, bursts of `message_burst`.
    pub fn message_limiter(&self) -> DefaultDirectRateLimiter {
        let rate = NonZeroU32::new(self.settings.message_rate.max(1)).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(self.settings.message_burst.max(1)).unwrap_or(NonZeroU32::MIN);
        RateLimiter::direct(Quota::per_second(rate).allow_burst(burst))
    }

    pub fn logins(&self) -> &LoginThrottle {
        &self.logins
    }

    /// Waits for a password-hashing slot; `None` if none frees up in time.
    pub async fn hashing_slot(&self) -> Option<SemaphorePermit<'_>> {
        tokio::time::timeout(Duration::from_secs(10), self.hashing.acquire()).await.ok()?.ok()
    }
}

/// Open sockets per key.
struct Counter<K> {
    counts: Mutex<HashMap<K, usize>>,
}

impl<K> Default for Counter<K> {
    fn default() -> Self {
        Self { counts: Mutex::new(HashMap::new()) }
    }
}

impl<K: Hash + Eq + Copy + Send + 'static> Counter<K> {
    fn acquire(counter: &Arc<Self>, key: K, max: usize) -> Option<Slot<K>> {
        let mut counts = counter.lock();
        let count = counts.entry(key).or_insert(0);
        if *count >= max {
            return None;
        }
        *count += 1;
        Some(Slot { counter: counter.clone(), key })
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<K, usize>> {
        // Counts are plain integers; a poisoned lock still holds valid ones.
        self.counts.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

struct Slot<K: Hash + Eq + Copy + Send + 'static> {
    counter: Arc<Counter<K>>,
    key: K,
}

impl<K: Hash + Eq + Copy + Send + 'static> Drop for Slot<K> {
    fn drop(&mut self) {
        let mut counts = self.counter.lock();
        if let Some(count) = counts.get_mut(&self.key) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.key);
            }
        }
    }
}

/// A socket's place under the per-IP and per-credential limits, given back
/// when the socket closes.
pub struct SocketSlots {
    _ip: Slot<IpAddr>,
    _credential: Slot<[u8; 32]>,
}

impl std::fmt::Debug for SocketSlots {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SocketSlots")
    }
}

/// Failed logins per key (an account's e-mail, or an IP) within a window.
/// At `max` failures the key is locked until the oldest one leaves the
/// window: answers come at once (HTTP 429), without hashing a password.
pub struct LoginThrottle {
    max: usize,
    window: Duration,
    failures: Mutex<HashMap<String, VecDeque<Instant>>>,
}

impl LoginThrottle {
    fn new(max: usize, window: Duration) -> Self {
        Self { max: max.max(1), window, failures: Mutex::new(HashMap::new()) }
    }

    /// `Err(retry_after)` when any of `keys` is locked.
    pub fn check(&self, keys: &[String]) -> Result<(), Duration> {
        let now = Instant::now();
        let mut failures = self.lock();
        let mut wait = Duration::ZERO;
        for key in keys {
            if let Some(times) = failures.get_mut(key) {
                Self::forget_old(times, now, self.window);
                if times.len() >= self.max {
                    let unlocks = times[times.len() - self.max] + self.window;
                    wait = wait.max(unlocks.saturating_duration_since(now));
                }
            }
        }
        if wait.is_zero() { Ok(()) } else { Err(wait.max(Duration::from_secs(1))) }
    }

    pub fn record_failure(&self, keys: &[String]) {
        let now = Instant::now();
        let mut failures = self.lock();
        // Keep the table bounded under a flood of distinct keys.
        if failures.len() > 100_000 {
            failures
                .retain(|_, times| times.back().is_some_and(|last| now.duration_since(*last) < self.window));
        }
        for key in keys {
            let times = failures.entry(key.clone()).or_default();
            Self::forget_old(times, now, self.window);
            times.push_back(now);
        }
    }

    /// A successful login clears its account's failures (not its IP's).
    pub fn clear(&self, key: &str) {
        self.lock().remove(key);
    }

    fn forget_old(times: &mut VecDeque<Instant>, now: Instant, window: Duration) {
        while times.front().is_some_and(|first| now.duration_since(*first) >= window) {
            times.pop_front();
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, VecDeque<Instant>>> {
        self.failures.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logins_lock_after_the_configured_failures() {
        let throttle = LoginThrottle::new(3, Duration::from_secs(60));
        let keys = ["account:a".to_owned(), "ip:1".to_owned()];
        for _ in 0..3 {
            assert!(throttle.check(&keys).is_ok());
            throttle.record_failure(&keys);
        }
        let wait = throttle.check(&keys).unwrap_err();
        assert!(wait > Duration::from_secs(50) && wait <= Duration::from_secs(60));
        throttle.clear("account:a");
        assert!(throttle.check(&["account:a".to_owned()]).is_ok());
        assert!(throttle.check(&["ip:1".to_owned()]).is_err(), "the IP stays locked");
    }

    #[test]
    fn socket_slots_are_counted_and_given_back() {
        let counter: Arc<Counter<u8>> = Arc::default();
        let first = Counter::acquire(&counter, 1, 2).unwrap();
        let _second = Counter::acquire(&counter, 1, 2).unwrap();
        assert!(Counter::acquire(&counter, 1, 2).is_none());
        assert!(Counter::acquire(&counter, 2, 2).is_some(), "other keys are independent");
        drop(first);
        assert!(Counter::acquire(&counter, 1, 2).is_some());
    }
}

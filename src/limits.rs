//! Abuse limits:
//! - kept in the store, so they hold across instances sharing a database:
//!   failed logins per account and address, per address and per account
//!   (docs/reliability.md), and new chat sessions per IP;
//! - kept in this process: message rates per connection, open connections
//!   per IP (counted at accept, before a byte is read), open sockets per IP
//!   and per credential, event streams per login, and a small pool for
//!   password hashing so a login flood cannot take the CPU from chat traffic.
//!
//! An IPv6 address is limited by its /64 prefix, the block one subscriber
//! is usually given, so one host cannot multiply its allowance by rotating
//! addresses.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use haven_store::{Store, StoreError};
use tokio::sync::{Semaphore, SemaphorePermit};

use crate::config::LimitArgs;

/// The limiters shared by every request and connection.
pub struct Limits {
    pub settings: LimitArgs,
    /// New anonymous chat sessions per client IP, per minute.
    sessions: SharedLimit,
    /// Failed logins, by key: `pair:EMAIL|ADDRESS` and `ip:ADDRESS` lock,
    /// `account:EMAIL` slows down.
    logins: SharedLimit,
    connections_per_ip: Arc<Counter<IpAddr>>,
    sockets_per_ip: Arc<Counter<IpAddr>>,
    sockets_per_credential: Arc<Counter<[u8; 32]>>,
    event_streams_per_login: Arc<Counter<[u8; 32]>>,
    /// At most this many password hashes are computed at once.
    hashing: Semaphore,
}

impl Limits {
    pub fn new(settings: LimitArgs) -> Self {
        Self {
            sessions: SharedLimit {
                kind: "session",
                max: settings.sessions_per_ip_per_minute.into(),
                window: Duration::from_secs(60),
            },
            logins: SharedLimit {
                kind: "login_failure",
                max: settings.login_failures as i64,
                window: Duration::from_secs(settings.login_lock_minutes * 60),
            },
            connections_per_ip: Arc::default(),
            sockets_per_ip: Arc::default(),
            sockets_per_credential: Arc::default(),
            event_streams_per_login: Arc::default(),
            hashing: Semaphore::new(settings.password_hash_workers.max(1)),
            settings,
        }
    }

    /// May this IP create another chat session now? `Some(wait)` says when
    /// to retry. An allowed session is counted.
    pub async fn new_session(&self, store: &dyn Store, ip: IpAddr) -> Result<Option<Duration>, StoreError> {
        let key = [limit_key(ip).to_string()];
        if let Some(wait) = self.sessions.locked(store, &key).await? {
            return Ok(Some(wait));
        }
        self.sessions.record(store, &key).await?;
        Ok(None)
    }

    /// How long a login to this account (its `account:` key) waits before
    /// its password is checked: nothing below [`SLOWDOWN_AFTER`] failures in
    /// the window, then 250 ms, doubling with each failure, up to
    /// [`SLOWDOWN_MAX`]. Failures from anywhere slow an account down; they
    /// never lock it (only the pair of account and address is locked), and a
    /// browser that has logged in to it before is not slowed.
    pub async fn login_delay(&self, store: &dyn Store, account_key: &str) -> Result<Duration, StoreError> {
        let since = now_ms() - self.logins.window.as_millis() as i64;
        let (failures, _) = store.count_rate_events(self.logins.kind, account_key, since).await?;
        Ok(account_delay(failures))
    }

    /// `Some(wait)` when any of these login keys is locked.
    pub async fn login_locked(
        &self,
        store: &dyn Store,
        keys: &[String],
    ) -> Result<Option<Duration>, StoreError> {
        self.logins.locked(store, keys).await
    }

    pub async fn login_failed(&self, store: &dyn Store, keys: &[String]) -> Result<(), StoreError> {
        self.logins.record(store, keys).await
    }

    /// A successful login clears these keys' failures (its account's, and
    /// its pair of account and address; not its address's).
    pub async fn login_succeeded(&self, store: &dyn Store, keys: &[&str]) -> Result<(), StoreError> {
        for key in keys {
            store.clear_rate_events(self.logins.kind, key).await?;
        }
        Ok(())
    }

    /// A slot for one more open socket from this IP with this credential, or
    /// `None` when either is at its limit.
    pub fn open_socket(&self, ip: IpAddr, credential: [u8; 32]) -> Option<SocketSlots> {
        let ip_slot = Counter::acquire(&self.sockets_per_ip, limit_key(ip), self.settings.max_sockets_per_ip)
            .or_else(|| refused("sockets_per_ip"))?;
        let credential_slot = Counter::acquire(
            &self.sockets_per_credential,
            credential,
            self.settings.max_sockets_per_credential,
        )
        .or_else(|| refused("sockets_per_credential"))?;
        Some(SocketSlots { _ip: ip_slot, _credential: credential_slot })
    }

    /// A slot for one more TCP connection from this IP, taken at accept;
    /// `None` when the IP is at its limit.
    pub fn open_connection(&self, ip: IpAddr) -> Option<Slot<IpAddr>> {
        Counter::acquire(&self.connections_per_ip, limit_key(ip), self.settings.max_connections_per_ip)
            .or_else(|| refused("connections_per_ip"))
    }

    /// A slot for one more appointments event stream of this login (the
    /// hash of its session token); `None` when the login is at its limit.
    pub fn open_event_stream(&self, login: [u8; 32]) -> Option<Slot<[u8; 32]>> {
        Counter::acquire(&self.event_streams_per_login, login, self.settings.max_event_streams_per_login)
            .or_else(|| refused("event_streams_per_login"))
    }

    /// A per-connection message limiter: `message_rate`/s, bursts of `message_burst`.
    pub fn message_limiter(&self) -> DefaultDirectRateLimiter {
        let rate = NonZeroU32::new(self.settings.message_rate.max(1)).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(self.settings.message_burst.max(1)).unwrap_or(NonZeroU32::MIN);
        RateLimiter::direct(Quota::per_second(rate).allow_burst(burst))
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

/// A place under a limit, given back when dropped.
pub struct Slot<K: Hash + Eq + Copy + Send + 'static> {
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

/// A sliding-window limit whose events are kept in the store: `max`
/// events per key within `window`. A locked key is answered at once.
struct SharedLimit {
    kind: &'static str,
    max: i64,
    window: Duration,
}

impl SharedLimit {
    async fn locked(&self, store: &dyn Store, keys: &[String]) -> Result<Option<Duration>, StoreError> {
        let now = now_ms();
        let window = self.window.as_millis() as i64;
        let mut wait = 0;
        for key in keys {
            let (count, oldest) = store.count_rate_events(self.kind, key, now - window).await?;
            if count >= self.max.max(1) {
                wait = wait.max(oldest.unwrap_or(now) + window - now);
            }
        }
        Ok((wait > 0).then(|| Duration::from_millis(wait as u64).max(Duration::from_secs(1))))
    }

    async fn record(&self, store: &dyn Store, keys: &[String]) -> Result<(), StoreError> {
        let now = now_ms();
        for key in keys {
            store.record_rate_event(self.kind, key, now).await?;
        }
        Ok(())
    }
}

/// Failures of an account, within the login window, before its logins slow down.
const SLOWDOWN_AFTER: i64 = 5;
/// The longest a login waits for its account's failures.
const SLOWDOWN_MAX: Duration = Duration::from_secs(8);

fn account_delay(failures: i64) -> Duration {
    if failures < SLOWDOWN_AFTER {
        return Duration::ZERO;
    }
    let doublings = (failures - SLOWDOWN_AFTER).min(16) as u32;
    (Duration::from_millis(250) * 2u32.pow(doublings)).min(SLOWDOWN_MAX)
}

/// The key an address is limited by: IPv4 addresses (and IPv4-mapped IPv6
/// ones) as they are, other IPv6 addresses by their /64 prefix.
pub fn limit_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
        },
    }
}

fn now_ms() -> i64 {
    (haven_store::now().unix_timestamp_nanos() / 1_000_000) as i64
}

/// Counts a refusal by `limit` (the `haven_rate_limited_total` series).
pub fn count_refusal(limit: &'static str) {
    metrics::counter!("haven_rate_limited_total", "limit" => limit).increment(1);
}

/// [`count_refusal`], for a slot that could not be taken: always `None`.
fn refused<T>(limit: &'static str) -> Option<T> {
    count_refusal(limit);
    None
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn an_accounts_failures_slow_its_logins_down_up_to_a_bound() {
        assert_eq!(account_delay(SLOWDOWN_AFTER - 1), Duration::ZERO);
        assert_eq!(account_delay(SLOWDOWN_AFTER), Duration::from_millis(250));
        assert_eq!(account_delay(SLOWDOWN_AFTER + 2), Duration::from_secs(1));
        assert_eq!(account_delay(10_000), SLOWDOWN_MAX);
    }

    #[test]
    fn ipv6_addresses_are_limited_by_their_64_prefix() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(limit_key(ip("2001:db8:1:2:aaaa::1")), ip("2001:db8:1:2::"));
        assert_eq!(limit_key(ip("2001:db8:1:2:bbbb::9")), limit_key(ip("2001:db8:1:2:aaaa::1")));
        assert_ne!(limit_key(ip("2001:db8:1:3::1")), limit_key(ip("2001:db8:1:2::1")));
        assert_eq!(limit_key(ip("::ffff:192.0.2.7")), ip("192.0.2.7"));
        assert_eq!(limit_key(ip("192.0.2.7")), ip("192.0.2.7"));
    }
}

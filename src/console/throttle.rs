//! Throttling of the console's anonymous calls: failed logins back off
//! exponentially, per account and per client address; sign-ups and token
//! requests back off per address. In memory, per replica: with N replicas
//! an attacker gets at most N times the attempts.
//!
//! An attempt is *reserved* before its password is verified (it counts as a
//! failure until it succeeds), so however many guesses arrive in parallel,
//! at most the free ones plus one are ever verified before the back-off
//! applies. Accounts and addresses live in separate bounded maps: a flood
//! of addresses can never evict an account's back-off. IPv6 addresses are
//! counted per /64 (one subscriber's usual allocation).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;

use chrono::{DateTime, Duration, Utc};

/// Failures allowed before backing off, per account and per address
/// (addresses are shared behind NAT, so they get more).
const FREE_PER_ACCOUNT: u32 = 5;
const FREE_PER_ADDRESS: u32 = 20;
/// Sign-ups and token requests (which send mail) allowed per address
/// before backing off.
const FREE_MAIL_PER_ADDRESS: u32 = 5;
/// Longest back-off.
const MAX_BACKOFF_SECS: i64 = 15 * 60;
/// Failures older than this are forgotten.
const FORGET_AFTER_SECS: i64 = 3600;
/// Entries kept at most, per map.
const MAX_ACCOUNTS: usize = 100_000;
const MAX_ADDRESSES: usize = 100_000;

#[derive(Debug, Clone, Copy)]
struct Failures {
    count: u32,
    last: DateTime<Utc>,
    blocked_until: DateTime<Utc>,
}

/// A bounded map of back-off counters. When full, forgotten entries go
/// first, then the least recently seen one.
#[derive(Debug)]
struct Backoff {
    free: u32,
    capacity: usize,
    entries: HashMap<String, Failures>,
}

impl Backoff {
    fn new(free: u32, capacity: usize) -> Self {
        Self {
            free,
            capacity,
            entries: HashMap::new(),
        }
    }

    /// Milliseconds `key` must still wait (0: none).
    fn wait_ms(&self, key: &str, now: DateTime<Utc>) -> i64 {
        self.entries
            .get(key)
            .map_or(0, |f| (f.blocked_until - now).num_milliseconds().max(0))
    }

    fn make_room(&mut self, now: DateTime<Utc>) {
        if self.entries.len() < self.capacity {
            return;
        }
        let horizon = now - Duration::seconds(FORGET_AFTER_SECS);
        self.entries
            .retain(|_, f| f.last > horizon || f.blocked_until > now);
        if self.entries.len() >= self.capacity {
            // The least recently seen entry that is not backing off, else
            // the least recently seen one; O(n), only while full.
            if let Some(oldest) = self
                .entries
                .iter()
                .min_by_key(|(_, f)| (f.blocked_until > now, f.last))
                .map(|(k, _)| k.clone())
            {
                self.entries.remove(&oldest);
            }
        }
    }

    /// Counts one failure; past the free ones each doubles the wait.
    fn count(&mut self, key: &str, now: DateTime<Utc>) {
        if !self.entries.contains_key(key) {
            self.make_room(now);
        }
        let free = self.free;
        let f = self.entries.entry(key.to_string()).or_insert(Failures {
            count: 0,
            last: now,
            blocked_until: now,
        });
        if (now - f.last).num_seconds() > FORGET_AFTER_SECS {
            f.count = 0;
        }
        f.count += 1;
        f.last = now;
        if f.count > free {
            let exp = (f.count - free - 1).min(20);
            let secs = (1i64 << exp).min(MAX_BACKOFF_SECS);
            f.blocked_until = now + Duration::seconds(secs);
        }
    }

    fn forget(&mut self, key: &str) {
        self.entries.remove(key);
    }

    /// Takes back one counted failure (a reservation that turned out not
    /// to be one); below the free attempts the back-off ends.
    fn refund(&mut self, key: &str, now: DateTime<Utc>) {
        if let Some(f) = self.entries.get_mut(key) {
            f.count = f.count.saturating_sub(1);
            if f.count <= self.free {
                f.blocked_until = f.blocked_until.min(now);
            }
        }
    }
}

/// Whole seconds, rounded up: never "retry in 0 s".
fn retry_after(wait_ms: i64) -> Result<(), u64> {
    if wait_ms > 0 {
        Err((wait_ms as u64).div_ceil(1000))
    } else {
        Ok(())
    }
}

/// The throttling key of a client address: IPv4 as is, IPv6 by /64
/// (IPv4-mapped IPv6 as IPv4). Anything else (a test's label) as given.
pub fn address_key(address: &str) -> String {
    match address.parse::<IpAddr>() {
        Ok(IpAddr::V6(v6)) => match v6.to_ipv4_mapped() {
            Some(v4) => v4.to_string(),
            None => {
                let s = v6.segments();
                format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
            }
        },
        Ok(IpAddr::V4(v4)) => v4.to_string(),
        Err(_) => address.to_string(),
    }
}

/// Who is trying: the account (email) and the client address.
#[derive(Debug, Clone, Copy)]
pub struct Attempt<'a> {
    pub account: &'a str,
    pub address: &'a str,
}

#[derive(Debug)]
struct Maps {
    accounts: Backoff,
    addresses: Backoff,
}

/// Failed-login counters.
#[derive(Debug)]
pub struct LoginThrottle {
    maps: Mutex<Maps>,
}

impl Default for LoginThrottle {
    fn default() -> Self {
        Self::with_capacity(MAX_ACCOUNTS, MAX_ADDRESSES)
    }
}

impl LoginThrottle {
    /// A throttle keeping at most this many accounts and addresses.
    pub fn with_capacity(accounts: usize, addresses: usize) -> Self {
        Self {
            maps: Mutex::new(Maps {
                accounts: Backoff::new(FREE_PER_ACCOUNT, accounts.max(1)),
                addresses: Backoff::new(FREE_PER_ADDRESS, addresses.max(1)),
            }),
        }
    }

    /// Reserves an attempt: `Err(seconds)` while the account or the address
    /// is backing off; otherwise the attempt is counted as a failure now
    /// (in the same critical section), until [`Self::succeeded`] says
    /// otherwise.
    pub fn reserve(&self, attempt: Attempt<'_>, now: DateTime<Utc>) -> Result<(), u64> {
        let mut maps = self.maps.lock().unwrap_or_else(|e| e.into_inner());
        let address = address_key(attempt.address);
        let wait = maps
            .accounts
            .wait_ms(attempt.account, now)
            .max(maps.addresses.wait_ms(&address, now));
        retry_after(wait)?;
        maps.accounts.count(attempt.account, now);
        maps.addresses.count(&address, now);
        Ok(())
    }

    /// A successful login clears the account's failures and takes back its
    /// reservation from the address (whose earlier failures stay).
    pub fn succeeded(&self, attempt: Attempt<'_>, now: DateTime<Utc>) {
        let mut maps = self.maps.lock().unwrap_or_else(|e| e.into_inner());
        maps.accounts.forget(attempt.account);
        maps.addresses.refund(&address_key(attempt.address), now);
    }

    /// An attempt that was never verified (the server was busy): its
    /// reservation is taken back from both counters.
    pub fn abandoned(&self, attempt: Attempt<'_>, now: DateTime<Utc>) {
        let mut maps = self.maps.lock().unwrap_or_else(|e| e.into_inner());
        maps.accounts.refund(attempt.account, now);
        maps.addresses.refund(&address_key(attempt.address), now);
    }

    #[cfg(test)]
    fn sizes(&self) -> (usize, usize) {
        let maps = self.maps.lock().unwrap();
        (maps.accounts.entries.len(), maps.addresses.entries.len())
    }
}

/// Counters of calls that create accounts or send mail (SignUp,
/// RequestPasswordReset, RequestEmailVerification), by client address
/// (IPv6 by /64) or by email address: every call counts.
#[derive(Debug)]
pub struct MailThrottle {
    keys: Mutex<Backoff>,
}

impl Default for MailThrottle {
    fn default() -> Self {
        Self {
            keys: Mutex::new(Backoff::new(FREE_MAIL_PER_ADDRESS, MAX_ADDRESSES)),
        }
    }
}

impl MailThrottle {
    /// Counts a call for `key` (a client or email address); `Err(seconds)`
    /// while it backs off.
    pub fn reserve(&self, key: &str, now: DateTime<Utc>) -> Result<(), u64> {
        let mut map = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        let key = address_key(key);
        retry_after(map.wait_ms(&key, now))?;
        map.count(&key, now);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_back_off_per_account_and_per_address() {
        let t = LoginThrottle::default();
        let now = Utc::now();
        let a = Attempt {
            account: "ada@example.com",
            address: "10.0.0.1",
        };
        for _ in 0..FREE_PER_ACCOUNT {
            assert!(t.reserve(a, now).is_ok());
        }
        assert!(t.reserve(a, now).is_ok(), "the free attempts are free");
        assert_eq!(t.reserve(a, now), Err(1));
        assert!(t.reserve(a, now + Duration::seconds(1)).is_ok());
        assert_eq!(t.reserve(a, now + Duration::seconds(1)), Err(2));
        // Another address, same account: still backing off.
        let b = Attempt {
            address: "10.0.0.2",
            ..a
        };
        assert!(t.reserve(b, now).is_err());
        // Many accounts from one address: the address backs off.
        for i in 0..=FREE_PER_ADDRESS {
            let c = Attempt {
                account: &format!("u{i}@example.com"),
                address: "10.0.0.3",
            };
            let _ = t.reserve(c, now);
        }
        let fresh = Attempt {
            account: "new@example.com",
            address: "10.0.0.3",
        };
        assert!(t.reserve(fresh, now).is_err());
        t.succeeded(a, now);
        let elsewhere = Attempt {
            address: "10.0.0.9",
            ..a
        };
        assert!(t.reserve(elsewhere, now).is_ok());
    }

    #[test]
    fn successful_and_abandoned_attempts_do_not_count_as_failures() {
        let t = LoginThrottle::default();
        let now = Utc::now();
        // Many people behind one NAT log in successfully.
        for i in 0..3 * FREE_PER_ADDRESS {
            let account = format!("u{i}@example.com");
            let a = Attempt {
                account: &account,
                address: "10.0.0.1",
            };
            assert!(t.reserve(a, now).is_ok(), "login {i}");
            t.succeeded(a, now);
        }
        // Attempts the server was too busy to verify are given back.
        let a = Attempt {
            account: "ada@example.com",
            address: "10.0.0.2",
        };
        for i in 0..3 * FREE_PER_ACCOUNT {
            assert!(t.reserve(a, now).is_ok(), "attempt {i}");
            t.abandoned(a, now);
        }
    }

    #[test]
    fn ipv6_addresses_count_per_64_and_mapped_ipv4_as_ipv4() {
        assert_eq!(address_key("2001:db8:1:2:aaaa::1"), "2001:db8:1:2::/64");
        assert_eq!(
            address_key("2001:db8:1:2:ffff:ffff:ffff:ffff"),
            address_key("2001:db8:1:2::7")
        );
        assert_ne!(
            address_key("2001:db8:1:3::1"),
            address_key("2001:db8:1:2::1")
        );
        assert_eq!(address_key("::ffff:192.0.2.7"), "192.0.2.7");
        assert_eq!(address_key("192.0.2.7"), "192.0.2.7");
        // Rotating through a /64 does not dodge the address throttle.
        let t = LoginThrottle::default();
        let now = Utc::now();
        let mut refused = 0;
        for i in 0..=FREE_PER_ADDRESS + 1 {
            let address = format!("2001:db8::{i:x}");
            let account = format!("u{i}@example.com");
            let attempt = Attempt {
                account: &account,
                address: &address,
            };
            refused += t.reserve(attempt, now).is_err() as u32;
        }
        assert_eq!(refused, 1);
    }

    #[test]
    fn a_flood_of_addresses_never_evicts_an_accounts_back_off() {
        let t = LoginThrottle::with_capacity(4, 4);
        let now = Utc::now();
        let victim = Attempt {
            account: "ada@example.com",
            address: "10.0.0.1",
        };
        while t.reserve(victim, now).is_ok() {}
        // Thousands of addresses and accounts: both maps stay bounded, and
        // the account that is backing off keeps backing off.
        for i in 0..5000u32 {
            let address = std::net::Ipv4Addr::from(0x0a00_0000 + i + 2).to_string();
            let account = format!("u{i}@example.com");
            let _ = t.reserve(
                Attempt {
                    account: &account,
                    address: &address,
                },
                now,
            );
        }
        let (accounts, addresses) = t.sizes();
        assert!(accounts <= 4 && addresses <= 4, "{accounts} {addresses}");
        assert!(t
            .reserve(
                Attempt {
                    address: "10.9.9.9",
                    ..victim
                },
                now
            )
            .is_err());
    }

    #[test]
    fn mail_sending_calls_back_off_per_address() {
        let t = MailThrottle::default();
        let now = Utc::now();
        for _ in 0..=FREE_MAIL_PER_ADDRESS {
            assert!(t.reserve("10.0.0.1", now).is_ok());
        }
        assert!(t.reserve("10.0.0.1", now).is_err());
        assert!(t.reserve("10.0.0.2", now).is_ok());
    }
}

//! Login throttling: failed attempts back off exponentially, per account
//! and per client address. In memory, per replica (a small, bounded map):
//! with N replicas an attacker gets at most N times the attempts.

use std::collections::HashMap;
use std::sync::Mutex;

use chrono::{DateTime, Duration, Utc};

/// Failures allowed before backing off, per account and per address
/// (addresses are shared behind NAT, so they get more).
const FREE_PER_ACCOUNT: u32 = 5;
const FREE_PER_ADDRESS: u32 = 20;
/// Longest back-off.
const MAX_BACKOFF_SECS: i64 = 15 * 60;
/// Failures older than this are forgotten.
const FORGET_AFTER_SECS: i64 = 3600;
/// Entries kept at most (oldest forgotten first when full).
const MAX_ENTRIES: usize = 100_000;

#[derive(Debug, Clone, Copy)]
struct Failures {
    count: u32,
    last: DateTime<Utc>,
    blocked_until: DateTime<Utc>,
}

/// Who is trying: the account (email) and the client address.
#[derive(Debug, Clone, Copy)]
pub struct Attempt<'a> {
    pub account: &'a str,
    pub address: &'a str,
}

impl Attempt<'_> {
    fn keys(&self) -> [(String, u32); 2] {
        [
            (format!("a:{}", self.account), FREE_PER_ACCOUNT),
            (format!("ip:{}", self.address), FREE_PER_ADDRESS),
        ]
    }
}

/// Failed-login counters.
#[derive(Debug, Default)]
pub struct LoginThrottle {
    failures: Mutex<HashMap<String, Failures>>,
}

impl LoginThrottle {
    /// `Err(seconds)` while either the account or the address is backing off.
    pub fn check(&self, attempt: Attempt<'_>, now: DateTime<Utc>) -> Result<(), u64> {
        let map = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        let wait = attempt
            .keys()
            .iter()
            .filter_map(|(k, _)| map.get(k))
            .map(|f| (f.blocked_until - now).num_milliseconds())
            .max()
            .unwrap_or(0);
        if wait > 0 {
            // Whole seconds, rounded up: never "retry in 0 s".
            Err((wait as u64).div_ceil(1000))
        } else {
            Ok(())
        }
    }

    /// Records a failure; past the free attempts each one doubles the wait.
    pub fn failed(&self, attempt: Attempt<'_>, now: DateTime<Utc>) {
        let mut map = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() >= MAX_ENTRIES {
            let horizon = now - Duration::seconds(FORGET_AFTER_SECS);
            map.retain(|_, f| f.last > horizon);
            if map.len() >= MAX_ENTRIES {
                tracing::warn!("login throttle is full; forgetting every entry");
                map.clear();
            }
        }
        for (key, free) in attempt.keys() {
            let f = map.entry(key).or_insert(Failures {
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
    }

    /// A successful login clears the account's failures (not the address's).
    pub fn succeeded(&self, attempt: Attempt<'_>) {
        let mut map = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        map.remove(&format!("a:{}", attempt.account));
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
            assert!(t.check(a, now).is_ok());
            t.failed(a, now);
        }
        assert!(t.check(a, now).is_ok(), "the free attempts are free");
        t.failed(a, now);
        assert_eq!(t.check(a, now), Err(1));
        t.failed(a, now);
        assert_eq!(t.check(a, now), Err(2));
        assert!(t.check(a, now + Duration::seconds(3)).is_ok());
        // Another address, same account: still backing off.
        let b = Attempt {
            address: "10.0.0.2",
            ..a
        };
        assert!(t.check(b, now).is_err());
        // Many accounts from one address: the address backs off.
        for i in 0..=FREE_PER_ADDRESS {
            let c = Attempt {
                account: &format!("u{i}@example.com"),
                address: "10.0.0.3",
            };
            t.failed(c, now);
        }
        let fresh = Attempt {
            account: "new@example.com",
            address: "10.0.0.3",
        };
        assert!(t.check(fresh, now).is_err());
        t.succeeded(a);
        assert!(t
            .check(
                Attempt {
                    address: "10.0.0.9",
                    ..a
                },
                now
            )
            .is_ok());
    }
}

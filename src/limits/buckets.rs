//! Generic rate buckets: limits that belong to no key or tenant, such as
//! an Envoy rate-limit descriptor declared in the profile (`remote_address`,
//! a path, a header value). They are the same GCRA cells as key and tenant
//! rates, in the same cache, so they are shared across replicas by the same
//! rate-share exchange (their published name is `<period>|<env>|d:<id>`).

use std::sync::Arc;

use sha2::{Digest, Sha256};

use super::gcra::Rate;
use super::shares::{self, CellKey, RateCell};
use super::{ceil_secs, Limiter, Owner};
use crate::domain::LimitPeriod;

/// A bucket's identity: the first 128 bits of SHA-256 over its parts
/// (length-prefixed, so no two different part lists collide by joining),
/// as 32 lower-case hex characters. Fixed length and no separators, so it
/// fits a rate-share cell name whatever the descriptor values hold.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BucketId(String);

impl BucketId {
    /// The bucket of these parts (for Envoy: the domain, then each entry's
    /// key and value).
    pub fn of<'a>(parts: impl IntoIterator<Item = &'a str>) -> Self {
        let mut h = Sha256::new();
        for p in parts {
            h.update((p.len() as u64).to_be_bytes());
            h.update(p.as_bytes());
        }
        Self(hex::encode(&h.finalize()[..16]))
    }

    /// Reads an id back from a published cell name.
    pub fn parse(s: &str) -> Option<Self> {
        (s.len() == 32 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
            .then(|| Self(s.to_string()))
    }
}

impl std::fmt::Display for BucketId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// One rate of a bucket: `limit` units per `period` (second, minute or
/// hour), bursting to `limit`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BucketRate {
    pub limit: u64,
    pub period: LimitPeriod,
}

/// What checking a bucket found.
#[derive(Debug)]
pub struct BucketOutcome {
    pub allowed: bool,
    /// Whole units still available after this request.
    pub remaining: u64,
    /// Nanoseconds until the bucket is full again.
    pub reset_ns: u64,
    /// Seconds until a denied request of the same cost could pass (0 when
    /// allowed).
    pub retry_after_seconds: u32,
    /// What was taken, to give back if the request is refused elsewhere.
    pub taken: Option<BucketTaken>,
}

/// Units taken from a bucket; [`Limiter::refund_bucket`] gives them back.
#[derive(Debug)]
pub struct BucketTaken {
    cell: Arc<RateCell>,
    rate: Rate,
    cost: u64,
}

impl Limiter {
    /// Checks `rate` of bucket `id` for `cost` units and, when `consume`,
    /// takes them if they fit (a denial takes nothing). `None` for a period
    /// that is not a rate (day, month).
    pub fn check_bucket(
        &self,
        id: &BucketId,
        rate: BucketRate,
        cost: u64,
        consume: bool,
    ) -> Option<BucketOutcome> {
        let period_ns = rate.period.rate_ns()?;
        let now_ns = self.clock.monotonic_ns();
        let replicas = self.replicas();
        let key = CellKey {
            owner: Owner::Bucket(id.clone()),
            period: rate.period,
            env: None,
        };
        let cell = self
            .cells
            .get_with_by_ref(&key, || self.tracked.cell_for(&key));
        let gcra_rate = cell.rate(
            now_ns,
            rate.limit,
            period_ns,
            rate.limit,
            cell.fraction(replicas),
        );
        let cost = cost.max(1);
        if consume && self.sharing.load(std::sync::atomic::Ordering::Relaxed) && replicas > 1 {
            let demand = cell.note(now_ns, shares::work_ns(cost, period_ns, rate.limit));
            if demand >= shares::HOT / f64::from(replicas) {
                self.tracked.track(&key, &cell);
            }
        }
        let o = if consume {
            cell.gcra.take(now_ns, gcra_rate, cost)
        } else {
            cell.gcra.peek(now_ns, gcra_rate, cost)
        };
        Some(BucketOutcome {
            allowed: o.allowed,
            remaining: o.remaining.min(rate.limit),
            reset_ns: o.reset_ns,
            retry_after_seconds: if o.allowed {
                0
            } else {
                ceil_secs(o.retry_after_ns).max(1)
            },
            taken: (o.allowed && consume).then_some(BucketTaken {
                cell,
                rate: gcra_rate,
                cost,
            }),
        })
    }

    /// Gives back what [`Limiter::check_bucket`] took.
    pub fn refund_bucket(&self, taken: BucketTaken) {
        taken.cell.gcra.refund(taken.rate, taken.cost);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::Clock;
    use crate::store::MemoryStore;

    fn limiter() -> Limiter {
        let clock = Clock::system();
        clock.freeze_at("2027-01-31T12:00:00Z".parse().unwrap());
        Limiter::new(Arc::new(MemoryStore::new()), clock)
    }

    #[test]
    fn a_bucket_admits_its_limit_then_refuses_and_a_refund_gives_units_back() {
        let l = limiter();
        let id = BucketId::of(["edge", "remote_address", "10.0.0.1"]);
        let other = BucketId::of(["edge", "remote_address", "10.0.0.2"]);
        let rate = BucketRate {
            limit: 3,
            period: LimitPeriod::Minute,
        };
        let mut taken = Vec::new();
        for left in [2, 1, 0] {
            let o = l.check_bucket(&id, rate, 1, true).unwrap();
            assert!(o.allowed);
            assert_eq!(o.remaining, left);
            taken.push(o.taken.unwrap());
        }
        let o = l.check_bucket(&id, rate, 1, true).unwrap();
        assert!(!o.allowed, "the fourth of 3 per minute");
        assert!(o.taken.is_none(), "a denial takes nothing");
        assert_eq!(o.retry_after_seconds, 20, "one unit per 20 s");
        assert!(l.check_bucket(&other, rate, 1, true).unwrap().allowed);
        l.refund_bucket(taken.pop().unwrap());
        let o = l.check_bucket(&id, rate, 1, false).unwrap();
        assert!(o.allowed && o.taken.is_none(), "a peek takes nothing");
        assert!(l.check_bucket(&id, rate, 1, true).unwrap().allowed);
        assert!(
            l.check_bucket(&id, rate, 1, true)
                .is_some_and(|o| !o.allowed),
            "the refunded unit was spent once"
        );
    }

    #[test]
    fn bucket_ids_are_fixed_length_hex_and_tell_part_lists_apart() {
        let a = BucketId::of(["ab", "c"]);
        let b = BucketId::of(["a", "bc"]);
        assert_ne!(a, b);
        assert_eq!(BucketId::parse(&a.to_string()), Some(a.clone()));
        assert_eq!(BucketId::parse("xyz"), None);
        let rate = BucketRate {
            limit: 1,
            period: LimitPeriod::Day,
        };
        assert!(limiter().check_bucket(&a, rate, 1, true).is_none());
    }
}

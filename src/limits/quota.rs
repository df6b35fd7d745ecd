//! Quota leases (ARCHITECTURE.md, Invariants). A replica reserves a chunk of a quota with
//! one conditional write in Postgres, serves requests from an atomic local
//! counter, prefetches the next chunk off the request path before it runs
//! out, and returns what is unused on graceful shutdown. The sum of leases
//! never passes the limit, so the quota is never exceeded across replicas or
//! crashes; a crash can only under-admit, by at most one chunk.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use moka::sync::Cache;

use crate::error::Result;
use crate::store::{QuotaCounter, Store};
use crate::telemetry;

/// Largest chunk leased at once.
const MAX_CHUNK: u64 = 1_000;
/// Smallest chunk (when the fair share allows it): a new counter's first
/// lease covers the next few requests too, so they need no store round
/// trip, and a database outage right after a key's first use does not turn
/// its second request into UNAVAILABLE.
const MIN_CHUNK: u64 = 16;
/// After the store said "exhausted", ask again no sooner than this (other
/// replicas may return their leases on shutdown).
const EXHAUSTED_RECHECK_NS: u64 = 1_000_000_000;

/// One replica's lease on one counter.
#[derive(Debug)]
struct Lease {
    /// Units leased to this replica and not yet used.
    local: AtomicU64,
    /// The limit the lease was granted under.
    limit: AtomicU64,
    /// The counter's total as of our last lease (all replicas).
    known_used: AtomicU64,
    /// While `now < exhausted_until`, the store has nothing left.
    exhausted_until: AtomicU64,
    refill: tokio::sync::Mutex<()>,
    prefetching: AtomicBool,
    window_start: AtomicU64,
    window_count: AtomicU64,
    /// Units taken per second, as last measured.
    rate: AtomicU64,
}

impl Lease {
    fn new(limit: u64) -> Self {
        Self {
            local: AtomicU64::new(0),
            limit: AtomicU64::new(limit),
            known_used: AtomicU64::new(0),
            exhausted_until: AtomicU64::new(0),
            refill: tokio::sync::Mutex::new(()),
            prefetching: AtomicBool::new(false),
            window_start: AtomicU64::new(0),
            window_count: AtomicU64::new(0),
            rate: AtomicU64::new(0),
        }
    }

    fn try_take(&self, cost: u64) -> bool {
        self.local
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |l| l.checked_sub(cost))
            .is_ok()
    }

    fn note_use(&self, now_ns: u64, cost: u64) {
        let start = self.window_start.load(Ordering::Relaxed);
        if now_ns.saturating_sub(start) >= 1_000_000_000 {
            self.rate.store(
                self.window_count.swap(0, Ordering::Relaxed),
                Ordering::Relaxed,
            );
            self.window_start.store(now_ns, Ordering::Relaxed);
        }
        self.window_count.fetch_add(cost, Ordering::Relaxed);
    }

    fn remaining(&self) -> u64 {
        let limit = self.limit.load(Ordering::Acquire);
        limit.saturating_sub(self.known_used.load(Ordering::Acquire))
            + self.local.load(Ordering::Acquire)
    }

    fn is_exhausted(&self, now_ns: u64) -> bool {
        now_ns < self.exhausted_until.load(Ordering::Acquire)
    }
}

fn count_grant(granted: u64) {
    let result = if granted == 0 { "exhausted" } else { "granted" };
    metrics::counter!(telemetry::QUOTA_LEASES, "result" => result).increment(1);
    metrics::counter!(telemetry::QUOTA_LEASE_UNITS, "direction" => "leased").increment(granted);
}

/// The answer for one quota.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuotaOutcome {
    pub allowed: bool,
    /// Units left in the period across all replicas (approximate: leased
    /// units other replicas have not used yet count as used).
    pub remaining: u64,
}

/// All of this replica's leases.
pub struct Quotas {
    store: Arc<dyn Store>,
    leases: Cache<QuotaCounter, Arc<Lease>>,
    replicas: Arc<AtomicU32>,
}

impl std::fmt::Debug for Quotas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Quotas")
            .field("leases", &self.leases.entry_count())
            .finish()
    }
}

impl Quotas {
    /// Leases on `store`; `replicas` is the live replica count (for sizing chunks).
    pub fn new(store: Arc<dyn Store>, replicas: Arc<AtomicU32>) -> Arc<Self> {
        Arc::new(Self {
            store,
            // Periods roll over: idle leases are forgotten (their unused
            // units under-admit, never over-admit).
            leases: Cache::builder()
                .time_to_idle(Duration::from_secs(3600))
                .max_capacity(1_000_000)
                .build(),
            replicas,
        })
    }

    fn lease(&self, counter: &QuotaCounter, limit: u64) -> Arc<Lease> {
        let lease = self
            .leases
            .get_with_by_ref(counter, || Arc::new(Lease::new(limit)));
        let held = lease.limit.load(Ordering::Acquire);
        if held != limit {
            lease.limit.store(limit, Ordering::Release);
            lease.exhausted_until.store(0, Ordering::Release);
            if limit < held {
                // Lowered: units leased under the old limit must not be
                // served. Give them back.
                let unused = lease.local.swap(0, Ordering::AcqRel);
                self.give_back(counter.clone(), unused);
            }
        }
        lease
    }

    fn give_back(&self, counter: QuotaCounter, units: u64) {
        if units == 0 {
            return;
        }
        // Off any runtime (a request dropped at shutdown) the units stay
        // leased: under-admission, never over-admission.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let store = self.store.clone();
        runtime.spawn(async move {
            if let Err(e) = store.return_quota(&counter, units).await {
                tracing::warn!(error = %e, "could not return unused quota units");
            }
        });
    }

    fn chunk(&self, lease: &Lease, limit: u64, cost: u64) -> u64 {
        let replicas = u64::from(self.replicas.load(Ordering::Relaxed).max(1));
        // About a second of this replica's traffic…
        let desired = lease
            .rate
            .load(Ordering::Relaxed)
            .clamp(MIN_CHUNK, MAX_CHUNK);
        // …but no more than a fair share of what is left, so the last units
        // are not stranded on one replica.
        let left = limit.saturating_sub(lease.known_used.load(Ordering::Acquire));
        let fair = (left / (2 * replicas)).max(1);
        desired.min(fair).max(cost)
    }

    /// Consumes `cost` units of `counter` (limit `limit`) if they are left.
    pub async fn take(
        self: &Arc<Self>,
        counter: &QuotaCounter,
        limit: u64,
        cost: u64,
        now_ns: u64,
    ) -> Result<QuotaOutcome> {
        let lease = self.lease(counter, limit);
        loop {
            if lease.try_take(cost) {
                lease.note_use(now_ns, cost);
                self.maybe_prefetch(counter, &lease, limit, now_ns);
                return Ok(QuotaOutcome {
                    allowed: true,
                    remaining: lease.remaining(),
                });
            }
            if lease.is_exhausted(now_ns) {
                return Ok(QuotaOutcome {
                    allowed: false,
                    remaining: lease.remaining(),
                });
            }
            let _refill = lease.refill.lock().await;
            let local = lease.local.load(Ordering::Acquire);
            if local >= cost {
                continue;
            }
            // Only the part above the local lease is leased, all or
            // nothing: a request that does not fit takes nothing.
            let need = cost - local;
            let chunk = self.chunk(&lease, limit, need);
            let grant = self.store.lease_quota(counter, chunk, need, limit).await?;
            count_grant(grant.granted);
            lease.known_used.store(grant.used, Ordering::Release);
            if grant.granted > 0 {
                lease.local.fetch_add(grant.granted, Ordering::AcqRel);
                continue;
            }
            if grant.used >= limit {
                lease
                    .exhausted_until
                    .store(now_ns + EXHAUSTED_RECHECK_NS, Ordering::Release);
            }
            // What is left does not cover this request: refused, and the
            // rest stays for requests that fit.
            return Ok(QuotaOutcome {
                allowed: false,
                remaining: lease.remaining(),
            });
        }
    }

    fn maybe_prefetch(
        self: &Arc<Self>,
        counter: &QuotaCounter,
        lease: &Arc<Lease>,
        limit: u64,
        now_ns: u64,
    ) {
        let low_water = self.chunk(lease, limit, 1) / 2;
        if lease.local.load(Ordering::Acquire) > low_water
            || lease.is_exhausted(now_ns)
            || lease.prefetching.swap(true, Ordering::AcqRel)
        {
            return;
        }
        let this = self.clone();
        let lease = lease.clone();
        let counter = counter.clone();
        tokio::spawn(async move {
            let _refill = lease.refill.lock().await;
            let chunk = this.chunk(&lease, limit, 1);
            match this.store.lease_quota(&counter, chunk, 1, limit).await {
                Ok(grant) => {
                    count_grant(grant.granted);
                    lease.known_used.store(grant.used, Ordering::Release);
                    lease.local.fetch_add(grant.granted, Ordering::AcqRel);
                }
                Err(e) => {
                    tracing::debug!(error = %e, "quota prefetch failed; will lease on demand")
                }
            }
            lease.prefetching.store(false, Ordering::Release);
        });
    }

    /// Gives back units taken for a request another limit then denied.
    /// What a large request leased beyond a normal chunk goes back to the
    /// store at once, so local leases stay bounded and nothing is stranded
    /// on this replica.
    pub fn refund(&self, counter: &QuotaCounter, cost: u64) {
        if let Some(lease) = self.leases.get(counter) {
            let local = lease.local.fetch_add(cost, Ordering::AcqRel) + cost;
            let limit = lease.limit.load(Ordering::Acquire);
            let bound = self.chunk(&lease, limit, 1);
            if local > bound {
                let excess = local - bound;
                let taken = lease
                    .local
                    .fetch_update(Ordering::AcqRel, Ordering::Acquire, |l| {
                        Some(l.saturating_sub(excess))
                    })
                    .map(|before| before.min(excess))
                    .unwrap_or(0);
                self.give_back(counter.clone(), taken);
            }
        }
    }

    /// Units of `counter` this replica holds leased and has not used.
    pub fn unspent(&self, counter: &QuotaCounter) -> u64 {
        self.leases
            .get(counter)
            .map_or(0, |l| l.local.load(Ordering::Acquire))
    }

    /// What `take` would answer, consuming nothing.
    pub async fn peek(
        &self,
        counter: &QuotaCounter,
        limit: u64,
        cost: u64,
    ) -> Result<QuotaOutcome> {
        let remaining = match self.leases.get(counter) {
            Some(lease) => lease.remaining().min(limit),
            None => limit.saturating_sub(self.store.quota_used(counter).await?),
        };
        let allowed = remaining >= cost;
        Ok(QuotaOutcome {
            allowed,
            // Like `take`: what would remain after this request.
            remaining: if allowed { remaining - cost } else { remaining },
        })
    }

    /// Returns every unused leased unit to the store (graceful shutdown).
    pub async fn return_all(&self) -> u64 {
        let mut returned = 0;
        for (counter, lease) in self.leases.iter() {
            let unused = lease.local.swap(0, Ordering::AcqRel);
            if unused == 0 {
                continue;
            }
            match self.store.return_quota(&counter, unused).await {
                Ok(()) => {
                    returned += unused;
                    metrics::counter!(telemetry::QUOTA_LEASE_UNITS, "direction" => "returned")
                        .increment(unused);
                }
                Err(e) => tracing::warn!(error = %e, "could not return unused quota units"),
            }
        }
        returned
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;
    use chrono::Utc;

    fn counter() -> QuotaCounter {
        QuotaCounter {
            subject: "k:test".into(),
            name: "key_per_month",
            period_start: Utc::now(),
        }
    }

    #[tokio::test]
    async fn three_replicas_never_admit_more_than_the_quota() {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        let replicas: Vec<_> = (0..3)
            .map(|_| Quotas::new(store.clone(), Arc::new(AtomicU32::new(3))))
            .collect();
        let c = counter();
        let mut admitted = 0;
        for i in 0..3000u64 {
            let q = &replicas[(i % 3) as usize];
            if q.take(&c, 1000, 1, i * 1_000_000).await.unwrap().allowed {
                admitted += 1;
            }
        }
        assert_eq!(admitted, 1000, "spread traffic drains every lease");
        assert_eq!(store.quota_used(&c).await.unwrap(), 1000);
    }

    #[tokio::test]
    async fn unused_leases_are_returned_and_a_lowered_limit_denies() {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        let q = Quotas::new(store.clone(), Arc::new(AtomicU32::new(1)));
        let c = counter();
        for i in 0..50 {
            assert!(q.take(&c, 100, 1, i).await.unwrap().allowed);
        }
        let leased = store.quota_used(&c).await.unwrap();
        assert!(leased >= 50);
        let returned = q.return_all().await;
        assert_eq!(store.quota_used(&c).await.unwrap(), leased - returned);
        assert_eq!(store.quota_used(&c).await.unwrap(), 50);
        // Lowered below usage: denied until the next period.
        assert!(!q.take(&c, 40, 1, 10_000_000_000).await.unwrap().allowed);
        // Raised: admitted again at once, usage kept.
        assert!(q.take(&c, 200, 1, 10_000_000_001).await.unwrap().allowed);
        assert!(store.quota_used(&c).await.unwrap() > 50);
    }
}

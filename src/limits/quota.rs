//! Quota leases (ARCHITECTURE.md, Invariants). A replica reserves a chunk of a quota with
//! one conditional write in Postgres, serves requests from an atomic local
//! counter, prefetches the next chunk off the request path before it runs
//! out, and returns what is unused when the counter goes idle and on
//! graceful shutdown. The sum of leases never passes the limit, so the quota
//! is never exceeded across replicas, crashes or partitions.
//!
//! The store also knows who holds what (`quota_leases`): each lease adds to
//! this replica's holding in its own statement, and every report (each
//! heartbeat) lowers it by what was consumed, so usage reads consumed units,
//! not leased ones. **Only the holder frees units**, and only after taking
//! them out of what it may spend; a replica whose heartbeat expired has its
//! holding reclaimed *as consumed* (it may have admitted those units after
//! its last report, and nobody can tell). So neither a kill nor a partition
//! can make a unit spendable twice, and a partitioned replica may go on
//! spending its local lease: nobody else can be given those units. What a
//! killed replica leaves counted but unspent is bounded by the leases of
//! the counters it used in its last two report intervals: a counter's lease
//! is given back at the first beat after a whole interval without use.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use moka::sync::Cache;

use crate::error::Result;
use crate::store::{QuotaCounter, QuotaReport, Store};
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
    /// The counter's total as of our last lease or report (all replicas).
    known_used: AtomicU64,
    /// Units of it other replicas held unreported, as of the same moment.
    others: AtomicU64,
    /// Units consumed here since the last report (negative after refunds
    /// of units already reported).
    unreported: AtomicI64,
    /// A request took units since the last report.
    active: AtomicBool,
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
            others: AtomicU64::new(0),
            unreported: AtomicI64::new(0),
            active: AtomicBool::new(false),
            exhausted_until: AtomicU64::new(0),
            refill: tokio::sync::Mutex::new(()),
            prefetching: AtomicBool::new(false),
            window_start: AtomicU64::new(0),
            window_count: AtomicU64::new(0),
            rate: AtomicU64::new(0),
        }
    }

    fn try_take(&self, cost: u64) -> bool {
        let taken = self
            .local
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |l| l.checked_sub(cost))
            .is_ok();
        if taken {
            self.unreported.fetch_add(signed(cost), Ordering::AcqRel);
            self.active.store(true, Ordering::Release);
        }
        taken
    }

    /// Records the store's view after a lease or a report.
    fn learn(&self, used: u64, others: u64) {
        self.known_used.store(used, Ordering::Release);
        self.others.store(others, Ordering::Release);
    }

    /// `units` left the counter's total (given back).
    fn forget(&self, units: u64) {
        let _ = self
            .known_used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                Some(u.saturating_sub(units))
            });
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

    /// Units left in the period as this replica knows it: the limit less
    /// what was consumed (reported by every replica, plus this replica's
    /// unreported use). Other replicas' unspent leases are not consumed:
    /// `known_used` counts them, `others` gives them back.
    fn remaining(&self) -> u64 {
        let limit = self.limit.load(Ordering::Acquire);
        limit
            .saturating_sub(self.known_used.load(Ordering::Acquire))
            .saturating_add(self.others.load(Ordering::Acquire))
            .saturating_add(self.local.load(Ordering::Acquire))
            .min(limit)
    }

    fn is_exhausted(&self, now_ns: u64) -> bool {
        now_ns < self.exhausted_until.load(Ordering::Acquire)
    }
}

fn signed(units: u64) -> i64 {
    i64::try_from(units).unwrap_or(i64::MAX)
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
    /// Units left in the period across all replicas: the limit less what
    /// was consumed, as far as this replica knows (other replicas' use
    /// since their last report is not known yet).
    pub remaining: u64,
}

/// All of this replica's leases.
pub struct Quotas {
    store: Arc<dyn Store>,
    leases: Cache<QuotaCounter, Arc<Lease>>,
    replicas: Arc<AtomicU32>,
    /// This replica, as the store's holdings and heartbeats name it.
    replica: uuid::Uuid,
}

impl std::fmt::Debug for Quotas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Quotas")
            .field("leases", &self.leases.entry_count())
            .field("replica", &self.replica)
            .finish()
    }
}

impl Quotas {
    /// Leases on `store` for a new replica id; `replicas` is the live
    /// replica count (for sizing chunks).
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
            replica: uuid::Uuid::new_v4(),
        })
    }

    /// This replica's id (its heartbeat and its holdings in the store).
    pub fn replica(&self) -> uuid::Uuid {
        self.replica
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
                self.give_back(counter.clone(), &lease, unused);
            }
        }
        lease
    }

    fn give_back(&self, counter: QuotaCounter, lease: &Lease, units: u64) {
        if units == 0 {
            return;
        }
        lease.forget(units);
        // Off any runtime (a request dropped at shutdown) the units stay
        // leased: under-admission, never over-admission.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let store = self.store.clone();
        let replica = self.replica;
        runtime.spawn(async move {
            let report = QuotaReport {
                counter,
                consumed: 0,
                returned: units,
            };
            match store.report_quota(replica, &[report]).await {
                Ok(_) => count_returned(units),
                Err(e) => tracing::warn!(error = %e, "could not return unused quota units"),
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
            let grant = self
                .lease_from_store(counter, &lease, chunk, need, limit)
                .await?;
            count_grant(grant.granted);
            lease.learn(grant.used, grant.others);
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

    /// One lease write, which also reports what was consumed since the
    /// last report (so a replica that runs out, or is refused, has told
    /// the store what it spent).
    async fn lease_from_store(
        &self,
        counter: &QuotaCounter,
        lease: &Lease,
        chunk: u64,
        at_least: u64,
        limit: u64,
    ) -> Result<crate::store::QuotaGrant> {
        let consumed = lease.unreported.swap(0, Ordering::AcqRel);
        let grant = self
            .store
            .lease_quota(self.replica, counter, chunk, at_least, limit, consumed)
            .await;
        if grant.is_err() {
            lease.unreported.fetch_add(consumed, Ordering::AcqRel);
        }
        Ok(grant?)
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
            match this
                .lease_from_store(&counter, &lease, chunk, 1, limit)
                .await
            {
                Ok(grant) => {
                    count_grant(grant.granted);
                    lease.learn(grant.used, grant.others);
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
            lease.unreported.fetch_sub(signed(cost), Ordering::AcqRel);
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
                self.give_back(counter.clone(), &lease, taken);
            }
        }
    }

    /// Units of `counter` consumed here and not yet reported to the store
    /// (usage reads the store's consumed units plus these).
    pub fn unreported(&self, counter: &QuotaCounter) -> i64 {
        self.leases
            .get(counter)
            .map_or(0, |l| l.unreported.load(Ordering::Acquire))
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
            None => limit.saturating_sub(self.store.quota_consumed(counter).await?),
        };
        let allowed = remaining >= cost;
        Ok(QuotaOutcome {
            allowed,
            // Like `take`: what would remain after this request.
            remaining: if allowed { remaining - cost } else { remaining },
        })
    }

    /// Tells the store what was consumed since the last report and, if
    /// `give_back_idle`, gives back the lease of every counter no request
    /// used since then (so an idle counter's units are free for every
    /// replica, and a replica killed later leaves nothing of it stranded).
    /// One write for all counters; run on each heartbeat. Returns the units
    /// given back.
    ///
    /// Units to give back leave the local lease before the write, and stay
    /// lost if it fails (the write may have been applied): so the heartbeat
    /// passes `give_back_idle` only when the store just answered, and a
    /// replica cut off from the store keeps serving its leases.
    pub async fn report(&self, give_back_idle: bool) -> Result<u64> {
        self.send_report(if give_back_idle {
            Scope::Idle
        } else {
            Scope::None
        })
        .await
    }

    /// Returns every unused leased unit to the store (graceful shutdown).
    pub async fn return_all(&self) -> u64 {
        match self.send_report(Scope::All).await {
            Ok(returned) => returned,
            Err(e) => {
                tracing::warn!(error = %e, "could not return unused quota units");
                0
            }
        }
    }

    async fn send_report(&self, scope: Scope) -> Result<u64> {
        let mut reports = Vec::new();
        let mut leases = Vec::new();
        for (counter, lease) in self.leases.iter() {
            let active = match scope {
                // Idleness is judged only on beats that may give back.
                Scope::None => lease.active.load(Ordering::Acquire),
                Scope::Idle | Scope::All => lease.active.swap(false, Ordering::AcqRel),
            };
            // Units leave `local` before the store frees them: from here on
            // this replica cannot spend what it is giving back.
            let returned = match scope {
                Scope::All => lease.local.swap(0, Ordering::AcqRel),
                Scope::Idle if !active => lease.local.swap(0, Ordering::AcqRel),
                _ => 0,
            };
            let consumed = lease.unreported.swap(0, Ordering::AcqRel);
            if !active && returned == 0 && consumed == 0 {
                continue;
            }
            lease.forget(returned);
            reports.push(QuotaReport {
                counter: (*counter).clone(),
                consumed,
                returned,
            });
            leases.push(lease);
        }
        if reports.is_empty() {
            return Ok(0);
        }
        match self.store.report_quota(self.replica, &reports).await {
            Ok(tallies) => {
                for (lease, tally) in leases.iter().zip(tallies) {
                    lease.learn(tally.used, tally.others);
                }
                let returned = reports.iter().map(|r| r.returned).sum();
                count_returned(returned);
                Ok(returned)
            }
            Err(e) => {
                // Consumption is reported again next time (reporting it
                // twice would only overstate usage). Units taken out to be
                // returned stay leased: under-admission, never over.
                for (lease, r) in leases.iter().zip(&reports) {
                    lease.unreported.fetch_add(r.consumed, Ordering::AcqRel);
                }
                Err(e.into())
            }
        }
    }
}

/// Which leases a report gives back.
#[derive(Debug, Clone, Copy)]
enum Scope {
    None,
    /// Those of counters no request used since the last such report.
    Idle,
    /// Every lease (shutdown).
    All,
}

fn count_returned(units: u64) {
    if units > 0 {
        metrics::counter!(telemetry::QUOTA_LEASE_UNITS, "direction" => "returned").increment(units);
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

    #[tokio::test]
    async fn usage_is_what_was_consumed_once_every_replica_has_reported() {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        let a = Quotas::new(store.clone(), Arc::new(AtomicU32::new(2)));
        let b = Quotas::new(store.clone(), Arc::new(AtomicU32::new(2)));
        let c = counter();
        for i in 0..3 {
            assert!(a.take(&c, 1000, 1, i).await.unwrap().allowed);
        }
        for i in 0..5 {
            assert!(b.take(&c, 1000, 1, i).await.unwrap().allowed);
        }
        assert_eq!(
            store.quota_used(&c).await.unwrap(),
            2 * MIN_CHUNK,
            "both hold a lease"
        );
        assert_eq!(
            store.quota_consumed(&c).await.unwrap(),
            0,
            "nothing reported yet"
        );
        assert_eq!((a.unreported(&c), b.unreported(&c)), (3, 5));

        // A request another limit then denied is refunded after its unit
        // was reported: the next report gives it back to the holding.
        assert!(b.take(&c, 1000, 1, 9).await.unwrap().allowed);
        a.report(true).await.unwrap();
        b.report(true).await.unwrap();
        assert_eq!(store.quota_consumed(&c).await.unwrap(), 9);
        b.refund(&c, 1);
        assert_eq!(b.unreported(&c), -1);
        b.report(true).await.unwrap();
        assert_eq!(
            store.quota_consumed(&c).await.unwrap(),
            8,
            "consumed, not leased"
        );
        a.report(true).await.unwrap();
        let o = a.peek(&c, 1000, 1).await.unwrap();
        assert_eq!(o.remaining, 1000 - 8 - 1, "b's unspent lease is not used");
    }

    #[tokio::test]
    async fn an_idle_counters_lease_is_given_back_and_a_busy_ones_is_kept() {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        let q = Quotas::new(store.clone(), Arc::new(AtomicU32::new(1)));
        let (idle, busy) = (
            counter(),
            QuotaCounter {
                subject: "k:busy".into(),
                ..counter()
            },
        );
        assert!(q.take(&idle, 100, 1, 0).await.unwrap().allowed);
        assert!(q.take(&busy, 100, 1, 0).await.unwrap().allowed);
        assert_eq!(
            q.report(true).await.unwrap(),
            0,
            "both used since the last report"
        );
        assert!(q.take(&busy, 100, 1, 1).await.unwrap().allowed);
        assert_eq!(
            q.report(true).await.unwrap(),
            MIN_CHUNK - 1,
            "idle for a whole interval"
        );
        assert_eq!(
            store.quota_used(&idle).await.unwrap(),
            1,
            "free for every replica"
        );
        assert_eq!(store.quota_consumed(&idle).await.unwrap(), 1);
        assert_eq!(
            store.quota_used(&busy).await.unwrap(),
            MIN_CHUNK,
            "still leased"
        );
        assert_eq!(store.quota_consumed(&busy).await.unwrap(), 2);
        // The idle counter's next request leases again.
        assert!(q.take(&idle, 100, 1, 2).await.unwrap().allowed);
        assert_eq!(store.quota_used(&idle).await.unwrap(), 1 + MIN_CHUNK);
    }
}

//! Rate limits and quotas. The tightest limit decides and all are reported;
//! a denied request consumes nothing; a dry run consumes nothing.

pub mod buckets;
pub mod gcra;
pub mod period;
pub mod quota;
pub mod shares;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use moka::sync::Cache;

use crate::clock::Clock;
use crate::domain::{KeyId, LimitPeriod, LimitScope, LimitSpec, LimitStatus, Reason, TenantId};
use crate::error::Result;
use crate::store::{QuotaCounter, ShareRow, ShareView, Store, StoreError};
use gcra::Rate;
use period::QuotaPeriod;
use quota::Quotas;
use shares::{CellKey, Plan, Published, RateCell, ShareSettings, Tracked};

/// Whose usage is counted: a key (and its tenant) or a tenant alone.
#[derive(Debug, Clone, Copy)]
pub struct Subject<'a> {
    /// The key's lineage (its first key's id): key-scoped limits count
    /// every key of a rotation chain together.
    pub key: Option<KeyId>,
    pub tenant: &'a TenantId,
    /// The tenant's billing day, for monthly quotas.
    pub billing_day: Option<u32>,
    /// The key's environment: limits restricted to environments are
    /// counted per environment.
    pub environment: Option<&'a str>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Owner {
    Key(KeyId),
    Tenant(TenantId),
    /// A generic bucket (an Envoy rate-limit descriptor), by its id.
    Bucket(buckets::BucketId),
}

impl Owner {
    fn of(subject: &Subject<'_>, scope: LimitScope) -> Option<Owner> {
        match scope {
            LimitScope::Key => subject.key.map(Owner::Key),
            LimitScope::Tenant => Some(Owner::Tenant(subject.tenant.clone())),
        }
    }

    fn label(&self) -> String {
        match self {
            Owner::Key(id) => format!("k:{id}"),
            Owner::Tenant(id) => format!("t:{id}"),
            Owner::Bucket(id) => format!("d:{id}"),
        }
    }
}

/// The quota period of `spec`; `None` for rate limits.
fn quota_period(spec: &LimitSpec, billing_day: Option<u32>) -> Option<QuotaPeriod> {
    match spec.period {
        LimitPeriod::Day => Some(QuotaPeriod::Day),
        LimitPeriod::Month => Some(QuotaPeriod::Month {
            anchor_day: billing_day,
        }),
        _ => None,
    }
}

/// The counter of quota `spec` for `subject` in the period holding `at`,
/// and that period's end. `None` for rate limits, and for key limits or
/// environment-specific limits when the subject has no key. The one place
/// counter names are made: the limiter and usage reports agree.
pub fn quota_counter(
    subject: &Subject<'_>,
    spec: &LimitSpec,
    at: DateTime<Utc>,
) -> Option<(QuotaCounter, DateTime<Utc>)> {
    let period = quota_period(spec, subject.billing_day)?;
    let owner = Owner::of(subject, spec.scope)?.label();
    let owner = if spec.environments.is_empty() {
        owner
    } else {
        format!("{owner}:{}", subject.environment?)
    };
    let (start, end) = period::bounds(period, at);
    let counter = QuotaCounter {
        subject: owner,
        name: spec.name(),
        period_start: start,
    };
    Some((counter, end))
}

/// The start of the period before the one holding `at`, for quota `spec`.
pub fn previous_period_start(
    subject: &Subject<'_>,
    spec: &LimitSpec,
    at: DateTime<Utc>,
) -> Option<DateTime<Utc>> {
    quota_period(spec, subject.billing_day).map(|p| period::previous(p, at).0)
}

/// The result of checking every limit that applies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitOutcome {
    /// The limit that denied, if any.
    pub denied: Option<Reason>,
    /// Every limit, tightest (least remaining) first.
    pub statuses: Vec<LimitStatus>,
    pub retry_after_seconds: u32,
}

/// What one request took so far. Given back when dropped unless kept: a
/// later limit denying, a store error and a cancelled request all return
/// every unit taken, so a retry never pays twice.
struct Partial<'a> {
    quotas: &'a Quotas,
    taken: Vec<Taken>,
    cost: u64,
}

impl Partial<'_> {
    /// The request was admitted: what it took stays taken.
    fn keep(mut self) {
        self.taken.clear();
    }
}

impl Drop for Partial<'_> {
    fn drop(&mut self) {
        for t in self.taken.drain(..) {
            match t {
                Taken::Rate(cell, rate) => cell.gcra.refund(rate, self.cost),
                Taken::Quota(counter) => self.quotas.refund(&counter, self.cost),
            }
        }
    }
}

/// What was taken, to give back if a later limit denies.
enum Taken {
    Rate(Arc<RateCell>, Rate),
    Quota(QuotaCounter),
}

/// This replica's limiter: GCRA cells in memory, quota leases from the store.
pub struct Limiter {
    cells: Cache<CellKey, Arc<RateCell>>,
    quotas: Arc<Quotas>,
    replicas: Arc<AtomicU32>,
    clock: Clock,
    store: Arc<dyn Store>,
    /// Cells whose share is exchanged with the other replicas.
    tracked: Tracked,
    /// Whether shares are exchanged (else every cell enforces 1/N).
    sharing: AtomicBool,
    max_cells: AtomicUsize,
}

/// What one exchange of rate shares did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShareReport {
    /// Live replicas, this one included.
    pub replicas: u32,
    /// Rows this replica published (cells hot somewhere, up to `max_cells`).
    pub published: usize,
    /// Whether they were written (false: nothing to exchange, or this
    /// replica is not live yet).
    pub written: bool,
}

impl std::fmt::Debug for Limiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limiter")
            .field("cells", &self.cells.entry_count())
            .field("replicas", &self.replicas.load(Ordering::Relaxed))
            .finish()
    }
}

/// Live replicas in `view`, `me` included.
fn live_count(view: &ShareView, me: uuid::Uuid) -> u32 {
    let others = view.live.iter().filter(|r| **r != me).count();
    u32::try_from(others + 1).unwrap_or(u32::MAX)
}

/// `t` as nanoseconds since the epoch (0 before it), for GCRA cells.
pub fn nanos(t: DateTime<Utc>) -> u64 {
    t.timestamp_nanos_opt().unwrap_or(0).max(0) as u64
}

fn ceil_secs(ns: u64) -> u32 {
    u32::try_from(ns.div_ceil(1_000_000_000)).unwrap_or(u32::MAX)
}

impl Limiter {
    /// A limiter over `store`'s quota counters.
    pub fn new(store: Arc<dyn Store>, clock: Clock) -> Self {
        let replicas = Arc::new(AtomicU32::new(1));
        Self {
            // A cell idle for an hour is full again anyway.
            cells: Cache::builder()
                .time_to_idle(Duration::from_secs(3600))
                .max_capacity(2_000_000)
                .build(),
            quotas: Quotas::new(store.clone(), replicas.clone()),
            replicas,
            clock,
            store,
            tracked: Tracked::default(),
            sharing: AtomicBool::new(false),
            max_cells: AtomicUsize::new(ShareSettings::default().max_cells),
        }
    }

    /// Turns the exchange of rate shares on (`exchange_interval_ms` > 0)
    /// or off, and bounds it. Off, every cell enforces 1/N.
    pub fn configure_shares(&self, settings: &ShareSettings) {
        self.max_cells.store(settings.max_cells, Ordering::Relaxed);
        self.sharing
            .store(settings.exchange_interval_ms > 0, Ordering::Relaxed);
    }

    /// Cells this replica currently exchanges shares for.
    pub fn shared_cells(&self) -> usize {
        self.tracked.len()
    }

    /// The fraction of `spec`'s rate this replica enforces for `subject`
    /// now (1/N unless a share was exchanged); `None` for quotas and for
    /// key limits without a key.
    pub fn rate_share(&self, subject: &Subject<'_>, spec: &LimitSpec) -> Option<f64> {
        spec.period.rate_ns()?;
        let key = CellKey {
            owner: Owner::of(subject, spec.scope)?,
            period: spec.period,
            env: (!spec.environments.is_empty())
                .then(|| subject.environment.map(str::to_string))
                .flatten(),
        };
        let cell = self
            .cells
            .get(&key)
            .unwrap_or_else(|| self.tracked.cell_for(&key));
        Some(cell.fraction(self.replicas()))
    }

    /// Exchanges rate shares with the other replicas through the store:
    /// publishes this replica's demand and claim for every cell hot
    /// somewhere, and moves its claims towards the fair shares (`shares`).
    /// One read when nothing is hot anywhere; otherwise one transaction
    /// (lock, read, write).
    pub async fn exchange_shares(
        &self,
        me: uuid::Uuid,
        stale_after_secs: u32,
    ) -> std::result::Result<ShareReport, StoreError> {
        let now = self.clock.monotonic_ns();
        let tracked = self.tracked.snapshot();
        if tracked.is_empty() {
            let view = self.store.rate_shares(stale_after_secs).await?;
            let n = live_count(&view, me);
            self.set_replicas(n);
            if view.rows.is_empty() {
                return Ok(ShareReport {
                    replicas: n,
                    published: 0,
                    written: false,
                });
            }
        }
        let max_cells = self.max_cells.load(Ordering::Relaxed);
        let mut outcome = None;
        let mut replicas = self.replicas();
        let written = self
            .store
            .exchange_rate_shares(me, stale_after_secs, &mut |view| {
                replicas = live_count(view, me);
                let plan = self.plan(view, me, &tracked, now);
                let o = shares::settle(
                    plan.0,
                    me,
                    self.replicas(),
                    replicas as usize,
                    max_cells,
                    &plan.1,
                );
                let rows = o.rows.clone();
                outcome = Some(o);
                rows
            })
            .await;
        let published = outcome.as_ref().map_or(0, |o| o.rows.len());
        if let Some(o) = outcome {
            o.apply(matches!(written, Ok(true)), &self.tracked);
        }
        let written = written?;
        self.set_replicas(replicas);
        Ok(ShareReport {
            replicas,
            published,
            written,
        })
    }

    /// Each cell's decision from `view`, and the names other replicas
    /// published (cells named only by others are tracked from now on).
    fn plan(
        &self,
        view: &ShareView,
        me: uuid::Uuid,
        tracked: &[(CellKey, Arc<RateCell>)],
        now: u64,
    ) -> (Vec<Plan>, std::collections::HashSet<String>) {
        let others: Vec<uuid::Uuid> = view.live.iter().copied().filter(|r| *r != me).collect();
        let mut rows: HashMap<&str, HashMap<uuid::Uuid, &ShareRow>> = HashMap::new();
        for r in view.rows.iter().filter(|r| r.replica != me) {
            rows.entry(r.cell.as_str())
                .or_default()
                .insert(r.replica, r);
        }
        let named: std::collections::HashSet<String> = rows.keys().map(|k| k.to_string()).collect();
        let mut cells: HashMap<String, (CellKey, Arc<RateCell>)> = tracked
            .iter()
            .map(|(k, c)| (k.name(), (k.clone(), c.clone())))
            .collect();
        for name in &named {
            if cells.contains_key(name) {
                continue;
            }
            let Some(key) = CellKey::parse(name) else {
                tracing::warn!(cell = %name, "ignoring a rate share with a malformed cell name");
                continue;
            };
            let cell = self
                .cells
                .get_with_by_ref(&key, || self.tracked.cell_for(&key));
            self.tracked.track(&key, &cell);
            cells.insert(name.clone(), (key, cell));
        }
        let plans = cells
            .into_iter()
            .map(|(name, (key, cell))| {
                let published = rows.get(name.as_str());
                let theirs: Vec<Option<Published>> = others
                    .iter()
                    .map(|r| {
                        published.and_then(|m| m.get(r)).map(|row| Published {
                            demand: row.demand,
                            claim: row.claim,
                        })
                    })
                    .collect();
                let demand = cell.demand(now);
                Plan {
                    decision: shares::decide(demand, &theirs),
                    key,
                    cell,
                    demand,
                }
            })
            .collect();
        (plans, named)
    }

    /// Sets how many replicas share each rate limit.
    pub fn set_replicas(&self, n: u32) {
        self.replicas.store(n.max(1), Ordering::Relaxed);
    }

    /// How many replicas share each rate limit.
    pub fn replicas(&self) -> u32 {
        self.replicas.load(Ordering::Relaxed)
    }

    /// The quota leases (returned on shutdown).
    pub fn quotas(&self) -> &Arc<Quotas> {
        &self.quotas
    }

    /// Checks `limits` for `subject` and, unless `dry_run` or `cost == 0`,
    /// consumes `cost` from each. All or nothing: if one denies, what the
    /// others took is given back.
    pub async fn check(
        &self,
        subject: Subject<'_>,
        limits: &[&LimitSpec],
        cost: u64,
        dry_run: bool,
    ) -> Result<LimitOutcome> {
        // Calendar periods follow the wall clock; rates and lease timing
        // follow the monotonic one, so a wall-clock step admits no more
        // and no less.
        let now = self.clock.now();
        let now_ns = self.clock.monotonic_ns();
        let consume = !dry_run && cost > 0;
        let cost = cost.max(1);
        let replicas = self.replicas();
        let sharing = self.sharing.load(Ordering::Relaxed);
        let mut taken = Partial {
            quotas: &self.quotas,
            taken: Vec::new(),
            cost,
        };
        let mut statuses = Vec::with_capacity(limits.len());
        let mut denied = None;
        let mut retry_after_seconds = 0;

        for spec in limits {
            let Some(owner) = Owner::of(&subject, spec.scope) else {
                continue;
            };
            let evaluate = consume && denied.is_none();
            let env = if spec.environments.is_empty() {
                None
            } else {
                subject.environment
            };
            match spec.period.rate_ns() {
                Some(period_ns) => {
                    let key = CellKey {
                        owner,
                        period: spec.period,
                        env: env.map(str::to_string),
                    };
                    let cell = self
                        .cells
                        .get_with_by_ref(&key, || self.tracked.cell_for(&key));
                    let rate = cell.rate(
                        now_ns,
                        spec.limit,
                        period_ns,
                        spec.burst.unwrap_or(spec.limit),
                        cell.fraction(replicas),
                    );
                    if evaluate && sharing && replicas > 1 {
                        let work = shares::work_ns(cost, period_ns, spec.limit);
                        let demand = cell.note(now_ns, work);
                        if demand >= shares::HOT / f64::from(replicas) {
                            self.tracked.track(&key, &cell);
                        }
                    }
                    let o = if evaluate {
                        cell.gcra.take(now_ns, rate, cost)
                    } else {
                        cell.gcra.peek(now_ns, rate, cost)
                    };
                    if o.allowed && evaluate {
                        taken.taken.push(Taken::Rate(cell, rate));
                    }
                    if !o.allowed && denied.is_none() {
                        denied = Some(Reason::RateLimited);
                        retry_after_seconds = ceil_secs(o.retry_after_ns).max(1);
                    }
                    statuses.push(LimitStatus {
                        name: spec.name().to_string(),
                        limit: spec.limit,
                        remaining: o.remaining.min(spec.limit),
                        reset_at: now + chrono::Duration::nanoseconds(o.reset_ns as i64),
                        period: spec.period.as_str(),
                    });
                }
                None => {
                    let Some((counter, end)) = quota_counter(&subject, spec, now) else {
                        continue;
                    };
                    let o = if evaluate {
                        self.quotas.take(&counter, spec.limit, cost, now_ns).await
                    } else {
                        self.quotas.peek(&counter, spec.limit, cost).await
                    };
                    // On error, `taken` gives back what the other limits took.
                    let o = o?;
                    if o.allowed && evaluate {
                        taken.taken.push(Taken::Quota(counter));
                    }
                    if !o.allowed && denied.is_none() {
                        denied = Some(Reason::QuotaExhausted);
                        retry_after_seconds =
                            ceil_secs(nanos(end).saturating_sub(nanos(now))).max(1);
                    }
                    statuses.push(LimitStatus {
                        name: spec.name().to_string(),
                        limit: spec.limit,
                        remaining: o.remaining.min(spec.limit),
                        reset_at: end,
                        period: spec.period.as_str(),
                    });
                }
            }
        }
        if denied.is_none() {
            taken.keep();
        }
        statuses.sort_by_key(|s| s.remaining);
        Ok(LimitOutcome {
            denied,
            statuses,
            retry_after_seconds,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;

    /// A clock stopped at `at`: a quota period (day, month) cannot end and
    /// no rate-limit credit can accrue between two checks of one test.
    fn stopped_at(at: &str) -> Clock {
        let clock = Clock::system();
        clock.freeze_at(at.parse().expect("an RFC 3339 instant"));
        clock
    }

    /// The last millisecond of a UTC month (and day): where a test on the
    /// live clock could see its quota counters start afresh mid-test.
    const MONTH_END: &str = "2027-01-31T23:59:59.999Z";

    fn spec(scope: LimitScope, period: LimitPeriod, limit: u64) -> LimitSpec {
        LimitSpec {
            scope,
            period,
            limit,
            burst: None,
            environments: vec![],
        }
    }

    #[tokio::test]
    async fn the_tightest_limit_decides_and_a_denial_consumes_nothing() {
        let limiter = Limiter::new(Arc::new(MemoryStore::new()), stopped_at(MONTH_END));
        let tenant = TenantId::parse("t").unwrap();
        let subject = Subject {
            key: Some(uuid::Uuid::now_v7()),
            tenant: &tenant,
            billing_day: None,
            environment: None,
        };
        let per_minute = spec(LimitScope::Key, LimitPeriod::Minute, 5);
        let per_day = spec(LimitScope::Tenant, LimitPeriod::Day, 3);
        let limits = [&per_minute, &per_day];
        for _ in 0..3 {
            let o = limiter.check(subject, &limits, 1, false).await.unwrap();
            assert_eq!(o.denied, None);
        }
        let o = limiter.check(subject, &limits, 1, false).await.unwrap();
        assert_eq!(o.denied, Some(Reason::QuotaExhausted));
        assert_eq!(o.statuses[0].name, "tenant_per_day", "tightest first");
        // The per-minute limit was given back: 2 of 5 still left.
        let o = limiter
            .check(subject, &[&per_minute], 1, true)
            .await
            .unwrap();
        assert_eq!(
            o.statuses[0].remaining, 1,
            "3 of 5 taken; after one more, 1 would remain"
        );
    }

    #[tokio::test]
    async fn a_dry_run_consumes_nothing() {
        let limiter = Limiter::new(Arc::new(MemoryStore::new()), stopped_at(MONTH_END));
        let tenant = TenantId::parse("t").unwrap();
        let subject = Subject {
            key: None,
            tenant: &tenant,
            billing_day: None,
            environment: None,
        };
        let per_month = spec(LimitScope::Tenant, LimitPeriod::Month, 2);
        for _ in 0..10 {
            let o = limiter
                .check(subject, &[&per_month], 1, true)
                .await
                .unwrap();
            assert_eq!(o.denied, None);
            assert_eq!(o.statuses[0].remaining, 1, "what would remain after it");
        }
        let o = limiter
            .check(subject, &[&per_month], 3, false)
            .await
            .unwrap();
        assert_eq!(o.denied, Some(Reason::QuotaExhausted), "cost 3 > 2 left");
        let o = limiter
            .check(subject, &[&per_month], 2, false)
            .await
            .unwrap();
        assert_eq!(o.denied, None);
    }
}

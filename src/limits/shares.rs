//! Fair rate-limit shares under skew (ARCHITECTURE.md, "Rate limits under
//! skew"). Every replica enforces a fraction of each rate cell (a limit of
//! one key lineage or tenant): the even share 1/N by default, and for a cell
//! that is hot somewhere, a share weighted by where its traffic arrives.
//!
//! - Each replica measures, per cell, its recent **demand**: admitted and
//!   refused attempts, as a fraction of the cell's rate, averaged over a few
//!   seconds ([`Demand`]).
//! - A cell is **hot** when some replica's demand reaches 90% of its even
//!   share. While it is, every replica that knows it publishes a row
//!   (`rate_shares`: demand and **claim**, the fraction it enforces); a
//!   replica without a row claims 1/N.
//! - The **target** shares divide the rate by max-min fairness over the
//!   demands, each replica keeping a floor of 1/(10N) ([`targets`]): a cell
//!   whose traffic all reaches one replica gives it at least 90%.
//! - Claims move towards the targets in **exchanges** that take turns
//!   (`Store::exchange_rate_shares`): a replica raises its claim only to
//!   what the others' published claims leave (≤ 1 in all), lowers it at
//!   once, and enforces a lower claim before it publishes it and a higher
//!   one only after. So the claims enforced never sum above 1, and one
//!   replica's new burst is only what it already had ([`Cell::rescale`]):
//!   the fleet admits at most the rate plus one burst.
//!
//! Convergence: one exchange of each replica lowers the others' claims, the
//! hot replica's next exchange raises its own; two intervals.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use super::gcra::{Cell, Rate};
use super::Owner;
use crate::domain::{LimitPeriod, TenantId};
use crate::store::ShareRow;

/// Rate-limit share exchange (`[rate_shares]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShareSettings {
    /// How often each replica exchanges demand and claims with the others,
    /// in milliseconds; 0 = never (every replica enforces limit/N).
    pub exchange_interval_ms: u64,
    /// Most cells one replica publishes per exchange (those whose claim is
    /// furthest from the even share first); the rest keep the even share.
    pub max_cells: usize,
}

impl Default for ShareSettings {
    fn default() -> Self {
        Self {
            exchange_interval_ms: 1_000,
            max_cells: 10_000,
        }
    }
}

/// Each replica keeps at least 1/(FLOOR_DIVISOR × N) of a hot cell, so a
/// request arriving where there was no demand is not refused outright,
/// and one replica alone gets at least 1 − 1/FLOOR_DIVISOR of the rate.
const FLOOR_DIVISOR: f64 = 10.0;
/// A replica is hot on a cell once its demand reaches this fraction of its
/// even share.
pub(super) const HOT: f64 = 0.9;
/// Rounding slack when comparing fractions.
const TOL: f64 = 1e-9;
/// Demand is folded into its average at most this often.
const WINDOW_NS: u64 = 250_000_000;
/// Time constant of the demand average.
const TAU_NS: f64 = 1e9;

/// The floor share of each of `n` replicas.
pub fn floor(n: usize) -> f64 {
    1.0 / (FLOOR_DIVISOR * n.max(1) as f64)
}

/// A demand as read from anywhere: finite, non-negative, bounded.
fn sane(d: f64) -> f64 {
    if d.is_nan() {
        0.0
    } else {
        d.clamp(0.0, 1e6)
    }
}

/// Fair shares of one cell, by the replicas' demands (fractions of the
/// rate): max-min fair, each at least [`floor`]; when the demands leave
/// some of the rate over, it is split evenly. The shares sum to 1.
pub fn targets(demands: &[f64]) -> Vec<f64> {
    let n = demands.len();
    if n == 0 {
        return Vec::new();
    }
    let f = floor(n);
    let d: Vec<f64> = demands.iter().map(|&x| sane(x).max(f)).collect();
    let sum: f64 = d.iter().sum();
    if sum <= 1.0 {
        let spare = (1.0 - sum) / n as f64;
        return d.iter().map(|x| x + spare).collect();
    }
    // The water level λ with Σ min(dᵢ, λ) = 1.
    let mut sorted = d.clone();
    sorted.sort_by(f64::total_cmp);
    let mut left = 1.0;
    let mut level = f;
    for (i, x) in sorted.iter().enumerate() {
        let k = (n - i) as f64;
        if x * k >= left {
            level = left / k;
            break;
        }
        left -= x;
    }
    d.iter().map(|x| x.min(level)).collect()
}

/// Another live replica's row for a cell.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Published {
    pub demand: f64,
    pub claim: f64,
}

/// What one replica should enforce and publish for one cell.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Decision {
    /// Its fair share (the shares of all replicas sum to 1).
    pub target: f64,
    /// What it may claim now: `None` = no row, the even share 1/N.
    pub claim: Option<f64>,
}

/// One replica's decision for one cell, from its own demand and the rows
/// of the other live replicas (`None`: that replica has no row, so it
/// claims the even share and its demand is at most about that).
///
/// The claim is the target, capped by what the others' claims leave: the
/// claims of all replicas never sum above 1 when each decides from the
/// rows the others last published (exchanges take turns).
pub fn decide(my_demand: f64, others: &[Option<Published>]) -> Decision {
    let n = others.len() + 1;
    let even = 1.0 / n as f64;
    let my_demand = sane(my_demand);
    let hot = n > 1
        && (my_demand >= HOT * even
            || others
                .iter()
                .flatten()
                .any(|p| sane(p.demand) >= HOT * even));
    let target = if hot {
        let mut demands = Vec::with_capacity(n);
        demands.push(my_demand);
        demands.extend(others.iter().map(|p| p.map_or(even, |p| p.demand)));
        targets(&demands)[0]
    } else {
        even
    };
    let taken: f64 = others
        .iter()
        .map(|p| p.map_or(even, |p| p.claim.clamp(0.0, 1.0)))
        .sum();
    let room = (1.0 - taken).max(0.0);
    let claim = target.min(room);
    let claim = if !hot && claim >= even - TOL {
        // Cold, and the even share fits: no row.
        None
    } else {
        Some(claim)
    };
    Decision { target, claim }
}

/// Recent demand on one cell: attempts (admitted or refused), as a
/// fraction of the cell's full rate, averaged over about `TAU_NS`.
/// Lock-free: one add per attempt, a fold every `WINDOW_NS`.
#[derive(Debug, Default)]
pub struct Demand {
    /// Monotonic start of the current window; 0 before the first attempt.
    start: AtomicU64,
    /// Full-rate nanoseconds attempted in the window (cost × period / limit).
    work: AtomicU64,
    /// The average as of `start` (f64 bits).
    average: AtomicU64,
}

impl Demand {
    /// Records an attempt of `work_ns` full-rate nanoseconds at `now`;
    /// returns the average.
    pub fn note(&self, now: u64, work_ns: u64) -> f64 {
        self.work.fetch_add(work_ns, Ordering::AcqRel);
        self.at(now)
    }

    /// The average as of `now`, folding the window in when it is over.
    pub fn at(&self, now: u64) -> f64 {
        let start = self.start.load(Ordering::Acquire);
        let average = f64::from_bits(self.average.load(Ordering::Acquire));
        if start == 0 {
            let _ = self
                .start
                .compare_exchange(0, now.max(1), Ordering::AcqRel, Ordering::Acquire);
            return average;
        }
        if now < start.saturating_add(WINDOW_NS)
            || self
                .start
                .compare_exchange(start, now, Ordering::AcqRel, Ordering::Acquire)
                .is_err()
        {
            return average;
        }
        let work = self.work.swap(0, Ordering::AcqRel) as f64;
        let elapsed = (now - start) as f64;
        let alpha = 1.0 - (-elapsed / TAU_NS).exp();
        let average = average + alpha * (work / elapsed - average);
        self.average.store(average.to_bits(), Ordering::Release);
        average
    }
}

/// Full-rate nanoseconds `cost` units of a `limit` per `period_ns` take.
pub fn work_ns(cost: u64, period_ns: u64, limit: u64) -> u64 {
    let w = u128::from(cost) * u128::from(period_ns) / u128::from(limit.max(1));
    u64::try_from(w).unwrap_or(u64::MAX / 2)
}

/// "No claim": the cell enforces the even share.
const EVEN: u64 = u64::MAX;

/// One rate cell on this replica: its GCRA state, the share it enforces
/// and its demand.
#[derive(Debug)]
pub struct RateCell {
    pub(super) gcra: Cell,
    /// The claimed fraction (f64 bits), or `EVEN`.
    claim: AtomicU64,
    /// The fraction the GCRA state was last used at (f64 bits; 0 = never).
    applied: AtomicU64,
    demand: Demand,
    /// Listed for exchanges.
    tracked: AtomicBool,
}

impl Default for RateCell {
    fn default() -> Self {
        Self {
            gcra: Cell::default(),
            claim: AtomicU64::new(EVEN),
            applied: AtomicU64::new(0),
            demand: Demand::default(),
            tracked: AtomicBool::new(false),
        }
    }
}

impl RateCell {
    /// The claimed fraction, if any (else the even share).
    pub fn claim(&self) -> Option<f64> {
        match self.claim.load(Ordering::Acquire) {
            EVEN => None,
            bits => Some(f64::from_bits(bits)),
        }
    }

    fn set_claim(&self, claim: Option<f64>) {
        let bits = claim.map_or(EVEN, |c| c.clamp(0.0, 1.0).to_bits());
        self.claim.store(bits, Ordering::Release);
    }

    /// The fraction enforced with `replicas` live.
    pub fn fraction(&self, replicas: u32) -> f64 {
        self.claim()
            .unwrap_or_else(|| 1.0 / f64::from(replicas.max(1)))
    }

    /// The rate to enforce now: `limit` per `period_ns` bursting to
    /// `burst`, at `fraction`. When the fraction grew since the cell was
    /// last used, the state is re-expressed first so the growth brings no
    /// fresh burst.
    pub fn rate(&self, now: u64, limit: u64, period_ns: u64, burst: u64, fraction: f64) -> Rate {
        let rate = Rate::shared(limit, period_ns, burst, fraction);
        let applied = self.applied.load(Ordering::Acquire);
        if applied != fraction.to_bits() {
            let was = f64::from_bits(applied);
            if applied != 0 && fraction > was {
                self.gcra
                    .rescale(now, Rate::shared(limit, period_ns, burst, was), rate);
            }
            self.applied.store(fraction.to_bits(), Ordering::Release);
        }
        rate
    }

    /// Records an attempt; returns the demand average.
    pub fn note(&self, now: u64, work_ns: u64) -> f64 {
        self.demand.note(now, work_ns)
    }

    /// The demand average as of `now`.
    pub fn demand(&self, now: u64) -> f64 {
        self.demand.at(now)
    }
}

/// A rate cell's identity: whose, which period, which environment.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) struct CellKey {
    pub(super) owner: Owner,
    pub(super) period: LimitPeriod,
    pub(super) env: Option<String>,
}

impl CellKey {
    /// The name published in `rate_shares`: `<period>|<environment>|<owner>`
    /// (the owner, which holds no `|`, last).
    pub(super) fn name(&self) -> String {
        format!(
            "{}|{}|{}",
            self.period.as_str(),
            self.env.as_deref().unwrap_or(""),
            self.owner.label()
        )
    }

    /// Reads a published name back; `None` if it is not one.
    pub(super) fn parse(name: &str) -> Option<Self> {
        let (period, rest) = name.split_once('|')?;
        let (env, owner) = rest.rsplit_once('|')?;
        let period = LimitPeriod::parse(period).filter(|p| p.rate_ns().is_some())?;
        let owner = match owner.split_once(':')? {
            ("k", id) => Owner::Key(id.parse().ok()?),
            ("t", id) => Owner::Tenant(TenantId::parse(id)?),
            ("d", id) => Owner::Bucket(super::buckets::BucketId::parse(id)?),
            _ => return None,
        };
        Some(Self {
            owner,
            period,
            env: (!env.is_empty()).then(|| env.to_string()),
        })
    }
}

/// The cells this replica exchanges: hot here, or named by another replica.
#[derive(Debug, Default)]
pub(super) struct Tracked {
    cells: Mutex<HashMap<CellKey, Arc<RateCell>>>,
}

impl Tracked {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<CellKey, Arc<RateCell>>> {
        self.cells.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The tracked cell for `key`, or a new one (a cell evicted from the
    /// limiter's cache comes back with its claim).
    pub(super) fn cell_for(&self, key: &CellKey) -> Arc<RateCell> {
        self.lock().get(key).cloned().unwrap_or_default()
    }

    /// Lists `cell` for exchanges (once).
    pub(super) fn track(&self, key: &CellKey, cell: &Arc<RateCell>) {
        if !cell.tracked.swap(true, Ordering::AcqRel) {
            self.lock().insert(key.clone(), cell.clone());
        }
    }

    fn untrack(&self, key: &CellKey) {
        if let Some(cell) = self.lock().remove(key) {
            cell.tracked.store(false, Ordering::Release);
        }
    }

    pub(super) fn snapshot(&self) -> Vec<(CellKey, Arc<RateCell>)> {
        self.lock()
            .iter()
            .map(|(k, c)| (k.clone(), c.clone()))
            .collect()
    }

    pub(super) fn len(&self) -> usize {
        self.lock().len()
    }
}

/// One cell's part in an exchange.
pub(super) struct Plan {
    pub(super) key: CellKey,
    pub(super) cell: Arc<RateCell>,
    pub(super) demand: f64,
    pub(super) decision: Decision,
}

/// What an exchange decided, to apply around its commit.
#[derive(Default)]
pub(super) struct Outcome {
    /// Claims to raise once published.
    raises: Vec<(Arc<RateCell>, Option<f64>)>,
    /// Cells nobody needs a row for any more.
    idle: Vec<CellKey>,
    pub(super) rows: Vec<ShareRow>,
}

/// Applies `plans` for replica `me` with `n` live: lowers claims at once,
/// keeps raises for after the commit, chooses the rows (at most
/// `max_cells`), and notes which cells can be forgotten. `named` holds the
/// cells another replica published.
pub(super) fn settle(
    plans: Vec<Plan>,
    me: uuid::Uuid,
    replicas_before: u32,
    n: usize,
    max_cells: usize,
    named: &HashSet<String>,
) -> Outcome {
    let even = 1.0 / n.max(1) as f64;
    let mut out = Outcome::default();
    let mut rows: Vec<(f64, Plan)> = Vec::new();
    for p in plans {
        match p.decision.claim {
            Some(claim) => rows.push(((claim - even).abs(), p)),
            None => {
                lower_or_raise(&mut out, &p.cell, None, even, replicas_before);
                let name = p.key.name();
                if p.demand < HOT * even && !named.contains(&name) {
                    out.idle.push(p.key);
                }
            }
        }
    }
    // Furthest from the even share first: those rows carry the skew.
    rows.sort_by(|a, b| b.0.total_cmp(&a.0));
    for (i, (_, p)) in rows.into_iter().enumerate() {
        let Some(claim) = p.decision.claim else {
            continue;
        };
        if i < max_cells {
            lower_or_raise(&mut out, &p.cell, Some(claim), even, replicas_before);
            out.rows.push(ShareRow {
                cell: p.key.name(),
                replica: me,
                demand: p.demand,
                claim,
            });
        } else {
            // Unpublished, this replica counts as claiming the even share:
            // it may enforce no more than that.
            let capped = (claim < even).then_some(claim);
            lower_or_raise(&mut out, &p.cell, capped, even, replicas_before);
        }
    }
    out
}

/// Lowers `cell`'s claim to `next` now, or notes the raise for later.
fn lower_or_raise(
    out: &mut Outcome,
    cell: &Arc<RateCell>,
    next: Option<f64>,
    even: f64,
    replicas_before: u32,
) {
    let now = cell.fraction(replicas_before);
    if next.unwrap_or(even) <= now {
        cell.set_claim(next);
    } else {
        out.raises.push((cell.clone(), next));
    }
}

impl Outcome {
    /// After the rows were published: raise the claims, forget idle cells.
    pub(super) fn apply(self, published: bool, tracked: &Tracked) {
        if published {
            for (cell, claim) in self.raises {
                cell.set_claim(claim);
            }
        }
        for key in self.idle {
            tracked.untrack(&key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EPS: f64 = 1e-9;

    /// Replicas publishing in turn, as the exchange does: each decides
    /// from the others' current rows. Returns the claims enforced after
    /// every single step (a replica without a row enforces 1/n).
    struct Fleet {
        demand: Vec<f64>,
        rows: Vec<Option<Published>>,
    }

    impl Fleet {
        fn new(demand: &[f64]) -> Self {
            Self {
                demand: demand.to_vec(),
                rows: vec![None; demand.len()],
            }
        }

        fn enforced(&self) -> Vec<f64> {
            let even = 1.0 / self.rows.len() as f64;
            self.rows
                .iter()
                .map(|r| r.map_or(even, |r| r.claim))
                .collect()
        }

        /// Replica `i` exchanges; returns the claims enforced after it.
        fn step(&mut self, i: usize) -> Vec<f64> {
            let others: Vec<Option<Published>> = (0..self.rows.len())
                .filter(|&j| j != i)
                .map(|j| self.rows[j])
                .collect();
            let d = decide(self.demand[i], &others);
            self.rows[i] = d.claim.map(|claim| Published {
                demand: self.demand[i],
                claim,
            });
            self.enforced()
        }

        fn round(&mut self) -> Vec<f64> {
            (0..self.rows.len()).map(|i| self.step(i)).last().unwrap()
        }
    }

    #[test]
    fn targets_are_max_min_fair_with_a_floor_and_sum_to_one() {
        let t = targets(&[2.0, 0.0, 0.0]);
        assert!((t[0] - (1.0 - 2.0 / 30.0)).abs() < EPS, "{t:?}");
        assert!((t[1] - 1.0 / 30.0).abs() < EPS);
        // A small demand is met in full; the big one gets the rest.
        let t = targets(&[2.0, 0.2, 0.0]);
        assert!((t[1] - 0.2).abs() < EPS, "{t:?}");
        assert!((t[0] - (1.0 - 0.2 - 1.0 / 30.0)).abs() < EPS, "{t:?}");
        // Demand below the rate: the spare is split evenly.
        let t = targets(&[0.0, 0.0, 0.0]);
        assert!(t.iter().all(|x| (x - 1.0 / 3.0).abs() < EPS), "{t:?}");
        for d in [[5.0, 5.0, 0.0], [0.3, 0.3, 0.3], [1e9, f64::NAN, -1.0]] {
            let t = targets(&d);
            assert!((t.iter().sum::<f64>() - 1.0).abs() < EPS, "{d:?} → {t:?}");
        }
    }

    #[test]
    fn skew_to_one_replica_gets_it_at_least_ninety_percent_within_two_rounds() {
        for n in [2, 3, 5, 10] {
            let mut demand = vec![0.0; n];
            demand[0] = 2.0; // twice the rate, all through replica 0
            let mut fleet = Fleet::new(&demand);
            fleet.round();
            let claims = fleet.round();
            assert!(claims[0] >= 0.9, "n = {n}: {claims:?}");
            assert!(claims.iter().sum::<f64>() <= 1.0 + EPS, "{claims:?}");
        }
        // Even at exactly the rate, and with a new replica's order.
        let mut fleet = Fleet::new(&[0.0, 1.0, 0.0]);
        fleet.round();
        assert!(fleet.round()[1] >= 0.9);
    }

    #[test]
    fn enforced_shares_never_sum_above_one_whatever_the_demand_and_order() {
        // A deterministic pseudo-random walk over demands and turn orders.
        let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = move |m: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % m
        };
        for _ in 0..200 {
            let n = 2 + next(5) as usize;
            let mut fleet = Fleet::new(&vec![0.0; n]);
            for _ in 0..200 {
                let i = next(n as u64) as usize;
                fleet.demand[i] = [0.0, 0.05, 0.3, 1.0, 3.0][next(5) as usize];
                let enforced = fleet.step(next(n as u64) as usize);
                let sum: f64 = enforced.iter().sum();
                assert!(sum <= 1.0 + EPS, "{enforced:?} from {:?}", fleet.demand);
            }
        }
    }

    #[test]
    fn a_new_replica_starts_at_the_even_share_and_never_above_what_is_left() {
        // Nothing hot: no row, the even share.
        let d = decide(0.0, &[None, None]);
        assert_eq!(d.claim, None);
        // Joining a hot cell: only what the others leave.
        let hot = Published {
            demand: 2.0,
            claim: 0.9,
        };
        let idle = Published {
            demand: 0.0,
            claim: 0.05,
        };
        let d = decide(0.0, &[Some(hot), Some(idle), None]);
        assert!(d.claim.unwrap() <= 0.05 + EPS, "{d:?}");
        // And the hot replica makes room for it (a fourth replica without a
        // row counts as its even share and its demand as up to that).
        let d = decide(2.0, &[Some(idle), None]);
        assert!(d.claim.unwrap() <= 1.0 - 0.05 - 1.0 / 3.0 + EPS, "{d:?}");
    }

    #[test]
    fn a_replica_whose_demand_vanished_gives_its_share_back() {
        let mut fleet = Fleet::new(&[2.0, 0.0, 0.0]);
        fleet.round();
        assert!(fleet.round()[0] >= 0.9);
        // The traffic moves to replica 2.
        fleet.demand = vec![0.0, 0.0, 2.0];
        fleet.round();
        let claims = fleet.round();
        assert!(claims[2] >= 0.9, "{claims:?}");
        assert!(claims[0] <= 0.1, "{claims:?}");
        // And stops: every row goes, back to the even split.
        fleet.demand = vec![0.0; 3];
        fleet.round();
        fleet.round();
        assert_eq!(fleet.rows, vec![None; 3]);
    }

    #[test]
    fn a_replica_alone_publishes_nothing() {
        assert_eq!(decide(5.0, &[]).claim, None);
    }

    #[test]
    fn cell_names_read_back_and_refuse_garbage() {
        let key = CellKey {
            owner: Owner::Key(uuid::Uuid::now_v7()),
            period: LimitPeriod::Second,
            env: Some("live".into()),
        };
        assert_eq!(CellKey::parse(&key.name()), Some(key));
        let tenant = CellKey {
            owner: Owner::Tenant(TenantId::parse("acme-1").unwrap()),
            period: LimitPeriod::Minute,
            env: None,
        };
        assert_eq!(CellKey::parse(&tenant.name()), Some(tenant));
        for bad in [
            "",
            "second",
            "day||t:acme",
            "second||k:nope",
            "second||x:a",
            "x||t:a",
        ] {
            assert_eq!(CellKey::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn demand_follows_the_attempt_rate() {
        const SEC: u64 = 1_000_000_000;
        let d = Demand::default();
        let mut now = SEC;
        // 20 attempts a second on a 10/s limit: demand → 2.
        for _ in 0..400 {
            for _ in 0..5 {
                d.note(now, work_ns(1, SEC, 10));
            }
            now += SEC / 4;
        }
        // (The first attempt of the next quarter second closes the last.)
        let avg = d.note(now, work_ns(1, SEC, 10));
        assert!((avg - 2.0).abs() < 0.01, "{avg}");
        // Silence: it decays.
        let later = d.at(now + 30 * SEC);
        assert!(later < 0.01, "{later}");
    }
}

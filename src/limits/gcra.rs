//! GCRA (generic cell rate algorithm) rate limiting: one atomic "theoretical
//! arrival time" per (subject, limit), no locks, exact Retry-After. Time is
//! passed in (nanoseconds), so the math is tested with an injected clock.

use std::sync::atomic::{AtomicU64, Ordering};

/// The smallest fraction of a rate a replica enforces: a finite emission
/// interval even for a replica whose share is (momentarily) zero.
const MIN_FRACTION: f64 = 1e-6;

/// A rate: `limit` units per `period_ns`, with bursts of up to `burst` units.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    /// Nanoseconds one unit "costs" (period / limit).
    pub emission_ns: f64,
    /// Units that may arrive at once.
    pub burst: f64,
}

impl Rate {
    /// `limit` per `period_ns`, bursting to `burst`, divided over `share`
    /// replicas (each enforces 1/share of the rate and of the burst, at
    /// least one unit).
    pub fn new(limit: u64, period_ns: u64, burst: u64, share: u32) -> Self {
        Self::shared(limit, period_ns, burst, 1.0 / f64::from(share.max(1)))
    }

    /// `limit` per `period_ns`, bursting to `burst`, of which this replica
    /// enforces `fraction` (of the rate and of the burst, at least one unit
    /// of burst). A fraction at or below zero admits (almost) nothing.
    pub fn shared(limit: u64, period_ns: u64, burst: u64, fraction: f64) -> Self {
        let fraction = if fraction.is_finite() {
            fraction.clamp(MIN_FRACTION, 1.0)
        } else {
            1.0
        };
        let limit = (limit.max(1) as f64) * fraction;
        Self {
            emission_ns: period_ns as f64 / limit,
            burst: ((burst.max(1) as f64) * fraction).max(1.0),
        }
    }

    fn tolerance_ns(&self) -> f64 {
        self.emission_ns * self.burst
    }
}

/// The result of one GCRA step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Outcome {
    pub allowed: bool,
    /// Whole units that could still be admitted now.
    pub remaining: u64,
    /// Nanoseconds until a denied request of the same cost would be admitted (0 when allowed).
    pub retry_after_ns: u64,
    /// Nanoseconds until the bucket is full again.
    pub reset_ns: u64,
}

/// Pure GCRA step: given the stored TAT and `now`, the new TAT (if allowed)
/// and the outcome.
pub fn step(tat: u64, now: u64, rate: Rate, cost: u64) -> (Option<u64>, Outcome) {
    let base = tat.max(now) as f64;
    let new_tat = base + rate.emission_ns * cost as f64;
    let horizon = now as f64 + rate.tolerance_ns();
    if new_tat > horizon {
        let used = (base - now as f64).max(0.0);
        let outcome = Outcome {
            allowed: false,
            remaining: ((rate.tolerance_ns() - used) / rate.emission_ns)
                .floor()
                .max(0.0) as u64,
            retry_after_ns: (new_tat - horizon).ceil() as u64,
            reset_ns: used.ceil() as u64,
        };
        return (None, outcome);
    }
    let used = new_tat - now as f64;
    let outcome = Outcome {
        allowed: true,
        remaining: ((rate.tolerance_ns() - used) / rate.emission_ns)
            .floor()
            .max(0.0) as u64,
        retry_after_ns: 0,
        reset_ns: used.ceil() as u64,
    };
    (Some(new_tat.ceil() as u64), outcome)
}

/// One limiter cell: the TAT of a (subject, limit).
#[derive(Debug, Default)]
pub struct Cell(AtomicU64);

impl Cell {
    /// Admits `cost` units at `now` if the rate allows; lock-free.
    pub fn take(&self, now: u64, rate: Rate, cost: u64) -> Outcome {
        let mut tat = self.0.load(Ordering::Acquire);
        loop {
            let (next, outcome) = step(tat, now, rate, cost);
            let Some(next) = next else { return outcome };
            match self
                .0
                .compare_exchange_weak(tat, next, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return outcome,
                Err(actual) => tat = actual,
            }
        }
    }

    /// What `take` would answer, without taking.
    pub fn peek(&self, now: u64, rate: Rate, cost: u64) -> Outcome {
        step(self.0.load(Ordering::Acquire), now, rate, cost).1
    }

    /// Re-expresses the cell, enforced at `from` until now, at the larger
    /// rate `to` without creating units: what could be admitted at once
    /// stays what it was (at most `to`'s burst). Only the refill speeds up,
    /// so a replica whose share grows gets no fresh burst out of it.
    pub fn rescale(&self, now: u64, from: Rate, to: Rate) {
        let _ = self
            .0
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |tat| {
                let used = tat.saturating_sub(now) as f64;
                let available =
                    ((from.tolerance_ns() - used) / from.emission_ns).clamp(0.0, to.burst);
                // Rounded down: less than a nanosecond of refill, so the
                // units there were are all still there.
                let used = (to.tolerance_ns() - available * to.emission_ns).max(0.0);
                Some(now.saturating_add(used.floor() as u64))
            });
    }

    /// Gives back `cost` units taken earlier (when another limit denied the
    /// request: denied requests consume nothing).
    pub fn refund(&self, rate: Rate, cost: u64) {
        let back = (rate.emission_ns * cost as f64) as u64;
        let _ = self
            .0
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |t| {
                Some(t.saturating_sub(back))
            });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: u64 = 1_000_000_000;

    #[test]
    fn a_full_burst_is_admitted_then_one_per_emission_interval() {
        // MsgFlash: 10 requests per second on a key.
        let rate = Rate::new(10, SEC, 10, 1);
        let cell = Cell::default();
        let t0 = 1_000 * SEC;
        for i in 0..10 {
            let o = cell.take(t0, rate, 1);
            assert!(o.allowed, "request {i} of the burst");
            assert_eq!(o.remaining, 9 - i);
        }
        let denied = cell.take(t0, rate, 1);
        assert!(!denied.allowed);
        // Exactly one emission interval (100 ms) until the next unit.
        assert_eq!(denied.retry_after_ns, SEC / 10);
        assert!(!cell.take(t0 + SEC / 10 - 1, rate, 1).allowed);
        assert!(cell.take(t0 + SEC / 10, rate, 1).allowed);
    }

    #[test]
    fn steady_traffic_at_the_rate_is_always_admitted() {
        let rate = Rate::new(60, 60 * SEC, 1, 1); // 60/min, no burst
        let cell = Cell::default();
        let mut now = 5 * SEC;
        for _ in 0..1000 {
            assert!(cell.take(now, rate, 1).allowed);
            assert!(
                !cell.take(now, rate, 1).allowed,
                "a second request in the same second"
            );
            now += SEC;
        }
    }

    #[test]
    fn cost_counts_several_units_and_a_denied_request_takes_nothing() {
        let rate = Rate::new(100, 60 * SEC, 100, 1);
        let cell = Cell::default();
        let now = 77 * SEC;
        assert!(cell.take(now, rate, 60).allowed);
        let denied = cell.take(now, rate, 50);
        assert!(!denied.allowed);
        assert_eq!(denied.remaining, 40);
        // 10 more units needed: 10 × 600 ms.
        assert_eq!(denied.retry_after_ns, 6 * SEC);
        assert!(
            cell.take(now, rate, 40).allowed,
            "the denial consumed nothing"
        );
    }

    #[test]
    fn refund_returns_capacity() {
        let rate = Rate::new(2, SEC, 2, 1);
        let cell = Cell::default();
        assert!(cell.take(SEC, rate, 2).allowed);
        assert!(!cell.peek(SEC, rate, 1).allowed);
        cell.refund(rate, 1);
        assert!(cell.take(SEC, rate, 1).allowed);
    }

    #[test]
    fn a_grown_share_speeds_the_refill_but_grants_no_fresh_burst() {
        // 100 per 100 s: a quarter is 25 (one per 4 s), half is 50 (one per 2 s).
        let quarter = Rate::shared(100, 100 * SEC, 100, 0.25);
        let half = Rate::shared(100, 100 * SEC, 100, 0.5);
        let cell = Cell::default();
        let now = 1_000 * SEC;
        // Idle: the whole quarter of the burst (25) is there, no more.
        cell.rescale(now, quarter, half);
        let admitted = (0..100).filter(|_| cell.take(now, half, 1).allowed).count();
        assert_eq!(admitted, 25, "the 25 units it had, not 50");
        // Drained: the next unit comes one emission interval of the larger
        // share later (2 s), not the smaller's (4 s).
        let cell = Cell::default();
        while cell.take(now, quarter, 1).allowed {}
        cell.rescale(now, quarter, half);
        assert!(!cell.take(now + 2 * SEC - 1, half, 1).allowed);
        assert!(cell.take(now + 2 * SEC, half, 1).allowed);
    }

    #[test]
    fn a_share_of_zero_admits_at_most_one_unit() {
        let rate = Rate::shared(100, SEC, 100, 0.0);
        let cell = Cell::default();
        let admitted = (0..100).filter(|_| cell.take(SEC, rate, 1).allowed).count();
        assert_eq!(admitted, 1);
    }

    #[test]
    fn each_of_three_replicas_enforces_a_third() {
        let rate = Rate::new(90, 60 * SEC, 90, 3);
        let cell = Cell::default();
        let admitted = (0..100).filter(|_| cell.take(SEC, rate, 1).allowed).count();
        assert_eq!(admitted, 30);
    }
}

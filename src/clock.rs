//! The wall clock and a monotonic clock, injectable so tests can move time
//! without sleeping. Calendar things (expiry, quota periods) read the wall
//! clock; durations (rate limits) read the monotonic one, so a step of the
//! wall clock (NTP, an operator) changes no admission.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use chrono::{DateTime, Duration, Utc};

/// Milliseconds since the epoch meaning "not frozen".
const LIVE: i64 = i64::MIN;

/// Monotonic nanoseconds meaning "not frozen".
const RUNNING: u64 = u64::MAX;

#[derive(Debug)]
struct Inner {
    offset_ms: AtomicI64,
    frozen_ms: AtomicI64,
    /// The monotonic clock's origin.
    base: Instant,
    /// Added to the monotonic reading by `advance`.
    mono_offset_ns: AtomicU64,
    /// The monotonic reading while frozen.
    mono_frozen_ns: AtomicU64,
}

/// System time plus an offset that only tests change; tests may also
/// freeze it so rate limits see no time pass between calls.
#[derive(Debug, Clone)]
pub struct Clock {
    inner: Arc<Inner>,
}

impl Default for Clock {
    fn default() -> Self {
        Self {
            inner: Arc::new(Inner {
                offset_ms: AtomicI64::new(0),
                frozen_ms: AtomicI64::new(LIVE),
                base: Instant::now(),
                mono_offset_ns: AtomicU64::new(0),
                mono_frozen_ns: AtomicU64::new(RUNNING),
            }),
        }
    }
}

impl Clock {
    /// The system clock.
    pub fn system() -> Self {
        Self::default()
    }

    /// Now, as this replica sees it.
    pub fn now(&self) -> DateTime<Utc> {
        let offset = Duration::milliseconds(self.inner.offset_ms.load(Ordering::Relaxed));
        match self.inner.frozen_ms.load(Ordering::Relaxed) {
            LIVE => Utc::now() + offset,
            ms => DateTime::from_timestamp_millis(ms).unwrap_or_default() + offset,
        }
    }

    /// Nanoseconds on a clock that only moves forward, at the pace of real
    /// time, whatever the wall clock does (from an arbitrary origin).
    pub fn monotonic_ns(&self) -> u64 {
        let offset = self.inner.mono_offset_ns.load(Ordering::Relaxed);
        match self.inner.mono_frozen_ns.load(Ordering::Relaxed) {
            RUNNING => self.running_ns().saturating_add(offset),
            ns => ns.saturating_add(offset),
        }
    }

    fn running_ns(&self) -> u64 {
        u64::try_from(self.inner.base.elapsed().as_nanos()).unwrap_or(u64::MAX - 1)
    }

    /// Moves this clock (and its clones) forward, wall and monotonic alike.
    /// For tests.
    pub fn advance(&self, by: std::time::Duration) {
        let ms = i64::try_from(by.as_millis()).unwrap_or(i64::MAX);
        self.inner.offset_ms.fetch_add(ms, Ordering::Relaxed);
        let ns = u64::try_from(by.as_nanos()).unwrap_or(u64::MAX);
        self.inner.mono_offset_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// Stops time, setting the wall clock to `at` (only `advance` moves it
    /// then). The monotonic clock stops where it is: setting the wall clock
    /// again is a wall-clock step, not time passing. For tests.
    pub fn freeze_at(&self, at: DateTime<Utc>) {
        self.inner.offset_ms.store(0, Ordering::Relaxed);
        self.inner
            .frozen_ms
            .store(at.timestamp_millis(), Ordering::Relaxed);
        let now = self.running_ns();
        let _ = self.inner.mono_frozen_ns.compare_exchange(
            RUNNING,
            now,
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frozen_clock_moves_only_when_advanced() {
        let c = Clock::system();
        let t: DateTime<Utc> = "2027-01-31T12:00:00Z".parse().unwrap();
        c.freeze_at(t);
        assert_eq!(c.now(), t);
        let mono = c.monotonic_ns();
        c.clone().advance(std::time::Duration::from_secs(60));
        assert_eq!(c.now(), t + Duration::seconds(60));
        assert_eq!(c.monotonic_ns(), mono + 60_000_000_000);
    }

    #[test]
    fn stepping_the_wall_clock_does_not_move_the_monotonic_clock() {
        let c = Clock::system();
        c.freeze_at("2027-01-31T12:00:00Z".parse().unwrap());
        let mono = c.monotonic_ns();
        c.freeze_at("2026-01-31T12:00:00Z".parse().unwrap());
        assert_eq!(c.monotonic_ns(), mono, "a year back on the wall");
        c.freeze_at("2030-01-31T12:00:00Z".parse().unwrap());
        assert_eq!(c.monotonic_ns(), mono, "years forward on the wall");
    }
}

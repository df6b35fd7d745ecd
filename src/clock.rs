//! The wall clock, injectable so tests can move time without sleeping.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use chrono::{DateTime, Duration, Utc};

/// Milliseconds since the epoch meaning "not frozen".
const LIVE: i64 = i64::MIN;

#[derive(Debug)]
struct Inner {
    offset_ms: AtomicI64,
    frozen_ms: AtomicI64,
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

    /// Moves this clock (and its clones) forward. For tests.
    pub fn advance(&self, by: std::time::Duration) {
        let ms = i64::try_from(by.as_millis()).unwrap_or(i64::MAX);
        self.inner.offset_ms.fetch_add(ms, Ordering::Relaxed);
    }

    /// Stops time at `at` (only `advance` moves it). For tests.
    pub fn freeze_at(&self, at: DateTime<Utc>) {
        self.inner.offset_ms.store(0, Ordering::Relaxed);
        self.inner
            .frozen_ms
            .store(at.timestamp_millis(), Ordering::Relaxed);
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
        c.clone().advance(std::time::Duration::from_secs(60));
        assert_eq!(c.now(), t + Duration::seconds(60));
    }
}

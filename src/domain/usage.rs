//! Per-key request counts: what a flush writes and what GetUsage reads.

use chrono::{DateTime, Duration, Utc};

use super::KeyId;

/// One key's decisions counted since the last flush.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyCounts {
    pub key: KeyId,
    pub allowed: u64,
    pub denied: u64,
}

/// Decisions about a key in one period (a UTC day or hour).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestTotal {
    /// The period's start (UTC midnight, or the hour).
    pub start: DateTime<Utc>,
    pub allowed: u64,
    pub denied: u64,
}

/// A key's totals per day and per hour, oldest first; periods with no
/// request are absent.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestSeries {
    pub daily: Vec<RequestTotal>,
    pub hourly: Vec<RequestTotal>,
}

/// Hourly totals are kept this long: the current hour and the 47 before.
pub const HOURLY_RETENTION_HOURS: i64 = 48;

/// Daily totals are kept this long (today and the 399 days before): the
/// most GetUsage returns.
pub const DAILY_RETENTION_DAYS: i64 = 400;

/// The oldest hour kept when the current hour is `hour`: older rows are
/// pruned, and GetUsage reads from here.
pub fn oldest_hour_kept(now: DateTime<Utc>) -> DateTime<Utc> {
    hour_of(now) - Duration::hours(HOURLY_RETENTION_HOURS - 1)
}

/// The oldest UTC day kept when it is `now`: older rows are pruned.
pub fn oldest_day_kept(now: DateTime<Utc>) -> DateTime<Utc> {
    day_of(now) - Duration::days(DAILY_RETENTION_DAYS - 1)
}

/// The start of `at`'s UTC hour.
pub fn hour_of(at: DateTime<Utc>) -> DateTime<Utc> {
    let secs = at.timestamp();
    DateTime::from_timestamp(secs - secs.rem_euclid(3600), 0).unwrap_or(at)
}

/// The start of `at`'s UTC day.
pub fn day_of(at: DateTime<Utc>) -> DateTime<Utc> {
    let secs = at.timestamp();
    DateTime::from_timestamp(secs - secs.rem_euclid(86_400), 0).unwrap_or(at)
}

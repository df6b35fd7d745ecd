//! Per-key request counts kept by [`MemoryStore`](super::MemoryStore): the
//! same rows as Postgres (`key_requests_daily`, `key_requests_hourly`),
//! added to by each flush, which prunes what has aged out.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};

use crate::domain::usage::{
    day_of, oldest_day_kept, oldest_hour_kept, KeyCounts, RequestSeries, RequestTotal,
};
use crate::domain::KeyId;

/// (allowed, denied) per key and period start.
type Rows = BTreeMap<(KeyId, DateTime<Utc>), (u64, u64)>;

#[derive(Default)]
pub(super) struct RequestCountRows {
    daily: Rows,
    hourly: Rows,
}

fn add(rows: &mut Rows, key: KeyId, at: DateTime<Utc>, c: &KeyCounts) {
    let row = rows.entry((key, at)).or_default();
    row.0 = row.0.saturating_add(c.allowed);
    row.1 = row.1.saturating_add(c.denied);
}

fn read(rows: &Rows, key: KeyId, from: DateTime<Utc>) -> Vec<RequestTotal> {
    rows.range((key, from)..=(key, DateTime::<Utc>::MAX_UTC))
        .map(|((_, start), (allowed, denied))| RequestTotal {
            start: *start,
            allowed: *allowed,
            denied: *denied,
        })
        .collect()
}

impl RequestCountRows {
    /// A flush: `counts` added to `hour` and its day; aged rows pruned.
    pub(super) fn add(&mut self, hour: DateTime<Utc>, counts: &[KeyCounts]) {
        for c in counts {
            add(&mut self.hourly, c.key, hour, c);
            add(&mut self.daily, c.key, day_of(hour), c);
        }
        let (hours_from, days_from) = (oldest_hour_kept(hour), oldest_day_kept(hour));
        self.hourly.retain(|(_, at), _| *at >= hours_from);
        self.daily.retain(|(_, at), _| *at >= days_from);
    }

    /// `key`'s rows from `days_from` and `hours_from`, oldest first.
    pub(super) fn series(
        &self,
        key: KeyId,
        days_from: DateTime<Utc>,
        hours_from: DateTime<Utc>,
    ) -> RequestSeries {
        RequestSeries {
            daily: read(&self.daily, key, days_from),
            hourly: read(&self.hourly, key, hours_from),
        }
    }
}

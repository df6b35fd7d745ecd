//! Per-key request counts on the hot path, without locks: each decision
//! about a known key adds one to an atomic counter in a fixed table of
//! slots (open addressing by key id, claimed with a compare-and-swap).
//! The flush (beside `last_used_at`, every `last_used_flush_seconds`)
//! switches new counts to the other of two tables, waits for the few
//! in-flight increments on the old one (each holds it for a handful of
//! instructions), drains it into one batch, and writes the batch in one
//! store call. Counts land in the hour in which they are flushed (at most
//! one flush interval late). A key that finds no free slot (more distinct
//! keys than `SLOTS` in one flush interval) is counted in `overflowed`
//! and a metric, never blocking the request.

use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering::SeqCst};

pub use crate::domain::usage::KeyCounts;
use crate::domain::KeyId;

/// Distinct keys counted per flush interval and replica, at most.
pub const SLOTS: usize = 16_384;
/// Slots probed before a key is given up on.
const PROBES: usize = 32;

const EMPTY: u8 = 0;
const CLAIMING: u8 = 1;
const READY: u8 = 2;

struct Slot {
    state: AtomicU8,
    key_hi: AtomicU64,
    key_lo: AtomicU64,
    allowed: AtomicU64,
    denied: AtomicU64,
}

impl Slot {
    fn new() -> Self {
        Self {
            state: AtomicU8::new(EMPTY),
            key_hi: AtomicU64::new(0),
            key_lo: AtomicU64::new(0),
            allowed: AtomicU64::new(0),
            denied: AtomicU64::new(0),
        }
    }
}

struct Table {
    slots: Box<[Slot]>,
    /// Increments in flight on this table.
    active: AtomicUsize,
}

impl Table {
    fn new() -> Self {
        Self {
            slots: (0..SLOTS).map(|_| Slot::new()).collect(),
            active: AtomicUsize::new(0),
        }
    }

    /// The slot of `(hi, lo)`, claiming a free one; `None` when full.
    fn slot(&self, hi: u64, lo: u64) -> Option<&Slot> {
        let start = (lo ^ hi.rotate_left(29)).wrapping_mul(0x9E37_79B9_7F4A_7C15) as usize;
        for i in 0..PROBES {
            let slot = &self.slots[(start.wrapping_add(i)) % SLOTS];
            loop {
                match slot.state.load(SeqCst) {
                    READY => {
                        if slot.key_hi.load(SeqCst) == hi && slot.key_lo.load(SeqCst) == lo {
                            return Some(slot);
                        }
                        break;
                    }
                    EMPTY => {
                        if slot
                            .state
                            .compare_exchange(EMPTY, CLAIMING, SeqCst, SeqCst)
                            .is_ok()
                        {
                            slot.key_hi.store(hi, SeqCst);
                            slot.key_lo.store(lo, SeqCst);
                            slot.state.store(READY, SeqCst);
                            return Some(slot);
                        }
                    }
                    // Another request is writing this slot's key: a few
                    // instructions; look again.
                    _ => std::hint::spin_loop(),
                }
            }
        }
        None
    }
}

/// The two tables and which one takes new counts.
pub struct RequestCounts {
    tables: [Table; 2],
    current: AtomicUsize,
    overflowed: AtomicU64,
    /// Serialises flushes (never taken on the request path).
    flushing: tokio::sync::Mutex<()>,
}

impl Default for RequestCounts {
    fn default() -> Self {
        Self {
            tables: [Table::new(), Table::new()],
            current: AtomicUsize::new(0),
            overflowed: AtomicU64::new(0),
            flushing: tokio::sync::Mutex::new(()),
        }
    }
}

impl std::fmt::Debug for RequestCounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestCounts")
            .field("overflowed", &self.overflowed())
            .finish_non_exhaustive()
    }
}

impl RequestCounts {
    /// Counts one decision about `key`: allowed or denied.
    pub fn count(&self, key: KeyId, allowed: bool) {
        let (hi, lo) = key.as_u64_pair();
        let table = self.enter();
        match table.slot(hi, lo) {
            Some(slot) if allowed => {
                slot.allowed.fetch_add(1, SeqCst);
            }
            Some(slot) => {
                slot.denied.fetch_add(1, SeqCst);
            }
            None => {
                self.overflowed.fetch_add(1, SeqCst);
                metrics::counter!(crate::telemetry::REQUEST_COUNTS_OVERFLOWED).increment(1);
            }
        }
        table.active.fetch_sub(1, SeqCst);
    }

    /// The table taking counts, marked in use (release with
    /// `active.fetch_sub`): a flush never drains a table in use.
    fn enter(&self) -> &Table {
        loop {
            let i = self.current.load(SeqCst);
            let t = &self.tables[i];
            t.active.fetch_add(1, SeqCst);
            if self.current.load(SeqCst) == i {
                return t;
            }
            // A flush switched tables meanwhile: count in the new one.
            t.active.fetch_sub(1, SeqCst);
        }
    }

    /// Decisions not counted because the table was full.
    pub fn overflowed(&self) -> u64 {
        self.overflowed.load(SeqCst)
    }

    /// Switches tables and drains the old one: every count made before the
    /// call, exactly once.
    pub async fn drain(&self) -> Vec<KeyCounts> {
        let _one = self.flushing.lock().await;
        let old = self.current.load(SeqCst);
        self.current.store(1 - old, SeqCst);
        let table = &self.tables[old];
        while table.active.load(SeqCst) != 0 {
            tokio::task::yield_now().await;
        }
        let mut out = Vec::new();
        for slot in table.slots.iter() {
            if slot.state.load(SeqCst) != READY {
                continue;
            }
            let allowed = slot.allowed.swap(0, SeqCst);
            let denied = slot.denied.swap(0, SeqCst);
            let key = KeyId::from_u64_pair(slot.key_hi.load(SeqCst), slot.key_lo.load(SeqCst));
            slot.state.store(EMPTY, SeqCst);
            if allowed + denied > 0 {
                out.push(KeyCounts {
                    key,
                    allowed,
                    denied,
                });
            }
        }
        merge_by_key(out)
    }

    /// Drains and writes the counts in one store call, for the hour of
    /// `now`; on failure they are kept for the next flush. Returns how many
    /// keys were written.
    pub async fn flush(
        &self,
        store: &dyn crate::store::Store,
        now: chrono::DateTime<chrono::Utc>,
    ) -> crate::error::Result<usize> {
        let batch = self.drain().await;
        if batch.is_empty() {
            return Ok(0);
        }
        let hour = crate::domain::usage::hour_of(now);
        if let Err(e) = store.add_request_counts(hour, &batch).await {
            self.restore(&batch);
            return Err(e.into());
        }
        Ok(batch.len())
    }

    /// Puts counts back (a failed write): they go out with the next flush.
    pub fn restore(&self, batch: &[KeyCounts]) {
        for c in batch {
            self.add(c.key, c.allowed, c.denied);
        }
    }

    fn add(&self, key: KeyId, allowed: u64, denied: u64) {
        let (hi, lo) = key.as_u64_pair();
        let t = self.enter();
        if let Some(slot) = t.slot(hi, lo) {
            slot.allowed.fetch_add(allowed, SeqCst);
            slot.denied.fetch_add(denied, SeqCst);
        } else {
            self.overflowed.fetch_add(allowed + denied, SeqCst);
        }
        t.active.fetch_sub(1, SeqCst);
    }
}

/// One entry per key, in key order: a batch never names a key twice (one
/// statement cannot update a row twice), and every replica's write locks
/// rows in the same order (concurrent flushes cannot deadlock).
fn merge_by_key(mut batch: Vec<KeyCounts>) -> Vec<KeyCounts> {
    batch.sort_unstable_by_key(|c| c.key);
    let mut out: Vec<KeyCounts> = Vec::with_capacity(batch.len());
    for c in batch {
        match out.last_mut() {
            Some(last) if last.key == c.key => {
                last.allowed = last.allowed.saturating_add(c.allowed);
                last.denied = last.denied.saturating_add(c.denied);
            }
            _ => out.push(c),
        }
    }
    out
}

/// Daily totals returned by default.
pub const DEFAULT_DAYS: u32 = 30;
/// Daily totals returned at most: as many as are kept.
pub const MAX_DAYS: u32 = crate::domain::usage::DAILY_RETENTION_DAYS as u32;

impl super::Authenticator {
    /// A key's request counts: `days` UTC days (today included; 0: the
    /// default) and the last 48 hours. The caller checked who may read it.
    /// Counts are per key: with no `key_id` there are none, and `days` is
    /// refused rather than ignored.
    pub async fn request_series(
        &self,
        key_id: &str,
        days: u32,
    ) -> crate::error::Result<crate::domain::usage::RequestSeries> {
        use crate::domain::usage::{day_of, oldest_hour_kept};
        use crate::error::Error;
        if key_id.is_empty() {
            if days != 0 {
                return Err(Error::invalid(
                    "days",
                    "needs key_id: request counts are kept per key",
                ));
            }
            return Ok(Default::default());
        }
        let key = KeyId::parse_str(key_id)
            .map_err(|_| Error::invalid("key_id", "must be a key id (a UUID)"))?;
        let days = match days {
            0 => DEFAULT_DAYS,
            n if n > MAX_DAYS => {
                return Err(Error::invalid(
                    "days",
                    &format!("must be at most {MAX_DAYS} (daily counts are kept that long)"),
                ));
            }
            n => n,
        };
        let now = self.clock.now();
        let days_from = day_of(now) - chrono::Duration::days(i64::from(days) - 1);
        let hours_from = oldest_hour_kept(now);
        Ok(self
            .store
            .request_counts(key, days_from, hours_from)
            .await?)
    }
}

#[cfg(test)]
mod tests;

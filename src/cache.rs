//! moka caches of verified keys and tenants, a negative cache of unknown
//! digests, and the consumer of pushed invalidations.
//!
//! Correctness rules (DESIGN.md §2):
//! - every decision-changing write is NOTIFYed; each replica evicts on receipt;
//! - after the listener reconnects the whole cache is dropped (`Flush`);
//! - a lookup that began before an invalidation must not re-insert what it
//!   read: it notes the generation before reading the store, inserts, then
//!   re-checks and removes its insert if the generation moved;
//! - TTLs bound staleness even if a notification is lost.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use moka::notification::RemovalCause;
use moka::sync::Cache;

use crate::crypto::KeyDigest;
use crate::domain::{KeyId, KeyRecord, Tenant, TenantId};
use crate::store::Invalidation;

/// Cache sizes and lifetimes.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheSettings {
    /// Verified keys held at most.
    pub max_keys: u64,
    /// Tenants held at most.
    pub max_tenants: u64,
    /// Safety-net lifetime of a cached key or tenant, in seconds.
    pub ttl_seconds: u64,
    /// Lifetime of a "no such key" entry, in seconds.
    pub negative_ttl_seconds: u64,
    /// Unknown digests remembered at most.
    pub max_negative: u64,
}

impl Default for CacheSettings {
    fn default() -> Self {
        Self {
            max_keys: 1_000_000,
            max_tenants: 100_000,
            ttl_seconds: 300,
            negative_ttl_seconds: 30,
            max_negative: 100_000,
        }
    }
}

/// A generation token taken before reading the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Generation(u64);

/// The caches of one replica.
pub struct Caches {
    keys: Cache<KeyDigest, Arc<KeyRecord>>,
    /// key id → digest, to evict by the id carried in notifications.
    /// Entries leave with their key entry. A plain map, not a second moka
    /// cache: it halves the memory per cached key (BENCHMARKS.md).
    digests: Arc<Mutex<HashMap<KeyId, KeyDigest>>>,
    max_keys: u64,
    unknown: Cache<KeyDigest, ()>,
    tenants: Cache<TenantId, Arc<Tenant>>,
    generation: AtomicU64,
}

impl std::fmt::Debug for Caches {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Caches")
            .field("keys", &self.keys.entry_count())
            .field("tenants", &self.tenants.entry_count())
            .field("generation", &self.generation.load(Ordering::Relaxed))
            .finish()
    }
}

impl Caches {
    /// Empty caches sized by `s`.
    pub fn new(s: &CacheSettings) -> Self {
        let ttl = Duration::from_secs(s.ttl_seconds.max(1));
        let digests: Arc<Mutex<HashMap<KeyId, KeyDigest>>> = Arc::default();
        let index = digests.clone();
        let keys = Cache::builder()
            .max_capacity(s.max_keys)
            .time_to_live(ttl)
            .eviction_listener(
                move |digest: Arc<KeyDigest>, record: Arc<KeyRecord>, cause| {
                    if cause != RemovalCause::Replaced {
                        forget_digest(&index, record.id, &digest);
                    }
                    if matches!(cause, RemovalCause::Size | RemovalCause::Expired) {
                        metrics::counter!(crate::telemetry::CACHE_EVICTIONS, "cache" => "key")
                            .increment(1);
                    }
                },
            )
            .build();
        Self {
            keys,
            digests,
            max_keys: s.max_keys,
            unknown: Cache::builder()
                .max_capacity(s.max_negative)
                .time_to_live(Duration::from_secs(s.negative_ttl_seconds.max(1)))
                .build(),
            tenants: Cache::builder()
                .max_capacity(s.max_tenants)
                .time_to_live(ttl)
                .build(),
            generation: AtomicU64::new(0),
        }
    }

    /// Take before reading the store; pass to the `insert_*` call.
    pub fn generation(&self) -> Generation {
        Generation(self.generation.load(Ordering::SeqCst))
    }

    fn moved_since(&self, g: Generation) -> bool {
        self.generation.load(Ordering::SeqCst) != g.0
    }

    /// A cached verified key.
    pub fn key(&self, digest: &KeyDigest) -> Option<Arc<KeyRecord>> {
        self.keys.get(digest)
    }

    /// Whether `digest` was recently found to match no key.
    pub fn is_unknown(&self, digest: &KeyDigest) -> bool {
        self.unknown.contains_key(digest)
    }

    /// Caches a key read from the store under `digest`, unless an
    /// invalidation arrived since `g`.
    pub fn insert_key(&self, g: Generation, digest: KeyDigest, record: Arc<KeyRecord>) {
        let id = record.id;
        let indexed = {
            let mut index = lock(&self.digests);
            index.insert(id, digest);
            index.len() as u64
        };
        self.keys.insert(digest, record);
        if indexed > self.max_keys.saturating_mul(2) {
            // Safety net: drop index entries whose key entry is gone.
            self.keys.run_pending_tasks();
            lock(&self.digests).retain(|_, d| self.keys.contains_key(d));
        }
        if self.moved_since(g) {
            self.keys.invalidate(&digest);
        }
    }

    /// Remembers that `digest` matches no key, unless an invalidation
    /// arrived since `g`.
    pub fn insert_unknown(&self, g: Generation, digest: KeyDigest) {
        self.unknown.insert(digest, ());
        if self.moved_since(g) {
            self.unknown.invalidate(&digest);
        }
    }

    /// Forgets a negative entry (after a rehash created that digest).
    pub fn forget_unknown(&self, digest: &KeyDigest) {
        self.unknown.invalidate(digest);
    }

    /// A cached tenant.
    pub fn tenant(&self, id: &TenantId) -> Option<Arc<Tenant>> {
        self.tenants.get(id)
    }

    /// Caches a tenant read from the store, unless an invalidation arrived since `g`.
    pub fn insert_tenant(&self, g: Generation, tenant: Arc<Tenant>) {
        let id = tenant.id.clone();
        self.tenants.insert(id.clone(), tenant);
        if self.moved_since(g) {
            self.tenants.invalidate(&id);
        }
    }

    /// Applies one pushed invalidation.
    pub fn apply(&self, event: &Invalidation) {
        match event {
            Invalidation::Key(id) => {
                self.generation.fetch_add(1, Ordering::SeqCst);
                let digest = lock(&self.digests).get(id).copied();
                if let Some(digest) = digest {
                    self.keys.invalidate(&digest);
                }
            }
            Invalidation::Tenant(id) => {
                self.generation.fetch_add(1, Ordering::SeqCst);
                self.tenants.invalidate(id);
            }
            Invalidation::Flush => self.flush(),
            Invalidation::Ready | Invalidation::Lost => {}
        }
    }

    /// Drops everything.
    pub fn flush(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.keys.invalidate_all();
        self.unknown.invalidate_all();
        self.tenants.invalidate_all();
    }

    /// Number of cached keys (approximate, for metrics and tests).
    pub fn key_count(&self) -> u64 {
        self.keys.run_pending_tasks();
        self.keys.entry_count()
    }
}

/// Removes `id → digest` only if it still points at `digest` (a rehash may
/// have pointed it elsewhere).
fn forget_digest(index: &Mutex<HashMap<KeyId, KeyDigest>>, id: KeyId, digest: &KeyDigest) {
    let mut index = lock(index);
    if index.get(&id) == Some(digest) {
        index.remove(&id);
    }
}

/// The index holds plain data: a panic elsewhere cannot leave it torn.
fn lock(index: &Mutex<HashMap<KeyId, KeyDigest>>) -> MutexGuard<'_, HashMap<KeyId, KeyDigest>> {
    index
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::TenantId;
    use chrono::Utc;

    fn record(id: KeyId, digest: KeyDigest) -> Arc<KeyRecord> {
        Arc::new(KeyRecord {
            id,
            tenant_id: TenantId::parse("t").unwrap(),
            name: "k".into(),
            environment: "live".into(),
            scopes: vec![],
            hint: "tg_live_…abcd".into(),
            digest,
            pepper_version: 1,
            created_at: Utc::now(),
            expires_at: None,
            revoked_at: None,
            revoke_reason: None,
            last_used_at: None,
            replaced_by: None,
            limits: None,
        })
    }

    fn digest(b: u8) -> KeyDigest {
        KeyDigest::from_slice(&[b; 32]).unwrap()
    }

    #[test]
    fn a_key_invalidation_evicts_by_id() {
        let c = Caches::new(&CacheSettings::default());
        let id = uuid::Uuid::now_v7();
        c.insert_key(c.generation(), digest(1), record(id, digest(1)));
        assert!(c.key(&digest(1)).is_some());
        c.apply(&Invalidation::Key(id));
        assert!(c.key(&digest(1)).is_none());
    }

    #[test]
    fn a_lookup_that_began_before_an_invalidation_does_not_reinsert() {
        let c = Caches::new(&CacheSettings::default());
        let id = uuid::Uuid::now_v7();
        let g = c.generation();
        // the revoke's notification arrives while the lookup is reading the store
        c.apply(&Invalidation::Key(id));
        c.insert_key(g, digest(2), record(id, digest(2)));
        assert!(c.key(&digest(2)).is_none());
        c.insert_unknown(g, digest(3));
        assert!(!c.is_unknown(&digest(3)));
    }

    #[test]
    fn flush_drops_everything() {
        let c = Caches::new(&CacheSettings::default());
        let id = uuid::Uuid::now_v7();
        c.insert_key(c.generation(), digest(4), record(id, digest(4)));
        c.insert_unknown(c.generation(), digest(5));
        c.apply(&Invalidation::Flush);
        assert!(c.key(&digest(4)).is_none());
        assert!(!c.is_unknown(&digest(5)));
    }
}

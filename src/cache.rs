//! moka caches of verified keys and tenants, a negative cache of unknown
//! digests, and the consumer of pushed invalidations.
//!
//! Correctness rules (ARCHITECTURE.md, Invariants):
//! - every decision-changing write is NOTIFYed; each replica evicts on receipt;
//! - after the listener reconnects, the changes missed meanwhile are applied
//!   (caught up by sequence); the whole cache is dropped (`Flush`) only when
//!   their history is gone;
//! - a lookup that began before an invalidation must not re-insert what it
//!   read: it notes the generation before reading the store, inserts, then
//!   re-checks and removes its insert if the generation moved;
//! - TTLs bound staleness even if a notification is lost.
//!
//! It also holds the replica's known key digests (`known`: a binary fuse
//! filter of every stored digest, built when the invalidation feed first
//! connects, after a flush and when enough keys were added since, beside an
//! exact set of the `KeyAdded` digests announced meanwhile). A digest outside
//! them is looked up in the store only within a small per-second budget, so
//! a flood of random well-formed keys costs no database queries beyond that
//! budget (and the filter's rare false positives).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use moka::sync::Cache;

use crate::crypto::KeyDigest;
use crate::domain::{KeyRecord, Tenant, TenantId};
use crate::store::Invalidation;

mod index;
pub mod known;

use index::IdIndex;
use known::KnownDigests;
pub use known::{BuiltFilter, KnownEpoch};

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
    /// Store lookups per second for digests outside the known set (keys
    /// created elsewhere moments ago, before their notification arrived).
    /// Beyond it such keys are refused as unknown without a lookup.
    pub unknown_lookups_per_second: u64,
    /// How long, in seconds, a replica whose invalidation feed is down keeps
    /// answering from its cache (and stays ready). Past it, cached decisions
    /// are refused as UNAVAILABLE and readiness turns NOT_SERVING.
    pub max_staleness_seconds: u64,
    /// Benchmarks only: never answer from the key cache, so every decision
    /// reads its key from the store (uncached Authenticate measured with
    /// one request body). Never set it in production.
    pub benchmark_bypass_key_cache: bool,
    /// Most distinct digests one batched key lookup asks the store for
    /// (cache misses are grouped: `authz/lookups.rs`).
    pub lookup_batch_max: u32,
    /// Key lookups running at once before further misses wait and go
    /// together in the next one (≥ 1). A miss with fewer running is asked
    /// at once, alone.
    pub lookup_batches_in_flight: u32,
}

impl Default for CacheSettings {
    fn default() -> Self {
        Self {
            max_keys: 1_000_000,
            max_tenants: 100_000,
            ttl_seconds: 300,
            negative_ttl_seconds: 30,
            max_negative: 100_000,
            unknown_lookups_per_second: 100,
            max_staleness_seconds: 60,
            benchmark_bypass_key_cache: false,
            lookup_batch_max: 128,
            lookup_batches_in_flight: 1,
        }
    }
}

/// How cache-miss key lookups are grouped into store queries (from
/// [`CacheSettings`]; used by `authz/lookups.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LookupBatching {
    /// Most distinct digests per query (≥ 1).
    pub max_digests: usize,
    /// Queries running at once before misses wait for the next (≥ 1).
    pub in_flight: usize,
}

/// A generation token taken before reading the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Generation(u64);

/// The caches of one replica.
pub struct Caches {
    keys: Cache<KeyDigest, Arc<KeyRecord>>,
    /// key id → the digest it is cached under, to evict by the id carried
    /// in notifications (`index.rs`). Kept beside moka rather than by an
    /// eviction listener: a listener makes moka take a per-key lock on
    /// every insert (BENCHMARKS.md §2).
    digests: IdIndex,
    unknown: Cache<KeyDigest, ()>,
    tenants: Cache<TenantId, Arc<Tenant>>,
    generation: AtomicU64,
    known: KnownDigests,
    /// False once the feed has been down longer than the staleness window:
    /// cached entries can no longer be trusted (one load per cache hit).
    confirmable: AtomicBool,
    /// `CacheSettings::benchmark_bypass_key_cache`.
    bypass_keys: bool,
    lookup_batching: LookupBatching,
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
        Self {
            keys: Cache::builder()
                .max_capacity(s.max_keys)
                .time_to_live(ttl)
                .build(),
            digests: IdIndex::default(),
            unknown: Cache::builder()
                .max_capacity(s.max_negative)
                .time_to_live(Duration::from_secs(s.negative_ttl_seconds.max(1)))
                .build(),
            tenants: Cache::builder()
                .max_capacity(s.max_tenants)
                .time_to_live(ttl)
                .build(),
            generation: AtomicU64::new(0),
            confirmable: AtomicBool::new(true),
            bypass_keys: s.benchmark_bypass_key_cache,
            lookup_batching: LookupBatching {
                max_digests: (s.lookup_batch_max as usize).max(1),
                in_flight: (s.lookup_batches_in_flight as usize).max(1),
            },
            known: KnownDigests::new(s.unknown_lookups_per_second),
        }
    }

    /// How this replica groups its cache-miss key lookups.
    pub fn lookup_batching(&self) -> LookupBatching {
        self.lookup_batching
    }

    /// Whether `digest` is worth a store lookup: it may be a stored digest
    /// (the filter or the exact additions say so), the set is not loaded,
    /// or the per-second budget for others allows it.
    pub fn worth_looking_up(&self, digest: &KeyDigest, now_ns: u64) -> bool {
        self.known.worth_looking_up(digest, now_ns)
    }

    /// Begins a build of the known-digest filter: take before reading every
    /// digest from the store.
    pub fn known_epoch(&self) -> KnownEpoch {
        self.known.begin()
    }

    /// Builds the filter of every stored digest, read since `epoch`, and
    /// starts using it, unless the feed's history was lost since `epoch`.
    /// Builds on the calling thread (the feed follower builds off the
    /// runtime and calls [`Caches::install_known`]).
    pub fn know(&self, epoch: KnownEpoch, digests: impl IntoIterator<Item = KeyDigest>) {
        let prefixes = digests.into_iter().map(|d| known::prefix(&d)).collect();
        match BuiltFilter::build(prefixes) {
            Ok(built) => self.install_known(epoch, built),
            Err(e) => tracing::warn!(error = e, "could not build the known-digest filter"),
        }
    }

    /// Installs a filter built from every digest read since `epoch`.
    pub fn install_known(&self, epoch: KnownEpoch, built: BuiltFilter) {
        self.known.install(epoch, built);
    }

    /// Whether enough keys were added since the last build to fold them
    /// into a new filter.
    pub fn known_wants_rebuild(&self) -> bool {
        self.known.wants_rebuild()
    }

    /// Background upkeep: applies moka's pending evictions, then sweeps one
    /// shard of the id index of keys no longer cached (evicted for size or
    /// age: counted as evictions). Off the request path.
    pub fn maintain(&self) {
        self.keys.run_pending_tasks();
        let swept = self.digests.sweep_next(|d| self.keys.contains_key(d));
        if swept > 0 {
            metrics::counter!(crate::telemetry::CACHE_EVICTIONS, "cache" => "key")
                .increment(swept as u64);
        }
    }

    /// Follows whether the known set is loaded and in use.
    pub fn known_loaded(&self) -> tokio::sync::watch::Receiver<bool> {
        self.known.subscribe()
    }

    /// Whether the known set is loaded and in use.
    pub fn knows_digests(&self) -> bool {
        self.known.loaded()
    }

    /// Whether cached entries may still decide: false while the feed has
    /// been down for longer than `max_staleness_seconds`.
    #[inline]
    pub fn confirmable(&self) -> bool {
        self.confirmable.load(Ordering::Acquire)
    }

    /// Set by the feed follower as the staleness window opens and closes.
    pub fn set_confirmable(&self, confirmable: bool) {
        self.confirmable.store(confirmable, Ordering::Release);
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
        if self.bypass_keys {
            return None;
        }
        self.keys.get(digest)
    }

    /// Whether `digest` was recently found to match no key.
    pub fn is_unknown(&self, digest: &KeyDigest) -> bool {
        self.unknown.contains_key(digest)
    }

    /// Caches a key read from the store under `digest`, unless an
    /// invalidation arrived since `g`.
    /// `digest` is `record.digest`.
    pub fn insert_key(&self, g: Generation, digest: KeyDigest, record: Arc<KeyRecord>) {
        // Both under the id's shard lock, so a sweep never sees the index
        // entry without the cache entry it stands for.
        self.digests
            .insert_with(record.id, digest, || self.keys.insert(digest, record));
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
                if let Some(digest) = self.digests.remove(id) {
                    self.keys.invalidate(&digest);
                }
            }
            Invalidation::Tenant(id) => {
                self.generation.fetch_add(1, Ordering::SeqCst);
                self.tenants.invalidate(id);
            }
            Invalidation::KeyAdded(digest) => {
                self.unknown.invalidate(digest);
                self.known.add(digest);
            }
            // Changes missed while the feed is down (additions among them)
            // are delivered when it returns; only a lost history unloads.
            Invalidation::Lost => {}
            Invalidation::Flush => {
                metrics::counter!(crate::telemetry::CACHE_FLUSHES).increment(1);
                self.known.unload();
                self.flush();
            }
            Invalidation::Ready | Invalidation::Current(_) => {}
        }
    }

    /// Drops everything.
    pub fn flush(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.keys.invalidate_all();
        self.digests.clear();
        self.unknown.invalidate_all();
        self.tenants.invalidate_all();
    }

    /// Entries of the id → digest index (tests).
    #[cfg(test)]
    fn indexed(&self) -> usize {
        self.digests.len()
    }

    /// Number of cached keys (approximate, for metrics and tests).
    pub fn key_count(&self) -> u64 {
        self.keys.run_pending_tasks();
        self.keys.entry_count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{KeyId, TenantId};
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
            lineage_id: id,
            labels: Default::default(),
            legacy: false,
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
    fn the_id_index_forgets_keys_the_cache_evicts() {
        let c = Caches::new(&CacheSettings {
            max_keys: 8,
            ..CacheSettings::default()
        });
        for b in 0..64u8 {
            c.insert_key(
                c.generation(),
                digest(b),
                record(uuid::Uuid::now_v7(), digest(b)),
            );
        }
        let held = c.key_count();
        assert!(held <= 8, "{held}");
        // Background upkeep sweeps the index of every evicted key, one
        // shard per call, and counts them.
        for _ in 0..index::SHARDS {
            c.maintain();
        }
        assert_eq!(c.indexed() as u64, c.key_count());
        c.flush();
        assert_eq!(c.key_count(), 0);
        assert_eq!(c.indexed(), 0);
    }

    #[test]
    fn a_key_re_inserted_over_its_own_entry_is_still_evicted_by_id() {
        // A key re-read and re-inserted over its own expired entry, then
        // every shard swept: the index still points at it.
        let c = Caches::new(&CacheSettings::default());
        let id = uuid::Uuid::now_v7();
        c.insert_key(c.generation(), digest(6), record(id, digest(6)));
        c.insert_key(c.generation(), digest(6), record(id, digest(6)));
        for _ in 0..index::SHARDS {
            c.maintain();
        }
        assert_eq!(c.indexed(), 1);
        // So a revocation still finds and evicts it.
        c.apply(&Invalidation::Key(id));
        assert!(c.key(&digest(6)).is_none());
        assert_eq!(c.indexed(), 0);
    }

    #[test]
    fn a_rehashed_key_is_evicted_by_id_under_its_new_digest() {
        let c = Caches::new(&CacheSettings::default());
        let id = uuid::Uuid::now_v7();
        c.insert_key(c.generation(), digest(7), record(id, digest(7)));
        c.insert_key(c.generation(), digest(8), record(id, digest(8)));
        c.apply(&Invalidation::Key(id));
        assert!(c.key(&digest(8)).is_none());
    }

    #[test]
    fn a_cached_record_keeps_everything_a_decision_reads() {
        let id = uuid::Uuid::now_v7();
        let mut full = (*record(id, digest(9))).clone();
        full.scopes = vec!["read".into()];
        full.expires_at = Some(Utc::now());
        full.revoke_reason = Some("leaked".into());
        let slim = full.clone().for_decisions();
        assert_eq!(
            (slim.id, &slim.tenant_id, &slim.environment, &slim.scopes),
            (full.id, &full.tenant_id, &full.environment, &full.scopes)
        );
        assert_eq!(
            (slim.expires_at, slim.revoked_at),
            (full.expires_at, full.revoked_at)
        );
        assert_eq!(
            (slim.digest, slim.pepper_version),
            (full.digest, full.pepper_version)
        );
        assert_eq!(
            (&slim.limits, slim.replaced_by),
            (&full.limits, full.replaced_by)
        );
        assert_eq!((slim.name.as_str(), slim.hint.as_str()), ("", ""));
        assert_eq!(slim.revoke_reason, None);
    }

    #[test]
    fn outside_the_known_digests_lookups_are_budgeted_per_second() {
        let c = Caches::new(&CacheSettings {
            unknown_lookups_per_second: 2,
            ..CacheSettings::default()
        });
        let t0 = 1_000_000_000_000;
        // Not loaded yet: everything is looked up.
        assert!((0..10).all(|b| c.worth_looking_up(&digest(b), t0)));
        c.know(c.known_epoch(), [digest(1)]);
        assert!(c.knows_digests());
        assert!((0..10).all(|_| c.worth_looking_up(&digest(1), t0)));
        assert!(c.worth_looking_up(&digest(20), t0));
        assert!(c.worth_looking_up(&digest(21), t0));
        assert!(!c.worth_looking_up(&digest(22), t0));
        assert!(c.worth_looking_up(&digest(22), t0 + 500_000_000));
    }

    #[test]
    fn a_key_added_while_digests_load_is_kept_and_only_a_flush_unloads_them() {
        let c = Caches::new(&CacheSettings {
            unknown_lookups_per_second: 1,
            ..CacheSettings::default()
        });
        let mut loaded = c.known_loaded();
        let epoch = c.known_epoch();
        c.apply(&Invalidation::KeyAdded(digest(7)));
        c.know(epoch, [digest(1)]);
        assert!(*loaded.borrow_and_update());
        assert!(c.worth_looking_up(&digest(30), 0)); // the budget's one
        assert!(!c.worth_looking_up(&digest(31), 0));
        assert!(c.worth_looking_up(&digest(7), 0));

        // A lost feed is caught up on reconnect: the set stays in use.
        c.apply(&Invalidation::Lost);
        assert!(c.knows_digests());
        let before_flush = c.known_epoch();
        c.apply(&Invalidation::Flush);
        assert!(!*loaded.borrow_and_update());
        assert!(!c.knows_digests());
        assert!(c.worth_looking_up(&digest(32), 0));
        // A load begun before the flush does not switch the set back on.
        c.know(before_flush, []);
        assert!(!c.knows_digests());
        c.know(c.known_epoch(), []);
        assert!(c.knows_digests());
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

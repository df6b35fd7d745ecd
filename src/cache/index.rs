//! The key cache's id index: key id → the digest the key is cached under,
//! so a notification carrying only the id can evict it.
//!
//! It follows the cache without moka's eviction listener (which would make
//! every insert take a per-key lock): an entry is added with its cache
//! entry under the same shard lock, removed on invalidation, and otherwise
//! swept by background upkeep once its digest is no longer cached. The
//! sweep takes one shard per call, so no lock is held over the whole index.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};

use crate::crypto::KeyDigest;
use crate::domain::KeyId;

/// Shards of the index: a sweep holds one for 1/SHARDS of the entries.
pub(super) const SHARDS: usize = 64;

type Shard = HashMap<KeyId, KeyDigest>;

pub(super) struct IdIndex {
    shards: Box<[Mutex<Shard>]>,
    /// The shard the next sweep takes.
    next_sweep: AtomicUsize,
}

impl Default for IdIndex {
    fn default() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            next_sweep: AtomicUsize::new(0),
        }
    }
}

impl IdIndex {
    fn shard(&self, id: &KeyId) -> MutexGuard<'_, Shard> {
        // v7 ids: the low bits are random.
        let i = (id.as_u128() as usize) % SHARDS;
        lock(&self.shards[i])
    }

    /// Records that `id` is cached under `digest` and, under the same lock,
    /// caches it (`cache`).
    pub(super) fn insert_with(&self, id: KeyId, digest: KeyDigest, cache: impl FnOnce()) {
        let mut shard = self.shard(&id);
        shard.insert(id, digest);
        cache();
    }

    /// Forgets `id`, returning the digest it was cached under.
    pub(super) fn remove(&self, id: &KeyId) -> Option<KeyDigest> {
        self.shard(id).remove(id)
    }

    /// Forgets everything.
    pub(super) fn clear(&self) {
        for shard in self.shards.iter() {
            lock(shard).clear();
        }
    }

    /// Sweeps the next shard of entries whose digest is no longer `cached`;
    /// returns how many it dropped.
    pub(super) fn sweep_next(&self, cached: impl Fn(&KeyDigest) -> bool) -> usize {
        let i = self.next_sweep.fetch_add(1, Ordering::Relaxed) % SHARDS;
        let mut shard = lock(&self.shards[i]);
        let before = shard.len();
        shard.retain(|_, digest| cached(digest));
        before - shard.len()
    }

    /// Entries in all shards.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.shards.iter().map(|s| lock(s).len()).sum()
    }
}

/// The index holds plain data: a panic elsewhere cannot leave it torn.
fn lock(shard: &Mutex<Shard>) -> MutexGuard<'_, Shard> {
    shard
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(b: u8) -> KeyDigest {
        KeyDigest::from_slice(&[b; 32]).unwrap()
    }

    #[test]
    fn a_full_round_of_sweeps_drops_exactly_the_uncached() {
        let index = IdIndex::default();
        let ids: Vec<KeyId> = (0..1000).map(|_| uuid::Uuid::now_v7()).collect();
        for (i, id) in ids.iter().enumerate() {
            index.insert_with(*id, digest((i % 2) as u8), || {});
        }
        // Keys under digest 1 are still cached; those under 0 were evicted.
        let mut dropped = 0;
        for _ in 0..SHARDS {
            dropped += index.sweep_next(|d| *d == digest(1));
        }
        assert_eq!(dropped, 500);
        assert_eq!(index.len(), 500);
        assert_eq!(index.remove(&ids[1]), Some(digest(1)));
        assert_eq!(index.remove(&ids[0]), None);
    }

    #[test]
    fn one_sweep_takes_one_shard() {
        let index = IdIndex::default();
        for _ in 0..(SHARDS * 20) {
            index.insert_with(uuid::Uuid::now_v7(), digest(0), || {});
        }
        let dropped = index.sweep_next(|_| false);
        assert!(dropped < SHARDS * 20, "{dropped}");
        assert_eq!(index.len(), SHARDS * 20 - dropped);
    }
}

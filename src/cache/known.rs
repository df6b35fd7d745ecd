//! The replica's known key digests: a static binary fuse filter built from
//! every stored digest, beside an exact set of the digests added since.
//!
//! - **Filter.** A `BinaryFuse16` (xorf) over the 8-byte prefixes of the
//!   stored digests: about 18 bits per key (2.3 MB a million keys, where
//!   the exact set it replaces took about 20 bytes per key), no false
//!   negatives, false positives at ≈ 2^-16 (each one costs a single store
//!   lookup, then the negative cache answers).
//! - **Delta.** A filter cannot grow, so a digest announced after a build
//!   began (`KeyAdded`: create, rotate, rehash) goes into an exact set at
//!   once. A build folds in every addition announced before it began (those
//!   rows were committed before its first page was read) and leaves the
//!   rest in the delta.
//! - **Rebuilds** happen when the invalidation feed connects with the set
//!   not loaded (start-up, after a flush) and when the delta reaches
//!   [`REBUILD_AFTER_ADDITIONS`]; each reads every digest from the store
//!   (keyset pages of 10,000) and builds off the async runtime. Nothing is
//!   lost while one runs: the previous filter and the delta keep answering.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use xorf::{BinaryFuse16, Filter};

use crate::crypto::KeyDigest;
use crate::limits::gcra::{Cell, Rate};

/// Additions held in the exact delta before a rebuild folds them into the
/// filter (about 1 MB of delta; at 10 million keys a rebuild reads them all
/// again, so it should be rare: BENCHMARKS.md §11).
pub const REBUILD_AFTER_ADDITIONS: usize = 65_536;

/// The 8-byte prefix of a digest: what the filter and the delta hold.
pub fn prefix(digest: &KeyDigest) -> u64 {
    let b = digest.as_bytes();
    u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
}

/// Taken before reading every digest from the store; pass to
/// [`KnownDigests::install`]. Names the flush epoch (a build begun before a
/// flush does not turn the set on) and the build's own number (it folds in
/// only the additions announced before it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KnownEpoch {
    flush: u64,
    build: u64,
}

/// A filter built off the lock, ready to install.
pub struct BuiltFilter {
    filter: Option<BinaryFuse16>,
    keys: usize,
}

impl BuiltFilter {
    /// Builds the filter of `prefixes` (sorted and deduplicated here: the
    /// construction needs distinct keys). CPU-bound: about a second for
    /// ten million keys; run it off the async runtime.
    pub fn build(mut prefixes: Vec<u64>) -> Result<Self, &'static str> {
        prefixes.sort_unstable();
        prefixes.dedup();
        let keys = prefixes.len();
        let filter = if prefixes.is_empty() {
            None
        } else {
            Some(BinaryFuse16::try_from(&prefixes)?)
        };
        Ok(Self { filter, keys })
    }

    /// Distinct prefixes in the filter.
    pub fn keys(&self) -> usize {
        self.keys
    }

    /// Bytes the filter's fingerprints take.
    pub fn bytes(&self) -> usize {
        self.filter
            .as_ref()
            .map_or(0, |f| f.fingerprints.len() * std::mem::size_of::<u16>())
    }
}

struct State {
    filter: Option<BinaryFuse16>,
    /// Number of the build whose filter is installed (0: none).
    built: u64,
    /// Builds begun so far.
    started: u64,
    /// Prefixes announced since, each with the number of builds begun when
    /// it was announced: build `n` folds in those tagged below `n`.
    delta: HashMap<u64, u64>,
}

/// The known-digest filter, its delta and the lookup budget for others.
/// Until a build completes (and again after a flush) every digest is looked
/// up. Additions are kept even then, so none is lost while a build runs.
pub struct KnownDigests {
    state: RwLock<State>,
    loaded: AtomicBool,
    /// Bumped on a flush: a build begun before does not count.
    epoch: AtomicU64,
    /// `loaded`, for those who wait on it.
    watch: tokio::sync::watch::Sender<bool>,
    budget: Cell,
    rate: Rate,
}

impl KnownDigests {
    /// An unloaded set whose budget is `lookups_per_second` (0 counts as 1).
    pub fn new(lookups_per_second: u64) -> Self {
        let per_second = lookups_per_second.max(1);
        Self {
            state: RwLock::new(State {
                filter: None,
                built: 0,
                started: 0,
                delta: HashMap::new(),
            }),
            loaded: AtomicBool::new(false),
            epoch: AtomicU64::new(0),
            watch: tokio::sync::watch::Sender::new(false),
            budget: Cell::default(),
            rate: Rate::new(per_second, 1_000_000_000, per_second, 1),
        }
    }

    /// Whether `digest` is worth a store lookup: it may be a stored digest
    /// (in the filter or the delta), the set is not loaded, or the
    /// per-second budget for others allows it.
    pub fn worth_looking_up(&self, digest: &KeyDigest, now_ns: u64) -> bool {
        !self.loaded.load(Ordering::Acquire)
            || self.may_contain(prefix(digest))
            || self.budget.take(now_ns, self.rate, 1).allowed
    }

    /// Whether the filter or the delta may hold `prefix` (never a false
    /// "no" for a prefix installed or added).
    pub fn may_contain(&self, prefix: u64) -> bool {
        let state = read(&self.state);
        state.delta.contains_key(&prefix)
            || state.filter.as_ref().is_some_and(|f| f.contains(&prefix))
    }

    /// Begins a build: take before reading every digest from the store.
    pub fn begin(&self) -> KnownEpoch {
        let mut state = write(&self.state);
        state.started += 1;
        KnownEpoch {
            flush: self.epoch.load(Ordering::SeqCst),
            build: state.started,
        }
    }

    /// A digest announced (`KeyAdded`): known at once, through the delta.
    pub fn add(&self, digest: &KeyDigest) {
        let mut state = write(&self.state);
        let tag = state.started;
        state.delta.insert(prefix(digest), tag);
    }

    /// Installs a filter built from every digest read since `epoch` (unless
    /// a later build is already in), drops the additions it folds in, and
    /// starts using the set unless the feed's history was lost since.
    pub fn install(&self, epoch: KnownEpoch, built: BuiltFilter) {
        let mut state = write(&self.state);
        if epoch.build > state.built {
            state.filter = built.filter;
            state.built = epoch.build;
            // Announced before this build began: committed before its
            // first page, so read by it. Later ones stay exact.
            state.delta.retain(|_, tag| *tag >= epoch.build);
            state.delta.shrink_to_fit();
        }
        // Under the state's lock, as in `unload`: a loss cannot slip in
        // between the check and the switch.
        if self.epoch.load(Ordering::SeqCst) == epoch.flush {
            self.loaded.store(true, Ordering::Release);
            self.watch.send_replace(true);
        }
    }

    /// The change history was lost: additions may be missed, so every
    /// digest is looked up until a build begun after this completes.
    pub fn unload(&self) {
        let _state = write(&self.state);
        self.epoch.fetch_add(1, Ordering::SeqCst);
        self.loaded.store(false, Ordering::Release);
        self.watch.send_replace(false);
    }

    /// Whether the set is loaded and in use.
    pub fn loaded(&self) -> bool {
        self.loaded.load(Ordering::Acquire)
    }

    /// Follows whether the set is loaded and in use.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<bool> {
        self.watch.subscribe()
    }

    /// Whether the delta has grown enough to fold it in with a rebuild.
    pub fn wants_rebuild(&self) -> bool {
        read(&self.state).delta.len() >= REBUILD_AFTER_ADDITIONS
    }

    /// Additions held exactly, waiting for the next build (tests, logs).
    pub fn delta_len(&self) -> usize {
        read(&self.state).delta.len()
    }
}

fn read<T>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn write<T>(l: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn digest_of(p: u64, rest: u8) -> KeyDigest {
        let mut b = [rest; 32];
        b[..8].copy_from_slice(&p.to_le_bytes());
        KeyDigest::from_slice(&b).unwrap()
    }

    fn built(prefixes: &[u64]) -> BuiltFilter {
        BuiltFilter::build(prefixes.to_vec()).unwrap()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Every stored digest (duplicates and all), every addition before,
        /// during and after a build, and an empty store: never a "no".
        #[test]
        fn no_stored_or_added_digest_is_ever_refused_a_lookup(
            stored in prop::collection::vec(any::<u64>(), 0..3_000),
            duplicated in prop::collection::vec(any::<prop::sample::Index>(), 0..50),
            before in prop::collection::vec(any::<u64>(), 0..50),
            during in prop::collection::vec(any::<u64>(), 0..50),
            after in prop::collection::vec(any::<u64>(), 0..50),
        ) {
            let k = KnownDigests::new(1);
            let mut read_by_build = stored.clone();
            if !stored.is_empty() {
                read_by_build.extend(duplicated.iter().map(|i| stored[i.index(stored.len())]));
            }
            for p in &before {
                k.add(&digest_of(*p, 1));
            }
            let epoch = k.begin();
            // announced before the build began: committed, so read by it
            read_by_build.extend(&before);
            for p in &during {
                k.add(&digest_of(*p, 2));
            }
            k.install(epoch, built(&read_by_build));
            for p in &after {
                k.add(&digest_of(*p, 3));
            }
            prop_assert!(k.loaded());
            for p in stored.iter().chain(&before).chain(&during).chain(&after) {
                prop_assert!(k.may_contain(*p), "{p} refused");
                // and so it is looked up whatever the budget says
                prop_assert!(k.worth_looking_up(&digest_of(*p, 9), 0));
            }
            // the build folded in the additions before it, kept the others
            prop_assert!(k.delta_len() <= during.len() + after.len());
        }
    }

    #[test]
    fn the_property_inputs_reach_every_branch_of_a_build() {
        // An empty store (no filter at all), duplicates in the store, and
        // additions kept after a build: the branches the property relies on.
        let empty = built(&[]);
        assert_eq!((empty.keys(), empty.bytes()), (0, 0));
        let dup = built(&[5, 5, 7]);
        assert_eq!(dup.keys(), 2);
        let k = KnownDigests::new(1);
        let e = k.begin();
        k.add(&digest_of(9, 0));
        k.install(e, empty);
        assert_eq!(k.delta_len(), 1);
        assert!(k.may_contain(9) && !k.may_contain(10));
    }

    #[test]
    fn the_false_positive_rate_is_within_the_filters_bound() {
        // xorf documents ≈ 2^-16 (< 0.0025%) for BinaryFuse16. Deterministic
        // keys (splitmix64 of a counter), so the count is the same each run.
        let mut x = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move || {
            x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        };
        let stored: Vec<u64> = (0..200_000).map(|_| next()).collect();
        let k = KnownDigests::new(1);
        let e = k.begin();
        let filter = built(&stored);
        assert!(
            filter.bytes() * 8 <= stored.len() * 19,
            "{} bits per key",
            filter.bytes() * 8 / stored.len()
        );
        k.install(e, filter);
        let probes = 2_000_000u64;
        let positives = (0..probes).filter(|_| k.may_contain(next())).count() as f64;
        let rate = positives / probes as f64;
        // 2^-16 is 30.5 expected positives in 2 million; allow for chance
        // (the 99.99th percentile of that Poisson count is about 52).
        assert!(rate < 0.000_025, "false-positive rate {rate}");
        // and the filter is not trivially "no" either
        assert!(stored.iter().all(|p| k.may_contain(*p)));
    }

    #[test]
    fn a_build_folds_in_only_the_additions_announced_before_it_began() {
        let k = KnownDigests::new(1);
        k.add(&digest_of(1, 0));
        let first = k.begin();
        k.add(&digest_of(2, 0));
        let second = k.begin();
        k.add(&digest_of(3, 0));
        // The later build finishes first; it read 1 and 2 (before it began).
        k.install(second, built(&[1, 2]));
        assert_eq!(k.delta_len(), 1, "3 stays exact");
        // The earlier build, finishing late, does not replace its filter.
        k.install(first, built(&[1]));
        assert!(k.may_contain(2) && k.may_contain(3) && k.may_contain(1));
    }
}

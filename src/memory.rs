//! Giving freed memory back to the system after a large, short-lived
//! build. The allocator the binary sets (mimalloc) returns freed pages
//! lazily, on a later allocation by the thread that freed them. The
//! known-digest filter is built on a blocking thread that then idles, so
//! the build's working memory (about 35 bytes a stored key) stayed
//! resident for good: 98 MiB after loading 1M keys, for a 2.2 MiB filter
//! (BENCHMARKS.md §11). The binary registers how to ask its allocator
//! (this library has no unsafe code); the loader asks after each build.

use std::sync::OnceLock;

static GIVE_BACK: OnceLock<fn()> = OnceLock::new();

/// Registers how to make the allocator return freed memory now (once; the
/// binary does it at start).
pub fn set_give_back(f: fn()) {
    let _ = GIVE_BACK.set(f);
}

/// Returns freed memory to the system now, if the binary said how.
pub fn give_back_freed() {
    if let Some(f) = GIVE_BACK.get() {
        f();
    }
}

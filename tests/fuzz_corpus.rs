//! The fuzzers' corpora as regression tests: every input kept in
//! `fuzz/corpus/<target>/` (found by `cargo fuzz`, see `fuzz/README.md`)
//! goes through the same code as the fuzz target, and none may panic.

#[path = "support/fuzz_harness.rs"]
mod fuzz_harness;

use std::path::Path;

fn run_corpus(target: &str, feed: fn(&[u8])) -> usize {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut inputs: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .collect();
    inputs.sort();
    for path in &inputs {
        let data = std::fs::read(path).unwrap();
        // No key literal is kept: the corpus writes `$KEY` instead.
        let text = String::from_utf8_lossy(&data);
        for word in text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
            for profile in fuzz_harness::shipped_profiles() {
                assert!(
                    profile.key_format.parse(word).is_err(),
                    "{}: holds a well-formed {} key; write $KEY",
                    path.display(),
                    profile.name
                );
            }
        }
        let outcome = std::panic::catch_unwind(|| feed(&data));
        assert!(outcome.is_ok(), "{target}: {} panicked", path.display());
    }
    inputs.len()
}

#[test]
fn every_kept_fuzz_input_is_answered_without_a_panic() {
    for (target, feed) in fuzz_harness::TARGETS {
        let n = run_corpus(target, feed);
        assert!(n >= 5, "{target}: only {n} corpus inputs");
    }
}

//! Cryptography: key digests with versioned peppers.

pub mod digest;

pub use digest::{KeyDigest, Pepper, Peppers};

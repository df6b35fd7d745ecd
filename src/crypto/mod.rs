//! Cryptography: key digests with versioned peppers; JWT verification and
//! JWKS refresh (dashboard surface).

pub mod digest;
pub mod issuers;
pub mod jwks;
pub mod jwt;

pub use digest::{KeyDigest, Pepper, Peppers};

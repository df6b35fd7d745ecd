//! Cryptography: key digests with versioned peppers; JWT verification,
//! issuers and JWKS refresh; the console's signing keys, passwords and
//! opaque single-use tokens (dashboard surface).

pub mod digest;
pub mod issuers;
pub mod jwks;
pub mod jwt;
pub mod opaque;
pub mod password;
pub mod signer;

pub use digest::{KeyDigest, Pepper, Peppers};

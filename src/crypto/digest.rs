//! `HMAC-SHA256(pepper, key)`: the only form in which a key is stored.
//!
//! Keys carry ≥64 bits of CSPRNG randomness, so a fast keyed hash is enough;
//! a slow hash would only add CPU per cache miss and a denial-of-service
//! lever (see ARCHITECTURE.md, Invariants).

use std::fmt;

use hmac::{Hmac, Mac};
use secrecy::{ExposeSecret, SecretSlice};
use sha2::Sha256;

pub use crate::domain::KeyDigest;

/// A pepper: a server-side HMAC secret with a version number stored beside
/// each digest, so peppers can be rotated.
#[derive(Clone)]
pub struct Pepper {
    version: i32,
    secret: SecretSlice<u8>,
}

impl Pepper {
    /// Shortest accepted pepper, in bytes.
    pub const MIN_LEN: usize = 32;

    /// A pepper of at least [`Pepper::MIN_LEN`] bytes.
    pub fn new(version: i32, secret: Vec<u8>) -> Result<Self, PepperError> {
        if secret.len() < Self::MIN_LEN {
            return Err(PepperError::TooShort { version });
        }
        if version < 0 {
            return Err(PepperError::Version { version });
        }
        Ok(Self {
            version,
            secret: secret.into(),
        })
    }

    /// The version stored beside digests made with this pepper.
    pub fn version(&self) -> i32 {
        self.version
    }

    /// The digest of `key` under this pepper.
    pub fn digest(&self, key: &str) -> KeyDigest {
        let mut mac = Hmac::<Sha256>::new_from_slice(self.secret.expose_secret())
            .expect("HMAC accepts any key length");
        mac.update(key.as_bytes());
        KeyDigest::from_bytes(mac.finalize().into_bytes().into())
    }

    /// The digest of an imported legacy key under this pepper, from the
    /// key's SHA-256 (what a product that kept only digests can hand over):
    /// `HMAC(pepper, "legacy-sha256:" || SHA-256(key))`. A raw key and its
    /// imported digest end at the same stored digest, and the pepper still
    /// protects the table (a plain SHA-256 could be checked offline).
    pub fn legacy_digest(&self, sha256: &[u8; 32]) -> KeyDigest {
        let mut mac = Hmac::<Sha256>::new_from_slice(self.secret.expose_secret())
            .expect("HMAC accepts any key length");
        mac.update(b"legacy-sha256:");
        mac.update(sha256);
        KeyDigest::from_bytes(mac.finalize().into_bytes().into())
    }
}

/// SHA-256 of a key, as a legacy system would have stored it.
pub fn sha256(key: &str) -> [u8; 32] {
    use sha2::Digest;
    Sha256::digest(key.as_bytes()).into()
}

impl fmt::Debug for Pepper {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Pepper(v{}, <redacted>)", self.version)
    }
}

/// Why a pepper is unusable. Never carries the secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PepperError {
    #[error("pepper version {version} is shorter than 32 bytes")]
    TooShort { version: i32 },
    #[error("pepper version {version} must be >= 0")]
    Version { version: i32 },
    #[error("pepper versions must be distinct (version {version} appears twice)")]
    Duplicate { version: i32 },
}

/// The current pepper (new digests) and previous ones (still verified, then
/// rehashed to the current one on first use).
#[derive(Clone, Debug)]
pub struct Peppers {
    current: Pepper,
    previous: Vec<Pepper>,
}

impl Peppers {
    /// Current pepper plus older ones; versions must be distinct.
    pub fn new(current: Pepper, previous: Vec<Pepper>) -> Result<Self, PepperError> {
        let mut seen = std::collections::BTreeSet::from([current.version]);
        for p in &previous {
            if !seen.insert(p.version) {
                return Err(PepperError::Duplicate { version: p.version });
            }
        }
        Ok(Self { current, previous })
    }

    /// The pepper for new digests.
    pub fn current(&self) -> &Pepper {
        &self.current
    }

    /// Current first, then previous ones in configured order.
    pub fn all(&self) -> impl Iterator<Item = &Pepper> {
        std::iter::once(&self.current).chain(self.previous.iter())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_depends_on_pepper_and_key() {
        let a = Pepper::new(1, vec![1; 32]).unwrap();
        let b = Pepper::new(2, vec![2; 32]).unwrap();
        assert_eq!(a.digest("k"), a.digest("k"));
        assert!(!a.digest("k").ct_eq(&b.digest("k")));
        assert!(!a.digest("k").ct_eq(&a.digest("j")));
    }

    #[test]
    fn debug_never_shows_secrets() {
        let p = Pepper::new(3, b"super-secret-pepper-value-0123456789".to_vec()).unwrap();
        let d = p.digest("k");
        assert_eq!(format!("{p:?}"), "Pepper(v3, <redacted>)");
        assert_eq!(format!("{d:?}"), "KeyDigest(<redacted>)");
    }

    #[test]
    fn short_and_duplicate_peppers_are_refused() {
        assert!(Pepper::new(1, vec![0; 31]).is_err());
        let p = Pepper::new(1, vec![0; 32]).unwrap();
        assert!(Peppers::new(p.clone(), vec![p]).is_err());
    }
}

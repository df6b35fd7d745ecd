//! The stored lookup digest of a key: plain data the store and the caches
//! key on. How it is computed (`HMAC-SHA256(pepper, key)`) lives in
//! `crypto::digest`; this type only holds the bytes and never shows them.

use std::fmt;

use subtle::ConstantTimeEq;

/// The stored lookup digest of a key. `Debug` never shows the bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyDigest([u8; 32]);

impl KeyDigest {
    /// Wraps digest bytes (stored, or just computed by `crypto::digest`).
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// Wraps stored digest bytes; `None` if the length is wrong.
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        bytes.try_into().ok().map(Self)
    }

    /// The raw bytes, for the store.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Constant-time equality, for comparing a computed digest with a stored one.
    pub fn ct_eq(&self, other: &KeyDigest) -> bool {
        self.0.ct_eq(&other.0).into()
    }
}

impl fmt::Debug for KeyDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("KeyDigest(<redacted>)")
    }
}

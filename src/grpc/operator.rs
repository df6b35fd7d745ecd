//! Management-call authentication: `authorization: Bearer <operator token>`.

use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tonic::metadata::MetadataMap;

use crate::error::Error;

/// Checks operator credentials in constant time (on SHA-256 of both sides,
/// so the token's length does not leak either).
#[derive(Clone)]
pub struct OperatorGuard {
    token_hash: Option<[u8; 32]>,
}

impl std::fmt::Debug for OperatorGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OperatorGuard(<redacted>)")
    }
}

fn hash(s: &str) -> [u8; 32] {
    Sha256::digest(s.as_bytes()).into()
}

impl OperatorGuard {
    /// With no token configured every management call is refused.
    pub fn new(token: Option<&SecretString>) -> Self {
        Self {
            token_hash: token.map(|t| hash(t.expose_secret())),
        }
    }

    /// `Ok` when the metadata carries the operator token.
    pub fn check(&self, metadata: &MetadataMap) -> Result<(), Error> {
        let expected = self.token_hash.as_ref().ok_or(Error::Unauthenticated)?;
        let presented = metadata
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| hash(token.trim()))
            .ok_or(Error::Unauthenticated)?;
        if bool::from(presented.ct_eq(expected)) {
            Ok(())
        } else {
            Err(Error::Unauthenticated)
        }
    }
}

//! Static bearer tokens (operator, gateway, console backend): checked in
//! constant time on SHA-256 of both sides, so neither the token nor its
//! length leaks through timing.

use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tonic::metadata::MetadataMap;

use crate::error::Error;

/// One configured bearer token (or none: nothing matches).
#[derive(Clone)]
pub struct StaticToken {
    token_hash: Option<[u8; 32]>,
}

/// The operator's token.
pub type OperatorGuard = StaticToken;

impl std::fmt::Debug for StaticToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StaticToken(<redacted>)")
    }
}

fn hash(s: &str) -> [u8; 32] {
    Sha256::digest(s.as_bytes()).into()
}

impl StaticToken {
    /// With no token configured nothing matches.
    pub fn new(token: Option<&SecretString>) -> Self {
        Self {
            token_hash: token.map(|t| hash(t.expose_secret())),
        }
    }

    /// Whether `presented` is this token.
    pub fn matches(&self, presented: &str) -> bool {
        self.token_hash
            .as_ref()
            .is_some_and(|expected| bool::from(hash(presented).ct_eq(expected)))
    }

    /// `Ok` when the metadata carries this token as `Bearer`.
    pub fn check(&self, metadata: &MetadataMap) -> Result<(), Error> {
        let presented = metadata
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim())
            .ok_or(Error::Unauthenticated)?;
        if self.matches(presented) {
            Ok(())
        } else {
            Err(Error::Unauthenticated)
        }
    }
}

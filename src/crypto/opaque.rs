//! Opaque single-use tokens (refresh, email verification, password reset):
//! 256 random bits behind a visible prefix. Only SHA-256 of the token is
//! stored; with 256 bits of entropy a slow hash would buy nothing.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use sha2::{Digest, Sha256};

use crate::domain::console::TokenKind;

/// A token as handed to its owner once. Never in `Debug` or logs.
pub struct OpaqueToken(String);

impl std::fmt::Debug for OpaqueToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OpaqueToken(<redacted>)")
    }
}

impl OpaqueToken {
    /// A fresh random token of `kind`.
    pub fn generate(kind: TokenKind) -> Self {
        let bytes: [u8; 32] = rand::random();
        Self(format!(
            "{}{}",
            kind.prefix(),
            URL_SAFE_NO_PAD.encode(bytes)
        ))
    }

    /// Its stored digest.
    pub fn digest(&self) -> [u8; 32] {
        digest(&self.0)
    }

    /// The token text, for the response that hands it over.
    pub fn into_exposed(self) -> String {
        self.0
    }
}

/// The digest of a presented token, if it has the shape of a `kind` token
/// (anything else cannot match and never reaches the store).
pub fn presented(kind: TokenKind, token: &str) -> Option<[u8; 32]> {
    let body = token.strip_prefix(kind.prefix())?;
    let ok = body.len() == 43
        && body
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    ok.then(|| digest(token))
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_by_kind_and_stay_out_of_debug() {
        let t = OpaqueToken::generate(TokenKind::Refresh);
        let d = t.digest();
        assert_eq!(format!("{t:?}"), "OpaqueToken(<redacted>)");
        let text = t.into_exposed();
        assert!(text.starts_with("tgrt_"));
        assert_eq!(presented(TokenKind::Refresh, &text), Some(d));
        assert_eq!(presented(TokenKind::PasswordReset, &text), None);
        assert_eq!(presented(TokenKind::Refresh, "tgrt_short"), None);
    }
}

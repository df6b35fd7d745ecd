//! OpenID Connect ID tokens (Core 1.0 §3.1.3.7): verified against a
//! provider's keys (its JWKS, kept fresh by [`crate::crypto::jwks::Refresher`]
//! through the provider's [`Issuer`]), with its accepted `iss` values,
//! `aud` = one of the configured client ids, `azp` (when present) one of
//! them too, `exp`/`nbf`/`iat` with a leeway, an optional `nonce`, and a
//! verified `email`. The algorithm is never taken from the token alone: as
//! for every issuer, each key carries the algorithms it may verify.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::Validation;
use serde_json::{Map, Value};

use super::{Issuer, VerifyingKey, MAX_TOKEN_BYTES};

/// Why an ID token was refused: typed, and never carrying the token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum IdTokenError {
    #[error("the ID token is malformed")]
    Malformed,
    #[error("the ID token's key is not among the provider's keys")]
    UnknownKey,
    #[error("the ID token's algorithm is not allowed for the provider's key")]
    AlgorithmNotAllowed,
    #[error("the ID token's signature does not verify")]
    BadSignature,
    #[error("the ID token is not from this provider (iss)")]
    WrongIssuer,
    #[error("the ID token was not issued to this console (aud/azp)")]
    WrongAudience,
    #[error("the ID token has expired")]
    Expired,
    #[error("the ID token is not valid yet (nbf/iat)")]
    NotYetValid,
    #[error("the ID token lacks a required claim")]
    MissingClaim,
    #[error("the ID token's nonce does not match")]
    NonceMismatch,
    #[error("the provider has not verified this email address")]
    EmailNotVerified,
}

impl IdTokenError {
    /// A stable machine-readable name (gRPC ErrorInfo reason, logs).
    pub fn reason(self) -> &'static str {
        match self {
            Self::Malformed => "ID_TOKEN_MALFORMED",
            Self::UnknownKey => "ID_TOKEN_UNKNOWN_KEY",
            Self::AlgorithmNotAllowed => "ID_TOKEN_ALGORITHM_NOT_ALLOWED",
            Self::BadSignature => "ID_TOKEN_BAD_SIGNATURE",
            Self::WrongIssuer => "ID_TOKEN_WRONG_ISSUER",
            Self::WrongAudience => "ID_TOKEN_WRONG_AUDIENCE",
            Self::Expired => "ID_TOKEN_EXPIRED",
            Self::NotYetValid => "ID_TOKEN_NOT_YET_VALID",
            Self::MissingClaim => "ID_TOKEN_MISSING_CLAIM",
            Self::NonceMismatch => "ID_TOKEN_NONCE_MISMATCH",
            Self::EmailNotVerified => "EMAIL_NOT_VERIFIED",
        }
    }
}

/// How a provider's ID tokens are checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdTokenRules {
    /// Accepted `iss` values; the first is the canonical one (stored with
    /// identities). Google: `https://accounts.google.com` and
    /// `accounts.google.com`.
    pub issuers: Vec<String>,
    /// The console's client ids at the provider: `aud` must name one.
    pub client_ids: Vec<String>,
    /// Clock skew tolerated on `exp`, `nbf` and `iat`, in seconds.
    pub leeway_seconds: u64,
}

/// What a verified ID token says about its holder.
#[derive(Clone, PartialEq, Eq)]
pub struct IdClaims {
    /// The provider's canonical issuer.
    pub issuer: String,
    /// `sub`: the provider's stable id of the person.
    pub subject: String,
    /// `email`, which the provider says it verified.
    pub email: String,
}

impl std::fmt::Debug for IdClaims {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdClaims")
            .field("issuer", &self.issuer)
            .finish_non_exhaustive()
    }
}

/// One OpenID Connect provider: its rules and its key set (the [`Issuer`]
/// a JWKS refresher keeps fresh; never one the dashboard verifier trusts).
#[derive(Debug)]
pub struct IdTokenVerifier {
    rules: IdTokenRules,
    keys: Arc<Issuer>,
}

#[derive(serde::Deserialize)]
struct IssOnly {
    iss: Option<String>,
}

fn number(v: &Value) -> Option<i64> {
    v.as_i64().or_else(|| v.as_f64().map(|f| f as i64))
}

impl IdTokenVerifier {
    /// A verifier for `rules` over the keys of `keys`.
    pub fn new(rules: IdTokenRules, keys: Arc<Issuer>) -> Self {
        Self { rules, keys }
    }

    /// Its rules.
    pub fn rules(&self) -> &IdTokenRules {
        &self.rules
    }

    /// Verifies `token` at `now`; with `nonce`, the token's must equal it.
    pub fn verify(
        &self,
        token: &str,
        now: DateTime<Utc>,
        nonce: Option<&str>,
    ) -> Result<IdClaims, IdTokenError> {
        use IdTokenError as E;
        if token.len() > MAX_TOKEN_BYTES {
            return Err(E::Malformed);
        }
        // `alg: none` and unknown algorithms fail here.
        let header = jsonwebtoken::decode_header(token).map_err(|_| E::Malformed)?;
        let iss = jsonwebtoken::dangerous::insecure_decode_claims::<IssOnly>(token)
            .map_err(|_| E::Malformed)?
            .iss
            .ok_or(E::MissingClaim)?;
        // Refused before any key is touched: another issuer's token (even
        // one that names a kid we do not know) never triggers a refresh.
        if !self.rules.issuers.contains(&iss) {
            return Err(E::WrongIssuer);
        }
        let keys = self.keys.keys();
        let named: Vec<&VerifyingKey> = match header.kid.as_deref() {
            Some(kid) if keys.has_kid(kid) => {
                keys.keys.iter().filter(|k| k.kid() == Some(kid)).collect()
            }
            Some(_) => keys.keys.iter().filter(|k| k.kid().is_none()).collect(),
            None => keys.keys.iter().collect(),
        };
        if named.is_empty() {
            if header.kid.is_some() {
                self.keys.unknown_kid.notify_one();
            }
            return Err(E::UnknownKey);
        }
        let candidates: Vec<&VerifyingKey> = named
            .into_iter()
            .filter(|k| k.algorithms.contains(&header.alg))
            .collect();
        if candidates.is_empty() {
            return Err(E::AlgorithmNotAllowed);
        }
        let mut validation = Validation::new(header.alg);
        validation.validate_exp = false; // checked below against the injected clock
        validation.validate_nbf = false;
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.set_issuer(&self.rules.issuers);
        validation.set_audience(&self.rules.client_ids);
        let mut last = E::BadSignature;
        for key in candidates {
            match jsonwebtoken::decode::<Map<String, Value>>(token, &key.key, &validation) {
                Ok(data) => return self.check_claims(data.claims, now, nonce),
                Err(e) => {
                    last = match e.kind() {
                        ErrorKind::InvalidSignature => E::BadSignature,
                        ErrorKind::InvalidIssuer => E::WrongIssuer,
                        ErrorKind::InvalidAudience => E::WrongAudience,
                        ErrorKind::MissingRequiredClaim(_) | ErrorKind::InvalidClaimFormat(_) => {
                            E::MissingClaim
                        }
                        ErrorKind::InvalidAlgorithm => E::AlgorithmNotAllowed,
                        _ => E::Malformed,
                    };
                    if !matches!(e.kind(), ErrorKind::InvalidSignature) {
                        break;
                    }
                }
            }
        }
        Err(last)
    }

    fn check_claims(
        &self,
        claims: Map<String, Value>,
        now: DateTime<Utc>,
        nonce: Option<&str>,
    ) -> Result<IdClaims, IdTokenError> {
        use IdTokenError as E;
        let now = now.timestamp();
        let leeway = i64::try_from(self.rules.leeway_seconds).unwrap_or(i64::MAX);
        let exp = claims.get("exp").and_then(number).ok_or(E::MissingClaim)?;
        // OIDC requires `iat`; a token "issued" in the future is refused.
        let iat = claims.get("iat").and_then(number).ok_or(E::MissingClaim)?;
        if iat > now.saturating_add(leeway) {
            return Err(E::NotYetValid);
        }
        if let Some(nbf) = claims.get("nbf") {
            let nbf = number(nbf).ok_or(E::MissingClaim)?;
            if nbf > now.saturating_add(leeway) {
                return Err(E::NotYetValid);
            }
        }
        if exp < now.saturating_sub(leeway) {
            return Err(E::Expired);
        }
        // With several audiences, the authorized party must be ours too.
        if let Some(azp) = claims.get("azp") {
            let ours = azp
                .as_str()
                .is_some_and(|a| self.rules.client_ids.iter().any(|c| c == a));
            if !ours {
                return Err(E::WrongAudience);
            }
        }
        if let Some(expected) = nonce {
            if claims.get("nonce").and_then(Value::as_str) != Some(expected) {
                return Err(E::NonceMismatch);
            }
        }
        let subject = claims
            .get("sub")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty() && s.len() <= 255)
            .ok_or(E::MissingClaim)?
            .to_string();
        let email = claims
            .get("email")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .ok_or(E::MissingClaim)?
            .to_string();
        // Google sends a boolean; some providers the string "true".
        let verified = match claims.get("email_verified") {
            Some(Value::Bool(b)) => *b,
            Some(Value::String(s)) => s == "true",
            _ => false,
        };
        if !verified {
            return Err(E::EmailNotVerified);
        }
        Ok(IdClaims {
            issuer: self.rules.issuers[0].clone(),
            subject,
            email,
        })
    }
}

//! JWT verification (ARCHITECTURE.md, Invariants): trusted issuers, their keys, and
//! the checks. No tonic, no I/O: keys arrive from config, a JWKS file or a
//! JWKS URL (see [`super::jwks`]) and are swapped in whole.
//!
//! The algorithm is never taken from the token alone: every key carries the
//! algorithms it may verify (an HMAC secret only HS*, an RSA key only RS*/PS*,
//! a P-256 key only ES256, …), so `alg: none` and algorithm confusion (an RSA
//! public key used as an HMAC secret) are refused before any signature check.

use std::collections::HashSet;
use std::sync::{Arc, RwLock};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use chrono::{DateTime, Utc};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{DecodingKey, Validation};
use serde_json::{Map, Value};
use tokio::sync::Notify;

pub use jsonwebtoken::Algorithm;

/// Largest token accepted, in bytes: larger ones are refused unparsed.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;

/// Shortest HMAC secret accepted (RFC 7518 §3.2: at least the hash size).
pub const MIN_HMAC_SECRET_BYTES: usize = 32;

/// Why a token was refused. `Expired` is only reported for a token whose
/// signature, issuer and audience are good.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("the token has expired")]
    Expired,
    #[error("the token is not valid: {0}")]
    Invalid(&'static str),
}

/// A key that cannot be used, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct KeyError(pub String);

fn key_error(msg: impl Into<String>) -> KeyError {
    KeyError(msg.into())
}

/// Parses an algorithm name (`RS256`, `EdDSA`, …).
pub fn parse_algorithm(name: &str) -> Option<Algorithm> {
    name.parse().ok()
}

/// The algorithms a key of this shape may verify.
fn family_algorithms(alg: Algorithm) -> &'static [Algorithm] {
    use Algorithm::*;
    match alg {
        HS256 | HS384 | HS512 => &[HS256, HS384, HS512],
        RS256 | RS384 | RS512 | PS256 | PS384 | PS512 => {
            &[RS256, RS384, RS512, PS256, PS384, PS512]
        }
        ES256 => &[ES256],
        ES384 => &[ES384],
        EdDSA => &[EdDSA],
        // Algorithms added to the crate later are not trusted until listed here.
        _ => &[],
    }
}

/// One verification key and the algorithms it may verify.
#[derive(Clone)]
pub struct VerifyingKey {
    kid: Option<String>,
    key: DecodingKey,
    algorithms: Vec<Algorithm>,
}

impl std::fmt::Debug for VerifyingKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifyingKey")
            .field("kid", &self.kid)
            .field("algorithms", &self.algorithms)
            .finish_non_exhaustive()
    }
}

impl VerifyingKey {
    /// An HMAC secret for `algorithms` (HS256/384/512 only).
    pub fn hmac(
        kid: Option<String>,
        secret: &[u8],
        algorithms: &[Algorithm],
    ) -> Result<Self, KeyError> {
        if secret.len() < MIN_HMAC_SECRET_BYTES {
            return Err(key_error(format!(
                "an HMAC secret must be at least {MIN_HMAC_SECRET_BYTES} bytes"
            )));
        }
        let algorithms = restrict(
            &[Algorithm::HS256, Algorithm::HS384, Algorithm::HS512],
            algorithms,
        )?;
        Ok(Self {
            kid,
            key: DecodingKey::from_secret(secret),
            algorithms,
        })
    }

    /// A PEM public key (SPKI or PKCS#1 for RSA) for `algorithm`; the key
    /// verifies that algorithm's family (an RSA key: RS*/PS*).
    pub fn from_pem(
        kid: Option<String>,
        algorithm: Algorithm,
        pem: &[u8],
        allowed: &[Algorithm],
    ) -> Result<Self, KeyError> {
        use Algorithm::*;
        let key = match algorithm {
            HS256 | HS384 | HS512 => {
                return Err(key_error(
                    "an HMAC algorithm takes a secret, not a public key",
                ))
            }
            RS256 | RS384 | RS512 | PS256 | PS384 | PS512 => DecodingKey::from_rsa_pem(pem),
            ES256 | ES384 => DecodingKey::from_ec_pem(pem),
            EdDSA => DecodingKey::from_ed_pem(pem),
            _ => return Err(key_error(format!("{algorithm:?} is not supported"))),
        }
        .map_err(|e| key_error(format!("not a {algorithm:?} public key in PEM: {e}")))?;
        // An EC key's curve must match the algorithm: P-256 for ES256, P-384
        // for ES384 (SEC1 points: 65/33 and 97/49 bytes); Ed25519 is 32 bytes.
        let ec_len = key.try_get_as_bytes().map(<[u8]>::len).unwrap_or(0);
        let curve_ok = match algorithm {
            ES256 => matches!(ec_len, 65 | 33),
            ES384 => matches!(ec_len, 97 | 49),
            // The backend slices 32 bytes out of an Ed25519 key: check first.
            EdDSA => ec_len == 32,
            _ => true,
        };
        if !curve_ok {
            return Err(key_error(format!(
                "the key's curve does not fit {algorithm:?}"
            )));
        }
        let algorithms = restrict(family_algorithms(algorithm), allowed)?;
        Ok(Self {
            kid,
            key,
            algorithms,
        })
    }

    /// An Ed25519 public key (Tollgate's own console keys).
    pub fn ed25519(kid: Option<String>, public: &[u8; 32]) -> Self {
        let x = URL_SAFE_NO_PAD.encode(public);
        Self {
            kid,
            key: DecodingKey::from_ed_components(&x).expect("32 bytes of base64url"),
            algorithms: vec![Algorithm::EdDSA],
        }
    }

    /// A public key from a JWK. `Ok(None)` for keys that are not for
    /// signatures or not allowed here (symmetric `oct` keys are never taken
    /// from a JWKS: a published secret is no secret).
    pub fn from_jwk(jwk: &Jwk, allowed: &[Algorithm]) -> Result<Option<Self>, KeyError> {
        if matches!(
            jwk.common.public_key_use,
            Some(PublicKeyUse::Encryption | PublicKeyUse::Other(_))
        ) {
            return Ok(None);
        }
        let kid = jwk.common.key_id.clone();
        let (family, key) = match &jwk.algorithm {
            AlgorithmParameters::RSA(p) => (
                Algorithm::RS256,
                DecodingKey::from_rsa_components(&p.n, &p.e),
            ),
            AlgorithmParameters::EllipticCurve(p) => {
                let alg = match p.curve {
                    EllipticCurve::P256 => Algorithm::ES256,
                    EllipticCurve::P384 => Algorithm::ES384,
                    _ => return Ok(None),
                };
                let len = if alg == Algorithm::ES256 { 32 } else { 48 };
                if decoded_len(&p.x) != Some(len) || decoded_len(&p.y) != Some(len) {
                    return Err(key_error("EC key coordinates have the wrong length"));
                }
                (alg, DecodingKey::from_ec_components(&p.x, &p.y))
            }
            AlgorithmParameters::OctetKeyPair(p) => {
                if p.curve != EllipticCurve::Ed25519 {
                    return Ok(None);
                }
                // The backend slices the first 32 bytes: check before it does.
                if decoded_len(&p.x) != Some(32) {
                    return Err(key_error("Ed25519 key must be 32 bytes"));
                }
                (Algorithm::EdDSA, DecodingKey::from_ed_components(&p.x))
            }
            // Symmetric keys and unknown key types are never taken from a JWKS.
            _ => return Ok(None),
        };
        let key = key.map_err(|e| key_error(format!("bad JWK: {e}")))?;
        let mut algorithms = family_algorithms(family).to_vec();
        if let Some(alg) = jwk.common.key_algorithm {
            let Some(alg) = key_algorithm(alg).filter(|a| algorithms.contains(a)) else {
                return Ok(None);
            };
            algorithms = vec![alg];
        }
        algorithms.retain(|a| allowed.is_empty() || allowed.contains(a));
        if algorithms.is_empty() {
            return Ok(None);
        }
        Ok(Some(Self {
            kid,
            key,
            algorithms,
        }))
    }

    /// The key id, if any.
    pub fn kid(&self) -> Option<&str> {
        self.kid.as_deref()
    }

    /// The algorithms this key verifies.
    pub fn algorithms(&self) -> &[Algorithm] {
        &self.algorithms
    }
}

fn decoded_len(b64: &str) -> Option<usize> {
    URL_SAFE_NO_PAD
        .decode(b64.trim_end_matches('='))
        .ok()
        .map(|v| v.len())
}

fn key_algorithm(a: KeyAlgorithm) -> Option<Algorithm> {
    use Algorithm::*;
    Some(match a {
        KeyAlgorithm::HS256 => HS256,
        KeyAlgorithm::HS384 => HS384,
        KeyAlgorithm::HS512 => HS512,
        KeyAlgorithm::ES256 => ES256,
        KeyAlgorithm::ES384 => ES384,
        KeyAlgorithm::RS256 => RS256,
        KeyAlgorithm::RS384 => RS384,
        KeyAlgorithm::RS512 => RS512,
        KeyAlgorithm::PS256 => PS256,
        KeyAlgorithm::PS384 => PS384,
        KeyAlgorithm::PS512 => PS512,
        KeyAlgorithm::EdDSA => EdDSA,
        _ => return None,
    })
}

/// `family` narrowed to `allowed` (empty = no narrowing); an error if
/// nothing is left.
fn restrict(family: &[Algorithm], allowed: &[Algorithm]) -> Result<Vec<Algorithm>, KeyError> {
    let algs: Vec<Algorithm> = family
        .iter()
        .copied()
        .filter(|a| allowed.is_empty() || allowed.contains(a))
        .collect();
    if algs.is_empty() {
        return Err(key_error(format!(
            "none of the issuer's algorithms {allowed:?} fits this key ({family:?})"
        )));
    }
    Ok(algs)
}

/// An issuer's keys, selected by `kid`.
#[derive(Debug, Clone, Default)]
pub struct KeySet {
    keys: Vec<VerifyingKey>,
}

impl KeySet {
    /// A key set of `keys`.
    pub fn new(keys: Vec<VerifyingKey>) -> Self {
        Self { keys }
    }

    /// How many keys it holds.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether it holds no key.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The keys.
    pub fn into_keys(self) -> Vec<VerifyingKey> {
        self.keys
    }

    /// Whether a key has this id.
    pub fn has_kid(&self, kid: &str) -> bool {
        self.keys.iter().any(|k| k.kid() == Some(kid))
    }
}

/// How an issuer's tokens are read: the claims Tollgate needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuerRules {
    /// The `iss` value.
    pub issuer: String,
    /// Accepted `aud` values (at least one must match).
    pub audiences: Vec<String>,
    /// The claim naming the tenant (default `tenant_id`).
    pub tenant_claim: String,
    /// The claim holding scopes: a space-separated string or an array
    /// (default `scope`, falling back to `scp`).
    pub scope_claim: String,
    /// Clock skew tolerated on `exp` and `nbf`, in seconds.
    pub leeway_seconds: u64,
    /// Which tenants this issuer may speak for.
    pub tenants: TenantRule,
}

/// Which tenants an issuer's tokens may name (a token naming another is
/// `TOKEN_INVALID`): trusting an issuer for one customer must not let it
/// speak for every tenant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TenantRule {
    /// Any tenant (Tollgate's own console issuer; an operator's own IdP).
    All,
    /// Only these tenant ids.
    Only(Vec<String>),
    /// The tenant claim's value is looked up here (claim value → tenant
    /// id); values not listed are refused.
    Map(std::collections::BTreeMap<String, String>),
}

impl TenantRule {
    /// The tenant a tenant-claim value stands for, if this rule allows it.
    pub fn tenant_for(&self, claimed: &str) -> Option<String> {
        match self {
            TenantRule::All => Some(claimed.to_string()),
            TenantRule::Only(list) => list.iter().any(|t| t == claimed).then(|| claimed.into()),
            TenantRule::Map(map) => map.get(claimed).cloned(),
        }
    }
}

impl IssuerRules {
    /// Rules with the default claims and a 30 s leeway.
    pub fn new(issuer: impl Into<String>, audiences: Vec<String>) -> Self {
        Self {
            issuer: issuer.into(),
            audiences,
            tenant_claim: "tenant_id".into(),
            scope_claim: "scope".into(),
            leeway_seconds: 30,
            tenants: TenantRule::All,
        }
    }
}

/// A trusted issuer: its rules and its current key set (swapped whole on
/// refresh, so a verification always sees one consistent set).
#[derive(Debug)]
pub struct Issuer {
    rules: IssuerRules,
    keys: RwLock<Arc<KeySet>>,
    /// Signalled when a token names a `kid` this issuer does not know, so a
    /// JWKS refresher can look again (it rate-limits itself).
    unknown_kid: Notify,
}

impl Issuer {
    /// An issuer with an initial key set.
    pub fn new(rules: IssuerRules, keys: KeySet) -> Self {
        Self {
            rules,
            keys: RwLock::new(Arc::new(keys)),
            unknown_kid: Notify::new(),
        }
    }

    /// Its rules.
    pub fn rules(&self) -> &IssuerRules {
        &self.rules
    }

    /// The current key set.
    pub fn keys(&self) -> Arc<KeySet> {
        self.keys.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Replaces the key set.
    pub fn set_keys(&self, keys: KeySet) {
        *self.keys.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(keys);
    }

    /// Resolves when a token named an unknown `kid`.
    pub async fn unknown_kid_seen(&self) {
        self.unknown_kid.notified().await;
    }
}

/// A token that passed every check.
#[derive(Clone, PartialEq, Eq)]
pub struct VerifiedToken {
    pub issuer: String,
    /// `sub`.
    pub subject: String,
    /// The issuer's tenant claim, as given (not yet checked against tenants).
    pub tenant_id: String,
    pub scopes: Vec<String>,
    /// Every claim, for callers that read their own (e.g. `role`).
    pub claims: Map<String, Value>,
}

impl std::fmt::Debug for VerifiedToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifiedToken")
            .field("issuer", &self.issuer)
            .field("subject", &self.subject)
            .field("tenant_id", &self.tenant_id)
            .field("scopes", &self.scopes)
            .finish_non_exhaustive()
    }
}

/// Every trusted issuer, selected by the token's `iss`.
#[derive(Debug, Default)]
pub struct Verifier {
    issuers: Vec<Arc<Issuer>>,
}

#[derive(serde::Deserialize)]
struct IssOnly {
    iss: Option<String>,
}

impl Verifier {
    /// A verifier trusting `issuers` (their `iss` values must differ).
    pub fn new(issuers: Vec<Arc<Issuer>>) -> Result<Self, KeyError> {
        let mut seen = HashSet::new();
        for i in &issuers {
            if !seen.insert(i.rules.issuer.clone()) {
                return Err(key_error(format!(
                    "issuer `{}` is listed twice",
                    i.rules.issuer
                )));
            }
        }
        Ok(Self { issuers })
    }

    /// The issuers.
    pub fn issuers(&self) -> &[Arc<Issuer>] {
        &self.issuers
    }

    /// The issuer whose `iss` is `name`.
    pub fn issuer(&self, name: &str) -> Option<&Arc<Issuer>> {
        self.issuers.iter().find(|i| i.rules.issuer == name)
    }

    /// Verifies `token` at `now`: size, shape, issuer, key (by `kid`),
    /// algorithm allowed for that key, signature, `iss`, `aud`, `exp`,
    /// `nbf` (with the issuer's leeway), `sub` and the tenant claim.
    pub fn verify(&self, token: &str, now: DateTime<Utc>) -> Result<VerifiedToken, TokenError> {
        self.verify_from(token, now, None)
    }

    /// As [`Self::verify`], accepting only the issuer named `only`.
    pub fn verify_from(
        &self,
        token: &str,
        now: DateTime<Utc>,
        only: Option<&str>,
    ) -> Result<VerifiedToken, TokenError> {
        use TokenError::Invalid;
        if token.len() > MAX_TOKEN_BYTES {
            return Err(Invalid("larger than 8 KiB"));
        }
        // `alg: none` and unknown algorithms fail here: the header does not parse.
        let header = jsonwebtoken::decode_header(token).map_err(|_| Invalid("malformed header"))?;
        // The unverified `iss` only picks which issuer's keys to try.
        let iss = jsonwebtoken::dangerous::insecure_decode_claims::<IssOnly>(token)
            .map_err(|_| Invalid("malformed claims"))?
            .iss
            .ok_or(Invalid("no issuer"))?;
        if only.is_some_and(|o| o != iss) {
            return Err(Invalid("issuer not accepted here"));
        }
        let issuer = self.issuer(&iss).ok_or(Invalid("unknown issuer"))?;
        let keys = issuer.keys();
        // A key configured without a kid answers to any kid.
        let named: Vec<&VerifyingKey> = match header.kid.as_deref() {
            Some(kid) if keys.has_kid(kid) => {
                keys.keys.iter().filter(|k| k.kid() == Some(kid)).collect()
            }
            Some(_) => keys.keys.iter().filter(|k| k.kid().is_none()).collect(),
            None => keys.keys.iter().collect(),
        };
        if named.is_empty() {
            if header.kid.is_some() {
                issuer.unknown_kid.notify_one();
            }
            return Err(Invalid("unknown key id"));
        }
        let candidates: Vec<&VerifyingKey> = named
            .into_iter()
            .filter(|k| k.algorithms.contains(&header.alg))
            .collect();
        if candidates.is_empty() {
            return Err(Invalid("algorithm not allowed for this key"));
        }
        let rules = &issuer.rules;
        let mut validation = Validation::new(header.alg);
        validation.validate_exp = false; // checked below against the injected clock
        validation.validate_nbf = false;
        validation.leeway = rules.leeway_seconds;
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.set_issuer(&[&rules.issuer]);
        validation.set_audience(&rules.audiences);
        let mut last = Invalid("bad signature");
        for key in candidates {
            match jsonwebtoken::decode::<Map<String, Value>>(token, &key.key, &validation) {
                Ok(data) => return check_claims(rules, data.claims, now),
                Err(e) => {
                    last = match e.kind() {
                        ErrorKind::InvalidSignature => Invalid("bad signature"),
                        ErrorKind::InvalidIssuer => Invalid("wrong issuer"),
                        ErrorKind::InvalidAudience => Invalid("wrong audience"),
                        ErrorKind::MissingRequiredClaim(_) | ErrorKind::InvalidClaimFormat(_) => {
                            Invalid("a required claim is missing or malformed")
                        }
                        ErrorKind::InvalidAlgorithm => {
                            Invalid("algorithm not allowed for this key")
                        }
                        _ => Invalid("malformed token"),
                    };
                    // Only a signature mismatch may be another key's token.
                    if !matches!(e.kind(), ErrorKind::InvalidSignature) {
                        break;
                    }
                }
            }
        }
        Err(last)
    }
}

fn number(v: &Value) -> Option<i64> {
    v.as_i64().or_else(|| v.as_f64().map(|f| f as i64))
}

fn check_claims(
    rules: &IssuerRules,
    claims: Map<String, Value>,
    now: DateTime<Utc>,
) -> Result<VerifiedToken, TokenError> {
    use TokenError::Invalid;
    let now = now.timestamp();
    let leeway = i64::try_from(rules.leeway_seconds).unwrap_or(i64::MAX);
    let exp = claims
        .get("exp")
        .and_then(number)
        .ok_or(Invalid("exp is not a number"))?;
    if let Some(nbf) = claims.get("nbf") {
        let nbf = number(nbf).ok_or(Invalid("nbf is not a number"))?;
        if nbf > now.saturating_add(leeway) {
            return Err(Invalid("not yet valid"));
        }
    }
    if exp < now.saturating_sub(leeway) {
        return Err(TokenError::Expired);
    }
    let subject = claims
        .get("sub")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .ok_or(Invalid("no subject"))?
        .to_string();
    let claimed = claims
        .get(&rules.tenant_claim)
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .ok_or(Invalid("no tenant claim"))?;
    let tenant_id = rules
        .tenants
        .tenant_for(claimed)
        .ok_or(Invalid("the issuer may not speak for this tenant"))?;
    let scope_value = claims.get(&rules.scope_claim).or_else(|| {
        (rules.scope_claim == "scope")
            .then(|| claims.get("scp"))
            .flatten()
    });
    let scopes = match scope_value {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => s.split_whitespace().map(str::to_string).collect(),
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| v.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .ok_or(Invalid("scopes must be strings"))?,
        Some(_) => return Err(Invalid("scopes must be a string or an array")),
    };
    Ok(VerifiedToken {
        issuer: rules.issuer.clone(),
        subject,
        tenant_id,
        scopes,
        claims,
    })
}

pub mod oidc;

#[cfg(test)]
mod tests;

//! Tollgate's own console access tokens: EdDSA (Ed25519) JWTs with the
//! signing key's `kid` in the header. Several keys may be configured for
//! rotation: the last one signs, all of them verify (and are published).

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use ed25519_dalek::pkcs8::{DecodePrivateKey, EncodePrivateKey};
use ed25519_dalek::SigningKey;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::Serialize;

use super::jwt::{KeyError, KeySet, VerifyingKey};

struct Entry {
    kid: String,
    encoding: EncodingKey,
    public: [u8; 32],
}

/// The console's signing keys. Never in `Debug`.
pub struct ConsoleSigner {
    /// Oldest first; the last signs.
    keys: Vec<Entry>,
}

impl std::fmt::Debug for ConsoleSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kids: Vec<&str> = self.keys.iter().map(|k| k.kid.as_str()).collect();
        f.debug_struct("ConsoleSigner")
            .field("kids", &kids)
            .finish_non_exhaustive()
    }
}

fn entry(kid: String, key: &SigningKey) -> Result<Entry, KeyError> {
    let der = key
        .to_pkcs8_der()
        .map_err(|e| KeyError(format!("key `{kid}`: {e}")))?;
    Ok(Entry {
        encoding: EncodingKey::from_ed_der(der.as_bytes()),
        public: key.verifying_key().to_bytes(),
        kid,
    })
}

impl ConsoleSigner {
    /// Keys from PKCS#8 PEM (`openssl genpkey -algorithm ed25519`), oldest
    /// first. Kids must be unique and non-empty.
    pub fn from_pems<'a>(
        keys: impl IntoIterator<Item = (String, &'a str)>,
    ) -> Result<Self, KeyError> {
        let mut out: Vec<Entry> = Vec::new();
        for (kid, pem) in keys {
            if kid.is_empty() || out.iter().any(|e| e.kid == kid) {
                return Err(KeyError(format!(
                    "signing key ids must be unique and non-empty (`{kid}`)"
                )));
            }
            let key = SigningKey::from_pkcs8_pem(pem.trim()).map_err(|_| {
                KeyError(format!(
                    "key `{kid}` is not an Ed25519 private key in PKCS#8 PEM"
                ))
            })?;
            out.push(entry(kid, &key)?);
        }
        if out.is_empty() {
            return Err(KeyError("no signing key".into()));
        }
        Ok(Self { keys: out })
    }

    /// A random key that lives as long as the process (dev mode, tests).
    pub fn ephemeral(kid: &str) -> Self {
        let key = SigningKey::from_bytes(&rand::random());
        Self {
            keys: vec![entry(kid.into(), &key).expect("a fresh key encodes")],
        }
    }

    /// The kid that signs.
    pub fn current_kid(&self) -> &str {
        &self.keys.last().expect("at least one key").kid
    }

    /// Signs `claims` with the newest key.
    pub fn sign<T: Serialize>(&self, claims: &T) -> Result<String, KeyError> {
        let key = self.keys.last().expect("at least one key");
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(key.kid.clone());
        jsonwebtoken::encode(&header, claims, &key.encoding)
            .map_err(|e| KeyError(format!("signing failed: {e}")))
    }

    /// Every key, for verification.
    pub fn key_set(&self) -> KeySet {
        KeySet::new(
            self.keys
                .iter()
                .map(|k| VerifyingKey::ed25519(Some(k.kid.clone()), &k.public))
                .collect(),
        )
    }

    /// The public keys as a JWKS document.
    pub fn jwks(&self) -> serde_json::Value {
        let keys: Vec<serde_json::Value> = self
            .keys
            .iter()
            .map(|k| {
                serde_json::json!({"kty": "OKP", "crv": "Ed25519", "use": "sig", "alg": "EdDSA",
                    "kid": k.kid, "x": URL_SAFE_NO_PAD.encode(k.public)})
            })
            .collect();
        serde_json::json!({ "keys": keys })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::jwks::parse_jwks;
    use crate::crypto::jwt::{Issuer, IssuerRules, Verifier};
    use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
    use std::sync::Arc;

    fn pem() -> String {
        SigningKey::from_bytes(&rand::random())
            .to_pkcs8_pem(LineEnding::LF)
            .unwrap()
            .to_string()
    }

    #[test]
    fn the_newest_key_signs_and_every_key_verifies() {
        let (old, new) = (pem(), pem());
        let before = ConsoleSigner::from_pems([("k1".to_string(), old.as_str())]).unwrap();
        let after = ConsoleSigner::from_pems([
            ("k1".to_string(), old.as_str()),
            ("k2".to_string(), new.as_str()),
        ])
        .unwrap();
        assert_eq!(after.current_kid(), "k2");
        let now = chrono::Utc::now();
        let claims = serde_json::json!({"iss": "tollgate", "aud": "console", "sub": "u",
            "tenant_id": "acme", "exp": now.timestamp() + 60});
        let rules = IssuerRules::new("tollgate", vec!["console".into()]);
        let v = Verifier::new(vec![Arc::new(Issuer::new(rules, after.key_set()))]).unwrap();
        let old_token = before.sign(&claims).unwrap();
        let new_token = after.sign(&claims).unwrap();
        assert!(v.verify(&old_token, now).is_ok());
        assert!(v.verify(&new_token, now).is_ok());
        let header = jsonwebtoken::decode_header(&new_token).unwrap();
        assert_eq!(
            (header.alg, header.kid.as_deref()),
            (Algorithm::EdDSA, Some("k2"))
        );
        // The published JWKS verifies too.
        let set = parse_jwks(after.jwks().to_string().as_bytes(), &[]).unwrap();
        assert_eq!(set.len(), 2);
        assert!(!format!("{after:?}").contains("PRIVATE"));
    }

    #[test]
    fn bad_keys_are_refused_without_echoing_them() {
        let err =
            ConsoleSigner::from_pems([("k".to_string(), "-----BEGIN PRIVATE KEY-----\nnope")])
                .unwrap_err();
        assert!(!err.0.contains("nope"), "{err}");
        let p = pem();
        assert!(ConsoleSigner::from_pems([
            ("k".to_string(), p.as_str()),
            ("k".to_string(), p.as_str())
        ])
        .is_err());
    }
}

//! GitHub's secret-scanning public keys: the JSON document of
//! `https://api.github.com/meta/public_keys/secret_scanning` (or the same
//! from a file), parsed into P-256 verifying keys by `key_identifier`, and
//! the signature check: ECDSA P-256 / SHA-256 over the raw body, the
//! signature base64 DER.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use base64::Engine;
use p256::ecdsa::signature::Verifier;
use p256::ecdsa::{DerSignature, VerifyingKey};
use p256::pkcs8::DecodePublicKey;
use serde::Deserialize;

#[derive(Deserialize)]
struct Document {
    public_keys: Vec<Entry>,
}

#[derive(Deserialize)]
struct Entry {
    key_identifier: String,
    key: String,
}

/// Why a document of public keys was refused.
#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    #[error("not a public keys document: {0}")]
    Format(String),
    #[error("key `{0}` is not a P-256 public key in PEM")]
    Key(String),
    #[error("the document holds no key")]
    Empty,
}

/// Why a signed request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignatureError {
    /// A header is missing or not valid text.
    Missing,
    /// No key has that identifier.
    UnknownKey,
    /// The signature is not base64 DER, or does not verify.
    Invalid,
}

/// Parses a public keys document.
pub fn parse(json: &[u8]) -> Result<HashMap<String, VerifyingKey>, KeysError> {
    let doc: Document =
        serde_json::from_slice(json).map_err(|e| KeysError::Format(e.to_string()))?;
    let mut keys = HashMap::new();
    for e in doc.public_keys {
        let key = VerifyingKey::from_public_key_pem(e.key.trim())
            .map_err(|_| KeysError::Key(e.key_identifier.clone()))?;
        keys.insert(e.key_identifier, key);
    }
    if keys.is_empty() {
        return Err(KeysError::Empty);
    }
    Ok(keys)
}

/// The keys in force, replaced whole by each refresh.
#[derive(Debug, Default)]
pub struct KeyRing {
    keys: RwLock<Arc<HashMap<String, VerifyingKey>>>,
}

impl KeyRing {
    /// Replaces the keys.
    pub fn replace(&self, keys: HashMap<String, VerifyingKey>) {
        *self.keys.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(keys);
    }

    /// How many keys are loaded (0: none yet).
    pub fn len(&self) -> usize {
        self.keys.read().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Whether no key is loaded yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Checks `signature_b64` of `body` with the key named `key_id`.
    pub fn verify(
        &self,
        key_id: Option<&str>,
        signature_b64: Option<&str>,
        body: &[u8],
    ) -> Result<(), SignatureError> {
        let (Some(key_id), Some(signature_b64)) = (key_id, signature_b64) else {
            return Err(SignatureError::Missing);
        };
        let keys = self.keys.read().unwrap_or_else(|e| e.into_inner()).clone();
        let key = keys.get(key_id).ok_or(SignatureError::UnknownKey)?;
        let der = base64::engine::general_purpose::STANDARD
            .decode(signature_b64.trim())
            .map_err(|_| SignatureError::Invalid)?;
        let signature = DerSignature::from_bytes(&der).map_err(|_| SignatureError::Invalid)?;
        key.verify(body, &signature)
            .map_err(|_| SignatureError::Invalid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use p256::ecdsa::signature::Signer;
    use p256::ecdsa::SigningKey;
    use p256::pkcs8::EncodePublicKey;

    fn signing_key() -> SigningKey {
        loop {
            let bytes: [u8; 32] = rand::random();
            if let Ok(k) = SigningKey::from_slice(&bytes) {
                return k;
            }
        }
    }

    fn document(id: &str, key: &SigningKey) -> Vec<u8> {
        let pem = key
            .verifying_key()
            .to_public_key_pem(p256::pkcs8::LineEnding::LF)
            .unwrap();
        serde_json::to_vec(&serde_json::json!({"public_keys": [
            {"key_identifier": id, "key": pem, "is_current": true}]}))
        .unwrap()
    }

    #[test]
    fn only_the_named_key_over_the_exact_body_verifies() {
        let key = signing_key();
        let other = signing_key();
        let ring = KeyRing::default();
        ring.replace(parse(&document("k1", &key)).unwrap());
        let body = br#"[{"token":"x","type":"t","url":"u"}]"#;
        let sig: DerSignature = key.sign(body);
        let b64 = base64::engine::general_purpose::STANDARD.encode(sig.as_bytes());
        assert_eq!(ring.verify(Some("k1"), Some(&b64), body), Ok(()));
        assert_eq!(
            ring.verify(Some("k1"), Some(&b64), b"[]"),
            Err(SignatureError::Invalid)
        );
        assert_eq!(
            ring.verify(Some("k2"), Some(&b64), body),
            Err(SignatureError::UnknownKey)
        );
        assert_eq!(
            ring.verify(None, Some(&b64), body),
            Err(SignatureError::Missing)
        );
        let forged: DerSignature = other.sign(body);
        let forged = base64::engine::general_purpose::STANDARD.encode(forged.as_bytes());
        assert_eq!(
            ring.verify(Some("k1"), Some(&forged), body),
            Err(SignatureError::Invalid)
        );
        assert_eq!(
            ring.verify(Some("k1"), Some("not base64!"), body),
            Err(SignatureError::Invalid)
        );
        assert!(matches!(parse(b"{}"), Err(KeysError::Format(_))));
        assert!(matches!(
            parse(br#"{"public_keys":[]}"#),
            Err(KeysError::Empty)
        ));
    }
}

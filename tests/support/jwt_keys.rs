//! Test keys for every JWT algorithm Tollgate verifies, generated per run
//! (RSA comes from the labelled fixture in tests/fixtures/: RSA key
//! generation is too slow in an unoptimised build). Shared by the unit tests
//! (via `#[path]`) and tests/console.rs.
#![allow(dead_code)]

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

/// The throwaway RSA test key (never a real secret).
pub const RSA_TEST_PRIVATE_PEM: &str = include_str!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/rsa-2048-TEST-ONLY.pem"
));
pub const RSA_TEST_PUBLIC_PEM: &str = include_str!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/rsa-2048-TEST-ONLY.pub.pem"
));

/// A signing key with its public forms.
pub struct TestKey {
    pub alg: Algorithm,
    pub kid: String,
    pub encoding: EncodingKey,
    /// The public JWK (for an HMAC key: none).
    pub jwk: Value,
    /// SPKI PEM of the public key (for an HMAC key: empty).
    pub public_pem: String,
    /// The HMAC secret (empty for asymmetric keys).
    pub secret: Vec<u8>,
}

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

impl TestKey {
    /// An HMAC key.
    pub fn hs(alg: Algorithm, kid: &str) -> Self {
        let secret: [u8; 48] = std::array::from_fn(|_| rand::random::<u8>());
        Self {
            alg,
            kid: kid.into(),
            encoding: EncodingKey::from_secret(&secret),
            jwk: Value::Null,
            public_pem: String::new(),
            secret: secret.to_vec(),
        }
    }

    /// The RSA fixture key, signing with `alg` (RS* or PS*).
    pub fn rsa(alg: Algorithm, kid: &str) -> Self {
        use rsa::pkcs8::DecodePublicKey;
        use rsa::traits::PublicKeyParts;
        let public = rsa::RsaPublicKey::from_public_key_pem(RSA_TEST_PUBLIC_PEM).unwrap();
        Self {
            alg,
            kid: kid.into(),
            encoding: EncodingKey::from_rsa_pem(RSA_TEST_PRIVATE_PEM.as_bytes()).unwrap(),
            jwk: json!({"kty": "RSA", "kid": kid, "use": "sig",
                "n": b64(&public.n().to_bytes_be()), "e": b64(&public.e().to_bytes_be())}),
            public_pem: RSA_TEST_PUBLIC_PEM.into(),
            secret: Vec::new(),
        }
    }

    /// A fresh P-256 key (ES256).
    pub fn es256(kid: &str) -> Self {
        use p256::pkcs8::{EncodePrivateKey, EncodePublicKey, LineEnding};
        let sk = loop {
            let bytes: [u8; 32] = rand::random();
            if let Ok(sk) = p256::ecdsa::SigningKey::from_slice(&bytes) {
                break sk;
            }
        };
        let vk = sk.verifying_key();
        let point = vk.to_encoded_point(false);
        Self {
            alg: Algorithm::ES256,
            kid: kid.into(),
            encoding: EncodingKey::from_ec_der(sk.to_pkcs8_der().unwrap().as_bytes()),
            jwk: json!({"kty": "EC", "crv": "P-256", "kid": kid,
                "x": b64(point.x().unwrap()), "y": b64(point.y().unwrap())}),
            public_pem: vk.to_public_key_pem(LineEnding::LF).unwrap(),
            secret: Vec::new(),
        }
    }

    /// A fresh P-384 key (ES384).
    pub fn es384(kid: &str) -> Self {
        use p384::pkcs8::{EncodePrivateKey, EncodePublicKey, LineEnding};
        let sk = loop {
            let bytes: [u8; 48] = std::array::from_fn(|_| rand::random::<u8>());
            if let Ok(sk) = p384::ecdsa::SigningKey::from_slice(&bytes) {
                break sk;
            }
        };
        let vk = sk.verifying_key();
        let point = vk.to_encoded_point(false);
        Self {
            alg: Algorithm::ES384,
            kid: kid.into(),
            encoding: EncodingKey::from_ec_der(sk.to_pkcs8_der().unwrap().as_bytes()),
            jwk: json!({"kty": "EC", "crv": "P-384", "kid": kid,
                "x": b64(point.x().unwrap()), "y": b64(point.y().unwrap())}),
            public_pem: vk.to_public_key_pem(LineEnding::LF).unwrap(),
            secret: Vec::new(),
        }
    }

    /// A fresh Ed25519 key (EdDSA).
    pub fn ed25519(kid: &str) -> Self {
        use ed25519_dalek::pkcs8::{EncodePrivateKey, EncodePublicKey};
        let sk = ed25519_dalek::SigningKey::from_bytes(&rand::random());
        let vk = sk.verifying_key();
        Self {
            alg: Algorithm::EdDSA,
            kid: kid.into(),
            encoding: EncodingKey::from_ed_der(sk.to_pkcs8_der().unwrap().as_bytes()),
            jwk: json!({"kty": "OKP", "crv": "Ed25519", "kid": kid, "x": b64(vk.as_bytes())}),
            public_pem: vk
                .to_public_key_pem(ed25519_dalek::pkcs8::spki::der::pem::LineEnding::LF)
                .unwrap(),
            secret: Vec::new(),
        }
    }

    /// Signs `claims` with this key's algorithm and kid.
    pub fn sign(&self, claims: &Value) -> String {
        let mut header = Header::new(self.alg);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, claims, &self.encoding).unwrap()
    }

    /// Signs without a kid in the header.
    pub fn sign_without_kid(&self, claims: &Value) -> String {
        jsonwebtoken::encode(&Header::new(self.alg), claims, &self.encoding).unwrap()
    }
}

/// A JWKS document of `keys`.
pub fn jwks(keys: &[&TestKey]) -> String {
    json!({"keys": keys.iter().map(|k| k.jwk.clone()).collect::<Vec<_>>()}).to_string()
}

/// Seconds since the epoch, now.
pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// Claims for `iss`/`aud` naming `tenant`, expiring in `ttl` seconds.
pub fn claims(iss: &str, aud: &str, tenant: &str, ttl: i64) -> Value {
    json!({"iss": iss, "aud": aud, "sub": "user-1", "tenant_id": tenant,
        "scope": "read write", "iat": now(), "exp": now() + ttl})
}

/// A token with `alg: none` and no signature.
pub fn unsigned(claims: &Value) -> String {
    let header = b64(br#"{"alg":"none","typ":"JWT"}"#);
    format!("{header}.{}.", b64(claims.to_string().as_bytes()))
}

/// A token signed with HS256 using `secret` as the key, whatever it is (the
/// algorithm-confusion attack uses a public key's PEM here).
pub fn hs256_with(secret: &[u8], kid: &str, claims: &Value) -> String {
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some(kid.into());
    jsonwebtoken::encode(&header, claims, &EncodingKey::from_secret(secret)).unwrap()
}

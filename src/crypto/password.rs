//! Console passwords: argon2id with OWASP's parameters (19 MiB, t = 2,
//! p = 1), hashed and verified on the blocking pool so a login never stalls
//! the runtime. Unknown accounts are answered after a dummy verification,
//! so timing does not tell which emails exist. Each call takes ~19 MiB and
//! a core for a while: callers bound how many run at once (the console's
//! `console::work::WorkQueue`).

use std::sync::{Arc, OnceLock};

use argon2::password_hash::{PasswordHash as Phc, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use secrecy::{ExposeSecret, SecretString};

use crate::domain::console::PasswordHash;

/// OWASP Password Storage Cheat Sheet: argon2id, m = 19 MiB, t = 2, p = 1.
const MEMORY_KIB: u32 = 19 * 1024;
const ITERATIONS: u32 = 2;
const LANES: u32 = 1;

fn argon2() -> Argon2<'static> {
    let params = Params::new(MEMORY_KIB, ITERATIONS, LANES, None).expect("static parameters");
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
}

/// Hashing failed (the blocking pool is gone, or argon2 refused its input).
#[derive(Debug, thiserror::Error)]
#[error("password hashing failed: {0}")]
pub struct HashError(String);

/// Hashes a new password.
pub async fn hash(password: SecretString) -> Result<PasswordHash, HashError> {
    tokio::task::spawn_blocking(move || {
        let salt_bytes: [u8; 16] = rand::random();
        let salt = SaltString::encode_b64(&salt_bytes).map_err(|e| HashError(e.to_string()))?;
        argon2()
            .hash_password(password.expose_secret().as_bytes(), &salt)
            .map(|h| PasswordHash(h.to_string()))
            .map_err(|e| HashError(e.to_string()))
    })
    .await
    .map_err(|e| HashError(e.to_string()))?
}

/// Whether `password` matches `stored`; with `None` (no such account) a
/// dummy hash is verified so the answer takes as long, and is `false`.
pub async fn verify(password: SecretString, stored: Option<PasswordHash>) -> bool {
    let known = stored.is_some();
    let stored = match stored {
        Some(h) => h,
        None => (*dummy_hash().await).clone(),
    };
    let matches = tokio::task::spawn_blocking(move || {
        let Ok(phc) = Phc::new(&stored.0) else {
            return false;
        };
        argon2()
            .verify_password(password.expose_secret().as_bytes(), &phc)
            .is_ok()
    })
    .await
    .unwrap_or(false);
    matches && known
}

static DUMMY: OnceLock<Arc<PasswordHash>> = OnceLock::new();

/// Computes the dummy hash ahead of the first unknown-email login, so that
/// login is not slower than the others.
pub async fn warm_up() {
    dummy_hash().await;
}

async fn dummy_hash() -> Arc<PasswordHash> {
    if let Some(h) = DUMMY.get() {
        return h.clone();
    }
    let random: [u8; 32] = rand::random();
    let h = hash(SecretString::from(hex::encode(random)))
        .await
        .unwrap_or_else(|_| PasswordHash(String::new()));
    DUMMY.get_or_init(|| Arc::new(h)).clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_password_verifies_against_its_argon2id_hash_only() {
        let h = hash(SecretString::from("correct horse battery staple"))
            .await
            .unwrap();
        assert!(
            h.0.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"),
            "{}",
            h.0
        );
        assert!(verify("correct horse battery staple".into(), Some(h.clone())).await);
        assert!(!verify("correct horse battery stapl".into(), Some(h.clone())).await);
        assert!(!verify("anything".into(), None).await);
        assert!(!verify("anything".into(), Some(PasswordHash("garbage".into()))).await);
        let again = hash(SecretString::from("correct horse battery staple"))
            .await
            .unwrap();
        assert_ne!(h, again, "salted");
    }
}

//! `[jwt.console]`: Tollgate's own console issuer. Its Ed25519 signing keys
//! (oldest first; the last signs, all verify) and token lifetimes.

use std::path::PathBuf;

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

use crate::crypto::signer::ConsoleSigner;

/// One console signing key: an Ed25519 private key in PKCS#8 PEM
/// (`openssl genpkey -algorithm ed25519`).
#[derive(Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SigningKeySettings {
    /// Published in the JWKS and in every token's header.
    pub kid: String,
    #[serde(default, serialize_with = "ser_opt_secret")]
    pub private_key: Option<SecretString>,
    #[serde(default)]
    pub private_key_file: Option<PathBuf>,
}

impl std::fmt::Debug for SigningKeySettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKeySettings")
            .field("kid", &self.kid)
            .field("private_key_file", &self.private_key_file)
            .finish_non_exhaustive()
    }
}

fn ser_opt_secret<S: serde::Serializer>(
    s: &Option<SecretString>,
    ser: S,
) -> Result<S::Ok, S::Error> {
    match s {
        Some(s) => ser.serialize_some(s.expose_secret()),
        None => ser.serialize_none(),
    }
}

/// The console issuer's settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConsoleSettings {
    /// `iss` of console access tokens.
    pub issuer: String,
    /// `aud` of console access tokens.
    pub audience: String,
    /// Access token lifetime, 60..=3600 seconds.
    pub access_ttl_seconds: u64,
    /// Refresh token lifetime, 1 hour ..= 90 days.
    pub refresh_ttl_seconds: u64,
    /// Oldest first; the last signs. None: the console is off (`tollgate
    /// dev` generates one).
    pub signing_keys: Vec<SigningKeySettings>,
}

impl Default for ConsoleSettings {
    fn default() -> Self {
        Self {
            issuer: "tollgate-console".into(),
            audience: "tollgate-console".into(),
            access_ttl_seconds: 900,
            refresh_ttl_seconds: 30 * 24 * 3600,
            signing_keys: Vec::new(),
        }
    }
}

/// A console setting that cannot be used (never echoes a key).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("configuration field `jwt.console.{field}`: {message}")]
pub struct ConsoleSettingsError {
    pub field: &'static str,
    pub message: String,
}

fn invalid(field: &'static str, message: impl Into<String>) -> ConsoleSettingsError {
    ConsoleSettingsError {
        field,
        message: message.into(),
    }
}

impl ConsoleSettings {
    /// Checks the plain fields.
    pub fn validate(&self) -> Result<(), ConsoleSettingsError> {
        if self.issuer.is_empty() || self.audience.is_empty() {
            return Err(invalid("issuer", "issuer and audience cannot be empty"));
        }
        if !(60..=3600).contains(&self.access_ttl_seconds) {
            return Err(invalid("access_ttl_seconds", "must be 60..=3600"));
        }
        if !(3600..=90 * 24 * 3600).contains(&self.refresh_ttl_seconds) {
            return Err(invalid("refresh_ttl_seconds", "must be 3600..=7776000"));
        }
        Ok(())
    }

    /// The signer from `signing_keys`; `None` when none are configured.
    pub fn load_signer(&self) -> Result<Option<ConsoleSigner>, ConsoleSettingsError> {
        self.validate()?;
        if self.signing_keys.is_empty() {
            return Ok(None);
        }
        let mut pems = Vec::new();
        for k in &self.signing_keys {
            let pem = match (&k.private_key, &k.private_key_file) {
                (Some(p), None) => p.expose_secret().to_string(),
                (None, Some(path)) => std::fs::read_to_string(path)
                    .map_err(|e| invalid("signing_keys", format!("{}: {e}", path.display())))?,
                _ => {
                    return Err(invalid(
                        "signing_keys",
                        format!("key `{}`: give private_key or private_key_file", k.kid),
                    ))
                }
            };
            pems.push((k.kid.clone(), pem));
        }
        ConsoleSigner::from_pems(pems.iter().map(|(k, p)| (k.clone(), p.as_str())))
            .map(Some)
            .map_err(|e| invalid("signing_keys", e.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signing_keys_stay_out_of_debug_and_bad_ones_name_the_field() {
        let s = ConsoleSettings {
            signing_keys: vec![SigningKeySettings {
                kid: "k1".into(),
                private_key: Some(
                    "-----BEGIN PRIVATE KEY-----\nsecretstuff"
                        .to_string()
                        .into(),
                ),
                private_key_file: None,
            }],
            ..ConsoleSettings::default()
        };
        assert!(!format!("{s:?}").contains("secretstuff"));
        let err = s.load_signer().unwrap_err();
        assert_eq!(err.field, "signing_keys");
        assert!(!err.to_string().contains("secretstuff"), "{err}");
        let bad_ttl = ConsoleSettings {
            access_ttl_seconds: 10,
            ..ConsoleSettings::default()
        };
        assert_eq!(bad_ttl.validate().unwrap_err().field, "access_ttl_seconds");
        assert!(ConsoleSettings::default().load_signer().unwrap().is_none());
    }
}

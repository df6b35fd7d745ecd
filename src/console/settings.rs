//! `[jwt.console]`: Tollgate's own console issuer. Its Ed25519 signing keys
//! (oldest first; the last signs, all verify), token and session lifetimes,
//! who may sign up, and how tokens reach their owners
//! (`[jwt.console.delivery]`).

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

/// Who may create console accounts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SignupPolicy {
    /// Anyone may SignUp: a new tenant (with a generated id) and its owner.
    Open,
    /// SignUp is refused; accounts are added by CreateUser (a tenant's
    /// owners and admins, or the operator into a tenant it made).
    Invite,
    /// No new accounts at all: SignUp and CreateUser are refused.
    Off,
}

impl SignupPolicy {
    /// The configuration spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Open => "open",
            Self::Invite => "invite",
            Self::Off => "off",
        }
    }
}

/// `[jwt.console.delivery]`: where verification and reset tokens go.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeliverySettings {
    /// HTTPS endpoint receiving signed JSON messages; absent: nothing is
    /// sent (and resets and verification cannot complete).
    pub webhook_url: Option<String>,
    /// HMAC-SHA256 key of the `x-tollgate-signature` header (≥ 32 bytes).
    #[serde(default, serialize_with = "ser_opt_secret")]
    pub webhook_secret: Option<SecretString>,
    #[serde(default)]
    pub webhook_secret_file: Option<PathBuf>,
    /// Bound on each attempt, 1..=30 seconds.
    pub timeout_seconds: u64,
    /// DEVELOPMENT ONLY: print messages (tokens included) to stdout instead
    /// of sending them. Not configurable: only `tollgate dev` turns it on
    /// (when no webhook is set), through [`ConsoleSettings::for_dev`].
    #[serde(skip)]
    pub stdout: bool,
}

impl Default for DeliverySettings {
    fn default() -> Self {
        Self {
            webhook_url: None,
            webhook_secret: None,
            webhook_secret_file: None,
            timeout_seconds: 5,
            stdout: false,
        }
    }
}

impl std::fmt::Debug for DeliverySettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL may carry a token of its own: only its host is shown.
        let host = self
            .webhook_url
            .as_deref()
            .and_then(|u| reqwest::Url::parse(u).ok())
            .and_then(|u| u.host_str().map(str::to_string));
        f.debug_struct("DeliverySettings")
            .field("webhook_host", &host)
            .field("webhook_secret_file", &self.webhook_secret_file)
            .field("timeout_seconds", &self.timeout_seconds)
            .field("stdout", &self.stdout)
            .finish_non_exhaustive()
    }
}

/// Shortest webhook secret accepted.
const MIN_WEBHOOK_SECRET_BYTES: usize = 32;

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
    /// Absolute session lifetime from login, 1 hour ..= 365 days: refresh
    /// never extends a session past it.
    pub session_max_age_seconds: u64,
    /// Oldest first; the last signs. None: the console is off (`tollgate
    /// dev` generates one).
    pub signing_keys: Vec<SigningKeySettings>,
    /// Who may create accounts; unset: `invite` (`tollgate dev`: `open`).
    pub signup: Option<SignupPolicy>,
    /// Refuse management calls from users whose email is unverified.
    pub require_verified_email: bool,
    /// Callers waiting for a password-hashing slot, at most (more are told
    /// to retry: RESOURCE_EXHAUSTED with RetryInfo).
    pub password_queue: usize,
    /// Longest wait for a password-hashing slot, 1..=60 seconds.
    pub password_queue_wait_seconds: u64,
    /// Where verification and reset tokens are sent.
    pub delivery: DeliverySettings,
    /// OpenID Connect providers for SignInWithProvider, by name
    /// (`[jwt.console.oidc.google]`).
    pub oidc: std::collections::BTreeMap<String, super::providers::ProviderSettings>,
}

impl Default for ConsoleSettings {
    fn default() -> Self {
        Self {
            issuer: "tollgate-console".into(),
            audience: "tollgate-console".into(),
            access_ttl_seconds: 900,
            refresh_ttl_seconds: 30 * 24 * 3600,
            session_max_age_seconds: 30 * 24 * 3600,
            signing_keys: Vec::new(),
            signup: None,
            require_verified_email: false,
            password_queue: 64,
            password_queue_wait_seconds: 5,
            delivery: DeliverySettings::default(),
            oidc: std::collections::BTreeMap::new(),
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
        if !(3600..=365 * 24 * 3600).contains(&self.session_max_age_seconds) {
            return Err(invalid(
                "session_max_age_seconds",
                "must be 3600..=31536000",
            ));
        }
        if !(1..=60).contains(&self.password_queue_wait_seconds) {
            return Err(invalid("password_queue_wait_seconds", "must be 1..=60"));
        }
        let d = &self.delivery;
        if !(1..=30).contains(&d.timeout_seconds) {
            return Err(invalid("delivery.timeout_seconds", "must be 1..=30"));
        }
        if let Some(url) = &d.webhook_url {
            let ok = reqwest::Url::parse(url)
                .is_ok_and(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some());
            if !ok {
                return Err(invalid(
                    "delivery.webhook_url",
                    "must be an http(s) URL with a host",
                ));
            }
            if d.webhook_secret.is_some() == d.webhook_secret_file.is_some() {
                return Err(invalid(
                    "delivery.webhook_secret",
                    "give webhook_secret or webhook_secret_file with webhook_url",
                ));
            }
        }
        Ok(())
    }

    /// Who may create accounts: `invite` unless configured.
    pub fn signup_policy(&self) -> SignupPolicy {
        self.signup.unwrap_or(SignupPolicy::Invite)
    }

    /// `tollgate dev`'s defaults: open sign-up, and messages printed to
    /// stdout when no webhook is configured.
    pub fn for_dev(mut self) -> Self {
        self.signup.get_or_insert(SignupPolicy::Open);
        if self.delivery.webhook_url.is_none() {
            self.delivery.stdout = true;
        }
        self
    }

    /// The webhook's URL, secret and timeout, with the secret file read;
    /// `None` without a webhook.
    pub fn load_webhook(
        &self,
    ) -> Result<Option<(reqwest::Url, SecretString, std::time::Duration)>, ConsoleSettingsError>
    {
        self.validate()?;
        let d = &self.delivery;
        let Some(url) = &d.webhook_url else {
            return Ok(None);
        };
        let url = reqwest::Url::parse(url)
            .map_err(|_| invalid("delivery.webhook_url", "must be an http(s) URL"))?;
        let secret = match (&d.webhook_secret, &d.webhook_secret_file) {
            (Some(s), None) => s.clone(),
            (None, Some(path)) => std::fs::read_to_string(path)
                .map(|s| SecretString::from(s.trim_end().to_string()))
                .map_err(|e| {
                    invalid(
                        "delivery.webhook_secret_file",
                        format!("{}: {}", path.display(), e.kind()),
                    )
                })?,
            _ => return Err(invalid("delivery.webhook_secret", "is required")),
        };
        if secret.expose_secret().len() < MIN_WEBHOOK_SECRET_BYTES {
            return Err(invalid(
                "delivery.webhook_secret",
                format!("must be at least {MIN_WEBHOOK_SECRET_BYTES} bytes"),
            ));
        }
        Ok(Some((
            url,
            secret,
            std::time::Duration::from_secs(d.timeout_seconds),
        )))
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

    #[test]
    fn the_webhook_secret_and_url_stay_out_of_debug_and_errors() {
        let mut s = ConsoleSettings::default();
        s.delivery.webhook_url = Some("https://mail.example/hook?key=urlsecret".into());
        s.delivery.webhook_secret = Some("shortsecret".to_string().into());
        let debug = format!("{s:?}");
        assert!(!debug.contains("shortsecret") && !debug.contains("urlsecret"));
        assert!(debug.contains("mail.example"), "{debug}");
        let err = s.load_webhook().unwrap_err();
        assert_eq!(err.field, "delivery.webhook_secret");
        assert!(!err.to_string().contains("shortsecret"), "{err}");
        s.delivery.webhook_secret = Some("x".repeat(32).into());
        assert!(s.load_webhook().unwrap().is_some());
        s.delivery.webhook_secret_file = Some("/nonexistent".into());
        assert_eq!(s.validate().unwrap_err().field, "delivery.webhook_secret");
        assert_eq!(
            ConsoleSettings::default().signup_policy(),
            SignupPolicy::Invite,
            "a fresh deployment takes no anonymous sign-ups"
        );
        let dev = ConsoleSettings::default().for_dev();
        assert_eq!(dev.signup_policy(), SignupPolicy::Open);
        assert!(dev.delivery.stdout);
        // Printing tokens is for `tollgate dev` only: no file turns it on.
        assert!(toml::from_str::<ConsoleSettings>("[delivery]\nstdout = true").is_err());
        let parsed: ConsoleSettings =
            toml::from_str("signup = \"open\"\n[delivery]\ntimeout_seconds = 3").unwrap();
        assert_eq!(parsed.signup, Some(SignupPolicy::Open));
        assert_eq!(parsed.delivery.timeout_seconds, 3);
    }
}

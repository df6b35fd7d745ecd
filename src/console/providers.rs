//! `[jwt.console.oidc.<name>]`: OpenID Connect providers whose ID tokens
//! sign console users in (SignInWithProvider). `google` has presets (its
//! issuers, its JWKS URL, RS256); any other name needs `issuers` and a JWKS
//! source. Keys come from a JWKS URL or file and are kept fresh by the same
//! refresher as `[[jwt.issuers]]`; these issuers are never trusted on the
//! dashboard surface itself.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::crypto::issuers::{IssuerSettings, IssuerTenants};
use crate::crypto::jwks::{redact_url, Refresher};
use crate::crypto::jwt::oidc::{IdTokenRules, IdTokenVerifier};

/// Google's issuers (both spellings appear in its ID tokens).
pub const GOOGLE_ISSUERS: [&str; 2] = ["https://accounts.google.com", "accounts.google.com"];
/// Google's published signing keys.
pub const GOOGLE_JWKS_URL: &str = "https://www.googleapis.com/oauth2/v3/certs";

/// One provider.
#[derive(Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProviderSettings {
    /// The console's OAuth client ids at the provider: the ID token's `aud`
    /// must name one. Required.
    pub client_ids: Vec<String>,
    /// Accepted `iss` values, the first canonical (stored with each linked
    /// identity). `google`: both of Google's spellings.
    pub issuers: Vec<String>,
    /// The provider's JWKS URL (`https://`). `google`: Google's.
    pub jwks_url: Option<String>,
    /// Or a JWKS document on disk (re-read every `refresh_seconds`).
    pub jwks_file: Option<PathBuf>,
    /// Development only: accept an `http://` `jwks_url`.
    pub allow_insecure_http: bool,
    /// Accepted algorithms; default `["RS256"]`.
    pub algorithms: Vec<String>,
    /// Clock skew tolerated on `exp`, `nbf`, `iat`, 0..=300 seconds
    /// (default 60).
    pub leeway_seconds: Option<u64>,
    /// JWKS refresh interval (default 3600 s; an unknown `kid` refreshes
    /// sooner, no more often than `min_refresh_seconds`, default 30).
    pub refresh_seconds: Option<u64>,
    pub min_refresh_seconds: Option<u64>,
}

impl std::fmt::Debug for ProviderSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProviderSettings")
            .field("client_ids", &self.client_ids)
            .field("issuers", &self.issuers)
            .field("jwks_url", &self.jwks_url.as_deref().map(redact_url))
            .field("jwks_file", &self.jwks_file)
            .finish_non_exhaustive()
    }
}

/// A provider setting that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("configuration field `jwt.console.oidc.{field}`: {message}")]
pub struct ProviderError {
    pub field: String,
    pub message: String,
}

/// A configured provider, ready to verify.
#[derive(Debug)]
pub struct Provider {
    pub name: String,
    pub verifier: IdTokenVerifier,
}

/// Every configured provider, by name.
#[derive(Debug, Default)]
pub struct Providers {
    by_name: BTreeMap<String, Arc<Provider>>,
}

impl Providers {
    /// These providers (a later one of the same name replaces an earlier).
    pub fn new(providers: impl IntoIterator<Item = Provider>) -> Self {
        Self {
            by_name: providers
                .into_iter()
                .map(|p| (p.name.clone(), Arc::new(p)))
                .collect(),
        }
    }

    /// The provider called `name`.
    pub fn get(&self, name: &str) -> Option<&Arc<Provider>> {
        self.by_name.get(name)
    }

    /// Their names.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.by_name.keys().map(String::as_str)
    }
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 32
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
}

impl ProviderSettings {
    /// Validates and builds provider `name`, and the refresher that keeps
    /// its keys fresh (always one: a URL or a file).
    pub fn build(&self, name: &str) -> Result<(Provider, Refresher), ProviderError> {
        let err = |f: &str, m: String| ProviderError {
            field: format!("{name}.{f}"),
            message: m,
        };
        if !valid_name(name) {
            return Err(err(
                "",
                "provider names are 1-32 characters of [a-z0-9_-]".into(),
            ));
        }
        let google = name == "google";
        if self.client_ids.is_empty() || self.client_ids.iter().any(String::is_empty) {
            return Err(err(
                "client_ids",
                "name the console's client id at the provider (the ID token's aud)".into(),
            ));
        }
        let issuers = if self.issuers.is_empty() && google {
            GOOGLE_ISSUERS.iter().map(|s| s.to_string()).collect()
        } else {
            self.issuers.clone()
        };
        if issuers.is_empty() || issuers.iter().any(String::is_empty) {
            return Err(err("issuers", "name the provider's `iss` value".into()));
        }
        let jwks_url = match (&self.jwks_url, &self.jwks_file) {
            (None, None) if google => Some(GOOGLE_JWKS_URL.to_string()),
            (None, None) => {
                return Err(err("jwks_url", "give jwks_url or jwks_file".into()));
            }
            (url, _) => url.clone(),
        };
        let algorithms = if self.algorithms.is_empty() {
            vec!["RS256".to_string()]
        } else {
            self.algorithms.clone()
        };
        if algorithms.iter().any(|a| a.starts_with("HS")) {
            return Err(err(
                "algorithms",
                "a provider signs with a private key: HMAC algorithms are refused".into(),
            ));
        }
        let leeway_seconds = self.leeway_seconds.unwrap_or(60);
        // The shared issuer builder checks the key source, the URL scheme and
        // the algorithms, reads a JWKS file, and makes the refresher.
        let as_issuer = IssuerSettings {
            issuer: issuers[0].clone(),
            audiences: self.client_ids.clone(),
            tenants: Some(IssuerTenants::Word("all".into())),
            leeway_seconds,
            algorithms,
            jwks_file: self.jwks_file.clone(),
            jwks_url,
            allow_insecure_http: self.allow_insecure_http,
            refresh_seconds: self.refresh_seconds.unwrap_or(3600),
            min_refresh_seconds: self.min_refresh_seconds.unwrap_or(30),
            ..IssuerSettings::default()
        };
        let (keys, refresher) = as_issuer.build(0).map_err(|e| {
            let field = e.field.trim_start_matches("jwt.issuers[0].").to_string();
            err(&field, e.message)
        })?;
        let refresher = refresher.ok_or_else(|| err("jwks_url", "give a JWKS source".into()))?;
        let rules = IdTokenRules {
            issuers,
            client_ids: self.client_ids.clone(),
            leeway_seconds,
        };
        Ok((
            Provider {
                name: name.to_string(),
                verifier: IdTokenVerifier::new(rules, keys),
            },
            refresher,
        ))
    }
}

/// Builds every provider of `settings`, with their refreshers.
pub fn build_providers(
    settings: &BTreeMap<String, ProviderSettings>,
) -> Result<(Providers, Vec<Refresher>), ProviderError> {
    let mut providers = Providers::default();
    let mut refreshers = Vec::new();
    for (name, s) in settings {
        let (provider, refresher) = s.build(name)?;
        providers.by_name.insert(name.clone(), Arc::new(provider));
        refreshers.push(refresher);
    }
    Ok((providers, refreshers))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn google_needs_only_its_client_id() {
        let s: BTreeMap<String, ProviderSettings> =
            toml::from_str("[google]\nclient_ids = [\"123.apps.googleusercontent.com\"]\n")
                .unwrap();
        let (providers, refreshers) = build_providers(&s).unwrap();
        let google = providers.get("google").unwrap();
        assert_eq!(google.verifier.rules().issuers, GOOGLE_ISSUERS.to_vec());
        assert_eq!(google.verifier.rules().leeway_seconds, 60);
        assert_eq!(refreshers.len(), 1);
        assert_eq!(
            refreshers[0].issuer().rules().issuer,
            "https://accounts.google.com"
        );
    }

    #[test]
    fn bad_provider_settings_name_the_field() {
        let field = |toml: &str| {
            let s: BTreeMap<String, ProviderSettings> = toml::from_str(toml).unwrap();
            build_providers(&s).unwrap_err().field
        };
        assert_eq!(field("[google]\n"), "google.client_ids");
        assert_eq!(field("[acme]\nclient_ids = [\"c\"]\n"), "acme.issuers");
        assert_eq!(
            field("[acme]\nclient_ids = [\"c\"]\nissuers = [\"https://idp\"]\n"),
            "acme.jwks_url"
        );
        assert_eq!(
            field("[google]\nclient_ids = [\"c\"]\njwks_url = \"http://idp.example/jwks\"\n"),
            "google.jwks_url"
        );
        assert_eq!(
            field("[google]\nclient_ids = [\"c\"]\nalgorithms = [\"HS256\"]\n"),
            "google.algorithms"
        );
        assert_eq!(
            field("[google]\nclient_ids = [\"c\"]\nleeway_seconds = 301\n"),
            "google.leeway_seconds"
        );
        assert_eq!(field("[Bad]\nclient_ids = [\"c\"]\n"), "Bad.");
        assert!(
            toml::from_str::<BTreeMap<String, ProviderSettings>>("[google]\nbogus = 1\n").is_err()
        );
    }
}

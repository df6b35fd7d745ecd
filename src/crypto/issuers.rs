//! `[[jwt.issuers]]` settings and building the verifier from them: keys from
//! config (an HMAC secret or PEM public keys), a JWKS file, or a JWKS URL.
//! Files are read once here; URLs (and JWKS files, to follow mounted
//! secrets) are refreshed by [`super::jwks::Refresher`].

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

use super::jwks::{parse_jwks, redact_url, JwksSource, RefreshPolicy, Refresher};
use super::jwt::{
    parse_algorithm, Algorithm, Issuer, IssuerRules, KeySet, TenantRule, VerifyingKey,
};

/// A PEM public key given in config.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublicKeySettings {
    /// Matched against the token header's `kid`; optional with one key.
    #[serde(default)]
    pub kid: Option<String>,
    /// RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384 or EdDSA. An
    /// RSA key verifies every RS*/PS* algorithm the issuer allows.
    pub algorithm: String,
    /// The PEM text, or …
    #[serde(default)]
    pub pem: Option<String>,
    /// … a file holding it.
    #[serde(default)]
    pub file: Option<PathBuf>,
}

/// `tenants` of an issuer: `"all"`, a list of tenant ids, or
/// `{ map = { "<claim value>" = "<tenant id>" } }`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum IssuerTenants {
    /// `"all"` (any other word is refused at load).
    Word(String),
    List(Vec<String>),
    Map {
        map: std::collections::BTreeMap<String, String>,
    },
}

/// One trusted external issuer (`[[jwt.issuers]]`).
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IssuerSettings {
    /// The `iss` claim value.
    pub issuer: String,
    /// Accepted `aud` values; at least one.
    pub audiences: Vec<String>,
    /// Claim naming the tenant.
    pub tenant_claim: String,
    /// Which tenants this issuer may speak for; required (no default, so
    /// trusting an issuer never silently trusts it for every tenant).
    pub tenants: Option<IssuerTenants>,
    /// Claim holding scopes (string, space-separated, or array); `scope`
    /// falls back to `scp`.
    pub scope_claim: String,
    /// Clock skew tolerated on `exp`/`nbf`, 0..=300 seconds.
    pub leeway_seconds: u64,
    /// Algorithms accepted from this issuer; empty = any its keys allow.
    pub algorithms: Vec<String>,
    /// HMAC secret (HS256/384/512), at least 32 bytes.
    #[serde(serialize_with = "ser_opt_secret")]
    pub secret: Option<SecretString>,
    pub secret_file: Option<PathBuf>,
    /// PEM public keys.
    pub public_keys: Vec<PublicKeySettings>,
    /// A JWKS document on disk (re-read every `refresh_seconds`).
    pub jwks_file: Option<PathBuf>,
    /// A JWKS URL, fetched in the background: `https://` (redirects are
    /// followed only within its origin).
    pub jwks_url: Option<String>,
    /// Development only: accept an `http://` `jwks_url` (keys fetched in
    /// the clear can be swapped by anyone on the path). Default false.
    pub allow_insecure_http: bool,
    /// JWKS refresh interval.
    pub refresh_seconds: u64,
    /// Least time between two JWKS fetches (unknown `kid` refreshes).
    pub min_refresh_seconds: u64,
}

impl Default for IssuerSettings {
    fn default() -> Self {
        Self {
            issuer: String::new(),
            audiences: Vec::new(),
            tenant_claim: "tenant_id".into(),
            tenants: None,
            scope_claim: "scope".into(),
            leeway_seconds: 30,
            algorithms: Vec::new(),
            secret: None,
            secret_file: None,
            public_keys: Vec::new(),
            jwks_file: None,
            jwks_url: None,
            allow_insecure_http: false,
            refresh_seconds: 300,
            min_refresh_seconds: 30,
        }
    }
}

impl std::fmt::Debug for IssuerSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuerSettings")
            .field("issuer", &self.issuer)
            .field("audiences", &self.audiences)
            .field("jwks_url", &self.jwks_url.as_deref().map(redact_url))
            .field("jwks_file", &self.jwks_file)
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

/// A setting that cannot be used: the field (under `jwt.issuers[i]`) and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("configuration field `{field}`: {message}")]
pub struct IssuerError {
    pub field: String,
    pub message: String,
}

/// A verifier's issuers and the refreshers that keep their JWKS fresh.
#[derive(Debug, Default)]
pub struct BuiltIssuers {
    pub issuers: Vec<Arc<Issuer>>,
    pub refreshers: Vec<Refresher>,
}

impl IssuerSettings {
    /// Validates and builds the issuer (`index` names it in errors).
    pub fn build(&self, index: usize) -> Result<(Arc<Issuer>, Option<Refresher>), IssuerError> {
        let field = |f: &str| format!("jwt.issuers[{index}].{f}");
        let err = |f: &str, m: String| IssuerError {
            field: field(f),
            message: m,
        };
        if self.issuer.is_empty() {
            return Err(err("issuer", "is required (the `iss` value)".into()));
        }
        if self.audiences.is_empty() || self.audiences.iter().any(String::is_empty) {
            return Err(err("audiences", "name at least one audience".into()));
        }
        if self.tenant_claim.is_empty() || self.scope_claim.is_empty() {
            return Err(err("tenant_claim", "claim names cannot be empty".into()));
        }
        let tenants = match &self.tenants {
            None => {
                return Err(err(
                    "tenants",
                    "declare which tenants this issuer may speak for: \"all\", a list of tenant ids, or { map = { \"<claim value>\" = \"<tenant id>\" } }".into(),
                ))
            }
            Some(IssuerTenants::Word(w)) if w == "all" => TenantRule::All,
            Some(IssuerTenants::Word(w)) => {
                return Err(err("tenants", format!("`{w}` is not \"all\", a list or a map")))
            }
            Some(IssuerTenants::List(l)) if l.is_empty() || l.iter().any(String::is_empty) => {
                return Err(err("tenants", "name at least one tenant id".into()))
            }
            Some(IssuerTenants::List(l)) => TenantRule::Only(l.clone()),
            Some(IssuerTenants::Map { map }) if map.is_empty() => {
                return Err(err("tenants", "the map names no tenant".into()))
            }
            Some(IssuerTenants::Map { map }) => TenantRule::Map(map.clone()),
        };
        if self.leeway_seconds > 300 {
            return Err(err("leeway_seconds", "must be 0..=300".into()));
        }
        if self.refresh_seconds == 0 || self.min_refresh_seconds == 0 {
            return Err(err(
                "refresh_seconds",
                "refresh intervals must be ≥ 1".into(),
            ));
        }
        let allowed = self
            .algorithms
            .iter()
            .map(|a| parse_algorithm(a).ok_or_else(|| err("algorithms", format!("unknown `{a}`"))))
            .collect::<Result<Vec<Algorithm>, _>>()?;

        let secret = match (&self.secret, &self.secret_file) {
            (Some(_), Some(_)) => return Err(err("secret", "set secret or secret_file".into())),
            (Some(s), None) => Some(s.expose_secret().as_bytes().to_vec()),
            (None, Some(p)) => {
                let mut bytes = read(p).map_err(|m| err("secret_file", m))?;
                while bytes.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
                    bytes.pop();
                }
                Some(bytes)
            }
            (None, None) => None,
        };
        let sources = [
            secret.is_some(),
            !self.public_keys.is_empty(),
            self.jwks_file.is_some(),
            self.jwks_url.is_some(),
        ];
        if sources.iter().filter(|s| **s).count() != 1 {
            return Err(err(
                "secret",
                "give exactly one key source: secret/secret_file, public_keys, jwks_file or jwks_url"
                    .into(),
            ));
        }
        let mut keys = Vec::new();
        if let Some(secret) = secret {
            keys.push(VerifyingKey::hmac(None, &secret, &allowed).map_err(|e| err("secret", e.0))?);
        }
        for (i, k) in self.public_keys.iter().enumerate() {
            let f = format!("public_keys[{i}]");
            let alg = parse_algorithm(&k.algorithm)
                .ok_or_else(|| err(&f, format!("unknown algorithm `{}`", k.algorithm)))?;
            let pem = match (&k.pem, &k.file) {
                (Some(p), None) => p.as_bytes().to_vec(),
                (None, Some(path)) => read(path).map_err(|m| err(&f, m))?,
                _ => return Err(err(&f, "give pem or file".into())),
            };
            keys.push(
                VerifyingKey::from_pem(k.kid.clone(), alg, &pem, &allowed)
                    .map_err(|e| err(&f, e.0))?,
            );
        }
        if keys.len() > 1 && keys.iter().any(|k| k.kid().is_none()) {
            return Err(err(
                "public_keys",
                "with several keys every key needs a kid".into(),
            ));
        }
        let source = match (&self.jwks_file, &self.jwks_url) {
            (Some(path), None) => {
                let text = read(path).map_err(|m| err("jwks_file", m))?;
                keys = parse_jwks(&text, &allowed)
                    .map_err(|e| err("jwks_file", e.0))?
                    .into_keys();
                Some(JwksSource::File(path.clone()))
            }
            (None, Some(url)) => {
                let parsed = reqwest::Url::parse(url)
                    .ok()
                    .filter(|u| u.host_str().is_some())
                    .ok_or_else(|| err("jwks_url", "is not an absolute URL".into()))?;
                match parsed.scheme() {
                    "https" => {}
                    "http" if self.allow_insecure_http => {}
                    "http" => {
                        return Err(err(
                            "jwks_url",
                            "must be https (plain http only with allow_insecure_http = true, for development)"
                                .into(),
                        ))
                    }
                    _ => return Err(err("jwks_url", "must be an https URL".into())),
                }
                Some(JwksSource::Url(parsed))
            }
            _ => None,
        };
        let rules = IssuerRules {
            issuer: self.issuer.clone(),
            audiences: self.audiences.clone(),
            tenant_claim: self.tenant_claim.clone(),
            scope_claim: self.scope_claim.clone(),
            leeway_seconds: self.leeway_seconds,
            tenants,
        };
        let issuer = Arc::new(Issuer::new(rules, KeySet::new(keys)));
        let refresher = source.map(|source| {
            let policy = RefreshPolicy {
                every: Duration::from_secs(self.refresh_seconds),
                min_gap: Duration::from_secs(self.min_refresh_seconds),
                timeout: Duration::from_secs(10),
            };
            Refresher::new(issuer.clone(), source, allowed.clone(), policy)
        });
        Ok((issuer, refresher))
    }
}

/// Builds every configured issuer.
pub fn build_all(settings: &[IssuerSettings]) -> Result<BuiltIssuers, IssuerError> {
    let mut built = BuiltIssuers::default();
    for (i, s) in settings.iter().enumerate() {
        let (issuer, refresher) = s.build(i)?;
        built.issuers.push(issuer);
        built.refreshers.extend(refresher);
    }
    Ok(built)
}

fn read(path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{FlagOverrides, Settings};

    fn load(toml: &str) -> Result<Settings, String> {
        let dir = std::env::temp_dir().join(format!("tg-iss-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("c.toml");
        std::fs::write(&file, toml).unwrap();
        let s = Settings::load(Some(&file), &FlagOverrides::default()).map_err(|e| e.to_string());
        std::fs::remove_dir_all(dir).unwrap();
        s
    }

    #[test]
    fn issuers_load_from_the_config_file_with_defaults() {
        let s = load(
            r#"
[[jwt.issuers]]
issuer = "https://idp.example.com/"
audiences = ["dashboard"]
tenants = "all"
jwks_url = "https://idp.example.com/.well-known/jwks.json"

[[jwt.issuers]]
issuer = "legacy"
audiences = ["console"]
tenants = { map = { "org-1" = "acme" } }
tenant_claim = "org_id"
secret = "0123456789abcdef0123456789abcdef"
"#,
        )
        .unwrap();
        let built = build_all(&s.jwt.issuers).unwrap();
        assert_eq!(built.issuers.len(), 2);
        assert_eq!(built.refreshers.len(), 1);
        let rules = built.issuers[1].rules();
        assert_eq!(
            (rules.tenant_claim.as_str(), rules.leeway_seconds),
            ("org_id", 30)
        );
        assert!(!format!("{s:?}").contains("0123456789abcdef"));
    }

    #[test]
    fn bad_issuer_settings_name_the_field() {
        let base = IssuerSettings {
            issuer: "i".into(),
            audiences: vec!["a".into()],
            tenants: Some(IssuerTenants::List(vec!["acme".into()])),
            ..IssuerSettings::default()
        };
        let err = |s: IssuerSettings| s.build(2).unwrap_err().field;
        let undeclared = IssuerSettings {
            tenants: None,
            secret: Some("0123456789abcdef0123456789abcdef".to_string().into()),
            ..base.clone()
        };
        assert_eq!(err(undeclared), "jwt.issuers[2].tenants");
        let some = IssuerSettings {
            tenants: Some(IssuerTenants::Word("some".into())),
            ..base.clone()
        };
        assert_eq!(err(some), "jwt.issuers[2].tenants");
        assert_eq!(err(base.clone()), "jwt.issuers[2].secret"); // no key source
        let short = IssuerSettings {
            secret: Some("short".to_string().into()),
            ..base.clone()
        };
        assert_eq!(err(short), "jwt.issuers[2].secret");
        let no_aud = IssuerSettings {
            audiences: vec![],
            ..base.clone()
        };
        assert_eq!(err(no_aud), "jwt.issuers[2].audiences");
        let bad_alg = IssuerSettings {
            algorithms: vec!["none".into()],
            ..base.clone()
        };
        assert_eq!(err(bad_alg), "jwt.issuers[2].algorithms");
        let ftp = IssuerSettings {
            jwks_url: Some("ftp://x".into()),
            ..base.clone()
        };
        assert_eq!(err(ftp), "jwt.issuers[2].jwks_url");
        let plain = IssuerSettings {
            jwks_url: Some("http://idp.example.com/jwks?token=s3cr3t".into()),
            ..base.clone()
        };
        let refused = plain.build(2).unwrap_err();
        assert_eq!(refused.field, "jwt.issuers[2].jwks_url");
        assert!(refused.message.contains("allow_insecure_http"), "{refused}");
        let dev = IssuerSettings {
            allow_insecure_http: true,
            ..plain
        };
        assert!(dev.build(2).is_ok());
        assert!(!format!("{dev:?}").contains("s3cr3t"), "{dev:?}");
        assert!(load("[[jwt.issuers]]\nissuer = \"x\"\nbogus = 1\n").is_err());
    }
}

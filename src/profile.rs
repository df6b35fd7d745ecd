//! Profiles: a product's auth contract. Key format, surfaces (which header
//! carries which credential), plans, and the code / HTTP status / message /
//! body shape of every deny reason. Parsed and validated once at start.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::json;

use crate::domain::ratelimit::{RateLimitConfig, RateLimitSection};
use crate::domain::{Alphabet, KeyFormat, LimitSpec, Reason, SubscriptionStatus};

/// The profile used when none is configured.
pub const DEFAULT_PROFILE: &str = include_str!("../profiles/default.toml");

/// Seconds in 365 days, the default key lifetime.
pub const DEFAULT_TTL_SECONDS: u64 = 365 * 24 * 3600;

/// What an `Authorization: Bearer` credential means on a surface.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BearerPolicy {
    /// Bearer carries an API key (MailSage).
    ApiKey,
    /// Bearer carries a JWT; an API key sent as Bearer is refused.
    Jwt,
    /// No Bearer credential is accepted (MsgFlash public API): anything sent
    /// as Bearer is `WRONG_CREDENTIAL_FOR_SURFACE`.
    None,
}

/// Where credentials are read on one surface.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Surface {
    /// Headers carrying a raw API key (lower-case), first match wins.
    #[serde(default)]
    pub api_key_headers: Vec<String>,
    /// What `Authorization: Bearer` carries here.
    pub bearer: BearerPolicy,
    /// Key environments accepted here; empty = all.
    #[serde(default)]
    pub environments: Vec<String>,
    /// JWT issuers (`iss`) accepted here; empty = every configured issuer.
    #[serde(default)]
    pub jwt_issuers: Vec<String>,
    /// JWT audiences accepted here (the token's `aud` must hold one);
    /// empty = whatever the issuer accepts.
    #[serde(default)]
    pub jwt_audiences: Vec<String>,
    /// Whether a tenant whose subscription is not active passes here
    /// (`required`: refused with `SUBSCRIPTION_INACTIVE`, the default;
    /// `optional`: passes, its status sent upstream). An ext_authz route's
    /// `context_extensions.subscription` overrides it.
    #[serde(default)]
    pub subscription: SubscriptionGate,
    /// This surface's own answers for some deny reasons (a dashboard says
    /// "token" where the public API says "API key"); the rest come from the
    /// profile's `[denials]`.
    #[serde(default)]
    pub denials: BTreeMap<Reason, DenialSpec>,
}

/// Whether an inactive subscription is refused on a surface or route.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SubscriptionGate {
    /// Only tenants in an active status pass (`SUBSCRIPTION_INACTIVE`).
    #[default]
    Required,
    /// Tenants pass whatever their status (a dashboard where a lapsed
    /// customer signs in, reads and pays); the status goes upstream so the
    /// application can limit what they do.
    Optional,
}

impl SubscriptionGate {
    /// Parses `required` / `optional` (a route's `context_extensions`).
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "required" => Some(Self::Required),
            "optional" => Some(Self::Optional),
            _ => None,
        }
    }
}

impl Surface {
    /// Whether a verified token of `issuer` with `aud` may be used here.
    pub fn accepts_jwt(&self, issuer: &str, aud: Option<&serde_json::Value>) -> bool {
        let issuer_ok = self.jwt_issuers.is_empty() || self.jwt_issuers.iter().any(|i| i == issuer);
        let audience_ok = self.jwt_audiences.is_empty()
            || match aud {
                Some(serde_json::Value::String(a)) => self.jwt_audiences.contains(a),
                Some(serde_json::Value::Array(list)) => list
                    .iter()
                    .filter_map(serde_json::Value::as_str)
                    .any(|a| self.jwt_audiences.iter().any(|x| x == a)),
                _ => false,
            };
        issuer_ok && audience_ok
    }
}

/// A plan: a product decision shipped in the profile.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    /// Live keys a tenant may hold; absent = unlimited.
    #[serde(default)]
    pub max_keys: Option<u32>,
    /// Scopes keys on this plan may carry.
    pub scopes: Vec<String>,
    /// Scopes given when CreateKey names none; absent = all of `scopes`.
    #[serde(default)]
    pub default_scopes: Option<Vec<String>>,
    /// Environments keys may be created in and used from; empty = all.
    #[serde(default)]
    pub environments: Vec<String>,
    /// Rate limits and quotas of this plan.
    #[serde(default)]
    pub limits: Vec<LimitSpec>,
    /// Shadow mode: limits are evaluated and would-be denials reported, but
    /// requests are allowed (to roll out new limits safely).
    #[serde(default)]
    pub shadow: bool,
}

impl Plan {
    /// Whether keys of `env` may be created and used on this plan.
    pub fn allows_environment(&self, env: &str) -> bool {
        self.environments.is_empty() || self.environments.iter().any(|e| e == env)
    }
}

/// How a product answers one deny reason.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DenialSpec {
    pub code: String,
    pub http_status: u16,
    pub message: String,
}

/// The JSON shape of a product's error body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorBodyStyle {
    /// `{"error":{"code","message"}}` (MsgFlash, MsGine).
    Nested,
    /// `{"error": message, "status", "code"}` (MailSage).
    Flat,
    /// `{"success":false,"error":{"code","message","httpStatus"}}` (MessageSmart).
    Envelope,
}

impl ErrorBodyStyle {
    /// Renders the error body for `spec`.
    pub fn render(self, spec: &DenialSpec) -> String {
        let value = match self {
            Self::Nested => json!({"error": {"code": spec.code, "message": spec.message}}),
            Self::Flat => {
                json!({"error": spec.message, "status": spec.http_status, "code": spec.code})
            }
            Self::Envelope => json!({
                "success": false,
                "error": {"code": spec.code, "message": spec.message, "httpStatus": spec.http_status}
            }),
        };
        value.to_string()
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeysSection {
    prefix: String,
    environments: Vec<String>,
    alphabet: Alphabet,
    body_length: usize,
    #[serde(default = "default_ttl")]
    default_ttl_seconds: u64,
    #[serde(default)]
    upstream_labels: Vec<String>,
    #[serde(default)]
    legacy: Option<crate::domain::legacy::LegacyKeys>,
}

fn default_ttl() -> u64 {
    DEFAULT_TTL_SECONDS
}

fn default_active() -> Vec<SubscriptionStatus> {
    vec![SubscriptionStatus::Active, SubscriptionStatus::Trialing]
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProfile {
    name: String,
    keys: KeysSection,
    default_surface: String,
    surfaces: BTreeMap<String, Surface>,
    default_plan: String,
    plans: BTreeMap<String, Plan>,
    #[serde(default = "default_active")]
    active_statuses: Vec<SubscriptionStatus>,
    error_body: ErrorBodyStyle,
    #[serde(default)]
    denials: BTreeMap<Reason, DenialSpec>,
    #[serde(default)]
    ratelimit: RateLimitSection,
    #[serde(default)]
    revocation: crate::domain::revocation::RevocationPolicy,
}

/// A profile that failed to load, naming the field at fault.
#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error("profile is not valid TOML for a profile: {0}")]
    Parse(#[from] toml::de::Error),
    #[error("profile field `{field}`: {message}")]
    Invalid { field: String, message: String },
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> ProfileError {
    ProfileError::Invalid {
        field: field.into(),
        message: message.into(),
    }
}

/// A validated profile.
#[derive(Debug, Clone)]
pub struct Profile {
    pub name: String,
    pub key_format: KeyFormat,
    /// Key lifetime when CreateKey gives none; `None` = never expires.
    pub default_ttl_seconds: Option<u64>,
    pub default_surface: String,
    pub surfaces: BTreeMap<String, Surface>,
    pub default_plan: String,
    pub plans: BTreeMap<String, Plan>,
    pub active_statuses: Vec<SubscriptionStatus>,
    pub error_body: ErrorBodyStyle,
    denials: BTreeMap<Reason, DenialSpec>,
    /// Key labels sent upstream on an allow (`keys.upstream_labels`): as
    /// `{header_prefix}label-{name}` through Envoy, in the principal's
    /// `labels` from Authenticate.
    pub upstream_labels: Vec<String>,
    /// Legacy keys accepted (`[keys.legacy]`): imported keys without
    /// Tollgate's checksum, looked up by their legacy digest. `None`: off.
    pub legacy_keys: Option<crate::domain::legacy::LegacyKeys>,
    /// Envoy rate-limit service descriptors (`[ratelimit]`).
    pub ratelimit: RateLimitConfig,
    /// Automatic revocation (`[revocation]`): the default policy of every
    /// tenant, which a tenant's override may change.
    pub revocation: crate::domain::revocation::RevocationPolicy,
}

impl Profile {
    /// The embedded default profile.
    pub fn embedded_default() -> Self {
        Self::from_toml(DEFAULT_PROFILE).expect("the embedded default profile is valid")
    }

    /// Parses and validates a profile. Deny reasons it leaves out are taken
    /// from the embedded default profile.
    pub fn from_toml(text: &str) -> Result<Self, ProfileError> {
        let raw: RawProfile = toml::from_str(text)?;
        let k = raw.keys;
        let key_format = KeyFormat::new(&k.prefix, &k.environments, k.alphabet, k.body_length)
            .map_err(|e| invalid("keys", e.to_string()))?;
        for (name, s) in &raw.surfaces {
            for h in &s.api_key_headers {
                let ok = !h.is_empty()
                    && h.bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
                if !ok {
                    return Err(invalid(
                        format!("surfaces.{name}.api_key_headers"),
                        "header names must be lower-case [a-z0-9-]",
                    ));
                }
            }
            check_envs(&key_format, &s.environments, &format!("surfaces.{name}"))?;
            for (reason, spec) in &s.denials {
                check_denial(
                    &format!("surfaces.{name}.denials.{}", reason.as_str()),
                    spec,
                )?;
            }
        }
        if let Some(bad) = k
            .upstream_labels
            .iter()
            .find(|n| !crate::domain::labels::is_label_name(n))
        {
            return Err(invalid(
                "keys.upstream_labels",
                format!("`{bad}` is not a label name ([a-z][a-z0-9_-], at most 63)"),
            ));
        }
        if let Some(legacy) = &k.legacy {
            legacy.check().map_err(|m| invalid("keys.legacy", m))?;
        }
        if !raw.surfaces.contains_key(&raw.default_surface) {
            return Err(invalid("default_surface", "names no surface"));
        }
        if raw.plans.is_empty() {
            return Err(invalid("plans", "at least one plan is needed"));
        }
        if !raw.plans.contains_key(&raw.default_plan) {
            return Err(invalid("default_plan", "names no plan"));
        }
        for (name, plan) in &raw.plans {
            let field = format!("plans.{name}");
            if !crate::domain::validate::is_valid_scope(name) {
                return Err(invalid(&field, "plan names must be [a-z0-9_.:-]"));
            }
            let mut v = crate::domain::Violations::default();
            crate::domain::validate::check_scopes(&format!("{field}.scopes"), &plan.scopes, &mut v);
            if let Some(first) = v.0.first() {
                return Err(invalid(&first.field, &first.description));
            }
            if let Some(defaults) = &plan.default_scopes {
                if let Some(s) = defaults.iter().find(|s| !plan.scopes.contains(s)) {
                    return Err(invalid(
                        format!("{field}.default_scopes"),
                        format!("`{s}` is not in the plan's scopes"),
                    ));
                }
            }
            check_envs(&key_format, &plan.environments, &field)?;
            for (i, l) in plan.limits.iter().enumerate() {
                let lf = format!("{field}.limits[{i}]");
                let mut v = crate::domain::Violations::default();
                l.check(&lf, &mut v);
                if let Some(first) = v.0.first() {
                    return Err(invalid(&first.field, &first.description));
                }
                check_envs(&key_format, &l.environments, &lf)?;
            }
        }
        if raw.active_statuses.is_empty() {
            return Err(invalid("active_statuses", "at least one status is needed"));
        }
        for (field, days) in [
            ("revocation.unused_days", raw.revocation.unused_days),
            ("revocation.max_age_days", raw.revocation.max_age_days),
        ] {
            let max = crate::domain::revocation::MAX_POLICY_DAYS;
            if days.is_some_and(|d| !(1..=max).contains(&d)) {
                return Err(invalid(
                    field,
                    format!("must be 1..={max} days (leave it out: off)"),
                ));
            }
        }
        let mut denials = raw.denials;
        if raw.name != "default" {
            for (reason, spec) in Self::embedded_default().denials {
                denials.entry(reason).or_insert(spec);
            }
        }
        for reason in Reason::ALL {
            let Some(spec) = denials.get(&reason) else {
                return Err(invalid(format!("denials.{}", reason.as_str()), "missing"));
            };
            check_denial(&format!("denials.{}", reason.as_str()), spec)?;
        }
        let ratelimit = RateLimitConfig::new(raw.ratelimit)
            .map_err(|(field, message)| invalid(field, message))?;
        Ok(Self {
            name: raw.name,
            key_format,
            default_ttl_seconds: (k.default_ttl_seconds > 0).then_some(k.default_ttl_seconds),
            default_surface: raw.default_surface,
            surfaces: raw.surfaces,
            default_plan: raw.default_plan,
            plans: raw.plans,
            active_statuses: raw.active_statuses,
            error_body: raw.error_body,
            denials,
            upstream_labels: k.upstream_labels,
            legacy_keys: k.legacy,
            ratelimit,
            revocation: raw.revocation,
        })
    }

    /// How this product answers `reason`.
    pub fn denial(&self, reason: Reason) -> &DenialSpec {
        self.denials
            .get(&reason)
            .expect("validated: every reason has a denial")
    }

    /// The product's error body for `reason`.
    pub fn denial_body(&self, reason: Reason) -> String {
        self.error_body.render(self.denial(reason))
    }

    /// How this product answers `reason` on the named surface (empty: the
    /// default one): the surface's own answer, else the profile's.
    pub fn denial_on(&self, surface: &str, reason: Reason) -> &DenialSpec {
        self.surface(surface)
            .and_then(|s| s.denials.get(&reason))
            .unwrap_or_else(|| self.denial(reason))
    }

    /// The product's error body for `reason` on the named surface.
    pub fn denial_body_on(&self, surface: &str, reason: Reason) -> String {
        self.error_body.render(self.denial_on(surface, reason))
    }

    /// The named plan.
    pub fn plan(&self, name: &str) -> Option<&Plan> {
        self.plans.get(name)
    }

    /// The named surface, or the default one for an empty name.
    pub fn surface(&self, name: &str) -> Option<&Surface> {
        let name = if name.is_empty() {
            &self.default_surface
        } else {
            name
        };
        self.surfaces.get(name)
    }

    /// Whether tenants in `status` may use the API.
    pub fn is_active(&self, status: SubscriptionStatus) -> bool {
        self.active_statuses.contains(&status)
    }
}

fn check_denial(field: &str, spec: &DenialSpec) -> Result<(), ProfileError> {
    if !(400..=599).contains(&spec.http_status) || spec.code.is_empty() {
        return Err(invalid(
            field,
            "needs a code and an http_status in 400..=599",
        ));
    }
    Ok(())
}

fn check_envs(format: &KeyFormat, envs: &[String], field: &str) -> Result<(), ProfileError> {
    match envs.iter().find(|e| !format.has_environment(e)) {
        Some(e) => Err(invalid(
            format!("{field}.environments"),
            format!("`{e}` is not one of keys.environments"),
        )),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_profile_is_valid() {
        let p = Profile::embedded_default();
        assert_eq!(p.key_format.prefix(), "tg");
        assert_eq!(p.default_ttl_seconds, Some(DEFAULT_TTL_SECONDS));
        for r in Reason::ALL {
            assert!(p.denial(r).http_status >= 400);
        }
    }

    #[test]
    fn body_shapes_match_the_reference_docs() {
        let spec = DenialSpec {
            code: "invalid_api_key".into(),
            http_status: 401,
            message: "Invalid API key provided".into(),
        };
        let flat: serde_json::Value =
            serde_json::from_str(&ErrorBodyStyle::Flat.render(&spec)).unwrap();
        assert_eq!(
            flat,
            json!({"error": "Invalid API key provided", "status": 401, "code": "invalid_api_key"})
        );
        let env: serde_json::Value =
            serde_json::from_str(&ErrorBodyStyle::Envelope.render(&spec)).unwrap();
        assert_eq!(env["success"], json!(false));
        assert_eq!(env["error"]["httpStatus"], json!(401));
    }

    #[test]
    fn errors_name_the_field() {
        let bad = DEFAULT_PROFILE.replace("default_plan = \"free\"", "default_plan = \"gold\"");
        let err = Profile::from_toml(&bad).unwrap_err().to_string();
        assert!(err.contains("default_plan"), "{err}");
    }
}

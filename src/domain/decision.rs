//! Decisions: allow with a principal, or deny with a stable reason.

use serde::{Deserialize, Serialize};

use super::{KeyId, SubscriptionStatus, TenantId};

/// Why a request is denied. Stable: products map each to their own code,
/// HTTP status and message in their profile.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Reason {
    CredentialMissing,
    CredentialMalformed,
    KeyUnknown,
    KeyExpired,
    KeyRevoked,
    TokenInvalid,
    TokenExpired,
    WrongCredentialForSurface,
    ScopeMissing,
    EnvironmentForbidden,
    SubscriptionInactive,
    RateLimited,
    QuotaExhausted,
}

impl Reason {
    /// Every reason.
    pub const ALL: [Reason; 13] = [
        Self::CredentialMissing,
        Self::CredentialMalformed,
        Self::KeyUnknown,
        Self::KeyExpired,
        Self::KeyRevoked,
        Self::TokenInvalid,
        Self::TokenExpired,
        Self::WrongCredentialForSurface,
        Self::ScopeMissing,
        Self::EnvironmentForbidden,
        Self::SubscriptionInactive,
        Self::RateLimited,
        Self::QuotaExhausted,
    ];

    /// The API spelling (`KEY_REVOKED`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::CredentialMissing => "CREDENTIAL_MISSING",
            Self::CredentialMalformed => "CREDENTIAL_MALFORMED",
            Self::KeyUnknown => "KEY_UNKNOWN",
            Self::KeyExpired => "KEY_EXPIRED",
            Self::KeyRevoked => "KEY_REVOKED",
            Self::TokenInvalid => "TOKEN_INVALID",
            Self::TokenExpired => "TOKEN_EXPIRED",
            Self::WrongCredentialForSurface => "WRONG_CREDENTIAL_FOR_SURFACE",
            Self::ScopeMissing => "SCOPE_MISSING",
            Self::EnvironmentForbidden => "ENVIRONMENT_FORBIDDEN",
            Self::SubscriptionInactive => "SUBSCRIPTION_INACTIVE",
            Self::RateLimited => "RATE_LIMITED",
            Self::QuotaExhausted => "QUOTA_EXHAUSTED",
        }
    }
}

/// How the caller proved who it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CredentialType {
    ApiKey,
    Jwt,
}

/// Who is calling, once authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub tenant_id: TenantId,
    pub key_id: Option<KeyId>,
    pub plan: String,
    pub environment: String,
    /// The scopes in force: the key's scopes that the plan still allows.
    pub scopes: Vec<String>,
    pub subject: String,
    pub credential_type: CredentialType,
    /// The tenant's subscription status (a surface or route that lets
    /// inactive tenants through tells the upstream which one it is).
    pub subscription: SubscriptionStatus,
    /// The key labels the profile sends upstream, each (name, value); the
    /// value is empty when the key lacks the label.
    pub labels: Vec<(String, String)>,
}

/// The answer to "may this credential make this call now?".
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow(Principal),
    Deny(Reason),
}

/// The state of one limit after a decision, for `RateLimit-*` headers and
/// CheckQuota answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitStatus {
    /// e.g. `key_per_second`, `tenant_per_month`.
    pub name: String,
    pub limit: u64,
    pub remaining: u64,
    pub reset_at: chrono::DateTime<chrono::Utc>,
    /// `second`, `minute`, `hour`, `day` or `month`.
    pub period: &'static str,
}

/// A decision with the limits that were evaluated for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub decision: Decision,
    /// Every limit that applied, tightest first.
    pub limits: Vec<LimitStatus>,
    /// Seconds until retrying can succeed (0 unless rate limited or out of quota).
    pub retry_after_seconds: u32,
    /// A denial that shadow mode turned into an allow (reported, not enforced).
    pub shadow_denial: Option<Reason>,
}

impl Verdict {
    /// A verdict with no limits evaluated.
    pub fn plain(decision: Decision) -> Self {
        Self {
            decision,
            limits: Vec::new(),
            retry_after_seconds: 0,
            shadow_denial: None,
        }
    }
}

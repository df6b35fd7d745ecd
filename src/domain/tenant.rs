//! Tenants (accounts): plan, subscription status and overrides.

use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// A tenant id: 1-64 characters of `[A-Za-z0-9_-]`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct TenantId(String);

impl TenantId {
    /// Parses a tenant id; `None` if it has the wrong shape.
    pub fn parse(s: &str) -> Option<Self> {
        let ok = (1..=64).contains(&s.len())
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        ok.then(|| Self(s.to_string()))
    }

    /// A new random id.
    pub fn generate() -> Self {
        Self(format!("ten_{}", uuid::Uuid::now_v7().simple()))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Display for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Billing state of a tenant. Which states may use the API is a profile
/// setting (`active_statuses`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SubscriptionStatus {
    Active,
    Trialing,
    PastDue,
    Canceled,
    Suspended,
}

impl SubscriptionStatus {
    /// Every status, in API order.
    pub const ALL: [SubscriptionStatus; 5] = [
        Self::Active,
        Self::Trialing,
        Self::PastDue,
        Self::Canceled,
        Self::Suspended,
    ];

    /// The API / database spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Trialing => "trialing",
            Self::PastDue => "past_due",
            Self::Canceled => "canceled",
            Self::Suspended => "suspended",
        }
    }

    /// Parses the API / database spelling.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.as_str() == s)
    }
}

/// Per-tenant replacements for plan settings (custom enterprise deals).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TenantOverrides {
    /// Replaces the plan's key cap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_keys: Option<u32>,
    /// Replaces the plan's allowed scopes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_scopes: Option<Vec<String>>,
    /// Replaces the plan's limits (custom enterprise limits).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<Vec<super::LimitSpec>>,
    /// Day of the month (1..=31) monthly quotas reset on; absent = the 1st.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub billing_day: Option<u32>,
}

/// A tenant as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tenant {
    pub id: TenantId,
    pub name: String,
    pub plan: String,
    pub status: SubscriptionStatus,
    pub overrides: TenantOverrides,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// A validated change to a tenant; `None` fields stay as they are.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TenantUpdate {
    pub name: Option<String>,
    pub plan: Option<String>,
    pub status: Option<SubscriptionStatus>,
    pub overrides: Option<TenantOverrides>,
    /// Set when the billing day moves the current month's start: its
    /// monthly usage is carried into the new period, never reset.
    pub carry_month_usage: Option<UsageCarry>,
}

/// Monthly quota usage of a tenant and its keys, carried from the period
/// starting `from` to the one starting `to` (the same moment under the new
/// billing day), in the transaction that moves the billing day.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UsageCarry {
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenant_ids() {
        assert!(TenantId::parse("acme-01_x").is_some());
        assert!(TenantId::parse("").is_none());
        assert!(TenantId::parse("a b").is_none());
        assert!(TenantId::parse(&"a".repeat(65)).is_none());
        assert!(TenantId::parse(TenantId::generate().as_str()).is_some());
    }

    #[test]
    fn statuses_round_trip() {
        for s in SubscriptionStatus::ALL {
            assert_eq!(SubscriptionStatus::parse(s.as_str()), Some(s));
        }
        assert_eq!(SubscriptionStatus::parse("Active"), None);
    }
}

//! Automatic revocation policies: which live keys a tenant's policy
//! revokes (unused for N days, older than N days, reported leaked), and
//! what a leak report is. Plain data: the store turns [`Criteria`] into
//! one SQL condition and the memory store into [`Criteria::matches`]; both
//! must agree.

use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};

use super::KeyRecord;

/// The longest policy period accepted, in days (ten years).
pub const MAX_POLICY_DAYS: u32 = 3660;

/// A tenant's effective policy (the profile's `[revocation]` section, with
/// the tenant's override applied). `None` / `false`: that rule is off.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RevocationPolicy {
    /// Revoke keys not used for this many days (counted from creation when
    /// never used).
    pub unused_days: Option<u32>,
    /// Revoke keys older than this many days.
    pub max_age_days: Option<u32>,
    /// Revoke keys reported leaked (else they are only flagged).
    pub revoke_leaked: bool,
}

/// A tenant's override of the profile's policy: `None` keeps the profile's
/// value, `Some(0)` days turns that rule off for the tenant.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PolicyOverride {
    pub unused_days: Option<u32>,
    pub max_age_days: Option<u32>,
    pub revoke_leaked: Option<bool>,
}

impl RevocationPolicy {
    /// This policy with `o` applied over it.
    pub fn with_override(&self, o: Option<&PolicyOverride>) -> RevocationPolicy {
        let Some(o) = o else { return *self };
        let days = |over: Option<u32>, base: Option<u32>| match over {
            Some(0) => None,
            Some(d) => Some(d),
            None => base,
        };
        RevocationPolicy {
            unused_days: days(o.unused_days, self.unused_days),
            max_age_days: days(o.max_age_days, self.max_age_days),
            revoke_leaked: o.revoke_leaked.unwrap_or(self.revoke_leaked),
        }
    }

    /// Whether any rule is on.
    pub fn is_active(&self) -> bool {
        self.unused_days.is_some() || self.max_age_days.is_some() || self.revoke_leaked
    }

    /// The conditions this policy revokes on at `now` (`None`: nothing).
    pub fn criteria(&self, now: DateTime<Utc>) -> Option<Criteria> {
        self.is_active().then(|| Criteria {
            now,
            unused_before: self.unused_days.map(|d| now - Duration::days(i64::from(d))),
            created_before: self
                .max_age_days
                .map(|d| now - Duration::days(i64::from(d))),
            leaked: self.revoke_leaked,
        })
    }
}

/// Which rule revoked a key, in the order they are tried: a leaked key is
/// revoked as leaked even if it is also old or unused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PolicyReason {
    ReportedLeaked,
    MaxAge,
    Unused,
}

impl PolicyReason {
    /// The API, audit and database spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ReportedLeaked => "reported_leaked",
            Self::MaxAge => "max_age",
            Self::Unused => "unused",
        }
    }

    /// The inverse of [`Self::as_str`].
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "reported_leaked" => Some(Self::ReportedLeaked),
            "max_age" => Some(Self::MaxAge),
            "unused" => Some(Self::Unused),
            _ => None,
        }
    }

    /// The `revoke_reason` a key revoked by this rule carries.
    pub fn revoke_reason(self) -> String {
        format!("policy:{}", self.as_str())
    }
}

/// The conditions of one tenant's policy at one instant. A key matches when
/// it is neither revoked nor expired at `now`, and: it was reported leaked
/// (when `leaked`), or it is not a rotated-out key in its grace period and
/// it was created before `created_before` or last used (else created)
/// before `unused_before`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Criteria {
    pub now: DateTime<Utc>,
    pub unused_before: Option<DateTime<Utc>>,
    pub created_before: Option<DateTime<Utc>>,
    pub leaked: bool,
}

impl Criteria {
    /// The rule `k` falls under, if any (`reported`: it was reported leaked).
    pub fn matches(&self, k: &KeyRecord, reported: bool) -> Option<PolicyReason> {
        if k.revoked_at.is_some() || k.expires_at.is_some_and(|e| e <= self.now) {
            return None;
        }
        if self.leaked && reported {
            return Some(PolicyReason::ReportedLeaked);
        }
        if k.replaced_by.is_some() {
            return None;
        }
        if self.created_before.is_some_and(|t| k.created_at < t) {
            return Some(PolicyReason::MaxAge);
        }
        let last = k.last_used_at.unwrap_or(k.created_at);
        if self.unused_before.is_some_and(|t| last < t) {
            return Some(PolicyReason::Unused);
        }
        None
    }
}

/// A key a policy revokes (or, in a dry run, would revoke).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyMatch {
    pub key: KeyRecord,
    pub reason: PolicyReason,
}

/// Where a leak report came from. Never holds the token itself.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LeakSource {
    /// The reporter: `github` for the partner endpoint, else the caller's
    /// own name for it (`ReportLeakedKeys`).
    pub reporter: String,
    /// Where the token was found (a URL), as reported; may be empty.
    pub url: String,
    /// The reporter's kind of source (`commit`, `issue`, …); may be empty.
    pub source: String,
}

/// What a leak report did to one of our keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeakOutcome {
    pub key: KeyRecord,
    /// The key had not been reported before.
    pub first_report: bool,
    /// This report revoked the key (the tenant's policy revokes leaked keys
    /// and the key was live).
    pub revoked: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(created: DateTime<Utc>, used: Option<DateTime<Utc>>) -> KeyRecord {
        KeyRecord {
            id: uuid::Uuid::now_v7(),
            tenant_id: crate::domain::TenantId::parse("acme").unwrap(),
            name: "k".into(),
            environment: "live".into(),
            scopes: vec![],
            hint: String::new(),
            digest: crate::domain::KeyDigest::from_slice(&[7; 32]).unwrap(),
            pepper_version: 1,
            created_at: created,
            expires_at: None,
            revoked_at: None,
            revoke_reason: None,
            last_used_at: used,
            replaced_by: None,
            limits: None,
            lineage_id: uuid::Uuid::nil(),
            labels: Default::default(),
            legacy: false,
        }
    }

    #[test]
    fn a_tenant_override_wins_and_zero_days_turns_a_rule_off() {
        let profile = RevocationPolicy {
            unused_days: Some(90),
            max_age_days: Some(365),
            revoke_leaked: false,
        };
        let o = PolicyOverride {
            unused_days: Some(30),
            max_age_days: Some(0),
            revoke_leaked: Some(true),
        };
        assert_eq!(
            profile.with_override(Some(&o)),
            RevocationPolicy {
                unused_days: Some(30),
                max_age_days: None,
                revoke_leaked: true
            }
        );
        assert_eq!(profile.with_override(None), profile);
        assert!(RevocationPolicy::default().criteria(Utc::now()).is_none());
    }

    #[test]
    fn each_rule_matches_only_what_it_names() {
        let now = Utc::now();
        let day = Duration::days(1);
        let c = RevocationPolicy {
            unused_days: Some(30),
            max_age_days: Some(100),
            revoke_leaked: true,
        }
        .criteria(now)
        .unwrap();
        let fresh = key(now - day * 10, None);
        assert_eq!(c.matches(&fresh, false), None);
        assert_eq!(c.matches(&fresh, true), Some(PolicyReason::ReportedLeaked));
        assert_eq!(
            c.matches(&key(now - day * 40, None), false),
            Some(PolicyReason::Unused)
        );
        assert_eq!(
            c.matches(&key(now - day * 40, Some(now - day)), false),
            None,
            "used recently"
        );
        assert_eq!(
            c.matches(&key(now - day * 101, Some(now - day)), false),
            Some(PolicyReason::MaxAge)
        );
        let mut revoked = key(now - day * 200, None);
        revoked.revoked_at = Some(now - day);
        assert_eq!(c.matches(&revoked, true), None);
        let mut rotated = key(now - day * 200, None);
        rotated.replaced_by = Some(uuid::Uuid::nil());
        assert_eq!(c.matches(&rotated, false), None);
        for r in [
            PolicyReason::ReportedLeaked,
            PolicyReason::MaxAge,
            PolicyReason::Unused,
        ] {
            assert_eq!(PolicyReason::parse(r.as_str()), Some(r));
        }
    }
}

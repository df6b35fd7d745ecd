//! Limit specifications: rate limits (second, minute, hour) and quotas
//! (day, month), per key or per tenant, from plans and overrides.

use serde::{Deserialize, Serialize};

/// Whose usage a limit counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LimitScope {
    Key,
    Tenant,
}

/// The period a limit is counted over. Second/minute/hour are rate limits
/// (GCRA, in memory); day/month are quotas (leased from Postgres).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LimitPeriod {
    Second,
    Minute,
    Hour,
    Day,
    Month,
}

impl LimitPeriod {
    /// The API spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Second => "second",
            Self::Minute => "minute",
            Self::Hour => "hour",
            Self::Day => "day",
            Self::Month => "month",
        }
    }

    /// Parses the API spelling.
    pub fn parse(s: &str) -> Option<Self> {
        [
            Self::Second,
            Self::Minute,
            Self::Hour,
            Self::Day,
            Self::Month,
        ]
        .into_iter()
        .find(|p| p.as_str() == s)
    }

    /// Length of a rate period in nanoseconds; `None` for quotas.
    pub fn rate_ns(self) -> Option<u64> {
        match self {
            Self::Second => Some(1_000_000_000),
            Self::Minute => Some(60_000_000_000),
            Self::Hour => Some(3_600_000_000_000),
            Self::Day | Self::Month => None,
        }
    }
}

/// One limit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitSpec {
    pub scope: LimitScope,
    pub period: LimitPeriod,
    /// Units per period (≥ 1).
    pub limit: u64,
    /// Rate limits only: units that may arrive at once (default: `limit`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u64>,
    /// Key environments this limit applies to; empty = all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub environments: Vec<String>,
}

impl LimitSpec {
    /// `key_per_second`, `tenant_per_month`, …
    pub fn name(&self) -> &'static str {
        use LimitPeriod::*;
        use LimitScope::*;
        match (self.scope, self.period) {
            (Key, Second) => "key_per_second",
            (Key, Minute) => "key_per_minute",
            (Key, Hour) => "key_per_hour",
            (Key, Day) => "key_per_day",
            (Key, Month) => "key_per_month",
            (Tenant, Second) => "tenant_per_second",
            (Tenant, Minute) => "tenant_per_minute",
            (Tenant, Hour) => "tenant_per_hour",
            (Tenant, Day) => "tenant_per_day",
            (Tenant, Month) => "tenant_per_month",
        }
    }

    /// Whether it applies to keys of `env`.
    pub fn applies_to(&self, env: &str) -> bool {
        self.environments.is_empty() || self.environments.iter().any(|e| e == env)
    }

    /// Checks shape; `field` prefixes violation names.
    pub fn check(&self, field: &str, v: &mut super::Violations) {
        if self.limit == 0 {
            v.add(format!("{field}.limit"), "must be ≥ 1");
        }
        if self.burst == Some(0) {
            v.add(format!("{field}.burst"), "must be ≥ 1");
        }
        if self.burst.is_some() && self.period.rate_ns().is_none() {
            v.add(
                format!("{field}.burst"),
                "applies to second/minute/hour limits only",
            );
        }
    }
}

/// Picks the limits in force: the key's own limits replace key-scoped ones,
/// the tenant's override list replaces the plan's, and only those for the
/// key's environment apply. `env` is `None` for tenant-only checks.
pub fn effective<'a>(
    plan: &'a [LimitSpec],
    tenant_override: Option<&'a [LimitSpec]>,
    key_override: Option<&'a [LimitSpec]>,
    env: Option<&str>,
) -> Vec<&'a LimitSpec> {
    let base = tenant_override.unwrap_or(plan);
    let key_limits = key_override
        .filter(|k| !k.is_empty())
        .unwrap_or(base)
        .iter()
        .filter(|l| l.scope == LimitScope::Key);
    let tenant_limits = base.iter().filter(|l| l.scope == LimitScope::Tenant);
    let keyed: Vec<&LimitSpec> = if env.is_some() {
        key_limits.collect()
    } else {
        Vec::new()
    };
    keyed
        .into_iter()
        .chain(tenant_limits)
        .filter(|l| match env {
            Some(e) => l.applies_to(e),
            // Without a key there is no environment: only limits for all
            // environments apply.
            None => l.environments.is_empty(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(scope: LimitScope, period: LimitPeriod, limit: u64, envs: &[&str]) -> LimitSpec {
        LimitSpec {
            scope,
            period,
            limit,
            burst: None,
            environments: envs.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn key_overrides_replace_key_limits_and_keep_tenant_limits() {
        use LimitPeriod::*;
        use LimitScope::*;
        let plan = vec![
            spec(Key, Minute, 100, &["live"]),
            spec(Key, Minute, 1000, &["test"]),
            spec(Tenant, Month, 10_000, &[]),
        ];
        let live: Vec<u64> = effective(&plan, None, None, Some("live"))
            .iter()
            .map(|l| l.limit)
            .collect();
        assert_eq!(live, vec![100, 10_000]);
        let test: Vec<u64> = effective(&plan, None, None, Some("test"))
            .iter()
            .map(|l| l.limit)
            .collect();
        assert_eq!(test, vec![1000, 10_000]);
        let own = vec![spec(Key, Day, 5, &[])];
        let with_own: Vec<u64> = effective(&plan, None, Some(&own), Some("live"))
            .iter()
            .map(|l| l.limit)
            .collect();
        assert_eq!(with_own, vec![5, 10_000]);
        let tenant_only: Vec<u64> = effective(&plan, None, None, None)
            .iter()
            .map(|l| l.limit)
            .collect();
        assert_eq!(tenant_only, vec![10_000]);
        let custom = vec![spec(Tenant, Month, 1_000_000, &[])];
        let enterprise: Vec<u64> = effective(&plan, Some(&custom), None, Some("live"))
            .iter()
            .map(|l| l.limit)
            .collect();
        assert_eq!(enterprise, vec![1_000_000]);
    }
}

//! Limit specifications: rate limits (second, minute, hour) and quotas
//! (day, month), per key or per tenant, from plans and overrides.

use std::borrow::Cow;

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

/// Whether `a` and `b` count the same thing: same scope, period and
/// environments. Limits in one slot compose to the tightest of them.
fn same_slot(a: &LimitSpec, b: &LimitSpec) -> bool {
    fn envs(l: &LimitSpec) -> Vec<&str> {
        let mut e: Vec<&str> = l.environments.iter().map(String::as_str).collect();
        e.sort_unstable();
        e.dedup();
        e
    }
    a.scope == b.scope && a.period == b.period && envs(a) == envs(b)
}

/// Units that may arrive at once under `l`.
fn burst_of(l: &LimitSpec) -> u64 {
    l.burst.unwrap_or(l.limit)
}

/// `base` tightened by `own` (same slot): the lower limit and the lower burst.
fn tightest(base: &LimitSpec, own: &LimitSpec) -> LimitSpec {
    let limit = base.limit.min(own.limit);
    let burst = burst_of(base).min(burst_of(own));
    LimitSpec {
        limit,
        burst: (burst != limit).then_some(burst),
        ..base.clone()
    }
}

/// Picks the limits in force for a key of environment `env` (`None`: the
/// tenant alone, when only limits for every environment apply).
///
/// Limits compose by slot (scope, period, environments): the plan sets
/// every slot; the tenant's override (the operator's deal) replaces the
/// plan's limit in the slots it names and keeps the others; a key's own
/// limits only tighten: in a slot the plan or tenant sets, the tighter of
/// the two is in force, and a slot only the key sets is added. Whatever the
/// key does not set, the plan and tenant still set. Key-scoped limits come
/// first.
pub fn effective<'a>(
    plan: &'a [LimitSpec],
    tenant_override: Option<&'a [LimitSpec]>,
    key_limits: Option<&'a [LimitSpec]>,
    env: Option<&str>,
) -> Vec<Cow<'a, LimitSpec>> {
    let overrides = tenant_override.unwrap_or(&[]);
    let applies = |l: &LimitSpec| match env {
        Some(e) => l.applies_to(e),
        // Without a key there is no environment and no key limit.
        None => l.scope == LimitScope::Tenant && l.environments.is_empty(),
    };
    let mut out: Vec<Cow<'a, LimitSpec>> = plan
        .iter()
        .filter(|p| !overrides.iter().any(|o| same_slot(o, p)))
        .chain(overrides)
        .filter(|l| applies(l))
        .map(Cow::Borrowed)
        .collect();
    let own = key_limits
        .unwrap_or(&[])
        .iter()
        .filter(|k| k.scope == LimitScope::Key && env.is_some() && applies(k));
    for k in own {
        match out.iter_mut().find(|l| same_slot(l, k)) {
            Some(l) => {
                let t = tightest(l, k);
                if t != **l {
                    *l = Cow::Owned(t);
                }
            }
            None => out.push(Cow::Borrowed(k)),
        }
    }
    out.sort_by_key(|l| l.scope != LimitScope::Key);
    out
}

/// Checks that a key's own `limits` only tighten what is in force for keys
/// of `env` under `plan` and `tenant_override`: a limit or burst above one in
/// force in the same scope and period is refused, naming the field
/// (`field[i].limit`, `field[i].burst`). Loosening is the operator's, through
/// the tenant's overrides.
pub fn check_tightens(
    plan: &[LimitSpec],
    tenant_override: Option<&[LimitSpec]>,
    env: &str,
    field: &str,
    limits: &[LimitSpec],
    v: &mut super::Violations,
) {
    let base = effective(plan, tenant_override, None, Some(env));
    for (i, own) in limits.iter().enumerate() {
        if !own.applies_to(env) {
            continue;
        }
        let same = base
            .iter()
            .filter(|b| b.scope == own.scope && b.period == own.period);
        for b in same {
            if own.limit > b.limit {
                v.add(
                    format!("{field}[{i}].limit"),
                    format!(
                        "must be at most {} ({} in force): a key's own limits only \
                         tighten; raising one is the operator's, through the tenant's \
                         overrides",
                        b.limit,
                        b.name()
                    ),
                );
                break;
            }
            if burst_of(own) > burst_of(b) {
                v.add(
                    format!("{field}[{i}].burst"),
                    format!(
                        "must be at most {} (the burst of {} in force): a key's own \
                         limits only tighten",
                        burst_of(b),
                        b.name()
                    ),
                );
                break;
            }
        }
    }
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

    fn limits(v: Vec<Cow<'_, LimitSpec>>) -> Vec<(LimitScope, LimitPeriod, u64)> {
        v.iter().map(|l| (l.scope, l.period, l.limit)).collect()
    }

    #[test]
    fn key_limits_tighten_the_plan_and_keep_what_they_do_not_set() {
        use LimitPeriod::*;
        use LimitScope::*;
        let plan = vec![
            spec(Key, Minute, 100, &["live"]),
            spec(Key, Minute, 1000, &["test"]),
            spec(Tenant, Month, 10_000, &[]),
        ];
        assert_eq!(
            limits(effective(&plan, None, None, Some("live"))),
            vec![(Key, Minute, 100), (Tenant, Month, 10_000)]
        );
        assert_eq!(
            limits(effective(&plan, None, None, Some("test"))),
            vec![(Key, Minute, 1000), (Tenant, Month, 10_000)]
        );
        // A key's own quota adds to the plan's rate, it does not replace it.
        let own = vec![spec(Key, Day, 5, &[])];
        assert_eq!(
            limits(effective(&plan, None, Some(&own), Some("live"))),
            vec![(Key, Minute, 100), (Key, Day, 5), (Tenant, Month, 10_000)]
        );
        // In the same slot the tighter wins, either way round.
        let own = vec![spec(Key, Minute, 10, &["live"])];
        assert_eq!(
            limits(effective(&plan, None, Some(&own), Some("live"))),
            vec![(Key, Minute, 10), (Tenant, Month, 10_000)]
        );
        let own = vec![spec(Key, Minute, 1_000_000_000, &["live"])];
        assert_eq!(
            limits(effective(&plan, None, Some(&own), Some("live"))),
            vec![(Key, Minute, 100), (Tenant, Month, 10_000)]
        );
        // A limit for test keys on a live key changes nothing.
        let own = vec![spec(Key, Minute, 5, &["test"])];
        assert_eq!(
            limits(effective(&plan, None, Some(&own), Some("live"))),
            vec![(Key, Minute, 100), (Tenant, Month, 10_000)]
        );
        assert_eq!(
            limits(effective(&plan, None, None, None)),
            vec![(Tenant, Month, 10_000)]
        );
        // The tenant's override replaces the plan in the slots it names only.
        let custom = vec![spec(Tenant, Month, 1_000_000, &[])];
        assert_eq!(
            limits(effective(&plan, Some(&custom), None, Some("live"))),
            vec![(Key, Minute, 100), (Tenant, Month, 1_000_000)]
        );
    }

    #[test]
    fn a_key_limit_above_the_one_in_force_is_refused_naming_the_field() {
        use LimitPeriod::*;
        use LimitScope::*;
        let plan = vec![spec(Key, Second, 10, &[])];
        let mut v = crate::domain::Violations::default();
        let mut loose_burst = spec(Key, Second, 5, &[]);
        loose_burst.burst = Some(50);
        let own = vec![
            spec(Key, Second, 1_000_000_000, &[]),
            loose_burst,
            spec(Key, Second, 5, &[]),
            spec(Key, Day, 1000, &[]),
            spec(Key, Second, 1000, &["test"]),
        ];
        check_tightens(&plan, None, "live", "limits", &own, &mut v);
        let fields: Vec<&str> = v.0.iter().map(|f| f.field.as_str()).collect();
        assert_eq!(fields, vec!["limits[0].limit", "limits[1].burst"]);
    }
}

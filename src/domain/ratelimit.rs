//! Envoy rate-limit descriptors and the profile's `[ratelimit]` section,
//! in the spirit of envoyproxy/ratelimit's configuration: domains holding
//! nested `key`/`value` descriptors, each with a `rate_limit` of
//! `requests_per_unit` per `unit` (or `unlimited`) and an optional
//! `shadow_mode`. Plain data and the matching rule; no tonic.
//!
//! Which limit a request descriptor gets ([`RateLimitConfig::classify`]):
//! - one entry keyed `tenant_id`, `key_id` or `api_key`: Tollgate's own
//!   limits of that tenant, key (with its tenant's) or credential;
//! - otherwise the profile's descriptor tree for the request's domain,
//!   matched as envoyproxy/ratelimit does: at each level an entry matches
//!   `key` + `value` first, then a `value` ending in `*` by prefix, then a
//!   descriptor with `key` alone (every value its own bucket); the limit is
//!   the one of the node matched by the *last* entry; anything else
//!   (unknown domain or key, a request deeper or shallower than the tree)
//!   is not limited.

use std::collections::HashMap;

use serde::Deserialize;

use super::LimitPeriod;

/// Descriptor keys that name Tollgate's own subjects.
pub const RESERVED_KEYS: [&str; 3] = ["tenant_id", "key_id", "api_key"];

/// The profile's `[ratelimit]` section, as written.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitSection {
    /// Add `RateLimit-Limit`, `RateLimit-Remaining` and `RateLimit-Reset`
    /// to every answer that applied a limit (envoyproxy/ratelimit's
    /// `LIMIT_RESPONSE_HEADERS_ENABLED`). Default: true.
    #[serde(default = "yes")]
    pub response_headers: bool,
    #[serde(default)]
    pub domains: Vec<DomainSpec>,
}

impl Default for RateLimitSection {
    fn default() -> Self {
        Self {
            response_headers: true,
            domains: Vec::new(),
        }
    }
}

fn yes() -> bool {
    true
}

/// One domain (one envoyproxy/ratelimit config file).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DomainSpec {
    pub domain: String,
    #[serde(default)]
    pub descriptors: Vec<DescriptorSpec>,
}

/// One descriptor node, as written.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DescriptorSpec {
    pub key: String,
    /// Absent: every value of `key` is its own bucket. Ending in `*`: a
    /// prefix (`/api/*`), counted as one bucket per matching value.
    #[serde(default)]
    pub value: Option<String>,
    #[serde(default)]
    pub rate_limit: Option<RateLimitSpec>,
    /// Evaluate and report, never refuse.
    #[serde(default)]
    pub shadow_mode: bool,
    #[serde(default)]
    pub descriptors: Vec<DescriptorSpec>,
}

/// A descriptor's limit, as written.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitSpec {
    #[serde(default)]
    pub unit: Option<String>,
    #[serde(default)]
    pub requests_per_unit: Option<u32>,
    /// Matches, and is never limited.
    #[serde(default)]
    pub unlimited: bool,
    /// Reported as the limit's name.
    #[serde(default)]
    pub name: Option<String>,
}

/// A limit a descriptor node carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DescriptorLimit {
    Unlimited,
    Rate {
        requests_per_unit: u32,
        /// Second, minute or hour.
        unit: LimitPeriod,
        name: Option<String>,
    },
}

#[derive(Debug, Default, Clone)]
struct Level {
    /// key → value → node.
    exact: HashMap<String, HashMap<String, Node>>,
    /// (key, value prefix, node), in declared order.
    prefixed: Vec<(String, String, Node)>,
    /// key → node for descriptors without a value.
    any: HashMap<String, Node>,
}

#[derive(Debug, Clone)]
struct Node {
    limit: Option<DescriptorLimit>,
    shadow: bool,
    children: Level,
}

/// The validated `[ratelimit]` section.
#[derive(Debug, Clone, Default)]
pub struct RateLimitConfig {
    /// See [`RateLimitSection::response_headers`].
    pub response_headers: bool,
    domains: HashMap<String, Level>,
}

/// The limit a generic descriptor matched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Matched<'c> {
    pub limit: &'c DescriptorLimit,
    pub shadow: bool,
}

/// Whose limit a request descriptor asks about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target<'r, 'c> {
    Tenant(&'r str),
    Key(&'r str),
    /// A raw API key (a `Bearer ` prefix is removed).
    Credential(&'r str),
    /// A profile descriptor; `None`: nothing matched, not limited.
    Generic(Option<Matched<'c>>),
}

impl<'r> Target<'r, '_> {
    /// Whether anyone may ask about it: a credential proves itself (as in
    /// ext_authz), and a descriptor no limit matches spends nothing. A
    /// tenant or key named by id, or a profile descriptor's values (the
    /// gateway's claims), spend others' limits: only callers allowed to do
    /// that (the gateway, the operator) may ask.
    pub fn speaks_for_itself(&self) -> bool {
        matches!(self, Target::Credential(_) | Target::Generic(None))
    }
}

impl RateLimitConfig {
    /// Validates the section; `Err` names the field and what is wrong.
    pub fn new(section: RateLimitSection) -> Result<Self, (String, String)> {
        let mut domains = HashMap::new();
        for (i, d) in section.domains.into_iter().enumerate() {
            let field = format!("ratelimit.domains[{i}]");
            if d.domain.trim().is_empty() {
                return Err((format!("{field}.domain"), "must not be empty".into()));
            }
            if domains.contains_key(&d.domain) {
                return Err((
                    format!("{field}.domain"),
                    format!("`{}` is declared twice", d.domain),
                ));
            }
            let level = level(&d.descriptors, &format!("{field}.descriptors"), true)?;
            domains.insert(d.domain, level);
        }
        Ok(Self {
            response_headers: section.response_headers,
            domains,
        })
    }

    /// What `entries` (key, value) of a descriptor in `domain` is limited by.
    pub fn classify<'r>(&self, domain: &str, entries: &[(&'r str, &'r str)]) -> Target<'r, '_> {
        if let [(key, value)] = entries {
            match *key {
                "tenant_id" => return Target::Tenant(value),
                "key_id" => return Target::Key(value),
                "api_key" => return Target::Credential(strip_bearer(value)),
                _ => {}
            }
        }
        Target::Generic(self.find(domain, entries))
    }

    fn find(&self, domain: &str, entries: &[(&str, &str)]) -> Option<Matched<'_>> {
        let mut level = self.domains.get(domain)?;
        let last = entries.len().checked_sub(1)?;
        for (i, (key, value)) in entries.iter().enumerate() {
            let node = level
                .exact
                .get(*key)
                .and_then(|values| values.get(*value))
                .or_else(|| {
                    level
                        .prefixed
                        .iter()
                        .find(|(k, prefix, _)| k == key && value.starts_with(prefix.as_str()))
                        .map(|(_, _, n)| n)
                })
                .or_else(|| level.any.get(*key))?;
            if i == last {
                return node.limit.as_ref().map(|limit| Matched {
                    limit,
                    shadow: node.shadow,
                });
            }
            level = &node.children;
        }
        None
    }
}

fn strip_bearer(value: &str) -> &str {
    let v = value.trim();
    match v.split_once(' ') {
        Some((scheme, rest)) if scheme.eq_ignore_ascii_case("bearer") => rest.trim(),
        _ => v,
    }
}

fn level(specs: &[DescriptorSpec], field: &str, top: bool) -> Result<Level, (String, String)> {
    let mut out = Level::default();
    for (i, d) in specs.iter().enumerate() {
        let f = format!("{field}[{i}]");
        if d.key.is_empty() {
            return Err((format!("{f}.key"), "must not be empty".into()));
        }
        if top && RESERVED_KEYS.contains(&d.key.as_str()) {
            return Err((
                format!("{f}.key"),
                format!(
                    "`{}` is Tollgate's own descriptor (its plan's limits); use another key",
                    d.key
                ),
            ));
        }
        let node = Node {
            limit: d
                .rate_limit
                .as_ref()
                .map(|l| limit(l, &format!("{f}.rate_limit")))
                .transpose()?,
            shadow: d.shadow_mode,
            children: level(&d.descriptors, &format!("{f}.descriptors"), false)?,
        };
        let twice = || {
            Err((
                f.clone(),
                "the same key and value are declared twice".into(),
            ))
        };
        match d.value.as_deref() {
            None => {
                if out.any.insert(d.key.clone(), node).is_some() {
                    return twice();
                }
            }
            Some(v) if v.ends_with('*') => {
                let prefix = v.trim_end_matches('*').to_string();
                if out
                    .prefixed
                    .iter()
                    .any(|(k, p, _)| *k == d.key && *p == prefix)
                {
                    return twice();
                }
                out.prefixed.push((d.key.clone(), prefix, node));
            }
            Some(v) => {
                let values = out.exact.entry(d.key.clone()).or_default();
                if values.insert(v.to_string(), node).is_some() {
                    return twice();
                }
            }
        }
    }
    Ok(out)
}

fn limit(spec: &RateLimitSpec, field: &str) -> Result<DescriptorLimit, (String, String)> {
    if spec.unlimited {
        if spec.unit.is_some() || spec.requests_per_unit.is_some() {
            return Err((
                field.to_string(),
                "`unlimited` takes no `unit` or `requests_per_unit`".into(),
            ));
        }
        return Ok(DescriptorLimit::Unlimited);
    }
    let unit = spec
        .unit
        .as_deref()
        .unwrap_or_default()
        .to_ascii_lowercase();
    let unit = LimitPeriod::parse(&unit)
        .filter(|p| p.rate_ns().is_some())
        .ok_or_else(|| {
            (
                format!("{field}.unit"),
                "must be second, minute or hour (day and month are Tollgate quotas: \
                 give them to tenants and keys in a plan)"
                    .to_string(),
            )
        })?;
    let requests_per_unit = spec
        .requests_per_unit
        .filter(|n| *n >= 1)
        .ok_or_else(|| (format!("{field}.requests_per_unit"), "must be ≥ 1".into()))?;
    Ok(DescriptorLimit::Rate {
        requests_per_unit,
        unit,
        name: spec.name.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(toml_text: &str) -> Result<RateLimitConfig, (String, String)> {
        #[derive(Deserialize)]
        struct Wrap {
            ratelimit: RateLimitSection,
        }
        let w: Wrap = toml::from_str(toml_text).expect("valid TOML");
        RateLimitConfig::new(w.ratelimit)
    }

    const EDGE: &str = r#"
        [[ratelimit.domains]]
        domain = "edge"
        [[ratelimit.domains.descriptors]]
        key = "remote_address"
        rate_limit = { unit = "minute", requests_per_unit = 60 }
        [[ratelimit.domains.descriptors]]
        key = "path"
        value = "/slow"
        rate_limit = { unit = "second", requests_per_unit = 1 }
        shadow_mode = true
        [[ratelimit.domains.descriptors]]
        key = "path"
        value = "/api/*"
        rate_limit = { unit = "hour", requests_per_unit = 5, name = "api" }
        [[ratelimit.domains.descriptors]]
        key = "path"
        rate_limit = { unlimited = true }
        [[ratelimit.domains.descriptors]]
        key = "plan"
        value = "free"
        [[ratelimit.domains.descriptors.descriptors]]
        key = "remote_address"
        rate_limit = { unit = "second", requests_per_unit = 2 }
    "#;

    fn rate(target: Target<'_, '_>) -> Option<(u32, LimitPeriod, bool)> {
        match target {
            Target::Generic(Some(Matched {
                limit:
                    DescriptorLimit::Rate {
                        requests_per_unit,
                        unit,
                        ..
                    },
                shadow,
            })) => Some((*requests_per_unit, *unit, shadow)),
            _ => None,
        }
    }

    #[test]
    fn descriptors_match_value_then_prefix_then_key_at_the_depth_of_the_request() {
        let c = config(EDGE).unwrap();
        let m = |entries: &[(&str, &str)]| rate(c.classify("edge", entries));
        assert_eq!(
            m(&[("remote_address", "10.0.0.1")]),
            Some((60, LimitPeriod::Minute, false))
        );
        assert_eq!(
            m(&[("path", "/slow")]),
            Some((1, LimitPeriod::Second, true))
        );
        assert_eq!(
            m(&[("path", "/api/x")]),
            Some((5, LimitPeriod::Hour, false))
        );
        assert!(matches!(
            c.classify("edge", &[("path", "/other")]),
            Target::Generic(Some(Matched {
                limit: DescriptorLimit::Unlimited,
                ..
            }))
        ));
        assert_eq!(
            m(&[("plan", "free"), ("remote_address", "10.0.0.1")]),
            Some((2, LimitPeriod::Second, false))
        );
        // Not limited: the node without a limit, a deeper request than the
        // tree, an unknown value or key or domain, an empty descriptor.
        for entries in [
            &[("plan", "free")][..],
            &[("remote_address", "10.0.0.1"), ("path", "/")][..],
            &[("plan", "pro"), ("remote_address", "10.0.0.1")][..],
            &[("user", "u")][..],
            &[][..],
        ] {
            assert_eq!(
                c.classify("edge", entries),
                Target::Generic(None),
                "{entries:?}"
            );
        }
        assert_eq!(
            c.classify("other", &[("remote_address", "1")]),
            Target::Generic(None)
        );
    }

    #[test]
    fn tollgate_descriptors_are_one_reserved_entry_in_any_domain() {
        let c = config(EDGE).unwrap();
        assert_eq!(
            c.classify("x", &[("tenant_id", "acme")]),
            Target::Tenant("acme")
        );
        assert_eq!(c.classify("edge", &[("key_id", "k")]), Target::Key("k"));
        assert_eq!(
            c.classify("edge", &[("api_key", "Bearer tg_live_x")]),
            Target::Credential("tg_live_x")
        );
        assert!(!Target::Tenant("a").speaks_for_itself());
        assert!(!Target::Key("k").speaks_for_itself());
        assert!(Target::Credential("a").speaks_for_itself());
        assert!(Target::Generic(None).speaks_for_itself());
        assert_eq!(
            c.classify("edge", &[("tenant_id", "acme"), ("path", "/")]),
            Target::Generic(None),
            "with more entries it is a generic descriptor"
        );
    }

    #[test]
    fn a_bad_ratelimit_section_names_the_field() {
        let bad = |text: &str, field: &str| {
            let (f, _) = config(text).unwrap_err();
            assert_eq!(f, field, "{text}");
        };
        let one = |body: &str| {
            format!(
                "[[ratelimit.domains]]\ndomain = \"d\"\n[[ratelimit.domains.descriptors]]\n{body}"
            )
        };
        bad(
            &one("key = \"a\"\nrate_limit = { unit = \"day\", requests_per_unit = 1 }"),
            "ratelimit.domains[0].descriptors[0].rate_limit.unit",
        );
        bad(
            &one("key = \"a\"\nrate_limit = { unit = \"second\", requests_per_unit = 0 }"),
            "ratelimit.domains[0].descriptors[0].rate_limit.requests_per_unit",
        );
        bad(
            &one("key = \"a\"\nrate_limit = { unlimited = true, unit = \"second\" }"),
            "ratelimit.domains[0].descriptors[0].rate_limit",
        );
        bad(
            &one("key = \"tenant_id\""),
            "ratelimit.domains[0].descriptors[0].key",
        );
        bad(
            &format!(
                "{}\n[[ratelimit.domains.descriptors]]\nkey = \"a\"",
                one("key = \"a\"")
            ),
            "ratelimit.domains[0].descriptors[1]",
        );
        bad(
            "[[ratelimit.domains]]\ndomain = \"d\"\n[[ratelimit.domains]]\ndomain = \"d\"",
            "ratelimit.domains[1].domain",
        );
        assert!(
            config(&one("key = \"a\"")).is_ok(),
            "a node without a limit"
        );
    }
}

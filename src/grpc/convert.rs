//! Proto ↔ domain conversions.

use chrono::{DateTime, Utc};

use super::pb;
use crate::domain::{
    CredentialType, KeyRecord, LimitPeriod, LimitScope, LimitSpec, LimitStatus, Principal, Reason,
    Tenant, TenantOverrides, Violations,
};
use crate::error::Error;
use crate::profile::{Profile, SubscriptionGate};

/// A timestamp for the wire.
pub fn ts(t: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: t.timestamp_subsec_nanos() as i32,
    }
}

/// A timestamp from the wire; `None` if out of range.
pub fn from_ts(t: &prost_types::Timestamp) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp(t.seconds, u32::try_from(t.nanos).ok()?)
}

pub fn api_key(k: &KeyRecord) -> pb::ApiKey {
    pb::ApiKey {
        key_id: k.id.to_string(),
        tenant_id: k.tenant_id.to_string(),
        name: k.name.clone(),
        environment: k.environment.clone(),
        scopes: k.scopes.clone(),
        hint: k.hint.clone(),
        created_at: Some(ts(k.created_at)),
        expires_at: k.expires_at.map(ts),
        revoked_at: k.revoked_at.map(ts),
        last_used_at: k.last_used_at.map(ts),
        revoke_reason: k.revoke_reason.clone().unwrap_or_default(),
        replaced_by: k.replaced_by.map(|id| id.to_string()).unwrap_or_default(),
        limits: k.limits.iter().flatten().map(limit_spec).collect(),
        labels: k
            .labels
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect(),
        format: if k.legacy { "legacy" } else { "tollgate" }.into(),
    }
}

pub fn overrides(o: &TenantOverrides) -> pb::TenantOverrides {
    pb::TenantOverrides {
        max_keys: o.max_keys,
        allowed_scopes: o.allowed_scopes.clone().unwrap_or_default(),
        limits: o.limits.iter().flatten().map(limit_spec).collect(),
        billing_day: o.billing_day,
    }
}

/// Overrides from the wire; bad limit specs are reported under `field`.
pub fn overrides_from(field: &str, o: pb::TenantOverrides, v: &mut Violations) -> TenantOverrides {
    let limits = limit_specs_from(&format!("{field}.limits"), o.limits, v);
    TenantOverrides {
        max_keys: o.max_keys,
        allowed_scopes: (!o.allowed_scopes.is_empty()).then_some(o.allowed_scopes),
        limits: (!limits.is_empty()).then_some(limits),
        billing_day: o.billing_day,
    }
}

pub fn limit_spec(l: &LimitSpec) -> pb::LimitSpec {
    pb::LimitSpec {
        scope: match l.scope {
            LimitScope::Key => "key",
            LimitScope::Tenant => "tenant",
        }
        .to_string(),
        period: l.period.as_str().to_string(),
        limit: l.limit,
        burst: l.burst.unwrap_or(0),
        environments: l.environments.clone(),
    }
}

/// Limit specs from the wire; unknown scopes or periods are reported as
/// `{field}[i].scope` / `.period`.
pub fn limit_specs_from(
    field: &str,
    specs: Vec<pb::LimitSpec>,
    v: &mut Violations,
) -> Vec<LimitSpec> {
    let mut out = Vec::with_capacity(specs.len());
    for (i, s) in specs.into_iter().enumerate() {
        let scope = match s.scope.as_str() {
            "key" => Some(LimitScope::Key),
            "tenant" => Some(LimitScope::Tenant),
            _ => {
                v.add(format!("{field}[{i}].scope"), "must be key or tenant");
                None
            }
        };
        let period = LimitPeriod::parse(&s.period);
        if period.is_none() {
            v.add(
                format!("{field}[{i}].period"),
                "must be second, minute, hour, day or month",
            );
        }
        if let (Some(scope), Some(period)) = (scope, period) {
            out.push(LimitSpec {
                scope,
                period,
                limit: s.limit,
                burst: (s.burst > 0).then_some(s.burst),
                environments: s.environments,
            });
        }
    }
    out
}

pub fn tenant(t: &Tenant) -> pb::Tenant {
    pb::Tenant {
        tenant_id: t.id.to_string(),
        name: t.name.clone(),
        plan: t.plan.clone(),
        subscription_status: t.status.as_str().to_string(),
        overrides: Some(overrides(&t.overrides)),
        created_at: Some(ts(t.created_at)),
        updated_at: Some(ts(t.updated_at)),
    }
}

pub fn principal(p: &Principal) -> pb::Principal {
    pb::Principal {
        tenant_id: p.tenant_id.to_string(),
        key_id: p.key_id.map(|id| id.to_string()).unwrap_or_default(),
        plan: p.plan.clone(),
        environment: p.environment.clone(),
        scopes: p.scopes.clone(),
        subject: p.subject.clone(),
        credential_type: match p.credential_type {
            CredentialType::ApiKey => pb::CredentialType::ApiKey,
            CredentialType::Jwt => pb::CredentialType::Jwt,
        } as i32,
        subscription_status: p.subscription.as_str().to_string(),
        labels: p
            .labels
            .iter()
            .filter(|(_, v)| !v.is_empty())
            .cloned()
            .collect(),
    }
}

/// The denial as the product documents it.
pub fn denial(profile: &Profile, reason: Reason, retry_after_seconds: u32) -> pb::Denial {
    denial_on(profile, "", reason, retry_after_seconds)
}

/// The denial as the product answers it on `surface` (empty: the default).
pub fn denial_on(
    profile: &Profile,
    surface: &str,
    reason: Reason,
    retry_after_seconds: u32,
) -> pb::Denial {
    let spec = profile.denial_on(surface, reason);
    pb::Denial {
        reason: reason.as_str().to_string(),
        code: spec.code.clone(),
        http_status: u32::from(spec.http_status),
        message: spec.message.clone(),
        retry_after_seconds,
        body: profile.denial_body_on(surface, reason),
    }
}

/// A request's `subscription` policy: empty = the surface's.
pub fn subscription_gate(s: &str) -> Result<Option<SubscriptionGate>, Error> {
    if s.is_empty() {
        return Ok(None);
    }
    SubscriptionGate::parse(s)
        .map(Some)
        .ok_or_else(|| Error::invalid("subscription", "must be `required` or `optional`"))
}

pub fn limit(l: &LimitStatus) -> pb::Limit {
    pb::Limit {
        name: l.name.clone(),
        limit: l.limit,
        remaining: l.remaining,
        reset_at: Some(ts(l.reset_at)),
        period: l.period.to_string(),
    }
}

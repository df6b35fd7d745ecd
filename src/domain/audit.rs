//! The audit events of each management change: what is recorded about a
//! key, tenant or user change. Never a secret (no key, digest or hash).

use chrono::{DateTime, Utc};
use serde_json::json;

use super::console::{AuditAction, AuditContext, AuditEvent, ConsoleUser};

fn user_facts(u: &ConsoleUser) -> serde_json::Value {
    json!({"role": u.role.as_str(), "disabled": u.disabled_at.is_some()})
}
use super::{KeyRecord, KeyUpdate, Tenant, TenantUpdate};

/// A key was created.
pub fn key_created(ctx: &AuditContext, k: &KeyRecord) -> AuditEvent {
    ctx.event(
        AuditAction::KeyCreated,
        &k.tenant_id,
        k.id.to_string(),
        json!({"name": k.name, "environment": k.environment, "scopes": k.scopes,
            "hint": k.hint, "expires_at": k.expires_at, "labels": k.labels}),
        k.created_at,
    )
}

/// A legacy key was imported (recorded as a creation, marked imported).
pub fn key_imported(ctx: &AuditContext, k: &KeyRecord) -> AuditEvent {
    let mut event = key_created(ctx, k);
    event.details["imported"] = json!(true);
    event.details["format"] = json!("legacy");
    event
}

/// A key was revoked.
pub fn key_revoked(ctx: &AuditContext, k: &KeyRecord, at: DateTime<Utc>) -> AuditEvent {
    ctx.event(
        AuditAction::KeyRevoked,
        &k.tenant_id,
        k.id.to_string(),
        json!({"reason": k.revoke_reason}),
        at,
    )
}

/// `previous` was rotated into `new`.
pub fn key_rotated(ctx: &AuditContext, previous: &KeyRecord, new: &KeyRecord) -> AuditEvent {
    ctx.event(
        AuditAction::KeyRotated,
        &previous.tenant_id,
        previous.id.to_string(),
        json!({"new_key_id": new.id, "previous_expires_at": previous.expires_at}),
        new.created_at,
    )
}

/// A key's fields changed, from `before` to `k`; a change of limits
/// records the old and new values.
pub fn key_updated(
    ctx: &AuditContext,
    before: &KeyRecord,
    k: &KeyRecord,
    u: &KeyUpdate,
    at: DateTime<Utc>,
) -> AuditEvent {
    let fields: Vec<&str> = [
        ("name", u.name.is_some()),
        ("scopes", u.scopes.is_some()),
        ("expires_at", u.expires_at.is_some()),
        ("limits", u.limits.is_some()),
        ("labels", u.labels.is_some()),
    ]
    .into_iter()
    .filter_map(|(f, changed)| changed.then_some(f))
    .collect();
    ctx.event(
        AuditAction::KeyUpdated,
        &k.tenant_id,
        k.id.to_string(),
        {
            let mut details = json!({"fields": fields, "name": k.name, "scopes": k.scopes,
                "expires_at": k.expires_at});
            if u.limits.is_some() {
                details["limits"] = json!({"old": before.limits, "new": k.limits});
            }
            if u.labels.is_some() {
                details["labels"] = json!({"old": before.labels, "new": k.labels});
            }
            details
        },
        at,
    )
}

/// A tenant was created.
pub fn tenant_created(ctx: &AuditContext, t: &Tenant) -> AuditEvent {
    ctx.event(
        AuditAction::TenantCreated,
        &t.id,
        t.id.to_string(),
        json!({"plan": t.plan, "subscription_status": t.status.as_str()}),
        t.created_at,
    )
}

/// A tenant's plan, status, name or overrides changed.
pub fn tenant_updated(
    ctx: &AuditContext,
    t: &Tenant,
    u: &TenantUpdate,
    at: DateTime<Utc>,
) -> AuditEvent {
    let fields: Vec<&str> = [
        ("name", u.name.is_some()),
        ("plan", u.plan.is_some()),
        ("subscription_status", u.status.is_some()),
        ("overrides", u.overrides.is_some()),
    ]
    .into_iter()
    .filter_map(|(f, changed)| changed.then_some(f))
    .collect();
    ctx.event(
        AuditAction::TenantUpdated,
        &t.id,
        t.id.to_string(),
        json!({"fields": fields, "plan": t.plan, "subscription_status": t.status.as_str()}),
        at,
    )
}

/// A console user was added.
pub fn user_created(ctx: &AuditContext, u: &ConsoleUser) -> AuditEvent {
    ctx.event(
        AuditAction::UserCreated,
        &u.tenant_id,
        u.id.to_string(),
        json!({"role": u.role.as_str(), "email": u.email.as_str()}),
        u.created_at,
    )
}

/// A user's password was reset.
pub fn password_reset(ctx: &AuditContext, u: &ConsoleUser, at: DateTime<Utc>) -> AuditEvent {
    ctx.event(
        AuditAction::PasswordReset,
        &u.tenant_id,
        u.id.to_string(),
        json!({}),
        at,
    )
}

/// A user's role changed, or they were disabled or enabled: the old and
/// the new values.
pub fn user_updated(
    ctx: &AuditContext,
    old: &ConsoleUser,
    new: &ConsoleUser,
    at: DateTime<Utc>,
) -> AuditEvent {
    ctx.event(
        AuditAction::UserUpdated,
        &new.tenant_id,
        new.id.to_string(),
        json!({"email": new.email.as_str(), "old": user_facts(old), "new": user_facts(new)}),
        at,
    )
}

/// A user was deleted (their sessions and tokens with them).
pub fn user_deleted(ctx: &AuditContext, old: &ConsoleUser, at: DateTime<Utc>) -> AuditEvent {
    ctx.event(
        AuditAction::UserDeleted,
        &old.tenant_id,
        old.id.to_string(),
        json!({"email": old.email.as_str(), "old": user_facts(old)}),
        at,
    )
}

/// A key was revoked by an automatic revocation policy (`policy` names the
/// rule; `criteria` the thresholds it was judged by).
pub fn key_revoked_by_policy(
    ctx: &AuditContext,
    k: &KeyRecord,
    policy: super::revocation::PolicyReason,
    criteria: &super::revocation::Criteria,
    at: DateTime<Utc>,
) -> AuditEvent {
    ctx.event(
        AuditAction::KeyRevoked,
        &k.tenant_id,
        k.id.to_string(),
        json!({"reason": k.revoke_reason, "policy": policy.as_str(),
            "unused_before": criteria.unused_before, "created_before": criteria.created_before,
            "last_used_at": k.last_used_at, "created_at": k.created_at}),
        at,
    )
}

/// A key was reported leaked by `source` (never the token itself).
pub fn key_leak_reported(
    ctx: &AuditContext,
    k: &KeyRecord,
    source: &super::revocation::LeakSource,
    revoked: bool,
    at: DateTime<Utc>,
) -> AuditEvent {
    ctx.event(
        AuditAction::KeyLeakReported,
        &k.tenant_id,
        k.id.to_string(),
        json!({"reporter": source.reporter, "url": source.url, "source": source.source,
            "revoked": revoked, "hint": k.hint}),
        at,
    )
}

/// A tenant's revocation policy override was set (`None`: removed).
pub fn revocation_policy_updated(
    ctx: &AuditContext,
    tenant: &super::TenantId,
    old: Option<&super::revocation::PolicyOverride>,
    new: Option<&super::revocation::PolicyOverride>,
    at: DateTime<Utc>,
) -> AuditEvent {
    let facts = |o: Option<&super::revocation::PolicyOverride>| {
        o.map(|o| {
            json!({"unused_days": o.unused_days, "max_age_days": o.max_age_days,
                "revoke_leaked": o.revoke_leaked})
        })
    };
    ctx.event(
        AuditAction::RevocationPolicyUpdated,
        tenant,
        tenant.to_string(),
        json!({"old": facts(old), "new": facts(new)}),
        at,
    )
}

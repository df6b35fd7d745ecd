//! In-memory side of provider identities: the same rules as Postgres,
//! under the store's one lock.

use chrono::{DateTime, Utc};

use super::taken;
use crate::domain::audit;
use crate::domain::console::{AuditContext, ConsoleUser};
use crate::domain::identity::{identity_linked, Identity, LinkEffects};
use crate::domain::Tenant;
use crate::store::{MemoryStore, StoreError};

pub(super) fn user_by_identity(
    store: &MemoryStore,
    issuer: &str,
    subject: &str,
) -> Option<ConsoleUser> {
    let s = store.state();
    s.console
        .identities
        .get(&(issuer.to_string(), subject.to_string()))
        .and_then(|id| s.console.users.get(id))
        .cloned()
}

pub(super) fn link_identity(
    store: &MemoryStore,
    identity: Identity,
    ctx: &AuditContext,
    now: DateTime<Utc>,
) -> Result<(ConsoleUser, LinkEffects), StoreError> {
    let mut s = store.state();
    let key = (identity.issuer.clone(), identity.subject.clone());
    if s.console.identities.contains_key(&key) {
        return Err(StoreError::AlreadyExists);
    }
    let user = s
        .console
        .users
        .get(&identity.user_id)
        .filter(|u| u.email == identity.email)
        .cloned()
        .ok_or(StoreError::NotFound)?;
    let effects = LinkEffects::for_user(&user);
    s.audit
        .record(identity_linked(ctx, &user, &identity, effects));
    if effects.drop_password {
        for t in s.console.tokens.values_mut() {
            if t.token.user_id == user.id && t.used_at.is_none() {
                t.used_at = Some(now);
            }
        }
    }
    let stored = s.console.users.get_mut(&user.id).expect("found above");
    if effects.verify_email {
        stored.email_verified_at.get_or_insert(now);
    }
    if effects.drop_password {
        stored.password_hash = crate::domain::console::PasswordHash::none();
    }
    let changed = stored.clone();
    s.console.identities.insert(key, user.id);
    Ok((changed, effects))
}

pub(super) fn sign_up_with_identity(
    store: &MemoryStore,
    tenant: Tenant,
    owner: ConsoleUser,
    identity: Identity,
    ctx: &AuditContext,
) -> Result<(), StoreError> {
    let mut s = store.state();
    let key = (identity.issuer.clone(), identity.subject.clone());
    if s.tenants.contains_key(&tenant.id)
        || taken(&s, &owner.email)
        || s.console.identities.contains_key(&key)
    {
        return Err(StoreError::AlreadyExists);
    }
    let created = audit::tenant_created(ctx, &tenant);
    s.tenants.insert(tenant.id.clone(), tenant);
    s.audit.record(created);
    s.audit.record(audit::user_created(ctx, &owner));
    s.console.by_email.insert(owner.email.clone(), owner.id);
    s.console.users.insert(owner.id, owner);
    s.console.identities.insert(key, identity.user_id);
    Ok(())
}

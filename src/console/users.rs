//! A tenant's users over their lifetime: role changes, disabling and
//! enabling, deletion. Owners and admins (or the operator) act; only owners
//! touch owners; the tenant always keeps an enabled owner (the store
//! enforces that in the change's transaction).

use super::Console;
use crate::domain::console::{AuditContext, ConsoleUser, Role, UserChange};
use crate::domain::TenantId;
use crate::error::{Error, Result};
use crate::store::StoreError;

/// Who changes a user: the operator, or a console user with this role.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Actor {
    Operator,
    User(Role),
}

fn user_change_error(e: StoreError) -> Error {
    match e {
        StoreError::NotFound => Error::NotFound("user"),
        e => e.into(),
    }
}

impl Console {
    /// The user `user_id` of `tenant`, if `actor` may change them in a way
    /// that involves `new_role` (only owners touch owners).
    async fn target(
        &self,
        actor: Actor,
        tenant: &TenantId,
        user_id: &str,
        new_role: Option<Role>,
    ) -> Result<ConsoleUser> {
        let id = uuid::Uuid::parse_str(user_id)
            .map_err(|_| Error::invalid("user_id", "must be a user id (UUID)"))?;
        let user = self
            .store
            .user_in(tenant, id)
            .await?
            .ok_or(Error::NotFound("user"))?;
        if let Actor::User(role) = actor {
            if !role.manages() {
                return Err(Error::PermissionDenied(
                    "only owners and admins manage users".into(),
                ));
            }
            let touches_owner = user.role == Role::Owner || new_role == Some(Role::Owner);
            if touches_owner && role != Role::Owner {
                return Err(Error::PermissionDenied(
                    "only owners change, disable or delete owners".into(),
                ));
            }
        }
        Ok(user)
    }

    /// Changes a user's role, or disables or enables them (disabling ends
    /// their sessions). The tenant always keeps an enabled owner.
    pub async fn update_user(
        &self,
        actor: Actor,
        tenant: &TenantId,
        user_id: &str,
        change: UserChange,
        ctx: &AuditContext,
    ) -> Result<ConsoleUser> {
        let user = self.target(actor, tenant, user_id, change.role).await?;
        let changed = self
            .store
            .update_user(tenant, user.id, user.role, change, ctx, self.clock.now())
            .await
            .map_err(user_change_error)?;
        tracing::info!(tenant_id = %tenant, user_id = %changed.id, role = changed.role.as_str(),
            disabled = changed.disabled_at.is_some(), "console user updated");
        Ok(changed)
    }

    /// Deletes a user with their sessions and tokens. The tenant always
    /// keeps an enabled owner.
    pub async fn delete_user(
        &self,
        actor: Actor,
        tenant: &TenantId,
        user_id: &str,
        ctx: &AuditContext,
    ) -> Result<()> {
        let user = self.target(actor, tenant, user_id, None).await?;
        self.store
            .delete_user(tenant, user.id, user.role, ctx, self.clock.now())
            .await
            .map_err(user_change_error)?;
        tracing::info!(tenant_id = %tenant, user_id = %user.id, "console user deleted");
        Ok(())
    }
}

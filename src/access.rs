//! Who may make which management call (DESIGN.md §7): the operator may do
//! anything; a console user acts only inside their own tenant, and only as
//! their role allows. Refusals are `PermissionDenied` and change nothing.
//! No tonic.

use std::sync::Arc;

use crate::domain::console::{AuditContext, Role, UserId};
use crate::domain::{KeyId, TenantId};
use crate::error::{Error, Result};
use crate::store::{KeyRef, Store};

/// The authenticated caller of a management RPC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// Holder of the operator token.
    Operator,
    /// A console user, from a console access token.
    Console {
        tenant_id: TenantId,
        role: Role,
        user_id: UserId,
    },
}

/// What a management call needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Read the tenant's keys, usage, tenant record: every role.
    Read,
    /// Create, rotate, update, revoke keys; rename the tenant: owners, admins.
    ManageKeys,
    /// Add and list users: owners, admins.
    ManageUsers,
    /// Read the audit log: owners, admins.
    ReadAudit,
    /// Operator only (creating or listing tenants, plans and billing state).
    Operator,
}

fn denied(why: &str) -> Error {
    Error::PermissionDenied(why.to_string())
}

impl Caller {
    /// Whether the caller's role allows `need` (tenant aside).
    pub fn allow(&self, need: Need) -> Result<()> {
        let Caller::Console { role, .. } = self else {
            return Ok(());
        };
        match need {
            Need::Read => Ok(()),
            Need::ManageKeys | Need::ManageUsers | Need::ReadAudit if role.manages() => Ok(()),
            Need::ManageKeys => Err(denied("only owners and admins manage keys")),
            Need::ManageUsers => Err(denied("only owners and admins manage users")),
            Need::ReadAudit => Err(denied("only owners and admins read the audit log")),
            Need::Operator => Err(denied("this call is for the operator only")),
        }
    }

    /// The tenant a call may touch, given the `tenant_id` it names (empty:
    /// none). The operator gets what it asked; a console user gets their
    /// own tenant, and naming another one is refused.
    pub fn tenant_scope(&self, requested: &str, need: Need) -> Result<String> {
        self.allow(need)?;
        match self {
            Caller::Operator => Ok(requested.to_string()),
            Caller::Console { tenant_id, .. } => {
                if requested.is_empty() || requested == tenant_id.as_str() {
                    Ok(tenant_id.to_string())
                } else {
                    Err(denied("the caller may not access another tenant"))
                }
            }
        }
    }

    /// Whether the caller may give a user `role` (only owners make owners).
    pub fn may_grant(&self, role: Role) -> Result<()> {
        match self {
            Caller::Console { role: mine, .. } if role == Role::Owner && *mine != Role::Owner => {
                Err(denied("only owners add owners"))
            }
            _ => Ok(()),
        }
    }

    /// The audit context of this caller's changes.
    pub fn audit(&self, request_id: &str) -> AuditContext {
        AuditContext {
            actor: match self {
                Caller::Operator => "operator".into(),
                Caller::Console { user_id, .. } => format!("user:{user_id}"),
            },
            request_id: request_id.to_string(),
        }
    }
}

/// Checks that need the store: a key named by id must belong to the
/// caller's tenant.
pub struct Access {
    store: Arc<dyn Store>,
}

impl Access {
    /// Checks against `store`.
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self { store }
    }

    /// For a call on key `key_id` (with the optional `tenant_id` it names):
    /// the tenant scope to pass down. A console user's scope is their own
    /// tenant, and a key of another tenant is refused outright.
    pub async fn key(
        &self,
        caller: &Caller,
        key_id: &str,
        requested_tenant: &str,
        need: Need,
    ) -> Result<String> {
        let scope = caller.tenant_scope(requested_tenant, need)?;
        if let Caller::Console { tenant_id, .. } = caller {
            // A malformed id is reported by the call itself.
            if let Ok(id) = KeyId::parse_str(key_id) {
                let owner = self
                    .store
                    .get_key(KeyRef { id, tenant: None })
                    .await?
                    .map(|k| k.tenant_id);
                if owner.is_some_and(|t| &t != tenant_id) {
                    return Err(denied("the key belongs to another tenant"));
                }
            }
        }
        Ok(scope)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(role: Role) -> Caller {
        Caller::Console {
            tenant_id: TenantId::parse("a").unwrap(),
            role,
            user_id: uuid::Uuid::nil(),
        }
    }

    #[test]
    fn console_users_stay_in_their_tenant_and_role() {
        let viewer = user(Role::Viewer);
        assert_eq!(viewer.tenant_scope("", Need::Read).unwrap(), "a");
        assert_eq!(viewer.tenant_scope("a", Need::Read).unwrap(), "a");
        assert!(matches!(
            viewer.tenant_scope("b", Need::Read),
            Err(Error::PermissionDenied(_))
        ));
        assert!(viewer.tenant_scope("a", Need::ManageKeys).is_err());
        assert!(user(Role::Developer).allow(Need::ManageKeys).is_err());
        assert!(user(Role::Admin).allow(Need::ManageKeys).is_ok());
        assert!(user(Role::Owner).allow(Need::Operator).is_err());
        assert!(user(Role::Admin).may_grant(Role::Owner).is_err());
        assert!(user(Role::Owner).may_grant(Role::Owner).is_ok());
        assert_eq!(
            Caller::Operator.tenant_scope("b", Need::Operator).unwrap(),
            "b"
        );
        assert_eq!(Caller::Operator.audit("r").actor, "operator");
    }
}

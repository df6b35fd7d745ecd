//! A console account's identity at an OpenID Connect provider: the
//! provider's issuer and its stable subject id for the person. An account
//! can have a password, identities, or both.

use chrono::{DateTime, Utc};
use serde_json::json;

use super::console::{AuditAction, AuditContext, AuditEvent, ConsoleUser, Email, UserId};

/// One (issuer, subject) pair linked to a console user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The provider's canonical issuer (e.g. `https://accounts.google.com`).
    pub issuer: String,
    /// The provider's `sub`: stable, never reassigned (unlike an email).
    pub subject: String,
    pub user_id: UserId,
    /// The verified email the provider gave when it was linked.
    pub email: Email,
    pub created_at: DateTime<Utc>,
}

/// How linking changed an existing account, for the store to apply in the
/// same transaction as the link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkEffects {
    /// The provider verified the address: mark it verified.
    pub verify_email: bool,
    /// The account's email was never verified, so whoever set its password
    /// never proved they own the address: drop that password and end its
    /// sessions (no pre-registered account survives its owner's sign-in).
    pub drop_password: bool,
}

impl LinkEffects {
    /// What linking a provider-verified identity does to `user`.
    pub fn for_user(user: &ConsoleUser) -> Self {
        let unverified = user.email_verified_at.is_none();
        Self {
            verify_email: unverified,
            drop_password: unverified && user.password_hash.is_set(),
        }
    }
}

/// The audit row of a link (no token, no claim beyond the issuer).
pub fn identity_linked(
    ctx: &AuditContext,
    user: &ConsoleUser,
    identity: &Identity,
    effects: LinkEffects,
) -> AuditEvent {
    ctx.event(
        AuditAction::IdentityLinked,
        &user.tenant_id,
        user.id.to_string(),
        json!({
            "issuer": identity.issuer,
            "email_verified_now": effects.verify_email,
            "password_removed": effects.drop_password,
        }),
        identity.created_at,
    )
}

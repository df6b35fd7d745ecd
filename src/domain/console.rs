//! Console accounts: users of a tenant with a role, the single-use tokens
//! they are sent, and the audit trail of management changes. Plain data.

use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::{TenantId, Violations};

/// A console user's id.
pub type UserId = uuid::Uuid;

/// Shortest password accepted (OWASP ASVS 2.1.1).
pub const MIN_PASSWORD_CHARS: usize = 12;
/// Longest password accepted (bounds hashing work per request).
pub const MAX_PASSWORD_BYTES: usize = 1024;

/// What a console user may do in their tenant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Everything, including adding owners.
    Owner,
    /// Manages keys and users (not owners).
    Admin,
    /// Uses the dashboard (`read write` scopes); reads keys and usage.
    Developer,
    /// Reads only.
    Viewer,
}

impl Role {
    /// Every role, most powerful first.
    pub const ALL: [Role; 4] = [Self::Owner, Self::Admin, Self::Developer, Self::Viewer];

    /// The API / database spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Owner => "owner",
            Self::Admin => "admin",
            Self::Developer => "developer",
            Self::Viewer => "viewer",
        }
    }

    /// Parses the API / database spelling.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.as_str() == s)
    }

    /// Whether this role manages keys and users (owners and admins).
    pub fn manages(self) -> bool {
        matches!(self, Self::Owner | Self::Admin)
    }

    /// The scopes of this role's access tokens on the dashboard surface.
    pub fn scopes(self) -> &'static [&'static str] {
        match self {
            Self::Owner | Self::Admin => &["read", "write", "admin"],
            Self::Developer => &["read", "write"],
            Self::Viewer => &["read"],
        }
    }
}

/// A normalised email address (trimmed, lower-case): the login name,
/// unique across Tollgate.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Email(String);

impl Email {
    /// Parses and normalises an address; `None` if it is not one.
    pub fn parse(s: &str) -> Option<Self> {
        let s = s.trim().to_lowercase();
        let (local, domain) = s.split_once('@')?;
        let ok = s.len() <= 254
            && !local.is_empty()
            && local.len() <= 64
            && domain.contains('.')
            && !domain.starts_with('.')
            && !domain.ends_with('.')
            && !domain.contains('@')
            && s.chars().all(|c| c.is_ascii_graphic() || !c.is_ascii());
        ok.then_some(Self(s))
    }

    /// The address.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Email {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Checks a new password: long enough, not absurdly long. The message
/// never echoes the password.
pub fn check_password(field: &str, password: &str, v: &mut Violations) {
    if password.chars().count() < MIN_PASSWORD_CHARS {
        v.add(
            field,
            format!("must be at least {MIN_PASSWORD_CHARS} characters long"),
        );
    } else if password.len() > MAX_PASSWORD_BYTES {
        v.add(field, format!("must be at most {MAX_PASSWORD_BYTES} bytes"));
    }
}

/// A stored argon2id password hash (PHC string). Never shown.
#[derive(Clone, PartialEq, Eq)]
pub struct PasswordHash(pub String);

impl fmt::Debug for PasswordHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PasswordHash(<redacted>)")
    }
}

impl PasswordHash {
    /// No password: an account that signs in only through an identity
    /// provider (stored as NULL; no password ever matches it).
    pub fn none() -> Self {
        Self(String::new())
    }

    /// Whether a password is set.
    pub fn is_set(&self) -> bool {
        !self.0.is_empty()
    }
}

/// A console user as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsoleUser {
    pub id: UserId,
    pub tenant_id: TenantId,
    pub email: Email,
    pub role: Role,
    pub password_hash: PasswordHash,
    pub email_verified_at: Option<DateTime<Utc>>,
    /// Set while the account is disabled: no login, no refresh.
    pub disabled_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
}

/// A change to a console user by a tenant's owner or admin (or the
/// operator); `None` fields stay as they are.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UserChange {
    /// A new role.
    pub role: Option<Role>,
    /// Disable (`true`: no login, sessions end) or enable again.
    pub disabled: Option<bool>,
}

impl UserChange {
    /// `user` with the change applied at `now`.
    pub fn apply(&self, user: &ConsoleUser, now: DateTime<Utc>) -> ConsoleUser {
        let mut new = user.clone();
        if let Some(role) = self.role {
            new.role = role;
        }
        match self.disabled {
            Some(true) => {
                new.disabled_at.get_or_insert(now);
            }
            Some(false) => new.disabled_at = None,
            None => {}
        }
        new
    }
}

/// What a single-use console token is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TokenKind {
    Refresh,
    EmailVerification,
    PasswordReset,
}

impl TokenKind {
    /// The database spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Refresh => "refresh",
            Self::EmailVerification => "email_verification",
            Self::PasswordReset => "password_reset",
        }
    }

    /// The visible prefix of tokens of this kind (helps secret scanners).
    pub fn prefix(self) -> &'static str {
        match self {
            Self::Refresh => "tgrt_",
            Self::EmailVerification => "tgev_",
            Self::PasswordReset => "tgpr_",
        }
    }
}

/// A single-use token to store (only its digest is kept).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewToken {
    pub digest: [u8; 32],
    pub kind: TokenKind,
    pub user_id: UserId,
    /// Refresh tokens: the session they belong to (rotation keeps it).
    pub family: Option<uuid::Uuid>,
    pub created_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    /// Refresh tokens: the session's absolute end (no rotation passes it).
    pub session_ends_at: Option<DateTime<Utc>>,
}

/// What a management change did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AuditAction {
    KeyCreated,
    KeyRotated,
    KeyUpdated,
    KeyRevoked,
    TenantCreated,
    TenantUpdated,
    UserCreated,
    UserUpdated,
    UserDeleted,
    PasswordReset,
    IdentityLinked,
    /// A key was reported leaked (flagged; revoked too when the policy says).
    KeyLeakReported,
    /// A tenant's automatic revocation policy changed.
    RevocationPolicyUpdated,
}

impl AuditAction {
    /// The API / database spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::KeyCreated => "key.created",
            Self::KeyRotated => "key.rotated",
            Self::KeyUpdated => "key.updated",
            Self::KeyRevoked => "key.revoked",
            Self::TenantCreated => "tenant.created",
            Self::TenantUpdated => "tenant.updated",
            Self::UserCreated => "user.created",
            Self::UserUpdated => "user.updated",
            Self::UserDeleted => "user.deleted",
            Self::PasswordReset => "user.password_reset",
            Self::IdentityLinked => "user.identity_linked",
            Self::KeyLeakReported => "key.leak_reported",
            Self::RevocationPolicyUpdated => "tenant.revocation_policy_updated",
        }
    }
}

/// Who made a change and under which request: passed down to the store so
/// the audit row is written in the change's own transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditContext {
    /// `operator`, `user:<id>` or `system`.
    pub actor: String,
    /// `x-request-id`, or a generated one.
    pub request_id: String,
}

impl AuditContext {
    /// Changes Tollgate makes itself (dev-mode setup, tests).
    pub fn system() -> Self {
        Self {
            actor: "system".into(),
            request_id: uuid::Uuid::now_v7().to_string(),
        }
    }

    /// The event this context records for `action` on `target` of `tenant`.
    pub fn event(
        &self,
        action: AuditAction,
        tenant_id: &TenantId,
        target: impl Into<String>,
        details: serde_json::Value,
        at: DateTime<Utc>,
    ) -> AuditEvent {
        AuditEvent {
            id: uuid::Uuid::now_v7(),
            at,
            tenant_id: tenant_id.clone(),
            actor: self.actor.clone(),
            action: action.as_str().to_string(),
            target: target.into(),
            request_id: self.request_id.clone(),
            details,
        }
    }
}

/// One row of the append-only audit log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEvent {
    /// UUIDv7: ordered by time.
    pub id: uuid::Uuid,
    pub at: DateTime<Utc>,
    pub tenant_id: TenantId,
    pub actor: String,
    pub action: String,
    pub target: String,
    pub request_id: String,
    /// Non-secret facts about the change.
    pub details: serde_json::Value,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emails_are_normalised_and_checked() {
        assert_eq!(
            Email::parse("  Ada@Example.COM ").unwrap().as_str(),
            "ada@example.com"
        );
        for bad in [
            "",
            "ada",
            "@example.com",
            "ada@",
            "ada@example",
            "a b@x.io",
            "a@b@c.io",
        ] {
            assert!(Email::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn short_passwords_are_refused_with_a_clear_message() {
        let mut v = Violations::default();
        check_password("password", "hunter2", &mut v);
        assert_eq!(v.0[0].description, "must be at least 12 characters long");
        let mut v = Violations::default();
        check_password("password", "correct horse battery", &mut v);
        assert!(v.0.is_empty());
    }

    #[test]
    fn roles_round_trip_and_only_owners_and_admins_manage() {
        // The table as the README states it, one row per role.
        let table = [
            (Role::Owner, "owner", true),
            (Role::Admin, "admin", true),
            (Role::Developer, "developer", false),
            (Role::Viewer, "viewer", false),
        ];
        assert_eq!(table.map(|(r, ..)| r), Role::ALL, "every role, once");
        for (role, name, manages) in table {
            assert_eq!(role.as_str(), name);
            assert_eq!(Role::parse(name), Some(role));
            assert_eq!(role.manages(), manages, "{name}");
        }
        for unknown in ["", "Owner", "OWNER", "root", "owner "] {
            assert_eq!(Role::parse(unknown), None, "{unknown:?}");
        }
        let shown = format!("{:?}", PasswordHash("$argon2id$secret".into()));
        assert!(
            shown.contains("redacted") && !shown.contains("secret"),
            "{shown}"
        );
    }
}

//! Storage of console accounts, their single-use tokens and the audit log,
//! behind its own small trait (the core [`super::Store`] stays as it is for
//! keys and tenants). Postgres in `console_pg.rs`, memory in
//! `console_memory.rs`.

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use super::StoreError;

/// Refused: the change would leave the tenant without an enabled owner.
pub const LAST_OWNER: &str = "the tenant must keep at least one enabled owner";
/// Refused: the user's role changed since it was read.
pub const ROLE_MOVED: &str = "the user's role changed meanwhile; read it again";
use crate::domain::console::{
    AuditContext, AuditEvent, ConsoleUser, Email, NewToken, PasswordHash, Role, TokenKind,
    UserChange, UserId,
};
use crate::domain::identity::{Identity, LinkEffects};
use crate::domain::{Tenant, TenantId};

/// The outcome of spending a single-use token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenUse {
    /// Spent now; the owner (and, for refresh tokens, the session, and
    /// when the token issued in its place expires: never past the
    /// session's absolute end).
    Spent {
        user: ConsoleUser,
        family: Option<uuid::Uuid>,
        expires_at: DateTime<Utc>,
    },
    /// It was spent before: a replay. For a refresh token the whole session
    /// has been revoked.
    Replayed,
    /// No such token, or expired.
    Unknown,
}

/// A refresh token to issue in place of the one spent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NextRefresh {
    pub digest: [u8; 32],
    pub expires_at: DateTime<Utc>,
}

/// Console accounts, tokens and audit events.
#[async_trait]
pub trait ConsoleStore: Send + Sync + 'static {
    /// Creates a tenant, its owner and the owner's email-verification token,
    /// and audits both, in one transaction. `AlreadyExists` when the email
    /// or the tenant id is taken (nothing is written).
    async fn sign_up(
        &self,
        tenant: Tenant,
        owner: ConsoleUser,
        verification: NewToken,
        ctx: &AuditContext,
    ) -> Result<(), StoreError>;
    /// Adds a user (and their verification token) to an existing tenant,
    /// audited. `NotFound` without the tenant, `AlreadyExists` for a taken
    /// email.
    async fn create_user(
        &self,
        user: ConsoleUser,
        verification: NewToken,
        ctx: &AuditContext,
    ) -> Result<(), StoreError>;
    async fn user_by_email(&self, email: &Email) -> Result<Option<ConsoleUser>, StoreError>;
    /// A tenant's users, oldest first.
    async fn list_users(&self, tenant: &TenantId) -> Result<Vec<ConsoleUser>, StoreError>;
    /// Stores a token. An email-verification or password-reset token voids
    /// the user's older unspent ones of its kind (one valid at a time).
    async fn insert_token(&self, token: NewToken) -> Result<(), StoreError>;
    /// Whether a token of `kind` exists, is unspent and unexpired, and its
    /// user is enabled (read only: nothing is spent).
    async fn token_is_live(
        &self,
        digest: &[u8; 32],
        kind: TokenKind,
        now: DateTime<Utc>,
    ) -> Result<bool, StoreError>;
    /// Spends a refresh token and issues `next` in the same session, in one
    /// transaction, expiring no later than the session's absolute end. A
    /// replay revokes every token of the session; a disabled user's token
    /// is `Unknown`.
    async fn rotate_refresh(
        &self,
        spent: &[u8; 32],
        next: NextRefresh,
        now: DateTime<Utc>,
    ) -> Result<TokenUse, StoreError>;
    /// Ends the session of a refresh token (logout).
    async fn end_session(&self, refresh: &[u8; 32], now: DateTime<Utc>) -> Result<(), StoreError>;
    /// Spends an email-verification token and marks the email verified.
    async fn verify_email(
        &self,
        token: &[u8; 32],
        now: DateTime<Utc>,
    ) -> Result<TokenUse, StoreError>;
    /// Spends a password-reset token, sets the new hash, ends every session
    /// of the user and audits it (actor: the user), in one transaction.
    async fn reset_password(
        &self,
        token: &[u8; 32],
        hash: &PasswordHash,
        now: DateTime<Utc>,
        request_id: &str,
    ) -> Result<TokenUse, StoreError>;
    /// A user of `tenant` by id (`None`: none there).
    async fn user_in(
        &self,
        tenant: &TenantId,
        user: UserId,
    ) -> Result<Option<ConsoleUser>, StoreError>;
    /// Changes a user of `tenant` whose role is still `expected_role`, in
    /// one transaction with its audit row (old and new values). Disabling
    /// ends every session and voids outstanding tokens. `NotFound` without
    /// the user, `Precondition` when the role moved meanwhile or when the
    /// tenant would be left without an enabled owner. Returns the user as
    /// changed.
    async fn update_user(
        &self,
        tenant: &TenantId,
        user: UserId,
        expected_role: Role,
        change: UserChange,
        ctx: &AuditContext,
        now: DateTime<Utc>,
    ) -> Result<ConsoleUser, StoreError>;
    /// Deletes a user of `tenant` (and their tokens), audited, under the
    /// same checks as [`Self::update_user`].
    async fn delete_user(
        &self,
        tenant: &TenantId,
        user: UserId,
        expected_role: Role,
        ctx: &AuditContext,
        now: DateTime<Utc>,
    ) -> Result<ConsoleUser, StoreError>;
    /// Deletes at most `limit` tokens that expired before `before`;
    /// returns how many.
    async fn purge_tokens(&self, before: DateTime<Utc>, limit: u32) -> Result<u64, StoreError>;
    /// Audit events, newest first, of one tenant (or all), before `before`.
    async fn list_audit(
        &self,
        tenant: Option<&TenantId>,
        before: Option<uuid::Uuid>,
        limit: u32,
    ) -> Result<Vec<AuditEvent>, StoreError>;
    /// The user linked to a provider identity (issuer, subject).
    async fn user_by_identity(
        &self,
        issuer: &str,
        subject: &str,
    ) -> Result<Option<ConsoleUser>, StoreError>;
    /// Links `identity` to its user (whose email must still be
    /// `identity.email`) and applies [`LinkEffects::for_user`] to the user
    /// as locked (an unverified address is verified and its password, set
    /// by someone who never proved the address, removed with its
    /// sessions), audited, in one transaction. Returns the user as changed.
    /// `AlreadyExists` when the identity is linked already; `NotFound`
    /// when the user is gone or its email changed.
    async fn link_identity(
        &self,
        identity: Identity,
        ctx: &AuditContext,
        now: DateTime<Utc>,
    ) -> Result<(ConsoleUser, LinkEffects), StoreError>;
    /// Creates a tenant, its owner (no password, email verified by the
    /// provider) and the owner's identity, audited, in one transaction.
    /// `AlreadyExists` when the email, tenant id or identity is taken.
    async fn sign_up_with_identity(
        &self,
        tenant: Tenant,
        owner: ConsoleUser,
        identity: Identity,
        ctx: &AuditContext,
    ) -> Result<(), StoreError>;
}

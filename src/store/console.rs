//! Storage of console accounts, their single-use tokens and the audit log,
//! behind its own small trait (the core [`super::Store`] stays as it is for
//! keys and tenants). Postgres in `console_pg.rs`, memory in
//! `console_memory.rs`.

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use super::StoreError;
use crate::domain::console::{
    AuditContext, AuditEvent, ConsoleUser, Email, NewToken, PasswordHash,
};
use crate::domain::{Tenant, TenantId};

/// The outcome of spending a single-use token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenUse {
    /// Spent now; the owner (and, for refresh tokens, the session).
    Spent {
        user: ConsoleUser,
        family: Option<uuid::Uuid>,
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
    async fn insert_token(&self, token: NewToken) -> Result<(), StoreError>;
    /// Spends a refresh token and issues `next` in the same session, in one
    /// transaction. A replay revokes every token of the session.
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
    /// Audit events, newest first, of one tenant (or all), before `before`.
    async fn list_audit(
        &self,
        tenant: Option<&TenantId>,
        before: Option<uuid::Uuid>,
        limit: u32,
    ) -> Result<Vec<AuditEvent>, StoreError>;
}

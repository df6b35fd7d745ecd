//! In-memory side of [`ConsoleStore`] (dev mode, unit tests): the same
//! rules as Postgres, every change under the store's one lock.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::console::{ConsoleStore, NextRefresh, TokenUse};
use super::memory::State;
use super::{MemoryStore, StoreError};
use crate::domain::console::{
    AuditContext, AuditEvent, ConsoleUser, Email, NewToken, PasswordHash, Role, TokenKind,
    UserChange, UserId,
};
use crate::domain::identity::{Identity, LinkEffects};
use crate::domain::{audit, Tenant, TenantId};

mod identities;

fn taken(s: &State, email: &Email) -> bool {
    s.console.by_email.contains_key(email)
}

#[async_trait]
impl ConsoleStore for MemoryStore {
    async fn sign_up(
        &self,
        tenant: Tenant,
        owner: ConsoleUser,
        verification: NewToken,
        ctx: &AuditContext,
    ) -> Result<(), StoreError> {
        let mut s = self.state();
        if s.tenants.contains_key(&tenant.id) || taken(&s, &owner.email) {
            return Err(StoreError::AlreadyExists);
        }
        let created = audit::tenant_created(ctx, &tenant);
        s.tenants.insert(tenant.id.clone(), tenant);
        s.audit.record(created);
        s.audit.record(audit::user_created(ctx, &owner));
        s.console.add_user(owner, verification);
        Ok(())
    }

    async fn create_user(
        &self,
        user: ConsoleUser,
        verification: NewToken,
        ctx: &AuditContext,
    ) -> Result<(), StoreError> {
        let mut s = self.state();
        if !s.tenants.contains_key(&user.tenant_id) {
            return Err(StoreError::NotFound);
        }
        if taken(&s, &user.email) {
            return Err(StoreError::AlreadyExists);
        }
        s.audit.record(audit::user_created(ctx, &user));
        s.console.add_user(user, verification);
        Ok(())
    }

    async fn user_by_email(&self, email: &Email) -> Result<Option<ConsoleUser>, StoreError> {
        let s = self.state();
        Ok(s.console
            .by_email
            .get(email)
            .and_then(|id| s.console.users.get(id))
            .cloned())
    }

    async fn list_users(&self, tenant: &TenantId) -> Result<Vec<ConsoleUser>, StoreError> {
        let mut users: Vec<ConsoleUser> = self
            .state()
            .console
            .users
            .values()
            .filter(|u| &u.tenant_id == tenant)
            .cloned()
            .collect();
        users.sort_by_key(|u| (u.created_at, u.id));
        Ok(users)
    }

    async fn insert_token(&self, token: NewToken) -> Result<(), StoreError> {
        let mut s = self.state();
        if s.console.tokens.contains_key(&token.digest) {
            return Err(StoreError::AlreadyExists);
        }
        s.console.add_token(token);
        Ok(())
    }

    async fn token_is_live(
        &self,
        digest: &[u8; 32],
        kind: TokenKind,
        now: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        let s = self.state();
        Ok(s.console.tokens.get(digest).is_some_and(|t| {
            t.token.kind == kind
                && t.used_at.is_none()
                && t.token.expires_at > now
                && s.console
                    .users
                    .get(&t.token.user_id)
                    .is_some_and(|u| u.disabled_at.is_none())
        }))
    }

    async fn user_in(
        &self,
        tenant: &TenantId,
        user: UserId,
    ) -> Result<Option<ConsoleUser>, StoreError> {
        Ok(self
            .state()
            .console
            .users
            .get(&user)
            .filter(|u| &u.tenant_id == tenant)
            .cloned())
    }

    async fn update_user(
        &self,
        tenant: &TenantId,
        user: UserId,
        expected_role: Role,
        change: UserChange,
        ctx: &AuditContext,
        now: DateTime<Utc>,
    ) -> Result<ConsoleUser, StoreError> {
        let mut s = self.state();
        let old = s.console.tenant_user(tenant, user, expected_role)?;
        let new = change.apply(&old, now);
        s.console.keeps_an_owner(tenant, user, Some(&new))?;
        if new.disabled_at.is_some() {
            s.console.end_everything(user, now);
        }
        s.console.users.insert(user, new.clone());
        s.audit.record(audit::user_updated(ctx, &old, &new, now));
        Ok(new)
    }

    async fn delete_user(
        &self,
        tenant: &TenantId,
        user: UserId,
        expected_role: Role,
        ctx: &AuditContext,
        now: DateTime<Utc>,
    ) -> Result<ConsoleUser, StoreError> {
        let mut s = self.state();
        let old = s.console.tenant_user(tenant, user, expected_role)?;
        s.console.keeps_an_owner(tenant, user, None)?;
        s.console.tokens.retain(|_, t| t.token.user_id != user);
        s.console.users.remove(&user);
        s.console.by_email.remove(&old.email);
        s.console.identities.retain(|_, u| *u != user);
        s.audit.record(audit::user_deleted(ctx, &old, now));
        Ok(old)
    }

    async fn purge_tokens(&self, before: DateTime<Utc>, limit: u32) -> Result<u64, StoreError> {
        let mut s = self.state();
        let expired: Vec<[u8; 32]> = s
            .console
            .tokens
            .iter()
            .filter(|(_, t)| t.token.expires_at < before)
            .map(|(d, _)| *d)
            .take(limit as usize)
            .collect();
        for d in &expired {
            s.console.tokens.remove(d);
        }
        Ok(expired.len() as u64)
    }

    async fn rotate_refresh(
        &self,
        spent: &[u8; 32],
        next: NextRefresh,
        now: DateTime<Utc>,
    ) -> Result<TokenUse, StoreError> {
        let mut s = self.state();
        let session_ends_at = s
            .console
            .tokens
            .get(spent)
            .and_then(|t| t.token.session_ends_at);
        let outcome = s.console.spend(spent, TokenKind::Refresh, now);
        let TokenUse::Spent { user, family, .. } = outcome else {
            return Ok(outcome);
        };
        let expires_at = session_ends_at.map_or(next.expires_at, |end| next.expires_at.min(end));
        s.console.add_token(NewToken {
            digest: next.digest,
            kind: TokenKind::Refresh,
            user_id: user.id,
            family,
            created_at: now,
            expires_at,
            session_ends_at,
        });
        Ok(TokenUse::Spent {
            user,
            family,
            expires_at,
        })
    }

    async fn end_session(&self, refresh: &[u8; 32], now: DateTime<Utc>) -> Result<(), StoreError> {
        let mut s = self.state();
        let family = s
            .console
            .tokens
            .get(refresh)
            .filter(|t| t.token.kind == TokenKind::Refresh)
            .and_then(|t| t.token.family);
        if let Some(family) = family {
            for t in s.console.tokens.values_mut() {
                if t.token.family == Some(family) {
                    t.used_at.get_or_insert(now);
                }
            }
        }
        Ok(())
    }

    async fn verify_email(
        &self,
        token: &[u8; 32],
        now: DateTime<Utc>,
    ) -> Result<TokenUse, StoreError> {
        let mut s = self.state();
        let outcome = s.console.spend(token, TokenKind::EmailVerification, now);
        let TokenUse::Spent {
            user, expires_at, ..
        } = outcome
        else {
            return Ok(outcome);
        };
        let stored = s
            .console
            .users
            .get_mut(&user.id)
            .ok_or(StoreError::NotFound)?;
        stored.email_verified_at.get_or_insert(now);
        Ok(TokenUse::Spent {
            user: stored.clone(),
            family: None,
            expires_at,
        })
    }

    async fn reset_password(
        &self,
        token: &[u8; 32],
        hash: &PasswordHash,
        now: DateTime<Utc>,
        request_id: &str,
    ) -> Result<TokenUse, StoreError> {
        let mut s = self.state();
        let outcome = s.console.spend(token, TokenKind::PasswordReset, now);
        let TokenUse::Spent {
            user, expires_at, ..
        } = outcome
        else {
            return Ok(outcome);
        };
        let stored = s
            .console
            .users
            .get_mut(&user.id)
            .ok_or(StoreError::NotFound)?;
        stored.password_hash = hash.clone();
        let user = stored.clone();
        for t in s.console.tokens.values_mut() {
            let ends = matches!(t.token.kind, TokenKind::Refresh | TokenKind::PasswordReset);
            if t.token.user_id == user.id && ends {
                t.used_at.get_or_insert(now);
            }
        }
        let ctx = AuditContext {
            actor: format!("user:{}", user.id),
            request_id: request_id.to_string(),
        };
        let event = audit::password_reset(&ctx, &user, now);
        s.audit.record(event);
        Ok(TokenUse::Spent {
            user,
            family: None,
            expires_at,
        })
    }

    async fn list_audit(
        &self,
        tenant: Option<&TenantId>,
        before: Option<Uuid>,
        limit: u32,
    ) -> Result<Vec<AuditEvent>, StoreError> {
        let s = self.state();
        Ok(s.audit
            .newest_first()
            .filter(|e| tenant.is_none_or(|t| &e.tenant_id == t))
            .filter(|e| before.is_none_or(|b| e.id < b))
            .take(limit as usize)
            .cloned()
            .collect())
    }

    async fn user_by_identity(
        &self,
        issuer: &str,
        subject: &str,
    ) -> Result<Option<ConsoleUser>, StoreError> {
        Ok(identities::user_by_identity(self, issuer, subject))
    }

    async fn link_identity(
        &self,
        identity: Identity,
        ctx: &AuditContext,
        now: DateTime<Utc>,
    ) -> Result<(ConsoleUser, LinkEffects), StoreError> {
        identities::link_identity(self, identity, ctx, now)
    }

    async fn sign_up_with_identity(
        &self,
        tenant: Tenant,
        owner: ConsoleUser,
        identity: Identity,
        ctx: &AuditContext,
    ) -> Result<(), StoreError> {
        identities::sign_up_with_identity(self, tenant, owner, identity, ctx)
    }
}

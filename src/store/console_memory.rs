//! In-memory side of [`ConsoleStore`] (dev mode, unit tests): the same
//! rules as Postgres, every change under the store's one lock.

use std::collections::{BTreeMap, HashMap};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::console::{ConsoleStore, NextRefresh, TokenUse};
use super::memory::State;
use super::{MemoryStore, StoreError};
use crate::domain::console::{
    AuditContext, AuditEvent, ConsoleUser, Email, NewToken, PasswordHash, TokenKind, UserId,
};
use crate::domain::{audit, Tenant, TenantId};

struct StoredToken {
    token: NewToken,
    used_at: Option<DateTime<Utc>>,
}

/// Console rows kept by [`MemoryStore`].
#[derive(Default)]
pub(super) struct ConsoleState {
    users: BTreeMap<UserId, ConsoleUser>,
    by_email: HashMap<Email, UserId>,
    tokens: HashMap<[u8; 32], StoredToken>,
    pub(super) audit: BTreeMap<Uuid, AuditEvent>,
}

impl ConsoleState {
    fn add_user(&mut self, user: ConsoleUser, verification: NewToken) {
        self.by_email.insert(user.email.clone(), user.id);
        self.users.insert(user.id, user);
        self.tokens.insert(
            verification.digest,
            StoredToken {
                token: verification,
                used_at: None,
            },
        );
    }

    pub(super) fn record(&mut self, e: AuditEvent) {
        self.audit.insert(e.id, e);
    }

    fn spend(&mut self, digest: &[u8; 32], kind: TokenKind, now: DateTime<Utc>) -> TokenUse {
        let Some(t) = self.tokens.get_mut(digest).filter(|t| t.token.kind == kind) else {
            return TokenUse::Unknown;
        };
        if t.used_at.is_some() {
            if let Some(family) = t.token.family {
                for other in self.tokens.values_mut() {
                    if other.token.family == Some(family) {
                        other.used_at.get_or_insert(now);
                    }
                }
            }
            return TokenUse::Replayed;
        }
        if t.token.expires_at <= now {
            return TokenUse::Unknown;
        }
        t.used_at = Some(now);
        let (user_id, family) = (t.token.user_id, t.token.family);
        match self.users.get(&user_id) {
            Some(user) => TokenUse::Spent {
                user: user.clone(),
                family,
            },
            None => TokenUse::Unknown,
        }
    }
}

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
        s.console.record(created);
        s.console.record(audit::user_created(ctx, &owner));
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
        s.console.record(audit::user_created(ctx, &user));
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
        s.console.tokens.insert(
            token.digest,
            StoredToken {
                token,
                used_at: None,
            },
        );
        Ok(())
    }

    async fn rotate_refresh(
        &self,
        spent: &[u8; 32],
        next: NextRefresh,
        now: DateTime<Utc>,
    ) -> Result<TokenUse, StoreError> {
        let mut s = self.state();
        let outcome = s.console.spend(spent, TokenKind::Refresh, now);
        if let TokenUse::Spent { user, family } = &outcome {
            let token = NewToken {
                digest: next.digest,
                kind: TokenKind::Refresh,
                user_id: user.id,
                family: *family,
                created_at: now,
                expires_at: next.expires_at,
            };
            s.console.tokens.insert(
                next.digest,
                StoredToken {
                    token,
                    used_at: None,
                },
            );
        }
        Ok(outcome)
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
        let TokenUse::Spent { user, .. } = outcome else {
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
        let TokenUse::Spent { user, .. } = outcome else {
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
        s.console.record(event);
        Ok(TokenUse::Spent { user, family: None })
    }

    async fn list_audit(
        &self,
        tenant: Option<&TenantId>,
        before: Option<Uuid>,
        limit: u32,
    ) -> Result<Vec<AuditEvent>, StoreError> {
        let s = self.state();
        Ok(s.console
            .audit
            .values()
            .rev()
            .filter(|e| tenant.is_none_or(|t| &e.tenant_id == t))
            .filter(|e| before.is_none_or(|b| e.id < b))
            .take(limit as usize)
            .cloned()
            .collect())
    }
}

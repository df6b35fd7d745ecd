//! Postgres side of [`ConsoleStore`]: console users, tokens and the audit
//! log. Every change is one transaction that also writes its audit row.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::types::Json;
use sqlx::{Postgres, Transaction};
use uuid::Uuid;

use super::console::{ConsoleStore, NextRefresh, TokenUse, LAST_OWNER, ROLE_MOVED};
use super::postgres::audit_log::insert_audit;
use super::postgres::{begin, insert_tenant_row, map_err};
use super::{PostgresStore, StoreError};
use crate::domain::console::{
    AuditContext, AuditEvent, ConsoleUser, Email, NewToken, PasswordHash, Role, TokenKind,
    UserChange, UserId,
};
use crate::domain::identity::{Identity, LinkEffects};
use crate::domain::{audit, Tenant, TenantId};

mod identities;

#[derive(sqlx::FromRow)]
struct UserRow {
    user_id: Uuid,
    tenant_id: String,
    email: String,
    role: String,
    password_hash: Option<String>,
    email_verified_at: Option<DateTime<Utc>>,
    disabled_at: Option<DateTime<Utc>>,
    created_at: DateTime<Utc>,
}

impl TryFrom<UserRow> for ConsoleUser {
    type Error = StoreError;
    fn try_from(r: UserRow) -> Result<Self, StoreError> {
        let bad = |what: &str| StoreError::Internal(format!("stored user {what} is malformed"));
        Ok(ConsoleUser {
            id: r.user_id,
            tenant_id: TenantId::parse(&r.tenant_id).ok_or_else(|| bad("tenant id"))?,
            email: Email::parse(&r.email).ok_or_else(|| bad("email"))?,
            role: Role::parse(&r.role).ok_or_else(|| bad("role"))?,
            // NULL: a provider-only account (no password matches).
            password_hash: PasswordHash(r.password_hash.unwrap_or_default()),
            email_verified_at: r.email_verified_at,
            disabled_at: r.disabled_at,
            created_at: r.created_at,
        })
    }
}

const USER_COLUMNS: &str =
    "user_id, tenant_id, email, role, password_hash, email_verified_at, disabled_at, created_at";

#[derive(sqlx::FromRow)]
struct AuditRow {
    event_id: Uuid,
    at: DateTime<Utc>,
    tenant_id: String,
    actor: String,
    action: String,
    target: String,
    request_id: String,
    details: Json<serde_json::Value>,
}

async fn insert_user(
    tx: &mut Transaction<'_, Postgres>,
    u: &ConsoleUser,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO console_users (user_id, tenant_id, email, role, password_hash, \
         email_verified_at, created_at, updated_at, disabled_at) \
         VALUES ($1,$2,$3,$4,$5,$6,$7,$7,$8)",
    )
    .bind(u.id)
    .bind(u.tenant_id.as_str())
    .bind(u.email.as_str())
    .bind(u.role.as_str())
    .bind(u.password_hash.is_set().then_some(&u.password_hash.0))
    .bind(u.email_verified_at)
    .bind(u.created_at)
    .bind(u.disabled_at)
    .execute(&mut **tx)
    .await
    .map_err(map_err)?;
    Ok(())
}

async fn insert_token_tx(
    tx: &mut Transaction<'_, Postgres>,
    t: &NewToken,
) -> Result<(), StoreError> {
    if matches!(
        t.kind,
        TokenKind::EmailVerification | TokenKind::PasswordReset
    ) {
        // One valid at a time: a new one voids the older ones.
        sqlx::query(
            "UPDATE console_tokens SET used_at = $3 WHERE user_id = $1 AND kind = $2 \
             AND used_at IS NULL",
        )
        .bind(t.user_id)
        .bind(t.kind.as_str())
        .bind(t.created_at)
        .execute(&mut **tx)
        .await
        .map_err(map_err)?;
    }
    sqlx::query(
        "INSERT INTO console_tokens (digest, kind, user_id, family, created_at, expires_at, \
         session_ends_at) VALUES ($1,$2,$3,$4,$5,$6,$7)",
    )
    .bind(&t.digest[..])
    .bind(t.kind.as_str())
    .bind(t.user_id)
    .bind(t.family)
    .bind(t.created_at)
    .bind(t.expires_at)
    .bind(t.session_ends_at)
    .execute(&mut **tx)
    .await
    .map_err(map_err)?;
    Ok(())
}

/// user_id, family, expires_at, used_at, session_ends_at.
type TokenRow = (
    Uuid,
    Option<Uuid>,
    DateTime<Utc>,
    Option<DateTime<Utc>>,
    Option<DateTime<Utc>>,
);

struct Spent {
    user_id: Uuid,
    family: Option<Uuid>,
    expires_at: DateTime<Utc>,
    session_ends_at: Option<DateTime<Utc>>,
}

/// Spends a token of `kind` under a row lock. A replayed refresh token
/// revokes its whole family (committed by the caller).
async fn spend(
    tx: &mut Transaction<'_, Postgres>,
    digest: &[u8; 32],
    kind: TokenKind,
    now: DateTime<Utc>,
) -> Result<Result<Spent, TokenUse>, StoreError> {
    let row: Option<TokenRow> = sqlx::query_as(
        "SELECT user_id, family, expires_at, used_at, session_ends_at FROM console_tokens \
         WHERE digest = $1 AND kind = $2 FOR UPDATE",
    )
    .bind(&digest[..])
    .bind(kind.as_str())
    .fetch_optional(&mut **tx)
    .await
    .map_err(map_err)?;
    let Some((user_id, family, expires_at, used_at, session_ends_at)) = row else {
        return Ok(Err(TokenUse::Unknown));
    };
    if used_at.is_some() {
        if let Some(family) = family {
            sqlx::query(
                "UPDATE console_tokens SET used_at = COALESCE(used_at, $2) WHERE family = $1",
            )
            .bind(family)
            .bind(now)
            .execute(&mut **tx)
            .await
            .map_err(map_err)?;
        }
        return Ok(Err(TokenUse::Replayed));
    }
    if expires_at <= now {
        return Ok(Err(TokenUse::Unknown));
    }
    sqlx::query("UPDATE console_tokens SET used_at = $2 WHERE digest = $1")
        .bind(&digest[..])
        .bind(now)
        .execute(&mut **tx)
        .await
        .map_err(map_err)?;
    Ok(Ok(Spent {
        user_id,
        family,
        expires_at,
        session_ends_at,
    }))
}

async fn user_tx(
    tx: &mut Transaction<'_, Postgres>,
    id: UserId,
) -> Result<ConsoleUser, StoreError> {
    let sql = format!("SELECT {USER_COLUMNS} FROM console_users WHERE user_id = $1");
    let row: UserRow = sqlx::query_as(&sql)
        .bind(id)
        .fetch_one(&mut **tx)
        .await
        .map_err(map_err)?;
    row.try_into()
}

/// Locks the tenant's users (so two changes cannot each remove "the other"
/// owner) and returns `user`, still with `expected_role`.
async fn lock_tenant_user(
    tx: &mut Transaction<'_, Postgres>,
    tenant: &TenantId,
    user: UserId,
    expected_role: Role,
) -> Result<ConsoleUser, StoreError> {
    let sql = format!(
        "SELECT {USER_COLUMNS} FROM console_users WHERE tenant_id = $1 ORDER BY user_id FOR UPDATE"
    );
    let rows: Vec<UserRow> = sqlx::query_as(&sql)
        .bind(tenant.as_str())
        .fetch_all(&mut **tx)
        .await
        .map_err(map_err)?;
    let row = rows
        .into_iter()
        .find(|r| r.user_id == user)
        .ok_or(StoreError::NotFound)?;
    let found = ConsoleUser::try_from(row)?;
    if found.role != expected_role {
        return Err(StoreError::Precondition(ROLE_MOVED));
    }
    Ok(found)
}

/// `Precondition` unless the tenant still has an enabled owner.
async fn keeps_an_owner(
    tx: &mut Transaction<'_, Postgres>,
    tenant: &TenantId,
) -> Result<(), StoreError> {
    let owners: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM console_users WHERE tenant_id = $1 AND role = 'owner' \
         AND disabled_at IS NULL",
    )
    .bind(tenant.as_str())
    .fetch_one(&mut **tx)
    .await
    .map_err(map_err)?;
    if owners == 0 {
        return Err(StoreError::Precondition(LAST_OWNER));
    }
    Ok(())
}

/// Ends every session of `user` and voids their outstanding tokens.
async fn end_everything(
    tx: &mut Transaction<'_, Postgres>,
    user: UserId,
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    sqlx::query("UPDATE console_tokens SET used_at = $2 WHERE user_id = $1 AND used_at IS NULL")
        .bind(user)
        .bind(now)
        .execute(&mut **tx)
        .await
        .map_err(map_err)?;
    Ok(())
}

#[async_trait]
impl ConsoleStore for PostgresStore {
    async fn sign_up(
        &self,
        t: Tenant,
        owner: ConsoleUser,
        verification: NewToken,
        ctx: &AuditContext,
    ) -> Result<(), StoreError> {
        let mut tx = begin(self.pool()).await?;
        let tenant = insert_tenant_row(&mut tx, &t).await?;
        insert_user(&mut tx, &owner).await?;
        insert_token_tx(&mut tx, &verification).await?;
        let created = audit::tenant_created(ctx, &tenant);
        insert_audit(&mut tx, &created).await?;
        insert_audit(&mut tx, &audit::user_created(ctx, &owner)).await?;
        tx.commit().await.map_err(map_err)
    }

    async fn create_user(
        &self,
        user: ConsoleUser,
        verification: NewToken,
        ctx: &AuditContext,
    ) -> Result<(), StoreError> {
        let mut tx = begin(self.pool()).await?;
        insert_user(&mut tx, &user).await?;
        insert_token_tx(&mut tx, &verification).await?;
        insert_audit(&mut tx, &audit::user_created(ctx, &user)).await?;
        tx.commit().await.map_err(map_err)
    }

    async fn user_by_email(&self, email: &Email) -> Result<Option<ConsoleUser>, StoreError> {
        let sql = format!("SELECT {USER_COLUMNS} FROM console_users WHERE email = $1");
        let row: Option<UserRow> = sqlx::query_as(&sql)
            .bind(email.as_str())
            .fetch_optional(self.pool())
            .await
            .map_err(map_err)?;
        row.map(ConsoleUser::try_from).transpose()
    }

    async fn list_users(&self, tenant: &TenantId) -> Result<Vec<ConsoleUser>, StoreError> {
        let sql = format!(
            "SELECT {USER_COLUMNS} FROM console_users WHERE tenant_id = $1 \
             ORDER BY created_at, user_id LIMIT 1000"
        );
        let rows: Vec<UserRow> = sqlx::query_as(&sql)
            .bind(tenant.as_str())
            .fetch_all(self.pool())
            .await
            .map_err(map_err)?;
        rows.into_iter().map(ConsoleUser::try_from).collect()
    }

    async fn insert_token(&self, token: NewToken) -> Result<(), StoreError> {
        let mut tx = begin(self.pool()).await?;
        insert_token_tx(&mut tx, &token).await?;
        tx.commit().await.map_err(map_err)
    }

    async fn rotate_refresh(
        &self,
        spent: &[u8; 32],
        next: NextRefresh,
        now: DateTime<Utc>,
    ) -> Result<TokenUse, StoreError> {
        let mut tx = begin(self.pool()).await?;
        let s = match spend(&mut tx, spent, TokenKind::Refresh, now).await? {
            Ok(s) => s,
            Err(outcome) => {
                // Commit the family revocation of a replay.
                tx.commit().await.map_err(map_err)?;
                return Ok(outcome);
            }
        };
        let user = user_tx(&mut tx, s.user_id).await?;
        if user.disabled_at.is_some() {
            return Ok(TokenUse::Unknown);
        }
        let expires_at = s
            .session_ends_at
            .map_or(next.expires_at, |end| next.expires_at.min(end));
        insert_token_tx(
            &mut tx,
            &NewToken {
                digest: next.digest,
                kind: TokenKind::Refresh,
                user_id: s.user_id,
                family: s.family,
                created_at: now,
                expires_at,
                session_ends_at: s.session_ends_at,
            },
        )
        .await?;
        tx.commit().await.map_err(map_err)?;
        Ok(TokenUse::Spent {
            user,
            family: s.family,
            expires_at,
        })
    }

    async fn end_session(&self, refresh: &[u8; 32], now: DateTime<Utc>) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE console_tokens SET used_at = COALESCE(used_at, $2) WHERE family = \
             (SELECT family FROM console_tokens WHERE digest = $1 AND kind = 'refresh')",
        )
        .bind(&refresh[..])
        .bind(now)
        .execute(self.pool())
        .await
        .map_err(map_err)?;
        Ok(())
    }

    async fn verify_email(
        &self,
        token: &[u8; 32],
        now: DateTime<Utc>,
    ) -> Result<TokenUse, StoreError> {
        let mut tx = begin(self.pool()).await?;
        let s = match spend(&mut tx, token, TokenKind::EmailVerification, now).await? {
            Ok(s) => s,
            Err(outcome) => return Ok(outcome),
        };
        sqlx::query(
            "UPDATE console_users SET email_verified_at = COALESCE(email_verified_at, $2), \
             updated_at = $2 WHERE user_id = $1",
        )
        .bind(s.user_id)
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(map_err)?;
        let user = user_tx(&mut tx, s.user_id).await?;
        if user.disabled_at.is_some() {
            return Ok(TokenUse::Unknown);
        }
        tx.commit().await.map_err(map_err)?;
        Ok(TokenUse::Spent {
            user,
            family: None,
            expires_at: s.expires_at,
        })
    }

    async fn reset_password(
        &self,
        token: &[u8; 32],
        hash: &PasswordHash,
        now: DateTime<Utc>,
        request_id: &str,
    ) -> Result<TokenUse, StoreError> {
        let mut tx = begin(self.pool()).await?;
        let s = match spend(&mut tx, token, TokenKind::PasswordReset, now).await? {
            Ok(s) => s,
            Err(outcome) => return Ok(outcome),
        };
        sqlx::query(
            "UPDATE console_users SET password_hash = $2, updated_at = $3 WHERE user_id = $1",
        )
        .bind(s.user_id)
        .bind(&hash.0)
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(map_err)?;
        // Every session and every other outstanding reset token ends.
        sqlx::query(
            "UPDATE console_tokens SET used_at = $2 WHERE user_id = $1 AND used_at IS NULL \
             AND kind IN ('refresh', 'password_reset')",
        )
        .bind(s.user_id)
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(map_err)?;
        let user = user_tx(&mut tx, s.user_id).await?;
        if user.disabled_at.is_some() {
            return Ok(TokenUse::Unknown);
        }
        let ctx = AuditContext {
            actor: format!("user:{}", user.id),
            request_id: request_id.to_string(),
        };
        let event = audit::password_reset(&ctx, &user, now);
        insert_audit(&mut tx, &event).await?;
        tx.commit().await.map_err(map_err)?;
        Ok(TokenUse::Spent {
            user,
            family: None,
            expires_at: s.expires_at,
        })
    }

    async fn token_is_live(
        &self,
        digest: &[u8; 32],
        kind: TokenKind,
        now: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM console_tokens t JOIN console_users u USING (user_id) \
             WHERE t.digest = $1 AND t.kind = $2 AND t.used_at IS NULL AND t.expires_at > $3 \
             AND u.disabled_at IS NULL)",
        )
        .bind(&digest[..])
        .bind(kind.as_str())
        .bind(now)
        .fetch_one(self.pool())
        .await
        .map_err(map_err)
    }

    async fn user_in(
        &self,
        tenant: &TenantId,
        user: UserId,
    ) -> Result<Option<ConsoleUser>, StoreError> {
        let sql = format!(
            "SELECT {USER_COLUMNS} FROM console_users WHERE tenant_id = $1 AND user_id = $2"
        );
        let row: Option<UserRow> = sqlx::query_as(&sql)
            .bind(tenant.as_str())
            .bind(user)
            .fetch_optional(self.pool())
            .await
            .map_err(map_err)?;
        row.map(ConsoleUser::try_from).transpose()
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
        let mut tx = begin(self.pool()).await?;
        let old = lock_tenant_user(&mut tx, tenant, user, expected_role).await?;
        let new = change.apply(&old, now);
        sqlx::query(
            "UPDATE console_users SET role = $2, disabled_at = $3, updated_at = $4 \
             WHERE user_id = $1",
        )
        .bind(user)
        .bind(new.role.as_str())
        .bind(new.disabled_at)
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(map_err)?;
        keeps_an_owner(&mut tx, tenant).await?;
        if new.disabled_at.is_some() {
            end_everything(&mut tx, user, now).await?;
        }
        insert_audit(&mut tx, &audit::user_updated(ctx, &old, &new, now)).await?;
        tx.commit().await.map_err(map_err)?;
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
        let mut tx = begin(self.pool()).await?;
        let old = lock_tenant_user(&mut tx, tenant, user, expected_role).await?;
        sqlx::query("DELETE FROM console_tokens WHERE user_id = $1")
            .bind(user)
            .execute(&mut *tx)
            .await
            .map_err(map_err)?;
        sqlx::query("DELETE FROM console_users WHERE user_id = $1")
            .bind(user)
            .execute(&mut *tx)
            .await
            .map_err(map_err)?;
        keeps_an_owner(&mut tx, tenant).await?;
        insert_audit(&mut tx, &audit::user_deleted(ctx, &old, now)).await?;
        tx.commit().await.map_err(map_err)?;
        Ok(old)
    }

    async fn purge_tokens(&self, before: DateTime<Utc>, limit: u32) -> Result<u64, StoreError> {
        let done = sqlx::query(
            "DELETE FROM console_tokens WHERE digest IN (SELECT digest FROM console_tokens \
             WHERE expires_at < $1 LIMIT $2 FOR UPDATE SKIP LOCKED)",
        )
        .bind(before)
        .bind(i64::from(limit))
        .execute(self.pool())
        .await
        .map_err(map_err)?;
        Ok(done.rows_affected())
    }

    async fn list_audit(
        &self,
        tenant: Option<&TenantId>,
        before: Option<Uuid>,
        limit: u32,
    ) -> Result<Vec<AuditEvent>, StoreError> {
        let rows: Vec<AuditRow> = sqlx::query_as(
            "SELECT event_id, at, tenant_id, actor, action, target, request_id, details \
             FROM audit_events WHERE ($1::text IS NULL OR tenant_id = $1) \
             AND ($2::uuid IS NULL OR event_id < $2) ORDER BY event_id DESC LIMIT $3",
        )
        .bind(tenant.map(TenantId::as_str))
        .bind(before)
        .bind(i64::from(limit))
        .fetch_all(self.pool())
        .await
        .map_err(map_err)?;
        rows.into_iter()
            .map(|r| {
                Ok(AuditEvent {
                    id: r.event_id,
                    at: r.at,
                    tenant_id: TenantId::parse(&r.tenant_id).ok_or_else(|| {
                        StoreError::Internal("stored audit tenant id is malformed".into())
                    })?,
                    actor: r.actor,
                    action: r.action,
                    target: r.target,
                    request_id: r.request_id,
                    details: r.details.0,
                })
            })
            .collect()
    }

    async fn user_by_identity(
        &self,
        issuer: &str,
        subject: &str,
    ) -> Result<Option<ConsoleUser>, StoreError> {
        identities::user_by_identity(self, issuer, subject).await
    }

    async fn link_identity(
        &self,
        identity: Identity,
        ctx: &AuditContext,
        now: DateTime<Utc>,
    ) -> Result<(ConsoleUser, LinkEffects), StoreError> {
        identities::link_identity(self, identity, ctx, now).await
    }

    async fn sign_up_with_identity(
        &self,
        tenant: Tenant,
        owner: ConsoleUser,
        identity: Identity,
        ctx: &AuditContext,
    ) -> Result<(), StoreError> {
        identities::sign_up_with_identity(self, tenant, owner, identity, ctx).await
    }
}

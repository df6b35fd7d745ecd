//! Postgres side of provider identities (`console_identities`): lookup,
//! linking to an existing account, and sign-up through a provider. Each
//! change is one transaction with its audit rows.

use chrono::{DateTime, Utc};
use sqlx::{Postgres, Transaction};

use super::{insert_user, user_tx, UserRow, USER_COLUMNS};
use crate::domain::audit;
use crate::domain::console::{AuditContext, ConsoleUser};
use crate::domain::identity::{identity_linked, Identity, LinkEffects};
use crate::domain::Tenant;
use crate::store::postgres::audit_log::insert_audit;
use crate::store::postgres::{begin, insert_tenant_row, map_err};
use crate::store::{PostgresStore, StoreError};

async fn insert_identity(
    tx: &mut Transaction<'_, Postgres>,
    i: &Identity,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO console_identities (issuer, subject, user_id, email, created_at) \
         VALUES ($1,$2,$3,$4,$5)",
    )
    .bind(&i.issuer)
    .bind(&i.subject)
    .bind(i.user_id)
    .bind(i.email.as_str())
    .bind(i.created_at)
    .execute(&mut **tx)
    .await
    .map_err(map_err)?;
    Ok(())
}

pub(super) async fn user_by_identity(
    store: &PostgresStore,
    issuer: &str,
    subject: &str,
) -> Result<Option<ConsoleUser>, StoreError> {
    let columns = USER_COLUMNS
        .split(", ")
        .map(|c| format!("u.{c}"))
        .collect::<Vec<_>>()
        .join(", ");
    let sql = format!(
        "SELECT {columns} FROM console_identities i JOIN console_users u USING (user_id) \
         WHERE i.issuer = $1 AND i.subject = $2"
    );
    let row: Option<UserRow> = sqlx::query_as(&sql)
        .bind(issuer)
        .bind(subject)
        .fetch_optional(store.pool())
        .await
        .map_err(map_err)?;
    row.map(ConsoleUser::try_from).transpose()
}

pub(super) async fn link_identity(
    store: &PostgresStore,
    identity: Identity,
    ctx: &AuditContext,
    now: DateTime<Utc>,
) -> Result<(ConsoleUser, LinkEffects), StoreError> {
    let mut tx = begin(store.pool()).await?;
    let sql = format!("SELECT {USER_COLUMNS} FROM console_users WHERE user_id = $1 FOR UPDATE");
    let row: Option<UserRow> = sqlx::query_as(&sql)
        .bind(identity.user_id)
        .fetch_optional(&mut *tx)
        .await
        .map_err(map_err)?;
    let user = ConsoleUser::try_from(row.ok_or(StoreError::NotFound)?)?;
    if user.email != identity.email {
        // The account's address changed since it was looked up.
        return Err(StoreError::NotFound);
    }
    let effects = LinkEffects::for_user(&user);
    insert_identity(&mut tx, &identity).await?;
    if effects.verify_email || effects.drop_password {
        sqlx::query(
            "UPDATE console_users SET \
             email_verified_at = COALESCE(email_verified_at, $2), \
             password_hash = CASE WHEN $3 THEN NULL ELSE password_hash END, \
             updated_at = $2 WHERE user_id = $1",
        )
        .bind(user.id)
        .bind(now)
        .bind(effects.drop_password)
        .execute(&mut *tx)
        .await
        .map_err(map_err)?;
    }
    if effects.drop_password {
        // Whoever set that password never proved the address: their
        // sessions and pending tokens end with it.
        sqlx::query(
            "UPDATE console_tokens SET used_at = $2 WHERE user_id = $1 AND used_at IS NULL",
        )
        .bind(user.id)
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(map_err)?;
    }
    insert_audit(&mut tx, &identity_linked(ctx, &user, &identity, effects)).await?;
    let changed = user_tx(&mut tx, user.id).await?;
    tx.commit().await.map_err(map_err)?;
    Ok((changed, effects))
}

pub(super) async fn sign_up_with_identity(
    store: &PostgresStore,
    t: Tenant,
    owner: ConsoleUser,
    identity: Identity,
    ctx: &AuditContext,
) -> Result<(), StoreError> {
    let mut tx = begin(store.pool()).await?;
    let tenant = insert_tenant_row(&mut tx, &t).await?;
    insert_user(&mut tx, &owner).await?;
    insert_identity(&mut tx, &identity).await?;
    insert_audit(&mut tx, &audit::tenant_created(ctx, &tenant)).await?;
    insert_audit(&mut tx, &audit::user_created(ctx, &owner)).await?;
    tx.commit().await.map_err(map_err)
}

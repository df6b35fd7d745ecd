//! Tenants: their rows, the one INSERT (CreateTenant and SignUp), reads,
//! and updates (which may carry the month's quota usage to a new period).

use chrono::{DateTime, Utc};
use sqlx::types::Json;
use sqlx::{Postgres, Transaction};

use super::audit_log::insert_audit;
use super::{begin, map_err, notify, PostgresStore};
use crate::domain::audit;
use crate::domain::console::AuditContext;
use crate::domain::{SubscriptionStatus, Tenant, TenantId, TenantOverrides, TenantUpdate};
use crate::store::{Invalidation, StoreError};

#[derive(sqlx::FromRow)]
pub(super) struct TenantRow {
    tenant_id: String,
    name: String,
    plan: String,
    subscription_status: String,
    overrides: Json<TenantOverrides>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

impl TryFrom<TenantRow> for Tenant {
    type Error = StoreError;
    fn try_from(r: TenantRow) -> Result<Self, StoreError> {
        Ok(Tenant {
            id: TenantId::parse(&r.tenant_id)
                .ok_or_else(|| StoreError::Internal("stored tenant id is malformed".into()))?,
            name: r.name,
            plan: r.plan,
            status: SubscriptionStatus::parse(&r.subscription_status)
                .ok_or_else(|| StoreError::Internal("stored status is unknown".into()))?,
            overrides: r.overrides.0,
            created_at: r.created_at,
            updated_at: r.updated_at,
        })
    }
}

/// Inserts a tenant row; the one INSERT for tenants (CreateTenant, SignUp).
pub(in crate::store) async fn insert_tenant_row(
    tx: &mut Transaction<'_, Postgres>,
    t: &Tenant,
) -> Result<Tenant, StoreError> {
    let row: TenantRow = sqlx::query_as(
        "INSERT INTO tenants (tenant_id, name, plan, subscription_status, overrides, \
         created_at, updated_at) VALUES ($1,$2,$3,$4,$5,$6,$7) RETURNING *",
    )
    .bind(t.id.as_str())
    .bind(&t.name)
    .bind(&t.plan)
    .bind(t.status.as_str())
    .bind(Json(&t.overrides))
    .bind(t.created_at)
    .bind(t.updated_at)
    .fetch_one(&mut **tx)
    .await
    .map_err(map_err)?;
    row.try_into()
}

pub(super) async fn create_tenant(
    store: &PostgresStore,
    t: Tenant,
    ctx: &AuditContext,
) -> Result<Tenant, StoreError> {
    let mut tx = begin(&store.pool).await?;
    let tenant = insert_tenant_row(&mut tx, &t).await?;
    insert_audit(&mut tx, &audit::tenant_created(ctx, &tenant)).await?;
    tx.commit().await.map_err(map_err)?;
    Ok(tenant)
}

pub(super) async fn get_tenant(
    store: &PostgresStore,
    id: &TenantId,
) -> Result<Option<Tenant>, StoreError> {
    let row: Option<TenantRow> = store
        .bounded(
            "get_tenant",
            sqlx::query_as("SELECT * FROM tenants WHERE tenant_id = $1")
                .bind(id.as_str())
                .fetch_optional(&store.pool),
        )
        .await?;
    row.map(Tenant::try_from).transpose()
}

pub(super) async fn update_tenant(
    store: &PostgresStore,
    id: &TenantId,
    u: &TenantUpdate,
    now: DateTime<Utc>,
    ctx: &AuditContext,
) -> Result<Tenant, StoreError> {
    let mut tx = begin(&store.pool).await?;
    let row: Option<TenantRow> = sqlx::query_as(
        "UPDATE tenants SET name = COALESCE($2, name), plan = COALESCE($3, plan), \
         subscription_status = COALESCE($4, subscription_status), \
         overrides = COALESCE($5, overrides), updated_at = now() \
         WHERE tenant_id = $1 RETURNING *",
    )
    .bind(id.as_str())
    .bind(u.name.as_deref())
    .bind(u.plan.as_deref())
    .bind(u.status.map(SubscriptionStatus::as_str))
    .bind(u.overrides.as_ref().map(Json))
    .fetch_optional(&mut *tx)
    .await
    .map_err(map_err)?;
    let tenant: Tenant = row.ok_or(StoreError::NotFound)?.try_into()?;
    if let Some(carry) = u.carry_month_usage {
        // The tenant's and its keys' monthly counters ('t:<tenant>[:env]',
        // 'k:<lineage>[:env]'); GREATEST, so carrying back and forth
        // within a period never counts a unit twice.
        sqlx::query(
            "INSERT INTO quota_usage AS q (subject, limit_name, period_start, used) \
             SELECT c.subject, c.limit_name, $3, c.used FROM quota_usage c \
             WHERE c.period_start = $2 AND c.limit_name LIKE '%\\_per\\_month' \
               AND ((split_part(c.subject, ':', 1) = 't' AND split_part(c.subject, ':', 2) = $1) \
                 OR (split_part(c.subject, ':', 1) = 'k' AND split_part(c.subject, ':', 2) IN \
                     (SELECT lineage_id::text FROM api_keys WHERE tenant_id = $1))) \
             ON CONFLICT (subject, limit_name, period_start) \
             DO UPDATE SET used = GREATEST(q.used, EXCLUDED.used), updated_at = now()",
        )
        .bind(id.as_str())
        .bind(carry.from)
        .bind(carry.to)
        .execute(&mut *tx)
        .await
        .map_err(map_err)?;
    }
    insert_audit(&mut tx, &audit::tenant_updated(ctx, &tenant, u, now)).await?;
    notify(&mut tx, &Invalidation::Tenant(id.clone())).await?;
    tx.commit().await.map_err(map_err)?;
    Ok(tenant)
}

pub(super) async fn list_tenants(
    store: &PostgresStore,
    after: Option<&TenantId>,
    limit: u32,
) -> Result<Vec<Tenant>, StoreError> {
    let rows: Vec<TenantRow> = sqlx::query_as(
        "SELECT * FROM tenants WHERE ($1::text IS NULL OR tenant_id > $1) \
         ORDER BY tenant_id LIMIT $2",
    )
    .bind(after.map(TenantId::as_str))
    .bind(i64::from(limit))
    .fetch_all(&store.pool)
    .await
    .map_err(map_err)?;
    rows.into_iter().map(Tenant::try_from).collect()
}

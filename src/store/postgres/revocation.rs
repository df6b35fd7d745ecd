//! Automatic revocation: tenants' policy overrides (`revocation_policies`),
//! the keys a policy matches (dry run) and revokes (one `UPDATE … FROM
//! (SELECT … FOR UPDATE SKIP LOCKED)` per batch, so concurrent sweepers on
//! many replicas never revoke, audit or publish a key twice), and leak
//! reports (`leaked_keys`).

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::audit_log::insert_audit;
use super::keys::{KeyRow, KEY_COLUMNS};
use super::{begin, map_err, notify, PostgresStore};
use crate::domain::audit;
use crate::domain::console::AuditContext;
use crate::domain::revocation::{
    Criteria, LeakOutcome, LeakSource, PolicyMatch, PolicyOverride, PolicyReason,
};
use crate::domain::{KeyId, KeyRecord, TenantId};
use crate::store::{Invalidation, StoreError};

/// The rule a key of `api_keys k` falls under (NULL: none), in
/// [`Criteria::matches`]'s order. `$3` unused-before, `$4` created-before
/// (NULL: rule off, so the comparison is NULL), `$5` whether leaked keys
/// are revoked.
const POLICY: &str = "CASE \
    WHEN $5 AND EXISTS (SELECT 1 FROM leaked_keys l WHERE l.key_id = k.key_id) \
        THEN 'reported_leaked' \
    WHEN k.replaced_by IS NULL AND k.created_at < $4::timestamptz THEN 'max_age' \
    WHEN k.replaced_by IS NULL AND COALESCE(k.last_used_at, k.created_at) < $3::timestamptz \
        THEN 'unused' \
    END";

/// The keys a policy may look at: the tenant's (`$1`), neither revoked nor
/// expired at `$2`.
const CANDIDATES: &str = "k.tenant_id = $1 AND k.revoked_at IS NULL \
    AND (k.expires_at IS NULL OR k.expires_at > $2::timestamptz)";

#[derive(sqlx::FromRow)]
struct MatchRow {
    #[sqlx(flatten)]
    key: KeyRow,
    policy: String,
}

impl TryFrom<MatchRow> for PolicyMatch {
    type Error = StoreError;
    fn try_from(r: MatchRow) -> Result<Self, StoreError> {
        Ok(PolicyMatch {
            reason: PolicyReason::parse(&r.policy)
                .ok_or_else(|| StoreError::Internal("unknown policy reason".into()))?,
            key: r.key.try_into()?,
        })
    }
}

#[derive(sqlx::FromRow)]
struct OverrideRow {
    unused_days: Option<i32>,
    max_age_days: Option<i32>,
    revoke_leaked: Option<bool>,
}

fn days(d: Option<i32>) -> Option<u32> {
    d.and_then(|d| u32::try_from(d).ok())
}

fn days_param(d: Option<u32>) -> Option<i32> {
    d.map(|d| i32::try_from(d).unwrap_or(i32::MAX))
}

pub(super) async fn get_override(
    store: &PostgresStore,
    tenant: &TenantId,
) -> Result<Option<PolicyOverride>, StoreError> {
    let row: Option<OverrideRow> = sqlx::query_as(
        "SELECT unused_days, max_age_days, revoke_leaked FROM revocation_policies \
         WHERE tenant_id = $1",
    )
    .bind(tenant.as_str())
    .fetch_optional(&store.pool)
    .await
    .map_err(map_err)?;
    Ok(row.map(|r| PolicyOverride {
        unused_days: days(r.unused_days),
        max_age_days: days(r.max_age_days),
        revoke_leaked: r.revoke_leaked,
    }))
}

pub(super) async fn set_override(
    store: &PostgresStore,
    tenant: &TenantId,
    policy: Option<&PolicyOverride>,
    now: DateTime<Utc>,
    ctx: &AuditContext,
) -> Result<(), StoreError> {
    let mut tx = begin(&store.pool).await?;
    // The tenant row locked: concurrent changes of one tenant's policy
    // queue, so each audit row's `old` is what the change replaced.
    let exists: Option<String> =
        sqlx::query_scalar("SELECT tenant_id FROM tenants WHERE tenant_id = $1 FOR UPDATE")
            .bind(tenant.as_str())
            .fetch_optional(&mut *tx)
            .await
            .map_err(map_err)?;
    if exists.is_none() {
        return Err(StoreError::NotFound);
    }
    let old: Option<OverrideRow> = sqlx::query_as(
        "DELETE FROM revocation_policies WHERE tenant_id = $1 \
         RETURNING unused_days, max_age_days, revoke_leaked",
    )
    .bind(tenant.as_str())
    .fetch_optional(&mut *tx)
    .await
    .map_err(map_err)?;
    let old = old.map(|r| PolicyOverride {
        unused_days: days(r.unused_days),
        max_age_days: days(r.max_age_days),
        revoke_leaked: r.revoke_leaked,
    });
    if let Some(p) = policy {
        sqlx::query(
            "INSERT INTO revocation_policies (tenant_id, unused_days, max_age_days, \
             revoke_leaked, updated_at) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(tenant.as_str())
        .bind(days_param(p.unused_days))
        .bind(days_param(p.max_age_days))
        .bind(p.revoke_leaked)
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(map_err)?;
    }
    insert_audit(
        &mut tx,
        &audit::revocation_policy_updated(ctx, tenant, old.as_ref(), policy, now),
    )
    .await?;
    tx.commit().await.map_err(map_err)?;
    Ok(())
}

pub(super) async fn policy_matches(
    store: &PostgresStore,
    tenant: &TenantId,
    c: &Criteria,
    after: Option<KeyId>,
    limit: u32,
) -> Result<Vec<PolicyMatch>, StoreError> {
    let sql = format!(
        "SELECT * FROM (SELECT {KEY_COLUMNS}, {POLICY} AS policy FROM api_keys k \
         WHERE {CANDIDATES} AND ($6::uuid IS NULL OR k.key_id > $6)) m \
         WHERE policy IS NOT NULL ORDER BY key_id LIMIT $7"
    );
    let rows: Vec<MatchRow> = sqlx::query_as(&sql)
        .bind(tenant.as_str())
        .bind(c.now)
        .bind(c.unused_before)
        .bind(c.created_before)
        .bind(c.leaked)
        .bind(after)
        .bind(i64::from(limit))
        .fetch_all(&store.pool)
        .await
        .map_err(map_err)?;
    rows.into_iter().map(PolicyMatch::try_from).collect()
}

pub(super) async fn revoke_by_policy(
    store: &PostgresStore,
    tenant: &TenantId,
    c: &Criteria,
    limit: u32,
    ctx: &AuditContext,
) -> Result<Vec<PolicyMatch>, StoreError> {
    let mut tx = begin(&store.pool).await?;
    // Rows another sweeper has locked are skipped (it revokes them); a row
    // locked here is re-checked against the predicate after the lock, and
    // the UPDATE checks `revoked_at IS NULL` again: revoked once.
    let sql = format!(
        "WITH victims AS (SELECT k.key_id AS victim_id, {POLICY} AS policy FROM api_keys k \
         WHERE {CANDIDATES} AND ({POLICY}) IS NOT NULL \
         ORDER BY k.key_id LIMIT $6 FOR UPDATE OF k SKIP LOCKED) \
         UPDATE api_keys SET revoked_at = now(), revoke_reason = 'policy:' || v.policy \
         FROM victims v WHERE key_id = v.victim_id AND revoked_at IS NULL \
         RETURNING {KEY_COLUMNS}, v.policy"
    );
    let rows: Vec<MatchRow> = sqlx::query_as(&sql)
        .bind(tenant.as_str())
        .bind(c.now)
        .bind(c.unused_before)
        .bind(c.created_before)
        .bind(c.leaked)
        .bind(i64::from(limit))
        .fetch_all(&mut *tx)
        .await
        .map_err(map_err)?;
    let mut revoked: Vec<PolicyMatch> = rows
        .into_iter()
        .map(PolicyMatch::try_from)
        .collect::<Result<_, _>>()?;
    revoked.sort_by_key(|m| m.key.id);
    for m in &revoked {
        let at = m.key.revoked_at.unwrap_or(c.now);
        insert_audit(
            &mut tx,
            &audit::key_revoked_by_policy(ctx, &m.key, m.reason, c, at),
        )
        .await?;
        notify(&mut tx, &Invalidation::Key(m.key.id)).await?;
    }
    tx.commit().await.map_err(map_err)?;
    Ok(revoked)
}

pub(super) async fn report_leak(
    store: &PostgresStore,
    id: KeyId,
    revoke: bool,
    source: &LeakSource,
    now: DateTime<Utc>,
    ctx: &AuditContext,
) -> Result<LeakOutcome, StoreError> {
    let mut tx = begin(&store.pool).await?;
    let first: Option<Uuid> = sqlx::query_scalar(
        "INSERT INTO leaked_keys (key_id, tenant_id, reported_at, reporter, url, source) \
         SELECT key_id, tenant_id, $2, $3, $4, $5 FROM api_keys WHERE key_id = $1 \
         ON CONFLICT (key_id) DO NOTHING RETURNING key_id",
    )
    .bind(id)
    .bind(now)
    .bind(&source.reporter)
    .bind(&source.url)
    .bind(&source.source)
    .fetch_optional(&mut *tx)
    .await
    .map_err(map_err)?;
    let revoked: Option<KeyRow> = if revoke {
        let sql = format!(
            "UPDATE api_keys SET revoked_at = now(), revoke_reason = $2 \
             WHERE key_id = $1 AND revoked_at IS NULL RETURNING {KEY_COLUMNS}"
        );
        sqlx::query_as(&sql)
            .bind(id)
            .bind(PolicyReason::ReportedLeaked.revoke_reason())
            .fetch_optional(&mut *tx)
            .await
            .map_err(map_err)?
    } else {
        None
    };
    let was_revoked = revoked.is_some();
    let key: KeyRecord = match revoked {
        Some(row) => row.try_into()?,
        None => {
            let sql = format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE key_id = $1");
            let row: Option<KeyRow> = sqlx::query_as(&sql)
                .bind(id)
                .fetch_optional(&mut *tx)
                .await
                .map_err(map_err)?;
            row.ok_or(StoreError::NotFound)?.try_into()?
        }
    };
    insert_audit(
        &mut tx,
        &audit::key_leak_reported(ctx, &key, source, was_revoked, now),
    )
    .await?;
    if was_revoked {
        let c = Criteria {
            now,
            unused_before: None,
            created_before: None,
            leaked: true,
        };
        let at = key.revoked_at.unwrap_or(now);
        insert_audit(
            &mut tx,
            &audit::key_revoked_by_policy(ctx, &key, PolicyReason::ReportedLeaked, &c, at),
        )
        .await?;
        notify(&mut tx, &Invalidation::Key(key.id)).await?;
    }
    tx.commit().await.map_err(map_err)?;
    Ok(LeakOutcome {
        key,
        first_report: first.is_some(),
        revoked: was_revoked,
    })
}

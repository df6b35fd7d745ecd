//! API keys: their rows, the per-tenant live-key cap, and every key
//! write (create, revoke, rotate, update, last use) with its audit row and
//! change record in one transaction.

use std::sync::LazyLock;

use chrono::{DateTime, Utc};
use sqlx::postgres::PgRow;
use sqlx::types::Json;
use sqlx::{Postgres, Row, Transaction};
use uuid::Uuid;

use super::audit_log::insert_audit;
use super::tenants::TenantRow;
use super::{begin, map_err, notify, timed, PostgresStore};
use crate::crypto::KeyDigest;
use crate::domain::audit;
use crate::domain::console::AuditContext;
use crate::domain::{KeyId, KeyLabels, KeyRecord, KeyUpdate, LimitSpec, NewKey, Tenant, TenantId};
use crate::store::{Invalidation, KeyCap, KeyRef, StoreError};

/// Digests read per query when loading the known-digest set.
const DIGEST_PAGE: u32 = 10_000;

#[derive(sqlx::FromRow)]
pub(super) struct KeyRow {
    key_id: Uuid,
    tenant_id: String,
    name: String,
    environment: String,
    scopes: Vec<String>,
    hint: String,
    digest: Vec<u8>,
    pepper_version: i32,
    created_at: DateTime<Utc>,
    expires_at: Option<DateTime<Utc>>,
    revoked_at: Option<DateTime<Utc>>,
    revoke_reason: Option<String>,
    last_used_at: Option<DateTime<Utc>>,
    replaced_by: Option<Uuid>,
    limits: Option<Json<Vec<LimitSpec>>>,
    lineage_id: Uuid,
    labels: Json<KeyLabels>,
    format: String,
}

impl TryFrom<KeyRow> for KeyRecord {
    type Error = StoreError;
    fn try_from(r: KeyRow) -> Result<Self, StoreError> {
        Ok(KeyRecord {
            id: r.key_id,
            tenant_id: TenantId::parse(&r.tenant_id)
                .ok_or_else(|| StoreError::Internal("stored tenant id is malformed".into()))?,
            name: r.name,
            environment: r.environment,
            scopes: r.scopes,
            hint: r.hint,
            digest: KeyDigest::from_slice(&r.digest)
                .ok_or_else(|| StoreError::Internal("stored digest has the wrong length".into()))?,
            pepper_version: r.pepper_version,
            created_at: r.created_at,
            expires_at: r.expires_at,
            revoked_at: r.revoked_at,
            revoke_reason: r.revoke_reason,
            last_used_at: r.last_used_at,
            replaced_by: r.replaced_by,
            limits: r.limits.map(|j| j.0),
            lineage_id: r.lineage_id,
            labels: r.labels.0,
            legacy: r.format == "legacy",
        })
    }
}

pub(super) const KEY_COLUMNS: &str = "key_id, tenant_id, name, environment, scopes, hint, digest, \
    pepper_version, created_at, expires_at, revoked_at, revoke_reason, last_used_at, replaced_by, \
    limits, lineage_id, labels, format";

/// [`KEY_COLUMNS`] with the display-only ones left empty (what
/// `KeyRecord::for_decisions` drops): less to send and decode per miss.
const DECISION_COLUMNS: &str = "key_id, tenant_id, ''::text AS name, environment, scopes, \
    ''::text AS hint, digest, pepper_version, created_at, expires_at, revoked_at, \
    NULL::text AS revoke_reason, NULL::timestamptz AS last_used_at, replaced_by, limits, \
    lineage_id, labels, format";

/// A row of [`DECISION_COLUMNS`], decoded by position: by name, each of its
/// 18 columns is a lookup, on the path every cache miss takes.
fn decision_row(row: PgRow) -> Result<KeyRow, sqlx::Error> {
    Ok(KeyRow {
        key_id: row.try_get(0)?,
        tenant_id: row.try_get(1)?,
        name: row.try_get(2)?,
        environment: row.try_get(3)?,
        scopes: row.try_get(4)?,
        hint: row.try_get(5)?,
        digest: row.try_get(6)?,
        pepper_version: row.try_get(7)?,
        created_at: row.try_get(8)?,
        expires_at: row.try_get(9)?,
        revoked_at: row.try_get(10)?,
        revoke_reason: row.try_get(11)?,
        last_used_at: row.try_get(12)?,
        replaced_by: row.try_get(13)?,
        limits: row.try_get(14)?,
        lineage_id: row.try_get(15)?,
        labels: row.try_get(16)?,
        format: row.try_get(17)?,
    })
}

async fn insert_key_row(
    tx: &mut Transaction<'_, Postgres>,
    key: &NewKey,
) -> Result<KeyRecord, StoreError> {
    let sql = format!(
        "INSERT INTO api_keys (key_id, tenant_id, name, environment, scopes, hint, digest, \
         pepper_version, created_at, expires_at, limits, lineage_id, labels, format) \
         VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13,$14) \
         RETURNING {KEY_COLUMNS}"
    );
    let row: KeyRow = sqlx::query_as(&sql)
        .bind(key.id)
        .bind(key.tenant_id.as_str())
        .bind(&key.name)
        .bind(&key.environment)
        .bind(&key.scopes)
        .bind(&key.hint)
        .bind(&key.digest.as_bytes()[..])
        .bind(key.pepper_version)
        .bind(key.created_at)
        .bind(key.expires_at)
        .bind(key.limits.as_ref().map(Json))
        .bind(key.lineage_id)
        .bind(Json(&key.labels))
        .bind(if key.legacy { "legacy" } else { "tollgate" })
        .fetch_one(&mut **tx)
        .await
        .map_err(map_err)?;
    row.try_into()
}

async fn lock_key(
    tx: &mut Transaction<'_, Postgres>,
    key: KeyRef<'_>,
) -> Result<KeyRecord, StoreError> {
    let sql = format!(
        "SELECT {KEY_COLUMNS} FROM api_keys WHERE key_id = $1 \
         AND ($2::text IS NULL OR tenant_id = $2) FOR UPDATE"
    );
    let row: Option<KeyRow> = sqlx::query_as(&sql)
        .bind(key.id)
        .bind(key.tenant.map(TenantId::as_str))
        .fetch_optional(&mut **tx)
        .await
        .map_err(map_err)?;
    row.ok_or(StoreError::NotFound)?.try_into()
}

/// Locks the tenant row and fails with `KeyCapReached` if it already holds
/// `cap(tenant)` live keys at `now`: concurrent inserts and revivals for
/// one tenant queue on the lock, so the count cannot go stale.
async fn check_cap(
    tx: &mut Transaction<'_, Postgres>,
    tenant_id: &TenantId,
    cap: KeyCap<'_>,
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    let tenant: Option<TenantRow> =
        sqlx::query_as("SELECT * FROM tenants WHERE tenant_id = $1 FOR UPDATE")
            .bind(tenant_id.as_str())
            .fetch_optional(&mut **tx)
            .await
            .map_err(map_err)?;
    let tenant: Tenant = tenant.ok_or(StoreError::NotFound)?.try_into()?;
    if let Some(cap) = cap(&tenant) {
        let live: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM api_keys WHERE tenant_id = $1 AND revoked_at IS NULL \
             AND replaced_by IS NULL AND (expires_at IS NULL OR expires_at > $2)",
        )
        .bind(tenant_id.as_str())
        .bind(now)
        .fetch_one(&mut **tx)
        .await
        .map_err(map_err)?;
        if live >= i64::from(cap) {
            return Err(StoreError::KeyCapReached { cap });
        }
    }
    Ok(())
}

pub(super) async fn insert_key(
    store: &PostgresStore,
    key: NewKey,
    cap: KeyCap<'_>,
    ctx: &AuditContext,
) -> Result<KeyRecord, StoreError> {
    let mut tx = begin(&store.pool).await?;
    check_cap(&mut tx, &key.tenant_id, cap, key.created_at).await?;
    let record = insert_key_row(&mut tx, &key).await?;
    insert_audit(&mut tx, &audit::key_created(ctx, &record)).await?;
    notify(&mut tx, &Invalidation::KeyAdded(record.digest)).await?;
    tx.commit().await.map_err(map_err)?;
    Ok(record)
}

pub(super) async fn find_key_by_digest(
    store: &PostgresStore,
    digest: &KeyDigest,
) -> Result<Option<KeyRecord>, StoreError> {
    let sql = format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE digest = $1");
    let row: Option<KeyRow> = store
        .bounded(
            "find_key",
            sqlx::query_as(&sql)
                .bind(&digest.as_bytes()[..])
                .fetch_optional(&store.pool),
        )
        .await?;
    row.map(KeyRecord::try_from).transpose()
}

/// One statement for many digests (`= ANY($1)`: each matching row once,
/// however often its digest is listed).
pub(super) async fn find_keys_by_digests(
    store: &PostgresStore,
    digests: &[KeyDigest],
) -> Result<Vec<KeyRecord>, StoreError> {
    if digests.is_empty() {
        return Ok(Vec::new());
    }
    static SQL: LazyLock<String> =
        LazyLock::new(|| format!("SELECT {DECISION_COLUMNS} FROM api_keys WHERE digest = ANY($1)"));
    let rows: Vec<KeyRow> = store
        .bounded(
            "find_keys",
            store.held.read(&store.pool, |conn| {
                // Owned, built per attempt: the statement's future may
                // outlive this borrow as far as the type says (held.rs).
                let bytes: Vec<Vec<u8>> = digests.iter().map(|d| d.as_bytes().to_vec()).collect();
                Box::pin(
                    sqlx::query(SQL.as_str())
                        .bind(bytes)
                        .try_map(decision_row)
                        .fetch_all(conn),
                )
            }),
        )
        .await?;
    rows.into_iter().map(KeyRecord::try_from).collect()
}

pub(super) async fn key_digests(store: &PostgresStore) -> Result<Vec<KeyDigest>, StoreError> {
    let mut all = Vec::new();
    let mut after = None;
    loop {
        let page = key_digests_page(store, after, DIGEST_PAGE).await?;
        after = page.last().copied();
        let done = page.len() < DIGEST_PAGE as usize;
        all.extend(page);
        if done {
            return Ok(all);
        }
    }
}

pub(super) async fn key_digests_page(
    store: &PostgresStore,
    after: Option<KeyDigest>,
    limit: u32,
) -> Result<Vec<KeyDigest>, StoreError> {
    let rows: Vec<Vec<u8>> = timed(
        "key_digests",
        sqlx::query_scalar(
            "SELECT digest FROM api_keys WHERE ($1::bytea IS NULL OR digest > $1) \
             ORDER BY digest LIMIT $2",
        )
        .bind(after.as_ref().map(|d| &d.as_bytes()[..]))
        .bind(i64::from(limit))
        .fetch_all(&store.pool),
    )
    .await
    .map_err(map_err)?;
    rows.iter()
        .map(|b| {
            KeyDigest::from_slice(b)
                .ok_or_else(|| StoreError::Internal("stored key digest is malformed".into()))
        })
        .collect()
}

pub(super) async fn get_key(
    store: &PostgresStore,
    key: KeyRef<'_>,
) -> Result<Option<KeyRecord>, StoreError> {
    let sql = format!(
        "SELECT {KEY_COLUMNS} FROM api_keys WHERE key_id = $1 \
         AND ($2::text IS NULL OR tenant_id = $2)"
    );
    let row: Option<KeyRow> = sqlx::query_as(&sql)
        .bind(key.id)
        .bind(key.tenant.map(TenantId::as_str))
        .fetch_optional(&store.pool)
        .await
        .map_err(map_err)?;
    row.map(KeyRecord::try_from).transpose()
}

pub(super) async fn list_keys(
    store: &PostgresStore,
    tenant: &TenantId,
    after: Option<KeyId>,
    limit: u32,
    include_revoked: bool,
) -> Result<Vec<KeyRecord>, StoreError> {
    let sql = format!(
        "SELECT {KEY_COLUMNS} FROM api_keys WHERE tenant_id = $1 \
         AND ($2::uuid IS NULL OR key_id > $2) AND ($3 OR revoked_at IS NULL) \
         ORDER BY key_id LIMIT $4"
    );
    let rows: Vec<KeyRow> = sqlx::query_as(&sql)
        .bind(tenant.as_str())
        .bind(after)
        .bind(include_revoked)
        .bind(i64::from(limit))
        .fetch_all(&store.pool)
        .await
        .map_err(map_err)?;
    rows.into_iter().map(KeyRecord::try_from).collect()
}

pub(super) async fn revoke_key(
    store: &PostgresStore,
    key: KeyRef<'_>,
    reason: &str,
    now: DateTime<Utc>,
    ctx: &AuditContext,
) -> Result<KeyRecord, StoreError> {
    let mut tx = begin(&store.pool).await?;
    let sql = format!(
        "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, now()), \
         revoke_reason = CASE WHEN revoked_at IS NULL THEN $3 ELSE revoke_reason END \
         WHERE key_id = $1 AND ($2::text IS NULL OR tenant_id = $2) RETURNING {KEY_COLUMNS}"
    );
    // The database's clock stamps the revocation (replicas' clocks may
    // differ); the key is revoked from then on whatever they say.
    let row: Option<KeyRow> = sqlx::query_as(&sql)
        .bind(key.id)
        .bind(key.tenant.map(TenantId::as_str))
        .bind(reason)
        .fetch_optional(&mut *tx)
        .await
        .map_err(map_err)?;
    let record: KeyRecord = row.ok_or(StoreError::NotFound)?.try_into()?;
    let at = record.revoked_at.unwrap_or(now);
    insert_audit(&mut tx, &audit::key_revoked(ctx, &record, at)).await?;
    notify(&mut tx, &Invalidation::Key(record.id)).await?;
    tx.commit().await.map_err(map_err)?;
    Ok(record)
}

pub(super) async fn rotate_key(
    store: &PostgresStore,
    old: KeyRef<'_>,
    mut new: NewKey,
    old_expires_at: DateTime<Utc>,
    ctx: &AuditContext,
) -> Result<(KeyRecord, KeyRecord), StoreError> {
    let mut tx = begin(&store.pool).await?;
    let current = lock_key(&mut tx, old).await?;
    if !current.is_live(new.created_at) {
        return Err(StoreError::Precondition(
            "only a live key (not revoked, expired or already rotated) can be rotated",
        ));
    }
    current.succeed(&mut new);
    // One key per lineage in grace: an earlier one's grace ends now.
    let ended: Vec<Uuid> = sqlx::query_scalar(
        "UPDATE api_keys SET expires_at = $3 WHERE lineage_id = $1 AND key_id <> $2 \
         AND replaced_by IS NOT NULL AND (expires_at IS NULL OR expires_at > $3) \
         RETURNING key_id",
    )
    .bind(current.lineage_id)
    .bind(current.id)
    .bind(new.created_at)
    .fetch_all(&mut *tx)
    .await
    .map_err(map_err)?;
    for id in ended {
        notify(&mut tx, &Invalidation::Key(id)).await?;
    }
    let inserted = insert_key_row(&mut tx, &new).await?;
    let sql = format!(
        "UPDATE api_keys SET replaced_by = $2, \
         expires_at = LEAST(COALESCE(expires_at, $3), $3) \
         WHERE key_id = $1 RETURNING {KEY_COLUMNS}"
    );
    let row: KeyRow = sqlx::query_as(&sql)
        .bind(current.id)
        .bind(inserted.id)
        .bind(old_expires_at)
        .fetch_one(&mut *tx)
        .await
        .map_err(map_err)?;
    let previous: KeyRecord = row.try_into()?;
    insert_audit(&mut tx, &audit::key_rotated(ctx, &previous, &inserted)).await?;
    notify(&mut tx, &Invalidation::Key(previous.id)).await?;
    notify(&mut tx, &Invalidation::KeyAdded(inserted.digest)).await?;
    tx.commit().await.map_err(map_err)?;
    Ok((previous, inserted))
}

pub(super) async fn update_key(
    store: &PostgresStore,
    key: KeyRef<'_>,
    u: &KeyUpdate,
    cap: KeyCap<'_>,
    now: DateTime<Utc>,
    ctx: &AuditContext,
) -> Result<KeyRecord, StoreError> {
    let mut tx = begin(&store.pool).await?;
    let current = lock_key(&mut tx, key).await?;
    current.check_update(u).map_err(StoreError::Precondition)?;
    if current.revived_by(u, now) {
        check_cap(&mut tx, &current.tenant_id, cap, now).await?;
    }
    let sql = format!(
        "UPDATE api_keys SET name = COALESCE($2, name), scopes = COALESCE($3, scopes), \
         expires_at = CASE WHEN $4 THEN $5 ELSE expires_at END, \
         limits = CASE WHEN $6 THEN $7 ELSE limits END, \
         labels = COALESCE($8, labels) \
         WHERE key_id = $1 RETURNING {KEY_COLUMNS}"
    );
    let row: KeyRow = sqlx::query_as(&sql)
        .bind(current.id)
        .bind(u.name.as_deref())
        .bind(u.scopes.as_ref())
        .bind(u.expires_at.is_some())
        .bind(u.expires_at.flatten())
        .bind(u.limits.is_some())
        .bind(u.limits.clone().flatten().map(Json))
        .bind(u.labels.as_ref().map(Json))
        .fetch_one(&mut *tx)
        .await
        .map_err(map_err)?;
    let record: KeyRecord = row.try_into()?;
    insert_audit(&mut tx, &audit::key_updated(ctx, &current, &record, u, now)).await?;
    notify(&mut tx, &Invalidation::Key(record.id)).await?;
    tx.commit().await.map_err(map_err)?;
    Ok(record)
}

pub(super) async fn touch_keys(
    store: &PostgresStore,
    used: &[(KeyId, DateTime<Utc>)],
) -> Result<(), StoreError> {
    if used.is_empty() {
        return Ok(());
    }
    let (ids, times): (Vec<KeyId>, Vec<DateTime<Utc>>) = used.iter().copied().unzip();
    sqlx::query(
        "UPDATE api_keys k SET last_used_at = GREATEST(k.last_used_at, v.t) \
         FROM unnest($1::uuid[], $2::timestamptz[]) AS v(id, t) WHERE k.key_id = v.id",
    )
    .bind(ids)
    .bind(times)
    .execute(&store.pool)
    .await
    .map_err(map_err)?;
    Ok(())
}

/// A tenant's keys carrying every label of `selector`, ordered by id, after
/// `after` (`labels @> selector`, served by the labels' GIN index).
pub(super) async fn list_keys_labelled(
    store: &PostgresStore,
    tenant: &TenantId,
    after: Option<KeyId>,
    limit: u32,
    include_revoked: bool,
    selector: &KeyLabels,
) -> Result<Vec<KeyRecord>, StoreError> {
    let sql = format!(
        "SELECT {KEY_COLUMNS} FROM api_keys WHERE tenant_id = $1 \
         AND ($2::uuid IS NULL OR key_id > $2) AND ($3 OR revoked_at IS NULL) \
         AND labels @> $5 ORDER BY key_id LIMIT $4"
    );
    let rows: Vec<KeyRow> = sqlx::query_as(&sql)
        .bind(tenant.as_str())
        .bind(after)
        .bind(include_revoked)
        .bind(i64::from(limit))
        .bind(Json(selector))
        .fetch_all(&store.pool)
        .await
        .map_err(map_err)?;
    rows.into_iter().map(KeyRecord::try_from).collect()
}

/// Imported keys, all in one transaction: every row, its audit row and its
/// `KeyAdded` change, or nothing (a digest already stored: `AlreadyExists`).
pub(super) async fn insert_keys(
    store: &PostgresStore,
    keys: Vec<NewKey>,
    ctx: &AuditContext,
) -> Result<Vec<KeyRecord>, StoreError> {
    let mut tx = begin(&store.pool).await?;
    let mut records = Vec::with_capacity(keys.len());
    for key in &keys {
        let exists: Option<bool> =
            sqlx::query_scalar("SELECT true FROM tenants WHERE tenant_id = $1")
                .bind(key.tenant_id.as_str())
                .fetch_optional(&mut *tx)
                .await
                .map_err(map_err)?;
        if exists.is_none() {
            return Err(StoreError::NotFound);
        }
        let record = insert_key_row(&mut tx, key).await?;
        insert_audit(&mut tx, &audit::key_imported(ctx, &record)).await?;
        notify(&mut tx, &Invalidation::KeyAdded(record.digest)).await?;
        records.push(record);
    }
    tx.commit().await.map_err(map_err)?;
    Ok(records)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `decision_row` decodes by position, in `KeyRow`'s order.
    #[test]
    fn decision_columns_are_the_key_columns_in_the_same_order() {
        let names = |s: &str| -> Vec<String> {
            s.split(',')
                .map(|c| c.trim().rsplit(' ').next().unwrap_or_default().to_owned())
                .collect()
        };
        let by_position = [
            "key_id",
            "tenant_id",
            "name",
            "environment",
            "scopes",
            "hint",
            "digest",
            "pepper_version",
            "created_at",
            "expires_at",
            "revoked_at",
            "revoke_reason",
            "last_used_at",
            "replaced_by",
            "limits",
            "lineage_id",
            "labels",
            "format",
        ];
        assert_eq!(names(DECISION_COLUMNS), by_position);
        assert_eq!(names(KEY_COLUMNS), by_position);
    }
}

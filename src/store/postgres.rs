//! The Postgres store: the only place SQL lives. Every decision-changing
//! write records a change and sends `NOTIFY tollgate_invalidation` in its
//! own transaction, so replicas evict on commit, never before (`feed`).

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::postgres::PgPool;
use sqlx::types::Json;
use sqlx::{Postgres, Transaction};
use tokio::sync::mpsc;
use uuid::Uuid;

use super::{
    Invalidation, KeyCap, KeyRef, QuotaCounter, QuotaGrant, QuotaReport, QuotaTally, ShareRow,
    ShareView, Store, StoreError,
};
use crate::crypto::KeyDigest;
use crate::domain::audit;
use crate::domain::console::AuditContext;
use crate::domain::{
    KeyId, KeyRecord, KeyUpdate, LimitSpec, NewKey, SubscriptionStatus, Tenant, TenantId,
    TenantOverrides, TenantUpdate,
};

pub(super) mod audit_log;
mod feed;

use audit_log::insert_audit;

pub use feed::{FeedSettings, CHANNEL};

/// Digests read per query when loading the known-digest set.
const DIGEST_PAGE: u32 = 10_000;

/// Migrations embedded from `migrations/`.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Postgres-backed [`Store`].
#[derive(Clone, Debug)]
pub struct PostgresStore {
    pool: PgPool,
    /// Longest a decision-path read may take, as seen from here (covers a
    /// hung server, which no `statement_timeout` can); `None`: unbounded.
    query_timeout: Option<Duration>,
    feed: FeedSettings,
}

impl PostgresStore {
    /// Wraps a pool.
    pub fn new(pool: PgPool) -> Self {
        Self {
            pool,
            query_timeout: None,
            feed: FeedSettings::default(),
        }
    }

    /// How the change feed keeps its history and watches its connection.
    pub fn with_feed(mut self, feed: FeedSettings) -> Self {
        self.feed = feed;
        self
    }

    /// Deletes changes older than the retention now (the feed also does
    /// it as it connects and now and then); returns how many.
    pub async fn prune_changes(&self) -> Result<u64, StoreError> {
        feed::prune(&self.pool, self.feed.retention).await
    }

    /// Bounds decision-path reads (key and tenant lookups): past `timeout`
    /// they fail as unavailable instead of waiting on a hung database.
    pub fn with_query_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.query_timeout = timeout;
        self
    }

    /// Runs a decision-path query within the query timeout.
    async fn bounded<T>(
        &self,
        query: &'static str,
        f: impl std::future::Future<Output = Result<T, sqlx::Error>>,
    ) -> Result<T, StoreError> {
        let run = timed(query, f);
        match self.query_timeout {
            None => run.await.map_err(map_err),
            Some(limit) => match tokio::time::timeout(limit, run).await {
                Ok(r) => r.map_err(map_err),
                Err(_) => Err(StoreError::Unavailable(format!(
                    "{query} took longer than {} ms",
                    limit.as_millis()
                ))),
            },
        }
    }

    /// Applies pending migrations.
    pub async fn migrate(&self) -> Result<(), sqlx::migrate::MigrateError> {
        MIGRATOR.run(&self.pool).await
    }

    /// The underlying pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }
}

/// Runs a query, recording its duration.
async fn timed<T>(query: &'static str, f: impl std::future::Future<Output = T>) -> T {
    let started = std::time::Instant::now();
    let out = f.await;
    metrics::histogram!(crate::telemetry::DB_QUERY_SECONDS, "query" => query)
        .record(started.elapsed().as_secs_f64());
    out
}

pub(super) fn map_err(e: sqlx::Error) -> StoreError {
    match &e {
        sqlx::Error::RowNotFound => StoreError::NotFound,
        sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        // A link cut mid-handshake (e.g. during SSL negotiation) surfaces
        // as a protocol error: the database is unreachable, not broken.
        | sqlx::Error::Protocol(_)
        | sqlx::Error::WorkerCrashed => StoreError::Unavailable(e.to_string()),
        sqlx::Error::Database(db) => match db.code().as_deref() {
            Some("23505") => StoreError::AlreadyExists,
            Some("23503") => StoreError::NotFound,
            // connection exceptions, shutdown, database dropped, too many connections
            Some(c)
                if c.starts_with("08") || c.starts_with("57") || c == "3D000" || c == "53300" =>
            {
                StoreError::Unavailable(e.to_string())
            }
            _ => StoreError::Internal(e.to_string()),
        },
        _ => StoreError::Internal(e.to_string()),
    }
}

/// A live replica, and one of its published shares if it has any.
type SharesRow = (Uuid, Option<String>, Option<f64>, Option<f64>);

/// The live replicas and their published rate shares (one statement).
async fn read_shares<'e>(
    db: impl sqlx::PgExecutor<'e>,
    stale_after_secs: u32,
) -> Result<ShareView, sqlx::Error> {
    let rows: Vec<SharesRow> = sqlx::query_as(
        "SELECT r.replica_id, s.cell, s.demand, s.claim \
         FROM replicas r LEFT JOIN rate_shares s ON s.replica_id = r.replica_id \
         WHERE r.heartbeat_at > now() - make_interval(secs => $1)",
    )
    .bind(f64::from(stale_after_secs))
    .fetch_all(db)
    .await?;
    let mut view = ShareView::default();
    for (replica, cell, demand, claim) in rows {
        if !view.live.contains(&replica) {
            view.live.push(replica);
        }
        if let (Some(cell), Some(demand), Some(claim)) = (cell, demand, claim) {
            view.rows.push(ShareRow {
                cell,
                replica,
                demand,
                claim,
            });
        }
    }
    Ok(view)
}

#[derive(sqlx::FromRow)]
struct TenantRow {
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

#[derive(sqlx::FromRow)]
struct KeyRow {
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
        })
    }
}

const KEY_COLUMNS: &str = "key_id, tenant_id, name, environment, scopes, hint, digest, \
    pepper_version, created_at, expires_at, revoked_at, revoke_reason, last_used_at, replaced_by, \
    limits, lineage_id";

/// Records a decision-changing write and wakes every replica, inside
/// the write's transaction.
async fn notify(tx: &mut Transaction<'_, Postgres>, what: &Invalidation) -> Result<(), StoreError> {
    feed::record(tx, what).await
}

async fn insert_key_row(
    tx: &mut Transaction<'_, Postgres>,
    key: &NewKey,
) -> Result<KeyRecord, StoreError> {
    let sql = format!(
        "INSERT INTO api_keys (key_id, tenant_id, name, environment, scopes, hint, digest, \
         pepper_version, created_at, expires_at, limits, lineage_id) \
         VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12) \
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

/// Inserts a tenant row; the one INSERT for tenants (CreateTenant, SignUp).
pub(super) async fn insert_tenant_row(
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

pub(super) async fn begin(pool: &PgPool) -> Result<Transaction<'static, Postgres>, StoreError> {
    pool.begin().await.map_err(map_err)
}

#[async_trait]
impl Store for PostgresStore {
    async fn create_tenant(&self, t: Tenant, ctx: &AuditContext) -> Result<Tenant, StoreError> {
        let mut tx = begin(&self.pool).await?;
        let tenant = insert_tenant_row(&mut tx, &t).await?;
        insert_audit(&mut tx, &audit::tenant_created(ctx, &tenant)).await?;
        tx.commit().await.map_err(map_err)?;
        Ok(tenant)
    }

    async fn get_tenant(&self, id: &TenantId) -> Result<Option<Tenant>, StoreError> {
        let row: Option<TenantRow> = self
            .bounded(
                "get_tenant",
                sqlx::query_as("SELECT * FROM tenants WHERE tenant_id = $1")
                    .bind(id.as_str())
                    .fetch_optional(&self.pool),
            )
            .await?;
        row.map(Tenant::try_from).transpose()
    }

    async fn update_tenant(
        &self,
        id: &TenantId,
        u: &TenantUpdate,
        now: DateTime<Utc>,
        ctx: &AuditContext,
    ) -> Result<Tenant, StoreError> {
        let mut tx = begin(&self.pool).await?;
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

    async fn list_tenants(
        &self,
        after: Option<&TenantId>,
        limit: u32,
    ) -> Result<Vec<Tenant>, StoreError> {
        let rows: Vec<TenantRow> = sqlx::query_as(
            "SELECT * FROM tenants WHERE ($1::text IS NULL OR tenant_id > $1) \
             ORDER BY tenant_id LIMIT $2",
        )
        .bind(after.map(TenantId::as_str))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(map_err)?;
        rows.into_iter().map(Tenant::try_from).collect()
    }

    async fn insert_key(
        &self,
        key: NewKey,
        cap: KeyCap<'_>,
        ctx: &AuditContext,
    ) -> Result<KeyRecord, StoreError> {
        let mut tx = begin(&self.pool).await?;
        check_cap(&mut tx, &key.tenant_id, cap, key.created_at).await?;
        let record = insert_key_row(&mut tx, &key).await?;
        insert_audit(&mut tx, &audit::key_created(ctx, &record)).await?;
        notify(&mut tx, &Invalidation::KeyAdded(record.digest)).await?;
        tx.commit().await.map_err(map_err)?;
        Ok(record)
    }

    async fn find_key_by_digest(
        &self,
        digest: &KeyDigest,
    ) -> Result<Option<KeyRecord>, StoreError> {
        let sql = format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE digest = $1");
        let row: Option<KeyRow> = self
            .bounded(
                "find_key",
                sqlx::query_as(&sql)
                    .bind(&digest.as_bytes()[..])
                    .fetch_optional(&self.pool),
            )
            .await?;
        row.map(KeyRecord::try_from).transpose()
    }

    async fn key_digests(&self) -> Result<Vec<KeyDigest>, StoreError> {
        let mut all = Vec::new();
        let mut after = None;
        loop {
            let page = self.key_digests_page(after, DIGEST_PAGE).await?;
            after = page.last().copied();
            let done = page.len() < DIGEST_PAGE as usize;
            all.extend(page);
            if done {
                return Ok(all);
            }
        }
    }

    async fn key_digests_page(
        &self,
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
            .fetch_all(&self.pool),
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

    async fn get_key(&self, key: KeyRef<'_>) -> Result<Option<KeyRecord>, StoreError> {
        let sql = format!(
            "SELECT {KEY_COLUMNS} FROM api_keys WHERE key_id = $1 \
             AND ($2::text IS NULL OR tenant_id = $2)"
        );
        let row: Option<KeyRow> = sqlx::query_as(&sql)
            .bind(key.id)
            .bind(key.tenant.map(TenantId::as_str))
            .fetch_optional(&self.pool)
            .await
            .map_err(map_err)?;
        row.map(KeyRecord::try_from).transpose()
    }

    async fn list_keys(
        &self,
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
            .fetch_all(&self.pool)
            .await
            .map_err(map_err)?;
        rows.into_iter().map(KeyRecord::try_from).collect()
    }

    async fn revoke_key(
        &self,
        key: KeyRef<'_>,
        reason: &str,
        now: DateTime<Utc>,
        ctx: &AuditContext,
    ) -> Result<KeyRecord, StoreError> {
        let mut tx = begin(&self.pool).await?;
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

    async fn rotate_key(
        &self,
        old: KeyRef<'_>,
        mut new: NewKey,
        old_expires_at: DateTime<Utc>,
        ctx: &AuditContext,
    ) -> Result<(KeyRecord, KeyRecord), StoreError> {
        let mut tx = begin(&self.pool).await?;
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

    async fn update_key(
        &self,
        key: KeyRef<'_>,
        u: &KeyUpdate,
        cap: KeyCap<'_>,
        now: DateTime<Utc>,
        ctx: &AuditContext,
    ) -> Result<KeyRecord, StoreError> {
        let mut tx = begin(&self.pool).await?;
        let current = lock_key(&mut tx, key).await?;
        current.check_update(u).map_err(StoreError::Precondition)?;
        if current.revived_by(u, now) {
            check_cap(&mut tx, &current.tenant_id, cap, now).await?;
        }
        let sql = format!(
            "UPDATE api_keys SET name = COALESCE($2, name), scopes = COALESCE($3, scopes), \
             expires_at = CASE WHEN $4 THEN $5 ELSE expires_at END, \
             limits = CASE WHEN $6 THEN $7 ELSE limits END \
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
            .fetch_one(&mut *tx)
            .await
            .map_err(map_err)?;
        let record: KeyRecord = row.try_into()?;
        insert_audit(&mut tx, &audit::key_updated(ctx, &current, &record, u, now)).await?;
        notify(&mut tx, &Invalidation::Key(record.id)).await?;
        tx.commit().await.map_err(map_err)?;
        Ok(record)
    }

    async fn rehash_key(
        &self,
        id: KeyId,
        old: &KeyDigest,
        new: &KeyDigest,
        pepper_version: i32,
    ) -> Result<(), StoreError> {
        // One statement on the request path: the update and, only if it
        // matched, the change record and notification of the new digest.
        feed::rehash(&self.pool, id, old, new, pepper_version).await
    }

    async fn touch_keys(&self, used: &[(KeyId, DateTime<Utc>)]) -> Result<(), StoreError> {
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
        .execute(&self.pool)
        .await
        .map_err(map_err)?;
        Ok(())
    }

    async fn lease_quota(
        &self,
        replica: Uuid,
        c: &QuotaCounter,
        chunk: u64,
        at_least: u64,
        limit: u64,
        consumed: i64,
    ) -> Result<QuotaGrant, StoreError> {
        let at_least = i64::try_from(at_least.max(1)).unwrap_or(i64::MAX);
        let chunk = i64::try_from(chunk).unwrap_or(i64::MAX).max(at_least);
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        // `last_grant` is computed from the old row in the same statement
        // that locks and updates it, so the grant is exact. Nothing is
        // granted unless `at_least` units fit. The grant is added to this
        // replica's holding in the same statement (less what it consumed
        // since its last report): the store never counts units as leased
        // without knowing who holds them.
        let (granted, used, others): (i64, i64, i64) = sqlx::query_as(
            "WITH g AS ( \
               INSERT INTO quota_usage AS q (subject, limit_name, period_start, used, last_grant) \
               SELECT $1, $2, $3, LEAST($4, $5), LEAST($4, $5) WHERE $6 <= $5 \
               ON CONFLICT (subject, limit_name, period_start) DO UPDATE \
               SET last_grant = LEAST($4, $5 - q.used), used = q.used + LEAST($4, $5 - q.used), \
                   updated_at = now() \
               WHERE q.used + $6 <= $5 RETURNING last_grant, used), \
             held AS ( \
               INSERT INTO quota_leases AS l (subject, limit_name, period_start, replica_id, units) \
               SELECT $1, $2, $3, $7, GREATEST(n.granted - $8, 0) \
               FROM (SELECT COALESCE((SELECT last_grant FROM g), 0) AS granted) n \
               WHERE n.granted > 0 OR $8 <> 0 \
               ON CONFLICT (subject, limit_name, period_start, replica_id) DO UPDATE \
               SET units = GREATEST(l.units + COALESCE((SELECT last_grant FROM g), 0) - $8, 0), \
                   updated_at = now()) \
             SELECT COALESCE(g.last_grant, 0), \
               COALESCE(g.used, (SELECT used FROM quota_usage \
                 WHERE subject = $1 AND limit_name = $2 AND period_start = $3), 0), \
               COALESCE((SELECT sum(units) FROM quota_leases \
                 WHERE subject = $1 AND limit_name = $2 AND period_start = $3 \
                   AND replica_id <> $7), 0)::bigint \
             FROM (SELECT 1) AS one LEFT JOIN g ON true",
        )
        .bind(&c.subject)
        .bind(c.name)
        .bind(c.period_start)
        .bind(chunk)
        .bind(limit)
        .bind(at_least)
        .bind(replica)
        .bind(consumed)
        .fetch_one(&self.pool)
        .await
        .map_err(map_err)?;
        Ok(QuotaGrant {
            granted: granted.max(0) as u64,
            used: used.max(0) as u64,
            others: others.max(0) as u64,
        })
    }

    async fn report_quota(
        &self,
        replica: Uuid,
        reports: &[QuotaReport],
    ) -> Result<Vec<QuotaTally>, StoreError> {
        if reports.is_empty() {
            return Ok(Vec::new());
        }
        let subjects: Vec<&str> = reports.iter().map(|r| r.counter.subject.as_str()).collect();
        let names: Vec<&str> = reports.iter().map(|r| r.counter.name).collect();
        let starts: Vec<DateTime<Utc>> = reports.iter().map(|r| r.counter.period_start).collect();
        let consumed: Vec<i64> = reports.iter().map(|r| r.consumed).collect();
        let returned: Vec<i64> = reports
            .iter()
            .map(|r| i64::try_from(r.returned).unwrap_or(i64::MAX))
            .collect();
        // One statement: holdings drop by what was consumed and returned
        // (a holding already reclaimed stays gone); returned units leave
        // the totals; each counter's tally comes back in input order.
        let rows: Vec<(i64, i64)> = timed(
            "report_quota",
            sqlx::query_as(
                "WITH r AS ( \
                   SELECT * FROM unnest($2::text[], $3::text[], $4::timestamptz[], \
                     $5::bigint[], $6::bigint[]) WITH ORDINALITY \
                     AS r(subject, limit_name, period_start, consumed, returned, ord)), \
                 held AS ( \
                   UPDATE quota_leases l \
                   SET units = GREATEST(l.units - r.consumed - r.returned, 0), updated_at = now() \
                   FROM r WHERE l.replica_id = $1 AND l.subject = r.subject \
                     AND l.limit_name = r.limit_name AND l.period_start = r.period_start \
                     AND (r.consumed <> 0 OR r.returned <> 0)), \
                 freed AS ( \
                   UPDATE quota_usage q SET used = GREATEST(q.used - r.returned, 0), \
                     updated_at = now() \
                   FROM r WHERE r.returned > 0 AND q.subject = r.subject \
                     AND q.limit_name = r.limit_name AND q.period_start = r.period_start \
                   RETURNING q.subject, q.limit_name, q.period_start, q.used) \
                 SELECT COALESCE(f.used, q.used, 0), \
                   COALESCE((SELECT sum(o.units) FROM quota_leases o \
                     WHERE o.subject = r.subject AND o.limit_name = r.limit_name \
                       AND o.period_start = r.period_start AND o.replica_id <> $1), 0)::bigint \
                 FROM r \
                 LEFT JOIN freed f ON f.subject = r.subject AND f.limit_name = r.limit_name \
                   AND f.period_start = r.period_start \
                 LEFT JOIN quota_usage q ON q.subject = r.subject AND q.limit_name = r.limit_name \
                   AND q.period_start = r.period_start \
                 ORDER BY r.ord",
            )
            .bind(replica)
            .bind(subjects)
            .bind(names)
            .bind(starts)
            .bind(consumed)
            .bind(returned)
            .fetch_all(&self.pool),
        )
        .await
        .map_err(map_err)?;
        Ok(rows
            .into_iter()
            .map(|(used, others)| QuotaTally {
                used: used.max(0) as u64,
                others: others.max(0) as u64,
            })
            .collect())
    }

    async fn reclaim_quota_leases(
        &self,
        replica: Uuid,
        stale_after_secs: u32,
    ) -> Result<u64, StoreError> {
        // The holders are few: a skip scan of the replica_id index lists
        // them without reading every holding. A holder is dead once no
        // heartbeat vouches for it (its row expired, or was pruned); a row
        // it wrote within the expiry is left for a later beat (a replica
        // may lease before its first heartbeat). The caller's own emptied
        // rows go too.
        let units: Option<i64> = timed(
            "reclaim_quota_leases",
            sqlx::query_scalar(
                "WITH RECURSIVE holders AS ( \
                   (SELECT replica_id FROM quota_leases ORDER BY replica_id LIMIT 1) \
                   UNION ALL \
                   SELECT (SELECT l.replica_id FROM quota_leases l \
                     WHERE l.replica_id > h.replica_id ORDER BY l.replica_id LIMIT 1) \
                   FROM holders h WHERE h.replica_id IS NOT NULL), \
                 dead AS ( \
                   SELECT h.replica_id FROM holders h \
                   WHERE h.replica_id IS NOT NULL AND h.replica_id <> $2 \
                     AND NOT EXISTS (SELECT 1 FROM replicas r WHERE r.replica_id = h.replica_id \
                       AND r.heartbeat_at > now() - make_interval(secs => $1))), \
                 gone AS ( \
                   DELETE FROM quota_leases l USING dead d WHERE l.replica_id = d.replica_id \
                     AND l.updated_at < now() - make_interval(secs => $1) \
                   RETURNING l.units), \
                 emptied AS ( \
                   DELETE FROM quota_leases WHERE replica_id = $2 AND units = 0) \
                 SELECT sum(units)::bigint FROM gone",
            )
            .bind(f64::from(stale_after_secs))
            .bind(replica)
            .fetch_one(&self.pool),
        )
        .await
        .map_err(map_err)?;
        Ok(units.unwrap_or(0).max(0) as u64)
    }

    async fn quota_used(&self, c: &QuotaCounter) -> Result<u64, StoreError> {
        let used: Option<i64> = sqlx::query_scalar(
            "SELECT used FROM quota_usage \
             WHERE subject = $1 AND limit_name = $2 AND period_start = $3",
        )
        .bind(&c.subject)
        .bind(c.name)
        .bind(c.period_start)
        .fetch_optional(&self.pool)
        .await
        .map_err(map_err)?;
        Ok(used.unwrap_or(0).max(0) as u64)
    }

    async fn quota_consumed(&self, c: &QuotaCounter) -> Result<u64, StoreError> {
        let consumed: Option<i64> = sqlx::query_scalar(
            "SELECT q.used - COALESCE((SELECT sum(l.units) FROM quota_leases l \
               WHERE l.subject = q.subject AND l.limit_name = q.limit_name \
                 AND l.period_start = q.period_start), 0)::bigint \
             FROM quota_usage q \
             WHERE q.subject = $1 AND q.limit_name = $2 AND q.period_start = $3",
        )
        .bind(&c.subject)
        .bind(c.name)
        .bind(c.period_start)
        .fetch_optional(&self.pool)
        .await
        .map_err(map_err)?;
        Ok(consumed.unwrap_or(0).max(0) as u64)
    }

    async fn heartbeat(&self, replica: Uuid, stale_after_secs: u32) -> Result<u32, StoreError> {
        let live: i64 = sqlx::query_scalar(
            "WITH beat AS (INSERT INTO replicas (replica_id, heartbeat_at) VALUES ($1, now()) \
               ON CONFLICT (replica_id) DO UPDATE SET heartbeat_at = now() RETURNING 1), \
             gone AS (DELETE FROM replicas WHERE heartbeat_at < now() - interval '1 hour') \
             SELECT (SELECT count(*) FROM beat) + (SELECT count(*) FROM replicas \
               WHERE replica_id <> $1 AND heartbeat_at > now() - make_interval(secs => $2))",
        )
        .bind(replica)
        .bind(f64::from(stale_after_secs))
        .fetch_one(&self.pool)
        .await
        .map_err(map_err)?;
        Ok(u32::try_from(live).unwrap_or(1).max(1))
    }

    async fn leave(&self, replica: Uuid) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM replicas WHERE replica_id = $1")
            .bind(replica)
            .execute(&self.pool)
            .await
            .map_err(map_err)?;
        Ok(())
    }

    async fn rate_shares(&self, stale_after_secs: u32) -> Result<ShareView, StoreError> {
        timed("rate_shares", read_shares(&self.pool, stale_after_secs))
            .await
            .map_err(map_err)
    }

    async fn exchange_rate_shares(
        &self,
        replica: Uuid,
        stale_after_secs: u32,
        decide: &mut (dyn for<'v> FnMut(&'v ShareView) -> Vec<ShareRow> + Send),
    ) -> Result<bool, StoreError> {
        let mut tx = begin(&self.pool).await?;
        // Exchanges take turns (the lock conflicts with itself, not with
        // plain reads): a claim decided below is never raced by another
        // replica's decided from the same, older rows.
        sqlx::query("LOCK TABLE rate_shares IN SHARE ROW EXCLUSIVE MODE")
            .execute(&mut *tx)
            .await
            .map_err(map_err)?;
        let view = read_shares(&mut *tx, stale_after_secs)
            .await
            .map_err(map_err)?;
        let rows = decide(&view);
        if !view.live.contains(&replica) {
            // Others do not count a replica they think gone: publishing
            // would claim what nobody accounts for.
            return Ok(false);
        }
        let (mut cells, mut demands, mut claims) = (Vec::new(), Vec::new(), Vec::new());
        for r in rows {
            cells.push(r.cell);
            demands.push(r.demand.max(0.0));
            claims.push(r.claim.clamp(0.0, 1.0));
        }
        timed(
            "exchange_rate_shares",
            sqlx::query(
                "WITH gone AS (DELETE FROM rate_shares \
                   WHERE replica_id = $1 AND NOT (cell = ANY($2))) \
                 INSERT INTO rate_shares (cell, replica_id, demand, claim, updated_at) \
                 SELECT cell, $1, demand, claim, now() \
                   FROM UNNEST($2::text[], $3::float8[], $4::float8[]) AS m(cell, demand, claim) \
                 ON CONFLICT (cell, replica_id) DO UPDATE \
                   SET demand = EXCLUDED.demand, claim = EXCLUDED.claim, updated_at = now()",
            )
            .bind(replica)
            .bind(&cells)
            .bind(&demands)
            .bind(&claims)
            .execute(&mut *tx),
        )
        .await
        .map_err(map_err)?;
        tx.commit().await.map_err(map_err)?;
        Ok(true)
    }

    fn watch(&self, tx: mpsc::Sender<Invalidation>) {
        tokio::spawn(feed::listen(self.pool.clone(), tx, self.feed));
    }

    fn pool_stats(&self) -> Option<(u32, usize)> {
        Some((self.pool.size(), self.pool.num_idle()))
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map_err(map_err)?;
        Ok(())
    }

    fn console_store(
        self: std::sync::Arc<Self>,
    ) -> Option<std::sync::Arc<dyn super::ConsoleStore>> {
        Some(self)
    }
}

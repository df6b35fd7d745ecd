//! The Postgres store: the only place SQL lives. Every decision-changing
//! write sends `NOTIFY tollgate_invalidation` in its own transaction, so
//! replicas evict on commit, never before.

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::postgres::{PgListener, PgPool};
use sqlx::types::Json;
use sqlx::{Postgres, Transaction};
use tokio::sync::mpsc;
use uuid::Uuid;

use super::console_pg::insert_audit;
use super::{Invalidation, KeyCap, KeyRef, QuotaCounter, QuotaGrant, Store, StoreError};
use crate::crypto::KeyDigest;
use crate::domain::audit;
use crate::domain::console::AuditContext;
use crate::domain::{
    KeyId, KeyRecord, KeyUpdate, LimitSpec, NewKey, SubscriptionStatus, Tenant, TenantId,
    TenantOverrides, TenantUpdate,
};

/// The NOTIFY channel every replica listens on.
pub const CHANNEL: &str = "tollgate_invalidation";

/// Migrations embedded from `migrations/`.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Postgres-backed [`Store`].
#[derive(Clone, Debug)]
pub struct PostgresStore {
    pool: PgPool,
    /// Longest a decision-path read may take, as seen from here (covers a
    /// hung server, which no `statement_timeout` can); `None`: unbounded.
    query_timeout: Option<Duration>,
}

impl PostgresStore {
    /// Wraps a pool.
    pub fn new(pool: PgPool) -> Self {
        Self {
            pool,
            query_timeout: None,
        }
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
        })
    }
}

const KEY_COLUMNS: &str = "key_id, tenant_id, name, environment, scopes, hint, digest, \
    pepper_version, created_at, expires_at, revoked_at, revoke_reason, last_used_at, replaced_by, \
    limits";

/// The NOTIFY payload of `what`; `None` for feed events never sent.
fn payload(what: &Invalidation) -> Option<String> {
    // The send time rides along so receivers can measure revocation lag.
    let sent_ms = Utc::now().timestamp_millis();
    Some(match what {
        Invalidation::Key(id) => format!("k:{id}@{sent_ms}"),
        Invalidation::Tenant(id) => format!("t:{id}@{sent_ms}"),
        Invalidation::KeyAdded(digest) => format!("n:{}", hex::encode(digest.as_bytes())),
        _ => return None,
    })
}

async fn notify(tx: &mut Transaction<'_, Postgres>, what: &Invalidation) -> Result<(), StoreError> {
    let Some(payload) = payload(what) else {
        return Ok(());
    };
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(CHANNEL)
        .bind(payload)
        .execute(&mut **tx)
        .await
        .map_err(map_err)?;
    Ok(())
}

fn parse_payload(payload: &str) -> Option<Invalidation> {
    let (body, sent_ms) = match payload.rsplit_once('@') {
        Some((body, ms)) => (body, ms.parse::<i64>().ok()),
        None => (payload, None),
    };
    if let Some(ms) = sent_ms {
        let lag = (Utc::now().timestamp_millis() - ms).max(0) as f64 / 1000.0;
        metrics::histogram!(crate::telemetry::REVOCATION_LAG_SECONDS).record(lag);
    }
    match body.split_once(':')? {
        ("k", id) => Uuid::parse_str(id).ok().map(Invalidation::Key),
        ("t", id) => TenantId::parse(id).map(Invalidation::Tenant),
        ("n", digest) => hex::decode(digest)
            .ok()
            .and_then(|b| KeyDigest::from_slice(&b))
            .map(Invalidation::KeyAdded),
        _ => None,
    }
}

async fn insert_key_row(
    tx: &mut Transaction<'_, Postgres>,
    key: &NewKey,
) -> Result<KeyRecord, StoreError> {
    let sql = format!(
        "INSERT INTO api_keys (key_id, tenant_id, name, environment, scopes, hint, digest, \
         pepper_version, created_at, expires_at, limits) \
         VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11) \
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
             overrides = COALESCE($5, overrides), updated_at = $6 \
             WHERE tenant_id = $1 RETURNING *",
        )
        .bind(id.as_str())
        .bind(u.name.as_deref())
        .bind(u.plan.as_deref())
        .bind(u.status.map(SubscriptionStatus::as_str))
        .bind(u.overrides.as_ref().map(Json))
        .bind(now)
        .fetch_optional(&mut *tx)
        .await
        .map_err(map_err)?;
        let tenant: Tenant = row.ok_or(StoreError::NotFound)?.try_into()?;
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
        // Lock the tenant row: concurrent inserts for this tenant queue here,
        // so the count below cannot go stale before we insert.
        let tenant: Option<TenantRow> =
            sqlx::query_as("SELECT * FROM tenants WHERE tenant_id = $1 FOR UPDATE")
                .bind(key.tenant_id.as_str())
                .fetch_optional(&mut *tx)
                .await
                .map_err(map_err)?;
        let tenant: Tenant = tenant.ok_or(StoreError::NotFound)?.try_into()?;
        if let Some(cap) = cap(&tenant) {
            let live: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM api_keys WHERE tenant_id = $1 AND revoked_at IS NULL \
                 AND replaced_by IS NULL AND (expires_at IS NULL OR expires_at > $2)",
            )
            .bind(key.tenant_id.as_str())
            .bind(key.created_at)
            .fetch_one(&mut *tx)
            .await
            .map_err(map_err)?;
            if live >= i64::from(cap) {
                return Err(StoreError::KeyCapReached { cap });
            }
        }
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
        let rows: Vec<Vec<u8>> = timed(
            "key_digests",
            sqlx::query_scalar("SELECT digest FROM api_keys").fetch_all(&self.pool),
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
            "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, $3), \
             revoke_reason = CASE WHEN revoked_at IS NULL THEN $4 ELSE revoke_reason END \
             WHERE key_id = $1 AND ($2::text IS NULL OR tenant_id = $2) RETURNING {KEY_COLUMNS}"
        );
        let row: Option<KeyRow> = sqlx::query_as(&sql)
            .bind(key.id)
            .bind(key.tenant.map(TenantId::as_str))
            .bind(now)
            .bind(reason)
            .fetch_optional(&mut *tx)
            .await
            .map_err(map_err)?;
        let record: KeyRecord = row.ok_or(StoreError::NotFound)?.try_into()?;
        insert_audit(&mut tx, &audit::key_revoked(ctx, &record, now)).await?;
        notify(&mut tx, &Invalidation::Key(record.id)).await?;
        tx.commit().await.map_err(map_err)?;
        Ok(record)
    }

    async fn rotate_key(
        &self,
        old: KeyRef<'_>,
        new: NewKey,
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
        ctx: &AuditContext,
    ) -> Result<KeyRecord, StoreError> {
        let mut tx = begin(&self.pool).await?;
        let sql = format!(
            "UPDATE api_keys SET name = COALESCE($3, name), scopes = COALESCE($4, scopes), \
             expires_at = CASE WHEN $5 THEN $6 ELSE expires_at END, \
             limits = CASE WHEN $7 THEN $8 ELSE limits END \
             WHERE key_id = $1 AND ($2::text IS NULL OR tenant_id = $2) RETURNING {KEY_COLUMNS}"
        );
        let row: Option<KeyRow> = sqlx::query_as(&sql)
            .bind(key.id)
            .bind(key.tenant.map(TenantId::as_str))
            .bind(u.name.as_deref())
            .bind(u.scopes.as_ref())
            .bind(u.expires_at.is_some())
            .bind(u.expires_at.flatten())
            .bind(u.limits.is_some())
            .bind(u.limits.clone().flatten().map(Json))
            .fetch_optional(&mut *tx)
            .await
            .map_err(map_err)?;
        let record: KeyRecord = row.ok_or(StoreError::NotFound)?.try_into()?;
        insert_audit(&mut tx, &audit::key_updated(ctx, &record, u, Utc::now())).await?;
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
        // matched, the notification of the new digest.
        sqlx::query(
            "WITH u AS (UPDATE api_keys SET digest = $3, pepper_version = $4 \
             WHERE key_id = $1 AND digest = $2 RETURNING 1) \
             SELECT pg_notify($5, $6) FROM u",
        )
        .bind(id)
        .bind(&old.as_bytes()[..])
        .bind(&new.as_bytes()[..])
        .bind(pepper_version)
        .bind(CHANNEL)
        .bind(payload(&Invalidation::KeyAdded(*new)))
        .execute(&self.pool)
        .await
        .map_err(map_err)?;
        Ok(())
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
        c: &QuotaCounter,
        chunk: u64,
        limit: u64,
    ) -> Result<QuotaGrant, StoreError> {
        let chunk = i64::try_from(chunk).unwrap_or(i64::MAX);
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        // `last_grant` is computed from the old row in the same statement
        // that locks and updates it, so the grant is exact.
        let row: Option<(i64, i64)> = sqlx::query_as(
            "INSERT INTO quota_usage AS q (subject, limit_name, period_start, used, last_grant) \
             VALUES ($1, $2, $3, LEAST($4, $5), LEAST($4, $5)) \
             ON CONFLICT (subject, limit_name, period_start) DO UPDATE \
             SET last_grant = LEAST($4, $5 - q.used), used = q.used + LEAST($4, $5 - q.used), \
                 updated_at = now() \
             WHERE q.used < $5 RETURNING last_grant, used",
        )
        .bind(&c.subject)
        .bind(c.name)
        .bind(c.period_start)
        .bind(chunk)
        .bind(limit)
        .fetch_optional(&self.pool)
        .await
        .map_err(map_err)?;
        Ok(match row {
            Some((granted, used)) => QuotaGrant {
                granted: granted.max(0) as u64,
                used: used.max(0) as u64,
            },
            None => QuotaGrant {
                granted: 0,
                used: limit.max(0) as u64,
            },
        })
    }

    async fn return_quota(&self, c: &QuotaCounter, units: u64) -> Result<(), StoreError> {
        if units == 0 {
            return Ok(());
        }
        sqlx::query(
            "UPDATE quota_usage SET used = GREATEST(used - $4, 0), updated_at = now() \
             WHERE subject = $1 AND limit_name = $2 AND period_start = $3",
        )
        .bind(&c.subject)
        .bind(c.name)
        .bind(c.period_start)
        .bind(i64::try_from(units).unwrap_or(i64::MAX))
        .execute(&self.pool)
        .await
        .map_err(map_err)?;
        Ok(())
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

    fn watch(&self, tx: mpsc::Sender<Invalidation>) {
        tokio::spawn(listen(self.pool.clone(), tx));
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

/// Keeps a LISTEN connection up. After every (re)connect it sends `Flush`
/// then `Ready`: notifications sent while it was down are lost, so every
/// cached entry must go. Ends when the receiver is dropped.
async fn listen(pool: PgPool, tx: mpsc::Sender<Invalidation>) {
    const MAX_BACKOFF: Duration = Duration::from_secs(5);
    let mut backoff = Duration::from_millis(50);
    loop {
        let connected = async {
            let mut l = PgListener::connect_with(&pool).await?;
            l.listen(CHANNEL).await?;
            Ok::<_, sqlx::Error>(l)
        };
        let mut listener = tokio::select! {
            r = connected => r,
            () = tx.closed() => return,
        };
        match listener.as_mut() {
            Ok(l) => {
                backoff = Duration::from_millis(50);
                if tx.send(Invalidation::Flush).await.is_err()
                    || tx.send(Invalidation::Ready).await.is_err()
                {
                    return;
                }
                loop {
                    let next = tokio::select! {
                        n = l.try_recv() => n,
                        () = tx.closed() => return,
                    };
                    let event = match next {
                        Ok(Some(n)) => match parse_payload(n.payload()) {
                            Some(event) => event,
                            None => {
                                tracing::warn!("ignoring an unrecognised invalidation payload");
                                continue;
                            }
                        },
                        Ok(None) => break,
                        Err(e) => {
                            tracing::warn!(error = %e, "invalidation listener failed");
                            break;
                        }
                    };
                    if tx.send(event).await.is_err() {
                        return;
                    }
                }
                tracing::warn!("invalidation listener lost its connection; reconnecting");
                if tx.send(Invalidation::Lost).await.is_err() {
                    return;
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64,
                    "invalidation listener cannot connect");
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    () = tx.closed() => return,
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads() {
        let id = Uuid::now_v7();
        assert_eq!(
            parse_payload(&format!("k:{id}")),
            Some(Invalidation::Key(id))
        );
        assert_eq!(
            parse_payload("t:acme"),
            Some(Invalidation::Tenant(TenantId::parse("acme").unwrap()))
        );
        let digest = KeyDigest::from_slice(&[7; 32]).unwrap();
        assert_eq!(
            parse_payload(&format!("n:{}@1700000000000", hex::encode([7u8; 32]))),
            Some(Invalidation::KeyAdded(digest))
        );
        assert_eq!(parse_payload("n:abcd"), None);
        assert_eq!(parse_payload("x:1"), None);
        assert_eq!(parse_payload("k:nope"), None);
    }
}

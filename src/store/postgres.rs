//! The Postgres store: the only place SQL lives. Every decision-changing
//! write records a change and sends `NOTIFY tollgate_invalidation` in its
//! own transaction, so replicas evict on commit, never before (`feed`).
//!
//! This file holds the connection, the error mapping and the `Store` impl,
//! which only delegates; the SQL is in the files named for what they hold:
//! `tenants`, `keys`, `quotas` (counters and replicas' holdings), `shares`
//! (rate shares), `replicas` (heartbeat), `feed` (change history and
//! `LISTEN/NOTIFY`), `audit_log` (the audit row every change writes).

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::postgres::PgPool;
use sqlx::{Postgres, Transaction};
use tokio::sync::mpsc;
use uuid::Uuid;

use super::{
    Invalidation, KeyCap, KeyRef, QuotaCounter, QuotaGrant, QuotaReport, QuotaTally, ShareRow,
    ShareView, Store, StoreError,
};
use crate::crypto::KeyDigest;
use crate::domain::console::AuditContext;
use crate::domain::revocation::{Criteria, LeakOutcome, LeakSource, PolicyMatch, PolicyOverride};
use crate::domain::{KeyId, KeyRecord, KeyUpdate, NewKey, Tenant, TenantId, TenantUpdate};

pub(super) mod audit_log;
mod feed;
mod held;
mod keys;
mod quotas;
mod replicas;
mod request_counts;
mod revocation;
mod shares;
mod tenants;

pub(super) use tenants::insert_tenant_row;

pub use feed::{FeedSettings, CHANNEL};

/// Postgres-backed [`Store`].
#[derive(Clone, Debug)]
pub struct PostgresStore {
    pool: PgPool,
    /// Longest a decision-path read may take, as seen from here (covers a
    /// hung server, which no `statement_timeout` can); `None`: unbounded.
    query_timeout: Option<Duration>,
    feed: FeedSettings,
    /// The connections the batched key read keeps between batches.
    held: std::sync::Arc<held::Held>,
}

impl PostgresStore {
    /// Wraps a pool.
    pub fn new(pool: PgPool) -> Self {
        Self {
            pool,
            query_timeout: None,
            feed: FeedSettings::default(),
            held: Default::default(),
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

    /// Applies pending migrations, and returns the versions of those a
    /// newer release applied that this binary does not know. Those are
    /// allowed: migrations only add (README, "Upgrades"), so an older
    /// replica restarted during a rolling upgrade, or the release a
    /// rollback returns to, keeps serving instead of refusing to start.
    /// Every migration this binary knows is still checked against what was
    /// applied (a changed migration fails).
    pub async fn migrate(&self) -> Result<Vec<i64>, sqlx::migrate::MigrateError> {
        // Embedded from `migrations/` (build.rs rebuilds when one is added).
        let mut migrator = sqlx::migrate!("./migrations");
        migrator.set_ignore_missing(true);
        migrator.run(&self.pool).await?;
        let known = migrator.iter().map(|m| m.version).max().unwrap_or_default();
        sqlx::query_scalar(
            "SELECT version FROM _sqlx_migrations WHERE version > $1 ORDER BY version",
        )
        .bind(known)
        .fetch_all(&self.pool)
        .await
        .map_err(sqlx::migrate::MigrateError::Execute)
    }

    /// The underlying pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Connections the batched key read holds between batches (taken
    /// from the pool, so counted there as in use).
    pub fn held_connections(&self) -> usize {
        self.held.len()
    }

    /// Held connections the server had closed, found as a read began (the
    /// read was retried on a new one).
    pub fn held_connections_lost(&self) -> u64 {
        self.held.lost()
    }

    /// How long a connection the batched key read holds may sit idle
    /// before it goes back to the pool (1 s unless set; `held.rs`). Set it
    /// before the store is used.
    pub fn with_held_idle_limit(mut self, limit: Duration) -> Self {
        self.held = std::sync::Arc::new(held::Held::new(limit));
        self
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

/// Records a decision-changing write and wakes every replica, inside
/// the write's transaction.
async fn notify(tx: &mut Transaction<'_, Postgres>, what: &Invalidation) -> Result<(), StoreError> {
    feed::record(tx, what).await
}

pub(super) async fn begin(pool: &PgPool) -> Result<Transaction<'static, Postgres>, StoreError> {
    pool.begin().await.map_err(map_err)
}

#[async_trait]
impl Store for PostgresStore {
    async fn create_tenant(&self, t: Tenant, ctx: &AuditContext) -> Result<Tenant, StoreError> {
        tenants::create_tenant(self, t, ctx).await
    }

    async fn get_tenant(&self, id: &TenantId) -> Result<Option<Tenant>, StoreError> {
        tenants::get_tenant(self, id).await
    }

    async fn update_tenant(
        &self,
        id: &TenantId,
        u: &TenantUpdate,
        now: DateTime<Utc>,
        ctx: &AuditContext,
    ) -> Result<Tenant, StoreError> {
        tenants::update_tenant(self, id, u, now, ctx).await
    }

    async fn list_tenants(
        &self,
        after: Option<&TenantId>,
        limit: u32,
    ) -> Result<Vec<Tenant>, StoreError> {
        tenants::list_tenants(self, after, limit).await
    }

    async fn insert_key(
        &self,
        key: NewKey,
        cap: KeyCap<'_>,
        ctx: &AuditContext,
    ) -> Result<KeyRecord, StoreError> {
        keys::insert_key(self, key, cap, ctx).await
    }

    async fn find_key_by_digest(
        &self,
        digest: &KeyDigest,
    ) -> Result<Option<KeyRecord>, StoreError> {
        keys::find_key_by_digest(self, digest).await
    }

    async fn find_keys_by_digests(
        &self,
        digests: &[KeyDigest],
    ) -> Result<Vec<KeyRecord>, StoreError> {
        keys::find_keys_by_digests(self, digests).await
    }

    async fn key_digests(&self) -> Result<Vec<KeyDigest>, StoreError> {
        keys::key_digests(self).await
    }

    async fn key_digests_page(
        &self,
        after: Option<KeyDigest>,
        limit: u32,
    ) -> Result<Vec<KeyDigest>, StoreError> {
        keys::key_digests_page(self, after, limit).await
    }

    async fn get_key(&self, key: KeyRef<'_>) -> Result<Option<KeyRecord>, StoreError> {
        keys::get_key(self, key).await
    }

    async fn list_keys(
        &self,
        tenant: &TenantId,
        after: Option<KeyId>,
        limit: u32,
        include_revoked: bool,
    ) -> Result<Vec<KeyRecord>, StoreError> {
        keys::list_keys(self, tenant, after, limit, include_revoked).await
    }

    async fn revoke_key(
        &self,
        key: KeyRef<'_>,
        reason: &str,
        now: DateTime<Utc>,
        ctx: &AuditContext,
    ) -> Result<KeyRecord, StoreError> {
        keys::revoke_key(self, key, reason, now, ctx).await
    }

    async fn rotate_key(
        &self,
        old: KeyRef<'_>,
        new: NewKey,
        old_expires_at: DateTime<Utc>,
        ctx: &AuditContext,
    ) -> Result<(KeyRecord, KeyRecord), StoreError> {
        keys::rotate_key(self, old, new, old_expires_at, ctx).await
    }

    async fn update_key(
        &self,
        key: KeyRef<'_>,
        u: &KeyUpdate,
        cap: KeyCap<'_>,
        now: DateTime<Utc>,
        ctx: &AuditContext,
    ) -> Result<KeyRecord, StoreError> {
        keys::update_key(self, key, u, cap, now, ctx).await
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
        keys::touch_keys(self, used).await
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
        quotas::lease_quota(self, replica, c, chunk, at_least, limit, consumed).await
    }

    async fn report_quota(
        &self,
        replica: Uuid,
        reports: &[QuotaReport],
    ) -> Result<Vec<QuotaTally>, StoreError> {
        quotas::report_quota(self, replica, reports).await
    }

    async fn reclaim_quota_leases(
        &self,
        replica: Uuid,
        stale_after_secs: u32,
    ) -> Result<u64, StoreError> {
        quotas::reclaim_quota_leases(self, replica, stale_after_secs).await
    }

    async fn quota_used(&self, c: &QuotaCounter) -> Result<u64, StoreError> {
        quotas::quota_used(self, c).await
    }

    async fn quota_consumed(&self, c: &QuotaCounter) -> Result<u64, StoreError> {
        quotas::quota_consumed(self, c).await
    }

    async fn heartbeat(&self, replica: Uuid, stale_after_secs: u32) -> Result<u32, StoreError> {
        replicas::heartbeat(self, replica, stale_after_secs).await
    }

    async fn leave(&self, replica: Uuid) -> Result<(), StoreError> {
        replicas::leave(self, replica).await
    }

    async fn rate_shares(&self, stale_after_secs: u32) -> Result<ShareView, StoreError> {
        shares::rate_shares(self, stale_after_secs).await
    }

    async fn exchange_rate_shares(
        &self,
        replica: Uuid,
        stale_after_secs: u32,
        decide: &mut (dyn for<'v> FnMut(&'v ShareView) -> Vec<ShareRow> + Send),
    ) -> Result<bool, StoreError> {
        shares::exchange_rate_shares(self, replica, stale_after_secs, decide).await
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

    async fn list_keys_labelled(
        &self,
        tenant: &TenantId,
        after: Option<KeyId>,
        limit: u32,
        include_revoked: bool,
        selector: &crate::domain::KeyLabels,
    ) -> Result<Vec<KeyRecord>, StoreError> {
        keys::list_keys_labelled(self, tenant, after, limit, include_revoked, selector).await
    }

    async fn insert_keys(
        &self,
        new: Vec<NewKey>,
        audit: &AuditContext,
    ) -> Result<Vec<KeyRecord>, StoreError> {
        keys::insert_keys(self, new, audit).await
    }

    async fn add_request_counts(
        &self,
        hour: DateTime<Utc>,
        counts: &[crate::domain::usage::KeyCounts],
    ) -> Result<(), StoreError> {
        request_counts::add(self, hour, counts).await
    }

    async fn request_counts(
        &self,
        key: KeyId,
        days_from: DateTime<Utc>,
        hours_from: DateTime<Utc>,
    ) -> Result<crate::domain::usage::RequestSeries, StoreError> {
        request_counts::series(self, key, days_from, hours_from).await
    }

    async fn revocation_override(
        &self,
        tenant: &TenantId,
    ) -> Result<Option<PolicyOverride>, StoreError> {
        revocation::get_override(self, tenant).await
    }

    async fn set_revocation_override(
        &self,
        tenant: &TenantId,
        policy: Option<&PolicyOverride>,
        now: DateTime<Utc>,
        ctx: &AuditContext,
    ) -> Result<(), StoreError> {
        revocation::set_override(self, tenant, policy, now, ctx).await
    }

    async fn policy_matches(
        &self,
        tenant: &TenantId,
        criteria: &Criteria,
        after: Option<KeyId>,
        limit: u32,
    ) -> Result<Vec<PolicyMatch>, StoreError> {
        revocation::policy_matches(self, tenant, criteria, after, limit).await
    }

    async fn revoke_by_policy(
        &self,
        tenant: &TenantId,
        criteria: &Criteria,
        limit: u32,
        ctx: &AuditContext,
    ) -> Result<Vec<PolicyMatch>, StoreError> {
        revocation::revoke_by_policy(self, tenant, criteria, limit, ctx).await
    }

    async fn report_leak(
        &self,
        id: KeyId,
        revoke: bool,
        source: &LeakSource,
        now: DateTime<Utc>,
        ctx: &AuditContext,
    ) -> Result<LeakOutcome, StoreError> {
        revocation::report_leak(self, id, revoke, source, now, ctx).await
    }
}

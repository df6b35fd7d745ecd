//! Storage behind a small trait. Postgres is the real store; the in-memory
//! store serves `tollgate dev` and unit tests.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use tokio::sync::mpsc;

use crate::crypto::KeyDigest;
use crate::domain::console::AuditContext;
use crate::domain::revocation::{Criteria, LeakOutcome, LeakSource, PolicyMatch, PolicyOverride};
use crate::domain::{KeyId, KeyRecord, KeyUpdate, NewKey, Tenant, TenantId, TenantUpdate};

pub mod console;
mod console_memory;
mod console_pg;
pub mod memory;
pub mod postgres;

pub use console::ConsoleStore;
pub use memory::MemoryStore;
pub use postgres::PostgresStore;

/// What went wrong in the store. `Unavailable` is transient: the caller may
/// retry, and the API answers UNAVAILABLE, never a denial. `Clone` so one
/// failed batched lookup can give every waiter the same error.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("not found")]
    NotFound,
    #[error("already exists")]
    AlreadyExists,
    #[error("the tenant already holds {cap} live keys, its plan's cap")]
    KeyCapReached { cap: u32 },
    #[error("the store is unavailable: {0}")]
    Unavailable(String),
    #[error("{0}")]
    Precondition(&'static str),
    #[error("store error: {0}")]
    Internal(String),
}

impl StoreError {
    /// Whether retrying later may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, StoreError::Unavailable(_))
    }
}

/// One replica's published state for one rate cell (`rate_shares`).
#[derive(Debug, Clone, PartialEq)]
pub struct ShareRow {
    /// The cell's name (`crate::limits::shares`): limit period,
    /// environment and subject; no secret.
    pub cell: String,
    pub replica: uuid::Uuid,
    /// Recent attempts on that replica, as a fraction of the cell's rate.
    pub demand: f64,
    /// The fraction of the cell's rate that replica may enforce.
    pub claim: f64,
}

/// The live replicas and what they published.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ShareView {
    pub live: Vec<uuid::Uuid>,
    /// Rows of live replicas only.
    pub rows: Vec<ShareRow>,
}

/// A change that may alter a cached decision, pushed to every replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Invalidation {
    Key(KeyId),
    /// A key digest now exists (created, rotated in, or rehashed): replicas
    /// add it to their set of known digests.
    KeyAdded(KeyDigest),
    Tenant(TenantId),
    /// Changes may have been missed and their history is gone (pruned
    /// while the listener was away): drop everything.
    Flush,
    /// The invalidation feed is live (first connect and every reconnect).
    Ready,
    /// The invalidation feed was lost; it is being re-established.
    Lost,
    /// Every change committed before this instant has been applied (the
    /// feed checked the newest sequence number against what it applied).
    /// The staleness bound counts from the latest of these, not from when
    /// a loss was noticed.
    Current(tokio::time::Instant),
}

/// One quota counter: a subject's usage of one limit in one period.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct QuotaCounter {
    /// `k:<key id>` or `t:<tenant id>`.
    pub subject: String,
    /// e.g. `key_per_month`.
    pub name: &'static str,
    pub period_start: DateTime<Utc>,
}

/// What a lease request obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuotaGrant {
    /// Units now leased to the caller (0 = the quota is exhausted).
    pub granted: u64,
    /// The counter's total after the grant (all replicas' leases).
    pub used: u64,
    /// Units of `used` other replicas hold and have not reported consumed.
    pub others: u64,
}

/// One replica's news about one counter it holds units of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuotaReport {
    pub counter: QuotaCounter,
    /// Units consumed since the last report (negative: units refunded
    /// after they were reported consumed).
    pub consumed: i64,
    /// Units given back: the replica has already removed them from what it
    /// may spend, so they are free for anyone at once.
    pub returned: u64,
}

/// A counter as the store sees it after a report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuotaTally {
    /// All units leased (consumed or held), as in [`QuotaGrant::used`].
    pub used: u64,
    /// Units of `used` other replicas hold and have not reported consumed.
    pub others: u64,
}

/// Decides a tenant's key cap inside the store's transaction.
pub type KeyCap<'a> = &'a (dyn Fn(&Tenant) -> Option<u32> + Sync);

/// A key operation scoped to one tenant when `tenant` is `Some`: a key of
/// another tenant is `NotFound`.
#[derive(Debug, Clone, Copy)]
pub struct KeyRef<'a> {
    pub id: KeyId,
    pub tenant: Option<&'a TenantId>,
}

/// The storage operations Tollgate needs. Every write that can change a
/// decision publishes an [`Invalidation`] to every replica; every management
/// change writes its audit event (from `audit`) in its own transaction.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    async fn create_tenant(
        &self,
        tenant: Tenant,
        audit: &AuditContext,
    ) -> Result<Tenant, StoreError>;
    async fn get_tenant(&self, id: &TenantId) -> Result<Option<Tenant>, StoreError>;
    async fn update_tenant(
        &self,
        id: &TenantId,
        update: &TenantUpdate,
        now: DateTime<Utc>,
        audit: &AuditContext,
    ) -> Result<Tenant, StoreError>;
    /// Tenants ordered by id, after `after`.
    async fn list_tenants(
        &self,
        after: Option<&TenantId>,
        limit: u32,
    ) -> Result<Vec<Tenant>, StoreError>;

    /// Inserts a key if the tenant exists and holds fewer live keys than
    /// `cap(tenant)`, atomically: concurrent inserts never pass the cap.
    async fn insert_key(
        &self,
        key: NewKey,
        cap: KeyCap<'_>,
        audit: &AuditContext,
    ) -> Result<KeyRecord, StoreError>;
    async fn find_key_by_digest(&self, digest: &KeyDigest)
        -> Result<Option<KeyRecord>, StoreError>;
    /// The stored keys whose digest is one of `digests`, each once, in no
    /// particular order (unknown digests have no record; duplicates are
    /// answered once), read in one statement: the decision path's batched
    /// cache-miss lookup (`authz/lookups.rs`). Records as decisions keep
    /// them: the display-only fields ([`KeyRecord::for_decisions`]) may be
    /// left empty.
    async fn find_keys_by_digests(
        &self,
        digests: &[KeyDigest],
    ) -> Result<Vec<KeyRecord>, StoreError>;
    /// Every stored key digest (revoked and expired keys included), for
    /// the replica's set of known digests.
    async fn key_digests(&self) -> Result<Vec<KeyDigest>, StoreError>;
    /// Up to `limit` stored key digests after `after`, in byte order: one
    /// page of the known-digest load (never the whole table in one query).
    async fn key_digests_page(
        &self,
        after: Option<KeyDigest>,
        limit: u32,
    ) -> Result<Vec<KeyDigest>, StoreError> {
        let mut all = self.key_digests().await?;
        all.sort_unstable_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        Ok(all
            .into_iter()
            .filter(|d| after.is_none_or(|a| d.as_bytes() > a.as_bytes()))
            .take(limit as usize)
            .collect())
    }
    async fn get_key(&self, key: KeyRef<'_>) -> Result<Option<KeyRecord>, StoreError>;
    /// A tenant's keys ordered by id, after `after`.
    async fn list_keys(
        &self,
        tenant: &TenantId,
        after: Option<KeyId>,
        limit: u32,
        include_revoked: bool,
    ) -> Result<Vec<KeyRecord>, StoreError>;
    /// Revokes a key (idempotent: a revoked key keeps its first revocation).
    async fn revoke_key(
        &self,
        key: KeyRef<'_>,
        reason: &str,
        now: DateTime<Utc>,
        audit: &AuditContext,
    ) -> Result<KeyRecord, StoreError>;
    /// Inserts `new` and marks the old key replaced, expiring at
    /// `old_expires_at`, in one transaction, with the old row locked: the
    /// old key must be live, and `new` takes its name, scopes, limits,
    /// lineage and lifetime from the locked row ([`KeyRecord::succeed`]).
    /// Rotation does not count against the cap: the old key stops counting
    /// as it is replaced. One key per lineage is in grace: rotating ends
    /// the grace of any earlier key of the lineage at once.
    async fn rotate_key(
        &self,
        old: KeyRef<'_>,
        new: NewKey,
        old_expires_at: DateTime<Utc>,
        audit: &AuditContext,
    ) -> Result<(KeyRecord, KeyRecord), StoreError>;
    /// Applies `update` with the key row locked: its precondition
    /// ([`KeyRecord::check_update`]) is checked on the locked row, and a
    /// key revived at `now` ([`KeyRecord::revived_by`]) is counted against
    /// `cap(tenant)` with the tenant row locked, as inserts are.
    async fn update_key(
        &self,
        key: KeyRef<'_>,
        update: &KeyUpdate,
        cap: KeyCap<'_>,
        now: DateTime<Utc>,
        audit: &AuditContext,
    ) -> Result<KeyRecord, StoreError>;
    /// Replaces a digest made with an old pepper by one made with the current.
    async fn rehash_key(
        &self,
        id: KeyId,
        old: &KeyDigest,
        new: &KeyDigest,
        pepper_version: i32,
    ) -> Result<(), StoreError>;
    /// Records last use for many keys in one write.
    async fn touch_keys(&self, used: &[(KeyId, DateTime<Utc>)]) -> Result<(), StoreError>;

    /// Leases up to `chunk` units of `counter` to `replica`, never letting
    /// its total pass `limit` (one conditional write: concurrent leases
    /// from every replica cannot exceed it). The same statement adds the
    /// grant to `replica`'s holding of the counter and takes `consumed`
    /// (units it consumed since its last report) off it.
    ///
    /// All or nothing for `at_least`: unless `at_least` units still fit
    /// under `limit`, nothing is granted (a request that does not fit takes
    /// nothing and strands nothing). Otherwise up to `chunk` (≥ `at_least`).
    async fn lease_quota(
        &self,
        replica: uuid::Uuid,
        counter: &QuotaCounter,
        chunk: u64,
        at_least: u64,
        limit: u64,
        consumed: i64,
    ) -> Result<QuotaGrant, StoreError>;
    /// Applies `replica`'s reports in one write: its holding of each counter
    /// drops by what it consumed and returned, and returned units leave the
    /// counter's total (they are free again). Returns each counter's tally,
    /// in the order of `reports`. A holding already reclaimed is not
    /// recreated; returned units are still freed (the replica no longer
    /// holds them, whatever the store thought).
    async fn report_quota(
        &self,
        replica: uuid::Uuid,
        reports: &[QuotaReport],
    ) -> Result<Vec<QuotaTally>, StoreError>;
    /// Deletes the holdings of replicas whose heartbeat is older than
    /// `stale_after_secs` (or gone), and `replica`'s own holdings at zero.
    /// The dead replicas' units stay in the counters' totals: one may have
    /// admitted them before it reported, so they count as consumed, never
    /// as free. Returns how many units were reclaimed that way.
    async fn reclaim_quota_leases(
        &self,
        replica: uuid::Uuid,
        stale_after_secs: u32,
    ) -> Result<u64, StoreError>;
    /// The counter's total: consumed and leased units (0 when it does not exist).
    async fn quota_used(&self, counter: &QuotaCounter) -> Result<u64, StoreError>;
    /// Units of the counter consumed as reported: its total less what
    /// replicas hold unspent or unreported.
    async fn quota_consumed(&self, counter: &QuotaCounter) -> Result<u64, StoreError>;
    /// Records that `replica` is alive; returns how many replicas are.
    async fn heartbeat(
        &self,
        replica: uuid::Uuid,
        stale_after_secs: u32,
    ) -> Result<u32, StoreError>;
    /// Removes `replica` from the live set (graceful shutdown).
    async fn leave(&self, replica: uuid::Uuid) -> Result<(), StoreError>;

    /// The live replicas and every live replica's published rate shares
    /// (`crate::limits::shares`). The default is one process alone: no
    /// other replica, nothing published.
    async fn rate_shares(&self, _stale_after_secs: u32) -> Result<ShareView, StoreError> {
        Ok(ShareView::default())
    }
    /// Reads the view inside a section exclusive across replicas, asks
    /// `decide` for `replica`'s rows, and replaces `replica`'s published
    /// rows with them, before the section ends: claims decided from one
    /// view never race another replica's. Writes only while `replica` is
    /// live (its heartbeat is recent); returns whether the rows were
    /// written. `decide` is called once.
    async fn exchange_rate_shares(
        &self,
        _replica: uuid::Uuid,
        _stale_after_secs: u32,
        decide: &mut (dyn for<'v> FnMut(&'v ShareView) -> Vec<ShareRow> + Send),
    ) -> Result<bool, StoreError> {
        decide(&ShareView::default());
        Ok(false)
    }

    /// Starts delivering invalidations (from every replica) to `tx`. The
    /// first message is `Ready` once the feed is live. After a `Lost`, the
    /// changes missed meanwhile are delivered before the next `Ready` (or a
    /// `Flush`, when their history is gone).
    fn watch(&self, tx: mpsc::Sender<Invalidation>);
    /// (open connections, idle connections) of a connection pool, if any.
    fn pool_stats(&self) -> Option<(u32, usize)> {
        None
    }
    /// Whether the store answers right now.
    async fn ping(&self) -> Result<(), StoreError>;
    /// The same store's console side (accounts, tokens, audit), if it has one.
    fn console_store(self: std::sync::Arc<Self>) -> Option<std::sync::Arc<dyn ConsoleStore>> {
        None
    }
    /// As [`Store::list_keys`], only keys carrying every label of
    /// `selector`. The default pages through `list_keys` and filters (the
    /// memory store); Postgres asks its index.
    async fn list_keys_labelled(
        &self,
        tenant: &TenantId,
        mut after: Option<KeyId>,
        limit: u32,
        include_revoked: bool,
        selector: &crate::domain::KeyLabels,
    ) -> Result<Vec<KeyRecord>, StoreError> {
        const PAGE: u32 = 500;
        let mut found = Vec::new();
        loop {
            let page = self.list_keys(tenant, after, PAGE, include_revoked).await?;
            let done = page.len() < PAGE as usize;
            after = page.last().map(|k| k.id);
            found.extend(page.into_iter().filter(|k| k.labels.matches(selector)));
            if found.len() >= limit as usize || done {
                found.truncate(limit as usize);
                return Ok(found);
            }
        }
    }
    /// Inserts imported keys, all or none (one already stored:
    /// `AlreadyExists`), bypassing the key cap, each audited as imported.
    async fn insert_keys(
        &self,
        keys: Vec<NewKey>,
        audit: &AuditContext,
    ) -> Result<Vec<KeyRecord>, StoreError>;
    /// Adds a flush's per-key request counts to each key's totals for
    /// `hour` and its day, in one write; drops hourly totals older than
    /// [`crate::domain::usage::HOURLY_RETENTION_HOURS`].
    async fn add_request_counts(
        &self,
        hour: DateTime<Utc>,
        counts: &[crate::domain::usage::KeyCounts],
    ) -> Result<(), StoreError>;
    /// A key's daily totals from `days_from` and hourly ones from
    /// `hours_from`, oldest first.
    async fn request_counts(
        &self,
        key: KeyId,
        days_from: DateTime<Utc>,
        hours_from: DateTime<Utc>,
    ) -> Result<crate::domain::usage::RequestSeries, StoreError>;
    /// The tenant's override of the profile's revocation policy
    /// (`crate::domain::revocation`), if it has one.
    async fn revocation_override(
        &self,
        tenant: &TenantId,
    ) -> Result<Option<PolicyOverride>, StoreError>;
    /// Sets (`None`: removes) the tenant's override, audited in the same
    /// transaction; `NotFound` when the tenant does not exist.
    async fn set_revocation_override(
        &self,
        tenant: &TenantId,
        policy: Option<&PolicyOverride>,
        now: DateTime<Utc>,
        audit: &AuditContext,
    ) -> Result<(), StoreError>;
    /// The tenant's keys `criteria` matches, ordered by id after `after`
    /// (the dry run: nothing changes). The same keys, in the same order, as
    /// [`Store::revoke_by_policy`] would revoke.
    async fn policy_matches(
        &self,
        tenant: &TenantId,
        criteria: &Criteria,
        after: Option<KeyId>,
        limit: u32,
    ) -> Result<Vec<PolicyMatch>, StoreError>;
    /// Revokes up to `limit` of the tenant's keys `criteria` matches, in one
    /// statement that skips keys another sweeper holds: with many replicas
    /// sweeping at once each key is revoked, audited and published once.
    /// Returns what this call revoked.
    async fn revoke_by_policy(
        &self,
        tenant: &TenantId,
        criteria: &Criteria,
        limit: u32,
        audit: &AuditContext,
    ) -> Result<Vec<PolicyMatch>, StoreError>;
    /// Records a leak report of key `id` (flags it; the first report's time
    /// is kept) and, when `revoke`, revokes it if live, in one audited
    /// transaction.
    async fn report_leak(
        &self,
        id: KeyId,
        revoke: bool,
        source: &LeakSource,
        now: DateTime<Utc>,
        audit: &AuditContext,
    ) -> Result<LeakOutcome, StoreError>;
}

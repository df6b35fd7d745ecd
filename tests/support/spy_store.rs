//! A [`Store`] that hands every call to a real one (Postgres in the
//! integration tests, the in-memory store in the benches) and watches from
//! the side: it counts the reads the caches are meant to spare and the
//! last-used writes, and it can hold back the invalidation feed, as if this
//! replica's NOTIFYs were late, so a test can tell the writing replica's own
//! immediate invalidation from the one the feed brings. Shared by
//! tests/api.rs (`mod spy_store`) and benches/hotpath.rs (`#[path]`).
#![allow(dead_code)]

use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use tokio::sync::{mpsc, watch};

use tollgate::crypto::KeyDigest;
use tollgate::domain::console::AuditContext;
use tollgate::domain::revocation::{
    Criteria, LeakOutcome, LeakSource, PolicyMatch, PolicyOverride,
};
use tollgate::domain::{KeyId, KeyRecord, KeyUpdate, NewKey, Tenant, TenantId, TenantUpdate};
use tollgate::store::{
    ConsoleStore, Invalidation, KeyCap, KeyRef, QuotaCounter, QuotaGrant, QuotaReport, QuotaTally,
    ShareRow, ShareView, Store, StoreError,
};

type R<T> = Result<T, StoreError>;

/// Counts of the calls that matter to the caches and the usage batch.
#[derive(Debug, Default)]
pub struct Counts {
    /// `find_key_by_digest`, `find_keys_by_digests` (one per statement,
    /// however many digests it carries) and `get_key`.
    pub key_reads: AtomicUsize,
    /// Digests asked for by `find_keys_by_digests`, all calls together.
    pub batched_digests: AtomicUsize,
    /// `get_tenant`.
    pub tenant_reads: AtomicUsize,
    /// `touch_keys` calls, and the rows they carried.
    pub touch_calls: AtomicUsize,
    pub touched_rows: AtomicUsize,
    /// `add_request_counts` calls, and the keys they carried.
    pub request_count_calls: AtomicUsize,
    pub request_count_rows: AtomicUsize,
}

pub struct SpyStore {
    inner: Arc<dyn Store>,
    pub counts: Counts,
    /// While true, invalidations wait (in order) instead of reaching the
    /// replica.
    held: watch::Sender<bool>,
}

impl SpyStore {
    pub fn new(inner: Arc<dyn Store>) -> Self {
        Self {
            inner,
            counts: Counts::default(),
            held: watch::Sender::new(false),
        }
    }

    /// Key and tenant reads so far.
    pub fn reads(&self) -> usize {
        self.counts.key_reads.load(SeqCst) + self.counts.tenant_reads.load(SeqCst)
    }

    pub fn key_reads(&self) -> usize {
        self.counts.key_reads.load(SeqCst)
    }

    /// Digests asked for by batched key reads so far.
    pub fn batched_digests(&self) -> usize {
        self.counts.batched_digests.load(SeqCst)
    }

    /// (touch_keys calls, rows written) so far.
    pub fn touches(&self) -> (usize, usize) {
        (
            self.counts.touch_calls.load(SeqCst),
            self.counts.touched_rows.load(SeqCst),
        )
    }

    /// From now on, invalidations from the feed wait until [`Self::release`].
    pub fn hold_feed(&self) {
        self.held.send_replace(true);
    }

    /// Delivers what waited, in order, and lets the feed flow again.
    pub fn release_feed(&self) {
        self.held.send_replace(false);
    }
}

#[async_trait]
impl Store for SpyStore {
    async fn create_tenant(&self, t: Tenant, a: &AuditContext) -> R<Tenant> {
        self.inner.create_tenant(t, a).await
    }
    async fn get_tenant(&self, id: &TenantId) -> R<Option<Tenant>> {
        self.counts.tenant_reads.fetch_add(1, SeqCst);
        self.inner.get_tenant(id).await
    }
    async fn update_tenant(
        &self,
        id: &TenantId,
        u: &TenantUpdate,
        now: DateTime<Utc>,
        a: &AuditContext,
    ) -> R<Tenant> {
        self.inner.update_tenant(id, u, now, a).await
    }
    async fn list_tenants(&self, after: Option<&TenantId>, n: u32) -> R<Vec<Tenant>> {
        self.inner.list_tenants(after, n).await
    }
    async fn insert_key(&self, key: NewKey, cap: KeyCap<'_>, a: &AuditContext) -> R<KeyRecord> {
        self.inner.insert_key(key, cap, a).await
    }
    async fn find_key_by_digest(&self, digest: &KeyDigest) -> R<Option<KeyRecord>> {
        self.counts.key_reads.fetch_add(1, SeqCst);
        self.inner.find_key_by_digest(digest).await
    }
    async fn find_keys_by_digests(&self, digests: &[KeyDigest]) -> R<Vec<KeyRecord>> {
        self.counts.key_reads.fetch_add(1, SeqCst);
        self.counts.batched_digests.fetch_add(digests.len(), SeqCst);
        self.inner.find_keys_by_digests(digests).await
    }
    async fn key_digests(&self) -> R<Vec<KeyDigest>> {
        self.inner.key_digests().await
    }
    async fn key_digests_page(&self, after: Option<KeyDigest>, n: u32) -> R<Vec<KeyDigest>> {
        self.inner.key_digests_page(after, n).await
    }
    async fn get_key(&self, key: KeyRef<'_>) -> R<Option<KeyRecord>> {
        self.counts.key_reads.fetch_add(1, SeqCst);
        self.inner.get_key(key).await
    }
    async fn list_keys(
        &self,
        t: &TenantId,
        after: Option<KeyId>,
        n: u32,
        revoked: bool,
    ) -> R<Vec<KeyRecord>> {
        self.inner.list_keys(t, after, n, revoked).await
    }
    async fn revoke_key(
        &self,
        key: KeyRef<'_>,
        reason: &str,
        now: DateTime<Utc>,
        a: &AuditContext,
    ) -> R<KeyRecord> {
        self.inner.revoke_key(key, reason, now, a).await
    }
    async fn rotate_key(
        &self,
        old: KeyRef<'_>,
        new: NewKey,
        until: DateTime<Utc>,
        a: &AuditContext,
    ) -> R<(KeyRecord, KeyRecord)> {
        self.inner.rotate_key(old, new, until, a).await
    }
    async fn update_key(
        &self,
        key: KeyRef<'_>,
        u: &KeyUpdate,
        cap: KeyCap<'_>,
        now: DateTime<Utc>,
        a: &AuditContext,
    ) -> R<KeyRecord> {
        self.inner.update_key(key, u, cap, now, a).await
    }
    async fn rehash_key(&self, id: KeyId, old: &KeyDigest, new: &KeyDigest, v: i32) -> R<()> {
        self.inner.rehash_key(id, old, new, v).await
    }
    async fn touch_keys(&self, used: &[(KeyId, DateTime<Utc>)]) -> R<()> {
        self.counts.touch_calls.fetch_add(1, SeqCst);
        self.counts.touched_rows.fetch_add(used.len(), SeqCst);
        self.inner.touch_keys(used).await
    }
    async fn lease_quota(
        &self,
        replica: uuid::Uuid,
        c: &QuotaCounter,
        chunk: u64,
        at_least: u64,
        limit: u64,
        consumed: i64,
    ) -> R<QuotaGrant> {
        self.inner
            .lease_quota(replica, c, chunk, at_least, limit, consumed)
            .await
    }
    async fn report_quota(
        &self,
        replica: uuid::Uuid,
        reports: &[QuotaReport],
    ) -> R<Vec<QuotaTally>> {
        self.inner.report_quota(replica, reports).await
    }
    async fn reclaim_quota_leases(&self, replica: uuid::Uuid, stale_after_secs: u32) -> R<u64> {
        self.inner
            .reclaim_quota_leases(replica, stale_after_secs)
            .await
    }
    async fn quota_consumed(&self, c: &QuotaCounter) -> R<u64> {
        self.inner.quota_consumed(c).await
    }
    async fn rate_shares(&self, stale_after_secs: u32) -> R<ShareView> {
        self.inner.rate_shares(stale_after_secs).await
    }
    async fn exchange_rate_shares(
        &self,
        replica: uuid::Uuid,
        stale_after_secs: u32,
        decide: &mut (dyn for<'v> FnMut(&'v ShareView) -> Vec<ShareRow> + Send),
    ) -> R<bool> {
        self.inner
            .exchange_rate_shares(replica, stale_after_secs, decide)
            .await
    }
    async fn quota_used(&self, c: &QuotaCounter) -> R<u64> {
        self.inner.quota_used(c).await
    }
    async fn heartbeat(&self, replica: uuid::Uuid, stale_after_secs: u32) -> R<u32> {
        self.inner.heartbeat(replica, stale_after_secs).await
    }
    async fn leave(&self, replica: uuid::Uuid) -> R<()> {
        self.inner.leave(replica).await
    }
    fn watch(&self, tx: mpsc::Sender<Invalidation>) {
        let (relay, mut events) = mpsc::channel(1024);
        self.inner.watch(relay);
        let mut held = self.held.subscribe();
        tokio::spawn(async move {
            while let Some(event) = events.recv().await {
                if held.wait_for(|held| !held).await.is_err() || tx.send(event).await.is_err() {
                    return;
                }
            }
        });
    }
    fn pool_stats(&self) -> Option<(u32, usize)> {
        self.inner.pool_stats()
    }
    async fn ping(&self) -> R<()> {
        self.inner.ping().await
    }
    fn console_store(self: Arc<Self>) -> Option<Arc<dyn ConsoleStore>> {
        self.inner.clone().console_store()
    }
    async fn list_keys_labelled(
        &self,
        t: &TenantId,
        after: Option<KeyId>,
        n: u32,
        revoked: bool,
        selector: &tollgate::domain::KeyLabels,
    ) -> R<Vec<KeyRecord>> {
        self.inner
            .list_keys_labelled(t, after, n, revoked, selector)
            .await
    }
    async fn insert_keys(&self, keys: Vec<NewKey>, a: &AuditContext) -> R<Vec<KeyRecord>> {
        self.inner.insert_keys(keys, a).await
    }

    async fn add_request_counts(
        &self,
        hour: DateTime<Utc>,
        counts: &[tollgate::domain::usage::KeyCounts],
    ) -> R<()> {
        self.counts.request_count_calls.fetch_add(1, SeqCst);
        self.counts
            .request_count_rows
            .fetch_add(counts.len(), SeqCst);
        self.inner.add_request_counts(hour, counts).await
    }
    async fn request_counts(
        &self,
        key: KeyId,
        days_from: DateTime<Utc>,
        hours_from: DateTime<Utc>,
    ) -> R<tollgate::domain::usage::RequestSeries> {
        self.inner.request_counts(key, days_from, hours_from).await
    }

    async fn revocation_override(&self, t: &TenantId) -> R<Option<PolicyOverride>> {
        self.inner.revocation_override(t).await
    }
    async fn set_revocation_override(
        &self,
        t: &TenantId,
        p: Option<&PolicyOverride>,
        now: DateTime<Utc>,
        a: &AuditContext,
    ) -> R<()> {
        self.inner.set_revocation_override(t, p, now, a).await
    }
    async fn policy_matches(
        &self,
        t: &TenantId,
        c: &Criteria,
        after: Option<KeyId>,
        limit: u32,
    ) -> R<Vec<PolicyMatch>> {
        self.inner.policy_matches(t, c, after, limit).await
    }
    async fn revoke_by_policy(
        &self,
        t: &TenantId,
        c: &Criteria,
        limit: u32,
        a: &AuditContext,
    ) -> R<Vec<PolicyMatch>> {
        self.inner.revoke_by_policy(t, c, limit, a).await
    }
    async fn report_leak(
        &self,
        id: KeyId,
        revoke: bool,
        source: &LeakSource,
        now: DateTime<Utc>,
        a: &AuditContext,
    ) -> R<LeakOutcome> {
        self.inner.report_leak(id, revoke, source, now, a).await
    }
}

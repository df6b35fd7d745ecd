//! In-memory [`Store`] for `tollgate dev` and unit tests. Same semantics as
//! Postgres (caps under a lock, tenant scoping, invalidations); nothing
//! survives a restart.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use tokio::sync::{broadcast, mpsc};

use super::{
    Invalidation, KeyCap, KeyRef, QuotaCounter, QuotaGrant, QuotaReport, QuotaTally, Store,
    StoreError,
};
use crate::crypto::KeyDigest;
use crate::domain::audit;
use crate::domain::console::AuditContext;
use crate::domain::revocation::{Criteria, LeakOutcome, LeakSource, PolicyMatch, PolicyOverride};
use crate::domain::{KeyId, KeyRecord, KeyUpdate, NewKey, Tenant, TenantId, TenantUpdate};

mod audit_log;
mod console_rows;
mod request_counts;
mod revocation;

#[derive(Default)]
pub(super) struct State {
    pub(super) tenants: BTreeMap<TenantId, Tenant>,
    keys: BTreeMap<KeyId, KeyRecord>,
    by_digest: HashMap<KeyDigest, KeyId>,
    quotas: HashMap<QuotaCounter, u64>,
    /// Units of each counter each replica holds (`quota_leases`).
    holdings: HashMap<(QuotaCounter, uuid::Uuid), u64>,
    /// Console users and tokens (`memory/console_rows.rs`).
    pub(super) console: console_rows::ConsoleState,
    /// Every change's audit event (`memory/audit_log.rs`).
    pub(super) audit: audit_log::AuditLog,
    /// Per-key request counts (`memory/request_counts.rs`).
    request_counts: request_counts::RequestCountRows,
    /// Revocation policy overrides and leak reports (`memory/revocation.rs`).
    pub(super) revocation: revocation::RevocationRows,
}

impl State {
    /// Units of `c` held by replicas other than `replica`.
    fn others(&self, c: &QuotaCounter, replica: uuid::Uuid) -> u64 {
        self.holdings
            .iter()
            .filter(|((counter, r), _)| counter == c && *r != replica)
            .map(|(_, units)| *units)
            .sum()
    }

    fn key_mut(&mut self, key: KeyRef<'_>) -> Result<&mut KeyRecord, StoreError> {
        self.keys
            .get_mut(&key.id)
            .filter(|k| key.tenant.is_none_or(|t| *t == k.tenant_id))
            .ok_or(StoreError::NotFound)
    }

    fn insert(&mut self, key: NewKey) -> Result<KeyRecord, StoreError> {
        if self.by_digest.contains_key(&key.digest) || self.keys.contains_key(&key.id) {
            return Err(StoreError::AlreadyExists);
        }
        let record = key.into_record();
        self.by_digest.insert(record.digest, record.id);
        self.keys.insert(record.id, record.clone());
        Ok(record)
    }
}

/// The in-memory store.
pub struct MemoryStore {
    state: Mutex<State>,
    events: broadcast::Sender<Invalidation>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self {
            state: Mutex::default(),
            events: broadcast::channel(1024).0,
        }
    }
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    pub(super) fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn publish(&self, event: Invalidation) {
        // No receiver yet is fine: nothing is cached without one.
        let _ = self.events.send(event);
    }
}

#[async_trait]
impl Store for MemoryStore {
    async fn create_tenant(
        &self,
        tenant: Tenant,
        ctx: &AuditContext,
    ) -> Result<Tenant, StoreError> {
        let mut s = self.state();
        if s.tenants.contains_key(&tenant.id) {
            return Err(StoreError::AlreadyExists);
        }
        s.audit.record(audit::tenant_created(ctx, &tenant));
        s.tenants.insert(tenant.id.clone(), tenant.clone());
        Ok(tenant)
    }

    async fn get_tenant(&self, id: &TenantId) -> Result<Option<Tenant>, StoreError> {
        Ok(self.state().tenants.get(id).cloned())
    }

    async fn update_tenant(
        &self,
        id: &TenantId,
        u: &TenantUpdate,
        now: DateTime<Utc>,
        ctx: &AuditContext,
    ) -> Result<Tenant, StoreError> {
        let updated = {
            let mut s = self.state();
            let t = s.tenants.get_mut(id).ok_or(StoreError::NotFound)?;
            if let Some(name) = &u.name {
                t.name.clone_from(name);
            }
            if let Some(plan) = &u.plan {
                t.plan.clone_from(plan);
            }
            if let Some(status) = u.status {
                t.status = status;
            }
            if let Some(o) = &u.overrides {
                t.overrides = o.clone();
            }
            t.updated_at = now;
            let t = t.clone();
            if let Some(carry) = u.carry_month_usage {
                let lineages: Vec<String> = s
                    .keys
                    .values()
                    .filter(|k| k.tenant_id == *id)
                    .map(|k| k.lineage_id.to_string())
                    .collect();
                let ours = |subject: &str| {
                    let mut parts = subject.split(':');
                    match (parts.next(), parts.next()) {
                        (Some("t"), Some(t)) => t == id.as_str(),
                        (Some("k"), Some(k)) => lineages.iter().any(|l| l == k),
                        _ => false,
                    }
                };
                let carried: Vec<(QuotaCounter, u64)> = s
                    .quotas
                    .iter()
                    .filter(|(c, _)| {
                        c.period_start == carry.from
                            && c.name.ends_with("_per_month")
                            && ours(&c.subject)
                    })
                    .map(|(c, used)| {
                        let to = QuotaCounter {
                            period_start: carry.to,
                            ..c.clone()
                        };
                        (to, *used)
                    })
                    .collect();
                for (c, used) in carried {
                    let e = s.quotas.entry(c).or_insert(0);
                    *e = (*e).max(used);
                }
            }
            s.audit.record(audit::tenant_updated(ctx, &t, u, now));
            t
        };
        self.publish(Invalidation::Tenant(id.clone()));
        Ok(updated)
    }

    async fn list_tenants(
        &self,
        after: Option<&TenantId>,
        limit: u32,
    ) -> Result<Vec<Tenant>, StoreError> {
        let s = self.state();
        Ok(s.tenants
            .values()
            .filter(|t| after.is_none_or(|a| t.id > *a))
            .take(limit as usize)
            .cloned()
            .collect())
    }

    async fn insert_key(
        &self,
        key: NewKey,
        cap: KeyCap<'_>,
        ctx: &AuditContext,
    ) -> Result<KeyRecord, StoreError> {
        let mut s = self.state();
        let tenant = s.tenants.get(&key.tenant_id).ok_or(StoreError::NotFound)?;
        if let Some(cap) = cap(tenant) {
            let live = s
                .keys
                .values()
                .filter(|k| k.tenant_id == key.tenant_id && k.is_live(key.created_at))
                .count();
            if live >= cap as usize {
                return Err(StoreError::KeyCapReached { cap });
            }
        }
        let record = s.insert(key)?;
        s.audit.record(audit::key_created(ctx, &record));
        self.publish(Invalidation::KeyAdded(record.digest));
        Ok(record)
    }

    async fn key_digests(&self) -> Result<Vec<KeyDigest>, StoreError> {
        Ok(self.state().by_digest.keys().copied().collect())
    }

    async fn find_key_by_digest(
        &self,
        digest: &KeyDigest,
    ) -> Result<Option<KeyRecord>, StoreError> {
        let s = self.state();
        Ok(s.by_digest
            .get(digest)
            .and_then(|id| s.keys.get(id))
            .cloned())
    }

    async fn find_keys_by_digests(
        &self,
        digests: &[KeyDigest],
    ) -> Result<Vec<KeyRecord>, StoreError> {
        let s = self.state();
        let mut ids = std::collections::HashSet::new();
        Ok(digests
            .iter()
            .filter_map(|d| s.by_digest.get(d))
            .filter(|id| ids.insert(**id))
            .filter_map(|id| s.keys.get(id))
            .cloned()
            .collect())
    }

    async fn get_key(&self, key: KeyRef<'_>) -> Result<Option<KeyRecord>, StoreError> {
        match self.state().key_mut(key) {
            Ok(k) => Ok(Some(k.clone())),
            Err(StoreError::NotFound) => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn list_keys(
        &self,
        tenant: &TenantId,
        after: Option<KeyId>,
        limit: u32,
        include_revoked: bool,
    ) -> Result<Vec<KeyRecord>, StoreError> {
        let s = self.state();
        Ok(s.keys
            .values()
            .filter(|k| &k.tenant_id == tenant)
            .filter(|k| after.is_none_or(|a| k.id > a))
            .filter(|k| include_revoked || k.revoked_at.is_none())
            .take(limit as usize)
            .cloned()
            .collect())
    }

    async fn revoke_key(
        &self,
        key: KeyRef<'_>,
        reason: &str,
        now: DateTime<Utc>,
        ctx: &AuditContext,
    ) -> Result<KeyRecord, StoreError> {
        let record = {
            let mut s = self.state();
            let k = s.key_mut(key)?;
            if k.revoked_at.is_none() {
                k.revoked_at = Some(now);
                k.revoke_reason = Some(reason.to_string());
            }
            let k = k.clone();
            s.audit.record(audit::key_revoked(ctx, &k, now));
            k
        };
        self.publish(Invalidation::Key(record.id));
        Ok(record)
    }

    async fn rotate_key(
        &self,
        old: KeyRef<'_>,
        mut new: NewKey,
        old_expires_at: DateTime<Utc>,
        ctx: &AuditContext,
    ) -> Result<(KeyRecord, KeyRecord), StoreError> {
        let mut ended = Vec::new();
        let (previous, inserted) = {
            let mut s = self.state();
            let current = s.key_mut(old)?.clone();
            if !current.is_live(new.created_at) {
                return Err(StoreError::Precondition(
                    "only a live key (not revoked, expired or already rotated) can be rotated",
                ));
            }
            current.succeed(&mut new);
            // One key per lineage in grace: an earlier one's grace ends now.
            let at = new.created_at;
            for k in s.keys.values_mut().filter(|k| {
                k.lineage_id == current.lineage_id
                    && k.id != current.id
                    && k.replaced_by.is_some()
                    && k.expires_at.is_none_or(|e| e > at)
            }) {
                k.expires_at = Some(at);
                ended.push(k.id);
            }
            let inserted = s.insert(new)?;
            let k = s.key_mut(old)?;
            k.replaced_by = Some(inserted.id);
            k.expires_at = Some(
                k.expires_at
                    .map_or(old_expires_at, |e| e.min(old_expires_at)),
            );
            let previous = k.clone();
            s.audit
                .record(audit::key_rotated(ctx, &previous, &inserted));
            (previous, inserted)
        };
        for id in ended {
            self.publish(Invalidation::Key(id));
        }
        self.publish(Invalidation::Key(previous.id));
        self.publish(Invalidation::KeyAdded(inserted.digest));
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
        let record = {
            let mut s = self.state();
            let before = s.key_mut(key)?.clone();
            before.check_update(u).map_err(StoreError::Precondition)?;
            if before.revived_by(u, now) {
                let tenant = s
                    .tenants
                    .get(&before.tenant_id)
                    .ok_or(StoreError::NotFound)?;
                if let Some(cap) = cap(tenant) {
                    let live = s
                        .keys
                        .values()
                        .filter(|k| k.tenant_id == before.tenant_id && k.is_live(now))
                        .count();
                    if live >= cap as usize {
                        return Err(StoreError::KeyCapReached { cap });
                    }
                }
            }
            let k = s.key_mut(key)?;
            if let Some(name) = &u.name {
                k.name.clone_from(name);
            }
            if let Some(scopes) = &u.scopes {
                k.scopes.clone_from(scopes);
            }
            if let Some(expires_at) = u.expires_at {
                k.expires_at = expires_at;
            }
            if let Some(limits) = &u.limits {
                k.limits.clone_from(limits);
            }
            if let Some(labels) = &u.labels {
                k.labels.clone_from(labels);
            }
            let k = k.clone();
            s.audit.record(audit::key_updated(ctx, &before, &k, u, now));
            k
        };
        self.publish(Invalidation::Key(record.id));
        Ok(record)
    }

    async fn rehash_key(
        &self,
        id: KeyId,
        old: &KeyDigest,
        new: &KeyDigest,
        pepper_version: i32,
    ) -> Result<(), StoreError> {
        let mut s = self.state();
        if s.by_digest.get(old) == Some(&id) {
            s.by_digest.remove(old);
            s.by_digest.insert(*new, id);
            if let Some(k) = s.keys.get_mut(&id) {
                k.digest = *new;
                k.pepper_version = pepper_version;
            }
        }
        drop(s);
        self.publish(Invalidation::KeyAdded(*new));
        Ok(())
    }

    async fn touch_keys(&self, used: &[(KeyId, DateTime<Utc>)]) -> Result<(), StoreError> {
        let mut s = self.state();
        for (id, at) in used {
            if let Some(k) = s.keys.get_mut(id) {
                k.last_used_at = k.last_used_at.max(Some(*at));
            }
        }
        Ok(())
    }

    async fn lease_quota(
        &self,
        replica: uuid::Uuid,
        c: &QuotaCounter,
        chunk: u64,
        at_least: u64,
        limit: u64,
        consumed: i64,
    ) -> Result<QuotaGrant, StoreError> {
        let mut s = self.state();
        let used = s.quotas.entry(c.clone()).or_insert(0);
        let left = limit.saturating_sub(*used);
        let granted = if left >= at_least.max(1) {
            chunk.max(at_least).min(left)
        } else {
            0
        };
        *used += granted;
        let used = *used;
        if granted > 0 || consumed != 0 {
            let held = s.holdings.entry((c.clone(), replica)).or_insert(0);
            let after = i128::from(*held) + i128::from(granted) - i128::from(consumed);
            *held = u64::try_from(after.max(0)).unwrap_or(u64::MAX);
        }
        Ok(QuotaGrant {
            granted,
            used,
            others: s.others(c, replica),
        })
    }

    async fn report_quota(
        &self,
        replica: uuid::Uuid,
        reports: &[QuotaReport],
    ) -> Result<Vec<QuotaTally>, StoreError> {
        let mut s = self.state();
        let mut out = Vec::with_capacity(reports.len());
        for r in reports {
            let key = (r.counter.clone(), replica);
            if let Some(held) = s.holdings.get_mut(&key) {
                let drop = i128::from(r.consumed) + i128::from(r.returned);
                *held = u64::try_from((i128::from(*held) - drop).max(0)).unwrap_or(u64::MAX);
            }
            let used = s.quotas.get_mut(&r.counter).map_or(0, |used| {
                *used = used.saturating_sub(r.returned);
                *used
            });
            out.push(QuotaTally {
                used,
                others: s.others(&r.counter, replica),
            });
        }
        Ok(out)
    }

    async fn reclaim_quota_leases(
        &self,
        replica: uuid::Uuid,
        _stale_after_secs: u32,
    ) -> Result<u64, StoreError> {
        // One process: no other replica to outlive.
        self.state()
            .holdings
            .retain(|(_, r), units| *r != replica || *units > 0);
        Ok(0)
    }

    async fn quota_used(&self, c: &QuotaCounter) -> Result<u64, StoreError> {
        Ok(self.state().quotas.get(c).copied().unwrap_or(0))
    }

    async fn quota_consumed(&self, c: &QuotaCounter) -> Result<u64, StoreError> {
        let s = self.state();
        let held: u64 = s
            .holdings
            .iter()
            .filter(|((counter, _), _)| counter == c)
            .map(|(_, units)| *units)
            .sum();
        Ok(s.quotas.get(c).copied().unwrap_or(0).saturating_sub(held))
    }

    async fn heartbeat(&self, _replica: uuid::Uuid, _stale: u32) -> Result<u32, StoreError> {
        // One process: one replica.
        Ok(1)
    }

    async fn leave(&self, _replica: uuid::Uuid) -> Result<(), StoreError> {
        Ok(())
    }

    fn watch(&self, tx: mpsc::Sender<Invalidation>) {
        let mut rx = self.events.subscribe();
        tokio::spawn(async move {
            if tx.send(Invalidation::Ready).await.is_err() {
                return;
            }
            loop {
                let event = match rx.recv().await {
                    Ok(e) => e,
                    Err(broadcast::error::RecvError::Lagged(_)) => Invalidation::Flush,
                    Err(broadcast::error::RecvError::Closed) => return,
                };
                if tx.send(event).await.is_err() {
                    return;
                }
            }
        });
    }

    fn console_store(
        self: std::sync::Arc<Self>,
    ) -> Option<std::sync::Arc<dyn super::ConsoleStore>> {
        Some(self)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }

    async fn insert_keys(
        &self,
        keys: Vec<NewKey>,
        ctx: &AuditContext,
    ) -> Result<Vec<KeyRecord>, StoreError> {
        let records = {
            let mut s = self.state();
            for k in &keys {
                if !s.tenants.contains_key(&k.tenant_id) {
                    return Err(StoreError::NotFound);
                }
                if s.by_digest.contains_key(&k.digest) {
                    return Err(StoreError::AlreadyExists);
                }
            }
            let mut records = Vec::with_capacity(keys.len());
            for k in keys {
                let record = s.insert(k)?;
                s.audit.record(audit::key_imported(ctx, &record));
                records.push(record);
            }
            records
        };
        for r in &records {
            self.publish(Invalidation::KeyAdded(r.digest));
        }
        Ok(records)
    }

    async fn add_request_counts(
        &self,
        hour: DateTime<Utc>,
        counts: &[crate::domain::usage::KeyCounts],
    ) -> Result<(), StoreError> {
        self.state().request_counts.add(hour, counts);
        Ok(())
    }

    async fn request_counts(
        &self,
        key: KeyId,
        days_from: DateTime<Utc>,
        hours_from: DateTime<Utc>,
    ) -> Result<crate::domain::usage::RequestSeries, StoreError> {
        Ok(self
            .state()
            .request_counts
            .series(key, days_from, hours_from))
    }

    async fn revocation_override(
        &self,
        tenant: &TenantId,
    ) -> Result<Option<PolicyOverride>, StoreError> {
        Ok(self.revocation_override_row(tenant))
    }

    async fn set_revocation_override(
        &self,
        tenant: &TenantId,
        policy: Option<&PolicyOverride>,
        now: DateTime<Utc>,
        ctx: &AuditContext,
    ) -> Result<(), StoreError> {
        self.set_revocation_override_row(tenant, policy, now, ctx)
    }

    async fn policy_matches(
        &self,
        tenant: &TenantId,
        criteria: &Criteria,
        after: Option<KeyId>,
        limit: u32,
    ) -> Result<Vec<PolicyMatch>, StoreError> {
        Ok(self.policy_match_rows(tenant, criteria, after, limit))
    }

    async fn revoke_by_policy(
        &self,
        tenant: &TenantId,
        criteria: &Criteria,
        limit: u32,
        ctx: &AuditContext,
    ) -> Result<Vec<PolicyMatch>, StoreError> {
        Ok(self.revoke_policy_rows(tenant, criteria, limit, ctx))
    }

    async fn report_leak(
        &self,
        id: KeyId,
        revoke: bool,
        source: &LeakSource,
        now: DateTime<Utc>,
        ctx: &AuditContext,
    ) -> Result<LeakOutcome, StoreError> {
        self.report_leak_row(id, revoke, source, now, ctx)
    }
}

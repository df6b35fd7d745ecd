//! Automatic revocation in the [`MemoryStore`](super::MemoryStore): the
//! tenants' policy overrides and the keys reported leaked, changed under
//! the store's one lock (so a key is revoked once however many sweep).

use std::collections::{BTreeMap, HashSet};

use chrono::{DateTime, Utc};

use super::{MemoryStore, State};
use crate::domain::audit;
use crate::domain::console::AuditContext;
use crate::domain::revocation::{
    Criteria, LeakOutcome, LeakSource, PolicyMatch, PolicyOverride, PolicyReason,
};
use crate::domain::{KeyId, TenantId};
use crate::store::{Invalidation, StoreError};

/// `revocation_policies` and `leaked_keys`.
#[derive(Default)]
pub(in crate::store) struct RevocationRows {
    overrides: BTreeMap<TenantId, PolicyOverride>,
    leaked: HashSet<KeyId>,
}

impl State {
    fn policy_matches(
        &self,
        tenant: &TenantId,
        c: &Criteria,
        after: Option<KeyId>,
        limit: u32,
    ) -> Vec<PolicyMatch> {
        self.keys
            .values()
            .filter(|k| &k.tenant_id == tenant && after.is_none_or(|a| k.id > a))
            .filter_map(|k| {
                c.matches(k, self.revocation.leaked.contains(&k.id))
                    .map(|reason| PolicyMatch {
                        key: k.clone(),
                        reason,
                    })
            })
            .take(limit as usize)
            .collect()
    }
}

impl MemoryStore {
    pub(super) fn revocation_override_row(&self, tenant: &TenantId) -> Option<PolicyOverride> {
        self.state().revocation.overrides.get(tenant).copied()
    }

    pub(super) fn set_revocation_override_row(
        &self,
        tenant: &TenantId,
        policy: Option<&PolicyOverride>,
        now: DateTime<Utc>,
        ctx: &AuditContext,
    ) -> Result<(), StoreError> {
        let mut s = self.state();
        if !s.tenants.contains_key(tenant) {
            return Err(StoreError::NotFound);
        }
        let old = match policy {
            Some(p) => s.revocation.overrides.insert(tenant.clone(), *p),
            None => s.revocation.overrides.remove(tenant),
        };
        s.audit.record(audit::revocation_policy_updated(
            ctx,
            tenant,
            old.as_ref(),
            policy,
            now,
        ));
        Ok(())
    }

    pub(super) fn policy_match_rows(
        &self,
        tenant: &TenantId,
        c: &Criteria,
        after: Option<KeyId>,
        limit: u32,
    ) -> Vec<PolicyMatch> {
        self.state().policy_matches(tenant, c, after, limit)
    }

    pub(super) fn revoke_policy_rows(
        &self,
        tenant: &TenantId,
        c: &Criteria,
        limit: u32,
        ctx: &AuditContext,
    ) -> Vec<PolicyMatch> {
        let revoked = {
            let mut s = self.state();
            let mut found = s.policy_matches(tenant, c, None, limit);
            for m in &mut found {
                if let Some(k) = s.keys.get_mut(&m.key.id) {
                    k.revoked_at = Some(c.now);
                    k.revoke_reason = Some(m.reason.revoke_reason());
                    m.key = k.clone();
                }
                s.audit.record(audit::key_revoked_by_policy(
                    ctx, &m.key, m.reason, c, c.now,
                ));
            }
            found
        };
        for m in &revoked {
            self.publish(Invalidation::Key(m.key.id));
        }
        revoked
    }

    pub(super) fn report_leak_row(
        &self,
        id: KeyId,
        revoke: bool,
        source: &LeakSource,
        now: DateTime<Utc>,
        ctx: &AuditContext,
    ) -> Result<LeakOutcome, StoreError> {
        let outcome = {
            let mut s = self.state();
            let Some(k) = s.keys.get_mut(&id) else {
                return Err(StoreError::NotFound);
            };
            let revoked = revoke && k.revoked_at.is_none();
            if revoked {
                k.revoked_at = Some(now);
                k.revoke_reason = Some(PolicyReason::ReportedLeaked.revoke_reason());
            }
            let key = k.clone();
            let first_report = s.revocation.leaked.insert(id);
            s.audit
                .record(audit::key_leak_reported(ctx, &key, source, revoked, now));
            if revoked {
                let c = Criteria {
                    now,
                    unused_before: None,
                    created_before: None,
                    leaked: true,
                };
                s.audit.record(audit::key_revoked_by_policy(
                    ctx,
                    &key,
                    PolicyReason::ReportedLeaked,
                    &c,
                    now,
                ));
            }
            LeakOutcome {
                key,
                first_report,
                revoked,
            }
        };
        if outcome.revoked {
            self.publish(Invalidation::Key(id));
        }
        Ok(outcome)
    }
}

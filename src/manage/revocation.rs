//! Automatic revocation: a tenant's effective policy (the profile's
//! `[revocation]`, with the tenant's override), the dry run, the sweep
//! every replica runs, and what each revocation announces. Leak reports
//! are `manage/leaks.rs` (re-exported here). No tonic, no SQL.

use super::revocation_events::RevocationEvent;
use super::{page_size, parse_tenant_id, Manager, Page};
use crate::domain::console::AuditContext;
use crate::domain::revocation::{PolicyMatch, PolicyOverride, RevocationPolicy, MAX_POLICY_DAYS};
use crate::domain::{KeyId, TenantId, Violations};
use crate::error::Result;
use crate::store::Invalidation;

pub use super::leaks::{LeakLabel, LeakVerdict, LeakedToken, MAX_LEAK_TOKENS};

/// How often every replica sweeps (`[revocation]` in the config file,
/// `TOLLGATE_REVOCATION__*` in the environment).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SweepSettings {
    /// Seconds between sweeps (the first one interval after start); 0 = off.
    pub sweep_interval_seconds: u64,
    /// Keys revoked per statement (one transaction per batch).
    pub sweep_batch: u32,
}

impl Default for SweepSettings {
    fn default() -> Self {
        Self {
            sweep_interval_seconds: 3600,
            sweep_batch: 500,
        }
    }
}

/// A tenant's policy as it applies, for the dry run and the console.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyView {
    /// The profile's default with the override applied.
    pub effective: RevocationPolicy,
    /// The tenant's override, if any.
    pub tenant_override: Option<PolicyOverride>,
}

/// One sweep's result on this replica.
#[derive(Debug, Default)]
pub struct SweepReport {
    /// Tenants whose policy has a rule on.
    pub tenants_swept: u32,
    /// Keys this replica revoked (another replica's are not here).
    pub revoked: Vec<PolicyMatch>,
    /// Tenants the sweep could not finish (store errors; retried next sweep).
    pub failed_tenants: u32,
}

fn check_days(field: &str, d: Option<u32>, v: &mut Violations) {
    if d.is_some_and(|d| d > MAX_POLICY_DAYS) {
        v.add(
            field,
            format!("must be 0 (off) to {MAX_POLICY_DAYS} days, or unset"),
        );
    }
}

impl Manager {
    /// The tenant's policy: the profile's, with the tenant's override.
    pub async fn revocation_policy(&self, tenant: &TenantId) -> Result<PolicyView> {
        let tenant_override = self.store.revocation_override(tenant).await?;
        Ok(PolicyView {
            effective: self
                .profile
                .revocation
                .with_override(tenant_override.as_ref()),
            tenant_override,
        })
    }

    /// Sets the tenant's override (`None`: back to the profile's policy),
    /// audited as `ctx`. Takes effect at the next sweep.
    pub async fn set_revocation_policy_as(
        &self,
        ctx: &AuditContext,
        tenant_id: &str,
        policy: Option<PolicyOverride>,
    ) -> Result<PolicyView> {
        let mut v = Violations::default();
        let tenant = parse_tenant_id("tenant_id", tenant_id, &mut v);
        if let Some(p) = &policy {
            check_days("unused_days", p.unused_days, &mut v);
            check_days("max_age_days", p.max_age_days, &mut v);
        }
        v.into_result()?;
        let tenant = tenant.expect("validated");
        self.store
            .set_revocation_override(&tenant, policy.as_ref(), self.clock.now(), ctx)
            .await
            .map_err(super::not_found("tenant"))?;
        tracing::info!(tenant_id = %tenant, "revocation policy set");
        self.revocation_policy(&tenant).await
    }

    /// The dry run: the tenant's policy and a page of the keys a sweep
    /// now would revoke (the same keys, judged at the same clock).
    pub async fn list_policy_revocations(
        &self,
        tenant_id: &str,
        page_size_req: u32,
        page_token: &str,
    ) -> Result<(PolicyView, Page<PolicyMatch>)> {
        let mut v = Violations::default();
        let tenant = parse_tenant_id("tenant_id", tenant_id, &mut v);
        let size = page_size(page_size_req, &mut v);
        let after = if page_token.is_empty() {
            None
        } else {
            let t = KeyId::parse_str(page_token).ok();
            if t.is_none() {
                v.add(
                    "page_token",
                    "is not a token from a previous ListPolicyRevocations response",
                );
            }
            t
        };
        v.into_result()?;
        let tenant = tenant.expect("validated");
        self.tenant(&tenant).await?;
        let view = self.revocation_policy(&tenant).await?;
        let Some(criteria) = view.effective.criteria(self.clock.now()) else {
            return Ok((
                view,
                Page {
                    items: vec![],
                    next_page_token: String::new(),
                },
            ));
        };
        let mut items = self
            .store
            .policy_matches(&tenant, &criteria, after, size + 1)
            .await?;
        let next_page_token = if items.len() > size as usize {
            items.truncate(size as usize);
            items
                .last()
                .map(|m| m.key.id.to_string())
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok((
            view,
            Page {
                items,
                next_page_token,
            },
        ))
    }

    /// One sweep over every tenant, `batch` keys per statement: revokes
    /// what each tenant's policy matches at this replica's clock. Safe on
    /// every replica at once (the store skips keys another sweeper holds).
    pub async fn sweep_revocations(&self, batch: u32) -> SweepReport {
        let batch = batch.max(1);
        let ctx = AuditContext {
            actor: "revocation-policy".into(),
            request_id: format!("sweep-{}", uuid::Uuid::now_v7()),
        };
        let mut report = SweepReport::default();
        let mut after: Option<TenantId> = None;
        loop {
            let tenants = match self.store.list_tenants(after.as_ref(), 500).await {
                Ok(t) => t,
                Err(e) => {
                    tracing::warn!(error = %e, "revocation sweep could not list tenants");
                    report.failed_tenants += 1;
                    return report;
                }
            };
            let Some(last) = tenants.last() else {
                return report;
            };
            after = Some(last.id.clone());
            for tenant in &tenants {
                match self.sweep_tenant(&tenant.id, batch, &ctx).await {
                    Ok(None) => {}
                    Ok(Some(revoked)) => {
                        report.tenants_swept += 1;
                        report.revoked.extend(revoked);
                    }
                    Err(e) => {
                        tracing::warn!(tenant_id = %tenant.id, error = %e,
                            "revocation sweep failed for a tenant; retried next sweep");
                        report.failed_tenants += 1;
                    }
                }
            }
            if tenants.len() < 500 {
                return report;
            }
        }
    }

    /// Sweeps one tenant; `None` when its policy has no rule on.
    async fn sweep_tenant(
        &self,
        tenant: &TenantId,
        batch: u32,
        ctx: &AuditContext,
    ) -> Result<Option<Vec<PolicyMatch>>> {
        let view = self.revocation_policy(tenant).await?;
        let Some(criteria) = view.effective.criteria(self.clock.now()) else {
            return Ok(None);
        };
        let mut all = Vec::new();
        loop {
            let revoked = self
                .store
                .revoke_by_policy(tenant, &criteria, batch, ctx)
                .await?;
            for m in &revoked {
                self.announce_policy_revocation(m);
            }
            let done = revoked.len() < batch as usize;
            all.extend(revoked);
            if done {
                return Ok(Some(all));
            }
        }
    }

    /// A key this replica revoked by policy: refused here at once (the
    /// change feed tells the others), counted, logged, and sent as an
    /// event (`manage::revocation_events`) when a sink is set.
    pub(super) fn announce_policy_revocation(&self, m: &PolicyMatch) {
        self.changed(Invalidation::Key(m.key.id));
        metrics::counter!(crate::telemetry::POLICY_REVOCATIONS, "policy" => m.reason.as_str())
            .increment(1);
        tracing::info!(tenant_id = %m.key.tenant_id, key_id = %m.key.id,
            policy = m.reason.as_str(), "key revoked by policy");
        if let Some(sink) = &self.revocation_events {
            sink.publish(RevocationEvent {
                id: uuid::Uuid::now_v7(),
                kind: "key.revoked",
                tenant_id: m.key.tenant_id.clone(),
                key_id: m.key.id,
                policy: Some(m.reason.as_str()),
                revoked: None,
                at: m.key.revoked_at.unwrap_or_else(|| self.clock.now()),
            });
        }
    }
}

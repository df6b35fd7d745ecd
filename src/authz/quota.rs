//! CheckQuota and GetUsage: resolving a tenant-or-key subject and
//! answering for its limits and quotas without authenticating a request.

use std::sync::Arc;

use chrono::{DateTime, Utc};

use super::{subject_of, AuthInput, Authenticator};
use crate::domain::{
    CredentialType, Decision, KeyId, KeyRecord, Principal, Reason, Tenant, TenantId, Verdict,
};
use crate::error::{Error, Result};
use crate::limits::{previous_period_start, quota_counter};
use crate::store::QuotaCounter;

/// Whose limits CheckQuota is asked about.
#[derive(Clone, Copy)]
pub enum QuotaSubject<'a> {
    Tenant(&'a str),
    Key(&'a str),
    /// A raw API key.
    Credential(&'a str),
}

/// CheckQuota's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuotaAnswer {
    /// The subject's plan (unset when the credential was refused).
    pub plan: Option<String>,
    pub verdict: Verdict,
}

/// One quota's usage, for dashboards.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuotaUsage {
    pub name: &'static str,
    pub limit: u64,
    pub period_start: DateTime<Utc>,
    pub period_end: DateTime<Utc>,
    pub used: u64,
    pub previous_start: DateTime<Utc>,
    pub previous_used: u64,
}

impl Authenticator {
    /// Resolves a tenant-or-key subject for CheckQuota / GetUsage. `Err`
    /// inside is a denial of the subject itself (revoked, expired, inactive).
    async fn subject(
        &self,
        tenant_id: &str,
        key_id: &str,
    ) -> Result<Result<(Arc<Tenant>, Option<KeyRecord>), Reason>> {
        let key = if key_id.is_empty() {
            None
        } else {
            let id = KeyId::parse_str(key_id)
                .map_err(|_| Error::invalid("key_id", "must be a key id (a UUID)"))?;
            let key = crate::store::KeyRef { id, tenant: None };
            let record = self
                .store
                .get_key(key)
                .await?
                .ok_or(Error::NotFound("key"))?;
            let now = self.clock.now();
            if record.is_revoked() {
                return Ok(Err(Reason::KeyRevoked));
            }
            if record.is_expired(now) {
                return Ok(Err(Reason::KeyExpired));
            }
            Some(record)
        };
        let tenant_id = match &key {
            Some(k) => k.tenant_id.clone(),
            None => TenantId::parse(tenant_id).ok_or_else(|| {
                Error::invalid("tenant_id", "must be 1-64 characters of [A-Za-z0-9_-]")
            })?,
        };
        let tenant = self
            .find_tenant(&tenant_id)
            .await?
            .ok_or(Error::NotFound("tenant"))?;
        if !self.profile.is_active(tenant.status) || self.profile.plan(&tenant.plan).is_none() {
            return Ok(Err(Reason::SubscriptionInactive));
        }
        Ok(Ok((tenant, key)))
    }

    /// Checks (and unless `dry_run` consumes `cost` of) every limit of a
    /// tenant, a key (with its tenant's), or a credential. Denied requests
    /// consume nothing. Answers are counted in `tollgate_quota_checks_total`.
    pub async fn check_quota(
        &self,
        subject: QuotaSubject<'_>,
        cost: u32,
        dry_run: bool,
    ) -> Result<QuotaAnswer> {
        let answer = self.answer_quota(subject, cost, dry_run).await;
        if let Ok(a) = &answer {
            self.metrics.quota_check(&a.verdict.decision);
        }
        answer
    }

    async fn answer_quota(
        &self,
        subject: QuotaSubject<'_>,
        cost: u32,
        dry_run: bool,
    ) -> Result<QuotaAnswer> {
        let cost = u64::from(cost.max(1));
        // A presented key's decision is counted per key, as Authenticate's is
        // (dry runs too; its own state's denials are counted on identifying).
        let presented = matches!(subject, QuotaSubject::Credential(_));
        let denied = |reason| QuotaAnswer {
            plan: None,
            verdict: Verdict::plain(Decision::Deny(reason)),
        };
        let (tenant, key, allow) = match subject {
            QuotaSubject::Credential(api_key) => {
                let input = AuthInput {
                    api_key,
                    ..AuthInput::default()
                };
                match self.identify(input).await? {
                    Err(reason) => return Ok(denied(reason)),
                    Ok(who) => (who.tenant, who.record, Decision::Allow(who.principal)),
                }
            }
            QuotaSubject::Key(id) => match self.subject("", id).await? {
                Err(reason) => return Ok(denied(reason)),
                Ok((tenant, key)) => (
                    tenant,
                    key.map(Arc::new),
                    Decision::Deny(Reason::KeyUnknown),
                ),
            },
            QuotaSubject::Tenant(id) => match self.subject(id, "").await? {
                Err(reason) => return Ok(denied(reason)),
                Ok((tenant, key)) => (
                    tenant,
                    key.map(Arc::new),
                    Decision::Deny(Reason::KeyUnknown),
                ),
            },
        };
        // A cost no limit in force could ever admit is a caller's mistake
        // (or a drain attempt), not a denial: refused, nothing consumed.
        let most = self
            .limits_for(&tenant, key.as_deref())
            .iter()
            .map(|s| s.burst.unwrap_or(s.limit).max(1))
            .min();
        if let Some(most) = most.filter(|m| cost > *m) {
            return Err(Error::invalid(
                "cost",
                &format!("is more than the tightest limit in force ({most})"),
            ));
        }
        let outcome = self
            .check_limits(&tenant, key.as_deref(), cost, dry_run)
            .await?;
        // For tenant/key subjects there is no principal: "allow" is just
        // "no limit denies", carried as the verdict's shadow-free decision.
        let allow = match allow {
            Decision::Allow(p) => Decision::Allow(p),
            Decision::Deny(_) => Decision::Allow(Principal {
                tenant_id: tenant.id.clone(),
                key_id: key.as_ref().map(|k| k.id),
                plan: tenant.plan.clone(),
                environment: key
                    .as_ref()
                    .map(|k| k.environment.clone())
                    .unwrap_or_default(),
                scopes: key.as_ref().map(|k| k.scopes.clone()).unwrap_or_default(),
                subject: key
                    .as_ref()
                    .map(|k| k.id.to_string())
                    .unwrap_or_else(|| tenant.id.to_string()),
                credential_type: CredentialType::ApiKey,
                subscription: tenant.status,
                labels: Vec::new(),
            }),
        };
        let verdict = self.verdict(allow, &tenant, outcome);
        if presented {
            let allowed = matches!(verdict.decision, Decision::Allow(_));
            self.count(key.as_deref(), allowed);
        }
        Ok(QuotaAnswer {
            plan: Some(tenant.plan.clone()),
            verdict,
        })
    }

    /// Quota usage (current and previous periods) of a tenant or a key.
    pub async fn usage(&self, tenant_id: &str, key_id: &str) -> Result<Vec<QuotaUsage>> {
        if tenant_id.is_empty() == key_id.is_empty() {
            return Err(Error::invalid(
                "tenant_id",
                "give exactly one of tenant_id, key_id",
            ));
        }
        let (tenant, key) = match self.subject(tenant_id, key_id).await? {
            Ok(found) => found,
            // Usage of a revoked key or an inactive tenant is still readable.
            Err(_) => self.subject_unchecked(tenant_id, key_id).await?,
        };
        let specs = self.limits_for(&tenant, key.as_ref());
        let now = self.clock.now();
        let mut out = Vec::new();
        let subject = subject_of(&tenant, key.as_ref());
        for spec in &specs {
            let Some((current, end)) = quota_counter(&subject, spec, now) else {
                continue;
            };
            let Some(prev_start) = previous_period_start(&subject, spec, now) else {
                continue;
            };
            let previous = QuotaCounter {
                period_start: prev_start,
                ..current.clone()
            };
            out.push(QuotaUsage {
                name: spec.name(),
                limit: spec.limit,
                period_start: current.period_start,
                period_end: end,
                // Consumed: what every replica reported (leased units not
                // yet spent are not usage) plus this replica's use since
                // its last report; other replicas' is at most one
                // heartbeat old.
                used: self.consumed(&current).await?,
                previous_start: prev_start,
                previous_used: self.consumed(&previous).await?,
            });
        }
        Ok(out)
    }

    /// Units of `counter` consumed, as far as this replica knows.
    async fn consumed(&self, counter: &QuotaCounter) -> Result<u64> {
        let reported = self.store.quota_consumed(counter).await?;
        let unreported = self.limiter.quotas().unreported(counter);
        Ok(reported.saturating_add_signed(unreported))
    }

    async fn subject_unchecked(
        &self,
        tenant_id: &str,
        key_id: &str,
    ) -> Result<(Arc<Tenant>, Option<KeyRecord>)> {
        let key = match KeyId::parse_str(key_id) {
            Ok(id) => {
                self.store
                    .get_key(crate::store::KeyRef { id, tenant: None })
                    .await?
            }
            Err(_) => None,
        };
        let tenant_id = match &key {
            Some(k) => k.tenant_id.clone(),
            None => TenantId::parse(tenant_id).ok_or(Error::NotFound("tenant"))?,
        };
        let tenant = self
            .find_tenant(&tenant_id)
            .await?
            .ok_or(Error::NotFound("tenant"))?;
        Ok((tenant, key))
    }
}

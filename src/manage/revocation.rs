//! Automatic revocation: a tenant's effective policy (the profile's
//! `[revocation]`, with the tenant's override), the dry run, the sweep
//! every replica runs, and leak reports (the GitHub endpoint and
//! `ReportLeakedKeys` both end here). No tonic, no SQL.

use sha2::{Digest, Sha256};

use super::revocation_events::RevocationEvent;
use super::{page_size, parse_tenant_id, Manager, Page};
use crate::domain::console::AuditContext;
use crate::domain::revocation::{
    LeakSource, PolicyMatch, PolicyOverride, PolicyReason, RevocationPolicy, MAX_POLICY_DAYS,
};
use crate::domain::{KeyId, TenantId, Violations};
use crate::error::{Error, Result};
use crate::store::Invalidation;

/// Tokens in one leak report, at most.
pub const MAX_LEAK_TOKENS: usize = 1000;
/// Longest token looked at; longer ones are not ours (false positive).
const MAX_TOKEN_LEN: usize = 1024;

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

/// One token of a leak report. The token never shows in `Debug`.
#[derive(Clone, Default)]
pub struct LeakedToken {
    pub token: String,
    /// The reporter's name for the kind of secret (echoed back).
    pub token_type: String,
    /// Where it was found.
    pub url: String,
    /// The kind of place (`commit`, `issue`, …).
    pub source: String,
}

impl std::fmt::Debug for LeakedToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeakedToken")
            .field("token_type", &self.token_type)
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

/// Whether a reported token is one of our keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeakLabel {
    TruePositive,
    FalsePositive,
}

impl LeakLabel {
    /// GitHub's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::TruePositive => "true_positive",
            Self::FalsePositive => "false_positive",
        }
    }
}

/// The answer about one reported token: nothing but its SHA-256, its type
/// as reported, and the label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeakVerdict {
    /// Lower-case hex SHA-256 of the token.
    pub token_hash: String,
    pub token_type: String,
    pub label: LeakLabel,
}

fn check_days(field: &str, d: Option<u32>, v: &mut Violations) {
    if d.is_some_and(|d| d > MAX_POLICY_DAYS) {
        v.add(
            field,
            format!("must be 0 (off) to {MAX_POLICY_DAYS} days, or unset"),
        );
    }
}

fn check_text(field: String, s: &str, max: usize, v: &mut Violations) {
    if s.chars().count() > max || s.chars().any(char::is_control) {
        v.add(field, format!("must be at most {max} printable characters"));
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
    /// change feed tells the others), counted, and logged as the event.
    fn announce_policy_revocation(&self, m: &PolicyMatch) {
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

    /// Handles a leak report: every token that is one of our keys is
    /// flagged (and revoked when its tenant's policy revokes leaked keys)
    /// and labelled `true_positive`; any other is `false_positive`. A
    /// token that is not one of our keys costs no query unless its digest
    /// is known or the unknown-key lookup budget allows one, as on the
    /// decision path. `reporter` names the scanner (`github`, …).
    pub async fn report_leaked_as(
        &self,
        ctx: &AuditContext,
        reporter: &str,
        tokens: Vec<LeakedToken>,
    ) -> Result<Vec<LeakVerdict>> {
        let mut v = Violations::default();
        if tokens.is_empty() || tokens.len() > MAX_LEAK_TOKENS {
            v.add("tokens", format!("must hold 1..={MAX_LEAK_TOKENS} tokens"));
        }
        for (i, t) in tokens.iter().enumerate() {
            if t.token.is_empty() {
                v.add(format!("tokens[{i}].token"), "must not be empty");
            }
            check_text(format!("tokens[{i}].type"), &t.token_type, 128, &mut v);
            check_text(format!("tokens[{i}].url"), &t.url, 2048, &mut v);
            check_text(format!("tokens[{i}].source"), &t.source, 128, &mut v);
        }
        v.into_result()?;
        let mut verdicts = Vec::with_capacity(tokens.len());
        for t in tokens {
            let token_hash = hex::encode(Sha256::digest(t.token.as_bytes()));
            let label = match self.find_leaked(&t.token).await? {
                None => LeakLabel::FalsePositive,
                Some(id) => {
                    let source = LeakSource {
                        reporter: reporter.to_string(),
                        url: t.url.clone(),
                        source: t.source.clone(),
                    };
                    self.act_on_leak(ctx, id, &source).await?;
                    LeakLabel::TruePositive
                }
            };
            metrics::counter!(crate::telemetry::LEAK_REPORTS,
                "reporter" => if reporter == "github" { "github" } else { "grpc" },
                "label" => label.as_str())
            .increment(1);
            verdicts.push(LeakVerdict {
                token_hash,
                token_type: t.token_type,
                label,
            });
        }
        Ok(verdicts)
    }

    /// The id of the key `token` is, if it is one of ours. Malformed tokens
    /// (prefix, length, alphabet, checksum) cost nothing.
    async fn find_leaked(&self, token: &str) -> Result<Option<KeyId>> {
        if token.len() > MAX_TOKEN_LEN || self.profile.key_format.parse(token).is_err() {
            return Ok(None);
        }
        for pepper in self.peppers.all() {
            let digest = pepper.digest(token);
            if let Some(c) = &self.caches {
                if let Some(hit) = c.key(&digest) {
                    return Ok(Some(hit.id));
                }
                if c.is_unknown(&digest) || !c.worth_looking_up(&digest, self.clock.monotonic_ns())
                {
                    continue;
                }
            }
            if let Some(record) = self.store.find_key_by_digest(&digest).await? {
                if record.digest.ct_eq(&digest) {
                    return Ok(Some(record.id));
                }
            }
        }
        Ok(None)
    }

    /// Flags key `id` as leaked, revoking it when its tenant's policy says.
    async fn act_on_leak(&self, ctx: &AuditContext, id: KeyId, source: &LeakSource) -> Result<()> {
        let key = self
            .store
            .get_key(crate::store::KeyRef { id, tenant: None })
            .await?
            .ok_or(Error::NotFound("key"))?;
        let revoke = self
            .revocation_policy(&key.tenant_id)
            .await?
            .effective
            .revoke_leaked;
        let outcome = self
            .store
            .report_leak(id, revoke, source, self.clock.now(), ctx)
            .await?;
        tracing::warn!(tenant_id = %outcome.key.tenant_id, key_id = %outcome.key.id,
            reporter = %source.reporter, revoked = outcome.revoked,
            first_report = outcome.first_report, "key reported leaked");
        if let Some(sink) = &self.revocation_events {
            sink.publish(RevocationEvent {
                id: uuid::Uuid::now_v7(),
                kind: "key.leak_reported",
                tenant_id: outcome.key.tenant_id.clone(),
                key_id: outcome.key.id,
                policy: None,
                revoked: Some(outcome.revoked),
                at: self.clock.now(),
            });
        }
        if outcome.revoked {
            self.announce_policy_revocation(&PolicyMatch {
                key: outcome.key,
                reason: PolicyReason::ReportedLeaked,
            });
        }
        Ok(())
    }
}

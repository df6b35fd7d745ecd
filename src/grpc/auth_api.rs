//! `tollgate.v1.AuthService`: thin handlers converting protos to the domain.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::caller::{request_id, CallerGuard};
use super::convert::{self, from_ts};
use super::pb::{self, auth_service_server::AuthService};
use crate::access::{Access, Rpc};
use crate::authz::{AuthInput, Authenticator, QuotaSubject};
use crate::domain::{Decision, Violations};
use crate::error::Error;
use crate::manage::{CreateKeyInput, ImportKeyInput, Manager, UpdateKeyInput};

/// The AuthService implementation.
pub struct AuthApi {
    pub authz: Arc<Authenticator>,
    pub manager: Arc<Manager>,
    /// Identifies callers and admits them per [`crate::access`].
    pub guard: CallerGuard,
    pub access: Arc<Access>,
}

#[tonic::async_trait]
impl AuthService for AuthApi {
    #[tracing::instrument(skip_all, fields(surface))]
    async fn authenticate(
        &self,
        request: Request<pb::AuthenticateRequest>,
    ) -> Result<Response<pb::AuthenticateResponse>, Status> {
        self.guard
            .admit(Rpc::Authenticate, request.metadata(), true)
            .await?;
        let r = request.into_inner();
        tracing::Span::current().record("surface", r.surface.as_str());
        let input = AuthInput {
            api_key: &r.api_key,
            token: &r.token,
            headers: Some(&r.headers),
            surface: &r.surface,
            required_scopes: &r.required_scopes,
            subscription: convert::subscription_gate(&r.subscription)?,
        };
        let verdict = self.authz.decide(input, r.cost.unwrap_or(0)).await?;
        let limits = verdict.limits.iter().map(convert::limit).collect();
        let shadow_denial_reason = verdict
            .shadow_denial
            .map(|r| r.as_str().to_string())
            .unwrap_or_default();
        let response = match verdict.decision {
            Decision::Allow(p) => pb::AuthenticateResponse {
                allowed: true,
                principal: Some(convert::principal(&p)),
                denial: None,
                limits,
                shadow_denial_reason,
            },
            Decision::Deny(reason) => {
                tracing::debug!(reason = reason.as_str(), "denied");
                let denial = convert::denial_on(
                    self.authz.profile(),
                    &r.surface,
                    reason,
                    verdict.retry_after_seconds,
                );
                pb::AuthenticateResponse {
                    allowed: false,
                    principal: None,
                    denial: Some(denial),
                    limits,
                    shadow_denial_reason,
                }
            }
        };
        Ok(Response::new(response))
    }

    async fn check_quota(
        &self,
        request: Request<pb::CheckQuotaRequest>,
    ) -> Result<Response<pb::CheckQuotaResponse>, Status> {
        let by_credential = {
            let r = request.get_ref();
            r.tenant_id.is_empty() && r.key_id.is_empty() && !r.api_key.is_empty()
        };
        let caller = self
            .guard
            .admit(Rpc::CheckQuota, request.metadata(), by_credential)
            .await?;
        let r = request.into_inner();
        // By id the caller must reach the subject: a console user only its
        // own tenant's (another's is NOT_FOUND, like a missing one).
        let tenant_scope;
        let subject = match (
            r.tenant_id.is_empty(),
            r.key_id.is_empty(),
            r.api_key.is_empty(),
        ) {
            (false, true, true) => {
                tenant_scope = self
                    .access
                    .tenant(Rpc::CheckQuota, &caller, &r.tenant_id)
                    .await?;
                QuotaSubject::Tenant(&tenant_scope)
            }
            (true, false, true) => {
                self.access
                    .key(Rpc::CheckQuota, &caller, &r.key_id, "")
                    .await?;
                QuotaSubject::Key(&r.key_id)
            }
            (true, true, false) => QuotaSubject::Credential(&r.api_key),
            _ => {
                return Err(Error::invalid(
                    "tenant_id",
                    "give exactly one of tenant_id, key_id, api_key",
                )
                .into())
            }
        };
        let answer = self.authz.check_quota(subject, r.cost, r.dry_run).await?;
        let v = answer.verdict;
        let denial = match v.decision {
            Decision::Allow(_) => None,
            Decision::Deny(reason) => Some(convert::denial(
                self.authz.profile(),
                reason,
                v.retry_after_seconds,
            )),
        };
        Ok(Response::new(pb::CheckQuotaResponse {
            allowed: denial.is_none(),
            limits: v.limits.iter().map(convert::limit).collect(),
            retry_after_seconds: v.retry_after_seconds,
            denial,
            plan: answer.plan.unwrap_or_default(),
        }))
    }

    async fn get_usage(
        &self,
        request: Request<pb::GetUsageRequest>,
    ) -> Result<Response<pb::GetUsageResponse>, Status> {
        let caller = self
            .guard
            .admit(Rpc::GetUsage, request.metadata(), false)
            .await?;
        let r = request.into_inner();
        let tenant_id = if r.key_id.is_empty() {
            self.access
                .tenant(Rpc::GetUsage, &caller, &r.tenant_id)
                .await?
        } else {
            self.access
                .key(Rpc::GetUsage, &caller, &r.key_id, &r.tenant_id)
                .await?;
            r.tenant_id
        };
        let requests = self.authz.request_series(&r.key_id, r.days).await?;
        let quotas = self.authz.usage(&tenant_id, &r.key_id).await?;
        let totals = |list: &[crate::domain::usage::RequestTotal]| -> Vec<pb::RequestCount> {
            list.iter()
                .map(|t| pb::RequestCount {
                    start: Some(convert::ts(t.start)),
                    allowed: t.allowed,
                    denied: t.denied,
                })
                .collect()
        };
        Ok(Response::new(pb::GetUsageResponse {
            daily_requests: totals(&requests.daily),
            hourly_requests: totals(&requests.hourly),
            quotas: quotas
                .iter()
                .map(|q| pb::QuotaUsage {
                    name: q.name.to_string(),
                    limit: q.limit,
                    period_start: Some(convert::ts(q.period_start)),
                    period_end: Some(convert::ts(q.period_end)),
                    used: q.used,
                    previous_used: q.previous_used,
                    previous_period_start: Some(convert::ts(q.previous_start)),
                })
                .collect(),
        }))
    }

    async fn create_key(
        &self,
        request: Request<pb::CreateKeyRequest>,
    ) -> Result<Response<pb::CreateKeyResponse>, Status> {
        let caller = self
            .guard
            .admit(Rpc::CreateKey, request.metadata(), false)
            .await?;
        let ctx = caller.audit(&request_id(request.metadata()));
        let r = request.into_inner();
        let tenant_id = self
            .access
            .tenant(Rpc::CreateKey, &caller, &r.tenant_id)
            .await?;
        let mut v = Violations::default();
        let limits = convert::limit_specs_from("limits", r.limits, &mut v);
        v.into_result().map_err(Error::from)?;
        let issued = self
            .manager
            .create_key_as(
                &ctx,
                CreateKeyInput {
                    tenant_id,
                    name: r.name,
                    environment: r.environment,
                    scopes: r.scopes,
                    ttl_seconds: r.ttl_seconds,
                    limits,
                    labels: r.labels,
                },
            )
            .await?;
        Ok(Response::new(pb::CreateKeyResponse {
            key: Some(convert::api_key(&issued.record)),
            api_key: issued.secret.into_exposed(),
        }))
    }

    async fn revoke_key(
        &self,
        request: Request<pb::RevokeKeyRequest>,
    ) -> Result<Response<pb::RevokeKeyResponse>, Status> {
        let caller = self
            .guard
            .admit(Rpc::RevokeKey, request.metadata(), false)
            .await?;
        let ctx = caller.audit(&request_id(request.metadata()));
        let r = request.into_inner();
        let tenant_id = self
            .access
            .key(Rpc::RevokeKey, &caller, &r.key_id, &r.tenant_id)
            .await?;
        let key = self
            .manager
            .revoke_key_as(&ctx, &r.key_id, &tenant_id, &r.reason)
            .await?;
        Ok(Response::new(pb::RevokeKeyResponse {
            key: Some(convert::api_key(&key)),
        }))
    }

    async fn get_key(
        &self,
        request: Request<pb::GetKeyRequest>,
    ) -> Result<Response<pb::GetKeyResponse>, Status> {
        let caller = self
            .guard
            .admit(Rpc::GetKey, request.metadata(), false)
            .await?;
        let r = request.into_inner();
        let tenant_id = self
            .access
            .key(Rpc::GetKey, &caller, &r.key_id, &r.tenant_id)
            .await?;
        let key = self.manager.get_key(&r.key_id, &tenant_id).await?;
        Ok(Response::new(pb::GetKeyResponse {
            key: Some(convert::api_key(&key)),
        }))
    }

    async fn list_keys(
        &self,
        request: Request<pb::ListKeysRequest>,
    ) -> Result<Response<pb::ListKeysResponse>, Status> {
        let caller = self
            .guard
            .admit(Rpc::ListKeys, request.metadata(), false)
            .await?;
        let r = request.into_inner();
        let tenant_id = self
            .access
            .tenant(Rpc::ListKeys, &caller, &r.tenant_id)
            .await?;
        let page = self
            .manager
            .list_keys_labelled(
                &tenant_id,
                r.page_size,
                &r.page_token,
                r.include_revoked,
                r.label_selector,
            )
            .await?;
        Ok(Response::new(pb::ListKeysResponse {
            keys: page.items.iter().map(convert::api_key).collect(),
            next_page_token: page.next_page_token,
        }))
    }

    async fn rotate_key(
        &self,
        request: Request<pb::RotateKeyRequest>,
    ) -> Result<Response<pb::RotateKeyResponse>, Status> {
        let caller = self
            .guard
            .admit(Rpc::RotateKey, request.metadata(), false)
            .await?;
        let ctx = caller.audit(&request_id(request.metadata()));
        let r = request.into_inner();
        let tenant_id = self
            .access
            .key(Rpc::RotateKey, &caller, &r.key_id, &r.tenant_id)
            .await?;
        let (issued, previous) = self
            .manager
            .rotate_key_as(&ctx, &r.key_id, &tenant_id, r.grace_seconds)
            .await?;
        Ok(Response::new(pb::RotateKeyResponse {
            key: Some(convert::api_key(&issued.record)),
            previous_key: Some(convert::api_key(&previous)),
            api_key: issued.secret.into_exposed(),
        }))
    }

    async fn update_key(
        &self,
        request: Request<pb::UpdateKeyRequest>,
    ) -> Result<Response<pb::UpdateKeyResponse>, Status> {
        let caller = self
            .guard
            .admit(Rpc::UpdateKey, request.metadata(), false)
            .await?;
        let ctx = caller.audit(&request_id(request.metadata()));
        let r = request.into_inner();
        let tenant_id = self
            .access
            .key(Rpc::UpdateKey, &caller, &r.key_id, &r.tenant_id)
            .await?;
        let mut v = Violations::default();
        let limits = convert::limit_specs_from("limits", r.limits, &mut v);
        v.into_result().map_err(Error::from)?;
        let expires_at = match &r.expires_at {
            Some(t) => {
                Some(from_ts(t).ok_or_else(|| Error::invalid("expires_at", "is out of range"))?)
            }
            None => None,
        };
        let key = self
            .manager
            .update_key_as(
                &ctx,
                UpdateKeyInput {
                    key_id: r.key_id,
                    tenant_id,
                    update_mask: r.update_mask,
                    name: r.name,
                    scopes: r.scopes,
                    expires_at,
                    limits,
                    labels: r.labels,
                },
            )
            .await?;
        Ok(Response::new(pb::UpdateKeyResponse {
            key: Some(convert::api_key(&key)),
        }))
    }

    async fn import_keys(
        &self,
        request: Request<pb::ImportKeysRequest>,
    ) -> Result<Response<pb::ImportKeysResponse>, Status> {
        let caller = self
            .guard
            .admit(Rpc::ImportKeys, request.metadata(), false)
            .await?;
        let ctx = caller.audit(&request_id(request.metadata()));
        let r = request.into_inner();
        let tenant_id = self
            .access
            .tenant(Rpc::ImportKeys, &caller, &r.tenant_id)
            .await?;
        let keys = r
            .keys
            .into_iter()
            .map(|k| ImportKeyInput {
                api_key: k.api_key,
                sha256_hex: k.sha256_hex,
                name: k.name,
                environment: k.environment,
                scopes: k.scopes,
                ttl_seconds: k.ttl_seconds,
                labels: k.labels,
            })
            .collect();
        let records = self.manager.import_keys_as(&ctx, &tenant_id, keys).await?;
        Ok(Response::new(pb::ImportKeysResponse {
            keys: records.iter().map(convert::api_key).collect(),
        }))
    }
}

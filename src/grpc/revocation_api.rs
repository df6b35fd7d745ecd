//! `tollgate.v1.RevocationService`: thin handlers for the dry run, tenant
//! policy overrides and leak reports (`manage/revocation.rs` holds the rules).

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::caller::{request_id, CallerGuard};
use super::convert;
use super::pb::{self, revocation_service_server::RevocationService};
use crate::access::{Access, Rpc};
use crate::domain::revocation::{PolicyOverride, RevocationPolicy};
use crate::domain::Violations;
use crate::error::Error;
use crate::manage::revocation::{LeakedToken, PolicyView};
use crate::manage::Manager;

/// The RevocationService implementation.
pub struct RevocationApi {
    pub manager: Arc<Manager>,
    /// Identifies callers and admits them per [`crate::access`].
    pub guard: CallerGuard,
    pub access: Arc<Access>,
}

fn policy(p: &RevocationPolicy) -> pb::RevocationPolicy {
    pb::RevocationPolicy {
        unused_days: p.unused_days,
        max_age_days: p.max_age_days,
        revoke_leaked: Some(p.revoke_leaked),
    }
}

fn policy_override(p: &PolicyOverride) -> pb::RevocationPolicy {
    pb::RevocationPolicy {
        unused_days: p.unused_days,
        max_age_days: p.max_age_days,
        revoke_leaked: p.revoke_leaked,
    }
}

fn view(v: &PolicyView) -> (Option<pb::RevocationPolicy>, Option<pb::RevocationPolicy>) {
    (
        Some(policy(&v.effective)),
        v.tenant_override.as_ref().map(policy_override),
    )
}

/// `1-64` characters of `[a-z0-9_.-]`.
fn check_reporter(s: &str, v: &mut Violations) {
    let ok = (1..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_.-".contains(&b));
    if !ok {
        v.add("reporter", "must be 1-64 characters of [a-z0-9_.-]");
    }
}

#[tonic::async_trait]
impl RevocationService for RevocationApi {
    async fn list_policy_revocations(
        &self,
        request: Request<pb::ListPolicyRevocationsRequest>,
    ) -> Result<Response<pb::ListPolicyRevocationsResponse>, Status> {
        let caller = self
            .guard
            .admit(Rpc::ListPolicyRevocations, request.metadata(), false)
            .await?;
        let r = request.into_inner();
        let tenant_id = self
            .access
            .tenant(Rpc::ListPolicyRevocations, &caller, &r.tenant_id)
            .await?;
        let (v, page) = self
            .manager
            .list_policy_revocations(&tenant_id, r.page_size, &r.page_token)
            .await?;
        let (effective, tenant_override) = view(&v);
        Ok(Response::new(pb::ListPolicyRevocationsResponse {
            effective,
            tenant_override,
            keys: page
                .items
                .iter()
                .map(|m| pb::PolicyRevocation {
                    key: Some(convert::api_key(&m.key)),
                    policy: m.reason.as_str().to_string(),
                })
                .collect(),
            next_page_token: page.next_page_token,
        }))
    }

    async fn set_revocation_policy(
        &self,
        request: Request<pb::SetRevocationPolicyRequest>,
    ) -> Result<Response<pb::SetRevocationPolicyResponse>, Status> {
        let caller = self
            .guard
            .admit(Rpc::SetRevocationPolicy, request.metadata(), false)
            .await?;
        let ctx = caller.audit(&request_id(request.metadata()));
        let r = request.into_inner();
        let o = r.policy.map(|p| PolicyOverride {
            unused_days: p.unused_days,
            max_age_days: p.max_age_days,
            revoke_leaked: p.revoke_leaked,
        });
        let v = self
            .manager
            .set_revocation_policy_as(&ctx, &r.tenant_id, o)
            .await?;
        let (effective, tenant_override) = view(&v);
        Ok(Response::new(pb::SetRevocationPolicyResponse {
            effective,
            tenant_override,
        }))
    }

    async fn report_leaked_keys(
        &self,
        request: Request<pb::ReportLeakedKeysRequest>,
    ) -> Result<Response<pb::ReportLeakedKeysResponse>, Status> {
        let caller = self
            .guard
            .admit(Rpc::ReportLeakedKeys, request.metadata(), false)
            .await?;
        let ctx = caller.audit(&request_id(request.metadata()));
        let r = request.into_inner();
        let mut v = Violations::default();
        check_reporter(&r.reporter, &mut v);
        v.into_result().map_err(Error::from)?;
        let tokens = r
            .tokens
            .into_iter()
            .map(|t| LeakedToken {
                token: t.token,
                token_type: t.r#type,
                url: t.url,
                source: t.source,
            })
            .collect();
        let verdicts = self
            .manager
            .report_leaked_as(&ctx, &r.reporter, tokens)
            .await?;
        Ok(Response::new(pb::ReportLeakedKeysResponse {
            results: verdicts
                .into_iter()
                .map(|v| pb::LeakVerdict {
                    token_hash: v.token_hash,
                    token_type: v.token_type,
                    label: v.label.as_str().to_string(),
                })
                .collect(),
        }))
    }
}

//! `tollgate.v1.TenantService`: thin handlers.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::caller::{request_id, CallerGuard};
use super::convert;
use super::pb::{self, tenant_service_server::TenantService};
use crate::access::{Access, Rpc};
use crate::domain::Violations;
use crate::error::Error;
use crate::manage::{CreateTenantInput, Manager, UpdateTenantInput};

/// The TenantService implementation.
pub struct TenantApi {
    pub manager: Arc<Manager>,
    /// Identifies callers and admits them per [`crate::access`].
    pub guard: CallerGuard,
    pub access: Arc<Access>,
}

#[tonic::async_trait]
impl TenantService for TenantApi {
    async fn create_tenant(
        &self,
        request: Request<pb::CreateTenantRequest>,
    ) -> Result<Response<pb::CreateTenantResponse>, Status> {
        let caller = self
            .guard
            .admit(Rpc::CreateTenant, request.metadata(), false)
            .await?;
        let ctx = caller.audit(&request_id(request.metadata()));
        let r = request.into_inner();
        let mut v = Violations::default();
        let overrides = r
            .overrides
            .map(|o| convert::overrides_from("overrides", o, &mut v));
        v.into_result().map_err(Error::from)?;
        let tenant = self
            .manager
            .create_tenant_as(
                &ctx,
                CreateTenantInput {
                    tenant_id: r.tenant_id,
                    name: r.name,
                    plan: r.plan,
                    subscription_status: r.subscription_status,
                    overrides,
                },
            )
            .await?;
        Ok(Response::new(pb::CreateTenantResponse {
            tenant: Some(convert::tenant(&tenant)),
        }))
    }

    async fn get_tenant(
        &self,
        request: Request<pb::GetTenantRequest>,
    ) -> Result<Response<pb::GetTenantResponse>, Status> {
        let caller = self
            .guard
            .admit(Rpc::GetTenant, request.metadata(), false)
            .await?;
        let tenant_id = self
            .access
            .tenant(Rpc::GetTenant, &caller, &request.get_ref().tenant_id)
            .await?;
        let tenant = self.manager.get_tenant(&tenant_id).await?;
        Ok(Response::new(pb::GetTenantResponse {
            tenant: Some(convert::tenant(&tenant)),
        }))
    }

    async fn update_tenant(
        &self,
        request: Request<pb::UpdateTenantRequest>,
    ) -> Result<Response<pb::UpdateTenantResponse>, Status> {
        let caller = self
            .guard
            .admit(Rpc::UpdateTenant, request.metadata(), false)
            .await?;
        let ctx = caller.audit(&request_id(request.metadata()));
        let r = request.into_inner();
        let tenant_id = self
            .access
            .tenant(Rpc::UpdateTenant, &caller, &r.tenant_id)
            .await?;
        // Plan, subscription and overrides are billing's: console users may
        // only rename their tenant.
        if caller.is_console_user() && r.update_mask.iter().any(|m| m != "name") {
            return Err(Error::PermissionDenied(
                "console users may change only the tenant's name".into(),
            )
            .into());
        }
        let mut v = Violations::default();
        let overrides = r
            .overrides
            .map(|o| convert::overrides_from("overrides", o, &mut v));
        v.into_result().map_err(Error::from)?;
        let tenant = self
            .manager
            .update_tenant_as(
                &ctx,
                UpdateTenantInput {
                    tenant_id,
                    update_mask: r.update_mask,
                    name: r.name,
                    plan: r.plan,
                    subscription_status: r.subscription_status,
                    overrides,
                },
            )
            .await?;
        Ok(Response::new(pb::UpdateTenantResponse {
            tenant: Some(convert::tenant(&tenant)),
        }))
    }

    async fn list_tenants(
        &self,
        request: Request<pb::ListTenantsRequest>,
    ) -> Result<Response<pb::ListTenantsResponse>, Status> {
        self.guard
            .admit(Rpc::ListTenants, request.metadata(), false)
            .await?;
        let r = request.into_inner();
        let page = self
            .manager
            .list_tenants(r.page_size, &r.page_token)
            .await?;
        Ok(Response::new(pb::ListTenantsResponse {
            tenants: page.items.iter().map(convert::tenant).collect(),
            next_page_token: page.next_page_token,
        }))
    }
}

//! Tenant management: create, read, update and list tenants (plan,
//! subscription status, overrides; moving the billing day carries the
//! month's usage).

use chrono::{DateTime, Utc};

use super::{check_mask, not_found, page_size, parse_tenant_id, Manager, Page};
use crate::domain::console::AuditContext;
use crate::domain::validate::{check_name, check_scopes};
use crate::domain::{
    SubscriptionStatus, Tenant, TenantId, TenantOverrides, TenantUpdate, UsageCarry, Violations,
};
use crate::error::{Error, Result};
use crate::store::{Invalidation, StoreError};

/// A CreateTenant request, as received.
#[derive(Debug, Clone, Default)]
pub struct CreateTenantInput {
    pub tenant_id: String,
    pub name: String,
    pub plan: String,
    pub subscription_status: String,
    pub overrides: Option<TenantOverrides>,
}

/// An UpdateTenant request, as received.
#[derive(Debug, Clone, Default)]
pub struct UpdateTenantInput {
    pub tenant_id: String,
    pub update_mask: Vec<String>,
    pub name: String,
    pub plan: String,
    pub subscription_status: String,
    pub overrides: Option<TenantOverrides>,
}

impl Manager {
    fn check_overrides(&self, o: &TenantOverrides, v: &mut Violations) {
        if o.max_keys.is_some_and(|m| m > 1_000_000) {
            v.add("overrides.max_keys", "must be at most 1000000");
        }
        if let Some(scopes) = &o.allowed_scopes {
            check_scopes("overrides.allowed_scopes", scopes, v);
        }
        if o.billing_day.is_some_and(|d| !(1..=31).contains(&d)) {
            v.add("overrides.billing_day", "must be 1..=31");
        }
        for (i, l) in o.limits.iter().flatten().enumerate() {
            self.check_limit(&format!("overrides.limits[{i}]"), l, v);
        }
    }

    fn check_plan(&self, plan: &str, v: &mut Violations) {
        if self.profile.plan(plan).is_none() {
            let names: Vec<&str> = self.profile.plans.keys().map(String::as_str).collect();
            v.add("plan", format!("must be one of: {}", names.join(", ")));
        }
    }

    fn parse_status(s: &str, v: &mut Violations) -> Option<SubscriptionStatus> {
        let status = SubscriptionStatus::parse(s);
        if status.is_none() {
            let names: Vec<&str> = SubscriptionStatus::ALL.iter().map(|s| s.as_str()).collect();
            v.add(
                "subscription_status",
                format!("must be one of: {}", names.join(", ")),
            );
        }
        status
    }

    /// Creates a tenant.
    pub async fn create_tenant(&self, input: CreateTenantInput) -> Result<Tenant> {
        self.create_tenant_as(&AuditContext::system(), input).await
    }

    /// Creates a tenant, audited as `ctx`.
    pub async fn create_tenant_as(
        &self,
        ctx: &AuditContext,
        input: CreateTenantInput,
    ) -> Result<Tenant> {
        let mut v = Violations::default();
        let id = if input.tenant_id.is_empty() {
            Some(TenantId::generate())
        } else {
            parse_tenant_id("tenant_id", &input.tenant_id, &mut v)
        };
        check_name("name", &input.name, &mut v);
        let plan = if input.plan.is_empty() {
            self.profile.default_plan.clone()
        } else {
            input.plan
        };
        self.check_plan(&plan, &mut v);
        let status = if input.subscription_status.is_empty() {
            Some(SubscriptionStatus::Active)
        } else {
            Self::parse_status(&input.subscription_status, &mut v)
        };
        let overrides = input.overrides.unwrap_or_default();
        self.check_overrides(&overrides, &mut v);
        v.into_result()?;
        let now = self.clock.now();
        let tenant = Tenant {
            id: id.expect("validated"),
            name: input.name,
            plan,
            status: status.expect("validated"),
            overrides,
            created_at: now,
            updated_at: now,
        };
        let tenant = self
            .store
            .create_tenant(tenant, ctx)
            .await
            .map_err(|e| match e {
                StoreError::AlreadyExists => Error::AlreadyExists("tenant"),
                e => e.into(),
            })?;
        tracing::info!(tenant_id = %tenant.id, plan = %tenant.plan, "tenant created");
        Ok(tenant)
    }

    /// Reads a tenant.
    pub async fn get_tenant(&self, tenant_id: &str) -> Result<Tenant> {
        let mut v = Violations::default();
        let id = parse_tenant_id("tenant_id", tenant_id, &mut v);
        v.into_result()?;
        self.tenant(&id.expect("validated")).await
    }

    /// Changes plan, status, name or overrides; effective on every replica at once.
    pub async fn update_tenant(&self, input: UpdateTenantInput) -> Result<Tenant> {
        self.update_tenant_as(&AuditContext::system(), input).await
    }

    /// Changes a tenant, audited as `ctx`.
    pub async fn update_tenant_as(
        &self,
        ctx: &AuditContext,
        input: UpdateTenantInput,
    ) -> Result<Tenant> {
        let mut v = Violations::default();
        let id = parse_tenant_id("tenant_id", &input.tenant_id, &mut v);
        check_mask(
            &input.update_mask,
            &["name", "plan", "subscription_status", "overrides"],
            &mut v,
        );
        let has = |p: &str| input.update_mask.iter().any(|m| m == p);
        if has("name") {
            check_name("name", &input.name, &mut v);
        }
        if has("plan") {
            self.check_plan(&input.plan, &mut v);
        }
        let status = if has("subscription_status") {
            Self::parse_status(&input.subscription_status, &mut v)
        } else {
            None
        };
        let overrides = has("overrides").then(|| input.overrides.clone().unwrap_or_default());
        if let Some(o) = &overrides {
            self.check_overrides(o, &mut v);
        }
        v.into_result()?;
        let id = id.expect("validated");
        let now = self.clock.now();
        let carry_month_usage = match &overrides {
            Some(o) => {
                let before = self.tenant(&id).await?.overrides.billing_day;
                month_carry(before, o.billing_day, now)
            }
            None => None,
        };
        let update = TenantUpdate {
            name: has("name").then(|| input.name.clone()),
            plan: has("plan").then(|| input.plan.clone()),
            status,
            overrides,
            carry_month_usage,
        };
        let tenant = self
            .store
            .update_tenant(&id, &update, now, ctx)
            .await
            .map_err(not_found("tenant"))?;
        tracing::info!(tenant_id = %tenant.id, plan = %tenant.plan,
            status = tenant.status.as_str(), "tenant updated");
        self.changed(Invalidation::Tenant(tenant.id.clone()));
        Ok(tenant)
    }

    /// A page of tenants, ordered by id.
    pub async fn list_tenants(&self, page_size_req: u32, page_token: &str) -> Result<Page<Tenant>> {
        let mut v = Violations::default();
        let size = page_size(page_size_req, &mut v);
        let after = if page_token.is_empty() {
            None
        } else {
            parse_tenant_id("page_token", page_token, &mut v)
        };
        v.into_result()?;
        let mut items = self.store.list_tenants(after.as_ref(), size + 1).await?;
        let next_page_token = if items.len() > size as usize {
            items.truncate(size as usize);
            items.last().map(|t| t.id.to_string()).unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Page {
            items,
            next_page_token,
        })
    }
}

/// When the billing day moves from `before` to `after`, the current month
/// under each starts at a different moment: its usage is carried over, so
/// moving the billing day never resets a quota mid-period.
fn month_carry(before: Option<u32>, after: Option<u32>, now: DateTime<Utc>) -> Option<UsageCarry> {
    use crate::limits::period::{bounds, QuotaPeriod};
    let start = |anchor_day| bounds(QuotaPeriod::Month { anchor_day }, now).0;
    let (from, to) = (start(before), start(after));
    (from != to).then_some(UsageCarry { from, to })
}

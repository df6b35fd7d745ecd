//! The JWT branch of the decision pipeline (dashboard surface): verify the
//! token, then take plan and subscription from Tollgate's own tenant
//! record, never from the token.

use super::{Authenticator, Identified};
use crate::crypto::jwt::TokenError;
use crate::domain::{CredentialType, Principal, Reason, TenantId};
use crate::error::Result;
use crate::profile::{SubscriptionGate, Surface};

impl Authenticator {
    pub(super) async fn decide_jwt(
        &self,
        token: &str,
        surface: &Surface,
        required_scopes: &[String],
        gate: SubscriptionGate,
    ) -> Result<Result<Identified, Reason>> {
        let deny = |r| Ok(Err(r));
        let verified = match self.jwt.verify(token, self.clock.now()) {
            Ok(v) => v,
            Err(TokenError::Expired) => return deny(Reason::TokenExpired),
            Err(TokenError::Invalid(why)) => {
                tracing::debug!(why, "JWT refused");
                return deny(Reason::TokenInvalid);
            }
        };
        // The surface says which issuers and audiences it accepts: a token
        // minted for another product's console is not good here.
        if !surface.accepts_jwt(&verified.issuer, verified.claims.get("aud")) {
            tracing::debug!(issuer = %verified.issuer, "JWT from an issuer or for an audience this surface does not accept");
            return deny(Reason::TokenInvalid);
        }
        let Some(tenant_id) = TenantId::parse(&verified.tenant_id) else {
            tracing::debug!("JWT tenant claim is not a tenant id");
            return deny(Reason::TokenInvalid);
        };
        let span = tracing::Span::current();
        span.record("tenant_id", tenant_id.as_str());
        let Some(tenant) = self.find_tenant(&tenant_id).await? else {
            tracing::debug!(tenant_id = %tenant_id, "JWT names an unknown tenant");
            return deny(Reason::TokenInvalid);
        };
        if gate == SubscriptionGate::Required && !self.profile.is_active(tenant.status) {
            return deny(Reason::SubscriptionInactive);
        }
        if self.profile.plan(&tenant.plan).is_none() {
            tracing::warn!(plan = %tenant.plan, "tenant's plan is not in the profile; refusing");
            return deny(Reason::SubscriptionInactive);
        }
        if !required_scopes.iter().all(|s| verified.scopes.contains(s)) {
            return deny(Reason::ScopeMissing);
        }
        let principal = Principal {
            tenant_id,
            key_id: None,
            plan: tenant.plan.clone(),
            environment: String::new(),
            scopes: verified.scopes,
            subject: verified.subject,
            credential_type: CredentialType::Jwt,
            subscription: tenant.status,
            labels: Vec::new(),
        };
        Ok(Ok(Identified {
            principal,
            record: None,
            tenant,
        }))
    }
}

//! `tollgate.v1.ConsoleService`: thin handlers over [`crate::console`].

use std::sync::Arc;

use secrecy::SecretString;
use tonic::{Request, Response, Status};

use super::caller::{peer, request_id, CallerGuard};
use super::convert::ts;
use super::pb::{self, console_service_server::ConsoleService};
use crate::access::Rpc;
use crate::console::{audit_page, Console, CreateUserInput, Session, SignUpInput};
use crate::domain::console::{AuditEvent, ConsoleUser, Role};
use crate::domain::TenantId;
use crate::error::Error;
use crate::store::ConsoleStore;

/// The ConsoleService implementation.
pub struct ConsoleApi {
    /// `None` without signing keys: accounts cannot log in.
    pub console: Option<Arc<Console>>,
    /// `None` without a console store (only the audit log needs it alone).
    pub store: Option<Arc<dyn ConsoleStore>>,
    pub guard: CallerGuard,
}

impl ConsoleApi {
    fn console(&self) -> Result<&Console, Status> {
        self.console.as_deref().ok_or_else(|| {
            Status::failed_precondition("the console is not configured (jwt.console.signing_keys)")
        })
    }
}

fn user(u: &ConsoleUser) -> pb::ConsoleUser {
    pb::ConsoleUser {
        user_id: u.id.to_string(),
        tenant_id: u.tenant_id.to_string(),
        email: u.email.as_str().to_string(),
        role: u.role.as_str().to_string(),
        email_verified: u.email_verified_at.is_some(),
        created_at: Some(ts(u.created_at)),
    }
}

fn session(s: Session) -> pb::LoginResponse {
    pb::LoginResponse {
        user: Some(user(&s.user)),
        access_token: s.access_token,
        expires_in_seconds: s.expires_in_seconds,
        refresh_token: s.refresh_token,
        refresh_expires_in_seconds: s.refresh_expires_in_seconds,
    }
}

fn audit_event(e: &AuditEvent) -> pb::AuditEvent {
    pb::AuditEvent {
        event_id: e.id.to_string(),
        at: Some(ts(e.at)),
        tenant_id: e.tenant_id.to_string(),
        actor: e.actor.clone(),
        action: e.action.clone(),
        target: e.target.clone(),
        request_id: e.request_id.clone(),
        details: e.details.to_string(),
    }
}

#[tonic::async_trait]
impl ConsoleService for ConsoleApi {
    #[tracing::instrument(skip_all)]
    async fn sign_up(
        &self,
        request: Request<pb::SignUpRequest>,
    ) -> Result<Response<pb::SignUpResponse>, Status> {
        let rid = request_id(request.metadata());
        let r = request.into_inner();
        let created = self
            .console()?
            .sign_up(
                SignUpInput {
                    email: r.email,
                    password: SecretString::from(r.password),
                    tenant_name: r.tenant_name,
                    tenant_id: r.tenant_id,
                },
                &rid,
            )
            .await?;
        Ok(Response::new(pb::SignUpResponse {
            user: Some(user(&created.user)),
            plan: created.tenant.map(|t| t.plan).unwrap_or_default(),
            email_verification_token: created.verification.into_exposed(),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn login(
        &self,
        request: Request<pb::LoginRequest>,
    ) -> Result<Response<pb::LoginResponse>, Status> {
        let peer = peer(&request);
        // Only the console backend (its own narrow token) may name the end
        // user's address; anyone else could dodge the per-address throttle
        // by sending a new one each time.
        let trusted = matches!(
            self.guard.admit(Rpc::Login, request.metadata(), false),
            Ok(crate::access::Caller::ConsoleBackend)
        );
        let r = request.into_inner();
        if r.client_address.len() > 64 {
            return Err(Error::invalid("client_address", "must be at most 64 characters").into());
        }
        let address = if trusted && !r.client_address.is_empty() {
            r.client_address
        } else {
            peer
        };
        let s = self
            .console()?
            .login(&r.email, SecretString::from(r.password), &address)
            .await?;
        Ok(Response::new(session(s)))
    }

    #[tracing::instrument(skip_all)]
    async fn refresh(
        &self,
        request: Request<pb::RefreshRequest>,
    ) -> Result<Response<pb::LoginResponse>, Status> {
        let s = self
            .console()?
            .refresh(&request.get_ref().refresh_token)
            .await?;
        Ok(Response::new(session(s)))
    }

    #[tracing::instrument(skip_all)]
    async fn logout(
        &self,
        request: Request<pb::LogoutRequest>,
    ) -> Result<Response<pb::LogoutResponse>, Status> {
        self.console()?
            .logout(&request.get_ref().refresh_token)
            .await?;
        Ok(Response::new(pb::LogoutResponse {}))
    }

    #[tracing::instrument(skip_all)]
    async fn request_email_verification(
        &self,
        request: Request<pb::RequestEmailVerificationRequest>,
    ) -> Result<Response<pb::RequestEmailVerificationResponse>, Status> {
        let token = self
            .console()?
            .request_email_verification(&request.get_ref().email)
            .await?;
        Ok(Response::new(pb::RequestEmailVerificationResponse {
            email_verification_token: token.map(|t| t.into_exposed()).unwrap_or_default(),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn verify_email(
        &self,
        request: Request<pb::VerifyEmailRequest>,
    ) -> Result<Response<pb::VerifyEmailResponse>, Status> {
        let u = self
            .console()?
            .verify_email(&request.get_ref().token)
            .await?;
        Ok(Response::new(pb::VerifyEmailResponse {
            user: Some(user(&u)),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn request_password_reset(
        &self,
        request: Request<pb::RequestPasswordResetRequest>,
    ) -> Result<Response<pb::RequestPasswordResetResponse>, Status> {
        let token = self
            .console()?
            .request_password_reset(&request.get_ref().email)
            .await?;
        Ok(Response::new(pb::RequestPasswordResetResponse {
            password_reset_token: token.map(|t| t.into_exposed()).unwrap_or_default(),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn reset_password(
        &self,
        request: Request<pb::ResetPasswordRequest>,
    ) -> Result<Response<pb::ResetPasswordResponse>, Status> {
        let rid = request_id(request.metadata());
        let r = request.into_inner();
        self.console()?
            .reset_password(&r.token, SecretString::from(r.new_password), &rid)
            .await?;
        Ok(Response::new(pb::ResetPasswordResponse {}))
    }

    async fn get_jwks(
        &self,
        _request: Request<pb::GetJwksRequest>,
    ) -> Result<Response<pb::GetJwksResponse>, Status> {
        Ok(Response::new(pb::GetJwksResponse {
            jwks: self.console()?.jwks(),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn create_user(
        &self,
        request: Request<pb::CreateUserRequest>,
    ) -> Result<Response<pb::CreateUserResponse>, Status> {
        let caller = self
            .guard
            .admit(Rpc::CreateUser, request.metadata(), false)?;
        let rid = request_id(request.metadata());
        let r = request.into_inner();
        let scope = caller.tenant_scope(&r.tenant_id)?;
        if let Some(role) = Role::parse(&r.role) {
            caller.may_grant(role)?;
        }
        let tenant_id = TenantId::parse(&scope).ok_or_else(|| {
            Error::invalid("tenant_id", "must be 1-64 characters of [A-Za-z0-9_-]")
        })?;
        let created = self
            .console()?
            .create_user(
                CreateUserInput {
                    tenant_id,
                    email: r.email,
                    password: SecretString::from(r.password),
                    role: r.role,
                },
                &caller.audit(&rid),
            )
            .await?;
        Ok(Response::new(pb::CreateUserResponse {
            user: Some(user(&created.user)),
            email_verification_token: created.verification.into_exposed(),
        }))
    }

    async fn list_users(
        &self,
        request: Request<pb::ListUsersRequest>,
    ) -> Result<Response<pb::ListUsersResponse>, Status> {
        let caller = self
            .guard
            .admit(Rpc::ListUsers, request.metadata(), false)?;
        let scope = caller.tenant_scope(&request.get_ref().tenant_id)?;
        let tenant_id = TenantId::parse(&scope).ok_or_else(|| {
            Error::invalid("tenant_id", "must be 1-64 characters of [A-Za-z0-9_-]")
        })?;
        let users = self.console()?.list_users(&tenant_id).await?;
        Ok(Response::new(pb::ListUsersResponse {
            users: users.iter().map(user).collect(),
        }))
    }

    async fn list_audit_events(
        &self,
        request: Request<pb::ListAuditEventsRequest>,
    ) -> Result<Response<pb::ListAuditEventsResponse>, Status> {
        let caller = self
            .guard
            .admit(Rpc::ListAuditEvents, request.metadata(), false)?;
        let r = request.into_inner();
        let scope = caller.tenant_scope(&r.tenant_id)?;
        let tenant = if scope.is_empty() {
            None
        } else {
            Some(TenantId::parse(&scope).ok_or_else(|| {
                Error::invalid("tenant_id", "must be 1-64 characters of [A-Za-z0-9_-]")
            })?)
        };
        let store = self
            .store
            .as_deref()
            .ok_or_else(|| Status::failed_precondition("this store keeps no audit log"))?;
        let page = audit_page(store, tenant.as_ref(), r.page_size, &r.page_token).await?;
        Ok(Response::new(pb::ListAuditEventsResponse {
            events: page.items.iter().map(audit_event).collect(),
            next_page_token: page.next_page_token,
        }))
    }
}

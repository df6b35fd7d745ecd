//! `tollgate.v1.ConsoleService`: thin handlers over [`crate::console`].

use std::sync::Arc;

use secrecy::SecretString;
use tonic::{Request, Response, Status};

use super::caller::{peer, request_id, CallerGuard};
use super::convert::ts;
use super::pb::{self, console_service_server::ConsoleService};
use crate::access::{Caller, Rpc};
use crate::console::{
    audit_page, Actor, Console, CreateUserInput, ProviderSignIn, Session, SignUpInput,
};
use crate::domain::console::{AuditEvent, ConsoleUser, Role, UserChange};
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

    /// The end user's address for throttling: `claimed` only from the
    /// console backend (its own narrow token), since anyone else could
    /// dodge the per-address throttle by sending a new one each time; else
    /// the peer.
    fn client_address<T>(
        &self,
        caller: &Caller,
        request: &Request<T>,
        claimed: &str,
    ) -> Result<String, Status> {
        if claimed.len() > 64 {
            return Err(Error::invalid("client_address", "must be at most 64 characters").into());
        }
        let trusted = matches!(caller, Caller::ConsoleBackend);
        Ok(if trusted && !claimed.is_empty() {
            claimed.to_string()
        } else {
            peer(request)
        })
    }
}

fn tenant(scope: &str) -> Result<TenantId, Status> {
    TenantId::parse(scope).ok_or_else(|| {
        Error::invalid("tenant_id", "must be 1-64 characters of [A-Za-z0-9_-]").into()
    })
}

/// Who changes a user (the rule table admits no one else to these calls).
fn actor(caller: &Caller) -> Result<Actor, Status> {
    match caller {
        Caller::Operator => Ok(Actor::Operator),
        Caller::Console { role, .. } => Ok(Actor::User(*role)),
        _ => Err(Error::PermissionDenied("this credential may not change users".into()).into()),
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
        disabled: u.disabled_at.is_some(),
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
        let caller = self
            .guard
            .admit(Rpc::SignUp, request.metadata(), false)
            .await?;
        let rid = request_id(request.metadata());
        let address = self.client_address(&caller, &request, &request.get_ref().client_address)?;
        let r = request.into_inner();
        self.console()?
            .sign_up(
                SignUpInput {
                    email: r.email,
                    password: SecretString::from(r.password),
                    tenant_name: r.tenant_name,
                },
                &address,
                &rid,
            )
            .await?;
        Ok(Response::new(pb::SignUpResponse {}))
    }

    #[tracing::instrument(skip_all)]
    async fn login(
        &self,
        request: Request<pb::LoginRequest>,
    ) -> Result<Response<pb::LoginResponse>, Status> {
        let caller = self
            .guard
            .admit(Rpc::Login, request.metadata(), false)
            .await?;
        let address = self.client_address(&caller, &request, &request.get_ref().client_address)?;
        let r = request.into_inner();
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
        let caller = self
            .guard
            .admit(Rpc::RequestEmailVerification, request.metadata(), false)
            .await?;
        let address = self.client_address(&caller, &request, &request.get_ref().client_address)?;
        self.console()?
            .request_email_verification(&request.get_ref().email, &address)
            .await?;
        Ok(Response::new(pb::RequestEmailVerificationResponse {}))
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
        let caller = self
            .guard
            .admit(Rpc::RequestPasswordReset, request.metadata(), false)
            .await?;
        let address = self.client_address(&caller, &request, &request.get_ref().client_address)?;
        self.console()?
            .request_password_reset(&request.get_ref().email, &address)
            .await?;
        Ok(Response::new(pb::RequestPasswordResetResponse {}))
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
            .admit(Rpc::CreateUser, request.metadata(), false)
            .await?;
        let rid = request_id(request.metadata());
        let r = request.into_inner();
        let scope = caller.tenant_scope(&r.tenant_id)?;
        if let Some(role) = Role::parse(&r.role) {
            caller.may_grant(role)?;
        }
        let tenant_id = tenant(&scope)?;
        self.console()?
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
        Ok(Response::new(pb::CreateUserResponse {}))
    }

    async fn list_users(
        &self,
        request: Request<pb::ListUsersRequest>,
    ) -> Result<Response<pb::ListUsersResponse>, Status> {
        let caller = self
            .guard
            .admit(Rpc::ListUsers, request.metadata(), false)
            .await?;
        let scope = caller.tenant_scope(&request.get_ref().tenant_id)?;
        let users = self.console()?.list_users(&tenant(&scope)?).await?;
        Ok(Response::new(pb::ListUsersResponse {
            users: users.iter().map(user).collect(),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn update_user(
        &self,
        request: Request<pb::UpdateUserRequest>,
    ) -> Result<Response<pb::UpdateUserResponse>, Status> {
        let caller = self
            .guard
            .admit(Rpc::UpdateUser, request.metadata(), false)
            .await?;
        let rid = request_id(request.metadata());
        let r = request.into_inner();
        let scope = caller.tenant_scope(&r.tenant_id)?;
        let mut change = UserChange::default();
        let mut v = crate::domain::Violations::default();
        for field in &r.update_mask {
            match field.as_str() {
                "role" => match Role::parse(&r.role) {
                    Some(role) => change.role = Some(role),
                    None => v.add("role", "must be one of: owner, admin, developer, viewer"),
                },
                "disabled" => change.disabled = Some(r.disabled),
                other => v.add(
                    "update_mask",
                    format!("unknown field `{other}`: role, disabled"),
                ),
            }
        }
        if r.update_mask.is_empty() {
            v.add("update_mask", "name at least one field: role, disabled");
        }
        v.into_result().map_err(Error::from)?;
        let changed = self
            .console()?
            .update_user(
                actor(&caller)?,
                &tenant(&scope)?,
                &r.user_id,
                change,
                &caller.audit(&rid),
            )
            .await?;
        Ok(Response::new(pb::UpdateUserResponse {
            user: Some(user(&changed)),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn delete_user(
        &self,
        request: Request<pb::DeleteUserRequest>,
    ) -> Result<Response<pb::DeleteUserResponse>, Status> {
        let caller = self
            .guard
            .admit(Rpc::DeleteUser, request.metadata(), false)
            .await?;
        let rid = request_id(request.metadata());
        let r = request.into_inner();
        let scope = caller.tenant_scope(&r.tenant_id)?;
        self.console()?
            .delete_user(
                actor(&caller)?,
                &tenant(&scope)?,
                &r.user_id,
                &caller.audit(&rid),
            )
            .await?;
        Ok(Response::new(pb::DeleteUserResponse {}))
    }

    async fn list_audit_events(
        &self,
        request: Request<pb::ListAuditEventsRequest>,
    ) -> Result<Response<pb::ListAuditEventsResponse>, Status> {
        let caller = self
            .guard
            .admit(Rpc::ListAuditEvents, request.metadata(), false)
            .await?;
        let r = request.into_inner();
        let scope = caller.tenant_scope(&r.tenant_id)?;
        let tenant = if scope.is_empty() {
            None
        } else {
            Some(tenant(&scope)?)
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

    #[tracing::instrument(skip_all)]
    async fn sign_in_with_provider(
        &self,
        request: Request<pb::SignInWithProviderRequest>,
    ) -> Result<Response<pb::LoginResponse>, Status> {
        let caller = self
            .guard
            .admit(Rpc::SignInWithProvider, request.metadata(), false)
            .await?;
        let rid = request_id(request.metadata());
        let address = self.client_address(&caller, &request, &request.get_ref().client_address)?;
        let r = request.into_inner();
        let s = self
            .console()?
            .sign_in_with_provider(ProviderSignIn {
                provider: &r.provider,
                id_token: SecretString::from(r.id_token),
                nonce: &r.nonce,
                nonce_checked_by_caller: matches!(caller, Caller::ConsoleBackend),
                address: &address,
                request_id: &rid,
            })
            .await?;
        Ok(Response::new(session(s)))
    }
}

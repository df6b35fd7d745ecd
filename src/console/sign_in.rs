//! Sign in with an identity provider (SignInWithProvider): an OpenID
//! Connect ID token, verified against the provider's keys, signs in the
//! account linked to its (issuer, subject); else links the account with
//! that verified email; else, when sign-up is open, creates a tenant and its
//! owner (no password, email verified). Throttled per client address like
//! Login. The token is never logged, stored or echoed.

use std::sync::Arc;

use secrecy::{ExposeSecret, SecretString};

use super::providers::Providers;
use super::throttle::Attempt;
use super::{Console, Session, SignupPolicy};
use crate::crypto::jwt::oidc::IdTokenError;
use crate::domain::console::{AuditContext, ConsoleUser, Email, PasswordHash, Role};
use crate::domain::identity::Identity;
use crate::domain::{SubscriptionStatus, Tenant, TenantId, TenantOverrides, Violations};
use crate::error::{Error, Result};
use crate::store::StoreError;

/// Longest `nonce` accepted.
const MAX_NONCE_BYTES: usize = 512;

/// A SignInWithProvider request, as received.
pub struct ProviderSignIn<'a> {
    pub provider: &'a str,
    pub id_token: SecretString,
    /// The nonce the sign-in began with; it must equal the token's. Empty
    /// only when `nonce_checked_by_caller`.
    pub nonce: &'a str,
    /// The caller is the console backend, which checked the nonce itself.
    /// Anyone else must send it: without it, an ID token lifted from a log
    /// or a browser history signs its owner in for whoever replays it.
    pub nonce_checked_by_caller: bool,
    pub address: &'a str,
    pub request_id: &'a str,
}

impl Console {
    /// Signs users in through `providers` too.
    pub fn with_providers(mut self, providers: Arc<Providers>) -> Self {
        self.providers = providers;
        self
    }

    /// An ID token → a console session (see the module doc). Refusals are
    /// typed ([`Error::IdTokenRefused`]) and change nothing.
    pub async fn sign_in_with_provider(&self, r: ProviderSignIn<'_>) -> Result<Session> {
        let mut v = Violations::default();
        let provider = self.providers.get(r.provider);
        if provider.is_none() {
            let known = self.providers.names().collect::<Vec<_>>().join(", ");
            v.add(
                "provider",
                format!("is not a configured provider (configured: [{known}])"),
            );
        }
        if r.id_token.expose_secret().is_empty() {
            v.add("id_token", "is required");
        }
        if r.nonce.len() > MAX_NONCE_BYTES {
            v.add("nonce", "must be at most 512 bytes");
        }
        if r.nonce.is_empty() && !r.nonce_checked_by_caller {
            v.add(
                "nonce",
                "is required (only the console backend, which checks it itself, may leave it out)",
            );
        }
        v.into_result()?;
        let provider = provider.expect("validated");
        let key = format!(
            "idp:{}:{}",
            provider.name,
            super::throttle::address_key(r.address)
        );
        let attempt = Attempt {
            account: &key,
            address: r.address,
        };
        self.throttle
            .reserve(attempt, self.clock.now())
            .map_err(|retry_after_seconds| Error::TooManyAttempts {
                retry_after_seconds,
            })?;
        let nonce = (!r.nonce.is_empty()).then_some(r.nonce);
        let verified = provider
            .verifier
            .verify(r.id_token.expose_secret(), self.clock.now(), nonce)
            .and_then(|c| {
                let email = Email::parse(&c.email).ok_or(IdTokenError::MissingClaim)?;
                Ok((c, email))
            });
        let (claims, email) = match verified {
            Ok(ok) => ok,
            Err(why) => {
                tracing::info!(provider = %provider.name, reason = why.reason(),
                    "console sign-in with a provider refused");
                return Err(Error::IdTokenRefused(why));
            }
        };
        let user = match self
            .account_for(&claims.issuer, &claims.subject, email, r.request_id)
            .await
        {
            Ok(user) => user,
            Err(e) => {
                if !matches!(e, Error::PermissionDenied(_)) {
                    self.throttle.abandoned(attempt, self.clock.now());
                }
                return Err(e);
            }
        };
        self.throttle.succeeded(attempt, self.clock.now());
        let session = self.start_session(&user).await?;
        tracing::info!(tenant_id = %user.tenant_id, user_id = %user.id, provider = %provider.name,
            "console sign-in with a provider");
        Ok(session)
    }

    /// The enabled account for a verified identity: linked already, linked
    /// now by its verified email, or created under the sign-up policy.
    async fn account_for(
        &self,
        issuer: &str,
        subject: &str,
        email: Email,
        request_id: &str,
    ) -> Result<ConsoleUser> {
        // Twice at most: a concurrent first sign-in of the same person may
        // link or create between our look-ups.
        for _ in 0..2 {
            if let Some(user) = self.store.user_by_identity(issuer, subject).await? {
                return enabled(user);
            }
            let now = self.clock.now();
            let identity = |user_id| Identity {
                issuer: issuer.to_string(),
                subject: subject.to_string(),
                user_id,
                email: email.clone(),
                created_at: now,
            };
            if let Some(user) = self.store.user_by_email(&email).await? {
                let user = enabled(user)?;
                let ctx = AuditContext {
                    actor: format!("user:{}", user.id),
                    request_id: request_id.to_string(),
                };
                match self.store.link_identity(identity(user.id), &ctx, now).await {
                    Ok((user, effects)) => {
                        if effects.drop_password {
                            tracing::warn!(user_id = %user.id,
                                "an unverified account was claimed through its provider: its password and sessions were removed");
                        }
                        tracing::info!(user_id = %user.id, "provider identity linked");
                        return Ok(user);
                    }
                    Err(StoreError::AlreadyExists | StoreError::NotFound) => continue,
                    Err(e) => return Err(e.into()),
                }
            }
            if self.settings.signup_policy() != SignupPolicy::Open {
                return Err(Error::PermissionDenied(
                    "no console account has this email address and sign-up is closed: an owner \
                     or admin of your tenant adds you with CreateUser"
                        .into(),
                ));
            }
            let tenant = Tenant {
                id: TenantId::generate(),
                name: format!("Tenant of {}", email.as_str()),
                plan: self.profile.default_plan.clone(),
                status: SubscriptionStatus::Active,
                overrides: TenantOverrides::default(),
                created_at: now,
                updated_at: now,
            };
            let user = ConsoleUser {
                id: uuid::Uuid::now_v7(),
                tenant_id: tenant.id.clone(),
                email: email.clone(),
                role: Role::Owner,
                password_hash: PasswordHash::none(),
                email_verified_at: Some(now),
                disabled_at: None,
                created_at: now,
            };
            let ctx = AuditContext {
                actor: format!("user:{}", user.id),
                request_id: request_id.to_string(),
            };
            match self
                .store
                .sign_up_with_identity(tenant, user.clone(), identity(user.id), &ctx)
                .await
            {
                Ok(()) => {
                    tracing::info!(tenant_id = %user.tenant_id, user_id = %user.id,
                        "console sign-up through a provider");
                    return Ok(user);
                }
                Err(StoreError::AlreadyExists) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(Error::Unavailable(
            "the account changed during sign-in; retry".into(),
        ))
    }
}

fn enabled(user: ConsoleUser) -> Result<ConsoleUser> {
    if user.disabled_at.is_some() {
        return Err(Error::PermissionDenied(
            "this console account is disabled".into(),
        ));
    }
    Ok(user)
}

//! Console accounts: sign-up, login (throttled), rotating refresh tokens,
//! email verification, password reset, users of a tenant. Tollgate signs
//! the access JWTs itself (see [`crate::crypto::signer`]). No tonic, no SQL.

pub mod settings;
pub mod throttle;

use std::sync::Arc;

use chrono::{DateTime, Duration, Utc};
use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;

use crate::clock::Clock;
use crate::crypto::jwt::IssuerRules;
use crate::crypto::opaque::{presented, OpaqueToken};
use crate::crypto::password;
use crate::crypto::signer::ConsoleSigner;
use crate::domain::console::{
    check_password, AuditContext, ConsoleUser, Email, NewToken, Role, TokenKind,
};
use crate::domain::validate::check_name;
use crate::domain::{SubscriptionStatus, Tenant, TenantId, TenantOverrides, Violations};
use crate::error::{Error, Result};
use crate::profile::Profile;
use crate::store::console::{ConsoleStore, NextRefresh, TokenUse};
use crate::store::StoreError;

pub use settings::ConsoleSettings;
use throttle::{Attempt, LoginThrottle};

/// Email-verification tokens live a day; password-reset tokens an hour.
const VERIFICATION_TTL_SECS: i64 = 24 * 3600;
const RESET_TTL_SECS: i64 = 3600;

/// The claims of a console access token.
#[derive(Debug, Serialize)]
struct AccessClaims<'a> {
    iss: &'a str,
    aud: &'a str,
    sub: String,
    tenant_id: &'a str,
    role: &'static str,
    scope: String,
    email: &'a str,
    email_verified: bool,
    iat: i64,
    nbf: i64,
    exp: i64,
    jti: String,
}

/// A logged-in session: an access JWT and a refresh token. Never in logs.
pub struct Session {
    pub access_token: String,
    pub expires_in_seconds: u32,
    pub refresh_token: String,
    pub refresh_expires_in_seconds: u32,
    pub user: ConsoleUser,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("user", &self.user.id)
            .finish_non_exhaustive()
    }
}

/// A SignUp request, as received.
pub struct SignUpInput {
    pub email: String,
    pub password: SecretString,
    pub tenant_name: String,
    pub tenant_id: String,
}

/// A CreateUser request, as received (the caller is already authorised).
pub struct CreateUserInput {
    pub tenant_id: TenantId,
    pub email: String,
    pub password: SecretString,
    pub role: String,
}

/// An account just created, and the email-verification token to deliver.
#[derive(Debug)]
pub struct Created {
    pub user: ConsoleUser,
    pub tenant: Option<Tenant>,
    pub verification: OpaqueToken,
}

const BAD_LOGIN: &str = "email or password is incorrect";
const BAD_REFRESH: &str = "the refresh token is invalid, expired or already used";
const BAD_TOKEN: &str = "is invalid, expired or already used";

/// The console service.
pub struct Console {
    profile: Arc<Profile>,
    store: Arc<dyn ConsoleStore>,
    signer: Arc<ConsoleSigner>,
    settings: ConsoleSettings,
    clock: Clock,
    throttle: LoginThrottle,
}

impl Console {
    /// Assembles the service.
    pub fn new(
        profile: Arc<Profile>,
        store: Arc<dyn ConsoleStore>,
        signer: Arc<ConsoleSigner>,
        settings: ConsoleSettings,
        clock: Clock,
    ) -> Self {
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(password::warm_up());
        }
        Self {
            profile,
            store,
            signer,
            settings,
            clock,
            throttle: LoginThrottle::default(),
        }
    }

    /// How console access tokens are verified (the console issuer).
    pub fn issuer_rules(settings: &ConsoleSettings) -> IssuerRules {
        IssuerRules::new(settings.issuer.clone(), vec![settings.audience.clone()])
    }

    /// The published verification keys (JWKS JSON).
    pub fn jwks(&self) -> String {
        self.signer.jwks().to_string()
    }

    fn new_token(&self, kind: TokenKind, user: &ConsoleUser, ttl: i64) -> (OpaqueToken, NewToken) {
        let now = self.clock.now();
        let token = OpaqueToken::generate(kind);
        let row = NewToken {
            digest: token.digest(),
            kind,
            user_id: user.id,
            family: None,
            created_at: now,
            expires_at: now + Duration::seconds(ttl),
        };
        (token, row)
    }

    async fn hash(&self, password: SecretString) -> Result<crate::domain::console::PasswordHash> {
        password::hash(password)
            .await
            .map_err(|e| Error::Internal(e.to_string()))
    }

    /// Creates a tenant on the profile's default plan and its owner.
    pub async fn sign_up(&self, input: SignUpInput, request_id: &str) -> Result<Created> {
        let mut v = Violations::default();
        let email = parse_email(&input.email, &mut v);
        check_password("password", input.password.expose_secret(), &mut v);
        check_name("tenant_name", &input.tenant_name, &mut v);
        let tenant_id = if input.tenant_id.is_empty() {
            Some(TenantId::generate())
        } else {
            let id = TenantId::parse(&input.tenant_id);
            if id.is_none() {
                v.add("tenant_id", "must be 1-64 characters of [A-Za-z0-9_-]");
            }
            id
        };
        v.into_result()?;
        let (email, tenant_id) = (email.expect("validated"), tenant_id.expect("validated"));
        if self.store.user_by_email(&email).await?.is_some() {
            return Err(Error::AlreadyExists("an account with this email"));
        }
        let now = self.clock.now();
        let tenant = Tenant {
            id: tenant_id.clone(),
            name: input.tenant_name,
            plan: self.profile.default_plan.clone(),
            status: SubscriptionStatus::Active,
            overrides: TenantOverrides::default(),
            created_at: now,
            updated_at: now,
        };
        let user = ConsoleUser {
            id: uuid::Uuid::now_v7(),
            tenant_id,
            email,
            role: Role::Owner,
            password_hash: self.hash(input.password).await?,
            email_verified_at: None,
            created_at: now,
        };
        let (verification, row) =
            self.new_token(TokenKind::EmailVerification, &user, VERIFICATION_TTL_SECS);
        let ctx = AuditContext {
            actor: format!("user:{}", user.id),
            request_id: request_id.to_string(),
        };
        self.store
            .sign_up(tenant.clone(), user.clone(), row, &ctx)
            .await
            .map_err(|e| match e {
                StoreError::AlreadyExists => {
                    Error::AlreadyExists("an account with this email, or a tenant with this id,")
                }
                e => e.into(),
            })?;
        tracing::info!(tenant_id = %tenant.id, user_id = %user.id, "console sign-up");
        Ok(Created {
            user,
            tenant: Some(tenant),
            verification,
        })
    }

    /// Adds a user to a tenant (authorisation is the caller's job).
    pub async fn create_user(&self, input: CreateUserInput, ctx: &AuditContext) -> Result<Created> {
        let mut v = Violations::default();
        let email = parse_email(&input.email, &mut v);
        check_password("password", input.password.expose_secret(), &mut v);
        let role = Role::parse(&input.role);
        if role.is_none() {
            v.add("role", "must be one of: owner, admin, developer, viewer");
        }
        v.into_result()?;
        let email = email.expect("validated");
        if self.store.user_by_email(&email).await?.is_some() {
            return Err(Error::AlreadyExists("an account with this email"));
        }
        let now = self.clock.now();
        let user = ConsoleUser {
            id: uuid::Uuid::now_v7(),
            tenant_id: input.tenant_id,
            email,
            role: role.expect("validated"),
            password_hash: self.hash(input.password).await?,
            email_verified_at: None,
            created_at: now,
        };
        let (verification, row) =
            self.new_token(TokenKind::EmailVerification, &user, VERIFICATION_TTL_SECS);
        self.store
            .create_user(user.clone(), row, ctx)
            .await
            .map_err(|e| match e {
                StoreError::AlreadyExists => Error::AlreadyExists("an account with this email"),
                StoreError::NotFound => Error::NotFound("tenant"),
                e => e.into(),
            })?;
        tracing::info!(tenant_id = %user.tenant_id, user_id = %user.id, role = user.role.as_str(),
            "console user created");
        Ok(Created {
            user,
            tenant: None,
            verification,
        })
    }

    /// A tenant's users.
    pub async fn list_users(&self, tenant: &TenantId) -> Result<Vec<ConsoleUser>> {
        Ok(self.store.list_users(tenant).await?)
    }

    /// Email + password → session. Throttled per account and per address;
    /// unknown emails cost the same argon2 work as known ones.
    pub async fn login(
        &self,
        email: &str,
        password: SecretString,
        address: &str,
    ) -> Result<Session> {
        let mut v = Violations::default();
        let email = parse_email(email, &mut v);
        if password.expose_secret().is_empty() {
            v.add("password", "is required");
        } else if password.expose_secret().len() > crate::domain::console::MAX_PASSWORD_BYTES {
            v.add("password", "is too long");
        }
        v.into_result()?;
        let email = email.expect("validated");
        let attempt = Attempt {
            account: email.as_str(),
            address,
        };
        let now = self.clock.now();
        self.throttle
            .check(attempt, now)
            .map_err(|retry_after_seconds| Error::TooManyAttempts {
                retry_after_seconds,
            })?;
        let user = self.store.user_by_email(&email).await?;
        let ok = password::verify(password, user.as_ref().map(|u| u.password_hash.clone())).await;
        let Some(user) = user.filter(|_| ok) else {
            self.throttle.failed(attempt, self.clock.now());
            tracing::info!("console login refused");
            return Err(Error::BadCredentials(BAD_LOGIN));
        };
        self.throttle.succeeded(attempt);
        let session = self.start_session(&user).await?;
        tracing::info!(tenant_id = %user.tenant_id, user_id = %user.id, "console login");
        Ok(session)
    }

    async fn start_session(&self, user: &ConsoleUser) -> Result<Session> {
        let now = self.clock.now();
        let refresh = OpaqueToken::generate(TokenKind::Refresh);
        self.store
            .insert_token(NewToken {
                digest: refresh.digest(),
                kind: TokenKind::Refresh,
                user_id: user.id,
                family: Some(uuid::Uuid::now_v7()),
                created_at: now,
                expires_at: now + self.refresh_ttl(),
            })
            .await?;
        self.session(user.clone(), refresh, now)
    }

    fn refresh_ttl(&self) -> Duration {
        Duration::seconds(self.settings.refresh_ttl_seconds as i64)
    }

    fn session(
        &self,
        user: ConsoleUser,
        refresh: OpaqueToken,
        now: DateTime<Utc>,
    ) -> Result<Session> {
        let ttl = self.settings.access_ttl_seconds as i64;
        let claims = AccessClaims {
            iss: &self.settings.issuer,
            aud: &self.settings.audience,
            sub: user.id.to_string(),
            tenant_id: user.tenant_id.as_str(),
            role: user.role.as_str(),
            scope: user.role.scopes().join(" "),
            email: user.email.as_str(),
            email_verified: user.email_verified_at.is_some(),
            iat: now.timestamp(),
            nbf: now.timestamp(),
            exp: now.timestamp() + ttl,
            jti: uuid::Uuid::new_v4().to_string(),
        };
        let access_token = self
            .signer
            .sign(&claims)
            .map_err(|e| Error::Internal(e.to_string()))?;
        Ok(Session {
            access_token,
            expires_in_seconds: ttl as u32,
            refresh_token: refresh.into_exposed(),
            refresh_expires_in_seconds: self.settings.refresh_ttl_seconds as u32,
            user,
        })
    }

    /// Spends a refresh token for a new session pair. A replayed token ends
    /// the whole session it belonged to.
    pub async fn refresh(&self, refresh_token: &str) -> Result<Session> {
        let digest = presented(TokenKind::Refresh, refresh_token)
            .ok_or(Error::BadCredentials(BAD_REFRESH))?;
        let now = self.clock.now();
        let next = OpaqueToken::generate(TokenKind::Refresh);
        let outcome = self
            .store
            .rotate_refresh(
                &digest,
                NextRefresh {
                    digest: next.digest(),
                    expires_at: now + self.refresh_ttl(),
                },
                now,
            )
            .await?;
        match outcome {
            TokenUse::Spent { user, .. } => self.session(user, next, now),
            TokenUse::Replayed => {
                tracing::warn!("a spent refresh token was presented again; its session is revoked");
                Err(Error::BadCredentials(BAD_REFRESH))
            }
            TokenUse::Unknown => Err(Error::BadCredentials(BAD_REFRESH)),
        }
    }

    /// Ends the session of a refresh token; unknown tokens are ignored.
    pub async fn logout(&self, refresh_token: &str) -> Result<()> {
        if let Some(digest) = presented(TokenKind::Refresh, refresh_token) {
            self.store.end_session(&digest, self.clock.now()).await?;
        }
        Ok(())
    }

    /// A new email-verification token for an unverified account.
    pub async fn request_email_verification(&self, email: &str) -> Result<Option<OpaqueToken>> {
        let mut v = Violations::default();
        let email = parse_email(email, &mut v);
        v.into_result()?;
        let Some(user) = self.store.user_by_email(&email.expect("validated")).await? else {
            return Ok(None);
        };
        if user.email_verified_at.is_some() {
            return Ok(None);
        }
        let (token, row) =
            self.new_token(TokenKind::EmailVerification, &user, VERIFICATION_TTL_SECS);
        self.store.insert_token(row).await?;
        Ok(Some(token))
    }

    /// Spends an email-verification token.
    pub async fn verify_email(&self, token: &str) -> Result<ConsoleUser> {
        let digest = presented(TokenKind::EmailVerification, token)
            .ok_or_else(|| Error::invalid("token", BAD_TOKEN))?;
        match self.store.verify_email(&digest, self.clock.now()).await? {
            TokenUse::Spent { user, .. } => Ok(user),
            _ => Err(Error::invalid("token", BAD_TOKEN)),
        }
    }

    /// A password-reset token for an existing account (`None` otherwise).
    pub async fn request_password_reset(&self, email: &str) -> Result<Option<OpaqueToken>> {
        let mut v = Violations::default();
        let email = parse_email(email, &mut v);
        v.into_result()?;
        let Some(user) = self.store.user_by_email(&email.expect("validated")).await? else {
            return Ok(None);
        };
        let (token, row) = self.new_token(TokenKind::PasswordReset, &user, RESET_TTL_SECS);
        self.store.insert_token(row).await?;
        tracing::info!(user_id = %user.id, "password reset requested");
        Ok(Some(token))
    }

    /// Sets a new password with a reset token and ends every session. A
    /// weak password is refused before the token is spent.
    pub async fn reset_password(
        &self,
        token: &str,
        new_password: SecretString,
        request_id: &str,
    ) -> Result<()> {
        let mut v = Violations::default();
        let digest = presented(TokenKind::PasswordReset, token);
        if digest.is_none() {
            v.add("token", BAD_TOKEN);
        }
        check_password("new_password", new_password.expose_secret(), &mut v);
        v.into_result()?;
        let hash = self.hash(new_password).await?;
        let digest = digest.expect("validated");
        match self
            .store
            .reset_password(&digest, &hash, self.clock.now(), request_id)
            .await?
        {
            TokenUse::Spent { user, .. } => {
                tracing::info!(tenant_id = %user.tenant_id, user_id = %user.id, "password reset");
                Ok(())
            }
            _ => Err(Error::invalid("token", BAD_TOKEN)),
        }
    }
}

fn parse_email(s: &str, v: &mut Violations) -> Option<Email> {
    let e = Email::parse(s);
    if e.is_none() {
        v.add("email", "must be an email address");
    }
    e
}

/// A page of the audit log, newest first: one tenant's (or, for `None`,
/// every tenant's). The page token is the last event id of the page.
pub async fn audit_page(
    store: &dyn ConsoleStore,
    tenant: Option<&TenantId>,
    page_size: u32,
    page_token: &str,
) -> Result<crate::manage::Page<crate::domain::console::AuditEvent>> {
    let mut v = Violations::default();
    let size = match page_size {
        0 => crate::manage::DEFAULT_PAGE_SIZE,
        n if n > crate::manage::MAX_PAGE_SIZE => {
            v.add(
                "page_size",
                format!("must be at most {}", crate::manage::MAX_PAGE_SIZE),
            );
            0
        }
        n => n,
    };
    let before = if page_token.is_empty() {
        None
    } else {
        let t = uuid::Uuid::parse_str(page_token).ok();
        if t.is_none() {
            v.add(
                "page_token",
                "is not a token from a previous ListAuditEvents response",
            );
        }
        t
    };
    v.into_result()?;
    let mut items = store.list_audit(tenant, before, size + 1).await?;
    let next_page_token = if items.len() > size as usize {
        items.truncate(size as usize);
        items.last().map(|e| e.id.to_string()).unwrap_or_default()
    } else {
        String::new()
    };
    Ok(crate::manage::Page {
        items,
        next_page_token,
    })
}

#[cfg(test)]
mod tests;

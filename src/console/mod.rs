//! Console accounts: sign-up, login (throttled), rotating refresh tokens
//! with an absolute session end, users of a tenant. Tollgate signs the
//! access JWTs itself (see [`crate::crypto::signer`]). No tonic, no SQL.
//!
//! Here: accounts and sessions. `mail`: tokens sent out of band (email
//! verification, password reset) through `delivery` (the signed webhook).
//! `users`: role changes, disabling, deletion. `throttle`: login and
//! mail-sending back-off. `work`: the bounded argon2 queue. `settings`:
//! `[jwt.console]`.

pub mod delivery;
mod mail;
pub mod providers;
pub mod settings;
mod sign_in;
pub mod throttle;
mod users;
pub mod work;

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

use delivery::{Deliver, MessageKind, Nowhere, Stdout, Webhook};
pub use settings::{ConsoleSettings, SignupPolicy};
pub use sign_in::ProviderSignIn;
use throttle::{Attempt, LoginThrottle, MailThrottle};
pub use users::Actor;
use work::{Busy, WorkQueue};

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

/// A SignUp request, as received. The tenant id is always generated.
pub struct SignUpInput {
    pub email: String,
    pub password: SecretString,
    pub tenant_name: String,
}

/// A CreateUser request, as received (the caller is already authorised).
pub struct CreateUserInput {
    pub tenant_id: TenantId,
    pub email: String,
    pub password: SecretString,
    pub role: String,
}

/// Expired tokens removed per login, at most.
const PURGE_BATCH: u32 = 100;

const BAD_LOGIN: &str = "email or password is incorrect";
const BAD_REFRESH: &str = "the refresh token is invalid, expired or already used";
const BAD_TOKEN: &str = "is invalid, expired or already used";

/// The rule behind `jwt.console.require_verified_email`, for the guard of
/// management calls: with `required`, a console user whose access token
/// says `email_verified: false` (or says nothing) is refused.
pub fn check_verified_email(required: bool, email_verified: Option<bool>) -> Result<()> {
    if required && email_verified != Some(true) {
        return Err(Error::PermissionDenied(
            "verify your email address before managing this tenant".into(),
        ));
    }
    Ok(())
}

impl From<Busy> for Error {
    fn from(b: Busy) -> Self {
        Error::Overloaded {
            retry_after_seconds: b.retry_after_seconds,
        }
    }
}

/// The console service.
pub struct Console {
    profile: Arc<Profile>,
    store: Arc<dyn ConsoleStore>,
    signer: Arc<ConsoleSigner>,
    settings: ConsoleSettings,
    clock: Clock,
    throttle: LoginThrottle,
    /// SignUp, per client address.
    signups: MailThrottle,
    /// RequestPasswordReset and RequestEmailVerification, per client
    /// address and per email address (no mail-bombing one inbox).
    mail: MailThrottle,
    mail_per_account: MailThrottle,
    passwords: WorkQueue,
    delivery: Arc<dyn Deliver>,
    /// `[jwt.console.oidc.<name>]` (SignInWithProvider).
    providers: Arc<providers::Providers>,
}

fn delivery_for(settings: &ConsoleSettings) -> Arc<dyn Deliver> {
    match settings.load_webhook() {
        Ok(Some((url, secret, timeout))) => match Webhook::new(url, secret, timeout) {
            Ok(w) => return Arc::new(w),
            Err(e) => tracing::error!(error = %e, "the console webhook client cannot be built"),
        },
        Ok(None) => {}
        Err(e) => tracing::error!(error = %e, "the console webhook is misconfigured"),
    }
    if settings.delivery.stdout {
        tracing::warn!(
            "console messages (verification and reset tokens) are PRINTED TO STDOUT: \
             development delivery, never for production"
        );
        return Arc::new(Stdout);
    }
    tracing::warn!(
        "no console delivery configured (jwt.console.delivery.webhook_url): password resets \
         and email verification send nothing and cannot complete"
    );
    Arc::new(Nowhere)
}

impl Console {
    /// Assembles the service; messages go where `settings.delivery` says.
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
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        Self {
            profile,
            store,
            signer,
            delivery: delivery_for(&settings),
            passwords: WorkQueue::new(
                cores,
                settings.password_queue,
                std::time::Duration::from_secs(settings.password_queue_wait_seconds),
            ),
            settings,
            clock,
            throttle: LoginThrottle::default(),
            signups: MailThrottle::default(),
            mail: MailThrottle::default(),
            mail_per_account: MailThrottle::default(),
            providers: Arc::default(),
        }
    }

    /// Sends messages through `delivery` instead.
    pub fn with_delivery(mut self, delivery: Arc<dyn Deliver>) -> Self {
        self.delivery = delivery;
        self
    }

    /// Hashes passwords behind `queue` instead.
    pub fn with_password_queue(mut self, queue: WorkQueue) -> Self {
        self.passwords = queue;
        self
    }

    /// The password-hashing queue (tests hold its slots).
    pub fn password_queue(&self) -> &WorkQueue {
        &self.passwords
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
            session_ends_at: None,
        };
        (token, row)
    }

    async fn hash(&self, password: SecretString) -> Result<crate::domain::console::PasswordHash> {
        let _slot = self.passwords.enter().await?;
        password::hash(password)
            .await
            .map_err(|e| Error::Internal(e.to_string()))
    }

    /// Creates a tenant (generated id) on the profile's default plan and
    /// its owner, when sign-up is open. The answer is the same whether or
    /// not the address has an account: a new owner is sent a verification
    /// token, an existing one a notice.
    pub async fn sign_up(&self, input: SignUpInput, address: &str, request_id: &str) -> Result<()> {
        if self.settings.signup_policy() != SignupPolicy::Open {
            return Err(Error::PermissionDenied(
                "sign-up is closed: an owner or admin of your tenant adds you with CreateUser"
                    .into(),
            ));
        }
        let mut v = Violations::default();
        let email = parse_email(&input.email, &mut v);
        check_password("password", input.password.expose_secret(), &mut v);
        check_name("tenant_name", &input.tenant_name, &mut v);
        v.into_result()?;
        let email = email.expect("validated");
        self.reserve_mail(&self.signups, address)?;
        self.reserve_mail(&self.mail_per_account, email.as_str())?;
        // Hashed whether or not the address is taken: the same work, the
        // same time, either way.
        let password_hash = self.hash(input.password).await?;
        if self.notify_if_taken(&email).await? {
            return Ok(());
        }
        let now = self.clock.now();
        let tenant = Tenant {
            id: TenantId::generate(),
            name: input.tenant_name,
            plan: self.profile.default_plan.clone(),
            status: SubscriptionStatus::Active,
            overrides: TenantOverrides::default(),
            created_at: now,
            updated_at: now,
        };
        let user = ConsoleUser {
            id: uuid::Uuid::now_v7(),
            tenant_id: tenant.id.clone(),
            email,
            role: Role::Owner,
            password_hash,
            email_verified_at: None,
            disabled_at: None,
            created_at: now,
        };
        let (verification, row) =
            self.new_token(TokenKind::EmailVerification, &user, VERIFICATION_TTL_SECS);
        let ctx = AuditContext {
            actor: format!("user:{}", user.id),
            request_id: request_id.to_string(),
        };
        match self
            .store
            .sign_up(tenant.clone(), user.clone(), row.clone(), &ctx)
            .await
        {
            Ok(()) => {}
            Err(StoreError::AlreadyExists) => {
                // A race with another sign-up for the address.
                self.notify_if_taken(&user.email).await?;
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        }
        tracing::info!(tenant_id = %tenant.id, user_id = %user.id, "console sign-up");
        self.deliver(MessageKind::EmailVerification, &user, verification, &row);
        Ok(())
    }

    /// Adds a user to a tenant (authorisation is the caller's job). The
    /// answer is the same whether or not the address has an account
    /// anywhere: its holder is notified instead.
    pub async fn create_user(&self, input: CreateUserInput, ctx: &AuditContext) -> Result<()> {
        if self.settings.signup_policy() == SignupPolicy::Off {
            return Err(Error::PermissionDenied(
                "the console takes no new accounts (jwt.console.signup = \"off\")".into(),
            ));
        }
        let mut v = Violations::default();
        let email = parse_email(&input.email, &mut v);
        check_password("password", input.password.expose_secret(), &mut v);
        let role = Role::parse(&input.role);
        if role.is_none() {
            v.add("role", "must be one of: owner, admin, developer, viewer");
        }
        v.into_result()?;
        let email = email.expect("validated");
        let password_hash = self.hash(input.password).await?;
        if self.notify_if_taken(&email).await? {
            return Ok(());
        }
        let now = self.clock.now();
        let user = ConsoleUser {
            id: uuid::Uuid::now_v7(),
            tenant_id: input.tenant_id,
            email,
            role: role.expect("validated"),
            password_hash,
            email_verified_at: None,
            disabled_at: None,
            created_at: now,
        };
        let (verification, row) =
            self.new_token(TokenKind::EmailVerification, &user, VERIFICATION_TTL_SECS);
        match self.store.create_user(user.clone(), row.clone(), ctx).await {
            Ok(()) => {}
            Err(StoreError::AlreadyExists) => {
                self.notify_if_taken(&user.email).await?;
                return Ok(());
            }
            Err(StoreError::NotFound) => return Err(Error::NotFound("tenant")),
            Err(e) => return Err(e.into()),
        }
        tracing::info!(tenant_id = %user.tenant_id, user_id = %user.id, role = user.role.as_str(),
            "console user created");
        self.deliver(MessageKind::EmailVerification, &user, verification, &row);
        Ok(())
    }

    /// A tenant's users.
    pub async fn list_users(&self, tenant: &TenantId) -> Result<Vec<ConsoleUser>> {
        Ok(self.store.list_users(tenant).await?)
    }

    /// Removes a bounded batch of expired tokens (called on writes).
    async fn purge_expired_tokens(&self) {
        match self.store.purge_tokens(self.clock.now(), PURGE_BATCH).await {
            Ok(0) => {}
            Ok(n) => tracing::debug!(purged = n, "expired console tokens purged"),
            Err(e) => tracing::warn!(error = %e, "purging expired console tokens failed"),
        }
    }

    /// Email + password → session. Each attempt is reserved with the
    /// throttle (per account and per address) before its password is
    /// verified; unknown emails cost the same argon2 work as known ones.
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
        self.throttle
            .reserve(attempt, self.clock.now())
            .map_err(|retry_after_seconds| Error::TooManyAttempts {
                retry_after_seconds,
            })?;
        let verified = self.verify_login(&email, password).await;
        let user = match verified {
            Ok(user) => user,
            Err(e) => {
                if !matches!(e, Error::BadCredentials(_)) {
                    // Never verified (busy, store down): not a failure.
                    self.throttle.abandoned(attempt, self.clock.now());
                }
                return Err(e);
            }
        };
        self.throttle.succeeded(attempt, self.clock.now());
        let session = self.start_session(&user).await?;
        tracing::info!(tenant_id = %user.tenant_id, user_id = %user.id, "console login");
        Ok(session)
    }

    /// The enabled account whose password this is, or `BadCredentials`.
    async fn verify_login(&self, email: &Email, password: SecretString) -> Result<ConsoleUser> {
        let user = self.store.user_by_email(email).await?;
        let ok = {
            let _slot = self.passwords.enter().await?;
            // A provider-only account has no password: verified like an
            // unknown email (the same work, the same answer).
            let stored = user.as_ref().filter(|u| u.password_hash.is_set());
            password::verify(password, stored.map(|u| u.password_hash.clone())).await
        };
        user.filter(|u| ok && u.disabled_at.is_none())
            .ok_or_else(|| {
                tracing::info!("console login refused");
                Error::BadCredentials(BAD_LOGIN)
            })
    }

    async fn start_session(&self, user: &ConsoleUser) -> Result<Session> {
        let now = self.clock.now();
        let refresh = OpaqueToken::generate(TokenKind::Refresh);
        let ends = now + Duration::seconds(self.settings.session_max_age_seconds as i64);
        let expires_at = (now + self.refresh_ttl()).min(ends);
        self.store
            .insert_token(NewToken {
                digest: refresh.digest(),
                kind: TokenKind::Refresh,
                user_id: user.id,
                family: Some(uuid::Uuid::now_v7()),
                created_at: now,
                expires_at,
                session_ends_at: Some(ends),
            })
            .await?;
        self.purge_expired_tokens().await;
        self.session(user.clone(), refresh, now, expires_at)
    }

    fn refresh_ttl(&self) -> Duration {
        Duration::seconds(self.settings.refresh_ttl_seconds as i64)
    }

    fn session(
        &self,
        user: ConsoleUser,
        refresh: OpaqueToken,
        now: DateTime<Utc>,
        refresh_expires_at: DateTime<Utc>,
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
            refresh_expires_in_seconds: (refresh_expires_at - now).num_seconds().max(0) as u32,
            user,
        })
    }

    /// Spends a refresh token for a new session pair. A replayed token ends
    /// the whole session it belonged to; no refresh outlives the session's
    /// absolute lifetime, nor a disabled account.
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
            TokenUse::Spent {
                user, expires_at, ..
            } => self.session(user, next, now, expires_at),
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

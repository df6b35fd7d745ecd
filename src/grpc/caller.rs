//! Who is calling, from a call's metadata: `authorization: Bearer` with the
//! operator token, the gateway token, the console backend token, or a
//! console access token from Tollgate's own console issuer (external
//! issuers' tokens never manage); no `authorization` at all is
//! [`Caller::Anonymous`]. [`CallerGuard::admit`] then applies the rule
//! table of [`crate::access`].

use std::sync::Arc;

use tonic::metadata::MetadataMap;

use super::operator::StaticToken;
use crate::access::{self, Anyone, Caller, Rpc};
use crate::clock::Clock;
use crate::crypto::jwt::Verifier;
use crate::domain::console::Role;
use crate::domain::TenantId;
use crate::error::Error;
use crate::store::ConsoleStore;

/// The static bearer tokens that identify callers (each optional).
#[derive(Debug, Clone)]
pub struct CallerTokens {
    pub operator: StaticToken,
    pub gateway: StaticToken,
    pub console_backend: StaticToken,
}

/// Turns request metadata into a [`Caller`] and admits it per the table.
#[derive(Clone)]
pub struct CallerGuard {
    tokens: CallerTokens,
    verifier: Arc<Verifier>,
    /// The console issuer's `iss`; `None`: no console users.
    console_issuer: Option<String>,
    clock: Clock,
    /// `jwt.console.require_verified_email`.
    require_verified_email: bool,
    /// Where console users are re-read on every call that needs one, so a
    /// disabled, deleted or re-roled user's access token stops acting at
    /// once rather than when it expires.
    users: Option<Arc<dyn ConsoleStore>>,
}

impl std::fmt::Debug for CallerGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallerGuard")
            .field("console_issuer", &self.console_issuer)
            .finish_non_exhaustive()
    }
}

impl CallerGuard {
    /// A guard knowing `tokens` and, when `console_issuer` is set, console
    /// access tokens verified by `verifier`.
    pub fn new(
        tokens: CallerTokens,
        verifier: Arc<Verifier>,
        console_issuer: Option<String>,
        clock: Clock,
    ) -> Self {
        Self {
            tokens,
            verifier,
            console_issuer,
            clock,
            require_verified_email: false,
            users: None,
        }
    }

    /// Re-reads console users from `store` on every call that needs an
    /// identified caller ([`CallerGuard::admit`]).
    pub fn with_console_users(mut self, store: Arc<dyn ConsoleStore>) -> Self {
        self.users = Some(store);
        self
    }

    /// The caller `rpc` may be made by, or the refusal (`Unauthenticated`:
    /// no or a bad credential where one is needed; `PermissionDenied`: a
    /// known caller without the right). `own_credential`: the request
    /// carries the credential it asks about. On open calls a bad
    /// credential is just anonymous, and nothing is looked up. A console
    /// user is taken as the store has them now: gone or disabled is
    /// `Unauthenticated`, and the role in force is the stored one, not the
    /// one in the token.
    pub async fn admit(
        &self,
        rpc: Rpc,
        metadata: &MetadataMap,
        own_credential: bool,
    ) -> Result<Caller, Error> {
        if is_open(rpc, own_credential) {
            // Open calls use at most a static token (the console backend's
            // `client_address`): no JWT is verified on the decision path.
            let token = bearer(metadata).ok().flatten();
            return Ok(token
                .and_then(|t| self.static_caller(t))
                .unwrap_or(Caller::Anonymous));
        }
        let caller = self.current(self.identify(metadata)?).await?;
        access::admit(rpc, &caller, own_credential)?;
        Ok(caller)
    }

    async fn current(&self, caller: Caller) -> Result<Caller, Error> {
        let (
            Caller::Console {
                tenant_id, user_id, ..
            },
            Some(store),
        ) = (&caller, &self.users)
        else {
            return Ok(caller);
        };
        match store.user_in(tenant_id, *user_id).await? {
            Some(user) if user.disabled_at.is_none() => Ok(Caller::Console {
                tenant_id: user.tenant_id,
                role: user.role,
                user_id: user.id,
            }),
            _ => {
                tracing::debug!("a console token of a disabled or deleted user");
                Err(Error::Unauthenticated)
            }
        }
    }

    /// Refuses console users whose email is unverified
    /// ([`crate::console::check_verified_email`]).
    pub fn with_verified_email_required(mut self, required: bool) -> Self {
        self.require_verified_email = required;
        self
    }

    /// The caller a static token names (operator, gateway, console
    /// backend), compared in constant time.
    fn static_caller(&self, token: &str) -> Option<Caller> {
        if self.tokens.operator.matches(token) {
            Some(Caller::Operator)
        } else if self.tokens.gateway.matches(token) {
            Some(Caller::Gateway)
        } else if self.tokens.console_backend.matches(token) {
            Some(Caller::ConsoleBackend)
        } else {
            None
        }
    }

    /// Who is calling (no rule applied).
    pub fn identify(&self, metadata: &MetadataMap) -> Result<Caller, Error> {
        let Some(token) = bearer(metadata)? else {
            return Ok(Caller::Anonymous);
        };
        if let Some(caller) = self.static_caller(token) {
            return Ok(caller);
        }
        let iss = self
            .console_issuer
            .as_deref()
            .ok_or(Error::Unauthenticated)?;
        let verified = self
            .verifier
            .verify_from(token, self.clock.now(), Some(iss))
            .map_err(|e| {
                tracing::debug!(error = %e, "a call with a refused bearer token");
                Error::Unauthenticated
            })?;
        let tenant_id = TenantId::parse(&verified.tenant_id).ok_or(Error::Unauthenticated)?;
        let role = verified
            .claims
            .get("role")
            .and_then(|r| r.as_str())
            .and_then(Role::parse)
            .ok_or(Error::Unauthenticated)?;
        let user_id =
            uuid::Uuid::parse_str(&verified.subject).map_err(|_| Error::Unauthenticated)?;
        let email_verified = verified
            .claims
            .get("email_verified")
            .and_then(|v| v.as_bool());
        crate::console::check_verified_email(self.require_verified_email, email_verified)?;
        Ok(Caller::Console {
            tenant_id,
            role,
            user_id,
        })
    }
}

/// The request id for audit rows: `x-request-id` when it is 1-128
/// printable ASCII characters, else a new UUIDv7.
pub fn request_id(metadata: &MetadataMap) -> String {
    metadata
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| (1..=128).contains(&v.len()) && v.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_string)
        .unwrap_or_else(|| uuid::Uuid::now_v7().to_string())
}

/// The peer address of a request, for login throttling.
pub fn peer<T>(request: &tonic::Request<T>) -> String {
    request
        .remote_addr()
        .map(|a| a.ip().to_string())
        .unwrap_or_default()
}

/// The bearer token of `metadata` (`None`: no `authorization` at all;
/// another scheme or an unreadable value is `Unauthenticated`).
fn bearer(metadata: &MetadataMap) -> Result<Option<&str>, Error> {
    let Some(value) = metadata.get("authorization") else {
        return Ok(None);
    };
    value
        .to_str()
        .ok()
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| Some(token.trim()))
        .ok_or(Error::Unauthenticated)
}

/// Whether `rpc` needs no identified caller (`own_credential`: the request
/// carries the credential it asks about).
fn is_open(rpc: Rpc, own_credential: bool) -> bool {
    match rpc.rule().anyone {
        Anyone::Yes => true,
        Anyone::WithOwnCredential => own_credential,
        Anyone::No => false,
    }
}

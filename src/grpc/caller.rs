//! Management-call authentication, generalised: the operator token (checked
//! exactly as [`OperatorGuard`] always did), or a console access token from
//! Tollgate's own console issuer (external issuers' tokens never manage).

use std::sync::Arc;

use tonic::metadata::MetadataMap;

use super::operator::OperatorGuard;
use crate::access::Caller;
use crate::clock::Clock;
use crate::crypto::jwt::Verifier;
use crate::domain::console::Role;
use crate::domain::TenantId;
use crate::error::Error;

/// Turns request metadata into a [`Caller`].
#[derive(Clone)]
pub struct CallerGuard {
    operator: OperatorGuard,
    verifier: Arc<Verifier>,
    /// The console issuer's `iss`; `None`: only the operator may manage.
    console_issuer: Option<String>,
    clock: Clock,
    /// `jwt.console.require_verified_email`.
    require_verified_email: bool,
}

impl std::fmt::Debug for CallerGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallerGuard")
            .field("console_issuer", &self.console_issuer)
            .finish_non_exhaustive()
    }
}

fn bearer(metadata: &MetadataMap) -> Option<&str> {
    let (scheme, token) = metadata
        .get("authorization")?
        .to_str()
        .ok()?
        .split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

impl CallerGuard {
    /// A guard accepting the operator token and, when `console_issuer` is
    /// set, console access tokens verified by `verifier`.
    pub fn new(
        operator: OperatorGuard,
        verifier: Arc<Verifier>,
        console_issuer: Option<String>,
        clock: Clock,
    ) -> Self {
        Self {
            operator,
            verifier,
            console_issuer,
            clock,
            require_verified_email: false,
        }
    }

    /// Refuses console users whose email is unverified
    /// ([`crate::console::check_verified_email`]).
    pub fn with_verified_email_required(mut self, required: bool) -> Self {
        self.require_verified_email = required;
        self
    }

    /// The caller, or `Unauthenticated`.
    pub fn check(&self, metadata: &MetadataMap) -> Result<Caller, Error> {
        if self.operator.check(metadata).is_ok() {
            return Ok(Caller::Operator);
        }
        let iss = self
            .console_issuer
            .as_deref()
            .ok_or(Error::Unauthenticated)?;
        let token = bearer(metadata).ok_or(Error::Unauthenticated)?;
        let verified = self
            .verifier
            .verify_from(token, self.clock.now(), Some(iss))
            .map_err(|e| {
                tracing::debug!(error = %e, "management call with a refused console token");
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

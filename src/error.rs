//! The service layer's error: what a caller did wrong or what failed. The
//! gRPC layer maps it to a `tonic::Status` in one place (`grpc::status`).
//! Denials are not errors: they are [`crate::domain::Decision::Deny`].

use crate::domain::Violations;
use crate::store::StoreError;

/// Errors of the decision pipeline and the management operations.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is malformed; every bad field is named.
    #[error("invalid request")]
    InvalidArgument(Violations),
    /// The named thing does not exist (or belongs to another tenant).
    #[error("{0} not found")]
    NotFound(&'static str),
    #[error("{0} already exists")]
    AlreadyExists(&'static str),
    /// The request is well-formed but the state forbids it (plan key cap,
    /// rotating a revoked key).
    #[error("{0}")]
    FailedPrecondition(String),
    /// Missing or wrong caller credentials where the call needs them.
    #[error("missing or invalid caller credentials")]
    Unauthenticated,
    /// The caller is known but may not do this (another tenant's data, a
    /// role without the right). Nothing changed.
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    /// A console login or token was refused (wrong email or password, a
    /// spent or expired refresh token). Says no more than the message.
    #[error("{0}")]
    BadCredentials(&'static str),
    /// Too many failed logins: retry after this many seconds.
    #[error("too many failed attempts")]
    TooManyAttempts { retry_after_seconds: u64 },
    /// Too much work queued (password hashing): retry after this long.
    #[error("the server is busy")]
    Overloaded { retry_after_seconds: u64 },
    /// The store cannot be reached; retry later. Never turned into a denial.
    #[error("storage is unavailable")]
    Unavailable(String),
    #[error("internal error")]
    Internal(String),
    /// An identity provider's ID token was refused (SignInWithProvider):
    /// which check failed, never the token. Nothing changed.
    #[error("{0}")]
    IdTokenRefused(crate::crypto::jwt::oidc::IdTokenError),
}

impl Error {
    /// A single-field `InvalidArgument`.
    pub fn invalid(field: &str, description: &str) -> Self {
        let mut v = Violations::default();
        v.add(field, description);
        Error::InvalidArgument(v)
    }
}

impl From<Violations> for Error {
    fn from(v: Violations) -> Self {
        Error::InvalidArgument(v)
    }
}

impl From<StoreError> for Error {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound => Error::NotFound("resource"),
            StoreError::AlreadyExists => Error::AlreadyExists("resource"),
            StoreError::KeyCapReached { .. } | StoreError::Precondition(_) => {
                Error::FailedPrecondition(e.to_string())
            }
            StoreError::Unavailable(msg) => Error::Unavailable(msg),
            StoreError::Internal(msg) => Error::Internal(msg),
        }
    }
}

/// Result of service-layer operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;

//! The one table from service errors to gRPC statuses.

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::error::Error;

impl From<Error> for Status {
    fn from(e: Error) -> Self {
        match e {
            Error::InvalidArgument(v) => {
                let summary =
                    v.0.iter()
                        .map(|f| format!("{}: {}", f.field, f.description))
                        .collect::<Vec<_>>()
                        .join("; ");
                let details = ErrorDetails::with_bad_request(
                    v.0.into_iter()
                        .map(|f| tonic_types::FieldViolation::new(f.field, f.description))
                        .collect::<Vec<_>>(),
                );
                Status::with_error_details(Code::InvalidArgument, summary, details)
            }
            Error::NotFound(what) => Status::not_found(format!("{what} not found")),
            Error::AlreadyExists(what) => Status::already_exists(format!("{what} already exists")),
            Error::FailedPrecondition(msg) => Status::failed_precondition(msg),
            Error::Unauthenticated => Status::unauthenticated(
                "this call needs `authorization: Bearer <token>` of a caller that may make it \
                 (operator, console user, or for quota and usage by id the gateway)",
            ),
            Error::PermissionDenied(why) => Status::permission_denied(why),
            Error::BadCredentials(why) => Status::unauthenticated(why),
            Error::TooManyAttempts {
                retry_after_seconds,
            } => Status::with_error_details(
                Code::ResourceExhausted,
                format!("too many failed attempts; retry in {retry_after_seconds} s"),
                ErrorDetails::with_retry_info(Some(std::time::Duration::from_secs(
                    retry_after_seconds,
                ))),
            ),
            Error::Overloaded {
                retry_after_seconds,
            } => Status::with_error_details(
                Code::ResourceExhausted,
                format!("the server is busy; retry in {retry_after_seconds} s"),
                ErrorDetails::with_retry_info(Some(std::time::Duration::from_secs(
                    retry_after_seconds,
                ))),
            ),
            Error::Unavailable(detail) => {
                tracing::warn!(error = %detail, "storage unavailable");
                Status::unavailable("storage is unavailable; retry later")
            }
            Error::Internal(detail) => {
                tracing::error!(error = %detail, "internal error");
                Status::internal("internal error")
            }
            Error::IdTokenRefused(why) => Status::with_error_details(
                Code::Unauthenticated,
                why.to_string(),
                ErrorDetails::with_error_info(
                    why.reason(),
                    "tollgate",
                    std::collections::HashMap::<String, String>::new(),
                ),
            ),
        }
    }
}

//! The management budget: management and console calls share a bounded
//! number of slots and a per-call timeout, so a flood of slow management
//! calls cannot starve the decision path. Decision RPCs (Authenticate,
//! CheckQuota, Envoy Check, health) never take a slot and are never timed
//! out here. A call that finds every slot taken is refused at once with
//! `RESOURCE_EXHAUSTED` (shed, never queued); one that runs past the
//! timeout is stopped with `DEADLINE_EXCEEDED`.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;
use tonic::body::Body;
use tonic::codegen::{http, BoxFuture, Service};
use tonic::server::NamedService;
use tonic::Status;

use crate::access::Rpc;

/// `[management]`: how much management work runs at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ManagementSettings {
    /// Management and console calls in flight at once (≥ 1); more are
    /// refused with RESOURCE_EXHAUSTED.
    pub max_in_flight: usize,
    /// Longest a management or console call may run, in milliseconds (≥ 1).
    pub timeout_ms: u64,
}

impl Default for ManagementSettings {
    fn default() -> Self {
        Self {
            max_in_flight: 64,
            timeout_ms: 10_000,
        }
    }
}

/// The shared slots and timeout.
#[derive(Debug, Clone)]
pub struct Budget {
    slots: Arc<Semaphore>,
    timeout: Duration,
}

impl Budget {
    /// A budget from `settings` (zeros count as 1).
    pub fn new(settings: &ManagementSettings) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(settings.max_in_flight.max(1))),
            timeout: Duration::from_millis(settings.timeout_ms.max(1)),
        }
    }

    /// `service`, its management calls held to this budget.
    pub fn wrap<S>(&self, service: S) -> Budgeted<S> {
        Budgeted {
            inner: service,
            budget: self.clone(),
        }
    }
}

/// A gRPC service whose non-decision calls are held to a [`Budget`].
#[derive(Debug, Clone)]
pub struct Budgeted<S> {
    inner: S,
    budget: Budget,
}

impl<S: NamedService> NamedService for Budgeted<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> Service<http::Request<Body>> for Budgeted<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Infallible>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let decision = Rpc::from_path(request.uri().path()).is_some_and(Rpc::is_decision);
        if decision {
            return Box::pin(self.inner.call(request));
        }
        let Ok(slot) = self.budget.slots.clone().try_acquire_owned() else {
            return Box::pin(async {
                Ok(
                    Status::resource_exhausted(
                        "too many management calls in flight; retry shortly",
                    )
                    .into_http(),
                )
            });
        };
        let call = self.inner.call(request);
        let timeout = self.budget.timeout;
        Box::pin(async move {
            let answer = tokio::time::timeout(timeout, call).await;
            drop(slot);
            match answer {
                Ok(answer) => answer,
                Err(_) => Ok(Status::deadline_exceeded(format!(
                    "the call ran longer than {} ms",
                    timeout.as_millis()
                ))
                .into_http()),
            }
        })
    }
}

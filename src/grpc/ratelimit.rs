//! `envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit`: Envoy's
//! rate-limit service as a thin adapter over [`RateLimits`] (the rules live
//! there). Proto in → [`RlsRequest`] → rules → proto out. A request that
//! names a tenant or key by id needs the gateway or operator token
//! (`authorization: Bearer …`, set by Envoy's `grpc_service.initial_metadata`).

use envoy_types::pb::envoy::config::core::v3::HeaderValue;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::rate_limit::Unit;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::{
    Code, DescriptorStatus, RateLimit,
};
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_server::RateLimitService;
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use envoy_types::pb::google::protobuf::Duration as PbDuration;
use tonic::{Request, Response, Status};

use super::caller::CallerGuard;
use crate::access::Rpc;
use crate::domain::LimitPeriod;
use crate::ratelimit::{
    speaks_for_itself, DescriptorAnswer, RateLimits, RlsAnswer, RlsDescriptor, RlsRequest,
};

pub use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_server::RateLimitServiceServer;

/// The rate-limit service.
pub struct EnvoyRateLimit {
    rules: RateLimits,
    guard: CallerGuard,
}

impl EnvoyRateLimit {
    /// An adapter over `rules`, admitting callers with `guard`.
    pub fn new(rules: RateLimits, guard: CallerGuard) -> Self {
        Self { rules, guard }
    }
}

#[tonic::async_trait]
impl RateLimitService for EnvoyRateLimit {
    #[tracing::instrument(skip_all, fields(domain, descriptors))]
    async fn should_rate_limit(
        &self,
        request: Request<RateLimitRequest>,
    ) -> Result<Response<RateLimitResponse>, Status> {
        let (metadata, _, message) = request.into_parts();
        let input = RlsRequest {
            domain: &message.domain,
            hits_addend: message.hits_addend,
            descriptors: message
                .descriptors
                .iter()
                .map(|d| RlsDescriptor {
                    entries: d
                        .entries
                        .iter()
                        .map(|e| (e.key.as_str(), e.value.as_str()))
                        .collect(),
                    // Refilling a budget is not supported: such a
                    // descriptor is only checked.
                    hits_addend: if d.is_negative_hits {
                        Some(0)
                    } else {
                        d.hits_addend.as_ref().map(|h| h.value)
                    },
                })
                .collect(),
        };
        let span = tracing::Span::current();
        span.record("domain", input.domain);
        span.record("descriptors", input.descriptors.len());
        let own = speaks_for_itself(self.rules.config(), &input);
        self.guard
            .admit(Rpc::ShouldRateLimit, &metadata, own)
            .await?;
        let answer = self.rules.should_rate_limit(&input).await?;
        Ok(Response::new(response(answer)))
    }
}

fn response(answer: RlsAnswer) -> RateLimitResponse {
    RateLimitResponse {
        overall_code: code(answer.over_limit) as i32,
        statuses: answer.statuses.into_iter().map(status).collect(),
        response_headers_to_add: answer
            .headers
            .into_iter()
            .map(|(key, value)| HeaderValue {
                key: key.to_string(),
                value,
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

fn code(over_limit: bool) -> Code {
    if over_limit {
        Code::OverLimit
    } else {
        Code::Ok
    }
}

fn status(d: DescriptorAnswer) -> DescriptorStatus {
    DescriptorStatus {
        code: code(d.over_limit) as i32,
        current_limit: d.limit.map(|l| RateLimit {
            name: l.name,
            requests_per_unit: l.requests_per_unit,
            unit: unit(l.unit) as i32,
        }),
        limit_remaining: d.remaining,
        duration_until_reset: d.until_reset.map(|t| PbDuration {
            seconds: i64::try_from(t.as_secs()).unwrap_or(i64::MAX),
            nanos: i32::try_from(t.subsec_nanos()).unwrap_or(0),
        }),
        ..Default::default()
    }
}

fn unit(p: LimitPeriod) -> Unit {
    match p {
        LimitPeriod::Second => Unit::Second,
        LimitPeriod::Minute => Unit::Minute,
        LimitPeriod::Hour => Unit::Hour,
        LimitPeriod::Day => Unit::Day,
        LimitPeriod::Month => Unit::Month,
    }
}

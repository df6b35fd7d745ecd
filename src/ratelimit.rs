//! Envoy's rate-limit service (`ShouldRateLimit`) as rules over Tollgate's
//! own limits: each descriptor is classified by the profile
//! ([`RateLimitConfig::classify`]) and checked with the limiter that
//! already counts keys and tenants (GCRA cells shared across replicas, quota
//! leases). No tonic: `grpc/ratelimit.rs` converts protos to [`RlsRequest`]
//! and [`RlsAnswer`] back.
//!
//! - `hits_addend` (the request's, else 1; a descriptor's own overrides it)
//!   is the cost. A cost of 0 checks without consuming.
//! - All or nothing: when one descriptor is over its limit, the units the
//!   profile descriptors took are given back and the tenant/key descriptors
//!   after it only report (a tenant/key descriptor before it has consumed;
//!   one of those per request is the common case).
//! - Shadow mode (a profile descriptor's `shadow_mode`, or a plan's
//!   `shadow`): the descriptor answers OK and the would-be denial is counted
//!   in `tollgate_ratelimit_descriptors_total{result="shadow_over_limit"}`.
//! - A descriptor Tollgate does not limit (no match, an unknown or malformed
//!   tenant, key or credential, an inactive subscription: ext_authz's
//!   business) answers OK without a limit, as envoyproxy/ratelimit does for
//!   unknown descriptors. Only an outage is an error, so Envoy's
//!   `failure_mode_deny` decides.

use std::sync::Arc;
use std::time::Duration;

use crate::authz::{Authenticator, QuotaSubject};
use crate::clock::Clock;
use crate::domain::ratelimit::{DescriptorLimit, Matched, RateLimitConfig, Target};
use crate::domain::{Decision, LimitPeriod, LimitStatus, Reason, Verdict};
use crate::error::{Error, Result};
use crate::limits::buckets::{BucketId, BucketRate, BucketTaken};
use crate::telemetry;

/// One `ShouldRateLimit` request, borrowed from the proto.
#[derive(Debug, Default)]
pub struct RlsRequest<'a> {
    pub domain: &'a str,
    pub descriptors: Vec<RlsDescriptor<'a>>,
    /// The request's `hits_addend` (0: 1).
    pub hits_addend: u32,
}

/// One descriptor. Its values may hold a credential: never logged.
pub struct RlsDescriptor<'a> {
    pub entries: Vec<(&'a str, &'a str)>,
    /// The descriptor's own `hits_addend`, overriding the request's.
    pub hits_addend: Option<u64>,
}

impl std::fmt::Debug for RlsDescriptor<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let keys: Vec<&str> = self.entries.iter().map(|(k, _)| *k).collect();
        f.debug_struct("RlsDescriptor")
            .field("keys", &keys)
            .field("hits_addend", &self.hits_addend)
            .finish_non_exhaustive()
    }
}

/// The limit a descriptor was held to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CurrentLimit {
    pub name: String,
    pub requests_per_unit: u32,
    /// second, minute, hour, day or month.
    pub unit: LimitPeriod,
}

/// One descriptor's answer.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DescriptorAnswer {
    pub over_limit: bool,
    /// `None`: not limited (unknown descriptor, `unlimited`).
    pub limit: Option<CurrentLimit>,
    pub remaining: u32,
    pub until_reset: Option<Duration>,
}

/// The answer to one `ShouldRateLimit`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RlsAnswer {
    pub over_limit: bool,
    /// In request order.
    pub statuses: Vec<DescriptorAnswer>,
    /// `RateLimit-Limit`, `-Remaining`, `-Reset` of the descriptor with the
    /// least remaining (when the profile asks for them and a limit applied).
    pub headers: Vec<(&'static str, String)>,
}

/// Whether a request may be answered without an identified caller: every
/// descriptor speaks for itself ([`Target::speaks_for_itself`]). A profile
/// descriptor's values (`remote_address`, a header) are the gateway's
/// claims: an anonymous caller could spend anyone's bucket with them, or
/// flood the cells with made-up values.
pub fn speaks_for_itself(config: &RateLimitConfig, request: &RlsRequest<'_>) -> bool {
    request.descriptors.iter().all(|d| {
        config
            .classify(request.domain, &d.entries)
            .speaks_for_itself()
    })
}

/// The rate-limit service's rules.
pub struct RateLimits {
    authz: Arc<Authenticator>,
    clock: Clock,
}

enum Pending<'c> {
    Done(DescriptorAnswer),
    Subject(QuotaSubject<'c>, u64, &'static str),
}

fn count(kind: &'static str, result: &'static str) {
    metrics::counter!(telemetry::RATELIMIT_DESCRIPTORS, "kind" => kind, "result" => result)
        .increment(1);
}

impl RateLimits {
    /// Rules deciding with `authz`'s profile and limiter.
    pub fn new(authz: Arc<Authenticator>, clock: Clock) -> Self {
        Self { authz, clock }
    }

    /// The profile's descriptor configuration.
    pub fn config(&self) -> &RateLimitConfig {
        &self.authz.profile().ratelimit
    }

    /// Checks (and consumes) every descriptor of `request`.
    pub async fn should_rate_limit(&self, request: &RlsRequest<'_>) -> Result<RlsAnswer> {
        let mut v = crate::domain::Violations::default();
        if request.domain.is_empty() {
            v.add("domain", "must not be empty");
        }
        if request.descriptors.is_empty() {
            v.add("descriptors", "must not be empty");
        }
        v.into_result()?;
        let config = self.config();
        let default_hits = u64::from(request.hits_addend.max(1));
        let limiter = self.authz.limiter();
        let mut taken: Vec<BucketTaken> = Vec::new();
        let mut over = false;
        let mut pending = Vec::with_capacity(request.descriptors.len());

        // Profile descriptors first: they can be given back.
        for d in &request.descriptors {
            let hits = d.hits_addend.unwrap_or(default_hits);
            let target = config.classify(request.domain, &d.entries);
            let answer = match target {
                Target::Tenant(id) => Pending::Subject(QuotaSubject::Tenant(id), hits, "tenant"),
                Target::Key(id) => Pending::Subject(QuotaSubject::Key(id), hits, "key"),
                Target::Credential(k) => {
                    Pending::Subject(QuotaSubject::Credential(k), hits, "credential")
                }
                Target::Generic(None) => {
                    count("generic", "no_limit");
                    Pending::Done(DescriptorAnswer::default())
                }
                Target::Generic(Some(Matched {
                    limit: DescriptorLimit::Unlimited,
                    ..
                })) => {
                    count("generic", "unlimited");
                    Pending::Done(DescriptorAnswer {
                        remaining: u32::MAX,
                        ..Default::default()
                    })
                }
                Target::Generic(Some(Matched {
                    limit:
                        DescriptorLimit::Rate {
                            requests_per_unit,
                            unit,
                            name,
                        },
                    shadow,
                })) => {
                    let id = BucketId::of(
                        std::iter::once(request.domain)
                            .chain(d.entries.iter().flat_map(|(k, v)| [*k, *v])),
                    );
                    let rate = BucketRate {
                        limit: u64::from(*requests_per_unit),
                        period: *unit,
                    };
                    let o = limiter
                        .check_bucket(&id, rate, hits, hits > 0)
                        .ok_or_else(|| Error::Internal("a descriptor rate is not a rate".into()))?;
                    taken.extend(o.taken);
                    let denied = !o.allowed;
                    let result = match (denied, shadow) {
                        (false, _) => "ok",
                        (true, true) => "shadow_over_limit",
                        (true, false) => "over_limit",
                    };
                    count("generic", result);
                    over |= denied && !shadow;
                    Pending::Done(DescriptorAnswer {
                        over_limit: denied && !shadow,
                        limit: Some(CurrentLimit {
                            // Only a declared name: Envoy repeats it in
                            // X-RateLimit-Limit, and values may be private.
                            name: name.clone().unwrap_or_default(),
                            requests_per_unit: *requests_per_unit,
                            unit: *unit,
                        }),
                        remaining: clamp(o.remaining),
                        until_reset: Some(Duration::from_nanos(o.reset_ns)),
                    })
                }
            };
            pending.push(answer);
        }

        // Then Tollgate's own subjects, consuming only while nothing refused.
        let mut statuses = Vec::with_capacity(pending.len());
        for p in pending {
            let answer = match p {
                Pending::Done(a) => a,
                Pending::Subject(subject, hits, kind) => {
                    let (answer, result) = self.check_subject(subject, hits, over).await?;
                    count(kind, result);
                    over |= answer.over_limit;
                    answer
                }
            };
            statuses.push(answer);
        }
        if over {
            for t in taken {
                limiter.refund_bucket(t);
            }
        }
        let headers = if config.response_headers {
            headers(&statuses)
        } else {
            Vec::new()
        };
        Ok(RlsAnswer {
            over_limit: over,
            statuses,
            headers,
        })
    }

    /// One tenant, key or credential descriptor (`report_only`: another
    /// descriptor already refused, so nothing is consumed).
    async fn check_subject(
        &self,
        subject: QuotaSubject<'_>,
        hits: u64,
        report_only: bool,
    ) -> Result<(DescriptorAnswer, &'static str)> {
        let dry_run = report_only || hits == 0;
        let cost = u32::try_from(hits).unwrap_or(u32::MAX);
        let answer = match self.authz.check_quota(subject, cost, dry_run).await {
            Ok(a) => a,
            // More than the tightest limit could ever admit: over the limit.
            Err(Error::InvalidArgument(v)) if v.0.iter().any(|f| f.field == "cost") => {
                let a = self.authz.check_quota(subject, 1, true).await?;
                let mut d = self.descriptor(&a.verdict);
                d.over_limit = true;
                d.remaining = 0;
                return Ok((d, "over_limit"));
            }
            // Not a subject Tollgate knows (or a malformed id): not limited.
            Err(Error::NotFound(_) | Error::InvalidArgument(_)) => {
                return Ok((DescriptorAnswer::default(), "no_limit"))
            }
            Err(e) => return Err(e),
        };
        let verdict = &answer.verdict;
        let result = match (&verdict.decision, verdict.shadow_denial) {
            (Decision::Allow(_), Some(_)) => "shadow_over_limit",
            (Decision::Allow(_), None) => "ok",
            (Decision::Deny(Reason::RateLimited | Reason::QuotaExhausted), _) => "over_limit",
            // Revoked, unknown, inactive…: ext_authz refuses those.
            (Decision::Deny(_), _) => return Ok((DescriptorAnswer::default(), "no_limit")),
        };
        let mut d = self.descriptor(verdict);
        d.over_limit = result == "over_limit";
        Ok((d, result))
    }

    /// The status of the tightest limit in `verdict` (none: not limited).
    fn descriptor(&self, verdict: &Verdict) -> DescriptorAnswer {
        let Some(s) = verdict.limits.first() else {
            return DescriptorAnswer::default();
        };
        let now = self.clock.now();
        DescriptorAnswer {
            over_limit: false,
            limit: Some(current(s)),
            remaining: clamp(s.remaining),
            until_reset: Some((s.reset_at - now).to_std().unwrap_or_default()),
        }
    }
}

fn current(s: &LimitStatus) -> CurrentLimit {
    CurrentLimit {
        name: s.name.clone(),
        requests_per_unit: clamp(s.limit),
        unit: LimitPeriod::parse(s.period).unwrap_or(LimitPeriod::Second),
    }
}

fn clamp(n: u64) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// envoyproxy/ratelimit's headers: a descriptor over its limit speaks (the
/// first one), else the limited descriptor with the least remaining;
/// `RateLimit-Reset` in whole seconds, rounded up.
fn headers(statuses: &[DescriptorAnswer]) -> Vec<(&'static str, String)> {
    let Some(tightest) = statuses
        .iter()
        .filter(|s| s.limit.is_some())
        .min_by_key(|s| (!s.over_limit, s.remaining))
    else {
        return Vec::new();
    };
    let limit = tightest.limit.as_ref().map_or(0, |l| l.requests_per_unit);
    let reset = tightest.until_reset.unwrap_or_default();
    let reset = reset.as_secs() + u64::from(reset.subsec_nanos() > 0);
    vec![
        ("RateLimit-Limit", limit.to_string()),
        ("RateLimit-Remaining", tightest.remaining.to_string()),
        ("RateLimit-Reset", reset.to_string()),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limited(per_unit: u32, remaining: u32, over_limit: bool) -> DescriptorAnswer {
        DescriptorAnswer {
            over_limit,
            limit: Some(CurrentLimit {
                name: String::new(),
                requests_per_unit: per_unit,
                unit: LimitPeriod::Minute,
            }),
            remaining,
            until_reset: Some(Duration::from_millis(1500)),
        }
    }

    #[test]
    fn the_descriptor_over_its_limit_speaks_in_the_headers_else_the_least_remaining() {
        // A shadow-mode descriptor with nothing left comes first; the one
        // over its limit is what the client must hear about.
        let statuses = [
            DescriptorAnswer::default(),
            limited(1, 0, false),
            limited(5, 0, true),
        ];
        assert_eq!(
            headers(&statuses),
            [
                ("RateLimit-Limit", "5".to_string()),
                ("RateLimit-Remaining", "0".to_string()),
                ("RateLimit-Reset", "2".to_string()),
            ]
        );
        let h = headers(&[limited(10, 7, false), limited(60, 3, false)]);
        assert_eq!(h[0], ("RateLimit-Limit", "60".to_string()));
        assert!(headers(&[DescriptorAnswer::default()]).is_empty());
    }
}

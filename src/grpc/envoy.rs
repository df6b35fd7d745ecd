//! `envoy.service.auth.v3.Authorization/Check`: Envoy's ext_authz as a thin
//! adapter over [`Authenticator::decide`] (DESIGN.md §6). Proto in →
//! [`AuthInput`] → decide → proto out; no rules live here.
//!
//! Per-route policy comes from the route's `context_extensions`: `surface`,
//! `scopes` (comma-separated, all required), `cost` (default 1) and `limits`
//! (`off` → cost 0). A denial is an answer (OK with a google.rpc status and
//! the product's HTTP status, headers and body); an outage or a malformed
//! policy is a gRPC error, so Envoy's `status_on_error` applies and nothing
//! is ever allowed by accident.

use std::collections::HashMap;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use envoy_types::pb::envoy::config::core::v3::header_value_option::HeaderAppendAction;
use envoy_types::pb::envoy::config::core::v3::{HeaderValue, HeaderValueOption};
use envoy_types::pb::envoy::r#type::v3::HttpStatus;
use envoy_types::pb::envoy::service::auth::v3::attribute_context::HttpRequest;
use envoy_types::pb::envoy::service::auth::v3::authorization_server::Authorization;
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use envoy_types::pb::envoy::service::auth::v3::{
    CheckRequest, CheckResponse, DeniedHttpResponse, OkHttpResponse,
};
use envoy_types::pb::google::protobuf::{value::Kind, Struct, Value};
use envoy_types::pb::google::rpc;
use serde::{Deserialize, Deserializer, Serialize};
use tonic::{Code, Request, Response, Status};

use crate::authz::{AuthInput, Authenticator};
use crate::clock::Clock;
use crate::domain::validate::check_scopes;
use crate::domain::{
    CredentialType, Decision, LimitStatus, Principal, Reason, Verdict, Violations,
};
use crate::error::Error;
use crate::profile::{BearerPolicy, Profile, Surface};

pub use envoy_types::pb::envoy::service::auth::v3::authorization_server::AuthorizationServer;

/// Settings of the ext_authz adapter (`[envoy]` in the config file,
/// `TOLLGATE_ENVOY__HEADER_PREFIX` in the environment).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EnvoySettings {
    /// Prefix of the upstream headers set on an allow: `x-tollgate-` gives
    /// `x-tollgate-tenant-id`, `x-tollgate-key-id`, … Lower-case `[a-z0-9-]`.
    #[serde(deserialize_with = "header_prefix")]
    pub header_prefix: String,
}

impl Default for EnvoySettings {
    fn default() -> Self {
        Self {
            header_prefix: "x-tollgate-".into(),
        }
    }
}

fn header_prefix<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let p = String::deserialize(d)?;
    let ok = !p.is_empty()
        && p.bytes()
            .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'-'));
    ok.then_some(p)
        .ok_or_else(|| serde::de::Error::custom("must be lower-case [a-z0-9-], e.g. `x-tollgate-`"))
}

/// The ext_authz `Authorization` service.
pub struct EnvoyAuthz {
    authz: Arc<Authenticator>,
    clock: Clock,
    header_prefix: String,
}

impl EnvoyAuthz {
    /// An adapter deciding with `authz`; `clock` turns limit resets into
    /// seconds.
    pub fn new(authz: Arc<Authenticator>, clock: Clock, settings: &EnvoySettings) -> Self {
        Self {
            authz,
            clock,
            header_prefix: settings.header_prefix.clone(),
        }
    }
}

#[tonic::async_trait]
impl Authorization for EnvoyAuthz {
    #[tracing::instrument(skip_all, fields(surface, request_id))]
    async fn check(
        &self,
        request: Request<CheckRequest>,
    ) -> Result<Response<CheckResponse>, Status> {
        let attributes = request.into_inner().attributes.unwrap_or_default();
        let http = attributes.request.and_then(|r| r.http).unwrap_or_default();
        let profile = self.authz.profile();
        let (policy, surface) = route_policy(&attributes.context_extensions, profile)?;
        let request_id = request_id(&http);
        let span = tracing::Span::current();
        span.record("surface", policy.surface);
        span.record("request_id", request_id.as_str());

        let input = AuthInput {
            headers: Some(&http.headers),
            surface: policy.surface,
            required_scopes: &policy.scopes,
            ..AuthInput::default()
        };
        // An outage is `Err` → UNAVAILABLE, never an allow.
        let verdict = self.authz.decide(input, policy.cost).await?;
        let now = self.clock.now();
        let response = match &verdict.decision {
            Decision::Allow(principal) => {
                let removed = credential_headers(profile, surface, &http.headers);
                ok_response(&self.header_prefix, principal, &verdict, removed, now)
            }
            Decision::Deny(reason) => {
                tracing::debug!(reason = reason.as_str(), "denied");
                denied_response(profile, *reason, &verdict, request_id, now)
            }
        };
        Ok(Response::new(response))
    }
}

/// A route's policy, read from its `context_extensions`.
#[derive(Debug, PartialEq, Eq)]
struct RoutePolicy<'a> {
    surface: &'a str,
    scopes: Vec<String>,
    cost: u32,
}

/// Reads the policy; anything malformed (unknown surface or key, bad cost)
/// is `InvalidArgument` naming the key: a typo must never loosen a route.
fn route_policy<'a, 'p>(
    ext: &'a HashMap<String, String>,
    profile: &'p Profile,
) -> Result<(RoutePolicy<'a>, &'p Surface), Error> {
    let mut v = Violations::default();
    let mut policy = RoutePolicy {
        surface: "",
        scopes: Vec::new(),
        cost: 1,
    };
    let mut limits = true;
    for (key, value) in ext {
        let value = value.trim();
        match key.as_str() {
            "surface" => policy.surface = value,
            "scopes" => {
                policy.scopes = value
                    .split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .collect();
                check_scopes("context_extensions.scopes", &policy.scopes, &mut v);
            }
            "cost" => match value.parse() {
                Ok(cost) => policy.cost = cost,
                Err(_) => v.add(
                    "context_extensions.cost",
                    "must be an integer 0..=4294967295",
                ),
            },
            "limits" => match value {
                "on" => limits = true,
                "off" => limits = false,
                _ => v.add("context_extensions.limits", "must be `on` or `off`"),
            },
            other => v.add(
                format!("context_extensions.{other}"),
                "is not a Tollgate policy key (surface, scopes, cost, limits)",
            ),
        }
    }
    let surface = profile.surface(policy.surface);
    if surface.is_none() {
        v.add(
            "context_extensions.surface",
            "names no surface of this deployment's profile",
        );
    }
    v.into_result()?;
    if !limits {
        policy.cost = 0;
    }
    Ok((policy, surface.expect("checked above")))
}

/// Envoy's `x-request-id` (what the upstream and its logs see), else the
/// stream id Envoy sends as `request.http.id`, else a new UUID.
fn request_id(http: &HttpRequest) -> String {
    let usable = |v: &&str| (1..=128).contains(&v.len()) && v.bytes().all(|b| b.is_ascii_graphic());
    http.headers
        .get("x-request-id")
        .map(String::as_str)
        .filter(usable)
        .or_else(|| Some(http.id.as_str()).filter(usable))
        .map_or_else(|| uuid::Uuid::new_v4().to_string(), str::to_owned)
}

/// Headers that may carry the secret: every API-key header of the profile,
/// and `authorization` when it carried the credential or holds something
/// shaped like one of this product's keys. Removed so no secret reaches
/// the upstream.
fn credential_headers(
    profile: &Profile,
    surface: &Surface,
    headers: &HashMap<String, String>,
) -> Vec<String> {
    let mut removed: Vec<String> = profile
        .surfaces
        .values()
        .flat_map(|s| s.api_key_headers.iter().cloned())
        .collect();
    removed.sort_unstable();
    removed.dedup();
    let present = |name: &str| headers.get(name).is_some_and(|v| !v.trim().is_empty());
    if let Some(auth) = headers.get("authorization") {
        let by_key_header = surface.api_key_headers.iter().any(|h| present(h));
        let carried = surface.bearer != BearerPolicy::None && !by_key_header;
        let key_prefix = format!("{}_", profile.key_format.prefix());
        let looks_like_key = auth.split_whitespace().any(|w| w.starts_with(&key_prefix));
        if carried || looks_like_key {
            removed.push("authorization".into());
        }
    }
    removed
}

fn header(key: &str, value: String) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(HeaderValue {
            key: key.to_owned(),
            value,
            ..HeaderValue::default()
        }),
        // Envoy's default appends: a client could then smuggle its own
        // `x-tollgate-tenant-id`. Ours replaces whatever came in.
        append_action: HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
        ..HeaderValueOption::default()
    }
}

/// The limit closest to running out: least remaining, then latest reset.
fn tightest(limits: &[LimitStatus]) -> Option<&LimitStatus> {
    limits
        .iter()
        .min_by_key(|l| (l.remaining, std::cmp::Reverse(l.reset_at)))
}

/// `limit`, `remaining` and seconds to `reset` (rounded up) of the tightest
/// limit, for the `RateLimit-*` headers and the metadata.
fn limit_facts(limits: &[LimitStatus], now: DateTime<Utc>) -> Vec<(&'static str, u64)> {
    let Some(l) = tightest(limits) else {
        return Vec::new();
    };
    let ms = u64::try_from((l.reset_at - now).num_milliseconds()).unwrap_or(0);
    vec![
        ("limit", l.limit),
        ("remaining", l.remaining),
        ("reset", ms.div_ceil(1000)),
    ]
}

fn rate_limit_headers(facts: &[(&str, u64)]) -> Vec<HeaderValueOption> {
    let header = |(name, n): &(&str, u64)| header(&format!("ratelimit-{name}"), n.to_string());
    facts.iter().map(header).collect()
}

fn text(s: impl Into<String>) -> Value {
    Value {
        kind: Some(Kind::StringValue(s.into())),
    }
}

/// Dynamic metadata (namespace `envoy.filters.http.ext_authz`), for access
/// logs and later filters.
fn metadata<'a>(
    facts: impl IntoIterator<Item = (&'a str, String)>,
    limits: &[(&str, u64)],
    retry_after: u32,
) -> Option<Struct> {
    let number = |n: f64| Value {
        kind: Some(Kind::NumberValue(n)),
    };
    let mut fields: HashMap<String, Value> = facts
        .into_iter()
        .map(|(k, v)| (k.replace('-', "_"), text(v)))
        .collect();
    for (name, n) in limits {
        fields.insert(format!("ratelimit_{name}"), number(*n as f64));
    }
    if retry_after > 0 {
        fields.insert("retry_after".into(), number(retry_after.into()));
    }
    Some(Struct { fields })
}

/// OK: the principal as upstream headers (empty ones removed, so a client
/// cannot supply them), the credential headers removed, `RateLimit-*` on the
/// response, and the same facts as dynamic metadata.
fn ok_response(
    prefix: &str,
    p: &Principal,
    verdict: &Verdict,
    mut headers_to_remove: Vec<String>,
    now: DateTime<Utc>,
) -> CheckResponse {
    let limits = limit_facts(&verdict.limits, now);
    let remaining = tightest(&verdict.limits).map(|l| l.remaining.to_string());
    let facts = [
        ("tenant-id", p.tenant_id.to_string()),
        (
            "key-id",
            p.key_id.map(|id| id.to_string()).unwrap_or_default(),
        ),
        ("plan", p.plan.clone()),
        ("environment", p.environment.clone()),
        ("scopes", p.scopes.join(",")),
        ("subject", p.subject.clone()),
        ("ratelimit-remaining", remaining.unwrap_or_default()),
    ];
    let mut headers = Vec::with_capacity(facts.len());
    for (name, value) in &facts {
        let name = format!("{prefix}{name}");
        if value.is_empty() {
            headers_to_remove.push(name);
        } else {
            headers.push(header(&name, value.clone()));
        }
    }
    let credential_type = match p.credential_type {
        CredentialType::ApiKey => "api_key",
        CredentialType::Jwt => "jwt",
    };
    let shadow = verdict
        .shadow_denial
        .map(|r| r.as_str())
        .unwrap_or_default();
    let facts = facts
        .into_iter()
        .filter(|(name, _)| !name.starts_with("ratelimit"))
        .chain([
            ("decision", "allow".into()),
            ("credential_type", credential_type.into()),
            ("shadow_denial", shadow.into()),
        ])
        .filter(|(_, v)| !v.is_empty());
    CheckResponse {
        status: rpc_status(Code::Ok, ""),
        dynamic_metadata: metadata(facts, &limits, verdict.retry_after_seconds),
        http_response: Some(HttpResponse::OkResponse(OkHttpResponse {
            headers,
            headers_to_remove,
            response_headers_to_add: rate_limit_headers(&limits),
            ..OkHttpResponse::default()
        })),
    }
}

fn rpc_status(code: Code, message: &str) -> Option<rpc::Status> {
    Some(rpc::Status {
        code: code as i32,
        message: message.to_owned(),
        details: Vec::new(),
    })
}

/// Denied: the product's status and JSON body, `Retry-After` and
/// `RateLimit-*` when limits speak, and the request id to quote to support.
fn denied_response(
    profile: &Profile,
    reason: Reason,
    verdict: &Verdict,
    request_id: String,
    now: DateTime<Utc>,
) -> CheckResponse {
    let spec = profile.denial(reason);
    let mut headers = vec![
        header("content-type", "application/json".into()),
        header("x-request-id", request_id.clone()),
    ];
    if spec.http_status == 429 || verdict.retry_after_seconds > 0 {
        headers.push(header(
            "retry-after",
            verdict.retry_after_seconds.to_string(),
        ));
    }
    let limits = limit_facts(&verdict.limits, now);
    headers.extend(rate_limit_headers(&limits));
    let facts = [
        ("decision", "deny".to_owned()),
        ("reason", reason.as_str().to_owned()),
        ("code", spec.code.clone()),
        ("http_status", spec.http_status.to_string()),
        ("request_id", request_id),
    ];
    CheckResponse {
        // Inside the answer, not a gRPC error: who you are vs. what you may do.
        status: rpc_status(
            match spec.http_status {
                401 => Code::Unauthenticated,
                _ => Code::PermissionDenied,
            },
            reason.as_str(),
        ),
        dynamic_metadata: metadata(facts, &limits, verdict.retry_after_seconds),
        http_response: Some(HttpResponse::DeniedResponse(DeniedHttpResponse {
            status: Some(HttpStatus {
                code: i32::from(spec.http_status),
            }),
            headers,
            body: profile.denial_body(reason),
        })),
    }
}

#[cfg(test)]
mod tests;

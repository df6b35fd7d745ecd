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
use envoy_types::pb::google::protobuf::{value::Kind, ListValue, Struct, Value};
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
    let prefix = String::deserialize(d)?;
    let ok = !prefix.is_empty()
        && prefix
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(prefix)
    } else {
        Err(serde::de::Error::custom(
            "must be lower-case [a-z0-9-], e.g. `x-tollgate-`",
        ))
    }
}

/// The upstream header names, built once from the prefix.
#[derive(Debug, Clone)]
struct HeaderNames {
    tenant_id: String,
    key_id: String,
    plan: String,
    environment: String,
    scopes: String,
    subject: String,
    ratelimit_remaining: String,
}

impl HeaderNames {
    fn new(prefix: &str) -> Self {
        let name = |s: &str| format!("{prefix}{s}");
        Self {
            tenant_id: name("tenant-id"),
            key_id: name("key-id"),
            plan: name("plan"),
            environment: name("environment"),
            scopes: name("scopes"),
            subject: name("subject"),
            ratelimit_remaining: name("ratelimit-remaining"),
        }
    }
}

/// The ext_authz `Authorization` service.
pub struct EnvoyAuthz {
    authz: Arc<Authenticator>,
    clock: Clock,
    names: HeaderNames,
}

impl EnvoyAuthz {
    /// An adapter deciding with `authz`; `clock` turns limit resets into
    /// seconds.
    pub fn new(authz: Arc<Authenticator>, clock: Clock, settings: &EnvoySettings) -> Self {
        Self {
            authz,
            clock,
            names: HeaderNames::new(&settings.header_prefix),
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
                ok_response(&self.names, principal, &verdict, removed, now)
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

/// Headers that may carry the secret: the surface's API-key headers, and
/// `authorization` when it carried the credential or holds something shaped
/// like one of this product's keys. Removed so no secret reaches upstream.
fn credential_headers(
    profile: &Profile,
    surface: &Surface,
    headers: &HashMap<String, String>,
) -> Vec<String> {
    let mut removed = surface.api_key_headers.clone();
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

/// `RateLimit-Limit`, `-Remaining` and `-Reset` (seconds, rounded up) of the
/// tightest limit; none when no limit applied.
fn rate_limit_headers(limits: &[LimitStatus], now: DateTime<Utc>) -> Vec<HeaderValueOption> {
    let Some(l) = tightest(limits) else {
        return Vec::new();
    };
    let ms = (l.reset_at - now).num_milliseconds().max(0);
    let reset = (ms + 999) / 1000;
    vec![
        header("ratelimit-limit", l.limit.to_string()),
        header("ratelimit-remaining", l.remaining.to_string()),
        header("ratelimit-reset", reset.to_string()),
    ]
}

fn rpc_status(code: Code, message: &str) -> Option<rpc::Status> {
    Some(rpc::Status {
        code: code as i32,
        message: message.to_owned(),
        details: Vec::new(),
    })
}

fn text(s: impl Into<String>) -> Value {
    Value {
        kind: Some(Kind::StringValue(s.into())),
    }
}

fn number(n: impl Into<f64>) -> Value {
    Value {
        kind: Some(Kind::NumberValue(n.into())),
    }
}

/// The limit facts for `dynamic_metadata`.
fn limit_fields(fields: &mut HashMap<String, Value>, v: &Verdict, now: DateTime<Utc>) {
    if let Some(l) = tightest(&v.limits) {
        let reset = ((l.reset_at - now).num_milliseconds().max(0) + 999) / 1000;
        fields.insert("ratelimit_limit".into(), number(l.limit as f64));
        fields.insert("ratelimit_remaining".into(), number(l.remaining as f64));
        fields.insert("ratelimit_reset".into(), number(reset as f64));
    }
    if v.retry_after_seconds > 0 {
        fields.insert("retry_after".into(), number(v.retry_after_seconds));
    }
}

/// OK: the principal as upstream headers (empty ones removed, so a client
/// cannot supply them), the credential headers removed, `RateLimit-*` on the
/// response, and the same facts as dynamic metadata.
fn ok_response(
    names: &HeaderNames,
    p: &Principal,
    verdict: &Verdict,
    mut headers_to_remove: Vec<String>,
    now: DateTime<Utc>,
) -> CheckResponse {
    let remaining = tightest(&verdict.limits).map(|l| l.remaining.to_string());
    let key_id = p.key_id.map(|id| id.to_string());
    let facts = [
        (&names.tenant_id, Some(p.tenant_id.to_string())),
        (&names.key_id, key_id.clone()),
        (&names.plan, Some(p.plan.clone())),
        (&names.environment, Some(p.environment.clone())),
        (&names.scopes, Some(p.scopes.join(","))),
        (&names.subject, Some(p.subject.clone())),
        (&names.ratelimit_remaining, remaining),
    ];
    let mut headers = Vec::with_capacity(facts.len());
    for (name, value) in facts {
        match value.filter(|v| !v.is_empty()) {
            Some(value) => headers.push(header(name, value)),
            None => headers_to_remove.push(name.clone()),
        }
    }

    let mut fields = HashMap::from([
        ("decision".into(), text("allow")),
        ("tenant_id".into(), text(p.tenant_id.as_str())),
        ("plan".into(), text(p.plan.as_str())),
        ("environment".into(), text(p.environment.as_str())),
        ("subject".into(), text(p.subject.as_str())),
        (
            "credential_type".into(),
            text(match p.credential_type {
                CredentialType::ApiKey => "api_key",
                CredentialType::Jwt => "jwt",
            }),
        ),
        (
            "scopes".into(),
            Value {
                kind: Some(Kind::ListValue(ListValue {
                    values: p.scopes.iter().map(|s| text(s.as_str())).collect(),
                })),
            },
        ),
    ]);
    if let Some(id) = key_id {
        fields.insert("key_id".into(), text(id));
    }
    if let Some(r) = verdict.shadow_denial {
        fields.insert("shadow_denial".into(), text(r.as_str()));
    }
    limit_fields(&mut fields, verdict, now);

    CheckResponse {
        status: rpc_status(Code::Ok, ""),
        dynamic_metadata: Some(Struct { fields }),
        http_response: Some(HttpResponse::OkResponse(OkHttpResponse {
            headers,
            headers_to_remove,
            response_headers_to_add: rate_limit_headers(&verdict.limits, now),
            ..OkHttpResponse::default()
        })),
    }
}

/// The gRPC code inside a denial: who you are vs. what you may do.
fn deny_code(reason: Reason) -> Code {
    match reason {
        Reason::CredentialMissing
        | Reason::CredentialMalformed
        | Reason::KeyUnknown
        | Reason::KeyExpired
        | Reason::KeyRevoked
        | Reason::TokenInvalid
        | Reason::TokenExpired
        | Reason::WrongCredentialForSurface => Code::Unauthenticated,
        Reason::ScopeMissing
        | Reason::EnvironmentForbidden
        | Reason::SubscriptionInactive
        | Reason::RateLimited
        | Reason::QuotaExhausted => Code::PermissionDenied,
    }
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
    headers.extend(rate_limit_headers(&verdict.limits, now));

    let mut fields = HashMap::from([
        ("decision".into(), text("deny")),
        ("reason".into(), text(reason.as_str())),
        ("code".into(), text(spec.code.as_str())),
        ("http_status".into(), number(spec.http_status)),
        ("request_id".into(), text(request_id)),
    ]);
    limit_fields(&mut fields, verdict, now);

    CheckResponse {
        status: rpc_status(deny_code(reason), reason.as_str()),
        dynamic_metadata: Some(Struct { fields }),
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
mod tests {
    use super::*;
    use crate::domain::TenantId;

    fn profile(name: &str) -> Profile {
        let text = std::fs::read_to_string(format!(
            "{}/profiles/{name}.toml",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap();
        Profile::from_toml(&text).unwrap()
    }

    fn headers(r: &[HeaderValueOption]) -> HashMap<String, String> {
        r.iter()
            .map(|h| h.header.clone().unwrap())
            .map(|h| (h.key, h.value))
            .collect()
    }

    fn limit(
        name: &str,
        limit: u64,
        remaining: u64,
        reset_in_ms: i64,
        now: DateTime<Utc>,
    ) -> LimitStatus {
        LimitStatus {
            name: name.into(),
            limit,
            remaining,
            reset_at: now + chrono::Duration::milliseconds(reset_in_ms),
            period: "minute",
        }
    }

    #[test]
    fn an_allow_names_the_principal_upstream_and_reports_the_tightest_limit() {
        let now = Utc::now();
        let key_id = uuid::Uuid::new_v4();
        let principal = Principal {
            tenant_id: TenantId::parse("acme").unwrap(),
            key_id: Some(key_id),
            plan: "pro".into(),
            environment: "test".into(),
            scopes: vec!["emails:send".into(), "emails:read".into()],
            subject: key_id.to_string(),
            credential_type: CredentialType::ApiKey,
        };
        let mut verdict = Verdict::plain(Decision::Allow(principal.clone()));
        verdict.limits = vec![
            limit("key_per_minute", 100, 40, 30_000, now),
            limit("tenant_per_month", 10_000, 7, 86_400_500, now),
        ];
        let names = HeaderNames::new("x-tollgate-");
        let r = ok_response(&names, &principal, &verdict, vec!["x-api-key".into()], now);
        assert_eq!(r.status.unwrap().code, 0);
        let Some(HttpResponse::OkResponse(ok)) = r.http_response else {
            panic!("not an ok response")
        };
        let up = headers(&ok.headers);
        assert_eq!(up["x-tollgate-tenant-id"], "acme");
        assert_eq!(up["x-tollgate-key-id"], key_id.to_string());
        assert_eq!(up["x-tollgate-plan"], "pro");
        assert_eq!(up["x-tollgate-environment"], "test");
        assert_eq!(up["x-tollgate-scopes"], "emails:send,emails:read");
        assert_eq!(up["x-tollgate-ratelimit-remaining"], "7");
        assert!(ok
            .headers
            .iter()
            .all(|h| h.append_action == HeaderAppendAction::OverwriteIfExistsOrAdd as i32));
        assert_eq!(ok.headers_to_remove, ["x-api-key"]);
        let down = headers(&ok.response_headers_to_add);
        assert_eq!(down["ratelimit-limit"], "10000");
        assert_eq!(down["ratelimit-remaining"], "7");
        assert_eq!(down["ratelimit-reset"], "86401");
        let meta = r.dynamic_metadata.unwrap().fields;
        assert_eq!(meta["tenant_id"], text("acme"));
        assert_eq!(meta["ratelimit_remaining"], number(7.0));
    }

    #[test]
    fn with_no_limits_and_no_key_id_those_headers_are_removed_not_trusted() {
        let now = Utc::now();
        let principal = Principal {
            tenant_id: TenantId::parse("acme").unwrap(),
            key_id: None,
            plan: "free".into(),
            environment: "live".into(),
            scopes: vec![],
            subject: "user-1".into(),
            credential_type: CredentialType::Jwt,
        };
        let verdict = Verdict::plain(Decision::Allow(principal.clone()));
        let r = ok_response(
            &HeaderNames::new("x-gw-"),
            &principal,
            &verdict,
            vec![],
            now,
        );
        let Some(HttpResponse::OkResponse(ok)) = r.http_response else {
            panic!("not an ok response")
        };
        assert_eq!(
            ok.headers_to_remove,
            ["x-gw-key-id", "x-gw-scopes", "x-gw-ratelimit-remaining"]
        );
        assert!(ok.response_headers_to_add.is_empty());
    }

    #[test]
    fn a_429_carries_retry_after_and_rate_limit_headers_and_the_documented_body() {
        let now = Utc::now();
        let p = profile("messagesmart");
        let mut verdict = Verdict::plain(Decision::Deny(Reason::RateLimited));
        verdict.limits = vec![limit("key_per_minute", 60, 0, 1_200, now)];
        verdict.retry_after_seconds = 2;
        let r = denied_response(&p, Reason::RateLimited, &verdict, "req-1".into(), now);
        assert_eq!(r.status.unwrap().code, Code::PermissionDenied as i32);
        let Some(HttpResponse::DeniedResponse(d)) = r.http_response else {
            panic!("not a denied response")
        };
        assert_eq!(d.status.unwrap().code, 429);
        let h = headers(&d.headers);
        assert_eq!(h["content-type"], "application/json");
        assert_eq!(h["x-request-id"], "req-1");
        assert_eq!(h["retry-after"], "2");
        assert_eq!(h["ratelimit-limit"], "60");
        assert_eq!(h["ratelimit-remaining"], "0");
        assert_eq!(h["ratelimit-reset"], "2");
        let body: serde_json::Value = serde_json::from_str(&d.body).unwrap();
        assert_eq!(
            body,
            serde_json::json!({"success": false, "error": {"code": "rate_limit_exceeded",
                "message": "Too many requests. Please try again later.", "httpStatus": 429}})
        );
    }

    #[test]
    fn an_identity_denial_is_unauthenticated_without_retry_after() {
        let p = profile("msgflash");
        let verdict = Verdict::plain(Decision::Deny(Reason::KeyRevoked));
        let r = denied_response(&p, Reason::KeyRevoked, &verdict, "r".into(), Utc::now());
        assert_eq!(r.status.unwrap().code, Code::Unauthenticated as i32);
        let Some(HttpResponse::DeniedResponse(d)) = r.http_response else {
            panic!("not a denied response")
        };
        assert_eq!(d.status.unwrap().code, 401);
        assert!(!headers(&d.headers).contains_key("retry-after"));
    }

    #[test]
    fn route_policy_defaults_parses_and_refuses_what_it_does_not_know() {
        let p = profile("msgflash");
        let ext = |pairs: &[(&str, &str)]| -> HashMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let none = ext(&[]);
        let (policy, _) = route_policy(&none, &p).unwrap();
        assert_eq!(
            policy,
            RoutePolicy {
                surface: "",
                scopes: vec![],
                cost: 1
            }
        );

        let full = ext(&[
            ("surface", "dashboard"),
            ("scopes", "messages:send, messages:read"),
            ("cost", "5"),
        ]);
        let (policy, surface) = route_policy(&full, &p).unwrap();
        assert_eq!(policy.surface, "dashboard");
        assert_eq!(policy.scopes, ["messages:send", "messages:read"]);
        assert_eq!(policy.cost, 5);
        assert_eq!(surface.bearer, BearerPolicy::Jwt);

        let off = ext(&[("cost", "5"), ("limits", "off")]);
        assert_eq!(route_policy(&off, &p).unwrap().0.cost, 0);

        for bad in [
            ext(&[("surface", "admin")]),
            ext(&[("cost", "-1")]),
            ext(&[("cost", "many")]),
            ext(&[("limits", "maybe")]),
            ext(&[("scope", "messages:send")]),
            ext(&[("scopes", "Not A Scope")]),
        ] {
            let err = route_policy(&bad, &p).unwrap_err();
            assert!(matches!(err, Error::InvalidArgument(_)), "{bad:?}");
        }
    }

    #[test]
    fn the_credential_headers_are_removed_and_unrelated_authorization_is_kept() {
        let p = profile("msgflash");
        let public = p.surface("public_api").unwrap();
        let req = |pairs: &[(&str, &str)]| -> HashMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let by_header = req(&[
            ("x-api-key", "msgf_live_x"),
            ("authorization", "Basic dTpw"),
        ]);
        assert_eq!(credential_headers(&p, public, &by_header), ["x-api-key"]);
        let smuggled = req(&[
            ("x-api-key", "msgf_live_x"),
            ("authorization", "Bearer msgf_live_y"),
        ]);
        assert_eq!(
            credential_headers(&p, public, &smuggled),
            ["x-api-key", "authorization"]
        );
        let mailsage = profile("mailsage");
        let bearer = req(&[("authorization", "Bearer ms_live_z")]);
        let surface = mailsage.surface("").unwrap();
        assert_eq!(
            credential_headers(&mailsage, surface, &bearer),
            ["authorization"]
        );
    }

    #[test]
    fn the_request_id_is_envoys_else_a_new_one() {
        let mut http = HttpRequest {
            id: "12345".into(),
            ..HttpRequest::default()
        };
        assert_eq!(request_id(&http), "12345");
        http.headers.insert("x-request-id".into(), "abc-1".into());
        assert_eq!(request_id(&http), "abc-1");
        http.headers.insert("x-request-id".into(), "bad id".into());
        http.id.clear();
        assert!(uuid::Uuid::parse_str(&request_id(&http)).is_ok());
    }

    #[test]
    fn the_header_prefix_is_validated_when_loaded() {
        let ok: EnvoySettings = toml::from_str("header_prefix = \"x-gw-\"").unwrap();
        assert_eq!(ok.header_prefix, "x-gw-");
        assert!(toml::from_str::<EnvoySettings>("header_prefix = \"X Gw\"").is_err());
        assert_eq!(
            toml::from_str::<EnvoySettings>("").unwrap(),
            EnvoySettings::default()
        );
    }
}

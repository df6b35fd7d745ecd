//! `envoy.service.auth.v3.Authorization/Check`: Envoy's ext_authz as a thin
//! adapter over [`Authenticator::decide`] (ARCHITECTURE.md, "One Authenticate call"). Proto in →
//! [`AuthInput`] → decide → proto out; no rules live here.
//!
//! Per-route policy comes from the route's `context_extensions`: `surface`,
//! `scopes` (comma-separated, all required), `cost` (default 1), `limits`
//! (`off` → cost 0) and `subscription` (`required` / `optional`: whether an
//! inactive subscription is refused here; default: the surface's). A denial is an answer (OK with a google.rpc status and
//! the product's HTTP status, headers and body); an outage or a malformed
//! policy is a gRPC error, so Envoy's `status_on_error` applies and nothing
//! is ever allowed by accident.

use std::collections::HashMap;
use std::sync::Arc;

use envoy_types::pb::envoy::service::auth::v3::attribute_context::HttpRequest;
use envoy_types::pb::envoy::service::auth::v3::authorization_server::Authorization;
use envoy_types::pb::envoy::service::auth::v3::{CheckRequest, CheckResponse};
use serde::{Deserialize, Deserializer, Serialize};
use tonic::{Request, Response, Status};

use crate::authz::{AuthInput, Authenticator};
use crate::clock::Clock;
use crate::domain::validate::check_scopes;
use crate::domain::{Decision, Violations};
use crate::error::Error;
use crate::profile::{BearerPolicy, Profile, SubscriptionGate, Surface};
use response::{denied_response, ok_response, UpstreamNames};

mod response;

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
    upstream: UpstreamNames,
    credentials: CredentialHeaders,
}

impl EnvoyAuthz {
    /// An adapter deciding with `authz`; `clock` turns limit resets into
    /// seconds.
    pub fn new(authz: Arc<Authenticator>, clock: Clock, settings: &EnvoySettings) -> Self {
        Self {
            credentials: CredentialHeaders::new(authz.profile()),
            authz,
            clock,
            upstream: UpstreamNames::new(&settings.header_prefix),
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
        let response = self
            .decide_http(&http, &attributes.context_extensions)
            .await?;
        Ok(Response::new(response))
    }
}

impl EnvoyAuthz {
    /// One decision for an HTTP request under a route's policy (the keys of
    /// `context_extensions`), answered as ext_authz answers it. The HTTP
    /// forward-auth adapter (`crate::forward_auth`) calls this too, so every
    /// gateway gets the same decision, headers and product bodies. An outage
    /// or a malformed policy is `Err`, never an allow.
    pub(crate) async fn decide_http(
        &self,
        http: &HttpRequest,
        context_extensions: &HashMap<String, String>,
    ) -> Result<CheckResponse, Error> {
        let profile = self.authz.profile();
        let (policy, surface) = route_policy(context_extensions, profile)?;
        let request_id = request_id(http);
        let span = tracing::Span::current();
        span.record("surface", policy.surface);
        span.record("request_id", request_id.as_str());

        let input = AuthInput {
            headers: Some(&http.headers),
            surface: policy.surface,
            required_scopes: &policy.scopes,
            subscription: policy.subscription,
            ..AuthInput::default()
        };
        // An outage is `Err` → UNAVAILABLE, never an allow.
        let verdict = self.authz.decide(input, policy.cost).await?;
        let now = self.clock.now();
        Ok(match &verdict.decision {
            Decision::Allow(principal) => {
                let removed = self.credentials.to_remove(surface, &http.headers);
                ok_response(&self.upstream, principal, &verdict, removed, now)
            }
            Decision::Deny(reason) => {
                tracing::debug!(reason = reason.as_str(), "denied");
                denied_response(profile, policy.surface, *reason, &verdict, request_id, now)
            }
        })
    }
}

/// A route's policy, read from its `context_extensions`.
#[derive(Debug, PartialEq, Eq)]
struct RoutePolicy<'a> {
    surface: &'a str,
    scopes: Vec<String>,
    cost: u32,
    /// `subscription`: `required` or `optional`; absent = the surface's.
    subscription: Option<SubscriptionGate>,
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
        subscription: None,
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
            "subscription" => match SubscriptionGate::parse(value) {
                Some(gate) => policy.subscription = Some(gate),
                None => v.add(
                    "context_extensions.subscription",
                    "must be `required` or `optional`",
                ),
            },
            other => v.add(
                format!("context_extensions.{other}"),
                "is not a Tollgate policy key (surface, scopes, cost, limits, subscription)",
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

/// Where a secret may travel, worked out once from the profile: every
/// API-key header of any surface, and the shape of the product's keys.
struct CredentialHeaders {
    key_headers: Vec<String>,
    key_prefix: String,
}

impl CredentialHeaders {
    fn new(profile: &Profile) -> Self {
        let mut key_headers: Vec<String> = profile
            .surfaces
            .values()
            .flat_map(|s| s.api_key_headers.iter().cloned())
            .collect();
        key_headers.sort_unstable();
        key_headers.dedup();
        let key_prefix = format!("{}_", profile.key_format.prefix());
        Self {
            key_headers,
            key_prefix,
        }
    }

    /// The headers to remove before the request goes upstream: the API-key
    /// headers, and `authorization` when it carried the credential or holds
    /// something shaped like one of this product's keys.
    fn to_remove(&self, surface: &Surface, headers: &HashMap<String, String>) -> Vec<String> {
        let mut removed = self.key_headers.clone();
        let present = |name: &str| headers.get(name).is_some_and(|v| !v.trim().is_empty());
        if let Some(auth) = headers.get("authorization") {
            let by_key_header = surface.api_key_headers.iter().any(|h| present(h));
            let carried = surface.bearer != BearerPolicy::None && !by_key_header;
            let looks_like_key = auth
                .split_whitespace()
                .any(|w| w.starts_with(&self.key_prefix));
            if carried || looks_like_key {
                removed.push("authorization".into());
            }
        }
        removed
    }
}

#[cfg(test)]
mod tests;

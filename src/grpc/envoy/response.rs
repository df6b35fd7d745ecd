//! The ext_authz answers: `ok_response` (upstream headers, credential
//! removal, `RateLimit-*`, metadata) and `denied_response` (the product's
//! status, body and headers). Pure conversions, no I/O.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use envoy_types::pb::envoy::config::core::v3::header_value_option::HeaderAppendAction;
use envoy_types::pb::envoy::config::core::v3::{HeaderValue, HeaderValueOption};
use envoy_types::pb::envoy::r#type::v3::HttpStatus;
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use envoy_types::pb::envoy::service::auth::v3::{
    CheckResponse, DeniedHttpResponse, OkHttpResponse,
};
use envoy_types::pb::google::protobuf::{value::Kind, Struct, Value};
use envoy_types::pb::google::rpc;
use tonic::Code;

use crate::domain::{CredentialType, LimitStatus, Principal, Reason, Verdict};
use crate::profile::Profile;

pub(super) fn header(key: &str, value: String) -> HeaderValueOption {
    named_header(key.to_owned(), value)
}

fn named_header(key: String, value: String) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(HeaderValue {
            key,
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
pub(super) fn tightest(limits: &[LimitStatus]) -> Option<&LimitStatus> {
    limits
        .iter()
        .min_by_key(|l| (l.remaining, std::cmp::Reverse(l.reset_at)))
}

/// `limit`, `remaining` and seconds to `reset` (rounded up) of the tightest
/// limit, for the `RateLimit-*` headers and the metadata.
pub(super) fn limit_facts(limits: &[LimitStatus], now: DateTime<Utc>) -> Vec<(&'static str, u64)> {
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

pub(super) fn rate_limit_headers(facts: &[(&str, u64)]) -> Vec<HeaderValueOption> {
    let header = |(name, n): &(&str, u64)| {
        let name = match *name {
            "limit" => "ratelimit-limit",
            "remaining" => "ratelimit-remaining",
            "reset" => "ratelimit-reset",
            other => return header(&format!("ratelimit-{other}"), n.to_string()),
        };
        header(name, n.to_string())
    };
    facts.iter().map(header).collect()
}

pub(super) fn text(s: impl Into<String>) -> Value {
    Value {
        kind: Some(Kind::StringValue(s.into())),
    }
}

/// Dynamic metadata (namespace `envoy.filters.http.ext_authz`), for access
/// logs and later filters.
pub(super) fn metadata<'a>(
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
        let key = match *name {
            "limit" => "ratelimit_limit".to_owned(),
            "remaining" => "ratelimit_remaining".to_owned(),
            "reset" => "ratelimit_reset".to_owned(),
            other => format!("ratelimit_{other}"),
        };
        fields.insert(key, number(*n as f64));
    }
    if retry_after > 0 {
        fields.insert("retry_after".into(), number(retry_after.into()));
    }
    Some(Struct { fields })
}

/// The facts an allow sends upstream, in order, by the header suffix
/// after the prefix.
const FACTS: [&str; 8] = [
    "tenant-id",
    "key-id",
    "plan",
    "environment",
    "scopes",
    "subject",
    "ratelimit-remaining",
    "subscription",
];

/// The upstream header names under one prefix, built once (not formatted
/// on every decision).
#[derive(Debug, Clone)]
pub(crate) struct UpstreamNames {
    facts: [String; 8],
    label_prefix: String,
}

impl UpstreamNames {
    pub(crate) fn new(prefix: &str) -> Self {
        Self {
            facts: FACTS.map(|name| format!("{prefix}{name}")),
            label_prefix: format!("{prefix}label-"),
        }
    }
}

/// OK: the principal as upstream headers (empty ones removed, so a client
/// cannot supply them), the credential headers removed, `RateLimit-*` on the
/// response, and the same facts as dynamic metadata.
pub(super) fn ok_response(
    names: &UpstreamNames,
    p: &Principal,
    verdict: &Verdict,
    mut headers_to_remove: Vec<String>,
    now: DateTime<Utc>,
) -> CheckResponse {
    let limits = limit_facts(&verdict.limits, now);
    let remaining = tightest(&verdict.limits).map(|l| l.remaining.to_string());
    let values = [
        p.tenant_id.to_string(),
        p.key_id.map(|id| id.to_string()).unwrap_or_default(),
        p.plan.clone(),
        p.environment.clone(),
        p.scopes.join(","),
        p.subject.clone(),
        remaining.unwrap_or_default(),
        p.subscription.as_str().to_string(),
    ];
    let mut headers = Vec::with_capacity(values.len() + p.labels.len());
    for (name, value) in names.facts.iter().zip(&values) {
        if value.is_empty() {
            headers_to_remove.push(name.clone());
        } else {
            headers.push(named_header(name.clone(), value.clone()));
        }
    }
    // The labels the profile sends upstream; one the key lacks is removed,
    // so a client cannot supply it.
    for (label, value) in &p.labels {
        let name = format!("{}{label}", names.label_prefix);
        if value.is_empty() {
            headers_to_remove.push(name);
        } else {
            headers.push(named_header(name, value.clone()));
        }
    }
    let facts = FACTS.into_iter().zip(values);
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

pub(super) fn rpc_status(code: Code, message: &str) -> Option<rpc::Status> {
    Some(rpc::Status {
        code: code as i32,
        message: message.to_owned(),
        details: Vec::new(),
    })
}

/// Denied: the product's status and JSON body, `Retry-After` and
/// `RateLimit-*` when limits speak, and the request id to quote to support.
pub(super) fn denied_response(
    profile: &Profile,
    surface: &str,
    reason: Reason,
    verdict: &Verdict,
    request_id: String,
    now: DateTime<Utc>,
) -> CheckResponse {
    let spec = profile.denial_on(surface, reason);
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
            body: profile.denial_body_on(surface, reason),
        })),
    }
}

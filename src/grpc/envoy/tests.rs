//! Unit tests of the ext_authz adapter's conversions.

use super::response::*;
use super::*;
use crate::domain::TenantId;
use crate::domain::{CredentialType, LimitStatus, Principal, Reason, Verdict};
use chrono::{DateTime, Utc};
use envoy_types::pb::envoy::config::core::v3::header_value_option::HeaderAppendAction;
use envoy_types::pb::envoy::config::core::v3::HeaderValueOption;
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use envoy_types::pb::google::protobuf::value::Kind;
use tonic::Code;

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
        subscription: crate::domain::SubscriptionStatus::Active,
        labels: vec![
            ("plan".into(), "gold".into()),
            ("team".into(), String::new()),
        ],
    };
    let mut verdict = Verdict::plain(Decision::Allow(principal.clone()));
    verdict.limits = vec![
        limit("key_per_minute", 100, 40, 30_000, now),
        limit("tenant_per_month", 10_000, 7, 86_400_500, now),
    ];
    let r = ok_response(
        &UpstreamNames::new("x-tollgate-"),
        &principal,
        &verdict,
        vec!["x-api-key".into()],
        now,
    );
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
    assert_eq!(up["x-tollgate-subscription"], "active");
    assert_eq!(up["x-tollgate-label-plan"], "gold");
    assert!(ok
        .headers
        .iter()
        .all(|h| h.append_action == HeaderAppendAction::OverwriteIfExistsOrAdd as i32));
    // A label the key lacks is removed, never taken from the client.
    assert_eq!(ok.headers_to_remove, ["x-api-key", "x-tollgate-label-team"]);
    let down = headers(&ok.response_headers_to_add);
    assert_eq!(down["ratelimit-limit"], "10000");
    assert_eq!(down["ratelimit-remaining"], "7");
    assert_eq!(down["ratelimit-reset"], "86401");
    let meta = r.dynamic_metadata.unwrap().fields;
    assert_eq!(meta["tenant_id"], text("acme"));
    assert_eq!(meta["key_id"], text(key_id.to_string()));
    assert_eq!(meta["scopes"], text("emails:send,emails:read"));
    assert_eq!(meta["decision"], text("allow"));
    assert!(!meta.contains_key("shadow_denial"));
    assert_eq!(
        meta["ratelimit_remaining"].kind,
        Some(Kind::NumberValue(7.0))
    );
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
        subscription: crate::domain::SubscriptionStatus::PastDue,
        labels: vec![],
    };
    let verdict = Verdict::plain(Decision::Allow(principal.clone()));
    let r = ok_response(
        &UpstreamNames::new("x-gw-"),
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
    let r = denied_response(&p, "", Reason::RateLimited, &verdict, "req-1".into(), now);
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
    let r = denied_response(&p, "", Reason::KeyRevoked, &verdict, "r".into(), Utc::now());
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
            cost: 1,
            subscription: None,
        }
    );

    let full = ext(&[
        ("surface", "dashboard"),
        ("scopes", "messages:send, messages:read"),
        ("cost", "5"),
        ("subscription", "optional"),
    ]);
    let (policy, surface) = route_policy(&full, &p).unwrap();
    assert_eq!(policy.subscription, Some(SubscriptionGate::Optional));
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
        ext(&[("subscription", "sometimes")]),
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
    assert_eq!(
        CredentialHeaders::new(&p).to_remove(public, &by_header),
        ["x-api-key"]
    );
    let smuggled = req(&[
        ("x-api-key", "msgf_live_x"),
        ("authorization", "Bearer msgf_live_y"),
    ]);
    assert_eq!(
        CredentialHeaders::new(&p).to_remove(public, &smuggled),
        ["x-api-key", "authorization"]
    );
    let mailsage = profile("mailsage");
    let bearer = req(&[("authorization", "Bearer ms_live_z")]);
    let surface = mailsage.surface("").unwrap();
    assert_eq!(
        CredentialHeaders::new(&mailsage).to_remove(surface, &bearer),
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

#[test]
fn a_bad_header_prefix_stops_the_config_naming_the_field() {
    let dir = std::env::temp_dir().join(format!("tg-envoy-cfg-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("c.toml");
    std::fs::write(&file, "[envoy]\nheader_prefix = \"X Gateway \"\n").unwrap();
    let flags = crate::config::FlagOverrides::default();
    let err = crate::config::Settings::load(Some(&file), &flags).unwrap_err();
    assert!(err.to_string().contains("header_prefix"), "{err}");
    std::fs::write(&file, "[envoy]\nheader_prefix = \"x-gw-\"\n").unwrap();
    let s = crate::config::Settings::load(Some(&file), &flags).unwrap();
    assert_eq!(s.envoy.header_prefix, "x-gw-");
    let _ = std::fs::remove_dir_all(dir);
}

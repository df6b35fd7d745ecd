//! Envoy's rate-limit service (`ShouldRateLimit`): descriptors mapped onto
//! Tollgate's limits, over real gRPC on a real Postgres (this file), and
//! through a real Envoy's `envoy.filters.http.ratelimit` filter running the
//! shipped `examples/envoy/ratelimit.yaml` (`ratelimit/through_envoy.rs`).
//! The profile is the default one plus README's `[ratelimit]` example, so
//! the README shows what is tested. Who may call it is in tests/trust.rs.

mod common;
#[path = "support/http.rs"]
mod gateway_http;
#[path = "ratelimit/harness.rs"]
mod harness;
#[path = "ratelimit/through_envoy.rs"]
mod through_envoy;

use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::Entry;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::rate_limit::Unit;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::{Code, DescriptorStatus};
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use envoy_types::pb::google::protobuf::UInt64Value;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use common::*;
use tollgate::grpc::pb;
use tollgate::profile::Profile;

const GATEWAY_TOKEN: &str = "test-gateway-token-0123456789";
/// An instant well inside a minute, an hour and a month: no limit refills
/// and no quota period turns while the clock is frozen there.
const FROZEN: &str = "2027-03-10T12:00:00Z";

/// README's `[ratelimit]` example (the TOML block after the marker).
fn readme_ratelimit_section() -> String {
    let readme = include_str!("../README.md");
    let marker = "<!-- the Envoy tests run this section (tests/ratelimit.rs) -->";
    let after = &readme[readme.find(marker).expect("the marker in README.md")..];
    let start = after.find("```toml\n").expect("a toml block after it") + "```toml\n".len();
    let end = start + after[start..].find("```").unwrap();
    after[start..end].to_string()
}

/// The default profile with README's descriptors.
fn rls_profile() -> Profile {
    let path = format!("{}/profiles/default.toml", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(path).unwrap();
    Profile::from_toml(&format!("{text}\n{}", readme_ratelimit_section())).unwrap()
}

/// A Tollgate with README's descriptors, a gateway token and a frozen clock.
async fn spawn_rls(conn: &PgConnectOptions) -> Tollgate {
    let mut opts = Options::new(rls_profile());
    opts.guard.gateway_token = Some(GATEWAY_TOKEN.to_string().into());
    let t = spawn_with(conn, opts).await;
    t.running.clock().freeze_at(FROZEN.parse().unwrap());
    t
}

fn descriptor(entries: &[(&str, &str)]) -> RateLimitDescriptor {
    RateLimitDescriptor {
        entries: entries
            .iter()
            .map(|(k, v)| Entry {
                key: k.to_string(),
                value: v.to_string(),
            })
            .collect(),
        ..Default::default()
    }
}

fn request(domain: &str, descriptors: Vec<RateLimitDescriptor>, hits: u32) -> RateLimitRequest {
    RateLimitRequest {
        domain: domain.into(),
        descriptors,
        hits_addend: hits,
    }
}

/// `ShouldRateLimit` as `bearer` (None: anonymous).
async fn ask(
    t: &Tollgate,
    bearer: Option<&str>,
    req: RateLimitRequest,
) -> Result<RateLimitResponse, tonic::Status> {
    let mut r = tonic::Request::new(req);
    if let Some(b) = bearer {
        r.metadata_mut()
            .insert("authorization", format!("Bearer {b}").parse().unwrap());
    }
    RateLimitServiceClient::new(t.channel.clone())
        .should_rate_limit(r)
        .await
        .map(|r| r.into_inner())
}

/// One descriptor of domain `edge`, asked as the gateway (Envoy with its
/// `initial_metadata`, `examples/envoy/ratelimit.yaml`).
async fn edge(t: &Tollgate, entries: &[(&str, &str)], hits: u32) -> RateLimitResponse {
    ask(
        t,
        Some(GATEWAY_TOKEN),
        request("edge", vec![descriptor(entries)], hits),
    )
    .await
    .unwrap()
}

fn header<'a>(r: &'a RateLimitResponse, name: &str) -> Option<&'a str> {
    r.response_headers_to_add
        .iter()
        .find(|h| h.key == name)
        .map(|h| h.value.as_str())
}

/// (code, requests_per_unit, unit, remaining) of a status.
fn summary(s: &DescriptorStatus) -> (Code, Option<(u32, Unit)>, u32) {
    (
        Code::try_from(s.code).unwrap(),
        s.current_limit
            .as_ref()
            .map(|l| (l.requests_per_unit, Unit::try_from(l.unit).unwrap())),
        s.limit_remaining,
    )
}

fn not_limited(s: &DescriptorStatus) -> bool {
    s.code == Code::Ok as i32 && s.current_limit.is_none()
}

#[sqlx::test]
async fn a_profile_descriptor_is_allowed_until_its_limit_then_over_limit_with_the_ratelimit_headers(
    _p: PgPoolOptions,
    conn: PgConnectOptions,
) {
    let t = spawn_rls(&conn).await;
    let me = [("remote_address", "203.0.113.7")];
    for left in (0..5).rev() {
        let r = edge(&t, &me, 0).await;
        assert_eq!(r.overall_code, Code::Ok as i32, "{r:?}");
        assert_eq!(
            summary(&r.statuses[0]),
            (Code::Ok, Some((5, Unit::Minute)), left)
        );
        assert_eq!(header(&r, "RateLimit-Limit"), Some("5"));
        assert_eq!(
            header(&r, "RateLimit-Remaining"),
            Some(left.to_string().as_str())
        );
    }
    let r = edge(&t, &me, 0).await;
    assert_eq!(
        r.overall_code,
        Code::OverLimit as i32,
        "the sixth of 5 per minute"
    );
    assert_eq!(
        summary(&r.statuses[0]),
        (Code::OverLimit, Some((5, Unit::Minute)), 0)
    );
    let reset = r.statuses[0].duration_until_reset.as_ref().unwrap();
    assert_eq!(reset.seconds, 60, "whole again a minute after five at once");
    assert_eq!(header(&r, "RateLimit-Remaining"), Some("0"));
    assert_eq!(header(&r, "RateLimit-Reset"), Some("60"));

    let other = edge(&t, &[("remote_address", "203.0.113.8")], 0).await;
    assert_eq!(
        other.overall_code,
        Code::Ok as i32,
        "another address counts apart"
    );
    assert_eq!(other.statuses[0].limit_remaining, 4);

    t.running
        .clock()
        .advance(std::time::Duration::from_secs(12));
    let r = edge(&t, &me, 0).await;
    assert_eq!(r.overall_code, Code::Ok as i32, "one unit back every 12 s");
}

#[sqlx::test]
async fn hits_addend_spends_that_many_units_per_request_and_a_descriptors_own_overrides_it(
    _p: PgPoolOptions,
    conn: PgConnectOptions,
) {
    let t = spawn_rls(&conn).await;
    let me = [("remote_address", "198.51.100.1")];
    let r = edge(&t, &me, 3).await;
    assert_eq!(
        summary(&r.statuses[0]),
        (Code::Ok, Some((5, Unit::Minute)), 2)
    );

    // The descriptor's own hits_addend (1) wins over the request's (3).
    let mut own = descriptor(&me);
    own.hits_addend = Some(UInt64Value { value: 1 });
    let r = ask(&t, Some(GATEWAY_TOKEN), request("edge", vec![own], 3))
        .await
        .unwrap();
    assert_eq!(summary(&r.statuses[0]).2, 1);

    // 0 on a descriptor only checks (reporting what one more would leave,
    // as CheckQuota's dry_run does), however often.
    for _ in 0..3 {
        let mut check = descriptor(&me);
        check.hits_addend = Some(UInt64Value { value: 0 });
        let r = ask(&t, Some(GATEWAY_TOKEN), request("edge", vec![check], 1))
            .await
            .unwrap();
        assert_eq!(
            summary(&r.statuses[0]),
            (Code::Ok, Some((5, Unit::Minute)), 0)
        );
    }

    let r = edge(&t, &me, 2).await;
    assert_eq!(r.overall_code, Code::OverLimit as i32, "2 when 1 is left");
    let r = edge(&t, &me, 1).await;
    assert_eq!(
        summary(&r.statuses[0]),
        (Code::Ok, Some((5, Unit::Minute)), 0),
        "the refused 2 took nothing"
    );
    let r = edge(&t, &[("remote_address", "198.51.100.2")], 6).await;
    assert_eq!(
        r.overall_code,
        Code::OverLimit as i32,
        "more than the limit could ever admit"
    );
}

#[sqlx::test]
async fn a_request_over_one_limit_spends_nothing_on_its_other_descriptors(
    _p: PgPoolOptions,
    conn: PgConnectOptions,
) {
    let t = spawn_rls(&conn).await;
    let ip = "192.0.2.10";
    let both = || {
        request(
            "edge",
            vec![
                descriptor(&[("remote_address", ip)]),
                descriptor(&[("generic_key", "uploads"), ("remote_address", ip)]),
            ],
            1,
        )
    };
    for left in [2, 1, 0] {
        let r = ask(&t, Some(GATEWAY_TOKEN), both()).await.unwrap();
        assert_eq!(r.overall_code, Code::Ok as i32);
        assert_eq!(
            summary(&r.statuses[1]),
            (Code::Ok, Some((3, Unit::Hour)), left)
        );
        assert_eq!(
            r.statuses[1].current_limit.as_ref().unwrap().name,
            "uploads"
        );
    }
    let r = ask(&t, Some(GATEWAY_TOKEN), both()).await.unwrap();
    assert_eq!(r.overall_code, Code::OverLimit as i32);
    assert_eq!(
        summary(&r.statuses[0]).0,
        Code::Ok,
        "the address limit had room"
    );
    assert_eq!(summary(&r.statuses[1]).0, Code::OverLimit);
    let r = edge(&t, &[("remote_address", ip)], 0).await;
    assert_eq!(
        r.statuses[0].limit_remaining, 1,
        "3 of 5 spent by the admitted requests, none by the refused one"
    );
}

#[sqlx::test]
async fn shadow_mode_answers_ok_and_reports_the_limit_it_would_have_applied(
    _p: PgPoolOptions,
    conn: PgConnectOptions,
) {
    let t = spawn_rls(&conn).await;
    for _ in 0..3 {
        let r = edge(&t, &[("path", "/reports")], 0).await;
        assert_eq!(r.overall_code, Code::Ok as i32, "{r:?}");
        assert_eq!(
            summary(&r.statuses[0]),
            (Code::Ok, Some((1, Unit::Minute)), 0)
        );
    }
}

#[sqlx::test]
async fn unknown_descriptors_are_not_limited_and_a_request_without_domain_or_descriptors_is_invalid(
    _p: PgPoolOptions,
    conn: PgConnectOptions,
) {
    let mut t = spawn_rls(&conn).await;
    t.create_tenant("acme", "free").await;
    let (secret, key) = t.create_key("acme").await;
    t.revoke(&key.key_id).await;
    for (domain, entries) in [
        ("other", &[("remote_address", "1.2.3.4")][..]),
        ("edge", &[("user", "u1")][..]),
        ("edge", &[("path", "/not-declared")][..]),
        ("edge", &[("generic_key", "uploads")][..]),
        ("edge", &[("remote_address", "1.2.3.4"), ("path", "/")][..]),
        ("edge", &[][..]),
        ("edge", &[("tenant_id", "no-such-tenant")][..]),
        ("edge", &[("tenant_id", "not a tenant id!")][..]),
        ("edge", &[("key_id", "not-a-uuid")][..]),
        (
            "edge",
            &[("key_id", "0190f6a8-0000-7000-8000-000000000000")][..],
        ),
        ("edge", &[("api_key", "tg_live_garbage")][..]),
        ("edge", &[("api_key", secret.as_str())][..]),
    ] {
        let r = ask(
            &t,
            Some(GATEWAY_TOKEN),
            request(domain, vec![descriptor(entries)], 1),
        )
        .await
        .unwrap_or_else(|e| panic!("{domain} {entries:?}: {e:?}"));
        assert_eq!(r.overall_code, Code::Ok as i32, "{domain} {entries:?}");
        assert!(not_limited(&r.statuses[0]), "{domain} {entries:?}: {r:?}");
        assert!(r.response_headers_to_add.is_empty(), "no limit, no headers");
    }
    let r = edge(&t, &[("path", "/healthz")], 1).await;
    assert!(not_limited(&r.statuses[0]), "unlimited");
    assert_eq!(r.statuses[0].limit_remaining, u32::MAX);

    let err = ask(&t, None, request("", vec![descriptor(&[("a", "b")])], 1))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("domain"), "{err:?}");
    let err = ask(&t, None, request("edge", vec![], 1)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("descriptors"), "{err:?}");
}

#[sqlx::test]
async fn tenant_key_and_credential_descriptors_spend_the_plans_limits_that_authenticate_counts(
    _p: PgPoolOptions,
    conn: PgConnectOptions,
) {
    let mut t = spawn_rls(&conn).await;
    t.create_tenant("acme", "free").await; // key_per_second 10, tenant_per_month 10000
    let (secret, key) = t.create_key("acme").await;

    // The raw key (as Envoy's request_headers action sends x-api-key or
    // Authorization): anyone may, the key speaks for itself.
    let r = ask(
        &t,
        None,
        request(
            "edge",
            vec![descriptor(&[("api_key", &format!("Bearer {secret}"))])],
            4,
        ),
    )
    .await
    .unwrap();
    assert_eq!(
        summary(&r.statuses[0]),
        (Code::Ok, Some((10, Unit::Second)), 6)
    );
    assert_eq!(
        r.statuses[0].current_limit.as_ref().unwrap().name,
        "key_per_second"
    );

    // The key by id: the same cell.
    let by_id = || request("edge", vec![descriptor(&[("key_id", &key.key_id)])], 6);
    let r = ask(&t, Some(GATEWAY_TOKEN), by_id()).await.unwrap();
    assert_eq!(
        summary(&r.statuses[0]),
        (Code::Ok, Some((10, Unit::Second)), 0)
    );
    let r = ask(&t, Some(GATEWAY_TOKEN), by_id()).await.unwrap();
    assert_eq!(r.overall_code, Code::OverLimit as i32);
    assert_eq!(summary(&r.statuses[0]).0, Code::OverLimit);
    assert_eq!(header(&r, "RateLimit-Limit"), Some("10"));

    // Authenticate counts the same limit: refused now.
    let a = t
        .authenticate_with(pb::AuthenticateRequest {
            api_key: secret.clone(),
            cost: Some(1),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(reason(&a), "RATE_LIMITED", "{a:?}");

    // The tenant by id: its monthly quota (10 + 6 + … spent by the key's
    // requests above, the refused ones took nothing).
    let r = ask(
        &t,
        Some(OPERATOR_TOKEN),
        request("edge", vec![descriptor(&[("tenant_id", "acme")])], 1),
    )
    .await
    .unwrap();
    assert_eq!(
        summary(&r.statuses[0]),
        (Code::Ok, Some((10000, Unit::Month)), 10000 - 10 - 1)
    );
}

/// The attack: a caller that can reach the port but is not the gateway
/// sends made-up `remote_address` values, spending a victim's bucket (or
/// flooding the cells). Profile descriptors are the gateway's claims, so
/// anyone else is refused and spends nothing.
#[sqlx::test]
async fn a_profile_descriptor_from_anyone_but_the_gateway_is_refused_and_spends_nothing(
    _p: PgPoolOptions,
    conn: PgConnectOptions,
) {
    let t = spawn_rls(&conn).await;
    let victim = || {
        request(
            "edge",
            vec![descriptor(&[("remote_address", "192.0.2.7")])],
            5,
        )
    };
    let err = ask(&t, None, victim()).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");
    let r = edge(&t, &[("remote_address", "192.0.2.7")], 0).await;
    // A check (hits 0) reports what one more would leave: 4 of the 5.
    assert_eq!(
        r.statuses[0].limit_remaining, 4,
        "the refused call spent nothing"
    );
    // A credential still speaks for itself, as in ext_authz.
    let stranger = t.profile.key_format.generate("live").expose().to_owned();
    let own = request("edge", vec![descriptor(&[("api_key", &stranger)])], 1);
    assert!(ask(&t, None, own).await.is_ok());
}

#[sqlx::test]
async fn naming_a_tenant_or_key_by_id_needs_the_gateway_or_operator(
    _p: PgPoolOptions,
    conn: PgConnectOptions,
) {
    let mut t = spawn_rls(&conn).await;
    t.create_tenant("acme", "free").await;
    let by_tenant = || request("edge", vec![descriptor(&[("tenant_id", "acme")])], 0);
    let err = ask(&t, None, by_tenant()).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    let err = ask(&t, Some("not-a-token-0123456789"), by_tenant())
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    // Mixed with a profile descriptor: still refused, nothing spent.
    let mixed = request(
        "edge",
        vec![
            descriptor(&[("remote_address", "192.0.2.99")]),
            descriptor(&[("tenant_id", "acme")]),
        ],
        1,
    );
    assert!(ask(&t, None, mixed).await.is_err());
    let r = edge(&t, &[("remote_address", "192.0.2.99")], 0).await;
    assert_eq!(
        r.statuses[0].limit_remaining, 4,
        "the refused call spent nothing"
    );
    for caller in [GATEWAY_TOKEN, OPERATOR_TOKEN] {
        let r = ask(&t, Some(caller), by_tenant()).await.unwrap();
        assert_eq!(
            r.statuses[0]
                .current_limit
                .as_ref()
                .unwrap()
                .requests_per_unit,
            10000
        );
    }
}

//! Through a real Envoy 1.40: `examples/envoy/ratelimit.yaml` as shipped
//! (only ports and the timeout changed), its `envoy.filters.http.ratelimit`
//! filter asking Tollgate.

use super::harness::{Envoy, Upstream};
use super::*;

/// Tollgate with README's descriptors, the upstream, and Envoy in front.
async fn stack(conn: &PgConnectOptions, edits: &[(&str, &str)]) -> (Tollgate, Upstream, Envoy) {
    let t = spawn_rls(conn).await;
    let upstream = Upstream::start().await;
    let envoy = Envoy::start(t.running.local_addr(), upstream.addr, edits).await;
    (t, upstream, envoy)
}

#[sqlx::test]
async fn through_envoy_a_client_is_allowed_until_the_limit_then_gets_429_with_the_ratelimit_headers(
    _p: PgPoolOptions,
    conn: PgConnectOptions,
) {
    let (_t, upstream, envoy) = stack(&conn, &[]).await;
    for left in (0..5).rev() {
        let r = envoy.get("/anything", &[]).await;
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.header("ratelimit-limit"), "5", "{r:?}");
        assert_eq!(r.header("ratelimit-remaining"), left.to_string());
        // Envoy's own draft-03 headers, from the descriptor statuses.
        assert_eq!(r.header("x-ratelimit-limit"), "5, 5;w=60", "{r:?}");
        assert_eq!(r.header("x-ratelimit-remaining"), left.to_string());
    }
    let r = envoy.get("/anything", &[]).await;
    assert_eq!(r.status, 429, "{r:?}");
    assert_eq!(r.header("x-envoy-ratelimited"), "true", "{r:?}");
    assert_eq!(r.header("ratelimit-limit"), "5");
    assert_eq!(r.header("ratelimit-remaining"), "0");
    assert_eq!(r.header("ratelimit-reset"), "60");
    assert_eq!(r.header("x-ratelimit-reset"), "60");
    assert_eq!(
        upstream.hits(),
        5,
        "the refused request never reached the API"
    );
}

#[sqlx::test]
async fn through_envoy_a_routes_hits_addend_spends_that_many_units(
    _p: PgPoolOptions,
    conn: PgConnectOptions,
) {
    let (_t, upstream, envoy) = stack(&conn, &[]).await;
    for left in ["3", "1"] {
        let r = envoy.get("/bulk", &[]).await;
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.header("ratelimit-remaining"), left);
    }
    let r = envoy.get("/bulk", &[]).await;
    assert_eq!(r.status, 429, "2 units asked, 1 left: {r:?}");
    let r = envoy.get("/", &[]).await;
    assert_eq!(r.status, 200, "the refused bulk call spent nothing: {r:?}");
    assert_eq!(r.header("ratelimit-remaining"), "0");
    assert_eq!(upstream.hits(), 3);
}

#[sqlx::test]
async fn through_envoy_shadow_mode_lets_traffic_over_the_limit_through(
    _p: PgPoolOptions,
    conn: PgConnectOptions,
) {
    let (_t, upstream, envoy) = stack(&conn, &[]).await;
    for _ in 0..3 {
        let r = envoy.get("/reports", &[]).await;
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.header("ratelimit-limit"), "1", "{r:?}");
        assert_eq!(r.header("ratelimit-remaining"), "0");
    }
    assert_eq!(upstream.hits(), 3);
}

#[sqlx::test]
async fn through_envoy_nested_descriptors_and_the_api_keys_plan_limits_apply(
    _p: PgPoolOptions,
    conn: PgConnectOptions,
) {
    let (mut t, upstream, envoy) = stack(&conn, &[]).await;
    for _ in 0..3 {
        assert_eq!(envoy.get("/uploads/a", &[]).await.status, 200);
    }
    let r = envoy.get("/uploads/a", &[]).await;
    assert_eq!(r.status, 429, "3 uploads per hour: {r:?}");

    t.create_tenant("acme", "free").await; // key_per_second 10
    let (secret, _) = t.create_key("acme").await;
    for _ in 0..10 {
        let r = envoy.get("/api/v1/x", &[("x-api-key", &secret)]).await;
        assert_eq!(r.status, 200, "{r:?}");
    }
    let r = envoy.get("/api/v1/x", &[("x-api-key", &secret)]).await;
    assert_eq!(r.status, 429, "the key's 10 per second: {r:?}");
    assert_eq!(r.header("ratelimit-limit"), "10");
    assert_eq!(upstream.hits(), 3 + 10);
    assert!(
        !envoy.log().contains(&secret),
        "the key is not in Envoy's log"
    );
}

#[sqlx::test]
async fn through_envoy_with_tollgate_unreachable_failure_mode_deny_decides(
    _p: PgPoolOptions,
    conn: PgConnectOptions,
) {
    // A port nobody listens on.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let upstream = Upstream::start().await;
    let _ = conn;
    let open = Envoy::start(closed, upstream.addr, &[]).await;
    let r = open.get("/anything", &[]).await;
    assert_eq!(
        r.status, 200,
        "failure_mode_deny: false lets it through: {r:?}"
    );
    assert_eq!(upstream.hits(), 1);

    let closed_shop = Envoy::start(
        closed,
        upstream.addr,
        &[("failure_mode_deny: false", "failure_mode_deny: true")],
    )
    .await;
    let r = closed_shop.get("/anything", &[]).await;
    assert_eq!(r.status, 500, "failure_mode_deny: true refuses: {r:?}");
    assert_eq!(upstream.hits(), 1);
}

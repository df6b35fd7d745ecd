//! The listener itself: NGINX's denial encoding, the gateway secret, a
//! malformed route policy failing closed, and its connection cap.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::*;

/// A gateway's keep-alive connection that has had one request answered
/// (so the listener holds it), or `None` if it was closed unanswered.
async fn answered_connection(addr: SocketAddr) -> Option<TcpStream> {
    let mut c = TcpStream::connect(addr).await.unwrap();
    let request = "GET /auth/nginx HTTP/1.1\r\nhost: tollgate\r\n\r\n";
    if c.write_all(request.as_bytes()).await.is_err() {
        return None;
    }
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match c.read(&mut byte).await {
            Ok(1) => head.push(byte[0]),
            _ => return None,
        }
    }
    // No gateway secret: refused, without a decision or a database read.
    assert!(
        head.starts_with(b"HTTP/1.1 401"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    Some(c)
}

#[sqlx::test]
async fn an_nginx_denial_is_401_or_403_carrying_the_products_status_and_body(
    _p: PgPoolOptions,
    conn: PgConnectOptions,
) {
    // auth_request treats anything but 2xx, 401 and 403 as an error, so a
    // 429 must travel as 403 plus headers the example config turns back.
    let (mut t, forward_auth) = spawn_forward_auth(&conn, "msgine").await;
    t.running
        .clock()
        .freeze_at("2026-11-23T10:00:00Z".parse().unwrap());
    t.create_tenant("acme", "business").await;
    let (secret, _) = t
        .create_key_with(pb::CreateKeyRequest {
            tenant_id: "acme".into(),
            name: "one a minute".into(),
            limits: vec![pb::LimitSpec {
                scope: "key".into(),
                period: "minute".into(),
                limit: 1,
                ..Default::default()
            }],
            ..Default::default()
        })
        .await
        .unwrap();
    let path = "/auth/nginx?surface=public_api";
    let headers = [
        ("x-api-key", secret.as_str()),
        ("x-original-method", "GET"),
        ("x-original-uri", "/api/v1/contacts"),
        ("x-tollgate-gateway-secret", GATEWAY_SECRET),
    ];
    assert_eq!(http(forward_auth, "GET", path, &headers).await.status, 200);
    let r = http(forward_auth, "GET", path, &headers).await;
    assert_eq!(r.status, 403, "{r:?}");
    assert_eq!(r.header("x-tollgate-status"), "429");
    let body: Value = serde_json::from_str(r.header("x-tollgate-body")).unwrap();
    assert_eq!(
        body,
        json!({"error": {"code": "rate_limited", "message": "Too many requests"}})
    );
    assert_eq!(r.header("retry-after"), "60");
    let r = http(forward_auth, "GET", path, &headers[1..]).await;
    assert_eq!(r.status, 401, "{r:?}");
    assert_eq!(r.header("x-tollgate-status"), "401");
}

#[sqlx::test]
async fn only_the_gateway_that_sends_the_secret_gets_a_decision(
    _p: PgPoolOptions,
    conn: PgConnectOptions,
) {
    let (mut t, forward_auth) = spawn_forward_auth(&conn, "msgflash").await;
    t.create_tenant("acme", "pro").await;
    let (secret, _) = t.create_key("acme").await;
    let path = "/auth/traefik?surface=public_api";
    for (case, sent) in [
        ("no secret", None),
        (
            "a wrong secret",
            Some("gateway-secret-for-tests-0123456780"),
        ),
        ("a prefix of it", Some(&GATEWAY_SECRET[..20])),
    ] {
        let mut headers = vec![("x-api-key", secret.as_str())];
        headers.extend(sent.map(|s| ("x-tollgate-gateway-secret", s)));
        let r = http(forward_auth, "GET", path, &headers).await;
        assert_eq!(r.status, 401, "{case}: {r:?}");
        assert_eq!(r.json()["error"], "gateway_unauthenticated", "{case}");
        assert_eq!(r.header("x-tollgate-tenant-id"), "", "{case}");
        assert!(!r.body.contains(GATEWAY_SECRET), "{case}");
    }
    let headers = [
        ("x-api-key", secret.as_str()),
        ("x-tollgate-gateway-secret", GATEWAY_SECRET),
    ];
    let r = http(forward_auth, "GET", path, &headers).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("x-tollgate-tenant-id"), "acme");
    // Probes need no secret.
    assert_eq!(http(forward_auth, "GET", "/healthz", &[]).await.status, 200);
    assert_eq!(http(forward_auth, "GET", "/readyz", &[]).await.status, 200);
}

#[sqlx::test]
async fn a_malformed_route_policy_is_an_error_never_an_allow_and_nginx_fails_closed(
    _p: PgPoolOptions,
    conn: PgConnectOptions,
) {
    let (mut t, forward_auth) = spawn_forward_auth(&conn, "msgflash").await;
    t.create_tenant("acme", "pro").await;
    let (secret, _) = t.create_key("acme").await;
    let headers = [
        ("x-api-key", secret.as_str()),
        ("x-tollgate-gateway-secret", GATEWAY_SECRET),
    ];
    let ok = http(
        forward_auth,
        "GET",
        "/auth/nginx?surface=public_api&cost=2",
        &headers,
    )
    .await;
    assert_eq!(ok.status, 200, "{ok:?}");
    for (query, field) in [
        ("", "query.surface"),
        ("surface=admin", "query.surface"),
        ("surface=public_api&cost=-1", "query.cost"),
        ("surface=public_api&limits=sometimes", "query.limits"),
        ("surface=public_api&scope=messages:send", "query.scope"),
        ("surface=public_api&surface=dashboard", "query.surface"),
    ] {
        for gateway in ["nginx", "traefik"] {
            let path = format!("/auth/{gateway}?{query}");
            let r = http(forward_auth, "GET", &path, &headers).await;
            // Neither 2xx nor 401/403: NGINX's auth_request takes it as an
            // error (its failure status); Traefik relays a 500.
            assert_eq!(r.status, 500, "{path}: {r:?}");
            assert_eq!(r.json()["error"], "invalid_route_policy", "{path}");
            assert_eq!(r.json()["violations"][0]["field"], field, "{path}");
            assert_eq!(r.header("x-tollgate-tenant-id"), "", "{path}");
        }
    }
    // Through NGINX, a location that forgot its policy fails closed.
    let upstream = Upstream::start().await;
    let nginx = Nginx::start("msgflash", forward_auth, upstream.addr).await;
    let r = nginx.get("/elsewhere", &[("x-api-key", &secret)]).await;
    assert_eq!(r.status, 503, "{r:?}");
    assert_eq!(upstream.hits(), 0);
}

#[sqlx::test]
async fn a_full_listener_closes_the_next_connection_and_serves_again_once_one_ends(
    _p: PgPoolOptions,
    conn: PgConnectOptions,
) {
    // A flood of idle connections must not take the replica's memory and
    // file descriptors: past the cap a new one is closed unanswered, and
    // the gateway fails over at once.
    let (_t, addr) = spawn_forward_auth_holding(&conn, "msgine", 2).await;
    let first = answered_connection(addr)
        .await
        .expect("the first is served");
    let _second = answered_connection(addr)
        .await
        .expect("the second is served");
    assert!(
        answered_connection(addr).await.is_none(),
        "a third is closed"
    );

    // One gateway connection ends: its slot serves a new one (once the
    // listener has seen it end).
    drop(first);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while answered_connection(addr).await.is_none() {
        assert!(tokio::time::Instant::now() < deadline, "never served again");
        tokio::task::yield_now().await;
    }
}

//! Traefik's ForwardAuth contract at the HTTP level, with the headers
//! Traefik sends.

use super::*;

/// The headers Traefik's ForwardAuth middleware sends (v2 and v3): every
/// header of the client's request, plus X-Forwarded-{Method,Proto,Host,
/// Uri,For}. The auth server's own address comes from the middleware's
/// `address`, route policy included.
fn traefik_headers<'a>(method: &'a str, uri: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("X-Forwarded-Method", method),
        ("X-Forwarded-Proto", "https"),
        ("X-Forwarded-Host", "api.example.test"),
        ("X-Forwarded-Uri", uri),
        ("X-Forwarded-For", "203.0.113.7"),
        ("X-Real-Ip", "203.0.113.7"),
        ("User-Agent", "curl/8.5.0"),
        ("Accept", "*/*"),
        ("x-tollgate-gateway-secret", GATEWAY_SECRET),
    ]
}

#[sqlx::test]
async fn traefik_forward_auth_gets_identity_headers_or_the_denial_itself(
    _p: PgPoolOptions,
    conn: PgConnectOptions,
) {
    let (mut t, forward_auth) = spawn_forward_auth(&conn, "msgflash").await;
    t.running
        .clock()
        .freeze_at("2026-11-23T10:00:00Z".parse().unwrap());
    t.create_tenant("acme", "pro").await;
    let (secret, key) = t.create_key("acme").await;
    let address = "/auth/traefik?surface=public_api&scopes=messages:send&cost=1";
    let with_key = |extra: &[(&'static str, &str)]| {
        let mut h = traefik_headers("POST", "/api/v1/messages/send?to=1");
        h.extend(extra.iter().map(|(n, v)| (*n, *v)).collect::<Vec<_>>());
        h.into_iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect::<Vec<_>>()
    };
    let call = |headers: Vec<(String, String)>| async move {
        let h: Vec<(&str, &str)> = headers
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_str()))
            .collect();
        http(forward_auth, "GET", address, &h).await
    };

    // Allowed: 2xx with the headers `authResponseHeaders` copies upstream.
    let r = call(with_key(&[("x-api-key", &secret)])).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("x-tollgate-tenant-id"), "acme");
    assert_eq!(r.header("x-tollgate-key-id"), key.key_id);
    assert_eq!(r.header("x-tollgate-plan"), "pro");
    assert_eq!(r.header("x-tollgate-environment"), "live");
    assert_eq!(r.header("x-tollgate-scopes"), key.scopes.join(","));
    assert_eq!(r.header("ratelimit-limit"), "10");
    assert_eq!(r.header("ratelimit-remaining"), "9");
    assert!(r.body.is_empty(), "{r:?}");

    // Denied: the denial itself, which Traefik relays as is.
    let r = call(with_key(&[])).await;
    let body = json!({"error": {"code": "UNAUTHORIZED", "message": "Missing API key"}});
    assert_denied(&r, 401, &body, "missing key");
    let r = call(with_key(&[("authorization", &format!("Bearer {secret}"))])).await;
    let body = json!({"error": {"code": "UNAUTHORIZED",
        "message": "Use the x-api-key header for the public API"}});
    assert_denied(&r, 401, &body, "wrong header");
    let (reader, _) = t
        .create_key_with(pb::CreateKeyRequest {
            tenant_id: "acme".into(),
            name: "reader".into(),
            scopes: vec!["messages:read".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    let r = call(with_key(&[("x-api-key", &reader)])).await;
    let body = json!({"error": {"code": "FORBIDDEN",
        "message": "The key is valid but cannot access the resource"}});
    assert_denied(&r, 403, &body, "scope missing");
    assert_eq!(r.header("x-tollgate-status"), "", "NGINX's headers only");

    // 429 with Retry-After and RateLimit-*: the 10/s limit, clock frozen.
    for i in 1..10 {
        let r = call(with_key(&[("x-api-key", &secret)])).await;
        assert_eq!(r.status, 200, "request {i}: {r:?}");
    }
    let r = call(with_key(&[("x-api-key", &secret)])).await;
    let body = json!({"error": {"code": "API_RATE_LIMIT_EXCEEDED",
        "message": "More than 10 requests/second on the same key"}});
    assert_denied(&r, 429, &body, "eleventh request in one second");
    assert_eq!(r.header("retry-after"), "1");
    assert_eq!(r.header("ratelimit-remaining"), "0");
    // The request id Traefik's client sent is the one to quote to support.
    let r = call(with_key(&[("x-request-id", "ticket-7")])).await;
    assert_eq!(r.header("x-request-id"), "ticket-7");
}

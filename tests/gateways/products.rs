//! Each reference product's whole contract through its example NGINX
//! config, and every example config valid for NGINX.

use super::*;

/// A reference product's documented contract (as in tests/envoy.rs).
struct Product {
    name: &'static str,
    plan: &'static str,
    path: &'static str,
    /// How the product's docs send the key.
    send: fn(&str) -> (&'static str, String),
    /// A way the product does not accept it.
    wrong: fn(&str) -> (&'static str, String),
    missing: Value,
    invalid: Value,
    revoked: Value,
    expired: Value,
    wrong_header: Value,
    /// A scope of the plan that `path` does not accept, and the answer.
    other_scope: &'static str,
    forbidden: Value,
    rate_limited: Value,
    /// The example config's answer while Tollgate is down.
    unavailable: Value,
}

fn msgflash() -> Product {
    let invalid =
        json!({"error": {"code": "UNAUTHORIZED", "message": "Invalid or revoked API key"}});
    Product {
        name: "msgflash",
        plan: "pro",
        path: "/api/v1/messages/send",
        send: |k| ("x-api-key", k.into()),
        wrong: |k| ("Authorization", format!("Bearer {k}")),
        missing: json!({"error": {"code": "UNAUTHORIZED", "message": "Missing API key"}}),
        revoked: invalid.clone(),
        expired: invalid.clone(),
        wrong_header: json!({"error": {"code": "UNAUTHORIZED",
            "message": "Use the x-api-key header for the public API"}}),
        invalid,
        other_scope: "messages:read",
        forbidden: json!({"error": {"code": "FORBIDDEN",
            "message": "The key is valid but cannot access the resource"}}),
        rate_limited: json!({"error": {"code": "API_RATE_LIMIT_EXCEEDED",
            "message": "More than 10 requests/second on the same key"}}),
        unavailable: json!({"error": {"code": "SERVICE_UNAVAILABLE",
            "message": "Authentication is temporarily unavailable"}}),
    }
}

fn mailsage() -> Product {
    let invalid =
        json!({"error": "Invalid API key provided", "status": 401, "code": "invalid_api_key"});
    Product {
        name: "mailsage",
        plan: "pro",
        path: "/api/v1/emails/send",
        send: |k| ("Authorization", format!("Bearer {k}")),
        wrong: |k| ("X-API-Key", k.into()),
        missing: invalid.clone(),
        revoked: invalid.clone(),
        expired: invalid.clone(),
        wrong_header: invalid.clone(),
        invalid,
        other_scope: "emails:read",
        forbidden: json!({"error": "Insufficient permissions", "status": 403,
            "code": "insufficient_permissions"}),
        rate_limited: json!({"error": "Rate limit exceeded", "status": 429,
            "code": "rate_limit_exceeded"}),
        unavailable: json!({"error": "Authentication is temporarily unavailable",
            "status": 503, "code": "service_unavailable"}),
    }
}

fn msgine() -> Product {
    let invalid =
        json!({"error": {"code": "unauthorized", "message": "Invalid or missing API key"}});
    Product {
        name: "msgine",
        plan: "business",
        path: "/api/v1/developers/sms",
        send: |k| ("X-Api-Key", k.into()),
        wrong: |k| ("Authorization", format!("Bearer {k}")),
        missing: invalid.clone(),
        revoked: invalid.clone(),
        expired: invalid.clone(),
        wrong_header: invalid.clone(),
        invalid,
        other_scope: "account:read",
        forbidden: json!({"error": {"code": "forbidden",
            "message": "Insufficient permissions for this operation"}}),
        rate_limited: json!({"error": {"code": "rate_limited", "message": "Too many requests"}}),
        unavailable: json!({"error": {"code": "service_unavailable",
            "message": "Authentication is temporarily unavailable"}}),
    }
}

fn messagesmart() -> Product {
    let envelope = |code: &str, message: &str, status: u16| json!({"success": false, "error": {"code": code, "message": message, "httpStatus": status}});
    Product {
        name: "messagesmart",
        plan: "business",
        path: "/api/v1/whatsapp/messages/text",
        send: |k| ("X-API-Key", k.into()),
        wrong: |k| ("Authorization", format!("Bearer {k}")),
        missing: envelope("api_key_missing", "API key is missing.", 401),
        invalid: envelope("api_key_invalid", "API key is invalid.", 401),
        revoked: envelope("api_key_revoked", "API key has been revoked.", 401),
        expired: envelope("api_key_expired", "API key has expired.", 401),
        wrong_header: envelope("api_key_missing", "API key is missing.", 401),
        other_scope: "whatsapp:read",
        forbidden: envelope(
            "api_key_forbidden",
            "API key is not allowed to perform this action.",
            403,
        ),
        rate_limited: envelope(
            "rate_limit_exceeded",
            "Too many requests. Please try again later.",
            429,
        ),
        unavailable: envelope(
            "service_unavailable",
            "Authentication is temporarily unavailable.",
            503,
        ),
    }
}

/// The whole documented contract of `p`, through NGINX's `auth_request`.
async fn the_contract_holds_through_nginx(conn: &PgConnectOptions, p: Product) {
    let (mut t, forward_auth) = spawn_forward_auth(conn, p.name).await;
    // No time passes unless the test moves it: rate limits are exact.
    t.running
        .clock()
        .freeze_at("2026-11-23T10:00:00Z".parse().unwrap());
    let upstream = Upstream::start().await;
    let nginx = Nginx::start(p.name, forward_auth, upstream.addr).await;
    t.create_tenant("acme", p.plan).await;
    let (secret, key) = t.create_key("acme").await;

    // A valid key passes; the upstream learns who calls, never the key, and
    // cannot be told another tenant or limit by the client.
    let (header, value) = (p.send)(&secret);
    let r = nginx
        .get(
            p.path,
            &[
                (header, &value),
                ("x-tollgate-tenant-id", "victim"),
                ("x-tollgate-plan", "enterprise"),
            ],
        )
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert!(
        !r.body.contains(&secret),
        "the key reached the upstream: {r:?}"
    );
    let seen = &r.json()["headers"];
    assert_eq!(seen["x-tollgate-tenant-id"], json!(["acme"]));
    assert_eq!(seen["x-tollgate-key-id"], json!([key.key_id]));
    assert_eq!(seen["x-tollgate-plan"], json!([p.plan]));
    assert_eq!(seen["x-tollgate-environment"], json!(["live"]));
    assert_eq!(seen["x-tollgate-scopes"], json!([key.scopes.join(",")]));
    assert_eq!(seen["x-tollgate-subject"], json!([key.key_id]));
    assert_eq!(seen.get(header.to_ascii_lowercase()), None);
    assert_eq!(seen.get("authorization"), None);
    assert_eq!(seen.get("x-tollgate-gateway-secret"), None);
    assert!(!r.body.contains(GATEWAY_SECRET));
    assert_eq!(upstream.hits(), 1);

    // Refusals, exactly as documented, never reaching the upstream.
    let prefix = t.profile.key_format.prefix().to_string();
    let malformed = format!("{prefix}_live_0123");
    let unknown = t.profile.key_format.generate("live").expose().to_string();
    let cases = [
        ("missing key", None, &p.missing),
        ("malformed key", Some((p.send)(&malformed)), &p.invalid),
        ("unknown key", Some((p.send)(&unknown)), &p.invalid),
        ("wrong header", Some((p.wrong)(&secret)), &p.wrong_header),
    ];
    for (case, header, body) in cases {
        let headers: Vec<(&str, &str)> = header.iter().map(|(h, v)| (*h, v.as_str())).collect();
        assert_denied(&nginx.get(p.path, &headers).await, 401, body, case);
    }
    assert_eq!(upstream.hits(), 1);

    // 403: a valid key without the location's scope.
    let (reader, _) = t
        .create_key_with(pb::CreateKeyRequest {
            tenant_id: "acme".into(),
            name: "reader".into(),
            scopes: vec![p.other_scope.into()],
            ..Default::default()
        })
        .await
        .unwrap();
    let (header, value) = (p.send)(&reader);
    let r = nginx.get(p.path, &[(header, &value)]).await;
    assert_denied(&r, 403, &p.forbidden, "scope missing");
    assert_eq!(upstream.hits(), 1);

    // 429: the product's body, Retry-After and RateLimit-* from Tollgate.
    let (limited, _) = t
        .create_key_with(pb::CreateKeyRequest {
            tenant_id: "acme".into(),
            name: "two a minute".into(),
            limits: vec![pb::LimitSpec {
                scope: "key".into(),
                period: "minute".into(),
                limit: 2,
                ..Default::default()
            }],
            ..Default::default()
        })
        .await
        .unwrap();
    let (header, value) = (p.send)(&limited);
    for i in 0..2 {
        let r = nginx.get(p.path, &[(header, &value)]).await;
        assert_eq!(r.status, 200, "request {i}: {r:?}");
        assert_eq!(r.header("ratelimit-remaining"), (1 - i).to_string());
    }
    let r = nginx.get(p.path, &[(header, &value)]).await;
    assert_denied(&r, 429, &p.rate_limited, "third request in a minute");
    let retry: u64 = r.header("retry-after").parse().unwrap_or(0);
    assert!((1..=60).contains(&retry), "Retry-After: {r:?}");
    assert_eq!(r.header("ratelimit-limit"), "2");
    assert_eq!(r.header("ratelimit-remaining"), "0");
    assert_eq!(upstream.hits(), 3);
    assert_eq!(
        t.profile.denial_body(Reason::RateLimited),
        p.rate_limited.to_string(),
        "the profile's own body, relayed unchanged"
    );

    // Revoked: refused as soon as this instance hears of it.
    let mut events = t.invalidations();
    t.revoke(&key.key_id).await;
    let id: uuid::Uuid = key.key_id.parse().unwrap();
    wait_for(&mut events, |e| *e == Invalidation::Key(id)).await;
    let (header, value) = (p.send)(&secret);
    let r = nginx.get(p.path, &[(header, &value)]).await;
    assert_denied(&r, 401, &p.revoked, "revoked key");

    // Expired: works until its lifetime is over, then refused.
    let (short_lived, _) = t
        .create_key_with(pb::CreateKeyRequest {
            tenant_id: "acme".into(),
            name: "short-lived".into(),
            ttl_seconds: Some(60),
            ..Default::default()
        })
        .await
        .unwrap();
    let (header, value) = (p.send)(&short_lived);
    assert_eq!(nginx.get(p.path, &[(header, &value)]).await.status, 200);
    t.running.clock().advance(Duration::from_secs(61));
    let r = nginx.get(p.path, &[(header, &value)]).await;
    assert_denied(&r, 401, &p.expired, "expired key");
    assert_eq!(upstream.hits(), 4);

    // Tollgate down: the configured failure status and body, never a pass.
    let Tollgate {
        running,
        auth,
        tenants,
        health,
        channel,
        ..
    } = t;
    drop((auth, tenants, health, channel));
    running.shutdown().await.unwrap();
    let (header, value) = (p.send)(&short_lived);
    let r = nginx.get(p.path, &[(header, &value)]).await;
    assert_eq!(r.status, 503, "{r:?}");
    assert_eq!(r.json(), p.unavailable);
    assert_eq!(upstream.hits(), 4);
}

#[sqlx::test]
async fn msgflash_through_nginx(_p: PgPoolOptions, conn: PgConnectOptions) {
    the_contract_holds_through_nginx(&conn, msgflash()).await;
}

#[sqlx::test]
async fn mailsage_through_nginx(_p: PgPoolOptions, conn: PgConnectOptions) {
    the_contract_holds_through_nginx(&conn, mailsage()).await;
}

#[sqlx::test]
async fn msgine_through_nginx(_p: PgPoolOptions, conn: PgConnectOptions) {
    the_contract_holds_through_nginx(&conn, msgine()).await;
}

#[sqlx::test]
async fn messagesmart_through_nginx(_p: PgPoolOptions, conn: PgConnectOptions) {
    the_contract_holds_through_nginx(&conn, messagesmart()).await;
}

#[test]
fn every_example_config_is_valid_for_nginx() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/nginx");
    let prefix = std::env::temp_dir().join(format!("tollgate-nginx-t-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&prefix).unwrap();
    let mut checked = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let globals = format!("pid {}/nginx.pid; error_log stderr;", prefix.display());
        let out = std::process::Command::new(nginx_bin())
            .arg("-t")
            .arg("-p")
            .arg(&prefix)
            .arg("-c")
            .arg(&path)
            .arg("-g")
            .arg(globals)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        checked.push(path.file_name().unwrap().to_string_lossy().into_owned());
    }
    let _ = std::fs::remove_dir_all(&prefix);
    checked.sort();
    assert_eq!(
        checked,
        [
            "mailsage.conf",
            "messagesmart.conf",
            "msgflash.conf",
            "msgine.conf"
        ]
    );
}

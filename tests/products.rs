//! The four reference products, each read against its document in
//! `shared/reference/` point by point, through the real gRPC surface on a
//! real Postgres: key format, header, expiry, plans, limits, error codes and
//! bodies. One test per product; each assertion quotes what the document
//! says (or says which numbers are ours where the document is silent).

mod common;

use chrono::{DateTime, Utc};
use common::*;
use serde_json::{json, Value};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tollgate::grpc::pb;

const DAY: u64 = 24 * 3600;

fn at(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).unwrap().into()
}

/// A product's Tollgate, its clock frozen so no limit refills mid-test.
struct Product {
    t: Tollgate,
    /// How a client sends the key: header name and the value's prefix.
    header: (&'static str, &'static str),
}

impl Product {
    async fn start(
        conn: &PgConnectOptions,
        name: &str,
        header: (&'static str, &'static str),
    ) -> Self {
        let t = spawn(conn, name).await;
        t.running.clock().freeze_at(at("2026-12-02T10:00:00Z"));
        Product { t, header }
    }

    /// A request carrying `key` the way the document says to send it.
    fn request(&self, key: &str, cost: u32) -> pb::AuthenticateRequest {
        let (name, scheme) = self.header;
        pb::AuthenticateRequest {
            headers: [(name.to_string(), format!("{scheme}{key}"))].into(),
            cost: (cost > 0).then_some(cost),
            ..Default::default()
        }
    }

    async fn call(&mut self, key: &str) -> pb::AuthenticateResponse {
        let req = self.request(key, 0);
        self.t.authenticate_with(req).await.unwrap()
    }

    async fn spend(&mut self, key: &str) -> pb::AuthenticateResponse {
        let req = self.request(key, 1);
        self.t.authenticate_with(req).await.unwrap()
    }

    async fn key(
        &mut self,
        tenant: &str,
        env: &str,
    ) -> Result<(String, pb::ApiKey), tonic::Status> {
        self.t
            .create_key_with(pb::CreateKeyRequest {
                tenant_id: tenant.into(),
                name: format!("{env} key"),
                environment: env.into(),
                ..Default::default()
            })
            .await
    }

    async fn set_status(&mut self, tenant: &str, status: &str) {
        let mut rx = self.t.invalidations();
        self.t
            .tenants
            .update_tenant(op(pb::UpdateTenantRequest {
                tenant_id: tenant.into(),
                update_mask: vec!["subscription_status".into()],
                subscription_status: status.into(),
                ..Default::default()
            }))
            .await
            .unwrap();
        wait_for(&mut rx, |e| {
            matches!(e, tollgate::store::Invalidation::Tenant(_))
        })
        .await;
    }

    async fn revoke(&mut self, key_id: &str) {
        let mut rx = self.t.invalidations();
        self.t.revoke(key_id).await;
        wait_for(&mut rx, |e| {
            matches!(e, tollgate::store::Invalidation::Key(_))
        })
        .await;
    }

    /// Creates keys on `plan` until the cap: the documented number fit, one
    /// more is refused with FAILED_PRECONDITION.
    async fn holds_exactly(&mut self, plan: &str, cap: usize) {
        let tenant = format!("cap-{plan}");
        self.t.create_tenant(&tenant, plan).await;
        for i in 0..cap {
            self.key(&tenant, "live")
                .await
                .unwrap_or_else(|e| panic!("{plan}: key {} of {cap}: {e:?}", i + 1));
        }
        let err = self.key(&tenant, "live").await.unwrap_err();
        assert_eq!(
            err.code(),
            tonic::Code::FailedPrecondition,
            "{plan}: key {} of {cap}",
            cap + 1
        );
    }

    /// Spends `n` requests (all allowed), then the next is the denial.
    async fn denial_after(&mut self, key: &str, n: u32) -> pb::Denial {
        for i in 0..n {
            let r = self.spend(key).await;
            assert!(r.allowed, "request {} of {n}: {r:?}", i + 1);
        }
        self.spend(key)
            .await
            .denial
            .expect("the next one is refused")
    }

    fn advance(&self, secs: u64) {
        self.t
            .running
            .clock()
            .advance(std::time::Duration::from_secs(secs));
    }
}

/// The denial's reason, code, HTTP status and parsed body.
fn answer(d: &pb::Denial) -> (&str, &str, u32, Value) {
    let body = serde_json::from_str(&d.body).expect("the body is JSON");
    (d.reason.as_str(), d.code.as_str(), d.http_status, body)
}

fn denied(r: pb::AuthenticateResponse) -> pb::Denial {
    assert!(!r.allowed, "{r:?}");
    r.denial.unwrap()
}

/// `prefix_env_` then `len` characters all in `alphabet`.
fn has_format(key: &str, prefix_env: &str, len: usize, alphabet: fn(u8) -> bool) -> bool {
    key.strip_prefix(prefix_env)
        .is_some_and(|body| body.len() == len && body.bytes().all(alphabet))
}

fn lower_hex(b: u8) -> bool {
    b.is_ascii_digit() || (b'a'..=b'f').contains(&b)
}

/// A well-formed key of this product that was never issued.
fn stranger(p: &Product, env: &str) -> String {
    p.t.profile.key_format.generate(env).expose().to_string()
}

#[sqlx::test]
async fn msgflash_as_documented(_p: PgPoolOptions, conn: PgConnectOptions) {
    // "x-api-key: <api_key>" on the public API.
    let mut p = Product::start(&conn, "msgflash", ("x-api-key", "")).await;
    p.t.create_tenant("acme", "free").await;

    // "prefix msgf_live_, 64 lowercase hexadecimal characters".
    let (key, record) = p.key("acme", "live").await.unwrap();
    assert!(has_format(&key, "msgf_live_", 64, lower_hex), "{key}");
    assert!(p.call(&key).await.allowed);

    // No expiry is documented: none is set, and years later the key works.
    assert_eq!(record.expires_at, None, "no hidden expiry");
    p.advance(3 * 365 * DAY);
    assert!(p.call(&key).await.allowed, "three years on");

    // "Do not use Authorization: Bearer <api_key> for the public API."
    let bearer =
        p.t.authenticate_with(pb::AuthenticateRequest {
            headers: [("authorization".into(), format!("Bearer {key}"))].into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let d = denied(bearer);
    assert_eq!(
        (d.reason.as_str(), d.http_status),
        ("WRONG_CREDENTIAL_FOR_SURFACE", 401)
    );

    // UNAUTHORIZED 401 "Missing, invalid, or revoked key", body as the example.
    let unauthorized =
        json!({"error": {"code": "UNAUTHORIZED", "message": "Invalid or revoked API key"}});
    let d = denied(p.call(&stranger(&p, "live")).await);
    assert_eq!(
        answer(&d),
        ("KEY_UNKNOWN", "UNAUTHORIZED", 401, unauthorized.clone())
    );
    let d = denied(p.t.authenticate_with(Default::default()).await.unwrap());
    assert_eq!((d.code.as_str(), d.http_status), ("UNAUTHORIZED", 401));

    // API_RATE_LIMIT_EXCEEDED 429: "More than 10 requests/second on the same key".
    let d = p.denial_after(&key, 10).await;
    assert_eq!(
        answer(&d),
        (
            "RATE_LIMITED",
            "API_RATE_LIMIT_EXCEEDED",
            429,
            json!({"error": {"code": "API_RATE_LIMIT_EXCEEDED",
                "message": "More than 10 requests/second on the same key"}})
        )
    );
    assert!(d.retry_after_seconds >= 1);

    // SUBSCRIPTION_INACTIVE 403 on the public API.
    p.set_status("acme", "canceled").await;
    let d = denied(p.call(&key).await);
    assert_eq!(
        answer(&d),
        (
            "SUBSCRIPTION_INACTIVE",
            "SUBSCRIPTION_INACTIVE",
            403,
            json!({"error": {"code": "SUBSCRIPTION_INACTIVE", "message":
                "The account no longer has an active subscription for the requested action"}})
        )
    );
    p.set_status("acme", "active").await;

    // "Revocation is immediate."
    p.revoke(&record.key_id).await;
    let d = denied(p.call(&key).await);
    assert_eq!(
        answer(&d),
        ("KEY_REVOKED", "UNAUTHORIZED", 401, unauthorized)
    );

    // "Number of keys per plan": Free 1, Starter 3, Pro 10, Plus 10.
    for (plan, cap) in [("free", 1), ("starter", 3), ("pro", 10), ("plus", 10)] {
        p.holds_exactly(plan, cap).await;
    }
}

#[sqlx::test]
async fn mailsage_as_documented(_p: PgPoolOptions, conn: PgConnectOptions) {
    // "Authorization: Bearer YOUR_API_KEY".
    let mut p = Product::start(&conn, "mailsage", ("Authorization", "Bearer ")).await;
    p.t.create_tenant("acme", "free").await;

    // Live keys "ms_live_xxxxxxxxxxxxxxxxxxxx", test keys "ms_test_…":
    // 20 characters (base62 is ours: the doc shows only placeholders).
    let (live, record) = p.key("acme", "live").await.unwrap();
    let (test, _) = p.key("acme", "test").await.unwrap();
    let base62 = |b: u8| b.is_ascii_alphanumeric();
    assert!(has_format(&live, "ms_live_", 20, base62), "{live}");
    assert!(has_format(&test, "ms_test_", 20, base62), "{test}");
    assert!(p.call(&live).await.allowed);
    assert!(p.call(&test).await.allowed);

    // Keys "Can be revoked at any time"; no expiry is documented.
    assert_eq!(record.expires_at, None, "no hidden expiry");
    p.advance(3 * 365 * DAY);
    assert!(p.call(&live).await.allowed, "three years on");

    // 401 "Invalid API key", body as the example.
    let invalid =
        json!({"error": "Invalid API key provided", "status": 401, "code": "invalid_api_key"});
    let d = denied(p.call(&stranger(&p, "live")).await);
    assert_eq!(
        answer(&d),
        ("KEY_UNKNOWN", "invalid_api_key", 401, invalid.clone())
    );
    let d = denied(p.t.authenticate_with(Default::default()).await.unwrap());
    assert_eq!(
        answer(&d),
        (
            "CREDENTIAL_MISSING",
            "invalid_api_key",
            401,
            invalid.clone()
        )
    );

    // Free: "100 requests/minute" (per account); test keys get "Higher rate
    // limits for testing" (twice, ours).
    let d = p.denial_after(&live, 100).await;
    assert_eq!(
        answer(&d),
        (
            "RATE_LIMITED",
            "rate_limit_exceeded",
            429,
            json!({"error": "Rate limit exceeded", "status": 429, "code": "rate_limit_exceeded"})
        )
    );
    let d = p.denial_after(&test, 200).await;
    assert_eq!(d.http_status, 429);

    // 403 "Insufficient permissions": a key without the required permission.
    let r =
        p.t.authenticate_with(pb::AuthenticateRequest {
            required_scopes: vec!["domains:manage".into()],
            ..p.request(&live, 0)
        })
        .await
        .unwrap();
    let d = denied(r);
    assert_eq!((d.reason.as_str(), d.http_status), ("SCOPE_MISSING", 403));

    // "Verify your API key is active": a revoked key is the same 401.
    p.revoke(&record.key_id).await;
    let d = denied(p.call(&live).await);
    assert_eq!(answer(&d), ("KEY_REVOKED", "invalid_api_key", 401, invalid));
}

#[sqlx::test]
async fn msgine_as_documented(_p: PgPoolOptions, conn: PgConnectOptions) {
    // "X-Api-Key: YOUR_API_KEY".
    let mut p = Product::start(&conn, "msgine", ("X-Api-Key", "")).await;
    p.t.create_tenant("acme", "developer").await;

    // The SDK example shows "msgine_live_abc123..." (the body is elided:
    // 64 lowercase hex is ours).
    let (key, record) = p.key("acme", "live").await.unwrap();
    assert!(has_format(&key, "msgine_live_", 64, lower_hex), "{key}");
    assert!(p.call(&key).await.allowed);

    // "Rotate API keys regularly" is advice, not an expiry: none is set.
    assert_eq!(record.expires_at, None, "no hidden expiry");
    p.advance(3 * 365 * DAY);
    assert!(p.call(&key).await.allowed, "three years on");

    // 401 unauthorized "Invalid or missing API key".
    let unauthorized =
        json!({"error": {"code": "unauthorized", "message": "Invalid or missing API key"}});
    let d = denied(p.call(&stranger(&p, "live")).await);
    assert_eq!(
        answer(&d),
        ("KEY_UNKNOWN", "unauthorized", 401, unauthorized.clone())
    );
    let d = denied(p.t.authenticate_with(Default::default()).await.unwrap());
    assert_eq!(
        answer(&d),
        (
            "CREDENTIAL_MISSING",
            "unauthorized",
            401,
            unauthorized.clone()
        )
    );

    // 403 forbidden "Insufficient permissions for this operation".
    let r =
        p.t.authenticate_with(pb::AuthenticateRequest {
            required_scopes: vec!["webhooks:manage".into()],
            ..p.request(&key, 0)
        })
        .await
        .unwrap();
    assert_eq!(
        answer(&denied(r)),
        (
            "SCOPE_MISSING",
            "forbidden",
            403,
            json!({"error": {"code": "forbidden",
                "message": "Insufficient permissions for this operation"}})
        )
    );

    // Rate limits are not in the reference: 60/minute per key, ours.
    let d = p.denial_after(&key, 60).await;
    assert_eq!((d.code.as_str(), d.http_status), ("rate_limited", 429));

    // "Each key can be revoked independently without affecting others."
    let (other, _) = p.key("acme", "live").await.unwrap();
    p.revoke(&record.key_id).await;
    let d = denied(p.call(&key).await);
    assert_eq!(
        answer(&d),
        ("KEY_REVOKED", "unauthorized", 401, unauthorized)
    );
    assert!(p.call(&other).await.allowed);
}

#[sqlx::test]
async fn messagesmart_as_documented(_p: PgPoolOptions, conn: PgConnectOptions) {
    // "X-API-Key: ms_live_1a2b3c4d5e6f7g8h9i0j".
    let mut p = Product::start(&conn, "messagesmart", ("X-API-Key", "")).await;
    p.t.create_tenant("shop", "default").await;
    let envelope = |code: &str, message: &str, status: u32| json!({"success": false, "error": {"code": code, "message": message, "httpStatus": status}});

    // 20 lower-case alphanumerics, as in the example.
    let (key, record) = p.key("shop", "live").await.unwrap();
    let base36 = |b: u8| b.is_ascii_digit() || b.is_ascii_lowercase();
    assert!(has_format(&key, "ms_live_", 20, base36), "{key}");
    assert!(p.call(&key).await.allowed);

    // Missing API Key (401) and Invalid API Key (401).
    let d = denied(p.t.authenticate_with(Default::default()).await.unwrap());
    assert_eq!(
        answer(&d),
        (
            "CREDENTIAL_MISSING",
            "api_key_missing",
            401,
            envelope("api_key_missing", "API key is missing.", 401)
        )
    );
    let d = denied(p.call(&stranger(&p, "live")).await);
    assert_eq!(
        answer(&d),
        (
            "KEY_UNKNOWN",
            "api_key_invalid",
            401,
            envelope("api_key_invalid", "API key is invalid.", 401)
        )
    );

    // Rate limit "default: 60 requests per minute", then Rate Limit Exceeded (429).
    let d = p.denial_after(&key, 60).await;
    assert_eq!(
        answer(&d),
        (
            "RATE_LIMITED",
            "rate_limit_exceeded",
            429,
            envelope(
                "rate_limit_exceeded",
                "Too many requests. Please try again later.",
                429
            )
        )
    );
    assert!(
        d.retry_after_seconds >= 1,
        "may include a Retry-After header"
    );

    // Quota limit per period: a key's own monthly quota (the plan's amount is
    // ours), then Quota Exceeded (429).
    let (small, _) =
        p.t.create_key_with(pb::CreateKeyRequest {
            tenant_id: "shop".into(),
            name: "small quota".into(),
            limits: vec![pb::LimitSpec {
                scope: "key".into(),
                period: "month".into(),
                limit: 3,
                ..Default::default()
            }],
            ..Default::default()
        })
        .await
        .unwrap();
    let d = p.denial_after(&small, 3).await;
    assert_eq!(
        answer(&d),
        (
            "QUOTA_EXHAUSTED",
            "api_key_quota_exceeded",
            429,
            envelope(
                "api_key_quota_exceeded",
                "API key quota has been exceeded.",
                429
            )
        )
    );

    // Revoked API Key (401): "revoked manually".
    let (revoked, revoked_record) = p.key("shop", "live").await.unwrap();
    p.revoke(&revoked_record.key_id).await;
    let d = denied(p.call(&revoked).await);
    assert_eq!(
        answer(&d),
        (
            "KEY_REVOKED",
            "api_key_revoked",
            401,
            envelope("api_key_revoked", "API key has been revoked.", 401)
        )
    );

    // "Keys expire after a configured lifetime (default: 365 days)", then
    // Expired API Key (401).
    let created = record.created_at.unwrap().seconds;
    let expires = record
        .expires_at
        .expect("the documented default lifetime")
        .seconds;
    assert_eq!(expires - created, 365 * DAY as i64);
    p.advance(365 * DAY - 60);
    assert!(p.call(&key).await.allowed, "a minute before a year is up");
    p.advance(61);
    let d = denied(p.call(&key).await);
    assert_eq!(
        answer(&d),
        (
            "KEY_EXPIRED",
            "api_key_expired",
            401,
            envelope("api_key_expired", "API key has expired.", 401)
        )
    );
}

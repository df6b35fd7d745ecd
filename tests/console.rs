//! The dashboard surface over real gRPC against real Postgres: JWTs from
//! several issuers (secrets, PEM keys, JWKS files and URLs), key rotation
//! through JWKS, and the refusals; console accounts (sign-up, login,
//! refresh rotation, email verification, password reset through the signed
//! webhook, throttling); users disabled, deleted and re-roled; tenant-scoped
//! management by console users; the audit log; and no secret in the logs.

#[path = "console/accounts.rs"]
mod accounts;
#[path = "console/audit.rs"]
mod audit;
mod common;
#[path = "console/harness.rs"]
mod harness;
#[path = "console/jwks_server.rs"]
mod jwks_server;
#[path = "support/jwt_keys.rs"]
mod jwt_keys;
#[path = "console/logs.rs"]
mod logs;
#[path = "console/mailbox.rs"]
mod mailbox;
#[path = "console/manage.rs"]
mod manage;
#[path = "console/oidc.rs"]
mod oidc;
#[path = "console/subscription.rs"]
mod subscription;
#[path = "console/users.rs"]
mod users;

use std::collections::HashMap;
use std::time::Duration;

use jsonwebtoken::Algorithm;
use secrecy::SecretString;
use serde_json::json;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use common::*;
use jwks_server::JwksServer;
use jwt_keys::{claims, hs256_with, unsigned, TestKey};
use tollgate::crypto::issuers::{IssuerSettings, PublicKeySettings};
use tollgate::dashboard::{Dashboard, JwtSettings};
use tollgate::grpc::pb;

const AUD: &str = "msgflash-dashboard";

fn issuer(name: &str) -> IssuerSettings {
    IssuerSettings {
        issuer: name.into(),
        tenants: Some(tollgate::crypto::issuers::IssuerTenants::Word("all".into())),
        audiences: vec![AUD.into()],
        refresh_seconds: 1,
        min_refresh_seconds: 1,
        ..IssuerSettings::default()
    }
}

async fn spawn_dashboard(conn: &PgConnectOptions, issuers: Vec<IssuerSettings>) -> Tollgate {
    let settings = JwtSettings {
        issuers,
        ..JwtSettings::default()
    };
    let mut opts = Options::new(profile("msgflash"));
    opts.dashboard = Dashboard::new(&settings, None).unwrap();
    spawn_with(conn, opts).await
}

/// Authenticate a bearer JWT sent in headers on `surface`.
async fn bearer(t: &mut Tollgate, surface: &str, jwt: &str) -> pb::AuthenticateResponse {
    let headers = HashMap::from([("Authorization".to_string(), format!("Bearer {jwt}"))]);
    t.authenticate_with(pb::AuthenticateRequest {
        headers,
        surface: surface.into(),
        ..Default::default()
    })
    .await
    .unwrap()
}

async fn dashboard(t: &mut Tollgate, jwt: &str) -> pb::AuthenticateResponse {
    bearer(t, "dashboard", jwt).await
}

/// Waits (bounded) on an issuer's refresh counters until `reached` holds.
async fn refreshed(
    stats: &tollgate::crypto::jwks::RefreshStats,
    what: &str,
    reached: impl FnMut(&tollgate::crypto::jwks::RefreshStats) -> bool,
) {
    tokio::time::timeout(Duration::from_secs(10), stats.wait_until(reached))
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for: {what}"));
}

#[sqlx::test]
async fn jwts_from_several_issuers_are_verified_and_the_plan_comes_from_the_tenant(
    _p: PgPoolOptions,
    conn: PgConnectOptions,
) {
    let hs = TestKey::hs(Algorithm::HS512, "hs");
    let rsa = TestKey::rsa(Algorithm::PS256, "rsa-1");
    let es = TestKey::es256("es-1");
    let ed = TestKey::ed25519("ed-1");
    let es384 = TestKey::es384("es384-1");
    let server = JwksServer::start(jwt_keys::jwks(&[&es])).await;
    let dir = std::env::temp_dir().join(format!("tg-jwks-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let jwks_file = dir.join("jwks.json");
    std::fs::write(&jwks_file, jwt_keys::jwks(&[&ed, &es384])).unwrap();

    let issuers = vec![
        IssuerSettings {
            secret: Some(SecretString::from(
                String::from_utf8(hex_of(&hs.secret)).unwrap(),
            )),
            ..issuer("https://hs.example")
        },
        IssuerSettings {
            tenant_claim: "org".into(),
            scope_claim: "permissions".into(),
            public_keys: vec![PublicKeySettings {
                kid: Some("rsa-1".into()),
                algorithm: "RS256".into(),
                pem: Some(rsa.public_pem.clone()),
                file: None,
            }],
            ..issuer("https://rsa.example")
        },
        IssuerSettings {
            jwks_url: Some(server.url()),
            allow_insecure_http: true,
            ..issuer("https://url.example")
        },
        IssuerSettings {
            jwks_file: Some(jwks_file.clone()),
            ..issuer("https://file.example")
        },
    ];
    let mut t = spawn_dashboard(&conn, issuers).await;
    t.create_tenant("acme", "pro").await;
    let stats = t
        .running
        .jwks_refreshes("https://url.example")
        .unwrap()
        .clone();
    refreshed(&stats, "first JWKS fetch", |s| s.ok() >= 1).await;

    // The HS issuer's secret is the hex text of the bytes (config holds text).
    let hs_key = TestKey {
        encoding: jsonwebtoken::EncodingKey::from_secret(&hex_of(&hs.secret)),
        ..TestKey::hs(Algorithm::HS512, "hs")
    };
    let mut with_plan = claims("https://hs.example", AUD, "acme", 300);
    with_plan["plan"] = json!("enterprise"); // ignored: the tenant record decides
    let tokens = [
        hs_key.sign(&with_plan),
        rsa.sign(
            &json!({"iss": "https://rsa.example", "aud": AUD, "sub": "u-rsa",
            "org": "acme", "permissions": ["read"], "exp": jwt_keys::now() + 300}),
        ),
        es.sign(&claims("https://url.example", AUD, "acme", 300)),
        ed.sign(&claims("https://file.example", AUD, "acme", 300)),
        es384.sign(&claims("https://file.example", AUD, "acme", 300)),
    ];
    for token in &tokens {
        let r = dashboard(&mut t, token).await;
        assert!(r.allowed, "{r:?}");
        let p = r.principal.unwrap();
        assert_eq!(p.tenant_id, "acme");
        assert_eq!(p.plan, "pro");
        assert_eq!(p.key_id, "");
        assert_eq!(p.credential_type, pb::CredentialType::Jwt as i32);
    }
    let r = dashboard(&mut t, &tokens[1]).await.principal.unwrap();
    assert_eq!(
        (r.subject.as_str(), r.scopes),
        ("u-rsa", vec!["read".to_string()])
    );

    // The raw token field works too, with required scopes checked.
    let r = t
        .authenticate_with(pb::AuthenticateRequest {
            token: tokens[2].clone(),
            surface: "dashboard".into(),
            required_scopes: vec!["write".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(r.allowed, "{r:?}");
    let r = t
        .authenticate_with(pb::AuthenticateRequest {
            token: tokens[1].clone(),
            surface: "dashboard".into(),
            required_scopes: vec!["write".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(reason(&r), "SCOPE_MISSING");
    std::fs::remove_dir_all(dir).unwrap();
}

fn hex_of(bytes: &[u8]) -> Vec<u8> {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<String>()
        .into_bytes()
}

#[sqlx::test]
async fn bad_jwts_are_refused_with_the_right_reason(_p: PgPoolOptions, conn: PgConnectOptions) {
    let rsa = TestKey::rsa(Algorithm::RS256, "rsa-1");
    let iss = "https://rsa.example";
    let mut t = spawn_dashboard(
        &conn,
        vec![IssuerSettings {
            public_keys: vec![PublicKeySettings {
                kid: Some("rsa-1".into()),
                algorithm: "RS256".into(),
                pem: Some(rsa.public_pem.clone()),
                file: None,
            }],
            ..issuer(iss)
        }],
    )
    .await;
    t.create_tenant("acme", "pro").await;
    t.create_tenant("frozen", "pro").await;
    t.tenants
        .update_tenant(op(pb::UpdateTenantRequest {
            tenant_id: "frozen".into(),
            update_mask: vec!["subscription_status".into()],
            subscription_status: "suspended".into(),
            ..Default::default()
        }))
        .await
        .unwrap();

    let good = rsa.sign(&claims(iss, AUD, "acme", 300));
    assert!(dashboard(&mut t, &good).await.allowed);

    let mut nbf = claims(iss, AUD, "acme", 600);
    nbf["nbf"] = json!(jwt_keys::now() + 300);
    let parts: Vec<&str> = good.split('.').collect();
    let tampered = format!("{}.{}x.{}", parts[0], parts[1], parts[2]);
    let cases = [
        (
            "expired",
            rsa.sign(&claims(iss, AUD, "acme", -120)),
            "TOKEN_EXPIRED",
        ),
        ("not yet valid", rsa.sign(&nbf), "TOKEN_INVALID"),
        (
            "wrong issuer",
            rsa.sign(&claims("https://other.example", AUD, "acme", 300)),
            "TOKEN_INVALID",
        ),
        (
            "wrong audience",
            rsa.sign(&claims(iss, "another-app", "acme", 300)),
            "TOKEN_INVALID",
        ),
        ("tampered", tampered, "TOKEN_INVALID"),
        (
            "alg none",
            unsigned(&claims(iss, AUD, "acme", 300)),
            "TOKEN_INVALID",
        ),
        (
            "RSA public key as HMAC secret",
            hs256_with(
                rsa.public_pem.as_bytes(),
                "rsa-1",
                &claims(iss, AUD, "acme", 300),
            ),
            "TOKEN_INVALID",
        ),
        (
            "unknown tenant",
            rsa.sign(&claims(iss, AUD, "nobody", 300)),
            "TOKEN_INVALID",
        ),
        ("garbage", "not.a.jwt".to_string(), "TOKEN_INVALID"),
        (
            "oversized",
            format!("{good}{}", "A".repeat(9000)),
            "TOKEN_INVALID",
        ),
    ];
    for (what, token, expected) in cases {
        let r = dashboard(&mut t, &token).await;
        assert_eq!(reason(&r), expected, "{what}: {r:?}");
        let d = r.denial.unwrap();
        assert_eq!(
            d.http_status,
            if expected == "SUBSCRIPTION_INACTIVE" {
                403
            } else {
                401
            }
        );
    }

    // A JWT on the public API (Bearer refused there) is the wrong credential.
    let r = bearer(&mut t, "public_api", &good).await;
    assert_eq!(reason(&r), "WRONG_CREDENTIAL_FOR_SURFACE");

    // An inactive tenant's token passes the dashboard (whose subscription
    // policy is optional: sign in, read, pay) and is SUBSCRIPTION_INACTIVE
    // where the route requires a subscription (console/subscription.rs).
    let frozen = rsa.sign(&claims(iss, AUD, "frozen", 300));
    let r = dashboard(&mut t, &frozen).await;
    assert_eq!(
        r.principal.unwrap().subscription_status,
        "suspended",
        "the dashboard tells the status"
    );
    let r = t
        .authenticate_with(pb::AuthenticateRequest {
            headers: HashMap::from([("Authorization".into(), format!("Bearer {frozen}"))]),
            surface: "dashboard".into(),
            subscription: "required".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(reason(&r), "SUBSCRIPTION_INACTIVE");
    assert_eq!(r.denial.unwrap().http_status, 403);
}

#[sqlx::test]
async fn a_new_kid_in_the_jwks_is_picked_up_and_the_last_good_keys_survive_an_outage(
    _p: PgPoolOptions,
    conn: PgConnectOptions,
) {
    let k1 = TestKey::es256("k1");
    let k2 = TestKey::ed25519("k2");
    let iss = "https://idp.example";
    let server = JwksServer::start(jwt_keys::jwks(&[&k1])).await;
    let mut t = spawn_dashboard(
        &conn,
        vec![IssuerSettings {
            jwks_url: Some(server.url()),
            allow_insecure_http: true,
            refresh_seconds: 3600, // only an unknown kid triggers a refresh here
            ..issuer(iss)
        }],
    )
    .await;
    t.create_tenant("acme", "pro").await;
    let stats = t.running.jwks_refreshes(iss).unwrap().clone();
    refreshed(&stats, "first JWKS fetch", |s| s.ok() >= 1).await;
    let t1 = k1.sign(&claims(iss, AUD, "acme", 600));
    let t2 = k2.sign(&claims(iss, AUD, "acme", 600));
    assert!(dashboard(&mut t, &t1).await.allowed);
    // k2 is unknown: refused, and the refresher looks again (finding the
    // same set: k2 is not published yet).
    assert_eq!(reason(&dashboard(&mut t, &t2).await), "TOKEN_INVALID");
    refreshed(&stats, "the look an unknown kid asks for", |s| s.ok() >= 2).await;
    assert_eq!(server.hits.load(std::sync::atomic::Ordering::SeqCst), 2);

    // The IdP rotates: k2 is published. Nothing asks for a fetch until a
    // token names k2 again, so it is still unknown; that refusal asks for
    // the fetch that finds it.
    server.set(jwt_keys::jwks(&[&k1, &k2]));
    let before = stats.ok();
    assert_eq!(reason(&dashboard(&mut t, &t2).await), "TOKEN_INVALID");
    refreshed(&stats, "the fetch that finds k2", |s| s.ok() > before).await;
    assert!(dashboard(&mut t, &t2).await.allowed);
    assert!(dashboard(&mut t, &t1).await.allowed);
    // (That unknown kids cost at most one fetch per min_refresh_seconds is
    // shown on a paused clock: crypto/jwt/tests.rs,
    // unknown_kids_make_at_most_one_jwks_fetch_per_min_gap.)

    // The IdP goes down: refreshes fail, the last good keys stay in use.
    server.stop();
    let failed = stats.failed();
    let stranger = TestKey::es256("x-down");
    let r = dashboard(&mut t, &stranger.sign(&claims(iss, AUD, "acme", 600))).await;
    assert_eq!(reason(&r), "TOKEN_INVALID");
    refreshed(&stats, "a failed refresh", |s| s.failed() > failed).await;
    assert!(dashboard(&mut t, &t1).await.allowed);
    assert!(dashboard(&mut t, &t2).await.allowed);
}

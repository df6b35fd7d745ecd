//! Subscription policy per surface and route, over gRPC: a lapsed tenant
//! signs in, reads and pays on the dashboard; what needs a subscription
//! (the public API, a route that says `required`, console writes) refuses
//! it. And the dashboard's denials speak of tokens, not API keys.

use std::collections::HashMap;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tonic::Code;

use crate::common::{op, reason, violations, wait_for, Tollgate};
use crate::harness::{bearer, spawn_console};
use tollgate::grpc::pb;
use tollgate::store::Invalidation;

async fn set_status(t: &mut Tollgate, tenant: &str, status: &str) {
    let mut rx = t.invalidations();
    t.tenants
        .update_tenant(op(pb::UpdateTenantRequest {
            tenant_id: tenant.into(),
            update_mask: vec!["subscription_status".into()],
            subscription_status: status.into(),
            ..Default::default()
        }))
        .await
        .unwrap();
    wait_for(&mut rx, |e| matches!(e, Invalidation::Tenant(_))).await;
}

/// `Authorization: Bearer <credential>` on `surface`, with the route's
/// `subscription` policy ("" = the surface's).
async fn on(
    t: &mut Tollgate,
    surface: &str,
    subscription: &str,
    credential: &str,
) -> Result<pb::AuthenticateResponse, tonic::Status> {
    let headers = if credential.is_empty() {
        HashMap::new()
    } else {
        HashMap::from([("authorization".into(), format!("Bearer {credential}"))])
    };
    t.authenticate_with(pb::AuthenticateRequest {
        headers,
        surface: surface.into(),
        subscription: subscription.into(),
        ..Default::default()
    })
    .await
}

#[sqlx::test]
async fn a_lapsed_tenant_signs_in_and_reads_on_the_dashboard_but_a_route_needing_a_subscription_refuses_it(
    _p: PgPoolOptions,
    conn: PgConnectOptions,
) {
    let mut c = spawn_console(&conn).await;
    c.add_owner("owner@acme.test", "acme").await;
    let (key, _) = c.t.create_key("acme").await;
    // MsgFlash counts past_due as active; canceled is not.
    set_status(&mut c.t, "acme", "canceled").await;

    // Sign in: Login answers whatever the subscription.
    let token = c.login("owner@acme.test").await.access_token;

    // The dashboard surface lets the tenant through and says its status.
    let r = on(&mut c.t, "dashboard", "", &token).await.unwrap();
    assert!(r.allowed, "{r:?}");
    let p = r.principal.unwrap();
    assert_eq!(
        (p.tenant_id.as_str(), p.subscription_status.as_str()),
        ("acme", "canceled")
    );

    // Read: console reads go on.
    let keys =
        c.t.auth
            .list_keys(bearer(&token, pb::ListKeysRequest::default()))
            .await
            .unwrap()
            .into_inner();
    assert_eq!(keys.keys.len(), 1);

    // A route that requires a subscription, the public API, and console
    // writes (trust/attacks.rs covers every write) refuse it.
    let d = on(&mut c.t, "dashboard", "required", &token)
        .await
        .unwrap()
        .denial
        .unwrap();
    assert_eq!(
        (d.reason.as_str(), d.code.as_str(), d.http_status),
        ("SUBSCRIPTION_INACTIVE", "SUBSCRIPTION_INACTIVE", 403)
    );
    let r = c.t.authenticate(&key).await;
    assert_eq!(reason(&r), "SUBSCRIPTION_INACTIVE");
    let err =
        c.t.auth
            .create_key(bearer(
                &token,
                pb::CreateKeyRequest {
                    name: "x".into(),
                    ..Default::default()
                },
            ))
            .await
            .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);

    // A route may also open the public API to a lapsed tenant (a status page).
    let r =
        c.t.authenticate_with(pb::AuthenticateRequest {
            api_key: key.clone(),
            subscription: "optional".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(r.allowed, "{r:?}");
    assert_eq!(r.principal.unwrap().subscription_status, "canceled");

    // Active again: everything passes.
    set_status(&mut c.t, "acme", "active").await;
    let r = on(&mut c.t, "dashboard", "required", &token).await.unwrap();
    assert_eq!(r.principal.unwrap().subscription_status, "active");
    assert!(c.t.authenticate(&key).await.allowed);
}

#[sqlx::test]
async fn the_dashboard_asks_for_a_token_and_the_public_api_for_an_api_key(
    _p: PgPoolOptions,
    conn: PgConnectOptions,
) {
    let mut c = spawn_console(&conn).await;
    c.t.create_tenant("acme", "pro").await;
    let (key, _) = c.t.create_key("acme").await;
    let body = |d: &pb::Denial| -> serde_json::Value { serde_json::from_str(&d.body).unwrap() };

    let d = on(&mut c.t, "dashboard", "", "")
        .await
        .unwrap()
        .denial
        .unwrap();
    assert_eq!(
        (d.reason.as_str(), d.http_status),
        ("CREDENTIAL_MISSING", 401)
    );
    assert_eq!(
        body(&d),
        serde_json::json!({"error": {"code": "UNAUTHORIZED", "message": "Missing token"}})
    );
    let d = on(&mut c.t, "public_api", "", "")
        .await
        .unwrap()
        .denial
        .unwrap();
    assert_eq!(
        body(&d),
        serde_json::json!({"error": {"code": "UNAUTHORIZED", "message": "Missing API key"}})
    );
    // An API key sent to the dashboard is told what the dashboard takes.
    let d = on(&mut c.t, "dashboard", "", &key)
        .await
        .unwrap()
        .denial
        .unwrap();
    assert_eq!(d.reason, "WRONG_CREDENTIAL_FOR_SURFACE");
    assert_eq!(
        d.message,
        "Use Authorization: Bearer <jwt> for the dashboard"
    );
    assert!(!d.body.contains(&key));
    // Reasons the dashboard does not override keep the product's answer.
    let d = on(&mut c.t, "dashboard", "", "not.a.jwt")
        .await
        .unwrap()
        .denial
        .unwrap();
    assert_eq!(d.message, "Invalid or expired token");
}

#[sqlx::test]
async fn an_unknown_subscription_policy_is_invalid_argument_naming_the_field(
    _p: PgPoolOptions,
    conn: PgConnectOptions,
) {
    let mut c = spawn_console(&conn).await;
    c.t.create_tenant("acme", "pro").await;
    let (key, _) = c.t.create_key("acme").await;
    for bad in ["sometimes", "Required", " optional"] {
        let err =
            c.t.authenticate_with(pb::AuthenticateRequest {
                api_key: key.clone(),
                subscription: bad.into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(violations(&err), ["subscription"], "{bad}");
    }
}

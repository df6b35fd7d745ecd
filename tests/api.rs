//! The core service over real gRPC against real Postgres: keys, tenants,
//! plans, replicas and invalidation, bad input, outages.

mod common;
#[path = "support/spy_store.rs"]
mod spy_store;

use std::sync::Arc;

use common::*;
use spy_store::SpyStore;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tollgate::grpc::pb;
use tollgate::store::{Invalidation, PostgresStore};

/// A replica whose store is watched by a [`SpyStore`] (its reads counted,
/// its invalidation feed held back on demand).
async fn spawn_spied(conn: &PgConnectOptions, profile_name: &str) -> (Tollgate, Arc<SpyStore>) {
    let spy = Arc::new(SpyStore::new(Arc::new(PostgresStore::new(
        pool(conn).await,
    ))));
    let t = spawn_on_store(spy.clone(), Options::new(profile(profile_name))).await;
    (t, spy)
}

#[sqlx::test]
async fn a_created_key_authenticates_and_a_revoked_key_is_refused_on_every_replica(
    _pool: PgPoolOptions,
    conn: PgConnectOptions,
) {
    let mut a = spawn(&conn, "msgflash").await;
    let mut b = spawn(&conn, "msgflash").await;
    a.create_tenant("acme", "pro").await;
    let (secret, key) = a.create_key("acme").await;
    assert!(secret.starts_with("msgf_live_"));

    // Both replicas allow it, and B now holds it in its cache.
    for t in [&mut a, &mut b] {
        let r = t.authenticate(&secret).await;
        assert!(r.allowed, "{r:?}");
        let p = r.principal.unwrap();
        assert_eq!(p.tenant_id, "acme");
        assert_eq!(p.key_id, key.key_id);
        assert_eq!(p.plan, "pro");
        assert_eq!(p.environment, "live");
    }

    let mut seen_by_b = b.invalidations();
    a.revoke(&key.key_id).await;
    let id: uuid::Uuid = key.key_id.parse().unwrap();
    wait_for(&mut seen_by_b, |e| *e == Invalidation::Key(id)).await;

    for t in [&mut a, &mut b] {
        let r = t.authenticate(&secret).await;
        assert!(!r.allowed);
        let d = r.denial.unwrap();
        assert_eq!(d.reason, "KEY_REVOKED");
        assert_eq!(d.code, "UNAUTHORIZED");
        assert_eq!(d.http_status, 401);
    }
}

#[sqlx::test]
async fn an_expired_key_is_refused_with_key_expired(_p: PgPoolOptions, conn: PgConnectOptions) {
    let mut t = spawn(&conn, "messagesmart").await;
    t.create_tenant("shop", "default").await;
    let (secret, key) = t
        .create_key_with(pb::CreateKeyRequest {
            tenant_id: "shop".into(),
            name: "short-lived".into(),
            ttl_seconds: Some(60),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(key.expires_at.is_some());
    assert!(t.authenticate(&secret).await.allowed);

    t.running
        .clock()
        .advance(std::time::Duration::from_secs(61));
    let r = t.authenticate(&secret).await;
    let d = r.denial.unwrap();
    assert_eq!(d.reason, "KEY_EXPIRED");
    assert_eq!(d.code, "api_key_expired");
    assert_eq!(d.message, "API key has expired.");
    let body: serde_json::Value = serde_json::from_str(&d.body).unwrap();
    assert_eq!(
        body,
        serde_json::json!({"success": false, "error": {
            "code": "api_key_expired", "message": "API key has expired.", "httpStatus": 401}})
    );
}

#[sqlx::test]
async fn the_default_ttl_is_365_days_and_zero_means_never(
    _p: PgPoolOptions,
    conn: PgConnectOptions,
) {
    let mut t = spawn(&conn, "default").await;
    t.create_tenant("acme", "free").await;
    let (_, key) = t.create_key("acme").await;
    let created = key.created_at.unwrap().seconds;
    assert_eq!(key.expires_at.unwrap().seconds - created, 365 * 24 * 3600);
    let (_, forever) = t
        .create_key_with(pb::CreateKeyRequest {
            tenant_id: "acme".into(),
            name: "forever".into(),
            ttl_seconds: Some(0),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(forever.expires_at, None);
}

#[sqlx::test]
async fn a_rotated_key_keeps_working_for_the_grace_period_then_is_refused(
    _p: PgPoolOptions,
    conn: PgConnectOptions,
) {
    let mut t = spawn(&conn, "msgflash").await;
    // Free allows one key: rotation must not need a second slot.
    t.create_tenant("acme", "free").await;
    let (old_secret, old) = t.create_key("acme").await;
    let rotated = t
        .auth
        .rotate_key(op(pb::RotateKeyRequest {
            key_id: old.key_id.clone(),
            grace_seconds: 300,
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    let new = rotated.key.unwrap();
    assert_ne!(rotated.api_key, old_secret);
    assert_eq!(new.name, old.name);
    assert_eq!(rotated.previous_key.unwrap().replaced_by, new.key_id);

    assert!(
        t.authenticate(&old_secret).await.allowed,
        "old key works during grace"
    );
    assert!(t.authenticate(&rotated.api_key).await.allowed);

    t.running
        .clock()
        .advance(std::time::Duration::from_secs(301));
    assert_eq!(reason(&t.authenticate(&old_secret).await), "KEY_EXPIRED");
    assert!(t.authenticate(&rotated.api_key).await.allowed);

    // The old key cannot be rotated again.
    let err = t
        .auth
        .rotate_key(op(pb::RotateKeyRequest {
            key_id: old.key_id,
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
}

#[sqlx::test]
async fn with_the_lookup_budget_spent_a_key_created_on_another_replica_still_works_at_once(
    _p: PgPoolOptions,
    conn: PgConnectOptions,
) {
    let mut a = spawn(&conn, "msgflash").await;
    let (mut b, spy) = spawn_spied(&conn, "msgflash").await;
    a.create_tenant("acme", "pro").await;
    let mut loaded = b.running.caches().known_loaded();
    loaded.wait_for(|loaded| *loaded).await.unwrap();
    // B's clock stands still, so its per-second budget of lookups for
    // unknown digests (100) cannot refill while the test runs.
    b.running.clock().freeze_at(chrono::Utc::now());
    // A flood of random well-formed keys spends it.
    for _ in 0..150 {
        let random = b.profile.key_format.generate("live");
        assert_eq!(
            reason(&b.authenticate(random.expose()).await),
            "KEY_UNKNOWN"
        );
    }
    assert_eq!(spy.key_reads(), 100, "the budget, then no more lookups");
    let stranger = b.profile.key_format.generate("live");
    assert_eq!(
        reason(&b.authenticate(stranger.expose()).await),
        "KEY_UNKNOWN"
    );
    assert_eq!(spy.key_reads(), 100, "spent: refused without a lookup");

    // A key created on A is announced to B (KeyAdded): B knows its digest
    // and looks it up although the budget is spent.
    let mut seen_by_b = b.invalidations();
    let (secret, _) = a.create_key("acme").await;
    wait_for(&mut seen_by_b, |e| matches!(e, Invalidation::KeyAdded(_))).await;
    let r = b.authenticate(&secret).await;
    assert!(r.allowed, "{r:?}");
    assert_eq!(spy.key_reads(), 101);
}

/// Asserts `secret` is refused with `reason` by `t` and `rotated` allowed.
async fn old_refused_new_allowed(t: &mut Tollgate, secret: &str, rotated: &str, who: &str) {
    assert_eq!(
        reason(&t.authenticate(secret).await),
        "KEY_EXPIRED",
        "{who}"
    );
    let r = t.authenticate(rotated).await;
    assert!(r.allowed, "{who}: {r:?}");
}

#[sqlx::test]
async fn rotation_with_no_grace_refuses_the_old_key_at_once_on_every_replica(
    _p: PgPoolOptions,
    conn: PgConnectOptions,
) {
    let (mut a, spy_a) = spawn_spied(&conn, "default").await;
    let mut b = spawn(&conn, "default").await;
    a.create_tenant("acme", "pro").await;
    let (old_secret, old) = a.create_key("acme").await;
    // Both replicas hold the old key in their caches.
    assert!(a.authenticate(&old_secret).await.allowed);
    assert!(b.authenticate(&old_secret).await.allowed);
    // A's own feed is held back: what A knows at once, it knows from its
    // own write, not from the NOTIFY.
    spy_a.hold_feed();
    let mut seen_by_a = a.invalidations();
    let mut seen_by_b = b.invalidations();
    let rotated = a
        .auth
        .rotate_key(op(pb::RotateKeyRequest {
            key_id: old.key_id.clone(),
            grace_seconds: 0,
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    old_refused_new_allowed(&mut a, &old_secret, &rotated.api_key, "A, at once").await;
    assert!(
        seen_by_a.try_recv().is_err(),
        "A's feed brought nothing yet"
    );
    // B learns it from the feed.
    let id: uuid::Uuid = old.key_id.parse().unwrap();
    wait_for(&mut seen_by_b, |e| *e == Invalidation::Key(id)).await;
    old_refused_new_allowed(&mut b, &old_secret, &rotated.api_key, "B").await;
    // When A's feed catches up, nothing changes.
    spy_a.release_feed();
    wait_for(&mut seen_by_a, |e| *e == Invalidation::Key(id)).await;
    old_refused_new_allowed(&mut a, &old_secret, &rotated.api_key, "A, later").await;
}

#[sqlx::test]
async fn twenty_concurrent_creates_on_a_plan_capped_at_one_create_exactly_one(
    pool_opts: PgPoolOptions,
    conn: PgConnectOptions,
) {
    let mut a = spawn(&conn, "msgflash").await;
    let b = spawn(&conn, "msgflash").await;
    a.create_tenant("acme", "free").await;
    let calls = (0..20).map(|i| {
        // Spread the calls over two replicas.
        let mut client = if i % 2 == 0 {
            a.auth.clone()
        } else {
            b.auth.clone()
        };
        async move {
            client
                .create_key(op(pb::CreateKeyRequest {
                    tenant_id: "acme".into(),
                    name: format!("key {i}"),
                    ..Default::default()
                }))
                .await
        }
    });
    let results = futures::future::join_all(calls).await;
    let created = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(created, 1);
    for r in results.iter().filter_map(|r| r.as_ref().err()) {
        assert_eq!(r.code(), tonic::Code::FailedPrecondition, "{r:?}");
    }
    let db = pool_opts.connect_with(conn).await.unwrap();
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM api_keys")
        .fetch_one(&db)
        .await
        .unwrap();
    assert_eq!(rows, 1);
}

#[sqlx::test]
async fn a_revoked_key_frees_its_slot_and_a_tenant_override_raises_the_cap(
    _p: PgPoolOptions,
    conn: PgConnectOptions,
) {
    let mut t = spawn(&conn, "msgflash").await;
    t.create_tenant("acme", "free").await;
    let (_, first) = t.create_key("acme").await;
    let err = t
        .create_key_with(pb::CreateKeyRequest {
            tenant_id: "acme".into(),
            name: "second".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert!(err.message().contains("cap"), "{}", err.message());
    t.revoke(&first.key_id).await;
    t.create_key("acme").await;

    t.tenants
        .update_tenant(op(pb::UpdateTenantRequest {
            tenant_id: "acme".into(),
            update_mask: vec!["overrides".into()],
            overrides: Some(pb::TenantOverrides {
                max_keys: Some(2),
                ..Default::default()
            }),
            ..Default::default()
        }))
        .await
        .unwrap();
    t.create_key("acme").await;
}

#[sqlx::test]
async fn subscription_and_plan_changes_take_effect_on_every_replica_without_waiting(
    _p: PgPoolOptions,
    conn: PgConnectOptions,
) {
    let (mut a, spy_a) = spawn_spied(&conn, "msgflash").await;
    let mut b = spawn(&conn, "msgflash").await;
    a.create_tenant("acme", "pro").await;
    let (secret, _) = a
        .create_key_with(pb::CreateKeyRequest {
            tenant_id: "acme".into(),
            name: "writer".into(),
            scopes: vec!["messages:send".into(), "instances:write".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    let needs_write = |key: &str| pb::AuthenticateRequest {
        api_key: key.into(),
        required_scopes: vec!["instances:write".into()],
        ..Default::default()
    };
    // Both replicas hold the key and the tenant in their caches.
    for t in [&mut a, &mut b] {
        assert!(
            t.authenticate_with(needs_write(&secret))
                .await
                .unwrap()
                .allowed
        );
    }
    // A's own feed is held back: A must act on its own writes at once.
    spy_a.hold_feed();
    let mut seen_by_a = a.invalidations();

    // Downgrade to free: instances:write is no longer allowed by the plan.
    let tenant = tollgate::domain::TenantId::parse("acme").unwrap();
    let mut seen_by_b = b.invalidations();
    a.tenants
        .update_tenant(op(pb::UpdateTenantRequest {
            tenant_id: "acme".into(),
            update_mask: vec!["plan".into()],
            plan: "free".into(),
            ..Default::default()
        }))
        .await
        .unwrap();
    wait_for(&mut seen_by_b, |e| {
        *e == Invalidation::Tenant(tenant.clone())
    })
    .await;
    for (who, t) in [("A", &mut a), ("B", &mut b)] {
        let r = t.authenticate_with(needs_write(&secret)).await.unwrap();
        assert_eq!(reason(&r), "SCOPE_MISSING", "{who}");
        assert_eq!(r.denial.unwrap().code, "FORBIDDEN");
        let r = t.authenticate(&secret).await;
        assert_eq!(r.principal.unwrap().scopes, vec!["messages:send"], "{who}");
    }

    a.tenants
        .update_tenant(op(pb::UpdateTenantRequest {
            tenant_id: "acme".into(),
            update_mask: vec!["subscription_status".into()],
            subscription_status: "canceled".into(),
            ..Default::default()
        }))
        .await
        .unwrap();
    wait_for(&mut seen_by_b, |e| {
        *e == Invalidation::Tenant(tenant.clone())
    })
    .await;
    for (who, t) in [("A", &mut a), ("B", &mut b)] {
        let d = t.authenticate(&secret).await.denial.unwrap();
        assert_eq!(d.reason, "SUBSCRIPTION_INACTIVE", "{who}");
        assert_eq!(d.code, "SUBSCRIPTION_INACTIVE");
        assert_eq!(d.http_status, 403);
    }
    assert!(seen_by_a.try_recv().is_err(), "A's feed brought nothing");
    spy_a.release_feed();
}

/// What each reference product documents for a credential it refuses.
struct Expected {
    profile: &'static str,
    plan: &'static str,
    /// How a client sends the key, per the product's docs.
    header: (&'static str, &'static str),
    unknown: (&'static str, u32, serde_json::Value),
    malformed_code: &'static str,
    missing_code: &'static str,
}

fn reference_products() -> Vec<Expected> {
    use serde_json::json;
    vec![
        Expected {
            profile: "msgflash",
            plan: "free",
            header: ("x-api-key", ""),
            unknown: (
                "UNAUTHORIZED",
                401,
                json!({"error": {"code": "UNAUTHORIZED", "message": "Invalid or revoked API key"}}),
            ),
            malformed_code: "UNAUTHORIZED",
            missing_code: "UNAUTHORIZED",
        },
        Expected {
            profile: "mailsage",
            plan: "free",
            header: ("Authorization", "Bearer "),
            unknown: (
                "invalid_api_key",
                401,
                json!({"error": "Invalid API key provided", "status": 401, "code": "invalid_api_key"}),
            ),
            malformed_code: "invalid_api_key",
            missing_code: "invalid_api_key",
        },
        Expected {
            profile: "msgine",
            plan: "developer",
            header: ("X-Api-Key", ""),
            unknown: (
                "unauthorized",
                401,
                json!({"error": {"code": "unauthorized", "message": "Invalid or missing API key"}}),
            ),
            malformed_code: "unauthorized",
            missing_code: "unauthorized",
        },
        Expected {
            profile: "messagesmart",
            plan: "default",
            header: ("X-API-Key", ""),
            unknown: (
                "api_key_invalid",
                401,
                json!({"success": false, "error": {
                    "code": "api_key_invalid", "message": "API key is invalid.", "httpStatus": 401}}),
            ),
            malformed_code: "api_key_invalid",
            missing_code: "api_key_missing",
        },
    ]
}

fn with_header(name: &str, value: String) -> pb::AuthenticateRequest {
    pb::AuthenticateRequest {
        headers: [(name.to_string(), value)].into(),
        ..Default::default()
    }
}

#[sqlx::test]
async fn each_reference_product_gets_its_documented_header_codes_and_bodies(
    _p: PgPoolOptions,
    conn: PgConnectOptions,
) {
    for e in reference_products() {
        let mut t = spawn(&conn, e.profile).await;
        let tenant = format!("t-{}", e.profile);
        t.create_tenant(&tenant, e.plan).await;
        let (secret, _) = t.create_key(&tenant).await;
        let (header, scheme) = e.header;

        let ok = t
            .authenticate_with(with_header(header, format!("{scheme}{secret}")))
            .await
            .unwrap();
        assert!(ok.allowed, "{}: {ok:?}", e.profile);

        // Well-formed, valid checksum, but never issued.
        let stranger = t.profile.key_format.generate("live");
        let r = t
            .authenticate_with(with_header(
                header,
                format!("{scheme}{}", stranger.expose()),
            ))
            .await
            .unwrap();
        let d = r.denial.unwrap();
        assert_eq!(d.reason, "KEY_UNKNOWN", "{}", e.profile);
        assert_eq!((d.code.as_str(), d.http_status), (e.unknown.0, e.unknown.1));
        let body: serde_json::Value = serde_json::from_str(&d.body).unwrap();
        assert_eq!(body, e.unknown.2, "{}", e.profile);

        // One character changed: the checksum catches it before any lookup.
        let mut typo = secret.clone().into_bytes();
        let last = typo.len() - 1;
        typo[last] = if typo[last] == b'0' { b'1' } else { b'0' };
        let typo = String::from_utf8(typo).unwrap();
        let d = t
            .authenticate_with(with_header(header, format!("{scheme}{typo}")))
            .await
            .unwrap()
            .denial
            .unwrap();
        assert_eq!(d.reason, "CREDENTIAL_MALFORMED", "{}", e.profile);
        assert_eq!(d.code, e.malformed_code);

        let d = t
            .authenticate_with(pb::AuthenticateRequest::default())
            .await
            .unwrap()
            .denial
            .unwrap();
        assert_eq!(d.reason, "CREDENTIAL_MISSING", "{}", e.profile);
        assert_eq!(d.code, e.missing_code);
        assert_eq!(d.http_status, 401);
    }
}

#[sqlx::test]
async fn msgflash_refuses_an_api_key_sent_as_a_bearer_token(
    _p: PgPoolOptions,
    conn: PgConnectOptions,
) {
    let mut t = spawn(&conn, "msgflash").await;
    t.create_tenant("acme", "free").await;
    let (secret, _) = t.create_key("acme").await;
    let r = t
        .authenticate_with(with_header("authorization", format!("Bearer {secret}")))
        .await
        .unwrap();
    let d = r.denial.unwrap();
    assert_eq!(d.reason, "WRONG_CREDENTIAL_FOR_SURFACE");
    assert_eq!(d.http_status, 401);
}

#[sqlx::test]
async fn another_tenants_key_cannot_be_read_revoked_rotated_or_updated(
    _p: PgPoolOptions,
    conn: PgConnectOptions,
) {
    let mut t = spawn(&conn, "default").await;
    t.create_tenant("tenant-a", "pro").await;
    t.create_tenant("tenant-b", "pro").await;
    let (secret, key_of_b) = t.create_key("tenant-b").await;
    let as_a = "tenant-a".to_string();

    let get = t
        .auth
        .get_key(op(pb::GetKeyRequest {
            key_id: key_of_b.key_id.clone(),
            tenant_id: as_a.clone(),
        }))
        .await
        .unwrap_err();
    let revoke = t
        .auth
        .revoke_key(op(pb::RevokeKeyRequest {
            key_id: key_of_b.key_id.clone(),
            tenant_id: as_a.clone(),
            reason: "hostile".into(),
        }))
        .await
        .unwrap_err();
    let rotate = t
        .auth
        .rotate_key(op(pb::RotateKeyRequest {
            key_id: key_of_b.key_id.clone(),
            tenant_id: as_a.clone(),
            grace_seconds: 0,
        }))
        .await
        .unwrap_err();
    let update = t
        .auth
        .update_key(op(pb::UpdateKeyRequest {
            key_id: key_of_b.key_id.clone(),
            tenant_id: as_a.clone(),
            update_mask: vec!["name".into()],
            name: "pwned".into(),
            ..Default::default()
        }))
        .await
        .unwrap_err();
    for status in [get, revoke, rotate, update] {
        assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}");
    }
    let listed = t
        .auth
        .list_keys(op(pb::ListKeysRequest {
            tenant_id: as_a,
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert!(listed.keys.is_empty());

    // Nothing changed.
    assert!(t.authenticate(&secret).await.allowed);
    let unchanged = t
        .auth
        .get_key(op(pb::GetKeyRequest {
            key_id: key_of_b.key_id.clone(),
            tenant_id: "tenant-b".into(),
        }))
        .await
        .unwrap()
        .into_inner()
        .key
        .unwrap();
    assert_eq!(unchanged.name, key_of_b.name);
    assert_eq!(unchanged.revoked_at, None);
    assert_eq!(unchanged.replaced_by, "");
}

#[sqlx::test]
async fn management_calls_without_the_operator_token_are_unauthenticated_and_change_nothing(
    _p: PgPoolOptions,
    conn: PgConnectOptions,
) {
    let mut t = spawn(&conn, "default").await;
    let no_token = tonic::Request::new(pb::CreateTenantRequest {
        tenant_id: "sneaky".into(),
        name: "Sneaky".into(),
        ..Default::default()
    });
    let err = t.tenants.create_tenant(no_token).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);

    let mut wrong = tonic::Request::new(pb::CreateTenantRequest {
        tenant_id: "sneaky".into(),
        name: "Sneaky".into(),
        ..Default::default()
    });
    wrong
        .metadata_mut()
        .insert("authorization", "Bearer not-the-token".parse().unwrap());
    let err = t.tenants.create_tenant(wrong).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    assert!(!err.message().contains(OPERATOR_TOKEN));

    let err = t
        .tenants
        .get_tenant(op(pb::GetTenantRequest {
            tenant_id: "sneaky".into(),
        }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound, "nothing was created");

    // Authenticate needs no operator token.
    let r = t
        .authenticate_with(pb::AuthenticateRequest::default())
        .await
        .unwrap();
    assert_eq!(reason(&r), "CREDENTIAL_MISSING");
}

#[sqlx::test]
async fn bad_input_is_invalid_argument_naming_every_field_and_writes_nothing(
    pool_opts: PgPoolOptions,
    conn: PgConnectOptions,
) {
    let mut t = spawn(&conn, "msgflash").await;
    t.create_tenant("acme", "free").await;

    let err = t
        .create_key_with(pb::CreateKeyRequest {
            tenant_id: "acme".into(),
            name: "".into(),
            environment: "prod".into(),
            scopes: vec!["Bad Scope".into()],
            ttl_seconds: Some(-5),
            limits: vec![pb::LimitSpec {
                scope: "galaxy".into(),
                period: "month".into(),
                limit: 0,
                ..Default::default()
            }],
        })
        .await
        .unwrap_err();
    // The limit spec's unknown scope is refused while reading the request.
    assert_eq!(violations(&err), vec!["limits[0].scope"]);
    let err = t
        .create_key_with(pb::CreateKeyRequest {
            tenant_id: "acme".into(),
            name: "".into(),
            environment: "prod".into(),
            scopes: vec!["Bad Scope".into()],
            ttl_seconds: Some(-5),
            limits: vec![pb::LimitSpec {
                scope: "tenant".into(),
                period: "month".into(),
                limit: 0,
                ..Default::default()
            }],
        })
        .await
        .unwrap_err();
    let fields = violations(&err);
    for f in [
        "name",
        "environment",
        "scopes[0]",
        "ttl_seconds",
        "limits[0].limit",
        "limits[0].scope",
    ] {
        assert!(
            fields.contains(&f.to_string()),
            "{f} missing from {fields:?}"
        );
    }

    let err = t
        .create_key_with(pb::CreateKeyRequest {
            tenant_id: "acme".into(),
            name: "k".into(),
            scopes: vec!["instances:write".into()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(violations(&err), vec!["scopes[0]"], "not allowed on free");

    let err = t
        .create_key_with(pb::CreateKeyRequest {
            tenant_id: "no such tenant!".into(),
            name: "k".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(violations(&err), vec!["tenant_id"]);

    let err = t
        .create_key_with(pb::CreateKeyRequest {
            tenant_id: "ghost".into(),
            name: "k".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);

    let err = t
        .auth
        .revoke_key(op(pb::RevokeKeyRequest {
            key_id: "not-a-uuid".into(),
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(violations(&err), vec!["key_id"]);

    let err = t
        .tenants
        .create_tenant(op(pb::CreateTenantRequest {
            tenant_id: "x".repeat(65),
            name: "n".into(),
            plan: "gold".into(),
            subscription_status: "zombie".into(),
            ..Default::default()
        }))
        .await
        .unwrap_err();
    let fields = violations(&err);
    for f in ["tenant_id", "plan", "subscription_status"] {
        assert!(
            fields.contains(&f.to_string()),
            "{f} missing from {fields:?}"
        );
    }

    let err = t
        .tenants
        .update_tenant(op(pb::UpdateTenantRequest {
            tenant_id: "acme".into(),
            update_mask: vec!["plan".into(), "color".into()],
            plan: "gold".into(),
            ..Default::default()
        }))
        .await
        .unwrap_err();
    let fields = violations(&err);
    assert!(fields.contains(&"plan".to_string()) && fields.contains(&"update_mask[1]".to_string()));

    let err = t
        .authenticate_with(pb::AuthenticateRequest {
            api_key: "x".into(),
            surface: "nowhere".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(violations(&err), vec!["surface"]);

    let err = t
        .auth
        .list_keys(op(pb::ListKeysRequest {
            tenant_id: "acme".into(),
            page_size: 10_000,
            page_token: "garbage".into(),
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(violations(&err), vec!["page_size", "page_token"]);

    // An oversized message is refused before it is decoded.
    let err = t
        .authenticate_with(pb::AuthenticateRequest {
            api_key: "k".repeat(100 * 1024),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::OutOfRange, "{err:?}");

    let db = pool_opts.connect_with(conn).await.unwrap();
    let keys: i64 = sqlx::query_scalar("SELECT count(*) FROM api_keys")
        .fetch_one(&db)
        .await
        .unwrap();
    let tenants: Vec<(String, String)> = sqlx::query_as("SELECT tenant_id, plan FROM tenants")
        .fetch_all(&db)
        .await
        .unwrap();
    assert_eq!(keys, 0);
    assert_eq!(tenants, vec![("acme".to_string(), "free".to_string())]);
}

#[sqlx::test]
async fn keys_and_tenants_are_listed_in_pages(_p: PgPoolOptions, conn: PgConnectOptions) {
    let mut t = spawn(&conn, "default").await;
    for id in ["t1", "t2", "t3"] {
        t.create_tenant(id, "enterprise").await;
    }
    let mut created = Vec::new();
    for _ in 0..5 {
        created.push(t.create_key("t1").await.1.key_id);
    }
    t.revoke(&created[4]).await;

    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = t
            .auth
            .list_keys(op(pb::ListKeysRequest {
                tenant_id: "t1".into(),
                page_size: 2,
                page_token: token,
                include_revoked: false,
            }))
            .await
            .unwrap()
            .into_inner();
        assert!(page.keys.len() <= 2);
        seen.extend(page.keys.into_iter().map(|k| k.key_id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(
        seen,
        created[..4].to_vec(),
        "oldest first, revoked left out"
    );

    let first = t
        .tenants
        .list_tenants(op(pb::ListTenantsRequest {
            page_size: 2,
            page_token: String::new(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.tenants.len(), 2);
    let rest = t
        .tenants
        .list_tenants(op(pb::ListTenantsRequest {
            page_size: 2,
            page_token: first.next_page_token,
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rest.tenants.len(), 1);
    assert_eq!(rest.tenants[0].tenant_id, "t3");
    assert!(rest.next_page_token.is_empty());
}

#[sqlx::test]
async fn last_use_is_recorded_in_batches(_p: PgPoolOptions, conn: PgConnectOptions) {
    let (mut t, spy) = spawn_spied(&conn, "default").await;
    let t0: chrono::DateTime<chrono::Utc> = "2027-03-01T12:00:00Z".parse().unwrap();
    let clock = t.running.clock().clone();
    clock.freeze_at(t0);
    t.create_tenant("acme", "free").await;
    let (first, first_key) = t.create_key("acme").await;
    let (second, second_key) = t.create_key("acme").await;
    let writes_before = spy.touches();
    // Five uses of two keys over four seconds.
    for (secret, at) in [
        (&first, 0),
        (&second, 1),
        (&first, 1),
        (&first, 2),
        (&second, 3),
    ] {
        clock.freeze_at(t0 + chrono::Duration::seconds(at));
        assert!(t.authenticate(secret).await.allowed);
    }
    clock.freeze_at(t0 + chrono::Duration::seconds(5));
    assert_eq!(spy.touches(), writes_before, "no write per call");
    let last_used = async |t: &mut Tollgate, key: &pb::ApiKey| {
        t.auth
            .get_key(op(pb::GetKeyRequest {
                key_id: key.key_id.clone(),
                ..Default::default()
            }))
            .await
            .unwrap()
            .into_inner()
            .key
            .unwrap()
            .last_used_at
            .map(|ts| ts.seconds)
    };
    assert_eq!(last_used(&mut t, &first_key).await, None);

    // One flush writes both keys in one statement, each with its latest use.
    assert_eq!(t.running.flush_usage().await.unwrap(), 2);
    let (calls, rows) = spy.touches();
    assert_eq!((calls - writes_before.0, rows - writes_before.1), (1, 2));
    let at = |s: i64| Some((t0 + chrono::Duration::seconds(s)).timestamp());
    assert_eq!(last_used(&mut t, &first_key).await, at(2));
    assert_eq!(last_used(&mut t, &second_key).await, at(3));
    // Nothing pending: the next flush writes nothing.
    assert_eq!(t.running.flush_usage().await.unwrap(), 0);
    assert_eq!(spy.touches(), (calls, rows));
}

#[sqlx::test]
async fn update_key_changes_name_scopes_and_expiry(_p: PgPoolOptions, conn: PgConnectOptions) {
    let mut t = spawn(&conn, "default").await;
    t.create_tenant("acme", "pro").await;
    let (secret, key) = t.create_key("acme").await;
    let past = prost_types::Timestamp {
        seconds: chrono::Utc::now().timestamp() - 10,
        nanos: 0,
    };
    let updated = t
        .auth
        .update_key(op(pb::UpdateKeyRequest {
            key_id: key.key_id.clone(),
            update_mask: vec!["name".into(), "scopes".into(), "expires_at".into()],
            name: "renamed".into(),
            scopes: vec!["admin".into()],
            expires_at: Some(past),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner()
        .key
        .unwrap();
    assert_eq!(updated.name, "renamed");
    assert_eq!(updated.scopes, vec!["admin"]);
    assert_eq!(reason(&t.authenticate(&secret).await), "KEY_EXPIRED");

    // Unset expires_at with the mask removes the expiry.
    t.auth
        .update_key(op(pb::UpdateKeyRequest {
            key_id: key.key_id,
            update_mask: vec!["expires_at".into()],
            ..Default::default()
        }))
        .await
        .unwrap();
    let r = t.authenticate(&secret).await;
    assert!(r.allowed);
    assert_eq!(r.principal.unwrap().scopes, vec!["admin"]);
}

#[sqlx::test]
async fn check_quota_answers_from_the_plan(_p: PgPoolOptions, conn: PgConnectOptions) {
    let mut t = spawn(&conn, "msgflash").await;
    t.create_tenant("acme", "starter").await;
    let (secret, key) = t.create_key("acme").await;
    for req in [
        pb::CheckQuotaRequest {
            tenant_id: "acme".into(),
            ..Default::default()
        },
        pb::CheckQuotaRequest {
            key_id: key.key_id.clone(),
            ..Default::default()
        },
        pb::CheckQuotaRequest {
            api_key: secret.clone(),
            ..Default::default()
        },
    ] {
        // By id the operator asks (anonymous callers may only ask with
        // the credential itself; see tests/trust.rs).
        let r = t.auth.check_quota(op(req)).await.unwrap().into_inner();
        assert!(r.allowed);
        assert_eq!(r.plan, "starter");
    }
    t.revoke(&key.key_id).await;
    let r = t
        .auth
        .check_quota(pb::CheckQuotaRequest {
            api_key: secret,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!r.allowed);
    assert_eq!(r.denial.unwrap().reason, "KEY_REVOKED");
    let err = t
        .auth
        .check_quota(op(pb::CheckQuotaRequest {
            tenant_id: "acme".into(),
            key_id: key.key_id,
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
}

#[sqlx::test]
async fn when_postgres_is_unreachable_cached_decisions_are_served_and_the_rest_is_unavailable(
    _p: PgPoolOptions,
    conn: PgConnectOptions,
) {
    use tonic_health::pb::health_check_response::ServingStatus;

    let proxy = Proxy::start(pg_addr(&conn)).await;
    let mut t = spawn(&proxy.options(&conn), "default").await;
    t.create_tenant("acme", "pro").await;
    let (cached, cached_key) = t.create_key("acme").await;
    let (revoked_meanwhile, revoked_key) = t.create_key("acme").await;
    assert!(t.authenticate(&cached).await.allowed);
    assert!(t.authenticate(&revoked_meanwhile).await.allowed);

    let mut events = t.invalidations();
    proxy.cut();
    wait_for(&mut events, |e| *e == Invalidation::Lost).await;
    // Within the staleness bound the replica stays ready; the `database`
    // health name shows the lost feed.
    assert_eq!(t.health_status().await, ServingStatus::Serving);
    assert_eq!(
        t.service_status("database").await,
        ServingStatus::NotServing
    );

    // Cached decisions keep being served.
    assert!(t.authenticate(&cached).await.allowed);
    // Anything that needs the database is UNAVAILABLE, never a denial.
    let stranger = t.profile.key_format.generate("live");
    let err = t
        .authenticate_with(pb::AuthenticateRequest {
            api_key: stranger.expose().into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    let err = t.create_key_with(pb::CreateKeyRequest {
        tenant_id: "acme".into(),
        name: "k".into(),
        ..Default::default()
    });
    assert_eq!(err.await.unwrap_err().code(), tonic::Code::Unavailable);

    // A revocation this replica cannot hear about (made on another replica
    // while its link is down)...
    let mut other = spawn(&conn, "default").await;
    other.revoke(&revoked_key.key_id).await;

    // ...is honoured once the link is back.
    proxy.restore();
    wait_for(&mut events, |e| *e == Invalidation::Ready).await;
    assert_eq!(t.health_status().await, ServingStatus::Serving);
    assert_eq!(t.service_status("database").await, ServingStatus::Serving);
    assert_eq!(
        reason(&t.authenticate(&revoked_meanwhile).await),
        "KEY_REVOKED"
    );
    let r = t.authenticate(&cached).await;
    assert!(r.allowed);
    assert_eq!(r.principal.unwrap().key_id, cached_key.key_id);
}

#[sqlx::test]
async fn keys_made_under_an_old_pepper_still_work_and_are_rehashed(
    pool_opts: PgPoolOptions,
    conn: PgConnectOptions,
) {
    use tollgate::crypto::{Pepper, Peppers};
    let v1 = Pepper::new(1, PEPPER.to_vec()).unwrap();
    let v2 = Pepper::new(2, b"the-next-pepper-0123456789abcdef-xyz".to_vec()).unwrap();

    let mut old = spawn(&conn, "default").await;
    old.create_tenant("acme", "pro").await;
    let (secret, key) = old.create_key("acme").await;

    let mut rotated_opts = Options::new(profile("default"));
    rotated_opts.peppers = Peppers::new(v2.clone(), vec![v1]).unwrap();
    let mut rotated = spawn_with(&conn, rotated_opts).await;
    assert!(rotated.authenticate(&secret).await.allowed);

    let db = pool_opts.connect_with(conn.clone()).await.unwrap();
    let id: uuid::Uuid = key.key_id.parse().unwrap();
    let version: i32 = sqlx::query_scalar("SELECT pepper_version FROM api_keys WHERE key_id = $1")
        .bind(id)
        .fetch_one(&db)
        .await
        .unwrap();
    assert_eq!(version, 2);

    // Once every key is rehashed the old pepper can be dropped.
    let mut only_v2 = Options::new(profile("default"));
    only_v2.peppers = Peppers::new(v2, vec![]).unwrap();
    let mut fresh = spawn_with(&conn, only_v2).await;
    assert!(fresh.authenticate(&secret).await.allowed);
}

#[sqlx::test]
async fn grpc_reflection_lists_the_services(_p: PgPoolOptions, conn: PgConnectOptions) {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;

    let t = spawn(&conn, "default").await;
    let mut client = ServerReflectionClient::new(t.channel.clone());
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = client
        .server_reflection_info(futures::stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let response = responses.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("unexpected reflection response");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for s in [
        "tollgate.v1.AuthService",
        "tollgate.v1.TenantService",
        "grpc.health.v1.Health",
    ] {
        assert!(names.contains(&s.to_string()), "{s} not in {names:?}");
    }
}

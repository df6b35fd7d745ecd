//! Keys: create, revoke, expire, rotate, update, caps, last use, old peppers, on
//! every replica.

use super::*;

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
    // One after another, each miss is read alone, at once.
    assert_eq!(spy.batched_digests(), 100);
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

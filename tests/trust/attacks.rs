//! The attacks the rule table stops, one test each.

use super::*;

/// Units used this month by tenant `tenant` (the operator reads it).
async fn tenant_month_used(fx: &mut Fixture, tenant: &str) -> u64 {
    fx.t.auth
        .get_usage(op(pb::GetUsageRequest {
            tenant_id: tenant.into(),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner()
        .quotas
        .iter()
        .find(|q| q.name == "tenant_per_month")
        .map(|q| q.used)
        .unwrap_or(0)
}

#[sqlx::test]
async fn nobody_without_credentials_spends_or_probes_a_quota_by_id(
    _p: PgPoolOptions,
    conn: PgConnectOptions,
) {
    let mut fx = fixture(&conn).await;
    // A back on a plan with limits: 10 a second per key, 10 000 a month.
    fx.t.tenants
        .update_tenant(op(pb::UpdateTenantRequest {
            tenant_id: A.into(),
            update_mask: vec!["plan".into()],
            plan: "free".into(),
            ..Default::default()
        }))
        .await
        .unwrap();
    let drain = |tenant_id: &str, key_id: &str, cost| pb::CheckQuotaRequest {
        tenant_id: tenant_id.into(),
        key_id: key_id.into(),
        cost,
        ..Default::default()
    };
    // The drain, by tenant and by key, and the probe for ids: all the same
    // refusal, whether the id exists or not; nothing spent.
    let mut auth = fx.t.auth.clone();
    for req in [
        drain(A, "", 9999),
        drain("no-such-tenant", "", 1),
        drain("", &fx.a_key, 10),
        drain("", &uuid::Uuid::new_v4().to_string(), 1),
    ] {
        let e = auth.check_quota(req.clone()).await.unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{req:?}");
        let e = auth
            .get_usage(pb::GetUsageRequest {
                tenant_id: req.tenant_id.clone(),
                key_id: req.key_id.clone(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{req:?}");
    }
    assert_eq!(tenant_month_used(&mut fx, A).await, 0);
    assert!(fx.t.authenticate(&fx.a_secret.clone()).await.allowed);

    // The gateway may; a cost no limit could ever admit is a bad request.
    let gw = |m| with(Some(GATEWAY_TOKEN), m);
    let ok = auth.check_quota(gw(drain(A, "", 3))).await.unwrap();
    assert!(ok.into_inner().allowed);
    // (Used counts the replica's lease, so compare, don't count.)
    let spent = tenant_month_used(&mut fx, A).await;
    assert!(spent >= 3, "{spent}");
    let too_much = auth
        .check_quota(gw(drain(A, "", 10_001)))
        .await
        .unwrap_err();
    assert_eq!(violations(&too_much), ["cost"]);
    let too_much = auth
        .check_quota(gw(drain("", &fx.a_key, 11)))
        .await
        .unwrap_err();
    assert_eq!(violations(&too_much), ["cost"]);
    let by_key = pb::CheckQuotaRequest {
        api_key: fx.a_secret.clone(),
        cost: 11,
        ..Default::default()
    };
    assert_eq!(
        violations(&auth.check_quota(by_key).await.unwrap_err()),
        ["cost"]
    );
    assert_eq!(
        tenant_month_used(&mut fx, A).await,
        spent,
        "refusals spend nothing"
    );
    // The key itself needs no other credential.
    let own = pb::CheckQuotaRequest {
        api_key: fx.a_secret.clone(),
        cost: 2,
        ..Default::default()
    };
    assert!(auth.check_quota(own).await.unwrap().into_inner().allowed);
}

#[sqlx::test]
async fn another_tenants_key_or_tenant_is_not_found_exactly_like_a_missing_one(
    _p: PgPoolOptions,
    conn: PgConnectOptions,
) {
    let mut fx = fixture(&conn).await;
    let owner = fx.owner.clone();
    let missing = uuid::Uuid::new_v4().to_string();
    let mut auth = fx.t.auth.clone();
    let mut tenants = fx.t.tenants.clone();
    let mut console = fx.console.clone();
    let mut answers = Vec::new();
    for key_id in [fx.b_key.clone(), missing] {
        let b = Some(owner.as_str());
        let key = || key_id.clone();
        let all = [
            auth.get_key(with(
                b,
                pb::GetKeyRequest {
                    key_id: key(),
                    ..Default::default()
                },
            ))
            .await
            .map(|_| ()),
            auth.revoke_key(with(
                b,
                pb::RevokeKeyRequest {
                    key_id: key(),
                    ..Default::default()
                },
            ))
            .await
            .map(|_| ()),
            auth.rotate_key(with(
                b,
                pb::RotateKeyRequest {
                    key_id: key(),
                    ..Default::default()
                },
            ))
            .await
            .map(|_| ()),
            auth.update_key(with(
                b,
                pb::UpdateKeyRequest {
                    key_id: key(),
                    update_mask: vec!["name".into()],
                    name: "mine".into(),
                    ..Default::default()
                },
            ))
            .await
            .map(|_| ()),
            auth.get_usage(with(
                b,
                pb::GetUsageRequest {
                    key_id: key(),
                    ..Default::default()
                },
            ))
            .await
            .map(|_| ()),
            auth.check_quota(with(
                b,
                pb::CheckQuotaRequest {
                    key_id: key(),
                    dry_run: true,
                    ..Default::default()
                },
            ))
            .await
            .map(|_| ()),
        ];
        answers.push(
            all.into_iter()
                .map(|r| {
                    let e = r.unwrap_err();
                    (e.code(), e.message().to_string())
                })
                .collect::<Vec<_>>(),
        );
    }
    assert_eq!(answers[0], answers[1], "B's key vs a missing key");
    assert!(answers[0].iter().all(|(c, _)| *c == Code::NotFound));

    let mut answers = Vec::new();
    for tenant_id in [B, "no-such-tenant"] {
        let b = Some(owner.as_str());
        let t = || tenant_id.to_string();
        let all = [
            tenants
                .get_tenant(with(b, pb::GetTenantRequest { tenant_id: t() }))
                .await
                .map(|_| ()),
            tenants
                .update_tenant(with(
                    b,
                    pb::UpdateTenantRequest {
                        tenant_id: t(),
                        update_mask: vec!["name".into()],
                        name: "pwned".into(),
                        ..Default::default()
                    },
                ))
                .await
                .map(|_| ()),
            auth.list_keys(with(
                b,
                pb::ListKeysRequest {
                    tenant_id: t(),
                    ..Default::default()
                },
            ))
            .await
            .map(|_| ()),
            auth.create_key(with(
                b,
                pb::CreateKeyRequest {
                    tenant_id: t(),
                    name: "x".into(),
                    ..Default::default()
                },
            ))
            .await
            .map(|_| ()),
            auth.get_usage(with(
                b,
                pb::GetUsageRequest {
                    tenant_id: t(),
                    ..Default::default()
                },
            ))
            .await
            .map(|_| ()),
            console
                .list_users(with(b, pb::ListUsersRequest { tenant_id: t() }))
                .await
                .map(|_| ()),
        ];
        answers.push(
            all.into_iter()
                .map(|r| {
                    let e = r.unwrap_err();
                    (e.code(), e.message().to_string())
                })
                .collect::<Vec<_>>(),
        );
    }
    assert_eq!(answers[0], answers[1], "tenant B vs a missing tenant");
    assert!(answers[0].iter().all(|(c, _)| *c == Code::NotFound));
    // And B's key is untouched.
    let b_key =
        fx.t.auth
            .get_key(op(pb::GetKeyRequest {
                key_id: fx.b_key.clone(),
                ..Default::default()
            }))
            .await
            .unwrap()
            .into_inner()
            .key
            .unwrap();
    assert_eq!((b_key.name.as_str(), b_key.revoked_at), ("test key", None));
}

#[sqlx::test]
async fn a_revoked_key_stays_revoked_on_a_replica_whose_clock_is_behind(
    _p: PgPoolOptions,
    conn: PgConnectOptions,
) {
    let mut t = spawn(&conn, "default").await;
    t.create_tenant("acme", "free").await;
    let (secret, key) = t.create_key("acme").await;
    let mut rx = t.invalidations();
    t.revoke(&key.key_id).await;
    wait_for(&mut rx, |e| {
        matches!(e, tollgate::store::Invalidation::Key(_))
    })
    .await;
    // This replica's clock is an hour behind the database's.
    t.running
        .clock()
        .freeze_at(chrono::Utc::now() - chrono::Duration::hours(1));
    let r = t.authenticate(&secret).await;
    assert_eq!(reason(&r), "KEY_REVOKED");
    let q = t
        .auth
        .check_quota(pb::CheckQuotaRequest {
            api_key: secret,
            dry_run: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(q.denial.unwrap().reason, "KEY_REVOKED");
}

#[sqlx::test]
async fn console_users_cannot_change_keys_while_the_subscription_is_inactive(
    _p: PgPoolOptions,
    conn: PgConnectOptions,
) {
    let mut fx = fixture(&conn).await;
    let owner = fx.owner.clone();
    let b = Some(owner.as_str());
    let mut auth = fx.t.auth.clone();
    for status in ["past_due", "canceled"] {
        fx.t.tenants
            .update_tenant(op(pb::UpdateTenantRequest {
                tenant_id: A.into(),
                update_mask: vec!["subscription_status".into()],
                subscription_status: status.into(),
                ..Default::default()
            }))
            .await
            .unwrap();
        let key = fx.fresh_key(A).await;
        let writes = [
            code(
                auth.create_key(with(
                    b,
                    pb::CreateKeyRequest {
                        name: "x".into(),
                        ..Default::default()
                    },
                ))
                .await,
            ),
            code(
                auth.rotate_key(with(
                    b,
                    pb::RotateKeyRequest {
                        key_id: key.clone(),
                        ..Default::default()
                    },
                ))
                .await,
            ),
            code(
                auth.update_key(with(
                    b,
                    pb::UpdateKeyRequest {
                        key_id: key.clone(),
                        update_mask: vec!["name".into()],
                        name: "y".into(),
                        ..Default::default()
                    },
                ))
                .await,
            ),
            code(
                auth.revoke_key(with(
                    b,
                    pb::RevokeKeyRequest {
                        key_id: key.clone(),
                        ..Default::default()
                    },
                ))
                .await,
            ),
        ];
        assert_eq!(writes, [Code::FailedPrecondition; 4], "{status}");
        // Reads go on; the operator is not paused.
        let reads = [
            code(
                auth.list_keys(with(b, pb::ListKeysRequest::default()))
                    .await,
            ),
            code(
                auth.get_key(with(
                    b,
                    pb::GetKeyRequest {
                        key_id: key.clone(),
                        ..Default::default()
                    },
                ))
                .await,
            ),
        ];
        assert_eq!(reads, [Code::Ok; 2], "{status}");
        let unchanged = auth
            .get_key(op(pb::GetKeyRequest {
                key_id: key.clone(),
                ..Default::default()
            }))
            .await
            .unwrap()
            .into_inner()
            .key
            .unwrap();
        assert_eq!(
            (unchanged.name.as_str(), unchanged.revoked_at),
            ("test key", None)
        );
        auth.revoke_key(op(pb::RevokeKeyRequest {
            key_id: key,
            ..Default::default()
        }))
        .await
        .unwrap();
    }
}

#[sqlx::test]
async fn only_the_console_backend_may_name_the_login_address(
    _p: PgPoolOptions,
    conn: PgConnectOptions,
) {
    let mut fx = fixture(&conn).await;
    let login = |i: u32| pb::LoginRequest {
        email: format!("nobody{i}@example.com"),
        password: "wrong password!!".into(),
        client_address: format!("198.51.100.{i}"),
    };
    // The backend names 22 addresses: each has one failure, none backs off.
    for i in 0..22 {
        let e = fx
            .console
            .login(with(Some(BACKEND_TOKEN), login(i)))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "attempt {i}: {e:?}");
    }
    // The operator is not the console backend: its addresses are ignored,
    // so the peer's own counter backs off.
    let mut last = Code::Ok;
    for i in 100..122 {
        last = fx
            .console
            .login(with(Some(OPERATOR_TOKEN), login(i)))
            .await
            .unwrap_err()
            .code();
    }
    assert_eq!(last, Code::ResourceExhausted);
}

#[sqlx::test]
async fn a_flood_of_slow_management_calls_is_shed_while_decisions_answer(
    _p: PgPoolOptions,
    conn: PgConnectOptions,
) {
    let mut fx = fixture_with(
        &conn,
        GuardParts {
            management: tollgate::grpc::budget::ManagementSettings {
                max_in_flight: 2,
                timeout_ms: 4000,
            },
            ..GuardParts::default()
        },
    )
    .await;
    // Hold the keys table against writes (reads go on), so key creation waits.
    let mut lock = fx.pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE api_keys IN EXCLUSIVE MODE")
        .execute(&mut *lock)
        .await
        .unwrap();
    let slow: Vec<_> = (0..2)
        .map(|_| {
            let mut auth = fx.t.auth.clone();
            tokio::spawn(async move {
                auth.create_key(op(pb::CreateKeyRequest {
                    tenant_id: A.into(),
                    name: "slow".into(),
                    ..Default::default()
                }))
                .await
                .map(|_| ())
            })
        })
        .collect();
    // Wait until both are stuck behind the lock (each holding a slot).
    let waiting = "SELECT count(*) FROM pg_stat_activity \
                   WHERE datname = current_database() AND wait_event_type = 'Lock'";
    tokio::time::timeout(std::time::Duration::from_secs(5), async {
        while sqlx::query_scalar::<_, i64>(waiting)
            .fetch_one(&fx.pool)
            .await
            .unwrap()
            < 2
        {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("both slow calls reach the database");
    // Both slots taken: the next management call is shed at once.
    let shed =
        fx.t.tenants
            .list_tenants(op(pb::ListTenantsRequest::default()))
            .await
            .unwrap_err();
    assert_eq!(shed.code(), Code::ResourceExhausted, "{shed:?}");
    assert!(shed.message().contains("management"), "{shed:?}");
    // Decisions never wait for a slot.
    let secret = fx.a_secret.clone();
    assert!(fx.t.authenticate(&secret).await.allowed);
    let q =
        fx.t.auth
            .check_quota(pb::CheckQuotaRequest {
                api_key: secret,
                dry_run: true,
                ..Default::default()
            })
            .await
            .unwrap();
    assert!(q.into_inner().allowed);
    // The slow calls run out of time, typed, and free their slots.
    for call in slow {
        let e = call.await.unwrap().unwrap_err();
        assert_eq!(e.code(), Code::DeadlineExceeded, "{e:?}");
    }
    lock.rollback().await.unwrap();
    fx.t.tenants
        .list_tenants(op(pb::ListTenantsRequest::default()))
        .await
        .unwrap();
}

/// The user id of `email` in tenant A (the operator lists the users).
async fn user_id(fx: &mut Fixture, email: &str) -> String {
    fx.console
        .list_users(op(pb::ListUsersRequest {
            tenant_id: A.into(),
        }))
        .await
        .unwrap()
        .into_inner()
        .users
        .into_iter()
        .find(|u| u.email == email)
        .expect("a user of A")
        .user_id
}

#[sqlx::test]
async fn a_demoted_disabled_or_deleted_users_access_token_stops_acting_at_once(
    _p: PgPoolOptions,
    conn: PgConnectOptions,
) {
    let mut fx = fixture(&conn).await;
    let new_key = |bearer: &str| {
        with(
            Some(bearer),
            pb::CreateKeyRequest {
                name: "by a console user".into(),
                ..Default::default()
            },
        )
    };
    let list = |bearer: &str| with(Some(bearer), pb::ListKeysRequest::default());
    let mut auth = fx.t.auth.clone();
    let admin = fx.admin.clone();
    auth.create_key(new_key(&admin)).await.unwrap();

    // The owner makes the admin a viewer: the admin's token, still saying
    // "admin" for up to 15 minutes, manages nothing from now on.
    let admin_id = user_id(&mut fx, "admin@a.example").await;
    let owner = fx.owner.clone();
    fx.console
        .update_user(with(
            Some(&owner),
            pb::UpdateUserRequest {
                user_id: admin_id.clone(),
                update_mask: vec!["role".into()],
                role: "viewer".into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap();
    let e = auth.create_key(new_key(&admin)).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    auth.list_keys(list(&admin)).await.unwrap();

    // Disabled: the token no longer identifies anyone.
    fx.console
        .update_user(with(
            Some(&owner),
            pb::UpdateUserRequest {
                user_id: admin_id,
                update_mask: vec!["disabled".into()],
                disabled: true,
                ..Default::default()
            },
        ))
        .await
        .unwrap();
    let e = auth.list_keys(list(&admin)).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");

    // Deleted: the same.
    let developer = fx.developer.clone();
    auth.list_keys(list(&developer)).await.unwrap();
    let developer_id = user_id(&mut fx, "developer@a.example").await;
    fx.console
        .delete_user(with(
            Some(&owner),
            pb::DeleteUserRequest {
                tenant_id: String::new(),
                user_id: developer_id,
            },
        ))
        .await
        .unwrap();
    let e = auth.list_keys(list(&developer)).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
}

//! Tenants: subscription and plan changes on every replica, listing in pages,
//! CheckQuota from the plan.

use super::*;

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
                label_selector: Default::default(),
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

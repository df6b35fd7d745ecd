//! Who may call: tenant isolation, the operator token, and bad input that
//! changes nothing.

use super::*;

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
            labels: Default::default(),
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
            labels: Default::default(),
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

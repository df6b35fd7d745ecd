//! Management by console users: their tenant only, their role only; the
//! operator path unchanged.

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tonic::Code;

use crate::common::{op, reason};
use crate::harness::{bearer, spawn_console, spawn_console_with_jwt, Console, PASSWORD};
use crate::jwt_keys::{claims, TestKey};
use tollgate::crypto::issuers::{IssuerSettings, IssuerTenants, PublicKeySettings};
use tollgate::grpc::pb;

/// Makes `email` the owner of a new tenant `tenant` (the operator's way)
/// and returns their access token.
async fn owner(c: &mut Console, email: &str, tenant: &str) -> String {
    c.add_owner(email, tenant).await;
    c.login(email).await.access_token
}

/// The owner of `tenant` adds a user with `role`; returns their token.
async fn member(c: &mut Console, owner_token: &str, email: &str, role: &str) -> String {
    c.console
        .create_user(bearer(
            owner_token,
            pb::CreateUserRequest {
                tenant_id: String::new(),
                email: email.into(),
                password: PASSWORD.into(),
                role: role.into(),
            },
        ))
        .await
        .unwrap();
    c.mail.next_for("email_verification", email).await;
    c.login(email).await.access_token
}

fn code<T: std::fmt::Debug>(r: Result<T, tonic::Status>) -> Code {
    r.unwrap_err().code()
}

#[sqlx::test]
async fn an_owner_manages_their_own_keys_and_nothing_of_another_tenant(
    _p: PgPoolOptions,
    conn: PgConnectOptions,
) {
    let mut c = spawn_console(&conn).await;
    let a = owner(&mut c, "a@example.com", "tenant-a").await;
    c.add_owner("b@example.com", "tenant-b").await;
    // The operator's path is unchanged: it moves A to a bigger plan.
    c.t.tenants
        .update_tenant(op(pb::UpdateTenantRequest {
            tenant_id: "tenant-a".into(),
            update_mask: vec!["plan".into()],
            plan: "pro".into(),
            ..Default::default()
        }))
        .await
        .unwrap();
    let (b_secret, b_key) = c.t.create_key("tenant-b").await;

    // A manages its own keys with its console token (tenant_id may be omitted).
    let created =
        c.t.auth
            .create_key(bearer(
                &a,
                pb::CreateKeyRequest {
                    name: "ci".into(),
                    ..Default::default()
                },
            ))
            .await
            .unwrap()
            .into_inner();
    let mine = created.key.unwrap();
    assert_eq!(mine.tenant_id, "tenant-a");
    assert!(c.t.authenticate(&created.api_key).await.allowed);
    let listed =
        c.t.auth
            .list_keys(bearer(&a, pb::ListKeysRequest::default()))
            .await
            .unwrap()
            .into_inner();
    assert_eq!(listed.keys.len(), 1);
    let rotated =
        c.t.auth
            .rotate_key(bearer(
                &a,
                pb::RotateKeyRequest {
                    key_id: mine.key_id.clone(),
                    grace_seconds: 60,
                    ..Default::default()
                },
            ))
            .await
            .unwrap()
            .into_inner();
    let new_id = rotated.key.unwrap().key_id;
    c.t.auth
        .update_key(bearer(
            &a,
            pb::UpdateKeyRequest {
                key_id: new_id.clone(),
                update_mask: vec!["name".into()],
                name: "ci-2".into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap();
    c.t.auth
        .revoke_key(bearer(
            &a,
            pb::RevokeKeyRequest {
                key_id: new_id,
                reason: "done".into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap();
    let own_tenant =
        c.t.tenants
            .get_tenant(bearer(&a, pb::GetTenantRequest::default()))
            .await
            .unwrap()
            .into_inner();
    assert_eq!(own_tenant.tenant.unwrap().tenant_id, "tenant-a");

    // Nothing of B: reading, creating, rotating, updating, revoking.
    let keys_before = c.count("api_keys").await;
    let audit_before = c.count("audit_events").await;
    let b_id = b_key.key_id.clone();
    let auth = &mut c.t.auth;
    let denied = [
        code(
            auth.get_key(bearer(
                &a,
                pb::GetKeyRequest {
                    key_id: b_id.clone(),
                    ..Default::default()
                },
            ))
            .await,
        ),
        code(
            auth.get_key(bearer(
                &a,
                pb::GetKeyRequest {
                    key_id: b_id.clone(),
                    tenant_id: "tenant-a".into(),
                },
            ))
            .await,
        ),
        code(
            auth.revoke_key(bearer(
                &a,
                pb::RevokeKeyRequest {
                    key_id: b_id.clone(),
                    ..Default::default()
                },
            ))
            .await,
        ),
        code(
            auth.rotate_key(bearer(
                &a,
                pb::RotateKeyRequest {
                    key_id: b_id.clone(),
                    ..Default::default()
                },
            ))
            .await,
        ),
        code(
            auth.update_key(bearer(
                &a,
                pb::UpdateKeyRequest {
                    key_id: b_id.clone(),
                    update_mask: vec!["name".into()],
                    name: "mine".into(),
                    ..Default::default()
                },
            ))
            .await,
        ),
        code(
            auth.create_key(bearer(
                &a,
                pb::CreateKeyRequest {
                    tenant_id: "tenant-b".into(),
                    name: "x".into(),
                    ..Default::default()
                },
            ))
            .await,
        ),
        code(
            auth.list_keys(bearer(
                &a,
                pb::ListKeysRequest {
                    tenant_id: "tenant-b".into(),
                    ..Default::default()
                },
            ))
            .await,
        ),
        code(
            auth.get_usage(bearer(
                &a,
                pb::GetUsageRequest {
                    tenant_id: "tenant-b".into(),
                    ..Default::default()
                },
            ))
            .await,
        ),
        code(
            auth.get_usage(bearer(
                &a,
                pb::GetUsageRequest {
                    key_id: b_id.clone(),
                    ..Default::default()
                },
            ))
            .await,
        ),
    ];
    let tenants = &mut c.t.tenants;
    let denied_tenants = [
        code(
            tenants
                .get_tenant(bearer(
                    &a,
                    pb::GetTenantRequest {
                        tenant_id: "tenant-b".into(),
                    },
                ))
                .await,
        ),
        code(
            tenants
                .update_tenant(bearer(
                    &a,
                    pb::UpdateTenantRequest {
                        tenant_id: "tenant-b".into(),
                        update_mask: vec!["name".into()],
                        name: "pwned".into(),
                        ..Default::default()
                    },
                ))
                .await,
        ),
        // Not even its own plan: billing belongs to the operator.
        code(
            tenants
                .update_tenant(bearer(
                    &a,
                    pb::UpdateTenantRequest {
                        update_mask: vec!["plan".into()],
                        plan: "enterprise".into(),
                        ..Default::default()
                    },
                ))
                .await,
        ),
        code(
            tenants
                .create_tenant(bearer(
                    &a,
                    pb::CreateTenantRequest {
                        tenant_id: "tenant-c".into(),
                        name: "C".into(),
                        ..Default::default()
                    },
                ))
                .await,
        ),
        code(
            tenants
                .list_tenants(bearer(&a, pb::ListTenantsRequest::default()))
                .await,
        ),
    ];
    // Another tenant's things are NOT_FOUND, exactly like missing ones;
    // what no console user may do is PERMISSION_DENIED.
    let expected = [Code::NotFound; 9]
        .into_iter()
        .chain([Code::NotFound, Code::NotFound])
        .chain([Code::PermissionDenied; 3]);
    for (i, (got, want)) in denied
        .iter()
        .chain(&denied_tenants)
        .zip(expected)
        .enumerate()
    {
        assert_eq!(*got, want, "call {i}");
    }
    let audit = c
        .console
        .list_audit_events(bearer(
            &a,
            pb::ListAuditEventsRequest {
                tenant_id: "tenant-b".into(),
                ..Default::default()
            },
        ))
        .await;
    assert_eq!(code(audit), Code::NotFound);
    assert_eq!(c.count("api_keys").await, keys_before);
    assert_eq!(c.count("audit_events").await, audit_before);
    assert!(
        c.t.authenticate(&b_secret).await.allowed,
        "B's key is untouched"
    );
    let b_tenant =
        c.t.tenants
            .get_tenant(op(pb::GetTenantRequest {
                tenant_id: "tenant-b".into(),
            }))
            .await
            .unwrap();
    assert_eq!(
        b_tenant.into_inner().tenant.unwrap().name,
        "Tenant tenant-b"
    );
}

#[sqlx::test]
async fn viewers_and_developers_read_but_cannot_write_and_admins_cannot_make_owners(
    _p: PgPoolOptions,
    conn: PgConnectOptions,
) {
    let mut c = spawn_console(&conn).await;
    let own = owner(&mut c, "o@example.com", "acme").await;
    let viewer = member(&mut c, &own, "v@example.com", "viewer").await;
    let dev = member(&mut c, &own, "d@example.com", "developer").await;
    let admin = member(&mut c, &own, "a@example.com", "admin").await;
    let (_, key) = c.t.create_key("acme").await;

    for reader in [&viewer, &dev] {
        let listed =
            c.t.auth
                .list_keys(bearer(reader, pb::ListKeysRequest::default()))
                .await
                .unwrap();
        assert_eq!(listed.into_inner().keys.len(), 1);
        c.t.auth
            .get_key(bearer(
                reader,
                pb::GetKeyRequest {
                    key_id: key.key_id.clone(),
                    ..Default::default()
                },
            ))
            .await
            .unwrap();
        let auth = &mut c.t.auth;
        let writes = [
            code(
                auth.create_key(bearer(
                    reader,
                    pb::CreateKeyRequest {
                        name: "x".into(),
                        ..Default::default()
                    },
                ))
                .await,
            ),
            code(
                auth.revoke_key(bearer(
                    reader,
                    pb::RevokeKeyRequest {
                        key_id: key.key_id.clone(),
                        ..Default::default()
                    },
                ))
                .await,
            ),
            code(
                auth.rotate_key(bearer(
                    reader,
                    pb::RotateKeyRequest {
                        key_id: key.key_id.clone(),
                        ..Default::default()
                    },
                ))
                .await,
            ),
            code(
                auth.update_key(bearer(
                    reader,
                    pb::UpdateKeyRequest {
                        key_id: key.key_id.clone(),
                        update_mask: vec!["name".into()],
                        name: "y".into(),
                        ..Default::default()
                    },
                ))
                .await,
            ),
        ];
        assert!(
            writes.iter().all(|c| *c == Code::PermissionDenied),
            "{writes:?}"
        );
        let add = c
            .console
            .create_user(bearer(
                reader,
                pb::CreateUserRequest {
                    email: "x@example.com".into(),
                    password: PASSWORD.into(),
                    role: "viewer".into(),
                    ..Default::default()
                },
            ))
            .await;
        assert_eq!(code(add), Code::PermissionDenied);
        let audit = c
            .console
            .list_audit_events(bearer(reader, pb::ListAuditEventsRequest::default()))
            .await;
        assert_eq!(code(audit), Code::PermissionDenied);
    }
    let key_now =
        c.t.auth
            .get_key(op(pb::GetKeyRequest {
                key_id: key.key_id.clone(),
                ..Default::default()
            }))
            .await
            .unwrap();
    let key_now = key_now.into_inner().key.unwrap();
    assert_eq!(
        (key_now.name.as_str(), key_now.revoked_at),
        ("test key", None)
    );

    // Admins manage users, but only owners add owners.
    let owner_by_admin = c
        .console
        .create_user(bearer(
            &admin,
            pb::CreateUserRequest {
                email: "o2@example.com".into(),
                password: PASSWORD.into(),
                role: "owner".into(),
                ..Default::default()
            },
        ))
        .await;
    assert_eq!(code(owner_by_admin), Code::PermissionDenied);
    member(&mut c, &admin, "v2@example.com", "viewer").await;
    let users = c
        .console
        .list_users(bearer(&admin, pb::ListUsersRequest::default()))
        .await
        .unwrap();
    assert_eq!(users.into_inner().users.len(), 5);
}

#[sqlx::test]
async fn only_console_tokens_manage_and_only_while_valid(
    _p: PgPoolOptions,
    conn: PgConnectOptions,
) {
    // An external issuer the deployment trusts for the dashboard surface.
    let idp = TestKey::es256("idp-1");
    let iss = "https://idp.example";
    let mut c = spawn_console_with_jwt(&conn, |jwt| {
        jwt.issuers = vec![IssuerSettings {
            issuer: iss.into(),
            tenants: Some(IssuerTenants::Word("all".into())),
            audiences: vec!["tollgate-console".into()],
            public_keys: vec![PublicKeySettings {
                kid: Some("idp-1".into()),
                algorithm: "ES256".into(),
                pem: Some(idp.public_pem.clone()),
                file: None,
            }],
            ..IssuerSettings::default()
        }]
    })
    .await;
    let own = owner(&mut c, "o@example.com", "acme").await;
    let list = |token: &str| bearer(token, pb::ListKeysRequest::default());
    c.t.auth.list_keys(list(&own)).await.unwrap();

    // The external issuer's token says everything a console token says
    // (the owner's user id, tenant, role, audience, a verified email), and
    // it is good: the dashboard surface accepts it.
    let users = c
        .console
        .list_users(bearer(&own, pb::ListUsersRequest::default()))
        .await
        .unwrap()
        .into_inner()
        .users;
    let mut claims = claims(iss, "tollgate-console", "acme", 600);
    claims["sub"] = users[0].user_id.clone().into();
    claims["role"] = "owner".into();
    claims["email_verified"] = true.into();
    let external = idp.sign(&claims);
    let r =
        c.t.authenticate_with(pb::AuthenticateRequest {
            token: external.clone(),
            surface: "dashboard".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(r.allowed, "{r:?}");
    // But only the console's own tokens manage.
    for rpc in ["ListKeys", "ListUsers"] {
        let refused = match rpc {
            "ListKeys" => code(c.t.auth.list_keys(list(&external)).await),
            _ => code(
                c.console
                    .list_users(bearer(&external, pb::ListUsersRequest::default()))
                    .await,
            ),
        };
        assert_eq!(refused, Code::Unauthenticated, "{rpc}");
    }

    // A tampered or unknown token is UNAUTHENTICATED, not a denial.
    let mut tampered = own.clone();
    tampered.pop();
    tampered.push(if own.ends_with('A') { 'B' } else { 'A' });
    for bad in [tampered.as_str(), "garbage", ""] {
        assert_eq!(
            code(c.t.auth.list_keys(list(bad)).await),
            Code::Unauthenticated,
            "{bad}"
        );
    }
    // After expiry (15 min + leeway) the token no longer manages.
    c.t.running
        .clock()
        .advance(std::time::Duration::from_secs(900 + 31));
    assert_eq!(
        code(c.t.auth.list_keys(list(&own)).await),
        Code::Unauthenticated
    );
    // The operator path is unchanged.
    c.t.auth
        .list_keys(op(pb::ListKeysRequest {
            tenant_id: "acme".into(),
            ..Default::default()
        }))
        .await
        .unwrap();
    let r = c.t.authenticate("tg_live_nope").await;
    assert_eq!(reason(&r), "CREDENTIAL_MALFORMED");
}

fn per_second(limit: u64) -> pb::LimitSpec {
    pb::LimitSpec {
        scope: "key".into(),
        period: "second".into(),
        limit,
        ..Default::default()
    }
}

#[sqlx::test]
async fn an_owner_cannot_raise_a_keys_limits_only_tighten_them_and_the_audit_shows_old_and_new(
    _p: PgPoolOptions,
    conn: PgConnectOptions,
) {
    let mut c = spawn_console(&conn).await;
    c.t.running
        .clock()
        .freeze_at("2026-11-23T10:00:00Z".parse().unwrap());
    let a = owner(&mut c, "a@example.com", "tenant-a").await;
    let mut auth = c.t.auth.clone();
    let create = |limits| {
        bearer(
            &a,
            pb::CreateKeyRequest {
                name: "ci".into(),
                limits,
                ..Default::default()
            },
        )
    };
    let err = auth
        .create_key(create(vec![per_second(1_000_000_000)]))
        .await
        .unwrap_err();
    assert_eq!(crate::common::violations(&err), vec!["limits[0].limit"]);
    assert_eq!(c.count("api_keys").await, 0, "nothing created");

    let created = auth
        .create_key(create(vec![per_second(2)]))
        .await
        .unwrap()
        .into_inner();
    let (secret, id) = (created.api_key, created.key.unwrap().key_id);
    let update = |limits| {
        bearer(
            &a,
            pb::UpdateKeyRequest {
                key_id: id.clone(),
                update_mask: vec!["limits".into()],
                limits,
                ..Default::default()
            },
        )
    };
    let err = auth
        .update_key(update(vec![per_second(1_000_000_000)]))
        .await
        .unwrap_err();
    assert_eq!(crate::common::violations(&err), vec!["limits[0].limit"]);
    let mut burst = per_second(2);
    burst.burst = 1000;
    let err = auth.update_key(update(vec![burst])).await.unwrap_err();
    assert_eq!(crate::common::violations(&err), vec!["limits[0].burst"]);

    // Tightening is the owner's to do, and it is in force.
    auth.update_key(update(vec![per_second(1)])).await.unwrap();
    let spend = || pb::AuthenticateRequest {
        api_key: secret.clone(),
        cost: Some(1),
        ..Default::default()
    };
    assert!(
        auth.authenticate(spend())
            .await
            .unwrap()
            .into_inner()
            .allowed
    );
    let r = auth.authenticate(spend()).await.unwrap().into_inner();
    assert_eq!(reason(&r), "RATE_LIMITED");

    let details: Vec<serde_json::Value> = sqlx::query_scalar(
        "SELECT details FROM audit_events WHERE action = 'key.updated' ORDER BY event_id",
    )
    .fetch_all(&c.pool)
    .await
    .unwrap();
    assert_eq!(details.len(), 1, "refused updates are not audited");
    assert_eq!(details[0]["limits"]["old"][0]["limit"], 2);
    assert_eq!(details[0]["limits"]["new"][0]["limit"], 1);
}

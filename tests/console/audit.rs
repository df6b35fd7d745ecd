//! The audit log: every management change, in its own transaction, with
//! actor, tenant, target, time and request id; append-only; paged.

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tonic::Request;

use crate::common::op;
use crate::harness::{bearer, spawn_console, PASSWORD};
use tollgate::grpc::pb;

fn with_request_id<T>(mut r: Request<T>, id: &str) -> Request<T> {
    r.metadata_mut().insert("x-request-id", id.parse().unwrap());
    r
}

#[sqlx::test]
async fn every_management_change_is_audited_with_actor_target_and_request_id(
    _p: PgPoolOptions,
    conn: PgConnectOptions,
) {
    let mut c = spawn_console(&conn).await;
    let signed = c.sign_up("o@example.com").await;
    let owner_id = signed.user_id;
    let acme = signed.tenant_id.as_str();
    let own = c.login("o@example.com").await.access_token;
    let me = format!("user:{owner_id}");

    let created =
        c.t.auth
            .create_key(with_request_id(
                bearer(
                    &own,
                    pb::CreateKeyRequest {
                        name: "ci".into(),
                        ..Default::default()
                    },
                ),
                "req-create-1",
            ))
            .await
            .unwrap()
            .into_inner();
    let key_id = created.key.unwrap().key_id;
    let rotated =
        c.t.auth
            .rotate_key(bearer(
                &own,
                pb::RotateKeyRequest {
                    key_id: key_id.clone(),
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
            &own,
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
            &own,
            pb::RevokeKeyRequest {
                key_id: new_id.clone(),
                reason: "leaked".into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap();
    c.t.tenants
        .update_tenant(with_request_id(
            op(pb::UpdateTenantRequest {
                tenant_id: acme.into(),
                update_mask: vec!["plan".into(), "subscription_status".into()],
                plan: "pro".into(),
                subscription_status: "past_due".into(),
                ..Default::default()
            }),
            "billing-42",
        ))
        .await
        .unwrap();
    c.console
        .create_user(bearer(
            &own,
            pb::CreateUserRequest {
                email: "v@example.com".into(),
                password: PASSWORD.into(),
                role: "viewer".into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap();
    c.mail.next_for("email_verification", "v@example.com").await;
    let added = c
        .console
        .list_users(bearer(&own, pb::ListUsersRequest::default()))
        .await
        .unwrap()
        .into_inner()
        .users
        .into_iter()
        .find(|u| u.email == "v@example.com")
        .unwrap();
    let reset = c.reset_token("v@example.com").await;
    c.console
        .reset_password(pb::ResetPasswordRequest {
            token: reset,
            new_password: "another long passphrase".into(),
        })
        .await
        .unwrap();
    // A refused change writes nothing.
    let before = c.count("audit_events").await;
    c.t.auth
        .rotate_key(bearer(
            &own,
            pb::RotateKeyRequest {
                key_id: new_id.clone(),
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(c.count("audit_events").await, before);

    let events = c
        .console
        .list_audit_events(bearer(&own, pb::ListAuditEventsRequest::default()))
        .await
        .unwrap()
        .into_inner()
        .events;
    let got: Vec<(&str, &str, &str)> = events
        .iter()
        .rev()
        .map(|e| (e.action.as_str(), e.actor.as_str(), e.target.as_str()))
        .collect();
    let viewer = format!("user:{}", added.user_id);
    assert_eq!(
        got,
        [
            ("tenant.created", me.as_str(), acme),
            ("user.created", me.as_str(), owner_id.as_str()),
            ("key.created", me.as_str(), key_id.as_str()),
            ("key.rotated", me.as_str(), key_id.as_str()),
            ("key.updated", me.as_str(), new_id.as_str()),
            ("key.revoked", me.as_str(), new_id.as_str()),
            ("tenant.updated", "operator", acme),
            ("user.created", me.as_str(), added.user_id.as_str()),
            (
                "user.password_reset",
                viewer.as_str(),
                added.user_id.as_str()
            ),
        ]
    );
    let by_action = |a: &str| events.iter().find(|e| e.action == a).unwrap();
    assert_eq!(by_action("key.created").request_id, "req-create-1");
    assert_eq!(by_action("tenant.updated").request_id, "billing-42");
    assert!(
        uuid::Uuid::parse_str(&by_action("key.revoked").request_id).is_ok(),
        "generated"
    );
    assert!(events.iter().all(|e| e.tenant_id == acme && e.at.is_some()));
    let updated: serde_json::Value =
        serde_json::from_str(&by_action("tenant.updated").details).unwrap();
    assert_eq!(updated["plan"], "pro");
    assert_eq!(updated["subscription_status"], "past_due");
    let revoked: serde_json::Value =
        serde_json::from_str(&by_action("key.revoked").details).unwrap();
    assert_eq!(revoked["reason"], "leaked");
    // No secret in any event.
    let all = format!("{events:?}");
    assert!(
        !all.contains(&created.api_key)
            && !all.contains(&rotated.api_key)
            && !all.contains("$argon2")
    );
}

#[sqlx::test]
async fn the_audit_log_is_paged_tenant_scoped_and_append_only(
    _p: PgPoolOptions,
    conn: PgConnectOptions,
) {
    let mut c = spawn_console(&conn).await;
    c.add_owner("a@example.com", "tenant-a").await;
    c.add_owner("b@example.com", "tenant-b").await;
    let a = c.login("a@example.com").await.access_token;
    c.t.tenants
        .update_tenant(op(pb::UpdateTenantRequest {
            tenant_id: "tenant-a".into(),
            update_mask: vec!["plan".into()],
            plan: "pro".into(),
            ..Default::default()
        }))
        .await
        .unwrap();
    for i in 0..4 {
        c.t.auth
            .create_key(bearer(
                &a,
                pb::CreateKeyRequest {
                    name: format!("k{i}"),
                    ..Default::default()
                },
            ))
            .await
            .unwrap();
    }
    // tenant-a: tenant.created, user.created, tenant.updated, 4 × key.created.
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = c
            .console
            .list_audit_events(bearer(
                &a,
                pb::ListAuditEventsRequest {
                    page_size: 3,
                    page_token: token.clone(),
                    ..Default::default()
                },
            ))
            .await
            .unwrap()
            .into_inner();
        assert!(page.events.len() <= 3);
        seen.extend(page.events);
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(seen.len(), 7);
    assert!(seen.iter().all(|e| e.tenant_id == "tenant-a"));
    assert!(
        seen.windows(2).all(|w| w[0].event_id > w[1].event_id),
        "newest first"
    );
    // The operator reads every tenant's log.
    let all = c
        .console
        .list_audit_events(op(pb::ListAuditEventsRequest::default()))
        .await
        .unwrap()
        .into_inner()
        .events;
    assert_eq!(all.len(), 9);
    let bad = c
        .console
        .list_audit_events(op(pb::ListAuditEventsRequest {
            page_token: "nope".into(),
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);

    // Rows can be added, never changed or removed.
    for sql in [
        "UPDATE audit_events SET actor = 'x'",
        "DELETE FROM audit_events",
        "TRUNCATE audit_events",
    ] {
        let err = sqlx::query(sql).execute(&c.pool).await.unwrap_err();
        assert!(err.to_string().contains("append-only"), "{sql}: {err}");
    }
    assert_eq!(c.count("audit_events").await, 9);
}

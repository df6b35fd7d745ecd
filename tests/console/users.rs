//! Users of a tenant over their lifetime: roles changed, disabled, enabled,
//! deleted (owners and admins; only owners touch owners; the tenant always
//! keeps an enabled owner), sessions with an absolute end, expired tokens
//! purged.

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tonic::Code;

use crate::common::op;
use crate::harness::{bearer, spawn_console, spawn_console_with, Console, PASSWORD};
use tollgate::grpc::pb;

const DAY: u64 = 24 * 3600;

/// Adds `email` with `role` to the caller's tenant; returns the user id.
async fn add(c: &mut Console, token: &str, email: &str, role: &str) -> String {
    c.console
        .create_user(bearer(
            token,
            pb::CreateUserRequest {
                email: email.into(),
                password: PASSWORD.into(),
                role: role.into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap();
    c.mail.next_for("email_verification", email).await;
    c.console
        .list_users(bearer(token, pb::ListUsersRequest::default()))
        .await
        .unwrap()
        .into_inner()
        .users
        .into_iter()
        .find(|u| u.email == email)
        .unwrap()
        .user_id
}

fn role(user_id: &str, role: &str) -> pb::UpdateUserRequest {
    pb::UpdateUserRequest {
        user_id: user_id.into(),
        update_mask: vec!["role".into()],
        role: role.into(),
        ..Default::default()
    }
}

fn disabled(user_id: &str, disabled: bool) -> pb::UpdateUserRequest {
    pb::UpdateUserRequest {
        user_id: user_id.into(),
        update_mask: vec!["disabled".into()],
        disabled,
        ..Default::default()
    }
}

fn delete(user_id: &str) -> pb::DeleteUserRequest {
    pb::DeleteUserRequest {
        user_id: user_id.into(),
        ..Default::default()
    }
}

#[sqlx::test]
async fn a_disabled_user_cannot_log_in_or_refresh_and_enabling_lets_them_back(
    _p: PgPoolOptions,
    conn: PgConnectOptions,
) {
    let mut c = spawn_console(&conn).await;
    c.add_owner("o@example.com", "acme").await;
    let own = c.login("o@example.com").await.access_token;
    let bob = add(&mut c, &own, "bob@example.com", "developer").await;
    let session = c.login("bob@example.com").await;

    let off = c
        .console
        .update_user(bearer(&own, disabled(&bob, true)))
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    assert!(off.disabled);
    assert_eq!(
        c.refresh(&session.refresh_token).await.unwrap_err().code(),
        Code::Unauthenticated,
        "the session ended"
    );
    let refused = c.login_as("bob@example.com", PASSWORD).await.unwrap_err();
    let unknown = c
        .login_as("nobody@example.com", PASSWORD)
        .await
        .unwrap_err();
    assert_eq!(
        (refused.code(), refused.message()),
        (unknown.code(), unknown.message())
    );
    // No reset token is sent for a disabled account.
    c.console
        .request_password_reset(pb::RequestPasswordResetRequest {
            email: "bob@example.com".into(),
            client_address: String::new(),
        })
        .await
        .unwrap();

    c.console
        .update_user(bearer(&own, disabled(&bob, false)))
        .await
        .unwrap();
    c.login("bob@example.com").await;
    assert!(c.mail.is_empty().await, "nothing was sent while disabled");
}

#[sqlx::test]
async fn the_tenant_always_keeps_an_enabled_owner(_p: PgPoolOptions, conn: PgConnectOptions) {
    let mut c = spawn_console(&conn).await;
    let o = c.add_owner("o@example.com", "acme").await;
    let own = c.login("o@example.com").await.access_token;
    let before = c.count("audit_events").await;
    for refused in [
        c.console
            .update_user(bearer(&own, role(&o.user_id, "admin")))
            .await
            .map(|_| ()),
        c.console
            .update_user(bearer(&own, disabled(&o.user_id, true)))
            .await
            .map(|_| ()),
        c.console
            .delete_user(bearer(&own, delete(&o.user_id)))
            .await
            .map(|_| ()),
        c.console
            .delete_user(op(pb::DeleteUserRequest {
                tenant_id: "acme".into(),
                user_id: o.user_id.clone(),
            }))
            .await
            .map(|_| ()),
    ] {
        let e = refused.unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
        assert!(e.message().contains("enabled owner"), "{}", e.message());
    }
    assert_eq!(c.count("audit_events").await, before, "nothing changed");
    // With a second owner, the first may step down.
    let second = add(&mut c, &own, "o2@example.com", "owner").await;
    c.console
        .update_user(bearer(&own, role(&o.user_id, "admin")))
        .await
        .unwrap();
    let e = c
        .console
        .delete_user(op(pb::DeleteUserRequest {
            tenant_id: "acme".into(),
            user_id: second,
        }))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
}

#[sqlx::test]
async fn only_owners_touch_owners_and_nobody_touches_another_tenant(
    _p: PgPoolOptions,
    conn: PgConnectOptions,
) {
    let mut c = spawn_console(&conn).await;
    let o = c.add_owner("o@example.com", "acme").await;
    let own = c.login("o@example.com").await.access_token;
    let admin_id = add(&mut c, &own, "admin@example.com", "admin").await;
    let viewer_id = add(&mut c, &own, "v@example.com", "viewer").await;
    let admin = c.login("admin@example.com").await.access_token;
    let viewer = c.login("v@example.com").await.access_token;
    let other = c.add_owner("x@example.com", "other").await;

    let code =
        |r: Result<tonic::Response<pb::UpdateUserResponse>, tonic::Status>| r.unwrap_err().code();
    assert_eq!(
        code(
            c.console
                .update_user(bearer(&admin, disabled(&o.user_id, true)))
                .await
        ),
        Code::PermissionDenied
    );
    assert_eq!(
        code(
            c.console
                .update_user(bearer(&admin, role(&viewer_id, "owner")))
                .await
        ),
        Code::PermissionDenied,
        "admins make no owners"
    );
    assert_eq!(
        code(
            c.console
                .update_user(bearer(&viewer, role(&viewer_id, "admin")))
                .await
        ),
        Code::PermissionDenied,
        "viewers manage nobody"
    );
    // Another tenant's user is not found from here.
    assert_eq!(
        code(
            c.console
                .update_user(bearer(&own, disabled(&other.user_id, true)))
                .await
        ),
        Code::NotFound
    );
    let bad = c
        .console
        .update_user(bearer(
            &own,
            pb::UpdateUserRequest {
                user_id: viewer_id.clone(),
                update_mask: vec!["email".into()],
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(crate::common::violations(&bad), ["update_mask"]);

    // An admin changes a viewer; the audit row holds old and new values.
    let changed = c
        .console
        .update_user(bearer(&admin, role(&viewer_id, "developer")))
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    assert_eq!(changed.role, "developer");
    let events = c
        .console
        .list_audit_events(bearer(&own, pb::ListAuditEventsRequest::default()))
        .await
        .unwrap()
        .into_inner()
        .events;
    let updated = events.iter().find(|e| e.action == "user.updated").unwrap();
    assert_eq!(updated.target, viewer_id);
    assert_eq!(updated.actor, format!("user:{admin_id}"));
    let details: serde_json::Value = serde_json::from_str(&updated.details).unwrap();
    assert_eq!(details["old"]["role"], "viewer");
    assert_eq!(details["new"]["role"], "developer");

    // Deleting a user ends them: no login, not listed, audited.
    c.console
        .delete_user(bearer(&admin, delete(&viewer_id)))
        .await
        .unwrap();
    assert_eq!(
        c.login_as("v@example.com", PASSWORD)
            .await
            .unwrap_err()
            .code(),
        Code::Unauthenticated
    );
    let users = c
        .console
        .list_users(bearer(&own, pb::ListUsersRequest::default()))
        .await
        .unwrap()
        .into_inner()
        .users;
    assert!(users.iter().all(|u| u.user_id != viewer_id));
    let events = c
        .console
        .list_audit_events(bearer(&own, pb::ListAuditEventsRequest::default()))
        .await
        .unwrap()
        .into_inner()
        .events;
    let deleted = events.iter().find(|e| e.action == "user.deleted").unwrap();
    let details: serde_json::Value = serde_json::from_str(&deleted.details).unwrap();
    assert_eq!(details["old"]["role"], "developer");
}

#[sqlx::test]
async fn refresh_never_extends_a_session_past_its_absolute_lifetime(
    _p: PgPoolOptions,
    conn: PgConnectOptions,
) {
    let mut c = spawn_console(&conn).await;
    c.sign_up("ada@example.com").await;
    let first = c.login("ada@example.com").await;
    assert_eq!(first.refresh_expires_in_seconds, 30 * DAY as u32);
    let clock = c.t.running.clock().clone();
    clock.advance(Duration::from_secs(20 * DAY));
    let later = c.refresh(&first.refresh_token).await.unwrap();
    assert!(
        later.refresh_expires_in_seconds <= 10 * DAY as u32,
        "{} s left: the session ends 30 days after login",
        later.refresh_expires_in_seconds
    );
    clock.advance(Duration::from_secs(10 * DAY + 1));
    assert_eq!(
        c.refresh(&later.refresh_token).await.unwrap_err().code(),
        Code::Unauthenticated
    );
}

#[sqlx::test]
async fn expired_console_tokens_are_purged(_p: PgPoolOptions, conn: PgConnectOptions) {
    let mut c = spawn_console(&conn).await;
    c.sign_up("ada@example.com").await;
    c.login("ada@example.com").await;
    assert_eq!(c.count("console_tokens").await, 2);
    c.t.running.clock().advance(Duration::from_secs(31 * DAY));
    // The next write removes what has expired.
    c.login("ada@example.com").await;
    assert_eq!(c.count("console_tokens").await, 1);
}

#[sqlx::test]
async fn with_require_verified_email_an_unverified_user_manages_nothing(
    _p: PgPoolOptions,
    conn: PgConnectOptions,
) {
    let mut c = spawn_console_with(&conn, |s| s.require_verified_email = true).await;
    let ada = c.sign_up("ada@example.com").await;
    let unverified = c.login("ada@example.com").await.access_token;
    let e =
        c.t.auth
            .list_keys(bearer(&unverified, pb::ListKeysRequest::default()))
            .await
            .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("verify your email"), "{}", e.message());
    c.console
        .verify_email(pb::VerifyEmailRequest {
            token: ada.verification_token,
        })
        .await
        .unwrap();
    let verified = c.login("ada@example.com").await.access_token;
    c.t.auth
        .list_keys(bearer(&verified, pb::ListKeysRequest::default()))
        .await
        .unwrap();
}

//! Console accounts: sign-up, login, refresh rotation, email verification,
//! password reset, throttling, bad input.

use std::collections::HashMap;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tonic::Code;
use tonic_types::StatusExt;

use crate::common::{reason, violations};
use crate::harness::{spawn_console, PASSWORD};
use tollgate::grpc::pb;

#[sqlx::test]
async fn sign_up_then_login_gives_a_dashboard_jwt_on_the_default_plan(
    _p: PgPoolOptions,
    conn: PgConnectOptions,
) {
    let mut c = spawn_console(&conn).await;
    let signed = c.sign_up("Ada@Example.com", "acme").await;
    let user = signed.user.unwrap();
    assert_eq!(
        (user.email.as_str(), user.role.as_str()),
        ("ada@example.com", "owner")
    );
    assert_eq!(signed.plan, "free");
    assert!(!user.email_verified);
    assert!(signed.email_verification_token.starts_with("tgev_"));

    let session = c.login("ada@example.com").await;
    assert!(session.refresh_token.starts_with("tgrt_"));
    assert_eq!(session.expires_in_seconds, 900);
    let header = jsonwebtoken::decode_header(&session.access_token).unwrap();
    assert_eq!(
        (header.alg, header.kid.as_deref()),
        (jsonwebtoken::Algorithm::EdDSA, Some("dev"))
    );

    // The console's own tokens are verified on the dashboard surface.
    let headers = HashMap::from([(
        "authorization".to_string(),
        format!("Bearer {}", session.access_token),
    )]);
    let r =
        c.t.authenticate_with(pb::AuthenticateRequest {
            headers,
            surface: "dashboard".into(),
            required_scopes: vec!["admin".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(r.allowed, "{r:?}");
    let p = r.principal.unwrap();
    assert_eq!((p.tenant_id.as_str(), p.plan.as_str()), ("acme", "free"));
    assert_eq!(p.subject, user.user_id);

    // GetJwks publishes the key that verifies it.
    let jwks = c
        .console
        .get_jwks(pb::GetJwksRequest {})
        .await
        .unwrap()
        .into_inner()
        .jwks;
    let set: jsonwebtoken::jwk::JwkSet = serde_json::from_str(&jwks).unwrap();
    let key = jsonwebtoken::DecodingKey::from_jwk(&set.keys[0]).unwrap();
    let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::EdDSA);
    v.set_audience(&["tollgate-console"]);
    let claims = jsonwebtoken::decode::<serde_json::Value>(&session.access_token, &key, &v)
        .unwrap()
        .claims;
    assert_eq!(claims["role"], "owner");
    assert_eq!(claims["tenant_id"], "acme");
}

#[sqlx::test]
async fn weak_passwords_bad_emails_and_duplicates_are_refused_and_write_nothing(
    _p: PgPoolOptions,
    conn: PgConnectOptions,
) {
    let mut c = spawn_console(&conn).await;
    c.sign_up("ada@example.com", "acme").await;
    let (tenants, users, audit) = (
        c.count("tenants").await,
        c.count("console_users").await,
        c.count("audit_events").await,
    );
    let weak = c
        .console
        .sign_up(pb::SignUpRequest {
            email: "bob@example.com".into(),
            password: "hunter2".into(),
            tenant_name: "Bob".into(),
            tenant_id: "bob".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(violations(&weak), ["password"]);
    assert!(
        weak.message().contains("at least 12 characters"),
        "{}",
        weak.message()
    );
    assert!(!weak.message().contains("hunter2"));

    let bad = c
        .console
        .sign_up(pb::SignUpRequest {
            email: "not-an-email".into(),
            password: PASSWORD.into(),
            tenant_name: String::new(),
            tenant_id: "bad id!".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(violations(&bad), ["email", "tenant_name", "tenant_id"]);

    let dup = c
        .console
        .sign_up(pb::SignUpRequest {
            email: "ADA@example.com".into(),
            password: PASSWORD.into(),
            tenant_name: "Another".into(),
            tenant_id: "another".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(dup.code(), Code::AlreadyExists);
    let taken_tenant = c
        .console
        .sign_up(pb::SignUpRequest {
            email: "eve@example.com".into(),
            password: PASSWORD.into(),
            tenant_name: "Acme again".into(),
            tenant_id: "acme".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(taken_tenant.code(), Code::AlreadyExists);
    assert_eq!(c.count("tenants").await, tenants);
    assert_eq!(c.count("console_users").await, users);
    assert_eq!(c.count("audit_events").await, audit);

    let wrong = c
        .login_as("ada@example.com", "wrong password!!")
        .await
        .unwrap_err();
    let unknown = c
        .login_as("nobody@example.com", PASSWORD)
        .await
        .unwrap_err();
    assert_eq!(
        (wrong.code(), unknown.code()),
        (Code::Unauthenticated, Code::Unauthenticated)
    );
    assert_eq!(wrong.message(), unknown.message(), "no account enumeration");
}

#[sqlx::test]
async fn refresh_tokens_rotate_and_a_replay_revokes_the_session(
    _p: PgPoolOptions,
    conn: PgConnectOptions,
) {
    let mut c = spawn_console(&conn).await;
    c.sign_up("ada@example.com", "acme").await;
    let first = c.login("ada@example.com").await;
    let second = c.refresh(&first.refresh_token).await.unwrap();
    assert_ne!(second.refresh_token, first.refresh_token);
    assert_ne!(second.access_token, first.access_token);

    // Replaying the spent token is refused, and ends the session: the
    // token it was rotated into stops working too.
    let replay = c.refresh(&first.refresh_token).await.unwrap_err();
    assert_eq!(replay.code(), Code::Unauthenticated);
    assert_eq!(
        c.refresh(&second.refresh_token).await.unwrap_err().code(),
        Code::Unauthenticated
    );

    // Another session is unaffected; logout ends it.
    let other = c.login("ada@example.com").await;
    c.console
        .logout(pb::LogoutRequest {
            refresh_token: other.refresh_token.clone(),
        })
        .await
        .unwrap();
    assert_eq!(
        c.refresh(&other.refresh_token).await.unwrap_err().code(),
        Code::Unauthenticated
    );
    for garbage in ["", "tgrt_short", "nonsense", &"x".repeat(10_000)] {
        assert_eq!(
            c.refresh(garbage).await.unwrap_err().code(),
            Code::Unauthenticated
        );
    }
}

#[sqlx::test]
async fn a_password_reset_token_works_once_and_ends_every_session(
    _p: PgPoolOptions,
    conn: PgConnectOptions,
) {
    let mut c = spawn_console(&conn).await;
    c.sign_up("ada@example.com", "acme").await;
    let session = c.login("ada@example.com").await;
    let token = c
        .console
        .request_password_reset(pb::RequestPasswordResetRequest {
            email: "ada@example.com".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .password_reset_token;
    assert!(token.starts_with("tgpr_"));
    let none = c
        .console
        .request_password_reset(pb::RequestPasswordResetRequest {
            email: "nobody@example.com".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(none.password_reset_token, "");

    let reset = |token: &str, password: &str| pb::ResetPasswordRequest {
        token: token.into(),
        new_password: password.into(),
    };
    // A weak password is refused and does not spend the token.
    let weak = c
        .console
        .reset_password(reset(&token, "short"))
        .await
        .unwrap_err();
    assert_eq!(violations(&weak), ["new_password"]);
    let new_password = "a much better passphrase";
    c.console
        .reset_password(reset(&token, new_password))
        .await
        .unwrap();
    let again = c
        .console
        .reset_password(reset(&token, "yet another passphrase"))
        .await
        .unwrap_err();
    assert_eq!(violations(&again), ["token"]);

    assert_eq!(
        c.login_as("ada@example.com", PASSWORD)
            .await
            .unwrap_err()
            .code(),
        Code::Unauthenticated
    );
    c.login_as("ada@example.com", new_password).await.unwrap();
    // Sessions from before the reset are over.
    assert_eq!(
        c.refresh(&session.refresh_token).await.unwrap_err().code(),
        Code::Unauthenticated
    );
}

#[sqlx::test]
async fn email_verification_tokens_work_once(_p: PgPoolOptions, conn: PgConnectOptions) {
    let mut c = spawn_console(&conn).await;
    let signed = c.sign_up("ada@example.com", "acme").await;
    let verify = |token: &str| pb::VerifyEmailRequest {
        token: token.into(),
    };
    let user = c
        .console
        .verify_email(verify(&signed.email_verification_token))
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    assert!(user.email_verified);
    let again = c
        .console
        .verify_email(verify(&signed.email_verification_token))
        .await
        .unwrap_err();
    assert_eq!(violations(&again), ["token"]);
    // Verified accounts get no new token; the next login says verified.
    let next = c
        .console
        .request_email_verification(pb::RequestEmailVerificationRequest {
            email: "ada@example.com".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(next.email_verification_token, "");
    let session = c.login("ada@example.com").await;
    assert!(session.user.unwrap().email_verified);
}

#[sqlx::test]
async fn failed_logins_back_off_per_account(_p: PgPoolOptions, conn: PgConnectOptions) {
    let mut c = spawn_console(&conn).await;
    c.sign_up("ada@example.com", "acme").await;
    for _ in 0..5 {
        let e = c
            .login_as("ada@example.com", "wrong password!!")
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated);
    }
    c.login_as("ada@example.com", "wrong password!!")
        .await
        .unwrap_err();
    // Backing off: even the right password is refused, with a retry hint.
    let e = c.login_as("ada@example.com", PASSWORD).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e
        .get_details_retry_info()
        .and_then(|r| r.retry_delay)
        .is_some());
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    c.login("ada@example.com").await;
}

#[sqlx::test]
async fn an_unauthenticated_caller_cannot_dodge_the_address_throttle_with_client_address(
    _p: PgPoolOptions,
    conn: PgConnectOptions,
) {
    let mut c = spawn_console(&conn).await;
    let login = |i: u32| pb::LoginRequest {
        email: format!("nobody{i}@example.com"),
        password: "wrong password!!".into(),
        client_address: format!("198.51.100.{i}"),
    };
    // 21 failures from one peer, each claiming another address.
    for i in 0..21 {
        let e = c.console.login(login(i)).await.unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "attempt {i}: {e:?}");
    }
    // The peer's counter is what counts: it is backing off now.
    let e = c.console.login(login(21)).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
}

#[sqlx::test]
async fn console_tokens_are_not_valid_for_another_audience_or_after_expiry(
    _p: PgPoolOptions,
    conn: PgConnectOptions,
) {
    let mut c = spawn_console(&conn).await;
    c.sign_up("ada@example.com", "acme").await;
    let session = c.login("ada@example.com").await;
    c.t.running
        .clock()
        .advance(std::time::Duration::from_secs(900 + 31));
    let r =
        c.t.authenticate_with(pb::AuthenticateRequest {
            token: session.access_token,
            surface: "dashboard".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(reason(&r), "TOKEN_EXPIRED");
}

#[sqlx::test]
async fn no_password_token_or_hash_reaches_the_logs(_p: PgPoolOptions, conn: PgConnectOptions) {
    crate::logs::capture();
    let mut c = spawn_console(&conn).await;
    let signed = c.sign_up("logs@example.com", "logs").await;
    let wrong = "wrong but long password";
    c.login_as("logs@example.com", wrong).await.unwrap_err();
    let first = c.login("logs@example.com").await;
    let second = c.refresh(&first.refresh_token).await.unwrap();
    c.refresh(&first.refresh_token).await.unwrap_err(); // a replay is logged
    let reset = c
        .console
        .request_password_reset(pb::RequestPasswordResetRequest {
            email: "logs@example.com".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .password_reset_token;
    let new_password = "the new secret passphrase";
    c.console
        .reset_password(pb::ResetPasswordRequest {
            token: reset.clone(),
            new_password: new_password.into(),
        })
        .await
        .unwrap();
    c.console
        .verify_email(pb::VerifyEmailRequest {
            token: signed.email_verification_token.clone(),
        })
        .await
        .unwrap();
    let hash: String = sqlx::query_scalar("SELECT password_hash FROM console_users")
        .fetch_one(&c.pool)
        .await
        .unwrap();
    let text = crate::logs::text();
    assert!(text.contains("console login"), "the capture works");
    assert!(text.contains("refresh token was presented again"));
    let salt = hash.rsplit('$').nth(1).unwrap().to_string();
    for secret in [
        PASSWORD,
        wrong,
        new_password,
        &hash,
        &salt,
        &first.access_token,
        &first.refresh_token,
        &second.access_token,
        &second.refresh_token,
        &signed.email_verification_token,
        &reset,
    ] {
        assert!(
            !text.contains(secret),
            "a secret was logged: {}…",
            &secret[..8]
        );
    }
}

//! Console accounts: sign-up, login, refresh rotation, email verification,
//! password reset (tokens only ever through the signed webhook),
//! throttling, bad input.

use std::collections::HashMap;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tonic::Code;
use tonic_types::StatusExt;

use crate::common::{op, reason, violations};
use crate::harness::{spawn_console, spawn_console_with, PASSWORD};
use crate::mailbox::WEBHOOK_SECRET;
use tollgate::console::delivery::verify_signature;
use tollgate::console::settings::{SigningKeySettings, SignupPolicy};
use tollgate::grpc::pb;

#[sqlx::test]
async fn sign_up_then_login_gives_a_dashboard_jwt_on_the_default_plan(
    _p: PgPoolOptions,
    conn: PgConnectOptions,
) {
    let mut c = spawn_console(&conn).await;
    let signed = c.sign_up("Ada@Example.com").await;
    assert!(signed.verification_token.starts_with("tgev_"));

    let session = c.login("ada@example.com").await;
    let user = session.user.clone().unwrap();
    assert_eq!(
        (user.email.as_str(), user.role.as_str()),
        ("ada@example.com", "owner")
    );
    assert!(!user.email_verified);
    assert_eq!(user.tenant_id, signed.tenant_id, "a generated tenant id");
    let acme = signed.tenant_id.as_str();
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
    assert_eq!((p.tenant_id.as_str(), p.plan.as_str()), (acme, "free"));
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
    assert_eq!(claims["tenant_id"], acme);
}

#[sqlx::test]
async fn weak_passwords_and_bad_emails_are_refused_and_a_taken_email_gets_the_same_answer(
    _p: PgPoolOptions,
    conn: PgConnectOptions,
) {
    let mut c = spawn_console(&conn).await;
    c.sign_up("ada@example.com").await;
    let (tenants, users, audit) = (
        c.count("tenants").await,
        c.count("console_users").await,
        c.count("audit_events").await,
    );
    let sign_up = |email: &str, password: &str, tenant_name: &str| pb::SignUpRequest {
        email: email.into(),
        password: password.into(),
        tenant_name: tenant_name.into(),
        client_address: String::new(),
    };
    let weak = c
        .console
        .sign_up(sign_up("bob@example.com", "hunter2", "Bob"))
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
        .sign_up(sign_up("not-an-email", PASSWORD, ""))
        .await
        .unwrap_err();
    assert_eq!(violations(&bad), ["email", "tenant_name"]);

    // A taken address: the same empty answer as a new one, nothing
    // written, and the account's holder is told instead of the caller.
    let dup = c
        .console
        .sign_up(sign_up("ADA@example.com", PASSWORD, "Another"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(dup, pb::SignUpResponse {});
    let notice = c.mail.next_for("account_exists", "ada@example.com").await;
    assert_eq!(notice.token(), "", "a notice carries no token");
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
async fn create_user_answers_the_same_whether_or_not_the_email_has_an_account_anywhere(
    _p: PgPoolOptions,
    conn: PgConnectOptions,
) {
    let mut c = spawn_console(&conn).await;
    c.add_owner("elsewhere@example.com", "tenant-b").await;
    let a = c.add_owner("a@example.com", "tenant-a").await;
    let own = c.login("a@example.com").await.access_token;
    let add = |email: &str| {
        crate::harness::bearer(
            &own,
            pb::CreateUserRequest {
                email: email.into(),
                password: PASSWORD.into(),
                role: "viewer".into(),
                ..Default::default()
            },
        )
    };
    let taken = c
        .console
        .create_user(add("elsewhere@example.com"))
        .await
        .unwrap()
        .into_inner();
    c.mail
        .next_for("account_exists", "elsewhere@example.com")
        .await;
    let fresh = c
        .console
        .create_user(add("new@example.com"))
        .await
        .unwrap()
        .into_inner();
    c.mail
        .next_for("email_verification", "new@example.com")
        .await;
    assert_eq!(taken, fresh, "one answer either way");
    assert_eq!(taken, pb::CreateUserResponse {});
    let listed = c
        .console
        .list_users(op(pb::ListUsersRequest {
            tenant_id: a.tenant_id.clone(),
        }))
        .await
        .unwrap()
        .into_inner()
        .users;
    let emails: Vec<&str> = listed.iter().map(|u| u.email.as_str()).collect();
    assert_eq!(emails, ["a@example.com", "new@example.com"]);
}

#[sqlx::test]
async fn sign_up_is_by_invitation_unless_opened_and_off_takes_no_accounts(
    _p: PgPoolOptions,
    conn: PgConnectOptions,
) {
    // `invite`, the default of `tollgate serve` (the harness runs in dev
    // mode, where sign-up is open unless configured).
    let mut c = spawn_console_with(&conn, |s| s.signup = Some(SignupPolicy::Invite)).await;
    let e = c
        .console
        .sign_up(pb::SignUpRequest {
            email: "ada@example.com".into(),
            password: PASSWORD.into(),
            tenant_name: "Acme".into(),
            client_address: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert_eq!(c.count("tenants").await, 0);
    // An operator-made tenant gets its owner; the owner adds users.
    c.add_owner("ada@example.com", "acme").await;
    let own = c.login("ada@example.com").await.access_token;
    c.console
        .create_user(crate::harness::bearer(
            &own,
            pb::CreateUserRequest {
                email: "bob@example.com".into(),
                password: PASSWORD.into(),
                role: "viewer".into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap();
    c.mail
        .next_for("email_verification", "bob@example.com")
        .await;

    let mut off = spawn_console_with(&conn, |s| s.signup = Some(SignupPolicy::Off)).await;
    off.t.create_tenant("ops", "free").await;
    let e = off
        .console
        .create_user(op(pb::CreateUserRequest {
            tenant_id: "ops".into(),
            email: "carol@example.com".into(),
            password: PASSWORD.into(),
            role: "owner".into(),
        }))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
}

#[sqlx::test]
async fn refresh_tokens_rotate_and_a_replay_revokes_the_session(
    _p: PgPoolOptions,
    conn: PgConnectOptions,
) {
    let mut c = spawn_console(&conn).await;
    c.sign_up("ada@example.com").await;
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
async fn a_password_reset_token_is_never_returned_to_the_caller_it_reaches_the_signed_webhook(
    _p: PgPoolOptions,
    conn: PgConnectOptions,
) {
    let mut c = spawn_console(&conn).await;
    let ada = c.sign_up("ada@example.com").await;
    let session = c.login("ada@example.com").await;
    let ask = |email: &str| pb::RequestPasswordResetRequest {
        email: email.into(),
        client_address: String::new(),
    };
    let answer = c
        .console
        .request_password_reset(ask("ada@example.com"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer, pb::RequestPasswordResetResponse {}, "no token");
    let m = c.mail.next_for("password_reset", "ada@example.com").await;
    assert!(
        verify_signature(WEBHOOK_SECRET.as_bytes(), &m.signature, &m.body),
        "signed: {}",
        m.signature
    );
    assert!(!verify_signature(b"another secret", &m.signature, &m.body));
    assert_eq!(m.content_type, "application/json");
    assert_eq!(m.json["id"], m.delivery_id.as_str());
    assert_eq!(m.tenant_id(), ada.tenant_id);
    assert!(m.json["expires_at"].as_str().unwrap().ends_with('Z'));
    let token = m.token();
    assert!(token.starts_with("tgpr_"));
    // No account: the same answer, and nothing is sent.
    let none = c
        .console
        .request_password_reset(ask("nobody@example.com"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(none, answer);

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
    assert!(c.mail.is_empty().await, "nothing was sent for nobody@");
}

#[sqlx::test]
async fn a_newer_reset_token_voids_the_older_one(_p: PgPoolOptions, conn: PgConnectOptions) {
    let mut c = spawn_console(&conn).await;
    c.sign_up("ada@example.com").await;
    let older = c.reset_token("ada@example.com").await;
    let newer = c.reset_token("ada@example.com").await;
    let reset = |token: &str| pb::ResetPasswordRequest {
        token: token.into(),
        new_password: "a much better passphrase".into(),
    };
    let e = c.console.reset_password(reset(&older)).await.unwrap_err();
    assert_eq!(violations(&e), ["token"]);
    c.console.reset_password(reset(&newer)).await.unwrap();
}

#[sqlx::test]
async fn a_refused_delivery_is_retried_with_the_same_id_and_token(
    _p: PgPoolOptions,
    conn: PgConnectOptions,
) {
    let mut c = spawn_console(&conn).await;
    c.sign_up("ada@example.com").await;
    c.mail.refuse(true);
    c.console
        .request_password_reset(pb::RequestPasswordResetRequest {
            email: "ada@example.com".into(),
            client_address: String::new(),
        })
        .await
        .unwrap();
    let refused = c.mail.next_for("password_reset", "ada@example.com").await;
    c.mail.refuse(false);
    let retried = c.mail.next_for("password_reset", "ada@example.com").await;
    assert_eq!(retried.delivery_id, refused.delivery_id);
    assert_eq!(retried.token(), refused.token());
    assert!(verify_signature(
        WEBHOOK_SECRET.as_bytes(),
        &retried.signature,
        &retried.body
    ));
}

#[sqlx::test]
async fn email_verification_tokens_work_once(_p: PgPoolOptions, conn: PgConnectOptions) {
    let mut c = spawn_console(&conn).await;
    let signed = c.sign_up("ada@example.com").await;
    let verify = |token: &str| pb::VerifyEmailRequest {
        token: token.into(),
    };
    let user = c
        .console
        .verify_email(verify(&signed.verification_token))
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    assert!(user.email_verified);
    let again = c
        .console
        .verify_email(verify(&signed.verification_token))
        .await
        .unwrap_err();
    assert_eq!(violations(&again), ["token"]);
    // Verified accounts get no new token; the next login says verified.
    let next = c
        .console
        .request_email_verification(pb::RequestEmailVerificationRequest {
            email: "ada@example.com".into(),
            client_address: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(next, pb::RequestEmailVerificationResponse {});
    let session = c.login("ada@example.com").await;
    assert!(session.user.unwrap().email_verified);
    assert!(c.mail.is_empty().await);
}

/// The retry delay a throttled call names, in whole seconds.
fn retry_after(e: &tonic::Status) -> i64 {
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    e.get_details_retry_info()
        .and_then(|r| r.retry_delay)
        .expect("RetryInfo")
        .as_secs() as i64
}

#[sqlx::test]
async fn failed_logins_back_off_per_account(_p: PgPoolOptions, conn: PgConnectOptions) {
    let mut c = spawn_console(&conn).await;
    c.sign_up("ada@example.com").await;
    c.sign_up("bob@example.com").await;
    // Time moves only when the test moves it: no back-off runs out by itself.
    let clock = c.t.running.clock().clone();
    clock.freeze_at(chrono::Utc::now());
    let wrong = |c: &mut crate::harness::Console| {
        let mut console = c.console.clone();
        async move {
            console
                .login(pb::LoginRequest {
                    email: "ada@example.com".into(),
                    password: "wrong password!!".into(),
                    client_address: String::new(),
                })
                .await
                .unwrap_err()
        }
    };
    // Five free failures, then the sixth starts the back-off: 1 s.
    for _ in 0..6 {
        assert_eq!(wrong(&mut c).await.code(), Code::Unauthenticated);
    }
    let e = c.login_as("ada@example.com", PASSWORD).await.unwrap_err();
    assert_eq!(retry_after(&e), 1, "even the right password waits: {e:?}");
    // Per account: another account from the same address is not held up.
    c.login("bob@example.com").await;
    // Nothing changes while time stands still.
    let e = c.login_as("ada@example.com", PASSWORD).await.unwrap_err();
    assert_eq!(retry_after(&e), 1);

    // Each further failure doubles the wait.
    clock.advance(std::time::Duration::from_secs(1));
    assert_eq!(wrong(&mut c).await.code(), Code::Unauthenticated);
    let e = c.login_as("ada@example.com", PASSWORD).await.unwrap_err();
    assert_eq!(retry_after(&e), 2, "{e:?}");
    clock.advance(std::time::Duration::from_millis(1999));
    let e = c.login_as("ada@example.com", PASSWORD).await.unwrap_err();
    assert_eq!(retry_after(&e), 1, "1 ms left, rounded up");
    clock.advance(std::time::Duration::from_millis(1));
    c.login("ada@example.com").await;
}

#[sqlx::test]
async fn sixty_four_parallel_wrong_guesses_verify_at_most_six(
    _p: PgPoolOptions,
    conn: PgConnectOptions,
) {
    let mut c = spawn_console(&conn).await;
    c.sign_up("ada@example.com").await;
    // Time stands still: the back-off cannot run out mid-test.
    c.t.running.clock().freeze_at(chrono::Utc::now());
    let guesses = (0..64).map(|i| {
        let mut client = c.console.clone();
        async move {
            client
                .login(pb::LoginRequest {
                    email: "ada@example.com".into(),
                    password: format!("wrong guess number {i}"),
                    client_address: String::new(),
                })
                .await
                .unwrap_err()
                .code()
        }
    });
    let codes = futures::future::join_all(guesses).await;
    // Each attempt is reserved before its password is verified: five free
    // ones, one that starts the back-off, and the rest never verified.
    let verified = codes
        .iter()
        .filter(|c| **c == Code::Unauthenticated)
        .count();
    let throttled = codes
        .iter()
        .filter(|c| **c == Code::ResourceExhausted)
        .count();
    assert_eq!((verified, throttled), (6, 58), "{codes:?}");
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

/// A console signing key whose private half the test holds too.
fn console_signing_key(kid: &str) -> (SigningKeySettings, jsonwebtoken::EncodingKey) {
    use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
    use ed25519_dalek::pkcs8::EncodePrivateKey;
    let key = ed25519_dalek::SigningKey::from_bytes(&rand::random());
    let pem = key.to_pkcs8_pem(LineEnding::LF).unwrap();
    let settings = SigningKeySettings {
        kid: kid.into(),
        private_key: Some(pem.to_string().into()),
        private_key_file: None,
    };
    (
        settings,
        jsonwebtoken::EncodingKey::from_ed_pem(pem.as_bytes()).unwrap(),
    )
}

/// The claims of a JWT (not verified: the test made or received it).
fn claims_of(token: &str) -> serde_json::Value {
    use base64::Engine;
    let payload = token.split('.').nth(1).expect("a JWT");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

#[sqlx::test]
async fn console_tokens_are_not_valid_for_another_audience_or_after_expiry(
    _p: PgPoolOptions,
    conn: PgConnectOptions,
) {
    let (key, signing) = console_signing_key("console-1");
    let mut c = spawn_console_with(&conn, |s| s.signing_keys = vec![key]).await;
    c.sign_up("ada@example.com").await;
    let session = c.login("ada@example.com").await;
    // The same claims and the same key, for another audience: a token a
    // deployment sharing this signing key (staging, another product) gave out.
    let mut claims = claims_of(&session.access_token);
    assert_eq!(claims["aud"], "tollgate-console");
    claims["aud"] = "another-console".into();
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::EdDSA);
    header.kid = Some("console-1".into());
    let elsewhere = jsonwebtoken::encode(&header, &claims, &signing).unwrap();

    let on_dashboard = async |c: &mut crate::harness::Console, token: &str| {
        c.t.authenticate_with(pb::AuthenticateRequest {
            token: token.into(),
            surface: "dashboard".into(),
            ..Default::default()
        })
        .await
        .unwrap()
    };
    let manages = async |c: &mut crate::harness::Console, token: &str| {
        c.t.auth
            .list_keys(crate::harness::bearer(
                token,
                pb::ListKeysRequest::default(),
            ))
            .await
            .map(|_| ())
            .map_err(|e| e.code())
    };
    // The token as issued works on both paths...
    assert!(on_dashboard(&mut c, &session.access_token).await.allowed);
    assert_eq!(manages(&mut c, &session.access_token).await, Ok(()));
    // ...the one for another audience on neither.
    let r = on_dashboard(&mut c, &elsewhere).await;
    assert_eq!(reason(&r), "TOKEN_INVALID", "{r:?}");
    assert_eq!(
        manages(&mut c, &elsewhere).await,
        Err(Code::Unauthenticated)
    );

    // Past its 15 minutes (and the 30 s leeway) the issued token is expired.
    c.t.running
        .clock()
        .advance(std::time::Duration::from_secs(900 + 31));
    let r = on_dashboard(&mut c, &session.access_token).await;
    assert_eq!(reason(&r), "TOKEN_EXPIRED");
    assert_eq!(
        manages(&mut c, &session.access_token).await,
        Err(Code::Unauthenticated)
    );
}

#[sqlx::test]
async fn no_password_token_or_hash_reaches_the_logs(_p: PgPoolOptions, conn: PgConnectOptions) {
    crate::logs::capture();
    let mut c = spawn_console(&conn).await;
    let signed = c.sign_up("logs@example.com").await;
    let wrong = "wrong but long password";
    c.login_as("logs@example.com", wrong).await.unwrap_err();
    let first = c.login("logs@example.com").await;
    let second = c.refresh(&first.refresh_token).await.unwrap();
    c.refresh(&first.refresh_token).await.unwrap_err(); // a replay is logged
    c.mail.refuse(true); // a failed delivery is logged too
    let reset = c.reset_token("logs@example.com").await;
    c.mail.refuse(false);
    c.mail.next_for("password_reset", "logs@example.com").await;
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
            token: signed.verification_token.clone(),
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
    assert!(
        text.contains("console delivery failed"),
        "the failure is logged"
    );
    let url = c.mail.url();
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
        &signed.verification_token,
        &reset,
        WEBHOOK_SECRET,
        &url,
    ] {
        assert!(
            !text.contains(secret),
            "a secret was logged: {}…",
            &secret[..8]
        );
    }
}

//! Sign in with an identity provider (MsgFlash "Sign in with Google"):
//! ID tokens signed by keys the tests generate, served by a local JWKS
//! server (or file), verified through real gRPC against real Postgres.

use std::collections::BTreeMap;

use serde_json::{json, Value};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tonic::transport::Channel;
use tonic::Code;
use tonic_types::StatusExt;

use crate::common::op;
use crate::harness::{spawn_console_with_jwt, Console, CONSOLE_BACKEND_TOKEN, PASSWORD};
use crate::jwks_server::JwksServer;
use crate::jwt_keys::{self, hs256_with, unsigned, TestKey};
use jsonwebtoken::Algorithm;
use tollgate::console::providers::ProviderSettings;
use tollgate::console::settings::SignupPolicy;
use tollgate::grpc::pb;
use tollgate::grpc::pb::console_service_client::ConsoleServiceClient;

const CLIENT_ID: &str = "1234-console.apps.googleusercontent.com";
const GOOGLE: &str = "https://accounts.google.com";

/// The provider's side: its keys and where it publishes them.
struct Google {
    rsa: TestKey,
    ec: TestKey,
    server: JwksServer,
}

impl Google {
    async fn start() -> Self {
        let rsa = TestKey::rsa(Algorithm::RS256, "g-rsa");
        let ec = TestKey::es256("g-ec");
        let server = JwksServer::start(jwt_keys::jwks(&[&rsa, &ec])).await;
        Self { rsa, ec, server }
    }

    fn settings(&self) -> ProviderSettings {
        ProviderSettings {
            client_ids: vec![CLIENT_ID.into()],
            jwks_url: Some(self.server.url()),
            allow_insecure_http: true,
            algorithms: vec!["RS256".into(), "ES256".into()],
            ..ProviderSettings::default()
        }
    }

    /// An ID token as Google issues it to the console.
    fn id_token(&self, sub: &str, email: &str) -> String {
        self.rsa.sign(&claims(sub, email))
    }
}

/// The nonce the dashboard began its sign-ins with (the token carries it).
const NONCE: &str = "n-dashboard";

fn claims(sub: &str, email: &str) -> Value {
    let now = jwt_keys::now();
    json!({"iss": GOOGLE, "azp": CLIENT_ID, "aud": CLIENT_ID, "sub": sub,
        "email": email, "email_verified": true, "iat": now, "exp": now + 3600,
        "nonce": NONCE})
}

/// A console with Google configured (sign-up as `signup`), its keys fetched.
async fn spawn(conn: &PgConnectOptions, google: &Google, signup: SignupPolicy) -> Console {
    let c = spawn_console_with_jwt(conn, |jwt| {
        jwt.console.signup = Some(signup);
        jwt.console.oidc = BTreeMap::from([("google".to_string(), google.settings())]);
    })
    .await;
    c.t.running
        .jwks_refreshes(GOOGLE)
        .expect("the provider's keys have a refresher")
        .wait_until(|s| s.ok() >= 1)
        .await;
    c
}

async fn sign_in(c: &mut Console, id_token: &str) -> Result<pb::LoginResponse, tonic::Status> {
    sign_in_with(c, id_token, NONCE).await
}

async fn sign_in_with(
    c: &mut Console,
    id_token: &str,
    nonce: &str,
) -> Result<pb::LoginResponse, tonic::Status> {
    sign_in_from(&mut c.console, id_token, nonce).await
}

/// A console client connected from its own loopback address (127.0.2.n):
/// failures are throttled per address.
async fn client_from(c: &Console, n: u8) -> ConsoleServiceClient<Channel> {
    let local = std::net::Ipv4Addr::new(127, 0, 2, n);
    let channel =
        tonic::transport::Endpoint::from_shared(format!("http://{}", c.t.running.local_addr()))
            .unwrap()
            .local_address(Some(local.into()))
            .connect()
            .await
            .unwrap();
    ConsoleServiceClient::new(channel)
}

async fn sign_in_from(
    client: &mut ConsoleServiceClient<Channel>,
    id_token: &str,
    nonce: &str,
) -> Result<pb::LoginResponse, tonic::Status> {
    Ok(client
        .sign_in_with_provider(pb::SignInWithProviderRequest {
            provider: "google".into(),
            id_token: id_token.into(),
            nonce: nonce.into(),
            client_address: String::new(),
        })
        .await?
        .into_inner())
}

/// Rows of every table a sign-in could write.
async fn rows(c: &Console) -> [i64; 5] {
    [
        c.count("tenants").await,
        c.count("console_users").await,
        c.count("console_identities").await,
        c.count("console_tokens").await,
        c.count("audit_events").await,
    ]
}

#[sqlx::test]
async fn a_google_id_token_creates_a_tenant_and_its_owner_without_a_password(
    _p: PgPoolOptions,
    conn: PgConnectOptions,
) {
    let google = Google::start().await;
    let mut c = spawn(&conn, &google, SignupPolicy::Open).await;
    let first = sign_in(&mut c, &google.id_token("110001", "Grace@Example.com"))
        .await
        .unwrap();
    let user = first.user.clone().unwrap();
    assert_eq!(
        (user.email.as_str(), user.role.as_str(), user.email_verified),
        ("grace@example.com", "owner", true),
        "the provider verified the address"
    );
    assert!(first.refresh_token.starts_with("tgrt_"));
    assert_eq!(first.expires_in_seconds, 900, "the same pair Login returns");
    // The console's own access token works on the dashboard surface.
    let r =
        c.t.authenticate_with(pb::AuthenticateRequest {
            headers: [(
                "authorization".to_string(),
                format!("Bearer {}", first.access_token),
            )]
            .into(),
            surface: "dashboard".into(),
            required_scopes: vec!["admin".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(r.allowed, "{r:?}");
    assert_eq!(r.principal.unwrap().tenant_id, user.tenant_id);

    // Signing in again is the same account, by (issuer, subject): even
    // after the provider-side email changed.
    let again = sign_in(&mut c, &google.id_token("110001", "grace@new.example"))
        .await
        .unwrap();
    assert_eq!(again.user.unwrap().user_id, user.user_id);
    assert_eq!(c.count("console_users").await, 1);
    let linked: (String, String) =
        sqlx::query_as("SELECT issuer, subject FROM console_identities WHERE user_id = $1::uuid")
            .bind(&user.user_id)
            .fetch_one(&c.pool)
            .await
            .unwrap();
    assert_eq!(linked, (GOOGLE.to_string(), "110001".to_string()));

    // No password: a password login fails exactly like a wrong password.
    let provider_only = c.login_as("grace@example.com", PASSWORD).await.unwrap_err();
    let wrong = c
        .login_as("nobody@example.com", PASSWORD)
        .await
        .unwrap_err();
    assert_eq!(
        (provider_only.code(), provider_only.message()),
        (wrong.code(), wrong.message()),
        "no oracle for provider-only accounts"
    );
    assert_eq!(provider_only.code(), Code::Unauthenticated);

    // A password reset gives it a password: then it has both.
    let token = c.reset_token("grace@example.com").await;
    c.console
        .reset_password(pb::ResetPasswordRequest {
            token,
            new_password: PASSWORD.into(),
        })
        .await
        .unwrap();
    let by_password = c.login("grace@example.com").await;
    assert_eq!(by_password.user.unwrap().user_id, user.user_id);
    let by_provider = sign_in(&mut c, &google.id_token("110001", "grace@example.com"))
        .await
        .unwrap();
    assert_eq!(by_provider.user.unwrap().user_id, user.user_id);
}

#[sqlx::test]
async fn an_existing_account_with_that_verified_email_is_linked(
    _p: PgPoolOptions,
    conn: PgConnectOptions,
) {
    let google = Google::start().await;
    let mut c = spawn(&conn, &google, SignupPolicy::Open).await;
    // Ada verified her address: linking keeps her password.
    let ada = c.sign_up("ada@example.com").await;
    c.console
        .verify_email(pb::VerifyEmailRequest {
            token: ada.verification_token.clone(),
        })
        .await
        .unwrap();
    let linked = sign_in(&mut c, &google.id_token("220002", "ada@example.com"))
        .await
        .unwrap()
        .user
        .unwrap();
    assert_eq!(
        (linked.user_id.as_str(), linked.tenant_id.as_str()),
        (ada.user_id.as_str(), ada.tenant_id.as_str())
    );
    c.login("ada@example.com").await; // password and provider, both
    let events = c
        .console
        .list_audit_events(op(pb::ListAuditEventsRequest {
            tenant_id: ada.tenant_id.clone(),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner()
        .events;
    let link = events
        .iter()
        .find(|e| e.action == "user.identity_linked")
        .expect("the link is audited");
    assert_eq!(link.target, ada.user_id);
    assert!(link.details.contains(GOOGLE), "{}", link.details);

    // Someone registered eve@ with a password but never proved the
    // address; the real Eve signs in with Google: the account is hers, and
    // the squatter's password and session are gone.
    let squat = c.sign_up("eve@example.com").await;
    let squatter = c.login("eve@example.com").await;
    let eve = sign_in(&mut c, &google.id_token("330003", "eve@example.com"))
        .await
        .unwrap()
        .user
        .unwrap();
    assert_eq!(eve.user_id, squat.user_id);
    assert!(eve.email_verified);
    let code = c
        .login_as("eve@example.com", PASSWORD)
        .await
        .unwrap_err()
        .code();
    assert_eq!(
        code,
        Code::Unauthenticated,
        "the squatter's password is removed"
    );
    let code = c.refresh(&squatter.refresh_token).await.unwrap_err().code();
    assert_eq!(code, Code::Unauthenticated, "the squatter's session ended");
    assert_eq!(c.count("console_users").await, 2);
}

#[sqlx::test]
async fn refused_id_tokens_say_why_and_change_nothing(_p: PgPoolOptions, conn: PgConnectOptions) {
    let google = Google::start().await;
    let mut c = spawn(&conn, &google, SignupPolicy::Open).await;
    let now = jwt_keys::now();
    // Frozen: the leeway case below cannot drift past its 60 s.
    c.t.running
        .clock()
        .freeze_at(chrono::DateTime::from_timestamp(now, 0).unwrap());
    let with = |f: &dyn Fn(&mut Value)| {
        let mut v = claims("440004", "mallory@example.com");
        f(&mut v);
        v
    };
    let good = claims("440004", "mallory@example.com");
    let stranger = TestKey::es256("g-ec"); // same kid, another key
    let unknown_kid = TestKey::es256("not-published");
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "another client's token",
            google.rsa.sign(&with(&|v| {
                v["aud"] = json!("someone-else.apps.googleusercontent.com");
                v["azp"] = json!("someone-else.apps.googleusercontent.com");
            })),
            "ID_TOKEN_WRONG_AUDIENCE",
        ),
        (
            "ours among several audiences, authorised for another",
            google.rsa.sign(&with(&|v| {
                v["aud"] = json!([CLIENT_ID, "other"]);
                v["azp"] = json!("other");
            })),
            "ID_TOKEN_WRONG_AUDIENCE",
        ),
        (
            "another issuer",
            google
                .rsa
                .sign(&with(&|v| v["iss"] = json!("https://evil.example"))),
            "ID_TOKEN_WRONG_ISSUER",
        ),
        (
            "unverified email",
            google
                .rsa
                .sign(&with(&|v| v["email_verified"] = json!(false))),
            "EMAIL_NOT_VERIFIED",
        ),
        (
            "no email_verified claim",
            google.rsa.sign(&with(&|v| {
                v.as_object_mut().unwrap().remove("email_verified");
            })),
            "EMAIL_NOT_VERIFIED",
        ),
        (
            "expired beyond the leeway",
            google.rsa.sign(&with(&|v| {
                v["iat"] = json!(now - 7200);
                v["exp"] = json!(now - 3600);
            })),
            "ID_TOKEN_EXPIRED",
        ),
        (
            "issued in the future",
            google.rsa.sign(&with(&|v| v["iat"] = json!(now + 3600))),
            "ID_TOKEN_NOT_YET_VALID",
        ),
        (
            "not valid before later",
            google.rsa.sign(&with(&|v| v["nbf"] = json!(now + 3600))),
            "ID_TOKEN_NOT_YET_VALID",
        ),
        (
            "no iat",
            google.rsa.sign(&with(&|v| {
                v.as_object_mut().unwrap().remove("iat");
            })),
            "ID_TOKEN_MISSING_CLAIM",
        ),
        (
            "signed by another key under a published kid",
            stranger.sign(&good),
            "ID_TOKEN_BAD_SIGNATURE",
        ),
        (
            "a kid the provider never published",
            unknown_kid.sign(&good),
            "ID_TOKEN_UNKNOWN_KEY",
        ),
        (
            "algorithm confusion: HS256 keyed with the RSA public key",
            hs256_with(google.rsa.public_pem.as_bytes(), "g-rsa", &good),
            "ID_TOKEN_ALGORITHM_NOT_ALLOWED",
        ),
        ("alg none", unsigned(&good), "ID_TOKEN_MALFORMED"),
        ("not a JWT", "garbage".into(), "ID_TOKEN_MALFORMED"),
    ];
    let before = rows(&c).await;
    for (n, (what, token, reason)) in cases.iter().enumerate() {
        let mut client = client_from(&c, n as u8 + 1).await;
        let refused = sign_in_from(&mut client, token, NONCE).await.unwrap_err();
        assert_eq!(refused.code(), Code::Unauthenticated, "{what}: {refused:?}");
        let info = refused.get_details_error_info().expect("an ErrorInfo");
        assert_eq!(info.reason, *reason, "{what}");
        assert!(!refused.message().contains(token.as_str()), "{what}");
    }
    let nonce = sign_in_with(
        &mut c,
        &google.rsa.sign(&with(&|v| v["nonce"] = json!("n-1"))),
        "n-2",
    )
    .await
    .unwrap_err();
    assert_eq!(
        nonce.get_details_error_info().unwrap().reason,
        "ID_TOKEN_NONCE_MISMATCH"
    );
    assert_eq!(rows(&c).await, before, "no refusal wrote anything");

    // The same claims, properly signed (and with the matching nonce), pass.
    sign_in_with(
        &mut c,
        &google.ec.sign(&with(&|v| v["nonce"] = json!("n-1"))),
        "n-1",
    )
    .await
    .unwrap();
    // Within the leeway (60 s) an expired token still passes.
    let skewed = google.rsa.sign(&with(&|v| v["exp"] = json!(now - 20)));
    sign_in(&mut c, &skewed).await.unwrap();
    let unknown = c
        .console
        .sign_in_with_provider(pb::SignInWithProviderRequest {
            provider: "github".into(),
            id_token: google.id_token("440004", "mallory@example.com"),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::InvalidArgument);
}

#[sqlx::test]
async fn with_sign_up_closed_only_existing_accounts_sign_in_with_a_provider(
    _p: PgPoolOptions,
    conn: PgConnectOptions,
) {
    let google = Google::start().await;
    let mut c = spawn(&conn, &google, SignupPolicy::Invite).await;
    let before = rows(&c).await;
    let refused = sign_in(&mut c, &google.id_token("550005", "new@example.com"))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    assert_eq!(rows(&c).await, before, "no tenant, no account");

    let owner = c.add_owner("invited@example.com", "acme").await;
    let user = sign_in(&mut c, &google.id_token("660006", "invited@example.com"))
        .await
        .unwrap()
        .user
        .unwrap();
    assert_eq!(
        (user.user_id, user.tenant_id),
        (owner.user_id, owner.tenant_id)
    );
}

#[sqlx::test]
async fn a_disabled_account_cannot_sign_in_through_its_provider(
    _p: PgPoolOptions,
    conn: PgConnectOptions,
) {
    let google = Google::start().await;
    let mut c = spawn(&conn, &google, SignupPolicy::Open).await;
    let token = google.id_token("770007", "dis@example.com");
    let user = sign_in(&mut c, &token).await.unwrap().user.unwrap();
    c.console
        .update_user(op(pb::UpdateUserRequest {
            tenant_id: user.tenant_id.clone(),
            user_id: user.user_id.clone(),
            update_mask: vec!["disabled".into()],
            disabled: true,
            ..Default::default()
        }))
        .await
        .unwrap_err(); // the tenant's only owner cannot be disabled
    c.console
        .create_user(op(pb::CreateUserRequest {
            tenant_id: user.tenant_id.clone(),
            email: "second@example.com".into(),
            password: PASSWORD.into(),
            role: "owner".into(),
        }))
        .await
        .unwrap();
    c.console
        .update_user(op(pb::UpdateUserRequest {
            tenant_id: user.tenant_id.clone(),
            user_id: user.user_id.clone(),
            update_mask: vec!["disabled".into()],
            disabled: true,
            ..Default::default()
        }))
        .await
        .unwrap();
    let refused = sign_in(&mut c, &token).await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
}

#[sqlx::test]
async fn failed_provider_sign_ins_back_off_per_client_address(
    _p: PgPoolOptions,
    conn: PgConnectOptions,
) {
    // Keys from a JWKS file this time.
    let google = Google::start().await;
    let dir = std::env::temp_dir().join(format!("tg-oidc-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("google.json");
    std::fs::write(&file, jwt_keys::jwks(&[&google.rsa])).unwrap();
    let settings = ProviderSettings {
        jwks_url: None,
        jwks_file: Some(file),
        ..google.settings()
    };
    let mut c = spawn_console_with_jwt(&conn, |jwt| {
        jwt.console.signup = Some(SignupPolicy::Open);
        jwt.console.oidc = BTreeMap::from([("google".to_string(), settings)]);
    })
    .await;
    let expired = google
        .rsa
        .sign(&json!({"iss": GOOGLE, "aud": CLIENT_ID, "sub": "1",
        "email": "x@example.com", "email_verified": true, "nonce": NONCE,
        "iat": jwt_keys::now() - 7200, "exp": jwt_keys::now() - 3600}));
    // Frozen: the back-off cannot run out between two calls.
    c.t.running.clock().freeze_at(chrono::Utc::now());
    let mut codes = Vec::new();
    for _ in 0..7 {
        codes.push(sign_in(&mut c, &expired).await.unwrap_err().code());
    }
    // Five free failures, a sixth that starts the back-off, then waiting.
    assert_eq!(codes[..6], [Code::Unauthenticated; 6], "{codes:?}");
    assert_eq!(codes[6], Code::ResourceExhausted, "{codes:?}");
    // While backing off, even a good token waits.
    let good = sign_in(&mut c, &google.id_token("880008", "x@example.com"))
        .await
        .unwrap_err();
    assert_eq!(good.code(), Code::ResourceExhausted);
    assert!(good.get_details_retry_info().is_some());
    std::fs::remove_dir_all(dir).unwrap();
}

/// An ID token lifted from a log or a browser history, replayed without
/// the nonce its sign-in began with: refused for anyone but the console
/// backend, which checks the nonce itself.
#[sqlx::test]
async fn a_replayed_id_token_without_its_nonce_signs_no_one_in(
    _p: PgPoolOptions,
    conn: PgConnectOptions,
) {
    let google = Google::start().await;
    let mut c = spawn(&conn, &google, SignupPolicy::Open).await;
    let token = google.id_token("550005", "victim@example.com");
    let before = rows(&c).await;
    let replayed = sign_in_with(&mut c, &token, "").await.unwrap_err();
    assert_eq!(replayed.code(), Code::InvalidArgument, "{replayed:?}");
    assert!(replayed.message().contains("nonce"), "{replayed:?}");
    assert_eq!(rows(&c).await, before, "nothing written");

    let mut request = tonic::Request::new(pb::SignInWithProviderRequest {
        provider: "google".into(),
        id_token: token,
        ..Default::default()
    });
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {CONSOLE_BACKEND_TOKEN}").parse().unwrap(),
    );
    c.console
        .sign_in_with_provider(request)
        .await
        .expect("the console backend checked the nonce itself");
}

#[sqlx::test]
async fn id_tokens_never_reach_the_logs(_p: PgPoolOptions, conn: PgConnectOptions) {
    crate::logs::capture();
    let google = Google::start().await;
    let mut c = spawn(&conn, &google, SignupPolicy::Open).await;
    let good = google.id_token("990009", "logged@example.com");
    sign_in(&mut c, &good).await.unwrap();
    let mut bad = claims("990009", "logged@example.com");
    bad["aud"] = json!("other");
    let bad = google.rsa.sign(&bad);
    sign_in(&mut c, &bad).await.unwrap_err();
    let text = crate::logs::text();
    assert!(
        text.contains("console sign-in with a provider refused"),
        "the capture works"
    );
    for token in [&good, &bad] {
        let signature = token.rsplit('.').next().unwrap();
        let payload = token.split('.').nth(1).unwrap();
        assert!(
            !text.contains(signature),
            "an ID token signature was logged"
        );
        assert!(!text.contains(payload), "ID token claims were logged");
    }
}

//! The console service on the in-memory store (dev mode's): the same rules
//! as on Postgres, and bad input refused before anything is written.

use std::sync::{Arc, Mutex};

use secrecy::SecretString;

use super::delivery::{Deliver, Message, MessageKind};
use super::*;
use crate::domain::console::UserChange;
use crate::store::MemoryStore;

const PASSWORD: &str = "correct horse battery staple";
const ADDRESS: &str = "192.0.2.1";

/// Keeps what would have been sent: (kind, email, token).
#[derive(Default)]
struct Outbox(Mutex<Vec<(MessageKind, String, Option<String>)>>);

impl Deliver for Outbox {
    fn send(&self, m: Message) {
        self.0.lock().unwrap().push((
            m.kind,
            m.email.as_str().to_string(),
            m.token.map(OpaqueToken::into_exposed),
        ));
    }
}

impl Outbox {
    fn kinds(&self) -> Vec<MessageKind> {
        self.0.lock().unwrap().iter().map(|m| m.0).collect()
    }
    fn last_token(&self) -> String {
        self.0.lock().unwrap().last().unwrap().2.clone().unwrap()
    }
}

fn console_with(settings: ConsoleSettings) -> (Console, Arc<MemoryStore>, Arc<Outbox>) {
    let store = Arc::new(MemoryStore::new());
    let outbox = Arc::new(Outbox::default());
    let c = Console::new(
        Arc::new(Profile::embedded_default()),
        store.clone(),
        Arc::new(ConsoleSigner::ephemeral("t")),
        settings,
        Clock::system(),
    )
    .with_delivery(outbox.clone());
    (c, store, outbox)
}

fn console() -> (Console, Arc<MemoryStore>, Arc<Outbox>) {
    console_with(ConsoleSettings {
        signup: Some(SignupPolicy::Open),
        ..ConsoleSettings::default()
    })
}

fn sign_up(email: &str) -> SignUpInput {
    SignUpInput {
        email: email.into(),
        password: SecretString::from(PASSWORD),
        tenant_name: "Acme".into(),
    }
}

fn fields(e: Error) -> Vec<String> {
    match e {
        Error::InvalidArgument(v) => v.0.into_iter().map(|f| f.field).collect(),
        other => panic!("{other:?}"),
    }
}

async fn user(store: &MemoryStore, email: &str) -> ConsoleUser {
    store
        .user_by_email(&Email::parse(email).unwrap())
        .await
        .unwrap()
        .unwrap()
}

#[tokio::test]
async fn sign_up_login_refresh_and_replay_on_the_memory_store() {
    let (c, store, outbox) = console();
    c.sign_up(sign_up("ada@example.com"), ADDRESS, "r1")
        .await
        .unwrap();
    let ada = user(&store, "ada@example.com").await;
    assert_ne!(ada.tenant_id.as_str(), "", "the server chose the tenant id");
    assert_eq!(outbox.kinds(), [MessageKind::EmailVerification]);
    let s = c
        .login("ada@example.com", PASSWORD.into(), "127.0.0.1")
        .await
        .unwrap();
    let next = c.refresh(&s.refresh_token).await.unwrap();
    assert!(matches!(
        c.refresh(&s.refresh_token).await,
        Err(Error::BadCredentials(_))
    ));
    assert!(matches!(
        c.refresh(&next.refresh_token).await,
        Err(Error::BadCredentials(_))
    ));
    let audit = store.list_audit(None, None, 10).await.unwrap();
    let actions: Vec<&str> = audit.iter().map(|e| e.action.as_str()).collect();
    assert_eq!(actions, ["user.created", "tenant.created"]);
    assert!(!format!("{s:?}").contains(&s.refresh_token));
}

#[tokio::test]
async fn oversized_and_malformed_input_is_refused_and_writes_nothing() {
    let (c, store, outbox) = console();
    let long_email = format!("{}@example.com", "a".repeat(300));
    let mut input = sign_up(&long_email);
    input.password = SecretString::from("x".repeat(2000));
    input.tenant_name = "n".repeat(500);
    let e = c.sign_up(input, ADDRESS, "r").await.unwrap_err();
    assert_eq!(fields(e), ["email", "password", "tenant_name"]);
    assert!(store.list_audit(None, None, 10).await.unwrap().is_empty());
    assert!(outbox.kinds().is_empty());
    let e = c
        .login("ada@example.com", SecretString::from("x".repeat(2000)), "a")
        .await
        .unwrap_err();
    assert_eq!(fields(e), ["password"]);
    let e = c.verify_email("tgev_garbage").await.unwrap_err();
    assert_eq!(fields(e), ["token"]);
    let e = c
        .reset_password(&"tgpr_".repeat(1000), SecretString::from("short"), "r")
        .await
        .unwrap_err();
    assert_eq!(fields(e), ["token", "new_password"]);
    c.logout("not a token").await.unwrap();
}

#[tokio::test]
async fn a_reset_token_is_delivered_single_use_and_a_newer_one_voids_it() {
    let (c, _, outbox) = console();
    c.sign_up(sign_up("ada@example.com"), ADDRESS, "r")
        .await
        .unwrap();
    c.request_password_reset("ada@example.com", ADDRESS)
        .await
        .unwrap();
    let older = outbox.last_token();
    c.request_password_reset("ada@example.com", ADDRESS)
        .await
        .unwrap();
    let token = outbox.last_token();
    assert!(token.starts_with("tgpr_"));
    let voided = c
        .reset_password(&older, "a brand new passphrase".into(), "r")
        .await
        .unwrap_err();
    assert_eq!(
        fields(voided),
        ["token"],
        "only the newest reset token works"
    );
    assert!(c.reset_password(&token, "weak".into(), "r").await.is_err());
    c.reset_password(&token, "a brand new passphrase".into(), "r")
        .await
        .unwrap();
    let again = c
        .reset_password(&token, "yet another passphrase".into(), "r")
        .await
        .unwrap_err();
    assert_eq!(fields(again), ["token"]);
    let sent = outbox.kinds().len();
    c.request_password_reset("nobody@example.com", ADDRESS)
        .await
        .unwrap();
    assert_eq!(outbox.kinds().len(), sent, "nothing sent for no account");
}

#[tokio::test]
async fn an_existing_address_gets_a_notice_and_the_caller_the_same_answer() {
    let (c, store, outbox) = console();
    c.sign_up(sign_up("ada@example.com"), ADDRESS, "r")
        .await
        .unwrap();
    let tenant = user(&store, "ada@example.com").await.tenant_id;
    c.sign_up(sign_up("ADA@example.com"), "192.0.2.2", "r")
        .await
        .unwrap();
    c.create_user(
        CreateUserInput {
            tenant_id: tenant.clone(),
            email: "ada@example.com".into(),
            password: PASSWORD.into(),
            role: "viewer".into(),
        },
        &AuditContext::system(),
    )
    .await
    .unwrap();
    assert_eq!(
        outbox.kinds(),
        [
            MessageKind::EmailVerification,
            MessageKind::AccountExists,
            MessageKind::AccountExists
        ]
    );
    assert_eq!(c.list_users(&tenant).await.unwrap().len(), 1);
}

#[tokio::test]
async fn sign_up_follows_the_policy_and_invite_is_the_default() {
    let (c, _, _) = console_with(ConsoleSettings::default());
    let e = c
        .sign_up(sign_up("ada@example.com"), ADDRESS, "r")
        .await
        .unwrap_err();
    assert!(matches!(e, Error::PermissionDenied(_)), "{e:?}");
    let (c, store, _) = console_with(ConsoleSettings {
        signup: Some(SignupPolicy::Off),
        ..ConsoleSettings::default()
    });
    let tenant = TenantId::parse("ops-made").unwrap();
    let e = c
        .create_user(
            CreateUserInput {
                tenant_id: tenant,
                email: "bob@example.com".into(),
                password: PASSWORD.into(),
                role: "owner".into(),
            },
            &AuditContext::system(),
        )
        .await
        .unwrap_err();
    assert!(matches!(e, Error::PermissionDenied(_)), "{e:?}");
    assert!(store.list_audit(None, None, 10).await.unwrap().is_empty());
}

#[tokio::test]
async fn sign_ups_back_off_per_address() {
    let (c, _, _) = console();
    let mut refused = None;
    for i in 0..10 {
        if let Err(e) = c
            .sign_up(sign_up(&format!("u{i}@example.com")), ADDRESS, "r")
            .await
        {
            refused = Some((i, e));
            break;
        }
    }
    let (i, e) = refused.expect("the address backs off");
    assert!(i <= 6, "{i}");
    assert!(matches!(e, Error::TooManyAttempts { .. }), "{e:?}");
    c.sign_up(sign_up("other@example.com"), "192.0.2.99", "r")
        .await
        .unwrap();
}

#[tokio::test]
async fn a_full_password_queue_answers_resource_exhausted_with_retry_info() {
    let (c, _, _) = console();
    let c = c.with_password_queue(WorkQueue::new(1, 0, std::time::Duration::from_secs(7)));
    let held = c.password_queue().enter().await.unwrap();
    let e = c
        .login("ada@example.com", PASSWORD.into(), ADDRESS)
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::Overloaded {
                retry_after_seconds: 7
            }
        ),
        "{e:?}"
    );
    let status = tonic::Status::from(e);
    assert_eq!(status.code(), tonic::Code::ResourceExhausted);
    use tonic_types::StatusExt;
    let retry = status.get_details_retry_info().unwrap().retry_delay;
    assert_eq!(retry, Some(std::time::Duration::from_secs(7)));
    let e = c
        .sign_up(sign_up("ada@example.com"), ADDRESS, "r")
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Overloaded { .. }), "{e:?}");
    drop(held);
    c.sign_up(sign_up("ada@example.com"), ADDRESS, "r")
        .await
        .unwrap();
}

#[tokio::test]
async fn reset_password_checks_the_token_before_any_hashing() {
    let (c, _, _) = console();
    let c = c.with_password_queue(WorkQueue::new(1, 0, std::time::Duration::from_secs(1)));
    // Every hashing slot is taken: a call that tried to hash would be told
    // the server is busy. An unknown token is refused without trying.
    let _held = c.password_queue().enter().await.unwrap();
    let unknown = OpaqueToken::generate(TokenKind::PasswordReset).into_exposed();
    let e = c
        .reset_password(&unknown, "a brand new passphrase".into(), "r")
        .await
        .unwrap_err();
    assert_eq!(fields(e), ["token"]);
}

#[tokio::test]
async fn parallel_wrong_guesses_verify_at_most_the_free_attempts() {
    let (c, _, _) = console();
    c.sign_up(sign_up("ada@example.com"), ADDRESS, "r")
        .await
        .unwrap();
    let c = Arc::new(c);
    let guesses = (0..64).map(|i| {
        let c = c.clone();
        async move {
            c.login(
                "ada@example.com",
                format!("wrong guess number {i}").into(),
                &format!("198.51.100.{i}"),
            )
            .await
        }
    });
    let results = futures::future::join_all(guesses).await;
    let verified = results
        .iter()
        .filter(|r| matches!(r, Err(Error::BadCredentials(_))))
        .count();
    let throttled = results
        .iter()
        .filter(|r| matches!(r, Err(Error::TooManyAttempts { .. })))
        .count();
    assert_eq!(verified + throttled, 64);
    assert!(verified <= 6, "{verified} guesses were verified");
}

#[tokio::test]
async fn the_last_enabled_owner_cannot_be_demoted_disabled_or_deleted() {
    let (c, store, _) = console();
    c.sign_up(sign_up("ada@example.com"), ADDRESS, "r")
        .await
        .unwrap();
    let ada = user(&store, "ada@example.com").await;
    let t = ada.tenant_id.clone();
    let ctx = AuditContext::system();
    let id = ada.id.to_string();
    for change in [
        UserChange {
            role: Some(Role::Admin),
            disabled: None,
        },
        UserChange {
            role: None,
            disabled: Some(true),
        },
    ] {
        let e = c
            .update_user(Actor::Operator, &t, &id, change, &ctx)
            .await
            .unwrap_err();
        assert!(matches!(e, Error::FailedPrecondition(_)), "{e:?}");
    }
    let e = c
        .delete_user(Actor::Operator, &t, &id, &ctx)
        .await
        .unwrap_err();
    assert!(matches!(e, Error::FailedPrecondition(_)), "{e:?}");
    // An admin may not touch an owner.
    let e = c
        .delete_user(Actor::User(Role::Admin), &t, &id, &ctx)
        .await
        .unwrap_err();
    assert!(matches!(e, Error::PermissionDenied(_)), "{e:?}");
    assert_eq!(user(&store, "ada@example.com").await, ada);
}

mod sign_in_with_a_provider {
    //! SignInWithProvider on the memory store: the same rules as Postgres
    //! (tests/console/oidc.rs covers the real thing end to end).

    use super::*;
    use crate::console::providers::{Provider, Providers};
    use crate::crypto::jwt::oidc::{IdTokenError, IdTokenRules, IdTokenVerifier};
    use crate::crypto::jwt::Issuer;

    const IDP: &str = "https://idp.test";

    fn with_idp(signup: SignupPolicy) -> (Console, Arc<MemoryStore>, ConsoleSigner) {
        let idp = ConsoleSigner::ephemeral("idp-1");
        let keys = Arc::new(Issuer::new(
            IssuerRules::new(IDP, vec!["client".into()]),
            idp.key_set(),
        ));
        let rules = IdTokenRules {
            issuers: vec![IDP.into()],
            client_ids: vec!["client".into()],
            leeway_seconds: 60,
        };
        let provider = Provider {
            name: "idp".into(),
            verifier: IdTokenVerifier::new(rules, keys),
        };
        let (c, store, _) = console_with(ConsoleSettings {
            signup: Some(signup),
            ..ConsoleSettings::default()
        });
        let c = c.with_providers(Arc::new(Providers::new([provider])));
        (c, store, idp)
    }

    fn token(idp: &ConsoleSigner, sub: &str, email: &str, verified: bool) -> String {
        let now = chrono::Utc::now().timestamp();
        idp.sign(&serde_json::json!({"iss": IDP, "aud": "client", "sub": sub,
            "email": email, "email_verified": verified, "iat": now, "exp": now + 600}))
            .unwrap()
    }

    /// Signs in as the console backend would (it checked the nonce).
    async fn sign_in(c: &Console, id_token: String) -> Result<Session> {
        c.sign_in_with_provider(sign_in::ProviderSignIn {
            provider: "idp",
            id_token: SecretString::from(id_token),
            nonce: "",
            nonce_checked_by_caller: true,
            address: ADDRESS,
            request_id: "r",
        })
        .await
    }

    #[tokio::test]
    async fn a_replayed_id_token_without_a_nonce_is_refused_unless_the_backend_checked_it() {
        let (c, _store, idp) = with_idp(SignupPolicy::Open);
        let replayed = c
            .sign_in_with_provider(sign_in::ProviderSignIn {
                provider: "idp",
                id_token: SecretString::from(token(&idp, "s-9", "victim@example.com", true)),
                nonce: "",
                nonce_checked_by_caller: false,
                address: ADDRESS,
                request_id: "r",
            })
            .await
            .unwrap_err();
        assert_eq!(fields(replayed), ["nonce"]);
    }

    #[tokio::test]
    async fn a_new_person_gets_a_provider_only_owner_and_comes_back_to_it() {
        let (c, store, idp) = with_idp(SignupPolicy::Open);
        let first = sign_in(&c, token(&idp, "s-1", "New@Example.com", true))
            .await
            .unwrap();
        assert_eq!(first.user.role, Role::Owner);
        assert!(first.user.email_verified_at.is_some());
        assert!(!first.user.password_hash.is_set());
        let again = sign_in(&c, token(&idp, "s-1", "moved@example.com", true))
            .await
            .unwrap();
        assert_eq!(again.user.id, first.user.id, "by (issuer, subject)");
        let refused = c
            .login("new@example.com", SecretString::from(PASSWORD), ADDRESS)
            .await
            .unwrap_err();
        assert!(
            matches!(refused, Error::BadCredentials(BAD_LOGIN)),
            "{refused:?}"
        );
        assert_eq!(
            store.list_users(&first.user.tenant_id).await.unwrap().len(),
            1
        );
    }

    #[tokio::test]
    async fn an_unverified_account_is_claimed_by_the_address_owner() {
        let (c, store, idp) = with_idp(SignupPolicy::Open);
        c.sign_up(sign_up("eve@example.com"), ADDRESS, "r")
            .await
            .unwrap();
        let squatter = user(&store, "eve@example.com").await;
        assert!(squatter.password_hash.is_set());
        let eve = sign_in(&c, token(&idp, "s-2", "eve@example.com", true))
            .await
            .unwrap();
        assert_eq!(eve.user.id, squatter.id);
        assert!(
            !eve.user.password_hash.is_set(),
            "the squatter's password is gone"
        );
        assert!(eve.user.email_verified_at.is_some());
        let unverified = sign_in(&c, token(&idp, "s-3", "x@example.com", false))
            .await
            .unwrap_err();
        assert!(matches!(
            unverified,
            Error::IdTokenRefused(IdTokenError::EmailNotVerified)
        ));
    }

    #[tokio::test]
    async fn with_sign_up_closed_a_stranger_is_refused_and_nothing_is_written() {
        let (c, store, idp) = with_idp(SignupPolicy::Invite);
        let refused = sign_in(&c, token(&idp, "s-4", "stranger@example.com", true))
            .await
            .unwrap_err();
        assert!(matches!(refused, Error::PermissionDenied(_)), "{refused:?}");
        assert!(store
            .user_by_email(&Email::parse("stranger@example.com").unwrap())
            .await
            .unwrap()
            .is_none());
    }
}

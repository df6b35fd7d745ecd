//! The console service on the in-memory store (dev mode's): the same rules
//! as on Postgres, and bad input refused before anything is written.

use std::sync::Arc;

use secrecy::SecretString;

use super::*;
use crate::store::MemoryStore;

const PASSWORD: &str = "correct horse battery staple";

fn console() -> (Console, Arc<MemoryStore>) {
    let store = Arc::new(MemoryStore::new());
    let c = Console::new(
        Arc::new(Profile::embedded_default()),
        store.clone(),
        Arc::new(ConsoleSigner::ephemeral("t")),
        ConsoleSettings::default(),
        Clock::system(),
    );
    (c, store)
}

fn sign_up(email: &str, tenant: &str) -> SignUpInput {
    SignUpInput {
        email: email.into(),
        password: SecretString::from(PASSWORD),
        tenant_name: "Acme".into(),
        tenant_id: tenant.into(),
    }
}

fn fields(e: Error) -> Vec<String> {
    match e {
        Error::InvalidArgument(v) => v.0.into_iter().map(|f| f.field).collect(),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn sign_up_login_refresh_and_replay_on_the_memory_store() {
    let (c, store) = console();
    let created = c
        .sign_up(sign_up("ada@example.com", "acme"), "r1")
        .await
        .unwrap();
    assert_eq!(created.tenant.unwrap().plan, "free");
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
    let (c, store) = console();
    let long_email = format!("{}@example.com", "a".repeat(300));
    let mut input = sign_up(&long_email, "bad id");
    input.password = SecretString::from("x".repeat(2000));
    input.tenant_name = "n".repeat(500);
    let e = c.sign_up(input, "r").await.unwrap_err();
    assert_eq!(fields(e), ["email", "password", "tenant_name", "tenant_id"]);
    assert!(store.list_audit(None, None, 10).await.unwrap().is_empty());
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
async fn a_reset_token_is_single_use_and_weak_passwords_do_not_spend_it() {
    let (c, _) = console();
    c.sign_up(sign_up("ada@example.com", "acme"), "r")
        .await
        .unwrap();
    let token = c
        .request_password_reset("ada@example.com")
        .await
        .unwrap()
        .unwrap()
        .into_exposed();
    assert!(c.reset_password(&token, "weak".into(), "r").await.is_err());
    c.reset_password(&token, "a brand new passphrase".into(), "r")
        .await
        .unwrap();
    let again = c
        .reset_password(&token, "yet another passphrase".into(), "r")
        .await
        .unwrap_err();
    assert_eq!(fields(again), ["token"]);
    assert!(c
        .request_password_reset("nobody@example.com")
        .await
        .unwrap()
        .is_none());
}

//! Secrets never reach a log line or a `Debug` string: not a full API key
//! (created, rotated, or a wrong guess), not its digest, not the pepper, not
//! the operator token.
//!
//! Every event of every crate is captured at `trace` (ANSI off) by one
//! global subscriber for this test binary, so a leak from tonic, h2, sqlx or
//! our own code fails the test.

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};

use common::*;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tollgate::config::{PreviousPepper, Settings};
use tollgate::crypto::Pepper;
use tollgate::grpc::pb;

/// Everything logged by this test binary so far.
fn captured_logs() -> String {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    let logs = LOGS.get_or_init(|| {
        let buffer = Arc::new(Mutex::new(Vec::new()));
        let sink = buffer.clone();
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("trace"))
            .with_ansi(false)
            .with_writer(move || Capture(sink.clone()))
            .init();
        buffer
    });
    String::from_utf8_lossy(&logs.lock().unwrap()).into_owned()
}

struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Every form a key could take in a log: itself and its digest under the
/// test pepper (lower and upper hex, and Postgres' bytea literal).
fn forms_of_key(key: &str) -> Vec<String> {
    let mut mac = Hmac::<Sha256>::new_from_slice(PEPPER).unwrap();
    mac.update(key.as_bytes());
    let digest = hex::encode(mac.finalize().into_bytes());
    vec![
        key.to_string(),
        digest.to_uppercase(),
        format!("\\x{digest}"),
        digest,
    ]
}

/// Fails naming each secret found in `text` and the line it is on.
fn assert_no_secret_in(text: &str, secrets: &[String]) {
    let leaks: Vec<String> = secrets
        .iter()
        .flat_map(|s| {
            text.lines()
                .filter(move |line| line.contains(s.as_str()))
                .map(move |line| format!("secret {s:?} in: {line}"))
        })
        .collect();
    assert!(leaks.is_empty(), "{}", leaks.join("\n"));
}

fn with_header(name: &str, value: &str) -> pb::AuthenticateRequest {
    pb::AuthenticateRequest {
        headers: [(name.to_string(), value.to_string())].into(),
        ..Default::default()
    }
}

#[sqlx::test]
async fn a_whole_key_lifecycle_logs_no_key_digest_pepper_or_token(
    _pool: PgPoolOptions,
    conn: PgConnectOptions,
) {
    captured_logs(); // Installs the subscriber before anything logs.
    const GATEWAY: &str = "logged-never-gateway-token-0123";
    const BACKEND: &str = "logged-never-backend-token-0123";
    let mut opts = Options::new(profile("default"));
    opts.guard.gateway_token = Some(GATEWAY.to_string().into());
    opts.guard.console_backend_token = Some(BACKEND.to_string().into());
    let mut t = spawn_with(&conn, opts).await;
    t.create_tenant("acme", "pro").await;
    let (key, record) = t.create_key("acme").await;

    // The gateway and console backend tokens, right and slightly wrong.
    for token in [GATEWAY, BACKEND, &GATEWAY[1..], &BACKEND[1..]] {
        let mut request = tonic::Request::new(pb::GetUsageRequest {
            tenant_id: "acme".into(),
            ..Default::default()
        });
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
        let answer = t.auth.get_usage(request).await;
        assert_eq!(answer.is_ok(), token == GATEWAY, "{token}: {answer:?}");
    }

    assert!(t.authenticate(&key).await.allowed);
    for (header, value) in [
        ("X-Api-Key", key.clone()),
        ("authorization", format!("Bearer {key}")),
    ] {
        let r = t
            .authenticate_with(with_header(header, &value))
            .await
            .unwrap();
        assert!(r.allowed, "{header}: {r:?}");
    }

    // Wrong keys are credentials too: a well-formed unknown one, and the
    // real one with its last character changed (fails the checksum).
    let unknown = t.profile.key_format.generate("live").expose().to_string();
    assert_eq!(reason(&t.authenticate(&unknown).await), "KEY_UNKNOWN");
    let last = key.chars().last().unwrap();
    let typo = format!(
        "{}{}",
        &key[..key.len() - 1],
        if last == '0' { '1' } else { '0' }
    );
    assert_eq!(reason(&t.authenticate(&typo).await), "CREDENTIAL_MALFORMED");

    let rotated = t
        .auth
        .rotate_key(op(pb::RotateKeyRequest {
            key_id: record.key_id.clone(),
            grace_seconds: 0,
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    let new_key = rotated.api_key;
    assert!(t.authenticate(&new_key).await.allowed);
    assert!(!t.authenticate(&key).await.allowed);

    let new_id = rotated.key.unwrap().key_id;
    t.revoke(&new_id).await;
    assert_eq!(reason(&t.authenticate(&new_key).await), "KEY_REVOKED");
    // Shutting down logs too (usage flush, leaving the replica set).
    drop((t.auth, t.tenants, t.health, t.channel));
    t.running.shutdown().await.unwrap();

    let logs = captured_logs();
    assert!(
        logs.contains("key created"),
        "capture is not working:\n{logs}"
    );
    assert!(
        logs.contains("key revoked"),
        "capture is not working:\n{logs}"
    );
    let mut secrets: Vec<String> = [&key, &new_key, &unknown, &typo]
        .into_iter()
        .flat_map(|k| forms_of_key(k))
        .collect();
    secrets.push(String::from_utf8(PEPPER.to_vec()).unwrap());
    secrets.push(OPERATOR_TOKEN.to_string());
    secrets.push("gateway-token-0123".to_string());
    secrets.push("backend-token-0123".to_string());
    assert_no_secret_in(&logs, &secrets);
}

#[test]
fn debug_output_of_secret_holding_types_is_redacted() {
    let profile = profile("default");
    let key = profile.key_format.generate("live");
    let shown = format!("{key:?}");
    assert!(!shown.contains(key.expose()), "{shown}");
    assert!(shown.contains(&key.hint()), "{shown}");

    let pepper_text = "debug-pepper-secret-0123456789-abcdef";
    let pepper = Pepper::new(7, pepper_text.as_bytes().to_vec()).unwrap();
    let digest = pepper.digest(key.expose());
    let digest_hex = hex::encode(digest.as_bytes());
    let shown = format!("{pepper:?} {digest:?} {:?}", peppers());
    assert!(shown.contains("v7"), "{shown}");
    assert_no_secret_in(
        &shown,
        &[
            pepper_text.into(),
            String::from_utf8(PEPPER.to_vec()).unwrap(),
            digest_hex.clone(),
            digest_hex.to_uppercase(),
            format!("{:?}", digest.as_bytes()),
        ],
    );

    let mut settings = Settings {
        operator_token: Some(OPERATOR_TOKEN.to_string().into()),
        gateway_token: Some("gateway-secret-token-0123".to_string().into()),
        console_backend_token: Some("backend-secret-token-0123".to_string().into()),
        database_url: Some(
            "postgres://tollgate:db-password-42@db/tollgate"
                .to_string()
                .into(),
        ),
        pepper: Some(pepper_text.to_string().into()),
        previous_peppers: vec![PreviousPepper {
            version: 1,
            secret: "old-pepper-secret-0123456789-abcdef".to_string().into(),
        }],
        ..Settings::default()
    };
    // The console's webhook: its secret, and a URL that may carry a
    // credential of its own (only the host is shown).
    let delivery = &mut settings.jwt.console.delivery;
    delivery.webhook_url = Some("https://mail.example/hook?access_key=url-secret-77".into());
    delivery.webhook_secret = Some("webhook-secret-0123456789-abcdef-xyz".to_string().into());
    let shown = format!("{settings:?} {settings:#?}");
    assert!(shown.contains("pepper_version"), "{shown}");
    assert!(shown.contains("mail.example"), "{shown}");
    assert_no_secret_in(
        &shown,
        &[
            OPERATOR_TOKEN.into(),
            "db-password-42".into(),
            pepper_text.into(),
            "old-pepper-secret".into(),
            "webhook-secret-0123456789".into(),
            "url-secret-77".into(),
            "gateway-secret-token".into(),
            "backend-secret-token".into(),
        ],
    );
    let guard = tollgate::app::GuardParts {
        gateway_token: settings.gateway_token.clone(),
        console_backend_token: settings.console_backend_token.clone(),
        management: settings.management,
    };
    assert_no_secret_in(
        &format!("{guard:?} {guard:#?}"),
        &["gateway-secret-token".into(), "backend-secret-token".into()],
    );
}

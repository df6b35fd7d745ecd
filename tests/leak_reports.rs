//! Leak reports: GitHub's secret-scanning partner protocol on the
//! `[leak_reports]` listener (payloads signed here with P-256 keys made
//! for the test, the public keys served from a file in GitHub's format),
//! and `RevocationService/ReportLeakedKeys`, against real Postgres.

mod common;
#[path = "console/mailbox.rs"]
mod mailbox;
#[path = "support/spy_store.rs"]
mod spy_store;

use std::net::SocketAddr;
use std::sync::Arc;

use base64::Engine;
use common::*;
use mailbox::{Mailbox, WEBHOOK_SECRET};
use p256::ecdsa::signature::Signer;
use p256::ecdsa::{DerSignature, SigningKey};
use p256::pkcs8::{EncodePublicKey, LineEnding};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use spy_store::SpyStore;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tollgate::domain::revocation::RevocationPolicy;
use tollgate::grpc::pb;
use tollgate::grpc::pb::revocation_service_client::RevocationServiceClient;
use tollgate::leak_reports::LeakReportSettings;
use tollgate::manage::revocation_events::{EventWebhook, RevocationEvents};
use tollgate::store::{PostgresStore, Store};

const KEY_ID: &str = "90a421169f0a406205f1563a953312f0be898d3c7b6c06b681aa86a874555f4a";

fn signing_key() -> SigningKey {
    loop {
        let bytes: [u8; 32] = rand::random();
        if let Ok(k) = SigningKey::from_slice(&bytes) {
            return k;
        }
    }
}

/// GitHub's scanner: its key, and the public keys document it publishes.
struct Scanner {
    key: SigningKey,
    keys_file: std::path::PathBuf,
}

impl Scanner {
    fn new() -> Self {
        let key = signing_key();
        let pem = key
            .verifying_key()
            .to_public_key_pem(LineEnding::LF)
            .unwrap();
        let doc = json!({"public_keys": [
            {"key_identifier": KEY_ID, "key": pem, "is_current": true}]});
        let keys_file =
            std::env::temp_dir().join(format!("tollgate-gh-keys-{}.json", uuid::Uuid::new_v4()));
        std::fs::write(&keys_file, serde_json::to_vec(&doc).unwrap()).unwrap();
        Self { key, keys_file }
    }

    fn sign(&self, body: &[u8]) -> String {
        let sig: DerSignature = self.key.sign(body);
        base64::engine::general_purpose::STANDARD.encode(sig.as_bytes())
    }

    fn settings(&self) -> LeakReportSettings {
        LeakReportSettings {
            listen: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
            public_keys_file: Some(self.keys_file.clone()),
            ..Default::default()
        }
    }
}

impl Drop for Scanner {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.keys_file);
    }
}

/// A replica of the default profile with the endpoint on; `revoke_leaked`
/// is the profile's policy. The store is watched by a spy.
async fn replica(
    conn: &PgConnectOptions,
    scanner: &Scanner,
    revoke_leaked: bool,
) -> (Tollgate, Arc<SpyStore>) {
    replica_with_events(conn, scanner, revoke_leaked, None).await
}

/// [`replica`], its revocation events sent to `events`.
async fn replica_with_events(
    conn: &PgConnectOptions,
    scanner: &Scanner,
    revoke_leaked: bool,
    events: Option<Arc<dyn RevocationEvents>>,
) -> (Tollgate, Arc<SpyStore>) {
    let mut p = profile("default");
    p.revocation = RevocationPolicy {
        revoke_leaked,
        ..Default::default()
    };
    let mut opts = Options::new(p);
    opts.leak_reports = scanner.settings();
    opts.revocation_events = events;
    let spy = Arc::new(SpyStore::new(Arc::new(PostgresStore::new(
        pool(conn).await,
    ))));
    let store: Arc<dyn Store> = spy.clone();
    (spawn_on_store(store, opts).await, spy)
}

/// Revocation events signed with [`WEBHOOK_SECRET`], sent to `mailbox`.
fn webhook_to(mailbox: &Mailbox) -> Arc<dyn RevocationEvents> {
    Arc::new(
        EventWebhook::new(
            mailbox.url().parse().unwrap(),
            WEBHOOK_SECRET.to_string().into(),
            std::time::Duration::from_secs(5),
        )
        .unwrap(),
    )
}

/// Request headers: (name, value).
type Headers = Vec<(&'static str, String)>;

/// POSTs `body` with the given headers; (status, JSON answer).
async fn post(t: &Tollgate, headers: &[(&str, String)], body: &[u8]) -> (u16, Value) {
    let addr = t.running.leak_reports_addr().expect("endpoint on");
    let mut req = reqwest::Client::new()
        .post(format!("http://{addr}/"))
        .header("content-type", "application/json")
        .body(body.to_vec());
    for (name, value) in headers {
        req = req.header(*name, value);
    }
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// Sends only the head of a signed POST declaring `length` body bytes
/// (over raw TCP: no client sends a body it does not have), and reads the
/// answer the server gives before any of it arrives.
async fn post_head(t: &Tollgate, signature: &str, length: usize) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = t.running.leak_reports_addr().expect("endpoint on");
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST / HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\n\
         content-length: {length}\r\nconnection: close\r\n\
         github-public-key-identifier: {KEY_ID}\r\n\
         github-public-key-signature: {signature}\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await.unwrap();
    let answer = String::from_utf8_lossy(&answer).to_string();
    let status = answer
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, answer)
}

/// POSTs `body` signed by `scanner` under [`KEY_ID`].
async fn post_signed(t: &Tollgate, scanner: &Scanner, body: &[u8]) -> (u16, Value) {
    let headers = [
        ("Github-Public-Key-Identifier", KEY_ID.to_string()),
        ("Github-Public-Key-Signature", scanner.sign(body)),
    ];
    post(t, &headers, body).await
}

fn sha256_hex(s: &str) -> String {
    hex::encode(Sha256::digest(s.as_bytes()))
}

fn report(tokens: &[&str]) -> Vec<u8> {
    let items: Vec<Value> = tokens
        .iter()
        .map(|t| {
            json!({"token": t, "type": "tollgate_api_key",
                "url": "https://github.com/octocat/Hello-World/blob/main/config.env",
                "source": "content"})
        })
        .collect();
    serde_json::to_vec(&items).unwrap()
}

/// Rows of `leaked_keys` and `key.leak_reported` audit events.
async fn leak_rows(pool: &sqlx::PgPool) -> (i64, i64) {
    let leaked: i64 = sqlx::query_scalar("SELECT count(*) FROM leaked_keys")
        .fetch_one(pool)
        .await
        .unwrap();
    let audited: i64 =
        sqlx::query_scalar("SELECT count(*) FROM audit_events WHERE action = 'key.leak_reported'")
            .fetch_one(pool)
            .await
            .unwrap();
    (leaked, audited)
}

#[sqlx::test]
async fn a_signed_github_report_labels_our_key_true_positive_and_the_policy_revokes_it(
    _p: PgPoolOptions,
    conn: PgConnectOptions,
) {
    let pool = pool(&conn).await;
    let scanner = Scanner::new();
    let mailbox = Mailbox::start().await;
    let (mut t, _) = replica_with_events(&conn, &scanner, true, Some(webhook_to(&mailbox))).await;
    t.create_tenant("acme", "pro").await;
    let (secret, key) = t.create_key("acme").await;
    let (other_secret, _) = t.create_key("acme").await;
    assert!(
        t.authenticate(&secret).await.allowed,
        "cached before the report"
    );
    let stranger = t.profile.key_format.generate("live");
    let tokens = [secret.as_str(), stranger.expose(), "ghp_not_ours_at_all"];

    let (status, answer) = post_signed(&t, &scanner, &report(&tokens)).await;
    assert_eq!(status, 200, "{answer}");
    let expected: Vec<Value> = tokens
        .iter()
        .zip(["true_positive", "false_positive", "false_positive"])
        .map(|(tok, label)| {
            json!({"token_hash": sha256_hex(tok), "token_type": "tollgate_api_key", "label": label})
        })
        .collect();
    assert_eq!(
        answer,
        Value::Array(expected),
        "the documented answer, nothing more"
    );
    assert!(
        !answer.to_string().contains(&secret),
        "no token in the answer"
    );

    assert_eq!(
        reason(&t.authenticate(&secret).await),
        "KEY_REVOKED",
        "revoked at once"
    );
    assert!(
        t.authenticate(&other_secret).await.allowed,
        "other keys untouched"
    );
    let policy: (String, Option<String>) = sqlx::query_as(
        "SELECT target, details->>'policy' FROM audit_events WHERE action = 'key.revoked'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(policy, (key.key_id.clone(), Some("reported_leaked".into())));
    let reported: (String, String) = sqlx::query_as(
        "SELECT actor, details->>'reporter' FROM audit_events WHERE action = 'key.leak_reported'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(reported, ("github-secret-scanning".into(), "github".into()));
    let stored: Vec<String> = sqlx::query_scalar("SELECT details::text FROM audit_events")
        .fetch_all(&pool)
        .await
        .unwrap();
    let stored = stored.join(" ");
    assert!(!stored.contains(&secret), "no token in the audit log");

    // Two signed events: the report, and the revocation with its policy.
    let mut events = vec![mailbox.next().await, mailbox.next().await];
    events.sort_by(|a, b| a.kind().cmp(b.kind()));
    for e in &events {
        assert!(
            tollgate::console::delivery::verify_signature(
                WEBHOOK_SECRET.as_bytes(),
                &e.signature,
                &e.body
            ),
            "signed: {:?}",
            e.json
        );
        assert_eq!(e.json["id"].as_str(), Some(e.delivery_id.as_str()));
        assert_eq!(e.tenant_id(), "acme");
        assert_eq!(e.json["key_id"], key.key_id.as_str());
        assert!(!String::from_utf8_lossy(&e.body).contains(&secret));
    }
    assert_eq!(events[0].kind(), "key.leak_reported");
    assert_eq!(events[0].json["revoked"], true);
    assert_eq!(events[1].kind(), "key.revoked");
    assert_eq!(events[1].json["policy"], "reported_leaked");
    assert!(mailbox.is_empty().await, "one event each");
}

#[sqlx::test]
async fn under_a_flagging_policy_a_reported_key_keeps_working_until_the_tenant_revokes_leaked_keys(
    _p: PgPoolOptions,
    conn: PgConnectOptions,
) {
    let pool = pool(&conn).await;
    let scanner = Scanner::new();
    let mailbox = Mailbox::start().await;
    let (mut t, _) = replica_with_events(&conn, &scanner, false, Some(webhook_to(&mailbox))).await;
    t.create_tenant("acme", "pro").await;
    let (secret, key) = t.create_key("acme").await;
    let (status, answer) = post_signed(&t, &scanner, &report(&[&secret])).await;
    assert_eq!(status, 200);
    assert_eq!(answer[0]["label"], "true_positive");
    assert!(
        t.authenticate(&secret).await.allowed,
        "flagged, not revoked"
    );
    assert_eq!(leak_rows(&pool).await, (1, 1));
    let reported = mailbox.next().await;
    assert_eq!(
        (reported.kind(), &reported.json["revoked"]),
        ("key.leak_reported", &json!(false))
    );

    // The tenant turns on revoke_leaked: the dry run lists the flagged key
    // under `reported_leaked`, and the sweep revokes it.
    let mut c = RevocationServiceClient::new(t.channel.clone());
    c.set_revocation_policy(op(pb::SetRevocationPolicyRequest {
        tenant_id: "acme".into(),
        policy: Some(pb::RevocationPolicy {
            revoke_leaked: Some(true),
            ..Default::default()
        }),
    }))
    .await
    .unwrap();
    let listed = c
        .list_policy_revocations(op(pb::ListPolicyRevocationsRequest {
            tenant_id: "acme".into(),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.keys.len(), 1);
    assert_eq!(listed.keys[0].key.as_ref().unwrap().key_id, key.key_id);
    assert_eq!(listed.keys[0].policy, "reported_leaked");
    let swept = t.running.manager().sweep_revocations(100).await;
    assert_eq!(swept.revoked.len(), 1);
    assert_eq!(reason(&t.authenticate(&secret).await), "KEY_REVOKED");
    // The sweep's revocation is sent as an event too, with its policy.
    let revoked = mailbox.next().await;
    assert_eq!(revoked.kind(), "key.revoked");
    assert_eq!(revoked.json["key_id"], key.key_id.as_str());
    assert_eq!(revoked.json["policy"], "reported_leaked");
}

#[sqlx::test]
async fn a_bad_signature_or_an_unknown_key_id_is_refused_and_changes_nothing(
    _p: PgPoolOptions,
    conn: PgConnectOptions,
) {
    let pool = pool(&conn).await;
    let scanner = Scanner::new();
    let (mut t, spy) = replica(&conn, &scanner, true).await;
    t.create_tenant("acme", "pro").await;
    let (secret, _) = t.create_key("acme").await;
    let body = report(&[&secret]);
    let reads = spy.key_reads();
    let impostor = signing_key();
    let forged: DerSignature = impostor.sign(&body[..]);
    let forged = base64::engine::general_purpose::STANDARD.encode(forged.as_bytes());
    let tampered = report(&[&secret, "extra"]);
    let cases: Vec<(&str, Headers, &[u8], u16)> = vec![
        ("no headers", vec![], &body, 401),
        (
            "unknown key id",
            vec![
                ("Github-Public-Key-Identifier", "someone-else".into()),
                ("Github-Public-Key-Signature", scanner.sign(&body)),
            ],
            &body,
            401,
        ),
        (
            "signed by another key",
            vec![
                ("Github-Public-Key-Identifier", KEY_ID.into()),
                ("Github-Public-Key-Signature", forged),
            ],
            &body,
            403,
        ),
        (
            "body changed after signing",
            vec![
                ("Github-Public-Key-Identifier", KEY_ID.into()),
                ("Github-Public-Key-Signature", scanner.sign(&body)),
            ],
            &tampered,
            403,
        ),
        (
            "signature not base64",
            vec![
                ("Github-Public-Key-Identifier", KEY_ID.into()),
                ("Github-Public-Key-Signature", "%%%".into()),
            ],
            &body,
            403,
        ),
    ];
    for (what, headers, body, want) in cases {
        let (status, answer) = post(&t, &headers, body).await;
        assert_eq!(status, want, "{what}: {answer}");
        assert!(!answer.to_string().contains(&secret), "{what}");
    }

    assert_eq!(spy.key_reads(), reads, "no lookup for a refused report");
    assert_eq!(leak_rows(&pool).await, (0, 0), "nothing recorded");
    assert!(t.authenticate(&secret).await.allowed, "the key still works");
}

#[sqlx::test]
async fn a_malformed_signed_body_is_400_an_oversized_one_413_and_neither_changes_anything(
    _p: PgPoolOptions,
    conn: PgConnectOptions,
) {
    let pool = pool(&conn).await;
    let scanner = Scanner::new();
    let (mut t, _) = replica(&conn, &scanner, true).await;
    t.create_tenant("acme", "pro").await;
    let (secret, _) = t.create_key("acme").await;
    let bodies: Vec<Vec<u8>> = vec![
        b"not json".to_vec(),
        serde_json::to_vec(&json!({"token": secret})).unwrap(),
        serde_json::to_vec(&json!([{"type": "x"}, {"token": secret}])).unwrap(),
        serde_json::to_vec(&json!([{"token": 5}])).unwrap(),
        b"[]".to_vec(),
    ];
    for body in bodies {
        let (status, answer) = post_signed(&t, &scanner, &body).await;
        assert_eq!(status, 400, "{}: {answer}", String::from_utf8_lossy(&body));
        assert!(!answer.to_string().contains(&secret));
    }
    let (status, _) = post(&t, &[], b"").await;
    assert_eq!(status, 401);
    // A body declared over `max_body_bytes` (1 MiB here) is refused before
    // a byte of it is read.
    let signature = scanner.sign(&report(&[&secret]));
    let (status, answer) = post_head(&t, &signature, 1024 * 1024 + 1).await;
    assert_eq!(status, 413, "oversized: {answer}");
    assert_eq!(leak_rows(&pool).await, (0, 0));
    assert!(t.authenticate(&secret).await.allowed);
}

#[sqlx::test]
async fn a_flood_of_random_well_formed_tokens_costs_no_lookups_beyond_the_budget(
    _p: PgPoolOptions,
    conn: PgConnectOptions,
) {
    let scanner = Scanner::new();
    let (mut t, spy) = replica(&conn, &scanner, true).await;
    t.create_tenant("acme", "pro").await;
    let (secret, _) = t.create_key("acme").await;
    let mut loaded = t.running.caches().known_loaded();
    loaded.wait_for(|loaded| *loaded).await.unwrap();
    // The budget (100 unknown lookups a second) cannot refill: the clock stands still.
    t.running.clock().freeze_at(chrono::Utc::now());
    let reads = spy.key_reads();
    let flood: Vec<String> = (0..300)
        .map(|_| t.profile.key_format.generate("live").expose().to_string())
        .collect();
    let refs: Vec<&str> = flood.iter().map(String::as_str).collect();
    let (status, answer) = post_signed(&t, &scanner, &report(&refs)).await;
    assert_eq!(status, 200);
    let answer = answer.as_array().unwrap();
    assert_eq!(answer.len(), 300);
    assert!(answer.iter().all(|v| v["label"] == "false_positive"));
    assert_eq!(
        spy.key_reads() - reads,
        100,
        "the budget, then no more lookups"
    );

    // Our key is still found: its digest is known, whatever the budget.
    let (status, answer) = post_signed(&t, &scanner, &report(&[&secret])).await;
    assert_eq!(status, 200);
    assert_eq!(answer[0]["label"], "true_positive");
}

#[sqlx::test]
async fn report_leaked_keys_over_grpc_flags_our_keys_for_the_operator_only(
    _p: PgPoolOptions,
    conn: PgConnectOptions,
) {
    let pool = pool(&conn).await;
    let mut t = spawn(&conn, "messagesmart").await;
    t.create_tenant("shop", "default").await;
    let (secret, key) = t.create_key("shop").await;
    let mut c = RevocationServiceClient::new(t.channel.clone());
    let req = |reporter: &str| pb::ReportLeakedKeysRequest {
        reporter: reporter.into(),
        tokens: vec![
            pb::LeakedToken {
                token: secret.clone(),
                r#type: "messagesmart_key".into(),
                url: "https://pastebin.example/abc".into(),
                source: "paste".into(),
            },
            pb::LeakedToken {
                token: "ms_live_0000".into(),
                r#type: "messagesmart_key".into(),
                ..Default::default()
            },
        ],
    };
    let denied = c.report_leaked_keys(req("gitleaks-ci")).await.unwrap_err();
    assert_eq!(denied.code(), tonic::Code::Unauthenticated);
    let bad = c
        .report_leaked_keys(op(req("Not Valid!")))
        .await
        .unwrap_err();
    assert_eq!(violations(&bad), vec!["reporter"]);
    let mut empty = req("gitleaks-ci");
    empty.tokens.clear();
    let bad = c.report_leaked_keys(op(empty)).await.unwrap_err();
    assert_eq!(violations(&bad), vec!["tokens"]);
    assert_eq!(leak_rows(&pool).await, (0, 0), "refusals change nothing");
    assert!(t.authenticate(&secret).await.allowed);

    let r = c
        .report_leaked_keys(op(req("gitleaks-ci")))
        .await
        .unwrap()
        .into_inner();
    let labels: Vec<(&str, &str)> = r
        .results
        .iter()
        .map(|v| (v.token_hash.as_str(), v.label.as_str()))
        .collect();
    let h0 = sha256_hex(&secret);
    let h1 = sha256_hex("ms_live_0000");
    assert_eq!(
        labels,
        vec![
            (h0.as_str(), "true_positive"),
            (h1.as_str(), "false_positive")
        ]
    );
    // MessageSmart's profile revokes leaked keys ("automatically by policy").
    assert_eq!(reason(&t.authenticate(&secret).await), "KEY_REVOKED");
    let reporter: String = sqlx::query_scalar(
        "SELECT details->>'reporter' FROM audit_events WHERE action = 'key.leak_reported' \
         AND target = $1",
    )
    .bind(&key.key_id)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(reporter, "gitleaks-ci");
}

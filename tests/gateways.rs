//! HTTP forward-auth end to end: a real NGINX (Debian's `nginx`, installed
//! by `scripts/install-nginx`) running the shipped `examples/nginx/*.conf`
//! with the real ports, in front of an upstream that echoes what it
//! received, asking a real Tollgate on real Postgres through
//! `auth_request`, for each reference product. Traefik's ForwardAuth
//! contract is tested at the HTTP level with the headers Traefik sends (no
//! Traefik binary here).

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Bytes, Incoming};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tokio::io::AsyncBufReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};
use tollgate::domain::Reason;
use tollgate::grpc::pb;
use tollgate::store::Invalidation;

/// The secret the gateway proves itself with in these tests.
const GATEWAY_SECRET: &str = "gateway-secret-for-tests-0123456789";
/// The placeholder the examples carry for it.
const SECRET_PLACEHOLDER: &str = "replace-with-the-forward-auth-gateway-secret";

// ---------------------------------------------------------------- NGINX --

/// The NGINX binary: `NGINX_BIN`, else `nginx` on PATH or in /usr/sbin.
/// Never skips: without NGINX these tests fail, saying why.
fn nginx_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("NGINX_BIN").filter(|b| !b.is_empty()) {
        return bin.into();
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin")])
        .map(|dir| dir.join("nginx"))
        .find(|bin| bin.is_file())
        .unwrap_or_else(|| {
            panic!("NGINX not found: set NGINX_BIN, or run scripts/install-nginx (apt-get install nginx); scripts/test does this")
        })
}

fn example(product: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("examples/nginx/{product}.conf"))
}

/// Replaces `from`, which must occur exactly once, so a drifting example
/// breaks the test instead of silently testing something else.
fn replace_once(text: String, from: &str, to: &str) -> String {
    assert_eq!(text.matches(from).count(), 1, "`{from}` in the example");
    text.replacen(from, to, 1)
}

/// A port nobody listens on right now (NGINX cannot report the one it
/// picked, so it is given one).
async fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap().port()
}

/// A running NGINX (master and one worker, not a daemon), stopped on drop.
struct Nginx {
    addr: SocketAddr,
    log: Arc<Mutex<String>>,
    child: Child,
    dir: PathBuf,
}

impl Nginx {
    /// Runs `examples/nginx/{product}.conf` against these addresses, in a
    /// temporary prefix (its own pid, logs and temp files), as the current
    /// user.
    async fn start(product: &str, tollgate: SocketAddr, upstream: SocketAddr) -> Nginx {
        Self::start_with(product, tollgate, upstream, Vec::new()).await
    }

    /// As [`Nginx::start`], with more `(from, to)` replacements in the
    /// example (each `from` must occur once).
    async fn start_with(
        product: &str,
        tollgate: SocketAddr,
        upstream: SocketAddr,
        extra: Vec<(&str, String)>,
    ) -> Nginx {
        let port = free_port().await;
        let dir = std::env::temp_dir().join(format!("tollgate-nginx-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut config = std::fs::read_to_string(example(product)).unwrap();
        for (from, to) in [
            ("listen 8080;", format!("listen 127.0.0.1:{port};")),
            (
                "server 127.0.0.1:8081;",
                format!("server {tollgate};"),
            ),
            ("server 127.0.0.1:9000;", format!("server {upstream};")),
            (SECRET_PLACEHOLDER, GATEWAY_SECRET.to_string()),
            // Loaded CI machines: a generous timeout to Tollgate.
            ("proxy_read_timeout 2s;", "proxy_read_timeout 30s;".into()),
            (
                "http {\n",
                format!(
                    "http {{\n    access_log {d}/access.log;\n    client_body_temp_path {d}/body;\n    proxy_temp_path {d}/proxy;\n    fastcgi_temp_path {d}/fastcgi;\n    uwsgi_temp_path {d}/uwsgi;\n    scgi_temp_path {d}/scgi;\n",
                    d = dir.display()
                ),
            ),
        ]
        .into_iter()
        .chain(extra)
        {
            config = replace_once(config, from, &to);
        }
        let config_path = dir.join("nginx.conf");
        std::fs::write(&config_path, config).unwrap();
        let globals = format!(
            "daemon off; worker_processes 1; pid {}/nginx.pid; error_log stderr notice;",
            dir.display()
        );
        let mut child = Command::new(nginx_bin())
            .arg("-p")
            .arg(&dir)
            .arg("-c")
            .arg(&config_path)
            .arg("-g")
            .arg(globals)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start nginx");
        let log = Arc::new(Mutex::new(String::new()));
        let mut lines = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
        let sink = log.clone();
        let (started, mut worker_up) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                if line.contains("start worker process") {
                    let _ = started.send(true);
                }
                let mut log = sink.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        let nginx = Nginx {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            log,
            child,
            dir,
        };
        // The signal: NGINX logs that its worker started (after binding).
        let up = tokio::time::timeout(Duration::from_secs(60), worker_up.wait_for(|up| *up)).await;
        assert!(
            matches!(up, Ok(Ok(_))),
            "nginx did not start:\n{}",
            nginx.log()
        );
        nginx
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    async fn get(&self, path: &str, headers: &[(&str, &str)]) -> Reply {
        http(self.addr, "GET", path, headers).await
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("---- nginx log ----\n{}", self.log());
        }
        // SIGTERM to the master: it stops its worker, then itself. (A
        // SIGKILL would leave the worker running, orphaned.)
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

// ------------------------------------------------------- HTTP plumbing --

/// An HTTP response, read whole.
#[derive(Debug)]
struct Reply {
    status: u16,
    headers: hyper::HeaderMap,
    body: String,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {self:?}"))
    }

    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .map(|v| v.to_str().unwrap())
            .unwrap_or_default()
    }
}

/// One HTTP/1.1 request on a fresh connection.
async fn http(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)]) -> Reply {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut request = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "api.example.test");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = sender
        .send_request(request.body(Empty::<Bytes>::new()).unwrap())
        .await
        .unwrap();
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    Reply {
        status,
        headers,
        body: String::from_utf8(body.to_vec()).unwrap(),
    }
}

/// The product's API stand-in: answers every request with the headers it
/// received (`{"path", "headers": {name: [values]}}`) and counts requests.
struct Upstream {
    addr: SocketAddr,
    hits: Arc<AtomicUsize>,
}

impl Upstream {
    async fn start() -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(AtomicUsize::new(0));
        let counter = hits.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let counter = counter.clone();
                let echo = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
                    counter.fetch_add(1, Ordering::SeqCst);
                    let mut headers = serde_json::Map::new();
                    for (name, value) in req.headers() {
                        let values = headers.entry(name.as_str()).or_insert(json!([]));
                        values
                            .as_array_mut()
                            .unwrap()
                            .push(json!(String::from_utf8_lossy(value.as_bytes())));
                    }
                    let body = json!({"path": req.uri().path(), "headers": headers});
                    let response = hyper::Response::builder()
                        .header("content-type", "application/json")
                        .body(Full::new(Bytes::from(body.to_string())))
                        .unwrap();
                    async move { Ok::<_, Infallible>(response) }
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), echo),
                );
            }
        });
        Upstream { addr, hits }
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

/// A Tollgate for `product` with its forward-auth listener (gateway secret
/// required) on a free port.
async fn spawn_forward_auth(conn: &PgConnectOptions, product: &str) -> (Tollgate, SocketAddr) {
    let mut t = spawn(conn, product).await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = t
        .running
        .serve_forward_auth(listener, Some(GATEWAY_SECRET.to_string().into()), None)
        .unwrap();
    (t, addr)
}

/// Asserts a denial exactly as the product documents it.
fn assert_denied(r: &Reply, status: u16, body: &Value, case: &str) {
    assert_eq!(r.status, status, "{case}: {r:?}");
    assert_eq!(&r.json(), body, "{case}");
    assert_eq!(r.header("content-type"), "application/json", "{case}");
    assert!(!r.header("x-request-id").is_empty(), "{case}: {r:?}");
}

// ------------------------------------------------------------ products --

/// A reference product's documented contract (as in tests/envoy.rs).
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
    /// A scope of the plan that `path` does not accept, and the answer.
    other_scope: &'static str,
    forbidden: Value,
    rate_limited: Value,
    /// The example config's answer while Tollgate is down.
    unavailable: Value,
}

fn msgflash() -> Product {
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
        other_scope: "messages:read",
        forbidden: json!({"error": {"code": "FORBIDDEN",
            "message": "The key is valid but cannot access the resource"}}),
        rate_limited: json!({"error": {"code": "API_RATE_LIMIT_EXCEEDED",
            "message": "More than 10 requests/second on the same key"}}),
        unavailable: json!({"error": {"code": "SERVICE_UNAVAILABLE",
            "message": "Authentication is temporarily unavailable"}}),
    }
}

fn mailsage() -> Product {
    let invalid =
        json!({"error": "Invalid API key provided", "status": 401, "code": "invalid_api_key"});
    Product {
        name: "mailsage",
        plan: "pro",
        path: "/api/v1/emails/send",
        send: |k| ("Authorization", format!("Bearer {k}")),
        wrong: |k| ("X-API-Key", k.into()),
        missing: invalid.clone(),
        revoked: invalid.clone(),
        expired: invalid.clone(),
        wrong_header: invalid.clone(),
        invalid,
        other_scope: "emails:read",
        forbidden: json!({"error": "Insufficient permissions", "status": 403,
            "code": "insufficient_permissions"}),
        rate_limited: json!({"error": "Rate limit exceeded", "status": 429,
            "code": "rate_limit_exceeded"}),
        unavailable: json!({"error": "Authentication is temporarily unavailable",
            "status": 503, "code": "service_unavailable"}),
    }
}

fn msgine() -> Product {
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
        other_scope: "account:read",
        forbidden: json!({"error": {"code": "forbidden",
            "message": "Insufficient permissions for this operation"}}),
        rate_limited: json!({"error": {"code": "rate_limited", "message": "Too many requests"}}),
        unavailable: json!({"error": {"code": "service_unavailable",
            "message": "Authentication is temporarily unavailable"}}),
    }
}

fn messagesmart() -> Product {
    let envelope = |code: &str, message: &str, status: u16| json!({"success": false, "error": {"code": code, "message": message, "httpStatus": status}});
    Product {
        name: "messagesmart",
        plan: "business",
        path: "/api/v1/whatsapp/messages/text",
        send: |k| ("X-API-Key", k.into()),
        wrong: |k| ("Authorization", format!("Bearer {k}")),
        missing: envelope("api_key_missing", "API key is missing.", 401),
        invalid: envelope("api_key_invalid", "API key is invalid.", 401),
        revoked: envelope("api_key_revoked", "API key has been revoked.", 401),
        expired: envelope("api_key_expired", "API key has expired.", 401),
        wrong_header: envelope("api_key_missing", "API key is missing.", 401),
        other_scope: "whatsapp:read",
        forbidden: envelope(
            "api_key_forbidden",
            "API key is not allowed to perform this action.",
            403,
        ),
        rate_limited: envelope(
            "rate_limit_exceeded",
            "Too many requests. Please try again later.",
            429,
        ),
        unavailable: envelope(
            "service_unavailable",
            "Authentication is temporarily unavailable.",
            503,
        ),
    }
}

/// The whole documented contract of `p`, through NGINX's `auth_request`.
async fn the_contract_holds_through_nginx(conn: &PgConnectOptions, p: Product) {
    let (mut t, forward_auth) = spawn_forward_auth(conn, p.name).await;
    // No time passes unless the test moves it: rate limits are exact.
    t.running
        .clock()
        .freeze_at("2026-11-23T10:00:00Z".parse().unwrap());
    let upstream = Upstream::start().await;
    let nginx = Nginx::start(p.name, forward_auth, upstream.addr).await;
    t.create_tenant("acme", p.plan).await;
    let (secret, key) = t.create_key("acme").await;

    // A valid key passes; the upstream learns who calls, never the key, and
    // cannot be told another tenant or limit by the client.
    let (header, value) = (p.send)(&secret);
    let r = nginx
        .get(
            p.path,
            &[
                (header, &value),
                ("x-tollgate-tenant-id", "victim"),
                ("x-tollgate-plan", "enterprise"),
            ],
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
    assert_eq!(seen.get("authorization"), None);
    assert_eq!(seen.get("x-tollgate-gateway-secret"), None);
    assert!(!r.body.contains(GATEWAY_SECRET));
    assert_eq!(upstream.hits(), 1);

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
        assert_denied(&nginx.get(p.path, &headers).await, 401, body, case);
    }
    assert_eq!(upstream.hits(), 1);

    // 403: a valid key without the location's scope.
    let (reader, _) = t
        .create_key_with(pb::CreateKeyRequest {
            tenant_id: "acme".into(),
            name: "reader".into(),
            scopes: vec![p.other_scope.into()],
            ..Default::default()
        })
        .await
        .unwrap();
    let (header, value) = (p.send)(&reader);
    let r = nginx.get(p.path, &[(header, &value)]).await;
    assert_denied(&r, 403, &p.forbidden, "scope missing");
    assert_eq!(upstream.hits(), 1);

    // 429: the product's body, Retry-After and RateLimit-* from Tollgate.
    let (limited, _) = t
        .create_key_with(pb::CreateKeyRequest {
            tenant_id: "acme".into(),
            name: "two a minute".into(),
            limits: vec![pb::LimitSpec {
                scope: "key".into(),
                period: "minute".into(),
                limit: 2,
                ..Default::default()
            }],
            ..Default::default()
        })
        .await
        .unwrap();
    let (header, value) = (p.send)(&limited);
    for i in 0..2 {
        let r = nginx.get(p.path, &[(header, &value)]).await;
        assert_eq!(r.status, 200, "request {i}: {r:?}");
        assert_eq!(r.header("ratelimit-remaining"), (1 - i).to_string());
    }
    let r = nginx.get(p.path, &[(header, &value)]).await;
    assert_denied(&r, 429, &p.rate_limited, "third request in a minute");
    let retry: u64 = r.header("retry-after").parse().unwrap_or(0);
    assert!((1..=60).contains(&retry), "Retry-After: {r:?}");
    assert_eq!(r.header("ratelimit-limit"), "2");
    assert_eq!(r.header("ratelimit-remaining"), "0");
    assert_eq!(upstream.hits(), 3);
    assert_eq!(
        t.profile.denial_body(Reason::RateLimited),
        p.rate_limited.to_string(),
        "the profile's own body, relayed unchanged"
    );

    // Revoked: refused as soon as this instance hears of it.
    let mut events = t.invalidations();
    t.revoke(&key.key_id).await;
    let id: uuid::Uuid = key.key_id.parse().unwrap();
    wait_for(&mut events, |e| *e == Invalidation::Key(id)).await;
    let (header, value) = (p.send)(&secret);
    let r = nginx.get(p.path, &[(header, &value)]).await;
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
    assert_eq!(nginx.get(p.path, &[(header, &value)]).await.status, 200);
    t.running.clock().advance(Duration::from_secs(61));
    let r = nginx.get(p.path, &[(header, &value)]).await;
    assert_denied(&r, 401, &p.expired, "expired key");
    assert_eq!(upstream.hits(), 4);

    // Tollgate down: the configured failure status and body, never a pass.
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
    let (header, value) = (p.send)(&short_lived);
    let r = nginx.get(p.path, &[(header, &value)]).await;
    assert_eq!(r.status, 503, "{r:?}");
    assert_eq!(r.json(), p.unavailable);
    assert_eq!(upstream.hits(), 4);
}

#[sqlx::test]
async fn msgflash_through_nginx(_p: PgPoolOptions, conn: PgConnectOptions) {
    the_contract_holds_through_nginx(&conn, msgflash()).await;
}

#[sqlx::test]
async fn mailsage_through_nginx(_p: PgPoolOptions, conn: PgConnectOptions) {
    the_contract_holds_through_nginx(&conn, mailsage()).await;
}

#[sqlx::test]
async fn msgine_through_nginx(_p: PgPoolOptions, conn: PgConnectOptions) {
    the_contract_holds_through_nginx(&conn, msgine()).await;
}

#[sqlx::test]
async fn messagesmart_through_nginx(_p: PgPoolOptions, conn: PgConnectOptions) {
    the_contract_holds_through_nginx(&conn, messagesmart()).await;
}

// -------------------------------------------------------------- Traefik --

/// The headers Traefik's ForwardAuth middleware sends (v2 and v3): every
/// header of the client's request, plus X-Forwarded-{Method,Proto,Host,
/// Uri,For}. The auth server's own address comes from the middleware's
/// `address`, route policy included.
fn traefik_headers<'a>(method: &'a str, uri: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("X-Forwarded-Method", method),
        ("X-Forwarded-Proto", "https"),
        ("X-Forwarded-Host", "api.example.test"),
        ("X-Forwarded-Uri", uri),
        ("X-Forwarded-For", "203.0.113.7"),
        ("X-Real-Ip", "203.0.113.7"),
        ("User-Agent", "curl/8.5.0"),
        ("Accept", "*/*"),
        ("x-tollgate-gateway-secret", GATEWAY_SECRET),
    ]
}

#[sqlx::test]
async fn traefik_forward_auth_gets_identity_headers_or_the_denial_itself(
    _p: PgPoolOptions,
    conn: PgConnectOptions,
) {
    let (mut t, forward_auth) = spawn_forward_auth(&conn, "msgflash").await;
    t.running
        .clock()
        .freeze_at("2026-11-23T10:00:00Z".parse().unwrap());
    t.create_tenant("acme", "pro").await;
    let (secret, key) = t.create_key("acme").await;
    let address = "/auth/traefik?surface=public_api&scopes=messages:send&cost=1";
    let with_key = |extra: &[(&'static str, &str)]| {
        let mut h = traefik_headers("POST", "/api/v1/messages/send?to=1");
        h.extend(extra.iter().map(|(n, v)| (*n, *v)).collect::<Vec<_>>());
        h.into_iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect::<Vec<_>>()
    };
    let call = |headers: Vec<(String, String)>| async move {
        let h: Vec<(&str, &str)> = headers
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_str()))
            .collect();
        http(forward_auth, "GET", address, &h).await
    };

    // Allowed: 2xx with the headers `authResponseHeaders` copies upstream.
    let r = call(with_key(&[("x-api-key", &secret)])).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("x-tollgate-tenant-id"), "acme");
    assert_eq!(r.header("x-tollgate-key-id"), key.key_id);
    assert_eq!(r.header("x-tollgate-plan"), "pro");
    assert_eq!(r.header("x-tollgate-environment"), "live");
    assert_eq!(r.header("x-tollgate-scopes"), key.scopes.join(","));
    assert_eq!(r.header("ratelimit-limit"), "10");
    assert_eq!(r.header("ratelimit-remaining"), "9");
    assert!(r.body.is_empty(), "{r:?}");

    // Denied: the denial itself, which Traefik relays as is.
    let r = call(with_key(&[])).await;
    let body = json!({"error": {"code": "UNAUTHORIZED", "message": "Missing API key"}});
    assert_denied(&r, 401, &body, "missing key");
    let r = call(with_key(&[("authorization", &format!("Bearer {secret}"))])).await;
    let body = json!({"error": {"code": "UNAUTHORIZED",
        "message": "Use the x-api-key header for the public API"}});
    assert_denied(&r, 401, &body, "wrong header");
    let (reader, _) = t
        .create_key_with(pb::CreateKeyRequest {
            tenant_id: "acme".into(),
            name: "reader".into(),
            scopes: vec!["messages:read".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    let r = call(with_key(&[("x-api-key", &reader)])).await;
    let body = json!({"error": {"code": "FORBIDDEN",
        "message": "The key is valid but cannot access the resource"}});
    assert_denied(&r, 403, &body, "scope missing");
    assert_eq!(r.header("x-tollgate-status"), "", "NGINX's headers only");

    // 429 with Retry-After and RateLimit-*: the 10/s limit, clock frozen.
    for i in 1..10 {
        let r = call(with_key(&[("x-api-key", &secret)])).await;
        assert_eq!(r.status, 200, "request {i}: {r:?}");
    }
    let r = call(with_key(&[("x-api-key", &secret)])).await;
    let body = json!({"error": {"code": "API_RATE_LIMIT_EXCEEDED",
        "message": "More than 10 requests/second on the same key"}});
    assert_denied(&r, 429, &body, "eleventh request in one second");
    assert_eq!(r.header("retry-after"), "1");
    assert_eq!(r.header("ratelimit-remaining"), "0");
    // The request id Traefik's client sent is the one to quote to support.
    let r = call(with_key(&[("x-request-id", "ticket-7")])).await;
    assert_eq!(r.header("x-request-id"), "ticket-7");
}

#[sqlx::test]
async fn an_nginx_denial_is_401_or_403_carrying_the_products_status_and_body(
    _p: PgPoolOptions,
    conn: PgConnectOptions,
) {
    // auth_request treats anything but 2xx, 401 and 403 as an error, so a
    // 429 must travel as 403 plus headers the example config turns back.
    let (mut t, forward_auth) = spawn_forward_auth(&conn, "msgine").await;
    t.running
        .clock()
        .freeze_at("2026-11-23T10:00:00Z".parse().unwrap());
    t.create_tenant("acme", "business").await;
    let (secret, _) = t
        .create_key_with(pb::CreateKeyRequest {
            tenant_id: "acme".into(),
            name: "one a minute".into(),
            limits: vec![pb::LimitSpec {
                scope: "key".into(),
                period: "minute".into(),
                limit: 1,
                ..Default::default()
            }],
            ..Default::default()
        })
        .await
        .unwrap();
    let path = "/auth/nginx?surface=public_api";
    let headers = [
        ("x-api-key", secret.as_str()),
        ("x-original-method", "GET"),
        ("x-original-uri", "/api/v1/contacts"),
        ("x-tollgate-gateway-secret", GATEWAY_SECRET),
    ];
    assert_eq!(http(forward_auth, "GET", path, &headers).await.status, 200);
    let r = http(forward_auth, "GET", path, &headers).await;
    assert_eq!(r.status, 403, "{r:?}");
    assert_eq!(r.header("x-tollgate-status"), "429");
    let body: Value = serde_json::from_str(r.header("x-tollgate-body")).unwrap();
    assert_eq!(
        body,
        json!({"error": {"code": "rate_limited", "message": "Too many requests"}})
    );
    assert_eq!(r.header("retry-after"), "60");
    let r = http(forward_auth, "GET", path, &headers[1..]).await;
    assert_eq!(r.status, 401, "{r:?}");
    assert_eq!(r.header("x-tollgate-status"), "401");
}

#[sqlx::test]
async fn only_the_gateway_that_sends_the_secret_gets_a_decision(
    _p: PgPoolOptions,
    conn: PgConnectOptions,
) {
    let (mut t, forward_auth) = spawn_forward_auth(&conn, "msgflash").await;
    t.create_tenant("acme", "pro").await;
    let (secret, _) = t.create_key("acme").await;
    let path = "/auth/traefik?surface=public_api";
    for (case, sent) in [
        ("no secret", None),
        (
            "a wrong secret",
            Some("gateway-secret-for-tests-0123456780"),
        ),
        ("a prefix of it", Some(&GATEWAY_SECRET[..20])),
    ] {
        let mut headers = vec![("x-api-key", secret.as_str())];
        headers.extend(sent.map(|s| ("x-tollgate-gateway-secret", s)));
        let r = http(forward_auth, "GET", path, &headers).await;
        assert_eq!(r.status, 401, "{case}: {r:?}");
        assert_eq!(r.json()["error"], "gateway_unauthenticated", "{case}");
        assert_eq!(r.header("x-tollgate-tenant-id"), "", "{case}");
        assert!(!r.body.contains(GATEWAY_SECRET), "{case}");
    }
    let headers = [
        ("x-api-key", secret.as_str()),
        ("x-tollgate-gateway-secret", GATEWAY_SECRET),
    ];
    let r = http(forward_auth, "GET", path, &headers).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("x-tollgate-tenant-id"), "acme");
    // Probes need no secret.
    assert_eq!(http(forward_auth, "GET", "/healthz", &[]).await.status, 200);
    assert_eq!(http(forward_auth, "GET", "/readyz", &[]).await.status, 200);
}

#[sqlx::test]
async fn a_malformed_route_policy_is_an_error_never_an_allow_and_nginx_fails_closed(
    _p: PgPoolOptions,
    conn: PgConnectOptions,
) {
    let (mut t, forward_auth) = spawn_forward_auth(&conn, "msgflash").await;
    t.create_tenant("acme", "pro").await;
    let (secret, _) = t.create_key("acme").await;
    let headers = [
        ("x-api-key", secret.as_str()),
        ("x-tollgate-gateway-secret", GATEWAY_SECRET),
    ];
    let ok = http(
        forward_auth,
        "GET",
        "/auth/nginx?surface=public_api&cost=2",
        &headers,
    )
    .await;
    assert_eq!(ok.status, 200, "{ok:?}");
    for (query, field) in [
        ("", "query.surface"),
        ("surface=admin", "query.surface"),
        ("surface=public_api&cost=-1", "query.cost"),
        ("surface=public_api&limits=sometimes", "query.limits"),
        ("surface=public_api&scope=messages:send", "query.scope"),
        ("surface=public_api&surface=dashboard", "query.surface"),
    ] {
        for gateway in ["nginx", "traefik"] {
            let path = format!("/auth/{gateway}?{query}");
            let r = http(forward_auth, "GET", &path, &headers).await;
            // Neither 2xx nor 401/403: NGINX's auth_request takes it as an
            // error (its failure status); Traefik relays a 500.
            assert_eq!(r.status, 500, "{path}: {r:?}");
            assert_eq!(r.json()["error"], "invalid_route_policy", "{path}");
            assert_eq!(r.json()["violations"][0]["field"], field, "{path}");
            assert_eq!(r.header("x-tollgate-tenant-id"), "", "{path}");
        }
    }
    // Through NGINX, a location that forgot its policy fails closed.
    let upstream = Upstream::start().await;
    let nginx = Nginx::start("msgflash", forward_auth, upstream.addr).await;
    let r = nginx.get("/elsewhere", &[("x-api-key", &secret)]).await;
    assert_eq!(r.status, 503, "{r:?}");
    assert_eq!(upstream.hits(), 0);
}

/// A CA, and certificates it signed for the server (`localhost`) and the
/// gateway, as PEM files in `dir`: `ca.crt`, `server.{crt,key}`,
/// `client.{crt,key}`.
fn pki(dir: &Path) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    // Distinct names: OpenSSL (NGINX) takes a leaf whose issuer name is its
    // own subject name for a self-signed certificate.
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "forward-auth test CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    std::fs::write(dir.join("ca.crt"), ca.pem()).unwrap();
    for (name, san) in [("server", "localhost"), ("client", "gateway")] {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec![san.to_string()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, san);
        let cert = params.signed_by(&key, &issuer).unwrap();
        std::fs::write(dir.join(format!("{name}.crt")), cert.pem()).unwrap();
        std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem()).unwrap();
    }
}

#[sqlx::test]
async fn over_mutual_tls_only_a_gateway_with_a_trusted_certificate_gets_a_decision(
    _p: PgPoolOptions,
    conn: PgConnectOptions,
) {
    let dir = std::env::temp_dir().join(format!("tollgate-fa-tls-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    pki(&dir);
    let tls = tollgate::tls::Reloading::start(tollgate::tls::TlsSettings {
        cert_file: dir.join("server.crt"),
        key_file: dir.join("server.key"),
        client_ca_file: Some(dir.join("ca.crt")),
        reload_seconds: 60,
    })
    .unwrap();
    // mTLS instead of a gateway secret.
    let mut t = spawn(&conn, "msgflash").await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let forward_auth = t
        .running
        .serve_forward_auth(listener, None, Some(tls))
        .unwrap();
    t.create_tenant("acme", "pro").await;
    let (secret, _) = t.create_key("acme").await;
    let upstream = Upstream::start().await;
    // The example's subrequest, over TLS, with or without a certificate.
    let plain = "proxy_pass http://tollgate_forward_auth/auth/nginx?$tollgate_policy;";
    let over_tls = |with_certificate: bool| {
        let d = dir.display();
        let mut to = format!(
            "proxy_pass https://tollgate_forward_auth/auth/nginx?$tollgate_policy;\n            proxy_ssl_trusted_certificate {d}/ca.crt;\n            proxy_ssl_verify on;\n            proxy_ssl_name localhost;"
        );
        if with_certificate {
            to.push_str(&format!(
                "\n            proxy_ssl_certificate {d}/client.crt;\n            proxy_ssl_certificate_key {d}/client.key;"
            ));
        }
        vec![(plain, to)]
    };
    let path = "/api/v1/messages/send";

    let trusted = Nginx::start_with("msgflash", forward_auth, upstream.addr, over_tls(true)).await;
    let r = trusted.get(path, &[("x-api-key", &secret)]).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["headers"]["x-tollgate-tenant-id"], json!(["acme"]));
    let r = trusted.get(path, &[]).await;
    assert_eq!(r.status, 401, "{r:?}");
    assert_eq!(r.json()["error"]["message"], "Missing API key");

    // Without a certificate the handshake fails: NGINX's failure status.
    let stranger =
        Nginx::start_with("msgflash", forward_auth, upstream.addr, over_tls(false)).await;
    let r = stranger.get(path, &[("x-api-key", &secret)]).await;
    assert_eq!(r.status, 503, "{r:?}");
    assert_eq!(upstream.hits(), 1);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn every_example_config_is_valid_for_nginx() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/nginx");
    let prefix = std::env::temp_dir().join(format!("tollgate-nginx-t-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&prefix).unwrap();
    let mut checked = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let globals = format!("pid {}/nginx.pid; error_log stderr;", prefix.display());
        let out = std::process::Command::new(nginx_bin())
            .arg("-t")
            .arg("-p")
            .arg(&prefix)
            .arg("-c")
            .arg(&path)
            .arg("-g")
            .arg(globals)
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
    let _ = std::fs::remove_dir_all(&prefix);
    checked.sort();
    assert_eq!(
        checked,
        [
            "mailsage.conf",
            "messagesmart.conf",
            "msgflash.conf",
            "msgine.conf"
        ]
    );
}

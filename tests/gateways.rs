//! HTTP forward-auth end to end: a real NGINX (Debian's `nginx`, installed
//! by `scripts/install-nginx`) running the shipped `examples/nginx/*.conf`
//! with the real ports, in front of an upstream that echoes what it
//! received, asking a real Tollgate on real Postgres through
//! `auth_request`, for each reference product. Traefik's ForwardAuth
//! contract is tested at the HTTP level with the headers Traefik sends (no
//! Traefik binary here).

mod common;
#[path = "support/http.rs"]
mod gateway_http;

#[path = "gateways/binary.rs"]
mod binary;
#[path = "gateways/listener.rs"]
mod listener;
#[path = "gateways/mtls.rs"]
mod mtls;
#[path = "gateways/products.rs"]
mod products;
#[path = "gateways/traefik.rs"]
mod traefik;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use gateway_http::{http, Reply, Upstream};
use serde_json::{json, Value};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tokio::io::AsyncBufReadExt;
use tokio::net::TcpListener;
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

/// A Tollgate for `product` with its forward-auth listener (gateway secret
/// required) on a free port.
async fn spawn_forward_auth(conn: &PgConnectOptions, product: &str) -> (Tollgate, SocketAddr) {
    let max = tollgate::forward_auth::ForwardAuthSettings::default().max_connections;
    spawn_forward_auth_holding(conn, product, max).await
}

/// As [`spawn_forward_auth`], holding at most `max_connections` open.
async fn spawn_forward_auth_holding(
    conn: &PgConnectOptions,
    product: &str,
    max_connections: usize,
) -> (Tollgate, SocketAddr) {
    let mut t = spawn(conn, product).await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = t
        .running
        .serve_forward_auth(
            listener,
            Some(GATEWAY_SECRET.to_string().into()),
            None,
            max_connections,
        )
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

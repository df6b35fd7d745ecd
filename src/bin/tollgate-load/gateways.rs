//! NGINX end to end: the same HTTP requests (`wrk`) through one NGINX with
//! three servers: `plain` (no auth), `with_noop` (`auth_request` to a no-op
//! HTTP server answering 200 with the headers Tollgate would send: the cost
//! of the subrequest itself) and `with_tollgate` (`auth_request` to
//! Tollgate's forward-auth listener). All three proxy to the same backend
//! server in that NGINX. Runs alternate plain / no-op / Tollgate within each
//! round, so a neighbour's load falls on all three alike.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;

use crate::envoy::{parse_wrk, WrkReport};
use crate::fixture::{free_port, limit, seed, spawn_self, FixtureOpts, Proc};
use crate::h2load::{cpu_seconds_with_children, process_cpu_seconds};

#[derive(Debug, clap::Args)]
pub struct GatewayOpts {
    #[command(flatten)]
    pub setup: FixtureOpts,
    /// The NGINX binary.
    #[arg(long, env = "NGINX_BIN", default_value = "nginx")]
    pub nginx: PathBuf,
    #[arg(long, default_value = "wrk")]
    pub wrk: PathBuf,
    /// Distinct keys the requests cycle through.
    #[arg(long, default_value_t = 10_000)]
    pub keys: usize,
    /// wrk connections per run.
    #[arg(long, value_delimiter = ',', default_value = "1,16")]
    pub connections: Vec<usize>,
    /// Seconds per run.
    #[arg(long, default_value_t = 10)]
    pub duration: u64,
    /// Rounds (plain, no-op, Tollgate each) per connection count.
    #[arg(long, default_value_t = 2)]
    pub rounds: usize,
}

const LUA: &str = r#"
local keys = {}
for line in io.lines(os.getenv("TOLLGATE_BENCH_KEYS")) do keys[#keys + 1] = line end
local i = math.random(#keys)
request = function()
  i = i % #keys + 1
  return wrk.format("GET", "/v1/messages", { ["x-api-key"] = keys[i] })
end
"#;

/// One NGINX (one worker), three servers in front of one backend server.
fn config(
    dir: &std::path::Path,
    ports: [u16; 4],
    noop: SocketAddr,
    tollgate: SocketAddr,
) -> String {
    let [plain, with_noop, with_tollgate, backend] = ports;
    let guarded = |port: u16, auth: &str| {
        format!(
            r#"
    server {{
        listen 127.0.0.1:{port};
        location / {{
            auth_request /_auth;
            auth_request_set $tenant $upstream_http_x_tollgate_tenant_id;
            auth_request_set $key_id $upstream_http_x_tollgate_key_id;
            proxy_set_header X-Tollgate-Tenant-Id $tenant;
            proxy_set_header X-Tollgate-Key-Id $key_id;
            proxy_set_header x-api-key "";
            proxy_set_header Connection "";
            proxy_http_version 1.1;
            proxy_pass http://backend;
        }}
        location = /_auth {{
            internal;
            proxy_pass http://{auth}/auth/nginx?surface=public_api;
            proxy_pass_request_body off;
            proxy_set_header Content-Length "";
            proxy_set_header X-Original-Method $request_method;
            proxy_set_header X-Original-URI $request_uri;
            proxy_set_header Connection "";
            proxy_http_version 1.1;
        }}
    }}"#
        )
    };
    format!(
        r#"daemon off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    upstream backend {{ server 127.0.0.1:{backend}; keepalive 64; }}
    upstream noop {{ server {noop}; keepalive 64; }}
    upstream tollgate {{ server {tollgate}; keepalive 64; }}
    server {{
        listen 127.0.0.1:{backend};
        location / {{ return 200 "ok"; }}
    }}
    server {{
        listen 127.0.0.1:{plain};
        location / {{
            proxy_set_header Connection "";
            proxy_http_version 1.1;
            proxy_pass http://backend;
        }}
    }}{}{}
}}
"#,
        guarded(with_noop, "noop"),
        guarded(with_tollgate, "tollgate"),
        d = dir.display(),
    )
}

/// The no-op forward-auth server: 200 with fixed identity headers (the
/// ones Tollgate answered for a real key), on a current-thread runtime.
pub fn serve_noop(listen: SocketAddr, headers: Vec<(String, String)>) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(listen).await?;
        println!("listening on {}", listener.local_addr()?);
        let headers = Arc::new(headers);
        loop {
            let (tcp, _) = listener.accept().await?;
            let _ = tcp.set_nodelay(true);
            let headers = headers.clone();
            let service = hyper::service::service_fn(move |_req| {
                let mut r = hyper::Response::new(Full::new(Bytes::new()));
                for (name, value) in headers.iter() {
                    if let (Ok(n), Ok(v)) = (
                        hyper::header::HeaderName::from_bytes(name.as_bytes()),
                        hyper::header::HeaderValue::from_str(value),
                    ) {
                        r.headers_mut().insert(n, v);
                    }
                }
                async move { Ok::<_, Infallible>(r) }
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), service),
            );
        }
    })
}

/// Tollgate's answer headers for `key` (what the no-op server replays).
async fn capture(forward_auth: SocketAddr, key: &str) -> anyhow::Result<Vec<(String, String)>> {
    let tcp = tokio::net::TcpStream::connect(forward_auth).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
    tokio::spawn(conn);
    let request = hyper::Request::get("/auth/nginx?surface=public_api")
        .header("host", "tollgate")
        .header("x-api-key", key)
        .body(Empty::<Bytes>::new())?;
    let response = sender.send_request(request).await?;
    ensure!(
        response.status() == 200,
        "Tollgate refused the bench key: {}",
        response.status()
    );
    let headers = response
        .headers()
        .iter()
        .filter(|(n, _)| {
            n.as_str().starts_with("x-tollgate-") || n.as_str().starts_with("ratelimit-")
        })
        .map(|(n, v)| (n.to_string(), v.to_str().unwrap_or_default().to_owned()))
        .collect();
    let _ = response.into_body().collect().await;
    Ok(headers)
}

async fn wait_listening(port: u16) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        ensure!(Instant::now() < deadline, "nothing listens on {port}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

pub async fn run(o: GatewayOpts) -> anyhow::Result<()> {
    let fixture = o.setup.fixture().await?;
    let forward_auth = free_port()?;
    let listen = forward_auth.to_string();
    let tollgate = fixture
        .spawn("tollgate", &[("TOLLGATE_FORWARD_AUTH__LISTEN", &listen)])
        .await?;
    wait_listening(forward_auth.port()).await?;
    let keys = seed(
        &tollgate.target(),
        "gateways",
        10,
        o.keys.div_ceil(10),
        vec![limit("key", "second", 1_000_000)],
    )
    .await?;
    let dir = std::env::temp_dir().join(format!("tollgate-gateways-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let keys_file = dir.join("keys.txt");
    let keys_text: Vec<&str> = keys.iter().map(|k| k.key.as_str()).collect();
    std::fs::write(&keys_file, keys_text.join("\n") + "\n")?;
    let lua = dir.join("keys.lua");
    std::fs::write(&lua, LUA)?;

    let canned = capture(forward_auth, &keys[0].key).await?;
    let noop = spawn_self(
        "noop-http",
        "noop-http",
        &["--header".to_owned(), serde_json::to_string(&canned)?],
    )?;

    let ports = [
        free_port()?.port(),
        free_port()?.port(),
        free_port()?.port(),
        free_port()?.port(),
    ];
    let conf = dir.join("nginx.conf");
    std::fs::write(&conf, config(&dir, ports, noop.addr, forward_auth))?;
    let child = Command::new(&o.nginx)
        .arg("-p")
        .arg(&dir)
        .arg("-c")
        .arg(&conf)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .context("starting nginx")?;
    let nginx = Proc::new(
        "nginx",
        child,
        SocketAddr::from(([127, 0, 0, 1], ports[0])),
        None,
    );
    for port in ports {
        wait_listening(port).await?;
    }
    println!(
        "nginx {} (1 worker), wrk -t1, {} keys, {} s per run, {} rounds alternating plain / no-op / Tollgate",
        nginx.pid(),
        keys.len(),
        o.duration,
        o.rounds
    );

    let mut reports = Vec::new();
    let me = std::process::id();
    for &c in &o.connections {
        // [plain, noop, tollgate]: requests, rps sum, server CPU s, wrk CPU s.
        let mut sums = [(0u64, 0.0f64, 0.0f64, 0.0f64); 3];
        for round in 0..o.rounds {
            let listeners = [
                ("plain", ports[0], None),
                ("with_noop", ports[1], Some(noop.pid())),
                ("with_tollgate", ports[2], Some(tollgate.pid())),
            ];
            for (i, (listener, port, server)) in listeners.into_iter().enumerate() {
                let server_before = server.map_or(Ok(0.0), process_cpu_seconds)?;
                let wrk_before = cpu_seconds_with_children(me)?.1;
                let out = Command::new(&o.wrk)
                    .args(["-t1", &format!("-c{c}"), &format!("-d{}s", o.duration)])
                    .args(["--latency", "-s"])
                    .arg(&lua)
                    .arg(format!("http://127.0.0.1:{port}/v1/messages"))
                    .env("TOLLGATE_BENCH_KEYS", &keys_file)
                    .output()
                    .context("running wrk")?;
                let wrk_cpu = cpu_seconds_with_children(me)?.1 - wrk_before;
                let server_cpu = server.map_or(Ok(0.0), process_cpu_seconds)? - server_before;
                let text = String::from_utf8_lossy(&out.stdout).into_owned();
                if !out.status.success() {
                    bail!("wrk failed: {text}{}", String::from_utf8_lossy(&out.stderr));
                }
                let r: WrkReport = parse_wrk(listener, c, &text)?;
                ensure!(
                    r.non_2xx == 0,
                    "{listener}: {} responses were not 2xx",
                    r.non_2xx
                );
                let per_request = |s: f64| s * 1e6 / r.requests.max(1) as f64;
                println!(
                    "round {round} {:<14} c={:<3} {:>8.0} req/s  p50 {:>7.1} µs  p99 {:>7.1} µs  auth server CPU {:>5.1} µs/req  wrk CPU {:>5.1} µs/req",
                    r.listener, c, r.rps, r.p50_us, r.p99_us, per_request(server_cpu), per_request(wrk_cpu)
                );
                let s = &mut sums[i];
                s.0 += r.requests;
                s.1 += r.rps;
                s.2 += server_cpu;
                s.3 += wrk_cpu;
                reports.push(r);
            }
        }
        let rps = |i: usize| sums[i].1 / o.rounds as f64;
        let cpu = |i: usize| sums[i].2 * 1e6 / sums[i].0.max(1) as f64;
        let wrk = |i: usize| sums[i].3 * 1e6 / sums[i].0.max(1) as f64;
        println!(
            "  at c={c}: req/s plain {:.0}, with no-op {:.0} ({:.2} of plain), with Tollgate {:.0} ({:.2} of plain, {:.2} of no-op); auth server CPU µs/req: no-op {:.1}, Tollgate {:.1}; wrk CPU µs/req {:.1}/{:.1}/{:.1}",
            rps(0),
            rps(1),
            rps(1) / rps(0),
            rps(2),
            rps(2) / rps(0),
            rps(2) / rps(1),
            cpu(1),
            cpu(2),
            wrk(0),
            wrk(1),
            wrk(2),
        );
    }
    println!("{}", serde_json::to_string(&reports)?);
    // A graceful stop: killing the master alone would leave its worker.
    let _ = Command::new(&o.nginx)
        .arg("-p")
        .arg(&dir)
        .arg("-c")
        .arg(&conf)
        .args(["-s", "stop"])
        .status();
    drop(nginx);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

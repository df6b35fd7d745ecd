//! Envoy end to end: the same HTTP requests (`wrk`) through one Envoy
//! listener without ext_authz and one with Tollgate's ext_authz. Both
//! answer with a `direct_response` after the filters, so the difference is
//! the ext_authz hop: Envoy → Tollgate → decision → Envoy.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use serde::Serialize;

use crate::fixture::{free_port, limit, seed, FixtureOpts, Proc};
use crate::suite::{capture, spawn_noop};

#[derive(Debug, clap::Args)]
pub struct EnvoyOpts {
    #[command(flatten)]
    pub setup: FixtureOpts,
    /// The Envoy binary.
    #[arg(long, env = "ENVOY_BIN")]
    pub envoy: PathBuf,
    #[arg(long, default_value = "wrk")]
    pub wrk: PathBuf,
    /// Distinct keys the requests cycle through.
    #[arg(long, default_value_t = 10_000)]
    pub keys: usize,
    /// wrk connections per run, one run each.
    #[arg(long, value_delimiter = ',', default_value = "1,16")]
    pub connections: Vec<usize>,
    /// Seconds per run.
    #[arg(long, default_value_t = 10)]
    pub duration: u64,
    /// Runtime of the no-op ext_authz server (`current` or `multi`).
    #[arg(long, default_value = "current")]
    pub noop_runtime: String,
    /// Envoy worker threads.
    #[arg(long, default_value_t = 1)]
    pub envoy_concurrency: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct WrkReport {
    pub listener: String,
    pub connections: usize,
    pub rps: f64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub requests: u64,
    pub non_2xx: u64,
}

/// Listeners: `plain` (no ext_authz), `with_noop` (ext_authz to the no-op
/// baseline server: the cost of the hop itself), `with_tollgate`.
fn config(ports: [u16; 3], admin: u16, noop: u16, tollgate: u16) -> String {
    let listener = |name: &str, port: u16, cluster: Option<&str>| {
        let filter = match cluster {
            Some(cluster) => format!(
                r#"
          - name: envoy.filters.http.ext_authz
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz
              transport_api_version: V3
              grpc_service: {{ envoy_grpc: {{ cluster_name: {cluster} }}, timeout: 0.25s }}
              failure_mode_allow: false
              status_on_error: {{ code: ServiceUnavailable }}"#
            ),
            None => String::new(),
        };
        let per_route = if cluster.is_some() {
            r#"
                typed_per_filter_config:
                  envoy.filters.http.ext_authz:
                    "@type": type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute
                    check_settings: { context_extensions: { surface: public_api } }"#
        } else {
            ""
        };
        format!(
            r#"
  - name: {name}
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: {name}
          route_config:
            virtual_hosts:
            - name: api
              domains: ["*"]
              routes:
              - match: {{ prefix: "/" }}
                direct_response: {{ status: 200, body: {{ inline_string: "ok" }} }}{per_route}
          http_filters:{filter}
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"#
        )
    };
    format!(
        r#"admin:
  address: {{ socket_address: {{ address: 127.0.0.1, port_value: {admin} }} }}
static_resources:
  listeners:{}{}
  clusters:{}
"#,
        listener("plain", ports[0], None),
        listener("with_noop", ports[1], Some("noop"))
            + &listener("with_tollgate", ports[2], Some("tollgate")),
        cluster("noop", noop) + &cluster("tollgate", tollgate),
    )
}

fn cluster(name: &str, port: u16) -> String {
    format!(
        r#"
  - name: {name}
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{ http2_protocol_options: {{}} }}
    load_assignment:
      cluster_name: {name}
      endpoints:
      - lb_endpoints:
        - endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }} }}"#
    )
}

const LUA: &str = r#"
local keys = {}
for line in io.lines(os.getenv("TOLLGATE_BENCH_KEYS")) do keys[#keys + 1] = line end
local i = math.random(#keys)
request = function()
  i = i % #keys + 1
  return wrk.format("POST", "/v1/messages",
    { ["x-api-key"] = keys[i], ["content-type"] = "application/json" }, "{}")
end
"#;

/// `1.23ms`, `456.00us`, `1.01s` → µs.
fn micros(s: &str) -> Option<f64> {
    let (num, unit) = s.split_at(s.find(|c: char| c.is_ascii_alphabetic())?);
    let n: f64 = num.parse().ok()?;
    Some(match unit {
        "us" => n,
        "ms" => n * 1e3,
        "s" => n * 1e6,
        "m" => n * 60e6,
        _ => return None,
    })
}

pub fn parse_wrk(listener: &str, connections: usize, out: &str) -> anyhow::Result<WrkReport> {
    let field = |label: &str| -> Option<&str> {
        out.lines()
            .find_map(|l| l.trim().strip_prefix(label).map(str::trim))
    };
    let pct = |p: &str| {
        field(p)
            .and_then(micros)
            .with_context(|| format!("no {p} in {out}"))
    };
    let requests = out
        .lines()
        .find(|l| l.contains("requests in"))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .context("no request count")?;
    Ok(WrkReport {
        listener: listener.to_owned(),
        connections,
        rps: field("Requests/sec:")
            .and_then(|v| v.parse().ok())
            .context("no Requests/sec")?,
        p50_us: pct("50%")?,
        p90_us: pct("90%")?,
        p99_us: pct("99%")?,
        requests,
        non_2xx: field("Non-2xx or 3xx responses:")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
    })
}

async fn wait_listening(port: u16) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        ensure!(Instant::now() < deadline, "Envoy did not listen on {port}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

pub async fn run(o: EnvoyOpts) -> anyhow::Result<()> {
    let fixture = o.setup.fixture().await?;
    let tollgate = fixture.spawn("tollgate", &[]).await?;
    let keys = seed(
        &tollgate.target(),
        "envoy",
        10,
        o.keys.div_ceil(10),
        vec![limit("key", "second", 1_000_000)],
    )
    .await?;
    let dir = std::env::temp_dir().join(format!("tollgate-envoy-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let keys_file = dir.join("keys.txt");
    let keys_text: Vec<&str> = keys.iter().map(|k| k.key.as_str()).collect();
    std::fs::write(&keys_file, keys_text.join("\n") + "\n")?;
    let lua = dir.join("keys.lua");
    std::fs::write(&lua, LUA)?;
    let canned = capture(&tollgate.target(), &keys[0].key).await?;
    let canned_file = dir.join("canned.json");
    std::fs::write(&canned_file, serde_json::to_string(&canned)?)?;
    let noop = spawn_noop(&o.noop_runtime, &canned_file)?;
    let ports = [
        free_port()?.port(),
        free_port()?.port(),
        free_port()?.port(),
    ];
    let admin = free_port()?;
    let yaml = dir.join("envoy.yaml");
    std::fs::write(
        &yaml,
        config(ports, admin.port(), noop.addr.port(), tollgate.addr.port()),
    )?;
    let child = Command::new(&o.envoy)
        .arg("-c")
        .arg(&yaml)
        .args(["--concurrency", &o.envoy_concurrency.to_string()])
        .args(["--log-level", "error", "--base-id"])
        .arg(std::process::id().to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .context("starting Envoy")?;
    let _envoy = Proc::new("envoy", child, admin, None);
    for port in ports {
        wait_listening(port).await?;
    }

    let mut reports = Vec::new();
    for &c in &o.connections {
        let listeners = ["plain", "with_noop", "with_tollgate"];
        for (listener, port) in listeners.into_iter().zip(ports) {
            let out = Command::new(&o.wrk)
                .args(["-t1", &format!("-c{c}"), &format!("-d{}s", o.duration)])
                .args(["--latency", "-s"])
                .arg(&lua)
                .arg(format!("http://127.0.0.1:{port}/v1/messages"))
                .env("TOLLGATE_BENCH_KEYS", &keys_file)
                .output()
                .context("running wrk")?;
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            if !out.status.success() {
                bail!("wrk failed: {text}{}", String::from_utf8_lossy(&out.stderr));
            }
            let r = parse_wrk(listener, c, &text)?;
            println!(
                "{:<14} c={:<3} {:>8.0} req/s  p50 {:>7.1} µs  p90 {:>7.1} µs  p99 {:>7.1} µs  non-2xx {}",
                r.listener, c, r.rps, r.p50_us, r.p90_us, r.p99_us, r.non_2xx
            );
            ensure!(
                r.non_2xx == 0,
                "{listener}: {} responses were not 2xx",
                r.non_2xx
            );
            reports.push(r);
        }
        let [p, n, t] = &reports[reports.len() - 3..] else {
            bail!("three runs per connection count");
        };
        println!(
            "  at c={c}: Tollgate's ext_authz adds p50 {:+.1} µs, p99 {:+.1} µs (throughput {:.2} of plain); a no-op ext_authz adds p50 {:+.1} µs, p99 {:+.1} µs ({:.2})",
            t.p50_us - p.p50_us,
            t.p99_us - p.p99_us,
            t.rps / p.rps,
            n.p50_us - p.p50_us,
            n.p99_us - p.p99_us,
            n.rps / p.rps
        );
    }
    println!("{}", serde_json::to_string(&reports)?);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrk_latency_units_become_microseconds() {
        assert_eq!(micros("456.00us"), Some(456.0));
        assert_eq!(micros("1.25ms"), Some(1250.0));
        assert_eq!(micros("2.00s"), Some(2_000_000.0));
        assert_eq!(micros("fast"), None);
    }
}

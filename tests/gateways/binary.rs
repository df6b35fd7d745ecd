//! The real binary: `forward_auth.*` from the environment starts the
//! listener beside the gRPC port, with its gateway secret.

use std::io::{BufRead, BufReader, Read};

use super::*;

/// A child process killed (and reaped) on drop.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `tollgate dev` with a forward-auth listener and a gateway secret file:
/// the listener decides for the gateway that sends the secret, and the
/// secret appears in no log line.
#[tokio::test]
async fn the_binary_serves_forward_auth_from_its_settings_and_requires_the_secret() {
    let dir = std::env::temp_dir().join(format!("tollgate-fa-bin-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let secret_file = dir.join("gateway-secret");
    std::fs::write(&secret_file, format!("{GATEWAY_SECRET}\n")).unwrap();
    let mut child = Killed(
        std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .args(["dev", "--listen", "127.0.0.1:0"])
            .env_clear()
            .env("NO_COLOR", "1")
            .env("TOLLGATE_LOG_FORMAT", "json")
            .env("TOLLGATE_FORWARD_AUTH__LISTEN", "127.0.0.1:0")
            .env("TOLLGATE_FORWARD_AUTH__GATEWAY_SECRET_FILE", &secret_file)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start tollgate dev"),
    );
    let (tx, mut lines) = tokio::sync::mpsc::unbounded_channel();
    let stdout: Box<dyn Read + Send> = Box::new(child.0.stdout.take().unwrap());
    let stderr: Box<dyn Read + Send> = Box::new(child.0.stderr.take().unwrap());
    for pipe in [stdout, stderr] {
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
    }

    // The listener's log line (with its address), then the banner's key.
    let mut seen = Vec::new();
    let (mut addr, mut key): (Option<SocketAddr>, Option<String>) = (None, None);
    let read = async {
        while let Some(line) = lines.recv().await {
            if let Ok(v) = serde_json::from_str::<Value>(&line) {
                let fields = &v["fields"];
                if fields["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with("forward-auth"))
                {
                    addr = fields["addr"].as_str().and_then(|a| a.parse().ok());
                }
            }
            if let Some(k) = line.strip_prefix("export K=") {
                key = Some(k.to_owned());
            }
            seen.push(line);
            if addr.is_some() && key.is_some() {
                break;
            }
        }
    };
    // A bound on start-up (the binary is built already), not a signal.
    let _ = tokio::time::timeout(Duration::from_secs(60), read).await;
    let (Some(addr), Some(key)) = (addr, key) else {
        panic!(
            "no forward-auth listener or key; tollgate printed:\n{}",
            seen.join("\n")
        );
    };

    let path = "/auth/traefik?surface=public_api";
    let r = http(addr, "GET", path, &[("x-api-key", &key)]).await;
    assert_eq!(r.status, 401, "no secret: {r:?}");
    assert_eq!(r.json()["error"], "gateway_unauthenticated");
    let with_secret = [
        ("x-api-key", key.as_str()),
        ("x-tollgate-gateway-secret", GATEWAY_SECRET),
    ];
    let r = http(addr, "GET", path, &with_secret).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("x-tollgate-tenant-id"), "demo");
    let r = http(addr, "GET", "/healthz", &[]).await;
    assert_eq!(r.status, 200, "{r:?}");

    drop(child);
    while let Ok(line) = lines.try_recv() {
        seen.push(line);
    }
    assert!(
        seen.iter().all(|l| !l.contains(GATEWAY_SECRET)),
        "the gateway secret was logged:\n{}",
        seen.join("\n")
    );
    let _ = std::fs::remove_dir_all(&dir);
}

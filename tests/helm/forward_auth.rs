//! `forwardAuth`: the HTTP forward-auth listener for NGINX and Traefik, off
//! by default, and when on a port the gateways reach, guarded by a secret
//! from the chart's Secret.

use super::*;

const SECRET: &str = "test-forward-auth-secret-0123";

fn enabled(extra: &[&str]) -> Rendered {
    let secret = format!("secrets.forwardAuthSecret={SECRET}");
    let mut sets = vec!["forwardAuth.enabled=true", secret.as_str()];
    sets.extend_from_slice(extra);
    render(&[&minimal()], &sets)
}

fn container_port<'a>(c: &'a Value, name: &str) -> Option<&'a Value> {
    c["ports"].as_array()?.iter().find(|p| p["name"] == name)
}

fn service_port<'a>(svc: &'a Value, name: &str) -> Option<&'a Value> {
    svc["spec"]["ports"]
        .as_array()?
        .iter()
        .find(|p| p["name"] == name)
}

/// The ingress rules that open the port named `port`.
fn rules_opening<'a>(np: &'a Value, port: &str) -> Vec<&'a Value> {
    np["spec"]["ingress"]
        .as_array()
        .map(|rules| {
            rules
                .iter()
                .filter(|rule| ports_of(rule).contains(&format!("{port}/TCP")))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn forward_auth_is_off_by_default() {
    let r = render(&[&minimal()], &[]);
    let deploy = r.named("Deployment", FULLNAME);
    let c = container(deploy, "tollgate");
    assert!(container_port(c, "forward-auth").is_none());
    for var in [
        "TOLLGATE_FORWARD_AUTH__LISTEN",
        "TOLLGATE_FORWARD_AUTH__GATEWAY_SECRET_FILE",
        "TOLLGATE_FORWARD_AUTH__MAX_CONNECTIONS",
    ] {
        assert!(!has_env(c, var), "{var}");
    }
    let mentions: Vec<&str> = r
        .yaml
        .lines()
        .filter(|l| !l.trim_start().starts_with('#') && l.contains("forward-auth"))
        .collect();
    assert!(mentions.is_empty(), "{mentions:?}");
    assert!(service_port(r.named("Service", FULLNAME), "forward-auth").is_none());
    assert!(rules_opening(r.named("NetworkPolicy", FULLNAME), "forward-auth").is_empty());
    // A secret given while the listener is off is kept, not mounted.
    let r = render(
        &[&minimal()],
        &[&format!("secrets.forwardAuthSecret={SECRET}")],
    );
    let c = container(r.named("Deployment", FULLNAME), "tollgate");
    assert!(!has_env(c, "TOLLGATE_FORWARD_AUTH__GATEWAY_SECRET_FILE"));
    assert!(container_port(c, "forward-auth").is_none());
}

#[test]
fn enabled_forward_auth_opens_its_port_to_the_gateways_with_the_secret_as_a_file() {
    let r = enabled(&["forwardAuth.maxConnections=64"]);
    assert_valid_for_kubernetes(&r, KUBE_VERSION);
    let deploy = r.named("Deployment", FULLNAME);
    let c = container(deploy, "tollgate");
    assert_eq!(
        container_port(c, "forward-auth"),
        Some(&json!({"name": "forward-auth", "containerPort": 8081, "protocol": "TCP"}))
    );
    assert_eq!(
        env(c, "TOLLGATE_FORWARD_AUTH__LISTEN")["value"],
        "0.0.0.0:8081"
    );
    assert_eq!(
        env(c, "TOLLGATE_FORWARD_AUTH__MAX_CONNECTIONS")["value"],
        "64"
    );
    let path = s(&env(c, "TOLLGATE_FORWARD_AUTH__GATEWAY_SECRET_FILE")["value"]);
    let (kind, name, key) = file_source(&r, deploy, c, path);
    assert_eq!(
        (kind.as_str(), key.as_str()),
        ("Secret", "forward-auth-secret")
    );
    assert_eq!(name, FULLNAME, "the chart's credentials Secret");
    assert_eq!(r.data(&kind, &name, &key).as_deref(), Some(SECRET));

    assert_eq!(
        service_port(r.named("Service", FULLNAME), "forward-auth"),
        Some(
            &json!({"name": "forward-auth", "port": 8081, "targetPort": "forward-auth", "protocol": "TCP", "appProtocol": "http"})
        )
    );
    // The gateways' rule opens it, and no other (not the helm test Pod's).
    let np = r.named("NetworkPolicy", FULLNAME);
    let rules = rules_opening(np, "forward-auth");
    assert_eq!(rules.len(), 1, "{}", np["spec"]["ingress"]);
    assert_eq!(ports_of(rules[0]), ["grpc/TCP", "forward-auth/TCP"]);
    assert_eq!(
        rules[0]["from"],
        json!([{"namespaceSelector": {}, "podSelector": {"matchLabels": {"tollgate.io/client": "true"}}}])
    );
    // Nobody listed as a gateway = nobody reaches it.
    let closed = enabled(&["networkPolicy.gateways=null"]);
    assert!(rules_opening(closed.named("NetworkPolicy", FULLNAME), "forward-auth").is_empty());

    // Another port moves all three; maxConnections unset = Tollgate's default.
    let r = enabled(&["forwardAuth.port=8443"]);
    let c = container(r.named("Deployment", FULLNAME), "tollgate");
    assert_eq!(
        container_port(c, "forward-auth").unwrap()["containerPort"],
        8443
    );
    assert_eq!(
        env(c, "TOLLGATE_FORWARD_AUTH__LISTEN")["value"],
        "0.0.0.0:8443"
    );
    assert!(!has_env(c, "TOLLGATE_FORWARD_AUTH__MAX_CONNECTIONS"));
    assert_eq!(
        service_port(r.named("Service", FULLNAME), "forward-auth").unwrap()["port"],
        8443
    );
}

#[test]
fn the_secret_may_come_from_an_existing_secret_or_be_waived_explicitly() {
    let r = render(
        &[],
        &[
            "secrets.existingSecret=mine",
            "secrets.keys.forwardAuthSecret=fa",
            "secrets.existingSecretHolds.forwardAuthSecret=true",
            "forwardAuth.enabled=true",
        ],
    );
    let deploy = r.named("Deployment", FULLNAME);
    let c = container(deploy, "tollgate");
    let path = s(&env(c, "TOLLGATE_FORWARD_AUTH__GATEWAY_SECRET_FILE")["value"]);
    assert_eq!(
        file_source(&r, deploy, c, path),
        ("Secret".into(), "mine".into(), "fa".into())
    );

    let r = render(
        &[&minimal()],
        &[
            "forwardAuth.enabled=true",
            "forwardAuth.requireGatewaySecret=false",
        ],
    );
    let c = container(r.named("Deployment", FULLNAME), "tollgate");
    assert!(has_env(c, "TOLLGATE_FORWARD_AUTH__LISTEN"));
    assert!(!has_env(c, "TOLLGATE_FORWARD_AUTH__GATEWAY_SECRET_FILE"));
}

#[test]
fn forward_auth_without_a_gateway_secret_is_refused_with_a_message() {
    let minimal = minimal();
    for (values, sets) in [
        (vec![minimal.as_path()], vec!["forwardAuth.enabled=true"]),
        // An existing Secret not said to hold it.
        (
            vec![],
            vec!["forwardAuth.enabled=true", "secrets.existingSecret=mine"],
        ),
    ] {
        let err = template(&values, &sets).expect_err(&format!("{sets:?} rendered"));
        assert!(
            err.contains("forwardAuth.enabled needs a gateway secret")
                && err.contains("secrets.forwardAuthSecret")
                && err.contains("forwardAuth.requireGatewaySecret=false"),
            "{sets:?}:\n{err}"
        );
    }
}

/// The real binary, started with the rendered environment and files,
/// serves forward-auth on the rendered port and asks gateways for the
/// secret from the chart's Secret.
#[test]
fn the_real_binary_serves_forward_auth_on_the_rendered_port() {
    use std::io::{BufRead, Read, Write};
    // The chart's port must be the one the binary binds (0.0.0.0:<port>),
    // so this test takes a free one rather than relocating it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let r = enabled(&[
        &format!("forwardAuth.port={port}"),
        "forwardAuth.maxConnections=8",
    ]);
    let (mut cmd, root) = pod_command(&r, "Deployment", FULLNAME, "tollgate", &[]);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut pod = Pod(cmd.spawn().expect("the binary starts"));
    let mut stderr = std::io::BufReader::new(pod.0.stderr.take().unwrap());
    let mut logged = String::new();
    let listening = loop {
        let mut line = String::new();
        if stderr.read_line(&mut line).unwrap_or(0) == 0 {
            panic!("the binary ended without serving forward-auth:\n{logged}");
        }
        logged.push_str(&line);
        if line.contains("forward-auth") && line.contains("listening") {
            break line;
        }
    };
    assert!(
        listening.contains(&format!("0.0.0.0:{port}")),
        "{listening}"
    );
    // Keep draining its log so it never blocks on a full pipe.
    let drain = std::thread::spawn(move || {
        let mut rest = String::new();
        let _ = stderr.read_to_string(&mut rest);
        rest
    });
    let get = |path: &str, secret: Option<&str>| -> String {
        let mut conn = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        conn.set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        let header = secret
            .map(|s| format!("x-tollgate-gateway-secret: {s}\r\n"))
            .unwrap_or_default();
        write!(
            conn,
            "GET {path} HTTP/1.1\r\nhost: tollgate\r\n{header}connection: close\r\n\r\n"
        )
        .unwrap();
        let mut answer = String::new();
        conn.read_to_string(&mut answer).unwrap();
        answer
    };
    // Liveness answers without the secret.
    let health = get("/healthz", None);
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    // A decision without the mounted secret is refused...
    let anonymous = get("/auth/nginx?surface=public_api", None);
    assert!(
        anonymous.starts_with("HTTP/1.1 401") && anonymous.contains("gateway_unauthenticated"),
        "{anonymous}"
    );
    // ...and with it the request passes the gateway check to the policy
    // (here a malformed one: no surface).
    let gateway = get("/auth/nginx", Some(SECRET));
    assert!(
        gateway.starts_with("HTTP/1.1 500") && gateway.contains("invalid_route_policy"),
        "{gateway}"
    );
    drop(pod);
    let rest = drain.join().unwrap();
    assert!(
        !rest.contains(SECRET) && !logged.contains(SECRET),
        "{logged}{rest}"
    );
    let _ = std::fs::remove_dir_all(&root);
}

/// A child process killed when dropped, so a failed assertion stops it.
struct Pod(std::process::Child);

impl Drop for Pod {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

//! What the chart renders: objects Kubernetes accepts, locked down, wired to
//! each other, and the `helm test` hook.

use super::*;

#[test]
fn default_values_render_objects_kubernetes_accepts() {
    let r = render(&[&minimal()], &[]);
    assert_valid_for_kubernetes(&r, KUBE_VERSION);
    assert_eq!(
        r.index(),
        [
            "ConfigMap/auth-tollgate",
            "Deployment/auth-tollgate",
            "Job/auth-tollgate-migrate",
            "NetworkPolicy/auth-tollgate",
            "Pod/auth-tollgate-test",
            "PodDisruptionBudget/auth-tollgate",
            "Secret/auth-tollgate",
            "Secret/auth-tollgate-migrate",
            "Service/auth-tollgate",
            "ServiceAccount/auth-tollgate",
        ]
    );
}

#[test]
fn the_server_runs_locked_down_with_grpc_probes_on_the_grpc_port() {
    let r = render(&[&minimal()], &[]);
    let deploy = r.named("Deployment", FULLNAME);
    assert_locked_down(deploy);
    assert_eq!(deploy["spec"]["replicas"], 2);
    assert_eq!(
        deploy["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"],
        0
    );
    assert!(selects(&deploy["spec"]["selector"], pod_labels(deploy)));

    let c = container(deploy, "tollgate");
    assert_eq!(c["args"], json!(["serve"]));
    assert_eq!(c["image"], "tollgate:0.1.0");
    let port = |name: &str| {
        c["ports"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .unwrap_or_else(|| panic!("no container port {name}"))["containerPort"]
            .clone()
    };
    assert_eq!(port("grpc"), 50051);
    assert_eq!(port("metrics"), 9090);
    for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
        assert_eq!(
            c[probe]["grpc"]["port"],
            port("grpc"),
            "{probe} is a native gRPC probe on the gRPC port: {}",
            c[probe]
        );
        // Liveness asks the "liveness" health name, which stays SERVING
        // through a database outage; the others follow readiness.
        let service = if probe == "livenessProbe" {
            "liveness"
        } else {
            ""
        };
        assert_eq!(c[probe]["grpc"]["service"], service, "{probe}");
    }
    assert_eq!(env(c, "TOLLGATE_LISTEN")["value"], "0.0.0.0:50051");
    assert_eq!(env(c, "TOLLGATE_METRICS_LISTEN")["value"], "0.0.0.0:9090");
    assert_eq!(
        env(c, "TOLLGATE_DATABASE__MIGRATE_ON_START")["value"],
        "false"
    );
    // Connection workers: one per CPU unless set (0 is a setting too).
    assert!(!has_env(c, "TOLLGATE_CONNECTION_WORKERS"));
    for (workers, rendered) in [("0", "0"), ("3", "3")] {
        let set = format!("connectionWorkers={workers}");
        let r = render(&[&minimal()], &[&set]);
        let c = container(r.named("Deployment", FULLNAME), "tollgate");
        assert_eq!(env(c, "TOLLGATE_CONNECTION_WORKERS")["value"], rendered);
    }

    let spec = pod_spec(deploy);
    let sa = r.named("ServiceAccount", FULLNAME);
    assert_eq!(spec["serviceAccountName"], sa["metadata"]["name"]);
    assert_eq!(sa["automountServiceAccountToken"], false);
    for c in spec["topologySpreadConstraints"].as_array().unwrap() {
        assert!(selects(&c["labelSelector"], pod_labels(deploy)));
    }
    for key in ["checksum/config", "checksum/secret"] {
        let sum = deploy["spec"]["template"]["metadata"]["annotations"][key]
            .as_str()
            .unwrap_or_else(|| panic!("pod annotation {key}"));
        assert!(sum.len() == 64 && sum.chars().all(|c| c.is_ascii_hexdigit()));
    }
}

#[test]
fn secrets_reach_the_server_as_files_and_the_database_url_by_reference() {
    let r = render(&[&minimal()], &[]);
    let deploy = r.named("Deployment", FULLNAME);
    let c = container(deploy, "tollgate");

    let url = &env(c, "DATABASE_URL")["valueFrom"]["secretKeyRef"];
    assert!(env(c, "DATABASE_URL")["value"].is_null());
    assert_eq!(
        r.data("Secret", s(&url["name"]), s(&url["key"])).as_deref(),
        Some("postgres://tollgate:not-a-real-password@postgres:5432/tollgate")
    );
    for (var, secret_key, expected) in [
        (
            "TOLLGATE_PEPPER_FILE",
            "pepper",
            "0123456789abcdef0123456789abcdef-test-only",
        ),
        (
            "TOLLGATE_OPERATOR_TOKEN_FILE",
            "operator-token",
            "test-operator-token-0123456789",
        ),
    ] {
        let path = s(&env(c, var)["value"]);
        let (kind, name, key) = file_source(&r, deploy, c, path);
        assert_eq!(
            (kind.as_str(), key.as_str()),
            ("Secret", secret_key),
            "{var}"
        );
        assert_eq!(
            r.data(&kind, &name, &key).as_deref(),
            Some(expected),
            "{var}"
        );
    }
    let (kind, name, key) = file_source(&r, deploy, c, s(&env(c, "TOLLGATE_CONFIG")["value"]));
    assert_eq!((kind.as_str(), key.as_str()), ("ConfigMap", "config.toml"));
    let config = r.data(&kind, &name, &key).unwrap();
    assert!(!config.contains("test-only"), "no secret in the ConfigMap");
    // The optional callers are not configured unless asked for.
    assert!(!has_env(c, "TOLLGATE_GATEWAY_TOKEN_FILE"));
    assert!(!config.contains("gateway_token"));

    // The gateway and console backend tokens: files from the Secret too.
    let gateway = "test-gateway-token-0123456789";
    let console = "test-console-backend-token-0123";
    let r = render(
        &[&minimal()],
        &[
            &format!("secrets.gatewayToken={gateway}"),
            &format!("secrets.consoleBackendToken={console}"),
        ],
    );
    let deploy = r.named("Deployment", FULLNAME);
    let c = container(deploy, "tollgate");
    for (var, expected) in [
        ("TOLLGATE_GATEWAY_TOKEN_FILE", gateway),
        ("TOLLGATE_CONSOLE_BACKEND_TOKEN_FILE", console),
    ] {
        let (kind, name, key) = file_source(&r, deploy, c, s(&env(c, var)["value"]));
        assert_eq!(kind, "Secret", "{var}");
        assert_eq!(
            r.data(&kind, &name, &key).as_deref(),
            Some(expected),
            "{var}"
        );
    }
    let stderr = run_as_the_pod(&r, "Deployment", FULLNAME, "tollgate", &[]);
    assert!(
        stderr.contains("tollgate listening") && !stderr.contains(gateway),
        "the binary refused the tokens:\n{stderr}"
    );
    // From an existing Secret: only the tokens it is said to hold.
    let r = render(&[&all_options()], &[]);
    let c = container(r.named("Deployment", "tollgate-all"), "tollgate");
    assert!(has_env(c, "TOLLGATE_GATEWAY_TOKEN_FILE"));
    assert!(!has_env(c, "TOLLGATE_CONSOLE_BACKEND_TOKEN_FILE"));
    for m in c["volumeMounts"].as_array().unwrap() {
        assert!(
            m["mountPath"] == "/tmp" || m["readOnly"] == true,
            "writable mount {m}"
        );
    }
}

#[test]
fn migrations_run_in_a_locked_down_pre_install_and_pre_upgrade_hook() {
    let r = render(&[&minimal()], &[]);
    let job = r.named("Job", &format!("{FULLNAME}-migrate"));
    assert_eq!(annotation(job, "helm.sh/hook"), "pre-install,pre-upgrade");
    let policy = annotation(job, "helm.sh/hook-delete-policy");
    assert!(policy.contains("before-hook-creation") && policy.contains("hook-succeeded"));
    assert_locked_down(job);
    let spec = pod_spec(job);
    assert_eq!(spec["restartPolicy"], "Never");
    // The chart's ServiceAccount does not exist yet when a pre-install hook runs.
    assert!(spec["serviceAccountName"].is_null());
    let c = container(job, "migrate");
    assert_eq!(c["args"], json!(["migrate"]));

    // Nor does the chart's Secret: the URL comes from an earlier hook Secret.
    let url = &env(c, "DATABASE_URL")["valueFrom"]["secretKeyRef"];
    let secret = r.named("Secret", s(&url["name"]));
    assert_eq!(
        annotation(secret, "helm.sh/hook"),
        "pre-install,pre-upgrade"
    );
    let weight = |o: &Value| annotation(o, "helm.sh/hook-weight").parse::<i32>().unwrap();
    assert!(weight(secret) < weight(job), "the Secret is created first");
    assert!(r.data("Secret", s(&url["name"]), s(&url["key"])).is_some());
    assert!(r.data("Secret", s(&url["name"]), "pepper").is_none());
}

#[test]
fn the_service_and_network_policy_expose_only_grpc_and_metrics() {
    let r = render(&[&minimal()], &[]);
    let deploy = r.named("Deployment", FULLNAME);
    let job = r.named("Job", &format!("{FULLNAME}-migrate"));

    let svc = r.named("Service", FULLNAME);
    let sel = json!({ "matchLabels": svc["spec"]["selector"] });
    assert!(selects(&sel, pod_labels(deploy)) && !selects(&sel, pod_labels(job)));
    let ports = svc["spec"]["ports"].as_array().unwrap();
    assert_eq!(ports.len(), 2);
    assert_eq!(
        ports[0],
        json!({"name": "grpc", "port": 50051, "targetPort": "grpc", "protocol": "TCP", "appProtocol": "grpc"})
    );
    assert_eq!(ports[1]["name"], "metrics");
    assert_eq!(ports[1]["port"], 9090);

    let np = r.named("NetworkPolicy", FULLNAME);
    assert!(selects(&np["spec"]["podSelector"], pod_labels(deploy)));
    assert!(selects(&np["spec"]["podSelector"], pod_labels(job)));
    assert_eq!(np["spec"]["policyTypes"], json!(["Ingress", "Egress"]));
    let ingress = np["spec"]["ingress"].as_array().unwrap();
    assert_eq!(ingress.len(), 3);
    for rule in ingress {
        // A rule without `from` would admit every pod.
        assert!(
            rule["from"].as_array().is_some_and(|f| !f.is_empty()),
            "{rule}"
        );
    }
    assert_eq!(ports_of(&ingress[0]), ["grpc/TCP"]);
    assert_eq!(
        ingress[0]["from"][0]["podSelector"]["matchLabels"],
        json!({"tollgate.io/client": "true"})
    );
    assert_eq!(ports_of(&ingress[1]), ["metrics/TCP"]);
    // The helm test Pod reaches the gRPC port, and only it.
    let test_pod = r.named("Pod", &format!("{FULLNAME}-test"));
    assert_eq!(ports_of(&ingress[2]), ["grpc/TCP"]);
    assert!(selects(
        &ingress[2]["from"][0]["podSelector"],
        &test_pod["metadata"]["labels"]
    ));
    assert!(!selects(
        &ingress[2]["from"][0]["podSelector"],
        pod_labels(deploy)
    ));
    assert!(!selects(
        &np["spec"]["podSelector"],
        &test_pod["metadata"]["labels"]
    ));
    let egress: Vec<String> = np["spec"]["egress"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(ports_of)
        .collect();
    assert_eq!(egress, ["53/UDP", "53/TCP", "5432/TCP"]);

    let pdb = r.named("PodDisruptionBudget", FULLNAME);
    assert!(selects(&pdb["spec"]["selector"], pod_labels(deploy)));
    assert!(!selects(&pdb["spec"]["selector"], pod_labels(job)));
    assert_eq!(pdb["spec"]["maxUnavailable"], 1);

    // Nobody listed = nobody admitted (not everybody).
    let closed = render(
        &[&minimal()],
        &[
            "networkPolicy.gateways=null",
            "networkPolicy.prometheus=null",
            "test.enabled=false",
        ],
    );
    let np = closed.named("NetworkPolicy", FULLNAME);
    assert!(np["spec"]["ingress"]
        .as_array()
        .is_none_or(|i| i.is_empty()));
}

#[test]
fn every_option_renders_objects_kubernetes_accepts() {
    let r = render(&[&all_options()], &[]);
    assert_valid_for_kubernetes(&r, KUBE_VERSION);
    let name = "tollgate-all";
    assert_eq!(
        r.index(),
        [
            "ConfigMap/tollgate-all",
            "Deployment/tollgate-all",
            "HorizontalPodAutoscaler/tollgate-all",
            "Job/tollgate-all-migrate",
            "NetworkPolicy/tollgate-all",
            "Pod/tollgate-all-test",
            "PodDisruptionBudget/tollgate-all",
            "Secret/tollgate-all-config",
            "Service/tollgate-all",
            "Service/tollgate-all-headless",
            "ServiceMonitor/tollgate-all",
        ]
    );
    let deploy = r.named("Deployment", name);
    assert_locked_down(deploy);
    assert!(
        deploy["spec"]["replicas"].is_null(),
        "the HPA owns replicas"
    );
    let hpa = &r.named("HorizontalPodAutoscaler", name)["spec"];
    assert_eq!(hpa["scaleTargetRef"]["name"], name);
    assert_eq!(
        (hpa["minReplicas"].clone(), hpa["maxReplicas"].clone()),
        (json!(3), json!(12))
    );
    assert_eq!(hpa["metrics"].as_array().unwrap().len(), 2);
    assert_eq!(
        r.named("PodDisruptionBudget", name)["spec"]["minAvailable"],
        "50%"
    );

    let spec = pod_spec(deploy);
    assert_eq!(spec["serviceAccountName"], "tollgate-existing");
    assert_eq!(spec["priorityClassName"], "tollgate-critical");
    assert_eq!(spec["topologySpreadConstraints"][0]["minDomains"], 3);
    let c = container(deploy, "tollgate");
    assert_eq!(
        c["image"],
        "registry.example.com/platform/tollgate@sha256:0000000000000000000000000000000000000000000000000000000000000000"
    );
    assert_eq!(env(c, "TOLLGATE_LISTEN")["value"], "0.0.0.0:50052");
    assert_eq!(env(c, "RUST_BACKTRACE")["value"], "1");
    assert_eq!(c["lifecycle"]["preStop"]["sleep"]["seconds"], 5);
    assert_eq!(c["startupProbe"]["tcpSocket"]["port"], "grpc");
    assert!(c["livenessProbe"].is_null());

    // The existing Secret, with its own key names.
    let url = &env(c, "DATABASE_URL")["valueFrom"]["secretKeyRef"];
    assert_eq!(
        (s(&url["name"]), s(&url["key"])),
        ("tollgate-credentials", "uri")
    );
    let pepper = file_source(&r, deploy, c, s(&env(c, "TOLLGATE_PEPPER_FILE")["value"]));
    assert_eq!(
        pepper,
        (
            "Secret".into(),
            "tollgate-credentials".into(),
            "pepper-v2".into()
        )
    );
    let job = r.named("Job", &format!("{name}-migrate"));
    let job_url = &env(container(job, "migrate"), "DATABASE_URL")["valueFrom"]["secretKeyRef"];
    assert_eq!(job_url, url);
    assert_eq!(pod_spec(job)["serviceAccountName"], "tollgate-existing");

    // Previous peppers are secrets: config.toml moves into a Secret.
    let config = file_source(&r, deploy, c, s(&env(c, "TOLLGATE_CONFIG")["value"]));
    assert_eq!(
        config,
        (
            "Secret".into(),
            format!("{name}-config"),
            "config.toml".into()
        )
    );
    assert!(r.data("ConfigMap", name, "config.toml").is_none());
    let profile = file_source(&r, deploy, c, "/etc/tollgate/config/profile.toml");
    assert_eq!(profile.0, "ConfigMap");

    // TLS and signing keys from their Secrets.
    for (var, file) in [
        ("TOLLGATE_TLS__CERT_FILE", "tls.crt"),
        ("TOLLGATE_TLS__KEY_FILE", "tls.key"),
        ("TOLLGATE_TLS__CLIENT_CA_FILE", "ca.crt"),
    ] {
        let source = file_source(&r, deploy, c, s(&env(c, var)["value"]));
        assert_eq!(
            source,
            ("Secret".into(), "tollgate-grpc-tls".into(), file.into())
        );
    }
    let jwt = file_source(&r, deploy, c, "/etc/tollgate/jwt/signing.pem");
    assert_eq!(jwt.1, "tollgate-jwt-keys");

    let np = &r.named("NetworkPolicy", name)["spec"];
    assert_eq!(
        np["ingress"][0]["from"][0]["namespaceSelector"]["matchLabels"]
            ["kubernetes.io/metadata.name"],
        "envoy-gateway-system"
    );
    assert!(np["egress"][0]["to"].is_null(), "dns.to: [] = anywhere");
    assert_eq!(np["egress"][1]["ports"][0]["port"], 6432);
    assert_eq!(np["egress"][1]["to"][0]["ipBlock"]["cidr"], "10.20.0.0/16");
    assert_eq!(np["egress"][2]["ports"][0]["port"], 443);

    let sm = r.named("ServiceMonitor", name);
    assert_eq!(sm["metadata"]["labels"]["release"], "kube-prometheus-stack");
    assert_eq!(sm["spec"]["endpoints"][0]["interval"], "15s");
    let headless = &r.named("Service", &format!("{name}-headless"))["spec"];
    assert_eq!(headless["clusterIP"], "None");
    assert_eq!(headless["ports"][0]["port"], 50052);
}

#[test]
fn inline_tls_gets_a_tls_secret_and_a_tls_probe_validates_on_kubernetes_1_37() {
    let tls = [
        "tls.enabled=true",
        "tls.cert=CERT",
        "tls.key=KEY",
        "probes.grpcMode=TLS",
    ];
    let r = render(&[&minimal()], &tls);
    let secret = r.named("Secret", &format!("{FULLNAME}-tls"));
    assert_eq!(secret["type"], "kubernetes.io/tls");
    assert_eq!(
        r.data("Secret", &format!("{FULLNAME}-tls"), "tls.key")
            .as_deref(),
        Some("KEY")
    );
    let c = container(r.named("Deployment", FULLNAME), "tollgate");
    assert_eq!(c["readinessProbe"]["grpc"]["mode"], "TLS");
    assert!(!has_env(c, "TOLLGATE_TLS__CLIENT_CA_FILE"));
    // GRPCAction.mode is new in Kubernetes 1.37.
    assert_valid_for_kubernetes(&r, "1.37.0");
}

#[test]
fn the_shipped_profiles_are_the_repositorys_and_render_verbatim() {
    let repo_profiles = Path::new(env!("CARGO_MANIFEST_DIR")).join("profiles");
    let mut names: Vec<String> = std::fs::read_dir(&repo_profiles)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let mut expected: Vec<String> = SHIPPED_PROFILES
        .iter()
        .map(|p| format!("{p}.toml"))
        .collect();
    expected.sort();
    assert_eq!(
        names, expected,
        "profiles/ and the chart's list differ: update both"
    );
    for profile in SHIPPED_PROFILES {
        let file = format!("{profile}.toml");
        let original = std::fs::read_to_string(repo_profiles.join(&file)).unwrap();
        let copy = std::fs::read_to_string(chart_file(&format!("profiles/{file}")))
            .unwrap_or_else(|e| panic!("helm/tollgate/profiles/{file}: {e}"));
        assert_eq!(
            copy, original,
            "helm/tollgate/profiles/{file} differs from profiles/{file}: copy it again"
        );
        let r = render(&[&minimal()], &[&format!("profile.name={profile}")]);
        let rendered = r.data("ConfigMap", FULLNAME, "profile.toml").unwrap();
        assert_eq!(rendered.trim_end(), original.trim_end(), "{profile}");
    }
}

#[test]
fn the_notes_tell_the_operator_how_to_reach_and_check_it() {
    // helm template leaves NOTES.txt out: render it through a ConfigMap in a copy.
    let copy = temp_dir("chart").join("tollgate");
    copy_dir(&chart(), &copy);
    std::fs::write(
        copy.join("templates/zz-notes.yaml"),
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: notes\ndata:\n  notes: {{ include \"tollgate/templates/NOTES.txt\" . | toJson }}\n",
    )
    .unwrap();
    let values = minimal().display().to_string();
    let yaml = template_chart(
        &copy,
        &[
            "--values",
            &values,
            "--show-only",
            "templates/zz-notes.yaml",
        ],
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let notes = Rendered::parse(yaml).docs[0]["data"]["notes"]
        .as_str()
        .unwrap()
        .to_owned();
    for needle in [
        "kubectl -n auth port-forward service/auth-tollgate 50051:50051",
        "grpcurl -plaintext localhost:50051 grpc.health.v1.Health/Check",
        "auth-tollgate.auth.svc:50051",
        "kubectl -n auth logs job/auth-tollgate-migrate",
        "tollgate.io/client: \"true\"",
    ] {
        assert!(
            notes.contains(needle),
            "NOTES.txt lacks {needle:?}:\n{notes}"
        );
    }
    let _ = std::fs::remove_dir_all(copy.parent().unwrap());
}

#[test]
fn the_envoy_gateway_example_admits_envoy_and_points_at_the_service() {
    let values = chart_file("examples/envoy-gateway-values.yaml");
    let out = run(
        tool("helm")
            .args(["template", "tollgate"])
            .arg(chart())
            .args([
                "--namespace",
                "tollgate",
                "--kube-version",
                KUBE_VERSION,
                "--values",
            ])
            .arg(&values),
        None,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let r = Rendered::parse(text(&out.stdout));
    assert_valid_for_kubernetes(&r, KUBE_VERSION);
    let svc = r.named("Service", "tollgate");
    let deploy = r.named("Deployment", "tollgate");
    let envoy_pod = json!({
        "app.kubernetes.io/name": "envoy",
        "app.kubernetes.io/component": "proxy",
        "app.kubernetes.io/managed-by": "envoy-gateway",
    });
    let np = &r.named("NetworkPolicy", "tollgate")["spec"];
    assert!(selects(
        &np["ingress"][0]["from"][0]["podSelector"],
        &envoy_pod
    ));
    assert_eq!(ports_of(&np["ingress"][0]), ["grpc/TCP"]);

    let policy_yaml =
        std::fs::read_to_string(chart_file("examples/envoy-gateway-securitypolicy.yaml")).unwrap();
    let policy = Rendered::parse(policy_yaml);
    let sp = policy.all("SecurityPolicy")[0];
    let backend = &sp["spec"]["extAuth"]["grpc"]["backendRefs"][0];
    assert_eq!(backend["name"], svc["metadata"]["name"]);
    assert_eq!(backend["namespace"], svc["metadata"]["namespace"]);
    assert_eq!(backend["port"], svc["spec"]["ports"][0]["port"]);
    let grant = policy.all("ReferenceGrant")[0];
    assert_eq!(grant["metadata"]["namespace"], svc["metadata"]["namespace"]);
    assert_eq!(
        grant["spec"]["from"][0]["namespace"],
        sp["metadata"]["namespace"]
    );
    assert!(deploy["spec"]["replicas"].is_null(), "autoscaled");

    let envoy = std::fs::read_to_string(chart_file("examples/envoy-ext-authz.yaml")).unwrap();
    let envoy = Rendered::parse(envoy);
    let cluster = &envoy.docs[0]["static_resources"]["clusters"][0];
    let address = &cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
        ["address"]["socket_address"];
    assert_eq!(
        address["address"],
        "tollgate-headless.tollgate.svc.cluster.local"
    );
    assert_eq!(address["port_value"], 50051);
    assert_eq!(
        envoy.docs[0]["http_filters"][0]["typed_config"]["grpc_service"]["envoy_grpc"]
            ["cluster_name"],
        cluster["name"]
    );
}

/// `helm test` had nothing to run. The hook Pod runs the chart's own image
/// (`tollgate health`) against the Service from inside the cluster, locked
/// down like the server; its arguments, run by the real binary, pass against
/// a serving Tollgate and fail once nothing serves.
#[test]
fn helm_test_checks_grpc_health_through_the_service_with_the_chart_image() {
    let r = render(&[&minimal()], &[]);
    let pod = r.named("Pod", &format!("{FULLNAME}-test"));
    assert_eq!(annotation(pod, "helm.sh/hook"), "test");
    assert_eq!(pod["spec"]["restartPolicy"], "Never");
    // Locked down like the server (assert_locked_down reads a pod template).
    assert_locked_down(&json!({"metadata": pod["metadata"], "spec": {"template": pod}}));
    let deploy = r.named("Deployment", FULLNAME);
    let c = &pod["spec"]["containers"][0];
    assert_eq!(c["image"], container(deploy, "tollgate")["image"]);
    let args: Vec<&str> = c["args"].as_array().unwrap().iter().map(s).collect();
    let service = format!("{FULLNAME}.{NAMESPACE}.svc:50051");
    assert_eq!(args, ["health", "--addr", service.as_str()]);

    // The same arguments against a real server, its address in place of the Service's.
    let mut dev = Command::new(env!("CARGO_BIN_EXE_tollgate"));
    dev.args(["dev", "--listen", "127.0.0.1:0"])
        .env_clear()
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut dev = dev.spawn().unwrap();
    let (tx, lines) = std::sync::mpsc::channel();
    let out = dev.stdout.take().unwrap();
    std::thread::spawn(move || {
        use std::io::BufRead;
        // Read to the end: a closed pipe would fail dev's next write.
        for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let addr = loop {
        let line = lines
            .recv_timeout(std::time::Duration::from_secs(60))
            .expect("dev prints its address within a minute");
        if let Some(addr) = line.strip_prefix("export A=") {
            break addr.to_owned();
        }
    };
    let check = |addr: &str| {
        let mut args = args.clone();
        args[2] = addr;
        run(
            Command::new(env!("CARGO_BIN_EXE_tollgate"))
                .args(&args)
                .env_clear(),
            None,
        )
    };
    let out = check(&addr);
    assert!(
        out.status.success() && text(&out.stdout).trim() == "SERVING",
        "{}{} (dev: {:?})",
        text(&out.stdout),
        text(&out.stderr),
        dev.try_wait()
    );
    let _ = dev.kill();
    let _ = dev.wait();
    let out = check(&addr);
    assert!(!out.status.success(), "nothing serves: the test must fail");
    assert!(
        text(&out.stderr).contains("cannot reach"),
        "{}",
        text(&out.stderr)
    );

    // With mutual TLS it verifies the server and presents a certificate.
    let r = render(&[&all_options()], &[]);
    let pod = r.named("Pod", "tollgate-all-test");
    let args: Vec<&str> = pod["spec"]["containers"][0]["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(s)
        .collect();
    assert_eq!(
        args,
        [
            "health",
            "--addr",
            "tollgate-all.auth.svc:443",
            "--ca-file",
            "/etc/tollgate/tls/ca.crt",
            "--cert-file",
            "/etc/tollgate/tls/tls.crt",
            "--key-file",
            "/etc/tollgate/tls/tls.key"
        ]
    );
    assert_eq!(
        pod["spec"]["volumes"][0]["secret"]["secretName"],
        "tollgate-grpc-tls"
    );

    let off = render(&[&minimal()], &["test.enabled=false"]);
    assert!(off.find("Pod", &format!("{FULLNAME}-test")).is_none());
}

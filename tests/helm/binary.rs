//! The rendered configuration handed to the real `tollgate` binary, run as the pod
//! would run it.

use super::*;

#[test]
fn the_rendered_configuration_starts_the_real_binary() {
    // With connection workers set, so the binary reads that variable too.
    let r = render(&[&minimal()], &["connectionWorkers=2"]);
    for (kind, name, container_name) in [
        ("Deployment", FULLNAME.to_owned(), "tollgate"),
        ("Job", format!("{FULLNAME}-migrate"), "migrate"),
    ] {
        let stderr = run_as_the_pod(&r, kind, &name, container_name, &[]);
        assert!(
            (stderr.contains("cannot connect to Postgres")
                || stderr.contains("tollgate listening"))
                && !stderr.contains("configuration")
                && !stderr.contains("no operator token configured"),
            "{kind} {name}: the binary refused the chart's configuration:\n{stderr}"
        );
    }
}

#[test]
fn the_deployment_environment_alone_configures_the_binary() {
    // The chart also writes listen, pepper_file and operator_token_file into
    // config.toml; without that file the TOLLGATE_* variables must suffice.
    let r = render(&[&minimal()], &[]);
    let stderr = run_as_the_pod(&r, "Deployment", FULLNAME, "tollgate", &["TOLLGATE_CONFIG"]);
    assert!(
        (stderr.contains("cannot connect to Postgres") || stderr.contains("tollgate listening"))
            && !stderr.contains("configuration")
            && !stderr.contains("no operator token configured"),
        "TOLLGATE_PEPPER_FILE / TOLLGATE_OPERATOR_TOKEN_FILE were not honoured:\n{stderr}"
    );
}

#[test]
fn every_option_yields_a_configuration_tollgate_accepts() {
    let r = render(&[&all_options()], &[]);
    let dir = temp_dir("config");
    let config = r
        .data("Secret", "tollgate-all-config", "config.toml")
        .unwrap();
    assert!(config.contains("[[previous_peppers]]"));
    let config_path = dir.join("config.toml");
    std::fs::write(&config_path, &config).unwrap();
    let mut settings = Settings::load(Some(&config_path), &FlagOverrides::default())
        .unwrap_or_else(|e| panic!("{e}\n{config}"));
    settings.validate().unwrap();
    assert_eq!(settings.log_format, LogFormat::Text);
    assert_eq!(settings.log_level, "tollgate=debug,info");
    assert_eq!(settings.cache.max_keys, 2_000_000);
    assert_eq!(settings.cache.unknown_lookups_per_second, 250);
    assert_eq!(settings.database.max_connections, 32);
    assert_eq!(settings.max_connections, 2048);
    assert!(!settings.database.migrate_on_start);
    // Settings added after the chart was written reach the binary too.
    assert_eq!(settings.database.statement_timeout_ms, 2500);
    assert_eq!(settings.database.change_retention_seconds, 172_800);
    assert_eq!(settings.cache.max_staleness_seconds, 30);
    assert_eq!(settings.cache.lookup_batch_max, 64);
    assert_eq!(settings.cache.lookup_batches_in_flight, 2);
    assert_eq!(settings.shutdown_grace_seconds, 25);
    assert_eq!(settings.management.max_in_flight, 16);
    assert_eq!(settings.management.timeout_ms, 5000);
    assert_eq!(settings.envoy.header_prefix, "x-auth-");
    assert_eq!(
        settings.otlp().unwrap(),
        Some((
            "http://otel-collector.monitoring:4317",
            tollgate::telemetry::OtlpProtocol::Grpc
        ))
    );
    assert_eq!(
        settings.jwt.console.signup,
        Some(tollgate::console::SignupPolicy::Open)
    );
    assert!(settings.jwt.console.require_verified_email);
    assert_eq!(settings.replicas.heartbeat_interval_ms, 2000);
    assert_eq!(settings.replicas.heartbeat_expiry_seconds, 9);
    assert_eq!(settings.rate_shares.exchange_interval_ms, 500);
    assert_eq!(settings.rate_shares.max_cells, 5000);
    // Trusted issuers, nested values (a tenant map) included, reach the
    // binary as [[jwt.issuers]] tables after extraToml.
    let issuers: Vec<_> = settings
        .jwt
        .issuers
        .iter()
        .map(|i| (i.issuer.as_str(), i.audiences.clone(), i.leeway_seconds))
        .collect();
    assert_eq!(
        issuers,
        [
            (
                "https://auth.example.com/",
                vec!["msgflash-dashboard".to_string()],
                10
            ),
            ("partner", vec!["partner-console".to_string()], 30),
        ]
    );
    assert_eq!(settings.jwt.issuers[0].algorithms, ["RS256", "ES256"]);
    assert!(
        format!("{:?}", settings.jwt.issuers[1].tenants).contains("globex"),
        "{:?}",
        settings.jwt.issuers[1].tenants
    );
    assert_eq!(
        settings.profile.as_deref(),
        Some(Path::new("/etc/tollgate/config/profile.toml"))
    );

    let profile_path = dir.join("profile.toml");
    std::fs::write(
        &profile_path,
        r.data("ConfigMap", "tollgate-all", "profile.toml").unwrap(),
    )
    .unwrap();
    settings.profile = Some(profile_path);
    assert_eq!(settings.load_profile().unwrap().name, "custom");

    assert_eq!(
        settings.pepper_file.as_deref(),
        Some(Path::new("/etc/tollgate/secrets/pepper"))
    );
    let pepper_path = dir.join("pepper");
    std::fs::write(&pepper_path, "current-pepper-0123456789abcdef-test").unwrap();
    settings.pepper_file = Some(pepper_path);
    let peppers = settings.load_peppers().unwrap();
    let versions: Vec<i32> = peppers.all().map(|p| p.version()).collect();
    assert_eq!(versions, [2, 1]);
    let _ = std::fs::remove_dir_all(&dir);

    // Then the real binary, run as the pod runs it: every mounted file,
    // the environment, the args; the Secrets and ConfigMap the values name
    // as existing are supplied as the cluster would hold them.
    let tls = tls_secret();
    let signing = ed25519_pem();
    let cluster = r
        .with_existing(
            "Secret",
            "tollgate-credentials",
            &[
                ("uri", "postgres://tollgate@127.0.0.1:1/tollgate"),
                ("pepper-v2", "current-pepper-0123456789abcdef-test"),
                ("operator", "an-operator-token-of-32-characters-x"),
                // existingSecretHolds.gatewayToken: the gateway token too.
                ("gateway", "a-gateway-token-of-32-characters-xyz"),
            ],
        )
        .with_existing(
            "Secret",
            "tollgate-jwt-keys",
            &[("console-1.pem", &signing)],
        )
        .with_existing("ConfigMap", "corporate-ca", &[("ca.crt", &tls.ca)]);
    let with_tls = |key: &str| {
        cluster.clone().with_existing(
            "Secret",
            "tollgate-grpc-tls",
            &[
                ("tls.crt", &tls.cert),
                ("tls.key", key),
                ("ca.crt", &tls.ca),
            ],
        )
    };
    let r = with_tls(&tls.key);
    let stderr = run_as_the_pod(&r, "Deployment", "tollgate-all", "tollgate", &[]);
    let listening = stderr
        .lines()
        .find(|l| l.contains("tollgate listening"))
        .unwrap_or_else(|| panic!("the binary refused the all-options configuration:\n{stderr}"));
    // Text logs (config.logFormat), the custom profile (profile.custom),
    // metrics on (metrics.enabled).
    assert!(!listening.starts_with('{'), "{listening}");
    assert!(listening.contains("profile=custom"), "{listening}");
    assert!(stderr.contains("metrics on /metrics"), "{stderr}");
    assert!(
        !stderr.contains("configuration") && !stderr.contains("no operator token configured"),
        "{stderr}"
    );
    // TLS is on (tls.enabled, from the existing Secret): a key that is not
    // one stops the start, naming the file.
    let stderr = run_as_the_pod(
        &with_tls("not a key"),
        "Deployment",
        "tollgate-all",
        "tollgate",
        &[],
    );
    assert!(
        !stderr.contains("tollgate listening") && stderr.contains("tls.key"),
        "{stderr}"
    );
    let stderr = run_as_the_pod(&r, "Job", "tollgate-all-migrate", "migrate", &[]);
    assert!(
        stderr.contains("cannot connect to Postgres") && !stderr.contains("configuration"),
        "{stderr}"
    );
}

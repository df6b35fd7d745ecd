//! The chart passes `helm lint`, chart-testing's checks and its own schema, and its
//! README's values table is generated from `values.yaml`.

use super::*;

/// chart-testing's values files: `ct lint` lints once with each.
fn ci_values() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(chart_file("ci"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with("-values.yaml"))
        .collect();
    files.sort();
    files
}

#[test]
fn the_chart_lints_with_its_ci_values() {
    let files = ci_values();
    assert!(files.contains(&minimal()) && files.contains(&all_options()));
    for values in files {
        let out = run(
            tool("helm")
                .args(["lint", "--strict", "--kube-version", KUBE_VERSION])
                .arg(chart())
                .arg("--values")
                .arg(&values),
            None,
        );
        assert!(
            out.status.success(),
            "helm lint {}:\n{}{}",
            values.display(),
            text(&out.stdout),
            text(&out.stderr)
        );
    }
}

/// `helm lint helm/tollgate` failed on the chart's own defaults (the schema
/// required the secrets). It passes now, and says what an install needs;
/// rendering without secrets still stops with that message.
#[test]
fn the_chart_lints_with_its_own_defaults_and_says_what_an_install_needs() {
    let out = run(
        tool("helm")
            .args(["lint", "--strict", "--kube-version", KUBE_VERSION])
            .arg(chart()),
        None,
    );
    let said = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "helm lint helm/tollgate:\n{said}");
    let needs = "secrets: set secrets.databaseUrl, secrets.pepper and secrets.operatorToken, \
                 or secrets.existingSecret";
    assert!(said.contains(needs), "{said}");
    let err = template(&[], &[]).expect_err("no secrets at all");
    assert!(
        err.contains(needs) && err.contains("ci/minimal-values.yaml"),
        "{err}"
    );
    assert!(
        !err.contains("values don't meet the specifications"),
        "{err}"
    );
}

#[test]
fn bad_values_are_refused_by_the_schema() {
    for (values, complaint) in [
        ("replicaCount: -1\n", "/replicaCount"),
        ("replicaCount: two\n", "/replicaCount"),
        ("config:\n  logFormat: yaml\n", "/config/logFormat"),
        (
            "replicas: 3\n",
            "additional properties 'replicas' not allowed",
        ),
        (
            "config:\n  cache:\n    ttl: 5\n",
            "additional properties 'ttl' not allowed",
        ),
        ("image:\n  tag: 1.2\n", "/image/tag"),
        ("service:\n  grpcPort: 70000\n", "/service/grpcPort"),
        (
            "probes:\n  liveness:\n    type: exec\n",
            "/probes/liveness/type",
        ),
        (
            "networkPolicy:\n  gateways: everyone\n",
            "/networkPolicy/gateways",
        ),
        ("secrets:\n  pepper: too-short\n", "/secrets/pepper"),
        (
            "secrets:\n  databaseUrl: mysql://db/tollgate\n",
            "/secrets/databaseUrl",
        ),
        (
            "podDisruptionBudget:\n  maxUnavailable: lots\n",
            "/podDisruptionBudget/maxUnavailable",
        ),
        ("profile:\n  name: nosuchproduct\n", "/profile/name"),
        (
            "metrics:\n  serviceMonitor:\n    interval: often\n",
            "/metrics/serviceMonitor/interval",
        ),
        ("tls:\n  enabled: true\n", "/tls/cert"),
        // An inline HMAC secret would sit in a ConfigMap: only secret_file.
        (
            "config:\n  jwt:\n    issuers:\n      - {issuer: i, audiences: [a], tenants: all, secret: s}\n",
            "additional properties 'secret' not allowed",
        ),
        (
            "config:\n  jwt:\n    issuers:\n      - {issuer: i, audiences: [a]}\n",
            "/config/jwt/issuers/0",
        ),
        (
            "config:\n  replicas:\n    heartbeatIntervalMs: 0\n",
            "/config/replicas/heartbeatIntervalMs",
        ),
        ("forwardAuth:\n  port: 0\n", "/forwardAuth/port"),
        (
            "forwardAuth:\n  maxConnections: 0\n",
            "/forwardAuth/maxConnections",
        ),
        (
            "forwardAuth:\n  secret: s\n",
            "additional properties 'secret' not allowed",
        ),
        (
            "secrets:\n  forwardAuthSecret: short\n",
            "/secrets/forwardAuthSecret",
        ),
    ] {
        let bad = values_file(values);
        let err = template(&[&minimal(), &bad], &[])
            .expect_err(&format!("helm template accepted {values:?}"));
        assert!(
            err.contains("values don't meet the specifications of the schema")
                && err.contains(complaint),
            "{values:?} should be refused naming {complaint}:\n{err}"
        );
        let _ = std::fs::remove_dir_all(bad.parent().unwrap());
    }

    // Without an existing Secret, the three secret values are required.
    for missing in ["databaseUrl", "pepper", "operatorToken"] {
        let err = template(&[&minimal()], &[&format!("secrets.{missing}=")])
            .expect_err(&format!("secrets.{missing} left out"));
        assert!(err.contains("secrets: set secrets.databaseUrl"), "{err}");
    }
    assert!(template(&[], &["secrets.existingSecret=mine"]).is_ok());
}

#[test]
fn contradictory_values_are_refused_with_a_message() {
    for (sets, complaint) in [
        (vec!["secrets.existingSecret=mine"], "not both"),
        (
            vec!["tls.enabled=true", "tls.cert=C", "tls.key=K"],
            "cannot reach the TLS gRPC port",
        ),
        (
            vec![
                "tls.enabled=true",
                "tls.cert=C",
                "tls.key=K",
                "tls.clientCa=CA",
                "tls.verifyClients=true",
                "probes.grpcMode=TLS",
            ],
            "no client certificate",
        ),
        (
            vec!["podDisruptionBudget.minAvailable=1"],
            "maxUnavailable or minAvailable, not both",
        ),
        (
            vec![
                "autoscaling.enabled=true",
                "autoscaling.minReplicas=5",
                "autoscaling.maxReplicas=2",
            ],
            "maxReplicas",
        ),
        (vec!["config.database.minConnections=20"], "minConnections"),
        (
            vec!["serviceAccount.create=false"],
            "serviceAccount.name is required",
        ),
        (
            vec!["secrets.gatewayToken=test-operator-token-0123456789"],
            "must differ",
        ),
        (
            vec!["secrets.existingSecretHolds.gatewayToken=true"],
            "existingSecretHolds needs secrets.existingSecret",
        ),
        (
            vec!["preStopSleepSeconds=15", "config.shutdownGraceSeconds=15"],
            "terminationGracePeriodSeconds must be greater",
        ),
        (
            vec![
                "forwardAuth.enabled=true",
                "secrets.forwardAuthSecret=test-operator-token-0123456789",
            ],
            "must differ",
        ),
        (
            vec![
                "forwardAuth.enabled=true",
                "forwardAuth.requireGatewaySecret=false",
                "forwardAuth.port=9090",
            ],
            "forwardAuth.port must differ",
        ),
        (
            vec!["secrets.existingSecretHolds.forwardAuthSecret=true"],
            "existingSecretHolds needs secrets.existingSecret",
        ),
    ] {
        let err = template(&[&minimal()], &sets).expect_err(&format!("{sets:?} accepted"));
        assert!(
            err.contains(complaint),
            "{sets:?} should say {complaint:?}:\n{err}"
        );
    }
}

/// The chart's README had no values table; now it is generated from
/// values.yaml's comments, and must be regenerated when they change.
#[test]
fn the_chart_readme_values_table_is_generated_from_values_yaml() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/helm-values-table");
    let out = run(Command::new(script).arg("--stdout"), None);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let committed = std::fs::read_to_string(chart_file("README.md")).unwrap();
    assert!(
        text(&out.stdout) == committed,
        "helm/tollgate/README.md's values table is stale: run scripts/helm-values-table"
    );
    // Every value is in it, with its default.
    for row in [
        "| `config.cache.maxStalenessSeconds` | int | `60` |",
        "| `config.database.statementTimeoutMs` | int | `5000` |",
        "| `config.database.changeRetentionSeconds` | int | `86400` |",
        "| `config.console.signup` | string | `\"\"` |",
        "| `test.enabled` | bool | `true` |",
    ] {
        assert!(committed.contains(row), "{row}");
    }
}

/// chart-testing's Chart.yaml schema (helm/chart-testing, etc/chart_schema.yaml).
const CT_CHART_SCHEMA: &str = "\
name: str()
home: str(required=False)
version: str()
apiVersion: str()
appVersion: any(str(), num(), required=False)
description: str(required=False)
keywords: list(str(), required=False)
sources: list(str(), required=False)
maintainers: list(include('maintainer'), required=False)
dependencies: list(include('dependency'), required=False)
icon: str(required=False)
engine: str(required=False)
condition: str(required=False)
tags: str(required=False)
deprecated: bool(required=False)
kubeVersion: str(required=False)
annotations: map(str(), str(), required=False)
type: str(required=False)
---
maintainer:
  name: str()
  email: str(required=False)
  url: str(required=False)
---
dependency:
  name: str()
  version: str()
  repository: str(required=False)
  condition: str(required=False)
  tags: list(str(), required=False)
  enabled: bool(required=False)
  import-values: list(any(str(), include('import-value')), required=False)
  alias: str(required=False)
---
import-value:
  child: str()
  parent: str()
";

/// chart-testing's yamllint rules (etc/lintconf.yaml).
const CT_LINTCONF: &str = "\
rules:
  braces:
    min-spaces-inside: 0
    max-spaces-inside: 0
    min-spaces-inside-empty: -1
    max-spaces-inside-empty: -1
  brackets:
    min-spaces-inside: 0
    max-spaces-inside: 0
    min-spaces-inside-empty: -1
    max-spaces-inside-empty: -1
  colons:
    max-spaces-before: 0
    max-spaces-after: 1
  commas:
    max-spaces-before: 0
    min-spaces-after: 1
    max-spaces-after: 1
  comments:
    require-starting-space: true
    min-spaces-from-content: 2
  document-end: disable
  document-start: disable
  empty-lines:
    max: 2
    max-start: 0
    max-end: 0
  hyphens:
    max-spaces-after: 1
  indentation:
    spaces: consistent
    indent-sequences: whatever
    check-multi-line-strings: false
  key-duplicates: enable
  line-length: disable
  new-line-at-end-of-file: disable
  new-lines:
    type: unix
  trailing-spaces: enable
  truthy:
    level: warning
";

/// `ct lint` also checks Chart.yaml against its schema (yamale) and the
/// chart's YAML with its yamllint rules; with `helm lint` per ci values file
/// (above), that is all of it but the version-bump check against a git
/// remote. yamllint and yamale come from scripts/install-helm-tools.
#[test]
fn the_chart_passes_chart_testings_yaml_checks() {
    let dir = temp_dir("ct");
    let schema = dir.join("chart_schema.yaml");
    let lintconf = dir.join("lintconf.yaml");
    std::fs::write(&schema, CT_CHART_SCHEMA).unwrap();
    std::fs::write(&lintconf, CT_LINTCONF).unwrap();
    let out = run(
        tool("yamale")
            .arg("--schema")
            .arg(&schema)
            .arg(chart_file("Chart.yaml")),
        None,
    );
    assert!(
        out.status.success(),
        "yamale Chart.yaml:\n{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let mut files = vec![chart_file("Chart.yaml"), chart_file("values.yaml")];
    files.extend(ci_values());
    let out = run(
        tool("yamllint")
            .args(["--strict", "--config-file"])
            .arg(&lintconf)
            .args(&files),
        None,
    );
    assert!(
        out.status.success(),
        "yamllint (chart-testing's rules):\n{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

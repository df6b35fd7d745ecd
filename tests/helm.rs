//! The Helm chart (`helm/tollgate`) as an operator installs it: it lints, it
//! renders objects Kubernetes accepts (`kubernetes-validate --strict`), it
//! keeps its security and wiring promises, it hands the real `tollgate`
//! binary a configuration that binary accepts, and its schema refuses bad
//! values before anything reaches a cluster.
//!
//! Needs `helm`, `kubernetes-validate` and `tollgate-yaml2json` on PATH:
//! `export PATH="$(scripts/install-helm-tools):$PATH"` (scripts/test does
//! it). A missing tool fails the tests; nothing is skipped.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

use serde_json::{json, Value};
use tollgate::config::{FlagOverrides, LogFormat, Settings};

/// The Kubernetes version manifests are validated against.
const KUBE_VERSION: &str = "1.30.0";
const RELEASE: &str = "auth";
const NAMESPACE: &str = "auth";
const FULLNAME: &str = "auth-tollgate";
const SHIPPED_PROFILES: [&str; 5] = ["default", "msgflash", "mailsage", "msgine", "messagesmart"];

// ---------------------------------------------------------------- tools

fn chart() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("helm/tollgate")
}

fn chart_file(rel: &str) -> PathBuf {
    chart().join(rel)
}

/// `name` from PATH, or a failure that says how to install it.
fn tool(name: &str) -> Command {
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|dir| dir.join(name).is_file()))
        .unwrap_or(false);
    assert!(
        on_path,
        "`{name}` is not on PATH. Install the chart test tools with\n    \
         export PATH=\"$(scripts/install-helm-tools):$PATH\"\n(scripts/test does this)"
    );
    Command::new(name)
}

/// Runs `cmd`, feeding `stdin` from a thread so a chatty child cannot block.
fn run(cmd: &mut Command, stdin: Option<&str>) -> Output {
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let feeder = stdin.map(|text| {
        let mut pipe = child.stdin.take().expect("piped stdin");
        let text = text.to_owned();
        std::thread::spawn(move || std::io::Write::write_all(&mut pipe, text.as_bytes()))
    });
    let out = child.wait_with_output().expect("child finished");
    if let Some(feeder) = feeder {
        feeder.join().expect("stdin feeder").expect("stdin written");
    }
    out
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A fresh directory for one test.
fn temp_dir(tag: &str) -> PathBuf {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "tg-helm-{}-{tag}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A values file holding `yaml`.
fn values_file(yaml: &str) -> PathBuf {
    let path = temp_dir("values").join("values.yaml");
    std::fs::write(&path, yaml).unwrap();
    path
}

/// `helm template` of `chart_dir` with extra arguments: Ok(manifests) or Err(stderr).
fn template_chart(chart_dir: &Path, args: &[&str]) -> Result<String, String> {
    let out = run(
        tool("helm")
            .args(["template", RELEASE])
            .arg(chart_dir)
            .args(["--namespace", NAMESPACE, "--kube-version", KUBE_VERSION])
            .args(args),
        None,
    );
    if out.status.success() {
        Ok(text(&out.stdout))
    } else {
        Err(text(&out.stderr))
    }
}

/// `helm template` with these values files (in order) and `--set` pairs.
fn template(values: &[&Path], sets: &[&str]) -> Result<String, String> {
    let mut args: Vec<String> = Vec::new();
    for v in values {
        args.push("--values".into());
        args.push(v.display().to_string());
    }
    for s in sets {
        args.push("--set".into());
        args.push((*s).into());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    template_chart(&chart(), &args)
}

fn minimal() -> PathBuf {
    chart_file("ci/minimal-values.yaml")
}

fn all_options() -> PathBuf {
    chart_file("ci/all-options-values.yaml")
}

/// Renders and parses; panics with helm's message on failure.
fn render(values: &[&Path], sets: &[&str]) -> Rendered {
    let yaml = template(values, sets).unwrap_or_else(|e| panic!("helm template failed:\n{e}"));
    Rendered::parse(yaml)
}

// ------------------------------------------------------ rendered objects

/// The manifests as text (for kubernetes-validate) and as JSON documents.
#[derive(Clone)]
struct Rendered {
    yaml: String,
    docs: Vec<Value>,
}

impl Rendered {
    fn parse(yaml: String) -> Self {
        let out = run(&mut tool("tollgate-yaml2json"), Some(&yaml));
        assert!(
            out.status.success(),
            "helm's output is not YAML: {}",
            text(&out.stderr)
        );
        let docs: Vec<Value> = serde_json::from_slice(&out.stdout).expect("JSON documents");
        Rendered { yaml, docs }
    }

    fn all(&self, kind: &str) -> Vec<&Value> {
        self.docs.iter().filter(|d| d["kind"] == kind).collect()
    }

    fn named(&self, kind: &str, name: &str) -> &Value {
        self.find(kind, name)
            .unwrap_or_else(|| panic!("no {kind} named {name} in {:?}", self.index()))
    }

    fn find(&self, kind: &str, name: &str) -> Option<&Value> {
        self.docs
            .iter()
            .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
    }

    /// `Kind/name` of every document, sorted.
    fn index(&self) -> Vec<String> {
        let mut all: Vec<String> = self
            .docs
            .iter()
            .map(|d| format!("{}/{}", s(&d["kind"]), s(&d["metadata"]["name"])))
            .collect();
        all.sort();
        all
    }

    /// Adds an object the chart refers to but does not render (an
    /// `existingSecret`, an extra ConfigMap), as the cluster would hold it.
    fn with_existing(mut self, kind: &str, name: &str, data: &[(&str, &str)]) -> Self {
        use base64::Engine;
        let data: serde_json::Map<String, Value> = data
            .iter()
            .map(|(key, text)| {
                let value = match kind {
                    "Secret" => base64::engine::general_purpose::STANDARD.encode(text),
                    _ => (*text).to_owned(),
                };
                ((*key).to_owned(), Value::String(value))
            })
            .collect();
        assert!(self.find(kind, name).is_none(), "{kind}/{name} is rendered");
        self.docs
            .push(json!({"kind": kind, "metadata": {"name": name}, "data": data}));
        self
    }

    /// A key of a ConfigMap's data or a Secret's (decoded) data.
    fn data(&self, kind: &str, name: &str, key: &str) -> Option<String> {
        let obj = self.find(kind, name)?;
        let value = obj["data"][key].as_str()?;
        Some(match kind {
            "Secret" => String::from_utf8(base64_decode(value)).expect("UTF-8 secret"),
            _ => value.to_owned(),
        })
    }
}

fn s(v: &Value) -> &str {
    v.as_str()
        .unwrap_or_else(|| panic!("expected a string, got {v}"))
}

fn base64_decode(input: &str) -> Vec<u8> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let (mut out, mut acc, mut bits) = (Vec::new(), 0u32, 0u32);
    for c in input
        .bytes()
        .filter(|c| *c != b'=' && !c.is_ascii_whitespace())
    {
        let v = ALPHABET.iter().position(|a| *a == c).expect("base64") as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    out
}

/// Every `matchLabels` pair of `selector` is among `labels`.
fn selects(selector: &Value, labels: &Value) -> bool {
    let wanted = selector["matchLabels"].as_object().expect("matchLabels");
    !wanted.is_empty() && wanted.iter().all(|(k, v)| &labels[k] == v)
}

fn pod_spec(workload: &Value) -> &Value {
    &workload["spec"]["template"]["spec"]
}

fn pod_labels(workload: &Value) -> &Value {
    &workload["spec"]["template"]["metadata"]["labels"]
}

fn container<'a>(workload: &'a Value, name: &str) -> &'a Value {
    pod_spec(workload)["containers"]
        .as_array()
        .expect("containers")
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no container {name}"))
}

fn env<'a>(container: &'a Value, name: &str) -> &'a Value {
    container["env"]
        .as_array()
        .expect("env")
        .iter()
        .find(|e| e["name"] == name)
        .unwrap_or_else(|| panic!("no env {name} in {}", container["env"]))
}

fn has_env(container: &Value, name: &str) -> bool {
    container["env"]
        .as_array()
        .is_some_and(|all| all.iter().any(|e| e["name"] == name))
}

fn annotation<'a>(obj: &'a Value, key: &str) -> &'a str {
    obj["metadata"]["annotations"][key]
        .as_str()
        .unwrap_or_else(|| panic!("no annotation {key} on {}", obj["metadata"]["name"]))
}

/// One source of a mounted file: (kind, object name, key).
type FileSource = (String, String, String);

/// Where the file at `path` in `container` comes from, following its volume
/// mount into a secret, configMap or projected volume. A source the chart
/// renders must hold the key; an existing Secret is taken on trust.
fn file_source(r: &Rendered, workload: &Value, container: &Value, path: &str) -> FileSource {
    let mount = container["volumeMounts"]
        .as_array()
        .expect("volumeMounts")
        .iter()
        .find(|m| path.starts_with(&format!("{}/", s(&m["mountPath"]))))
        .unwrap_or_else(|| panic!("{path} is on no volume mount"));
    let rel = &path[s(&mount["mountPath"]).len() + 1..];
    let volume = pod_spec(workload)["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .find(|v| v["name"] == mount["name"])
        .expect("the mount's volume");
    volume_sources(volume)
        .into_iter()
        .find_map(|(kind, name, items)| match items {
            Some(items) => items
                .iter()
                .find(|i| i["path"] == rel)
                .map(|i| (kind.clone(), name.clone(), s(&i["key"]).to_owned())),
            None => {
                let rendered = r.find(&kind, &name);
                let holds = rendered.is_none_or(|o| o["data"][rel].is_string());
                holds.then(|| (kind, name, rel.to_owned()))
            }
        })
        .unwrap_or_else(|| panic!("{path}: no source in volume {volume}"))
}

/// (kind, name, items) of each Secret or ConfigMap behind a volume.
fn volume_sources(volume: &Value) -> Vec<(String, String, Option<&Vec<Value>>)> {
    fn one<'a>(v: &'a Value, kind: &str, name: &Value) -> (String, String, Option<&'a Vec<Value>>) {
        (kind.to_owned(), s(name).to_owned(), v["items"].as_array())
    }
    if volume["secret"].is_object() {
        vec![one(
            &volume["secret"],
            "Secret",
            &volume["secret"]["secretName"],
        )]
    } else if volume["configMap"].is_object() {
        vec![one(
            &volume["configMap"],
            "ConfigMap",
            &volume["configMap"]["name"],
        )]
    } else if let Some(sources) = volume["projected"]["sources"].as_array() {
        sources
            .iter()
            .map(|src| match src["secret"].is_object() {
                true => one(&src["secret"], "Secret", &src["secret"]["name"]),
                false => one(&src["configMap"], "ConfigMap", &src["configMap"]["name"]),
            })
            .collect()
    } else {
        Vec::new()
    }
}

// -------------------------------------------------------- validation

/// kubernetes-validate accepts every document at `version` (strict: no
/// unknown field), and the ServiceMonitor, whose CRD it does not know, is
/// checked here instead.
fn assert_valid_for_kubernetes(r: &Rendered, version: &str) {
    let out = run(
        tool("kubernetes-validate").args(["--strict", "-k", version, "-"]),
        Some(&r.yaml),
    );
    let report = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(
        out.status.success(),
        "kubernetes-validate refused the manifests:\n{report}"
    );
    for doc in &r.docs {
        let (kind, name) = (s(&doc["kind"]), s(&doc["metadata"]["name"]));
        if kind == "ServiceMonitor" {
            assert_service_monitor(doc, r);
            continue;
        }
        let passed = format!("passed for resource {}/{name} ", kind.to_lowercase());
        assert!(
            report.contains(&passed),
            "{kind}/{name} was not validated (unknown apiVersion?):\n{report}"
        );
    }
    for line in report.lines().filter(|l| l.starts_with("WARN")) {
        assert!(
            line.contains("kind ServiceMonitor with api version monitoring.coreos.com/v1"),
            "unexpected warning: {line}"
        );
    }
}

/// The Prometheus Operator's ServiceMonitor: the fields it requires, no
/// field it does not know among those the chart writes, and a selector and
/// port that match the chart's Service.
fn assert_service_monitor(sm: &Value, r: &Rendered) {
    assert_eq!(sm["apiVersion"], "monitoring.coreos.com/v1");
    assert!(sm["metadata"]["namespace"].is_string());
    let spec = sm["spec"].as_object().expect("spec");
    for key in spec.keys() {
        assert!(
            ["endpoints", "selector", "namespaceSelector", "jobLabel"].contains(&key.as_str()),
            "ServiceMonitor spec.{key} is not a field the chart should write"
        );
    }
    let service = r
        .all("Service")
        .into_iter()
        .find(|svc| selects(&sm["spec"]["selector"], &svc["metadata"]["labels"]))
        .expect("the ServiceMonitor selects a Service");
    let endpoints = sm["spec"]["endpoints"].as_array().expect("endpoints");
    assert!(!endpoints.is_empty());
    for ep in endpoints {
        for key in ep.as_object().unwrap().keys() {
            assert!(
                ["port", "path", "interval", "scrapeTimeout", "scheme"].contains(&key.as_str()),
                "ServiceMonitor endpoint field {key} is unexpected"
            );
        }
        let port = s(&ep["port"]);
        assert!(
            service["spec"]["ports"]
                .as_array()
                .unwrap()
                .iter()
                .any(|p| p["name"] == port),
            "the Service has no port named {port}"
        );
        assert!(s(&ep["path"]).starts_with('/'));
        for d in ["interval", "scrapeTimeout"] {
            let v = s(&ep[d]);
            assert!(
                v.ends_with('s') && v[..v.len() - 1].chars().all(|c| c.is_ascii_digit()),
                "{d} = {v}"
            );
        }
    }
}

/// Non-root, read-only, no capabilities, no privilege escalation, seccomp,
/// no service-account token, bounded resources.
fn assert_locked_down(workload: &Value) {
    let spec = pod_spec(workload);
    let what = s(&workload["metadata"]["name"]);
    assert_eq!(spec["automountServiceAccountToken"], false, "{what}");
    let pod = &spec["securityContext"];
    assert_eq!(pod["runAsNonRoot"], true, "{what}");
    assert_eq!(pod["runAsUser"], 65532, "{what}");
    assert_eq!(pod["seccompProfile"]["type"], "RuntimeDefault", "{what}");
    for c in spec["containers"].as_array().unwrap() {
        let sc = &c["securityContext"];
        assert_eq!(sc["runAsNonRoot"], true, "{what}");
        assert_eq!(sc["runAsUser"], 65532, "{what}");
        assert_eq!(sc["readOnlyRootFilesystem"], true, "{what}");
        assert_eq!(sc["allowPrivilegeEscalation"], false, "{what}");
        assert_eq!(sc["privileged"], false, "{what}");
        assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]), "{what}");
        assert!(sc["capabilities"]["add"].is_null(), "{what}");
        assert_eq!(sc["seccompProfile"]["type"], "RuntimeDefault", "{what}");
        for field in ["requests", "limits"] {
            for resource in ["cpu", "memory"] {
                assert!(
                    c["resources"][field][resource].is_string(),
                    "{what}: resources.{field}.{resource}"
                );
            }
        }
    }
}

fn ports_of(rule: &Value) -> Vec<String> {
    rule["ports"]
        .as_array()
        .expect("ports")
        .iter()
        .map(|p| {
            format!(
                "{}/{}",
                p["port"].to_string().trim_matches('"'),
                s(&p["protocol"])
            )
        })
        .collect()
}

// ------------------------------------------------------------- tests

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

/// Runs the real binary as `container` of `kind`/`name` would run: its files
/// materialised from the rendered ConfigMaps and Secrets under a temporary
/// root (paths in env values and files relocated there), its environment
/// (less `without_env`), its args. Postgres is a closed port, so a run that
/// accepted its whole configuration either listens (serve: it waits, not
/// ready, for the database) or ends in "cannot connect to Postgres" (migrate).
/// Returns stderr.
fn run_as_the_pod(
    r: &Rendered,
    kind: &str,
    name: &str,
    container_name: &str,
    without_env: &[&str],
) -> String {
    let workload = r.named(kind, name);
    let c = container(workload, container_name);
    let root = temp_dir("pod");
    let relocate = |text: &str| {
        text.replace(
            "/etc/tollgate/",
            &format!("{}/etc/tollgate/", root.display()),
        )
    };
    for m in c["volumeMounts"].as_array().unwrap() {
        let volume = pod_spec(workload)["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == m["name"])
            .unwrap();
        let dir = root.join(s(&m["mountPath"]).trim_start_matches('/'));
        std::fs::create_dir_all(&dir).unwrap();
        for (kind, name, items) in volume_sources(volume) {
            let keys: Vec<(String, String)> = match items {
                Some(items) => items
                    .iter()
                    .map(|i| (s(&i["key"]).to_owned(), s(&i["path"]).to_owned()))
                    .collect(),
                None => r.named(&kind, &name)["data"]
                    .as_object()
                    .unwrap()
                    .keys()
                    .map(|k| (k.clone(), k.clone()))
                    .collect(),
            };
            for (key, path) in keys {
                let content = r.data(&kind, &name, &key).expect("key present");
                std::fs::write(dir.join(path), relocate(&content)).unwrap();
            }
        }
    }
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tollgate"));
    cmd.args(c["args"].as_array().unwrap().iter().map(s))
        .env_clear();
    for e in c["env"].as_array().unwrap() {
        if without_env.contains(&s(&e["name"])) {
            continue;
        }
        let value = match e["value"].as_str() {
            Some(v) => relocate(v),
            None => {
                let secret = &e["valueFrom"]["secretKeyRef"];
                r.data("Secret", s(&secret["name"]), s(&secret["key"]))
                    .expect("referenced secret")
            }
        };
        cmd.env(s(&e["name"]), value);
    }
    // Nothing listens on port 1: fail fast at the database, not on DNS.
    cmd.env("DATABASE_URL", "postgres://tollgate@127.0.0.1:1/tollgate");
    // Parallel tests must not fight over the chart's fixed ports.
    cmd.env("TOLLGATE_LISTEN", "127.0.0.1:0");
    if cmd.get_envs().any(|(k, _)| k == "TOLLGATE_METRICS_LISTEN") {
        cmd.env("TOLLGATE_METRICS_LISTEN", "127.0.0.1:0");
    }
    let stderr = run_until_listening(&mut cmd);
    let _ = std::fs::remove_dir_all(&root);
    stderr
}

/// Runs the binary until it exits (migrate: cannot reach Postgres) or logs
/// "tollgate listening" (serve connects lazily and waits, not ready, for the
/// database), then stops it. Returns what it logged.
fn run_until_listening(cmd: &mut Command) -> String {
    use std::io::BufRead;
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("the binary starts");
    let stderr = child.stderr.take().unwrap();
    let mut logged = String::new();
    for line in std::io::BufReader::new(stderr).lines() {
        let line = line.unwrap_or_default();
        logged.push_str(&line);
        logged.push('\n');
        if line.contains("tollgate listening") {
            let _ = child.kill();
            break;
        }
    }
    let status = child.wait().expect("child finished");
    if !logged.contains("tollgate listening") {
        assert!(!status.success(), "it exited 0 without serving:\n{logged}");
    }
    logged
}

#[test]
fn the_rendered_configuration_starts_the_real_binary() {
    let r = render(&[&minimal()], &[]);
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
    assert!(!settings.database.migrate_on_start);
    // Settings added after the chart was written reach the binary too.
    assert_eq!(settings.database.statement_timeout_ms, 2500);
    assert_eq!(settings.database.change_retention_seconds, 172_800);
    assert_eq!(settings.cache.max_staleness_seconds, 30);
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

/// A server certificate for `localhost` and the CA that signed it, in PEM.
struct TlsSecret {
    cert: String,
    key: String,
    ca: String,
}

fn tls_secret() -> TlsSecret {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    TlsSecret {
        cert: cert.pem(),
        key: key.serialize_pem(),
        ca: ca.pem(),
    }
}

/// A fresh Ed25519 private key in PKCS#8 PEM (a console signing key).
fn ed25519_pem() -> String {
    use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
    use ed25519_dalek::pkcs8::EncodePrivateKey;
    let key = ed25519_dalek::SigningKey::from_bytes(&rand::random());
    key.to_pkcs8_pem(LineEnding::LF).unwrap().to_string()
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
    ] {
        let err = template(&[&minimal()], &sets).expect_err(&format!("{sets:?} accepted"));
        assert!(
            err.contains(complaint),
            "{sets:?} should say {complaint:?}:\n{err}"
        );
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

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

#[test]
fn the_image_is_what_the_chart_expects() {
    // No container engine runs here: check the Dockerfile's promises instead.
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dockerfile = std::fs::read_to_string(repo.join("Dockerfile")).unwrap();
    let ignored = std::fs::read_to_string(repo.join(".dockerignore")).unwrap();
    let ignored: Vec<&str> = ignored
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    let lines: Vec<&str> = dockerfile
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .collect();
    let runtime_from = lines.iter().rposition(|l| l.starts_with("FROM ")).unwrap();
    assert!(
        lines[runtime_from].starts_with("FROM gcr.io/distroless/cc-debian12:nonroot@sha256:"),
        "{}",
        lines[runtime_from]
    );
    // Every base image is pinned by digest: a rebuild pulls reviewed bytes.
    for from in lines.iter().filter(|l| l.starts_with("FROM ")) {
        let image = from.split_whitespace().nth(1).unwrap();
        let digest = image.split_once("@sha256:").map(|(_, d)| d).unwrap_or("");
        assert!(
            digest.len() == 64 && digest.bytes().all(|b| b.is_ascii_hexdigit()),
            "{from}: not pinned by digest"
        );
    }
    let runtime = &lines[runtime_from..];
    for expected in [
        "USER 65532:65532",
        "EXPOSE 50051 9090",
        r#"ENTRYPOINT ["/usr/local/bin/tollgate"]"#,
        r#"CMD ["serve"]"#,
    ] {
        assert!(
            runtime.contains(&expected),
            "the runtime stage lacks {expected:?}"
        );
    }
    assert!(dockerfile.contains("cargo build --release --locked"));

    // Everything the build copies is in the repository and in the context.
    for line in lines
        .iter()
        .filter(|l| l.starts_with("COPY ") && !l.contains("--from"))
    {
        let words: Vec<&str> = line.split_whitespace().collect();
        for source in &words[1..words.len() - 1] {
            assert!(repo.join(source).exists(), "{line}: {source} is missing");
            assert!(
                !ignored.contains(source),
                "{line}: {source} is in .dockerignore"
            );
        }
    }

    // The chart runs the image's entrypoint with `serve` / `migrate`, as 65532,
    // on the ports the image exposes.
    let r = render(&[&minimal()], &[]);
    let deploy = r.named("Deployment", FULLNAME);
    assert_eq!(pod_spec(deploy)["securityContext"]["runAsUser"], 65532);
    let c = container(deploy, "tollgate");
    assert!(
        c["command"].is_null(),
        "the chart keeps the image's entrypoint"
    );
    let ports: Vec<String> = c["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["containerPort"].to_string())
        .collect();
    assert_eq!(ports, ["50051", "9090"]);
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

/// The Dockerfile passed hadolint only by chance: now every finding fails.
/// Needs `hadolint` on PATH: `PATH="$(scripts/install-hadolint):$PATH"`.
#[test]
fn the_dockerfile_passes_hadolint_with_no_finding() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let lint = |file: &Path| {
        run(
            tool("hadolint")
                .args(["--no-color", "--failure-threshold", "info"])
                .arg(file),
            None,
        )
    };
    let out = lint(&repo.join("Dockerfile"));
    assert!(
        out.status.success() && out.stdout.is_empty(),
        "hadolint Dockerfile:\n{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    // It does report findings (an unpinned image, apt-get without versions).
    let bad = temp_dir("hadolint").join("Dockerfile");
    std::fs::write(
        &bad,
        "FROM debian\nRUN apt-get update && apt-get install -y curl\n",
    )
    .unwrap();
    let out = lint(&bad);
    assert!(!out.status.success(), "{}", text(&out.stdout));
    assert!(
        text(&out.stdout).contains("DL3006"),
        "{}",
        text(&out.stdout)
    );
    let _ = std::fs::remove_dir_all(bad.parent().unwrap());
}

/// The image build broke at its first step: the dependency layer's
/// placeholder sources left out targets Cargo.toml declares (the load driver,
/// the benchmark), so cargo could not even read the manifest. The builder
/// stage is replayed here (its COPY and RUN lines, in order) up to the point
/// where rustc would compile the first crate: the manifest parses, the lock
/// file holds with --locked, and both builds reach the compiler.
#[test]
fn the_dockerfile_build_steps_reach_the_compiler() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dockerfile = std::fs::read_to_string(repo.join("Dockerfile")).unwrap();
    let joined = dockerfile.replace("\\\n", " ");
    let builder: Vec<&str> = joined
        .lines()
        .filter(|l| !l.trim_start().starts_with('#') && !l.trim().is_empty())
        .skip_while(|l| !l.starts_with("FROM "))
        .skip(1)
        .take_while(|l| !l.starts_with("FROM "))
        .collect();
    let root = temp_dir("docker-build");
    let context = root.join("build");
    std::fs::create_dir_all(&context).unwrap();
    // rustc answers cargo's probes; the first crate compile stops the build.
    let wrapper = root.join("rustc-wrapper");
    std::fs::write(
        &wrapper,
        "#!/bin/sh\ncase \" $* \" in *' --crate-name ___ '*|*' -vV '*) exec \"$@\";; esac\n\
         echo REACHED-THE-COMPILER >&2\nexit 1\n",
    )
    .unwrap();
    let executable = std::os::unix::fs::PermissionsExt::from_mode(0o755);
    std::fs::set_permissions(&wrapper, executable).unwrap();
    let mut builds = 0;
    for line in builder {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words[0] {
            "WORKDIR" => {}
            "COPY" => {
                let (sources, dest) = words[1..].split_at(words.len() - 2);
                // As COPY does: a file into the destination directory, a
                // directory's contents onto the destination.
                let to = context.join(dest[0].trim_start_matches("./"));
                std::fs::create_dir_all(&to).unwrap();
                for source in sources {
                    let from = repo.join(source);
                    let from = if from.is_dir() { from.join(".") } else { from };
                    let status = Command::new("cp")
                        .arg("-R")
                        .arg(&from)
                        .arg(&to)
                        .status()
                        .unwrap();
                    assert!(status.success(), "{line}");
                }
            }
            "RUN" => {
                let script = line["RUN".len()..].trim();
                let out = run(
                    Command::new("bash")
                        .args(["-c", script])
                        .current_dir(&context)
                        .env("RUSTC_WRAPPER", &wrapper)
                        .env("CARGO_NET_OFFLINE", "true")
                        .env("CARGO_TARGET_DIR", root.join("target")),
                    None,
                );
                let said = text(&out.stderr);
                if script.contains("cargo build") {
                    builds += 1;
                    assert!(
                        said.contains("REACHED-THE-COMPILER"),
                        "`{script}` did not reach the compiler:\n{said}"
                    );
                } else {
                    assert!(out.status.success(), "`{script}`:\n{said}");
                }
            }
            other => panic!("the builder stage has a {other} line this test cannot replay"),
        }
    }
    assert_eq!(builds, 2, "the dependency layer and the real build");
    let _ = std::fs::remove_dir_all(&root);
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

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

#[path = "helm/binary.rs"]
mod binary;
#[path = "helm/forward_auth.rs"]
mod forward_auth;
#[path = "helm/image.rs"]
mod image;
#[path = "helm/lint.rs"]
mod lint;
#[path = "helm/objects.rs"]
mod objects;

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

// ------------------------------------ fixtures shared by the test modules

/// Runs the real binary as `container` of `kind`/`name` would run (see
/// [`pod_command`]) until it listens or exits. Returns stderr.
fn run_as_the_pod(
    r: &Rendered,
    kind: &str,
    name: &str,
    container_name: &str,
    without_env: &[&str],
) -> String {
    let (mut cmd, root) = pod_command(r, kind, name, container_name, without_env);
    let stderr = run_until_listening(&mut cmd);
    let _ = std::fs::remove_dir_all(&root);
    stderr
}

/// The real binary as `container` of `kind`/`name` would run: its files
/// materialised from the rendered ConfigMaps and Secrets under a temporary
/// root (paths in env values and files relocated there), its environment
/// (less `without_env`), its args. Postgres is a closed port, so a run that
/// accepted its whole configuration either listens (serve: it waits, not
/// ready, for the database) or ends in "cannot connect to Postgres" (migrate).
/// Returns the command and the root to remove afterwards.
fn pod_command(
    r: &Rendered,
    kind: &str,
    name: &str,
    container_name: &str,
    without_env: &[&str],
) -> (Command, PathBuf) {
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
    (cmd, root)
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

//! README.md, followed as a newcomer follows it: the Quick start's run
//! command exactly as written (`cargo run -- dev`, not the binary), the
//! `export` lines and commands its banner prints, then every `grpcurl`
//! example in README.md against it, in the order written.
//!
//! The README's own rules (stated in its "Following the examples" part) are
//! all this test knows: a shell block holding a `grpcurl` line holds only
//! comments, `NAME=value` assignments and `grpcurl` commands; `<name>` stands
//! for the field `name` of the latest answer that had it; a comment line
//! `#   → …` right after a command lists, in backticks, what its answer
//! prints (a `Code: …` there means the command fails with that status).
//! Anything else fails the test, so a new example is covered with no extra
//! work and a stale one is caught.

#[path = "support/readme.rs"]
mod readme;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use readme::{examples, Example, Line};

const README: &str = include_str!("../README.md");

/// How long the run command may take to print its banner: on a fresh clone
/// it compiles the binary first. A bound, not a synchronisation.
const BANNER_BOUND: Duration = Duration::from_secs(20 * 60);

/// The run command, started in its own process group so that dropping it
/// stops `cargo` and the `tollgate` it runs.
struct RunCommand {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl RunCommand {
    fn start(command: &str) -> RunCommand {
        let mut cmd = Command::new("bash");
        cmd.arg("-c")
            .arg(command)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .env("NO_COLOR", "1")
            .process_group(0);
        // A newcomer's shell has none of these.
        for (name, _) in std::env::vars_os() {
            let name = name.to_string_lossy().into_owned();
            if name.starts_with("TOLLGATE_") || name == "DATABASE_URL" {
                cmd.env_remove(name);
            }
        }
        let mut child = cmd.spawn().expect("bash runs");
        let (tx, lines) = mpsc::channel();
        for pipe in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    let _ = tx.send(line);
                }
            });
        }
        RunCommand {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Lines up to and including the first one `done` accepts.
    fn read_until(&mut self, done: impl Fn(&str) -> bool) -> Vec<String> {
        let deadline = std::time::Instant::now() + BANNER_BOUND;
        let mut read = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    let last = done(&line);
                    read.push(line);
                    if last {
                        return read;
                    }
                }
                Err(e) => panic!(
                    "the run command stopped or printed no banner ({e:?}); it printed:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }
}

impl Drop for RunCommand {
    fn drop(&mut self) {
        let group = format!("-{}", self.child.id());
        let _ = Command::new("kill").args(["-KILL", "--", &group]).status();
        let _ = self.child.wait();
    }
}

/// Runs `script` in bash with `env`; returns (success, stdout + stderr).
fn sh(env: &BTreeMap<String, String>, script: &str) -> (bool, String) {
    let out = Command::new("bash")
        .arg("-c")
        .arg(format!("set -u\n{script}"))
        .envs(env)
        .stdin(Stdio::null())
        .output()
        .expect("bash runs");
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

/// The string fields of the answer(s) in `output`, by name, replacing older
/// answers' values. Within one answer the first one wins (RotateKey's
/// `key.keyId` before `previousKey.keyId`).
fn fields(output: &str, into: &mut BTreeMap<String, String>) {
    fn walk(v: &serde_json::Value, into: &mut BTreeMap<String, String>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, v) in m {
                    if let serde_json::Value::String(s) = v {
                        into.entry(k.clone()).or_insert_with(|| s.clone());
                    }
                    walk(v, into);
                }
            }
            // In a list the last item's fields win (ListUsers: the newest).
            serde_json::Value::Array(a) => a.iter().rev().for_each(|v| walk(v, into)),
            _ => {}
        }
    }
    let Some(start) = output.find('{') else {
        return;
    };
    let mut answer = BTreeMap::new();
    for value in serde_json::Deserializer::from_str(&output[start..]).into_iter() {
        match value {
            Ok(v) => walk(&v, &mut answer),
            Err(_) => break,
        }
    }
    into.extend(answer);
}

/// The message a console message printed by `tollgate dev` carries, as
/// (`<type in camelCase>Token`, token): `emailVerificationToken`, ….
fn delivered_token(line: &str) -> Option<(String, String)> {
    let json = line.strip_prefix("[tollgate dev] console message")?;
    let message: serde_json::Value = serde_json::from_str(&json[json.find('{')?..]).ok()?;
    let kind = message["type"].as_str()?;
    let token = message["token"].as_str()?;
    let mut name = String::new();
    for (i, part) in kind.split('_').enumerate() {
        let mut chars = part.chars();
        match chars.next() {
            Some(c) if i > 0 => name.extend(c.to_uppercase().chain(chars)),
            Some(c) => name.extend(std::iter::once(c).chain(chars)),
            None => {}
        }
    }
    Some((format!("{name}Token"), token.to_string()))
}

/// The answers so far, and the tokens the dev server printed (each used once).
struct Answers<'a> {
    fields: BTreeMap<String, String>,
    delivered: BTreeMap<String, String>,
    dev: &'a mut RunCommand,
}

impl Answers<'_> {
    /// The value for `<name>`: an answer's field, else a token the dev
    /// server delivers (waiting for its message, within a bound).
    fn value(&mut self, name: &str, line: usize) -> String {
        if let Some(v) = self.fields.get(name) {
            return v.clone();
        }
        loop {
            if let Some(token) = self.delivered.remove(name) {
                return token;
            }
            match self.dev.lines.recv_timeout(Duration::from_secs(30)) {
                Ok(printed) => {
                    if let Some((kind, token)) = delivered_token(&printed) {
                        self.delivered.insert(kind, token);
                    }
                    self.dev.seen.push(printed);
                }
                Err(_) => panic!(
                    "README.md line {line}: no earlier answer has a `{name}` field for \
                     <{name}>, and the dev server printed no message with one"
                ),
            }
        }
    }
}

/// `text` with each `<name>` replaced by its value.
fn fill(text: &str, answers: &mut Answers<'_>, line: usize) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(open) = rest.find('<') {
        let Some(close) = rest[open..].find('>') else {
            break;
        };
        let name = &rest[open + 1..open + close];
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric()) {
            out.push_str(&rest[..=open]);
            rest = &rest[open + 1..];
            continue;
        }
        let value = answers.value(name, line);
        out.push_str(&rest[..open]);
        out.push_str(&value);
        rest = &rest[open + close + 1..];
    }
    out.push_str(rest);
    out
}

/// Runs one example; panics with the README line and output when it does
/// not do what the README says.
fn run(example: &Example, env: &mut BTreeMap<String, String>, answers: &mut Answers<'_>) {
    match &example.line {
        Line::Assign { name, value } => {
            let value = fill(value, answers, example.at);
            let (ok, out) = sh(env, &format!("printf %s {value}"));
            assert!(
                ok,
                "README.md line {}: `{name}={value}` fails: {out}",
                example.at
            );
            env.insert(name.clone(), out);
        }
        Line::Command { text, expect } => {
            let command = fill(text, answers, example.at);
            let (ok, out) = sh(env, &command);
            let wants_error = expect.iter().any(|e| e.starts_with("Code: "));
            assert_eq!(
                ok,
                !wants_error,
                "README.md line {}: `{text}` {}; it printed:\n{out}",
                example.at,
                if ok {
                    "succeeded, but the README shows an error"
                } else {
                    "failed"
                },
            );
            for wanted in expect {
                assert!(
                    out.contains(wanted.as_str()),
                    "README.md line {}: `{text}` was to print `{wanted}`; it printed:\n{out}",
                    example.at
                );
            }
            fields(&out, &mut answers.fields);
        }
    }
}

#[test]
fn every_readme_command_works_as_written_in_order() {
    let grpcurl = Command::new("grpcurl").arg("-version").output();
    assert!(
        grpcurl.is_ok_and(|o| o.status.success()),
        "grpcurl is not on PATH: README.md lists it as a prerequisite \
         (scripts/test installs it with scripts/install-grpcurl)"
    );
    let run_command = readme::run_command(README);
    assert_eq!(
        run_command, "cargo run -- dev",
        "the Quick start's run command"
    );

    let mut dev = RunCommand::start(&run_command);
    let banner = dev.read_until(|l| l.starts_with("export H="));
    let mut env: BTreeMap<String, String> = std::env::vars()
        .filter(|(k, _)| !k.starts_with("TOLLGATE_") && k != "DATABASE_URL")
        .collect();
    let mut answers = BTreeMap::new();

    // The banner's export lines, pasted as printed.
    let exports: Vec<&String> = banner.iter().filter(|l| l.starts_with("export ")).collect();
    assert_eq!(
        exports.iter().map(|l| &l[7..8]).collect::<String>(),
        "ATKH",
        "the banner exports A, T, K and H:\n{}",
        banner.join("\n")
    );
    for line in exports {
        let (name, value) = line["export ".len()..].split_once('=').unwrap();
        let (ok, out) = sh(&env, &format!("printf %s {value}"));
        assert!(ok, "banner line `{line}` does not paste: {out}");
        env.insert(name.to_string(), out);
    }
    assert_eq!(env["A"], "127.0.0.1:50051");
    assert!(env["K"].starts_with("tg_live_"), "{}", env["K"]);

    // The commands the banner suggests, with those variables.
    dev.read_until(|l| l.starts_with("Then try"));
    let suggested = dev.read_until(|l| l.trim().is_empty());
    let suggested: Vec<&String> = suggested
        .iter()
        .filter(|l| l.starts_with("grpcurl "))
        .collect();
    assert!(suggested.len() >= 3, "{suggested:?}");
    for command in suggested {
        let (ok, out) = sh(&env, command);
        assert!(ok, "the banner's `{command}` failed:\n{out}");
        fields(&out, &mut answers);
    }

    // The README's examples, top to bottom.
    let mut answers = Answers {
        fields: answers,
        delivered: BTreeMap::new(),
        dev: &mut dev,
    };
    let examples = examples(README).unwrap_or_else(|e| panic!("{e}"));
    let commands = examples
        .iter()
        .filter(|e| matches!(e.line, Line::Command { .. }))
        .count();
    assert!(commands >= 30, "only {commands} grpcurl examples found");
    for example in &examples {
        run(example, &mut env, &mut answers);
    }

    drop(answers);
    // The secrets the banner printed stay out of the log lines.
    let logs: Vec<&String> = dev.seen.iter().filter(|l| l.contains(" INFO ")).collect();
    assert!(!logs.is_empty());
    for secret in [&env["T"], &env["K"]] {
        assert!(logs.iter().all(|l| !l.contains(secret.as_str())));
    }
}

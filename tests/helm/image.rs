//! The Dockerfile and the image the chart expects.

use super::*;

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

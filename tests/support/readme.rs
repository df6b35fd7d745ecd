//! The README's examples as data: the Quick start's run command, and every
//! shell block that holds a `grpcurl` line, as assignments and commands with
//! what each answer is said to print.

/// One thing to run, with the README line it starts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    pub at: usize,
    pub line: Line,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Line {
    /// `NAME=value` (or `export NAME=value`).
    Assign { name: String, value: String },
    /// A `grpcurl` command and the fragments its answer prints.
    Command { text: String, expect: Vec<String> },
}

/// Fenced blocks of shell: (first line number, lines).
fn shell_blocks(readme: &str) -> Vec<(usize, Vec<&str>)> {
    let mut blocks = Vec::new();
    let mut open: Option<(usize, Vec<&str>, bool)> = None;
    for (i, line) in readme.lines().enumerate() {
        let number = i + 1;
        if let Some(fence) = line.trim_start().strip_prefix("```") {
            match open.take() {
                Some((start, lines, true)) => blocks.push((start, lines)),
                Some(_) => {}
                None => {
                    let shell = matches!(fence.trim(), "sh" | "bash" | "shell" | "console");
                    open = Some((number + 1, Vec::new(), shell));
                }
            }
        } else if let Some((_, lines, _)) = open.as_mut() {
            lines.push(line);
        }
    }
    blocks
}

/// The first command of the first shell block under "## Quick start".
pub fn run_command(readme: &str) -> String {
    let start = readme
        .find("\n## Quick start")
        .expect("README.md has a Quick start");
    let (_, lines) = shell_blocks(&readme[start..])
        .into_iter()
        .next()
        .expect("a shell block under Quick start");
    lines
        .iter()
        .map(|l| l.trim())
        .find(|l| !l.is_empty() && !l.starts_with('#'))
        .expect("a command in it")
        .to_string()
}

fn assignment(line: &str) -> Option<(String, String)> {
    let line = line.strip_prefix("export ").unwrap_or(line);
    let (name, value) = line.split_once('=')?;
    let valid = name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    valid.then(|| (name.to_string(), value.trim().to_string()))
}

/// Backticked fragments of an expectation comment (`#   → …`), if it is one.
fn expectation(line: &str) -> Option<Vec<String>> {
    let rest = line.strip_prefix('#')?.trim_start().strip_prefix('→')?;
    Some(
        rest.split('`')
            .skip(1)
            .step_by(2)
            .map(str::to_string)
            .collect(),
    )
}

/// Every example of every shell block holding a `grpcurl` line, in order.
pub fn examples(readme: &str) -> Result<Vec<Example>, String> {
    let mut out: Vec<Example> = Vec::new();
    for (start, lines) in shell_blocks(readme) {
        if !lines.iter().any(|l| l.trim_start().starts_with("grpcurl ")) {
            continue;
        }
        // Join `\` continuations into logical lines.
        let mut logical: Vec<(usize, String)> = Vec::new();
        let mut pending: Option<(usize, String)> = None;
        for (i, raw) in lines.iter().enumerate() {
            let (at, mut text) = pending.take().unwrap_or_else(|| (start + i, String::new()));
            let trimmed = raw.trim();
            if let Some(head) = trimmed.strip_suffix('\\') {
                text.push_str(head);
                text.push(' ');
                pending = Some((at, text));
            } else {
                text.push_str(trimmed);
                logical.push((at, text));
            }
        }
        if let Some((at, _)) = pending {
            return Err(format!(
                "README.md line {at}: a `\\` continues into nothing"
            ));
        }
        let mut last_was_command = false;
        for (at, text) in logical {
            if text.is_empty() {
                last_was_command = false;
            } else if let Some(expect) = expectation(&text) {
                match out.last_mut() {
                    Some(Example {
                        line: Line::Command { expect: e, .. },
                        ..
                    }) if last_was_command => e.extend(expect),
                    _ => {
                        return Err(format!(
                        "README.md line {at}: an expected answer (`# →`) that follows no command"
                    ))
                    }
                }
            } else if text.starts_with('#') {
                last_was_command = false;
            } else if text.starts_with("grpcurl ") {
                out.push(Example {
                    at,
                    line: Line::Command {
                        text,
                        expect: Vec::new(),
                    },
                });
                last_was_command = true;
            } else if let Some((name, value)) = assignment(&text) {
                out.push(Example {
                    at,
                    line: Line::Assign { name, value },
                });
                last_was_command = false;
            } else {
                return Err(format!(
                    "README.md line {at}: `{text}` is in a block of grpcurl examples but is \
                     not a comment, an assignment or a grpcurl command"
                ));
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "# T\n\n## Quick start\n\n```sh\n# comment\ncargo run -- dev\n```\n\n\
        ```sh\nA=127.0.0.1:50051\ngrpcurl -plaintext \\\n  -d '{}' $A x/Y\n#   → `\"allowed\": false`, `\"reason\": \"X\"`\n\
        # a note\ngrpcurl -d '{\"key_id\": \"<keyId>\"}' $A x/Z   # trailing\n```\n\n```sh\nhelm install x\n```\n";

    #[test]
    fn the_run_command_is_the_quick_starts_first_command() {
        assert_eq!(run_command(SAMPLE), "cargo run -- dev");
    }

    #[test]
    fn commands_assignments_and_expected_answers_are_read_in_order() {
        let e = examples(SAMPLE).unwrap();
        assert_eq!(e.len(), 3, "{e:?}");
        assert_eq!(
            e[0].line,
            Line::Assign {
                name: "A".into(),
                value: "127.0.0.1:50051".into()
            }
        );
        assert_eq!(e[1].at, 12);
        assert_eq!(
            e[1].line,
            Line::Command {
                text: "grpcurl -plaintext  -d '{}' $A x/Y".into(),
                expect: vec!["\"allowed\": false".into(), "\"reason\": \"X\"".into()],
            }
        );
        assert!(matches!(&e[2].line, Line::Command { expect, .. } if expect.is_empty()));
    }

    #[test]
    fn anything_else_in_an_example_block_is_refused() {
        let bad = "```sh\ngrpcurl x\ncurl y\n```\n";
        assert!(examples(bad).unwrap_err().contains("line 3"));
        let orphan = "```sh\n#   → `x`\ngrpcurl x\n```\n";
        assert!(examples(orphan).unwrap_err().contains("follows no command"));
    }
}

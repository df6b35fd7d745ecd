//! Drives gRPC with h2load (nghttp2-client), a compiled HTTP/2 client that
//! costs the machine less than the server it measures: one framed request
//! body per run, sent `-n` times over `-c` connections with `-m` streams
//! each. h2load ignores gRPC trailers (a `grpc-status` error still counts
//! as a success), so every run against Tollgate is checked against
//! Tollgate's own decision counters (`crate::suite`).
//!
//! CPU: the server's from `/proc/<pid>/stat` (utime + stime) before and
//! after the run; h2load's from the shell's `times` around it.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, ensure, Context};
use prost::Message;
use serde::{Deserialize, Serialize};

/// How h2load drives every run (`h2load -n N -c C -m M -t T`).
#[derive(Debug, Clone, clap::Args)]
pub struct H2Opts {
    /// Requests per run (`h2load -n`).
    #[arg(long = "h2-requests", default_value_t = 100_000)]
    pub requests: u64,
    /// Connections (`h2load -c`).
    #[arg(long = "h2-clients", default_value_t = 4)]
    pub clients: u32,
    /// Streams in flight per connection (`h2load -m`).
    #[arg(long = "h2-streams", default_value_t = 32)]
    pub streams: u32,
    /// h2load's own threads (`h2load -t`). Its own id: the global
    /// `--threads` (the driver's runtime) is already `threads`.
    #[arg(long = "h2-threads", id = "h2_threads", default_value_t = 1)]
    pub threads: u32,
    /// The h2load binary.
    #[arg(long, default_value = "h2load")]
    pub h2load: PathBuf,
    /// More request headers (`h2load -H`), e.g. the caller's token.
    #[arg(skip)]
    pub headers: Vec<String>,
}

/// A gRPC request as it travels in a DATA frame: compressed flag (0),
/// big-endian length, the encoded message.
pub fn grpc_frame<M: Message>(msg: &M) -> Vec<u8> {
    let body = msg.encode_to_vec();
    let mut out = Vec::with_capacity(body.len() + 5);
    out.push(0);
    out.extend_from_slice(&u32::try_from(body.len()).expect("small").to_be_bytes());
    out.extend_from_slice(&body);
    out
}

/// CPU seconds (user + system) a process has used so far.
pub fn process_cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    Ok(cpu_seconds_with_children(pid)?.0)
}

/// CPU seconds (user + system) a process has used so far, and those of its
/// children it has waited for (a `wrk` it ran to completion).
pub fn cpu_seconds_with_children(pid: u32) -> anyhow::Result<(f64, f64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) start with the
    // state (field 3); utime, stime, cutime and cstime are fields 14–17.
    let rest = stat.rsplit_once(')').context("malformed stat")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> anyhow::Result<f64> {
        Ok(f.get(i).context("short /proc stat")?.parse::<f64>()?)
    };
    Ok((
        (ticks(11)? + ticks(12)?) / clock_ticks(),
        (ticks(13)? + ticks(14)?) / clock_ticks(),
    ))
}

fn clock_ticks() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// What one h2load run reported (also h2drive's JSON line, `crate::h2drive`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct H2Run {
    pub requests: u64,
    pub succeeded: u64,
    pub failed: u64,
    pub errored: u64,
    pub seconds: f64,
    pub rps: f64,
    /// h2load's CPU time (user + system), seconds.
    pub client_cpu_seconds: f64,
}

/// Runs h2load once: `body` POSTed to `url` (`http://host:port/pkg.Service/Method`).
pub fn run(o: &H2Opts, url: &str, body: &Path, requests: u64) -> anyhow::Result<H2Run> {
    // `times` prints the shell's own and its children's CPU times: the
    // second line is h2load's.
    let out = Command::new("bash")
        .arg("-c")
        .arg(r#""$@" && times"#)
        .arg("h2load-run")
        .arg(&o.h2load)
        .args(["-n", &requests.to_string()])
        .args(["-c", &o.clients.to_string()])
        .args(["-m", &o.streams.to_string()])
        .args(["-t", &o.threads.to_string()])
        .arg("-d")
        .arg(body)
        .args(["-H", "content-type: application/grpc", "-H", "te: trailers"])
        .args(o.headers.iter().flat_map(|h| ["-H", h.as_str()]))
        .arg(url)
        .output()
        .with_context(|| format!("running {}", o.h2load.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "h2load failed ({}): {}{}",
            out.status,
            text,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    parse(&text)
}

/// Parses h2load's summary and the `times` lines after it.
pub fn parse(text: &str) -> anyhow::Result<H2Run> {
    let line = |prefix: &str| {
        text.lines()
            .map(str::trim)
            .find(|l| l.starts_with(prefix))
            .with_context(|| format!("h2load printed no `{prefix}` line:\n{text}"))
    };
    // "finished in 2.61s, 38264.07 req/s, 4.02MB/s"
    let finished = line("finished in")?;
    let mut parts = finished.trim_start_matches("finished in ").split(", ");
    let seconds = duration_seconds(parts.next().context("no duration")?)?;
    let rps: f64 = parts
        .next()
        .and_then(|p| p.strip_suffix(" req/s"))
        .context("no req/s")?
        .parse()?;
    // "requests: 100000 total, 100000 started, 100000 done, 100000 succeeded, 0 failed, 0 errored, 0 timeout"
    let requests = line("requests:")?;
    let count = |what: &str| -> anyhow::Result<u64> {
        requests
            .trim_start_matches("requests: ")
            .split(", ")
            .find_map(|p| p.strip_suffix(what).map(str::trim))
            .with_context(|| format!("no `{what}` count in {requests:?}"))?
            .parse()
            .map_err(Into::into)
    };
    // `times`: the children's line is the last one, "0m1.234s 0m0.567s".
    let times = text.lines().last().context("no times line")?;
    let cpu: Vec<f64> = times
        .split_whitespace()
        .map(minutes_seconds)
        .collect::<anyhow::Result<_>>()?;
    ensure!(cpu.len() == 2, "unexpected times line {times:?}");
    Ok(H2Run {
        requests: count(" total")?,
        succeeded: count(" succeeded")?,
        failed: count(" failed")?,
        errored: count(" errored")?,
        seconds,
        rps,
        client_cpu_seconds: cpu[0] + cpu[1],
    })
}

/// h2load durations: "2.61s", "512.33ms", "1m3.2s" is not printed.
fn duration_seconds(s: &str) -> anyhow::Result<f64> {
    if let Some(ms) = s.strip_suffix("ms") {
        return Ok(ms.parse::<f64>()? / 1e3);
    }
    if let Some(us) = s.strip_suffix("us") {
        return Ok(us.parse::<f64>()? / 1e6);
    }
    Ok(s.strip_suffix('s').context("no unit")?.parse()?)
}

/// bash `times`: "0m1.234s".
fn minutes_seconds(s: &str) -> anyhow::Result<f64> {
    let (m, rest) = s.split_once('m').context("no minutes")?;
    let secs: f64 = rest.strip_suffix('s').context("no seconds")?.parse()?;
    Ok(m.parse::<f64>()? * 60.0 + secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_h2load_summary_and_times() {
        let text = "starting benchmark...\n\
            finished in 512.33ms, 195186.45 req/s, 30.12MB/s\n\
            requests: 100000 total, 100000 started, 100000 done, 99990 succeeded, 10 failed, 0 errored, 0 timeout\n\
            status codes: 100000 2xx, 0 3xx, 0 4xx, 0 5xx\n\
            0m0.001s 0m0.002s\n\
            0m0.250s 0m0.050s\n";
        let r = parse(text).unwrap();
        assert_eq!(
            (r.requests, r.succeeded, r.failed, r.errored),
            (100000, 99990, 10, 0)
        );
        assert!((r.seconds - 0.51233).abs() < 1e-9);
        assert!((r.rps - 195186.45).abs() < 1e-6);
        assert!((r.client_cpu_seconds - 0.3).abs() < 1e-9);
    }

    #[test]
    fn frames_a_grpc_message_with_its_length() {
        let msg = tollgate::grpc::pb::AuthenticateRequest {
            api_key: "k".into(),
            ..Default::default()
        };
        let framed = grpc_frame(&msg);
        assert_eq!(framed[0], 0);
        assert_eq!(&framed[1..5], &(framed.len() as u32 - 5).to_be_bytes());
        assert_eq!(
            tollgate::grpc::pb::AuthenticateRequest::decode(&framed[5..]).unwrap(),
            msg
        );
    }
}

//! `tollgate-load h2drive`: a lean HTTP/2 gRPC client on the `h2` crate,
//! for what h2load cannot do: many distinct request bodies (N distinct API
//! keys) in one run, and gRPC trailers read.
//!
//! - One current-thread tokio runtime in its own process (the suite starts
//!   it as a child, like h2load), `-c` connections (h2c, prior knowledge),
//!   `-m` streams in flight on each, `-n` requests in all.
//! - Request `i` sends body `i mod N` of the bodies file, so N bodies with
//!   N keys cycle over all N keys.
//! - Success only when the answer is HTTP 200 with `grpc-status: 0` (in the
//!   trailers, or in the headers of a trailers-only answer). `failed`: an
//!   answer with another status or without one; `errored`: the stream or
//!   connection broke (h2 error).
//! - Prints one JSON line with the fields of [`H2Run`] (`requests` is
//!   `-n`; `rps` counts answered requests, as h2load's req/s does;
//!   `client_cpu_seconds` is this whole process's user + system CPU from
//!   `/proc/self/stat`, as `times` gives h2load's).
//!
//! The bodies file: gRPC request frames concatenated exactly as they travel
//! in DATA frames (flag byte 0, big-endian u32 length, the encoded
//! message), so each frame's own 5-byte prefix delimits it
//! ([`write_bodies`] writes one from [`crate::h2load::grpc_frame`]s).
//!
//! Cheap per request: bodies are slices of one `Bytes` buffer, the URI and
//! `HeaderMap` are built once and cloned, every worker is a long-lived
//! task (no spawn per request), and h2's tracing spans meet a global
//! never-interested subscriber. What is left is h2's own work per stream
//! (HPACK, frames, its stream store), about twice h2load's CPU per request
//! (measured against the no-op server; see the module's tests for
//! correctness).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{bail, ensure, Context};
use bytes::Bytes;
use h2::client::SendRequest;
use http::header::{HeaderValue, CONTENT_TYPE, TE};
use http::{HeaderMap, Method, Request, StatusCode, Uri};
use tokio::net::TcpStream;

use crate::h2load::{self, H2Opts, H2Run};

/// `tollgate-load h2drive`'s options (the first three mirror [`H2Opts`]).
#[derive(Debug, Clone, clap::Args)]
pub struct DriveOpts {
    /// Requests in all (as `h2load -n`).
    #[arg(short = 'n', long = "requests", default_value_t = 100_000)]
    pub requests: u64,
    /// Connections (as `h2load -c`).
    #[arg(short = 'c', long = "clients", default_value_t = 4)]
    pub clients: u32,
    /// Streams in flight per connection (as `h2load -m`).
    #[arg(short = 'm', long = "streams", default_value_t = 32)]
    pub streams: u32,
    /// gRPC request frames, concatenated as they travel (flag 0, big-endian
    /// u32 length, message); request i sends frame i mod N.
    #[arg(long)]
    pub bodies: PathBuf,
    /// `http://host:port/pkg.Service/Method` (h2c, prior knowledge).
    pub url: String,
}

/// Splits a bodies file into its frames (each with its 5-byte prefix, as
/// sent). Compressed frames are refused: no `grpc-encoding` is sent.
pub fn parse_bodies(data: Bytes) -> anyhow::Result<Vec<Bytes>> {
    let mut out = Vec::new();
    let mut at = 0usize;
    while at < data.len() {
        let rest = &data[at..];
        ensure!(
            rest.len() >= 5,
            "bodies: truncated frame prefix at byte {at}"
        );
        ensure!(
            rest[0] == 0,
            "bodies: frame at byte {at} has flag {} (only uncompressed frames, flag 0)",
            rest[0]
        );
        let len = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
        ensure!(
            rest.len() >= 5 + len,
            "bodies: frame at byte {at} claims {len} bytes, {} left",
            rest.len() - 5
        );
        out.push(data.slice(at..at + 5 + len));
        at += 5 + len;
    }
    ensure!(!out.is_empty(), "bodies: no frames");
    Ok(out)
}

/// Writes framed bodies (from [`h2load::grpc_frame`]) as one bodies file.
pub fn write_bodies<I: IntoIterator<Item = Vec<u8>>>(path: &Path, frames: I) -> anyhow::Result<()> {
    let mut all = Vec::new();
    for f in frames {
        all.extend_from_slice(&f);
    }
    std::fs::write(path, all).with_context(|| format!("writing {}", path.display()))
}

/// Counts of one drive.
#[derive(Debug, Default, Clone)]
pub struct Counts {
    pub succeeded: u64,
    pub failed: u64,
    pub errored: u64,
    pub seconds: f64,
    /// The first failure or error, for the message.
    pub first_problem: Option<String>,
}

struct Shared {
    uri: Uri,
    headers: HeaderMap,
    bodies: Vec<Bytes>,
    requests: u64,
    next: AtomicU64,
    succeeded: AtomicU64,
    failed: AtomicU64,
    errored: AtomicU64,
    first_problem: Mutex<Option<String>>,
}

impl Shared {
    fn problem(&self, what: impl FnOnce() -> String) {
        let mut p = self.first_problem.lock().unwrap_or_else(|e| e.into_inner());
        if p.is_none() {
            *p = Some(what());
        }
    }
}

/// Drives `requests` requests at `url` on the current runtime (h2drive's
/// own: one current-thread runtime, so every task shares one thread and
/// the atomics are never contended).
pub async fn drive(
    url: &str,
    bodies: Vec<Bytes>,
    requests: u64,
    clients: u32,
    streams: u32,
) -> anyhow::Result<Counts> {
    let uri: Uri = url.parse().with_context(|| format!("bad url {url:?}"))?;
    ensure!(
        uri.scheme_str() == Some("http"),
        "h2drive speaks h2c only (http://), not {url:?}"
    );
    let authority = uri.authority().context("url has no host:port")?.to_string();
    ensure!(!bodies.is_empty(), "no bodies");
    ensure!(
        clients > 0 && streams > 0,
        "connections and streams must be ≥ 1"
    );
    let mut headers = HeaderMap::new();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    headers.insert(TE, HeaderValue::from_static("trailers"));
    let shared = Arc::new(Shared {
        uri,
        headers,
        bodies,
        requests,
        next: AtomicU64::new(0),
        succeeded: AtomicU64::new(0),
        failed: AtomicU64::new(0),
        errored: AtomicU64::new(0),
        first_problem: Mutex::new(None),
    });
    let start = Instant::now();
    let mut workers = Vec::new();
    let mut conns = Vec::new();
    for _ in 0..clients {
        let tcp = TcpStream::connect(&authority)
            .await
            .with_context(|| format!("connecting to {authority}"))?;
        tcp.set_nodelay(true)?;
        let (send, conn) = h2::client::Builder::new()
            .initial_window_size(1 << 20)
            .initial_connection_window_size(1 << 24)
            .handshake::<_, Bytes>(tcp)
            .await
            .context("HTTP/2 handshake")?;
        let s = shared.clone();
        conns.push(tokio::spawn(async move {
            if let Err(e) = conn.await {
                s.problem(|| format!("connection: {e}"));
            }
        }));
        for _ in 0..streams {
            workers.push(tokio::spawn(worker(send.clone(), shared.clone())));
        }
    }
    for w in workers {
        w.await?;
    }
    let seconds = start.elapsed().as_secs_f64();
    for c in conns {
        c.abort();
    }
    let first_problem = shared
        .first_problem
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take();
    Ok(Counts {
        succeeded: shared.succeeded.load(Relaxed),
        failed: shared.failed.load(Relaxed),
        errored: shared.errored.load(Relaxed),
        seconds,
        first_problem,
    })
}

enum Outcome {
    Ok,
    /// HTTP status and grpc-status (if any) of an answer that is not OK.
    Failed(StatusCode, Option<HeaderValue>, Option<HeaderValue>),
}

async fn worker(mut send: SendRequest<Bytes>, s: Arc<Shared>) {
    let n = s.bodies.len() as u64;
    loop {
        let i = s.next.fetch_add(1, Relaxed);
        if i >= s.requests {
            return;
        }
        let body = s.bodies[(i % n) as usize].clone();
        match one(&mut send, &s, body).await {
            Ok(Outcome::Ok) => {
                s.succeeded.fetch_add(1, Relaxed);
            }
            Ok(Outcome::Failed(status, grpc, message)) => {
                s.failed.fetch_add(1, Relaxed);
                s.problem(|| {
                    format!("HTTP {status}, grpc-status {grpc:?}, grpc-message {message:?}")
                });
            }
            Err(e) => {
                s.errored.fetch_add(1, Relaxed);
                s.problem(|| format!("stream: {e}"));
                // A broken connection stays broken: leave the remaining
                // requests to the other connections.
                if e.is_io() || e.is_go_away() {
                    return;
                }
            }
        }
    }
}

async fn one(send: &mut SendRequest<Bytes>, s: &Shared, body: Bytes) -> Result<Outcome, h2::Error> {
    std::future::poll_fn(|cx| send.poll_ready(cx)).await?;
    let mut req = Request::new(());
    *req.method_mut() = Method::POST;
    *req.uri_mut() = s.uri.clone();
    *req.headers_mut() = s.headers.clone();
    let (response, mut stream) = send.send_request(req, false)?;
    stream.send_data(body, true)?;
    let (head, mut recv) = response.await?.into_parts();
    let grpc_status = |h: &HeaderMap| h.get("grpc-status").cloned();
    if head.status != StatusCode::OK {
        return Ok(Outcome::Failed(
            head.status,
            grpc_status(&head.headers),
            head.headers.get("grpc-message").cloned(),
        ));
    }
    // Trailers-only answer: the status is in the headers.
    if let Some(st) = grpc_status(&head.headers) {
        return Ok(if st == "0" {
            Outcome::Ok
        } else {
            Outcome::Failed(
                head.status,
                Some(st),
                head.headers.get("grpc-message").cloned(),
            )
        });
    }
    while let Some(chunk) = recv.data().await {
        let chunk = chunk?;
        let _ = recv.flow_control().release_capacity(chunk.len());
    }
    let trailers = recv.trailers().await?.unwrap_or_default();
    Ok(match grpc_status(&trailers) {
        Some(st) if st == "0" => Outcome::Ok,
        st => Outcome::Failed(head.status, st, trailers.get("grpc-message").cloned()),
    })
}

/// The `h2drive` subcommand: drives, prints one JSON line ([`H2Run`]).
pub fn main(o: &DriveOpts) -> anyhow::Result<()> {
    let run = execute(o)?;
    println!("{}", serde_json::to_string(&run)?);
    Ok(())
}

/// Reads the bodies, drives on a fresh current-thread runtime, reports.
fn execute(o: &DriveOpts) -> anyhow::Result<H2Run> {
    let data = std::fs::read(&o.bodies).with_context(|| format!("{}", o.bodies.display()))?;
    let bodies = parse_bodies(Bytes::from(data))?;
    // h2's spans and events: with no dispatcher set, `tracing`'s `log`
    // fallback checks every one of them; a global "never interested"
    // subscriber turns them into a cached no (a few % of the client's CPU).
    let _ = tracing::subscriber::set_global_default(tracing::subscriber::NoSubscriber::new());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let counts = rt.block_on(drive(&o.url, bodies, o.requests, o.clients, o.streams))?;
    drop(rt);
    if let Some(p) = &counts.first_problem {
        eprintln!("h2drive: first problem: {p}");
    }
    Ok(H2Run {
        requests: o.requests,
        succeeded: counts.succeeded,
        failed: counts.failed,
        errored: counts.errored,
        seconds: counts.seconds,
        rps: (counts.succeeded + counts.failed) as f64 / counts.seconds.max(1e-9),
        client_cpu_seconds: h2load::process_cpu_seconds(std::process::id())?,
    })
}

/// Runs `tollgate-load h2drive` (this binary) once as a child process, with
/// h2load's `-n`/`-c`/`-m` from `o`, and reads its JSON line.
pub fn run(o: &H2Opts, url: &str, bodies: &Path, requests: u64) -> anyhow::Result<H2Run> {
    let exe = std::env::current_exe()?;
    let out = Command::new(&exe)
        .arg("h2drive")
        .args(["-n", &requests.to_string()])
        .args(["-c", &o.clients.to_string()])
        .args(["-m", &o.streams.to_string()])
        .arg("--bodies")
        .arg(bodies)
        .arg(url)
        .output()
        .with_context(|| format!("running {} h2drive", exe.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "h2drive failed ({}): {}{}",
            out.status,
            text,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    parse(&text)
        .with_context(|| format!("h2drive's stderr: {}", String::from_utf8_lossy(&out.stderr)))
}

/// Reads h2drive's output: the last non-empty line is the JSON [`H2Run`].
pub fn parse(text: &str) -> anyhow::Result<H2Run> {
    let line = text
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .context("h2drive printed nothing")?;
    serde_json::from_str(line).with_context(|| format!("h2drive's line {line:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::noop::{self, Canned, RuntimeShape};
    use prost::Message;
    use tollgate::grpc::pb::{AuthenticateRequest, AuthenticateResponse};

    fn frame(key: &str) -> Vec<u8> {
        h2load::grpc_frame(&AuthenticateRequest {
            api_key: key.into(),
            ..Default::default()
        })
    }

    #[test]
    fn bodies_file_splits_on_each_frames_prefix() {
        let frames: Vec<Vec<u8>> = ["a", "bb", "ccc"].iter().map(|k| frame(k)).collect();
        let data: Vec<u8> = frames.concat();
        let parsed = parse_bodies(Bytes::from(data)).unwrap();
        assert_eq!(parsed.len(), 3);
        for (p, f) in parsed.iter().zip(&frames) {
            assert_eq!(p.as_ref(), f.as_slice());
        }
        let dir = std::env::temp_dir().join(format!("h2drive-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("bodies.bin");
        write_bodies(&file, frames.clone()).unwrap();
        let back = parse_bodies(Bytes::from(std::fs::read(&file).unwrap())).unwrap();
        assert_eq!(back, parsed);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bodies_file_refuses_truncation_compression_and_emptiness() {
        let f = frame("key");
        let cut = Bytes::from(f[..f.len() - 1].to_vec());
        assert!(parse_bodies(cut)
            .unwrap_err()
            .to_string()
            .contains("claims"));
        let short = Bytes::from(vec![0u8, 0, 0]);
        assert!(parse_bodies(short)
            .unwrap_err()
            .to_string()
            .contains("prefix"));
        let mut compressed = f.clone();
        compressed[0] = 1;
        assert!(parse_bodies(Bytes::from(compressed))
            .unwrap_err()
            .to_string()
            .contains("flag 1"));
        assert!(parse_bodies(Bytes::new()).is_err());
        // An empty message is a valid frame.
        assert_eq!(parse_bodies(Bytes::from(vec![0u8; 5])).unwrap().len(), 1);
    }

    #[test]
    fn parses_its_json_line_after_other_output() {
        let text =
            "something else\n{\"requests\":300,\"succeeded\":298,\"failed\":1,\"errored\":1,\
            \"seconds\":0.5,\"rps\":598.0,\"client_cpu_seconds\":0.02}\n\n";
        let r = parse(text).unwrap();
        assert_eq!(
            (r.requests, r.succeeded, r.failed, r.errored),
            (300, 298, 1, 1)
        );
        assert!((r.seconds - 0.5).abs() < 1e-12);
        assert!((r.client_cpu_seconds - 0.02).abs() < 1e-12);
        assert!(parse("").is_err());
        assert!(parse("finished in 1s").is_err());
    }

    /// The no-op server on its own thread (it serves until the test process ends).
    fn noop_server() -> std::net::SocketAddr {
        let addr = crate::fixture::free_port().unwrap();
        let canned = Canned {
            authenticate: hex::encode(
                AuthenticateResponse {
                    allowed: true,
                    ..Default::default()
                }
                .encode_to_vec(),
            ),
            ..Default::default()
        };
        std::thread::spawn(move || noop::serve(addr, RuntimeShape::Current, canned, ""));
        for _ in 0..200 {
            if std::net::TcpStream::connect(addr).is_ok() {
                return addr;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        panic!("no-op server did not start on {addr}");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn every_request_to_the_noop_server_succeeds_with_grpc_status_0() {
        let addr = noop_server();
        let bodies = parse_bodies(Bytes::from(
            (0..37)
                .map(|i| frame(&format!("key-{i}")))
                .collect::<Vec<_>>()
                .concat(),
        ))
        .unwrap();
        let url = format!("http://{addr}/tollgate.v1.AuthService/Authenticate");
        let c = drive(&url, bodies, 500, 3, 8).await.unwrap();
        assert_eq!(
            (c.succeeded, c.failed, c.errored),
            (500, 0, 0),
            "{:?}",
            c.first_problem
        );
        assert!(c.seconds > 0.0);
    }

    #[test]
    fn the_subcommand_reads_its_bodies_file_and_reports_every_success() {
        let addr = noop_server();
        let dir = std::env::temp_dir().join(format!("h2drive-e2e-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("bodies.bin");
        write_bodies(&file, (0..100).map(|i| frame(&format!("key-{i}")))).unwrap();
        let run = execute(&DriveOpts {
            requests: 300,
            clients: 2,
            streams: 16,
            bodies: file,
            url: format!("http://{addr}/tollgate.v1.AuthService/Authenticate"),
        })
        .unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(
            (run.requests, run.succeeded, run.failed, run.errored),
            (300, 300, 0, 0)
        );
        assert!(run.rps > 0.0 && run.client_cpu_seconds >= 0.0);
        // Its JSON line is what the suite reads back.
        let back = parse(&serde_json::to_string(&run).unwrap()).unwrap();
        assert_eq!(back.succeeded, 300);
    }

    /// A bare h2 server that answers every request with grpc-status 0 and
    /// records the request bodies it got.
    async fn recording_server() -> (std::net::SocketAddr, std::sync::Arc<Mutex<Vec<Bytes>>>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = seen.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let record = record.clone();
                tokio::spawn(async move {
                    let mut conn = h2::server::handshake(tcp).await.unwrap();
                    while let Some(Ok((req, mut respond))) = conn.accept().await {
                        let record = record.clone();
                        tokio::spawn(async move {
                            let mut body = req.into_body();
                            let mut got = Vec::new();
                            while let Some(chunk) = body.data().await {
                                let chunk = chunk.unwrap();
                                let _ = body.flow_control().release_capacity(chunk.len());
                                got.extend_from_slice(&chunk);
                            }
                            record.lock().unwrap().push(Bytes::from(got));
                            let head = http::Response::builder()
                                .header("content-type", "application/grpc")
                                .body(())
                                .unwrap();
                            let mut send = respond.send_response(head, false).unwrap();
                            send.send_data(Bytes::from_static(&[0, 0, 0, 0, 0]), false)
                                .unwrap();
                            let mut trailers = HeaderMap::new();
                            trailers.insert("grpc-status", HeaderValue::from_static("0"));
                            send.send_trailers(trailers).unwrap();
                        });
                    }
                });
            }
        });
        (addr, seen)
    }

    #[tokio::test(flavor = "current_thread")]
    async fn requests_cycle_over_every_body() {
        let (addr, seen) = recording_server().await;
        let frames: Vec<Vec<u8>> = (0..37).map(|i| frame(&format!("key-{i}"))).collect();
        let bodies = parse_bodies(Bytes::from(frames.concat())).unwrap();
        let url = format!("http://{addr}/tollgate.v1.AuthService/Authenticate");
        let c = drive(&url, bodies, 370, 2, 8).await.unwrap();
        assert_eq!(
            (c.succeeded, c.failed, c.errored),
            (370, 0, 0),
            "{:?}",
            c.first_problem
        );
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 370);
        // Every body exactly ten times: 370 requests over 37 bodies.
        for f in &frames {
            assert_eq!(
                seen.iter().filter(|b| b.as_ref() == f.as_slice()).count(),
                10
            );
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_non_zero_grpc_status_counts_as_failed() {
        let addr = noop_server();
        let bodies = parse_bodies(Bytes::from(frame("k"))).unwrap();
        // The no-op answers GetKey with UNIMPLEMENTED (grpc-status 12).
        let url = format!("http://{addr}/tollgate.v1.AuthService/GetKey");
        let c = drive(&url, bodies, 50, 1, 4).await.unwrap();
        assert_eq!((c.succeeded, c.failed, c.errored), (0, 50, 0));
        let p = c.first_problem.unwrap();
        assert!(p.contains("\"12\""), "{p}");
    }
}

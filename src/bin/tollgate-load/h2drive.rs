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
//! `HeaderMap` are built once and cloned, and every worker is a long-lived
//! task (no spawn per request).

use std::cell::{Cell, RefCell};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::rc::Rc;
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
    next: Cell<u64>,
    succeeded: Cell<u64>,
    failed: Cell<u64>,
    errored: Cell<u64>,
    first_problem: RefCell<Option<String>>,
}

impl Shared {
    fn problem(&self, what: impl FnOnce() -> String) {
        let mut p = self.first_problem.borrow_mut();
        if p.is_none() {
            *p = Some(what());
        }
    }
}

/// Drives `requests` requests at `url`; must run inside a current-thread
/// runtime (it uses a `LocalSet`).
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
    let shared = Rc::new(Shared {
        uri,
        headers,
        bodies,
        requests,
        next: Cell::new(0),
        succeeded: Cell::new(0),
        failed: Cell::new(0),
        errored: Cell::new(0),
        first_problem: RefCell::new(None),
    });
    let local = tokio::task::LocalSet::new();
    let seconds = local
        .run_until(async {
            let start = Instant::now();
            let mut workers = Vec::new();
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
                tokio::task::spawn_local(async move {
                    if let Err(e) = conn.await {
                        s.problem(|| format!("connection: {e}"));
                    }
                });
                for _ in 0..streams {
                    workers.push(tokio::task::spawn_local(worker(
                        send.clone(),
                        shared.clone(),
                    )));
                }
            }
            for w in workers {
                w.await?;
            }
            anyhow::Ok(start.elapsed().as_secs_f64())
        })
        .await?;
    drop(local);
    let first_problem = shared.first_problem.take();
    Ok(Counts {
        succeeded: shared.succeeded.get(),
        failed: shared.failed.get(),
        errored: shared.errored.get(),
        seconds,
        first_problem,
    })
}

enum Outcome {
    Ok,
    /// HTTP status and grpc-status (if any) of an answer that is not OK.
    Failed(StatusCode, Option<HeaderValue>, Option<HeaderValue>),
}

async fn worker(mut send: SendRequest<Bytes>, s: Rc<Shared>) {
    let n = s.bodies.len() as u64;
    loop {
        let i = s.next.get();
        if i >= s.requests {
            return;
        }
        s.next.set(i + 1);
        let body = s.bodies[(i % n) as usize].clone();
        match one(&mut send, &s, body).await {
            Ok(Outcome::Ok) => s.succeeded.set(s.succeeded.get() + 1),
            Ok(Outcome::Failed(status, grpc, message)) => {
                s.failed.set(s.failed.get() + 1);
                s.problem(|| {
                    format!("HTTP {status}, grpc-status {grpc:?}, grpc-message {message:?}")
                });
            }
            Err(e) => {
                s.errored.set(s.errored.get() + 1);
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
    let run = H2Run {
        requests: o.requests,
        succeeded: counts.succeeded,
        failed: counts.failed,
        errored: counts.errored,
        seconds: counts.seconds,
        rps: (counts.succeeded + counts.failed) as f64 / counts.seconds.max(1e-9),
        client_cpu_seconds: h2load::process_cpu_seconds(std::process::id())?,
    };
    println!("{}", serde_json::to_string(&run)?);
    Ok(())
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

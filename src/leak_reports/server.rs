//! The listener: hyper 1 over HTTP/1.1, bounded (connections, header and
//! body time, body size), and the key refresher.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio::sync::{Notify, Semaphore};
use tokio::task::JoinHandle;

use super::keys::{self, KeyRing, SignatureError};
use super::LeakReportSettings;
use crate::domain::console::AuditContext;
use crate::error::Error;
use crate::manage::revocation::LeakedToken;
use crate::manage::Manager;

/// Connections served at once, at most; more wait in the accept queue.
const MAX_CONNECTIONS: usize = 256;
/// Longest time for a request's headers, and for its body.
const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Shortest pause between two key refreshes an unknown key id triggers.
const MIN_REFRESH_GAP: Duration = Duration::from_secs(60);

/// GitHub's headers.
const KEY_ID_HEADER: &str = "github-public-key-identifier";
const SIGNATURE_HEADER: &str = "github-public-key-signature";

/// A running endpoint.
pub struct LeakEndpoint {
    /// The address it listens on.
    pub addr: SocketAddr,
    /// Its accept loop and key refresher.
    pub tasks: Vec<JoinHandle<()>>,
    /// The public keys in force.
    pub keys: Arc<KeyRing>,
}

struct Endpoint {
    manager: Arc<Manager>,
    keys: Arc<KeyRing>,
    refresh: Arc<Notify>,
    max_body: usize,
}

#[derive(Deserialize)]
struct Report {
    token: String,
    #[serde(default, rename = "type")]
    token_type: String,
    #[serde(default)]
    url: String,
    #[serde(default)]
    source: String,
}

/// Starts the endpoint when `settings.listen` is set. A key file that
/// cannot be read or parsed fails the start; keys from a URL are fetched
/// in the background (until then every request is refused with 503).
pub async fn serve(
    settings: &LeakReportSettings,
    manager: Arc<Manager>,
) -> std::io::Result<Option<LeakEndpoint>> {
    let Some(listen) = settings.listen else {
        return Ok(None);
    };
    let ring = Arc::new(KeyRing::default());
    if let Some(path) = &settings.public_keys_file {
        ring.replace(read_file(path).await.map_err(|e| {
            std::io::Error::other(format!(
                "configuration field `leak_reports.public_keys_file`: {e}"
            ))
        })?);
    }
    let listener = TcpListener::bind(listen).await.map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("configuration field `leak_reports.listen`: cannot bind {listen}: {e}"),
        )
    })?;
    let addr = listener.local_addr()?;
    let refresh = Arc::new(Notify::new());
    let refresher = tokio::spawn(refresh_keys(
        settings.clone(),
        ring.clone(),
        refresh.clone(),
    ));
    let endpoint = Arc::new(Endpoint {
        manager,
        keys: ring.clone(),
        refresh,
        max_body: settings.max_body_bytes,
    });
    let accept = tokio::spawn(accept(listener, endpoint));
    tracing::info!(%addr, "leak report endpoint listening");
    Ok(Some(LeakEndpoint {
        addr,
        tasks: vec![accept, refresher],
        keys: ring,
    }))
}

async fn read_file(
    path: &std::path::Path,
) -> Result<std::collections::HashMap<String, p256::ecdsa::VerifyingKey>, String> {
    let bytes = tokio::fs::read(path).await.map_err(|e| e.to_string())?;
    keys::parse(&bytes).map_err(|e| e.to_string())
}

async fn fetch(
    client: &reqwest::Client,
    url: &str,
) -> Result<std::collections::HashMap<String, p256::ecdsa::VerifyingKey>, String> {
    let response = client
        .get(url)
        .header("accept", "application/json")
        .send()
        .await
        .map_err(|e| e.without_url().to_string())?;
    if !response.status().is_success() {
        return Err(format!("answered {}", response.status()));
    }
    let bytes = response
        .bytes()
        .await
        .map_err(|e| e.without_url().to_string())?;
    keys::parse(&bytes).map_err(|e| e.to_string())
}

/// Reads the keys every `refresh_seconds`, and early (at most once a
/// minute) when a request names an unknown key. A failed read keeps the
/// keys in force.
async fn refresh_keys(settings: LeakReportSettings, ring: Arc<KeyRing>, early: Arc<Notify>) {
    let client = reqwest::Client::builder()
        .timeout(READ_TIMEOUT)
        .user_agent(concat!("tollgate/", env!("CARGO_PKG_VERSION")))
        .build();
    let Ok(client) = client else {
        tracing::warn!("leak reports: no HTTP client; keys are not refreshed");
        return;
    };
    let mut first = settings.public_keys_file.is_none();
    loop {
        if !first {
            tokio::select! {
                _ = tokio::time::sleep(settings.refresh()) => {}
                _ = early.notified() => {}
            }
        }
        first = false;
        let read = match &settings.public_keys_file {
            Some(path) => read_file(path).await,
            None => fetch(&client, &settings.public_keys_url).await,
        };
        match read {
            Ok(keys) => {
                tracing::debug!(keys = keys.len(), "leak reports: public keys read");
                ring.replace(keys);
            }
            Err(error) => {
                tracing::warn!(%error, "leak reports: could not read the public keys; keeping the old ones");
            }
        }
        tokio::time::sleep(MIN_REFRESH_GAP.min(settings.refresh())).await;
    }
}

async fn accept(listener: TcpListener, endpoint: Arc<Endpoint>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(error) => {
                crate::net::accept_failed("leak reports", &error).await;
                continue;
            }
        };
        let endpoint = endpoint.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let service = hyper::service::service_fn(move |req| handle(req, endpoint.clone()));
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(READ_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn json(status: StatusCode, body: Vec<u8>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

fn refusal(status: StatusCode, message: &str) -> Response<Full<Bytes>> {
    json(
        status,
        serde_json::to_vec(&serde_json::json!({ "error": message }))
            .expect("a plain object serialises"),
    )
}

async fn handle(
    req: Request<Incoming>,
    endpoint: Arc<Endpoint>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    Ok(answer(req, &endpoint).await)
}

async fn answer(req: Request<Incoming>, endpoint: &Endpoint) -> Response<Full<Bytes>> {
    if req.method() != Method::POST {
        return refusal(StatusCode::METHOD_NOT_ALLOWED, "POST a signed report");
    }
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let (key_id, signature) = (header(KEY_ID_HEADER), header(SIGNATURE_HEADER));
    if key_id.is_none() || signature.is_none() {
        return refusal(StatusCode::UNAUTHORIZED, "signature headers missing");
    }
    if endpoint.keys.is_empty() {
        return refusal(
            StatusCode::SERVICE_UNAVAILABLE,
            "public keys not loaded yet",
        );
    }
    // A declared length over the bound is refused before a byte of the
    // body is read; a body that grows past it (chunked) is cut by `Limited`.
    let declared = req
        .headers()
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > endpoint.max_body as u64) {
        return refusal(StatusCode::PAYLOAD_TOO_LARGE, "body too large");
    }
    let body = Limited::new(req.into_body(), endpoint.max_body);
    let body = match tokio::time::timeout(READ_TIMEOUT, body.collect()).await {
        Err(_) => return refusal(StatusCode::REQUEST_TIMEOUT, "body too slow"),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            return refusal(StatusCode::PAYLOAD_TOO_LARGE, "body too large")
        }
        Ok(Err(_)) => return refusal(StatusCode::BAD_REQUEST, "body could not be read"),
        Ok(Ok(collected)) => collected.to_bytes(),
    };
    match endpoint
        .keys
        .verify(key_id.as_deref(), signature.as_deref(), &body)
    {
        Ok(()) => {}
        Err(SignatureError::Missing | SignatureError::UnknownKey) => {
            endpoint.refresh.notify_one();
            return refusal(StatusCode::UNAUTHORIZED, "unknown public key identifier");
        }
        Err(SignatureError::Invalid) => {
            return refusal(StatusCode::FORBIDDEN, "signature does not verify")
        }
    }
    // The body is GitHub's (signed): still, a body that is not the
    // documented array is refused whole, and the parser's message (which
    // may quote the input) is not echoed.
    let Ok(reports) = serde_json::from_slice::<Vec<Report>>(&body) else {
        return refusal(
            StatusCode::BAD_REQUEST,
            "body must be a JSON array of {token, type, url, source}",
        );
    };
    let tokens = reports
        .into_iter()
        .map(|r| LeakedToken {
            token: r.token,
            token_type: r.token_type,
            url: r.url,
            source: r.source,
        })
        .collect();
    let ctx = AuditContext {
        actor: "github-secret-scanning".into(),
        request_id: uuid::Uuid::now_v7().to_string(),
    };
    match endpoint
        .manager
        .report_leaked_as(&ctx, "github", tokens)
        .await
    {
        Ok(verdicts) => {
            let body: Vec<serde_json::Value> = verdicts
                .iter()
                .map(|v| {
                    serde_json::json!({"token_hash": v.token_hash, "token_type": v.token_type,
                        "label": v.label.as_str()})
                })
                .collect();
            json(
                StatusCode::OK,
                serde_json::to_vec(&body).expect("plain values serialise"),
            )
        }
        Err(Error::InvalidArgument(v)) => refusal(
            StatusCode::BAD_REQUEST,
            &v.0.iter()
                .map(|f| format!("{}: {}", f.field, f.description))
                .collect::<Vec<_>>()
                .join("; "),
        ),
        Err(Error::Unavailable(_)) => {
            refusal(StatusCode::SERVICE_UNAVAILABLE, "the store is unavailable")
        }
        Err(e) => {
            tracing::warn!(error = %e, "leak report failed");
            refusal(StatusCode::INTERNAL_SERVER_ERROR, "internal error")
        }
    }
}

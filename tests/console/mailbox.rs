//! A real webhook receiver on 127.0.0.1:0 (hyper): it records every signed
//! console message Tollgate POSTs and answers 200 (or, while `refuse` is
//! on, 503). Tests wait for the next message on a channel, never sleep.
#![allow(dead_code)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, Mutex};
use tokio::task::JoinHandle;

/// The secret the test Tollgate signs with.
pub const WEBHOOK_SECRET: &str = "test-webhook-secret-0123456789abcdef";

/// One POST as received.
#[derive(Debug, Clone)]
pub struct Delivered {
    pub signature: String,
    pub delivery_id: String,
    pub content_type: String,
    pub body: Vec<u8>,
    pub json: serde_json::Value,
}

impl Delivered {
    pub fn kind(&self) -> &str {
        self.json["type"].as_str().unwrap_or_default()
    }
    pub fn email(&self) -> &str {
        self.json["email"].as_str().unwrap_or_default()
    }
    pub fn token(&self) -> String {
        self.json["token"].as_str().unwrap_or_default().to_string()
    }
    pub fn tenant_id(&self) -> String {
        self.json["tenant_id"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }
}

pub struct Mailbox {
    pub addr: SocketAddr,
    received: Mutex<mpsc::UnboundedReceiver<Delivered>>,
    refuse: Arc<AtomicBool>,
    task: JoinHandle<()>,
}

async fn receive(
    req: Request<Incoming>,
    tx: mpsc::UnboundedSender<Delivered>,
    refuse: Arc<AtomicBool>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    let (signature, delivery_id, content_type) = (
        header("x-tollgate-signature"),
        header("x-tollgate-delivery"),
        header("content-type"),
    );
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes().to_vec())
        .unwrap_or_default();
    let json = serde_json::from_slice(&body).unwrap_or_default();
    let _ = tx.send(Delivered {
        signature,
        delivery_id,
        content_type,
        body,
        json,
    });
    let status = if refuse.load(Ordering::SeqCst) {
        503
    } else {
        200
    };
    Ok(Response::builder()
        .status(status)
        .body(Full::new(Bytes::new()))
        .unwrap())
}

impl Mailbox {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = mpsc::unbounded_channel();
        let refuse = Arc::new(AtomicBool::new(false));
        let r = refuse.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (tx, r) = (tx.clone(), r.clone());
                tokio::spawn(async move {
                    let service =
                        hyper::service::service_fn(move |req| receive(req, tx.clone(), r.clone()));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self {
            addr,
            received: Mutex::new(rx),
            refuse,
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}/tollgate-mail", self.addr)
    }

    /// Answer 503 (`true`) or 200 from now on.
    pub fn refuse(&self, on: bool) {
        self.refuse.store(on, Ordering::SeqCst);
    }

    /// The next message (waits for it; bounded so a missing message fails
    /// the test instead of hanging it).
    pub async fn next(&self) -> Delivered {
        tokio::time::timeout(Duration::from_secs(30), self.received.lock().await.recv())
            .await
            .expect("a console message should have been delivered")
            .expect("the mailbox is open")
    }

    /// The next message, which must be of `kind` for `email`.
    pub async fn next_for(&self, kind: &str, email: &str) -> Delivered {
        let m = self.next().await;
        assert_eq!((m.kind(), m.email()), (kind, email), "{:?}", m.json);
        m
    }

    /// Whether a message is waiting right now.
    pub async fn is_empty(&self) -> bool {
        self.received.lock().await.is_empty()
    }
}

impl Drop for Mailbox {
    fn drop(&mut self) {
        self.task.abort();
    }
}

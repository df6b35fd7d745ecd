//! The forward-auth listener: HTTP/1.1 keep-alive connections (TLS when
//! configured, with ALPN `http/1.1`), bounded headers and header-read time,
//! and a graceful stop that lets in-flight checks finish.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_stream::StreamExt;

use super::ForwardAuth;
use crate::net::Slots;
use crate::tls::Reloading;

/// Largest request head (request line and headers) read, in bytes.
const MAX_HEAD_BYTES: usize = 64 * 1024;
/// A client must send its whole request head within this.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// A running forward-auth listener.
pub struct ForwardAuthServer {
    addr: SocketAddr,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl ForwardAuthServer {
    /// Serves `handler` on `listener` (over TLS from `tls` when given),
    /// holding at most `max_connections` open.
    pub(crate) fn start(
        listener: TcpListener,
        tls: Option<Arc<Reloading>>,
        handler: ForwardAuth,
        max_connections: usize,
    ) -> std::io::Result<Self> {
        let addr = listener.local_addr()?;
        let (stop, stopped) = watch::channel(false);
        let slots = Slots::new(
            max_connections.max(1),
            "forward-auth",
            crate::telemetry::FORWARD_AUTH_CONNECTIONS_REFUSED,
        );
        let task = tokio::spawn(serve(listener, tls, Arc::new(handler), slots, stopped));
        Ok(Self { addr, stop, task })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting, lets in-flight requests finish for up to `grace`,
    /// then closes what is left.
    pub async fn shutdown(mut self, grace: Duration) {
        let _ = self.stop.send(true);
        if tokio::time::timeout(grace, &mut self.task).await.is_err() {
            tracing::warn!("forward-auth requests did not finish in time; stopping them");
            self.task.abort();
        }
    }

    /// Stops at once (a crash, or a `Running` dropped without shutdown).
    pub(crate) fn abort(&self) {
        self.task.abort();
    }
}

async fn serve(
    listener: TcpListener,
    tls: Option<Arc<Reloading>>,
    handler: Arc<ForwardAuth>,
    slots: Slots,
    mut stopped: watch::Receiver<bool>,
) {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_HEAD_BYTES);
    let graceful = GracefulShutdown::new();
    // Each connection holds a slot from accept on (a TLS handshake
    // included) until it closes; dropping the stream closes the listener.
    match tls {
        None => {
            let incoming = crate::net::accept_slotted(listener, slots);
            serve_each(incoming, &builder, &graceful, &handler, &mut stopped).await;
        }
        Some(tls) => {
            // A failed handshake is dropped before it gets here.
            let incoming = crate::tls::incoming_http1(listener, tls, slots).filter_map(Result::ok);
            serve_each(incoming, &builder, &graceful, &handler, &mut stopped).await;
        }
    }
    graceful.shutdown().await;
}

/// Serves each connection `incoming` yields until it ends or `stopped`.
async fn serve_each<I>(
    mut incoming: impl tokio_stream::Stream<Item = I> + Unpin,
    builder: &http1::Builder,
    graceful: &GracefulShutdown,
    handler: &Arc<ForwardAuth>,
    stopped: &mut watch::Receiver<bool>,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    loop {
        let io = tokio::select! {
            next = incoming.next() => match next {
                Some(io) => io,
                None => return,
            },
            _ = stopped.changed() => return,
        };
        serve_one(builder, graceful, TokioIo::new(io), handler);
    }
}

/// Serves one connection, watched by `graceful` (its slot, held by `io`,
/// goes when it ends).
fn serve_one<I>(
    builder: &http1::Builder,
    graceful: &GracefulShutdown,
    io: TokioIo<I>,
    handler: &Arc<ForwardAuth>,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let handler = handler.clone();
    let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
        let handler = handler.clone();
        async move { Ok::<_, Infallible>(handler.handle(request).await) }
    });
    let connection = graceful.watch(builder.serve_connection(io, service));
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "forward-auth connection ended with an error");
        }
    });
}

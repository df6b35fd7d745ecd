//! What every listening port does when `accept` fails (say so and pause,
//! rather than spin on an error that is still there: out of file
//! descriptors and the like), and how many connections it holds at once.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;

/// How long a port waits after a failed accept.
pub const ACCEPT_PAUSE: Duration = Duration::from_millis(100);

/// Logs a failed accept on `port` and waits [`ACCEPT_PAUSE`].
pub async fn accept_failed(port: &str, error: &std::io::Error) {
    tracing::warn!(port, %error, "accept failed");
    tokio::time::sleep(ACCEPT_PAUSE).await;
}

/// A port's connection slots: how many connections it holds at once, TLS
/// handshakes included. One more is closed on arrival and counted, so its
/// client fails over at once, and a flood of connections (or of
/// handshakes never finished) cannot take every file descriptor the
/// process has: its database connections need some too.
#[derive(Clone, Debug)]
pub struct Slots {
    free: Arc<Semaphore>,
    port: &'static str,
    refused: &'static str,
}

impl Slots {
    /// `max` slots for `port`; refusals count on the counter `refused`.
    pub fn new(max: usize, port: &'static str, refused: &'static str) -> Self {
        Self {
            free: Arc::new(Semaphore::new(max)),
            port,
            refused,
        }
    }

    /// A slot for a new connection, or `None` (counted) when all are taken.
    pub fn take(&self) -> Option<OwnedSemaphorePermit> {
        match self.free.clone().try_acquire_owned() {
            Ok(slot) => Some(slot),
            Err(_) => {
                metrics::counter!(self.refused).increment(1);
                tracing::debug!(port = self.port, "port full; closing a new connection");
                None
            }
        }
    }
}

/// A connection holding one of its port's slots until it is dropped.
#[derive(Debug)]
pub struct Slotted<IO> {
    io: IO,
    _slot: OwnedSemaphorePermit,
}

impl<IO> Slotted<IO> {
    pub fn new(io: IO, slot: OwnedSemaphorePermit) -> Self {
        Self { io, _slot: slot }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Slotted<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Slotted<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

impl<IO: Connected> Connected for Slotted<IO> {
    type ConnectInfo = IO::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

/// Accepts on `listener` in a task of its own: each connection with one
/// of `slots` (those over are closed at once and counted), without
/// Nagle's algorithm (small frames must not wait). Ends, closing the
/// listener, when the returned stream is dropped.
pub fn accept_slotted(listener: TcpListener, slots: Slots) -> ReceiverStream<Slotted<TcpStream>> {
    let (tx, rx) = mpsc::channel(128);
    tokio::spawn(async move {
        loop {
            let tcp = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((tcp, _)) => tcp,
                    Err(e) => {
                        tokio::select! {
                            () = accept_failed(slots.port, &e) => continue,
                            () = tx.closed() => return,
                        }
                    }
                },
                () = tx.closed() => return,
            };
            let Some(slot) = slots.take() else { continue };
            let _ = tcp.set_nodelay(true);
            if tx.send(Slotted::new(tcp, slot)).await.is_err() {
                return;
            }
        }
    });
    ReceiverStream::new(rx)
}

//! TLS and mutual TLS for the gRPC port: certificate, key and client CA
//! read from files (mounted from Secrets) and reloaded when they change,
//! without dropping the listener. A bad new file keeps the old config.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::ServerConfig;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{broadcast, mpsc};
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;

use crate::net::{Slots, Slotted};

/// TLS settings (`[tls]` / `TOLLGATE_TLS__*`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSettings {
    /// PEM certificate chain.
    pub cert_file: PathBuf,
    /// PEM private key.
    pub key_file: PathBuf,
    /// PEM CA bundle; when set, clients must present a certificate it signed.
    #[serde(default)]
    pub client_ca_file: Option<PathBuf>,
    /// How often the files are checked for changes, in seconds.
    #[serde(default = "default_reload")]
    pub reload_seconds: u64,
}

fn default_reload() -> u64 {
    10
}

/// Why TLS files cannot be used. Never carries key material.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("tls: cannot read {0}: {1}")]
    Read(PathBuf, String),
    #[error("tls: {0}")]
    Config(String),
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| TlsError::Read(path.into(), e.to_string()))?;
    if certs.is_empty() {
        return Err(TlsError::Read(path.into(), "no certificate found".into()));
    }
    Ok(certs)
}

/// Builds a server config from the files.
pub fn load(s: &TlsSettings) -> Result<Arc<ServerConfig>, TlsError> {
    let chain = certs(&s.cert_file)?;
    let key = PrivateKeyDer::from_pem_file(&s.key_file)
        .map_err(|e| TlsError::Read(s.key_file.clone(), e.to_string()))?;
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let builder = match &s.client_ca_file {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in certs(ca)? {
                roots
                    .add(c)
                    .map_err(|e| TlsError::Config(format!("client CA: {e}")))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                .build()
                .map_err(|e| TlsError::Config(format!("client CA: {e}")))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

fn mtimes(s: &TlsSettings) -> Vec<Option<SystemTime>> {
    [
        Some(&s.cert_file),
        Some(&s.key_file),
        s.client_ca_file.as_ref(),
    ]
    .into_iter()
    .flatten()
    .map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
    .collect()
}

/// The current TLS config, swapped when the files change.
pub struct Reloading {
    current: RwLock<Arc<ServerConfig>>,
    reloaded: broadcast::Sender<()>,
}

impl Reloading {
    /// Loads the files now (errors stop start-up) and watches them.
    pub fn start(settings: TlsSettings) -> Result<Arc<Self>, TlsError> {
        let this = Arc::new(Self {
            current: RwLock::new(load(&settings)?),
            reloaded: broadcast::channel(8).0,
        });
        let watcher = Arc::downgrade(&this);
        tokio::spawn(async move {
            let mut seen = mtimes(&settings);
            let mut tick =
                tokio::time::interval(Duration::from_secs(settings.reload_seconds.max(1)));
            loop {
                tick.tick().await;
                let Some(this) = watcher.upgrade() else {
                    return;
                };
                let now = mtimes(&settings);
                if now == seen {
                    continue;
                }
                seen = now;
                match load(&settings) {
                    Ok(config) => {
                        *this.current.write().unwrap_or_else(|e| e.into_inner()) = config;
                        tracing::info!("TLS certificate reloaded");
                        let _ = this.reloaded.send(());
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "TLS files changed but are unusable; keeping the old ones")
                    }
                }
            }
        });
        Ok(this)
    }

    /// Fires after each successful reload (for tests and tools).
    pub fn subscribe(&self) -> broadcast::Receiver<()> {
        self.reloaded.subscribe()
    }

    fn config(&self) -> Arc<ServerConfig> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// Accepts TCP connections, each holding one of `slots` from accept on
/// (its handshake included), and completes TLS handshakes off the accept
/// loop; failed handshakes (no or wrong client certificate) are dropped.
pub fn incoming(
    listener: TcpListener,
    tls: Arc<Reloading>,
    slots: Slots,
) -> ReceiverStream<io::Result<TlsStream<Slotted<TcpStream>>>> {
    handshakes_with(crate::net::accept_slotted(listener, slots), tls, None)
}

/// As [`incoming`], for an HTTP/1.1 listener (the forward-auth port): ALPN
/// offers `http/1.1` only, so a client offering `h2` too is never told h2.
pub fn incoming_http1(
    listener: TcpListener,
    tls: Arc<Reloading>,
    slots: Slots,
) -> ReceiverStream<io::Result<TlsStream<Slotted<TcpStream>>>> {
    handshakes_with(
        crate::net::accept_slotted(listener, slots),
        tls,
        Some(vec![b"http/1.1".to_vec()]),
    )
}

/// As [`incoming`], for connections accepted elsewhere and handed to this
/// runtime (the connection workers, `app::workers`): each handshake runs
/// on the runtime that polls the returned stream's producer task.
pub fn handshakes<IO>(
    accepted: impl tokio_stream::Stream<Item = IO> + Send + Unpin + 'static,
    tls: Arc<Reloading>,
) -> ReceiverStream<io::Result<TlsStream<IO>>>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    handshakes_with(accepted, tls, None)
}

fn handshakes_with<IO>(
    mut accepted: impl tokio_stream::Stream<Item = IO> + Send + Unpin + 'static,
    tls: Arc<Reloading>,
    alpn: Option<Vec<Vec<u8>>>,
) -> ReceiverStream<io::Result<TlsStream<IO>>>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    use tokio_stream::StreamExt;
    let (tx, rx) = mpsc::channel(128);
    tokio::spawn(async move {
        loop {
            let io = tokio::select! {
                next = accepted.next() => match next {
                    Some(io) => io,
                    None => return,
                },
                () = tx.closed() => return,
            };
            handshake(io, &tls, alpn.as_deref(), &tx);
        }
    });
    ReceiverStream::new(rx)
}

/// Completes one TLS handshake in its own task (bounded by 10 s) and
/// passes the stream on; a failed handshake is dropped (with the
/// connection's slot, if it holds one).
fn handshake<IO>(
    io: IO,
    tls: &Reloading,
    alpn: Option<&[Vec<u8>]>,
    tx: &mpsc::Sender<io::Result<TlsStream<IO>>>,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let config = match alpn {
        None => tls.config(),
        Some(alpn) => {
            let mut config = (*tls.config()).clone();
            config.alpn_protocols = alpn.to_vec();
            Arc::new(config)
        }
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let tx = tx.clone();
    tokio::spawn(async move {
        match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(io)).await {
            Ok(Ok(stream)) => {
                let _ = tx.send(Ok(stream)).await;
            }
            Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake failed"),
            Err(_) => tracing::debug!("TLS handshake timed out"),
        }
    });
}

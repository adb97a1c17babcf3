//! What both client-facing listeners (gRPC and HTTP) do before a byte reaches their protocol:
//! accept, hold the connection cap, and speak TLS.
//!
//! - **TLS** ([`TlsFiles`] → a rustls `ServerConfig`): a PEM certificate chain and key, checked
//!   to match at start; with `--tls-client-ca`, clients must present a certificate that CA
//!   signed (mutual TLS), else the handshake fails. Each handshake runs in its own task under
//!   [`HANDSHAKE_TIMEOUT`], so a client that stalls mid-handshake holds up no one.
//! - **The connection cap** (`--max-connections`): a connection beyond it is closed as it is
//!   accepted (logged); each connection holds its permit until it closes.
//!
//! [`accept`] yields the connections, ready for tonic (`serve_with_incoming_shutdown`) or hyper
//! (`openai::serve`). It stops accepting, and lets the port go, when its consumer drops it.

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_rustls::rustls;
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;

/// How long a client may take over its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections each listener keeps open at most, by default.
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;

/// How the client APIs (gRPC and HTTP alike) listen and whom they serve.
#[derive(Debug, Clone)]
pub struct ApiOptions {
    pub access: crate::access::Access,
    pub tls: Option<TlsFiles>,
    /// Open connections per listener at most.
    pub max_connections: usize,
    /// Concurrent HTTP/2 streams (gRPC calls) per connection at most.
    pub max_streams_per_connection: u32,
    /// How long an HTTP client may take to send its headers, and its body.
    pub read_timeout: Duration,
}

/// Streams per HTTP/2 connection at most, by default.
pub const DEFAULT_MAX_STREAMS_PER_CONNECTION: u32 = 128;
/// How long an HTTP client may take over its headers, and over its body, by default.
pub const DEFAULT_READ_TIMEOUT: Duration = Duration::from_secs(30);

impl Default for ApiOptions {
    fn default() -> Self {
        Self {
            access: Default::default(),
            tls: None,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_streams_per_connection: DEFAULT_MAX_STREAMS_PER_CONNECTION,
            read_timeout: DEFAULT_READ_TIMEOUT,
        }
    }
}

impl ApiOptions {
    /// How a listener offering `alpn` takes connections under these options.
    pub fn listen(&self, alpn: &[&[u8]]) -> Result<ListenOptions> {
        Ok(ListenOptions {
            tls: self
                .tls
                .as_ref()
                .map(|t| t.server_config(alpn))
                .transpose()?,
            max_connections: self.max_connections,
        })
    }
}

/// Where a listener's certificate, key and (for mutual TLS) client CA are.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
}

impl TlsFiles {
    /// The rustls configuration, offering `alpn` (e.g. `h2` for gRPC); a clear error for a file
    /// that cannot be read or parsed, or a key that is not the certificate's.
    pub fn server_config(&self, alpn: &[&[u8]]) -> Result<Arc<rustls::ServerConfig>> {
        let certs = read_certs(&self.cert)?;
        let key = PrivateKeyDer::from_pem_file(&self.key).map_err(|e| {
            anyhow::anyhow!("--tls-key {}: no PEM private key: {e}", self.key.display())
        })?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .context("TLS protocol versions")?;
        let builder = match &self.client_ca {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                for c in read_certs(ca)? {
                    roots
                        .add(c)
                        .with_context(|| format!("--tls-client-ca {}", ca.display()))?;
                }
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    roots.into(),
                    provider,
                )
                .build()
                .with_context(|| format!("--tls-client-ca {}", ca.display()))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut config = builder.with_single_cert(certs, key).with_context(|| {
            format!(
                "--tls-cert {} and --tls-key {} do not make a key pair",
                self.cert.display(),
                self.key.display()
            )
        })?;
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(Arc::new(config))
    }
}

fn read_certs(path: &std::path::Path) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| anyhow::anyhow!("reading certificates from {}: {e}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow::anyhow!("{}: not a PEM certificate: {e}", path.display()))?;
    if certs.is_empty() {
        bail!("{}: no PEM certificate in it", path.display());
    }
    Ok(certs)
}

/// How one listener takes connections.
#[derive(Clone)]
pub struct ListenOptions {
    pub tls: Option<Arc<rustls::ServerConfig>>,
    pub max_connections: usize,
}

/// An accepted connection: TCP, or TLS over it, holding its place under the cap.
pub struct Connection {
    io: Io,
    remote: Option<SocketAddr>,
    _permit: OwnedSemaphorePermit,
}

enum Io {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

/// The connections `listener` accepts under `opts`, as a stream that stops accepting (and
/// closes the port) once dropped.
pub fn accept(
    listener: TcpListener,
    opts: ListenOptions,
    what: &'static str,
) -> ReceiverStream<io::Result<Connection>> {
    let (tx, rx) = mpsc::channel(64);
    let permits = Arc::new(Semaphore::new(opts.max_connections.max(1)));
    let tls = opts.tls.map(TlsAcceptor::from);
    let refused = AtomicU64::new(0);
    tokio::spawn(async move {
        loop {
            let (tcp, remote) = tokio::select! {
                _ = tx.closed() => return,
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of file descriptors, for one: wait rather than spin.
                        tracing::warn!("{what}: accepting a connection: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let Ok(permit) = permits.clone().try_acquire_owned() else {
                // Logged at 1, 2, 4, 8, ... refusals: a flood does not flood the log.
                let n = refused.fetch_add(1, Ordering::Relaxed) + 1;
                if n.is_power_of_two() {
                    tracing::warn!(
                        "{what}: {} connections are open (--max-connections); closed a new one \
                         ({n} so far)",
                        opts.max_connections
                    );
                }
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let remote = Some(remote);
            match &tls {
                None => {
                    let conn = Connection {
                        io: Io::Plain(tcp),
                        remote,
                        _permit: permit,
                    };
                    if tx.send(Ok(conn)).await.is_err() {
                        return;
                    }
                }
                Some(acceptor) => {
                    let (acceptor, tx) = (acceptor.clone(), tx.clone());
                    tokio::spawn(async move {
                        let handshake =
                            tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp));
                        match handshake.await {
                            Ok(Ok(stream)) => {
                                let conn = Connection {
                                    io: Io::Tls(Box::new(stream)),
                                    remote,
                                    _permit: permit,
                                };
                                let _ = tx.send(Ok(conn)).await;
                            }
                            Ok(Err(e)) => tracing::debug!(?remote, "{what}: TLS handshake: {e}"),
                            Err(_) => tracing::debug!(?remote, "{what}: TLS handshake timed out"),
                        }
                    });
                }
            }
        }
    });
    ReceiverStream::new(rx)
}

impl AsyncRead for Connection {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            Io::Plain(s) => s.is_write_vectored(),
            Io::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

impl tonic::transport::server::Connected for Connection {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        let local_addr = match &self.io {
            Io::Plain(s) => s.local_addr().ok(),
            Io::Tls(s) => s.get_ref().0.local_addr().ok(),
        };
        tonic::transport::server::TcpConnectInfo {
            local_addr,
            remote_addr: self.remote,
        }
    }
}

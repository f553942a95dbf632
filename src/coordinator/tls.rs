//! TLS between workers and the coordinator (optional; the bearer token is required either way).
//!
//! - The coordinator serves HTTPS with `--tls-cert`/`--tls-key`. With `--tls-client-ca` too
//!   (mutual TLS), a client certificate that CA did not sign fails the handshake, and an API call
//!   (`/v1/...`) without any client certificate is refused; both are logged with the peer's
//!   address and counted in `sluice_coordinator_refused_calls_total`. The probes and `/metrics`
//!   need no certificate (the kubelet and Prometheus present none), as they need no token.
//! - Workers and `sluice status` trust `--coordinator-ca` (else the system's roots) for an
//!   `https://` coordinator URL and present `--tls-cert`/`--tls-key` when given.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

use crate::observe::names;

/// A handshake that takes longer than this is dropped (a stalled or hostile client).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The coordinator's side.
#[derive(Debug, Clone, Default)]
pub struct ServerTls {
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// Requires client certificates signed by this CA.
    pub client_ca: Option<PathBuf>,
}

/// A worker's (or `sluice status`'s) side.
#[derive(Debug, Clone, Default)]
pub struct ClientTls {
    /// The CA that signed the coordinator's certificate (default: the system's roots).
    pub ca: Option<PathBuf>,
    /// A client certificate and its key, for a coordinator that requires one.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn certs(what: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let read = |e: &dyn std::fmt::Display| format!("cannot read the {what} `{}`: {e}", path.display());
    let certs: Vec<_> =
        CertificateDer::pem_file_iter(path).map_err(|e| read(&e))?.collect::<Result<_, _>>().map_err(|e| read(&e))?;
    if certs.is_empty() {
        return Err(format!("the {what} `{}` holds no PEM certificate", path.display()));
    }
    Ok(certs)
}

fn key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    // The error names the file, never its contents.
    PrivateKeyDer::from_pem_file(path)
        .map_err(|e| format!("cannot read a PEM private key from `{}`: {e}", path.display()))
}

fn roots(what: &str, path: &Path) -> Result<rustls::RootCertStore, String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in certs(what, path)? {
        roots.add(cert).map_err(|e| format!("the {what} `{}` holds an unusable certificate: {e}", path.display()))?;
    }
    Ok(roots)
}

/// Both of a certificate and its key, or neither.
fn pair<'a>(
    cert: &'a Option<PathBuf>,
    key: &'a Option<PathBuf>,
    flags: &str,
) -> Result<Option<(&'a Path, &'a Path)>, String> {
    match (cert, key) {
        (Some(c), Some(k)) => Ok(Some((c, k))),
        (None, None) => Ok(None),
        _ => Err(format!("{flags} go together: give both or neither")),
    }
}

impl ServerTls {
    /// The server configuration, or `None` for plain HTTP.
    ///
    /// # Errors
    /// Half a certificate pair, a client CA without a certificate, unreadable or unusable files.
    pub fn config(&self) -> Result<Option<Arc<rustls::ServerConfig>>, String> {
        let Some((cert, key_path)) = pair(&self.cert, &self.key, "--tls-cert and --tls-key")? else {
            if self.client_ca.is_some() {
                return Err("--tls-client-ca needs --tls-cert and --tls-key: mutual TLS is TLS first".into());
            }
            return Ok(None);
        };
        let builder = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS setup failed: {e}"))?;
        let builder = match &self.client_ca {
            Some(ca) => {
                // A certificate, when given, must verify; none at all is let through the
                // handshake for the probes, and refused on the API (`Peer::client_cert`).
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots("client CA", ca)?),
                    provider(),
                )
                .allow_unauthenticated()
                .build()
                .map_err(|e| format!("cannot use the client CA `{}`: {e}", ca.display()))?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let mut config = builder.with_single_cert(certs("certificate", cert)?, key(key_path)?).map_err(|e| {
            format!(
                "the certificate `{}` and key `{}` do not make a TLS identity: {e}",
                cert.display(),
                key_path.display()
            )
        })?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Some(Arc::new(config)))
    }
}

impl ClientTls {
    /// The client configuration (roots: `ca`, else the system's).
    ///
    /// # Errors
    /// Half a certificate pair, unreadable or unusable files.
    pub fn config(&self) -> Result<rustls::ClientConfig, String> {
        let roots = match &self.ca {
            Some(ca) => roots("coordinator CA", ca)?,
            None => {
                let mut roots = rustls::RootCertStore::empty();
                for cert in rustls_native_certs::load_native_certs().certs {
                    let _ = roots.add(cert);
                }
                roots
            }
        };
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS setup failed: {e}"))?
            .with_root_certificates(roots);
        let mut config = match pair(&self.cert, &self.key, "--tls-cert and --tls-key")? {
            Some((cert, key_path)) => {
                builder.with_client_auth_cert(certs("client certificate", cert)?, key(key_path)?).map_err(|e| {
                    format!(
                        "the client certificate `{}` and key `{}` do not make a TLS identity: {e}",
                        cert.display(),
                        key_path.display()
                    )
                })?
            }
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(config)
    }
}

/// A connection the coordinator accepted: plain TCP, or TLS over it.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// The caller (axum's `ConnectInfo` of [`Listener`]): its address, and whether it presented a
/// client certificate the client CA verified.
#[derive(Debug, Clone, Copy)]
pub struct Peer {
    pub addr: SocketAddr,
    pub client_cert: bool,
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.addr.fmt(f)
    }
}

/// The coordinator's listener: TCP, with TLS handshakes run concurrently (a slow client holds up
/// no other) when configured.
pub struct Listener {
    tcp: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    handshakes: JoinSet<(SocketAddr, std::io::Result<tokio_rustls::server::TlsStream<TcpStream>>)>,
}

impl Listener {
    pub fn new(tcp: TcpListener, tls: Option<Arc<rustls::ServerConfig>>) -> Self {
        Listener { tcp, tls: tls.map(tokio_rustls::TlsAcceptor::from), handshakes: JoinSet::new() }
    }
}

impl axum::serve::Listener for Listener {
    type Io = Box<dyn Io>;
    type Addr = Peer;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            tokio::select! {
                accepted = self.tcp.accept() => {
                    let (stream, peer) = match accepted {
                        Ok(a) => a,
                        Err(e) => {
                            // Out of file descriptors and the like: wait, do not spin.
                            tracing::warn!(error = %e, "coordinator: cannot accept a connection");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                    };
                    let _ = stream.set_nodelay(true);
                    let Some(acceptor) = &self.tls else {
                        return (Box::new(stream), Peer { addr: peer, client_cert: false });
                    };
                    let handshake = acceptor.accept(stream);
                    self.handshakes.spawn(async move {
                        let r = match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
                            Ok(r) => r,
                            Err(_) => Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "no TLS handshake within 10 s")),
                        };
                        (peer, r)
                    });
                }
                Some(done) = self.handshakes.join_next(), if !self.handshakes.is_empty() => {
                    match done {
                        Ok((addr, Ok(stream))) => {
                            let client_cert = stream.get_ref().1.peer_certificates().is_some_and(|c| !c.is_empty());
                            return (Box::new(stream), Peer { addr, client_cert });
                        }
                        Ok((peer, Err(e))) => {
                            tracing::warn!(%peer, "coordinator: refused a connection: TLS handshake failed: {e}");
                            metrics::counter!(names::COORDINATOR_REFUSED_CALLS_TOTAL).increment(1);
                        }
                        Err(e) => tracing::warn!("coordinator: a TLS handshake task failed: {e}"),
                    }
                }
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(Peer { addr: self.tcp.local_addr()?, client_cert: false })
    }
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, Listener>> for Peer {
    fn connect_info(stream: axum::serve::IncomingStream<'_, Listener>) -> Self {
        *stream.remote_addr()
    }
}

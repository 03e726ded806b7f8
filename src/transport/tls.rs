//! TLS on the listeners, with certificates that can be replaced while the
//! server runs.
//!
//! tonic's own `ServerTlsConfig` is fixed at start, so the handshake is
//! done here with tokio-rustls (what tonic uses underneath) on the
//! connections [`connections::Incoming`] has admitted: the connection
//! limits, including the first-request timeout, apply to the handshake
//! too. Each handshake takes the listener's current rustls configuration;
//! [`watch`] rebuilds it when the files change or on SIGHUP, so a renewed
//! certificate is used for new connections while open ones carry on with
//! the one they started with.
//!
//! On the admin listener a client CA makes it mutual TLS: a client must
//! present a certificate that CA signed, or the handshake fails. Each
//! connection's certificate chain is kept; after a reload, a connection
//! whose certificate the new client CA would refuse gets a GOAWAY, its
//! calls in progress finish, and it is closed ([`frames::Drain`]).
//!
//! Every connection, TLS or not, is handed to tonic watched by
//! [`frames::Watched`] (HTTP/2 control-frame floods).

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::stream::FuturesUnordered;
use futures_util::{Stream, StreamExt as _};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::server::danger::ClientCertVerifier;
use tokio_rustls::rustls::{self, RootCertStore, ServerConfig};
use tonic::transport::server::Connected;
use zeroize::Zeroizing;

use super::connections::{self, ConnectionInfo, Tracked};
use super::frames::{self, Drain, FrameLimits, Watched};
use crate::config::{CERT_SETTING, CLIENT_CA_SETTING, KEY_SETTING, TlsFiles};

/// Why a listener's TLS configuration could not be made; names the
/// setting whose file is at fault.
#[derive(Debug, thiserror::Error)]
#[error("{setting}: {message}")]
pub struct TlsError {
    setting: &'static str,
    message: String,
}

impl TlsError {
    fn new(setting: &'static str, message: impl Into<String>) -> Self {
        Self {
            setting,
            message: message.into(),
        }
    }
}

/// The files' contents, read together so that one configuration is made
/// from one reading. The private key is wiped from memory when dropped.
struct Contents {
    cert: Vec<u8>,
    key: Zeroizing<Vec<u8>>,
    client_ca: Option<Vec<u8>>,
}

impl Contents {
    fn read(files: &TlsFiles) -> Result<Self, TlsError> {
        Ok(Self {
            cert: read(&files.cert, CERT_SETTING)?,
            key: Zeroizing::new(read(&files.key, KEY_SETTING)?),
            client_ca: match &files.client_ca {
                Some(path) => Some(read(path, CLIENT_CA_SETTING)?),
                None => None,
            },
        })
    }

    /// What tells one reading from another, kept instead of the bytes.
    fn digest(&self) -> blake3::Hash {
        let mut hasher = blake3::Hasher::new();
        for part in [
            &self.cert[..],
            &self.key[..],
            self.client_ca.as_deref().unwrap_or_default(),
        ] {
            hasher.update(&(part.len() as u64).to_le_bytes());
            hasher.update(part);
        }
        hasher.finalize()
    }

    /// The configuration, and the client verifier it has for mutual TLS.
    fn server_config(
        &self,
        protocols: Protocols,
        files: &TlsFiles,
    ) -> Result<(ServerConfig, Option<Arc<dyn ClientCertVerifier>>), TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let certs = CertificateDer::pem_slice_iter(&self.cert)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| pem_error(CERT_SETTING, &files.cert, "certificates", &e))?;
        if certs.is_empty() {
            return Err(TlsError::new(
                CERT_SETTING,
                format!(
                    "{} holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
                    files.cert.display()
                ),
            ));
        }
        let key = PrivateKeyDer::from_pem_slice(&self.key)
            .map_err(|e| pem_error(KEY_SETTING, &files.key, "a private key", &e))?;
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::new(CERT_SETTING, e.to_string()))?;
        let mut client_verifier = None;
        let builder = match (&self.client_ca, &files.client_ca) {
            (Some(pem), Some(path)) => {
                let mut roots = RootCertStore::empty();
                for ca in CertificateDer::pem_slice_iter(pem) {
                    let ca =
                        ca.map_err(|e| pem_error(CLIENT_CA_SETTING, path, "CA certificates", &e))?;
                    roots.add(ca).map_err(|e| {
                        TlsError::new(
                            CLIENT_CA_SETTING,
                            format!("{}: not a usable CA certificate: {e}", path.display()),
                        )
                    })?;
                }
                if roots.is_empty() {
                    return Err(TlsError::new(
                        CLIENT_CA_SETTING,
                        format!("{} holds no PEM certificate", path.display()),
                    ));
                }
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                        .build()
                        .map_err(|e| TlsError::new(CLIENT_CA_SETTING, e.to_string()))?;
                client_verifier = Some(verifier.clone());
                builder.with_client_cert_verifier(verifier)
            }
            _ => builder.with_no_client_auth(),
        };
        let mut config = builder.with_single_cert(certs, key).map_err(|e| {
            let message = match e {
                rustls::Error::InconsistentKeys(_) => format!(
                    "{} does not match the certificate in {}: give the key the certificate was made for",
                    files.key.display(),
                    files.cert.display()
                ),
                other => format!("{}: {other}", files.key.display()),
            };
            TlsError::new(KEY_SETTING, message)
        })?;
        // gRPC is HTTP/2, and clients such as grpc-go insist on ALPN; a
        // listener with HTTP routes also takes HTTP/1.1 (h2 preferred).
        config.alpn_protocols = protocols.iter().map(|p| p.to_vec()).collect();
        Ok((config, client_verifier))
    }
}

fn read(path: &Path, setting: &'static str) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path)
        .map_err(|e| TlsError::new(setting, format!("cannot read {}: {e}", path.display())))
}

fn pem_error(
    setting: &'static str,
    path: &Path,
    what: &str,
    e: &rustls::pki_types::pem::Error,
) -> TlsError {
    // The error names the PEM section at fault, never its bytes.
    TlsError::new(
        setting,
        format!("{} does not hold {what} in PEM form: {e}", path.display()),
    )
}

/// The application protocols a listener offers in ALPN, preferred first.
pub type Protocols = &'static [&'static [u8]];

/// gRPC only.
pub const HTTP2: Protocols = &[b"h2"];

/// gRPC and HTTP routes.
pub const HTTP2_AND_HTTP1: Protocols = &[b"h2", b"http/1.1"];

/// One listener's TLS: the configuration new handshakes use, and the files
/// it is rebuilt from.
#[derive(Clone)]
pub struct Acceptor {
    listener: &'static str,
    /// What it offers in ALPN.
    protocols: Protocols,
    files: Arc<TlsFiles>,
    current: Arc<RwLock<Arc<ServerConfig>>>,
    /// What the current configuration was made from, and what failed last
    /// (so that a broken file is reported once, not on every look).
    seen: Arc<Mutex<Seen>>,
    /// The open connections' client certificates, checked again on reload.
    clients: Arc<Mutex<Vec<Client>>>,
}

/// An open mutual-TLS connection: its client's certificate chain, and how
/// to close it.
struct Client {
    chain: Vec<CertificateDer<'static>>,
    peer: Option<SocketAddr>,
    drain: Weak<Drain>,
}

struct Seen {
    loaded: blake3::Hash,
    failed: Option<blake3::Hash>,
}

impl fmt::Debug for Acceptor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Acceptor")
            .field("listener", &self.listener)
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

impl Acceptor {
    /// Reads the files; any problem stops the start.
    pub fn load(
        listener: &'static str,
        files: TlsFiles,
        protocols: Protocols,
    ) -> Result<Self, TlsError> {
        let contents = Contents::read(&files)?;
        let (config, _) = contents.server_config(protocols, &files)?;
        Ok(Self {
            listener,
            protocols,
            files: Arc::new(files),
            current: Arc::new(RwLock::new(Arc::new(config))),
            seen: Arc::new(Mutex::new(Seen {
                loaded: contents.digest(),
                failed: None,
            })),
            clients: Arc::default(),
        })
    }

    /// Rebuilds the configuration when the files changed (or always, when
    /// `forced`). A file that cannot be used is reported once and the
    /// configuration in use is kept.
    pub fn reload(&self, forced: bool) {
        let contents = match Contents::read(&self.files) {
            Ok(contents) => contents,
            Err(e) => {
                // Replaced in two steps, say: look again next time.
                tracing::warn!(listener = self.listener, error = %e, "TLS files not reloaded; serving with the previous certificate");
                return;
            }
        };
        let digest = contents.digest();
        let mut seen = self.seen.lock().expect("not poisoned");
        if !forced && (seen.loaded == digest || seen.failed == Some(digest)) {
            return;
        }
        match contents.server_config(self.protocols, &self.files) {
            Ok((config, verifier)) => {
                *self.current.write().expect("not poisoned") = Arc::new(config);
                seen.loaded = digest;
                seen.failed = None;
                tracing::info!(
                    listener = self.listener,
                    cert = %self.files.cert.display(),
                    "TLS certificate reloaded; new connections use it"
                );
                if let Some(verifier) = verifier {
                    self.check_clients(verifier.as_ref());
                }
            }
            Err(e) => {
                seen.failed = Some(digest);
                tracing::warn!(listener = self.listener, error = %e, "TLS files not reloaded; serving with the previous certificate");
            }
        }
    }

    /// Asks every open connection whose client certificate `verifier`
    /// refuses to close once its calls are done.
    fn check_clients(&self, verifier: &dyn ClientCertVerifier) {
        let now = UnixTime::now();
        let mut clients = self.clients.lock().expect("not poisoned");
        clients.retain(|c| c.drain.strong_count() > 0);
        let mut refused = 0;
        for client in clients.iter() {
            let Some((end_entity, intermediates)) = client.chain.split_first() else {
                continue;
            };
            let Err(e) = verifier.verify_client_cert(end_entity, intermediates, now) else {
                continue;
            };
            if let Some(drain) = client.drain.upgrade() {
                refused += 1;
                tracing::warn!(
                    listener = self.listener,
                    peer = ?client.peer,
                    error = %e,
                    "the reloaded client CA refuses this connection's client certificate: closing it once its calls are done"
                );
                drain.close_after_calls();
            }
        }
        tracing::info!(
            listener = self.listener,
            connections = clients.len(),
            refused,
            "open connections' client certificates checked against the reloaded client CA"
        );
    }

    /// Notes an open mutual-TLS connection's client certificate; the
    /// handle that closes it, or `None` without a certificate.
    fn register(
        &self,
        tls: &tokio_rustls::server::TlsStream<Tracked<TcpStream>>,
        peer: Option<SocketAddr>,
    ) -> Option<Arc<Drain>> {
        let chain = tls.get_ref().1.peer_certificates()?;
        let drain = Arc::new(Drain::default());
        let mut clients = self.clients.lock().expect("not poisoned");
        // Closed connections leave their entries; sweep them now and then.
        if clients.len() >= 64 && clients.len().is_power_of_two() {
            clients.retain(|c| c.drain.strong_count() > 0);
        }
        clients.push(Client {
            chain: chain.iter().map(|c| c.clone().into_owned()).collect(),
            peer,
            drain: Arc::downgrade(&drain),
        });
        Some(drain)
    }

    /// Whether clients must present a certificate (mutual TLS).
    pub fn demands_client_certificates(&self) -> bool {
        self.files.client_ca.is_some()
    }

    fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.current.read().expect("not poisoned").clone())
    }
}

/// Reloads every acceptor's files every `interval` and at once on SIGHUP,
/// until `shutdown` resolves. SIGHUP is taken even without TLS, so that a
/// reload signal (systemd's `ExecReload`, say) never stops the server.
pub async fn watch(
    acceptors: Vec<Acceptor>,
    interval: Duration,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(signal) => Some(signal),
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP; TLS files are still reloaded when they change");
            None
        }
    };
    tokio::pin!(shutdown);
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await;
    loop {
        let forced = tokio::select! {
            () = &mut shutdown => return,
            _ = ticks.tick(), if !acceptors.is_empty() => false,
            Some(()) = hangup_received(&mut hangup) => true,
        };
        if forced {
            tracing::info!(
                listeners_with_tls = acceptors.len(),
                "SIGHUP: reloading TLS files"
            );
        }
        for acceptor in &acceptors {
            acceptor.reload(forced);
        }
    }
}

async fn hangup_received(hangup: &mut Option<tokio::signal::unix::Signal>) -> Option<()> {
    match hangup {
        Some(signal) => signal.recv().await,
        None => std::future::pending().await,
    }
}

/// A connection as tonic serves it: the tracked socket, in TLS or not.
#[derive(Debug)]
pub enum Connection {
    Plain(Tracked<TcpStream>),
    Tls(Box<tokio_rustls::server::TlsStream<Tracked<TcpStream>>>),
}

impl Connected for Connection {
    type ConnectInfo = ConnectionInfo;

    fn connect_info(&self) -> ConnectionInfo {
        match self {
            Connection::Plain(tracked) => tracked.connect_info(),
            Connection::Tls(tls) => tls.get_ref().0.connect_info(),
        }
    }
}

impl AsyncRead for Connection {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Connection::Plain(io) => Pin::new(io).poll_read(cx, buf),
            Connection::Tls(io) => Pin::new(io).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Connection::Plain(io) => Pin::new(io).poll_write(cx, buf),
            Connection::Tls(io) => Pin::new(io).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Connection::Plain(io) => Pin::new(io).poll_write_vectored(cx, bufs),
            Connection::Tls(io) => Pin::new(io).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Connection::Plain(io) => io.is_write_vectored(),
            Connection::Tls(io) => io.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Connection::Plain(io) => Pin::new(io).poll_flush(cx),
            Connection::Tls(io) => Pin::new(io).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Connection::Plain(io) => Pin::new(io).poll_shutdown(cx),
            Connection::Tls(io) => Pin::new(io).poll_shutdown(cx),
        }
    }
}

/// A listener's connections, past the TLS handshake when it has TLS, each
/// with its HTTP/2 frames watched. Handshakes run side by side, so a slow
/// client delays no other.
pub struct Incoming {
    tracked: connections::Incoming,
    tls: Option<Acceptor>,
    listener: &'static str,
    frames: FrameLimits,
    handshakes: FuturesUnordered<tokio_rustls::Accept<Tracked<TcpStream>>>,
    accepting: bool,
}

impl fmt::Debug for Incoming {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Incoming")
            .field("tls", &self.tls)
            .field("handshakes", &self.handshakes.len())
            .finish_non_exhaustive()
    }
}

impl Incoming {
    /// `listener` names it in log lines.
    pub fn new(
        tracked: connections::Incoming,
        tls: Option<Acceptor>,
        listener: &'static str,
        frames: FrameLimits,
    ) -> Self {
        Self {
            tracked,
            tls,
            listener,
            frames,
            handshakes: FuturesUnordered::new(),
            accepting: true,
        }
    }

    fn watched(&self, connection: Connection, drain: Option<Arc<Drain>>) -> Watched<Connection> {
        let peer = connection.connect_info().remote_addr();
        frames::Watched::new(connection, self.frames, drain, self.listener, peer)
    }
}

impl Stream for Incoming {
    type Item = io::Result<Watched<Connection>>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        while this.accepting {
            match Pin::new(&mut this.tracked).poll_next(cx) {
                Poll::Ready(Some(Ok(tracked))) => match &this.tls {
                    None => {
                        let plain = this.watched(Connection::Plain(tracked), None);
                        return Poll::Ready(Some(Ok(plain)));
                    }
                    Some(tls) => this.handshakes.push(tls.acceptor().accept(tracked)),
                },
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
                Poll::Ready(None) => this.accepting = false,
                Poll::Pending => break,
            }
        }
        loop {
            match this.handshakes.poll_next_unpin(cx) {
                Poll::Ready(Some(Ok(tls))) => {
                    let peer = tls.get_ref().0.connect_info().remote_addr();
                    let drain = match &this.tls {
                        Some(acceptor) if acceptor.demands_client_certificates() => {
                            acceptor.register(&tls, peer)
                        }
                        _ => None,
                    };
                    let tls = this.watched(Connection::Tls(Box::new(tls)), drain);
                    return Poll::Ready(Some(Ok(tls)));
                }
                // A plaintext client, a wrong CA, no client certificate, a
                // handshake cut short: the client sees its own error.
                Poll::Ready(Some(Err(e))) => {
                    tracing::debug!(error = %e, "TLS handshake failed");
                }
                Poll::Ready(None) if !this.accepting => return Poll::Ready(None),
                Poll::Ready(None) | Poll::Pending => return Poll::Pending,
            }
        }
    }
}

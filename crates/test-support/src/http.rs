//! An HTTP client for the verify listener's HTTP face: one request on a
//! new connection, over HTTP/1.1 or HTTP/2, plaintext or TLS (given the
//! CA's PEM), answered with its status, headers and body as text.

use std::net::SocketAddr;
use std::sync::Arc;

use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore};

/// Which HTTP a request is sent with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpVersion {
    Http1,
    Http2,
}

/// Both versions, for tests that run on each.
pub const HTTP_VERSIONS: [HttpVersion; 2] = [HttpVersion::Http1, HttpVersion::Http2];

/// An HTTP answer.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: String,
}

impl Answer {
    /// A header as text; "" when absent.
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    /// The body as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("the body is not JSON ({e}): {}", self.body))
    }
}

/// `GET path` with `headers`.
pub fn get(path: &str, headers: &[(&str, &str)]) -> Request<String> {
    request("GET", path, headers, "")
}

/// A request; the host header is added when sent.
pub fn request(method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> Request<String> {
    let mut builder = Request::builder().method(method).uri(path);
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    builder.body(body.to_owned()).expect("a request")
}

/// Sends `request` to `addr` on a new plaintext connection.
pub async fn send(addr: SocketAddr, version: HttpVersion, request: Request<String>) -> Answer {
    let tcp = TcpStream::connect(addr)
        .await
        .expect("the listener accepts");
    exchange(TokioIo::new(tcp), addr, "http", version, request).await
}

/// Sends `request` to `addr` on a new TLS connection, trusting `ca_pem`
/// and expecting the certificate to name `server_name`.
pub async fn send_tls(
    addr: SocketAddr,
    ca_pem: &str,
    server_name: &str,
    version: HttpVersion,
    request: Request<String>,
) -> Answer {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.expect("a CA certificate")).expect("a CA");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = match version {
        HttpVersion::Http1 => vec![b"http/1.1".to_vec()],
        HttpVersion::Http2 => vec![b"h2".to_vec()],
    };
    let tcp = TcpStream::connect(addr)
        .await
        .expect("the listener accepts");
    let name = ServerName::try_from(server_name.to_owned()).expect("a server name");
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .expect("a TLS handshake");
    exchange(TokioIo::new(tls), addr, "https", version, request).await
}

async fn exchange<IO>(
    io: TokioIo<IO>,
    addr: SocketAddr,
    scheme: &str,
    version: HttpVersion,
    request: Request<String>,
) -> Answer
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut parts, body) = request.into_parts();
    let body = Full::new(Bytes::from(body));
    let response = match version {
        HttpVersion::Http1 => {
            parts.headers.insert(
                http::header::HOST,
                addr.to_string().parse().expect("a host"),
            );
            let (mut sender, connection) = hyper::client::conn::http1::handshake(io)
                .await
                .expect("an HTTP/1.1 connection");
            tokio::spawn(connection);
            sender
                .send_request(Request::from_parts(parts, body))
                .await
                .expect("an HTTP/1.1 answer")
        }
        HttpVersion::Http2 => {
            // HTTP/2 wants the whole URI: its :scheme and :authority.
            parts.uri = format!("{scheme}://{addr}{}", parts.uri)
                .parse()
                .expect("a URI");
            let (mut sender, connection) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                    .await
                    .expect("an HTTP/2 connection");
            tokio::spawn(connection);
            sender
                .send_request(Request::from_parts(parts, body))
                .await
                .expect("an HTTP/2 answer")
        }
    };
    let (parts, body) = response.into_parts();
    let body = body.collect().await.expect("the body").to_bytes();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

//! TLS to Postgres: the `sslmode` and `sslrootcert` parameters of
//! `DATABASE_URL`, read as libpq reads them, and the rustls connector they
//! call for. The pool and the change listener's connection share that one
//! connector.
//!
//! tokio-postgres knows `sslmode` only as `disable`, `prefer` and
//! `require`, and no `sslrootcert` at all, so [`split`] takes both
//! parameters out of the connection string before tokio-postgres parses
//! the rest, exactly as it would have (both the URL and the `key=value`
//! form). The connector gets a certificate verifier fitting the mode:
//!
//! | `sslmode`           | TLS                                  | server certificate checked against `sslrootcert` |
//! |---------------------|--------------------------------------|--------------------------------------------------|
//! | `disable`           | never                                | -                                                |
//! | `prefer` (default)  | when the server offers it, else plain | the chain, when `sslrootcert` is given           |
//! | `require`           | always                               | the chain, when `sslrootcert` is given           |
//! | `verify-ca`         | always                               | the chain (`sslrootcert` required)               |
//! | `verify-full`       | always                               | the chain and the host name (`sslrootcert` required) |
//!
//! Unlike libpq there is no default root file (`~/.postgresql/root.crt`):
//! a mode that verifies without `sslrootcert` stops the start, naming the
//! parameter. Unlike libpq, `prefer` does not retry in plain text after a
//! failed handshake; it falls back only when the server declines TLS.
//!
//! Every rustls configuration is built with the ring provider passed in
//! explicitly, so nothing depends on a process-wide default provider.

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use percent_encoding::percent_decode_str;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{WebPkiServerVerifier, verify_server_cert_signed_by_trust_anchor};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio_postgres_rustls::MakeRustlsConnect;

/// The connector every connection of a store is made with.
pub(super) type Connector = MakeRustlsConnect;

/// What `DATABASE_URL` asks of TLS, as libpq's `sslmode` says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(super) enum SslMode {
    Disable,
    #[default]
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    fn parse(value: &str) -> Result<Self, TlsConfigError> {
        Ok(match value {
            "disable" => Self::Disable,
            "prefer" => Self::Prefer,
            "require" => Self::Require,
            "verify-ca" => Self::VerifyCa,
            "verify-full" => Self::VerifyFull,
            other => return Err(TlsConfigError::UnknownMode(other.to_owned())),
        })
    }

    fn as_str(self) -> &'static str {
        match self {
            Self::Disable => "disable",
            Self::Prefer => "prefer",
            Self::Require => "require",
            Self::VerifyCa => "verify-ca",
            Self::VerifyFull => "verify-full",
        }
    }

    /// The mode tokio-postgres negotiates with: it knows whether to ask
    /// for TLS, the verifier decides what to accept.
    pub(super) fn negotiation(self) -> tokio_postgres::config::SslMode {
        use tokio_postgres::config::SslMode as Negotiate;
        match self {
            Self::Disable => Negotiate::Disable,
            Self::Prefer => Negotiate::Prefer,
            Self::Require | Self::VerifyCa | Self::VerifyFull => Negotiate::Require,
        }
    }
}

impl std::fmt::Display for SslMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The TLS parameters of a connection string.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct TlsSettings {
    pub(super) mode: SslMode,
    /// `sslrootcert`: a PEM file of the CA certificates to trust.
    pub(super) root_cert: Option<PathBuf>,
}

/// Why the TLS part of `DATABASE_URL` cannot be used. Names the parameter
/// and never carries the rest of the URL, which may hold a password.
#[derive(Debug, thiserror::Error)]
pub(super) enum TlsConfigError {
    #[error(
        "sslmode '{0}' is not supported: use disable, prefer, require, verify-ca or verify-full"
    )]
    UnknownMode(String),
    #[error(
        "sslmode={0} verifies the server's certificate and needs sslrootcert=<path of a PEM file \
         with the CA certificates to trust>"
    )]
    NoRootCert(SslMode),
    #[error(
        "sslrootcert=system is not supported: give the path of a PEM file with the CA \
         certificates to trust"
    )]
    SystemRoots,
    #[error("cannot read sslrootcert {}", path.display())]
    Unreadable {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("sslrootcert {} holds no PEM certificate", path.display())]
    NoCertificate { path: PathBuf },
    #[error("sslrootcert {} holds a certificate that cannot be used", path.display())]
    BadCertificate {
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("cannot set up TLS")]
    Rustls(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// Takes `sslmode` and `sslrootcert` out of `url` (a `postgres://` URL or
/// a `key=value` string), returning the rest, for tokio-postgres to
/// parse, and what they said. The last occurrence of a parameter counts,
/// as in libpq. A string that does not parse is handed on unchanged, so
/// that tokio-postgres reports it as it always has.
pub(super) fn split(url: &str) -> Result<(String, TlsSettings), TlsConfigError> {
    let mut found = Found::default();
    let rest = match url_prefix(url) {
        Some(prefix) => match url_query(url, prefix) {
            Some(query) => split_url(url, query, &mut found),
            None => url.to_owned(),
        },
        None => split_key_values(url, &mut found),
    };
    let mode = match found.mode {
        Some(mode) => SslMode::parse(&mode)?,
        None => SslMode::default(),
    };
    let root_cert = found.root_cert.map(PathBuf::from);
    Ok((rest, TlsSettings { mode, root_cert }))
}

#[derive(Default)]
struct Found {
    mode: Option<String>,
    root_cert: Option<OsString>,
}

impl Found {
    /// Records `key` if it is one of ours; false when it is not.
    fn take(&mut self, key: &str, value: impl FnOnce() -> Option<Vec<u8>>) -> bool {
        match key {
            "sslmode" => {
                // Undecodable: left for `SslMode::parse` to refuse.
                self.mode = Some(
                    value()
                        .and_then(|v| String::from_utf8(v).ok())
                        .unwrap_or_else(|| "\u{fffd}".to_owned()),
                );
                true
            }
            "sslrootcert" => {
                self.root_cert = value().map(OsString::from_vec);
                true
            }
            _ => false,
        }
    }
}

/// The length of the scheme of a URL tokio-postgres takes as one; `None`
/// for a `key=value` string.
fn url_prefix(url: &str) -> Option<usize> {
    ["postgres://", "postgresql://"]
        .into_iter()
        .find(|p| url.starts_with(p))
        .map(str::len)
}

/// Where the parameters of a URL start (after the `?`), if it has any.
/// tokio-postgres reads the credentials up to the first `@`, then host and
/// path up to the first `?`.
fn url_query(url: &str, prefix: usize) -> Option<usize> {
    let body = &url[prefix..];
    let after_credentials = body.find('@').map_or(0, |at| at + 1);
    let question = body[after_credentials..].find('?')?;
    Some(prefix + after_credentials + question + 1)
}

/// The URL without our parameters; `query` is where its parameters start.
/// Mirrors tokio-postgres: a key runs to the next `=`, its value to the
/// next `&`; both are percent-decoded.
fn split_url(url: &str, query: usize, found: &mut Found) -> String {
    let mut kept: Vec<&str> = Vec::new();
    let mut rest = &url[query..];
    while !rest.is_empty() {
        let Some(eq) = rest.find('=') else {
            kept.push(rest); // unterminated: tokio-postgres says so
            break;
        };
        let (raw_value, next) = match rest[eq + 1..].find('&') {
            Some(amp) => (&rest[eq + 1..eq + 1 + amp], &rest[eq + 2 + amp..]),
            None => (&rest[eq + 1..], ""),
        };
        let param = &rest[..eq + 1 + raw_value.len()];
        let key = percent_decode_str(&rest[..eq]).decode_utf8();
        let ours =
            key.is_ok_and(|key| found.take(&key, || Some(percent_decode_str(raw_value).collect())));
        if !ours {
            kept.push(param);
        }
        rest = next;
    }
    let mut out = url[..query - 1].to_owned();
    if !kept.is_empty() {
        out.push('?');
        out.push_str(&kept.join("&"));
    }
    out
}

/// The `key=value` string without our parameters. Mirrors tokio-postgres:
/// parameters are separated by whitespace, `=` may have whitespace around
/// it, a value is either bare (up to whitespace) or single-quoted, and a
/// backslash escapes the next character in both.
fn split_key_values(s: &str, found: &mut Found) -> String {
    let mut out = String::with_capacity(s.len());
    let mut copied = 0;
    let mut cursor = Cursor { s, at: 0 };
    loop {
        cursor.skip_whitespace();
        let start = cursor.at;
        let key = cursor.take_while(|c| !c.is_whitespace() && c != '=');
        if key.is_empty() {
            break;
        }
        cursor.skip_whitespace();
        if !cursor.eat('=') {
            return s.to_owned(); // malformed: tokio-postgres says so
        }
        cursor.skip_whitespace();
        let Some(value) = cursor.value() else {
            return s.to_owned();
        };
        if found.take(key, || Some(value.into_bytes())) {
            out.push_str(&s[copied..start]);
            copied = cursor.at;
        }
    }
    out.push_str(&s[copied..]);
    out
}

struct Cursor<'a> {
    s: &'a str,
    at: usize,
}

impl<'a> Cursor<'a> {
    fn peek(&self) -> Option<char> {
        self.s[self.at..].chars().next()
    }

    fn bump(&mut self) -> Option<char> {
        let c = self.peek()?;
        self.at += c.len_utf8();
        Some(c)
    }

    fn eat(&mut self, target: char) -> bool {
        let hit = self.peek() == Some(target);
        if hit {
            self.at += target.len_utf8();
        }
        hit
    }

    fn take_while(&mut self, f: impl Fn(char) -> bool) -> &'a str {
        let start = self.at;
        while self.peek().is_some_and(&f) {
            self.bump();
        }
        &self.s[start..self.at]
    }

    fn skip_whitespace(&mut self) {
        self.take_while(char::is_whitespace);
    }

    /// A bare or quoted value, unescaped; `None` when it is missing or
    /// its quote is not closed.
    fn value(&mut self) -> Option<String> {
        let quoted = self.eat('\'');
        let mut value = String::new();
        loop {
            match self.peek() {
                Some('\'') if quoted => {
                    self.bump();
                    return Some(value);
                }
                Some(c) if !quoted && c.is_whitespace() => break,
                Some('\\') => {
                    self.bump();
                    value.extend(self.bump());
                }
                Some(c) => {
                    self.bump();
                    value.push(c);
                }
                None if quoted => return None,
                None => break,
            }
        }
        (!value.is_empty()).then_some(value)
    }
}

/// The connector for `settings`: rustls with the ring provider and the
/// verifier the mode calls for. Reads `sslrootcert` here, when the store
/// connects, so a missing or unusable file stops the start.
pub(super) fn connector(settings: &TlsSettings) -> Result<Connector, TlsConfigError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let roots = match (&settings.root_cert, settings.mode) {
        // Never used for TLS: no reason to read it.
        (_, SslMode::Disable) => None,
        (Some(path), _) => Some(Arc::new(load_roots(path)?)),
        (None, mode @ (SslMode::VerifyCa | SslMode::VerifyFull)) => {
            return Err(TlsConfigError::NoRootCert(mode));
        }
        (None, SslMode::Prefer | SslMode::Require) => None,
    };
    let verifier: Arc<dyn ServerCertVerifier> = match (settings.mode, roots) {
        (SslMode::VerifyFull, Some(roots)) => {
            WebPkiServerVerifier::builder_with_provider(roots, Arc::clone(&provider))
                .build()
                .map_err(|e| TlsConfigError::Rustls(e.into()))?
        }
        // libpq: `require` (and `prefer`) with a root file verify like `verify-ca`.
        (_, roots) => Arc::new(HostUnchecked {
            roots,
            provider: Arc::clone(&provider),
        }),
    };
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsConfigError::Rustls(e.into()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    // What libpq 17 sends; required by `sslnegotiation=direct`, ignored
    // by older servers.
    config.alpn_protocols = vec![b"postgresql".to_vec()];
    Ok(MakeRustlsConnect::new(config))
}

/// The CA certificates in the PEM file at `path`.
fn load_roots(path: &Path) -> Result<RootCertStore, TlsConfigError> {
    if path.as_os_str() == "system" {
        return Err(TlsConfigError::SystemRoots);
    }
    let pem = std::fs::read(path).map_err(|source| TlsConfigError::Unreadable {
        path: path.to_owned(),
        source,
    })?;
    let bad = |source: Box<dyn std::error::Error + Send + Sync>| TlsConfigError::BadCertificate {
        path: path.to_owned(),
        source,
    };
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        roots
            .add(cert.map_err(|e| bad(e.into()))?)
            .map_err(|e| bad(e.into()))?;
    }
    if roots.is_empty() {
        return Err(TlsConfigError::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(roots)
}

/// Whether `e` is a TLS handshake that failed because we refused the
/// server's certificate: a configuration mistake (or an impostor), not an
/// outage.
pub(super) fn certificate_refused(e: &tokio_postgres::Error) -> bool {
    let mut source = std::error::Error::source(e);
    while let Some(error) = source {
        // tokio-rustls wraps the rustls error in an io::Error, whose
        // `source` skips it: look inside.
        let inner = error
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .map_or(error, |inner| inner as &(dyn std::error::Error + 'static));
        if let Some(tls) = inner.downcast_ref::<rustls::Error>() {
            return matches!(tls, rustls::Error::InvalidCertificate(_));
        }
        source = error.source();
    }
    false
}

/// `verify-ca` (and `require`/`prefer` with `sslrootcert`): the chain must
/// lead to a root of `sslrootcert`; the host name is not checked.
/// `require`/`prefer` without `sslrootcert` (`roots` `None`): any
/// certificate, as libpq takes it. Either way the handshake's signatures
/// are checked, so the server holds the key of the certificate it shows.
#[derive(Debug)]
struct HostUnchecked {
    roots: Option<Arc<RootCertStore>>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for HostUnchecked {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if let Some(roots) = &self.roots {
            let cert = ParsedCertificate::try_from(end_entity)?;
            verify_server_cert_signed_by_trust_anchor(
                &cert,
                roots,
                intermediates,
                now,
                self.provider.signature_verification_algorithms.all,
            )?;
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(mode: SslMode, root_cert: Option<&str>) -> TlsSettings {
        TlsSettings {
            mode,
            root_cert: root_cert.map(PathBuf::from),
        }
    }

    fn refused(settings: &TlsSettings) -> TlsConfigError {
        match connector(settings) {
            Ok(_) => panic!("{settings:?} was accepted"),
            Err(e) => e,
        }
    }

    #[test]
    fn a_url_loses_only_sslmode_and_sslrootcert() {
        let cases = [
            (
                "postgres://u:p@h:5432/db?sslmode=verify-full&sslrootcert=/etc/ca.pem",
                "postgres://u:p@h:5432/db",
                settings(SslMode::VerifyFull, Some("/etc/ca.pem")),
            ),
            (
                "postgresql://h/db?application_name=x&sslmode=require&connect_timeout=3",
                "postgresql://h/db?application_name=x&connect_timeout=3",
                settings(SslMode::Require, None),
            ),
            (
                "postgres://h/db?sslrootcert=%2Ftmp%2Fmy%20ca.pem&sslmode=verify-ca&x=1",
                "postgres://h/db?x=1",
                settings(SslMode::VerifyCa, Some("/tmp/my ca.pem")),
            ),
            // The last one counts, as in libpq.
            (
                "postgres://h/db?sslmode=disable&sslmode=verify-full&sslrootcert=a",
                "postgres://h/db",
                settings(SslMode::VerifyFull, Some("a")),
            ),
            // A password may hold `?` and `&`: the query starts after the `@`.
            (
                "postgres://u:p?w&sslmode=disable@h/db?sslmode=require",
                "postgres://u:p?w&sslmode=disable@h/db",
                settings(SslMode::Require, None),
            ),
            (
                "postgres://h/db",
                "postgres://h/db",
                settings(SslMode::Prefer, None),
            ),
            (
                "postgres://h/db?user=u",
                "postgres://h/db?user=u",
                settings(SslMode::Prefer, None),
            ),
        ];
        for (url, rest, expected) in cases {
            let (got_rest, got) = split(url).unwrap();
            assert_eq!((got_rest.as_str(), &got), (rest, &expected), "{url}");
        }
    }

    #[test]
    fn a_key_value_string_loses_only_sslmode_and_sslrootcert() {
        let cases = [
            (
                "host=h dbname=db sslmode=verify-full sslrootcert=/etc/ca.pem user=u",
                "host=h dbname=db   user=u",
                settings(SslMode::VerifyFull, Some("/etc/ca.pem")),
            ),
            (
                "host=h sslrootcert = '/tmp/my \\'ca\\'.pem' sslmode= require",
                "host=h  ",
                settings(SslMode::Require, Some("/tmp/my 'ca'.pem")),
            ),
            (
                "password='a sslmode=disable' host=h",
                "password='a sslmode=disable' host=h",
                settings(SslMode::Prefer, None),
            ),
        ];
        for (url, rest, expected) in cases {
            let (got_rest, got) = split(url).unwrap();
            assert_eq!((got_rest.as_str(), &got), (rest, &expected), "{url}");
        }
    }

    #[test]
    fn what_remains_parses_as_tokio_postgres_would_parse_it() {
        for url in [
            "postgres://u:secret@db.example:6432/keys?sslmode=verify-full&sslrootcert=/ca.pem&application_name=a",
            "host=db.example port=6432 user=u password='se cret' sslmode=verify-ca sslrootcert=/ca.pem dbname=keys",
        ] {
            let (rest, _) = split(url).unwrap();
            let config: tokio_postgres::Config = rest.parse().unwrap();
            assert_eq!(config.get_user(), Some("u"), "{url}");
            assert_eq!(config.get_dbname(), Some("keys"), "{url}");
            assert_eq!(config.get_ports(), [6432], "{url}");
        }
    }

    #[test]
    fn malformed_strings_are_left_for_tokio_postgres_to_refuse() {
        for url in ["host='unterminated sslmode=require", "host sslmode=require"] {
            let (rest, found) = split(url).unwrap();
            assert_eq!((rest.as_str(), found), (url, TlsSettings::default()));
        }
    }

    #[test]
    fn an_unknown_sslmode_is_refused_by_name() {
        for url in [
            "postgres://h/db?sslmode=allow",
            "host=h sslmode=verify_full",
            "postgres://h/db?sslmode=%FF",
        ] {
            let err = split(url).unwrap_err();
            assert!(
                matches!(err, TlsConfigError::UnknownMode(_)),
                "{url}: {err}"
            );
            let message = err.to_string();
            assert!(message.contains("verify-full"), "{message}");
        }
    }

    #[test]
    fn verifying_without_sslrootcert_is_refused_naming_it() {
        for mode in [SslMode::VerifyCa, SslMode::VerifyFull] {
            let err = refused(&settings(mode, None));
            let message = err.to_string();
            assert!(
                message.contains("sslrootcert") && message.contains(mode.as_str()),
                "{message}"
            );
        }
        for mode in [SslMode::Disable, SslMode::Prefer, SslMode::Require] {
            assert!(connector(&settings(mode, None)).is_ok());
        }
    }

    #[test]
    fn an_unusable_sslrootcert_is_refused_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let garbage = dir.path().join("garbage.pem");
        std::fs::write(
            &garbage,
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let missing = dir.path().join("missing.pem");
        for (path, expected) in [
            (missing.to_str().unwrap(), "cannot read sslrootcert"),
            (empty.to_str().unwrap(), "holds no PEM certificate"),
            (garbage.to_str().unwrap(), "cannot be used"),
            ("system", "sslrootcert=system is not supported"),
        ] {
            let err = refused(&settings(SslMode::VerifyFull, Some(path)));
            let message = err.to_string();
            assert!(message.contains(expected), "{path}: {message}");
        }
        // Never read when TLS is off.
        assert!(connector(&settings(SslMode::Disable, Some(missing.to_str().unwrap()))).is_ok());
    }
}

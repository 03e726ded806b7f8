//! The connection to the admin API: the address, TLS from the files given,
//! and the credential every request carries.
//!
//! The credential comes only from `VILVIK_KEYS_TOKEN` (a management key
//! from `vilvik-keys bootstrap`, or the operator token), never from a flag:
//! a process's arguments are visible to every user of the machine. It is
//! sent as `authorization: Bearer …` by an interceptor, marked sensitive,
//! and never printed. With the operator token, `--account` and `--actor`
//! name the account acted on and the person acting.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use secrecy::{ExposeSecret, SecretString};
use tonic::metadata::AsciiMetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use super::args::{ClientArgs, ClientTlsArgs};
use super::errors::{hint_client_certificate, root_cause, tls_hint};
use super::output;
use crate::proto::key_admin_client::KeyAdminClient;

/// The environment variable holding the CLI's credential.
const TOKEN_ENV: &str = "VILVIK_KEYS_TOKEN";
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// The admin API's client, every request carrying the credentials.
pub(super) type Api = KeyAdminClient<InterceptedService<Channel, Credentials>>;

/// Connects to the admin API `args` name, with the credential from the
/// environment.
pub(super) async fn connect(args: &ClientArgs) -> anyhow::Result<Api> {
    let credentials = Credentials::from_env(args)?;
    let uri = endpoint_uri(&args.addr)?;
    let endpoint = Endpoint::from_shared(uri.clone())
        .map_err(|_| {
            anyhow!(
                "--addr '{}' is not an address such as http://127.0.0.1:50051 or 127.0.0.1:50051",
                args.addr
            )
        })?
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(REQUEST_TIMEOUT);
    let endpoint = if uri.starts_with("https://") {
        if args.tls.client_cert_file.is_none() {
            hint_client_certificate();
        }
        endpoint
            .tls_config(args.tls.config()?)
            .context("cannot set up TLS to the admin API")?
    } else {
        if args.tls.any() {
            bail!(
                "--ca-file and --client-cert-file are for TLS: give --addr (VILVIK_KEYS_ADDR) as https://host:port"
            );
        }
        endpoint
    };
    let channel = endpoint.connect().await.map_err(|e| {
        let cause = root_cause(&e);
        match tls_hint(&cause) {
            "" => anyhow!(
                "cannot reach the admin API at {uri} ({cause}): is `vilvik-keys serve` running there? \
                 Point --addr or VILVIK_KEYS_ADDR at its admin address"
            ),
            hint => anyhow!("cannot reach the admin API at {uri} ({cause}){hint}"),
        }
    })?;
    Ok(KeyAdminClient::with_interceptor(channel, credentials))
}

/// `host:port` -> `http://host:port`; explicit `http://` and `https://`
/// are kept.
fn endpoint_uri(addr: &str) -> anyhow::Result<String> {
    let addr = addr.trim();
    if addr.is_empty() {
        bail!("--addr is empty: give the admin API's address, e.g. http://127.0.0.1:50051");
    }
    match addr.split_once("://") {
        None => Ok(format!("http://{addr}")),
        Some(("http" | "https", _)) => Ok(addr.to_owned()),
        Some((scheme, _)) => {
            bail!(
                "--addr {addr}: unsupported scheme '{scheme}': use http://host:port, https://host:port or host:port"
            )
        }
    }
}

impl ClientTlsArgs {
    fn any(&self) -> bool {
        self.ca_file.is_some() || self.client_cert_file.is_some() || self.client_key_file.is_some()
    }

    /// tonic's client TLS from the files given.
    fn config(&self) -> anyhow::Result<ClientTlsConfig> {
        let read = |path: &PathBuf, flag: &str| {
            std::fs::read(path)
                .with_context(|| format!("{flag} {}: cannot read it", path.display()))
        };
        let mut tls = ClientTlsConfig::new();
        match &self.ca_file {
            Some(ca) => tls = tls.ca_certificate(Certificate::from_pem(read(ca, "--ca-file")?)),
            None => tls = tls.with_native_roots(),
        }
        if let (Some(cert), Some(key)) = (&self.client_cert_file, &self.client_key_file) {
            tls = tls.identity(Identity::from_pem(
                read(cert, "--client-cert-file")?,
                read(key, "--client-key-file")?,
            ));
        }
        Ok(tls)
    }
}

/// The metadata every request carries. `Debug` never shows the credential.
#[derive(Clone)]
pub(super) struct Credentials {
    authorization: AsciiMetadataValue,
    account: Option<AsciiMetadataValue>,
    actor: Option<AsciiMetadataValue>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("authorization", &"[REDACTED]")
            .field("account", &self.account)
            .field("actor", &self.actor)
            .finish()
    }
}

impl tonic::service::Interceptor for Credentials {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        let metadata = request.metadata_mut();
        metadata.insert("authorization", self.authorization.clone());
        if let Some(account) = &self.account {
            metadata.insert(crate::headers::ACCOUNT, account.clone());
        }
        if let Some(actor) = &self.actor {
            metadata.insert(crate::headers::ACTOR, actor.clone());
        }
        Ok(request)
    }
}

impl Credentials {
    fn from_env(args: &ClientArgs) -> anyhow::Result<Self> {
        let token = match std::env::var(TOKEN_ENV) {
            Ok(token) if !token.trim().is_empty() => SecretString::from(token.trim().to_owned()),
            Ok(_) | Err(std::env::VarError::NotPresent) => bail!(
                "no credential: export {TOKEN_ENV}=<credential>, a management key (vlk_…) printed by \
                 `vilvik-keys bootstrap --account <ACCOUNT>`, or the operator token \
                 (then also pass --account and --actor)"
            ),
            Err(std::env::VarError::NotUnicode(_)) => {
                bail!(
                    "{TOKEN_ENV} is not valid text: it should hold a management key (vlk_…) or the operator token"
                )
            }
        };
        let mut authorization =
            AsciiMetadataValue::try_from(format!("Bearer {}", token.expose_secret())).map_err(
                |_| {
                    anyhow!(
                        "{TOKEN_ENV} holds characters that cannot be sent in a header: \
                     it should hold a management key (vlk_…) or the operator token"
                    )
                },
            )?;
        authorization.set_sensitive(true);
        Ok(Self {
            authorization,
            account: header_value("--account", args.account.as_deref())?,
            actor: header_value("--actor", args.actor.as_deref())?,
        })
    }
}

fn header_value(flag: &str, value: Option<&str>) -> anyhow::Result<Option<AsciiMetadataValue>> {
    let Some(value) = value.map(str::trim).filter(|v| !v.is_empty()) else {
        return Ok(None);
    };
    AsciiMetadataValue::try_from(value).map(Some).map_err(|_| {
        anyhow!(
            "{flag} '{}' must be printable ASCII",
            output::printable(value)
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_get_a_scheme_when_missing() {
        assert_eq!(
            endpoint_uri("127.0.0.1:50051").unwrap(),
            "http://127.0.0.1:50051"
        );
        assert_eq!(
            endpoint_uri(" http://keys:50051 ").unwrap(),
            "http://keys:50051"
        );
        assert_eq!(
            endpoint_uri("https://keys:443").unwrap(),
            "https://keys:443"
        );
        assert!(endpoint_uri("ftp://keys").is_err());
        assert!(endpoint_uri("").is_err());
    }

    #[test]
    fn credentials_debug_hides_the_token() {
        let mut authorization = AsciiMetadataValue::try_from("Bearer vlk_secret").unwrap();
        authorization.set_sensitive(true);
        let credentials = Credentials {
            authorization,
            account: None,
            actor: None,
        };
        assert!(!format!("{credentials:?}").contains("vlk_secret"));
    }
}

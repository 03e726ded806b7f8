//! `keys …` and `accounts …`: the admin API from the command line, through
//! the generated `KeyAdmin` client like any other tool.
//!
//! The credential comes only from `VILVIK_KEYS_TOKEN` (a management key
//! from `vilvik-keys bootstrap`, or the operator token), never from a flag:
//! a process's arguments are visible to every user of the machine. It is
//! sent as `authorization: Bearer …` by an interceptor, marked sensitive,
//! and never printed. With the operator token, `--account` and `--actor`
//! name the account acted on and the person acting.

use std::io::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use clap::{Args, Subcommand, ValueEnum};
use secrecy::{ExposeSecret, SecretString};
use serde_json::Value;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tonic::metadata::AsciiMetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use super::output;
use crate::proto::{self, key_admin_client::KeyAdminClient};

/// The environment variable holding the CLI's credential.
pub const TOKEN_ENV: &str = "VILVIK_KEYS_TOKEN";
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Tries of a create or rotation whose answer was UNAVAILABLE or
/// DEADLINE_EXCEEDED (each with the same request id, so safe), and the
/// wait before the second; each further wait doubles.
const ATTEMPTS: u32 = 5;
const FIRST_BACKOFF: Duration = Duration::from_millis(200);

/// Where the admin API is and how to talk to it. The credential is read
/// from `VILVIK_KEYS_TOKEN` only.
#[derive(Debug, Args)]
#[command(next_help_heading = "Connection")]
pub struct ClientArgs {
    /// The admin API's address, e.g. http://127.0.0.1:50051, host:port, or https://host:port for TLS.
    #[arg(
        long,
        env = "VILVIK_KEYS_ADDR",
        default_value = "http://127.0.0.1:50051",
        global = true
    )]
    pub addr: String,
    /// Print machine-readable JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
    /// The account to act on (sent as x-vilvik-account; needed with the operator token).
    #[arg(long, env = "VILVIK_KEYS_ACCOUNT", global = true)]
    pub account: Option<String>,
    /// The person acting, for the audit log (sent as x-vilvik-actor; needed with the operator token).
    #[arg(long, env = "VILVIK_KEYS_ACTOR", global = true)]
    pub actor: Option<String>,
    #[command(flatten)]
    pub tls: ClientTlsArgs,
}

/// TLS to the admin API, for an `https://` address.
#[derive(Debug, Args)]
pub struct ClientTlsArgs {
    /// The CA (PEM) the admin API's certificate must be signed by (default: the system's CAs).
    #[arg(long, env = "VILVIK_KEYS_CA_FILE", global = true)]
    pub ca_file: Option<PathBuf>,
    /// A client certificate (PEM), for an admin API that demands one (mutual TLS).
    #[arg(
        long,
        env = "VILVIK_KEYS_CLIENT_CERT_FILE",
        global = true,
        requires = "client_key_file"
    )]
    pub client_cert_file: Option<PathBuf>,
    /// The private key (PEM) of --client-cert-file.
    #[arg(
        long,
        env = "VILVIK_KEYS_CLIENT_KEY_FILE",
        global = true,
        requires = "client_cert_file"
    )]
    pub client_key_file: Option<PathBuf>,
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

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Create a key and print its secret: the only time it is ever shown.
    Create(CreateArgs),
    /// List the account's keys (every page).
    List {
        /// Include revoked keys.
        #[arg(long)]
        include_revoked: bool,
        /// Keys fetched per request, 1 to 100 (default: the server's, 50).
        #[arg(long, value_parser = clap::value_parser!(i32).range(1..=100))]
        page_size: Option<i32>,
    },
    /// Show one key.
    Show {
        /// The key's id, as printed by `keys create` or `keys list`.
        key_id: String,
    },
    /// Change a key's name, description, scopes or expiry.
    Update(UpdateArgs),
    /// Issue a new secret (and prefix); the old secret stops working at once.
    Rotate {
        /// The key's id.
        key_id: String,
        /// The request id to send, a UUID (default: a new one). To retry a
        /// rotation whose outcome is unknown, give the id it printed.
        #[arg(long)]
        request_id: Option<String>,
        /// Rotate only if the key's etag (`keys show`) is still this.
        #[arg(long)]
        etag: Option<String>,
    },
    /// Disable a key for good.
    Revoke {
        /// The key's id.
        key_id: String,
        /// Why, for the audit log (at most 500 characters).
        #[arg(long)]
        reason: Option<String>,
        /// Revoke only if the key's etag (`keys show`) is still this.
        #[arg(long)]
        etag: Option<String>,
    },
    /// Show the audit log of one key, or of the whole account (every page).
    Audit {
        /// The key's id; without it, every event of the account.
        key_id: Option<String>,
        /// Events fetched per request, 1 to 100 (default: the server's, 50).
        #[arg(long, value_parser = clap::value_parser!(i32).range(1..=100))]
        page_size: Option<i32>,
    },
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// A name for the key, 1 to 64 characters, e.g. ci-runner.
    #[arg(long)]
    pub name: String,
    /// What the key is for.
    #[arg(long)]
    pub description: Option<String>,
    /// A scope to grant, resource:action (e.g. datasets:read); repeat for more.
    #[arg(long = "scope", value_name = "SCOPE")]
    pub scopes: Vec<String>,
    /// When the key expires, RFC 3339 (e.g. 2030-01-31T00:00:00Z).
    #[arg(long, value_parser = parse_rfc3339, conflicts_with = "expires_in")]
    pub expires_at: Option<OffsetDateTime>,
    /// How long the key lives from now, e.g. 30d, 12h, 90m.
    #[arg(long, value_parser = parse_duration)]
    pub expires_in: Option<Duration>,
    /// The request id to send, a UUID (default: a new one). To retry a
    /// create whose outcome is unknown, give the id it printed: within 24
    /// hours that returns the same key and secret instead of a second key.
    #[arg(long)]
    pub request_id: Option<String>,
}

#[derive(Debug, Args)]
pub struct UpdateArgs {
    /// The key's id.
    pub key_id: String,
    /// A new name.
    #[arg(long)]
    pub name: Option<String>,
    /// A new description ("" clears it).
    #[arg(long)]
    pub description: Option<String>,
    /// The new scopes, replacing all current ones; repeat for more.
    #[arg(long = "scope", value_name = "SCOPE", conflicts_with = "clear_scopes")]
    pub scopes: Vec<String>,
    /// Remove every scope.
    #[arg(long)]
    pub clear_scopes: bool,
    /// A new expiry, RFC 3339.
    #[arg(long, value_parser = parse_rfc3339, conflicts_with_all = ["expires_in", "no_expiry"])]
    pub expires_at: Option<OffsetDateTime>,
    /// A new expiry, this long from now, e.g. 30d, 12h, 90m.
    #[arg(long, value_parser = parse_duration, conflicts_with = "no_expiry")]
    pub expires_in: Option<Duration>,
    /// Remove the expiry: the key stays valid until revoked.
    #[arg(long)]
    pub no_expiry: bool,
    /// Update only if the key's etag (`keys show`) is still this (default:
    /// the etag the key has when this command reads it first).
    #[arg(long)]
    pub etag: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum AccountsCommand {
    /// Show the calling account's tier and active key limit.
    Show,
    /// Change an account's tier (operator token and --actor needed; --account
    /// defaults to ACCOUNT).
    SetTier {
        /// The account, e.g. ACME.
        #[arg(id = "target_account", value_name = "ACCOUNT")]
        account: String,
        /// The new tier.
        tier: TierArg,
    },
    /// Set which scopes the account's keys may be granted, as patterns such
    /// as `datasets:*` or `reports:read` (operator token and --actor
    /// needed). With --default, use the server's `allowed_scopes` again.
    SetScopes {
        /// The account, e.g. ACME.
        #[arg(id = "target_account", value_name = "ACCOUNT")]
        account: String,
        /// Scope patterns: resource:action, either part may be `*`.
        #[arg(
            value_name = "PATTERN",
            required_unless_present = "default",
            conflicts_with = "default"
        )]
        patterns: Vec<String>,
        /// Drop the account's own patterns and use the server's.
        #[arg(long)]
        default: bool,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TierArg {
    Free,
    Premium,
}

impl From<TierArg> for proto::Tier {
    fn from(tier: TierArg) -> Self {
        match tier {
            TierArg::Free => proto::Tier::Free,
            TierArg::Premium => proto::Tier::Premium,
        }
    }
}

pub async fn run_keys(client: ClientArgs, command: KeysCommand) -> anyhow::Result<()> {
    let json = client.json;
    let mut api = connect(&client).await?;
    match command {
        KeysCommand::Create(args) => {
            let expires_at = expiry(args.expires_at, args.expires_in)?;
            let request = proto::CreateKeyRequest {
                name: args.name,
                description: args.description.unwrap_or_default(),
                scopes: args.scopes,
                expires_at,
                request_id: request_id(args.request_id),
            };
            let mut retry = Retry::new("CreateKey", &request.request_id);
            let response = loop {
                match api.create_key(request.clone()).await {
                    Ok(response) => break response.into_inner(),
                    Err(status) if retry.again(&status).await => {}
                    Err(status) => return Err(retry.failed(status)),
                }
            };
            let key = response.key.unwrap_or_default();
            print_new_secret(
                json,
                "Created",
                &key,
                &response.secret,
                &response.smoke_test_command,
            )
        }
        KeysCommand::List {
            include_revoked,
            page_size,
        } => {
            let mut keys = Vec::new();
            let mut page_token = String::new();
            loop {
                let page = api
                    .list_keys(proto::ListKeysRequest {
                        page_size: page_size.unwrap_or(0),
                        page_token: page_token.clone(),
                        include_revoked,
                    })
                    .await
                    .map_err(api_error)?
                    .into_inner();
                keys.extend(page.keys);
                if !next_page(&mut page_token, page.next_page_token)? {
                    break;
                }
            }
            if json {
                emit(&output::json_text(&Value::Array(
                    keys.iter().map(output::key_json).collect(),
                )))
            } else if keys.is_empty() {
                emit(if include_revoked {
                    "No keys.\n"
                } else {
                    "No keys (revoked keys are hidden: add --include-revoked).\n"
                })
            } else {
                emit(&output::keys_table(&keys))
            }
        }
        KeysCommand::Show { key_id } => {
            let key = api
                .get_key(proto::GetKeyRequest { key_id })
                .await
                .map_err(api_error)?
                .into_inner();
            print_key(json, None, &key)
        }
        KeysCommand::Update(args) => {
            let mut request = update_request(args)?;
            if request.etag.is_empty() {
                // Change the key only as it was read: a change made
                // meanwhile by someone else is ABORTED, not overwritten.
                request.etag = api
                    .get_key(proto::GetKeyRequest {
                        key_id: request.key_id.clone(),
                    })
                    .await
                    .map_err(api_error)?
                    .into_inner()
                    .etag;
            }
            let key = api
                .update_key(request)
                .await
                .map_err(api_error)?
                .into_inner();
            print_key(json, Some("Updated"), &key)
        }
        KeysCommand::Rotate {
            key_id,
            request_id: id,
            etag,
        } => {
            let request = proto::RotateKeyRequest {
                key_id,
                request_id: request_id(id),
                etag: etag.unwrap_or_default(),
            };
            let mut retry = Retry::new("RotateKey", &request.request_id);
            let response = loop {
                match api.rotate_key(request.clone()).await {
                    Ok(response) => break response.into_inner(),
                    Err(status) if retry.again(&status).await => {}
                    Err(status) => return Err(retry.failed(status)),
                }
            };
            let key = response.key.unwrap_or_default();
            print_new_secret(
                json,
                "Rotated",
                &key,
                &response.secret,
                &response.smoke_test_command,
            )
        }
        KeysCommand::Revoke {
            key_id,
            reason,
            etag,
        } => {
            let key = api
                .revoke_key(proto::RevokeKeyRequest {
                    key_id,
                    reason: reason.unwrap_or_default(),
                    etag: etag.unwrap_or_default(),
                })
                .await
                .map_err(api_error)?
                .into_inner();
            print_key(json, Some("Revoked"), &key)
        }
        KeysCommand::Audit { key_id, page_size } => {
            let mut events = Vec::new();
            let mut page_token = String::new();
            loop {
                let page = api
                    .list_audit_events(proto::ListAuditEventsRequest {
                        key_id: key_id.clone().unwrap_or_default(),
                        page_size: page_size.unwrap_or(0),
                        page_token: page_token.clone(),
                    })
                    .await
                    .map_err(api_error)?
                    .into_inner();
                events.extend(page.events);
                if !next_page(&mut page_token, page.next_page_token)? {
                    break;
                }
            }
            if json {
                emit(&output::json_text(&Value::Array(
                    events.iter().map(output::audit_event_json).collect(),
                )))
            } else if events.is_empty() {
                emit("No audit events.\n")
            } else {
                emit(&output::audit_table(&events))
            }
        }
    }
}

pub async fn run_accounts(mut client: ClientArgs, command: AccountsCommand) -> anyhow::Result<()> {
    let json = client.json;
    if let AccountsCommand::SetTier { account, .. } | AccountsCommand::SetScopes { account, .. } =
        &command
    {
        // The operator token acts on the account it names in x-vilvik-account.
        client.account.get_or_insert_with(|| account.clone());
    }
    let mut api = connect(&client).await?;
    let (account, headline) = match command {
        AccountsCommand::Show => {
            let account = api
                .get_account(proto::GetAccountRequest {})
                .await
                .map_err(api_error)?
                .into_inner();
            (account, None)
        }
        AccountsCommand::SetTier { account, tier } => {
            let account = api
                .set_account_tier(proto::SetAccountTierRequest {
                    account_id: account,
                    tier: proto::Tier::from(tier).into(),
                })
                .await
                .map_err(api_error)?
                .into_inner();
            let headline = format!(
                "Account {} is now on the {} tier.\n\n",
                output::printable(&account.account_id),
                output::tier(account.tier)
            );
            (account, Some(headline))
        }
        AccountsCommand::SetScopes {
            account,
            patterns,
            default,
        } => {
            let account = api
                .set_account_scopes(proto::SetAccountScopesRequest {
                    account_id: account,
                    grantable_scopes: patterns,
                    use_server_default: default,
                })
                .await
                .map_err(api_error)?
                .into_inner();
            let headline = format!(
                "Account {}'s keys may now be granted the scopes below.\n\n",
                output::printable(&account.account_id)
            );
            (account, Some(headline))
        }
    };
    if json {
        emit(&output::json_text(&output::account_json(&account)))
    } else {
        emit(&format!(
            "{}{}",
            headline.unwrap_or_default(),
            output::account_block(&account)
        ))
    }
}

type Api = KeyAdminClient<InterceptedService<Channel, Credentials>>;

/// The request id a create or rotation sends: the one given, else a new
/// one. The server checks its form.
fn request_id(given: Option<String>) -> String {
    given.unwrap_or_else(|| {
        vilvik_keys_domain::RequestId::generate()
            .as_str()
            .to_owned()
    })
}

/// Whether a call may have failed only on the way: the service was
/// unavailable, or no answer came in time (DEADLINE_EXCEEDED from the
/// server, or tonic's own timeout, which it reports as CANCELLED).
fn transient(status: &tonic::Status) -> bool {
    match status.code() {
        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded => true,
        tonic::Code::Cancelled => status.message() == "Timeout expired",
        _ => false,
    }
}

/// Retries of one create or rotation, all with its request id: the
/// server answers a retry of a call that did go through with that call's
/// key and secret, so retrying after an unknown outcome is safe.
struct Retry<'a> {
    method: &'static str,
    request_id: &'a str,
    attempt: u32,
    backoff: Duration,
}

impl<'a> Retry<'a> {
    fn new(method: &'static str, request_id: &'a str) -> Self {
        Self {
            method,
            request_id,
            attempt: 1,
            backoff: FIRST_BACKOFF,
        }
    }

    /// Whether to try again after `status` ([`transient`], tries left);
    /// if so, says so on stderr and waits.
    async fn again(&mut self, status: &tonic::Status) -> bool {
        if !transient(status) || self.attempt >= ATTEMPTS {
            return false;
        }
        // Up to a quarter more, so that clients failed by one outage do
        // not all come back at once.
        let jitter = self.backoff.mul_f64(
            f64::from(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default()
                    .subsec_nanos()
                    % 1_000,
            ) / 4_000.0,
        );
        let wait = self.backoff + jitter;
        eprintln!(
            "{}: {}; trying again with the same request id in {} ms (try {} of {ATTEMPTS})",
            self.method,
            api_error(status.clone()),
            wait.as_millis(),
            self.attempt + 1
        );
        tokio::time::sleep(wait).await;
        self.attempt += 1;
        self.backoff *= 2;
        true
    }

    /// The error to report when no more tries are made: with the request
    /// id when the outcome may be unknown, so the user can retry it.
    fn failed(&self, status: tonic::Status) -> anyhow::Error {
        let unknown = transient(&status);
        let error = api_error(status);
        if unknown {
            error.context(format!(
                "{} failed {} times; to retry it safely within 24 hours, run the same command \
                 again with --request-id {}",
                self.method, self.attempt, self.request_id
            ))
        } else {
            error
        }
    }
}

/// The metadata every request carries. `Debug` never shows the credential.
#[derive(Clone)]
struct Credentials {
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

async fn connect(args: &ClientArgs) -> anyhow::Result<Api> {
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
            let _ = TRANSPORT_HINT.set(
                ": the admin API closed the connection; if it demands client certificates (mutual TLS), \
                 set VILVIK_KEYS_CLIENT_CERT_FILE and VILVIK_KEYS_CLIENT_KEY_FILE to one its CA signed",
            );
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

/// The innermost error of a chain, e.g. "Connection refused (os error 111)".
fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = e;
    while let Some(source) = cause.source() {
        cause = source;
    }
    cause.to_string()
}

/// A failed call as `CODE: message`; a transport failure (the call never
/// reached the service) with its cause, and a hint when TLS refused it.
fn api_error(status: tonic::Status) -> anyhow::Error {
    let code = code_name(status.code());
    let mut message = output::printable(status.message());
    if let Some(source) = std::error::Error::source(&status) {
        let cause = output::printable(&root_cause(source));
        let hint = match tls_hint(&cause) {
            "" => TRANSPORT_HINT.get().copied().unwrap_or_default(),
            hint => hint,
        };
        message = format!("{message} ({cause}){hint}");
    }
    if message.is_empty() {
        anyhow!("{code}")
    } else {
        anyhow!("{code}: {message}")
    }
}

/// What to add to a call that failed in transport: over TLS without a
/// client certificate, the likely cause. (A TLS 1.3 server refuses a
/// client's certificate after the client thinks the handshake is done, so
/// the call sees only its connection closing, in one of several ways.)
static TRANSPORT_HINT: std::sync::OnceLock<&'static str> = std::sync::OnceLock::new();

/// What to do about a TLS alert from the admin API.
fn tls_hint(cause: &str) -> &'static str {
    if cause.contains("CertificateRequired") || cause.contains("BadCertificate") {
        ": the admin API wants a client certificate its CA signed; set VILVIK_KEYS_CLIENT_CERT_FILE and VILVIK_KEYS_CLIENT_KEY_FILE"
    } else if cause.contains("UnknownCA") || cause.contains("UnknownIssuer") {
        ": the certificates are signed by a CA the other side does not trust; check VILVIK_KEYS_CA_FILE and the client certificate"
    } else {
        ""
    }
}

/// The canonical name of a gRPC status code, e.g. `INVALID_ARGUMENT`.
fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Moves `current` to the next page's token; false on the last page.
fn next_page(current: &mut String, next: String) -> anyhow::Result<bool> {
    if next.is_empty() {
        return Ok(false);
    }
    if next == *current {
        bail!("the server returned the same page token twice; stopping to avoid a loop");
    }
    *current = next;
    Ok(true)
}

/// The expiry asked for by `--expires-at` or `--expires-in`, if any.
fn expiry(
    at: Option<OffsetDateTime>,
    expires_in: Option<Duration>,
) -> anyhow::Result<Option<prost_types::Timestamp>> {
    let at = match (at, expires_in) {
        (Some(at), _) => at,
        (None, Some(after)) => time::Duration::try_from(after)
            .ok()
            .and_then(|after| OffsetDateTime::now_utc().checked_add(after))
            .context("--expires-in is too far in the future")?,
        (None, None) => return Ok(None),
    };
    Ok(Some(proto::timestamp(at)))
}

/// An UpdateKeyRequest whose field mask names exactly the flags given.
fn update_request(args: UpdateArgs) -> anyhow::Result<proto::UpdateKeyRequest> {
    let mut request = proto::UpdateKeyRequest {
        key_id: args.key_id,
        etag: args.etag.unwrap_or_default(),
        ..Default::default()
    };
    let mut paths = Vec::new();
    if let Some(name) = args.name {
        request.name = name;
        paths.push("name");
    }
    if let Some(description) = args.description {
        request.description = description;
        paths.push("description");
    }
    if !args.scopes.is_empty() || args.clear_scopes {
        request.scopes = args.scopes;
        paths.push("scopes");
    }
    if args.expires_at.is_some() || args.expires_in.is_some() || args.no_expiry {
        request.expires_at = expiry(args.expires_at, args.expires_in)?;
        paths.push("expires_at");
    }
    if paths.is_empty() {
        bail!(
            "nothing to update: give at least one of --name, --description, --scope, --clear-scopes, \
             --expires-at, --expires-in or --no-expiry"
        );
    }
    request.update_mask = Some(prost_types::FieldMask {
        paths: paths.into_iter().map(str::to_owned).collect(),
    });
    Ok(request)
}

fn print_key(json: bool, verb: Option<&str>, key: &proto::Key) -> anyhow::Result<()> {
    if json {
        return emit(&output::json_text(&output::key_json(key)));
    }
    let headline = verb
        .map(|verb| format!("{verb} key {}.\n\n", output::printable(&key.key_id)))
        .unwrap_or_default();
    emit(&format!("{headline}{}", output::key_block(key)))
}

/// After create and rotate: the key, then its secret (once), then the smoke test.
fn print_new_secret(
    json: bool,
    verb: &str,
    key: &proto::Key,
    secret: &str,
    smoke_test: &str,
) -> anyhow::Result<()> {
    if json {
        return emit(&output::json_text(&serde_json::json!({
            "key": output::key_json(key),
            "secret": secret,
            "smoke_test_command": smoke_test,
        })));
    }
    let old_secret = if verb == "Rotated" {
        " The previous secret has stopped working."
    } else {
        ""
    };
    emit(&format!(
        "{verb} key {}.{old_secret}\n\n{}\n\
         Secret (shown once, store it now: it cannot be retrieved again):\n\n    {}\n\n\
         Smoke test (checks the secret against the verify API):\n\n    {}\n",
        output::printable(&key.key_id),
        output::key_block(key),
        output::printable(secret),
        output::printable(smoke_test),
    ))
}

/// Writes to stdout; a closed pipe (`| head`) is not an error.
fn emit(text: &str) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(e).context("cannot write to stdout")
        }
        _ => Ok(()),
    }
}

fn parse_rfc3339(text: &str) -> Result<OffsetDateTime, String> {
    OffsetDateTime::parse(text, &Rfc3339)
        .map_err(|e| format!("'{text}' is not an RFC 3339 time such as 2030-01-31T00:00:00Z ({e})"))
}

/// A duration such as `30d`, `12h`, `90m`, `45s`, `2w`, or a sum like `1d12h`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let invalid = || {
        format!(
            "'{text}' is not a duration: use a number and a unit, e.g. 30d, 12h or 90m (units: s, m, h, d, w)"
        )
    };
    let mut total: u64 = 0;
    let mut rest = text.trim();
    if rest.is_empty() {
        return Err(invalid());
    }
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return Err(invalid());
        }
        let number: u64 = rest[..digits].parse().map_err(|_| invalid())?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let seconds_per_unit = match &rest[..unit_len] {
            "s" => 1,
            "m" => 60,
            "h" => 60 * 60,
            "d" => 24 * 60 * 60,
            "w" => 7 * 24 * 60 * 60,
            _ => return Err(invalid()),
        };
        rest = &rest[unit_len..];
        total = number
            .checked_mul(seconds_per_unit)
            .and_then(|s| total.checked_add(s))
            .ok_or_else(|| format!("'{text}' is too long a duration"))?;
    }
    if total == 0 {
        return Err(format!("'{text}' is zero: an expiry must be in the future"));
    }
    Ok(Duration::from_secs(total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_take_a_number_and_a_unit() {
        assert_eq!(parse_duration("30d"), Ok(Duration::from_secs(30 * 86_400)));
        assert_eq!(parse_duration("12h"), Ok(Duration::from_secs(12 * 3_600)));
        assert_eq!(parse_duration("90m"), Ok(Duration::from_secs(90 * 60)));
        assert_eq!(parse_duration("45s"), Ok(Duration::from_secs(45)));
        assert_eq!(parse_duration("2w"), Ok(Duration::from_secs(14 * 86_400)));
        assert_eq!(parse_duration("1d12h"), Ok(Duration::from_secs(36 * 3_600)));
    }

    #[test]
    fn durations_reject_what_they_cannot_read() {
        for bad in [
            "", "30", "d", "30x", "1.5d", "-1d", "30 d", "1d2", "h12", "30D",
        ] {
            let err = parse_duration(bad).unwrap_err();
            assert!(err.contains("not a duration"), "{bad:?}: {err}");
        }
        assert!(parse_duration("0d").unwrap_err().contains("zero"));
        assert!(parse_duration("99999999999999999999d").is_err());
        assert!(
            parse_duration("9999999999999999w")
                .unwrap_err()
                .contains("too long")
        );
    }

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

    #[tokio::test(start_paused = true)]
    async fn creates_and_rotations_are_retried_only_when_the_outcome_may_be_unknown() {
        let mut retry = Retry::new("CreateKey", "3f0e6a8c-1d2b-4c5e-9f70-0123456789ab");
        let unavailable = tonic::Status::unavailable("the key store is unavailable");
        let started = tokio::time::Instant::now();
        for _ in 1..ATTEMPTS {
            assert!(retry.again(&unavailable).await);
        }
        assert!(!retry.again(&unavailable).await, "at most {ATTEMPTS} tries");
        // 200 + 400 + 800 + 1,600 ms, each up to a quarter more.
        let waited = started.elapsed();
        assert!(waited >= Duration::from_millis(3_000), "{waited:?}");
        assert!(waited <= Duration::from_millis(3_750), "{waited:?}");
        let failed = format!("{:#}", retry.failed(unavailable));
        assert!(
            failed.contains("--request-id 3f0e6a8c-1d2b-4c5e-9f70-0123456789ab"),
            "{failed}"
        );

        for status in [
            tonic::Status::deadline_exceeded("deadline"),
            tonic::Status::cancelled("Timeout expired"),
        ] {
            assert!(
                Retry::new("RotateKey", "id").again(&status).await,
                "{status:?}"
            );
        }
        for status in [
            tonic::Status::invalid_argument("name: is empty"),
            tonic::Status::cancelled("the user pressed ^C"),
            tonic::Status::resource_exhausted("the tier's cap"),
        ] {
            assert!(
                !Retry::new("CreateKey", "id").again(&status).await,
                "{status:?}"
            );
        }
    }

    fn update_args(key_id: &str) -> UpdateArgs {
        UpdateArgs {
            key_id: key_id.to_owned(),
            name: None,
            description: None,
            scopes: Vec::new(),
            clear_scopes: false,
            expires_at: None,
            expires_in: None,
            no_expiry: false,
            etag: None,
        }
    }

    #[test]
    fn update_mask_names_exactly_the_flags_given() {
        let request = update_request(UpdateArgs {
            scopes: vec!["a:read".into()],
            description: Some(String::new()),
            ..update_args("k1")
        })
        .unwrap();
        assert_eq!(
            request.update_mask.unwrap().paths,
            ["description", "scopes"]
        );
        assert_eq!(request.scopes, ["a:read"]);

        let request = update_request(UpdateArgs {
            clear_scopes: true,
            no_expiry: true,
            ..update_args("k1")
        })
        .unwrap();
        assert_eq!(request.update_mask.unwrap().paths, ["scopes", "expires_at"]);
        assert!(request.scopes.is_empty() && request.expires_at.is_none());

        let request = update_request(UpdateArgs {
            expires_in: Some(Duration::from_secs(3_600)),
            ..update_args("k1")
        })
        .unwrap();
        let at = request.expires_at.unwrap().seconds;
        let expected = OffsetDateTime::now_utc().unix_timestamp() + 3_600;
        assert!((at - expected).abs() <= 5, "{at} vs {expected}");

        let err = update_request(update_args("k1")).unwrap_err().to_string();
        assert!(err.contains("nothing to update"), "{err}");
    }

    #[test]
    fn status_codes_read_as_words() {
        let err = api_error(tonic::Status::invalid_argument("scopes[0]: bad"));
        assert_eq!(err.to_string(), "INVALID_ARGUMENT: scopes[0]: bad");
        assert_eq!(
            api_error(tonic::Status::not_found("")).to_string(),
            "NOT_FOUND"
        );
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

    #[test]
    fn the_cli_definition_is_consistent() {
        use clap::CommandFactory;
        #[derive(Debug, clap::Parser)]
        struct Cli {
            #[command(flatten)]
            client: ClientArgs,
            #[command(subcommand)]
            command: KeysCommand,
        }
        Cli::command().debug_assert();
    }
}

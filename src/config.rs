//! Configuration: one typed struct, read from an optional TOML file and then
//! from the environment, which wins. Unknown file keys, unknown
//! `VILVIK_KEYS_*` variables and invalid values stop the start with a
//! message that names them.
//!
//! Every setting is declared once, in the `settings!` invocation below:
//! its file key, its variable, its default, one line saying what it means,
//! and how its value is applied. The TOML file's shape, the loader, the
//! unknown-variable check and the README's settings table ([`SETTINGS`],
//! [`settings_table`]) all come from that declaration; a test fails when the
//! README disagrees with it.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use vilvik_keys_domain::{ScopeCatalogue, Tier, TierLimits};
use vilvik_keys_store::Policy;

use crate::server::tls::TlsFiles;

/// Shortest operator token accepted: a guessable token would open every account.
const MIN_OPERATOR_TOKEN_LEN: usize = 32;
/// Fewest distinct characters an operator token may hold: 32 × `a` is 32
/// characters long and no secret.
const MIN_OPERATOR_TOKEN_DISTINCT: usize = 16;

/// Why `token` is too weak to be the operator token, if it is. The message
/// never quotes the token.
fn operator_token_weakness(token: &str) -> Option<String> {
    const MAKE_ONE: &str = "generate one with `openssl rand -base64 32`";
    if token.chars().count() < MIN_OPERATOR_TOKEN_LEN {
        return Some(format!(
            "the operator token must be at least {MIN_OPERATOR_TOKEN_LEN} characters; {MAKE_ONE}"
        ));
    }
    let distinct = token
        .chars()
        .collect::<std::collections::HashSet<_>>()
        .len();
    if distinct < MIN_OPERATOR_TOKEN_DISTINCT {
        return Some(format!(
            "the operator token holds only {distinct} distinct characters, and must hold at least {MIN_OPERATOR_TOKEN_DISTINCT} (a repeated or patterned token is guessable); {MAKE_ONE}"
        ));
    }
    if token
        .get(..vilvik_keys_domain::KEY_PREFIX.len())
        .is_some_and(|start| start.eq_ignore_ascii_case(vilvik_keys_domain::KEY_PREFIX))
    {
        return Some(format!(
            "the operator token must not start with `{}`: that is an API key, and an operator token must never be mistaken for one; {MAKE_ONE}",
            vilvik_keys_domain::KEY_PREFIX
        ));
    }
    None
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Pretty,
    Json,
}

/// The service's whole configuration, validated.
#[derive(Clone)]
pub struct Config {
    pub database_url: Option<SecretString>,
    pub sqlite_path: PathBuf,
    /// The current pepper's file; `None`: the default one (`crate::pepper`).
    pub pepper_file: Option<PathBuf>,
    /// Older peppers' files, whose keys still verify.
    pub pepper_files: Vec<PathBuf>,
    pub admin_addr: SocketAddr,
    pub verify_addr: SocketAddr,
    pub public_verify_addr: Option<String>,
    pub operator_token: Option<SecretString>,
    pub tier_limits: TierLimits,
    /// The scopes keys may be granted where an account has no catalogue of its own.
    pub allowed_scopes: ScopeCatalogue,
    pub usage_flush_interval: Duration,
    pub trusted_proxies: Vec<IpAddr>,
    pub log_format: LogFormat,
    pub shutdown_grace: Duration,
    pub request_timeout: Duration,
    /// How long cached keys stay trusted while the change feed is down.
    pub staleness_bound: Duration,
    pub negative_cache_ttl: Duration,
    pub consistency_check_interval: Duration,
    pub change_poll_interval: Duration,
    /// Wait before reconnecting to the change feed after it failed.
    pub change_feed_retry_interval: Duration,
    /// Postgres: how often the change log is polled through the pool while
    /// the listener is down.
    pub change_fallback_poll: Duration,
    /// The deadline of every store call: Postgres's statement timeout, and
    /// the most a change-feed read may take before it counts as failed.
    pub store_timeout: Duration,
    /// Postgres: how the change listener notices a silent connection.
    pub listener: vilvik_keys_store::ListenerOptions,
    /// Load every key into memory at start.
    pub preload: bool,
    /// Verify requests in progress at once, over all connections; more are
    /// refused at once with RESOURCE_EXHAUSTED rather than queued.
    pub verify_concurrency_limit: usize,
    /// The misses' own budget of store lookups, and their deadline.
    pub verify_misses: vilvik_keys_verify::MissConfig,
    /// How long change-log entries are kept; admin nodes delete older
    /// ones. A verify node cut off for longer clears its cache on return.
    pub change_log_retention: Duration,
    /// How long rotated-away secrets are kept; admin nodes delete older ones.
    pub rotated_secret_retention: Duration,
    /// How many rotated-away secrets of a key a rotation keeps.
    pub rotated_secrets_kept: u32,
    /// How many keys an account may store per active key of its tier.
    pub stored_keys_per_active_key: u32,
    /// What one client may hold open on either listener: connections,
    /// streams, and requests whose message does not arrive.
    pub listener_limits: ListenerLimits,
    /// TLS on the listeners; plaintext when no certificate is set.
    pub tls: TlsSettings,
    /// How fast each account may call the admin API, on this node.
    pub admin_rates: AdminRateLimits,
}

/// The TLS settings: one certificate for both listeners, and the CA whose
/// client certificates the admin listener then demands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    pub admin_client_ca_file: Option<PathBuf>,
    /// The CA printed in smoke-test commands (grpcurl's `-cacert`).
    pub public_ca_file: Option<PathBuf>,
    /// How often the files are checked for a change (SIGHUP: at once).
    pub reload_interval: Duration,
}

impl Default for TlsSettings {
    fn default() -> Self {
        Self {
            cert_file: None,
            key_file: None,
            admin_client_ca_file: None,
            public_ca_file: None,
            reload_interval: Duration::from_secs(5),
        }
    }
}

impl TlsSettings {
    /// What the `listener` ("admin" or "verify") serves TLS with; `None`:
    /// plaintext.
    pub fn files(&self, listener: &str) -> Option<TlsFiles> {
        Some(TlsFiles {
            cert: self.cert_file.clone()?,
            key: self.key_file.clone()?,
            client_ca: match listener {
                "admin" => self.admin_client_ca_file.clone(),
                _ => None,
            },
        })
    }

    pub fn enabled(&self) -> bool {
        self.cert_file.is_some()
    }

    /// Settings that make no sense together stop the start.
    fn check(&self) -> Result<(), ConfigError> {
        match (&self.cert_file, &self.key_file) {
            (Some(_), None) => {
                return Err(invalid(
                    "tls_key_file",
                    "is required with tls_cert_file: set VILVIK_KEYS_TLS_KEY_FILE to the certificate's private key (PEM)",
                ));
            }
            (None, Some(_)) => {
                return Err(invalid(
                    "tls_cert_file",
                    "is required with tls_key_file: set VILVIK_KEYS_TLS_CERT_FILE to the certificate (PEM)",
                ));
            }
            _ => {}
        }
        if !self.enabled() {
            for (setting, set) in [
                ("admin_client_ca_file", self.admin_client_ca_file.is_some()),
                ("public_ca_file", self.public_ca_file.is_some()),
            ] {
                if set {
                    return Err(invalid(
                        setting,
                        "needs TLS: set tls_cert_file and tls_key_file (VILVIK_KEYS_TLS_CERT_FILE, VILVIK_KEYS_TLS_KEY_FILE) too",
                    ));
                }
            }
        }
        Ok(())
    }
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field(
                "database_url",
                &self.database_url.as_ref().map(|_| "[REDACTED]"),
            )
            .field("sqlite_path", &self.sqlite_path)
            .field("pepper_file", &self.pepper_file)
            .field("pepper_files", &self.pepper_files)
            .field("admin_addr", &self.admin_addr)
            .field("verify_addr", &self.verify_addr)
            .field("public_verify_addr", &self.public_verify_addr)
            .field(
                "operator_token",
                &self.operator_token.as_ref().map(|_| "[REDACTED]"),
            )
            .field("tier_limits", &self.tier_limits)
            .field("allowed_scopes", &self.allowed_scopes)
            .field("usage_flush_interval", &self.usage_flush_interval)
            .field("trusted_proxies", &self.trusted_proxies)
            .field("log_format", &self.log_format)
            .field("shutdown_grace", &self.shutdown_grace)
            .field("request_timeout", &self.request_timeout)
            .field("staleness_bound", &self.staleness_bound)
            .field("negative_cache_ttl", &self.negative_cache_ttl)
            .field(
                "consistency_check_interval",
                &self.consistency_check_interval,
            )
            .field("change_poll_interval", &self.change_poll_interval)
            .field(
                "change_feed_retry_interval",
                &self.change_feed_retry_interval,
            )
            .field("change_fallback_poll", &self.change_fallback_poll)
            .field("store_timeout", &self.store_timeout)
            .field("listener", &self.listener)
            .field("preload", &self.preload)
            .field("verify_concurrency_limit", &self.verify_concurrency_limit)
            .field("verify_misses", &self.verify_misses)
            .field("change_log_retention", &self.change_log_retention)
            .field("rotated_secret_retention", &self.rotated_secret_retention)
            .field("rotated_secrets_kept", &self.rotated_secrets_kept)
            .field(
                "stored_keys_per_active_key",
                &self.stored_keys_per_active_key,
            )
            .field("listener_limits", &self.listener_limits)
            .field("tls", &self.tls)
            .field("admin_rates", &self.admin_rates)
            .finish()
    }
}

impl Default for Config {
    /// The declared defaults (a test checks that each [`SETTINGS`] default
    /// loads to the same configuration).
    fn default() -> Self {
        Self {
            database_url: None,
            sqlite_path: PathBuf::from("./vilvik-keys.db"),
            pepper_file: None,
            pepper_files: Vec::new(),
            admin_addr: SocketAddr::from(([127, 0, 0, 1], 50051)),
            verify_addr: SocketAddr::from(([127, 0, 0, 1], 50052)),
            public_verify_addr: None,
            operator_token: None,
            tier_limits: TierLimits::default(),
            allowed_scopes: ScopeCatalogue::default(),
            usage_flush_interval: Duration::from_secs(1),
            trusted_proxies: Vec::new(),
            log_format: LogFormat::Pretty,
            shutdown_grace: Duration::from_secs(10),
            request_timeout: Duration::from_secs(5),
            staleness_bound: Duration::from_secs(30),
            negative_cache_ttl: Duration::from_secs(2),
            consistency_check_interval: Duration::from_secs(1),
            change_poll_interval: Duration::from_millis(50),
            change_feed_retry_interval: Duration::from_millis(500),
            change_fallback_poll: Duration::from_millis(200),
            store_timeout: Duration::from_secs(5),
            listener: vilvik_keys_store::ListenerOptions::default(),
            preload: false,
            verify_concurrency_limit: 1024,
            verify_misses: vilvik_keys_verify::MissConfig::default(),
            change_log_retention: Duration::from_secs(7 * 24 * 3600),
            rotated_secret_retention: Duration::from_secs(7 * 24 * 3600),
            rotated_secrets_kept: 10,
            stored_keys_per_active_key: 100,
            listener_limits: ListenerLimits::default(),
            tls: TlsSettings::default(),
            admin_rates: AdminRateLimits::default(),
        }
    }
}

/// One setting or variable, as the documentation and the loader see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Setting {
    /// Its key in the TOML file; `None` for a variable only read from the
    /// environment (by the CLI or the tests, or before the file is read).
    pub file_key: Option<&'static str>,
    /// Its environment variable.
    pub env: &'static str,
    /// What applies when it is not set.
    pub default: SettingDefault,
    /// One line saying what it means (Markdown).
    pub doc: &'static str,
}

/// A setting's default.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SettingDefault {
    /// This value, as it would be written in the file or the environment.
    Value(&'static str),
    /// Unset, and what that means (Markdown).
    Unset(&'static str),
}

/// A value from the TOML file in the form the environment would give it,
/// so that both go through one parser.
trait FileValue {
    fn into_value(self) -> String;
}

impl FileValue for String {
    fn into_value(self) -> String {
        self
    }
}

impl FileValue for PathBuf {
    fn into_value(self) -> String {
        self.to_string_lossy().into_owned()
    }
}

impl FileValue for Vec<String> {
    fn into_value(self) -> String {
        self.join(",")
    }
}

macro_rules! file_value_by_display {
    ($($t:ty),*) => {
        $(impl FileValue for $t {
            fn into_value(self) -> String {
                self.to_string()
            }
        })*
    };
}
file_value_by_display!(u32, u64, bool);

/// How a setting's value (named `name` in messages: the variable, or the
/// file key when it came from the file) changes the configuration.
type Apply = fn(&mut Config, &str, String) -> Result<(), ConfigError>;

/// Declares the settings: `file_key: FileType = "VARIABLE", default, "doc", apply;`
/// for those of the service (in the order they are applied, which decides
/// which of several problems is reported), then `"VARIABLE", default, "doc";`
/// for variables read elsewhere. Generates the TOML file's shape
/// (`FileConfig`), [`SETTINGS`] and `apply_settings`.
macro_rules! settings {
    (
        service {
            $( $key:ident : $ty:ty = $env:literal, $default:expr, $doc:literal, $apply:expr; )*
        }
        elsewhere { $( $other_env:literal, $other_default:expr, $other_doc:literal; )* }
    ) => {
        /// The TOML file's shape; every key optional, unknown keys rejected.
        #[derive(Debug, Default, Deserialize)]
        #[serde(deny_unknown_fields)]
        struct FileConfig {
            $( $key: Option<$ty>, )*
        }

        /// Every setting of the service, then every other variable the
        /// program or its tests read: the README's settings table.
        pub const SETTINGS: &[Setting] = &[
            $(
                Setting {
                    file_key: Some(stringify!($key)),
                    env: $env,
                    default: $default,
                    doc: $doc,
                },
            )*
            $(
                Setting {
                    file_key: None,
                    env: $other_env,
                    default: $other_default,
                    doc: $other_doc,
                },
            )*
        ];

        /// Applies each setting given, the environment's value over the file's.
        fn apply_settings(
            config: &mut Config,
            file: FileConfig,
            env: &HashMap<String, String>,
        ) -> Result<(), ConfigError> {
            $(
                if let Some((name, value)) = pick(env, $env, stringify!($key), file.$key) {
                    let apply: Apply = $apply;
                    apply(config, &name, value)?;
                }
            )*
            Ok(())
        }
    };
}

use SettingDefault::{Unset, Value};

settings! {
    service {
        database_url: String = "DATABASE_URL", Unset("embedded SQLite"),
            "the PostgreSQL server to keep the keys in",
            |c, _, v| { c.database_url = Some(SecretString::from(v)); Ok(()) };
        sqlite_path: PathBuf = "VILVIK_KEYS_SQLITE_PATH", Value("./vilvik-keys.db"),
            "the embedded SQLite file, when `DATABASE_URL` is unset",
            |c, _, v| { c.sqlite_path = PathBuf::from(v); Ok(()) };
        pepper_file: PathBuf = "VILVIK_KEYS_PEPPER_FILE", Unset("`<sqlite_path>.pepper` beside the SQLite file, or `./vilvik-keys.pepper` on Postgres; generated (0600) when missing"),
            "the current pepper: a file of 64 hex characters (32 secret bytes, mode 0600) that key hashes are keyed with; every node must be given the same (see docs/SECURITY.md)",
            |c, _, v| { c.pepper_file = (!v.is_empty()).then(|| PathBuf::from(v)); Ok(()) };
        pepper_files: Vec<String> = "VILVIK_KEYS_PEPPER_FILES", Unset("none"),
            "older peppers' files, comma-separated: keys hashed with them still verify, and move to the current pepper when they do",
            |c, _, v| { c.pepper_files = split_paths(&v); Ok(()) };
        admin_addr: String = "VILVIK_KEYS_ADMIN_ADDR", Value("127.0.0.1:50051"),
            "the KeyAdmin listener",
            |c, name, v| { c.admin_addr = parse_addr(name, &v)?; Ok(()) };
        verify_addr: String = "VILVIK_KEYS_VERIFY_ADDR", Value("127.0.0.1:50052"),
            "the KeyVerify listener",
            |c, name, v| { c.verify_addr = parse_addr(name, &v)?; Ok(()) };
        public_verify_addr: String = "VILVIK_KEYS_PUBLIC_VERIFY_ADDR", Unset("the verify address"),
            "the verify address printed in smoke-test commands",
            |c, _, v| { c.public_verify_addr = Some(v); Ok(()) };
        operator_token: String = "VILVIK_KEYS_OPERATOR_TOKEN", Unset("no operator access"),
            "the operator token: at least 32 characters, 16 of them distinct, not starting with `vlk_`",
            |c, name, v| {
                if let Some(weakness) = operator_token_weakness(&v) {
                    return Err(invalid(name, weakness));
                }
                c.operator_token = Some(SecretString::from(v));
                Ok(())
            };
        free_tier_limit: u32 = "VILVIK_KEYS_FREE_TIER_LIMIT", Value("3"),
            "active keys an account on the free tier may hold",
            |c, name, v| { c.tier_limits.free = parse_number(name, &v)?; Ok(()) };
        premium_tier_limit: u32 = "VILVIK_KEYS_PREMIUM_TIER_LIMIT", Value("25"),
            "active keys an account on the premium tier may hold",
            |c, name, v| { c.tier_limits.premium = parse_number(name, &v)?; Ok(()) };
        allowed_scopes: Vec<String> = "VILVIK_KEYS_ALLOWED_SCOPES", Value("*:*"),
            "the scope patterns keys may be granted (`resource:action`, either part may be `*`; a list in the file, comma-separated in the environment); `keys:admin` is never among them, only the operator token grants it; `accounts set-scopes` sets an account's own",
            |c, name, v| { c.allowed_scopes = parse_catalogue(name, &v)?; Ok(()) };
        usage_flush_interval_ms: u64 = "VILVIK_KEYS_USAGE_FLUSH_INTERVAL_MS", Value("1000"),
            "how often uses noted by verifies are written to the store",
            |c, name, v| { c.usage_flush_interval = parse_millis(name, &v)?; Ok(()) };
        shutdown_grace_ms: u64 = "VILVIK_KEYS_SHUTDOWN_GRACE_MS", Value("10000"),
            "how long a stopping server lets requests in progress finish",
            |c, name, v| { c.shutdown_grace = parse_millis(name, &v)?; Ok(()) };
        request_timeout_ms: u64 = "VILVIK_KEYS_REQUEST_TIMEOUT_MS", Value("5000"),
            "the longest a request may take",
            |c, name, v| { c.request_timeout = parse_millis(name, &v)?; Ok(()) };
        staleness_bound_ms: u64 = "VILVIK_KEYS_STALENESS_BOUND_MS", Value("30000"),
            "how long cached keys stay trusted after the node's last confirmed read of the change log (`0`: never trust them)",
            |c, name, v| { c.staleness_bound = parse_millis(name, &v)?; Ok(()) };
        negative_cache_ttl_ms: u64 = "VILVIK_KEYS_NEGATIVE_CACHE_TTL_MS", Value("2000"),
            "how long an unknown prefix is remembered",
            |c, name, v| { c.negative_cache_ttl = parse_millis(name, &v)?; Ok(()) };
        consistency_check_ms: u64 = "VILVIK_KEYS_CONSISTENCY_CHECK_MS", Value("1000"),
            "how often a node checks it has missed no change",
            |c, name, v| { c.consistency_check_interval = parse_interval(name, "consistency_check_ms", &v)?; Ok(()) };
        change_poll_ms: u64 = "VILVIK_KEYS_CHANGE_POLL_MS", Value("50"),
            "how often SQLite is polled for changes",
            |c, name, v| { c.change_poll_interval = parse_interval(name, "change_poll_ms", &v)?; Ok(()) };
        change_feed_retry_ms: u64 = "VILVIK_KEYS_CHANGE_FEED_RETRY_MS", Value("500"),
            "how long a node waits before following the change feed again after it failed",
            |c, name, v| { c.change_feed_retry_interval = parse_interval(name, "change_feed_retry_ms", &v)?; Ok(()) };
        change_fallback_poll_ms: u64 = "VILVIK_KEYS_CHANGE_FALLBACK_POLL_MS", Value("200"),
            "Postgres: how often the change log is polled through the pool while the change listener is down",
            |c, name, v| { c.change_fallback_poll = parse_interval(name, "change_fallback_poll_ms", &v)?; Ok(()) };
        store_timeout_ms: u64 = "VILVIK_KEYS_STORE_TIMEOUT_MS", Value("5000"),
            "the deadline of a store call: Postgres's statement timeout, and the longest a change-feed read may take",
            |c, name, v| { c.store_timeout = parse_interval(name, "store_timeout_ms", &v)?; Ok(()) };
        listener_heartbeat_ms: u64 = "VILVIK_KEYS_LISTENER_HEARTBEAT_MS", Value("5000"),
            "Postgres: after this long without a message the change listener checks its connection",
            |c, name, v| { c.listener.heartbeat = parse_interval(name, "listener_heartbeat_ms", &v)?; Ok(()) };
        listener_heartbeat_timeout_ms: u64 = "VILVIK_KEYS_LISTENER_HEARTBEAT_TIMEOUT_MS", Value("5000"),
            "Postgres: how long that check may take before the listener reconnects",
            |c, name, v| { c.listener.heartbeat_timeout = parse_interval(name, "listener_heartbeat_timeout_ms", &v)?; Ok(()) };
        preload: bool = "VILVIK_KEYS_PRELOAD", Value("false"),
            "load every key into memory at start (or `serve --preload`)",
            |c, name, v| {
                c.preload = match v.as_str() {
                    "true" | "1" => true,
                    "false" | "0" => false,
                    other => return Err(invalid(name, format!("'{other}' is not true or false"))),
                };
                Ok(())
            };
        verify_concurrency_limit: u32 = "VILVIK_KEYS_VERIFY_CONCURRENCY_LIMIT", Value("1024"),
            "verifies in progress at once; more get RESOURCE_EXHAUSTED at once",
            |c, name, v| { c.verify_concurrency_limit = parse_count(name, &v)?; Ok(()) };
        verify_miss_concurrency: u32 = "VILVIK_KEYS_VERIFY_MISS_CONCURRENCY", Value("64"),
            "store lookups for keys not in memory at once; more get UNAVAILABLE at once, and hits never wait for them",
            |c, name, v| { c.verify_misses.concurrency = parse_count(name, &v)?; Ok(()) };
        verify_miss_timeout_ms: u64 = "VILVIK_KEYS_VERIFY_MISS_TIMEOUT_MS", Value("1000"),
            "how long a store lookup for a key not in memory may take before it answers UNAVAILABLE",
            |c, name, v| { c.verify_misses.timeout = parse_interval(name, "verify_miss_timeout_ms", &v)?; Ok(()) };
        change_log_retention_hours: u32 = "VILVIK_KEYS_CHANGE_LOG_RETENTION_HOURS", Value("168"),
            "admin nodes prune older change-log entries hourly; a verify node cut off for longer clears its cache when it is back",
            |c, name, v| {
                let hours: u32 = parse_number(name, &v)?;
                if hours == 0 {
                    return Err(invalid(name, "must be at least 1 hour"));
                }
                c.change_log_retention = Duration::from_secs(u64::from(hours) * 3600);
                Ok(())
            };
        rotated_secret_retention_hours: u32 = "VILVIK_KEYS_ROTATED_SECRET_RETENTION_HOURS", Value("168"),
            "admin nodes delete rotated-away secrets older than this hourly (until then they verify as `ROTATED`, after as unknown); the audit log keeps every event",
            |c, name, v| {
                let hours: u32 = parse_number(name, &v)?;
                c.rotated_secret_retention = Duration::from_secs(u64::from(hours) * 3600);
                Ok(())
            };
        rotated_secrets_kept: u32 = "VILVIK_KEYS_ROTATED_SECRETS_KEPT", Value("10"),
            "rotated-away secrets of one key kept at most; each rotation deletes older ones",
            |c, name, v| { c.rotated_secrets_kept = parse_number(name, &v)?; Ok(()) };
        stored_keys_per_active_key: u32 = "VILVIK_KEYS_STORED_KEYS_PER_ACTIVE_KEY", Value("100"),
            "keys an account may store in all (revoked and expired ones are its history and count) per active key its tier allows; at the ceiling CreateKey answers RESOURCE_EXHAUSTED",
            |c, name, v| {
                let per_key: u32 = parse_number(name, &v)?;
                if per_key == 0 {
                    return Err(invalid(name, "must be at least 1: an account must be able to store its active keys"));
                }
                c.stored_keys_per_active_key = per_key;
                Ok(())
            };
        trusted_proxies: Vec<String> = "VILVIK_KEYS_TRUSTED_PROXIES",
            Unset("`x-forwarded-for` ignored"),
            "proxies whose `x-forwarded-for` is believed (a list in the file, comma-separated in the environment)",
            |c, name, v| {
                c.trusted_proxies = list_items(&v)
                    .map(|s| {
                        s.parse::<IpAddr>()
                            .map(|ip| ip.to_canonical())
                            .map_err(|_| invalid(name, format!("'{s}' is not an IP address")))
                    })
                    .collect::<Result<_, _>>()?;
                Ok(())
            };
        log_format: String = "VILVIK_KEYS_LOG_FORMAT", Value("pretty"),
            "`pretty` or `json`",
            |c, name, v| {
                c.log_format = match v.as_str() {
                    "pretty" => LogFormat::Pretty,
                    "json" => LogFormat::Json,
                    other => {
                        return Err(invalid(
                            name,
                            format!("'{other}' is not a log format: use 'pretty' or 'json'"),
                        ));
                    }
                };
                Ok(())
            };
        // What one client may hold open (issue 8, "Connections"); see
        // ListenerLimits and docs/ARCHITECTURE.md "Connection limits".
        max_connections: u32 = "VILVIK_KEYS_MAX_CONNECTIONS", Value("10000"),
            "open connections per listener; at the cap a new one closes the oldest that has sent no request (else the longest idle), or is refused",
            |c, name, v| { c.listener_limits.max_connections = parse_count(name, &v)?; Ok(()) };
        first_request_timeout_ms: u64 = "VILVIK_KEYS_FIRST_REQUEST_TIMEOUT_MS", Value("10000"),
            "a connection that has sent no request this long after it was accepted is closed",
            |c, name, v| { c.listener_limits.first_request_timeout = parse_interval(name, "first_request_timeout_ms", &v)?; Ok(()) };
        idle_timeout_ms: u64 = "VILVIK_KEYS_IDLE_TIMEOUT_MS", Value("300000"),
            "a connection with no request in progress for this long is closed",
            |c, name, v| { c.listener_limits.idle_timeout = parse_interval(name, "idle_timeout_ms", &v)?; Ok(()) };
        http2_max_concurrent_streams: u32 = "VILVIK_KEYS_HTTP2_MAX_CONCURRENT_STREAMS", Value("200"),
            "requests open at once on one HTTP/2 connection (`SETTINGS_MAX_CONCURRENT_STREAMS`)",
            |c, name, v| { c.listener_limits.http2_max_concurrent_streams = parse_count(name, &v)? as u32; Ok(()) };
        http2_keepalive_interval_ms: u64 = "VILVIK_KEYS_HTTP2_KEEPALIVE_INTERVAL_MS", Value("30000"),
            "after this long without hearing from a client the server sends an HTTP/2 PING",
            |c, name, v| { c.listener_limits.http2_keepalive_interval = parse_interval(name, "http2_keepalive_interval_ms", &v)?; Ok(()) };
        http2_keepalive_timeout_ms: u64 = "VILVIK_KEYS_HTTP2_KEEPALIVE_TIMEOUT_MS", Value("10000"),
            "a connection whose client does not answer that PING within this long is closed",
            |c, name, v| { c.listener_limits.http2_keepalive_timeout = parse_interval(name, "http2_keepalive_timeout_ms", &v)?; Ok(()) };
        verify_concurrency_per_connection: u32 = "VILVIK_KEYS_VERIFY_CONCURRENCY_PER_CONNECTION", Value("128"),
            "verifies in progress at once on one connection, its share of `verify_concurrency_limit`; more get RESOURCE_EXHAUSTED at once",
            |c, name, v| { c.listener_limits.verify_concurrency_per_connection = parse_count(name, &v)?; Ok(()) };
        admin_concurrency_limit: u32 = "VILVIK_KEYS_ADMIN_CONCURRENCY_LIMIT", Value("256"),
            "admin requests in progress at once, over all connections; more get RESOURCE_EXHAUSTED at once",
            |c, name, v| { c.listener_limits.admin_concurrency_limit = parse_count(name, &v)?; Ok(()) };
        admin_concurrency_per_connection: u32 = "VILVIK_KEYS_ADMIN_CONCURRENCY_PER_CONNECTION", Value("64"),
            "admin requests in progress at once on one connection, its share of `admin_concurrency_limit`",
            |c, name, v| { c.listener_limits.admin_concurrency_per_connection = parse_count(name, &v)?; Ok(()) };
        // Admin rate limits (issue 10); see src/server/rate_limit.rs and
        // docs/ARCHITECTURE.md "Admin rate limits".
        admin_rate_per_second: u32 = "VILVIK_KEYS_ADMIN_RATE_PER_SECOND", Value("100"),
            "admin calls one account may make a second on this node, on average (GCRA); more get RESOURCE_EXHAUSTED with `retry-after` (several admin nodes: each allows this much)",
            |c, name, v| { c.admin_rates.per_second = parse_rate(name, &v)?; Ok(()) };
        admin_rate_burst: u32 = "VILVIK_KEYS_ADMIN_RATE_BURST", Value("200"),
            "admin calls one account may make at once on this node after a quiet spell",
            |c, name, v| { c.admin_rates.burst = parse_burst(name, &v)?; Ok(()) };
        free_admin_rate_per_second: u32 = "VILVIK_KEYS_FREE_ADMIN_RATE_PER_SECOND", Unset("`admin_rate_per_second`"),
            "`admin_rate_per_second` for accounts on the free tier",
            |c, name, v| { c.admin_rates.free.per_second = Some(parse_rate(name, &v)?); Ok(()) };
        free_admin_rate_burst: u32 = "VILVIK_KEYS_FREE_ADMIN_RATE_BURST", Unset("`admin_rate_burst`"),
            "`admin_rate_burst` for accounts on the free tier",
            |c, name, v| { c.admin_rates.free.burst = Some(parse_burst(name, &v)?); Ok(()) };
        premium_admin_rate_per_second: u32 = "VILVIK_KEYS_PREMIUM_ADMIN_RATE_PER_SECOND", Unset("`admin_rate_per_second`"),
            "`admin_rate_per_second` for accounts on the premium tier",
            |c, name, v| { c.admin_rates.premium.per_second = Some(parse_rate(name, &v)?); Ok(()) };
        premium_admin_rate_burst: u32 = "VILVIK_KEYS_PREMIUM_ADMIN_RATE_BURST", Unset("`admin_rate_burst`"),
            "`admin_rate_burst` for accounts on the premium tier",
            |c, name, v| { c.admin_rates.premium.burst = Some(parse_burst(name, &v)?); Ok(()) };
        // TLS (issue 9); see src/server/tls.rs and docs/SECURITY.md.
        tls_cert_file: PathBuf = "VILVIK_KEYS_TLS_CERT_FILE", Unset("plaintext"),
            "the certificate chain (PEM) both listeners serve TLS with; needs `tls_key_file`",
            |c, _, v| { c.tls.cert_file = Some(PathBuf::from(v)); Ok(()) };
        tls_key_file: PathBuf = "VILVIK_KEYS_TLS_KEY_FILE", Unset("plaintext"),
            "the private key (PEM) of `tls_cert_file`",
            |c, _, v| { c.tls.key_file = Some(PathBuf::from(v)); Ok(()) };
        admin_client_ca_file: PathBuf = "VILVIK_KEYS_ADMIN_CLIENT_CA_FILE", Unset("no client certificate needed"),
            "the admin listener demands a client certificate signed by this CA (PEM): mutual TLS",
            |c, _, v| { c.tls.admin_client_ca_file = Some(PathBuf::from(v)); Ok(()) };
        public_ca_file: PathBuf = "VILVIK_KEYS_PUBLIC_CA_FILE", Unset("the system's CAs"),
            "the CA file smoke-test commands pass to grpcurl as `-cacert`",
            |c, _, v| { c.tls.public_ca_file = Some(PathBuf::from(v)); Ok(()) };
        tls_reload_interval_ms: u64 = "VILVIK_KEYS_TLS_RELOAD_INTERVAL_MS", Value("5000"),
            "how often the TLS files are checked for a change (SIGHUP reloads them at once)",
            |c, name, v| { c.tls.reload_interval = parse_interval(name, "tls_reload_interval_ms", &v)?; Ok(()) };
    }
    elsewhere {
        "VILVIK_KEYS_CONFIG", Unset("no file"),
            "the `--config` file";
        "RUST_LOG", Value("info"), "the log filter";
        "VILVIK_KEYS_TOKEN", Unset("no credential"),
            "the CLI's credential: a management key or the operator token";
        "VILVIK_KEYS_ADDR", Value("http://127.0.0.1:50051"),
            "the admin API the CLI talks to (`https://…` for TLS)";
        "VILVIK_KEYS_CA_FILE", Unset("the system's CAs"),
            "the CA (PEM) the CLI checks the admin API's certificate against";
        "VILVIK_KEYS_CLIENT_CERT_FILE", Unset("no client certificate"),
            "the CLI's client certificate (PEM), for an admin API with mutual TLS";
        "VILVIK_KEYS_CLIENT_KEY_FILE", Unset("no client certificate"),
            "the private key (PEM) of `VILVIK_KEYS_CLIENT_CERT_FILE`";
        "VILVIK_KEYS_ACCOUNT", Unset("the credential's account"),
            "the account the CLI acts for with the operator token";
        "VILVIK_KEYS_ACTOR", Unset("no actor"),
            "the person acting, with the operator token";
        "VILVIK_KEYS_TEST_DATABASE_URL", Unset("Postgres tests skipped"),
            "a Postgres server whose user the tests may create databases with";
        "VILVIK_KEYS_REQUIRE_POSTGRES", Unset("skipping allowed"),
            "`1`: Postgres tests fail instead of skipping without a test database";
    }
}

/// A configuration problem, naming the setting and what is wrong with it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is invalid: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{setting}: {message}")]
    Invalid { setting: String, message: String },
}

/// A comma-separated catalogue of scope patterns.
fn parse_catalogue(name: &str, value: &str) -> Result<ScopeCatalogue, ConfigError> {
    let patterns: Vec<&str> = list_items(value).collect();
    ScopeCatalogue::parse(&patterns).map_err(|(_, e)| invalid(name, e.to_string()))
}

fn invalid(setting: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        setting: setting.to_owned(),
        message: message.into(),
    }
}

/// The value to apply for one setting and the name to report it under:
/// the environment's (a non-empty variable) over the file's.
fn pick<T: FileValue>(
    env: &HashMap<String, String>,
    env_name: &str,
    file_key: &str,
    from_file: Option<T>,
) -> Option<(String, String)> {
    match env.get(env_name).filter(|v| !v.is_empty()) {
        Some(v) => Some((env_name.to_owned(), v.clone())),
        None => from_file.map(|v| (file_key.to_owned(), v.into_value())),
    }
}

impl Config {
    /// Reads `file` (when given), then the process environment.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        let env: HashMap<String, String> = std::env::vars().collect();
        Self::from_sources(file, &env)
    }

    /// Like [`Config::load`] with an explicit environment; for tests.
    pub fn from_sources(
        file: Option<&Path>,
        env: &HashMap<String, String>,
    ) -> Result<Self, ConfigError> {
        reject_unknown_variables(env)?;
        let file = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_owned(),
                    source,
                })?;
                parse_file(path, &text)?
            }
            None => FileConfig::default(),
        };
        Self::from_parts(file, env)
    }

    /// Like [`Config::from_sources`] with the file's text already read;
    /// `path` only names it in messages. For the fuzz targets in `fuzz/`.
    pub fn from_file_text(
        path: &Path,
        text: &str,
        env: &HashMap<String, String>,
    ) -> Result<Self, ConfigError> {
        reject_unknown_variables(env)?;
        Self::from_parts(parse_file(path, text)?, env)
    }

    fn from_parts(file: FileConfig, env: &HashMap<String, String>) -> Result<Self, ConfigError> {
        let mut config = Config::default();
        apply_settings(&mut config, file, env)?;
        if config.tier_limits.premium < config.tier_limits.free {
            return Err(invalid(
                "premium_tier_limit",
                format!(
                    "premium ({}) must allow at least as many keys as free ({})",
                    config.tier_limits.premium, config.tier_limits.free
                ),
            ));
        }
        config
            .listener_limits
            .check(config.verify_concurrency_limit)?;
        config.tls.check()?;
        Ok(config)
    }

    pub fn database_url(&self) -> Option<&str> {
        self.database_url.as_ref().map(|url| url.expose_secret())
    }

    /// What the store enforces in every change: the tier caps, the
    /// server's catalogue of grantable scopes, and the bounds on history.
    pub fn policy(&self) -> Policy {
        Policy {
            tiers: self.tier_limits,
            grantable: self.allowed_scopes.clone(),
            stored_keys_per_active_key: self.stored_keys_per_active_key,
            rotated_secrets_kept: self.rotated_secrets_kept,
        }
    }

    /// The verify address printed in smoke-test commands.
    pub fn public_verify_addr(&self, bound_verify_addr: SocketAddr) -> String {
        self.public_verify_addr
            .clone()
            .unwrap_or_else(|| bound_verify_addr.to_string())
    }
}

fn parse_file(path: &Path, text: &str) -> Result<FileConfig, ConfigError> {
    toml::from_str(text).map_err(|e: toml::de::Error| ConfigError::Parse {
        path: path.to_owned(),
        message: e.message().to_owned(),
    })
}

/// A misspelt variable would otherwise be ignored silently: every
/// `VILVIK_KEYS_*` variable must be one of [`SETTINGS`].
fn reject_unknown_variables(env: &HashMap<String, String>) -> Result<(), ConfigError> {
    let mut unknown: Vec<&str> = env
        .keys()
        .map(String::as_str)
        .filter(|name| name.starts_with("VILVIK_KEYS_") && !SETTINGS.iter().any(|s| s.env == *name))
        .collect();
    unknown.sort_unstable();
    match unknown.first() {
        None => Ok(()),
        Some(name) => Err(invalid(
            name,
            format!(
                "unknown setting; the known ones are listed in the README (is it misspelt?){}",
                if unknown.len() > 1 {
                    format!(" (also unknown: {})", unknown[1..].join(", "))
                } else {
                    String::new()
                }
            ),
        )),
    }
}

/// The README's settings table, rendered from [`SETTINGS`].
pub fn settings_table() -> String {
    let mut table =
        String::from("| file key | environment | default | what it sets |\n|---|---|---|---|\n");
    for setting in SETTINGS {
        let file_key = setting
            .file_key
            .map(|key| format!("`{key}`"))
            .unwrap_or_default();
        let default = match setting.default {
            SettingDefault::Value(value) => format!("`{value}`"),
            SettingDefault::Unset(meaning) => format!("unset: {meaning}"),
        };
        table.push_str(&format!(
            "| {file_key} | `{}` | {default} | {} |\n",
            setting.env, setting.doc
        ));
    }
    table
}

/// A comma-separated list of paths; blanks around each and empty entries
/// are dropped.
fn split_paths(value: &str) -> Vec<PathBuf> {
    list_items(value).map(PathBuf::from).collect()
}

/// The items of a list setting: comma-separated (a file's list arrives
/// joined the same way), trimmed, empty ones dropped.
fn list_items(value: &str) -> impl Iterator<Item = &str> {
    value.split(',').map(str::trim).filter(|s| !s.is_empty())
}

/// An interval in whole milliseconds, at least one; a zero is reported
/// under the file key `setting`.
fn parse_interval(name: &str, setting: &str, value: &str) -> Result<Duration, ConfigError> {
    let interval = parse_millis(name, value)?;
    if interval.is_zero() {
        return Err(invalid(setting, "must be at least 1 millisecond"));
    }
    Ok(interval)
}

/// A count of at least one.
fn parse_count(name: &str, value: &str) -> Result<usize, ConfigError> {
    match parse_number(name, value)? {
        0 => Err(invalid(name, "must be at least 1")),
        n => Ok(n as usize),
    }
}

fn parse_addr(name: &str, value: &str) -> Result<SocketAddr, ConfigError> {
    value.parse().map_err(|_| {
        invalid(
            name,
            format!("'{value}' is not a socket address such as 127.0.0.1:50051"),
        )
    })
}

fn parse_number(name: &str, value: &str) -> Result<u32, ConfigError> {
    value
        .parse()
        .map_err(|_| invalid(name, format!("'{value}' is not a whole number")))
}

fn parse_millis(name: &str, value: &str) -> Result<Duration, ConfigError> {
    value.parse().map(Duration::from_millis).map_err(|_| {
        invalid(
            name,
            format!("'{value}' is not a whole number of milliseconds"),
        )
    })
}

/// The most calls a second an admin rate may allow: GCRA spaces calls at
/// least a nanosecond apart, and a microsecond keeps its arithmetic exact.
const MAX_ADMIN_RATE: u32 = 1_000_000;

/// An admin rate in calls a second, at least 1: a rate of 0 would refuse
/// every admin call, which no operator means (to lift the limit in effect,
/// set a high rate).
fn parse_rate(name: &str, value: &str) -> Result<NonZeroU32, ConfigError> {
    let rate = parse_number(name, value)?;
    if rate > MAX_ADMIN_RATE {
        return Err(invalid(
            name,
            format!("must be at most {MAX_ADMIN_RATE} calls a second"),
        ));
    }
    NonZeroU32::new(rate).ok_or_else(|| {
        invalid(
            name,
            format!("must be at least 1 call a second: 0 would refuse every admin call (to lift the limit in effect, set it as high as {MAX_ADMIN_RATE})"),
        )
    })
}

/// An admin burst, at least 1: a burst of 0 would refuse every call.
fn parse_burst(name: &str, value: &str) -> Result<NonZeroU32, ConfigError> {
    NonZeroU32::new(parse_number(name, value)?).ok_or_else(|| {
        invalid(
            name,
            "must be at least 1 call: a burst of 0 would refuse every admin call",
        )
    })
}

/// How fast one account may call the admin API, by GCRA: `per_second`
/// calls a second on average, and up to `burst` at once after a quiet spell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdminRate {
    pub per_second: NonZeroU32,
    pub burst: NonZeroU32,
}

/// The admin rate of each tier: the global one, unless the tier's own
/// settings override it. Each field is a setting (`settings!` above);
/// `server::rate_limit` applies them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdminRateLimits {
    pub per_second: NonZeroU32,
    pub burst: NonZeroU32,
    pub free: AdminRateOverride,
    pub premium: AdminRateOverride,
}

/// A tier's own admin rate; `None`: the global value.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AdminRateOverride {
    pub per_second: Option<NonZeroU32>,
    pub burst: Option<NonZeroU32>,
}

impl Default for AdminRateLimits {
    fn default() -> Self {
        Self {
            per_second: NonZeroU32::new(100).expect("not zero"),
            burst: NonZeroU32::new(200).expect("not zero"),
            free: AdminRateOverride::default(),
            premium: AdminRateOverride::default(),
        }
    }
}

impl AdminRateLimits {
    /// The same rate for every account, whatever its tier.
    pub fn uniform(per_second: u32, burst: u32) -> Self {
        Self {
            per_second: NonZeroU32::new(per_second).expect("a rate of at least 1"),
            burst: NonZeroU32::new(burst).expect("a burst of at least 1"),
            ..Self::default()
        }
    }

    pub fn for_tier(&self, tier: Tier) -> AdminRate {
        let tier = match tier {
            Tier::Free => self.free,
            Tier::Premium => self.premium,
        };
        AdminRate {
            per_second: tier.per_second.unwrap_or(self.per_second),
            burst: tier.burst.unwrap_or(self.burst),
        }
    }
}

/// What one client may hold open on a listener. Each field is a setting
/// (`settings!` above); `server::connections` and `startup` apply them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenerLimits {
    /// Open connections per listener.
    pub max_connections: usize,
    /// A connection that has sent no request for this long is closed.
    pub first_request_timeout: Duration,
    /// A connection with no request in progress for this long is closed.
    pub idle_timeout: Duration,
    /// `SETTINGS_MAX_CONCURRENT_STREAMS` on every HTTP/2 connection.
    pub http2_max_concurrent_streams: u32,
    pub http2_keepalive_interval: Duration,
    pub http2_keepalive_timeout: Duration,
    /// One connection's share of `verify_concurrency_limit`.
    pub verify_concurrency_per_connection: usize,
    pub admin_concurrency_limit: usize,
    /// One connection's share of `admin_concurrency_limit`.
    pub admin_concurrency_per_connection: usize,
}

impl Default for ListenerLimits {
    fn default() -> Self {
        Self {
            max_connections: 10_000,
            first_request_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
            http2_max_concurrent_streams: 200,
            http2_keepalive_interval: Duration::from_secs(30),
            http2_keepalive_timeout: Duration::from_secs(10),
            verify_concurrency_per_connection: 128,
            admin_concurrency_limit: 256,
            admin_concurrency_per_connection: 64,
        }
    }
}

impl ListenerLimits {
    /// A connection's share is at most the listener's whole limit.
    fn check(&self, verify_concurrency_limit: usize) -> Result<(), ConfigError> {
        if self.verify_concurrency_per_connection > verify_concurrency_limit {
            return Err(invalid(
                "verify_concurrency_per_connection",
                format!(
                    "one connection's share ({}) cannot exceed verify_concurrency_limit ({verify_concurrency_limit}); lower it, or raise the limit",
                    self.verify_concurrency_per_connection
                ),
            ));
        }
        if self.admin_concurrency_per_connection > self.admin_concurrency_limit {
            return Err(invalid(
                "admin_concurrency_per_connection",
                format!(
                    "one connection's share ({}) cannot exceed admin_concurrency_limit ({}); lower it, or raise the limit",
                    self.admin_concurrency_per_connection, self.admin_concurrency_limit
                ),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn file(text: &str) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), text).unwrap();
        f
    }

    #[test]
    fn defaults_match_the_design() {
        let c = Config::from_sources(None, &env(&[])).unwrap();
        assert_eq!(c.admin_addr.to_string(), "127.0.0.1:50051");
        assert_eq!(c.verify_addr.to_string(), "127.0.0.1:50052");
        assert_eq!(c.sqlite_path, PathBuf::from("./vilvik-keys.db"));
        assert!(c.database_url.is_none());
        assert_eq!(
            c.tier_limits,
            TierLimits {
                free: 3,
                premium: 25
            }
        );
    }

    #[test]
    fn environment_wins_over_the_file() {
        let f = file("admin_addr = \"127.0.0.1:6000\"\nfree_tier_limit = 5\n");
        let c = Config::from_sources(
            Some(f.path()),
            &env(&[("VILVIK_KEYS_ADMIN_ADDR", "127.0.0.1:7000")]),
        )
        .unwrap();
        assert_eq!(c.admin_addr.to_string(), "127.0.0.1:7000");
        assert_eq!(c.tier_limits.free, 5);
    }

    #[test]
    fn unknown_file_keys_are_named() {
        let f = file("admin_adr = \"127.0.0.1:6000\"\n");
        let err = Config::from_sources(Some(f.path()), &env(&[]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("admin_adr"), "{err}");
    }

    #[test]
    fn issue_10_settings_parse_and_refuse_bad_values() {
        let c = Config::from_sources(
            None,
            &env(&[
                ("VILVIK_KEYS_ALLOWED_SCOPES", "datasets:*, reports:read"),
                ("VILVIK_KEYS_ROTATED_SECRET_RETENTION_HOURS", "24"),
                ("VILVIK_KEYS_ROTATED_SECRETS_KEPT", "3"),
                ("VILVIK_KEYS_STORED_KEYS_PER_ACTIVE_KEY", "20"),
            ]),
        )
        .unwrap();
        let policy = c.policy();
        assert_eq!(
            policy.grantable.to_strings(),
            ["datasets:*", "reports:read"]
        );
        assert_eq!(policy.rotated_secrets_kept, 3);
        assert_eq!(policy.stored_keys_per_active_key, 20);
        assert_eq!(c.rotated_secret_retention, Duration::from_secs(24 * 3600));
        let defaults = Config::from_sources(None, &env(&[])).unwrap().policy();
        assert_eq!(defaults, Policy::default());
        let f = file("allowed_scopes = [\"datasets:read\"]\n");
        let c = Config::from_sources(Some(f.path()), &env(&[])).unwrap();
        assert_eq!(c.allowed_scopes.to_strings(), ["datasets:read"]);
        for (name, value, reason) in [
            (
                "VILVIK_KEYS_ALLOWED_SCOPES",
                "datasets:re*d",
                "not a scope pattern",
            ),
            (
                "VILVIK_KEYS_ALLOWED_SCOPES",
                "keys:admin",
                "only the operator token",
            ),
            ("VILVIK_KEYS_STORED_KEYS_PER_ACTIVE_KEY", "0", "at least 1"),
            (
                "VILVIK_KEYS_ROTATED_SECRETS_KEPT",
                "-1",
                "not a whole number",
            ),
        ] {
            let err = Config::from_sources(None, &env(&[(name, value)]))
                .unwrap_err()
                .to_string();
            assert!(err.starts_with(name), "{err}");
            assert!(err.contains(reason), "{value}: {err}");
        }
    }

    #[test]
    fn invalid_values_name_the_setting() {
        let err = Config::from_sources(None, &env(&[("VILVIK_KEYS_VERIFY_ADDR", "localhost")]))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("VILVIK_KEYS_VERIFY_ADDR"), "{err}");
        let err = Config::from_sources(None, &env(&[("VILVIK_KEYS_OPERATOR_TOKEN", "short")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("at least 32"), "{err}");
        assert!(
            !err.contains("short"),
            "the token must not be echoed: {err}"
        );
        let weak = [
            ("a".repeat(32), "only 1 distinct"),
            ("abcdefgh".repeat(4), "only 8 distinct"),
            ("0123456789abcde".repeat(3), "only 15 distinct"),
            (
                format!("vlk_{}", "Zq81Lw0Xc4Hs9Tb2Vn7Pm3Ry".repeat(2)),
                "must not start with `vlk_`",
            ),
            (
                format!("VLK_{}", "Zq81Lw0Xc4Hs9Tb2Vn7Pm3Ry".repeat(2)),
                "must not start with `vlk_`",
            ),
            // 32 bytes but 16 characters.
            ("éèêëēėęàâäáãåāçñ".to_owned(), "at least 32 characters"),
        ];
        for (token, reason) in weak {
            let err = Config::from_sources(
                None,
                &env(&[("VILVIK_KEYS_OPERATOR_TOKEN", token.as_str())]),
            )
            .unwrap_err()
            .to_string();
            assert!(err.starts_with("VILVIK_KEYS_OPERATOR_TOKEN"), "{err}");
            assert!(err.contains(reason), "{token}: {err}");
            let middle: String = token.chars().skip(4).take(8).collect();
            assert!(!err.contains(&middle), "the token is echoed: {err}");
        }
        // 16 distinct characters are enough.
        let token = "0123456789abcdef".repeat(2);
        let c = Config::from_sources(
            None,
            &env(&[("VILVIK_KEYS_OPERATOR_TOKEN", token.as_str())]),
        )
        .unwrap();
        assert_eq!(c.operator_token.unwrap().expose_secret(), token);
        let f = file("log_format = \"xml\"\n");
        let err = Config::from_sources(Some(f.path()), &env(&[]))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("log_format"), "{err}");
    }

    #[test]
    fn pepper_files_are_a_path_and_a_comma_separated_list() {
        let c = Config::from_sources(None, &env(&[])).unwrap();
        assert_eq!((c.pepper_file, c.pepper_files), (None, vec![]));
        let c = Config::from_sources(
            None,
            &env(&[
                ("VILVIK_KEYS_PEPPER_FILE", "/run/secrets/pepper"),
                (
                    "VILVIK_KEYS_PEPPER_FILES",
                    " /old/a.pepper, ,/old/b.pepper ",
                ),
            ]),
        )
        .unwrap();
        assert_eq!(c.pepper_file, Some(PathBuf::from("/run/secrets/pepper")));
        assert_eq!(
            c.pepper_files,
            [
                PathBuf::from("/old/a.pepper"),
                PathBuf::from("/old/b.pepper")
            ]
        );
        let f = file("pepper_file = \"b.pepper\"\npepper_files = [\"a.pepper\"]\n");
        let c = Config::from_sources(Some(f.path()), &env(&[])).unwrap();
        assert_eq!(c.pepper_file, Some(PathBuf::from("b.pepper")));
        assert_eq!(c.pepper_files, [PathBuf::from("a.pepper")]);
    }

    #[test]
    fn change_log_retention_is_in_hours_and_at_least_one() {
        let c = Config::from_sources(None, &env(&[])).unwrap();
        assert_eq!(c.change_log_retention, Duration::from_secs(7 * 24 * 3600));
        let f = file("change_log_retention_hours = 24\n");
        let c = Config::from_sources(Some(f.path()), &env(&[])).unwrap();
        assert_eq!(c.change_log_retention, Duration::from_secs(24 * 3600));
        let err = Config::from_sources(
            None,
            &env(&[("VILVIK_KEYS_CHANGE_LOG_RETENTION_HOURS", "0")]),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.starts_with("VILVIK_KEYS_CHANGE_LOG_RETENTION_HOURS"),
            "{err}"
        );
        assert!(err.contains("at least 1 hour"), "{err}");
    }

    #[test]
    fn misspelt_variables_stop_the_start() {
        let err = Config::from_sources(None, &env(&[("VILVIK_KEYS_ADMINADDR", "127.0.0.1:1")]))
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("VILVIK_KEYS_ADMINADDR: unknown setting"),
            "{err}"
        );
        assert!(Config::from_sources(None, &env(&[("VILVIK_KEYS_TOKEN", "x")])).is_ok());
    }

    #[test]
    fn the_feed_retry_interval_is_a_setting_of_at_least_one_millisecond() {
        let c = Config::from_sources(None, &env(&[])).unwrap();
        assert_eq!(c.change_feed_retry_interval, Duration::from_millis(500));
        let f = file("change_feed_retry_ms = 20\n");
        let c = Config::from_sources(Some(f.path()), &env(&[])).unwrap();
        assert_eq!(c.change_feed_retry_interval, Duration::from_millis(20));
        let err = Config::from_sources(None, &env(&[("VILVIK_KEYS_CHANGE_FEED_RETRY_MS", "0")]))
            .unwrap_err()
            .to_string();
        assert_eq!(err, "change_feed_retry_ms: must be at least 1 millisecond");
    }

    #[test]
    fn each_declared_default_loads_to_the_default_configuration() {
        let defaults = format!("{:?}", Config::default());
        for setting in SETTINGS.iter().filter(|s| s.file_key.is_some()) {
            if let SettingDefault::Value(value) = setting.default {
                let c = Config::from_sources(None, &env(&[(setting.env, value)]))
                    .unwrap_or_else(|e| panic!("{}'s declared default: {e}", setting.env));
                assert_eq!(
                    format!("{c:?}"),
                    defaults,
                    "{}={value}, its declared default, is not Config::default()'s",
                    setting.env
                );
            }
        }
    }

    #[test]
    fn file_keys_and_variables_name_the_same_thing_and_are_declared_once() {
        for setting in SETTINGS {
            if let Some(key) = setting.file_key {
                let from_env = setting
                    .env
                    .strip_prefix("VILVIK_KEYS_")
                    .unwrap_or(setting.env)
                    .to_ascii_lowercase();
                assert_eq!(key, from_env, "{}", setting.env);
            }
            let times = SETTINGS.iter().filter(|s| s.env == setting.env).count();
            assert_eq!(times, 1, "{} is declared {times} times", setting.env);
            assert!(!setting.doc.contains('|') && !setting.doc.contains('\n'));
        }
    }

    #[test]
    fn every_declared_variable_is_accepted() {
        let all: Vec<(&str, &str)> = SETTINGS
            .iter()
            .filter(|s| s.env.starts_with("VILVIK_KEYS_"))
            .map(|s| (s.env, ""))
            .collect();
        assert!(Config::from_sources(None, &env(&all)).is_ok());
    }

    /// The README's settings table, between these lines, is
    /// [`settings_table`]'s output.
    const TABLE_START: &str = "<!-- settings table: generated from SETTINGS in src/config.rs -->\n";
    const TABLE_END: &str = "<!-- end of settings table -->\n";

    #[test]
    fn the_readme_lists_every_setting_as_declared() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/README.md");
        let readme = std::fs::read_to_string(path).unwrap();
        let start = readme
            .find(TABLE_START)
            .unwrap_or_else(|| panic!("README.md lacks the line {TABLE_START:?}"))
            + TABLE_START.len();
        let end = start
            + readme[start..]
                .find(TABLE_END)
                .unwrap_or_else(|| panic!("README.md lacks the line {TABLE_END:?}"));
        let table = settings_table();
        if readme[start..end] == table {
            return;
        }
        if std::env::var("UPDATE_README").is_ok_and(|v| v == "1") {
            let updated = format!("{}{table}{}", &readme[..start], &readme[end..]);
            std::fs::write(path, updated).unwrap();
            return;
        }
        panic!(
            "README.md's settings table differs from SETTINGS in src/config.rs. \
             Regenerate it with `UPDATE_README=1 cargo test -p vilvik-keys --lib config`, \
             or put this between its markers:\n{table}"
        );
    }

    #[test]
    fn debug_redacts_secrets() {
        let c = Config::from_sources(
            None,
            &env(&[
                ("DATABASE_URL", "postgres://u:hunter2@db/keys"),
                (
                    "VILVIK_KEYS_OPERATOR_TOKEN",
                    "op-token-0123456789abcdef0123456789",
                ),
            ]),
        )
        .unwrap();
        let shown = format!("{c:?}");
        assert!(
            !shown.contains("hunter2") && !shown.contains("op-token"),
            "{shown}"
        );
    }

    #[test]
    fn admin_rates_default_to_100_a_second_with_bursts_of_200_for_every_tier() {
        let c = Config::from_sources(None, &env(&[])).unwrap();
        let expected = AdminRate {
            per_second: NonZeroU32::new(100).unwrap(),
            burst: NonZeroU32::new(200).unwrap(),
        };
        assert_eq!(c.admin_rates.for_tier(Tier::Free), expected);
        assert_eq!(c.admin_rates.for_tier(Tier::Premium), expected);
    }

    #[test]
    fn a_tier_overrides_the_global_admin_rate_setting_by_setting() {
        let f = file("admin_rate_per_second = 10\npremium_admin_rate_per_second = 50\n");
        let c = Config::from_sources(
            Some(f.path()),
            &env(&[
                ("VILVIK_KEYS_ADMIN_RATE_BURST", "20"),
                ("VILVIK_KEYS_FREE_ADMIN_RATE_BURST", "5"),
                ("VILVIK_KEYS_PREMIUM_ADMIN_RATE_PER_SECOND", "40"),
            ]),
        )
        .unwrap();
        let rate = |tier| {
            let r = c.admin_rates.for_tier(tier);
            (r.per_second.get(), r.burst.get())
        };
        // Free: the global rate, its own burst; premium: its own rate
        // (the environment's over the file's), the global burst.
        assert_eq!(rate(Tier::Free), (10, 5));
        assert_eq!(rate(Tier::Premium), (40, 20));
    }

    #[test]
    fn admin_rates_of_zero_or_beyond_a_million_stop_the_start() {
        for variable in [
            "VILVIK_KEYS_ADMIN_RATE_PER_SECOND",
            "VILVIK_KEYS_FREE_ADMIN_RATE_PER_SECOND",
            "VILVIK_KEYS_PREMIUM_ADMIN_RATE_PER_SECOND",
        ] {
            let err = Config::from_sources(None, &env(&[(variable, "0")]))
                .unwrap_err()
                .to_string();
            assert!(err.starts_with(variable), "{err}");
            assert!(err.contains("at least 1 call a second"), "{err}");
            let err = Config::from_sources(None, &env(&[(variable, "1000001")]))
                .unwrap_err()
                .to_string();
            assert!(err.starts_with(variable), "{err}");
            assert!(err.contains("at most 1000000"), "{err}");
            let err = Config::from_sources(None, &env(&[(variable, "fast")]))
                .unwrap_err()
                .to_string();
            assert!(err.starts_with(variable), "{err}");
            assert!(err.contains("'fast' is not a whole number"), "{err}");
        }
        for variable in [
            "VILVIK_KEYS_ADMIN_RATE_BURST",
            "VILVIK_KEYS_FREE_ADMIN_RATE_BURST",
            "VILVIK_KEYS_PREMIUM_ADMIN_RATE_BURST",
        ] {
            let err = Config::from_sources(None, &env(&[(variable, "0")]))
                .unwrap_err()
                .to_string();
            assert!(err.starts_with(variable), "{err}");
            assert!(err.contains("at least 1 call"), "{err}");
        }
        let f = file("free_admin_rate_burst = 0\n");
        let err = Config::from_sources(Some(f.path()), &env(&[]))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("free_admin_rate_burst"), "{err}");
    }

    #[test]
    fn a_connections_share_cannot_exceed_its_listeners_limit() {
        let c = Config::from_sources(None, &env(&[])).unwrap();
        assert_eq!(c.listener_limits, ListenerLimits::default());
        let err = Config::from_sources(
            None,
            &env(&[
                ("VILVIK_KEYS_VERIFY_CONCURRENCY_LIMIT", "100"),
                ("VILVIK_KEYS_VERIFY_CONCURRENCY_PER_CONNECTION", "101"),
            ]),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.starts_with("verify_concurrency_per_connection"),
            "{err}"
        );
        assert!(err.contains("(101)") && err.contains("(100)"), "{err}");
        let err = Config::from_sources(
            None,
            &env(&[("VILVIK_KEYS_ADMIN_CONCURRENCY_PER_CONNECTION", "257")]),
        )
        .unwrap_err()
        .to_string();
        assert!(err.starts_with("admin_concurrency_per_connection"), "{err}");
        let err = Config::from_sources(None, &env(&[("VILVIK_KEYS_IDLE_TIMEOUT_MS", "0")]))
            .unwrap_err()
            .to_string();
        assert_eq!(err, "idle_timeout_ms: must be at least 1 millisecond");
    }
}

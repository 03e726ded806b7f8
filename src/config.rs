//! Configuration: one typed struct, read from an optional TOML file and then
//! from the environment, which wins. Unknown file keys and invalid values
//! stop the start with a message that names them.
//!
//! | file key                 | environment                          | default              |
//! |--------------------------|--------------------------------------|----------------------|
//! | database_url             | DATABASE_URL                         | unset: SQLite        |
//! | sqlite_path              | VILVIK_KEYS_SQLITE_PATH              | ./vilvik-keys.db     |
//! | admin_addr               | VILVIK_KEYS_ADMIN_ADDR               | 127.0.0.1:50051      |
//! | verify_addr              | VILVIK_KEYS_VERIFY_ADDR              | 127.0.0.1:50052      |
//! | public_verify_addr       | VILVIK_KEYS_PUBLIC_VERIFY_ADDR       | the verify address   |
//! | operator_token           | VILVIK_KEYS_OPERATOR_TOKEN           | unset: no operator   |
//! | free_tier_limit          | VILVIK_KEYS_FREE_TIER_LIMIT          | 3                    |
//! | premium_tier_limit       | VILVIK_KEYS_PREMIUM_TIER_LIMIT       | 25                   |
//! | usage_flush_interval_ms  | VILVIK_KEYS_USAGE_FLUSH_INTERVAL_MS  | 1000                 |
//! | trusted_proxies          | VILVIK_KEYS_TRUSTED_PROXIES          | none (comma-separated IPs) |
//! | log_format               | VILVIK_KEYS_LOG_FORMAT               | pretty (or json)     |
//! | shutdown_grace_ms        | VILVIK_KEYS_SHUTDOWN_GRACE_MS        | 10000                |
//! | request_timeout_ms       | VILVIK_KEYS_REQUEST_TIMEOUT_MS       | 5000                 |
//! | staleness_bound_ms       | VILVIK_KEYS_STALENESS_BOUND_MS       | 30000 (0 = fail closed) |
//! | negative_cache_ttl_ms    | VILVIK_KEYS_NEGATIVE_CACHE_TTL_MS    | 2000                 |
//! | consistency_check_ms     | VILVIK_KEYS_CONSISTENCY_CHECK_MS     | 1000                 |
//! | change_poll_ms           | VILVIK_KEYS_CHANGE_POLL_MS           | 50 (SQLite only)     |
//! | preload                  | VILVIK_KEYS_PRELOAD                  | false                |
//! | verify_concurrency_limit | VILVIK_KEYS_VERIFY_CONCURRENCY_LIMIT | 1024                 |
//! | change_log_retention_hours | VILVIK_KEYS_CHANGE_LOG_RETENTION_HOURS | 168 (admin nodes prune) |

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use vilvik_keys_domain::TierLimits;

/// Shortest operator token accepted: a guessable token would open every account.
const MIN_OPERATOR_TOKEN_LEN: usize = 32;

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
    pub admin_addr: SocketAddr,
    pub verify_addr: SocketAddr,
    pub public_verify_addr: Option<String>,
    pub operator_token: Option<SecretString>,
    pub tier_limits: TierLimits,
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
    /// Load every key into memory at start.
    pub preload: bool,
    /// Verify requests in progress at once, over all connections; more are
    /// refused at once with RESOURCE_EXHAUSTED rather than queued.
    pub verify_concurrency_limit: usize,
    /// How long change-log entries are kept; admin nodes delete older
    /// ones. A verify node cut off for longer clears its cache on return.
    pub change_log_retention: Duration,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field(
                "database_url",
                &self.database_url.as_ref().map(|_| "[REDACTED]"),
            )
            .field("sqlite_path", &self.sqlite_path)
            .field("admin_addr", &self.admin_addr)
            .field("verify_addr", &self.verify_addr)
            .field("public_verify_addr", &self.public_verify_addr)
            .field(
                "operator_token",
                &self.operator_token.as_ref().map(|_| "[REDACTED]"),
            )
            .field("tier_limits", &self.tier_limits)
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
            .field("preload", &self.preload)
            .field("verify_concurrency_limit", &self.verify_concurrency_limit)
            .field("change_log_retention", &self.change_log_retention)
            .finish()
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            database_url: None,
            sqlite_path: PathBuf::from("./vilvik-keys.db"),
            admin_addr: SocketAddr::from(([127, 0, 0, 1], 50051)),
            verify_addr: SocketAddr::from(([127, 0, 0, 1], 50052)),
            public_verify_addr: None,
            operator_token: None,
            tier_limits: TierLimits::default(),
            usage_flush_interval: Duration::from_secs(1),
            trusted_proxies: Vec::new(),
            log_format: LogFormat::Pretty,
            shutdown_grace: Duration::from_secs(10),
            request_timeout: Duration::from_secs(5),
            staleness_bound: Duration::from_secs(30),
            negative_cache_ttl: Duration::from_secs(2),
            consistency_check_interval: Duration::from_secs(1),
            change_poll_interval: Duration::from_millis(50),
            preload: false,
            verify_concurrency_limit: 1024,
            change_log_retention: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

/// The TOML file's shape; every key optional, unknown keys rejected.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    database_url: Option<String>,
    sqlite_path: Option<PathBuf>,
    admin_addr: Option<String>,
    verify_addr: Option<String>,
    public_verify_addr: Option<String>,
    operator_token: Option<String>,
    free_tier_limit: Option<u32>,
    premium_tier_limit: Option<u32>,
    usage_flush_interval_ms: Option<u64>,
    trusted_proxies: Option<Vec<String>>,
    log_format: Option<String>,
    shutdown_grace_ms: Option<u64>,
    request_timeout_ms: Option<u64>,
    staleness_bound_ms: Option<u64>,
    negative_cache_ttl_ms: Option<u64>,
    consistency_check_ms: Option<u64>,
    change_poll_ms: Option<u64>,
    preload: Option<bool>,
    verify_concurrency_limit: Option<u32>,
    change_log_retention_hours: Option<u32>,
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

fn invalid(setting: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        setting: setting.to_owned(),
        message: message.into(),
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
                toml::from_str::<FileConfig>(&text).map_err(|e| ConfigError::Parse {
                    path: path.to_owned(),
                    message: e.message().to_owned(),
                })?
            }
            None => FileConfig::default(),
        };
        let mut config = Config::default();
        // Each setting: the environment's value wins over the file's.
        let pick = |env_name: &str, from_file: Option<String>| -> Option<(String, String)> {
            match env.get(env_name).filter(|v| !v.is_empty()) {
                Some(v) => Some((env_name.to_owned(), v.clone())),
                None => from_file.map(|v| (file_key(env_name), v)),
            }
        };

        config.database_url =
            pick("DATABASE_URL", file.database_url).map(|(_, v)| SecretString::from(v));
        if let Some((_, v)) = pick(
            "VILVIK_KEYS_SQLITE_PATH",
            file.sqlite_path.map(|p| p.to_string_lossy().into_owned()),
        ) {
            config.sqlite_path = PathBuf::from(v);
        }
        if let Some((name, v)) = pick("VILVIK_KEYS_ADMIN_ADDR", file.admin_addr) {
            config.admin_addr = parse_addr(&name, &v)?;
        }
        if let Some((name, v)) = pick("VILVIK_KEYS_VERIFY_ADDR", file.verify_addr) {
            config.verify_addr = parse_addr(&name, &v)?;
        }
        config.public_verify_addr =
            pick("VILVIK_KEYS_PUBLIC_VERIFY_ADDR", file.public_verify_addr).map(|(_, v)| v);
        if let Some((name, v)) = pick("VILVIK_KEYS_OPERATOR_TOKEN", file.operator_token) {
            if v.len() < MIN_OPERATOR_TOKEN_LEN {
                return Err(invalid(
                    &name,
                    format!(
                        "the operator token must be at least {MIN_OPERATOR_TOKEN_LEN} characters; generate one with `openssl rand -hex 32`"
                    ),
                ));
            }
            config.operator_token = Some(SecretString::from(v));
        }
        if let Some((name, v)) = pick(
            "VILVIK_KEYS_FREE_TIER_LIMIT",
            file.free_tier_limit.map(|n| n.to_string()),
        ) {
            config.tier_limits.free = parse_number(&name, &v)?;
        }
        if let Some((name, v)) = pick(
            "VILVIK_KEYS_PREMIUM_TIER_LIMIT",
            file.premium_tier_limit.map(|n| n.to_string()),
        ) {
            config.tier_limits.premium = parse_number(&name, &v)?;
        }
        if let Some((name, v)) = pick(
            "VILVIK_KEYS_USAGE_FLUSH_INTERVAL_MS",
            file.usage_flush_interval_ms.map(|n| n.to_string()),
        ) {
            config.usage_flush_interval = parse_millis(&name, &v)?;
        }
        if let Some((name, v)) = pick(
            "VILVIK_KEYS_SHUTDOWN_GRACE_MS",
            file.shutdown_grace_ms.map(|n| n.to_string()),
        ) {
            config.shutdown_grace = parse_millis(&name, &v)?;
        }
        if let Some((name, v)) = pick(
            "VILVIK_KEYS_REQUEST_TIMEOUT_MS",
            file.request_timeout_ms.map(|n| n.to_string()),
        ) {
            config.request_timeout = parse_millis(&name, &v)?;
        }
        for (env_name, from_file, target) in [
            (
                "VILVIK_KEYS_STALENESS_BOUND_MS",
                file.staleness_bound_ms,
                &mut config.staleness_bound,
            ),
            (
                "VILVIK_KEYS_NEGATIVE_CACHE_TTL_MS",
                file.negative_cache_ttl_ms,
                &mut config.negative_cache_ttl,
            ),
            (
                "VILVIK_KEYS_CONSISTENCY_CHECK_MS",
                file.consistency_check_ms,
                &mut config.consistency_check_interval,
            ),
            (
                "VILVIK_KEYS_CHANGE_POLL_MS",
                file.change_poll_ms,
                &mut config.change_poll_interval,
            ),
        ] {
            if let Some((name, v)) = pick(env_name, from_file.map(|n| n.to_string())) {
                *target = parse_millis(&name, &v)?;
            }
        }
        for (name, interval) in [
            ("consistency_check_ms", config.consistency_check_interval),
            ("change_poll_ms", config.change_poll_interval),
        ] {
            if interval.is_zero() {
                return Err(invalid(name, "must be at least 1 millisecond"));
            }
        }
        if let Some((name, v)) = pick("VILVIK_KEYS_PRELOAD", file.preload.map(|b| b.to_string())) {
            config.preload = match v.as_str() {
                "true" | "1" => true,
                "false" | "0" => false,
                other => return Err(invalid(&name, format!("'{other}' is not true or false"))),
            };
        }
        if let Some((name, v)) = pick(
            "VILVIK_KEYS_VERIFY_CONCURRENCY_LIMIT",
            file.verify_concurrency_limit.map(|n| n.to_string()),
        ) {
            config.verify_concurrency_limit = parse_number(&name, &v)? as usize;
            if config.verify_concurrency_limit == 0 {
                return Err(invalid(&name, "must be at least 1"));
            }
        }
        if let Some((name, v)) = pick(
            "VILVIK_KEYS_CHANGE_LOG_RETENTION_HOURS",
            file.change_log_retention_hours.map(|n| n.to_string()),
        ) {
            let hours: u32 = parse_number(&name, &v)?;
            if hours == 0 {
                return Err(invalid(&name, "must be at least 1 hour"));
            }
            config.change_log_retention = Duration::from_secs(u64::from(hours) * 3600);
        }
        if let Some((name, v)) = pick(
            "VILVIK_KEYS_TRUSTED_PROXIES",
            file.trusted_proxies.map(|list| list.join(",")),
        ) {
            config.trusted_proxies = v
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| {
                    s.parse()
                        .map_err(|_| invalid(&name, format!("'{s}' is not an IP address")))
                })
                .collect::<Result<_, _>>()?;
        }
        if let Some((name, v)) = pick("VILVIK_KEYS_LOG_FORMAT", file.log_format) {
            config.log_format = match v.as_str() {
                "pretty" => LogFormat::Pretty,
                "json" => LogFormat::Json,
                other => {
                    return Err(invalid(
                        &name,
                        format!("'{other}' is not a log format: use 'pretty' or 'json'"),
                    ));
                }
            };
        }
        if config.tier_limits.premium < config.tier_limits.free {
            return Err(invalid(
                "premium_tier_limit",
                format!(
                    "premium ({}) must allow at least as many keys as free ({})",
                    config.tier_limits.premium, config.tier_limits.free
                ),
            ));
        }
        Ok(config)
    }

    pub fn database_url(&self) -> Option<&str> {
        self.database_url.as_ref().map(|url| url.expose_secret())
    }

    /// The verify address printed in smoke-test commands.
    pub fn public_verify_addr(&self, bound_verify_addr: SocketAddr) -> String {
        self.public_verify_addr
            .clone()
            .unwrap_or_else(|| bound_verify_addr.to_string())
    }
}

/// Every `VILVIK_KEYS_*` variable this program reads: the service's settings
/// above, and those of the CLI and the test harness.
const KNOWN_VARIABLES: &[&str] = &[
    "VILVIK_KEYS_SQLITE_PATH",
    "VILVIK_KEYS_ADMIN_ADDR",
    "VILVIK_KEYS_VERIFY_ADDR",
    "VILVIK_KEYS_PUBLIC_VERIFY_ADDR",
    "VILVIK_KEYS_OPERATOR_TOKEN",
    "VILVIK_KEYS_FREE_TIER_LIMIT",
    "VILVIK_KEYS_PREMIUM_TIER_LIMIT",
    "VILVIK_KEYS_USAGE_FLUSH_INTERVAL_MS",
    "VILVIK_KEYS_TRUSTED_PROXIES",
    "VILVIK_KEYS_LOG_FORMAT",
    "VILVIK_KEYS_SHUTDOWN_GRACE_MS",
    "VILVIK_KEYS_REQUEST_TIMEOUT_MS",
    "VILVIK_KEYS_STALENESS_BOUND_MS",
    "VILVIK_KEYS_NEGATIVE_CACHE_TTL_MS",
    "VILVIK_KEYS_CONSISTENCY_CHECK_MS",
    "VILVIK_KEYS_CHANGE_POLL_MS",
    "VILVIK_KEYS_PRELOAD",
    "VILVIK_KEYS_VERIFY_CONCURRENCY_LIMIT",
    "VILVIK_KEYS_CHANGE_LOG_RETENTION_HOURS",
    "VILVIK_KEYS_CONFIG",
    "VILVIK_KEYS_TOKEN",
    "VILVIK_KEYS_ADDR",
    "VILVIK_KEYS_ACCOUNT",
    "VILVIK_KEYS_ACTOR",
    "VILVIK_KEYS_TEST_DATABASE_URL",
    "VILVIK_KEYS_REQUIRE_POSTGRES",
];

/// A misspelt variable would otherwise be ignored silently.
fn reject_unknown_variables(env: &HashMap<String, String>) -> Result<(), ConfigError> {
    let mut unknown: Vec<&str> = env
        .keys()
        .map(String::as_str)
        .filter(|name| name.starts_with("VILVIK_KEYS_") && !KNOWN_VARIABLES.contains(name))
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

/// `VILVIK_KEYS_ADMIN_ADDR` -> `admin_addr`, for messages about file values.
fn file_key(env_name: &str) -> String {
    env_name
        .strip_prefix("VILVIK_KEYS_")
        .unwrap_or(env_name)
        .to_ascii_lowercase()
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
        let f = file("log_format = \"xml\"\n");
        let err = Config::from_sources(Some(f.path()), &env(&[]))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("log_format"), "{err}");
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
}

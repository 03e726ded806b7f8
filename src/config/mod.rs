//! Configuration: one typed struct, read from an optional TOML file and then
//! from the environment, which wins. Unknown file keys, unknown
//! `VILVIK_KEYS_*` variables and invalid values stop the start with a
//! message that names them.
//!
//! - [`Config`] (here): every setting's field, and [`Config::default`],
//!   the one place each default is written (or taken from the component
//!   that owns it: the change feed's from `FeedConfig::default()`, the
//!   store's policy from `Policy::default()`, and so on).
//! - `settings`: every setting declared once in the `settings!` table: its
//!   file key, its variable, how its default is shown (read from
//!   [`Config::default`]), one line saying what it means, and how a value
//!   is applied. The TOML file's shape, the loader, the unknown-variable
//!   check and the README's settings table ([`SETTINGS`],
//!   [`settings_table`]) all come from it; a test fails when the README
//!   disagrees with it.
//! - `load`: reading the file and the environment, and the checks across
//!   settings.
//! - `parse`: the value parsers, each naming the setting it refuses.
//! - `limits`: what the listeners and the admin rate limiter are given
//!   ([`ListenerLimits`], [`AdminRateLimits`]); `tls`: [`TlsSettings`] and
//!   the [`TlsFiles`] a listener's TLS is made from.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use vilvik_keys_domain::{PepperId, ScopeCatalogue, TierLimits};
use vilvik_keys_store::{ListenerOptions, Policy, PostgresOptions};
use vilvik_keys_verify::{CacheConfig, FeedConfig, MissConfig, UsageConfig};

mod error;
mod limits;
mod load;
mod parse;
mod settings;
mod tls;

pub use error::ConfigError;
pub use limits::{
    AdminRate, AdminRateLimits, AdminRateOverride, Concurrency, ListenerLimits, MAX_MESSAGE_BYTES,
};
pub use settings::{SETTINGS, Setting, SettingDefault, settings_table};
pub use tls::{CERT_SETTING, CLIENT_CA_SETTING, KEY_SETTING, TlsFiles, TlsSettings};

/// The log filter when `RUST_LOG` is unset.
pub const DEFAULT_LOG_FILTER: &str = "info";

/// The admin API the CLI talks to when `VILVIK_KEYS_ADDR` is unset: the
/// default `admin_addr`.
pub const CLI_DEFAULT_ADDR: &str = "http://127.0.0.1:50051";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Pretty,
    Json,
}

impl LogFormat {
    /// Its name in the file and the environment.
    pub fn name(self) -> &'static str {
        match self {
            LogFormat::Pretty => "pretty",
            LogFormat::Json => "json",
        }
    }
}

/// The service's whole configuration, validated. Its `Debug` shows the
/// database URL and the operator token as `[REDACTED]` (they are
/// `SecretString`s).
#[derive(Debug, Clone)]
pub struct Config {
    pub database_url: Option<SecretString>,
    pub sqlite_path: PathBuf,
    /// The current pepper's file; `None`: the default one (`crate::pepper`).
    pub pepper_file: Option<PathBuf>,
    /// Older peppers' files, whose keys still verify.
    pub pepper_files: Vec<PathBuf>,
    /// Pepper ids deliberately retired: live keys hashed with them do not
    /// stop the start (they answer NOT_FOUND).
    pub retired_peppers: Vec<PepperId>,
    pub admin_addr: SocketAddr,
    pub verify_addr: SocketAddr,
    pub public_verify_addr: Option<String>,
    pub operator_token: Option<SecretString>,
    pub tier_limits: TierLimits,
    /// The scopes keys may be granted where an account has no catalogue of its own.
    pub allowed_scopes: ScopeCatalogue,
    pub usage_flush_interval: Duration,
    pub trusted_proxies: Vec<IpAddr>,
    /// Where the verify listener's HTTP routes read a key from.
    pub http_key_headers: Vec<http::HeaderName>,
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
    pub listener: ListenerOptions,
    /// Load every key into memory at start.
    pub preload: bool,
    /// Verify requests in progress at once, over all connections; more are
    /// refused at once with RESOURCE_EXHAUSTED rather than queued.
    pub verify_concurrency_limit: usize,
    /// The misses' own budget of store lookups, and their deadline.
    pub verify_misses: MissConfig,
    /// How long change-log entries are kept; admin nodes delete older
    /// ones. A verify node cut off for longer clears its cache on return.
    pub change_log_retention: Duration,
    /// How long rotated-away secrets are kept; admin nodes delete older ones.
    pub rotated_secret_retention: Duration,
    /// How many rotated-away secrets of a key a rotation keeps.
    pub rotated_secrets_kept: u32,
    /// How many keys an account may store per active key of its tier.
    pub stored_keys_per_active_key: u32,
    /// How many request ids an account may hold within their window.
    pub request_ids_per_account: u32,
    /// What one client may hold open on either listener: connections,
    /// streams, and requests whose message does not arrive.
    pub listener_limits: ListenerLimits,
    /// TLS on the listeners; plaintext when no certificate is set.
    pub tls: TlsSettings,
    /// How fast each account may call the admin API, on this node.
    pub admin_rates: AdminRateLimits,
}

/// A week, the default retention of the change log and of rotated-away
/// secrets.
const WEEK: Duration = Duration::from_secs(7 * 24 * 3600);

impl Default for Config {
    /// Every setting's default, written here once (or taken from the
    /// component that owns it); the settings table shows these values.
    fn default() -> Self {
        let feed = FeedConfig::default();
        let policy = Policy::default();
        let postgres = PostgresOptions::default();
        Self {
            database_url: None,
            sqlite_path: PathBuf::from("./vilvik-keys.db"),
            pepper_file: None,
            pepper_files: Vec::new(),
            retired_peppers: Vec::new(),
            admin_addr: SocketAddr::from(([127, 0, 0, 1], 50051)),
            verify_addr: SocketAddr::from(([127, 0, 0, 1], 50052)),
            public_verify_addr: None,
            operator_token: None,
            tier_limits: policy.tiers,
            allowed_scopes: policy.grantable,
            usage_flush_interval: UsageConfig::default().flush_interval,
            trusted_proxies: Vec::new(),
            http_key_headers: vec![
                http::header::AUTHORIZATION,
                http::HeaderName::from_static("x-api-key"),
            ],
            log_format: LogFormat::Pretty,
            shutdown_grace: Duration::from_secs(10),
            request_timeout: Duration::from_secs(5),
            staleness_bound: feed.staleness_bound,
            negative_cache_ttl: CacheConfig::default().negative_ttl,
            consistency_check_interval: feed.consistency_check_interval,
            change_poll_interval: feed.poll_interval,
            change_feed_retry_interval: feed.retry_interval,
            change_fallback_poll: feed.fallback_poll_interval,
            store_timeout: postgres.statement_timeout,
            listener: postgres.listener,
            preload: false,
            verify_concurrency_limit: 1024,
            verify_misses: MissConfig::default(),
            change_log_retention: WEEK,
            rotated_secret_retention: WEEK,
            rotated_secrets_kept: policy.rotated_secrets_kept,
            stored_keys_per_active_key: policy.stored_keys_per_active_key,
            request_ids_per_account: policy.request_ids_per_account,
            listener_limits: ListenerLimits::default(),
            tls: TlsSettings::default(),
            admin_rates: AdminRateLimits::default(),
        }
    }
}

impl Config {
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
            request_ids_per_account: self.request_ids_per_account,
        }
    }

    /// The verify address printed in smoke-test commands.
    pub fn public_verify_addr(&self, bound_verify_addr: SocketAddr) -> String {
        self.public_verify_addr
            .clone()
            .unwrap_or_else(|| bound_verify_addr.to_string())
    }

    /// The verify listener's concurrency: its global limit and one
    /// connection's share of it.
    pub fn verify_concurrency(&self) -> Concurrency {
        Concurrency {
            limit: self.verify_concurrency_limit,
            per_connection: self.listener_limits.verify_concurrency_per_connection,
        }
    }

    /// The admin listener's concurrency: its global limit and one
    /// connection's share of it.
    pub fn admin_concurrency(&self) -> Concurrency {
        Concurrency {
            limit: self.listener_limits.admin_concurrency_limit,
            per_connection: self.listener_limits.admin_concurrency_per_connection,
        }
    }
}

/// Helpers the unit tests of every part of the configuration share.
#[cfg(test)]
mod testing {
    use std::collections::HashMap;

    use super::Config;

    /// An environment of these variables only.
    pub(super) fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// A configuration file holding `text`, removed when dropped.
    pub(super) fn file(text: &str) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), text).unwrap();
        f
    }

    /// The configuration these variables (and no file) load to.
    pub(super) fn load(vars: &[(&str, &str)]) -> Config {
        Config::from_sources(None, &env(vars)).unwrap()
    }

    /// Why these variables (and no file) do not load.
    pub(super) fn refusal(vars: &[(&str, &str)]) -> String {
        Config::from_sources(None, &env(vars))
            .unwrap_err()
            .to_string()
    }

    /// Asserts that `variable`=`value` stops the start with a message
    /// naming the variable and giving `reason`.
    pub(super) fn assert_refused(variable: &str, value: &str, reason: &str) {
        let err = refusal(&[(variable, value)]);
        assert!(err.starts_with(variable), "{err}");
        assert!(err.contains(reason), "{value}: {err}");
    }

    /// The configuration a file holding `text` (and no variable) loads to.
    pub(super) fn load_file(text: &str) -> Config {
        let f = file(text);
        Config::from_sources(Some(f.path()), &env(&[])).unwrap()
    }

    /// Why a file holding `text` (and no variable) does not load.
    pub(super) fn refusal_of_file(text: &str) -> String {
        let f = file(text);
        Config::from_sources(Some(f.path()), &env(&[]))
            .unwrap_err()
            .to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::testing::load;
    use super::*;

    #[test]
    fn defaults_match_the_design() {
        let c = load(&[]);
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
    fn debug_redacts_secrets() {
        let c = load(&[
            ("DATABASE_URL", "postgres://u:hunter2@db/keys"),
            (
                "VILVIK_KEYS_OPERATOR_TOKEN",
                "op-token-0123456789abcdef0123456789",
            ),
        ]);
        let shown = format!("{c:?}");
        assert!(
            !shown.contains("hunter2") && !shown.contains("op-token"),
            "{shown}"
        );
    }
}

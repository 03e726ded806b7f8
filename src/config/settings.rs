//! The settings table: every setting declared once, in the `settings!`
//! invocation below, with its file key, its variable, how its default is
//! shown, one line saying what it means, and how its value is applied.
//! The TOML file's shape, the loader's `apply_settings`, the
//! unknown-variable check and the README's settings table
//! ([`SETTINGS`], [`settings_table`]) all come from it.
//!
//! A default is never written here: [`SettingDefault::Value`] shows the
//! field of [`Config::default`] the setting applies to, in the form the
//! file or the environment would give it, and a test loads each shown
//! default back to the default configuration.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use secrecy::SecretString;
use serde::Deserialize;

use super::error::{ConfigError, invalid};
use super::parse::{
    operator_token_weakness, parse_addr, parse_bool, parse_burst, parse_catalogue, parse_count,
    parse_header_names, parse_hours, parse_interval, parse_ips, parse_log_format, parse_millis,
    parse_number, parse_pepper_ids, parse_rate, split_paths,
};
use super::{CLI_DEFAULT_ADDR, Config, DEFAULT_LOG_FILTER};

/// One setting or variable, as the documentation and the loader see it.
#[derive(Debug, Clone, Copy)]
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
#[derive(Debug, Clone, Copy)]
pub enum SettingDefault {
    /// A value: the setting's field of a configuration (given
    /// [`Config::default`]: see [`Setting::default_value`]) as it would be
    /// written in the file or the environment.
    Value(fn(&Config) -> String),
    /// Unset, and what that means (Markdown).
    Unset(&'static str),
}

impl Setting {
    /// Its default as it would be written in the file or the environment;
    /// `None` when it is unset by default.
    pub fn default_value(&self) -> Option<String> {
        match self.default {
            SettingDefault::Value(show) => Some(show(&Config::default())),
            SettingDefault::Unset(_) => None,
        }
    }
}

/// A duration setting's value in whole milliseconds.
fn millis(duration: Duration) -> String {
    duration.as_millis().to_string()
}

/// A duration setting's value in whole hours.
fn hours(duration: Duration) -> String {
    (duration.as_secs() / 3600).to_string()
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
        pub(super) struct FileConfig {
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
        pub(super) fn apply_settings(
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
        sqlite_path: PathBuf = "VILVIK_KEYS_SQLITE_PATH", Value(|c| c.sqlite_path.display().to_string()),
            "the embedded SQLite file, when `DATABASE_URL` is unset",
            |c, _, v| { c.sqlite_path = PathBuf::from(v); Ok(()) };
        pepper_file: PathBuf = "VILVIK_KEYS_PEPPER_FILE", Unset("`<sqlite_path>.pepper` beside the SQLite file, or `./vilvik-keys.pepper` on Postgres; generated (0600) when missing"),
            "the current pepper: a file of 64 hex characters (32 secret bytes, mode 0600) that key hashes are keyed with; every node must be given the same (see docs/SECURITY.md)",
            |c, _, v| { c.pepper_file = (!v.is_empty()).then(|| PathBuf::from(v)); Ok(()) };
        pepper_files: Vec<String> = "VILVIK_KEYS_PEPPER_FILES", Unset("none"),
            "older peppers' files, comma-separated: keys hashed with them still verify, and move to the current pepper when they do",
            |c, _, v| { c.pepper_files = split_paths(&v); Ok(()) };
        retired_peppers: Vec<String> = "VILVIK_KEYS_RETIRED_PEPPERS", Unset("none (a live key hashed with a pepper not configured stops the start)"),
            "pepper ids (as `pepper status` shows them; a list in the file, comma-separated in the environment) retired on purpose: live keys hashed with them answer NOT_FOUND instead of stopping the start",
            |c, name, v| { c.retired_peppers = parse_pepper_ids(name, &v)?; Ok(()) };
        admin_addr: String = "VILVIK_KEYS_ADMIN_ADDR", Value(|c| c.admin_addr.to_string()),
            "the KeyAdmin listener",
            |c, name, v| { c.admin_addr = parse_addr(name, &v)?; Ok(()) };
        verify_addr: String = "VILVIK_KEYS_VERIFY_ADDR", Value(|c| c.verify_addr.to_string()),
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
        free_tier_limit: u32 = "VILVIK_KEYS_FREE_TIER_LIMIT", Value(|c| c.tier_limits.free.to_string()),
            "active keys an account on the free tier may hold",
            |c, name, v| { c.tier_limits.free = parse_number(name, &v)?; Ok(()) };
        premium_tier_limit: u32 = "VILVIK_KEYS_PREMIUM_TIER_LIMIT", Value(|c| c.tier_limits.premium.to_string()),
            "active keys an account on the premium tier may hold",
            |c, name, v| { c.tier_limits.premium = parse_number(name, &v)?; Ok(()) };
        allowed_scopes: Vec<String> = "VILVIK_KEYS_ALLOWED_SCOPES", Value(|c| c.allowed_scopes.to_strings().join(",")),
            "the scope patterns keys may be granted (`resource:action`, either part may be `*`; a list in the file, comma-separated in the environment); `keys:admin` is never among them, only the operator token grants it; `accounts set-scopes` sets an account's own",
            |c, name, v| { c.allowed_scopes = parse_catalogue(name, &v)?; Ok(()) };
        usage_flush_interval_ms: u64 = "VILVIK_KEYS_USAGE_FLUSH_INTERVAL_MS", Value(|c| millis(c.usage_flush_interval)),
            "how often uses noted by verifies are written to the store",
            |c, name, v| { c.usage_flush_interval = parse_millis(name, &v)?; Ok(()) };
        shutdown_grace_ms: u64 = "VILVIK_KEYS_SHUTDOWN_GRACE_MS", Value(|c| millis(c.shutdown_grace)),
            "how long a stopping server lets requests in progress finish",
            |c, name, v| { c.shutdown_grace = parse_millis(name, &v)?; Ok(()) };
        request_timeout_ms: u64 = "VILVIK_KEYS_REQUEST_TIMEOUT_MS", Value(|c| millis(c.request_timeout)),
            "the longest a request may take",
            |c, name, v| { c.request_timeout = parse_millis(name, &v)?; Ok(()) };
        staleness_bound_ms: u64 = "VILVIK_KEYS_STALENESS_BOUND_MS", Value(|c| millis(c.staleness_bound)),
            "how long cached keys stay trusted after the node's last confirmed read of the change log (`0`: never trust them)",
            |c, name, v| { c.staleness_bound = parse_millis(name, &v)?; Ok(()) };
        negative_cache_ttl_ms: u64 = "VILVIK_KEYS_NEGATIVE_CACHE_TTL_MS", Value(|c| millis(c.negative_cache_ttl)),
            "how long an unknown prefix is remembered",
            |c, name, v| { c.negative_cache_ttl = parse_millis(name, &v)?; Ok(()) };
        consistency_check_ms: u64 = "VILVIK_KEYS_CONSISTENCY_CHECK_MS", Value(|c| millis(c.consistency_check_interval)),
            "how often a node checks it has missed no change",
            |c, name, v| { c.consistency_check_interval = parse_interval(name, "consistency_check_ms", &v)?; Ok(()) };
        change_poll_ms: u64 = "VILVIK_KEYS_CHANGE_POLL_MS", Value(|c| millis(c.change_poll_interval)),
            "how often SQLite is polled for changes",
            |c, name, v| { c.change_poll_interval = parse_interval(name, "change_poll_ms", &v)?; Ok(()) };
        change_feed_retry_ms: u64 = "VILVIK_KEYS_CHANGE_FEED_RETRY_MS", Value(|c| millis(c.change_feed_retry_interval)),
            "how long a node waits before following the change feed again after it failed",
            |c, name, v| { c.change_feed_retry_interval = parse_interval(name, "change_feed_retry_ms", &v)?; Ok(()) };
        change_fallback_poll_ms: u64 = "VILVIK_KEYS_CHANGE_FALLBACK_POLL_MS", Value(|c| millis(c.change_fallback_poll)),
            "Postgres: how often the change log is polled through the pool while the change listener is down",
            |c, name, v| { c.change_fallback_poll = parse_interval(name, "change_fallback_poll_ms", &v)?; Ok(()) };
        store_timeout_ms: u64 = "VILVIK_KEYS_STORE_TIMEOUT_MS", Value(|c| millis(c.store_timeout)),
            "the deadline of a store call: Postgres's statement timeout, and the longest a change-feed read may take",
            |c, name, v| { c.store_timeout = parse_interval(name, "store_timeout_ms", &v)?; Ok(()) };
        listener_heartbeat_ms: u64 = "VILVIK_KEYS_LISTENER_HEARTBEAT_MS", Value(|c| millis(c.listener.heartbeat)),
            "Postgres: after this long without a message the change listener checks its connection",
            |c, name, v| { c.listener.heartbeat = parse_interval(name, "listener_heartbeat_ms", &v)?; Ok(()) };
        listener_heartbeat_timeout_ms: u64 = "VILVIK_KEYS_LISTENER_HEARTBEAT_TIMEOUT_MS", Value(|c| millis(c.listener.heartbeat_timeout)),
            "Postgres: how long that check may take before the listener reconnects",
            |c, name, v| { c.listener.heartbeat_timeout = parse_interval(name, "listener_heartbeat_timeout_ms", &v)?; Ok(()) };
        preload: bool = "VILVIK_KEYS_PRELOAD", Value(|c| c.preload.to_string()),
            "load every key into memory at start (or `serve --preload`)",
            |c, name, v| { c.preload = parse_bool(name, &v)?; Ok(()) };
        verify_concurrency_limit: u32 = "VILVIK_KEYS_VERIFY_CONCURRENCY_LIMIT", Value(|c| c.verify_concurrency_limit.to_string()),
            "verifies in progress at once; more get RESOURCE_EXHAUSTED at once",
            |c, name, v| { c.verify_concurrency_limit = parse_count(name, &v)?; Ok(()) };
        verify_miss_concurrency: u32 = "VILVIK_KEYS_VERIFY_MISS_CONCURRENCY", Value(|c| c.verify_misses.concurrency.to_string()),
            "store lookups for keys not in memory at once; more get UNAVAILABLE at once, and hits never wait for them",
            |c, name, v| { c.verify_misses.concurrency = parse_count(name, &v)?; Ok(()) };
        verify_miss_timeout_ms: u64 = "VILVIK_KEYS_VERIFY_MISS_TIMEOUT_MS", Value(|c| millis(c.verify_misses.timeout)),
            "how long a store lookup for a key not in memory may take before it answers UNAVAILABLE",
            |c, name, v| { c.verify_misses.timeout = parse_interval(name, "verify_miss_timeout_ms", &v)?; Ok(()) };
        change_log_retention_hours: u32 = "VILVIK_KEYS_CHANGE_LOG_RETENTION_HOURS", Value(|c| hours(c.change_log_retention)),
            "admin nodes prune older change-log entries hourly; a verify node cut off for longer clears its cache when it is back",
            |c, name, v| {
                c.change_log_retention = parse_hours(name, &v)?;
                if c.change_log_retention.is_zero() {
                    return Err(invalid(name, "must be at least 1 hour"));
                }
                Ok(())
            };
        rotated_secret_retention_hours: u32 = "VILVIK_KEYS_ROTATED_SECRET_RETENTION_HOURS", Value(|c| hours(c.rotated_secret_retention)),
            "admin nodes delete rotated-away secrets older than this hourly (until then they verify as `ROTATED`, after as unknown); the audit log keeps every event",
            |c, name, v| { c.rotated_secret_retention = parse_hours(name, &v)?; Ok(()) };
        rotated_secrets_kept: u32 = "VILVIK_KEYS_ROTATED_SECRETS_KEPT", Value(|c| c.rotated_secrets_kept.to_string()),
            "rotated-away secrets of one key kept at most; each rotation deletes older ones",
            |c, name, v| { c.rotated_secrets_kept = parse_number(name, &v)?; Ok(()) };
        stored_keys_per_active_key: u32 = "VILVIK_KEYS_STORED_KEYS_PER_ACTIVE_KEY", Value(|c| c.stored_keys_per_active_key.to_string()),
            "keys an account may store in all (revoked and expired ones are its history and count) per active key its tier allows; at the ceiling CreateKey answers RESOURCE_EXHAUSTED",
            |c, name, v| {
                let per_key: u32 = parse_number(name, &v)?;
                if per_key == 0 {
                    return Err(invalid(name, "must be at least 1: an account must be able to store its active keys"));
                }
                c.stored_keys_per_active_key = per_key;
                Ok(())
            };
        request_ids_per_account: u32 = "VILVIK_KEYS_REQUEST_IDS_PER_ACCOUNT", Value(|c| c.request_ids_per_account.to_string()),
            "request ids an account may hold within their 24-hour window (each about 300 bytes stored); past it a create or rotation with a new one answers RESOURCE_EXHAUSTED, while retries still answer",
            |c, name, v| {
                let limit: u32 = parse_number(name, &v)?;
                if limit == 0 {
                    return Err(invalid(name, "must be at least 1: at 0 no call could send a request id"));
                }
                c.request_ids_per_account = limit;
                Ok(())
            };
        trusted_proxies: Vec<String> = "VILVIK_KEYS_TRUSTED_PROXIES",
            Unset("`x-forwarded-for` ignored"),
            "proxies whose `x-forwarded-for` is believed (a list in the file, comma-separated in the environment)",
            |c, name, v| { c.trusted_proxies = parse_ips(name, &v)?; Ok(()) };
        http_key_headers: Vec<String> = "VILVIK_KEYS_HTTP_KEY_HEADERS", Value(|c| c.http_key_headers.iter().map(|h| h.as_str()).collect::<Vec<_>>().join(",")),
            "the request headers the verify listener's HTTP routes and Envoy check read a key from (a list in the file, comma-separated in the environment): `authorization` as `Bearer <key>`, any other as the bare key; a request with keys in two of them is refused as ambiguous",
            |c, name, v| { c.http_key_headers = parse_header_names(name, &v)?; Ok(()) };
        log_format: String = "VILVIK_KEYS_LOG_FORMAT", Value(|c| c.log_format.name().to_owned()),
            "`pretty` or `json`",
            |c, name, v| { c.log_format = parse_log_format(name, &v)?; Ok(()) };
        // What one client may hold open on a listener: ListenerLimits, and
        // docs/design/connection-limits.md.
        max_connections: u32 = "VILVIK_KEYS_MAX_CONNECTIONS", Value(|c| c.listener_limits.max_connections.to_string()),
            "open connections per listener; at the cap a new one closes the oldest that has sent no request (else the longest idle), or is refused",
            |c, name, v| { c.listener_limits.max_connections = parse_count(name, &v)?; Ok(()) };
        first_request_timeout_ms: u64 = "VILVIK_KEYS_FIRST_REQUEST_TIMEOUT_MS", Value(|c| millis(c.listener_limits.first_request_timeout)),
            "a connection that has sent no request this long after it was accepted is closed",
            |c, name, v| { c.listener_limits.first_request_timeout = parse_interval(name, "first_request_timeout_ms", &v)?; Ok(()) };
        idle_timeout_ms: u64 = "VILVIK_KEYS_IDLE_TIMEOUT_MS", Value(|c| millis(c.listener_limits.idle_timeout)),
            "a connection with no request in progress for this long is closed",
            |c, name, v| { c.listener_limits.idle_timeout = parse_interval(name, "idle_timeout_ms", &v)?; Ok(()) };
        http2_max_concurrent_streams: u32 = "VILVIK_KEYS_HTTP2_MAX_CONCURRENT_STREAMS", Value(|c| c.listener_limits.http2_max_concurrent_streams.to_string()),
            "requests open at once on one HTTP/2 connection (`SETTINGS_MAX_CONCURRENT_STREAMS`)",
            |c, name, v| { c.listener_limits.http2_max_concurrent_streams = parse_count(name, &v)? as u32; Ok(()) };
        http2_keepalive_interval_ms: u64 = "VILVIK_KEYS_HTTP2_KEEPALIVE_INTERVAL_MS", Value(|c| millis(c.listener_limits.http2_keepalive_interval)),
            "after this long without hearing from a client the server sends an HTTP/2 PING",
            |c, name, v| { c.listener_limits.http2_keepalive_interval = parse_interval(name, "http2_keepalive_interval_ms", &v)?; Ok(()) };
        http2_keepalive_timeout_ms: u64 = "VILVIK_KEYS_HTTP2_KEEPALIVE_TIMEOUT_MS", Value(|c| millis(c.listener_limits.http2_keepalive_timeout)),
            "a connection whose client does not answer that PING within this long is closed",
            |c, name, v| { c.listener_limits.http2_keepalive_timeout = parse_interval(name, "http2_keepalive_timeout_ms", &v)?; Ok(()) };
        http2_max_control_frames_per_second: u32 = "VILVIK_KEYS_HTTP2_MAX_CONTROL_FRAMES_PER_SECOND", Value(|c| c.listener_limits.http2_max_control_frames_per_second.to_string()),
            "HTTP/2 SETTINGS, PING, WINDOW_UPDATE, PRIORITY and empty DATA frames one connection may send in a second, beyond two per DATA or HEADERS frame the server sent it; past it the connection gets GOAWAY ENHANCE_YOUR_CALM and is closed",
            |c, name, v| { c.listener_limits.http2_max_control_frames_per_second = parse_count(name, &v)? as u32; Ok(()) };
        verify_concurrency_per_connection: u32 = "VILVIK_KEYS_VERIFY_CONCURRENCY_PER_CONNECTION", Value(|c| c.listener_limits.verify_concurrency_per_connection.to_string()),
            "verifies in progress at once on one connection, its share of `verify_concurrency_limit`; more get RESOURCE_EXHAUSTED at once",
            |c, name, v| { c.listener_limits.verify_concurrency_per_connection = parse_count(name, &v)?; Ok(()) };
        admin_concurrency_limit: u32 = "VILVIK_KEYS_ADMIN_CONCURRENCY_LIMIT", Value(|c| c.listener_limits.admin_concurrency_limit.to_string()),
            "admin requests in progress at once, over all connections; more get RESOURCE_EXHAUSTED at once",
            |c, name, v| { c.listener_limits.admin_concurrency_limit = parse_count(name, &v)?; Ok(()) };
        admin_concurrency_per_connection: u32 = "VILVIK_KEYS_ADMIN_CONCURRENCY_PER_CONNECTION", Value(|c| c.listener_limits.admin_concurrency_per_connection.to_string()),
            "admin requests in progress at once on one connection, its share of `admin_concurrency_limit`",
            |c, name, v| { c.listener_limits.admin_concurrency_per_connection = parse_count(name, &v)?; Ok(()) };
        // Admission of a request and of a connection:
        // src/transport/admission.rs, src/transport/connections/.
        request_message_timeout_ms: u64 = "VILVIK_KEYS_REQUEST_MESSAGE_TIMEOUT_MS", Value(|c| millis(c.listener_limits.request_message_timeout)),
            "a request's message must arrive within this long of its headers (CANCELLED otherwise); until it has, the request holds no concurrency slot",
            |c, name, v| { c.listener_limits.request_message_timeout = parse_interval(name, "request_message_timeout_ms", &v)?; Ok(()) };
        request_message_budget_bytes: u32 = "VILVIK_KEYS_REQUEST_MESSAGE_BUDGET_BYTES", Value(|c| c.listener_limits.request_message_budget_bytes.to_string()),
            "bytes of requests still arriving that a listener holds at once, beyond the first KiB of each; a request that finds it spent gets RESOURCE_EXHAUSTED",
            |c, name, v| { c.listener_limits.request_message_budget_bytes = parse_count(name, &v)?; Ok(()) };
        max_connections_per_address: u32 = "VILVIK_KEYS_MAX_CONNECTIONS_PER_ADDRESS", Value(|c| c.listener_limits.max_connections_per_address.to_string()),
            "open connections per listener from one client address (not a `trusted_proxies` one); at the cap a new one closes that address's oldest connection not in use, or is refused",
            |c, name, v| { c.listener_limits.max_connections_per_address = parse_count(name, &v)?; Ok(()) };
        // How fast one account may call the admin API: AdminRateLimits,
        // applied by src/service/rate_limit.rs
        // (docs/design/admin-rate-limits.md).
        admin_rate_per_second: u32 = "VILVIK_KEYS_ADMIN_RATE_PER_SECOND", Value(|c| c.admin_rates.per_second.to_string()),
            "admin calls one account may make a second on this node, on average (GCRA); more get RESOURCE_EXHAUSTED with `retry-after` (several admin nodes: each allows this much)",
            |c, name, v| { c.admin_rates.per_second = parse_rate(name, &v)?; Ok(()) };
        admin_rate_burst: u32 = "VILVIK_KEYS_ADMIN_RATE_BURST", Value(|c| c.admin_rates.burst.to_string()),
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
        // TLS on the listeners: TlsSettings, served by src/transport/tls/
        // (docs/SECURITY.md).
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
            "the CA file smoke-test commands pass to curl as `--cacert` and to grpcurl as `-cacert`",
            |c, _, v| { c.tls.public_ca_file = Some(PathBuf::from(v)); Ok(()) };
        tls_reload_interval_ms: u64 = "VILVIK_KEYS_TLS_RELOAD_INTERVAL_MS", Value(|c| millis(c.tls.reload_interval)),
            "how often the TLS files are checked for a change (SIGHUP reloads them at once)",
            |c, name, v| { c.tls.reload_interval = parse_interval(name, "tls_reload_interval_ms", &v)?; Ok(()) };
    }
    elsewhere {
        "VILVIK_KEYS_CONFIG", Unset("no file"),
            "the `--config` file";
        "RUST_LOG", Value(|_| DEFAULT_LOG_FILTER.to_owned()), "the log filter";
        "VILVIK_KEYS_TOKEN", Unset("no credential"),
            "the CLI's credential: a management key or the operator token";
        "VILVIK_KEYS_ADDR", Value(|_| CLI_DEFAULT_ADDR.to_owned()),
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
/// The README's settings table, rendered from [`SETTINGS`].
pub fn settings_table() -> String {
    let defaults = Config::default();
    let mut table =
        String::from("| file key | environment | default | what it sets |\n|---|---|---|---|\n");
    for setting in SETTINGS {
        let file_key = setting
            .file_key
            .map(|key| format!("`{key}`"))
            .unwrap_or_default();
        let default = match setting.default {
            SettingDefault::Value(show) => format!("`{}`", show(&defaults)),
            SettingDefault::Unset(meaning) => format!("unset: {meaning}"),
        };
        table.push_str(&format!(
            "| {file_key} | `{}` | {default} | {} |\n",
            setting.env, setting.doc
        ));
    }
    table
}

#[cfg(test)]
mod tests {
    use vilvik_keys_store::Policy;

    use super::super::testing::{assert_refused, env, load, load_file, refusal};
    use super::*;

    #[test]
    fn each_shown_default_loads_to_the_default_configuration() {
        let defaults = format!("{:?}", Config::default());
        for setting in SETTINGS.iter().filter(|s| s.file_key.is_some()) {
            if let Some(value) = setting.default_value() {
                let c = Config::from_sources(None, &env(&[(setting.env, &value)]))
                    .unwrap_or_else(|e| panic!("{}'s shown default: {e}", setting.env));
                assert_eq!(
                    format!("{c:?}"),
                    defaults,
                    "{}={value}, its shown default, is not Config::default()'s",
                    setting.env
                );
            }
        }
    }

    #[test]
    fn the_staleness_bound_defaults_to_the_change_feeds_own() {
        let feed = vilvik_keys_verify::FeedConfig::default();
        assert_eq!(Config::default().staleness_bound, feed.staleness_bound);
        let shown = SETTINGS
            .iter()
            .find(|s| s.env == "VILVIK_KEYS_STALENESS_BOUND_MS")
            .and_then(Setting::default_value);
        assert_eq!(shown, Some(feed.staleness_bound.as_millis().to_string()));
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

    /// The README's settings table, between these lines, is
    /// [`settings_table`]'s output.
    const TABLE_START: &str =
        "<!-- settings table: generated from SETTINGS in src/config/settings.rs -->\n";
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
            "README.md's settings table differs from SETTINGS in src/config/settings.rs. \
             Regenerate it with `UPDATE_README=1 cargo test -p vilvik-keys --lib config`, \
             or put this between its markers:\n{table}"
        );
    }

    #[test]
    fn scopes_and_history_bounds_parse_and_refuse_bad_values() {
        let c = load(&[
            ("VILVIK_KEYS_ALLOWED_SCOPES", "datasets:*, reports:read"),
            ("VILVIK_KEYS_ROTATED_SECRET_RETENTION_HOURS", "24"),
            ("VILVIK_KEYS_ROTATED_SECRETS_KEPT", "3"),
            ("VILVIK_KEYS_STORED_KEYS_PER_ACTIVE_KEY", "20"),
            ("VILVIK_KEYS_REQUEST_IDS_PER_ACCOUNT", "500"),
        ]);
        let policy = c.policy();
        assert_eq!(
            policy.grantable.to_strings(),
            ["datasets:*", "reports:read"]
        );
        assert_eq!(policy.rotated_secrets_kept, 3);
        assert_eq!(policy.stored_keys_per_active_key, 20);
        assert_eq!(policy.request_ids_per_account, 500);
        assert_eq!(c.rotated_secret_retention, Duration::from_secs(24 * 3600));
        let defaults = load(&[]).policy();
        assert_eq!(defaults, Policy::default());
        let c = load_file("allowed_scopes = [\"datasets:read\"]\n");
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
            ("VILVIK_KEYS_REQUEST_IDS_PER_ACCOUNT", "0", "at least 1"),
            (
                "VILVIK_KEYS_ROTATED_SECRETS_KEPT",
                "-1",
                "not a whole number",
            ),
        ] {
            assert_refused(name, value, reason);
        }
    }

    #[test]
    fn pepper_files_are_a_path_and_a_comma_separated_list() {
        let c = load(&[]);
        assert_eq!((c.pepper_file, c.pepper_files), (None, vec![]));
        let c = load(&[
            ("VILVIK_KEYS_PEPPER_FILE", "/run/secrets/pepper"),
            (
                "VILVIK_KEYS_PEPPER_FILES",
                " /old/a.pepper, ,/old/b.pepper ",
            ),
        ]);
        assert_eq!(c.pepper_file, Some(PathBuf::from("/run/secrets/pepper")));
        assert_eq!(
            c.pepper_files,
            [
                PathBuf::from("/old/a.pepper"),
                PathBuf::from("/old/b.pepper")
            ]
        );
        let c = load_file("pepper_file = \"b.pepper\"\npepper_files = [\"a.pepper\"]\n");
        assert_eq!(c.pepper_file, Some(PathBuf::from("b.pepper")));
        assert_eq!(c.pepper_files, [PathBuf::from("a.pepper")]);
    }

    #[test]
    fn retired_peppers_are_pepper_ids() {
        assert!(load(&[]).retired_peppers.is_empty());
        let c = load(&[(
            "VILVIK_KEYS_RETIRED_PEPPERS",
            "00000000000000ab, 1234567890ABCDEF",
        )]);
        let shown: Vec<String> = c.retired_peppers.iter().map(|id| id.to_string()).collect();
        assert_eq!(shown, ["00000000000000ab", "1234567890abcdef"]);
        let c = load_file("retired_peppers = [\"00000000000000ab\"]\n");
        assert_eq!(c.retired_peppers.len(), 1);
        assert_refused(
            "VILVIK_KEYS_RETIRED_PEPPERS",
            "old.pepper",
            "not a pepper id",
        );
    }

    #[test]
    fn change_log_retention_is_in_hours_and_at_least_one() {
        let c = load(&[]);
        assert_eq!(c.change_log_retention, Duration::from_secs(7 * 24 * 3600));
        let c = load_file("change_log_retention_hours = 24\n");
        assert_eq!(c.change_log_retention, Duration::from_secs(24 * 3600));
        assert_refused(
            "VILVIK_KEYS_CHANGE_LOG_RETENTION_HOURS",
            "0",
            "at least 1 hour",
        );
    }

    #[test]
    fn the_feed_retry_interval_is_a_setting_of_at_least_one_millisecond() {
        let c = load(&[]);
        assert_eq!(c.change_feed_retry_interval, Duration::from_millis(500));
        let c = load_file("change_feed_retry_ms = 20\n");
        assert_eq!(c.change_feed_retry_interval, Duration::from_millis(20));
        let err = refusal(&[("VILVIK_KEYS_CHANGE_FEED_RETRY_MS", "0")]);
        assert_eq!(err, "change_feed_retry_ms: must be at least 1 millisecond");
    }
}

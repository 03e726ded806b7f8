//! The limits settings give the listeners ([`ListenerLimits`],
//! [`Concurrency`]) and the admin rate limiter ([`AdminRateLimits`]).

use std::num::NonZeroU32;
use std::time::Duration;

use vilvik_keys_domain::Tier;

use super::error::{ConfigError, invalid};

/// How fast one account may call the admin API, by GCRA: `per_second`
/// calls a second on average, and up to `burst` at once after a quiet spell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdminRate {
    pub per_second: NonZeroU32,
    pub burst: NonZeroU32,
}

/// The admin rate of each tier: the global one, unless the tier's own
/// settings override it. Each field is a setting (the `settings!` table);
/// `service::rate_limit` applies them.
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
/// (the `settings!` table); `transport::connections` and `runtime` apply
/// them.
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
    /// HTTP/2 control frames (SETTINGS, PING, WINDOW_UPDATE, PRIORITY,
    /// empty DATA) a connection may send in one second, beyond two for
    /// each DATA or HEADERS frame the server sent it; past it, GOAWAY ENHANCE_YOUR_CALM.
    pub http2_max_control_frames_per_second: u32,
    /// One connection's share of `verify_concurrency_limit`.
    pub verify_concurrency_per_connection: usize,
    pub admin_concurrency_limit: usize,
    /// One connection's share of `admin_concurrency_limit`.
    pub admin_concurrency_per_connection: usize,
    /// How long a request's message may take to arrive after its headers.
    pub request_message_timeout: Duration,
    /// Bytes of requests still arriving one listener holds at once.
    pub request_message_budget_bytes: usize,
    /// Open connections per listener from one address that is not a
    /// trusted proxy.
    pub max_connections_per_address: usize,
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
            http2_max_control_frames_per_second: 100,
            verify_concurrency_per_connection: 128,
            admin_concurrency_limit: 256,
            admin_concurrency_per_connection: 64,
            request_message_timeout: Duration::from_secs(2),
            request_message_budget_bytes: 4 * 1024 * 1024,
            max_connections_per_address: 256,
        }
    }
}

impl ListenerLimits {
    /// A connection's share is at most the listener's whole limit.
    pub(super) fn check(&self, verify_concurrency_limit: usize) -> Result<(), ConfigError> {
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
        if self.request_message_budget_bytes < MAX_MESSAGE_BYTES {
            return Err(invalid(
                "request_message_budget_bytes",
                format!(
                    "must be at least {MAX_MESSAGE_BYTES} (one request message of the largest size), or such a request could never arrive; it is {}",
                    self.request_message_budget_bytes
                ),
            ));
        }
        Ok(())
    }
}

/// Largest request message accepted, on every listener.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;

/// How many requests one listener runs at once: `limit` over all its
/// connections (more are shed at once, RESOURCE_EXHAUSTED, nothing
/// queues), and `per_connection`, one connection's share of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Concurrency {
    pub limit: usize,
    pub per_connection: usize,
}

#[cfg(test)]
mod tests {
    use super::super::Config;
    use super::super::testing::{assert_refused, env, file, load, refusal, refusal_of_file};
    use super::*;

    #[test]
    fn admin_rates_default_to_100_a_second_with_bursts_of_200_for_every_tier() {
        let c = load(&[]);
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
    fn http2_control_frames_default_to_100_a_second_and_refuse_0() {
        let variable = "VILVIK_KEYS_HTTP2_MAX_CONTROL_FRAMES_PER_SECOND";
        assert_eq!(
            load(&[])
                .listener_limits
                .http2_max_control_frames_per_second,
            100
        );
        let c = load(&[(variable, "500")]);
        assert_eq!(c.listener_limits.http2_max_control_frames_per_second, 500);
        assert_refused(variable, "0", "at least 1");
        assert_refused(variable, "often", "not a whole number");
    }

    #[test]
    fn admin_rates_of_zero_or_beyond_a_million_stop_the_start() {
        for variable in [
            "VILVIK_KEYS_ADMIN_RATE_PER_SECOND",
            "VILVIK_KEYS_FREE_ADMIN_RATE_PER_SECOND",
            "VILVIK_KEYS_PREMIUM_ADMIN_RATE_PER_SECOND",
        ] {
            assert_refused(variable, "0", "at least 1 call a second");
            assert_refused(variable, "1000001", "at most 1000000");
            assert_refused(variable, "fast", "'fast' is not a whole number");
        }
        for variable in [
            "VILVIK_KEYS_ADMIN_RATE_BURST",
            "VILVIK_KEYS_FREE_ADMIN_RATE_BURST",
            "VILVIK_KEYS_PREMIUM_ADMIN_RATE_BURST",
        ] {
            assert_refused(variable, "0", "at least 1 call");
        }
        let err = refusal_of_file("free_admin_rate_burst = 0\n");
        assert!(err.starts_with("free_admin_rate_burst"), "{err}");
    }

    #[test]
    fn a_connections_share_cannot_exceed_its_listeners_limit() {
        let c = load(&[]);
        assert_eq!(c.listener_limits, ListenerLimits::default());
        let err = refusal(&[
            ("VILVIK_KEYS_VERIFY_CONCURRENCY_LIMIT", "100"),
            ("VILVIK_KEYS_VERIFY_CONCURRENCY_PER_CONNECTION", "101"),
        ]);
        assert!(
            err.starts_with("verify_concurrency_per_connection"),
            "{err}"
        );
        assert!(err.contains("(101)") && err.contains("(100)"), "{err}");
        let err = refusal(&[("VILVIK_KEYS_ADMIN_CONCURRENCY_PER_CONNECTION", "257")]);
        assert!(err.starts_with("admin_concurrency_per_connection"), "{err}");
        let err = refusal(&[("VILVIK_KEYS_IDLE_TIMEOUT_MS", "0")]);
        assert_eq!(err, "idle_timeout_ms: must be at least 1 millisecond");
    }

    #[test]
    fn admission_settings_load_and_a_budget_below_one_message_is_refused() {
        let c = load(&[
            ("VILVIK_KEYS_REQUEST_MESSAGE_TIMEOUT_MS", "500"),
            ("VILVIK_KEYS_REQUEST_MESSAGE_BUDGET_BYTES", "1048576"),
            ("VILVIK_KEYS_MAX_CONNECTIONS_PER_ADDRESS", "32"),
        ]);
        assert_eq!(
            c.listener_limits.request_message_timeout,
            Duration::from_millis(500)
        );
        assert_eq!(c.listener_limits.request_message_budget_bytes, 1 << 20);
        assert_eq!(c.listener_limits.max_connections_per_address, 32);
        let err = refusal(&[("VILVIK_KEYS_REQUEST_MESSAGE_BUDGET_BYTES", "1000")]);
        assert!(
            err.starts_with("request_message_budget_bytes: must be at least 65536"),
            "{err}"
        );
        let err = refusal(&[("VILVIK_KEYS_MAX_CONNECTIONS_PER_ADDRESS", "0")]);
        assert!(err.contains("must be at least 1"), "{err}");
        let err = refusal(&[("VILVIK_KEYS_REQUEST_MESSAGE_TIMEOUT_MS", "0")]);
        assert_eq!(
            err,
            "request_message_timeout_ms: must be at least 1 millisecond"
        );
    }
}

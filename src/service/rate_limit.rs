//! Per-account rate limits on the admin API.
//!
//! Every KeyAdmin call is counted against its account once the caller is
//! authenticated ([`super::Admin::admit`]) and before the
//! request is validated or the store is touched, so a refused call costs
//! almost nothing and changes nothing. The limit is GCRA (the `governor`
//! crate): `per_second` calls a second on average and up to `burst` at once
//! after a quiet spell, each account on its own, so one account's flood
//! never slows another's calls. Over the limit a call is RESOURCE_EXHAUSTED
//! with `retry-after` metadata ([`RateLimited`]).
//!
//! Each admin node counts only the calls it serves: N nodes behind a load
//! balancer allow up to N times the configured rate
//! (docs/design/admin-rate-limits.md).
//!
//! Time is the service's [`Clock`] (the system clock in production, a
//! test's manual clock in tests), read through `LimiterClock` as
//! [`Clock::elapsed`]: GCRA needs a clock that never goes back, and the
//! wall clock's jumps must neither refill nor freeze an account's
//! allowance.
//!
//! A tier may have a rate of its own. Only then is the account's tier
//! needed; it is read from the store once per [`TIER_TTL`] and account
//! (not once per call), and this node's SetAccountTier updates it at once
//! ([`AdminRateLimiter::tier_set`]). Memory stays bounded by
//! [`AdminRateLimiter::sweep`], which the admin node's runtime runs
//! every [`SWEEP_INTERVAL`]: it forgets accounts whose limit is back to a
//! full burst, and tiers past their TTL.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use governor::middleware::NoOpMiddleware;
use governor::nanos::Nanos;
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter};
use vilvik_keys_domain::{AccountId, Clock, Tier};
use vilvik_keys_store::Store;

use crate::config::{AdminRate, AdminRateLimits};

/// How long an account's tier is believed without reading it again. A tier
/// changed on another admin node applies here within this long.
pub const TIER_TTL: Duration = Duration::from_secs(30);

/// After a failed tier lookup (the store is down), how long the tier last
/// known (else `free`, every account's first tier) is used before the store
/// is asked again: not once per call of a flood.
const FAILED_LOOKUP_TTL: Duration = Duration::from_secs(1);

/// Most accounts whose tier is remembered; beyond, a tier is looked up and
/// used without being remembered.
const MAX_CACHED_TIERS: usize = 100_000;

/// How often idle accounts are forgotten.
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(10);

/// The admin API's per-account limiter; cheap to clone (one shared state).
#[derive(Clone)]
pub struct AdminRateLimiter {
    inner: Arc<Inner>,
}

struct Inner {
    free: TierLimiter,
    /// `None` when premium accounts have the free tier's rate: then no
    /// account's tier matters, and none is ever looked up.
    premium: Option<TierLimiter>,
    /// The tier of each account that called lately, when tiers differ.
    tiers: Mutex<HashMap<AccountId, CachedTier>>,
    store: Arc<dyn Store>,
}

struct TierLimiter {
    rate: AdminRate,
    /// The tier named in refusals; `None` when every tier has this rate.
    tier: Option<Tier>,
    limiter: RateLimiter<
        AccountId,
        DefaultKeyedStateStore<AccountId>,
        LimiterClock,
        NoOpMiddleware<Nanos>,
    >,
}

/// The service's [`Clock`] as governor reads it: [`Clock::elapsed`] in
/// nanoseconds.
#[derive(Debug, Clone)]
struct LimiterClock(Arc<dyn Clock>);

impl governor::clock::Clock for LimiterClock {
    type Instant = Nanos;

    fn now(&self) -> Nanos {
        Nanos::from(self.0.elapsed())
    }
}

#[derive(Debug, Clone, Copy)]
struct CachedTier {
    tier: Tier,
    until: Instant,
}

impl std::fmt::Debug for AdminRateLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminRateLimiter")
            .field("free", &self.inner.free.rate)
            .field("premium", &self.inner.premium.as_ref().map(|p| p.rate))
            .field("accounts", &self.tracked_accounts())
            .finish_non_exhaustive()
    }
}

/// A call refused for going over its account's admin rate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimited {
    pub account: AccountId,
    pub rate: AdminRate,
    /// The tier whose rate it is, when tiers have different rates.
    pub tier: Option<Tier>,
    /// How long until a call would be admitted.
    pub retry_after: Duration,
}

impl RateLimited {
    /// `retry-after` metadata: whole seconds, rounded up (as HTTP's header).
    pub fn retry_after_secs(&self) -> u64 {
        self.retry_after.as_nanos().div_ceil(1_000_000_000).max(1) as u64
    }

    /// `retry-after-ms` metadata: whole milliseconds, rounded up.
    pub fn retry_after_ms(&self) -> u64 {
        self.retry_after.as_nanos().div_ceil(1_000_000).max(1) as u64
    }
}

impl std::fmt::Display for RateLimited {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let tier = match self.tier {
            Some(tier) => format!(" (on the {tier} tier)"),
            None => String::new(),
        };
        write!(
            f,
            "admin calls for account '{}'{tier} are limited to {} per second (burst {}); retry after {} ms",
            self.account,
            self.rate.per_second,
            self.rate.burst,
            self.retry_after_ms()
        )
    }
}

impl TierLimiter {
    fn new(rate: AdminRate, tier: Option<Tier>, clock: LimiterClock) -> Self {
        Self {
            rate,
            tier,
            limiter: RateLimiter::new(
                Quota::per_second(rate.per_second).allow_burst(rate.burst),
                DefaultKeyedStateStore::default(),
                clock,
            ),
        }
    }

    fn check(&self, account: &AccountId) -> Result<(), RateLimited> {
        self.limiter.check_key(account).map_err(|not_until| {
            let now = governor::clock::Clock::now(self.limiter.clock());
            let retry_after = not_until.wait_time_from(now);
            RateLimited {
                account: account.clone(),
                rate: self.rate,
                tier: self.tier,
                retry_after,
            }
        })
    }
}

impl AdminRateLimiter {
    /// `store` is asked for an account's tier only when tiers' rates
    /// differ; `clock` is the service's.
    pub fn new(limits: AdminRateLimits, store: Arc<dyn Store>, clock: Arc<dyn Clock>) -> Self {
        let clock = LimiterClock(clock);
        let (free, premium) = (limits.for_tier(Tier::Free), limits.for_tier(Tier::Premium));
        let (free, premium) = if free == premium {
            (TierLimiter::new(free, None, clock), None)
        } else {
            (
                TierLimiter::new(free, Some(Tier::Free), clock.clone()),
                Some(TierLimiter::new(premium, Some(Tier::Premium), clock)),
            )
        };
        Self {
            inner: Arc::new(Inner {
                free,
                premium,
                tiers: Mutex::new(HashMap::new()),
                store,
            }),
        }
    }

    /// Counts one call of `account`'s; `Err` when it is over its rate (the
    /// refused call is not counted).
    pub async fn admit(&self, account: &AccountId) -> Result<(), RateLimited> {
        let limiter = match &self.inner.premium {
            None => &self.inner.free,
            Some(premium) => match self.tier(account).await {
                Tier::Free => &self.inner.free,
                Tier::Premium => premium,
            },
        };
        limiter.check(account)
    }

    /// This node changed `account`'s tier: its new rate applies at once.
    /// (Its count starts afresh under the new tier's rate.)
    pub fn tier_set(&self, account: &AccountId, tier: Tier) {
        if self.inner.premium.is_some() {
            self.remember(account, tier, Instant::now() + TIER_TTL);
        }
    }

    /// The account's tier: remembered, or read from the store.
    async fn tier(&self, account: &AccountId) -> Tier {
        let now = Instant::now();
        let known = self.tiers().get(account).copied();
        if let Some(known) = known.filter(|k| k.until > now) {
            return known.tier;
        }
        let (tier, ttl) = match self.inner.store.get_account(account).await {
            Ok(found) => (found.tier, TIER_TTL),
            Err(e) => {
                let tier = known.map_or(Tier::Free, |k| k.tier);
                tracing::warn!(error = %e, account = %account, tier = %tier, "cannot read the account's tier for its admin rate limit; using the tier last known");
                (tier, FAILED_LOOKUP_TTL)
            }
        };
        self.remember(account, tier, Instant::now() + ttl);
        tier
    }

    fn remember(&self, account: &AccountId, tier: Tier, until: Instant) {
        let mut tiers = self.tiers();
        if tiers.len() < MAX_CACHED_TIERS || tiers.contains_key(account) {
            tiers.insert(account.clone(), CachedTier { tier, until });
        }
    }

    fn tiers(&self) -> std::sync::MutexGuard<'_, HashMap<AccountId, CachedTier>> {
        self.inner.tiers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Forgets the accounts whose limit is back to a full burst (they would
    /// be admitted exactly as a new account is) and tiers past their TTL.
    pub fn sweep(&self) {
        for tier in std::iter::once(&self.inner.free).chain(&self.inner.premium) {
            tier.limiter.retain_recent();
            tier.limiter.shrink_to_fit();
        }
        let now = Instant::now();
        let mut tiers = self.tiers();
        tiers.retain(|_, known| known.until > now);
        tiers.shrink_to_fit();
    }

    /// Accounts whose limit or tier is held in memory.
    pub fn tracked_accounts(&self) -> usize {
        let limited = self.inner.free.limiter.len()
            + self.inner.premium.as_ref().map_or(0, |p| p.limiter.len());
        limited.max(self.tiers().len())
    }
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroU32;

    use vilvik_keys_domain::ManualClock;
    use vilvik_keys_store::Actor;

    use super::*;
    use crate::config::AdminRateOverride;

    async fn sqlite(dir: &tempfile::TempDir) -> Arc<dyn Store> {
        let store = vilvik_keys_store::connect(
            None,
            &dir.path().join("keys.db"),
            vilvik_keys_store::PostgresOptions::default(),
        )
        .await
        .unwrap();
        store.migrate().await.unwrap();
        store
    }

    fn account(name: &str) -> AccountId {
        AccountId::from_caller(name).unwrap()
    }

    /// A clock standing still at a whole second until advanced.
    fn manual_clock() -> Arc<ManualClock> {
        let start = time::OffsetDateTime::now_utc()
            .replace_nanosecond(0)
            .unwrap();
        Arc::new(ManualClock::new(start))
    }

    #[tokio::test]
    async fn a_burst_is_admitted_then_the_account_waits_and_others_do_not() {
        let dir = tempfile::tempdir().unwrap();
        // One call a second, on a clock standing still.
        let limits = AdminRateLimits {
            per_second: NonZeroU32::new(1).unwrap(),
            burst: NonZeroU32::new(3).unwrap(),
            ..AdminRateLimits::default()
        };
        let clock = manual_clock();
        let limiter = AdminRateLimiter::new(limits, sqlite(&dir).await, clock.clone());
        let (acme, other) = (account("acme"), account("other"));
        for _ in 0..3 {
            limiter.admit(&acme).await.unwrap();
        }
        let refused = limiter.admit(&acme).await.unwrap_err();
        assert_eq!(refused.account, acme);
        assert_eq!(refused.tier, None);
        assert!(
            refused.retry_after > Duration::from_millis(500)
                && refused.retry_after <= Duration::from_secs(1),
            "{refused:?}"
        );
        assert_eq!(refused.retry_after, Duration::from_secs(1), "{refused:?}");
        assert_eq!(refused.retry_after_secs(), 1);
        assert_eq!(
            refused.to_string(),
            format!(
                "admin calls for account 'acme' are limited to 1 per second (burst 3); retry after {} ms",
                refused.retry_after_ms()
            )
        );
        for _ in 0..3 {
            limiter.admit(&other).await.unwrap();
        }
        // Waiting as told is enough, and no less is.
        clock.advance(time::Duration::milliseconds(999));
        assert!(limiter.admit(&acme).await.is_err());
        clock.advance(time::Duration::milliseconds(1));
        limiter.admit(&acme).await.unwrap();
    }

    #[test]
    fn retry_after_rounds_up_to_whole_seconds_and_milliseconds() {
        let refused = |retry_after| RateLimited {
            account: account("acme"),
            rate: AdminRateLimits::default().for_tier(Tier::Free),
            tier: Some(Tier::Free),
            retry_after,
        };
        let r = refused(Duration::from_micros(12_001));
        assert_eq!((r.retry_after_secs(), r.retry_after_ms()), (1, 13));
        assert!(r.to_string().contains("(on the free tier)"), "{r}");
        let r = refused(Duration::from_millis(2_000));
        assert_eq!((r.retry_after_secs(), r.retry_after_ms()), (2, 2_000));
        let r = refused(Duration::from_nanos(2_000_000_001));
        assert_eq!((r.retry_after_secs(), r.retry_after_ms()), (3, 2_001));
        let r = refused(Duration::ZERO);
        assert_eq!((r.retry_after_secs(), r.retry_after_ms()), (1, 1));
    }

    #[tokio::test]
    async fn memory_is_bounded_by_the_accounts_calling_lately() {
        let dir = tempfile::tempdir().unwrap();
        // A full burst is back 2 ms after an account's call.
        let clock = manual_clock();
        let limiter = AdminRateLimiter::new(
            AdminRateLimits::uniform(1_000, 2),
            sqlite(&dir).await,
            clock.clone(),
        );
        for i in 0..10_000 {
            limiter.admit(&account(&format!("acct-{i}"))).await.unwrap();
        }
        assert_eq!(limiter.tracked_accounts(), 10_000);
        clock.advance(time::Duration::milliseconds(20));
        limiter.admit(&account("busy")).await.unwrap();
        limiter.admit(&account("busy")).await.unwrap();
        limiter.sweep();
        // The busy account has not had its full burst back yet.
        assert!(limiter.tracked_accounts() <= 1, "{limiter:?}");
        assert_eq!(limiter.tracked_accounts(), 1, "{limiter:?}");
    }

    #[tokio::test]
    async fn a_tier_with_its_own_rate_is_read_once_and_updated_by_tier_set() {
        let dir = tempfile::tempdir().unwrap();
        let store = sqlite(&dir).await;
        let limits = AdminRateLimits {
            free: AdminRateOverride {
                per_second: Some(NonZeroU32::new(1).unwrap()),
                burst: Some(NonZeroU32::new(1).unwrap()),
            },
            ..AdminRateLimits::default()
        };
        let limiter = AdminRateLimiter::new(limits, store.clone(), manual_clock());
        let (acme, big) = (account("acme"), account("big"));
        let actor = Actor {
            name: "operator:test".into(),
            ip: None,
            operator: true,
        };
        store
            .set_tier(&big, Tier::Premium, &actor, time::OffsetDateTime::now_utc())
            .await
            .unwrap();
        limiter.admit(&acme).await.unwrap();
        let refused = limiter.admit(&acme).await.unwrap_err();
        assert_eq!(refused.tier, Some(Tier::Free));
        assert!(refused.to_string().contains("(on the free tier)"));
        for _ in 0..50 {
            limiter.admit(&big).await.unwrap();
        }
        // Moved to free in the store behind this node's back: the tier
        // read at first still holds, until its TTL.
        store
            .set_tier(&big, Tier::Free, &actor, time::OffsetDateTime::now_utc())
            .await
            .unwrap();
        limiter.admit(&big).await.unwrap();
        // This node's own SetAccountTier applies at once.
        limiter.tier_set(&big, Tier::Free);
        limiter.admit(&big).await.unwrap();
        assert_eq!(
            limiter.admit(&big).await.unwrap_err().tier,
            Some(Tier::Free)
        );
        limiter.tier_set(&acme, Tier::Premium);
        limiter.admit(&acme).await.unwrap();
        assert!(limiter.tracked_accounts() >= 2);
    }
}

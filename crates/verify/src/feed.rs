//! Following the store's change log, so that every node evicts a changed
//! key at once and knows when it cannot be sure of its cache.
//!
//! Postgres pushes each change (`LISTEN`); SQLite is polled. Either way the
//! follower remembers the last sequence number it applied. On every
//! (re)connection, after a gap in the pushed sequence, and whenever the
//! periodic consistency check finds the store ahead, it reads every change
//! since then from the log and evicts those prefixes before trusting the
//! cache again; if those changes were already pruned from the log, it
//! clears the whole cache instead. While the listener is down, the change
//! log is polled through the pool instead, so revocations keep arriving.
//!
//! Trust is a lease: each completed read of the change log (a poll, or the
//! consistency check next to the listener) that leaves nothing unapplied
//! confirms the cache as of when that read began, and [`FeedHealth`] lets
//! the verifier trust cached entries only while the last confirmation is
//! younger than the staleness bound. A hung database or a silent partition
//! confirms nothing, so the lease runs out on its own; every read has a
//! deadline, so the follower notices, and falls back to polling or
//! resubscribes, instead of waiting without end.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::Duration;

use time::OffsetDateTime;
use vilvik_keys_domain::{Clock, KeyPrefix};
use vilvik_keys_store::{ChangeListener, KeySource, StoreError};

use crate::cache::KeyCache;
use crate::error::VerifyError;
use crate::known::KnownPrefixes;

/// Changes read per catch-up query.
const CATCH_UP_PAGE: u32 = 1_000;
/// Reloading every prefix (after changes were pruned) may take this many
/// deadlines: a million rows take about a second.
const RELOAD_DEADLINES: u32 = 12;

/// How the follower runs.
#[derive(Debug, Clone, Copy)]
pub struct FeedConfig {
    /// How long cached entries stay trusted after the last confirmed read
    /// of the change log; zero never trusts them.
    pub staleness_bound: Duration,
    /// How often a node with a listener reads the store's change sequence:
    /// a safety net for a lost notification, and what renews its lease.
    pub consistency_check_interval: Duration,
    /// How often a backend without push (SQLite) is polled for changes.
    pub poll_interval: Duration,
    /// Wait before subscribing again after the listener failed.
    pub retry_interval: Duration,
    /// How often the change log is polled through the pool while the
    /// listener is down.
    pub fallback_poll_interval: Duration,
    /// The longest one read of the change log (or a subscription) may
    /// take before it counts as failed.
    pub deadline: Duration,
}

impl Default for FeedConfig {
    fn default() -> Self {
        Self {
            staleness_bound: Duration::from_secs(30),
            consistency_check_interval: Duration::from_secs(1),
            poll_interval: Duration::from_millis(50),
            retry_interval: Duration::from_millis(500),
            fallback_poll_interval: Duration::from_millis(200),
            deadline: Duration::from_secs(5),
        }
    }
}

/// Whether the node is following the change log, and its lease on the
/// cache: when the cache was last confirmed current.
#[derive(Debug)]
pub struct FeedHealth {
    following: AtomicBool,
    /// Unix microseconds (from the verifier's clock) at which the latest
    /// confirming read began; `i64::MIN` before the first.
    confirmed_micros: AtomicI64,
    last_applied: AtomicI64,
    staleness_bound: Duration,
}

impl FeedHealth {
    pub(crate) fn new(staleness_bound: Duration) -> Self {
        Self {
            following: AtomicBool::new(false),
            confirmed_micros: AtomicI64::new(i64::MIN),
            last_applied: AtomicI64::new(0),
            staleness_bound,
        }
    }

    /// Whether cached entries may be trusted at `now`: the lease, that is
    /// the last confirmation of the cache, is younger than the bound.
    pub fn cache_trusted(&self, now: OffsetDateTime) -> bool {
        let age = micros(now).saturating_sub(self.confirmed_micros.load(Ordering::Acquire));
        u128::try_from(age).unwrap_or(0) < self.staleness_bound.as_micros()
    }

    /// How long ago the cache was last confirmed current; `None` before
    /// the first confirmation.
    pub fn lease_age(&self, now: OffsetDateTime) -> Option<Duration> {
        let confirmed = self.confirmed_micros.load(Ordering::Acquire);
        (confirmed != i64::MIN).then(|| {
            Duration::from_micros(u64::try_from(micros(now).saturating_sub(confirmed)).unwrap_or(0))
        })
    }

    /// Whether new loads may be cached: only while changes are being
    /// applied, so that nothing enters the cache that a missed change
    /// could make stale.
    pub fn following(&self) -> bool {
        self.following.load(Ordering::Acquire)
    }

    /// The last change-log sequence number applied to the cache.
    pub fn last_applied(&self) -> i64 {
        self.last_applied.load(Ordering::Acquire)
    }

    /// Renews the lease: every change committed before `read_began` has
    /// been applied.
    fn confirm(&self, read_began: OffsetDateTime) {
        self.confirmed_micros
            .fetch_max(micros(read_began), Ordering::AcqRel);
    }

    /// Returns whether this changes the state (for logging transitions).
    fn set_following(&self, following: bool) -> bool {
        self.following.swap(following, Ordering::AcqRel) != following
    }
}

fn micros(at: OffsetDateTime) -> i64 {
    (at.unix_timestamp_nanos() / 1_000) as i64
}

/// A prefix changed, whoever says so (the change feed, or the node's own
/// admin API): its cached answer is stale, and it exists.
pub(crate) fn note_change(cache: &KeyCache, known: &KnownPrefixes, prefix: &KeyPrefix) {
    cache.invalidate(prefix);
    known.insert(prefix);
}

/// Applies the store's change log to one node's cache.
pub(crate) struct Follower {
    pub store: Arc<dyn KeySource>,
    pub cache: Arc<KeyCache>,
    pub known: Arc<KnownPrefixes>,
    pub health: Arc<FeedHealth>,
    pub clock: Arc<dyn Clock>,
    pub config: FeedConfig,
}

impl Follower {
    /// Notes where the change log stands: everything before it is already
    /// reflected in whatever the cache will load. The first confirmation.
    pub async fn start_at(&self) -> Result<(), VerifyError> {
        let began = self.clock.now();
        let seq = self.within(self.store.change_sequence()).await?;
        self.health.last_applied.store(seq, Ordering::Release);
        self.health.confirm(began);
        Ok(())
    }

    /// Follows until `shutdown` resolves.
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()>) {
        tokio::select! {
            () = shutdown => {}
            never = self.follow() => match never {},
        }
    }

    /// Follows for ever: pushed changes while the store's listener works,
    /// the change log polled through the pool while it does not.
    async fn follow(&self) -> Infallible {
        loop {
            let Some(listener) = self.subscribe_while_polling().await else {
                // No push channel (SQLite): polling is the feed.
                return self.poll(self.config.poll_interval).await;
            };
            let Err(e) = self.follow_pushed(listener).await;
            self.health.set_following(false);
            tracing::warn!(
                error = %e,
                poll_ms = self.config.fallback_poll_interval.as_millis() as u64,
                "change listener down: polling the change log instead"
            );
        }
    }

    /// Subscribes, retrying, and polls the change log through the pool
    /// meanwhile. `None`: the store has no push channel.
    async fn subscribe_while_polling(&self) -> Option<Box<dyn ChangeListener>> {
        let subscribe = async {
            let mut failures = 0u64;
            loop {
                match self.within(self.store.listen()).await {
                    Ok(listener) => return listener,
                    Err(e) => {
                        failures += 1;
                        // The first failure and then one in a hundred:
                        // polling keeps the node current meanwhile.
                        if failures % 100 == 1 {
                            tracing::warn!(error = %e, failures, "cannot subscribe to the change feed");
                        }
                    }
                }
                tokio::time::sleep(self.config.retry_interval).await;
            }
        };
        tokio::select! {
            listener = subscribe => listener,
            never = self.poll(self.config.fallback_poll_interval) => match never {},
        }
    }

    /// Follows pushed changes until the listener or a consistency check
    /// fails.
    async fn follow_pushed(
        &self,
        mut listener: Box<dyn ChangeListener>,
    ) -> Result<Infallible, VerifyError> {
        // Subscribed first, then caught up: nothing falls between the two.
        self.confirm_by_catching_up().await?;
        self.health.set_following(true);
        tracing::info!(
            change.seq = self.health.last_applied(),
            "following the change feed"
        );
        let mut check = tokio::time::interval(self.config.consistency_check_interval);
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                change = listener.next() => {
                    let (seq, prefix) = change?;
                    self.apply(seq, &prefix).await?;
                }
                _ = check.tick() => self.check().await?,
            }
        }
    }

    /// Reads the store's change sequence: catches up when the store is
    /// ahead (a notification lost without the connection breaking), and
    /// renews the lease.
    async fn check(&self) -> Result<(), VerifyError> {
        let began = self.clock.now();
        if self.within(self.store.change_sequence()).await? > self.health.last_applied() {
            self.within(self.catch_up()).await?;
        }
        self.health.confirm(began);
        self.reload_known_prefixes().await;
        Ok(())
    }

    /// Polls the change log every `interval` for ever, renewing the lease
    /// with each poll that completes.
    async fn poll(&self, interval: Duration) -> Infallible {
        let mut poll = tokio::time::interval(interval);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            poll.tick().await;
            match self.confirm_by_catching_up().await {
                Ok(()) => {
                    if self.health.set_following(true) {
                        tracing::info!(
                            change.seq = self.health.last_applied(),
                            poll_ms = interval.as_millis() as u64,
                            "following the change log by polling"
                        );
                    }
                }
                Err(e) => {
                    if self.health.set_following(false) {
                        tracing::warn!(
                            error = %e,
                            "cannot read the change log: cached keys are trusted for the staleness bound only"
                        );
                    }
                }
            }
        }
    }

    /// Catches up within the deadline, then renews the lease as of when
    /// the read began: the log held nothing more then.
    async fn confirm_by_catching_up(&self) -> Result<(), VerifyError> {
        let began = self.clock.now();
        self.within(self.catch_up()).await?;
        self.health.confirm(began);
        self.reload_known_prefixes().await;
        Ok(())
    }

    /// One pushed change: evict it, or catch up if some were skipped.
    async fn apply(&self, seq: i64, prefix: &KeyPrefix) -> Result<(), VerifyError> {
        let last = self.health.last_applied();
        if seq <= last {
            return Ok(()); // already applied by a catch-up
        }
        if seq > last + 1 {
            return self.within(self.catch_up()).await;
        }
        self.note_change(prefix);
        self.health.last_applied.store(seq, Ordering::Release);
        Ok(())
    }

    fn note_change(&self, prefix: &KeyPrefix) {
        note_change(&self.cache, &self.known, prefix);
    }

    /// Evicts every prefix changed since the last applied change.
    async fn catch_up(&self) -> Result<(), StoreError> {
        loop {
            let changes = match self
                .store
                .changes_since(self.health.last_applied(), CATCH_UP_PAGE)
                .await
            {
                Err(StoreError::ChangesPruned { pruned_through }) => {
                    return self.start_over(pruned_through).await;
                }
                changes => changes?,
            };
            let Some((last, _)) = changes.last() else {
                return Ok(());
            };
            let last = *last;
            for (_, prefix) in &changes {
                self.note_change(prefix);
            }
            self.health.last_applied.store(last, Ordering::Release);
            if changes.len() < CATCH_UP_PAGE as usize {
                return Ok(());
            }
        }
    }

    /// The changes missed were pruned from the log (the node was cut off
    /// for longer than the log's retention): forget the whole cache and
    /// every known prefix, reload the prefixes, and follow on from where
    /// the log stands now.
    async fn start_over(&self, pruned_through: i64) -> Result<(), StoreError> {
        // Read first: a change committed after this read is caught up
        // from it; one before it is covered by the clear and the reload.
        let seq = self.store.change_sequence().await?;
        self.cache.clear();
        tracing::warn!(
            change.seq = self.health.last_applied(),
            change.pruned_through = pruned_through,
            "missed changes were pruned from the change log: cache cleared"
        );
        self.health.last_applied.store(seq, Ordering::Release);
        // Some of the missed changes may have created keys: the set of
        // known prefixes is no longer complete. Until the follower has
        // reloaded it, unknown prefixes are looked up in the store.
        self.known.reset();
        Ok(())
    }

    /// Reloads the known prefixes when they are incomplete (changes were
    /// pruned, or loading failed), outside the deadline of one read.
    async fn reload_known_prefixes(&self) {
        if self.known.complete() {
            return;
        }
        let deadline = self.config.deadline * RELOAD_DEADLINES;
        match tokio::time::timeout(deadline, self.known.load(self.store.as_ref())).await {
            Ok(Ok(count)) => tracing::info!(prefixes = count, "known prefixes reloaded"),
            Ok(Err(e)) => tracing::warn!(error = %e, "cannot reload the known prefixes"),
            Err(_) => tracing::warn!(?deadline, "reloading the known prefixes timed out"),
        }
    }

    /// `call` within the feed's deadline; past it, the store counts as
    /// down (a hung database or a silent partition).
    async fn within<T>(
        &self,
        call: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, VerifyError> {
        match tokio::time::timeout(self.config.deadline, call).await {
            Ok(answer) => Ok(answer?),
            Err(_) => Err(VerifyError::FeedTimeout {
                timeout: self.config.deadline,
            }),
        }
    }
}

//! Following the store's change log, so that every node evicts a changed
//! key at once and knows when it cannot be sure of its cache.
//!
//! Postgres pushes each change (`LISTEN`); SQLite is polled. Either way the
//! follower remembers the last sequence number it applied. On every
//! (re)connection, after a gap in the pushed sequence, and whenever the
//! periodic consistency check finds the store ahead, it reads every change
//! since then from the log and evicts those prefixes before trusting the
//! cache again; if those changes were already pruned from the log, it
//! clears the whole cache instead. While it cannot follow, [`FeedHealth`]
//! records since when, and the verifier stops trusting cached entries once
//! that is longer ago than the configured staleness bound.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::Duration;

use time::OffsetDateTime;
use vilvik_keys_domain::{Clock, KeyPrefix};
use vilvik_keys_store::{ChangeListener, KeySource, StoreError};

use crate::cache::KeyCache;

/// Changes read per catch-up query.
const CATCH_UP_PAGE: u32 = 1_000;

/// How the follower runs.
#[derive(Debug, Clone, Copy)]
pub struct FeedConfig {
    /// How long cached entries stay trusted while the feed is down; zero
    /// stops trusting them at once.
    pub staleness_bound: Duration,
    /// How often the node compares its last applied change with the store's.
    pub consistency_check_interval: Duration,
    /// How often a backend without push (SQLite) is polled for changes.
    pub poll_interval: Duration,
    /// Wait before reconnecting after the feed failed.
    pub retry_interval: Duration,
}

impl Default for FeedConfig {
    fn default() -> Self {
        Self {
            staleness_bound: Duration::from_secs(30),
            consistency_check_interval: Duration::from_secs(1),
            poll_interval: Duration::from_millis(50),
            retry_interval: Duration::from_millis(500),
        }
    }
}

/// Whether the node is following the change log, and since when it is not.
#[derive(Debug)]
pub struct FeedHealth {
    following: AtomicBool,
    /// Unix microseconds (from the verifier's clock) since the feed is down.
    down_since_micros: AtomicI64,
    last_applied: AtomicI64,
    staleness_bound: Duration,
}

impl FeedHealth {
    pub(crate) fn new(staleness_bound: Duration, now: OffsetDateTime) -> Self {
        Self {
            following: AtomicBool::new(false),
            down_since_micros: AtomicI64::new(micros(now)),
            last_applied: AtomicI64::new(0),
            staleness_bound,
        }
    }

    /// Whether cached entries may be trusted at `now`.
    pub fn cache_trusted(&self, now: OffsetDateTime) -> bool {
        if self.following.load(Ordering::Acquire) {
            return true;
        }
        let down_for = micros(now).saturating_sub(self.down_since_micros.load(Ordering::Acquire));
        u128::try_from(down_for).unwrap_or(0) < self.staleness_bound.as_micros()
    }

    /// Whether new loads may be cached: only while following, so that
    /// nothing enters the cache that a missed change could make stale.
    pub fn following(&self) -> bool {
        self.following.load(Ordering::Acquire)
    }

    /// The last change-log sequence number applied to the cache.
    pub fn last_applied(&self) -> i64 {
        self.last_applied.load(Ordering::Acquire)
    }

    fn mark_following(&self) {
        self.following.store(true, Ordering::Release);
    }

    fn mark_down(&self, now: OffsetDateTime) {
        if self.following.swap(false, Ordering::AcqRel) {
            self.down_since_micros.store(micros(now), Ordering::Release);
        }
    }
}

fn micros(at: OffsetDateTime) -> i64 {
    (at.unix_timestamp_nanos() / 1_000) as i64
}

/// Applies the store's change log to one node's cache.
pub(crate) struct Follower {
    pub store: Arc<dyn KeySource>,
    pub cache: Arc<KeyCache>,
    pub health: Arc<FeedHealth>,
    pub clock: Arc<dyn Clock>,
    pub config: FeedConfig,
}

impl Follower {
    /// The sequence number to start from: everything before it is already
    /// reflected in whatever the cache will load.
    pub async fn start_at(&self) -> Result<(), StoreError> {
        let seq = self.store.change_sequence().await?;
        self.health.last_applied.store(seq, Ordering::Release);
        Ok(())
    }

    /// Follows until `shutdown` resolves.
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()>) {
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => return,
                outcome = self.follow_once() => {
                    self.health.mark_down(self.clock.now());
                    if let Err(e) = outcome {
                        tracing::warn!(error = %e, "change feed down: cached keys are trusted for the staleness bound only");
                    }
                }
            }
            tokio::select! {
                () = &mut shutdown => return,
                () = tokio::time::sleep(self.config.retry_interval) => {}
            }
        }
    }

    /// Subscribes, catches up, and follows until something fails.
    async fn follow_once(&self) -> Result<(), StoreError> {
        match self.store.listen().await? {
            Some(listener) => self.follow_pushed(listener).await,
            None => self.follow_polled().await,
        }
    }

    async fn follow_pushed(&self, mut listener: Box<dyn ChangeListener>) -> Result<(), StoreError> {
        // Subscribed first, then caught up: nothing falls between the two.
        self.catch_up().await?;
        self.health.mark_following();
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
                _ = check.tick() => {
                    // A safety net for a notification lost without the
                    // connection breaking.
                    if self.store.change_sequence().await? > self.health.last_applied() {
                        self.catch_up().await?;
                    }
                }
            }
        }
    }

    async fn follow_polled(&self) -> Result<(), StoreError> {
        let mut poll = tokio::time::interval(self.config.poll_interval);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            poll.tick().await;
            self.catch_up().await?;
            self.health.mark_following();
        }
    }

    /// One pushed change: evict it, or catch up if some were skipped.
    async fn apply(&self, seq: i64, prefix: &KeyPrefix) -> Result<(), StoreError> {
        let last = self.health.last_applied();
        if seq <= last {
            return Ok(()); // already applied by a catch-up
        }
        if seq > last + 1 {
            return self.catch_up().await;
        }
        self.cache.invalidate(prefix);
        self.health.last_applied.store(seq, Ordering::Release);
        Ok(())
    }

    /// Evicts every prefix changed since the last applied change.
    pub async fn catch_up(&self) -> Result<(), StoreError> {
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
                self.cache.invalidate(prefix);
            }
            self.health.last_applied.store(last, Ordering::Release);
            if changes.len() < CATCH_UP_PAGE as usize {
                return Ok(());
            }
        }
    }

    /// The changes missed were pruned from the log (the node was cut off
    /// for longer than the log's retention): forget the whole cache and
    /// follow on from where the log stands now.
    async fn start_over(&self, pruned_through: i64) -> Result<(), StoreError> {
        // Read first: a change committed after this read is caught up
        // from it; one before it is covered by the clear.
        let seq = self.store.change_sequence().await?;
        self.cache.clear();
        tracing::warn!(
            change.seq = self.health.last_applied(),
            change.pruned_through = pruned_through,
            "missed changes were pruned from the change log: cache cleared"
        );
        self.health.last_applied.store(seq, Ordering::Release);
        Ok(())
    }
}

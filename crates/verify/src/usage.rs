//! Write-behind of `last_used_at` / `last_used_ip`.
//!
//! Verifies only touch an in-memory map (latest use per key); a background
//! task writes the map to the store in one batch per interval. The map is
//! bounded: past `max_pending` distinct keys (spread over its shards), uses
//! of further keys are dropped until the next flush; a key used again after
//! it is recorded then.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use time::OffsetDateTime;
use vilvik_keys_domain::KeyId;
use vilvik_keys_store::{Store, UsageRecord};

#[derive(Debug, Clone, Copy)]
pub struct UsageConfig {
    /// How often pending uses are written.
    pub flush_interval: Duration,
    /// Most distinct keys held between flushes.
    pub max_pending: usize,
}

impl Default for UsageConfig {
    fn default() -> Self {
        Self {
            flush_interval: Duration::from_secs(1),
            max_pending: 100_000,
        }
    }
}

/// Shards of the pending map, so that concurrent verifies of different keys
/// rarely wait on one lock.
const SHARDS: usize = 16;

/// The latest use of one key, as held until the next flush.
#[derive(Debug, Clone, Copy)]
struct LatestUse {
    at: OffsetDateTime,
    ip: Option<IpAddr>,
}

type Pending = Mutex<HashMap<KeyId, LatestUse>>;

/// Collects uses and writes them in batches. Cheap to clone; clones share
/// one buffer.
#[derive(Debug, Clone)]
pub struct UsageRecorder {
    pending: Arc<[Pending]>,
    store: Arc<dyn Store>,
    config: UsageConfig,
}

fn shard_of(key_id: &KeyId) -> usize {
    // Key ids end in random characters.
    key_id.as_str().bytes().last().map_or(0, usize::from) % SHARDS
}

impl UsageRecorder {
    pub fn new(store: Arc<dyn Store>, config: UsageConfig) -> Self {
        Self {
            pending: (0..SHARDS).map(|_| Pending::default()).collect(),
            store,
            config,
        }
    }

    /// Notes a use of `key_id` at `at` from `ip`; never blocks on I/O, and
    /// allocates only for a key not yet pending.
    pub fn record(&self, key_id: &KeyId, at: OffsetDateTime, ip: Option<IpAddr>) {
        let mut pending = self.pending[shard_of(key_id)]
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let full = pending.len() >= self.config.max_pending.div_ceil(SHARDS);
        match pending.get_mut(key_id) {
            Some(existing) if existing.at <= at => {
                existing.at = at;
                existing.ip = ip;
            }
            Some(_) => {}
            None if full => {}
            None => {
                pending.insert(key_id.clone(), LatestUse { at, ip });
            }
        }
    }

    /// Writes everything pending. On failure the batch is put back (newer
    /// uses recorded meanwhile win) and the error returned, so the next
    /// flush retries.
    pub async fn flush(&self) -> Result<usize, vilvik_keys_store::StoreError> {
        let drained: Vec<(KeyId, LatestUse)> = self
            .pending
            .iter()
            .flat_map(|shard| {
                let mut pending = shard.lock().unwrap_or_else(|p| p.into_inner());
                pending.drain().collect::<Vec<_>>()
            })
            .collect();
        if drained.is_empty() {
            return Ok(0);
        }
        let batch: Vec<UsageRecord> = drained
            .iter()
            .map(|(key_id, latest)| UsageRecord {
                key_id: key_id.clone(),
                at: latest.at,
                ip: latest.ip.map(|ip| ip.to_string()),
            })
            .collect();
        match self.store.record_usage(&batch).await {
            Ok(()) => Ok(batch.len()),
            Err(e) => {
                for (key_id, latest) in drained {
                    self.record(&key_id, latest.at, latest.ip);
                }
                Err(e)
            }
        }
    }

    /// Flushes every interval until `shutdown` resolves, then once more.
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()>) {
        let mut ticker = tokio::time::interval(self.config.flush_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = ticker.tick() => self.flush_logging().await,
                () = &mut shutdown => break,
            }
        }
        self.flush_logging().await;
    }

    async fn flush_logging(&self) {
        match self.flush().await {
            Ok(0) => {}
            Ok(n) => tracing::debug!(usage.keys = n, "flushed key usage"),
            Err(e) => {
                tracing::warn!(error = %e, "could not write key usage; will retry at the next flush")
            }
        }
    }
}

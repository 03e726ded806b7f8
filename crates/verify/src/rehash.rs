//! Write-behind of re-hashes: a key that verified under an older pepper
//! (or with a legacy unkeyed hash) gets its stored hash replaced by one
//! keyed with the current pepper, so that the old pepper can be retired.
//!
//! A verify only notes the re-hash in a bounded map (at most one per
//! prefix, so the second hash is computed once per key and flush, not
//! once per verify); a background task writes the map in one store call
//! per interval, like usage. Each write is conditional on the stored hash
//! and pepper id being the ones replaced ([`KeySource::rehash_secrets`]),
//! so it never undoes a concurrent change and two nodes doing the same
//! re-hash write it once. Afterwards the node's cached entry is brought up
//! to date in place; an entry whose re-hash did not apply (another node
//! was first) is evicted, so the next verify reads the stored hash. The
//! store's change log is not involved: other nodes' entries keep verifying
//! under the old pepper while it is configured, and move themselves the
//! same way. A failed write is dropped, not retried: the entry still
//! names the old pepper, so the key's next verify notes it again.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use vilvik_keys_domain::{ApiKey, KeyPrefix, Pepper, PepperId, SecretHash};
use vilvik_keys_store::{KeySource, Rehash, StoreError};

use crate::cache::KeyCache;

/// How re-hashes are written.
#[derive(Debug, Clone, Copy)]
pub struct RehashConfig {
    /// How often noted re-hashes are written.
    pub flush_interval: Duration,
    /// Most re-hashes noted between flushes; past it, further keys are
    /// noted again at a later verify.
    pub max_pending: usize,
}

impl Default for RehashConfig {
    fn default() -> Self {
        Self {
            flush_interval: Duration::from_secs(1),
            max_pending: 10_000,
        }
    }
}

/// Shards of the pending map: verifies of different old keys rarely wait
/// on one lock.
const SHARDS: usize = 16;

/// Keyed by the packed prefix; prefixes are server-generated, so a fast
/// hash is safe.
type Pending = Mutex<HashMap<u64, Rehash, foldhash::fast::RandomState>>;

pub(crate) struct Rehasher {
    pending: Box<[Pending]>,
    config: RehashConfig,
}

impl std::fmt::Debug for Rehasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rehasher")
            .field("pending", &self.pending_count())
            .field("config", &self.config)
            .finish()
    }
}

impl Rehasher {
    pub fn new(config: RehashConfig) -> Self {
        Self {
            pending: (0..SHARDS).map(|_| Pending::default()).collect(),
            config,
        }
    }

    /// Notes that `key`, whose secret matched the stored `old_hash` under
    /// `old_pepper_id`, is to be re-hashed with `current`. Never blocks on
    /// I/O; hashes only for a key not yet noted.
    pub fn note(
        &self,
        key: &ApiKey,
        old_hash: SecretHash,
        old_pepper_id: Option<PepperId>,
        current: &Pepper,
    ) {
        let packed = key.prefix().packed();
        let mut pending = self.pending[(packed % SHARDS as u64) as usize]
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if pending.contains_key(&packed)
            || pending.len() >= self.config.max_pending.div_ceil(SHARDS)
        {
            return;
        }
        pending.insert(
            packed,
            Rehash {
                prefix: key.prefix().clone(),
                old_hash,
                old_pepper_id,
                new_hash: key.hash_with(Some(current)),
                new_pepper_id: current.id(),
            },
        );
    }

    pub fn pending_count(&self) -> usize {
        self.pending
            .iter()
            .map(|shard| shard.lock().unwrap_or_else(|p| p.into_inner()).len())
            .sum()
    }

    fn take(&self) -> Vec<Rehash> {
        self.pending
            .iter()
            .flat_map(|shard| {
                let mut pending = shard.lock().unwrap_or_else(|p| p.into_inner());
                pending.drain().map(|(_, r)| r).collect::<Vec<_>>()
            })
            .collect()
    }

    /// Writes everything noted, then updates (or, where another writer
    /// was first, evicts) the cached entries. Returns how many secrets were
    /// re-hashed. On failure the batch is dropped (see the module docs).
    pub async fn flush(
        &self,
        store: &dyn KeySource,
        cache: &KeyCache,
    ) -> Result<usize, StoreError> {
        let batch = self.take();
        if batch.is_empty() {
            return Ok(0);
        }
        let done = store.rehash_secrets(&batch).await?;
        let done: std::collections::HashSet<&KeyPrefix> = done.iter().collect();
        for r in &batch {
            let new = done
                .contains(&r.prefix)
                .then_some((r.new_hash, r.new_pepper_id));
            cache.rehashed(&r.prefix, (r.old_hash, r.old_pepper_id), new);
        }
        Ok(done.len())
    }

    pub fn flush_interval(&self) -> Duration {
        self.config.flush_interval
    }
}

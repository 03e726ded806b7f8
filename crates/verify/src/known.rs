//! The prefixes this node knows: every prefix the store holds a secret
//! under, and every prefix a change named since, so that a well-formed key
//! whose prefix is not among them is answered NOT_FOUND without touching
//! the store (anyone can make well-formed keys: the checksum is public).
//!
//! Each prefix packs into a `u64`; the set keeps them in sorted vectors,
//! sharded by prefix so that an insert moves a few kilobytes at most: 8
//! bytes a key after loading, at most 16 while inserts grow a shard. It is
//! loaded whole by streaming the stored secrets' prefixes (or from the
//! preload's entries) and kept current by the change feed and the admin
//! API's own changes (a new key's prefix is named by its change). Prefixes
//! are only added: one whose secret the store deleted since (a pruned
//! rotated-away secret) stays until the next load, and costs a lookup that
//! finds nothing. Until a load completes the set is incomplete and says
//! nothing: callers look the prefix up in the store instead.

use std::sync::RwLock;
use std::sync::atomic::{AtomicBool, Ordering};

use vilvik_keys_domain::KeyPrefix;
use vilvik_keys_store::{KeySource, StoreError};

const SHARDS: usize = 256;
/// Prefixes handed over at a time when loading.
const LOAD_BATCH: usize = 10_000;

#[derive(Default)]
struct Shard {
    /// Sorted and free of duplicates once `sorted`; while a load is under
    /// way, prefixes are only appended and sorted at the end.
    prefixes: Vec<u64>,
    sorted: bool,
}

pub(crate) struct KnownPrefixes {
    shards: Box<[RwLock<Shard>]>,
    complete: AtomicBool,
}

impl std::fmt::Debug for KnownPrefixes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KnownPrefixes")
            .field("complete", &self.complete())
            .field("len", &self.len())
            .finish()
    }
}

fn shard_of(packed: u64) -> usize {
    (packed % SHARDS as u64) as usize
}

impl Default for KnownPrefixes {
    fn default() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| RwLock::default()).collect(),
            complete: AtomicBool::new(false),
        }
    }
}

impl KnownPrefixes {
    /// Whether the set holds every prefix the store held when it was
    /// loaded, plus every change seen since.
    pub fn complete(&self) -> bool {
        self.complete.load(Ordering::Acquire)
    }

    /// `Some(false)` only when the prefix is certainly unknown; `None`
    /// while the set is incomplete.
    pub fn contains(&self, prefix: &KeyPrefix) -> Option<bool> {
        if !self.complete() {
            return None;
        }
        let packed = prefix.packed();
        let shard = self.shards[shard_of(packed)]
            .read()
            .unwrap_or_else(|p| p.into_inner());
        Some(shard.prefixes.binary_search(&packed).is_ok())
    }

    /// Adds a prefix that exists (a change to it was seen, or it was
    /// loaded).
    pub fn insert(&self, prefix: &KeyPrefix) {
        let packed = prefix.packed();
        let mut shard = self.shards[shard_of(packed)]
            .write()
            .unwrap_or_else(|p| p.into_inner());
        if !shard.sorted {
            shard.prefixes.push(packed);
        } else if let Err(at) = shard.prefixes.binary_search(&packed) {
            shard.prefixes.insert(at, packed);
        }
    }

    /// Forgets every prefix and marks the set incomplete, e.g. when missed
    /// changes were pruned from the change log.
    pub fn reset(&self) {
        self.complete.store(false, Ordering::Release);
        for shard in self.shards.iter() {
            let mut shard = shard.write().unwrap_or_else(|p| p.into_inner());
            shard.prefixes = Vec::new();
            shard.sorted = false;
        }
    }

    /// Adds prefixes while a load is under way (see [`KnownPrefixes::reset`]
    /// and [`KnownPrefixes::finish`]); one write lock per shard per call.
    pub fn extend(&self, prefixes: impl IntoIterator<Item = u64>) {
        let mut by_shard: Vec<Vec<u64>> = (0..SHARDS).map(|_| Vec::new()).collect();
        for packed in prefixes {
            by_shard[shard_of(packed)].push(packed);
        }
        for (index, batch) in by_shard.into_iter().enumerate() {
            if batch.is_empty() {
                continue;
            }
            let mut shard = self.shards[index]
                .write()
                .unwrap_or_else(|p| p.into_inner());
            shard.prefixes.extend_from_slice(&batch);
            if shard.sorted {
                shard.prefixes.sort_unstable();
                shard.prefixes.dedup();
            }
        }
    }

    /// Ends a load: sorts every shard, drops duplicates and spare room, and
    /// marks the set complete.
    pub fn finish(&self) {
        for shard in self.shards.iter() {
            let mut shard = shard.write().unwrap_or_else(|p| p.into_inner());
            shard.prefixes.sort_unstable();
            shard.prefixes.dedup();
            shard.prefixes.shrink_to_fit();
            shard.sorted = true;
        }
        self.complete.store(true, Ordering::Release);
    }

    /// Loads every prefix from the store: reset, stream, finish. Changes
    /// inserted meanwhile are kept. On an error the set stays incomplete.
    pub async fn load(&self, store: &dyn KeySource) -> Result<usize, StoreError> {
        self.reset();
        let count = store
            .stream_prefixes(LOAD_BATCH, &mut |prefixes| {
                self.extend(prefixes.iter().map(KeyPrefix::packed))
            })
            .await?;
        self.finish();
        Ok(count)
    }

    /// Number of prefixes held.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.read().unwrap_or_else(|p| p.into_inner()).prefixes.len())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `n`th of a few thousand distinct random prefixes.
    fn prefix(n: u64) -> KeyPrefix {
        static PREFIXES: std::sync::LazyLock<Vec<KeyPrefix>> = std::sync::LazyLock::new(|| {
            let pepper = vilvik_keys_domain::Pepper::generate();
            let mut all: Vec<KeyPrefix> = (0..8_000)
                .map(|_| {
                    vilvik_keys_domain::GeneratedKey::generate(&pepper)
                        .prefix()
                        .clone()
                })
                .collect();
            all.sort_by_key(KeyPrefix::packed);
            all.dedup_by_key(|p| p.packed());
            all
        });
        PREFIXES[n as usize].clone()
    }

    #[test]
    fn an_incomplete_set_says_nothing() {
        let known = KnownPrefixes::default();
        known.insert(&prefix(1));
        assert_eq!(known.contains(&prefix(1)), None);
        assert_eq!(known.contains(&prefix(2)), None);
    }

    #[test]
    fn a_loaded_set_knows_what_was_loaded_and_inserted_since() {
        let known = KnownPrefixes::default();
        known.extend((0..1_000).map(|n| prefix(n * 7).packed()));
        known.insert(&prefix(3)); // a change seen while loading
        known.extend([prefix(7).packed()]); // a duplicate
        known.finish();
        assert_eq!(known.len(), 1_001);
        assert_eq!(known.contains(&prefix(7)), Some(true));
        assert_eq!(known.contains(&prefix(3)), Some(true));
        assert_eq!(known.contains(&prefix(8)), Some(false));
        known.insert(&prefix(8));
        known.insert(&prefix(8));
        assert_eq!(known.contains(&prefix(8)), Some(true));
        assert_eq!(known.len(), 1_002);
    }

    #[test]
    fn a_reset_set_is_incomplete_and_empty() {
        let known = KnownPrefixes::default();
        known.extend([prefix(1).packed()]);
        known.finish();
        known.reset();
        assert_eq!(known.contains(&prefix(1)), None);
        assert_eq!(known.len(), 0);
    }
}

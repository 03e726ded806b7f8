//! The verify engine: decides whether a presented key is good and records
//! that it was used.
//!
//! [`Verifier::verify`] checks the format and checksum first (a malformed
//! key costs no store access), then finds the secret by its public prefix
//! in an in-memory index, compares hashes in constant time, and checks
//! rotation, revocation, expiry and scopes, in that order. A hit touches no
//! database. A miss loads the prefix from the store once, however many
//! requests ask for it at the same time, and caches the answer (unknown
//! prefixes briefly). A prefix no secret was ever issued with is NOT_FOUND
//! without a lookup: every node holds the set of known prefixes
//! (`known.rs`). [`Verifier::follow_changes`] keeps the index honest:
//! every change in the store's change log evicts its prefix, and cached
//! entries are trusted only while the node's last confirmed read of the
//! log is younger than the staleness bound (see `feed.rs`). Uses are coalesced in memory by
//! [`UsageRecorder`] and written in batches, never one write per verify.
//!
//! This crate knows nothing of gRPC: the server maps [`Verdict`] to the
//! wire format. Both the public `KeyVerify` service and the admin API's
//! management-key authentication go through here.
#![forbid(unsafe_code)]

mod cache;
mod feed;
mod known;
mod usage;

use std::sync::Arc;

use time::OffsetDateTime;
use vilvik_keys_domain::{
    AccountId, ApiKey, Clock, KeyFormatError, KeyId, KeyName, KeyPrefix, Scope, ScopeSet,
    SecretHash,
};
use vilvik_keys_store::{KeySource, OutageKind, SecretRecord, StoreError};

use crate::cache::{Cached, CachedSecret, KeyCache};
use crate::feed::Follower;
use crate::known::KnownPrefixes;

pub use cache::CacheConfig;
pub use feed::{FeedConfig, FeedHealth};
pub use usage::{UsageConfig, UsageRecorder};

/// Secrets handed to the cache at a time when warming it.
const PRELOAD_BATCH: usize = 10_000;

/// What a presented secret is compared against when its prefix is unknown,
/// so that an unknown prefix costs the same hash and comparison as a known
/// one with a wrong secret: timing tells no prefix apart.
const DUMMY_HASH: SecretHash = SecretHash::from_bytes([0x5a; 32]);

/// What is known about a key whose secret matched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedKey {
    pub key_id: KeyId,
    pub account_id: AccountId,
    pub name: KeyName,
    pub scopes: Arc<ScopeSet>,
    pub expires_at: Option<OffsetDateTime>,
}

/// The answer to "is this key good for these scopes?".
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Valid(VerifiedKey),
    /// Not a key at all, or mistyped; no lookup was made.
    Malformed(KeyFormatError),
    /// No key has this secret.
    NotFound,
    Expired(VerifiedKey),
    Revoked(VerifiedKey),
    /// An old secret of a key that has since been rotated.
    Rotated(VerifiedKey),
    InsufficientScope {
        key: VerifiedKey,
        missing: Vec<Scope>,
    },
}

impl Verdict {
    pub fn is_valid(&self) -> bool {
        matches!(self, Verdict::Valid(_))
    }
}

/// A key the index could not answer for: read the store, and cache the
/// answer only when `cache` (the change feed is being followed).
struct Miss {
    key: ApiKey,
    cache: bool,
}

/// How a verifier caches and follows changes.
#[derive(Debug, Clone, Copy, Default)]
pub struct VerifierConfig {
    pub cache: CacheConfig,
    pub feed: FeedConfig,
    pub misses: MissConfig,
}

/// The bulkhead between misses and hits: store lookups for keys not in
/// memory have a budget of their own, so that a slow store or a flood of
/// unknown keys makes misses fail fast instead of holding the listener's
/// concurrency that hits need.
#[derive(Debug, Clone, Copy)]
pub struct MissConfig {
    /// Store lookups in progress at once; a miss beyond that answers
    /// UNAVAILABLE at once.
    pub concurrency: usize,
    /// How long one lookup may take before it answers UNAVAILABLE.
    pub timeout: std::time::Duration,
}

impl Default for MissConfig {
    fn default() -> Self {
        Self {
            concurrency: 64,
            timeout: std::time::Duration::from_secs(1),
        }
    }
}

/// Answers verify requests from memory, the store behind it, and feeds the
/// usage recorder. Cheap to clone: clones share the index.
#[derive(Debug, Clone)]
pub struct Verifier {
    store: Arc<dyn KeySource>,
    clock: Arc<dyn Clock>,
    usage: UsageRecorder,
    cache: Arc<KeyCache>,
    known: Arc<KnownPrefixes>,
    health: Arc<FeedHealth>,
    feed: FeedConfig,
    misses: MissConfig,
    /// Permits for store lookups of misses ([`MissConfig::concurrency`]).
    lookups: Arc<tokio::sync::Semaphore>,
}

impl Verifier {
    pub fn new(
        store: Arc<dyn KeySource>,
        clock: Arc<dyn Clock>,
        usage: UsageRecorder,
        config: VerifierConfig,
    ) -> Self {
        let health = Arc::new(FeedHealth::new(config.feed.staleness_bound));
        Self {
            store,
            usage,
            cache: Arc::new(KeyCache::new(config.cache, clock.clone())),
            known: Arc::default(),
            health,
            feed: config.feed,
            misses: config.misses,
            lookups: Arc::new(tokio::sync::Semaphore::new(config.misses.concurrency)),
            clock,
        }
    }

    /// Verifies the `presented` key (its bytes as received) against
    /// `required` scopes. `client_ip` is recorded as the key's last use when
    /// the key is active and matched. Fails only when the answer would need
    /// the store and it is down.
    pub async fn verify(
        &self,
        presented: &[u8],
        required: &[Scope],
        client_ip: Option<std::net::IpAddr>,
    ) -> Result<Verdict, StoreError> {
        let now = self.clock.now();
        let miss = match self.answer_from_memory(presented, required, now) {
            Ok(verdict) => return Ok(self.note_use(verdict, now, client_ip)),
            Err(miss) => miss,
        };
        // Boxed so that the future of a hit, moved several times on its way
        // through the gRPC stack, stays small.
        let verdict = Box::pin(self.load(miss, required, now)).await?;
        Ok(self.note_use(verdict, now, client_ip))
    }

    /// The verdict when memory can give it; otherwise what to load.
    fn answer_from_memory(
        &self,
        presented: &[u8],
        required: &[Scope],
        now: OffsetDateTime,
    ) -> Result<Verdict, Miss> {
        let key = match ApiKey::from_bytes(presented) {
            Ok(key) => key,
            Err(e) => return Ok(Verdict::Malformed(e)),
        };
        if !self.health.cache_trusted(now) {
            // Past the staleness bound only a fresh read of the store counts.
            return Err(Miss { key, cache: false });
        }
        let judge = |entry: &CachedSecret| judge(entry, &key.hash(), required, now);
        match self.cache.with(key.prefix(), judge) {
            Cached::Found(verdict) => Ok(verdict),
            Cached::Absent => Ok(unknown_prefix(&key)),
            Cached::Unknown => match self.known.contains(key.prefix()) {
                Some(false) => Ok(unknown_prefix(&key)),
                Some(true) | None => Err(Miss {
                    cache: self.health.following(),
                    key,
                }),
            },
        }
    }

    /// Reads the missed prefix from the store (once, however many ask at
    /// the same time) and judges it.
    async fn load(
        &self,
        miss: Miss,
        required: &[Scope],
        now: OffsetDateTime,
    ) -> Result<Verdict, StoreError> {
        let prefix = miss.key.prefix();
        let lookup = self
            .cache
            .load(prefix, miss.cache, || self.bounded_lookup(prefix))
            .await?;
        Ok(lookup.as_ref().map_or(Verdict::NotFound, |entry| {
            judge(entry, &miss.key.hash(), required, now)
        }))
    }

    /// A store lookup within the misses' budget and deadline: when every
    /// permit is taken the answer is UNAVAILABLE at once, never a wait.
    async fn bounded_lookup(&self, prefix: &KeyPrefix) -> Result<Option<SecretRecord>, StoreError> {
        let Ok(_permit) = self.lookups.try_acquire() else {
            return Err(StoreError::unavailable(
                OutageKind::LookupsSaturated,
                format!("all {} lookup permits are in use", self.misses.concurrency),
            ));
        };
        tokio::time::timeout(self.misses.timeout, self.store.find_secret(prefix))
            .await
            .unwrap_or_else(|_| {
                Err(StoreError::unavailable(
                    OutageKind::LookupTimeout,
                    format!("no answer within {:?}", self.misses.timeout),
                ))
            })
    }

    /// Records a use of a key whose secret matched and is active.
    fn note_use(
        &self,
        verdict: Verdict,
        now: OffsetDateTime,
        client_ip: Option<std::net::IpAddr>,
    ) -> Verdict {
        if let Verdict::Valid(key) | Verdict::InsufficientScope { key, .. } = &verdict {
            self.usage.record(&key.key_id, now, client_ip);
        }
        verdict
    }

    /// Forgets a prefix's cached answer at once, and notes that the prefix
    /// exists; the admin API calls it after each change it commits, so the
    /// node that served a revocation never accepts the key again, and the
    /// one that served a create knows the key, whatever the change feed's
    /// delay.
    pub fn invalidate(&self, prefix: &KeyPrefix) {
        feed::note_change(&self.cache, &self.known, prefix);
    }

    /// Warms the cache with every secret in the store, streaming, and
    /// learns every prefix from them. Returns how many were loaded. Call
    /// before [`Verifier::follow_changes`] starts; changes made meanwhile
    /// are caught up by it.
    pub async fn preload(&self) -> Result<usize, StoreError> {
        self.known.reset();
        let loaded = self
            .store
            .stream_secrets(PRELOAD_BATCH, &mut |entries| {
                self.known.extend(entries.iter().map(|e| e.prefix.packed()));
                self.cache.insert_entries(entries)
            })
            .await?;
        self.known.finish();
        Ok(loaded)
    }

    /// Loads the set of every known prefix (not needed after
    /// [`Verifier::preload`], which learns them too). Returns how many.
    /// Call at start, after [`Verifier::mark_change_log_position`]; until
    /// it completes, an unknown prefix is looked up in the store.
    pub async fn load_known_prefixes(&self) -> Result<usize, StoreError> {
        self.known.load(self.store.as_ref()).await
    }

    /// Number of prefixes in the set of known prefixes, and whether it is
    /// complete (loaded).
    pub fn known_prefixes(&self) -> (usize, bool) {
        (self.known.len(), self.known.complete())
    }

    /// Notes where the change log stands, so that [`Verifier::follow_changes`]
    /// starts from there. Call at start, before any verify or preload.
    pub async fn mark_change_log_position(&self) -> Result<(), StoreError> {
        self.follower().start_at().await
    }

    /// Follows the store's change log until `shutdown` resolves, evicting
    /// changed prefixes and keeping [`FeedHealth`] current.
    pub async fn follow_changes(&self, shutdown: impl std::future::Future<Output = ()>) {
        self.follower().run(shutdown).await;
    }

    fn follower(&self) -> Follower {
        Follower {
            store: self.store.clone(),
            cache: self.cache.clone(),
            known: self.known.clone(),
            health: self.health.clone(),
            clock: self.clock.clone(),
            config: self.feed,
        }
    }

    pub fn feed_health(&self) -> &FeedHealth {
        &self.health
    }

    /// Number of secrets in the in-memory index.
    pub fn cached_secrets(&self) -> usize {
        self.cache.len()
    }
}

/// The verdict for a key whose prefix no secret has: the same hash and
/// comparison as a wrong secret for a known prefix, then NOT_FOUND.
fn unknown_prefix(key: &ApiKey) -> Verdict {
    std::hint::black_box(DUMMY_HASH.matches(&key.hash()));
    Verdict::NotFound
}

/// The verdict for one presented key against its cached record.
fn judge(
    entry: &CachedSecret,
    hash: &SecretHash,
    required: &[Scope],
    now: OffsetDateTime,
) -> Verdict {
    if !entry.hash.matches(hash) {
        // Right prefix, wrong secret: indistinguishable from unknown.
        return Verdict::NotFound;
    }
    let key = VerifiedKey {
        key_id: entry.key_id.clone(),
        account_id: entry.account_id.clone(),
        name: entry.name.clone(),
        scopes: entry.scopes.clone(),
        expires_at: entry.expires_at.at(),
    };
    if entry.superseded {
        return Verdict::Rotated(key);
    }
    if entry.revoked {
        return Verdict::Revoked(key);
    }
    if entry.expires_at.passed(now) {
        return Verdict::Expired(key);
    }
    let missing: Vec<Scope> = required
        .iter()
        .filter(|needed| !key.scopes.grants_all([*needed]))
        .cloned()
        .collect();
    if !missing.is_empty() {
        return Verdict::InsufficientScope { key, missing };
    }
    Verdict::Valid(key)
}

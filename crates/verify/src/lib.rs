//! The verify engine: decides whether a presented key is good and records
//! that it was used.
//!
//! [`Verifier::verify`] checks the format and checksum first (a malformed
//! key costs no store access), then finds the secret by its public prefix
//! in an in-memory index, compares hashes in constant time, and checks
//! rotation, revocation, expiry and scopes, in that order. The presented
//! key is hashed once, with the pepper its stored hash names; a key that
//! matches under an older pepper, or a legacy unkeyed hash, is re-hashed
//! with the current pepper, written behind like usage (`rehash.rs`). A key
//! whose pepper is not configured any more is NOT_FOUND, like a wrong
//! secret. A hit touches no database. A miss loads the prefix from the
//! store once, however many requests ask for it at the same time, and
//! caches the answer (unknown prefixes briefly). A prefix the node does
//! not know (`known.rs`: every prefix the store holds a secret under, and
//! every one a change named since) is NOT_FOUND without a lookup, once
//! the node has loaded them.
//! [`Verifier::follow_changes`] keeps the index honest: every change in
//! the store's change log evicts its prefix, and cached entries are
//! trusted only while the node's last confirmed read of the log is
//! younger than the staleness bound (see `feed.rs`). Uses are coalesced in
//! memory by [`UsageRecorder`] and written in batches, never one write per
//! verify. Failures are [`VerifyError`]s: the store's, or the engine's own
//! limits on its reads of the store.
//!
//! This crate knows nothing of gRPC: the server maps [`Verdict`] to the
//! wire format. Both the public `KeyVerify` service and the admin API's
//! management-key authentication go through here.
#![forbid(unsafe_code)]

mod cache;
mod error;
mod feed;
mod known;
mod rehash;
mod usage;

use std::sync::Arc;

use time::OffsetDateTime;
use vilvik_keys_domain::{
    AccountId, ApiKey, Clock, KeyFormatError, KeyId, KeyName, KeyPrefix, Pepper, PepperId, Peppers,
    Scope, ScopeSet, SecretHash,
};
use vilvik_keys_store::{KeySource, SecretRecord, StoreError};

use crate::cache::{Cached, CachedSecret, KeyCache};
use crate::feed::Follower;
use crate::known::KnownPrefixes;
use crate::rehash::Rehasher;

pub use cache::CacheConfig;
pub use error::VerifyError;
pub use feed::{FeedConfig, FeedHealth};
pub use rehash::RehashConfig;
pub use usage::{Origin, UsageConfig, UsageRecorder};

/// Secrets handed to the cache at a time when warming it.
const PRELOAD_BATCH: usize = 10_000;

/// What a presented secret is compared against when its prefix is unknown
/// (hashed with the current pepper), so that an unknown prefix costs the
/// same hash and comparison as a known one with a wrong secret: timing
/// tells no prefix apart.
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
    pub rehash: RehashConfig,
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
    /// The current pepper and the older ones still accepted.
    peppers: Arc<Peppers>,
    rehasher: Arc<Rehasher>,
    unknown_peppers: Arc<UnknownPepperLog>,
}

impl Verifier {
    pub fn new(
        store: Arc<dyn KeySource>,
        clock: Arc<dyn Clock>,
        usage: UsageRecorder,
        peppers: Arc<Peppers>,
        config: VerifierConfig,
    ) -> Self {
        let health = Arc::new(FeedHealth::new(config.feed.staleness_bound));
        Self {
            cache: Arc::new(KeyCache::new(
                config.cache,
                clock.clone(),
                Arc::clone(&peppers),
            )),
            store,
            usage,
            peppers,
            rehasher: Arc::new(Rehasher::new(config.rehash)),
            unknown_peppers: Arc::default(),
            known: Arc::default(),
            health,
            feed: config.feed,
            misses: config.misses,
            lookups: Arc::new(tokio::sync::Semaphore::new(config.misses.concurrency)),
            clock,
        }
    }

    /// Verifies the `presented` key (its bytes as received) against
    /// `required` scopes. When the secret matched, the use is recorded with
    /// its `origin`: a VALID answer as the key's last use, any other as a
    /// rejected use. Fails only when the answer would need
    /// the store and it is down, or this node's lookups of it are refused
    /// ([`MissConfig`]).
    pub async fn verify(
        &self,
        presented: &[u8],
        required: &[Scope],
        origin: Origin,
    ) -> Result<Verdict, VerifyError> {
        let now = self.clock.now();
        let miss = match self.answer_from_memory(presented, required, now) {
            Ok(verdict) => return Ok(self.note_use(verdict, now, origin)),
            Err(miss) => miss,
        };
        // Boxed so that the future of a hit, moved several times on its way
        // through the gRPC stack, stays small.
        let verdict = Box::pin(self.load(miss, required, now)).await?;
        Ok(self.note_use(verdict, now, origin))
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
        let judge = |entry: &CachedSecret| judge(entry, &key, &self.peppers, required, now);
        match self.cache.with(key.prefix(), judge) {
            Cached::Found(judged) => Ok(self.follow_up(&key, judged)),
            Cached::Absent => Ok(unknown_prefix(&key, &self.peppers)),
            Cached::Unknown => match self.known.contains(key.prefix()) {
                Some(false) => Ok(unknown_prefix(&key, &self.peppers)),
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
    ) -> Result<Verdict, VerifyError> {
        let prefix = miss.key.prefix();
        let lookup = self
            .cache
            .load(prefix, miss.cache, || self.bounded_lookup(prefix))
            .await?;
        Ok(match lookup.as_ref() {
            Some(entry) => {
                let judged = judge(entry, &miss.key, &self.peppers, required, now);
                self.follow_up(&miss.key, judged)
            }
            None => Verdict::NotFound,
        })
    }

    /// What a judgement leaves to do outside the index's lock: note the
    /// re-hash of a key that matched under an older pepper, or warn of a
    /// key whose pepper is not configured.
    fn follow_up(&self, key: &ApiKey, judged: Judged) -> Verdict {
        match judged.pepper {
            PepperNote::Current => {}
            PepperNote::Stale { hash, pepper_id } => {
                self.rehasher
                    .note(key, hash, pepper_id, self.peppers.current());
            }
            PepperNote::Unknown => self.unknown_peppers.warn(key.prefix()),
        }
        judged.verdict
    }

    /// A store lookup within the misses' budget and deadline: when every
    /// permit is taken the answer is UNAVAILABLE at once, never a wait.
    async fn bounded_lookup(
        &self,
        prefix: &KeyPrefix,
    ) -> Result<Option<SecretRecord>, VerifyError> {
        let Ok(_permit) = self.lookups.try_acquire() else {
            return Err(VerifyError::LookupsSaturated {
                permits: self.misses.concurrency,
            });
        };
        match tokio::time::timeout(self.misses.timeout, self.store.find_secret(prefix)).await {
            Ok(found) => Ok(found?),
            Err(_) => Err(VerifyError::LookupTimeout {
                timeout: self.misses.timeout,
            }),
        }
    }

    /// Records a use of a key whose secret matched: VALID as its last use
    /// (from both addresses), any refusal as a rejected use (from the
    /// observed one: a refused caller's claim is not worth keeping).
    fn note_use(&self, verdict: Verdict, now: OffsetDateTime, origin: Origin) -> Verdict {
        match &verdict {
            Verdict::Valid(key) => self.usage.record(&key.key_id, now, origin),
            Verdict::InsufficientScope { key, .. }
            | Verdict::Expired(key)
            | Verdict::Revoked(key)
            | Verdict::Rotated(key) => {
                self.usage
                    .record_rejected(&key.key_id, now, origin.observed);
            }
            Verdict::Malformed(_) | Verdict::NotFound => {}
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

    /// Whether this node can answer now: its memory is trusted (the lease
    /// is valid), or else the store answers a read within the misses'
    /// deadline. For readiness probes.
    pub async fn can_answer(&self) -> Result<(), VerifyError> {
        if self.health.cache_trusted(self.clock.now()) {
            return Ok(());
        }
        match tokio::time::timeout(self.misses.timeout, self.store.change_sequence()).await {
            Ok(read) => read.map(|_| ()).map_err(VerifyError::Store),
            Err(_) => Err(VerifyError::LookupTimeout {
                timeout: self.misses.timeout,
            }),
        }
    }

    /// Notes where the change log stands, so that [`Verifier::follow_changes`]
    /// starts from there. Call at start, before any verify or preload.
    pub async fn mark_change_log_position(&self) -> Result<(), VerifyError> {
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

    /// The peppers this verifier hashes with; new keys use the current one.
    pub fn peppers(&self) -> &Arc<Peppers> {
        &self.peppers
    }

    /// Writes the re-hashes noted so far (see `rehash.rs`); returns how
    /// many secrets moved to the current pepper.
    pub async fn flush_rehashes(&self) -> Result<usize, StoreError> {
        self.rehasher.flush(self.store.as_ref(), &self.cache).await
    }

    /// How many re-hashes wait to be written.
    pub fn pending_rehashes(&self) -> usize {
        self.rehasher.pending_count()
    }

    /// Writes noted re-hashes every [`RehashConfig::flush_interval`] until
    /// `shutdown` resolves. A failed write is logged and dropped, and so
    /// is whatever is pending (or being written) at shutdown, which never
    /// waits for it: each such key is noted again at its next verify.
    pub async fn write_rehashes(&self, shutdown: impl std::future::Future<Output = ()>) {
        let interval = self.rehasher.flush_interval();
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                () = &mut shutdown => return,
            }
            tokio::select! {
                () = self.flush_rehashes_logging() => {}
                () = &mut shutdown => return,
            }
        }
    }

    async fn flush_rehashes_logging(&self) {
        match self.flush_rehashes().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(
                keys = n,
                pepper.id = %self.peppers.current().id(),
                "re-hashed keys with the current pepper"
            ),
            Err(e) => tracing::warn!(
                error = %e,
                "could not re-hash keys with the current pepper; each is noted again at its next verify"
            ),
        }
    }
}

/// What judging found about the pepper of a cached entry.
enum PepperNote {
    /// Keyed with the current pepper (or the secret did not match).
    Current,
    /// The secret matched under an older pepper or a legacy hash, stored
    /// as `hash` under `pepper_id`: to be re-hashed.
    Stale {
        hash: SecretHash,
        pepper_id: Option<PepperId>,
    },
    /// Keyed with a pepper that is not configured: it cannot be checked.
    Unknown,
}

/// A verdict, and what it leaves to do outside the index's lock.
struct Judged {
    verdict: Verdict,
    pepper: PepperNote,
}

/// Warnings about keys whose pepper is not configured, at most one a
/// second, each counting those left out since the one before: a retired
/// pepper's keys may be presented many times a second.
#[derive(Debug, Default)]
struct UnknownPepperLog {
    state: std::sync::Mutex<(Option<std::time::Instant>, u64)>,
}

impl UnknownPepperLog {
    fn warn(&self, prefix: &KeyPrefix) {
        let now = std::time::Instant::now();
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let (last, unlogged) = &mut *state;
        if last.is_some_and(|at| now.duration_since(at) < std::time::Duration::from_secs(1)) {
            *unlogged += 1;
            return;
        }
        tracing::warn!(
            key.prefix = %prefix,
            similar_unlogged = *unlogged,
            "a key hashed with a pepper that is not configured was presented: it answers NOT_FOUND; \
             `vilvik-keys pepper status` names the pepper; if it was retired too early, \
             add its file to pepper_files again"
        );
        *last = Some(now);
        *unlogged = 0;
    }
}

/// The verdict for a key whose prefix no secret has: the same hash (with
/// the current pepper) and comparison as a wrong secret for a known
/// prefix, then NOT_FOUND.
fn unknown_prefix(key: &ApiKey, peppers: &Peppers) -> Verdict {
    let hash = key.hash_with(Some(peppers.current()));
    std::hint::black_box(DUMMY_HASH.matches(&hash));
    Verdict::NotFound
}

/// The verdict for one presented key against its cached record: the key
/// hashed once, with the pepper the record names.
fn judge(
    entry: &CachedSecret,
    key: &ApiKey,
    peppers: &Peppers,
    required: &[Scope],
    now: OffsetDateTime,
) -> Judged {
    let pepper = match entry.pepper.pepper(peppers) {
        Ok(pepper) => pepper,
        Err(_) => {
            // Cannot be checked: the same hash and comparison as a wrong
            // secret, and the same answer.
            let hash = key.hash_with(Some(peppers.current()));
            std::hint::black_box(entry.hash.matches(&hash));
            return Judged {
                verdict: Verdict::NotFound,
                pepper: PepperNote::Unknown,
            };
        }
    };
    if !entry.hash.matches(&key.hash_with(pepper)) {
        // Right prefix, wrong secret: indistinguishable from unknown.
        return Judged {
            verdict: Verdict::NotFound,
            pepper: PepperNote::Current,
        };
    }
    let pepper = match pepper {
        _ if entry.pepper.is_current() => PepperNote::Current,
        stale => PepperNote::Stale {
            hash: entry.hash,
            pepper_id: stale.map(Pepper::id),
        },
    };
    Judged {
        verdict: judge_matched(entry, required, now),
        pepper,
    }
}

/// The verdict for a presented key whose secret matched its record.
fn judge_matched(entry: &CachedSecret, required: &[Scope], now: OffsetDateTime) -> Verdict {
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

//! The in-memory index a verify node answers from: prefix -> compact record.
//!
//! Sharded by prefix, each shard a `RwLock` over two maps: found secrets
//! (keyed by the prefix packed into a `u64`, the record boxed so that the
//! table itself stays small) and briefly remembered unknown prefixes, whose
//! expiry is read from the verifier's [`Clock`] (a manual one in tests). Every
//! invalidation bumps its shard's epoch; a load that raced with one (read
//! the store before the change committed, finished after the eviction) sees
//! the epoch moved and does not insert its stale result.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use time::OffsetDateTime;
use tokio::sync::OnceCell;
use vilvik_keys_domain::{
    AccountId, Clock, KeyId, KeyName, KeyPrefix, Pepper, PepperId, Peppers, ScopeSet, SecretHash,
};
use vilvik_keys_store::{SecretEntry, SecretRecord};

use crate::error::VerifyError;

const SHARDS: usize = 64;
/// Most distinct scope sets and accounts shared; past these each key keeps
/// its own copy.
const MAX_INTERNED_SCOPE_SETS: usize = 10_000;
const MAX_INTERNED_ACCOUNTS: usize = 1_000_000;

/// What the index keeps per secret: enough to answer a verify, no more.
#[derive(Debug, Clone)]
pub(crate) struct CachedSecret {
    pub hash: SecretHash,
    /// The pepper the hash is keyed with, in one byte.
    pub pepper: PepperSlot,
    pub superseded: bool,
    pub revoked: bool,
    pub expires_at: Expiry,
    pub key_id: KeyId,
    pub account_id: AccountId,
    pub name: KeyName,
    /// Shared between keys with the same scopes.
    pub scopes: Arc<ScopeSet>,
}

/// Which of the node's configured peppers an entry's hash is keyed with, in
/// one byte rather than an 8-byte id (the record stays within 120 bytes):
/// the legacy unkeyed hash, the current pepper, an older one by position,
/// or one not configured. Peppers are fixed for a node's life, so the slot
/// of an entry never goes stale.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PepperSlot(u8);

impl PepperSlot {
    const LEGACY: u8 = 0;
    const CURRENT: u8 = 1;
    /// The first older pepper's slot; older peppers past the 253rd (no
    /// one configures so many) count as not configured.
    const FIRST_OLDER: u8 = 2;
    const UNKNOWN: u8 = u8::MAX;

    pub fn of(peppers: &Peppers, stored: Option<PepperId>) -> Self {
        let Some(id) = stored else {
            return Self(Self::LEGACY);
        };
        if id == peppers.current().id() {
            return Self(Self::CURRENT);
        }
        let older = peppers.older().iter().position(|p| p.id() == id);
        Self(
            older
                .and_then(|i| u8::try_from(i).ok())
                .and_then(|i| i.checked_add(Self::FIRST_OLDER))
                .filter(|slot| *slot != Self::UNKNOWN)
                .unwrap_or(Self::UNKNOWN),
        )
    }

    /// The pepper to hash with: `Ok(None)` for a legacy hash, `Err` for a
    /// pepper not configured.
    pub fn pepper(self, peppers: &Peppers) -> Result<Option<&Pepper>, UnknownSlot> {
        match self.0 {
            Self::LEGACY => Ok(None),
            Self::CURRENT => Ok(Some(peppers.current())),
            Self::UNKNOWN => Err(UnknownSlot),
            older => Ok(Some(
                &peppers.older()[usize::from(older - Self::FIRST_OLDER)],
            )),
        }
    }

    pub fn is_current(self) -> bool {
        self.0 == Self::CURRENT
    }
}

/// A cached entry keyed with a pepper the node is not configured with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct UnknownSlot;

/// When a key expires, in 8 bytes rather than 16: Unix nanoseconds, or
/// `i64::MAX` for never. Times past 2262 count as never; times before 1677
/// are clamped, still in the past.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Expiry(i64);

impl Expiry {
    const NEVER: i64 = i64::MAX;

    pub fn new(at: Option<OffsetDateTime>) -> Self {
        Self(at.map_or(Self::NEVER, |at| {
            let nanos = at.unix_timestamp_nanos();
            i64::try_from(nanos).unwrap_or(if nanos < 0 { i64::MIN } else { Self::NEVER })
        }))
    }

    pub fn at(self) -> Option<OffsetDateTime> {
        (self.0 != Self::NEVER).then(|| {
            OffsetDateTime::from_unix_timestamp_nanos(self.0.into())
                .expect("an i64 of nanoseconds is a valid time")
        })
    }

    /// Whether the key has expired at `now` (expiry is inclusive).
    pub fn passed(self, now: OffsetDateTime) -> bool {
        self.0 != Self::NEVER && i128::from(self.0) <= now.unix_timestamp_nanos()
    }
}

/// The store's answer for one prefix.
pub(crate) type Lookup = Option<CachedSecret>;

/// What the index knows about a prefix right now.
pub(crate) enum Cached<T> {
    Found(T),
    /// Known not to exist (until the negative entry expires or is evicted).
    Absent,
    Unknown,
}

#[derive(Default)]
struct Shard {
    /// Keys are server-generated random prefixes, so a fast hash is safe
    /// here: a caller can look up any prefix but cannot insert one.
    found: HashMap<u64, Box<CachedSecret>, foldhash::fast::RandomState>,
    /// Keys are whatever callers present: SipHash keeps collisions out.
    /// Values: until when the prefix is known to be absent.
    absent: HashMap<u64, OffsetDateTime>,
    epoch: u64,
}

type Inflight = Mutex<HashMap<u64, Arc<OnceCell<Lookup>>>>;

/// Limits of the index.
#[derive(Debug, Clone, Copy)]
pub struct CacheConfig {
    /// How long an unknown prefix is remembered as unknown.
    pub negative_ttl: Duration,
    /// Most unknown prefixes remembered per node.
    pub max_negative: usize,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            negative_ttl: Duration::from_secs(2),
            max_negative: 100_000,
        }
    }
}

pub(crate) struct KeyCache {
    shards: Box<[RwLock<Shard>]>,
    inflight: Box<[Inflight]>,
    scope_sets: Mutex<HashMap<ScopeSet, Arc<ScopeSet>>>,
    accounts: Mutex<HashMap<AccountId, AccountId>>,
    config: CacheConfig,
    clock: Arc<dyn Clock>,
    peppers: Arc<Peppers>,
}

impl std::fmt::Debug for KeyCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyCache")
            .field("len", &self.len())
            .field("config", &self.config)
            .finish()
    }
}

fn shard_of(packed: u64) -> usize {
    (packed % SHARDS as u64) as usize
}

impl KeyCache {
    pub fn new(config: CacheConfig, clock: Arc<dyn Clock>, peppers: Arc<Peppers>) -> Self {
        Self {
            peppers,
            shards: (0..SHARDS).map(|_| RwLock::default()).collect(),
            inflight: (0..SHARDS).map(|_| Mutex::default()).collect(),
            scope_sets: Mutex::default(),
            accounts: Mutex::default(),
            config,
            clock,
        }
    }

    /// Runs `f` on the cached record for `prefix`, under the shard's read
    /// lock (no clone of the record on the hot path).
    pub fn with<T>(&self, prefix: &KeyPrefix, f: impl FnOnce(&CachedSecret) -> T) -> Cached<T> {
        let packed = prefix.packed();
        let shard = self.shards[shard_of(packed)]
            .read()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(found) = shard.found.get(&packed) {
            return Cached::Found(f(found));
        }
        match shard.absent.get(&packed) {
            Some(until) if *until > self.clock.now() => Cached::Absent,
            _ => Cached::Unknown,
        }
    }

    /// Loads `prefix` from the store once, however many callers ask at the
    /// same time, and caches the answer when `cache` is true.
    pub async fn load<F, Fut>(
        &self,
        prefix: &KeyPrefix,
        cache: bool,
        fetch: F,
    ) -> Result<Lookup, VerifyError>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<Option<SecretRecord>, VerifyError>>,
    {
        let packed = prefix.packed();
        let index = shard_of(packed);
        let cell = {
            let mut inflight = self.inflight[index]
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            inflight.entry(packed).or_default().clone()
        };
        let result = cell
            .get_or_try_init(|| async {
                let epoch = self.epoch(index);
                let record = fetch().await?;
                let lookup = record.map(|r| self.compact_entry(r.into_entry(prefix.clone())));
                if cache {
                    self.insert(packed, epoch, &lookup);
                }
                Ok(lookup)
            })
            .await
            .cloned();
        let mut inflight = self.inflight[index]
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if inflight.get(&packed).is_some_and(|c| Arc::ptr_eq(c, &cell)) {
            inflight.remove(&packed);
        }
        result
    }

    /// Inserts streamed entries directly, e.g. when warming the cache at
    /// start. Each shard's write lock is taken once per call.
    pub fn insert_entries(&self, entries: Vec<SecretEntry>) {
        let mut by_shard: Vec<Vec<(u64, Box<CachedSecret>)>> =
            (0..SHARDS).map(|_| Vec::new()).collect();
        for entry in entries {
            let packed = entry.prefix.packed();
            by_shard[shard_of(packed)].push((packed, Box::new(self.compact_entry(entry))));
        }
        for (index, found) in by_shard.into_iter().enumerate() {
            if found.is_empty() {
                continue;
            }
            let mut shard = self.shards[index]
                .write()
                .unwrap_or_else(|p| p.into_inner());
            shard.found.reserve(found.len());
            for (packed, compact) in found {
                shard.absent.remove(&packed);
                shard.found.insert(packed, compact);
            }
        }
    }

    /// Forgets `prefix`; a load already under way will not re-insert it.
    pub fn invalidate(&self, prefix: &KeyPrefix) {
        let packed = prefix.packed();
        let mut shard = self.shards[shard_of(packed)]
            .write()
            .unwrap_or_else(|p| p.into_inner());
        shard.found.remove(&packed);
        shard.absent.remove(&packed);
        shard.epoch += 1;
    }

    /// After a re-hash of `prefix` from `old` (hash and pepper id): when the
    /// cached entry still holds `old`, it takes `new` (the re-hash was
    /// written), or is forgotten (it was not: the store holds another hash
    /// now, which the next verify reads). An entry that moved on meanwhile
    /// is left alone. Only the hash and pepper change: revocation,
    /// rotation and the rest are the store's, whatever this node cached.
    pub fn rehashed(
        &self,
        prefix: &KeyPrefix,
        old: (SecretHash, Option<PepperId>),
        new: Option<(SecretHash, PepperId)>,
    ) {
        let packed = prefix.packed();
        let mut shard = self.shards[shard_of(packed)]
            .write()
            .unwrap_or_else(|p| p.into_inner());
        let Some(entry) = shard.found.get_mut(&packed) else {
            return;
        };
        if entry.hash != old.0 || entry.pepper != PepperSlot::of(&self.peppers, old.1) {
            return;
        }
        match new {
            Some((hash, pepper_id)) => {
                entry.hash = hash;
                entry.pepper = PepperSlot::of(&self.peppers, Some(pepper_id));
            }
            None => {
                shard.found.remove(&packed);
                shard.epoch += 1;
            }
        }
    }

    /// Forgets everything, e.g. when changes were missed and cannot be
    /// known one by one; loads under way will not re-insert their answers.
    pub fn clear(&self) {
        for shard in self.shards.iter() {
            let mut shard = shard.write().unwrap_or_else(|p| p.into_inner());
            shard.found.clear();
            shard.absent.clear();
            shard.epoch += 1;
        }
    }

    /// Number of secrets held.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.read().unwrap_or_else(|p| p.into_inner()).found.len())
            .sum()
    }

    fn epoch(&self, index: usize) -> u64 {
        self.shards[index]
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .epoch
    }

    fn insert(&self, packed: u64, epoch: u64, lookup: &Lookup) {
        let mut shard = self.shards[shard_of(packed)]
            .write()
            .unwrap_or_else(|p| p.into_inner());
        if shard.epoch != epoch {
            return; // invalidated while loading: the result may predate the change
        }
        match lookup {
            Some(found) => {
                shard.found.insert(packed, Box::new(found.clone()));
            }
            None => {
                let per_shard = self.config.max_negative / SHARDS;
                let now = self.clock.now();
                if shard.absent.len() >= per_shard {
                    shard.absent.retain(|_, until| *until > now);
                    if shard.absent.len() >= per_shard {
                        return;
                    }
                }
                shard.absent.insert(packed, now + self.config.negative_ttl);
            }
        }
    }

    fn compact_entry(&self, entry: SecretEntry) -> CachedSecret {
        CachedSecret {
            hash: entry.hash,
            pepper: PepperSlot::of(&self.peppers, entry.pepper_id),
            superseded: entry.superseded,
            revoked: entry.revoked,
            expires_at: Expiry::new(entry.expires_at),
            key_id: entry.key_id,
            account_id: self.intern_account(entry.account_id),
            name: entry.name,
            scopes: self.intern_scopes(entry.scopes),
        }
    }

    /// Keys mostly share a few scope sets: keep one copy of each.
    fn intern_scopes(&self, scopes: ScopeSet) -> Arc<ScopeSet> {
        let mut sets = self.scope_sets.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(shared) = sets.get(&scopes) {
            return shared.clone();
        }
        let shared = Arc::new(scopes.clone());
        if sets.len() < MAX_INTERNED_SCOPE_SETS {
            sets.insert(scopes, shared.clone());
        }
        shared
    }

    /// Many keys share an account: keep one copy of its name.
    fn intern_account(&self, account: AccountId) -> AccountId {
        let mut accounts = self.accounts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(shared) = accounts.get(&account) {
            return shared.clone();
        }
        if accounts.len() < MAX_INTERNED_ACCOUNTS {
            accounts.insert(account.clone(), account.clone());
        }
        account
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cached_record_fits_a_128_byte_allocation() {
        // The index's memory per key: this box (names up to 24 bytes
        // included) and about 35 bytes of hash table. Growing the record
        // shows up here.
        assert!(
            std::mem::size_of::<CachedSecret>() <= 120,
            "{}",
            std::mem::size_of::<CachedSecret>()
        );
    }

    #[test]
    fn a_pepper_slot_names_each_configured_pepper_and_nothing_else() {
        let (a, b, c, gone) = (
            Pepper::generate(),
            Pepper::generate(),
            Pepper::generate(),
            Pepper::generate(),
        );
        let peppers = Peppers::new(c.clone(), vec![b.clone(), a.clone()]).unwrap();
        let id_of = |slot: PepperSlot| slot.pepper(&peppers).map(|p| p.map(Pepper::id));
        for pepper in [&a, &b, &c] {
            let slot = PepperSlot::of(&peppers, Some(pepper.id()));
            assert_eq!(id_of(slot), Ok(Some(pepper.id())));
            assert_eq!(slot.is_current(), pepper.id() == c.id());
        }
        assert_eq!(id_of(PepperSlot::of(&peppers, None)), Ok(None));
        assert_eq!(
            id_of(PepperSlot::of(&peppers, Some(gone.id()))),
            Err(UnknownSlot)
        );
    }

    #[test]
    fn an_expiry_keeps_its_time_and_is_inclusive() {
        let at = time::macros::datetime!(2027-03-01 12:30:15.123456789 UTC);
        let expiry = Expiry::new(Some(at));
        assert_eq!(expiry.at(), Some(at));
        assert!(!expiry.passed(at - Duration::from_nanos(1)));
        assert!(expiry.passed(at));
        assert!(expiry.passed(at + Duration::from_secs(1)));
    }

    #[test]
    fn no_expiry_never_passes_and_times_out_of_range_stay_on_their_side() {
        let now = time::macros::datetime!(2026-11-26 12:00 UTC);
        assert_eq!(Expiry::new(None).at(), None);
        assert!(!Expiry::new(None).passed(now));
        let ancient = time::macros::datetime!(1500-01-01 0:00 UTC);
        assert!(Expiry::new(Some(ancient)).passed(now));
        let far = time::macros::datetime!(2500-01-01 0:00 UTC);
        assert!(!Expiry::new(Some(far)).passed(now));
    }
}

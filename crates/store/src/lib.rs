//! Persistence for vilvik-keys.
//!
//! [`Store`] is the one interface the server uses; [`KeySource`], the part
//! of it the verify engine needs, is all the engine sees. There are two
//! backends, and they pass one conformance suite (`tests/conformance/`):
//!
//! - [`SqliteStore`]: an embedded file in WAL mode, the default when no
//!   `DATABASE_URL` is set;
//! - [`PostgresStore`]: production, shared by several replicas; TLS as the
//!   URL's `sslmode` says, as in libpq (`disable`, `prefer` the default,
//!   `require`, and `verify-ca`/`verify-full` against the CA file
//!   `sslrootcert` names; see [`PostgresStore::connect`]).
//!
//! Every change to a key is one transaction that also writes its audit
//! event (chained onto the account's previous one, see `chain.rs`) and
//! appends the affected prefixes to the change log (the sequence verify
//! nodes follow). Rules that must hold under concurrency, such as the cap
//! on active keys or "a revoked key is never changed again", are enforced
//! inside that transaction, not by the caller. [`connect`] picks the
//! backend and [`Store::migrate`] brings its schema up to date.
//!
//! Each operation is written once for both backends: `backend.rs`
//! implements [`Store`] and [`KeySource`] for every backend by running the
//! operations of `ops.rs` (the order of their locks, checks and writes)
//! over the primitives of `db.rs`, which each backend implements with its
//! own statements; `rules.rs` makes the decisions and `rows.rs` reads the
//! rows. `sqlite/` and `postgres/` hold only what differs: connections,
//! errors, SQL, and the bulk paths each does its own way.
#![forbid(unsafe_code)]

/// The columns of a key row, in the order [`rows::key`] reads them. A
/// macro so that Postgres can `concat!` it into constant queries.
macro_rules! key_columns {
    () => {
        "k.key_id, k.account_id, k.name, k.description, k.scopes, k.prefix, k.created_at, \
         k.expires_at, k.revoked_at, k.revoke_reason, k.rotated_at, k.last_used_at, k.last_used_ip, k.version, \
         k.last_used_observed_ip, k.last_used_claimed_ip, k.valid_uses, k.rejected_uses, \
         k.last_rejected_at, k.last_rejected_ip"
    };
}

mod backend;
mod chain;
mod db;
mod error;
mod migrate;
mod model;
mod ops;
mod postgres;
mod reconcile;
mod rows;
mod rules;
mod sqlite;
mod stream;

use async_trait::async_trait;
use time::OffsetDateTime;
use vilvik_keys_domain::{AccountId, KeyId, KeyPrefix, ScopeCatalogue, Tier};

pub use chain::{
    AuditChainRow, Break, BrokenLink, ChainCheck, ChainSummary, EventContent, GENESIS,
    StoredAuditEvent, StoredAuditHead, event_hash,
};
pub use error::{Outage, OutageKind, StoreError};
pub use model::{
    Account, Actor, AuditEvent, FieldChange, KeyChanges, KeyRecord, KeyUsage, NewKey,
    NewKeyBuilder, NewSecret, Outcome, Page, PepperUse, Policy, Rehash, RejectedUse, Replay,
    RequestMethod, RequestRecord, Rotation, RotationRequest, SecretEntry, SecretRecord,
    UsageRecord, ValidUse,
};
pub use postgres::{
    CHANGE_CHANNEL, ListenerOptions, PostgresOptions, PostgresStore, SERVICE_GRANTS, service_grants,
};
pub use reconcile::{
    AuditCheck, AuditReport, DIFFERENCES_KEPT, Difference, Mismatch, StateCheck, StoredAccount,
    StoredKey,
};
pub use sqlite::SqliteStore;

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// How many migrations [`Store::migrate`] applies to an empty database;
/// both backends have as many.
pub const MIGRATION_COUNT: usize = migrate::SQLITE.len();
const _: () = assert!(migrate::SQLITE.len() == migrate::POSTGRES.len());

/// What the verify engine reads and writes, and no more: secrets by
/// prefix or all at once, the change log, usage, and re-hashes. Every [`Store`] is
/// one (an `Arc<dyn Store>` upcasts to an `Arc<dyn KeySource>`); a test
/// double of the engine's store need only implement this.
#[async_trait]
pub trait KeySource: Send + Sync + std::fmt::Debug {
    /// The secret with this prefix, current or superseded, and its key.
    async fn find_secret(&self, prefix: &KeyPrefix) -> Result<Option<SecretRecord>>;

    /// Writes what verify nodes saw of keys' uses: the counts add up, and
    /// the last valid and last rejected use each replace the stored one
    /// only if newer (an older time never overwrites a newer one). Keys
    /// that do not exist are skipped.
    async fn record_usage(&self, usage: &[UsageRecord]) -> Result<()>;

    /// Re-hashes secrets (with the current pepper, after they verified
    /// under an older one or unkeyed), each only if its stored hash and
    /// pepper id are still the ones the re-hash replaces. Returns the
    /// prefixes whose secret was re-hashed. Not a change of the key: no
    /// audit event, nothing in the change log (verify nodes keep their
    /// cached entries, which still verify under the old pepper while it is
    /// configured). One transaction per call.
    async fn rehash_secrets(&self, rehashes: &[Rehash]) -> Result<Vec<KeyPrefix>>;

    /// The highest change sequence number written so far (0 when none).
    async fn change_sequence(&self) -> Result<i64>;

    /// Prefixes changed after `seq`, with their sequence numbers, oldest
    /// first. [`StoreError::ChangesPruned`] when some of them were pruned.
    async fn changes_since(&self, seq: i64, limit: u32) -> Result<Vec<(i64, KeyPrefix)>>;

    /// Subscribes to changes as they commit, for verify nodes to evict
    /// cached entries at once. `None` when the backend has no push channel
    /// (SQLite): followers then poll [`KeySource::changes_since`].
    async fn listen(&self) -> Result<Option<Box<dyn ChangeListener>>>;

    /// Every secret (current and superseded) with what verification needs
    /// of its key, in no particular order, as one consistent read (a
    /// snapshot: a change committed meanwhile is either wholly in or wholly
    /// out), handed to `sink` in batches of at most `batch` entries (a
    /// `batch` of 0 counts as 1). Returns how many. For warming a verify
    /// node's cache.
    ///
    /// Entries are handed over while the read goes on, so on an error
    /// `sink` may already have seen some of them: the caller discards
    /// them or starts over. `sink` runs on the caller's task; a slow sink
    /// slows the read (at most a few batches are buffered), it does not
    /// grow memory.
    async fn stream_secrets(
        &self,
        batch: usize,
        sink: &mut (dyn FnMut(Vec<SecretEntry>) + Send),
    ) -> Result<usize>;

    /// Every prefix a secret was issued with (current and superseded), as
    /// [`KeySource::stream_secrets`] streams secrets: one consistent read,
    /// in batches of at most `batch`. Returns how many. For the set of
    /// known prefixes each verify node keeps.
    async fn stream_prefixes(
        &self,
        batch: usize,
        sink: &mut (dyn FnMut(Vec<KeyPrefix>) + Send),
    ) -> Result<usize>;
}

/// Where the keys live. See the crate docs for the guarantees every
/// backend gives.
#[async_trait]
pub trait Store: KeySource {
    /// Applies every migration not yet applied; returns how many ran.
    /// Refuses to start, naming the file, when an applied migration's
    /// statements have changed since (each one's checksum is recorded;
    /// comments and blank lines do not count).
    async fn migrate(&self) -> Result<usize>;

    /// Creates a key, its first secret and its `created` audit event. Creates
    /// the account (tier `free`) on first use. Fails with
    /// [`StoreError::QuotaExceeded`] when the account already holds as many
    /// active keys as its tier allows (concurrent creates cannot overshoot),
    /// with [`StoreError::StoredKeysExceeded`] when it stores as many keys
    /// in all as [`Policy::stored_key_limit`],
    /// and with [`StoreError::NotGrantable`] when a scope is outside the
    /// account's catalogue or is one of the service's own and `actor` is
    /// not the operator.
    async fn create_key(&self, new: NewKey, actor: &Actor, policy: &Policy) -> Result<KeyRecord> {
        match self.create_key_with(new, None, actor, policy).await? {
            Outcome::Done(key) => Ok(key),
            Outcome::Replayed(_) => Err(StoreError::internal(
                "a create without a request id replayed",
            )),
        }
    }

    /// [`Store::create_key`] under a request id: when `request`'s digest
    /// was recorded before its `expires_at` by a create with the same
    /// parameters, creates nothing and returns [`Outcome::Replayed`]; with
    /// other parameters, or by a rotation, [`StoreError::RequestIdReused`].
    /// Else creates the key and records `request` in the same transaction.
    /// The replay check comes first: a retry is answered even when the
    /// account has since reached its cap.
    async fn create_key_with(
        &self,
        new: NewKey,
        request: Option<&RequestRecord>,
        actor: &Actor,
        policy: &Policy,
    ) -> Result<Outcome<KeyRecord>>;

    /// A key of `account`; another account's key is `None`.
    async fn get_key(&self, account: &AccountId, key_id: &KeyId) -> Result<Option<KeyRecord>>;

    /// Keys of `account` in creation order, `limit` at a time, starting after
    /// the cursor a previous page returned. Revoked keys only when asked.
    async fn list_keys(
        &self,
        account: &AccountId,
        include_revoked: bool,
        after: Option<i64>,
        limit: u32,
    ) -> Result<Page<KeyRecord>>;

    /// Applies the given changes and records what actually changed. A revoked
    /// key is [`StoreError::Revoked`]; one no longer at
    /// [`KeyChanges::if_version`] is [`StoreError::StaleVersion`]. Extending an expired key counts
    /// against the cap like a create. Scopes added are checked as
    /// `create_key` checks a new key's. Taking `keys:admin` from, or
    /// setting a sooner expiry on, the account's last active management key
    /// is [`StoreError::LastManagementKey`].
    async fn update_key(
        &self,
        account: &AccountId,
        key_id: &KeyId,
        changes: KeyChanges,
        actor: &Actor,
        now: OffsetDateTime,
        policy: &Policy,
    ) -> Result<KeyRecord>;

    /// Replaces the key's secret: the old one stops working in the same
    /// transaction. Revoked or expired keys cannot be rotated. Of the key's
    /// rotated-away secrets only the newest [`Policy::rotated_secrets_kept`]
    /// stay; older ones are deleted in the same transaction.
    async fn rotate_key(
        &self,
        account: &AccountId,
        key_id: &KeyId,
        secret: &NewSecret,
        actor: &Actor,
        now: OffsetDateTime,
        policy: &Policy,
    ) -> Result<Rotation> {
        let rotation = RotationRequest {
            secret: secret.clone(),
            if_version: None,
            request: None,
        };
        match self
            .rotate_key_with(account, key_id, &rotation, actor, now, policy)
            .await?
        {
            Outcome::Done(rotation) => Ok(rotation),
            Outcome::Replayed(_) => Err(StoreError::internal(
                "a rotation without a request id replayed",
            )),
        }
    }

    /// [`Store::rotate_key`], only if the key is still at
    /// `rotation.if_version` (else [`StoreError::StaleVersion`]), and under
    /// its request id as [`Store::create_key_with`] (the replay check comes
    /// before every other).
    async fn rotate_key_with(
        &self,
        account: &AccountId,
        key_id: &KeyId,
        rotation: &RotationRequest,
        actor: &Actor,
        now: OffsetDateTime,
        policy: &Policy,
    ) -> Result<Outcome<Rotation>>;

    /// Revokes the key for good. Revoking twice is [`StoreError::Revoked`];
    /// revoking the account's last active management key is
    /// [`StoreError::LastManagementKey`].
    async fn revoke_key(
        &self,
        account: &AccountId,
        key_id: &KeyId,
        reason: &str,
        actor: &Actor,
        now: OffsetDateTime,
    ) -> Result<KeyRecord> {
        self.revoke_key_if(account, key_id, reason, None, actor, now)
            .await
    }

    /// [`Store::revoke_key`], only if the key is still at `if_version`
    /// (`None`: any); else [`StoreError::StaleVersion`].
    async fn revoke_key_if(
        &self,
        account: &AccountId,
        key_id: &KeyId,
        reason: &str,
        if_version: Option<i64>,
        actor: &Actor,
        now: OffsetDateTime,
    ) -> Result<KeyRecord>;

    /// Audit events of `account`, oldest first; only those of `key_id` when
    /// given. Cursors and `event_id`s are the account's own event numbers
    /// (1, 2, 3, …), so they say nothing about other accounts.
    async fn list_audit_events(
        &self,
        account: &AccountId,
        key_id: Option<&KeyId>,
        after: Option<i64>,
        limit: u32,
    ) -> Result<Page<AuditEvent>>;

    /// The account's tier and catalogue; an account never seen is `free`
    /// with the server's catalogue.
    async fn get_account(&self, account: &AccountId) -> Result<Account>;

    /// The stored accounts whose id differs from `account`'s only in
    /// letter case (`acme` for `ACME`), in id order: ids are
    /// case-sensitive, so those are other accounts.
    async fn accounts_differing_in_case(&self, account: &AccountId) -> Result<Vec<AccountId>>;

    /// Sets the account's own catalogue of grantable scopes (`None`: back
    /// to the server's), with an audit event. Keys already holding scopes
    /// outside it keep them.
    async fn set_grantable_scopes(
        &self,
        account: &AccountId,
        grantable: Option<&ScopeCatalogue>,
        actor: &Actor,
        now: OffsetDateTime,
    ) -> Result<Account>;

    /// Changes the account's tier, with an audit event.
    async fn set_tier(
        &self,
        account: &AccountId,
        tier: Tier,
        actor: &Actor,
        now: OffsetDateTime,
    ) -> Result<Account>;

    /// Deletes change-log entries recorded before `before` (the newest
    /// always stays, so [`KeySource::change_sequence`] never goes back) and
    /// raises the floor below which [`KeySource::changes_since`] refuses.
    /// Returns how many entries went.
    async fn prune_changes(&self, before: OffsetDateTime) -> Result<u64>;

    /// Deletes the records of request ids whose window ended before
    /// `now`. Returns how many went.
    async fn prune_requests(&self, now: OffsetDateTime) -> Result<u64>;

    /// Deletes rotated-away secrets superseded before `before` (they then
    /// verify as unknown, not `ROTATED`). Returns how many went.
    async fn prune_rotated_secrets(&self, before: OffsetDateTime) -> Result<u64>;

    /// Inserts many keys at once, for imports and benchmarks: creates the
    /// accounts as needed and writes each key's `created` audit event and
    /// change-log entry, but does not check the tier cap. All or nothing:
    /// a prefix or key id that is taken (or repeated) fails the whole call
    /// with [`StoreError::Conflict`]. Sends no change notification:
    /// listeners see the sequence jump at the next change and read the
    /// imported prefixes with [`KeySource::changes_since`].
    async fn import_keys(&self, keys: Vec<NewKey>, actor: &Actor) -> Result<()>;

    /// Every account's audit chain (only `account`'s when given), for
    /// `vilvik-keys audit verify`: each account's events in number order
    /// (rows without a number first), then its head, as one consistent
    /// read, handed to `sink` in batches of at most `batch` as
    /// [`KeySource::stream_secrets`] does (feed them to a [`ChainCheck`]).
    /// Rows are read as stored, not parsed, so a damaged one is a broken
    /// link rather than an error. Returns how many rows.
    async fn stream_audit_chain(
        &self,
        account: Option<&AccountId>,
        batch: usize,
        sink: &mut (dyn FnMut(Vec<AuditChainRow>) + Send),
    ) -> Result<usize>;

    /// How many secrets each pepper id (and the legacy unkeyed hash)
    /// covers, live and in all (see [`PepperUse`]), in no particular
    /// order; ids that cover nothing are absent. One read of every secret.
    async fn secrets_by_pepper(&self) -> Result<Vec<PepperUse>>;
}

/// A live subscription to the change log (Postgres `LISTEN`).
#[async_trait]
pub trait ChangeListener: Send + std::fmt::Debug {
    /// The next change as `(seq, prefix)`, in commit order. An error means
    /// the subscription is broken and changes may have been missed: the
    /// caller must subscribe again and catch up with `changes_since`.
    async fn next(&mut self) -> Result<(i64, KeyPrefix)>;
}

/// Opens the store a configuration names: Postgres when `database_url` is
/// set (with `postgres` options; its `sslmode` and `sslrootcert` as
/// [`PostgresStore::connect`] reads them), else the SQLite file at
/// `sqlite_path` (created when missing).
pub async fn connect(
    database_url: Option<&str>,
    sqlite_path: &std::path::Path,
    postgres: PostgresOptions,
) -> Result<std::sync::Arc<dyn Store>> {
    Ok(match database_url {
        Some(url) => std::sync::Arc::new(PostgresStore::connect_with(url, postgres).await?),
        None => std::sync::Arc::new(SqliteStore::open(sqlite_path).await?),
    })
}

/// [`connect`] for a store that must already exist (made by `serve` or
/// `migrate`): the SQLite file is never created, and either database must
/// hold the service's schema. Commands other than those two open the store
/// this way, so that one run in the wrong place makes nothing there.
pub async fn connect_existing(
    database_url: Option<&str>,
    sqlite_path: &std::path::Path,
    postgres: PostgresOptions,
) -> Result<std::sync::Arc<dyn Store>, OpenExistingError> {
    Ok(match database_url {
        Some(url) => {
            let store = PostgresStore::connect_with(url, postgres).await?;
            if !store.has_schema().await? {
                return Err(OpenExistingError::Missing(Missing::NoSchema));
            }
            std::sync::Arc::new(store)
        }
        None => std::sync::Arc::new(SqliteStore::open_existing(sqlite_path).await?),
    })
}

/// What [`connect_existing`] did not find.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Missing {
    #[error("there is no SQLite database at {}", .0.display())]
    NoFile(std::path::PathBuf),
    #[error("the database holds no vilvik-keys schema (no migration was ever applied to it)")]
    NoSchema,
}

/// Why [`connect_existing`] opened no store.
#[derive(Debug, thiserror::Error)]
pub enum OpenExistingError {
    #[error(transparent)]
    Missing(Missing),
    #[error(transparent)]
    Store(#[from] StoreError),
}

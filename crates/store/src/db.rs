//! The primitives that every operation of the store is written with, once
//! for both backends (`ops.rs`): one statement or one small group of
//! statements each, grouped by the tables they serve. Each backend
//! implements them on its own connection type (SQLite's `Sqlite`,
//! Postgres's `Pg`); the order of the locks, checks and writes of an
//! operation is never a backend's business.
//!
//! A primitive called inside a write transaction sees what the transaction
//! wrote so far. Primitives named `lock_*` also lock what they read until
//! the transaction ends (Postgres row locks; SQLite's `BEGIN IMMEDIATE`
//! already holds the one write lock). Outside a write transaction only the
//! reads are called.

use std::future::Future;
use std::pin::Pin;

use time::OffsetDateTime;
use vilvik_keys_domain::{AccountId, KeyId, KeyPrefix};

use crate::chain::{Head, Link};
use crate::rules::{ChangeRecord, StoredRequest};
use crate::{Account, Actor, AuditEvent, KeyRecord, NewKey, NewSecret, RequestRecord, Result};

/// A primitive's answer: a future that can cross threads (Postgres's run
/// inside the `Send` futures of [`crate::Store`]), resolving to a store
/// result. SQLite's never wait: they run on a blocking thread and are
/// complete when first polled.
pub(crate) trait Fut<T>: Future<Output = Result<T>> + Send {}

impl<T, F: Future<Output = Result<T>> + Send> Fut<T> for F {}

/// A boxed [`Fut`], what an operation handed to a backend's runner returns.
pub(crate) type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T>> + Send + 'a>>;

/// One page of a listing: rows after the cursor `after`, at most `limit`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Window {
    pub after: i64,
    pub limit: u32,
}

impl Window {
    /// From the first row when `after` is `None`.
    pub fn new(after: Option<i64>, limit: u32) -> Self {
        Self {
            after: after.unwrap_or(0),
            limit,
        }
    }

    /// How many rows a listing query fetches: one more than the page
    /// holds, so that [`crate::rules::page`] knows whether another follows.
    pub fn fetch(self) -> i64 {
        i64::from(self.limit) + 1
    }
}

/// Keys and their secrets.
pub(crate) trait KeyRows: Send {
    /// The key of `account` with this id.
    fn load_key(&mut self, account: &AccountId, key_id: &KeyId) -> impl Fut<Option<KeyRecord>>;
    /// [`KeyRows::load_key`], its row locked until the transaction ends.
    fn lock_key(&mut self, account: &AccountId, key_id: &KeyId) -> impl Fut<Option<KeyRecord>>;
    /// The account's keys in creation order, each with its cursor.
    fn list_keys(&mut self, account: &AccountId, revoked: bool, at: Window) -> impl Fut<Keys>;
    /// How many keys the account stores, revoked and expired ones too.
    fn count_keys(&mut self, account: &AccountId) -> impl Fut<u32>;
    /// How many of the account's keys are active at `now`.
    fn count_active(&mut self, account: &AccountId, now: OffsetDateTime) -> impl Fut<u32>;
    /// The scopes, as stored, and the expiry of the account's keys other
    /// than `key` that are active at `now`.
    fn other_active_keys(&mut self, key: &KeyRecord, now: OffsetDateTime) -> impl Fut<OtherKeys>;
    /// Writes a new key's row (not its secret).
    fn insert_key(&mut self, new: &NewKey) -> impl Fut<()>;
    /// Writes what a change of the key can change: its name, description,
    /// scopes, expiry, current prefix, rotation and revocation, and
    /// version (never its usage, which the verify engine writes).
    fn write_key(&mut self, key: &KeyRecord) -> impl Fut<()>;
    /// Stores a secret of a key.
    fn insert_secret(&mut self, row: &SecretRow<'_>) -> impl Fut<()>;
    /// Marks the secret with this prefix superseded at `at`.
    fn supersede_secret(&mut self, prefix: &KeyPrefix, at: OffsetDateTime) -> impl Fut<()>;
    /// Deletes the key's superseded secrets but the newest `kept`; returns
    /// their prefixes.
    fn prune_key_secrets(&mut self, key_id: &KeyId, kept: u32) -> impl Fut<Vec<KeyPrefix>>;
    /// Deletes every secret superseded before `before`; returns their
    /// prefixes.
    fn prune_superseded(&mut self, before: OffsetDateTime) -> impl Fut<Vec<KeyPrefix>>;
    /// Writes many new keys at once as [`crate::Store::import_keys`] says:
    /// accounts as needed, each key's row, secret, `created` event and
    /// change-log entry.
    fn import_keys(&mut self, keys: &[NewKey], actor: &Actor) -> impl Fut<()>;
}

/// A page of keys, each with its cursor.
pub(crate) type Keys = Vec<(i64, KeyRecord)>;

/// Keys' scopes as stored, and their expiry, one pair per key.
pub(crate) type OtherKeys = Vec<(Vec<String>, Option<OffsetDateTime>)>;

/// A secret of the key `key_id`, stored as of `created_at`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SecretRow<'a> {
    pub key_id: &'a KeyId,
    pub secret: &'a NewSecret,
    pub created_at: OffsetDateTime,
}

/// Accounts.
pub(crate) trait AccountRows: Send {
    /// The account as stored; one never seen reads as `free`.
    fn load_account(&mut self, account: &AccountId) -> impl Fut<Account>;
    /// Creates the account (tier `free`) on first use, locks its row until
    /// the transaction ends, and returns it as stored.
    fn lock_account(&mut self, account: &AccountId, now: OffsetDateTime) -> impl Fut<Account>;
    /// Writes the account's tier and catalogue.
    fn update_account(&mut self, account: &AccountId, stored: &Account) -> impl Fut<()>;
    /// The stored accounts whose id is `account`'s but for letter case.
    fn accounts_differing_in_case(&mut self, account: &AccountId) -> impl Fut<Vec<AccountId>>;
}

/// A request id claimed for `account`'s call by `caller` (the actor's
/// name: `key:<key_id>`, `operator:<actor>`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Claim<'a> {
    pub account: &'a AccountId,
    pub request: &'a RequestRecord,
    pub caller: &'a str,
}

/// The records of request ids.
pub(crate) trait RequestRows: Send {
    /// Deletes the claim's record if its window ended at `now`.
    fn forget_expired(&mut self, claim: &Claim<'_>, now: OffsetDateTime) -> impl Fut<()>;
    /// Records the claim unless its digest is recorded already; whether it
    /// did. On Postgres a concurrent call with the same digest waits here
    /// until the first one's transaction ends.
    fn record_request(&mut self, claim: &Claim<'_>) -> impl Fut<bool>;
    /// What the claim's digest recorded.
    fn recorded_request(&mut self, claim: &Claim<'_>) -> impl Fut<StoredRequest>;
    /// How many of the account's records are within their window at
    /// `now`, counting no further than `upto`.
    fn count_live_requests(
        &mut self,
        account: &AccountId,
        now: OffsetDateTime,
        upto: u32,
    ) -> impl Fut<u32>;
    /// Deletes every record whose window ended at `now`; returns how many.
    fn prune_requests(&mut self, now: OffsetDateTime) -> impl Fut<u64>;
}

/// One page of an account's audit events, only `key_id`'s when given.
#[derive(Debug, Clone, Copy)]
pub(crate) struct EventPage<'a> {
    pub account: &'a AccountId,
    pub key_id: Option<&'a KeyId>,
    pub at: Window,
}

/// The audit log: events and each account's head.
pub(crate) trait AuditRows: Send {
    /// The page's events in number order, each with its number as cursor.
    fn list_events(&mut self, page: &EventPage<'_>) -> impl Fut<Events>;
    /// The account's head (created empty if missing), locked until the
    /// transaction ends so that the account's events chain one at a time.
    fn lock_head(&mut self, account: &AccountId) -> impl Fut<Head>;
    /// Writes `record`'s event as `link` makes it and moves the account's
    /// head to it.
    fn append_event(&mut self, record: &ChangeRecord<'_>, link: &Link) -> impl Fut<()>;
}

/// A page of audit events, each with its cursor.
pub(crate) type Events = Vec<(i64, AuditEvent)>;

/// The change log verify nodes follow.
pub(crate) trait ChangeRows: Send {
    /// The highest sequence number written so far (0 when none).
    fn change_sequence(&mut self) -> impl Fut<i64>;
    /// Changes after `seq`, oldest first, at most `limit`.
    fn changes_after(&mut self, seq: i64, limit: u32) -> impl Fut<Vec<(i64, KeyPrefix)>>;
    /// The sequence number through which the log was pruned.
    fn change_floor(&mut self) -> impl Fut<i64>;
    /// Appends `prefix`. On Postgres this takes the change log's lock until
    /// commit, so sequence numbers commit in order: call it after every
    /// row lock the transaction takes. Listeners hear of it at commit.
    fn publish_change(&mut self, prefix: &KeyPrefix, at: OffsetDateTime) -> impl Fut<()>;
    /// Takes the change log's lock until the transaction ends (Postgres;
    /// SQLite's write lock already excludes every other writer).
    fn lock_change_log(&mut self) -> impl Fut<()>;
    /// The newest entry recorded before `before` that is not the newest
    /// of all.
    fn last_prunable_change(&mut self, before: OffsetDateTime) -> impl Fut<Option<i64>>;
    /// Deletes the entries through `seq`; returns how many.
    fn delete_changes_through(&mut self, seq: i64) -> impl Fut<u64>;
    /// Sets the sequence number through which the log was pruned.
    fn set_change_floor(&mut self, floor: i64) -> impl Fut<()>;
}

/// Every primitive, on one connection of a backend: what operations are
/// written against.
pub(crate) trait Db: KeyRows + AccountRows + RequestRows + AuditRows + ChangeRows {
    /// Lifts the statement timeout for the rest of the transaction, for
    /// work that rightly takes longer than a request (Postgres; SQLite has
    /// none).
    fn lift_statement_timeout(&mut self) -> impl Fut<()>;
}

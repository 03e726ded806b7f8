//! [`KeySource`] and [`Store`], implemented once for every [`Backend`]:
//! each call becomes an operation of `ops.rs` run in the backend's write
//! transaction or on one of its connections, or, where the work is the
//! backend's own (migrations, bulk writes of the verify engine, streams,
//! the change listener), a call of the backend.

use std::future::Future;

use async_trait::async_trait;
use time::OffsetDateTime;
use vilvik_keys_domain::{AccountId, KeyId, KeyPrefix, ScopeCatalogue, Tier};

use crate::db::{AccountRows, BoxFuture, ChangeRows, Db, Fut, KeyRows, RequestRows, Window};
use crate::ops::{self, AccountChange, CreateKey, RevokeKey, RotateKey, SetAccount, UpdateKey};
use crate::{
    Account, Actor, AuditChainRow, AuditEvent, ChangeListener, KeyChanges, KeyRecord, KeySource,
    NewKey, Outcome, Page, PepperUse, Policy, Rehash, RequestRecord, Result, Rotation,
    RotationRequest, SecretEntry, SecretRecord, Store, UsageRecord,
};

/// Where a stream hands its batches.
pub(crate) type Sink<'a, T> = &'a mut (dyn FnMut(Vec<T>) + Send);

/// What [`Backend::stream`] reads, and where its rows go.
pub(crate) enum Stream<'a> {
    /// [`crate::stream::STREAM_SECRETS`].
    Secrets(Sink<'a, SecretEntry>),
    /// [`crate::stream::STREAM_PREFIXES`].
    Prefixes(Sink<'a, KeyPrefix>),
    /// Every account's audit chain, or one account's.
    AuditChain(Option<&'a AccountId>, Sink<'a, AuditChainRow>),
}

/// What a backend supplies: a runner for write transactions, one for
/// reads, and the work it does its own way.
pub(crate) trait Backend: Send + Sync + std::fmt::Debug + 'static {
    /// A write transaction: SQLite `BEGIN IMMEDIATE` on the writer
    /// connection, Postgres a transaction on a pooled connection.
    type Tx<'c>: Db;
    /// A connection for reads, in no transaction of this store's making.
    type Conn<'c>: Db;

    /// Runs `op` in a new write transaction; commits it when `op` returns
    /// `Ok`, rolls it back otherwise.
    fn write<T, F>(&self, op: F) -> impl Fut<T>
    where
        T: Send + 'static,
        F: for<'t, 'c> FnOnce(&'t mut Self::Tx<'c>) -> BoxFuture<'t, T> + Send + 'static;

    /// Runs `op`, which only reads, on a connection.
    fn read<T, F>(&self, op: F) -> impl Fut<T>
    where
        T: Send + 'static,
        F: for<'t, 'c> FnOnce(&'t mut Self::Conn<'c>) -> BoxFuture<'t, T> + Send + 'static;

    /// [`Store::migrate`].
    fn migrate(&self) -> impl Fut<usize>;
    /// [`KeySource::find_secret`].
    fn find_secret(&self, prefix: &KeyPrefix) -> impl Fut<Option<SecretRecord>>;
    /// [`KeySource::record_usage`], for a non-empty `usage`.
    fn record_usage(&self, usage: &[UsageRecord]) -> impl Fut<()>;
    /// [`KeySource::rehash_secrets`], for a non-empty `rehashes`.
    fn rehash_secrets(&self, rehashes: &[Rehash]) -> impl Fut<Vec<KeyPrefix>>;
    /// [`KeySource::listen`].
    fn listen(&self) -> impl Fut<Option<Box<dyn ChangeListener>>>;
    /// [`KeySource::stream_secrets`], [`KeySource::stream_prefixes`] and
    /// [`Store::stream_audit_chain`]: one consistent read, in batches of at
    /// most `batch`; returns how many rows.
    fn stream(&self, batch: usize, stream: Stream<'_>) -> impl Fut<usize>;
    /// [`Store::secrets_by_pepper`].
    fn secrets_by_pepper(&self) -> impl Fut<Vec<PepperUse>>;
}

/// Boxes an operation's future for a backend's runner.
fn boxed<'t, T>(op: impl Future<Output = Result<T>> + Send + 't) -> BoxFuture<'t, T> {
    Box::pin(op)
}

#[async_trait]
impl<B: Backend> KeySource for B {
    async fn find_secret(&self, prefix: &KeyPrefix) -> Result<Option<SecretRecord>> {
        Backend::find_secret(self, prefix).await
    }

    async fn record_usage(&self, usage: &[UsageRecord]) -> Result<()> {
        if usage.is_empty() {
            return Ok(());
        }
        Backend::record_usage(self, usage).await
    }

    async fn rehash_secrets(&self, rehashes: &[Rehash]) -> Result<Vec<KeyPrefix>> {
        if rehashes.is_empty() {
            return Ok(Vec::new());
        }
        Backend::rehash_secrets(self, rehashes).await
    }

    async fn change_sequence(&self) -> Result<i64> {
        self.read(|db| boxed(db.change_sequence())).await
    }

    async fn changes_since(&self, seq: i64, limit: u32) -> Result<Vec<(i64, KeyPrefix)>> {
        self.read(move |db| boxed(ops::changes_since(db, seq, limit)))
            .await
    }

    async fn listen(&self) -> Result<Option<Box<dyn ChangeListener>>> {
        Backend::listen(self).await
    }

    async fn stream_secrets(&self, batch: usize, sink: Sink<'_, SecretEntry>) -> Result<usize> {
        self.stream(batch, Stream::Secrets(sink)).await
    }

    async fn stream_prefixes(&self, batch: usize, sink: Sink<'_, KeyPrefix>) -> Result<usize> {
        self.stream(batch, Stream::Prefixes(sink)).await
    }
}

#[async_trait]
impl<B: Backend> Store for B {
    async fn migrate(&self) -> Result<usize> {
        Backend::migrate(self).await
    }

    async fn create_key_with(
        &self,
        new: NewKey,
        request: Option<&RequestRecord>,
        actor: &Actor,
        policy: &Policy,
    ) -> Result<Outcome<KeyRecord>> {
        let op = CreateKey {
            new,
            request: request.cloned(),
            actor: actor.clone(),
            policy: policy.clone(),
        };
        self.write(move |db| boxed(op.run(db))).await
    }

    async fn get_key(&self, account: &AccountId, key_id: &KeyId) -> Result<Option<KeyRecord>> {
        let (account, key_id) = (account.clone(), key_id.clone());
        self.read(move |db| boxed(async move { db.load_key(&account, &key_id).await }))
            .await
    }

    async fn list_keys(
        &self,
        account: &AccountId,
        include_revoked: bool,
        after: Option<i64>,
        limit: u32,
    ) -> Result<Page<KeyRecord>> {
        let (account, at) = (account.clone(), Window::new(after, limit));
        self.read(move |db| {
            boxed(async move { ops::list_keys(db, &account, include_revoked, at).await })
        })
        .await
    }

    async fn update_key(
        &self,
        account: &AccountId,
        key_id: &KeyId,
        changes: KeyChanges,
        actor: &Actor,
        now: OffsetDateTime,
        policy: &Policy,
    ) -> Result<KeyRecord> {
        let op = UpdateKey {
            account: account.clone(),
            key_id: key_id.clone(),
            changes,
            actor: actor.clone(),
            now,
            policy: policy.clone(),
        };
        self.write(move |db| boxed(op.run(db))).await
    }

    async fn rotate_key_with(
        &self,
        account: &AccountId,
        key_id: &KeyId,
        rotation: &RotationRequest,
        actor: &Actor,
        now: OffsetDateTime,
        policy: &Policy,
    ) -> Result<Outcome<Rotation>> {
        let op = RotateKey {
            account: account.clone(),
            key_id: key_id.clone(),
            rotation: rotation.clone(),
            actor: actor.clone(),
            now,
            policy: policy.clone(),
        };
        self.write(move |db| boxed(op.run(db))).await
    }

    async fn revoke_key_if(
        &self,
        account: &AccountId,
        key_id: &KeyId,
        reason: &str,
        if_version: Option<i64>,
        actor: &Actor,
        now: OffsetDateTime,
    ) -> Result<KeyRecord> {
        let op = RevokeKey {
            account: account.clone(),
            key_id: key_id.clone(),
            reason: reason.to_owned(),
            if_version,
            actor: actor.clone(),
            now,
        };
        self.write(move |db| boxed(op.run(db))).await
    }

    async fn list_audit_events(
        &self,
        account: &AccountId,
        key_id: Option<&KeyId>,
        after: Option<i64>,
        limit: u32,
    ) -> Result<Page<AuditEvent>> {
        let (account, key_id) = (account.clone(), key_id.cloned());
        let at = Window::new(after, limit);
        self.read(move |db| {
            boxed(async move { ops::list_audit_events(db, &account, key_id.as_ref(), at).await })
        })
        .await
    }

    async fn get_account(&self, account: &AccountId) -> Result<Account> {
        let account = account.clone();
        self.read(move |db| boxed(async move { db.load_account(&account).await }))
            .await
    }

    async fn accounts_differing_in_case(&self, account: &AccountId) -> Result<Vec<AccountId>> {
        let account = account.clone();
        self.read(move |db| boxed(async move { db.accounts_differing_in_case(&account).await }))
            .await
    }

    async fn set_grantable_scopes(
        &self,
        account: &AccountId,
        grantable: Option<&ScopeCatalogue>,
        actor: &Actor,
        now: OffsetDateTime,
    ) -> Result<Account> {
        let op = SetAccount {
            account: account.clone(),
            change: AccountChange::Grantable(grantable.cloned()),
            actor: actor.clone(),
            now,
        };
        self.write(move |db| boxed(op.run(db))).await
    }

    async fn set_tier(
        &self,
        account: &AccountId,
        tier: Tier,
        actor: &Actor,
        now: OffsetDateTime,
    ) -> Result<Account> {
        let op = SetAccount {
            account: account.clone(),
            change: AccountChange::Tier(tier),
            actor: actor.clone(),
            now,
        };
        self.write(move |db| boxed(op.run(db))).await
    }

    async fn prune_changes(&self, before: OffsetDateTime) -> Result<u64> {
        self.write(move |db| boxed(ops::prune_changes(db, before)))
            .await
    }

    async fn prune_requests(&self, now: OffsetDateTime) -> Result<u64> {
        self.write(move |db| boxed(db.prune_requests(now))).await
    }

    async fn prune_rotated_secrets(&self, before: OffsetDateTime) -> Result<u64> {
        self.write(move |db| boxed(ops::prune_rotated_secrets(db, before)))
            .await
    }

    async fn import_keys(&self, keys: Vec<NewKey>, actor: &Actor) -> Result<()> {
        if keys.is_empty() {
            return Ok(());
        }
        let actor = actor.clone();
        self.write(move |db| boxed(async move { ops::import_keys(db, &keys, &actor).await }))
            .await
    }

    async fn stream_audit_chain(
        &self,
        account: Option<&AccountId>,
        batch: usize,
        sink: Sink<'_, AuditChainRow>,
    ) -> Result<usize> {
        self.stream(batch, Stream::AuditChain(account, sink)).await
    }

    async fn secrets_by_pepper(&self) -> Result<Vec<PepperUse>> {
        Backend::secrets_by_pepper(self).await
    }
}

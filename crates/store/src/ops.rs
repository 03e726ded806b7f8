//! Every operation of the store, written once for both backends over the
//! primitives of [`Db`]: the order of its locks, checks and writes. The
//! decisions are `rules.rs`'s; the statements are each backend's.
//!
//! Write operations run inside one write transaction that the backend's
//! runner opens and commits when they return `Ok` (rolls back otherwise):
//! on SQLite `BEGIN IMMEDIATE`, which takes the one write lock up front; on
//! Postgres READ COMMITTED with explicit locks, taken in this order so that
//! no two operations wait on each other in a circle:
//!
//! 1. the request id's record ([`claim_request`]), first of all, so a retry
//!    is answered whatever else changed since;
//! 2. the key's row ([`crate::db::KeyRows::lock_key`]), so changes of one key
//!    serialize;
//! 3. the account's row ([`crate::db::AccountRows::lock_account`]) before any count or
//!    check it guards (the cap, the stored-key ceiling, the last
//!    management key), so concurrent changes cannot overshoot them;
//! 4. the account's audit head ([`crate::db::AuditRows::lock_head`]), after every
//!    other row lock;
//! 5. the change log's lock ([`crate::db::ChangeRows::publish_change`]), last, held to
//!    commit, so sequence numbers commit in the order they were assigned.

use time::OffsetDateTime;
use vilvik_keys_domain::{AccountId, KeyId, ScopeCatalogue, Tier, TierLimits};

use crate::chain;
use crate::db::{Claim, Db, EventPage, SecretRow, Window};
use crate::rules::{self, ChangeRecord, Prune, StoredRequest};
use crate::{
    Account, Actor, AuditEvent, KeyChanges, KeyRecord, NewKey, NewSecret, Outcome, Page, Policy,
    Replay, RequestRecord, Result, Rotation, RotationRequest, StoreError,
};

/// Records `request` for its retries by `actor`, unless its id is
/// already recorded (and its window still open): then what it recorded,
/// for the operation to authorize the call and answer it
/// ([`replay`]). A new record past the account's
/// [`Policy::request_ids_per_account`] is refused. Called first in its
/// transaction.
async fn claim_request(
    db: &mut impl Db,
    account: &AccountId,
    request: &RequestRecord,
    actor: &Actor,
    now: OffsetDateTime,
    policy: &Policy,
) -> Result<Option<StoredRequest>> {
    let claim = Claim {
        account,
        request,
        caller: &actor.name,
    };
    db.forget_expired(&claim, now).await?;
    if db.record_request(&claim).await? {
        // Counted with the new record in: past the cap, the transaction
        // rolls it back. Concurrent first calls may each see the others
        // uncommitted, so the cap can be passed by as many at once.
        let limit = policy.request_ids_per_account;
        let live = db
            .count_live_requests(account, now, limit.saturating_add(1))
            .await?;
        rules::check_request_ids(limit, live)?;
        return Ok(None);
    }
    Ok(Some(db.recorded_request(&claim).await?))
}

/// The answer to a retry of `request` by `actor`, authorized already:
/// what the first call did, when that call was the actor's own, of the
/// same method with the same parameters ([`rules::replayed`]).
async fn replay(
    db: &mut impl Db,
    account: &AccountId,
    stored: StoredRequest,
    request: &RequestRecord,
    actor: &Actor,
) -> Result<Replay> {
    let (key_id, sealed, pepper_id) = rules::replayed(stored, request, &actor.name)?;
    let key = db
        .load_key(account, &key_id)
        .await?
        .ok_or_else(|| StoreError::internal("a request id names a key that is gone"))?;
    Ok(Replay {
        key,
        sealed,
        pepper_id,
    })
}

/// The key to change, its row locked; refuses a revoked key, and one no
/// longer at `if_version`.
async fn load_key_for_change(
    db: &mut impl Db,
    account: &AccountId,
    key_id: &KeyId,
    if_version: Option<i64>,
) -> Result<KeyRecord> {
    let key = db
        .lock_key(account, key_id)
        .await?
        .ok_or(StoreError::NotFound)?;
    rules::ensure_not_revoked(&key)?;
    rules::check_version(&key, if_version)?;
    Ok(key)
}

/// The cap check, with the account's row locked: the count sees every key
/// committed by whoever held the lock before.
async fn check_room(
    db: &mut impl Db,
    account: &AccountId,
    tier: Tier,
    now: OffsetDateTime,
    limits: TierLimits,
) -> Result<()> {
    rules::check_quota(tier, limits, db.count_active(account, now).await?)
}

/// Refuses to revoke (`after` is `None`) or weaken `before` (an active
/// management key) when that leaves its account without a management key
/// that has no expiry while it had one, or without any active one
/// ([`rules::check_keeps_a_manager`]). Called with the account's row
/// locked: two management keys revoking or cutting short each other at
/// once serialize, and the second sees the first's change.
async fn keep_a_manager(
    db: &mut impl Db,
    before: &KeyRecord,
    after: Option<&KeyRecord>,
    now: OffsetDateTime,
) -> Result<()> {
    let others = rules::count_managers(&db.other_active_keys(before, now).await?)?;
    rules::check_keeps_a_manager(before, after, others, now)
}

/// Writes the change's audit event, chained onto the account's head, moves
/// the head, and appends its prefixes to the change log. Called last in a
/// transaction: the head and the change log are the last locks it takes.
pub(crate) async fn record_change(db: &mut impl Db, record: &ChangeRecord<'_>) -> Result<()> {
    let head = db.lock_head(record.account).await?;
    let link = chain::append(head, record);
    db.append_event(record, &link).await?;
    for prefix in &record.publish {
        db.publish_change(prefix, record.at).await?;
    }
    Ok(())
}

/// Writes a new key, its first secret, its `created` event and its change.
pub(crate) async fn insert_new_key(db: &mut impl Db, new: &NewKey, actor: &Actor) -> Result<()> {
    db.insert_key(new).await?;
    let secret = NewSecret {
        prefix: new.prefix.clone(),
        hash: new.hash,
        pepper_id: new.pepper_id,
    };
    let row = SecretRow {
        key_id: &new.key_id,
        secret: &secret,
        created_at: new.created_at,
    };
    db.insert_secret(&row).await?;
    record_change(db, &ChangeRecord::created(new, actor)).await
}

/// [`crate::Store::create_key_with`].
#[derive(Debug)]
pub(crate) struct CreateKey {
    pub new: NewKey,
    pub request: Option<RequestRecord>,
    pub actor: Actor,
    pub policy: Policy,
}

impl CreateKey {
    pub async fn run(self, db: &mut impl Db) -> Result<Outcome<KeyRecord>> {
        let (new, actor, policy) = (&self.new, &self.actor, &self.policy);
        let account_id = &new.account_id;
        if let Some(request) = &self.request
            && let Some(stored) =
                claim_request(db, account_id, request, actor, new.created_at, policy).await?
        {
            // Authorized as the same call without an id would be: a caller
            // that may not create this key learns nothing of the first call.
            let account = db.load_account(account_id).await?;
            let grantable = account.grantable.as_ref().unwrap_or(&policy.grantable);
            rules::check_grants(None, &new.scopes, grantable, actor)?;
            let replay = replay(db, account_id, stored, request, actor).await?;
            return Ok(Outcome::Replayed(Box::new(replay)));
        }
        let account = db.lock_account(account_id, new.created_at).await?;
        let grantable = account.grantable.as_ref().unwrap_or(&policy.grantable);
        rules::check_grants(None, &new.scopes, grantable, actor)?;
        rules::check_stored(account.tier, policy, db.count_keys(account_id).await?)?;
        check_room(db, account_id, account.tier, new.created_at, policy.tiers).await?;
        insert_new_key(db, new, actor).await?;
        db.load_key(account_id, &new.key_id)
            .await?
            .map(Outcome::Done)
            .ok_or_else(|| StoreError::internal("created key vanished"))
    }
}

/// [`crate::Store::update_key`].
#[derive(Debug)]
pub(crate) struct UpdateKey {
    pub account: AccountId,
    pub key_id: KeyId,
    pub changes: KeyChanges,
    pub actor: Actor,
    pub now: OffsetDateTime,
    pub policy: Policy,
}

impl UpdateKey {
    /// Only what needs the account waits for its lock.
    pub async fn run(self, db: &mut impl Db) -> Result<KeyRecord> {
        let (account, actor, now, policy) = (&self.account, &self.actor, self.now, &self.policy);
        let if_version = self.changes.if_version;
        let before = load_key_for_change(db, account, &self.key_id, if_version).await?;
        let Some(update) = rules::plan_update(&before, self.changes, now) else {
            return Ok(before);
        };
        if update.needs_account() {
            let stored = db.lock_account(account, now).await?;
            let grantable = stored.grantable.as_ref().unwrap_or(&policy.grantable);
            rules::check_grants(Some(&before.scopes), &update.after.scopes, grantable, actor)?;
            if update.weakens_manager {
                keep_a_manager(db, &before, Some(&update.after), now).await?;
            }
            if update.needs_room {
                check_room(db, account, stored.tier, now, policy.tiers).await?;
            }
        }
        let rules::Update { after, diff, .. } = update;
        db.write_key(&after).await?;
        record_change(db, &ChangeRecord::updated(&after, diff, actor, now)).await?;
        Ok(after)
    }
}

/// [`crate::Store::rotate_key_with`].
#[derive(Debug)]
pub(crate) struct RotateKey {
    pub account: AccountId,
    pub key_id: KeyId,
    pub rotation: RotationRequest,
    pub actor: Actor,
    pub now: OffsetDateTime,
    pub policy: Policy,
}

impl RotateKey {
    pub async fn run(self, db: &mut impl Db) -> Result<Outcome<Rotation>> {
        let (account, key_id, now) = (&self.account, &self.key_id, self.now);
        let rotation = &self.rotation;
        let actor = &self.actor;
        if let Some(request) = &rotation.request
            && let Some(stored) =
                claim_request(db, account, request, actor, now, &self.policy).await?
        {
            let replay = replay(db, account, stored, request, actor).await?;
            return Ok(Outcome::Replayed(Box::new(replay)));
        }
        let secret = &rotation.secret;
        let before = load_key_for_change(db, account, key_id, rotation.if_version).await?;
        rules::ensure_rotatable(&before, now)?;
        db.supersede_secret(&before.prefix, now).await?;
        let row = SecretRow {
            key_id,
            secret,
            created_at: now,
        };
        db.insert_secret(&row).await?;
        let kept = self.policy.rotated_secrets_kept;
        let pruned = db.prune_key_secrets(key_id, kept).await?;
        db.write_key(&KeyRecord {
            prefix: secret.prefix.clone(),
            rotated_at: Some(now),
            version: before.version + 1,
            ..before.clone()
        })
        .await?;
        // The pruned secrets are published too: a node that cached one must
        // forget it, or it answers from memory for good.
        let mut record = ChangeRecord::rotated(&before, &secret.prefix, &self.actor, now);
        record.publish.extend(&pruned);
        record_change(db, &record).await?;
        let key = db
            .load_key(account, key_id)
            .await?
            .ok_or_else(|| StoreError::internal("rotated key vanished"))?;
        Ok(Outcome::Done(Rotation {
            key,
            replaced_prefix: before.prefix,
            pruned_prefixes: pruned,
        }))
    }
}

/// [`crate::Store::revoke_key_if`].
#[derive(Debug)]
pub(crate) struct RevokeKey {
    pub account: AccountId,
    pub key_id: KeyId,
    pub reason: String,
    pub if_version: Option<i64>,
    pub actor: Actor,
    pub now: OffsetDateTime,
}

impl RevokeKey {
    pub async fn run(self, db: &mut impl Db) -> Result<KeyRecord> {
        let (account, key_id, now) = (&self.account, &self.key_id, self.now);
        let before = load_key_for_change(db, account, key_id, self.if_version).await?;
        if rules::is_active_manager(&before, now) {
            db.lock_account(account, now).await?;
            keep_a_manager(db, &before, None, now).await?;
        }
        db.write_key(&KeyRecord {
            revoked_at: Some(now),
            revoke_reason: Some(self.reason.clone()),
            version: before.version + 1,
            ..before.clone()
        })
        .await?;
        let record = ChangeRecord::revoked(&before, &self.reason, &self.actor, now);
        record_change(db, &record).await?;
        db.load_key(account, key_id)
            .await?
            .ok_or_else(|| StoreError::internal("revoked key vanished"))
    }
}

/// [`crate::Store::set_tier`] and [`crate::Store::set_grantable_scopes`]:
/// the account's tier or its catalogue as given, with an event only when
/// it changes.
#[derive(Debug)]
pub(crate) struct SetAccount {
    pub account: AccountId,
    pub change: AccountChange,
    pub actor: Actor,
    pub now: OffsetDateTime,
}

/// What [`SetAccount`] sets.
#[derive(Debug)]
pub(crate) enum AccountChange {
    Tier(Tier),
    /// `None`: back to the server's catalogue.
    Grantable(Option<ScopeCatalogue>),
}

impl SetAccount {
    pub async fn run(self, db: &mut impl Db) -> Result<Account> {
        let (account, actor, now) = (&self.account, &self.actor, self.now);
        let stored = db.lock_account(account, now).await?;
        let (changed, record) = match self.change {
            AccountChange::Tier(tier) if tier != stored.tier => {
                let record = ChangeRecord::tier_changed(account, stored.tier, tier, actor, now);
                (Account { tier, ..stored }, record)
            }
            AccountChange::Grantable(grantable) if grantable != stored.grantable => {
                let (old, new) = (stored.grantable.as_ref(), grantable.as_ref());
                let record = ChangeRecord::grantable_changed(account, old, new, actor, now);
                let changed = Account {
                    tier: stored.tier,
                    grantable,
                };
                (changed, record)
            }
            _ => return Ok(stored),
        };
        db.update_account(account, &changed).await?;
        record_change(db, &record).await?;
        Ok(changed)
    }
}

/// [`crate::Store::prune_changes`]. The change log's lock keeps every
/// publisher out while the floor moves.
pub(crate) async fn prune_changes(db: &mut impl Db, before: OffsetDateTime) -> Result<u64> {
    db.lift_statement_timeout().await?;
    db.lock_change_log().await?;
    let last_old = db.last_prunable_change(before).await?;
    let floor = db.change_floor().await?;
    let Some(Prune { through, floor }) = rules::plan_prune(last_old, floor) else {
        return Ok(0);
    };
    let pruned = db.delete_changes_through(through).await?;
    db.set_change_floor(floor).await?;
    Ok(pruned)
}

/// [`crate::Store::prune_rotated_secrets`]. The deleted secrets are
/// published, so that nodes caching them forget them.
pub(crate) async fn prune_rotated_secrets(db: &mut impl Db, before: OffsetDateTime) -> Result<u64> {
    db.lift_statement_timeout().await?;
    let pruned = db.prune_superseded(before).await?;
    let now = OffsetDateTime::now_utc();
    for prefix in &pruned {
        db.publish_change(prefix, now).await?;
    }
    Ok(pruned.len() as u64)
}

/// [`crate::Store::import_keys`], for a non-empty `keys`.
pub(crate) async fn import_keys(db: &mut impl Db, keys: &[NewKey], actor: &Actor) -> Result<()> {
    db.lift_statement_timeout().await?;
    db.import_keys(keys, actor).await
}

/// [`crate::Store::list_keys`].
pub(crate) async fn list_keys(
    db: &mut impl Db,
    account: &AccountId,
    include_revoked: bool,
    at: Window,
) -> Result<Page<KeyRecord>> {
    let rows = db.list_keys(account, include_revoked, at).await?;
    Ok(rules::page(rows, at.limit))
}

/// [`crate::Store::list_audit_events`].
pub(crate) async fn list_audit_events(
    db: &mut impl Db,
    account: &AccountId,
    key_id: Option<&KeyId>,
    at: Window,
) -> Result<Page<AuditEvent>> {
    let page = EventPage {
        account,
        key_id,
        at,
    };
    let rows = db.list_events(&page).await?;
    Ok(rules::page(rows, at.limit))
}

/// [`crate::KeySource::changes_since`]. The floor is read after the
/// changes: a prune in between can only make this refuse changes it read
/// whole, never pass a gap.
pub(crate) async fn changes_since(
    db: &mut impl Db,
    seq: i64,
    limit: u32,
) -> Result<Vec<(i64, vilvik_keys_domain::KeyPrefix)>> {
    let changes = db.changes_after(seq, limit).await?;
    rules::check_not_pruned(seq, db.change_floor().await?)?;
    Ok(changes)
}

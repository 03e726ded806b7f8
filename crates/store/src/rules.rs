//! Rules both backends apply inside their transactions, written once: what
//! an update changes and whether it writes at all, what a key change
//! records (its audit event and the prefixes it publishes), which keys may
//! be rotated, how an account never seen reads, the tier cap, and the
//! change log's prune and floor rules. The backends run the queries; the
//! decisions are here, each with a unit test.

use time::OffsetDateTime;
use vilvik_keys_domain::{
    AccountId, AuditAction, KeyId, KeyPrefix, KeyState, PepperId, ScopeCatalogue, ScopeSet, Tier,
    TierLimits, format_time,
};

use crate::{
    Account, Actor, FieldChange, KeyChanges, KeyRecord, NewKey, Page, Policy, RequestMethod,
    RequestRecord, StoreError,
};

fn format_scopes(scopes: &ScopeSet) -> String {
    scopes.to_strings().join(" ")
}

fn change(field: &str, old: Option<String>, new: Option<String>) -> FieldChange {
    FieldChange {
        field: field.to_owned(),
        old,
        new,
    }
}

/// The `created` event lists every initial value.
pub(crate) fn created_changes(new: &NewKey) -> Vec<FieldChange> {
    vec![
        change("name", None, Some(new.name.to_string())),
        change(
            "description",
            None,
            Some(new.description.as_str().to_owned()),
        ),
        change("scopes", None, Some(format_scopes(&new.scopes))),
        change("expires_at", None, new.expires_at.map(format_time)),
        change("prefix", None, Some(new.prefix.to_string())),
    ]
}

fn rotated_changes(old: &KeyPrefix, new: &KeyPrefix) -> Vec<FieldChange> {
    vec![change(
        "prefix",
        Some(old.to_string()),
        Some(new.to_string()),
    )]
}

fn revoked_changes(reason: &str) -> Vec<FieldChange> {
    vec![change("reason", None, Some(reason.to_owned()))]
}

/// A catalogue as the audit log shows it.
pub(crate) fn format_catalogue(catalogue: Option<&ScopeCatalogue>) -> String {
    match catalogue {
        Some(catalogue) => catalogue.to_string(),
        None => "the server's allowed_scopes".to_owned(),
    }
}

fn tier_changes(old: Tier, new: Tier) -> Vec<FieldChange> {
    vec![change("tier", Some(old.to_string()), Some(new.to_string()))]
}

/// What an update does to `key`: the record after it and the fields that
/// really changed (setting a field to its current value records nothing).
fn apply_changes(key: &KeyRecord, changes: KeyChanges) -> (KeyRecord, Vec<FieldChange>) {
    let mut updated = key.clone();
    let mut diff = Vec::new();
    if let Some(name) = changes.name.filter(|n| *n != key.name) {
        diff.push(change(
            "name",
            Some(key.name.to_string()),
            Some(name.to_string()),
        ));
        updated.name = name;
    }
    if let Some(description) = changes.description.filter(|d| *d != key.description) {
        diff.push(change(
            "description",
            Some(key.description.as_str().to_owned()),
            Some(description.as_str().to_owned()),
        ));
        updated.description = description;
    }
    if let Some(scopes) = changes.scopes.filter(|s| *s != key.scopes) {
        diff.push(change(
            "scopes",
            Some(format_scopes(&key.scopes)),
            Some(format_scopes(&scopes)),
        ));
        updated.scopes = scopes;
    }
    if let Some(expires_at) = changes.expires_at.filter(|e| *e != key.expires_at) {
        diff.push(change(
            "expires_at",
            key.expires_at.map(format_time),
            expires_at.map(format_time),
        ));
        updated.expires_at = expires_at;
    }
    (updated, diff)
}

/// Refuses a change to a key that is revoked; revocation is final.
pub(crate) fn ensure_not_revoked(key: &KeyRecord) -> Result<(), StoreError> {
    match key.revoked_at {
        Some(revoked_at) => Err(StoreError::Revoked { revoked_at }),
        None => Ok(()),
    }
}

/// Whether an update turns an inactive key active, so that it needs room
/// under the cap like a new key.
fn reactivates(before: &KeyRecord, after: &KeyRecord, now: OffsetDateTime) -> bool {
    before.state(now) != KeyState::Active && after.state(now) == KeyState::Active
}

/// What an update of a key (already loaded and not revoked) writes.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Update {
    pub after: KeyRecord,
    /// The fields that really change, for the audit event.
    pub diff: Vec<FieldChange>,
    /// The update makes an inactive key active: check the cap first.
    pub needs_room: bool,
    /// The key gains scopes: check them against the account's catalogue.
    pub gains_scopes: bool,
    /// The update weakens an active management key ([`weakens_manager`]):
    /// the account must keep another one.
    pub weakens_manager: bool,
}

impl Update {
    /// Whether any of the update's checks reads the account, so that the
    /// backend must load (on Postgres, lock) its row first.
    pub fn needs_account(&self) -> bool {
        self.needs_room || self.gains_scopes || self.weakens_manager
    }
}

/// `None` when every field given already has that value: such an update
/// writes nothing, no event and no change-log entry.
pub(crate) fn plan_update(
    before: &KeyRecord,
    changes: KeyChanges,
    now: OffsetDateTime,
) -> Option<Update> {
    let (mut after, diff) = apply_changes(before, changes);
    if diff.is_empty() {
        return None;
    }
    after.version += 1;
    let gains_scopes = after.scopes.added_since(&before.scopes).next().is_some();
    Some(Update {
        needs_room: reactivates(before, &after, now),
        gains_scopes,
        weakens_manager: weakens_manager(before, &after, now),
        after,
        diff,
    })
}

/// Refuses to rotate a key that is revoked (final) or expired (extend it
/// first).
pub(crate) fn ensure_rotatable(key: &KeyRecord, now: OffsetDateTime) -> Result<(), StoreError> {
    ensure_not_revoked(key)?;
    match (key.state(now), key.expires_at) {
        (KeyState::Expired, Some(expires_at)) => Err(StoreError::Expired { expires_at }),
        _ => Ok(()),
    }
}

/// An account as stored: its tier and its own catalogue (`None` when no
/// row exists). An account never seen reads as `free`, with the server's
/// catalogue.
pub(crate) fn account(
    stored: Option<(String, Option<Vec<String>>)>,
) -> Result<Account, StoreError> {
    let Some((tier, grantable)) = stored else {
        return Ok(Account {
            tier: Tier::Free,
            grantable: None,
        });
    };
    Ok(Account {
        tier: field("tier", tier.parse::<Tier>())?,
        grantable: grantable.map(|g| catalogue(&g)).transpose()?,
    })
}

/// A stored catalogue of grantable scopes, parsed back.
pub(crate) fn catalogue(patterns: &[String]) -> Result<ScopeCatalogue, StoreError> {
    field(
        "grantable scopes",
        ScopeCatalogue::parse(patterns).map_err(|(_, e)| e),
    )
}

/// Refuses a change that grants a scope its actor may not: every scope a
/// key gains (all of a new key's, `before` being `None`) must be in the
/// account's catalogue, and the service's own scopes need the operator.
/// Scopes a key already holds stay, whatever the catalogue says now.
pub(crate) fn check_grants(
    before: Option<&ScopeSet>,
    after: &ScopeSet,
    catalogue: &ScopeCatalogue,
    actor: &Actor,
) -> Result<(), StoreError> {
    let empty = ScopeSet::default();
    after
        .added_since(before.unwrap_or(&empty))
        .try_for_each(|scope| catalogue.check_grant(scope, actor.operator))
        .map_err(StoreError::NotGrantable)
}

/// Whether the key lets its holder manage the account's keys now.
pub(crate) fn is_active_manager(key: &KeyRecord, now: OffsetDateTime) -> bool {
    key.state(now) == KeyState::Active && key.scopes.is_management()
}

/// Whether an update takes away or cuts short what makes `before` an
/// active management key: `keys:admin`, or its lifetime (a sooner
/// expiry). Such an update must leave another management key behind.
pub(crate) fn weakens_manager(before: &KeyRecord, after: &KeyRecord, now: OffsetDateTime) -> bool {
    let sooner = match (before.expires_at, after.expires_at) {
        (_, None) => false,
        (None, Some(_)) => true,
        (Some(old), Some(new)) => new < old,
    };
    is_active_manager(before, now) && (!after.scopes.is_management() || sooner)
}

/// Whether the key is an active management key without an expiry: one
/// that stays usable however much time passes.
pub(crate) fn is_lasting_manager(key: &KeyRecord, now: OffsetDateTime) -> bool {
    is_active_manager(key, now) && key.expires_at.is_none()
}

/// An account's active management keys other than the one a change is
/// about: how many, and how many of them have no expiry.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Managers {
    pub active: usize,
    pub lasting: usize,
}

/// [`Managers`] among these keys (the other active keys of the account,
/// their scopes as stored and their expiry).
pub(crate) fn count_managers(
    others: &[(Vec<String>, Option<OffsetDateTime>)],
) -> Result<Managers, StoreError> {
    let mut managers = Managers::default();
    for (scopes, expires_at) in others {
        if field("scopes", ScopeSet::from_stored(scopes))?.is_management() {
            managers.active += 1;
            managers.lasting += usize::from(expires_at.is_none());
        }
    }
    Ok(managers)
}

/// Refuses to revoke (`after` is `None`) or weaken `before`, an active
/// management key, when the account had a management key without an
/// expiry and would have none left (its managers would all expire in
/// time), or when it would have no active management key at all. An
/// account whose managers all expire already may still shuffle them, as
/// long as one stays active.
pub(crate) fn check_keeps_a_manager(
    before: &KeyRecord,
    after: Option<&KeyRecord>,
    others: Managers,
    now: OffsetDateTime,
) -> Result<(), StoreError> {
    let stays_lasting = after.is_some_and(|after| is_lasting_manager(after, now));
    let had_lasting = others.lasting > 0 || is_lasting_manager(before, now);
    if had_lasting && others.lasting == 0 && !stays_lasting {
        return Err(StoreError::LastLastingManager {
            key_id: before.key_id.clone(),
        });
    }
    if others.active == 0 {
        return Err(StoreError::LastManagementKey {
            key_id: before.key_id.clone(),
        });
    }
    Ok(())
}

/// What a change records besides itself, in the same transaction: its
/// audit event, and the prefixes it appends to the change log so that
/// verify nodes evict them. Each backend writes one with its own
/// `record_change`.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct ChangeRecord<'a> {
    pub account: &'a AccountId,
    /// `None` for an account-level change such as a tier.
    pub key_id: Option<&'a KeyId>,
    pub action: AuditAction,
    pub actor: &'a Actor,
    pub at: OffsetDateTime,
    pub changes: Vec<FieldChange>,
    /// The prefixes to publish, in this order.
    pub publish: Vec<&'a KeyPrefix>,
}

impl<'a> ChangeRecord<'a> {
    /// A new key publishes its prefix, so that a node which cached it as
    /// unknown forgets that.
    pub fn created(new: &'a NewKey, actor: &'a Actor) -> Self {
        Self {
            account: &new.account_id,
            key_id: Some(&new.key_id),
            action: AuditAction::Created,
            actor,
            at: new.created_at,
            changes: created_changes(new),
            publish: vec![&new.prefix],
        }
    }

    /// An update publishes the current secret's prefix; superseded
    /// secrets answer `ROTATED` whatever the key's fields say.
    pub fn updated(
        after: &'a KeyRecord,
        diff: Vec<FieldChange>,
        actor: &'a Actor,
        now: OffsetDateTime,
    ) -> Self {
        Self::of_key(after, AuditAction::Updated, actor, now, diff)
    }

    /// A rotation publishes the old prefix (its secret stops working) and
    /// then the new one.
    pub fn rotated(
        before: &'a KeyRecord,
        new: &'a KeyPrefix,
        actor: &'a Actor,
        now: OffsetDateTime,
    ) -> Self {
        let changes = rotated_changes(&before.prefix, new);
        let mut record = Self::of_key(before, AuditAction::Rotated, actor, now, changes);
        record.publish.push(new);
        record
    }

    /// A revocation publishes the current secret's prefix.
    pub fn revoked(
        before: &'a KeyRecord,
        reason: &str,
        actor: &'a Actor,
        now: OffsetDateTime,
    ) -> Self {
        Self::of_key(
            before,
            AuditAction::Revoked,
            actor,
            now,
            revoked_changes(reason),
        )
    }

    /// A change to `key`: it publishes the key's current prefix.
    fn of_key(
        key: &'a KeyRecord,
        action: AuditAction,
        actor: &'a Actor,
        at: OffsetDateTime,
        changes: Vec<FieldChange>,
    ) -> Self {
        let record = Self::of_account(&key.account_id, action, actor, at, changes);
        Self {
            key_id: Some(&key.key_id),
            publish: vec![&key.prefix],
            ..record
        }
    }

    /// A change to the account itself publishes nothing: no verify answer
    /// depends on it.
    fn of_account(
        account: &'a AccountId,
        action: AuditAction,
        actor: &'a Actor,
        at: OffsetDateTime,
        changes: Vec<FieldChange>,
    ) -> Self {
        Self {
            account,
            key_id: None,
            action,
            actor,
            at,
            changes,
            publish: Vec::new(),
        }
    }

    /// A tier change.
    pub fn tier_changed(
        account: &'a AccountId,
        old: Tier,
        new: Tier,
        actor: &'a Actor,
        now: OffsetDateTime,
    ) -> Self {
        let changes = tier_changes(old, new);
        Self::of_account(account, AuditAction::TierChanged, actor, now, changes)
    }

    /// A change of the account's catalogue of grantable scopes.
    pub fn grantable_changed(
        account: &'a AccountId,
        old: Option<&ScopeCatalogue>,
        new: Option<&ScopeCatalogue>,
        actor: &'a Actor,
        now: OffsetDateTime,
    ) -> Self {
        let changes = vec![change(
            "grantable_scopes",
            Some(format_catalogue(old)),
            Some(format_catalogue(new)),
        )];
        let action = AuditAction::GrantableScopesChanged;
        Self::of_account(account, action, actor, now, changes)
    }
}

/// The cap on active keys, checked with the account row locked.
pub(crate) fn check_quota(tier: Tier, limits: TierLimits, active: u32) -> Result<(), StoreError> {
    let limit = limits.for_tier(tier);
    if active >= limit {
        return Err(StoreError::QuotaExceeded {
            tier,
            limit,
            active,
            limits,
        });
    }
    Ok(())
}

/// The ceiling on stored keys (revoked and expired included), checked with
/// the account row locked, like the cap.
pub(crate) fn check_stored(tier: Tier, policy: &Policy, stored: u32) -> Result<(), StoreError> {
    let limit = policy.stored_key_limit(tier);
    if stored >= limit {
        return Err(StoreError::StoredKeysExceeded {
            tier,
            limit,
            stored,
        });
    }
    Ok(())
}

/// The cap on an account's request ids within their window, counted with
/// the new one in.
pub(crate) fn check_request_ids(limit: u32, live: u32) -> Result<(), StoreError> {
    if live > limit {
        return Err(StoreError::RequestIdsExhausted { limit });
    }
    Ok(())
}

/// A listing query fetches one row more than the page holds: if it came,
/// there is a next page, starting after the last row kept.
pub(crate) fn page<T>(mut items: Vec<(i64, T)>, limit: u32) -> Page<T> {
    let next_cursor = if items.len() > limit as usize {
        items.truncate(limit as usize);
        items.last().map(|(cursor, _)| *cursor)
    } else {
        None
    };
    Page {
        items: items.into_iter().map(|(_, item)| item).collect(),
        next_cursor,
    }
}

/// A stored value that does not parse: a bug or a hand-edited row.
pub(crate) fn corrupt(what: &str) -> impl FnOnce(String) -> StoreError + '_ {
    move |detail| StoreError::internal(format!("corrupt {what} in the database: {detail}"))
}

/// A stored value parsed back into its domain type; one that does not
/// parse is [`corrupt`]. E.g. `field("tier", text.parse::<Tier>())`.
pub(crate) fn field<T, E: std::fmt::Display>(
    what: &str,
    value: Result<T, E>,
) -> Result<T, StoreError> {
    value.map_err(|e| corrupt(what)(e.to_string()))
}

/// Refuses a change based on a version of the key other than the one
/// stored (the caller's etag is stale).
pub(crate) fn check_version(key: &KeyRecord, expected: Option<i64>) -> Result<(), StoreError> {
    match expected {
        Some(expected) if expected != key.version => Err(StoreError::StaleVersion {
            key_id: key.key_id.clone(),
            expected,
            current: key.version,
        }),
        _ => Ok(()),
    }
}

/// A request id's record as a backend read it back.
pub(crate) struct StoredRequest {
    pub method: String,
    pub params: Vec<u8>,
    pub key_id: String,
    pub sealed: Vec<u8>,
    pub pepper_id: i64,
    /// Who made the call (`key:<key_id>`, `operator:<actor>`).
    pub caller: String,
}

/// What a retry of `request` by `caller` answers with, given what its id
/// recorded: the key and the sealed secret of the first call, when that
/// call was the same caller's, of the same method with the same
/// parameters. Another caller learns nothing of the first call, not even
/// its method; the caller itself is told the method it used the id for.
pub(crate) fn replayed(
    stored: StoredRequest,
    request: &RequestRecord,
    caller: &str,
) -> Result<(KeyId, Vec<u8>, PepperId), StoreError> {
    if stored.caller != caller {
        return Err(StoreError::RequestIdNotYours);
    }
    let method = match stored.method.as_str() {
        "CreateKey" => RequestMethod::CreateKey,
        "RotateKey" => RequestMethod::RotateKey,
        other => return Err(corrupt("request method")(other.to_owned())),
    };
    if method != request.method || stored.params != request.params {
        return Err(StoreError::RequestIdReused { method });
    }
    let pepper_id = PepperId::from_stored(stored.pepper_id)
        .ok_or_else(|| corrupt("request pepper id")(stored.pepper_id.to_string()))?;
    Ok((
        field("request key id", stored.key_id.parse::<KeyId>())?,
        stored.sealed,
        pepper_id,
    ))
}

/// What a prune deletes and where the floor goes.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Prune {
    /// Entries up to and including this sequence number go.
    pub through: i64,
    /// The new `change_log_floor.pruned_through`.
    pub floor: i64,
}

/// The prune and floor rules. `last_old` is the newest entry recorded
/// before the cut-off that is not the newest entry of all (the backends'
/// query keeps the newest, so that the change sequence never goes back);
/// `None` means there is nothing to prune. The floor only ever rises: a
/// prune with an older cut-off never lowers it.
pub(crate) fn plan_prune(last_old: Option<i64>, floor: i64) -> Option<Prune> {
    last_old.map(|through| Prune {
        through,
        floor: floor.max(through),
    })
}

/// Refuses a catch-up from `seq` when entries after it were pruned.
pub(crate) fn check_not_pruned(seq: i64, pruned_through: i64) -> Result<(), StoreError> {
    if seq < pruned_through {
        return Err(StoreError::ChangesPruned { pruned_through });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use time::Duration;
    use vilvik_keys_domain::{GeneratedKey, GrantError, Pepper};

    use super::*;

    fn now() -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap()
    }

    fn actor() -> Actor {
        Actor {
            name: "operator:alice@example.com".into(),
            ip: None,
            operator: true,
        }
    }

    fn new_key() -> NewKey {
        NewKey::builder("ACME".parse().unwrap())
            .name("ci-runner".parse().unwrap())
            .scopes(ScopeSet::parse(&["datasets:read"]).unwrap())
            .created_at(now() - Duration::days(1))
            .build(&Pepper::generate())
            .0
    }

    fn key() -> KeyRecord {
        let new = new_key();
        KeyRecord {
            key_id: new.key_id,
            account_id: new.account_id,
            name: new.name,
            description: new.description,
            scopes: new.scopes,
            prefix: new.prefix,
            created_at: new.created_at,
            expires_at: None,
            revoked_at: None,
            revoke_reason: None,
            rotated_at: None,
            last_used_at: None,
            last_used_ip: None,
            usage: crate::KeyUsage::default(),
            version: 1,
        }
    }

    #[test]
    fn an_update_that_changes_nothing_writes_nothing() {
        let key = key();
        let same = KeyChanges {
            name: Some(key.name.clone()),
            description: Some(key.description.clone()),
            scopes: Some(key.scopes.clone()),
            expires_at: Some(key.expires_at),
            ..KeyChanges::default()
        };
        assert_eq!(plan_update(&key, same, now()), None);
        assert_eq!(plan_update(&key, KeyChanges::default(), now()), None);
    }

    #[test]
    fn an_update_writes_only_the_fields_that_change() {
        let key = key();
        let changes = KeyChanges {
            name: Some("nightly".parse().unwrap()),
            scopes: Some(key.scopes.clone()),
            ..KeyChanges::default()
        };
        let Some(Update {
            after,
            diff,
            needs_room,
            ..
        }) = plan_update(&key, changes, now())
        else {
            panic!("a new name is a change");
        };
        assert_eq!(after.name.as_str(), "nightly");
        assert_eq!(
            diff,
            [change(
                "name",
                Some("ci-runner".into()),
                Some("nightly".into())
            )]
        );
        assert!(!needs_room, "the key was active already");
    }

    #[test]
    fn extending_an_expired_key_needs_room_under_the_cap() {
        let mut expired = key();
        expired.expires_at = Some(now() - Duration::hours(1));
        let extend = KeyChanges {
            expires_at: Some(Some(now() + Duration::days(30))),
            ..KeyChanges::default()
        };
        assert!(matches!(
            plan_update(&expired, extend, now()),
            Some(Update {
                needs_room: true,
                ..
            })
        ));
        let still_expired = KeyChanges {
            expires_at: Some(Some(now() - Duration::minutes(1))),
            ..KeyChanges::default()
        };
        assert!(matches!(
            plan_update(&expired, still_expired, now()),
            Some(Update {
                needs_room: false,
                ..
            })
        ));
    }

    #[test]
    fn only_a_key_neither_revoked_nor_expired_may_be_rotated() {
        let active = key();
        assert!(ensure_rotatable(&active, now()).is_ok());

        let mut expired = key();
        let expires_at = now() - Duration::seconds(1);
        expired.expires_at = Some(expires_at);
        assert!(matches!(
            ensure_rotatable(&expired, now()),
            Err(StoreError::Expired { expires_at: at }) if at == expires_at
        ));

        let mut revoked = expired.clone();
        revoked.revoked_at = Some(now() - Duration::hours(2));
        assert!(
            matches!(
                ensure_rotatable(&revoked, now()),
                Err(StoreError::Revoked { .. })
            ),
            "revocation wins over expiry"
        );

        let mut expiring_later = key();
        expiring_later.expires_at = Some(now() + Duration::seconds(1));
        assert!(ensure_rotatable(&expiring_later, now()).is_ok());
    }

    #[test]
    fn an_account_never_seen_reads_as_free() {
        let never_seen = account(None).unwrap();
        assert_eq!((never_seen.tier, never_seen.grantable), (Tier::Free, None));
        let stored = account(Some(("premium".into(), Some(vec!["datasets:*".into()])))).unwrap();
        assert_eq!(stored.tier, Tier::Premium);
        assert_eq!(stored.grantable.unwrap().to_strings(), ["datasets:*"]);
        for corrupt in [
            ("gold", None),
            ("free", Some(vec!["keys:admin".to_owned()])),
        ] {
            let (tier, grantable) = corrupt;
            assert!(matches!(
                account(Some((tier.into(), grantable))),
                Err(StoreError::Internal(..))
            ));
        }
    }

    fn scopes(list: &[&str]) -> ScopeSet {
        ScopeSet::parse(list).unwrap()
    }

    #[test]
    fn only_scopes_gained_are_checked_and_keys_admin_needs_the_operator() {
        let narrow = ScopeCatalogue::parse(&["datasets:*"]).unwrap();
        let key = Actor {
            operator: false,
            ..actor()
        };
        let admin = scopes(&["datasets:read", "keys:admin"]);
        assert!(matches!(
            check_grants(None, &admin, &narrow, &key),
            Err(StoreError::NotGrantable(GrantError::OperatorOnly(_)))
        ));
        assert!(check_grants(None, &admin, &narrow, &actor()).is_ok());
        // Kept, not gained: a key that holds keys:admin may be renamed or
        // narrowed by a management key.
        assert!(check_grants(Some(&admin), &scopes(&["keys:admin"]), &narrow, &key).is_ok());
        // Held before the catalogue narrowed: stays.
        let old = scopes(&["billing:read"]);
        let more = scopes(&["billing:read", "datasets:read"]);
        assert!(check_grants(Some(&old), &more, &narrow, &key).is_ok());
        assert!(matches!(
            check_grants(Some(&more), &scopes(&["billing:write"]), &narrow, &key),
            Err(StoreError::NotGrantable(
                GrantError::OutsideCatalogue { .. }
            ))
        ));
    }

    #[test]
    fn a_manager_is_weakened_by_losing_keys_admin_or_a_sooner_expiry() {
        let mut manager = key();
        manager.scopes = scopes(&["keys:*"]);
        let later = now() + Duration::days(30);
        let change = |manager: &KeyRecord, f: &dyn Fn(&mut KeyRecord)| {
            let mut after = manager.clone();
            f(&mut after);
            weakens_manager(manager, &after, now())
        };
        assert!(change(&manager, &|k| k.scopes = scopes(&["datasets:read"])));
        assert!(change(&manager, &|k| k.expires_at = Some(later)));
        assert!(!change(&manager, &|k| k.scopes = scopes(&["keys:admin", "a:b"])));
        assert!(!change(&manager, &|k| k.name = "renamed".parse().unwrap()));
        manager.expires_at = Some(later);
        assert!(!change(&manager, &|k| k.expires_at = None));
        assert!(!change(&manager, &|k| k.expires_at =
            Some(later + Duration::days(1))));
        assert!(change(&manager, &|k| k.expires_at =
            Some(later - Duration::days(1))));
        // A key that manages nothing now is not weakened by anything.
        let plain = key();
        let mut after = plain.clone();
        after.expires_at = Some(later);
        assert!(!weakens_manager(&plain, &after, now()));
        let mut expired = manager.clone();
        expired.expires_at = Some(now() - Duration::days(1));
        assert!(!is_active_manager(&expired, now()));
    }

    #[test]
    fn stored_keys_are_capped_at_a_multiple_of_the_tier_cap() {
        let policy = Policy {
            stored_keys_per_active_key: 2,
            ..Policy::from(TierLimits {
                free: 3,
                premium: 5,
            })
        };
        assert!(check_stored(Tier::Free, &policy, 5).is_ok());
        assert!(matches!(
            check_stored(Tier::Free, &policy, 6),
            Err(StoreError::StoredKeysExceeded {
                limit: 6,
                stored: 6,
                ..
            })
        ));
        assert!(check_stored(Tier::Premium, &policy, 9).is_ok());
        let huge = Policy {
            stored_keys_per_active_key: u32::MAX,
            ..Policy::default()
        };
        assert_eq!(huge.stored_key_limit(Tier::Free), u32::MAX);
    }

    #[test]
    fn an_update_reads_the_account_only_for_a_check_that_needs_it() {
        let mut manager = key();
        manager.scopes = scopes(&["datasets:read", "keys:admin"]);
        let plan = |changes: KeyChanges| plan_update(&manager, changes, now()).unwrap();
        let renamed = plan(KeyChanges {
            name: Some("renamed".parse().unwrap()),
            ..KeyChanges::default()
        });
        assert!(!renamed.needs_account());
        let narrowed = plan(KeyChanges {
            scopes: Some(scopes(&["keys:admin"])),
            ..KeyChanges::default()
        });
        assert!(!narrowed.gains_scopes && !narrowed.needs_account());
        let widened = plan(KeyChanges {
            scopes: Some(scopes(&["datasets:*", "keys:admin"])),
            ..KeyChanges::default()
        });
        assert!(widened.gains_scopes && widened.needs_account());
        let stripped = plan(KeyChanges {
            scopes: Some(scopes(&["datasets:read"])),
            ..KeyChanges::default()
        });
        assert!(!stripped.gains_scopes && stripped.weakens_manager && stripped.needs_account());
    }

    #[test]
    fn managers_are_counted_and_those_without_an_expiry_apart() {
        let later = Some(now() + Duration::days(1));
        let strings = |list: &[&str]| list.iter().map(|s| (*s).to_owned()).collect();
        let others = vec![
            (strings(&["datasets:read"]), None),
            (strings(&["keys:admin", "a:b"]), later),
            (strings(&["keys:*"]), None),
            (strings(&["keys:read"]), None),
        ];
        assert_eq!(
            count_managers(&others).unwrap(),
            Managers {
                active: 2,
                lasting: 1
            }
        );
    }

    #[test]
    fn an_account_keeps_a_manager_without_an_expiry_once_it_has_one() {
        let mut lasting = key();
        lasting.scopes = scopes(&["keys:admin"]);
        let mut expiring = lasting.clone();
        expiring.expires_at = Some(now() + Duration::seconds(4));
        let none = Managers::default();
        let one_expiring = Managers {
            active: 1,
            lasting: 0,
        };
        let one_lasting = Managers {
            active: 1,
            lasting: 1,
        };
        let last_lasting =
            |r: Result<(), StoreError>| matches!(r, Err(StoreError::LastLastingManager { .. }));
        // A stolen expiring key revokes the owner's lasting one, or gives
        // it an expiry: refused, whatever the other's expiry.
        assert!(last_lasting(check_keeps_a_manager(
            &lasting,
            None,
            one_expiring,
            now()
        )));
        let soon = Some(&expiring);
        assert!(last_lasting(check_keeps_a_manager(
            &lasting,
            soon,
            one_expiring,
            now()
        )));
        // With another lasting manager, either goes.
        assert!(check_keeps_a_manager(&lasting, None, one_lasting, now()).is_ok());
        assert!(check_keeps_a_manager(&lasting, soon, one_lasting, now()).is_ok());
        // An expiring manager may go while a lasting one stays.
        assert!(check_keeps_a_manager(&expiring, None, one_lasting, now()).is_ok());
        // Only expiring managers: the account must keep an active one.
        assert!(check_keeps_a_manager(&expiring, None, one_expiring, now()).is_ok());
        assert!(matches!(
            check_keeps_a_manager(&expiring, None, none, now()),
            Err(StoreError::LastManagementKey { .. })
        ));
        let sooner = KeyRecord {
            expires_at: Some(now() + Duration::seconds(1)),
            ..expiring.clone()
        };
        assert!(matches!(
            check_keeps_a_manager(&expiring, Some(&sooner), none, now()),
            Err(StoreError::LastManagementKey { .. })
        ));
        // The only manager of all, lasting: the stricter refusal names it.
        assert!(last_lasting(check_keeps_a_manager(
            &lasting,
            None,
            none,
            now()
        )));
    }

    #[test]
    fn each_change_publishes_the_prefixes_caches_must_forget() {
        let actor = actor();
        let new = new_key();
        let created = ChangeRecord::created(&new, &actor);
        assert_eq!(created.publish, [&new.prefix]);
        assert_eq!(created.action, AuditAction::Created);
        assert_eq!(created.at, new.created_at);

        let key = key();
        let updated = ChangeRecord::updated(&key, Vec::new(), &actor, now());
        assert_eq!(updated.publish, [&key.prefix]);

        let fresh = GeneratedKey::generate(&Pepper::generate());
        let rotated = ChangeRecord::rotated(&key, fresh.prefix(), &actor, now());
        assert_eq!(
            rotated.publish,
            [&key.prefix, fresh.prefix()],
            "the old secret first, then the new"
        );
        assert_eq!(
            rotated.changes,
            [change(
                "prefix",
                Some(key.prefix.to_string()),
                Some(fresh.prefix().to_string())
            )]
        );

        let revoked = ChangeRecord::revoked(&key, "leaked", &actor, now());
        assert_eq!(revoked.publish, [&key.prefix]);
        assert_eq!(revoked.key_id, Some(&key.key_id));

        let tier =
            ChangeRecord::tier_changed(&key.account_id, Tier::Free, Tier::Premium, &actor, now());
        assert!(
            tier.publish.is_empty(),
            "no verify answer depends on a tier"
        );
        assert_eq!(tier.key_id, None);
    }

    #[test]
    fn a_prune_moves_the_floor_up_never_down() {
        assert_eq!(plan_prune(None, 7), None, "nothing old enough");
        assert_eq!(
            plan_prune(Some(12), 7),
            Some(Prune {
                through: 12,
                floor: 12
            })
        );
        assert_eq!(
            plan_prune(Some(5), 7),
            Some(Prune {
                through: 5,
                floor: 7
            }),
            "an older cut-off leaves the floor where it is"
        );
    }

    #[test]
    fn a_catch_up_below_the_floor_is_refused() {
        assert!(check_not_pruned(7, 7).is_ok());
        assert!(check_not_pruned(8, 7).is_ok());
        assert!(matches!(
            check_not_pruned(6, 7),
            Err(StoreError::ChangesPruned { pruned_through: 7 })
        ));
    }

    #[test]
    fn a_request_id_replays_only_to_its_caller_and_only_the_same_call() {
        let key = key();
        let request = RequestRecord {
            digest: [1; 32],
            method: RequestMethod::RotateKey,
            params: [2; 32],
            key_id: key.key_id.clone(),
            sealed: vec![3; 4],
            pepper_id: Pepper::generate().id(),
            expires_at: now(),
        };
        let stored = |caller: &str, params: [u8; 32]| StoredRequest {
            method: "RotateKey".into(),
            params: params.to_vec(),
            key_id: key.key_id.to_string(),
            sealed: vec![3; 4],
            pepper_id: request.pepper_id.to_stored(),
            caller: caller.into(),
        };
        let mine = "key:key_000000000000000000aa";
        let (key_id, sealed, _) = replayed(stored(mine, [2; 32]), &request, mine).unwrap();
        assert_eq!((key_id, sealed), (key.key_id.clone(), vec![3; 4]));
        // Another caller learns nothing, not even that the parameters differ.
        for params in [[2; 32], [9; 32]] {
            assert!(matches!(
                replayed(stored(mine, params), &request, "operator:bob@example.com"),
                Err(StoreError::RequestIdNotYours)
            ));
        }
        // A record from before callers were stored is nobody's.
        assert!(matches!(
            replayed(stored("", [2; 32]), &request, mine),
            Err(StoreError::RequestIdNotYours)
        ));
        assert!(matches!(
            replayed(stored(mine, [9; 32]), &request, mine),
            Err(StoreError::RequestIdReused {
                method: RequestMethod::RotateKey
            })
        ));
    }

    #[test]
    fn request_ids_are_capped_per_account_counting_the_new_one() {
        assert!(check_request_ids(3, 3).is_ok());
        assert!(matches!(
            check_request_ids(3, 4),
            Err(StoreError::RequestIdsExhausted { limit: 3 })
        ));
    }

    #[test]
    fn the_cap_counts_active_keys_against_the_tier() {
        let limits = TierLimits {
            free: 2,
            premium: 5,
        };
        assert!(check_quota(Tier::Free, limits, 1).is_ok());
        assert!(matches!(
            check_quota(Tier::Free, limits, 2),
            Err(StoreError::QuotaExceeded {
                tier: Tier::Free,
                limit: 2,
                active: 2,
                ..
            })
        ));
        assert!(check_quota(Tier::Premium, limits, 4).is_ok());
    }
}

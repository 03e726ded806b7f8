//! Rules both backends apply inside their transactions, written once: what
//! an update changes, what the audit log says about it, and the tier cap.

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use vilvik_keys_domain::{
    AccountId, Description, KeyId, KeyName, KeyPrefix, KeyState, ScopeSet, Tier, TierLimits,
};

use crate::{FieldChange, KeyChanges, KeyRecord, NewKey, Page, StoreError};

pub(crate) fn format_time(at: OffsetDateTime) -> String {
    at.format(&Rfc3339).unwrap_or_else(|_| at.to_string())
}

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

pub(crate) fn rotated_changes(old: &KeyPrefix, new: &KeyPrefix) -> Vec<FieldChange> {
    vec![change(
        "prefix",
        Some(old.to_string()),
        Some(new.to_string()),
    )]
}

pub(crate) fn revoked_changes(reason: &str) -> Vec<FieldChange> {
    vec![change("reason", None, Some(reason.to_owned()))]
}

pub(crate) fn tier_changes(old: Tier, new: Tier) -> Vec<FieldChange> {
    vec![change("tier", Some(old.to_string()), Some(new.to_string()))]
}

/// What an update does to `key`: the record after it and the fields that
/// really changed (setting a field to its current value records nothing).
pub(crate) fn apply_changes(key: &KeyRecord, changes: KeyChanges) -> (KeyRecord, Vec<FieldChange>) {
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
pub(crate) fn reactivates(before: &KeyRecord, after: &KeyRecord, now: OffsetDateTime) -> bool {
    before.state(now) != KeyState::Active && after.state(now) == KeyState::Active
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

/// A key row's columns as both backends read them, before parsing.
pub(crate) struct RawKey {
    pub key_id: String,
    pub account_id: String,
    pub name: String,
    pub description: String,
    pub scopes: Vec<String>,
    pub prefix: String,
    pub created_at: OffsetDateTime,
    pub expires_at: Option<OffsetDateTime>,
    pub revoked_at: Option<OffsetDateTime>,
    pub revoke_reason: Option<String>,
    pub rotated_at: Option<OffsetDateTime>,
    pub last_used_at: Option<OffsetDateTime>,
    pub last_used_ip: Option<String>,
}

impl RawKey {
    /// Parses the stored text into domain values; a value that does not
    /// parse is a corrupt row.
    pub fn parse(self) -> Result<KeyRecord, StoreError> {
        Ok(KeyRecord {
            key_id: field("key id", self.key_id.parse::<KeyId>())?,
            account_id: field("account id", self.account_id.parse::<AccountId>())?,
            name: field("name", self.name.parse::<KeyName>())?,
            description: field("description", self.description.parse::<Description>())?,
            scopes: field("scopes", ScopeSet::parse(&self.scopes).map_err(|(_, e)| e))?,
            prefix: field("prefix", self.prefix.parse::<KeyPrefix>())?,
            created_at: self.created_at,
            expires_at: self.expires_at,
            revoked_at: self.revoked_at,
            revoke_reason: self.revoke_reason,
            rotated_at: self.rotated_at,
            last_used_at: self.last_used_at,
            last_used_ip: self.last_used_ip,
        })
    }
}

/// Refuses a catch-up from `seq` when entries after it were pruned.
pub(crate) fn check_not_pruned(seq: i64, pruned_through: i64) -> Result<(), StoreError> {
    if seq < pruned_through {
        return Err(StoreError::ChangesPruned { pruned_through });
    }
    Ok(())
}

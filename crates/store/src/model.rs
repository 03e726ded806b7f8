//! The records the store reads and writes.

use time::OffsetDateTime;
use vilvik_keys_domain::{
    AccountId, AuditAction, Description, KeyId, KeyName, KeyPrefix, KeyState, ScopeSet, SecretHash,
    Tier,
};

/// A key as stored: everything but its secret hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRecord {
    pub key_id: KeyId,
    pub account_id: AccountId,
    pub name: KeyName,
    pub description: Description,
    pub scopes: ScopeSet,
    /// The prefix of the current secret.
    pub prefix: KeyPrefix,
    pub created_at: OffsetDateTime,
    pub expires_at: Option<OffsetDateTime>,
    pub revoked_at: Option<OffsetDateTime>,
    pub revoke_reason: Option<String>,
    pub rotated_at: Option<OffsetDateTime>,
    pub last_used_at: Option<OffsetDateTime>,
    pub last_used_ip: Option<String>,
}

impl KeyRecord {
    pub fn state(&self, now: OffsetDateTime) -> KeyState {
        KeyState::at(now, self.expires_at, self.revoked_at)
    }
}

/// What [`crate::Store::rotate_key`] did: the key as it is now, and the
/// prefix of the secret it replaced, which caches must forget.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rotation {
    pub key: KeyRecord,
    pub replaced_prefix: KeyPrefix,
}

/// What [`crate::Store::create_key`] needs; the server generates the id,
/// prefix and hash.
#[derive(Debug, Clone)]
pub struct NewKey {
    pub key_id: KeyId,
    pub account_id: AccountId,
    pub name: KeyName,
    pub description: Description,
    pub scopes: ScopeSet,
    pub expires_at: Option<OffsetDateTime>,
    pub prefix: KeyPrefix,
    pub hash: SecretHash,
    pub created_at: OffsetDateTime,
}

/// Which fields an update sets; `None` leaves a field as it is.
#[derive(Debug, Clone, Default)]
pub struct KeyChanges {
    pub name: Option<KeyName>,
    pub description: Option<Description>,
    pub scopes: Option<ScopeSet>,
    /// `Some(None)` removes the expiry.
    pub expires_at: Option<Option<OffsetDateTime>>,
}

/// Who made a change, as the audit log records it. Derived from the
/// caller's credential, never from a request field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Actor {
    /// E.g. `key:key_3kTMd8sQ0Lr6bA2xYv9Z` or `operator:alice@example.com`.
    pub name: String,
    pub ip: Option<String>,
}

/// One secret of a key, found by its prefix, with the key it belongs to.
#[derive(Debug, Clone)]
pub struct SecretRecord {
    pub hash: SecretHash,
    /// Set once the key was rotated away from this secret.
    pub superseded_at: Option<OffsetDateTime>,
    pub key: KeyRecord,
}

/// What a verify node keeps of one secret: the secret and what verification
/// needs of its key, no more. [`crate::KeySource::stream_secrets`] hands these
/// out in bulk, so it carries no description, revoke reason or usage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretEntry {
    pub prefix: KeyPrefix,
    pub hash: SecretHash,
    /// The key was rotated away from this secret.
    pub superseded: bool,
    /// The key is revoked.
    pub revoked: bool,
    pub expires_at: Option<OffsetDateTime>,
    pub key_id: KeyId,
    pub account_id: AccountId,
    pub name: KeyName,
    pub scopes: ScopeSet,
}

impl SecretRecord {
    /// The part of this record a verify node keeps, for the secret `prefix`.
    pub fn into_entry(self, prefix: KeyPrefix) -> SecretEntry {
        let key = self.key;
        SecretEntry {
            prefix,
            hash: self.hash,
            superseded: self.superseded_at.is_some(),
            revoked: key.revoked_at.is_some(),
            expires_at: key.expires_at,
            key_id: key.key_id,
            account_id: key.account_id,
            name: key.name,
            scopes: key.scopes,
        }
    }
}

/// The latest use of a key seen by a verify node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageRecord {
    pub key_id: KeyId,
    pub at: OffsetDateTime,
    pub ip: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Account {
    pub tier: Tier,
}

/// One field's value before and after a change, rendered as text. Never a
/// secret: the prefix is the most of a secret an audit event may hold.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FieldChange {
    pub field: String,
    pub old: Option<String>,
    pub new: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEvent {
    pub event_id: i64,
    pub account_id: AccountId,
    /// `None` for account-level events such as a tier change.
    pub key_id: Option<KeyId>,
    pub action: AuditAction,
    pub actor: String,
    pub actor_ip: Option<String>,
    pub at: OffsetDateTime,
    pub changes: Vec<FieldChange>,
}

/// One page of a listing and the cursor of the next, if there is more.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next_cursor: Option<i64>,
}

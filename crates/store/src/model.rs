//! The records the store reads and writes.

use time::OffsetDateTime;
use vilvik_keys_domain::{
    AccountId, AuditAction, Description, GeneratedKey, KeyId, KeyName, KeyPrefix, KeyState, Pepper,
    PepperId, ScopeCatalogue, ScopeSet, SecretHash, Tier, TierLimits,
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
    /// The last valid use (INSUFFICIENT_SCOPE and the other rejections
    /// do not count).
    pub last_used_at: Option<OffsetDateTime>,
    /// Of the last valid use: the claimed address when the caller sent
    /// one, else the observed one (what it always meant; rows used before
    /// [`KeyUsage`] existed cannot say which).
    pub last_used_ip: Option<String>,
    /// Where uses came from, told apart, and how many there were.
    pub usage: KeyUsage,
    /// Raised by every change of the key (update, rotation, revocation),
    /// not by its use: what the API's `etag` is made of.
    pub version: i64,
}

impl KeyRecord {
    pub fn state(&self, now: OffsetDateTime) -> KeyState {
        KeyState::at(now, self.expires_at, self.revoked_at)
    }
}

/// What [`crate::Store::rotate_key`] did: the key as it is now, the
/// prefix of the secret it replaced, and those of the old secrets it
/// deleted ([`Policy::rotated_secrets_kept`]); caches must forget them all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rotation {
    pub key: KeyRecord,
    pub replaced_prefix: KeyPrefix,
    pub pruned_prefixes: Vec<KeyPrefix>,
}

/// Which call a request id named.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestMethod {
    CreateKey,
    RotateKey,
}

impl RequestMethod {
    /// The RPC's name, as stored and as said to the caller.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::CreateKey => "CreateKey",
            Self::RotateKey => "RotateKey",
        }
    }
}

/// What a create or rotation made under a request id leaves for its
/// retries, written in the change's own transaction: a retry with the
/// same id and parameters before `expires_at` gets [`Replay`] instead of
/// a second change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestRecord {
    /// The request id's digest (`RequestId::digest`), never the id.
    pub digest: [u8; 32],
    pub method: RequestMethod,
    /// A digest of the call's other parameters: a retry must repeat them.
    pub params: [u8; 32],
    /// The key created or rotated.
    pub key_id: KeyId,
    /// The secret the call returned, sealed (`seal_secret`): only the
    /// request id and the pepper together open it.
    pub sealed: Vec<u8>,
    /// The pepper it is sealed under.
    pub pepper_id: PepperId,
    pub expires_at: OffsetDateTime,
}

/// A call repeated with its request id: the key as it is now, and the
/// sealed secret the first call returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replay {
    pub key: KeyRecord,
    pub sealed: Vec<u8>,
    pub pepper_id: PepperId,
}

/// What a call made with an optional request id did: the change, or (a
/// retry) what the first call with that id did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome<T> {
    Done(T),
    Replayed(Box<Replay>),
}

/// What [`crate::Store::rotate_key_with`] needs: the new secret, the
/// version the caller last saw (`None`: any), and the request id's record.
#[derive(Debug, Clone)]
pub struct RotationRequest {
    pub secret: NewSecret,
    pub if_version: Option<i64>,
    pub request: Option<RequestRecord>,
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
    /// The pepper the hash is keyed with.
    pub pepper_id: PepperId,
    pub created_at: OffsetDateTime,
}

/// A secret to store for a key (a rotation's new one): its prefix, its
/// hash and the id of the pepper the hash is keyed with. Never the secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewSecret {
    pub prefix: KeyPrefix,
    pub hash: SecretHash,
    pub pepper_id: PepperId,
}

impl From<&GeneratedKey> for NewSecret {
    fn from(secret: &GeneratedKey) -> Self {
        Self {
            prefix: secret.prefix().clone(),
            hash: secret.hash(),
            pepper_id: secret.pepper_id(),
        }
    }
}

impl NewKey {
    /// Starts a key for `account`, for tests, tools and any caller that
    /// does not set every field: named `key`, no description, no scopes,
    /// no expiry, a fresh id, created now (to the microsecond, the
    /// precision both backends store).
    pub fn builder(account: AccountId) -> NewKeyBuilder {
        let now = OffsetDateTime::now_utc();
        NewKeyBuilder {
            key_id: None,
            account_id: account,
            name: "key".parse().expect("a valid key name"),
            description: Description::default(),
            scopes: ScopeSet::default(),
            expires_at: None,
            created_at: now
                .replace_nanosecond(now.nanosecond() / 1_000 * 1_000)
                .expect("a whole microsecond is a valid time"),
        }
    }
}

/// Builds a [`NewKey`]; see [`NewKey::builder`].
#[derive(Debug, Clone)]
#[must_use]
pub struct NewKeyBuilder {
    key_id: Option<KeyId>,
    account_id: AccountId,
    name: KeyName,
    description: Description,
    scopes: ScopeSet,
    expires_at: Option<OffsetDateTime>,
    created_at: OffsetDateTime,
}

impl NewKeyBuilder {
    /// Instead of a generated id.
    pub fn key_id(mut self, key_id: KeyId) -> Self {
        self.key_id = Some(key_id);
        self
    }

    pub fn name(mut self, name: KeyName) -> Self {
        self.name = name;
        self
    }

    pub fn description(mut self, description: Description) -> Self {
        self.description = description;
        self
    }

    pub fn scopes(mut self, scopes: ScopeSet) -> Self {
        self.scopes = scopes;
        self
    }

    pub fn expires_at(mut self, expires_at: Option<OffsetDateTime>) -> Self {
        self.expires_at = expires_at;
        self
    }

    pub fn created_at(mut self, created_at: OffsetDateTime) -> Self {
        self.created_at = created_at;
        self
    }

    /// The key for `secret`, of which it keeps only the prefix and hash.
    pub fn build_for(self, secret: &GeneratedKey) -> NewKey {
        NewKey {
            key_id: self.key_id.unwrap_or_else(KeyId::generate),
            account_id: self.account_id,
            name: self.name,
            description: self.description,
            scopes: self.scopes,
            expires_at: self.expires_at,
            prefix: secret.prefix().clone(),
            hash: secret.hash(),
            pepper_id: secret.pepper_id(),
            created_at: self.created_at,
        }
    }

    /// The key for a freshly generated secret hashed with `pepper`, and
    /// that secret: the store keeps only its hash, so this is the caller's
    /// one chance to see it.
    pub fn build(self, pepper: &Pepper) -> (NewKey, GeneratedKey) {
        let secret = GeneratedKey::generate(pepper);
        (self.build_for(&secret), secret)
    }
}

/// Which fields an update sets; `None` leaves a field as it is.
#[derive(Debug, Clone, Default)]
pub struct KeyChanges {
    pub name: Option<KeyName>,
    pub description: Option<Description>,
    pub scopes: Option<ScopeSet>,
    /// `Some(None)` removes the expiry.
    pub expires_at: Option<Option<OffsetDateTime>>,
    /// Apply only if the key is still at this version (the caller's etag);
    /// else [`crate::StoreError::StaleVersion`].
    pub if_version: Option<i64>,
}

/// Who made a change, as the audit log records it. Derived from the
/// caller's credential, never from a request field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Actor {
    /// E.g. `key:key_3kTMd8sQ0Lr6bA2xYv9Z` or `operator:alice@example.com`.
    pub name: String,
    pub ip: Option<String>,
    /// Whether the change is made with the operator's authority (the
    /// operator token, `bootstrap`, an import): only such a change may
    /// grant the service's own scopes (`keys:admin`).
    pub operator: bool,
}

/// One secret of a key, found by its prefix, with the key it belongs to.
#[derive(Debug, Clone)]
pub struct SecretRecord {
    pub hash: SecretHash,
    /// The pepper the hash is keyed with; `None`: a legacy unkeyed hash.
    pub pepper_id: Option<PepperId>,
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
    /// The pepper the hash is keyed with; `None`: a legacy unkeyed hash.
    pub pepper_id: Option<PepperId>,
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
            pepper_id: self.pepper_id,
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

/// A secret to re-hash (verified under an older pepper, or a legacy unkeyed
/// hash): written only if the stored hash and pepper id are still `old_*`,
/// so a concurrent change is never undone and two nodes doing the same
/// re-hash write it once. Only the hash and the pepper id change: the key
/// itself did not, so this is no audited change and publishes nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rehash {
    pub prefix: KeyPrefix,
    pub old_hash: SecretHash,
    pub old_pepper_id: Option<PepperId>,
    pub new_hash: SecretHash,
    pub new_pepper_id: PepperId,
}

/// How many secrets one pepper id covers, for deciding whether a pepper
/// can be retired.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PepperUse {
    /// `None`: legacy unkeyed hashes.
    pub pepper_id: Option<PepperId>,
    /// Secrets that can still verify as their key: the current secret of
    /// a key not revoked (expired keys included: UpdateKey can extend
    /// them). Retiring the pepper while this is above 0 locks those keys
    /// out (NOT_FOUND).
    pub live: u64,
    /// Every secret, including rotated-away ones and those of revoked
    /// keys, which once their pepper is retired answer NOT_FOUND instead
    /// of ROTATED or REVOKED: invalid either way.
    pub total: u64,
}

/// What verify nodes reported of a key's uses beyond `last_used_at`:
/// written behind, never a change of the key. Counts are since the
/// columns were added, and may fall short of the truth when a node's
/// pending map was full or its final flush was abandoned.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyUsage {
    /// Of the last valid use: the address the verify listener saw (its
    /// peer, or the forwarded client when the peer is a trusted proxy).
    pub last_used_observed_ip: Option<String>,
    /// Of the last valid use: the `client_ip` the calling backend
    /// claimed; `None` when it sent none.
    pub last_used_claimed_ip: Option<String>,
    /// Verifies answered VALID.
    pub valid_uses: u64,
    /// Verifies whose secret matched but that were refused:
    /// INSUFFICIENT_SCOPE, EXPIRED, REVOKED, ROTATED.
    pub rejected_uses: u64,
    pub last_rejected_at: Option<OffsetDateTime>,
    /// The observed address of the last rejected use.
    pub last_rejected_ip: Option<String>,
}

/// What a verify node saw of one key since its last flush. A batch holds
/// a key at most once; if it holds it more often, the latest use of each
/// kind wins and the counts add up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageRecord {
    pub key_id: KeyId,
    /// The latest valid use, if any.
    pub valid: Option<ValidUse>,
    pub valid_uses: u64,
    /// The latest rejected use, if any.
    pub rejected: Option<RejectedUse>,
    pub rejected_uses: u64,
}

/// When, and from where, a key was last used validly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidUse {
    pub at: OffsetDateTime,
    /// What the verify listener saw ([`KeyUsage::last_used_observed_ip`]).
    pub observed_ip: Option<String>,
    /// What the caller claimed ([`KeyUsage::last_used_claimed_ip`]).
    pub claimed_ip: Option<String>,
}

/// When, and from where (observed), a key was last refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RejectedUse {
    pub at: OffsetDateTime,
    pub observed_ip: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    pub tier: Tier,
    /// The account's own catalogue of grantable scopes; `None`: the
    /// server's ([`Policy::grantable`]).
    pub grantable: Option<ScopeCatalogue>,
}

/// What the store enforces inside a change's transaction, from the
/// server's configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// The cap on active keys of each tier.
    pub tiers: TierLimits,
    /// The scopes keys may be granted in an account without a catalogue of
    /// its own.
    pub grantable: ScopeCatalogue,
    /// How many keys an account may store (revoked and expired ones
    /// included: they are its history) per active key its tier allows, so
    /// that create-and-revoke churn cannot grow the store without bound.
    pub stored_keys_per_active_key: u32,
    /// How many rotated-away secrets of a key a rotation keeps (they
    /// verify as `ROTATED`); older ones are deleted in the same transaction.
    pub rotated_secrets_kept: u32,
    /// How many request ids an account may hold recorded within their
    /// window at once; a call with a new one past it is refused, so that
    /// one account's records stay bounded whatever its rate.
    pub request_ids_per_account: u32,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            tiers: TierLimits::default(),
            grantable: ScopeCatalogue::default(),
            stored_keys_per_active_key: 100,
            rotated_secrets_kept: 10,
            request_ids_per_account: 10_000,
        }
    }
}

impl Policy {
    /// The most keys an account on `tier` may store.
    pub fn stored_key_limit(&self, tier: Tier) -> u32 {
        self.tiers
            .for_tier(tier)
            .saturating_mul(self.stored_keys_per_active_key)
    }
}

impl From<TierLimits> for Policy {
    fn from(tiers: TierLimits) -> Self {
        Self {
            tiers,
            ..Self::default()
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_built_key_holds_its_secrets_prefix_and_hash_only() {
        let account: AccountId = "ACME".parse().unwrap();
        let pepper = Pepper::generate();
        let (new, secret) = NewKey::builder(account.clone()).build(&pepper);
        assert_eq!(&new.prefix, secret.prefix());
        assert_eq!(new.hash, secret.hash());
        assert_eq!(new.pepper_id, pepper.id());
        assert_eq!(new.account_id, account);
        assert_eq!(new.name.as_str(), "key");
        assert!(new.scopes.is_empty());
        assert_eq!(new.expires_at, None);
        assert_eq!(new.created_at.nanosecond() % 1_000, 0, "whole microseconds");
    }

    #[test]
    fn every_field_can_be_set() {
        let secret = GeneratedKey::generate(&Pepper::generate());
        let key_id = KeyId::generate();
        let at = OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap();
        let new = NewKey::builder("ACME".parse().unwrap())
            .key_id(key_id.clone())
            .name("ci-runner".parse().unwrap())
            .description("nightly".parse().unwrap())
            .scopes(ScopeSet::parse(&["datasets:read"]).unwrap())
            .expires_at(Some(at + time::Duration::days(1)))
            .created_at(at)
            .build_for(&secret);
        assert_eq!(new.key_id, key_id);
        assert_eq!(new.name.as_str(), "ci-runner");
        assert_eq!(new.description.as_str(), "nightly");
        assert_eq!(new.scopes.to_strings(), ["datasets:read"]);
        assert_eq!(new.expires_at, Some(at + time::Duration::days(1)));
        assert_eq!(new.created_at, at);
        assert_eq!(&new.prefix, secret.prefix());
    }
}

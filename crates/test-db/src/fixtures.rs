//! The values store and verify-engine tests build their keys, callers and
//! policies from, and the few store calls they make to arrange a test
//! (create, rotate, revoke, update a key; read its audit events). Each is
//! written once here, so that a test says only what is particular to it.
//!
//! Times are whole seconds ([`now`]) so that both backends round-trip them
//! exactly. The arranging calls unwrap: a test that expects a call to fail
//! makes that call itself.

use std::sync::Arc;

use time::OffsetDateTime;
use vilvik_keys_domain::{
    AccountId, ApiKey, Description, GeneratedKey, KeyId, KeyName, ManualClock, Pepper, ScopeSet,
    SecretHash, TierLimits,
};
use vilvik_keys_store::{
    Actor, AuditEvent, KeyChanges, KeyRecord, NewKey, NewSecret, Policy, Rotation, Store,
};

/// The pepper of every key the fixtures make: these tests store and read
/// hashes, and a verify node given this pepper verifies them.
pub fn pepper() -> Pepper {
    Pepper::from_bytes(&[0x42; 32])
}

/// Another pepper: the next one, in a rotation of peppers.
pub fn other_pepper() -> Pepper {
    Pepper::from_bytes(&[0x43; 32])
}

/// An operator from a documentation address, as the audit log records
/// every change the fixtures make.
pub fn actor() -> Actor {
    Actor {
        name: "operator:alice@example.com".to_owned(),
        ip: Some("203.0.113.7".to_owned()),
        operator: true,
    }
}

/// Room for plenty of keys (1,000 per tier), for tests that are not about
/// the cap.
pub fn roomy() -> Policy {
    capped(1_000, 1_000)
}

/// The default policy with a cap of `free` and `premium` active keys.
pub fn capped(free: u32, premium: u32) -> Policy {
    Policy::from(TierLimits { free, premium })
}

/// The current time in whole seconds.
pub fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .expect("zero nanoseconds is a valid time")
}

/// A clock that moves only when the test advances it, standing at
/// 2027-01-15 08:00:00 UTC.
pub fn manual_clock() -> Arc<ManualClock> {
    let start = OffsetDateTime::from_unix_timestamp(1_800_000_000).expect("a valid time");
    Arc::new(ManualClock::new(start))
}

/// `name` parsed as an account id; panics when it is not one.
pub fn account(name: &str) -> AccountId {
    name.parse().expect("a valid account id")
}

/// `s` parsed as a key name; panics when it is not one.
pub fn name(s: &str) -> KeyName {
    s.parse().expect("a valid key name")
}

/// `s` parsed as a key description; panics when it is not one.
pub fn description(s: &str) -> Description {
    s.parse().expect("a valid key description")
}

/// `list` parsed as a scope set; panics when a scope is not valid.
pub fn scopes(list: &[&str]) -> ScopeSet {
    ScopeSet::parse(list).expect("valid scopes")
}

/// A key of `account` named `key_name`, created `at`: described "used by
/// the nightly export", with scopes `datasets:read models:*`, no expiry,
/// and a fresh secret under [`pepper`], returned beside it.
pub fn new_key(account: &AccountId, key_name: &str, at: OffsetDateTime) -> (NewKey, GeneratedKey) {
    let secret = new_secret();
    (new_key_for(account, key_name, &secret, at), secret)
}

/// [`new_key`] with a secret the test made (e.g. one it presents to a
/// verify node before the key exists).
pub fn new_key_for(
    account: &AccountId,
    key_name: &str,
    secret: &GeneratedKey,
    at: OffsetDateTime,
) -> NewKey {
    NewKey::builder(account.clone())
        .name(name(key_name))
        .description(description("used by the nightly export"))
        .scopes(scopes(&["datasets:read", "models:*"]))
        .created_at(at)
        .build_for(secret)
}

/// A fresh secret under [`pepper`], e.g. to rotate a key onto.
pub fn new_secret() -> GeneratedKey {
    GeneratedKey::generate(&pepper())
}

/// Creates [`new_key`]`(account, key_name, at)` under [`roomy`].
pub async fn create(
    store: &dyn Store,
    account: &AccountId,
    key_name: &str,
    at: OffsetDateTime,
) -> KeyRecord {
    let (new, _) = new_key(account, key_name, at);
    store
        .create_key(new, &actor(), &roomy())
        .await
        .expect("the key is created")
}

/// Rotates `key` onto `secret` at `at` (keeping the default number of
/// rotated-away secrets).
pub async fn rotate(
    store: &dyn Store,
    key: &KeyRecord,
    secret: &GeneratedKey,
    at: OffsetDateTime,
) -> Rotation {
    store
        .rotate_key(
            &key.account_id,
            &key.key_id,
            &NewSecret::from(secret),
            &actor(),
            at,
            &roomy(),
        )
        .await
        .expect("the key is rotated")
}

/// Revokes `key` at `at`, giving `reason`.
pub async fn revoke(
    store: &dyn Store,
    key: &KeyRecord,
    reason: &str,
    at: OffsetDateTime,
) -> KeyRecord {
    store
        .revoke_key(&key.account_id, &key.key_id, reason, &actor(), at)
        .await
        .expect("the key is revoked")
}

/// Applies `changes` to `key` at `at`, under [`roomy`].
pub async fn update(
    store: &dyn Store,
    key: &KeyRecord,
    changes: KeyChanges,
    at: OffsetDateTime,
) -> KeyRecord {
    try_update(store, key, changes, at)
        .await
        .expect("the key is updated")
}

/// [`update`], for a test that expects the update may be refused.
pub async fn try_update(
    store: &dyn Store,
    key: &KeyRecord,
    changes: KeyChanges,
    at: OffsetDateTime,
) -> vilvik_keys_store::Result<KeyRecord> {
    let (account, key_id) = (&key.account_id, &key.key_id);
    store
        .update_key(account, key_id, changes, &actor(), at, &roomy())
        .await
}

/// A change of a key's name to `to`, and of nothing else.
pub fn rename_to(to: &str) -> KeyChanges {
    KeyChanges {
        name: Some(name(to)),
        ..KeyChanges::default()
    }
}

/// A change of a key's expiry to `expires_at` (`None`: never), and of
/// nothing else.
pub fn expiry(expires_at: Option<OffsetDateTime>) -> KeyChanges {
    KeyChanges {
        expires_at: Some(expires_at),
        ..KeyChanges::default()
    }
}

/// Every audit event of `account` (up to 1,000), of `key` only if given,
/// oldest first.
pub async fn all_events(
    store: &dyn Store,
    account: &AccountId,
    key: Option<&KeyId>,
) -> Vec<AuditEvent> {
    store
        .list_audit_events(account, key, None, 1_000)
        .await
        .expect("the audit events are listed")
        .items
}

/// The hash `secret` has under `pepper`, as a verify node computes it.
pub fn hash_under(secret: &GeneratedKey, pepper: &Pepper) -> SecretHash {
    let presented: ApiKey = secret
        .expose_secret()
        .parse()
        .expect("a generated key parses");
    presented.hash_with(Some(pepper))
}

/// The error's message and every source's, joined by `": "`.
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let messages: Vec<String> = std::iter::successors(Some(err), |e| e.source())
        .map(ToString::to_string)
        .collect();
    messages.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_key_is_what_its_docs_say() {
        let at = now();
        let (new, secret) = new_key(&account("ACME"), "ci-runner", at);
        assert_eq!(new.account_id, account("ACME"));
        assert_eq!(new.name, name("ci-runner"));
        assert_eq!(new.description, description("used by the nightly export"));
        assert_eq!(new.scopes, scopes(&["datasets:read", "models:*"]));
        assert_eq!((new.created_at, new.expires_at), (at, None));
        assert_eq!(&new.prefix, secret.prefix());
        assert_eq!(new.pepper_id, pepper().id());
        assert!(new.hash.matches(&hash_under(&secret, &pepper())));
        assert_eq!(at.nanosecond(), 0);
    }

    #[test]
    fn an_error_chain_names_every_source() {
        let outer = OuterError(std::io::Error::other("the disk is full"));
        assert_eq!(error_chain(&outer), "cannot write: the disk is full");
    }

    #[derive(Debug)]
    struct OuterError(std::io::Error);

    impl std::fmt::Display for OuterError {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("cannot write")
        }
    }

    impl std::error::Error for OuterError {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }
}

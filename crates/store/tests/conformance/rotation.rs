//! Rotation: a key's new secret replaces its current one, which answers
//! as superseded while it is kept; both prefixes go out on the change
//! feed; an expired key cannot be rotated; and a key's rotated-away
//! secrets stay few however often it rotates, while its audit log keeps
//! every rotation.

use std::sync::Arc;

use time::{Duration, OffsetDateTime};
use vilvik_keys_domain::{AuditAction, GeneratedKey};
use vilvik_keys_store::{KeyRecord, NewSecret, Policy, Store, StoreError};
use vilvik_keys_test_db::fixtures::{
    account, actor, all_events, new_key, new_secret, now, other_pepper, pepper, roomy, rotate,
};

use crate::{pages, published_since, secret_of, try_rotate};

/// Rotates `key` onto `secret` at `at`, keeping at most `kept` of its
/// rotated-away secrets.
pub(crate) async fn rotate_keeping(
    store: &dyn Store,
    key: &KeyRecord,
    secret: &GeneratedKey,
    at: OffsetDateTime,
    kept: u32,
) {
    let policy = Policy {
        rotated_secrets_kept: kept,
        ..roomy()
    };
    let onto = NewSecret::from(secret);
    store
        .rotate_key(&key.account_id, &key.key_id, &onto, &actor(), at, &policy)
        .await
        .unwrap();
}

/// Every secret row the store holds (current and rotated-away).
pub(crate) async fn stored_secrets(store: &dyn Store) -> u64 {
    store
        .secrets_by_pepper()
        .await
        .unwrap()
        .iter()
        .map(|usage| usage.total)
        .sum()
}

pub(crate) async fn rotate_supersedes_the_old_secret(store: Arc<dyn Store>) {
    let acme = account("ACME");
    let t0 = now();
    let (new, old_secret) = new_key(&acme, "ci-runner", t0);
    let key = store.create_key(new, &actor(), &roomy()).await.unwrap();
    let seq = store.change_sequence().await.unwrap();
    let t1 = t0 + Duration::hours(1);
    // Rotated under the next pepper: each secret keeps its own.
    let fresh = GeneratedKey::generate(&other_pepper());
    let rotation = rotate(&*store, &key, &fresh, t1).await;
    assert_eq!(rotation.replaced_prefix, key.prefix);
    let rotated = rotation.key;

    assert_eq!(rotated.key_id, key.key_id);
    assert_eq!(rotated.scopes, key.scopes);
    assert_eq!(rotated.name, key.name);
    assert_eq!(rotated.created_at, key.created_at);
    assert_eq!(&rotated.prefix, fresh.prefix());
    assert_ne!(rotated.prefix, key.prefix);
    assert_eq!(rotated.rotated_at, Some(t1));
    assert_eq!(
        store.get_key(&acme, &key.key_id).await.unwrap(),
        Some(rotated.clone())
    );

    let old = secret_of(&*store, old_secret.prefix()).await;
    assert_eq!(old.superseded_at, Some(t1));
    assert!(old.hash.matches(&old_secret.hash()));
    assert_eq!(old.pepper_id, Some(pepper().id()));
    assert_eq!(old.key, rotated);
    let current = secret_of(&*store, fresh.prefix()).await;
    assert_eq!(current.superseded_at, None);
    assert!(current.hash.matches(&fresh.hash()));
    assert_eq!(current.pepper_id, Some(other_pepper().id()));
    assert_eq!(current.key, rotated);

    let events = all_events(&*store, &acme, Some(&key.key_id)).await;
    assert_eq!(events.len(), 2);
    assert_eq!(events[1].action, AuditAction::Rotated);
    assert_eq!(events[1].changes.len(), 1);
    let change = &events[1].changes[0];
    assert_eq!(change.field, "prefix");
    assert_eq!(change.old.as_deref(), Some(key.prefix.as_str()));
    assert_eq!(change.new.as_deref(), Some(fresh.prefix().as_str()));

    // Both prefixes go out on the change feed: the old must be evicted, the
    // new must not be served from a negative cache.
    assert_eq!(
        published_since(&*store, seq).await,
        [key.prefix.clone(), fresh.prefix().clone()]
    );
}

pub(crate) async fn an_expired_key_cannot_be_rotated(store: Arc<dyn Store>) {
    let acme = account("ACME");
    let t0 = now();
    let (mut new, _) = new_key(&acme, "short-lived", t0);
    let expiry = t0 + Duration::minutes(10);
    new.expires_at = Some(expiry);
    let key = store.create_key(new, &actor(), &roomy()).await.unwrap();
    let later = t0 + Duration::hours(1);
    let fresh = new_secret();
    let onto = NewSecret::from(&fresh);
    let rotated = try_rotate(&*store, &acme, &key.key_id, &onto, later).await;
    assert!(
        matches!(rotated, Err(StoreError::Expired { expires_at }) if expires_at == expiry),
        "{rotated:?}"
    );
    assert_eq!(
        store.get_key(&acme, &key.key_id).await.unwrap(),
        Some(key.clone())
    );
    assert!(store.find_secret(fresh.prefix()).await.unwrap().is_none());

    // Before it expires it rotates fine.
    let rotated = rotate(&*store, &key, &fresh, t0 + Duration::minutes(1)).await;
    assert_eq!(rotated.key.expires_at, Some(expiry));
}

pub(crate) async fn a_thousand_rotations_keep_a_bounded_history(store: Arc<dyn Store>) {
    let acme = account("ACME");
    let t0 = now();
    let (new, _) = new_key(&acme, "rotated a lot", t0);
    let key = store.create_key(new, &actor(), &roomy()).await.unwrap();
    let mut secrets = Vec::new();
    for i in 0..1000 {
        let secret = new_secret();
        rotate_keeping(&*store, &key, &secret, t0 + Duration::seconds(i), 3).await;
        secrets.push(secret);
        // The current secret and at most three rotated-away ones, all along.
        assert!(stored_secrets(&*store).await <= 4, "after rotation {i}");
    }
    assert_eq!(stored_secrets(&*store).await, 4);
    // The newest three old secrets still answer ROTATED; older ones are gone.
    for (i, secret) in secrets.iter().enumerate().rev().skip(1) {
        let found = store.find_secret(secret.prefix()).await.unwrap();
        if i >= 1000 - 4 {
            assert!(found.unwrap().superseded_at.is_some(), "secret {i}");
        } else {
            assert!(found.is_none(), "secret {i} was kept");
        }
    }
    let current = secret_of(&*store, secrets[999].prefix()).await;
    assert_eq!(current.superseded_at, None);
    // The audit log keeps every event: created and 1,000 rotations.
    let events = pages(async |after| {
        store
            .list_audit_events(&acme, Some(&key.key_id), after, 100)
            .await
            .unwrap()
    })
    .await;
    assert_eq!(events.iter().map(Vec::len).sum::<usize>(), 1001);
}

vilvik_keys_test_db::on_both_backends!(
    rotate_supersedes_the_old_secret,
    an_expired_key_cannot_be_rotated,
    a_thousand_rotations_keep_a_bounded_history,
);

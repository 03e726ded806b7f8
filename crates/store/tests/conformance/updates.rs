//! Updates and versions: an update records only the fields that changed
//! (one audit event, one change-log entry; nothing at all for a no-op),
//! every change of a key and only a change raises its version, and a
//! change based on a stale version is refused and changes nothing.

use std::sync::Arc;

use time::Duration;
use vilvik_keys_domain::AuditAction;
use vilvik_keys_store::{
    KeyChanges, NewSecret, RotationRequest, Store, StoreError, UsageRecord, ValidUse,
};
use vilvik_keys_test_db::fixtures::{
    account, actor, all_events, create, description, new_secret, now, rename_to, roomy, scopes,
    update,
};

use crate::{done, published_since};

pub(crate) async fn update_records_only_what_changed(store: Arc<dyn Store>) {
    let acme = account("ACME");
    let t0 = now();
    let key = create(&*store, &acme, "ci-runner", t0).await;
    let t1 = t0 + Duration::minutes(1);
    let expiry = t0 + Duration::days(7);
    let changes = KeyChanges {
        name: Some(key.name.clone()), // same value: not a change
        description: Some(description("exports, nightly")), // changed
        scopes: Some(key.scopes.clone()), // same value: not a change
        expires_at: Some(Some(expiry)), // changed
        ..KeyChanges::default()
    };
    let seq = store.change_sequence().await.unwrap();
    let updated = update(&*store, &key, changes, t1).await;
    assert_eq!(updated.description, description("exports, nightly"));
    assert_eq!(updated.expires_at, Some(expiry));
    assert_eq!(updated.name, key.name);
    assert_eq!(
        store.get_key(&acme, &key.key_id).await.unwrap(),
        Some(updated.clone())
    );

    let events = all_events(&*store, &acme, Some(&key.key_id)).await;
    assert_eq!(events.len(), 2);
    let event = &events[1];
    assert_eq!(event.action, AuditAction::Updated);
    assert_eq!(event.at, t1);
    let fields: Vec<_> = event.changes.iter().map(|c| c.field.as_str()).collect();
    assert_eq!(fields, ["description", "expires_at"]);
    assert_eq!(
        event.changes[0].old.as_deref(),
        Some("used by the nightly export")
    );
    assert_eq!(event.changes[0].new.as_deref(), Some("exports, nightly"));
    assert_eq!(event.changes[1].old, None);
    assert!(event.changes[1].new.is_some());
    let published = published_since(&*store, seq).await;
    assert_eq!(published, std::slice::from_ref(&key.prefix));

    // Scopes and removing the expiry.
    let changes = KeyChanges {
        scopes: Some(scopes(&["datasets:read"])),
        expires_at: Some(None),
        ..KeyChanges::default()
    };
    let updated = update(&*store, &key, changes, t1).await;
    assert_eq!(updated.scopes, scopes(&["datasets:read"]));
    assert_eq!(updated.expires_at, None);
    let events = all_events(&*store, &acme, Some(&key.key_id)).await;
    let fields: Vec<_> = events[2].changes.iter().map(|c| c.field.as_str()).collect();
    assert_eq!(fields, ["scopes", "expires_at"]);
    assert_eq!(events[2].changes[1].new, None);

    // A no-op update changes nothing and writes no event and no change.
    let seq = store.change_sequence().await.unwrap();
    let noop = KeyChanges {
        name: Some(updated.name.clone()),
        expires_at: Some(None),
        ..KeyChanges::default()
    };
    assert_eq!(update(&*store, &key, noop, t1).await, updated);
    assert_eq!(
        update(&*store, &key, KeyChanges::default(), t1).await,
        updated
    );
    assert_eq!(all_events(&*store, &acme, Some(&key.key_id)).await.len(), 3);
    assert_eq!(store.change_sequence().await.unwrap(), seq);
}

pub(crate) async fn every_change_of_a_key_and_only_a_change_raises_its_version(
    store: Arc<dyn Store>,
) {
    let acme = account("ACME");
    let t0 = now();
    let key = create(&*store, &acme, "versioned", t0).await;
    assert_eq!(key.version, 1);
    let rename = |to: &str, if_version| KeyChanges {
        if_version,
        ..rename_to(to)
    };
    let updated = update(&*store, &key, rename("renamed", Some(1)), t0).await;
    assert_eq!(updated.version, 2);
    let stored = store.get_key(&acme, &key.key_id).await.unwrap().unwrap();
    assert_eq!(stored.version, 2);
    // Setting what is already there changes nothing, the version included.
    let same = update(&*store, &key, rename("renamed", Some(2)), t0).await;
    assert_eq!(same.version, 2);
    // Use is not a change.
    let use_of_it = UsageRecord {
        key_id: key.key_id.clone(),
        valid: Some(ValidUse {
            at: t0,
            observed_ip: None,
            claimed_ip: None,
        }),
        valid_uses: 1,
        rejected: None,
        rejected_uses: 0,
    };
    store.record_usage(&[use_of_it]).await.unwrap();
    let used = store.get_key(&acme, &key.key_id).await.unwrap().unwrap();
    assert_eq!(used.version, 2);

    // A stale version is refused and changes nothing.
    let events_before = all_events(&*store, &acme, None).await.len();
    let stale = store
        .update_key(
            &acme,
            &key.key_id,
            rename("lost", Some(1)),
            &actor(),
            t0,
            &roomy(),
        )
        .await;
    assert!(
        matches!(
            stale,
            Err(StoreError::StaleVersion {
                expected: 1,
                current: 2,
                ..
            })
        ),
        "{stale:?}"
    );
    let stale_rotation = RotationRequest {
        secret: NewSecret::from(&new_secret()),
        if_version: Some(1),
        request: None,
    };
    let rotated = store
        .rotate_key_with(&acme, &key.key_id, &stale_rotation, &actor(), t0, &roomy())
        .await;
    assert!(
        matches!(rotated, Err(StoreError::StaleVersion { current: 2, .. })),
        "{rotated:?}"
    );
    let revoked = store
        .revoke_key_if(&acme, &key.key_id, "stale", Some(1), &actor(), t0)
        .await;
    assert!(
        matches!(revoked, Err(StoreError::StaleVersion { current: 2, .. })),
        "{revoked:?}"
    );
    let now_stored = store.get_key(&acme, &key.key_id).await.unwrap().unwrap();
    assert_eq!(now_stored, used, "a refused change changed the key");
    assert_eq!(all_events(&*store, &acme, None).await.len(), events_before);
    let secret = store.find_secret(&stale_rotation.secret.prefix).await;
    assert!(secret.unwrap().is_none());

    // Rotation and revocation with the current version go through, and raise it.
    let rotation = RotationRequest {
        if_version: Some(2),
        ..stale_rotation
    };
    let outcome = store
        .rotate_key_with(&acme, &key.key_id, &rotation, &actor(), t0, &roomy())
        .await;
    let rotated = done(outcome.unwrap(), "replayed without a request id");
    assert_eq!(rotated.key.version, 3);
    let revoked = store
        .revoke_key_if(&acme, &key.key_id, "done", Some(3), &actor(), t0)
        .await
        .unwrap();
    assert_eq!(revoked.version, 4);
}

vilvik_keys_test_db::on_both_backends!(
    update_records_only_what_changed,
    every_change_of_a_key_and_only_a_change_raises_its_version,
);

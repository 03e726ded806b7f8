//! Races in a fast loop, on both backends: each test runs many trials of
//! calls started at once against one store, and checks after each that
//! the store's rules held:
//!
//! - many concurrent creates at the cap: exactly the cap succeeds;
//! - concurrent rotations of one key: exactly one secret is current, every
//!   other one is superseded;
//! - a rotation racing a revocation: the key ends revoked;
//! - an update racing a rotation: neither change is lost;
//! - two changes based on one version: one goes through, the other is
//!   `StaleVersion` and changes nothing.
//!
//! `VILVIK_KEYS_RACE_TRIALS` sets the number of trials (default 50, so the
//! default test run stays fast); `.ci/run` runs them with 1,000.

use std::sync::Arc;

use tokio::task::{JoinHandle, JoinSet};
use vilvik_keys_domain::{AccountId, KeyId};
use vilvik_keys_store::{
    KeyChanges, KeyRecord, NewSecret, Outcome, RotationRequest, Store, StoreError,
};
use vilvik_keys_test_db::fixtures::{
    account, actor, all_events, capped, create, name, new_key, new_secret, now, rename_to, revoke,
    roomy, try_update,
};

/// Concurrent calls in each trial.
const RACERS: usize = 8;

fn trials() -> usize {
    std::env::var("VILVIK_KEYS_RACE_TRIALS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(50)
}

async fn a_key(store: &dyn Store, account: &AccountId) -> KeyRecord {
    create(store, account, "raced", now()).await
}

fn rotation(if_version: Option<i64>) -> RotationRequest {
    RotationRequest {
        secret: NewSecret::from(&new_secret()),
        if_version,
        request: None,
    }
}

async fn rotate(
    store: &dyn Store,
    key: &KeyRecord,
    rotation: &RotationRequest,
) -> Result<(), StoreError> {
    match store
        .rotate_key_with(
            &key.account_id,
            &key.key_id,
            rotation,
            &actor(),
            now(),
            &roomy(),
        )
        .await?
    {
        Outcome::Done(_) => Ok(()),
        Outcome::Replayed(_) => panic!("replayed without a request id"),
    }
}

/// Starts a rotation of `key` onto a fresh secret on a task of its own;
/// returns the rotation and the task.
fn spawn_rotation(
    store: &Arc<dyn Store>,
    key: &KeyRecord,
) -> (RotationRequest, JoinHandle<Result<(), StoreError>>) {
    let rotation = rotation(None);
    let (store, key, racer) = (store.clone(), key.clone(), rotation.clone());
    let task = tokio::spawn(async move { rotate(&*store, &key, &racer).await });
    (rotation, task)
}

async fn audit_count(store: &dyn Store, account: &AccountId, key: &KeyId) -> usize {
    all_events(store, account, Some(key)).await.len()
}

async fn concurrent_creates_at_the_cap_admit_exactly_the_cap(store: Arc<dyn Store>) {
    let cap = 3;
    let policy = capped(cap, cap);
    for trial in 0..trials() {
        let account = account(&format!("CAP{trial}"));
        let mut racers = JoinSet::new();
        for i in 0..RACERS {
            let (store, policy) = (store.clone(), policy.clone());
            let (new, _) = new_key(&account, &format!("racer-{i}"), now());
            racers.spawn(async move { store.create_key(new, &actor(), &policy).await });
        }
        let mut created = 0;
        while let Some(outcome) = racers.join_next().await {
            match outcome.unwrap() {
                Ok(_) => created += 1,
                Err(StoreError::QuotaExceeded { .. }) => {}
                Err(e) => panic!("trial {trial}: {e:?}"),
            }
        }
        assert_eq!(created, cap, "trial {trial}");
        let stored = store.list_keys(&account, true, None, 100).await.unwrap();
        assert_eq!(stored.items.len(), cap as usize, "trial {trial}");
    }
}

async fn concurrent_rotations_leave_exactly_one_current_secret(store: Arc<dyn Store>) {
    let account = account("ROTATE");
    for trial in 0..trials() {
        let key = a_key(&*store, &account).await;
        let mut racers = JoinSet::new();
        let mut prefixes = vec![key.prefix.clone()];
        for _ in 0..RACERS {
            let (store, key, rotation) = (store.clone(), key.clone(), rotation(None));
            prefixes.push(rotation.secret.prefix.clone());
            racers.spawn(async move { rotate(&*store, &key, &rotation).await });
        }
        while let Some(outcome) = racers.join_next().await {
            outcome.unwrap().unwrap();
        }
        let mut current = Vec::new();
        for prefix in &prefixes {
            let secret = store.find_secret(prefix).await.unwrap();
            if secret.is_some_and(|s| s.superseded_at.is_none()) {
                current.push(prefix.clone());
            }
        }
        let stored = store.get_key(&account, &key.key_id).await.unwrap().unwrap();
        assert_eq!(current, vec![stored.prefix.clone()], "trial {trial}");
        assert_eq!(stored.version, 1 + RACERS as i64, "trial {trial}");
        assert_eq!(
            audit_count(&*store, &account, &key.key_id).await,
            1 + RACERS,
            "trial {trial}"
        );
    }
}

async fn a_rotation_racing_a_revocation_ends_revoked(store: Arc<dyn Store>) {
    let account = account("REVOKE");
    let (mut rotated_first, mut revoked_first) = (0, 0);
    for trial in 0..trials() {
        let key = a_key(&*store, &account).await;
        let (rotation, rotating) = spawn_rotation(&store, &key);
        let revoking = {
            let (store, key) = (store.clone(), key.clone());
            tokio::spawn(async move { revoke(&*store, &key, "raced", now()).await })
        };
        revoking.await.unwrap();
        match rotating.await.unwrap() {
            Ok(()) => rotated_first += 1,
            Err(StoreError::Revoked { .. }) => revoked_first += 1,
            Err(e) => panic!("trial {trial}: {e:?}"),
        }
        let stored = store.get_key(&account, &key.key_id).await.unwrap().unwrap();
        assert!(stored.revoked_at.is_some(), "trial {trial}");
        // Whichever secret a verifier finds, it belongs to a revoked key.
        for prefix in [&key.prefix, &rotation.secret.prefix] {
            if let Some(secret) = store.find_secret(prefix).await.unwrap() {
                assert!(secret.key.revoked_at.is_some(), "trial {trial}");
            }
        }
    }
    println!("rotation first: {rotated_first}, revocation first: {revoked_first}");
}

async fn an_update_racing_a_rotation_loses_neither(store: Arc<dyn Store>) {
    let account = account("UPDATE");
    for trial in 0..trials() {
        let key = a_key(&*store, &account).await;
        let (rotation, rotating) = spawn_rotation(&store, &key);
        let new_name = format!("renamed-{trial}");
        let updating = {
            let (store, key) = (store.clone(), key.clone());
            let changes = rename_to(&new_name);
            tokio::spawn(async move { try_update(&*store, &key, changes, now()).await })
        };
        rotating.await.unwrap().unwrap();
        updating.await.unwrap().unwrap();
        let stored = store.get_key(&account, &key.key_id).await.unwrap().unwrap();
        assert_eq!(stored.name.as_str(), new_name, "trial {trial}");
        assert_eq!(stored.prefix, rotation.secret.prefix, "trial {trial}");
        assert_eq!(stored.version, 3, "trial {trial}");
        assert_eq!(
            audit_count(&*store, &account, &key.key_id).await,
            3,
            "trial {trial}"
        );
    }
}

async fn changes_based_on_one_version_let_exactly_one_through(store: Arc<dyn Store>) {
    let account = account("ETAG");
    for trial in 0..trials() {
        let key = a_key(&*store, &account).await;
        let mut racers = JoinSet::new();
        for i in 0..RACERS {
            let (store, key) = (store.clone(), key.clone());
            let changes = KeyChanges {
                name: Some(name(&format!("writer-{i}"))),
                if_version: Some(key.version),
                ..KeyChanges::default()
            };
            racers.spawn(async move { try_update(&*store, &key, changes, now()).await });
        }
        let mut winners = Vec::new();
        while let Some(outcome) = racers.join_next().await {
            match outcome.unwrap() {
                Ok(updated) => winners.push(updated),
                Err(StoreError::StaleVersion {
                    expected: 1,
                    current: 2,
                    ..
                }) => {}
                Err(e) => panic!("trial {trial}: {e:?}"),
            }
        }
        assert_eq!(winners.len(), 1, "trial {trial}");
        let stored = store.get_key(&account, &key.key_id).await.unwrap().unwrap();
        assert_eq!(stored, winners[0], "trial {trial}: a loser changed the key");
        assert_eq!(
            audit_count(&*store, &account, &key.key_id).await,
            2,
            "trial {trial}"
        );
    }
}

vilvik_keys_test_db::on_both_backends!(
    concurrent_creates_at_the_cap_admit_exactly_the_cap,
    concurrent_rotations_leave_exactly_one_current_secret,
    a_rotation_racing_a_revocation_ends_revoked,
    an_update_racing_a_rotation_loses_neither,
    changes_based_on_one_version_let_exactly_one_through,
);

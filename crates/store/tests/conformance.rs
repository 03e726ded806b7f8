//! The storage conformance suite: every backend must pass every test here.
//!
//! Each test is an `async fn(Arc<dyn Store>)` written once; the
//! `conformance!` macro at the bottom instantiates it per backend:
//!
//! - `sqlite::<test>`: a fresh database file in a temporary directory;
//! - `postgres::<test>`: a fresh database from `vilvik-keys-test-db`. Without
//!   `VILVIK_KEYS_TEST_DATABASE_URL` these print a skip line and pass, unless
//!   `VILVIK_KEYS_REQUIRE_POSTGRES=1`.
//!
//! Times are whole seconds so that both backends round-trip them exactly.

use std::collections::BTreeMap;
use std::sync::Arc;

use time::{Duration, OffsetDateTime};
use tokio::task::JoinSet;
use vilvik_keys_domain::{
    AccountId, AuditAction, Description, GeneratedKey, KeyId, KeyName, KeyPrefix, Pepper, PepperId,
    ScopeSet, SecretHash, Tier, TierLimits,
};
use vilvik_keys_store::{
    Actor, AuditEvent, KeyChanges, KeyRecord, NewKey, NewSecret, Outcome, PepperUse, Policy,
    Rehash, RequestMethod, RequestRecord, RotationRequest, SecretEntry, Store, StoreError,
    UsageRecord,
};

/// Any pepper: these tests store and read hashes, they verify nothing.
fn pepper() -> Pepper {
    Pepper::from_bytes(&[0x42; 32])
}

/// Another: the next one, in a rotation of peppers.
fn other_pepper() -> Pepper {
    Pepper::from_bytes(&[0x43; 32])
}

/// The hash `secret` has under `pepper`.
fn hash_under(secret: &GeneratedKey, pepper: &Pepper) -> SecretHash {
    let presented: vilvik_keys_domain::ApiKey = secret.expose_secret().parse().unwrap();
    presented.hash_with(Some(pepper))
}

/// A re-hash of `secret`, stored as `from` (its hash and pepper), onto `to`.
fn rehash(secret: &GeneratedKey, from: (SecretHash, Option<PepperId>), to: &Pepper) -> Rehash {
    Rehash {
        prefix: secret.prefix().clone(),
        old_hash: from.0,
        old_pepper_id: from.1,
        new_hash: hash_under(secret, to),
        new_pepper_id: to.id(),
    }
}

/// Every secret row the store holds (current and rotated-away).
async fn stored_secrets(store: &dyn Store) -> u64 {
    store
        .secrets_by_pepper()
        .await
        .unwrap()
        .iter()
        .map(|usage| usage.total)
        .sum()
}

async fn a_thousand_rotations_keep_a_bounded_history(store: Arc<dyn Store>) {
    let acme = account("ACME");
    let t0 = now();
    let (new, _) = new_key(&acme, "rotated a lot", t0);
    let key = store.create_key(new, &actor(), &roomy()).await.unwrap();
    let policy = Policy {
        rotated_secrets_kept: 3,
        ..roomy()
    };
    let mut secrets = Vec::new();
    for i in 0..1000 {
        let secret = GeneratedKey::generate(&pepper());
        store
            .rotate_key(
                &acme,
                &key.key_id,
                &NewSecret::from(&secret),
                &actor(),
                t0 + Duration::seconds(i),
                &policy,
            )
            .await
            .unwrap();
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
    let current = store
        .find_secret(secrets[999].prefix())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(current.superseded_at, None);
    // The audit log keeps every event: created and 1,000 rotations.
    let mut events = 0;
    let mut after = None;
    loop {
        let page = store
            .list_audit_events(&acme, Some(&key.key_id), after, 100)
            .await
            .unwrap();
        events += page.items.len();
        match page.next_cursor {
            Some(cursor) => after = Some(cursor),
            None => break,
        }
    }
    assert_eq!(events, 1001);
}

async fn old_rotated_secrets_are_pruned_after_the_retention(store: Arc<dyn Store>) {
    let acme = account("ACME");
    let t0 = now();
    let (new, first) = new_key(&acme, "ci-runner", t0);
    let key = store.create_key(new, &actor(), &roomy()).await.unwrap();
    let second = GeneratedKey::generate(&pepper());
    let at = |hours| t0 + Duration::hours(hours);
    store
        .rotate_key(
            &acme,
            &key.key_id,
            &NewSecret::from(&second),
            &actor(),
            at(1),
            &roomy(),
        )
        .await
        .unwrap();
    let third = GeneratedKey::generate(&pepper());
    store
        .rotate_key(
            &acme,
            &key.key_id,
            &NewSecret::from(&third),
            &actor(),
            at(3),
            &roomy(),
        )
        .await
        .unwrap();
    // Nothing superseded before t0+1h.
    assert_eq!(store.prune_rotated_secrets(at(1)).await.unwrap(), 0);
    // The first secret was superseded at t0+1h, the second at t0+3h.
    assert_eq!(store.prune_rotated_secrets(at(2)).await.unwrap(), 1);
    assert!(store.find_secret(first.prefix()).await.unwrap().is_none());
    assert!(store.find_secret(second.prefix()).await.unwrap().is_some());
    // A current secret is never pruned, however old.
    assert_eq!(store.prune_rotated_secrets(at(100)).await.unwrap(), 1);
    let current = store.find_secret(third.prefix()).await.unwrap().unwrap();
    assert_eq!(current.key.key_id, key.key_id);
    assert_eq!(stored_secrets(&*store).await, 1);
}

async fn revoked_keys_count_toward_the_stored_key_ceiling(store: Arc<dyn Store>) {
    let acme = account("ACME");
    let t0 = now();
    let policy = Policy {
        stored_keys_per_active_key: 2,
        ..Policy::from(TierLimits {
            free: 2,
            premium: 4,
        })
    };
    // Create and revoke: never more than one active, but four stored.
    for i in 0..4 {
        let (new, _) = new_key(&acme, &format!("churn {i}"), t0);
        let key = store.create_key(new, &actor(), &policy).await.unwrap();
        store
            .revoke_key(&acme, &key.key_id, "churn", &actor(), t0)
            .await
            .unwrap();
    }
    let (new, _) = new_key(&acme, "one too many", t0);
    let prefix = new.prefix.clone();
    match store.create_key(new, &actor(), &policy).await {
        Err(StoreError::StoredKeysExceeded {
            tier,
            limit,
            stored,
        }) => {
            assert_eq!((tier, limit, stored), (Tier::Free, 4, 4));
        }
        other => panic!("expected StoredKeysExceeded, got {other:?}"),
    }
    assert!(store.find_secret(&prefix).await.unwrap().is_none());
    // Another account is not affected; a larger tier has a larger ceiling.
    create(&*store, &account("OTHER"), "fine", t0).await;
    store
        .set_tier(&acme, Tier::Premium, &actor(), t0)
        .await
        .unwrap();
    let (new, _) = new_key(&acme, "on premium", t0);
    store.create_key(new, &actor(), &policy).await.unwrap();
}

async fn pruned_secrets_are_published_for_caches_to_forget(store: Arc<dyn Store>) {
    let acme = account("ACME");
    let t0 = now();
    let (new, first) = new_key(&acme, "pruned", t0);
    let key = store.create_key(new, &actor(), &roomy()).await.unwrap();
    let keep_one = Policy {
        rotated_secrets_kept: 1,
        ..roomy()
    };
    let rotate = |at: OffsetDateTime| {
        let (store, acme, key_id, policy) = (
            store.clone(),
            acme.clone(),
            key.key_id.clone(),
            keep_one.clone(),
        );
        async move {
            let secret = GeneratedKey::generate(&pepper());
            store
                .rotate_key(
                    &acme,
                    &key_id,
                    &NewSecret::from(&secret),
                    &actor(),
                    at,
                    &policy,
                )
                .await
                .unwrap();
            secret
        }
    };
    let second = rotate(t0 + Duration::seconds(1)).await;
    // The second rotation deletes the first secret (one old one is kept)
    // and publishes its prefix with the rotation's own.
    let seq = store.change_sequence().await.unwrap();
    let third = rotate(t0 + Duration::seconds(2)).await;
    assert!(store.find_secret(first.prefix()).await.unwrap().is_none());
    let published: Vec<KeyPrefix> = store
        .changes_since(seq, 100)
        .await
        .unwrap()
        .into_iter()
        .map(|(_, prefix)| prefix)
        .collect();
    for prefix in [first.prefix(), second.prefix(), third.prefix()] {
        assert!(published.contains(prefix), "{prefix} not in {published:?}");
    }
    // The retention prune publishes what it deletes too.
    let seq = store.change_sequence().await.unwrap();
    assert_eq!(
        store
            .prune_rotated_secrets(t0 + Duration::seconds(10))
            .await
            .unwrap(),
        1
    );
    assert!(store.find_secret(second.prefix()).await.unwrap().is_none());
    let published: Vec<KeyPrefix> = store
        .changes_since(seq, 100)
        .await
        .unwrap()
        .into_iter()
        .map(|(_, prefix)| prefix)
        .collect();
    assert_eq!(published, vec![second.prefix().clone()]);
}

// ---------------------------------------------------------------------------
// Request ids and versions (issue 11)

/// The record a call under request id `id` (any 32 bytes here: the
/// server derives them) with parameters `params` leaves.
fn request(
    id: u8,
    method: RequestMethod,
    params: u8,
    key_id: &KeyId,
    expires_at: OffsetDateTime,
) -> RequestRecord {
    RequestRecord {
        digest: [id; 32],
        method,
        params: [params; 32],
        key_id: key_id.clone(),
        sealed: vec![id, params, 7, 7],
        pepper_id: pepper().id(),
        expires_at,
    }
}

async fn a_create_retried_with_its_request_id_creates_nothing_more(store: Arc<dyn Store>) {
    let acme = account("ACME");
    let t0 = now();
    let policy = Policy::from(TierLimits {
        free: 1,
        premium: 1,
    });
    let (first, _) = new_key(&acme, "first", t0);
    let first_id = first.key_id.clone();
    let record = request(
        1,
        RequestMethod::CreateKey,
        9,
        &first_id,
        t0 + Duration::days(1),
    );
    let Outcome::Done(created) = store
        .create_key_with(first, Some(&record), &actor(), &policy)
        .await
        .unwrap()
    else {
        panic!("the first call replayed");
    };
    // The retry comes with a new key id and secret (the server makes them
    // afresh) and finds the account at its cap: it still gets the first key.
    let (retry, _) = new_key(&acme, "first", t0 + Duration::seconds(5));
    let retry_record = RequestRecord {
        key_id: retry.key_id.clone(),
        sealed: vec![0; 4],
        ..record.clone()
    };
    let Outcome::Replayed(replay) = store
        .create_key_with(retry, Some(&retry_record), &actor(), &policy)
        .await
        .unwrap()
    else {
        panic!("the retry created a second key");
    };
    assert_eq!(replay.key, created);
    assert_eq!(
        replay.sealed, record.sealed,
        "the first call's sealed secret"
    );
    assert_eq!(replay.pepper_id, pepper().id());
    assert_eq!(
        store
            .list_keys(&acme, true, None, 10)
            .await
            .unwrap()
            .items
            .len(),
        1
    );
    assert_eq!(all_events(&*store, &acme, None).await.len(), 1);
    assert_eq!(store.changes_since(0, 100).await.unwrap().len(), 1);

    // The same id with other parameters, or for a rotation, is refused.
    let (other, _) = new_key(&acme, "other", t0);
    let other_params = RequestRecord {
        params: [8; 32],
        key_id: other.key_id.clone(),
        ..record.clone()
    };
    assert!(matches!(
        store
            .create_key_with(other, Some(&other_params), &actor(), &roomy())
            .await,
        Err(StoreError::RequestIdReused {
            method: RequestMethod::CreateKey
        })
    ));
    let rotation = RotationRequest {
        secret: NewSecret::from(&GeneratedKey::generate(&pepper())),
        if_version: None,
        request: Some(RequestRecord {
            method: RequestMethod::RotateKey,
            ..record.clone()
        }),
    };
    assert!(matches!(
        store
            .rotate_key_with(&acme, &first_id, &rotation, &actor(), t0, &roomy())
            .await,
        Err(StoreError::RequestIdReused {
            method: RequestMethod::CreateKey
        })
    ));
    // Another account's same id is another request.
    let other_account = account("OTHER");
    let (theirs, _) = new_key(&other_account, "theirs", t0);
    let theirs_record = RequestRecord {
        key_id: theirs.key_id.clone(),
        ..record.clone()
    };
    assert!(matches!(
        store
            .create_key_with(theirs, Some(&theirs_record), &actor(), &roomy())
            .await,
        Ok(Outcome::Done(_))
    ));
    assert_eq!(
        store
            .list_keys(&acme, true, None, 10)
            .await
            .unwrap()
            .items
            .len(),
        1
    );
    assert_eq!(all_events(&*store, &acme, None).await.len(), 1);
}

async fn a_refused_create_records_no_request_id(store: Arc<dyn Store>) {
    let acme = account("ACME");
    let t0 = now();
    let one = Policy::from(TierLimits {
        free: 1,
        premium: 1,
    });
    let (taken, _) = new_key(&acme, "holds the only slot", t0);
    let taken = store.create_key(taken, &actor(), &one).await.unwrap();
    let (new, _) = new_key(&acme, "refused", t0);
    let record = request(
        2,
        RequestMethod::CreateKey,
        9,
        &new.key_id,
        t0 + Duration::days(1),
    );
    let refused = store
        .create_key_with(new.clone(), Some(&record), &actor(), &one)
        .await;
    assert!(
        matches!(refused, Err(StoreError::QuotaExceeded { .. })),
        "{refused:?}"
    );
    // Retried once there is room, the same id creates the key.
    store
        .revoke_key(&acme, &taken.key_id, "make room", &actor(), t0)
        .await
        .unwrap();
    assert!(matches!(
        store
            .create_key_with(new, Some(&record), &actor(), &one)
            .await,
        Ok(Outcome::Done(_))
    ));
    assert_eq!(all_events(&*store, &acme, None).await.len(), 3);
}

async fn a_request_id_is_forgotten_after_its_window(store: Arc<dyn Store>) {
    let acme = account("ACME");
    let t0 = now();
    let window_end = t0 + Duration::days(1);
    let (first, _) = new_key(&acme, "first", t0);
    let record = request(3, RequestMethod::CreateKey, 9, &first.key_id, window_end);
    store
        .create_key_with(first, Some(&record), &actor(), &roomy())
        .await
        .unwrap();
    assert_eq!(
        store
            .prune_requests(window_end - Duration::seconds(1))
            .await
            .unwrap(),
        0
    );
    // At the window's end the id is a new request (with or without pruning).
    let (late, _) = new_key(&acme, "first", window_end);
    let late_record = RequestRecord {
        key_id: late.key_id.clone(),
        expires_at: window_end + Duration::days(1),
        ..record.clone()
    };
    assert!(matches!(
        store
            .create_key_with(late, Some(&late_record), &actor(), &roomy())
            .await,
        Ok(Outcome::Done(_))
    ));
    assert_eq!(
        store
            .list_keys(&acme, true, None, 10)
            .await
            .unwrap()
            .items
            .len(),
        2
    );
    assert_eq!(
        store
            .prune_requests(window_end + Duration::days(1))
            .await
            .unwrap(),
        1
    );
}

async fn concurrent_calls_with_one_request_id_create_one_key(store: Arc<dyn Store>) {
    let acme = account("ACME");
    let t0 = now();
    let mut tasks = JoinSet::new();
    for _ in 0..8 {
        let store = store.clone();
        let (new, _) = new_key(&acme, "once", t0);
        let record = request(
            4,
            RequestMethod::CreateKey,
            9,
            &new.key_id,
            t0 + Duration::days(1),
        );
        tasks.spawn(async move {
            store
                .create_key_with(new, Some(&record), &actor(), &roomy())
                .await
        });
    }
    let (mut done, mut replayed) = (Vec::new(), Vec::new());
    while let Some(outcome) = tasks.join_next().await {
        match outcome.unwrap().unwrap() {
            Outcome::Done(key) => done.push(key.key_id),
            Outcome::Replayed(replay) => replayed.push(replay.key.key_id),
        }
    }
    assert_eq!(done.len(), 1, "{done:?}");
    assert_eq!(replayed.len(), 7);
    assert!(replayed.iter().all(|id| *id == done[0]));
    assert_eq!(
        store
            .list_keys(&acme, true, None, 10)
            .await
            .unwrap()
            .items
            .len(),
        1
    );
    assert_eq!(all_events(&*store, &acme, None).await.len(), 1);
}

async fn a_rotation_retried_with_its_request_id_rotates_once(store: Arc<dyn Store>) {
    let acme = account("ACME");
    let t0 = now();
    let key = create(&*store, &acme, "rotated", t0).await;
    let first = RotationRequest {
        secret: NewSecret::from(&GeneratedKey::generate(&pepper())),
        if_version: Some(key.version),
        request: Some(request(
            5,
            RequestMethod::RotateKey,
            1,
            &key.key_id,
            t0 + Duration::days(1),
        )),
    };
    let t1 = t0 + Duration::seconds(1);
    let Outcome::Done(rotated) = store
        .rotate_key_with(&acme, &key.key_id, &first, &actor(), t1, &roomy())
        .await
        .unwrap()
    else {
        panic!("the first rotation replayed");
    };
    assert_eq!(rotated.key.prefix, first.secret.prefix);
    // The retry (its etag now stale, a new secret drawn) gets the first one's.
    let retry = RotationRequest {
        secret: NewSecret::from(&GeneratedKey::generate(&pepper())),
        ..first.clone()
    };
    let Outcome::Replayed(replay) = store
        .rotate_key_with(
            &acme,
            &key.key_id,
            &retry,
            &actor(),
            t1 + Duration::seconds(1),
            &roomy(),
        )
        .await
        .unwrap()
    else {
        panic!("the retry rotated again");
    };
    assert_eq!(replay.key, rotated.key);
    assert_eq!(replay.sealed, first.request.as_ref().unwrap().sealed);
    assert!(
        store
            .find_secret(&retry.secret.prefix)
            .await
            .unwrap()
            .is_none()
    );
    let events = all_events(&*store, &acme, Some(&key.key_id)).await;
    assert_eq!(events.len(), 2, "created and one rotation");
}

async fn every_change_of_a_key_and_only_a_change_raises_its_version(store: Arc<dyn Store>) {
    let acme = account("ACME");
    let t0 = now();
    let key = create(&*store, &acme, "versioned", t0).await;
    assert_eq!(key.version, 1);
    let rename = |to: &str, if_version| KeyChanges {
        name: Some(name(to)),
        if_version,
        ..KeyChanges::default()
    };
    let updated = store
        .update_key(
            &acme,
            &key.key_id,
            rename("renamed", Some(1)),
            &actor(),
            t0,
            &roomy(),
        )
        .await
        .unwrap();
    assert_eq!(updated.version, 2);
    assert_eq!(
        store
            .get_key(&acme, &key.key_id)
            .await
            .unwrap()
            .unwrap()
            .version,
        2
    );
    // Setting what is already there changes nothing, the version included.
    let same = store
        .update_key(
            &acme,
            &key.key_id,
            rename("renamed", Some(2)),
            &actor(),
            t0,
            &roomy(),
        )
        .await
        .unwrap();
    assert_eq!(same.version, 2);
    // Use is not a change.
    store
        .record_usage(&[UsageRecord {
            key_id: key.key_id.clone(),
            at: t0,
            ip: None,
        }])
        .await
        .unwrap();
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
        secret: NewSecret::from(&GeneratedKey::generate(&pepper())),
        if_version: Some(1),
        request: None,
    };
    assert!(matches!(
        store
            .rotate_key_with(&acme, &key.key_id, &stale_rotation, &actor(), t0, &roomy())
            .await,
        Err(StoreError::StaleVersion { current: 2, .. })
    ));
    assert!(matches!(
        store
            .revoke_key_if(&acme, &key.key_id, "stale", Some(1), &actor(), t0)
            .await,
        Err(StoreError::StaleVersion { current: 2, .. })
    ));
    let now_stored = store.get_key(&acme, &key.key_id).await.unwrap().unwrap();
    assert_eq!(now_stored, used, "a refused change changed the key");
    assert_eq!(all_events(&*store, &acme, None).await.len(), events_before);
    assert!(
        store
            .find_secret(&stale_rotation.secret.prefix)
            .await
            .unwrap()
            .is_none()
    );

    // Rotation and revocation with the current version go through, and raise it.
    let rotation = RotationRequest {
        if_version: Some(2),
        ..stale_rotation
    };
    let Outcome::Done(rotated) = store
        .rotate_key_with(&acme, &key.key_id, &rotation, &actor(), t0, &roomy())
        .await
        .unwrap()
    else {
        panic!("replayed without a request id");
    };
    assert_eq!(rotated.key.version, 3);
    let revoked = store
        .revoke_key_if(&acme, &key.key_id, "done", Some(3), &actor(), t0)
        .await
        .unwrap();
    assert_eq!(revoked.version, 4);
}

// ---------------------------------------------------------------------------
// Helpers

fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc().replace_nanosecond(0).unwrap()
}

fn account(name: &str) -> AccountId {
    name.parse().unwrap()
}

fn actor() -> Actor {
    Actor {
        name: "operator:alice@example.com".to_owned(),
        ip: Some("203.0.113.7".to_owned()),
        operator: true,
    }
}

fn name(s: &str) -> KeyName {
    s.parse().unwrap()
}

fn description(s: &str) -> Description {
    s.parse().unwrap()
}

fn scopes(list: &[&str]) -> ScopeSet {
    ScopeSet::parse(list).unwrap()
}

/// Room for plenty of keys, for tests that are not about the cap.
fn roomy() -> Policy {
    Policy::from(TierLimits {
        free: 100,
        premium: 100,
    })
}

fn new_key(account: &AccountId, key_name: &str, at: OffsetDateTime) -> (NewKey, GeneratedKey) {
    NewKey::builder(account.clone())
        .name(name(key_name))
        .description(description("used by the nightly export"))
        .scopes(scopes(&["datasets:read", "models:*"]))
        .created_at(at)
        .build(&pepper())
}

async fn create(
    store: &dyn Store,
    account: &AccountId,
    key_name: &str,
    at: OffsetDateTime,
) -> KeyRecord {
    let (new, _) = new_key(account, key_name, at);
    store.create_key(new, &actor(), &roomy()).await.unwrap()
}

async fn all_events(
    store: &dyn Store,
    account: &AccountId,
    key: Option<&KeyId>,
) -> Vec<AuditEvent> {
    store
        .list_audit_events(account, key, None, 1000)
        .await
        .unwrap()
        .items
}

// ---------------------------------------------------------------------------
// The suite

async fn migrate_twice_runs_nothing_the_second_time(store: Arc<dyn Store>) {
    assert_eq!(store.migrate().await.unwrap(), 0);
    assert_eq!(store.migrate().await.unwrap(), 0);
    assert_eq!(store.change_sequence().await.unwrap(), 0);
}

async fn create_get_and_list_with_paging(store: Arc<dyn Store>) {
    let acme = account("ACME");
    let t0 = now();
    let (mut new, generated) = new_key(&acme, "ci-runner", t0);
    new.expires_at = Some(t0 + Duration::days(30));
    let created = store
        .create_key(new.clone(), &actor(), &roomy())
        .await
        .unwrap();
    assert_eq!(created.key_id, new.key_id);
    assert_eq!(created.account_id, acme);
    assert_eq!(created.name, new.name);
    assert_eq!(created.description, new.description);
    assert_eq!(created.scopes, new.scopes);
    assert_eq!(&created.prefix, generated.prefix());
    assert_eq!(created.created_at, t0);
    assert_eq!(created.expires_at, Some(t0 + Duration::days(30)));
    assert_eq!(created.revoked_at, None);
    assert_eq!(created.revoke_reason, None);
    assert_eq!(created.rotated_at, None);
    assert_eq!(created.last_used_at, None);
    assert_eq!(created.last_used_ip, None);
    assert_eq!(
        store.get_key(&acme, &new.key_id).await.unwrap(),
        Some(created.clone())
    );
    assert_eq!(
        store.get_key(&acme, &KeyId::generate()).await.unwrap(),
        None
    );

    let secret = store
        .find_secret(generated.prefix())
        .await
        .unwrap()
        .unwrap();
    assert!(secret.hash.matches(&generated.hash()));
    assert_eq!(secret.pepper_id, Some(pepper().id()));
    assert_eq!(secret.superseded_at, None);
    assert_eq!(secret.key, created);
    assert!(
        store
            .find_secret(GeneratedKey::generate(&pepper()).prefix())
            .await
            .unwrap()
            .is_none()
    );

    let mut ids = vec![created.key_id.clone()];
    for i in 1..5 {
        ids.push(
            create(
                &*store,
                &acme,
                &format!("key-{i}"),
                t0 + Duration::seconds(i),
            )
            .await
            .key_id,
        );
    }

    // Pages of two, in creation order, each cursor leading to the next.
    let mut seen = Vec::new();
    let mut cursor = None;
    let mut pages = 0;
    loop {
        let page = store.list_keys(&acme, false, cursor, 2).await.unwrap();
        assert!(page.items.len() <= 2);
        pages += 1;
        seen.extend(page.items.into_iter().map(|k| k.key_id));
        match page.next_cursor {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(seen, ids);

    // One page holding everything has no cursor.
    let page = store.list_keys(&acme, false, None, 5).await.unwrap();
    assert_eq!(page.items.len(), 5);
    assert_eq!(page.next_cursor, None);

    // Revoked keys are listed only when asked for.
    store
        .revoke_key(
            &acme,
            &ids[1],
            "leaked",
            &actor(),
            t0 + Duration::minutes(1),
        )
        .await
        .unwrap();
    let listed: Vec<_> = store
        .list_keys(&acme, false, None, 100)
        .await
        .unwrap()
        .items;
    assert_eq!(
        listed.iter().map(|k| &k.key_id).collect::<Vec<_>>(),
        [&ids[0], &ids[2], &ids[3], &ids[4]]
    );
    let listed: Vec<_> = store.list_keys(&acme, true, None, 100).await.unwrap().items;
    assert_eq!(
        listed.iter().map(|k| k.key_id.clone()).collect::<Vec<_>>(),
        ids
    );
    assert_eq!(listed[1].revoked_at, Some(t0 + Duration::minutes(1)));
    assert_eq!(listed[1].revoke_reason.as_deref(), Some("leaked"));

    // Another account's listing is empty.
    let other = store
        .list_keys(&account("globex"), true, None, 100)
        .await
        .unwrap();
    assert!(other.items.is_empty());
    assert_eq!(other.next_cursor, None);
}

async fn another_accounts_key_is_invisible(store: Arc<dyn Store>) {
    let (acme, globex) = (account("ACME"), account("globex"));
    let t0 = now();
    let key = create(&*store, &acme, "ci-runner", t0).await;
    let events_before = all_events(&*store, &acme, None).await;
    let seq_before = store.change_sequence().await.unwrap();

    assert_eq!(store.get_key(&globex, &key.key_id).await.unwrap(), None);
    assert!(
        store
            .list_keys(&globex, true, None, 100)
            .await
            .unwrap()
            .items
            .is_empty()
    );
    let changes = KeyChanges {
        name: Some(name("stolen")),
        ..KeyChanges::default()
    };
    let err = store
        .update_key(&globex, &key.key_id, changes, &actor(), t0, &roomy())
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::NotFound), "{err:?}");
    let g = GeneratedKey::generate(&pepper());
    let err = store
        .rotate_key(
            &globex,
            &key.key_id,
            &NewSecret::from(&g),
            &actor(),
            t0,
            &Policy::default(),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::NotFound), "{err:?}");
    let err = store
        .revoke_key(&globex, &key.key_id, "x", &actor(), t0)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::NotFound), "{err:?}");
    assert!(all_events(&*store, &globex, None).await.is_empty());
    assert!(
        all_events(&*store, &globex, Some(&key.key_id))
            .await
            .is_empty()
    );

    // Nothing changed.
    assert_eq!(store.get_key(&acme, &key.key_id).await.unwrap(), Some(key));
    assert_eq!(all_events(&*store, &acme, None).await, events_before);
    assert_eq!(store.change_sequence().await.unwrap(), seq_before);
}

async fn update_records_only_what_changed(store: Arc<dyn Store>) {
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
    let updated = store
        .update_key(&acme, &key.key_id, changes, &actor(), t1, &roomy())
        .await
        .unwrap();
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
    let published = store.changes_since(seq, 100).await.unwrap();
    assert_eq!(
        published.iter().map(|(_, p)| p).collect::<Vec<_>>(),
        [&key.prefix]
    );

    // Scopes and removing the expiry.
    let changes = KeyChanges {
        scopes: Some(scopes(&["datasets:read"])),
        expires_at: Some(None),
        ..KeyChanges::default()
    };
    let updated = store
        .update_key(&acme, &key.key_id, changes, &actor(), t1, &roomy())
        .await
        .unwrap();
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
    let same = store
        .update_key(&acme, &key.key_id, noop, &actor(), t1, &roomy())
        .await
        .unwrap();
    assert_eq!(same, updated);
    let same = store
        .update_key(
            &acme,
            &key.key_id,
            KeyChanges::default(),
            &actor(),
            t1,
            &roomy(),
        )
        .await
        .unwrap();
    assert_eq!(same, updated);
    assert_eq!(all_events(&*store, &acme, Some(&key.key_id)).await.len(), 3);
    assert_eq!(store.change_sequence().await.unwrap(), seq);
}

async fn rotate_supersedes_the_old_secret(store: Arc<dyn Store>) {
    let acme = account("ACME");
    let t0 = now();
    let (new, old_secret) = new_key(&acme, "ci-runner", t0);
    let key = store.create_key(new, &actor(), &roomy()).await.unwrap();
    let seq = store.change_sequence().await.unwrap();
    let t1 = t0 + Duration::hours(1);
    // Rotated under the next pepper: each secret keeps its own.
    let fresh = GeneratedKey::generate(&other_pepper());
    let rotation = store
        .rotate_key(
            &acme,
            &key.key_id,
            &NewSecret::from(&fresh),
            &actor(),
            t1,
            &Policy::default(),
        )
        .await
        .unwrap();
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

    let old = store
        .find_secret(old_secret.prefix())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(old.superseded_at, Some(t1));
    assert!(old.hash.matches(&old_secret.hash()));
    assert_eq!(old.pepper_id, Some(pepper().id()));
    assert_eq!(old.key, rotated);
    let current = store.find_secret(fresh.prefix()).await.unwrap().unwrap();
    assert_eq!(current.superseded_at, None);
    assert!(current.hash.matches(&fresh.hash()));
    assert_eq!(current.pepper_id, Some(other_pepper().id()));
    assert_eq!(current.key, rotated);

    let events = all_events(&*store, &acme, Some(&key.key_id)).await;
    assert_eq!(events.len(), 2);
    assert_eq!(events[1].action, AuditAction::Rotated);
    assert_eq!(events[1].changes.len(), 1);
    assert_eq!(events[1].changes[0].field, "prefix");
    assert_eq!(
        events[1].changes[0].old.as_deref(),
        Some(key.prefix.as_str())
    );
    assert_eq!(
        events[1].changes[0].new.as_deref(),
        Some(fresh.prefix().as_str())
    );

    // Both prefixes go out on the change feed: the old must be evicted, the
    // new must not be served from a negative cache.
    let published: Vec<_> = store
        .changes_since(seq, 100)
        .await
        .unwrap()
        .into_iter()
        .map(|(_, p)| p)
        .collect();
    assert_eq!(published, [key.prefix.clone(), fresh.prefix().clone()]);
}

async fn revocation_is_final(store: Arc<dyn Store>) {
    let acme = account("ACME");
    let t0 = now();
    let key = create(&*store, &acme, "ci-runner", t0).await;
    let t1 = t0 + Duration::minutes(5);
    let revoked = store
        .revoke_key(&acme, &key.key_id, "left the company", &actor(), t1)
        .await
        .unwrap();
    assert_eq!(revoked.revoked_at, Some(t1));
    assert_eq!(revoked.revoke_reason.as_deref(), Some("left the company"));
    assert_eq!(
        store.get_key(&acme, &key.key_id).await.unwrap(),
        Some(revoked.clone())
    );
    let events = all_events(&*store, &acme, Some(&key.key_id)).await;
    assert_eq!(events.last().unwrap().action, AuditAction::Revoked);
    assert_eq!(events.last().unwrap().changes[0].field, "reason");
    assert_eq!(
        events.last().unwrap().changes[0].new.as_deref(),
        Some("left the company")
    );
    let seq = store.change_sequence().await.unwrap();

    let t2 = t1 + Duration::minutes(1);
    let changes = KeyChanges {
        name: Some(name("revived")),
        ..KeyChanges::default()
    };
    let err = store
        .update_key(&acme, &key.key_id, changes, &actor(), t2, &roomy())
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::Revoked { revoked_at } if revoked_at == t1),
        "{err:?}"
    );
    let fresh = GeneratedKey::generate(&pepper());
    let err = store
        .rotate_key(
            &acme,
            &key.key_id,
            &NewSecret::from(&fresh),
            &actor(),
            t2,
            &Policy::default(),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::Revoked { revoked_at } if revoked_at == t1),
        "{err:?}"
    );
    let err = store
        .revoke_key(&acme, &key.key_id, "again", &actor(), t2)
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::Revoked { revoked_at } if revoked_at == t1),
        "{err:?}"
    );

    // None of the refused calls changed anything.
    assert_eq!(
        store.get_key(&acme, &key.key_id).await.unwrap(),
        Some(revoked)
    );
    assert!(store.find_secret(fresh.prefix()).await.unwrap().is_none());
    assert_eq!(all_events(&*store, &acme, Some(&key.key_id)).await, events);
    assert_eq!(store.change_sequence().await.unwrap(), seq);
}

async fn an_expired_key_cannot_be_rotated(store: Arc<dyn Store>) {
    let acme = account("ACME");
    let t0 = now();
    let (mut new, _) = new_key(&acme, "short-lived", t0);
    let expiry = t0 + Duration::minutes(10);
    new.expires_at = Some(expiry);
    let key = store.create_key(new, &actor(), &roomy()).await.unwrap();
    let later = t0 + Duration::hours(1);
    let fresh = GeneratedKey::generate(&pepper());
    let err = store
        .rotate_key(
            &acme,
            &key.key_id,
            &NewSecret::from(&fresh),
            &actor(),
            later,
            &Policy::default(),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::Expired { expires_at } if expires_at == expiry),
        "{err:?}"
    );
    assert_eq!(
        store.get_key(&acme, &key.key_id).await.unwrap(),
        Some(key.clone())
    );
    assert!(store.find_secret(fresh.prefix()).await.unwrap().is_none());

    // Before it expires it rotates fine.
    let rotated = store
        .rotate_key(
            &acme,
            &key.key_id,
            &NewSecret::from(&fresh),
            &actor(),
            t0 + Duration::minutes(1),
            &Policy::default(),
        )
        .await
        .unwrap()
        .key;
    assert_eq!(rotated.expires_at, Some(expiry));
}

async fn the_tier_cap_holds(store: Arc<dyn Store>) {
    let acme = account("ACME");
    let limits = TierLimits::default();
    let t0 = now();
    let mut keys = Vec::new();
    for i in 0..3 {
        let (new, _) = new_key(&acme, &format!("key-{i}"), t0);
        keys.push(
            store
                .create_key(new, &actor(), &limits.into())
                .await
                .unwrap(),
        );
    }
    let (fourth, _) = new_key(&acme, "one-too-many", t0);
    let seq = store.change_sequence().await.unwrap();
    let err = store
        .create_key(fourth.clone(), &actor(), &limits.into())
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::QuotaExceeded {
                tier: Tier::Free,
                limit: 3,
                active: 3,
                ..
            }
        ),
        "{err:?}"
    );
    // The refused create left no trace.
    assert_eq!(store.get_key(&acme, &fourth.key_id).await.unwrap(), None);
    assert!(store.find_secret(&fourth.prefix).await.unwrap().is_none());
    assert_eq!(all_events(&*store, &acme, None).await.len(), 3);
    assert_eq!(store.change_sequence().await.unwrap(), seq);

    // A revoked key frees room.
    store
        .revoke_key(&acme, &keys[0].key_id, "rotating out", &actor(), t0)
        .await
        .unwrap();
    let (new, _) = new_key(&acme, "replacement", t0);
    store
        .create_key(new, &actor(), &limits.into())
        .await
        .unwrap();
    let (new, _) = new_key(&acme, "still-too-many", t0);
    assert!(matches!(
        store.create_key(new, &actor(), &limits.into()).await,
        Err(StoreError::QuotaExceeded { active: 3, .. })
    ));

    // An expired key frees room too.
    let expiry = t0 + Duration::minutes(10);
    let changes = KeyChanges {
        expires_at: Some(Some(expiry)),
        ..KeyChanges::default()
    };
    let expiring = store
        .update_key(
            &acme,
            &keys[1].key_id,
            changes,
            &actor(),
            t0,
            &limits.into(),
        )
        .await
        .unwrap();
    let t1 = t0 + Duration::hours(1);
    let (new, _) = new_key(&acme, "after-expiry", t1);
    store
        .create_key(new, &actor(), &limits.into())
        .await
        .unwrap();

    // Extending the expired key would make four active keys: refused.
    let extend = KeyChanges {
        expires_at: Some(Some(t1 + Duration::days(30))),
        ..KeyChanges::default()
    };
    let err = store
        .update_key(
            &acme,
            &expiring.key_id,
            extend.clone(),
            &actor(),
            t1,
            &limits.into(),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::QuotaExceeded {
                tier: Tier::Free,
                limit: 3,
                active: 3,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(
        store.get_key(&acme, &expiring.key_id).await.unwrap(),
        Some(expiring.clone())
    );
    // Removing the expiry is the same as extending it.
    let unexpire = KeyChanges {
        expires_at: Some(None),
        ..KeyChanges::default()
    };
    assert!(matches!(
        store
            .update_key(
                &acme,
                &expiring.key_id,
                unexpire,
                &actor(),
                t1,
                &limits.into()
            )
            .await,
        Err(StoreError::QuotaExceeded { .. })
    ));
    // Renaming an expired key does not reactivate it, so it needs no room.
    let rename = KeyChanges {
        name: Some(name("expired-but-renamed")),
        ..KeyChanges::default()
    };
    store
        .update_key(
            &acme,
            &expiring.key_id,
            rename,
            &actor(),
            t1,
            &limits.into(),
        )
        .await
        .unwrap();

    // With room again, the extension goes through.
    store
        .revoke_key(&acme, &keys[2].key_id, "make room", &actor(), t1)
        .await
        .unwrap();
    let extended = store
        .update_key(
            &acme,
            &expiring.key_id,
            extend,
            &actor(),
            t1,
            &limits.into(),
        )
        .await
        .unwrap();
    assert_eq!(extended.expires_at, Some(t1 + Duration::days(30)));
}

async fn concurrent_creates_cannot_overshoot_the_cap(store: Arc<dyn Store>) {
    let acme = account("ACME");
    let limits = TierLimits::default();
    let t0 = now();
    let mut tasks = JoinSet::new();
    for i in 0..20 {
        let store = store.clone();
        let (new, _) = new_key(&acme, &format!("racer-{i}"), t0);
        tasks.spawn(async move { store.create_key(new, &actor(), &limits.into()).await });
    }
    let (mut created, mut refused) = (0, 0);
    while let Some(outcome) = tasks.join_next().await {
        match outcome.unwrap() {
            Ok(_) => created += 1,
            Err(StoreError::QuotaExceeded {
                tier: Tier::Free,
                limit: 3,
                active: 3,
                ..
            }) => refused += 1,
            Err(e) => panic!("unexpected error: {e:?}"),
        }
    }
    assert_eq!((created, refused), (3, 17));
    assert_eq!(
        store
            .list_keys(&acme, true, None, 100)
            .await
            .unwrap()
            .items
            .len(),
        3
    );
    assert_eq!(all_events(&*store, &acme, None).await.len(), 3);
    assert_eq!(store.changes_since(0, 100).await.unwrap().len(), 3);
}

async fn set_tier_changes_the_cap_with_an_audit_event(store: Arc<dyn Store>) {
    let acme = account("ACME");
    let limits = TierLimits {
        free: 1,
        premium: 2,
    };
    let t0 = now();
    assert_eq!(store.get_account(&acme).await.unwrap().tier, Tier::Free);
    let (new, _) = new_key(&acme, "first", t0);
    store
        .create_key(new, &actor(), &limits.into())
        .await
        .unwrap();
    let (new, _) = new_key(&acme, "second", t0);
    assert!(matches!(
        store
            .create_key(new.clone(), &actor(), &limits.into())
            .await,
        Err(StoreError::QuotaExceeded {
            tier: Tier::Free,
            limit: 1,
            active: 1,
            ..
        })
    ));

    let t1 = t0 + Duration::minutes(1);
    let account_now = store
        .set_tier(&acme, Tier::Premium, &actor(), t1)
        .await
        .unwrap();
    assert_eq!(account_now.tier, Tier::Premium);
    assert_eq!(store.get_account(&acme).await.unwrap().tier, Tier::Premium);
    store
        .create_key(new, &actor(), &limits.into())
        .await
        .unwrap();
    let (new, _) = new_key(&acme, "third", t1);
    assert!(matches!(
        store.create_key(new, &actor(), &limits.into()).await,
        Err(StoreError::QuotaExceeded {
            tier: Tier::Premium,
            limit: 2,
            active: 2,
            ..
        })
    ));

    let events = all_events(&*store, &acme, None).await;
    let tier_events: Vec<_> = events
        .iter()
        .filter(|e| e.action == AuditAction::TierChanged)
        .collect();
    assert_eq!(tier_events.len(), 1);
    let event = tier_events[0];
    assert_eq!(event.key_id, None);
    assert_eq!(event.at, t1);
    assert_eq!(event.actor, actor().name);
    assert_eq!(event.changes.len(), 1);
    assert_eq!(event.changes[0].field, "tier");
    assert_eq!(event.changes[0].old.as_deref(), Some("free"));
    assert_eq!(event.changes[0].new.as_deref(), Some("premium"));

    // Setting the tier it already has records nothing.
    store
        .set_tier(&acme, Tier::Premium, &actor(), t1)
        .await
        .unwrap();
    assert_eq!(all_events(&*store, &acme, None).await.len(), events.len());

    // An account never seen can be given a tier before its first key.
    let globex = account("globex");
    store
        .set_tier(&globex, Tier::Premium, &actor(), t1)
        .await
        .unwrap();
    assert_eq!(
        store.get_account(&globex).await.unwrap().tier,
        Tier::Premium
    );
    assert_eq!(all_events(&*store, &globex, None).await.len(), 1);
}

async fn audit_events_list_oldest_first_filter_and_page(store: Arc<dyn Store>) {
    let acme = account("ACME");
    let t0 = now();
    let a = create(&*store, &acme, "alpha", t0).await;
    let b = create(&*store, &acme, "beta", t0 + Duration::seconds(1)).await;
    let operator = Actor {
        name: "key:key_AAAAAAAAAAAAAAAAAAAA".to_owned(),
        ip: None,
        operator: true,
    };
    let rename = KeyChanges {
        name: Some(name("alpha-2")),
        ..KeyChanges::default()
    };
    store
        .update_key(
            &acme,
            &a.key_id,
            rename,
            &operator,
            t0 + Duration::seconds(2),
            &roomy(),
        )
        .await
        .unwrap();
    store
        .revoke_key(
            &acme,
            &b.key_id,
            "unused",
            &actor(),
            t0 + Duration::seconds(3),
        )
        .await
        .unwrap();
    let fresh = GeneratedKey::generate(&pepper());
    store
        .rotate_key(
            &acme,
            &a.key_id,
            &NewSecret::from(&fresh),
            &actor(),
            t0 + Duration::seconds(4),
            &Policy::default(),
        )
        .await
        .unwrap();
    // Another account's events never show up.
    create(&*store, &account("globex"), "theirs", t0).await;

    let events = all_events(&*store, &acme, None).await;
    let summary: Vec<_> = events
        .iter()
        .map(|e| (e.key_id.clone().unwrap(), e.action))
        .collect();
    assert_eq!(
        summary,
        [
            (a.key_id.clone(), AuditAction::Created),
            (b.key_id.clone(), AuditAction::Created),
            (a.key_id.clone(), AuditAction::Updated),
            (b.key_id.clone(), AuditAction::Revoked),
            (a.key_id.clone(), AuditAction::Rotated),
        ]
    );
    assert!(
        events
            .windows(2)
            .all(|w| w[0].event_id < w[1].event_id && w[0].at <= w[1].at)
    );
    assert!(events.iter().all(|e| e.account_id == acme));
    assert_eq!(events[0].at, t0);
    assert_eq!(events[0].actor, "operator:alice@example.com");
    assert_eq!(events[0].actor_ip.as_deref(), Some("203.0.113.7"));
    assert_eq!(events[2].actor, "key:key_AAAAAAAAAAAAAAAAAAAA");
    assert_eq!(events[2].actor_ip, None);
    let created: Vec<_> = events[0].changes.iter().map(|c| c.field.as_str()).collect();
    assert_eq!(
        created,
        ["name", "description", "scopes", "expires_at", "prefix"]
    );
    assert_eq!(
        events[0].changes[2].new.as_deref(),
        Some("datasets:read models:*")
    );

    // Filtered by key.
    let of_a = all_events(&*store, &acme, Some(&a.key_id)).await;
    assert_eq!(
        of_a.iter().map(|e| e.action).collect::<Vec<_>>(),
        [
            AuditAction::Created,
            AuditAction::Updated,
            AuditAction::Rotated
        ]
    );
    assert_eq!(
        of_a,
        [events[0].clone(), events[2].clone(), events[4].clone()]
    );

    // Paged, two at a time.
    let mut paged = Vec::new();
    let mut cursor = None;
    loop {
        let page = store
            .list_audit_events(&acme, None, cursor, 2)
            .await
            .unwrap();
        assert!(page.items.len() <= 2);
        paged.extend(page.items);
        match page.next_cursor {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    assert_eq!(paged, events);
    // Paged and filtered.
    let first = store
        .list_audit_events(&acme, Some(&a.key_id), None, 1)
        .await
        .unwrap();
    assert_eq!(first.items, [events[0].clone()]);
    let rest = store
        .list_audit_events(&acme, Some(&a.key_id), first.next_cursor, 10)
        .await
        .unwrap();
    assert_eq!(rest.items, [events[2].clone(), events[4].clone()]);
    assert_eq!(rest.next_cursor, None);
}

async fn usage_is_recorded_and_never_goes_back_in_time(store: Arc<dyn Store>) {
    let acme = account("ACME");
    let t0 = now();
    let a = create(&*store, &acme, "alpha", t0).await;
    let b = create(&*store, &acme, "beta", t0).await;
    let seq = store.change_sequence().await.unwrap();
    store.record_usage(&[]).await.unwrap();

    let t1 = t0 + Duration::minutes(1);
    store
        .record_usage(&[
            UsageRecord {
                key_id: a.key_id.clone(),
                at: t1,
                ip: Some("198.51.100.1".to_owned()),
            },
            UsageRecord {
                key_id: b.key_id.clone(),
                at: t1,
                ip: None,
            },
            // A key that does not exist (e.g. deleted data) is skipped.
            UsageRecord {
                key_id: KeyId::generate(),
                at: t1,
                ip: None,
            },
        ])
        .await
        .unwrap();
    let got = store.get_key(&acme, &a.key_id).await.unwrap().unwrap();
    assert_eq!(got.last_used_at, Some(t1));
    assert_eq!(got.last_used_ip.as_deref(), Some("198.51.100.1"));
    let got = store.get_key(&acme, &b.key_id).await.unwrap().unwrap();
    assert_eq!(got.last_used_at, Some(t1));
    assert_eq!(got.last_used_ip, None);

    // An older report (a slow node flushing late) does not overwrite.
    let older = UsageRecord {
        key_id: a.key_id.clone(),
        at: t0 + Duration::seconds(30),
        ip: Some("192.0.2.99".to_owned()),
    };
    store
        .record_usage(std::slice::from_ref(&older))
        .await
        .unwrap();
    let got = store.get_key(&acme, &a.key_id).await.unwrap().unwrap();
    assert_eq!(got.last_used_at, Some(t1));
    assert_eq!(got.last_used_ip.as_deref(), Some("198.51.100.1"));

    // Within one batch, the latest use of a key wins, whatever the order.
    let t2 = t1 + Duration::minutes(1);
    let newest = UsageRecord {
        key_id: a.key_id.clone(),
        at: t2,
        ip: Some("198.51.100.2".to_owned()),
    };
    store
        .record_usage(&[newest.clone(), older.clone()])
        .await
        .unwrap();
    let got = store.get_key(&acme, &a.key_id).await.unwrap().unwrap();
    assert_eq!(got.last_used_at, Some(t2));
    assert_eq!(got.last_used_ip.as_deref(), Some("198.51.100.2"));
    let t3 = t2 + Duration::minutes(1);
    let newer = UsageRecord {
        key_id: a.key_id.clone(),
        at: t3,
        ip: Some("198.51.100.3".to_owned()),
    };
    store.record_usage(&[older, newer]).await.unwrap();
    let got = store.get_key(&acme, &a.key_id).await.unwrap().unwrap();
    assert_eq!(got.last_used_at, Some(t3));
    assert_eq!(got.last_used_ip.as_deref(), Some("198.51.100.3"));
    // The use shows through find_secret as well.
    assert_eq!(
        store
            .find_secret(&a.prefix)
            .await
            .unwrap()
            .unwrap()
            .key
            .last_used_at,
        Some(t3)
    );

    // Usage is not an admin change: no audit event, nothing on the feed.
    assert_eq!(all_events(&*store, &acme, None).await.len(), 2);
    assert_eq!(store.change_sequence().await.unwrap(), seq);
}

async fn the_change_feed_carries_every_changed_prefix(store: Arc<dyn Store>) {
    let acme = account("ACME");
    let t0 = now();
    assert_eq!(store.change_sequence().await.unwrap(), 0);
    assert!(store.changes_since(0, 100).await.unwrap().is_empty());

    let a = create(&*store, &acme, "alpha", t0).await;
    let b = create(&*store, &acme, "beta", t0).await;
    let after_creates = store.change_sequence().await.unwrap();
    let rename = KeyChanges {
        name: Some(name("alpha-2")),
        ..KeyChanges::default()
    };
    store
        .update_key(&acme, &a.key_id, rename, &actor(), t0, &roomy())
        .await
        .unwrap();
    let fresh = GeneratedKey::generate(&pepper());
    store
        .rotate_key(
            &acme,
            &a.key_id,
            &NewSecret::from(&fresh),
            &actor(),
            t0,
            &Policy::default(),
        )
        .await
        .unwrap();
    store
        .revoke_key(&acme, &b.key_id, "done", &actor(), t0)
        .await
        .unwrap();
    // A tier change does not affect any cached key.
    store
        .set_tier(&acme, Tier::Premium, &actor(), t0)
        .await
        .unwrap();

    let all = store.changes_since(0, 100).await.unwrap();
    let prefixes: Vec<_> = all.iter().map(|(_, p)| p.clone()).collect();
    assert_eq!(
        prefixes,
        [
            a.prefix.clone(),
            b.prefix.clone(),
            a.prefix.clone(),
            a.prefix.clone(),
            fresh.prefix().clone(),
            b.prefix.clone(),
        ]
    );
    assert!(all.windows(2).all(|w| w[0].0 < w[1].0));
    assert_eq!(
        store.change_sequence().await.unwrap(),
        all.last().unwrap().0
    );
    assert_eq!(all[1].0, after_creates);

    // Catching up from a sequence number, in pages.
    let since = store.changes_since(after_creates, 100).await.unwrap();
    assert_eq!(since, all[2..]);
    let first_two = store.changes_since(after_creates, 2).await.unwrap();
    assert_eq!(first_two, all[2..4]);
    let rest = store.changes_since(first_two[1].0, 100).await.unwrap();
    assert_eq!(rest, all[4..]);
    assert!(
        store
            .changes_since(all.last().unwrap().0, 100)
            .await
            .unwrap()
            .is_empty()
    );
}

async fn no_audit_event_holds_a_secret(store: Arc<dyn Store>) {
    let acme = account("ACME");
    let t0 = now();
    let (mut new, first) = new_key(&acme, "ci-runner", t0);
    new.expires_at = Some(t0 + Duration::days(1));
    let key = store.create_key(new, &actor(), &roomy()).await.unwrap();
    let second = GeneratedKey::generate(&pepper());
    store
        .rotate_key(
            &acme,
            &key.key_id,
            &NewSecret::from(&second),
            &actor(),
            t0,
            &Policy::default(),
        )
        .await
        .unwrap();
    let changes = KeyChanges {
        name: Some(name("renamed")),
        description: Some(description("new words")),
        scopes: Some(scopes(&["datasets:write"])),
        expires_at: Some(None),
        ..KeyChanges::default()
    };
    store
        .update_key(&acme, &key.key_id, changes, &actor(), t0, &roomy())
        .await
        .unwrap();
    store
        .revoke_key(&acme, &key.key_id, "test over", &actor(), t0)
        .await
        .unwrap();

    let events = all_events(&*store, &acme, None).await;
    assert_eq!(events.len(), 4);
    let rendered = format!("{events:?}");
    for generated in [&first, &second] {
        let secret = generated.expose_secret();
        let hash = generated.hash();
        let hex: String = hash.as_bytes().iter().map(|b| format!("{b:02x}")).collect();
        let bytes_as_list = format!("{:?}", hash.as_bytes());
        for event in &events {
            for change in &event.changes {
                for value in [&change.old, &change.new].into_iter().flatten() {
                    assert!(!value.contains(&secret[13..]), "secret in {change:?}");
                    assert!(
                        !value.contains(&secret[13..25]),
                        "part of a secret in {change:?}"
                    );
                    assert!(!value.to_lowercase().contains(&hex), "hash in {change:?}");
                }
            }
        }
        assert!(!rendered.contains(&secret[13..25]));
        assert!(!rendered.contains(&hex));
        assert!(!rendered.contains(&bytes_as_list));
    }
}

async fn a_taken_identifier_is_a_conflict_and_changes_nothing(store: Arc<dyn Store>) {
    let acme = account("ACME");
    let t0 = now();
    let (new, _) = new_key(&acme, "original", t0);
    let key = store
        .create_key(new.clone(), &actor(), &roomy())
        .await
        .unwrap();
    let seq = store.change_sequence().await.unwrap();

    // Same prefix, different key.
    let (mut clash, _) = new_key(&acme, "clash", t0);
    clash.prefix = new.prefix.clone();
    let err = store
        .create_key(clash.clone(), &actor(), &roomy())
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Conflict), "{err:?}");
    assert_eq!(store.get_key(&acme, &clash.key_id).await.unwrap(), None);

    // Same key id, fresh prefix.
    let (mut clash, _) = new_key(&acme, "clash", t0);
    clash.key_id = new.key_id.clone();
    let err = store
        .create_key(clash.clone(), &actor(), &roomy())
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Conflict), "{err:?}");
    assert!(store.find_secret(&clash.prefix).await.unwrap().is_none());

    // Rotating onto a prefix that is taken.
    let err = store
        .rotate_key(
            &acme,
            &key.key_id,
            &NewSecret {
                prefix: new.prefix.clone(),
                hash: new.hash,
                pepper_id: new.pepper_id,
            },
            &actor(),
            t0,
            &Policy::default(),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Conflict), "{err:?}");

    assert_eq!(store.get_key(&acme, &key.key_id).await.unwrap(), Some(key));
    assert_eq!(
        store
            .find_secret(&new.prefix)
            .await
            .unwrap()
            .unwrap()
            .superseded_at,
        None
    );
    assert_eq!(all_events(&*store, &acme, None).await.len(), 1);
    assert_eq!(store.change_sequence().await.unwrap(), seq);
}

/// Streams every secret in batches of `batch`, checking the batches'
/// sizes and the returned count.
async fn stream_all(store: &dyn Store, batch: usize) -> Vec<SecretEntry> {
    let mut batches = Vec::new();
    let count = store
        .stream_secrets(batch, &mut |entries| batches.push(entries))
        .await
        .unwrap();
    for entries in &batches {
        assert!(!entries.is_empty(), "batch {batch}: an empty batch");
        assert!(
            entries.len() <= batch.max(1),
            "batch {batch}: {}",
            entries.len()
        );
    }
    let all: Vec<SecretEntry> = batches.into_iter().flatten().collect();
    assert_eq!(count, all.len(), "batch {batch}");
    all
}

async fn streams_yield_every_secret_and_prefix_once(store: Arc<dyn Store>) {
    let (acme, globex) = (account("ACME"), account("globex"));
    let t0 = now();
    let mut calls = 0;
    let count = store.stream_secrets(10, &mut |_| calls += 1).await.unwrap();
    assert_eq!((count, calls), (0, 0));
    let count = store
        .stream_prefixes(10, &mut |_| calls += 1)
        .await
        .unwrap();
    assert_eq!((count, calls), (0, 0));

    // Current secrets of two accounts, superseded ones, a revoked key,
    // keys with and without expiry, with various scopes.
    let mut expected: BTreeMap<KeyPrefix, SecretEntry> = BTreeMap::new();
    let mut keys = Vec::new();
    let scope_lists: [&[&str]; 3] = [&["datasets:read", "models:*"], &[], &["billing:read"]];
    for (i, owner) in [&acme, &acme, &acme, &globex, &globex, &acme, &globex]
        .into_iter()
        .enumerate()
    {
        let (mut new, generated) = new_key(owner, &format!("key-{i}"), t0);
        new.scopes = scopes(scope_lists[i % 3]);
        if i % 2 == 1 {
            new.expires_at = Some(t0 + Duration::days(i as i64));
        }
        let key = store
            .create_key(new.clone(), &actor(), &roomy())
            .await
            .unwrap();
        expected.insert(
            generated.prefix().clone(),
            SecretEntry {
                prefix: generated.prefix().clone(),
                hash: generated.hash(),
                pepper_id: Some(generated.pepper_id()),
                superseded: false,
                revoked: false,
                expires_at: new.expires_at,
                key_id: new.key_id,
                account_id: new.account_id,
                name: new.name,
                scopes: new.scopes,
            },
        );
        keys.push(key);
    }
    let t1 = t0 + Duration::minutes(1);
    for key in [&keys[0], &keys[3], &keys[0]] {
        let current = store
            .get_key(&key.account_id, &key.key_id)
            .await
            .unwrap()
            .unwrap();
        // Under another pepper: the stream carries each secret's own.
        let fresh = GeneratedKey::generate(&Pepper::from_bytes(&[0x43; 32]));
        store
            .rotate_key(
                &key.account_id,
                &key.key_id,
                &NewSecret::from(&fresh),
                &actor(),
                t1,
                &Policy::default(),
            )
            .await
            .unwrap();
        let old = expected.get_mut(&current.prefix).unwrap();
        old.superseded = true;
        let new = SecretEntry {
            prefix: fresh.prefix().clone(),
            hash: fresh.hash(),
            pepper_id: Some(fresh.pepper_id()),
            superseded: false,
            ..old.clone()
        };
        expected.insert(fresh.prefix().clone(), new);
    }
    // Revoking marks every secret of the key, superseded ones included.
    store
        .revoke_key(&globex, &keys[3].key_id, "done", &actor(), t1)
        .await
        .unwrap();
    for entry in expected.values_mut() {
        if entry.key_id == keys[3].key_id {
            entry.revoked = true;
        }
    }
    assert_eq!(expected.len(), 10);
    assert_eq!(expected.values().filter(|e| e.superseded).count(), 3);
    assert_eq!(expected.values().filter(|e| e.revoked).count(), 2);

    // Every batch size gives the same set, each secret once. (0 counts as 1.)
    for batch in [1, 3, 1000, 0] {
        let streamed = stream_all(&*store, batch).await;
        let mut got = BTreeMap::new();
        for entry in streamed {
            let prefix = entry.prefix.clone();
            assert!(
                got.insert(prefix.clone(), entry).is_none(),
                "batch {batch}: {prefix} twice"
            );
        }
        assert_eq!(got, expected, "batch {batch}");
    }

    // The prefixes alone: the same set, each once, in batches as asked.
    for batch in [1, 3, 1000, 0] {
        let mut batches: Vec<Vec<KeyPrefix>> = Vec::new();
        let count = store
            .stream_prefixes(batch, &mut |prefixes| batches.push(prefixes))
            .await
            .unwrap();
        assert!(
            batches
                .iter()
                .all(|b| !b.is_empty() && b.len() <= batch.max(1))
        );
        let prefixes: Vec<KeyPrefix> = batches.into_iter().flatten().collect();
        assert_eq!(count, prefixes.len(), "batch {batch}");
        let unique: std::collections::BTreeSet<KeyPrefix> = prefixes.iter().cloned().collect();
        assert_eq!(
            unique.len(),
            prefixes.len(),
            "batch {batch}: a prefix twice"
        );
        assert!(unique.iter().eq(expected.keys()), "batch {batch}");
    }

    // Each entry says what find_secret says of its prefix.
    for entry in stream_all(&*store, 4).await {
        let found = store.find_secret(&entry.prefix).await.unwrap().unwrap();
        let prefix = &entry.prefix;
        assert!(found.hash.matches(&entry.hash), "{prefix}");
        assert_eq!(entry.superseded, found.superseded_at.is_some(), "{prefix}");
        assert_eq!(entry.revoked, found.key.revoked_at.is_some(), "{prefix}");
        assert_eq!(entry.expires_at, found.key.expires_at, "{prefix}");
        assert_eq!(entry.key_id, found.key.key_id, "{prefix}");
        assert_eq!(entry.account_id, found.key.account_id, "{prefix}");
        assert_eq!(entry.name, found.key.name, "{prefix}");
        assert_eq!(entry.scopes, found.key.scopes, "{prefix}");
    }
}

/// `count` keys spread over `accounts`, with distinct names and expiries.
fn import_batch(
    accounts: &[&AccountId],
    count: usize,
    at: OffsetDateTime,
) -> Vec<(NewKey, GeneratedKey)> {
    (0..count)
        .map(|i| {
            let (mut new, generated) = new_key(
                accounts[i % accounts.len()],
                &format!("imported-{i}"),
                at + Duration::seconds(i as i64 % 7),
            );
            if i % 3 == 0 {
                new.expires_at = Some(at + Duration::days(30 + i as i64));
            }
            if i % 5 == 0 {
                new.scopes = ScopeSet::default();
            }
            (new, generated)
        })
        .collect()
}

async fn import_keys_writes_keys_events_and_changes_ignoring_the_cap(store: Arc<dyn Store>) {
    let (acme, globex, initech) = (account("ACME"), account("globex"), account("initech"));
    let t0 = now();
    // ACME exists already, on premium, with a key of its own.
    let existing = create(&*store, &acme, "existing", t0).await;
    store
        .set_tier(&acme, Tier::Premium, &actor(), t0)
        .await
        .unwrap();
    let events_before = all_events(&*store, &acme, None).await.len();
    let seq = store.change_sequence().await.unwrap();

    store.import_keys(Vec::new(), &actor()).await.unwrap();
    assert_eq!(store.change_sequence().await.unwrap(), seq);

    let batch = import_batch(&[&acme, &globex, &initech], 300, t0);
    let importer = Actor {
        name: "operator:importer@example.com".to_owned(),
        ip: Some("192.0.2.10".to_owned()),
        operator: true,
    };
    store
        .import_keys(batch.iter().map(|(n, _)| n.clone()).collect(), &importer)
        .await
        .unwrap();

    for (new, generated) in &batch {
        let key = store
            .get_key(&new.account_id, &new.key_id)
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("{} was not imported", new.key_id));
        assert_eq!(key.name, new.name);
        assert_eq!(key.description, new.description);
        assert_eq!(key.scopes, new.scopes);
        assert_eq!(key.prefix, new.prefix);
        assert_eq!(key.created_at, new.created_at);
        assert_eq!(key.expires_at, new.expires_at);
        assert_eq!(key.revoked_at, None);
        assert_eq!(key.rotated_at, None);
        let secret = store
            .find_secret(generated.prefix())
            .await
            .unwrap()
            .unwrap();
        assert!(secret.hash.matches(&generated.hash()));
        assert_eq!(secret.superseded_at, None);
        assert_eq!(secret.key, key);
    }

    // Listed in import order, after what the account already had; well
    // past any tier's cap.
    for owner in [&acme, &globex, &initech] {
        let listed: Vec<_> = store
            .list_keys(owner, false, None, 1000)
            .await
            .unwrap()
            .items
            .into_iter()
            .map(|k| k.key_id)
            .collect();
        let mut want: Vec<_> = if owner == &acme {
            vec![existing.key_id.clone()]
        } else {
            Vec::new()
        };
        want.extend(
            batch
                .iter()
                .filter(|(n, _)| &n.account_id == owner)
                .map(|(n, _)| n.key_id.clone()),
        );
        assert_eq!(listed, want, "{owner}");
    }
    // New accounts are free; an existing account keeps its tier. The cap
    // applies again to the next create.
    assert_eq!(store.get_account(&acme).await.unwrap().tier, Tier::Premium);
    assert_eq!(store.get_account(&globex).await.unwrap().tier, Tier::Free);
    let (new, _) = new_key(&globex, "one-more", t0);
    assert!(matches!(
        store.create_key(new, &actor(), &Policy::default()).await,
        Err(StoreError::QuotaExceeded {
            tier: Tier::Free,
            limit: 3,
            active: 100,
            ..
        })
    ));

    // One `created` event per key, like create_key writes.
    let events = all_events(&*store, &globex, None).await;
    let imported: Vec<_> = batch
        .iter()
        .filter(|(n, _)| n.account_id == globex)
        .collect();
    assert_eq!(events.len(), imported.len());
    for (event, (new, _)) in events.iter().zip(&imported) {
        assert_eq!(event.key_id.as_ref(), Some(&new.key_id));
        assert_eq!(event.action, AuditAction::Created);
        assert_eq!(event.actor, importer.name);
        assert_eq!(event.actor_ip, importer.ip);
        assert_eq!(event.at, new.created_at);
        let fields: Vec<_> = event.changes.iter().map(|c| c.field.as_str()).collect();
        assert_eq!(
            fields,
            ["name", "description", "scopes", "expires_at", "prefix"]
        );
        assert_eq!(event.changes[0].new.as_deref(), Some(new.name.as_str()));
        assert_eq!(
            event.changes[2].new.as_deref(),
            Some(new.scopes.to_strings().join(" ").as_str())
        );
        assert_eq!(event.changes[3].new.is_some(), new.expires_at.is_some());
        assert_eq!(event.changes[4].new.as_deref(), Some(new.prefix.as_str()));
    }
    assert_eq!(
        all_events(&*store, &acme, None).await.len(),
        events_before + 100
    );

    // One change per key, in import order, after everything before.
    let changes = store.changes_since(seq, 1000).await.unwrap();
    assert_eq!(
        changes.iter().map(|(_, p)| p).collect::<Vec<_>>(),
        batch.iter().map(|(n, _)| &n.prefix).collect::<Vec<_>>()
    );
    assert!(changes.windows(2).all(|w| w[0].0 < w[1].0));
    assert_eq!(
        store.change_sequence().await.unwrap(),
        changes.last().unwrap().0
    );

    // And the imported secrets show up in a stream.
    assert_eq!(stream_all(&*store, 1000).await.len(), 301);
}

async fn import_keys_is_all_or_nothing(store: Arc<dyn Store>) {
    let (acme, globex) = (account("ACME"), account("globex"));
    let t0 = now();
    let existing = create(&*store, &acme, "existing", t0).await;
    let fresh = GeneratedKey::generate(&pepper());
    let rotated = store
        .rotate_key(
            &acme,
            &existing.key_id,
            &NewSecret::from(&fresh),
            &actor(),
            t0,
            &Policy::default(),
        )
        .await
        .unwrap()
        .key;
    let seq = store.change_sequence().await.unwrap();
    let events = all_events(&*store, &acme, None).await;
    let secrets = stream_all(&*store, 1000).await.len();

    let batch = || -> Vec<NewKey> {
        import_batch(&[&acme, &globex], 200, t0)
            .into_iter()
            .map(|(n, _)| n)
            .collect()
    };
    let mut clashes = Vec::new();
    // The current prefix of a stored key, last in the batch.
    let mut keys = batch();
    keys.last_mut().unwrap().prefix = rotated.prefix.clone();
    clashes.push(("current prefix", keys));
    // A superseded prefix: taken for good.
    let mut keys = batch();
    keys[150].prefix = existing.prefix.clone();
    clashes.push(("superseded prefix", keys));
    // A stored key id.
    let mut keys = batch();
    keys[199].key_id = existing.key_id.clone();
    clashes.push(("stored key id", keys));
    // Two keys of the batch share a prefix, or an id.
    let mut keys = batch();
    keys[120].prefix = keys[7].prefix.clone();
    clashes.push(("prefix twice in the batch", keys));
    let mut keys = batch();
    keys[121].key_id = keys[8].key_id.clone();
    clashes.push(("key id twice in the batch", keys));

    for (what, keys) in clashes {
        let probe = keys[0].clone();
        let err = store.import_keys(keys, &actor()).await.unwrap_err();
        assert!(matches!(err, StoreError::Conflict), "{what}: {err:?}");
        // Nothing of the batch was written.
        assert_eq!(
            store
                .get_key(&probe.account_id, &probe.key_id)
                .await
                .unwrap(),
            None,
            "{what}"
        );
        assert!(
            store
                .list_keys(&globex, true, None, 10)
                .await
                .unwrap()
                .items
                .is_empty(),
            "{what}"
        );
        assert!(all_events(&*store, &globex, None).await.is_empty());
        assert_eq!(all_events(&*store, &acme, None).await, events, "{what}");
        assert_eq!(store.change_sequence().await.unwrap(), seq, "{what}");
        assert_eq!(stream_all(&*store, 1000).await.len(), secrets, "{what}");
        assert_eq!(
            store.get_key(&acme, &existing.key_id).await.unwrap(),
            Some(rotated.clone())
        );
    }

    // The same batch without the clash goes through.
    store.import_keys(batch(), &actor()).await.unwrap();
    assert_eq!(store.changes_since(seq, 1000).await.unwrap().len(), 200);
}

async fn a_rehash_applies_only_to_the_hash_it_replaces_and_changes_nothing_else(
    store: Arc<dyn Store>,
) {
    let acme = account("ACME");
    let t0 = now();
    assert_eq!(
        store.rehash_secrets(&[]).await.unwrap(),
        Vec::<KeyPrefix>::new()
    );
    let (new, secret) = new_key(&acme, "moved", t0);
    let key = store.create_key(new, &actor(), &roomy()).await.unwrap();
    let (other, other_secret) = new_key(&acme, "stays", t0);
    store.create_key(other, &actor(), &roomy()).await.unwrap();
    let seq = store.change_sequence().await.unwrap();
    let events = all_events(&*store, &acme, None).await.len();
    let stored = (secret.hash(), Some(pepper().id()));

    // A stale re-hash (it believes the secret legacy), one of a prefix no
    // secret has, and the right one, in one batch: only the right one applies.
    let stale = rehash(&other_secret, (other_secret.hash(), None), &other_pepper());
    let nobody = rehash(
        &GeneratedKey::generate(&pepper()),
        (secret.hash(), Some(pepper().id())),
        &other_pepper(),
    );
    let right = rehash(&secret, stored, &other_pepper());
    let done = store
        .rehash_secrets(&[stale, nobody, right.clone()])
        .await
        .unwrap();
    assert_eq!(done, [secret.prefix().clone()]);
    let found = store.find_secret(secret.prefix()).await.unwrap().unwrap();
    assert!(found.hash.matches(&hash_under(&secret, &other_pepper())));
    assert_eq!(found.pepper_id, Some(other_pepper().id()));
    assert_eq!(found.key, key, "the key itself did not change");
    let untouched = store
        .find_secret(other_secret.prefix())
        .await
        .unwrap()
        .unwrap();
    assert!(untouched.hash.matches(&other_secret.hash()));
    assert_eq!(untouched.pepper_id, Some(pepper().id()));

    // Done once: the same re-hash again (another node's, say) finds the
    // hash already replaced, and one from the old state cannot undo it.
    assert!(store.rehash_secrets(&[right]).await.unwrap().is_empty());
    let back = Rehash {
        prefix: secret.prefix().clone(),
        old_hash: secret.hash(),
        old_pepper_id: Some(pepper().id()),
        new_hash: secret.hash(),
        new_pepper_id: pepper().id(),
    };
    assert!(store.rehash_secrets(&[back]).await.unwrap().is_empty());
    let found = store.find_secret(secret.prefix()).await.unwrap().unwrap();
    assert_eq!(found.pepper_id, Some(other_pepper().id()));

    // Not a change of the key: no audit event, nothing for nodes to evict.
    assert_eq!(store.change_sequence().await.unwrap(), seq);
    assert_eq!(all_events(&*store, &acme, None).await.len(), events);

    // Re-hashing a rotated-away secret, or one of a revoked key, undoes
    // neither the rotation nor the revocation.
    let t1 = t0 + Duration::minutes(1);
    let fresh = GeneratedKey::generate(&other_pepper());
    store
        .rotate_key(
            &acme,
            &key.key_id,
            &NewSecret::from(&fresh),
            &actor(),
            t1,
            &Policy::default(),
        )
        .await
        .unwrap();
    store
        .revoke_key(&acme, &key.key_id, "leaked", &actor(), t1)
        .await
        .unwrap();
    let moved_stored = (found.hash, found.pepper_id);
    let again = rehash(&secret, moved_stored, &pepper());
    assert_eq!(
        store.rehash_secrets(&[again]).await.unwrap(),
        [secret.prefix().clone()]
    );
    let old = store.find_secret(secret.prefix()).await.unwrap().unwrap();
    assert_eq!(old.superseded_at, Some(t1));
    assert_eq!(old.key.revoked_at, Some(t1));
    assert_eq!(old.key.prefix, *fresh.prefix());
    assert_eq!(old.pepper_id, Some(pepper().id()));
}

/// Sorted, for comparison: the backends return them in any order.
fn by_pepper(mut uses: Vec<PepperUse>) -> Vec<PepperUse> {
    uses.sort_by_key(|u| u.pepper_id);
    uses
}

async fn secrets_are_counted_per_pepper_live_and_in_all(store: Arc<dyn Store>) {
    assert_eq!(store.secrets_by_pepper().await.unwrap(), []);
    let acme = account("ACME");
    let t0 = now();
    let (a, b) = (pepper(), other_pepper());
    // Under a: a live key, a revoked one, an expired one (still live: it
    // can be extended), and one rotated onto b (its old secret is not live).
    let live = create(&*store, &acme, "live", t0).await;
    let revoked = create(&*store, &acme, "revoked", t0).await;
    store
        .revoke_key(&acme, &revoked.key_id, "gone", &actor(), t0)
        .await
        .unwrap();
    let (mut expired, _) = new_key(&acme, "expired", t0 - Duration::days(2));
    expired.expires_at = Some(t0 - Duration::days(1));
    store.create_key(expired, &actor(), &roomy()).await.unwrap();
    let rotated = create(&*store, &acme, "rotated", t0).await;
    let onto_b = GeneratedKey::generate(&b);
    store
        .rotate_key(
            &acme,
            &rotated.key_id,
            &NewSecret::from(&onto_b),
            &actor(),
            t0,
            &Policy::default(),
        )
        .await
        .unwrap();
    let use_of = |id: &Pepper, live, total| PepperUse {
        pepper_id: Some(id.id()),
        live,
        total,
    };
    let mut expected = by_pepper(vec![use_of(&a, 2, 4), use_of(&b, 1, 1)]);
    assert_eq!(
        by_pepper(store.secrets_by_pepper().await.unwrap()),
        expected
    );

    // A re-hash moves a live secret from a to b.
    let secret = store.find_secret(&live.prefix).await.unwrap().unwrap();
    let moved = Rehash {
        prefix: live.prefix.clone(),
        old_hash: secret.hash,
        old_pepper_id: secret.pepper_id,
        new_hash: SecretHash::from_bytes([9; 32]),
        new_pepper_id: b.id(),
    };
    assert_eq!(store.rehash_secrets(&[moved]).await.unwrap().len(), 1);
    expected = by_pepper(vec![use_of(&a, 1, 3), use_of(&b, 2, 2)]);
    assert_eq!(
        by_pepper(store.secrets_by_pepper().await.unwrap()),
        expected
    );
}

// ---------------------------------------------------------------------------
// Instantiation per backend

async fn pruning_drops_old_changes_and_followers_behind_it_are_told(store: Arc<dyn Store>) {
    let acme = account("ACME");
    let t0 = now();
    let t1 = t0 + Duration::hours(2);
    // Nothing to prune in an empty log, nor when everything is recent.
    assert_eq!(store.prune_changes(t0).await.unwrap(), 0);
    let old = [
        create(&*store, &acme, "old-1", t0).await,
        create(&*store, &acme, "old-2", t0).await,
    ];
    let before_recent = store.change_sequence().await.unwrap();
    let recent = create(&*store, &acme, "recent", t1).await;
    assert_eq!(store.prune_changes(t0).await.unwrap(), 0);

    assert_eq!(
        store.prune_changes(t0 + Duration::hours(1)).await.unwrap(),
        2
    );
    let newest = store.change_sequence().await.unwrap();
    // A follower that saw everything before the recent change goes on.
    assert_eq!(
        store.changes_since(before_recent, 100).await.unwrap(),
        [(newest, recent.prefix.clone())]
    );
    // One that is further behind is told the changes it missed are gone.
    for behind in [0, before_recent - 1] {
        let err = store.changes_since(behind, 100).await.unwrap_err();
        assert!(
            matches!(err, StoreError::ChangesPruned { pruned_through } if pruned_through == before_recent),
            "{err:?}"
        );
    }
    // The keys themselves are untouched.
    for key in &old {
        assert_eq!(
            store.get_key(&acme, &key.key_id).await.unwrap().as_ref(),
            Some(key)
        );
    }

    // Pruning everything keeps the newest entry, so the sequence never
    // goes back, and the floor never moves down.
    assert_eq!(
        store.prune_changes(t1 + Duration::days(30)).await.unwrap(),
        0
    );
    assert_eq!(store.change_sequence().await.unwrap(), newest);
    assert!(store.changes_since(newest, 100).await.unwrap().is_empty());
    let later = create(&*store, &acme, "later", t1).await;
    assert_eq!(
        store.prune_changes(t1 + Duration::days(30)).await.unwrap(),
        1
    );
    let err = store.changes_since(before_recent, 100).await.unwrap_err();
    assert!(
        matches!(err, StoreError::ChangesPruned { pruned_through } if pruned_through == newest),
        "{err:?}"
    );
    let last = store.change_sequence().await.unwrap();
    assert!(last > newest);
    assert_eq!(
        store.changes_since(newest, 100).await.unwrap(),
        [(last, later.prefix.clone())]
    );
}

macro_rules! conformance {
    ($($test:ident),* $(,)?) => {
        mod sqlite {
            use std::sync::Arc;
            use vilvik_keys_store::{SqliteStore, Store};

            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $test() {
                    let dir = tempfile::tempdir().unwrap();
                    let store = SqliteStore::open(&dir.path().join("vilvik-keys.db")).await.unwrap();
                    assert_eq!(store.migrate().await.unwrap(), vilvik_keys_store::MIGRATION_COUNT);
                    super::$test(Arc::new(store)).await;
                }
            )*
        }

        mod postgres {
            use std::sync::Arc;
            use vilvik_keys_store::{PostgresStore, Store};
            use vilvik_keys_test_db::TestDatabase;

            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $test() {
                    let Some(db) = TestDatabase::create().await else {
                        return;
                    };
                    let store = PostgresStore::connect(db.url()).await.unwrap();
                    assert_eq!(store.migrate().await.unwrap(), vilvik_keys_store::MIGRATION_COUNT);
                    super::$test(Arc::new(store)).await;
                }
            )*
        }
    };
}

conformance!(
    migrate_twice_runs_nothing_the_second_time,
    create_get_and_list_with_paging,
    another_accounts_key_is_invisible,
    update_records_only_what_changed,
    rotate_supersedes_the_old_secret,
    revocation_is_final,
    an_expired_key_cannot_be_rotated,
    the_tier_cap_holds,
    concurrent_creates_cannot_overshoot_the_cap,
    set_tier_changes_the_cap_with_an_audit_event,
    audit_events_list_oldest_first_filter_and_page,
    usage_is_recorded_and_never_goes_back_in_time,
    the_change_feed_carries_every_changed_prefix,
    no_audit_event_holds_a_secret,
    a_taken_identifier_is_a_conflict_and_changes_nothing,
    streams_yield_every_secret_and_prefix_once,
    import_keys_writes_keys_events_and_changes_ignoring_the_cap,
    import_keys_is_all_or_nothing,
    pruning_drops_old_changes_and_followers_behind_it_are_told,
    a_rehash_applies_only_to_the_hash_it_replaces_and_changes_nothing_else,
    secrets_are_counted_per_pepper_live_and_in_all,
    a_thousand_rotations_keep_a_bounded_history,
    old_rotated_secrets_are_pruned_after_the_retention,
    revoked_keys_count_toward_the_stored_key_ceiling,
    a_create_retried_with_its_request_id_creates_nothing_more,
    a_refused_create_records_no_request_id,
    a_request_id_is_forgotten_after_its_window,
    concurrent_calls_with_one_request_id_create_one_key,
    a_rotation_retried_with_its_request_id_rotates_once,
    every_change_of_a_key_and_only_a_change_raises_its_version,
    pruned_secrets_are_published_for_caches_to_forget,
);

//! Request ids: a create or rotation retried with its request id within
//! the id's window answers what the first call did (its key and sealed
//! secret) and changes nothing more, even at the cap and even when the
//! retries race; the same id with other parameters or for another method
//! is refused; a refused call records no id; after its window the id is a
//! new request.

use std::sync::Arc;

use time::{Duration, OffsetDateTime};
use tokio::task::JoinSet;
use vilvik_keys_domain::KeyId;
use vilvik_keys_store::{
    Actor, KeyRecord, NewKey, NewSecret, Outcome, Policy, RequestMethod, RequestRecord,
    RotationRequest, Store, StoreError,
};
use vilvik_keys_test_db::fixtures::{
    account, actor, all_events, capped, create, new_key, new_secret, now, pepper, revoke, roomy,
};

use crate::{done, key_count, replayed};

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

/// Creates `new` under request id `record`, made `new`'s (the server
/// makes a retry's key id afresh, so the record names the key it creates).
async fn create_under(
    store: &dyn Store,
    new: NewKey,
    record: &RequestRecord,
    policy: &Policy,
) -> Result<Outcome<KeyRecord>, StoreError> {
    let record = RequestRecord {
        key_id: new.key_id.clone(),
        ..record.clone()
    };
    store
        .create_key_with(new, Some(&record), &actor(), policy)
        .await
}

/// Whether `outcome` is the refusal of a request id first used by a
/// create, with other parameters or for another method.
fn reused_from_a_create<T>(outcome: &Result<T, StoreError>) -> bool {
    matches!(
        outcome,
        Err(StoreError::RequestIdReused {
            method: RequestMethod::CreateKey
        })
    )
}

/// The record of a create of `new` under request id `id`, valid for a day
/// from `at`.
fn create_request(id: u8, new: &NewKey, at: OffsetDateTime) -> RequestRecord {
    request(
        id,
        RequestMethod::CreateKey,
        9,
        &new.key_id,
        at + Duration::days(1),
    )
}

pub(crate) async fn a_create_retried_with_its_request_id_creates_nothing_more(
    store: Arc<dyn Store>,
) {
    let acme = account("ACME");
    let t0 = now();
    let policy = capped(1, 1);
    let (first, _) = new_key(&acme, "first", t0);
    let first_id = first.key_id.clone();
    let record = create_request(1, &first, t0);
    let outcome = create_under(&*store, first, &record, &policy).await;
    let created = done(outcome.unwrap(), "the first call replayed");
    // The retry comes with a new key id and secret (the server makes them
    // afresh) and finds the account at its cap: it still gets the first key.
    let (retry, _) = new_key(&acme, "first", t0 + Duration::seconds(5));
    let retry_record = RequestRecord {
        sealed: vec![0; 4],
        ..record.clone()
    };
    let outcome = create_under(&*store, retry, &retry_record, &policy).await;
    let replay = replayed(outcome.unwrap(), "the retry created a second key");
    assert_eq!(replay.key, created);
    assert_eq!(
        replay.sealed, record.sealed,
        "the first call's sealed secret"
    );
    assert_eq!(replay.pepper_id, pepper().id());
    assert_eq!(key_count(&*store, &acme).await, 1);
    assert_eq!(all_events(&*store, &acme, None).await.len(), 1);
    assert_eq!(store.changes_since(0, 100).await.unwrap().len(), 1);

    // The same id with other parameters, or for a rotation, is refused.
    let (other, _) = new_key(&acme, "other", t0);
    let other_params = RequestRecord {
        params: [8; 32],
        ..record.clone()
    };
    let refused = create_under(&*store, other, &other_params, &roomy()).await;
    assert!(reused_from_a_create(&refused), "{refused:?}");
    let rotation = RotationRequest {
        secret: NewSecret::from(&new_secret()),
        if_version: None,
        request: Some(RequestRecord {
            method: RequestMethod::RotateKey,
            ..record.clone()
        }),
    };
    let refused = store
        .rotate_key_with(&acme, &first_id, &rotation, &actor(), t0, &roomy())
        .await;
    assert!(reused_from_a_create(&refused), "{refused:?}");
    // Another account's same id is another request.
    let (theirs, _) = new_key(&account("OTHER"), "theirs", t0);
    let created = create_under(&*store, theirs, &record, &roomy()).await;
    assert!(matches!(created, Ok(Outcome::Done(_))), "{created:?}");
    assert_eq!(key_count(&*store, &acme).await, 1);
    assert_eq!(all_events(&*store, &acme, None).await.len(), 1);
}

pub(crate) async fn a_refused_create_records_no_request_id(store: Arc<dyn Store>) {
    let acme = account("ACME");
    let t0 = now();
    let one = capped(1, 1);
    let (taken, _) = new_key(&acme, "holds the only slot", t0);
    let taken = store.create_key(taken, &actor(), &one).await.unwrap();
    let (new, _) = new_key(&acme, "refused", t0);
    let record = create_request(2, &new, t0);
    let refused = create_under(&*store, new.clone(), &record, &one).await;
    assert!(
        matches!(refused, Err(StoreError::QuotaExceeded { .. })),
        "{refused:?}"
    );
    // Retried once there is room, the same id creates the key.
    revoke(&*store, &taken, "make room", t0).await;
    let created = create_under(&*store, new, &record, &one).await;
    assert!(matches!(created, Ok(Outcome::Done(_))), "{created:?}");
    assert_eq!(all_events(&*store, &acme, None).await.len(), 3);
}

pub(crate) async fn a_request_id_is_forgotten_after_its_window(store: Arc<dyn Store>) {
    let acme = account("ACME");
    let t0 = now();
    let window_end = t0 + Duration::days(1);
    let (first, _) = new_key(&acme, "first", t0);
    let record = create_request(3, &first, t0);
    create_under(&*store, first, &record, &roomy())
        .await
        .unwrap();
    let before_the_end = window_end - Duration::seconds(1);
    assert_eq!(store.prune_requests(before_the_end).await.unwrap(), 0);
    // At the window's end the id is a new request (with or without pruning).
    let (late, _) = new_key(&acme, "first", window_end);
    let late_record = RequestRecord {
        expires_at: window_end + Duration::days(1),
        ..record.clone()
    };
    let created = create_under(&*store, late, &late_record, &roomy()).await;
    assert!(matches!(created, Ok(Outcome::Done(_))), "{created:?}");
    assert_eq!(key_count(&*store, &acme).await, 2);
    let after_the_next = window_end + Duration::days(1);
    assert_eq!(store.prune_requests(after_the_next).await.unwrap(), 1);
}

pub(crate) async fn concurrent_calls_with_one_request_id_create_one_key(store: Arc<dyn Store>) {
    let acme = account("ACME");
    let t0 = now();
    let mut tasks = JoinSet::new();
    for _ in 0..8 {
        let store = store.clone();
        let (new, _) = new_key(&acme, "once", t0);
        let record = create_request(4, &new, t0);
        tasks.spawn(async move { create_under(&*store, new, &record, &roomy()).await });
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
    assert_eq!(key_count(&*store, &acme).await, 1);
    assert_eq!(all_events(&*store, &acme, None).await.len(), 1);
}

pub(crate) async fn a_rotation_retried_with_its_request_id_rotates_once(store: Arc<dyn Store>) {
    let acme = account("ACME");
    let t0 = now();
    let key = create(&*store, &acme, "rotated", t0).await;
    let first = RotationRequest {
        secret: NewSecret::from(&new_secret()),
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
    let outcome = store
        .rotate_key_with(&acme, &key.key_id, &first, &actor(), t1, &roomy())
        .await;
    let rotated = done(outcome.unwrap(), "the first rotation replayed");
    assert_eq!(rotated.key.prefix, first.secret.prefix);
    // The retry (its etag now stale, a new secret drawn) gets the first one's.
    let retry = RotationRequest {
        secret: NewSecret::from(&new_secret()),
        ..first.clone()
    };
    let t2 = t1 + Duration::seconds(1);
    let outcome = store
        .rotate_key_with(&acme, &key.key_id, &retry, &actor(), t2, &roomy())
        .await;
    let replay = replayed(outcome.unwrap(), "the retry rotated again");
    assert_eq!(replay.key, rotated.key);
    assert_eq!(replay.sealed, first.request.as_ref().unwrap().sealed);
    let secret = store.find_secret(&retry.secret.prefix).await.unwrap();
    assert!(secret.is_none());
    let events = all_events(&*store, &acme, Some(&key.key_id)).await;
    assert_eq!(events.len(), 2, "created and one rotation");
}

/// `actor()` with another name: another caller of the same account.
fn caller(name: &str, operator: bool) -> Actor {
    Actor {
        name: name.to_owned(),
        operator,
        ..actor()
    }
}

pub(crate) async fn a_request_id_is_answered_only_to_its_caller(store: Arc<dyn Store>) {
    let acme = account("ACME");
    let t0 = now();
    let (first, _) = new_key(&acme, "first", t0);
    let record = RequestRecord {
        key_id: first.key_id.clone(),
        ..create_request(6, &first, t0)
    };
    let outcome = store
        .create_key_with(first, Some(&record), &actor(), &roomy())
        .await;
    let created = done(outcome.unwrap(), "the first call replayed");
    let events = all_events(&*store, &acme, None).await.len();
    // Another management key, another operator actor: refused, whatever
    // the parameters, without the sealed secret; nothing is created.
    for other in [
        caller("key:key_000000000000000000aa", false),
        caller("operator:bob@example.com", true),
    ] {
        for params in [record.params, [8; 32]] {
            let (retry, _) = new_key(&acme, "first", t0);
            let retry_record = RequestRecord {
                key_id: retry.key_id.clone(),
                params,
                ..record.clone()
            };
            let refused = store
                .create_key_with(retry, Some(&retry_record), &other, &roomy())
                .await;
            assert!(
                matches!(refused, Err(StoreError::RequestIdNotYours)),
                "{}: {refused:?}",
                other.name
            );
        }
    }
    let rotation = RotationRequest {
        secret: NewSecret::from(&new_secret()),
        if_version: None,
        request: Some(RequestRecord {
            method: RequestMethod::RotateKey,
            ..record.clone()
        }),
    };
    let other = caller("key:key_000000000000000000aa", false);
    let refused = store
        .rotate_key_with(&acme, &created.key_id, &rotation, &other, t0, &roomy())
        .await;
    assert!(
        matches!(refused, Err(StoreError::RequestIdNotYours)),
        "{refused:?}"
    );
    // A caller that may not make the call is refused as without an id.
    let (admin, _) = NewKey::builder(acme.clone())
        .scopes(vilvik_keys_test_db::fixtures::scopes(&["keys:admin"]))
        .created_at(t0)
        .build(&pepper());
    let minted = RequestRecord {
        key_id: admin.key_id.clone(),
        ..create_request(7, &admin, t0)
    };
    let outcome = store
        .create_key_with(admin.clone(), Some(&minted), &actor(), &roomy())
        .await;
    done(outcome.unwrap(), "the operator's create replayed");
    let refused = store
        .create_key_with(admin, Some(&minted), &other, &roomy())
        .await;
    assert!(
        matches!(refused, Err(StoreError::NotGrantable(_))),
        "{refused:?}"
    );
    // The caller itself gets its answer.
    let (retry, _) = new_key(&acme, "first", t0);
    let outcome = store
        .create_key_with(retry, Some(&record), &actor(), &roomy())
        .await;
    let replay = replayed(outcome.unwrap(), "the caller's retry created a key");
    assert_eq!(replay.key, created);
    assert_eq!(all_events(&*store, &acme, None).await.len(), events + 1);
}

pub(crate) async fn an_accounts_request_ids_are_capped(store: Arc<dyn Store>) {
    let acme = account("ACME");
    let t0 = now();
    let policy = Policy {
        request_ids_per_account: 2,
        ..roomy()
    };
    let mut records = Vec::new();
    for id in 1..=2 {
        let (new, _) = new_key(&acme, "under the cap", t0);
        let record = create_request(id, &new, t0);
        let outcome = create_under(&*store, new, &record, &policy).await;
        done(outcome.unwrap(), "a new id replayed");
        records.push(record);
    }
    let (third, _) = new_key(&acme, "past the cap", t0);
    let refused = create_under(
        &*store,
        third.clone(),
        &create_request(3, &third, t0),
        &policy,
    )
    .await;
    assert!(
        matches!(refused, Err(StoreError::RequestIdsExhausted { limit: 2 })),
        "{refused:?}"
    );
    assert_eq!(
        key_count(&*store, &acme).await,
        2,
        "the refused call created nothing"
    );
    // Retries of recorded ids still answer; a call without an id still
    // runs; another account has its own cap.
    let (retry, _) = new_key(&acme, "under the cap", t0);
    let outcome = create_under(&*store, retry, &records[0], &policy).await;
    replayed(outcome.unwrap(), "the retry created a key");
    let (plain, _) = new_key(&acme, "no id", t0);
    store.create_key(plain, &actor(), &policy).await.unwrap();
    let (theirs, _) = new_key(&account("OTHER"), "theirs", t0);
    let outcome = create_under(
        &*store,
        theirs.clone(),
        &create_request(3, &theirs, t0),
        &policy,
    )
    .await;
    done(outcome.unwrap(), "another account's id replayed");
    // Once the first ids' window ends, new ones are taken again.
    let later = t0 + Duration::days(1);
    let (late, _) = new_key(&acme, "later", later);
    let record = RequestRecord {
        expires_at: later + Duration::days(1),
        ..create_request(3, &late, later)
    };
    let outcome = create_under(&*store, late, &record, &policy).await;
    done(outcome.unwrap(), "a new id after the window replayed");
}

vilvik_keys_test_db::on_both_backends!(
    a_request_id_is_answered_only_to_its_caller,
    an_accounts_request_ids_are_capped,
    a_create_retried_with_its_request_id_creates_nothing_more,
    a_refused_create_records_no_request_id,
    a_request_id_is_forgotten_after_its_window,
    concurrent_calls_with_one_request_id_create_one_key,
    a_rotation_retried_with_its_request_id_rotates_once,
);

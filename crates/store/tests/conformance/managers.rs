//! An account keeps a management key that stays usable: once it has an
//! active `keys:admin` key without an expiry, no revocation, de-scoping
//! or expiry leaves it without one, however the changes interleave. An
//! account whose managers all expire keeps at least one active.

use std::sync::Arc;

use time::{Duration, OffsetDateTime};
use vilvik_keys_domain::{AccountId, KeyState};
use vilvik_keys_store::{KeyChanges, KeyRecord, NewKey, Store, StoreError};
use vilvik_keys_test_db::fixtures::{
    account, actor, expiry, name, now, pepper, roomy, scopes, try_update,
};

/// A management key of `account` without an expiry, created at `at`.
async fn manager(
    store: &dyn Store,
    account: &AccountId,
    key_name: &str,
    at: OffsetDateTime,
) -> KeyRecord {
    let (new, _) = NewKey::builder(account.clone())
        .name(name(key_name))
        .scopes(scopes(&["keys:admin"]))
        .created_at(at)
        .build(&pepper());
    store.create_key(new, &actor(), &roomy()).await.unwrap()
}

/// The account's active management keys without an expiry at `at`.
async fn lasting(store: &dyn Store, account: &AccountId, at: OffsetDateTime) -> Vec<KeyRecord> {
    let keys = store.list_keys(account, false, None, 1_000).await.unwrap();
    keys.items
        .into_iter()
        .filter(|k| k.state(at) == KeyState::Active && k.scopes.is_management())
        .filter(|k| k.expires_at.is_none())
        .collect()
}

fn last_lasting<T: std::fmt::Debug>(result: &Result<T, StoreError>, key: &KeyRecord) -> bool {
    matches!(result, Err(StoreError::LastLastingManager { key_id }) if *key_id == key.key_id)
}

pub(crate) async fn the_last_manager_without_an_expiry_is_kept(store: Arc<dyn Store>) {
    let acme = account("ACME");
    let t0 = now();
    let owner = manager(&*store, &acme, "owner", t0).await;
    let stolen = manager(&*store, &acme, "stolen", t0).await;
    // The stolen key shortens its own life: a lasting manager stays.
    let soon = Some(t0 + Duration::seconds(4));
    let stolen = try_update(&*store, &stolen, expiry(soon), t0)
        .await
        .unwrap();
    // It may then neither revoke the owner's key, nor strip it, nor give it
    // an expiry.
    let revoked = store
        .revoke_key(&acme, &owner.key_id, "", &actor(), t0)
        .await;
    assert!(last_lasting(&revoked, &owner), "{revoked:?}");
    let stripped = KeyChanges {
        scopes: Some(scopes(&["datasets:read"])),
        ..KeyChanges::default()
    };
    let outcome = try_update(&*store, &owner, stripped, t0).await;
    assert!(last_lasting(&outcome, &owner), "{outcome:?}");
    let outcome = try_update(&*store, &owner, expiry(soon), t0).await;
    assert!(last_lasting(&outcome, &owner), "{outcome:?}");
    let later = t0 + Duration::seconds(6);
    assert_eq!(
        lasting(&*store, &acme, later).await,
        std::slice::from_ref(&owner)
    );

    // Once the stolen key has expired, the owner's key is the only
    // manager: still kept.
    let revoked = store
        .revoke_key(&acme, &owner.key_id, "", &actor(), later)
        .await;
    assert!(last_lasting(&revoked, &owner), "{revoked:?}");
    // An expiring manager may be revoked while a lasting one stays.
    let revoked = store
        .revoke_key(
            &acme,
            &stolen.key_id,
            "",
            &actor(),
            t0 + Duration::seconds(1),
        )
        .await;
    assert!(revoked.is_ok(), "{revoked:?}");
}

/// An account whose managers all expire (made so by the operator) keeps
/// the older rule: one active manager at least.
pub(crate) async fn an_account_of_expiring_managers_keeps_an_active_one(store: Arc<dyn Store>) {
    let acme = account("ACME");
    let t0 = now();
    let expiring = |key_name: &str, days: i64| {
        NewKey::builder(acme.clone())
            .name(name(key_name))
            .scopes(scopes(&["keys:admin"]))
            .expires_at(Some(t0 + Duration::days(days)))
            .created_at(t0)
            .build(&pepper())
            .0
    };
    let a = store
        .create_key(expiring("a", 2), &actor(), &roomy())
        .await
        .unwrap();
    let b = store
        .create_key(expiring("b", 3), &actor(), &roomy())
        .await
        .unwrap();
    assert!(
        store
            .revoke_key(&acme, &a.key_id, "", &actor(), t0)
            .await
            .is_ok()
    );
    let last = |r: &Result<KeyRecord, StoreError>| matches!(r, Err(StoreError::LastManagementKey { key_id }) if *key_id == b.key_id);
    let revoked = store.revoke_key(&acme, &b.key_id, "", &actor(), t0).await;
    assert!(last(&revoked), "{revoked:?}");
    let sooner = try_update(&*store, &b, expiry(Some(t0 + Duration::days(1))), t0).await;
    assert!(last(&sooner), "{sooner:?}");
    // Lifting its expiry makes it lasting, and then it is kept as such.
    let b = try_update(&*store, &b, expiry(None), t0).await.unwrap();
    let again = try_update(&*store, &b, expiry(Some(t0 + Duration::days(3))), t0).await;
    assert!(last_lasting(&again, &b), "{again:?}");
}

/// Two management keys without an expiry shorten each other's at the
/// same moment, round after round, on separate connections: exactly one
/// change commits each round, and one lasting manager is left.
pub(crate) async fn management_keys_racing_their_expiries_leave_one_lasting(store: Arc<dyn Store>) {
    let acme = account("ACME");
    let t0 = now();
    let mut survivor = manager(&*store, &acme, "first", t0).await;
    for round in 0..8 {
        let at = t0 + Duration::seconds(10 * round + 1);
        let peer = manager(&*store, &acme, &format!("peer {round}"), at).await;
        let soon = Some(at + Duration::seconds(3));
        let cut_short = |key: KeyRecord| {
            let store = store.clone();
            tokio::spawn(async move { try_update(&*store, &key, expiry(soon), at).await })
        };
        let (a, b) = (cut_short(peer.clone()), cut_short(survivor.clone()));
        let (a, b) = (a.await.unwrap(), b.await.unwrap());
        match (&a, &b) {
            (Ok(_), Err(_)) => assert!(last_lasting(&b, &survivor), "round {round}: {b:?}"),
            (Err(_), Ok(_)) => {
                assert!(last_lasting(&a, &peer), "round {round}: {a:?}");
                survivor = peer;
            }
            _ => panic!("round {round}: exactly one must commit: {a:?} / {b:?}"),
        }
        let left = lasting(&*store, &acme, at + Duration::seconds(5)).await;
        assert_eq!(left.len(), 1, "round {round}: {left:?}");
        assert_eq!(left[0].key_id, survivor.key_id, "round {round}");
        survivor = left[0].clone();
    }
}

vilvik_keys_test_db::on_both_backends!(
    the_last_manager_without_an_expiry_is_kept,
    an_account_of_expiring_managers_keeps_an_active_one,
    management_keys_racing_their_expiries_leave_one_lasting,
);

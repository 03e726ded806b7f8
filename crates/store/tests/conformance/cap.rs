//! The cap on active keys and the ceiling on stored ones: a create past
//! the cap is refused and leaves no trace, revoked and expired keys free
//! room, reactivating an expired key needs room, concurrent creates
//! cannot overshoot, and revoked keys still count toward the ceiling.

use std::sync::Arc;

use time::Duration;
use tokio::task::JoinSet;
use vilvik_keys_domain::{Tier, TierLimits};
use vilvik_keys_store::{KeyRecord, Policy, Store, StoreError};
use vilvik_keys_test_db::fixtures::{
    account, actor, all_events, create, expiry, new_key, now, rename_to, revoke,
};

/// Whether `outcome` is the cap's refusal: the account holds `active`
/// keys of `tier`, whose cap is `limit`.
pub(crate) fn refused_by_cap<T>(
    outcome: &Result<T, StoreError>,
    tier: Tier,
    limit: u32,
    active: u32,
) -> bool {
    matches!(
        outcome,
        Err(StoreError::QuotaExceeded { tier: t, limit: l, active: a, .. })
            if (*t, *l, *a) == (tier, limit, active)
    )
}

pub(crate) async fn the_tier_cap_holds(store: Arc<dyn Store>) {
    let acme = account("ACME");
    let policy = Policy::from(TierLimits::default());
    let create_one = async |key_name: &str, at| {
        let (new, _) = new_key(&acme, key_name, at);
        store.create_key(new, &actor(), &policy).await
    };
    let update = async |key: &KeyRecord, changes, at| {
        let key_id = &key.key_id;
        store
            .update_key(&acme, key_id, changes, &actor(), at, &policy)
            .await
    };
    let t0 = now();
    let mut keys = Vec::new();
    for i in 0..3 {
        keys.push(create_one(&format!("key-{i}"), t0).await.unwrap());
    }
    let (fourth, _) = new_key(&acme, "one-too-many", t0);
    let seq = store.change_sequence().await.unwrap();
    let refused = store.create_key(fourth.clone(), &actor(), &policy).await;
    assert!(refused_by_cap(&refused, Tier::Free, 3, 3), "{refused:?}");
    // The refused create left no trace.
    assert_eq!(store.get_key(&acme, &fourth.key_id).await.unwrap(), None);
    assert!(store.find_secret(&fourth.prefix).await.unwrap().is_none());
    assert_eq!(all_events(&*store, &acme, None).await.len(), 3);
    assert_eq!(store.change_sequence().await.unwrap(), seq);

    // A revoked key frees room.
    revoke(&*store, &keys[0], "rotating out", t0).await;
    create_one("replacement", t0).await.unwrap();
    let refused = create_one("still-too-many", t0).await;
    assert!(
        matches!(refused, Err(StoreError::QuotaExceeded { active: 3, .. })),
        "{refused:?}"
    );

    // An expired key frees room too.
    let expiring = update(&keys[1], expiry(Some(t0 + Duration::minutes(10))), t0)
        .await
        .unwrap();
    let t1 = t0 + Duration::hours(1);
    create_one("after-expiry", t1).await.unwrap();

    // Extending the expired key would make four active keys: refused.
    let extend = expiry(Some(t1 + Duration::days(30)));
    let refused = update(&expiring, extend.clone(), t1).await;
    assert!(refused_by_cap(&refused, Tier::Free, 3, 3), "{refused:?}");
    assert_eq!(
        store.get_key(&acme, &expiring.key_id).await.unwrap(),
        Some(expiring.clone())
    );
    // Removing the expiry is the same as extending it.
    let refused = update(&expiring, expiry(None), t1).await;
    assert!(
        matches!(refused, Err(StoreError::QuotaExceeded { .. })),
        "{refused:?}"
    );
    // Renaming an expired key does not reactivate it, so it needs no room.
    update(&expiring, rename_to("expired-but-renamed"), t1)
        .await
        .unwrap();

    // With room again, the extension goes through.
    revoke(&*store, &keys[2], "make room", t1).await;
    let extended = update(&expiring, extend, t1).await.unwrap();
    assert_eq!(extended.expires_at, Some(t1 + Duration::days(30)));
}

pub(crate) async fn concurrent_creates_cannot_overshoot_the_cap(store: Arc<dyn Store>) {
    let acme = account("ACME");
    let policy = Policy::from(TierLimits::default());
    let t0 = now();
    let mut tasks = JoinSet::new();
    for i in 0..20 {
        let (store, policy) = (store.clone(), policy.clone());
        let (new, _) = new_key(&acme, &format!("racer-{i}"), t0);
        tasks.spawn(async move { store.create_key(new, &actor(), &policy).await });
    }
    let (mut created, mut refused) = (0, 0);
    while let Some(outcome) = tasks.join_next().await {
        let outcome = outcome.unwrap();
        match outcome {
            Ok(_) => created += 1,
            Err(_) if refused_by_cap(&outcome, Tier::Free, 3, 3) => refused += 1,
            Err(e) => panic!("unexpected error: {e:?}"),
        }
    }
    assert_eq!((created, refused), (3, 17));
    let listed = store.list_keys(&acme, true, None, 100).await.unwrap();
    assert_eq!(listed.items.len(), 3);
    assert_eq!(all_events(&*store, &acme, None).await.len(), 3);
    assert_eq!(store.changes_since(0, 100).await.unwrap().len(), 3);
}

pub(crate) async fn revoked_keys_count_toward_the_stored_key_ceiling(store: Arc<dyn Store>) {
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
        revoke(&*store, &key, "churn", t0).await;
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

vilvik_keys_test_db::on_both_backends!(
    the_tier_cap_holds,
    concurrent_creates_cannot_overshoot_the_cap,
    revoked_keys_count_toward_the_stored_key_ceiling,
);

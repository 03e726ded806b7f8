//! Pruning what the store keeps for a time: old change-log entries (a
//! follower behind the pruned part is told so, the sequence never goes
//! back) and rotated-away secrets past their retention (never a current
//! one); secrets deleted by a rotation or a prune are published for
//! caches to forget.

use std::sync::Arc;

use time::Duration;
use vilvik_keys_store::{Store, StoreError};
use vilvik_keys_test_db::fixtures::{
    account, actor, create, new_key, new_secret, now, roomy, rotate,
};

use crate::rotation::{rotate_keeping, stored_secrets};
use crate::{published_since, secret_of};

pub(crate) async fn pruning_drops_old_changes_and_followers_behind_it_are_told(
    store: Arc<dyn Store>,
) {
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
    let much_later = t1 + Duration::days(30);
    assert_eq!(store.prune_changes(much_later).await.unwrap(), 0);
    assert_eq!(store.change_sequence().await.unwrap(), newest);
    assert!(store.changes_since(newest, 100).await.unwrap().is_empty());
    let later = create(&*store, &acme, "later", t1).await;
    assert_eq!(store.prune_changes(much_later).await.unwrap(), 1);
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

pub(crate) async fn old_rotated_secrets_are_pruned_after_the_retention(store: Arc<dyn Store>) {
    let acme = account("ACME");
    let t0 = now();
    let (new, first) = new_key(&acme, "ci-runner", t0);
    let key = store.create_key(new, &actor(), &roomy()).await.unwrap();
    let at = |hours| t0 + Duration::hours(hours);
    let second = new_secret();
    rotate(&*store, &key, &second, at(1)).await;
    let third = new_secret();
    rotate(&*store, &key, &third, at(3)).await;
    // Nothing superseded before t0+1h.
    assert_eq!(store.prune_rotated_secrets(at(1)).await.unwrap(), 0);
    // The first secret was superseded at t0+1h, the second at t0+3h.
    assert_eq!(store.prune_rotated_secrets(at(2)).await.unwrap(), 1);
    assert!(store.find_secret(first.prefix()).await.unwrap().is_none());
    assert!(store.find_secret(second.prefix()).await.unwrap().is_some());
    // A current secret is never pruned, however old.
    assert_eq!(store.prune_rotated_secrets(at(100)).await.unwrap(), 1);
    let current = secret_of(&*store, third.prefix()).await;
    assert_eq!(current.key.key_id, key.key_id);
    assert_eq!(stored_secrets(&*store).await, 1);
}

pub(crate) async fn pruned_secrets_are_published_for_caches_to_forget(store: Arc<dyn Store>) {
    let acme = account("ACME");
    let t0 = now();
    let (new, first) = new_key(&acme, "pruned", t0);
    let key = store.create_key(new, &actor(), &roomy()).await.unwrap();
    let rotate_keeping_one = async |seconds| {
        let secret = new_secret();
        rotate_keeping(&*store, &key, &secret, t0 + Duration::seconds(seconds), 1).await;
        secret
    };
    let second = rotate_keeping_one(1).await;
    // The second rotation deletes the first secret (one old one is kept)
    // and publishes its prefix with the rotation's own.
    let seq = store.change_sequence().await.unwrap();
    let third = rotate_keeping_one(2).await;
    assert!(store.find_secret(first.prefix()).await.unwrap().is_none());
    let published = published_since(&*store, seq).await;
    for prefix in [first.prefix(), second.prefix(), third.prefix()] {
        assert!(published.contains(prefix), "{prefix} not in {published:?}");
    }
    // The retention prune publishes what it deletes too.
    let seq = store.change_sequence().await.unwrap();
    let pruned = store
        .prune_rotated_secrets(t0 + Duration::seconds(10))
        .await
        .unwrap();
    assert_eq!(pruned, 1);
    assert!(store.find_secret(second.prefix()).await.unwrap().is_none());
    let published = published_since(&*store, seq).await;
    assert_eq!(published, vec![second.prefix().clone()]);
}

vilvik_keys_test_db::on_both_backends!(
    pruning_drops_old_changes_and_followers_behind_it_are_told,
    old_rotated_secrets_are_pruned_after_the_retention,
    pruned_secrets_are_published_for_caches_to_forget,
);

//! The change log verify nodes follow: every change of a key appends the
//! prefixes it affects, in order, with rising sequence numbers; a tier
//! change appends nothing; a follower catches up from any sequence
//! number, in pages.

use std::sync::Arc;

use vilvik_keys_domain::Tier;
use vilvik_keys_store::Store;
use vilvik_keys_test_db::fixtures::{
    account, actor, create, new_secret, now, rename_to, revoke, rotate, update,
};

pub(crate) async fn the_change_feed_carries_every_changed_prefix(store: Arc<dyn Store>) {
    let acme = account("ACME");
    let t0 = now();
    assert_eq!(store.change_sequence().await.unwrap(), 0);
    assert!(store.changes_since(0, 100).await.unwrap().is_empty());

    let a = create(&*store, &acme, "alpha", t0).await;
    let b = create(&*store, &acme, "beta", t0).await;
    let after_creates = store.change_sequence().await.unwrap();
    update(&*store, &a, rename_to("alpha-2"), t0).await;
    let fresh = new_secret();
    rotate(&*store, &a, &fresh, t0).await;
    revoke(&*store, &b, "done", t0).await;
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
    let newest = all.last().unwrap().0;
    assert_eq!(store.change_sequence().await.unwrap(), newest);
    assert_eq!(all[1].0, after_creates);

    // Catching up from a sequence number, in pages.
    let since = store.changes_since(after_creates, 100).await.unwrap();
    assert_eq!(since, all[2..]);
    let first_two = store.changes_since(after_creates, 2).await.unwrap();
    assert_eq!(first_two, all[2..4]);
    let rest = store.changes_since(first_two[1].0, 100).await.unwrap();
    assert_eq!(rest, all[4..]);
    assert!(store.changes_since(newest, 100).await.unwrap().is_empty());
}

vilvik_keys_test_db::on_both_backends!(the_change_feed_carries_every_changed_prefix,);

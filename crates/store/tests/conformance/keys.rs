//! A key's life in the store: created with everything it was given, read
//! back by id and by its secret's prefix, listed in pages, invisible to
//! other accounts, and never created over a taken id or prefix.

use std::sync::Arc;

use time::Duration;
use vilvik_keys_domain::KeyId;
use vilvik_keys_store::{NewSecret, Store, StoreError};
use vilvik_keys_test_db::fixtures::{
    account, actor, all_events, create, new_key, new_secret, now, pepper, rename_to, roomy,
};

use crate::{pages, secret_of, try_rotate};

pub(crate) async fn migrate_twice_runs_nothing_the_second_time(store: Arc<dyn Store>) {
    assert_eq!(store.migrate().await.unwrap(), 0);
    assert_eq!(store.migrate().await.unwrap(), 0);
    assert_eq!(store.change_sequence().await.unwrap(), 0);
}

pub(crate) async fn create_get_and_list_with_paging(store: Arc<dyn Store>) {
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

    let secret = secret_of(&*store, generated.prefix()).await;
    assert!(secret.hash.matches(&generated.hash()));
    assert_eq!(secret.pepper_id, Some(pepper().id()));
    assert_eq!(secret.superseded_at, None);
    assert_eq!(secret.key, created);
    let unknown = new_secret();
    assert!(store.find_secret(unknown.prefix()).await.unwrap().is_none());

    let mut ids = vec![created.key_id.clone()];
    for i in 1..5 {
        let at = t0 + Duration::seconds(i);
        ids.push(create(&*store, &acme, &format!("key-{i}"), at).await.key_id);
    }

    // Pages of two, in creation order, each cursor leading to the next.
    let paged = pages(async |after| store.list_keys(&acme, false, after, 2).await.unwrap()).await;
    assert!(paged.iter().all(|page| page.len() <= 2));
    assert_eq!(paged.len(), 3);
    let seen: Vec<KeyId> = paged.into_iter().flatten().map(|k| k.key_id).collect();
    assert_eq!(seen, ids);

    // One page holding everything has no cursor.
    let page = store.list_keys(&acme, false, None, 5).await.unwrap();
    assert_eq!(page.items.len(), 5);
    assert_eq!(page.next_cursor, None);

    // Revoked keys are listed only when asked for.
    let t1 = t0 + Duration::minutes(1);
    store
        .revoke_key(&acme, &ids[1], "leaked", &actor(), t1)
        .await
        .unwrap();
    let listed = store
        .list_keys(&acme, false, None, 100)
        .await
        .unwrap()
        .items;
    assert_eq!(
        listed.iter().map(|k| &k.key_id).collect::<Vec<_>>(),
        [&ids[0], &ids[2], &ids[3], &ids[4]]
    );
    let listed = store.list_keys(&acme, true, None, 100).await.unwrap().items;
    assert_eq!(
        listed.iter().map(|k| k.key_id.clone()).collect::<Vec<_>>(),
        ids
    );
    assert_eq!(listed[1].revoked_at, Some(t1));
    assert_eq!(listed[1].revoke_reason.as_deref(), Some("leaked"));

    // Another account's listing is empty.
    let other = store
        .list_keys(&account("globex"), true, None, 100)
        .await
        .unwrap();
    assert!(other.items.is_empty());
    assert_eq!(other.next_cursor, None);
}

pub(crate) async fn another_accounts_key_is_invisible(store: Arc<dyn Store>) {
    let (acme, globex) = (account("ACME"), account("globex"));
    let t0 = now();
    let key = create(&*store, &acme, "ci-runner", t0).await;
    let events_before = all_events(&*store, &acme, None).await;
    let seq_before = store.change_sequence().await.unwrap();

    assert_eq!(store.get_key(&globex, &key.key_id).await.unwrap(), None);
    let listed = store.list_keys(&globex, true, None, 100).await.unwrap();
    assert!(listed.items.is_empty());
    let updated = store
        .update_key(
            &globex,
            &key.key_id,
            rename_to("stolen"),
            &actor(),
            t0,
            &roomy(),
        )
        .await;
    assert!(matches!(updated, Err(StoreError::NotFound)), "{updated:?}");
    let secret = NewSecret::from(&new_secret());
    let rotated = try_rotate(&*store, &globex, &key.key_id, &secret, t0).await;
    assert!(matches!(rotated, Err(StoreError::NotFound)), "{rotated:?}");
    let revoked = store
        .revoke_key(&globex, &key.key_id, "x", &actor(), t0)
        .await;
    assert!(matches!(revoked, Err(StoreError::NotFound)), "{revoked:?}");
    assert!(all_events(&*store, &globex, None).await.is_empty());
    let of_the_key = all_events(&*store, &globex, Some(&key.key_id)).await;
    assert!(of_the_key.is_empty());

    // Nothing changed.
    assert_eq!(store.get_key(&acme, &key.key_id).await.unwrap(), Some(key));
    assert_eq!(all_events(&*store, &acme, None).await, events_before);
    assert_eq!(store.change_sequence().await.unwrap(), seq_before);
}

pub(crate) async fn a_taken_identifier_is_a_conflict_and_changes_nothing(store: Arc<dyn Store>) {
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
    let created = store.create_key(clash.clone(), &actor(), &roomy()).await;
    assert!(matches!(created, Err(StoreError::Conflict)), "{created:?}");
    assert_eq!(store.get_key(&acme, &clash.key_id).await.unwrap(), None);

    // Same key id, fresh prefix.
    let (mut clash, _) = new_key(&acme, "clash", t0);
    clash.key_id = new.key_id.clone();
    let created = store.create_key(clash.clone(), &actor(), &roomy()).await;
    assert!(matches!(created, Err(StoreError::Conflict)), "{created:?}");
    assert!(store.find_secret(&clash.prefix).await.unwrap().is_none());

    // Rotating onto a prefix that is taken.
    let taken = NewSecret {
        prefix: new.prefix.clone(),
        hash: new.hash,
        pepper_id: new.pepper_id,
    };
    let rotated = try_rotate(&*store, &acme, &key.key_id, &taken, t0).await;
    assert!(matches!(rotated, Err(StoreError::Conflict)), "{rotated:?}");

    assert_eq!(store.get_key(&acme, &key.key_id).await.unwrap(), Some(key));
    assert_eq!(secret_of(&*store, &new.prefix).await.superseded_at, None);
    assert_eq!(all_events(&*store, &acme, None).await.len(), 1);
    assert_eq!(store.change_sequence().await.unwrap(), seq);
}

vilvik_keys_test_db::on_both_backends!(
    migrate_twice_runs_nothing_the_second_time,
    create_get_and_list_with_paging,
    another_accounts_key_is_invisible,
    a_taken_identifier_is_a_conflict_and_changes_nothing,
);

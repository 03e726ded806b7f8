//! Importing keys in bulk: each key written as a create writes it (its
//! secret, one `created` event, one change, in import order), past any
//! cap, accounts made as needed; and a batch that clashes with a stored
//! key or with itself writes nothing at all.

use std::sync::Arc;

use time::{Duration, OffsetDateTime};
use vilvik_keys_domain::{AccountId, AuditAction, GeneratedKey, ScopeSet, Tier};
use vilvik_keys_store::{Actor, NewKey, Policy, Store, StoreError};
use vilvik_keys_test_db::fixtures::{
    account, actor, all_events, create, new_key, new_secret, now, rotate,
};

use crate::cap::refused_by_cap;
use crate::streams::stream_all;
use crate::{key_count, published_since, secret_of};

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

pub(crate) async fn import_keys_writes_keys_events_and_changes_ignoring_the_cap(
    store: Arc<dyn Store>,
) {
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
        let secret = secret_of(&*store, generated.prefix()).await;
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
    let refused = store.create_key(new, &actor(), &Policy::default()).await;
    assert!(refused_by_cap(&refused, Tier::Free, 3, 100), "{refused:?}");

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

pub(crate) async fn import_keys_is_all_or_nothing(store: Arc<dyn Store>) {
    let (acme, globex) = (account("ACME"), account("globex"));
    let t0 = now();
    let existing = create(&*store, &acme, "existing", t0).await;
    let rotated = rotate(&*store, &existing, &new_secret(), t0).await.key;
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
        let written = store.get_key(&probe.account_id, &probe.key_id).await;
        assert_eq!(written.unwrap(), None, "{what}");
        assert_eq!(key_count(&*store, &globex).await, 0, "{what}");
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
    assert_eq!(published_since(&*store, seq).await.len(), 200);
}

vilvik_keys_test_db::on_both_backends!(
    import_keys_writes_keys_events_and_changes_ignoring_the_cap,
    import_keys_is_all_or_nothing,
);

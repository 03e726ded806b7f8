//! Streams for warming a verify node: every secret (current and
//! superseded, of revoked keys too) with what verification needs of its
//! key, and every prefix alone, each once, in batches of the size asked.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use time::Duration;
use vilvik_keys_domain::{GeneratedKey, KeyPrefix};
use vilvik_keys_store::{SecretEntry, Store, StoreError};
use vilvik_keys_test_db::fixtures::{
    account, actor, new_key, now, other_pepper, revoke, roomy, rotate, scopes,
};

use crate::secret_of;

/// The items of `batches` (what a stream of `count` items handed over in
/// batches of at most `batch`), checking that no batch is empty or larger
/// than asked (a `batch` of 0 counting as 1) and that `count` is right.
fn checked<T>(batch: usize, batches: Vec<Vec<T>>, count: usize) -> Vec<T> {
    for items in &batches {
        assert!(!items.is_empty(), "batch {batch}: an empty batch");
        let size = items.len();
        assert!(size <= batch.max(1), "batch {batch}: {size}");
    }
    let all: Vec<T> = batches.into_iter().flatten().collect();
    assert_eq!(count, all.len(), "batch {batch}");
    all
}

/// What `stream` hands its sink, in batches of `batch`, checking the
/// batches.
async fn collect<T: Send>(
    batch: usize,
    stream: impl AsyncFnOnce(&mut (dyn FnMut(Vec<T>) + Send)) -> Result<usize, StoreError>,
) -> Vec<T> {
    let mut batches = Vec::new();
    let count = stream(&mut |items| batches.push(items)).await.unwrap();
    checked(batch, batches, count)
}

/// Streams every secret in batches of `batch`, checking the batches.
pub(crate) async fn stream_all(store: &dyn Store, batch: usize) -> Vec<SecretEntry> {
    collect(batch, async |sink| store.stream_secrets(batch, sink).await).await
}

/// Streams every prefix in batches of `batch`, checking the batches.
async fn stream_all_prefixes(store: &dyn Store, batch: usize) -> Vec<KeyPrefix> {
    collect(batch, async |sink| store.stream_prefixes(batch, sink).await).await
}

pub(crate) async fn streams_yield_every_secret_and_prefix_once(store: Arc<dyn Store>) {
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
        let fresh = GeneratedKey::generate(&other_pepper());
        rotate(&*store, &current, &fresh, t1).await;
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
    revoke(&*store, &keys[3], "done", t1).await;
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
        let prefixes = stream_all_prefixes(&*store, batch).await;
        let unique: BTreeSet<KeyPrefix> = prefixes.iter().cloned().collect();
        assert_eq!(
            unique.len(),
            prefixes.len(),
            "batch {batch}: a prefix twice"
        );
        assert!(unique.iter().eq(expected.keys()), "batch {batch}");
    }

    // Each entry says what find_secret says of its prefix.
    for entry in stream_all(&*store, 4).await {
        let found = secret_of(&*store, &entry.prefix).await;
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

vilvik_keys_test_db::on_both_backends!(streams_yield_every_secret_and_prefix_once,);

//! What verify nodes write back: a key's last use (never going back in
//! time, never an audit event or a change), and re-hashes of secrets onto
//! another pepper (each applied only over the hash it replaces, changing
//! nothing else); and how many secrets each pepper keys.

use std::sync::Arc;

use time::{Duration, OffsetDateTime};
use vilvik_keys_domain::{GeneratedKey, KeyId, KeyPrefix, Pepper, PepperId, SecretHash};
use vilvik_keys_store::{
    KeyRecord, KeyUsage, PepperUse, Rehash, RejectedUse, Store, UsageRecord, ValidUse,
};
use vilvik_keys_test_db::fixtures::{
    account, actor, all_events, create, hash_under, new_key, new_secret, now, other_pepper, pepper,
    revoke, roomy, rotate,
};

use crate::secret_of;

/// A valid use of `key_id` at `at`, seen from `ip`, claiming nothing.
fn used(key_id: &KeyId, at: OffsetDateTime, ip: Option<&str>) -> UsageRecord {
    UsageRecord {
        key_id: key_id.clone(),
        valid: Some(ValidUse {
            at,
            observed_ip: ip.map(str::to_owned),
            claimed_ip: None,
        }),
        valid_uses: 1,
        rejected: None,
        rejected_uses: 0,
    }
}

/// Records `uses` as a verify node's flush does.
async fn record(store: &dyn Store, uses: &[UsageRecord]) {
    store.record_usage(uses).await.unwrap();
}

/// Checks that the last use the store holds of `key` is the one `at`
/// from `ip`.
async fn assert_last_use(store: &dyn Store, key: &KeyRecord, at: OffsetDateTime, ip: Option<&str>) {
    let stored = store
        .get_key(&key.account_id, &key.key_id)
        .await
        .unwrap()
        .unwrap();
    let last_use = (stored.last_used_at, stored.last_used_ip.as_deref());
    assert_eq!(last_use, (Some(at), ip), "{}", key.name);
}

pub(crate) async fn usage_is_recorded_and_never_goes_back_in_time(store: Arc<dyn Store>) {
    let acme = account("ACME");
    let t0 = now();
    let a = create(&*store, &acme, "alpha", t0).await;
    let b = create(&*store, &acme, "beta", t0).await;
    let seq = store.change_sequence().await.unwrap();
    record(&*store, &[]).await;

    let t1 = t0 + Duration::minutes(1);
    let first_uses = [
        used(&a.key_id, t1, Some("198.51.100.1")),
        used(&b.key_id, t1, None),
        // A key that does not exist (e.g. deleted data) is skipped.
        used(&KeyId::generate(), t1, None),
    ];
    record(&*store, &first_uses).await;
    assert_last_use(&*store, &a, t1, Some("198.51.100.1")).await;
    assert_last_use(&*store, &b, t1, None).await;

    // An older report (a slow node flushing late) does not overwrite.
    let older = used(&a.key_id, t0 + Duration::seconds(30), Some("192.0.2.99"));
    record(&*store, std::slice::from_ref(&older)).await;
    assert_last_use(&*store, &a, t1, Some("198.51.100.1")).await;

    // Within one batch, the latest use of a key wins, whatever the order.
    let t2 = t1 + Duration::minutes(1);
    let newest = used(&a.key_id, t2, Some("198.51.100.2"));
    record(&*store, &[newest, older.clone()]).await;
    assert_last_use(&*store, &a, t2, Some("198.51.100.2")).await;
    let t3 = t2 + Duration::minutes(1);
    let newer = used(&a.key_id, t3, Some("198.51.100.3"));
    record(&*store, &[older, newer]).await;
    assert_last_use(&*store, &a, t3, Some("198.51.100.3")).await;
    // The use shows through find_secret as well.
    let found = secret_of(&*store, &a.prefix).await;
    assert_eq!(found.key.last_used_at, Some(t3));

    // Usage is not an admin change: no audit event, nothing on the feed.
    assert_eq!(all_events(&*store, &acme, None).await.len(), 2);
    assert_eq!(store.change_sequence().await.unwrap(), seq);
}

/// `n` valid uses of `key_id`, the last at `at`, seen from `observed`,
/// the caller claiming `claimed`; and `rejected` refusals, the last at
/// `rejected_at` seen from `rejected_ip`.
fn uses(
    key_id: &KeyId,
    n: u64,
    last: Option<(OffsetDateTime, &str, Option<&str>)>,
    rejected: u64,
    last_rejected: Option<(OffsetDateTime, &str)>,
) -> UsageRecord {
    UsageRecord {
        key_id: key_id.clone(),
        valid: last.map(|(at, observed, claimed)| ValidUse {
            at,
            observed_ip: Some(observed.to_owned()),
            claimed_ip: claimed.map(str::to_owned),
        }),
        valid_uses: n,
        rejected: last_rejected.map(|(at, ip)| RejectedUse {
            at,
            observed_ip: Some(ip.to_owned()),
        }),
        rejected_uses: rejected,
    }
}

/// The stored usage of `key`: its last use and what [`KeyUsage`] holds.
async fn usage_of(
    store: &dyn Store,
    key: &KeyRecord,
) -> (Option<OffsetDateTime>, Option<String>, KeyUsage) {
    let stored = store
        .get_key(&key.account_id, &key.key_id)
        .await
        .unwrap()
        .unwrap();
    (stored.last_used_at, stored.last_used_ip, stored.usage)
}

pub(crate) async fn the_observed_and_claimed_addresses_are_kept_apart_and_uses_counted(
    store: Arc<dyn Store>,
) {
    let acme = account("ACME");
    let t0 = now();
    let key = create(&*store, &acme, "alpha", t0).await;
    let seq = store.change_sequence().await.unwrap();
    assert_eq!(usage_of(&*store, &key).await.2, KeyUsage::default());

    // A backend at 127.0.0.1 claims its client was 203.0.113.66.
    let t1 = t0 + Duration::minutes(1);
    let claimed = uses(
        &key.key_id,
        3,
        Some((t1, "127.0.0.1", Some("203.0.113.66"))),
        0,
        None,
    );
    record(&*store, &[claimed]).await;
    let (at, ip, usage) = usage_of(&*store, &key).await;
    assert_eq!((at, ip.as_deref()), (Some(t1), Some("203.0.113.66")));
    assert_eq!(
        usage,
        KeyUsage {
            last_used_observed_ip: Some("127.0.0.1".into()),
            last_used_claimed_ip: Some("203.0.113.66".into()),
            valid_uses: 3,
            ..KeyUsage::default()
        }
    );

    // Refusals only: counted, the last one's time and address kept; the
    // last valid use stays as it was.
    let t2 = t1 + Duration::minutes(1);
    let refused = uses(&key.key_id, 0, None, 2, Some((t2, "198.51.100.7")));
    record(&*store, &[refused]).await;
    let (at, _, usage) = usage_of(&*store, &key).await;
    assert_eq!(at, Some(t1));
    assert_eq!(usage.last_used_claimed_ip.as_deref(), Some("203.0.113.66"));
    assert_eq!((usage.valid_uses, usage.rejected_uses), (3, 2));
    assert_eq!(usage.last_rejected_at, Some(t2));
    assert_eq!(usage.last_rejected_ip.as_deref(), Some("198.51.100.7"));

    // Two nodes' reports, one late with older uses: the counts add up, an
    // older use replaces neither last use; a use claiming nothing clears
    // the claim (it is of that use, not of the key).
    let t3 = t2 + Duration::minutes(1);
    let late = uses(
        &key.key_id,
        5,
        Some((t0, "192.0.2.1", Some("192.0.2.2"))),
        1,
        Some((t0, "192.0.2.3")),
    );
    let newest = uses(&key.key_id, 1, Some((t3, "10.0.0.5", None)), 0, None);
    record(&*store, &[late, newest]).await;
    let (at, ip, usage) = usage_of(&*store, &key).await;
    assert_eq!((at, ip.as_deref()), (Some(t3), Some("10.0.0.5")));
    assert_eq!(
        usage,
        KeyUsage {
            last_used_observed_ip: Some("10.0.0.5".into()),
            last_used_claimed_ip: None,
            valid_uses: 9,
            rejected_uses: 3,
            last_rejected_at: Some(t2),
            last_rejected_ip: Some("198.51.100.7".into()),
        }
    );
    // Listed keys carry it too.
    let listed = store.list_keys(&acme, false, None, 10).await.unwrap();
    assert_eq!(listed.items[0].usage, usage);

    // Usage is not a change of the key.
    assert_eq!(store.change_sequence().await.unwrap(), seq);
    assert_eq!(usage_of(&*store, &key).await.2.valid_uses, 9);
    let stored = store.get_key(&acme, &key.key_id).await.unwrap().unwrap();
    assert_eq!(stored.version, key.version);
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

pub(crate) async fn a_rehash_applies_only_to_the_hash_it_replaces_and_changes_nothing_else(
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
        &new_secret(),
        (secret.hash(), Some(pepper().id())),
        &other_pepper(),
    );
    let right = rehash(&secret, stored, &other_pepper());
    let done = store
        .rehash_secrets(&[stale, nobody, right.clone()])
        .await
        .unwrap();
    assert_eq!(done, [secret.prefix().clone()]);
    let found = secret_of(&*store, secret.prefix()).await;
    assert!(found.hash.matches(&hash_under(&secret, &other_pepper())));
    assert_eq!(found.pepper_id, Some(other_pepper().id()));
    assert_eq!(found.key, key, "the key itself did not change");
    let untouched = secret_of(&*store, other_secret.prefix()).await;
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
    let found = secret_of(&*store, secret.prefix()).await;
    assert_eq!(found.pepper_id, Some(other_pepper().id()));

    // Not a change of the key: no audit event, nothing for nodes to evict.
    assert_eq!(store.change_sequence().await.unwrap(), seq);
    assert_eq!(all_events(&*store, &acme, None).await.len(), events);

    // Re-hashing a rotated-away secret, or one of a revoked key, undoes
    // neither the rotation nor the revocation.
    let t1 = t0 + Duration::minutes(1);
    let fresh = GeneratedKey::generate(&other_pepper());
    rotate(&*store, &key, &fresh, t1).await;
    revoke(&*store, &key, "leaked", t1).await;
    let moved_stored = (found.hash, found.pepper_id);
    let again = rehash(&secret, moved_stored, &pepper());
    assert_eq!(
        store.rehash_secrets(&[again]).await.unwrap(),
        [secret.prefix().clone()]
    );
    let old = secret_of(&*store, secret.prefix()).await;
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

pub(crate) async fn secrets_are_counted_per_pepper_live_and_in_all(store: Arc<dyn Store>) {
    assert_eq!(store.secrets_by_pepper().await.unwrap(), []);
    let acme = account("ACME");
    let t0 = now();
    let (a, b) = (pepper(), other_pepper());
    // Under a: a live key, a revoked one, an expired one (still live: it
    // can be extended), and one rotated onto b (its old secret is not live).
    let live = create(&*store, &acme, "live", t0).await;
    let revoked = create(&*store, &acme, "revoked", t0).await;
    revoke(&*store, &revoked, "gone", t0).await;
    let (mut expired, _) = new_key(&acme, "expired", t0 - Duration::days(2));
    expired.expires_at = Some(t0 - Duration::days(1));
    store.create_key(expired, &actor(), &roomy()).await.unwrap();
    let rotated = create(&*store, &acme, "rotated", t0).await;
    rotate(&*store, &rotated, &GeneratedKey::generate(&b), t0).await;
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
    let secret = secret_of(&*store, &live.prefix).await;
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

vilvik_keys_test_db::on_both_backends!(
    usage_is_recorded_and_never_goes_back_in_time,
    the_observed_and_claimed_addresses_are_kept_apart_and_uses_counted,
    a_rehash_applies_only_to_the_hash_it_replaces_and_changes_nothing_else,
    secrets_are_counted_per_pepper_live_and_in_all,
);

//! Revocation is final: a revoked key keeps its reason and time, its
//! audit event says why, and every later update, rotation or revocation
//! of it is refused and changes nothing.

use std::sync::Arc;

use time::{Duration, OffsetDateTime};
use vilvik_keys_domain::AuditAction;
use vilvik_keys_store::{NewSecret, Store, StoreError};
use vilvik_keys_test_db::fixtures::{
    account, actor, all_events, create, new_secret, now, rename_to, revoke, roomy,
};

use crate::try_rotate;

/// Whether `outcome` is the refusal of a change to a key revoked `at`.
fn refused_as_revoked<T>(outcome: &Result<T, StoreError>, at: OffsetDateTime) -> bool {
    matches!(outcome, Err(StoreError::Revoked { revoked_at }) if *revoked_at == at)
}

pub(crate) async fn revocation_is_final(store: Arc<dyn Store>) {
    let acme = account("ACME");
    let t0 = now();
    let key = create(&*store, &acme, "ci-runner", t0).await;
    let t1 = t0 + Duration::minutes(5);
    let revoked = revoke(&*store, &key, "left the company", t1).await;
    assert_eq!(revoked.revoked_at, Some(t1));
    assert_eq!(revoked.revoke_reason.as_deref(), Some("left the company"));
    assert_eq!(
        store.get_key(&acme, &key.key_id).await.unwrap(),
        Some(revoked.clone())
    );
    let events = all_events(&*store, &acme, Some(&key.key_id)).await;
    let event = events.last().unwrap();
    assert_eq!(event.action, AuditAction::Revoked);
    assert_eq!(event.changes[0].field, "reason");
    assert_eq!(event.changes[0].new.as_deref(), Some("left the company"));
    let seq = store.change_sequence().await.unwrap();

    let t2 = t1 + Duration::minutes(1);
    let updated = store
        .update_key(
            &acme,
            &key.key_id,
            rename_to("revived"),
            &actor(),
            t2,
            &roomy(),
        )
        .await;
    assert!(refused_as_revoked(&updated, t1), "{updated:?}");
    let fresh = new_secret();
    let onto = NewSecret::from(&fresh);
    let rotated = try_rotate(&*store, &acme, &key.key_id, &onto, t2).await;
    assert!(refused_as_revoked(&rotated, t1), "{rotated:?}");
    let again = store
        .revoke_key(&acme, &key.key_id, "again", &actor(), t2)
        .await;
    assert!(refused_as_revoked(&again, t1), "{again:?}");

    // None of the refused calls changed anything.
    assert_eq!(
        store.get_key(&acme, &key.key_id).await.unwrap(),
        Some(revoked)
    );
    assert!(store.find_secret(fresh.prefix()).await.unwrap().is_none());
    assert_eq!(all_events(&*store, &acme, Some(&key.key_id)).await, events);
    assert_eq!(store.change_sequence().await.unwrap(), seq);
}

vilvik_keys_test_db::on_both_backends!(revocation_is_final,);

//! Accounts: a tier sets the account's cap, each change of tier is an
//! audit event of the account (none when nothing changes), and an account
//! can be given a tier before its first key.

use std::sync::Arc;

use time::Duration;
use vilvik_keys_domain::{AuditAction, Tier};
use vilvik_keys_store::Store;
use vilvik_keys_test_db::fixtures::{account, actor, all_events, capped, new_key, now, roomy};

use crate::cap::refused_by_cap;

pub(crate) async fn set_tier_changes_the_cap_with_an_audit_event(store: Arc<dyn Store>) {
    let acme = account("ACME");
    let policy = capped(1, 2);
    let t0 = now();
    assert_eq!(store.get_account(&acme).await.unwrap().tier, Tier::Free);
    let (new, _) = new_key(&acme, "first", t0);
    store.create_key(new, &actor(), &policy).await.unwrap();
    let (new, _) = new_key(&acme, "second", t0);
    let refused = store.create_key(new.clone(), &actor(), &policy).await;
    assert!(refused_by_cap(&refused, Tier::Free, 1, 1), "{refused:?}");

    let t1 = t0 + Duration::minutes(1);
    let account_now = store
        .set_tier(&acme, Tier::Premium, &actor(), t1)
        .await
        .unwrap();
    assert_eq!(account_now.tier, Tier::Premium);
    assert_eq!(store.get_account(&acme).await.unwrap().tier, Tier::Premium);
    store.create_key(new, &actor(), &policy).await.unwrap();
    let (new, _) = new_key(&acme, "third", t1);
    let refused = store.create_key(new, &actor(), &policy).await;
    assert!(refused_by_cap(&refused, Tier::Premium, 2, 2), "{refused:?}");

    let events = all_events(&*store, &acme, None).await;
    let tier_events: Vec<_> = events
        .iter()
        .filter(|e| e.action == AuditAction::TierChanged)
        .collect();
    assert_eq!(tier_events.len(), 1);
    let event = tier_events[0];
    assert_eq!(event.key_id, None);
    assert_eq!(event.at, t1);
    assert_eq!(event.actor, actor().name);
    assert_eq!(event.changes.len(), 1);
    assert_eq!(event.changes[0].field, "tier");
    assert_eq!(event.changes[0].old.as_deref(), Some("free"));
    assert_eq!(event.changes[0].new.as_deref(), Some("premium"));

    // Setting the tier it already has records nothing.
    store
        .set_tier(&acme, Tier::Premium, &actor(), t1)
        .await
        .unwrap();
    assert_eq!(all_events(&*store, &acme, None).await.len(), events.len());

    // An account never seen can be given a tier before its first key.
    let globex = account("globex");
    store
        .set_tier(&globex, Tier::Premium, &actor(), t1)
        .await
        .unwrap();
    assert_eq!(
        store.get_account(&globex).await.unwrap().tier,
        Tier::Premium
    );
    assert_eq!(all_events(&*store, &globex, None).await.len(), 1);
}

/// Account ids are case-sensitive; the store finds the ids that differ
/// from one only by case (for `bootstrap`, which refuses to split an
/// account in two), and never the id itself.
pub(crate) async fn accounts_differing_only_in_case_are_found(store: Arc<dyn Store>) {
    let t0 = now();
    for id in ["ACME", "acme", "Globex", "ACME-2"] {
        let (new, _) = new_key(&account(id), "first", t0);
        store.create_key(new, &actor(), &roomy()).await.unwrap();
    }
    let found = |id: &'static str| {
        let store = store.clone();
        async move {
            let ids = store
                .accounts_differing_in_case(&account(id))
                .await
                .unwrap();
            ids.iter().map(|a| a.to_string()).collect::<Vec<_>>()
        }
    };
    assert_eq!(found("Acme").await, ["ACME", "acme"]);
    assert_eq!(found("ACME").await, ["acme"]);
    assert_eq!(found("GLOBEX").await, ["Globex"]);
    assert!(found("Globex").await.is_empty());
    assert!(found("Initech").await.is_empty());
}

vilvik_keys_test_db::on_both_backends!(
    set_tier_changes_the_cap_with_an_audit_event,
    accounts_differing_only_in_case_are_found,
);

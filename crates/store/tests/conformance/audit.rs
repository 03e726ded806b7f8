//! The audit log: one event per change of an account, listed oldest
//! first, filtered by key and paged; each names its actor and address and
//! the fields that changed; and no event ever holds a secret or its hash.

use std::sync::Arc;

use time::Duration;
use vilvik_keys_domain::AuditAction;
use vilvik_keys_store::{Actor, KeyChanges, Store};
use vilvik_keys_test_db::fixtures::{
    account, actor, all_events, create, description, name, new_key, new_secret, now, rename_to,
    revoke, roomy, rotate, scopes, update,
};

use crate::pages;

pub(crate) async fn audit_events_list_oldest_first_filter_and_page(store: Arc<dyn Store>) {
    let acme = account("ACME");
    let t0 = now();
    let at = |seconds| t0 + Duration::seconds(seconds);
    let a = create(&*store, &acme, "alpha", t0).await;
    let b = create(&*store, &acme, "beta", at(1)).await;
    let operator = Actor {
        name: "key:key_AAAAAAAAAAAAAAAAAAAA".to_owned(),
        ip: None,
        operator: true,
    };
    store
        .update_key(
            &acme,
            &a.key_id,
            rename_to("alpha-2"),
            &operator,
            at(2),
            &roomy(),
        )
        .await
        .unwrap();
    revoke(&*store, &b, "unused", at(3)).await;
    rotate(&*store, &a, &new_secret(), at(4)).await;
    // Another account's events never show up.
    create(&*store, &account("globex"), "theirs", t0).await;

    let events = all_events(&*store, &acme, None).await;
    let summary: Vec<_> = events
        .iter()
        .map(|e| (e.key_id.clone().unwrap(), e.action))
        .collect();
    assert_eq!(
        summary,
        [
            (a.key_id.clone(), AuditAction::Created),
            (b.key_id.clone(), AuditAction::Created),
            (a.key_id.clone(), AuditAction::Updated),
            (b.key_id.clone(), AuditAction::Revoked),
            (a.key_id.clone(), AuditAction::Rotated),
        ]
    );
    assert!(
        events
            .windows(2)
            .all(|w| w[0].event_id < w[1].event_id && w[0].at <= w[1].at)
    );
    assert!(events.iter().all(|e| e.account_id == acme));
    assert_eq!(events[0].at, t0);
    assert_eq!(events[0].actor, "operator:alice@example.com");
    assert_eq!(events[0].actor_ip.as_deref(), Some("203.0.113.7"));
    assert_eq!(events[2].actor, "key:key_AAAAAAAAAAAAAAAAAAAA");
    assert_eq!(events[2].actor_ip, None);
    let created: Vec<_> = events[0].changes.iter().map(|c| c.field.as_str()).collect();
    assert_eq!(
        created,
        ["name", "description", "scopes", "expires_at", "prefix"]
    );
    assert_eq!(
        events[0].changes[2].new.as_deref(),
        Some("datasets:read models:*")
    );

    // Filtered by key.
    let of_a = all_events(&*store, &acme, Some(&a.key_id)).await;
    assert_eq!(
        of_a.iter().map(|e| e.action).collect::<Vec<_>>(),
        [
            AuditAction::Created,
            AuditAction::Updated,
            AuditAction::Rotated
        ]
    );
    assert_eq!(
        of_a,
        [events[0].clone(), events[2].clone(), events[4].clone()]
    );

    // Paged, two at a time.
    let paged = pages(async |after| {
        store
            .list_audit_events(&acme, None, after, 2)
            .await
            .unwrap()
    })
    .await;
    assert!(paged.iter().all(|page| page.len() <= 2));
    assert_eq!(paged.concat(), events);
    // Paged and filtered.
    let first = store
        .list_audit_events(&acme, Some(&a.key_id), None, 1)
        .await
        .unwrap();
    assert_eq!(first.items, [events[0].clone()]);
    let rest = store
        .list_audit_events(&acme, Some(&a.key_id), first.next_cursor, 10)
        .await
        .unwrap();
    assert_eq!(rest.items, [events[2].clone(), events[4].clone()]);
    assert_eq!(rest.next_cursor, None);
}

pub(crate) async fn no_audit_event_holds_a_secret(store: Arc<dyn Store>) {
    let acme = account("ACME");
    let t0 = now();
    let (mut new, first) = new_key(&acme, "ci-runner", t0);
    new.expires_at = Some(t0 + Duration::days(1));
    let key = store.create_key(new, &actor(), &roomy()).await.unwrap();
    let second = new_secret();
    rotate(&*store, &key, &second, t0).await;
    let changes = KeyChanges {
        name: Some(name("renamed")),
        description: Some(description("new words")),
        scopes: Some(scopes(&["datasets:write"])),
        expires_at: Some(None),
        ..KeyChanges::default()
    };
    update(&*store, &key, changes, t0).await;
    revoke(&*store, &key, "test over", t0).await;

    let events = all_events(&*store, &acme, None).await;
    assert_eq!(events.len(), 4);
    let rendered = format!("{events:?}");
    for generated in [&first, &second] {
        let secret = generated.expose_secret();
        let hash = generated.hash();
        let hex: String = hash.as_bytes().iter().map(|b| format!("{b:02x}")).collect();
        let bytes_as_list = format!("{:?}", hash.as_bytes());
        for event in &events {
            for change in &event.changes {
                for value in [&change.old, &change.new].into_iter().flatten() {
                    assert!(!value.contains(&secret[13..]), "secret in {change:?}");
                    assert!(
                        !value.contains(&secret[13..25]),
                        "part of a secret in {change:?}"
                    );
                    assert!(!value.to_lowercase().contains(&hex), "hash in {change:?}");
                }
            }
        }
        assert!(!rendered.contains(&secret[13..25]));
        assert!(!rendered.contains(&hex));
        assert!(!rendered.contains(&bytes_as_list));
    }
}

vilvik_keys_test_db::on_both_backends!(
    audit_events_list_oldest_first_filter_and_page,
    no_audit_event_holds_a_secret,
);

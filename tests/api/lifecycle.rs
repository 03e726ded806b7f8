//! Expiry, paging, the cap under concurrency, and usage write-behind.

use std::time::Duration;

use tonic::Code;
use vilvik_keys::proto::{self, KeyState, Tier, VerifyCode};
use vilvik_keys_domain::Clock;
use vilvik_keys_test_support::requests::{mask, revoke};
use vilvik_keys_test_support::{TestApp, assert_status, bearer, days_from, spawn_app_with};

crate::on_both_backends!(
    keys_expire_and_can_be_extended,
    the_cap_holds_under_concurrent_creates,
    listings_page_through_every_key,
    updates_record_only_real_changes,
    verify_records_the_callers_client_ip,
    usage_is_flushed_on_shutdown,
);

async fn keys_expire_and_can_be_extended(mut app: TestApp) {
    let now = app.clock.now();
    let request = app.authed(proto::CreateKeyRequest {
        name: "short-lived".into(),
        scopes: vec!["datasets:read".into()],
        expires_at: Some(days_from(now, 1)),
        ..Default::default()
    });
    let created = app.admin.create_key(request).await.unwrap().into_inner();
    let key_id = created.key.unwrap().key_id;
    assert_eq!(
        app.verify_code(&created.secret, &[]).await,
        VerifyCode::Valid
    );

    app.clock.advance(time::Duration::days(2));
    let answer = app.verify_key(&created.secret, &[]).await;
    assert_eq!(answer.code(), VerifyCode::Expired);
    assert!(!answer.valid);
    assert_eq!(app.get_key(&key_id).await.state(), KeyState::Expired);
    assert_status(
        app.rotate_key(&key_id).await,
        Code::FailedPrecondition,
        "expired",
    );

    // An expired key frees its place under the cap...
    app.create_key("two", &["a:b"]).await.unwrap();
    app.create_key("three", &["a:b"]).await.unwrap();
    // ...so extending it needs room again.
    let extend = |app: &TestApp| {
        app.authed(proto::UpdateKeyRequest {
            key_id: key_id.clone(),
            expires_at: Some(days_from(app.clock.now(), 30)),
            update_mask: mask(&["expires_at"]),
            ..Default::default()
        })
    };
    assert_status(
        app.admin.update_key(extend(&app)).await,
        Code::ResourceExhausted,
        "allows 3",
    );
    let keys = app.list_keys(false).await;
    let three = keys
        .iter()
        .find(|k| k.name == "three")
        .unwrap()
        .key_id
        .clone();
    let make_room = app.authed(proto::RevokeKeyRequest {
        reason: "make room".into(),
        ..revoke(&three)
    });
    app.admin.revoke_key(make_room).await.unwrap();
    let extended = app
        .admin
        .update_key(extend(&app))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(extended.state(), KeyState::Active);
    assert_eq!(
        app.verify_code(&created.secret, &[]).await,
        VerifyCode::Valid
    );

    // Removing the expiry: expires_at in the mask, left unset.
    let request = app.authed(proto::UpdateKeyRequest {
        key_id: key_id.clone(),
        update_mask: mask(&["expires_at"]),
        ..Default::default()
    });
    assert!(
        app.admin
            .update_key(request)
            .await
            .unwrap()
            .into_inner()
            .expires_at
            .is_none()
    );
}

async fn the_cap_holds_under_concurrent_creates(app: TestApp) {
    // ACME holds its management key; the free tier allows 3 in all.
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..12 {
        let mut client = app.admin.clone();
        let request = app.authed(proto::CreateKeyRequest {
            name: format!("racer-{i}"),
            scopes: vec!["a:b".into()],
            ..Default::default()
        });
        calls.spawn(async move { client.create_key(request).await });
    }
    let (mut created, mut refused) = (0, 0);
    while let Some(result) = calls.join_next().await {
        match result.unwrap() {
            Ok(_) => created += 1,
            Err(status) if status.code() == Code::ResourceExhausted => refused += 1,
            Err(status) => panic!("unexpected failure: {status:?}"),
        }
    }
    assert_eq!((created, refused), (2, 10));
    let mut app = app;
    assert_eq!(app.list_keys(false).await.len(), 3);
}

async fn listings_page_through_every_key(mut app: TestApp) {
    let request = app.as_operator(
        proto::SetAccountTierRequest {
            account_id: "ACME".into(),
            tier: Tier::Premium.into(),
        },
        "ACME",
        "ops",
    );
    app.admin.set_account_tier(request).await.unwrap();
    for i in 0..7 {
        app.create_key(&format!("key-{i}"), &["a:b"]).await.unwrap();
    }
    let last = app.list_keys(false).await.last().unwrap().key_id.clone();
    app.revoke_key(&last).await.unwrap();

    for (include_revoked, expected) in [(false, 7), (true, 8)] {
        let mut seen = Vec::new();
        let mut token = String::new();
        let mut pages = 0;
        loop {
            let request = app.authed(proto::ListKeysRequest {
                page_size: 3,
                page_token: token.clone(),
                include_revoked,
            });
            let page = app.admin.list_keys(request).await.unwrap().into_inner();
            assert!(page.keys.len() <= 3);
            seen.extend(page.keys.into_iter().map(|k| k.key_id));
            pages += 1;
            if page.next_page_token.is_empty() {
                break;
            }
            token = page.next_page_token;
        }
        assert_eq!(seen.len(), expected, "include_revoked={include_revoked}");
        assert_eq!(pages, expected.div_ceil(3));
        let mut unique = seen.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), seen.len(), "no key twice");
    }

    // Audit events page too, oldest first.
    let mut token = String::new();
    let mut ids = Vec::new();
    loop {
        let request = app.authed(proto::ListAuditEventsRequest {
            page_size: 4,
            page_token: token.clone(),
            ..Default::default()
        });
        let page = app
            .admin
            .list_audit_events(request)
            .await
            .unwrap()
            .into_inner();
        ids.extend(
            page.events
                .iter()
                .map(|e| e.event_id.parse::<i64>().unwrap()),
        );
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    // bootstrap + tier + 7 creates + 1 revoke
    assert_eq!(ids.len(), 10);
    assert!(ids.windows(2).all(|w| w[0] < w[1]));
}

async fn updates_record_only_real_changes(mut app: TestApp) {
    let created = app
        .create_key("ci-runner", &["datasets:read"])
        .await
        .unwrap();
    let key_id = created.key.unwrap().key_id;
    let token = app.management_key.clone();
    let update = |name: &str, description: &str| {
        bearer(
            proto::UpdateKeyRequest {
                key_id: key_id.clone(),
                name: name.into(),
                description: description.into(),
                update_mask: mask(&["name", "description"]),
                ..Default::default()
            },
            &token,
        )
    };
    let same = update("ci-runner", "");
    app.admin.update_key(same).await.unwrap();
    assert_eq!(
        app.audit(&key_id).await.len(),
        1,
        "a no-op update writes no event"
    );
    let renamed = update("ci-runner-2", "");
    let key = app.admin.update_key(renamed).await.unwrap().into_inner();
    assert_eq!(key.name, "ci-runner-2");
    let events = app.audit(&key_id).await;
    assert_eq!(events.len(), 2);
    assert_eq!(events[1].changes.len(), 1);
    assert_eq!(events[1].changes[0].field, "name");

    // Revocation is final for updates too, and revoking twice is refused.
    app.revoke_key(&key_id).await.unwrap();
    assert_status(
        app.revoke_key(&key_id).await,
        Code::FailedPrecondition,
        "was revoked",
    );
    let rename_again = update("zombie", "");
    assert_status(
        app.admin.update_key(rename_again).await,
        Code::FailedPrecondition,
        "revocation is final",
    );
    assert_eq!(app.audit(&key_id).await.len(), 3);
}

async fn verify_records_the_callers_client_ip(mut app: TestApp) {
    let created = app
        .create_key("ci-runner", &["datasets:read"])
        .await
        .unwrap();
    let key_id = created.key.unwrap().key_id;
    let request = proto::VerifyKeyRequest {
        key: created.secret.clone(),
        required_scopes: vec!["datasets:read".into()],
        client_ip: "2001:db8::7".into(),
    };
    assert!(
        app.verify
            .verify_key(request)
            .await
            .unwrap()
            .into_inner()
            .valid
    );
    app.wait_for_key(
        &key_id,
        Duration::from_secs(2),
        "client_ip is recorded as the last use",
        |key| key.last_used_ip == "2001:db8::7",
    )
    .await;
}

async fn usage_is_flushed_on_shutdown(app: TestApp) {
    let backend = app.backend;
    drop(app);
    // A flush interval far longer than the test: only the shutdown flush can write.
    let Some(mut app) = spawn_app_with(backend, |c| {
        c.usage_flush_interval = Duration::from_secs(3600);
    })
    .await
    else {
        return;
    };
    let created = app
        .create_key("ci-runner", &["datasets:read"])
        .await
        .unwrap();
    let key_id = created.key.unwrap().key_id;
    assert_eq!(
        app.verify_code(&created.secret, &[]).await,
        VerifyCode::Valid
    );
    app.restart().await;
    let key = app.get_key(&key_id).await;
    assert!(
        key.last_used_at.is_some(),
        "usage pending at shutdown was lost"
    );
    assert_eq!(key.last_used_ip, "127.0.0.1");
}

//! Who may do what: management keys act on their own account, the operator
//! token on the account it names; another account's keys do not exist.

use tonic::Code;
use vilvik_keys::headers;
use vilvik_keys::proto::{self, AuditAction, Tier};
use vilvik_keys_test_support::requests::{get, rename, revoke, rotate};
use vilvik_keys_test_support::{
    Backend, OPERATOR_TOKEN, TestApp, assert_status, bearer, spawn_app_with, without_usage,
};

crate::on_both_backends!(
    credentials_are_checked,
    every_admin_rpc_refuses_a_missing_or_malformed_credential,
    another_accounts_keys_are_not_found,
    the_operator_acts_for_the_named_account_and_sets_tiers,
);

async fn credentials_are_checked(mut app: TestApp) {
    let list = || proto::ListKeysRequest::default();
    assert_status(
        app.admin.list_keys(tonic::Request::new(list())).await,
        Code::Unauthenticated,
        "missing credential",
    );
    assert_status(
        app.admin
            .list_keys(bearer(list(), "not-the-operator-token-but-long-enough"))
            .await,
        Code::Unauthenticated,
        "neither a management key",
    );
    assert_status(
        app.admin.list_keys(bearer(list(), "vlk_short")).await,
        Code::Unauthenticated,
        "malformed",
    );

    // A good key without keys:admin may verify but not administer.
    let data_key = app
        .create_key("ci-runner", &["datasets:read"])
        .await
        .unwrap();
    let status = assert_status(
        app.admin.list_keys(bearer(list(), &data_key.secret)).await,
        Code::PermissionDenied,
        "keys:admin",
    );
    assert!(!status.message().contains(&data_key.secret[13..]));

    // A second management key (only the operator mints one), revoked,
    // stops working at once.
    let second = app
        .create_key_as_operator("ACME", "console", &["keys:admin"])
        .await;
    app.admin
        .list_keys(bearer(list(), &second.secret))
        .await
        .unwrap();
    app.revoke_key(&second.key.unwrap().key_id).await.unwrap();
    assert_status(
        app.admin.list_keys(bearer(list(), &second.secret)).await,
        Code::Unauthenticated,
        "revoked",
    );
}

async fn every_admin_rpc_refuses_a_missing_or_malformed_credential(mut app: TestApp) {
    // `matrix::CALLS` names every KeyAdmin RPC (`the_matrix_names_every_admin_rpc`).
    let created = app.create_key("ci-runner", &["a:b"]).await.unwrap();
    let target = crate::matrix::Target::of(&created.key.unwrap());
    let keys_before = app.list_keys(true).await;
    let audit_before = app.audit("").await;

    let authorization = |value: &str| vec![("authorization", value.to_owned())];
    let credentials = [
        (Vec::new(), "missing credential"),
        (
            authorization("Basic YWxhZGRpbjpvcGVuc2VzYW1l"),
            "missing credential",
        ),
        (authorization("Bearer vlk_short"), "malformed"),
        (
            authorization("Bearer not-the-operator-token-but-long-enough"),
            "neither a management key",
        ),
    ];
    for (name, call) in crate::matrix::CALLS {
        for (credential, needle) in &credentials {
            let result = call(app.admin.clone(), credential.clone(), target.clone()).await;
            let status = result.expect_err(&format!("{name} with {credential:?} succeeded"));
            assert_eq!(
                status.code(),
                Code::Unauthenticated,
                "{name} with {credential:?}: {status:?}"
            );
            assert!(
                status.message().contains(needle),
                "{name} with {credential:?}: {:?} should mention {needle:?}",
                status.message()
            );
        }
    }

    // Nothing was changed, and the key still works.
    assert_eq!(
        without_usage(app.list_keys(true).await),
        without_usage(keys_before)
    );
    assert_eq!(app.audit("").await.len(), audit_before.len());
    assert_eq!(
        app.verify_code(&created.secret, &[]).await,
        proto::VerifyCode::Valid
    );
}

async fn another_accounts_keys_are_not_found(mut app: TestApp) {
    // The operator creates a key in account OTHER.
    let theirs = app
        .create_key_as_operator("OTHER", "other-service", &["datasets:read"])
        .await;
    let their_id = theirs.key.unwrap().key_id;

    let (mut admin, id) = (app.admin.clone(), their_id.as_str());
    let not_found = |result: Result<(), tonic::Status>| {
        assert_status(result, Code::NotFound, "not found");
    };
    not_found(admin.get_key(app.authed(get(id))).await.map(drop));
    not_found(
        admin
            .update_key(app.authed(rename(id, "mine-now")))
            .await
            .map(drop),
    );
    not_found(admin.rotate_key(app.authed(rotate(id))).await.map(drop));
    not_found(admin.revoke_key(app.authed(revoke(id))).await.map(drop));
    let audit = app.authed(proto::ListAuditEventsRequest {
        key_id: their_id.clone(),
        ..Default::default()
    });
    not_found(admin.list_audit_events(audit).await.map(drop));
    assert!(
        app.list_keys(true)
            .await
            .iter()
            .all(|k| k.key_id != their_id)
    );
    assert!(app.audit("").await.iter().all(|e| e.key_id != their_id));

    // Their key still works, untouched.
    assert!(
        app.verify_key(&theirs.secret, &["datasets:read"])
            .await
            .valid
    );
}

async fn the_operator_acts_for_the_named_account_and_sets_tiers(mut app: TestApp) {
    let created = app
        .create_key_as_operator("ACME", "console-made", &["models:*"])
        .await;
    let key_id = created.key.unwrap().key_id;
    let events = app.audit(&key_id).await;
    assert_eq!(events[0].actor, "operator:alice@example.com");
    assert_eq!(events[0].actor_ip, "127.0.0.1");

    // The operator token needs the account header.
    let mut request = bearer(proto::ListKeysRequest::default(), OPERATOR_TOKEN);
    request
        .metadata_mut()
        .insert(headers::ACTOR, "alice".parse().unwrap());
    assert_status(
        app.admin.list_keys(request).await,
        Code::InvalidArgument,
        headers::ACCOUNT,
    );

    // Tiers: only the operator may change them; the change is audited.
    let set_premium = proto::SetAccountTierRequest {
        account_id: "ACME".into(),
        tier: Tier::Premium.into(),
    };
    assert_status(
        app.admin
            .set_account_tier(app.authed(set_premium.clone()))
            .await,
        Code::PermissionDenied,
        "operator",
    );
    // ACME holds 2 active keys of the free tier's 3.
    app.create_key("third", &["a:b"]).await.unwrap();
    assert_status(
        app.create_key("fourth", &["a:b"]).await,
        Code::ResourceExhausted,
        "allows 3",
    );
    let request = app.as_operator(set_premium, "ACME", "bob@example.com");
    let account = app
        .admin
        .set_account_tier(request)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(account.tier(), Tier::Premium);
    assert_eq!(account.active_key_limit, 25);
    app.create_key("fourth", &["a:b"]).await.unwrap();
    let shown = app.account().await;
    assert_eq!((shown.tier(), shown.active_key_limit), (Tier::Premium, 25));
    let tier_event = app
        .audit("")
        .await
        .into_iter()
        .find(|e| e.action() == AuditAction::TierChanged)
        .expect("a tier_changed event");
    assert_eq!(tier_event.actor, "operator:bob@example.com");
    assert_eq!(tier_event.key_id, "");
    assert_eq!(tier_event.changes[0].old_value.as_deref(), Some("free"));
    assert_eq!(tier_event.changes[0].new_value.as_deref(), Some("premium"));
}

/// `x-forwarded-for` is believed only from a configured proxy, and only
/// from the right: a client behind a proxy that appends to the header
/// cannot forge its address by sending one of its own.
#[tokio::test]
async fn forwarded_for_is_trusted_only_from_configured_proxies() {
    let proxy: std::net::IpAddr = "127.0.0.1".parse().unwrap();
    let inner_proxy: std::net::IpAddr = "10.1.1.1".parse().unwrap();
    for (trusted, forwarded, expected_ip) in [
        (vec![], "203.0.113.9", "127.0.0.1"),
        (vec![proxy], "203.0.113.9", "203.0.113.9"),
        // The client sent "6.6.6.6"; the proxy appended what it saw.
        (vec![proxy], "6.6.6.6, 203.0.113.9", "203.0.113.9"),
        // Two proxies; the inner one is trusted too.
        (
            vec![proxy, inner_proxy],
            "6.6.6.6, 203.0.113.9, 10.1.1.1",
            "203.0.113.9",
        ),
        // An inner proxy that is not trusted is as far as we believe.
        (vec![proxy], "6.6.6.6, 203.0.113.9, 10.1.1.1", "10.1.1.1"),
    ] {
        let mut app = spawn_app_with(Backend::Sqlite, |c| c.trusted_proxies = trusted)
            .await
            .unwrap();
        let mut request = app.authed(proto::CreateKeyRequest {
            name: "behind-proxy".into(),
            scopes: vec!["a:b".into()],
            ..Default::default()
        });
        request
            .metadata_mut()
            .insert("x-forwarded-for", forwarded.parse().unwrap());
        let created = app.admin.create_key(request).await.unwrap().into_inner();
        let events = app.audit(&created.key.unwrap().key_id).await;
        assert_eq!(events[0].actor_ip, expected_ip, "{forwarded}");
    }
}

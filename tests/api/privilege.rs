//! A stolen management key cannot plant quieter ways back in: the scopes
//! it may grant stay inside its account's catalogue, `keys:admin` is the operator's to grant, and the account's
//! last management key cannot be revoked, stripped or cut short. Every
//! refusal changes nothing.

use tonic::Code;
use vilvik_keys::proto;
use vilvik_keys_domain::{Clock, ScopeCatalogue};
use vilvik_keys_test_support::requests::{create, mask, rescope, revoke};
use vilvik_keys_test_support::{ACCOUNT, TestApp, assert_status, bearer, days_from, without_usage};

/// UpdateKey giving `key_id` the expiry `seconds` from the service's now.
fn expire_in(app: &TestApp, key_id: &str, seconds: i64) -> proto::UpdateKeyRequest {
    let at = app.clock.now() + time::Duration::seconds(seconds);
    proto::UpdateKeyRequest {
        key_id: key_id.into(),
        expires_at: Some(prost_types::Timestamp {
            seconds: at.unix_timestamp(),
            nanos: 0,
        }),
        update_mask: mask(&["expires_at"]),
        ..Default::default()
    }
}

/// The account's active management keys without an expiry.
async fn lasting_managers(app: &mut TestApp) -> Vec<proto::Key> {
    app.list_keys(false)
        .await
        .into_iter()
        .filter(|k| k.scopes.iter().any(|s| s == "keys:admin" || s == "keys:*"))
        .filter(|k| k.expires_at.is_none())
        .collect()
}

/// Whether `credential` still manages the account: ListKeys answers it.
async fn manages(app: &TestApp, credential: &str) -> bool {
    let mut client = app.admin.clone();
    let request = bearer(proto::ListKeysRequest::default(), credential);
    client.list_keys(request).await.is_ok()
}

crate::on_both_backends!(
    a_management_key_cannot_grant_management_scopes,
    only_whole_action_wildcards_are_scopes,
    the_operator_sets_an_accounts_grantable_scopes,
    the_last_management_key_cannot_lock_the_account_out,
    two_management_keys_revoking_each_other_leave_one,
    a_stolen_management_key_cannot_outlast_the_owners,
    two_management_keys_cutting_each_other_short_leave_one_lasting,
    two_management_keys_racing_their_expiries_leave_one_lasting,
);

mod server_catalogue {
    use super::*;

    fn narrow(config: &mut vilvik_keys::config::Config) {
        config.allowed_scopes = ScopeCatalogue::parse(&["datasets:read", "reports:*"]).unwrap();
    }

    crate::on_both_backends!(
        configured by narrow:
        allowed_scopes_bound_every_account_without_its_own,
    );
}

/// Everything an attacker could change, to compare before and after.
async fn snapshot(app: &mut TestApp) -> (Vec<proto::Key>, usize) {
    let keys = without_usage(app.list_keys(true).await);
    let events = app.audit("").await.len();
    (keys, events)
}

async fn a_management_key_cannot_grant_management_scopes(mut app: TestApp) {
    // Any other well-formed scope is grantable by default.
    let low = app.create_key("reader", &["billing:*"]).await.unwrap();
    let low_id = low.key.unwrap().key_id;
    let before = snapshot(&mut app).await;

    for scopes in [&["keys:admin"][..], &["datasets:read", "keys:*"]] {
        assert_create_denied(&mut app, "backdoor", scopes, "only the operator token").await;
    }
    let request = app.authed(rescope(&low_id, &["billing:*", "keys:admin"]));
    let status = assert_status_denied(app.admin.update_key(request).await);
    assert!(
        status.message().starts_with("scopes: 'keys:admin'"),
        "{status:?}"
    );
    assert_unchanged(&mut app, &before).await;

    // The operator may mint a management key; the new key then manages.
    let second = app
        .create_key_as_operator(ACCOUNT, "second admin", &["keys:admin"])
        .await;
    assert_eq!(second.key.as_ref().unwrap().scopes, ["keys:admin"]);
    let request = bearer(proto::ListKeysRequest::default(), &second.secret);
    assert!(app.admin.list_keys(request).await.is_ok());

    // A management key may still change a management key's other scopes:
    // keeping keys:admin grants nothing new.
    let second_id = second.key.unwrap().key_id;
    let request = app.authed(rescope(&second_id, &["datasets:read", "keys:admin"]));
    let updated = app.admin.update_key(request).await.unwrap().into_inner();
    assert_eq!(updated.scopes, ["datasets:read", "keys:admin"]);
}

/// Asserts that nothing an attacker could change has changed since `before`.
async fn assert_unchanged(app: &mut TestApp, before: &(Vec<proto::Key>, usize)) {
    assert_eq!(&snapshot(app).await, before, "a refusal changed something");
}

/// Creating a key `name` with `scopes` is refused, with a message naming
/// `needle`.
async fn assert_create_denied(app: &mut TestApp, name: &str, scopes: &[&str], needle: &str) {
    let status = assert_status_denied(app.create_key(name, scopes).await);
    assert!(status.message().contains(needle), "{status:?}");
}

fn assert_status_denied<T: std::fmt::Debug>(result: Result<T, tonic::Status>) -> tonic::Status {
    assert_status(result, Code::PermissionDenied, "scopes: ")
}

async fn only_whole_action_wildcards_are_scopes(mut app: TestApp) {
    let before = snapshot(&mut app).await;
    for bad in ["datasets:re*d", "datasets:**", "datasets:read*"] {
        let refused = app.create_key("wild", &["datasets:read", bad]).await;
        let status = assert_status(
            refused,
            Code::InvalidArgument,
            &format!("scopes[1]: '{bad}' is not a valid scope: '*' stands only for a whole action"),
        );
        assert!(status.message().contains("'datasets:*'"), "{status:?}");
    }
    assert_unchanged(&mut app, &before).await;
    assert!(
        app.create_key("all datasets", &["datasets:*"])
            .await
            .is_ok()
    );
}

async fn the_operator_sets_an_accounts_grantable_scopes(mut app: TestApp) {
    let set = |patterns: &[&str], default: bool| proto::SetAccountScopesRequest {
        account_id: String::new(),
        grantable_scopes: patterns.iter().map(|s| s.to_string()).collect(),
        use_server_default: default,
    };
    // Not for a management key, and a bad pattern is named.
    let request = app.authed(set(&["datasets:*"], false));
    assert_status(
        app.admin.set_account_scopes(request).await,
        Code::PermissionDenied,
        "only the platform operator",
    );
    for (patterns, default, needle) in [
        (
            &["datasets:*", "Billing:read"][..],
            false,
            "grantable_scopes[1]: 'Billing:read' is not a scope pattern",
        ),
        (
            &["keys:admin"],
            false,
            "grantable_scopes[0]: 'keys:admin' names the service's own",
        ),
        (
            &["datasets:*"],
            true,
            "grantable_scopes: must be empty with use_server_default",
        ),
    ] {
        let request = app.as_operator(set(patterns, default), ACCOUNT, "alice@example.com");
        assert_status(
            app.admin.set_account_scopes(request).await,
            Code::InvalidArgument,
            needle,
        );
    }
    let account = app.account().await;
    assert_eq!(
        (account.grantable_scopes, account.grantable_scopes_default),
        (vec!["*:*".to_owned()], true)
    );

    let account = set_by_operator(&mut app, set(&["reports:read", "datasets:*"], false)).await;
    assert_eq!(account.grantable_scopes, ["datasets:*", "reports:read"]);
    assert!(!account.grantable_scopes_default);

    // Audited, with the old and new catalogue.
    let events = app.audit("").await;
    let event = events.last().unwrap();
    assert_eq!(event.action(), proto::AuditAction::GrantableScopesChanged);
    assert_eq!(event.actor, "operator:alice@example.com");
    assert_eq!(event.changes[0].field, "grantable_scopes");
    assert_eq!(
        event.changes[0].old_value.as_deref(),
        Some("the server's allowed_scopes")
    );
    assert_eq!(
        event.changes[0].new_value.as_deref(),
        Some("datasets:*, reports:read")
    );

    let before = snapshot(&mut app).await;
    for scopes in [&["billing:read"][..], &["reports:write"], &["reports:*"]] {
        let outside =
            "outside the scopes this account's keys may be granted (datasets:*, reports:read)";
        assert_create_denied(&mut app, "outside", scopes, outside).await;
    }
    assert_unchanged(&mut app, &before).await;
    assert!(
        app.create_key("inside", &["datasets:write", "reports:read"])
            .await
            .is_ok()
    );

    // Another account keeps the server's catalogue.
    app.create_key_as_operator("OTHER", "elsewhere", &["billing:read"])
        .await;

    // Back to the server's.
    let account = set_by_operator(&mut app, set(&[], true)).await;
    assert!(account.grantable_scopes_default);
    assert_eq!(account.grantable_scopes, ["*:*"]);
}

/// SetAccountScopes by the operator for the app's account; panics unless
/// it succeeds.
async fn set_by_operator(
    app: &mut TestApp,
    message: proto::SetAccountScopesRequest,
) -> proto::Account {
    let request = app.as_operator(message, ACCOUNT, "alice@example.com");
    app.admin
        .set_account_scopes(request)
        .await
        .expect("the operator's SetAccountScopes")
        .into_inner()
}

async fn allowed_scopes_bound_every_account_without_its_own(mut app: TestApp) {
    let before = snapshot(&mut app).await;
    let narrow = "(datasets:read, reports:*)";
    assert_create_denied(&mut app, "billing", &["billing:read"], narrow).await;
    assert_unchanged(&mut app, &before).await;
    assert!(
        app.create_key("reports", &["reports:*", "datasets:read"])
            .await
            .is_ok()
    );
    // The operator is held to the catalogue too, but for keys:admin.
    let request = app.as_operator(
        create("billing", &["billing:read"]),
        ACCOUNT,
        "alice@example.com",
    );
    assert_status_denied(app.admin.create_key(request).await);
}

async fn the_last_management_key_cannot_lock_the_account_out(mut app: TestApp) {
    let key_id = app.management_key_id.clone();
    let before = snapshot(&mut app).await;
    let expiry = days_from(app.clock.now(), 30);
    let attempts: Vec<(&str, Result<tonic::Response<proto::Key>, tonic::Status>)> = vec![
        (
            "revoke",
            app.admin
                .revoke_key(app.authed(proto::RevokeKeyRequest {
                    key_id: key_id.clone(),
                    reason: "oops".into(),
                    ..Default::default()
                }))
                .await,
        ),
        (
            "strip",
            app.admin
                .update_key(app.authed(rescope(&key_id, &["datasets:read"])))
                .await,
        ),
        (
            "expire",
            app.admin
                .update_key(app.authed(proto::UpdateKeyRequest {
                    key_id: key_id.clone(),
                    expires_at: Some(expiry),
                    update_mask: mask(&["expires_at"]),
                    ..Default::default()
                }))
                .await,
        ),
    ];
    for (what, result) in attempts {
        let status = result.expect_err(what);
        assert_eq!(
            status.code(),
            Code::FailedPrecondition,
            "{what}: {status:?}"
        );
        assert!(
            status
                .message()
                .contains("last management key (keys:admin) without an expiry"),
            "{what}: {status:?}"
        );
        assert!(
            status.message().contains(
                "first have the operator create another management key without an expiry"
            ),
            "{what}: {status:?}"
        );
    }
    // The operator is held to it too: it would lock the tenant out as surely.
    let request = app.as_operator(revoke(&key_id), ACCOUNT, "alice@example.com");
    assert_status(
        app.admin.revoke_key(request).await,
        Code::FailedPrecondition,
        "without an expiry",
    );
    assert_unchanged(&mut app, &before).await;

    // With a second management key the first may go; then the second is the last.
    let second = app
        .create_key_as_operator(ACCOUNT, "second admin", &["keys:*"])
        .await;
    let second_id = second.key.unwrap().key_id;
    let request = app.authed(proto::RevokeKeyRequest {
        key_id: key_id.clone(),
        reason: "moved to the second key".into(),
        ..Default::default()
    });
    assert!(app.admin.revoke_key(request).await.is_ok());
    let request = bearer(revoke(&second_id), &second.secret);
    assert_status(
        app.admin.revoke_key(request).await,
        Code::FailedPrecondition,
        &second_id,
    );
}

async fn two_management_keys_revoking_each_other_leave_one(mut app: TestApp) {
    for round in 0..5 {
        let peer = app
            .create_key_as_operator(ACCOUNT, &format!("peer {round}"), &["keys:admin"])
            .await;
        let peer_id = peer.key.unwrap().key_id;
        let mine = app.management_key_id.clone();
        let revoke_as = |target: &str, credential: &str| {
            let mut client = app.admin.clone();
            let request = bearer(revoke(target), credential);
            async move { client.revoke_key(request).await }
        };
        let (a, b) = tokio::join!(
            revoke_as(&peer_id, &app.management_key),
            revoke_as(&mine, &peer.secret)
        );
        let outcomes = [a.is_ok(), b.is_ok()];
        assert_eq!(
            outcomes.iter().filter(|ok| **ok).count(),
            1,
            "round {round}: {a:?} / {b:?}"
        );
        if b.is_ok() {
            // The peer won: carry on with it.
            app.management_key = peer.secret.clone();
            app.management_key_id = peer_id;
        }
        let active: Vec<_> = app
            .list_keys(false)
            .await
            .into_iter()
            .filter(|k| k.scopes.iter().any(|s| s.starts_with("keys:")))
            .collect();
        assert_eq!(active.len(), 1, "round {round}: {active:?}");
    }
}

/// A stolen management key sets its own expiry a few seconds ahead and
/// then tries to take the owner's management key away, so that the
/// account is locked out once the stolen key expires. The owner's key,
/// the last one without an expiry, can be neither revoked nor cut short.
async fn a_stolen_management_key_cannot_outlast_the_owners(mut app: TestApp) {
    let owner = app.management_key_id.clone();
    let stolen = app
        .create_key_as_operator(ACCOUNT, "stolen", &["keys:admin"])
        .await;
    let request = bearer(
        expire_in(&app, &stolen.key.unwrap().key_id, 4),
        &stolen.secret,
    );
    app.admin
        .update_key(request)
        .await
        .expect("a key may shorten its own life while a lasting manager stays");
    let before = snapshot(&mut app).await;
    let status = assert_status(
        app.admin
            .revoke_key(bearer(revoke(&owner), &stolen.secret))
            .await,
        Code::FailedPrecondition,
        "last management key (keys:admin) without an expiry",
    );
    assert!(status.message().contains(&owner), "{status:?}");
    assert!(
        status
            .message()
            .contains("first have the operator create another management key without an expiry"),
        "{status:?}"
    );
    let cut_short = bearer(expire_in(&app, &owner, 4), &stolen.secret);
    assert_status(
        app.admin.update_key(cut_short).await,
        Code::FailedPrecondition,
        "without an expiry",
    );
    let stripped = bearer(rescope(&owner, &["datasets:read"]), &stolen.secret);
    assert_status(
        app.admin.update_key(stripped).await,
        Code::FailedPrecondition,
        "without an expiry",
    );
    assert_unchanged(&mut app, &before).await;

    app.clock.advance(time::Duration::milliseconds(5_500));
    assert!(
        !manages(&app, &stolen.secret).await,
        "the stolen key expired"
    );
    assert!(
        manages(&app, &app.management_key.clone()).await,
        "the owner still manages the account"
    );
}

/// Two management keys each give the other a short expiry: the second
/// is refused, so one manager without an expiry is left.
async fn two_management_keys_cutting_each_other_short_leave_one_lasting(mut app: TestApp) {
    let first = app.management_key_id.clone();
    let second = app
        .create_key_as_operator(ACCOUNT, "second", &["keys:admin"])
        .await;
    let second_id = second.key.unwrap().key_id;
    app.admin
        .update_key(app.authed(expire_in(&app, &second_id, 3)))
        .await
        .expect("the first key cuts the second short");
    assert_status(
        app.admin
            .update_key(bearer(expire_in(&app, &first, 3), &second.secret))
            .await,
        Code::FailedPrecondition,
        "without an expiry",
    );
    app.clock.advance(time::Duration::seconds(4));
    assert!(!manages(&app, &second.secret).await);
    assert!(manages(&app, &app.management_key.clone()).await);
    assert_eq!(lasting_managers(&mut app).await.len(), 1);
}

/// The same race for real: in each round two management keys without an
/// expiry shorten each other's at the same moment. Exactly one change
/// wins, and one lasting manager is left; the loser expires and the
/// winner carries on.
async fn two_management_keys_racing_their_expiries_leave_one_lasting(mut app: TestApp) {
    for round in 0..5 {
        let peer = app
            .create_key_as_operator(ACCOUNT, &format!("peer {round}"), &["keys:admin"])
            .await;
        let peer_id = peer.key.unwrap().key_id;
        let mine = app.management_key_id.clone();
        let expire_as = |target: &str, credential: &str| {
            let mut client = app.admin.clone();
            let request = bearer(expire_in(&app, target, 3), credential);
            async move { client.update_key(request).await }
        };
        let (a, b) = tokio::join!(
            expire_as(&peer_id, &app.management_key),
            expire_as(&mine, &peer.secret)
        );
        assert_eq!(
            [a.is_ok(), b.is_ok()].iter().filter(|ok| **ok).count(),
            1,
            "round {round}: {a:?} / {b:?}"
        );
        let refused = a.as_ref().err().or(b.as_ref().err()).unwrap();
        assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
        if b.is_ok() {
            app.management_key = peer.secret.clone();
            app.management_key_id = peer_id;
        }
        let lasting = lasting_managers(&mut app).await;
        assert_eq!(lasting.len(), 1, "round {round}: {lasting:?}");
        assert_eq!(lasting[0].key_id, app.management_key_id, "round {round}");
        app.clock.advance(time::Duration::seconds(4));
        assert!(
            manages(&app, &app.management_key.clone()).await,
            "round {round}: the winner still manages the account"
        );
    }
}

//! A key's uses as the owner reads them: the address the verify listener
//! saw and the `client_ip` the calling backend claimed, kept apart; valid
//! uses and refusals of a matched secret counted apart, a refusal never
//! being a "last use".

use std::time::Duration;

use tonic::Request;
use vilvik_keys::proto::{self, VerifyCode};
use vilvik_keys_test_support::TestApp;

crate::on_both_backends!(
    a_claimed_client_ip_is_shown_beside_the_observed_address,
    a_refused_verify_is_counted_apart_and_is_not_a_last_use,
    x_forwarded_for_is_ignored_from_an_untrusted_peer,
);

mod behind_a_trusted_proxy {
    use super::*;

    fn trust_loopback(config: &mut vilvik_keys::config::Config) {
        config.trusted_proxies = vec!["127.0.0.1".parse().unwrap()];
    }

    crate::on_both_backends!(
        configured by trust_loopback:
        the_forwarded_client_is_the_observed_address,
    );
}

/// How long a verify takes to show on GetKey (the harness flushes usage
/// every 100 ms).
const WRITTEN_WITHIN: Duration = Duration::from_secs(5);

/// A VerifyKey request for `secret` needing `required`, claiming
/// `client_ip` (empty: none), sent with `x-forwarded-for: forwarded`
/// when given.
fn verify_request(
    secret: &str,
    required: &[&str],
    client_ip: &str,
    forwarded: Option<&str>,
) -> Request<proto::VerifyKeyRequest> {
    let mut request = Request::new(proto::VerifyKeyRequest {
        key: secret.to_owned(),
        required_scopes: required.iter().map(|s| (*s).to_owned()).collect(),
        client_ip: client_ip.to_owned(),
    });
    if let Some(forwarded) = forwarded {
        request
            .metadata_mut()
            .insert("x-forwarded-for", forwarded.parse().unwrap());
    }
    request
}

/// Sends `request` to the verify listener and returns its code.
async fn verify(app: &mut TestApp, request: Request<proto::VerifyKeyRequest>) -> VerifyCode {
    app.verify
        .verify_key(request)
        .await
        .expect("VerifyKey")
        .into_inner()
        .code()
}

/// A new key granting `datasets:read`: its id and secret.
async fn new_key(app: &mut TestApp) -> (String, String) {
    let created = app
        .create_key("ci-runner", &["datasets:read"])
        .await
        .unwrap();
    (created.key.unwrap().key_id, created.secret)
}

async fn a_claimed_client_ip_is_shown_beside_the_observed_address(mut app: TestApp) {
    let (key_id, secret) = new_key(&mut app).await;
    let claimed = verify_request(&secret, &["datasets:read"], "203.0.113.66", None);
    assert_eq!(verify(&mut app, claimed).await, VerifyCode::Valid);
    app.wait_for_key(&key_id, WRITTEN_WITHIN, "the use is written", |key| {
        key.valid_use_count == 1
    })
    .await;

    let key = app.get_key(&key_id).await;
    let listed = app.list_keys(false).await;
    let listed = listed.iter().find(|k| k.key_id == key_id).unwrap();
    for key in [&key, listed] {
        assert_eq!(key.last_used_observed_ip, "127.0.0.1", "{key:?}");
        assert_eq!(key.last_used_claimed_ip, "203.0.113.66", "{key:?}");
        assert_eq!(key.last_used_ip, "203.0.113.66", "what it always meant");
        assert_eq!((key.valid_use_count, key.rejected_use_count), (1, 0));
        assert!(key.last_used_at.is_some() && key.last_rejected_at.is_none());
    }

    // A use that claims nothing: observed only, the old claim gone with
    // the use it was made for.
    app.clock.advance(time::Duration::seconds(5));
    let unclaimed = verify_request(&secret, &[], "", None);
    assert_eq!(verify(&mut app, unclaimed).await, VerifyCode::Valid);
    app.wait_for_key(&key_id, WRITTEN_WITHIN, "the second use", |key| {
        key.valid_use_count == 2
    })
    .await;
    let key = app.get_key(&key_id).await;
    assert_eq!(key.last_used_observed_ip, "127.0.0.1");
    assert_eq!(key.last_used_claimed_ip, "");
    assert_eq!(key.last_used_ip, "127.0.0.1");
}

async fn a_refused_verify_is_counted_apart_and_is_not_a_last_use(mut app: TestApp) {
    let (key_id, secret) = new_key(&mut app).await;
    let valid = verify_request(&secret, &["datasets:read"], "", None);
    assert_eq!(verify(&mut app, valid).await, VerifyCode::Valid);
    app.wait_for_key(&key_id, WRITTEN_WITHIN, "the valid use", |key| {
        key.valid_use_count == 1
    })
    .await;
    let used = app.get_key(&key_id).await;

    // Later, the same secret asks for a scope it lacks, claiming an address.
    app.clock.advance(time::Duration::minutes(1));
    let wider = verify_request(&secret, &["datasets:write"], "203.0.113.66", None);
    assert_eq!(verify(&mut app, wider).await, VerifyCode::InsufficientScope);
    app.wait_for_key(&key_id, WRITTEN_WITHIN, "the refusal", |key| {
        key.rejected_use_count == 1
    })
    .await;
    let key = app.get_key(&key_id).await;
    assert_eq!(key.last_used_at, used.last_used_at, "not a last use");
    assert_eq!(key.last_used_ip, "127.0.0.1");
    assert_eq!(key.last_used_claimed_ip, "");
    assert_eq!(key.valid_use_count, 1);
    let at = vilvik_keys::proto::timestamp(vilvik_keys_domain::Clock::now(&*app.clock));
    assert_eq!(key.last_rejected_at, Some(at));
    assert_eq!(key.last_rejected_ip, "127.0.0.1", "observed, not claimed");

    // A revoked key's secret is refused and counted the same way.
    app.revoke_key(&key_id).await.unwrap();
    let after = verify_request(&secret, &[], "", None);
    assert_eq!(verify(&mut app, after).await, VerifyCode::Revoked);
    app.wait_for_key(&key_id, WRITTEN_WITHIN, "the second refusal", |key| {
        key.rejected_use_count == 2
    })
    .await;
    let key = app.list_keys(true).await;
    let key = key.iter().find(|k| k.key_id == key_id).unwrap();
    assert_eq!(key.last_used_at, used.last_used_at);
    assert_eq!(key.valid_use_count, 1);
}

async fn x_forwarded_for_is_ignored_from_an_untrusted_peer(mut app: TestApp) {
    let (key_id, secret) = new_key(&mut app).await;
    let forwarded = verify_request(&secret, &[], "", Some("198.51.100.23"));
    assert_eq!(verify(&mut app, forwarded).await, VerifyCode::Valid);
    app.wait_for_key(&key_id, WRITTEN_WITHIN, "the use is written", |key| {
        key.valid_use_count == 1
    })
    .await;
    let key = app.get_key(&key_id).await;
    assert_eq!(key.last_used_observed_ip, "127.0.0.1");
    assert_eq!(key.last_used_claimed_ip, "");
}

async fn the_forwarded_client_is_the_observed_address(mut app: TestApp) {
    let (key_id, secret) = new_key(&mut app).await;
    let forwarded = verify_request(&secret, &[], "203.0.113.66", Some("198.51.100.23"));
    assert_eq!(verify(&mut app, forwarded).await, VerifyCode::Valid);
    app.wait_for_key(&key_id, WRITTEN_WITHIN, "the use is written", |key| {
        key.valid_use_count == 1
    })
    .await;
    let key = app.get_key(&key_id).await;
    assert_eq!(key.last_used_observed_ip, "198.51.100.23");
    assert_eq!(key.last_used_claimed_ip, "203.0.113.66");
}

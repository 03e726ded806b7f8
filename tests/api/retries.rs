//! Safe retries: request ids on CreateKey and RotateKey, the
//! etag on UpdateKey, RotateKey and RevokeKey, and a response lost on the
//! way back (a proxy in front of the admin listener drops it for real).

use std::time::Duration;

use tonic::Code;
use vilvik_keys::headers;
use vilvik_keys::proto::key_admin_client::KeyAdminClient;
use vilvik_keys::proto::{self, VerifyCode};
use vilvik_keys_domain::RequestId;
use vilvik_keys_test_db::{FaultProxy, ProxyMode};
use vilvik_keys_test_support::requests::{rename, revoke, rotate};
use vilvik_keys_test_support::{
    ACCOUNT, Backend, TestApp, assert_status, bearer, lazy_channel, spawn_app, spawn_app_with,
    test_server_addr, through_proxy, without_usage,
};

fn create_request(name: &str, request_id: &str) -> proto::CreateKeyRequest {
    proto::CreateKeyRequest {
        name: name.into(),
        scopes: vec!["datasets:read".into()],
        request_id: request_id.into(),
        ..Default::default()
    }
}

fn rotate_request(key_id: &str, request_id: &str) -> proto::RotateKeyRequest {
    proto::RotateKeyRequest {
        key_id: key_id.into(),
        request_id: request_id.into(),
        ..Default::default()
    }
}

async fn create(app: &mut TestApp, message: proto::CreateKeyRequest) -> proto::CreateKeyResponse {
    let request = app.authed(message);
    app.admin
        .create_key(request)
        .await
        .expect("CreateKey")
        .into_inner()
}

async fn rotate_with(
    app: &mut TestApp,
    message: proto::RotateKeyRequest,
) -> proto::RotateKeyResponse {
    let request = app.authed(message);
    app.admin
        .rotate_key(request)
        .await
        .expect("RotateKey")
        .into_inner()
}

/// Every key of the account but the bootstrapped management key.
async fn created_keys(app: &mut TestApp) -> Vec<proto::Key> {
    let management = app.management_key_id.clone();
    app.list_keys(true)
        .await
        .into_iter()
        .filter(|k| k.key_id != management)
        .collect()
}

async fn a_create_retried_with_its_request_id_returns_the_same_key_and_secret(mut app: TestApp) {
    let id = RequestId::generate();
    let first = create(&mut app, create_request("ci-runner", id.as_str())).await;
    let retry = create(&mut app, create_request("ci-runner", id.as_str())).await;
    assert_eq!(retry.secret, first.secret);
    assert_eq!(
        retry.key.as_ref().unwrap().key_id,
        first.key.as_ref().unwrap().key_id
    );
    assert_eq!(retry.smoke_test_command, first.smoke_test_command);
    assert_eq!(retry.curl_smoke_test_command, first.curl_smoke_test_command);

    // The same id in the idempotency-key header, in another case, is the same request.
    let mut by_header = app.authed(create_request("ci-runner", ""));
    by_header.metadata_mut().insert(
        headers::IDEMPOTENCY_KEY,
        id.as_str().to_uppercase().parse().unwrap(),
    );
    let by_header = app.admin.create_key(by_header).await.unwrap().into_inner();
    assert_eq!(by_header.secret, first.secret);

    let keys = created_keys(&mut app).await;
    assert_eq!(keys.len(), 1, "a retry created a key: {keys:?}");
    assert_eq!(
        app.audit(&keys[0].key_id).await.len(),
        1,
        "one CREATED event"
    );
    assert_eq!(app.verify_code(&first.secret, &[]).await, VerifyCode::Valid);
}

async fn a_request_id_reused_for_other_fields_is_refused(mut app: TestApp) {
    let id = RequestId::generate();
    let first = create(&mut app, create_request("ci-runner", id.as_str())).await;
    let before = without_usage(app.list_keys(true).await);
    let status = assert_status(
        app.admin
            .create_key(app.authed(create_request("another-name", id.as_str())))
            .await,
        Code::InvalidArgument,
        "request_id: was already used within the last 24 hours for a CreateKey with other parameters",
    );
    assert!(!status.message().contains(id.as_str()), "{status:?}");
    let key_id = first.key.unwrap().key_id;
    assert_status(
        app.admin
            .rotate_key(app.authed(rotate_request(&key_id, id.as_str())))
            .await,
        Code::InvalidArgument,
        "for a CreateKey",
    );
    // A malformed id, or a header that disagrees with the field.
    assert_status(
        app.admin
            .create_key(app.authed(create_request("ci-runner", "retry-1")))
            .await,
        Code::InvalidArgument,
        "request_id: 'retry-1' is not a UUID",
    );
    let mut disagreeing = app.authed(create_request("ci-runner", id.as_str()));
    disagreeing.metadata_mut().insert(
        headers::IDEMPOTENCY_KEY,
        RequestId::generate().as_str().parse().unwrap(),
    );
    assert_status(
        app.admin.create_key(disagreeing).await,
        Code::InvalidArgument,
        &format!(
            "request_id: differs from the {} header",
            headers::IDEMPOTENCY_KEY
        ),
    );
    assert_eq!(
        without_usage(app.list_keys(true).await),
        before,
        "a refused call changed a key"
    );
    assert_eq!(app.audit(&key_id).await.len(), 1);
}

async fn a_rotation_retried_with_its_request_id_rotates_once(mut app: TestApp) {
    let created = app.create_key("rotated", &["datasets:read"]).await.unwrap();
    let key_id = created.key.unwrap().key_id;
    let id = RequestId::generate();
    let first = rotate_with(&mut app, rotate_request(&key_id, id.as_str())).await;
    let retry = rotate_with(&mut app, rotate_request(&key_id, id.as_str())).await;
    assert_eq!(retry.secret, first.secret);
    assert_eq!(retry.key.unwrap().prefix, first.key.unwrap().prefix);
    assert_eq!(app.verify_code(&first.secret, &[]).await, VerifyCode::Valid);
    assert_eq!(
        app.verify_code(&created.secret, &[]).await,
        VerifyCode::Rotated
    );
    assert_eq!(app.audit(&key_id).await.len(), 2, "CREATED and one ROTATED");
}

/// Neither a copy of the database nor its request-id table holds a
/// secret or a request id in clear.
async fn the_database_holds_no_secret_and_no_request_id(mut app: TestApp) {
    let id = RequestId::generate();
    let created = create(&mut app, create_request("sealed", id.as_str())).await;
    let rotation_id = RequestId::generate();
    let key_id = created.key.unwrap().key_id;
    let rotated = rotate_with(&mut app, rotate_request(&key_id, rotation_id.as_str())).await;
    let needles = [
        created.secret.as_bytes(),
        rotated.secret.as_bytes(),
        id.as_str().as_bytes(),
        rotation_id.as_str().as_bytes(),
    ];
    let stored: Vec<Vec<u8>> = match app.backend {
        Backend::Sqlite => {
            app.stop().await;
            ["keys.db", "keys.db-wal"]
                .iter()
                .filter_map(|file| std::fs::read(app.dir.join(file)).ok())
                .collect()
        }
        Backend::Postgres => {
            let client = app.postgres_client().await;
            let rows = client
                .query(
                    "SELECT request_digest, sealed_secret, key_id, method FROM requests",
                    &[],
                )
                .await
                .unwrap();
            assert_eq!(rows.len(), 2);
            rows.iter()
                .flat_map(|row| {
                    let text: Vec<u8> = [row.get::<_, String>(2), row.get(3)].concat().into_bytes();
                    [row.get::<_, Vec<u8>>(0), row.get(1), text]
                })
                .collect()
        }
    };
    assert!(!stored.is_empty());
    for bytes in &stored {
        for needle in needles {
            assert!(
                !bytes.windows(needle.len()).any(|w| w == needle),
                "the database holds a secret or request id in clear"
            );
        }
    }
}

async fn a_stale_etag_is_aborted_and_changes_nothing(mut app: TestApp) {
    let created = app.create_key("etagged", &["datasets:read"]).await.unwrap();
    let key = created.key.unwrap();
    assert!(!key.etag.is_empty());
    let rename = |name: &str, etag: &str| proto::UpdateKeyRequest {
        etag: etag.into(),
        ..rename(&key.key_id, name)
    };
    let rotate = |etag: &str| proto::RotateKeyRequest {
        etag: etag.into(),
        ..rotate(&key.key_id)
    };
    let revoke = |etag: &str| proto::RevokeKeyRequest {
        etag: etag.into(),
        ..revoke(&key.key_id)
    };
    let renamed = app
        .admin
        .update_key(app.authed(rename("renamed", &key.etag)))
        .await
        .unwrap()
        .into_inner();
    assert_ne!(renamed.etag, key.etag, "a change changes the etag");
    // A verify (a use, not a change) leaves the etag as it is.
    app.verify_code(&created.secret, &[]).await;
    assert_eq!(app.get_key(&key.key_id).await.etag, renamed.etag);

    let before = without_usage(vec![app.get_key(&key.key_id).await]);
    let stale = format!(
        "key {} was changed since you read it (etag {}; it is now {})",
        key.key_id, key.etag, renamed.etag
    );
    let aborted = |result: Result<(), tonic::Status>| {
        assert_status(result, Code::Aborted, &stale);
    };
    let mut admin = app.admin.clone();
    let lost = rename("lost", &key.etag);
    aborted(admin.update_key(app.authed(lost)).await.map(drop));
    aborted(
        admin
            .rotate_key(app.authed(rotate(&key.etag)))
            .await
            .map(drop),
    );
    aborted(
        admin
            .revoke_key(app.authed(revoke(&key.etag)))
            .await
            .map(drop),
    );
    assert_status(
        app.admin.update_key(app.authed(rename("lost", "7"))).await,
        Code::InvalidArgument,
        "etag: '7' is not an etag of this service",
    );
    assert_eq!(without_usage(vec![app.get_key(&key.key_id).await]), before);
    assert_eq!(
        app.verify_code(&created.secret, &[]).await,
        VerifyCode::Valid
    );
    assert_eq!(
        app.audit(&key.key_id).await.len(),
        2,
        "CREATED and UPDATED only"
    );

    // With the current etag each goes through.
    let revoked = app
        .admin
        .revoke_key(app.authed(revoke(&renamed.etag)))
        .await
        .unwrap()
        .into_inner();
    assert_ne!(revoked.etag, renamed.etag);
}

/// Asserts the call ended by the client's own deadline: tonic's channel
/// timeout reports it as CANCELLED "Timeout expired".
#[track_caller]
fn assert_timed_out<T: std::fmt::Debug>(result: Result<T, tonic::Status>) {
    let status = result.expect_err("the answer should have been lost");
    assert!(
        status.code() == Code::DeadlineExceeded
            || (status.code() == Code::Cancelled && status.message() == "Timeout expired"),
        "{status:?}"
    );
}

/// A client of the admin API through `proxy`, whose calls give up after
/// 1.5 s.
async fn client_through(proxy: &FaultProxy) -> KeyAdminClient<tonic::transport::Channel> {
    KeyAdminClient::new(lazy_channel(
        proxy.addr(),
        Some(Duration::from_millis(1_500)),
    ))
}

/// The proxy drops the server's answers: the create and the rotation are
/// made, their callers see DEADLINE_EXCEEDED, and each retry with its
/// request id returns the key and the secret the lost answer held.
async fn a_lost_response_is_recovered_by_retrying_with_the_request_id(mut app: TestApp) {
    let proxy = FaultProxy::start(app.admin_addr).await;
    proxy.set_mode(ProxyMode::DropReplies);
    let mut lossy = client_through(&proxy).await;

    let id = RequestId::generate();
    assert_timed_out(
        lossy
            .create_key(app.authed(create_request("lost-create", id.as_str())))
            .await,
    );
    // It was made: the answer, not the request, was lost.
    let keys = created_keys(&mut app).await;
    assert_eq!(keys.len(), 1, "{keys:?}");
    let stored = keys.into_iter().next().unwrap();

    proxy.set_mode(ProxyMode::Pass);
    let mut healed = client_through(&proxy).await;
    let retry = healed
        .create_key(app.authed(create_request("lost-create", id.as_str())))
        .await
        .expect("the retried create")
        .into_inner();
    let key = retry.key.unwrap();
    assert_eq!(key.key_id, stored.key_id);
    assert!(retry.secret.starts_with(&stored.prefix), "the lost secret");
    assert_eq!(app.verify_code(&retry.secret, &[]).await, VerifyCode::Valid);
    assert_eq!(created_keys(&mut app).await.len(), 1, "no orphan key");
    assert_eq!(app.audit(&key.key_id).await.len(), 1);

    // The same for a rotation: the old secret is dead, the retry brings the new one.
    proxy.set_mode(ProxyMode::DropReplies);
    let mut lossy = client_through(&proxy).await;
    let rotation_id = RequestId::generate();
    assert_timed_out(
        lossy
            .rotate_key(app.authed(rotate_request(&key.key_id, rotation_id.as_str())))
            .await,
    );
    assert_eq!(
        app.verify_code(&retry.secret, &[]).await,
        VerifyCode::Rotated
    );
    let rotated_prefix = app.get_key(&key.key_id).await.prefix;
    proxy.set_mode(ProxyMode::Pass);
    let mut healed = client_through(&proxy).await;
    let rotation = healed
        .rotate_key(app.authed(rotate_request(&key.key_id, rotation_id.as_str())))
        .await
        .expect("the retried rotation")
        .into_inner();
    assert!(
        rotation.secret.starts_with(&rotated_prefix),
        "the lost secret"
    );
    assert_eq!(
        app.verify_code(&rotation.secret, &[]).await,
        VerifyCode::Valid
    );
    assert_eq!(
        app.get_key(&key.key_id).await.prefix,
        rotated_prefix,
        "rotated once"
    );
    assert_eq!(
        app.audit(&key.key_id).await.len(),
        2,
        "CREATED and one ROTATED"
    );
}

#[test]
fn debug_output_of_a_request_hides_its_request_id() {
    let id = RequestId::generate();
    let shown = format!(
        "{:?} {:?}",
        create_request("ci-runner", id.as_str()),
        rotate_request("key_3kTMd8sQ0Lr6bA2xYv9Z", id.as_str())
    );
    assert!(!shown.contains(id.as_str()), "{shown}");
    assert!(shown.contains("ci-runner") && shown.contains("key_3kTMd8sQ0Lr6bA2xYv9Z"));
    assert_eq!(shown.matches("[REDACTED]").count(), 2, "{shown}");
}

crate::on_both_backends!(
    a_create_retried_with_its_request_id_returns_the_same_key_and_secret,
    a_request_id_reused_for_other_fields_is_refused,
    a_rotation_retried_with_its_request_id_rotates_once,
    the_database_holds_no_secret_and_no_request_id,
    a_stale_etag_is_aborted_and_changes_nothing,
    a_lost_response_is_recovered_by_retrying_with_the_request_id,
    a_request_id_is_answered_only_to_the_caller_that_made_it,
    a_rotation_retried_after_a_later_rotation_is_refused,
    a_create_retried_with_its_scopes_in_another_order_is_the_same_request,
);

/// A request id's answer (with the secret it returned) belongs to the
/// caller that made the call: a management key replaying the operator's
/// creation of a management key is refused as the same call without an
/// id would be, and another caller replaying an id it saw is refused and
/// gets no secret. The caller itself still gets its answer.
async fn a_request_id_is_answered_only_to_the_caller_that_made_it(mut app: TestApp) {
    let minted_id = RequestId::generate();
    let mint = || proto::CreateKeyRequest {
        name: "second admin".into(),
        scopes: vec!["keys:admin".into()],
        request_id: minted_id.as_str().into(),
        ..Default::default()
    };
    let alice = |app: &TestApp| app.as_operator(mint(), ACCOUNT, "alice@example.com");
    let minted = app
        .admin
        .create_key(alice(&app))
        .await
        .unwrap()
        .into_inner();
    let before = without_usage(app.list_keys(true).await);
    let events = app.audit("").await.len();

    // The ordinary management key may not create a management key, with
    // or without the operator's request id.
    let status = assert_status(
        app.admin.create_key(app.authed(mint())).await,
        Code::PermissionDenied,
        "scopes: 'keys:admin'",
    );
    assert!(!status.message().contains(&minted.secret));
    // The operator acting for someone else is another caller.
    let bob = app.as_operator(mint(), ACCOUNT, "bob@example.com");
    assert_status(
        app.admin.create_key(bob).await,
        Code::FailedPrecondition,
        "request_id: was used within the last 24 hours by another caller",
    );

    // One management key's create, replayed by another management key.
    let id = RequestId::generate();
    let first = create(&mut app, create_request("ci-runner", id.as_str())).await;
    let other = bearer(create_request("ci-runner", id.as_str()), &minted.secret);
    let status = assert_status(
        app.admin.create_key(other).await,
        Code::FailedPrecondition,
        "use a new request id",
    );
    assert!(!status.message().contains(&first.secret));
    let key_id = first.key.as_ref().unwrap().key_id.clone();
    let other = bearer(rotate_request(&key_id, id.as_str()), &minted.secret);
    assert_status(
        app.admin.rotate_key(other).await,
        Code::FailedPrecondition,
        "by another caller",
    );

    // The callers themselves get their answers.
    let again = app
        .admin
        .create_key(alice(&app))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.secret, minted.secret);
    let retry = create(&mut app, create_request("ci-runner", id.as_str())).await;
    assert_eq!(retry.secret, first.secret);
    let mut after = without_usage(app.list_keys(true).await);
    after.retain(|k| k.key_id != key_id);
    assert_eq!(after, before, "a refused replay changed a key");
    assert_eq!(app.audit("").await.len(), events + 1, "only the one create");
}

/// RotateKey under an id, then another rotation: a retry of the first
/// would hand back a secret that verifies ROTATED; it is refused, saying
/// when the later rotation happened.
async fn a_rotation_retried_after_a_later_rotation_is_refused(mut app: TestApp) {
    let created = app.create_key("rotated", &["datasets:read"]).await.unwrap();
    let key_id = created.key.unwrap().key_id;
    let id = RequestId::generate();
    let first = rotate_with(&mut app, rotate_request(&key_id, id.as_str())).await;
    app.clock.advance(time::Duration::seconds(7));
    let later = app.rotate_key(&key_id).await.unwrap();
    let at = vilvik_keys_domain::format_time(vilvik_keys_domain::Clock::now(&*app.clock));
    let status = assert_status(
        app.admin
            .rotate_key(app.authed(rotate_request(&key_id, id.as_str())))
            .await,
        Code::FailedPrecondition,
        &format!(
            "request_id: the rotation made with this request id was superseded by a later \
             rotation at {at}"
        ),
    );
    assert!(!status.message().contains(&first.secret), "{status:?}");
    assert_eq!(
        app.verify_code(&first.secret, &[]).await,
        VerifyCode::Rotated
    );
    assert_eq!(app.verify_code(&later.secret, &[]).await, VerifyCode::Valid);
    assert_eq!(app.audit(&key_id).await.len(), 3, "CREATED and two ROTATED");
}

/// Scopes are a set: a retry may list them in another order (or repeat
/// one) and is the same request.
async fn a_create_retried_with_its_scopes_in_another_order_is_the_same_request(mut app: TestApp) {
    let id = RequestId::generate();
    let with = |scopes: &[&str]| proto::CreateKeyRequest {
        scopes: scopes.iter().map(|s| s.to_string()).collect(),
        ..create_request("ci-runner", id.as_str())
    };
    let first = create(&mut app, with(&["datasets:read", "reports:read"])).await;
    let retry = create(&mut app, with(&["reports:read", "datasets:read"])).await;
    assert_eq!(retry.secret, first.secret);
    assert_eq!(retry.key.unwrap().key_id, first.key.unwrap().key_id);
    assert_eq!(created_keys(&mut app).await.len(), 1);
    assert_status(
        app.admin
            .create_key(app.authed(with(&["reports:read"])))
            .await,
        Code::InvalidArgument,
        "with other parameters",
    );
}

mod capped {
    use super::*;

    fn two_request_ids(config: &mut vilvik_keys::config::Config) {
        config.request_ids_per_account = 2;
    }

    crate::on_both_backends!(
        configured by two_request_ids:
        past_the_accounts_request_ids_a_new_one_is_resource_exhausted,
    );
}

/// One account may hold only so many request ids within their window
/// (here 2): a create or rotation with a new one past it is refused,
/// naming the setting, and changes nothing; a retry and a call without
/// an id still run.
async fn past_the_accounts_request_ids_a_new_one_is_resource_exhausted(mut app: TestApp) {
    let first = RequestId::generate();
    let created = create(&mut app, create_request("one", first.as_str())).await;
    let key_id = created.key.unwrap().key_id;
    create(
        &mut app,
        create_request("two", RequestId::generate().as_str()),
    )
    .await;
    let before = without_usage(app.list_keys(true).await);
    let status = assert_status(
        app.admin
            .create_key(app.authed(create_request("three", RequestId::generate().as_str())))
            .await,
        Code::ResourceExhausted,
        "request_id: the account already holds 2 request ids used within the last 24 hours",
    );
    assert!(
        status
            .message()
            .contains("VILVIK_KEYS_REQUEST_IDS_PER_ACCOUNT"),
        "{status:?}"
    );
    assert_status(
        app.admin
            .rotate_key(app.authed(rotate_request(&key_id, RequestId::generate().as_str())))
            .await,
        Code::ResourceExhausted,
        "request_ids_per_account",
    );
    assert_eq!(without_usage(app.list_keys(true).await), before);
    let retry = create(&mut app, create_request("one", first.as_str())).await;
    assert_eq!(retry.secret, created.secret);
    app.rotate_key(&key_id)
        .await
        .expect("a rotation without an id");
}

/// The connection to Postgres breaks after COMMIT was sent (a proxy
/// between the server and the database forwards COMMIT, then resets the
/// connection without passing on the answer). The create did commit; the
/// caller is told the outcome is unknown and that retrying with the same
/// request id is safe, and the retry gets the key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_commit_whose_answer_is_lost_is_reported_as_unknown() {
    let Some(server) = test_server_addr() else {
        // Skips, or fails under VILVIK_KEYS_REQUIRE_POSTGRES=1, as every Postgres test.
        assert!(spawn_app(Backend::Postgres).await.is_none());
        return;
    };
    let proxy = FaultProxy::start(server).await;
    let through = proxy.addr();
    let mut app = spawn_app_with(Backend::Postgres, move |config| {
        use secrecy::ExposeSecret;
        // In clear, so that the proxy sees the COMMIT go by.
        let url = config.database_url.as_ref().unwrap().expose_secret();
        config.database_url = Some(through_proxy(url, through).into());
    })
    .await
    .unwrap();
    // Warm the pool, so that the create's connection is an open one.
    app.list_keys(true).await;
    assert!(
        proxy.accepted() > 0,
        "the server reaches Postgres through the proxy"
    );

    proxy.set_mode(ProxyMode::ResetAfterCommit);
    let id = RequestId::generate();
    let status = app
        .admin
        .create_key(app.authed(create_request("committed", id.as_str())))
        .await
        .expect_err("the commit's answer was lost");
    proxy.set_mode(ProxyMode::Pass);
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    for said in [
        "the connection to the database broke while the change was being committed",
        "the outcome is unknown",
        "Retrying a CreateKey or RotateKey with the same request_id is safe",
    ] {
        assert!(status.message().contains(said), "{status:?}");
    }
    assert!(
        !status.message().contains("nothing was changed"),
        "{status:?}"
    );

    // It had committed; the retry returns it and creates nothing more.
    let keys = created_keys(&mut app).await;
    assert_eq!(keys.len(), 1, "{keys:?}");
    let retry = create(&mut app, create_request("committed", id.as_str())).await;
    assert_eq!(retry.key.unwrap().key_id, keys[0].key_id);
    assert_eq!(app.verify_code(&retry.secret, &[]).await, VerifyCode::Valid);
    assert_eq!(created_keys(&mut app).await.len(), 1);
    assert_eq!(app.audit(&keys[0].key_id).await.len(), 1);
}

//! An outage of the database reaches callers as UNAVAILABLE saying what is
//! down, changes nothing, and ends without a restart. The fault is real:
//! the test's own database is made to refuse connections
//! (`ALLOW_CONNECTIONS false`) and its open sessions are terminated.

use std::time::Duration;

use secrecy::ExposeSecret;
use tonic::Code;
use vilvik_keys_test_db::allow_connections;
use vilvik_keys_test_support::requests::{create, get};
use vilvik_keys_test_support::{Backend, TestApp, eventually, spawn_app, without_usage};

pub(crate) fn database_name(app: &TestApp) -> String {
    let url = app.config.database_url.as_ref().unwrap().expose_secret();
    let config: tokio_postgres::Config = url.parse().unwrap();
    config.get_dbname().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_that_refuses_connections_is_unavailable_then_recovers() {
    let Some(mut app) = spawn_app(Backend::Postgres).await else {
        return;
    };
    let database = database_name(&app);
    let key = app
        .create_key("ci-runner", &["datasets:read"])
        .await
        .unwrap();
    let key_id = key.key.unwrap().key_id;
    let keys_before = without_usage(app.list_keys(true).await);

    allow_connections(&database, false).await;

    // The pool's terminated sessions may fail one call each as broken
    // mid-call; after them every call finds the database refusing.
    let mut refusing = false;
    for _ in 0..40 {
        let outcome = app.admin.get_key(app.authed(get(&key_id))).await;
        let status = outcome.expect_err("the database refuses connections");
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        assert!(
            status
                .message()
                .starts_with("the key store is unavailable: "),
            "{status:?}"
        );
        if status
            .message()
            .contains("the database is not accepting connections; nothing was changed; retrying shortly is safe")
        {
            refusing = true;
            break;
        }
    }
    assert!(refusing, "never saw 'not accepting connections'");

    // A change during the outage is refused whole.
    let request = app.authed(create("during-outage", &["datasets:read"]));
    let status = app.admin.create_key(request).await.expect_err("no store");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");

    allow_connections(&database, true).await;
    eventually(
        Duration::from_secs(10),
        "the service answers again, with no restart",
        || {
            let mut admin = app.admin.clone();
            let request = app.authed(get(&key_id));
            async move { admin.get_key(request).await.is_ok() }
        },
    )
    .await;
    assert_eq!(without_usage(app.list_keys(true).await), keys_before);
    app.account().await;
}

//! What only the Postgres backend has: the NOTIFY change feed, start-up
//! checks of the URL, and migrations racing between replicas. The rules
//! both backends share are in `conformance.rs`.

use std::sync::Arc;
use std::time::Duration;

use time::OffsetDateTime;
use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, NoTls};
use vilvik_keys_domain::{
    AccountId, Description, GeneratedKey, KeyId, KeyPrefix, ScopeSet, TierLimits,
};
use vilvik_keys_store::{Actor, CHANGE_CHANNEL, NewKey, PostgresStore, Store, StoreError};
use vilvik_keys_test_db::TestDatabase;

fn actor() -> Actor {
    Actor {
        name: "operator:alice@example.com".to_owned(),
        ip: None,
    }
}

fn new_key(account: &AccountId) -> NewKey {
    let generated = GeneratedKey::generate();
    NewKey {
        key_id: KeyId::generate(),
        account_id: account.clone(),
        name: "listener-test".parse().unwrap(),
        description: Description::default(),
        scopes: ScopeSet::parse(&["datasets:read"]).unwrap(),
        expires_at: None,
        prefix: generated.prefix().clone(),
        hash: generated.hash(),
        created_at: OffsetDateTime::now_utc().replace_nanosecond(0).unwrap(),
    }
}

/// LISTENs on the change channel; yields each payload. Keep the client
/// alive while listening.
async fn listen(url: &str) -> (tokio_postgres::Client, mpsc::UnboundedReceiver<String>) {
    let (client, mut connection) = tokio_postgres::connect(url, NoTls).await.unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(Ok(message)) = std::future::poll_fn(|cx| connection.poll_message(cx)).await {
            if let AsyncMessage::Notification(n) = message {
                assert_eq!(n.channel(), CHANGE_CHANNEL);
                if tx.send(n.payload().to_owned()).is_err() {
                    break;
                }
            }
        }
    });
    client
        .batch_execute(&format!("LISTEN {CHANGE_CHANNEL}"))
        .await
        .unwrap();
    (client, rx)
}

/// The next payload's prefix; the payload is `<seq>:<prefix>`, read here
/// by hand as any other tool on the channel would.
async fn next(rx: &mut mpsc::UnboundedReceiver<String>) -> KeyPrefix {
    let payload = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("a notification within 5 s")
        .expect("the listener is running");
    let (seq, prefix) = payload.split_once(':').expect("<seq>:<prefix>");
    assert!(seq.parse::<i64>().unwrap() > 0, "{payload}");
    prefix.parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_committed_change_is_notified_and_a_failed_one_is_not() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let store = PostgresStore::connect(db.url()).await.unwrap();
    store.migrate().await.unwrap();
    let (_listener, mut rx) = listen(db.url()).await;

    let acme: AccountId = "ACME".parse().unwrap();
    let limits = TierLimits {
        free: 1,
        premium: 1,
    };
    let key = store
        .create_key(new_key(&acme), &actor(), limits)
        .await
        .unwrap();
    assert_eq!(next(&mut rx).await, key.prefix);

    // Refused by the cap: rolled back, so nothing is announced.
    let refused = store.create_key(new_key(&acme), &actor(), limits).await;
    assert!(matches!(refused, Err(StoreError::QuotaExceeded { .. })));

    let fresh = GeneratedKey::generate();
    let now = OffsetDateTime::now_utc();
    store
        .rotate_key(
            &acme,
            &key.key_id,
            fresh.prefix(),
            fresh.hash(),
            &actor(),
            now,
        )
        .await
        .unwrap();
    assert_eq!(next(&mut rx).await, key.prefix);
    assert_eq!(&next(&mut rx).await, fresh.prefix());
    store
        .revoke_key(&acme, &key.key_id, "done", &actor(), now)
        .await
        .unwrap();
    assert_eq!(&next(&mut rx).await, fresh.prefix());
    assert!(rx.try_recv().is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_migrating_together_apply_each_migration_once() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let mut stores = Vec::new();
    for _ in 0..4 {
        stores.push(Arc::new(PostgresStore::connect(db.url()).await.unwrap()));
    }
    let mut tasks = tokio::task::JoinSet::new();
    for store in stores {
        tasks.spawn(async move { store.migrate().await });
    }
    let mut applied = Vec::new();
    while let Some(outcome) = tasks.join_next().await {
        applied.push(outcome.unwrap().unwrap());
    }
    applied.sort();
    assert_eq!(applied, [0, 0, 0, 1]);
}

#[tokio::test]
async fn connect_picks_postgres_for_a_database_url() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let unused = std::path::Path::new("/nonexistent/never-created.db");
    let store = vilvik_keys_store::connect(Some(db.url()), unused)
        .await
        .unwrap();
    assert_eq!(store.migrate().await.unwrap(), 1);
    assert!(format!("{store:?}").starts_with("PostgresStore"));
    assert!(!unused.exists());
}

#[tokio::test]
async fn an_unreachable_server_fails_at_start_as_unavailable() {
    // Port 1 on localhost: nothing listens there.
    let err = PostgresStore::connect("postgres://postgres@127.0.0.1:1/vilvik")
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
}

#[tokio::test]
async fn a_malformed_url_fails_at_start_without_echoing_it() {
    let err = PostgresStore::connect("postgres://alice:hunter2@db:notaport/keys")
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Internal(..)), "{err:?}");
    let mut chain = err.to_string();
    let mut source = std::error::Error::source(&err);
    while let Some(s) = source {
        chain.push_str(&format!(": {s}"));
        source = s.source();
    }
    assert!(chain.contains("DATABASE_URL"), "{chain}");
    assert!(!chain.contains("hunter2"), "{chain}");
}

#[tokio::test]
async fn a_missing_database_fails_at_start_with_a_pointer_to_the_url() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let missing = db.url().replace(db.name(), "vk_no_such_database");
    let err = PostgresStore::connect(&missing).await.unwrap_err();
    assert!(matches!(err, StoreError::Internal(..)), "{err:?}");
    assert!(err.to_string().contains("DATABASE_URL"), "{err}");
}

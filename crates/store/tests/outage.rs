//! Each way a real database can be down or slow becomes the outage kind
//! callers are told about. The faults are real: nothing listening, a
//! database refusing connections, a lock held by another session, a
//! SQLite file held by another writer.

use std::time::Duration;

use vilvik_keys_domain::{AccountId, Pepper, ScopeSet};
use vilvik_keys_store::{
    Actor, KeySource, NewKey, OutageKind, Policy, PostgresOptions, PostgresStore, SqliteStore,
    Store, StoreError,
};
use vilvik_keys_test_db::TestDatabase;

/// Any pepper: these tests store and read hashes, they verify nothing.
fn pepper() -> Pepper {
    Pepper::from_bytes(&[0x42; 32])
}

fn actor() -> Actor {
    Actor {
        name: "operator:alice@example.com".to_owned(),
        ip: None,
        operator: true,
    }
}

fn new_key() -> NewKey {
    NewKey::builder("ACME".parse().unwrap())
        .scopes(ScopeSet::parse(&["datasets:read"]).unwrap())
        .build(&pepper())
        .0
}

#[track_caller]
fn assert_outage<T: std::fmt::Debug>(outcome: Result<T, StoreError>, kind: OutageKind) {
    match outcome {
        Err(StoreError::Unavailable(outage)) => assert_eq!(outage.kind, kind, "{outage:?}"),
        other => panic!("expected {kind:?}, got {other:?}"),
    }
}

async fn side_session(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    client
}

#[tokio::test]
async fn nothing_listening_is_a_refused_connection() {
    // Port 1 on localhost: nothing listens there.
    let outcome = PostgresStore::connect("postgres://postgres@127.0.0.1:1/vilvik").await;
    assert_outage(outcome, OutageKind::ConnectionRefused);
}

#[tokio::test]
async fn a_database_refusing_connections_is_not_accepting_them() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let store = PostgresStore::connect(db.url()).await.unwrap();
    store.migrate().await.unwrap();
    vilvik_keys_test_db::allow_connections(db.name(), false).await;
    // Each pooled session that was terminated fails once as broken; after
    // them, every new connection is refused by the server.
    let acme: AccountId = "ACME".parse().unwrap();
    let mut refused = false;
    for _ in 0..32 {
        match store.get_account(&acme).await {
            Err(StoreError::Unavailable(outage)) if outage.kind == OutageKind::ConnectionLost => {}
            outcome => {
                assert_outage(outcome, OutageKind::NotAcceptingConnections);
                refused = true;
                break;
            }
        }
    }
    assert!(refused, "never refused as not accepting connections");
    vilvik_keys_test_db::allow_connections(db.name(), true).await;
    vilvik_keys_test_db::eventually(Duration::from_secs(10), "the store answers again", || {
        let store = store.clone();
        let acme = acme.clone();
        async move { store.get_account(&acme).await.is_ok() }
    })
    .await;
}

#[tokio::test]
async fn a_lock_held_past_the_lock_timeout_is_a_cancelled_statement() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let setup = PostgresStore::connect(db.url()).await.unwrap();
    setup.migrate().await.unwrap();
    drop(setup);
    // New sessions of this database give up on a lock after 100 ms.
    let holder = side_session(db.url()).await;
    holder
        .batch_execute(&format!(
            "ALTER DATABASE \"{}\" SET lock_timeout = '100ms'",
            db.name()
        ))
        .await
        .unwrap();
    let store = PostgresStore::connect(db.url()).await.unwrap();
    holder
        .batch_execute("BEGIN; LOCK TABLE keys IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let outcome = store
        .create_key(new_key(), &actor(), &Policy::default())
        .await;
    assert_outage(outcome, OutageKind::StatementTimeout);
    holder.batch_execute("ROLLBACK").await.unwrap();
    // Nothing of the refused create is left, and the store works on.
    let account = store.get_account(&"ACME".parse().unwrap()).await.unwrap();
    assert_eq!(account.tier, vilvik_keys_domain::Tier::Free);
    store
        .create_key(new_key(), &actor(), &Policy::default())
        .await
        .unwrap();
    let page = store
        .list_keys(&"ACME".parse().unwrap(), true, None, 10)
        .await
        .unwrap();
    assert_eq!(page.items.len(), 1);
}

#[tokio::test]
async fn a_statement_past_the_store_timeout_is_cancelled_and_streams_are_exempt() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let options = PostgresOptions {
        statement_timeout: Duration::from_millis(200),
        ..PostgresOptions::default()
    };
    let store = PostgresStore::connect_with(db.url(), options)
        .await
        .unwrap();
    store.migrate().await.unwrap();
    store
        .create_key(new_key(), &actor(), &Policy::default())
        .await
        .unwrap();
    // Another session holds every key row's lock, with no lock timeout
    // of its own: only the store's statement timeout ends the wait.
    let holder = side_session(db.url()).await;
    holder
        .batch_execute("BEGIN; LOCK TABLE keys IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let outcome = store
        .create_key(new_key(), &actor(), &Policy::default())
        .await;
    assert_outage(outcome, OutageKind::StatementTimeout);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    holder.batch_execute("ROLLBACK").await.unwrap();
    // A stream may take longer than one statement's timeout: 0.5 s here.
    holder
        .batch_execute("BEGIN; LOCK TABLE keys IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let release = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(500)).await;
        holder.batch_execute("ROLLBACK").await.unwrap();
    });
    let streamed = store.stream_prefixes(10, &mut |_| {}).await.unwrap();
    assert_eq!(streamed, 1);
    release.await.unwrap();
    // The lifted timeout stayed in its transaction: the next statement on
    // the pooled connections is bounded again.
    let holder = side_session(db.url()).await;
    holder
        .batch_execute("BEGIN; LOCK TABLE keys IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    for _ in 0..4 {
        let acme: AccountId = "ACME".parse().unwrap();
        assert_outage(
            store.list_keys(&acme, true, None, 10).await,
            OutageKind::StatementTimeout,
        );
    }
    holder.batch_execute("ROLLBACK").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sqlite_file_held_by_another_writer_is_busy() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.db");
    let store = SqliteStore::open(&path).await.unwrap();
    store.migrate().await.unwrap();
    // Another process's writer, as far as SQLite can tell: its own
    // connection holding the write lock past the store's busy timeout.
    let (locked_tx, locked_rx) = std::sync::mpsc::channel();
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let writer = std::thread::spawn(move || {
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute_batch("BEGIN IMMEDIATE").unwrap();
        locked_tx.send(()).unwrap();
        release_rx.recv_timeout(Duration::from_secs(30)).ok();
        conn.execute_batch("ROLLBACK").unwrap();
    });
    locked_rx.recv().unwrap();
    let outcome = store
        .create_key(new_key(), &actor(), &Policy::default())
        .await;
    release_tx.send(()).unwrap();
    writer.join().unwrap();
    assert_outage(outcome, OutageKind::Busy);
    let page = store
        .list_keys(&"ACME".parse().unwrap(), true, None, 10)
        .await
        .unwrap();
    assert!(page.items.is_empty(), "the refused create left nothing");
}

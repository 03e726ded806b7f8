//! Each way a real database can be down or slow becomes the outage kind
//! callers are told about. The faults are real: nothing listening, a
//! database refusing connections, a lock held by another session, a
//! SQLite file held by another writer.

use std::time::Duration;

use vilvik_keys_store::{
    KeySource, NewKey, OutageKind, Policy, PostgresOptions, PostgresStore, Store, StoreError,
};
use vilvik_keys_test_db::fixtures::{account, actor, new_key, now};
use vilvik_keys_test_db::{Backend, TestDatabase, eventually, side_client};

/// A key of ACME to create, whose secret the test does not need.
fn a_key() -> NewKey {
    new_key(&account("ACME"), "ci-runner", now()).0
}

/// A migrated store on `db`, connected with `options`.
async fn migrated(db: &TestDatabase, options: PostgresOptions) -> PostgresStore {
    let store = PostgresStore::connect_with(db.url(), options)
        .await
        .unwrap();
    store.migrate().await.unwrap();
    store
}

/// Takes the lock of every key's and every secret's row in a transaction
/// of `holder`'s, until it rolls back.
async fn lock_the_keys(holder: &tokio_postgres::Client) {
    holder
        .batch_execute("BEGIN; LOCK TABLE keys, key_secrets IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
}

#[track_caller]
fn assert_outage<T: std::fmt::Debug>(outcome: Result<T, StoreError>, kind: OutageKind) {
    match outcome {
        Err(StoreError::Unavailable(outage)) => assert_eq!(outage.kind, kind, "{outage:?}"),
        other => panic!("expected {kind:?}, got {other:?}"),
    }
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
    let store = migrated(&db, PostgresOptions::default()).await;
    vilvik_keys_test_db::allow_connections(db.name(), false).await;
    // Each pooled session that was terminated fails once as broken; after
    // them, every new connection is refused by the server.
    let acme = account("ACME");
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
    eventually(Duration::from_secs(10), "the store answers again", || {
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
    drop(migrated(&db, PostgresOptions::default()).await);
    // New sessions of this database give up on a lock after 100 ms.
    let holder = side_client(db.url()).await;
    holder
        .batch_execute(&format!(
            "ALTER DATABASE \"{}\" SET lock_timeout = '100ms'",
            db.name()
        ))
        .await
        .unwrap();
    let store = PostgresStore::connect(db.url()).await.unwrap();
    lock_the_keys(&holder).await;
    let outcome = store
        .create_key(a_key(), &actor(), &Policy::default())
        .await;
    assert_outage(outcome, OutageKind::StatementTimeout);
    holder.batch_execute("ROLLBACK").await.unwrap();
    // Nothing of the refused create is left, and the store works on.
    let acme = account("ACME");
    let stored = store.get_account(&acme).await.unwrap();
    assert_eq!(stored.tier, vilvik_keys_domain::Tier::Free);
    store
        .create_key(a_key(), &actor(), &Policy::default())
        .await
        .unwrap();
    let page = store.list_keys(&acme, true, None, 10).await.unwrap();
    assert_eq!(page.items.len(), 1);
}

/// The statement timeout of [`a_statement_past_the_store_timeout_is_cancelled_and_streams_are_exempt`].
const STATEMENT_TIMEOUT: Duration = Duration::from_millis(200);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_past_the_store_timeout_is_cancelled_and_streams_are_exempt() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let options = PostgresOptions {
        statement_timeout: STATEMENT_TIMEOUT,
        ..PostgresOptions::default()
    };
    let store = migrated(&db, options).await;
    store
        .create_key(a_key(), &actor(), &Policy::default())
        .await
        .unwrap();
    // Another session holds every key's lock, with no lock timeout
    // of its own: only the store's statement timeout ends the wait.
    let holder = side_client(db.url()).await;
    lock_the_keys(&holder).await;
    let started = std::time::Instant::now();
    let outcome = store
        .create_key(a_key(), &actor(), &Policy::default())
        .await;
    assert_outage(outcome, OutageKind::StatementTimeout);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    holder.batch_execute("ROLLBACK").await.unwrap();

    // A stream may take longer than one statement's timeout: seen from
    // the server, it waits on the lock for twice the timeout, and it
    // completes once the lock is released.
    lock_the_keys(&holder).await;
    let streaming = store.clone();
    let stream = tokio::spawn(async move { streaming.stream_prefixes(10, &mut |_| {}).await });
    let waiting_past_the_timeout = format!(
        "SELECT COUNT(*) FROM pg_stat_activity WHERE datname = current_database() \
         AND wait_event_type = 'Lock' AND clock_timestamp() - query_start > interval '{} milliseconds'",
        2 * STATEMENT_TIMEOUT.as_millis()
    );
    // Not the holder: inside a transaction the activity view stands still.
    let watcher = side_client(db.url()).await;
    let what = "the stream waits on the lock for twice the statement timeout";
    eventually(Duration::from_secs(5), what, || async {
        let row = watcher.query_one(&waiting_past_the_timeout, &[]).await;
        row.unwrap().get::<_, i64>(0) == 1
    })
    .await;
    holder.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(stream.await.unwrap().unwrap(), 1);
    // The lifted timeout stayed in its transaction: the next statement on
    // the pooled connections is bounded again.
    let holder = side_client(db.url()).await;
    lock_the_keys(&holder).await;
    for _ in 0..4 {
        assert_outage(
            store.list_keys(&account("ACME"), true, None, 10).await,
            OutageKind::StatementTimeout,
        );
    }
    holder.batch_execute("ROLLBACK").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sqlite_file_held_by_another_writer_is_busy() {
    let backend = Backend::sqlite();
    let store = backend.open().await;
    store.migrate().await.unwrap();
    let path = backend.sqlite_path().unwrap().to_owned();
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
        .create_key(a_key(), &actor(), &Policy::default())
        .await;
    release_tx.send(()).unwrap();
    writer.join().unwrap();
    assert_outage(outcome, OutageKind::Busy);
    let page = store.list_keys(&account("ACME"), true, None, 10).await;
    assert!(
        page.unwrap().items.is_empty(),
        "the refused create left nothing"
    );
}

//! What only the Postgres backend has: the NOTIFY change feed and its
//! listener, start-up checks of the URL, and migrations racing between
//! replicas. The rules both backends share are in the conformance suite
//! (`tests/conformance/`).

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::Duration;

use time::OffsetDateTime;
use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, Client, NoTls};
use vilvik_keys_domain::{AccountId, KeyPrefix, SecretHash};
use vilvik_keys_store::{
    CHANGE_CHANNEL, ChangeListener, KeySource, ListenerOptions, NewKey, PostgresStore, Rehash,
    Store, StoreError,
};
use vilvik_keys_test_db::fixtures::{
    account, actor, capped, create, error_chain, new_key, new_secret, now, other_pepper, revoke,
    roomy, rotate,
};
use vilvik_keys_test_db::{FaultProxy, ProxyMode, TestDatabase, eventually, side_client};

/// How long a test waits for something that should happen at once; only
/// a broken build waits it out.
const PATIENCE: Duration = Duration::from_secs(5);

/// A migrated store on `db` whose change listener watches its connection
/// as `options` say.
async fn migrated(db_url: &str, options: ListenerOptions) -> PostgresStore {
    let store = PostgresStore::connect(db_url)
        .await
        .unwrap()
        .with_listener_options(options);
    store.migrate().await.unwrap();
    store
}

/// A key to create whose secret the test does not need.
fn a_key(account: &AccountId) -> NewKey {
    new_key(account, "listener-test", now()).0
}

/// LISTENs on the change channel; yields each payload. Keep the client
/// alive while listening.
async fn listen(url: &str) -> (Client, mpsc::UnboundedReceiver<String>) {
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
    let payload = tokio::time::timeout(PATIENCE, rx.recv())
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
    let store = migrated(db.url(), ListenerOptions::default()).await;
    let (_listener, mut rx) = listen(db.url()).await;

    let acme = account("ACME");
    let one = capped(1, 1);
    let key = store
        .create_key(a_key(&acme), &actor(), &one)
        .await
        .unwrap();
    assert_eq!(next(&mut rx).await, key.prefix);

    // Refused by the cap: rolled back, so nothing is announced.
    let refused = store.create_key(a_key(&acme), &actor(), &one).await;
    assert!(matches!(refused, Err(StoreError::QuotaExceeded { .. })));

    let fresh = new_secret();
    rotate(&store, &key, &fresh, now()).await;
    assert_eq!(next(&mut rx).await, key.prefix);
    assert_eq!(&next(&mut rx).await, fresh.prefix());
    revoke(&store, &key, "done", now()).await;
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
    assert_eq!(applied, [0, 0, 0, vilvik_keys_store::MIGRATION_COUNT]);
}

#[tokio::test]
async fn connect_picks_postgres_for_a_database_url() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let unused = std::path::Path::new("/nonexistent/never-created.db");
    let store = vilvik_keys_store::connect(Some(db.url()), unused, Default::default())
        .await
        .unwrap();
    assert_eq!(
        store.migrate().await.unwrap(),
        vilvik_keys_store::MIGRATION_COUNT
    );
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
    let chain = error_chain(&err);
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

// ---------------------------------------------------------------------------
// Store::listen

/// The listener's next change, failing the test after [`PATIENCE`].
async fn next_change(listener: &mut dyn ChangeListener) -> (i64, KeyPrefix) {
    tokio::time::timeout(PATIENCE, listener.next())
        .await
        .expect("a change within the timeout")
        .expect("the listener is running")
}

/// Selects this database's listener sessions, as the server sees them.
const LISTENER_SESSIONS: &str = "FROM pg_stat_activity \
     WHERE application_name = 'vilvik-keys-listener' AND datname = current_database()";

async fn listener_sessions(side: &Client) -> i64 {
    let sql = format!("SELECT COUNT(*) {LISTENER_SESSIONS}");
    side.query_one(&sql, &[]).await.unwrap().get(0)
}

/// Ends the listener's session from the server's side; returns, for each
/// listener session found, whether it was signalled.
async fn terminate_listener(side: &Client) -> Vec<bool> {
    let sql = format!("SELECT pg_terminate_backend(pid) {LISTENER_SESSIONS}");
    let rows = side.query(&sql, &[]).await.unwrap();
    rows.iter().map(|row| row.get(0)).collect()
}

/// Waits until no listener session of this database is left.
async fn wait_until_no_listener_session(side: &Client, what: &str) {
    eventually(PATIENCE, what, || async {
        listener_sessions(side).await == 0
    })
    .await;
}

/// Waits until the listener's session has answered `count` heartbeats, as
/// the server sees them: each heartbeat is a query of its own, which moves
/// the session's `query_start` on.
async fn heartbeats_answered(side: &Client, count: usize) {
    let sql = format!("SELECT query_start {LISTENER_SESSIONS}");
    let starts: Mutex<Vec<OffsetDateTime>> = Mutex::new(Vec::new());
    let what = format!("the listener's session answers {count} heartbeats");
    eventually(PATIENCE, &what, || async {
        let start: Option<OffsetDateTime> = side.query_one(&sql, &[]).await.unwrap().get(0);
        let mut starts = starts.lock().unwrap();
        if let Some(start) = start.filter(|start| starts.last() != Some(start)) {
            starts.push(start);
        }
        // The first start seen is the last query before the wait began.
        starts.len() > count
    })
    .await;
}

/// A migrated store at `url` whose listener watches its connection as
/// `options` say, subscribed to the change feed; and a side connection
/// to `db` (`url`'s database, perhaps reached another way).
async fn subscribed(
    db: &TestDatabase,
    url: &str,
    options: ListenerOptions,
) -> (PostgresStore, Box<dyn ChangeListener>, Client) {
    let store = migrated(url, options).await;
    let listener = store.listen().await.unwrap().expect("Postgres can push");
    (store, listener, side_client(db.url()).await)
}

/// Polls `future` once: when it is pending, it is then waiting for a
/// wake-up, as a task awaiting it would be.
async fn poll_once<F: Future + Unpin>(future: &mut F) -> Poll<F::Output> {
    std::future::poll_fn(|cx| Poll::Ready(std::pin::Pin::new(&mut *future).poll(cx))).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_listener_receives_seq_and_prefix_in_commit_order() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let (store, mut listener, side) = subscribed(&db, db.url(), ListenerOptions::default()).await;
    let store = Arc::new(store);
    assert_eq!(listener_sessions(&side).await, 1);
    let start = store.change_sequence().await.unwrap();

    let key = create(&*store, &account("ACME"), "listener-test", now()).await;
    let fresh = new_secret();
    rotate(&*store, &key, &fresh, now()).await;
    revoke(&*store, &key, "done", now()).await;
    let mut received = Vec::new();
    for _ in 0..4 {
        received.push(next_change(&mut *listener).await);
    }
    let logged = store.changes_since(start, 100).await.unwrap();
    assert_eq!(received, logged);
    assert_eq!(
        received.iter().map(|(_, p)| p).collect::<Vec<_>>(),
        [&key.prefix, &key.prefix, fresh.prefix(), fresh.prefix()]
    );

    // Concurrent changes arrive in sequence order, none missing.
    let start = store.change_sequence().await.unwrap();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..20 {
        let store = store.clone();
        let account = account(&format!("acct-{}", i % 4));
        tasks.spawn(async move { store.create_key(a_key(&account), &actor(), &roomy()).await });
    }
    while let Some(created) = tasks.join_next().await {
        created.unwrap().unwrap();
    }
    let mut received = Vec::new();
    for _ in 0..20 {
        received.push(next_change(&mut *listener).await);
    }
    assert_eq!(received, store.changes_since(start, 100).await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminated_listener_connection_fails_next_as_unavailable() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let (store, mut listener, side) = subscribed(&db, db.url(), ListenerOptions::default()).await;

    // Waiting in next() when the backend goes away.
    let mut waiting = listener.next();
    assert!(
        poll_once(&mut waiting).await.is_pending(),
        "nothing to receive"
    );
    assert_eq!(terminate_listener(&side).await, [true]);
    let err = tokio::time::timeout(Duration::from_secs(3), waiting)
        .await
        .expect("next() returns within 3 s")
        .expect_err("the connection is gone");
    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
    // And keeps failing at once: the subscription is over.
    let again = tokio::time::timeout(Duration::from_secs(1), listener.next())
        .await
        .expect("at once");
    assert!(
        matches!(again, Err(StoreError::Unavailable(_))),
        "{again:?}"
    );

    // The store itself is fine, and a new subscription works.
    let mut listener = store.listen().await.unwrap().unwrap();
    let key = create(&store, &account("ACME"), "listener-test", now()).await;
    assert_eq!(next_change(&mut *listener).await.1, key.prefix);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_terminated_between_calls_fails_the_next_call() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let (store, mut listener, side) = subscribed(&db, db.url(), ListenerOptions::default()).await;
    let key = create(&store, &account("ACME"), "listener-test", now()).await;
    assert_eq!(terminate_listener(&side).await, [true]);
    wait_until_no_listener_session(&side, "the listener's session is gone").await;
    // What arrived before the end may still be handed out; then the error.
    let mut outcome = tokio::time::timeout(Duration::from_secs(2), listener.next())
        .await
        .unwrap();
    if let Ok((_, prefix)) = &outcome {
        assert_eq!(prefix, &key.prefix);
        outcome = tokio::time::timeout(Duration::from_secs(2), listener.next())
            .await
            .unwrap();
    }
    assert!(
        matches!(outcome, Err(StoreError::Unavailable(_))),
        "{outcome:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_notification_fails_next_as_internal() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let (_store, mut listener, side) = subscribed(&db, db.url(), ListenerOptions::default()).await;
    side.execute("SELECT pg_notify($1, 'vlk_AbCd0123')", &[&CHANGE_CHANNEL])
        .await
        .unwrap();
    let err = tokio::time::timeout(PATIENCE, listener.next())
        .await
        .unwrap()
        .unwrap_err();
    assert!(matches!(err, StoreError::Internal(..)), "{err:?}");
    assert!(err.to_string().contains("vlk_AbCd0123"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_listener_closes_its_connection() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let (_store, listener, side) = subscribed(&db, db.url(), ListenerOptions::default()).await;
    assert_eq!(listener_sessions(&side).await, 1);
    drop(listener);
    wait_until_no_listener_session(&side, "the listener's session ends with it").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_import_is_not_notified_but_the_next_change_shows_the_gap() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let store = migrated(db.url(), ListenerOptions::default()).await;
    let mut listener = store.listen().await.unwrap().unwrap();
    let acme = account("ACME");
    let first = create(&store, &acme, "listener-test", now()).await;
    let (seen, prefix) = next_change(&mut *listener).await;
    assert_eq!(prefix, first.prefix);

    let imported: Vec<NewKey> = (0..5).map(|_| a_key(&acme)).collect();
    store.import_keys(imported.clone(), &actor()).await.unwrap();
    let last = create(&store, &acme, "listener-test", now()).await;
    // Notifications come in commit order: the import's would come first.
    let (seq, prefix) = next_change(&mut *listener).await;
    assert_eq!(prefix, last.prefix, "an import sends no notification");
    assert_eq!(seq, seen + 6, "the sequence jumped over the import");
    // A follower catches up on what it was not told.
    let missed = store.changes_since(seen, 100).await.unwrap();
    let mut want: Vec<_> = imported.iter().map(|k| k.prefix.clone()).collect();
    want.push(last.prefix.clone());
    assert_eq!(missed.into_iter().map(|(_, p)| p).collect::<Vec<_>>(), want);
}

/// A connection string for `db` through `proxy` (which forwards to the
/// server `db` is on).
fn through(proxy: &FaultProxy, db: &TestDatabase) -> String {
    let config: tokio_postgres::Config = db.url().parse().unwrap();
    let mut url = format!(
        "host=127.0.0.1 port={} dbname={} user={}",
        proxy.addr().port(),
        config.get_dbname().unwrap(),
        config.get_user().unwrap()
    );
    if let Some(password) = config.get_password() {
        url.push_str(&format!(
            " password='{}'",
            String::from_utf8_lossy(password)
                .replace('\\', "\\\\")
                .replace('\'', "\\'")
        ));
    }
    url
}

/// The address of the server `db` is on; `None` when it is not reached
/// over TCP.
async fn server_addr(db: &TestDatabase) -> Option<std::net::SocketAddr> {
    let config: tokio_postgres::Config = db.url().parse().unwrap();
    let tokio_postgres::config::Host::Tcp(host) = &config.get_hosts()[0] else {
        eprintln!("skipped: the test server is not reached over TCP");
        return None;
    };
    let mut addrs = tokio::net::lookup_host((host.as_str(), config.get_ports()[0]))
        .await
        .unwrap();
    addrs.next()
}

/// Heartbeats small enough that tests need not wait out the defaults.
const SHORT_HEARTBEAT: ListenerOptions = ListenerOptions {
    heartbeat: Duration::from_millis(200),
    heartbeat_timeout: Duration::from_millis(300),
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_listener_on_a_healthy_connection_stays_subscribed() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let (store, mut listener, side) = subscribed(&db, db.url(), SHORT_HEARTBEAT).await;
    // Through several heartbeats, with nobody calling next().
    heartbeats_answered(&side, 3).await;
    let key = create(&store, &account("ACME"), "listener-test", now()).await;
    assert_eq!(next_change(&mut *listener).await.1, key.prefix);
    // And while next() waits through heartbeats: nothing to receive, and
    // no error.
    tokio::select! {
        outcome = listener.next() => panic!("next() returned {outcome:?}"),
        () = heartbeats_answered(&side, 2) => {}
    }
    let fresh = new_secret();
    rotate(&store, &key, &fresh, now()).await;
    assert_eq!(next_change(&mut *listener).await.1, key.prefix);
    assert_eq!(&next_change(&mut *listener).await.1, fresh.prefix());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_heartbeat_gives_up_a_silent_connection_sooner() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let Some(server) = server_addr(&db).await else {
        return;
    };
    let proxy = FaultProxy::start(server).await;
    let (store, mut listener, side) = subscribed(&db, &through(&proxy, &db), SHORT_HEARTBEAT).await;
    // Idle through several heartbeats on a healthy connection: still subscribed.
    heartbeats_answered(&side, 3).await;
    let key = create(&store, &account("ACME"), "listener-test", now()).await;
    assert_eq!(next_change(&mut *listener).await.1, key.prefix);

    // The connection goes silent: every socket open, nothing forwarded.
    proxy.set_mode(ProxyMode::BlackHole);
    let silent_at = tokio::time::Instant::now();
    let outcome = tokio::time::timeout(PATIENCE, listener.next())
        .await
        .expect("next() fails within 5 s of the connection going silent");
    assert!(
        matches!(outcome, Err(StoreError::Unavailable(_))),
        "{outcome:?}"
    );
    // The bound under test: a heartbeat (0.2 s) and its timeout (0.3 s).
    let took = silent_at.elapsed();
    assert!(took <= Duration::from_secs(2), "took {took:?}");
}

/// Two verify nodes writing overlapping batches of re-hashes at once (as in
/// a rolling rotation) neither deadlock nor lose the condition: each
/// secret is re-hashed by exactly one of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_overlapping_rehashes_neither_deadlock_nor_apply_twice() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let store = Arc::new(migrated(db.url(), ListenerOptions::default()).await);
    let acme = account("ACME");
    let next = other_pepper();
    let mut rehashes = Vec::new();
    for _ in 0..60 {
        let new = a_key(&acme);
        rehashes.push(Rehash {
            prefix: new.prefix.clone(),
            old_hash: new.hash,
            old_pepper_id: Some(new.pepper_id),
            new_hash: SecretHash::from_bytes([7; 32]),
            new_pepper_id: next.id(),
        });
        store.create_key(new, &actor(), &roomy()).await.unwrap();
    }
    let mut backwards = rehashes.clone();
    backwards.reverse();
    let (a, b) = (store.clone(), store.clone());
    let (first, second) = tokio::join!(
        tokio::spawn(async move { a.rehash_secrets(&rehashes).await }),
        tokio::spawn(async move { b.rehash_secrets(&backwards).await }),
    );
    let (first, second) = (first.unwrap().unwrap(), second.unwrap().unwrap());
    assert_eq!(first.len() + second.len(), 60, "each secret once");
    let uses = store.secrets_by_pepper().await.unwrap();
    assert_eq!(uses.len(), 1);
    assert_eq!(uses[0].pepper_id, Some(next.id()));
    assert_eq!(uses[0].live, 60);
}

//! What only the Postgres backend has: the NOTIFY change feed and its
//! listener, start-up checks of the URL, and migrations racing between
//! replicas. The rules both backends share are in `conformance.rs`.

use std::sync::Arc;
use std::time::Duration;

use time::OffsetDateTime;
use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, NoTls};
use vilvik_keys_domain::{AccountId, GeneratedKey, KeyPrefix, Pepper, ScopeSet, TierLimits};
use vilvik_keys_store::{
    Actor, CHANGE_CHANNEL, ChangeListener, KeySource, ListenerOptions, NewKey, NewSecret, Policy,
    PostgresStore, Store, StoreError,
};
use vilvik_keys_test_db::{TestDatabase, eventually};

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

fn new_key(account: &AccountId) -> NewKey {
    NewKey::builder(account.clone())
        .name("listener-test".parse().unwrap())
        .scopes(ScopeSet::parse(&["datasets:read"]).unwrap())
        .created_at(OffsetDateTime::now_utc().replace_nanosecond(0).unwrap())
        .build(&pepper())
        .0
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
        .create_key(new_key(&acme), &actor(), &limits.into())
        .await
        .unwrap();
    assert_eq!(next(&mut rx).await, key.prefix);

    // Refused by the cap: rolled back, so nothing is announced.
    let refused = store
        .create_key(new_key(&acme), &actor(), &limits.into())
        .await;
    assert!(matches!(refused, Err(StoreError::QuotaExceeded { .. })));

    let fresh = GeneratedKey::generate(&pepper());
    let now = OffsetDateTime::now_utc();
    store
        .rotate_key(
            &acme,
            &key.key_id,
            &NewSecret::from(&fresh),
            &actor(),
            now,
            &Policy::default(),
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

// ---------------------------------------------------------------------------
// Store::listen

/// The listener's next change, failing the test after `secs` seconds.
async fn next_change(listener: &mut dyn ChangeListener, secs: u64) -> (i64, KeyPrefix) {
    tokio::time::timeout(Duration::from_secs(secs), listener.next())
        .await
        .expect("a change within the timeout")
        .expect("the listener is running")
}

/// A plain connection for poking at the server from the side.
async fn side_client(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await.unwrap();
    tokio::spawn(connection);
    client
}

async fn listener_sessions(client: &tokio_postgres::Client) -> i64 {
    client
        .query_one(
            "SELECT COUNT(*) FROM pg_stat_activity \
             WHERE application_name = 'vilvik-keys-listener' AND datname = current_database()",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

/// Waits (up to 2 s) until no listener session of this database is left.
async fn wait_until_no_listener_session(side: &tokio_postgres::Client, what: &str) {
    eventually(Duration::from_secs(2), what, || async {
        listener_sessions(side).await == 0
    })
    .await;
}

fn roomy() -> Policy {
    Policy::from(TierLimits {
        free: 100,
        premium: 100,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_listener_receives_seq_and_prefix_in_commit_order() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let store = Arc::new(PostgresStore::connect(db.url()).await.unwrap());
    store.migrate().await.unwrap();
    let mut listener = store.listen().await.unwrap().expect("Postgres can push");
    let side = side_client(db.url()).await;
    assert_eq!(listener_sessions(&side).await, 1);
    let start = store.change_sequence().await.unwrap();

    let acme: AccountId = "ACME".parse().unwrap();
    let key = store
        .create_key(new_key(&acme), &actor(), &roomy())
        .await
        .unwrap();
    let fresh = GeneratedKey::generate(&pepper());
    let now = OffsetDateTime::now_utc();
    store
        .rotate_key(
            &acme,
            &key.key_id,
            &NewSecret::from(&fresh),
            &actor(),
            now,
            &Policy::default(),
        )
        .await
        .unwrap();
    store
        .revoke_key(&acme, &key.key_id, "done", &actor(), now)
        .await
        .unwrap();
    let mut received = Vec::new();
    for _ in 0..4 {
        received.push(next_change(&mut *listener, 5).await);
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
        let account: AccountId = format!("acct-{}", i % 4).parse().unwrap();
        tasks.spawn(async move {
            store
                .create_key(new_key(&account), &actor(), &roomy())
                .await
        });
    }
    while let Some(created) = tasks.join_next().await {
        created.unwrap().unwrap();
    }
    let mut received = Vec::new();
    for _ in 0..20 {
        received.push(next_change(&mut *listener, 5).await);
    }
    assert_eq!(received, store.changes_since(start, 100).await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminated_listener_connection_fails_next_as_unavailable() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let store = PostgresStore::connect(db.url()).await.unwrap();
    store.migrate().await.unwrap();
    let mut listener = store.listen().await.unwrap().unwrap();
    let side = side_client(db.url()).await;

    // Waiting in next() when the backend goes away.
    let waiting = tokio::spawn(async move {
        let outcome = tokio::time::timeout(Duration::from_secs(3), listener.next()).await;
        (outcome, listener)
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let terminated = side
        .query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE application_name = 'vilvik-keys-listener' AND datname = current_database()",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(terminated.len(), 1);
    assert!(terminated[0].get::<_, bool>(0));
    let (outcome, mut listener) = waiting.await.unwrap();
    let err = outcome
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
    let acme: AccountId = "ACME".parse().unwrap();
    let key = store
        .create_key(new_key(&acme), &actor(), &roomy())
        .await
        .unwrap();
    assert_eq!(next_change(&mut *listener, 5).await.1, key.prefix);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_terminated_between_calls_fails_the_next_call() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let store = PostgresStore::connect(db.url()).await.unwrap();
    store.migrate().await.unwrap();
    let mut listener = store.listen().await.unwrap().unwrap();
    let side = side_client(db.url()).await;
    let acme: AccountId = "ACME".parse().unwrap();
    let key = store
        .create_key(new_key(&acme), &actor(), &roomy())
        .await
        .unwrap();
    side.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE application_name = 'vilvik-keys-listener' AND datname = current_database()",
        &[],
    )
    .await
    .unwrap();
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
    let store = PostgresStore::connect(db.url()).await.unwrap();
    store.migrate().await.unwrap();
    let mut listener = store.listen().await.unwrap().unwrap();
    let side = side_client(db.url()).await;
    side.execute("SELECT pg_notify($1, 'vlk_AbCd0123')", &[&CHANGE_CHANNEL])
        .await
        .unwrap();
    let err = tokio::time::timeout(Duration::from_secs(5), listener.next())
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
    let store = PostgresStore::connect(db.url()).await.unwrap();
    store.migrate().await.unwrap();
    let side = side_client(db.url()).await;
    let listener = store.listen().await.unwrap().unwrap();
    assert_eq!(listener_sessions(&side).await, 1);
    drop(listener);
    wait_until_no_listener_session(&side, "the listener's session ends with it").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_import_is_not_notified_but_the_next_change_shows_the_gap() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let store = PostgresStore::connect(db.url()).await.unwrap();
    store.migrate().await.unwrap();
    let mut listener = store.listen().await.unwrap().unwrap();
    let acme: AccountId = "ACME".parse().unwrap();
    let first = store
        .create_key(new_key(&acme), &actor(), &roomy())
        .await
        .unwrap();
    let (seen, prefix) = next_change(&mut *listener, 5).await;
    assert_eq!(prefix, first.prefix);

    let imported: Vec<NewKey> = (0..5).map(|_| new_key(&acme)).collect();
    store.import_keys(imported.clone(), &actor()).await.unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(300), listener.next())
            .await
            .is_err(),
        "an import sends no notification"
    );

    let last = store
        .create_key(new_key(&acme), &actor(), &roomy())
        .await
        .unwrap();
    let (seq, prefix) = next_change(&mut *listener, 5).await;
    assert_eq!(prefix, last.prefix);
    assert_eq!(seq, seen + 6, "the sequence jumped over the import");
    // A follower catches up on what it was not told.
    let missed = store.changes_since(seen, 100).await.unwrap();
    let mut want: Vec<_> = imported.iter().map(|k| k.prefix.clone()).collect();
    want.push(last.prefix.clone());
    assert_eq!(missed.into_iter().map(|(_, p)| p).collect::<Vec<_>>(), want);
}

/// A TCP proxy that can be frozen: after `freeze`, it keeps every socket
/// open but forwards nothing, like a peer that vanished without a FIN or
/// a hung server. Returns its port and the freeze switch.
async fn freezable_proxy(
    upstream: std::net::SocketAddr,
) -> (u16, tokio::sync::watch::Sender<bool>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (freeze, frozen) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        loop {
            let Ok((client, _)) = listener.accept().await else {
                return;
            };
            let Ok(server) = tokio::net::TcpStream::connect(upstream).await else {
                return;
            };
            let (client_read, client_write) = client.into_split();
            let (server_read, server_write) = server.into_split();
            for (mut from, mut to) in [(client_read, server_write), (server_read, client_write)] {
                let mut frozen = frozen.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 16 * 1024];
                    loop {
                        tokio::select! {
                            read = from.read(&mut buf) => match read {
                                Ok(0) | Err(_) => return,
                                Ok(n) => {
                                    let now_frozen = *frozen.borrow();
                                    if now_frozen {
                                        break;
                                    }
                                    if to.write_all(&buf[..n]).await.is_err() {
                                        return;
                                    }
                                }
                            },
                            () = async { drop(frozen.wait_for(|f| *f).await) } => break,
                        }
                    }
                    // Frozen: hold both halves open, forward nothing.
                    std::future::pending::<()>().await;
                    drop((from, to));
                });
            }
        }
    });
    (port, freeze)
}

/// A connection string for `db` through [`freezable_proxy`], and the
/// switch that freezes it; `None` when the server is not reached over TCP.
async fn frozen_later(db: &TestDatabase) -> Option<(String, tokio::sync::watch::Sender<bool>)> {
    let config: tokio_postgres::Config = db.url().parse().unwrap();
    let host = match &config.get_hosts()[0] {
        tokio_postgres::config::Host::Tcp(host) => host.clone(),
        #[allow(unreachable_patterns)]
        _ => {
            eprintln!("skipped: the test server is not reached over TCP");
            return None;
        }
    };
    let upstream = tokio::net::lookup_host((host.as_str(), config.get_ports()[0]))
        .await
        .unwrap()
        .next()
        .unwrap();
    let (port, freeze) = freezable_proxy(upstream).await;
    let mut url = format!(
        "host=127.0.0.1 port={port} dbname={} user={}",
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
    Some((url, freeze))
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
    let store = PostgresStore::connect(db.url())
        .await
        .unwrap()
        .with_listener_options(SHORT_HEARTBEAT);
    store.migrate().await.unwrap();
    let mut listener = store.listen().await.unwrap().unwrap();
    // Through several heartbeats, with nobody calling next().
    tokio::time::sleep(SHORT_HEARTBEAT.heartbeat * 5).await;
    let acme: AccountId = "ACME".parse().unwrap();
    let key = store
        .create_key(new_key(&acme), &actor(), &roomy())
        .await
        .unwrap();
    assert_eq!(next_change(&mut *listener, 5).await.1, key.prefix);
    // And while next() waits through a heartbeat.
    assert!(
        tokio::time::timeout(SHORT_HEARTBEAT.heartbeat * 5, listener.next())
            .await
            .is_err(),
        "nothing to receive, and no error"
    );
    let fresh = GeneratedKey::generate(&pepper());
    store
        .rotate_key(
            &acme,
            &key.key_id,
            &NewSecret::from(&fresh),
            &actor(),
            OffsetDateTime::now_utc(),
            &Policy::default(),
        )
        .await
        .unwrap();
    assert_eq!(next_change(&mut *listener, 5).await.1, key.prefix);
    assert_eq!(&next_change(&mut *listener, 5).await.1, fresh.prefix());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_heartbeat_gives_up_a_silent_connection_sooner() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let Some((url, freeze)) = frozen_later(&db).await else {
        return;
    };
    let store = PostgresStore::connect(&url)
        .await
        .unwrap()
        .with_listener_options(SHORT_HEARTBEAT);
    store.migrate().await.unwrap();
    let mut listener = store.listen().await.unwrap().unwrap();
    // Idle through several heartbeats on a healthy connection: still subscribed.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let acme: AccountId = "ACME".parse().unwrap();
    let key = store
        .create_key(new_key(&acme), &actor(), &roomy())
        .await
        .unwrap();
    assert_eq!(next_change(&mut *listener, 5).await.1, key.prefix);

    freeze.send(true).unwrap();
    let frozen_at = tokio::time::Instant::now();
    let outcome = tokio::time::timeout(Duration::from_secs(5), listener.next())
        .await
        .expect("next() fails within 5 s of the connection going silent");
    assert!(
        matches!(outcome, Err(StoreError::Unavailable(_))),
        "{outcome:?}"
    );
    let took = frozen_at.elapsed();
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
    let store = Arc::new(PostgresStore::connect(db.url()).await.unwrap());
    store.migrate().await.unwrap();
    let acme: AccountId = "ACME".parse().unwrap();
    let limits = TierLimits {
        free: 1_000,
        premium: 1_000,
    };
    let next = Pepper::from_bytes(&[0x43; 32]);
    let mut rehashes = Vec::new();
    for _ in 0..60 {
        let new = new_key(&acme);
        rehashes.push(vilvik_keys_store::Rehash {
            prefix: new.prefix.clone(),
            old_hash: new.hash,
            old_pepper_id: Some(new.pepper_id),
            new_hash: vilvik_keys_domain::SecretHash::from_bytes([7; 32]),
            new_pepper_id: next.id(),
        });
        store
            .create_key(new, &actor(), &limits.into())
            .await
            .unwrap();
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

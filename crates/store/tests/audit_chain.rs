//! The audit log's hash chain on both backends: rows edited, deleted and
//! reordered with direct SQL (as someone with database access would) are
//! each detected and named; an untouched store, concurrent changes of one
//! account and an old database migrated forward verify intact; event ids
//! are per account.
//!
//! Each test is an `async fn(Subject)` written once; `on_both!` at the
//! bottom instantiates it on a SQLite file and on a fresh Postgres
//! database (skipped without `VILVIK_KEYS_TEST_DATABASE_URL` unless
//! `VILVIK_KEYS_REQUIRE_POSTGRES=1`).

use std::sync::Arc;

use time::{Duration, OffsetDateTime};
use vilvik_keys_domain::{AccountId, GeneratedKey, Pepper, Tier, TierLimits};
use vilvik_keys_store::{
    Actor, BrokenLink, ChainCheck, ChainSummary, KeyChanges, NewKey, NewSecret, Policy, Store,
};

/// A migrated store and a way to reach its tables behind its back.
struct Subject {
    store: Arc<dyn Store>,
    raw: Raw,
    _keep: Box<dyn std::any::Any + Send>,
}

enum Raw {
    Sqlite(std::path::PathBuf),
    Postgres(String),
}

impl Raw {
    /// Runs `sql` as a database owner would, outside the store.
    async fn exec(&self, sql: &str) {
        match self {
            Raw::Sqlite(path) => {
                let conn = rusqlite::Connection::open(path).unwrap();
                conn.execute_batch(sql)
                    .unwrap_or_else(|e| panic!("{sql}: {e}"));
            }
            Raw::Postgres(url) => {
                let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
                    .await
                    .unwrap();
                let connection = tokio::spawn(connection);
                client
                    .batch_execute(sql)
                    .await
                    .unwrap_or_else(|e| panic!("{sql}: {e}"));
                drop(client);
                let _ = connection.await;
            }
        }
    }
}

fn pepper() -> Pepper {
    Pepper::from_bytes(&[0x42; 32])
}

fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc().replace_nanosecond(0).unwrap()
}

fn account(name: &str) -> AccountId {
    name.parse().unwrap()
}

fn actor() -> Actor {
    Actor {
        name: "operator:alice@example.com".to_owned(),
        ip: Some("203.0.113.7".to_owned()),
        operator: true,
    }
}

fn roomy() -> Policy {
    Policy::from(TierLimits {
        free: 1000,
        premium: 1000,
    })
}

fn new_key(account: &AccountId, name: &str, at: OffsetDateTime) -> NewKey {
    NewKey::builder(account.clone())
        .name(name.parse().unwrap())
        .created_at(at)
        .build(&pepper())
        .0
}

/// Checks the chains as `vilvik-keys audit verify` does.
async fn verify(
    store: &dyn Store,
    account: Option<&AccountId>,
) -> Result<ChainSummary, BrokenLink> {
    let mut check = ChainCheck::new();
    store
        .stream_audit_chain(account, 3, &mut |rows| {
            rows.into_iter().for_each(|r| check.push(r))
        })
        .await
        .unwrap();
    check.finish()
}

async fn broken(store: &dyn Store) -> String {
    verify(store, None)
        .await
        .expect_err("the tampering is detected")
        .to_string()
}

/// ACME: 8 events (create, create, update, rotate, revoke, tier, and two
/// imported keys); globex: 1; initech: 1 (imported).
async fn fill(store: &dyn Store) {
    let (acme, globex, initech) = (account("ACME"), account("globex"), account("initech"));
    let t0 = now();
    let alpha = store
        .create_key(new_key(&acme, "alpha", t0), &actor(), &roomy())
        .await
        .unwrap();
    let beta = store
        .create_key(new_key(&acme, "beta", t0), &actor(), &roomy())
        .await
        .unwrap();
    store
        .create_key(new_key(&globex, "theirs", t0), &actor(), &roomy())
        .await
        .unwrap();
    let rename = KeyChanges {
        name: Some("alpha-2".parse().unwrap()),
        ..KeyChanges::default()
    };
    store
        .update_key(
            &acme,
            &alpha.key_id,
            rename,
            &actor(),
            t0 + Duration::seconds(1),
            &roomy(),
        )
        .await
        .unwrap();
    let fresh = GeneratedKey::generate(&pepper());
    store
        .rotate_key(
            &acme,
            &alpha.key_id,
            &NewSecret::from(&fresh),
            &actor(),
            t0 + Duration::seconds(2),
            &roomy(),
        )
        .await
        .unwrap();
    store
        .revoke_key(
            &acme,
            &beta.key_id,
            "unused",
            &actor(),
            t0 + Duration::seconds(3),
        )
        .await
        .unwrap();
    store
        .set_tier(&acme, Tier::Premium, &actor(), t0 + Duration::seconds(4))
        .await
        .unwrap();
    let imported = vec![
        new_key(&acme, "imported-1", t0),
        new_key(&initech, "imported-2", t0),
        new_key(&acme, "imported-3", t0),
    ];
    store.import_keys(imported, &actor()).await.unwrap();
}

// ---------------------------------------------------------------------------
// The tests

async fn an_untouched_store_verifies_and_numbers_events_per_account(s: Subject) {
    assert_eq!(verify(&*s.store, None).await, Ok(ChainSummary::default()));
    fill(&*s.store).await;
    assert_eq!(
        verify(&*s.store, None).await,
        Ok(ChainSummary {
            accounts: 3,
            events: 10
        })
    );
    assert_eq!(
        verify(&*s.store, Some(&account("ACME"))).await,
        Ok(ChainSummary {
            accounts: 1,
            events: 8
        })
    );
    assert_eq!(
        verify(&*s.store, Some(&account("nobody"))).await,
        Ok(ChainSummary::default())
    );
    // Each account counts its own events from 1: no id says how many
    // other accounts' events came before.
    for (name, count) in [("ACME", 8), ("globex", 1), ("initech", 1)] {
        let events = s
            .store
            .list_audit_events(&account(name), None, None, 100)
            .await
            .unwrap()
            .items;
        let ids: Vec<i64> = events.iter().map(|e| e.event_id).collect();
        assert_eq!(ids, (1..=count).collect::<Vec<_>>(), "{name}");
    }
    // Cursors are those numbers too.
    let page = s
        .store
        .list_audit_events(&account("ACME"), None, Some(6), 100)
        .await
        .unwrap();
    assert_eq!(
        page.items.iter().map(|e| e.event_id).collect::<Vec<_>>(),
        [7, 8]
    );
}

async fn an_edited_field_is_detected(s: Subject) {
    fill(&*s.store).await;
    s.raw
        .exec("UPDATE audit_events SET actor = 'operator:mallory' WHERE account_id = 'ACME' AND account_seq = 3")
        .await;
    assert_eq!(
        broken(&*s.store).await,
        "account 'ACME', event 3: its content does not match its hash (edited)"
    );
    // Another account's chain is untouched.
    assert!(verify(&*s.store, Some(&account("globex"))).await.is_ok());
}

async fn edited_changes_are_detected(s: Subject) {
    fill(&*s.store).await;
    s.raw
        .exec(
            "UPDATE audit_events SET changes = '[{\"field\":\"reason\",\"old\":null,\"new\":\"routine\"}]' \
             WHERE account_id = 'ACME' AND account_seq = 5",
        )
        .await;
    assert_eq!(
        broken(&*s.store).await,
        "account 'ACME', event 5: its content does not match its hash (edited)"
    );
}

async fn a_deleted_event_is_detected(s: Subject) {
    fill(&*s.store).await;
    s.raw
        .exec("DELETE FROM audit_events WHERE account_id = 'ACME' AND account_seq = 3")
        .await;
    assert_eq!(
        broken(&*s.store).await,
        "account 'ACME', event 4 follows 2: event 3 is missing (deleted)"
    );
}

async fn the_newest_event_deleted_is_detected(s: Subject) {
    fill(&*s.store).await;
    s.raw
        .exec("DELETE FROM audit_events WHERE account_id = 'ACME' AND account_seq = 8")
        .await;
    assert_eq!(
        broken(&*s.store).await,
        "account 'ACME', head says 8 events, found 7 (the newest deleted)"
    );
}

async fn a_deleted_head_is_detected(s: Subject) {
    fill(&*s.store).await;
    s.raw
        .exec("DELETE FROM audit_heads WHERE account_id = 'globex'")
        .await;
    assert_eq!(
        broken(&*s.store).await,
        "account 'globex', no head is recorded for its 1 events (the head was deleted)"
    );
}

async fn swapped_numbers_are_detected(s: Subject) {
    fill(&*s.store).await;
    s.raw
        .exec(
            "UPDATE audit_events SET account_seq = -1 WHERE account_id = 'ACME' AND account_seq = 2; \
             UPDATE audit_events SET account_seq = 2 WHERE account_id = 'ACME' AND account_seq = 3; \
             UPDATE audit_events SET account_seq = 3 WHERE account_id = 'ACME' AND account_seq = -1;",
        )
        .await;
    assert_eq!(
        broken(&*s.store).await,
        "account 'ACME', event 2: its content does not match its hash (edited)"
    );
}

async fn swapped_contents_are_detected(s: Subject) {
    fill(&*s.store).await;
    // Every column but the numbers, hashes included.
    s.raw
        .exec(
            "CREATE TEMP TABLE copied AS SELECT * FROM audit_events \
                 WHERE account_id = 'ACME' AND account_seq IN (4, 5); \
             UPDATE audit_events SET (key_id, action, actor, actor_ip, at, changes, prev_hash, hash) = \
                 (SELECT key_id, action, actor, actor_ip, at, changes, prev_hash, hash FROM copied \
                  WHERE copied.account_seq = 9 - audit_events.account_seq) \
             WHERE account_id = 'ACME' AND account_seq IN (4, 5);",
        )
        .await;
    assert_eq!(
        broken(&*s.store).await,
        "account 'ACME', event 4: its content does not match its hash (edited)"
    );
}

async fn an_event_moved_to_another_account_is_detected(s: Subject) {
    fill(&*s.store).await;
    s.raw
        .exec("UPDATE audit_events SET account_id = 'globex', account_seq = 2 WHERE account_id = 'ACME' AND account_seq = 8")
        .await;
    let message = broken(&*s.store).await;
    assert_eq!(
        message,
        "account 'ACME', head says 8 events, found 7 (the newest deleted)"
    );
}

async fn concurrent_changes_of_one_account_never_fork_the_chain(s: Subject) {
    let acme = account("ACME");
    let t0 = now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..16 {
        let store = s.store.clone();
        let acme = acme.clone();
        tasks.spawn(async move {
            let key = store
                .create_key(new_key(&acme, &format!("k{i}"), t0), &actor(), &roomy())
                .await
                .unwrap();
            let rename = KeyChanges {
                name: Some(format!("k{i}-renamed").parse().unwrap()),
                ..KeyChanges::default()
            };
            store
                .update_key(&acme, &key.key_id, rename, &actor(), t0, &roomy())
                .await
                .unwrap();
            store
                .revoke_key(&acme, &key.key_id, "done", &actor(), t0)
                .await
                .unwrap();
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
    assert_eq!(
        verify(&*s.store, None).await,
        Ok(ChainSummary {
            accounts: 1,
            events: 48
        })
    );
    let ids: Vec<i64> = s
        .store
        .list_audit_events(&acme, None, None, 100)
        .await
        .unwrap()
        .items
        .iter()
        .map(|e| e.event_id)
        .collect();
    assert_eq!(ids, (1..=48).collect::<Vec<_>>());
}

macro_rules! on_both {
    ($($test:ident),* $(,)?) => {
        mod sqlite {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $test() {
                    let dir = tempfile::tempdir().unwrap();
                    let path = dir.path().join("vilvik-keys.db");
                    let store = vilvik_keys_store::SqliteStore::open(&path).await.unwrap();
                    store.migrate().await.unwrap();
                    super::$test(Subject {
                        store: Arc::new(store),
                        raw: Raw::Sqlite(path),
                        _keep: Box::new(dir),
                    })
                    .await;
                }
            )*
        }

        mod postgres {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $test() {
                    let Some(db) = vilvik_keys_test_db::TestDatabase::create().await else {
                        return;
                    };
                    let store = vilvik_keys_store::PostgresStore::connect(db.url()).await.unwrap();
                    store.migrate().await.unwrap();
                    super::$test(Subject {
                        store: Arc::new(store),
                        raw: Raw::Postgres(db.url().to_owned()),
                        _keep: Box::new(db),
                    })
                    .await;
                }
            )*
        }
    };
}

on_both!(
    an_untouched_store_verifies_and_numbers_events_per_account,
    an_edited_field_is_detected,
    edited_changes_are_detected,
    a_deleted_event_is_detected,
    the_newest_event_deleted_is_detected,
    a_deleted_head_is_detected,
    swapped_numbers_are_detected,
    swapped_contents_are_detected,
    an_event_moved_to_another_account_is_detected,
    concurrent_changes_of_one_account_never_fork_the_chain,
);

// ---------------------------------------------------------------------------
// A database from before the chain, migrated forward

/// The migrations before the chain's, as an older binary applied them
/// (its ledger from before checksums: trusted, filled in by `migrate`).
fn old_schema(files: [&str; 3]) -> String {
    let mut sql = files.join("\n");
    sql.push_str(
        "\nCREATE TABLE schema_migrations (version BIGINT PRIMARY KEY, name TEXT NOT NULL, \
         applied_at TEXT NOT NULL, checksum TEXT);\n\
         INSERT INTO schema_migrations (version, name, applied_at) VALUES \
         (1, 'initial', 'then'), (2, 'change_log_floor', 'then'), (3, 'pepper_id', 'then');\n",
    );
    sql
}

/// Five events the old binary wrote, two accounts interleaved; `at` is the
/// backend's expression for a time in whole seconds.
fn old_events(at: fn(i64) -> String) -> String {
    let key = vilvik_keys_domain::KeyId::generate();
    let rows = [
        ("ACME", "created", "bootstrap", "NULL"),
        ("globex", "created", "operator:bob", "'198.51.100.4'"),
        ("ACME", "updated", "operator:alice", "'203.0.113.7'"),
        ("globex", "revoked", "operator:bob", "NULL"),
        ("ACME", "rotated", "key:key_AAAAAAAAAAAAAAAAAAAA", "NULL"),
    ];
    rows.iter()
        .enumerate()
        .map(|(i, (account, action, actor, ip))| {
            format!(
                "INSERT INTO audit_events (account_id, key_id, action, actor, actor_ip, at, changes) \
                 VALUES ('{account}', '{key}', '{action}', '{actor}', {ip}, {}, \
                 '[{{\"field\":\"name\",\"old\":null,\"new\":\"k{i}\"}}]');\n",
                at(i as i64)
            )
        })
        .collect()
}

/// After the migration: the old events verify, are numbered per account
/// in the order they were written, and new ones chain on.
async fn check_migrated_forward(store: &dyn Store, raw: &Raw) {
    assert_eq!(
        store.migrate().await.unwrap(),
        vilvik_keys_store::MIGRATION_COUNT - 3
    );
    assert_eq!(
        verify(store, None).await,
        Ok(ChainSummary {
            accounts: 2,
            events: 5
        })
    );
    let acme = account("ACME");
    let events = store
        .list_audit_events(&acme, None, None, 100)
        .await
        .unwrap()
        .items;
    let listed: Vec<(i64, &str)> = events
        .iter()
        .map(|e| (e.event_id, e.actor.as_str()))
        .collect();
    assert_eq!(
        listed,
        [
            (1, "bootstrap"),
            (2, "operator:alice"),
            (3, "key:key_AAAAAAAAAAAAAAAAAAAA")
        ]
    );
    store
        .create_key(new_key(&acme, "after", now()), &actor(), &roomy())
        .await
        .unwrap();
    assert_eq!(
        verify(store, None).await,
        Ok(ChainSummary {
            accounts: 2,
            events: 6
        })
    );
    assert_eq!(store.migrate().await.unwrap(), 0, "chained once");
    // And the old events are as tamper-evident as new ones.
    raw.exec("UPDATE audit_events SET actor = 'someone else' WHERE account_id = 'globex' AND account_seq = 1")
        .await;
    assert_eq!(
        broken(store).await,
        "account 'globex', event 1: its content does not match its hash (edited)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_an_old_database_migrated_forward_verifies_intact() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("old.db");
    let raw = Raw::Sqlite(path.clone());
    raw.exec(&old_schema([
        include_str!("../migrations/sqlite/0001_initial.sql"),
        include_str!("../migrations/sqlite/0002_change_log_floor.sql"),
        include_str!("../migrations/sqlite/0003_pepper_id.sql"),
    ]))
    .await;
    raw.exec(&old_events(|s| {
        format!("{}", (1_800_000_000 + s) * 1_000_000)
    }))
    .await;
    let store = vilvik_keys_store::SqliteStore::open(&path).await.unwrap();
    check_migrated_forward(&store, &raw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_an_old_database_migrated_forward_verifies_intact() {
    let Some(db) = vilvik_keys_test_db::TestDatabase::create().await else {
        return;
    };
    let raw = Raw::Postgres(db.url().to_owned());
    raw.exec(&old_schema([
        include_str!("../migrations/postgres/0001_initial.sql"),
        include_str!("../migrations/postgres/0002_change_log_floor.sql"),
        include_str!("../migrations/postgres/0003_pepper_id.sql"),
    ]))
    .await;
    raw.exec(&old_events(|s| {
        format!("to_timestamp({})", 1_800_000_000 + s)
    }))
    .await;
    let store = vilvik_keys_store::PostgresStore::connect(db.url())
        .await
        .unwrap();
    check_migrated_forward(&store, &raw).await;
}

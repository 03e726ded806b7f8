//! How fast `import_keys` seeds and `scan_secrets` reads back a large
//! store, on each backend. Measured and printed, never asserted (timings
//! depend on the machine), so these are `#[ignore]`d; run them with
//!
//! ```text
//! VILVIK_KEYS_TEST_DATABASE_URL=postgres://postgres@127.0.0.1:5432/test \
//!   cargo test --release -p vilvik-keys-store --test import_timing -- --ignored --nocapture
//! ```
//!
//! They also print the query plan of a scan page, which must be a range
//! scan of the `key_secrets` primary key, not a sort of the whole table.

use std::time::{Duration, Instant};

use time::OffsetDateTime;
use vilvik_keys_domain::{AccountId, Description, GeneratedKey, KeyId, ScopeSet};
use vilvik_keys_store::{Actor, NewKey, PostgresStore, SqliteStore, Store};
use vilvik_keys_test_db::TestDatabase;

const KEYS: usize = 100_000;
const CHUNK: usize = 10_000;
const ACCOUNTS: usize = 1_000;

fn chunks() -> Vec<Vec<NewKey>> {
    let at = OffsetDateTime::now_utc().replace_nanosecond(0).unwrap();
    let accounts: Vec<AccountId> = (0..ACCOUNTS)
        .map(|i| format!("acct-{i}").parse().unwrap())
        .collect();
    let scopes = ScopeSet::parse(&["datasets:read", "models:*"]).unwrap();
    let keys: Vec<NewKey> = (0..KEYS)
        .map(|i| {
            let generated = GeneratedKey::generate();
            NewKey {
                key_id: KeyId::generate(),
                account_id: accounts[i % ACCOUNTS].clone(),
                name: format!("seeded-{i}").parse().unwrap(),
                description: Description::default(),
                scopes: scopes.clone(),
                expires_at: None,
                prefix: generated.prefix().clone(),
                hash: generated.hash(),
                created_at: at,
            }
        })
        .collect();
    keys.chunks(CHUNK).map(<[NewKey]>::to_vec).collect()
}

/// Imports every chunk, then scans everything back a chunk at a time.
async fn measure(backend: &str, store: &dyn Store) {
    let chunks = chunks();
    let actor = Actor {
        name: "operator:bench@example.com".to_owned(),
        ip: None,
    };
    let started = Instant::now();
    for chunk in chunks {
        store.import_keys(chunk, &actor).await.unwrap();
    }
    let imported = started.elapsed();

    let started = Instant::now();
    let mut after = None;
    let mut scanned = 0;
    loop {
        let page = store
            .scan_secrets(after.as_ref(), CHUNK as u32)
            .await
            .unwrap();
        scanned += page.len();
        let full = page.len() == CHUNK;
        after = page.last().map(|(prefix, _)| prefix.clone());
        if !full {
            break;
        }
    }
    let scan = started.elapsed();
    assert_eq!(scanned, KEYS);
    assert_eq!(store.change_sequence().await.unwrap(), KEYS as i64);
    report(backend, imported, scan);
}

fn report(backend: &str, imported: Duration, scan: Duration) {
    eprintln!(
        "{backend}: import_keys of {KEYS} keys in chunks of {CHUNK}: {:.2} s ({:.0} keys/s); \
         scan_secrets of all of them in pages of {CHUNK}: {:.2} s",
        imported.as_secs_f64(),
        KEYS as f64 / imported.as_secs_f64(),
        scan.as_secs_f64(),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "a timing report; run with --ignored --nocapture, preferably --release"]
async fn sqlite_import_and_scan_timing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vilvik-keys.db");
    let store = SqliteStore::open(&path).await.unwrap();
    store.migrate().await.unwrap();
    measure("sqlite", &store).await;

    let conn = rusqlite::Connection::open(&path).unwrap();
    let mut stmt = conn
        .prepare(
            "EXPLAIN QUERY PLAN SELECT s.prefix FROM key_secrets s \
             JOIN keys k ON k.key_id = s.key_id WHERE s.prefix > ?1 ORDER BY s.prefix LIMIT ?2",
        )
        .unwrap();
    let plan: Vec<String> = stmt
        .query_map(rusqlite::params!["vlk_M", 10_000], |r| r.get(3))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    eprintln!("sqlite scan plan: {plan:?}");
    assert!(
        plan.iter().all(|step| !step.contains("TEMP B-TREE")),
        "{plan:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "a timing report; run with --ignored --nocapture, preferably --release"]
async fn postgres_import_and_scan_timing() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let store = PostgresStore::connect(db.url()).await.unwrap();
    store.migrate().await.unwrap();
    measure("postgres", &store).await;

    let (client, connection) = tokio_postgres::connect(db.url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    client.batch_execute("ANALYZE").await.unwrap();
    let plan: Vec<String> = client
        .query(
            "EXPLAIN SELECT s.prefix FROM key_secrets s JOIN keys k ON k.key_id = s.key_id \
             WHERE s.prefix > 'vlk_M' ORDER BY s.prefix LIMIT 10000",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    eprintln!("postgres scan plan:\n  {}", plan.join("\n  "));
    assert!(
        plan.iter().any(|step| step.contains("key_secrets_pkey")),
        "{plan:?}"
    );
}
